//! Noise schedules in the article's notation: α_t, β_t = sqrt(1 − α_t²), ᾱ_t = ∏ α_i,
//! β̄_t = sqrt(1 − ᾱ_t²), as f64 tensors of length T+1 whose index 0 is the identity.

use crate::error::{DdpmError, Result};
use tch::{Device, Kind, Tensor};

/// Which schedule of α_1..α_T to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The article's: α_t = sqrt(1 − 0.02·t/T).
    #[default]
    Article,
    /// Ho et al.'s: β^Ho_t = linspace(1e-4, 0.02, T), α_t = sqrt(1 − β^Ho_t).
    Linear,
    /// Nichol & Dhariwal's cosine, s = 0.008: β^Ho_t = min(1 − f(t)/f(t−1), 0.999),
    /// f(t) = cos²((t/T + s)/(1 + s)·π/2).
    Cosine,
}

/// Offset s of the cosine schedule.
const COSINE_OFFSET: f64 = 0.008;
/// Upper bound on β^Ho_t in the cosine schedule (its last steps would otherwise be 1).
const COSINE_MAX_BETA_HO: f64 = 0.999;

/// The four schedule tables, f64, on one device, each of length T+1 (α_0 = 1, β_0 = 0,
/// ᾱ_0 = 1, β̄_0 = 0).
#[derive(Debug)]
pub struct Schedule {
    alpha: Tensor,
    beta: Tensor,
    alpha_bar: Tensor,
    beta_bar: Tensor,
    t_max: i64,
}

impl Clone for Schedule {
    fn clone(&self) -> Self {
        // The tables are never mutated, so sharing their storage is safe.
        Schedule {
            alpha: self.alpha.shallow_clone(),
            beta: self.beta.shallow_clone(),
            alpha_bar: self.alpha_bar.shallow_clone(),
            beta_bar: self.beta_bar.shallow_clone(),
            t_max: self.t_max,
        }
    }
}

impl Schedule {
    /// Builds schedule `kind` with `t_max` = T steps on `device`.
    pub fn new(kind: ScheduleKind, t_max: i64, device: Device) -> Result<Schedule> {
        if t_max < 1 {
            return Err(DdpmError::OutOfRange {
                key: "t_max",
                value: t_max.to_string(),
                expected: "at least 1 (T, the number of steps)".into(),
            });
        }
        let opts = (Kind::Double, device);
        let t = Tensor::arange_start(1, t_max + 1, opts);
        let t_over_t_max = &t / (t_max as f64);
        let beta_ho = match kind {
            ScheduleKind::Article => t_over_t_max * 0.02,
            ScheduleKind::Linear => Tensor::linspace(1e-4, 0.02, t_max, opts),
            ScheduleKind::Cosine => {
                let f = |u: &Tensor| -> Tensor {
                    ((u + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .square()
                };
                let now = f(&t_over_t_max);
                let before = f(&((&t - 1.0) / (t_max as f64)));
                let one_minus_ratio: Tensor = 1.0 - now / before;
                one_minus_ratio.clamp_max(COSINE_MAX_BETA_HO)
            }
        };
        // ln α_t = ½ ln(1 − β^Ho_t), accurate for the tiny β^Ho_t of the first steps.
        let log_alpha = beta_ho.neg().log1p() * 0.5;
        Ok(Self::from_log_alpha(log_alpha, beta_ho.sqrt(), t_max))
    }

    /// Builds the schedule from arbitrary α_1..α_T (a 1-D tensor of length T, any float kind,
    /// each in (0, 1)); the tables are f64 on the tensor's device.
    pub fn from_alphas(alphas: &Tensor) -> Result<Schedule> {
        if alphas.dim() != 1 || alphas.size()[0] < 1 {
            return Err(DdpmError::ShapeMismatch {
                what: "alphas",
                expected: "a non-empty 1-D tensor [T] of α_1..α_T".into(),
                got: alphas.size(),
            });
        }
        let alpha = alphas.f_to_kind(Kind::Double)?;
        let host = Vec::<f64>::try_from(alpha.to_device(Device::Cpu))?;
        if let Some(i) = host.iter().position(|&a| !(a > 0.0 && a < 1.0)) {
            return Err(DdpmError::ScheduleValue {
                name: "alpha",
                t: i + 1,
                value: host[i],
            });
        }
        // β_t² = (1 − α_t)(1 + α_t) keeps its digits when α_t is close to 1.
        let one_minus: Tensor = 1.0 - &alpha;
        let one_plus: Tensor = 1.0 + &alpha;
        let beta = (one_minus * one_plus).sqrt();
        let t_max = alpha.size()[0];
        Ok(Self::from_log_alpha(alpha.log(), beta, t_max))
    }

    fn from_log_alpha(log_alpha: Tensor, beta: Tensor, t_max: i64) -> Schedule {
        let device = log_alpha.device();
        let one = Tensor::ones([1], (Kind::Double, device));
        let zero = Tensor::zeros([1], (Kind::Double, device));
        let cum_log = log_alpha.cumsum(0, Kind::Double);
        let alpha_bar = cum_log.exp();
        // β̄_t = sqrt(1 − exp(2 Σ ln α_i)) = sqrt(−expm1(2 Σ ln α_i)).
        let beta_bar = (&cum_log * 2.0).expm1().neg().sqrt();
        Schedule {
            alpha: Tensor::cat(&[&one, &log_alpha.exp()], 0),
            beta: Tensor::cat(&[&zero, &beta], 0),
            alpha_bar: Tensor::cat(&[&one, &alpha_bar], 0),
            beta_bar: Tensor::cat(&[&zero, &beta_bar], 0),
            t_max,
        }
    }

    /// The sub-chain over visited steps τ_n > … > τ_1 (descending, as `timesteps::strided`
    /// gives them): its step k has α_k = ᾱ_{τ_k}/ᾱ_{τ_{k−1}} (τ_0 = 0), so its ᾱ_k = ᾱ_{τ_k}
    /// and every σ choice and ancestral step applies to it unchanged (strided DDPM).
    pub fn respaced(&self, visited: &[i64]) -> Result<Schedule> {
        let ascending_ok = visited.windows(2).all(|w| w[0] > w[1]);
        let in_range = visited.iter().all(|&t| (1..=self.t_max).contains(&t));
        if visited.is_empty() || !ascending_ok || !in_range {
            return Err(DdpmError::OutOfRange {
                key: "visited",
                value: format!("{visited:?}"),
                expected: format!("distinct, descending steps within 1..={}", self.t_max),
            });
        }
        let mut tau: Vec<i64> = visited.iter().rev().copied().collect();
        tau.insert(0, 0);
        let index = Tensor::from_slice(&tau).to_device(self.device());
        let log_ab = self.alpha_bar.index_select(0, &index).log();
        let n = visited.len() as i64;
        let log_alpha = log_ab.narrow(0, 1, n) - log_ab.narrow(0, 0, n);
        // β_k = sqrt(1 − α_k²) = sqrt(−expm1(2 ln α_k)) keeps its digits when α_k ≈ 1.
        let beta = (&log_alpha * 2.0).expm1().neg().sqrt();
        Ok(Self::from_log_alpha(log_alpha, beta, n))
    }

    /// T, the number of steps.
    pub fn t_max(&self) -> i64 {
        self.t_max
    }

    /// The device the tables live on.
    pub fn device(&self) -> Device {
        self.alpha.device()
    }

    /// This schedule with its tables moved to `device`.
    pub fn to_device(&self, device: Device) -> Schedule {
        Schedule {
            alpha: self.alpha.to_device(device),
            beta: self.beta.to_device(device),
            alpha_bar: self.alpha_bar.to_device(device),
            beta_bar: self.beta_bar.to_device(device),
            t_max: self.t_max,
        }
    }

    /// α_t, t = 0..T (f64, length T+1).
    pub fn alphas(&self) -> &Tensor {
        &self.alpha
    }

    /// β_t = sqrt(1 − α_t²), t = 0..T.
    pub fn betas(&self) -> &Tensor {
        &self.beta
    }

    /// ᾱ_t = ∏_{i≤t} α_i, t = 0..T.
    pub fn alpha_bars(&self) -> &Tensor {
        &self.alpha_bar
    }

    /// β̄_t = sqrt(1 − ᾱ_t²), t = 0..T.
    pub fn beta_bars(&self) -> &Tensor {
        &self.beta_bar
    }

    /// Ho et al.'s α^Ho_t = α_t².
    pub fn ho_alphas(&self) -> Tensor {
        self.alpha.square()
    }

    /// Ho et al.'s β^Ho_t = β_t².
    pub fn ho_betas(&self) -> Tensor {
        self.beta.square()
    }

    /// Ho et al.'s ᾱ^Ho_t = ᾱ_t².
    pub fn ho_alpha_bars(&self) -> Tensor {
        self.alpha_bar.square()
    }

    /// α_t per sample, shaped to broadcast against `like` (see [`gather`]).
    pub fn alpha_at(&self, t: &Tensor, like: &Tensor) -> Result<Tensor> {
        gather(&self.alpha, t, like)
    }

    /// β_t per sample, shaped to broadcast against `like`.
    pub fn beta_at(&self, t: &Tensor, like: &Tensor) -> Result<Tensor> {
        gather(&self.beta, t, like)
    }

    /// ᾱ_t per sample, shaped to broadcast against `like`.
    pub fn alpha_bar_at(&self, t: &Tensor, like: &Tensor) -> Result<Tensor> {
        gather(&self.alpha_bar, t, like)
    }

    /// β̄_t per sample, shaped to broadcast against `like`.
    pub fn beta_bar_at(&self, t: &Tensor, like: &Tensor) -> Result<Tensor> {
        gather(&self.beta_bar, t, like)
    }

    /// Draws t ~ U{1..T} for `batch` samples (Int64 [batch] on `device`).
    pub fn sample_t(&self, batch: i64, device: Device) -> Tensor {
        Tensor::randint_low(1, self.t_max + 1, [batch], (Kind::Int64, device))
    }
}

/// `table[t_b]` for each sample b, as `like`'s kind and device, shaped [B, 1, …, 1] with as
/// many dimensions as `like` (whose first dimension must be B), so it broadcasts over a batch.
pub fn gather(table: &Tensor, t: &Tensor, like: &Tensor) -> Result<Tensor> {
    let b = check_t(t, like)?;
    let mut shape = vec![1i64; like.dim().max(1)];
    shape[0] = b;
    let picked = table.f_index_select(0, &t.f_to_device(table.device())?)?;
    Ok(picked
        .f_to_kind(like.kind())?
        .f_to_device(like.device())?
        .f_view(shape.as_slice())?)
}

/// Checks that `t` is an Int64 tensor [B] matching the batch of `x`; returns B.
pub(crate) fn check_t(t: &Tensor, x: &Tensor) -> Result<i64> {
    if t.kind() != Kind::Int64 || t.dim() != 1 {
        return Err(DdpmError::ShapeMismatch {
            what: "t",
            expected: format!("an Int64 tensor [B] (this one is {:?})", t.kind()),
            got: t.size(),
        });
    }
    let b = t.size()[0];
    if x.dim() == 0 || x.size()[0] != b {
        return Err(DdpmError::ShapeMismatch {
            what: "t",
            expected: format!("one entry per sample of the batch {:?}", x.size()),
            got: t.size(),
        });
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t).unwrap()
    }

    #[test]
    fn article_schedule_matches_its_definition() {
        let s = Schedule::new(ScheduleKind::Article, 1000, Device::Cpu).unwrap();
        let (a, b, ab, bb) = (
            host(s.alphas()),
            host(s.betas()),
            host(s.alpha_bars()),
            host(s.beta_bars()),
        );
        assert_eq!(a.len(), 1001);
        assert_eq!((a[0], b[0], ab[0], bb[0]), (1.0, 0.0, 1.0, 0.0));
        let mut prod = 1.0;
        for t in 1..=1000 {
            let alpha = (1.0 - 0.02 * t as f64 / 1000.0).sqrt();
            prod *= alpha;
            assert!((a[t] - alpha).abs() < 1e-15);
            assert!((b[t] - (1.0 - alpha * alpha).sqrt()).abs() < 1e-12);
            // The running product accumulates ~1e-16 relative error per factor.
            assert!((ab[t] - prod).abs() < 1e-13 * prod.max(1e-300) + 1e-300);
            assert!((bb[t] * bb[t] + ab[t] * ab[t] - 1.0).abs() < 1e-14);
        }
    }

    #[test]
    fn cosine_schedule_is_not_truncated_to_integers() {
        let s = Schedule::new(ScheduleKind::Cosine, 10, Device::Cpu).unwrap();
        let b_ho = host(&s.ho_betas());
        let f = |t: f64| {
            (((t / 10.0) + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        for (t, got) in b_ho.iter().enumerate().take(10).skip(1) {
            let expected = (1.0 - f(t as f64) / f(t as f64 - 1.0)).min(0.999);
            assert!((got - expected).abs() < 1e-14, "t={t}: {got} vs {expected}");
        }
        assert!((b_ho[10] - 0.999).abs() < 1e-14);
    }

    #[test]
    fn linear_schedule_ends_at_its_bounds() {
        let s = Schedule::new(ScheduleKind::Linear, 1000, Device::Cpu).unwrap();
        let b_ho = host(&s.ho_betas());
        assert!((b_ho[1] - 1e-4).abs() < 1e-15 && (b_ho[1000] - 0.02).abs() < 1e-15);
    }

    #[test]
    fn from_alphas_rejects_values_outside_the_open_interval() {
        for (bad, t) in [([0.5, 1.0], 2), ([0.0, 0.5], 1), ([0.5, f64::NAN], 2)] {
            let err = Schedule::from_alphas(&Tensor::from_slice(&bad)).unwrap_err();
            assert!(
                matches!(err, DdpmError::ScheduleValue { name: "alpha", t: i, .. } if i == t),
                "{err}"
            );
        }
        assert!(matches!(
            Schedule::new(ScheduleKind::Article, 0, Device::Cpu),
            Err(DdpmError::OutOfRange { key: "t_max", .. })
        ));
    }

    #[test]
    fn gather_broadcasts_in_the_kind_of_its_input() {
        let s = Schedule::from_alphas(&Tensor::from_slice(&[0.9, 0.8, 0.7])).unwrap();
        let x = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[3i64, 1]);
        let g = s.alpha_bar_at(&t, &x).unwrap();
        assert_eq!(g.size(), vec![2, 1, 1, 1]);
        assert_eq!(g.kind(), Kind::Float);
        let v = Vec::<f32>::try_from(g.flatten(0, -1)).unwrap();
        assert!((v[0] - 0.9 * 0.8 * 0.7).abs() < 1e-6 && (v[1] - 0.9).abs() < 1e-6);
        assert!(s.alpha_at(&Tensor::from_slice(&[1i64]), &x).is_err());
        assert!(s.alpha_at(&Tensor::from_slice(&[4i64, 1]), &x).is_err());
    }
}
