//! Section 8 of docs/derivations.md: the variational bound, its discretised decoder and
//! bits/dim, held against the exact likelihood of a linear-Gaussian generator.

use ddpm_proofs::gauss::{density_1d, log_density};
use ddpm_proofs::quad::{standard_normal_rule, trapezoid, Rule};
use ddpm_reference::bound::{
    bits_per_dim, decoder_log_probs, decoder_nll, negative_elbo_with_noise, posterior_kl, prior_kl,
    LEVELS,
};
use ddpm_reference::marginal::standard_normal;
use ddpm_reference::oracle::DataLaw;
use ddpm_reference::sampler::ancestral_step;
use ddpm_reference::sigma::{sigma, SigmaChoice};
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{array, Array1, Array2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::f64::consts::TAU;

/// Gaussian data N(M, S²) in 1-D.
const M: f64 = 0.2;
const S: f64 = 0.5;

/// The generator's mean μ(x_t) with the oracle of N(M, S²), for a column of x_t.
fn oracle_mean(schedule: &Schedule, law: &DataLaw, xt: &Array2<f64>, t: usize) -> Array2<f64> {
    let eps_hat = law.optimal_eps(schedule, xt, t).unwrap();
    ancestral_step(schedule, xt, t, &eps_hat, 0.0, &Array2::zeros(xt.raw_dim())).unwrap()
}

/// E_{x_0 ~ N(M, S²)}[−ln q(x_0)] for the generator q(x_{t−1}|x_t) = N(a_t x_t + b_t, σ_t²),
/// q(x_T) = N(0, 1): q(x_0) = N(M_0, V_0) by pushing the prior through the affine steps. The
/// oracle of Gaussian data is affine in x_t, so a_t, b_t are read off at x_t = 0 and 1 (and
/// checked at x_t = 2).
fn exact_nll(schedule: &Schedule, law: &DataLaw, sigmas: &Array1<f64>) -> f64 {
    let (mut mean, mut var) = (0.0, 1.0);
    for t in (1..=schedule.t_max()).rev() {
        let mu = oracle_mean(schedule, law, &array![[0.0], [1.0], [2.0]], t);
        let (b, a) = (mu[[0, 0]], mu[[1, 0]] - mu[[0, 0]]);
        assert!(
            (mu[[2, 0]] - (b + 2.0 * a)).abs() < 1e-9 * mu[[2, 0]].abs().max(1.0),
            "μ is not affine at t = {t}"
        );
        mean = a * mean + b;
        var = a * a * var + sigmas[t] * sigmas[t];
    }
    0.5 * (TAU * var).ln() + (S * S + (M - mean).powi(2)) / (2.0 * var)
}

/// E[L_T + Σ_{t≥2} L_{t−1} + L_0] for N(M, S²) data with the oracle and σ_t = sigmas[t]
/// (continuous Gaussian decoder), from the reference's KL terms. The expectation over
/// x_0 = M + S u and x_t = ᾱ_t x_0 + β̄_t e is a tensor trapezoid rule, exact to rounding because
/// each term is a quadratic in (u, e) times their Gaussian density.
fn expected_negative_elbo(schedule: &Schedule, law: &DataLaw, sigmas: &Array1<f64>) -> f64 {
    let rule = standard_normal_rule(10.0, 0.5);
    let k = rule.nodes.len();
    let x0 = Array2::from_shape_fn((k * k, 1), |(i, _)| M + S * rule.nodes[i / k]);
    let e = Array2::from_shape_fn((k * k, 1), |(i, _)| rule.nodes[i % k]);
    let w = Array1::from_shape_fn(k * k, |i| rule.weights[i / k] * rule.weights[i % k]);
    let t_max = schedule.t_max();
    let mut total = w.dot(&prior_kl(schedule, &x0).unwrap());
    for t in 1..=t_max {
        let xt = &x0 * schedule.alpha_bars()[t] + &e * schedule.beta_bars()[t];
        if t == 1 {
            let mu = oracle_mean(schedule, law, &xt, 1);
            total -= w.dot(&log_density(&x0, &mu, sigmas[1] * sigmas[1]));
        } else {
            let eps_hat = law.optimal_eps(schedule, &xt, t).unwrap();
            total += w.dot(&posterior_kl(schedule, &x0, &xt, t, &eps_hat, sigmas[t]).unwrap());
        }
    }
    total
}

/// KL(p(x_T) ‖ N(0, 1)) for p(x_T) = N(ᾱ_T M, ᾱ_T² S² + β̄_T²): what remains of KL(p‖q) when every
/// generator step is the encoder's exact reverse step.
fn prior_mismatch(schedule: &Schedule) -> f64 {
    let t = schedule.t_max();
    let (ab, bb) = (schedule.alpha_bars()[t], schedule.beta_bars()[t]);
    let v = ab * ab * S * S + bb * bb;
    -0.5 * v.ln() + (v + (ab * M).powi(2)) / 2.0 - 0.5
}

/// σ_t for t = 0..T with σ_1 replaced by β_1 where the choice gives 0 (the decoder needs σ_1 > 0).
fn sigma_table(schedule: &Schedule, choice: SigmaChoice) -> Array1<f64> {
    let mut table = Array1::from_shape_fn(schedule.t_max() + 1, |t| {
        if t == 0 {
            0.0
        } else {
            sigma(schedule, choice, t).unwrap()
        }
    });
    if table[1] == 0.0 {
        table[1] = schedule.betas()[1];
    }
    table
}

fn schedules() -> Vec<Schedule> {
    let mut rng = StdRng::seed_from_u64(101);
    let random: Vec<f64> = (0..20)
        .map(|_| rng.random_range(0.5f64..0.95).sqrt())
        .collect();
    vec![
        Schedule::new(ScheduleKind::Article, 1000).unwrap(),
        Schedule::new(ScheduleKind::Cosine, 100).unwrap(),
        Schedule::from_alphas(&random).unwrap(),
    ]
}

#[test]
fn bound_lies_above_exact_gaussian_nll() {
    let law = DataLaw::mixture(array![1.0], array![[M]], array![S]).unwrap();
    let mut rng = StdRng::seed_from_u64(103);
    for schedule in schedules() {
        let random =
            sigma_table(&schedule, SigmaChoice::Beta).mapv(|b| b * rng.random_range(0.5..1.5));
        let optimal = sigma_table(&schedule, SigmaChoice::Isotropic { data_std: S });
        let choices = [
            ("β_t", sigma_table(&schedule, SigmaChoice::Beta)),
            ("posterior", sigma_table(&schedule, SigmaChoice::Posterior)),
            (
                "isotropic s = 0.9",
                sigma_table(&schedule, SigmaChoice::Isotropic { data_std: 0.9 }),
            ),
            ("random", random),
            ("optimal", optimal),
        ];
        let mismatch = prior_mismatch(&schedule);
        for (name, sigmas) in choices {
            let elbo = expected_negative_elbo(&schedule, &law, &sigmas);
            let nll = exact_nll(&schedule, &law, &sigmas);
            let what = format!("T = {}, σ = {name}", schedule.t_max());
            // Quadrature and recursion are exact to rounding (~1e-12 on sums of order 1).
            assert!(
                elbo >= nll - 1e-10,
                "{what}: bound {elbo} below the exact NLL {nll}"
            );
            if name == "optimal" {
                assert!(
                    elbo - nll <= mismatch + 1e-10,
                    "{what}: gap {} above KL(p(x_T)‖q(x_T)) = {mismatch}",
                    elbo - nll
                );
            } else {
                assert!(
                    elbo - nll > mismatch,
                    "{what}: a non-optimal σ leaves a gap {} below {mismatch}",
                    elbo - nll
                );
            }
        }
    }
}

#[test]
fn gap_shrinks_as_sigma_approaches_optimal() {
    let law = DataLaw::mixture(array![1.0], array![[M]], array![S]).unwrap();
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let optimal = sigma_table(&schedule, SigmaChoice::Isotropic { data_std: S });
    for start in [SigmaChoice::Beta, SigmaChoice::Isotropic { data_std: 0.1 }] {
        let from = sigma_table(&schedule, start);
        let gaps: Vec<f64> = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
            .iter()
            .map(|&lambda| {
                let sigmas = &from * (1.0 - lambda) + &optimal * lambda;
                expected_negative_elbo(&schedule, &law, &sigmas)
                    - exact_nll(&schedule, &law, &sigmas)
            })
            .collect();
        assert!(
            gaps.windows(2).all(|g| g[1] < g[0]),
            "from {start:?}: gaps {gaps:?} do not shrink"
        );
        assert!(
            *gaps.last().unwrap() <= prior_mismatch(&schedule) + 1e-10,
            "from {start:?}: final gap {gaps:?}"
        );
    }
}

/// ∫_a^b N(u; mean, std²) du by composite Simpson with `n` (even) intervals.
fn simpson(a: f64, b: f64, n: usize, mean: f64, std: f64) -> f64 {
    let grid = trapezoid(a, b, n + 1);
    let h = (b - a) / n as f64;
    let coef = Array1::from_shape_fn(n + 1, |i| {
        if i == 0 || i == n {
            1.0
        } else if i % 2 == 1 {
            4.0
        } else {
            2.0
        }
    });
    let rule = Rule {
        nodes: grid.nodes,
        weights: coef * (h / 3.0),
    };
    rule.integrate(&rule.nodes.mapv(|u| density_1d(u, mean, std * std)))
}

#[test]
fn discretised_decoder_is_a_pmf() {
    // Bin k = [x_k − 1/255, x_k + 1/255], x_k = 2k/255 − 1, outer bins to ±∞. Simpson on each bin
    // (the outer ones cut 40 std beyond the mean, where the mass is below 1e-300) at a step of
    // std/(20(1 + z)), z the bin's largest distance from the mean in std: the density's log-slope
    // is z/std, so it changes by less than 5% per step and Simpson's relative error stays below
    // ~1e-9 even on bins 40 std out.
    for (mean, std) in [
        (0.0, 0.01),
        (0.37, 0.003),
        (-0.99, 0.05),
        (1.3, 0.2),
        (-0.5, 2.0),
        (0.1, 1e-4),
    ] {
        let log_probs = decoder_log_probs(mean, std).unwrap();
        assert_eq!(log_probs.len(), LEVELS);
        let total: f64 = log_probs.mapv(f64::exp).sum();
        assert!(
            (total - 1.0).abs() < 1e-12,
            "mean {mean}, std {std}: probabilities sum to {total}"
        );
        for k in 0..LEVELS {
            let centre = 2.0 * k as f64 / 255.0 - 1.0;
            let lo = if k == 0 {
                mean.min(centre) - 40.0 * std
            } else {
                centre - 1.0 / 255.0
            };
            let hi = if k == LEVELS - 1 {
                mean.max(centre) + 40.0 * std
            } else {
                centre + 1.0 / 255.0
            };
            let z = ((lo - mean).abs().max((hi - mean).abs()) / std).min(45.0);
            let n =
                2 * (((hi - lo) / (std / (20.0 * (1.0 + z)))).ceil() as usize).clamp(50, 500_000);
            let mass = simpson(lo, hi, n, mean, std);
            if mass > 1e-100 {
                let p = log_probs[k].exp();
                assert!(
                    (p / mass - 1.0).abs() < 1e-7,
                    "mean {mean}, std {std}, bin {k}: {p} vs Simpson {mass}"
                );
            }
        }
    }
}

#[test]
fn bits_per_dim_is_nats_over_d_ln2() {
    // The reference's ELBO of an 8-bit x_0 (d = 3), assembled again here from its terms with the
    // same noise: L_T by the prior term, L_{t−1} by the transition terms, L_0 by the decoder;
    // bits/dim is the total over d·ln 2.
    let schedule = Schedule::new(ScheduleKind::Article, 50).unwrap();
    let law = DataLaw::mixture(
        array![0.5, 0.5],
        array![[-0.5, 0.0, 0.5], [0.3, 0.3, -0.3]],
        array![0.3, 0.2],
    )
    .unwrap();
    let x0 = array![
        2.0 * 40.0 / 255.0 - 1.0,
        2.0 * 128.0 / 255.0 - 1.0,
        2.0 * 250.0 / 255.0 - 1.0
    ];
    let mut rng = StdRng::seed_from_u64(107);
    let eps = standard_normal(50, 3, &mut rng);
    let predictor = |x: &Array2<f64>, t: usize| law.optimal_eps(&schedule, x, t).unwrap();
    let choice = SigmaChoice::Beta;
    let elbo = negative_elbo_with_noise(&schedule, &x0, choice, &eps, predictor).unwrap();
    let x0_row = x0.clone().insert_axis(ndarray::Axis(0));
    let mut total = prior_kl(&schedule, &x0_row).unwrap()[0];
    for t in 1..=50 {
        let xt = &x0_row * schedule.alpha_bars()[t]
            + &eps.row(t - 1).insert_axis(ndarray::Axis(0)) * schedule.beta_bars()[t];
        let eps_hat = predictor(&xt, t);
        let sig = sigma(&schedule, choice, t).unwrap();
        total += if t == 1 {
            let mean =
                ancestral_step(&schedule, &xt, 1, &eps_hat, 0.0, &Array2::zeros((1, 3))).unwrap();
            decoder_nll(&x0_row, &mean, sig).unwrap()[0]
        } else {
            posterior_kl(&schedule, &x0_row, &xt, t, &eps_hat, sig).unwrap()[0]
        };
    }
    assert!(
        (elbo.total() - total).abs() < 1e-10 * total.abs(),
        "ELBO {} vs assembled {total}",
        elbo.total()
    );
    let bpd = total / (3.0 * 2f64.ln());
    assert!(
        (elbo.bits_per_dim() - bpd).abs() < 1e-10 * bpd,
        "{} vs {bpd}",
        elbo.bits_per_dim()
    );
    assert!((bits_per_dim(total, 3) - bpd).abs() < 1e-12 * bpd);
}
