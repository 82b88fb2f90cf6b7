//! The sampler the product runs, step by step, equals the reference's generator steps:
//! `Sampler::step` (the very code of `Sampler::sample`'s loop) for the article's ancestral step
//! and Ho's clipped-x̂_0 step with every σ choice, on the full chain and on the respaced chain of
//! a strided walk, and for DDIM τ → τ′ (plain and clipped) at every η; whole walks chained
//! through `Sampler::step` equal the reference's chains; and the sampler walks the contract's
//! strided steps down to 0.

use ddpm::sampler::{Sampler, SamplerConfig};
use ddpm_reference as reference;
use ddpm_reference::sampler as rs;
use ddpm_reference::timesteps as rt;
use ddpm_tests::{
    batch_shape, check, close_in_norm, close_scaled, eta, normal, round_f32, schedule, seed, sigma,
    stride_len, tensor, test_device, values, ScheduleSpec, SigmaSpec,
};
use ndarray::Array2;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tch::{Device, Kind, Tensor};

/// Tolerances relative to the sum of the absolute values of the terms each result is built
/// from. f64: the schedules agree to ~1e-12 (tests/schedule.rs) and the sampler folds them into
/// its step coefficients in f64; 1e-10 leaves a factor 100. f32: the sampler computes every
/// coefficient in f64 from the f64 tables and rounds it once to f32 (u = 6e-8); the step is
/// then at most three products and two sums in f32, so each result carries ≲ 6u ≈ 4e-7 of its
/// terms' scale; 2e-6 leaves a factor 5.
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 2e-6)];

/// Above this term scale an f32 result may overflow: f32's largest value is 3.4e38, and a
/// step's coefficient (1/α_k of a long stride, ᾱ_τ′/ᾱ_τ of DDIM from a tiny ᾱ_τ) times inputs
/// up to |x| ≈ 10 must stay below it with room for the sums; 1e36 leaves a factor 100.
const F32_RANGE: f64 = 1e36;

/// Draws of x_t, ε̂ and z for a batch [n, d], rounded to f32 for the f32 checks so that the
/// reference sees exactly the f32 inputs.
struct Noise {
    x: Array2<f64>,
    eps_hat: Array2<f64>,
    z: Array2<f64>,
}

fn noise(n: usize, d: usize, sd: u64, kind: Kind) -> Noise {
    let r = |a: Array2<f64>| {
        if kind == Kind::Float {
            round_f32(&a)
        } else {
            a
        }
    };
    // x_t spread like data plus noise, ε̂ around the unit scale, z standard.
    Noise {
        x: r(normal(n, d, sd) * 1.5),
        eps_hat: r(normal(n, d, sd ^ 1)),
        z: r(normal(n, d, sd ^ 2)),
    }
}

fn flat(a: &Array2<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn sampler(s: &ddpm::schedule::Schedule, cfg: SamplerConfig) -> Sampler {
    Sampler::new(s, cfg).expect("a valid sampler configuration")
}

fn config(choice: SigmaSpec, steps: Option<usize>, eta: Option<f64>, clip: bool) -> SamplerConfig {
    SamplerConfig {
        sigma: choice.tch(),
        steps,
        eta,
        clip_each_step: clip,
        ..SamplerConfig::default()
    }
}

/// The error a clipped x̂_0 can carry, as a scale: its unclipped rounding scale
/// (|x| + β̄|ε̂|)/ᾱ, but never more than the width 2 of [−1, 1] (relative to `tol`), which is
/// all clipping can be off by; so a tiny ᾱ (x̂_0 far outside [−1, 1], clipped on both sides)
/// is checked rather than skipped.
fn clipped_x0_scale(x: &Array2<f64>, e: &Array2<f64>, ab: f64, bb: f64, tol: f64) -> Array2<f64> {
    (x.mapv(f64::abs) + e.mapv(f64::abs) * bb).mapv(|v| (v / ab).min(2.0 / tol))
}

/// `close_scaled` in f64, and in f32 wherever the terms stay inside f32's range; where they do
/// not (`scale` > [`F32_RANGE`]), an f32 value must be either within the tolerance or
/// non-finite: the step may overflow, never return a wrong finite number.
fn agrees(
    what: &str,
    kind: Kind,
    got: &[f64],
    want: &Array2<f64>,
    scale: &Array2<f64>,
    tol: f64,
) -> Result<(), TestCaseError> {
    let (want, scale) = (flat(want), flat(scale));
    if kind == Kind::Double || scale.iter().all(|&s| s <= F32_RANGE) {
        return close_scaled(what, got, &want, &scale, tol);
    }
    let keep: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_finite()).collect();
    let pick = |v: &[f64]| keep.iter().map(|&i| v[i]).collect::<Vec<f64>>();
    close_scaled(
        &format!("{what} (f32 beyond its range: finite values only)"),
        &pick(got),
        &pick(&want),
        &pick(&scale),
        tol,
    )
}

/// (schedule, T, σ choice, strided length k, step index into the walk, batch [n, d], seed).
type WalkCase = (
    ScheduleSpec,
    usize,
    SigmaSpec,
    usize,
    usize,
    (usize, usize),
    u64,
);

/// A walk of k ∈ 1..=T steps (k = T: the full chain) and one step of it, the first (from T)
/// and the last (to 0) often.
fn walk_case() -> impl Strategy<Value = WalkCase> {
    (schedule(), sigma(), batch_shape(), seed()).prop_flat_map(|((spec, big_t), sig, nd, sd)| {
        let k = prop_oneof![Just(big_t), stride_len(big_t)];
        (Just(spec), Just(big_t), Just(sig), k, Just(nd), Just(sd)).prop_flat_map(
            |(spec, big_t, sig, k, nd, sd)| {
                let i = prop_oneof![Just(0usize), Just(k - 1), 0..k];
                (
                    Just(spec),
                    Just(big_t),
                    Just(sig),
                    Just(k),
                    i,
                    Just(nd),
                    Just(sd),
                )
            },
        )
    })
}

/// The ancestral step of the sampler at walk index i equals the reference's on the walked
/// chain: the schedule itself for k = T, else `Schedule::respaced` over `timesteps::strided`,
/// at chain index k − i with σ of that chain; plain and clipped, f64 and f32.
fn ancestral_steps_agree(device: Device) {
    check(
        192,
        walk_case(),
        |(spec, big_t, choice, k, i, (n, d), sd)| {
            let r = spec.reference(big_t);
            let s = spec.tch(big_t, device);
            let visited = rt::strided(big_t, k).unwrap();
            let chain = if k == big_t {
                r.clone()
            } else {
                r.respaced(&visited).unwrap()
            };
            let kk = k - i;
            let sigma_t = reference::sigma::sigma(&chain, choice.reference(), kk).unwrap();
            let (a, b, bb, ab) = (
                chain.alpha(kk).unwrap(),
                chain.beta(kk).unwrap(),
                chain.beta_bar(kk).unwrap(),
                chain.alpha_bar(kk).unwrap(),
            );
            for clip in [false, true] {
                let sam = sampler(&s, config(choice, Some(k), None, clip));
                prop_assert_eq!(sam.steps()[i].0 as usize, visited[i]);
                for (kind, tol) in TOL {
                    let nz = noise(n, d, sd, kind);
                    let (x, e, z) = (
                        tensor(&nz.x, kind, device),
                        tensor(&nz.eps_hat, kind, device),
                        tensor(&nz.z, kind, device),
                    );
                    let got = values(&sam.step(i, &x, &e, Some(&z)).unwrap());
                    let what = format!(
                        "{} step {i} of {k} (chain t = {kk}, T = {big_t}), {kind:?}, {choice:?}",
                        if clip { "clipped" } else { "ancestral" }
                    );
                    let (xs, es, zs) = (
                        nz.x.mapv(f64::abs),
                        nz.eps_hat.mapv(f64::abs),
                        nz.z.mapv(f64::abs) * sigma_t,
                    );
                    if clip {
                        let want = rs::ancestral_step_clipped(
                            &chain,
                            &nz.x,
                            kk,
                            &nz.eps_hat,
                            sigma_t,
                            &nz.z,
                        )
                        .unwrap();
                        let c0 = chain.alpha_bar(kk - 1).unwrap() * b * b / (bb * bb);
                        let ct = a * chain.beta_bar(kk - 1).unwrap().powi(2) / (bb * bb);
                        let x0_scale = clipped_x0_scale(&nz.x, &nz.eps_hat, ab, bb, tol);
                        let scale = x0_scale * c0 + &xs * ct + &zs;
                        agrees(&what, kind, &got, &want, &scale, tol)?;
                    } else {
                        let want =
                            rs::ancestral_step(&chain, &nz.x, kk, &nz.eps_hat, sigma_t, &nz.z)
                                .unwrap();
                        let scale = (&xs + &es * (b * b / bb)) / a + &zs;
                        agrees(&what, kind, &got, &want, &scale, tol)?;
                    }
                }
            }
            Ok(())
        },
    );
}
test_device!(
    ancestral_steps_agree,
    ancestral_steps_agree_cpu,
    ancestral_steps_agree_cuda
);

/// (schedule, T, η, strided length k, step index, batch [n, d], seed): pairs from strided
/// lists of random length, so adjacent (τ′ = τ − 1), long jumps and the last step τ′ = 0 occur.
type DdimCase = (ScheduleSpec, usize, f64, usize, usize, (usize, usize), u64);

fn ddim_case() -> impl Strategy<Value = DdimCase> {
    (schedule(), eta(), batch_shape(), seed()).prop_flat_map(|((spec, big_t), eta, nd, sd)| {
        stride_len(big_t).prop_flat_map(move |k| {
            let i = prop_oneof![Just(0usize), Just(k - 1), 0..k];
            (
                Just(spec.clone()),
                Just(big_t),
                Just(eta),
                Just(k),
                i,
                Just(nd),
                Just(sd),
            )
        })
    })
}

/// The DDIM step of the sampler at walk index i (τ → τ′) equals the reference's `ddim_step`,
/// and clipped its `ddim_step_clipped`, in f64 and f32.
fn ddim_steps_agree(device: Device) {
    check(192, ddim_case(), |(spec, big_t, eta, k, i, (n, d), sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let pairs = rt::step_pairs(&rt::strided(big_t, k).unwrap());
        let (tau, next) = pairs[i];
        let (ab, bb) = (r.alpha_bar(tau).unwrap(), r.beta_bar(tau).unwrap());
        let (ab_n, bb_n) = (r.alpha_bar(next).unwrap(), r.beta_bar(next).unwrap());
        let sigma = eta * bb_n / bb * (1.0 - (ab / ab_n).powi(2)).max(0.0).sqrt();
        let keep = (bb_n * bb_n - sigma * sigma).max(0.0).sqrt();
        for clip in [false, true] {
            let sam = sampler(&s, config(SigmaSpec::Beta, Some(k), Some(eta), clip));
            let got_pair = sam.steps()[i];
            prop_assert_eq!((got_pair.0 as usize, got_pair.1 as usize), (tau, next));
            for (kind, tol) in TOL {
                let nz = noise(n, d, sd, kind);
                let (x, e, z) = (
                    tensor(&nz.x, kind, device),
                    tensor(&nz.eps_hat, kind, device),
                    tensor(&nz.z, kind, device),
                );
                let got = values(&sam.step(i, &x, &e, Some(&z)).unwrap());
                let what = format!(
                    "{}DDIM {tau} → {next} (T = {big_t}), η = {eta}, {kind:?}",
                    if clip { "clipped " } else { "" }
                );
                let (xs, es, zs) = (
                    nz.x.mapv(f64::abs),
                    nz.eps_hat.mapv(f64::abs),
                    nz.z.mapv(f64::abs) * sigma,
                );
                if clip {
                    let want = rs::ddim_step_clipped(&r, &nz.x, tau, next, &nz.eps_hat, eta, &nz.z)
                        .unwrap();
                    // x′ = (ᾱ_τ′ − keep ᾱ_τ/β̄_τ) x̂_0 + (keep/β̄_τ) x + σ z, x̂_0 clipped.
                    let x0_scale = clipped_x0_scale(&nz.x, &nz.eps_hat, ab, bb, tol);
                    let scale = x0_scale * (ab_n + keep * ab / bb) + &xs * (keep / bb) + &zs;
                    agrees(&what, kind, &got, &want, &scale, tol)?;
                } else {
                    let want =
                        rs::ddim_step(&r, &nz.x, tau, next, &nz.eps_hat, eta, &nz.z).unwrap();
                    let scale = (&xs + &es * bb) * (ab_n / ab) + &es * keep + &zs;
                    agrees(&what, kind, &got, &want, &scale, tol)?;
                }
            }
        }
        Ok(())
    });
}
test_device!(
    ddim_steps_agree,
    ddim_steps_agree_cpu,
    ddim_steps_agree_cuda
);

/// DDIM with η = 1 over one step t → t − 1 is the ancestral step with the posterior σ (its σ
/// is σ̃_t and its mean μ̃): the sampler's DDIM step on all T steps against the reference's
/// ancestral step, plain and clipped against Ho's clipped step (f64, 1e-10).
fn ddim_eta_one_is_the_posterior_step(device: Device) {
    check(96, walk_case(), |(spec, big_t, _, _, _, (n, d), sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let nz = noise(n, d, sd, Kind::Double);
        let (x, e, z) = (
            tensor(&nz.x, Kind::Double, device),
            tensor(&nz.eps_hat, Kind::Double, device),
            tensor(&nz.z, Kind::Double, device),
        );
        let plain = sampler(&s, config(SigmaSpec::Beta, None, Some(1.0), false));
        let clipped = sampler(&s, config(SigmaSpec::Beta, None, Some(1.0), true));
        for ti in [1, big_t, big_t.div_ceil(2)] {
            let i = big_t - ti;
            let sigma_t = reference::posterior::std(&r, ti).unwrap();
            let (a, b, bb, ab) = (
                r.alpha(ti).unwrap(),
                r.beta(ti).unwrap(),
                r.beta_bar(ti).unwrap(),
                r.alpha_bar(ti).unwrap(),
            );
            let (xs, es, zs) = (
                nz.x.mapv(f64::abs),
                nz.eps_hat.mapv(f64::abs),
                nz.z.mapv(f64::abs) * sigma_t,
            );
            let want = rs::ancestral_step(&r, &nz.x, ti, &nz.eps_hat, sigma_t, &nz.z).unwrap();
            let scale = (&xs + &es * (b * b / bb)) / a + &zs;
            close_scaled(
                &format!("DDIM η = 1, {ti} → {}", ti - 1),
                &values(&plain.step(i, &x, &e, Some(&z)).unwrap()),
                &flat(&want),
                &flat(&scale),
                1e-10,
            )?;
            let want =
                rs::ancestral_step_clipped(&r, &nz.x, ti, &nz.eps_hat, sigma_t, &nz.z).unwrap();
            let scale = clipped_x0_scale(&nz.x, &nz.eps_hat, ab, bb, 1e-10) + &xs + &zs;
            close_scaled(
                &format!("clipped DDIM η = 1, {ti} → {}", ti - 1),
                &values(&clipped.step(i, &x, &e, Some(&z)).unwrap()),
                &flat(&want),
                &flat(&scale),
                1e-10,
            )?;
        }
        Ok(())
    });
}
test_device!(
    ddim_eta_one_is_the_posterior_step,
    ddim_eta_one_is_the_posterior_step_cpu,
    ddim_eta_one_is_the_posterior_step_cuda
);

/// Which generator a whole-walk case runs.
#[derive(Clone, Copy, Debug)]
enum Walk {
    /// The ancestral sampler with this σ choice (on the respaced chain when strided).
    Ancestral(SigmaSpec),
    /// DDIM with this η.
    Ddim(f64),
}

/// (schedule, T, generator, strided length k, clip, batch [n, d], seed).
type ChainCase = (ScheduleSpec, usize, Walk, usize, bool, (usize, usize), u64);

fn chain_case() -> impl Strategy<Value = ChainCase> {
    let walk = prop_oneof![
        sigma().prop_map(Walk::Ancestral),
        eta().prop_map(Walk::Ddim)
    ];
    (schedule(), walk, any::<bool>(), batch_shape(), seed()).prop_flat_map(
        |((spec, big_t), walk, clip, nd, sd)| {
            let k = prop_oneof![Just(big_t), stride_len(big_t)];
            (
                Just(spec),
                Just(big_t),
                Just(walk),
                k,
                Just(clip),
                Just(nd),
                Just(sd),
            )
        },
    )
}

/// Whole walks: x_T → x_0 chained through `Sampler::step`, as the loop chains it (no noise on
/// the last step), against the reference's steps chained on the same x_T, ε̂ and z, for every σ
/// choice, clipped and not, all T steps and strided, and DDIM. The predictor is linear,
/// ε̂ = 0.3 x + 0.1 t/T, so rounding does not grow chaotically: each step maps x to
/// (1 − 0.3 β_k²/β̄_k)/α_k x + … (ancestral) or (ᾱ_τ′/ᾱ_τ)(1 − 0.3 β̄_τ) x + 0.3 keep x + …
/// (DDIM), sums of same-signed terms, so the relative error after k steps is ≲ k·10u ≈ 2e-12
/// at k = 1000; clipping only removes error. 1e-9 (relative to the largest entry) leaves a
/// factor 500, while one step with a wrong coefficient moves the result by far more.
fn sampler_walks_agree(device: Device) {
    check(
        48,
        chain_case(),
        |(spec, big_t, walk, k, clip, (n, d), sd)| {
            let r = spec.reference(big_t);
            let s = spec.tch(big_t, device);
            let visited = rt::strided(big_t, k).unwrap();
            let pairs = rt::step_pairs(&visited);
            let chain = if k == big_t {
                r.clone()
            } else {
                r.respaced(&visited).unwrap()
            };
            let cfg = match walk {
                Walk::Ancestral(choice) => config(choice, Some(k), None, clip),
                Walk::Ddim(eta) => config(SigmaSpec::Beta, Some(k), Some(eta), clip),
            };
            let sam = sampler(&s, cfg);
            let predict_ref = |x: &Array2<f64>, t: usize| x * 0.3 + 0.1 * t as f64 / big_t as f64;
            let predict = |x: &Tensor, t: i64| x * 0.3 + 0.1 * t as f64 / big_t as f64;
            let mut want = normal(n, d, sd);
            let mut got = tensor(&want, Kind::Double, device);
            for (i, &(tau, next)) in pairs.iter().enumerate() {
                let z = if next > 0 {
                    normal(n, d, sd ^ (i as u64 + 3))
                } else {
                    Array2::zeros((n, d))
                };
                let eps_ref = predict_ref(&want, tau);
                want = match walk {
                    Walk::Ancestral(choice) => {
                        let kk = k - i;
                        let sig = reference::sigma::sigma(&chain, choice.reference(), kk).unwrap();
                        if clip {
                            rs::ancestral_step_clipped(&chain, &want, kk, &eps_ref, sig, &z)
                        } else {
                            rs::ancestral_step(&chain, &want, kk, &eps_ref, sig, &z)
                        }
                    }
                    Walk::Ddim(eta) if clip => {
                        rs::ddim_step_clipped(&r, &want, tau, next, &eps_ref, eta, &z)
                    }
                    Walk::Ddim(eta) => rs::ddim_step(&r, &want, tau, next, &eps_ref, eta, &z),
                }
                .unwrap();
                let z = (next > 0).then(|| tensor(&z, Kind::Double, device));
                let eps_hat = predict(&got, tau as i64);
                got = sam.step(i, &got, &eps_hat, z.as_ref()).unwrap();
            }
            close_in_norm(
                &format!("{walk:?}, {k} of T = {big_t} steps, clip {clip}"),
                &values(&got),
                &flat(&want),
                1e-9,
            )
        },
    );
}
test_device!(
    sampler_walks_agree,
    sampler_walks_agree_cpu,
    sampler_walks_agree_cuda
);

/// The respaced chain of a strided ancestral sampler has ᾱ_k = ᾱ_{τ_k} and β̄_k = β̄_{τ_k}
/// (f64, the same 1e-10 as the schedules), so every σ choice applies to it unchanged.
#[test]
fn respaced_chain_keeps_the_visited_marginals() {
    let strategy =
        schedule().prop_flat_map(|(spec, big_t)| (Just(spec), Just(big_t), stride_len(big_t)));
    check(128, strategy, |(spec, big_t, k)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, Device::Cpu);
        let respaced = ddpm::timesteps::Respaced::new(&s, k).unwrap();
        let chain = respaced.schedule();
        prop_assert_eq!(chain.t_max() as usize, k);
        let (ab, bb) = (values(chain.alpha_bars()), values(chain.beta_bars()));
        for (j, &tau) in respaced.visited().iter().rev().enumerate() {
            let tau = tau as usize;
            ddpm_tests::close(
                "respaced ᾱ",
                &[ab[j + 1]],
                &[r.alpha_bar(tau).unwrap()],
                1e-10,
                f64::MIN_POSITIVE,
            )?;
            ddpm_tests::close(
                "respaced β̄",
                &[bb[j + 1]],
                &[r.beta_bar(tau).unwrap()],
                1e-10,
                f64::MIN_POSITIVE,
            )?;
        }
        Ok(())
    });
}

/// The sampler walks exactly the reference's (τ, τ′) pairs: all T steps for the ancestral
/// sampler, the strided list for DDIM, always ending with a step to 0.
#[test]
fn sampler_walks_the_contract_steps() {
    let strategy = (schedule(), eta()).prop_flat_map(|((spec, big_t), eta)| {
        (Just(spec), Just(big_t), stride_len(big_t), Just(eta))
    });
    check(128, strategy, |(spec, big_t, k, eta)| {
        let s = spec.tch(big_t, Device::Cpu);
        let cfg = SamplerConfig {
            eta: Some(eta),
            steps: Some(k),
            ..SamplerConfig::default()
        };
        let got = Sampler::new(&s, cfg).unwrap().steps().to_vec();
        let want = rt::step_pairs(&rt::strided(big_t, k).unwrap());
        let got: Vec<(usize, usize)> = got.iter().map(|&(a, b)| (a as usize, b as usize)).collect();
        prop_assert_eq!(got, want);
        let full = Sampler::new(&s, SamplerConfig::default())
            .unwrap()
            .steps()
            .to_vec();
        let want: Vec<(i64, i64)> = (1..=big_t as i64).rev().map(|t| (t, t - 1)).collect();
        prop_assert_eq!(full, want);
        Ok(())
    });
    let s = ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Article, 100, Device::Cpu)
        .unwrap();
    for bad in [-0.1, 1.5, f64::NAN] {
        assert!(
            Sampler::new(
                &s,
                SamplerConfig {
                    eta: Some(bad),
                    ..SamplerConfig::default()
                }
            )
            .is_err(),
            "η = {bad}"
        );
    }
}
