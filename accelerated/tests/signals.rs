//! One writer per run directory and a graceful stop (issue 14, items 1 and 3), with the real
//! `ddpm` binary as a child process: a second `ddpm train` on a directory being trained
//! exits at once naming the holder's pid, a SIGKILL leaves no stale lock, `ddpm sample`
//! reads the run meanwhile; SIGINT, SIGTERM and SIGHUP stop a run after its step with a
//! checkpoint it resumes from bit for bit, and a second signal exits at once.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Long enough never to finish while a test watches it.
const FOREVER: u64 = 100_000;

/// Every committed checkpoint of `run` holds the files its manifest records.
fn assert_checkpoints_whole(run: &Path) {
    for step in checkpoint_steps(run) {
        assert_eq!(
            file_sums(run, step),
            state_sums(run, step),
            "checkpoint {step} is not whole"
        );
    }
}

/// A child process that is killed when dropped, so that a failing test leaves no run of
/// [`FOREVER`] steps behind.
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `cmd` with stdout and stderr in files `name.out` / `name.err` beside `run`.
fn spawn_logged(mut cmd: Command, run: &Path, name: &str) -> Running {
    let base = run.parent().unwrap();
    let out = std::fs::File::create(base.join(format!("{name}.out"))).unwrap();
    let err = std::fs::File::create(base.join(format!("{name}.err"))).unwrap();
    cmd.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map(Running)
        .expect("cannot start ddpm")
}

fn stderr_of(run: &Path, name: &str) -> String {
    std::fs::read_to_string(run.parent().unwrap().join(format!("{name}.err"))).unwrap()
}

/// Polls until `ready` holds while `child` runs; panics if it ends first or after a minute.
fn wait_until(child: &mut Child, what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status:?}) before {what}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {what} in a minute"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits at most `secs` for `child` to end (then kills it and panics).
fn wait_for(child: &mut Child, secs: u64, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still ran after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends `signal` (a name for `kill -s`) to `child`.
fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .expect("cannot run kill");
    assert!(status.success(), "kill -s {signal} failed");
}

/// A second writer on a run being trained, started while it trains: it must end within a
/// few seconds with exit status 1, saying that the directory is in use by `pid`.
fn refused(mut cmd: Command, run: &Path, name: &str, pid: u32) {
    let start = Instant::now();
    let mut child = spawn_logged(std::mem::replace(&mut cmd, Command::new("true")), run, name);
    let status = wait_for(&mut child, 30, "the second writer");
    let err = stderr_of(run, name);
    assert_eq!(status.code(), Some(1), "{name}: {status:?}\n{err}");
    for needle in ["error:", "is in use", &format!("pid {pid}")] {
        assert!(
            err.contains(needle),
            "{name} does not say {needle:?}:\n{err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{name} took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_second_writer_is_refused_naming_the_holder_readers_work_and_a_kill_leaves_no_lock() {
    let setup = Setup::new(FOREVER, 3);
    let run = setup.path("run");
    let mut holder = spawn_logged(setup.train(&run, &[]), &run, "holder");
    let pid = holder.id();
    wait_until(&mut holder, "a checkpoint", || {
        !checkpoint_steps(&run).is_empty()
    });
    refused(resume(&run, &[]), &run, "resume", pid);
    refused(setup.train(&run, &["--seed", "9"]), &run, "fresh", pid);
    assert!(holder.try_wait().unwrap().is_none(), "the holder ended");
    // Readers take no lock: sampling the run directory (its newest checkpoint) works now.
    let png = setup.path("while.png");
    succeeds(&mut sample(&run, &png, &["--n", "1", "--steps", "2"]));
    assert!(std::fs::metadata(&png).unwrap().len() > 0);
    assert!(holder.try_wait().unwrap().is_none(), "the holder ended");

    holder.kill().unwrap();
    holder.wait().unwrap();
    // The kernel dropped the lock with the process: a resume starts at once.
    let last = *checkpoint_steps(&run).last().unwrap();
    let until = (last + 2).to_string();
    succeeds(&mut resume(&run, &["--steps", &until]));
    assert_eq!(logged_steps(&run), (1..=last + 2).collect::<Vec<_>>());
    assert_checkpoints_whole(&run);
    let lock = std::fs::read_to_string(run.join(".lock")).unwrap();
    assert!(lock.trim().parse::<u32>().is_ok(), "lock file {lock:?}");
}

/// Two fresh runs in one directory before either has checkpointed (the case that used to
/// interleave metrics.jsonl and share `step-N.tmp/`): the second is refused naming the first.
#[test]
fn a_second_fresh_run_is_refused_before_any_checkpoint() {
    let setup = Setup::new(FOREVER, 1000);
    let run = setup.path("run");
    let mut holder = spawn_logged(setup.train(&run, &[]), &run, "holder");
    wait_until(&mut holder, "a logged step", || last_logged(&run) >= 1);
    refused(
        setup.train(&run, &["--seed", "9"]),
        &run,
        "fresh",
        holder.id(),
    );
    assert!(holder.try_wait().unwrap().is_none(), "the holder ended");
    assert!(checkpoint_steps(&run).is_empty());
    holder.kill().unwrap();
    holder.wait().unwrap();
}

/// Sends `name` (signal number `number`) to a run after a few steps and checks the graceful
/// stop: conventional status, the message, a whole checkpoint of the step reached, and a
/// resume from it that logs every step once. Returns the setup, run and step reached.
fn graceful_stop(name: &str, number: i32) -> (Setup, std::path::PathBuf, u64) {
    let setup = Setup::new(FOREVER, 1000);
    let run = setup.path("run");
    let mut child = spawn_logged(setup.train(&run, &[]), &run, "train");
    wait_until(&mut child, "three logged steps", || last_logged(&run) >= 3);
    signal(&child, name);
    let status = wait_for(&mut child, 60, "the signalled run");
    let err = stderr_of(&run, "train");
    assert_eq!(
        status.code(),
        Some(128 + number),
        "{name}: {status:?}\n{err}"
    );
    let want = format!("resume with: ddpm train --resume --out {}", run.display());
    assert!(err.contains(&want), "{name}: no {want:?} in\n{err}");
    let step: u64 = err
        .split("stopped at step ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{name}: no step in\n{err}"));
    assert!(step >= 3, "{name}: stopped at {step}");
    assert!(
        err.contains(&checkpoint_dir(&run, step).display().to_string()),
        "{err}"
    );
    // Only the stop wrote a checkpoint (the interval is 1000), of the step it reached.
    assert_eq!(checkpoint_steps(&run), vec![step], "{name}");
    assert!(tmp_dirs(&run).is_empty(), "{name}: {:?}", tmp_dirs(&run));
    assert_checkpoints_whole(&run);
    let until = (step + 3).to_string();
    succeeds(&mut resume(&run, &["--steps", &until]));
    assert_eq!(
        logged_steps(&run),
        (1..=step + 3).collect::<Vec<_>>(),
        "{name}"
    );
    (setup, run, step)
}

#[test]
fn sigint_stops_after_the_step_with_a_checkpoint_that_resumes_bit_for_bit() {
    let (setup, run, step) = graceful_stop("INT", 2);
    // The resumed run ends with the bytes of an uninterrupted run of as many steps.
    let whole = setup.path("whole");
    let until = (step + 3).to_string();
    succeeds(&mut setup.train(&whole, &["--steps", &until]));
    assert_eq!(file_sums(&run, step + 3), file_sums(&whole, step + 3));
}

#[test]
fn sigterm_stops_after_the_step_with_a_checkpoint() {
    graceful_stop("TERM", 15);
}

#[test]
fn sighup_stops_after_the_step_with_a_checkpoint() {
    graceful_stop("HUP", 1);
}

/// A second SIGTERM while the first one's stop is under way (sent every millisecond until the
/// run ends) exits at once with 143, without the stop's checkpoint or message, and every
/// committed checkpoint stays whole and resumable.
#[test]
fn a_second_signal_exits_at_once_and_committed_checkpoints_stay_whole() {
    let setup = Setup::new(FOREVER, 4);
    let run = setup.path("run");
    // A wider network: each step and checkpoint takes a few milliseconds or more.
    let mut child = spawn_logged(setup.train(&run, &["--base-channels", "32"]), &run, "train");
    // Two checkpoints committed, and the last step logged not one of them, so the stop has a
    // step to finish and a checkpoint to write when the first signal comes.
    wait_until(&mut child, "two checkpoints", || {
        let logged = last_logged(&run);
        checkpoint_steps(&run).len() >= 2 && matches!(logged % 4, 1 | 2)
    });
    signal(&child, "TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "still running");
        signal(&child, "TERM");
        std::thread::sleep(Duration::from_millis(1));
    };
    let err = stderr_of(&run, "train");
    assert_eq!(status.code(), Some(143), "{status:?}\n{err}");
    assert!(
        !err.contains("resume with"),
        "the graceful stop ran:\n{err}"
    );
    assert_checkpoints_whole(&run);
    let last = *checkpoint_steps(&run).last().unwrap();
    let until = (last + 2).to_string();
    succeeds(&mut resume(&run, &["--steps", &until]));
    assert_eq!(logged_steps(&run), (1..=last + 2).collect::<Vec<_>>());
}
