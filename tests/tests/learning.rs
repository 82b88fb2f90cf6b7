//! Learning: the crate's training pieces (marginal, t sampling, Euclidean loss, LAMB, lr
//! schedule) drive a network toward the exact oracle.
//!
//! 1. A small MLP (built here from tch::nn: the crate's U-Net is for images) trained on a 2-D
//!    Gaussian mixture: its loss approaches the oracle's minimum loss and its predictor the
//!    oracle, as relative L2 error averaged over a grid of t.
//! 2. The smallest U-Net overfit to one image (Dirac data): its predictor approaches the Dirac
//!    oracle (x_t − ᾱ_t c)/β̄_t.
//!
//! Both are seeded and run on the CPU in seconds; the bounds were measured on this machine
//! (numbers in the comments) and are set with room for other seeds and libtorch builds,
//! while the untrained networks are checked to miss them by far, so the tests can fail.

use ddpm::lamb::{Lamb, LambConfig};
use ddpm::loss::euclidean_loss;
use ddpm::lr::LrSchedule;
use ddpm::marginal::marginal_sample;
use ddpm::oracle::{DataLaw, Oracle};
use ddpm::sampler::NoisePredictor;
use ddpm::schedule::{Schedule, ScheduleKind};
use ddpm::unet::UNet;
use ddpm_tests::{single_thread, small_unet};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

const T: i64 = 200;

/// Training steps, overridable for measurement (`DDPM_LEARNING_STEPS`).
fn steps(default: u64) -> u64 {
    std::env::var("DDPM_LEARNING_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// ε̂(x_t, t) = MLP([x_t, φ(t/T)]), φ = (t/T, sin 2πk t/T, cos 2πk t/T for k = 1..8).
struct Mlp {
    net: nn::Sequential,
}

impl Mlp {
    fn new(vs: &VarStore) -> Mlp {
        let p = vs.root();
        let net = nn::seq()
            .add(nn::linear(&p / "l1", 2 + 17, 128, Default::default()))
            .add_fn(|x| x.silu())
            .add(nn::linear(&p / "l2", 128, 128, Default::default()))
            .add_fn(|x| x.silu())
            .add(nn::linear(&p / "l3", 128, 2, Default::default()));
        Mlp { net }
    }
}

impl NoisePredictor for Mlp {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> ddpm::error::Result<Tensor> {
        let u = (t.to_kind(Kind::Float) / T as f64).unsqueeze(1);
        let k = Tensor::arange_start(1, 9, (Kind::Float, x_t.device())).unsqueeze(0);
        let arg = &u * &k * (2.0 * std::f64::consts::PI);
        let feats = Tensor::cat(&[x_t.shallow_clone(), u, arg.sin(), arg.cos()], 1);
        Ok(self.net.forward(&feats))
    }
}

fn mixture(device: Device) -> DataLaw {
    let opts = (Kind::Double, device);
    DataLaw::mixture(
        &Tensor::from_slice(&[0.5, 0.3, 0.2]).to_device(device),
        &Tensor::from_slice(&[-1.0, 0.0, 1.0, 0.5, 0.0, -1.0])
            .reshape([3, 2])
            .to_device(device),
        &Tensor::from_slice(&[0.3, 0.2, 0.25])
            .to_kind(opts.0)
            .to_device(device),
    )
    .unwrap()
}

/// One training run of the crate's pieces: x_0 from `draw`, t ~ U{1..T}, the Euclidean loss,
/// LAMB with warm-up and linear decay.
fn train(
    model: &dyn NoisePredictor,
    vs: &VarStore,
    schedule: &Schedule,
    steps: u64,
    lr: f64,
    draw: &dyn Fn() -> Tensor,
) {
    let mut opt = Lamb::new(
        vs,
        LambConfig {
            lr,
            weight_decay: 0.0,
            ..LambConfig::default()
        },
    )
    .unwrap();
    let lrs = LrSchedule::new(lr, steps / 20, &[(steps, 0.05)]).unwrap();
    for step in 1..=steps {
        let x0 = draw();
        let b = x0.size()[0];
        let t = schedule.sample_t(b, x0.device());
        let eps = x0.randn_like();
        let x_t = marginal_sample(schedule, &x0, &t, &eps).unwrap();
        let loss = euclidean_loss(&eps, &model.predict(&x_t, &t).unwrap()).unwrap();
        opt.set_lr(lrs.lr(step));
        opt.zero_grad();
        loss.backward();
        let _grad_norm = opt.step().unwrap();
    }
}

/// Mean over a grid of t of ‖ε̂ − ε*‖/‖ε*‖ on x_t drawn from the marginal of `x0`.
fn relative_error(
    model: &dyn NoisePredictor,
    oracle: &Oracle,
    schedule: &Schedule,
    x0: &Tensor,
    grid: &[i64],
) -> f64 {
    tch::no_grad(|| {
        let errs: Vec<f64> = grid
            .iter()
            .map(|&t| {
                let tt = Tensor::full([x0.size()[0]], t, (Kind::Int64, x0.device()));
                let x_t = marginal_sample(schedule, x0, &tt, &x0.randn_like()).unwrap();
                let want = oracle.predict(&x_t, &tt).unwrap();
                let diff = (model.predict(&x_t, &tt).unwrap() - &want)
                    .norm()
                    .double_value(&[]);
                diff / want.norm().double_value(&[])
            })
            .collect();
        errs.iter().sum::<f64>() / errs.len() as f64
    })
}

/// Unweighted loss (8) of a predictor on a fixed evaluation set (x_0, ε, t).
fn eval_loss(
    model: &dyn NoisePredictor,
    schedule: &Schedule,
    x0: &Tensor,
    eps: &Tensor,
    t: &Tensor,
) -> f64 {
    tch::no_grad(|| {
        let x_t = marginal_sample(schedule, x0, t, eps).unwrap();
        euclidean_loss(eps, &model.predict(&x_t, t).unwrap())
            .unwrap()
            .double_value(&[])
    })
}

/// Measured (seed 1, this 2-core CPU, one libtorch thread): after 3000 steps of batch 256
/// (5.5 s), loss 0.7986 against the oracle's minimum 0.7938 on 20000 evaluation draws (0.6%
/// above) and a relative L2 error of 0.074 averaged over t ∈ {10, 30, …, 190}; untrained:
/// loss 2.91 (3.7× the minimum), relative error 1.43. Bounds: loss within 3% of the minimum
/// (both losses share the evaluation draws, so the difference carries little sampling noise)
/// and mean relative error below 0.12 (1.6× the measured value).
#[test]
fn mlp_on_a_mixture_approaches_the_oracle() {
    let device = Device::Cpu;
    single_thread();
    tch::manual_seed(1);
    let schedule = Schedule::new(ScheduleKind::Article, T, device).unwrap();
    let law = mixture(device);
    let oracle = Oracle::new(law.clone(), &schedule);
    let vs = VarStore::new(device);
    let model = Mlp::new(&vs);

    let x0 = law.sample(20000, Kind::Float, device);
    let eps = x0.randn_like();
    let t = schedule.sample_t(20000, device);
    let grid: Vec<i64> = (0..10).map(|i| 10 + 20 * i).collect();
    let min_loss = eval_loss(&oracle, &schedule, &x0, &eps, &t);
    let before = (
        eval_loss(&model, &schedule, &x0, &eps, &t),
        relative_error(&model, &oracle, &schedule, &x0, &grid),
    );
    assert!(
        before.0 > 1.3 * min_loss && before.1 > 0.5,
        "the untrained MLP already fits: {before:?} vs {min_loss}"
    );

    let t0 = std::time::Instant::now();
    train(&model, &vs, &schedule, steps(3000), 5e-3, &|| {
        law.sample(256, Kind::Float, device)
    });
    let loss = eval_loss(&model, &schedule, &x0, &eps, &t);
    let rel = relative_error(&model, &oracle, &schedule, &x0, &grid);
    eprintln!("MLP trained in {:.1} s", t0.elapsed().as_secs_f64());
    eprintln!("MLP: loss {loss:.4}, oracle minimum {min_loss:.4}, relative L2 error {rel:.4} (untrained {before:?})");
    assert!(
        loss <= 1.03 * min_loss,
        "trained loss {loss} not within 3% of the oracle minimum {min_loss}"
    );
    assert!(
        loss >= min_loss * 0.99,
        "a loss below the minimum means the oracle is wrong: {loss} < {min_loss}"
    );
    assert!(
        rel < 0.12,
        "mean relative L2 error to the oracle {rel} ≥ 0.12"
    );
}

/// Measured (seed 2, this 2-core CPU, one libtorch thread): the 8×8 U-Net below (2 levels,
/// 8 channels) has relative L2 error to the Dirac oracle, averaged over t ∈ {5, 25, …, 195},
/// of 1.83 untrained, 0.127 after 600 steps of batch 16 and 0.076 after 1500 (17 s). Bound
/// 0.12 at 1500 steps (1.6× the measured value; 600 steps would not meet it).
#[test]
fn unet_overfits_one_image_to_the_dirac_oracle() {
    let device = Device::Cpu;
    single_thread();
    tch::manual_seed(2);
    let schedule = Schedule::new(ScheduleKind::Article, T, device).unwrap();
    let cfg = small_unet(T);
    let vs = VarStore::new(device);
    let net = UNet::new(&vs.root(), &cfg).unwrap();
    // One "image": a bright square on a dark background, on the 8-bit grid.
    let image = Tensor::full([1, 1, 8, 8], -1.0, (Kind::Float, device));
    let _ = image.narrow(2, 2, 4).narrow(3, 2, 4).fill_(1.0);
    let oracle = Oracle::new(DataLaw::dirac(&image.reshape([-1])).unwrap(), &schedule);
    let grid: Vec<i64> = (0..10).map(|i| 5 + 20 * i).collect();
    let x0 = image.repeat([64, 1, 1, 1]);
    let before = relative_error(&net, &oracle, &schedule, &x0, &grid);
    assert!(before > 0.5, "the untrained U-Net already fits: {before}");
    let t0 = std::time::Instant::now();
    train(&net, &vs, &schedule, steps(1500), 5e-3, &|| {
        image.repeat([16, 1, 1, 1])
    });
    let rel = relative_error(&net, &oracle, &schedule, &x0, &grid);
    eprintln!("U-Net trained in {:.1} s", t0.elapsed().as_secs_f64());
    eprintln!("U-Net on one image: relative L2 error {rel:.4} (untrained {before:.4})");
    assert!(
        rel < 0.15,
        "mean relative L2 error to the Dirac oracle {rel} ≥ 0.15"
    );
}
