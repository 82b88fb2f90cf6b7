//! The generator's standard deviation σ_t of q(x_{t−1}|x_t) = N(μ(x_t), σ_t² I).

use ndarray::Array1;

use crate::error::{check_std, Result};
use crate::schedule::Schedule;

/// Which σ_t the generator uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SigmaChoice {
    /// σ_t = σ̃_t = β̄_{t−1} β_t / β̄_t: optimal for Dirac data (σ_1 = 0).
    Posterior,
    /// σ_t = β_t: optimal for standard-normal data.
    Beta,
    /// Optimal for data N(m, s² I): σ_t² = v β_t²/(α_t² v + β_t²), v = ᾱ_{t−1}² s² + β̄_{t−1}².
    Isotropic {
        /// The data's per-dimension standard deviation s ≥ 0.
        data_std: f64,
    },
}

/// σ_t for 1 ≤ t ≤ T.
pub fn sigma(schedule: &Schedule, choice: SigmaChoice, t: usize) -> Result<f64> {
    schedule.check_t(t, 1)?;
    let (alpha, beta) = (schedule.alpha(t)?, schedule.beta(t)?);
    let (ab_prev, bb_prev) = (schedule.alpha_bar(t - 1)?, schedule.beta_bar(t - 1)?);
    match choice {
        SigmaChoice::Posterior => Ok(bb_prev * beta / schedule.beta_bar(t)?),
        SigmaChoice::Beta => Ok(beta),
        SigmaChoice::Isotropic { data_std } => {
            let s = check_std("data_std", data_std, false)?;
            let v = (ab_prev * s).powi(2) + bb_prev.powi(2);
            Ok((v * beta * beta / (alpha * alpha * v + beta * beta)).sqrt())
        }
    }
}

impl SigmaChoice {
    /// σ_t for t = 0..T (index 0 holds 0, never used by a sampler).
    pub fn table(self, schedule: &Schedule) -> Result<Array1<f64>> {
        std::iter::once(Ok(0.0))
            .chain((1..=schedule.t_max()).map(|t| sigma(schedule, self, t)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RefError;
    use crate::marginal::standard_normal;
    use crate::schedule::ScheduleKind;
    use approx::assert_relative_eq;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn isotropic_reduces_to_the_two_special_cases() {
        for kind in [
            ScheduleKind::Article,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = Schedule::new(kind, 40).unwrap();
            let dirac = SigmaChoice::Isotropic { data_std: 0.0 }.table(&s).unwrap();
            let posterior = SigmaChoice::Posterior.table(&s).unwrap();
            let normal = SigmaChoice::Isotropic { data_std: 1.0 }.table(&s).unwrap();
            let beta = SigmaChoice::Beta.table(&s).unwrap();
            for t in 0..=40 {
                assert_relative_eq!(
                    dirac[t],
                    posterior[t],
                    epsilon = 1e-15,
                    max_relative = 1e-12
                );
                assert_relative_eq!(normal[t], beta[t], epsilon = 1e-15, max_relative = 1e-12);
            }
            assert_eq!(posterior[1], 0.0);
            assert_eq!(beta[0], 0.0);
        }
    }

    #[test]
    fn isotropic_sigma_is_the_conditional_variance_of_gaussian_data() {
        // x_0 ~ N(m, s²): x_{t−1} ~ N(ᾱ_{t−1} m, v), x_t = α_t x_{t−1} + β_t ε, so
        // Var(x_{t−1}|x_t) is the residual variance of the linear regression of x_{t−1} on x_t.
        // n = 40000 pairs: relative standard error of a variance ≈ sqrt(2/n) = 0.7%; 4% is
        // about 5.6 standard errors (two-sided α < 1e-7).
        let n = 40000;
        let (m, data_std, t) = (0.3, 0.5, 3);
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        let mut rng = StdRng::seed_from_u64(11);
        let x0 = standard_normal(n, 1, &mut rng) * data_std + m;
        let x_prev = &x0 * s.alpha_bar(t - 1).unwrap()
            + standard_normal(n, 1, &mut rng) * s.beta_bar(t - 1).unwrap();
        let xt =
            &x_prev * s.alpha(t).unwrap() + standard_normal(n, 1, &mut rng) * s.beta(t).unwrap();
        let (a, b) = (x_prev.column(0), xt.column(0));
        let (ma, mb) = (a.mean().unwrap(), b.mean().unwrap());
        let cov = ((&a - ma) * (&b - mb)).mean().unwrap();
        let (va, vb) = (
            a.mapv(|x| (x - ma).powi(2)).mean().unwrap(),
            b.mapv(|x| (x - mb).powi(2)).mean().unwrap(),
        );
        let resid = va - cov * cov / vb;
        let sig = sigma(&s, SigmaChoice::Isotropic { data_std }, t).unwrap();
        assert_relative_eq!(resid, sig * sig, max_relative = 0.04);
    }

    #[test]
    fn invalid_input_is_an_error() {
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        assert!(matches!(
            sigma(&s, SigmaChoice::Beta, 0),
            Err(RefError::TimeOutOfRange { .. })
        ));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err = sigma(&s, SigmaChoice::Isotropic { data_std: bad }, 2).unwrap_err();
            assert!(
                matches!(
                    err,
                    RefError::InvalidStd {
                        what: "data_std",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
}
