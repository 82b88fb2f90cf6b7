//! Synthetic laws whose optimal noise predictor is known exactly (SPEC, "Test oracle"):
//! isotropic Gaussian mixtures in n dimensions, with finite sets as the s_k = 0 case.

use super::{seeded_rng, Dataset, Stream};
use crate::error::{DdpmError, Result};
use rand::distr::weighted::WeightedIndex;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::Tensor;

/// Σ_k w_k N(m_k, s_k² I) in d dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianMixture {
    /// Component weights w_k (normalised when sampling).
    pub weights: Vec<f64>,
    /// Component means m_k, each of length d.
    pub means: Vec<Vec<f64>>,
    /// Component standard deviations s_k ≥ 0 (0 gives a point mass).
    pub stds: Vec<f64>,
}

impl GaussianMixture {
    /// Checks the parameters: at least one component, equal lengths, positive total weight.
    pub fn new(weights: Vec<f64>, means: Vec<Vec<f64>>, stds: Vec<f64>) -> Result<GaussianMixture> {
        let k = weights.len();
        let bad = |reason: String| {
            Err(DdpmError::BadData {
                set: "Gaussian mixture".into(),
                reason,
            })
        };
        if k == 0 || means.len() != k || stds.len() != k {
            return bad(format!(
                "{k} weights, {} means and {} stds",
                means.len(),
                stds.len()
            ));
        }
        let d = means[0].len();
        if d == 0 || means.iter().any(|m| m.len() != d) {
            return bad("every mean needs the same positive dimension".into());
        }
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0))
            || weights.iter().sum::<f64>() <= 0.0
        {
            return bad(format!(
                "weights must be non-negative with a positive sum, got {weights:?}"
            ));
        }
        if stds.iter().any(|s| !(s.is_finite() && *s >= 0.0))
            || means.iter().flatten().any(|m| !m.is_finite())
        {
            return bad("means and standard deviations must be finite, stds non-negative".into());
        }
        Ok(GaussianMixture {
            weights,
            means,
            stds,
        })
    }

    /// The dimension d.
    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    /// `n` independent draws as a data set `[n, d]`, reproducible from `seed`.
    pub fn sample(&self, n: usize, seed: u64) -> Result<Dataset> {
        let mut rng = seeded_rng(seed, Stream::Synthetic, 0);
        let pick = WeightedIndex::new(&self.weights).map_err(|e| DdpmError::BadData {
            set: "Gaussian mixture".into(),
            reason: format!("invalid weights: {e}"),
        })?;
        let d = self.dim();
        let mut values = Vec::with_capacity(n * d);
        for _ in 0..n {
            let k = pick.sample(&mut rng);
            values.extend(self.means[k].iter().map(|m| {
                let z: f64 = rng.sample(StandardNormal);
                (m + self.stds[k] * z) as f32
            }));
        }
        let values = Tensor::from_slice(&values).view([n as i64, d as i64]);
        Dataset::from_values(
            values,
            format!(
                "Gaussian mixture ({} components, d = {d})",
                self.weights.len()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn sample_moments_match_the_law() {
        // Two components in 3-D, weights 1:3, means ±2·1, std 0.5. Mean = 0.25·(−2)+0.75·2 = 1,
        // per-dimension variance = 0.25 + 4 − 1 = 3.25. With n = 40 000 the standard error of
        // the mean is sqrt(3.25/n) ≈ 0.009, so 0.05 is more than 5 standard errors (p < 1e-6).
        let g = GaussianMixture::new(
            vec![1.0, 3.0],
            vec![vec![-2.0; 3], vec![2.0; 3]],
            vec![0.5, 0.5],
        )
        .unwrap();
        let n = 40_000;
        let d = g.sample(n, 11).unwrap();
        assert_eq!(d.item_shape(), vec![3]);
        let all: Vec<i64> = (0..n as i64).collect();
        let x = d.batch(&all).unwrap().to_kind(Kind::Double);
        let mean = Vec::<f64>::try_from(x.mean_dim(0, false, Kind::Double)).unwrap();
        let var = Vec::<f64>::try_from(x.var_dim(0, false, false)).unwrap();
        for j in 0..3 {
            assert!((mean[j] - 1.0).abs() < 0.05, "mean {mean:?}");
            // The sample variance's standard error is sqrt((μ4 − σ⁴)/n) ≤ 3.25·sqrt(2/n) ≈ 0.023
            // (this bimodal law has kurtosis below the Gaussian's 3), so 0.2 is over 8 of them.
            assert!((var[j] - 3.25).abs() < 0.2, "var {var:?}");
        }
        let again = g.sample(n, 11).unwrap().batch(&all).unwrap();
        assert!(again.to_kind(Kind::Double).equal(&x));
    }

    #[test]
    fn rejects_inconsistent_parameters() {
        assert!(GaussianMixture::new(vec![], vec![], vec![]).is_err());
        assert!(GaussianMixture::new(vec![1.0], vec![vec![0.0, 1.0]], vec![-1.0]).is_err());
        assert!(GaussianMixture::new(
            vec![1.0, 1.0],
            vec![vec![0.0], vec![0.0, 1.0]],
            vec![1.0, 1.0]
        )
        .is_err());
        assert!(GaussianMixture::new(vec![0.0], vec![vec![0.0]], vec![1.0]).is_err());
    }
}
