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

    /// [`predict_class`](Self::predict_class) for labels whose values were checked already
    /// ([`Guided`]'s `check_input`, before sampling): a predictor that checks them at every
    /// call by reading them back skips that here, so a step reads nothing from the device (and
    /// a CUDA graph can hold the call). By default the checked call.
    fn predict_class_prechecked(&self, x_t: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.predict_class(x_t, t, y)
    }

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
/// 0..=classes) and w before sampling; `predict` checks their shape only and calls the model's
/// [`ConditionalPredictor::predict_class_prechecked`], so a step reads nothing back from the
/// device (a value out of range that reaches the network anyway is libtorch's index error).
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
        // The labels' values were checked by `check_input` before sampling.
        if self.w == 0.0 {
            return self.model.predict_class_prechecked(x_t, t, &y);
        }
        let none = Tensor::f_full([b], self.model.classes() as i64, (Kind::Int64, y.device()))?;
        let out = self.model.predict_class_prechecked(
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

/// The error for a mixing weight s outside [0, 1].
fn check_mix(s: f64) -> Result<()> {
    if (0.0..=1.0).contains(&s) {
        Ok(())
    } else {
        Err(DdpmError::OutOfRange {
            key: "s",
            value: s.to_string(),
            expected: "in [0, 1] (0: class a, 1: class b)".into(),
        })
    }
}

/// Between two classes a and b at s ∈ [0, 1]: ε̂ = (1 − s) ε̂_w(x_t, a) + s ε̂_w(x_t, b), with
/// ε̂_w the guided prediction of [`Guided`] (w = 0: plain conditional), as a
/// [`NoisePredictor`], so every sampler takes it (`ddpm interpolate --classes A B`).
///
/// What it means: ε̂ = −β̄_t ∇ log p_t, so a convex combination of two predictions is the score
/// of the normalised geometric mixture p_t(x | a)^{1−s} p_t(x | b)^s of the two noisy class
/// densities (the normaliser does not depend on x, its gradient vanishes); under guidance each
/// p_t(x | y) is the guided p_t(x | y)^{1+w} / p_t(x)^w (docs/derivations.md, section 13). As
/// with guidance this is a mixture of scores at each t, not the noising of one data law, so
/// what the sampler draws is only close to, not exactly, the geometric mixture of the data
/// laws; its ends are exact: s = 0 is class a's guided prediction, s = 1 class b's, the very
/// numbers [`Guided`] gives (the other class is not evaluated there), so the ends of a path are
/// bitwise plain conditional sampling of a and of b.
///
/// Why mix the predictions and not the labels: the labels are discrete and the network's class
/// embedding is a lookup (one learnt row per class and one for ∅), so there is nothing between
/// two rows to interpolate — a blend of rows is an input the network never saw in training and
/// its output there means nothing in particular. The mixture of predictions uses only what the
/// model was trained to give, and is the same construction as guidance (a fixed linear
/// combination of conditional predictions), which is why every sampler takes it unchanged.
///
/// The labels may be ∅ (`classes()`, mixing a class with the unconditional prediction).
/// `check_input` checks a, b, s and w before sampling; costs two guided calls a step for
/// 0 < s < 1, one at the ends.
pub struct ClassMix<'a, M: ?Sized> {
    /// The conditional predictor.
    pub model: &'a M,
    /// The class at s = 0 (0..=classes).
    pub a: i64,
    /// The class at s = 1 (0..=classes).
    pub b: i64,
    /// The mixing weight s ∈ [0, 1].
    pub s: f64,
    /// The guidance weight w ≥ 0 of each class's prediction.
    pub w: f64,
}

impl<M: ConditionalPredictor + ?Sized> ClassMix<'_, M> {
    /// The guided prediction of class `y` for the batch x_t.
    fn guided(&self, y: i64, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        let b = x_t.size().first().copied().unwrap_or(0);
        Guided {
            model: self.model,
            labels: Tensor::f_full([b], y, (Kind::Int64, x_t.device()))?,
            w: self.w,
        }
        .predict(x_t, t)
    }
}

impl<M: ConditionalPredictor + ?Sized> NoisePredictor for ClassMix<'_, M> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        check_mix(self.s)?;
        if self.s == 0.0 {
            return self.guided(self.a, x_t, t);
        }
        if self.s == 1.0 {
            return self.guided(self.b, x_t, t);
        }
        let ea = self.guided(self.a, x_t, t)?;
        let eb = self.guided(self.b, x_t, t)?.f_to_kind(ea.kind())?;
        Ok(ea
            .f_mul_scalar(1.0 - self.s)?
            .f_add(&eb.f_mul_scalar(self.s)?)?)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        check_mix(self.s)?;
        check_weight(self.w)?;
        self.model.check_input(shape)?;
        let k = self.model.classes() as i64;
        for y in [self.a, self.b] {
            if !(0..=k).contains(&y) {
                return Err(label_range_error(y, y, self.model.classes()));
            }
        }
        Ok(())
    }

    /// One guided call's bytes a sample (the two classes are predicted one after the other).
    fn bytes_per_sample(&self) -> Option<u64> {
        let one = self.model.bytes_per_sample()?;
        if self.w == 0.0 {
            Some(one)
        } else {
            one.checked_mul(2)
        }
    }
}

/// Every class in turn down the batch — row i gets class i mod K — each guided with weight w
/// as [`Guided`] does, as a [`NoisePredictor`]: a batch of a multiple of K images draws every
/// class equally often: samples of the model's law under a uniform class (`ddpm score` of a
/// conditional run; MNIST's training digits are 9.0–11.2 % of each class).
pub struct Balanced<'a, M: ?Sized> {
    /// The conditional predictor.
    pub model: &'a M,
    /// The guidance weight w ≥ 0.
    pub w: f64,
}

impl<M: ConditionalPredictor + ?Sized> Balanced<'_, M> {
    /// The guided predictor of a batch of `b`, its labels 0, 1, …, K − 1, 0, 1, ….
    fn guided(&self, b: i64, device: tch::Device) -> Result<Guided<'_, M>> {
        let k = self.model.classes() as i64;
        if k == 0 {
            return Err(DdpmError::NotConditional {
                what: "the model".into(),
                reason: "it has no classes: model.classes = 0".into(),
                advice: "sample it unconditionally".into(),
            });
        }
        Ok(Guided {
            model: self.model,
            labels: Tensor::f_arange(b, (Kind::Int64, device))?.f_remainder(k)?,
            w: self.w,
        })
    }
}

impl<M: ConditionalPredictor + ?Sized> NoisePredictor for Balanced<'_, M> {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        let b = x_t.size().first().copied().unwrap_or(0);
        self.guided(b, x_t.device())?.predict(x_t, t)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        let b = shape.first().copied().unwrap_or(0);
        self.guided(b, tch::Device::Cpu)?.check_input(shape)
    }

    /// [`Guided`]'s: the model's bytes a sample, twice for w > 0.
    fn bytes_per_sample(&self) -> Option<u64> {
        Guided {
            model: self.model,
            labels: Tensor::new(),
            w: self.w,
        }
        .bytes_per_sample()
    }
}

#[cfg(test)]
mod class_mix_tests {
    use super::*;
    use crate::oracle::{LabelledLaw, LabelledOracle};
    use crate::sampler::{rng_lock, Sampler, SamplerConfig};
    use crate::schedule::{Schedule, ScheduleKind};
    use tch::Device;

    const CPU64: (Kind, Device) = (Kind::Double, Device::Cpu);

    /// Three components in 2-d, labels [0, 1, 1], two classes, under a 1000-step schedule.
    fn oracle() -> (LabelledOracle, Schedule) {
        let schedule = Schedule::new(ScheduleKind::Article, 1000, Device::Cpu).unwrap();
        let law = LabelledLaw::mixture(
            &Tensor::from_slice(&[0.3, 0.3, 0.4]),
            &Tensor::from_slice(&[-0.6, 0.2, 0.5, 0.5, 0.1, -0.7]).reshape([3, 2]),
            &Tensor::from_slice(&[0.1, 0.15, 0.2]),
            &Tensor::from_slice(&[0i64, 1, 1]),
            2,
        )
        .unwrap();
        (LabelledOracle::new(law, &schedule), schedule)
    }

    fn guided(oracle: &LabelledOracle, y: i64, b: i64, w: f64) -> Guided<'_, LabelledOracle> {
        Guided {
            model: oracle,
            labels: Tensor::full([b], y, (Kind::Int64, Device::Cpu)),
            w,
        }
    }

    /// Row i of a batch is guided towards class i mod K, bitwise [`Guided`] with those labels.
    #[test]
    fn balanced_cycles_through_the_classes_down_the_batch() {
        let _rng = rng_lock();
        tch::manual_seed(6);
        let (oracle, _) = oracle();
        let x = Tensor::randn([5, 2], CPU64);
        let t = Tensor::from_slice(&[3i64, 90, 400, 700, 1000]);
        for w in [0.0, 2.0] {
            let balanced = Balanced { model: &oracle, w };
            balanced.check_input(&[5, 2]).unwrap();
            let got = balanced.predict(&x, &t).unwrap();
            let want = Guided {
                model: &oracle,
                labels: Tensor::from_slice(&[0i64, 1, 0, 1, 0]),
                w,
            }
            .predict(&x, &t)
            .unwrap();
            assert!(got.equal(&want), "w = {w}");
        }
        let bad = Balanced {
            model: &oracle,
            w: -1.0,
        };
        assert!(matches!(
            bad.check_input(&[5, 2]),
            Err(DdpmError::OutOfRange {
                key: "sample.guidance",
                ..
            })
        ));
    }

    #[test]
    fn the_mix_is_the_convex_combination_of_the_two_guided_predictions() {
        let _rng = rng_lock();
        tch::manual_seed(5);
        let (oracle, _) = oracle();
        let x = Tensor::randn([6, 2], CPU64);
        let t = Tensor::from_slice(&[1i64, 50, 200, 500, 800, 1000]);
        for w in [0.0, 1.5] {
            let ea = guided(&oracle, 0, 6, w).predict(&x, &t).unwrap();
            let eb = guided(&oracle, 1, 6, w).predict(&x, &t).unwrap();
            // b = ∅ (2) too: a class mixed with the unconditional prediction.
            let en = guided(&oracle, 2, 6, w).predict(&x, &t).unwrap();
            for (b, e_b) in [(1, &eb), (2, &en)] {
                for s in [0.0, 0.25, 0.5, 0.9, 1.0] {
                    let mix = ClassMix {
                        model: &oracle,
                        a: 0,
                        b,
                        s,
                        w,
                    };
                    let got = mix.predict(&x, &t).unwrap();
                    let want = &ea * (1.0 - s) + e_b * s;
                    let err = f64::try_from((&got - &want).abs().max()).unwrap();
                    assert!(err < 1e-12, "w = {w}, b = {b}, s = {s}: {err}");
                }
            }
            // The ends are the guided predictions themselves, bitwise.
            let end = |s| {
                ClassMix {
                    model: &oracle,
                    a: 0,
                    b: 1,
                    s,
                    w,
                }
                .predict(&x, &t)
                .unwrap()
            };
            assert!(end(0.0).equal(&ea) && end(1.0).equal(&eb), "w = {w}");
            // And differ from each other (the test can fail).
            assert!(!ea.equal(&eb));
        }
    }

    #[test]
    fn the_ends_of_a_class_path_are_plain_guided_sampling_bitwise() {
        let _rng = rng_lock();
        let (oracle, schedule) = oracle();
        let sampler = Sampler::new(
            &schedule,
            SamplerConfig {
                steps: Some(20),
                eta: Some(0.0),
                clip_final: false,
                ..SamplerConfig::default()
            },
        )
        .unwrap();
        tch::manual_seed(11);
        let x_t = Tensor::randn([8, 2], tch::kind::FLOAT_CPU);
        for w in [0.0, 2.0] {
            let mix = |s| ClassMix {
                model: &oracle,
                a: 0,
                b: 1,
                s,
                w,
            };
            let run = |m: &dyn NoisePredictor| sampler.sample_from(m, &x_t, |_, _| ()).unwrap();
            let a = run(&guided(&oracle, 0, 8, w));
            let b = run(&guided(&oracle, 1, 8, w));
            assert!(run(&mix(0.0)).equal(&a), "w = {w}: s = 0 is class a");
            assert!(run(&mix(1.0)).equal(&b), "w = {w}: s = 1 is class b");
            // The middle is neither end, and is finite.
            let mid = run(&mix(0.5));
            assert!(!mid.equal(&a) && !mid.equal(&b), "w = {w}");
            assert!(bool::try_from(mid.isfinite().all()).unwrap());
        }
    }

    #[test]
    fn a_bad_mix_is_an_error_before_sampling() {
        let (oracle, _) = oracle();
        let mix = |a, b, s, w| ClassMix {
            model: &oracle,
            a,
            b,
            s,
            w,
        };
        assert!(mix(0, 1, 0.5, 0.0).check_input(&[4, 2]).is_ok());
        assert!(mix(0, 2, 0.5, 0.0).check_input(&[4, 2]).is_ok());
        for (m, what) in [
            (mix(0, 3, 0.5, 0.0), "label 3 > ∅"),
            (mix(-1, 1, 0.5, 0.0), "label −1"),
            (mix(0, 1, 1.5, 0.0), "s > 1"),
            (mix(0, 1, f64::NAN, 0.0), "s NaN"),
            (mix(0, 1, 0.5, -1.0), "w < 0"),
        ] {
            assert!(m.check_input(&[4, 2]).is_err(), "{what}");
        }
        assert!(mix(0, 1, 0.5, 0.0).check_input(&[4, 3]).is_err());
        let x = Tensor::zeros([2, 2], CPU64);
        let t = Tensor::from_slice(&[3i64, 4]);
        assert!(mix(0, 1, -0.1, 0.0).predict(&x, &t).is_err());
    }
}
