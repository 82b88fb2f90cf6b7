//! `ddpm score`: one number set for one mnist checkpoint with its run's own sampler, the
//! measure the candidates of issue 15 are compared by. N images are sampled with the run's
//! `sample.*` settings at a given number of steps and scored under the seed-0 classifier
//! (the one `ddpm quality` caches): FD-MNIST against the held-out digits with its bootstrap
//! interval, the confident share (the fraction of samples whose most likely class has
//! probability ≥ [`CONFIDENT`]), H(y|x) and H(ȳ). Beside them, the same scores of real digits:
//! N training images against the held-out ones (the FD floor, as the quality table's), and the
//! held-out digits themselves (the confident-share ceiling: digits the classifier never saw).

use super::classifier::{mnist_split, Classifier, ClassifierRecord, Embedding};
use super::scores::{confident_share, Bootstrap, Interval};
use super::table::{draw, score, train_subset, Score, CONFIDENCE};
use super::{cache_dir, load_classifiers, open_mnist, sampling_weights};
use crate::checkpoint::LoadedModel;
use crate::config::Config;
use crate::data::load_dataset;
use crate::error::{DdpmError, Result};
use crate::grid::{ensure_dir, ensure_writable, save_grid};
use crate::guidance::Balanced;
use crate::progress::Progress;
use crate::sampler::{NoisePredictor, Sampler, SamplerConfig};
use crate::schedule::Schedule;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

/// The confidence a sample's most likely class must reach to count as a digit the classifier
/// names: max_y p(y|x) ≥ 0.9 (issue 15's goal: at least 90 % of samples at this threshold).
pub const CONFIDENT: f64 = 0.9;

/// Name of the report written in the output directory.
pub const REPORT_FILE: &str = "score.json";

/// Name of the grid of the first samples written in the output directory.
pub const GRID_FILE: &str = "grid.png";

/// What [`run`] measures and where it writes; [`ScoreOptions::default`] is the candidates'
/// setting.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOptions {
    /// A checkpoint directory, or a run directory (its newest good checkpoint is used).
    pub checkpoint: PathBuf,
    /// Output directory for score.json and grid.png (none: score/ in the run directory).
    pub out: Option<PathBuf>,
    /// Where the seed-0 classifier is cached (none: quality/ in the run directory, where
    /// `ddpm quality` caches it).
    pub cache: Option<PathBuf>,
    /// Sampling steps (strided below T), in place of the run's `sample.steps`.
    pub steps: usize,
    /// Images sampled (at least 2: a Fréchet distance needs two); the FD floor draws as many
    /// training images.
    pub samples: usize,
    /// Seed of the sampler (batch k uses seed + k), the floor's draw and the bootstrap.
    pub seed: u64,
    /// Images per network batch.
    pub batch: usize,
    /// Bootstrap resamples of the FD interval.
    pub bootstrap: usize,
    /// The confident share's threshold on max_y p(y|x).
    pub threshold: f64,
    /// Images in the grid (the first ones sampled).
    pub grid: usize,
    /// The step rule in place of the run's `sample.sampler` (none: the run's).
    pub sampler: Option<crate::config::SamplerKind>,
    /// A conditional run's guidance weight w in place of its `sample.guidance` (none: the
    /// run's); its samples take every class in turn ([`Balanced`]).
    pub guidance: Option<f64>,
}

impl Default for ScoreOptions {
    /// runs/mnist at 100 steps, 400 samples, seed 0, batches of 200, 200 bootstrap resamples,
    /// threshold [`CONFIDENT`], a 6 × 6 grid.
    fn default() -> Self {
        ScoreOptions {
            checkpoint: PathBuf::from("runs/mnist"),
            out: None,
            cache: None,
            steps: 100,
            samples: 400,
            seed: 0,
            batch: 200,
            bootstrap: 200,
            threshold: CONFIDENT,
            grid: 36,
            sampler: None,
            guidance: None,
        }
    }
}

impl ScoreOptions {
    /// Fails on settings that cannot work whatever the checkpoint, before anything is loaded.
    pub fn check(&self) -> Result<()> {
        let at_least = |key: &'static str, value: usize, min: usize, why: &str| {
            if value < min {
                Err(DdpmError::OutOfRange {
                    key,
                    value: value.to_string(),
                    expected: format!("at least {min}{why}"),
                })
            } else {
                Ok(())
            }
        };
        at_least(
            "samples",
            self.samples,
            2,
            " (a Fréchet distance needs at least 2 images)",
        )?;
        at_least("steps", self.steps, 1, "")?;
        at_least("batch", self.batch, 1, "")?;
        at_least("bootstrap", self.bootstrap, 2, "")?;
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(DdpmError::OutOfRange {
                key: "threshold",
                value: self.threshold.to_string(),
                expected: "in (0, 1]".into(),
            });
        }
        Ok(())
    }

    fn bootstrap(&self) -> Bootstrap {
        Bootstrap {
            reps: self.bootstrap,
            level: CONFIDENCE,
            seed: self.seed,
        }
    }
}

/// The seed-0 classifier's scores of one set of images.
#[derive(Debug, Clone, Serialize)]
pub struct SetScore {
    /// Which images: `generated`, `train` (real training digits) or `heldout`.
    pub split: &'static str,
    /// How many.
    pub images: usize,
    /// FD-MNIST against the held-out digits (none for the held-out digits themselves).
    pub fd: Option<f64>,
    /// Its percentile-bootstrap interval (bias-shifted, see `scores::bootstrap_ci`).
    pub fd_ci: Option<Interval>,
    /// Fraction of images with max_y p(y|x) ≥ the threshold.
    pub confident_share: f64,
    /// Mean H(p(y|x)), nats.
    pub entropy: f64,
    /// H(ȳ) of the mean prediction, nats (ln 10 = 2.303 when the digits are equally frequent).
    pub marginal_entropy: f64,
}

/// What `ddpm score` measured; written as score.json.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    /// The checkpoint directory sampled.
    pub checkpoint: String,
    /// Its training step.
    pub step: u64,
    /// The sampler: the run's `sample.*` settings with `steps` set.
    pub sampler: SamplerConfig,
    /// Sampled with the EMA weights (the run's `sample.ema`).
    pub ema: bool,
    /// A conditional run's guidance weight, its samples taking every class in turn; `None`
    /// for an unconditional run.
    pub guidance: Option<f64>,
    /// Base seed.
    pub seed: u64,
    /// The confident share's threshold.
    pub threshold: f64,
    /// Coverage of the FD intervals.
    pub confidence: f64,
    /// Bootstrap resamples.
    pub bootstrap: usize,
    /// The classifier's cache record (seed 0; its held-out accuracy).
    pub classifier: ClassifierRecord,
    /// The samples.
    pub generated: SetScore,
    /// As many real training images against the held-out ones: the FD floor.
    pub floor: SetScore,
    /// The held-out digits: the ceiling of the confident share.
    pub ceiling: SetScore,
    /// The grid of the first samples, relative to the output directory.
    pub grid: String,
    /// Seconds spent sampling.
    pub sample_seconds: f64,
    /// Seconds of the whole measurement (classifier training or loading included).
    pub seconds: f64,
}

impl ScoreReport {
    /// One line: the samples' FD with its interval against the floor's, the confident shares
    /// of samples and held-out digits, H(y|x).
    pub fn summary(&self) -> String {
        let g = &self.generated;
        let f = &self.floor;
        let interval = |s: &SetScore| {
            s.fd_ci
                .map_or_else(String::new, |ci| format!(" [{:.1}, {:.1}]", ci.lo, ci.hi))
        };
        format!(
            "FD-MNIST {:.2}{} (floor {:.2}{}), confident {:.1} % (held-out digits {:.1} %), \
             H(y|x) {:.3}, H(ȳ) {:.3}; {} samples{} at {} steps from step {}",
            g.fd.unwrap_or(f64::NAN),
            interval(g),
            f.fd.unwrap_or(f64::NAN),
            interval(f),
            100.0 * g.confident_share,
            100.0 * self.ceiling.confident_share,
            g.entropy,
            g.marginal_entropy,
            g.images,
            self.guidance
                .map_or_else(String::new, |w| format!(" (every class in turn, w = {w})")),
            self.sampler.steps.unwrap_or(0),
            self.step,
        )
    }
}

/// The pieces a score is measured with: a noise predictor (the network, or a closure in the
/// tests), its schedule and sampler, the classifier and the real digits.
#[derive(Debug)]
pub struct ScoreContext<'a, M: NoisePredictor + ?Sized> {
    /// The noise predictor.
    pub model: &'a M,
    /// Its schedule.
    pub schedule: &'a Schedule,
    /// The sampler's settings (steps set; the seed is set per batch).
    pub sampler: SamplerConfig,
    /// The seed-0 classifier.
    pub classifier: &'a Classifier,
    /// Training images (model space), for the floor.
    pub train: &'a Tensor,
    /// Held-out images (model space).
    pub heldout: &'a Tensor,
    /// Where to compute.
    pub device: Device,
}

fn set_score(
    split: &'static str,
    sc: Option<&Score>,
    logits: &Tensor,
    images: usize,
    threshold: f64,
) -> Result<SetScore> {
    Ok(SetScore {
        split,
        images,
        fd: sc.map(|s| s.fd),
        fd_ci: sc.map(|s| s.fd_ci),
        confident_share: confident_share(logits, threshold)?,
        entropy: super::scores::mean_entropy(logits)?,
        marginal_entropy: super::scores::marginal_entropy(logits)?,
    })
}

/// The scores [`measure`] returns.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The samples.
    pub generated: SetScore,
    /// The floor: as many training digits against the held-out ones.
    pub floor: SetScore,
    /// The ceiling: the held-out digits.
    pub ceiling: SetScore,
    /// Seconds spent sampling.
    pub sample_seconds: f64,
}

/// Samples `opts.samples` images with `ctx`'s sampler (batch k seeded with seed + k), writes
/// the grid of the first `opts.grid` to `out/grid.png` and scores them, the floor and the
/// ceiling. `progress` hears of the sampling in image-steps (samples × visited steps) and is
/// finished whether or not it succeeds. Nothing but the grid is written.
pub fn measure<M: NoisePredictor + ?Sized>(
    ctx: &ScoreContext<M>,
    opts: &ScoreOptions,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Measured> {
    opts.check()?;
    let sampler = Sampler::new(ctx.schedule, ctx.sampler.clone())?;
    let per_image = sampler.steps().len() as u64;
    let shape = ctx.heldout.size();
    progress.start(opts.samples as u64 * per_image, 0, "image-steps");
    progress.status("sampling");
    let t0 = Instant::now();
    let mut done = 0u64;
    let images = draw(opts.samples, opts.batch, &shape, |k, s| {
        let cfg = SamplerConfig {
            seed: Some((opts.seed + k as u64) as i64),
            ..ctx.sampler.clone()
        };
        Sampler::new(ctx.schedule, cfg)?.sample_with(ctx.model, s, ctx.device, |_, _| {
            done += s[0] as u64;
            progress.update(done);
        })
    });
    progress.finish();
    let images = images?;
    let sample_seconds = t0.elapsed().as_secs_f64();
    let shown = (opts.grid as i64).min(images.size()[0]);
    if shown > 0 {
        save_grid(&images.narrow(0, 0, shown), &out.join(GRID_FILE), None)?;
    }
    let real: Embedding = ctx.classifier.embed(ctx.heldout)?;
    let classifiers = std::slice::from_ref(ctx.classifier);
    let reals = std::slice::from_ref(&real);
    let gen = score(classifiers, reals, &images, opts.bootstrap())?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let train = train_subset(ctx.train, opts.samples, &mut rng);
    let floor = score(classifiers, reals, &train, opts.bootstrap())?;
    Ok(Measured {
        generated: set_score(
            "generated",
            Some(&gen),
            &gen.logits,
            opts.samples,
            opts.threshold,
        )?,
        floor: set_score(
            "train",
            Some(&floor),
            &floor.logits,
            train.size()[0] as usize,
            opts.threshold,
        )?,
        ceiling: set_score(
            "heldout",
            None,
            &real.logits,
            shape[0] as usize,
            opts.threshold,
        )?,
        sample_seconds,
    })
}

/// The sampler of `cfg`'s `sample.*` settings at `steps` steps, `kind` in place of its
/// `sample.sampler` when given (its `sample.eta` then only for DDIM).
fn sampler_at(
    cfg: &Config,
    steps: usize,
    kind: Option<crate::config::SamplerKind>,
) -> SamplerConfig {
    let mut cfg = cfg.clone();
    if let Some(kind) = kind {
        cfg.sample.sampler = Some(kind);
        if kind != crate::config::SamplerKind::Ddim {
            cfg.sample.eta = None;
        }
    }
    SamplerConfig {
        steps: Some(steps),
        ..cfg.sampler(None)
    }
}

/// The output directory: `out` if given, else score/ in the run directory of `ckpt_dir`.
pub fn out_dir(out: Option<&Path>, ckpt_dir: &Path) -> PathBuf {
    out.map_or_else(|| super::run_dir(ckpt_dir).join("score"), Path::to_path_buf)
}

/// `ddpm score`: checks the options, opens the checkpoint (an mnist run, else
/// [`DdpmError::Incompatible`] at `data.source`), checks its outputs can be written, loads the
/// network with the weights the run samples with, loads or trains the seed-0 classifier (the
/// cache `ddpm quality` uses), [`measure`]s and writes score.json.
pub fn run(
    opts: &ScoreOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<ScoreReport> {
    let started = Instant::now();
    opts.check()?;
    let ckpt = open_mnist(&opts.checkpoint, "ddpm score")?;
    let cfg = ckpt.manifest.config.clone();
    let conditional = cfg.model.classes > 0;
    if !conditional && opts.guidance.is_some() {
        return Err(DdpmError::NotConditional {
            what: format!("the checkpoint {}", ckpt.dir.display()),
            reason: "it was trained without labels: model.classes = 0".into(),
            advice: "score it without a guidance weight".into(),
        });
    }
    let w = opts.guidance.unwrap_or(cfg.sample.guidance);
    crate::timesteps::strided(cfg.diffusion.t_max, opts.steps)?;
    let out = out_dir(opts.out.as_deref(), &ckpt.dir);
    ensure_dir(&out)?;
    ensure_writable(&out.join(REPORT_FILE))?;
    ensure_writable(&out.join(GRID_FILE))?;
    let cache = cache_dir(opts.cache.as_deref(), &ckpt.dir);
    let LoadedModel {
        checkpoint: ckpt,
        net,
        schedule,
        ..
    } = ckpt.into_model(device, sampling_weights(&cfg))?;
    let data = load_dataset(&cfg)?;
    let (train, heldout) = mnist_split(&cfg, &data)?;
    let (mut classifiers, mut records) =
        load_classifiers(&cache, 1, &train, &heldout, device, progress)?;
    let (Some(classifier), Some(record)) = (classifiers.pop(), records.pop()) else {
        return Err(DdpmError::OutOfRange {
            key: "classifiers",
            value: "0".into(),
            expected: "one".into(),
        });
    };
    let ctx = ScoreContext {
        model: &net,
        schedule: &schedule,
        sampler: sampler_at(&cfg, opts.steps, opts.sampler),
        classifier: &classifier,
        train: &train.images,
        heldout: &heldout.images,
        device,
    };
    let balanced = Balanced { model: &net, w };
    let Measured {
        generated,
        floor,
        ceiling,
        sample_seconds,
    } = if conditional {
        let ctx = ScoreContext {
            model: &balanced,
            schedule: ctx.schedule,
            sampler: ctx.sampler.clone(),
            classifier: ctx.classifier,
            train: ctx.train,
            heldout: ctx.heldout,
            device,
        };
        measure(&ctx, opts, &out, progress)?
    } else {
        measure(&ctx, opts, &out, progress)?
    };
    let report = ScoreReport {
        checkpoint: ckpt.dir.display().to_string(),
        step: ckpt.manifest.step,
        sampler: ctx.sampler.clone(),
        ema: cfg.sample.ema,
        guidance: conditional.then_some(w),
        seed: opts.seed,
        threshold: opts.threshold,
        confidence: CONFIDENCE,
        bootstrap: opts.bootstrap,
        classifier: record,
        generated,
        floor,
        ceiling,
        grid: GRID_FILE.into(),
        sample_seconds,
        seconds: started.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| DdpmError::Encode {
        what: "the score report",
        cause: e.to_string(),
    })?;
    crate::fsio::write_bytes_atomic(&out.join(REPORT_FILE), text.as_bytes())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use crate::schedule::ScheduleKind;
    use tch::Kind;

    /// The whole measurement on a toy (a closure for the network, T = 10, an untrained
    /// classifier): every set is scored, the grid is written, the held-out set has no FD, and
    /// the same seed gives the same numbers.
    #[test]
    fn a_toy_is_scored_against_its_floor_and_ceiling() {
        let _rng = crate::sampler::rng_lock();
        tch::manual_seed(3);
        let schedule = Schedule::new(ScheduleKind::Article, 10, Device::Cpu).unwrap();
        let o = (Kind::Float, Device::Cpu);
        let heldout = Tensor::rand([9, 1, 28, 28], o) * 2.0 - 1.0;
        let train = Tensor::rand([20, 1, 28, 28], o) * 2.0 - 1.0;
        let classifier = Classifier::untrained(Device::Cpu);
        let model = |x: &Tensor, _t: &Tensor| x * 0.5;
        let ctx = ScoreContext {
            model: &model,
            schedule: &schedule,
            sampler: SamplerConfig {
                steps: Some(5),
                clip_each_step: true,
                ..SamplerConfig::default()
            },
            classifier: &classifier,
            train: &train,
            heldout: &heldout,
            device: Device::Cpu,
        };
        let opts = ScoreOptions {
            samples: 7,
            batch: 3,
            bootstrap: 10,
            grid: 4,
            ..ScoreOptions::default()
        };
        let dir = crate::data::test_dir("score_measure");
        let m = measure(&ctx, &opts, &dir, &mut Silent).unwrap();
        let (g, f, c) = (m.generated, m.floor, m.ceiling);
        assert!(dir.join(GRID_FILE).exists());
        assert_eq!((g.images, f.images, c.images), (7, 7, 9));
        assert_eq!(
            (g.split, f.split, c.split),
            ("generated", "train", "heldout")
        );
        assert!(g.fd.unwrap() > 0.0 && f.fd.unwrap() > 0.0);
        assert!(c.fd.is_none() && c.fd_ci.is_none());
        for s in [&g, &f, &c] {
            assert!((0.0..=1.0).contains(&s.confident_share));
            assert!(s.entropy >= 0.0 && s.entropy <= 10f64.ln() + 1e-9);
        }
        let again = measure(&ctx, &opts, &dir, &mut Silent).unwrap();
        assert_eq!((g.fd, f.fd), (again.generated.fd, again.floor.fd));
        // Settings that cannot work are refused before any sampling.
        let bad = |o: ScoreOptions| measure(&ctx, &o, &dir, &mut Silent).unwrap_err();
        assert!(matches!(
            bad(ScoreOptions {
                samples: 1,
                ..opts.clone()
            }),
            DdpmError::OutOfRange { key: "samples", .. }
        ));
        assert!(matches!(
            bad(ScoreOptions {
                threshold: 0.0,
                ..opts.clone()
            }),
            DdpmError::OutOfRange {
                key: "threshold",
                ..
            }
        ));
    }

    #[test]
    fn the_outputs_default_to_the_run_directory() {
        assert_eq!(
            out_dir(None, Path::new("runs/a/checkpoints/step-0002000")),
            Path::new("runs/a/score")
        );
        assert_eq!(
            out_dir(Some(Path::new("x")), Path::new("runs/a/checkpoints/step-1")),
            Path::new("x")
        );
    }

    #[test]
    fn the_sampler_choice_replaces_the_runs() {
        use crate::config::SamplerKind;
        let mut cfg = Config::preset("mnist").unwrap();
        cfg.sample.eta = Some(0.5);
        let run = sampler_at(&cfg, 10, None);
        assert_eq!(
            (run.eta, run.dpm_solver, run.steps),
            (Some(0.5), false, Some(10))
        );
        let dpm = sampler_at(&cfg, 10, Some(SamplerKind::DpmSolver2M));
        assert_eq!((dpm.eta, dpm.dpm_solver), (None, true));
        let ddim = sampler_at(&cfg, 20, Some(SamplerKind::Ddim));
        assert_eq!(
            (ddim.eta, ddim.dpm_solver, ddim.steps),
            (Some(0.5), false, Some(20))
        );
        cfg.sample.eta = None;
        assert_eq!(sampler_at(&cfg, 20, Some(SamplerKind::Ddim)).eta, Some(0.0));
        let ancestral = sampler_at(&cfg, 20, Some(SamplerKind::Ancestral));
        assert_eq!((ancestral.eta, ancestral.dpm_solver), (None, false));
    }
}
