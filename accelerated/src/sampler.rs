//! The sampling loop and its one step, [`Sampler::step`]: the article's ancestral step, Ho et
//! al.'s clipped-x̂_0 step (on the full or the respaced chain) and DDIM τ → τ′ (plain or
//! clipped). The property tests in `tests/` hold `Sampler::step` itself to the reference.

use crate::autocast::autocast_bf16;
use crate::dpm_solver::{self, DpmSolver};
use crate::error::{DdpmError, Result};
use crate::marginal::same_shape;
use crate::schedule::Schedule;
use crate::sigma::SigmaChoice;
use crate::timesteps::{step_pairs, Respaced, Spacing};
use tch::{Device, Kind, Tensor};

/// Anything that predicts the noise: ε̂(x_t, t) = (β̄_t/β_t) ε_θ(x_t, t).
pub trait NoisePredictor {
    /// ε̂ for a batch x_t [B, …] and t Int64 [B] (values 1..=T), same shape and kind as x_t;
    /// an error (never a panic) when the batch does not fit the predictor.
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor>;

    /// Errors when the predictor cannot take a batch of this shape (checked before sampling).
    fn check_input(&self, shape: &[i64]) -> Result<()> {
        let _ = shape;
        Ok(())
    }

    /// Bytes one sample of a batch needs while the predictor runs (for the memory check before
    /// sampling, see [`crate::memory`]); `None`: unknown (or more than a u64), no check.
    fn bytes_per_sample(&self) -> Option<u64> {
        None
    }
}

/// Any `Fn(x_t, t) -> ε̂` closure is a noise predictor (handy for tests and oracles).
impl<F: Fn(&Tensor, &Tensor) -> Tensor> NoisePredictor for F {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok(self(x_t, t))
    }
}

/// The generator's mean μ(x_t) = (x_t − (β_t²/β̄_t) ε̂)/α_t, one t per sample (the bound's
/// KL terms and decoder use it; the sampler folds it into [`Sampler::step`]'s coefficients).
pub fn generator_mean(
    schedule: &Schedule,
    x_t: &Tensor,
    t: &Tensor,
    eps_hat: &Tensor,
) -> Result<Tensor> {
    same_shape("x_t", x_t, "eps_hat", eps_hat)?;
    let b = schedule.beta_at(t, x_t)?;
    let bb = schedule.beta_bar_at(t, x_t)?;
    Ok((x_t - b.square() / bb * eps_hat) / schedule.alpha_at(t, x_t)?)
}

fn check_eta(eta: f64) -> Result<()> {
    if (0.0..=1.0).contains(&eta) {
        Ok(())
    } else {
        Err(DdpmError::OutOfRange {
            key: "eta",
            value: eta.to_string(),
            expected: "in [0, 1] (DDIM's η)".into(),
        })
    }
}

/// How to sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerConfig {
    /// σ_t of the ancestral sampler (unused by DDIM, whose σ comes from η).
    pub sigma: SigmaChoice,
    /// Number of visited steps (strided, see `timesteps.rs`); `None` = all T. With fewer than
    /// T the ancestral sampler walks the respaced chain (`Schedule::respaced`), σ chosen on it.
    pub steps: Option<usize>,
    /// `None`: the article's ancestral sampler; `Some(η)`: DDIM with that η.
    pub eta: Option<f64>,
    /// Clip x̂_0 to [−1, 1] at every step (Ho et al.'s sampler).
    pub clip_each_step: bool,
    /// Clip the result to [−1, 1].
    pub clip_final: bool,
    /// Add σ_1 z on the last step (1 → 0); off by default, as Ho et al., so the result is the
    /// decoder's mean.
    pub final_noise: bool,
    /// Seed libtorch's generators with this before sampling.
    pub seed: Option<i64>,
    /// Run the network under bfloat16 autocast on CUDA (ignored on the CPU, as training's
    /// flag); ε̂ comes back in x's kind, so the update of x stays f32.
    #[serde(default)]
    pub bf16: bool,
    /// Run DPM-Solver++(2M) (`dpm_solver.rs`) over `steps` network evaluations in place of the
    /// ancestral or DDIM step; deterministic, so `eta` must be absent and σ is unused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dpm_solver: bool,
    /// Which steps are visited (`timesteps::Spacing`; `Strided`, the default, is the list
    /// above).
    #[serde(default, skip_serializing_if = "Spacing::is_strided")]
    pub spacing: Spacing,
}

impl Default for SamplerConfig {
    /// The article's sampler: ancestral, σ_t = β_t, all T steps, clip only the result.
    fn default() -> Self {
        SamplerConfig {
            sigma: SigmaChoice::Beta,
            steps: None,
            eta: None,
            clip_each_step: false,
            clip_final: true,
            final_noise: false,
            seed: None,
            bf16: false,
            dpm_solver: false,
            spacing: Spacing::Strided,
        }
    }
}

/// One step of the loop with its schedule coefficients as host scalars (every sample of the
/// batch has the same t), so that a step is a few elementwise kernels and reads nothing back.
#[derive(Debug, Clone, Copy)]
enum Update {
    /// x′ = c_x x + c_ε ε̂ + σ z.
    Linear { c_x: f64, c_eps: f64, sigma: f64 },
    /// x̂_0 = clip((x − β̄ ε̂)/ᾱ, −1, 1), x′ = c_0 x̂_0 + c_x x + σ z.
    Clipped {
        beta_bar: f64,
        alpha_bar: f64,
        c_0: f64,
        c_x: f64,
        sigma: f64,
    },
}

impl Update {
    /// The article's step at chain index k: x′ = (x − (β_k²/β̄_k) ε̂)/α_k + σ_k z; clipped,
    /// the posterior mean (ᾱ_{k−1} β_k² x̂_0 + α_k β̄_{k−1}² x)/β̄_k² + σ_k z.
    fn ancestral(chain: &Tables, sigma: &[f64], k: usize, clip: bool) -> Update {
        let (a, b, bb) = (chain.alpha[k], chain.beta[k], chain.beta_bar[k]);
        if clip {
            let bb2 = bb * bb;
            Update::Clipped {
                beta_bar: bb,
                alpha_bar: chain.alpha_bar[k],
                c_0: chain.alpha_bar[k - 1] * b * b / bb2,
                c_x: a * chain.beta_bar[k - 1] * chain.beta_bar[k - 1] / bb2,
                sigma: sigma[k],
            }
        } else {
            Update::Linear {
                c_x: 1.0 / a,
                c_eps: -(b * b / bb) / a,
                sigma: sigma[k],
            }
        }
    }

    /// DDIM τ → τ′: x̂_0 = (x − β̄_τ ε̂)/ᾱ_τ, σ = η (β̄_τ′/β̄_τ) sqrt(1 − ᾱ_τ²/ᾱ_τ′²),
    /// x′ = ᾱ_τ′ x̂_0 + keep ε̂ + σ z with keep = sqrt(β̄_τ′² − σ²); clipped, x̂_0 is clipped
    /// to [−1, 1] and ε̂ replaced by (x − ᾱ_τ x̂_0)/β̄_τ, so that η = 1 is the clipped
    /// posterior step.
    fn ddim(schedule: &Tables, t: usize, t_prev: usize, eta: f64, clip: bool) -> Update {
        let (ab, bb) = (schedule.alpha_bar[t], schedule.beta_bar[t]);
        let (ab_prev, bb_prev) = (schedule.alpha_bar[t_prev], schedule.beta_bar[t_prev]);
        let r = ab / ab_prev;
        let ratio = 1.0 - r * r;
        let sigma = bb_prev / bb * ratio.max(0.0).sqrt() * eta;
        let keep = (bb_prev * bb_prev - sigma * sigma).max(0.0).sqrt();
        if clip {
            Update::Clipped {
                beta_bar: bb,
                alpha_bar: ab,
                c_0: ab_prev - keep * ab / bb,
                c_x: keep / bb,
                sigma,
            }
        } else {
            Update::Linear {
                c_x: ab_prev / ab,
                c_eps: keep - ab_prev * bb / ab,
                sigma,
            }
        }
    }

    /// x′ from x, ε̂ and, when the step adds noise, z.
    fn apply(self, x: &Tensor, eps_hat: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let (mean, sigma) = match self {
            Update::Linear { c_x, c_eps, sigma } => (
                x.f_mul_scalar(c_x)?.f_add(&eps_hat.f_mul_scalar(c_eps)?)?,
                sigma,
            ),
            Update::Clipped {
                beta_bar,
                alpha_bar,
                c_0,
                c_x,
                sigma,
            } => {
                let x0 = x
                    .f_sub(&eps_hat.f_mul_scalar(beta_bar)?)?
                    .f_div_scalar(alpha_bar)?
                    .f_clamp(-1.0, 1.0)?;
                (x0.f_mul_scalar(c_0)?.f_add(&x.f_mul_scalar(c_x)?)?, sigma)
            }
        };
        Ok(match z {
            Some(z) => mean.f_add(&z.f_mul_scalar(sigma)?)?,
            None => mean,
        })
    }
}

/// Host copies of a schedule's f64 tables, index 0 the identity.
struct Tables {
    alpha: Vec<f64>,
    beta: Vec<f64>,
    alpha_bar: Vec<f64>,
    beta_bar: Vec<f64>,
}

impl Tables {
    fn of(schedule: &Schedule) -> Result<Tables> {
        Ok(Tables {
            alpha: host(schedule.alphas())?,
            beta: host(schedule.betas())?,
            alpha_bar: host(schedule.alpha_bars())?,
            beta_bar: host(schedule.beta_bars())?,
        })
    }
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?,
    )?)
}

/// The sampling loop from x_T ~ N(0, I), batched on one device.
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    pairs: Vec<(i64, i64)>,
    /// One update per pair, read from the f64 tables once, here rather than in the loop.
    updates: Vec<Update>,
    /// DPM-Solver++(2M), when `cfg.dpm_solver` (then `updates` is empty).
    dpm: Option<DpmSolver>,
}

impl Sampler {
    /// Prepares the σ table and the visited steps.
    pub fn new(schedule: &Schedule, cfg: SamplerConfig) -> Result<Sampler> {
        Self::build(schedule, cfg, None)
    }

    /// [`Sampler::new`] with an explicit σ table in place of `cfg.sigma`'s, e.g. σ_t estimated
    /// from a trained network: one entry per step of the walked chain plus σ_0 = 0, so T+1
    /// entries for all T steps and n+1 for `steps = Some(n)` (indexed by the respaced k).
    pub fn with_sigma_table(
        schedule: &Schedule,
        cfg: SamplerConfig,
        sigma: &Tensor,
    ) -> Result<Sampler> {
        Self::build(schedule, cfg, Some(sigma))
    }

    /// The walked chain (`schedule` itself for all T steps, else respaced), its σ table, and
    /// the update of each step: the ancestral step at chain index k = n − i (equal to t for all
    /// T steps), or DDIM τ → τ′ on the full schedule.
    fn build(schedule: &Schedule, cfg: SamplerConfig, sigma: Option<&Tensor>) -> Result<Sampler> {
        let t_max = schedule.t_max();
        let n = cfg.steps.unwrap_or(t_max as usize);
        if let Some(eta) = cfg.eta {
            check_eta(eta)?;
        }
        if cfg.dpm_solver {
            return Self::dpm(schedule, cfg, n);
        }
        let respaced = Respaced::spaced(schedule, n, cfg.spacing)?;
        let chain = respaced.schedule();
        let sigma = match sigma {
            None => cfg.sigma.table(chain)?,
            Some(sigma) if sigma.size() == [chain.t_max() + 1] => sigma.f_to_kind(Kind::Double)?,
            Some(sigma) => {
                return Err(DdpmError::ShapeMismatch {
                    what: "sigma table",
                    expected: format!("[{}], one σ per visited step plus σ_0", chain.t_max() + 1),
                    got: sigma.size(),
                })
            }
        };
        let pairs = step_pairs(respaced.visited());
        let clip = cfg.clip_each_step;
        let total = pairs.len();
        let updates = match cfg.eta {
            None => {
                let chain = Tables::of(chain)?;
                let sigma = host(&sigma)?;
                (0..total)
                    .map(|i| Update::ancestral(&chain, &sigma, total - i, clip))
                    .collect()
            }
            Some(eta) => {
                let schedule = Tables::of(schedule)?;
                pairs
                    .iter()
                    .map(|&(t, t_prev)| {
                        Update::ddim(&schedule, t as usize, t_prev as usize, eta, clip)
                    })
                    .collect()
            }
        };
        Ok(Sampler {
            cfg,
            pairs,
            updates,
            dpm: None,
        })
    }

    /// The DPM-Solver++(2M) sampler over n network evaluations.
    fn dpm(schedule: &Schedule, cfg: SamplerConfig, n: usize) -> Result<Sampler> {
        if let Some(eta) = cfg.eta {
            return Err(DdpmError::Incompatible {
                key: "dpm_solver",
                other: format!("eta = {eta}"),
                reason: "DPM-Solver++(2M) is deterministic and takes no η; leave eta out".into(),
            });
        }
        if cfg.steps.is_none() && cfg.spacing != Spacing::Trailing {
            return Err(DdpmError::OutOfRange {
                key: "sample.steps",
                value: format!("absent (all T = {})", schedule.t_max()),
                expected: "a count of network evaluations below T for DPM-Solver++(2M) (10 to 20 is typical)".into(),
            });
        }
        let solver = DpmSolver::new(
            schedule,
            dpm_solver::Config {
                steps: n,
                spacing: cfg.spacing,
                clip_x0: cfg.clip_each_step,
            },
        )?;
        Ok(Sampler {
            cfg,
            pairs: solver.steps().to_vec(),
            updates: Vec::new(),
            dpm: Some(solver),
        })
    }

    /// The DPM-Solver++(2M) solver the loop runs, when `dpm_solver` is set ([`Sampler::step`]
    /// is single-step and refuses its steps: call `DpmSolver::step` with the previous x̂_0).
    pub fn dpm_solver(&self) -> Option<&DpmSolver> {
        self.dpm.as_ref()
    }

    /// The (τ, τ′) steps walked, from (T, ·) down to (·, 0).
    pub fn steps(&self) -> &[(i64, i64)] {
        &self.pairs
    }

    /// Step `i` of the walk (`steps()[i]` = (τ, τ′)): x_τ′ from x_τ [B, …], the prediction
    /// ε̂(x_τ, τ) and the noise z (`None`: no noise, as the loop's last step without
    /// `final_noise`). Every sample of the batch is at the same τ. This is the code the loop
    /// runs, in the kind of `x` (f32 for sampling, f64 for the tests).
    pub fn step(
        &self,
        i: usize,
        x: &Tensor,
        eps_hat: &Tensor,
        z: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.dpm.is_some() {
            return Err(DdpmError::Incompatible {
                key: "dpm_solver",
                other: "Sampler::step".into(),
                reason: "DPM-Solver++(2M) is multistep: call Sampler::dpm_solver().step with the previous x̂_0".into(),
            });
        }
        let update = self.updates.get(i).ok_or_else(|| DdpmError::OutOfRange {
            key: "i",
            value: i.to_string(),
            expected: format!("below {}, the number of steps walked", self.updates.len()),
        })?;
        same_shape("x_t", x, "eps_hat", eps_hat)?;
        if let Some(z) = z {
            same_shape("x_t", x, "z", z)?;
        }
        update.apply(x, eps_hat, z)
    }

    /// Samples a batch of `shape` = [B, …] (Float) on `device`.
    pub fn sample<M: NoisePredictor + ?Sized>(
        &self,
        model: &M,
        shape: &[i64],
        device: Device,
    ) -> Result<Tensor> {
        self.sample_with(model, shape, device, |_, _| {})
    }

    /// [`Sampler::sample`], calling `on_step(done, total)` after each step. Nothing in the loop
    /// waits for the device, so on CUDA the callback runs ahead of the computation.
    pub fn sample_with<M: NoisePredictor + ?Sized>(
        &self,
        model: &M,
        shape: &[i64],
        device: Device,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.run(model, shape, (Kind::Float, device), None, on_step)
    }

    /// [`Sampler::sample_with`] from the given x_T [B, …] (e.g. latents from DDIM inversion,
    /// `crate::invert`) in place of fresh noise; the noise z of the steps that add some is
    /// still drawn from libtorch's generator. Runs in Float on x_T's device.
    pub fn sample_from<M: NoisePredictor + ?Sized>(
        &self,
        model: &M,
        x_t: &Tensor,
        on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let opts = (Kind::Float, x_t.device());
        self.run(model, &x_t.size(), opts, Some(x_t), on_step)
    }

    /// The loop with x of `opts`' kind on its device (f32 for sampling; f64 lets the unit tests
    /// hold it to its own steps with the same draws).
    fn run<M: NoisePredictor + ?Sized>(
        &self,
        model: &M,
        shape: &[i64],
        opts: (Kind, Device),
        start: Option<&Tensor>,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        model.check_input(shape)?;
        if shape.is_empty() {
            return Err(DdpmError::ShapeMismatch {
                what: "sample shape",
                expected: "[B, …] with a batch dimension".into(),
                got: Vec::new(),
            });
        }
        if let Some(seed) = self.cfg.seed {
            tch::manual_seed(seed);
        }
        let (kind, device) = opts;
        let b = shape[0];
        tch::no_grad(|| {
            let mut x = match start {
                Some(x) => x.f_to_kind(kind)?,
                None => Tensor::f_randn(shape, opts)?,
            };
            let total = self.pairs.len();
            let mut prev_x0: Option<Tensor> = None;
            for (i, &(t, t_prev)) in self.pairs.iter().enumerate() {
                let t_vec = Tensor::f_full([b], t, (Kind::Int64, device))?;
                let eps_hat = autocast_bf16(self.cfg.bf16, device, || model.predict(&x, &t_vec))?
                    .f_to_kind(kind)?;
                if let Some(dpm) = &self.dpm {
                    let prev = prev_x0.as_ref().filter(|_| dpm.is_second_order(i));
                    let (next, x0) = dpm.step(i, &x, &eps_hat, prev)?;
                    (x, prev_x0) = (next, Some(x0));
                    on_step(i + 1, total);
                    continue;
                }
                let z = match t_prev > 0 || self.cfg.final_noise {
                    true => Some(Tensor::f_randn(shape, opts)?),
                    false => None,
                };
                x = self.step(i, &x, &eps_hat, z.as_ref())?;
                on_step(i + 1, total);
            }
            Ok(if self.cfg.clip_final {
                x.f_clamp(-1.0, 1.0)?
            } else {
                x
            })
        })
    }
}

/// libtorch has one global generator, so a unit test that needs seeded draws to repeat must
/// hold this lock, and so must every unit test that draws random numbers meanwhile.
#[cfg(test)]
pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    fn sampler(
        s: &Schedule,
        sigma: SigmaChoice,
        steps: Option<usize>,
        eta: Option<f64>,
        clip: bool,
    ) -> Sampler {
        let cfg = SamplerConfig {
            sigma,
            steps,
            eta,
            clip_each_step: clip,
            ..SamplerConfig::default()
        };
        Sampler::new(s, cfg).unwrap()
    }

    #[test]
    fn ddim_with_eta_one_is_the_posterior_step() {
        let _rng = rng_lock();
        tch::manual_seed(1);
        let s = Schedule::new(ScheduleKind::Article, 100, Device::Cpu).unwrap();
        for clip in [false, true] {
            let ddim = sampler(&s, SigmaChoice::Beta, None, Some(1.0), clip);
            let ancestral = sampler(&s, SigmaChoice::Posterior, None, None, clip);
            for t in [1usize, 2, 50, 100] {
                let i = 100 - t;
                let (x, eps_hat, z) = (randn(&[4, 3]), randn(&[4, 3]), randn(&[4, 3]));
                let a = ddim.step(i, &x, &eps_hat, Some(&z)).unwrap();
                let b = ancestral.step(i, &x, &eps_hat, Some(&z)).unwrap();
                assert!(max_diff(&a, &b) < 1e-10, "t = {t}, clip {clip}");
            }
        }
    }

    #[test]
    fn strided_ddim_with_eta_one_is_the_strided_posterior() {
        let _rng = rng_lock();
        // With α_{τ|τ′} = ᾱ_τ/ᾱ_τ′ and β_{τ|τ′}² = 1 − α_{τ|τ′}², η = 1 samples the posterior
        // p(x_τ′|x_τ, x̂_0): mean (ᾱ_τ′ β_{τ|τ′}² x̂_0 + α_{τ|τ′} β̄_τ′² x_τ)/β̄_τ²,
        // std β̄_τ′ β_{τ|τ′}/β̄_τ.
        tch::manual_seed(2);
        let s = Schedule::new(ScheduleKind::Cosine, 1000, Device::Cpu).unwrap();
        let ddim = sampler(&s, SigmaChoice::Beta, Some(6), Some(1.0), false);
        let table = |v: &Tensor, t: i64| v.double_value(&[t]);
        for (i, &(t, prev)) in ddim.steps().iter().enumerate() {
            let (x, eps_hat, z) = (randn(&[2, 5]), randn(&[2, 5]), randn(&[2, 5]));
            let got = ddim.step(i, &x, &eps_hat, Some(&z)).unwrap();
            let (ab, ab_p) = (table(s.alpha_bars(), t), table(s.alpha_bars(), prev));
            let (bb, bb_p) = (table(s.beta_bars(), t), table(s.beta_bars(), prev));
            let a_step = ab / ab_p;
            let b2_step = 1.0 - a_step * a_step;
            let x0 = (&x - &eps_hat * bb) / ab;
            let mean = (x0 * (ab_p * b2_step) + &x * (a_step * bb_p * bb_p)) / (bb * bb);
            let expected = mean + &z * (bb_p * b2_step.sqrt() / bb);
            assert!(max_diff(&got, &expected) < 1e-10, "{t} -> {prev}");
        }
        let bad = SamplerConfig {
            eta: Some(1.5),
            ..SamplerConfig::default()
        };
        assert!(matches!(
            Sampler::new(&s, bad),
            Err(DdpmError::OutOfRange { key: "eta", .. })
        ));
    }

    #[test]
    fn deterministic_ddim_ignores_the_noise() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Linear, 50, Device::Cpu).unwrap();
        let ddim = sampler(&s, SigmaChoice::Beta, Some(9), Some(0.0), false);
        for i in 0..ddim.steps().len() {
            let (x, eps_hat) = (randn(&[3, 2]), randn(&[3, 2]));
            let a = ddim.step(i, &x, &eps_hat, Some(&randn(&[3, 2]))).unwrap();
            let b = ddim.step(i, &x, &eps_hat, Some(&randn(&[3, 2]))).unwrap();
            let c = ddim.step(i, &x, &eps_hat, None).unwrap();
            assert_eq!(max_diff(&a, &b), 0.0);
            assert_eq!(max_diff(&a, &c), 0.0);
        }
    }

    #[test]
    fn step_checks_its_arguments() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 10, Device::Cpu).unwrap();
        let full = sampler(&s, SigmaChoice::Beta, None, None, false);
        let x = randn(&[2, 3]);
        assert!(matches!(
            full.step(10, &x, &x, None),
            Err(DdpmError::OutOfRange { key: "i", .. })
        ));
        assert!(matches!(
            full.step(0, &x, &randn(&[2, 4]), None),
            Err(DdpmError::ShapeMismatch {
                what: "eps_hat",
                ..
            })
        ));
        assert!(matches!(
            full.step(0, &x, &x, Some(&randn(&[3, 3]))),
            Err(DdpmError::ShapeMismatch { what: "z", .. })
        ));
        assert!(full.step(9, &x, &x, Some(&x)).is_ok());
    }

    #[test]
    fn sampler_is_reproducible_and_walks_every_step() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 20, Device::Cpu).unwrap();
        let model = |x: &Tensor, _t: &Tensor| x * 0.1;
        let cfg = SamplerConfig {
            seed: Some(7),
            ..SamplerConfig::default()
        };
        let sampler = Sampler::new(&s, cfg.clone()).unwrap();
        let mut seen = Vec::new();
        let a = sampler
            .sample_with(&model, &[3, 1, 2, 2], Device::Cpu, |i, n| seen.push((i, n)))
            .unwrap();
        let b = sampler.sample(&model, &[3, 1, 2, 2], Device::Cpu).unwrap();
        assert_eq!(seen.len(), 20);
        assert_eq!(seen[19], (20, 20));
        assert_eq!(max_diff(&a, &b), 0.0);
        assert!(f64::try_from(a.abs().max()).unwrap() <= 1.0);
        let strided = Sampler::new(
            &s,
            SamplerConfig {
                steps: Some(5),
                eta: Some(0.0),
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_eq!(
            strided.steps(),
            &[
                (20, 15),
                (15, piece(20, 5, 2)),
                (piece(20, 5, 2), piece(20, 5, 1)),
                (piece(20, 5, 1), 1),
                (1, 0)
            ]
        );
    }

    /// Progress (`on_step(done, total)`) counts every step once, in order, ending at the total,
    /// for each step rule: ancestral, DDIM and DPM-Solver++(2M) (whose loop is its own branch).
    #[test]
    fn every_step_rule_reports_each_step_once_in_order() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 20, Device::Cpu).unwrap();
        let model = |x: &Tensor, _t: &Tensor| x * 0.1;
        let rules = [
            SamplerConfig::default(),
            SamplerConfig {
                steps: Some(5),
                eta: Some(0.0),
                ..SamplerConfig::default()
            },
            SamplerConfig {
                steps: Some(6),
                dpm_solver: true,
                ..SamplerConfig::default()
            },
        ];
        for cfg in rules {
            let sampler = Sampler::new(&s, cfg.clone()).unwrap();
            let n = sampler.steps().len();
            let mut seen = Vec::new();
            let _ = sampler
                .sample_with(&model, &[2, 1, 2, 2], Device::Cpu, |i, total| {
                    seen.push((i, total))
                })
                .unwrap();
            let want: Vec<(usize, usize)> = (1..=n).map(|i| (i, n)).collect();
            assert_eq!(seen, want, "{cfg:?}");
        }
    }

    /// Strided DDPM two ways: the ancestral step on the respaced chain with the posterior σ, and
    /// DDIM with η = 1, are the same formula; in f64 with the same noise they must agree.
    #[test]
    fn respaced_posterior_step_equals_ddim_eta_one() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Cosine, 50, Device::Cpu).unwrap();
        for clip in [false, true] {
            let ancestral = sampler(&s, SigmaChoice::Posterior, Some(7), None, clip);
            let ddim = sampler(&s, SigmaChoice::Beta, Some(7), Some(1.0), clip);
            assert_eq!(ancestral.steps(), ddim.steps());
            for (i, &(t, t_prev)) in ancestral.steps().iter().enumerate() {
                let (x, eps_hat, z) = (randn(&[4, 3]), randn(&[4, 3]), randn(&[4, 3]));
                let a = ancestral.step(i, &x, &eps_hat, Some(&z)).unwrap();
                let b = ddim.step(i, &x, &eps_hat, Some(&z)).unwrap();
                assert!(
                    max_diff(&a, &b) < 1e-9,
                    "step {t} -> {t_prev}, clip {clip}: {}",
                    max_diff(&a, &b)
                );
            }
        }
    }

    #[test]
    fn respaced_chain_keeps_alpha_bar_at_visited_steps() {
        let s = Schedule::new(ScheduleKind::Article, 30, Device::Cpu).unwrap();
        let visited = crate::timesteps::strided(30, 4).unwrap();
        let r = s.respaced(&visited).unwrap();
        for (k, &tau) in visited.iter().rev().enumerate() {
            let (a, b) = (
                r.alpha_bars().double_value(&[k as i64 + 1]),
                s.alpha_bars().double_value(&[tau]),
            );
            assert!((a - b).abs() < 1e-14, "k = {}: {a} vs {b}", k + 1);
        }
        let full = s
            .respaced(&crate::timesteps::strided(30, 30).unwrap())
            .unwrap();
        assert!(max_diff(full.alphas(), s.alphas()) < 1e-14);
        assert!(s.respaced(&[3, 5]).is_err());
        assert!(s.respaced(&[31]).is_err());
    }

    /// The loop in f64 equals its steps chained by hand with the noise drawn in the same order
    /// as [`Sampler::run`] (seeded, so the draws repeat): the loop adds only the model calls, the
    /// noise schedule (none on the last step unless `final_noise`) and the final clip. With
    /// states up to |x| ≈ 16 the two differ by nothing but the order of a few roundings; 1e-12
    /// is far below the ~1e-2 a skipped or repeated step moves the result.
    #[test]
    fn loop_equals_its_steps() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 200, Device::Cpu).unwrap();
        // A t-dependent predictor that pushes x̂_0 beyond [−1, 1] so that clipping acts.
        let model = |x: &Tensor, t: &Tensor| {
            let t = t.to_kind(Kind::Double).view([-1, 1]) / 200.0;
            (x * 1.3).sin() * (t + 0.5) - x * 0.2
        };
        let shape = [6, 5];
        let opts = (Kind::Double, Device::Cpu);
        let (beta, posterior) = (SigmaChoice::Beta, SigmaChoice::Posterior);
        let runs = [
            ("ancestral, σ = β", None, None, false, beta),
            (
                "ancestral clipped, posterior σ",
                None,
                None,
                true,
                posterior,
            ),
            ("respaced ancestral", Some(23), None, false, beta),
            (
                "respaced ancestral clipped",
                Some(23),
                None,
                true,
                posterior,
            ),
            ("DDIM η = 0.5", Some(17), Some(0.5), false, beta),
            ("DDIM η = 1 clipped", Some(17), Some(1.0), true, beta),
            ("DDIM η = 0, all T", None, Some(0.0), false, beta),
        ];
        for (i, (name, steps, eta, clip, sigma)) in runs.into_iter().enumerate() {
            for final_noise in [false, true] {
                let cfg = SamplerConfig {
                    sigma,
                    steps,
                    eta,
                    clip_each_step: clip,
                    clip_final: false,
                    final_noise,
                    seed: Some(40 + i as i64),
                    bf16: true,
                    ..SamplerConfig::default()
                };
                let sampler = Sampler::new(&s, cfg).unwrap();
                let fast = sampler.run(&model, &shape, opts, None, |_, _| {}).unwrap();
                tch::manual_seed(40 + i as i64);
                let mut x = Tensor::randn(shape, opts);
                for (j, &(t, t_prev)) in sampler.steps().iter().enumerate() {
                    let eps_hat = model(&x, &Tensor::full([6], t, (Kind::Int64, Device::Cpu)));
                    let z = (t_prev > 0 || final_noise).then(|| Tensor::randn(shape, opts));
                    x = sampler.step(j, &x, &eps_hat, z.as_ref()).unwrap();
                }
                let diff = max_diff(&fast, &x);
                assert!(diff <= 1e-12, "{name}, final noise {final_noise}: {diff:e}");
                assert!(
                    f64::try_from(fast.abs().max()).unwrap() > 0.1,
                    "{name}: trivial"
                );
            }
        }
    }

    #[test]
    fn bf16_is_ignored_on_the_cpu() {
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Cosine, 30, Device::Cpu).unwrap();
        let model = |x: &Tensor, _t: &Tensor| x * 0.3;
        let cfg = SamplerConfig {
            seed: Some(5),
            ..SamplerConfig::default()
        };
        let plain = Sampler::new(&s, cfg.clone()).unwrap();
        let bf16 = Sampler::new(&s, SamplerConfig { bf16: true, ..cfg }).unwrap();
        let (a, b) = (
            plain.sample(&model, &[2, 3], Device::Cpu).unwrap(),
            bf16.sample(&model, &[2, 3], Device::Cpu).unwrap(),
        );
        assert_eq!(a.kind(), Kind::Float);
        assert_eq!(max_diff(&a, &b), 0.0);
    }

    /// τ_i of `strided(t_max, n)`, i counted from 0 at τ = 1.
    fn piece(t_max: i64, n: usize, i: usize) -> i64 {
        crate::timesteps::strided(t_max, n).unwrap()[n - 1 - i]
    }
}
