//! One generator step on the tch side equals the reference's: the article's ancestral step and
//! Ho's clipped-x̂_0 step for every σ choice, the DDIM step for every η and τ → τ′, with one t
//! per sample; and the sampler walks the contract's strided steps down to 0.

use ddpm::sampler::{
    ancestral_step, ancestral_step_clipped, ddim_step, ddim_step_clipped, Sampler, SamplerConfig,
};
use ddpm_reference as reference;
use ddpm_reference::sampler as rs;
use ddpm_tests::{
    batch_shape, check, close_scaled, eta, normal, round_f32, schedule, seed, sigma, stride_len,
    tensor, test_device, values, ScheduleSpec, SigmaSpec, F32_MIN_ALPHA_BAR,
};
use ndarray::{s, Array2};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// Tolerances relative to the sum of the absolute values of the terms each result is built
/// from. f64: the schedules agree to ~1e-12 (tests/schedule.rs); 1e-10 leaves a factor 100.
/// f32: each coefficient is one f64→f32 rounding of a table value followed by at most eight
/// products, quotients and sums (u = 6e-8), ≲ 16u ≈ 1e-6; 2e-6 leaves a factor 2.
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 2e-6)];

type StepCase = (ScheduleSpec, usize, SigmaSpec, Vec<usize>, usize, u64);

fn step_case() -> impl Strategy<Value = StepCase> {
    (schedule(), sigma(), batch_shape(), seed()).prop_flat_map(
        |((spec, big_t), sig, (n, d), sd)| {
            let ts = prop::collection::vec(prop_oneof![Just(1usize), Just(big_t), 1..=big_t], n);
            (Just(spec), Just(big_t), Just(sig), ts, Just(d), Just(sd))
        },
    )
}

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

fn t_tensor(ts: &[usize], device: Device) -> Tensor {
    Tensor::from_slice(&ts.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(device)
}

fn row(a: &Array2<f64>, i: usize) -> Array2<f64> {
    a.slice(s![i..=i, ..]).to_owned()
}

fn flat(a: &Array2<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn ancestral_steps_agree(device: Device) {
    check(128, step_case(), |(spec, big_t, choice, ts, d, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let sigmas = choice.tch().table(&s).unwrap();
        let n = ts.len();
        let t = t_tensor(&ts, device);
        for (kind, tol) in TOL {
            if kind == Kind::Float
                && ts
                    .iter()
                    .any(|&ti| r.alpha_bar(ti).unwrap() < F32_MIN_ALPHA_BAR)
            {
                continue;
            }
            let nz = noise(n, d, sd, kind);
            let (x, e, z) = (
                tensor(&nz.x, kind, device),
                tensor(&nz.eps_hat, kind, device),
                tensor(&nz.z, kind, device),
            );
            let plain = values(&ancestral_step(&s, &x, &t, &e, &sigmas, &z).unwrap());
            let clipped = values(&ancestral_step_clipped(&s, &x, &t, &e, &sigmas, &z).unwrap());
            for (i, &ti) in ts.iter().enumerate() {
                let sigma_t = reference::sigma::sigma(&r, choice.reference(), ti).unwrap();
                let (xi, ei, zi) = (row(&nz.x, i), row(&nz.eps_hat, i), row(&nz.z, i));
                let (a, b, bb, ab) = (
                    r.alpha(ti).unwrap(),
                    r.beta(ti).unwrap(),
                    r.beta_bar(ti).unwrap(),
                    r.alpha_bar(ti).unwrap(),
                );
                let got = &plain[i * d..(i + 1) * d];
                let want = rs::ancestral_step(&r, &xi, ti, &ei, sigma_t, &zi).unwrap();
                let scale = (xi.mapv(f64::abs) + ei.mapv(f64::abs) * (b * b / bb)) / a
                    + zi.mapv(f64::abs) * sigma_t;
                close_scaled(
                    &format!("ancestral step, {kind:?}, t = {ti}, {choice:?}"),
                    got,
                    &flat(&want),
                    &flat(&scale),
                    tol,
                )?;

                let got = &clipped[i * d..(i + 1) * d];
                let want = rs::ancestral_step_clipped(&r, &xi, ti, &ei, sigma_t, &zi).unwrap();
                let bb2 = bb * bb;
                let c0 = r.alpha_bar(ti - 1).unwrap() * b * b / bb2;
                let ct = a * r.beta_bar(ti - 1).unwrap().powi(2) / bb2;
                let x0_scale = (xi.mapv(f64::abs) + ei.mapv(f64::abs) * bb) / ab;
                let scale = x0_scale * c0 + xi.mapv(f64::abs) * ct + zi.mapv(f64::abs) * sigma_t;
                close_scaled(
                    &format!("clipped step, {kind:?}, t = {ti}, {choice:?}"),
                    got,
                    &flat(&want),
                    &flat(&scale),
                    tol,
                )?;
            }
        }
        Ok(())
    });
}
test_device!(
    ancestral_steps_agree,
    ancestral_steps_agree_cpu,
    ancestral_steps_agree_cuda
);

/// (schedule, T, [τ_i > τ′_i per sample], η, d, seed): pairs from strided lists of random
/// length, so adjacent (τ′ = τ − 1), long jumps and the last step τ′ = 0 all occur.
type DdimCase = (ScheduleSpec, usize, Vec<(usize, usize)>, f64, usize, u64);

fn ddim_case() -> impl Strategy<Value = DdimCase> {
    (schedule(), eta(), batch_shape(), seed()).prop_flat_map(|((spec, big_t), eta, (n, d), sd)| {
        let pair = stride_len(big_t).prop_flat_map(move |k| {
            let pairs = rs::step_pairs(&rs::strided_timesteps(big_t, k).unwrap());
            (0..pairs.len()).prop_map(move |i| pairs[i])
        });
        (
            Just(spec),
            Just(big_t),
            prop::collection::vec(pair, n),
            Just(eta),
            Just(d),
            Just(sd),
        )
    })
}

fn ddim_steps_agree(device: Device) {
    check(128, ddim_case(), |(spec, big_t, pairs, eta, d, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let n = pairs.len();
        let taus: Vec<usize> = pairs.iter().map(|p| p.0).collect();
        let nexts: Vec<usize> = pairs.iter().map(|p| p.1).collect();
        let (t, t_prev) = (t_tensor(&taus, device), t_tensor(&nexts, device));
        for (kind, tol) in TOL {
            if kind == Kind::Float
                && taus
                    .iter()
                    .any(|&ti| r.alpha_bar(ti).unwrap() < F32_MIN_ALPHA_BAR)
            {
                continue;
            }
            let nz = noise(n, d, sd, kind);
            let (x, e, z) = (
                tensor(&nz.x, kind, device),
                tensor(&nz.eps_hat, kind, device),
                tensor(&nz.z, kind, device),
            );
            let got_all = values(&ddim_step(&s, &x, &t, &t_prev, &e, eta, &z).unwrap());
            for (i, &(tau, next)) in pairs.iter().enumerate() {
                let (xi, ei, zi) = (row(&nz.x, i), row(&nz.eps_hat, i), row(&nz.z, i));
                let want = rs::ddim_step(&r, &xi, tau, next, &ei, eta, &zi).unwrap();
                let (ab, bb) = (r.alpha_bar(tau).unwrap(), r.beta_bar(tau).unwrap());
                let (ab_n, bb_n) = (r.alpha_bar(next).unwrap(), r.beta_bar(next).unwrap());
                let sigma = eta * bb_n / bb * (1.0 - (ab / ab_n).powi(2)).max(0.0).sqrt();
                let keep = (bb_n * bb_n - sigma * sigma).max(0.0).sqrt();
                let mut scale = (xi.mapv(f64::abs) + ei.mapv(f64::abs) * bb) * (ab_n / ab)
                    + ei.mapv(f64::abs) * keep
                    + zi.mapv(f64::abs) * sigma;
                if kind == Kind::Float && sigma > 0.0 {
                    // The contract's 1 − ᾱ_τ²/ᾱ_τ′², evaluated in f32 from f32 ᾱ's as the tch
                    // side does, has relative error ~4u/(1 − ρ²), ρ = ᾱ_τ/ᾱ_τ′ (cancellation:
                    // 1 − ρ² is 2e-5 for adjacent steps near t = 1 of the article's schedule).
                    // It reaches σ z through σ and β̄_τ′² − σ² (relative error σ²/keep² times
                    // that), so those terms enter the scale multiplied by 1/(1 − ρ²).
                    let cond = 1.0 / (1.0 - (ab / ab_n).powi(2));
                    let keep_err = if keep > 0.0 {
                        sigma * sigma / keep
                    } else {
                        0.0
                    };
                    scale =
                        scale + (zi.mapv(f64::abs) * sigma + ei.mapv(f64::abs) * keep_err) * cond;
                }
                let got = &got_all[i * d..(i + 1) * d];
                close_scaled(
                    &format!("DDIM {tau} → {next}, η = {eta}, {kind:?}"),
                    got,
                    &flat(&want),
                    &flat(&scale),
                    tol,
                )?;
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
/// is σ̃_t and its mean μ̃): plain, and clipped against Ho's clipped step (f64, 1e-10).
fn ddim_eta_one_is_the_posterior_step(device: Device) {
    check(96, step_case(), |(spec, big_t, _, ts, d, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let n = ts.len();
        let prev: Vec<usize> = ts.iter().map(|t| t - 1).collect();
        let (t, t_prev) = (t_tensor(&ts, device), t_tensor(&prev, device));
        let nz = noise(n, d, sd, Kind::Double);
        let (x, e, z) = (
            tensor(&nz.x, Kind::Double, device),
            tensor(&nz.eps_hat, Kind::Double, device),
            tensor(&nz.z, Kind::Double, device),
        );
        let plain = values(&ddim_step(&s, &x, &t, &t_prev, &e, 1.0, &z).unwrap());
        let clipped = values(&ddim_step_clipped(&s, &x, &t, &t_prev, &e, 1.0, &z).unwrap());
        for (i, &ti) in ts.iter().enumerate() {
            let sigma_t = reference::posterior::std(&r, ti).unwrap();
            let (xi, ei, zi) = (row(&nz.x, i), row(&nz.eps_hat, i), row(&nz.z, i));
            let (a, b, bb, ab) = (
                r.alpha(ti).unwrap(),
                r.beta(ti).unwrap(),
                r.beta_bar(ti).unwrap(),
                r.alpha_bar(ti).unwrap(),
            );
            let want = rs::ancestral_step(&r, &xi, ti, &ei, sigma_t, &zi).unwrap();
            let scale = (xi.mapv(f64::abs) + ei.mapv(f64::abs) * (b * b / bb)) / a
                + zi.mapv(f64::abs) * sigma_t;
            close_scaled(
                &format!("DDIM η = 1, {ti} → {}", ti - 1),
                &plain[i * d..(i + 1) * d],
                &flat(&want),
                &flat(&scale),
                1e-10,
            )?;
            let want = rs::ancestral_step_clipped(&r, &xi, ti, &ei, sigma_t, &zi).unwrap();
            let scale = (xi.mapv(f64::abs) + ei.mapv(f64::abs) * bb) / ab
                + xi.mapv(f64::abs)
                + zi.mapv(f64::abs) * sigma_t;
            close_scaled(
                &format!("clipped DDIM η = 1, {ti} → {}", ti - 1),
                &clipped[i * d..(i + 1) * d],
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

/// The respaced chain of a strided ancestral sampler has ᾱ_k = ᾱ_{τ_k} and β̄_k = β̄_{τ_k}
/// (f64, the same 1e-10 as the schedules), so every σ choice applies to it unchanged.
#[test]
fn respaced_chain_keeps_the_visited_marginals() {
    let strategy =
        schedule().prop_flat_map(|(spec, big_t)| (Just(spec), Just(big_t), stride_len(big_t)));
    check(128, strategy, |(spec, big_t, k)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, Device::Cpu);
        let visited = ddpm::timesteps::strided(big_t as i64, k).unwrap();
        let chain = s.respaced(&visited).unwrap();
        prop_assert_eq!(chain.t_max() as usize, k);
        let (ab, bb) = (values(chain.alpha_bar()), values(chain.beta_bar()));
        for (j, &tau) in visited.iter().rev().enumerate() {
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
        let want = rs::step_pairs(&rs::strided_timesteps(big_t, k).unwrap());
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
