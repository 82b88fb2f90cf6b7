//! The crate's single error type: every fallible function returns [`Result`].

/// Everything that can go wrong in `ddpm`, with messages meant for the person running it.
#[derive(Debug, thiserror::Error)]
pub enum DdpmError {
    /// libtorch rejected an operation (bad index, shape, device or kind); the message is
    /// libtorch's first lines, without its C++ stack frames.
    #[error("libtorch error: {}", torch_message(.0))]
    Torch(#[from] tch::TchError),
    /// A call of the `ddpm-cuda` shim failed: a CUDA graph (`cuda_graph`: not built in, or the
    /// predictor does what a capture cannot hold) or pinning host memory; libtorch's message.
    #[error("{0}")]
    Cuda(#[from] ddpm_cuda::CudaError),
    /// CUDA was asked for explicitly but libtorch sees no CUDA device.
    #[error("CUDA was requested but libtorch reports no usable CUDA device (is libtorch_cuda linked and a GPU visible?); choose the CPU or `auto`")]
    CudaUnavailable,
    /// A setting or argument outside its domain. `key` names it as a config key
    /// (`train.lr`) or, for a library argument, by its name (`eta`).
    #[error("{key} = {value} is out of range: it must be {expected}")]
    OutOfRange {
        /// The config key or argument name.
        key: &'static str,
        /// The value received, as written.
        value: String,
        /// What it must satisfy ("positive", "between 1 and T = 1000").
        expected: String,
    },
    /// Two settings that cannot be used together.
    #[error("{key} cannot be used with {other}: {reason}")]
    Incompatible {
        /// The first setting (config key or argument name).
        key: &'static str,
        /// The setting it conflicts with.
        other: String,
        /// Why, and what to change.
        reason: String,
    },
    /// Tensors or arrays whose shapes do not fit together.
    #[error("shape mismatch for {what}: expected {expected}, got {got:?}")]
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// The shape required, in words or as a list (`[B, 1, 28, 28]`).
        expected: String,
        /// The shape received.
        got: Vec<i64>,
    },
    /// A schedule value outside the open interval (0, 1), or no steps at all.
    #[error("invalid noise schedule: {name}_{t} = {value} must lie strictly between 0 and 1")]
    ScheduleValue {
        /// The sequence (alpha, beta_ho, alpha_bar).
        name: &'static str,
        /// Its time index.
        t: usize,
        /// The value received.
        value: f64,
    },
    /// Saved optimiser or EMA state that does not match the model it is restored into.
    #[error("cannot restore the {part} state: {reason}")]
    StateMismatch {
        /// Which state (`LAMB`, `EMA`, `weights`).
        part: &'static str,
        /// What does not match.
        reason: String,
    },
    /// A data set that is missing, empty or malformed.
    #[error("data {set}: {reason}")]
    BadData {
        /// The data set (a path, `MNIST`, `mixture`).
        set: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration document that cannot be parsed or does not fit the settings' types.
    #[error("{origin}: {reason}")]
    ConfigParse {
        /// The file (or `flags`, or `preset NAME`).
        origin: String,
        /// The parser's message, naming the key and section.
        reason: String,
    },
    /// A resumed run asked for settings that differ from the run's saved ones in one or more
    /// keys (all of them listed, not only the first).
    #[error("{run} was trained with other settings than the ones given here ({}); a resumed run continues with its saved settings", describe_differences(.differences))]
    ResumeSettings {
        /// The checkpoint resumed from.
        run: std::path::PathBuf,
        /// Each differing key as (config key, value here, value saved with the run).
        differences: Vec<(String, String, String)>,
    },
    /// A value that could not be encoded for writing (TOML, JSON, safetensors).
    #[error("cannot encode {what}: {cause}")]
    Encode {
        /// What was being written.
        what: &'static str,
        /// The encoder's message.
        cause: String,
    },
    /// An image file that cannot be opened or decoded (truncated, wrong format).
    #[error("cannot read image {path}: {cause}")]
    Image {
        /// The offending file.
        path: std::path::PathBuf,
        /// What the decoder said (in the message, not a separate cause, so it prints once).
        cause: image::ImageError,
    },
    /// A file-system operation failed; `context` says what was being done to which path.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The operating system's error (in the message, not a separate cause, so it prints once).
        cause: std::io::Error,
    },
    /// A checkpoint that is missing, corrupt (checksum mismatch) or belongs to another model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A fresh run asked for in a run directory that already holds a run's checkpoints.
    #[error("{dir} already holds checkpoints: resume that run, or choose another run directory")]
    RunExists {
        /// The run directory.
        dir: std::path::PathBuf,
    },
    /// Another process holds the run directory's lock: it is training in that directory.
    #[error("{} is in use: another training (pid {}) is writing to it; wait for it to end, or choose another run directory", dir.display(), pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    RunLocked {
        /// The run directory.
        dir: std::path::PathBuf,
        /// The holder's process id, as it wrote it into the lock file (`None` if unreadable).
        pid: Option<u32>,
    },
    /// Training produced a NaN or infinite loss.
    #[error("the loss is not finite ({loss}) at step {step}; no checkpoint was written for this step (lower train.lr, set train.grad_clip, or set train.skip_nonfinite)")]
    NonFinite {
        /// The training step (1-based) whose loss was not finite.
        step: u64,
        /// The loss value.
        loss: f64,
    },
    /// `skip_nonfinite` met only non-finite losses for too long: the weights have diverged.
    #[error("the last {skipped} batches, up to step {step}, all had a non-finite loss: the weights have diverged; start a new run with a lower train.lr or a train.grad_clip")]
    Diverged {
        /// The last step skipped.
        step: u64,
        /// How many consecutive batches were skipped.
        skipped: u64,
    },
    /// A document whose marked region (where generated text goes) is missing or malformed.
    #[error("{} {reason}", path.display())]
    MarkedRegion {
        /// The document.
        path: std::path::PathBuf,
        /// What is wrong with its markers ("has no … region").
        reason: String,
    },
    /// A resumed run's data do not hold what the run was trained on (its checkpoint's
    /// fingerprint): images added, removed or changed, which would silently change the epoch
    /// length and the held-out split. Nothing was written.
    #[error("{} does not hold the data the run was trained on ({change}); a resumed run must read the same images (the checkpoint {} records them)", data.display(), run.display())]
    DataChanged {
        /// The checkpoint resumed from.
        run: std::path::PathBuf,
        /// Where the data were read now (absolute).
        data: std::path::PathBuf,
        /// What the checkpoint records.
        saved: Box<crate::data::DataFingerprint>,
        /// What the data hold now.
        found: Box<crate::data::DataFingerprint>,
        /// What changed, in words (counts, shapes, or "same count, different content").
        change: String,
    },
    /// A request that cannot fit in the device's memory, refused before it is allocated.
    #[error("{what} needs about {} of memory, but {} is available; lower {key}", crate::memory::human(*needed), crate::memory::human(*available))]
    OutOfMemory {
        /// What would be allocated ("sampling a batch of 64 images", "the network").
        what: String,
        /// The estimate, in bytes (`u64::MAX` when it does not fit in 64 bits).
        needed: u64,
        /// What the device has free, in bytes (0 when unknown).
        available: u64,
        /// The setting to lower (a config key, e.g. `sample.batch_size`, `model.base_channels`).
        key: &'static str,
    },
    /// A torchrun variable (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is missing
    /// while another is set, or does not parse, or the ranks do not fit together.
    #[error("distributed launch: {var} = {value:?}: {reason}")]
    DistributedEnv {
        /// The environment variable.
        var: &'static str,
        /// Its value (empty when missing).
        value: String,
        reason: String,
    },
    /// The launch asks for several processes but this build has no c10d backend (the
    /// `distributed` feature is off).
    #[error("rank {rank} of {world_size}: this ddpm was built without a distributed backend (cargo feature `distributed`)")]
    DistributedNotBuilt { rank: usize, world_size: usize },
    /// A c10d collective or the group's set-up failed on this rank (a peer that died, hangs past
    /// the timeout, or disagrees on shapes); the message is libtorch's.
    #[error("rank {rank} of {world_size}: {op} failed: {message}")]
    Distributed {
        rank: usize,
        world_size: usize,
        /// `init`, `all_reduce`, `broadcast` or `barrier`.
        op: &'static str,
        message: String,
    },
    /// A class (`sample.class`, `--class`) or guidance asked of a model trained without labels
    /// (`model.classes = 0`), or labels asked of data that have none.
    #[error("{what} has no classes ({reason}); {advice}")]
    NotConditional {
        /// The model (its checkpoint) or the data set.
        what: String,
        /// Why it has none.
        reason: String,
        /// What to do instead.
        advice: String,
    },
    /// A class asked for that the model does not have: an index out of 0..classes or an
    /// unknown name.
    #[error("class {asked:?} is not one of the model's {} classes: give an index from 0 to {} or a name ({}), `none` (no class), a comma-separated list of them, or `all`", names.len(), names.len().saturating_sub(1), names.join(", "))]
    UnknownClass {
        /// What was asked for, as given.
        asked: String,
        /// The model's class names, in index order.
        names: Vec<String>,
    },
    /// A latents file (`ddpm invert`'s output, `ddpm sample --latents`' input) that cannot be
    /// read or holds no usable latents; wrong shapes are [`DdpmError::ShapeMismatch`].
    #[error("latents file {}: {reason}", path.display())]
    Latents {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A collective failed after the group had joined: another rank exited (at once) or did
    /// not answer within `train.distributed_timeout_s`; the message is libtorch's.
    #[error("rank {rank} of {world_size}: lost {peers} during {op} (it exited, or did not answer within train.distributed_timeout_s = {timeout_s} s): {message}")]
    DistributedPeerLost {
        rank: usize,
        world_size: usize,
        /// "rank 1", or "one of ranks 1, 2, 3".
        peers: String,
        op: &'static str,
        timeout_s: f64,
        message: String,
    },
    /// The ranks were started with different settings (a hash of the resolved configuration
    /// and of the checkpoint resumed from differs from rank 0's).
    #[error("rank {rank} of {world_size}: rank{} {} started with settings other than rank 0's (the resolved configuration or the checkpoint resumed from differ); start every rank with the same command, files and run directory", if differing.len() == 1 { "" } else { "s" }, differing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "))]
    DistributedSettings {
        rank: usize,
        world_size: usize,
        differing: Vec<usize>,
    },
}

/// libtorch's message up to its C++ stack trace (`frame #0: …`, `Exception raised from …`).
fn torch_message(e: &tch::TchError) -> String {
    let text = e.to_string();
    let cut = ["\nframe #", "\nException raised from"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    text[..cut].trim_end().to_string()
}

impl DdpmError {
    /// An [`DdpmError::Io`] error saying what was being done.
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> DdpmError {
        DdpmError::Io {
            context: context.into(),
            cause,
        }
    }
}

/// `key = here here, saved in the run; ...` for [`DdpmError::ResumeSettings`].
fn describe_differences(differences: &[(String, String, String)]) -> String {
    differences
        .iter()
        .map(|(key, here, saved)| format!("{key} = {here} here, {saved} in the run"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `Result` with [`DdpmError`].
pub type Result<T> = std::result::Result<T, DdpmError>;
