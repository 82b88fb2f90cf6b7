//! The strided chain T = τ_n > … > τ_1 = 1 (then 0) as a chain of its own
//! (`Schedule::respaced`: α'_k = ᾱ_{τ_k}/ᾱ_{τ_{k−1}}, so ᾱ'_k = ᾱ_{τ_k}), with the network
//! asked at the original step τ_k: what σ tables and the bound need for strided sampling.

use crate::error::Result;
use crate::sampler::NoisePredictor;
use crate::schedule::Schedule;
use crate::timesteps::strided;
use tch::{Kind, Tensor};

/// The n-step chain over the strided steps of a schedule.
#[derive(Debug)]
pub struct Respaced {
    schedule: Schedule,
    taus: Tensor,
}

impl Respaced {
    /// The chain over `strided(T, n)` (n = T gives the original chain).
    pub fn new(schedule: &Schedule, n: usize) -> Result<Respaced> {
        let visited = strided(schedule.t_max(), n)?;
        let mut taus: Vec<i64> = visited.iter().rev().copied().collect();
        taus.insert(0, 0);
        Ok(Respaced {
            schedule: schedule.respaced(&visited)?,
            taus: Tensor::from_slice(&taus).to_device(schedule.device()),
        })
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
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Tensor {
        let tau = self
            .taus
            .to_device(t.device())
            .index_select(0, &t.to_kind(Kind::Int64));
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

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    #[test]
    fn all_steps_is_the_original_chain() {
        let s = Schedule::new(ScheduleKind::Article, 1000, Device::Cpu).unwrap();
        let r = Respaced::new(&s, 1000).unwrap();
        for (a, b) in [
            (r.schedule().alpha(), s.alpha()),
            (r.schedule().beta(), s.beta()),
            (r.schedule().alpha_bar(), s.alpha_bar()),
            (r.schedule().beta_bar(), s.beta_bar()),
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
        assert!(max_diff(r.schedule().alpha_bar(), &r.pick(s.alpha_bar()).unwrap()) < 1e-12);
        assert!(max_diff(r.schedule().beta_bar(), &r.pick(s.beta_bar()).unwrap()) < 1e-12);
        // The first step of the chain is the original first step: σ_1 and the decoder agree
        // (to the rounding of β_1 = sqrt(1 − α_1²) recomputed from α_1 = ᾱ_1/ᾱ_0 near 1).
        let (b1, b1_orig) = (
            r.schedule().beta().double_value(&[1]),
            s.beta().double_value(&[1]),
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
            .predict(&Tensor::zeros([4, 1], (Kind::Float, Device::Cpu)), &k);
        let visited = strided(1000, 50).unwrap();
        let want = [1.0f32, visited[48] as f32, visited[1] as f32, 1000.0];
        assert_eq!(Vec::<f32>::try_from(got.view([-1])).unwrap(), want);
    }
}
