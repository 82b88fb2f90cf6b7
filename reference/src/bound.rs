//! The variational bound: Gaussian KL terms L_T and L_{t−1}, the discretised-Gaussian decoder
//! L_0 over 256 bins, and the negative ELBO of one x_0 with its per-term breakdown.

use ndarray::{Array1, Array2, Axis};
use rand::Rng;
use std::f64::consts::{LN_2, SQRT_2, TAU};

use crate::error::{check_shape, check_std, RefError, Result};
use crate::marginal::standard_normal;
use crate::posterior;
use crate::sampler::ancestral_step;
use crate::schedule::Schedule;
use crate::sigma::{sigma, SigmaChoice};

/// Number of 8-bit levels the decoder discretises into.
pub const LEVELS: usize = 256;
/// Half-width 1/255 of a decoder bin on the grid 2k/255 − 1.
const HALF_BIN: f64 = 1.0 / 255.0;
/// Largest distance from the grid still accepted as "on the grid" (f64 rounding of 2k/255 − 1).
const GRID_TOLERANCE: f64 = 1e-9;
/// Above this z, ln Q(z) uses the asymptotic series: 0.5·erfc(z/√2) would near f64 underflow
/// (it is ~1e-198 here, subnormal beyond z ≈ 37.5).
const TAIL_SWITCH: f64 = 30.0;
/// Terms of the asymptotic series Σ (−1)^k (2k−1)!!/z^{2k}; at z ≥ 30 the first omitted
/// term is below 1e-19 relative.
const TAIL_TERMS: i32 = 9;

/// KL(N(m1, s1² I) ‖ N(m2, s2² I)) = Σ_dims [ln(s2/s1) + (s1² + (m1−m2)²)/(2 s2²) − ½], per row.
pub fn kl_isotropic(m1: &Array2<f64>, s1: f64, m2: &Array2<f64>, s2: f64) -> Result<Array1<f64>> {
    check_shape("second mean against first", m1.shape(), m2.shape())?;
    let s1 = check_std("first std", s1, true)?;
    let s2 = check_std("second std", s2, true)?;
    let d = m1.ncols() as f64;
    let sq = (m1 - m2).mapv(|r| r * r).sum_axis(Axis(1));
    let per_dim_const = (s2 / s1).ln() + s1 * s1 / (2.0 * s2 * s2) - 0.5;
    Ok(sq.mapv(|s| d * per_dim_const + s / (2.0 * s2 * s2)))
}

/// L_T = KL(N(ᾱ_T x_0, β̄_T² I) ‖ N(0, I)), per row of x_0.
pub fn prior_kl(schedule: &Schedule, x0: &Array2<f64>) -> Result<Array1<f64>> {
    let t = schedule.t_max();
    let mean = x0 * schedule.alpha_bar(t)?;
    kl_isotropic(
        &mean,
        schedule.beta_bar(t)?,
        &Array2::zeros(x0.raw_dim()),
        1.0,
    )
}

/// L_{t−1} = KL(N(μ̃(x_t, x_0), σ̃_t² I) ‖ N(μ(x_t), σ_t² I)), μ(x_t) = (x_t − (β_t²/β̄_t) ε̂)/α_t,
/// per row, 2 ≤ t ≤ T.
pub fn posterior_kl(
    schedule: &Schedule,
    x0: &Array2<f64>,
    xt: &Array2<f64>,
    t: usize,
    eps_hat: &Array2<f64>,
    sigma_t: f64,
) -> Result<Array1<f64>> {
    schedule.check_t(t, 2)?;
    let target = posterior::mean(schedule, x0, xt, t)?;
    let model = ancestral_step(schedule, xt, t, eps_hat, 0.0, &Array2::zeros(xt.raw_dim()))?;
    kl_isotropic(&target, posterior::std(schedule, t)?, &model, sigma_t)
}

/// Decoder std: σ_1 of the choice, or β_1 where σ_1 = 0 (posterior, or isotropic with s = 0).
pub fn decoder_std(schedule: &Schedule, choice: SigmaChoice) -> Result<f64> {
    let s1 = sigma(schedule, choice, 1)?;
    if s1 > 0.0 {
        Ok(s1)
    } else {
        schedule.beta(1)
    }
}

/// ln P(bin k) for k = 0..255 under N(mean, std²): bin k is [x_k − 1/255, x_k + 1/255],
/// x_k = 2k/255 − 1, with the outer bins extended to ±∞, so the 256 probabilities sum to 1.
pub fn decoder_log_probs(mean: f64, std: f64) -> Result<Array1<f64>> {
    check_finite_mean(mean)?;
    let std = check_std("decoder std", std, true)?;
    Ok(Array1::from_iter(
        (0..LEVELS).map(|k| log_bin_probability(k, mean, std)),
    ))
}

/// L_0 = −Σ_dims ln P(bin of x_0 | N(mean, std²)), per row; x_0 must lie on the grid 2k/255 − 1.
pub fn decoder_nll(x0: &Array2<f64>, mean: &Array2<f64>, std: f64) -> Result<Array1<f64>> {
    check_shape("decoder mean against x0", x0.shape(), mean.shape())?;
    let std = check_std("decoder std", std, true)?;
    mean.iter().try_for_each(|&m| check_finite_mean(m))?;
    let nll = x0
        .iter()
        .zip(mean.iter())
        .map(|(&x, &m)| {
            Ok(-log_bin_probability(
                grid_level(x).ok_or(RefError::OffGrid { value: x })?,
                m,
                std,
            ))
        })
        .collect::<Result<Vec<f64>>>()?;
    let nll = Array2::from_shape_vec(x0.raw_dim(), nll).expect("one value per element of x0");
    Ok(nll.sum_axis(Axis(1)))
}

/// bits per dimension = nats/(d ln 2).
pub fn bits_per_dim(nats: f64, dim: usize) -> f64 {
    nats / (dim as f64 * LN_2)
}

/// The negative ELBO of one x_0 split into its terms.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundTerms {
    /// terms[j] = L_j for j = 0..T: L_0 the decoder, L_1..L_{T−1} the transitions, L_T the prior.
    pub terms: Array1<f64>,
    /// The data dimension d.
    pub dim: usize,
}

impl BoundTerms {
    /// Negative ELBO in nats: Σ_j L_j.
    pub fn total(&self) -> f64 {
        self.terms.sum()
    }

    /// Negative ELBO in bits per dimension.
    pub fn bits_per_dim(&self) -> f64 {
        bits_per_dim(self.total(), self.dim)
    }
}

/// Negative ELBO of one x_0 (on the 8-bit grid) with x_t = ᾱ_t x_0 + β̄_t eps[t−1] for
/// t = 1..T (eps is [T, d]): L_{t−1} is evaluated at that x_t, L_0 decodes μ(x_1) with
/// `decoder_std`. One-sample estimate of the expectation over x_t; exact for L_T.
pub fn negative_elbo_with_noise<F>(
    schedule: &Schedule,
    x0: &Array1<f64>,
    choice: SigmaChoice,
    eps: &Array2<f64>,
    predictor: F,
) -> Result<BoundTerms>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
{
    let t_max = schedule.t_max();
    check_shape(
        "noise (one row per t = 1..T) against x0",
        &[t_max, x0.len()],
        eps.shape(),
    )?;
    let x0 = x0.view().insert_axis(Axis(0)).to_owned();
    let mut terms = Array1::zeros(t_max + 1);
    terms[t_max] = prior_kl(schedule, &x0)?[0];
    for t in 1..=t_max {
        let noise = eps.row(t - 1).insert_axis(Axis(0));
        let xt = &x0 * schedule.alpha_bar(t)? + &noise * schedule.beta_bar(t)?;
        let eps_hat = predictor(&xt, t);
        check_shape("predictor output against x_t", xt.shape(), eps_hat.shape())?;
        terms[t - 1] = if t == 1 {
            let mean = ancestral_step(
                schedule,
                &xt,
                1,
                &eps_hat,
                0.0,
                &Array2::zeros(xt.raw_dim()),
            )?;
            decoder_nll(&x0, &mean, decoder_std(schedule, choice)?)?[0]
        } else {
            posterior_kl(schedule, &x0, &xt, t, &eps_hat, sigma(schedule, choice, t)?)?[0]
        };
    }
    Ok(BoundTerms {
        terms,
        dim: x0.len(),
    })
}

/// `negative_elbo_with_noise` with the T noise rows drawn from N(0, I).
pub fn negative_elbo<F, R>(
    schedule: &Schedule,
    x0: &Array1<f64>,
    choice: SigmaChoice,
    predictor: F,
    rng: &mut R,
) -> Result<BoundTerms>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
    R: Rng + ?Sized,
{
    let eps = standard_normal(schedule.t_max(), x0.len(), rng);
    negative_elbo_with_noise(schedule, x0, choice, &eps, predictor)
}

/// The level k with x = 2k/255 − 1, if x is on the grid.
fn grid_level(x: f64) -> Option<usize> {
    let k = ((x + 1.0) / (2.0 * HALF_BIN)).round();
    let on_grid =
        (0.0..=255.0).contains(&k) && (x - (2.0 * k * HALF_BIN - 1.0)).abs() <= GRID_TOLERANCE;
    on_grid.then_some(k as usize)
}

/// Rejects a NaN or infinite decoder mean.
fn check_finite_mean(mean: f64) -> Result<()> {
    if mean.is_finite() {
        Ok(())
    } else {
        Err(RefError::InvalidParameter {
            name: "decoder mean",
            value: mean,
            reason: "must be finite",
        })
    }
}

/// ln P(bin k) under N(mean, std²), std > 0.
fn log_bin_probability(k: usize, mean: f64, std: f64) -> f64 {
    let centre = 2.0 * k as f64 * HALF_BIN - 1.0;
    let lo = if k == 0 {
        f64::NEG_INFINITY
    } else {
        (centre - HALF_BIN - mean) / std
    };
    let hi = if k == LEVELS - 1 {
        f64::INFINITY
    } else {
        (centre + HALF_BIN - mean) / std
    };
    log_normal_mass(lo, hi)
}

/// ln Q(z) = ln P(Z > z) for Z ~ N(0, 1), accurate in the far upper tail.
fn log_upper_tail(z: f64) -> f64 {
    if z < TAIL_SWITCH {
        (0.5 * libm::erfc(z / SQRT_2)).ln()
    } else {
        // Q(z) = φ(z)/z · Σ_k (−1)^k (2k−1)!!/z^{2k} (asymptotic, Abramowitz & Stegun 26.2.12).
        let inv2 = 1.0 / (z * z);
        let (series, _) = (1..TAIL_TERMS).fold((1.0, 1.0), |(sum, term), k| {
            let next = -term * f64::from(2 * k - 1) * inv2;
            (sum + next, next)
        });
        -0.5 * z * z - (z * TAU.sqrt()).ln() + series.ln()
    }
}

/// ln P(a < Z < b) for Z ~ N(0, 1), a < b (either may be infinite), without cancellation:
/// tails are differenced in log space on their own side of 0.
fn log_normal_mass(a: f64, b: f64) -> f64 {
    if a >= 0.0 {
        let (la, lb) = (log_upper_tail(a), log_upper_tail(b));
        la + (-(lb - la).exp_m1()).ln()
    } else if b <= 0.0 {
        log_normal_mass(-b, -a)
    } else {
        let mass = 0.5 * (libm::erf(b / SQRT_2) - libm::erf(a / SQRT_2));
        if mass > 0.5 {
            // Close to 1: subtract the two (small, accurate) tails instead.
            (-(0.5 * libm::erfc(b / SQRT_2) + 0.5 * libm::erfc(-a / SQRT_2))).ln_1p()
        } else {
            mass.ln()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::DataLaw;
    use crate::schedule::ScheduleKind;
    use approx::assert_relative_eq;
    use ndarray::array;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use statrs::distribution::{ContinuousCDF, Normal};

    #[test]
    fn kl_of_equal_gaussians_is_zero_and_a_hand_value_holds() {
        let m = array![[0.3, -1.0, 2.0]];
        assert!(kl_isotropic(&m, 0.7, &m, 0.7).unwrap()[0].abs() < 1e-15);
        // d = 1: ln 2 + (1 + 1)/8 − 1/2.
        let kl = kl_isotropic(&array![[0.0]], 1.0, &array![[1.0]], 2.0).unwrap()[0];
        assert_relative_eq!(kl, LN_2 - 0.25, max_relative = 1e-15);
        // Two rows, two dims: each dimension adds its own term.
        let two = kl_isotropic(
            &array![[0.0, 0.0], [1.0, 1.0]],
            1.0,
            &array![[1.0, 1.0], [1.0, 1.0]],
            2.0,
        )
        .unwrap();
        assert_relative_eq!(two[0], 2.0 * (LN_2 - 0.25), max_relative = 1e-15);
        assert_relative_eq!(two[1], 2.0 * (LN_2 - 0.375), max_relative = 1e-15);
    }

    #[test]
    fn prior_term_matches_the_closed_form() {
        let s = Schedule::new(ScheduleKind::Article, 1000).unwrap();
        let (ab, bb) = (s.alpha_bar(1000).unwrap(), s.beta_bar(1000).unwrap());
        let lt = prior_kl(&s, &array![[0.5]]).unwrap()[0];
        assert_relative_eq!(
            lt,
            -bb.ln() + (bb * bb + 0.25 * ab * ab) / 2.0 - 0.5,
            max_relative = 1e-12
        );
    }

    #[test]
    fn transition_term_grows_by_half_the_loss8_weight_times_the_error() {
        // μ̃ − μ(x_t) = β_t²/(α_t β̄_t)·(ε̂ − ε) when x_t = ᾱ_t x_0 + β̄_t ε, so
        // L_{t−1}(ε̂) − L_{t−1}(ε) = ½ w_t ‖ε − ε̂‖²: the bound is loss (8) up to ½ and a constant.
        let s = Schedule::new(ScheduleKind::Linear, 100).unwrap();
        let t = 30;
        let sig = sigma(&s, SigmaChoice::Beta, t).unwrap();
        let x0 = array![[0.2, -0.4, 0.9]];
        let eps = array![[0.5, 1.5, -0.3]];
        let eps_hat = array![[0.1, 1.0, 0.2]];
        let xt = &x0 * s.alpha_bar(t).unwrap() + &eps * s.beta_bar(t).unwrap();
        let exact = posterior_kl(&s, &x0, &xt, t, &eps, sig).unwrap()[0];
        let off = posterior_kl(&s, &x0, &xt, t, &eps_hat, sig).unwrap()[0];
        let w = crate::loss::loss_weight(&s, t, sig).unwrap();
        let err = crate::loss::euclidean_loss(&eps, &eps_hat).unwrap();
        assert_relative_eq!(off - exact, 0.5 * w * err, max_relative = 1e-9);
        // With σ_t = σ̃_t and the exact noise the two Gaussians coincide.
        let post = sigma(&s, SigmaChoice::Posterior, t).unwrap();
        assert!(posterior_kl(&s, &x0, &xt, t, &eps, post).unwrap()[0].abs() < 1e-10);
    }

    #[test]
    fn decoder_probabilities_over_all_bins_sum_to_one() {
        for (mean, std) in [
            (0.0, 0.1),
            (0.37, 0.004),
            (-1.0, 1e-3),
            (1.3, 0.05),
            (0.0, 10.0),
            (0.5, 1e-6),
        ] {
            let total: f64 = decoder_log_probs(mean, std).unwrap().mapv(f64::exp).sum();
            assert_relative_eq!(total, 1.0, max_relative = 1e-12);
        }
    }

    #[test]
    fn decoder_bins_agree_with_the_normal_cdf() {
        // Only bins where the plain CDF difference has no cancellation (|z| < 4).
        for (mean, std, bins) in [
            (0.1, 0.05, vec![130, 140, 141, 150]),
            (-0.98, 0.02, vec![0, 1]),
            (0.99, 0.03, vec![254, 255]),
        ] {
            let law = Normal::new(mean, std).unwrap();
            let lp = decoder_log_probs(mean, std).unwrap();
            for k in bins {
                let x = 2.0 * k as f64 / 255.0 - 1.0;
                let lo = if k == 0 {
                    0.0
                } else {
                    law.cdf(x - 1.0 / 255.0)
                };
                let hi = if k == 255 {
                    1.0
                } else {
                    law.cdf(x + 1.0 / 255.0)
                };
                assert_relative_eq!(lp[k], (hi - lo).ln(), max_relative = 1e-9);
            }
        }
    }

    #[test]
    fn far_tail_bins_stay_finite_and_match_the_tail_asymptote() {
        // Bin 255 of N(0, 0.001²) starts at z = 254/0.255 ≈ 996 standard deviations:
        // ln Q(z) = −z²/2 − ln(z sqrt(2π)) + ln(1 − 1/z² + …), far below f64's smallest number.
        let lp = decoder_log_probs(0.0, 1e-3).unwrap();
        let z = (1.0 - 1.0 / 255.0) / 1e-3;
        let expected = -0.5 * z * z - (z * TAU.sqrt()).ln() + (1.0 - 1.0 / (z * z)).ln();
        assert_relative_eq!(lp[255], expected, max_relative = 1e-14);
        assert!(lp.iter().all(|v| v.is_finite()));
        // The series and erfc agree where they meet.
        let by_erfc = (0.5 * libm::erfc(TAIL_SWITCH / SQRT_2)).ln();
        assert_relative_eq!(log_upper_tail(TAIL_SWITCH), by_erfc, max_relative = 1e-13);
        // Reference values from mpmath at 40 digits: ln(erfc(z/√2)/2).
        assert_relative_eq!(lp[255], -496_093.943_488_341, max_relative = 1e-15);
        assert_relative_eq!(
            log_upper_tail(5.0),
            -15.064998393988726,
            max_relative = 1e-14
        );
        assert_relative_eq!(
            log_upper_tail(-3.0),
            -0.0013508099647481938,
            max_relative = 1e-13
        );
        assert_relative_eq!(
            log_upper_tail(30.0),
            -454.3212439563432,
            max_relative = 1e-15
        );
    }

    #[test]
    fn dirac_elbo_with_the_oracle_and_posterior_sigma() {
        // The oracle makes μ(x_t) = μ̃ and σ_t = σ̃_t, so every transition term vanishes;
        // L_T is the closed form; L_0 decodes N(x_0, β_1²) on the bin of x_0.
        let s = Schedule::new(ScheduleKind::Article, 50).unwrap();
        let x0 = array![2.0 * 100.0 / 255.0 - 1.0, 1.0];
        let law = DataLaw::dirac(x0.clone()).unwrap();
        let oracle = |x: &Array2<f64>, t: usize| law.optimal_eps(&s, x, t).unwrap();
        let mut rng = StdRng::seed_from_u64(47);
        let elbo = negative_elbo(&s, &x0, SigmaChoice::Posterior, oracle, &mut rng).unwrap();
        assert_eq!(elbo.terms.len(), 51);
        for j in 1..50 {
            assert!(elbo.terms[j].abs() < 1e-9, "L_{j} = {}", elbo.terms[j]);
        }
        let prior = prior_kl(&s, &x0.clone().insert_axis(Axis(0))).unwrap()[0];
        assert_relative_eq!(elbo.terms[50], prior, max_relative = 1e-14);
        let b1 = s.beta(1).unwrap();
        let phi = Normal::standard();
        let inner = (phi.cdf(HALF_BIN / b1) - phi.cdf(-HALF_BIN / b1)).ln();
        let edge = phi.sf(-HALF_BIN / b1).ln();
        assert_relative_eq!(elbo.terms[0], -(inner + edge), max_relative = 1e-9);
        assert_relative_eq!(
            elbo.bits_per_dim(),
            elbo.total() / (2.0 * LN_2),
            max_relative = 1e-15
        );
    }

    #[test]
    fn one_step_elbo_has_decoder_and_prior_only() {
        let s = Schedule::new(ScheduleKind::Article, 1).unwrap();
        let x0 = array![0.0 - 1.0 / 255.0];
        let zero = |x: &Array2<f64>, _t: usize| Array2::zeros(x.raw_dim());
        let elbo =
            negative_elbo_with_noise(&s, &x0, SigmaChoice::Beta, &array![[0.3]], zero).unwrap();
        assert_eq!(elbo.terms.len(), 2);
        assert!(elbo.terms.iter().all(|v| v.is_finite() && *v >= 0.0));
    }

    #[test]
    fn invalid_input_is_an_error() {
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        let x = array![[0.0]];
        assert!(matches!(
            kl_isotropic(&x, 0.0, &x, 1.0),
            Err(RefError::InvalidStd { .. })
        ));
        assert!(matches!(
            posterior_kl(&s, &x, &x, 1, &x, 0.1),
            Err(RefError::TimeOutOfRange { .. })
        ));
        assert!(matches!(
            decoder_nll(&array![[0.5]], &x, 0.1),
            Err(RefError::OffGrid { .. })
        ));
        assert!(matches!(
            decoder_nll(&array![[1.5]], &x, 0.1),
            Err(RefError::OffGrid { .. })
        ));
        assert!(matches!(
            decoder_log_probs(f64::NAN, 0.1),
            Err(RefError::InvalidParameter { .. })
        ));
        assert!(matches!(
            decoder_log_probs(0.0, 0.0),
            Err(RefError::InvalidStd { .. })
        ));
        let zero = |x: &Array2<f64>, _t: usize| Array2::zeros(x.raw_dim());
        let err = negative_elbo_with_noise(
            &s,
            &array![1.0],
            SigmaChoice::Beta,
            &Array2::zeros((9, 1)),
            zero,
        );
        assert!(matches!(err, Err(RefError::ShapeMismatch { .. })));
        assert_relative_eq!(bits_per_dim(2.0 * LN_2, 2), 1.0);
    }
}
