//! The crate's single error type: every fallible function returns [`Result`].

/// Everything that can go wrong in `ddpm`, with messages meant for the person running it.
#[derive(Debug, thiserror::Error)]
pub enum DdpmError {
    /// libtorch rejected an operation (bad index, shape, device or kind).
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
    /// CUDA was asked for explicitly but libtorch sees no CUDA device.
    #[error("CUDA was requested but libtorch reports no usable CUDA device (is libtorch_cuda linked and a GPU visible?); use --device cpu or auto")]
    CudaUnavailable,
    /// A noise schedule that violates 0 < α_t < 1 or has no steps.
    #[error("invalid noise schedule: {0}")]
    InvalidSchedule(String),
    /// A numeric argument outside its domain (η, number of steps, learning rate, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A network configuration that cannot be built.
    #[error("invalid model configuration: {0}")]
    InvalidModel(String),
    /// Saved optimiser or EMA state that does not match the model it is restored into.
    #[error("cannot restore state: {0}")]
    State(String),
    /// A data set that is missing, empty, malformed or does not fit the requested shape.
    #[error("data: {0}")]
    Data(String),
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
    /// A configuration file or value that cannot be used (unknown key, wrong type, bad value).
    #[error("configuration: {0}")]
    Config(String),
    /// Training produced a NaN or infinite loss.
    #[error("the loss is not finite ({loss}) at step {step}; no checkpoint was written for this step (lower the learning rate, enable --grad-clip, or pass --skip-nonfinite)")]
    NonFinite {
        /// The training step (1-based) whose loss was not finite.
        step: u64,
        /// The loss value.
        loss: f64,
    },
    /// `skip_nonfinite` met only non-finite losses for too long: the weights have diverged.
    #[error("the last {skipped} batches, up to step {step}, all had a non-finite loss: the weights have diverged; start a new run with a lower learning rate or --grad-clip")]
    Diverged {
        /// The last step skipped.
        step: u64,
        /// How many consecutive batches were skipped.
        skipped: u64,
    },
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

/// `Result` with [`DdpmError`].
pub type Result<T> = std::result::Result<T, DdpmError>;
