//! What `ddpm sample` runs, as a library: a run's configuration with the caller's overrides
//! (the `sample.*` keys the flags set) → the [`Sampler`] it asks for → images → a PNG grid
//! and, if asked, one file an image. [`generate`] takes any [`NoisePredictor`], so the tests
//! drive this very path with an exact oracle in place of the network; [`run`] loads the
//! network of a checkpoint with the weights asked for and calls it.

use crate::checkpoint::{self, Weights};
use crate::config::Config;
use crate::error::{DdpmError, Result};
use crate::grid;
use crate::progress::Progress;
use crate::sampler::{NoisePredictor, Sampler};
use crate::schedule::Schedule;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What to draw and where to write it (the settings of the sampler itself come from the
/// configuration and its overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    /// Number of images (at least 1).
    pub n: usize,
    /// Seed of the sampler's noise.
    pub seed: i64,
    /// Run the network in bfloat16 autocast on CUDA (ignored on the CPU).
    pub bf16: bool,
    /// Which weights of the checkpoint ([`run`] only).
    pub weights: Weights,
    /// Images per grid row (default ceil(sqrt n)).
    pub columns: Option<i64>,
    /// The PNG grid to write; `None` writes none.
    pub out: Option<PathBuf>,
    /// A directory to write each image to as `NNNNN.png`; `None` writes none.
    pub each: Option<PathBuf>,
}

impl Default for SampleOptions {
    /// 36 EMA images, seed 0, written nowhere.
    fn default() -> Self {
        SampleOptions {
            n: 36,
            seed: 0,
            bf16: false,
            weights: Weights::Ema,
            columns: None,
            out: None,
            each: None,
        }
    }
}

/// What [`run`] did.
#[derive(Debug)]
pub struct Sampled {
    /// The images, `[n, C, S, S]` Float in [−1, 1].
    pub images: Tensor,
    /// The checkpoint directory they were drawn from.
    pub checkpoint: PathBuf,
    /// Its training step.
    pub step: u64,
}

/// `config` with `overrides` (a partial config table, e.g. `sample.steps = 50`) merged in and
/// validated; `origin` names where the overrides come from in messages.
pub fn settings(config: &Config, overrides: toml::Table, origin: &str) -> Result<Config> {
    config.with_overrides(overrides, origin)
}

/// Draws `opts.n` images of `cfg`'s image shape with `model` under `schedule`, with the
/// sampler `cfg.sample` asks for (σ_t, steps, η, clipping) seeded with `opts.seed`, reporting
/// each step to `progress`; then writes `opts.out` and `opts.each` if given.
pub fn generate<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    cfg: &Config,
    opts: &SampleOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    if opts.n == 0 {
        return Err(DdpmError::OutOfRange {
            key: "n",
            value: "0".into(),
            expected: "at least 1 image".into(),
        });
    }
    let mut sampler_cfg = cfg.sampler(Some(opts.seed));
    sampler_cfg.bf16 = opts.bf16;
    let sampler = Sampler::new(schedule, sampler_cfg)?;
    let [c, s, _] = cfg.image_shape();
    progress.start(sampler.steps().len() as u64, 0, "steps");
    let images = sampler.sample_with(model, &[opts.n as i64, c, s, s], device, |done, _| {
        progress.update(done as u64)
    });
    progress.finish();
    let images = images?;
    write_scaled(&images, opts, cfg.sample.grid_scale)?;
    Ok(images)
}

/// Writes the grid and the single images `opts` asks for.
pub fn write(images: &Tensor, opts: &SampleOptions) -> Result<()> {
    if let Some(out) = &opts.out {
        grid::save_grid(images, out, opts.columns)?;
    }
    if let Some(dir) = &opts.each {
        grid::save_each(images, dir)?;
    }
    Ok(())
}

/// [`write`] with the grid scaled up `grid_scale` times (`sample.grid_scale`, see
/// [`grid::scale_up`]); the single images stay at their own size.
pub fn write_scaled(images: &Tensor, opts: &SampleOptions, grid_scale: u32) -> Result<()> {
    if let Some(out) = &opts.out {
        grid::save_grid_scaled(images, out, opts.columns, grid_scale)?;
    }
    if let Some(dir) = &opts.each {
        grid::save_each(images, dir)?;
    }
    Ok(())
}

/// `ddpm sample`: checks that the outputs can be written, loads the network of the checkpoint
/// at `path` (see [`checkpoint::load_model`]) with `opts.weights`, layers `overrides` over
/// the run's configuration and calls [`generate`].
pub fn run(
    path: &Path,
    overrides: toml::Table,
    origin: &str,
    opts: &SampleOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Sampled> {
    if let Some(out) = &opts.out {
        grid::ensure_writable(out)?;
    }
    if let Some(dir) = &opts.each {
        grid::ensure_dir(dir)?;
    }
    let model = checkpoint::load_model(path, device, opts.weights)?;
    let cfg = settings(&model.config, overrides, origin)?;
    tracing::info!(
        "sampling {} images from {} (step {}) on {device:?}",
        opts.n,
        model.checkpoint.dir.display(),
        model.checkpoint.manifest.step
    );
    let images = generate(&model.net, &model.schedule, &cfg, opts, device, progress)?;
    Ok(Sampled {
        images,
        checkpoint: model.checkpoint.dir.clone(),
        step: model.checkpoint.manifest.step,
    })
}
