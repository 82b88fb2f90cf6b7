//! The encoder p: the marginal p(x_t|x_0) (eq. 9) and the posterior p(x_{t−1}|x_t, x_0).

use crate::error::{DdpmError, Result};
use crate::schedule::Schedule;
use tch::Tensor;

/// x_t = ᾱ_t x_0 + β̄_t ε, one t per sample (`t` Int64 [B], `x0` and `eps` [B, …]).
pub fn marginal_sample(
    schedule: &Schedule,
    x0: &Tensor,
    t: &Tensor,
    eps: &Tensor,
) -> Result<Tensor> {
    same_shape("x0", x0, "eps", eps)?;
    let ab = schedule.alpha_bar_at(t, x0)?;
    let bb = schedule.beta_bar_at(t, x0)?;
    Ok(ab * x0 + bb * eps)
}

/// Posterior mean μ̃ = (ᾱ_{t−1} β_t² x_0 + α_t β̄_{t−1}² x_t)/β̄_t², for t ≥ 1.
pub fn posterior_mean(
    schedule: &Schedule,
    x_t: &Tensor,
    x0: &Tensor,
    t: &Tensor,
) -> Result<Tensor> {
    same_shape("x_t", x_t, "x0", x0)?;
    let t_prev = t - 1;
    let ab_prev = schedule.alpha_bar_at(&t_prev, x_t)?;
    let bb_prev = schedule.beta_bar_at(&t_prev, x_t)?;
    let a = schedule.alpha_at(t, x_t)?;
    let b = schedule.beta_at(t, x_t)?;
    let bb = schedule.beta_bar_at(t, x_t)?;
    Ok((ab_prev * b.square() * x0 + a * bb_prev.square() * x_t) / bb.square())
}

/// Posterior standard deviation σ̃_t = β̄_{t−1} β_t / β̄_t per sample, shaped to broadcast
/// against `like`.
pub fn posterior_std(schedule: &Schedule, t: &Tensor, like: &Tensor) -> Result<Tensor> {
    let bb_prev = schedule.beta_bar_at(&(t - 1), like)?;
    Ok(bb_prev * schedule.beta_at(t, like)? / schedule.beta_bar_at(t, like)?)
}

/// The estimate x̂_0 = (x_t − β̄_t ε̂)/ᾱ_t that a noise prediction implies.
pub fn predict_x0(
    schedule: &Schedule,
    x_t: &Tensor,
    t: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    same_shape("x_t", x_t, "eps_hat", eps_hat)?;
    let bb = schedule.beta_bar_at(t, x_t)?;
    Ok((x_t - bb * eps_hat) / schedule.alpha_bar_at(t, x_t)?)
}

/// Errors unless `a` and `b` have the same shape.
pub(crate) fn same_shape(name_a: &str, a: &Tensor, name_b: &str, b: &Tensor) -> Result<()> {
    if a.size() == b.size() {
        Ok(())
    } else {
        Err(DdpmError::Shape(format!(
            "{name_a} has shape {:?} but {name_b} has shape {:?}",
            a.size(),
            b.size()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;
    use tch::{Device, Kind};

    #[test]
    fn posterior_of_the_marginal_is_consistent() {
        let _rng = crate::sampler::rng_lock();
        // Sampling x_{t−1} from p(x_{t−1}|x_0), then x_t from p(x_t|x_{t−1}), the posterior
        // mean with x_0 known must equal E[x_{t−1}|x_t, x_0]; checked on the deterministic
        // identity μ̃(x_t = ᾱ_t x_0, x_0) = ᾱ_{t−1} x_0.
        let s = Schedule::new(ScheduleKind::Article, 100, Device::Cpu).unwrap();
        let x0 = Tensor::randn([3, 5], (Kind::Double, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 50, 100]);
        let x_t = marginal_sample(&s, &x0, &t, &x0.zeros_like()).unwrap();
        let mean = posterior_mean(&s, &x_t, &x0, &t).unwrap();
        let expected = s.alpha_bar_at(&(&t - 1), &x0).unwrap() * &x0;
        assert!(f64::try_from((mean - expected).abs().max()).unwrap() < 1e-12);
        let sd = posterior_std(&s, &t, &x0).unwrap();
        assert_eq!(f64::try_from(sd.get(0).squeeze()).unwrap(), 0.0);
    }

    #[test]
    fn predict_x0_inverts_the_marginal() {
        let _rng = crate::sampler::rng_lock();
        let s = Schedule::new(ScheduleKind::Cosine, 50, Device::Cpu).unwrap();
        let x0 = Tensor::randn([4, 2, 3], (Kind::Double, Device::Cpu));
        let eps = Tensor::randn([4, 2, 3], (Kind::Double, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 10, 25, 49]);
        let x_t = marginal_sample(&s, &x0, &t, &eps).unwrap();
        let back = predict_x0(&s, &x_t, &t, &eps).unwrap();
        assert!(f64::try_from((back - x0).abs().max()).unwrap() < 1e-10);
        assert!(marginal_sample(&s, &x_t, &t, &eps.get(0)).is_err());
    }
}
