//! The tch schedule tables equal the reference's for every kind and random T / α arrays.

use ddpm_tests::{check, close, schedule, test_device, values};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// Both sides build ᾱ_t as exp of a running sum of ln α_i in f64, summed in possibly different
/// orders: over ≤ 1000 terms of magnitude ≤ 100 the sums differ by ≲ 1e-12 absolutely, so
/// their exponentials by ≲ 1e-12 relatively; 1e-10 is that with room to spare.
const REL: f64 = 1e-10;

fn tables_agree(device: Device) {
    check(96, schedule(), |(spec, big_t)| {
        let r = spec.reference(big_t);
        let s = spec.tch(big_t, device);
        prop_assert_eq!(s.t_max() as usize, r.t_max());
        let floor = f64::MIN_POSITIVE;
        close(
            "α",
            &values(s.alphas()),
            r.alphas().as_slice().unwrap(),
            REL,
            floor,
        )?;
        close(
            "β",
            &values(s.betas()),
            r.betas().as_slice().unwrap(),
            REL,
            floor,
        )?;
        close(
            "ᾱ",
            &values(s.alpha_bars()),
            r.alpha_bars().as_slice().unwrap(),
            REL,
            floor,
        )?;
        close(
            "β̄",
            &values(s.beta_bars()),
            r.beta_bars().as_slice().unwrap(),
            REL,
            floor,
        )?;
        close(
            "α^Ho",
            &values(&s.ho_alphas()),
            r.ho_alphas().as_slice().unwrap(),
            REL,
            floor,
        )?;
        close(
            "β^Ho",
            &values(&s.ho_betas()),
            r.ho_betas().as_slice().unwrap(),
            REL,
            floor,
        )?;
        close(
            "ᾱ^Ho",
            &values(&s.ho_alpha_bars()),
            r.ho_alpha_bars().as_slice().unwrap(),
            REL,
            floor,
        )?;
        prop_assert_eq!(s.alphas().kind(), Kind::Double);
        Ok(())
    });
}
test_device!(tables_agree, tables_agree_cpu, tables_agree_cuda);

/// Gathering per-sample values picks table[t] and casts to the batch's kind: f64 exactly,
/// f32 to one rounding (the tables themselves are held to the reference above).
fn gathered_values_agree(device: Device) {
    let strategy = ddpm_tests::schedule_and_t().prop_flat_map(|(spec, big_t, t)| {
        (
            Just(spec),
            Just(big_t),
            prop::collection::vec(1..=big_t, 1..5),
            Just(t),
        )
    });
    check(48, strategy, |(spec, big_t, mut ts, t)| {
        ts.push(t);
        let s = spec.tch(big_t, device);
        let t_tensor =
            Tensor::from_slice(&ts.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(device);
        // A cast from f64 to f32 rounds once: relative error ≤ 2^-24 ≈ 6e-8.
        for (kind, rel) in [(Kind::Double, 0.0), (Kind::Float, 6e-8)] {
            let like = Tensor::zeros([ts.len() as i64, 2, 3], (kind, device));
            let pairs = [
                (s.alpha_at(&t_tensor, &like).unwrap(), values(s.alphas())),
                (s.beta_at(&t_tensor, &like).unwrap(), values(s.betas())),
                (
                    s.alpha_bar_at(&t_tensor, &like).unwrap(),
                    values(s.alpha_bars()),
                ),
                (
                    s.beta_bar_at(&t_tensor, &like).unwrap(),
                    values(s.beta_bars()),
                ),
            ];
            for (got, table) in pairs {
                prop_assert_eq!(got.size(), vec![ts.len() as i64, 1, 1]);
                prop_assert_eq!(got.kind(), kind);
                let want: Vec<f64> = ts.iter().map(|&t| table[t]).collect();
                close("gathered", &values(&got), &want, rel, f64::MIN_POSITIVE)?;
            }
        }
        Ok(())
    });
}
test_device!(
    gathered_values_agree,
    gathered_values_agree_cpu,
    gathered_values_agree_cuda
);

/// Invalid schedules are errors on both sides, never panics.
#[test]
fn both_sides_reject_the_same_invalid_alphas() {
    for bad in [
        vec![0.5, 1.0],
        vec![0.0, 0.5],
        vec![0.5, f64::NAN],
        vec![-0.1],
        vec![],
    ] {
        let r = ddpm_reference::Schedule::from_alphas(&bad);
        let s = ddpm::schedule::Schedule::from_alphas(&Tensor::from_slice(&bad));
        assert!(
            r.is_err() && s.is_err(),
            "α = {bad:?}: reference {r:?}, tch {:?}",
            s.is_ok()
        );
    }
}
