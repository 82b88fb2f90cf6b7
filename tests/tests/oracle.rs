//! The tch oracle E[ε|x_t] equals the reference oracle for random Gaussian mixtures (points and
//! Diracs included), at one t per sample, and it works as a `NoisePredictor`.

use ddpm::oracle::Oracle;
use ddpm::sampler::NoisePredictor;
use ddpm_tests::{
    check, close_scaled, mixture, normal, schedule_and_t, seed, tensor, test_device, values,
    Mixture,
};
use ndarray::{s, Array2};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

/// The rounding scale of ε*_i = Σ_k r_k e_ki, e_k = β̄_t (x_t − ᾱ_t m_k)/v_k: each e_ki is
/// a difference of β̄|x|/v_k and β̄ᾱ|m_k|/v_k, and each r_k = softmax(a_k) carries an error
/// ~u·|a_k| from its exponent a_k = ln w_k − (d/2) ln v_k − ‖x − ᾱ m_k‖²/(2 v_k).
fn oracle_scale(mix: &Mixture, x: &[f64], ab: f64, bb: f64) -> Vec<f64> {
    let d = x.len();
    let mut a = Vec::new();
    for (k, (&w, &s)) in mix.weights.iter().zip(&mix.stds).enumerate() {
        let v = ab * ab * s * s + bb * bb;
        let dist: f64 = (0..d)
            .map(|i| (x[i] - ab * mix.means[[k, i]]).powi(2))
            .sum();
        a.push((w.ln() - 0.5 * d as f64 * v.ln() - dist / (2.0 * v), v));
    }
    let top = a.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = a.iter().map(|p| (p.0 - top).exp()).sum();
    (0..d)
        .map(|i| {
            a.iter()
                .enumerate()
                .map(|(k, &(ak, v))| {
                    let r = (ak - top).exp() / total;
                    let m = ab * mix.means[[k, i]];
                    r * bb / v * ((x[i].abs() + m.abs()) + (x[i] - m).abs() * (1.0 + ak.abs()))
                })
                .sum()
        })
        .collect()
}

/// f64: ε* is a few dozen operations on values whose rounding the scale above tracks, so
/// 1e-10 (with the schedules' 1e-12 agreement) leaves a factor 100. f32: the same ~30
/// operations at u = 6e-8 bound the error by ~2e-6; 5e-6 leaves a factor 2.5.
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 5e-6)];

fn oracles_agree(device: Device) {
    let strategy = (mixture(), schedule_and_t(), 1usize..=5, seed());
    check(128, strategy, |(mix, (spec, big_t, t0), n, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let d = mix.means.ncols();
        let law_ref = mix.reference();
        let law = mix.tch(device);
        // One t per sample around t0, and x_t from the law's own marginal (where the oracle
        // is used) for half the rows, arbitrary points for the rest.
        let ts: Vec<usize> = (0..n).map(|i| 1 + (t0 - 1 + i * 7) % big_t).collect();
        let mut rng = StdRng::seed_from_u64(sd);
        let x0 = law_ref.sample(n, &mut rng).unwrap();
        let eps = normal(n, d, sd ^ 3);
        let mut xt = Array2::zeros((n, d));
        for (i, &ti) in ts.iter().enumerate() {
            let marginal =
                &x0.row(i) * r.alpha_bar(ti).unwrap() + &eps.row(i) * r.beta_bar(ti).unwrap();
            let row = if i % 2 == 0 {
                marginal
            } else {
                eps.row(i).to_owned() * 2.0
            };
            xt.row_mut(i).assign(&row);
        }
        let t =
            Tensor::from_slice(&ts.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(device);
        for (kind, tol) in TOL {
            let xt = if kind == Kind::Float {
                ddpm_tests::round_f32(&xt)
            } else {
                xt.clone()
            };
            let xt_t = tensor(&xt, kind, device);
            if kind == Kind::Float
                && ts
                    .iter()
                    .any(|&ti| r.alpha_bar(ti).unwrap() < 1e-20 || r.beta_bar(ti).unwrap() < 1e-3)
            {
                // f32 has no room for ᾱ_t below 1e-20, nor for the 1/β̄_t² ≳ 1e6 exponents of
                // tiny t (the responsibilities then hinge on |a_k| ~ 1e6·u ≳ 0.1).
                continue;
            }
            let got = law.optimal_eps(&s, &xt_t, &t).unwrap();
            prop_assert_eq!(got.kind(), kind);
            let got = values(&got);
            for (i, &ti) in ts.iter().enumerate() {
                let xi = xt.slice(s![i..=i, ..]).to_owned();
                let want = law_ref.optimal_eps(&r, &xi, ti).unwrap();
                let (ab, bb) = (r.alpha_bar(ti).unwrap(), r.beta_bar(ti).unwrap());
                let scale = oracle_scale(&mix, xi.as_slice().unwrap(), ab, bb);
                close_scaled(
                    &format!("ε* at t = {ti}, {kind:?}, row {i}"),
                    &got[i * d..(i + 1) * d],
                    want.as_slice().unwrap(),
                    &scale,
                    tol,
                )?;
            }
        }
        // The same law as a predictor on image-shaped input [n, d, 1, 1].
        let oracle = Oracle::new(law, &s);
        let img = tensor(&xt, Kind::Double, device).reshape([n as i64, d as i64, 1, 1]);
        prop_assert!(oracle.check_input(&img.size()).is_ok());
        prop_assert!(oracle.check_input(&[n as i64, d as i64 + 1]).is_err());
        let flat_pred = values(&oracle.predict(&img, &t).unwrap());
        let direct = values(
            &oracle
                .law()
                .optimal_eps(&s, &tensor(&xt, Kind::Double, device), &t)
                .unwrap(),
        );
        prop_assert_eq!(flat_pred, direct);
        Ok(())
    });
}
test_device!(oracles_agree, oracles_agree_cpu, oracles_agree_cuda);

/// Dirac and standard normal, the closed forms of SPEC written out: (x_t − ᾱ_t c)/β̄_t and
/// β̄_t x_t (f64, 1e-10 relative to |x_t|/β̄_t, the size of the terms).
fn closed_forms(device: Device) {
    check(
        64,
        (schedule_and_t(), 1usize..=4, seed()),
        |((spec, big_t, t0), d, sd)| {
            let r = spec.reference(big_t);
            let s = spec.tch(big_t, device);
            let (ab, bb) = (r.alpha_bar(t0).unwrap(), r.beta_bar(t0).unwrap());
            let c = normal(1, d, sd);
            let xt = normal(3, d, sd ^ 1);
            let t = Tensor::full([3], t0 as i64, (Kind::Int64, device));
            let x_t = tensor(&xt, Kind::Double, device);
            let dirac =
                ddpm::oracle::DataLaw::dirac(&tensor(&c, Kind::Double, device).squeeze_dim(0))
                    .unwrap();
            let got = values(&dirac.optimal_eps(&s, &x_t, &t).unwrap());
            let want: Vec<f64> = (&xt - &(&c * ab))
                .mapv(|v| v / bb)
                .iter()
                .copied()
                .collect();
            let scale: Vec<f64> = (xt.mapv(f64::abs) + c.mapv(f64::abs) * ab)
                .mapv(|v| v / bb)
                .iter()
                .copied()
                .collect();
            close_scaled("Dirac oracle", &got, &want, &scale, 1e-10)?;
            let normal_law = ddpm::oracle::DataLaw::standard_normal(d as i64, device).unwrap();
            let got = values(&normal_law.optimal_eps(&s, &x_t, &t).unwrap());
            let want: Vec<f64> = xt.mapv(|v| v * bb).iter().copied().collect();
            let scale: Vec<f64> = xt
                .mapv(|v| v.abs() * bb + f64::MIN_POSITIVE)
                .iter()
                .copied()
                .collect();
            close_scaled("standard-normal oracle", &got, &want, &scale, 1e-10)?;
            Ok(())
        },
    );
}
test_device!(closed_forms, closed_forms_cpu, closed_forms_cuda);
