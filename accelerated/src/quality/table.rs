//! The quality table: for each σ_t choice (rows) and number of sampling steps (columns), the
//! FD-MNIST of generated against held-out images with a bootstrap interval, the classifier's
//! prediction entropies, the bound in bits/dim, and a PNG grid of samples.

use super::classifier::{Classifier, ClassifierRecord, Embedding};
use super::frechet::frechet_between;
use super::nll::bits_per_dim_each;
use super::respace::Respaced;
use super::scores::{bootstrap_ci, marginal_entropy, mean_entropy, Bootstrap, Interval};
use crate::error::{DdpmError, Result};
use crate::grid::save_grid;
use crate::sampler::{NoisePredictor, Sampler, SamplerConfig};
use crate::schedule::Schedule;
use crate::sigma::SigmaChoice;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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

    fn label(self) -> &'static str {
        match self {
            Row::Posterior => "posterior σ_t = β̄_{t−1}β_t/β̄_t",
            Row::Beta => "σ_t = β_t",
            Row::Isotropic => "isotropic, data std s",
            Row::Estimated => "estimated optimal σ_t",
            Row::Ddim => "DDIM η = 0",
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
const COMPARED: [(Row, Row); 3] = [
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
        Row::Ddim => Err(DdpmError::InvalidArgument(
            "DDIM η = 0 has no σ table".into(),
        )),
    }
}

fn sampler_config(plan: &Plan, k: usize) -> SamplerConfig {
    SamplerConfig {
        clip_each_step: plan.clip_each_step,
        seed: Some((plan.seed + k as u64) as i64),
        ..SamplerConfig::default()
    }
}

/// `n` images in batches, batch k seeded with seed + k.
fn draw(
    n: usize,
    plan: &Plan,
    shape: &[i64],
    mut one: impl FnMut(SamplerConfig, &[i64]) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut done = 0;
    while done < n {
        let b = plan.batch.min(n - done);
        let mut s = shape.to_vec();
        s[0] = b as i64;
        parts.push(one(sampler_config(plan, parts.len()), &s)?.to_device(Device::Cpu));
        done += b;
    }
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// How generated images score: FD-MNIST under the first classifier with its interval, the
/// entropies of its predictions, and the FD and features under every classifier.
struct Score {
    fd: f64,
    fd_ci: Interval,
    entropy: f64,
    marginal_entropy: f64,
    fd_by_classifier: Vec<f64>,
    features: Vec<Tensor>,
}

/// Scores `images` under `classifiers` against their held-out embeddings `real` (one each).
fn score(
    classifiers: &[Classifier],
    real: &[Embedding],
    images: &Tensor,
    plan: &Plan,
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
    let cfg = Bootstrap {
        reps: plan.bootstrap_reps,
        level: 0.95,
        seed: plan.seed,
    };
    let first = &embedded[0];
    Ok(Score {
        fd: fd_by_classifier[0],
        fd_ci: bootstrap_ci(&first.features, &real[0].features, cfg, frechet_between)?,
        entropy: mean_entropy(&first.logits)?,
        marginal_entropy: marginal_entropy(&first.logits)?,
        fd_by_classifier,
        features: embedded.into_iter().map(|e| e.features).collect(),
    })
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
    let cfg = Bootstrap {
        reps: plan.bootstrap_reps,
        level: 0.95,
        seed: plan.seed,
    };
    Ok((diff(&both, real)?, bootstrap_ci(&both, real, cfg, diff)?))
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
        if let Some(c) = self.columns.iter().find(|c| c.samples < 2) {
            return Err(DdpmError::InvalidArgument(format!(
                "the column of {} steps samples {} images; a Fréchet distance needs at least 2",
                c.steps, c.samples
            )));
        }
        if let Some(n) = self
            .ddim_steps
            .iter()
            .find(|n| !self.columns.iter().any(|c| c.steps == **n))
        {
            return Err(DdpmError::InvalidArgument(format!(
                "DDIM at {n} steps needs a column with {n} steps to take its sample count from"
            )));
        }
        if self.batch == 0 {
            return Err(DdpmError::InvalidArgument(
                "--batch must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Images passed through the network in all (one per image and step): the unit of the
    /// progress bar, since sampling and the bound cost the same per image-step.
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

/// Measures every cell, column after column, writing each grid under `out/grids/` as it goes
/// and handing the table so far to `after_column` (so an interrupted run keeps what it
/// measured). `seconds_before` (the m_t estimate) is counted into the table's time; `show`
/// draws a progress bar over [`Plan::network_images`].
#[allow(clippy::too_many_arguments)]
pub fn measure<M: NoisePredictor + ?Sized>(
    ctx: &Context<M>,
    plan: &Plan,
    out: &Path,
    classifiers: Vec<ClassifierRecord>,
    seconds_before: f64,
    show: bool,
    mut after_column: impl FnMut(&Table) -> Result<()>,
) -> Result<Table> {
    let started = Instant::now();
    plan.check(ctx.schedule.t_max())?;
    if ctx.classifiers.is_empty() || ctx.classifiers.len() != classifiers.len() {
        return Err(DdpmError::InvalidArgument(format!(
            "the table needs at least one classifier and a record for each ({} classifiers, {} records)",
            ctx.classifiers.len(),
            classifiers.len()
        )));
    }
    let real = ctx
        .classifiers
        .iter()
        .map(|c| c.embed(ctx.heldout))
        .collect::<Result<Vec<_>>>()?;
    let shape = ctx.heldout.size();
    let bar = crate::progress::bar(
        show,
        plan.network_images(shape[0] as usize),
        0,
        "image-steps",
    );
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
            let per: Vec<Tensor> = bpd_x0
                .split(plan.batch as i64, 0)
                .iter()
                .map(|x| {
                    let per_call = (plan.batch / x.size()[0] as usize).max(1);
                    let each = bits_per_dim_each(&model, chain.schedule(), &tables, x, per_call);
                    bar.inc((x.size()[0] as usize * col.steps) as u64);
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
            let images = draw(col.samples, plan, &shape, |cfg, s| {
                let cfg = SamplerConfig {
                    steps: Some(col.steps),
                    ..cfg
                };
                Sampler::with_sigma_table(ctx.schedule, cfg, sigma)?.sample_with(
                    ctx.model,
                    s,
                    ctx.device,
                    |_, _| bar.inc(s[0] as u64),
                )
            })?;
            let bpd = bpd.get(i).copied();
            let (cell, features) =
                bar.suspend(|| finish(ctx, &real, plan, out, row, *col, &images, bpd, t0))?;
            table.cells.push(cell);
            row_features.push(features);
        }
        let at = |r: Row| {
            Row::SIGMAS
                .iter()
                .position(|&x| x == r)
                .expect("an ancestral row")
        };
        for (row, against) in COMPARED {
            let (a, b) = (&row_features[at(row)], &row_features[at(against)]);
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
            let images = draw(col.samples, plan, &shape, |cfg, s| {
                let cfg = SamplerConfig {
                    steps: Some(col.steps),
                    eta: Some(0.0),
                    ..cfg
                };
                Sampler::new(ctx.schedule, cfg)?
                    .sample_with(ctx.model, s, ctx.device, |_, _| bar.inc(s[0] as u64))
            })?;
            let (cell, _) =
                bar.suspend(|| finish(ctx, &real, plan, out, Row::Ddim, *col, &images, None, t0))?;
            table.cells.push(cell);
        }
        table.seconds = seconds_before + started.elapsed().as_secs_f64();
        after_column(&table)?;
    }
    bar.finish_and_clear();
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
    let n_train = ctx.train.size()[0] as usize;
    let mut rng = StdRng::seed_from_u64(plan.seed);
    counts
        .into_iter()
        .map(|n| {
            let idx: Vec<i64> = sample(&mut rng, n_train, n.min(n_train))
                .into_iter()
                .map(|i| i as i64)
                .collect();
            let images = ctx.train.index_select(0, &Tensor::from_slice(&idx));
            // A floor is reported for the main table's classifier only.
            let sc = score(&ctx.classifiers[..1], &real[..1], &images, plan)?;
            Ok(Floor {
                samples: n,
                fd: sc.fd,
                fd_ci: sc.fd_ci,
            })
        })
        .collect()
}

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
    save_grid(&images.narrow(0, 0, shown), &out.join(&grid), Some(8))?;
    let sc = score(ctx.classifiers, real, images, plan)?;
    let (fd, fd_ci) = (sc.fd, sc.fd_ci);
    let cell = Cell {
        row,
        steps: col.steps,
        samples: col.samples,
        fd,
        fd_ci,
        fd_by_classifier: sc.fd_by_classifier,
        entropy: sc.entropy,
        marginal_entropy: sc.marginal_entropy,
        bits_per_dim: bpd.map(|b| b.0),
        bits_per_dim_se: bpd.map(|b| b.1),
        grid,
        seconds: t0.elapsed().as_secs_f64(),
    };
    tracing::info!(
        "{} at {} steps: FD {:.2} [{:.2}, {:.2}], {} images in {:.0} s",
        row.name(),
        col.steps,
        fd,
        fd_ci.lo,
        fd_ci.hi,
        col.samples,
        cell.seconds
    );
    Ok((cell, sc.features))
}

/// σ_t of the four rows on the full chain at t = 1, 2, 5, 10, 50, 100, 500, 1000 (those ≤ T).
fn sigma_samples<M: NoisePredictor + ?Sized>(ctx: &Context<M>) -> Result<Vec<SigmaSample>> {
    let chain = Respaced::new(ctx.schedule, ctx.schedule.t_max() as usize)?;
    let tables = Row::SIGMAS
        .iter()
        .map(|&r| sigma_table(ctx, &chain, r))
        .collect::<Result<Vec<_>>>()?;
    Ok([1i64, 2, 5, 10, 50, 100, 500, 1000]
        .into_iter()
        .filter(|&t| t <= ctx.schedule.t_max())
        .map(|t| SigmaSample {
            t,
            eps_mse: ctx.eps_mse.double_value(&[t]),
            sigma: [0, 1, 2, 3].map(|i| tables[i].double_value(&[t])),
        })
        .collect())
}

/// The table as Markdown; grid links are `prefix` + the cell's path.
pub fn markdown(table: &Table, prefix: &str) -> String {
    let cols = &table.plan.columns;
    let head = |first: &str| {
        let names: Vec<String> = cols.iter().map(|c| format!("{} steps", c.steps)).collect();
        format!(
            "| {first} | {} |\n|---|{}\n",
            names.join(" | "),
            "---|".repeat(cols.len())
        )
    };
    let find = |row: Row, steps: usize| {
        table
            .cells
            .iter()
            .find(|c| c.row == row && c.steps == steps)
    };
    let rows: Vec<Row> = Row::SIGMAS
        .into_iter()
        .chain((!table.plan.ddim_steps.is_empty()).then_some(Row::Ddim))
        .collect();
    let grid = |f: &dyn Fn(&Cell) -> String| -> String {
        rows.iter()
            .map(|&r| {
                let vals: Vec<String> = cols
                    .iter()
                    .map(|c| find(r, c.steps).map_or("—".into(), f))
                    .collect();
                format!("| {} | {} |\n", r.label(), vals.join(" | "))
            })
            .collect()
    };
    let mut md = String::new();
    md += &format!(
        "FD-MNIST (lower is better) with its 95 % bootstrap interval ({} resamples); each value links to \
         the first {} samples of its cell.\n\n",
        table.plan.bootstrap_reps, table.plan.grid_images
    );
    md += &head("σ_t");
    md += &grid(&|c| {
        format!(
            "[{:.2}]({prefix}{}) [{:.2}, {:.2}]",
            c.fd, c.grid, c.fd_ci.lo, c.fd_ci.hi
        )
    });
    let floor: Vec<String> = cols
        .iter()
        .map(|c| {
            table
                .floors
                .iter()
                .find(|f| f.samples == c.samples)
                .map_or("—".into(), |f| {
                    format!("{:.2} [{:.2}, {:.2}]", f.fd, f.fd_ci.lo, f.fd_ci.hi)
                })
        })
        .collect();
    md += &format!(
        "| *real training images (floor)* | {} |\n",
        floor.join(" | ")
    );
    let counts: Vec<String> = cols.iter().map(|c| c.samples.to_string()).collect();
    md += &format!("| *images per cell* | {} |\n\n", counts.join(" | "));

    let k = table.classifiers.len();
    if k > 1 {
        let seeds: Vec<String> = (0..k).map(|i| i.to_string()).collect();
        md += &format!(
            "The same samples under each of the {k} classifiers (seeds {}; same architecture, data \
             and training, only the seed differs), FD-MNIST without intervals:\n\n",
            seeds.join(", ")
        );
        md += &head("σ_t");
        md += &grid(&|c| {
            let v: Vec<String> = c
                .fd_by_classifier
                .iter()
                .map(|f| format!("{f:.1}"))
                .collect();
            v.join(" / ")
        });
        md += "\n";
    }
    md += "Paired differences ΔFD = FD(row) − FD(other row) under classifier k, negative when the \
           first row is better; both rows use the same noise, and the 95 % interval resamples the \
           same image indices in both.\n\n";
    md += &head("ΔFD-MNIST");
    for (row, against) in COMPARED {
        for i in 0..k {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    table
                        .comparisons
                        .iter()
                        .find(|x| {
                            x.steps == c.steps
                                && x.row == row
                                && x.against == against
                                && x.classifier == i
                        })
                        .map_or("—".into(), |x| {
                            format!("{:+.2} [{:+.2}, {:+.2}]", x.diff, x.ci.lo, x.ci.hi)
                        })
                })
                .collect();
            md += &format!(
                "| {} − {}, k = {i} | {} |\n",
                row.name(),
                against.name(),
                vals.join(" | ")
            );
        }
    }
    md += "\n";
    if table.plan.bpd_images == 0 {
        md += "Bound: not measured (`--bpd-images 0`).\n";
    } else {
        md += &format!(
            "Bound (negative ELBO of the chain with that σ_t), bits/dim ± standard error over {} \
             held-out images (the same images and noise in every row of a column).\n\n",
            table.plan.bpd_images.min(table.heldout_images)
        );
        md += &head("σ_t");
        md += &grid(&|c| match (c.bits_per_dim, c.bits_per_dim_se) {
            (Some(b), Some(se)) => format!("{b:.3} ± {se:.3}"),
            _ => "—".into(),
        });
    }
    md += "\nClassifier entropies, nats: mean H(y|x) (sharpness; lower is more digit-like) / H(ȳ) \
           (diversity; ln 10 = 2.303 for balanced digits).\n\n";
    md += &head("σ_t");
    md += &grid(&|c| format!("{:.3} / {:.3}", c.entropy, c.marginal_entropy));
    md += "\nσ_t of each row on the full chain, with m_t = E‖ε − ε̂‖²/d.\n\n\
           | t | m_t | posterior | β_t | isotropic | estimated |\n|---|---|---|---|---|---|\n";
    for s in &table.sigmas {
        md += &format!(
            "| {} | {:.4} | {:.5} | {:.5} | {:.5} | {:.5} |\n",
            s.t, s.eps_mse, s.sigma[0], s.sigma[1], s.sigma[2], s.sigma[3]
        );
    }
    let secs: String = rows
        .iter()
        .map(|&r| {
            let v: Vec<String> = cols
                .iter()
                .map(|c| find(r, c.steps).map_or("—".into(), |x| format!("{:.0}", x.seconds)))
                .collect();
            format!("| {} | {} |\n", r.label(), v.join(" | "))
        })
        .collect();
    md += &format!(
        "\nSeconds per cell (sampling and scoring):\n\n{}{}",
        head("σ_t"),
        secs
    );
    let accuracies: Vec<String> = table
        .classifiers
        .iter()
        .map(|c| format!("{:.1} %", 100.0 * c.heldout_accuracy))
        .collect();
    let first = &table.classifiers[0];
    md += &format!(
        "\nClassifiers (seed 0 scores the main table): {} held-out accuracy ({} training, {} held-out \
         images); data std s = {:.4}; m_t estimated in {:.0} s; whole table {:.0} s.\n",
        accuracies.join(" / "),
        first.train_images,
        first.heldout_images,
        table.data_std,
        table.eps_mse_seconds,
        table.seconds
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let table = measure(&ctx, &p, &dir, records.clone(), 0.0, false, |_| {
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
        let md = markdown(&table, "");
        assert!(md.contains("| beta − posterior, k = 1 |"), "{md}");
        assert!(md.contains("under each of the 2 classifiers"), "{md}");
        // One record short: refused before any work.
        assert!(measure(&ctx, &p, &dir, vec![record(0)], 0.0, false, |_| Ok(())).is_err());
    }

    /// A table with fixed numbers (no model): two columns, DDIM in the first only, one floor
    /// and one comparison missing, two classifiers; `bare` has no bound, one classifier.
    pub(crate) fn fixed_table(bare: bool) -> Table {
        let interval = |lo: f64, hi: f64| Interval { lo, hi, level: 0.95 };
        let record = |seed| ClassifierRecord {
            format: 1,
            config: super::super::classifier::ClassifierConfig {
                seed,
                ..Default::default()
            },
            data_sha256: "ab".into(),
            weights_sha256: "cd".into(),
            train_images: 4500,
            heldout_images: 500,
            heldout_accuracy: 0.98 + 0.001 * seed as f64,
        };
        let k = if bare { 1 } else { 2 };
        let columns = vec![
            Column {
                steps: 10,
                samples: 6,
            },
            Column {
                steps: 20,
                samples: 4,
            },
        ];
        let mut cells = Vec::new();
        for (i, &row) in Row::SIGMAS.iter().chain([Row::Ddim].iter()).enumerate() {
            for (j, col) in columns.iter().enumerate() {
                if row == Row::Ddim && j == 1 {
                    continue;
                }
                let fd = 10.0 + 3.25 * i as f64 - 1.125 * j as f64;
                let bpd = (row != Row::Ddim && !bare).then_some(1.5 + 0.0625 * (i + j) as f64);
                cells.push(Cell {
                    row,
                    steps: col.steps,
                    samples: col.samples,
                    fd,
                    fd_by_classifier: (0..k).map(|c| fd + 0.55 * c as f64).collect(),
                    fd_ci: interval(fd - 1.004, fd + 2.996),
                    entropy: 0.1234 + 0.01 * i as f64,
                    marginal_entropy: 2.2 - 0.005 * j as f64,
                    bits_per_dim: bpd,
                    bits_per_dim_se: bpd.map(|b| b / 100.0),
                    grid: format!("grids/{}-{}.png", row.name(), col.steps),
                    seconds: 12.5 + i as f64,
                });
            }
        }
        let mut comparisons = Vec::new();
        for (p, (row, against)) in COMPARED.into_iter().enumerate() {
            for col in &columns {
                for classifier in 0..k {
                    if p == 2 && col.steps == 20 && classifier == 0 {
                        continue;
                    }
                    let diff = -0.5 + 0.75 * p as f64 + 0.1 * classifier as f64;
                    comparisons.push(Comparison {
                        steps: col.steps,
                        classifier,
                        row,
                        against,
                        diff,
                        ci: interval(diff - 0.333, diff + 0.666),
                    });
                }
            }
        }
        Table {
            plan: Plan {
                columns,
                ddim_steps: if bare { vec![] } else { vec![10] },
                bpd_images: if bare { 0 } else { 600 },
                bootstrap_reps: 200,
                batch: 250,
                grid_images: 64,
                seed: 0,
                clip_each_step: true,
            },
            classifiers: (0..k as u64).map(record).collect(),
            data_std: 0.61234,
            heldout_images: 500,
            cells,
            floors: vec![Floor {
                samples: 6,
                fd: 1.875,
                fd_ci: interval(1.5, 2.25),
            }],
            comparisons,
            sigmas: [1i64, 10, 20]
                .into_iter()
                .map(|t| SigmaSample {
                    t,
                    eps_mse: 0.5 / t as f64,
                    sigma: [0.01, 0.02, 0.03, 0.04].map(|s| s * t as f64),
                })
                .collect(),
            eps_mse_seconds: 41.6,
            seconds: 1234.5,
        }
    }

    /// The Markdown and JSON of fixed numbers, byte for byte (docs/quality.md embeds the one,
    /// scripts read the other).
    #[test]
    fn a_fixed_table_renders_byte_for_byte() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/quality/testdata");
        let check = |name: &str, got: String| {
            let path = format!("{dir}/{name}");
            if std::env::var_os("DDPM_BLESS").is_some() {
                std::fs::write(&path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&path).unwrap();
            assert!(got == want, "{name} differs:\n{got}");
        };
        check("table.md", markdown(&fixed_table(false), "quality/"));
        check("table-bare.md", markdown(&fixed_table(true), ""));
        check(
            "table.json",
            serde_json::to_string_pretty(&fixed_table(false)).unwrap(),
        );
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
        let err = |p: &Plan| p.check(20).unwrap_err().to_string();
        assert!(err(&Plan {
            ddim_steps: vec![50],
            ..p.clone()
        })
        .contains("DDIM at 50 steps"));
        assert!(p
            .check(19)
            .unwrap_err()
            .to_string()
            .contains("between 1 and T = 19"));
        let mut one = p.clone();
        one.columns[0].samples = 1;
        assert!(err(&one).contains("at least 2"));
        assert!(err(&Plan { batch: 0, ..p }).contains("--batch"));
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
