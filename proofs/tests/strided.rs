//! Section 9 of docs/derivations.md: strided sampling and DDIM in the article's notation.

use ddpm_proofs::bayes::gaussian_posterior_by_quadrature;
use ddpm_proofs::stats::{estimate, ks_critical, ks_statistic};
use ddpm_reference::marginal::standard_normal;
use ddpm_reference::oracle::DataLaw;
use ddpm_reference::sampler::{ancestral_step, ddim_step};
use ddpm_reference::sigma::{sigma, SigmaChoice};
use ddpm_reference::timesteps::{step_pairs, strided};
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{array, Array1, Array2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use statrs::distribution::{ContinuousCDF, Normal};

/// KS significance level of each test below (seeded, so the outcome is deterministic).
const KS_ALPHA: f64 = 0.001;

/// Samples (one column) against N(mean, sd²): mean and variance within 4 standard errors and
/// a KS test of the standardised values.
fn assert_normal(samples: &Array1<f64>, mean: f64, sd: f64, what: &str) {
    let m = estimate(samples.view());
    assert!(
        (m.mean - mean).abs() < 4.0 * m.se,
        "{what}: mean {} vs {mean} (se {})",
        m.mean,
        m.se
    );
    let v = estimate(samples.mapv(|x| (x - m.mean).powi(2)).view());
    assert!(
        (v.mean - sd * sd).abs() < 4.0 * v.se,
        "{what}: variance {} vs {} (se {})",
        v.mean,
        sd * sd,
        v.se
    );
    let std_normal = Normal::standard();
    let d = ks_statistic(samples.mapv(|x| (x - mean) / sd).view(), |x| {
        std_normal.cdf(x)
    });
    assert!(
        d < ks_critical(KS_ALPHA, samples.len()),
        "{what}: KS D = {d}"
    );
}

#[test]
fn strided_timesteps_are_well_formed() {
    for t_max in [1, 2, 3, 10, 999, 1000] {
        for n in (1..=t_max.min(60)).chain([t_max]) {
            let steps = strided(t_max, n).unwrap();
            assert_eq!(steps.len(), n, "T = {t_max}, n = {n}");
            assert_eq!(steps[0], t_max, "T = {t_max}, n = {n}: must start at T");
            if n > 1 {
                assert_eq!(
                    *steps.last().unwrap(),
                    1,
                    "T = {t_max}, n = {n}: must end at 1"
                );
            }
            assert!(
                steps.windows(2).all(|w| w[0] > w[1]),
                "T = {t_max}, n = {n}: not strictly descending: {steps:?}"
            );
            let pairs = step_pairs(&steps);
            assert_eq!(pairs.last().unwrap().1, 0, "the last step goes to 0");
            assert!(
                pairs.iter().all(|&(a, b)| b < a),
                "every step goes backwards"
            );
        }
        assert!(strided(t_max, 0).is_err());
        assert!(strided(t_max, t_max + 1).is_err());
    }
}

#[test]
fn strided_chain_matches_eq9() {
    // The strided encoder x_τ = α_{τ|τ'} x_{τ'} + β_{τ|τ'} ε, simulated over the visited steps
    // in ascending order from a fixed x_0 (n = 20000 chains), against eq. 9 at every τ.
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(91);
    let n = 20000;
    for n_steps in [5, 50] {
        let mut visited = strided(1000, n_steps).unwrap();
        visited.reverse();
        let x0_value = rng.random_range(-1.0..1.0);
        let mut x = Array1::from_elem(n, x0_value);
        let mut prev = 0;
        for &tau in &visited {
            let ratio = schedule.alpha_bars()[tau] / schedule.alpha_bars()[prev];
            x = x * ratio
                + standard_normal(n, 1, &mut rng).column(0).to_owned()
                    * (1.0 - ratio * ratio).sqrt();
            let (ab, bb) = (schedule.alpha_bars()[tau], schedule.beta_bars()[tau]);
            assert_normal(
                &x,
                ab * x0_value,
                bb,
                &format!("{n_steps} steps, τ = {tau}"),
            );
            prev = tau;
        }
    }
}

#[test]
fn ddim_eta_one_is_the_strided_posterior() {
    // With the true noise as ε̂, DDIM at η = 1 must sample p(x_{τ'}|x_τ, x_0): its mean (z = 0)
    // and spread (z = 1 minus z = 0) against Bayes' rule by quadrature with prior
    // N(ᾱ_{τ'} x_0, β̄_{τ'}²) and likelihood N(x_τ; α_{τ|τ'} x_{τ'}, 1 − α_{τ|τ'}²).
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(93);
    let pairs = [(1000, 889), (500, 100), (112, 1), (2, 1), (17, 3)];
    for (tau, tau_next) in pairs {
        let x0 = rng.random_range(-1.0..1.0);
        let eps = rng.random_range(-2.0..2.0);
        let (ab, bb) = (schedule.alpha_bars()[tau], schedule.beta_bars()[tau]);
        let (ab_next, bb_next) = (
            schedule.alpha_bars()[tau_next],
            schedule.beta_bars()[tau_next],
        );
        let x_tau = array![[ab * x0 + bb * eps]];
        let step = |z: f64| {
            ddim_step(
                &schedule,
                &x_tau,
                tau,
                tau_next,
                &array![[eps]],
                1.0,
                &array![[z]],
            )
            .unwrap()[[0, 0]]
        };
        let (mean, spread) = (step(0.0), step(1.0) - step(0.0));
        let ratio = ab / ab_next;
        let (bayes_mean, bayes_var) = gaussian_posterior_by_quadrature(
            ab_next * x0,
            bb_next,
            ratio,
            (1.0 - ratio * ratio).sqrt(),
            x_tau[[0, 0]],
        );
        let sd = bayes_var.sqrt();
        assert!(
            (mean - bayes_mean).abs() < 1e-7 * sd,
            "{tau} -> {tau_next}: mean {mean} vs Bayes {bayes_mean}"
        );
        assert!(
            (spread / sd - 1.0).abs() < 1e-7,
            "{tau} -> {tau_next}: σ {spread} vs Bayes {sd}"
        );
    }
    // The last step τ' = 0 has a point posterior: x_0 itself, with no noise.
    let x_tau = array![[0.3 * schedule.alpha_bars()[1] + 0.8 * schedule.beta_bars()[1]]];
    let out = ddim_step(&schedule, &x_tau, 1, 0, &array![[0.8]], 1.0, &array![[5.0]]).unwrap();
    assert!(
        (out[[0, 0]] - 0.3).abs() < 1e-12,
        "final step gives {} instead of x_0 = 0.3",
        out[[0, 0]]
    );
}

#[test]
fn ddim_eta_one_single_step_is_the_ancestral_step() {
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(95);
    for t in [1, 2, 10, 500, 1000] {
        let xt = standard_normal(4, 3, &mut rng);
        let eps_hat = standard_normal(4, 3, &mut rng);
        let z = standard_normal(4, 3, &mut rng);
        let ddim = ddim_step(&schedule, &xt, t, t - 1, &eps_hat, 1.0, &z).unwrap();
        let sig = sigma(&schedule, SigmaChoice::Posterior, t).unwrap();
        let ancestral = ancestral_step(&schedule, &xt, t, &eps_hat, sig, &z).unwrap();
        for (a, b) in ddim.iter().zip(ancestral.iter()) {
            assert!(
                (a - b).abs() < 1e-9 * b.abs().max(1.0),
                "t = {t}: DDIM {a} vs ancestral {b}"
            );
        }
    }
}

#[test]
fn ddim_eta_zero_is_deterministic() {
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(97);
    for (tau, tau_next) in [(1000, 900), (300, 1), (1, 0)] {
        let xt = standard_normal(5, 2, &mut rng);
        let eps_hat = standard_normal(5, 2, &mut rng);
        let first = ddim_step(
            &schedule,
            &xt,
            tau,
            tau_next,
            &eps_hat,
            0.0,
            &standard_normal(5, 2, &mut rng),
        )
        .unwrap();
        let second = ddim_step(
            &schedule,
            &xt,
            tau,
            tau_next,
            &eps_hat,
            0.0,
            &standard_normal(5, 2, &mut rng),
        )
        .unwrap();
        assert_eq!(
            first, second,
            "{tau} -> {tau_next}: η = 0 output depends on z"
        );
        // And it is ᾱ_{τ'} x̂_0 + β̄_{τ'} ε̂ with x̂_0 = (x_τ − β̄_τ ε̂)/ᾱ_τ.
        let x0_hat = (&xt - &(&eps_hat * schedule.beta_bars()[tau])) / schedule.alpha_bars()[tau];
        let expected =
            x0_hat * schedule.alpha_bars()[tau_next] + &eps_hat * schedule.beta_bars()[tau_next];
        for (a, b) in first.iter().zip(expected.iter()) {
            assert!(
                (a - b).abs() < 1e-10 * b.abs().max(1.0),
                "{tau} -> {tau_next}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn ddim_with_dirac_oracle_preserves_marginals() {
    // Dirac data at c with its exact oracle: starting from x_T ~ p(x_T|c) (n = 20000), every
    // visited x_τ must follow N(ᾱ_τ c, β̄_τ²) for every η, and the final step must land on c.
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let c = -0.35;
    let law = DataLaw::dirac(array![c]).unwrap();
    let mut rng = StdRng::seed_from_u64(99);
    let n = 20000;
    for (n_steps, eta) in [(10, 0.0), (10, 0.5), (25, 1.0)] {
        let steps = strided(1000, n_steps).unwrap();
        let mut x: Array2<f64> = standard_normal(n, 1, &mut rng) * schedule.beta_bars()[1000]
            + c * schedule.alpha_bars()[1000];
        for (tau, tau_next) in step_pairs(&steps) {
            let eps_hat = law.optimal_eps(&schedule, &x, tau).unwrap();
            x = ddim_step(
                &schedule,
                &x,
                tau,
                tau_next,
                &eps_hat,
                eta,
                &standard_normal(n, 1, &mut rng),
            )
            .unwrap();
            let what = format!("{n_steps} steps, η = {eta}, τ' = {tau_next}");
            if tau_next == 0 {
                assert!(
                    x.iter().all(|&v| (v - c).abs() < 1e-9),
                    "{what}: final samples are not c"
                );
            } else {
                let (ab, bb) = (
                    schedule.alpha_bars()[tau_next],
                    schedule.beta_bars()[tau_next],
                );
                assert_normal(&x.column(0).to_owned(), ab * c, bb, &what);
            }
        }
    }
}
