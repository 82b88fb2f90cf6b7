//! Every term of the variational bound on the tch side equals the reference's: the Gaussian
//! KL, L_T, each L_{t−1} for every σ choice, the discretised-Gaussian decoder L_0, the mixed-t
//! bound term, bits/dim; and the whole bound for the Dirac oracle, which is deterministic.

use ddpm::bound::{
    bits_per_dim, bound_term, decoder_nll, kl_isotropic, negative_elbo, posterior_kl, prior_kl,
};
use ddpm::marginal::marginal_sample;
use ddpm::oracle::{DataLaw, Oracle};
use ddpm_reference as reference;
use ddpm_reference::bound as rb;
use ddpm_tests::{
    batch_shape, check, close, close_scaled, normal, schedule, seed, sigma, tensor, test_device,
    values,
};
use ndarray::{s, Array2};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

/// f64 throughout. A KL or log-probability is a sum of terms whose rounding the scales below
/// track; the schedules agree to ~1e-12, so 1e-10 relative to the scale leaves a factor 100.
const TOL: f64 = 1e-10;

/// Scale of Σ_dims [ln(s2/s1) + (s1² + (m1 − m2)²)/(2 s2²) − ½]: the terms' sizes, plus the
/// rounding of m1 − m2 (~u(|m1| + |m2|)) amplified by 2|m1 − m2|/(2 s2²).
fn kl_scale(m1: &Array2<f64>, s1: f64, m2: &Array2<f64>, s2: f64) -> Vec<f64> {
    let d = m1.ncols() as f64;
    let diff = m1 - m2;
    let per = diff.mapv(|v| v * v / (2.0 * s2 * s2))
        + &(diff.mapv(f64::abs) * &(m1.mapv(f64::abs) + m2.mapv(f64::abs))) / (s2 * s2);
    per.sum_axis(ndarray::Axis(1))
        .mapv(|v| v + d * ((s2 / s1).ln().abs() + s1 * s1 / (2.0 * s2 * s2) + 0.5))
        .to_vec()
}

/// Data on the 8-bit grid 2k/255 − 1, the edges k = 0 and 255 included often.
fn grid_data(n: usize, d: usize, sd: u64) -> Array2<f64> {
    let mut rng = StdRng::seed_from_u64(sd);
    Array2::from_shape_simple_fn((n, d), || {
        let k = match rng.random_range(0..4) {
            0 => 0,
            1 => 255,
            _ => rng.random_range(0..256),
        };
        2.0 * k as f64 / 255.0 - 1.0
    })
}

fn kl_agrees(device: Device) {
    check(
        128,
        (batch_shape(), seed(), 1e-3f64..3.0, 1e-3f64..3.0),
        |((n, d), sd, s1, s2)| {
            let (m1, m2) = (normal(n, d, sd), normal(n, d, sd ^ 1));
            let t = |a: &Array2<f64>| tensor(a, Kind::Double, device);
            let sc = |v: f64| Tensor::full([n as i64, 1], v, (Kind::Double, device));
            let got = values(&kl_isotropic(&t(&m1), &sc(s1), &t(&m2), &sc(s2)).unwrap());
            let want = rb::kl_isotropic(&m1, s1, &m2, s2).unwrap();
            close_scaled(
                "KL",
                &got,
                want.as_slice().unwrap(),
                &kl_scale(&m1, s1, &m2, s2),
                TOL,
            )?;
            Ok(())
        },
    );
}
test_device!(kl_agrees, kl_agrees_cpu, kl_agrees_cuda);

fn terms_agree(device: Device) {
    let strategy = (schedule(), sigma(), batch_shape(), seed()).prop_flat_map(
        |((spec, big_t), sig, (n, d), sd)| {
            (
                Just(spec),
                Just(big_t),
                Just(sig),
                1..=big_t,
                Just(n),
                Just(d),
                Just(sd),
            )
        },
    );
    check(128, strategy, |(spec, big_t, choice, ti, n, d, sd)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let sigmas = choice.tch().table(&s).unwrap();
        let x0 = grid_data(n, d, sd);
        let eps = normal(n, d, sd ^ 1);
        let eps_hat = normal(n, d, sd ^ 2);
        let xt = reference::marginal::marginal_sample(&r, &x0, ti, &eps).unwrap();
        let tt = |a: &Array2<f64>| tensor(a, Kind::Double, device);
        let t = Tensor::full([n as i64], ti as i64, (Kind::Int64, device));

        let got = values(&prior_kl(&s, &tt(&x0)).unwrap());
        let want = rb::prior_kl(&r, &x0).unwrap();
        let (ab, bb) = (r.alpha_bar(big_t).unwrap(), r.beta_bar(big_t).unwrap());
        let scale = kl_scale(&(&x0 * ab), bb, &Array2::zeros((n, d)), 1.0);
        close_scaled("L_T", &got, want.as_slice().unwrap(), &scale, TOL)?;

        let zeros = Array2::zeros((n, d));
        let model_mean =
            reference::sampler::ancestral_step(&r, &xt, ti, &eps_hat, 0.0, &zeros).unwrap();
        if ti >= 2 {
            let sigma_t = reference::sigma::sigma(&r, choice.reference(), ti).unwrap();
            if sigma_t > 0.0 {
                let got = values(
                    &posterior_kl(&s, &sigmas, &tt(&x0), &tt(&xt), &t, &tt(&eps_hat)).unwrap(),
                );
                let want = rb::posterior_kl(&r, &x0, &xt, ti, &eps_hat, sigma_t).unwrap();
                let target = reference::posterior::mean(&r, &x0, &xt, ti).unwrap();
                let s1 = reference::posterior::std(&r, ti).unwrap();
                let scale = kl_scale(&target, s1, &model_mean, sigma_t);
                close_scaled(
                    &format!("L_{{t−1}}, t = {ti}, {choice:?}"),
                    &got,
                    want.as_slice().unwrap(),
                    &scale,
                    TOL,
                )?;
            }
        }
        // L_0 decodes x_0 from x_1 whatever t was drawn.
        let x1 = reference::marginal::marginal_sample(&r, &x0, 1, &eps).unwrap();
        let mean1 = reference::sampler::ancestral_step(&r, &x1, 1, &eps_hat, 0.0, &zeros).unwrap();
        let std1 = rb::decoder_std(&r, choice.reference()).unwrap();
        let got = values(&decoder_nll(&s, &sigmas, &tt(&x0), &tt(&x1), &tt(&eps_hat)).unwrap());
        let want = rb::decoder_nll(&x0, &mean1, std1).unwrap();
        // −ln P of a bin moves by (|z| + 1)·δz under an error δz ≈ u(|x_0| + |μ|)/s in its
        // standardised edges z.
        let zs = (&x0 - &mean1).mapv(f64::abs) / std1;
        let scale: Vec<f64> =
            (zs.mapv(|z| 1.0 + z) * &(x0.mapv(f64::abs) + mean1.mapv(f64::abs) + 1.0) / std1)
                .sum_axis(ndarray::Axis(1))
                .iter()
                .zip(want.iter())
                .map(|(a, w)| a + w.abs())
                .collect();
        close_scaled(
            &format!("L_0, {choice:?}"),
            &got,
            want.as_slice().unwrap(),
            &scale,
            TOL,
        )?;

        let bpd = values(&bits_per_dim(
            &Tensor::from_slice(&got).to_device(device),
            d as i64,
        ));
        let want_bpd: Vec<f64> = got.iter().map(|&v| rb::bits_per_dim(v, d)).collect();
        close("bits/dim", &bpd, &want_bpd, 1e-14, f64::MIN_POSITIVE)?;
        Ok(())
    });
}
test_device!(terms_agree, terms_agree_cpu, terms_agree_cuda);

/// `bound_term` with t mixed across the batch is L_0 where t = 1 and L_{t−1} elsewhere.
fn bound_term_dispatches_on_t(device: Device) {
    check(
        64,
        (schedule(), batch_shape(), seed()),
        |((spec, big_t), (n, d), sd)| {
            // T = 1 has no L_{t−1}; it has its own test below.
            prop_assume!(big_t >= 2);
            let s = spec.tch(big_t, device);
            let sigmas = ddpm::sigma::SigmaChoice::Beta.table(&s).unwrap();
            let ts: Vec<i64> = (0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        1
                    } else {
                        1 + (sd as i64 + i as i64).rem_euclid(big_t as i64)
                    }
                })
                .collect();
            let t = Tensor::from_slice(&ts).to_device(device);
            let x0 = tensor(&grid_data(n, d, sd), Kind::Double, device);
            let xt = marginal_sample(
                &s,
                &x0,
                &t,
                &tensor(&normal(n, d, sd ^ 1), Kind::Double, device),
            )
            .unwrap();
            let eps_hat = tensor(&normal(n, d, sd ^ 2), Kind::Double, device);
            let got = values(&bound_term(&s, &sigmas, &x0, &t, &xt, &eps_hat).unwrap());
            let dec = values(&decoder_nll(&s, &sigmas, &x0, &xt, &eps_hat).unwrap());
            let kl =
                values(&posterior_kl(&s, &sigmas, &x0, &xt, &t.clamp_min(2), &eps_hat).unwrap());
            for (i, &ti) in ts.iter().enumerate() {
                let want = if ti == 1 { dec[i] } else { kl[i] };
                prop_assert_eq!(got[i], want, "t = {}", ti);
            }
            Ok(())
        },
    );
}
test_device!(
    bound_term_dispatches_on_t,
    bound_term_dispatches_on_t_cpu,
    bound_term_dispatches_on_t_cuda
);

/// With T = 1 the bound is L_T + L_0 and `bound_term` at t = 1 is the decoder term.
#[test]
fn bound_term_with_one_step() {
    let s = ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Article, 1, Device::Cpu)
        .unwrap();
    let sigmas = ddpm::sigma::SigmaChoice::Beta.table(&s).unwrap();
    let x0 = tensor(&grid_data(2, 3, 1), Kind::Double, Device::Cpu);
    let t = Tensor::from_slice(&[1i64, 1]);
    let eps_hat = tensor(&normal(2, 3, 2), Kind::Double, Device::Cpu);
    let xt = marginal_sample(&s, &x0, &t, &eps_hat).unwrap();
    let got = bound_term(&s, &sigmas, &x0, &t, &xt, &eps_hat);
    let want = values(&decoder_nll(&s, &sigmas, &x0, &xt, &eps_hat).unwrap());
    assert_eq!(
        values(&got.expect("bound_term with T = 1 must be the decoder term")),
        want
    );
}

/// With the Dirac oracle and the posterior σ the bound is deterministic whatever noise is
/// drawn: each L_{t−1} is 0 (the generator is the posterior), L_T is the reference's, and
/// L_0 decodes N(x_0, β_1²) (μ(x_1) = x_0 exactly). The tch negative_elbo must give that.
fn dirac_bound_is_exact(device: Device) {
    let big_t = 50;
    let s =
        ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Cosine, big_t, device).unwrap();
    let r = reference::Schedule::new(reference::ScheduleKind::Cosine, big_t as usize).unwrap();
    let x0 = grid_data(1, 6, 3);
    let law = DataLaw::dirac(&tensor(&x0, Kind::Double, device).squeeze_dim(0)).unwrap();
    let oracle = Oracle::new(law, &s);
    let sigmas = ddpm::sigma::SigmaChoice::Posterior.table(&s).unwrap();
    let x0_t = tensor(&x0, Kind::Double, device).repeat([3, 1]);
    let mut calls = 0;
    let terms = negative_elbo(&oracle, &s, &sigmas, &x0_t, |_, _| calls += 1).unwrap();
    assert_eq!(calls, big_t as usize, "one callback per t");
    let diffusion = values(&terms.diffusion);
    // Each L_{t−1} = Σ_dims (μ̃ − μ)²/(2σ̃_t²) where μ̃ − μ is a rounding error ~1e-16·|x|/ᾱ_t;
    // with σ̃_t ≥ 1e-3 here, the 49 terms stay far below 1e-12 nats.
    assert!(
        diffusion.iter().all(|v| v.abs() < 1e-12),
        "Σ L_(t−1) = {diffusion:?}, expected 0"
    );
    let prior = rb::prior_kl(&r, &x0.slice(s![0..1, ..]).to_owned()).unwrap()[0];
    let decoder = rb::decoder_nll(&x0, &x0, r.beta(1).unwrap()).unwrap()[0];
    for (name, got, want) in [
        ("L_T", values(&terms.prior), prior),
        ("L_0", values(&terms.decoder), decoder),
    ] {
        for g in got {
            assert!(
                (g - want).abs() <= 1e-10 * want.abs().max(1.0),
                "{name}: {g} vs {want}"
            );
        }
    }
    let total = values(&terms.total());
    assert!(total
        .iter()
        .all(|&v| (v - prior - decoder).abs() <= 1e-9 * (prior + decoder).abs().max(1.0)));
}
test_device!(
    dirac_bound_is_exact,
    dirac_bound_is_exact_cpu,
    dirac_bound_is_exact_cuda
);
