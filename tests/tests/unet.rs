//! The network: shapes, batch independence (no batch statistics), finite gradients reaching
//! every layer, and a time input that changes the output.

use ddpm::loss::euclidean_loss;
use ddpm::unet::{TimeEmbedding, UNet, UNetConfig};
use ddpm_tests::{small_unet, test_device};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The small test network and two variants: learned t with three channels, and three levels
/// with two blocks each.
fn configs() -> Vec<UNetConfig> {
    let small = small_unet(50);
    vec![
        small.clone(),
        UNetConfig {
            time_embedding: TimeEmbedding::Learned,
            in_channels: 3,
            ..small.clone()
        },
        UNetConfig {
            channel_mults: vec![1, 1, 2],
            blocks_per_level: 2,
            image_size: 12,
            ..small
        },
    ]
}

fn build(cfg: &UNetConfig, kind: Kind, device: Device) -> (VarStore, UNet) {
    tch::manual_seed(7);
    let mut vs = VarStore::new(device);
    let net = UNet::new(&vs.root(), cfg).unwrap();
    vs.set_kind(kind);
    (vs, net)
}

fn batch(cfg: &UNetConfig, b: i64, kind: Kind, device: Device) -> (Tensor, Tensor) {
    let x = Tensor::randn(
        [b, cfg.in_channels, cfg.image_size, cfg.image_size],
        (kind, device),
    );
    let t = Tensor::randint_low(1, cfg.t_max + 1, [b], (Kind::Int64, device));
    (x, t)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().to_kind(Kind::Double).double_value(&[])
}

fn shapes_and_kinds(device: Device) {
    for cfg in configs() {
        for kind in [Kind::Float, Kind::Double] {
            let (_vs, net) = build(&cfg, kind, device);
            let (x, t) = batch(&cfg, 3, kind, device);
            let y = net.forward_t(&x, &t, false).unwrap();
            assert_eq!(y.size(), x.size(), "{cfg:?}");
            assert_eq!(y.kind(), kind);
            assert!(max_abs(&y).is_finite());
            // Wrong image size, channel count or t length are errors.
            let wrong = Tensor::zeros(
                [3, cfg.in_channels, cfg.image_size + 2, cfg.image_size],
                (kind, device),
            );
            assert!(net.forward_t(&wrong, &t, false).is_err());
            assert!(net
                .forward_t(
                    &x.narrow(1, 0, 1).repeat([1, cfg.in_channels + 1, 1, 1]),
                    &t,
                    false
                )
                .is_err());
            assert!(net.forward_t(&x, &t.narrow(0, 0, 2), false).is_err());
        }
    }
}
test_device!(
    shapes_and_kinds,
    shapes_and_kinds_cpu,
    shapes_and_kinds_cuda
);

/// Each sample's output depends on that sample alone (GroupNorm, never BatchNorm), in
/// training mode too: a sample alone, and the batch reversed, give the same outputs. In f64
/// the only difference is the convolution's summation order, ~1e-15 of the output's scale;
/// 1e-10 is far below any real batch coupling.
fn batch_independence(device: Device) {
    for cfg in configs() {
        let (_vs, net) = build(&cfg, Kind::Double, device);
        let (x, t) = batch(&cfg, 5, Kind::Double, device);
        for train in [false, true] {
            let y = net.forward_t(&x, &t, train).unwrap();
            let scale = max_abs(&y);
            for i in 0..5 {
                let alone = net
                    .forward_t(&x.narrow(0, i, 1), &t.narrow(0, i, 1), train)
                    .unwrap();
                let diff = max_abs(&(alone - y.narrow(0, i, 1)));
                assert!(
                    diff <= 1e-10 * scale,
                    "{cfg:?}, train {train}: sample {i} alone differs by {diff:e}"
                );
            }
            let rev = Tensor::from_slice(&[4i64, 3, 2, 1, 0]).to_device(device);
            let y_rev = net
                .forward_t(&x.index_select(0, &rev), &t.index_select(0, &rev), train)
                .unwrap();
            let diff = max_abs(&(y_rev - y.index_select(0, &rev)));
            assert!(
                diff <= 1e-10 * scale,
                "{cfg:?}: reversing the batch changes outputs by {diff:e}"
            );
        }
    }
}
test_device!(
    batch_independence,
    batch_independence_cpu,
    batch_independence_cuda
);

/// The Euclidean loss back-propagates finite, non-zero gradients into every variable (for a
/// learned embedding, the rows of the batch's t), so no layer is disconnected.
fn gradients_are_finite_and_reach_every_layer(device: Device) {
    for cfg in configs() {
        let (vs, net) = build(&cfg, Kind::Float, device);
        let (x, t) = batch(&cfg, 4, Kind::Float, device);
        let eps = Tensor::randn_like(&x);
        let loss = euclidean_loss(&eps, &net.forward_t(&x, &t, true).unwrap()).unwrap();
        loss.backward();
        for (name, var) in vs.variables() {
            let g = var.grad();
            assert!(g.defined(), "{name}: no gradient");
            let g_max = max_abs(&g);
            assert!(g_max.is_finite(), "{name}: non-finite gradient");
            assert!(
                g_max > 0.0,
                "{name}: zero gradient, the layer is disconnected"
            );
        }
    }
}
test_device!(
    gradients_are_finite_and_reach_every_layer,
    gradients_are_finite_and_reach_every_layer_cpu,
    gradients_are_finite_and_reach_every_layer_cuda
);

/// Changing t changes the output, and only for the sample whose t changed. The threshold 1e-3
/// of the output's scale is far above f32 roundoff (1e-6) and far below what a working
/// embedding gives at initialisation (order one).
fn time_changes_the_output(device: Device) {
    for cfg in configs() {
        let (_vs, net) = build(&cfg, Kind::Float, device);
        let (x, _) = batch(&cfg, 3, Kind::Float, device);
        let t1 = Tensor::from_slice(&[1i64, 1, 1]).to_device(device);
        let t2 = Tensor::from_slice(&[cfg.t_max, 1, 1]).to_device(device);
        let y1 = net.forward_t(&x, &t1, false).unwrap();
        let y2 = net.forward_t(&x, &t2, false).unwrap();
        let scale = max_abs(&y1);
        let changed = max_abs(&(y1.narrow(0, 0, 1) - y2.narrow(0, 0, 1)));
        assert!(
            changed > 1e-3 * scale,
            "{cfg:?}: t = 1 and t = T give outputs {changed:e} apart"
        );
        let others = max_abs(&(y1.narrow(0, 1, 2) - y2.narrow(0, 1, 2)));
        assert!(
            others <= 1e-5 * scale,
            "{cfg:?}: other samples moved by {others:e}"
        );
    }
}
test_device!(
    time_changes_the_output,
    time_changes_the_output_cpu,
    time_changes_the_output_cuda
);
