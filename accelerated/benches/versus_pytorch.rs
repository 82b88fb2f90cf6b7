//! Training and sampling speed of the `ddpm` crate against a PyTorch eager twin of the same
//! network, optimiser and samplers (`pytorch_twin.py` beside this file), side by side.
//!
//! Both sides run as worker processes of this binary, so that their peak memory is per side:
//! ours is this binary started again with `--worker`, the twin is the Python script. Each worker
//! builds its model, warms up (training steps and a short strided sampling at each sampling batch
//! size, which also lets cuDNN autotune), and then times whole phases on command. The driver
//! alternates the sides A B in even rounds and B A in odd ones, so slow drifts of the machine's
//! load hit both equally, and reports images/s per phase, the ratio ours/PyTorch of each round
//! (min / median / max over rounds) and the peak memory of each side.
//!
//! `cargo bench -p ddpm --bench versus_pytorch -- --config mnist --device cpu`; see
//! docs/performance.md for the flags, the results and what limits them.

use anyhow::{anyhow, bail, Context, Result};
use clap::{ArgAction, Parser, ValueEnum};
use ddpm::autocast::autocast_bf16;
use ddpm::config::Config;
use ddpm::data::loader::Batch;
use ddpm::ema::Ema;
use ddpm::graph::Graphed;
use ddpm::lamb::{is_adapted, Lamb, LambConfig};
use ddpm::loss::euclidean_loss;
use ddpm::marginal::marginal_sample;
use ddpm::sampler::{Sampler, SamplerConfig};
use ddpm::schedule::{Schedule, ScheduleKind};
use ddpm::sigma::SigmaChoice;
use ddpm::train::Trainer;
use ddpm::unet::{channels_last, parameter_count, to_channels_last, UNet, UNetConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{nn, Cuda, Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Precision {
    /// f32 everywhere (TF32 convolutions on CUDA, as both libtorch and PyTorch default to).
    Fp32,
    /// bfloat16 autocast around the network's forward pass (training, with the loss, and every
    /// sampler step); weights, LAMB and the sampler's update of x stay f32.
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// Timed training steps: forward, loss, backward, LAMB step, EMA update, built here from
    /// the library's pieces with t and ε drawn on the device and no host synchronisation.
    Train,
    /// The same steps through the product, `ddpm::train::Trainer::train_step`, fed a batch
    /// prepared on the CPU as its loader does (the twin runs its training loop again).
    Trainer,
    /// Strided DDPM sampling (DDIM with η = 1) over `--strided-steps` steps.
    Strided,
    /// The article's ancestral sampler over all T steps.
    Ancestral,
    /// The optimiser alone: `--optim-steps` LAMB steps, each followed by the EMA update, on
    /// the gradients the warm-up left (no forward or backward pass); the "images" columns
    /// count these steps.
    Optim,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Train => "train",
            Phase::Trainer => "trainer",
            Phase::Strided => "strided",
            Phase::Ancestral => "ancestral",
            Phase::Optim => "optim",
        }
    }
}

/// ddpm against PyTorch eager: training and sampling images/s, side by side.
#[derive(Parser, Debug)]
#[command(name = "versus_pytorch")]
struct Args {
    /// Model preset: mnist, cifar32 or celeba128 (celeba128 on CUDA only).
    #[arg(long, default_value = "mnist")]
    config: String,
    /// Where both sides run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Arithmetic of both sides (bf16 needs CUDA).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Timed rounds per side and phase.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Training batch (default: the preset's on CUDA, smaller on the CPU).
    #[arg(long)]
    batch: Option<i64>,
    /// Training steps per timed round.
    #[arg(long)]
    train_steps: Option<usize>,
    /// Untimed training steps before the first round.
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// Images per strided sampling round.
    #[arg(long)]
    strided_images: Option<i64>,
    /// Steps of the strided sampler.
    #[arg(long, default_value_t = 50)]
    strided_steps: usize,
    /// Images per T-step ancestral sampling round (0 skips the phase).
    #[arg(long)]
    ancestral_images: Option<i64>,
    /// Optimiser steps (LAMB + EMA) per round of the `optim` phase.
    #[arg(long, default_value_t = 20)]
    optim_steps: usize,
    /// Phases to time, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "train,trainer,strided,ancestral,optim"
    )]
    phases: Vec<Phase>,
    /// CPU intra-op threads of both sides (default: libtorch's choice, reported).
    #[arg(long)]
    threads: Option<i32>,
    /// Convert weights and training inputs to channels-last on both sides (the product's
    /// trainer through `train.channels_last`).
    #[arg(long)]
    channels_last: bool,
    /// Sample with a copy of the weights cast to bfloat16 once (both sides; `ddpm sample
    /// --bf16-weights`) instead of the precision's autocast at every network call.
    #[arg(long)]
    bf16_weights: bool,
    /// Our side replays each sampler step's network call from a CUDA graph (`ddpm sample
    /// --cuda-graph`; a bench built with `--features cuda-graph`), captured afresh in each
    /// round (3 warm-up calls and the capture are timed, as `ddpm sample` pays them once a
    /// batch); the twin stays eager.
    #[arg(long)]
    cuda_graph: bool,
    /// Let the twin run LAMB and EMA with PyTorch's multi-tensor `_foreach_*` kernels (same
    /// arithmetic, far fewer launches), to measure what a multi-tensor optimiser would gain.
    #[arg(long)]
    twin_foreach: bool,
    /// cuDNN autotuning on both sides (CUDA only).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    cudnn_benchmark: bool,
    /// Seed of both sides' initial weights and draws.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Python with torch for the twin (default: the workspace's .venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The twin script (default: pytorch_twin.py beside this file).
    #[arg(long)]
    twin: Option<PathBuf>,
    /// Where to write the results as JSON (default: target/bench/versus_pytorch-….json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run as our side's worker, reading the spec and phases from stdin.
    #[arg(long, hide = true)]
    worker: bool,
    /// Internal: the worker runs the product's trainer instead of the library's pieces.
    #[arg(long, hide = true)]
    product: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The f64 schedule tables, index 0 the identity, as the twin receives them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tables {
    alpha: Vec<f64>,
    beta: Vec<f64>,
    alpha_bar: Vec<f64>,
    beta_bar: Vec<f64>,
    sigma: Vec<f64>,
}

/// Everything both workers need, sent as the first line of their stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    config: String,
    model: UNetConfig,
    device: String,
    precision: Precision,
    threads: Option<i32>,
    channels_last: bool,
    #[serde(default)]
    bf16_weights: bool,
    #[serde(default)]
    cuda_graph: bool,
    cudnn_benchmark: bool,
    twin_foreach: bool,
    seed: i64,
    train_batch: i64,
    train_steps: usize,
    warmup_steps: usize,
    strided_images: i64,
    ancestral_images: i64,
    optim_steps: usize,
    lamb: LambConfig,
    ema_decay: f64,
    tables: Tables,
    strided_pairs: Vec<(i64, i64)>,
    ancestral_pairs: Vec<(i64, i64)>,
    warmup_pairs: Vec<(i64, i64)>,
}

const SIGMA: SigmaChoice = SigmaChoice::Beta;
const EMA_DECAY: f64 = 0.9999;
const WARMUP_SAMPLER_STEPS: usize = 5;

fn sampler_config(steps: Option<usize>, eta: Option<f64>, bf16: bool) -> SamplerConfig {
    SamplerConfig {
        sigma: SIGMA,
        steps,
        eta,
        clip_each_step: false,
        clip_final: true,
        final_noise: false,
        seed: None,
        bf16,
        ..SamplerConfig::default()
    }
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.to_device(Device::Cpu).to_kind(Kind::Double),
    )?)
}

/// Per-run sizes: the preset's training batch on CUDA; on the CPU sizes that keep a round to
/// seconds on a couple of cores.
struct Sizes {
    batch: i64,
    train_steps: usize,
    strided_images: i64,
    ancestral_images: i64,
}

fn default_sizes(config: &str, cuda: bool) -> Result<Sizes> {
    let s = |batch, train_steps, strided_images, ancestral_images| Sizes {
        batch,
        train_steps,
        strided_images,
        ancestral_images,
    };
    Ok(match (config, cuda) {
        ("mnist", true) => s(64, 50, 256, 256),
        ("cifar32", true) => s(128, 30, 256, 256),
        ("celeba128", true) => s(64, 10, 64, 16),
        ("mnist", false) => s(64, 2, 16, 2),
        ("cifar32", false) => s(8, 1, 1, 0),
        ("celeba128", false) => bail!("celeba128 is benchmarked on CUDA only (pass --batch and the image counts to force a CPU run)"),
        (other, _) => bail!("unknown config {other:?}; choose mnist, cifar32 or celeba128"),
    })
}

fn build_spec(args: &Args, device: Device) -> Result<Spec> {
    let cuda = device.is_cuda();
    if args.precision == Precision::Bf16 && !cuda {
        bail!("--precision bf16 needs CUDA: tch's autocast is CUDA-only, so the sides would not match on the CPU");
    }
    if args.cuda_graph && args.precision == Precision::Bf16 && !args.bf16_weights {
        bail!("--cuda-graph cannot hold autocast: with --precision bf16 add --bf16-weights");
    }
    let model = UNetConfig::preset(&args.config)?;
    let forced =
        args.batch.is_some() && args.strided_images.is_some() && args.ancestral_images.is_some();
    let sizes = match default_sizes(&args.config, cuda) {
        Ok(s) => s,
        Err(_) if forced => Sizes {
            batch: 0,
            train_steps: 2,
            strided_images: 0,
            ancestral_images: 0,
        },
        Err(e) => return Err(e),
    };
    // Only the step lists are taken from these, which do not depend on the precision.
    let schedule = Schedule::new(ScheduleKind::Article, model.t_max, Device::Cpu)?;
    let strided = Sampler::new(
        &schedule,
        sampler_config(Some(args.strided_steps), Some(1.0), false),
    )?;
    let ancestral = Sampler::new(&schedule, sampler_config(None, None, false))?;
    let warmup = Sampler::new(
        &schedule,
        sampler_config(Some(WARMUP_SAMPLER_STEPS), Some(1.0), false),
    )?;
    let tables = Tables {
        alpha: host(schedule.alphas())?,
        beta: host(schedule.betas())?,
        alpha_bar: host(schedule.alpha_bars())?,
        beta_bar: host(schedule.beta_bars())?,
        sigma: host(&SIGMA.table(&schedule)?)?,
    };
    let spec = Spec {
        config: args.config.clone(),
        model,
        device: if cuda { "cuda" } else { "cpu" }.into(),
        precision: args.precision,
        threads: args.threads,
        channels_last: args.channels_last,
        bf16_weights: args.bf16_weights,
        cuda_graph: args.cuda_graph,
        cudnn_benchmark: args.cudnn_benchmark,
        twin_foreach: args.twin_foreach,
        seed: args.seed,
        train_batch: args.batch.unwrap_or(sizes.batch),
        train_steps: args.train_steps.unwrap_or(sizes.train_steps),
        warmup_steps: args.warmup_steps,
        strided_images: args.strided_images.unwrap_or(sizes.strided_images),
        ancestral_images: args.ancestral_images.unwrap_or(sizes.ancestral_images),
        optim_steps: args.optim_steps,
        lamb: LambConfig::default(),
        ema_decay: EMA_DECAY,
        tables,
        strided_pairs: strided.steps().to_vec(),
        ancestral_pairs: ancestral.steps().to_vec(),
        warmup_pairs: warmup.steps().to_vec(),
    };
    if spec.train_batch < 1 || spec.train_steps < 1 {
        bail!("the training batch and the timed steps must be at least 1");
    }
    Ok(spec)
}

// ---------------------------------------------------------------------------------------------
// Our side's worker.

/// Checks that the library's autocast computes in bfloat16 (tch's CUDA autocast defaults to
/// float16, so "bf16" could otherwise silently run in float16).
fn check_bf16_autocast() -> Result<()> {
    let device = Device::Cuda(0);
    let probe = autocast_bf16(true, device, || {
        let a = Tensor::ones([2, 2], (Kind::Float, device));
        a.matmul(&a)
    });
    if probe.kind() != Kind::BFloat16 {
        bail!("CUDA autocast computes in {:?}, not bfloat16", probe.kind());
    }
    Ok(())
}

/// Our side's worker: either the library's pieces (`train`, `strided`, `ancestral`) or the
/// product's trainer (`trainer`), never both in one process, so that each process's peak
/// memory holds one model, one optimiser and one EMA, as the twin's does.
struct Ours {
    spec: Spec,
    device: Device,
    bf16: bool,
    role: Role,
}

enum Role {
    Library(Box<Library>),
    Product(Box<Product>),
}

/// The model, LAMB, EMA, schedule, one fixed training batch x_0 on the device, and the samplers.
struct Library {
    vs: nn::VarStore,
    net: UNet,
    lamb: Lamb,
    ema: Ema,
    schedule: Schedule,
    x0: Tensor,
    strided: Sampler,
    ancestral: Sampler,
    warmup: Sampler,
    /// `--bf16-weights`: the network the samplers run, its weights a bfloat16 copy.
    bf16_copy: Option<(nn::VarStore, UNet)>,
}

/// The product's trainer and one CPU batch that it is fed at every step.
struct Product {
    trainer: Trainer,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
}

impl Product {
    fn new(spec: &Spec, device: Device) -> Result<Product> {
        let mut cfg = Config::preset(&spec.config)?;
        cfg.model = spec.model.clone();
        cfg.train.batch_size = spec.train_batch as usize;
        cfg.train.bf16 = spec.precision == Precision::Bf16;
        cfg.train.channels_last = spec.channels_last;
        cfg.train.seed = spec.seed as u64;
        let trainer = Trainer::new(&cfg, device)?;
        let [c, h, w] = cfg.image_shape();
        let shape = [spec.train_batch, c, h, w];
        let cpu = (Kind::Float, Device::Cpu);
        Ok(Product {
            trainer,
            x0: Tensor::rand(shape, cpu) * 2.0 - 1.0,
            t: Tensor::randint_low(
                1,
                spec.model.t_max + 1,
                [spec.train_batch],
                (Kind::Int64, Device::Cpu),
            ),
            eps: Tensor::randn(shape, cpu),
        })
    }

    fn step(&mut self) -> Result<()> {
        let k = self.trainer.step() + 1;
        let batch = Batch {
            step: k,
            x0: self.x0.shallow_clone(),
            t: self.t.shallow_clone(),
            eps: self.eps.shallow_clone(),
            torch_seed: k as i64,
            y: None,
        };
        let _ = self.trainer.train_step(&batch)?;
        Ok(())
    }
}

impl Library {
    fn new(spec: &Spec, device: Device) -> Result<Library> {
        let vs = nn::VarStore::new(device);
        let net = UNet::new(&vs.root(), &spec.model)?;
        if spec.channels_last {
            to_channels_last(&vs)?;
        }
        let lamb = Lamb::new(&vs, spec.lamb)?;
        let ema = Ema::new(&vs, spec.ema_decay, true)?;
        let schedule = Schedule::new(ScheduleKind::Article, spec.model.t_max, device)?;
        let m = &spec.model;
        let shape = [spec.train_batch, m.in_channels, m.image_size, m.image_size];
        let x0 = Tensor::rand(shape, (Kind::Float, device)) * 2.0 - 1.0;
        let x0 = if spec.channels_last {
            channels_last(&x0)?
        } else {
            x0
        };
        // As `ddpm sample --bf16-weights`: a copy cast once, the sampler without autocast.
        let bf16_copy = if spec.bf16_weights {
            let mut copy_vs = nn::VarStore::new(device);
            let copy = UNet::new(&copy_vs.root(), &spec.model)?;
            if spec.channels_last {
                to_channels_last(&copy_vs)?;
            }
            copy_vs.copy(&vs)?;
            copy_vs.bfloat16();
            Some((copy_vs, copy))
        } else {
            None
        };
        let bf16 = spec.precision == Precision::Bf16 && !spec.bf16_weights;
        let strided = Sampler::new(
            &schedule,
            sampler_config(Some(spec.strided_pairs.len()), Some(1.0), bf16),
        )?;
        let ancestral = Sampler::new(&schedule, sampler_config(None, None, bf16))?;
        let warmup = Sampler::new(
            &schedule,
            sampler_config(Some(WARMUP_SAMPLER_STEPS), Some(1.0), bf16),
        )?;
        if strided.steps() != spec.strided_pairs.as_slice() {
            bail!("our strided steps differ from the spec's");
        }
        Ok(Library {
            vs,
            net,
            lamb,
            ema,
            schedule,
            x0,
            strided,
            ancestral,
            warmup,
            bf16_copy,
        })
    }

    fn train_step(&mut self, bf16: bool) -> Result<()> {
        let device = self.x0.device();
        let t = self.schedule.sample_t(self.x0.size()[0], device);
        let eps = self.x0.randn_like();
        let x_t = marginal_sample(&self.schedule, &self.x0, &t, &eps)?;
        let net = &self.net;
        let loss = autocast_bf16(bf16, device, || -> Result<Tensor> {
            let eps_hat = net.forward_t(&x_t, &t, true)?;
            Ok(euclidean_loss(&eps, &eps_hat)?)
        })?;
        self.lamb.zero_grad();
        loss.backward();
        let _ = self.lamb.step()?;
        self.ema.update(&self.vs)?;
        Ok(())
    }

    /// Samples with `sampler`, whose config carries the precision (autocast per network call),
    /// through the bfloat16 copy of the network under `--bf16-weights`, replayed from a CUDA
    /// graph under `--cuda-graph`.
    fn sample(&self, sampler: &Sampler, images: i64, spec: &Spec) -> Result<Tensor> {
        let m = &spec.model;
        let shape = [images, m.in_channels, m.image_size, m.image_size];
        let net = self.bf16_copy.as_ref().map_or(&self.net, |(_, net)| net);
        let net = Graphed::new(net, spec.cuda_graph);
        Ok(sampler.sample(&net, &shape, self.x0.device())?)
    }
}

impl Ours {
    fn new(spec: Spec, product: bool) -> Result<Ours> {
        let device = if spec.device == "cuda" {
            Device::Cuda(0)
        } else {
            Device::Cpu
        };
        if let Some(n) = spec.threads {
            tch::set_num_threads(n);
        }
        if device.is_cuda() {
            Cuda::cudnn_set_benchmark(spec.cudnn_benchmark);
        }
        tch::manual_seed(spec.seed);
        let bf16 = spec.precision == Precision::Bf16;
        if bf16 {
            check_bf16_autocast()?;
        }
        let role = if product {
            Role::Product(Box::new(Product::new(&spec, device)?))
        } else {
            Role::Library(Box::new(Library::new(&spec, device)?))
        };
        Ok(Ours {
            spec,
            device,
            bf16,
            role,
        })
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            Cuda::synchronize(i as i64);
        }
    }

    fn warm_up(&mut self) -> Result<()> {
        let (spec, bf16) = (&self.spec, self.bf16);
        match &mut self.role {
            Role::Product(p) => {
                for _ in 0..spec.warmup_steps {
                    p.step()?;
                }
            }
            Role::Library(lib) => {
                for _ in 0..spec.warmup_steps {
                    lib.train_step(bf16)?;
                }
                let mut sizes = vec![spec.strided_images, spec.ancestral_images];
                sizes.dedup();
                for images in sizes.into_iter().filter(|&n| n > 0) {
                    let _ = lib.sample(&lib.warmup, images, spec)?;
                }
            }
        }
        self.sync();
        Ok(())
    }

    fn phase(&mut self, phase: Phase) -> Result<Value> {
        let hwm_reset = reset_hwm();
        self.sync();
        let cpu_start = cpu_seconds();
        let start = Instant::now();
        let (spec, bf16) = (&self.spec, self.bf16);
        let train_images = spec.train_steps as i64 * spec.train_batch;
        let images = match (&mut self.role, phase) {
            (Role::Library(lib), Phase::Train) => {
                for _ in 0..spec.train_steps {
                    lib.train_step(bf16)?;
                }
                train_images
            }
            (Role::Product(p), Phase::Trainer) => {
                for _ in 0..spec.train_steps {
                    p.step()?;
                }
                train_images
            }
            (Role::Library(lib), Phase::Strided) => {
                let _ = lib.sample(&lib.strided, spec.strided_images, spec)?;
                spec.strided_images
            }
            (Role::Library(lib), Phase::Ancestral) => {
                let _ = lib.sample(&lib.ancestral, spec.ancestral_images, spec)?;
                spec.ancestral_images
            }
            (Role::Library(lib), Phase::Optim) => {
                for _ in 0..spec.optim_steps {
                    let _ = lib.lamb.step()?;
                    lib.ema.update(&lib.vs)?;
                }
                spec.optim_steps as i64
            }
            (_, phase) => bail!("this worker does not run the {} phase", phase.name()),
        };
        self.sync();
        let seconds = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu_start).map(|(b, a)| b - a);
        Ok(json!({
            "phase": phase.name(),
            "seconds": seconds,
            "cpu_seconds": cpu,
            "images": images,
            "peak_rss_bytes": read_hwm_bytes(),
            "rss_peak_is_per_phase": hwm_reset,
        }))
    }

    fn ready(&self) -> Value {
        let vs = match &self.role {
            Role::Library(lib) => &lib.vs,
            Role::Product(p) => p.trainer.var_store(),
        };
        let adapted: i64 = vs
            .variables()
            .iter()
            .filter(|(n, w)| is_adapted(n, w))
            .map(|(_, w)| w.numel() as i64)
            .sum();
        json!({
            "ready": true,
            "side": "ours",
            "parameters": parameter_count(vs),
            "adapted_parameters": adapted,
            "threads": tch::get_num_threads(),
            "libtorch": ddpm::device::torch_info().libtorch_version,
        })
    }
}

fn run_worker(product: bool) -> Result<()> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let first = lines.next().ok_or_else(|| anyhow!("no spec on stdin"))??;
    let spec: Spec = serde_json::from_str(&first).context("reading the spec")?;
    let mut ours = Ours::new(spec, product)?;
    ours.warm_up()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", ours.ready())?;
    out.flush()?;
    for line in lines {
        let line = line?;
        let phase = match line.trim() {
            "quit" => break,
            "train" => Phase::Train,
            "trainer" => Phase::Trainer,
            "strided" => Phase::Strided,
            "ancestral" => Phase::Ancestral,
            "optim" => Phase::Optim,
            other => bail!("unknown phase {other:?}"),
        };
        let reply = ours
            .phase(phase)
            .unwrap_or_else(|e| json!({ "error": e.to_string() }));
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// Peak resident set size (VmHWM) of this process since the last reset.
fn read_hwm_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// CPU time (user + system, all threads) this process has used, from /proc/self/stat in
/// clock ticks of 1/100 s (Linux's USER_HZ on every mainstream architecture).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0); false where the kernel refuses.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------------
// The driver.

struct Worker {
    side: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    ready: Value,
}

impl Worker {
    fn spawn(side: &'static str, mut cmd: Command, spec_line: &str) -> Result<Worker> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {side} worker ({cmd:?})"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        writeln!(stdin, "{spec_line}")?;
        stdin.flush()?;
        let mut w = Worker {
            side,
            child,
            stdin,
            stdout,
            ready: Value::Null,
        };
        w.ready = w.reply()?;
        Ok(w)
    }

    /// The next JSON line of the worker; other lines (library chatter) go to stderr.
    fn reply(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                let status = self.child.wait()?;
                bail!(
                    "the {} worker ended ({status}) without replying; its stderr is above",
                    self.side
                );
            }
            match serde_json::from_str::<Value>(line.trim()) {
                Ok(v) if v.is_object() => {
                    if let Some(e) = v.get("error") {
                        bail!("the {} worker: {e}", self.side);
                    }
                    return Ok(v);
                }
                _ => eprint!("[{}] {line}", self.side),
            }
        }
    }

    fn measure(&mut self, phase: Phase, gpu: bool) -> Result<Value> {
        writeln!(self.stdin, "{}", phase.name())?;
        self.stdin.flush()?;
        let poll = gpu.then(|| GpuPoll::start(self.child.id()));
        let mut v = self.reply()?;
        if let Some(p) = poll {
            v["gpu_process_peak_bytes"] = json!(p.stop());
        }
        Ok(v)
    }

    fn quit(mut self) -> Result<()> {
        writeln!(self.stdin, "quit")?;
        self.stdin.flush()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the {} worker exited with {status}", self.side);
        }
        Ok(())
    }
}

/// Polls `nvidia-smi` for one process's device memory (what the caching allocator reserved plus
/// the CUDA context) while a phase runs: tch exposes no `max_memory_allocated`, so this is the
/// one figure measured the same way for both sides.
struct GpuPoll {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<u64>>,
}

impl GpuPoll {
    fn start(pid: u32) -> GpuPoll {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak: Option<u64> = None;
            while !flag.load(Ordering::Relaxed) {
                if let Some(mib) = gpu_process_mib(pid) {
                    peak = Some(peak.unwrap_or(0).max(mib * 1024 * 1024));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        GpuPoll { stop, handle }
    }

    fn stop(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

fn gpu_process_mib(pid: u32) -> Option<u64> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (p, m) = l.split_once(',')?;
        (p.trim().parse::<u32>().ok()? == pid)
            .then(|| m.trim().parse::<u64>().ok())
            .flatten()
    })
}

fn stats(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    };
    (v[0], median, v[n - 1])
}

fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("—".into(), |b| {
        format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
    })
}

/// The first path that exists among the candidates, else the last one.
fn first_existing(candidates: &[PathBuf]) -> PathBuf {
    candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or(&candidates[candidates.len() - 1])
        .clone()
}

fn drive(args: Args) -> Result<()> {
    let device = match args.device {
        DeviceArg::Auto => Device::cuda_if_available(),
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda if Cuda::is_available() => Device::Cuda(0),
        DeviceArg::Cuda => bail!("--device cuda: libtorch sees no CUDA device"),
    };
    if args.rounds < 1 {
        bail!("--rounds must be at least 1");
    }
    let spec = build_spec(&args, device)?;
    let phases: Vec<Phase> = args
        .phases
        .iter()
        .copied()
        .filter(|p| {
            !((*p == Phase::Ancestral && spec.ancestral_images == 0)
                || (*p == Phase::Strided && spec.strided_images == 0)
                || (*p == Phase::Optim && spec.optim_steps == 0))
        })
        .collect();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = args.python.clone().unwrap_or_else(|| {
        first_existing(&[
            manifest.join("../.venv/bin/python"),
            PathBuf::from(".venv/bin/python"),
            PathBuf::from("python3"),
        ])
    });
    let twin = args.twin.clone().unwrap_or_else(|| {
        first_existing(&[
            manifest.join("benches/pytorch_twin.py"),
            PathBuf::from("accelerated/benches/pytorch_twin.py"),
        ])
    });
    let precision = match spec.precision {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
    };
    let json_path = args.json.clone().unwrap_or_else(|| {
        let dir = if manifest.join("../target").exists() {
            manifest.join("../target/bench")
        } else {
            PathBuf::from("target/bench")
        };
        dir.join(format!(
            "versus_pytorch-{}-{}-{precision}.json",
            spec.config, spec.device
        ))
    });

    let spec_line = serde_json::to_string(&spec)?;
    let load_before = load_average();
    let started = utc_now();
    eprintln!("starting the workers (model build and warm-up) …");
    let spawn_ours = |product: bool| -> Result<Worker> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--worker");
        if product {
            cmd.arg("--product");
        }
        Worker::spawn(
            if product { "ours (Trainer)" } else { "ours" },
            cmd,
            &spec_line,
        )
    };
    // The library's pieces and the product's trainer run in separate processes, each holding
    // one model, optimiser and EMA like the twin, so that peak memory compares like with like.
    let mut ours = match phases.iter().any(|&p| p != Phase::Trainer) {
        true => Some(spawn_ours(false)?),
        false => None,
    };
    let mut product = match phases.contains(&Phase::Trainer) {
        true => Some(spawn_ours(true)?),
        false => None,
    };
    let mut twin_cmd = Command::new(&python);
    twin_cmd.arg(&twin);
    let mut torch = Worker::spawn("pytorch", twin_cmd, &spec_line)?;
    for w in ours.iter().chain(product.iter()) {
        for key in ["parameters", "adapted_parameters"] {
            if w.ready[key] != torch.ready[key] {
                bail!(
                    "{key}: {} {} ≠ PyTorch {}; the twin does not match the network",
                    w.side,
                    w.ready[key],
                    torch.ready[key]
                );
            }
        }
    }

    let gpu = device.is_cuda();
    // results[phase][side] = one reply per round.
    let mut results: Vec<[Vec<Value>; 2]> =
        phases.iter().map(|_| [Vec::new(), Vec::new()]).collect();
    for round in 0..args.rounds {
        for (i, &phase) in phases.iter().enumerate() {
            let ours_first = round % 2 == 0;
            for pick in [ours_first, !ours_first] {
                let (side, w) = match (pick, phase) {
                    (true, Phase::Trainer) => (0, product.as_mut().expect("spawned for trainer")),
                    (true, _) => (0, ours.as_mut().expect("spawned for library phases")),
                    (false, _) => (1, &mut torch),
                };
                let r = w.measure(phase, gpu)?;
                eprintln!(
                    "round {round} {:9} {:7}: {:.3} s",
                    phase.name(),
                    w.side,
                    r["seconds"].as_f64().unwrap_or(f64::NAN)
                );
                results[i][side].push(r);
            }
        }
    }
    let ours_ready = ours
        .iter()
        .chain(product.iter())
        .next()
        .map(|w| w.ready.clone())
        .unwrap_or_default();
    let torch_ready = torch.ready.clone();
    for w in ours.into_iter().chain(product) {
        w.quit()?;
    }
    torch.quit()?;
    let load_after = load_average();

    let rate =
        |r: &Value| r["images"].as_f64().unwrap_or(0.0) / r["seconds"].as_f64().unwrap_or(f64::NAN);
    let peak = |rs: &[Value], key: &str| rs.iter().filter_map(|r| r[key].as_u64()).max();
    let mut rows = Vec::new();
    let mut table = String::new();
    let mem_label = if gpu {
        "GPU mem (nvidia-smi)"
    } else {
        "peak RSS"
    };
    table.push_str(&format!(
        "| phase | images/round | ours img/s | PyTorch img/s | ours/PyTorch min / median / max | {} | {mem_label} ours | {mem_label} PyTorch |\n",
        if gpu { "PyTorch max allocated" } else { "ratio by CPU time, median" }
    ));
    table.push_str("|---|---:|---:|---:|---|---:|---:|---:|\n");
    for (i, &phase) in phases.iter().enumerate() {
        let [o, p] = &results[i];
        let ours_rates: Vec<f64> = o.iter().map(rate).collect();
        let torch_rates: Vec<f64> = p.iter().map(rate).collect();
        let ratios: Vec<f64> = ours_rates
            .iter()
            .zip(&torch_rates)
            .map(|(a, b)| a / b)
            .collect();
        let (rmin, rmed, rmax) = stats(&ratios);
        let (_, omed, _) = stats(&ours_rates);
        let (_, pmed, _) = stats(&torch_rates);
        let mem_key = if gpu {
            "gpu_process_peak_bytes"
        } else {
            "peak_rss_bytes"
        };
        let (om, pm) = (peak(o, mem_key), peak(p, mem_key));
        let torch_alloc = peak(p, "cuda_max_allocated_bytes");
        let cpu_rate = |r: &Value| {
            r["images"].as_f64().unwrap_or(0.0) / r["cpu_seconds"].as_f64().unwrap_or(f64::NAN)
        };
        let cpu_ratios: Vec<f64> = o
            .iter()
            .zip(p)
            .map(|(a, b)| cpu_rate(a) / cpu_rate(b))
            .collect();
        let (_, cpu_med, _) = stats(&cpu_ratios);
        let label = match phase {
            Phase::Train => format!("train (batch {})", spec.train_batch),
            Phase::Trainer => format!("train via Trainer::train_step (batch {})", spec.train_batch),
            Phase::Strided => format!("sample, {}-step strided", spec.strided_pairs.len()),
            Phase::Ancestral => format!("sample, {}-step ancestral", spec.ancestral_pairs.len()),
            Phase::Optim => format!(
                "optimiser alone: LAMB step + EMA update (steps, steps/s; twin {})",
                if spec.twin_foreach {
                    "foreach"
                } else {
                    "per tensor"
                }
            ),
        };
        table.push_str(&format!(
            "| {label} | {} | {omed:.2} | {pmed:.2} | {rmin:.3} / {rmed:.3} / {rmax:.3} | {} | {} | {} |\n",
            o.first().and_then(|r| r["images"].as_i64()).unwrap_or(0),
            if gpu { mib(torch_alloc) } else { format!("{cpu_med:.3}") },
            mib(om),
            mib(pm),
        ));
        rows.push(json!({
            "phase": phase.name(),
            "label": label,
            "ours": { "images_per_s": ours_rates, "median_images_per_s": omed, "rounds": o },
            "pytorch": { "images_per_s": torch_rates, "median_images_per_s": pmed, "rounds": p },
            "ratio": { "per_round": ratios, "min": rmin, "median": rmed, "max": rmax },
            "ratio_by_cpu_time": { "per_round": cpu_ratios, "median": cpu_med },
            "peak_memory_bytes": { "measure": mem_key, "ours": om, "pytorch": pm, "pytorch_cuda_max_allocated": torch_alloc },
        }));
    }
    let command: Vec<String> = std::env::args().collect();
    println!(
        "\nddpm vs PyTorch eager — {} on {}, {precision}, {} rounds (A B / B A), {started}\n\
         machine: {} ({} CPUs{}); load before {} / after {}\n\
         parameters: {} both sides; threads ours {} / PyTorch {}; channels-last {}; sampling weights {}; cuDNN autotuning {}{}{}\n",
        spec.config,
        spec.device,
        args.rounds,
        cpu_model().unwrap_or_default(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        torch_ready.get("gpu").and_then(|g| g.as_str()).map(|g| format!(", GPU {g}")).unwrap_or_default(),
        load_before.clone().unwrap_or_default(),
        load_after.clone().unwrap_or_default(),
        ours_ready["parameters"],
        ours_ready["threads"],
        torch_ready["threads"],
        spec.channels_last,
        if spec.bf16_weights { "bf16 (cast once)" } else { "f32" },
        gpu && spec.cudnn_benchmark,
        if spec.twin_foreach { "; PyTorch's LAMB/EMA use _foreach kernels" } else { "" },
        if spec.cuda_graph { "; our sampler replays a CUDA graph" } else { "" },
    );
    println!("{table}");
    let mut settings = serde_json::to_value(&spec)?;
    if let Some(obj) = settings.as_object_mut() {
        for key in ["tables", "strided_pairs", "ancestral_pairs", "warmup_pairs"] {
            obj.remove(key);
        }
        obj.insert("strided_steps".into(), json!(spec.strided_pairs.len()));
        obj.insert("ancestral_steps".into(), json!(spec.ancestral_pairs.len()));
        obj.insert("rounds".into(), json!(args.rounds));
    }
    let report = json!({
        "date": started,
        "command": command,
        "machine": {
            "cpu": cpu_model(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "gpu": torch_ready.get("gpu"),
            "load_before": load_before,
            "load_after": load_after,
        },
        "settings": settings,
        "ours": ours_ready,
        "pytorch": torch_ready,
        "phases": rows,
        "table_markdown": table,
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("results: {}", json_path.display());
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.worker {
        run_worker(args.product)
    } else {
        drive(args)
    }
}
