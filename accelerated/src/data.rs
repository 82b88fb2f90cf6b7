//! Training data: the embedded MNIST-5k, image folders, synthetic laws with exact oracles.
pub mod folder;
pub mod loader;
pub mod mixture;
pub mod mnist;

use crate::config::{Config, DataSource};
use crate::error::{DdpmError, Result};
use folder::Channels;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

/// Independent random streams derived from the run's seed, so that any step can be
/// regenerated from (seed, step) alone and a resumed run draws exactly what an
/// uninterrupted one would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// The held-out split.
    Split = 1,
    /// The order of the training set in one epoch (counter = epoch).
    Epoch = 2,
    /// The t, ε and flips of one training step (counter = step).
    Step = 3,
    /// Synthetic data sets (counter chosen by the caller).
    Synthetic = 4,
}

/// A ChaCha-based generator keyed by (seed, stream, counter): distinct keys give
/// independent streams, and the same key always gives the same numbers.
pub fn seeded_rng(seed: u64, stream: Stream, counter: u64) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(stream as u64).to_le_bytes());
    key[16..24].copy_from_slice(&counter.to_le_bytes());
    StdRng::from_seed(key)
}

/// A data set held in memory on the CPU: 8-bit images (pixel k ↦ x = 2k/255 − 1, the grid
/// the discretised decoder L_0 assumes) or real vectors already in model space.
#[derive(Debug)]
pub struct Dataset {
    values: Tensor,
    name: String,
}

impl Clone for Dataset {
    fn clone(&self) -> Self {
        // The stored values are never mutated, so sharing their storage is safe.
        Dataset {
            values: self.values.shallow_clone(),
            name: self.name.clone(),
        }
    }
}

impl Dataset {
    /// 8-bit images `[N, C, H, W]` (Uint8).
    pub fn from_pixels(pixels: Tensor, name: impl Into<String>) -> Result<Dataset> {
        if pixels.kind() != Kind::Uint8 || pixels.dim() != 4 {
            return Err(DdpmError::ShapeMismatch {
                what: "pixels",
                expected: format!("a Uint8 tensor [N, C, H, W] (got kind {:?})", pixels.kind()),
                got: pixels.size(),
            });
        }
        Dataset::checked(pixels, name.into())
    }

    /// Real-valued samples `[N, ...]` (stored as f32), used as they are.
    pub fn from_values(values: Tensor, name: impl Into<String>) -> Result<Dataset> {
        if values.dim() < 2 {
            return Err(DdpmError::ShapeMismatch {
                what: "samples",
                expected: "[N, ...]".into(),
                got: values.size(),
            });
        }
        Dataset::checked(
            values.to_kind(Kind::Float).to_device(Device::Cpu),
            name.into(),
        )
    }

    fn checked(values: Tensor, name: String) -> Result<Dataset> {
        if values.size()[0] == 0 {
            return Err(DdpmError::BadData {
                set: name,
                reason: "is empty".into(),
            });
        }
        Ok(Dataset {
            values: values.contiguous(),
            name,
        })
    }

    /// Where the data came from, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of samples N.
    pub fn len(&self) -> usize {
        self.values.size()[0] as usize
    }

    /// Whether the set has no samples (never true for a constructed set).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape of one sample, e.g. `[1, 28, 28]`.
    pub fn item_shape(&self) -> Vec<i64> {
        self.values.size()[1..].to_vec()
    }

    /// Number of dimensions d of one sample.
    pub fn item_dim(&self) -> i64 {
        self.item_shape().iter().product()
    }

    /// Whether the samples are 8-bit images (required by the discretised decoder L_0).
    pub fn is_8bit(&self) -> bool {
        self.values.kind() == Kind::Uint8
    }

    /// The raw stored values of the samples at `indices` (Uint8 pixels or f32 values).
    pub fn raw(&self, indices: &[i64]) -> Result<Tensor> {
        let idx = Tensor::from_slice(indices);
        Ok(self.values.f_index_select(0, &idx)?)
    }

    /// The samples at `indices` in model space, f32 on the CPU.
    pub fn batch(&self, indices: &[i64]) -> Result<Tensor> {
        let raw = self.raw(indices)?;
        Ok(if self.is_8bit() {
            pixels_to_model(&raw)?
        } else {
            raw
        })
    }

    /// Splits off `holdout` samples, chosen by a permutation seeded with `seed`, as
    /// `(train, held_out)`; `held_out` is `None` when `holdout` is 0.
    pub fn split(&self, holdout: usize, seed: u64) -> Result<(Dataset, Option<Dataset>)> {
        if holdout == 0 {
            return Ok((self.clone(), None));
        }
        if holdout >= self.len() {
            return Err(DdpmError::OutOfRange {
                key: "data.holdout",
                value: holdout.to_string(),
                expected: format!(
                    "less than the {} samples of {}, to leave some to train on",
                    self.len(),
                    self.name
                ),
            });
        }
        let mut order: Vec<i64> = (0..self.len() as i64).collect();
        order.shuffle(&mut seeded_rng(seed, Stream::Split, 0));
        let (test, train) = order.split_at(holdout);
        let part = |idx: &[i64], what: &str| -> Result<Dataset> {
            Ok(Dataset {
                values: self.raw(idx)?,
                name: format!("{} ({what})", self.name),
            })
        };
        Ok((
            part(train, "training split")?,
            Some(part(test, "held-out split")?),
        ))
    }
}

/// The data set the configuration names, checked against the model's image shape.
pub fn load_dataset(cfg: &Config) -> Result<Dataset> {
    let [c, s, _] = cfg.image_shape();
    let data = match cfg.data.source {
        DataSource::Mnist => {
            let path = cfg.data.path.clone().unwrap_or_else(mnist::default_path);
            mnist::load(&path, s == 32)?
        }
        DataSource::Folder => {
            let dir = cfg
                .data
                .path
                .as_ref()
                .ok_or_else(|| DdpmError::Incompatible {
                    key: "data.source",
                    other: "an absent data.path".into(),
                    reason: "data.source = folder needs the image directory in data.path".into(),
                })?;
            let channels = if c == 3 {
                Channels::Rgb
            } else {
                Channels::Grey
            };
            folder::load(dir, s as u32, channels)?
        }
    };
    if data.item_shape() != cfg.image_shape() {
        return Err(DdpmError::ShapeMismatch {
            what: "the data set's images",
            expected: format!("{:?}, the model's input", cfg.image_shape()),
            got: data.item_shape(),
        });
    }
    Ok(data)
}

/// The run's data split into (training, held-out), seeded with the run's seed.
pub fn load_split(cfg: &Config) -> Result<(Dataset, Option<Dataset>)> {
    split(cfg, &load_dataset(cfg)?)
}

/// The (training, held-out) split of the run's data, seeded with the run's seed.
pub fn split(cfg: &Config, data: &Dataset) -> Result<(Dataset, Option<Dataset>)> {
    data.split(cfg.data.holdout, cfg.train.seed)
}

/// 8-bit pixels k ↦ x = 2k/255 − 1 ∈ [−1, 1], f32.
pub fn pixels_to_model(pixels: &Tensor) -> Result<Tensor> {
    Ok(pixels
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(2.0 / 255.0)?
        .f_sub_scalar(1.0)?)
}

/// A fresh, empty directory for one test (cleared first if an earlier run left it).
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ddpm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: i64) -> Dataset {
        let px = Tensor::arange(n, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Uint8)
            .view([n, 1, 1, 1])
            .repeat([1, 1, 2, 2]);
        Dataset::from_pixels(px, "toy").unwrap()
    }

    #[test]
    fn pixels_map_to_the_decoder_grid() {
        let px = Tensor::from_slice(&[0u8, 255, 51]);
        let x = Vec::<f32>::try_from(pixels_to_model(&px).unwrap()).unwrap();
        assert_eq!(x[0], -1.0);
        assert_eq!(x[1], 1.0);
        assert!((x[2] - (2.0 * 51.0 / 255.0 - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn split_is_a_seeded_partition() {
        let d = toy(50);
        let (train, test) = d.split(10, 7).unwrap();
        let test = test.unwrap();
        assert_eq!((train.len(), test.len()), (40, 10));
        let ids = |s: &Dataset| -> Vec<u8> {
            let all: Vec<i64> = (0..s.len() as i64).collect();
            let raw = s.raw(&all).unwrap().select(1, 0).select(1, 0).select(1, 0);
            Vec::<u8>::try_from(raw).unwrap()
        };
        let mut both = [ids(&train), ids(&test)].concat();
        both.sort_unstable();
        assert_eq!(both, (0..50u8).collect::<Vec<_>>());
        let (_, again) = d.split(10, 7).unwrap();
        assert_eq!(ids(&again.unwrap()), ids(&test));
        let (_, other) = d.split(10, 8).unwrap();
        assert_ne!(ids(&other.unwrap()), ids(&test));
        assert!(d.split(50, 7).is_err());
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        use rand::Rng;
        let draw = |s, st, c| seeded_rng(s, st, c).random::<u64>();
        assert_eq!(draw(1, Stream::Step, 5), draw(1, Stream::Step, 5));
        assert_ne!(draw(1, Stream::Step, 5), draw(1, Stream::Step, 6));
        assert_ne!(draw(1, Stream::Step, 5), draw(1, Stream::Epoch, 5));
        assert_ne!(draw(1, Stream::Step, 5), draw(2, Stream::Step, 5));
    }
}
