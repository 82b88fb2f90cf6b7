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
    /// Class labels, for conditional training only.
    labels: Option<Labels>,
}

/// The class of every sample: Int64 `[N]` on the CPU with values 0..K, and the K names.
#[derive(Debug)]
pub struct Labels {
    y: Tensor,
    names: Vec<String>,
}

impl Clone for Labels {
    fn clone(&self) -> Self {
        Labels {
            y: self.y.shallow_clone(),
            names: self.names.clone(),
        }
    }
}

impl Clone for Dataset {
    fn clone(&self) -> Self {
        // The stored values are never mutated, so sharing their storage is safe.
        Dataset {
            values: self.values.shallow_clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
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
            labels: None,
        })
    }

    /// The same samples with class labels: `labels[i]` in 0..K is sample i's class, K =
    /// `names.len()` (at least 1).
    pub fn with_labels(self, labels: &[i64], names: Vec<String>) -> Result<Dataset> {
        let k = names.len() as i64;
        let bad = |reason: String| DdpmError::BadData {
            set: self.name.clone(),
            reason,
        };
        if labels.len() != self.len() {
            return Err(bad(format!(
                "{} labels for {} samples",
                labels.len(),
                self.len()
            )));
        }
        if let Some(l) = labels.iter().find(|&&l| !(0..k).contains(&l)) {
            return Err(bad(format!("label {l} is not a class 0..{k}")));
        }
        if k == 0 {
            return Err(bad("has no classes".into()));
        }
        Ok(Dataset {
            labels: Some(Labels {
                y: Tensor::from_slice(labels),
                names,
            }),
            ..self
        })
    }

    /// The same samples without labels.
    pub fn without_labels(self) -> Dataset {
        Dataset {
            labels: None,
            ..self
        }
    }

    /// The class names, in label order, when the set is labelled.
    pub fn class_names(&self) -> Option<&[String]> {
        self.labels.as_ref().map(|l| l.names.as_slice())
    }

    /// The labels of the samples at `indices` (Int64 on the CPU), when the set is labelled.
    pub fn labels_at(&self, indices: &[i64]) -> Result<Option<Tensor>> {
        match &self.labels {
            None => Ok(None),
            Some(l) => Ok(Some(l.y.f_index_select(0, &Tensor::from_slice(indices))?)),
        }
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
                labels: match &self.labels {
                    None => None,
                    Some(l) => Some(Labels {
                        y: l.y.f_index_select(0, &Tensor::from_slice(idx))?,
                        names: l.names.clone(),
                    }),
                },
            })
        };
        Ok((
            part(train, "training split")?,
            Some(part(test, "held-out split")?),
        ))
    }
}

/// What a data set holds, in a few bytes: how many samples, the shape of one, and the
/// sha256 of every sample's stored bytes in order. Kept in each checkpoint's manifest, so a
/// resumed run can tell whether it reads the data it was trained on.
///
/// It hashes the decoded set (the 8-bit pixels, or the f32 values, exactly as training reads
/// them) rather than the files: that is what the model sees, so re-encoding a PNG without
/// changing a pixel is no change, while renaming files (which reorders them) or resizing them
/// is. It is deterministic across machines (the bytes of a decoded PNG or of the MNIST CSV do
/// not depend on the machine; see docs/usage.md for JPEG) and cheap: one pass over data
/// already in memory (MNIST-5k is 3.9 MB: a sha256 pass of some 15 ms).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFingerprint {
    /// Number of samples N (before the held-out split).
    pub count: usize,
    /// The shape of one sample, e.g. `[1, 28, 28]`.
    pub shape: Vec<i64>,
    /// `u8` (8-bit pixels) or `f32` (real values).
    pub kind: String,
    /// sha256 (hex) of [`FINGERPRINT_VERSION`], the kind, N, the shape (little-endian u64 and
    /// i64) and then every sample's bytes, sample after sample (pixels channel-first); for
    /// labelled data (conditional runs) then the tag `labels`, each class name (its length as
    /// a little-endian u64, then its bytes) and every label (little-endian i64).
    pub sha256: String,
    /// The class names of labelled data (conditional runs); absent otherwise, so the
    /// fingerprint of unlabelled data is what it always was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
}

/// The domain tag that starts every fingerprint's hash; a new one if its definition changes.
pub const FINGERPRINT_VERSION: &str = "ddpm-data-fingerprint-v1";

impl DataFingerprint {
    /// What differs between `self` (the data a run was trained on) and `now`, in words:
    /// the counts, the shapes, or "same count, different content". `None` when they agree.
    pub fn change_to(&self, now: &DataFingerprint) -> Option<String> {
        if self == now {
            return None;
        }
        let mut parts = Vec::new();
        if self.count != now.count {
            let (more, by) = if now.count > self.count {
                ("added", now.count - self.count)
            } else {
                ("removed", self.count - now.count)
            };
            parts.push(format!(
                "{} images in the run, {} now, {by} {more}",
                self.count, now.count
            ));
        }
        if self.classes != now.classes {
            parts.push(format!(
                "classes {:?} in the run, {:?} now",
                self.classes, now.classes
            ));
        }
        if self.shape != now.shape || self.kind != now.kind {
            parts.push(format!(
                "images of shape {:?} ({}) in the run, {:?} ({}) now",
                self.shape, self.kind, now.shape, now.kind
            ));
        }
        if parts.is_empty() {
            parts.push(format!(
                "same count ({}) and shape, different content (sha256 {} in the run, {} now)",
                self.count,
                short(&self.sha256),
                short(&now.sha256)
            ));
        }
        Some(parts.join("; "))
    }
}

/// The first 12 hex digits of a hash, for messages.
fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

impl Dataset {
    /// The set's [`DataFingerprint`]; reads the stored values in chunks, so it needs little
    /// memory beside the set.
    pub fn fingerprint(&self) -> Result<DataFingerprint> {
        use sha2::{Digest, Sha256};
        let kind = if self.is_8bit() { "u8" } else { "f32" };
        let shape = self.item_shape();
        let mut hash = Sha256::new();
        hash.update(FINGERPRINT_VERSION.as_bytes());
        hash.update(kind.as_bytes());
        hash.update((self.len() as u64).to_le_bytes());
        for d in &shape {
            hash.update(d.to_le_bytes());
        }
        let per_item = self.item_dim().max(1) as usize * self.values.kind().elt_size_in_bytes();
        let chunk = (1usize << 22).div_ceil(per_item).max(1) as i64;
        let n = self.len() as i64;
        let mut bytes = Vec::new();
        let mut start = 0;
        while start < n {
            let part = self.values.f_narrow(0, start, chunk.min(n - start))?;
            let numel = part.numel();
            bytes.resize(numel * part.kind().elt_size_in_bytes(), 0);
            // f32 values are hashed as their little-endian bytes on every machine.
            if self.is_8bit() {
                part.f_copy_data_u8(&mut bytes, numel)?;
            } else {
                let values = Vec::<f32>::try_from(part.f_flatten(0, -1)?)?;
                bytes.clear();
                bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            }
            hash.update(&bytes);
            start += chunk;
        }
        if let Some(labels) = &self.labels {
            hash.update(b"labels");
            for name in &labels.names {
                hash.update((name.len() as u64).to_le_bytes());
                hash.update(name.as_bytes());
            }
            for l in Vec::<i64>::try_from(&labels.y)? {
                hash.update(l.to_le_bytes());
            }
        }
        Ok(DataFingerprint {
            count: self.len(),
            shape,
            kind: kind.into(),
            sha256: hash.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            classes: self
                .class_names()
                .map(<[String]>::to_vec)
                .unwrap_or_default(),
        })
    }
}

/// `path` made absolute with every symbolic link resolved (`std::fs::canonicalize`), so that
/// a run finds its data from any working directory; `path` as it is when it cannot be
/// resolved (it does not exist: loading it then says so, naming it as given).
pub fn absolute_path(path: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The data set the configuration names, checked against the model's image shape; labelled
/// when the run is conditional (`train.conditional`: MNIST's digits, a folder's class
/// subfolders, see [`folder::load_classes`]).
pub fn load_dataset(cfg: &Config) -> Result<Dataset> {
    let [c, s, _] = cfg.image_shape();
    let labelled = cfg.train.conditional;
    let data = match cfg.data.source {
        DataSource::Mnist => {
            let path = cfg.data.path.clone().unwrap_or_else(mnist::default_path);
            if labelled {
                mnist::load_labelled(&path, s == 32)?
            } else {
                mnist::load(&path, s == 32)?
            }
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
            if labelled {
                folder::load_classes(dir, s as u32, channels)?
            } else {
                folder::load(dir, s as u32, channels)?
            }
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

/// A fresh, empty directory for one test, removed with its contents when the value drops (a
/// `tempfile::TempDir` that reads as its path, so a test writes `dir.join(…)`).
#[cfg(test)]
pub(crate) struct TestDir(tempfile::TempDir);

#[cfg(test)]
impl std::ops::Deref for TestDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        self.0.path()
    }
}

#[cfg(test)]
impl AsRef<std::path::Path> for TestDir {
    fn as_ref(&self) -> &std::path::Path {
        self.0.path()
    }
}

/// [`TestDir`] named after the test, under the system's temporary directory.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> TestDir {
    TestDir(
        tempfile::Builder::new()
            .prefix(&format!("ddpm-test-{name}-"))
            .tempdir()
            .unwrap(),
    )
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
    fn only_4d_uint8_tensors_are_pixels() {
        let refused = |t: Tensor| match Dataset::from_pixels(t, "bad") {
            Err(DdpmError::ShapeMismatch { what, .. }) => what == "pixels",
            other => panic!("{other:?}"),
        };
        let four_d = [2i64, 1, 2, 2];
        assert!(refused(Tensor::zeros(four_d, (Kind::Float, Device::Cpu))));
        assert!(refused(Tensor::zeros([2, 4], (Kind::Uint8, Device::Cpu))));
        assert!(
            Dataset::from_pixels(Tensor::zeros(four_d, (Kind::Uint8, Device::Cpu)), "ok").is_ok()
        );
    }

    #[test]
    fn a_set_reports_its_name_size_and_sample_shape() {
        let d = toy(3);
        assert_eq!((d.name(), d.len(), d.is_empty()), ("toy", 3, false));
        assert_eq!((d.item_shape(), d.item_dim()), (vec![1, 2, 2], 4));
        let v =
            Dataset::from_values(Tensor::zeros([5, 3], (Kind::Float, Device::Cpu)), "v").unwrap();
        assert_eq!((v.item_dim(), v.is_8bit()), (3, false));
    }

    #[test]
    fn without_labels_forgets_the_labels() {
        let d = toy(3)
            .with_labels(&[0, 1, 0], vec!["a".into(), "b".into()])
            .unwrap();
        assert_eq!(d.class_names().map(<[String]>::len), Some(2));
        let d = d.without_labels();
        assert!(d.class_names().is_none());
        assert!(d.labels_at(&[0, 1]).unwrap().is_none());
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
    fn the_fingerprint_changes_with_one_pixel_and_names_the_change() {
        let a = toy(50).fingerprint().unwrap();
        assert_eq!(a, toy(50).fingerprint().unwrap(), "the same data twice");
        assert_eq!(
            (a.count, a.shape.clone(), a.kind.as_str()),
            (50, vec![1, 2, 2], "u8")
        );
        assert_eq!(a.sha256.len(), 64);
        assert_eq!(a.change_to(&a), None);

        let all: Vec<i64> = (0..50).collect();
        let px = toy(50).raw(&all).unwrap();
        let _ = px.get(17).get(0).get(1).get(0).fill_(200);
        let one = Dataset::from_pixels(px, "toy")
            .unwrap()
            .fingerprint()
            .unwrap();
        assert_ne!(one.sha256, a.sha256, "one pixel changed");
        let said = a.change_to(&one).unwrap();
        assert_eq!(
            said,
            format!(
                "same count (50) and shape, different content (sha256 {} in the run, {} now)",
                &a.sha256[..12],
                &one.sha256[..12]
            )
        );

        // 50 − 47 = 3, where 50 / 47 would be 1.
        let fewer = toy(47).fingerprint().unwrap();
        let said = a.change_to(&fewer).unwrap();
        assert_eq!(said, "50 images in the run, 47 now, 3 removed");
        let said = fewer.change_to(&a).unwrap();
        assert_eq!(said, "47 images in the run, 50 now, 3 added");

        // The order is part of the content (it fixes the epochs and the split).
        let reversed: Vec<i64> = (0..50).rev().collect();
        let px = toy(50).raw(&reversed).unwrap();
        let back = Dataset::from_pixels(px, "toy")
            .unwrap()
            .fingerprint()
            .unwrap();
        assert_ne!(back.sha256, a.sha256);

        // The same values as f32 are another kind of data.
        let values = toy(50).batch(&all).unwrap();
        let real = Dataset::from_values(values.shallow_clone(), "real").unwrap();
        let f = real.fingerprint().unwrap();
        assert_eq!(f.kind, "f32");
        assert_eq!(
            f,
            Dataset::from_values(values, "again")
                .unwrap()
                .fingerprint()
                .unwrap()
        );
        assert!(
            a.change_to(&f).unwrap().contains("(u8) in the run"),
            "{f:?}"
        );
    }

    /// The fingerprint is the sha256 of the byte stream its doc comment defines, computed here
    /// in one piece; the set spans several of `fingerprint`'s 4 MiB chunks, the last partial.
    #[test]
    fn the_fingerprint_is_the_sha256_of_the_documented_bytes_across_chunks() {
        use sha2::{Digest, Sha256};
        let (n, side) = (1500i64, 64i64);
        let px = Tensor::arange(n * side * side, (Kind::Int64, Device::Cpu))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([n, 1, side, side]);
        let mut stream = Vec::new();
        stream.extend(FINGERPRINT_VERSION.as_bytes());
        stream.extend(b"u8");
        stream.extend((n as u64).to_le_bytes());
        for d in [1i64, side, side] {
            stream.extend(d.to_le_bytes());
        }
        let mut pixels = vec![0u8; px.numel()];
        px.copy_data_u8(&mut pixels, px.numel());
        stream.extend(&pixels);
        let hex: String = Sha256::digest(&stream)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let f = Dataset::from_pixels(px, "chunks")
            .unwrap()
            .fingerprint()
            .unwrap();
        assert!(n * side * side > 1 << 22, "more than one chunk");
        assert_eq!((f.count, f.sha256), (1500, hex));
    }

    /// `load_dataset` reads the configured source at the model's image shape (MNIST 28 or
    /// padded to 32, a folder in grey or RGB), labelled exactly when the run is conditional,
    /// and refuses images of another shape.
    #[test]
    fn the_configured_source_loads_at_the_models_shape_labelled_when_conditional() {
        let dir = test_dir("load_dataset");
        let csv = dir.join("digits.csv");
        let row = |label: u8| {
            let mut v = vec!["9".to_string(); mnist::PIXELS];
            v.push(label.to_string());
            v.join(",")
        };
        std::fs::write(&csv, format!("{}\n{}\n", row(3), row(5))).unwrap();
        let mut cfg = Config::mnist();
        cfg.data.path = Some(csv);
        for (size, conditional) in [(28, false), (32, false), (28, true), (32, true)] {
            cfg.model.image_size = size;
            cfg.train.conditional = conditional;
            let d = load_dataset(&cfg).unwrap();
            assert_eq!((d.len(), d.item_shape()), (2, vec![1, size, size]));
            assert_eq!(
                d.class_names().is_some(),
                conditional,
                "{size} {conditional}"
            );
        }
        cfg.train.conditional = false;
        cfg.model.in_channels = 3;
        cfg.model.image_size = 28;
        assert!(matches!(
            load_dataset(&cfg),
            Err(DdpmError::ShapeMismatch {
                what: "the data set's images",
                ..
            })
        ));

        let images = dir.join("images");
        std::fs::create_dir(&images).unwrap();
        for i in 0..3u8 {
            image::RgbImage::from_pixel(8, 8, image::Rgb([i * 50, 0, 255]))
                .save(images.join(format!("{i}.png")))
                .unwrap();
        }
        cfg.data.source = DataSource::Folder;
        cfg.data.path = Some(images);
        cfg.model.image_size = 8;
        for channels in [1, 3] {
            cfg.model.in_channels = channels;
            let d = load_dataset(&cfg).unwrap();
            assert_eq!((d.len(), d.item_shape()), (3, vec![channels, 8, 8]));
        }
    }

    #[test]
    fn a_data_path_is_made_absolute_or_kept_as_given() {
        let dir = test_dir("absolute_path");
        let file = dir.join("d.csv");
        std::fs::write(&file, "x").unwrap();
        let through_dots = dir.join(".").join("d.csv");
        assert_eq!(absolute_path(&through_dots), file.canonicalize().unwrap());
        let missing = std::path::Path::new("no/such/data.csv");
        assert_eq!(absolute_path(missing), missing);
    }

    #[test]
    fn a_folder_and_its_copy_have_one_fingerprint_and_a_changed_pixel_another() {
        use image::{GrayImage, Luma};
        let dir = test_dir("fingerprint_folder");
        for i in 0..5u8 {
            GrayImage::from_fn(6, 6, |x, y| Luma([i * 40 + (x * 6 + y) as u8]))
                .save(dir.join(format!("{i}.png")))
                .unwrap();
        }
        let load = |d: &std::path::Path| {
            folder::load(d, 6, Channels::Grey)
                .unwrap()
                .fingerprint()
                .unwrap()
        };
        let first = load(&dir);
        assert_eq!(first, load(&dir), "loaded twice");
        let copy = test_dir("fingerprint_folder_copy");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        assert_eq!(first, load(&copy), "a copy of the folder");
        let mut img = image::open(copy.join("3.png")).unwrap().to_luma8();
        img.put_pixel(2, 4, Luma([255]));
        img.save(copy.join("3.png")).unwrap();
        let changed = load(&copy);
        assert_eq!((changed.count, &changed.shape), (5, &first.shape));
        assert_ne!(changed.sha256, first.sha256, "one pixel changed");
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
