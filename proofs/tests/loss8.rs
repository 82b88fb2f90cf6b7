//! Section 5 of docs/derivations.md: the change of variables from loss (7) to loss (8), the
//! θ-independent constant d·β_t² β̄_{t−1}²/(σ_t² β̄_t²) between them, and why (8) has lower variance.

use ddpm_proofs::stats::{estimate, Estimate};
use ddpm_reference::loss::{
    loss7_minus_loss8, loss7_monte_carlo, loss7_with_noise, loss_weight, weighted_loss,
};
use ddpm_reference::marginal::standard_normal;
use ddpm_reference::sigma::{sigma, SigmaChoice};
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{s, Array1, Array2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type Predictor = fn(&Array2<f64>, usize) -> Array2<f64>;

/// Arbitrary predictors ε̂(x_t, t): none of them is optimal, and they differ in smoothness,
/// scale and dependence on t.
fn predictors() -> Vec<(&'static str, Predictor)> {
    vec![
        ("zero", |x, _| Array2::zeros(x.raw_dim())),
        ("sine", |x, _| x.mapv(|v| 0.7 * v.sin() + 0.2)),
        ("linear in t", |x, t| x * (0.5 + 0.001 * t as f64) - 0.1),
        ("cubic, coupled dims", |x, _| {
            let row_sum = x.sum_axis(ndarray::Axis(1)).insert_axis(ndarray::Axis(1));
            x.mapv(|v| v * v * v * 0.1) + &row_sum * 0.3
        }),
    ]
}

/// Monte Carlo estimate of a batch-mean loss from `k` independent batches (the batch means are
/// i.i.d., so their spread gives the standard error without per-row access).
fn batched(k: usize, mut batch: impl FnMut() -> f64) -> Estimate {
    let means = Array1::from_iter((0..k).map(|_| batch()));
    estimate(means.view())
}

#[test]
fn loss7_minus_loss8_is_the_constant() {
    let mut rng = StdRng::seed_from_u64(41);
    let random: Vec<f64> = (0..60)
        .map(|_| rng.random_range(0.6f64..0.999).sqrt())
        .collect();
    let cases = [
        (
            Schedule::new(ScheduleKind::Article, 1000).unwrap(),
            vec![1, 2, 137, 900],
            3,
        ),
        (
            Schedule::from_alphas(&random).unwrap(),
            vec![1, 5, 31, 60],
            1,
        ),
        (
            Schedule::new(ScheduleKind::Linear, 200).unwrap(),
            vec![3, 100],
            8,
        ),
    ];
    let (k, n) = (40, 1000);
    for (schedule, ts, d) in cases {
        for t in ts {
            for (name, predictor) in predictors() {
                // σ_t arbitrary: between half and twice β_t.
                let sig = schedule.betas()[t] * rng.random_range(0.5..2.0);
                let (mean, sd) = (rng.random_range(-0.5..0.5), rng.random_range(0.1..1.0));
                // (7) and (8) from independent samples, each by its own sampling scheme.
                let l7 = batched(k, || {
                    let x0 = standard_normal(n, d, &mut rng) * sd + mean;
                    loss7_monte_carlo(&schedule, &x0, t, sig, predictor, &mut rng).unwrap()
                });
                let l8 = batched(k, || {
                    let x0 = standard_normal(n, d, &mut rng) * sd + mean;
                    let eps = standard_normal(n, d, &mut rng);
                    weighted_loss(&schedule, &x0, &eps, t, sig, predictor).unwrap()
                });
                let constant = loss7_minus_loss8(&schedule, t, sig, d).unwrap();
                let se = l7.se.hypot(l8.se);
                let diff = l7.mean - l8.mean;
                assert!(
                    (diff - constant).abs() < 4.0 * se,
                    "T = {}, t = {t}, d = {d}, {name}: (7) − (8) = {diff} vs constant {constant} (se {se})",
                    schedule.t_max()
                );
            }
        }
    }
}

#[test]
fn loss8_is_loss7_averaged_over_the_rotated_noise() {
    // For fixed (x_0, ε), draw ω and rebuild (ε̄_{t−1}, ε_t) by the inverse rotation
    // ε̄_{t−1} = c ε + s ω, ε_t = s ε − c ω (c = α_t β̄_{t−1}/β̄_t, s = β_t/β̄_t): then x_t is the
    // same as in (8), and the average of (7) over ω must be (8) plus the constant.
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(43);
    let (m, d, k) = (5, 4, 4000);
    for t in [2, 50, 700] {
        let (a, b, bb, bb_prev) = (
            schedule.alphas()[t],
            schedule.betas()[t],
            schedule.beta_bars()[t],
            schedule.beta_bars()[t - 1],
        );
        let (c, s) = (a * bb_prev / bb, b / bb);
        let sig = sigma(&schedule, SigmaChoice::Beta, t).unwrap();
        for (name, predictor) in predictors() {
            let x0 = standard_normal(m, d, &mut rng) * 0.5;
            let eps = standard_normal(m, d, &mut rng);
            // Each draw repeats the m rows with fresh ω, so the batch mean averages over ω only.
            let l7 = batched(k, || {
                let omega = standard_normal(m, d, &mut rng);
                let eps_bar_prev = &eps * c + &omega * s;
                let eps_t = &eps * s - &omega * c;
                loss7_with_noise(&schedule, &x0, &eps_bar_prev, &eps_t, t, sig, predictor).unwrap()
            });
            let l8 = weighted_loss(&schedule, &x0, &eps, t, sig, predictor).unwrap();
            let constant = loss7_minus_loss8(&schedule, t, sig, d).unwrap();
            assert!(
                (l7.mean - l8 - constant).abs() < 4.0 * l7.se,
                "t = {t}, {name}: E_ω(7) = {} vs (8) + C = {} (se {})",
                l7.mean,
                l8 + constant,
                l7.se
            );
        }
    }
}

/// Per-row values of a batch loss, by calling it on one row at a time.
fn per_row(n: usize, mut row: impl FnMut(usize) -> f64) -> Array1<f64> {
    Array1::from_iter((0..n).map(&mut row))
}

#[test]
fn loss8_variance_is_lower_by_the_stated_excess() {
    // Var f7 − Var f8 = (β_t²/(α_t²σ_t²))² E[4b²‖a‖² + 2b⁴d], b = α_t β̄_{t−1}/β̄_t, with
    // ‖a‖² = (β_t/β̄_t)²‖ε − ε̂‖² = (β_t/β̄_t)² f8/w_t. Sample variances of n = 20000 rows each;
    // the standard error of a sample variance is sqrt(Var((f − mean)²)/n).
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(47);
    let (n, d) = (20000, 2);
    for t in [10, 300, 1000] {
        let (a, b, bb, bb_prev) = (
            schedule.alphas()[t],
            schedule.betas()[t],
            schedule.beta_bars()[t],
            schedule.beta_bars()[t - 1],
        );
        let sig = sigma(&schedule, SigmaChoice::Posterior, t).unwrap();
        let w = loss_weight(&schedule, t, sig).unwrap();
        let (scale, bcoef) = (b * b / (a * a * sig * sig), a * bb_prev / bb);
        for (name, predictor) in predictors() {
            let x0 = standard_normal(n, d, &mut rng) * 0.5;
            let (e1, e2, eps) = (
                standard_normal(n, d, &mut rng),
                standard_normal(n, d, &mut rng),
                standard_normal(n, d, &mut rng),
            );
            let f7 = per_row(n, |i| {
                let r = s![i..i + 1, ..];
                loss7_with_noise(
                    &schedule,
                    &x0.slice(r).to_owned(),
                    &e1.slice(r).to_owned(),
                    &e2.slice(r).to_owned(),
                    t,
                    sig,
                    predictor,
                )
                .unwrap()
            });
            let x0_8 = standard_normal(n, d, &mut rng) * 0.5;
            let f8 = per_row(n, |i| {
                let r = s![i..i + 1, ..];
                weighted_loss(
                    &schedule,
                    &x0_8.slice(r).to_owned(),
                    &eps.slice(r).to_owned(),
                    t,
                    sig,
                    predictor,
                )
                .unwrap()
            });
            let var_of = |f: &Array1<f64>| {
                let m = f.mean().unwrap();
                estimate(f.mapv(|x| (x - m).powi(2)).view())
            };
            let (v7, v8) = (var_of(&f7), var_of(&f8));
            let a_sq = f8.mapv(|f| (b / bb).powi(2) * f / w);
            let excess = estimate(
                a_sq.mapv(|q| {
                    scale * scale * (4.0 * bcoef * bcoef * q + 2.0 * bcoef.powi(4) * d as f64)
                })
                .view(),
            );
            assert!(
                v7.mean > v8.mean,
                "t = {t}, {name}: Var(7) = {} not above Var(8) = {}",
                v7.mean,
                v8.mean
            );
            let se = v7.se.hypot(v8.se).hypot(excess.se);
            assert!(
                (v7.mean - v8.mean - excess.mean).abs() < 4.0 * se,
                "t = {t}, {name}: Var(7) − Var(8) = {} vs excess {} (se {se})",
                v7.mean - v8.mean,
                excess.mean
            );
        }
    }
}
