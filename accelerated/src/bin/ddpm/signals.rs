//! SIGINT, SIGTERM and SIGHUP during `ddpm train`: the first asks the run to stop after its
//! current step (it writes a checkpoint and says how to resume), a second one exits at once
//! with the conventional status 128 + signal number. Checkpoints are written under a `.tmp`
//! name and renamed, so an exit at once leaves every committed checkpoint whole.

use ddpm::train::StopFlag;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The signals that stop a run, with their names.
const STOPPING: [(i32, &str); 3] = [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM"), (SIGHUP, "SIGHUP")];

/// The handlers of a training run: the flag the run watches and which signal raised it.
pub struct StopSignals {
    flag: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

impl StopSignals {
    /// Installs the handlers for the rest of the process.
    pub fn install() -> std::io::Result<StopSignals> {
        let flag = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicUsize::new(0));
        for (signal, _) in STOPPING {
            // Registered first, so it sees the flag as the earlier signals left it: a second
            // signal (of any of the three) ends the process at once.
            signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, flag.clone())?;
            signal_hook::flag::register_usize(signal, which.clone(), signal as usize)?;
            signal_hook::flag::register(signal, flag.clone())?;
        }
        Ok(StopSignals { flag, which })
    }

    /// The flag for [`ddpm::train::TrainOptions::stop`].
    pub fn stop_flag(&self) -> StopFlag {
        StopFlag::from_arc(self.flag.clone())
    }

    /// The signal that asked the run to stop, if one did.
    pub fn received(&self) -> Option<Stopped> {
        let signal = self.which.load(Ordering::SeqCst) as i32;
        STOPPING
            .iter()
            .find(|(s, _)| *s == signal)
            .map(|&(signal, name)| Stopped { signal, name })
    }
}

/// A run that stopped on a signal after saving its checkpoint: `main` exits with
/// [`Stopped::status`] (the message was printed where it stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// The signal number.
    pub signal: i32,
    /// Its name (`SIGINT`).
    pub name: &'static str,
}

impl Stopped {
    /// The conventional exit status of a process ended by this signal: 128 + its number.
    pub fn status(&self) -> u8 {
        (128 + self.signal) as u8
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by {}", self.name)
    }
}

impl std::error::Error for Stopped {}
