use ndarray::ArrayView1;

/// A Monte Carlo estimate: the sample mean and its standard error sd/sqrt(n).
#[derive(Debug, Clone, Copy)]
pub struct Estimate {
    /// Sample mean.
    pub mean: f64,
    /// Standard error of the mean.
    pub se: f64,
}

/// Mean and standard error of the mean (sample variance with denominator n − 1) of `n ≥ 2` samples.
pub fn estimate(samples: ArrayView1<f64>) -> Estimate {
    let n = samples.len() as f64;
    let mean = samples.sum() / n;
    let var = samples.mapv(|x| (x - mean).powi(2)).sum() / (n - 1.0);
    Estimate {
        mean,
        se: (var / n).sqrt(),
    }
}

/// One-sample Kolmogorov–Smirnov statistic D = sup |F_n − F| of `samples` against `cdf`.
pub fn ks_statistic(samples: ArrayView1<f64>, cdf: impl Fn(f64) -> f64) -> f64 {
    let mut xs = samples.to_vec();
    xs.sort_by(f64::total_cmp);
    let n = xs.len() as f64;
    xs.iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = cdf(x);
            (f - i as f64 / n).max((i + 1) as f64 / n - f)
        })
        .fold(0.0, f64::max)
}

/// Critical value of D at significance `alpha` for `n` samples, from the asymptotic
/// Kolmogorov distribution: c(α)/sqrt(n), c(α) = sqrt(−ln(α/2)/2) (accurate for n ≳ 100).
pub fn ks_critical(alpha: f64, n: usize) -> f64 {
    (-(alpha / 2.0).ln() / 2.0).sqrt() / (n as f64).sqrt()
}

/// p-value of the KS statistic `d` on `n` points: the Kolmogorov tail
/// Q(λ) = 2 Σ_k (−1)^{k−1} e^{−2k²λ²} at λ = (sqrt(n) + 0.12 + 0.11/sqrt(n))·d, Stephens'
/// finite-n correction (accurate to a few percent of p for n ≥ 5, Numerical Recipes §14.3).
pub fn ks_pvalue(d: f64, n: usize) -> f64 {
    let rn = (n as f64).sqrt();
    let lambda = (rn + 0.12 + 0.11 / rn) * d;
    if lambda < 0.2 {
        return 1.0;
    }
    let q: f64 = (1..=100)
        .map(|k| {
            let k = k as f64;
            let sign = if k as i64 % 2 == 1 { 1.0 } else { -1.0 };
            sign * (-2.0 * k * k * lambda * lambda).exp()
        })
        .sum();
    (2.0 * q).clamp(0.0, 1.0)
}
