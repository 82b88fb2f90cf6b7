//! The marginal of the encoder, eq. (9): p(x_t|x_0) = N(ᾱ_t x_0, β̄_t² I).

use ndarray::{Array1, Array2, Axis};
use ndarray_rand::RandomExt;
use rand::Rng;
use rand_distr::StandardNormal;
use std::f64::consts::TAU;

use crate::error::{check_shape, Result};
use crate::schedule::Schedule;

/// ε ~ N(0, I) of shape [n, d].
pub fn standard_normal<R: Rng + ?Sized>(n: usize, d: usize, rng: &mut R) -> Array2<f64> {
    Array2::random_using((n, d), StandardNormal, rng)
}

/// Mean ᾱ_t x_0 of p(x_t|x_0), 0 ≤ t ≤ T.
pub fn mean(schedule: &Schedule, x0: &Array2<f64>, t: usize) -> Result<Array2<f64>> {
    Ok(x0 * schedule.alpha_bar(t)?)
}

/// Standard deviation β̄_t of p(x_t|x_0), 0 ≤ t ≤ T.
pub fn std(schedule: &Schedule, t: usize) -> Result<f64> {
    schedule.beta_bar(t)
}

/// x_t = ᾱ_t x_0 + β̄_t ε for the given noise ε (same shape as x_0).
pub fn marginal_sample(
    schedule: &Schedule,
    x0: &Array2<f64>,
    t: usize,
    eps: &Array2<f64>,
) -> Result<Array2<f64>> {
    check_shape("noise eps against x0", x0.shape(), eps.shape())?;
    Ok(mean(schedule, x0, t)? + eps * std(schedule, t)?)
}

/// Draws ε ~ N(0, I) and returns (x_t, ε) with x_t = ᾱ_t x_0 + β̄_t ε.
pub fn sample<R: Rng + ?Sized>(
    schedule: &Schedule,
    x0: &Array2<f64>,
    t: usize,
    rng: &mut R,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let eps = standard_normal(x0.nrows(), x0.ncols(), rng);
    Ok((marginal_sample(schedule, x0, t, &eps)?, eps))
}

/// ln N(x_t; ᾱ_t x_0, β̄_t² I) for each row, 1 ≤ t ≤ T (β̄_0 = 0 has no density).
pub fn log_density(
    schedule: &Schedule,
    x0: &Array2<f64>,
    t: usize,
    xt: &Array2<f64>,
) -> Result<Array1<f64>> {
    schedule.check_t(t, 1)?;
    check_shape("x_t against x0", x0.shape(), xt.shape())?;
    let var = schedule.beta_bar(t)?.powi(2);
    let sq = (xt - &mean(schedule, x0, t)?)
        .mapv(|r| r * r)
        .sum_axis(Axis(1));
    let d = x0.ncols() as f64;
    Ok(sq.mapv(|s| -0.5 * (s / var + d * (TAU * var).ln())))
}

/// x̂_0 = (x_t − β̄_t ε̂)/ᾱ_t, 0 ≤ t ≤ T.
pub fn predicted_x0(
    schedule: &Schedule,
    xt: &Array2<f64>,
    t: usize,
    eps_hat: &Array2<f64>,
) -> Result<Array2<f64>> {
    check_shape("predicted noise against x_t", xt.shape(), eps_hat.shape())?;
    Ok((xt - &(eps_hat * schedule.beta_bar(t)?)) / schedule.alpha_bar(t)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RefError;
    use crate::schedule::ScheduleKind;
    use approx::assert_relative_eq;
    use ndarray::array;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use statrs::distribution::{ContinuousCDF, Normal};

    #[test]
    fn sample_with_noise_is_the_affine_map() {
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        let x0 = array![[1.0, -2.0]];
        let eps = array![[0.5, 0.25]];
        let xt = marginal_sample(&s, &x0, 4, &eps).unwrap();
        let (ab, bb) = (s.alpha_bar(4).unwrap(), s.beta_bar(4).unwrap());
        assert_relative_eq!(xt[[0, 0]], ab + 0.5 * bb, max_relative = 1e-15);
        assert_relative_eq!(xt[[0, 1]], -2.0 * ab + 0.25 * bb, max_relative = 1e-15);
        // t = 0 is the data itself.
        assert_eq!(marginal_sample(&s, &x0, 0, &eps).unwrap(), x0);
    }

    #[test]
    fn log_density_matches_a_hand_computed_gaussian() {
        let s = Schedule::from_alphas(&[0.6]).unwrap(); // ᾱ_1 = 0.6, β̄_1 = 0.8
        let x0 = array![[1.0]];
        let xt = array![[0.6 + 0.8 * 1.5]]; // standardised residual 1.5
        let expected = -0.5 * 1.5f64.powi(2) - (0.8f64).ln() - 0.5 * TAU.ln();
        assert_relative_eq!(
            log_density(&s, &x0, 1, &xt).unwrap()[0],
            expected,
            max_relative = 1e-14
        );
        assert!(matches!(
            log_density(&s, &x0, 0, &xt),
            Err(RefError::TimeOutOfRange { .. })
        ));
    }

    #[test]
    fn mismatched_noise_is_an_error() {
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        let err =
            marginal_sample(&s, &Array2::zeros((2, 3)), 1, &Array2::zeros((3, 2))).unwrap_err();
        assert!(matches!(err, RefError::ShapeMismatch { .. }), "{err}");
    }

    #[test]
    fn marginal_samples_pass_a_ks_test_against_the_exact_normal() {
        // One-sample Kolmogorov–Smirnov test at significance α = 0.001 on n = 4000 draws of
        // x_t (t = 300 of the article's T = 1000) from x_0 = 0.7: reject if D > c(α)/sqrt(n),
        // c(α) = sqrt(−ln(α/2)/2) ≈ 1.9495 (asymptotic Kolmogorov distribution).
        let n = 4000;
        let s = Schedule::new(ScheduleKind::Article, 1000).unwrap();
        let mut rng = StdRng::seed_from_u64(17);
        let x0 = Array2::from_elem((n, 1), 0.7);
        let (xt, _) = sample(&s, &x0, 300, &mut rng).unwrap();
        let law = Normal::new(0.7 * s.alpha_bar(300).unwrap(), s.beta_bar(300).unwrap()).unwrap();
        let mut xs = xt.column(0).to_vec();
        xs.sort_by(f64::total_cmp);
        let d = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = law.cdf(x);
                (f - i as f64 / n as f64).max((i + 1) as f64 / n as f64 - f)
            })
            .fold(0.0, f64::max);
        let critical = (-(0.001f64 / 2.0).ln() / 2.0).sqrt() / (n as f64).sqrt();
        assert!(d < critical, "KS statistic {d} exceeds {critical}");
    }
}
