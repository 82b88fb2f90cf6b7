//! The encoder's posterior p(x_{t−1}|x_t, x_0) = N(μ̃, σ̃_t² I).

use ndarray::Array2;

use crate::error::{check_shape, Result};
use crate::schedule::Schedule;

/// μ̃ = (ᾱ_{t−1} β_t² x_0 + α_t β̄_{t−1}² x_t)/β̄_t², 1 ≤ t ≤ T (at t = 1 it is x_0).
pub fn mean(
    schedule: &Schedule,
    x0: &Array2<f64>,
    xt: &Array2<f64>,
    t: usize,
) -> Result<Array2<f64>> {
    schedule.check_t(t, 1)?;
    check_shape("x_t against x0", x0.shape(), xt.shape())?;
    let bb2 = schedule.beta_bar(t)?.powi(2);
    let c0 = schedule.alpha_bar(t - 1)? * schedule.beta(t)?.powi(2) / bb2;
    let ct = schedule.alpha(t)? * schedule.beta_bar(t - 1)?.powi(2) / bb2;
    Ok(x0 * c0 + xt * ct)
}

/// σ̃_t = β̄_{t−1} β_t / β̄_t, 1 ≤ t ≤ T (σ̃_1 = 0).
pub fn std(schedule: &Schedule, t: usize) -> Result<f64> {
    schedule.check_t(t, 1)?;
    Ok(schedule.beta_bar(t - 1)? * schedule.beta(t)? / schedule.beta_bar(t)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RefError;
    use crate::marginal::standard_normal;
    use crate::schedule::ScheduleKind;
    use approx::assert_relative_eq;
    use ndarray::array;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn first_step_posterior_is_the_data() {
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        let x0 = array![[0.3, -0.9]];
        let xt = array![[5.0, 7.0]];
        assert_eq!(std(&s, 1).unwrap(), 0.0);
        let m = mean(&s, &x0, &xt, 1).unwrap();
        assert_relative_eq!(m[[0, 0]], 0.3, max_relative = 1e-14);
        assert_relative_eq!(m[[0, 1]], -0.9, max_relative = 1e-14);
    }

    #[test]
    fn posterior_matches_gaussian_conditioning() {
        // (x_{t−1}, x_t) | x_0 is jointly Gaussian: x_{t−1} ~ N(ᾱ_{t−1}x_0, β̄_{t−1}²),
        // x_t = α_t x_{t−1} + β_t ε; conditioning gives mean ᾱ_{t−1}x_0 + k (x_t − ᾱ_t x_0)
        // with k = α_t β̄_{t−1}²/β̄_t², and variance β̄_{t−1}² (1 − α_t k).
        let s = Schedule::new(ScheduleKind::Cosine, 20).unwrap();
        let x0 = array![[0.4, -1.1, 0.0]];
        let xt = array![[0.1, 2.0, -0.7]];
        for t in 2..=20 {
            let (a, ab_prev, ab, bb_prev, bb) = (
                s.alpha(t).unwrap(),
                s.alpha_bar(t - 1).unwrap(),
                s.alpha_bar(t).unwrap(),
                s.beta_bar(t - 1).unwrap(),
                s.beta_bar(t).unwrap(),
            );
            let k = a * bb_prev.powi(2) / bb.powi(2);
            let expected = &x0 * ab_prev + (&xt - &(&x0 * ab)) * k;
            let m = mean(&s, &x0, &xt, t).unwrap();
            for (u, v) in m.iter().zip(expected.iter()) {
                assert_relative_eq!(*u, *v, epsilon = 1e-13, max_relative = 1e-12);
            }
            assert_relative_eq!(
                std(&s, t).unwrap().powi(2),
                bb_prev.powi(2) * (1.0 - a * k),
                max_relative = 1e-9
            );
        }
    }

    #[test]
    fn forward_pairs_have_the_posterior_residual_variance() {
        // n = 20000 pairs (x_{t−1}, x_t) from the forward process: the residual x_{t−1} − μ̃
        // has variance σ̃_t²; the sample variance's relative standard error is sqrt(2/n) = 1%,
        // so 5% is a 5-standard-error tolerance (two-sided α ≈ 6e-7).
        let n = 20000;
        let s = Schedule::new(ScheduleKind::Article, 50).unwrap();
        let t = 10;
        let mut rng = StdRng::seed_from_u64(3);
        let x0 = Array2::from_elem((n, 1), -0.5);
        let x_prev = &x0 * s.alpha_bar(t - 1).unwrap()
            + standard_normal(n, 1, &mut rng) * s.beta_bar(t - 1).unwrap();
        let xt =
            &x_prev * s.alpha(t).unwrap() + standard_normal(n, 1, &mut rng) * s.beta(t).unwrap();
        let resid = x_prev - mean(&s, &x0, &xt, t).unwrap();
        let var = resid.mapv(|r| r * r).mean().unwrap();
        assert_relative_eq!(var, std(&s, t).unwrap().powi(2), max_relative = 0.05);
    }

    #[test]
    fn invalid_input_is_an_error() {
        let s = Schedule::new(ScheduleKind::Article, 5).unwrap();
        assert!(matches!(std(&s, 0), Err(RefError::TimeOutOfRange { .. })));
        assert!(matches!(std(&s, 6), Err(RefError::TimeOutOfRange { .. })));
        let err = mean(&s, &Array2::zeros((1, 2)), &Array2::zeros((1, 3)), 2).unwrap_err();
        assert!(matches!(err, RefError::ShapeMismatch { .. }));
    }
}
