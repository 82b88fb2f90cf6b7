//! A run's `metrics.jsonl`: one JSON object a logged step (step, loss, lr, grad_norm,
//! steps_per_s, elapsed_s, skipped), appended as training goes and trimmed on resume.

use crate::error::{DdpmError, Result};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// The update just done.
    pub step: u64,
    /// Mean loss since the last line (written as null when not finite).
    pub loss: f64,
    /// The learning rate of the update.
    pub lr: f64,
    /// The global gradient norm of the update, when known (null when not finite).
    pub grad_norm: Option<f64>,
    /// Updates a second since the last line.
    pub steps_per_s: f64,
    /// Seconds since this run (or resume) began.
    pub elapsed_s: f64,
    /// Batches skipped so far for a non-finite loss.
    pub skipped: u64,
}

/// `metrics.jsonl`, open for appending. Each line is appended in one write, checked, and cut
/// back if it fails (see [`crate::fsio::append_line`]); a kill can still leave a partial last
/// line, which [`MetricsLog::open`] drops and a reader must skip.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    /// (step, loss) of every line, those kept from before a resume included (NaN for null).
    losses: Vec<(u64, f64)>,
}

impl MetricsLog {
    /// Opens `path` for appending after dropping the lines of steps after `step` (a run
    /// stopped after its last checkpoint logged steps that the resumed run repeats) and a
    /// partial last line (a run killed while writing it).
    pub fn open(path: &Path, step: u64) -> Result<MetricsLog> {
        // A link to a device or a FIFO under this name would be read without end (or block).
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.is_file() {
                return Err(DdpmError::io(
                    format!("cannot open {}", path.display()),
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "it is not a regular file",
                    ),
                ));
            }
        }
        let old = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(DdpmError::io(format!("cannot read {}", path.display()), e)),
        };
        let kept: String = old
            .split_inclusive('\n')
            .filter(|line| line.ends_with('\n') && logged_step(line).is_some_and(|s| s <= step))
            .collect();
        if kept.len() != old.len() {
            crate::fsio::write_bytes_atomic(path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| DdpmError::io(format!("cannot open {}", path.display()), e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            losses: kept.lines().filter_map(logged_loss).collect(),
        })
    }

    /// Appends `record` as one line.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let line = serde_json::json!({
            "step": record.step,
            "loss": finite_or_null(record.loss),
            "lr": record.lr,
            "grad_norm": record.grad_norm.and_then(finite_or_null),
            "steps_per_s": record.steps_per_s,
            "elapsed_s": record.elapsed_s,
            "skipped": record.skipped,
        });
        crate::fsio::append_line(&mut self.file, &self.path, &format!("{line}\n"))?;
        self.losses.push((record.step, record.loss));
        Ok(())
    }

    /// (step, loss) of every line in the log, in order (NaN where the loss was not finite):
    /// what the loss curve draws.
    pub fn losses(&self) -> &[(u64, f64)] {
        &self.losses
    }
}

/// The step and loss of a line of `metrics.jsonl` (NaN for a null loss), if it is one.
fn logged_loss(line: &str) -> Option<(u64, f64)> {
    let value = serde_json::from_str::<serde_json::Value>(line).ok()?;
    let step = value.get("step")?.as_u64()?;
    let loss = value
        .get("loss")
        .and_then(|l| l.as_f64())
        .unwrap_or(f64::NAN);
    Some((step, loss))
}

/// The step of a line of `metrics.jsonl`, if it is one.
fn logged_step(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

fn finite_or_null(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    #[test]
    fn reopening_drops_later_steps_and_a_partial_line() {
        let dir = test_dir("metrics_reopen");
        let path = dir.join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        for step in 1..=4 {
            let record = Record {
                step,
                loss: if step == 2 { f64::NAN } else { 1.0 },
                lr: 0.1,
                grad_norm: None,
                steps_per_s: 1.0,
                elapsed_s: 1.0,
                skipped: 0,
            };
            log.append(&record).unwrap();
        }
        drop(log);
        let mut text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().nth(1).unwrap().contains("\"loss\":null"));
        text.push_str("{\"step\": 5, \"lo");
        std::fs::write(&path, text).unwrap();
        MetricsLog::open(&path, 3).unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter_map(logged_step)
            .collect();
        assert_eq!(steps, [1, 2, 3]);
    }

    #[test]
    fn the_losses_of_kept_and_appended_lines_are_known() {
        let dir = test_dir("metrics_losses");
        let path = dir.join("metrics.jsonl");
        let record = |step, loss| Record {
            step,
            loss,
            lr: 0.1,
            grad_norm: None,
            steps_per_s: 1.0,
            elapsed_s: 1.0,
            skipped: 0,
        };
        let mut log = MetricsLog::open(&path, 0).unwrap();
        for (step, loss) in [(1, 4.0), (2, f64::NAN), (3, 2.0)] {
            log.append(&record(step, loss)).unwrap();
        }
        drop(log);
        // A resume from step 2 keeps lines 1 and 2, then appends 3 again.
        let mut log = MetricsLog::open(&path, 2).unwrap();
        log.append(&record(3, 1.5)).unwrap();
        let losses = log.losses();
        assert_eq!(losses.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((losses[0].1, losses[2].1), (4.0, 1.5));
        assert!(losses[1].1.is_nan());
    }
}
