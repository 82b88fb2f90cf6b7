//! Run configuration: named presets, TOML/JSON files layered over a preset, validation.
//! Every section rejects unknown keys, so a misspelt option is an error, not a silent default.

use crate::error::{DdpmError, Result};
use crate::schedule::ScheduleKind;
use crate::sigma::SigmaChoice;
use crate::unet::UNetConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything a training run needs; saved beside every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the images come from.
    pub data: DataConfig,
    /// The network (its `image_size` and `in_channels` also fix the data's shape).
    pub model: UNetConfig,
    /// The noise schedule.
    pub diffusion: DiffusionConfig,
    /// The optimisation.
    pub train: TrainConfig,
    /// How the sample grids are drawn during training, and `ddpm sample`'s defaults.
    pub sample: SampleConfig,
}

/// Which data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// The embedded MNIST-5k (28×28 grey, padded when the model is 32×32).
    Mnist,
    /// A folder of PNG/JPEG images, centre-cropped and resized to the model's size.
    Folder,
}

/// The data section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist` or `folder`.
    pub source: DataSource,
    /// MNIST: the CSV (default: the embedded copy); folder: the image directory (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Flip training images horizontally with probability ½ (faces yes, digits no).
    pub flip: bool,
    /// Images held out of training for `ddpm eval`, chosen by a permutation seeded with the
    /// run's seed.
    pub holdout: usize,
    /// The class names of a conditional run, in label order (MNIST: the digits "0".."9"; a
    /// folder: its subfolders' names, sorted). Set by training from the data when
    /// `train.conditional` is on; absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_names: Vec<String>,
}

/// The diffusion section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    /// The α_t schedule.
    pub schedule: ScheduleKind,
    /// T, the number of steps (the one place it is set: the network takes it from here).
    pub t_max: i64,
}

/// Which training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossWeight {
    /// mean_B ‖ε − ε̂‖², the article's training loss (its weight dropped).
    #[default]
    None,
    /// Loss (8) with its exact weight β_t⁴/(β̄_t² α_t² σ_t²) for the chosen σ.
    Article,
    /// Min-SNR-γ (Hang et al. 2023): min(SNR_t, γ)/SNR_t ‖ε − ε̂‖², SNR_t = ᾱ_t²/β̄_t²,
    /// γ = `train.min_snr_gamma`.
    #[serde(rename = "min_snr")]
    MinSnr,
}

/// γ of Min-SNR-γ when a file does not set it: Hang et al.'s 5.
pub const DEFAULT_MIN_SNR_GAMMA: f64 = 5.0;

fn default_min_snr_gamma() -> f64 {
    DEFAULT_MIN_SNR_GAMMA
}

/// One point of the piecewise-linear learning-rate decay: the factor reached at `step`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrPoint {
    /// The update number.
    pub step: u64,
    /// lr(step) / base lr.
    pub factor: f64,
}

/// The training section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Number of optimiser updates.
    pub steps: u64,
    /// Samples per update.
    pub batch_size: usize,
    /// LAMB's base learning rate.
    pub lr: f64,
    /// Updates of linear learning-rate warm-up from 0.
    pub warmup_steps: u64,
    /// Decay points after the warm-up (the rate is constant after the last one).
    pub lr_decay: Vec<LrPoint>,
    /// LAMB's β1.
    pub beta1: f64,
    /// LAMB's β2.
    pub beta2: f64,
    /// LAMB's ε.
    pub eps: f64,
    /// LAMB's decoupled weight decay (adapted parameters only).
    pub weight_decay: f64,
    /// Rescale the gradients so their global norm is at most this; absent = no clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// EMA decay of the weights.
    pub ema_decay: f64,
    /// Ramp the EMA decay up as min(decay, (1+k)/(10+k)) so early averages forget the
    /// random initial weights.
    pub ema_warmup: bool,
    /// Unweighted (`none`), loss (8)'s exact weight (`article`) or Min-SNR-γ (`min_snr`).
    pub loss_weight: LossWeight,
    /// The σ_t in loss (8)'s weight when `loss_weight = "article"`.
    pub loss_sigma: SigmaChoice,
    /// γ of `loss_weight = "min_snr"`: samples with SNR_t > γ are down-weighted to γ/SNR_t.
    #[serde(default = "default_min_snr_gamma")]
    pub min_snr_gamma: f64,
    /// Run the network in bfloat16 autocast on CUDA (weights and optimiser stay f32).
    pub bf16: bool,
    /// Lay the network's convolution weights and inputs out channels-last (NHWC in memory),
    /// so that cuDNN can pick its NHWC kernels; the values and the results are the same
    /// (up to f32 rounding), so a resumed run may change it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub channels_last: bool,
    /// Seed of everything random: initial weights, data order, t, ε, flips, the split.
    pub seed: u64,
    /// Write a checkpoint every this many updates (and at the end).
    pub checkpoint_every: u64,
    /// Keep this many most recent checkpoints.
    pub keep_last: usize,
    /// Write a sample grid every this many updates (and at the end); 0 = only at the end.
    pub sample_every: u64,
    /// Append a metrics line every this many updates.
    pub log_every: u64,
    /// Skip a batch whose loss is not finite instead of stopping.
    pub skip_nonfinite: bool,
    /// Steps of the sampler drawing the grids during training (the `sample` sampler on an
    /// evenly strided sub-chain, to keep their cost small); absent = `sample.steps`.
    /// `ddpm sample` always uses the `sample` settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_steps: Option<usize>,
    /// Redraw `loss.png` (the loss curve, beside `metrics.jsonl`) at every log interval.
    #[serde(default = "yes")]
    pub plot_loss: bool,
    /// Train a class-conditional network on the data's labels (MNIST's digits, or a folder's
    /// class subfolders): `model.classes` and `data.class_names` are then taken from the data.
    #[serde(default, skip_serializing_if = "is_false")]
    pub conditional: bool,
    /// Conditional runs: the probability that a training label is replaced by ∅ ("no
    /// class"), so that one network learns ε̂(x_t, y) and ε̂(x_t, ∅) for guidance.
    #[serde(
        default = "default_label_dropout",
        skip_serializing_if = "is_default_label_dropout"
    )]
    pub label_dropout: f64,
    /// Data-parallel training (docs/distributed.md): seconds a rank waits for the others, to
    /// join and at every step, before it stops with an error naming them; absent = 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed_timeout_s: Option<u64>,
}

/// `train.label_dropout` when a file does not set it (Ho & Salimans' 0.1).
pub const DEFAULT_LABEL_DROPOUT: f64 = 0.1;

fn default_label_dropout() -> f64 {
    DEFAULT_LABEL_DROPOUT
}

fn is_default_label_dropout(p: &f64) -> bool {
    *p == DEFAULT_LABEL_DROPOUT
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero_f64(w: &f64) -> bool {
    *w == 0.0
}

/// The sampling section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// σ_t of the ancestral sampler.
    pub sigma: SigmaChoice,
    /// Visited steps, evenly strided (the ancestral sampler runs on the respaced chain,
    /// DDIM jumps between them); absent = all T.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// DDIM's η (0 deterministic, 1 strided DDPM); absent = the article's ancestral sampler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// Clip x̂_0 to [−1, 1] at every step (Ho et al.'s sampler; removes the saturated frames
    /// of short runs).
    pub clip_each_step: bool,
    /// Images in a grid.
    pub n: usize,
    /// Sample with the EMA weights (else the raw weights).
    pub ema: bool,
    /// Grids (the trainer's and `ddpm sample --out`) are scaled up this many times by nearest
    /// neighbour, gaps included (1 = raw pixels; `--each` files stay raw); 1 to 16.
    #[serde(default = "default_grid_scale")]
    pub grid_scale: u32,
    /// Images `ddpm sample` draws at once (its memory is bounded by one batch); absent = 64
    /// (`generate::DEFAULT_BATCH_SIZE`). Part of what fixes the images of a seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Classifier-free guidance weight w of conditional sampling: ε̂ = (1 + w) ε̂(x_t, y) −
    /// w ε̂(x_t, ∅); 0 = plain conditional sampling. Finite and at least 0.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub guidance: f64,
    /// The step rule: `ancestral`, `ddim` (η = `eta`, else 0) or `dpm++2m` (DPM-Solver++(2M),
    /// `steps` network evaluations, no `eta`); absent = ancestral, or DDIM when `eta` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<SamplerKind>,
    /// Which steps are visited: `strided` (this project's list), or diffusers' `linspace`,
    /// `leading`, `trailing` (docs/usage.md).
    #[serde(default, skip_serializing_if = "crate::timesteps::Spacing::is_strided")]
    pub spacing: crate::timesteps::Spacing,
}

/// `sample.sampler`: which step rule the sampler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SamplerKind {
    /// The article's ancestral step (σ from `sample.sigma`).
    #[serde(rename = "ancestral")]
    Ancestral,
    /// DDIM τ → τ′ with η = `sample.eta` (0 when absent).
    #[serde(rename = "ddim")]
    Ddim,
    /// DPM-Solver++(2M), multistep, deterministic.
    #[serde(rename = "dpm++2m")]
    DpmSolver2M,
}

impl SamplerKind {
    /// The name `sample.sampler` takes.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ancestral => "ancestral",
            SamplerKind::Ddim => "ddim",
            SamplerKind::DpmSolver2M => "dpm++2m",
        }
    }
}

/// `sample.grid_scale` of a saved configuration that predates it.
fn default_grid_scale() -> u32 {
    4
}

/// `true`, the serde default of switches that predate their key.
fn yes() -> bool {
    true
}

/// The names of the presets.
pub const PRESETS: [&str; 4] = ["mnist", "mnist-conditional", "cifar32", "celeba128"];

/// The most bytes a config file may hold (a whole configuration is a few KiB); a longer file,
/// or anything but a regular file (a FIFO, a link to /dev/zero), is refused before reading.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 << 20;

impl Config {
    /// `mnist` (the default): the embedded digits at 28×28 with the choices that make a
    /// ~20-minute CPU run give recognisable digits (sinusoidal t, EMA 0.999, warm-up,
    /// per-step x̂_0 clipping); see docs/ for the measurements. LAMB moves each layer by
    /// lr·‖w‖ a step, so the article's 1e-3 (for runs of 10⁵ steps and more) is slow here:
    /// after 150 steps (warm-up 20) the loss was 172 at lr 1e-3, 48 at 5e-3 and 43 at 1e-2.
    pub fn mnist() -> Config {
        Config {
            data: DataConfig {
                source: DataSource::Mnist,
                path: None,
                flip: false,
                holdout: 500,
                class_names: Vec::new(),
            },
            model: UNetConfig::mnist(),
            diffusion: DiffusionConfig {
                schedule: ScheduleKind::Article,
                t_max: 1000,
            },
            train: TrainConfig {
                steps: 2000,
                batch_size: 64,
                lr: 5e-3,
                warmup_steps: 100,
                lr_decay: vec![LrPoint {
                    step: 2000,
                    factor: 0.1,
                }],
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-6,
                weight_decay: 0.01,
                grad_clip: None,
                ema_decay: 0.999,
                ema_warmup: true,
                loss_weight: LossWeight::None,
                loss_sigma: SigmaChoice::Beta,
                min_snr_gamma: DEFAULT_MIN_SNR_GAMMA,
                bf16: false,
                seed: 0,
                checkpoint_every: 250,
                keep_last: 3,
                sample_every: 500,
                log_every: 10,
                skip_nonfinite: false,
                grid_steps: Some(100),
                plot_loss: true,
                conditional: false,
                label_dropout: DEFAULT_LABEL_DROPOUT,
                distributed_timeout_s: None,
                channels_last: false,
            },
            sample: SampleConfig {
                sigma: SigmaChoice::Beta,
                steps: None,
                eta: None,
                clip_each_step: true,
                n: 36,
                ema: true,
                grid_scale: 4,
                batch_size: None,
                guidance: 0.0,
                sampler: None,
                spacing: crate::timesteps::Spacing::Strided,
            },
        }
    }

    /// `mnist-conditional` (the main job, `bash scripts/train.sh`): `mnist` trained on the
    /// digits' labels (label dropout 0.1) and sampled with classifier-free guidance w = 0.5,
    /// its grids one row a digit, one grid at the end. At the same budget it gives FD-MNIST 5.8
    /// and 91.5 % confident samples against `mnist`'s 29.8 and 41 % (docs/training-defaults.md).
    pub fn mnist_conditional() -> Config {
        let mnist = Config::mnist();
        Config {
            train: TrainConfig {
                conditional: true,
                // One guided grid costs two of `mnist`'s: one at the end keeps the budget.
                sample_every: 2000,
                ..mnist.train
            },
            sample: SampleConfig {
                guidance: 0.5,
                ..mnist.sample
            },
            ..mnist
        }
    }

    /// `cifar32`: a folder of images at 32×32 RGB with flips, 128·[1,2,2,2], EMA 0.9999.
    pub fn cifar32() -> Config {
        let mnist = Config::mnist();
        Config {
            data: DataConfig {
                source: DataSource::Folder,
                path: None,
                flip: true,
                holdout: 1000,
                class_names: Vec::new(),
            },
            model: UNetConfig::cifar32(),
            train: TrainConfig {
                steps: 200_000,
                batch_size: 128,
                lr: 1e-3,
                warmup_steps: 1000,
                lr_decay: vec![
                    LrPoint {
                        step: 100_000,
                        factor: 0.5,
                    },
                    LrPoint {
                        step: 200_000,
                        factor: 0.1,
                    },
                ],
                ema_decay: 0.9999,
                checkpoint_every: 5000,
                sample_every: 5000,
                log_every: 50,
                ..mnist.train
            },
            ..mnist
        }
    }

    /// `celeba128`: the article's CelebA-HQ setting — 128×128 RGB, 128·[1,1,2,2,4,4], learned
    /// Embedding(T, 128), LAMB lr 1e-3, EMA 0.9999, the article's sampler (no per-step clip).
    pub fn celeba128() -> Config {
        let cifar = Config::cifar32();
        Config {
            data: DataConfig {
                holdout: 500,
                ..cifar.data
            },
            model: UNetConfig::celeba128(),
            train: TrainConfig {
                steps: 1_000_000,
                batch_size: 64,
                lr_decay: vec![LrPoint {
                    step: 1_000_000,
                    factor: 0.1,
                }],
                ..cifar.train
            },
            sample: SampleConfig {
                clip_each_step: false,
                n: 16,
                grid_scale: 1,
                ..cifar.sample
            },
            ..cifar
        }
    }

    /// The preset called `name`.
    pub fn preset(name: &str) -> Result<Config> {
        match name {
            "mnist" => Ok(Config::mnist()),
            "mnist-conditional" => Ok(Config::mnist_conditional()),
            "cifar32" => Ok(Config::cifar32()),
            "celeba128" => Ok(Config::celeba128()),
            _ => Err(DdpmError::OutOfRange {
                key: "preset",
                value: format!("{name:?}"),
                expected: format!("one of {}", PRESETS.join(", ")),
            }),
        }
    }

    /// Reads a TOML (`.toml`) or JSON (`.json`) file. Its optional top-level `preset` key
    /// (default `mnist`) picks the base; every other key replaces the base's value.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = crate::fsio::read_text_bounded(path, MAX_CONFIG_FILE_BYTES, "the config file")?;
        let origin = path.display().to_string();
        let parse_error = |reason: String| DdpmError::ConfigParse {
            origin: origin.clone(),
            reason,
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Config::from_toml_str(&text, &origin),
            Some("json") => {
                let table: toml::Table = serde_json::from_str(&text).map_err(|e| {
                    let message = e.to_string();
                    // The null hint only where the error is about a null (or an unknown
                    // value type); a recursion-limit or syntax error keeps serde's words.
                    if message.contains("null") || message.contains("unsupported unit") {
                        parse_error(format!("{e} (JSON null is not allowed: leave the key out)"))
                    } else if message.contains("recursion limit") {
                        parse_error(format!(
                            "{e} (settings nest at most three levels: a section, its keys, and tables such as sample.sigma)"
                        ))
                    } else {
                        parse_error(message)
                    }
                })?;
                Config::from_table(table, &origin)
            }
            _ => Err(parse_error(
                "a config file must end in .toml or .json".into(),
            )),
        }
    }

    /// Parses TOML text (see [`Config::from_file`]); `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config> {
        let table: toml::Table = toml::from_str(text).map_err(|e| DdpmError::ConfigParse {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        Config::from_table(table, origin)
    }

    fn from_table(mut table: toml::Table, origin: &str) -> Result<Config> {
        let preset = match table.remove("preset") {
            None => "mnist".to_string(),
            Some(toml::Value::String(s)) => s,
            Some(other) => {
                return Err(DdpmError::ConfigParse {
                    origin: origin.to_string(),
                    reason: format!("`preset` must be a string, got {other}"),
                })
            }
        };
        let mut merged = Config::preset(&preset)?.to_table()?;
        merge(&mut merged, table);
        let cfg = parse_merged(merged, origin)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// These settings with `over` on top: a partial configuration table (`ddpm train`'s flags,
    /// each at its key, or `ddpm sample`'s at `sample.*`) layered by the merge that layers a
    /// file over its preset, then parsed and validated by the same code. Two rules follow a
    /// change of the run's length or of T:
    /// - the base's last learning-rate decay point, when it sits at the base's last step,
    ///   marks the end of its run: it moves to the end of this one, or goes when this run ends
    ///   within the warm-up;
    /// - a new `diffusion.t_max` caps `train.grid_steps` (unless `over` sets that too).
    pub fn with_overrides(&self, over: toml::Table, origin: &str) -> Result<Config> {
        let sets_t_max = sets(&over, "diffusion.t_max");
        let sets_grid_steps = sets(&over, "train.grid_steps");
        let mut merged = self.to_table()?;
        merge(&mut merged, over);
        let mut cfg = parse_merged(merged, origin)?;
        cfg.follow_run_length(self.train.steps);
        if sets_t_max && !sets_grid_steps {
            let t = cfg.diffusion.t_max.max(1) as usize;
            cfg.train.grid_steps = cfg.train.grid_steps.map(|n| n.min(t));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The learning-rate rule of [`Config::with_overrides`]: a decay point at `base_steps`,
    /// the base run's end, follows `train.steps`.
    fn follow_run_length(&mut self, base_steps: u64) {
        let t = &mut self.train;
        let ends_the_base_run = t.lr_decay.last().is_some_and(|p| p.step == base_steps);
        if t.steps == base_steps || !ends_the_base_run {
            return;
        }
        if let Some(end) = t.lr_decay.pop() {
            let after_previous = t.lr_decay.last().map_or(t.warmup_steps, |p| p.step);
            if t.steps > after_previous {
                t.lr_decay.push(LrPoint {
                    step: t.steps,
                    ..end
                });
            }
        }
    }

    /// The configuration as a TOML table, as saved (T only at `diffusion.t_max`).
    pub fn to_table(&self) -> Result<toml::Table> {
        let mut table = toml::Table::try_from(self).map_err(|e| DdpmError::Encode {
            what: "the configuration",
            cause: e.to_string(),
        })?;
        if let Some(toml::Value::Table(model)) = table.get_mut("model") {
            model.remove("t_max");
        }
        Ok(table)
    }

    /// The configuration as TOML, as written beside each checkpoint.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(&self.to_table()?).map_err(|e| DdpmError::Encode {
            what: "the configuration as TOML",
            cause: e.to_string(),
        })
    }

    /// The settings in which `self` (wanted) and `saved` differ, as (key, value here, value
    /// in the run) in key order, leaving out those a resumed run may change: its length and
    /// the decay point that follows it, and where its data are (`data.path`: a resumed run
    /// may read them from another place, held to the checkpoint's fingerprint instead).
    pub fn differences(&self, saved: &Config) -> Result<Vec<(String, String, String)>> {
        let flat = |cfg: &Config| -> Result<BTreeMap<String, String>> {
            let mut flat = BTreeMap::new();
            flatten("", &cfg.to_table()?, &mut flat);
            flat.remove("train.steps");
            flat.remove("train.lr_decay");
            flat.remove("data.path");
            // Taken from the data (held to the checkpoint's fingerprint), not given.
            flat.remove("model.classes");
            flat.remove("data.class_names");
            flat.remove("train.distributed_timeout_s");
            flat.remove("train.channels_last");
            Ok(flat)
        };
        let (a, b) = (flat(self)?, flat(saved)?);
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let absent = || "absent".to_string();
        Ok(keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                let here = a.get(k).cloned().unwrap_or_else(absent);
                (k.clone(), here, b.get(k).cloned().unwrap_or_else(absent))
            })
            .collect())
    }

    /// The shape of one image, [C, S, S].
    pub fn image_shape(&self) -> [i64; 3] {
        [
            self.model.in_channels,
            self.model.image_size,
            self.model.image_size,
        ]
    }

    /// Checks the values together, with messages saying what to change.
    pub fn validate(&self) -> Result<()> {
        let out_of_range = |key: &'static str, value: String, expected: String| {
            Err(DdpmError::OutOfRange {
                key,
                value,
                expected,
            })
        };
        self.model.validate()?;
        let (d, m, t, s) = (&self.data, &self.model, &self.train, &self.sample);
        let t_max = self.diffusion.t_max;
        if t_max != m.t_max {
            return Err(t_max_conflict(&m.t_max, t_max));
        }
        if d.source == DataSource::Mnist
            && (m.in_channels != 1 || !(m.image_size == 28 || m.image_size == 32))
        {
            return Err(DdpmError::Incompatible {
                key: "data.source",
                other: "model.in_channels and model.image_size".into(),
                reason: format!(
                    "MNIST is grey 28×28 (or padded to 32×32), but the model takes {}×{}×{}",
                    m.in_channels, m.image_size, m.image_size
                ),
            });
        }
        if d.source == DataSource::Folder && !(m.in_channels == 1 || m.in_channels == 3) {
            return out_of_range(
                "model.in_channels",
                m.in_channels.to_string(),
                "1 (grey) or 3 (RGB) for images".into(),
            );
        }
        for (key, v) in [
            ("train.steps", t.steps),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.log_every", t.log_every),
            ("train.batch_size", t.batch_size as u64),
            ("train.keep_last", t.keep_last as u64),
            ("sample.n", s.n as u64),
            ("sample.batch_size", s.batch_size.map_or(1, |b| b as u64)),
            (
                "train.distributed_timeout_s",
                t.distributed_timeout_s.unwrap_or(1),
            ),
        ] {
            if v == 0 {
                return out_of_range(key, "0".into(), "at least 1".into());
            }
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return out_of_range("train.lr", t.lr.to_string(), "positive".into());
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return out_of_range(
                "train.ema_decay",
                t.ema_decay.to_string(),
                "in [0, 1)".into(),
            );
        }
        if let Some(c) = t.grad_clip.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return out_of_range("train.grad_clip", c.to_string(), "positive".into());
        }
        // LAMB's own settings, under their config keys.
        self.lamb().validate().map_err(|e| match e {
            DdpmError::OutOfRange {
                key,
                value,
                expected,
            } => DdpmError::OutOfRange {
                key: match key {
                    "lr" => "train.lr",
                    "beta1" => "train.beta1",
                    "beta2" => "train.beta2",
                    "eps" => "train.eps",
                    "weight_decay" => "train.weight_decay",
                    "max_grad_norm" => "train.grad_clip",
                    other => other,
                },
                value,
                expected,
            },
            e => e,
        })?;
        if !(t.min_snr_gamma.is_finite() && t.min_snr_gamma > 0.0) {
            return out_of_range(
                "train.min_snr_gamma",
                t.min_snr_gamma.to_string(),
                "positive and finite".into(),
            );
        }
        if t.loss_weight == LossWeight::Article && t.loss_sigma == SigmaChoice::Posterior {
            return Err(DdpmError::Incompatible {
                key: "train.loss_sigma",
                other: "train.loss_weight = \"article\"".into(),
                reason: "loss (8) with σ = posterior has σ_1 = 0, an infinite weight at t = 1; choose beta or isotropic".into(),
            });
        }
        for (key, steps) in [
            ("sample.steps", s.steps),
            ("train.grid_steps", t.grid_steps),
        ] {
            if let Some(n) = steps.filter(|&n| n == 0 || n as i64 > t_max) {
                return out_of_range(key, n.to_string(), format!("between 1 and T = {t_max}"));
            }
        }
        self.check_sampler()?;
        self.lr_schedule()?;
        self.validate_classes()?;
        if !(1..=crate::grid::MAX_SCALE).contains(&s.grid_scale) {
            return out_of_range(
                "sample.grid_scale",
                s.grid_scale.to_string(),
                format!("between 1 and {}", crate::grid::MAX_SCALE),
            );
        }
        Ok(())
    }

    /// The conditional settings: a label dropout in [0, 1], a finite guidance w ≥ 0, classes
    /// only in a conditional run and as many names as classes.
    fn validate_classes(&self) -> Result<()> {
        let (d, m, t, s) = (&self.data, &self.model, &self.train, &self.sample);
        if !(0.0..=1.0).contains(&t.label_dropout) {
            return Err(DdpmError::OutOfRange {
                key: "train.label_dropout",
                value: t.label_dropout.to_string(),
                expected: "a probability in [0, 1]".into(),
            });
        }
        if !(s.guidance.is_finite() && s.guidance >= 0.0) {
            return Err(DdpmError::OutOfRange {
                key: "sample.guidance",
                value: s.guidance.to_string(),
                expected: "finite and at least 0 (0 = plain conditional sampling)".into(),
            });
        }
        if m.classes > 0 && !t.conditional {
            return Err(DdpmError::Incompatible {
                key: "model.classes",
                other: "train.conditional = false".into(),
                reason: "a network with classes is trained on labels: set train.conditional = true (the classes then come from the data)".into(),
            });
        }
        if !d.class_names.is_empty() && d.class_names.len() as i64 != m.classes {
            return Err(DdpmError::Incompatible {
                key: "data.class_names",
                other: format!("model.classes = {}", m.classes),
                reason: format!(
                    "{} class names for {} classes",
                    d.class_names.len(),
                    m.classes
                ),
            });
        }
        Ok(())
    }

    /// The learning-rate schedule of `train`.
    pub fn lr_schedule(&self) -> Result<crate::lr::LrSchedule> {
        let points: Vec<(u64, f64)> = self
            .train
            .lr_decay
            .iter()
            .map(|p| (p.step, p.factor))
            .collect();
        crate::lr::LrSchedule::new(self.train.lr, self.train.warmup_steps, &points)
    }

    /// LAMB's settings at the base rate.
    pub fn lamb(&self) -> crate::lamb::LambConfig {
        let t = &self.train;
        crate::lamb::LambConfig {
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            max_grad_norm: t.grad_clip,
        }
    }

    /// The sampler for grids and `ddpm sample`, seeded with `seed`.
    pub fn sampler(&self, seed: Option<i64>) -> crate::sampler::SamplerConfig {
        let s = &self.sample;
        let (eta, dpm_solver) = match s.sampler {
            None | Some(SamplerKind::Ancestral) => (s.eta, false),
            Some(SamplerKind::Ddim) => (Some(s.eta.unwrap_or(0.0)), false),
            Some(SamplerKind::DpmSolver2M) => (None, true),
        };
        crate::sampler::SamplerConfig {
            sigma: s.sigma,
            steps: s.steps,
            eta,
            clip_each_step: s.clip_each_step,
            seed,
            dpm_solver,
            spacing: s.spacing,
            ..Default::default()
        }
    }

    /// `sample.sampler` against `sample.eta` and the step counts DPM-Solver++ can take
    /// (`sample.steps`, `train.grid_steps`: at most T − 1 unless `sample.spacing = "trailing"`).
    fn check_sampler(&self) -> Result<()> {
        let s = &self.sample;
        let Some(kind) = s.sampler else {
            return Ok(());
        };
        if let (SamplerKind::Ancestral | SamplerKind::DpmSolver2M, Some(eta)) = (kind, s.eta) {
            return Err(DdpmError::Incompatible {
                key: "sample.sampler",
                other: format!("sample.eta = {eta}"),
                reason: format!(
                    "η belongs to DDIM; the {} sampler takes none: leave sample.eta out or choose ddim",
                    kind.name()
                ),
            });
        }
        if kind != SamplerKind::DpmSolver2M {
            return Ok(());
        }
        // An absent sample.steps (all T) is left to the sampler, which refuses it when
        // `ddpm sample` runs; the grids need a count now.
        let t_max = self.diffusion.t_max;
        for (key, steps) in [
            ("sample.steps", s.steps),
            ("train.grid_steps", self.train.grid_steps.or(s.steps)),
        ] {
            let n = match (key, steps) {
                ("sample.steps", None) => continue,
                (_, steps) => steps.unwrap_or(t_max as usize),
            };
            crate::dpm_solver::visited(t_max, n, s.spacing).map_err(|e| match e {
                DdpmError::OutOfRange { expected, .. } => DdpmError::OutOfRange {
                    key,
                    value: steps.map_or(format!("absent (all T = {t_max})"), |n| n.to_string()),
                    expected: format!("{expected}, for sample.sampler = \"dpm++2m\""),
                },
                e => e,
            })?;
        }
        Ok(())
    }
}

/// Where in a file layered over its preset `e` happened: the offending `key = value` line and
/// its section, not a line number (the merged document's numbers are not the file's).
fn locate(e: &toml::de::Error, merged: &str) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let before = &merged[..span.start.min(merged.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = merged[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with('[') {
        // A table header where a value was expected (a nested table in a JSON file).
        return format!("`{line}`: {}", e.message().trim());
    }
    let section = merged[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .unwrap_or("the top level");
    format!("`{line}` in {section}: {}", e.message().trim())
}

/// Replaces `base`'s values by `over`'s, recursing into tables present in both.
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// Sets `value` at the dotted `key` (`train.steps`) of `table`, creating its sections.
pub fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
        }
        Some((section, rest)) => {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                set_key(t, rest, value);
            }
        }
    }
}

/// Whether `table` has a value at the dotted `key`.
pub fn sets(table: &toml::Table, key: &str) -> bool {
    match key.split_once('.') {
        None => table.contains_key(key),
        Some((section, rest)) => {
            matches!(table.get(section), Some(toml::Value::Table(t)) if sets(t, rest))
        }
    }
}

/// The dotted keys of every value in `table` (tables are descended into, `sample.sigma`'s
/// `{kind, data_std}` too).
pub fn keys(table: &toml::Table) -> Vec<String> {
    let mut flat = BTreeMap::new();
    flatten("", table, &mut flat);
    flat.into_keys().collect()
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (key, value) in table {
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) => flatten(&name, t, out),
            v => {
                out.insert(name, v.to_string());
            }
        }
    }
}

/// T lives at `diffusion.t_max`; the network's copy (`model.t_max`, which older runs saved
/// too) follows it. Accepts a `model.t_max` equal to it.
fn settle_t_max(table: &mut toml::Table) -> Result<()> {
    let t_max = table
        .get("diffusion")
        .and_then(|d| d.get("t_max"))
        .and_then(toml::Value::as_integer);
    if let (Some(t_max), Some(toml::Value::Table(model))) = (t_max, table.get_mut("model")) {
        if let Some(old) = model.get("t_max") {
            if old.as_integer() != Some(t_max) {
                return Err(t_max_conflict(old, t_max));
            }
        }
        model.insert("t_max".into(), toml::Value::Integer(t_max));
    }
    Ok(())
}

/// `model` is shown as the file gave it, so a non-integer is quoted, not guessed at.
fn t_max_conflict(model: &dyn std::fmt::Display, diffusion: i64) -> DdpmError {
    DdpmError::Incompatible {
        key: "model.t_max",
        other: "diffusion.t_max".into(),
        reason: format!("T is diffusion.t_max = {diffusion}; model.t_max = {model} (kept by older runs) must equal it or be left out"),
    }
}

/// Parses a whole configuration table (see [`settle_t_max`]) without validating it. Parsing
/// the document as text makes serde's errors quote the offending line.
fn parse_merged(mut merged: toml::Table, origin: &str) -> Result<Config> {
    settle_t_max(&mut merged)?;
    let parse_error = |reason: String| DdpmError::ConfigParse {
        origin: origin.to_string(),
        reason,
    };
    let text = toml::to_string(&merged).map_err(|e| parse_error(e.to_string()))?;
    toml::from_str(&text).map_err(|e| parse_error(locate(&e, &text)))
}

/// A [`Config`] as saved in a checkpoint's manifest (`#[serde(with = "saved")]`): T only at
/// `diffusion.t_max`; a manifest of an older run with `model.t_max` too still reads.
pub mod saved {
    use super::{settle_t_max, Config};

    /// Writes `cfg` without `model.t_max`.
    pub fn serialize<S: serde::Serializer>(cfg: &Config, s: S) -> Result<S::Ok, S::Error> {
        use serde::Serialize;
        cfg.to_table()
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }

    /// Reads a configuration with or without `model.t_max`.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Config, D::Error> {
        use serde::Deserialize;
        let mut table = toml::Table::deserialize(d)?;
        settle_t_max(&mut table).map_err(serde::de::Error::custom)?;
        toml::Value::Table(table)
            .try_into()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The main job's preset is `mnist` but for its labels, its guidance and its one grid.
    #[test]
    fn the_conditional_preset_is_mnist_with_labels_and_guidance() {
        let mut c = Config::preset("mnist-conditional").unwrap();
        assert_eq!(
            (c.train.conditional, c.sample.guidance, c.train.sample_every),
            (true, 0.5, 2000)
        );
        assert_eq!(c.train.label_dropout, DEFAULT_LABEL_DROPOUT);
        c.train.conditional = false;
        c.train.sample_every = 500;
        c.sample.guidance = 0.0;
        assert_eq!(c, Config::mnist());
    }

    #[test]
    fn presets_are_valid_and_round_trip_through_toml() {
        for name in PRESETS {
            let cfg = Config::preset(name).unwrap();
            cfg.validate().unwrap();
            let back = Config::from_toml_str(
                &format!("preset = {name:?}\n{}", cfg.to_toml().unwrap()),
                "test",
            )
            .unwrap();
            assert_eq!(back, cfg, "{name}");
        }
        assert!(Config::preset("imagenet").is_err());
    }

    #[test]
    fn a_file_overrides_its_preset() {
        let cfg = Config::from_toml_str(
            "preset = \"celeba128\"\n[data]\npath = \"/faces\"\n[train]\nlr = 0.0002\n[sample]\nsteps = 50\neta = 0.0\n",
            "t",
        )
        .unwrap();
        assert_eq!(cfg.train.lr, 2e-4);
        assert_eq!(cfg.data.path.as_deref(), Some(Path::new("/faces")));
        assert_eq!(cfg.model, UNetConfig::celeba128());
        assert_eq!(cfg.train.batch_size, Config::celeba128().train.batch_size);
        let json = serde_json::json!({"train": {"steps": 7}, "sample": {"sigma": {"kind": "isotropic", "data_std": 0.5}}});
        let table: toml::Table = serde_json::from_value(json).unwrap();
        let cfg = Config::from_table(table, "j").unwrap();
        assert_eq!(
            (cfg.train.steps, cfg.sample.sigma),
            (7, SigmaChoice::Isotropic { data_std: 0.5 })
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors() {
        let err = Config::from_toml_str("[train]\nlearning_rate = 0.1\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("learning_rate") && err.contains("f.toml"),
            "{err}"
        );
        let err = Config::from_toml_str("[model]\nchannels = 3\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("channels"), "{err}");
        let err = Config::from_toml_str("colour = true\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = Config::from_toml_str("[train]\nsteps = \"many\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("steps") && err.contains("many"), "{err}");
        let err =
            Config::from_toml_str("[diffusion]\nt_max = 500\n[model]\nt_max = 400\n", "f.toml")
                .unwrap_err();
        assert!(
            matches!(err, DdpmError::Incompatible { key: "model.t_max", ref other, .. } if other == "diffusion.t_max"),
            "{err}"
        );
        assert!(err.to_string().contains("model.t_max = 400"), "{err}");
        // A model.t_max that is not an integer is quoted as written.
        let err = Config::from_toml_str(
            "[diffusion]\nt_max = 500\n[model]\nt_max = \"500\"\n",
            "f.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("model.t_max = \"500\""), "{err}");
        assert!(Config::from_toml_str("preset = \"nope\"\n", "f.toml").is_err());
    }

    #[test]
    fn t_lives_in_diffusion_and_older_files_with_model_t_max_still_read() {
        let cfg = Config::from_toml_str("[diffusion]\nt_max = 500\n", "f.toml").unwrap();
        assert_eq!((cfg.diffusion.t_max, cfg.model.t_max), (500, 500));
        assert!(!cfg.to_toml().unwrap().contains("[model]\nt_max"));
        assert!(!cfg.to_table().unwrap()["model"]
            .as_table()
            .unwrap()
            .contains_key("t_max"));
        let old = Config::from_toml_str("[diffusion]\nt_max = 500\n[model]\nt_max = 500\n", "old")
            .unwrap();
        assert_eq!(old, cfg);
        // A manifest of an older run carries model.t_max in its JSON.
        let mut json = serde_json::to_value(Config::mnist()).unwrap();
        assert_eq!(json["model"]["t_max"], 1000);
        let back: Config = saved::deserialize(json.clone()).unwrap();
        assert_eq!(back, Config::mnist());
        json["model"]["t_max"] = 7.into();
        assert!(saved::deserialize(json).is_err());
    }

    #[test]
    fn overrides_layer_like_a_file_and_the_decay_end_follows_the_run_length() {
        let base = Config::mnist();
        let mut over = toml::Table::new();
        set_key(&mut over, "train.steps", 300.into());
        set_key(&mut over, "train.lr", 0.002.into());
        set_key(&mut over, "train.bf16", true.into());
        assert!(sets(&over, "train.lr") && !sets(&over, "train.seed"));
        assert_eq!(keys(&over), ["train.bf16", "train.lr", "train.steps"]);
        let cfg = base.with_overrides(over, "flags").unwrap();
        assert_eq!(
            (cfg.train.steps, cfg.train.lr, cfg.train.bf16),
            (300, 0.002, true)
        );
        assert_eq!(
            cfg.train.lr_decay,
            vec![LrPoint {
                step: 300,
                factor: 0.1
            }]
        );
        let mut short = toml::Table::new();
        set_key(&mut short, "train.steps", 30.into());
        assert!(
            base.with_overrides(short, "flags")
                .unwrap()
                .train
                .lr_decay
                .is_empty(),
            "a run inside the warm-up has no decay"
        );
        let mut t = toml::Table::new();
        set_key(&mut t, "diffusion.t_max", 20.into());
        let cfg = base.with_overrides(t, "flags").unwrap();
        assert_eq!((cfg.model.t_max, cfg.train.grid_steps), (20, Some(20)));
        let mut bad = toml::Table::new();
        set_key(&mut bad, "train.loss_weight", "article".into());
        set_key(&mut bad, "train.loss_sigma.kind", "posterior".into());
        let err = base.with_overrides(bad, "flags").unwrap_err();
        assert!(
            matches!(
                err,
                DdpmError::Incompatible {
                    key: "train.loss_sigma",
                    ..
                }
            ),
            "{err}"
        );
        let mut bad = toml::Table::new();
        set_key(&mut bad, "train.lr", 0.0.into());
        let err = base.with_overrides(bad, "flags").unwrap_err();
        assert!(
            matches!(
                err,
                DdpmError::OutOfRange {
                    key: "train.lr",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn min_snr_is_a_loss_weight_whose_gamma_defaults_to_5_and_must_be_positive() {
        let cfg = Config::from_toml_str(
            "[train]\nloss_weight = \"min_snr\"\nmin_snr_gamma = 2.5\n",
            "f.toml",
        )
        .unwrap();
        assert_eq!(
            (cfg.train.loss_weight, cfg.train.min_snr_gamma),
            (LossWeight::MinSnr, 2.5)
        );
        let back = Config::from_toml_str(&cfg.to_toml().unwrap(), "saved").unwrap();
        assert_eq!(back, cfg);
        // The article's behaviour stays every preset's default; γ defaults to Hang et al.'s 5,
        // also in a saved config.toml written before the key existed.
        for name in PRESETS {
            let p = Config::preset(name).unwrap();
            assert_eq!(p.train.loss_weight, LossWeight::None, "{name}");
            assert_eq!(p.train.min_snr_gamma, 5.0, "{name}");
        }
        let mut older = Config::mnist().to_table().unwrap();
        older["train"]
            .as_table_mut()
            .unwrap()
            .remove("min_snr_gamma");
        let older = toml::to_string(&older).unwrap();
        assert!(!older.contains("min_snr_gamma"));
        assert_eq!(
            Config::from_toml_str(&older, "old").unwrap(),
            Config::mnist()
        );
        for gamma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut bad = toml::Table::new();
            set_key(&mut bad, "train.loss_weight", "min_snr".into());
            set_key(&mut bad, "train.min_snr_gamma", gamma.into());
            let err = Config::mnist().with_overrides(bad, "flags").unwrap_err();
            assert!(
                matches!(
                    err,
                    DdpmError::OutOfRange {
                        key: "train.min_snr_gamma",
                        ..
                    }
                ),
                "γ = {gamma}: {err}"
            );
        }
    }

    /// The key `cfg` is refused under (an out-of-range or incompatible setting), `None` when
    /// it is valid.
    fn refused_key(cfg: &Config) -> Option<&'static str> {
        match cfg.validate() {
            Ok(()) => None,
            Err(DdpmError::OutOfRange { key, .. } | DdpmError::Incompatible { key, .. }) => {
                Some(key)
            }
            Err(e) => panic!("not a refusal naming a key: {e}"),
        }
    }

    /// Every check of `validate` takes the value at its edge and refuses the one just past
    /// it, naming the key to change (each rule's boundary was tested only far from it).
    #[test]
    fn each_check_takes_its_edge_and_refuses_the_value_past_it_naming_its_key() {
        type Edit = fn(&mut Config);
        let mnist: &[(&str, Edit, Option<&str>)] = &[
            (
                "T differs",
                |c| c.diffusion.t_max = 999,
                Some("model.t_max"),
            ),
            ("MNIST 32×32", |c| c.model.image_size = 32, None),
            (
                "MNIST 36×36",
                |c| c.model.image_size = 36,
                Some("data.source"),
            ),
            (
                "MNIST RGB",
                |c| c.model.in_channels = 3,
                Some("data.source"),
            ),
            (
                "MNIST 2 channels",
                |c| c.model.in_channels = 2,
                Some("data.source"),
            ),
            ("train.steps 0", |c| c.train.steps = 0, Some("train.steps")),
            ("train.steps 1", |c| c.train.steps = 1, None),
            (
                "checkpoint_every 0",
                |c| c.train.checkpoint_every = 0,
                Some("train.checkpoint_every"),
            ),
            ("checkpoint_every 1", |c| c.train.checkpoint_every = 1, None),
            (
                "log_every 0",
                |c| c.train.log_every = 0,
                Some("train.log_every"),
            ),
            ("log_every 1", |c| c.train.log_every = 1, None),
            (
                "batch_size 0",
                |c| c.train.batch_size = 0,
                Some("train.batch_size"),
            ),
            ("batch_size 1", |c| c.train.batch_size = 1, None),
            (
                "keep_last 0",
                |c| c.train.keep_last = 0,
                Some("train.keep_last"),
            ),
            ("keep_last 1", |c| c.train.keep_last = 1, None),
            ("sample.n 0", |c| c.sample.n = 0, Some("sample.n")),
            ("sample.n 1", |c| c.sample.n = 1, None),
            (
                "sample.batch_size 0",
                |c| c.sample.batch_size = Some(0),
                Some("sample.batch_size"),
            ),
            (
                "sample.batch_size 1",
                |c| c.sample.batch_size = Some(1),
                None,
            ),
            (
                "timeout 0",
                |c| c.train.distributed_timeout_s = Some(0),
                Some("train.distributed_timeout_s"),
            ),
            (
                "timeout 1",
                |c| c.train.distributed_timeout_s = Some(1),
                None,
            ),
            ("lr 0", |c| c.train.lr = 0.0, Some("train.lr")),
            ("lr NaN", |c| c.train.lr = f64::NAN, Some("train.lr")),
            ("lr ∞", |c| c.train.lr = f64::INFINITY, Some("train.lr")),
            ("lr tiny", |c| c.train.lr = 1e-300, None),
            ("ema_decay 0", |c| c.train.ema_decay = 0.0, None),
            (
                "ema_decay 1",
                |c| c.train.ema_decay = 1.0,
                Some("train.ema_decay"),
            ),
            (
                "ema_decay < 0",
                |c| c.train.ema_decay = -1e-9,
                Some("train.ema_decay"),
            ),
            (
                "grad_clip 0",
                |c| c.train.grad_clip = Some(0.0),
                Some("train.grad_clip"),
            ),
            (
                "grad_clip NaN",
                |c| c.train.grad_clip = Some(f64::NAN),
                Some("train.grad_clip"),
            ),
            (
                "grad_clip ∞",
                |c| c.train.grad_clip = Some(f64::INFINITY),
                Some("train.grad_clip"),
            ),
            ("grad_clip tiny", |c| c.train.grad_clip = Some(1e-300), None),
            ("beta1 1", |c| c.train.beta1 = 1.0, Some("train.beta1")),
            ("beta2 1", |c| c.train.beta2 = 1.0, Some("train.beta2")),
            ("eps 0", |c| c.train.eps = 0.0, Some("train.eps")),
            (
                "weight_decay < 0",
                |c| c.train.weight_decay = -1e-9,
                Some("train.weight_decay"),
            ),
            ("weight_decay 0", |c| c.train.weight_decay = 0.0, None),
            (
                "γ 0",
                |c| c.train.min_snr_gamma = 0.0,
                Some("train.min_snr_gamma"),
            ),
            (
                "γ NaN",
                |c| c.train.min_snr_gamma = f64::NAN,
                Some("train.min_snr_gamma"),
            ),
            (
                "γ ∞",
                |c| c.train.min_snr_gamma = f64::INFINITY,
                Some("train.min_snr_gamma"),
            ),
            ("γ tiny", |c| c.train.min_snr_gamma = 1e-300, None),
            (
                "article, posterior",
                |c| {
                    c.train.loss_weight = LossWeight::Article;
                    c.train.loss_sigma = SigmaChoice::Posterior;
                },
                Some("train.loss_sigma"),
            ),
            (
                "article, beta",
                |c| c.train.loss_weight = LossWeight::Article,
                None,
            ),
            (
                "unweighted, posterior",
                |c| c.train.loss_sigma = SigmaChoice::Posterior,
                None,
            ),
            (
                "sample.steps 0",
                |c| c.sample.steps = Some(0),
                Some("sample.steps"),
            ),
            ("sample.steps 1", |c| c.sample.steps = Some(1), None),
            ("sample.steps T", |c| c.sample.steps = Some(1000), None),
            (
                "sample.steps T + 1",
                |c| c.sample.steps = Some(1001),
                Some("sample.steps"),
            ),
            (
                "grid_steps 0",
                |c| c.train.grid_steps = Some(0),
                Some("train.grid_steps"),
            ),
            ("grid_steps T", |c| c.train.grid_steps = Some(1000), None),
            (
                "grid_steps T + 1",
                |c| c.train.grid_steps = Some(1001),
                Some("train.grid_steps"),
            ),
            (
                "grid_scale 0",
                |c| c.sample.grid_scale = 0,
                Some("sample.grid_scale"),
            ),
            ("grid_scale 1", |c| c.sample.grid_scale = 1, None),
            (
                "grid_scale max",
                |c| c.sample.grid_scale = crate::grid::MAX_SCALE,
                None,
            ),
            (
                "grid_scale max + 1",
                |c| c.sample.grid_scale = crate::grid::MAX_SCALE + 1,
                Some("sample.grid_scale"),
            ),
            ("label_dropout 0", |c| c.train.label_dropout = 0.0, None),
            ("label_dropout 1", |c| c.train.label_dropout = 1.0, None),
            (
                "label_dropout < 0",
                |c| c.train.label_dropout = -1e-9,
                Some("train.label_dropout"),
            ),
            (
                "label_dropout > 1",
                |c| c.train.label_dropout = 1.0 + 1e-9,
                Some("train.label_dropout"),
            ),
            ("guidance 0", |c| c.sample.guidance = 0.0, None),
            (
                "guidance < 0",
                |c| c.sample.guidance = -1e-9,
                Some("sample.guidance"),
            ),
            (
                "guidance NaN",
                |c| c.sample.guidance = f64::NAN,
                Some("sample.guidance"),
            ),
            (
                "guidance ∞",
                |c| c.sample.guidance = f64::INFINITY,
                Some("sample.guidance"),
            ),
            (
                "classes, unconditional",
                |c| c.model.classes = 2,
                Some("model.classes"),
            ),
            (
                "classes, conditional",
                |c| {
                    c.train.conditional = true;
                    c.model.classes = 2;
                },
                None,
            ),
            (
                "classes and their names",
                |c| {
                    c.train.conditional = true;
                    c.model.classes = 2;
                    c.data.class_names = vec!["a".into(), "b".into()];
                },
                None,
            ),
            (
                "one name short",
                |c| {
                    c.train.conditional = true;
                    c.model.classes = 2;
                    c.data.class_names = vec!["a".into()];
                },
                Some("data.class_names"),
            ),
            (
                "ancestral with η",
                |c| {
                    c.sample.sampler = Some(SamplerKind::Ancestral);
                    c.sample.eta = Some(0.0);
                },
                Some("sample.sampler"),
            ),
            (
                "DPM-Solver++ with η",
                |c| {
                    c.sample.sampler = Some(SamplerKind::DpmSolver2M);
                    c.sample.eta = Some(0.0);
                },
                Some("sample.sampler"),
            ),
            (
                "DDIM with η",
                |c| {
                    c.sample.sampler = Some(SamplerKind::Ddim);
                    c.sample.eta = Some(0.5);
                },
                None,
            ),
            (
                "DPM-Solver++ at T − 1 steps",
                |c| {
                    c.sample.sampler = Some(SamplerKind::DpmSolver2M);
                    c.sample.steps = Some(999);
                },
                None,
            ),
            (
                "DPM-Solver++ at T steps",
                |c| {
                    c.sample.sampler = Some(SamplerKind::DpmSolver2M);
                    c.sample.steps = Some(1000);
                },
                Some("sample.steps"),
            ),
            (
                "DPM-Solver++ grids at T steps",
                |c| {
                    c.sample.sampler = Some(SamplerKind::DpmSolver2M);
                    c.train.grid_steps = None;
                },
                Some("train.grid_steps"),
            ),
            (
                "DPM-Solver++ trailing at T steps",
                |c| {
                    c.sample.sampler = Some(SamplerKind::DpmSolver2M);
                    c.sample.spacing = crate::timesteps::Spacing::Trailing;
                    c.sample.steps = Some(1000);
                    c.train.grid_steps = None;
                },
                None,
            ),
        ];
        let folder: &[(&str, Edit, Option<&str>)] = &[
            ("grey", |c| c.model.in_channels = 1, None),
            ("RGB", |c| c.model.in_channels = 3, None),
            (
                "2 channels",
                |c| c.model.in_channels = 2,
                Some("model.in_channels"),
            ),
            (
                "4 channels",
                |c| c.model.in_channels = 4,
                Some("model.in_channels"),
            ),
            ("any size", |c| c.model.image_size = 40, None),
        ];
        for (base, cases) in [(Config::mnist(), mnist), (Config::cifar32(), folder)] {
            assert_eq!(refused_key(&base), None);
            for (what, edit, expected) in cases {
                let mut cfg = base.clone();
                edit(&mut cfg);
                assert_eq!(refused_key(&cfg), *expected, "{what}");
            }
        }
    }

    /// The presets table of docs/usage.md ("What each preset sets"): setting any value it
    /// lists on its preset changes nothing, so each preset is what the table says.
    #[test]
    fn each_preset_is_what_docs_usage_lists() {
        let usage = include_str!("../../docs/usage.md");
        let mut rows = usage
            .lines()
            .skip_while(|l| !l.starts_with("| key | mnist |"))
            .take_while(|l| l.starts_with('|'));
        let cells = |line: &str| -> Vec<String> {
            line.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        };
        let header = cells(rows.next().expect("docs/usage.md has the presets table"));
        assert_eq!(header[1..], PRESETS.map(String::from));
        let mut checked = 0;
        for line in rows.skip(1) {
            let row = cells(line);
            assert_eq!(row.len(), header.len(), "{line}");
            for (name, cell) in PRESETS.iter().zip(&row[1..]) {
                let value: toml::Table = toml::from_str(&format!("v = {cell}")).unwrap();
                let mut over = toml::Table::new();
                set_key(&mut over, &row[0], value["v"].clone());
                let preset = Config::preset(name).unwrap();
                let documented = preset.with_overrides(over, "docs/usage.md").unwrap();
                assert_eq!(documented, preset, "{name}: {} = {cell}", row[0]);
                checked += 1;
            }
        }
        assert_eq!(checked, 26 * PRESETS.len());
    }

    /// The saved form (a checkpoint's manifest) gives back the configuration it was given,
    /// every optional key away from its default; a manifest written before a key existed
    /// reads with that key's documented default; and a run that uses none of the later
    /// features is saved without their keys, so older builds (which refuse unknown keys)
    /// still read it.
    #[test]
    fn the_saved_form_round_trips_and_reads_older_manifests_with_the_defaults() {
        let mut cfg = Config::mnist_conditional();
        cfg.model.classes = 2;
        cfg.data.class_names = vec!["a".into(), "b".into()];
        cfg.data.path = Some("/data".into());
        cfg.train.label_dropout = 0.3;
        cfg.train.channels_last = true;
        cfg.train.min_snr_gamma = 2.0;
        cfg.train.grad_clip = Some(1.0);
        cfg.train.distributed_timeout_s = Some(60);
        cfg.train.plot_loss = false;
        cfg.sample.guidance = 1.5;
        cfg.sample.steps = Some(50);
        cfg.sample.eta = Some(0.5);
        cfg.sample.batch_size = Some(8);
        cfg.sample.sampler = Some(SamplerKind::Ddim);
        cfg.sample.spacing = crate::timesteps::Spacing::Trailing;
        cfg.sample.grid_scale = 2;
        cfg.validate().unwrap();
        let json = saved::serialize(&cfg, serde_json::value::Serializer).unwrap();
        assert_eq!(saved::deserialize(json).unwrap(), cfg);

        // label_dropout at its default is not even written.
        let mut older = serde_json::to_value(Config::mnist()).unwrap();
        for (section, key) in [
            ("train", "min_snr_gamma"),
            ("train", "label_dropout"),
            ("train", "plot_loss"),
            ("sample", "grid_scale"),
        ] {
            older[section].as_object_mut().unwrap().remove(key);
        }
        let read = saved::deserialize(older).unwrap();
        assert_eq!(
            (
                read.train.min_snr_gamma,
                read.train.label_dropout,
                read.train.plot_loss,
                read.sample.grid_scale
            ),
            (5.0, 0.1, true, 4)
        );

        let text = Config::mnist().to_toml().unwrap();
        for key in [
            "channels_last",
            "conditional",
            "label_dropout",
            "guidance",
            "sampler",
            "spacing",
        ] {
            assert!(!text.contains(&format!("\n{key} =")), "{key} in\n{text}");
        }
    }

    /// `SamplerKind::name`, which messages quote, is the value `sample.sampler` takes.
    #[test]
    fn a_sampler_kind_is_named_as_sample_sampler_takes_it() {
        for kind in [
            SamplerKind::Ancestral,
            SamplerKind::Ddim,
            SamplerKind::DpmSolver2M,
        ] {
            assert_eq!(
                toml::Value::try_from(kind).unwrap().as_str(),
                Some(kind.name())
            );
        }
    }

    /// A changed setting is named with the run's value and the saved one; keys a resumed run
    /// may change (length, decay end, data path, classes) are not differences.
    #[test]
    fn differences_name_each_changed_key_with_both_values_and_skip_the_resumable_ones() {
        let saved = Config::mnist();
        assert_eq!(saved.differences(&saved).unwrap(), vec![]);
        let mut now = saved.clone();
        now.train.lr = 0.002;
        now.train.steps = 5000;
        now.train.lr_decay.clear();
        now.data.path = Some(PathBuf::from("/elsewhere"));
        now.train.channels_last = !saved.train.channels_last;
        assert_eq!(
            now.differences(&saved).unwrap(),
            vec![(
                "train.lr".to_string(),
                "0.002".to_string(),
                "0.005".to_string()
            )]
        );
    }

    /// `.toml` and `.json` files read to the same configuration; any other name is refused;
    /// a JSON null gets the hint to leave the key out.
    #[test]
    fn a_config_file_is_read_by_its_extension_and_a_json_null_is_explained() {
        let dir = crate::data::test_dir("config_files");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let toml = write("c.toml", "[train]\nsteps = 7\n");
        let json = write("c.json", r#"{"train": {"steps": 7}}"#);
        let from_toml = Config::from_file(&toml).unwrap();
        assert_eq!(from_toml.train.steps, 7);
        assert_eq!(Config::from_file(&json).unwrap(), from_toml);
        let yaml = write("c.yaml", "train:\n  steps: 7\n");
        let err = Config::from_file(&yaml).unwrap_err().to_string();
        assert!(err.contains(".toml or .json"), "{err}");
        let null = write("n.json", r#"{"train": {"steps": null}}"#);
        let err = Config::from_file(&null).unwrap_err().to_string();
        assert!(err.contains("JSON null is not allowed"), "{err}");
    }

    /// A new T caps `train.grid_steps` only when the same overrides leave it unset: a grid
    /// length given with it is the user's and is held to the new T.
    #[test]
    fn a_new_t_caps_the_grid_steps_unless_they_are_given_too() {
        let base = Config::mnist();
        let mut both = toml::Table::new();
        set_key(&mut both, "diffusion.t_max", 20.into());
        set_key(&mut both, "train.grid_steps", 50.into());
        let err = base.with_overrides(both, "flags").unwrap_err();
        assert!(
            matches!(
                err,
                DdpmError::OutOfRange {
                    key: "train.grid_steps",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// The decay point follows the run's length only when it ends the base run, and it is
    /// dropped when the new end is not past the point before it (here the warm-up's end).
    #[test]
    fn the_decay_end_follows_only_an_end_and_only_past_the_point_before_it() {
        let mut base = Config::mnist();
        let overridden = |base: &Config, steps: i64| {
            let mut over = toml::Table::new();
            set_key(&mut over, "train.steps", steps.into());
            base.with_overrides(over, "flags").unwrap().train.lr_decay
        };
        assert_eq!(base.train.warmup_steps, 100);
        assert_eq!(
            overridden(&base, 100),
            vec![],
            "a run that ends with the warm-up"
        );
        base.train.lr_decay = vec![LrPoint {
            step: 1000,
            factor: 0.1,
        }];
        assert_eq!(
            overridden(&base, 4000),
            base.train.lr_decay,
            "a decay point inside the run is not its end"
        );
    }

    /// The sampler is the `sample` section as set: σ, steps, η, clipping and spacing carried
    /// over, DDIM's η 0 unless given, DPM-Solver++ without η.
    #[test]
    fn the_sampler_is_the_sample_section_as_set() {
        use crate::sampler::SamplerConfig;
        use crate::timesteps::Spacing;
        let mut cfg = Config::mnist();
        cfg.sample.sigma = SigmaChoice::Isotropic { data_std: 0.5 };
        cfg.sample.steps = Some(20);
        cfg.sample.eta = Some(0.3);
        cfg.sample.clip_each_step = true;
        cfg.sample.spacing = Spacing::Linspace;
        let expected = SamplerConfig {
            sigma: SigmaChoice::Isotropic { data_std: 0.5 },
            steps: Some(20),
            eta: Some(0.3),
            clip_each_step: true,
            seed: Some(4),
            spacing: Spacing::Linspace,
            ..SamplerConfig::default()
        };
        assert_eq!(cfg.sampler(Some(4)), expected);
        cfg.sample.sampler = Some(SamplerKind::Ddim);
        cfg.sample.eta = None;
        assert_eq!(cfg.sampler(Some(4)).eta, Some(0.0));
        cfg.sample.sampler = Some(SamplerKind::DpmSolver2M);
        let dpm = cfg.sampler(None);
        assert_eq!((dpm.eta, dpm.dpm_solver, dpm.seed), (None, true, None));
    }
}
