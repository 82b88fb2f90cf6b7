//! DDIM inversion on tensors (`ddpm::invert::Inverter`) held to the reference
//! (`ddpm_reference::invert`): each step in f64 and f32, and whole walks with the same
//! t-dependent predictor on both sides.

use ddpm::invert::Inverter;
use ddpm_reference::invert as ri;
use ddpm_reference::timesteps as rt;
use ddpm_tests::{
    batch_shape, check, close_in_norm, close_scaled, normal, round_f32, schedule, seed, stride_len,
    tensor, test_device, values,
};
use ndarray::Array2;
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// f64: the coefficients come from the same f64 tables (tests/schedule.rs: ~1e-12) folded in
/// f64, 1e-10 leaves a factor 100. f32: two coefficients rounded once to f32 and one product
/// and sum in f32, ≲ 4u ≈ 2.4e-7 of the terms' scale; 2e-6 leaves a factor 8.
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 2e-6)];

/// Step i of the inversion of the strided walk of k steps equals `invert_step` at the
/// reference's `inversion_pairs(strided(T, k))[i]`, and the pairs themselves agree.
fn inversion_steps_agree(device: Device) {
    let case = (schedule(), batch_shape(), seed()).prop_flat_map(|((spec, big_t), nd, sd)| {
        stride_len(big_t).prop_flat_map(move |k| {
            let i = prop_oneof![Just(0usize), Just(k - 1), 0..k];
            (
                Just(spec.clone()),
                Just(big_t),
                Just(k),
                i,
                Just(nd),
                Just(sd),
            )
        })
    });
    check(192, case, |(spec, big_t, k, i, (n, d), sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let steps = rt::strided(big_t, k).unwrap();
        let want_pairs = ri::inversion_pairs(&steps);
        let gen: Vec<(i64, i64)> = rt::step_pairs(&steps)
            .into_iter()
            .map(|(a, b)| (a as i64, b as i64))
            .collect();
        let inv = Inverter::new(&s, &gen).unwrap();
        let got_pairs: Vec<(usize, usize)> = inv
            .steps()
            .iter()
            .map(|&(a, b)| (a as usize, b as usize))
            .collect();
        prop_assert_eq!(&got_pairs, &want_pairs);
        let (prev, tau) = want_pairs[i];
        let (ab, bb) = (r.alpha_bar(tau).unwrap(), r.beta_bar(tau).unwrap());
        let (ab_p, bb_p) = (r.alpha_bar(prev).unwrap(), r.beta_bar(prev).unwrap());
        for (kind, tol) in TOL {
            let round = |a: Array2<f64>| {
                if kind == Kind::Float {
                    round_f32(&a)
                } else {
                    a
                }
            };
            let x = round(normal(n, d, sd) * 1.5);
            let e = round(normal(n, d, sd ^ 1));
            let got = values(
                &inv.step(i, &tensor(&x, kind, device), &tensor(&e, kind, device))
                    .unwrap(),
            );
            let want = ri::invert_step(&r, &x, prev, tau, &e).unwrap();
            // x_τ = (ᾱ_τ/ᾱ_τ′) x + (β̄_τ − ᾱ_τ β̄_τ′/ᾱ_τ′) ε̂: the scale of its terms.
            let scale = x.mapv(f64::abs) * (ab / ab_p) + e.mapv(f64::abs) * (bb + ab * bb_p / ab_p);
            let flat = |a: &Array2<f64>| a.iter().copied().collect::<Vec<f64>>();
            close_scaled(
                &format!("inversion {prev} → {tau} (T = {big_t}), {kind:?}"),
                &got,
                &flat(&want),
                &flat(&scale),
                tol,
            )?;
        }
        Ok(())
    });
}
test_device!(
    inversion_steps_agree,
    inversion_steps_agree_cpu,
    inversion_steps_agree_cuda
);

/// The whole walk (`Inverter::invert`, the loop `ddpm invert` runs) against the reference's
/// `ddim_invert` with the same smooth t-dependent predictor, in f32 on the device against f64:
/// the walk multiplies by ᾱ_τ/ᾱ_τ′ ≤ 1 and adds bounded ε̂ terms, so the f32 roundings of
/// k ≤ 60 steps stay below 60 · 4u ≈ 1.4e-5 of the result's size; 1e-4 leaves a factor 7.
fn inversion_walks_agree(device: Device) {
    let case = (schedule(), batch_shape(), seed()).prop_flat_map(|((spec, big_t), nd, sd)| {
        (1..=big_t.min(60)).prop_map(move |k| (spec.clone(), big_t, k, nd, sd))
    });
    check(32, case, |(spec, big_t, k, (n, d), sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let scale_t = 1.0 / big_t as f64;
        let rpred =
            |x: &Array2<f64>, t: usize| x.mapv(|v| (1.3 * v).sin() * (0.5 + t as f64 * scale_t));
        let tpred = |x: &Tensor, t: &Tensor| {
            let t = t.to_kind(Kind::Float).view([-1, 1]) * scale_t + 0.5;
            (x * 1.3).sin() * t
        };
        let x0 = round_f32(&normal(n, d, sd).mapv(f64::tanh));
        let want = ri::ddim_invert(&r, k, x0.clone(), rpred).unwrap();
        let gen: Vec<(i64, i64)> = rt::step_pairs(&rt::strided(big_t, k).unwrap())
            .into_iter()
            .map(|(a, b)| (a as i64, b as i64))
            .collect();
        let inv = Inverter::new(&s, &gen).unwrap();
        let mut seen = 0;
        let got = inv
            .invert(&tpred, &tensor(&x0, Kind::Float, device), |i, _| seen = i)
            .unwrap();
        prop_assert_eq!(seen, k);
        prop_assert_eq!(got.kind(), Kind::Float);
        close_in_norm(
            &format!("inversion walk of {k} steps (T = {big_t})"),
            &values(&got),
            &want.iter().copied().collect::<Vec<f64>>(),
            1e-4,
        )
    });
}
test_device!(
    inversion_walks_agree,
    inversion_walks_agree_cpu,
    inversion_walks_agree_cuda
);
