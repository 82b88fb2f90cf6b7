//! The quality table, measured: for each σ_t choice (rows) and number of sampling steps
//! (columns), the FD-MNIST of generated against held-out images with a bootstrap interval, the
//! classifier's prediction entropies, the bound in bits/dim, and a PNG grid of samples. The
//! structures here hold the numbers; `report.rs` renders them.

use super::classifier::{Classifier, ClassifierRecord, Embedding};
use super::frechet::frechet_between;
use super::nll::bits_per_dim_each;
use super::scores::{bootstrap_ci, marginal_entropy, mean_entropy, Bootstrap, Interval};
use crate::error::{DdpmError, Result};
use crate::grid::save_grid;
use crate::progress::Progress;
use crate::sampler::{NoisePredictor, Sampler, SamplerConfig};
use crate::schedule::Schedule;
use crate::sigma::SigmaChoice;
use crate::timesteps::Respaced;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Coverage of every bootstrap interval in the table (cells, floors and paired differences):
/// the conventional 95 %, which the rendered table states.
pub const CONFIDENCE: f64 = 0.95;

/// The t at which the table lists each row's σ_t and m_t on the full chain (those ≤ T): a
/// roughly logarithmic spread, since the σ_t choices differ most at small t, where β̄_{t−1}/β̄_t
/// is far from 1, and agree to a few digits at large t.
pub const SIGMA_REPORT_T: [i64; 8] = [1, 2, 5, 10, 50, 100, 500, 1000];

/// Images per row of each sample grid: the default 64 images make an 8 × 8 square.
pub const GRID_COLUMNS: i64 = 8;

/// How σ_t is chosen in a row (DDIM η = 0 has no σ: it is deterministic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Row {
    /// σ_t = β̄_{t−1}β_t/β̄_t (optimal for a Dirac).
    Posterior,
    /// σ_t = β_t (optimal for N(0, I)).
    Beta,
    /// Optimal for N(m, s² I) with s the data's pooled standard deviation.
    Isotropic,
    /// σ_t² = σ̃_t² + (β_t²/(α_t β̄_t))² m_t from the trained network (see `sigma_hat.rs`).
    Estimated,
    /// Deterministic DDIM, η = 0.
    Ddim,
}

impl Row {
    /// The four ancestral rows in table order.
    pub const SIGMAS: [Row; 4] = [Row::Posterior, Row::Beta, Row::Isotropic, Row::Estimated];

    /// File-name stem.
    pub fn name(self) -> &'static str {
        match self {
            Row::Posterior => "posterior",
            Row::Beta => "beta",
            Row::Isotropic => "isotropic",
            Row::Estimated => "estimated",
            Row::Ddim => "ddim-eta0",
        }
    }
}

/// One column: a number of sampling steps and how many images each of its cells draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Column {
    /// Steps visited (strided when below T).
    pub steps: usize,
    /// Images sampled per cell.
    pub samples: usize,
}

/// Everything the table runner needs besides the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The columns of the ancestral rows.
    pub columns: Vec<Column>,
    /// Step counts of the DDIM η = 0 row (each must also be a column; it reuses its count).
    pub ddim_steps: Vec<usize>,
    /// Held-out images the bound is averaged over, per column.
    pub bpd_images: usize,
    /// Resamples of the bootstrap.
    pub bootstrap_reps: usize,
    /// Images per sampler batch.
    pub batch: usize,
    /// Images shown in each grid.
    pub grid_images: usize,
    /// Base seed (sampler batches use seed + k: the same noise in every row of a column).
    pub seed: u64,
    /// Clip x̂_0 to [−1, 1] at every step (the run's sampler setting).
    pub clip_each_step: bool,
}

/// The trained pieces a table is measured with.
#[derive(Debug)]
pub struct Context<'a, M: NoisePredictor + ?Sized> {
    /// The noise predictor.
    pub model: &'a M,
    /// Its schedule.
    pub schedule: &'a Schedule,
    /// The feature extractors, seeds 0, 1, …: the first scores the main table, the others
    /// show how much the verdict depends on the extractor.
    pub classifiers: &'a [Classifier],
    /// Held-out real images (model space).
    pub heldout: &'a Tensor,
    /// Training images (model space), for the floor.
    pub train: &'a Tensor,
    /// m_t = E‖ε − ε̂‖²/d for t = 0..T.
    pub eps_mse: &'a Tensor,
    /// The data's pooled standard deviation s.
    pub data_std: f64,
    /// Where to compute.
    pub device: Device,
}

/// One measured cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The row.
    pub row: Row,
    /// Steps.
    pub steps: usize,
    /// Images sampled.
    pub samples: usize,
    /// FD-MNIST against the held-out images (the first classifier).
    pub fd: f64,
    /// FD-MNIST under each classifier (the first is `fd`).
    pub fd_by_classifier: Vec<f64>,
    /// Its percentile-bootstrap interval.
    pub fd_ci: Interval,
    /// Mean entropy of the class predictions (nats).
    pub entropy: f64,
    /// Entropy of the mean class prediction (nats; ln 10 = 2.303 when all digits are equally frequent).
    pub marginal_entropy: f64,
    /// The bound of this σ on this chain, bits/dim, mean over the held-out images (none for DDIM).
    pub bits_per_dim: Option<f64>,
    /// Its standard error over images.
    pub bits_per_dim_se: Option<f64>,
    /// The grid, relative to the output directory.
    pub grid: String,
    /// Wall-clock seconds of sampling and scoring.
    pub seconds: f64,
}

/// FD of real training images against the held-out ones: what a perfect sampler would score
/// with the same number of images.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// Training images drawn.
    pub samples: usize,
    /// Their FD-MNIST.
    pub fd: f64,
    /// Its bootstrap interval.
    pub fd_ci: Interval,
}

/// The pairs of rows whose FD difference is bootstrapped pairwise: the published question
/// (β against posterior) and the estimated σ against both closed forms.
pub const COMPARED: [(Row, Row); 3] = [
    (Row::Beta, Row::Posterior),
    (Row::Estimated, Row::Posterior),
    (Row::Estimated, Row::Beta),
];

/// FD(row) − FD(against) on the same noise under one classifier, with its paired bootstrap
/// interval.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The column.
    pub steps: usize,
    /// Index (= seed) of the classifier whose features were used.
    pub classifier: usize,
    /// The row whose FD comes first.
    pub row: Row,
    /// The row subtracted.
    pub against: Row,
    /// FD(row) − FD(against); negative: `row` is better.
    pub diff: f64,
    /// Its paired-bootstrap interval.
    pub ci: Interval,
}

/// σ_t of each row at a few t of the full chain.
#[derive(Debug, Clone, Serialize)]
pub struct SigmaSample {
    /// The step.
    pub t: i64,
    /// m_t.
    pub eps_mse: f64,
    /// σ_t of the posterior, β, isotropic and estimated rows.
    pub sigma: [f64; 4],
}

/// The whole measured table.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// What was run.
    pub plan: Plan,
    /// The classifiers' cache records (accuracy and checksums), in seed order.
    pub classifiers: Vec<ClassifierRecord>,
    /// s.
    pub data_std: f64,
    /// Held-out images FD is measured against.
    pub heldout_images: usize,
    /// The cells, row by row.
    pub cells: Vec<Cell>,
    /// Real-image floors per sample count.
    pub floors: Vec<Floor>,
    /// Paired FD differences between rows, per column.
    pub comparisons: Vec<Comparison>,
    /// σ_t of each row at a few t.
    pub sigmas: Vec<SigmaSample>,
    /// Seconds spent estimating m_t (filled in by the caller).
    pub eps_mse_seconds: f64,
    /// Seconds for the whole table.
    pub seconds: f64,
}

/// The σ table (length n+1) of an ancestral row on a chain.
fn sigma_table<M: NoisePredictor + ?Sized>(
    ctx: &Context<M>,
    chain: &Respaced,
    row: Row,
) -> Result<Tensor> {
    let s = chain.schedule();
    match row {
        Row::Posterior => SigmaChoice::Posterior.table(s),
        Row::Beta => SigmaChoice::Beta.table(s),
        Row::Isotropic => SigmaChoice::Isotropic {
            data_std: ctx.data_std,
        }
        .table(s),
        Row::Estimated => super::sigma_hat::sigma_from_eps_mse(s, &chain.pick(ctx.eps_mse)?),
        Row::Ddim => Err(DdpmError::OutOfRange {
            key: "row",
            value: row.name().into(),
            expected: "an ancestral row (DDIM η = 0 has no σ table)".into(),
        }),
    }
}

fn sampler_config(plan: &Plan, k: usize) -> SamplerConfig {
    SamplerConfig {
        clip_each_step: plan.clip_each_step,
        seed: Some((plan.seed + k as u64) as i64),
        ..SamplerConfig::default()
    }
}

/// `n` images in batches of at most `batch`, drawn by `one(k, shape)` for batch k = 0, 1, …
/// (callers seed batch k with seed + k), gathered on the CPU.
pub(super) fn draw(
    n: usize,
    batch: usize,
    shape: &[i64],
    mut one: impl FnMut(usize, &[i64]) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut done = 0;
    while done < n {
        let b = batch.min(n - done);
        let mut s = shape.to_vec();
        s[0] = b as i64;
        parts.push(one(parts.len(), &s)?.to_device(Device::Cpu));
        done += b;
    }
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// How generated images score: FD-MNIST under the first classifier with its interval, the
/// entropies of its predictions and its confident share, and the FD and features under every
/// classifier.
pub(super) struct Score {
    pub(super) fd: f64,
    pub(super) fd_ci: Interval,
    pub(super) entropy: f64,
    pub(super) marginal_entropy: f64,
    /// The first classifier's logits (for shares such as [`confident_share`]).
    pub(super) logits: Tensor,
    pub(super) fd_by_classifier: Vec<f64>,
    pub(super) features: Vec<Tensor>,
}

/// Scores `images` under `classifiers` against their held-out embeddings `real` (one each),
/// the first classifier's FD with a bootstrap interval as `boot` says.
pub(super) fn score(
    classifiers: &[Classifier],
    real: &[Embedding],
    images: &Tensor,
    boot: Bootstrap,
) -> Result<Score> {
    let embedded = classifiers
        .iter()
        .map(|c| c.embed(images))
        .collect::<Result<Vec<_>>>()?;
    let fd_by_classifier = embedded
        .iter()
        .zip(real)
        .map(|(e, r)| frechet_between(&e.features, &r.features))
        .collect::<Result<Vec<_>>>()?;
    let first = &embedded[0];
    Ok(Score {
        fd: fd_by_classifier[0],
        fd_ci: bootstrap_ci(&first.features, &real[0].features, boot, frechet_between)?,
        entropy: mean_entropy(&first.logits)?,
        marginal_entropy: marginal_entropy(&first.logits)?,
        logits: first.logits.shallow_clone(),
        fd_by_classifier,
        features: embedded.into_iter().map(|e| e.features).collect(),
    })
}

impl Plan {
    /// The bootstrap of every interval in the table.
    fn bootstrap(&self) -> Bootstrap {
        Bootstrap {
            reps: self.bootstrap_reps,
            level: CONFIDENCE,
            seed: self.seed,
        }
    }
}

/// FD(a) − FD(b) against the real features, with a paired bootstrap interval: image i of both
/// rows came from the same noise, so both rows are resampled with the same indices.
fn paired_difference(
    a: &Tensor,
    b: &Tensor,
    real: &Tensor,
    plan: &Plan,
) -> Result<(f64, Interval)> {
    let k = a.size()[1];
    let both = Tensor::f_cat(&[a, b], 1)?;
    let diff = |ab: &Tensor, r: &Tensor| -> Result<f64> {
        Ok(frechet_between(&ab.narrow(1, 0, k), r)? - frechet_between(&ab.narrow(1, k, k), r)?)
    };
    Ok((
        diff(&both, real)?,
        bootstrap_ci(&both, real, plan.bootstrap(), diff)?,
    ))
}

/// Mean and standard error of the per-image bits/dim.
fn mean_se(x: &Tensor) -> Result<(f64, f64)> {
    let n = x.size()[0] as f64;
    let x = x.f_to_kind(Kind::Double)?;
    let mean = f64::try_from(x.mean(Kind::Double))?;
    let sd = if n > 1.0 {
        f64::try_from(x.std(true))?
    } else {
        f64::NAN
    };
    Ok((mean, sd / n.sqrt()))
}

impl Plan {
    /// Fails early, before any model work, on a plan that cannot be measured for T = `t_max`.
    pub fn check(&self, t_max: i64) -> Result<()> {
        for c in &self.columns {
            crate::timesteps::strided(t_max, c.steps)?;
        }
        self.check_settings()
    }

    /// The checks of [`Plan::check`] that do not depend on the checkpoint (all but the step
    /// counts against T): run before the checkpoint is opened.
    pub fn check_settings(&self) -> Result<()> {
        if self.grid_images == 0 {
            return Err(DdpmError::OutOfRange {
                key: "grid_images",
                value: "0".into(),
                expected: "at least 1 (each cell's grid shows that many of its images)".into(),
            });
        }
        if let Some(c) = self.columns.iter().find(|c| c.samples < 2) {
            return Err(DdpmError::OutOfRange {
                key: "samples",
                value: c.samples.to_string(),
                expected: format!(
                    "at least 2 in every column (the column of {} steps; a Fréchet distance \
                     needs at least 2 images)",
                    c.steps
                ),
            });
        }
        if let Some(n) = self
            .ddim_steps
            .iter()
            .find(|n| !self.columns.iter().any(|c| c.steps == **n))
        {
            return Err(DdpmError::Incompatible {
                key: "ddim_steps",
                other: "columns".into(),
                reason: format!(
                    "DDIM at {n} steps needs a column with {n} steps to take its sample count from"
                ),
            });
        }
        if self.batch == 0 {
            return Err(DdpmError::OutOfRange {
                key: "batch",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        if self.bootstrap_reps < 2 {
            return Err(DdpmError::OutOfRange {
                key: "bootstrap_reps",
                value: self.bootstrap_reps.to_string(),
                expected: "at least 2".into(),
            });
        }
        Ok(())
    }

    /// Images passed through the network in all (one per image and step): the unit of the
    /// progress [`measure`] reports, since sampling and the bound cost the same per image-step.
    pub fn network_images(&self, heldout: usize) -> u64 {
        let bpd = self.bpd_images.min(heldout);
        self.columns
            .iter()
            .map(|c| {
                let rows = Row::SIGMAS.len() + usize::from(self.ddim_steps.contains(&c.steps));
                ((rows * c.samples + bpd) * c.steps) as u64
            })
            .sum()
    }
}

/// The image-steps done so far, reported to a [`Progress`] as they grow.
struct Counter<'p> {
    progress: &'p mut dyn Progress,
    done: u64,
}

impl Counter<'_> {
    fn add(&mut self, n: u64) {
        self.done += n;
        self.progress.update(self.done);
    }
}

/// Measures every cell, column after column, writing each grid under `out/grids/` as it goes
/// and handing the table so far to `after_column` (so an interrupted run keeps what it
/// measured). `seconds_before` (the m_t estimate) is counted into the table's time.
/// `progress` hears of the work in [`Plan::network_images`] ("image-steps"), of the cell
/// being sampled as a status and of each measured cell as a note; it is finished whether or
/// not the measurement succeeds.
#[allow(clippy::too_many_arguments)]
pub fn measure<M: NoisePredictor + ?Sized>(
    ctx: &Context<M>,
    plan: &Plan,
    out: &Path,
    classifiers: Vec<ClassifierRecord>,
    seconds_before: f64,
    progress: &mut dyn Progress,
    after_column: impl FnMut(&Table) -> Result<()>,
) -> Result<Table> {
    let table = measure_columns(
        ctx,
        plan,
        out,
        classifiers,
        seconds_before,
        progress,
        after_column,
    );
    progress.finish();
    table
}

/// [`measure`] without finishing `progress`.
#[allow(clippy::too_many_arguments)]
fn measure_columns<M: NoisePredictor + ?Sized>(
    ctx: &Context<M>,
    plan: &Plan,
    out: &Path,
    classifiers: Vec<ClassifierRecord>,
    seconds_before: f64,
    progress: &mut dyn Progress,
    mut after_column: impl FnMut(&Table) -> Result<()>,
) -> Result<Table> {
    let started = Instant::now();
    plan.check(ctx.schedule.t_max())?;
    if ctx.classifiers.is_empty() {
        return Err(DdpmError::OutOfRange {
            key: "ctx.classifiers",
            value: "none".into(),
            expected: "at least one classifier".into(),
        });
    }
    if ctx.classifiers.len() != classifiers.len() {
        return Err(DdpmError::Incompatible {
            key: "classifiers",
            other: "ctx.classifiers".into(),
            reason: format!(
                "the table needs a record for each classifier ({} classifiers, {} records)",
                ctx.classifiers.len(),
                classifiers.len()
            ),
        });
    }
    let real = ctx
        .classifiers
        .iter()
        .map(|c| c.embed(ctx.heldout))
        .collect::<Result<Vec<_>>>()?;
    let shape = ctx.heldout.size();
    progress.start(plan.network_images(shape[0] as usize), 0, "image-steps");
    let mut counter = Counter { progress, done: 0 };
    let bpd_x0 = ctx
        .heldout
        .narrow(0, 0, (plan.bpd_images as i64).min(shape[0]))
        .to_device(ctx.device);
    let mut table = Table {
        plan: plan.clone(),
        classifiers,
        data_std: ctx.data_std,
        heldout_images: shape[0] as usize,
        cells: Vec::new(),
        floors: floors(ctx, &real, plan)?,
        comparisons: Vec::new(),
        sigmas: sigma_samples(ctx)?,
        eps_mse_seconds: seconds_before,
        seconds: seconds_before,
    };
    for col in &plan.columns {
        let chain = Respaced::new(ctx.schedule, col.steps)?;
        let model = chain.model(ctx.model);
        let tables = Row::SIGMAS
            .iter()
            .map(|&r| sigma_table(ctx, &chain, r))
            .collect::<Result<Vec<_>>>()?;
        tch::manual_seed(plan.seed as i64);
        let bpd = if plan.bpd_images > 0 {
            counter
                .progress
                .status(&format!("bound at {} steps", col.steps));
            let per: Vec<Tensor> = bpd_x0
                .split(plan.batch as i64, 0)
                .iter()
                .map(|x| {
                    let per_call = (plan.batch / x.size()[0] as usize).max(1);
                    let each = bits_per_dim_each(&model, chain.schedule(), &tables, x, per_call);
                    counter.add((x.size()[0] as usize * col.steps) as u64);
                    each
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .reduce(|a, b| {
                    a.iter()
                        .zip(&b)
                        .map(|(x, y)| Tensor::cat(&[x, y], 0))
                        .collect()
                })
                .unwrap_or_default();
            per.iter().map(mean_se).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let mut row_features = Vec::new();
        for (i, (&row, sigma)) in Row::SIGMAS.iter().zip(&tables).enumerate() {
            let t0 = Instant::now();
            counter
                .progress
                .status(&format!("{} at {} steps", row.name(), col.steps));
            let images = draw(col.samples, plan.batch, &shape, |k, s| {
                let cfg = SamplerConfig {
                    steps: Some(col.steps),
                    ..sampler_config(plan, k)
                };
                Sampler::with_sigma_table(ctx.schedule, cfg, sigma)?.sample_with(
                    ctx.model,
                    s,
                    ctx.device,
                    |_, _| counter.add(s[0] as u64),
                )
            })?;
            let bpd = bpd.get(i).copied();
            let (cell, features) = finish(ctx, &real, plan, out, row, *col, &images, bpd, t0)?;
            counter.progress.note(&super::report::cell_note(&cell));
            table.cells.push(cell);
            row_features.push(features);
        }
        // Features were pushed in `Row::SIGMAS` order; every compared row is one of them.
        let at = |r: Row| Row::SIGMAS.iter().position(|&x| x == r);
        for (row, against) in COMPARED {
            let (Some(i), Some(j)) = (at(row), at(against)) else {
                continue;
            };
            let (a, b) = (&row_features[i], &row_features[j]);
            for (k, r) in real.iter().enumerate() {
                let (diff, ci) = paired_difference(&a[k], &b[k], &r.features, plan)?;
                table.comparisons.push(Comparison {
                    steps: col.steps,
                    classifier: k,
                    row,
                    against,
                    diff,
                    ci,
                });
            }
        }
        if plan.ddim_steps.contains(&col.steps) {
            let t0 = Instant::now();
            counter
                .progress
                .status(&format!("{} at {} steps", Row::Ddim.name(), col.steps));
            let images = draw(col.samples, plan.batch, &shape, |k, s| {
                let cfg = SamplerConfig {
                    steps: Some(col.steps),
                    eta: Some(0.0),
                    ..sampler_config(plan, k)
                };
                Sampler::new(ctx.schedule, cfg)?
                    .sample_with(ctx.model, s, ctx.device, |_, _| counter.add(s[0] as u64))
            })?;
            let (cell, _) = finish(ctx, &real, plan, out, Row::Ddim, *col, &images, None, t0)?;
            counter.progress.note(&super::report::cell_note(&cell));
            table.cells.push(cell);
        }
        table.seconds = seconds_before + started.elapsed().as_secs_f64();
        after_column(&table)?;
    }
    Ok(table)
}

/// The FD of as many real training images as each column samples, against the held-out ones.
fn floors<M: NoisePredictor + ?Sized>(
    ctx: &Context<M>,
    real: &[Embedding],
    plan: &Plan,
) -> Result<Vec<Floor>> {
    let mut counts: Vec<usize> = plan.columns.iter().map(|c| c.samples).collect();
    counts.sort_unstable();
    counts.dedup();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    counts
        .into_iter()
        .map(|n| {
            let images = train_subset(ctx.train, n, &mut rng);
            // A floor is reported for the main table's classifier only.
            let sc = score(&ctx.classifiers[..1], &real[..1], &images, plan.bootstrap())?;
            Ok(Floor {
                samples: n,
                fd: sc.fd,
                fd_ci: sc.fd_ci,
            })
        })
        .collect()
}

/// min(n, N) of the training images [N, …], drawn without replacement by `rng`: the real
/// images a floor scores.
pub(super) fn train_subset(train: &Tensor, n: usize, rng: &mut StdRng) -> Tensor {
    let n_train = train.size()[0] as usize;
    let idx: Vec<i64> = sample(rng, n_train, n.min(n_train))
        .into_iter()
        .map(|i| i as i64)
        .collect();
    train.index_select(0, &Tensor::from_slice(&idx))
}

/// The cell of `images` sampled in `row` and `col`: its grid written under `out`, its scores,
/// and the features of its images under each classifier (for the paired differences).
#[allow(clippy::too_many_arguments)]
fn finish<M: NoisePredictor + ?Sized>(
    ctx: &Context<M>,
    real: &[Embedding],
    plan: &Plan,
    out: &Path,
    row: Row,
    col: Column,
    images: &Tensor,
    bpd: Option<(f64, f64)>,
    t0: Instant,
) -> Result<(Cell, Vec<Tensor>)> {
    let grid = format!("grids/{}-{}.png", row.name(), col.steps);
    let shown = (plan.grid_images as i64).min(images.size()[0]);
    save_grid(
        &images.narrow(0, 0, shown),
        &out.join(&grid),
        Some(GRID_COLUMNS),
    )?;
    let sc = score(ctx.classifiers, real, images, plan.bootstrap())?;
    let cell = Cell {
        row,
        steps: col.steps,
        samples: col.samples,
        fd: sc.fd,
        fd_ci: sc.fd_ci,
        fd_by_classifier: sc.fd_by_classifier,
        entropy: sc.entropy,
        marginal_entropy: sc.marginal_entropy,
        bits_per_dim: bpd.map(|b| b.0),
        bits_per_dim_se: bpd.map(|b| b.1),
        grid,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((cell, sc.features))
}

/// σ_t of the four rows on the full chain at the [`SIGMA_REPORT_T`] up to T.
fn sigma_samples<M: NoisePredictor + ?Sized>(ctx: &Context<M>) -> Result<Vec<SigmaSample>> {
    let chain = Respaced::new(ctx.schedule, ctx.schedule.t_max() as usize)?;
    let tables = Row::SIGMAS
        .iter()
        .map(|&r| sigma_table(ctx, &chain, r))
        .collect::<Result<Vec<_>>>()?;
    Ok(SIGMA_REPORT_T
        .into_iter()
        .filter(|&t| t <= ctx.schedule.t_max())
        .map(|t| SigmaSample {
            t,
            eps_mse: ctx.eps_mse.double_value(&[t]),
            sigma: [0, 1, 2, 3].map(|i| tables[i].double_value(&[t])),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

    fn plan() -> Plan {
        Plan {
            columns: vec![Column {
                steps: 10,
                samples: 50,
            }],
            ddim_steps: vec![],
            bpd_images: 0,
            bootstrap_reps: 50,
            batch: 50,
            grid_images: 4,
            seed: 1,
            clip_each_step: true,
        }
    }

    /// The whole runner on a toy: a closure for the network, T = 10, and two untrained
    /// classifiers (different random features, so their numbers must differ).
    #[test]
    fn every_cell_is_scored_under_every_classifier() {
        let _rng = crate::sampler::rng_lock();
        tch::manual_seed(5);
        let schedule =
            Schedule::new(crate::schedule::ScheduleKind::Article, 10, Device::Cpu).unwrap();
        let opts = (Kind::Float, Device::Cpu);
        let heldout = Tensor::rand([12, 1, 28, 28], opts) * 2.0 - 1.0;
        let train = Tensor::rand([12, 1, 28, 28], opts) * 2.0 - 1.0;
        let classifiers = [
            Classifier::untrained(Device::Cpu),
            Classifier::untrained(Device::Cpu),
        ];
        let record = |seed| ClassifierRecord {
            format: 1,
            config: super::super::classifier::ClassifierConfig {
                seed,
                ..Default::default()
            },
            data_sha256: String::new(),
            weights_sha256: String::new(),
            train_images: 12,
            heldout_images: 12,
            heldout_accuracy: 0.1,
        };
        let records = vec![record(0), record(1)];
        let eps_mse = Tensor::full([11], 0.1, (Kind::Double, Device::Cpu));
        let model = |x: &Tensor, _t: &Tensor| x * 0.5;
        let ctx = Context {
            model: &model,
            schedule: &schedule,
            classifiers: &classifiers,
            heldout: &heldout,
            train: &train,
            eps_mse: &eps_mse,
            data_std: 0.5,
            device: Device::Cpu,
        };
        let p = Plan {
            columns: vec![
                Column {
                    steps: 5,
                    samples: 6,
                },
                Column {
                    steps: 10,
                    samples: 6,
                },
            ],
            ddim_steps: vec![5],
            bpd_images: 2,
            bootstrap_reps: 10,
            batch: 4,
            ..plan()
        };
        let dir = crate::data::test_dir("quality_measure");
        let mut columns_reported = 0;
        let table = measure(&ctx, &p, &dir, records.clone(), 0.0, &mut Silent, |_| {
            columns_reported += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(columns_reported, 2);
        assert_eq!(table.cells.len(), 4 + 1 + 4);
        for c in &table.cells {
            assert_eq!(c.fd_by_classifier.len(), 2);
            assert_eq!(c.fd_by_classifier[0], c.fd);
            assert!(dir.join(&c.grid).exists(), "{}", c.grid);
            assert_eq!(c.bits_per_dim.is_some(), c.row != Row::Ddim);
        }
        assert!(table
            .cells
            .iter()
            .all(|c| c.fd_by_classifier[0] != c.fd_by_classifier[1]));
        assert_eq!(table.comparisons.len(), 2 * COMPARED.len() * 2);
        let md = super::super::report::markdown(&table, "");
        assert!(md.contains("| beta − posterior, k = 1 |"), "{md}");
        assert!(md.contains("under each of the 2 classifiers"), "{md}");
        // One record short: refused before any work.
        assert!(matches!(
            measure(
                &ctx,
                &p,
                &dir,
                vec![record(0)],
                0.0,
                &mut Silent,
                |_| Ok(())
            ),
            Err(DdpmError::Incompatible {
                key: "classifiers",
                ..
            })
        ));
    }

    #[test]
    fn a_plan_is_checked_and_its_work_counted() {
        let mut p = plan();
        p.columns.push(Column {
            steps: 20,
            samples: 30,
        });
        p.ddim_steps = vec![20];
        p.bpd_images = 8;
        p.check(20).unwrap();
        // Column 10: 4 rows × 50 images + 8 bound images, 10 steps; column 20 adds DDIM.
        assert_eq!(p.network_images(500), (4 * 50 + 8) * 10 + (5 * 30 + 8) * 20);
        assert_eq!(p.network_images(5), (4 * 50 + 5) * 10 + (5 * 30 + 5) * 20);
        let err = |p: &Plan| p.check(20).unwrap_err();
        assert!(matches!(
            err(&Plan {
                ddim_steps: vec![50],
                ..p.clone()
            }),
            DdpmError::Incompatible {
                key: "ddim_steps",
                ..
            }
        ));
        assert!(p
            .check(19)
            .unwrap_err()
            .to_string()
            .contains("between 1 and T = 19"));
        let mut one = p.clone();
        one.columns[0].samples = 1;
        assert!(matches!(
            err(&one),
            DdpmError::OutOfRange { key: "samples", .. }
        ));
        assert!(matches!(
            err(&Plan {
                batch: 0,
                ..p.clone()
            }),
            DdpmError::OutOfRange { key: "batch", .. }
        ));
        assert!(matches!(
            err(&Plan {
                bootstrap_reps: 1,
                ..p
            }),
            DdpmError::OutOfRange {
                key: "bootstrap_reps",
                ..
            }
        ));
    }

    /// Resampling both rows with the same indices makes a row against itself exactly 0 in
    /// every resample; a shifted copy must come out worse in every resample too.
    #[test]
    fn paired_differences_resample_both_rows_together() {
        let _rng = crate::sampler::rng_lock();
        tch::manual_seed(2);
        let opts = (Kind::Double, Device::Cpu);
        let (a, real) = (Tensor::randn([50, 4], opts), Tensor::randn([60, 4], opts));
        let (d, ci) = paired_difference(&a, &a, &real, &plan()).unwrap();
        assert_eq!((d, ci.lo, ci.hi), (0.0, 0.0, 0.0));
        let (d, ci) = paired_difference(&(&a + 3.0), &a, &real, &plan()).unwrap();
        assert!(d > 0.0 && ci.lo > 0.0, "{d} [{}, {}]", ci.lo, ci.hi);
    }
}
