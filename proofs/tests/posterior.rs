//! Section 3 of docs/derivations.md: p(x_{t−1}|x_t, x_0) = N(μ̃, σ̃_t² I).

use ddpm_proofs::bayes::gaussian_posterior_by_quadrature;
use ddpm_reference::{posterior, Schedule, ScheduleKind};
use ndarray::array;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mean and variance of p(x_{t−1}|x_t, x_0) by Bayes' rule on a grid: prior
/// p(x_{t−1}|x_0) = N(ᾱ_{t−1}x_0, β̄_{t−1}²), likelihood p(x_t|x_{t−1}) = N(α_t x_{t−1}, β_t²).
fn bayes_by_quadrature(schedule: &Schedule, x0: f64, xt: f64, t: usize) -> (f64, f64) {
    let (a, b) = (schedule.alphas()[t], schedule.betas()[t]);
    gaussian_posterior_by_quadrature(
        schedule.alpha_bars()[t - 1] * x0,
        schedule.beta_bars()[t - 1],
        a,
        b,
        xt,
    )
}

#[test]
fn posterior_matches_bayes_rule_by_quadrature() {
    let mut rng = StdRng::seed_from_u64(13);
    let random: Vec<f64> = (0..30)
        .map(|_| rng.random_range(0.5f64..0.999).sqrt())
        .collect();
    let cases = [
        (
            Schedule::new(ScheduleKind::Article, 1000).unwrap(),
            vec![2, 3, 10, 500, 1000],
        ),
        (Schedule::from_alphas(&random).unwrap(), vec![2, 5, 17, 30]),
        (
            Schedule::new(ScheduleKind::Cosine, 100).unwrap(),
            vec![2, 50, 99],
        ),
    ];
    for (schedule, ts) in cases {
        for t in ts {
            let x0 = rng.random_range(-1.0..1.0);
            let xt = schedule.alpha_bars()[t] * x0
                + schedule.beta_bars()[t] * rng.random_range(-2.5..2.5);
            let (mean, var) = bayes_by_quadrature(&schedule, x0, xt, t);
            let mu = posterior::mean(&schedule, &array![[x0]], &array![[xt]], t).unwrap()[[0, 0]];
            let sd = posterior::std(&schedule, t).unwrap();
            // The grid makes the quadrature exact to ~1e-12; the tolerance is relative to σ̃.
            assert!(
                (mu - mean).abs() < 1e-8 * sd,
                "t = {t}: μ̃ = {mu}, Bayes {mean}"
            );
            assert!(
                (sd * sd / var - 1.0).abs() < 1e-8,
                "t = {t}: σ̃² = {}, Bayes {var}",
                sd * sd
            );
        }
    }
}

#[test]
fn posterior_mean_in_noise_form() {
    // μ̃ = (x_t − (β_t²/β̄_t) ε)/α_t when x_t = ᾱ_t x_0 + β̄_t ε: the sampler's form.
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let (x0, eps) = (array![[0.3, -0.7, 1.0]], array![[1.2, 0.1, -2.0]]);
    for t in [1, 2, 100, 1000] {
        let (a, b, ab, bb) = (
            schedule.alphas()[t],
            schedule.betas()[t],
            schedule.alpha_bars()[t],
            schedule.beta_bars()[t],
        );
        let xt = &x0 * ab + &eps * bb;
        let noise_form = (&xt - &(&eps * (b * b / bb))) / a;
        let mu = posterior::mean(&schedule, &x0, &xt, t).unwrap();
        for (u, v) in mu.iter().zip(noise_form.iter()) {
            assert!((u - v).abs() < 1e-12, "t = {t}: {u} vs {v}");
        }
    }
}
