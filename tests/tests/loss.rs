//! The tch losses equal the reference's: the unweighted Euclidean loss (8), its exact weight,
//! the Min-SNR-γ weight and loss, loss (7) and the constant (7) − (8), for a fixed predictor
//! ε̂(x_t, t) = x_t W + (t/T) c that both sides evaluate, with one t per sample on the tch side.

use ddpm::loss::{
    euclidean_loss, loss7_input, loss7_minus_loss8, loss7_per_sample, loss_weight, min_snr_loss,
    min_snr_weight, snr, weighted_loss, weighted_per_sample,
};
use ddpm::marginal::marginal_sample;
use ddpm_reference as reference;
use ddpm_tests::{
    batch_shape, check, close, normal, round_f32, schedule, seed, sigma, tensor, test_device,
    values, ScheduleSpec, SigmaSpec,
};
use ndarray::{s, Array1, Array2};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// Schedule, σ choice, one t per sample, data dimension, seed.
type Mixed = (ScheduleSpec, usize, SigmaSpec, Vec<usize>, usize, u64);

fn mixed() -> impl Strategy<Value = Mixed> {
    (schedule(), sigma(), batch_shape(), seed()).prop_flat_map(
        |((spec, big_t), sig, (n, d), sd)| {
            let ts = prop::collection::vec(prop_oneof![Just(1usize), Just(big_t), 1..=big_t], n);
            (Just(spec), Just(big_t), Just(sig), ts, Just(d), Just(sd))
        },
    )
}

/// The fixed predictor's parameters: W [d, d] and c [d].
struct Linear {
    w: Array2<f64>,
    c: Array1<f64>,
    big_t: usize,
}

impl Linear {
    fn new(d: usize, big_t: usize, seed: u64) -> Self {
        let w = normal(d, d, seed) / (d as f64).sqrt();
        let c = normal(1, d, seed.wrapping_add(7)).row(0).to_owned();
        Linear { w, c, big_t }
    }

    fn reference(&self, x: &Array2<f64>, t: usize) -> Array2<f64> {
        x.dot(&self.w) + &(&self.c * (t as f64 / self.big_t as f64))
    }

    /// The same map on a batch [B, …] with its own t per sample, in x's kind.
    fn tch(&self, x: &Tensor, t: &Tensor) -> Tensor {
        let (kind, device) = (x.kind(), x.device());
        let size = x.size();
        let flat = x.reshape([size[0], -1]);
        let w = tensor(&self.w, kind, device);
        let c = tensor(&self.c.clone().insert_axis(ndarray::Axis(0)), kind, device);
        let frac = (t.to_kind(kind) / self.big_t as f64).unsqueeze(1);
        (flat.matmul(&w) + frac * c).reshape(size.as_slice())
    }
}

/// The batch [n, d] as the tch side sees it: images [n, d/4, 2, 2] when d is a multiple of 4
/// (so the sum must run over every non-batch dimension), else [n, d].
fn shaped(a: &Array2<f64>, kind: Kind, device: Device) -> Tensor {
    let (n, d) = a.dim();
    let t = tensor(a, kind, device);
    if d % 4 == 0 {
        t.reshape([n as i64, (d / 4) as i64, 2, 2])
    } else {
        t
    }
}

fn t_tensor(ts: &[usize], device: Device) -> Tensor {
    Tensor::from_slice(&ts.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(device)
}

/// Full pipeline in f64: x_t from the tch marginal, ε̂ from the predictor, unweighted and
/// weighted loss (8), per-sample t; the reference evaluates each row as a batch of one.
/// Every loss term is a sum of positive squares of O(1) differences, so the 1e-12 agreement of
/// the schedules carries over; 1e-10 relative leaves a factor 100.
fn loss8_agrees(device: Device) {
    check(128, mixed(), |(spec, big_t, choice, ts, d, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let n = ts.len();
        let (x0, eps) = (normal(n, d, sd), normal(n, d, sd.wrapping_add(1)));
        let f = Linear::new(d, big_t, sd.wrapping_add(2));
        let t = t_tensor(&ts, device);
        let (x0_t, eps_t) = (
            shaped(&x0, Kind::Double, device),
            shaped(&eps, Kind::Double, device),
        );
        let xt = marginal_sample(&s, &x0_t, &t, &eps_t).unwrap();
        let eps_hat = f.tch(&xt, &t);

        let sigmas = choice.tch().table(&s).unwrap();
        let weights = values(&loss_weight(&s, &sigmas, &t, Kind::Double).unwrap());
        let per = values(&weighted_per_sample(&s, &sigmas, &t, &eps_t, &eps_hat).unwrap());
        let mut unweighted = Vec::new();
        let mut weighted = Vec::new();
        for (i, &ti) in ts.iter().enumerate() {
            let row = |a: &Array2<f64>| a.slice(s![i..=i, ..]).to_owned();
            let predictor = |x: &Array2<f64>, t: usize| f.reference(x, t);
            let l = reference::loss::loss8(&r, &row(&x0), &row(&eps), ti, predictor).unwrap();
            unweighted.push(l);
            let sigma_t = reference::sigma::sigma(&r, choice.reference(), ti).unwrap();
            if sigma_t == 0.0 {
                // σ_t = 0 (σ_1 of the posterior choice): the reference refuses, the tch weight
                // is +∞ — the step is deterministic and the KL unbounded.
                prop_assert!(reference::loss::loss_weight(&r, ti, sigma_t).is_err());
                prop_assert!(
                    weights[i].is_infinite(),
                    "t = {}: weight {} for σ_t = 0",
                    ti,
                    weights[i]
                );
                continue;
            }
            let w = reference::loss::loss_weight(&r, ti, sigma_t).unwrap();
            close("w_t", &[weights[i]], &[w], 1e-10, f64::MIN_POSITIVE)?;
            let lw =
                reference::loss::weighted_loss(&r, &row(&x0), &row(&eps), ti, sigma_t, predictor)
                    .unwrap();
            close(
                "per-sample loss (8)",
                &[per[i]],
                &[lw],
                1e-10,
                f64::MIN_POSITIVE,
            )?;
            weighted.push(lw);
        }
        let got = values(&euclidean_loss(&eps_t, &eps_hat).unwrap())[0];
        let want = unweighted.iter().sum::<f64>() / n as f64;
        close(
            "unweighted loss (8)",
            &[got],
            &[want],
            1e-10,
            f64::MIN_POSITIVE,
        )?;
        if weighted.len() == n {
            let got = values(&weighted_loss(&s, &sigmas, &t, &eps_t, &eps_hat).unwrap())[0];
            let want = weighted.iter().sum::<f64>() / n as f64;
            close(
                "weighted loss (8)",
                &[got],
                &[want],
                1e-10,
                f64::MIN_POSITIVE,
            )?;
        }
        Ok(())
    });
}
test_device!(loss8_agrees, loss8_agrees_cpu, loss8_agrees_cuda);

/// The same batch in f32: ε and ε̂ rounded to f32 are what both sides see. The loss is a sum of
/// positive terms, so its relative error is at most (3 + d + n) roundings of u = 6e-8 (one
/// subtraction, one square, d-term sums, n-term mean) ≤ 21u ≈ 1.3e-6; the weight adds ≤ 8
/// more. 5e-6 unweighted and 1e-5 weighted leave a factor of about 4.
fn loss8_agrees_in_f32(device: Device) {
    check(64, mixed(), |(spec, big_t, choice, ts, d, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let n = ts.len();
        let eps = round_f32(&normal(n, d, sd));
        let eps_hat = round_f32(&normal(n, d, sd.wrapping_add(1)));
        let t = t_tensor(&ts, device);
        let (eps_t, hat_t) = (
            shaped(&eps, Kind::Float, device),
            shaped(&eps_hat, Kind::Float, device),
        );
        let got = euclidean_loss(&eps_t, &hat_t).unwrap();
        prop_assert_eq!(got.kind(), Kind::Float);
        let want = reference::loss::euclidean_loss(&eps, &eps_hat).unwrap();
        close(
            "unweighted loss (8), f32",
            &values(&got),
            &[want],
            5e-6,
            f64::MIN_POSITIVE,
        )?;

        let sigmas = choice.tch().table(&s).unwrap();
        let per = values(&weighted_per_sample(&s, &sigmas, &t, &eps_t, &hat_t).unwrap());
        for (i, &ti) in ts.iter().enumerate() {
            let sigma_t = reference::sigma::sigma(&r, choice.reference(), ti).unwrap();
            let w = reference::loss::loss_weight(&r, ti, sigma_t);
            // f32 cannot hold weights beyond 3.4e38 (σ_t → 0); those are the +∞ case above.
            let Ok(w) = w else { continue };
            if w > 1e30 {
                continue;
            }
            let row = |a: &Array2<f64>| a.slice(s![i..=i, ..]).to_owned();
            let want = w * reference::loss::euclidean_loss(&row(&eps), &row(&eps_hat)).unwrap();
            close(
                "per-sample loss (8), f32",
                &[per[i]],
                &[want],
                1e-5,
                f64::MIN_POSITIVE,
            )?;
        }
        Ok(())
    });
}
test_device!(
    loss8_agrees_in_f32,
    loss8_agrees_in_f32_cpu,
    loss8_agrees_in_f32_cuda
);

/// Loss (7) with its own input x_t = ᾱ_t x_0 + α_t β̄_{t−1} ε̄_{t−1} + β_t ε_t, and the θ-free
/// constant (7) − (8), in f64 (tolerance as for loss (8)).
fn loss7_agrees(device: Device) {
    check(96, mixed(), |(spec, big_t, choice, ts, d, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let n = ts.len();
        let (x0, e_prev, e_t) = (normal(n, d, sd), normal(n, d, sd ^ 1), normal(n, d, sd ^ 2));
        let f = Linear::new(d, big_t, sd ^ 3);
        let t = t_tensor(&ts, device);
        let sh = |a: &Array2<f64>| shaped(a, Kind::Double, device);
        let xt = loss7_input(&s, &sh(&x0), &t, &sh(&e_prev), &sh(&e_t)).unwrap();
        let sigmas = choice.tch().table(&s).unwrap();
        let per = values(&loss7_per_sample(&s, &sigmas, &t, &sh(&e_t), &f.tch(&xt, &t)).unwrap());
        let consts = values(&loss7_minus_loss8(&s, &sigmas, &t, d as i64, Kind::Double).unwrap());
        for (i, &ti) in ts.iter().enumerate() {
            let sigma_t = reference::sigma::sigma(&r, choice.reference(), ti).unwrap();
            if sigma_t == 0.0 {
                continue;
            }
            let row = |a: &Array2<f64>| a.slice(s![i..=i, ..]).to_owned();
            let predictor = |x: &Array2<f64>, t: usize| f.reference(x, t);
            let want = reference::loss::loss7_with_noise(
                &r,
                &row(&x0),
                &row(&e_prev),
                &row(&e_t),
                ti,
                sigma_t,
                predictor,
            )
            .unwrap();
            close("loss (7)", &[per[i]], &[want], 1e-10, f64::MIN_POSITIVE)?;
            let want = reference::loss::loss7_minus_loss8(&r, ti, sigma_t, d).unwrap();
            // The constant is 0 at t = 1 (β̄_0 = 0) on both sides.
            close(
                "constant (7) − (8)",
                &[consts[i]],
                &[want],
                1e-10,
                f64::MIN_POSITIVE,
            )?;
        }
        Ok(())
    });
}
test_device!(loss7_agrees, loss7_agrees_cpu, loss7_agrees_cuda);

/// Shape errors are errors, not panics.
#[test]
fn mismatched_shapes_are_errors() {
    let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
    assert!(euclidean_loss(&a, &b).is_err());
    assert!(euclidean_loss(
        &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        &Tensor::zeros([3], (Kind::Float, Device::Cpu))
    )
    .is_err());
}

/// Schedule, one t per sample, data dimension, seed, γ.
type WithGamma = (ScheduleSpec, usize, Vec<usize>, usize, u64, f64);

/// γ: Hang et al.'s 5, or log-uniform over [e⁻⁷, e⁷] ≈ [1e-3, 1e3] (every schedule's SNR_t
/// spans that range, so both branches of the min and the kink between them are met), or the
/// SNR of one of the batch's own t exactly (the kink itself; picked in the test).
fn with_gamma() -> impl Strategy<Value = WithGamma> {
    (
        mixed(),
        prop_oneof![Just(5.0), (-7.0f64..7.0).prop_map(f64::exp), Just(-1.0)],
    )
        .prop_map(|((spec, big_t, _, ts, d, sd), gamma)| (spec, big_t, ts, d, sd, gamma))
}

/// γ = −1 in the strategy stands for "SNR of the first sample's t" (from the reference).
fn resolve_gamma(gamma: f64, r: &reference::Schedule, ts: &[usize]) -> f64 {
    if gamma > 0.0 {
        gamma
    } else {
        reference::loss::snr(r, ts[0]).unwrap()
    }
}

/// Min-SNR-γ in f64: SNR_t, the weight min(SNR_t, γ)/SNR_t and the batch loss against the
/// reference on the full pipeline (tch marginal, the fixed predictor). Tolerance: ᾱ_t and β̄_t
/// agree to ≲ 1e-12 relative (tests/tests/schedule.rs), so their squares' ratio to ≲ 4e-12
/// plus three roundings; the clamp at 1 is 1-Lipschitz and both sides clamp the same number
/// up to that error, so the weight keeps it, and the loss adds the 1e-12-level agreement of
/// loss (8) above. 1e-10 relative leaves a factor 20.
fn min_snr_agrees(device: Device) {
    check(128, with_gamma(), |(spec, big_t, ts, d, sd, gamma)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let gamma = resolve_gamma(gamma, &r, &ts);
        let n = ts.len();
        let (x0, eps) = (normal(n, d, sd), normal(n, d, sd.wrapping_add(1)));
        let f = Linear::new(d, big_t, sd.wrapping_add(2));
        let t = t_tensor(&ts, device);
        let (x0_t, eps_t) = (
            shaped(&x0, Kind::Double, device),
            shaped(&eps, Kind::Double, device),
        );
        let xt = marginal_sample(&s, &x0_t, &t, &eps_t).unwrap();
        let eps_hat = f.tch(&xt, &t);

        let snrs = values(&snr(&s, &t, Kind::Double).unwrap());
        let weights = min_snr_weight(&s, gamma, &t, Kind::Double).unwrap();
        prop_assert_eq!(weights.kind(), Kind::Double);
        let weights = values(&weights);
        let mut losses = Vec::new();
        for (i, &ti) in ts.iter().enumerate() {
            let row = |a: &Array2<f64>| a.slice(s![i..=i, ..]).to_owned();
            let predictor = |x: &Array2<f64>, t: usize| f.reference(x, t);
            let want_snr = reference::loss::snr(&r, ti).unwrap();
            close("SNR_t", &[snrs[i]], &[want_snr], 1e-10, f64::MIN_POSITIVE)?;
            let w = reference::loss::min_snr_weight(&r, ti, gamma).unwrap();
            prop_assert!(w > 0.0 && w <= 1.0, "t = {}: w = {}", ti, w);
            close(
                "Min-SNR-γ weight",
                &[weights[i]],
                &[w],
                1e-10,
                f64::MIN_POSITIVE,
            )?;
            let l = reference::loss::min_snr_loss(&r, &row(&x0), &row(&eps), ti, gamma, predictor)
                .unwrap();
            losses.push(l);
        }
        let got = values(&min_snr_loss(&s, gamma, &t, &eps_t, &eps_hat).unwrap())[0];
        let want = losses.iter().sum::<f64>() / n as f64;
        close("Min-SNR-γ loss", &[got], &[want], 1e-10, f64::MIN_POSITIVE)?;
        Ok(())
    });
}
test_device!(min_snr_agrees, min_snr_agrees_cpu, min_snr_agrees_cuda);

/// The same in f32, on ε and ε̂ rounded to f32 (what both sides see). The weight is computed
/// in f64 and rounded once to f32: ≤ u = 6e-8 relative beyond the f64 error; the loss adds the
/// roundings of loss (8) in f32 (subtraction, square, a d-term sum, the product with w, an
/// n-term mean: ≤ (3 + d + n) u ≤ 21u ≈ 1.3e-6 for d ≤ 12, n ≤ 6). 5e-7 for the weight and
/// 5e-6 for the loss leave a factor of about 4–8.
fn min_snr_agrees_in_f32(device: Device) {
    check(64, with_gamma(), |(spec, big_t, ts, d, sd, gamma)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let gamma = resolve_gamma(gamma, &r, &ts);
        let n = ts.len();
        let eps = round_f32(&normal(n, d, sd));
        let eps_hat = round_f32(&normal(n, d, sd.wrapping_add(1)));
        let t = t_tensor(&ts, device);
        let (eps_t, hat_t) = (
            shaped(&eps, Kind::Float, device),
            shaped(&eps_hat, Kind::Float, device),
        );
        let weights = min_snr_weight(&s, gamma, &t, Kind::Float).unwrap();
        prop_assert_eq!(weights.kind(), Kind::Float);
        let got = min_snr_loss(&s, gamma, &t, &eps_t, &hat_t).unwrap();
        prop_assert_eq!(got.kind(), Kind::Float);
        let mut want = 0.0;
        let mut ws = Vec::new();
        for (i, &ti) in ts.iter().enumerate() {
            let row = |a: &Array2<f64>| a.slice(s![i..=i, ..]).to_owned();
            let w = reference::loss::min_snr_weight(&r, ti, gamma).unwrap();
            ws.push(w);
            want += w * reference::loss::euclidean_loss(&row(&eps), &row(&eps_hat)).unwrap();
        }
        close(
            "Min-SNR-γ weight, f32",
            &values(&weights),
            &ws,
            5e-7,
            f64::MIN_POSITIVE,
        )?;
        close(
            "Min-SNR-γ loss, f32",
            &values(&got),
            &[want / n as f64],
            5e-6,
            f64::MIN_POSITIVE,
        )?;
        Ok(())
    });
}
test_device!(
    min_snr_agrees_in_f32,
    min_snr_agrees_in_f32_cpu,
    min_snr_agrees_in_f32_cuda
);

/// A γ that is not positive and finite is an error on both sides, not a NaN loss.
#[test]
fn invalid_gamma_is_an_error_on_both_sides() {
    let s = ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Article, 10, Device::Cpu)
        .unwrap();
    let r = reference::Schedule::new(reference::schedule::ScheduleKind::Article, 10).unwrap();
    let t = Tensor::from_slice(&[3i64]);
    for gamma in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert!(
            min_snr_weight(&s, gamma, &t, Kind::Float).is_err(),
            "{gamma}"
        );
        assert!(
            reference::loss::min_snr_weight(&r, 3, gamma).is_err(),
            "{gamma}"
        );
    }
}
