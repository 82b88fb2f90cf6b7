//! Memory estimates, checked before anything large is allocated: a request that cannot fit
//! (a network too wide or too deep, a batch too large) is refused up front with
//! [`DdpmError::OutOfMemory`] — what it needs, what the device has, and the setting to lower —
//! instead of failing inside libtorch.
//!
//! The estimates are f32 bytes counted from the network's layout (see `unet.rs`), a little
//! above what libtorch measurably uses: sampling the `mnist` network takes about 1.0 MB an
//! image (peak RSS of `ddpm sample` at 512 and 1024 images), the estimate says 1.3 MB.
//! Available memory is `MemAvailable` of /proc/meminfo on the CPU (no check where there is no
//! such file); on CUDA the check allocates the bytes once and frees them, and the free memory
//! is read from libtorch's message when that fails.

use crate::error::{DdpmError, Result};
use crate::unet::{TimeEmbedding, UNetConfig};
use tch::{Device, Kind, Tensor};

/// Bytes of an f32.
const F32: u64 = 4;

/// The network's scalar parameters, counted from its layout (equal to what `UNet::new` builds);
/// `None` when the count does not fit in a u64.
pub fn parameter_count(cfg: &UNetConfig) -> Option<u64> {
    let u = |v: i64| u64::try_from(v).ok();
    let conv = |i: u64, o: u64, k: u64| i.checked_mul(o)?.checked_mul(k * k)?.checked_add(o);
    let e = u(cfg.time_dim())?;
    let block = |i: u64, o: u64| -> Option<u64> {
        let skip = if i != o { conv(i, o, 1)? } else { 0 };
        e.checked_mul(i)?
            .checked_add(conv(i, o, 3)?)?
            .checked_add(conv(o, o, 3)?)?
            .checked_add(o.checked_mul(4)?)?
            .checked_add(skip)
    };
    let b = u(cfg.base_channels)?;
    let c_in = u(cfg.in_channels)?;
    let time = match cfg.time_embedding {
        TimeEmbedding::Learned => u(cfg.t_max)?.checked_mul(b)?,
        TimeEmbedding::Sinusoidal => {
            let w = b.checked_mul(4)?;
            b.checked_mul(w)?
                .checked_add(w)?
                .checked_add(w.checked_mul(w)?)?
                .checked_add(w)?
        }
    };
    let chans = cfg
        .channel_mults
        .iter()
        .map(|&m| u(m)?.checked_mul(b))
        .collect::<Option<Vec<u64>>>()?;
    let blocks = u(cfg.blocks_per_level)?;
    let mut total = time
        .checked_add(conv(c_in, b, 3)?)?
        .checked_add(2 * b)?
        .checked_add(conv(b, c_in, 3)?)?;
    let mut c = b;
    // Down and up paths: the first block of a level changes the channels, the rest keep them.
    let path = |total: &mut u64, c: &mut u64, cl: u64| -> Option<()> {
        if blocks > 0 {
            let first = block(*c, cl)?;
            let rest = block(cl, cl)?.checked_mul(blocks - 1)?;
            *total = total.checked_add(first)?.checked_add(rest)?;
            *c = cl;
        }
        Some(())
    };
    for &cl in &chans {
        path(&mut total, &mut c, cl)?;
    }
    total = total.checked_add(block(c, c)?)?;
    for &cl in chans.iter().rev() {
        path(&mut total, &mut c, cl)?;
    }
    Some(total)
}

/// Bytes of the network's weights (f32) and of its schedule's f64 tables; `None` on overflow.
pub fn model_bytes(cfg: &UNetConfig) -> Option<u64> {
    let tables = u64::try_from(cfg.t_max)
        .ok()?
        .checked_add(1)?
        .checked_mul(16 * 8)?;
    parameter_count(cfg)?.checked_mul(F32)?.checked_add(tables)
}

/// Per level ℓ: (S_ℓ², C_ℓ, the widest input a block of the level takes).
fn levels(cfg: &UNetConfig) -> Option<Vec<(u64, u64, u64)>> {
    let chans: Vec<u64> = cfg
        .level_channels()
        .iter()
        .map(|&c| u64::try_from(c).ok())
        .collect::<Option<_>>()?;
    let s = u64::try_from(cfg.image_size).ok()?;
    (0..chans.len())
        .map(|l| {
            let side = s >> l.min(63);
            let widest = chans[l.saturating_sub(1)]
                .max(chans[l])
                .max(chans[(l + 1).min(chans.len() - 1)]);
            Some((side.checked_mul(side)?, chans[l], widest))
        })
        .collect()
}

/// Bytes one image needs while the network samples it (no gradients): the skips kept for the
/// up path, conv_in's output, a residual block's working tensors at the widest level, and the
/// sampler's x, z, ε̂ and x′. `None` on overflow.
pub fn sampling_bytes_per_image(cfg: &UNetConfig) -> Option<u64> {
    let blocks = u64::try_from(cfg.blocks_per_level).ok()?;
    let image = u64::try_from(cfg.in_channels)
        .ok()?
        .checked_mul(u64::try_from(cfg.image_size).ok()?.pow(2))?;
    let mut floats = image.checked_mul(4)?;
    let mut widest = 0u64;
    for (area, c, wide) in levels(cfg)? {
        floats = floats.checked_add(blocks.checked_mul(c)?.checked_mul(area)?)?;
        widest = widest.max(wide.checked_mul(area)?);
    }
    let (area0, c0, _) = *levels(cfg)?.first()?;
    floats = floats
        .checked_add(c0.checked_mul(area0)?)?
        .checked_add(widest.checked_mul(5)?)?;
    floats.checked_mul(F32)
}

/// Bytes one training image needs: every block's activations are kept for the backward pass
/// (about twelve tensors of the block's widest width), plus its gradients' transients.
/// `None` on overflow.
pub fn training_bytes_per_image(cfg: &UNetConfig) -> Option<u64> {
    let blocks = u64::try_from(cfg.blocks_per_level).ok()?;
    let mut floats = sampling_bytes_per_image(cfg)? / F32;
    for (area, _, wide) in levels(cfg)? {
        // Down and up blocks of the level (the middle block counted with the last level).
        let per_block = wide.checked_mul(area)?.checked_mul(12)?;
        floats =
            floats.checked_add(per_block.checked_mul(blocks.checked_mul(2)?.checked_add(1)?)?)?;
    }
    floats.checked_mul(F32)
}

/// Refuses a training run of `cfg` that cannot fit on `device`: the weights with their
/// gradients, LAMB's two moments and the EMA copy (five f32 copies), LAMB's working memory
/// (two f32 buffers, an f64 one and an Int32 index over the adapted weights: at most five f32
/// copies more; lamb.rs), one training batch, and
/// the grid of `sample.n` images the run draws (`sample.batch_size` at a time, all of them
/// kept for the picture).
pub fn check_training(cfg: &crate::config::Config, device: Device) -> Result<()> {
    let m = &cfg.model;
    let params = parameter_count(m).and_then(|p| p.checked_mul(10 * F32));
    let per_image = training_bytes_per_image(m);
    let per_sample = sampling_bytes_per_image(m);
    // First the network with one image of each: if that does not fit, the network is too large.
    let one = params
        .and_then(|p| p.checked_add(per_image?))
        .and_then(|p| p.checked_add(per_sample?));
    check(
        "training the network (weights, gradients, LAMB's moments, EMA) on one image",
        one,
        model_key(m),
        device,
    )?;
    let batch = per_image.and_then(|per| per.checked_mul(cfg.train.batch_size as u64));
    let grid_batch = crate::generate::batch_size(cfg).clamp(1, cfg.sample.n.max(1));
    let image = u64::try_from(m.in_channels.max(0))
        .ok()
        .and_then(|c| c.checked_mul(u64::try_from(m.image_size.max(0)).ok()?.pow(2)))
        .and_then(|d| d.checked_mul(F32));
    let grid = per_sample
        .and_then(|per| per.checked_mul(grid_batch as u64))
        .and_then(|b| b.checked_add(image?.checked_mul(cfg.sample.n as u64)?));
    let key = match (batch, grid) {
        (Some(b), Some(g)) if g > b => "sample.n",
        (Some(_), None) => "sample.n",
        _ => "train.batch_size",
    };
    let needed = params
        .and_then(|p| p.checked_add(batch?))
        .and_then(|p| p.checked_add(grid?));
    let what = format!(
        "training with batches of {} images and grids of {}",
        cfg.train.batch_size, cfg.sample.n
    );
    check(&what, needed, key, device)
}

/// The setting that makes a network of `cfg` large: T when its tables (and a learned
/// embedding's rows) are most of it, else the largest of width, multiplier and depth.
pub fn model_key(cfg: &UNetConfig) -> &'static str {
    let t_bytes = (cfg.t_max.max(0) as u64).saturating_mul(match cfg.time_embedding {
        TimeEmbedding::Learned => 128 + 4 * cfg.base_channels.max(0) as u64,
        TimeEmbedding::Sinusoidal => 128,
    });
    let total = model_bytes(cfg).unwrap_or(u64::MAX);
    let widest = cfg.channel_mults.iter().copied().max().unwrap_or(1);
    if t_bytes >= total / 2 {
        return "model.t_max";
    }
    [
        ("model.base_channels", cfg.base_channels),
        ("model.channel_mults", widest),
        ("model.blocks_per_level", cfg.blocks_per_level),
    ]
    .into_iter()
    .max_by_key(|&(_, v)| v)
    .map_or("model.base_channels", |(k, _)| k)
}

/// `MemAvailable` of /proc/meminfo, in bytes (`None` where there is no such file).
pub fn available_cpu() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses `what` when it needs more than `device` has (`needed = None`: more than a u64 of
/// bytes); `key` is the setting to lower, named in the message.
pub fn check(what: &str, needed: Option<u64>, key: &'static str, device: Device) -> Result<()> {
    let refuse = |needed: Option<u64>, available: u64| DdpmError::OutOfMemory {
        what: what.to_string(),
        needed: needed.unwrap_or(u64::MAX),
        available,
        key,
    };
    match device {
        Device::Cuda(_) => {
            let Some(bytes) = needed.and_then(|n| i64::try_from(n).ok()) else {
                return Err(refuse(needed, 0));
            };
            // The caching allocator keeps the block for the work that follows.
            match Tensor::f_empty([bytes], (Kind::Uint8, device)) {
                Ok(_) => Ok(()),
                Err(e) => Err(refuse(needed, cuda_free(&e.to_string()).unwrap_or(0))),
            }
        }
        _ => match (needed, available_cpu()) {
            (Some(n), Some(avail)) if n > avail => Err(refuse(needed, avail)),
            (None, avail) => Err(refuse(None, avail.unwrap_or(0))),
            _ => Ok(()),
        },
    }
}

/// The free memory in libtorch's CUDA out-of-memory message ("… of which 1.50 GiB is free").
fn cuda_free(message: &str) -> Option<u64> {
    let before = &message[..message.find(" is free")?];
    let mut words = before.rsplit(' ');
    let unit = words.next()?;
    let value: f64 = words.next()?.parse().ok()?;
    let scale = match unit {
        "GiB" => 1u64 << 30,
        "MiB" => 1 << 20,
        "KiB" => 1 << 10,
        "bytes" | "B" => 1,
        _ => return None,
    };
    Some((value * scale as f64) as u64)
}

/// `bytes` in the unit that reads best (`1.3 GiB`, `512 KiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes == u64::MAX {
        return "more than 16 EiB".into();
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameter_count_is_the_built_networks() {
        let _rng = crate::sampler::rng_lock();
        for name in ["mnist", "cifar32", "celeba128"] {
            let cfg = UNetConfig::preset(name).unwrap();
            let vs = tch::nn::VarStore::new(Device::Cpu);
            crate::unet::UNet::new(&vs.root(), &cfg).unwrap();
            let built = crate::unet::parameter_count(&vs) as u64;
            assert_eq!(parameter_count(&cfg), Some(built), "{name}");
        }
        let huge = UNetConfig {
            base_channels: i64::MAX / 2,
            ..UNetConfig::mnist()
        };
        assert_eq!(parameter_count(&huge), None);
    }

    #[test]
    fn the_mnist_estimate_is_near_the_measured_megabyte() {
        let per_image = sampling_bytes_per_image(&UNetConfig::mnist()).unwrap();
        assert!((1_000_000..2_000_000).contains(&per_image), "{per_image}");
        assert!(training_bytes_per_image(&UNetConfig::mnist()).unwrap() > 4 * per_image);
    }

    #[test]
    fn refusals_say_what_they_need() {
        let e = check("a test", None, "sample.batch_size", Device::Cpu).unwrap_err();
        assert!(matches!(
            e,
            DdpmError::OutOfMemory {
                needed: u64::MAX,
                key: "sample.batch_size",
                ..
            }
        ));
        assert!(check("a test", Some(1), "sample.batch_size", Device::Cpu).is_ok());
        assert_eq!(
            cuda_free("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.72 GiB of which 1.50 GiB is free."),
            Some(3 << 29)
        );
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12), "12 bytes");
    }
}
