//! Learning-rate schedule: linear warm-up, then piecewise-linear decay through given points.

use crate::error::{DdpmError, Result};

/// lr(k) = base · f(k) for update k = 1, 2, …, where f is piecewise linear through (0, 0),
/// (warmup, 1) and the decay points (s_i, f_i), and constant after the last point (with no
/// warm-up, f starts at (0, 1)). This is bert4keras's `piecewise_linear`, which the article's
/// code uses, with the warm-up written out.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    base: f64,
    knots: Vec<(u64, f64)>,
}

impl LrSchedule {
    /// Base rate `base`, `warmup` updates of linear warm-up, then the decay points
    /// `(step, factor)`, steps strictly increasing and beyond `warmup`, factors ≥ 0.
    pub fn new(base: f64, warmup: u64, decay: &[(u64, f64)]) -> Result<LrSchedule> {
        if !(base.is_finite() && base > 0.0) {
            return Err(DdpmError::OutOfRange {
                key: "base",
                value: base.to_string(),
                expected: "positive and finite (the learning rate)".into(),
            });
        }
        let mut knots = if warmup > 0 {
            vec![(0, 0.0), (warmup, 1.0)]
        } else {
            vec![(0, 1.0)]
        };
        for &(step, factor) in decay {
            let last = knots[knots.len() - 1].0;
            if step <= last {
                return Err(DdpmError::OutOfRange {
                    key: "decay",
                    value: format!("a point at step {step}"),
                    expected: format!(
                        "after step {last}: learning-rate points come after the warm-up and each other"
                    ),
                });
            }
            if !(factor.is_finite() && factor >= 0.0) {
                return Err(DdpmError::OutOfRange {
                    key: "decay",
                    value: format!("factor {factor} at step {step}"),
                    expected: "finite and non-negative (a learning-rate factor)".into(),
                });
            }
            knots.push((step, factor));
        }
        Ok(LrSchedule { base, knots })
    }

    /// A constant rate.
    pub fn constant(base: f64) -> Result<LrSchedule> {
        LrSchedule::new(base, 0, &[])
    }

    /// The base rate.
    pub fn base(&self) -> f64 {
        self.base
    }

    /// f(k), the factor applied at update k.
    pub fn factor(&self, step: u64) -> f64 {
        let next = self.knots.iter().position(|&(s, _)| s > step);
        match next {
            None => self.knots[self.knots.len() - 1].1,
            Some(i) => {
                // knots[0].0 == 0 ≤ step, so a later knot is never the first.
                let (s0, f0) = self.knots[i - 1];
                let (s1, f1) = self.knots[i];
                f0 + (f1 - f0) * (step - s0) as f64 / (s1 - s0) as f64
            }
        }
    }

    /// lr(k) = base · f(k).
    pub fn lr(&self, step: u64) -> f64 {
        self.base * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_through_its_points() {
        let s = LrSchedule::new(1e-3, 100, &[(1000, 0.5), (2000, 0.1)]).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert!(close(s.factor(0), 0.0));
        assert!(close(s.factor(1), 0.01));
        assert!(close(s.factor(50), 0.5));
        assert!(close(s.factor(100), 1.0));
        assert!(close(s.factor(550), 0.75));
        assert!(close(s.factor(1000), 0.5));
        assert!(close(s.factor(1500), 0.3));
        assert!(close(s.factor(2000), 0.1));
        assert!(close(s.factor(10_000), 0.1));
        assert!(close(s.lr(100), 1e-3));
    }

    #[test]
    fn no_warmup_starts_at_full_rate() {
        let s = LrSchedule::new(2.0, 0, &[(10, 0.0)]).unwrap();
        assert_eq!((s.lr(0), s.lr(5), s.lr(10), s.lr(11)), (2.0, 1.0, 0.0, 0.0));
        assert_eq!(LrSchedule::constant(0.5).unwrap().lr(123), 0.5);
    }

    #[test]
    fn rejects_bad_points() {
        for bad in [
            LrSchedule::new(1e-3, 100, &[(100, 0.5)]),
            LrSchedule::new(1e-3, 0, &[(10, 0.5), (5, 0.1)]),
            LrSchedule::new(1e-3, 0, &[(10, -0.5)]),
        ] {
            assert!(matches!(
                bad,
                Err(DdpmError::OutOfRange { key: "decay", .. })
            ));
        }
        assert!(matches!(
            LrSchedule::new(0.0, 0, &[]),
            Err(DdpmError::OutOfRange { key: "base", .. })
        ));
    }
}
