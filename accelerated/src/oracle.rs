//! The test oracle: the exact Bayes-optimal noise predictor E[ε|x_t] for data whose law is
//! known (isotropic Gaussian mixtures, finite sets, a Dirac, the standard normal), and
//! sampling from that law.

use crate::error::{DdpmError, Result};
use crate::guidance::ConditionalPredictor;
use crate::sampler::NoisePredictor;
use crate::schedule::{gather, Schedule};
use tch::{Device, Kind, Tensor};

/// A data law in R^d with a closed-form E[ε|x_t], held as an isotropic Gaussian mixture
/// {w_k, m_k, s_k} (f64): a finite set has s_k = 0, a Dirac is one point, the standard normal
/// one component N(0, I).
#[derive(Debug)]
pub struct DataLaw {
    weights: Tensor,
    means: Tensor,
    stds: Tensor,
}

impl Clone for DataLaw {
    fn clone(&self) -> Self {
        DataLaw {
            weights: self.weights.shallow_clone(),
            means: self.means.shallow_clone(),
            stds: self.stds.shallow_clone(),
        }
    }
}

impl DataLaw {
    /// Σ_k w_k N(m_k, s_k² I): `weights` [K] (non-negative, normalised here), `means` [K, d],
    /// `stds` [K] (non-negative).
    pub fn mixture(weights: &Tensor, means: &Tensor, stds: &Tensor) -> Result<DataLaw> {
        let k = weights.size().first().copied().unwrap_or(0);
        if weights.dim() != 1
            || k == 0
            || means.dim() != 2
            || means.size()[0] != k
            || stds.size() != [k]
        {
            let (what, expected, got) = if weights.dim() != 1 || k == 0 {
                ("weights", "[K] with K ≥ 1".to_string(), weights.size())
            } else if means.dim() != 2 || means.size()[0] != k {
                (
                    "means",
                    format!("[K, d] with K = {k}, one row per weight"),
                    means.size(),
                )
            } else {
                ("stds", format!("[{k}], one per weight"), stds.size())
            };
            return Err(DdpmError::ShapeMismatch {
                what,
                expected,
                got,
            });
        }
        let weights = weights.to_kind(Kind::Double);
        let stds = stds.to_kind(Kind::Double).to_device(weights.device());
        let means = means.to_kind(Kind::Double).to_device(weights.device());
        let valid = weights
            .ge(0.0)
            .all()
            .logical_and(&stds.ge(0.0).all())
            .logical_and(&means.isfinite().all());
        let total = weights.sum(Kind::Double);
        let total_positive =
            f64::try_from(&total)?.partial_cmp(&0.0) == Some(std::cmp::Ordering::Greater);
        if !bool::try_from(&valid)? || !total_positive {
            return Err(DdpmError::OutOfRange {
                key: "weights, means, stds",
                value: "a mixture".into(),
                expected: "non-negative weights (not all 0) and standard deviations, finite means"
                    .into(),
            });
        }
        Ok(DataLaw {
            weights: weights / total,
            means,
            stds,
        })
    }

    /// The finite set {c_k} with weights w_k (`points` [K, d]).
    pub fn finite(weights: &Tensor, points: &Tensor) -> Result<DataLaw> {
        let k = points.size().first().copied().unwrap_or(0);
        DataLaw::mixture(
            weights,
            points,
            &Tensor::zeros([k], (Kind::Double, points.device())),
        )
    }

    /// The Dirac at `point` [d].
    pub fn dirac(point: &Tensor) -> Result<DataLaw> {
        let one = Tensor::ones([1], (Kind::Double, point.device()));
        DataLaw::finite(&one, &point.unsqueeze(0))
    }

    /// The standard normal N(0, I) in `dim` dimensions.
    pub fn standard_normal(dim: i64, device: Device) -> Result<DataLaw> {
        let opts = (Kind::Double, device);
        DataLaw::mixture(
            &Tensor::ones([1], opts),
            &Tensor::zeros([1, dim], opts),
            &Tensor::ones([1], opts),
        )
    }

    /// d, the data dimension.
    pub fn dim(&self) -> i64 {
        self.means.size()[1]
    }

    /// This law on `device`.
    pub fn to_device(&self, device: Device) -> DataLaw {
        DataLaw {
            weights: self.weights.to_device(device),
            means: self.means.to_device(device),
            stds: self.stds.to_device(device),
        }
    }

    /// `n` draws [n, d] in `kind` on `device`.
    pub fn sample(&self, n: i64, kind: Kind, device: Device) -> Tensor {
        let law = self.to_device(device);
        let idx = law.weights.multinomial(n, true);
        let noise = Tensor::randn([n, self.dim()], (Kind::Double, device));
        let x =
            law.means.index_select(0, &idx) + law.stds.index_select(0, &idx).unsqueeze(1) * noise;
        x.to_kind(kind)
    }

    /// E[ε|x_t] for x_t [B, …] (d values a sample) and t Int64 [B], t ≥ 1, in x_t's kind:
    /// v_k = ᾱ_t² s_k² + β̄_t², r_k ∝ w_k N(x_t; ᾱ_t m_k, v_k I) (log-sum-exp),
    /// ε* = Σ_k r_k β̄_t (x_t − ᾱ_t m_k)/v_k.
    pub fn optimal_eps(&self, schedule: &Schedule, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.masked_eps(schedule, x_t, t, None)
    }

    /// `optimal_eps` with the components outside `keep` [B, K] (bool) left out of each
    /// sample's responsibilities (the softmax renormalises over those kept): the oracle of the
    /// sub-mixture kept for that sample.
    fn masked_eps(
        &self,
        schedule: &Schedule,
        x_t: &Tensor,
        t: &Tensor,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = x_t.size().first().copied().unwrap_or(0);
        let x = x_t.f_reshape([b, -1])?;
        if x.size()[1] != self.dim() {
            return Err(DdpmError::ShapeMismatch {
                what: "x_t",
                expected: format!("[B, {}], the law's dimension", self.dim()),
                got: x.size(),
            });
        }
        let (kind, device) = (x.kind(), x.device());
        let w = self.weights.to_device(device).to_kind(kind);
        let m = self.means.to_device(device).to_kind(kind);
        let s = self.stds.to_device(device).to_kind(kind);
        let ab = gather(schedule.alpha_bars(), t, &x)?; // [B, 1]
        let bb = gather(schedule.beta_bars(), t, &x)?;
        let v = ab.square() * s.square().unsqueeze(0) + bb.square(); // [B, K]
                                                                     // ‖x − ᾱ m_k‖² = ᾱ² ‖x/ᾱ − m_k‖², computed directly (no ‖x‖² − 2x·m expansion,
                                                                     // whose cancellation would swamp the tiny v_k of small t in f32).
        let dist = Tensor::cdist(&(&x / &ab), &m, 2.0, 2i64).square() * ab.square();
        let d = self.dim() as f64;
        let mut log_r = w.log().unsqueeze(0) - v.log() * (d / 2.0) - dist / (&v * 2.0);
        if let Some(keep) = keep {
            log_r = log_r.f_masked_fill(&keep.f_logical_not()?, f64::NEG_INFINITY)?;
        }
        let r_over_v = log_r.softmax(1, kind) / v;
        let eps = bb * (&x * r_over_v.sum_dim_intlist(1, true, kind) - ab * r_over_v.matmul(&m));
        Ok(eps.f_reshape(x_t.size())?)
    }
}

/// A labelled law: an isotropic Gaussian mixture (a finite set when every std is 0) whose
/// component k carries a class label in 0..classes. Given y, x_0 follows the mixture of the
/// components labelled y (weights renormalised); given ∅ (the label value `classes`), the
/// whole mixture. The tch twin of `ddpm_reference::oracle::LabelledLaw`.
#[derive(Debug)]
pub struct LabelledLaw {
    law: DataLaw,
    /// Int64 [K], on the law's device.
    labels: Tensor,
    classes: usize,
}

impl Clone for LabelledLaw {
    fn clone(&self) -> Self {
        LabelledLaw {
            law: self.law.clone(),
            labels: self.labels.shallow_clone(),
            classes: self.classes,
        }
    }
}

impl LabelledLaw {
    /// Σ_k w_k N(m_k, s_k² I) with component k in class `labels[k]` (`labels` [K], any
    /// integer kind), checked: the mixture as `DataLaw::mixture`, one label per component,
    /// labels in 0..classes, and every class of positive weight (so each p(x_0|y) exists).
    pub fn mixture(
        weights: &Tensor,
        means: &Tensor,
        stds: &Tensor,
        labels: &Tensor,
        classes: usize,
    ) -> Result<LabelledLaw> {
        let law = DataLaw::mixture(weights, means, stds)?;
        let k = law.weights.size()[0];
        if labels.size() != [k] || labels.is_floating_point() || labels.kind() == Kind::Bool {
            return Err(DdpmError::ShapeMismatch {
                what: "component labels",
                expected: format!("[{k}] integers, one per component"),
                got: labels.size(),
            });
        }
        let labels = labels
            .f_to_kind(Kind::Int64)?
            .f_to_device(law.weights.device())?;
        let (lo, hi) = (
            labels.f_min()?.int64_value(&[]),
            labels.f_max()?.int64_value(&[]),
        );
        if classes == 0 || lo < 0 || hi >= classes as i64 {
            return Err(DdpmError::OutOfRange {
                key: "component labels",
                value: format!("{lo}..={hi}"),
                expected: format!("in 0..{classes}, one class of the {classes}"),
            });
        }
        let class_mass = Tensor::f_zeros([classes as i64], (Kind::Double, labels.device()))?
            .f_index_add(0, &labels, &law.weights)?;
        if !bool::try_from(&class_mass.f_gt(0.0)?.f_all()?)? {
            return Err(DdpmError::OutOfRange {
                key: "component weights",
                value: format!(
                    "{:?} by class",
                    Vec::<f64>::try_from(&class_mass.f_to_device(Device::Cpu)?)?
                ),
                expected:
                    "positive for every class (each class needs a component of positive weight)"
                        .into(),
            });
        }
        Ok(LabelledLaw {
            law,
            labels,
            classes,
        })
    }

    /// Σ_k w_k δ(c_k) with point k in class `labels[k]` (`points` [K, d]), checked as
    /// `LabelledLaw::mixture`.
    pub fn finite(
        weights: &Tensor,
        points: &Tensor,
        labels: &Tensor,
        classes: usize,
    ) -> Result<LabelledLaw> {
        let k = points.size().first().copied().unwrap_or(0);
        let stds = Tensor::f_zeros([k], (Kind::Double, points.device()))?;
        LabelledLaw::mixture(weights, points, &stds, labels, classes)
    }

    /// The number of classes; the label value `classes()` stands for ∅ (no class).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// d, the data dimension.
    pub fn dim(&self) -> i64 {
        self.law.dim()
    }

    /// The unconditional law p(x_0).
    pub fn law(&self) -> &DataLaw {
        &self.law
    }

    /// This law on `device`.
    pub fn to_device(&self, device: Device) -> LabelledLaw {
        LabelledLaw {
            law: self.law.to_device(device),
            labels: self.labels.to_device(device),
            classes: self.classes,
        }
    }

    /// `y` checked as labels of a batch of `b`: Int64 [b] with values in 0..=classes.
    fn check_labels(&self, y: &Tensor, b: i64) -> Result<()> {
        if y.size() != [b] || y.kind() != Kind::Int64 {
            return Err(DdpmError::ShapeMismatch {
                what: "class labels",
                expected: format!("[{b}] Int64, one per sample"),
                got: y.size(),
            });
        }
        if b > 0 {
            let (lo, hi) = (y.f_min()?.int64_value(&[]), y.f_max()?.int64_value(&[]));
            if lo < 0 || hi > self.classes as i64 {
                return Err(crate::guidance::label_range_error(lo, hi, self.classes));
            }
        }
        Ok(())
    }

    /// E[ε | x_t, y] for x_t [B, …] (d values a sample), t Int64 [B] (t ≥ 1) and y Int64 [B]
    /// in 0..=classes (`classes` = ∅: E[ε | x_t]), in x_t's kind: the oracle of each sample's
    /// class law, computed as the whole mixture's with the other classes' components masked
    /// out of the responsibilities.
    pub fn conditional_eps(
        &self,
        schedule: &Schedule,
        x_t: &Tensor,
        t: &Tensor,
        y: &Tensor,
    ) -> Result<Tensor> {
        let b = x_t.size().first().copied().unwrap_or(0);
        self.check_labels(y, b)?;
        let y = y.f_to_device(x_t.device())?.f_unsqueeze(1)?; // [B, 1]
        let labels = self.labels.f_to_device(x_t.device())?.f_unsqueeze(0)?; // [1, K]
        let keep = labels
            .f_eq_tensor(&y)?
            .f_logical_or(&y.f_eq(self.classes as i64)?)?;
        self.law.masked_eps(schedule, x_t, t, Some(&keep))
    }

    /// `n` draws from the joint law on `device`: (x_0 [n, d] in `kind`, y Int64 [n]) — a
    /// component k drawn by weight, x_0 from it, y its label (training data for a
    /// conditional model; libtorch's generator, so `tch::manual_seed` fixes them).
    pub fn sample(&self, n: i64, kind: Kind, device: Device) -> Result<(Tensor, Tensor)> {
        let law = self.to_device(device);
        let idx = law.law.weights.f_multinomial(n, true)?;
        let noise = Tensor::f_randn([n, self.dim()], (Kind::Double, device))?;
        let x = law
            .law
            .stds
            .f_index_select(0, &idx)?
            .f_unsqueeze(1)?
            .f_mul(&noise)?
            .f_add(&law.law.means.f_index_select(0, &idx)?)?;
        Ok((x.f_to_kind(kind)?, law.labels.f_index_select(0, &idx)?))
    }
}

/// A labelled law's exact conditional noise predictor E[ε | x_t, y] under a schedule, usable
/// wherever a conditional network is (through `guidance::Guided`, every sampler takes it).
#[derive(Debug, Clone)]
pub struct LabelledOracle {
    law: LabelledLaw,
    schedule: Schedule,
}

impl LabelledOracle {
    /// The oracle for `law` under `schedule`.
    pub fn new(law: LabelledLaw, schedule: &Schedule) -> LabelledOracle {
        LabelledOracle {
            law,
            schedule: schedule.clone(),
        }
    }

    /// The labelled law.
    pub fn law(&self) -> &LabelledLaw {
        &self.law
    }

    /// The oracle of class `y` alone (`y = classes()`: of the whole law), as a plain
    /// noise predictor.
    pub fn class_oracle(&self, y: usize) -> Result<Oracle> {
        if y > self.law.classes {
            return Err(crate::guidance::label_range_error(
                y as i64,
                y as i64,
                self.law.classes,
            ));
        }
        if y == self.law.classes {
            return Ok(Oracle::new(self.law.law.clone(), &self.schedule));
        }
        let keep = self
            .law
            .labels
            .f_eq(y as i64)?
            .f_nonzero()?
            .f_squeeze_dim(1)?;
        let l = &self.law.law;
        let law = DataLaw::mixture(
            &l.weights.f_index_select(0, &keep)?,
            &l.means.f_index_select(0, &keep)?,
            &l.stds.f_index_select(0, &keep)?,
        )?;
        Ok(Oracle::new(law, &self.schedule))
    }
}

impl ConditionalPredictor for LabelledOracle {
    fn predict_class(&self, x_t: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.law.conditional_eps(&self.schedule, x_t, t, y)
    }

    fn classes(&self) -> usize {
        self.law.classes
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        Oracle::new(self.law.law.clone(), &self.schedule).check_input(shape)
    }
}

/// The law's exact noise predictor under a schedule, usable wherever a network is.
#[derive(Debug, Clone)]
pub struct Oracle {
    law: DataLaw,
    schedule: Schedule,
}

impl Oracle {
    /// The oracle for `law` under `schedule`.
    pub fn new(law: DataLaw, schedule: &Schedule) -> Oracle {
        Oracle {
            law,
            schedule: schedule.clone(),
        }
    }

    /// The data law.
    pub fn law(&self) -> &DataLaw {
        &self.law
    }
}

impl NoisePredictor for Oracle {
    /// The shape error if x_t's size does not match the law (`check_input` reports it first).
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.law.optimal_eps(&self.schedule, x_t, t)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        let d: i64 = shape.iter().skip(1).product();
        if shape.is_empty() || d != self.law.dim() {
            return Err(DdpmError::ShapeMismatch {
                what: "sample shape",
                expected: format!(
                    "[B, …] with {} values a sample, the law's dimension",
                    self.law.dim()
                ),
                got: shape.to_vec(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{rng_lock, Sampler, SamplerConfig};
    use crate::schedule::ScheduleKind;
    use crate::sigma::SigmaChoice;

    const CPU64: (Kind, Device) = (Kind::Double, Device::Cpu);

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).abs().max()).unwrap()
    }

    #[test]
    fn a_misfit_batch_is_an_error_not_a_panic() {
        let s = Schedule::new(ScheduleKind::Article, 10, Device::Cpu).unwrap();
        let oracle = Oracle::new(DataLaw::standard_normal(3, Device::Cpu).unwrap(), &s);
        let t = Tensor::from_slice(&[2i64, 5]);
        assert!(oracle.predict(&Tensor::zeros([2, 3], CPU64), &t).is_ok());
        assert!(oracle.predict(&Tensor::zeros([2, 4], CPU64), &t).is_err());
        assert!(oracle
            .predict(&Tensor::zeros([2, 3], CPU64), &t.narrow(0, 0, 1))
            .is_err());
        assert!(oracle.check_input(&[2, 4]).is_err());
    }

    fn schedule() -> Schedule {
        Schedule::new(ScheduleKind::Article, 1000, Device::Cpu).unwrap()
    }

    #[test]
    fn dirac_and_standard_normal_closed_forms() {
        let _rng = rng_lock();
        let s = schedule();
        let x = Tensor::randn([4, 3], CPU64);
        let t = Tensor::from_slice(&[1i64, 10, 500, 1000]);
        let c = Tensor::from_slice(&[0.5, -1.0, 2.0]);
        let dirac = DataLaw::dirac(&c).unwrap().optimal_eps(&s, &x, &t).unwrap();
        let ab = s.alpha_bar_at(&t, &x).unwrap();
        let bb = s.beta_bar_at(&t, &x).unwrap();
        assert!(max_diff(&dirac, &((&x - &ab * c.unsqueeze(0)) / &bb)) < 1e-9);
        let normal = DataLaw::standard_normal(3, Device::Cpu)
            .unwrap()
            .optimal_eps(&s, &x, &t)
            .unwrap();
        assert!(max_diff(&normal, &(&bb * &x)) < 1e-12);
    }

    #[test]
    fn finite_set_matches_a_direct_bayes_computation() {
        let _rng = rng_lock();
        let s = schedule();
        let points = Tensor::randn([3, 2], CPU64);
        let weights = Tensor::from_slice(&[0.2, 0.3, 0.5]);
        let law = DataLaw::finite(&weights, &points).unwrap();
        // Moderate t keep every density representable, so Bayes' rule can be applied plainly.
        let t = Tensor::from_slice(&[300i64, 600]);
        let x = Tensor::randn([2, 2], CPU64);
        let got = law.optimal_eps(&s, &x, &t).unwrap();
        for b in 0..2 {
            let tb = t.int64_value(&[b]);
            let (ab, bb) = (
                s.alpha_bars().double_value(&[tb]),
                s.beta_bars().double_value(&[tb]),
            );
            let xb = x.get(b);
            let dens: Vec<f64> = (0..3)
                .map(|k| {
                    let r2 = f64::try_from((&xb - points.get(k) * ab).square().sum(Kind::Double))
                        .unwrap();
                    weights.double_value(&[k]) * (-r2 / (2.0 * bb * bb)).exp()
                })
                .collect();
            let z: f64 = dens.iter().sum();
            let expected = (0..3)
                .map(|k| (&xb - points.get(k) * ab) * (dens[k as usize] / z / bb))
                .fold(xb.zeros_like(), |acc, e| acc + e);
            assert!(max_diff(&got.get(b), &expected) < 1e-10);
        }
    }

    #[test]
    fn single_gaussian_component_matches_its_closed_form() {
        let _rng = rng_lock();
        let s = schedule();
        let (mean, sd) = (Tensor::from_slice(&[1.0, -2.0, 0.5, 3.0]), 0.7);
        let law = DataLaw::mixture(
            &Tensor::ones([1], CPU64),
            &mean.unsqueeze(0),
            &Tensor::from_slice(&[sd]),
        )
        .unwrap();
        let x = Tensor::randn([3, 2, 2], CPU64);
        let t = Tensor::from_slice(&[1i64, 100, 999]);
        let got = law.optimal_eps(&s, &x, &t).unwrap();
        let ab = s.alpha_bar_at(&t, &x).unwrap();
        let bb = s.beta_bar_at(&t, &x).unwrap();
        let v = ab.square() * sd * sd + bb.square();
        let expected = &bb * (&x - &ab * mean.view([1, 2, 2])) / v;
        assert!(max_diff(&got, &expected) < 1e-10);
    }

    #[test]
    fn sampling_a_dirac_with_its_oracle_and_posterior_sigma_returns_the_point() {
        // With σ_t = σ̃_t and the exact ε*, every step samples p(x_{t−1}|x_t, x_0 = c) and
        // σ_1 = 0, so the chain ends exactly on c (up to rounding).
        let _rng = rng_lock();
        let s = Schedule::new(ScheduleKind::Article, 100, Device::Cpu).unwrap();
        let c = Tensor::from_slice(&[0.25f64, -0.5, 0.75, 0.0]);
        let oracle = Oracle::new(DataLaw::dirac(&c).unwrap(), &s);
        let cfg = SamplerConfig {
            sigma: SigmaChoice::Posterior,
            seed: Some(3),
            ..SamplerConfig::default()
        };
        let x = Sampler::new(&s, cfg)
            .unwrap()
            .sample(&oracle, &[5, 4], Device::Cpu)
            .unwrap();
        assert!(max_diff(&x, &c.to_kind(Kind::Float).unsqueeze(0)) < 1e-4);
        assert!(oracle.check_input(&[5, 3]).is_err());
    }

    #[test]
    fn mixture_samples_have_the_laws_moments() {
        // 20,000 draws of ½N(−2, 0.5²) + ½N(2, 1): mean 0, variance 4 + (0.25 + 1)/2 = 4.625.
        // Standard errors ≈ 0.015 (mean) and ≈ 0.04 (variance); tolerances are ~5 of them.
        let _rng = rng_lock();
        tch::manual_seed(11);
        let law = DataLaw::mixture(
            &Tensor::from_slice(&[1.0, 1.0]),
            &Tensor::from_slice(&[-2.0, 2.0]).view([2, 1]),
            &Tensor::from_slice(&[0.5, 1.0]),
        )
        .unwrap();
        let x = law.sample(20_000, Kind::Double, Device::Cpu);
        let mean = f64::try_from(x.mean(Kind::Double)).unwrap();
        let var = f64::try_from(x.var(true)).unwrap();
        assert!(mean.abs() < 0.08, "{mean}");
        assert!((var - 4.625).abs() < 0.2, "{var}");
    }
}
