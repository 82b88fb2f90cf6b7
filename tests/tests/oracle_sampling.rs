//! Oracle-driven sampling: the tch `Sampler` with the tch oracle of a known 2-D Gaussian
//! mixture as its model must reproduce the mixture. The oracle is the exact E[ε|x_t], so what
//! is left is the sampler's own error: this isolates the sampling loop.
//!
//! Design (seeded): the article's schedule with T = 1000, n = 2000 samples per run. Each
//! sample is assigned to the component of highest responsibility under the mixture
//! (components ≥ 9 of their stds apart, so misassignment has probability < 1e-5); each run
//! gives 3 weights, 6 means and 6 variances, 15 tests.
//!
//! 1. Against the mixture itself, where the sampler's own error is negligible: all T = 1000
//!    steps with the posterior σ, with σ_t = β_t (and the final noise), DDIM η = 0 and η = 1
//!    over all 1000 steps. Tests: |n_k − n w_k| ≤ z sqrt(n w_k (1 − w_k)) (normal approximation
//!    to the binomial, n w_k ≥ 400); per coordinate |x̄ − m| ≤ z s_k/sqrt(n_k) + 0.01 s_k and
//!    |S²/s_k² − 1| ≤ z sqrt(2/(n_k − 1)) + 0.02 (χ² with ≥ 300 degrees of freedom, normal
//!    approximation). The slacks 0.01 and 0.02 budget the discretisation error of 1000 steps
//!    (measured with the reference sampler: variance ratios within 3% of 1, which is sampling
//!    noise at this n).
//! 2. Against the reference sampler on the same law, where the sampler's error is not
//!    negligible: DDIM over 50 strided steps with η = 0 and η = 1. Fifty steps under-disperse
//!    narrow components (the reference itself gives variance ratios ≈ 0.9 for η = 0 and ≈ 0.74
//!    for η = 1 here), so the tch samples must match the reference's samples: two-proportion
//!    z-tests for the weights, two-sample z-tests for the means, and ln(S₁²/S₂²) against its
//!    N(0, 2/(n₁−1) + 2/(n₂−1)) approximation for the variances.
//!
//!    The strided ancestral sampler (posterior σ on the respaced chain) is compared with the
//!    reference's DDIM η = 1 over the same 50 steps, which it equals.
//!
//! 7 runs × 15 = 105 tests at family-wise significance 1e-3 (Bonferroni: each two-sided at
//! 1e-3/105, z = 4.42). A wrong step fails by far more: a σ_t = 0 sampler collapses the
//! variances, a missing β̄ factor moves the means by whole stds.

use ddpm::oracle::{DataLaw, Oracle};
use ddpm::sampler::{Sampler, SamplerConfig};
use ddpm::schedule::{Schedule, ScheduleKind};
use ddpm::sigma::SigmaChoice;
use ddpm_tests::{array2, single_thread, tensor, test_device};
use ndarray::{array, Array2, Axis};
use rand::rngs::StdRng;
use rand::SeedableRng;
use statrs::distribution::{ContinuousCDF, Normal};
use tch::{Device, Kind, Tensor};

const N: usize = 2000;
const FAMILY_ALPHA: f64 = 1e-3;
const TESTS: f64 = 105.0;
const MEAN_SLACK: f64 = 0.01;
const VAR_SLACK: f64 = 0.02;

fn z_crit() -> f64 {
    Normal::new(0.0, 1.0)
        .unwrap()
        .inverse_cdf(1.0 - FAMILY_ALPHA / TESTS / 2.0)
}

struct Law {
    weights: [f64; 3],
    means: Array2<f64>,
    stds: [f64; 3],
}

fn law() -> Law {
    Law {
        weights: [0.5, 0.3, 0.2],
        means: array![[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]],
        stds: [0.3, 0.2, 0.25],
    }
}

fn tch_law(l: &Law, device: Device) -> DataLaw {
    DataLaw::mixture(
        &Tensor::from_slice(&l.weights).to_device(device),
        &tensor(&l.means, Kind::Double, device),
        &Tensor::from_slice(&l.stds).to_device(device),
    )
    .unwrap()
}

/// Component of highest w_k N(x; m_k, s_k² I) for each row.
fn assign(l: &Law, x: &Array2<f64>) -> Vec<usize> {
    x.rows()
        .into_iter()
        .map(|row| {
            (0..3)
                .map(|k| {
                    let d2: f64 = row
                        .iter()
                        .zip(l.means.row(k))
                        .map(|(a, b)| (a - b).powi(2))
                        .sum();
                    (
                        k,
                        l.weights[k].ln() - 2.0 * l.stds[k].ln() - d2 / (2.0 * l.stds[k].powi(2)),
                    )
                })
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
                .0
        })
        .collect()
}

/// Per component: count, per-coordinate mean and variance.
struct Stats {
    counts: [f64; 3],
    means: [[f64; 2]; 3],
    vars: [[f64; 2]; 3],
}

fn stats(what: &str, l: &Law, x: &Array2<f64>) -> Stats {
    assert!(
        x.iter().all(|v| v.is_finite()),
        "{what}: non-finite samples"
    );
    let labels = assign(l, x);
    let mut st = Stats {
        counts: [0.0; 3],
        means: [[0.0; 2]; 3],
        vars: [[0.0; 2]; 3],
    };
    for k in 0..3 {
        let idx: Vec<usize> = (0..x.nrows()).filter(|&i| labels[i] == k).collect();
        assert!(
            idx.len() > 10,
            "{what}: component {k} has only {} samples",
            idx.len()
        );
        let xs = x.select(Axis(0), &idx);
        let (mean, var) = (xs.mean_axis(Axis(0)).unwrap(), xs.var_axis(Axis(0), 1.0));
        st.counts[k] = idx.len() as f64;
        st.means[k] = [mean[0], mean[1]];
        st.vars[k] = [var[0], var[1]];
    }
    st
}

fn check_matches_law(what: &str, l: &Law, x: &Array2<f64>) {
    let z = z_crit();
    let st = stats(what, l, x);
    let n = x.nrows() as f64;
    for k in 0..3 {
        let (nk, w, s) = (st.counts[k], l.weights[k], l.stds[k]);
        let bound = z * (n * w * (1.0 - w)).sqrt();
        assert!(
            (nk - n * w).abs() <= bound,
            "{what}: component {k} has {nk} of {n} samples, expected {:.0} ± {bound:.0} (z = {z:.2}, n = {n}, family α = {FAMILY_ALPHA})",
            n * w
        );
        for c in 0..2 {
            let m_bound = z * s / nk.sqrt() + MEAN_SLACK * s;
            let m_err = st.means[k][c] - l.means[[k, c]];
            assert!(
                m_err.abs() <= m_bound,
                "{what}: component {k}, coordinate {c}: mean off by {m_err:.4}, bound {m_bound:.4} (n_k = {nk}, family α = {FAMILY_ALPHA})"
            );
            let v_ratio = st.vars[k][c] / (s * s);
            let v_bound = z * (2.0 / (nk - 1.0)).sqrt() + VAR_SLACK;
            assert!(
                (v_ratio - 1.0).abs() <= v_bound,
                "{what}: component {k}, coordinate {c}: variance ratio {v_ratio:.4}, bound 1 ± {v_bound:.4} (n_k = {nk}, family α = {FAMILY_ALPHA})"
            );
        }
    }
}

/// Two-sample tests of `x` (tch) against `y` (reference), as described at the top.
fn check_matches_sample(what: &str, l: &Law, x: &Array2<f64>, y: &Array2<f64>) {
    let z = z_crit();
    let (a, b) = (
        stats(what, l, x),
        stats(&format!("{what} (reference)"), l, y),
    );
    let (n1, n2) = (x.nrows() as f64, y.nrows() as f64);
    for k in 0..3 {
        let (p1, p2) = (a.counts[k] / n1, b.counts[k] / n2);
        let p = (a.counts[k] + b.counts[k]) / (n1 + n2);
        let zw = (p1 - p2) / (p * (1.0 - p) * (1.0 / n1 + 1.0 / n2)).sqrt();
        assert!(zw.abs() <= z, "{what}: component {k} weight {p1:.4} vs reference {p2:.4}, z = {zw:.2} > {z:.2} (n = {n1} + {n2}, family α = {FAMILY_ALPHA})");
        let (m1, m2) = (a.counts[k], b.counts[k]);
        for c in 0..2 {
            let se = (a.vars[k][c] / m1 + b.vars[k][c] / m2).sqrt();
            let zm = (a.means[k][c] - b.means[k][c]) / se;
            assert!(zm.abs() <= z, "{what}: component {k}, coordinate {c}: mean {:.4} vs reference {:.4}, z = {zm:.2} (family α = {FAMILY_ALPHA})", a.means[k][c], b.means[k][c]);
            let zv =
                (a.vars[k][c] / b.vars[k][c]).ln() / (2.0 / (m1 - 1.0) + 2.0 / (m2 - 1.0)).sqrt();
            assert!(zv.abs() <= z, "{what}: component {k}, coordinate {c}: variance {:.5} vs reference {:.5}, z = {zv:.2} (family α = {FAMILY_ALPHA})", a.vars[k][c], b.vars[k][c]);
        }
    }
}

fn configurations() -> Vec<(&'static str, SamplerConfig)> {
    let base = SamplerConfig {
        clip_final: false,
        seed: Some(2024),
        ..SamplerConfig::default()
    };
    vec![
        (
            "ancestral, posterior σ",
            SamplerConfig {
                sigma: SigmaChoice::Posterior,
                ..base.clone()
            },
        ),
        (
            "ancestral, σ_t = β_t",
            SamplerConfig {
                sigma: SigmaChoice::Beta,
                final_noise: true,
                ..base.clone()
            },
        ),
        (
            "DDIM η = 0, all 1000 steps",
            SamplerConfig {
                eta: Some(0.0),
                ..base.clone()
            },
        ),
        (
            "DDIM η = 1, all 1000 steps",
            SamplerConfig {
                eta: Some(1.0),
                ..base
            },
        ),
    ]
}

fn oracle_sampling_reproduces_the_mixture(device: Device) {
    single_thread();
    let l = law();
    let schedule = Schedule::new(ScheduleKind::Article, 1000, device).unwrap();
    let oracle = Oracle::new(tch_law(&l, device), &schedule);
    for (what, cfg) in configurations() {
        let sampler = Sampler::new(&schedule, cfg).unwrap();
        let x = sampler.sample(&oracle, &[N as i64, 2], device).unwrap();
        assert_eq!(x.kind(), Kind::Float);
        check_matches_law(what, &l, &array2(&x));
    }
}
test_device!(
    oracle_sampling_reproduces_the_mixture,
    oracle_sampling_reproduces_the_mixture_cpu,
    oracle_sampling_reproduces_the_mixture_cuda
);

fn strided_sampling_matches_the_reference_sampler(device: Device) {
    single_thread();
    let l = law();
    let schedule = Schedule::new(ScheduleKind::Article, 1000, device).unwrap();
    let oracle = Oracle::new(tch_law(&l, device), &schedule);
    let r = ddpm_reference::Schedule::new(ddpm_reference::ScheduleKind::Article, 1000).unwrap();
    let law_ref = ddpm_reference::oracle::DataLaw::mixture(
        ndarray::Array1::from(l.weights.to_vec()),
        l.means.clone(),
        ndarray::Array1::from(l.stds.to_vec()),
    )
    .unwrap();
    // The strided ancestral sampler with the posterior σ (on the respaced chain) is strided
    // DDPM, i.e. DDIM η = 1 over the same steps.
    let ddim = |eta: f64| SamplerConfig {
        eta: Some(eta),
        ..SamplerConfig::default()
    };
    let ancestral = SamplerConfig {
        sigma: SigmaChoice::Posterior,
        ..SamplerConfig::default()
    };
    let runs = [
        (7u64, 0.0, "DDIM η = 0", ddim(0.0)),
        (8, 1.0, "DDIM η = 1", ddim(1.0)),
        (9, 1.0, "strided ancestral, posterior σ", ancestral),
    ];
    for (seed, eta, name, base) in runs {
        let what = format!("{name}, 50 steps, against the reference's DDIM η = {eta}");
        let cfg = SamplerConfig {
            steps: Some(50),
            clip_final: false,
            seed: Some(seed as i64),
            ..base
        };
        let x = array2(
            &Sampler::new(&schedule, cfg)
                .unwrap()
                .sample(&oracle, &[N as i64, 2], device)
                .unwrap(),
        );
        let mut rng = StdRng::seed_from_u64(seed);
        let x_t = ddpm_reference::marginal::standard_normal(N, 2, &mut rng);
        let predictor = |x: &Array2<f64>, t: usize| law_ref.optimal_eps(&r, x, t).unwrap();
        let y =
            ddpm_reference::sampler::ddim_sample(&r, 50, eta, x_t, predictor, &mut rng).unwrap();
        check_matches_sample(&what, &l, &x, &y);
    }
}
test_device!(
    strided_sampling_matches_the_reference_sampler,
    strided_sampling_matches_the_reference_sampler_cpu,
    strided_sampling_matches_the_reference_sampler_cuda
);

/// The check above is able to fail: draws from the wrong law (the right components with
/// stds 20% too large, or the weights swapped) are rejected, draws from the law itself pass.
#[test]
fn the_mixture_check_rejects_a_wrong_law() {
    tch::manual_seed(11);
    let l = law();
    let exact = array2(&tch_law(&l, Device::Cpu).sample(N as i64, Kind::Double, Device::Cpu));
    check_matches_law("exact draws", &l, &exact);
    let wide = Law {
        stds: [0.36, 0.24, 0.3],
        ..law()
    };
    let wide_draws =
        array2(&tch_law(&wide, Device::Cpu).sample(N as i64, Kind::Double, Device::Cpu));
    assert!(std::panic::catch_unwind(|| check_matches_law("too wide", &l, &wide_draws)).is_err());
    let swapped = Law {
        weights: [0.3, 0.5, 0.2],
        ..law()
    };
    let swapped_draws =
        array2(&tch_law(&swapped, Device::Cpu).sample(N as i64, Kind::Double, Device::Cpu));
    assert!(
        std::panic::catch_unwind(|| check_matches_law("swapped weights", &l, &swapped_draws))
            .is_err()
    );
}

/// With the Dirac oracle of c every sampler returns c exactly, whatever the noise: the last
/// step from τ_1 = 1 is x̂_0 = (x_1 − β̄_1 ε*)/ᾱ_1 = c for DDIM (any η: σ = 0 into τ′ = 0),
/// and μ(x_1) = c for the ancestral sampler without final noise (any σ choice, all T steps or
/// strided on the respaced chain). A sampler that stops before the step to 0 returns x_1 and
/// misses c by about β̄_1. Float sampling: the last step is ~10 roundings (u = 6e-8) of values
/// ≲ (|x_1| + |c|)/ᾱ_1 ≤ 6/ᾱ_1, so |x − c| ≤ 1e-5/ᾱ_1 leaves a factor 3.
fn dirac_oracle_sampling_returns_the_point(device: Device) {
    use ddpm_tests::{check, eta, schedule, sigma, stride_len};
    use proptest::prelude::*;
    let strategy = (schedule(), sigma(), eta(), any::<bool>(), any::<u64>()).prop_flat_map(
        |((spec, big_t), sig, eta, ddim, sd)| {
            (
                Just(spec),
                Just(big_t),
                stride_len(big_t),
                Just(sig),
                Just(eta),
                Just(ddim),
                Just(sd),
            )
        },
    );
    check(48, strategy, |(spec, big_t, n, choice, eta, ddim, sd)| {
        // τ_1 = 1 needs n ≥ 2 (n = 1 jumps T → 0 directly); T ≤ 300 keeps the run short.
        prop_assume!(n >= 2 && big_t <= 300);
        let s = spec.tch(big_t, device);
        let r = spec.reference(big_t);
        let c = ddpm_tests::normal(1, 3, sd).mapv(|v| v.tanh());
        let law = DataLaw::dirac(&tensor(&c, Kind::Double, device).squeeze_dim(0)).unwrap();
        let oracle = Oracle::new(law, &s);
        let cfg = SamplerConfig {
            sigma: choice.tch(),
            eta: ddim.then_some(eta),
            steps: Some(n),
            clip_final: false,
            final_noise: false,
            seed: Some(sd as i64 & 0xffff),
            ..SamplerConfig::default()
        };
        let x = array2(
            &Sampler::new(&s, cfg)
                .unwrap()
                .sample(&oracle, &[4, 3], device)
                .unwrap(),
        );
        let tol = 1e-5 / r.alpha_bar(1).unwrap();
        for row in x.rows() {
            let err = row
                .iter()
                .zip(c.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            prop_assert!(
                err <= tol,
                "sample {:?} misses c = {:?} by {:e} > {:e}",
                row,
                c,
                err,
                tol
            );
        }
        Ok(())
    });
}
test_device!(
    dirac_oracle_sampling_returns_the_point,
    dirac_oracle_sampling_returns_the_point_cpu,
    dirac_oracle_sampling_returns_the_point_cuda
);
