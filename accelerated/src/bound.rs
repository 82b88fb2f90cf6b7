//! The variational bound (negative ELBO) per sample: L_T + Σ_{t=2..T} L_{t−1} + L_0, in nats,
//! with L_0 the discretised-Gaussian decoder over the 256 levels of 8-bit data.

use crate::error::{DdpmError, Result};
use crate::marginal::{marginal_sample, same_shape};
use crate::posterior;
use crate::sampler::{generator_mean, NoisePredictor};
use crate::schedule::{gather, Schedule};
use tch::{Kind, Tensor};

/// Half the width of one 8-bit level on [−1, 1]: levels x = 2k/255 − 1, bins x ± 1/255.
const HALF_BIN: f64 = 1.0 / 255.0;
/// Data within this distance of ±1 sit in an outer bin, which extends to ±∞.
const EDGE: f64 = 1e-3;

fn sum_per_sample(x: &Tensor) -> Result<Tensor> {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    Ok(x.f_sum_dim_intlist(dims.as_slice(), false, None::<Kind>)?)
}

/// KL(N(m1, s1² I) ‖ N(m2, s2² I)) = Σ_dims [ln(s2/s1) + (s1² + (m1 − m2)²)/(2 s2²) − ½] per
/// sample [B]; `s1`, `s2` broadcast against the means ([B, 1, …] per-sample stds).
pub fn kl_isotropic(m1: &Tensor, s1: &Tensor, m2: &Tensor, s2: &Tensor) -> Result<Tensor> {
    same_shape("m1", m1, "m2", m2)?;
    let spread = s1.f_square()?.f_add(&m1.f_sub(m2)?.f_square()?)?;
    let term = s2
        .f_div(s1)?
        .f_log()?
        .f_add(&spread.f_div(&s2.f_square()?.f_mul_scalar(2.0)?)?)?
        .f_sub_scalar(0.5)?;
    sum_per_sample(&term.f_broadcast_to(m1.size())?)
}

/// L_T = KL(N(ᾱ_T x_0, β̄_T² I) ‖ N(0, I)) per sample [B].
pub fn prior_kl(schedule: &Schedule, x0: &Tensor) -> Result<Tensor> {
    let b = x0.size().first().copied().unwrap_or(0);
    let t = Tensor::f_full([b], schedule.t_max(), (Kind::Int64, x0.device()))?;
    let mean = schedule.alpha_bar_at(&t, x0)?.f_mul(x0)?;
    let std = schedule.beta_bar_at(&t, x0)?;
    kl_isotropic(&mean, &std, &mean.f_zeros_like()?, &std.f_ones_like()?)
}

/// L_{t−1} = KL(N(μ̃(x_t, x_0), σ̃_t²) ‖ N(μ(x_t), σ_t²)) per sample [B], for t ≥ 2;
/// `sigma` is the generator's σ table (length T+1).
pub fn posterior_kl(
    schedule: &Schedule,
    sigma: &Tensor,
    x0: &Tensor,
    x_t: &Tensor,
    t: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    let m1 = posterior::mean(schedule, x0, x_t, t)?;
    let s1 = posterior::std(schedule, t, x_t)?;
    let m2 = generator_mean(schedule, x_t, t, eps_hat)?;
    kl_isotropic(&m1, &s1, &m2, &gather(sigma, t, x_t)?)
}

/// ln(Φ(b) − Φ(a)) for a < b elementwise, from log Φ without cancellation: in the upper tail
/// (a > 0) as ln Φ(−a) + ln(1 − Φ(−b)/Φ(−a)), elsewhere as ln Φ(b) + ln(1 − Φ(a)/Φ(b)).
pub fn log_normal_cdf_diff(a: &Tensor, b: &Tensor) -> Tensor {
    let upper = {
        let la = a.neg().special_log_ndtr();
        let lb = b.neg().special_log_ndtr();
        &la + (lb - &la).expm1().neg().log()
    };
    let lower = {
        let la = a.special_log_ndtr();
        let lb = b.special_log_ndtr();
        &lb + (la - &lb).expm1().neg().log()
    };
    upper.where_self(&a.gt(0.0), &lower)
}

/// The decoder's standard deviation: σ_1, or β_1 where σ_1 = 0 (the `Posterior` choice).
fn decoder_std(schedule: &Schedule, sigma: &Tensor, t1: &Tensor, like: &Tensor) -> Result<Tensor> {
    let s = gather(sigma, t1, like)?;
    let b = schedule.beta_at(t1, like)?;
    Ok(s.f_where_self(&s.f_gt(0.0)?, &b)?)
}

/// L_0 = −ln q(x_0|x_1) per sample [B] for x_0 on the 8-bit grid 2k/255 − 1: each value's bin
/// x ± 1/255 (the outer bins reaching ±∞) under N(μ(x_1), s²), s as [`decoder_std`].
pub fn decoder_nll(
    schedule: &Schedule,
    sigma: &Tensor,
    x0: &Tensor,
    x1: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    same_shape("x0", x0, "x1", x1)?;
    let b = x0.size().first().copied().unwrap_or(0);
    let t1 = Tensor::f_ones([b], (Kind::Int64, x0.device()))?;
    let mean = generator_mean(schedule, x1, &t1, eps_hat)?;
    let std = decoder_std(schedule, sigma, &t1, x0)?;
    let centred = x0.f_sub(&mean)?;
    let lo = centred.f_sub_scalar(HALF_BIN)?.f_div(&std)?;
    let hi = centred.f_add_scalar(HALF_BIN)?.f_div(&std)?;
    // The arguments are the shape of x0 (checked above), so the elementwise calls below cannot
    // fail on shapes.
    let middle = log_normal_cdf_diff(&lo, &hi);
    let bottom = hi.f_special_log_ndtr()?;
    let top = lo.f_neg()?.f_special_log_ndtr()?;
    let log_p = middle
        .f_where_self(&x0.f_lt(-1.0 + EDGE)?.f_logical_not()?, &bottom)?
        .f_where_self(&x0.f_gt(1.0 - EDGE)?.f_logical_not()?, &top)?;
    Ok(sum_per_sample(&log_p)?.f_neg()?)
}

/// The term of the bound that step t contributes per sample [B], t mixed across the batch:
/// L_0 (decoder) where t = 1, L_{t−1} where t ≥ 2, with x_t = ᾱ_t x_0 + β̄_t ε and ε̂ the
/// model's prediction at (x_t, t).
pub fn bound_term(
    schedule: &Schedule,
    sigma: &Tensor,
    x0: &Tensor,
    t: &Tensor,
    x_t: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    // L_{t−1} is only defined for t ≥ 2; those samples read the decoder below, so any valid
    // index will do for them — min(2, T) keeps a T = 1 schedule in range.
    let t_safe = t.f_clamp_min(2.min(schedule.t_max()))?;
    let kl = posterior_kl(schedule, sigma, x0, x_t, &t_safe, eps_hat)?;
    let dec = decoder_nll(schedule, sigma, x0, x_t, eps_hat)?;
    Ok(dec.f_where_self(&t.f_eq(1)?, &kl)?)
}

/// nats per sample → bits per dimension: nats/(d ln 2).
pub fn bits_per_dim(nats: &Tensor, dims: i64) -> Tensor {
    nats / (dims as f64 * std::f64::consts::LN_2)
}

/// The bound's parts per sample [B], in nats.
#[derive(Debug)]
pub struct BoundTerms {
    /// L_T.
    pub prior: Tensor,
    /// Σ_{t=2..T} L_{t−1}.
    pub diffusion: Tensor,
    /// L_0.
    pub decoder: Tensor,
}

impl BoundTerms {
    /// The negative ELBO L_T + Σ L_{t−1} + L_0 per sample.
    pub fn total(&self) -> Tensor {
        &self.prior + &self.diffusion + &self.decoder
    }
}

/// The full bound for a batch x_0 [B, …] on the 8-bit grid: one model call per t = 1..T with
/// fresh noise, under no_grad; `on_step(done, T)` after each.
pub fn negative_elbo<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    sigma: &Tensor,
    x0: &Tensor,
    mut on_step: impl FnMut(usize, usize),
) -> Result<BoundTerms> {
    model.check_input(&x0.size())?;
    if sigma.size() != [schedule.t_max() + 1] {
        return Err(DdpmError::ShapeMismatch {
            what: "sigma table",
            expected: format!("[T+1] = [{}]", schedule.t_max() + 1),
            got: sigma.size(),
        });
    }
    let b = x0.size()[0];
    let device = x0.device();
    tch::no_grad(|| {
        let prior = prior_kl(schedule, x0)?;
        let mut diffusion = prior.f_zeros_like()?;
        let mut decoder = prior.f_zeros_like()?;
        let total = schedule.t_max() as usize;
        for step in 1..=schedule.t_max() {
            let t = Tensor::f_full([b], step, (Kind::Int64, device))?;
            let eps = x0.f_randn_like()?;
            let x_t = marginal_sample(schedule, x0, &t, &eps)?;
            let eps_hat = model.predict(&x_t, &t)?;
            if step == 1 {
                decoder = decoder_nll(schedule, sigma, x0, &x_t, &eps_hat)?;
            } else {
                diffusion =
                    diffusion.f_add(&posterior_kl(schedule, sigma, x0, &x_t, &t, &eps_hat)?)?;
            }
            on_step(step as usize, total);
        }
        Ok(BoundTerms {
            prior,
            diffusion,
            decoder,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::{DataLaw, Oracle};
    use crate::sampler::rng_lock;
    use crate::schedule::ScheduleKind;
    use crate::sigma::SigmaChoice;
    use tch::Device;

    const CPU64: (Kind, Device) = (Kind::Double, Device::Cpu);

    #[test]
    fn kl_of_equal_gaussians_is_zero_and_matches_the_formula() {
        let _rng = rng_lock();
        let m = Tensor::randn([2, 3], CPU64);
        let s = Tensor::from_slice(&[0.5, 2.0]).view([2, 1]);
        let zero = kl_isotropic(&m, &s, &m, &s).unwrap();
        assert!(f64::try_from(zero.abs().max()).unwrap() < 1e-15);
        let kl = kl_isotropic(&m, &s, &m.zeros_like(), &s.ones_like()).unwrap();
        for b in 0..2 {
            let sb = s.double_value(&[b, 0]);
            let m2 = f64::try_from(m.get(b).square().sum(Kind::Double)).unwrap();
            let expected = 3.0 * (-sb.ln() + sb * sb / 2.0 - 0.5) + m2 / 2.0;
            assert!((kl.double_value(&[b]) - expected).abs() < 1e-12);
        }
    }

    #[test]
    fn log_cdf_difference_is_accurate_in_both_tails() {
        // Reference values: Φ(b) − Φ(a) from erfc, fine where it does not underflow.
        let a = Tensor::from_slice(&[-1.0, 0.0, 5.0, -6.0, 30.0]);
        let b = Tensor::from_slice(&[1.0, 0.001, 5.01, -5.99, 30.01]);
        let got = log_normal_cdf_diff(&a, &b);
        let phi = |x: f64| 0.5 * libm_erfc(-x / std::f64::consts::SQRT_2);
        for i in 0..4 {
            let (ai, bi) = (a.double_value(&[i]), b.double_value(&[i]));
            let expected = if ai > 0.0 {
                (phi(-ai) - phi(-bi)).ln()
            } else {
                (phi(bi) - phi(ai)).ln()
            };
            assert!(
                (got.double_value(&[i]) - expected).abs() < 1e-9 * expected.abs().max(1.0),
                "{i}"
            );
        }
        // Far tail: Φ(−30) ≈ 4.9e-198; the bin of width 0.01 at 30 still has a finite log.
        let far = got.double_value(&[4]);
        assert!(far.is_finite() && far < -450.0, "{far}");
    }

    /// erfc via libtorch, so the reference values do not reuse `special_log_ndtr`.
    fn libm_erfc(x: f64) -> f64 {
        Tensor::from_slice(&[x]).erfc().double_value(&[0])
    }

    #[test]
    fn decoder_probabilities_sum_to_one_over_the_grid() {
        // Put every one of the 256 levels in its own sample dimension: the probabilities of
        // all bins under one Gaussian must sum to 1.
        let s = Schedule::new(ScheduleKind::Article, 1000, Device::Cpu).unwrap();
        let sigma = SigmaChoice::Beta.table(&s).unwrap();
        let grid = (Tensor::arange(256, CPU64) * (2.0 / 255.0) - 1.0).view([256, 1]);
        let x1 = Tensor::full([256, 1], 0.3, CPU64);
        let eps_hat = Tensor::zeros([256, 1], CPU64);
        let nll = decoder_nll(&s, &sigma, &grid, &x1, &eps_hat).unwrap();
        let total = f64::try_from(nll.neg().exp().sum(Kind::Double)).unwrap();
        assert!((total - 1.0).abs() < 1e-10, "{total}");
    }

    #[test]
    fn the_bound_of_a_dirac_under_its_oracle_is_the_decoder_and_prior_only() {
        // With the exact ε* of a Dirac and σ = σ̃, every L_{t−1} (t ≥ 2) vanishes.
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 50, Device::Cpu).unwrap();
        let c = (Tensor::from_slice(&[0i64, 128, 255]).to_kind(Kind::Double) * (2.0 / 255.0) - 1.0)
            .view([1, 3]);
        let oracle = Oracle::new(DataLaw::dirac(&c.view([3])).unwrap(), &s);
        let sigma = SigmaChoice::Posterior.table(&s).unwrap();
        let terms = negative_elbo(&oracle, &s, &sigma, &c.repeat([2, 1]), |_, _| {}).unwrap();
        assert!(f64::try_from(terms.diffusion.abs().max()).unwrap() < 1e-8);
        assert!(f64::try_from(terms.prior.min()).unwrap() > 0.0);
        assert!(f64::try_from(terms.decoder.min()).unwrap() >= 0.0);
        let bpd = bits_per_dim(&terms.total(), 3);
        assert_eq!(bpd.size(), vec![2]);
    }

    #[test]
    fn bound_term_picks_the_decoder_at_t_one() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 10, Device::Cpu).unwrap();
        let sigma = SigmaChoice::Posterior.table(&s).unwrap();
        let x0 = Tensor::from_slice(&[-1.0, 1.0, 0.0])
            .view([1, 3])
            .repeat([2, 1]);
        let (x_t, eps_hat) = (Tensor::randn([2, 3], CPU64), Tensor::randn([2, 3], CPU64));
        let t = Tensor::from_slice(&[1i64, 5]);
        let mixed = bound_term(&s, &sigma, &x0, &t, &x_t, &eps_hat).unwrap();
        let dec = decoder_nll(&s, &sigma, &x0, &x_t, &eps_hat).unwrap();
        let kl = posterior_kl(&s, &sigma, &x0, &x_t, &t, &eps_hat).unwrap();
        assert_eq!(mixed.double_value(&[0]), dec.double_value(&[0]));
        assert_eq!(mixed.double_value(&[1]), kl.double_value(&[1]));
    }
}
