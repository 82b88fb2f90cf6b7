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
}

/// `Result` with [`DdpmError`].
pub type Result<T> = std::result::Result<T, DdpmError>;
