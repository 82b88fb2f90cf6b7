//! Section 6 of docs/derivations.md: the optimal σ_t.

use ddpm_reference::sigma::{sigma, SigmaChoice};
use ddpm_reference::{Schedule, ScheduleKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn schedules() -> Vec<Schedule> {
    let mut rng = StdRng::seed_from_u64(21);
    let mut out = vec![Schedule::new(ScheduleKind::Article, 1000).unwrap()];
    for t_max in [10, 25] {
        let alphas: Vec<f64> = (0..t_max).map(|_| rng.random_range(0.3f64..0.999).sqrt()).collect();
        out.push(Schedule::from_alphas(&alphas).unwrap());
    }
    out
}

#[test]
fn isotropic_sigma_is_monotone_and_bracketed() {
    let grid: Vec<f64> = (0..=60).map(|i| i as f64 * 0.05).collect();
    for schedule in schedules() {
        let t_max = schedule.t_max();
        for t in [1, 2, 3, t_max / 2, t_max].into_iter().filter(|&t| t >= 1 && t <= t_max) {
            let (a, b) = (schedule.alphas()[t], schedule.betas()[t]);
            let dirac = sigma(&schedule, SigmaChoice::Posterior, t).unwrap();
            let normal = sigma(&schedule, SigmaChoice::Beta, t).unwrap();
            let values: Vec<f64> =
                grid.iter().map(|&s| sigma(&schedule, SigmaChoice::Isotropic { data_std: s }, t).unwrap()).collect();
            assert!((values[0] - dirac).abs() <= 1e-12 * normal, "t = {t}: σ(s=0) = {} vs Dirac {dirac}", values[0]);
            assert!((values[20] - normal).abs() <= 1e-12 * normal, "t = {t}: σ(s=1) = {} vs β_t {normal}", values[20]);
            for (w, s) in values.windows(2).zip(&grid[1..]) {
                assert!(w[1] > w[0], "t = {t}: σ not increasing at s = {s}");
            }
            for (&v, &s) in values.iter().zip(&grid) {
                // Limit as s → ∞ is β_t/α_t.
                assert!(v < b / a, "t = {t}, s = {s}: σ = {v} above its limit β_t/α_t");
                if s <= 1.0 {
                    assert!(v >= dirac * (1.0 - 1e-12) && v <= normal * (1.0 + 1e-12), "t = {t}, s = {s}: {v} outside [{dirac}, {normal}]");
                } else {
                    assert!(v > normal, "t = {t}, s = {s}: σ = {v} should exceed β_t = {normal}");
                }
            }
        }
    }
}

/// Data law of the general-σ test: a finite set in [−1, 1] (support, weights).
const SUPPORT: [f64; 4] = [-1.0, -0.3, 0.5, 0.9];
const WEIGHTS: [f64; 4] = [0.1, 0.4, 0.3, 0.2];

/// E_{x_t} Var(x_{t−1}|x_t) by brute-force Bayes on a 2-D grid over (x_{t−1}, x_t): the joint
/// density p(x_{t−1}) p(x_t|x_{t−1}) is tabulated, and the conditional moments of x_{t−1} are
/// ratios of its column integrals. Uses neither the posterior formula nor any σ formula.
fn mean_conditional_variance_by_grid(schedule: &Schedule, t: usize) -> f64 {
    use ddpm_proofs::gauss::density_1d;
    use ddpm_proofs::quad::trapezoid;
    use ndarray::Array2;
    let (a, b) = (schedule.alphas()[t], schedule.betas()[t]);
    let (ab_prev, bb_prev) = (schedule.alpha_bars()[t - 1], schedule.beta_bars()[t - 1]);
    // Trapezoid error on a Gaussian of width w at spacing w/12 is of order exp(−2π²·144).
    let h = bb_prev.min(b / a) / 12.0;
    let span = |lo: f64, hi: f64| trapezoid(lo, hi, ((hi - lo) / h) as usize + 2);
    let prev = span(-ab_prev - 10.0 * bb_prev, ab_prev + 10.0 * bb_prev);
    let next = span(-a * (ab_prev + 10.0 * bb_prev) - 10.0 * b, a * (ab_prev + 10.0 * bb_prev) + 10.0 * b);
    let p_prev = prev.nodes.mapv(|x| {
        SUPPORT.iter().zip(WEIGHTS).map(|(&c, w)| w * density_1d(x, ab_prev * c, bb_prev * bb_prev)).sum::<f64>()
    });
    let joint = Array2::from_shape_fn((prev.nodes.len(), next.nodes.len()), |(i, j)| {
        prev.weights[i] * p_prev[i] * density_1d(next.nodes[j], a * prev.nodes[i], b * b)
    });
    let m0 = joint.sum_axis(ndarray::Axis(0));
    let m1 = prev.nodes.dot(&joint);
    let m2 = prev.nodes.mapv(|x| x * x).dot(&joint);
    let cond_var_times_density = &m2 - &(&m1 * &m1 / &m0);
    next.integrate(&cond_var_times_density)
}

/// σ_t minimising the exact expected cross-entropy E[−ln q(x_{t−1}|x_t)] with the optimal mean,
/// found by golden-section search on ln σ. The expectation over x_t is a 1-D quadrature per
/// support point, and for given (x_0, x_t) the cross-entropy of the Gaussian posterior against
/// N(μ*(x_t), σ²) is exact; μ*(x_t) = E[x_{t−1}|x_t] averages μ̃(x_t, c_k) with the weights of
/// Bayes' rule over the support.
fn sigma_by_golden_section(schedule: &Schedule, t: usize) -> f64 {
    use ddpm_proofs::gauss::{cross_entropy_1d, density_1d};
    use ddpm_proofs::optimize::golden_section_min;
    use ddpm_proofs::quad::standard_normal_rule;
    use ddpm_reference::posterior;
    use ndarray::array;
    let (ab, bb) = (schedule.alpha_bars()[t], schedule.beta_bars()[t]);
    let post_sd = posterior::std(schedule, t).unwrap();
    let post_mean = |c: f64, x: f64| posterior::mean(schedule, &array![[c]], &array![[x]], t).unwrap()[[0, 0]];
    let rule = standard_normal_rule(10.0, 0.02);
    // (weight, posterior mean, optimal mean) at every quadrature point of every support point.
    let mut points = Vec::new();
    for (&c, w) in SUPPORT.iter().zip(WEIGHTS) {
        for (&e, &q) in rule.nodes.iter().zip(&rule.weights) {
            let x = ab * c + bb * e;
            let lik: Vec<f64> = SUPPORT.iter().zip(WEIGHTS).map(|(&cj, wj)| wj * density_1d(x, ab * cj, bb * bb)).collect();
            let z: f64 = lik.iter().sum();
            let mu_star: f64 = SUPPORT.iter().zip(&lik).map(|(&cj, l)| l / z * post_mean(cj, x)).sum();
            points.push((w * q, post_mean(c, x), mu_star));
        }
    }
    let objective = |log_sigma: f64| {
        let var = (2.0 * log_sigma).exp();
        points.iter().map(|&(w, m1, m2)| w * cross_entropy_1d(m1, post_sd * post_sd, m2, var)).sum::<f64>()
    };
    golden_section_min(objective, (1e-4f64).ln(), 10f64.ln(), 1e-10).0.exp()
}

#[test]
fn general_sigma_is_mean_conditional_variance_for_finite_set_data() {
    let mean: f64 = SUPPORT.iter().zip(WEIGHTS).map(|(c, w)| c * w).sum();
    let data_var: f64 = SUPPORT.iter().zip(WEIGHTS).map(|(c, w)| w * (c - mean).powi(2)).sum();
    let mut rng = StdRng::seed_from_u64(34);
    let random: Vec<f64> = (0..10).map(|_| rng.random_range(0.5f64..0.95).sqrt()).collect();
    let cases = [
        (Schedule::from_alphas(&random).unwrap(), vec![2, 3, 6, 10]),
        (Schedule::new(ScheduleKind::Article, 1000).unwrap(), vec![50, 400]),
    ];
    for (schedule, ts) in cases {
        for t in ts {
            let by_optimisation = sigma_by_golden_section(&schedule, t);
            let by_bayes = mean_conditional_variance_by_grid(&schedule, t).sqrt();
            // Both quadratures are exact to ~1e-10; the golden-section bracket is 1e-10 in ln σ.
            assert!((by_optimisation / by_bayes - 1.0).abs() < 1e-6, "t = {t}: argmin {by_optimisation} vs E Var {by_bayes}");
            let lower = sigma(&schedule, SigmaChoice::Posterior, t).unwrap();
            let upper = sigma(&schedule, SigmaChoice::Beta, t).unwrap();
            let gaussian = sigma(&schedule, SigmaChoice::Isotropic { data_std: data_var.sqrt() }, t).unwrap();
            assert!(lower < by_optimisation, "t = {t}: {by_optimisation} below the Dirac value {lower}");
            assert!(by_optimisation < gaussian, "t = {t}: {by_optimisation} above the Gaussian bound {gaussian}");
            assert!(gaussian < upper, "t = {t}: the Gaussian bound {gaussian} above β_t {upper}");
        }
    }
}
