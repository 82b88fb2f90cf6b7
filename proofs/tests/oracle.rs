//! Section 7 of docs/derivations.md: the exact optimal noise predictor E[ε|x_t] (the test
//! oracle) and the minimum achievable loss.

use ddpm_proofs::gauss::density_1d;
use ddpm_proofs::quad::trapezoid;
use ddpm_proofs::stats::estimate;
use ddpm_reference::loss::loss8;
use ddpm_reference::marginal::{marginal_sample, standard_normal};
use ddpm_reference::oracle::DataLaw;
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{array, Array1, Array2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A 1-D law as (weight, mean, std) components; std 0 is a point mass.
type Components = Vec<(f64, f64, f64)>;

fn laws_1d() -> Vec<(&'static str, DataLaw, Components)> {
    vec![
        (
            "dirac",
            DataLaw::dirac(array![0.4]).unwrap(),
            vec![(1.0, 0.4, 0.0)],
        ),
        (
            "standard normal",
            DataLaw::standard_normal(1).unwrap(),
            vec![(1.0, 0.0, 1.0)],
        ),
        (
            "finite set",
            DataLaw::finite(array![1.0, 2.0, 1.0], array![[-0.8], [0.1], [0.7]]).unwrap(),
            vec![(0.25, -0.8, 0.0), (0.5, 0.1, 0.0), (0.25, 0.7, 0.0)],
        ),
        (
            "gaussian N(0.3, 0.5²)",
            DataLaw::mixture(array![1.0], array![[0.3]], array![0.5]).unwrap(),
            vec![(1.0, 0.3, 0.5)],
        ),
        (
            "mixture",
            DataLaw::mixture(array![0.3, 0.7], array![[-0.5], [0.6]], array![0.2, 0.1]).unwrap(),
            vec![(0.3, -0.5, 0.2), (0.7, 0.6, 0.1)],
        ),
    ]
}

/// E[ε|x_t] in 1-D by Bayes' rule: ∫ (x_t − ᾱ x_0)/β̄ · p̃(x_0) N(x_t; ᾱ x_0, β̄²) dx_0 over its
/// normaliser — a sum over point masses, a trapezoid integral over each continuous component.
fn eps_by_bayes(components: &Components, ab: f64, bb: f64, xt: f64) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for &(w, m, s) in components {
        if s == 0.0 {
            let lik = w * density_1d(xt, ab * m, bb * bb);
            num += lik * (xt - ab * m) / bb;
            den += lik;
        } else {
            // Cover the prior and the likelihood in x_0 (centre x_t/ᾱ, width β̄/ᾱ) at 1/30 of
            // the narrower width.
            let (c, wl) = (xt / ab, bb / ab);
            let (lo, hi) = (
                (m - 12.0 * s).min(c - 12.0 * wl),
                (m + 12.0 * s).max(c + 12.0 * wl),
            );
            let rule = trapezoid(lo, hi, ((hi - lo) / (s.min(wl) / 30.0)) as usize + 2);
            let lik = rule
                .nodes
                .mapv(|x0| w * density_1d(x0, m, s * s) * density_1d(xt, ab * x0, bb * bb));
            num += rule.integrate(&(&lik * &rule.nodes.mapv(|x0| (xt - ab * x0) / bb)));
            den += rule.integrate(&lik);
        }
    }
    num / den
}

#[test]
fn oracle_matches_bayes_by_quadrature() {
    let mut rng = StdRng::seed_from_u64(71);
    let random: Vec<f64> = (0..12)
        .map(|_| rng.random_range(0.4f64..0.99).sqrt())
        .collect();
    let cases = [
        (
            Schedule::new(ScheduleKind::Article, 1000).unwrap(),
            vec![1, 10, 300, 1000],
        ),
        (Schedule::from_alphas(&random).unwrap(), vec![1, 4, 12]),
    ];
    for (name, law, components) in laws_1d() {
        for (schedule, ts) in &cases {
            for &t in ts {
                let (ab, bb) = (schedule.alpha_bars()[t], schedule.beta_bars()[t]);
                // x_t drawn from its own marginal, so every point is where the oracle is used.
                let x0 = law.sample(7, &mut rng).unwrap();
                let xt =
                    marginal_sample(schedule, &x0, t, &standard_normal(7, 1, &mut rng)).unwrap();
                let oracle = law.optimal_eps(schedule, &xt, t).unwrap();
                for (&x, &o) in xt.iter().zip(oracle.iter()) {
                    let bayes = eps_by_bayes(&components, ab, bb, x);
                    assert!(
                        (o - bayes).abs() < 1e-8 * bayes.abs().max(1.0),
                        "{name}, t = {t}, x_t = {x}: oracle {o} vs Bayes {bayes}"
                    );
                }
            }
        }
    }
}

/// Laws in d = 2 for the Monte Carlo tests.
fn laws_2d() -> Vec<(&'static str, DataLaw)> {
    vec![
        ("dirac", DataLaw::dirac(array![0.5, -0.25]).unwrap()),
        ("standard normal", DataLaw::standard_normal(2).unwrap()),
        (
            "finite set",
            DataLaw::finite(
                array![0.2, 0.5, 0.3],
                array![[-1.0, 1.0], [0.5, 0.5], [0.2, -0.9]],
            )
            .unwrap(),
        ),
        (
            "mixture",
            DataLaw::mixture(
                array![0.5, 0.5],
                array![[-0.6, 0.0], [0.6, 0.3]],
                array![0.3, 0.15],
            )
            .unwrap(),
        ),
    ]
}

/// A direction h(x_t) in which to move the oracle.
type Perturbation = fn(&Array2<f64>) -> Array2<f64>;

#[test]
fn oracle_beats_every_perturbation() {
    // For ε̂ = ε* + δh: L(ε̂) − L(ε*) = δ² E‖h‖² − 2δ E⟨ε − ε*, h⟩ and the cross term is 0.
    // K = 30 batches of n = 2000, common random numbers within a batch; the paired
    // difference minus δ²‖h‖² (both per batch) must be within 4 standard errors of 0.
    let schedule = Schedule::new(ScheduleKind::Article, 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(73);
    let perturbations: Vec<(&str, Perturbation)> = vec![
        ("constant", |x| {
            Array2::from_shape_fn(x.raw_dim(), |(_, j)| if j == 0 { 1.0 } else { -0.5 })
        }),
        ("sine", |x| x.mapv(|v| (3.0 * v).sin())),
        ("coupled", |x| {
            let s = x.sum_axis(Axis(1)).insert_axis(Axis(1));
            &s * 0.3 + x * 0.1
        }),
    ];
    let (k, n) = (30, 2000);
    for (law_name, law) in laws_2d() {
        for t in [5, 200, 800] {
            for (h_name, h) in &perturbations {
                for delta in [0.3, -0.3, 0.05, -0.05] {
                    let mut excess = Vec::with_capacity(k);
                    let mut deviation = Vec::with_capacity(k);
                    for _ in 0..k {
                        let x0 = law.sample(n, &mut rng).unwrap();
                        let eps = standard_normal(n, 2, &mut rng);
                        let best = loss8(&schedule, &x0, &eps, t, |x, t| {
                            law.optimal_eps(&schedule, x, t).unwrap()
                        })
                        .unwrap();
                        let worse = loss8(&schedule, &x0, &eps, t, |x, t| {
                            law.optimal_eps(&schedule, x, t).unwrap() + h(x) * delta
                        })
                        .unwrap();
                        let xt = marginal_sample(&schedule, &x0, t, &eps).unwrap();
                        let h_sq = h(&xt).mapv(|v| v * v).sum() / n as f64;
                        excess.push(worse - best);
                        deviation.push(worse - best - delta * delta * h_sq);
                    }
                    let e = estimate(Array1::from(excess).view());
                    let dev = estimate(Array1::from(deviation).view());
                    let what = format!("{law_name}, t = {t}, h = {h_name}, δ = {delta}");
                    assert!(
                        e.mean > 0.0,
                        "{what}: the perturbation improved the loss by {}",
                        -e.mean
                    );
                    assert!(
                        dev.mean.abs() < 4.0 * dev.se.max(1e-15),
                        "{what}: cross term {} (se {})",
                        dev.mean,
                        dev.se
                    );
                }
            }
        }
    }
}

#[test]
fn minimum_loss_matches_closed_form() {
    // Monte Carlo loss of the oracle from K = 40 batches of n = 2500 against 0 (Dirac), d ᾱ_t²
    // (standard normal) and d ᾱ_t² s²/v_t (Gaussian), within 4 standard errors; for every law
    // also the identity min loss = d − E‖ε*‖².
    let mut rng = StdRng::seed_from_u64(79);
    let (k, n, d) = (40, 2500, 3);
    let (m, s) = (0.2, 0.6);
    let gaussian = DataLaw::mixture(array![1.0], array![[m, -m, 0.0]], array![s]).unwrap();
    let mixture = DataLaw::mixture(
        array![0.4, 0.6],
        array![[-0.5, 0.0, 0.5], [0.5, 0.2, -0.3]],
        array![0.2, 0.4],
    )
    .unwrap();
    let dirac = DataLaw::dirac(array![0.1, 0.2, 0.3]).unwrap();
    let normal = DataLaw::standard_normal(d).unwrap();
    for schedule in [
        Schedule::new(ScheduleKind::Article, 1000).unwrap(),
        Schedule::new(ScheduleKind::Cosine, 100).unwrap(),
    ] {
        let t_max = schedule.t_max();
        for t in [1, t_max / 10, t_max / 2, t_max] {
            let (ab, bb) = (schedule.alpha_bars()[t], schedule.beta_bars()[t]);
            let v = ab * ab * s * s + bb * bb;
            let closed: [(&str, &DataLaw, Option<f64>); 4] = [
                ("dirac", &dirac, Some(0.0)),
                ("standard normal", &normal, Some(d as f64 * ab * ab)),
                ("gaussian", &gaussian, Some(d as f64 * ab * ab * s * s / v)),
                ("mixture", &mixture, None),
            ];
            for (name, law, expected) in closed {
                let mut losses = Vec::with_capacity(k);
                let mut energies = Vec::with_capacity(k);
                for _ in 0..k {
                    let x0 = law.sample(n, &mut rng).unwrap();
                    let eps = standard_normal(n, d, &mut rng);
                    losses.push(
                        loss8(&schedule, &x0, &eps, t, |x, t| {
                            law.optimal_eps(&schedule, x, t).unwrap()
                        })
                        .unwrap(),
                    );
                    let xt = marginal_sample(&schedule, &x0, t, &eps).unwrap();
                    energies.push(
                        d as f64
                            - law
                                .optimal_eps(&schedule, &xt, t)
                                .unwrap()
                                .mapv(|e| e * e)
                                .sum()
                                / n as f64,
                    );
                }
                let loss = estimate(Array1::from(losses).view());
                let energy = estimate(Array1::from(energies).view());
                let what = format!("T = {t_max}, t = {t}, {name}");
                if let Some(expected) = expected {
                    assert!(
                        (loss.mean - expected).abs() < 4.0 * loss.se + 1e-12,
                        "{what}: min loss {} vs {expected} (se {})",
                        loss.mean,
                        loss.se
                    );
                    assert!(
                        (energy.mean - expected).abs() < 4.0 * energy.se + 1e-12,
                        "{what}: d − E‖ε*‖² = {} vs {expected}",
                        energy.mean
                    );
                    let reported = law.min_loss(&schedule, t).unwrap().unwrap();
                    assert!(
                        (reported - expected).abs() <= 1e-12 * expected.max(1.0),
                        "{what}: min_loss {reported} vs {expected}"
                    );
                } else {
                    let se = loss.se.hypot(energy.se);
                    assert!(
                        (loss.mean - energy.mean).abs() < 4.0 * se,
                        "{what}: {} vs d − E‖ε*‖² = {}",
                        loss.mean,
                        energy.mean
                    );
                }
            }
        }
    }
}
