//! Training losses: the Euclidean noise-prediction loss, loss (8) (weighted and not), the
//! Min-SNR-γ weighting, the Monte Carlo loss (7), and the θ-independent constant separating
//! (7) from (8).

use ndarray::Array2;
use rand::Rng;

use crate::error::{check_shape, check_std, RefError, Result};
use crate::marginal::{marginal_sample, standard_normal};
use crate::schedule::Schedule;

/// mean over the batch of Σ_dims (ε − ε̂)²: Euclidean per sample, never a per-pixel mean.
pub fn euclidean_loss(eps: &Array2<f64>, eps_hat: &Array2<f64>) -> Result<f64> {
    check_shape(
        "predicted noise against noise",
        eps.shape(),
        eps_hat.shape(),
    )?;
    Ok((eps - eps_hat).mapv(|r| r * r).sum() / eps.nrows() as f64)
}

/// Weight of loss (8) on the unweighted loss: w_t = β_t⁴/(β̄_t² α_t² σ_t²), 1 ≤ t ≤ T, σ_t > 0.
pub fn loss_weight(schedule: &Schedule, t: usize, sigma_t: f64) -> Result<f64> {
    schedule.check_t(t, 1)?;
    let sigma_t = check_std("sigma_t", sigma_t, true)?;
    let (a, b, bb) = (schedule.alpha(t)?, schedule.beta(t)?, schedule.beta_bar(t)?);
    Ok(b.powi(4) / (bb * bb * a * a * sigma_t * sigma_t))
}

/// The signal-to-noise ratio of x_t = ᾱ_t x_0 + β̄_t ε: SNR_t = ᾱ_t²/β̄_t², 1 ≤ t ≤ T.
pub fn snr(schedule: &Schedule, t: usize) -> Result<f64> {
    schedule.check_t(t, 1)?;
    let (ab, bb) = (schedule.alpha_bar(t)?, schedule.beta_bar(t)?);
    Ok(ab * ab / (bb * bb))
}

/// Min-SNR-γ weight on the unweighted loss (Hang et al. 2023): w_t = min(SNR_t, γ)/SNR_t,
/// 1 ≤ t ≤ T, γ > 0 finite. Computed as min(1, γ β̄_t²/ᾱ_t²), the same number for SNR_t > 0
/// that stays 1 (its limit) where ᾱ_t underflows to 0.
pub fn min_snr_weight(schedule: &Schedule, t: usize, gamma: f64) -> Result<f64> {
    schedule.check_t(t, 1)?;
    check_gamma(gamma)?;
    let (ab, bb) = (schedule.alpha_bar(t)?, schedule.beta_bar(t)?);
    Ok((gamma * (bb * bb) / (ab * ab)).min(1.0))
}

/// γ of Min-SNR-γ must be positive and finite.
fn check_gamma(gamma: f64) -> Result<f64> {
    if gamma.is_finite() && gamma > 0.0 {
        Ok(gamma)
    } else {
        Err(RefError::InvalidParameter {
            name: "gamma",
            value: gamma,
            reason: "Min-SNR-γ needs a finite γ > 0",
        })
    }
}

/// Runs the predictor on x_t and checks that ε̂ has the shape of x_t.
fn predict<F>(predictor: F, xt: &Array2<f64>, t: usize) -> Result<Array2<f64>>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    let eps_hat = predictor(xt, t);
    check_shape("predictor output against x_t", xt.shape(), eps_hat.shape())?;
    Ok(eps_hat)
}

/// Unweighted loss (8): mean_batch ‖ε − ε̂(ᾱ_t x_0 + β̄_t ε, t)‖² for the given ε, 1 ≤ t ≤ T.
pub fn loss8<F>(
    schedule: &Schedule,
    x0: &Array2<f64>,
    eps: &Array2<f64>,
    t: usize,
    predictor: F,
) -> Result<f64>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    schedule.check_t(t, 1)?;
    let xt = marginal_sample(schedule, x0, t, eps)?;
    euclidean_loss(eps, &predict(predictor, &xt, t)?)
}

/// Loss (8) with its weight: w_t · mean_batch ‖ε − ε̂(ᾱ_t x_0 + β̄_t ε, t)‖².
pub fn weighted_loss<F>(
    schedule: &Schedule,
    x0: &Array2<f64>,
    eps: &Array2<f64>,
    t: usize,
    sigma_t: f64,
    predictor: F,
) -> Result<f64>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    Ok(loss_weight(schedule, t, sigma_t)? * loss8(schedule, x0, eps, t, predictor)?)
}

/// The Min-SNR-γ loss: min(SNR_t, γ)/SNR_t · mean_batch ‖ε − ε̂(ᾱ_t x_0 + β̄_t ε, t)‖², which is
/// min(SNR_t, γ) · mean_batch ‖x_0 − x̂_0‖² (docs/derivations.md, section 12).
pub fn min_snr_loss<F>(
    schedule: &Schedule,
    x0: &Array2<f64>,
    eps: &Array2<f64>,
    t: usize,
    gamma: f64,
    predictor: F,
) -> Result<f64>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    Ok(min_snr_weight(schedule, t, gamma)? * loss8(schedule, x0, eps, t, predictor)?)
}

/// Loss (7) for given noises: β_t²/(α_t² σ_t²) · mean_batch ‖ε_t − (β_t/β̄_t) ε̂(x_t, t)‖²,
/// x_t = ᾱ_t x_0 + α_t β̄_{t−1} ε̄_{t−1} + β_t ε_t, 1 ≤ t ≤ T, σ_t > 0.
pub fn loss7_with_noise<F>(
    schedule: &Schedule,
    x0: &Array2<f64>,
    eps_bar_prev: &Array2<f64>,
    eps_t: &Array2<f64>,
    t: usize,
    sigma_t: f64,
    predictor: F,
) -> Result<f64>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    schedule.check_t(t, 1)?;
    let sigma_t = check_std("sigma_t", sigma_t, true)?;
    check_shape(
        "noise eps_bar_prev against x0",
        x0.shape(),
        eps_bar_prev.shape(),
    )?;
    check_shape("noise eps_t against x0", x0.shape(), eps_t.shape())?;
    let (a, b, bb, bb_prev) = (
        schedule.alpha(t)?,
        schedule.beta(t)?,
        schedule.beta_bar(t)?,
        schedule.beta_bar(t - 1)?,
    );
    let xt = x0 * schedule.alpha_bar(t)? + eps_bar_prev * (a * bb_prev) + eps_t * b;
    let eps_theta = predict(predictor, &xt, t)? * (b / bb);
    Ok(b * b / (a * a * sigma_t * sigma_t) * euclidean_loss(eps_t, &eps_theta)?)
}

/// Loss (7) with ε̄_{t−1}, ε_t ~ N(0, I) drawn once per row of x_0 (repeat rows for more draws).
pub fn loss7_monte_carlo<F, R>(
    schedule: &Schedule,
    x0: &Array2<f64>,
    t: usize,
    sigma_t: f64,
    predictor: F,
    rng: &mut R,
) -> Result<f64>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
    R: Rng + ?Sized,
{
    let (n, d) = x0.dim();
    let eps_bar_prev = standard_normal(n, d, rng);
    let eps_t = standard_normal(n, d, rng);
    loss7_with_noise(schedule, x0, &eps_bar_prev, &eps_t, t, sigma_t, predictor)
}

/// E(7) − E(8) = d·β_t² β̄_{t−1}²/(σ_t² β̄_t²), independent of the predictor.
pub fn loss7_minus_loss8(schedule: &Schedule, t: usize, sigma_t: f64, dim: usize) -> Result<f64> {
    schedule.check_t(t, 1)?;
    let sigma_t = check_std("sigma_t", sigma_t, true)?;
    let (b, bb, bb_prev) = (
        schedule.beta(t)?,
        schedule.beta_bar(t)?,
        schedule.beta_bar(t - 1)?,
    );
    Ok(dim as f64 * b * b * bb_prev * bb_prev / (sigma_t * sigma_t * bb * bb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RefError;
    use crate::schedule::ScheduleKind;
    use crate::sigma::{sigma, SigmaChoice};
    use approx::assert_relative_eq;
    use ndarray::array;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn euclidean_sums_dimensions_and_averages_samples() {
        let eps = array![[1.0, 2.0], [0.0, 0.0]];
        let eps_hat = array![[0.0, 0.0], [3.0, 0.0]];
        // (1 + 4 + 9)/2: a per-pixel mean would give 14/4.
        assert_eq!(euclidean_loss(&eps, &eps_hat).unwrap(), 7.0);
    }

    #[test]
    fn zero_predictor_loss_is_the_noise_energy_and_weight_is_exact() {
        let s = Schedule::from_alphas(&[0.8, 0.6]).unwrap();
        let x0 = array![[0.5, -0.5]];
        let eps = array![[1.0, -2.0]];
        let zero = |x: &Array2<f64>, _t: usize| Array2::zeros(x.raw_dim());
        assert_eq!(loss8(&s, &x0, &eps, 2, zero).unwrap(), 5.0);
        // t = 2: α = 0.6, β = 0.8, ᾱ = 0.48, β̄² = 1 − 0.2304; σ = 0.5.
        let w = 0.8f64.powi(4) / ((1.0 - 0.2304) * 0.36 * 0.25);
        assert_relative_eq!(loss_weight(&s, 2, 0.5).unwrap(), w, max_relative = 1e-14);
        assert_relative_eq!(
            weighted_loss(&s, &x0, &eps, 2, 0.5, zero).unwrap(),
            5.0 * w,
            max_relative = 1e-14
        );
    }

    #[test]
    fn loss7_minus_loss8_is_the_stated_constant() {
        // K = 20 independent batches of n = 2000 rows (d = 3) with a nonlinear predictor; each
        // batch gives (7) − (8) on shared noise (ε = (α_t β̄_{t−1} ε̄ + β_t ε_t)/β̄_t, the same
        // x_t). The batch means' mean must be within 5 standard errors of the constant
        // (Student t, 19 degrees of freedom: two-sided α ≈ 8e-5).
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        let t = 30;
        let sig = sigma(&s, SigmaChoice::Beta, t).unwrap();
        let (a, b, bb, bb_prev) = (
            s.alpha(t).unwrap(),
            s.beta(t).unwrap(),
            s.beta_bar(t).unwrap(),
            s.beta_bar(t - 1).unwrap(),
        );
        let predictor = |x: &Array2<f64>, _t: usize| x.mapv(|v| 0.7 * v.sin() + 0.2);
        let mut rng = StdRng::seed_from_u64(5);
        let (k, n, d) = (20, 2000, 3);
        let diffs: Vec<f64> = (0..k)
            .map(|_| {
                let x0 = standard_normal(n, d, &mut rng) * 0.5 + 0.25;
                let eps_bar_prev = standard_normal(n, d, &mut rng);
                let eps_t = standard_normal(n, d, &mut rng);
                let eps = (&eps_bar_prev * (a * bb_prev) + &eps_t * b) / bb;
                loss7_with_noise(&s, &x0, &eps_bar_prev, &eps_t, t, sig, predictor).unwrap()
                    - weighted_loss(&s, &x0, &eps, t, sig, predictor).unwrap()
            })
            .collect();
        let mean = diffs.iter().sum::<f64>() / k as f64;
        let sd = (diffs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1) as f64).sqrt();
        let expected = loss7_minus_loss8(&s, t, sig, d).unwrap();
        assert!(
            (mean - expected).abs() < 5.0 * sd / (k as f64).sqrt(),
            "{mean} vs {expected} (sd {sd})"
        );
        // With σ_t = β_t the constant is d β̄_{t−1}²/β̄_t².
        assert_relative_eq!(
            expected,
            d as f64 * bb_prev * bb_prev / (bb * bb),
            max_relative = 1e-14
        );
    }

    #[test]
    fn monte_carlo_loss7_of_a_perfect_dirac_predictor_is_the_constant() {
        // For Dirac data the oracle makes (8) vanish, so E(7) is the constant itself; n = 50000
        // draws, per-row values are β²/(α²σ²)·‖ω‖² with ω ~ N(0, (α β̄_{t−1}/β̄_t)² I), so the
        // relative standard error is sqrt(2/(n d)) ≈ 0.45%: 2.5% is > 5 standard errors.
        let s = Schedule::new(ScheduleKind::Linear, 50).unwrap();
        let t = 20;
        let c = 0.3;
        let (ab, bb) = (s.alpha_bar(t).unwrap(), s.beta_bar(t).unwrap());
        let oracle = move |x: &Array2<f64>, _t: usize| (x - ab * c) / bb;
        let x0 = Array2::from_elem((50000, 2), c);
        let sig = sigma(&s, SigmaChoice::Posterior, t).unwrap();
        let mut rng = StdRng::seed_from_u64(8);
        let l7 = loss7_monte_carlo(&s, &x0, t, sig, oracle, &mut rng).unwrap();
        assert_relative_eq!(
            l7,
            loss7_minus_loss8(&s, t, sig, 2).unwrap(),
            max_relative = 0.025
        );
    }

    #[test]
    fn min_snr_weight_is_exact_on_a_hand_schedule() {
        // α = (0.8, 0.6): t = 1: ᾱ² = 0.64, β̄² = 0.36, SNR = 16/9; t = 2: ᾱ² = 0.2304,
        // β̄² = 0.7696, SNR = 0.2304/0.7696.
        let s = Schedule::from_alphas(&[0.8, 0.6]).unwrap();
        assert_relative_eq!(snr(&s, 1).unwrap(), 0.64 / 0.36, max_relative = 1e-14);
        assert_relative_eq!(snr(&s, 2).unwrap(), 0.2304 / 0.7696, max_relative = 1e-14);
        // γ = 1: SNR_1 > γ, so w_1 = γ/SNR_1 = 0.5625; SNR_2 < γ, so w_2 = 1 exactly.
        assert_relative_eq!(
            min_snr_weight(&s, 1, 1.0).unwrap(),
            0.36 / 0.64,
            max_relative = 1e-14
        );
        assert_eq!(min_snr_weight(&s, 2, 1.0).unwrap(), 1.0);
        // γ at or above every SNR: no sample is down-weighted.
        assert_eq!(min_snr_weight(&s, 1, 16.0 / 9.0 + 1e-9).unwrap(), 1.0);
        let x0 = array![[0.5, -0.5]];
        let eps = array![[1.0, -2.0]];
        let zero = |x: &Array2<f64>, _t: usize| Array2::zeros(x.raw_dim());
        assert_relative_eq!(
            min_snr_loss(&s, &x0, &eps, 1, 1.0, zero).unwrap(),
            5.0 * 0.5625,
            max_relative = 1e-14
        );
    }

    #[test]
    fn min_snr_weight_lies_in_0_1_and_follows_its_definition() {
        for kind in [
            ScheduleKind::Article,
            ScheduleKind::Cosine,
            ScheduleKind::Linear,
        ] {
            let s = Schedule::new(kind, 1000).unwrap();
            for gamma in [0.5, 1.0, 5.0, 20.0] {
                for t in [1, 2, 10, 100, 500, 999, 1000] {
                    let (w, r) = (min_snr_weight(&s, t, gamma).unwrap(), snr(&s, t).unwrap());
                    assert!(
                        w > 0.0 && w <= 1.0,
                        "{kind:?}, t = {t}, γ = {gamma}: w = {w}"
                    );
                    assert_relative_eq!(w, r.min(gamma) / r, max_relative = 1e-13);
                }
            }
        }
    }

    #[test]
    fn invalid_input_is_an_error() {
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        let x0 = Array2::zeros((2, 2));
        let id = |x: &Array2<f64>, _t: usize| x.clone();
        let bad_shape = |_x: &Array2<f64>, _t: usize| Array2::zeros((1, 1));
        assert!(matches!(
            loss_weight(&s, 1, 0.0),
            Err(RefError::InvalidStd { .. })
        ));
        assert!(matches!(
            loss8(&s, &x0, &x0, 0, id),
            Err(RefError::TimeOutOfRange { .. })
        ));
        assert!(matches!(
            loss8(&s, &x0, &x0, 1, bad_shape),
            Err(RefError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            loss8(&s, &x0, &Array2::zeros((2, 3)), 1, id),
            Err(RefError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            loss7_minus_loss8(&s, 3, f64::NAN, 2),
            Err(RefError::InvalidStd { .. })
        ));
        for gamma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                min_snr_weight(&s, 3, gamma),
                Err(RefError::InvalidParameter { name: "gamma", .. })
            ));
        }
        assert!(matches!(
            min_snr_weight(&s, 0, 5.0),
            Err(RefError::TimeOutOfRange { .. })
        ));
        assert!(matches!(snr(&s, 11), Err(RefError::TimeOutOfRange { .. })));
    }
}
