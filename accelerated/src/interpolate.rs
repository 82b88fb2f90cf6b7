//! `ddpm interpolate`: spherical interpolation (slerp) between two latents x_T — drawn from
//! two seeds, read from two latents files, or inverted from two images — decoded with DDIM
//! (η = 0, deterministic) as a row of frames; and, for a conditional model, one latent decoded
//! under a noise prediction that moves from one class to another ([`run_classes`]).
//!
//! Why slerp and not lerp: a latent of d dimensions drawn from N(0, I) has norm ≈ √d (the
//! norm's spread is O(1)), so the sampler only ever starts on that thin shell. The straight
//! line between two independent draws leaves it: the midpoint (a + b)/2 is N(0, I/2), of norm
//! ≈ √(d/2), a start the model never saw (decoded, a washed-out, over-smooth image). Slerp
//! follows the great circle instead, x(w) = sin((1−w)θ)/sin θ · a + sin(wθ)/sin θ · b with
//! cos θ = ⟨a, b⟩/(|a||b|), and keeps the norm where |a| = |b| (docs/derivations.md, section 14).

use crate::checkpoint::{self, Weights};
use crate::error::{DdpmError, Result};
use crate::generate;
use crate::grid;
use crate::guidance::ClassMix;
use crate::invert;
use crate::progress::Progress;
use crate::sampler::Sampler;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The spherical interpolation of the latents `a` and `b` (same shape, each one vector) at
/// w ∈ [0, 1]: x(0) = a, x(1) = b, along the great circle through them with the norm
/// interpolated as the circle does (constant when |a| = |b|). Nearly parallel latents
/// (θ < 1e-6) fall back to the straight line, which is then the same to rounding; opposite ones
/// (θ within 1e-6 of π) have no single great circle and are an error.
pub fn slerp(a: &Tensor, b: &Tensor, w: f64) -> Result<Tensor> {
    crate::marginal::same_shape("a", a, "b", b)?;
    if !(0.0..=1.0).contains(&w) {
        return Err(DdpmError::OutOfRange {
            key: "w",
            value: w.to_string(),
            expected: "in [0, 1]".into(),
        });
    }
    let dot = a.f_mul(b)?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let na = a
        .f_square()?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?
        .sqrt();
    let nb = b
        .f_square()?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?
        .sqrt();
    if na == 0.0 || nb == 0.0 {
        return Err(DdpmError::OutOfRange {
            key: "latents",
            value: "a zero vector".into(),
            expected: "non-zero (slerp needs a direction)".into(),
        });
    }
    let theta = (dot / (na * nb)).clamp(-1.0, 1.0).acos();
    if theta < 1e-6 {
        return Ok(a.f_mul_scalar(1.0 - w)?.f_add(&b.f_mul_scalar(w)?)?);
    }
    if std::f64::consts::PI - theta < 1e-6 {
        return Err(DdpmError::OutOfRange {
            key: "latents",
            value: "two opposite vectors".into(),
            expected: "not opposite (no single great circle joins them)".into(),
        });
    }
    let s = theta.sin();
    let (ca, cb) = (((1.0 - w) * theta).sin() / s, (w * theta).sin() / s);
    Ok(a.f_mul_scalar(ca)?.f_add(&b.f_mul_scalar(cb)?)?)
}

/// `k` ≥ 2 frames from `a` to `b` (both `[1, …]` or `[…]`), w = i/(k − 1): `[k, …]`.
pub fn frames(a: &Tensor, b: &Tensor, k: usize) -> Result<Tensor> {
    if k < 2 {
        return Err(DdpmError::OutOfRange {
            key: "frames",
            value: k.to_string(),
            expected: "at least 2 (the two ends)".into(),
        });
    }
    let strip = |t: &Tensor| -> Result<Tensor> {
        let size = t.size();
        Ok(if size.first() == Some(&1) && size.len() > 1 {
            t.f_squeeze_dim(0)?
        } else {
            t.shallow_clone()
        })
    };
    let (a, b) = (strip(a)?, strip(b)?);
    let all = (0..k)
        .map(|i| slerp(&a, &b, i as f64 / (k - 1) as f64))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_stack(&all, 0)?)
}

/// Where one end of the interpolation comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    /// x_T ~ N(0, I) drawn on the CPU from libtorch's generator seeded with this (the latent
    /// `ddpm sample --seed S --n 1` starts from).
    Seed(i64),
    /// The first latent of a latents file (`ddpm invert`'s output).
    Latents(PathBuf),
    /// An image, inverted first (DDIM, η = 0, at the interpolation's steps).
    Image(PathBuf),
}

/// What `ddpm interpolate` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct InterpolateOptions {
    /// The two ends.
    pub ends: [Endpoint; 2],
    /// Frames, the two ends included (at least 2).
    pub frames: usize,
    /// DDIM steps of the decoding (and of inverting image ends).
    pub steps: usize,
    /// Which weights of the checkpoint.
    pub weights: Weights,
    /// The PNG row of frames.
    pub out: PathBuf,
}

/// `ddpm interpolate`: the two latents, `frames` slerped between them, decoded with DDIM
/// (η = 0, `steps` steps, no clipping of x̂_0) and written as one row of a grid scaled by
/// `sample.grid_scale`. Returns the frames' images `[k, C, S, S]` on the CPU.
pub fn run(
    path: &Path,
    overrides: toml::Table,
    origin: &str,
    opts: &InterpolateOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    if opts.frames < 2 {
        return frames(
            &Tensor::zeros([1], tch::kind::FLOAT_CPU),
            &Tensor::ones([1], tch::kind::FLOAT_CPU),
            opts.frames,
        );
    }
    grid::ensure_writable(&opts.out)?;
    let model = checkpoint::load_model(path, device, opts.weights)?;
    let mut overrides = overrides;
    for (key, value) in [
        ("sample.eta", toml::Value::Float(0.0)),
        ("sample.clip_each_step", toml::Value::Boolean(false)),
        (
            "sample.steps",
            toml::Value::Integer(i64::try_from(opts.steps).unwrap_or(i64::MAX)),
        ),
    ] {
        crate::config::set_key(&mut overrides, key, value);
    }
    let cfg = generate::settings(&model.config, overrides, origin)?;
    let [c, s, _] = cfg.image_shape();
    let mut ends = Vec::new();
    for end in &opts.ends {
        ends.push(match end {
            Endpoint::Seed(seed) => {
                tch::manual_seed(*seed);
                Tensor::f_randn([1, c, s, s], tch::kind::FLOAT_CPU)?
            }
            Endpoint::Latents(file) => invert::load_latents(file, [c, s, s])?
                .latents
                .f_narrow(0, 0, 1)?,
            Endpoint::Image(file) => {
                let image = invert::load_image(file, [c, s, s])?.f_unsqueeze(0)?;
                invert::invert_images(
                    &model.net,
                    &model.schedule,
                    &cfg,
                    &image,
                    opts.steps,
                    device,
                    progress,
                )?
            }
        });
    }
    let latents = frames(&ends[0], &ends[1], opts.frames)?;
    let images = invert::decode(
        &model.net,
        &model.schedule,
        &cfg,
        &latents,
        0,
        device,
        progress,
    )?;
    grid::save_grid_scaled(
        &images,
        &opts.out,
        Some(opts.frames as i64),
        cfg.sample.grid_scale,
    )?;
    Ok(images)
}

/// What `ddpm interpolate --classes A B` asks for: one latent, decoded from class A to class B.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassInterpolateOptions {
    /// The one latent x_T: a seed, or the first latent of a file (an image is refused: which
    /// class would invert it?).
    pub latent: Endpoint,
    /// The two classes, each as `ddpm sample --class` names one (an index or a name).
    pub classes: [String; 2],
    /// Frames, the two ends included (at least 2).
    pub frames: usize,
    /// DDIM steps of the decoding.
    pub steps: usize,
    /// Which weights of the checkpoint.
    pub weights: Weights,
    /// The PNG row of frames.
    pub out: PathBuf,
}

/// `ddpm interpolate --classes A B`: one latent x_T decoded with DDIM (η = 0, `steps` steps, no
/// clipping of x̂_0) under [`ClassMix`] from class A (s = 0) to class B (s = 1), s = i/(k − 1)
/// for frame i, each class's prediction guided with `sample.guidance` (the overrides' or the
/// run's); one row of a grid scaled by `sample.grid_scale`. The frames are decoded one at a
/// time, so the ends run exactly the network calls of `ddpm sample --class A` (and B) with the
/// same seed, η = 0, the same steps and no clipping: they are those images. Returns the frames'
/// images `[k, C, S, S]` on the CPU.
///
/// Errors: [`DdpmError::NotConditional`] for a checkpoint trained without labels,
/// [`DdpmError::UnknownClass`] for a class the model does not have, `OutOfRange` (key
/// `classes`) for a name that is more than one class and (key `latent`) for an image latent.
pub fn run_classes(
    path: &Path,
    overrides: toml::Table,
    origin: &str,
    opts: &ClassInterpolateOptions,
    device: Device,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    if opts.frames < 2 {
        return Err(DdpmError::OutOfRange {
            key: "frames",
            value: opts.frames.to_string(),
            expected: "at least 2 (the two ends)".into(),
        });
    }
    if let Endpoint::Image(_) = opts.latent {
        return Err(image_latent_error());
    }
    grid::ensure_writable(&opts.out)?;
    let model = checkpoint::load_model(path, device, opts.weights)?;
    if model.net.class_count() == 0 {
        return Err(DdpmError::NotConditional {
            what: format!("the checkpoint {}", model.checkpoint.dir.display()),
            reason: "it was trained without labels: model.classes = 0".into(),
            advice: "interpolate between latents instead, or train a conditional run (train.conditional = true)".into(),
        });
    }
    let mut overrides = overrides;
    for (key, value) in [
        ("sample.eta", toml::Value::Float(0.0)),
        ("sample.clip_each_step", toml::Value::Boolean(false)),
        (
            "sample.steps",
            toml::Value::Integer(i64::try_from(opts.steps).unwrap_or(i64::MAX)),
        ),
    ] {
        crate::config::set_key(&mut overrides, key, value);
    }
    let cfg = generate::settings(&model.config, overrides, origin)?;
    let names = generate::class_names(&cfg);
    let mut labels = [0i64; 2];
    for (label, spec) in labels.iter_mut().zip(&opts.classes) {
        let parsed = generate::parse_classes(spec, &names)?;
        *label = match parsed[..] {
            [one] => one,
            _ => {
                return Err(DdpmError::OutOfRange {
                    key: "classes",
                    value: spec.clone(),
                    expected: "one class each (an index or a name)".into(),
                })
            }
        };
    }
    let [c, s, _] = cfg.image_shape();
    let x_t = match &opts.latent {
        Endpoint::Seed(seed) => {
            tch::manual_seed(*seed);
            Tensor::f_randn([1, c, s, s], tch::kind::FLOAT_CPU)?
        }
        Endpoint::Latents(file) => invert::load_latents(file, [c, s, s])?
            .latents
            .f_narrow(0, 0, 1)?,
        Endpoint::Image(_) => return Err(image_latent_error()),
    }
    .f_to_device(device)?;
    let sampler = Sampler::new(&model.schedule, cfg.sampler(None))?;
    let total = sampler.steps().len() as u64;
    let k = opts.frames;
    progress.start(total * k as u64, 0, "steps");
    let result = (|| -> Result<Tensor> {
        let mut out = Vec::with_capacity(k);
        for i in 0..k {
            let mix = ClassMix {
                model: &model.net,
                a: labels[0],
                b: labels[1],
                s: i as f64 / (k - 1) as f64,
                w: cfg.sample.guidance,
            };
            let done = i as u64 * total;
            let image = sampler.sample_from(&mix, &x_t, |j, _| progress.update(done + j as u64))?;
            out.push(image.f_to_device(Device::Cpu)?);
        }
        Ok(Tensor::f_cat(&out, 0)?)
    })();
    progress.finish();
    let images = result?;
    grid::save_grid_scaled(&images, &opts.out, Some(k as i64), cfg.sample.grid_scale)?;
    Ok(images)
}

/// [`run_classes`]' refusal of an image as its latent (checked before any work).
fn image_latent_error() -> DdpmError {
    DdpmError::OutOfRange {
        key: "latent",
        value: "an image".into(),
        expected: "a seed or a latents file (an image has no class to invert it under)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: &Tensor) -> f64 {
        t.square().sum(Kind::Double).double_value(&[]).sqrt()
    }

    #[test]
    fn slerp_keeps_its_definition() {
        let _rng = crate::sampler::rng_lock();
        tch::manual_seed(3);
        let d = 784;
        let a = Tensor::randn([d], (Kind::Double, Device::Cpu));
        let b = Tensor::randn([d], (Kind::Double, Device::Cpu));
        // Ends exactly.
        let diff = |x: &Tensor, y: &Tensor| f64::try_from((x - y).abs().max()).unwrap();
        assert!(diff(&slerp(&a, &b, 0.0).unwrap(), &a) < 1e-12);
        assert!(diff(&slerp(&a, &b, 1.0).unwrap(), &b) < 1e-12);
        // Equal norms: the norm is constant, and the angle from a grows as w θ.
        let b1 = &b * (norm(&a) / norm(&b));
        let cos = |x: &Tensor, y: &Tensor| {
            (x * y).sum(Kind::Double).double_value(&[]) / (norm(x) * norm(y))
        };
        let theta = cos(&a, &b1).acos();
        for w in [0.1, 0.25, 0.5, 0.9] {
            let x = slerp(&a, &b1, w).unwrap();
            assert!((norm(&x) / norm(&a) - 1.0).abs() < 1e-12, "w = {w}");
            assert!((cos(&a, &x).acos() - w * theta).abs() < 1e-9, "w = {w}");
        }
        // Gaussian latents: the lerp midpoint falls to ≈ √(d/2), slerp stays at ≈ √d. With
        // d = 784, |a| and |b| are within 28 ± 3 (6σ, σ = 1/√2); the midpoint's norm of lerp
        // is ≈ 19.8.
        let mid = slerp(&a, &b, 0.5).unwrap();
        let lerp = (&a + &b) / 2.0;
        assert!(
            (norm(&mid) - (d as f64).sqrt()).abs() < 3.0,
            "{}",
            norm(&mid)
        );
        assert!(
            (norm(&lerp) - (d as f64 / 2.0).sqrt()).abs() < 3.0,
            "{}",
            norm(&lerp)
        );
        assert!(slerp(&a, &(-&a), 0.5).is_err());
        assert!(slerp(&a, &b, 1.5).is_err());
        assert_eq!(frames(&a, &b, 5).unwrap().size(), [5, d]);
        assert!(frames(&a, &b, 1).is_err());
    }
}
