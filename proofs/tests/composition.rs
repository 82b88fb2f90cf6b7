//! Section 2 of docs/derivations.md: composing T Gaussian steps gives eq. (9),
//! p(x_t|x_0) = N(ᾱ_t x_0, β̄_t² I) with β̄_t² = 1 − ᾱ_t².

use ddpm_proofs::chain::{forward_step, simulate};
use ddpm_proofs::stats::{estimate, ks_critical, ks_statistic};
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{Array1, Array2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use statrs::distribution::{ContinuousCDF, Normal};

/// KS significance level of each test below; with the seeds fixed the outcome is
/// deterministic, and a correct formula fails one of the ~30 KS tests with probability < 3%.
const KS_ALPHA: f64 = 0.001;

fn random_schedule(rng: &mut StdRng, t_max: usize) -> Schedule {
    let alphas: Vec<f64> = (0..t_max)
        .map(|_| rng.random_range(0.7f64..0.999).sqrt())
        .collect();
    Schedule::from_alphas(&alphas).unwrap()
}

/// The simulated x_t (n samples, one column) against N(mean, sd²): mean and variance within
/// 4 standard errors (the variance's SE from the sample fourth moment, so it does not assume
/// normality), and a KS test of the standardised samples.
fn assert_normal(samples: &Array1<f64>, mean: f64, sd: f64, what: &str) {
    let n = samples.len();
    let m = estimate(samples.view());
    assert!(
        (m.mean - mean).abs() < 4.0 * m.se,
        "{what}: mean {} vs {mean} (se {})",
        m.mean,
        m.se
    );
    let sq = samples.mapv(|x| (x - m.mean).powi(2));
    let v = estimate(sq.view());
    assert!(
        (v.mean - sd * sd).abs() < 4.0 * v.se,
        "{what}: variance {} vs {} (se {})",
        v.mean,
        sd * sd,
        v.se
    );
    let z = samples.mapv(|x| (x - mean) / sd);
    let std_normal = Normal::standard();
    let d = ks_statistic(z.view(), |x| std_normal.cdf(x));
    assert!(
        d < ks_critical(KS_ALPHA, n),
        "{what}: KS D = {d} >= {}",
        ks_critical(KS_ALPHA, n)
    );
}

#[test]
fn simulated_chain_matches_marginal() {
    // n = 20000 chains per schedule, each run step by step from a fixed x_0.
    let n = 20000;
    let mut rng = StdRng::seed_from_u64(2);
    let mut cases = vec![(
        Schedule::new(ScheduleKind::Article, 1000).unwrap(),
        vec![1, 2, 10, 100, 500, 1000],
    )];
    for _ in 0..3 {
        cases.push((random_schedule(&mut rng, 40), vec![1, 3, 7, 20, 40]));
    }
    cases.push((
        Schedule::new(ScheduleKind::Cosine, 200).unwrap(),
        vec![1, 50, 150, 200],
    ));
    for (schedule, record) in cases {
        let x0_value = rng.random_range(-1.0..1.0);
        let x0 = Array2::from_elem((n, 1), x0_value);
        let xs = simulate(&schedule, &x0, &record, &mut rng);
        for (&t, xt) in record.iter().zip(&xs) {
            let (ab, bb) = (schedule.alpha_bars()[t], schedule.beta_bars()[t]);
            assert_normal(
                &xt.column(0).to_owned(),
                ab * x0_value,
                bb,
                &format!("T = {}, t = {t}", schedule.t_max()),
            );
        }
    }
}

#[test]
fn beta_bar_satisfies_the_variance_recursion() {
    // The variance of the unrolled sum, accumulated step by step: V_t = α_t² V_{t−1} + β_t².
    let mut rng = StdRng::seed_from_u64(5);
    for schedule in [
        Schedule::new(ScheduleKind::Article, 1000).unwrap(),
        Schedule::new(ScheduleKind::Linear, 1000).unwrap(),
        random_schedule(&mut rng, 100),
    ] {
        let mut var = 0.0;
        for t in 1..=schedule.t_max() {
            var = schedule.alphas()[t].powi(2) * var + schedule.betas()[t].powi(2);
            let bb2 = schedule.beta_bars()[t].powi(2);
            assert!(
                (var - bb2).abs() <= 1e-12 * bb2.max(1e-3),
                "t = {t}: recursion {var} vs β̄² {bb2}"
            );
        }
    }
}

#[test]
fn strided_transition_composes() {
    // p(x_t|x_s) = N(ᾱ_t/ᾱ_s x_s, (1 − ᾱ_t²/ᾱ_s²) I), checked by simulating steps s+1..t.
    let n = 20000;
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    for (s, t) in [(1, 2), (10, 250), (250, 500), (600, 1000)] {
        let xs_value = rng.random_range(-2.0..2.0);
        let mut x = Array2::from_elem((n, 1), xs_value);
        for k in s + 1..=t {
            x = forward_step(&schedule, &x, k, &mut rng).0;
        }
        let ratio = schedule.alpha_bars()[t] / schedule.alpha_bars()[s];
        assert_normal(
            &x.column(0).to_owned(),
            ratio * xs_value,
            (1.0 - ratio * ratio).sqrt(),
            &format!("{s} -> {t}"),
        );
    }
}
