//! Checkpoints: a directory `step-NNNNNNN/` holding `model.safetensors` (weights),
//! `ema.safetensors` (averaged weights), `optim.safetensors` (LAMB's moments and step),
//! `config.toml` (the run's configuration), `manifest.json` (step, seed, data position,
//! configuration, the model's tensor names and shapes, the sha256 of every other file, the
//! format version, the data's place as given and fingerprint) and `manifest.sha256` (the manifest's own sha256, so that a damaged
//! manifest is caught too).
//!
//! Written atomically: everything goes into `step-NNNNNNN.tmp/`, each file and the directory
//! are fsynced, the directory is renamed into place and the parent fsynced, and only then
//! are checkpoints beyond the newest K removed. A crash or a full disk leaves at worst a
//! `.tmp` directory, which readers ignore; earlier checkpoints are never touched.

use crate::config::Config;
use crate::error::{DdpmError, Result};
use crate::schedule::Schedule;
use crate::unet::UNet;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Version of the layout below; bumped whenever a reader of the old layout would misread.
pub const FORMAT_VERSION: u32 = 1;
/// The network's weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// The EMA of the weights.
pub const EMA_FILE: &str = "ema.safetensors";
/// LAMB's state.
pub const OPTIM_FILE: &str = "optim.safetensors";
/// The configuration, for people.
pub const CONFIG_FILE: &str = "config.toml";
/// The manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest's sha256 (hex).
pub const MANIFEST_SUM_FILE: &str = "manifest.sha256";
const DATA_FILES: [&str; 4] = [MODEL_FILE, EMA_FILE, OPTIM_FILE, CONFIG_FILE];

/// Where in the data the next step reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPosition {
    /// 0-based epoch of the next step.
    pub epoch: u64,
    /// 0-based batch within that epoch.
    pub batch_in_epoch: u64,
    /// Full batches per epoch.
    pub steps_per_epoch: u64,
}

/// What `manifest.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Updates done.
    pub step: u64,
    /// The run's seed. Every random draw after the initial weights is keyed by (seed, step)
    /// or (seed, epoch) (see `data::seeded_rng`), so (seed, step) is the whole RNG state.
    pub seed: u64,
    /// Where the next step reads, for people (it follows from `step` and the batch size).
    pub data_position: DataPosition,
    /// Updates the EMA has absorbed (its warm-up depends on it).
    pub ema_updates: u64,
    /// Batches skipped for a non-finite loss so far.
    pub skipped_steps: u64,
    /// The run's configuration (T only at `diffusion.t_max`; older manifests with
    /// `model.t_max` too still read).
    #[serde(with = "crate::config::saved")]
    pub config: Config,
    /// Name → shape of every model tensor.
    pub tensors: BTreeMap<String, Vec<i64>>,
    /// File name → sha256 (hex) of the other files.
    pub files: BTreeMap<String, String>,
    /// The data the run was trained on: its place as given and its fingerprint. Absent in
    /// checkpoints written before it was recorded (they still load and resume, unchecked)
    /// and in runs trained on data handed to `train::train_on` directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataRecord>,
}

/// What a checkpoint records of its run's data (the absolute path is the configuration's
/// `data.path`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRecord {
    /// `data.path` as the user gave it (relative to the working directory of that command, or
    /// absolute); absent for the embedded MNIST-5k. For people: readers use `data.path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_given: Option<PathBuf>,
    /// What the whole data set held (before the held-out split), checked on resume.
    pub fingerprint: crate::data::DataFingerprint,
}

/// The tensors of a training state, each as (name, tensor).
#[derive(Debug)]
pub struct TrainingState {
    /// The weights.
    pub model: Vec<(String, Tensor)>,
    /// The averaged weights.
    pub ema: Vec<(String, Tensor)>,
    /// LAMB's state (`Lamb::state`).
    pub optim: Vec<(String, Tensor)>,
}

/// A checkpoint read from disk, every checksum verified.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its tensors, on the CPU.
    pub state: TrainingState,
}

/// `step-NNNNNNN`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:07}")
}

fn parse_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 7 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

/// Finished checkpoints under `root` as (step, dir), oldest first; `.tmp` leftovers and
/// other entries are ignored. A missing `root` has none.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DdpmError::io(format!("cannot list {}", root.display()), e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| DdpmError::io(format!("cannot list {}", root.display()), e))?;
        let step = entry.file_name().to_str().and_then(parse_dir_name);
        if let (Some(step), true) = (step, entry.path().is_dir()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `state` as checkpoint `manifest.step` under `root` (see the module doc), filling
/// in the manifest's tensor shapes and checksums, then keeps only the newest `keep_last`.
pub fn save(
    root: &Path,
    mut manifest: Manifest,
    state: &TrainingState,
    keep_last: usize,
) -> Result<PathBuf> {
    let name = dir_name(manifest.step);
    let dir = root.join(&name);
    let tmp = root.join(format!("{name}.tmp"));
    let written =
        write_tmp(root, &tmp, &mut manifest, state).and_then(|()| publish(root, &tmp, &dir));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(DdpmError::Checkpoint {
            path: dir,
            reason: format!("could not be written, earlier checkpoints are intact: {e}"),
        });
    }
    prune(root, keep_last.max(1));
    Ok(dir)
}

fn write_tmp(
    root: &Path,
    tmp: &Path,
    manifest: &mut Manifest,
    state: &TrainingState,
) -> Result<()> {
    fs::create_dir_all(root)
        .map_err(|e| DdpmError::io(format!("cannot create {}", root.display()), e))?;
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(|e| {
            DdpmError::io(format!("cannot remove the leftover {}", tmp.display()), e)
        })?;
    }
    fs::create_dir(tmp)
        .map_err(|e| DdpmError::io(format!("cannot create {}", tmp.display()), e))?;
    manifest.format_version = FORMAT_VERSION;
    manifest.tensors = state
        .model
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    manifest.files.clear();
    let config = manifest.config.to_toml()?.into_bytes();
    for (file, bytes) in [
        (MODEL_FILE, serialize(&state.model)?),
        (EMA_FILE, serialize(&state.ema)?),
        (OPTIM_FILE, serialize(&state.optim)?),
        (CONFIG_FILE, config),
    ] {
        write_synced(&tmp.join(file), &bytes)?;
        manifest.files.insert(file.to_string(), sha256_hex(&bytes));
    }
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| DdpmError::Encode {
        what: "the manifest",
        cause: e.to_string(),
    })?;
    write_synced(&tmp.join(MANIFEST_FILE), &json)?;
    write_synced(&tmp.join(MANIFEST_SUM_FILE), sha256_hex(&json).as_bytes())?;
    sync_dir(tmp)
}

fn publish(root: &Path, tmp: &Path, dir: &Path) -> Result<()> {
    // Re-saving a step (a run resumed at its last checkpoint) moves the old copy aside first;
    // its `.tmp` name keeps readers away from it.
    let aside = root.join(format!(
        "{}.old.tmp",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("step")
    ));
    let replaced = dir.exists();
    if replaced {
        let _ = fs::remove_dir_all(&aside);
        fs::rename(dir, &aside)
            .map_err(|e| DdpmError::io(format!("cannot move {} aside", dir.display()), e))?;
    }
    fs::rename(tmp, dir).map_err(|e| {
        DdpmError::io(
            format!("cannot rename {} to {}", tmp.display(), dir.display()),
            e,
        )
    })?;
    sync_dir(root)?;
    if replaced {
        let _ = fs::remove_dir_all(&aside);
    }
    Ok(())
}

fn prune(root: &Path, keep_last: usize) {
    let all = match list(root) {
        Ok(all) => all,
        Err(e) => return tracing::warn!("cannot prune old checkpoints: {e}"),
    };
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep_last)) {
        if let Err(e) = fs::remove_dir_all(dir) {
            tracing::warn!("cannot remove the old checkpoint {}: {e}", dir.display());
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = || format!("cannot write {}", path.display());
    let mut f = File::create(path).map_err(|e| DdpmError::io(ctx(), e))?;
    f.write_all(bytes).map_err(|e| DdpmError::io(ctx(), e))?;
    f.sync_all().map_err(|e| DdpmError::io(ctx(), e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| DdpmError::io(format!("cannot fsync the directory {}", dir.display()), e))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(DdpmError::Encode {
                what: "a tensor as safetensors",
                cause: format!("kind {other:?} has no safetensors dtype"),
            })
        }
    })
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => {
            return Err(DdpmError::StateMismatch {
                part: "safetensors",
                reason: format!("cannot load a tensor of dtype {other:?}"),
            })
        }
    })
}

/// Named tensors as safetensors bytes (copied to the CPU).
fn serialize(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut host = Vec::with_capacity(named.len());
    for (name, t) in named {
        let dtype = dtype_of(t.kind())?;
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        host.push((name.as_str(), dtype, shape, bytes));
    }
    let views = host
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((*name, TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| DdpmError::Encode {
            what: "a tensor description for safetensors",
            cause: e.to_string(),
        })?;
    safetensors::serialize(views, None).map_err(|e| DdpmError::Encode {
        what: "tensors as safetensors",
        cause: e.to_string(),
    })
}

fn deserialize(bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let size: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = kind_of(view.dtype()).map_err(|e| e.to_string())?;
        let t = Tensor::f_from_data_size(view.data(), &size, kind).map_err(|e| e.to_string())?;
        out.push((name, t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads the checkpoint in `dir`, verifying its format version and every file's sha256.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let fail = |reason: String| DdpmError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    // Every file is read bounded (see [`crate::fsio::read_bounded`]): regular files only, and
    // none longer than its format allows, so a symlink to /dev/zero or a FIFO fails at once.
    let text = read_part(dir, MANIFEST_FILE, MAX_MANIFEST_BYTES).map_err(|e| {
        fail(format!(
            "cannot read {MANIFEST_FILE} ({}); an interrupted write?",
            cause_of(&e)
        ))
    })?;
    // Checkpoints written before the sidecar existed have none; their manifest is still
    // held to the data files' checksums and to the directory's step below.
    match read_part(dir, MANIFEST_SUM_FILE, MAX_SUM_BYTES)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
    {
        Ok(expected) => {
            let actual = sha256_hex(&text);
            if actual != expected.trim() {
                return Err(fail(format!(
                    "{MANIFEST_FILE} is corrupt: its sha256 is {actual}, {MANIFEST_SUM_FILE} says {}",
                    expected.trim()
                )));
            }
        }
        Err(DdpmError::Io { cause, .. }) if cause.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(fail(format!(
                "cannot read {MANIFEST_SUM_FILE}: {}",
                cause_of(&e)
            )))
        }
    }
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| fail(format!("{MANIFEST_FILE} is unreadable: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(fail(format!(
            "format version {} (this program reads version {FORMAT_VERSION})",
            manifest.format_version
        )));
    }
    let named_step = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_dir_name);
    if named_step.is_some_and(|s| s != manifest.step) {
        return Err(fail(format!(
            "{MANIFEST_FILE} says step {}, the directory's name another",
            manifest.step
        )));
    }
    let mut parts = BTreeMap::new();
    for file in DATA_FILES {
        let expected = manifest
            .files
            .get(file)
            .ok_or_else(|| fail(format!("the manifest lists no {file}")))?;
        let bytes = read_part(dir, file, size_limit(&manifest, file))
            .map_err(|e| fail(format!("cannot read {file}: {}", cause_of(&e))))?;
        let actual = sha256_hex(&bytes);
        if &actual != expected {
            return Err(fail(format!(
                "{file} is corrupt: its sha256 is {actual}, the manifest says {expected}"
            )));
        }
        if file != CONFIG_FILE {
            parts.insert(
                file,
                deserialize(&bytes).map_err(|e| fail(format!("{file}: {e}")))?,
            );
        }
    }
    let mut take = |f| parts.remove(f).unwrap_or_default();
    let state = TrainingState {
        model: take(MODEL_FILE),
        ema: take(EMA_FILE),
        optim: take(OPTIM_FILE),
    };
    let shapes: BTreeMap<String, Vec<i64>> = state
        .model
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    if shapes != manifest.tensors {
        return Err(fail(format!(
            "{MODEL_FILE} does not hold the tensors its manifest lists"
        )));
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        manifest,
        state,
    })
}

/// The most bytes `manifest.json` may hold (its tensor list for a model of millions of
/// tensors fits in far less).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The most bytes `manifest.sha256` may hold (64 hex digits and a newline or two).
const MAX_SUM_BYTES: u64 = 1024;
/// The most bytes a checkpoint's `config.toml` may hold.
const MAX_CONFIG_BYTES: u64 = crate::config::MAX_CONFIG_FILE_BYTES;

/// The most bytes `file` of a checkpoint with `manifest` can hold: a safetensors file is an
/// 8-byte length, a JSON header with one entry a tensor (its name, dtype, shape and offsets)
/// and the tensors' data. The bound counts 8 bytes an element (the widest dtype) and a
/// generous header; LAMB's state holds two moments a model tensor and its step.
fn size_limit(manifest: &Manifest, file: &str) -> u64 {
    let per_copy = |prefix: u64| {
        manifest.tensors.iter().fold(4096u64, |sum, (name, shape)| {
            let numel = shape
                .iter()
                .map(|&d| u64::try_from(d).unwrap_or(0))
                .fold(1u64, u64::saturating_mul);
            let header = name.len() as u64 + prefix + 128 + 24 * shape.len() as u64;
            sum.saturating_add(numel.saturating_mul(8))
                .saturating_add(header)
        })
    };
    match file {
        MODEL_FILE | EMA_FILE => per_copy(0),
        OPTIM_FILE => per_copy(2).saturating_mul(2).saturating_add(4096),
        CONFIG_FILE => MAX_CONFIG_BYTES,
        _ => MAX_MANIFEST_BYTES,
    }
}

fn read_part(dir: &Path, file: &str, max: u64) -> Result<Vec<u8>> {
    crate::fsio::read_bounded(&dir.join(file), max, file)
}

/// The operating system's part of an I/O error (the checkpoint's message names the file).
fn cause_of(e: &DdpmError) -> String {
    match e {
        DdpmError::Io { cause, .. } => cause.to_string(),
        other => other.to_string(),
    }
}

/// The newest checkpoint under `root` that reads back intact; corrupt newer ones are skipped
/// with a warning. `None` when there are none; an error when none is intact.
pub fn latest_good(root: &Path) -> Result<Option<Checkpoint>> {
    let all = list(root)?;
    if all.is_empty() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    for (_, dir) in all.iter().rev() {
        match load(dir) {
            Ok(c) => {
                if !problems.is_empty() {
                    tracing::warn!("using the older checkpoint {} instead", dir.display());
                }
                return Ok(Some(c));
            }
            Err(e) => {
                tracing::warn!("skipping a damaged checkpoint: {e}");
                problems.push(e.to_string());
            }
        }
    }
    Err(DdpmError::Checkpoint {
        path: root.to_path_buf(),
        reason: format!(
            "none of the {} checkpoints is intact: {}",
            all.len(),
            problems.join("; ")
        ),
    })
}

/// The checkpoint at `path`: a checkpoint directory itself, or the newest good one in a run
/// directory (its `checkpoints/`) or in a directory of checkpoints.
pub fn open(path: &Path) -> Result<Checkpoint> {
    if path.join(MANIFEST_FILE).exists() {
        return load(path);
    }
    let root = if path.join("checkpoints").is_dir() {
        path.join("checkpoints")
    } else {
        path.to_path_buf()
    };
    latest_good(&root)?.ok_or_else(|| DdpmError::Checkpoint {
        path: path.to_path_buf(),
        reason: "holds no checkpoint (expected step-NNNNNNN/ directories or a run directory)"
            .into(),
    })
}

/// Which weights of a checkpoint a loaded network carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weights {
    /// The exponential moving average of the weights (what samples are drawn with).
    #[default]
    Ema,
    /// The weights as trained.
    Raw,
}

/// A network ready to use: its checkpoint, the run's configuration, the weights in `vs`, the
/// network reading them and the run's noise schedule, all on one device.
pub struct LoadedModel {
    /// The checkpoint it came from (its tensors stay on the CPU).
    pub checkpoint: Checkpoint,
    /// The run's configuration.
    pub config: Config,
    /// The variables holding the chosen weights.
    pub vs: VarStore,
    /// The network.
    pub net: UNet,
    /// The run's noise schedule.
    pub schedule: Schedule,
}

/// A network of `cfg.model` and its variables on `device`, initialised from libtorch's
/// generator seeded with `seed`; T is `cfg.diffusion.t_max`.
pub fn build_model(cfg: &Config, device: Device, seed: u64) -> Result<(VarStore, UNet)> {
    let vs = VarStore::new(device);
    tch::manual_seed(seed as i64);
    let model = crate::unet::UNetConfig {
        t_max: cfg.diffusion.t_max,
        ..cfg.model.clone()
    };
    let net = UNet::new(&vs.root(), &model)?;
    Ok((vs, net))
}

/// The network of the checkpoint at `path` (a checkpoint, a run directory or a directory of
/// checkpoints, as [`open`] takes) with its `weights`, its configuration and its schedule:
/// the one way sample, eval and quality load a run.
pub fn load_model(path: &Path, device: Device, weights: Weights) -> Result<LoadedModel> {
    open(path)?.into_model(device, weights)
}

impl Checkpoint {
    /// This checkpoint's network with its `weights` on `device` (see [`load_model`]).
    pub fn into_model(self, device: Device, weights: Weights) -> Result<LoadedModel> {
        let config = self.manifest.config.clone();
        let (vs, net) = build_model(&config, device, config.train.seed)?;
        self.load_weights(&vs, weights == Weights::Ema)?;
        let schedule = Schedule::new(config.diffusion.schedule, config.diffusion.t_max, device)?;
        Ok(LoadedModel {
            checkpoint: self,
            config,
            vs,
            net,
            schedule,
        })
    }
}

impl Checkpoint {
    /// Errors unless the tensors fit `vs` exactly (same names, same shapes), listing the
    /// differences.
    pub fn check_architecture(&self, vs: &VarStore) -> Result<()> {
        let want: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        let mut diffs = Vec::new();
        for (name, shape) in &want {
            match self.manifest.tensors.get(name) {
                None => diffs.push(format!("missing {name}")),
                Some(s) if s != shape => {
                    diffs.push(format!("{name} is {s:?}, the model needs {shape:?}"))
                }
                Some(_) => {}
            }
        }
        diffs.extend(
            self.manifest
                .tensors
                .keys()
                .filter(|n| !want.contains_key(*n))
                .map(|n| format!("unexpected {n}")),
        );
        if diffs.is_empty() {
            return Ok(());
        }
        let shown = diffs.len().min(5);
        Err(DdpmError::Checkpoint {
            path: self.dir.clone(),
            reason: format!(
                "was written for a different network ({} differences: {}{}); its model section is {:?}",
                diffs.len(),
                diffs[..shown].join(", "),
                if diffs.len() > shown { ", …" } else { "" },
                self.manifest.config.model
            ),
        })
    }

    /// Copies the weights (`ema = false`) or the averaged weights (`ema = true`) into `vs`,
    /// after [`Checkpoint::check_architecture`].
    pub fn load_weights(&self, vs: &VarStore, ema: bool) -> Result<()> {
        self.check_architecture(vs)?;
        let source = if ema {
            &self.state.ema
        } else {
            &self.state.model
        };
        copy_into(vs, source).map_err(|reason| DdpmError::Checkpoint {
            path: self.dir.clone(),
            reason,
        })
    }
}

/// Copies named tensors into the variables of `vs` with the same names.
fn copy_into(vs: &VarStore, named: &[(String, Tensor)]) -> std::result::Result<(), String> {
    let vars = vs.variables();
    if named.len() != vars.len() {
        return Err(format!(
            "holds {} weight tensors, the model has {}",
            named.len(),
            vars.len()
        ));
    }
    tch::no_grad(|| {
        for (name, src) in named {
            let mut dst = vars
                .get(name)
                .ok_or_else(|| format!("has a tensor {name} the model lacks"))?
                .shallow_clone();
            dst.f_copy_(src).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use tch::nn;

    fn net(seed: i64, width: i64) -> VarStore {
        let _guard = crate::sampler::rng_lock();
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "a", 3, width, Default::default());
        let _ = nn::linear(vs.root() / "b", width, 2, Default::default());
        vs
    }

    fn named(vs: &VarStore, scale: f64) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach() * scale))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn state(vs: &VarStore) -> TrainingState {
        let mut optim = named(vs, 0.5);
        optim.push(("step".into(), Tensor::from(17i64)));
        TrainingState {
            model: named(vs, 1.0),
            ema: named(vs, 2.0),
            optim,
        }
    }

    fn manifest(step: u64) -> Manifest {
        Manifest {
            format_version: 0,
            step,
            seed: 9,
            data_position: DataPosition {
                epoch: 1,
                batch_in_epoch: 2,
                steps_per_epoch: 70,
            },
            ema_updates: step,
            skipped_steps: 0,
            config: Config::mnist(),
            tensors: BTreeMap::new(),
            files: BTreeMap::new(),
            data: None,
        }
    }

    fn equal(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
    }

    #[test]
    fn only_seven_or_more_plain_digits_name_a_checkpoint() {
        assert_eq!(parse_dir_name(&dir_name(12)), Some(12));
        assert_eq!(parse_dir_name("step-123456789"), Some(123_456_789));
        // Too short, a sign, a suffix, another prefix: `u64::from_str` alone takes the first two.
        for name in [
            "step-12",
            "step-+000012",
            "step-0000012.tmp",
            "steps-0000012",
        ] {
            assert_eq!(parse_dir_name(name), None, "{name}");
        }
    }

    #[test]
    fn a_root_that_cannot_be_listed_is_an_error_and_only_a_missing_one_is_empty() {
        let dir = test_dir("ckpt_list");
        assert!(list(&dir.join("absent")).unwrap().is_empty());
        let file = dir.join("a-file");
        fs::write(&file, b"x").unwrap();
        let err = list(&file).unwrap_err().to_string();
        assert!(err.contains("cannot list"), "{err}");
    }

    #[test]
    fn a_directory_that_cannot_be_synced_is_an_error() {
        let dir = test_dir("ckpt_sync");
        sync_dir(&dir).unwrap();
        let err = sync_dir(&dir.join("absent")).unwrap_err().to_string();
        assert!(err.contains("cannot fsync the directory"), "{err}");
    }

    #[test]
    fn round_trip_is_exact_and_checks_the_architecture() {
        let root = test_dir("ckpt_round_trip");
        let vs = net(1, 4);
        let st = state(&vs);
        let dir = save(&root, manifest(120), &st, 3).unwrap();
        assert_eq!(dir, root.join("step-0000120"));
        let back = load(&dir).unwrap();
        assert!(
            equal(&back.state.model, &st.model)
                && equal(&back.state.ema, &st.ema)
                && equal(&back.state.optim, &st.optim)
        );
        assert_eq!(back.manifest.step, 120);
        assert_eq!(back.manifest.config, Config::mnist());
        assert_eq!(back.manifest.tensors["a.weight"], vec![4, 3]);

        let fresh = net(2, 4);
        back.load_weights(&fresh, true).unwrap();
        assert!(equal(&named(&fresh, 1.0), &st.ema));
        let err = back.check_architecture(&net(1, 5)).unwrap_err().to_string();
        assert!(
            err.contains("a.weight is [4, 3], the model needs [5, 3]"),
            "{err}"
        );
    }

    #[test]
    fn keeps_the_last_k_and_ignores_leftover_tmp_dirs() {
        let root = test_dir("ckpt_keep");
        let vs = net(1, 4);
        for step in [10, 20, 30, 40] {
            save(&root, manifest(step), &state(&vs), 2).unwrap();
        }
        // An interrupted write of a later step, and an unrelated file.
        fs::create_dir_all(root.join("step-0000050.tmp")).unwrap();
        fs::write(root.join("step-0000050.tmp").join(MODEL_FILE), b"partial").unwrap();
        fs::write(root.join("notes.txt"), b"x").unwrap();
        let steps: Vec<u64> = list(&root).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![30, 40]);
        assert_eq!(latest_good(&root).unwrap().unwrap().manifest.step, 40);
        // Writing step 50 for real replaces the leftover.
        save(&root, manifest(50), &state(&vs), 2).unwrap();
        assert!(!root.join("step-0000050.tmp").exists());
        assert_eq!(open(&root).unwrap().manifest.step, 50);
    }

    #[test]
    fn a_missing_manifest_checksum_is_allowed_and_an_unreadable_one_is_not() {
        let root = test_dir("ckpt_sum");
        let vs = net(1, 4);
        let dir = save(&root, manifest(1), &state(&vs), 5).unwrap();
        let sum = dir.join(MANIFEST_SUM_FILE);
        // A directory in its place: read_bounded refuses it (not NotFound).
        fs::remove_file(&sum).unwrap();
        fs::create_dir(&sum).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("cannot read manifest.sha256"), "{err}");
        // None at all, as before the sidecar existed: the manifest is still read.
        fs::remove_dir(&sum).unwrap();
        assert_eq!(load(&dir).unwrap().manifest.step, 1);
    }

    #[test]
    fn a_data_file_past_its_documented_bound_is_refused_and_real_ones_are_within_it() {
        let root = test_dir("ckpt_bound");
        let dir = save(&root, manifest(1), &state(&net(1, 4)), 5).unwrap();
        let m = load(&dir).unwrap().manifest;
        // The doc's bound: 4096 bytes, then a tensor 8 bytes an element and a header of its
        // name (with "m." or "v." in the LAMB state), 128 bytes and 24 a dimension.
        let copy = |prefix: u64| -> u64 {
            4096 + m
                .tensors
                .iter()
                .map(|(name, shape)| {
                    let numel: i64 = shape.iter().product();
                    8 * numel as u64 + name.len() as u64 + prefix + 128 + 24 * shape.len() as u64
                })
                .sum::<u64>()
        };
        let bounds = [
            (MODEL_FILE, copy(0)),
            (EMA_FILE, copy(0)),
            (OPTIM_FILE, 2 * copy(2) + 4096),
            // The run's configuration: a config file's bound, as `ddpm train --config` reads.
            (CONFIG_FILE, crate::config::MAX_CONFIG_FILE_BYTES),
        ];
        for (file, bound) in bounds {
            assert_eq!(size_limit(&m, file), bound, "{file}");
            assert!(
                fs::metadata(dir.join(file)).unwrap().len() <= bound,
                "{file}"
            );
        }
        fs::write(dir.join(MODEL_FILE), vec![0u8; copy(0) as usize + 1]).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
    }

    /// The network's T is `diffusion.t_max`, the one place T is set, even in a configuration
    /// built in code whose model section still carries another (validation would refuse it).
    #[test]
    fn a_built_network_takes_t_from_the_diffusion_section() {
        let mut cfg = Config::mnist();
        cfg.model.time_embedding = crate::unet::TimeEmbedding::Learned;
        cfg.diffusion.t_max = 20;
        assert_eq!(cfg.model.t_max, 1000);
        let (vs, _) = build_model(&cfg, Device::Cpu, 0).unwrap();
        let tables: Vec<Vec<i64>> = vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name.contains("embedding"))
            .map(|(_, t)| t.size())
            .collect();
        assert_eq!(tables, [vec![20, cfg.model.base_channels]]);
    }

    #[test]
    fn a_corrupt_newest_checkpoint_falls_back_to_the_previous() {
        let root = test_dir("ckpt_corrupt");
        let vs = net(1, 4);
        save(&root, manifest(1), &state(&vs), 5).unwrap();
        let newest = save(&root, manifest(2), &state(&vs), 5).unwrap();
        let path = newest.join(EMA_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = load(&newest).unwrap_err().to_string();
        assert!(err.contains("ema.safetensors is corrupt"), "{err}");
        assert_eq!(latest_good(&root).unwrap().unwrap().manifest.step, 1);

        fs::remove_file(root.join("step-0000001").join(MANIFEST_FILE)).unwrap();
        let err = latest_good(&root).unwrap_err().to_string();
        assert!(err.contains("none of the 2 checkpoints is intact"), "{err}");
        assert!(latest_good(&root.join("absent")).unwrap().is_none());
    }

    #[test]
    fn a_failed_write_leaves_earlier_checkpoints_and_no_tmp() {
        let root = test_dir("ckpt_fail");
        let vs = net(1, 4);
        save(&root, manifest(1), &state(&vs), 5).unwrap();
        let mut bad = state(&vs);
        // A kind safetensors cannot hold makes the write fail after the first file.
        bad.ema.push((
            "z".into(),
            Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)),
        ));
        let err = save(&root, manifest(2), &bad, 5).unwrap_err().to_string();
        assert!(
            err.contains("step-0000002") && err.contains("earlier checkpoints are intact"),
            "{err}"
        );
        assert!(!root.join("step-0000002.tmp").exists() && !root.join("step-0000002").exists());
        assert_eq!(latest_good(&root).unwrap().unwrap().manifest.step, 1);
    }
}
