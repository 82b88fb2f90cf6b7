//! The encoder p on the tch side equals the reference: the marginal x_t = ᾱ_t x_0 + β̄_t ε,
//! the posterior mean and std, the x̂_0 a noise prediction implies, and the σ_t tables.
//! Also a distribution test of the forward noising itself.

use ddpm::marginal::{marginal_sample, predicted_x0};
use ddpm::posterior;
use ddpm_proofs::stats::{ks_pvalue, ks_statistic};
use ddpm_reference as reference;
use ddpm_tests::{
    array2, case, check, close, close_scaled, normal, round_f32, schedule, sigma, tensor,
    test_device, times, values, Case, SigmaSpec, F32_MIN_ALPHA_BAR,
};
use ndarray::Array2;
use proptest::prelude::*;
use statrs::distribution::{ContinuousCDF, Normal};
use tch::{Device, Kind, Tensor};

/// Tolerances relative to the sum of the absolute values of the terms a result is built from.
/// f64: the schedules themselves agree to ~1e-12 (see tests/schedule.rs), and a handful of
/// roundings of 1.1e-16 adds nothing visible; 1e-10 leaves a factor 100 on top. f32: every
/// coefficient is one f64→f32 rounding (u = 6e-8) and the formulas below take at most six
/// further products, quotients and sums, so ≤ 12u ≈ 7e-7 in the worst case; 2e-6 is that
/// with a factor 3 to spare. (Exact cancellation is covered by measuring against the terms.)
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 2e-6)];

/// The (f64 or f32-rounded) inputs both sides see, as arrays and as tch tensors.
struct Inputs {
    x0: Array2<f64>,
    eps: Array2<f64>,
    x0_t: Tensor,
    eps_t: Tensor,
}

fn inputs(c: &Case, kind: Kind, device: Device) -> Inputs {
    let mut x0 = normal(c.n, c.d, c.seed);
    let mut eps = normal(c.n, c.d, c.seed.wrapping_add(1));
    if kind == Kind::Float {
        x0 = round_f32(&x0);
        eps = round_f32(&eps);
    }
    let (x0_t, eps_t) = (tensor(&x0, kind, device), tensor(&eps, kind, device));
    Inputs {
        x0,
        eps,
        x0_t,
        eps_t,
    }
}

fn abs_sum(parts: &[Array2<f64>]) -> Vec<f64> {
    let mut total = parts[0].mapv(f64::abs);
    for p in &parts[1..] {
        total = total + p.mapv(f64::abs);
    }
    total.iter().copied().collect()
}

fn flat(a: &Array2<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn marginal_agrees(device: Device) {
    check(128, case(), |c| {
        let r = c.spec.reference(c.big_t);
        let s = c.spec.tch(c.big_t, device);
        for (kind, tol) in TOL {
            if kind == Kind::Float && r.alpha_bar(c.t).unwrap() < F32_MIN_ALPHA_BAR {
                continue;
            }
            let i = inputs(&c, kind, device);
            let t = times(c.t, c.n, device);
            let got = marginal_sample(&s, &i.x0_t, &t, &i.eps_t).unwrap();
            prop_assert_eq!(got.kind(), kind);
            let want = reference::marginal::marginal_sample(&r, &i.x0, c.t, &i.eps).unwrap();
            let scale = abs_sum(&[
                &i.x0 * r.alpha_bar(c.t).unwrap(),
                &i.eps * r.beta_bar(c.t).unwrap(),
            ]);
            close_scaled(
                &format!("x_t ({kind:?})"),
                &values(&got),
                &flat(&want),
                &scale,
                tol,
            )?;
        }
        Ok(())
    });
}
test_device!(marginal_agrees, marginal_agrees_cpu, marginal_agrees_cuda);

fn posterior_agrees(device: Device) {
    check(128, case(), |c| {
        let r = c.spec.reference(c.big_t);
        let s = c.spec.tch(c.big_t, device);
        for (kind, tol) in TOL {
            if kind == Kind::Float && r.alpha_bar(c.t).unwrap() < F32_MIN_ALPHA_BAR {
                continue;
            }
            // x_t independent of x_0 on purpose: the formula must hold for any pair.
            let i = inputs(&c, kind, device);
            let (x0, xt) = (&i.x0, &i.eps);
            let t = times(c.t, c.n, device);
            let got = posterior::mean(&s, &i.x0_t, &i.eps_t, &t).unwrap();
            let want = reference::posterior::mean(&r, x0, xt, c.t).unwrap();
            let bb2 = r.beta_bar(c.t).unwrap().powi(2);
            let c0 = r.alpha_bar(c.t - 1).unwrap() * r.beta(c.t).unwrap().powi(2) / bb2;
            let ct = r.alpha(c.t).unwrap() * r.beta_bar(c.t - 1).unwrap().powi(2) / bb2;
            let scale = abs_sum(&[x0 * c0, xt * ct]);
            close_scaled(
                &format!("μ̃ ({kind:?})"),
                &values(&got),
                &flat(&want),
                &scale,
                tol,
            )?;

            let got = posterior::std(&s, &t, &i.x0_t).unwrap();
            let want = vec![reference::posterior::std(&r, c.t).unwrap(); c.n];
            close(
                &format!("σ̃_t ({kind:?})"),
                &values(&got),
                &want,
                tol,
                f64::MIN_POSITIVE,
            )?;
        }
        Ok(())
    });
}
test_device!(
    posterior_agrees,
    posterior_agrees_cpu,
    posterior_agrees_cuda
);

/// x̂_0 = (x_t − β̄_t ε̂)/ᾱ_t, checked against the reference's arithmetic on the same inputs.
fn predicted_x0_agrees(device: Device) {
    check(96, case(), |c| {
        let r = c.spec.reference(c.big_t);
        let s = c.spec.tch(c.big_t, device);
        for (kind, tol) in TOL {
            let (ab, bb) = (r.alpha_bar(c.t).unwrap(), r.beta_bar(c.t).unwrap());
            if kind == Kind::Float && ab < F32_MIN_ALPHA_BAR {
                continue;
            }
            let i = inputs(&c, kind, device);
            let (xt, eps_hat) = (&i.x0, &i.eps);
            let t = times(c.t, c.n, device);
            let got = predicted_x0(&s, &i.x0_t, &t, &i.eps_t).unwrap();
            let want = (xt - &(eps_hat * bb)) / ab;
            let scale = abs_sum(&[xt / ab, eps_hat * (bb / ab)]);
            close_scaled(
                &format!("x̂_0 ({kind:?})"),
                &values(&got),
                &flat(&want),
                &scale,
                tol,
            )?;
        }
        Ok(())
    });
}
test_device!(
    predicted_x0_agrees,
    predicted_x0_agrees_cpu,
    predicted_x0_agrees_cuda
);

/// Every σ_t table (f64, computed from the f64 schedule on both sides) agrees to 1e-10.
fn sigma_tables_agree(device: Device) {
    check(96, (schedule(), sigma()), |((spec, big_t), choice)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        let got = choice.tch().table(&s).unwrap();
        prop_assert_eq!(got.kind(), Kind::Double);
        let want = choice.reference().table(&r).unwrap();
        close(
            &format!("σ_t {choice:?}"),
            &values(&got),
            want.as_slice().unwrap(),
            1e-10,
            f64::MIN_POSITIVE,
        )?;
        // s = 0 is Dirac data (posterior σ), s = 1 standard-normal data (σ_t = β_t).
        for (s_data, named) in [(0.0, SigmaSpec::Posterior), (1.0, SigmaSpec::Beta)] {
            let iso = SigmaSpec::Isotropic { s: s_data }.tch().table(&s).unwrap();
            let named = named.tch().table(&s).unwrap();
            close(
                "isotropic special case",
                &values(&iso),
                &values(&named),
                1e-10,
                f64::MIN_POSITIVE,
            )?;
        }
        Ok(())
    });
}
test_device!(
    sigma_tables_agree,
    sigma_tables_agree_cpu,
    sigma_tables_agree_cuda
);

#[test]
fn invalid_data_std_is_an_error_on_both_sides() {
    let s = ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Article, 10, Device::Cpu)
        .unwrap();
    let r = reference::Schedule::new(reference::ScheduleKind::Article, 10).unwrap();
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(
            SigmaSpec::Isotropic { s: bad }.tch().table(&s).is_err(),
            "tch accepted s = {bad}"
        );
        assert!(SigmaSpec::Isotropic { s: bad }
            .reference()
            .table(&r)
            .is_err());
    }
}

/// The tch forward noising draws from N(ᾱ_t x_0, β̄_t² I): one-sample KS tests per coordinate
/// and on random unit projections of the standardised residual (which catch correlated or
/// mis-scaled noise that per-coordinate tests miss). Sample size n = 4000 per test, 4 times
/// × (3 coordinates + 3 projections) = 24 tests, family-wise significance 1e-3 split by
/// Bonferroni (each test at 1e-3/24), seeded.
fn forward_noising_is_gaussian(device: Device) {
    const N: usize = 4000;
    const D: usize = 3;
    const ALPHA: f64 = 1e-3;
    let tests = 4 * 2 * D;
    tch::manual_seed(20240501);
    let r = reference::Schedule::new(reference::ScheduleKind::Article, 1000).unwrap();
    let s =
        ddpm::schedule::Schedule::new(ddpm::schedule::ScheduleKind::Article, 1000, device).unwrap();
    let x0_row = ndarray::array![[0.7, -1.0, 0.0]];
    let x0 = x0_row.broadcast((N, D)).unwrap().to_owned();
    let x0_t = tensor(&x0, Kind::Float, device);
    let std_normal = Normal::new(0.0, 1.0).unwrap();
    let directions = normal(D, D, 99);
    for t in [1usize, 10, 300, 1000] {
        let eps = Tensor::randn([N as i64, D as i64], (Kind::Float, device));
        let xt = array2(&marginal_sample(&s, &x0_t, &times(t, N, device), &eps).unwrap());
        let (ab, bb) = (r.alpha_bar(t).unwrap(), r.beta_bar(t).unwrap());
        let z = (xt - &x0 * ab) / bb;
        let mut columns: Vec<(String, Vec<f64>)> = (0..D)
            .map(|k| (format!("coordinate {k}"), z.column(k).to_vec()))
            .collect();
        for (k, dir) in directions.rows().into_iter().enumerate() {
            let unit = &dir / dir.dot(&dir).sqrt();
            columns.push((format!("projection {k}"), z.dot(&unit).to_vec()));
        }
        for (what, sample) in columns {
            let d = ks_statistic(ndarray::ArrayView1::from(&sample[..]), |x| {
                std_normal.cdf(x)
            });
            let p = ks_pvalue(d, N);
            assert!(
                p > ALPHA / tests as f64,
                "t = {t}, {what}: KS D = {d:.4}, p = {p:.2e} below {ALPHA}/{tests} (n = {N})"
            );
        }
    }
}
test_device!(
    forward_noising_is_gaussian,
    forward_noising_is_gaussian_cpu,
    forward_noising_is_gaussian_cuda
);
