//! The encoder's posterior p(x_{t−1}|x_t, x_0) = N(μ̃, σ̃_t² I), one t per sample.

use crate::error::Result;
use crate::marginal::same_shape;
use crate::schedule::Schedule;
use tch::Tensor;

/// μ̃ = (ᾱ_{t−1} β_t² x_0 + α_t β̄_{t−1}² x_t)/β̄_t², for t ≥ 1.
pub fn mean(schedule: &Schedule, x0: &Tensor, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
    same_shape("x_t", x_t, "x0", x0)?;
    let t_prev = t - 1;
    let ab_prev = schedule.alpha_bar_at(&t_prev, x_t)?;
    let bb_prev = schedule.beta_bar_at(&t_prev, x_t)?;
    let a = schedule.alpha_at(t, x_t)?;
    let b = schedule.beta_at(t, x_t)?;
    let bb = schedule.beta_bar_at(t, x_t)?;
    Ok((ab_prev * b.square() * x0 + a * bb_prev.square() * x_t) / bb.square())
}

/// σ̃_t = β̄_{t−1} β_t / β̄_t per sample, shaped to broadcast against `like`.
pub fn std(schedule: &Schedule, t: &Tensor, like: &Tensor) -> Result<Tensor> {
    let bb_prev = schedule.beta_bar_at(&(t - 1), like)?;
    Ok(bb_prev * schedule.beta_at(t, like)? / schedule.beta_bar_at(t, like)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marginal::marginal_sample;
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
        let m = mean(&s, &x0, &x_t, &t).unwrap();
        let expected = s.alpha_bar_at(&(&t - 1), &x0).unwrap() * &x0;
        assert!(f64::try_from((m - expected).abs().max()).unwrap() < 1e-12);
        let sd = std(&s, &t, &x0).unwrap();
        assert_eq!(f64::try_from(sd.get(0).squeeze()).unwrap(), 0.0);
    }
}
