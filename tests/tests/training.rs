//! Training, end to end (issue 13): the product's trainer (`Trainer::new`, `train_step`,
//! `take_mean_loss`, the real loop `train_on`) answers to the reference.
//!
//! 1. The loss of a step on a hand-made batch (x_0, t, ε chosen here) equals the reference's
//!    loss (unweighted, and loss (8) with σ = β and isotropic σ) on the reference marginal
//!    x_t = ᾱ_t x_0 + β̄_t ε, with ε̂ from a copy of the pre-step network.
//! 2. The weights after that step equal reference LAMB (f64) on the pre-step weights, moments
//!    and the gradients of that loss, with the lr the schedule's definition gives; the EMA
//!    after the step equals the documented rule on the new weights.
//! 3. A short run of the real loop on a Gaussian mixture lowers the excess loss over the
//!    oracle's minimum, and its ε̂ approaches the exact oracle's in every t bucket.
//! 4. The training grids are drawn with the weights asked for (`sample.ema`).
//! 5. A short conditional run with label dropout approaches both the conditional and the
//!    unconditional oracle of a labelled mixture (issue 17).

use ddpm::checkpoint::{build_model, load_model, Weights};
use ddpm::config::{Config, DataSource, LossWeight};
use ddpm::data::loader::Batch;
use ddpm::data::mixture::GaussianMixture;
use ddpm::data::Dataset;
use ddpm::guidance::ConditionalPredictor;
use ddpm::oracle::{DataLaw, LabelledLaw, LabelledOracle};
use ddpm::progress::Silent;
use ddpm::sampler::{NoisePredictor, Sampler};
use ddpm::schedule::{Schedule, ScheduleKind};
use ddpm::sigma::SigmaChoice;
use ddpm::train::{train_on, StepOutcome, TrainOptions, Trainer};
use ddpm::unet::{is_channels_last, to_channels_last};
use ddpm_reference as reference;
use ddpm_tests::{array2, arrayd, normal, single_thread, small_unet, tensor, values};
use ndarray::{Array2, ArrayD};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// libtorch has one global generator (weight init, sampling, the mixture draws): the tests of
/// this file hold this lock so that their seeded draws repeat when they run in parallel.
fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh directory under the system's temporary directory, removed when the value drops.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ddpm-training-{name}-"))
        .tempdir()
        .unwrap()
}

fn opts(dir: PathBuf) -> TrainOptions {
    TrainOptions {
        run_dir: dir,
        device: Device::Cpu,
        resume: false,
        resume_must_match: false,
        stop: Default::default(),
        resume_data: Default::default(),
    }
}

/// The product's configuration around the harness's small U-Net (1×8×8, two levels, 8
/// channels, dropout 0), T steps of `schedule`, nothing written before the end of the run.
fn tiny(schedule: ScheduleKind, t_max: i64, steps: u64) -> Config {
    let mut cfg = Config::mnist();
    // The data go to `train_on` directly; `folder` only lifts MNIST's 28×28 check.
    cfg.data.source = DataSource::Folder;
    cfg.model = small_unet(t_max);
    cfg.diffusion.schedule = schedule;
    cfg.diffusion.t_max = t_max;
    cfg.train.steps = steps;
    cfg.train.batch_size = 4;
    cfg.train.warmup_steps = 5;
    cfg.train.lr_decay = vec![];
    cfg.train.checkpoint_every = steps.max(1);
    cfg.train.keep_last = 2;
    cfg.train.sample_every = 0;
    cfg.train.log_every = steps.max(1);
    cfg.sample.n = 4;
    cfg.train.grid_steps = Some(4);
    cfg
}

fn reference_kind(kind: ScheduleKind) -> reference::ScheduleKind {
    match kind {
        ScheduleKind::Article => reference::ScheduleKind::Article,
        ScheduleKind::Linear => reference::ScheduleKind::Linear,
        ScheduleKind::Cosine => reference::ScheduleKind::Cosine,
    }
}

fn reference_sigma(choice: SigmaChoice) -> reference::SigmaChoice {
    match choice {
        SigmaChoice::Posterior => reference::SigmaChoice::Posterior,
        SigmaChoice::Beta => reference::SigmaChoice::Beta,
        SigmaChoice::Isotropic { data_std } => reference::SigmaChoice::Isotropic { data_std },
    }
}

/// Named tensors as f64 arrays.
fn named_f64(named: &[(String, Tensor)]) -> HashMap<String, ArrayD<f64>> {
    named.iter().map(|(n, t)| (n.clone(), arrayd(t))).collect()
}

/// The lr of update k from the definition in docs (config: `train.lr`, linear warm-up over
/// `train.warmup_steps` from 0, no decay points): base · min(k / warmup, 1).
fn lr_by_definition(cfg: &Config, k: u64) -> f64 {
    let w = cfg.train.warmup_steps as f64;
    cfg.train.lr * (k as f64 / w).min(1.0)
}

/// The EMA decay of the j-th update (j = 0, 1, …) from `ema.rs`'s documented rule with warm-up:
/// d_j = min(decay, (1 + j)/(10 + j)); the average then moves as w̄ ← d w̄ + (1 − d) w.
fn ema_decay_by_definition(cfg: &Config, j: u64) -> f64 {
    let j = j as f64;
    cfg.train.ema_decay.min((1.0 + j) / (10.0 + j))
}

/// Items 1 and 2 for one weighting. Three updates on hand-made batches (so the second and
/// third run with non-zero moments and bias corrections k = 2, 3); each batch holds t = 1,
/// t = T and two times between, on a cosine schedule with T = 10, whose steps are large (so
/// noising at t − 1 moves x_t by ~β̄_1 ≈ 0.17 ε at t = 1).
fn one_step_against_the_reference(weight: LossWeight, sigma: SigmaChoice) {
    steps_against_the_reference(weight, sigma, false);
}

/// [`one_step_against_the_reference`] with `train.channels_last` as given: the trainer's
/// convolution weights then stay channels-last through its flat LAMB and EMA buffers, and the
/// copy whose gradients stand in for the trainer's is laid out the same way (so the two
/// forward passes are the same arithmetic, not only the same up to summation order).
fn steps_against_the_reference(weight: LossWeight, sigma: SigmaChoice, channels_last: bool) {
    let _rng = rng_lock();
    single_thread();
    const T: i64 = 10;
    let mut cfg = tiny(ScheduleKind::Cosine, T, 3);
    cfg.train.channels_last = channels_last;
    cfg.train.loss_weight = weight;
    cfg.train.loss_sigma = sigma;
    cfg.train.ema_decay = 0.999;
    cfg.train.ema_warmup = true;
    cfg.train.weight_decay = 0.01;
    cfg.train.grad_clip = None;
    let device = Device::Cpu;
    let mut trainer = Trainer::new(&cfg, device).unwrap();
    let rs = reference::Schedule::new(reference_kind(cfg.diffusion.schedule), T as usize).unwrap();
    let ts = Schedule::new(cfg.diffusion.schedule, T, device).unwrap();
    let (adapted, excluded) = trainer.optimizer().partition();
    let adapted: Vec<String> = adapted.into_iter().map(String::from).collect();
    assert!(
        !adapted.is_empty() && !excluded.is_empty(),
        "the U-Net has both adapted and excluded parameters"
    );
    // The classification is the documented one (docs/architecture.md, LAMB step: "excluded
    // params (norm weights, biases)"): a variable is excluded exactly when it is a bias or
    // belongs to a normalisation layer; the rest (conv and linear weights) are adapted.
    for (name, w) in trainer.var_store().variables() {
        let is_bias = name.rsplit('.').next() == Some("bias");
        let in_norm = name.split('.').any(|c| c.starts_with("norm"));
        assert_eq!(
            adapted.contains(&name),
            !(is_bias || in_norm),
            "{name} (shape {:?}) is {} by the trainer's LAMB",
            w.size(),
            if adapted.contains(&name) {
                "adapted"
            } else {
                "excluded"
            }
        );
    }
    let (b, d) = (4usize, 64usize);
    for k in 1..=3u64 {
        // The batch of step k, on the f32 grid so both sides see the same numbers.
        let x0 = normal(b, d, 100 + k).mapv(|v| (0.5 * v).clamp(-1.0, 1.0) as f32 as f64);
        let eps = normal(b, d, 200 + k).mapv(|v| v as f32 as f64);
        let t_list: Vec<usize> = vec![1, T as usize, 2 + k as usize, 7 - k as usize];
        let batch = Batch {
            step: k,
            x0: tensor(&x0, Kind::Float, device).view([b as i64, 1, 8, 8]),
            t: Tensor::from_slice(&t_list.iter().map(|&t| t as i64).collect::<Vec<_>>()),
            eps: tensor(&eps, Kind::Float, device).view([b as i64, 1, 8, 8]),
            torch_seed: 7,
            y: None,
        };

        // Before the step: weights, moments and average, and a copy of the network.
        let before = trainer.state();
        let w_pre = named_f64(&before.model);
        let optim_pre = named_f64(&before.optim);
        let ema_pre = named_f64(&before.ema);
        let (copy_vs, copy_net) = build_model(&cfg, device, 12345).unwrap();
        let mut copy_vs: VarStore = copy_vs;
        if channels_last {
            to_channels_last(&copy_vs).unwrap();
        }
        copy_vs.copy(trainer.var_store()).unwrap();

        // The reference marginal, and the copy's ε̂ on it. The copy is fed the crate's f32
        // x_t (so its gradients are those of the trainer's own forward pass, bit for bit,
        // when the trainer noises at t); that x_t is first held to the reference one.
        let mut x_t_ref = Array2::<f64>::zeros((b, d));
        for (i, &t) in t_list.iter().enumerate() {
            let row = reference::marginal::marginal_sample(
                &rs,
                &x0.slice(ndarray::s![i..i + 1, ..]).to_owned(),
                t,
                &eps.slice(ndarray::s![i..i + 1, ..]).to_owned(),
            )
            .unwrap();
            x_t_ref.row_mut(i).assign(&row.row(0));
        }
        let x_t = ddpm::marginal::marginal_sample(&ts, &batch.x0, &batch.t, &batch.eps).unwrap();
        // f32 marginal: ᾱ_t, β̄_t carry ~T·u relative error from the log-space products and
        // the sum adds one rounding, so 1e-5 of the largest entry (|x_t| ≤ ~5) is ample; a
        // marginal at the wrong t (t − 1) would move entries by 0.1 and more.
        let got = values(&x_t);
        let scale = x_t_ref.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (g, r) in got.iter().zip(x_t_ref.iter()) {
            assert!((g - r).abs() <= 1e-5 * scale, "x_t {g} vs reference {r}");
        }
        let eps_hat = copy_net.forward_t(&x_t, &batch.t, true).unwrap();
        let eps_hat_ref = array2(&eps_hat.detach());

        let want_loss = match weight {
            LossWeight::None => reference::loss::euclidean_loss(&eps, &eps_hat_ref).unwrap(),
            LossWeight::Article => {
                let mut sum = 0.0;
                for (i, &t) in t_list.iter().enumerate() {
                    let s_t = reference::sigma::sigma(&rs, reference_sigma(sigma), t).unwrap();
                    let row = |a: &Array2<f64>| a.slice(ndarray::s![i..i + 1, ..]).to_owned();
                    let want_xt = row(&x_t_ref);
                    let e_hat = row(&eps_hat_ref);
                    sum += reference::loss::weighted_loss(
                        &rs,
                        &row(&x0),
                        &row(&eps),
                        t,
                        s_t,
                        |xt: &Array2<f64>, tt: usize| {
                            // The reference asks the predictor at its own x_t and t.
                            assert_eq!(tt, t);
                            assert!(xt
                                .iter()
                                .zip(want_xt.iter())
                                .all(|(a, w)| (a - w).abs() < 1e-12));
                            e_hat.clone()
                        },
                    )
                    .unwrap();
                }
                sum / b as f64
            }
            LossWeight::MinSnr => {
                let mut sum = 0.0;
                for (i, &t) in t_list.iter().enumerate() {
                    let row = |a: &Array2<f64>| a.slice(ndarray::s![i..i + 1, ..]).to_owned();
                    let e_hat = row(&eps_hat_ref);
                    sum += reference::loss::min_snr_loss(
                        &rs,
                        &row(&x0),
                        &row(&eps),
                        t,
                        cfg.train.min_snr_gamma,
                        |_: &Array2<f64>, _: usize| e_hat.clone(),
                    )
                    .unwrap();
                }
                sum / b as f64
            }
        };

        // The gradient of that same loss on the copy, through the crate's loss (the one test
        // 1 holds to the reference).
        let loss = match weight {
            LossWeight::None => ddpm::loss::euclidean_loss(&batch.eps, &eps_hat).unwrap(),
            LossWeight::Article => {
                let table = sigma.table(&ts).unwrap();
                ddpm::loss::weighted_loss(&ts, &table, &batch.t, &batch.eps, &eps_hat).unwrap()
            }
            LossWeight::MinSnr => ddpm::loss::min_snr_loss(
                &ts,
                cfg.train.min_snr_gamma,
                &batch.t,
                &batch.eps,
                &eps_hat,
            )
            .unwrap(),
        };
        loss.backward();
        let grads: HashMap<String, ArrayD<f64>> = copy_vs
            .variables()
            .into_iter()
            .map(|(n, v)| (n, arrayd(&v.grad())))
            .collect();

        // The product's step.
        let outcome = trainer.train_step(&batch).unwrap();
        assert_eq!(outcome, StepOutcome::Updated);
        for (name, w) in trainer.var_store().variables() {
            // Through LAMB's and the EMA's flat buffers, the layout asked for (a 1×1 kernel
            // is both).
            let laid_out = w.dim() != 4
                || if channels_last {
                    is_channels_last(&w)
                } else {
                    w.is_contiguous()
                };
            assert!(laid_out, "{name} {:?}: strides {:?}", w.size(), w.stride());
        }
        // The gradient norm it reports (metrics.jsonl's grad_norm) is that of these gradients:
        // an f32 sum of ~10⁴ squares, so 1e-5 relative is ample.
        let want_norm = grads
            .values()
            .flat_map(|g| g.iter())
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt();
        let got_norm = trainer.last_grad_norm().unwrap();
        assert!(
            (got_norm - want_norm).abs() <= 1e-5 * want_norm,
            "step {k}: grad norm {got_norm}, of the gradients {want_norm}"
        );
        let got_loss = trainer.take_mean_loss().unwrap();
        // f32: the loss sums 256 squares of O(1) after a forward pass of ~20 layers, each an
        // f32 sum of ≤ 16·9 products: relative roundoff ~1e-6; 1e-4 leaves a factor 100.
        // Measured under the mutation "noise at t − 1 in train_step": the unweighted loss moved
        // by 7e-4 of itself (7× this bound), the weighted ones by 1.7%; the moment and weight
        // checks below catch that mutation on their own too (m off by ~10%).
        assert!(
            (got_loss - want_loss).abs() <= 1e-4 * want_loss,
            "step {k} ({weight:?}, {sigma:?}): trainer's loss {got_loss}, reference {want_loss}"
        );

        // Reference LAMB, f64, per tensor.
        let lr = lr_by_definition(&cfg, k);
        // The rate the trainer reports (metrics.jsonl's lr) is the one it stepped with.
        assert_eq!(trainer.current_lr(), lr, "step {k}: reported lr");
        let lamb_cfg = reference::lamb::LambConfig {
            lr,
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: cfg.train.eps,
            weight_decay: cfg.train.weight_decay,
        };
        let after = trainer.state();
        let w_post = named_f64(&after.model);
        let ema_post = named_f64(&after.ema);
        let optim_post = named_f64(&after.optim);
        assert_eq!(w_post.len(), w_pre.len());
        for (name, pre) in &w_pre {
            let mut w = pre.clone();
            let mut state = reference::lamb::LambState {
                m: optim_pre[&format!("m.{name}")].clone(),
                v: optim_pre[&format!("v.{name}")].clone(),
                step: k - 1,
            };
            let g = &grads[name];
            let adapt = adapted.contains(name);
            reference::lamb::lamb_update(&lamb_cfg, &mut w, g, &mut state, adapt).unwrap();
            // The moments the trainer now holds are the reference's: m = β1 m + (1−β1) g (and
            // v alike with g²) is three f32 roundings, each within half an ulp of the terms'
            // sizes |β1 m| + |(1−β1) g|, so 4 ulps (2⁻²² relative) of that sum bounds it even
            // where the terms cancel.
            let (b1, b2) = (cfg.train.beta1, cfg.train.beta2);
            for (key, want) in [("m", &state.m), ("v", &state.v)] {
                let full = format!("{key}.{name}");
                let got = &optim_post[&full];
                let prev = &optim_pre[&full];
                for (((gv, w), p), gr) in got.iter().zip(want.iter()).zip(prev.iter()).zip(g.iter())
                {
                    let size = if key == "m" {
                        b1 * p.abs() + (1.0 - b1) * gr.abs()
                    } else {
                        b2 * p + (1.0 - b2) * gr * gr
                    };
                    assert!(
                        (gv - w).abs() <= 2f64.powi(-22) * size,
                        "step {k}, {full}: {gv}, reference {w}"
                    );
                }
            }
            let post = &w_post[name];
            // Tolerance: the gradients are the same f32 numbers on both sides, so the f32 step
            // differs from the f64 one only by the roundings of u = m̂/(√v̂+ε) (a few ulps each),
            // the two norms of the trust ratio (~1e-6 relative over ≤ 10⁴ entries) and the
            // final subtraction (half an ulp of w). So 1e-4 of the largest move in the tensor
            // plus 2⁻²² of |w| (two f32 ulps) bounds it; a step on a wrong gradient moves
            // entries by the full lr·r·|u| in the wrong direction.
            let step_size = w
                .iter()
                .zip(pre.iter())
                .fold(0.0f64, |m, (a, p)| m.max((a - p).abs()));
            assert!(step_size > 0.0, "{name}: the reference step does not move");
            for ((got, want), p) in post.iter().zip(w.iter()).zip(pre.iter()) {
                let tol = 1e-4 * step_size + 2f64.powi(-22) * p.abs().max(want.abs());
                assert!(
                    (got - want).abs() <= tol,
                    "step {k} ({weight:?}), {name} (adapted {adapt}): weight {got}, reference \
                     LAMB {want} (from {p}, largest move {step_size:e})"
                );
            }
            // EMA: w̄ ← d w̄ + (1 − d) w on the new weights, d of update k − 1 (0-based).
            let dk = ema_decay_by_definition(&cfg, k - 1);
            for ((got, avg), w_new) in ema_post[name]
                .iter()
                .zip(ema_pre[name].iter())
                .zip(post.iter())
            {
                let want = dk * avg + (1.0 - dk) * w_new;
                // One f32 lerp: a few ulps of the larger operand.
                let tol = 4.0 * 2f64.powi(-24) * avg.abs().max(w_new.abs());
                assert!(
                    (got - want).abs() <= tol,
                    "step {k}, {name}: EMA {got}, rule gives {want}"
                );
            }
        }
    }
}

#[test]
fn a_step_has_the_reference_loss_lamb_and_ema_unweighted() {
    one_step_against_the_reference(LossWeight::None, SigmaChoice::Beta);
}

#[test]
fn a_step_has_the_reference_loss_lamb_and_ema_weighted_beta() {
    one_step_against_the_reference(LossWeight::Article, SigmaChoice::Beta);
}

#[test]
fn a_step_has_the_reference_loss_lamb_and_ema_weighted_isotropic() {
    one_step_against_the_reference(
        LossWeight::Article,
        SigmaChoice::Isotropic { data_std: 0.5 },
    );
}

/// The same three steps with the network laid out channels-last (`train.channels_last`).
#[test]
fn a_step_has_the_reference_loss_lamb_and_ema_channels_last() {
    steps_against_the_reference(LossWeight::None, SigmaChoice::Beta, true);
}

/// Min-SNR-γ with the default γ = 5: on this cosine schedule with T = 10, SNR_1 ≈ 35 is
/// clamped (w_1 ≈ 0.14) and every other t of the batches has SNR_t < 5 (w = 1), so the batch
/// mixes both branches of the min.
#[test]
fn a_step_has_the_reference_loss_lamb_and_ema_min_snr() {
    one_step_against_the_reference(LossWeight::MinSnr, SigmaChoice::Beta);
}

/// The law of items 3 and 4: two components in d = 64 (1×8×8 images), means ±0.6 · a bright
/// 4×4 square on a dark ground, both with std 0.8, weights 0.6 : 0.4. Each pixel has second
/// moment 0.6² + 0.8² = 1, so ‖x_t‖ is the same at every t and a network cannot read the noise
/// level off its input: it must use the t it is told (a trainer that tells it the wrong t
/// then learns a visibly worse ε̂; see the measurements at item 3).
fn law() -> GaussianMixture {
    let square: Vec<f64> = (0..64)
        .map(|i| {
            let (r, c) = (i / 8, i % 8);
            if (2..6).contains(&r) && (2..6).contains(&c) {
                0.6
            } else {
                -0.6
            }
        })
        .collect();
    let minus: Vec<f64> = square.iter().map(|v| -v).collect();
    GaussianMixture::new(vec![0.6, 0.4], vec![square, minus], vec![0.8, 0.8]).unwrap()
}

/// The same law as the tch oracle's `DataLaw` (held to the reference in tests/oracle.rs).
fn oracle_law(g: &GaussianMixture) -> DataLaw {
    let means: Vec<f64> = g.means.iter().flatten().copied().collect();
    DataLaw::mixture(
        &Tensor::from_slice(&g.weights),
        &Tensor::from_slice(&means).view([g.weights.len() as i64, g.dim() as i64]),
        &Tensor::from_slice(&g.stds),
    )
    .unwrap()
}

/// `n` draws of the law (seeded by the product's `data::mixture`) as 1×8×8 images.
fn images(g: &GaussianMixture, n: usize, seed: u64) -> Dataset {
    let flat = g.sample(n, seed).unwrap();
    let all: Vec<i64> = (0..n as i64).collect();
    let x = flat.batch(&all).unwrap().view([n as i64, 1, 8, 8]);
    Dataset::from_values(x, "two-square mixture").unwrap()
}

/// The grid `write_grid` should draw from the checkpoint at `ckpt` with `weights`: the run's
/// grid sampler (its `sample` settings on `train.grid_steps` steps, seeded with the run's
/// seed) on a network loaded with those weights by `load_model`, scaled up by the run's
/// `sample.grid_scale`.
fn grid_by_hand(ckpt: &std::path::Path, weights: Weights, out: &std::path::Path) -> Vec<u8> {
    let m = load_model(ckpt, Device::Cpu, weights).unwrap();
    let cfg = &m.config;
    let mut how = cfg.sampler(Some(cfg.train.seed as i64));
    how.steps = cfg.train.grid_steps.or(cfg.sample.steps);
    let sampler = Sampler::new(&m.schedule, how).unwrap();
    let [c, s, _] = cfg.image_shape();
    let x = sampler
        .sample(&m.net, &[cfg.sample.n as i64, c, s, s], Device::Cpu)
        .unwrap();
    ddpm::grid::save_grid_scaled(&x, out, None, cfg.sample.grid_scale).unwrap();
    std::fs::read(out).unwrap()
}

/// Item 4. Eight updates of the real loop (EMA decay 0.999 with warm-up, so after eight
/// updates the average still sits well away from the raw weights), once with `sample.ema =
/// true` and once with false; each run's final grid is compared byte for byte with the grid
/// drawn by hand from its final checkpoint with the EMA and with the raw weights. The two
/// hand-drawn grids differ, so the comparison can tell the weights apart.
#[test]
fn training_grids_use_the_weights_asked_for() {
    let _rng = rng_lock();
    single_thread();
    let mut cfg = tiny(ScheduleKind::Article, 50, 8);
    cfg.train.ema_decay = 0.999;
    cfg.train.ema_warmup = true;
    // Not 0, the seed of a default `SampleOptions`: the grid must be drawn with the run's.
    cfg.train.seed = 5;
    let data = images(&law(), 16, 3);
    let mut grids = Vec::new();
    for ema in [true, false] {
        cfg.sample.ema = ema;
        let dir = scratch(&format!("grid-{ema}"));
        let summary = train_on(
            &cfg,
            data.clone(),
            &opts(dir.path().to_path_buf()),
            None,
            &mut Silent,
        )
        .unwrap();
        let drawn = std::fs::read(&summary.grid).unwrap();
        let by_ema = grid_by_hand(
            &summary.checkpoint,
            Weights::Ema,
            &dir.path().join("ema.png"),
        );
        let by_raw = grid_by_hand(
            &summary.checkpoint,
            Weights::Raw,
            &dir.path().join("raw.png"),
        );
        assert_ne!(
            by_ema, by_raw,
            "EMA and raw weights draw the same grid: the test could not tell them apart"
        );
        let want = if ema { &by_ema } else { &by_raw };
        assert!(
            &drawn == want,
            "sample.ema = {ema}: the training grid is not the one drawn with the {} weights \
             (it {} the one drawn with the {} weights)",
            if ema { "EMA" } else { "raw" },
            if drawn == if ema { by_raw.clone() } else { by_ema.clone() } {
                "is"
            } else {
                "is not even"
            },
            if ema { "raw" } else { "EMA" },
        );
        grids.push(drawn);
    }
    assert_ne!(grids[0], grids[1]);
}

/// One bucket of t, on `n` draws: means of ‖ε̂ − ε*‖² (the excess loss of ε̂ at those t,
/// since ε* = E[ε|x_t] makes the cross term vanish in expectation), ‖ε − ε̂‖², ‖ε − ε*‖²
/// (the oracle's minimum) and ‖ε*‖² (the size of what there is to learn).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    to_oracle: f64,
    /// The standard error of `to_oracle` (the per-draw spread over sqrt(n)).
    to_oracle_se: f64,
    loss: f64,
    min_loss: f64,
    oracle_size: f64,
}

fn against_the_oracle(
    net: &dyn NoisePredictor,
    law: &DataLaw,
    schedule: &Schedule,
    buckets: &[(i64, i64)],
    n: i64,
    seed: i64,
) -> Vec<Bucket> {
    tch::no_grad(|| {
        tch::manual_seed(seed);
        buckets
            .iter()
            .map(|&(lo, hi)| {
                let x0 = law.sample(n, Kind::Float, Device::Cpu);
                let t = Tensor::randint_low(lo, hi + 1, [n], (Kind::Int64, Device::Cpu));
                let eps = x0.randn_like();
                let x_t = ddpm::marginal::marginal_sample(schedule, &x0, &t, &eps).unwrap();
                let star = law.optimal_eps(schedule, &x_t, &t).unwrap();
                let hat = net
                    .predict(&x_t.view([n, 1, 8, 8]), &t)
                    .unwrap()
                    .view([n, -1]);
                let msq = |a: &Tensor| a.square().sum(Kind::Double).double_value(&[]) / n as f64;
                let per_draw = (&hat - &star)
                    .square()
                    .sum_dim_intlist(1, false, Kind::Double);
                let se = per_draw.std(true).double_value(&[]) / (n as f64).sqrt();
                Bucket {
                    to_oracle: msq(&(&hat - &star)),
                    to_oracle_se: se,
                    loss: msq(&(&eps - &hat)),
                    min_loss: msq(&(&eps - &star)),
                    oracle_size: msq(&star),
                }
            })
            .collect()
    })
}

/// Items 3 and 5's run: `tiny` on the cosine schedule with T = 50, batch 16, warm-up 20, lr
/// 5e-3 decayed to 0.1× at the last step, run seed 5; `default` steps unless
/// `DDPM_TRAINING_STEPS` says otherwise (for measurement).
fn mixture_run(default: u64) -> (Config, u64) {
    let steps = std::env::var("DDPM_TRAINING_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let mut cfg = tiny(ScheduleKind::Cosine, 50, steps);
    cfg.train.batch_size = 16;
    cfg.train.warmup_steps = 20;
    cfg.train.lr = 5e-3;
    cfg.train.lr_decay = vec![ddpm::config::LrPoint {
        step: steps,
        factor: 0.1,
    }];
    cfg.train.seed = 5;
    (cfg, steps)
}

/// Item 3: a short product run (`train_on`, the real loop: loader, `train_step`, LAMB with
/// warm-up and decay, checkpoint) on 4096 draws of the mixture (seed 9), cosine schedule with
/// T = 50 (ᾱ_t from ~1 to ~0, the whole range of noise levels), the harness's small U-Net, 600
/// updates of batch 16 (run seed 5). The trained network (its raw weights, loaded from the
/// final checkpoint) is held to the exact oracle in four buckets of t, on 512 fresh draws per
/// bucket (seed 77), against the same network untrained (the trainer's initial weights:
/// `build_model` with the run's seed).
///
/// Measured (this 2-core CPU, one libtorch thread, 5.8 s of training): mean ‖ε̂ − ε*‖² per
/// bucket t ∈ 1–12, 13–25, 26–37, 38–50: untrained 125, 158, 185, 202; trained 1.16, 0.65,
/// 0.96, 1.08 (standard errors 0.046, 0.016, 0.027, 0.029), against E‖ε*‖² ≈ 5.5, 27.6, 50,
/// 62; pooled excess loss 168 untrained, 0.97 trained. Bounds, each bucket: trained ≤ 0.05 ×
/// untrained (measured ≤ 0.0093) and, with 4 of its standard errors to spare (one-sided
/// 3e-5), ≤ 0.5 × E‖ε*‖² (a relative L2 error below 0.71; measured 0.21 at small t, ≤ 0.024
/// elsewhere); pooled excess loss ≤ 0.05 × the untrained
/// one (measured 0.006). Each bound sits at ≥ 2.4× its measured value, over 30 standard
/// errors of the evaluation's sampling away (the per-draw values have a coefficient of
/// variation ≈ 0.9, so 512 draws give ≤ 4% relative error): the evaluation's noise alone
/// cannot fail a run as good as the measured one (one-sided p < 1e-12), and the room left is
/// for other libtorch builds. A trainer that tells the network another sample's t (a
/// mutation tried: `t.flip([0])` in `train_step`) reached 6.6 in the first bucket, 1.2 × E‖ε*‖²,
/// and fails; noising at t − 1 (a one-step shift of 50) is below what 600 updates resolve
/// (1.02, 0.72, 1.04, 1.16) and is caught by the step tests above instead.
#[test]
fn a_short_run_on_a_mixture_approaches_the_oracle_at_every_t() {
    let _rng = rng_lock();
    single_thread();
    const T: i64 = 50;
    let (cfg, steps) = mixture_run(600);
    let g = law();
    let oracle = oracle_law(&g);
    let schedule = Schedule::new(cfg.diffusion.schedule, T, Device::Cpu).unwrap();
    let buckets = [(1, 12), (13, 25), (26, 37), (38, 50)];
    let (_, untrained) = build_model(&cfg, Device::Cpu, cfg.train.seed).unwrap();
    let before = against_the_oracle(&untrained, &oracle, &schedule, &buckets, 512, 77);

    let dir = scratch("mixture");
    let t0 = std::time::Instant::now();
    let summary = train_on(
        &cfg,
        images(&g, 4096, 9),
        &opts(dir.path().to_path_buf()),
        None,
        &mut Silent,
    )
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(summary.steps, steps);
    let trained = load_model(&summary.checkpoint, Device::Cpu, Weights::Raw).unwrap();
    let after = against_the_oracle(&trained.net, &oracle, &schedule, &buckets, 512, 77);
    eprintln!("{steps} steps in {secs:.1} s");
    for ((range, b), a) in buckets.iter().zip(&before).zip(&after) {
        eprintln!("  t in {range:?}: untrained {b:?}\n                 trained   {a:?}");
    }
    let excess = |r: &[Bucket]| r.iter().map(|x| x.loss - x.min_loss).sum::<f64>() / r.len() as f64;
    let (e0, e1) = (excess(&before), excess(&after));
    eprintln!("excess loss over the oracle's minimum: untrained {e0}, trained {e1}");
    for ((range, b), a) in buckets.iter().zip(&before).zip(&after) {
        assert!(
            a.to_oracle <= 0.05 * b.to_oracle,
            "t in {range:?}: mean ‖ε̂ − ε*‖² {} trained, {} untrained: not below 5%",
            a.to_oracle,
            b.to_oracle
        );
        assert!(
            a.to_oracle + 4.0 * a.to_oracle_se <= 0.5 * a.oracle_size,
            "t in {range:?}: mean ‖ε̂ − ε*‖² {} (standard error {}) is not 4 standard errors \
             below 0.5 E‖ε*‖² = {}",
            a.to_oracle,
            a.to_oracle_se,
            0.5 * a.oracle_size
        );
    }
    assert!(
        e0 > 0.0 && e1 <= 0.05 * e0,
        "excess loss {e1} trained, {e0} untrained: not below 5%"
    );
}

/// Mean squared distances of item 5 in one bucket of t, per draw of the labelled law:
/// ‖ε̂(x_t, y) − E[ε|x_t, y]‖², ‖ε̂(x_t, ∅) − E[ε|x_t]‖² and, for scale, the gap between the
/// two oracles ‖E[ε|x_t, y] − E[ε|x_t]‖² (what a network that ignored its label would miss).
#[derive(Debug)]
struct ClassBucket {
    to_conditional: f64,
    to_unconditional: f64,
    oracle_gap: f64,
    cond_to_unconditional: f64,
    uncond_to_conditional: f64,
}

fn against_both_oracles(
    net: &dyn ConditionalPredictor,
    oracle: &LabelledOracle,
    schedule: &Schedule,
    buckets: &[(i64, i64)],
    n: i64,
    seed: i64,
) -> Vec<ClassBucket> {
    tch::no_grad(|| {
        tch::manual_seed(seed);
        let none = Tensor::full([n], oracle.classes() as i64, (Kind::Int64, Device::Cpu));
        buckets
            .iter()
            .map(|&(lo, hi)| {
                let (x0, y) = oracle.law().sample(n, Kind::Float, Device::Cpu).unwrap();
                let t = Tensor::randint_low(lo, hi + 1, [n], (Kind::Int64, Device::Cpu));
                let x_t =
                    ddpm::marginal::marginal_sample(schedule, &x0, &t, &x0.randn_like()).unwrap();
                let image = x_t.view([n, 1, 8, 8]);
                let flat = |e: Tensor| e.view([n, -1]);
                let cond = oracle.predict_class(&x_t, &t, &y).unwrap();
                let uncond = oracle.predict_class(&x_t, &t, &none).unwrap();
                let hat_c = flat(net.predict_class(&image, &t, &y).unwrap());
                let hat_u = flat(net.predict_class(&image, &t, &none).unwrap());
                let msq = |a: &Tensor| a.square().sum(Kind::Double).double_value(&[]) / n as f64;
                ClassBucket {
                    to_conditional: msq(&(&hat_c - &cond)),
                    to_unconditional: msq(&(&hat_u - &uncond)),
                    oracle_gap: msq(&(&cond - &uncond)),
                    cond_to_unconditional: msq(&(&hat_c - &uncond)),
                    uncond_to_conditional: msq(&(&hat_u - &cond)),
                }
            })
            .collect()
    })
}

/// Item 5 (issue 17): a short conditional product run (`train_on` with `train.conditional`,
/// the loader's label dropout at 0.5 so that the ∅ branch sees as many examples as the
/// labelled one) on 4096 labelled draws (seed 9) of two overlapping classes in d = 64:
/// N(±0.3 · square, (1 − 0.3²) I), weights 0.6 : 0.4 (second moment 1 per pixel, as item 3),
/// with item 3's tiny U-Net (plus its class embedding), schedule and batch, 2000 updates. One
/// network must hold two oracles: with a label, E[ε | x_t, y], that class's single Gaussian's;
/// with ∅, E[ε | x_t], the mixture's. Held to both on 512 fresh draws per bucket (seed 77),
/// against the same network untrained.
///
/// Measured (this 2-core CPU, one libtorch thread, ~15 s of training; run seeds 5, 6, 7):
/// mean ‖ε̂ − oracle‖² per bucket untrained 117–211, trained ≤ 0.6 (each ≤ 0.5 % of
/// untrained); pooled over the four buckets, the labelled branch's distance to E[ε|x, y] is
/// 1.34, 1.09, 1.06, the ∅ branch's to the same oracle 2.07, 1.88, 2.09 (ratio 0.51–0.65):
/// the network uses its label. Bounds: each bucket, both distances ≤ 0.05 × untrained; pooled,
/// labelled ≤ 0.8 × ∅ to the conditional oracle (a network that ignored its label has ratio
/// 1). Not asserted: that the ∅ branch is nearer E[ε|x] than the labelled one is — the two
/// oracles differ by only 0.54 pooled here, and the ∅ branch's remaining error (1.34–1.51)
/// does not yet resolve that in 2000 updates (seed 7: 1.51 against 1.44).
#[test]
fn a_short_conditional_run_approaches_both_oracles() {
    let _rng = rng_lock();
    single_thread();
    const T: i64 = 50;
    let (cfg, steps) = mixture_run(2000);
    let mut cfg = cfg;
    cfg.train.conditional = true;
    cfg.train.label_dropout = 0.5;
    let amp = 0.3;
    let square: Vec<f64> = (0..64)
        .map(|i| {
            let (r, c) = (i / 8, i % 8);
            if (2..6).contains(&r) && (2..6).contains(&c) {
                amp
            } else {
                -amp
            }
        })
        .collect();
    let means: Vec<f64> = square
        .iter()
        .copied()
        .chain(square.iter().map(|v| -v))
        .collect();
    let s = (1.0 - amp * amp).sqrt();
    let law = LabelledLaw::mixture(
        &Tensor::from_slice(&[0.6, 0.4]),
        &Tensor::from_slice(&means).view([2, 64]),
        &Tensor::from_slice(&[s, s]),
        &Tensor::from_slice(&[0i64, 1]),
        2,
    )
    .unwrap();
    let schedule = Schedule::new(cfg.diffusion.schedule, T, Device::Cpu).unwrap();
    let oracle = LabelledOracle::new(law.clone(), &schedule);
    tch::manual_seed(9);
    let (x, y) = law.sample(4096, Kind::Float, Device::Cpu).unwrap();
    let labels = Vec::<i64>::try_from(&y).unwrap();
    let data = Dataset::from_values(x.view([4096, 1, 8, 8]), "labelled two-square mixture")
        .unwrap()
        .with_labels(&labels, vec!["square".into(), "negative".into()])
        .unwrap();
    let buckets = [(1, 12), (13, 25), (26, 37), (38, 50)];
    let mut conditional = cfg.clone();
    conditional.model.classes = 2;
    let (_, untrained) = build_model(&conditional, Device::Cpu, cfg.train.seed).unwrap();
    let before = against_both_oracles(&untrained, &oracle, &schedule, &buckets, 512, 77);

    let dir = scratch("conditional");
    let summary = train_on(
        &cfg,
        data,
        &opts(dir.path().to_path_buf()),
        None,
        &mut Silent,
    )
    .unwrap();
    assert_eq!(summary.steps, steps);
    let trained = load_model(&summary.checkpoint, Device::Cpu, Weights::Raw).unwrap();
    let after = against_both_oracles(&trained.net, &oracle, &schedule, &buckets, 512, 77);
    for ((range, b), a) in buckets.iter().zip(&before).zip(&after) {
        eprintln!("  t in {range:?}: untrained {b:?}\n                 trained   {a:?}");
        assert!(
            a.to_conditional <= 0.05 * b.to_conditional
                && a.to_unconditional <= 0.05 * b.to_unconditional,
            "t in {range:?}: trained {a:?}, untrained {b:?}: not below 5%"
        );
    }
    let pooled = |f: fn(&ClassBucket) -> f64| after.iter().map(f).sum::<f64>();
    let gap = pooled(|b| b.oracle_gap);
    let (c, u) = (pooled(|b| b.to_conditional), pooled(|b| b.to_unconditional));
    let (cu, uc) = (
        pooled(|b| b.cond_to_unconditional),
        pooled(|b| b.uncond_to_conditional),
    );
    eprintln!("pooled: to E[ε|x,y] {c} (with ∅ {uc}), to E[ε|x] {u} (with the label {cu}), oracle gap {gap}");
    assert!(
        c <= 0.8 * uc,
        "pooled distance to E[ε|x, y] with the label {c}, with ∅ {uc}: the label does not \
         bring the network nearer the conditional oracle"
    );
}
