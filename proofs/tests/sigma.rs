//! Section 6 of docs/derivations.md: the optimal σ_t.

use ddpm_proofs::gauss::{cross_entropy_1d, density_1d};
use ddpm_proofs::optimize::golden_section_min;
use ddpm_proofs::quad::{standard_normal_rule, trapezoid, Rule};
use ddpm_reference::oracle::DataLaw;
use ddpm_reference::sigma::{sigma, SigmaChoice};
use ddpm_reference::{posterior, sampler, Schedule, ScheduleKind};
use ndarray::{array, Array2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn schedules() -> Vec<Schedule> {
    let mut rng = StdRng::seed_from_u64(21);
    let mut out = vec![Schedule::new(ScheduleKind::Article, 1000).unwrap()];
    for t_max in [10, 25] {
        let alphas: Vec<f64> = (0..t_max)
            .map(|_| rng.random_range(0.3f64..0.999).sqrt())
            .collect();
        out.push(Schedule::from_alphas(&alphas).unwrap());
    }
    out
}

#[test]
fn isotropic_sigma_is_monotone_and_bracketed() {
    let grid: Vec<f64> = (0..=60).map(|i| i as f64 * 0.05).collect();
    for schedule in schedules() {
        let t_max = schedule.t_max();
        for t in [1, 2, 3, t_max / 2, t_max]
            .into_iter()
            .filter(|&t| t >= 1 && t <= t_max)
        {
            let (a, b) = (schedule.alphas()[t], schedule.betas()[t]);
            let dirac = sigma(&schedule, SigmaChoice::Posterior, t).unwrap();
            let normal = sigma(&schedule, SigmaChoice::Beta, t).unwrap();
            let values: Vec<f64> = grid
                .iter()
                .map(|&s| sigma(&schedule, SigmaChoice::Isotropic { data_std: s }, t).unwrap())
                .collect();
            assert!(
                (values[0] - dirac).abs() <= 1e-12 * normal,
                "t = {t}: σ(s=0) = {} vs Dirac {dirac}",
                values[0]
            );
            assert!(
                (values[20] - normal).abs() <= 1e-12 * normal,
                "t = {t}: σ(s=1) = {} vs β_t {normal}",
                values[20]
            );
            for (w, s) in values.windows(2).zip(&grid[1..]) {
                assert!(w[1] > w[0], "t = {t}: σ not increasing at s = {s}");
            }
            for (&v, &s) in values.iter().zip(&grid) {
                // Limit as s → ∞ is β_t/α_t.
                assert!(
                    v < b / a,
                    "t = {t}, s = {s}: σ = {v} above its limit β_t/α_t"
                );
                if s <= 1.0 {
                    assert!(
                        v >= dirac * (1.0 - 1e-12) && v <= normal * (1.0 + 1e-12),
                        "t = {t}, s = {s}: {v} outside [{dirac}, {normal}]"
                    );
                } else {
                    assert!(
                        v > normal,
                        "t = {t}, s = {s}: σ = {v} should exceed β_t = {normal}"
                    );
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
    let (a, b) = (schedule.alphas()[t], schedule.betas()[t]);
    let (ab_prev, bb_prev) = (schedule.alpha_bars()[t - 1], schedule.beta_bars()[t - 1]);
    // Trapezoid error on a Gaussian of width w at spacing w/12 is of order exp(−2π²·144).
    let h = bb_prev.min(b / a) / 12.0;
    let span = |lo: f64, hi: f64| trapezoid(lo, hi, ((hi - lo) / h) as usize + 2);
    let prev = span(-ab_prev - 10.0 * bb_prev, ab_prev + 10.0 * bb_prev);
    let next = span(
        -a * (ab_prev + 10.0 * bb_prev) - 10.0 * b,
        a * (ab_prev + 10.0 * bb_prev) + 10.0 * b,
    );
    let p_prev = prev.nodes.mapv(|x| {
        SUPPORT
            .iter()
            .zip(WEIGHTS)
            .map(|(&c, w)| w * density_1d(x, ab_prev * c, bb_prev * bb_prev))
            .sum::<f64>()
    });
    let joint = Array2::from_shape_fn((prev.nodes.len(), next.nodes.len()), |(i, j)| {
        prev.weights[i] * p_prev[i] * density_1d(next.nodes[j], a * prev.nodes[i], b * b)
    });
    let m0 = joint.sum_axis(Axis(0));
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
    let (ab, bb) = (schedule.alpha_bars()[t], schedule.beta_bars()[t]);
    let post_sd = posterior::std(schedule, t).unwrap();
    let post_mean =
        |c: f64, x: f64| posterior::mean(schedule, &array![[c]], &array![[x]], t).unwrap()[[0, 0]];
    let rule = standard_normal_rule(10.0, 0.02);
    // (weight, posterior mean, optimal mean) at every quadrature point of every support point.
    let mut points = Vec::new();
    for (&c, w) in SUPPORT.iter().zip(WEIGHTS) {
        for (&e, &q) in rule.nodes.iter().zip(&rule.weights) {
            let x = ab * c + bb * e;
            let lik: Vec<f64> = SUPPORT
                .iter()
                .zip(WEIGHTS)
                .map(|(&cj, wj)| wj * density_1d(x, ab * cj, bb * bb))
                .collect();
            let z: f64 = lik.iter().sum();
            let mu_star: f64 = SUPPORT
                .iter()
                .zip(&lik)
                .map(|(&cj, l)| l / z * post_mean(cj, x))
                .sum();
            points.push((w * q, post_mean(c, x), mu_star));
        }
    }
    let objective = |log_sigma: f64| {
        let var = (2.0 * log_sigma).exp();
        points
            .iter()
            .map(|&(w, m1, m2)| w * cross_entropy_1d(m1, post_sd * post_sd, m2, var))
            .sum::<f64>()
    };
    golden_section_min(objective, (1e-4f64).ln(), 10f64.ln(), 1e-10)
        .0
        .exp()
}

#[test]
fn general_sigma_is_mean_conditional_variance_for_finite_set_data() {
    let mean: f64 = SUPPORT.iter().zip(WEIGHTS).map(|(c, w)| c * w).sum();
    let data_var: f64 = SUPPORT
        .iter()
        .zip(WEIGHTS)
        .map(|(c, w)| w * (c - mean).powi(2))
        .sum();
    let mut rng = StdRng::seed_from_u64(34);
    let random: Vec<f64> = (0..10)
        .map(|_| rng.random_range(0.5f64..0.95).sqrt())
        .collect();
    let cases = [
        (Schedule::from_alphas(&random).unwrap(), vec![2, 3, 6, 10]),
        (
            Schedule::new(ScheduleKind::Article, 1000).unwrap(),
            vec![50, 400],
        ),
    ];
    for (schedule, ts) in cases {
        for t in ts {
            let by_optimisation = sigma_by_golden_section(&schedule, t);
            let by_bayes = mean_conditional_variance_by_grid(&schedule, t).sqrt();
            // Both quadratures are exact to ~1e-10; the golden-section bracket is 1e-10 in ln σ.
            assert!(
                (by_optimisation / by_bayes - 1.0).abs() < 1e-6,
                "t = {t}: argmin {by_optimisation} vs E Var {by_bayes}"
            );
            let lower = sigma(&schedule, SigmaChoice::Posterior, t).unwrap();
            let upper = sigma(&schedule, SigmaChoice::Beta, t).unwrap();
            let gaussian = sigma(
                &schedule,
                SigmaChoice::Isotropic {
                    data_std: data_var.sqrt(),
                },
                t,
            )
            .unwrap();
            assert!(
                lower < by_optimisation,
                "t = {t}: {by_optimisation} below the Dirac value {lower}"
            );
            assert!(
                by_optimisation < gaussian,
                "t = {t}: {by_optimisation} above the Gaussian bound {gaussian}"
            );
            assert!(
                gaussian < upper,
                "t = {t}: the Gaussian bound {gaussian} above β_t {upper}"
            );
        }
    }
}

/// σ minimising E_{x_0, x_t} KL(p(x_{t−1}|x_t, x_0) ‖ N(μ*(x_t), σ²)) for data N(m, s²) in
/// 1-D (s = 0: Dirac at m), by golden-section search on ln σ. μ* is the generator's mean with
/// the oracle noise predictor (the reference's ancestral step with z = 0); the expectation is
/// a tensor trapezoid rule over x_0 = m + s u, x_t = ᾱ_t x_0 + β̄_t e, which is exact to
/// rounding because the integrand is a quadratic in (u, e) times their Gaussian density.
fn sigma_by_golden_section_gaussian(schedule: &Schedule, t: usize, m: f64, s: f64) -> f64 {
    let law = if s == 0.0 {
        DataLaw::dirac(array![m]).unwrap()
    } else {
        DataLaw::mixture(array![1.0], array![[m]], array![s]).unwrap()
    };
    let rule = standard_normal_rule(10.0, 0.1);
    let u_rule = if s == 0.0 {
        Rule {
            nodes: array![0.0],
            weights: array![1.0],
        }
    } else {
        rule.clone()
    };
    let n = u_rule.nodes.len() * rule.nodes.len();
    let (ab, bb) = (schedule.alpha_bars()[t], schedule.beta_bars()[t]);
    let x0 = Array2::from_shape_fn((n, 1), |(i, _)| m + s * u_rule.nodes[i / rule.nodes.len()]);
    let xt = Array2::from_shape_fn((n, 1), |(i, _)| {
        ab * x0[[i, 0]] + bb * rule.nodes[i % rule.nodes.len()]
    });
    let weights: Vec<f64> = (0..n)
        .map(|i| u_rule.weights[i / rule.nodes.len()] * rule.weights[i % rule.nodes.len()])
        .collect();
    let post_mean = posterior::mean(schedule, &x0, &xt, t).unwrap();
    let post_var = posterior::std(schedule, t).unwrap().powi(2);
    let eps_star = law.optimal_eps(schedule, &xt, t).unwrap();
    let mu_star =
        sampler::ancestral_step(schedule, &xt, t, &eps_star, 0.0, &Array2::zeros((n, 1))).unwrap();
    let objective = |log_sigma: f64| {
        let var = (2.0 * log_sigma).exp();
        (0..n)
            .map(|i| {
                weights[i] * cross_entropy_1d(post_mean[[i, 0]], post_var, mu_star[[i, 0]], var)
            })
            .sum::<f64>()
    };
    golden_section_min(objective, (1e-5f64).ln(), 10f64.ln(), 1e-11)
        .0
        .exp()
}

/// The article's schedule, Ho's linear one and a random one, with a spread of t ≥ 2.
fn golden_section_cases() -> Vec<(Schedule, Vec<usize>)> {
    let mut rng = StdRng::seed_from_u64(37);
    let random: Vec<f64> = (0..15)
        .map(|_| rng.random_range(0.3f64..0.999).sqrt())
        .collect();
    vec![
        (
            Schedule::new(ScheduleKind::Article, 1000).unwrap(),
            vec![2, 3, 10, 100, 500, 1000],
        ),
        (
            Schedule::new(ScheduleKind::Linear, 1000).unwrap(),
            vec![2, 250, 1000],
        ),
        (Schedule::from_alphas(&random).unwrap(), (2..=15).collect()),
    ]
}

fn assert_golden_section_lands_on(choice: SigmaChoice, m: f64, s: f64) {
    for (schedule, ts) in golden_section_cases() {
        for t in ts {
            let found = sigma_by_golden_section_gaussian(&schedule, t, m, s);
            let formula = sigma(&schedule, choice, t).unwrap();
            // The search stops at a bracket of 1e-11 in ln σ; the objective is exact to rounding.
            assert!(
                (found / formula - 1.0).abs() < 1e-6,
                "T = {}, t = {t}, {choice:?}: argmin {found} vs {formula}",
                schedule.t_max()
            );
        }
    }
}

#[test]
fn golden_section_finds_dirac_sigma() {
    assert_golden_section_lands_on(SigmaChoice::Posterior, 0.7, 0.0);
}

#[test]
fn golden_section_finds_standard_normal_sigma() {
    assert_golden_section_lands_on(SigmaChoice::Beta, 0.0, 1.0);
}

#[test]
fn golden_section_finds_isotropic_sigma() {
    for (m, s) in [(0.3, 0.5), (-1.0, 0.1), (0.0, 2.0)] {
        assert_golden_section_lands_on(SigmaChoice::Isotropic { data_std: s }, m, s);
    }
}
