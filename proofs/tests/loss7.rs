//! Section 4 of docs/derivations.md: with μ(x_t) = (x_t − β_t ε_θ)/α_t (the sampler's mean,
//! ε_θ = (β_t/β̄_t) ε̂), twice the generator's cross-entropy E[−ln q(x_{t−1}|x_t)] is loss (7)
//! plus 2d ln σ_t + d ln 2π.

use ddpm_proofs::chain::forward_step;
use ddpm_proofs::gauss::log_density;
use ddpm_reference::loss::loss7_with_noise;
use ddpm_reference::marginal::{marginal_sample, standard_normal};
use ddpm_reference::sampler::ancestral_step;
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::f64::consts::TAU;

#[test]
fn loss7_is_twice_the_generator_cross_entropy() {
    let mut rng = StdRng::seed_from_u64(61);
    let random: Vec<f64> = (0..20)
        .map(|_| rng.random_range(0.5f64..0.999).sqrt())
        .collect();
    let cases = [
        (
            Schedule::new(ScheduleKind::Article, 1000).unwrap(),
            vec![1, 2, 400, 1000],
        ),
        (Schedule::from_alphas(&random).unwrap(), vec![1, 7, 20]),
    ];
    let predictor = |x: &Array2<f64>, t: usize| x.mapv(|v| (v * 0.9).tanh() + 0.01 * t as f64);
    let (n, d) = (500, 3);
    for (schedule, ts) in cases {
        for t in ts {
            let sig = schedule.betas()[t] * rng.random_range(0.3..1.5);
            let x0 = standard_normal(n, d, &mut rng) * 0.7 - 0.2;
            // The encoder's pair: x_{t−1} from eq. 9, then one simulated step to x_t.
            let eps_bar_prev = standard_normal(n, d, &mut rng);
            let x_prev = marginal_sample(&schedule, &x0, t - 1, &eps_bar_prev).unwrap();
            let mut step_rng = StdRng::seed_from_u64(t as u64);
            let (xt, eps_t) = forward_step(&schedule, &x_prev, t, &mut step_rng);
            // The generator's mean: the reference's ancestral step without noise.
            let mu = ancestral_step(
                &schedule,
                &xt,
                t,
                &predictor(&xt, t),
                0.0,
                &Array2::zeros(xt.raw_dim()),
            )
            .unwrap();
            let cross_entropy = -log_density(&x_prev, &mu, sig * sig).mean().unwrap();
            let from_density = 2.0 * cross_entropy - d as f64 * (TAU * sig * sig).ln();
            let l7 =
                loss7_with_noise(&schedule, &x0, &eps_bar_prev, &eps_t, t, sig, predictor).unwrap();
            // Same noise on both sides: equal up to rounding.
            assert!(
                (from_density - l7).abs() < 1e-9 * l7.abs().max(1.0),
                "t = {t}: {from_density} vs (7) = {l7}"
            );
        }
    }
}
