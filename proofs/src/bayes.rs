use crate::gauss::density_1d;
use crate::quad::trapezoid;

/// Mean and variance of x given y, for the 1-D model x ~ N(prior_mean, prior_sd²),
/// y = scale·x + noise_sd·ε, by integrating the unnormalised posterior
/// N(y; scale·x, noise_sd²) N(x; prior_mean, prior_sd²) on a grid — Bayes' rule, numerically.
///
/// The grid spans 14 widths of the wider factor around both peaks at a spacing of 1/40 of
/// the narrower one, which makes the trapezoid rule exact to about 1e-12.
pub fn gaussian_posterior_by_quadrature(
    prior_mean: f64,
    prior_sd: f64,
    scale: f64,
    noise_sd: f64,
    y: f64,
) -> (f64, f64) {
    let (c1, w1, c2, w2) = (y / scale, noise_sd / scale, prior_mean, prior_sd);
    let (lo, hi) = (
        c1.min(c2) - 14.0 * w1.max(w2),
        c1.max(c2) + 14.0 * w1.max(w2),
    );
    let h = w1.min(w2) / 40.0;
    let rule = trapezoid(lo, hi, ((hi - lo) / h) as usize + 2);
    let dens = rule.nodes.mapv(|x| {
        density_1d(y, scale * x, noise_sd * noise_sd)
            * density_1d(x, prior_mean, prior_sd * prior_sd)
    });
    let z = rule.integrate(&dens);
    let mean = rule.integrate(&(&dens * &rule.nodes)) / z;
    let var = rule.integrate(&(&dens * &rule.nodes.mapv(|x| (x - mean).powi(2)))) / z;
    (mean, var)
}
