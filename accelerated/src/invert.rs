//! DDIM inversion (η = 0) on tensors, mirroring `ddpm_reference::invert`: the deterministic
//! DDIM walk run upwards τ′ → τ along the generation's own list (a [`Sampler`]'s steps),
//! with ε̂ asked at the point it has and the level it goes to, ε̂(x_τ′, τ):
//! x_τ = ᾱ_τ (x_τ′ − β̄_τ′ ε̂)/ᾱ_τ′ + β̄_τ ε̂ (docs/derivations.md, section 14).
//!
//! And what `ddpm invert` and `ddpm sample --latents` run: real images (exactly the model's
//! size and channels, nothing resized) → their latents x_T in a safetensors file whose
//! metadata records the settings ([`LATENTS_FORMAT`], the checkpoint, T, the schedule, the
//! walked steps), and such a file → images.

use crate::checkpoint::{self, Weights};
use crate::config::Config;
use crate::error::{DdpmError, Result};
use crate::generate::{self, SampleOptions, Sampled};
use crate::grid;
use crate::progress::Progress;
use crate::sampler::{NoisePredictor, Sampler};
use crate::schedule::Schedule;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The `format` entry of a latents file's metadata.
pub const LATENTS_FORMAT: &str = "ddpm-latents-v1";
/// The tensor a latents file holds, `[N, C, S, S]` f32.
pub const LATENTS_TENSOR: &str = "latents";
/// The largest latents file read (1 GiB: 9 million 28 × 28 latents).
pub const MAX_LATENTS_BYTES: u64 = 1 << 30;
/// The largest image file read (64 MiB).
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// The inversion walk: the (τ′, τ) pairs upwards and each step's coefficients
/// x_τ = c_x x_τ′ + c_ε ε̂, c_x = ᾱ_τ/ᾱ_τ′, c_ε = β̄_τ − ᾱ_τ β̄_τ′/ᾱ_τ′.
#[derive(Debug, Clone)]
pub struct Inverter {
    pairs: Vec<(i64, i64)>,
    coefs: Vec<(f64, f64)>,
}

impl Inverter {
    /// The inversion of the generation walk `generation` ((τ, τ′) pairs from (T, ·) down to
    /// (·, 0), as [`Sampler::steps`] gives them): each pair turned round, in reverse order.
    /// Errors unless the pairs chain down from T to 0 with 0 ≤ τ′ < τ ≤ T.
    pub fn new(schedule: &Schedule, generation: &[(i64, i64)]) -> Result<Inverter> {
        let t_max = schedule.t_max();
        let bad = |why: String| DdpmError::OutOfRange {
            key: "steps",
            value: format!("{generation:?}"),
            expected: why,
        };
        if generation.first().map(|p| p.0) != Some(t_max)
            || generation.last().map(|p| p.1) != Some(0)
        {
            return Err(bad(format!("a walk from T = {t_max} down to 0")));
        }
        for (k, &(tau, prev)) in generation.iter().enumerate() {
            if !(0 <= prev && prev < tau && tau <= t_max) {
                return Err(bad(format!("pairs with 0 ≤ τ′ < τ ≤ {t_max}")));
            }
            if generation.get(k + 1).is_some_and(|next| next.0 != prev) {
                return Err(bad(
                    "consecutive pairs that chain (τ′ of one is τ of the next)".into(),
                ));
            }
        }
        let ab = host(schedule.alpha_bars())?;
        let bb = host(schedule.beta_bars())?;
        let pairs: Vec<(i64, i64)> = generation.iter().rev().map(|&(t, p)| (p, t)).collect();
        let coefs = pairs
            .iter()
            .map(|&(p, t)| {
                let (p, t) = (p as usize, t as usize);
                (ab[t] / ab[p], bb[t] - ab[t] * bb[p] / ab[p])
            })
            .collect();
        Ok(Inverter { pairs, coefs })
    }

    /// The inversion of `sampler`'s walk (the same strided list, so what it generates from the
    /// latents is the reconstruction).
    pub fn for_sampler(schedule: &Schedule, sampler: &Sampler) -> Result<Inverter> {
        Inverter::new(schedule, sampler.steps())
    }

    /// The (τ′, τ) pairs walked, from (0, ·) up to (·, T).
    pub fn steps(&self) -> &[(i64, i64)] {
        &self.pairs
    }

    /// Step `i` (`steps()[i]` = (τ′, τ)): x_τ from x_τ′ and ε̂(x_τ′, τ), in x's kind.
    pub fn step(&self, i: usize, x: &Tensor, eps_hat: &Tensor) -> Result<Tensor> {
        let &(c_x, c_eps) = self.coefs.get(i).ok_or_else(|| DdpmError::OutOfRange {
            key: "i",
            value: i.to_string(),
            expected: format!("below {}, the number of steps walked", self.coefs.len()),
        })?;
        crate::marginal::same_shape("x_t", x, "eps_hat", eps_hat)?;
        Ok(x.f_mul_scalar(c_x)?.f_add(&eps_hat.f_mul_scalar(c_eps)?)?)
    }

    /// x_T from x_0 [B, …] (Float, on its device), calling `on_step(done, total)` after each
    /// step; no gradients.
    pub fn invert<M: NoisePredictor + ?Sized>(
        &self,
        model: &M,
        x0: &Tensor,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let shape = x0.size();
        model.check_input(&shape)?;
        let Some(&b) = shape.first() else {
            return Err(DdpmError::ShapeMismatch {
                what: "images to invert",
                expected: "[B, …] with a batch dimension".into(),
                got: shape,
            });
        };
        tch::no_grad(|| {
            let mut x = x0.f_to_kind(Kind::Float)?;
            let total = self.pairs.len();
            for (i, &(_, tau)) in self.pairs.iter().enumerate() {
                let t = Tensor::f_full([b], tau, (Kind::Int64, x.device()))?;
                let eps_hat = model.predict(&x, &t)?.f_to_kind(Kind::Float)?;
                x = self.step(i, &x, &eps_hat)?;
                on_step(i + 1, total);
            }
            Ok(x)
        })
    }
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?,
    )?)
}

/// The image files `inputs` name: each file itself, each directory's `.png`/`.jpg`/`.jpeg`
/// files sorted by name; errors name what is missing or empty.
pub fn image_paths(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            out.extend(crate::data::folder::image_files(input)?);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            return Err(DdpmError::BadData {
                set: format!("image {}", input.display()),
                reason: "does not exist (give image files or directories of them)".into(),
            });
        }
    }
    if out.is_empty() {
        return Err(DdpmError::BadData {
            set: "the images".into(),
            reason: "none given".into(),
        });
    }
    Ok(out)
}

/// One image file as `[C, S, S]` model-space values in [−1, 1]; refuses an image whose size
/// is not S × S or whose colour channels (alpha ignored) are not C — nothing is resized,
/// cropped or converted, so the latents belong to the very pixels given.
pub fn load_image(path: &Path, shape: [i64; 3]) -> Result<Tensor> {
    let [c, s, _] = shape;
    let bytes = crate::fsio::read_bounded(path, MAX_IMAGE_BYTES, "the image")?;
    let img = image::load_from_memory(&bytes).map_err(|cause| DdpmError::Image {
        path: path.to_path_buf(),
        cause,
    })?;
    let bad = |reason: String| DdpmError::BadData {
        set: format!("image {}", path.display()),
        reason,
    };
    let (w, h) = (img.width() as i64, img.height() as i64);
    if (w, h) != (s, s) {
        return Err(bad(format!(
            "is {w}×{h}; the model takes {s}×{s} images (resize it first: inversion keeps the pixels as given)"
        )));
    }
    let colour = img.color();
    let channels = colour.channel_count() as i64 - colour.has_alpha() as i64;
    if channels != c {
        let name = |n: i64| if n == 1 { "grey" } else { "RGB" };
        return Err(bad(format!(
            "has {channels} colour channel{} ({}); the model takes {c} ({})",
            if channels == 1 { "" } else { "s" },
            name(channels),
            name(c)
        )));
    }
    let raw = if c == 1 {
        img.to_luma8().into_raw()
    } else {
        img.to_rgb8().into_raw()
    };
    let pixels = Tensor::from_slice(&raw)
        .f_view([s, s, c])?
        .f_permute([2, 0, 1])?
        .f_contiguous()?;
    crate::data::pixels_to_model(&pixels)
}

/// Every file of [`image_paths`] loaded with [`load_image`], `[N, C, S, S]` on the CPU.
pub fn load_images(paths: &[PathBuf], shape: [i64; 3]) -> Result<Tensor> {
    let images = paths
        .iter()
        .map(|p| load_image(p, shape))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_stack(&images, 0)?)
}

/// Latents read from a file, with what its metadata records.
#[derive(Debug)]
pub struct Latents {
    /// `[N, C, S, S]` f32 on the CPU.
    pub latents: Tensor,
    /// The metadata (`format`, `checkpoint`, `step`, `t_max`, `schedule`, `steps`, `pairs`,
    /// `weights`, `images`), as written.
    pub metadata: HashMap<String, String>,
}

impl Latents {
    /// The number of DDIM steps the latents were inverted with (`steps` in the metadata).
    pub fn steps(&self) -> Option<usize> {
        self.metadata.get("steps").and_then(|s| s.parse().ok())
    }
}

/// Writes `latents` `[N, C, S, S]` as the f32 tensor [`LATENTS_TENSOR`] of a safetensors file
/// at `path` with `metadata` (plus `format` = [`LATENTS_FORMAT`]), atomically.
pub fn save_latents(
    path: &Path,
    latents: &Tensor,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let t = latents
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let values = Vec::<f32>::try_from(t.f_flatten(0, -1)?)?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let encode = |e: safetensors::SafeTensorError| DdpmError::Encode {
        what: "latents as safetensors",
        cause: e.to_string(),
    };
    let view = TensorView::new(Dtype::F32, shape, &bytes).map_err(encode)?;
    let mut meta = metadata.clone();
    meta.insert("format".into(), LATENTS_FORMAT.into());
    let out = safetensors::serialize([(LATENTS_TENSOR, view)], Some(meta)).map_err(encode)?;
    crate::fsio::write_bytes_atomic(path, &out)
}

/// Reads a latents file written by [`save_latents`] (or any safetensors file holding a
/// finite f32 tensor [`LATENTS_TENSOR`]) and checks it against the model's image `shape`
/// [C, S, S]: wrong shapes are [`DdpmError::ShapeMismatch`], anything else unreadable
/// [`DdpmError::Latents`].
pub fn load_latents(path: &Path, shape: [i64; 3]) -> Result<Latents> {
    let bytes = crate::fsio::read_bounded(path, MAX_LATENTS_BYTES, "the latents file")?;
    let fail = |reason: String| DdpmError::Latents {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| fail(format!("not a safetensors file ({e})")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("not a safetensors file ({e})")))?;
    let view = st.tensor(LATENTS_TENSOR).map_err(|_| {
        fail(format!(
            "holds no tensor named `{LATENTS_TENSOR}` (write it with `ddpm invert`)"
        ))
    })?;
    if view.dtype() != Dtype::F32 {
        return Err(fail(format!(
            "`{LATENTS_TENSOR}` is {:?}, not F32",
            view.dtype()
        )));
    }
    let size: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let [c, s, _] = shape;
    if size.len() != 4 || size[0] < 1 || size[1..] != [c, s, s] {
        return Err(DdpmError::ShapeMismatch {
            what: "latents",
            expected: format!("[N, {c}, {s}, {s}] with N ≥ 1, the model's image shape"),
            got: size,
        });
    }
    let latents = Tensor::f_from_data_size(view.data(), &size, Kind::Float)?;
    let finite = latents.f_isfinite()?.f_all()?.f_int64_value(&[])? == 1;
    if !finite {
        return Err(fail("holds NaN or infinite values".into()));
    }
    let metadata = header
        .metadata()
        .clone()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    Ok(Latents { latents, metadata })
}

/// What `ddpm invert` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct InvertOptions {
    /// Image files or directories of them.
    pub images: Vec<PathBuf>,
    /// DDIM steps (the strided list the sampler would walk with `sample.steps = steps`).
    pub steps: usize,
    /// Which weights of the checkpoint.
    pub weights: Weights,
    /// The latents file to write.
    pub out: PathBuf,
}

/// What [`run`] did.
#[derive(Debug)]
pub struct Inverted {
    /// The latents `[N, C, S, S]` on the CPU.
    pub latents: Tensor,
    /// The images inverted, in order.
    pub images: Vec<PathBuf>,
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
}

/// The sampler `cfg` asks for with `sample.steps`, DDIM η = 0 and no clipping of x̂_0: the
/// walk that inverts and the walk that decodes the latents again.
fn ddim_sampler(cfg: &Config, schedule: &Schedule, steps: usize) -> Result<Sampler> {
    let mut sc = cfg.sampler(None);
    sc.steps = Some(steps);
    sc.eta = Some(0.0);
    sc.clip_each_step = false;
    Sampler::new(schedule, sc)
}

/// Inverts `images` `[N, C, S, S]` with `model` under `schedule` along the DDIM (η = 0) walk of
/// `steps` steps of `cfg`, `sample.batch_size` images at a time; returns the latents on the CPU.
pub fn invert_images<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    cfg: &Config,
    images: &Tensor,
    steps: usize,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let sampler = ddim_sampler(cfg, schedule, steps)?;
    let inverter = Inverter::for_sampler(schedule, &sampler)?;
    let n = images.size()[0] as usize;
    let b = generate::batch_size(cfg).clamp(1, n.max(1));
    let total = inverter.steps().len() as u64;
    progress.start(total * n.div_ceil(b) as u64, 0, "steps");
    let result = (|| {
        let mut out = Vec::new();
        for (j, first) in (0..n).step_by(b).enumerate() {
            let size = b.min(n - first) as i64;
            let x0 = images
                .f_narrow(0, first as i64, size)?
                .f_to_device(device)?;
            let done = j as u64 * total;
            let x = inverter.invert(model, &x0, |i, _| progress.update(done + i as u64))?;
            out.push(x.f_to_device(Device::Cpu)?);
        }
        Ok(Tensor::f_cat(&out, 0)?)
    })();
    progress.finish();
    result
}

/// `ddpm invert`: loads the checkpoint at `path` with `opts.weights`, the images (exactly the
/// model's shape), inverts them and writes the latents to `opts.out` with the settings in its
/// metadata. `overrides` (e.g. `sample.batch_size`) are layered over the run's configuration.
pub fn run(
    path: &Path,
    overrides: toml::Table,
    origin: &str,
    opts: &InvertOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Inverted> {
    let files = image_paths(&opts.images)?;
    grid::ensure_writable(&opts.out)?;
    let model = checkpoint::load_model(path, device, opts.weights)?;
    let cfg = generate::settings(&model.config, overrides, origin)?;
    let images = load_images(&files, cfg.image_shape())?;
    let sampler = ddim_sampler(&cfg, &model.schedule, opts.steps)?;
    let latents = invert_images(
        &model.net,
        &model.schedule,
        &cfg,
        &images,
        opts.steps,
        device,
        progress,
    )?;
    let pairs = Inverter::for_sampler(&model.schedule, &sampler)?
        .steps()
        .to_vec();
    let listed: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let meta = HashMap::from([
        (
            "checkpoint".into(),
            model.checkpoint.dir.display().to_string(),
        ),
        ("step".into(), model.checkpoint.manifest.step.to_string()),
        ("t_max".into(), cfg.diffusion.t_max.to_string()),
        ("schedule".into(), format!("{:?}", cfg.diffusion.schedule)),
        ("steps".into(), opts.steps.to_string()),
        ("eta".into(), "0".into()),
        (
            "pairs".into(),
            serde_json::to_string(&pairs).unwrap_or_default(),
        ),
        (
            "weights".into(),
            match opts.weights {
                Weights::Ema => "ema",
                Weights::Raw => "raw",
            }
            .into(),
        ),
        (
            "images".into(),
            serde_json::to_string(&listed).unwrap_or_default(),
        ),
    ]);
    save_latents(&opts.out, &latents, &meta)?;
    Ok(Inverted {
        latents,
        images: files,
        checkpoint: model.checkpoint.dir.clone(),
    })
}

/// Whether the partial config table `table` sets `key` (`section.name`).
fn sets(table: &toml::Table, key: &str) -> bool {
    let (section, name) = key.split_once('.').unwrap_or(("", key));
    table
        .get(section)
        .and_then(|s| s.as_table())
        .is_some_and(|s| s.contains_key(name))
}

/// The overrides `ddpm sample --latents` decodes with: `overrides` as given, and where they do
/// not say, DDIM η = 0 at the step count the latents record (else the run's) without clipping
/// x̂_0 — the walk that returns the inverted images.
pub fn decoding_overrides(mut overrides: toml::Table, latents: &Latents) -> toml::Table {
    if !sets(&overrides, "sample.eta") {
        crate::config::set_key(&mut overrides, "sample.eta", toml::Value::Float(0.0));
    }
    if !sets(&overrides, "sample.clip_each_step") {
        crate::config::set_key(
            &mut overrides,
            "sample.clip_each_step",
            toml::Value::Boolean(false),
        );
    }
    if let (false, Some(steps)) = (sets(&overrides, "sample.steps"), latents.steps()) {
        let steps = toml::Value::Integer(i64::try_from(steps).unwrap_or(i64::MAX));
        crate::config::set_key(&mut overrides, "sample.steps", steps);
    }
    overrides
}

/// Decodes `latents` `[N, C, S, S]` with `model` and the sampler `cfg.sample` asks for,
/// `sample.batch_size` at a time (batch j's noise, if the sampler adds any, seeded with
/// [`generate::batch_seed`]`(seed, j)`); the images on the CPU.
pub fn decode<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &Schedule,
    cfg: &Config,
    latents: &Tensor,
    seed: i64,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let sampler = Sampler::new(schedule, cfg.sampler(None))?;
    let n = latents.size()[0] as usize;
    let b = generate::batch_size(cfg).clamp(1, n.max(1));
    let total = sampler.steps().len() as u64;
    progress.start(total * n.div_ceil(b) as u64, 0, "steps");
    let result = (|| {
        let mut out = Vec::new();
        for (j, first) in (0..n).step_by(b).enumerate() {
            let size = b.min(n - first) as i64;
            let x = latents
                .f_narrow(0, first as i64, size)?
                .f_to_device(device)?;
            tch::manual_seed(generate::batch_seed(seed, j));
            let done = j as u64 * total;
            let images = sampler.sample_from(model, &x, |i, _| progress.update(done + i as u64))?;
            out.push(images.f_to_device(Device::Cpu)?);
        }
        Ok(Tensor::f_cat(&out, 0)?)
    })();
    progress.finish();
    result
}

/// `ddpm sample --latents FILE`: the checkpoint's network decodes the latents of `file` (their
/// shape checked against the model) with [`decoding_overrides`]; writes `opts.out` and
/// `opts.each` as `ddpm sample` does (`opts.n` is the number of latents).
pub fn run_decode(
    path: &Path,
    file: &Path,
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
    generate::check_request(opts)?;
    let model = generate::load(path, device, opts)?;
    let latents = load_latents(file, model.config.image_shape())?;
    let cfg = generate::settings(
        &model.config,
        decoding_overrides(overrides, &latents),
        origin,
    )?;
    let images = decode(
        &crate::graph::Graphed::new(&model.net, opts.cuda_graph),
        &model.schedule,
        &cfg,
        &latents.latents,
        opts.seed,
        device,
        progress,
    )?;
    let opts = SampleOptions {
        n: images.size()[0] as usize,
        ..opts.clone()
    };
    generate::write(&images, &opts, cfg.sample.grid_scale)?;
    Ok(Sampled {
        count: opts.n,
        images: Some(images),
        checkpoint: model.checkpoint.dir.clone(),
        step: model.checkpoint.manifest.step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;
    use crate::timesteps::{step_pairs, strided};

    #[test]
    fn walks_the_generation_list_upwards_and_undoes_a_step_with_the_same_noise() {
        let _rng = crate::sampler::rng_lock();
        let s = Schedule::new(ScheduleKind::Cosine, 40, Device::Cpu).unwrap();
        let gen = step_pairs(&strided(40, 5).unwrap());
        let inv = Inverter::new(&s, &gen).unwrap();
        let up: Vec<(i64, i64)> = gen.iter().rev().map(|&(t, p)| (p, t)).collect();
        assert_eq!(inv.steps(), &up[..]);
        let cfg = crate::sampler::SamplerConfig {
            steps: Some(5),
            eta: Some(0.0),
            ..Default::default()
        };
        let sampler = Sampler::new(&s, cfg).unwrap();
        let x = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        let e = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        for i in 0..inv.steps().len() {
            let upx = inv.step(i, &x, &e).unwrap();
            let back = sampler.step(gen.len() - 1 - i, &upx, &e, None).unwrap();
            let diff = f64::try_from((back - &x).abs().max()).unwrap();
            assert!(diff < 1e-10, "step {i}: {diff}");
        }
        assert!(Inverter::new(&s, &[(40, 3), (2, 0)]).is_err());
        assert!(Inverter::new(&s, &[(30, 0)]).is_err());
        assert!(inv.step(9, &x, &e).is_err());
    }

    #[test]
    fn latents_round_trip_and_bad_files_are_errors() {
        let dir = crate::data::test_dir("latents");
        let x = Tensor::randn([2, 1, 4, 4], (Kind::Float, Device::Cpu));
        let path = dir.join("z.safetensors");
        let meta = HashMap::from([("steps".to_string(), "7".to_string())]);
        save_latents(&path, &x, &meta).unwrap();
        let back = load_latents(&path, [1, 4, 4]).unwrap();
        assert_eq!(
            f64::try_from((&back.latents - &x).abs().max()).unwrap(),
            0.0
        );
        assert_eq!(back.steps(), Some(7));
        assert_eq!(back.metadata["format"], LATENTS_FORMAT);
        assert!(matches!(
            load_latents(&path, [1, 5, 5]),
            Err(DdpmError::ShapeMismatch {
                what: "latents",
                ..
            })
        ));
        std::fs::write(dir.join("junk"), b"junk").unwrap();
        assert!(matches!(
            load_latents(&dir.join("junk"), [1, 4, 4]),
            Err(DdpmError::Latents { .. })
        ));
    }
}
