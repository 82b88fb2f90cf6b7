//! Section 12 of docs/derivations.md: the Min-SNR-γ weighting. (a) The ε-loss and the x₀-loss
//! of the same prediction differ by exactly SNR_t, so min(SNR_t, γ)/SNR_t on the ε-loss is
//! min(SNR_t, γ) on the x₀-loss; (b) a positive weight per t leaves the minimiser alone: with
//! the exact oracle of a mixture law, every perturbation ε̂ = ε* + δh raises the Min-SNR-γ
//! population loss, by E[w_t δ²‖h‖²].

use ddpm_proofs::stats::estimate;
use ddpm_reference::loss::{euclidean_loss, min_snr_loss, min_snr_weight};
use ddpm_reference::marginal::{marginal_sample, predicted_x0, standard_normal};
use ddpm_reference::oracle::DataLaw;
use ddpm_reference::{Schedule, ScheduleKind};
use ndarray::{array, Array1, Array2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// SNR_t = ᾱ_t²/β̄_t², written out here from the schedule's tables.
fn snr_by_definition(schedule: &Schedule, t: usize) -> f64 {
    let (ab, bb) = (
        schedule.alpha_bar(t).unwrap(),
        schedule.beta_bar(t).unwrap(),
    );
    ab * ab / (bb * bb)
}

#[test]
fn eps_loss_is_snr_times_x0_loss_and_min_snr_is_the_clamped_x0_loss() {
    // Per sample: x̂₀ = (x_t − β̄_t ε̂)/ᾱ_t from the reference's marginal and x̂₀, so
    // x₀ − x̂₀ = (β̄_t/ᾱ_t)(ε̂ − ε) and ‖ε − ε̂‖² = SNR_t ‖x₀ − x̂₀‖². The only roundoff is in
    // x_t (≲ 1e-16·(|x₀| + |ε|)), magnified by 1/ᾱ_t in x̂₀ but compared with
    // |x₀ − x̂₀| ≥ (β̄_t/ᾱ_t)|ε − ε̂|: relative error ≲ 1e-16·5/(β̄_1 |ε − ε̂|) ≲ 1e-12 at the
    // smallest β̄_1 here (4.5e-3); 1e-9 is ample. Any SNR_t^p with p ≠ 1, or β̄_t for β̄_t², is
    // off by orders of magnitude at most t.
    let mut rng = StdRng::seed_from_u64(151);
    let (n, d) = (50, 4);
    for schedule in [
        Schedule::new(ScheduleKind::Article, 1000).unwrap(),
        Schedule::new(ScheduleKind::Cosine, 100).unwrap(),
        Schedule::new(ScheduleKind::Linear, 1000).unwrap(),
    ] {
        let t_max = schedule.t_max();
        let mut ts = vec![1, 2, t_max / 2, t_max];
        ts.extend((0..8).map(|_| rng.random_range(1..=t_max)));
        for t in ts {
            let x0 = standard_normal(n, d, &mut rng) * 0.5;
            let eps = standard_normal(n, d, &mut rng);
            // An arbitrary prediction, near ε as a trained network's would be and far off.
            let eps_hat = &eps + &(standard_normal(n, d, &mut rng) * 0.3);
            let xt = marginal_sample(&schedule, &x0, t, &eps).unwrap();
            let x0_hat = predicted_x0(&schedule, &xt, t, &eps_hat).unwrap();
            let snr = snr_by_definition(&schedule, t);
            let eps_sq = (&eps - &eps_hat).mapv(|v| v * v).sum_axis(Axis(1));
            let x0_sq = (&x0 - &x0_hat).mapv(|v| v * v).sum_axis(Axis(1));
            for (e, x) in eps_sq.iter().zip(x0_sq.iter()) {
                assert!(
                    (e - snr * x).abs() <= 1e-9 * e,
                    "t = {t}: ‖ε − ε̂‖² = {e}, SNR_t ‖x₀ − x̂₀‖² = {}",
                    snr * x
                );
            }
            let x0_loss = x0_sq.sum() / n as f64;
            for gamma in [0.5, 5.0, 50.0] {
                let got =
                    min_snr_loss(&schedule, &x0, &eps, t, gamma, |_, _| eps_hat.clone()).unwrap();
                let want = snr.min(gamma) * x0_loss;
                assert!(
                    (got - want).abs() <= 1e-9 * want,
                    "t = {t}, γ = {gamma}: Min-SNR-γ loss {got}, min(SNR_t, γ)·x₀-loss {want}"
                );
            }
        }
    }
}

/// A direction h(x_t, t) in which to move the oracle.
type Perturbation = fn(&Array2<f64>, usize) -> Array2<f64>;

#[test]
fn min_snr_loss_is_minimised_by_the_oracle() {
    // The population loss Σ_{t∈S} E[w_t ‖ε − ε̂(x_t, t)‖²] over a spread of t with weights
    // w_t = min(SNR_t, γ)/SNR_t both < 1 (clamped) and = 1. For ε̂ = ε* + δh its excess over
    // the oracle is Σ_t w_t (δ² E‖h‖² − 2δ E⟨ε − ε*, h⟩), and the cross term is 0 because w_t
    // is a constant given t and ε − ε* is orthogonal to every function of x_t (section 7).
    // K = 30 batches of n = 2000, common random numbers within a batch: the mean excess must
    // be > 0 and its deviation from δ² Σ_t w_t ‖h‖² within 4 standard errors of 0 (Student t
    // with 29 degrees of freedom: two-sided α ≈ 4e-4 per check, 48 checks).
    let law = DataLaw::mixture(
        array![0.3, 0.7],
        array![[-0.6, 0.4], [0.5, -0.2]],
        array![0.15, 0.35],
    )
    .unwrap();
    let perturbations: Vec<(&str, Perturbation)> = vec![
        ("constant", |x, _| {
            Array2::from_shape_fn(x.raw_dim(), |(_, j)| if j == 0 { 1.0 } else { -0.5 })
        }),
        ("sine", |x, _| x.mapv(|v| (3.0 * v).sin())),
        ("t-dependent", |x, t| {
            let s = x.sum_axis(Axis(1)).insert_axis(Axis(1));
            (&s * 0.3 + x * 0.1) * (1.0 + (t as f64).ln())
        }),
    ];
    let mut rng = StdRng::seed_from_u64(157);
    let (k, n) = (30, 2000);
    for (schedule, ts) in [
        (
            Schedule::new(ScheduleKind::Article, 1000).unwrap(),
            vec![1, 10, 50, 200, 600, 1000],
        ),
        (
            Schedule::new(ScheduleKind::Cosine, 100).unwrap(),
            vec![1, 5, 20, 50, 80, 100],
        ),
    ] {
        for gamma in [1.0, 5.0] {
            let w: Vec<f64> = ts
                .iter()
                .map(|&t| min_snr_weight(&schedule, t, gamma).unwrap())
                .collect();
            assert!(
                w.iter().any(|&w| w < 0.5) && w.contains(&1.0),
                "the t's must meet both branches of the min: {w:?}"
            );
            for (h_name, h) in &perturbations {
                for delta in [0.3, -0.05] {
                    let mut excess = Vec::with_capacity(k);
                    let mut deviation = Vec::with_capacity(k);
                    for _ in 0..k {
                        let (mut best, mut worse, mut predicted) = (0.0, 0.0, 0.0);
                        for &t in &ts {
                            let x0 = law.sample(n, &mut rng).unwrap();
                            let eps = standard_normal(n, 2, &mut rng);
                            let oracle = |x: &Array2<f64>, t: usize| {
                                law.optimal_eps(&schedule, x, t).unwrap()
                            };
                            best += min_snr_loss(&schedule, &x0, &eps, t, gamma, oracle).unwrap();
                            worse += min_snr_loss(&schedule, &x0, &eps, t, gamma, |x, t| {
                                oracle(x, t) + h(x, t) * delta
                            })
                            .unwrap();
                            let xt = marginal_sample(&schedule, &x0, t, &eps).unwrap();
                            let h_sq =
                                euclidean_loss(&h(&xt, t), &Array2::zeros(xt.raw_dim())).unwrap();
                            predicted +=
                                min_snr_weight(&schedule, t, gamma).unwrap() * delta * delta * h_sq;
                        }
                        excess.push(worse - best);
                        deviation.push(worse - best - predicted);
                    }
                    let e = estimate(Array1::from(excess).view());
                    let dev = estimate(Array1::from(deviation).view());
                    let what = format!(
                        "T = {}, γ = {gamma}, h = {h_name}, δ = {delta}",
                        schedule.t_max()
                    );
                    assert!(
                        e.mean > 0.0,
                        "{what}: the perturbation lowered the loss by {}",
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
