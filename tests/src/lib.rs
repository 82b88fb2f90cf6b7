//! Shared harness for the tests that hold the tch implementation (`ddpm`) to the exact f64
//! reference (`ddpm-reference`): a per-device test macro, ndarray ⇄ tch conversions, seeded
//! noise, comparison helpers and proptest strategies for schedules, times, shapes and σ choices.

use ddpm_reference as reference;
use ndarray::{Array, Array2, ArrayD, Dimension, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use tch::{Device, Kind, Tensor};

/// One test body `fn(tch::Device)` as two tests: `$cpu` always runs; `$cuda` runs on GPU 0
/// and is ignored unless asked for (`bash scripts/test.sh` asks where `nvidia-smi` sees a GPU;
/// `cargo test --release -- --ignored` anywhere), so a machine without CUDA reports it as
/// ignored rather than as a pass. Asked for without a GPU, it fails.
#[macro_export]
macro_rules! test_device {
    ($fn_name:ident, $test_cpu:ident, $test_cuda:ident) => {
        #[test]
        fn $test_cpu() {
            $crate::single_thread();
            $fn_name(tch::Device::Cpu)
        }

        #[test]
        #[ignore = "needs a CUDA device: bash scripts/test.sh runs it where nvidia-smi sees one"]
        fn $test_cuda() {
            assert!(
                tch::Cuda::is_available(),
                "{} needs a CUDA device and libtorch sees none",
                stringify!($test_cuda)
            );
            $fn_name(tch::Device::Cuda(0))
        }
    };
}

/// Seed of every proptest run unless `PROPTEST_RNG_SEED` says otherwise: the gate is
/// reproducible, and a different seed explores new cases on demand.
pub const PROPTEST_SEED: u64 = 0x00dd_0e55;

/// One libtorch intra-op thread: the tests' tensors are tiny, and on a shared 2-core machine
/// the spin-waiting of libtorch's thread pool cost 20–40× the work itself (measured: 200 MLP
/// training steps took 30 s with the default threads, 0.7 s with one).
pub fn single_thread() {
    tch::set_num_threads(1);
}

/// Runs `test` on `cases` values of `strategy` (overridden by `PROPTEST_CASES`), panicking with
/// proptest's shrunk counter-example on failure.
pub fn check<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(PROPTEST_SEED);
    }
    config.failure_persistence = None;
    single_thread();
    if let Err(e) = TestRunner::new(config).run(&strategy, test) {
        panic!("{e}");
    }
}

/// An ndarray array as a tch tensor of the same shape, of `kind`, on `device`.
pub fn tensor<D: Dimension>(a: &Array<f64, D>, kind: Kind, device: Device) -> Tensor {
    let shape: Vec<i64> = a.shape().iter().map(|&s| s as i64).collect();
    let flat: Vec<f64> = a.iter().copied().collect();
    Tensor::from_slice(&flat)
        .reshape(shape)
        .to_kind(kind)
        .to_device(device)
}

/// A tch tensor's values as f64, in row-major order.
pub fn values(t: &Tensor) -> Vec<f64> {
    let flat = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Double)
        .contiguous()
        .reshape([-1]);
    Vec::<f64>::try_from(&flat).expect("a Double tensor converts to Vec<f64>")
}

/// A tch tensor `[n, …]` as `[n, d]` f64, the reference's batch layout (images flattened).
pub fn array2(t: &Tensor) -> Array2<f64> {
    let n = t.size()[0] as usize;
    let v = values(t);
    let d = v.len().checked_div(n).unwrap_or(0);
    Array2::from_shape_vec((n, d), v).expect("n·d values")
}

/// A tch tensor as an f64 ndarray of the same shape.
pub fn arrayd(t: &Tensor) -> ArrayD<f64> {
    let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), values(t)).expect("shape matches the values")
}

/// `n` times the same `t` as the Int64 `[n]` tensor the tch side takes.
pub fn times(t: usize, n: usize, device: Device) -> Tensor {
    Tensor::full([n as i64], t as i64, (Kind::Int64, device))
}

/// `[n, d]` standard-normal draws from a seeded generator: noise that both sides receive.
pub fn normal(n: usize, d: usize, seed: u64) -> Array2<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((n, d), || rng.sample(StandardNormal))
}

/// Fails the proptest case unless every `|actual − expected| ≤ tol · scale` (elementwise),
/// naming `what` and the worst ratio. `scale` is what the rounding error of a value is
/// proportional to (its own size, or the sizes of the terms it was summed from).
pub fn close_scaled(
    what: &str,
    actual: &[f64],
    expected: &[f64],
    scale: &[f64],
    tol: f64,
) -> Result<(), TestCaseError> {
    if actual.len() != expected.len() || actual.len() != scale.len() {
        return Err(TestCaseError::fail(format!(
            "{what}: {} values, expected {}",
            actual.len(),
            expected.len()
        )));
    }
    if actual.iter().any(|v| !v.is_finite()) {
        return Err(TestCaseError::fail(format!(
            "{what}: non-finite values {actual:?}"
        )));
    }
    let worst = actual
        .iter()
        .zip(expected)
        .zip(scale)
        .map(|((a, e), s)| if a == e { 0.0 } else { (a - e).abs() / s })
        .fold(0.0, f64::max);
    if worst > tol {
        return Err(TestCaseError::fail(format!(
            "{what}: error {worst:e} > {tol:e} (relative to its scale)\n  actual   {actual:?}\n  expected {expected:?}"
        )));
    }
    Ok(())
}

/// Fails the proptest case unless `actual` agrees with `expected` to `rel` relative error,
/// absolute below `floor` (where relative error means nothing).
pub fn close(
    what: &str,
    actual: &[f64],
    expected: &[f64],
    rel: f64,
    floor: f64,
) -> Result<(), TestCaseError> {
    let scale: Vec<f64> = expected.iter().map(|e| e.abs().max(floor)).collect();
    close_scaled(what, actual, expected, &scale, rel)
}

/// Fails the proptest case unless `max |actual − expected| ≤ tol · max |expected|`: agreement
/// relative to the array's size, for values whose roundoff is set by their largest entry.
pub fn close_in_norm(
    what: &str,
    actual: &[f64],
    expected: &[f64],
    tol: f64,
) -> Result<(), TestCaseError> {
    let size = expected
        .iter()
        .fold(0.0f64, |m, e| m.max(e.abs()))
        .max(f64::MIN_POSITIVE);
    close_scaled(what, actual, expected, &vec![size; expected.len()], tol)
}

/// Values rounded to f32 and back: what an f32 tensor holds, so that the reference can be fed
/// exactly the inputs the f32 computation saw.
pub fn round_f32(a: &Array2<f64>) -> Array2<f64> {
    a.mapv(|v| v as f32 as f64)
}

/// A U-Net small enough for CPU tests that still has every part: 8×8 grey images, two levels
/// (a pool and an up-sample), a 1×1 skip projection where channels change (8 → 16), GroupNorm
/// with several channels a group, sinusoidal t.
pub fn small_unet(t_max: i64) -> ddpm::unet::UNetConfig {
    ddpm::unet::UNetConfig {
        image_size: 8,
        in_channels: 1,
        base_channels: 8,
        channel_mults: vec![1, 2],
        blocks_per_level: 1,
        groups: 4,
        time_embedding: ddpm::unet::TimeEmbedding::Sinusoidal,
        dropout: 0.0,
        t_max,
        classes: 0,
    }
}

/// The float kinds the tch side is checked in, with the relative tolerance each deserves.
///
/// f64: both sides compute the same formulas in the same precision, differing only in the order
/// of a handful of roundings, so 1e-10 leaves room for ~1e5 ulps of cancellation. f32: its unit
/// roundoff is 6e-8, and a schedule over T ≤ 1000 steps is a cumulative sum of T logs whose
/// rounding error grows like sqrt(T)·T·u in the worst case; 1e-4 bounds that for T = 1000 with
/// a factor of ten to spare, and one formula applied on top adds only a few ulps.
pub const KINDS: [(Kind, f64); 2] = [(Kind::Double, 1e-10), (Kind::Float, 1e-4)];

/// Schedule kinds of the tests, mapped to each crate's own type by the `schedules` helpers.
#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleSpec {
    /// The article's `α_t = sqrt(1 − 0.02·t/T)`.
    Article,
    /// Ho's linear `β^Ho ∈ [1e-4, 0.02]`.
    Linear,
    /// Nichol & Dhariwal's cosine, s = 0.008.
    Cosine,
    /// Arbitrary `α_1..α_T ∈ (0, 1)`.
    Alphas(Vec<f64>),
}

impl ScheduleSpec {
    /// The reference's schedule of this kind with T = `big_t` (ignored by `Alphas`).
    pub fn reference(&self, big_t: usize) -> reference::Schedule {
        let kind = match self {
            ScheduleSpec::Article => reference::ScheduleKind::Article,
            ScheduleSpec::Linear => reference::ScheduleKind::Linear,
            ScheduleSpec::Cosine => reference::ScheduleKind::Cosine,
            ScheduleSpec::Alphas(a) => {
                return reference::Schedule::from_alphas(a).expect("valid α_t");
            }
        };
        reference::Schedule::new(kind, big_t).expect("valid schedule")
    }

    /// The tch side's schedule of this kind with T = `big_t` on `device`.
    pub fn tch(&self, big_t: usize, device: Device) -> ddpm::schedule::Schedule {
        use ddpm::schedule::{Schedule, ScheduleKind};
        let kind = match self {
            ScheduleSpec::Article => ScheduleKind::Article,
            ScheduleSpec::Linear => ScheduleKind::Linear,
            ScheduleSpec::Cosine => ScheduleKind::Cosine,
            ScheduleSpec::Alphas(a) => {
                let alphas = Tensor::from_slice(a).to_device(device);
                return Schedule::from_alphas(&alphas).expect("valid α_t");
            }
        };
        Schedule::new(kind, big_t as i64, device).expect("valid schedule")
    }
}

/// σ_t choices of the generator, mapped to each crate's own type by the `sigmas` helpers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SigmaSpec {
    /// `σ_t = β̄_{t−1} β_t / β̄_t` (optimal for Dirac data).
    Posterior,
    /// `σ_t = β_t` (optimal for standard-normal data).
    Beta,
    /// Optimal for isotropic Gaussian data N(m, s² I).
    Isotropic { s: f64 },
}

impl SigmaSpec {
    /// The reference's σ choice.
    pub fn reference(self) -> reference::SigmaChoice {
        match self {
            SigmaSpec::Posterior => reference::SigmaChoice::Posterior,
            SigmaSpec::Beta => reference::SigmaChoice::Beta,
            SigmaSpec::Isotropic { s } => reference::SigmaChoice::Isotropic { data_std: s },
        }
    }

    /// The tch side's σ choice.
    pub fn tch(self) -> ddpm::sigma::SigmaChoice {
        match self {
            SigmaSpec::Posterior => ddpm::sigma::SigmaChoice::Posterior,
            SigmaSpec::Beta => ddpm::sigma::SigmaChoice::Beta,
            SigmaSpec::Isotropic { s } => ddpm::sigma::SigmaChoice::Isotropic { data_std: s },
        }
    }
}

/// Schedule lengths for property tests: short ones often (T = 1 is its own edge case: Ho's
/// linspace of one point is its first point), up to the article's 1000.
pub fn t_max() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), 1usize..=20, 1usize..=1000, Just(1000usize)]
}

/// A schedule kind with its length T: a named kind with any T, or T random α_t.
///
/// Random α_t lie in [0.6, 0.99999]: the lower end lets ᾱ_t fall to ~1e-45 over 200 steps
/// (exercising underflow-free log-space products), the upper end keeps β_t ≥ 4e-3.
pub fn schedule() -> impl Strategy<Value = (ScheduleSpec, usize)> {
    prop_oneof![
        t_max().prop_map(|t| (ScheduleSpec::Article, t)),
        t_max().prop_map(|t| (ScheduleSpec::Linear, t)),
        t_max().prop_map(|t| (ScheduleSpec::Cosine, t)),
        prop::collection::vec(0.6f64..0.99999, 1..=200).prop_map(|a| {
            let t = a.len();
            (ScheduleSpec::Alphas(a), t)
        }),
    ]
}

/// A schedule with a time `t ∈ 1..=T`, the ends included often.
pub fn schedule_and_t() -> impl Strategy<Value = (ScheduleSpec, usize, usize)> {
    schedule().prop_flat_map(|(s, big_t)| {
        let t = prop_oneof![Just(1usize), Just(big_t), 1..=big_t];
        (Just(s), Just(big_t), t)
    })
}

/// Batch size n and flattened data dimension d of a reference batch `[n, d]`.
pub fn batch_shape() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=6, 1usize..=12)
}

/// σ choices, the isotropic one with s ∈ [0, 2] (0 and 1 reproduce the two named ones).
pub fn sigma() -> impl Strategy<Value = SigmaSpec> {
    prop_oneof![
        Just(SigmaSpec::Posterior),
        Just(SigmaSpec::Beta),
        (0.0f64..2.0).prop_map(|s| SigmaSpec::Isotropic { s }),
    ]
}

/// DDIM's η: the deterministic and the strided-DDPM ends, and values between.
pub fn eta() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0]
}

/// A strided-subsequence length n ∈ 1..=T.
pub fn stride_len(big_t: usize) -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(big_t), 1..=big_t]
}

/// Seeds for noise drawn by `normal`.
pub fn seed() -> impl Strategy<Value = u64> {
    any::<u64>()
}

/// A full exact-comparison case: schedule, T, t, batch `[n, d]` and a noise seed.
#[derive(Clone, Debug)]
pub struct Case {
    /// The schedule kind.
    pub spec: ScheduleSpec,
    /// T.
    pub big_t: usize,
    /// t ∈ 1..=T.
    pub t: usize,
    /// Batch size.
    pub n: usize,
    /// Data dimension.
    pub d: usize,
    /// Seed of the data and noise drawn by `normal`.
    pub seed: u64,
}

/// Strategy of exact-comparison cases.
pub fn case() -> impl Strategy<Value = Case> {
    (schedule_and_t(), batch_shape(), seed()).prop_map(|((spec, big_t, t), (n, d), seed)| Case {
        spec,
        big_t,
        t,
        n,
        d,
        seed,
    })
}

/// Smallest ᾱ_t an f32 check uses: below it f32 cannot represent ᾱ_t (its smallest normal
/// is 1.2e-38) and x̂_0 = (x_t − β̄_t ε̂)/ᾱ_t overflows; the f32 path serves named schedules,
/// whose ᾱ_T stays above 1e-5.
pub const F32_MIN_ALPHA_BAR: f64 = 1e-20;

/// An isotropic Gaussian mixture Σ_k w_k N(m_k, s_k² I) in f64, the form both oracles share
/// (a Dirac or a finite set has s_k = 0).
#[derive(Clone, Debug)]
pub struct Mixture {
    /// Weights w_k (normalised by the laws).
    pub weights: Vec<f64>,
    /// Means m_k, one row each [K, d].
    pub means: Array2<f64>,
    /// Standard deviations s_k.
    pub stds: Vec<f64>,
}

impl Mixture {
    /// The reference's law.
    pub fn reference(&self) -> reference::oracle::DataLaw {
        reference::oracle::DataLaw::mixture(
            ndarray::Array1::from(self.weights.clone()),
            self.means.clone(),
            ndarray::Array1::from(self.stds.clone()),
        )
        .expect("valid mixture")
    }

    /// The tch side's law on `device`.
    pub fn tch(&self, device: Device) -> ddpm::oracle::DataLaw {
        let w = Tensor::from_slice(&self.weights).to_device(device);
        let s = Tensor::from_slice(&self.stds).to_device(device);
        ddpm::oracle::DataLaw::mixture(&w, &tensor(&self.means, Kind::Double, device), &s)
            .expect("valid mixture")
    }
}

/// Mixtures of 1..=4 components in d = 1..=4 dimensions, weights in [0.05, 1], means in
/// [−2, 2], stds 0 (points) or in [0.05, 1.5].
pub fn mixture() -> impl Strategy<Value = Mixture> {
    (1usize..=4, 1usize..=4).prop_flat_map(|(k, d)| {
        (
            prop::collection::vec(0.05f64..1.0, k),
            prop::collection::vec(-2.0f64..2.0, k * d),
            prop::collection::vec(prop_oneof![Just(0.0), 0.05f64..1.5], k),
        )
            .prop_map(move |(weights, m, stds)| Mixture {
                weights,
                means: Array2::from_shape_vec((k, d), m).expect("k·d means"),
                stds,
            })
    })
}
