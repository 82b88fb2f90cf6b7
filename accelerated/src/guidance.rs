//! Classifier-free guidance (Ho & Salimans 2022): a network trained with its label dropped to ∅
//! part of the time predicts both ε̂(x_t, y) and ε̂(x_t, ∅); sampling combines them as
//! ε̂_w = (1 + w) ε̂(x_t, y) − w ε̂(x_t, ∅).
//!
//! This is the product side's minimal version of the interface (the mathematics helper owns
//! the file; its version replaces this one at the merge with the same signatures).

use crate::error::{DdpmError, Result};
use crate::sampler::NoisePredictor;
use tch::{Kind, Tensor};

/// ε̂ given a class: y Int64 [B] with values 0..classes(); the value classes() means "no class" (∅).
pub trait ConditionalPredictor {
    /// ε̂(x_t, t, y), same shape and kind as x_t.
    fn predict_class(&self, x_t: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor>;
    /// Number of classes K; the label K is ∅.
    fn classes(&self) -> usize;
}

/// ε̂_w = (1 + w) ε̂(x_t, y) − w ε̂(x_t, ∅).
pub fn combine(cond: &Tensor, uncond: &Tensor, w: f64) -> Result<Tensor> {
    crate::marginal::same_shape("cond", cond, "uncond", uncond)?;
    Ok(cond
        .f_mul_scalar(1.0 + w)?
        .f_sub(&uncond.f_mul_scalar(w)?)?)
}

/// A conditional predictor with fixed labels [B] and weight w, as a NoisePredictor, so every sampler takes it
/// (w = 0: one conditional call; otherwise one call on the doubled batch [x; x], [y; ∅] and `combine`).
pub struct Guided<'a, M: ?Sized> {
    /// The conditional network.
    pub model: &'a M,
    /// One label a sample, Int64 [B] (the value `classes()` is ∅).
    pub labels: Tensor,
    /// The guidance weight w.
    pub w: f64,
}

impl<M: ConditionalPredictor + ?Sized> NoisePredictor for Guided<'_, M> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        let y = self.labels.f_to_device(x_t.device())?;
        if self.w == 0.0 {
            return self.model.predict_class(x_t, t, &y);
        }
        let b = *x_t.size().first().unwrap_or(&0);
        let none = Tensor::f_full(
            [b],
            self.model.classes() as i64,
            (Kind::Int64, x_t.device()),
        )?;
        let both = self.model.predict_class(
            &Tensor::f_cat(&[x_t, x_t], 0)?,
            &Tensor::f_cat(&[t, t], 0)?,
            &Tensor::f_cat(&[&y, &none], 0)?,
        )?;
        combine(&both.f_narrow(0, 0, b)?, &both.f_narrow(0, b, b)?, self.w)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        if self.labels.size() != [*shape.first().unwrap_or(&0)] {
            return Err(DdpmError::ShapeMismatch {
                what: "the guided labels",
                expected: format!("one label per sample of the batch {shape:?}"),
                got: self.labels.size(),
            });
        }
        Ok(())
    }
}
