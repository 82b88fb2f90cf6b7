//! Sample quality, measured offline: FD-MNIST (the Fréchet distance between a small digit
//! classifier's features on generated and held-out images; not comparable to Inception FID),
//! the classifier's prediction entropies and the bound in bits/dim, for each σ_t choice and
//! number of sampling steps. `run` regenerates docs/quality/ from a trained checkpoint:
//! `table` measures, `report` renders.

pub mod classifier;
pub mod conditional;
pub mod frechet;
pub mod nll;
pub mod report;
pub mod score;
pub mod scores;
pub mod sigma_hat;
pub mod table;

use crate::checkpoint;
use crate::checkpoint::{LoadedModel, Weights};
use crate::config::Config;
use crate::config::DataSource;
use crate::data::{load_dataset, split};
use crate::error::{DdpmError, Result};
use crate::progress::Progress;
use crate::sampler::NoisePredictor;
use classifier::{mnist_split, Classifier, ClassifierConfig, ClassifierRecord, Labelled};
use sigma_hat::{eps_mse_table, EpsMseConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;
use table::{measure, Column, Context, Plan};
use tch::{Device, Kind};

/// The default columns' step counts: from few steps, where the σ_t choices differ most, to the
/// full chain of the mnist preset (T = 1000).
pub const DEFAULT_STEPS: [usize; 4] = [50, 100, 250, 1000];

/// Images sampled per cell in each default column: fewer where each image costs more steps,
/// so every column takes a similar time. With the bound, the DDIM row and m_t they put 0.88 M
/// images through the network: 20 minutes on 2 idle CPU cores (docs/quality.md).
pub const DEFAULT_SAMPLES: [usize; 4] = [500, 400, 160, 80];

/// Step counts of the default DDIM η = 0 row: the few-step columns, where a deterministic
/// sampler is expected to help.
pub const DEFAULT_DDIM_STEPS: [usize; 2] = [50, 100];

/// What `run` measures and where it writes; [`Options::default`] is the published table's
/// setting.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// A checkpoint directory, or a run directory (its newest good checkpoint is used).
    pub checkpoint: PathBuf,
    /// Output directory: table.md, table.json and grids/.
    pub out: PathBuf,
    /// A Markdown file whose region between [`report::BEGIN`] and [`report::END`] is replaced
    /// by the table.
    pub doc: Option<PathBuf>,
    /// Where the classifiers are cached (none: quality/ in the run directory).
    pub cache: Option<PathBuf>,
    /// Feature classifiers, seeds 0..N: seed 0 scores the main table, every one gets its own FD
    /// and paired differences, to show how far a verdict depends on the feature extractor.
    pub classifiers: usize,
    /// The columns: a number of sampling steps (strided below T) and the images each of its
    /// cells samples.
    pub columns: Vec<Column>,
    /// Step counts of the DDIM η = 0 row (each also a column; none: no DDIM row).
    pub ddim_steps: Vec<usize>,
    /// Held-out images the bound is averaged over (0 skips it).
    pub bpd_images: usize,
    /// Training images per t for m_t = E‖ε − ε̂‖²/d.
    pub eps_mse_per_t: usize,
    /// Bootstrap resamples per cell.
    pub bootstrap: usize,
    /// Images per network batch.
    pub batch: usize,
    /// Images in each grid.
    pub grid: usize,
    /// Seed of sampling, m_t and the bootstrap.
    pub seed: u64,
}

impl Default for Options {
    /// The run scripts/train.sh writes, measured into docs/quality with five classifiers, the
    /// [`DEFAULT_STEPS`] × [`DEFAULT_SAMPLES`] columns and the [`DEFAULT_DDIM_STEPS`] row, the
    /// bound over 40 held-out images, m_t from 16 images per t, 200 bootstrap resamples,
    /// batches of 250, grids of 64, seed 0.
    fn default() -> Self {
        Options {
            checkpoint: PathBuf::from("runs/mnist"),
            out: PathBuf::from("docs/quality"),
            doc: None,
            cache: None,
            classifiers: 5,
            columns: DEFAULT_STEPS
                .iter()
                .zip(DEFAULT_SAMPLES)
                .map(|(&steps, samples)| Column { steps, samples })
                .collect(),
            ddim_steps: DEFAULT_DDIM_STEPS.to_vec(),
            bpd_images: 40,
            eps_mse_per_t: 16,
            bootstrap: 200,
            batch: 250,
            grid: 64,
            seed: 0,
        }
    }
}

impl Options {
    /// Fails on settings that cannot work whatever the checkpoint, before anything is loaded.
    pub fn check(&self) -> Result<()> {
        if self.classifiers == 0 {
            return Err(DdpmError::OutOfRange {
                key: "classifiers",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        if self.eps_mse_per_t == 0 {
            return Err(DdpmError::OutOfRange {
                key: "eps_mse_per_t",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        self.plan(false).check_settings()?;
        if let Some(doc) = &self.doc {
            report::marked_region(doc)?;
        }
        Ok(())
    }

    /// The table's plan for these options; `clip_each_step` is the run's `sample.clip_each_step`.
    fn plan(&self, clip_each_step: bool) -> Plan {
        Plan {
            columns: self.columns.clone(),
            ddim_steps: self.ddim_steps.clone(),
            bpd_images: self.bpd_images,
            bootstrap_reps: self.bootstrap,
            batch: self.batch,
            grid_images: self.grid,
            seed: self.seed,
            clip_each_step,
        }
    }
}

/// Loads the checkpoint, trains or loads the classifiers, estimates m_t, measures the table on
/// `device` and writes `out/table.{md,json}`, the grids and (with `doc`) the table into the
/// document, after each column. `progress` hears of the classifiers and m_t as notes and of
/// the table's cells as [`measure`] reports them.
pub fn run(opts: &Options, device: Device, progress: &mut dyn Progress) -> Result<table::Table> {
    opts.check()?;
    let ckpt = open_mnist(&opts.checkpoint, "the quality table")?;
    let cfg = ckpt.manifest.config.clone();
    if cfg.model.classes > 0 {
        // Its σ̂_t, bits/dim and σ rows are those of the unconditional law; a guided model's
        // are not defined by this table (issue 15).
        return Err(DdpmError::Incompatible {
            key: "model.classes",
            other: "the quality table".into(),
            reason: format!(
                "{} is a conditional run ({} classes); the table measures unconditional \
                 sampling: score it with `ddpm score` or `ddpm guidance`, or tabulate an \
                 unconditional run (`ddpm train --preset mnist`)",
                ckpt.dir.display(),
                cfg.model.classes
            ),
        });
    }
    let plan = opts.plan(cfg.sample.clip_each_step);
    plan.check(cfg.diffusion.t_max)?;
    let LoadedModel {
        checkpoint: ckpt,
        net,
        schedule,
        ..
    } = ckpt.into_model(device, sampling_weights(&cfg))?;
    let largest = opts
        .columns
        .iter()
        .map(|c| c.samples)
        .chain([
            opts.bpd_images,
            opts.eps_mse_per_t
                .saturating_mul(usize::try_from(cfg.diffusion.t_max).unwrap_or(usize::MAX)),
        ])
        .max()
        .unwrap_or(0);
    check_batch(opts.batch, largest, net.bytes_per_sample(), device)?;
    let data = load_dataset(&cfg)?;
    let (train_set, _) = split(&cfg, &data)?;
    let (train, heldout) = mnist_split(&cfg, &data)?;
    let cache = cache_dir(opts.cache.as_deref(), &ckpt.dir);
    let (classifiers, records) =
        load_classifiers(&cache, opts.classifiers, &train, &heldout, device, progress)?;
    let t0 = Instant::now();
    let eps_cfg = EpsMseConfig {
        per_t: opts.eps_mse_per_t,
        batch: opts.batch,
        seed: opts.seed,
    };
    let eps_mse = eps_mse_table(&net, &schedule, &train_set, eps_cfg, device)?;
    let eps_mse_seconds = t0.elapsed().as_secs_f64();
    progress.note(&format!("m_t estimated in {eps_mse_seconds:.0} s"));
    // s² = tr Cov(x_0)/d: the pooled per-pixel variance of the training images.
    let data_std = f64::try_from(train.images.var_dim(0, false, false).mean(Kind::Double))?.sqrt();
    let ctx = Context {
        model: &net,
        schedule: &schedule,
        classifiers: &classifiers,
        heldout: &heldout.images,
        train: &train.images,
        eps_mse: &eps_mse,
        data_std,
        device,
    };
    measure(
        &ctx,
        &plan,
        &opts.out,
        records,
        eps_mse_seconds,
        progress,
        |table| report::write_all(table, &opts.out, opts.doc.as_deref()),
    )
}

/// Refuses, before any image is drawn, network batches of `batch` images (at most `largest`,
/// the most any part of the table puts through at once) that cannot fit on `device`, each
/// image needing `per_image` bytes (`None`: unknown, no check): [`DdpmError::OutOfMemory`]
/// naming `batch`.
fn check_batch(batch: usize, largest: usize, per_image: Option<u64>, device: Device) -> Result<()> {
    let Some(per_image) = per_image else {
        return Ok(());
    };
    let b = batch.min(largest).max(1);
    crate::memory::check(
        &format!("the quality table's network batches of {b} images"),
        per_image.checked_mul(b as u64),
        "batch",
        device,
    )
}

/// The checkpoint at `path` (a checkpoint or run directory), refused unless its run was
/// trained on MNIST: `what` ("the quality table") names the measurement in the error.
pub(crate) fn open_mnist(path: &Path, what: &str) -> Result<checkpoint::Checkpoint> {
    let ckpt = checkpoint::open(path)?;
    if ckpt.manifest.config.data.source != DataSource::Mnist {
        return Err(DdpmError::Incompatible {
            key: "data.source",
            other: what.into(),
            reason: format!(
                "{} was trained on a folder of images; {what} needs an mnist run \
                 (its classifier is trained on the digits' labels)",
                ckpt.dir.display()
            ),
        });
    }
    Ok(ckpt)
}

/// The weights a run samples with: its EMA when `sample.ema`, else the raw ones.
pub(crate) fn sampling_weights(cfg: &Config) -> Weights {
    if cfg.sample.ema {
        Weights::Ema
    } else {
        Weights::Raw
    }
}

/// Where the classifiers are cached: `cache` if given, else quality/ in the run directory of
/// the checkpoint `ckpt_dir` (so `ddpm quality` and `ddpm score` share them).
pub(crate) fn cache_dir(cache: Option<&Path>, ckpt_dir: &Path) -> PathBuf {
    cache.map_or_else(|| run_dir(ckpt_dir).join("quality"), Path::to_path_buf)
}

/// The classifiers of seeds 0..n, each loaded from `cache` or trained on `train` (and
/// measured on `heldout`) and cached there, with their records; each one's accuracy is a
/// note to `progress`.
pub(crate) fn load_classifiers(
    cache: &Path,
    n: usize,
    train: &Labelled,
    heldout: &Labelled,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<(Vec<Classifier>, Vec<ClassifierRecord>)> {
    let mut classifiers = Vec::new();
    let mut records = Vec::new();
    for seed in 0..n as u64 {
        let cfg = ClassifierConfig {
            seed,
            ..ClassifierConfig::default()
        };
        let (clf, record) = Classifier::load_or_train(cache, train, heldout, cfg, device)?;
        progress.note(&format!(
            "classifier {seed}: {:.1} % held-out accuracy",
            100.0 * record.heldout_accuracy
        ));
        classifiers.push(clf);
        records.push(record);
    }
    Ok((classifiers, records))
}

/// The run directory of a checkpoint `run/checkpoints/step-N`.
fn run_dir(ckpt_dir: &Path) -> PathBuf {
    ckpt_dir
        .ancestors()
        .nth(2)
        .unwrap_or(ckpt_dir)
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_directory_holds_its_checkpoints() {
        assert_eq!(
            run_dir(Path::new("runs/mnist/checkpoints/step-0000100")),
            Path::new("runs/mnist")
        );
    }

    #[test]
    fn options_are_checked_before_any_work() {
        Options::default().check().unwrap();
        let bad = |o: Options| o.check().unwrap_err();
        assert!(matches!(
            bad(Options {
                classifiers: 0,
                ..Options::default()
            }),
            DdpmError::OutOfRange {
                key: "classifiers",
                ..
            }
        ));
        assert!(matches!(
            bad(Options {
                eps_mse_per_t: 0,
                ..Options::default()
            }),
            DdpmError::OutOfRange {
                key: "eps_mse_per_t",
                ..
            }
        ));
        let dir = crate::data::test_dir("quality_options");
        let doc = dir.join("no-markers.md");
        std::fs::write(&doc, "no markers").unwrap();
        assert!(matches!(
            bad(Options {
                doc: Some(doc),
                ..Options::default()
            }),
            DdpmError::MarkedRegion { .. }
        ));
        assert_eq!(Options::default().columns.len(), DEFAULT_SAMPLES.len());
        assert!(matches!(
            bad(Options {
                grid: 0,
                ..Options::default()
            }),
            DdpmError::OutOfRange {
                key: "grid_images",
                ..
            }
        ));
    }

    #[test]
    fn a_batch_that_cannot_fit_is_refused_before_any_work() {
        let per_image = crate::memory::sampling_bytes_per_image(&crate::unet::UNetConfig::mnist());
        assert!(check_batch(250, 16_000, per_image, Device::Cpu).is_ok());
        let e = check_batch(usize::MAX, usize::MAX, per_image, Device::Cpu).unwrap_err();
        assert!(
            matches!(e, DdpmError::OutOfMemory { key: "batch", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("lower batch"), "{e}");
        // The batch is bounded by the most images the table draws at once.
        assert!(check_batch(usize::MAX, 100, per_image, Device::Cpu).is_ok());
        assert!(check_batch(usize::MAX, usize::MAX, None, Device::Cpu).is_ok());
    }
}
