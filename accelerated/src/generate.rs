//! What `ddpm sample` runs, as a library: a run's configuration with the caller's overrides
//! (the `sample.*` keys the flags set) → the [`Sampler`] it asks for → images → a PNG grid
//! and, if asked, one file an image, drawn `sample.batch_size` images at a time
//! ([`generate_each`]; the seed of each batch is [`batch_seed`]). [`generate`] takes any
//! [`NoisePredictor`], so the tests drive this very path with an exact oracle in place of the
//! network; [`run`] loads the network of a checkpoint with the weights asked for and streams
//! the batches to the files.

use crate::checkpoint::{self, LoadedModel, Weights};
use crate::config::Config;
use crate::error::{DdpmError, Result};
use crate::grid;
use crate::guidance::{ConditionalPredictor, Guided};
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
    /// [`load`] (so [`run`] and latents decoding) only: cast the network's weights to bfloat16
    /// once before sampling, on any device (slow on the CPU), instead of autocast at every
    /// network call: every layer then computes in bf16 (the time features in f32), ε̂ comes
    /// back f32. Not with `bf16`.
    pub bf16_weights: bool,
    /// Replay each batch's network calls from a CUDA graph captured at its first step
    /// ([`crate::graph::Graphed`]; CUDA only, the `cuda-graph` feature). Not with `bf16`.
    pub cuda_graph: bool,
    /// [`load`] (so [`run`] and latents decoding) only: lay the network's convolution weights
    /// (and so its input) out channels-last, NHWC in memory, for cuDNN's NHWC kernels; the same
    /// images up to f32 rounding.
    pub channels_last: bool,
    /// Which weights of the checkpoint ([`run`] only).
    pub weights: Weights,
    /// Images per grid row (default ceil(sqrt n)).
    pub columns: Option<i64>,
    /// The PNG grid to write; `None` writes none.
    pub out: Option<PathBuf>,
    /// A directory to write each image to as `NNNNN.png`; `None` writes none.
    pub each: Option<PathBuf>,
    /// Conditional models ([`run`] only): the classes to draw, as `ddpm sample --class` takes
    /// them (an index or name, a comma-separated list, `all`, or `none` for ε̂(x_t, ∅), the
    /// unconditional samples; see [`parse_classes`]); `n` images of each, class after class,
    /// the grid one row per class when there are several. `None`: every class in turn, image
    /// i of class i mod K, the grid one column a class (an unconditional model: no class).
    pub classes: Option<String>,
}

impl Default for SampleOptions {
    /// 36 EMA images, seed 0, written nowhere.
    fn default() -> Self {
        SampleOptions {
            n: 36,
            seed: 0,
            bf16: false,
            bf16_weights: false,
            cuda_graph: false,
            channels_last: false,
            weights: Weights::Ema,
            columns: None,
            out: None,
            each: None,
            classes: None,
        }
    }
}

/// Images drawn at once when `sample.batch_size` is absent.
pub const DEFAULT_BATCH_SIZE: usize = 64;

/// The most images a grid (`opts.out`) holds: the grid needs every image in memory at once and
/// is for looking at (100 × 100 cells). More images go one a file to `opts.each`, streamed.
pub const MAX_GRID_IMAGES: usize = 10_000;

/// What [`run`] did.
#[derive(Debug)]
pub struct Sampled {
    /// All the images, `[n, C, S, S]` Float in [−1, 1] on the CPU, when a grid was asked for
    /// (it needs them all); `None` when they were only streamed to `opts.each`.
    pub images: Option<Tensor>,
    /// How many images were drawn.
    pub count: usize,
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

/// The seed of batch `index`: `seed` itself for the first batch (so a run of at most one batch
/// draws what a [`Sampler`] seeded with `seed` draws), a SplitMix64 mix of (seed, index) for
/// the others (so no two batches of one run, nor batch 0 of a run with a nearby seed, share
/// their noise).
pub fn batch_seed(seed: i64, index: usize) -> i64 {
    if index == 0 {
        return seed;
    }
    let mut z = (seed as u64) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// The batch size `cfg` asks for (`sample.batch_size`, else [`DEFAULT_BATCH_SIZE`]).
pub fn batch_size(cfg: &Config) -> usize {
    cfg.sample.batch_size.unwrap_or(DEFAULT_BATCH_SIZE)
}

/// Refuses, before any work, what `opts` asks for when it cannot be done: no images, a grid of
/// more than [`MAX_GRID_IMAGES`], autocast over bfloat16 weights or in a CUDA graph.
pub fn check_request(opts: &SampleOptions) -> Result<()> {
    if opts.bf16 && opts.cuda_graph {
        return Err(DdpmError::Incompatible {
            key: "cuda_graph",
            other: "bf16".into(),
            reason: "autocast's cache of cast weights cannot live in a CUDA graph: use bfloat16 weights (bf16_weights) with the graph".into(),
        });
    }
    if opts.bf16 && opts.bf16_weights {
        return Err(DdpmError::Incompatible {
            key: "bf16_weights",
            other: "bf16".into(),
            reason: "bfloat16 weights already compute in bfloat16: choose one (autocast keeps the weights f32 and casts at every call)".into(),
        });
    }
    if opts.n == 0 {
        return Err(DdpmError::OutOfRange {
            key: "n",
            value: "0".into(),
            expected: "at least 1 image".into(),
        });
    }
    if opts.out.is_some() && opts.n > MAX_GRID_IMAGES {
        return Err(DdpmError::OutOfRange {
            key: "n",
            value: opts.n.to_string(),
            expected: format!(
                "at most {MAX_GRID_IMAGES} for a grid, which holds every image in memory; write more images one a file (each) without a grid"
            ),
        });
    }
    Ok(())
}

/// Draws `opts.n` images of `cfg`'s image shape with `model` under `schedule`, with the
/// sampler `cfg.sample` asks for (σ_t, steps, η, clipping), `sample.batch_size` images at a
/// time, and hands each batch to `sink` with the index of its first image as soon as it is
/// drawn; returns how many images were drawn. Progress counts the steps of all batches.
///
/// Batch `j` (images `j·B ..`) is drawn from libtorch's generator seeded with
/// [`batch_seed`]`(opts.seed, j)`, so the images are fixed by the seed, n and the batch size
/// B (and the model, the sampler and the device); every batch that is full in two runs with the
/// same seed and B is the same in both, so the first ⌊n/B⌋·B images do not depend on n.
///
/// Refuses up front (nothing drawn) a batch that would not fit in memory
/// ([`DdpmError::OutOfMemory`] naming `sample.batch_size`), when the model says what a sample
/// needs ([`NoisePredictor::bytes_per_sample`]).
pub fn generate_each<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    cfg: &Config,
    opts: &SampleOptions,
    device: Device,
    progress: &mut dyn Progress,
    sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<usize> {
    draw(
        &|_, _| Ok(Plain(model)),
        schedule,
        cfg,
        opts,
        device,
        progress,
        sink,
    )
}

/// [`generate_each`] for a conditional model: image i of the `labels.len()` images (which
/// `opts.n` must equal) is drawn for class `labels[i]` (the value K = `model.classes()` is ∅)
/// with the guidance weight `sample.guidance` of `cfg`, through [`Guided`], so every sampler
/// (ancestral, strided, DDIM) takes it. Batch j's noise is what [`generate_each`] draws for it.
#[allow(clippy::too_many_arguments)]
pub fn generate_each_class<M: NoisePredictor + ConditionalPredictor + ?Sized>(
    model: &M,
    labels: &[i64],
    schedule: &Schedule,
    cfg: &Config,
    opts: &SampleOptions,
    device: Device,
    progress: &mut dyn Progress,
    sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<usize> {
    if labels.len() != opts.n {
        return Err(DdpmError::ShapeMismatch {
            what: "the labels of the images",
            expected: format!("one per image, {}", opts.n),
            got: vec![labels.len() as i64],
        });
    }
    let k = model.classes() as i64;
    if let Some(&bad) = labels.iter().find(|&&l| !(0..=k).contains(&l)) {
        return Err(DdpmError::UnknownClass {
            asked: bad.to_string(),
            names: cfg.data.class_names.clone(),
        });
    }
    let w = cfg.sample.guidance;
    draw(
        &|first, size| {
            Ok(Guided {
                model,
                labels: Tensor::from_slice(&labels[first..first + size]).f_to_device(device)?,
                w,
            })
        },
        schedule,
        cfg,
        opts,
        device,
        progress,
        sink,
    )
}

/// A noise predictor borrowed as it is.
struct Plain<'a, M: ?Sized>(&'a M);

impl<M: NoisePredictor + ?Sized> NoisePredictor for Plain<'_, M> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.0.predict(x_t, t)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        self.0.check_input(shape)
    }

    fn bytes_per_sample(&self) -> Option<u64> {
        self.0.bytes_per_sample()
    }
}

/// The loop of [`generate_each`]: the predictor of the batch of images `first..first + size`
/// is `predictor(first, size)`.
#[allow(clippy::too_many_arguments)]
fn draw<P: NoisePredictor>(
    predictor: &dyn Fn(usize, usize) -> Result<P>,
    schedule: &Schedule,
    cfg: &Config,
    opts: &SampleOptions,
    device: Device,
    progress: &mut dyn Progress,
    sink: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<usize> {
    if opts.n == 0 {
        return check_request(opts).map(|()| 0);
    }
    let b = batch_size(cfg).clamp(1, opts.n);
    let mut sampler_cfg = cfg.sampler(None);
    sampler_cfg.bf16 = opts.bf16;
    let sampler = Sampler::new(schedule, sampler_cfg)?;
    let [c, s, _] = cfg.image_shape();
    let image_bytes = (c * s * s) as u64 * 4;
    // What a sample needs is the first batch's predictor's to say (a guided one counts its
    // doubled batch itself), the same check for every kind of predictor.
    if let Some(per_sample) = predictor(0, b)?.bytes_per_sample() {
        let needed = per_sample
            .checked_add(image_bytes)
            .and_then(|p| p.checked_mul(b as u64));
        crate::memory::check(
            &format!("sampling a batch of {b} images"),
            needed,
            "sample.batch_size",
            device,
        )?;
    }
    let steps = sampler.steps().len() as u64;
    let batches = opts.n.div_ceil(b);
    progress.start(steps * batches as u64, 0, "steps");
    let result = (|| {
        for j in 0..batches {
            let first = j * b;
            let size = b.min(opts.n - first);
            tch::manual_seed(batch_seed(opts.seed, j));
            let done = j as u64 * steps;
            let model = predictor(first, size)?;
            let net = crate::graph::Graphed::new(&model, opts.cuda_graph);
            let images =
                sampler.sample_with(&net, &[size as i64, c, s, s], device, |step, _| {
                    progress.update(done + step as u64)
                })?;
            sink(first, &images)?;
        }
        Ok(opts.n)
    })();
    progress.finish();
    result
}

/// [`generate_each`] keeping every image: returns them all, `[n, C, S, S]` on `device`, after
/// writing `opts.out` and `opts.each` if given. `opts.n` images must fit in memory (they are
/// checked against it); [`run`] streams instead.
pub fn generate<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    cfg: &Config,
    opts: &SampleOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    check_request(opts)?;
    let [c, s, _] = cfg.image_shape();
    let all = (opts.n as u64).checked_mul((c * s * s) as u64 * 4);
    crate::memory::check(&format!("keeping {} images", opts.n), all, "n", device)?;
    let mut batches = Vec::new();
    generate_each(
        model,
        schedule,
        cfg,
        opts,
        device,
        progress,
        &mut |_, images| {
            batches.push(images.shallow_clone());
            Ok(())
        },
    )?;
    let images = Tensor::f_cat(&batches, 0)?;
    write(&images, opts, cfg.sample.grid_scale)?;
    Ok(images)
}

/// Writes the grid (scaled up `grid_scale` times, `sample.grid_scale`, see
/// [`grid::scale_up`]) and the single images (at their own size) that `opts` asks for.
pub fn write(images: &Tensor, opts: &SampleOptions, grid_scale: u32) -> Result<()> {
    if let Some(out) = &opts.out {
        grid::save_grid_scaled(images, out, opts.columns, grid_scale)?;
    }
    if let Some(dir) = &opts.each {
        grid::save_each(images, dir, 0)?;
    }
    Ok(())
}

/// The network of the checkpoint at `path` with `opts.weights` on `device` (see
/// [`checkpoint::load_model`]), its weights cast to bfloat16 (`opts.bf16_weights`) and laid
/// out channels-last (`opts.channels_last`) if asked: what `ddpm sample` draws with.
pub fn load(path: &Path, device: Device, opts: &SampleOptions) -> Result<LoadedModel> {
    let mut model = checkpoint::load_model(path, device, opts.weights)?;
    if opts.bf16_weights {
        model.vs.bfloat16();
    }
    if opts.channels_last {
        crate::unet::to_channels_last(&model.vs)?;
    }
    Ok(model)
}

/// `ddpm sample`: checks the request and that the outputs can be written, loads the network of
/// the checkpoint at `path` (see [`checkpoint::load_model`]) with `opts.weights`, layers
/// `overrides` over the run's configuration and draws the images batch by batch
/// ([`generate_each`]): each batch goes to `opts.each` as it comes, so memory is bounded by one
/// batch whatever `opts.n`; a grid (`opts.out`, at most [`MAX_GRID_IMAGES`]) keeps them all and
/// is written at the end.
pub fn run(
    path: &Path,
    overrides: toml::Table,
    origin: &str,
    opts: &SampleOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Sampled> {
    check_request(opts)?;
    if let Some(out) = &opts.out {
        grid::ensure_writable(out)?;
    }
    if let Some(dir) = &opts.each {
        grid::ensure_dir(dir)?;
    }
    let model = load(path, device, opts)?;
    let guidance_given = overrides
        .get("sample")
        .and_then(|s| s.as_table())
        .is_some_and(|s| s.contains_key("guidance"));
    let cfg = settings(&model.config, overrides, origin)?;
    let k = model.net.class_count();
    if k == 0 && guidance_given {
        return Err(DdpmError::NotConditional {
            what: format!("the checkpoint {}", model.checkpoint.dir.display()),
            reason: "it was trained without labels: model.classes = 0, so there is no class to guide towards (sample.guidance)".into(),
            advice: "sample it without a guidance weight, or train a conditional run (train.conditional = true)".into(),
        });
    }
    let labels = match &opts.classes {
        None if k > 0 => Some((0..opts.n).map(|i| (i % k) as i64).collect()),
        None => None,
        Some(spec) => {
            if model.net.class_count() == 0 {
                return Err(DdpmError::NotConditional {
                    what: format!("the checkpoint {}", model.checkpoint.dir.display()),
                    reason: "it was trained without labels: model.classes = 0".into(),
                    advice: "sample it without a class, or train a conditional run (train.conditional = true)".into(),
                });
            }
            Some(class_rows(
                &parse_classes(spec, &class_names(&cfg))?,
                opts.n,
            ))
        }
    };
    // n images of each class asked for, one row a class when there are several; without a
    // class, one column a class.
    let opts = &match &labels {
        None => opts.clone(),
        Some(_) if opts.classes.is_none() => SampleOptions {
            columns: opts.columns.or(Some(k as i64)),
            ..opts.clone()
        },
        Some(labels) => {
            let rows = labels.len() / opts.n.max(1);
            let total = SampleOptions {
                n: labels.len(),
                columns: opts.columns.or((rows > 1).then_some(opts.n as i64)),
                ..opts.clone()
            };
            check_request(&total)?;
            total
        }
    };
    if opts.out.is_some() {
        // The grid keeps every image (f32 on the CPU) and draws them into one picture.
        let [c, s, _] = cfg.image_shape();
        let needed = (opts.n as u64).checked_mul((c * (s + 2) * (s + 2)) as u64 * 7);
        crate::memory::check(
            &format!("a grid of {} images", opts.n),
            needed,
            "n",
            Device::Cpu,
        )?;
    }
    tracing::info!(
        "sampling {} images from {} (step {}) on {device:?}, {} at a time",
        opts.n,
        model.checkpoint.dir.display(),
        model.checkpoint.manifest.step,
        batch_size(&cfg).min(opts.n)
    );
    let mut kept = Vec::new();
    let mut sink = |first, images: &Tensor| {
        if let Some(dir) = &opts.each {
            grid::save_each(images, dir, first)?;
        }
        if opts.out.is_some() {
            kept.push(images.f_to_device(Device::Cpu)?);
        }
        Ok(())
    };
    let count = match &labels {
        None => generate_each(
            &model.net,
            &model.schedule,
            &cfg,
            opts,
            device,
            progress,
            &mut sink,
        )?,
        Some(labels) => generate_each_class(
            &model.net,
            labels,
            &model.schedule,
            &cfg,
            opts,
            device,
            progress,
            &mut sink,
        )?,
    };
    let images = match &opts.out {
        Some(out) => {
            let images = Tensor::f_cat(&kept, 0)?;
            grid::save_grid_scaled(&images, out, opts.columns, cfg.sample.grid_scale)?;
            Some(images)
        }
        None => None,
    };
    Ok(Sampled {
        images,
        count,
        checkpoint: model.checkpoint.dir.clone(),
        step: model.checkpoint.manifest.step,
    })
}

/// The class names of a run: `data.class_names`, else the indices `0..model.classes`.
pub fn class_names(cfg: &Config) -> Vec<String> {
    if cfg.data.class_names.is_empty() {
        (0..cfg.model.classes).map(|k| k.to_string()).collect()
    } else {
        cfg.data.class_names.clone()
    }
}

/// The labels `spec` names among `names` (a model's classes, in label order): `all` is every
/// class in order; otherwise a comma-separated list of classes, each a name (an exact match
/// comes first), an index from 0 or `none` (∅, the label `names.len()`: the unconditional
/// prediction, where no class is named `none`); repeats are kept.
/// [`DdpmError::UnknownClass`] names the first item that is none of these.
pub fn parse_classes(spec: &str, names: &[String]) -> Result<Vec<i64>> {
    if spec.trim() == "all" {
        return Ok((0..names.len() as i64).collect());
    }
    spec.split(',')
        .map(|item| {
            let item = item.trim();
            names
                .iter()
                .position(|n| n == item)
                .or_else(|| item.parse::<usize>().ok().filter(|&k| k < names.len()))
                .or_else(|| (item == "none").then_some(names.len()))
                .map(|k| k as i64)
                .ok_or_else(|| DdpmError::UnknownClass {
                    asked: item.to_string(),
                    names: names.to_vec(),
                })
        })
        .collect()
}

/// `per` labels of each class of `classes` in turn: the labels of a grid with one row a class.
pub fn class_rows(classes: &[i64], per: usize) -> Vec<i64> {
    classes
        .iter()
        .flat_map(|&k| std::iter::repeat_n(k, per))
        .collect()
}

#[cfg(test)]
mod class_tests {
    use super::*;

    #[test]
    fn class_specs_name_indices_names_lists_and_all() {
        let names: Vec<String> = ["cat", "dog", "7"].iter().map(|s| s.to_string()).collect();
        assert_eq!(parse_classes("all", &names).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_classes("dog", &names).unwrap(), vec![1]);
        assert_eq!(parse_classes("1, cat,1", &names).unwrap(), vec![1, 0, 1]);
        // A name wins over an index.
        assert_eq!(parse_classes("7", &names).unwrap(), vec![2]);
        for bad in ["3", "bird", "", "1,,2", "-1"] {
            let err = parse_classes(bad, &names).unwrap_err();
            assert!(
                matches!(&err, DdpmError::UnknownClass { names: n, .. } if n == &names),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(class_rows(&[2, 0], 3), vec![2, 2, 2, 0, 0, 0]);
        let mut cfg = Config::mnist();
        cfg.model.classes = 2;
        assert_eq!(class_names(&cfg), vec!["0", "1"]);
    }
}
