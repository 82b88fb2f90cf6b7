//! Progress of long computations. The library reports through [`Progress`]; the binary
//! draws it (an indicatif bar there, in `src/bin/ddpm/progress.rs`).

/// What a long computation reports to its caller: how many units there are, how many are
/// done, and a short status. Every method has a no-op default.
pub trait Progress {
    /// `total` units named `unit` ("steps", "model calls") are to be done, `done` already are.
    fn start(&mut self, total: u64, done: u64, unit: &'static str) {
        let _ = (total, done, unit);
    }
    /// `done` units are done so far.
    fn update(&mut self, done: u64) {
        let _ = done;
    }
    /// A short status beside the count (e.g. `loss 21.3`).
    fn status(&mut self, status: &str) {
        let _ = status;
    }
    /// A line for the person running it (e.g. `wrote samples/step-0000500.png`).
    fn note(&mut self, line: &str) {
        let _ = line;
    }
    /// A warning for the person running it (e.g. a skipped batch); by default a note.
    fn warn(&mut self, line: &str) {
        self.note(line);
    }
    /// The work is over (done or failed).
    fn finish(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}
