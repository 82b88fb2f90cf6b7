//! The `ddpm` command line: `train`, `sample`, `eval`, `quality`, `info`.

use crate::checkpoint;
use crate::config::{Config, LossWeight, PRESETS};
use crate::data::folder::Channels;
use crate::data::mnist;
use crate::device::{torch_info, DeviceChoice};
use crate::eval::{evaluate, EvalOptions};
use crate::grid;
use crate::sampler::Sampler;
use crate::schedule::{Schedule, ScheduleKind};
use crate::sigma::SigmaChoice;
use crate::train::{build_model, train, TrainOptions};
use crate::unet::TimeEmbedding;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

/// DDPM as "an autoregressive VAE" (Su Jianlin), on libtorch: train, sample, evaluate.
#[derive(Debug, Parser)]
#[command(name = "ddpm", version, propagate_version = true)]
pub struct Cli {
    /// Where to compute: `auto` takes CUDA device 0 when libtorch sees one, else the CPU.
    #[arg(long, global = true, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Hide progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
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

/// The σ choice `flag` (`--sigma` or `--loss-sigma`) names.
fn sigma_choice(flag: &str, arg: SigmaArg, data_std: Option<f64>) -> anyhow::Result<SigmaChoice> {
    Ok(match (arg, data_std) {
        (SigmaArg::Posterior, _) => SigmaChoice::Posterior,
        (SigmaArg::Beta, _) => SigmaChoice::Beta,
        (SigmaArg::Isotropic, Some(s)) => SigmaChoice::Isotropic { data_std: s },
        (SigmaArg::Isotropic, None) => bail!(
            "{flag} isotropic needs --data-std S (the data's per-dimension standard deviation)"
        ),
    })
}

/// `ddpm train`. Settings come from --preset (or --config FILE); each flag given overrides one.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base settings: `mnist` (embedded digits, a ~10-minute run on 2 CPU cores), `cifar32` or
    /// `celeba128` (the article's CelebA-HQ setting; both need --data DIR) [default: mnist].
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
    /// stopped; its saved settings are used, only --steps may change.
    #[arg(long)]
    pub resume: bool,
    /// Train on this folder of PNG/JPEG images (centre-cropped and resized) instead of MNIST.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Image side; MNIST allows 28 (default) or 32 (padded) [default: the preset's].
    #[arg(long, allow_negative_numbers = true)]
    pub image_size: Option<i64>,
    /// Image colours for --data [default: the preset's].
    #[arg(long, value_enum)]
    pub channels: Option<Channels>,
    /// Flip training images horizontally at random.
    #[arg(long)]
    pub flip: bool,
    /// Images held out of training for `ddpm eval` [default: the preset's].
    #[arg(long)]
    pub holdout: Option<usize>,
    /// Channels of the first U-Net level [default: the preset's].
    #[arg(long, allow_negative_numbers = true)]
    pub base_channels: Option<i64>,
    /// How t enters the network [default: the preset's].
    #[arg(long, value_enum)]
    pub time_embedding: Option<TimeEmbedding>,
    /// Noise schedule [default: the preset's, `article`].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// Number of diffusion steps T [default: 1000].
    #[arg(long, allow_negative_numbers = true)]
    pub t_max: Option<i64>,
    /// Optimiser updates [default: the preset's]. The learning-rate decay is fixed at steps,
    /// not fractions of the run, so a run extended with `--resume --steps N` past its last
    /// decay point goes on at its final rate.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per update [default: the preset's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// LAMB's base learning rate [default: the preset's: 5e-3 for mnist, the article's 1e-3
    /// for the others].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Updates of linear learning-rate warm-up [default: the preset's].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Clip the global gradient norm to this [default: no clipping].
    #[arg(long, allow_negative_numbers = true)]
    pub grad_clip: Option<f64>,
    /// EMA decay of the weights [default: the preset's].
    #[arg(long, allow_negative_numbers = true)]
    pub ema_decay: Option<f64>,
    /// `none`: mean_B ‖ε − ε̂‖² (the article's training loss); `article`: loss (8) with its
    /// exact weight for --loss-sigma [default: none].
    #[arg(long, value_enum)]
    pub loss_weight: Option<LossWeight>,
    /// σ_t in loss (8)'s weight [default: beta].
    #[arg(long, value_enum)]
    pub loss_sigma: Option<SigmaArg>,
    /// s for --loss-sigma isotropic.
    #[arg(long, allow_negative_numbers = true)]
    pub data_std: Option<f64>,
    /// bfloat16 autocast on CUDA (ignored on the CPU).
    #[arg(long)]
    pub bf16: bool,
    /// Seed of everything random [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N updates (and at the end) [default: the preset's].
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// Keep the last K checkpoints [default: 3].
    #[arg(long, value_name = "K")]
    pub keep_last: Option<usize>,
    /// Write a sample grid every N updates (and at the end; 0 = only at the end) [default:
    /// the preset's].
    #[arg(long, value_name = "N")]
    pub sample_every: Option<u64>,
    /// Sampler steps of the grids drawn during training (strided; `ddpm sample` is not
    /// affected) [default: the preset's, 100].
    #[arg(long, value_name = "N")]
    pub grid_steps: Option<usize>,
    /// Skip batches whose loss is NaN or infinite instead of stopping.
    #[arg(long)]
    pub skip_nonfinite: bool,
}

impl TrainArgs {
    /// --preset, or `mnist`.
    pub fn preset_name(&self) -> &str {
        self.preset.as_deref().unwrap_or("mnist")
    }

    /// The settings: the config file or preset, then each flag given. Returns the names of
    /// the flags that changed something.
    pub fn config(&self) -> anyhow::Result<(Config, Vec<&'static str>)> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::preset(self.preset_name())?,
        };
        let mut set = Vec::new();
        let mut note = |name: &'static str, given: bool| {
            if given {
                set.push(name);
            }
            given
        };
        if note("--data", self.data.is_some()) {
            cfg.data.source = crate::config::DataSource::Folder;
            cfg.data.path = self.data.clone();
        }
        if let Some(s) = self.image_size.filter(|_| note("--image-size", true)) {
            cfg.model.image_size = s;
        }
        if let Some(c) = self.channels.filter(|_| note("--channels", true)) {
            cfg.model.in_channels = c.count();
        }
        if note("--flip", self.flip) {
            cfg.data.flip = true;
        }
        if let Some(h) = self.holdout.filter(|_| note("--holdout", true)) {
            cfg.data.holdout = h;
        }
        if let Some(c) = self.base_channels.filter(|_| note("--base-channels", true)) {
            cfg.model.base_channels = c;
        }
        if let Some(e) = self
            .time_embedding
            .filter(|_| note("--time-embedding", true))
        {
            cfg.model.time_embedding = e;
        }
        if let Some(s) = self.schedule.filter(|_| note("--schedule", true)) {
            cfg.diffusion.schedule = s;
        }
        if let Some(t) = self.t_max.filter(|_| note("--t-max", true)) {
            cfg.diffusion.t_max = t;
            cfg.model.t_max = t;
            cfg.train.grid_steps = cfg.train.grid_steps.map(|n| n.min(t.max(1) as usize));
        }
        let preset_steps = cfg.train.steps;
        if let Some(s) = self.steps.filter(|_| note("--steps", true)) {
            cfg.train.steps = s;
        }
        if let Some(b) = self.batch_size.filter(|_| note("--batch-size", true)) {
            cfg.train.batch_size = b;
        }
        if let Some(lr) = self.lr.filter(|_| note("--lr", true)) {
            cfg.train.lr = lr;
        }
        if let Some(w) = self.warmup.filter(|_| note("--warmup", true)) {
            cfg.train.warmup_steps = w;
        }
        if note("--grad-clip", self.grad_clip.is_some()) {
            cfg.train.grad_clip = self.grad_clip;
        }
        if let Some(d) = self.ema_decay.filter(|_| note("--ema-decay", true)) {
            cfg.train.ema_decay = d;
        }
        if let Some(w) = self.loss_weight.filter(|_| note("--loss-weight", true)) {
            cfg.train.loss_weight = w;
        }
        if let Some(s) = self.loss_sigma.filter(|_| note("--loss-sigma", true)) {
            cfg.train.loss_sigma = sigma_choice("--loss-sigma", s, self.data_std)?;
        }
        if note("--bf16", self.bf16) {
            cfg.train.bf16 = true;
        }
        if let Some(s) = self.seed.filter(|_| note("--seed", true)) {
            cfg.train.seed = s;
        }
        if let Some(n) = self
            .checkpoint_every
            .filter(|_| note("--checkpoint-every", true))
        {
            cfg.train.checkpoint_every = n;
        }
        if let Some(k) = self.keep_last.filter(|_| note("--keep-last", true)) {
            cfg.train.keep_last = k;
        }
        if let Some(n) = self.sample_every.filter(|_| note("--sample-every", true)) {
            cfg.train.sample_every = n;
        }
        if note("--grid-steps", self.grid_steps.is_some()) {
            cfg.train.grid_steps = self.grid_steps;
        }
        if note("--skip-nonfinite", self.skip_nonfinite) {
            cfg.train.skip_nonfinite = true;
        }
        // A preset's last decay point marks the end of its run: move it to the end of this
        // one, or drop it when this run ends within the warm-up.
        let t = &mut cfg.train;
        if t.steps != preset_steps && t.lr_decay.last().is_some_and(|p| p.step == preset_steps) {
            let end = t.lr_decay.pop().expect("checked non-empty above");
            let after_previous = t.lr_decay.last().map_or(t.warmup_steps, |p| p.step);
            if t.steps > after_previous {
                t.lr_decay.push(crate::config::LrPoint {
                    step: t.steps,
                    ..end
                });
            }
        }
        cfg.validate()?;
        Ok((cfg, set))
    }
}

/// `ddpm sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 36)]
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
    #[arg(long, allow_negative_numbers = true)]
    pub data_std: Option<f64>,
    /// Visit only N of the T steps, evenly strided (ancestral on the respaced chain, or DDIM
    /// with --eta) [default: the run's sample.steps, else all T].
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// Use DDIM with this η (0 deterministic, 1 strided DDPM) [default: the ancestral sampler].
    #[arg(long, allow_negative_numbers = true)]
    pub eta: Option<f64>,
    /// Clip x̂_0 to [−1, 1] at every step (true/false) [default: the run's sample.clip_each_step].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub clip_each_step: Option<bool>,
    /// Seed of the sampler's noise.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Use the raw weights instead of their EMA.
    #[arg(long)]
    pub raw: bool,
    /// Run the network in bfloat16 autocast on CUDA (ignored on the CPU); the sampler's
    /// update stays f32.
    #[arg(long)]
    pub bf16: bool,
    /// Images per grid row [default: ceil(sqrt(n))].
    #[arg(long)]
    pub columns: Option<i64>,
}

/// `ddpm eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long, default_value = "runs/mnist", value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Evaluate only the first N held-out images [default: all].
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// A quick estimate from K random t per image instead of all T (unbiased, noisier; the
    /// output says so).
    #[arg(long, value_name = "K")]
    pub quick: Option<usize>,
    /// σ_t of the generator [default: the run's sample.sigma].
    #[arg(long, value_enum)]
    pub sigma: Option<SigmaArg>,
    /// s for --sigma isotropic.
    #[arg(long, allow_negative_numbers = true)]
    pub data_std: Option<f64>,
    /// Use the raw weights instead of their EMA.
    #[arg(long)]
    pub raw: bool,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let progress = !cli.no_progress;
    match cli.command {
        Command::Info => info(cli.device),
        Command::Train(args) => run_train(&args, cli.device, progress),
        Command::Sample(args) => run_sample(&args, cli.device, progress),
        Command::Quality(args) => run_quality(&args, cli.device, progress),
        Command::Eval(args) => {
            let device = cli.device.resolve()?;
            let opts = EvalOptions {
                checkpoint: args.checkpoint.clone(),
                device,
                ema: !args.raw,
                limit: args.limit,
                batch_size: args.batch_size,
                quick: args.quick,
                sigma: args
                    .sigma
                    .map(|s| sigma_choice("--sigma", s, args.data_std))
                    .transpose()?,
                seed: args.seed,
                progress,
            };
            let report = evaluate(&opts)
                .with_context(|| format!("evaluating {}", args.checkpoint.display()))?;
            println!("{report}");
            Ok(())
        }
    }
}

fn info(choice: DeviceChoice) -> anyhow::Result<()> {
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
    Ok(())
}

fn run_train(args: &TrainArgs, device: DeviceChoice, progress: bool) -> anyhow::Result<()> {
    let (cfg, set) = args.config()?;
    if args.resume {
        if let Some(flag) = set.iter().find(|f| **f != "--steps") {
            bail!("--resume continues with the run's saved settings; {flag} cannot change them (only --steps can)");
        }
    }
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(args.preset_name()));
    let opts = TrainOptions {
        run_dir: run_dir.clone(),
        device: device.resolve()?,
        resume: args.resume,
        resume_must_match: args.preset.is_some() || args.config.is_some(),
        progress,
    };
    tracing::info!(
        "training on {:?}, run directory {}",
        opts.device,
        run_dir.display()
    );
    let summary = train(&cfg, &opts, args.steps)
        .with_context(|| format!("training in {}", run_dir.display()))?;
    println!(
        "trained {} steps (last loss {:.3}{}); checkpoint {}, samples {}",
        summary.steps,
        summary.last_loss,
        if summary.skipped > 0 {
            format!(", {} batches skipped", summary.skipped)
        } else {
            String::new()
        },
        summary.checkpoint.display(),
        summary.grid.display()
    );
    Ok(())
}

fn run_sample(args: &SampleArgs, device: DeviceChoice, progress: bool) -> anyhow::Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    grid::ensure_writable(&args.out)?;
    if let Some(dir) = &args.each {
        grid::ensure_dir(dir)?;
    }
    let device = device.resolve()?;
    let ckpt = checkpoint::open(&args.checkpoint)?;
    let mut cfg = ckpt.manifest.config.clone();
    if let Some(s) = args.sigma {
        cfg.sample.sigma = sigma_choice("--sigma", s, args.data_std)?;
    }
    if args.steps.is_some() {
        cfg.sample.steps = args.steps;
    }
    if args.eta.is_some() {
        cfg.sample.eta = args.eta;
    }
    if let Some(c) = args.clip_each_step {
        cfg.sample.clip_each_step = c;
    }
    let (vs, net) = build_model(&cfg, device, cfg.train.seed)?;
    ckpt.load_weights(&vs, !args.raw)?;
    let schedule = Schedule::new(cfg.diffusion.schedule, cfg.diffusion.t_max, device)?;
    let mut sampler_cfg = cfg.sampler(Some(args.seed));
    sampler_cfg.bf16 = args.bf16;
    let sampler = Sampler::new(&schedule, sampler_cfg)?;
    let bar = crate::progress::bar(progress, sampler.steps().len() as u64, 0, "steps");
    let [c, s, _] = cfg.image_shape();
    tracing::info!(
        "sampling {} images from {} (step {}) on {device:?}",
        args.n,
        ckpt.dir.display(),
        ckpt.manifest.step
    );
    let images = sampler.sample_with(&net, &[args.n as i64, c, s, s], device, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    grid::save_grid(&images, &args.out, args.columns)?;
    println!("wrote {}", args.out.display());
    if let Some(dir) = &args.each {
        grid::save_each(&images, dir)?;
        println!("wrote {} images to {}", args.n, dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_flags_override_the_preset() {
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["ddpm", "train", "--steps", "300", "--lr", "0.002", "--bf16"])
                .unwrap();
        let Command::Train(args) = cli.command else {
            panic!("not train")
        };
        let (cfg, set) = args.config().unwrap();
        assert_eq!(
            (cfg.train.steps, cfg.train.lr, cfg.train.bf16),
            (300, 0.002, true)
        );
        assert_eq!(
            cfg.train.lr_decay,
            vec![crate::config::LrPoint {
                step: 300,
                factor: 0.1
            }],
            "the decay end follows --steps"
        );
        let short = Cli::try_parse_from(["ddpm", "train", "--steps", "30"]).unwrap();
        let Command::Train(short) = short.command else {
            panic!("not train")
        };
        assert!(
            short.config().unwrap().0.train.lr_decay.is_empty(),
            "a run inside the warm-up has no decay"
        );
        assert_eq!(set, vec!["--steps", "--lr", "--bf16"]);
        let cli = Cli::try_parse_from([
            "ddpm",
            "train",
            "--loss-weight",
            "article",
            "--loss-sigma",
            "posterior",
        ])
        .unwrap();
        let Command::Train(args) = cli.command else {
            panic!("not train")
        };
        assert!(args.config().unwrap_err().to_string().contains("posterior"));
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
}

// ---------------------------------------------------------------------------------------------
// `ddpm quality` (issue 12): its flags, their mapping onto `ddpm::quality::Options`, and the
// run with an indicatif bar fed by the library's `Progress` events. Self-contained: the block
// moves to the binary as it is.
// ---------------------------------------------------------------------------------------------

use crate::quality as ddpm_quality;

/// `ddpm quality`: the σ_t × steps table of FD-MNIST, entropies and bits/dim.
#[derive(Debug, Clone, Args)]
pub struct QualityArgs {
    /// A checkpoint directory, or a run directory (its newest good checkpoint is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory: table.md, table.json and grids/.
    #[arg(long, default_value = "docs/quality")]
    pub out: PathBuf,
    /// A Markdown file whose region between `<!-- quality-table:begin -->` and
    /// `<!-- quality-table:end -->` is replaced by the table.
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// Where the classifiers are cached (default: quality/ in the run directory).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Feature classifiers, seeds 0..N: seed 0 scores the main table, every one gets its own FD
    /// and paired differences, to show how far a verdict depends on the feature extractor.
    #[arg(long, default_value_t = 5)]
    pub classifiers: usize,
    /// The columns: numbers of sampling steps (strided below T).
    #[arg(long, value_delimiter = ',', default_values_t = vec![50, 100, 250, 1000])]
    pub steps: Vec<usize>,
    /// Images sampled per cell, one count per column. The defaults put 0.88 M images through
    /// the network in all: 20 minutes on 2 idle CPU cores (docs/quality.md).
    #[arg(long, value_delimiter = ',', default_values_t = vec![500, 400, 160, 80])]
    pub samples: Vec<usize>,
    /// Step counts of the DDIM η = 0 row (each also a column; none: no DDIM row).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = vec![50, 100])]
    pub ddim_steps: Vec<usize>,
    /// Held-out images the bound is averaged over (0 skips it).
    #[arg(long, default_value_t = 40)]
    pub bpd_images: usize,
    /// Training images per t for m_t = E‖ε − ε̂‖²/d.
    #[arg(long, default_value_t = 16)]
    pub eps_mse_per_t: usize,
    /// Bootstrap resamples per cell.
    #[arg(long, default_value_t = 200)]
    pub bootstrap: usize,
    /// Images per network batch.
    #[arg(long, default_value_t = 250)]
    pub batch: usize,
    /// Images in each grid.
    #[arg(long, default_value_t = 64)]
    pub grid: usize,
    /// Seed of sampling, m_t and the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl QualityArgs {
    /// The library's options for these flags: column i has `--steps`[i] steps and samples
    /// `--samples`[i] images per cell.
    pub fn options(&self) -> anyhow::Result<ddpm_quality::Options> {
        if self.steps.len() != self.samples.len() {
            bail!(
                "--samples needs one count per column of --steps ({} columns, {} counts)",
                self.steps.len(),
                self.samples.len()
            );
        }
        Ok(ddpm_quality::Options {
            checkpoint: self.checkpoint.clone(),
            out: self.out.clone(),
            doc: self.doc.clone(),
            cache: self.cache.clone(),
            classifiers: self.classifiers,
            columns: self
                .steps
                .iter()
                .zip(&self.samples)
                .map(|(&steps, &samples)| ddpm_quality::table::Column { steps, samples })
                .collect(),
            ddim_steps: self.ddim_steps.clone(),
            bpd_images: self.bpd_images,
            eps_mse_per_t: self.eps_mse_per_t,
            bootstrap: self.bootstrap,
            batch: self.batch,
            grid: self.grid,
            seed: self.seed,
        })
    }
}

/// The flag behind an option or plan key that a quality error names.
fn quality_flag(key: &str) -> Option<&'static str> {
    Some(match key {
        "classifiers" => "--classifiers",
        "steps" => "--steps",
        "samples" => "--samples",
        "ddim_steps" => "--ddim-steps",
        "eps_mse_per_t" => "--eps-mse-per-t",
        "bootstrap_reps" => "--bootstrap",
        "batch" => "--batch",
        _ => return None,
    })
}

/// A library error of `ddpm quality`, prefixed with the flag to change where it names one.
fn quality_error(e: crate::error::DdpmError) -> anyhow::Error {
    use crate::error::DdpmError;
    let flag = match &e {
        DdpmError::OutOfRange { key, .. } | DdpmError::Incompatible { key, .. } => {
            quality_flag(key)
        }
        _ => None,
    };
    match flag {
        Some(flag) => anyhow::Error::new(e).context(flag),
        None => anyhow::Error::new(e),
    }
}

/// The table's progress as an indicatif bar over its image-steps (hidden with --no-progress),
/// the cell being sampled beside the count, notes logged above the bar.
struct QualityBar {
    show: bool,
    bar: indicatif::ProgressBar,
}

impl crate::progress::Progress for QualityBar {
    fn start(&mut self, total: u64, done: u64, unit: &'static str) {
        self.bar.finish_and_clear();
        self.bar = if self.show {
            let template = format!(
                "{{elapsed_precise}} {{wide_bar}} {{human_pos}}/{{human_len}} {unit} {{msg}} {{per_sec}} ETA {{eta}}"
            );
            // The template is fixed text; only a brace in `unit` could break it, and then the
            // plain bar does.
            let style = indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            indicatif::ProgressBar::new(total)
                .with_position(done)
                .with_style(style)
        } else {
            indicatif::ProgressBar::hidden()
        };
    }

    fn update(&mut self, done: u64) {
        self.bar.set_position(done);
    }

    fn status(&mut self, status: &str) {
        self.bar.set_message(status.to_string());
    }

    fn note(&mut self, line: &str) {
        self.bar.suspend(|| tracing::info!("{line}"));
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// `ddpm quality`: measures and writes the table, drawing a bar when `progress`.
fn run_quality(args: &QualityArgs, device: DeviceChoice, progress: bool) -> anyhow::Result<()> {
    let device = device.resolve()?;
    let mut bar = QualityBar {
        show: progress,
        bar: indicatif::ProgressBar::hidden(),
    };
    let table = args
        .options()
        .and_then(|opts| ddpm_quality::run(&opts, device, &mut bar).map_err(quality_error))
        .with_context(|| format!("measuring quality of {}", args.checkpoint.display()))?;
    println!(
        "{} cells in {:.0} s; table in {}",
        table.cells.len(),
        table.seconds,
        args.out.join("table.md").display()
    );
    Ok(())
}

#[cfg(test)]
mod quality_tests {
    use super::*;
    use crate::error::DdpmError;

    fn quality(flags: &[&str]) -> QualityArgs {
        let cli = Cli::try_parse_from(["ddpm", "quality"].iter().chain(flags)).unwrap();
        let Command::Quality(args) = cli.command else {
            panic!("not quality")
        };
        args
    }

    #[test]
    fn quality_flags_map_onto_the_library_options() {
        assert_eq!(
            quality(&["--checkpoint", "runs/x"]).options().unwrap(),
            ddpm_quality::Options {
                checkpoint: "runs/x".into(),
                ..ddpm_quality::Options::default()
            },
            "the flags' defaults are the library's"
        );
        let args = quality(&[
            "--checkpoint",
            "c",
            "--ddim-steps",
            "--steps",
            "10,20",
            "--samples",
            "5,6",
        ]);
        let opts = args.options().unwrap();
        assert!(opts.ddim_steps.is_empty());
        assert_eq!(
            opts.columns,
            vec![
                ddpm_quality::table::Column {
                    steps: 10,
                    samples: 5
                },
                ddpm_quality::table::Column {
                    steps: 20,
                    samples: 6
                }
            ]
        );
        let short = quality(&["--checkpoint", "c", "--samples", "5"]);
        assert!(short
            .options()
            .unwrap_err()
            .to_string()
            .contains("--samples needs one count per column of --steps (4 columns, 1 counts)"));
        let e = quality_error(DdpmError::OutOfRange {
            key: "bootstrap_reps",
            value: "1".into(),
            expected: "at least 2".into(),
        });
        assert_eq!(
            format!("{e:#}"),
            "--bootstrap: bootstrap_reps = 1 is out of range: it must be at least 2"
        );
    }
}
