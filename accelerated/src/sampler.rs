//! Generator steps and the sampling loop.

use crate::error::Result;
use tch::Tensor;

/// Anything that predicts the noise: ε̂(x_t, t) = (β̄_t/β_t) ε_θ(x_t, t).
pub trait NoisePredictor {
    /// ε̂ for a batch x_t [B, …] and t Int64 [B] (values 1..=T), same shape and kind as x_t.
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Tensor;

    /// Errors when the predictor cannot take a batch of this shape (checked before sampling).
    fn check_input(&self, shape: &[i64]) -> Result<()> {
        let _ = shape;
        Ok(())
    }
}
