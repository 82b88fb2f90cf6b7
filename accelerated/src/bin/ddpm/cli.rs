//! The `ddpm` command line: `train`, `sample`, `eval`, `quality`, `info`. Each flag that
//! changes a setting is an entry of a partial configuration table at its config key,
//! layered over the preset or config file by the library's own merge.

use crate::guidance::{run_guidance, GuidanceArgs};
use crate::progress::Bar;
use crate::quality::{run_quality, QualityArgs};
use crate::score::{run_score, ScoreArgs};
use crate::signals::StopSignals;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ddpm::checkpoint::Weights;
use ddpm::config::{self, Config, PRESETS};
use ddpm::data::mnist;
use ddpm::device::{torch_info, DeviceChoice};
use ddpm::error::DdpmError;
use ddpm::eval::{evaluate, EvalOptions};
use ddpm::generate::{self, SampleOptions};
use ddpm::sigma::SigmaChoice;
use ddpm::train::{train_in_group, ResumeData, TrainOptions};
use std::path::{Path, PathBuf};
use toml::Value;

/// DDPM as "an autoregressive VAE" (Su Jianlin), on libtorch: train, sample, evaluate.
#[derive(Debug, Parser)]
#[command(name = "ddpm", version, propagate_version = true)]
pub struct Cli {
    /// Where to compute: `auto` takes CUDA device 0 when libtorch sees one, else the CPU.
    #[arg(long, global = true, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Hide progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// libtorch's CPU threads (intra-op) [default: the cores not busy by
    /// the load average, at least 1; OMP_NUM_THREADS when set]. A runtime option, not a setting of the run.
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub threads: Option<usize>,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model; writes config.toml, metrics.jsonl, samples/ and checkpoints/ in --out.
    Train(Box<TrainArgs>),
    /// Draw samples from a checkpoint and write them as a PNG grid (and optionally one file each).
    Sample(SampleArgs),
    /// The negative ELBO (bits/dim) of a checkpoint on its run's held-out images.
    Eval(EvalArgs),
    /// The σ_t × steps quality table of an mnist checkpoint: FD-MNIST (a small digit
    /// classifier's Fréchet distance, not Inception FID), entropies, bits/dim and grids.
    Quality(QualityArgs),
    /// Show the libtorch version, CUDA availability, the device --device picks, and the data.
    Info,
    /// Score one mnist checkpoint with its run's sampler: FD-MNIST with its interval, the
    /// share of samples classified with confidence ≥ 0.9, H(y|x), H(ȳ), against real digits.
    Score(ScoreArgs),
    /// Class accuracy and FD-MNIST of a conditional mnist run for each classifier-free
    /// guidance weight (default 0, 0.5, 1, 2, 4 at 100 steps), a grid per weight.
    Guidance(GuidanceArgs),
    /// Invert real images to their DDIM (η = 0) latents x_T, written as safetensors; `ddpm
    /// sample --latents FILE` decodes them back.
    Invert(InvertArgs),
    /// Slerp between two latents (two seeds, two latents files or two inverted images),
    /// decoded with DDIM (η = 0) as one row of frames.
    Interpolate(InterpolateArgs),
}

/// Where to run: `Auto` takes CUDA device 0 when libtorch sees one, the CPU otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA device 0 when available, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0; an error when libtorch sees no CUDA device.
    Cuda,
}

impl DeviceArg {
    /// The library's choice.
    pub fn choice(self) -> DeviceChoice {
        match self {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
        }
    }

    pub fn resolve(self) -> anyhow::Result<tch::Device> {
        self.choice().resolve().map_err(|e| name_the_flag(e, &[]))
    }
}

/// Colour channels the images are converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Channels {
    /// One channel (luma).
    Grey,
    /// Three channels.
    Rgb,
}

impl Channels {
    /// Number of channels C.
    pub fn count(self) -> i64 {
        match self {
            Channels::Grey => 1,
            Channels::Rgb => 3,
        }
    }
}

/// How the time step t enters the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeEmbedding {
    /// The article's trainable Embedding(T, base) (row t−1 for step t).
    Learned,
    /// Fixed sinusoidal features of t (dimension base) through Linear → swish → Linear
    /// (width 4·base); each row is shared by all t, which helps short runs.
    Sinusoidal,
}

/// Which schedule of α_1..α_T to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleKind {
    /// The article's: α_t = sqrt(1 − 0.02·t/T).
    Article,
    /// Ho et al.'s: β^Ho_t = linspace(1e-4, 0.02, T), α_t = sqrt(1 − β^Ho_t).
    Linear,
    /// Nichol & Dhariwal's cosine, s = 0.008: β^Ho_t = min(1 − f(t)/f(t−1), 0.999),
    /// f(t) = cos²((t/T + s)/(1 + s)·π/2).
    Cosine,
}

/// Which training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossWeight {
    /// mean_B ‖ε − ε̂‖², the article's training loss (its weight dropped).
    None,
    /// Loss (8) with its exact weight β_t⁴/(β̄_t² α_t² σ_t²) for the chosen σ.
    Article,
    /// Min-SNR-γ: min(SNR_t, γ)/SNR_t ‖ε − ε̂‖², SNR_t = ᾱ_t²/β̄_t², γ = --min-snr-gamma.
    #[value(name = "min_snr")]
    MinSnr,
}

/// σ_t of the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SigmaArg {
    /// σ_t = β̄_{t−1} β_t / β̄_t (optimal for a single training image).
    Posterior,
    /// σ_t = β_t (optimal for standard-normal data; the article's sampler).
    Beta,
    /// Optimal for isotropic Gaussian data N(m, s² I); needs --data-std s.
    Isotropic,
}

/// The config value of a flag's choice: its name, as the config files spell it.
fn name<E: ValueEnum>(choice: E) -> Value {
    let value = choice.to_possible_value().expect("no variant is skipped");
    Value::from(value.get_name())
}

/// The σ choice `flag` (`--sigma` or `--loss-sigma`) names, as a config value.
fn sigma_value(flag: &str, arg: SigmaArg, data_std: Option<f64>) -> anyhow::Result<Value> {
    let mut table = toml::Table::new();
    table.insert("kind".into(), name(arg));
    match (arg, data_std) {
        (SigmaArg::Isotropic, Some(s)) => {
            table.insert("data_std".into(), Value::from(s));
        }
        (SigmaArg::Isotropic, None) => bail!(
            "{flag} isotropic needs --data-std S (the data's per-dimension standard deviation)"
        ),
        _ => {}
    }
    Ok(Value::Table(table))
}

/// The σ choice `flag` names, as the library's.
fn sigma_choice(flag: &str, arg: SigmaArg, data_std: Option<f64>) -> anyhow::Result<SigmaChoice> {
    Ok(sigma_value(flag, arg, data_std)?.try_into()?)
}

/// A count as a config value.
fn int<N: TryInto<i64>>(n: N) -> Value {
    Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

/// A flag given on the command line: its name, the config key it sets, the value.
type Given = (&'static str, &'static str, Value);

/// The flags given, at their config keys, as a partial configuration table.
pub fn overrides(given: &[Given]) -> toml::Table {
    let mut table = toml::Table::new();
    for (_, key, value) in given {
        config::set_key(&mut table, key, value.clone());
    }
    table
}

/// The flags a library error's advice points to, by the config key it names.
const ADVICE_FLAGS: [(&str, &str); 3] = [
    ("train.lr", "--lr"),
    ("train.grad_clip", "--grad-clip"),
    ("train.skip_nonfinite", "--skip-nonfinite"),
];

/// `error` with the flag named beside the config key it names (`train.lr (--lr)`), when
/// that key was set by a flag, or beside the keys its advice names; `--device` for CUDA.
fn name_the_flag(error: DdpmError, given: &[Given]) -> anyhow::Error {
    let key = match &error {
        DdpmError::OutOfRange { key, .. }
        | DdpmError::Incompatible { key, .. }
        | DdpmError::OutOfMemory { key, .. } => *key,
        DdpmError::NonFinite { .. } | DdpmError::Diverged { .. } => {
            let mut text = error.to_string();
            for (key, flag) in ADVICE_FLAGS {
                text = text.replacen(key, &format!("{key} ({flag})"), 1);
            }
            return anyhow::anyhow!("{text}");
        }
        DdpmError::CudaUnavailable => {
            return anyhow::anyhow!("{error} (--device cpu or --device auto)")
        }
        _ => return error.into(),
    };
    // T is one setting at two keys: --t-max sets diffusion.t_max, the network checks model.t_max.
    let set_by = |k: &str| k == key || (key == "model.t_max" && k == "diffusion.t_max");
    match given.iter().find(|(_, k, _)| set_by(k)) {
        Some((flag, ..)) => {
            anyhow::anyhow!(
                "{}",
                error
                    .to_string()
                    .replacen(key, &format!("{key} ({flag})"), 1)
            )
        }
        None => error.into(),
    }
}

/// `ddpm train`. Settings come from --preset (or --config FILE); each flag given overrides one.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base settings: `mnist` (embedded digits, unconditional, a ~10-minute run on 2 CPU
    /// cores), `mnist-conditional` (the same on the digits' labels, sampled with guidance 0.5:
    /// the main job), `cifar32` or `celeba128` (the article's CelebA-HQ setting; both need
    /// --data DIR) [default: mnist].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    pub preset: Option<String>,
    /// A TOML or JSON file of settings (sections data, model, diffusion, train, sample; an
    /// optional top-level `preset` key picks its base). Replaces --preset.
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// The run directory [default: runs/<preset>].
    #[arg(long, visible_alias = "run-dir", value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the run in --out from its newest intact checkpoint, exactly as if never
    /// stopped; its saved settings are used, only --steps may change (and --data: where its
    /// images are now).
    #[arg(long)]
    pub resume: bool,
    /// Train on this folder of PNG/JPEG images (centre-cropped and resized) instead of MNIST.
    /// With --resume: where the run's images are now (a folder that moved, a copy); they
    /// must hold the images the run was trained on (see --allow-data-change).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Image side; MNIST allows 28 (default) or 32 (padded) [default: the preset's].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<i64>)]
    pub image_size: Option<i64>,
    /// Image colours for --data [default: the preset's].
    #[arg(long, value_enum)]
    pub channels: Option<Channels>,
    /// Flip training images horizontally at random.
    #[arg(long)]
    pub flip: bool,
    /// Images held out of training for `ddpm eval` [default: the preset's].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub holdout: Option<usize>,
    /// Channels of the first U-Net level [default: the preset's].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<i64>)]
    pub base_channels: Option<i64>,
    /// How t enters the network [default: the preset's].
    #[arg(long, value_enum)]
    pub time_embedding: Option<TimeEmbedding>,
    /// Noise schedule [default: the preset's, `article`].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Number of diffusion steps T [default: 1000].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<i64>)]
    pub t_max: Option<i64>,
    /// Optimiser updates [default: the preset's]. The learning-rate decay is fixed at steps,
    /// not fractions of the run, so a run extended with `--resume --steps N` past its last
    /// decay point goes on at its final rate.
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub steps: Option<u64>,
    /// Images per update [default: the preset's].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub batch_size: Option<usize>,
    /// LAMB's base learning rate [default: the preset's: 5e-3 for mnist, the article's 1e-3
    /// for the others].
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub lr: Option<f64>,
    /// Updates of linear learning-rate warm-up [default: the preset's].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub warmup: Option<u64>,
    /// Clip the global gradient norm to this [default: no clipping].
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub grad_clip: Option<f64>,
    /// EMA decay of the weights [default: the preset's].
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub ema_decay: Option<f64>,
    /// `none`: mean_B ‖ε − ε̂‖² (the article's training loss); `article`: loss (8) with its
    /// exact weight for --loss-sigma; `min_snr`: Min-SNR-γ [default: none].
    #[arg(long, value_enum)]
    pub loss_weight: Option<LossWeight>,
    /// σ_t in loss (8)'s weight [default: beta].
    #[arg(long, value_enum)]
    pub loss_sigma: Option<SigmaArg>,
    /// s for --loss-sigma isotropic.
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub data_std: Option<f64>,
    /// γ of --loss-weight min_snr: samples with SNR_t > γ are weighted γ/SNR_t [default: 5].
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub min_snr_gamma: Option<f64>,
    /// bfloat16 autocast on CUDA (ignored on the CPU).
    #[arg(long)]
    pub bf16: bool,
    /// Lay the convolution weights and inputs out channels-last (NHWC) for cuDNN's NHWC
    /// kernels; the same training up to f32 rounding (train.channels_last).
    #[arg(long)]
    pub channels_last: bool,
    /// Seed of everything random [default: 0].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub seed: Option<u64>,
    /// Checkpoint every N updates (and at the end) [default: the preset's].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub checkpoint_every: Option<u64>,
    /// Keep the last K checkpoints [default: 3].
    #[arg(long, value_name = "K", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub keep_last: Option<usize>,
    /// Write a sample grid every N updates (and at the end; 0 = only at the end) [default:
    /// the preset's].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub sample_every: Option<u64>,
    /// Sampler steps of the grids drawn during training (strided; `ddpm sample` is not
    /// affected) [default: the preset's, 100].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub grid_steps: Option<usize>,
    /// Skip batches whose loss is NaN or infinite instead of stopping.
    #[arg(long)]
    pub skip_nonfinite: bool,
    /// With --resume: continue even when the data no longer hold what the run was trained on
    /// (images added, removed or changed; the epoch length and the held-out split change).
    /// The checkpoints written from then on record the new data.
    #[arg(long, requires = "resume")]
    pub allow_data_change: bool,
    /// Scale the sample grids up S times, nearest neighbour (1 = raw pixels) [default: the
    /// preset's, 4 for mnist].
    #[arg(long, value_name = "S", allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub grid_scale: Option<u64>,
    /// Train a class-conditional network on the data's labels: MNIST's digits, or --data DIR
    /// with one subfolder a class (the classes are the subfolders' names, sorted).
    #[arg(long)]
    pub conditional: bool,
    /// With --conditional: the probability that a training label is dropped to "no class",
    /// so one network also predicts unconditionally (for --guidance) [default: 0.1].
    #[arg(long, value_name = "P", allow_hyphen_values = true, value_parser = finite)]
    pub label_dropout: Option<f64>,
    /// Under torchrun (docs/distributed.md): seconds a rank waits for the others, to join and
    /// at every step, before it stops with an error naming them [default: 300].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub distributed_timeout: Option<u64>,
    /// The grids' step rule (sample.sampler): ancestral, ddim (η = 0 unless the config sets
    /// sample.eta) or dpm++2m (DPM-Solver++(2M), --grid-steps evaluations) [default: the
    /// preset's].
    #[arg(long, value_name = "RULE", value_parser = SAMPLERS)]
    pub sampler: Option<String>,
    /// Which steps the grids visit (sample.spacing): strided, linspace, leading, trailing
    /// [default: strided].
    #[arg(long, value_name = "LIST", value_parser = SPACINGS)]
    pub spacing: Option<String>,
}

/// The values of --sampler (`config::SamplerKind`).
const SAMPLERS: [&str; 3] = ["ancestral", "ddim", "dpm++2m"];

/// The values of --spacing (`timesteps::Spacing`).
const SPACINGS: [&str; 4] = ["strided", "linspace", "leading", "trailing"];

impl TrainArgs {
    /// --preset, or `mnist`.
    pub fn preset_name(&self) -> &str {
        self.preset.as_deref().unwrap_or("mnist")
    }

    /// Each flag given that changes a setting: (flag, config key, value). The one place a
    /// flag is tied to its key.
    pub fn given(&self) -> anyhow::Result<Vec<Given>> {
        let yes = |b: bool| b.then_some(Value::Boolean(true));
        let loss_sigma = self
            .loss_sigma
            .map(|s| sigma_value("--loss-sigma", s, self.data_std))
            .transpose()?;
        let path = |p: &PathBuf| Value::from(p.to_string_lossy().into_owned());
        let flags: Vec<(&'static str, &'static str, Option<Value>)> = vec![
            (
                "--data",
                "data.source",
                self.data.as_ref().map(|_| Value::from("folder")),
            ),
            ("--data", "data.path", self.data.as_ref().map(path)),
            ("--image-size", "model.image_size", self.image_size.map(int)),
            (
                "--channels",
                "model.in_channels",
                self.channels.map(|c| int(c.count())),
            ),
            ("--flip", "data.flip", yes(self.flip)),
            ("--holdout", "data.holdout", self.holdout.map(int)),
            (
                "--base-channels",
                "model.base_channels",
                self.base_channels.map(int),
            ),
            (
                "--time-embedding",
                "model.time_embedding",
                self.time_embedding.map(name),
            ),
            ("--schedule", "diffusion.schedule", self.schedule.map(name)),
            ("--t-max", "diffusion.t_max", self.t_max.map(int)),
            ("--steps", "train.steps", self.steps.map(int)),
            ("--batch-size", "train.batch_size", self.batch_size.map(int)),
            ("--lr", "train.lr", self.lr.map(Value::from)),
            ("--warmup", "train.warmup_steps", self.warmup.map(int)),
            (
                "--grad-clip",
                "train.grad_clip",
                self.grad_clip.map(Value::from),
            ),
            (
                "--ema-decay",
                "train.ema_decay",
                self.ema_decay.map(Value::from),
            ),
            (
                "--loss-weight",
                "train.loss_weight",
                self.loss_weight.map(name),
            ),
            ("--loss-sigma", "train.loss_sigma", loss_sigma),
            (
                "--min-snr-gamma",
                "train.min_snr_gamma",
                self.min_snr_gamma.map(Value::from),
            ),
            ("--bf16", "train.bf16", yes(self.bf16)),
            (
                "--channels-last",
                "train.channels_last",
                yes(self.channels_last),
            ),
            ("--seed", "train.seed", self.seed.map(int)),
            (
                "--checkpoint-every",
                "train.checkpoint_every",
                self.checkpoint_every.map(int),
            ),
            ("--keep-last", "train.keep_last", self.keep_last.map(int)),
            (
                "--sample-every",
                "train.sample_every",
                self.sample_every.map(int),
            ),
            ("--grid-steps", "train.grid_steps", self.grid_steps.map(int)),
            (
                "--skip-nonfinite",
                "train.skip_nonfinite",
                yes(self.skip_nonfinite),
            ),
            (
                "--grid-scale",
                "sample.grid_scale",
                self.grid_scale.map(int),
            ),
            ("--conditional", "train.conditional", yes(self.conditional)),
            (
                "--label-dropout",
                "train.label_dropout",
                self.label_dropout.map(Value::from),
            ),
            (
                "--distributed-timeout",
                "train.distributed_timeout_s",
                self.distributed_timeout.map(int),
            ),
            (
                "--sampler",
                "sample.sampler",
                self.sampler.clone().map(Value::from),
            ),
            (
                "--spacing",
                "sample.spacing",
                self.spacing.clone().map(Value::from),
            ),
        ];
        Ok(flags
            .into_iter()
            .filter_map(|(flag, key, value)| Some((flag, key, value?)))
            .collect())
    }

    /// The settings: the config file or preset, then each flag given, layered by the
    /// library. Returns the flags given too.
    pub fn config(&self) -> anyhow::Result<(Config, Vec<Given>)> {
        let base = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::preset(self.preset_name())?,
        };
        let given = self.given()?;
        let cfg = base
            .with_overrides(overrides(&given), "the command line")
            .map_err(|e| name_the_flag(e, &given))?;
        Ok((cfg, given))
    }
}

/// `ddpm sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 36, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub n: usize,
    /// The PNG grid to write.
    #[arg(long, default_value = "samples.png", value_name = "FILE")]
    pub out: PathBuf,
    /// Also write each image as DIR/NNNNN.png.
    #[arg(long, value_name = "DIR")]
    pub each: Option<PathBuf>,
    /// σ_t of the ancestral sampler [default: the run's sample.sigma].
    #[arg(long, value_enum)]
    pub sigma: Option<SigmaArg>,
    /// s for --sigma isotropic (the data's per-dimension standard deviation).
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub data_std: Option<f64>,
    /// Visit only N of the T steps, evenly strided (ancestral on the respaced chain, or DDIM
    /// with --eta) [default: the run's sample.steps, else all T].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub steps: Option<usize>,
    /// Use DDIM with this η (0 deterministic, 1 strided DDPM) [default: the ancestral sampler].
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub eta: Option<f64>,
    /// Clip x̂_0 to [−1, 1] at every step (true/false) [default: the run's sample.clip_each_step].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub clip_each_step: Option<bool>,
    /// Seed of the sampler's noise.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<i64>)]
    pub seed: i64,
    /// Use the raw weights instead of their EMA.
    #[arg(long)]
    pub raw: bool,
    /// Run the network in bfloat16 autocast on CUDA (ignored on the CPU); the sampler's
    /// update stays f32.
    #[arg(long)]
    pub bf16: bool,
    /// Cast the weights to bfloat16 once and run the whole network in bf16, on any device
    /// (slow on the CPU), instead of autocast at every call; the sampler's update stays f32.
    #[arg(long, conflicts_with = "bf16")]
    pub bf16_weights: bool,
    /// Lay the convolution weights and the network's input out channels-last (NHWC) for
    /// cuDNN's NHWC kernels; the same images up to f32 rounding.
    #[arg(long)]
    pub channels_last: bool,
    /// Replay the network's kernels from a CUDA graph captured at each batch's first step:
    /// one launch a step instead of hundreds (CUDA only; a build with `--features
    /// cuda-graph`; not with --bf16, use --bf16-weights).
    #[arg(long, conflicts_with = "bf16")]
    pub cuda_graph: bool,
    /// Images per grid row [default: ceil(sqrt(n))].
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<i64>)]
    pub columns: Option<i64>,
    /// Scale the grid up S times, nearest neighbour (1 = raw pixels; --each files stay raw)
    /// [default: the run's sample.grid_scale].
    #[arg(long, value_name = "S", allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub grid_scale: Option<u64>,
    /// Images drawn at once; memory is bounded by one batch, and --each gets each batch as it
    /// is drawn. Part of what fixes the images of a --seed [default: the run's
    /// sample.batch_size, else 64].
    #[arg(long, value_name = "B", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub batch_size: Option<usize>,
    /// The step rule (sample.sampler): ancestral, ddim (η from --eta, else 0) or dpm++2m
    /// (DPM-Solver++(2M), --steps network evaluations, deterministic) [default: the run's,
    /// else ancestral, or DDIM when --eta is given].
    #[arg(long, value_name = "RULE", value_parser = SAMPLERS)]
    pub sampler: Option<String>,
    /// Which steps are visited (sample.spacing): strided (this project's list), or diffusers'
    /// linspace, leading, trailing [default: the run's, else strided].
    #[arg(long, value_name = "LIST", value_parser = SPACINGS)]
    pub spacing: Option<String>,
    /// Write no grid (--out); for more images than a grid holds (10000), with --each.
    #[arg(long, conflicts_with = "out")]
    pub no_grid: bool,
    /// A conditional model's classes to draw: an index or a name (`3`), a list (`1,4,7`),
    /// `all`, or `none` (the unconditional prediction); --n images of each, the grid one row a
    /// class when there are several [default: every class in turn, --n images in all, one
    /// column a class].
    #[arg(long, value_name = "CLASS")]
    pub class: Option<String>,
    /// A conditional model's classifier-free guidance weight w: ε̂ = (1 + w) ε̂(x, class) −
    /// w ε̂(x, none) [default: the run's sample.guidance; the mnist-conditional preset's 0.5].
    #[arg(long, value_name = "W", allow_hyphen_values = true, value_parser = finite)]
    pub guidance: Option<f64>,
    /// Decode these latents (`ddpm invert`'s safetensors) instead of fresh noise, one image
    /// each; unless given, --eta 0, the file's --steps and no --clip-each-step (the walk that
    /// returns the inverted images).
    #[arg(long, value_name = "FILE", conflicts_with = "n")]
    pub latents: Option<PathBuf>,
}

/// `ddpm eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Evaluate only the first N held-out images [default: all].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub limit: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub batch_size: usize,
    /// A quick estimate from K random t per image instead of all T (unbiased, noisier; the
    /// output says so).
    #[arg(long, value_name = "K", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub quick: Option<usize>,
    /// σ_t of the generator [default: the run's sample.sigma].
    #[arg(long, value_enum)]
    pub sigma: Option<SigmaArg>,
    /// s for --sigma isotropic.
    #[arg(long, allow_hyphen_values = true, value_parser = finite)]
    pub data_std: Option<f64>,
    /// Use the raw weights instead of their EMA.
    #[arg(long)]
    pub raw: bool,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub seed: u64,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let progress = !cli.no_progress;
    set_threads(cli.threads)?;
    match cli.command {
        Command::Info => info(cli.device),
        Command::Train(args) => run_train(&args, cli.device, progress),
        Command::Sample(args) => run_sample(&args, cli.device, progress),
        Command::Quality(args) => run_quality(&args, cli.device, progress),
        Command::Score(args) => run_score(&args, cli.device, progress),
        Command::Guidance(args) => run_guidance(&args, cli.device, progress),
        Command::Invert(args) => run_invert(&args, cli.device, progress),
        Command::Interpolate(args) => run_interpolate(&args, cli.device, progress),
        Command::Eval(args) => {
            let device = cli.device.resolve()?;
            let opts = EvalOptions {
                checkpoint: args.checkpoint.clone(),
                device,
                weights: if args.raw { Weights::Raw } else { Weights::Ema },
                limit: args.limit,
                batch_size: args.batch_size,
                quick: args.quick,
                sigma: args
                    .sigma
                    .map(|s| sigma_choice("--sigma", s, args.data_std))
                    .transpose()?,
                seed: args.seed,
            };
            let mut bar = Bar::new(progress);
            let report = evaluate(&opts, &mut bar)
                .map_err(eval_error)
                .with_context(|| format!("evaluating {}", args.checkpoint.display()))?;
            println!("{report}");
            Ok(())
        }
    }
}

/// Sets libtorch's CPU threads: `--threads N`, else OMP_NUM_THREADS when set (libtorch reads
/// it), else [`default_threads`].
fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let n = match threads {
        Some(0) => bail!("--threads must be at least 1, got 0"),
        Some(n) => n,
        None if std::env::var_os("OMP_NUM_THREADS").is_some() => return Ok(()),
        None => default_threads(),
    };
    let n = i32::try_from(n).unwrap_or(i32::MAX);
    tch::set_num_threads(n);
    tracing::debug!("libtorch threads: {n}");
    Ok(())
}

/// The default number of libtorch threads: the cores not already busy, by the one-minute
/// load average (cores − load, rounded, at least 1). libtorch's own default, every core,
/// collapses when others use them (its threads spin waiting for each other): on 2 busy
/// cores `ddpm sample --n 2 --steps 20` took 10 s with 2 threads against 0.9 s with one
/// (docs/performance.md, "Threads").
fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    match load {
        Some(load) if load.is_finite() && load >= 0.0 => {
            let free = (cores as f64 - load).round();
            (free.max(1.0) as usize).min(cores)
        }
        _ => cores,
    }
}

fn info(choice: DeviceArg) -> anyhow::Result<()> {
    println!("ddpm {}", env!("CARGO_PKG_VERSION"));
    println!("{}", torch_info());
    match choice.resolve() {
        Ok(d) => println!("device for --device {choice:?}: {d:?}"),
        Err(e) => println!("device for --device {choice:?}: unavailable ({e})"),
    }
    let mnist = mnist::default_path();
    let state = if mnist.exists() {
        "present"
    } else {
        "MISSING: run scripts/bootstrap.sh"
    };
    println!("embedded MNIST-5k: {} ({state})", mnist.display());
    let backends = ddpm::distributed::backends();
    println!(
        "distributed backends: {}",
        if backends.is_empty() {
            "none (built without the `distributed` feature)".to_string()
        } else {
            backends.join(", ")
        }
    );
    Ok(())
}

fn run_train(args: &TrainArgs, device: DeviceArg, progress: bool) -> anyhow::Result<()> {
    let (cfg, given) = if args.resume && args.preset.is_none() && args.config.is_none() {
        // The run's saved settings are used; the flags are checked against them below.
        (Config::preset(args.preset_name())?, args.given()?)
    } else {
        args.config()?
    };
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(args.preset_name()));
    if args.resume {
        let must_match = (args.preset.is_some() || args.config.is_some()).then_some(&cfg);
        check_resume_flags(&run_dir, &given, args.steps, must_match)?;
    }
    let signals = StopSignals::install().context("cannot install the signal handlers")?;
    let opts = TrainOptions {
        run_dir: run_dir.clone(),
        device: rank_device(device.resolve()?)?,
        resume: args.resume,
        resume_must_match: args.preset.is_some() || args.config.is_some(),
        stop: signals.stop_flag(),
        // On resume, --data names where the run's images are now (held to its fingerprint).
        resume_data: ResumeData {
            path: args.data.clone().filter(|_| args.resume),
            allow_change: args.allow_data_change,
        },
    };
    if std::env::var_os("RANK").is_none_or(|r| r == "0") {
        tracing::info!(
            "training on {:?}, run directory {}",
            opts.device,
            run_dir.display()
        );
    }
    let group = join_group(args, &cfg, &given, opts.device)?;
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let mut bar = Bar::new(progress && rank == 0);
    let summary = train_in_group(&cfg, &opts, args.steps, &mut bar, group)
        .map_err(|e| match e {
            DdpmError::ResumeSettings { .. } => anyhow::anyhow!(
                "{e}; leave out --preset/--config to continue it with its own settings, or choose another --out"
            ),
            DdpmError::RunExists { .. } => anyhow::Error::from(e)
                .context("pass --resume to continue that run, or choose another --out"),
            DdpmError::DataChanged { .. } => anyhow::anyhow!(
                "{e}; give the run's own images with --data DIR, or pass --allow-data-change to continue on these"
            ),
            e => name_the_flag(e, &given),
        })
        .with_context(|| format!("training in {}", run_dir.display()))?;
    if summary.stopped {
        return Err(stopped_message(&signals, &summary, &run_dir));
    }
    if rank != 0 {
        // Rank 0 says where the run is.
        return Ok(());
    }
    println!(
        "trained {} steps (last loss {:.3}{}); checkpoint {}, samples {}{}",
        summary.steps,
        summary.last_loss,
        if summary.skipped > 0 {
            format!(", {} batches skipped", summary.skipped)
        } else {
            String::new()
        },
        summary.checkpoint.display(),
        summary.grid.display(),
        loss_curve_note(&summary)
    );
    Ok(())
}

/// Under torchrun on CUDA (`--device cuda`, or auto with a GPU): this rank's GPU,
/// cuda:LOCAL_RANK; otherwise `device` as it is.
fn rank_device(device: tch::Device) -> anyhow::Result<tch::Device> {
    let Some(launch) = ddpm::distributed::Launch::from_env()? else {
        return Ok(device);
    };
    Ok(ddpm::distributed::rank_device(
        device,
        launch.local_rank,
        tch::Cuda::device_count(),
    )?)
}

/// Under torchrun (its RANK, WORLD_SIZE, … set): this rank's process group, joined within
/// --distributed-timeout (else `train.distributed_timeout_s`, else 300 s), after refusing a
/// --batch-size the ranks cannot share (on --resume the run's saved batch is checked by the
/// library). Without torchrun's variables: none, and nothing changes.
fn join_group(
    args: &TrainArgs,
    cfg: &Config,
    given: &[Given],
    device: tch::Device,
) -> anyhow::Result<Option<ddpm::distributed::ProcessGroup>> {
    let Some(launch) = ddpm::distributed::Launch::from_env()? else {
        return Ok(None);
    };
    if !args.resume {
        ddpm::distributed::check_batch_size(cfg.train.batch_size, launch.world_size)
            .map_err(|e| name_the_flag(e, given))?;
    }
    let secs = args
        .distributed_timeout
        .or(cfg.train.distributed_timeout_s)
        .unwrap_or(ddpm::distributed::DEFAULT_TIMEOUT_S);
    if secs == 0 {
        bail!("--distributed-timeout must be at least 1 second, got 0");
    }
    let timeout = std::time::Duration::from_secs(secs);
    let group = ddpm::distributed::ProcessGroup::join_on(&launch, timeout, device)?;
    if launch.rank == 0 {
        if let (_, Some(note)) = ddpm::distributed::ProcessGroup::backend_for(device) {
            tracing::warn!("{note}");
        }
        tracing::info!(
            "data-parallel training: {} ranks ({}, {}:{}), timeout {secs} s",
            launch.world_size,
            group.backend(),
            launch.master_addr,
            launch.master_port
        );
    }
    Ok(Some(group))
}

/// ", loss curve PATH" for the last line of a run, when it drew one.
fn loss_curve_note(summary: &ddpm::train::TrainSummary) -> String {
    summary
        .loss_curve
        .as_ref()
        .map_or(String::new(), |p| format!(", loss curve {}", p.display()))
}

/// `--resume` with flags: each setting flag must equal the value saved with the run (all
/// that differ are named, flag and key), and the run must have steps left to train: the
/// target (`--steps`, else the saved `train.steps`) must lie above the step of the
/// checkpoint resumed from. A run without a checkpoint is left to the library's error.
fn check_resume_flags(
    run_dir: &Path,
    given: &[Given],
    steps: Option<u64>,
    must_match: Option<&Config>,
) -> anyhow::Result<()> {
    let root = ddpm::train::checkpoints_dir(run_dir);
    let Some(ckpt) = ddpm::checkpoint::latest_good(&root)? else {
        return Ok(());
    };
    let saved = &ckpt.manifest.config;
    let settings: Vec<Given> = given
        .iter()
        .filter(|(_, key, _)| *key != "train.steps" && *key != "train.distributed_timeout_s")
        .cloned()
        .collect();
    if !settings.is_empty() {
        let here = saved
            .with_overrides(overrides(&settings), "the command line")
            .map_err(|e| name_the_flag(e, &settings))?;
        let differences = here.differences(saved)?;
        if !differences.is_empty() {
            let list = differences
                .iter()
                .map(|(key, here, saved)| {
                    let flag = settings
                        .iter()
                        .find(|(_, k, _)| k == key)
                        .map_or(String::new(), |(f, ..)| format!("{f}: "));
                    format!("{flag}{key} = {here} here, {saved} in the run")
                })
                .collect::<Vec<_>>()
                .join("; ");
            bail!(
                "--resume continues with the run's saved settings, and {} given differ from them ({list}); leave them out or give the saved values (only --steps can change)",
                if differences.len() == 1 { "a flag" } else { "flags" }
            );
        }
    }
    if let Some(cfg) = must_match {
        if !cfg.differences(saved)?.is_empty() {
            // The library refuses other settings, naming each; that comes first.
            return Ok(());
        }
    }
    let at = ckpt.manifest.step;
    let target = steps.unwrap_or(saved.train.steps);
    if target <= at {
        match steps {
            Some(n) => bail!(
                "--steps {n} leaves nothing to train: the run is already at step {at} ({}); give --steps above {at} to extend it",
                ckpt.dir.display()
            ),
            None => bail!(
                "the run has finished: it is at step {at} of its {target} ({}); give --steps above {at} to extend it",
                ckpt.dir.display()
            ),
        }
    }
    Ok(())
}

/// Says where a run stopped by a signal stands and how to resume it (to stderr, ignoring a
/// terminal that hung up), and returns the error that makes `main` exit with 128 + signal.
fn stopped_message(
    signals: &StopSignals,
    summary: &ddpm::train::TrainSummary,
    run_dir: &Path,
) -> anyhow::Error {
    use std::io::Write;
    let stopped = signals.received().unwrap_or(crate::signals::Stopped {
        signal: signal_hook::consts::SIGINT,
        name: "SIGINT",
    });
    let _ = writeln!(
        std::io::stderr(),
        "{stopped}: stopped at step {}; checkpoint {}; resume with: ddpm train --resume --out {}",
        summary.steps,
        summary.checkpoint.display(),
        run_dir.display()
    );
    anyhow::Error::new(stopped)
}

impl SampleArgs {
    /// The `sample` settings the flags change: (flag, config key, value).
    fn given(&self) -> anyhow::Result<Vec<Given>> {
        let sigma = self
            .sigma
            .map(|s| sigma_value("--sigma", s, self.data_std))
            .transpose()?;
        let flags: Vec<(&'static str, &'static str, Option<Value>)> = vec![
            ("--sigma", "sample.sigma", sigma),
            ("--steps", "sample.steps", self.steps.map(int)),
            ("--eta", "sample.eta", self.eta.map(Value::from)),
            (
                "--clip-each-step",
                "sample.clip_each_step",
                self.clip_each_step.map(Value::from),
            ),
            (
                "--grid-scale",
                "sample.grid_scale",
                self.grid_scale.map(int),
            ),
            (
                "--batch-size",
                "sample.batch_size",
                self.batch_size.map(int),
            ),
            (
                "--guidance",
                "sample.guidance",
                self.guidance.map(Value::from),
            ),
            (
                "--sampler",
                "sample.sampler",
                self.sampler.clone().map(Value::from),
            ),
            (
                "--spacing",
                "sample.spacing",
                self.spacing.clone().map(Value::from),
            ),
        ];
        Ok(flags
            .into_iter()
            .filter_map(|(flag, key, value)| Some((flag, key, value?)))
            .collect())
    }
}

fn run_sample(args: &SampleArgs, device: DeviceArg, progress: bool) -> anyhow::Result<()> {
    if let Some(file) = &args.latents {
        return run_sample_latents(args, file, device, progress);
    }
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    if !args.no_grid && args.n > generate::MAX_GRID_IMAGES {
        bail!(
            "--n {} is more than a grid holds ({} images, kept in memory together): write them one a file with --each DIR --no-grid, or lower --n",
            args.n,
            generate::MAX_GRID_IMAGES
        );
    }
    if args.no_grid && args.each.is_none() {
        bail!("--no-grid without --each writes nothing: give --each DIR");
    }
    let device = device.resolve()?;
    let given = args.given()?;
    let opts = SampleOptions {
        n: args.n,
        seed: args.seed,
        bf16: args.bf16,
        bf16_weights: args.bf16_weights,
        cuda_graph: args.cuda_graph,
        channels_last: args.channels_last,
        weights: if args.raw { Weights::Raw } else { Weights::Ema },
        columns: args.columns,
        out: (!args.no_grid).then(|| args.out.clone()),
        each: args.each.clone(),
        classes: args.class.clone(),
    };
    let mut bar = Bar::new(progress);
    let sampled = generate::run(
        &args.checkpoint,
        overrides(&given),
        "the command line",
        &opts,
        device,
        &mut bar,
    )
    .map_err(|e| match e {
        // The batch is the setting to lower, given or not.
        DdpmError::OutOfMemory {
            key: "sample.batch_size",
            ..
        } => anyhow::anyhow!(
            "{}",
            e.to_string()
                .replacen("sample.batch_size", "sample.batch_size (--batch-size)", 1)
        ),
        DdpmError::OutOfMemory { key: "n", .. } => {
            anyhow::anyhow!("{}", e.to_string().replacen("lower n", "lower --n", 1))
        }
        // Without --class only a guidance weight asks an unconditional model for classes.
        DdpmError::NotConditional { .. } if args.class.is_none() => {
            anyhow::anyhow!("--guidance: {e}")
        }
        DdpmError::NotConditional { .. } | DdpmError::UnknownClass { .. } => {
            anyhow::anyhow!("--class: {e}")
        }
        e => name_the_flag(e, &given),
    })?;
    if !args.no_grid {
        println!("wrote {}", args.out.display());
    }
    if let Some(dir) = &args.each {
        println!("wrote {} images to {}", sampled.count, dir.display());
    }
    Ok(())
}

/// `ddpm invert`.
#[derive(Debug, Args)]
pub struct InvertArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Image files (PNG/JPEG) or directories of them, exactly the model's size and channels
    /// (required; checked when run, so that the parser tests can parse every other flag alone).
    #[arg(long, num_args = 1.., value_name = "DIR|FILE")]
    pub images: Vec<PathBuf>,
    /// DDIM steps (the strided list `ddpm sample --steps N --eta 0` walks, run upwards).
    #[arg(long, default_value_t = 50, value_name = "N", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub steps: usize,
    /// The latents file to write (safetensors; the settings in its metadata).
    #[arg(long, default_value = "latents.safetensors", value_name = "FILE")]
    pub out: PathBuf,
    /// Use the raw weights instead of their EMA.
    #[arg(long)]
    pub raw: bool,
    /// Images inverted at once [default: the run's sample.batch_size, else 64].
    #[arg(long, value_name = "B", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub batch_size: Option<usize>,
}

/// `ddpm interpolate`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("ends").args(["seeds", "latents", "images", "seed"]))]
pub struct InterpolateArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// The two ends as seeds of x_T ~ N(0, I) (whole numbers, read when run).
    #[arg(long, num_args = 2, value_names = ["A", "B"], allow_negative_numbers = true)]
    pub seeds: Vec<String>,
    /// The two ends as latents files (the first latent of each); with --classes one file, its
    /// first latent.
    #[arg(long, num_args = 1..=2, value_names = ["A", "B"])]
    pub latents: Vec<PathBuf>,
    /// The two ends as images, inverted first.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub images: Vec<PathBuf>,
    /// Frames, the two ends included.
    #[arg(long, default_value_t = 8, value_name = "K", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub frames: usize,
    /// DDIM steps of the decoding (and of the inversion of --images).
    #[arg(long, default_value_t = 50, value_name = "N", allow_negative_numbers = true, value_parser = whole::<usize>)]
    pub steps: usize,
    /// The PNG row of frames.
    #[arg(long, default_value = "interpolation.png", value_name = "FILE")]
    pub out: PathBuf,
    /// Use the raw weights instead of their EMA.
    #[arg(long)]
    pub raw: bool,
    /// Scale the row up S times, nearest neighbour [default: the run's sample.grid_scale].
    #[arg(long, value_name = "S", allow_negative_numbers = true, value_parser = whole::<u64>)]
    pub grid_scale: Option<u64>,
    /// A conditional model: one latent (--seed or --latents FILE) decoded from class A to
    /// class B, ε̂ = (1 − s) ε̂(x, A) + s ε̂(x, B) with s from 0 to 1 across the frames (each an
    /// index or a name, as `ddpm sample --class`).
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub classes: Vec<String>,
    /// With --classes: the seed of the one latent x_T ~ N(0, I) (that of `ddpm sample --seed`).
    #[arg(long, value_name = "S", allow_negative_numbers = true, value_parser = whole::<i64>)]
    pub seed: Option<i64>,
    /// With --classes: the classifier-free guidance weight w of each class's prediction
    /// [default: the run's sample.guidance, 0].
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    pub guidance: Option<f64>,
}

/// A library error of invert/interpolate/`sample --latents` with the flag of the setting or
/// argument it names: `flags` maps config keys and argument names to flags.
fn name_flags(e: DdpmError, flags: &[(&'static str, &'static str)]) -> anyhow::Error {
    let key = match &e {
        DdpmError::OutOfRange { key, .. } | DdpmError::OutOfMemory { key, .. } => *key,
        _ => return name_the_flag(e, &[]),
    };
    match flags.iter().find(|(k, _)| *k == key) {
        Some((_, flag)) => anyhow::anyhow!(
            "{}",
            e.to_string().replacen(key, &format!("{key} ({flag})"), 1)
        ),
        None => name_the_flag(e, &[]),
    }
}

fn run_invert(args: &InvertArgs, device: DeviceArg, progress: bool) -> anyhow::Result<()> {
    if args.images.is_empty() {
        bail!("give the images to invert: --images DIR|FILE…");
    }
    let device = device.resolve()?;
    let mut table = toml::Table::new();
    if let Some(b) = args.batch_size {
        config::set_key(&mut table, "sample.batch_size", int(b));
    }
    let opts = ddpm::invert::InvertOptions {
        images: args.images.clone(),
        steps: args.steps,
        weights: if args.raw { Weights::Raw } else { Weights::Ema },
        out: args.out.clone(),
    };
    let mut bar = Bar::new(progress);
    let done = ddpm::invert::run(
        &args.checkpoint,
        table,
        "the command line",
        &opts,
        device,
        &mut bar,
    )
    .map_err(|e| {
        name_flags(
            e,
            &[("steps", "--steps"), ("sample.batch_size", "--batch-size")],
        )
    })?;
    println!(
        "wrote the latents of {} images to {} ({} DDIM steps, checkpoint {})",
        done.images.len(),
        args.out.display(),
        args.steps,
        done.checkpoint.display()
    );
    Ok(())
}

/// `ddpm sample --latents FILE`.
fn run_sample_latents(
    args: &SampleArgs,
    file: &Path,
    device: DeviceArg,
    progress: bool,
) -> anyhow::Result<()> {
    if args.no_grid && args.each.is_none() {
        bail!("--no-grid without --each writes nothing: give --each DIR");
    }
    if args.class.is_some() || args.guidance.is_some() {
        bail!("--latents decodes with no class: --class and --guidance do not go with it");
    }
    let device = device.resolve()?;
    let given = args.given()?;
    let opts = SampleOptions {
        n: 1,
        classes: None,
        seed: args.seed,
        bf16: args.bf16,
        bf16_weights: args.bf16_weights,
        cuda_graph: args.cuda_graph,
        channels_last: args.channels_last,
        weights: if args.raw { Weights::Raw } else { Weights::Ema },
        columns: args.columns,
        out: (!args.no_grid).then(|| args.out.clone()),
        each: args.each.clone(),
    };
    let mut bar = Bar::new(progress);
    let done = ddpm::invert::run_decode(
        &args.checkpoint,
        file,
        overrides(&given),
        "the command line",
        &opts,
        device,
        &mut bar,
    )
    .map_err(|e| name_the_flag(e, &given))?;
    if !args.no_grid {
        println!(
            "wrote {} ({} images from {})",
            args.out.display(),
            done.count,
            file.display()
        );
    }
    if let Some(dir) = &args.each {
        println!("wrote {} images to {}", done.count, dir.display());
    }
    Ok(())
}

fn run_interpolate(
    args: &InterpolateArgs,
    device: DeviceArg,
    progress: bool,
) -> anyhow::Result<()> {
    use ddpm::interpolate::{Endpoint, InterpolateOptions};
    if !args.classes.is_empty() {
        return run_interpolate_classes(args, device, progress);
    }
    if args.seed.is_some() {
        bail!("--seed is the one latent of --classes A B; between two seeds give --seeds A B");
    }
    if args.guidance.is_some() {
        bail!("--guidance weighs the classes of --classes A B: give --classes too");
    }
    if args.latents.len() == 1 {
        bail!("give two latents files, --latents A B (one file goes with --classes A B)");
    }
    let device = device.resolve()?;
    let ends: Vec<Endpoint> = if !args.seeds.is_empty() {
        let seed = |s: &String| {
            whole::<i64>(s)
                .map(Endpoint::Seed)
                .map_err(|e| anyhow::anyhow!("invalid value '{s}' for '--seeds': {e}"))
        };
        args.seeds.iter().map(seed).collect::<anyhow::Result<_>>()?
    } else if !args.latents.is_empty() {
        args.latents
            .iter()
            .cloned()
            .map(Endpoint::Latents)
            .collect()
    } else if !args.images.is_empty() {
        args.images.iter().cloned().map(Endpoint::Image).collect()
    } else {
        bail!("give the two ends: --seeds A B, --latents A B or --images A B");
    };
    let [a, b]: [Endpoint; 2] = ends
        .try_into()
        .map_err(|_| anyhow::anyhow!("give exactly two ends"))?;
    let mut table = toml::Table::new();
    if let Some(s) = args.grid_scale {
        config::set_key(&mut table, "sample.grid_scale", int(s));
    }
    let opts = InterpolateOptions {
        ends: [a, b],
        frames: args.frames,
        steps: args.steps,
        weights: if args.raw { Weights::Raw } else { Weights::Ema },
        out: args.out.clone(),
    };
    let mut bar = Bar::new(progress);
    let _frames = ddpm::interpolate::run(
        &args.checkpoint,
        table,
        "the command line",
        &opts,
        device,
        &mut bar,
    )
    .map_err(|e| {
        name_flags(
            e,
            &[
                ("frames", "--frames"),
                ("steps", "--steps"),
                ("sample.steps", "--steps"),
                ("sample.grid_scale", "--grid-scale"),
            ],
        )
    })?;
    println!("wrote {} ({} frames)", args.out.display(), args.frames);
    Ok(())
}

/// `ddpm interpolate --classes A B`: one latent from --seed or --latents FILE.
fn run_interpolate_classes(
    args: &InterpolateArgs,
    device: DeviceArg,
    progress: bool,
) -> anyhow::Result<()> {
    use ddpm::interpolate::{ClassInterpolateOptions, Endpoint};
    if !args.seeds.is_empty() || !args.images.is_empty() {
        bail!(
            "--classes decodes one latent from class A to class B: give it --seed S or --latents FILE, not --seeds or --images"
        );
    }
    let latent = match (args.seed, args.latents.as_slice()) {
        (Some(seed), []) => Endpoint::Seed(seed),
        (None, [file]) => Endpoint::Latents(file.clone()),
        (None, []) => bail!("--classes needs its one latent: --seed S or --latents FILE"),
        _ => bail!("--classes takes one latents file, --latents FILE (its first latent)"),
    };
    let device = device.resolve()?;
    let mut table = toml::Table::new();
    if let Some(s) = args.grid_scale {
        config::set_key(&mut table, "sample.grid_scale", int(s));
    }
    if let Some(w) = args.guidance {
        config::set_key(&mut table, "sample.guidance", Value::from(w));
    }
    let opts = ClassInterpolateOptions {
        latent,
        classes: [args.classes[0].clone(), args.classes[1].clone()],
        frames: args.frames,
        steps: args.steps,
        weights: if args.raw { Weights::Raw } else { Weights::Ema },
        out: args.out.clone(),
    };
    let mut bar = Bar::new(progress);
    let _frames = ddpm::interpolate::run_classes(
        &args.checkpoint,
        table,
        "the command line",
        &opts,
        device,
        &mut bar,
    )
    .map_err(|e| match e {
        DdpmError::NotConditional { .. } | DdpmError::UnknownClass { .. } => {
            anyhow::anyhow!("--classes: {e}")
        }
        e => name_flags(
            e,
            &[
                ("frames", "--frames"),
                ("steps", "--steps"),
                ("sample.steps", "--steps"),
                ("sample.grid_scale", "--grid-scale"),
                ("sample.guidance", "--guidance"),
                ("classes", "--classes"),
            ],
        ),
    })?;
    println!(
        "wrote {} ({} frames, class {} to class {})",
        args.out.display(),
        args.frames,
        args.classes[0],
        args.classes[1]
    );
    Ok(())
}

/// An integer type a flag holds, with its range.
pub trait Whole: Sized {
    /// The smallest value.
    const MIN: i128;
    /// The largest value.
    const MAX: i128;
    /// `value`, known to lie in [MIN, MAX].
    fn from_i128(value: i128) -> Self;
}

macro_rules! whole_type {
    ($($t:ty),*) => {$(
        impl Whole for $t {
            const MIN: i128 = <$t>::MIN as i128;
            const MAX: i128 = <$t>::MAX as i128;
            fn from_i128(value: i128) -> Self {
                value as $t
            }
        }
    )*};
}
whole_type!(u64, usize, i64);

/// The value parser of every integer flag: a whole number in `T`'s range, or an error that
/// says the range (clap prefixes the flag: "invalid value '-1' for '--steps <STEPS>': …").
/// Negative numbers reach it (`allow_negative_numbers`) instead of being read as flags.
pub fn whole<T: Whole>(text: &str) -> Result<T, String> {
    let range = || format!("it must be a whole number from {} to {}", T::MIN, T::MAX);
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("not a whole number; {}", range()));
    }
    match text.parse::<i128>() {
        Ok(v) if (T::MIN..=T::MAX).contains(&v) => Ok(T::from_i128(v)),
        Ok(v) if v < T::MIN => Err(format!("too small; {}", range())),
        _ => Err(format!("too large; {}", range())),
    }
}

/// The value parser of every real-valued flag: a finite number (NaN, infinities and values
/// beyond f64's range such as 1e400 are refused here; the setting's own range is checked by
/// the library, which names its config key).
pub fn finite(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(
            "not a finite number (NaN, infinities and values beyond ±1.8e308 are refused)".into(),
        ),
        Err(_) => Err("not a number".into()),
    }
}

/// A library error of `ddpm eval` with the flag of the setting it names (`--batch-size`,
/// `--quick`, `--limit`).
fn eval_error(e: DdpmError) -> anyhow::Error {
    let flag = match &e {
        DdpmError::OutOfRange { key, .. } | DdpmError::OutOfMemory { key, .. } => match *key {
            "batch_size" => "--batch-size",
            "quick" => "--quick",
            "limit" => "--limit",
            _ => return e.into(),
        },
        _ => return e.into(),
    };
    match e {
        DdpmError::OutOfMemory { key, .. } => {
            anyhow::anyhow!(
                "{}",
                e.to_string()
                    .replacen(&format!("lower {key}"), &format!("lower {flag}"), 1)
            )
        }
        e => anyhow::Error::new(e).context(flag),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn train_args(argv: &[&str]) -> Box<TrainArgs> {
        let cli = Cli::try_parse_from(["ddpm", "train"].iter().chain(argv)).unwrap();
        let Command::Train(args) = cli.command else {
            panic!("not train")
        };
        args
    }

    #[test]
    fn the_command_line_is_consistent_and_flags_override_the_preset() {
        Cli::command().debug_assert();
        let (cfg, given) = train_args(&["--steps", "300", "--lr", "0.002", "--bf16"])
            .config()
            .unwrap();
        assert_eq!(
            (cfg.train.steps, cfg.train.lr, cfg.train.bf16),
            (300, 0.002, true)
        );
        assert_eq!(
            cfg.train.lr_decay,
            vec![ddpm::config::LrPoint {
                step: 300,
                factor: 0.1
            }],
            "the decay end follows --steps"
        );
        assert!(
            train_args(&["--steps", "30"])
                .config()
                .unwrap()
                .0
                .train
                .lr_decay
                .is_empty(),
            "a run inside the warm-up has no decay"
        );
        let flags: Vec<&str> = given.iter().map(|(f, ..)| *f).collect();
        assert_eq!(flags, vec!["--steps", "--lr", "--bf16"]);
        let err = train_args(&["--loss-weight", "article", "--loss-sigma", "posterior"])
            .config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("posterior") && err.contains("(--loss-sigma)"),
            "{err}"
        );
        assert!(Cli::try_parse_from(["ddpm", "train", "--preset", "imagenet"]).is_err());
        assert!(Cli::try_parse_from([
            "ddpm",
            "sample",
            "--sigma",
            "isotropic",
            "--clip-each-step"
        ])
        .is_ok());
    }

    #[test]
    fn every_setting_flag_reaches_its_config_key() {
        let (cfg, given) = train_args(&[
            "--data",
            "/faces",
            "--channels",
            "rgb",
            "--image-size",
            "32",
            "--flip",
            "--holdout",
            "7",
            "--base-channels",
            "16",
            "--time-embedding",
            "learned",
            "--schedule",
            "cosine",
            "--t-max",
            "50",
            "--batch-size",
            "3",
            "--warmup",
            "4",
            "--grad-clip",
            "1.5",
            "--ema-decay",
            "0.5",
            "--loss-weight",
            "article",
            "--loss-sigma",
            "isotropic",
            "--data-std",
            "0.25",
            "--min-snr-gamma",
            "2.5",
            "--seed",
            "9",
            "--checkpoint-every",
            "11",
            "--keep-last",
            "2",
            "--sample-every",
            "13",
            "--grid-steps",
            "5",
            "--skip-nonfinite",
            "--steps",
            "100",
            "--lr",
            "0.01",
            "--bf16",
        ])
        .config()
        .unwrap();
        // All 25 setting flags (--data-std goes with --loss-sigma); --data sets two keys.
        assert_eq!(given.len(), 26);
        assert_eq!(
            (cfg.train.steps, cfg.train.lr, cfg.train.bf16),
            (100, 0.01, true)
        );
        assert_eq!(cfg.data.source, ddpm::config::DataSource::Folder);
        assert_eq!(cfg.data.path.as_deref(), Some(Path::new("/faces")));
        assert_eq!((cfg.model.in_channels, cfg.model.image_size), (3, 32));
        assert!(cfg.data.flip && cfg.train.skip_nonfinite);
        assert_eq!((cfg.data.holdout, cfg.model.base_channels), (7, 16));
        assert_eq!(cfg.model.time_embedding, ddpm::unet::TimeEmbedding::Learned);
        assert_eq!(cfg.diffusion.schedule, ddpm::schedule::ScheduleKind::Cosine);
        assert_eq!((cfg.diffusion.t_max, cfg.model.t_max), (50, 50));
        assert_eq!((cfg.train.batch_size, cfg.train.warmup_steps), (3, 4));
        assert_eq!((cfg.train.grad_clip, cfg.train.ema_decay), (Some(1.5), 0.5));
        assert_eq!(cfg.train.loss_weight, ddpm::config::LossWeight::Article);
        assert_eq!(cfg.train.min_snr_gamma, 2.5);
        assert_eq!(
            cfg.train.loss_sigma,
            SigmaChoice::Isotropic { data_std: 0.25 }
        );
        assert_eq!((cfg.train.seed, cfg.train.checkpoint_every), (9, 11));
        assert_eq!((cfg.train.keep_last, cfg.train.sample_every), (2, 13));
        assert_eq!(cfg.train.grid_steps, Some(5));
        let err = train_args(&["--lr", "0"]).config().unwrap_err().to_string();
        assert!(err.contains("train.lr (--lr)"), "{err}");
    }

    /// Every numeric flag of every subcommand with -1, 0, 2^64, ±2^64·10, 1.5, NaN, ±inf and
    /// 1e400: refused by its value parser naming the flag and the range, or accepted as the
    /// number given. `NUMERIC` is checked against the parser's own list of flags.
    #[test]
    fn every_numeric_flag_parses_or_refuses_every_value() {
        let wholes = [
            "-1",
            "0",
            "18446744073709551616",
            "-184467440737095516160",
            "1.5",
            "x",
        ];
        let real = ["-1", "0", "NaN", "inf", "-inf", "1e400", "1e-400", "x"];
        let mut tried = 0;
        let mut cli = Cli::command();
        cli.build();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments().filter(|a| a.get_long().is_some()) {
                let long = format!("--{}", arg.get_long().unwrap());
                let argv = |v: &str| {
                    let mut argv = vec!["ddpm".to_string(), sub.get_name().to_string()];
                    if sub.get_name() == "quality" {
                        argv.extend(["--checkpoint".into(), "c".into()]);
                    }
                    argv.extend([long.clone(), v.to_string()]);
                    argv
                };
                // Only flags whose value parser is numeric: 0 parses and "x" is refused as
                // "not a whole number" or "not a number".
                let Err(e) = Cli::try_parse_from(argv("x")) else {
                    continue;
                };
                let text = e.to_string();
                let is_real = text.contains("not a number");
                if !(text.contains("not a whole number") || is_real) {
                    continue;
                }
                for &v in if is_real { &real[..] } else { &wholes[..] } {
                    tried += 1;
                    match Cli::try_parse_from(argv(v)) {
                        Ok(_) => {
                            if is_real {
                                assert!(v.parse::<f64>().unwrap().is_finite(), "{long} {v}");
                            } else {
                                assert!(v.parse::<i128>().is_ok(), "{long} {v}");
                            }
                        }
                        Err(e) => {
                            let text = e.to_string();
                            assert!(text.contains(&format!("'{long}")), "{long} {v}: {text}");
                            assert!(
                                text.contains("whole number") || text.contains("number"),
                                "{long} {v}: {text}"
                            );
                            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
                        }
                    }
                }
            }
        }
        // 17 train, 6 sample, 5 eval, 10 quality numeric flags, and the global --threads on
        // each of the 5 subcommands.
        assert!(tried >= 38 * 6, "{tried}");
        assert_eq!(
            whole::<u64>("-1").unwrap_err(),
            "too small; it must be a whole number from 0 to 18446744073709551615"
        );
        assert_eq!(whole::<i64>("-1"), Ok(-1));
        assert_eq!(whole::<usize>("+7"), Ok(7));
        assert!(finite("1e400").is_err() && finite("NaN").is_err());
    }

    #[test]
    fn grid_scale_is_a_flag_of_train_and_sample_at_sample_grid_scale() {
        let (cfg, given) = train_args(&["--grid-scale", "2"]).config().unwrap();
        assert_eq!(cfg.sample.grid_scale, 2);
        assert_eq!(given.len(), 1);
        assert_eq!(
            (given[0].0, given[0].1),
            ("--grid-scale", "sample.grid_scale")
        );
        assert_eq!(
            train_args(&[]).config().unwrap().0.sample.grid_scale,
            4,
            "the mnist preset's"
        );
        let cli = Cli::try_parse_from(["ddpm", "sample", "--grid-scale", "1"]).unwrap();
        let Command::Sample(args) = cli.command else {
            panic!("not sample")
        };
        let given = args.given().unwrap();
        assert_eq!(
            (given[0].0, given[0].1, given[0].2.as_integer()),
            ("--grid-scale", "sample.grid_scale", Some(1))
        );
    }

    #[test]
    fn loss_weight_min_snr_and_its_gamma_reach_their_keys() {
        let (cfg, given) = train_args(&["--loss-weight", "min_snr"]).config().unwrap();
        assert_eq!(cfg.train.loss_weight, ddpm::config::LossWeight::MinSnr);
        assert_eq!(cfg.train.min_snr_gamma, ddpm::config::DEFAULT_MIN_SNR_GAMMA);
        assert_eq!(given.len(), 1);
        let (cfg, _) = train_args(&["--loss-weight", "min_snr", "--min-snr-gamma", "1.5"])
            .config()
            .unwrap();
        assert_eq!(cfg.train.min_snr_gamma, 1.5);
        for bad in ["0", "-2"] {
            let err = train_args(&["--loss-weight", "min_snr", "--min-snr-gamma", bad])
                .config()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("train.min_snr_gamma (--min-snr-gamma)") && err.contains("positive"),
                "{err}"
            );
        }
        assert!(Cli::try_parse_from(["ddpm", "train", "--loss-weight", "min-snr"]).is_err());
    }
}
