use ndarray::{Array1, Array2, Axis};
use std::f64::consts::TAU;

/// ln N(x; m, v I) for each row of `x` (m of the same shape), v > 0 the variance.
pub fn log_density(x: &Array2<f64>, m: &Array2<f64>, var: f64) -> Array1<f64> {
    let d = x.ncols() as f64;
    (x - m)
        .mapv(|r| r * r)
        .sum_axis(Axis(1))
        .mapv(|sq| -0.5 * (sq / var + d * (TAU * var).ln()))
}

/// The 1-D density N(x; m, v).
pub fn density_1d(x: f64, m: f64, var: f64) -> f64 {
    (-(x - m).powi(2) / (2.0 * var)).exp() / (TAU * var).sqrt()
}

/// −E_{x ~ N(m1, v1)} ln N(x; m2, v2) = ½ ln(2π v2) + (v1 + (m1 − m2)²)/(2 v2), in 1-D.
pub fn cross_entropy_1d(m1: f64, v1: f64, m2: f64, v2: f64) -> f64 {
    0.5 * (TAU * v2).ln() + (v1 + (m1 - m2).powi(2)) / (2.0 * v2)
}
