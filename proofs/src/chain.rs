use ddpm_reference::Schedule;
use ndarray::Array2;
use ndarray_rand::RandomExt;
use rand::Rng;
use rand_distr::StandardNormal;

/// One encoder step x_t = α_t x_{t−1} + β_t ε_t with fresh ε_t; returns (x_t, ε_t).
pub fn forward_step<R: Rng + ?Sized>(
    schedule: &Schedule,
    x_prev: &Array2<f64>,
    t: usize,
    rng: &mut R,
) -> (Array2<f64>, Array2<f64>) {
    let eps = Array2::random_using(x_prev.raw_dim(), StandardNormal, rng);
    let alpha = schedule.alphas()[t];
    let beta = schedule.betas()[t];
    (x_prev * alpha + &eps * beta, eps)
}

/// Runs the encoder from x_0 one step at a time and returns x_t for each t in `record`
/// (ascending), never using the closed-form marginal.
pub fn simulate<R: Rng + ?Sized>(
    schedule: &Schedule,
    x0: &Array2<f64>,
    record: &[usize],
    rng: &mut R,
) -> Vec<Array2<f64>> {
    let last = record.iter().copied().max().unwrap_or(0);
    let mut x = x0.clone();
    let mut out = Vec::with_capacity(record.len());
    for t in 0..=last {
        if t > 0 {
            x = forward_step(schedule, &x, t, rng).0;
        }
        if record.contains(&t) {
            out.push(x.clone());
        }
    }
    out
}
