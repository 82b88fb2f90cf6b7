//! The marginal of the encoder, eq. (9): p(x_t|x_0) = N(ᾱ_t x_0, β̄_t² I), and its inversion x̂_0.

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

/// The estimate x̂_0 = (x_t − β̄_t ε̂)/ᾱ_t that a noise prediction implies.
pub fn predicted_x0(
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
pub(crate) fn same_shape(name_a: &str, a: &Tensor, name_b: &'static str, b: &Tensor) -> Result<()> {
    if a.size() == b.size() {
        Ok(())
    } else {
        Err(DdpmError::ShapeMismatch {
            what: name_b,
            expected: format!("the shape of {name_a}, {:?}", a.size()),
            got: b.size(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;
    use tch::{Device, Kind};

    #[test]
    fn predicted_x0_inverts_the_marginal() {
        let _rng = crate::sampler::rng_lock();
        let s = Schedule::new(ScheduleKind::Cosine, 50, Device::Cpu).unwrap();
        let x0 = Tensor::randn([4, 2, 3], (Kind::Double, Device::Cpu));
        let eps = Tensor::randn([4, 2, 3], (Kind::Double, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 10, 25, 49]);
        let x_t = marginal_sample(&s, &x0, &t, &eps).unwrap();
        let back = predicted_x0(&s, &x_t, &t, &eps).unwrap();
        assert!(f64::try_from((back - x0).abs().max()).unwrap() < 1e-10);
        assert!(marginal_sample(&s, &x_t, &t, &eps.get(0)).is_err());
    }
}
