//! The generator's standard deviations σ_t, as a table of length T+1 (σ_0 = 0).

use crate::error::{DdpmError, Result};
use crate::schedule::Schedule;
use tch::Tensor;

/// Which σ_t the generator q(x_{t−1}|x_t) = N(μ(x_t), σ_t² I) uses.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum SigmaChoice {
    /// σ_t = β̄_{t−1} β_t/β̄_t, optimal for Dirac data (σ_1 = 0).
    Posterior,
    /// σ_t = β_t, optimal for standard-normal data.
    #[default]
    Beta,
    /// Optimal for isotropic Gaussian data N(m, s² I): σ_t² = v β_t²/(α_t² v + β_t²),
    /// v = ᾱ_{t−1}² s² + β̄_{t−1}².
    Isotropic {
        /// s, the per-dimension standard deviation of the data.
        data_std: f64,
    },
}

impl SigmaChoice {
    /// σ_t for t = 0..T as an f64 tensor on the schedule's device; σ_0 = 0.
    pub fn table(&self, schedule: &Schedule) -> Result<Tensor> {
        let n = schedule.t_max();
        let b = schedule.betas().narrow(0, 1, n);
        let bb_prev = schedule.beta_bars().narrow(0, 0, n);
        let rest = match *self {
            SigmaChoice::Posterior => bb_prev * &b / schedule.beta_bars().narrow(0, 1, n),
            SigmaChoice::Beta => b,
            SigmaChoice::Isotropic { data_std } => {
                if !(data_std.is_finite() && data_std >= 0.0) {
                    return Err(DdpmError::OutOfRange {
                        key: "data_std",
                        value: data_std.to_string(),
                        expected: "finite and non-negative (the data's standard deviation)".into(),
                    });
                }
                let v = schedule.alpha_bars().narrow(0, 0, n).square() * (data_std * data_std)
                    + bb_prev.square();
                let b2 = b.square();
                let a2 = schedule.alphas().narrow(0, 1, n).square();
                (&v * &b2 / (a2 * &v + &b2)).sqrt()
            }
        };
        Ok(Tensor::cat(&[&rest.zeros_like().narrow(0, 0, 1), &rest], 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;
    use tch::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    #[test]
    fn isotropic_reduces_to_posterior_and_beta() {
        let s = Schedule::new(ScheduleKind::Linear, 200, Device::Cpu).unwrap();
        let iso0 = SigmaChoice::Isotropic { data_std: 0.0 }.table(&s).unwrap();
        let iso1 = SigmaChoice::Isotropic { data_std: 1.0 }.table(&s).unwrap();
        assert!(max_abs_diff(&iso0, &SigmaChoice::Posterior.table(&s).unwrap()) < 1e-12);
        assert!(max_abs_diff(&iso1, &SigmaChoice::Beta.table(&s).unwrap()) < 1e-12);
        assert_eq!(iso0.size(), vec![201]);
        assert_eq!(iso0.double_value(&[0]), 0.0);
        assert!(matches!(
            SigmaChoice::Isotropic { data_std: -1.0 }.table(&s),
            Err(DdpmError::OutOfRange {
                key: "data_std",
                ..
            })
        ));
    }
}
