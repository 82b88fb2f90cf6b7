//! k steps of the tch LAMB equal k steps of the reference LAMB on random parameters and
//! gradients, adapted (trust ratio, weight decay) and excluded (norms, biases) alike; the
//! `Lamb` optimiser picks the exclusions by the contract's rule and restores its state exactly.

use ddpm::lamb::{lamb_update, Lamb, LambConfig};
use ddpm_reference::lamb::{LambConfig as RefConfig, LambState};
use ddpm_tests::{
    arrayd, check, close, close_in_norm, close_scaled, seed, tensor, test_device, values,
};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn ref_config(c: &LambConfig) -> RefConfig {
    RefConfig {
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weight_decay: c.weight_decay,
    }
}

fn config() -> impl Strategy<Value = LambConfig> {
    (
        1e-4f64..0.1,
        0.0f64..0.99,
        0.9f64..0.9999,
        prop_oneof![Just(1e-6), 1e-8f64..1e-3],
        prop_oneof![Just(0.0), 0.0f64..0.1],
    )
        .prop_map(|(lr, beta1, beta2, eps, weight_decay)| LambConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            max_grad_norm: None,
        })
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        prop::collection::vec(1usize..6, 1),
        prop::collection::vec(1usize..6, 2),
        prop::collection::vec(1usize..4, 4),
    ]
}

fn draw(shape: &[usize], rng: &mut StdRng) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.sample(StandardNormal))
}

/// f64: k ≤ 6 steps run on both sides independently; each step does the same few operations
/// on O(1) values, so the trajectories stay ~1e-15 apart relative to the arrays' size, and
/// 1e-10 is loose. f32: the reference restarts each step from the tch state (so that errors
/// do not compound) and one step is compared, each value against the sizes of the terms it
/// sums: w' = w − lr·r·u is one rounding of |w| plus ~(10 + sqrt(n)) roundings (u = 6e-8) of
/// |lr·r·u| (the Adam ratio, the two norms of the trust ratio), ≲ 25u ≈ 1.5e-6; the moments
/// are three roundings. 5e-6 leaves a factor 3.
const TOL: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 5e-6)];

fn lamb_steps_agree(device: Device) {
    check(
        128,
        (config(), shape(), 1usize..=6, any::<bool>(), seed()),
        |(cfg, shape, k, adapt, sd)| {
            for (kind, tol) in TOL {
                let mut rng = StdRng::seed_from_u64(sd);
                let f32_trajectory = kind == Kind::Float;
                let round = |a: ArrayD<f64>| {
                    if f32_trajectory {
                        a.mapv(|v| v as f32 as f64)
                    } else {
                        a
                    }
                };
                let mut w_ref = round(draw(&shape, &mut rng));
                let mut state = LambState::new(&shape);
                let mut w = tensor(&w_ref, kind, device);
                let (mut m, mut v) = (w.zeros_like(), w.zeros_like());
                for step in 1..=k {
                    let g = round(draw(&shape, &mut rng) * 0.1);
                    if f32_trajectory {
                        w_ref = arrayd(&w);
                        state.m = arrayd(&m);
                        state.v = arrayd(&v);
                    }
                    let (w_prev, m_prev) = (w_ref.clone(), state.m.clone());
                    lamb_update(
                        &mut w,
                        &tensor(&g, kind, device),
                        &mut m,
                        &mut v,
                        step as i64,
                        &cfg,
                        adapt,
                    )
                    .unwrap();
                    let r = ddpm_reference::lamb::lamb_update(
                        &ref_config(&cfg),
                        &mut w_ref,
                        &g,
                        &mut state,
                        adapt,
                    )
                    .unwrap();
                    prop_assert_eq!(state.step, step as u64);
                    let what =
                        format!("{kind:?}, step {step} of {k}, adapt {adapt}, trust ratio {r}");
                    // Each result is measured against the sizes of the terms it is the sum of.
                    let w_scale = w_prev.mapv(f64::abs) + (&w_prev - &w_ref).mapv(f64::abs);
                    let m_scale =
                        m_prev.mapv(f64::abs) * cfg.beta1 + g.mapv(f64::abs) * (1.0 - cfg.beta1);
                    let flat = |a: &ArrayD<f64>| a.iter().copied().collect::<Vec<f64>>();
                    close_scaled(
                        &format!("w, {what}"),
                        &values(&w),
                        &flat(&w_ref),
                        &flat(&w_scale),
                        tol,
                    )?;
                    close_scaled(
                        &format!("m, {what}"),
                        &values(&m),
                        &flat(&state.m),
                        &flat(&m_scale),
                        tol,
                    )?;
                    close(
                        &format!("v, {what}"),
                        &values(&v),
                        &flat(&state.v),
                        tol,
                        f64::MIN_POSITIVE,
                    )?;
                }
            }
            Ok(())
        },
    );
}
test_device!(
    lamb_steps_agree,
    lamb_steps_agree_cpu,
    lamb_steps_agree_cuda
);

/// Variables named as the network names them, with the partition the contract asks for:
/// adapted weights; excluded biases and normalisation parameters (by name, whatever their
/// dimension) and other vectors.
const VARIABLES: [(&str, &[i64], bool); 6] = [
    ("lin.weight", &[3, 4], true),
    ("conv.weight", &[2, 3, 2, 2], true),
    ("lin.bias", &[4], false),
    ("norm1.weight", &[4], false),
    ("up.0.norm_out.weight", &[2, 2], false),
    ("scale", &[5], false),
];

fn var_store(device: Device, seed: i64) -> VarStore {
    tch::manual_seed(seed);
    let mut vs = VarStore::new(device);
    for (name, shape, _) in VARIABLES {
        let mut path = vs.root();
        let mut parts: Vec<&str> = name.split('.').collect();
        let leaf = parts.pop().unwrap();
        for p in parts {
            path = path / p;
        }
        let _ = path.var(
            leaf,
            shape,
            tch::nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
    }
    vs.set_kind(Kind::Double);
    vs
}

/// Sets every variable's gradient to `grads[name]` through the loss Σ ⟨w, g⟩.
fn set_grads(vs: &VarStore, grads: &[(String, Tensor)]) {
    let vars = vs.variables();
    let loss = grads
        .iter()
        .map(|(name, g)| (&vars[name] * g).sum(Kind::Double))
        .fold(Tensor::zeros([], (Kind::Double, vs.device())), |a, b| a + b);
    loss.backward();
}

fn random_grads(vs: &VarStore, rng: &mut StdRng) -> Vec<(String, Tensor)> {
    VARIABLES
        .iter()
        .map(|(name, shape, _)| {
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            (
                name.to_string(),
                tensor(&(draw(&dims, rng) * 0.1), Kind::Double, vs.device()),
            )
        })
        .collect()
}

/// The optimiser over a VarStore: its partition is the contract's, and k steps equal the
/// reference applied variable by variable with that partition (f64, tolerance as above).
fn optimiser_matches_reference(device: Device) {
    check(32, (config(), 1usize..=5, seed()), |(cfg, k, sd)| {
        let vs = var_store(device, sd as i64 & 0xffff);
        let mut opt = Lamb::new(&vs, cfg).unwrap();
        let (adapted, excluded) = opt.partition();
        let mut want_adapted: Vec<&str> = VARIABLES.iter().filter(|v| v.2).map(|v| v.0).collect();
        let mut want_excluded: Vec<&str> = VARIABLES.iter().filter(|v| !v.2).map(|v| v.0).collect();
        let (mut adapted, mut excluded) = (adapted.to_vec(), excluded.to_vec());
        for list in [
            &mut adapted,
            &mut excluded,
            &mut want_adapted,
            &mut want_excluded,
        ] {
            list.sort();
        }
        prop_assert_eq!(adapted, want_adapted);
        prop_assert_eq!(excluded, want_excluded);

        let vars = vs.variables();
        let mut reference: Vec<(ArrayD<f64>, LambState, bool)> = VARIABLES
            .iter()
            .map(|(name, _, adapt)| {
                let w = arrayd(&vars[*name]);
                let state = LambState::new(w.shape());
                (w, state, *adapt)
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(sd);
        for step in 1..=k {
            let grads = random_grads(&vs, &mut rng);
            opt.zero_grad();
            set_grads(&vs, &grads);
            let _grad_norm = opt.step().unwrap();
            prop_assert_eq!(opt.step_count(), step as i64);
            for ((name, _, _), ((w, state, adapt), (_, g))) in
                VARIABLES.iter().zip(reference.iter_mut().zip(&grads))
            {
                ddpm_reference::lamb::lamb_update(&ref_config(&cfg), w, &arrayd(g), state, *adapt)
                    .unwrap();
                let got = values(&vs.variables()[*name]);
                close_in_norm(
                    &format!("{name} after step {step}"),
                    &got,
                    w.as_slice().unwrap(),
                    1e-10,
                )?;
            }
        }
        Ok(())
    });
}
test_device!(
    optimiser_matches_reference,
    optimiser_matches_reference_cpu,
    optimiser_matches_reference_cuda
);

/// Saving the state after two steps and restoring it into a fresh optimiser over a copy of the
/// variables gives the same third step, bit for bit (the checkpoint path).
fn state_round_trip(device: Device) {
    let cfg = LambConfig::default();
    let mut rng = StdRng::seed_from_u64(5);
    let vs = var_store(device, 1);
    let mut opt = Lamb::new(&vs, cfg).unwrap();
    for _ in 0..2 {
        let grads = random_grads(&vs, &mut rng);
        opt.zero_grad();
        set_grads(&vs, &grads);
        let _grad_norm = opt.step().unwrap();
    }
    let saved: Vec<(String, Tensor)> = opt
        .state()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let mut copy = var_store(device, 2);
    copy.copy(&vs).unwrap();
    let mut restored = Lamb::new(&copy, cfg).unwrap();
    restored.load_state(&saved).unwrap();
    assert_eq!(restored.step_count(), 2);
    let grads = random_grads(&vs, &mut rng);
    for (store, o) in [(&vs, &mut opt), (&copy, &mut restored)] {
        o.zero_grad();
        set_grads(store, &grads);
        let _grad_norm = o.step().unwrap();
    }
    for (name, _, _) in VARIABLES {
        let (a, b) = (
            values(&vs.variables()[name]),
            values(&copy.variables()[name]),
        );
        assert_eq!(a, b, "{name} differs after the restored step");
    }
    // A state for another model is refused.
    let other = VarStore::new(device);
    let _ = other.root().var("w", &[2, 2], tch::nn::Init::Const(1.0));
    assert!(Lamb::new(&other, cfg).unwrap().load_state(&saved).is_err());
}
test_device!(
    state_round_trip,
    state_round_trip_cpu,
    state_round_trip_cuda
);

/// The per-tensor LAMB the optimiser ran before its buffers were flat (one variable at a time,
/// libtorch's `norm` for the trust ratio and the global norm), kept here only as the oracle of
/// `flat_step_equals_the_per_tensor_update`.
fn per_tensor_step(
    vars: &mut [(String, Tensor, Tensor, Tensor, Tensor, bool)],
    step: i64,
    cfg: &LambConfig,
) {
    tch::no_grad(|| {
        let squares: Vec<Tensor> = vars
            .iter()
            .map(|(_, _, g, _, _, _)| g.norm().to_kind(Kind::Double).square())
            .collect();
        let norm = Tensor::stack(&squares, 0).sum(Kind::Double).sqrt();
        let scale = cfg.max_grad_norm.map(|c| {
            (norm + 1e-6)
                .divide_scalar(c)
                .pow_tensor_scalar(-1)
                .clamp_max(1.0)
        });
        for (_, w, g, m, v, adapt) in vars.iter_mut() {
            let g = match &scale {
                Some(k) => &*g * k.to_kind(g.kind()),
                None => g.shallow_clone(),
            };
            let _ = m.g_mul_scalar_(cfg.beta1).g_add_(&(&g * (1.0 - cfg.beta1)));
            let _ = v
                .g_mul_scalar_(cfg.beta2)
                .g_add_(&(g.square() * (1.0 - cfg.beta2)));
            let m_hat = &*m / (1.0 - cfg.beta1.powi(step as i32));
            let v_hat = &*v / (1.0 - cfg.beta2.powi(step as i32));
            let mut update = m_hat / (v_hat.sqrt() + cfg.eps);
            if *adapt {
                if cfg.weight_decay != 0.0 {
                    let _ = update.g_add_(&(&*w * cfg.weight_decay));
                }
                let (wn, un) = (w.norm(), update.norm());
                let both = wn.gt(0.0).logical_and(&un.gt(0.0));
                let ratio = (wn / un).where_scalarother(&both, 1.0);
                let _ = update.g_mul_(&ratio);
            }
            let _ = w.g_sub_(&(update * cfg.lr));
        }
    });
}

/// f32, the variables of `VARIABLES`: each step of the flat optimiser from a given state equals
/// one per-tensor step (`per_tensor_step`) from the same state on the same gradients. The two
/// do the same f32 operations element by element in the same order; only the reductions differ
/// (the flat path sums squares in f64 over segments, libtorch's `norm` in its own order), so:
/// * without clipping, m and v, and the weights of the excluded variables (r = 1), are equal
///   bit for bit;
/// * an adapted weight w' = w − lr·r·u differs through r alone: ‖w‖ and ‖u‖ are each within a
///   few ulps (u = 2⁻²⁴) of exact on both sides (≤ 60 terms, accumulated in f64 or pairwise), so r
///   is within ~8u relative and w' within 8u·|lr·r·u| plus one rounding of |w'|: 2e-6 of
///   |w| + |Δw| is a factor ~4 above that;
/// * with clipping, the clip factor differs likewise, and everything within the same bound.
fn flat_step_equals_the_per_tensor_update(device: Device) {
    check(32, (config(), any::<bool>(), seed()), |(cfg, clip, sd)| {
        let cfg = LambConfig {
            max_grad_norm: clip.then_some(0.05),
            ..cfg
        };
        let mut vs = var_store(device, sd as i64 & 0xffff);
        vs.set_kind(Kind::Float);
        let mut opt = Lamb::new(&vs, cfg).unwrap();
        let adapted: Vec<String> = opt.partition().0.iter().map(|s| s.to_string()).collect();
        let mut rng = StdRng::seed_from_u64(sd);
        for step in 1..=3i64 {
            let grads: Vec<(String, Tensor)> = random_grads(&vs, &mut rng)
                .into_iter()
                .map(|(n, g)| (n, g.to_kind(Kind::Float)))
                .collect();
            // The oracle starts from the optimiser's state before this step.
            let state: std::collections::HashMap<String, Tensor> = opt
                .state()
                .into_iter()
                .map(|(n, t)| (n, t.copy()))
                .collect();
            let mut oracle: Vec<(String, Tensor, Tensor, Tensor, Tensor, bool)> = grads
                .iter()
                .map(|(n, g)| {
                    (
                        n.clone(),
                        vs.variables()[n].detach().copy(),
                        g.shallow_clone(),
                        state[&format!("m.{n}")].shallow_clone(),
                        state[&format!("v.{n}")].shallow_clone(),
                        adapted.contains(n),
                    )
                })
                .collect();
            let before: std::collections::HashMap<String, Vec<f64>> = oracle
                .iter()
                .map(|(n, w, ..)| (n.clone(), values(w)))
                .collect();
            per_tensor_step(&mut oracle, step, &cfg);
            opt.zero_grad();
            set_grads(&vs, &grads);
            let _ = opt.step().unwrap();
            let after: std::collections::HashMap<String, Tensor> =
                opt.state().into_iter().collect();
            for (n, w, _, m, v, adapt) in &oracle {
                let got = values(&vs.variables()[n]);
                let want = values(w);
                let what = format!("{n}, step {step}, clip {clip}, adapt {adapt}");
                if !clip {
                    prop_assert_eq!(values(&after[&format!("m.{n}")]), values(m), "m: {}", what);
                    prop_assert_eq!(values(&after[&format!("v.{n}")]), values(v), "v: {}", what);
                    if !adapt {
                        prop_assert_eq!(&got, &want, "w: {}", what);
                    }
                }
                let scale: Vec<f64> = before[n]
                    .iter()
                    .zip(&want)
                    .map(|(b, a)| b.abs() + (a - b).abs())
                    .collect();
                close_scaled(&format!("w, {what}"), &got, &want, &scale, 2e-6)?;
            }
        }
        Ok(())
    });
}
test_device!(
    flat_step_equals_the_per_tensor_update,
    flat_step_equals_the_per_tensor_update_cpu,
    flat_step_equals_the_per_tensor_update_cuda
);

/// The cost of one optimiser step on the mnist preset's network (473,345 parameters), CPU,
/// one thread: the flat `Lamb::step` against the per-tensor oracle above on the same
/// gradients, after each has warmed up; printed (`--ignored --nocapture`), and the two results
/// held together as in `flat_step_equals_the_per_tensor_update`. docs/performance.md quotes it.
#[test]
#[ignore = "timing: run with --ignored --nocapture to print the CPU cost of a step"]
fn optimiser_step_cost_on_the_mnist_network() {
    tch::set_num_threads(1);
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let net = ddpm::unet::UNet::new(&vs.root(), &ddpm::unet::UNetConfig::mnist()).unwrap();
    let cfg = LambConfig::default();
    let mut opt = Lamb::new(&vs, cfg).unwrap();
    let adapted: Vec<String> = opt.partition().0.iter().map(|s| s.to_string()).collect();
    let x = Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[3i64, 50, 100, 200, 400, 600, 800, 999]);
    opt.zero_grad();
    net.forward_t(&x, &t, true)
        .unwrap()
        .square()
        .sum(Kind::Float)
        .backward();
    let mut oracle: Vec<(String, Tensor, Tensor, Tensor, Tensor, bool)> = vs
        .variables()
        .into_iter()
        .map(|(n, w)| {
            let g = w.grad().copy();
            let a = adapted.contains(&n);
            (n, w.detach().copy(), g, w.zeros_like(), w.zeros_like(), a)
        })
        .collect();
    let n = 30;
    let time = |f: &mut dyn FnMut()| {
        f();
        let start = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        start.elapsed().as_secs_f64() / n as f64
    };
    let mut k = 0;
    let flat = time(&mut || {
        let _ = opt.step().unwrap();
    });
    let per_tensor = time(&mut || {
        k += 1;
        per_tensor_step(&mut oracle, k, &cfg);
    });
    println!(
        "{} variables ({} adapted), {} parameters: flat step {:.2} ms, per-tensor step {:.2} ms \
         ({:.2}×)",
        oracle.len(),
        adapted.len(),
        oracle.iter().map(|o| o.1.numel()).sum::<usize>(),
        flat * 1e3,
        per_tensor * 1e3,
        per_tensor / flat
    );
    // Both took n + 1 steps from the same start on the same gradients.
    for (name, w, ..) in &oracle {
        let got = values(&vs.variables()[name]);
        let want = values(w);
        let scale: Vec<f64> = want.iter().map(|v| v.abs() + 1e-3).collect();
        close_scaled(name, &got, &want, &scale, 1e-4).unwrap();
    }
}
