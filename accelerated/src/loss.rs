//! Training losses: the Euclidean loss on ε̂ (summed over every dimension of a sample,
//! averaged over the batch), the article's weighted loss (8) and the Min-SNR-γ weighting.

use crate::error::{DdpmError, Result};
use crate::marginal::same_shape;
use crate::schedule::{gather, Schedule};
use tch::{Kind, Tensor};

/// ‖ε − ε̂‖² per sample: the sum over all non-batch dimensions, shape [B].
pub fn per_sample_sq_error(eps: &Tensor, eps_hat: &Tensor) -> Result<Tensor> {
    same_shape("eps", eps, "eps_hat", eps_hat)?;
    if eps.dim() < 2 {
        return Err(DdpmError::ShapeMismatch {
            what: "eps",
            expected: "a batch [B, …] with at least one data dimension".into(),
            got: eps.size(),
        });
    }
    let dims: Vec<i64> = (1..eps.dim() as i64).collect();
    Ok(eps
        .f_sub(eps_hat)?
        .f_square()?
        .f_sum_dim_intlist(dims.as_slice(), false, None::<Kind>)?)
}

/// The unweighted training loss mean_B ‖ε − ε̂‖² (never a per-pixel mean).
pub fn euclidean_loss(eps: &Tensor, eps_hat: &Tensor) -> Result<Tensor> {
    Ok(per_sample_sq_error(eps, eps_hat)?.f_mean(None::<Kind>)?)
}

/// Weight of loss (8) on the unweighted loss, w_t = β_t⁴/(β̄_t² α_t² σ_t²), per sample [B];
/// `sigma` is a σ table of length T+1 (see `sigma.rs`). Infinite where σ_t = 0 (σ_1 of
/// `Posterior`): there the generator's step is deterministic and the KL is unbounded.
pub fn loss_weight(schedule: &Schedule, sigma: &Tensor, t: &Tensor, kind: Kind) -> Result<Tensor> {
    let like = Tensor::f_zeros([t.size().first().copied().unwrap_or(0)], (kind, t.device()))?;
    let b = schedule.beta_at(t, &like)?;
    let bb = schedule.beta_bar_at(t, &like)?;
    let a = schedule.alpha_at(t, &like)?;
    let s = gather(sigma, t, &like)?;
    let den = bb
        .f_square()?
        .f_mul(&a.f_square()?)?
        .f_mul(&s.f_square()?)?;
    Ok(b.f_square()?.f_square()?.f_div(&den)?)
}

/// Loss (8) per sample: w_t ‖ε − ε̂‖², shape [B].
pub fn weighted_per_sample(
    schedule: &Schedule,
    sigma: &Tensor,
    t: &Tensor,
    eps: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    let err = per_sample_sq_error(eps, eps_hat)?;
    Ok(loss_weight(schedule, sigma, t, err.kind())?.f_mul(&err)?)
}

/// Loss (8) averaged over the batch: mean_B w_t ‖ε − ε̂‖².
pub fn weighted_loss(
    schedule: &Schedule,
    sigma: &Tensor,
    t: &Tensor,
    eps: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    Ok(weighted_per_sample(schedule, sigma, t, eps, eps_hat)?.f_mean(None::<Kind>)?)
}

/// ᾱ_t² and β̄_t² per sample [B], in f64 (the tables' precision).
fn signal_and_noise(schedule: &Schedule, t: &Tensor) -> Result<(Tensor, Tensor)> {
    let like = Tensor::f_zeros(
        [t.size().first().copied().unwrap_or(0)],
        (Kind::Double, t.device()),
    )?;
    let ab = schedule.alpha_bar_at(t, &like)?;
    let bb = schedule.beta_bar_at(t, &like)?;
    Ok((ab.f_square()?, bb.f_square()?))
}

/// SNR_t = ᾱ_t²/β̄_t² per sample [B], computed in f64 and returned in `kind`.
pub fn snr(schedule: &Schedule, t: &Tensor, kind: Kind) -> Result<Tensor> {
    let (signal, noise) = signal_and_noise(schedule, t)?;
    Ok(signal.f_div(&noise)?.f_to_kind(kind)?)
}

/// Min-SNR-γ weight on the unweighted loss (Hang et al. 2023), w_t = min(SNR_t, γ)/SNR_t per
/// sample [B] in `kind`, computed as min(1, γ β̄_t²/ᾱ_t²) (the same number, and its limit 1
/// where ᾱ_t rounds to 0) in f64 and returned in `kind` (one rounding). `gamma` must be
/// positive and finite.
pub fn min_snr_weight(schedule: &Schedule, gamma: f64, t: &Tensor, kind: Kind) -> Result<Tensor> {
    if !(gamma.is_finite() && gamma > 0.0) {
        return Err(DdpmError::OutOfRange {
            key: "gamma",
            value: gamma.to_string(),
            expected: "positive and finite (Min-SNR-γ's clamp on SNR_t)".into(),
        });
    }
    let (signal, noise) = signal_and_noise(schedule, t)?;
    Ok(noise
        .f_mul_scalar(gamma)?
        .f_div(&signal)?
        .f_clamp_max(1.0)?
        .f_to_kind(kind)?)
}

/// The Min-SNR-γ loss averaged over the batch: mean_B min(SNR_t, γ)/SNR_t ‖ε − ε̂‖².
pub fn min_snr_loss(
    schedule: &Schedule,
    gamma: f64,
    t: &Tensor,
    eps: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    let err = per_sample_sq_error(eps, eps_hat)?;
    Ok(min_snr_weight(schedule, gamma, t, err.kind())?
        .f_mul(&err)?
        .f_mean(None::<Kind>)?)
}

/// The network input of loss (7): x_t = ᾱ_t x_0 + α_t β̄_{t−1} ε̄_{t−1} + β_t ε_t.
pub fn loss7_input(
    schedule: &Schedule,
    x0: &Tensor,
    t: &Tensor,
    eps_bar_prev: &Tensor,
    eps_t: &Tensor,
) -> Result<Tensor> {
    same_shape("x0", x0, "eps_bar_prev", eps_bar_prev)?;
    same_shape("x0", x0, "eps_t", eps_t)?;
    let ab = schedule.alpha_bar_at(t, x0)?;
    let a = schedule.alpha_at(t, x0)?;
    let bb_prev = schedule.beta_bar_at(&t.f_sub_scalar(1)?, x0)?;
    let b = schedule.beta_at(t, x0)?;
    Ok(ab
        .f_mul(x0)?
        .f_add(&a.f_mul(&bb_prev)?.f_mul(eps_bar_prev)?)?
        .f_add(&b.f_mul(eps_t)?)?)
}

/// Loss (7) per sample: β_t²/(α_t² σ_t²) ‖ε_t − ε_θ‖² with ε_θ = (β_t/β̄_t) ε̂, shape [B].
pub fn loss7_per_sample(
    schedule: &Schedule,
    sigma: &Tensor,
    t: &Tensor,
    eps_t: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    let b = schedule.beta_at(t, eps_hat)?;
    let eps_theta = b
        .f_div(&schedule.beta_bar_at(t, eps_hat)?)?
        .f_mul(eps_hat)?;
    let err = per_sample_sq_error(eps_t, &eps_theta)?;
    let like = err.f_zeros_like()?;
    let a = schedule.alpha_at(t, &like)?;
    let s = gather(sigma, t, &like)?;
    Ok(schedule
        .beta_at(t, &like)?
        .f_square()?
        .f_div(&a.f_square()?.f_mul(&s.f_square()?)?)?
        .f_mul(&err)?)
}

/// The θ-free constant (7) − (8) = d β_t² β̄_{t−1}² / (σ_t² β̄_t²), per sample [B] in `kind`.
pub fn loss7_minus_loss8(
    schedule: &Schedule,
    sigma: &Tensor,
    t: &Tensor,
    d: i64,
    kind: Kind,
) -> Result<Tensor> {
    let like = Tensor::f_zeros([t.size().first().copied().unwrap_or(0)], (kind, t.device()))?;
    let b = schedule.beta_at(t, &like)?;
    let bb_prev = schedule.beta_bar_at(&t.f_sub_scalar(1)?, &like)?;
    let bb = schedule.beta_bar_at(t, &like)?;
    let s = gather(sigma, t, &like)?;
    Ok(b.f_square()?
        .f_mul(&bb_prev.f_square()?)?
        .f_div(&s.f_square()?.f_mul(&bb.f_square()?)?)?
        .f_mul_scalar(d as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;
    use crate::sigma::SigmaChoice;
    use tch::Device;

    #[test]
    fn loss_is_a_sum_over_pixels_and_a_mean_over_the_batch() {
        let eps = Tensor::ones([2, 1, 3, 3], (Kind::Double, Device::Cpu));
        let eps_hat = Tensor::cat(
            &[eps.get(0).unsqueeze(0) * 0.0, eps.get(1).unsqueeze(0) * 3.0],
            0,
        );
        let per = Vec::<f64>::try_from(per_sample_sq_error(&eps, &eps_hat).unwrap()).unwrap();
        assert_eq!(per, vec![9.0, 36.0]);
        let mean = f64::try_from(euclidean_loss(&eps, &eps_hat).unwrap()).unwrap();
        assert_eq!(mean, 22.5);
    }

    #[test]
    fn min_snr_weight_clamps_high_snr_and_keeps_low_snr() {
        let s = Schedule::new(ScheduleKind::Cosine, 100, Device::Cpu).unwrap();
        let t = Tensor::from_slice(&[1i64, 50, 100]);
        let snr = Vec::<f64>::try_from(snr(&s, &t, Kind::Double).unwrap()).unwrap();
        let w = min_snr_weight(&s, 5.0, &t, Kind::Double).unwrap();
        let w = Vec::<f64>::try_from(w).unwrap();
        // t = 1: SNR ≫ 5, so w = 5/SNR; t = 50, 100: SNR < 5, so w = 1 exactly.
        assert!(snr[0] > 5.0 && snr[1] < 5.0 && snr[2] < 5.0, "{snr:?}");
        assert!((w[0] - 5.0 / snr[0]).abs() < 1e-12 * w[0]);
        assert_eq!(&w[1..], &[1.0, 1.0]);
        for gamma in [0.0, -2.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                min_snr_weight(&s, gamma, &t, Kind::Float),
                Err(DdpmError::OutOfRange { key: "gamma", .. })
            ));
        }
        assert!(min_snr_weight(&s, 5.0, &Tensor::from_slice(&[101i64]), Kind::Float).is_err());
    }

    #[test]
    fn weight_is_infinite_only_where_sigma_vanishes() {
        let s = Schedule::new(ScheduleKind::Article, 10, Device::Cpu).unwrap();
        let sigma = SigmaChoice::Posterior.table(&s).unwrap();
        let t = Tensor::from_slice(&[1i64, 2, 10]);
        let w = Vec::<f64>::try_from(loss_weight(&s, &sigma, &t, Kind::Double).unwrap()).unwrap();
        assert!(w[0].is_infinite() && w[1].is_finite() && w[2].is_finite());
        // With σ_t = β_t the weight reduces to β_t²/(β̄_t² α_t²).
        let sigma = SigmaChoice::Beta.table(&s).unwrap();
        let w = Vec::<f64>::try_from(loss_weight(&s, &sigma, &t, Kind::Double).unwrap()).unwrap();
        let (a, b, bb) = (
            s.alphas().double_value(&[10]),
            s.betas().double_value(&[10]),
            s.beta_bars().double_value(&[10]),
        );
        assert!((w[2] - b * b / (bb * bb * a * a)).abs() < 1e-12 * w[2]);
    }
}
