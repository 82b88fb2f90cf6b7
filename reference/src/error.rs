//! The one error type of the reference crate.

use thiserror::Error;

/// Everything that can be wrong with the input of a reference computation.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RefError {
    /// A schedule needs at least one diffusion step.
    #[error("the number of diffusion steps T must be at least 1, got 0")]
    ZeroSteps,
    /// A time index outside the range the formula is defined on.
    #[error("time step t = {t} is out of range: this formula needs {min} <= t <= {max}")]
    TimeOutOfRange {
        /// The offending time index.
        t: usize,
        /// Smallest allowed value.
        min: usize,
        /// Largest allowed value.
        max: usize,
    },
    /// A standard deviation or variance that is negative, NaN or infinite (or zero where a
    /// division by it is needed).
    #[error("{what} must be {requirement}, got {value}")]
    InvalidStd {
        /// Which quantity.
        what: &'static str,
        /// What it must be (e.g. "finite and > 0").
        requirement: &'static str,
        /// The value received.
        value: f64,
    },
    /// Two arrays that must have the same (or compatible) shape do not.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape received.
        got: Vec<usize>,
    },
    /// A schedule value outside the open interval (0, 1).
    #[error("schedule value {name}_{t} = {value} must lie strictly between 0 and 1")]
    InvalidScheduleValue {
        /// Name of the sequence (alpha, beta_ho).
        name: &'static str,
        /// Its time index (1-based).
        t: usize,
        /// The value received.
        value: f64,
    },
    /// A strided sampler cannot take this many steps.
    #[error("cannot take {n} strided sampling steps with T = {t_max}: need 1 <= n <= T")]
    InvalidStepCount {
        /// Requested number of steps.
        n: usize,
        /// Number of diffusion steps of the schedule.
        t_max: usize,
    },
    /// A DDIM step must go strictly backwards in time.
    #[error("a sampling step must go backwards in time, got {from} -> {to}")]
    NotBackwards {
        /// Start time.
        from: usize,
        /// Target time.
        to: usize,
    },
    /// A probability law without any component.
    #[error("the law is empty: {0}")]
    EmptyLaw(&'static str),
    /// A scalar parameter outside its domain.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// The value received.
        value: f64,
        /// What it must satisfy.
        reason: &'static str,
    },
    /// A data value that is not on the 8-bit grid 2k/255 − 1 the decoder is defined on.
    #[error("data value {value} is not on the 8-bit grid 2k/255 - 1, k = 0..255")]
    OffGrid {
        /// The value received.
        value: f64,
    },
}

/// Result of every fallible reference computation.
pub type Result<T> = std::result::Result<T, RefError>;

/// Checks that `value` is finite and ≥ 0 (or > 0 when `positive`).
pub(crate) fn check_std(what: &'static str, value: f64, positive: bool) -> Result<f64> {
    let ok = value.is_finite() && if positive { value > 0.0 } else { value >= 0.0 };
    if ok {
        Ok(value)
    } else {
        Err(RefError::InvalidStd {
            what,
            requirement: if positive {
                "finite and > 0"
            } else {
                "finite and >= 0"
            },
            value,
        })
    }
}

/// Checks that two shapes agree.
pub(crate) fn check_shape(what: &'static str, expected: &[usize], got: &[usize]) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(RefError::ShapeMismatch {
            what,
            expected: expected.to_vec(),
            got: got.to_vec(),
        })
    }
}
