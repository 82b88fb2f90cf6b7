//! `ddpm eval`: the negative ELBO L_T + Σ_{t=2..T} L_{t−1} + L_0 in bits/dim on the run's
//! held-out images, exactly (every t) or as a quick unbiased estimate (a few random t per
//! image, scaled by T).

use crate::bound::{bound_term, negative_elbo, prior_kl};
use crate::checkpoint::{self, LoadedModel, Weights};
use crate::data::Dataset;
use crate::error::{DdpmError, Result};
use crate::marginal::marginal_sample;
use crate::progress::Progress;
use crate::sampler::NoisePredictor;
use crate::schedule::Schedule;
use crate::sigma::SigmaChoice;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// A checkpoint directory, a run directory or a directory of checkpoints.
    pub checkpoint: PathBuf,
    /// Where to compute.
    pub device: Device,
    /// The EMA weights or the raw ones.
    pub weights: Weights,
    /// Evaluate only the first this many held-out images.
    pub limit: Option<usize>,
    /// Images per batch.
    pub batch_size: usize,
    /// `Some(k)`: the quick estimate from k random t per image; `None`: every t.
    pub quick: Option<usize>,
    /// σ_t of the generator (default: the run's `sample.sigma`).
    pub sigma: Option<SigmaChoice>,
    /// Seed of the noise (and of the sampled t of the quick estimate).
    pub seed: u64,
}

/// The result, in bits/dim, averaged over images.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// The checkpoint's step.
    pub step: u64,
    /// Images evaluated.
    pub images: usize,
    /// Whether this is the quick estimate.
    pub quick: bool,
    /// The negative ELBO.
    pub bits_per_dim: f64,
    /// Standard error of that mean over images.
    pub std_error: f64,
    /// L_T's share.
    pub prior: f64,
    /// Σ L_{t−1}'s share (in the quick estimate, L_0 is inside it).
    pub diffusion: f64,
    /// L_0's share (0 in the quick estimate, where it is part of `diffusion`).
    pub decoder: f64,
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.quick {
            write!(
                f,
                "QUICK ESTIMATE (random t, unbiased but noisy) of the negative ELBO at step {}: {:.4} ± {:.4} bits/dim over {} held-out images (L_T {:.4}, T·E_t[L_t] {:.4})",
                self.step, self.bits_per_dim, self.std_error, self.images, self.prior, self.diffusion
            )
        } else {
            write!(
                f,
                "negative ELBO at step {}: {:.4} ± {:.4} bits/dim over {} held-out images (L_T {:.4}, Σ L_(t-1) {:.4}, L_0 {:.4})",
                self.step, self.bits_per_dim, self.std_error, self.images, self.prior, self.diffusion, self.decoder
            )
        }
    }
}

impl EvalOptions {
    /// Fails on settings that cannot work whatever the checkpoint (a batch, a quick estimate
    /// or a limit of 0), before anything is loaded.
    pub fn check(&self) -> Result<()> {
        for (key, value) in [
            ("batch_size", Some(self.batch_size)),
            ("quick", self.quick),
            ("limit", self.limit),
        ] {
            if value == Some(0) {
                return Err(DdpmError::OutOfRange {
                    key,
                    value: "0".into(),
                    expected: "at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

/// Loads the checkpoint and its run's held-out split, then evaluates; `progress` counts
/// model calls.
pub fn evaluate(opts: &EvalOptions, progress: &mut dyn Progress) -> Result<EvalReport> {
    opts.check()?;
    let model = checkpoint::load_model(&opts.checkpoint, opts.device, opts.weights)?;
    let data = crate::data::load_dataset(&model.config)?;
    warn_if_data_changed(&model, &data, progress)?;
    let (_, held_out) = crate::data::split(&model.config, &data)?;
    let held_out = held_out.ok_or_else(|| DdpmError::BadData {
        set: "the held-out split".into(),
        reason:
            "this run held out no images (data.holdout = 0), so there is nothing to evaluate on"
                .into(),
    })?;
    evaluate_loaded(&model, &held_out, opts, progress)
}

/// A warning when the run's data no longer hold what its checkpoint's fingerprint records:
/// the held-out split is then not the one the run held out.
fn warn_if_data_changed(
    model: &LoadedModel,
    data: &Dataset,
    progress: &mut dyn Progress,
) -> Result<()> {
    if let Some(record) = &model.checkpoint.manifest.data {
        if let Some(change) = record.fingerprint.change_to(&data.fingerprint()?) {
            progress.warn(&format!(
                "{} does not hold the data the run was trained on ({change}): the held-out images are not the ones the run held out",
                data.name()
            ));
        }
    }
    Ok(())
}

/// Evaluates a loaded checkpoint on `data` (8-bit images).
pub fn evaluate_loaded(
    model: &LoadedModel,
    data: &Dataset,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<EvalReport> {
    let cfg = &model.config;
    let sigma = opts
        .sigma
        .unwrap_or(cfg.sample.sigma)
        .table(&model.schedule)?;
    let mut report = evaluate_model(&model.net, &model.schedule, &sigma, data, opts, progress)?;
    report.step = model.checkpoint.manifest.step;
    Ok(report)
}

/// Evaluates any noise predictor on `data` (8-bit images), per image in bits/dim.
pub fn evaluate_model<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    sigma: &Tensor,
    data: &Dataset,
    opts: &EvalOptions,
    progress: &mut dyn Progress,
) -> Result<EvalReport> {
    if !data.is_8bit() {
        return Err(DdpmError::BadData {
            set: data.name().to_string(),
            reason: "the bound's decoder L_0 needs 8-bit images; this data set holds real values"
                .into(),
        });
    }
    opts.check()?;
    let n = opts.limit.unwrap_or(data.len()).min(data.len());
    if let Some(per_image) = model.bytes_per_sample() {
        // The bound's terms add a few images' worth a batch to what the network needs.
        let b = opts.batch_size.min(n).max(1) as u64;
        let needed = per_image
            .checked_add(data.item_dim() as u64 * 8 * 8)
            .and_then(|p| p.checked_mul(b));
        crate::memory::check(
            &format!("evaluating a batch of {b} images"),
            needed,
            "batch_size",
            opts.device,
        )?;
    }
    let t_max = schedule.t_max();
    let per_batch = opts.quick.map_or(t_max as u64, |k| k as u64);
    let calls = n.div_ceil(opts.batch_size) as u64 * per_batch;
    progress.start(calls, 0, "model calls");
    let mut done = 0;
    let dims = data.item_dim();
    let nats_to_bits = 1.0 / (dims as f64 * std::f64::consts::LN_2);
    tch::manual_seed(opts.seed as i64);
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for start in (0..n).step_by(opts.batch_size) {
        let idx: Vec<i64> = (start as i64..(start + opts.batch_size).min(n) as i64).collect();
        let x0 = data.batch(&idx)?.f_to_device(opts.device)?;
        let terms = match opts.quick {
            None => {
                let b = negative_elbo(model, schedule, sigma, &x0, |_, _| {
                    done += 1;
                    progress.update(done)
                })?;
                [b.prior, b.diffusion, b.decoder]
            }
            Some(k) => {
                let prior = prior_kl(schedule, &x0)?;
                let sum = tch::no_grad(|| -> Result<Tensor> {
                    let mut sum = prior.f_zeros_like()?;
                    for _ in 0..k {
                        let t = Tensor::f_randint_low(
                            1,
                            t_max + 1,
                            [idx.len() as i64],
                            (Kind::Int64, opts.device),
                        )?;
                        let x_t = marginal_sample(schedule, &x0, &t, &x0.f_randn_like()?)?;
                        let eps_hat = model.predict(&x_t, &t)?;
                        sum = sum.f_add(&bound_term(schedule, sigma, &x0, &t, &x_t, &eps_hat)?)?;
                        done += 1;
                        progress.update(done);
                    }
                    Ok(sum)
                })?;
                let zeros = prior.f_zeros_like()?;
                [prior, sum.f_mul_scalar(t_max as f64 / k as f64)?, zeros]
            }
        };
        let mut bits = Vec::with_capacity(3);
        for t in terms {
            bits.push(
                t.f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Double)?
                    .f_mul_scalar(nats_to_bits)?,
            );
        }
        parts.push(bits);
    }
    progress.finish();
    let column = |i: usize| {
        Tensor::f_cat(
            &parts
                .iter()
                .map(|p| p[i].shallow_clone())
                .collect::<Vec<_>>(),
            0,
        )
    };
    let (prior, diffusion, decoder) = (column(0)?, column(1)?, column(2)?);
    let total = prior.f_add(&diffusion)?.f_add(&decoder)?;
    let mean = |t: &Tensor| {
        t.f_mean(Kind::Double)
            .ok()
            .and_then(|m| f64::try_from(m).ok())
            .unwrap_or(f64::NAN)
    };
    let std_error = if n > 1 {
        total
            .f_std(true)
            .ok()
            .and_then(|s| f64::try_from(s).ok())
            .unwrap_or(f64::NAN)
            / (n as f64).sqrt()
    } else {
        f64::NAN
    };
    Ok(EvalReport {
        step: 0,
        images: n,
        quick: opts.quick.is_some(),
        bits_per_dim: mean(&total),
        std_error,
        prior: mean(&prior),
        diffusion: mean(&diffusion),
        decoder: mean(&decoder),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use crate::schedule::ScheduleKind;

    fn opts(quick: Option<usize>) -> EvalOptions {
        EvalOptions {
            checkpoint: PathBuf::new(),
            device: Device::Cpu,
            weights: Weights::Ema,
            limit: None,
            batch_size: 8,
            quick,
            sigma: None,
            seed: 3,
        }
    }

    #[test]
    fn quick_estimate_agrees_with_the_full_bound() {
        let _guard = crate::sampler::rng_lock();
        // A crude model (ε̂ = β̄_t x_t, optimal for standard-normal data) on 24 tiny images; the
        // full bound sums all T = 50 terms, the quick one samples 40 t per image. Per image,
        // quick − full has at most the quick estimate's variance, so the means agree within
        // 4 of its standard errors (Student t, 23 d.o.f.: significance level ≈ 6e-4).
        let s = Schedule::new(ScheduleKind::Article, 50, Device::Cpu).unwrap();
        let sigma = SigmaChoice::Beta.table(&s).unwrap();
        let px = (Tensor::arange(24 * 16, (Kind::Int64, Device::Cpu)) * 23)
            .remainder(256)
            .to_kind(Kind::Uint8)
            .view([24, 1, 4, 4]);
        let data = Dataset::from_pixels(px, "tiny").unwrap();
        let bb = s.beta_bars().shallow_clone();
        let model = move |x: &Tensor, t: &Tensor| crate::schedule::gather(&bb, t, x).unwrap() * x;
        let full = evaluate_model(&model, &s, &sigma, &data, &opts(None), &mut Silent).unwrap();
        let quick =
            evaluate_model(&model, &s, &sigma, &data, &opts(Some(40)), &mut Silent).unwrap();
        assert!(
            full.bits_per_dim.is_finite() && full.bits_per_dim > 0.0,
            "{full}"
        );
        let diff = (full.bits_per_dim - quick.bits_per_dim).abs();
        assert!(diff < 4.0 * quick.std_error, "{full}\n{quick}");
        assert!(quick.to_string().contains("QUICK ESTIMATE"));
        let real = Dataset::from_values(
            Tensor::zeros([2, 1, 4, 4], (Kind::Float, Device::Cpu)),
            "real",
        )
        .unwrap();
        assert!(evaluate_model(&model, &s, &sigma, &real, &opts(None), &mut Silent).is_err());
    }

    /// Records what `evaluate_model` tells its progress.
    #[derive(Default)]
    struct Calls {
        total: Option<u64>,
        updates: Vec<u64>,
    }

    impl Progress for Calls {
        fn start(&mut self, total: u64, done: u64, _unit: &'static str) {
            assert!(self.total.is_none() && done == 0);
            self.total = Some(total);
        }
        fn update(&mut self, done: u64) {
            self.updates.push(done);
        }
    }

    /// 7 tiny 8-bit images (1×2×2) and T = 5, so batches of 3 leave a partial last batch.
    fn small() -> (Schedule, Tensor, Dataset) {
        let s = Schedule::new(ScheduleKind::Article, 5, Device::Cpu).unwrap();
        let sigma = SigmaChoice::Beta.table(&s).unwrap();
        let px = (Tensor::arange(7 * 4, (Kind::Int64, Device::Cpu)) * 37)
            .remainder(256)
            .to_kind(Kind::Uint8)
            .view([7, 1, 2, 2]);
        (s, sigma, Dataset::from_pixels(px, "small").unwrap())
    }

    #[test]
    fn progress_announces_and_counts_every_model_call() {
        let _guard = crate::sampler::rng_lock();
        let (s, sigma, data) = small();
        let calls = std::cell::Cell::new(0u64);
        let model = |x: &Tensor, _: &Tensor| {
            calls.set(calls.get() + 1);
            x.zeros_like()
        };
        // ⌈7/3⌉ = 3 batches, each T = 5 model calls (full bound) or k = 4 (quick estimate).
        for (quick, want) in [(None, 15u64), (Some(4), 12)] {
            calls.set(0);
            let mut progress = Calls::default();
            let o = EvalOptions {
                batch_size: 3,
                ..opts(quick)
            };
            let report = evaluate_model(&model, &s, &sigma, &data, &o, &mut progress).unwrap();
            assert_eq!(report.images, 7);
            assert_eq!(calls.get(), want, "{quick:?}: model calls");
            assert_eq!(progress.total, Some(want), "{quick:?}: announced total");
            assert_eq!(
                progress.updates,
                (1..=want).collect::<Vec<_>>(),
                "{quick:?}: one update per call, counting up to the total"
            );
        }
    }

    #[test]
    fn quick_estimate_draws_t_uniformly_from_1_to_t_max() {
        let _guard = crate::sampler::rng_lock();
        let (s, sigma, data) = small();
        let seen = std::cell::RefCell::new(vec![0usize; 7]);
        let model = |x: &Tensor, t: &Tensor| {
            for ti in Vec::<i64>::try_from(t).unwrap() {
                seen.borrow_mut()[ti.clamp(0, 6) as usize] += 1;
            }
            x.zeros_like()
        };
        // 7 images × 100 draws = 700 t, each uniform on {1, …, 5} if the estimate is
        // unbiased: every count is 140 ± 5 standard deviations (√(700·0.2·0.8) ≈ 10.6), α ≈ 3e-6
        // (seeded, so the outcome is fixed); t = 0 or t > T is never drawn.
        let o = EvalOptions {
            batch_size: 7,
            ..opts(Some(100))
        };
        evaluate_model(&model, &s, &sigma, &data, &o, &mut Silent).unwrap();
        let seen = seen.into_inner();
        assert_eq!((seen[0], seen[6]), (0, 0), "t outside 1..=T: {seen:?}");
        for (t, &count) in seen.iter().enumerate().take(6).skip(1) {
            assert!(
                (140.0 - count as f64).abs() < 5.0 * 10.6,
                "t = {t} drawn {count} times of 700: {seen:?}"
            );
        }
    }

    /// A predictor that says each image needs 2^40 bytes (1 TiB) and fails if it is called.
    struct Huge;

    impl NoisePredictor for Huge {
        fn predict(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
            panic!("the batch should have been refused before the network ran")
        }

        fn bytes_per_sample(&self) -> Option<u64> {
            Some(1 << 40)
        }
    }

    #[test]
    fn a_batch_that_cannot_fit_is_refused_before_the_network_runs() {
        let s = Schedule::new(ScheduleKind::Article, 10, Device::Cpu).unwrap();
        let sigma = SigmaChoice::Beta.table(&s).unwrap();
        let px = Tensor::zeros([100, 1, 4, 4], (Kind::Uint8, Device::Cpu));
        let data = Dataset::from_pixels(px, "tiny").unwrap();
        let e = evaluate_model(&Huge, &s, &sigma, &data, &opts(None), &mut Silent).unwrap_err();
        assert!(
            matches!(
                e,
                DdpmError::OutOfMemory {
                    key: "batch_size",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("a batch of 8 images"), "{e}");
        // What is asked for: each of the 8 images the network's bytes plus the bound's terms,
        // 8 f64 values of 8 bytes a pixel (16 pixels here).
        let DdpmError::OutOfMemory { needed, .. } = e else {
            unreachable!()
        };
        assert_eq!(needed, 8 * ((1u64 << 40) + 16 * 8 * 8));
        let zero = EvalOptions {
            batch_size: 0,
            ..opts(None)
        };
        assert!(matches!(
            zero.check(),
            Err(DdpmError::OutOfRange {
                key: "batch_size",
                ..
            })
        ));
    }
}
