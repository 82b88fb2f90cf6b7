//! `ddpm guidance`: how classifier-free guidance trades class fidelity for diversity on a
//! conditional mnist run. For each weight w (default 0, 0.5, 1, 2, 4) and the run's sampler at
//! 100 steps, `per_class` images of each digit are drawn with ε̂ = (1 + w) ε̂(x_t, y) −
//! w ε̂(x_t, ∅) and scored under the seed-0 classifier that `ddpm quality` and `ddpm score`
//! cache: the share of samples it assigns to the class asked for, FD-MNIST of all samples
//! against the held-out digits and of each class's samples against that class's held-out
//! digits, and a grid per w (one row a class). Writes `guidance.json` and `guidance.md`.

use super::classifier::{mnist_split, Classifier, Labelled};
use super::frechet::frechet_between;
use super::{cache_dir, load_classifiers, open_mnist, sampling_weights};
use crate::checkpoint::LoadedModel;
use crate::config::Config;
use crate::data::load_dataset;
use crate::error::{DdpmError, Result};
use crate::generate::{class_rows, generate_each_class, SampleOptions};
use crate::grid::{ensure_dir, save_grid};
use crate::guidance::ConditionalPredictor;
use crate::progress::Progress;
use crate::sampler::NoisePredictor;
use crate::schedule::Schedule;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The weights of the table.
pub const WEIGHTS: [f64; 5] = [0.0, 0.5, 1.0, 2.0, 4.0];

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct GuidanceOptions {
    /// A checkpoint or run directory of a conditional mnist run.
    pub checkpoint: PathBuf,
    /// Output directory [default: guidance/ in the run directory].
    pub out: Option<PathBuf>,
    /// Where the seed-0 classifier is cached [default: quality/ in the run directory].
    pub cache: Option<PathBuf>,
    /// The guidance weights w, each finite and at least 0.
    pub weights: Vec<f64>,
    /// Sampling steps (strided below T).
    pub steps: usize,
    /// Images drawn of each class for each w (at least 2, for a per-class FD).
    pub per_class: usize,
    /// Seed of the sampler (the same noise for every w).
    pub seed: u64,
    /// Images a class in each grid (the first ones drawn).
    pub grid: usize,
}

impl Default for GuidanceOptions {
    fn default() -> Self {
        GuidanceOptions {
            checkpoint: PathBuf::from("runs/mnist"),
            out: None,
            cache: None,
            weights: WEIGHTS.to_vec(),
            steps: 100,
            per_class: 100,
            seed: 0,
            grid: 10,
        }
    }
}

impl GuidanceOptions {
    /// Refuses what can only fail, before any work.
    pub fn check(&self) -> Result<()> {
        if self.weights.is_empty() {
            return Err(DdpmError::OutOfRange {
                key: "weights",
                value: "[]".into(),
                expected: "at least one guidance weight".into(),
            });
        }
        if let Some(w) = self.weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(DdpmError::OutOfRange {
                key: "weights",
                value: w.to_string(),
                expected: "finite and at least 0".into(),
            });
        }
        if self.per_class < 2 {
            return Err(DdpmError::OutOfRange {
                key: "per_class",
                value: self.per_class.to_string(),
                expected: "at least 2 (a Fréchet distance needs a covariance)".into(),
            });
        }
        if self.steps == 0 {
            return Err(DdpmError::OutOfRange {
                key: "steps",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        Ok(())
    }
}

/// One weight's scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuidanceRow {
    /// The guidance weight.
    pub w: f64,
    /// Share of the samples the classifier assigns to the class asked for.
    pub accuracy: f64,
    /// Each class's share, in class order.
    pub accuracy_per_class: Vec<f64>,
    /// FD-MNIST of all samples against all held-out digits.
    pub fd: f64,
    /// FD-MNIST of each class's samples against its held-out digits (`None` where the class
    /// has fewer than 2 held-out digits).
    pub fd_per_class: Vec<Option<f64>>,
    /// The grid's file name in the output directory.
    pub grid: String,
}

/// What `ddpm guidance` writes to `guidance.json`.
#[derive(Debug, Clone, Serialize)]
pub struct GuidanceReport {
    /// The checkpoint measured.
    pub checkpoint: String,
    /// Its training step.
    pub step: u64,
    /// Sampling steps.
    pub steps: usize,
    /// Images a class for each w.
    pub per_class: usize,
    /// The sampler's seed.
    pub seed: u64,
    /// The classifier's held-out accuracy on real digits (the ceiling of `accuracy`).
    pub classifier_accuracy: f64,
    /// One row a weight.
    pub rows: Vec<GuidanceRow>,
    /// Seconds in all.
    pub seconds: f64,
}

impl GuidanceReport {
    /// The table as Markdown: w, class accuracy, FD overall, FD of each class.
    pub fn markdown(&self) -> String {
        let k = self.rows.first().map_or(0, |r| r.fd_per_class.len());
        let mut text = format!(
            "{} (step {}), {} steps, {} images a class, seed {}; the classifier's accuracy on held-out digits: {:.1} %\n\n| w | class accuracy | FD-MNIST |",
            self.checkpoint, self.step, self.steps, self.per_class, self.seed, 100.0 * self.classifier_accuracy
        );
        for c in 0..k {
            text.push_str(&format!(" FD {c} |"));
        }
        text.push_str(" grid |\n|---|---|---|");
        text.push_str(&"---|".repeat(k + 1));
        text.push('\n');
        for r in &self.rows {
            text.push_str(&format!(
                "| {} | {:.1} % | {:.1} |",
                r.w,
                100.0 * r.accuracy,
                r.fd
            ));
            for fd in &r.fd_per_class {
                text.push_str(&fd.map_or(" — |".into(), |f| format!(" {f:.1} |")));
            }
            text.push_str(&format!(" {} |\n", r.grid));
        }
        text
    }
}

/// The grid file of weight `w`.
pub fn grid_name(w: f64) -> String {
    format!("guidance-w{w}.png")
}

/// The features of the rows of `e` whose label is `k`.
fn rows_of(features: &Tensor, labels: &Tensor, k: i64) -> Result<Tensor> {
    let idx = labels.f_eq(k)?.f_nonzero()?.f_squeeze_dim(1)?;
    Ok(features.f_index_select(0, &idx)?)
}

/// Draws and scores every weight of `opts` with `model` (K = `model.classes()` classes, the
/// classifier's labels) under `schedule` and `cfg`'s sampler at `opts.steps`, against the
/// held-out digits `heldout`; writes each grid to `out`.
#[allow(clippy::too_many_arguments)]
pub fn measure<M: NoisePredictor + ConditionalPredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    cfg: &Config,
    classifier: &Classifier,
    heldout: &Labelled,
    opts: &GuidanceOptions,
    out: &Path,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Vec<GuidanceRow>> {
    opts.check()?;
    let k = model.classes() as i64;
    let classes: Vec<i64> = (0..k).collect();
    let labels = class_rows(&classes, opts.per_class);
    let y = Tensor::from_slice(&labels);
    let real = classifier.embed(&heldout.images)?;
    let real_labels = heldout.labels.f_to_device(Device::Cpu)?;
    let mut rows = Vec::new();
    for &w in &opts.weights {
        let mut cfg = cfg.clone();
        cfg.sample.guidance = w;
        cfg.sample.steps = Some(opts.steps);
        let sample = SampleOptions {
            n: labels.len(),
            seed: opts.seed as i64,
            ..SampleOptions::default()
        };
        let mut kept = Vec::new();
        progress.status(&format!("w = {w}"));
        generate_each_class(
            model,
            &labels,
            schedule,
            &cfg,
            &sample,
            device,
            progress,
            &mut |_, images| {
                kept.push(images.f_to_device(Device::Cpu)?);
                Ok(())
            },
        )?;
        let images = Tensor::f_cat(&kept, 0)?;
        let shown = opts.grid.min(opts.per_class) as i64;
        let grid = grid_name(w);
        if shown > 0 {
            let per = opts.per_class as i64;
            let picked: Vec<Tensor> = (0..k)
                .map(|c| images.f_narrow(0, c * per, shown))
                .collect::<std::result::Result<_, _>>()?;
            save_grid(&Tensor::f_cat(&picked, 0)?, &out.join(&grid), Some(shown))?;
        }
        let gen = classifier.embed(&images)?;
        let hit = gen.logits.f_argmax(-1, false)?.f_eq_tensor(&y)?;
        let share = |t: &Tensor| -> Result<f64> {
            Ok(f64::try_from(
                t.f_to_kind(Kind::Double)?.f_mean(Kind::Double)?,
            )?)
        };
        let per = opts.per_class as i64;
        let accuracy_per_class = (0..k)
            .map(|c| share(&hit.f_narrow(0, c * per, per)?))
            .collect::<Result<Vec<f64>>>()?;
        let fd_per_class = (0..k)
            .map(|c| {
                let r = rows_of(&real.features, &real_labels, c)?;
                if r.size()[0] < 2 {
                    return Ok(None);
                }
                Ok(Some(frechet_between(&rows_of(&gen.features, &y, c)?, &r)?))
            })
            .collect::<Result<Vec<Option<f64>>>>()?;
        rows.push(GuidanceRow {
            w,
            accuracy: share(&hit)?,
            accuracy_per_class,
            fd: frechet_between(&gen.features, &real.features)?,
            fd_per_class,
            grid,
        });
    }
    Ok(rows)
}

/// `ddpm guidance`: checks the options, opens the checkpoint (a conditional mnist run),
/// loads the network with the weights the run samples with and the seed-0 classifier (the
/// cache of `ddpm quality`), [`measure`]s, writes `guidance.json` and `guidance.md`.
pub fn run(
    opts: &GuidanceOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<GuidanceReport> {
    let started = Instant::now();
    opts.check()?;
    let ckpt = open_mnist(&opts.checkpoint, "ddpm guidance")?;
    let cfg = ckpt.manifest.config.clone();
    if cfg.model.classes == 0 {
        return Err(DdpmError::NotConditional {
            what: format!("the checkpoint {}", ckpt.dir.display()),
            reason: "it was trained without labels: model.classes = 0".into(),
            advice: "measure guidance on a run trained with train.conditional = true".into(),
        });
    }
    crate::timesteps::strided(cfg.diffusion.t_max, opts.steps)?;
    let out = opts.out.clone().unwrap_or_else(|| {
        ckpt.dir
            .ancestors()
            .nth(2)
            .unwrap_or(&ckpt.dir)
            .join("guidance")
    });
    ensure_dir(&out)?;
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
    let rows = measure(
        &net,
        &schedule,
        &cfg,
        &classifier,
        &heldout,
        opts,
        &out,
        device,
        progress,
    )?;
    let report = GuidanceReport {
        checkpoint: ckpt.dir.display().to_string(),
        step: ckpt.manifest.step,
        steps: opts.steps,
        per_class: opts.per_class,
        seed: opts.seed,
        classifier_accuracy: record.heldout_accuracy,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| DdpmError::Encode {
        what: "the guidance report",
        cause: e.to_string(),
    })?;
    crate::fsio::write_bytes_atomic(&out.join("guidance.json"), json.as_bytes())?;
    crate::fsio::write_bytes_atomic(&out.join("guidance.md"), report.markdown().as_bytes())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::{UNet, UNetConfig};

    /// A tiny conditional network on 28×28 digits of 2 classes, an untrained classifier and 8
    /// held-out "digits": every weight gives a row with shares in [0, 1], finite FDs, and a
    /// grid of 2 rows (one a class) of 2 images.
    #[test]
    fn every_weight_gives_a_row_and_a_grid() {
        let _rng = crate::sampler::rng_lock();
        tch::manual_seed(1);
        let mut cfg = Config::mnist();
        cfg.diffusion.t_max = 10;
        cfg.model = UNetConfig {
            base_channels: 8,
            channel_mults: vec![1],
            groups: 4,
            t_max: 10,
            classes: 2,
            ..UNetConfig::mnist()
        };
        cfg.train.conditional = true;
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let net = UNet::new(&vs.root(), &cfg.model).unwrap();
        let schedule = Schedule::new(cfg.diffusion.schedule, 10, Device::Cpu).unwrap();
        let classifier = Classifier::untrained(Device::Cpu);
        let heldout = Labelled {
            images: Tensor::rand([8, 1, 28, 28], (Kind::Float, Device::Cpu)) * 2 - 1,
            labels: Tensor::from_slice(&[0i64, 1, 0, 1, 0, 1, 0, 1]),
        };
        let out = crate::data::test_dir("guidance_measure");
        let opts = GuidanceOptions {
            weights: vec![0.0, 2.0],
            steps: 2,
            per_class: 3,
            grid: 2,
            ..GuidanceOptions::default()
        };
        let rows = measure(
            &net,
            &schedule,
            &cfg,
            &classifier,
            &heldout,
            &opts,
            &out,
            Device::Cpu,
            &mut crate::progress::Silent,
        )
        .unwrap();
        assert_eq!(rows.iter().map(|r| r.w).collect::<Vec<_>>(), vec![0.0, 2.0]);
        for r in &rows {
            assert!((0.0..=1.0).contains(&r.accuracy), "{r:?}");
            assert_eq!(r.accuracy_per_class.len(), 2);
            let mean = (r.accuracy_per_class[0] + r.accuracy_per_class[1]) / 2.0;
            assert!((mean - r.accuracy).abs() < 1e-12, "{r:?}");
            assert!(r.fd.is_finite() && r.fd_per_class.iter().all(|f| f.unwrap().is_finite()));
            let img = image::open(out.join(&r.grid)).unwrap();
            // 2 columns and 2 rows of 28-pixel cells with 2-pixel gaps.
            assert_eq!((img.width(), img.height()), (62, 62), "{}", r.grid);
        }
        assert_ne!(rows[0].fd, rows[1].fd, "w changes the samples");
        let md = GuidanceReport {
            checkpoint: "c".into(),
            step: 1,
            steps: 2,
            per_class: 3,
            seed: 0,
            classifier_accuracy: 0.5,
            rows: rows.clone(),
            seconds: 0.0,
        }
        .markdown();
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| 2 |")).count(),
            1,
            "{md}"
        );
        let bad = GuidanceOptions {
            weights: vec![-1.0],
            ..GuidanceOptions::default()
        };
        assert!(matches!(
            bad.check(),
            Err(DdpmError::OutOfRange { key: "weights", .. })
        ));
    }
}
