//! Strided subsequences of 1..T for sampling with fewer steps, and the chain over them
//! (`Respaced`: α'_k = ᾱ_{τ_k}/ᾱ_{τ_{k−1}}, so ᾱ'_k = ᾱ_{τ_k}), with the network asked at the
//! original step τ_k: what the strided sampler, its σ tables and the bound walk.

use crate::error::{DdpmError, Result};
use crate::sampler::NoisePredictor;
use crate::schedule::Schedule;
use tch::{Kind, Tensor};

/// The n = `steps` visited steps T = τ_n > … > τ_1 = 1 in descending order, evenly spaced and
/// rounded half up: τ_i = 1 + round((i − 1)(T − 1)/(n − 1)). The sampler then takes a final
/// step from τ_1 = 1 to 0. `n = 1` visits only T (one jump T → 0). Errors when n = 0 or n > T.
pub fn strided(t_max: i64, steps: usize) -> Result<Vec<i64>> {
    if t_max < 1 {
        return Err(DdpmError::OutOfRange {
            key: "t_max",
            value: t_max.to_string(),
            expected: "at least 1 (T, the number of steps)".into(),
        });
    }
    let n = steps;
    let n_i = n as i64;
    if n == 0 || n_i > t_max {
        return Err(DdpmError::OutOfRange {
            key: "steps",
            value: n.to_string(),
            expected: format!("between 1 and T = {t_max} (the number of sampling steps)"),
        });
    }
    if n == 1 {
        return Ok(vec![t_max]);
    }
    // Exact integer rounding: floor((2k(T−1) + (n−1)) / (2(n−1))) = round(k(T−1)/(n−1)).
    // Successive values differ by at least (T−1)/(n−1) ≥ 1, so they are distinct.
    let span = t_max - 1;
    let den = 2 * (n_i - 1);
    Ok((0..n_i)
        .rev()
        .map(|k| 1 + (2 * k * span + (n_i - 1)) / den)
        .collect())
}

/// How the n visited steps are chosen from 1..=T (`sample.spacing`). `Strided` is this
/// project's list ([`strided`]); the other three are diffusers' `timestep_spacing` values of its
/// DDIM and DDPM schedulers, moved from diffusers' 0-based timesteps k to t = k + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    /// τ_i = 1 + round_half_up((i−1)(T−1)/(n−1)): T = τ_n > … > τ_1 = 1.
    #[default]
    Strided,
    /// diffusers' `linspace`: 1 + np.round(np.linspace(0, T−1, n)) (ties to even).
    Linspace,
    /// diffusers' `leading` (steps_offset 0): 1 + i·⌊T/n⌋, i = n−1, …, 0 (never visits T).
    Leading,
    /// diffusers' `trailing`: np.round(T − i·T/n), i = 0, …, n−1 (ends at round(T/n)).
    Trailing,
}

impl Spacing {
    /// Whether this is the default list (the saved configuration leaves it out).
    pub fn is_strided(&self) -> bool {
        *self == Spacing::Strided
    }

    /// The name `sample.spacing` takes.
    pub fn name(self) -> &'static str {
        match self {
            Spacing::Strided => "strided",
            Spacing::Linspace => "linspace",
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
        }
    }
}

/// The n = `steps` visited steps of `spacing`, descending, distinct, within 1..=T (the same
/// checks as [`strided`]).
pub fn spaced(t_max: i64, steps: usize, spacing: Spacing) -> Result<Vec<i64>> {
    let checked = strided(t_max, steps)?;
    let n = steps as i64;
    Ok(match spacing {
        Spacing::Strided => checked,
        Spacing::Linspace => {
            // numpy: i·step + 0 in f64, the last point set to T − 1, rounded half to even.
            let stop = (t_max - 1) as f64;
            if n == 1 {
                return Ok(vec![1]);
            }
            let step = stop / (n - 1) as f64;
            (0..n)
                .rev()
                .map(|i| {
                    let y = if i == n - 1 { stop } else { i as f64 * step };
                    1 + y.round_ties_even() as i64
                })
                .collect()
        }
        Spacing::Leading => (0..n).rev().map(|i| 1 + i * (t_max / n)).collect(),
        Spacing::Trailing => {
            // numpy's arange: start + i·δ, δ = (start + step) − start; the first n values.
            let start = t_max as f64;
            let delta = (start - start / n as f64) - start;
            (0..n)
                .map(|i| (start + i as f64 * delta).round_ties_even() as i64)
                .collect()
        }
    })
}

/// The (τ, τ′) pairs the sampler walks: (τ_n, τ_{n−1}), …, (τ_1, 0).
pub fn step_pairs(steps: &[i64]) -> Vec<(i64, i64)> {
    steps
        .iter()
        .zip(steps.iter().skip(1).chain(std::iter::once(&0)))
        .map(|(&t, &t_prev)| (t, t_prev))
        .collect()
}

/// The n-step chain over the strided steps of a schedule.
#[derive(Debug)]
pub struct Respaced {
    schedule: Schedule,
    visited: Vec<i64>,
    taus: Tensor,
}

impl Respaced {
    /// The chain over `strided(T, n)`; n = T gives the original chain itself (its tables, not
    /// a recomputation of them).
    pub fn new(schedule: &Schedule, n: usize) -> Result<Respaced> {
        Self::spaced(schedule, n, Spacing::Strided)
    }

    /// The chain over `spaced(T, n, spacing)`.
    pub fn spaced(schedule: &Schedule, n: usize, spacing: Spacing) -> Result<Respaced> {
        let visited = spaced(schedule.t_max(), n, spacing)?;
        let mut taus: Vec<i64> = visited.iter().rev().copied().collect();
        taus.insert(0, 0);
        let chain = if n as i64 == schedule.t_max() {
            schedule.clone()
        } else {
            schedule.respaced(&visited)?
        };
        Ok(Respaced {
            schedule: chain,
            visited,
            taus: Tensor::from_slice(&taus).to_device(schedule.device()),
        })
    }

    /// The visited steps τ_n = T > … > τ_1, descending (`strided(T, n)`).
    pub fn visited(&self) -> &[i64] {
        &self.visited
    }

    /// The chain's schedule (T' = n, ᾱ'_i = ᾱ_{τ_i}).
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// τ_0 = 0, τ_1 = 1, …, τ_n = T (Int64 [n+1]).
    pub fn taus(&self) -> &Tensor {
        &self.taus
    }

    /// A per-t table of the original chain (length T+1) read at τ_0..τ_n.
    pub fn pick(&self, table: &Tensor) -> Result<Tensor> {
        Ok(table.f_index_select(0, &self.taus.to_device(table.device()))?)
    }

    /// `model` asked at τ_i when the chain is at step i.
    pub fn model<'a, M: NoisePredictor + ?Sized>(&'a self, model: &'a M) -> RespacedModel<'a, M> {
        RespacedModel {
            inner: model,
            taus: &self.taus,
        }
    }
}

/// A noise predictor of the original chain seen from the respaced one.
#[derive(Debug)]
pub struct RespacedModel<'a, M: ?Sized> {
    inner: &'a M,
    taus: &'a Tensor,
}

impl<M: NoisePredictor + ?Sized> NoisePredictor for RespacedModel<'_, M> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        let tau = self
            .taus
            .f_to_device(t.device())?
            .f_index_select(0, &t.f_to_kind(Kind::Int64)?)?;
        self.inner.predict(x_t, &tau)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        self.inner.check_input(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{rng_lock, Sampler, SamplerConfig};
    use crate::schedule::ScheduleKind;
    use crate::sigma::SigmaChoice;
    use tch::Device;

    #[test]
    fn all_steps_when_n_equals_t() {
        assert_eq!(strided(5, 5).unwrap(), vec![5, 4, 3, 2, 1]);
    }

    #[test]
    fn ends_at_t_and_one_with_distinct_steps() {
        for t_max in [1i64, 2, 7, 10, 999, 1000] {
            for n in 2..=(t_max as usize).min(60) {
                let s = strided(t_max, n).unwrap();
                assert_eq!(s.len(), n);
                assert_eq!((s[0], s[n - 1]), (t_max, 1));
                assert!(s.windows(2).all(|w| w[0] > w[1]), "{t_max} {n}: {s:?}");
            }
        }
    }

    #[test]
    fn rounds_half_up() {
        // (T−1)/(n−1) = 2.5: 1, 3.5, 6, 8.5, 11 → 1, 4, 6, 9, 11.
        assert_eq!(strided(11, 5).unwrap(), vec![11, 9, 6, 4, 1]);
        assert_eq!(strided(1000, 1).unwrap(), vec![1000]);
    }

    #[test]
    fn rejects_impossible_counts() {
        for bad in [0, 11] {
            assert!(matches!(
                strided(10, bad),
                Err(DdpmError::OutOfRange { key: "steps", .. })
            ));
        }
        assert!(matches!(
            strided(0, 1),
            Err(DdpmError::OutOfRange { key: "t_max", .. })
        ));
    }

    #[test]
    fn pairs_end_with_a_step_to_zero() {
        assert_eq!(step_pairs(&[10, 4, 1]), vec![(10, 4), (4, 1), (1, 0)]);
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    #[test]
    fn all_steps_is_the_original_chain() {
        let s = Schedule::new(ScheduleKind::Article, 1000, Device::Cpu).unwrap();
        let r = Respaced::new(&s, 1000).unwrap();
        for (a, b) in [
            (r.schedule().alphas(), s.alphas()),
            (r.schedule().betas(), s.betas()),
            (r.schedule().alpha_bars(), s.alpha_bars()),
            (r.schedule().beta_bars(), s.beta_bars()),
        ] {
            assert!(max_diff(a, b) < 1e-12);
        }
    }

    #[test]
    fn strided_chain_keeps_the_marginals() {
        let s = Schedule::new(ScheduleKind::Cosine, 1000, Device::Cpu).unwrap();
        let r = Respaced::new(&s, 50).unwrap();
        assert_eq!(r.schedule().t_max(), 50);
        assert_eq!(r.taus().size(), vec![51]);
        assert_eq!(
            Vec::<i64>::try_from(r.taus().narrow(0, 0, 2)).unwrap(),
            vec![0, 1]
        );
        assert!(max_diff(r.schedule().alpha_bars(), &r.pick(s.alpha_bars()).unwrap()) < 1e-12);
        assert!(max_diff(r.schedule().beta_bars(), &r.pick(s.beta_bars()).unwrap()) < 1e-12);
        // The first step of the chain is the original first step: σ_1 and the decoder agree
        // (to the rounding of β_1 = sqrt(1 − α_1²) recomputed from α_1 = ᾱ_1/ᾱ_0 near 1).
        let (b1, b1_orig) = (
            r.schedule().betas().double_value(&[1]),
            s.betas().double_value(&[1]),
        );
        assert!((b1 - b1_orig).abs() < 1e-10 * b1_orig, "{b1} vs {b1_orig}");
    }

    /// The table runner hands the sampler σ tables computed on this chain; the sampler's own
    /// strided chain must be the same one, so the draws must match the built-in choice.
    #[test]
    fn sigma_tables_on_this_chain_fit_the_strided_sampler() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 30, Device::Cpu).unwrap();
        let model = |x: &Tensor, _t: &Tensor| x * 0.2;
        let choice = SigmaChoice::Isotropic { data_std: 0.4 };
        let cfg = SamplerConfig {
            seed: Some(8),
            steps: Some(10),
            ..SamplerConfig::default()
        };
        let table = choice
            .table(Respaced::new(&s, 10).unwrap().schedule())
            .unwrap();
        let explicit = Sampler::with_sigma_table(&s, cfg.clone(), &table).unwrap();
        let chosen = Sampler::new(
            &s,
            SamplerConfig {
                sigma: choice,
                ..cfg.clone()
            },
        )
        .unwrap();
        let a = explicit.sample(&model, &[2, 1, 2, 2], Device::Cpu).unwrap();
        let b = chosen.sample(&model, &[2, 1, 2, 2], Device::Cpu).unwrap();
        assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
        assert!(Sampler::with_sigma_table(&s, cfg, &table.narrow(0, 0, 10)).is_err());
    }

    #[test]
    fn the_model_is_asked_at_the_original_step() {
        let s = Schedule::new(ScheduleKind::Article, 1000, Device::Cpu).unwrap();
        let r = Respaced::new(&s, 50).unwrap();
        let echo_t = |x: &Tensor, t: &Tensor| x.zeros_like() + t.to_kind(Kind::Float).view([-1, 1]);
        let k = Tensor::from_slice(&[1i64, 2, 49, 50]);
        let got = r
            .model(&echo_t)
            .predict(&Tensor::zeros([4, 1], (Kind::Float, Device::Cpu)), &k)
            .unwrap();
        let visited = strided(1000, 50).unwrap();
        let want = [1.0f32, visited[48] as f32, visited[1] as f32, 1000.0];
        assert_eq!(Vec::<f32>::try_from(got.view([-1])).unwrap(), want);
    }
}
