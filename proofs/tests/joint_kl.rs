//! Section 1 of docs/derivations.md: the joint KL between the encoder's and the generator's
//! laws of the whole chain splits into L_T + Σ L_{t−1} (+ the decoder term, identical in both
//! forms), and the article's per-step cross-entropy is the posterior KL plus an entropy.

use ddpm_proofs::chain::forward_step;
use ddpm_proofs::gauss::log_density;
use ddpm_proofs::stats::estimate;
use ddpm_reference::bound::{posterior_kl, prior_kl};
use ddpm_reference::oracle::DataLaw;
use ddpm_reference::posterior;
use ddpm_reference::sampler::ancestral_step;
use ddpm_reference::sigma::{sigma, SigmaChoice};
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{array, Array1, Array2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::f64::consts::{E, TAU};

/// An arbitrary, deliberately non-optimal noise predictor: the identity holds for every μ.
fn predictor(x: &Array2<f64>, t: usize) -> Array2<f64> {
    x.mapv(|v| 0.8 * v.tanh() - 0.002 * t as f64)
}

/// The generator's mean μ(x_t) from the reference's sampler step without noise.
fn generator_mean(schedule: &Schedule, xt: &Array2<f64>, t: usize) -> Array2<f64> {
    ancestral_step(
        schedule,
        xt,
        t,
        &predictor(xt, t),
        0.0,
        &Array2::zeros(xt.raw_dim()),
    )
    .unwrap()
}

fn data_law() -> DataLaw {
    DataLaw::mixture(
        array![0.3, 0.7],
        array![[-0.6, 0.4], [0.5, -0.2]],
        array![0.25, 0.1],
    )
    .unwrap()
}

#[test]
fn joint_kl_by_simulation_equals_entropy_plus_bound_terms() {
    // Per chain, simulated step by step from x_0:
    //   by densities: Σ_{t≥1} ln p(x_t|x_{t−1}) − ln q(x_T) − Σ_{t≥2} ln q(x_{t−1}|x_t),
    //   by KL terms:  L_T(x_0) + Σ_{t≥2} KL(p(x_{t−1}|x_t, x_0) ‖ q(x_{t−1}|x_t)) at the simulated x_t.
    // Their expectations agree (the decoder term −ln q(x_0|x_1) and ln p̃(x_0) are common to both
    // sides and left out). Paired per chain; |mean difference| < 4 standard errors.
    let mut rng = StdRng::seed_from_u64(111);
    let random: Vec<f64> = (0..50)
        .map(|_| rng.random_range(0.6f64..0.99).sqrt())
        .collect();
    let law = data_law();
    for (schedule, n) in [
        (Schedule::from_alphas(&random).unwrap(), 20000),
        (Schedule::new(ScheduleKind::Article, 1000).unwrap(), 4000),
    ] {
        let t_max = schedule.t_max();
        let x0 = law.sample(n, &mut rng).unwrap();
        let mut by_density = Array1::<f64>::zeros(n);
        let mut by_kl = prior_kl(&schedule, &x0).unwrap();
        let mut x_prev = x0.clone();
        for t in 1..=t_max {
            let (xt, _) = forward_step(&schedule, &x_prev, t, &mut rng);
            let (a, b) = (schedule.alphas()[t], schedule.betas()[t]);
            by_density += &log_density(&xt, &(&x_prev * a), b * b);
            if t >= 2 {
                let sig = sigma(&schedule, SigmaChoice::Beta, t).unwrap();
                by_density -= &log_density(&x_prev, &generator_mean(&schedule, &xt, t), sig * sig);
                by_kl += &posterior_kl(&schedule, &x0, &xt, t, &predictor(&xt, t), sig).unwrap();
            }
            x_prev = xt;
        }
        by_density -= &log_density(&x_prev, &Array2::zeros(x_prev.raw_dim()), 1.0);
        let diff = estimate((&by_density - &by_kl).view());
        let level = estimate(by_kl.view()).mean;
        assert!(
            diff.mean.abs() < 4.0 * diff.se,
            "T = {t_max}: by densities − by KL terms = {} (se {}), bound terms {level}",
            diff.mean,
            diff.se
        );
    }
}

#[test]
fn per_step_cross_entropy_equals_posterior_kl_plus_entropy() {
    // E[−ln q(x_{t−1}|x_t)] over encoder pairs = E KL(p(x_{t−1}|x_t,x_0) ‖ q) + (d/2) ln(2πe σ̃_t²),
    // n = 40000 pairs (x_0, x_{t−1}, x_t), paired per row, 4 standard errors.
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(113);
    let law = data_law();
    let n = 40000;
    for t in [2, 30, 400, 1000] {
        let x0 = law.sample(n, &mut rng).unwrap();
        let (ab_prev, bb_prev) = (schedule.alpha_bars()[t - 1], schedule.beta_bars()[t - 1]);
        let x_prev =
            &x0 * ab_prev + ddpm_reference::marginal::standard_normal(n, 2, &mut rng) * bb_prev;
        let (xt, _) = forward_step(&schedule, &x_prev, t, &mut rng);
        let sig = sigma(&schedule, SigmaChoice::Beta, t).unwrap() * 1.3;
        let cross_entropy = -log_density(&x_prev, &generator_mean(&schedule, &xt, t), sig * sig);
        let post_var = posterior::std(&schedule, t).unwrap().powi(2);
        let entropy = (TAU * E * post_var).ln(); // d/2 · ln(2πe σ̃²) with d = 2
        let kl = posterior_kl(&schedule, &x0, &xt, t, &predictor(&xt, t), sig).unwrap() + entropy;
        let diff = estimate((&cross_entropy - &kl).view());
        assert!(
            diff.mean.abs() < 4.0 * diff.se,
            "t = {t}: cross-entropy − (KL + entropy) = {} (se {})",
            diff.mean,
            diff.se
        );
    }
}
