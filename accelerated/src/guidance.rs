//! Classifier-free guidance (Ho & Salimans 2022) in the article's notation: a conditional
//! noise predictor ε̂(x_t, y), y ∈ 0..classes or ∅ (the label value `classes`), and the guided
//! prediction ε̂_w = (1 + w) ε̂(x_t, y) − w ε̂(x_t, ∅) as a [`NoisePredictor`], so that every
//! sampler (ancestral, strided, DDIM) takes it unchanged. What it does to the sampled law:
//! docs/derivations.md, section 13.

use crate::error::{DdpmError, Result};
use crate::sampler::NoisePredictor;
use tch::{Kind, Tensor};

/// ε̂ given a class: y Int64 [B] with values 0..classes(); the value classes() means "no
/// class" (∅).
pub trait ConditionalPredictor {
    /// ε̂(x_t, y) for a batch x_t [B, …], t Int64 [B] (1..=T) and y Int64 [B] (0..=classes),
    /// same shape and kind as x_t; an error (never a panic) when the batch does not fit.
    fn predict_class(&self, x_t: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor>;

    /// The number of classes; the label value `classes()` is ∅.
    fn classes(&self) -> usize;

    /// Errors when the predictor cannot take a batch of this shape (checked before sampling,
    /// as [`NoisePredictor::check_input`]).
    fn check_input(&self, shape: &[i64]) -> Result<()> {
        let _ = shape;
        Ok(())
    }

    /// Bytes one sample of a batch needs while the predictor runs, as
    /// [`NoisePredictor::bytes_per_sample`]; `None`: unknown, no check.
    fn bytes_per_sample(&self) -> Option<u64> {
        None
    }
}

/// The error for class labels outside 0..=classes (`classes` meaning ∅).
pub(crate) fn label_range_error(lo: i64, hi: i64, classes: usize) -> DdpmError {
    DdpmError::OutOfRange {
        key: "sample.class",
        value: format!("{lo}..={hi}"),
        expected: format!("a class in 0..{classes} (or {classes}, meaning no class)"),
    }
}

/// The error for a guidance weight that is not finite or is negative.
fn check_weight(w: f64) -> Result<()> {
    if w.is_finite() && w >= 0.0 {
        Ok(())
    } else {
        Err(DdpmError::OutOfRange {
            key: "sample.guidance",
            value: w.to_string(),
            expected: "finite and >= 0 (0: plain conditional sampling)".into(),
        })
    }
}

/// ε̂_w = (1 + w) ε̂(x_t, y) − w ε̂(x_t, ∅), computed as cond + w (cond − uncond) (the same
/// number; w = 0 returns `cond`'s values exactly), in `cond`'s kind. `cond` and `uncond` of
/// one shape; w finite and ≥ 0.
pub fn combine(cond: &Tensor, uncond: &Tensor, w: f64) -> Result<Tensor> {
    check_weight(w)?;
    if cond.size() != uncond.size() {
        return Err(DdpmError::ShapeMismatch {
            what: "unconditional ε̂",
            expected: format!("{:?}, the conditional ε̂'s shape", cond.size()),
            got: uncond.size(),
        });
    }
    let uncond = uncond.f_to_kind(cond.kind())?;
    Ok(cond.f_sub(&uncond)?.f_mul_scalar(w)?.f_add(cond)?)
}

/// A conditional predictor with fixed labels [B] and weight w, as a NoisePredictor, so every
/// sampler takes it (w = 0: one conditional call; otherwise one call on the doubled batch
/// [x; x], [y; ∅] and `combine`). Labels may be ∅ (`classes()`): such samples are
/// unconditional whatever w. `check_input` checks the labels (Int64 [B], values in
/// 0..=classes) and w before sampling; `predict` checks their shape only (no device sync a
/// step) and leaves the values to the model.
pub struct Guided<'a, M: ?Sized> {
    /// The conditional predictor.
    pub model: &'a M,
    /// y Int64 [B], one label per sample of the batch.
    pub labels: Tensor,
    /// The guidance weight w ≥ 0.
    pub w: f64,
}

impl<M: ?Sized> Guided<'_, M> {
    /// The labels' shape and kind against a batch of `b`.
    fn check_labels_shape(&self, b: i64) -> Result<()> {
        if self.labels.size() != [b] || self.labels.kind() != Kind::Int64 {
            return Err(DdpmError::ShapeMismatch {
                what: "class labels",
                expected: format!("[{b}] Int64, one per sample"),
                got: self.labels.size(),
            });
        }
        Ok(())
    }
}

impl<M: ConditionalPredictor + ?Sized> NoisePredictor for Guided<'_, M> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        check_weight(self.w)?;
        let b = x_t.size().first().copied().unwrap_or(0);
        self.check_labels_shape(b)?;
        let y = self.labels.f_to_device(x_t.device())?;
        if self.w == 0.0 {
            return self.model.predict_class(x_t, t, &y);
        }
        let none = Tensor::f_full([b], self.model.classes() as i64, (Kind::Int64, y.device()))?;
        let out = self.model.predict_class(
            &Tensor::f_cat(&[x_t, x_t], 0)?,
            &Tensor::f_cat(&[t, t], 0)?,
            &Tensor::f_cat(&[&y, &none], 0)?,
        )?;
        combine(&out.f_narrow(0, 0, b)?, &out.f_narrow(0, b, b)?, self.w)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        check_weight(self.w)?;
        self.model.check_input(shape)?;
        self.check_labels_shape(shape.first().copied().unwrap_or(0))?;
        if self.labels.numel() > 0 {
            let lo = self.labels.f_min()?.int64_value(&[]);
            let hi = self.labels.f_max()?.int64_value(&[]);
            if lo < 0 || hi > self.model.classes() as i64 {
                return Err(label_range_error(lo, hi, self.model.classes()));
            }
        }
        Ok(())
    }

    /// The model's bytes a sample, twice for w > 0 (the doubled batch).
    fn bytes_per_sample(&self) -> Option<u64> {
        let one = self.model.bytes_per_sample()?;
        if self.w == 0.0 {
            Some(one)
        } else {
            one.checked_mul(2)
        }
    }
}
