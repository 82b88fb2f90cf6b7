//! The Fréchet distance between Gaussian fits of two feature sets:
//! FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}), in f64.

use crate::error::{DdpmError, Result};
use tch::{Kind, Tensor};

/// A Gaussian fit N(μ, Σ) of features: sample mean and unbiased covariance, f64 on the CPU.
#[derive(Debug)]
pub struct GaussianFit {
    /// μ, [k].
    pub mean: Tensor,
    /// Σ, [k, k].
    pub cov: Tensor,
}

/// Fits μ and Σ = Σ_i (f_i − μ)(f_i − μ)ᵀ/(N − 1) to features [N, k], N ≥ 2.
pub fn fit(features: &Tensor) -> Result<GaussianFit> {
    let size = features.size();
    if size.len() != 2 || size[0] < 2 {
        return Err(DdpmError::ShapeMismatch {
            what: "features of a Gaussian fit",
            expected: "[N ≥ 2, k]".into(),
            got: size,
        });
    }
    let f = features
        .f_to_kind(Kind::Double)?
        .f_to_device(tch::Device::Cpu)?;
    let mean = f.f_mean_dim(0, false, Kind::Double)?;
    let centred = f.f_sub(&mean)?;
    let cov = centred.f_tr()?.f_matmul(&centred)? / (size[0] - 1) as f64;
    Ok(GaussianFit { mean, cov })
}

/// tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2} = Σ_i sqrt(λ_i), λ the eigenvalues of the symmetric PSD
/// matrix Σ_a^{1/2} Σ_b Σ_a^{1/2} (negative rounding noise clamped to 0).
fn trace_sqrt_product(a: &Tensor, b: &Tensor) -> Result<f64> {
    let root_a = sqrt_psd(a)?;
    let m = root_a.f_matmul(b)?.f_matmul(&root_a)?;
    let sym = (&m + m.f_tr()?) * 0.5;
    let eig = sym.f_linalg_eigvalsh("L")?;
    Ok(f64::try_from(eig.clamp_min(0.0).sqrt().sum(Kind::Double))?)
}

/// The symmetric square root V diag(sqrt λ) Vᵀ of a symmetric PSD matrix (λ clamped at 0).
fn sqrt_psd(m: &Tensor) -> Result<Tensor> {
    let sym = (m + m.f_tr()?) * 0.5;
    let (values, vectors) = sym.f_linalg_eigh("L")?;
    let scaled = &vectors * values.clamp_min(0.0).sqrt().unsqueeze(0);
    Ok(scaled.f_matmul(&vectors.f_tr()?)?)
}

/// The Fréchet (2-Wasserstein²) distance between N(μ_a, Σ_a) and N(μ_b, Σ_b).
pub fn frechet_distance(a: &GaussianFit, b: &GaussianFit) -> Result<f64> {
    if a.mean.size() != b.mean.size() {
        return Err(DdpmError::ShapeMismatch {
            what: "the second feature set's mean",
            expected: format!("the first set's width, {:?}", a.mean.size()),
            got: b.mean.size(),
        });
    }
    let mean_term = f64::try_from((&a.mean - &b.mean).square().sum(Kind::Double))?;
    let traces = f64::try_from(a.cov.trace() + b.cov.trace())?;
    Ok(mean_term + traces - 2.0 * trace_sqrt_product(&a.cov, &b.cov)?)
}

/// The Fréchet distance between the Gaussian fits of features [N_a, k] and [N_b, k].
pub fn frechet_between(a: &Tensor, b: &Tensor) -> Result<f64> {
    frechet_distance(&fit(a)?, &fit(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn gaussian(mean: &[f64], cov: Tensor) -> GaussianFit {
        GaussianFit {
            mean: Tensor::from_slice(mean),
            cov,
        }
    }

    /// A random symmetric positive-definite k×k matrix, seeded.
    fn spd(k: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let a = Tensor::randn([k, k], (Kind::Double, Device::Cpu));
        a.matmul(&a.tr()) + Tensor::eye(k, (Kind::Double, Device::Cpu)) * 0.1
    }

    #[test]
    fn diagonal_covariances_match_the_closed_form() {
        // Commuting (diagonal) covariances: FD = ‖Δμ‖² + Σ_i (sqrt a_i − sqrt b_i)².
        let a: [f64; 4] = [4.0, 1.0, 0.25, 9.0];
        let b: [f64; 4] = [1.0, 1.0, 1.0, 0.0];
        let ga = gaussian(&[0.0, 1.0, 2.0, 3.0], Tensor::from_slice(&a).diag(0));
        let gb = gaussian(&[1.0, 1.0, 0.0, 3.0], Tensor::from_slice(&b).diag(0));
        let expected = 1.0
            + 4.0
            + a.iter()
                .zip(&b)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let got = frechet_distance(&ga, &gb).unwrap();
        assert!((got - expected).abs() < 1e-10, "{got} vs {expected}");
        let back = frechet_distance(&gb, &ga).unwrap();
        assert!((back - expected).abs() < 1e-10, "FD is symmetric: {back}");
    }

    #[test]
    fn scaled_full_covariance_matches_the_closed_form() {
        // Σ_b = c² Σ_a (a full, non-diagonal matrix): the trace term is (1 − c)² tr Σ_a.
        let _rng = crate::sampler::rng_lock();
        let sa = spd(6, 3);
        let tr = f64::try_from(sa.trace()).unwrap();
        let zero = [0.0; 6];
        let ga = gaussian(&zero, sa.shallow_clone());
        let gb = gaussian(&zero, &sa * 9.0);
        let got = frechet_distance(&ga, &gb).unwrap();
        assert!((got - 4.0 * tr).abs() < 1e-8 * tr, "{got} vs {}", 4.0 * tr);
        assert!(frechet_distance(&ga, &ga).unwrap().abs() < 1e-8 * tr);
    }

    #[test]
    fn rotating_both_sets_leaves_it_unchanged() {
        // For non-commuting Σ_a, Σ_b the value must not depend on the basis.
        let _rng = crate::sampler::rng_lock();
        let (sa, sb) = (spd(5, 4), spd(5, 5));
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([5, 5], (Kind::Double, Device::Cpu)),
            "reduced",
        );
        let rot = |s: &Tensor| q.matmul(s).matmul(&q.tr());
        let ma = [0.5, 0.0, -1.0, 2.0, 0.0];
        let mb = [0.0, 1.0, 0.0, 0.0, 3.0];
        let plain = frechet_distance(
            &gaussian(&ma, sa.shallow_clone()),
            &gaussian(&mb, sb.shallow_clone()),
        )
        .unwrap();
        let rot_mean = |m: &[f64]| Vec::<f64>::try_from(q.matmul(&Tensor::from_slice(m))).unwrap();
        let rotated = frechet_distance(
            &gaussian(&rot_mean(&ma), rot(&sa)),
            &gaussian(&rot_mean(&mb), rot(&sb)),
        )
        .unwrap();
        assert!(plain > 0.0);
        assert!(
            (plain - rotated).abs() < 1e-8 * plain,
            "{plain} vs {rotated}"
        );
    }

    #[test]
    fn fit_uses_the_unbiased_covariance() {
        let f = Tensor::from_slice(&[0.0f32, 0.0, 2.0, 0.0, 0.0, 2.0, 2.0, 2.0]).view([4, 2]);
        let g = fit(&f).unwrap();
        // Each coordinate is {0, 2, 0, 2}: mean 1, Σ (x − 1)² = 4 over N − 1 = 3; uncorrelated.
        let expected = Tensor::from_slice(&[4.0 / 3.0, 0.0, 0.0, 4.0 / 3.0]).view([2, 2]);
        assert!(f64::try_from((&g.cov - expected).abs().max()).unwrap() < 1e-12);
        assert_eq!(Vec::<f64>::try_from(&g.mean).unwrap(), vec![1.0, 1.0]);
        assert!(matches!(
            fit(&Tensor::zeros([1, 3], (Kind::Float, Device::Cpu))),
            Err(DdpmError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            frechet_between(&f, &Tensor::zeros([4, 3], (Kind::Float, Device::Cpu))),
            Err(DdpmError::ShapeMismatch { .. })
        ));
    }
}
