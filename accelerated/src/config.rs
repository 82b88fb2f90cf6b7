//! Run configuration: named presets, TOML/JSON files layered over a preset, validation.
//! Every section rejects unknown keys, so a misspelt option is an error, not a silent default.

use crate::error::{DdpmError, Result};
use crate::schedule::ScheduleKind;
use crate::sigma::SigmaChoice;
use crate::unet::UNetConfig;
use serde::{Deserialize, Serialize};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
}

/// The diffusion section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    /// The α_t schedule.
    pub schedule: ScheduleKind,
    /// T, the number of steps (must equal `model.t_max`).
    pub t_max: i64,
}

/// Which training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossWeight {
    /// mean_B ‖ε − ε̂‖², the article's training loss (its weight dropped).
    #[default]
    None,
    /// Loss (8) with its exact weight β_t⁴/(β̄_t² α_t² σ_t²) for the chosen σ.
    Article,
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
    /// Unweighted (`none`) or loss (8)'s exact weight (`article`).
    pub loss_weight: LossWeight,
    /// The σ_t in loss (8)'s weight when `loss_weight = "article"`.
    pub loss_sigma: SigmaChoice,
    /// Run the network in bfloat16 autocast on CUDA (weights and optimiser stay f32).
    pub bf16: bool,
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
}

/// The names of the presets.
pub const PRESETS: [&str; 3] = ["mnist", "cifar32", "celeba128"];

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
                bf16: false,
                seed: 0,
                checkpoint_every: 250,
                keep_last: 3,
                sample_every: 500,
                log_every: 10,
                skip_nonfinite: false,
                grid_steps: Some(100),
            },
            sample: SampleConfig {
                sigma: SigmaChoice::Beta,
                steps: None,
                eta: None,
                clip_each_step: true,
                n: 36,
                ema: true,
            },
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
                ..cifar.sample
            },
            ..cifar
        }
    }

    /// The preset called `name`.
    pub fn preset(name: &str) -> Result<Config> {
        match name {
            "mnist" => Ok(Config::mnist()),
            "cifar32" => Ok(Config::cifar32()),
            "celeba128" => Ok(Config::celeba128()),
            _ => Err(DdpmError::Config(format!(
                "unknown preset {name:?}; choose one of {}",
                PRESETS.join(", ")
            ))),
        }
    }

    /// Reads a TOML (`.toml`) or JSON (`.json`) file. Its optional top-level `preset` key
    /// (default `mnist`) picks the base; every other key replaces the base's value.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DdpmError::io(format!("cannot read the config file {}", path.display()), e)
        })?;
        let origin = path.display().to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Config::from_toml_str(&text, &origin),
            Some("json") => {
                let table: toml::Table = serde_json::from_str(&text).map_err(|e| {
                    DdpmError::Config(format!(
                        "{origin}: {e} (JSON null is not allowed: leave the key out)"
                    ))
                })?;
                Config::from_table(table, &origin)
            }
            _ => Err(DdpmError::Config(format!(
                "{origin}: a config file must end in .toml or .json"
            ))),
        }
    }

    /// Parses TOML text (see [`Config::from_file`]); `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| DdpmError::Config(format!("{origin}: {e}")))?;
        Config::from_table(table, origin)
    }

    fn from_table(mut table: toml::Table, origin: &str) -> Result<Config> {
        let preset = match table.remove("preset") {
            None => "mnist".to_string(),
            Some(toml::Value::String(s)) => s,
            Some(other) => {
                return Err(DdpmError::Config(format!(
                    "{origin}: `preset` must be a string, got {other}"
                )))
            }
        };
        let mut merged = toml::Table::try_from(Config::preset(&preset)?)
            .map_err(|e| DdpmError::Config(format!("cannot represent preset {preset}: {e}")))?;
        merge(&mut merged, table);
        // Parsing the merged document as text makes serde's errors quote the offending line.
        let text =
            toml::to_string(&merged).map_err(|e| DdpmError::Config(format!("{origin}: {e}")))?;
        let cfg: Config = toml::from_str(&text)
            .map_err(|e| DdpmError::Config(format!("{origin}: {}", locate(&e, &text))))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML, as written beside each checkpoint.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self)
            .map_err(|e| DdpmError::Config(format!("cannot write the configuration as TOML: {e}")))
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
        let bad = |msg: String| Err(DdpmError::Config(msg));
        self.model.validate()?;
        let (d, m, t, s) = (&self.data, &self.model, &self.train, &self.sample);
        if self.diffusion.t_max != m.t_max {
            return bad(format!(
                "diffusion.t_max = {} but model.t_max = {}: they must be the same T",
                self.diffusion.t_max, m.t_max
            ));
        }
        if d.source == DataSource::Mnist
            && (m.in_channels != 1 || !(m.image_size == 28 || m.image_size == 32))
        {
            return bad(format!(
                "MNIST is grey 28×28 (or padded to 32×32), but the model takes {}×{}×{}",
                m.in_channels, m.image_size, m.image_size
            ));
        }
        if d.source == DataSource::Folder && !(m.in_channels == 1 || m.in_channels == 3) {
            return bad(format!(
                "images have 1 (grey) or 3 (RGB) channels, not {}",
                m.in_channels
            ));
        }
        for (name, v) in [
            ("train.steps", t.steps),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.log_every", t.log_every),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if t.batch_size == 0 || t.keep_last == 0 || s.n == 0 {
            return bad("train.batch_size, train.keep_last and sample.n must be at least 1".into());
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad(format!("train.lr must be positive, got {}", t.lr));
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return bad(format!(
                "train.ema_decay must be in [0, 1), got {}",
                t.ema_decay
            ));
        }
        if t.grad_clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad(format!(
                "train.grad_clip must be positive, got {:?}",
                t.grad_clip
            ));
        }
        if t.loss_weight == LossWeight::Article && t.loss_sigma == SigmaChoice::Posterior {
            return bad("loss (8) with σ = posterior has σ_1 = 0, an infinite weight at t = 1; choose beta or isotropic".into());
        }
        if s.steps.is_some_and(|n| n == 0 || n as i64 > m.t_max) {
            return bad(format!(
                "sample.steps must be between 1 and T = {}",
                m.t_max
            ));
        }
        if t.grid_steps.is_some_and(|n| n == 0 || n as i64 > m.t_max) {
            return bad(format!(
                "train.grid_steps must be between 1 and T = {}",
                m.t_max
            ));
        }
        self.lr_schedule()?;
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
        crate::sampler::SamplerConfig {
            sigma: self.sample.sigma,
            steps: self.sample.steps,
            eta: self.sample.eta,
            clip_each_step: self.sample.clip_each_step,
            seed,
            ..Default::default()
        }
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
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .unwrap_or("the top level");
    format!("`{line}` in {section}: {}", e.message().trim())
}

/// Replaces `base`'s values by `over`'s, recursing into tables present in both.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = Config::from_toml_str("[diffusion]\nt_max = 500\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("t_max"), "{err}");
        assert!(Config::from_toml_str("preset = \"nope\"\n", "f.toml").is_err());
    }
}
