//! DPM-Solver++(2M): the step the product runs (`Sampler::dpm_solver().step`, the code of the
//! sampling loop) equals the reference's `DpmSolver::step` on random schedules, spacings, step
//! counts and inputs, f64 and f32; both sides walk the same steps; and the whole loop
//! (`Sampler::sample` with `dpm_solver`) driven by the exact oracle equals the reference's
//! `dpm_solver::sample` from the same x_T.

use ddpm::oracle::Oracle;
use ddpm::sampler::{Sampler, SamplerConfig};
use ddpm::timesteps::Spacing;
use ddpm_reference::dpm_solver as rd;
use ddpm_reference::timesteps::Spacing as RefSpacing;
use ddpm_tests::{
    array2, batch_shape, check, close_scaled, normal, round_f32, schedule, seed, single_thread,
    tensor, test_device, values, ScheduleSpec, F32_MIN_ALPHA_BAR,
};
use ndarray::Array2;
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// Both sides' spacing of one kind.
fn spacings() -> impl Strategy<Value = (Spacing, RefSpacing)> {
    prop_oneof![
        Just((Spacing::Strided, RefSpacing::Strided)),
        Just((Spacing::Linspace, RefSpacing::Linspace)),
        Just((Spacing::Leading, RefSpacing::Leading)),
        Just((Spacing::Trailing, RefSpacing::Trailing)),
    ]
}

/// (schedule, T ≥ 2, spacing, n, step index, batch, seed, clip).
type StepCase = (
    ScheduleSpec,
    usize,
    (Spacing, RefSpacing),
    usize,
    usize,
    (usize, usize),
    u64,
    bool,
);

/// n ∈ 1..=T − 1 network evaluations (the most a list without t = 1 allows), a step of the
/// walk (the first, the last and the second often).
fn step_case() -> impl Strategy<Value = StepCase> {
    (schedule(), spacings(), batch_shape(), seed(), any::<bool>())
        .prop_filter("T ≥ 2", |((_, big_t), ..)| *big_t >= 2)
        .prop_flat_map(|((spec, big_t), sp, nd, sd, clip)| {
            let n = prop_oneof![
                Just(1usize),
                Just(big_t - 1),
                1..big_t,
                1..=20.min(big_t - 1)
            ];
            (
                Just(spec),
                Just(big_t),
                Just(sp),
                n,
                Just(nd),
                Just(sd),
                Just(clip),
            )
                .prop_flat_map(|(spec, big_t, sp, n, nd, sd, clip)| {
                    let i = prop_oneof![Just(0usize), Just(n - 1), Just(1.min(n - 1)), 0..n];
                    (
                        Just(spec),
                        Just(big_t),
                        Just(sp),
                        Just(n),
                        i,
                        Just(nd),
                        Just(sd),
                        Just(clip),
                    )
                })
        })
}

/// Tolerances relative to the terms' scale |c_x||x| + |c_d|((1 + |w|) s_0 + |w||x̂_0′|), s_0 =
/// (|x| + β̄|ε̂|)/ᾱ the scale of x̂_0 and w = 1/(2r). f64: both sides compute λ = ln ᾱ − ln β̄ from
/// tables that agree to ~1e-15 relative, so λ carries ~1e-15·|λ| (|λ| up to ~100 for the random
/// schedules, whose ᾱ_T reaches 1e-45) while adjacent steps can differ in λ by only ~1e-5
/// (α_t = 0.99999): h and h′ and so w and c_d are known to ~1e-8 relative on either side;
/// 1e-7 leaves a factor 10. f32: coefficients in f64 rounded once, then at most six products
/// and sums in f32 (u = 6e-8): ≲ 10u ≈ 6e-7; 2e-6 leaves a factor 3.
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-7), (Kind::Float, 2e-6)];

fn dpm_solver_steps_agree(device: Device) {
    check(
        256,
        step_case(),
        |(spec, big_t, (sp, rsp), n, i, (rows, d), sd, clip)| {
            let r = spec.reference(big_t);
            let s = spec.tch(big_t, device);
            let want = rd::DpmSolver::new(
                &r,
                rd::Config {
                    steps: n,
                    spacing: rsp,
                    clip_x0: clip,
                },
            )
            .unwrap();
            let cfg = SamplerConfig {
                steps: Some(n),
                dpm_solver: true,
                spacing: sp,
                clip_each_step: clip,
                ..SamplerConfig::default()
            };
            let sampler = Sampler::new(&s, cfg).unwrap();
            let got = sampler.dpm_solver().unwrap();
            let walked: Vec<(usize, usize)> = got
                .steps()
                .iter()
                .map(|&(a, b)| (a as usize, b as usize))
                .collect();
            prop_assert_eq!(&walked, want.steps());
            prop_assert_eq!(sampler.steps(), got.steps());
            let second = want.is_second_order(i);
            prop_assert_eq!(got.is_second_order(i), second);
            let (from, to) = want.steps()[i];
            let (ab, bb) = (r.alpha_bar(from).unwrap(), r.beta_bar(from).unwrap());
            for (kind, tol) in TOL {
                if kind == Kind::Float
                    && (matches!(spec, ScheduleSpec::Alphas(_)) || ab < F32_MIN_ALPHA_BAR)
                {
                    continue;
                }
                let f = |a: Array2<f64>| {
                    if kind == Kind::Float {
                        round_f32(&a)
                    } else {
                        a
                    }
                };
                let x = f(normal(rows, d, sd) * 1.5);
                let e = f(normal(rows, d, sd ^ 1));
                let prev = f(normal(rows, d, sd ^ 2));
                let prev_ref = second.then_some(&prev);
                let (want_x, want_x0) = want.step(i, &x, &e, prev_ref).unwrap();
                let prev_t = tensor(&prev, kind, device);
                let (got_x, got_x0) = got
                    .step(
                        i,
                        &tensor(&x, kind, device),
                        &tensor(&e, kind, device),
                        second.then_some(&prev_t),
                    )
                    .unwrap();
                // The scales of the terms, with the coefficients recomputed here.
                let lambda = |t: usize| rd::lambda(&r, t).unwrap();
                let h = lambda(to) - lambda(from);
                let c_x = r.beta_bar(to).unwrap() / bb;
                let c_d = (r.alpha_bar(to).unwrap() * (-h).exp_m1()).abs();
                let w = if second {
                    let u = want.steps()[i - 1].0;
                    (0.5 * h / (lambda(from) - lambda(u))).abs()
                } else {
                    0.0
                };
                let s0 = (x.mapv(f64::abs) + e.mapv(f64::abs) * bb) / ab;
                let scale =
                    x.mapv(f64::abs) * c_x + (&s0 * (1.0 + w) + prev.mapv(f64::abs) * w) * c_d;
                let what = format!(
                    "step {i} ({from} → {to}) of {n}, {sp:?}, T = {big_t}, {kind:?}, clip {clip}, second order {second}"
                );
                let flat = |a: &Array2<f64>| a.iter().copied().collect::<Vec<f64>>();
                close_scaled(&what, &values(&got_x), &flat(&want_x), &flat(&scale), tol)?;
                close_scaled(
                    &format!("x̂_0 of {what}"),
                    &values(&got_x0),
                    &flat(&want_x0),
                    &flat(&s0),
                    tol,
                )?;
            }
            Ok(())
        },
    );
}
test_device!(
    dpm_solver_steps_agree,
    dpm_solver_steps_agree_cpu,
    dpm_solver_steps_agree_cuda
);

/// The whole loop in f32 against the reference's f64 solver from the same x_T (libtorch's first
/// draw after the seed, which is the loop's x_T), driven by the exact oracle of a two-component
/// mixture, on the article's schedule at 5, 10 and 20 evaluations and every spacing. The f32
/// loop's error grows with the 2M extrapolation weights (≤ 3 here) over ≤ 20 steps of values
/// ≲ 3: 1e-4 absolute is ~50× the ~2e-6 a run of f32 roundings reaches, and far below the 1e-2
/// by which one wrong step moves the result.
fn dpm_loop_matches_the_reference_sampler(device: Device) {
    single_thread();
    let (weights, means, stds) = (
        vec![0.3, 0.7],
        ndarray::array![[0.5, -0.4], [-0.6, 0.2]],
        vec![0.1, 0.3],
    );
    let law_ref = ddpm_reference::oracle::DataLaw::mixture(
        ndarray::Array1::from(weights.clone()),
        means.clone(),
        ndarray::Array1::from(stds.clone()),
    )
    .unwrap();
    let law = ddpm::oracle::DataLaw::mixture(
        &Tensor::from_slice(&weights).to_device(device),
        &tensor(&means, Kind::Double, device),
        &Tensor::from_slice(&stds).to_device(device),
    )
    .unwrap();
    let s =
        ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Article, 1000, device).unwrap();
    let r = ddpm_reference::Schedule::new(ddpm_reference::ScheduleKind::Article, 1000).unwrap();
    let oracle = Oracle::new(law, &s);
    let sp = [
        (Spacing::Strided, RefSpacing::Strided),
        (Spacing::Linspace, RefSpacing::Linspace),
        (Spacing::Leading, RefSpacing::Leading),
        (Spacing::Trailing, RefSpacing::Trailing),
    ];
    for (k, (sp, rsp)) in sp.into_iter().enumerate() {
        for n in [5usize, 10, 20] {
            let seed = 30 + (k * 3 + n) as i64;
            let cfg = SamplerConfig {
                steps: Some(n),
                dpm_solver: true,
                spacing: sp,
                clip_final: false,
                seed: Some(seed),
                ..SamplerConfig::default()
            };
            let sampler = Sampler::new(&s, cfg).unwrap();
            let got = array2(&sampler.sample(&oracle, &[64, 2], device).unwrap());
            tch::manual_seed(seed);
            let x_t = array2(&Tensor::randn([64, 2], (Kind::Float, device)));
            let rcfg = rd::Config {
                steps: n,
                spacing: rsp,
                clip_x0: false,
            };
            let predictor = |x: &Array2<f64>, t: usize| law_ref.optimal_eps(&r, x, t).unwrap();
            let (want, _) = rd::sample(&r, rcfg, x_t, predictor).unwrap();
            let worst = got
                .iter()
                .zip(want.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-4, "{sp:?}, {n} steps: max |Δ| = {worst:e}");
            // Not trivial: the samples moved away from x_T onto the data's scale.
            let spread = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(spread > 0.3 && spread < 3.0, "{sp:?}, {n} steps: {spread}");
        }
    }
}
test_device!(
    dpm_loop_matches_the_reference_sampler,
    dpm_loop_matches_the_reference_sampler_cpu,
    dpm_loop_matches_the_reference_sampler_cuda
);

/// The sampler's settings are checked: η with DPM-Solver++ is an error, so is n = T with a
/// spacing whose list would need n + 1 ≤ T steps; `Sampler::step` refuses DPM steps.
#[test]
fn dpm_settings_are_checked() {
    let s = ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Article, 50, Device::Cpu)
        .unwrap();
    let base = SamplerConfig {
        steps: Some(10),
        dpm_solver: true,
        ..SamplerConfig::default()
    };
    let with_eta = SamplerConfig {
        eta: Some(0.0),
        ..base.clone()
    };
    assert!(matches!(
        Sampler::new(&s, with_eta),
        Err(ddpm::error::DdpmError::Incompatible {
            key: "dpm_solver",
            ..
        })
    ));
    let all = SamplerConfig {
        steps: None,
        ..base.clone()
    };
    assert!(matches!(
        Sampler::new(&s, all.clone()),
        Err(ddpm::error::DdpmError::OutOfRange {
            key: "sample.steps",
            ..
        })
    ));
    let trailing = SamplerConfig {
        spacing: Spacing::Trailing,
        ..all
    };
    assert_eq!(Sampler::new(&s, trailing).unwrap().steps().len(), 50);
    let sampler = Sampler::new(&s, base).unwrap();
    let x = Tensor::zeros([1, 2], (Kind::Float, Device::Cpu));
    assert!(sampler.step(0, &x, &x, None).is_err());
    assert_eq!(sampler.steps().len(), 10);
    assert_eq!(sampler.steps().last().unwrap().1, 0);
}
