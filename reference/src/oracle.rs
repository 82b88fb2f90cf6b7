//! The test oracle: for data whose law is known, the Bayes-optimal noise predictor
//! ε*(x_t) = E[ε | x_t], the minimiser of loss (8), in closed form.

use ndarray::{Array1, Array2, Axis};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::Rng;
use std::f64::consts::TAU;

use crate::error::{check_shape, check_std, RefError, Result};
use crate::loss::euclidean_loss;
use crate::marginal::{marginal_sample, standard_normal};
use crate::schedule::Schedule;

/// A data law with an exact oracle. Build it with the checked constructors.
#[derive(Debug, Clone, PartialEq)]
pub enum DataLaw {
    /// All mass at one point c.
    Dirac {
        /// The point c (length d ≥ 1).
        center: Array1<f64>,
    },
    /// N(0, I) in `dim` dimensions.
    StandardNormal {
        /// The dimension d ≥ 1.
        dim: usize,
    },
    /// Σ_k w_k δ(c_k): points are the rows of `points` [K, d]; weights need not sum to 1.
    FiniteSet {
        /// The points c_k, one per row.
        points: Array2<f64>,
        /// Non-negative weights w_k, not all zero.
        weights: Array1<f64>,
    },
    /// Σ_k w_k N(m_k, s_k² I): means are the rows of `means` [K, d]; weights need not sum to 1.
    GaussianMixture {
        /// Non-negative weights w_k, not all zero.
        weights: Array1<f64>,
        /// The means m_k, one per row.
        means: Array2<f64>,
        /// The per-dimension standard deviations s_k ≥ 0.
        stds: Array1<f64>,
    },
}

/// Normalised log-weights, means [K, d] and stds of a law seen as an isotropic mixture.
struct Components {
    log_weights: Array1<f64>,
    means: Array2<f64>,
    stds: Array1<f64>,
}

impl DataLaw {
    /// δ(c), checked.
    pub fn dirac(center: Array1<f64>) -> Result<Self> {
        let law = DataLaw::Dirac { center };
        law.validate()?;
        Ok(law)
    }

    /// N(0, I_dim), checked.
    pub fn standard_normal(dim: usize) -> Result<Self> {
        let law = DataLaw::StandardNormal { dim };
        law.validate()?;
        Ok(law)
    }

    /// Σ_k w_k δ(c_k), checked.
    pub fn finite(weights: Array1<f64>, points: Array2<f64>) -> Result<Self> {
        let law = DataLaw::FiniteSet { points, weights };
        law.validate()?;
        Ok(law)
    }

    /// Σ_k w_k N(m_k, s_k² I), checked.
    pub fn mixture(weights: Array1<f64>, means: Array2<f64>, stds: Array1<f64>) -> Result<Self> {
        let law = DataLaw::GaussianMixture {
            weights,
            means,
            stds,
        };
        law.validate()?;
        Ok(law)
    }

    /// The data dimension d.
    pub fn dim(&self) -> usize {
        match self {
            DataLaw::Dirac { center } => center.len(),
            DataLaw::StandardNormal { dim } => *dim,
            DataLaw::FiniteSet { points, .. } => points.ncols(),
            DataLaw::GaussianMixture { means, .. } => means.ncols(),
        }
    }

    /// Checks non-emptiness, matching lengths, finite values, weights ≥ 0 summing to > 0, stds ≥ 0.
    pub fn validate(&self) -> Result<()> {
        if self.dim() == 0 {
            return Err(RefError::EmptyLaw("the data dimension is 0"));
        }
        let (weights, locations, stds) = match self {
            DataLaw::Dirac { center } => return check_finite("Dirac centre", center.iter()),
            DataLaw::StandardNormal { .. } => return Ok(()),
            DataLaw::FiniteSet { points, weights } => (weights, points, None),
            DataLaw::GaussianMixture {
                weights,
                means,
                stds,
            } => (weights, means, Some(stds)),
        };
        if locations.nrows() == 0 {
            return Err(RefError::EmptyLaw("it has no points or components"));
        }
        check_shape(
            "weights (one per component)",
            &[locations.nrows()],
            weights.shape(),
        )?;
        check_finite("point or mean coordinate", locations.iter())?;
        for &w in weights {
            check_std("weight", w, false)?;
        }
        if weights.sum() <= 0.0 {
            return Err(RefError::InvalidParameter {
                name: "sum of weights",
                value: weights.sum(),
                reason: "must be > 0",
            });
        }
        if let Some(stds) = stds {
            check_shape(
                "stds (one per component)",
                &[locations.nrows()],
                stds.shape(),
            )?;
            for &s in stds {
                check_std("component std", s, false)?;
            }
        }
        Ok(())
    }

    /// The law as an isotropic Gaussian mixture (a point is a component of std 0).
    fn components(&self) -> Result<Components> {
        self.validate()?;
        let single = |mean: Array1<f64>, std: f64| Components {
            log_weights: Array1::zeros(1),
            means: mean.insert_axis(Axis(0)),
            stds: Array1::from_elem(1, std),
        };
        let normalised = |w: &Array1<f64>| w.mapv(f64::ln) - w.sum().ln();
        Ok(match self {
            DataLaw::Dirac { center } => single(center.clone(), 0.0),
            DataLaw::StandardNormal { dim } => single(Array1::zeros(*dim), 1.0),
            DataLaw::FiniteSet { points, weights } => Components {
                log_weights: normalised(weights),
                means: points.clone(),
                stds: Array1::zeros(points.nrows()),
            },
            DataLaw::GaussianMixture {
                weights,
                means,
                stds,
            } => Components {
                log_weights: normalised(weights),
                means: means.clone(),
                stds: stds.clone(),
            },
        })
    }

    /// ε*(x_t) = E[ε|x_t] = Σ_k r_k β̄_t (x_t − ᾱ_t m_k)/v_k, v_k = ᾱ_t² s_k² + β̄_t²,
    /// r_k ∝ w_k N(x_t; ᾱ_t m_k, v_k I) (log-sum-exp), for each row of x_t [n, d], 1 ≤ t ≤ T.
    pub fn optimal_eps(
        &self,
        schedule: &Schedule,
        xt: &Array2<f64>,
        t: usize,
    ) -> Result<Array2<f64>> {
        let r = self.responsibilities(schedule, xt, t)?;
        let c = self.components()?;
        let (ab, bb) = (schedule.alpha_bar(t)?, schedule.beta_bar(t)?);
        let v = c.stds.mapv(|s| (ab * s).powi(2) + bb * bb);
        let mut eps = Array2::zeros(xt.raw_dim());
        for k in 0..v.len() {
            let residual = xt - &(&c.means.row(k) * ab);
            eps += &(residual * r.column(k).insert_axis(Axis(1)) * (bb / v[k]));
        }
        Ok(eps)
    }

    /// The posterior r_k(x_t) ∝ w_k N(x_t; ᾱ_t m_k, v_k I) over the components [n, K]
    /// (log-sum-exp), the weights of `optimal_eps`.
    fn responsibilities(
        &self,
        schedule: &Schedule,
        xt: &Array2<f64>,
        t: usize,
    ) -> Result<Array2<f64>> {
        schedule.check_t(t, 1)?;
        let c = self.components()?;
        check_shape(
            "x_t columns against the law's dimension",
            &[self.dim()],
            &[xt.ncols()],
        )?;
        let (ab, bb) = (schedule.alpha_bar(t)?, schedule.beta_bar(t)?);
        let v = c.stds.mapv(|s| (ab * s).powi(2) + bb * bb);
        let d = self.dim() as f64;
        let residual = |k: usize| xt - &(&c.means.row(k) * ab);
        let mut log_r = Array2::zeros((xt.nrows(), v.len()));
        for (k, mut col) in log_r.axis_iter_mut(Axis(1)).enumerate() {
            let sq = residual(k).mapv(|r| r * r).sum_axis(Axis(1));
            col.assign(&sq.mapv(|s| c.log_weights[k] - 0.5 * (s / v[k] + d * (TAU * v[k]).ln())));
        }
        let max = log_r.fold_axis(Axis(1), f64::NEG_INFINITY, |&m, &x| m.max(x));
        let mut r = (log_r - &max.insert_axis(Axis(1))).mapv(f64::exp);
        let total = r.sum_axis(Axis(1)).insert_axis(Axis(1));
        r /= &total;
        Ok(r)
    }

    /// n independent draws from the law, one per row of an [n, d] array.
    pub fn sample<R: Rng + ?Sized>(&self, n: usize, rng: &mut R) -> Result<Array2<f64>> {
        let c = self.components()?;
        let probs = (c.log_weights.mapv(f64::exp)).to_vec();
        let index =
            WeightedIndex::new(&probs).map_err(|_| RefError::EmptyLaw("all weights are zero"))?;
        let picks: Vec<usize> = (0..n).map(|_| index.sample(rng)).collect();
        let stds = c.stds.select(Axis(0), &picks).insert_axis(Axis(1));
        Ok(c.means.select(Axis(0), &picks) + standard_normal(n, self.dim(), rng) * &stds)
    }

    /// Minimum unweighted loss (8) at t in closed form, where one exists (a single component
    /// N(m, s² I), Dirac included): d·ᾱ_t² s²/(ᾱ_t² s² + β̄_t²); `None` for mixtures.
    pub fn min_loss(&self, schedule: &Schedule, t: usize) -> Result<Option<f64>> {
        schedule.check_t(t, 1)?;
        let c = self.components()?;
        if c.stds.len() != 1 {
            return Ok(None);
        }
        let signal = (schedule.alpha_bar(t)? * c.stds[0]).powi(2);
        Ok(Some(
            self.dim() as f64 * signal / (signal + schedule.beta_bar(t)?.powi(2)),
        ))
    }

    /// Monte Carlo estimate of the minimum unweighted loss (8) at t from n draws of (x_0, ε).
    pub fn min_loss_monte_carlo<R: Rng + ?Sized>(
        &self,
        schedule: &Schedule,
        t: usize,
        n: usize,
        rng: &mut R,
    ) -> Result<f64> {
        if n == 0 {
            return Err(RefError::InvalidParameter {
                name: "number of draws",
                value: 0.0,
                reason: "must be >= 1",
            });
        }
        let x0 = self.sample(n, rng)?;
        let eps = standard_normal(n, self.dim(), rng);
        let xt = marginal_sample(schedule, &x0, t, &eps)?;
        euclidean_loss(&eps, &self.optimal_eps(schedule, &xt, t)?)
    }
}

/// A labelled law: an isotropic Gaussian mixture (a finite set when every std is 0) whose
/// component k carries a class label `labels[k]` ∈ 0..classes. Given y, x_0 follows the mixture
/// of the components labelled y (weights renormalised); without a label, the whole mixture.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledLaw {
    /// The whole mixture p(x_0) = Σ_y p(y) p(x_0|y).
    law: DataLaw,
    /// One label per component.
    labels: Vec<usize>,
    /// p(x_0|y) for y = 0..classes.
    class_laws: Vec<DataLaw>,
    /// p(y) for y = 0..classes.
    class_weights: Array1<f64>,
}

impl LabelledLaw {
    /// Σ_k w_k N(m_k, s_k² I) with component k in class `labels[k]`, checked: the mixture as
    /// `DataLaw::mixture`, one label per component, labels below `classes`, and every class
    /// of positive weight (so that every p(x_0|y) exists).
    pub fn mixture(
        weights: Array1<f64>,
        means: Array2<f64>,
        stds: Array1<f64>,
        labels: Vec<usize>,
        classes: usize,
    ) -> Result<Self> {
        let law = DataLaw::mixture(weights.clone(), means.clone(), stds.clone())?;
        check_shape(
            "labels (one per component)",
            &[means.nrows()],
            &[labels.len()],
        )?;
        if classes == 0 {
            return Err(RefError::EmptyLaw("it has no classes"));
        }
        if let Some(&bad) = labels.iter().find(|&&y| y >= classes) {
            return Err(RefError::InvalidParameter {
                name: "component label",
                value: bad as f64,
                reason: "must be below the number of classes",
            });
        }
        let class_laws = (0..classes)
            .map(|y| {
                let idx: Vec<usize> = (0..labels.len()).filter(|&k| labels[k] == y).collect();
                let w = weights.select(Axis(0), &idx);
                if w.sum() <= 0.0 {
                    return Err(RefError::InvalidParameter {
                        name: "class without weight",
                        value: y as f64,
                        reason: "every class needs a component of positive weight",
                    });
                }
                DataLaw::mixture(w, means.select(Axis(0), &idx), stds.select(Axis(0), &idx))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut class_weights = Array1::zeros(classes);
        for (&y, &w) in labels.iter().zip(&weights) {
            class_weights[y] += w;
        }
        class_weights /= weights.sum();
        Ok(LabelledLaw {
            law,
            labels,
            class_laws,
            class_weights,
        })
    }

    /// Σ_k w_k δ(c_k) with point k in class `labels[k]`, checked as `LabelledLaw::mixture`.
    pub fn finite(
        weights: Array1<f64>,
        points: Array2<f64>,
        labels: Vec<usize>,
        classes: usize,
    ) -> Result<Self> {
        let stds = Array1::zeros(points.nrows());
        LabelledLaw::mixture(weights, points, stds, labels, classes)
    }

    /// The number of classes; the label value `classes()` stands for "no class" (∅).
    pub fn classes(&self) -> usize {
        self.class_laws.len()
    }

    /// The data dimension d.
    pub fn dim(&self) -> usize {
        self.law.dim()
    }

    /// The component labels.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The unconditional law p(x_0).
    pub fn law(&self) -> &DataLaw {
        &self.law
    }

    /// p(x_0|y), the mixture of class y's components; y = `classes()` (∅) gives p(x_0).
    pub fn class_law(&self, y: usize) -> Result<&DataLaw> {
        match y.cmp(&self.classes()) {
            std::cmp::Ordering::Less => Ok(&self.class_laws[y]),
            std::cmp::Ordering::Equal => Ok(&self.law),
            std::cmp::Ordering::Greater => Err(RefError::InvalidParameter {
                name: "class label",
                value: y as f64,
                reason: "must be at most the number of classes (which means no class)",
            }),
        }
    }

    /// p(y) = Σ_{k labelled y} w_k / Σ_k w_k, for y = 0..classes.
    pub fn class_weights(&self) -> &Array1<f64> {
        &self.class_weights
    }

    /// E[ε | x_t, y] for each row of x_t [n, d] with its own label `labels[i]` ∈ 0..=classes
    /// (`classes()` = ∅: E[ε | x_t]), 1 ≤ t ≤ T: the oracle of the row's class law.
    pub fn conditional_eps(
        &self,
        schedule: &Schedule,
        xt: &Array2<f64>,
        t: usize,
        labels: &[usize],
    ) -> Result<Array2<f64>> {
        check_shape(
            "labels (one per row of x_t)",
            &[xt.nrows()],
            &[labels.len()],
        )?;
        if let Some(&bad) = labels.iter().find(|&&y| y > self.classes()) {
            self.class_law(bad)?;
        }
        let mut eps = Array2::zeros(xt.raw_dim());
        for y in 0..=self.classes() {
            let rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == y).collect();
            if rows.is_empty() {
                continue;
            }
            let part = self
                .class_law(y)?
                .optimal_eps(schedule, &xt.select(Axis(0), &rows), t)?;
            for (j, &i) in rows.iter().enumerate() {
                eps.row_mut(i).assign(&part.row(j));
            }
        }
        Ok(eps)
    }

    /// The class posterior p_t(y | x_t) [n, classes] of the noisy x_t at t (the implicit
    /// classifier of guidance): Σ_{k labelled y} r_k(x_t), r_k the responsibilities of
    /// `DataLaw::optimal_eps` (log-sum-exp).
    pub fn class_posterior(
        &self,
        schedule: &Schedule,
        xt: &Array2<f64>,
        t: usize,
    ) -> Result<Array2<f64>> {
        let r = self.law.responsibilities(schedule, xt, t)?;
        let mut p = Array2::zeros((xt.nrows(), self.classes()));
        for (k, &y) in self.labels.iter().enumerate() {
            let mut col = p.column_mut(y);
            col += &r.column(k);
        }
        Ok(p)
    }

    /// n draws (x_0 [n, d], y [n]) from the joint law: y ~ p(y), then x_0 ~ p(x_0|y) (a
    /// component k drawn by weight, its label kept): training data for a conditional model.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        n: usize,
        rng: &mut R,
    ) -> Result<(Array2<f64>, Vec<usize>)> {
        let c = self.law.components()?;
        let probs = (c.log_weights.mapv(f64::exp)).to_vec();
        let index =
            WeightedIndex::new(&probs).map_err(|_| RefError::EmptyLaw("all weights are zero"))?;
        let picks: Vec<usize> = (0..n).map(|_| index.sample(rng)).collect();
        let stds = c.stds.select(Axis(0), &picks).insert_axis(Axis(1));
        let x = c.means.select(Axis(0), &picks) + standard_normal(n, self.dim(), rng) * &stds;
        Ok((x, picks.iter().map(|&k| self.labels[k]).collect()))
    }
}

/// Checks that every value is finite.
fn check_finite<'a>(what: &'static str, mut values: impl Iterator<Item = &'a f64>) -> Result<()> {
    match values.find(|v| !v.is_finite()) {
        Some(&value) => Err(RefError::InvalidParameter {
            name: what,
            value,
            reason: "must be finite",
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;
    use approx::assert_relative_eq;
    use ndarray::array;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn assert_close(a: &Array2<f64>, b: &Array2<f64>, tol: f64) {
        assert_eq!(a.shape(), b.shape());
        for (x, y) in a.iter().zip(b.iter()) {
            assert_relative_eq!(*x, *y, epsilon = tol, max_relative = tol);
        }
    }

    fn schedule() -> Schedule {
        Schedule::new(ScheduleKind::Article, 100).unwrap()
    }

    #[test]
    fn dirac_and_standard_normal_oracles_are_the_closed_forms() {
        let s = schedule();
        let xt = array![[0.3, -1.2], [2.0, 0.1]];
        let c = array![0.5, -0.5];
        for t in [1, 37, 100] {
            let (ab, bb) = (s.alpha_bar(t).unwrap(), s.beta_bar(t).unwrap());
            let dirac = DataLaw::dirac(c.clone())
                .unwrap()
                .optimal_eps(&s, &xt, t)
                .unwrap();
            assert_close(&dirac, &((&xt - &(&c * ab)) / bb), 1e-12);
            let normal = DataLaw::standard_normal(2)
                .unwrap()
                .optimal_eps(&s, &xt, t)
                .unwrap();
            assert_close(&normal, &(&xt * bb), 1e-12);
        }
    }

    #[test]
    fn the_general_mixture_code_agrees_with_its_special_cases() {
        let s = schedule();
        let xt = array![[0.3, -1.2], [2.0, 0.1], [-0.4, 0.4]];
        let t = 20;
        let (ab, bb) = (s.alpha_bar(t).unwrap(), s.beta_bar(t).unwrap());
        let one_point = DataLaw::finite(array![3.0], array![[0.5, -0.5]]).unwrap();
        let dirac = DataLaw::dirac(array![0.5, -0.5]).unwrap();
        assert_close(
            &one_point.optimal_eps(&s, &xt, t).unwrap(),
            &dirac.optimal_eps(&s, &xt, t).unwrap(),
            1e-12,
        );
        // One Gaussian N(m, s²I): ε* = β̄_t (x_t − ᾱ_t m)/(ᾱ_t² s² + β̄_t²).
        let m = array![1.0, 2.0];
        let g = DataLaw::mixture(array![1.0], m.clone().insert_axis(Axis(0)), array![0.7]).unwrap();
        let v = (ab * 0.7f64).powi(2) + bb * bb;
        assert_close(
            &g.optimal_eps(&s, &xt, t).unwrap(),
            &((&xt - &(&m * ab)) * (bb / v)),
            1e-12,
        );
        // A finite set is a mixture of zero-width components.
        let points = array![[1.0, 0.0], [-1.0, 0.5], [0.0, -2.0]];
        let w = array![0.2, 0.5, 0.3];
        let set = DataLaw::finite(w.clone(), points.clone()).unwrap();
        let mix = DataLaw::mixture(w, points, Array1::zeros(3)).unwrap();
        assert_close(
            &set.optimal_eps(&s, &xt, t).unwrap(),
            &mix.optimal_eps(&s, &xt, t).unwrap(),
            1e-12,
        );
    }

    #[test]
    fn two_point_oracle_is_stable_far_from_the_data() {
        // x_t = ±1e4 at t = 1 (β̄_1 ≈ 0.0014): every density underflows without log-sum-exp.
        let s = schedule();
        let (ab, bb) = (s.alpha_bar(1).unwrap(), s.beta_bar(1).unwrap());
        let law = DataLaw::finite(array![1.0, 1.0], array![[1.0], [-1.0]]).unwrap();
        let xt = array![[1e4], [-1e4], [0.0]];
        let eps = law.optimal_eps(&s, &xt, 1).unwrap();
        assert_relative_eq!(eps[[0, 0]], (1e4 - ab) / bb, max_relative = 1e-12);
        assert_relative_eq!(eps[[1, 0]], (-1e4 + ab) / bb, max_relative = 1e-12);
        // Symmetric responsibilities at 0 cancel.
        assert!(eps[[2, 0]].abs() < 1e-9);
    }

    #[test]
    fn oracle_residual_is_orthogonal_to_functions_of_x_t() {
        // E[ε|x_t] is the L² projection: E[(ε − ε*(x_t))·h(x_t)] = 0 for any h. Checked for
        // h = x_t and h = tanh(x_t) on a 3-component 2-D mixture with n = 40000 draws; each
        // mean must be within 5 standard errors of 0 (two-sided α ≈ 6e-7 per check).
        let s = schedule();
        let law = DataLaw::mixture(
            array![0.5, 0.3, 0.2],
            array![[1.0, 1.0], [-1.0, 0.5], [0.0, -1.5]],
            array![0.2, 0.4, 0.0],
        )
        .unwrap();
        let mut rng = StdRng::seed_from_u64(23);
        let n = 40000;
        for t in [5, 40] {
            let x0 = law.sample(n, &mut rng).unwrap();
            let eps = standard_normal(n, 2, &mut rng);
            let xt = marginal_sample(&s, &x0, t, &eps).unwrap();
            let resid = &eps - &law.optimal_eps(&s, &xt, t).unwrap();
            for h in [xt.clone(), xt.mapv(f64::tanh)] {
                let prod = (&resid * &h).sum_axis(Axis(1));
                let mean = prod.mean().unwrap();
                let se = prod.std(1.0) / (n as f64).sqrt();
                assert!(
                    mean.abs() < 5.0 * se,
                    "t = {t}: {mean} vs standard error {se}"
                );
            }
        }
    }

    #[test]
    fn closed_form_minimum_loss_matches_monte_carlo() {
        let s = schedule();
        let t = 30;
        let ab2 = s.alpha_bar(t).unwrap().powi(2);
        assert_eq!(
            DataLaw::dirac(array![1.0, 2.0])
                .unwrap()
                .min_loss(&s, t)
                .unwrap(),
            Some(0.0)
        );
        let normal = DataLaw::standard_normal(3)
            .unwrap()
            .min_loss(&s, t)
            .unwrap()
            .unwrap();
        assert_relative_eq!(normal, 3.0 * ab2, max_relative = 1e-14);
        let mixture = DataLaw::finite(array![1.0, 1.0], array![[0.0], [1.0]]).unwrap();
        assert_eq!(mixture.min_loss(&s, t).unwrap(), None);
        // For N(m, s²I) the residual ε − ε* is N(0, c I), so the loss is c·χ²_d: with d = 2 and
        // n = 40000 its relative standard error is sqrt(2/(n d)) = 0.5%; 2.5% is 5 of them.
        let g = DataLaw::mixture(array![1.0], array![[0.5, -1.0]], array![0.6]).unwrap();
        let exact = g.min_loss(&s, t).unwrap().unwrap();
        assert_relative_eq!(
            exact,
            2.0 * ab2 * 0.36 / (ab2 * 0.36 + s.beta_bar(t).unwrap().powi(2)),
            max_relative = 1e-14
        );
        let mut rng = StdRng::seed_from_u64(29);
        let mc = g.min_loss_monte_carlo(&s, t, 40000, &mut rng).unwrap();
        assert_relative_eq!(mc, exact, max_relative = 0.025);
    }

    #[test]
    fn mixture_samples_follow_the_weights_and_component_spread() {
        // Components at ±10 never overlap; n = 10000 draws: the share of positive draws has
        // standard error sqrt(0.8·0.2/n) = 0.004, tolerance 0.02 = 5 of them; the positive
        // component's sample variance (≈ 8000 draws) has relative standard error ≈ 1.6%, 8%
        // is 5 of them.
        let law =
            DataLaw::mixture(array![1.0, 4.0], array![[-10.0], [10.0]], array![0.5, 2.0]).unwrap();
        let mut rng = StdRng::seed_from_u64(31);
        let x = law.sample(10000, &mut rng).unwrap();
        let pos: Vec<f64> = x.iter().copied().filter(|&v| v > 0.0).collect();
        assert!((pos.len() as f64 / 10000.0 - 0.8).abs() < 0.02);
        let mean = pos.iter().sum::<f64>() / pos.len() as f64;
        let var = pos.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (pos.len() - 1) as f64;
        assert_relative_eq!(var, 4.0, max_relative = 0.08);
        assert_eq!(
            DataLaw::dirac(array![2.0, 3.0])
                .unwrap()
                .sample(3, &mut rng)
                .unwrap(),
            array![[2.0, 3.0], [2.0, 3.0], [2.0, 3.0]]
        );
    }

    #[test]
    fn invalid_laws_and_inputs_are_errors() {
        assert!(matches!(
            DataLaw::dirac(Array1::zeros(0)),
            Err(RefError::EmptyLaw(_))
        ));
        assert!(matches!(
            DataLaw::standard_normal(0),
            Err(RefError::EmptyLaw(_))
        ));
        assert!(matches!(
            DataLaw::finite(Array1::zeros(0), Array2::zeros((0, 2))),
            Err(RefError::EmptyLaw(_))
        ));
        assert!(matches!(
            DataLaw::finite(array![1.0, 2.0], array![[0.0]]),
            Err(RefError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            DataLaw::finite(array![-1.0], array![[0.0]]),
            Err(RefError::InvalidStd { .. })
        ));
        assert!(matches!(
            DataLaw::finite(array![0.0], array![[0.0]]),
            Err(RefError::InvalidParameter { .. })
        ));
        assert!(matches!(
            DataLaw::dirac(array![f64::NAN]),
            Err(RefError::InvalidParameter { .. })
        ));
        assert!(matches!(
            DataLaw::mixture(array![1.0], array![[0.0]], array![-0.1]),
            Err(RefError::InvalidStd { .. })
        ));
        let s = schedule();
        let law = DataLaw::standard_normal(2).unwrap();
        assert!(matches!(
            law.optimal_eps(&s, &Array2::zeros((1, 3)), 1),
            Err(RefError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            law.optimal_eps(&s, &Array2::zeros((1, 2)), 0),
            Err(RefError::TimeOutOfRange { .. })
        ));
        // Public fields can be set by hand; every method re-validates.
        let bad = DataLaw::StandardNormal { dim: 0 };
        assert!(bad.sample(1, &mut StdRng::seed_from_u64(0)).is_err());
    }
}
