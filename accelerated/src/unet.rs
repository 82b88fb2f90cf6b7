//! The article's U-Net without attention: 3×3 conv in; levels of residual blocks with channel
//! multipliers; average-pool down, nearest up; skips joined by addition; GroupNorm → 3×3 conv
//! out. Never BatchNorm: each sample's output depends on that sample only.
//!
//! Layout, for levels ℓ = 0..L−1 with C_ℓ = base·mult_ℓ channels and N blocks a level:
//! `h = conv_in(x)`; down: at each level N blocks (each output kept as a skip), then
//! average-pool except at the last level; one middle block; up, from the last level: N blocks,
//! each followed by `h += skip` (the skip of the same level and position), then nearest
//! up-sampling except at level 0; `h += conv_in(x)`; `out = conv_out(GroupNorm(h))`.
//!
//! Residual block (in → out channels), post-norm as in the article's Keras code:
//! `h = x + W_t·temb`; `h = GN(swish(conv3×3(h)))`; dropout; `h = swish(conv3×3(h))`;
//! `y = GN(h + skip(x))`, `skip` a 1×1 conv when in ≠ out, else the identity.
//!
//! Variable names: every normalisation layer's path component starts with `norm`, so LAMB's
//! exclusion rule (see `lamb.rs`) finds them by name as well as by dimension.

use crate::error::{DdpmError, Result};
use crate::sampler::NoisePredictor;
use tch::nn;
use tch::{Kind, Tensor};

/// How the time step t enters the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeEmbedding {
    /// The article's trainable Embedding(T, base) (row t−1 for step t).
    Learned,
    /// Fixed sinusoidal features of t (dimension base) through Linear → swish → Linear
    /// (width 4·base); each row is shared by all t, which helps short runs.
    Sinusoidal,
}

/// The network's sizes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Height = width of the images.
    pub image_size: i64,
    /// Image channels (1 grey, 3 RGB).
    pub in_channels: i64,
    /// Channels of level 0 (the article's `embedding_size`).
    pub base_channels: i64,
    /// Channel multiplier of each level; the number of levels is its length.
    pub channel_mults: Vec<i64>,
    /// Residual blocks per level on each path.
    pub blocks_per_level: i64,
    /// GroupNorm groups; a layer with fewer channels uses one group per channel.
    pub groups: i64,
    /// How t enters the network.
    pub time_embedding: TimeEmbedding,
    /// Dropout probability inside residual blocks during training (0 = none).
    pub dropout: f64,
    /// T, the number of diffusion steps (rows of the learned embedding).
    pub t_max: i64,
    /// Classes K of a conditional network (0: unconditional, today's network exactly): a
    /// class embedding of K + 1 rows (the last one ∅, "no class") is added to the time
    /// embedding. Set by training from the data (`train.conditional`), not by hand.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub classes: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl UNetConfig {
    /// MNIST 28×28 grey: 32·[1, 2, 2], 1 block a level (28 → 14 → 7), 8 GroupNorm groups,
    /// sinusoidal t, T = 1000; 473,345 parameters.
    pub fn mnist() -> UNetConfig {
        UNetConfig {
            image_size: 28,
            in_channels: 1,
            base_channels: 32,
            channel_mults: vec![1, 2, 2],
            blocks_per_level: 1,
            // Not 32: one channel per group normalises away each channel's mean after every
            // block, and the network can no longer see its input's mean brightness (see
            // `presets_see_the_mean_of_their_input`); 4 channels a group, as the article's
            // 128 channels in 32 groups.
            groups: 8,
            time_embedding: TimeEmbedding::Sinusoidal,
            dropout: 0.0,
            t_max: 1000,
            classes: 0,
        }
    }

    /// CIFAR-style 32×32 RGB: 128·[1, 2, 2, 2], 2 blocks a level, sinusoidal t, dropout 0.1,
    /// T = 1000; 18,758,659 parameters.
    pub fn cifar32() -> UNetConfig {
        UNetConfig {
            image_size: 32,
            in_channels: 3,
            base_channels: 128,
            channel_mults: vec![1, 2, 2, 2],
            blocks_per_level: 2,
            dropout: 0.1,
            ..UNetConfig::mnist()
        }
    }

    /// The article's CelebA-HQ 128×128 RGB: 128·[1, 1, 2, 2, 4, 4], 2 blocks a level,
    /// learned Embedding(T, 128), T = 1000; 55,019,779 parameters.
    pub fn celeba128() -> UNetConfig {
        UNetConfig {
            image_size: 128,
            in_channels: 3,
            base_channels: 128,
            channel_mults: vec![1, 1, 2, 2, 4, 4],
            blocks_per_level: 2,
            groups: 32,
            time_embedding: TimeEmbedding::Learned,
            dropout: 0.0,
            t_max: 1000,
            classes: 0,
        }
    }

    /// The preset called `name` (`mnist`, `cifar32`, `celeba128`).
    pub fn preset(name: &str) -> Result<UNetConfig> {
        match name {
            "mnist" => Ok(UNetConfig::mnist()),
            "cifar32" => Ok(UNetConfig::cifar32()),
            "celeba128" => Ok(UNetConfig::celeba128()),
            _ => Err(DdpmError::OutOfRange {
                key: "preset",
                value: format!("{name:?}"),
                expected: "one of mnist, cifar32 or celeba128".into(),
            }),
        }
    }

    /// Channels of each level, C_ℓ = base · mult_ℓ.
    pub fn level_channels(&self) -> Vec<i64> {
        self.channel_mults
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// Groups used by a GroupNorm over `channels` channels: min(groups, channels).
    pub fn groups_for(&self, channels: i64) -> i64 {
        self.groups.min(channels)
    }

    /// Width of the time embedding fed to every block.
    pub fn time_dim(&self) -> i64 {
        match self.time_embedding {
            TimeEmbedding::Learned => self.base_channels,
            TimeEmbedding::Sinusoidal => 4 * self.base_channels,
        }
    }

    /// Refuses a network whose weights and schedule would not fit in `device`'s memory, naming
    /// the setting that makes it large (see [`crate::memory`]).
    pub fn check_memory(&self, device: tch::Device) -> Result<()> {
        let key = crate::memory::model_key(self);
        let what = format!(
            "the network ({} parameters)",
            crate::memory::parameter_count(self).map_or("over 2^64".into(), |n| n.to_string())
        );
        crate::memory::check(&what, crate::memory::model_bytes(self), key, device)
    }

    /// Checks that the network can be built, with a message saying what to change.
    pub fn validate(&self) -> Result<()> {
        // Keys are the settings' config keys (`model.…`, the section this config is read from).
        let out_of_range = |key: &'static str, value: String, expected: &str| {
            Err(DdpmError::OutOfRange {
                key,
                value,
                expected: expected.to_string(),
            })
        };
        if self.channel_mults.is_empty() {
            return out_of_range(
                "model.channel_mults",
                "[]".into(),
                "at least one level (channel multiplier)",
            );
        }
        for (key, what, v) in [
            ("model.image_size", "image size", self.image_size),
            ("model.in_channels", "input channels", self.in_channels),
            ("model.base_channels", "base channels", self.base_channels),
            (
                "model.blocks_per_level",
                "blocks per level",
                self.blocks_per_level,
            ),
            ("model.groups", "groups", self.groups),
            ("model.t_max", "T", self.t_max),
        ] {
            if v < 1 {
                // The message keeps the words it had ("T must be at least 1, got 0").
                return Err(DdpmError::Incompatible {
                    key,
                    other: "the network".into(),
                    reason: format!("{what} must be at least 1, got {v}"),
                });
            }
        }
        if self.channel_mults.iter().any(|&m| m < 1) {
            return out_of_range(
                "model.channel_mults",
                format!("{:?}", self.channel_mults),
                "a list of multipliers, each at least 1",
            );
        }
        let downs = self.channel_mults.len() as u32 - 1;
        let factor = 1i64.checked_shl(downs).unwrap_or(i64::MAX);
        if self.image_size % factor != 0 {
            return Err(DdpmError::Incompatible {
                key: "model.image_size",
                other: "model.channel_mults".into(),
                reason: format!(
                    "image size {} must be divisible by 2^{downs} = {factor} for {} levels",
                    self.image_size,
                    downs + 1
                ),
            });
        }
        // Each level's width base · mult (and the time features' 4 · base) must be countable:
        // in a release build an overflowing product wrapped (to 0, then a division by zero
        // below); found while fuzzing configs (issue 14, item 9).
        if let Some(&m) = self.channel_mults.iter().find(|&&m| {
            m.checked_mul(self.base_channels)
                .and_then(|c| c.checked_mul(4))
                .is_none()
        }) {
            return Err(DdpmError::Incompatible {
                key: "model.base_channels",
                other: "model.channel_mults".into(),
                reason: format!(
                    "a level of {} × {m} channels is too wide to count (at most {} channels a level)",
                    self.base_channels,
                    i64::MAX / 4
                ),
            });
        }
        for c in self.level_channels() {
            let g = self.groups_for(c);
            if c % g != 0 {
                return Err(DdpmError::Incompatible {
                    key: "model.groups",
                    other: "model.base_channels, model.channel_mults".into(),
                    reason: format!("{c} channels cannot be split into {g} GroupNorm groups"),
                });
            }
        }
        if self.time_embedding == TimeEmbedding::Sinusoidal && self.base_channels % 2 != 0 {
            return Err(DdpmError::Incompatible {
                key: "model.base_channels",
                other: "model.time_embedding = sinusoidal".into(),
                reason: format!(
                    "sinusoidal time features need an even base channel count, got {}",
                    self.base_channels
                ),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return out_of_range("model.dropout", self.dropout.to_string(), "in [0, 1)");
        }
        if self.classes < 0 {
            return out_of_range(
                "model.classes",
                self.classes.to_string(),
                "0 (unconditional) or the number of classes",
            );
        }
        Ok(())
    }
}

#[derive(Debug)]
enum TimeNet {
    Learned(nn::Embedding),
    Sinusoidal {
        half: i64,
        mlp1: nn::Linear,
        mlp2: nn::Linear,
    },
}

impl TimeNet {
    fn new(p: &nn::Path, cfg: &UNetConfig) -> TimeNet {
        let c = cfg.base_channels;
        match cfg.time_embedding {
            TimeEmbedding::Learned => TimeNet::Learned(nn::embedding(
                p / "embedding",
                cfg.t_max,
                c,
                Default::default(),
            )),
            TimeEmbedding::Sinusoidal => TimeNet::Sinusoidal {
                half: c / 2,
                mlp1: nn::linear(p / "mlp1", c, 4 * c, Default::default()),
                mlp2: nn::linear(p / "mlp2", 4 * c, 4 * c, Default::default()),
            },
        }
    }

    /// [B, time_dim] embedding of t (Int64 [B]).
    fn forward(&self, t: &Tensor, kind: Kind) -> Result<Tensor> {
        match self {
            TimeNet::Learned(emb) => Ok(Tensor::f_embedding(
                &emb.ws,
                &t.f_sub_scalar(1)?,
                -1,
                false,
                false,
            )?),
            TimeNet::Sinusoidal { half, mlp1, mlp2 } => {
                // Frequencies 10000^(−i/half), i = 0..half, as in the Transformer. Computed
                // in f32 at least: bfloat16 holds integers exactly only up to 256 (t = 999
                // would round to 1000) and its sines of large arguments are noise.
                let exact = match kind {
                    Kind::BFloat16 | Kind::Half => Kind::Float,
                    k => k,
                };
                let i = Tensor::f_arange(*half, (exact, t.device()))?;
                let freq = i.f_mul_scalar(-(10000f64.ln()) / *half as f64)?.f_exp()?;
                let args = t
                    .f_to_kind(exact)?
                    .f_unsqueeze(1)?
                    .f_mul(&freq.f_unsqueeze(0)?)?;
                let feats = Tensor::f_cat(&[args.f_sin()?, args.f_cos()?], 1)?.f_to_kind(kind)?;
                linear(mlp2, &linear(mlp1, &feats)?.f_silu()?)
            }
        }
    }
}

/// `layer.forward(x)` of tch's `Linear`, as a `Result`.
fn linear(layer: &nn::Linear, x: &Tensor) -> Result<Tensor> {
    Ok(x.f_linear(&layer.ws, layer.bs.as_ref())?)
}

/// `layer.forward(x)` of a stride-1 `Conv2D` padded by `padding` (as built here), as a `Result`.
fn conv(layer: &nn::Conv2D, padding: i64, x: &Tensor) -> Result<Tensor> {
    Ok(x.f_conv2d(
        &layer.ws,
        layer.bs.as_ref(),
        [1, 1],
        [padding, padding],
        [1, 1],
        1,
    )?)
}

/// `layer.forward(x)` of tch's `GroupNorm` with its default settings (eps 1e-5, cuDNN on), as
/// a `Result`.
fn group_norm(layer: &nn::GroupNorm, x: &Tensor) -> Result<Tensor> {
    Ok(x.f_group_norm(
        layer.num_groups,
        layer.ws.as_ref(),
        layer.bs.as_ref(),
        1e-5,
        true,
    )?)
}

fn conv3(p: nn::Path, c_in: i64, c_out: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        c_in,
        c_out,
        3,
        nn::ConvConfig {
            padding: 1,
            ..Default::default()
        },
    )
}

fn norm(p: nn::Path, cfg: &UNetConfig, channels: i64) -> nn::GroupNorm {
    nn::group_norm(p, cfg.groups_for(channels), channels, Default::default())
}

#[derive(Debug)]
struct ResBlock {
    time_proj: nn::Linear,
    conv1: nn::Conv2D,
    norm1: nn::GroupNorm,
    conv2: nn::Conv2D,
    norm2: nn::GroupNorm,
    skip: Option<nn::Conv2D>,
    dropout: f64,
}

impl ResBlock {
    fn new(p: &nn::Path, cfg: &UNetConfig, c_in: i64, c_out: i64) -> ResBlock {
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        ResBlock {
            time_proj: nn::linear(p / "time_proj", cfg.time_dim(), c_in, no_bias),
            conv1: conv3(p / "conv1", c_in, c_out),
            norm1: norm(p / "norm1", cfg, c_out),
            conv2: conv3(p / "conv2", c_out, c_out),
            norm2: norm(p / "norm2", cfg, c_out),
            skip: (c_in != c_out)
                .then(|| nn::conv2d(p / "skip", c_in, c_out, 1, Default::default())),
            dropout: cfg.dropout,
        }
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, train: bool) -> Result<Tensor> {
        let shift = linear(&self.time_proj, temb)?
            .f_unsqueeze(-1)?
            .f_unsqueeze(-1)?;
        let h = group_norm(
            &self.norm1,
            &conv(&self.conv1, 1, &x.f_add(&shift)?)?.f_silu()?,
        )?;
        let h = h.f_dropout(self.dropout, train && self.dropout > 0.0)?;
        let h = conv(&self.conv2, 1, &h)?.f_silu()?;
        let skip = match &self.skip {
            Some(layer) => conv(layer, 0, x)?,
            None => x.shallow_clone(),
        };
        group_norm(&self.norm2, &h.f_add(&skip)?)
    }
}

/// The blocks of one level under `p`: the first takes `*c` channels to `c_level`, the rest keep
/// `c_level`, and `*c` is left at `c_level` for whatever comes next.
fn level_blocks(p: &nn::Path, cfg: &UNetConfig, c: &mut i64, c_level: i64) -> Vec<ResBlock> {
    (0..cfg.blocks_per_level)
        .map(|j| {
            let block = ResBlock::new(&(p / j), cfg, *c, c_level);
            *c = c_level;
            block
        })
        .collect()
}

/// The U-Net ε̂(x_t, t).
#[derive(Debug)]
pub struct UNet {
    cfg: UNetConfig,
    time: TimeNet,
    conv_in: nn::Conv2D,
    down: Vec<Vec<ResBlock>>,
    mid: ResBlock,
    up: Vec<Vec<ResBlock>>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    /// Conditional networks only: Embedding(K + 1, time_dim), row K = ∅.
    class_embedding: Option<nn::Embedding>,
}

impl UNet {
    /// Builds the network's variables under `p` (normally `vs.root()`).
    pub fn new(p: &nn::Path, cfg: &UNetConfig) -> Result<UNet> {
        cfg.validate()?;
        cfg.check_memory(p.device())?;
        let chans = cfg.level_channels();
        let c0 = chans[0];
        let mut c = c0;
        let down = chans
            .iter()
            .enumerate()
            .map(|(l, &c_level)| level_blocks(&(p / "down" / l), cfg, &mut c, c_level))
            .collect();
        let mid = ResBlock::new(&(p / "mid"), cfg, c, c);
        let up = chans
            .iter()
            .enumerate()
            .rev()
            .map(|(l, &c_level)| level_blocks(&(p / "up" / l), cfg, &mut c, c_level))
            .collect();
        let time = TimeNet::new(&(p / "time"), cfg);
        let conv_in = conv3(p / "conv_in", cfg.in_channels, c0);
        let norm_out = norm(p / "norm_out", cfg, c0);
        let conv_out = conv3(p / "conv_out", c0, cfg.in_channels);
        // Built last, so a conditional network's other weights start as the unconditional
        // network's of the same seed; absent (no variable at all) when unconditional.
        let class_embedding = (cfg.classes > 0).then(|| {
            nn::embedding(
                p / "class" / "embedding",
                cfg.classes + 1,
                cfg.time_dim(),
                Default::default(),
            )
        });
        Ok(UNet {
            time,
            conv_in,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            class_embedding,
            cfg: cfg.clone(),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Checks that x is [B, in_channels, size, size].
    pub fn check_shape(&self, shape: &[i64]) -> Result<()> {
        let c = &self.cfg;
        if shape.len() == 4 && shape[1..] == [c.in_channels, c.image_size, c.image_size] {
            Ok(())
        } else {
            Err(DdpmError::ShapeMismatch {
                what: "x_t",
                expected: format!(
                    "images [B, {}, {}, {}], what the network takes",
                    c.in_channels, c.image_size, c.image_size
                ),
                got: shape.to_vec(),
            })
        }
    }

    /// ε̂(x_t, t) for x_t [B, C, H, W] and t Int64 [B] (values 1..=T); `train` turns dropout
    /// on. Computes in the weights' kind and returns x_t's kind.
    /// A conditional network predicts for ∅ ("no class") here.
    pub fn forward_t(&self, x_t: &Tensor, t: &Tensor, train: bool) -> Result<Tensor> {
        self.forward(x_t, t, None, train)
    }

    /// ε̂(x_t, t, y) for labels y Int64 [B] with values 0..=K (K = `model.classes`, the value
    /// K meaning ∅); `train` turns dropout on. The values are not read back (training's labels
    /// come from the data; [`ConditionalPredictor::predict_class`] checks them).
    pub fn forward_class(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        y: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        if self.class_embedding.is_none() {
            return Err(DdpmError::NotConditional {
                what: "the network".into(),
                reason: "model.classes = 0: it was built without a class embedding".into(),
                advice: "train it with train.conditional = true".into(),
            });
        }
        let b = *x_t.size().first().unwrap_or(&0);
        if y.size() != [b] || y.kind() != Kind::Int64 {
            return Err(DdpmError::ShapeMismatch {
                what: "y",
                expected: format!(
                    "Int64 labels [{b}], one per sample (got kind {:?})",
                    y.kind()
                ),
                got: y.size(),
            });
        }
        self.forward(x_t, t, Some(y), train)
    }

    /// The classes K (0 for an unconditional network).
    pub fn class_count(&self) -> usize {
        self.cfg.classes.max(0) as usize
    }

    fn forward(&self, x_t: &Tensor, t: &Tensor, y: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.check_shape(&x_t.size())?;
        crate::schedule::check_t(t, x_t)?;
        let kind = self.conv_in.ws.kind();
        let x = x_t.f_to_kind(kind)?;
        // A network laid out channels-last ([`to_channels_last`]: its first weight has the
        // NHWC strides, not the NCHW ones) takes its input in the same layout, so that no
        // convolution converts between the two; any other network gets its input as it comes.
        let w = &self.conv_in.ws;
        let x = if w.stride() == nhwc_strides(&w.size()) && w.stride() != nchw_strides(&w.size()) {
            channels_last(&x)?
        } else {
            x
        };
        let mut temb = self.time.forward(t, kind)?;
        if let Some(emb) = &self.class_embedding {
            let y = match y {
                Some(y) => y.f_to_device(x.device())?,
                None => Tensor::f_full(
                    [*x_t.size().first().unwrap_or(&0)],
                    self.cfg.classes,
                    (Kind::Int64, x.device()),
                )?,
            };
            let cemb = Tensor::f_embedding(&emb.ws, &y, -1, false, false)?;
            temb = temb.f_add(&cemb.f_to_kind(temb.kind())?)?;
        }
        let h0 = conv(&self.conv_in, 1, &x)?;
        let mut skips = Vec::new();
        let mut h = h0.shallow_clone();
        let last = self.down.len() - 1;
        for (level, blocks) in self.down.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h, &temb, train)?;
                skips.push(h.shallow_clone());
            }
            if level != last {
                h = h.f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)?;
            }
        }
        h = self.mid.forward(&h, &temb, train)?;
        for (i, blocks) in self.up.iter().enumerate() {
            for block in blocks {
                // Pushed in the mirror order, so the pop is the same level and position.
                let skip = skips.pop().ok_or_else(|| DdpmError::ShapeMismatch {
                    what: "the U-Net's skips",
                    expected: "one skip per down block".into(),
                    got: vec![],
                })?;
                h = block.forward(&h, &temb, train)?.f_add(&skip)?;
            }
            if i != last {
                let (hh, ww) = (h.size()[2], h.size()[3]);
                h = h.f_upsample_nearest2d([2 * hh, 2 * ww], None::<f64>, None::<f64>)?;
            }
        }
        let out = conv(
            &self.conv_out,
            1,
            &group_norm(&self.norm_out, &h.f_add(&h0)?)?,
        )?;
        Ok(out.f_to_kind(x_t.kind())?)
    }
}

impl NoisePredictor for UNet {
    /// The shape error if `x_t` does not fit (`check_input` reports it before sampling).
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.forward_t(x_t, t, false)
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        self.check_shape(shape)
    }

    fn bytes_per_sample(&self) -> Option<u64> {
        crate::memory::sampling_bytes_per_image(&self.cfg)
    }
}

impl crate::guidance::ConditionalPredictor for UNet {
    /// An error unless the network is conditional and every label lies in 0..=K (read back:
    /// one small copy a call).
    fn predict_class(&self, x_t: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        if self.class_embedding.is_some() && y.numel() > 0 && y.kind() == Kind::Int64 {
            let k = self.cfg.classes;
            let bad = y.f_lt(0)?.f_logical_or(&y.f_gt(k)?)?.f_any()?;
            if bool::try_from(&bad)? {
                return Err(DdpmError::OutOfRange {
                    key: "y",
                    value: format!(
                        "{:?}",
                        Vec::<i64>::try_from(y.f_to_device(tch::Device::Cpu)?)?
                    ),
                    expected: format!("labels from 0 to {k} ({k} = no class)"),
                });
            }
        }
        self.forward_class(x_t, t, y, false)
    }

    /// The labels' shape and kind are still checked; their values are not read back.
    fn predict_class_prechecked(&self, x_t: &Tensor, t: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.forward_class(x_t, t, y, false)
    }

    fn classes(&self) -> usize {
        self.class_count()
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        self.check_shape(shape)
    }

    fn bytes_per_sample(&self) -> Option<u64> {
        crate::memory::sampling_bytes_per_image(&self.cfg)
    }
}

/// `t` (4-D, [N, C, H, W]) with channels-last strides (H·W·C, 1, W·C, C) — NHWC in memory,
/// NCHW in shape — the values unchanged: PyTorch's `.to(memory_format=torch.channels_last)`,
/// which tch lacks. The strides are set explicitly, size-1 dimensions included (a permuted
/// copy would keep the old ones there, and cuDNN would read [N, 1, H, W] as NCHW).
pub fn channels_last(t: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = t.size()[..] else {
        return Err(DdpmError::ShapeMismatch {
            what: "a channels-last tensor",
            expected: "4 dimensions [N, C, H, W]".into(),
            got: t.size(),
        });
    };
    // Dense NHWC memory, then seen as [N, C, H, W] with NHWC strides.
    let nhwc = t.f_permute([0, 2, 3, 1])?.f_contiguous()?;
    let size = [n, c, h, w];
    Ok(nhwc.f_as_strided(size, nhwc_strides(&size), None)?)
}

/// The strides (H·W·C, 1, W·C, C) of a dense [N, C, H, W] tensor stored NHWC (none unless 4-D).
fn nhwc_strides(size: &[i64]) -> Vec<i64> {
    match size[..] {
        [_, c, h, w] => vec![h * w * c, 1, w * c, c],
        _ => Vec::new(),
    }
}

/// The strides (C·H·W, H·W, W, 1) of a dense [N, C, H, W] tensor stored NCHW (none unless 4-D).
fn nchw_strides(size: &[i64]) -> Vec<i64> {
    match size[..] {
        [_, c, h, w] => vec![c * h * w, h * w, w, 1],
        _ => Vec::new(),
    }
}

/// Whether `t` is 4-D and laid out as [`channels_last`] lays it out: strides (H·W·C, 1, W·C,
/// C) in every dimension of more than one element (the stride of a size-1 dimension is never
/// used to address memory, so a 1×1 kernel [O, I, 1, 1] is both layouts at once).
pub fn is_channels_last(t: &Tensor) -> bool {
    match t.size()[..] {
        [n, c, h, w] => [n, c, h, w]
            .iter()
            .zip(t.stride())
            .zip([h * w * c, 1, w * c, c])
            .all(|((&size, got), want)| size == 1 || got == want),
        _ => false,
    }
}

/// Lays every 4-D variable of `vs` (the convolutions' weights) out channels-last, values
/// unchanged, so that cuDNN can run the network in NHWC (`train.channels_last`, `ddpm sample
/// --channels-last`); [`UNet`] then gives its input the same layout. Call it before anything
/// takes views of the variables (LAMB's and the EMA's flat buffers keep the layout they find).
pub fn to_channels_last(vs: &nn::VarStore) -> Result<()> {
    tch::no_grad(|| {
        for (_, mut w) in vs.variables() {
            // A kernel that is both layouts (one input channel, or 1×1) is left as it is.
            if w.dim() == 4 && !is_channels_last(&w) {
                w.set_data(&channels_last(&w)?);
            }
        }
        Ok(())
    })
}

/// Number of scalar parameters in a variable store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|v| v.numel() as i64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn build(cfg: &UNetConfig) -> (nn::VarStore, UNet) {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = UNet::new(&vs.root(), cfg).unwrap();
        (vs, net)
    }

    fn tiny() -> UNetConfig {
        UNetConfig {
            image_size: 8,
            in_channels: 2,
            base_channels: 8,
            channel_mults: vec![1, 2],
            blocks_per_level: 2,
            groups: 4,
            ..UNetConfig::mnist()
        }
    }

    /// The parameter count the layout in the module doc implies, derived independently.
    fn expected_count(cfg: &UNetConfig) -> i64 {
        let conv = |i: i64, o: i64, k: i64| i * o * k * k + o;
        let gn = |c: i64| 2 * c;
        let e = cfg.time_dim();
        let block = |i: i64, o: i64| {
            e * i
                + conv(i, o, 3)
                + conv(o, o, 3)
                + 2 * gn(o)
                + if i != o { conv(i, o, 1) } else { 0 }
        };
        let b = cfg.base_channels;
        let time = match cfg.time_embedding {
            TimeEmbedding::Learned => cfg.t_max * b,
            TimeEmbedding::Sinusoidal => (b * 4 * b + 4 * b) + (4 * b * 4 * b + 4 * b),
        };
        let chans = cfg.level_channels();
        let classes = if cfg.classes > 0 {
            (cfg.classes + 1) * e
        } else {
            0
        };
        let mut total =
            time + classes + conv(cfg.in_channels, b, 3) + gn(b) + conv(b, cfg.in_channels, 3);
        let mut c = b;
        for &cl in &chans {
            for _ in 0..cfg.blocks_per_level {
                total += block(c, cl);
                c = cl;
            }
        }
        total += block(c, c);
        for &cl in chans.iter().rev() {
            for _ in 0..cfg.blocks_per_level {
                total += block(c, cl);
                c = cl;
            }
        }
        total
    }

    #[test]
    fn preset_parameter_counts() {
        let _rng = crate::sampler::rng_lock();
        // mnist 473,345; cifar32 18,758,659; celeba128 55,019,779 (printed with --nocapture).
        for name in ["mnist", "cifar32", "celeba128"] {
            let cfg = UNetConfig::preset(name).unwrap();
            let vs = nn::VarStore::new(Device::Cpu);
            UNet::new(&vs.root(), &cfg).unwrap();
            let n = parameter_count(&vs);
            println!("{name}: {n} parameters");
            assert_eq!(n, expected_count(&cfg), "{name}");
        }
        assert_eq!(expected_count(&tiny()), parameter_count(&build(&tiny()).0));
        let three = UNetConfig {
            classes: 3,
            ..tiny()
        };
        assert_eq!(expected_count(&three), parameter_count(&build(&three).0));
        assert_eq!(
            parameter_count(&build(&three).0) - parameter_count(&build(&tiny()).0),
            4 * tiny().time_dim(),
            "K + 1 = 4 rows of the time embedding's width"
        );
    }

    /// An unconditional configuration builds exactly today's network: the same variable names
    /// and shapes and, from the same seed, the same initial weights; a conditional one adds
    /// only `class.embedding` and leaves every other initial weight as it was.
    #[test]
    fn unconditional_networks_are_unchanged_and_conditional_ones_add_one_embedding() {
        let _rng = crate::sampler::rng_lock();
        let weights = |cfg: &UNetConfig| {
            tch::manual_seed(5);
            let (vs, _) = build(cfg);
            let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let plain = weights(&tiny());
        assert!(plain.iter().all(|(n, _)| !n.starts_with("class")));
        let conditional = weights(&UNetConfig {
            classes: 2,
            ..tiny()
        });
        let (extra, rest): (Vec<_>, Vec<_>) = conditional
            .into_iter()
            .partition(|(n, _)| n.starts_with("class"));
        assert_eq!(extra.len(), 1);
        assert_eq!(
            (extra[0].0.as_str(), extra[0].1.size()),
            ("class.embedding.weight", vec![3, tiny().time_dim()])
        );
        assert_eq!(rest.len(), plain.len());
        for ((na, a), (nb, b)) in rest.iter().zip(&plain) {
            assert!(na == nb && a.equal(b), "{na}");
        }
        // The serialised configuration of an unconditional network has no `classes` key.
        let text = toml::to_string(&tiny()).unwrap();
        assert!(!text.contains("classes"), "{text}");
    }

    #[test]
    fn the_class_changes_the_output_and_no_class_is_the_plain_prediction() {
        use crate::guidance::ConditionalPredictor;
        let _rng = crate::sampler::rng_lock();
        tch::manual_seed(3);
        let (_vs, net) = build(&UNetConfig {
            classes: 2,
            ..tiny()
        });
        let x = Tensor::randn([1, 2, 8, 8], (Kind::Float, Device::Cpu)).repeat([3, 1, 1, 1]);
        let t = Tensor::from_slice(&[40i64, 40, 40]);
        let y = Tensor::from_slice(&[0i64, 1, 2]);
        let out = net.predict_class(&x, &t, &y).unwrap();
        assert!(net
            .predict_class_prechecked(&x, &t, &y)
            .unwrap()
            .equal(&out));
        let diff = |i: i64, j: i64| f64::try_from((out.get(i) - out.get(j)).abs().max()).unwrap();
        assert!(
            diff(0, 1) > 1e-3 && diff(0, 2) > 1e-3,
            "{} {}",
            diff(0, 1),
            diff(0, 2)
        );
        let plain = net.predict(&x, &t).unwrap();
        assert!(plain.get(0).equal(&out.get(2)), "∅ is label K");
        assert_eq!(net.classes(), 2);
        let bad = net.predict_class(&x, &t, &Tensor::from_slice(&[0i64, 3, 1]));
        assert!(
            matches!(bad, Err(DdpmError::OutOfRange { key: "y", .. })),
            "{bad:?}"
        );
        let short = net.predict_class(&x, &t, &Tensor::from_slice(&[0i64, 1]));
        assert!(matches!(
            short,
            Err(DdpmError::ShapeMismatch { what: "y", .. })
        ));
        let (_vs, plain_net) = build(&tiny());
        let err = plain_net.predict_class(&x, &t, &y).unwrap_err();
        assert!(matches!(err, DdpmError::NotConditional { .. }), "{err}");
    }

    #[test]
    fn output_has_the_input_shape_and_kind() {
        let _rng = crate::sampler::rng_lock();
        let (_vs, net) = build(&tiny());
        let x = Tensor::randn([3, 2, 8, 8], (Kind::Double, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 500, 1000]);
        let y = net.predict(&x, &t).unwrap();
        assert_eq!((y.size(), y.kind()), (x.size(), Kind::Double));
        assert!(net.forward_t(&x.narrow(2, 0, 4), &t, false).is_err());
        assert!(net.forward_t(&x, &t.narrow(0, 0, 2), false).is_err());
        // As a noise predictor too: a misfit batch is an error, not a panic.
        assert!(net.predict(&x.narrow(2, 0, 4), &t).is_err());
        assert!(net.predict(&x, &t.narrow(0, 0, 2)).is_err());
    }

    #[test]
    fn samples_do_not_influence_each_other() {
        let _rng = crate::sampler::rng_lock();
        for time_embedding in [TimeEmbedding::Learned, TimeEmbedding::Sinusoidal] {
            let (_vs, net) = build(&UNetConfig {
                time_embedding,
                ..tiny()
            });
            let x = Tensor::randn([4, 2, 8, 8], (Kind::Float, Device::Cpu));
            let t = Tensor::from_slice(&[3i64, 70, 700, 999]);
            let whole = net.predict(&x, &t).unwrap();
            let alone = net.predict(&x.narrow(0, 2, 1), &t.narrow(0, 2, 1)).unwrap();
            // Same arithmetic on a smaller batch; only float reassociation may differ.
            let diff = f64::try_from((whole.narrow(0, 2, 1) - alone).abs().max()).unwrap();
            assert!(diff < 1e-5, "{time_embedding:?}: {diff}");
        }
    }

    #[test]
    fn time_changes_the_output() {
        let _rng = crate::sampler::rng_lock();
        for time_embedding in [TimeEmbedding::Learned, TimeEmbedding::Sinusoidal] {
            let (_vs, net) = build(&UNetConfig {
                time_embedding,
                ..tiny()
            });
            let x = Tensor::randn([1, 2, 8, 8], (Kind::Float, Device::Cpu)).repeat([2, 1, 1, 1]);
            let y = net.predict(&x, &Tensor::from_slice(&[10i64, 900])).unwrap();
            let diff = f64::try_from((y.get(0) - y.get(1)).abs().max()).unwrap();
            assert!(diff > 1e-3, "{time_embedding:?}: {diff}");
        }
    }

    /// Channels-last weights (and so input) compute the same ε̂: only the order of the
    /// convolutions' f32 sums may differ (|ε̂| is O(1), 1e-4 is ~1000 f32 ulps, while a layout
    /// bug, channels read as pixels, changes ε̂ by O(1)).
    #[test]
    fn a_channels_last_network_predicts_the_same_noise() {
        let _rng = crate::sampler::rng_lock();
        let (vs, net) = build(&tiny());
        let x = Tensor::randn([3, 2, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 500, 1000]);
        let before = net.predict(&x, &t).unwrap();
        to_channels_last(&vs).unwrap();
        let four_d: Vec<Tensor> = vs
            .variables()
            .into_values()
            .filter(|w| w.dim() == 4)
            .collect();
        assert!(!four_d.is_empty() && four_d.iter().all(is_channels_last));
        assert!(!is_channels_last(&x) && is_channels_last(&channels_last(&x).unwrap()));
        // A 1×1 convolution's weight [O, I, 1, 1] is both layouts at once; a grey input or
        // kernel [N, 1, H, W] gets the exact NHWC strides, its size-1 one included.
        let one = Tensor::randn([4, 3, 1, 1], (Kind::Float, Device::Cpu));
        assert!(is_channels_last(&one) && is_channels_last(&channels_last(&one).unwrap()));
        let grey = Tensor::randn([4, 1, 3, 3], (Kind::Float, Device::Cpu));
        let grey_nhwc = channels_last(&grey).unwrap();
        assert_eq!(grey_nhwc.stride(), [9, 1, 3, 1]);
        assert!(grey_nhwc.equal(&grey));
        let wide = Tensor::randn([4, 3, 1, 2], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&wide) && is_channels_last(&channels_last(&wide).unwrap()));
        let after = net.predict(&x, &t).unwrap();
        let diff = f64::try_from((&after - &before).abs().max()).unwrap();
        assert!(diff < 1e-4, "channels-last changed ε̂ by {diff}");
        // What comes back is what x's layout-free shape and kind say.
        assert_eq!((after.size(), after.kind()), (x.size(), Kind::Float));
    }

    /// Weights cast to bfloat16 compute ε̂ in bf16, returned in f32: within bf16's precision
    /// of the f32 network (unit roundoff 2^−9 ≈ 0.002 an operation; 0.05 of ε̂'s scale over the
    /// tiny net's dozen layers, measured 0.007), yet not equal to it. The time features stay
    /// f32: in bf16, t = 999 rounds to 1000 and the two steps would get the same ε̂.
    #[test]
    fn bfloat16_weights_stay_near_the_f32_network_and_tell_every_step_apart() {
        let _rng = crate::sampler::rng_lock();
        let (mut vs, net) = build(&UNetConfig {
            time_embedding: TimeEmbedding::Sinusoidal,
            ..tiny()
        });
        let x = Tensor::randn([1, 2, 8, 8], (Kind::Float, Device::Cpu)).repeat([2, 1, 1, 1]);
        let t = Tensor::from_slice(&[999i64, 1000]);
        let f32_eps = net.predict(&x, &t).unwrap();
        vs.bfloat16();
        assert_eq!(net.conv_in.ws.kind(), Kind::BFloat16);
        let bf16_eps = net.predict(&x, &t).unwrap();
        assert_eq!(bf16_eps.kind(), Kind::Float);
        let scale = f64::try_from(f32_eps.abs().max()).unwrap();
        let diff = f64::try_from((&bf16_eps - &f32_eps).abs().max()).unwrap();
        assert!(
            diff > 0.0 && diff < 0.05 * scale,
            "bf16 off by {diff} at scale {scale}"
        );
        let apart = f64::try_from((bf16_eps.get(0) - bf16_eps.get(1)).abs().max()).unwrap();
        assert!(apart > 0.0, "t = 999 and t = 1000 gave the same ε̂ in bf16");
    }

    #[test]
    fn invalid_configurations_are_explained() {
        let odd = UNetConfig {
            image_size: 30,
            channel_mults: vec![1, 2, 2],
            ..UNetConfig::mnist()
        };
        assert!(matches!(
            odd.validate(),
            Err(DdpmError::Incompatible {
                key: "model.image_size",
                ..
            })
        ));
        let groups = UNetConfig {
            base_channels: 48,
            groups: 32,
            ..UNetConfig::mnist()
        };
        assert!(matches!(
            groups.validate(),
            Err(DdpmError::Incompatible {
                key: "model.groups",
                ..
            })
        ));
        let small = UNetConfig {
            base_channels: 16,
            groups: 32,
            ..UNetConfig::mnist()
        };
        assert!(small.validate().is_ok());
        assert!(matches!(
            UNetConfig::preset("imagenet"),
            Err(DdpmError::OutOfRange { key: "preset", .. })
        ));
    }

    #[test]
    fn gradients_reach_every_parameter() {
        let _rng = crate::sampler::rng_lock();
        let (vs, net) = build(&tiny());
        let x = Tensor::randn([2, 2, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[5i64, 6]);
        net.forward_t(&x, &t, true)
            .unwrap()
            .square()
            .sum(Kind::Float)
            .backward();
        for (name, v) in vs.variables() {
            let g = v.grad();
            if name.starts_with("time.embedding") {
                continue; // only the rows of the t's used receive gradient
            }
            assert!(
                f64::try_from(g.abs().sum(Kind::Float)).unwrap() > 0.0,
                "{name}"
            );
        }
    }

    /// The mean of ε over pixels is part of what the network must predict: at large t,
    /// E[mean ε | x_t] ≈ mean x_t, and a sampler whose ε̂ ignores it lets the image's mean
    /// brightness drift by up to 1/ᾱ_T over the chain (grey and white frames). GroupNorm with one
    /// channel per group removes every channel's spatial mean after every block, so such a
    /// network is nearly blind to a constant shift of its input; each preset must not be.
    #[test]
    fn presets_see_the_mean_of_their_input() {
        let _rng = crate::sampler::rng_lock();
        let response = |cfg: &UNetConfig| {
            tch::manual_seed(11);
            let (_vs, net) = build(cfg);
            let s = cfg.image_size;
            let x = Tensor::randn([4, cfg.in_channels, s, s], (Kind::Float, Device::Cpu));
            let t = Tensor::full([4], 500, (Kind::Int64, Device::Cpu));
            let shift = 0.1;
            let d = net.predict(&(&x + shift), &t).unwrap() - net.predict(&x, &t).unwrap();
            f64::try_from(d.mean(Kind::Double)).unwrap().abs() / shift
        };
        let small_cifar = UNetConfig {
            image_size: 16,
            ..UNetConfig::cifar32()
        };
        for cfg in [UNetConfig::mnist(), small_cifar] {
            let r = response(&cfg);
            assert!(
                r > 0.3,
                "{} groups over {} channels: response {r:.3}",
                cfg.groups,
                cfg.base_channels
            );
            // The same network with one channel per group: the test can fail.
            let blind = response(&UNetConfig {
                groups: cfg.base_channels * 4,
                ..cfg.clone()
            });
            assert!(blind < 0.1, "one channel a group: response {blind:.3}");
        }
    }
}
