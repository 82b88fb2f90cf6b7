//! One step of the generator q(x_{t−1}|x_t): the article's ancestral step, Ho et al.'s
//! clipped-x̂_0 step, strided timesteps and the DDIM step; noise is always an argument.

use ndarray::Array2;
use rand::Rng;

use crate::error::{check_shape, check_std, RefError, Result};
use crate::marginal::{predicted_x0, standard_normal};
use crate::posterior;
use crate::schedule::Schedule;
use crate::sigma::{sigma, SigmaChoice};
use crate::timesteps::{step_pairs, strided};

/// Checks a generator step's arguments: 1 ≤ t ≤ T, σ ≥ 0 and z shaped like x_t; returns σ.
fn check_step(
    schedule: &Schedule,
    xt: &Array2<f64>,
    t: usize,
    sigma_t: f64,
    z: &Array2<f64>,
) -> Result<f64> {
    schedule.check_t(t, 1)?;
    check_shape("noise z against x_t", xt.shape(), z.shape())?;
    check_std("sigma_t", sigma_t, false)
}

/// The generator's mean μ(x_t) = (x_t − (β_t²/β̄_t) ε̂)/α_t, 1 ≤ t ≤ T.
pub fn generator_mean(
    schedule: &Schedule,
    xt: &Array2<f64>,
    t: usize,
    eps_hat: &Array2<f64>,
) -> Result<Array2<f64>> {
    schedule.check_t(t, 1)?;
    check_shape("predicted noise against x_t", xt.shape(), eps_hat.shape())?;
    let (a, b, bb) = (schedule.alpha(t)?, schedule.beta(t)?, schedule.beta_bar(t)?);
    Ok((xt - &(eps_hat * (b * b / bb))) / a)
}

/// x_{t−1} = (x_t − (β_t²/β̄_t) ε̂)/α_t + σ_t z, 1 ≤ t ≤ T.
pub fn ancestral_step(
    schedule: &Schedule,
    xt: &Array2<f64>,
    t: usize,
    eps_hat: &Array2<f64>,
    sigma_t: f64,
    z: &Array2<f64>,
) -> Result<Array2<f64>> {
    let sigma_t = check_step(schedule, xt, t, sigma_t, z)?;
    Ok(generator_mean(schedule, xt, t, eps_hat)? + z * sigma_t)
}

/// x_{t−1} = μ̃(x_t, clip(x̂_0, −1, 1)) + σ_t z: Ho et al.'s sampler, which keeps the x_0
/// estimate inside the data range; equal to `ancestral_step` whenever x̂_0 needs no clipping.
pub fn ancestral_step_clipped(
    schedule: &Schedule,
    xt: &Array2<f64>,
    t: usize,
    eps_hat: &Array2<f64>,
    sigma_t: f64,
    z: &Array2<f64>,
) -> Result<Array2<f64>> {
    let sigma_t = check_step(schedule, xt, t, sigma_t, z)?;
    let x0 = predicted_x0(schedule, xt, t, eps_hat)?.mapv(|v| v.clamp(-1.0, 1.0));
    Ok(posterior::mean(schedule, &x0, xt, t)? + z * sigma_t)
}

/// DDIM step τ → τ' (0 ≤ τ' < τ ≤ T, 0 ≤ η ≤ 1): x̂_0 = (x_τ − β̄_τ ε̂)/ᾱ_τ,
/// σ = η (β̄_{τ'}/β̄_τ) sqrt(1 − ᾱ_τ²/ᾱ_{τ'}²), x_{τ'} = ᾱ_{τ'} x̂_0 + sqrt(β̄_{τ'}² − σ²) ε̂ + σ z.
pub fn ddim_step(
    schedule: &Schedule,
    x_tau: &Array2<f64>,
    tau: usize,
    tau_next: usize,
    eps_hat: &Array2<f64>,
    eta: f64,
    z: &Array2<f64>,
) -> Result<Array2<f64>> {
    check_ddim(schedule, x_tau, tau, tau_next, eta, z)?;
    let x0 = predicted_x0(schedule, x_tau, tau, eps_hat)?;
    ddim_from_x0(schedule, tau, tau_next, &x0, eps_hat, eta, z)
}

/// [`ddim_step`] with x̂_0 clipped to [−1, 1] and ε̂ recomputed from it, ε̂′ = (x_τ − ᾱ_τ x̂_0)/β̄_τ,
/// so that η = 1 over one step is Ho et al.'s clipped ancestral step with the posterior σ.
pub fn ddim_step_clipped(
    schedule: &Schedule,
    x_tau: &Array2<f64>,
    tau: usize,
    tau_next: usize,
    eps_hat: &Array2<f64>,
    eta: f64,
    z: &Array2<f64>,
) -> Result<Array2<f64>> {
    check_ddim(schedule, x_tau, tau, tau_next, eta, z)?;
    let x0 = predicted_x0(schedule, x_tau, tau, eps_hat)?.mapv(|v| v.clamp(-1.0, 1.0));
    let eps = (x_tau - &(&x0 * schedule.alpha_bar(tau)?)) / schedule.beta_bar(tau)?;
    ddim_from_x0(schedule, tau, tau_next, &x0, &eps, eta, z)
}

/// Checks a DDIM step's arguments: 1 ≤ τ ≤ T, 0 ≤ τ' < τ, 0 ≤ η ≤ 1, z shaped like x_τ.
fn check_ddim(
    schedule: &Schedule,
    x_tau: &Array2<f64>,
    tau: usize,
    tau_next: usize,
    eta: f64,
    z: &Array2<f64>,
) -> Result<()> {
    schedule.check_t(tau, 1)?;
    schedule.check_t(tau_next, 0)?;
    if tau_next >= tau {
        return Err(RefError::NotBackwards {
            from: tau,
            to: tau_next,
        });
    }
    if !(0.0..=1.0).contains(&eta) {
        return Err(RefError::InvalidParameter {
            name: "eta",
            value: eta,
            reason: "must lie in [0, 1]",
        });
    }
    check_shape("noise z against x_tau", x_tau.shape(), z.shape())
}

/// x_{τ'} = ᾱ_{τ'} x̂_0 + sqrt(β̄_{τ'}² − σ²) ε̂ + σ z with DDIM's σ for this η.
fn ddim_from_x0(
    schedule: &Schedule,
    tau: usize,
    tau_next: usize,
    x0: &Array2<f64>,
    eps_hat: &Array2<f64>,
    eta: f64,
    z: &Array2<f64>,
) -> Result<Array2<f64>> {
    check_shape("predicted noise against x_tau", x0.shape(), eps_hat.shape())?;
    let (bb, bb_next) = (schedule.beta_bar(tau)?, schedule.beta_bar(tau_next)?);
    // 1 − ᾱ_τ²/ᾱ_{τ'}² = −expm1(2(ln ᾱ_τ − ln ᾱ_{τ'})), exact even for adjacent steps.
    let step_var =
        -(2.0 * (schedule.log_alpha_bar(tau)? - schedule.log_alpha_bar(tau_next)?)).exp_m1();
    let sigma = eta * bb_next / bb * step_var.sqrt();
    // β̄_{τ'}² − σ² ≥ 0 for η ≤ 1; the clamp only absorbs rounding at η = 1.
    let dir = (bb_next * bb_next - sigma * sigma).max(0.0).sqrt();
    Ok(x0 * schedule.alpha_bar(tau_next)? + eps_hat * dir + z * sigma)
}

/// Runs x_T → x_0 with `ancestral_step` (or `ancestral_step_clipped` when `clip`), σ_t from
/// `choice`, z ~ N(0, I) from `rng`; the predictor maps (x_t [n, d], t) to ε̂.
pub fn ancestral_sample<F, R>(
    schedule: &Schedule,
    choice: SigmaChoice,
    x_t_max: Array2<f64>,
    predictor: F,
    clip: bool,
    rng: &mut R,
) -> Result<Array2<f64>>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
    R: Rng + ?Sized,
{
    let (n, d) = x_t_max.dim();
    (1..=schedule.t_max()).rev().try_fold(x_t_max, |x, t| {
        let eps_hat = predictor(&x, t);
        let z = standard_normal(n, d, rng);
        let sigma_t = sigma(schedule, choice, t)?;
        if clip {
            ancestral_step_clipped(schedule, &x, t, &eps_hat, sigma_t, &z)
        } else {
            ancestral_step(schedule, &x, t, &eps_hat, sigma_t, &z)
        }
    })
}

/// Runs x_T → x_0 with `ddim_step` over `timesteps::strided(T, n_steps)`, z ~ N(0, I) from `rng`.
pub fn ddim_sample<F, R>(
    schedule: &Schedule,
    n_steps: usize,
    eta: f64,
    x_t_max: Array2<f64>,
    predictor: F,
    rng: &mut R,
) -> Result<Array2<f64>>
where
    F: Fn(&Array2<f64>, usize) -> Array2<f64>,
    R: Rng + ?Sized,
{
    let (n, d) = x_t_max.dim();
    let steps = strided(schedule.t_max(), n_steps)?;
    step_pairs(&steps)
        .into_iter()
        .try_fold(x_t_max, |x, (tau, tau_next)| {
            let eps_hat = predictor(&x, tau);
            let z = standard_normal(n, d, rng);
            ddim_step(schedule, &x, tau, tau_next, &eps_hat, eta, &z)
        })
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

    fn assert_close(a: &Array2<f64>, b: &Array2<f64>, tol: f64) {
        assert_eq!(a.shape(), b.shape());
        for (x, y) in a.iter().zip(b.iter()) {
            assert_relative_eq!(*x, *y, epsilon = tol, max_relative = tol);
        }
    }

    #[test]
    fn ancestral_step_is_the_stated_affine_map() {
        let s = Schedule::from_alphas(&[0.8, 0.6]).unwrap();
        let (xt, eps_hat, z) = (array![[1.0]], array![[0.5]], array![[2.0]]);
        // t = 2: β² = 0.64, β̄ = sqrt(1 − 0.2304).
        let expected = (1.0 - 0.64 / (1.0f64 - 0.2304).sqrt() * 0.5) / 0.6 + 0.1 * 2.0;
        assert_relative_eq!(
            ancestral_step(&s, &xt, 2, &eps_hat, 0.1, &z).unwrap()[[0, 0]],
            expected,
            max_relative = 1e-14
        );
    }

    #[test]
    fn clipped_step_equals_plain_step_inside_the_data_range() {
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        let t = 40;
        let (ab, bb) = (s.alpha_bar(t).unwrap(), s.beta_bar(t).unwrap());
        let x0 = array![[0.9, -0.3, 0.0]];
        let eps_hat = array![[0.2, -1.0, 1.5]];
        let xt = &x0 * ab + &eps_hat * bb;
        let z = array![[0.3, 0.3, -0.1]];
        let sig = sigma(&s, SigmaChoice::Beta, t).unwrap();
        assert_close(
            &ancestral_step_clipped(&s, &xt, t, &eps_hat, sig, &z).unwrap(),
            &ancestral_step(&s, &xt, t, &eps_hat, sig, &z).unwrap(),
            1e-12,
        );
        // Out of range, x̂_0 is clipped: at t = 1 the mean is x̂_0 itself.
        let x1 = array![[5.0, -5.0, 0.5]];
        let zero = Array2::zeros((1, 3));
        let out = ancestral_step_clipped(&s, &x1, 1, &Array2::zeros((1, 3)), 0.0, &zero).unwrap();
        let a1 = s.alpha_bar(1).unwrap();
        assert_close(&out, &array![[1.0, -1.0, 0.5 / a1]], 1e-12);
    }

    #[test]
    fn ddim_with_eta_one_is_the_strided_ddpm_posterior_step() {
        let s = Schedule::new(ScheduleKind::Cosine, 50).unwrap();
        let x = array![[0.4, -1.3]];
        let eps_hat = array![[0.7, 0.1]];
        let z = array![[-0.2, 1.1]];
        for (tau, tau_next) in [(50, 37), (20, 19), (5, 0)] {
            // The strided chain has α_{τ|τ'} = ᾱ_τ/ᾱ_{τ'}: a two-step schedule (ᾱ_{τ'}, α_{τ|τ'})
            // whose t = 2 posterior is the DDPM step τ → τ'.
            let (ab, ab_next) = (s.alpha_bar(tau).unwrap(), s.alpha_bar(tau_next).unwrap());
            let ddim = ddim_step(&s, &x, tau, tau_next, &eps_hat, 1.0, &z).unwrap();
            let x0 = predicted_x0(&s, &x, tau, &eps_hat).unwrap();
            let expected = if tau_next == 0 {
                x0
            } else {
                let pair = Schedule::from_alphas(&[ab_next, ab / ab_next]).unwrap();
                posterior::mean(&pair, &x0, &x, 2).unwrap() + &z * posterior::std(&pair, 2).unwrap()
            };
            assert_close(&ddim, &expected, 1e-10);
        }
        // Adjacent steps: DDIM(η = 1) is the ancestral step with σ_t = σ̃_t.
        let sig = sigma(&s, SigmaChoice::Posterior, 20).unwrap();
        assert_close(
            &ddim_step(&s, &x, 20, 19, &eps_hat, 1.0, &z).unwrap(),
            &ancestral_step(&s, &x, 20, &eps_hat, sig, &z).unwrap(),
            1e-10,
        );
    }

    #[test]
    fn clipped_ddim_is_plain_inside_the_range_and_the_clipped_posterior_step_at_eta_one() {
        let s = Schedule::new(ScheduleKind::Linear, 40).unwrap();
        let (x, z) = (array![[0.4, -0.8]], array![[-0.2, 1.1]]);
        let eps_hat = array![[0.7, 0.1]];
        // ᾱ_10 ≈ 0.99, β̄_10 ≈ 0.16: x̂_0 stays inside [−1, 1] here, so clipping changes nothing.
        for eta in [0.0, 0.4, 1.0] {
            assert_close(
                &ddim_step_clipped(&s, &x, 10, 4, &eps_hat, eta, &z).unwrap(),
                &ddim_step(&s, &x, 10, 4, &eps_hat, eta, &z).unwrap(),
                1e-12,
            );
        }
        // Far out of range (x = ±5): one step with η = 1 is Ho's clipped ancestral step.
        let far = array![[5.0, -5.0]];
        let sig = sigma(&s, SigmaChoice::Posterior, 30).unwrap();
        assert_close(
            &ddim_step_clipped(&s, &far, 30, 29, &eps_hat, 1.0, &z).unwrap(),
            &ancestral_step_clipped(&s, &far, 30, &eps_hat, sig, &z).unwrap(),
            1e-10,
        );
        assert!(ddim_step_clipped(&s, &x, 3, 3, &eps_hat, 0.0, &z).is_err());
    }

    #[test]
    fn ddim_with_eta_zero_is_deterministic_and_keeps_the_noise_direction() {
        let s = Schedule::new(ScheduleKind::Article, 100).unwrap();
        let x0 = array![[0.3, -0.6]];
        let eps = array![[1.2, 0.4]];
        let x = &x0 * s.alpha_bar(80).unwrap() + &eps * s.beta_bar(80).unwrap();
        let out = ddim_step(&s, &x, 80, 30, &eps, 0.0, &array![[9.0, 9.0]]).unwrap();
        let expected = &x0 * s.alpha_bar(30).unwrap() + &eps * s.beta_bar(30).unwrap();
        assert_close(&out, &expected, 1e-12);
    }

    #[test]
    fn dirac_oracle_samplers_land_on_the_point() {
        let s = Schedule::new(ScheduleKind::Article, 60).unwrap();
        let c = array![0.25, -0.75];
        let law = DataLaw::dirac(c.clone()).unwrap();
        let oracle = |x: &Array2<f64>, t: usize| law.optimal_eps(&s, x, t).unwrap();
        let mut rng = StdRng::seed_from_u64(41);
        let start = standard_normal(4, 2, &mut rng);
        let target = c.broadcast((4, 2)).unwrap().to_owned();
        let out = ancestral_sample(
            &s,
            SigmaChoice::Posterior,
            start.clone(),
            oracle,
            false,
            &mut rng,
        )
        .unwrap();
        assert_close(&out, &target, 1e-10);
        for eta in [0.0, 0.5, 1.0] {
            assert_close(
                &ddim_sample(&s, 7, eta, start.clone(), oracle, &mut rng).unwrap(),
                &target,
                1e-10,
            );
        }
    }

    #[test]
    fn standard_normal_oracle_with_sigma_beta_reproduces_the_data_law() {
        // For N(0, I) data the reverse conditionals are exactly N(μ(x_t), β_t² I) and
        // p(x_T) = N(0, I), so the sampler is exact. KS test at α = 0.001 on n = 4000 draws
        // (T = 40, one dimension): reject if D > sqrt(−ln(α/2)/2)/sqrt(n).
        let s = Schedule::new(ScheduleKind::Article, 40).unwrap();
        let law = DataLaw::standard_normal(1).unwrap();
        let oracle = |x: &Array2<f64>, t: usize| law.optimal_eps(&s, x, t).unwrap();
        let mut rng = StdRng::seed_from_u64(43);
        let n = 4000;
        let start = standard_normal(n, 1, &mut rng);
        let out = ancestral_sample(&s, SigmaChoice::Beta, start, oracle, false, &mut rng).unwrap();
        let mut xs = out.column(0).to_vec();
        xs.sort_by(f64::total_cmp);
        let phi = Normal::standard();
        let d = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                (phi.cdf(x) - i as f64 / n as f64).max((i + 1) as f64 / n as f64 - phi.cdf(x))
            })
            .fold(0.0, f64::max);
        assert!(
            d < (-(0.001f64 / 2.0).ln() / 2.0).sqrt() / (n as f64).sqrt(),
            "KS statistic {d}"
        );
    }

    #[test]
    fn invalid_input_is_an_error() {
        let s = Schedule::new(ScheduleKind::Article, 10).unwrap();
        let x = Array2::zeros((1, 2));
        assert!(matches!(
            ancestral_step(&s, &x, 0, &x, 0.1, &x),
            Err(RefError::TimeOutOfRange { .. })
        ));
        assert!(matches!(
            ancestral_step(&s, &x, 1, &x, -0.1, &x),
            Err(RefError::InvalidStd { .. })
        ));
        assert!(matches!(
            ancestral_step(&s, &x, 1, &x, 0.1, &Array2::zeros((2, 2))),
            Err(RefError::ShapeMismatch { .. })
        ));
        assert_eq!(
            ddim_step(&s, &x, 3, 3, &x, 0.0, &x),
            Err(RefError::NotBackwards { from: 3, to: 3 })
        );
        assert!(matches!(
            ddim_step(&s, &x, 3, 1, &x, 1.5, &x),
            Err(RefError::InvalidParameter { name: "eta", .. })
        ));
        assert!(matches!(
            ddim_step(&s, &x, 11, 1, &x, 0.0, &x),
            Err(RefError::TimeOutOfRange { .. })
        ));
    }
}
