//! Training: mean_B ‖ε − ε̂(ᾱ_t x_0 + β̄_t ε, t)‖² (or loss (8) with its exact weight, or the
//! Min-SNR-γ weight),
//! t ~ U{1..T}, LAMB with warm-up and piecewise-linear decay, EMA of the weights, atomic
//! checkpoints, exact resume, metrics as JSON lines and sample grids.
//!
//! Resuming is exact because nothing random depends on history: step k's samples, t, ε,
//! flips and libtorch seed (dropout) are drawn from a generator keyed by (seed, k), the
//! epoch order from one keyed by (seed, epoch), and the optimiser, EMA and weights are
//! restored bit for bit. On the CPU a resumed run ends with the same weights as an
//! uninterrupted one.

use crate::autocast::autocast_bf16;
use crate::checkpoint::{self, Checkpoint, DataPosition, DataRecord, Manifest, TrainingState};
use crate::config::{Config, LossWeight};
use crate::data::loader::{Batch, BatchPlan, Loader};
use crate::data::{DataFingerprint, Dataset};
use crate::ema::Ema;
use crate::error::{DdpmError, Result};
use crate::lamb::Lamb;
use crate::loss::{euclidean_loss, min_snr_loss, weighted_loss};
use crate::lr::LrSchedule;
use crate::marginal::marginal_sample;
use crate::metrics::{MetricsLog, Record};
use crate::progress::Progress;
use crate::schedule::Schedule;
use crate::unet::UNet;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Batches prepared ahead of the device.
const PREFETCH: usize = 4;
/// Consecutive non-finite batches tolerated by `skip_nonfinite` before giving up.
const MAX_CONSECUTIVE_SKIPS: u64 = 50;

// Where these went (issue 12); quality/ still imports them from here until it loads runs
// through `checkpoint::load_model`.
use crate::checkpoint::build_model;

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOutcome {
    /// The weights were updated; the loss stays on the device until [`Trainer::take_mean_loss`].
    Updated,
    /// The loss was not finite and the batch was skipped (`skip_nonfinite`).
    Skipped(f64),
}

/// `train.loss_weight` with what its weight needs, built once per run.
enum Weighting {
    /// mean_B ‖ε − ε̂‖².
    None,
    /// Loss (8): the σ table of `train.loss_sigma`.
    Article(Tensor),
    /// Min-SNR-γ: γ.
    MinSnr(f64),
}

/// The model, its optimiser and EMA, and the step counter.
pub struct Trainer {
    cfg: Config,
    device: Device,
    vs: VarStore,
    net: UNet,
    lamb: Lamb,
    ema: Ema,
    lr: LrSchedule,
    schedule: Schedule,
    weighting: Weighting,
    step: u64,
    skipped: u64,
    last_grad_norm: Option<Tensor>,
    /// Σ of the losses since the last [`Trainer::take_mean_loss`], and how many, kept on the
    /// device: reading a loss back every step would stall a GPU.
    loss_sum: Tensor,
    loss_count: u64,
    /// [first step whose loss was not finite (0 = none), that loss], on the device.
    first_nonfinite: Tensor,
    /// Data-parallel training: the gradients are averaged over this group after backward.
    group: Option<crate::distributed::ProcessGroup>,
}

impl Trainer {
    /// A fresh run: weights initialised from the run's seed, moments and step at zero.
    pub fn new(cfg: &Config, device: Device) -> Result<Trainer> {
        cfg.validate()?;
        crate::memory::check_training(cfg, device)?;
        let (vs, net) = build_model(cfg, device, cfg.train.seed)?;
        if cfg.train.channels_last {
            // Before LAMB and the EMA lay the variables out in their flat buffers.
            crate::unet::to_channels_last(&vs)?;
        }
        let schedule = Schedule::new(cfg.diffusion.schedule, cfg.diffusion.t_max, device)?;
        let weighting = match cfg.train.loss_weight {
            LossWeight::None => Weighting::None,
            LossWeight::Article => Weighting::Article(cfg.train.loss_sigma.table(&schedule)?),
            LossWeight::MinSnr => Weighting::MinSnr(cfg.train.min_snr_gamma),
        };
        Ok(Trainer {
            lamb: Lamb::new(&vs, cfg.lamb())?,
            ema: Ema::new(&vs, cfg.train.ema_decay, cfg.train.ema_warmup)?,
            lr: cfg.lr_schedule()?,
            cfg: cfg.clone(),
            device,
            vs,
            net,
            schedule,
            weighting,
            step: 0,
            skipped: 0,
            last_grad_norm: None,
            loss_sum: Tensor::f_zeros([], (Kind::Double, device))?,
            loss_count: 0,
            first_nonfinite: Tensor::f_zeros([2], (Kind::Double, device))?,
            group: None,
        })
    }

    /// Continues from `ckpt`: weights, EMA, LAMB state and counters.
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.load_weights(&self.vs, false)?;
        self.ema
            .import(&ckpt.state.ema, ckpt.manifest.ema_updates)?;
        self.lamb.load_state(&ckpt.state.optim)?;
        self.step = ckpt.manifest.step;
        self.skipped = ckpt.manifest.skipped_steps;
        Ok(())
    }

    /// Updates done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Data-parallel training (docs/distributed.md): from now on every step averages the
    /// gradients over `group` before the LAMB step, so every rank takes the same step. Each rank
    /// must be given its shard of the same global batch ([`crate::distributed::shard`]).
    pub fn set_process_group(&mut self, group: crate::distributed::ProcessGroup) {
        self.group = Some(group);
    }

    /// Batches skipped for a non-finite loss.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The weights being trained.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The optimiser: its moments, step count and which variables it adapts
    /// ([`Lamb::partition`]).
    pub fn optimizer(&self) -> &Lamb {
        &self.lamb
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// One update on `batch` (which must be the batch of step `self.step() + 1`).
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepOutcome> {
        let k = self.step + 1;
        if batch.step != k {
            return Err(DdpmError::OutOfRange {
                key: "batch.step",
                value: batch.step.to_string(),
                expected: format!("{k}, the step being trained"),
            });
        }
        tch::manual_seed(batch.torch_seed);
        let dev = self.device;
        // Asynchronous on CUDA: from the loader's pinned memory the copies overlap the host's
        // work; libtorch keeps a pinned block alive until its copy is done.
        let upload = |t: &Tensor| t.f_to_device_(dev, t.kind(), dev.is_cuda(), false);
        let x0 = upload(&batch.x0)?;
        let t = upload(&batch.t)?;
        let eps = upload(&batch.eps)?;
        let x_t = marginal_sample(&self.schedule, &x0, &t, &eps)?;
        let y = match (&batch.y, self.net.class_count() > 0) {
            (Some(y), true) => Some(upload(y)?),
            (None, false) => None,
            (y, _) => {
                return Err(DdpmError::Incompatible {
                    key: "train.conditional",
                    other: "the batch".into(),
                    reason: format!(
                        "the network has {} classes but the batch {} labels",
                        self.net.class_count(),
                        if y.is_some() { "has" } else { "has no" }
                    ),
                })
            }
        };
        let eps_hat = autocast_bf16(self.cfg.train.bf16, dev, || match &y {
            Some(y) => self.net.forward_class(&x_t, &t, y, true),
            None => self.net.forward_t(&x_t, &t, true),
        })?
        .f_to_kind(Kind::Float)?;
        let loss = match &self.weighting {
            Weighting::None => euclidean_loss(&eps, &eps_hat)?,
            Weighting::Article(sigma) => weighted_loss(&self.schedule, sigma, &t, &eps, &eps_hat)?,
            Weighting::MinSnr(gamma) => min_snr_loss(&self.schedule, *gamma, &t, &eps, &eps_hat)?,
        };
        self.lamb.zero_grad();
        if self.cfg.train.skip_nonfinite {
            // Skipping decides on the host, so only this mode reads every loss back. With a
            // process group the decision is taken on the ranks' average (a NaN or ∞ on any
            // rank reaches every rank), so that all ranks skip together.
            let value = match &self.group {
                Some(group) => {
                    let mut mean = loss
                        .f_detach()?
                        .f_to_device(Device::Cpu)?
                        .f_to_kind(Kind::Double)?;
                    group.all_reduce_average(&mut mean)?;
                    f64::try_from(&mean)?
                }
                None => f64::try_from(&loss)?,
            };
            if !value.is_finite() {
                self.step = k;
                self.skipped += 1;
                return Ok(StepOutcome::Skipped(value));
            }
        } else {
            self.watch_nonfinite(&loss, k)?;
        }
        loss.f_backward()?;
        if let Some(group) = &self.group {
            group.average_gradients(&self.vs.trainable_variables())?;
        }
        self.lamb.set_lr(self.lr.lr(k));
        self.last_grad_norm = Some(self.lamb.step()?);
        self.ema.update(&self.vs)?;
        self.step = k;
        let _ = self
            .loss_sum
            .f_add_(&loss.f_detach()?.f_to_kind(Kind::Double)?)?;
        self.loss_count += 1;
        Ok(StepOutcome::Updated)
    }

    /// Records step `k` and `loss` on the device if this is the first non-finite loss.
    fn watch_nonfinite(&mut self, loss: &Tensor, k: u64) -> Result<()> {
        let first = self.first_nonfinite.f_get(0)?;
        let new = loss
            .f_isfinite()?
            .f_logical_not()?
            .f_logical_and(&first.f_eq(0.0)?)?;
        let record = Tensor::f_stack(
            &[
                Tensor::f_full([], k as f64, (Kind::Double, self.device))?,
                loss.f_detach()?.f_to_kind(Kind::Double)?,
            ],
            0,
        )?;
        self.first_nonfinite = record.f_where_self(&new, &self.first_nonfinite)?;
        Ok(())
    }

    /// Errors with the step of the first non-finite loss since the run (or resume) began;
    /// called before anything is written, so no checkpoint or grid ever follows one.
    pub fn check_loss(&self) -> Result<()> {
        match Vec::<f64>::try_from(&self.first_nonfinite)?[..] {
            [step, loss] if step > 0.0 => Err(DdpmError::NonFinite {
                step: step as u64,
                loss,
            }),
            _ => Ok(()),
        }
    }

    /// The mean loss of the updates since the last call (NaN if none), then starts afresh.
    pub fn take_mean_loss(&mut self) -> Result<f64> {
        let mean = if self.loss_count == 0 {
            f64::NAN
        } else {
            f64::try_from(&self.loss_sum)? / self.loss_count as f64
        };
        let _ = self.loss_sum.f_zero_()?;
        self.loss_count = 0;
        Ok(mean)
    }

    /// The global gradient norm of the last update (waits for the device).
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_grad_norm
            .as_ref()
            .and_then(|g| f64::try_from(g).ok())
    }

    /// The learning rate of the last update.
    pub fn current_lr(&self) -> f64 {
        self.lr.lr(self.step)
    }

    /// Errors if any weight is NaN or infinite (checked before every checkpoint, so a
    /// diverged run never overwrites a good one).
    pub fn check_finite(&self) -> Result<()> {
        for (name, w) in self.vs.variables() {
            if !bool::try_from(w.f_isfinite()?.f_all()?)? {
                return Err(DdpmError::StateMismatch {
                    part: "weights",
                    reason: format!(
                        "weight {name} is not finite at step {}; the checkpoint was not written",
                        self.step
                    ),
                });
            }
        }
        Ok(())
    }

    /// The tensors a checkpoint holds.
    pub fn state(&self) -> TrainingState {
        let mut model: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        model.sort_by(|a, b| a.0.cmp(&b.0));
        TrainingState {
            model,
            ema: self.ema.export(),
            optim: self.lamb.state(),
        }
    }

    /// The manifest of a checkpoint at the current step, for a training set of `n` samples.
    pub fn manifest(&self, n: usize) -> Manifest {
        let plan = self.plan();
        let (epoch, batch_in_epoch) = plan.position(n, self.step + 1);
        Manifest {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step,
            seed: self.cfg.train.seed,
            data_position: DataPosition {
                epoch,
                batch_in_epoch,
                steps_per_epoch: plan.steps_per_epoch(n),
            },
            ema_updates: self.ema.updates(),
            skipped_steps: self.skipped,
            config: self.cfg.clone(),
            tensors: Default::default(),
            files: Default::default(),
            data: None,
        }
    }

    /// How batches are drawn for this run.
    pub fn plan(&self) -> BatchPlan {
        BatchPlan {
            batch_size: self.cfg.train.batch_size,
            seed: self.cfg.train.seed,
            t_max: self.cfg.diffusion.t_max,
            flip: self.cfg.data.flip,
            label_dropout: self.cfg.train.label_dropout,
        }
    }

    /// Samples `sample.n` images with the EMA (or raw) weights and writes them as a grid.
    /// A conditional run's grid has one row a class, ceil(`sample.n`/K) images each, drawn
    /// with `sample.guidance`.
    pub fn write_grid(&self, path: &Path) -> Result<()> {
        let images = if self.cfg.sample.ema {
            let (vs, net) = build_model(&self.cfg, self.device, self.cfg.train.seed)?;
            self.ema.copy_to(&vs)?;
            self.sample(&net)?
        } else {
            self.sample(&self.net)?
        };
        let columns = self.grid_labels().map(|(_, per)| per as i64);
        crate::grid::save_grid_scaled(&images, path, columns, self.cfg.sample.grid_scale)
    }

    /// A conditional run's grid labels (one row a class) and images a row; `None` when
    /// unconditional.
    fn grid_labels(&self) -> Option<(Vec<i64>, usize)> {
        let k = self.net.class_count();
        (k > 0).then(|| {
            let per = self.cfg.sample.n.div_ceil(k).max(1);
            let classes: Vec<i64> = (0..k as i64).collect();
            (crate::generate::class_rows(&classes, per), per)
        })
    }

    /// The grid's `sample.n` images, drawn `sample.batch_size` at a time as `ddpm sample`
    /// draws them ([`crate::generate::generate_each`], seeded with `train.seed`; with
    /// `train.grid_steps` steps) and kept on the CPU. For n up to the batch size, this is the
    /// one seeded sampler call the grid always was.
    fn sample(&self, net: &UNet) -> Result<Tensor> {
        let mut cfg = self.cfg.clone();
        if let Some(n) = cfg.train.grid_steps {
            cfg.sample.steps = Some(n);
        }
        let labels = self.grid_labels().map(|(labels, _)| labels);
        let opts = crate::generate::SampleOptions {
            n: labels.as_ref().map_or(cfg.sample.n, Vec::len),
            seed: cfg.train.seed as i64,
            ..Default::default()
        };
        let mut kept = Vec::new();
        let mut sink = |_, images: &Tensor| {
            kept.push(images.f_to_device(Device::Cpu)?);
            Ok(())
        };
        let silent = &mut crate::progress::Silent;
        match &labels {
            None => crate::generate::generate_each(
                net,
                &self.schedule,
                &cfg,
                &opts,
                self.device,
                silent,
                &mut sink,
            )?,
            Some(labels) => crate::generate::generate_each_class(
                net,
                labels,
                &self.schedule,
                &cfg,
                &opts,
                self.device,
                silent,
                &mut sink,
            )?,
        };
        Ok(Tensor::f_cat(&kept, 0)?)
    }
}

/// How to run [`train`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run directory: `config.toml`, `metrics.jsonl`, `samples/`, `checkpoints/`.
    pub run_dir: PathBuf,
    /// Where to compute.
    pub device: Device,
    /// Continue from the newest good checkpoint in `run_dir` instead of starting afresh.
    pub resume: bool,
    /// On resume, refuse a checkpoint whose settings differ from the `cfg` given to [`train`]
    /// in anything but the length of the run (the user named a preset or config file).
    pub resume_must_match: bool,
    /// Asks the run to stop: checked after every step; once raised, the run writes a
    /// checkpoint of the step it reached and returns (see [`TrainSummary::stopped`]).
    pub stop: StopFlag,
    /// On resume: where the data are now, and whether other data than the run's may be used.
    pub resume_data: ResumeData,
}

/// Where a resumed run reads its data, and whether they may differ from the run's own
/// (see [`train`]).
#[derive(Debug, Clone, Default)]
pub struct ResumeData {
    /// The data's place now (a folder that moved, a copy): used instead of the run's saved
    /// `data.path`, and held to the checkpoint's fingerprint like any place.
    pub path: Option<PathBuf>,
    /// Continue even when the data do not match the checkpoint's fingerprint (images added,
    /// removed or changed): the epoch length and the held-out split then change, and the
    /// checkpoints written from then on record the new fingerprint.
    pub allow_change: bool,
}

/// A request to stop a run early, shared with whoever raises it (a signal handler, another
/// thread). Cloning shares the flag.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag that is not raised.
    pub fn new() -> StopFlag {
        StopFlag::default()
    }

    /// A flag backed by `flag` (for handlers that set an `AtomicBool` themselves).
    pub fn from_arc(flag: Arc<AtomicBool>) -> StopFlag {
        StopFlag(flag)
    }

    /// Asks the run to stop after its current step.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The lock file of a run directory: [`RunLock`] holds an exclusive advisory lock on it.
pub const LOCK_FILE: &str = ".lock";

/// One writer per run directory: an exclusive OS advisory lock (`flock`) on `<run>/.lock`,
/// which holds the holder's pid. The kernel releases the lock when the process ends, however
/// it ends, so a killed run leaves no stale lock; the file itself stays (removing it could
/// race with a process that has just opened it). Readers (sample, eval, quality) take no lock.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist) or fails at once with
    /// [`DdpmError::RunLocked`] naming the holder's pid.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        let io = |what: &str, e| {
            DdpmError::io(format!("cannot {what} the lock file {}", path.display()), e)
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("open", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DdpmError::RunLocked {
                    dir: run_dir.to_path_buf(),
                    pid: holder_pid(&mut file),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", e)),
        }
        // The pid only names the holder in a second writer's message; the lock is the flock.
        // A disk too full for it is reported by the run's first real write instead.
        let pid = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush());
        if let Err(e) = pid {
            tracing::warn!("cannot write the pid into {}: {e}", path.display());
        }
        Ok(RunLock { _file: file })
    }
}

/// The pid the lock's holder wrote, waiting briefly for a holder that has just taken the
/// lock and not yet written it.
fn holder_pid(file: &mut std::fs::File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Updates done in total.
    pub steps: u64,
    /// Mean loss over the last logging window (NaN if no update ran).
    pub last_loss: f64,
    /// The final checkpoint.
    pub checkpoint: PathBuf,
    /// The final sample grid.
    pub grid: PathBuf,
    /// Batches skipped for a non-finite loss.
    pub skipped: u64,
    /// The run was stopped through [`TrainOptions::stop`] before `train.steps`; `checkpoint`
    /// holds the step it reached (`steps`), and `grid` was not drawn.
    pub stopped: bool,
    /// The loss curve (`loss.png` beside `metrics.jsonl`), when one was drawn: not with
    /// `train.plot_loss = false` or fewer than 2 finite logged losses.
    pub loss_curve: Option<PathBuf>,
}

/// The checkpoints directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The sample grid of step `step` in a run.
fn grid_path(run_dir: &Path, step: u64) -> PathBuf {
    run_dir
        .join("samples")
        .join(format!("{}.png", checkpoint::dir_name(step)))
}

/// Trains on the data `cfg` names (see [`train_on`]). With `resume`, the configuration
/// saved in the checkpoint is used, except `train.steps` which `steps` may raise.
///
/// The data: `data.path` is made absolute ([`crate::data::absolute_path`]) before anything
/// is read, so the run's config and checkpoints find the data from any working directory,
/// and each checkpoint records the path as given and the whole set's [`DataFingerprint`].
/// A resumed run reads its data from `opts.resume_data.path`, else the `data.path` of `cfg`
/// when the run is held to it (`resume_must_match`) and it names one, else its saved
/// `data.path`; wherever they are, they must hold what the checkpoint's fingerprint records
/// ([`DdpmError::DataChanged`], before anything is written) unless
/// `opts.resume_data.allow_change`. A checkpoint without a fingerprint resumes with a warning.
pub fn train(
    cfg: &Config,
    opts: &TrainOptions,
    steps: Option<u64>,
    progress: &mut dyn Progress,
) -> Result<TrainSummary> {
    train_in_group(cfg, opts, steps, progress, None)
}

/// [`train`] as one rank of a data-parallel run (docs/distributed.md), or alone without a
/// group. Every rank resolves the same settings (refused otherwise, naming the ranks), trains
/// on its shard of every global batch and takes the same step; rank 0 alone writes the run
/// directory (lock, config, metrics, loss curve, checkpoints, grids); the others only read it
/// (to resume) and report only warnings, prefixed with their rank.
pub fn train_in_group(
    cfg: &Config,
    opts: &TrainOptions,
    steps: Option<u64>,
    progress: &mut dyn Progress,
    group: Option<crate::distributed::ProcessGroup>,
) -> Result<TrainSummary> {
    let rank = group.as_ref().map_or(0, |g| g.rank());
    let mut quiet;
    let progress: &mut dyn Progress = if rank == 0 {
        progress
    } else {
        quiet = crate::distributed::RankProgress {
            rank,
            inner: progress,
        };
        &mut quiet
    };
    let writer = rank == 0;
    if !opts.resume && writer {
        // Before the data are read, so an unwritable run directory fails at once.
        create_run_dir(&opts.run_dir)?;
    }
    // Before anything is read or written. A resume of a directory that does not exist takes
    // none: it fails in `resume_point` (no checkpoints), having written nothing.
    let lock = if !writer || (opts.resume && !opts.run_dir.is_dir()) {
        None
    } else {
        Some(RunLock::acquire(&opts.run_dir)?)
    };
    let (mut cfg, resume_from, path_given) = if opts.resume {
        let ckpt = resume_point(cfg, opts)?;
        let mut run_cfg = ckpt.manifest.config.clone();
        run_cfg.train.steps = steps.unwrap_or(run_cfg.train.steps);
        let named = opts.resume_data.path.clone().or_else(|| {
            opts.resume_must_match
                .then(|| cfg.data.path.clone())
                .flatten()
        });
        let given = match named {
            Some(path) => {
                run_cfg.data.path = Some(path.clone());
                Some(path)
            }
            None => ckpt
                .manifest
                .data
                .as_ref()
                .map_or(run_cfg.data.path.clone(), |d| d.path_given.clone()),
        };
        (run_cfg, Some(ckpt), given)
    } else {
        (cfg.clone(), None, cfg.data.path.clone())
    };
    cfg.data.path = cfg.data.path.as_deref().map(crate::data::absolute_path);
    if let Some(group) = &group {
        let from = resume_from.as_ref().map_or(0, |c| c.manifest.step);
        group.check_same_settings(&format!("{}\nresumed from step {from}\n", cfg.to_toml()?))?;
        crate::distributed::check_batch_size(cfg.train.batch_size, group.world_size())?;
    }
    let data = crate::data::load_dataset(&cfg)?;
    let fingerprint = data.fingerprint()?;
    if let Some(ckpt) = &resume_from {
        check_data(ckpt, &cfg, &fingerprint, opts, progress)?;
    }
    let (train_set, _) = crate::data::split(&cfg, &data)?;
    drop(data);
    let record = DataRecord {
        path_given,
        fingerprint,
    };
    train_locked(
        &cfg,
        train_set,
        opts,
        resume_from,
        progress,
        lock,
        Some(record),
        group,
    )
}

/// Holds a resumed run's data (`found`, read from `cfg.data.path`) to its checkpoint's
/// fingerprint; see [`train`].
fn check_data(
    ckpt: &Checkpoint,
    cfg: &Config,
    found: &DataFingerprint,
    opts: &TrainOptions,
    progress: &mut dyn Progress,
) -> Result<()> {
    let place = cfg
        .data
        .path
        .clone()
        .unwrap_or_else(crate::data::mnist::default_path);
    let Some(saved) = ckpt.manifest.data.as_ref().map(|d| &d.fingerprint) else {
        progress.warn(&format!(
            "the checkpoint {} records no fingerprint of its data (it was written before they were recorded), so {} is used unchecked; the checkpoints written from now on record it",
            ckpt.dir.display(),
            place.display()
        ));
        return Ok(());
    };
    let Some(change) = saved.change_to(found) else {
        return Ok(());
    };
    if opts.resume_data.allow_change {
        progress.warn(&format!(
            "{} does not hold the data the run was trained on ({change}); continuing on them as asked: the epoch length and the held-out split may differ from the run's so far, and the checkpoints written from now on record the new data",
            place.display()
        ));
        return Ok(());
    }
    Err(DdpmError::DataChanged {
        run: ckpt.dir.clone(),
        data: place,
        saved: Box::new(saved.clone()),
        found: Box::new(found.clone()),
        change,
    })
}

/// The newest good checkpoint of the run to resume, held to `cfg` when
/// `opts.resume_must_match`.
fn resume_point(cfg: &Config, opts: &TrainOptions) -> Result<Checkpoint> {
    let root = checkpoints_dir(&opts.run_dir);
    let ckpt = checkpoint::latest_good(&root)?.ok_or_else(|| DdpmError::Checkpoint {
        path: root.clone(),
        reason: "holds no checkpoint to resume from".into(),
    })?;
    if opts.resume_must_match {
        let differences = cfg.differences(&ckpt.manifest.config)?;
        if !differences.is_empty() {
            return Err(DdpmError::ResumeSettings {
                run: ckpt.dir.clone(),
                differences,
            });
        }
    }
    Ok(ckpt)
}

/// Trains on `data`, from scratch or from `resume_from`: each step updates the weights on
/// the step's batch; every `log_every` steps a metrics line is appended, every
/// `checkpoint_every` a checkpoint written, every `sample_every` a sample grid drawn, and
/// all three at the end. `progress` counts steps, shows the last loss and notes each file
/// written. The run directory's [`RunLock`] is held throughout. When `opts.stop` is raised
/// the run ends after the current step with a checkpoint of it (no grid).
pub fn train_on(
    cfg: &Config,
    data: Dataset,
    opts: &TrainOptions,
    resume_from: Option<Checkpoint>,
    progress: &mut dyn Progress,
) -> Result<TrainSummary> {
    create_run_dir(&opts.run_dir)?;
    let lock = RunLock::acquire(&opts.run_dir)?;
    train_locked(
        cfg,
        data,
        opts,
        resume_from,
        progress,
        Some(lock),
        None,
        None,
    )
}

/// The run, holding the run directory's lock (rank 0 or alone) or not (the other ranks of a
/// group, which write nothing there).
#[allow(clippy::too_many_arguments)]
fn train_locked(
    cfg: &Config,
    data: Dataset,
    opts: &TrainOptions,
    resume_from: Option<Checkpoint>,
    progress: &mut dyn Progress,
    lock: Option<RunLock>,
    data_record: Option<DataRecord>,
    group: Option<crate::distributed::ProcessGroup>,
) -> Result<TrainSummary> {
    let (cfg, data) = resolve_classes(cfg, data)?;
    let cfg = &cfg;
    // Only the holder of the run directory's lock writes there: rank 0, or a lone run.
    let writer = lock.is_some();
    let _lock = lock;
    let mut run = Run::start(cfg, &data, opts, resume_from.as_ref(), writer)?;
    if let Some(group) = group {
        run.trainer.set_process_group(group);
    }
    run.data_record = data_record;
    let mut loader = Loader::spawn(
        data,
        run.trainer.plan(),
        run.trainer.step() + 1,
        PREFETCH,
        run.trainer.device,
    )?;
    progress.start(cfg.train.steps, run.trainer.step(), "steps");
    while run.trainer.step() < cfg.train.steps {
        let batch = loader.next_batch()?;
        let batch = match &run.trainer.group {
            // This rank's rows of the global batch; the gradients are averaged over the ranks.
            Some(g) => crate::distributed::shard(&batch, g.rank(), g.world_size())?,
            None => batch,
        };
        run.update(&batch, progress)?;
        progress.update(batch.step);
        run.write_due(batch.step, progress)?;
        let stop = match &run.trainer.group {
            // Every rank stops after the same step.
            Some(group) => group.any(opts.stop.is_raised())?,
            None => opts.stop.is_raised(),
        };
        if stop && batch.step < cfg.train.steps {
            run.stop(batch.step, progress)?;
            break;
        }
    }
    progress.finish();
    Ok(run.summary())
}

/// The run's configuration with its classes taken from `data` and the data it trains on: a
/// conditional run (`train.conditional`) needs labelled data and takes `model.classes` and
/// `data.class_names` from them (a configuration that already names classes, a resumed run's,
/// must name the same); an unconditional run trains on the images alone.
pub fn resolve_classes(cfg: &Config, data: Dataset) -> Result<(Config, Dataset)> {
    let mut cfg = cfg.clone();
    if !cfg.train.conditional {
        return Ok((cfg, data.without_labels()));
    }
    let names = data
        .class_names()
        .ok_or_else(|| DdpmError::NotConditional {
            what: format!("the data {}", data.name()),
            reason: "its samples carry no labels".into(),
            advice: "train a conditional run on MNIST or on a folder of class subfolders, or leave train.conditional off".into(),
        })?
        .to_vec();
    if !cfg.data.class_names.is_empty() && cfg.data.class_names != names {
        return Err(DdpmError::Incompatible {
            key: "data.class_names",
            other: format!("the classes of {}", data.name()),
            reason: format!(
                "the run's classes are {:?}, the data's {:?}",
                cfg.data.class_names, names
            ),
        });
    }
    cfg.model.classes = names.len() as i64;
    cfg.data.class_names = names;
    cfg.validate()?;
    Ok((cfg, data))
}

/// A training run under way: the trainer, its files and what it last wrote.
struct Run<'a> {
    cfg: &'a Config,
    run_dir: &'a Path,
    trainer: Trainer,
    /// Rank 0's (or a lone run's); the other ranks of a group write nothing.
    metrics: Option<MetricsLog>,
    /// Training samples, for the manifest's data position.
    n: usize,
    started: Instant,
    window_start: Instant,
    last_loss: f64,
    consecutive_skips: u64,
    last_checkpoint: Option<PathBuf>,
    last_grid: Option<PathBuf>,
    /// Stopped early through [`TrainOptions::stop`].
    stopped: bool,
    /// The data's place as given and fingerprint, recorded in every checkpoint.
    data_record: Option<DataRecord>,
    last_loss_curve: Option<PathBuf>,
}

impl<'a> Run<'a> {
    /// Prepares the run directory (refusing a fresh run where checkpoints exist), builds or
    /// restores the trainer, writes `config.toml` and opens `metrics.jsonl`.
    fn start(
        cfg: &'a Config,
        data: &Dataset,
        opts: &'a TrainOptions,
        resume_from: Option<&Checkpoint>,
        writer: bool,
    ) -> Result<Run<'a>> {
        if writer {
            create_run_dir(&opts.run_dir)?;
        }
        if resume_from.is_none() && !checkpoint::list(&checkpoints_dir(&opts.run_dir))?.is_empty() {
            return Err(DdpmError::RunExists {
                dir: opts.run_dir.clone(),
            });
        }
        if opts.device.is_cuda() {
            // Fixed shapes every step: let cuDNN time its algorithms once and keep the fastest.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let mut trainer = Trainer::new(cfg, opts.device)?;
        if let Some(ckpt) = resume_from {
            trainer.restore(ckpt)?;
            if writer {
                tracing::info!(
                    "resuming from {} at step {}",
                    ckpt.dir.display(),
                    trainer.step()
                );
            }
        }
        let metrics = if writer {
            write_text(&opts.run_dir.join("config.toml"), &cfg.to_toml()?)?;
            Some(MetricsLog::open(
                &opts.run_dir.join("metrics.jsonl"),
                trainer.step(),
            )?)
        } else {
            None
        };
        Ok(Run {
            cfg,
            run_dir: &opts.run_dir,
            trainer,
            metrics,
            n: data.len(),
            started: Instant::now(),
            window_start: Instant::now(),
            last_loss: f64::NAN,
            consecutive_skips: 0,
            last_checkpoint: None,
            last_grid: None,
            stopped: false,
            data_record: None,
            last_loss_curve: None,
        })
    }

    /// Ends the run early after step `k`: a checkpoint of `k` unless one was just written.
    fn stop(&mut self, k: u64, progress: &mut dyn Progress) -> Result<()> {
        let saved = checkpoints_dir(self.run_dir).join(checkpoint::dir_name(k));
        if self.metrics.is_some() && self.last_checkpoint.as_ref() != Some(&saved) {
            self.trainer.check_loss()?;
            self.save_checkpoint(k, progress)?;
        }
        self.stopped = true;
        Ok(())
    }

    /// One update; a skipped batch is reported, and too many in a row end the run.
    fn update(&mut self, batch: &Batch, progress: &mut dyn Progress) -> Result<()> {
        match self.trainer.train_step(batch)? {
            StepOutcome::Updated => self.consecutive_skips = 0,
            StepOutcome::Skipped(loss) => {
                self.consecutive_skips += 1;
                let k = batch.step;
                progress.warn(&format!(
                    "step {k}: loss {loss} is not finite; batch skipped"
                ));
                if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                    return Err(DdpmError::Diverged {
                        step: k,
                        skipped: self.consecutive_skips,
                    });
                }
            }
        }
        Ok(())
    }

    /// After step `k`: the metrics line, checkpoint and grid that are due, each only after
    /// the losses so far are known to be finite.
    fn write_due(&mut self, k: u64, progress: &mut dyn Progress) -> Result<()> {
        let t = &self.cfg.train;
        let last = k == t.steps;
        let log = last || k.is_multiple_of(t.log_every);
        let save = last || k.is_multiple_of(t.checkpoint_every);
        let draw = last || (t.sample_every > 0 && k.is_multiple_of(t.sample_every));
        if log || save || draw {
            self.trainer.check_loss()?;
        }
        if log {
            self.log_metrics(k, progress)?;
            self.draw_loss_curve()?;
        }
        if self.metrics.is_none() {
            // Another rank than 0: rank 0 writes the checkpoints and grids.
            return Ok(());
        }
        if save {
            self.save_checkpoint(k, progress)?;
        }
        if draw {
            self.draw_grid(k, progress)?;
        }
        Ok(())
    }

    fn log_metrics(&mut self, k: u64, progress: &mut dyn Progress) -> Result<()> {
        let secs = self.window_start.elapsed().as_secs_f64();
        self.last_loss = self.trainer.take_mean_loss()?;
        if let Some(group) = &self.trainer.group {
            // The global batch's mean loss: the shards are of equal size.
            self.last_loss = group.average(self.last_loss)?;
        }
        let Some(metrics) = self.metrics.as_mut() else {
            return Ok(());
        };
        metrics.append(&Record {
            step: k,
            loss: self.last_loss,
            lr: self.trainer.current_lr(),
            grad_norm: self.trainer.last_grad_norm(),
            steps_per_s: self.cfg.train.log_every as f64 / secs.max(1e-9),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            skipped: self.trainer.skipped(),
        })?;
        progress.status(&format!("loss {:.2}", self.last_loss));
        self.window_start = Instant::now();
        Ok(())
    }

    fn save_checkpoint(&mut self, k: u64, progress: &mut dyn Progress) -> Result<()> {
        self.trainer.check_finite()?;
        let mut manifest = self.trainer.manifest(self.n);
        manifest.data = self.data_record.clone();
        let dir = checkpoint::save(
            &checkpoints_dir(self.run_dir),
            manifest,
            &self.trainer.state(),
            self.cfg.train.keep_last,
        )?;
        progress.note(&format!("step {k}: checkpoint {}", dir.display()));
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    fn draw_grid(&mut self, k: u64, progress: &mut dyn Progress) -> Result<()> {
        let path = grid_path(self.run_dir, k);
        progress.status(&format!("loss {:.2}, sampling", self.last_loss));
        self.trainer.write_grid(&path)?;
        progress.note(&format!("step {k}: samples {}", path.display()));
        self.last_grid = Some(path);
        Ok(())
    }

    fn summary(self) -> TrainSummary {
        let step = self.trainer.step();
        TrainSummary {
            steps: step,
            last_loss: self.last_loss,
            checkpoint: self
                .last_checkpoint
                .unwrap_or_else(|| checkpoints_dir(self.run_dir).join(checkpoint::dir_name(step))),
            grid: self
                .last_grid
                .unwrap_or_else(|| grid_path(self.run_dir, step)),
            skipped: self.trainer.skipped(),
            stopped: self.stopped,
            loss_curve: self.last_loss_curve,
        }
    }

    /// Redraws the loss curve from every line of `metrics.jsonl` (once there are 2 to draw),
    /// unless `train.plot_loss` is off; a failed write ends the run as a failed metrics line
    /// does.
    fn draw_loss_curve(&mut self) -> Result<()> {
        if !self.cfg.train.plot_loss {
            return Ok(());
        }
        let Some(metrics) = &self.metrics else {
            return Ok(());
        };
        let path = crate::plot::loss_curve_path(self.run_dir);
        if crate::plot::write_loss_curve(metrics.losses(), &path)? {
            self.last_loss_curve = Some(path);
        }
        Ok(())
    }
}

fn create_run_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        DdpmError::io(
            format!("cannot create the run directory {}", dir.display()),
            e,
        )
    })
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::fsio::write_bytes_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataSource;
    use crate::data::test_dir;
    use crate::progress::Silent;
    use crate::unet::UNetConfig;

    fn tiny(steps: u64) -> Config {
        let mut cfg = Config::mnist();
        // The data are handed to `train_on` directly; `folder` only lifts MNIST's 28×28 check.
        cfg.data.source = DataSource::Folder;
        cfg.model = UNetConfig {
            image_size: 8,
            base_channels: 8,
            channel_mults: vec![1, 2],
            groups: 4,
            dropout: 0.1,
            ..UNetConfig::mnist()
        };
        cfg.train.steps = steps;
        cfg.train.batch_size = 4;
        cfg.train.warmup_steps = 2;
        cfg.train.lr_decay = vec![];
        cfg.train.checkpoint_every = 3;
        cfg.train.keep_last = 5;
        cfg.train.sample_every = 0;
        cfg.train.log_every = 1;
        cfg.sample.n = 2;
        cfg.train.grid_steps = Some(4);
        cfg
    }

    fn pictures(n: i64) -> Dataset {
        let i = Tensor::arange(n * 64, (Kind::Int64, Device::Cpu));
        let px = (i * 37 + 11)
            .remainder(256)
            .to_kind(Kind::Uint8)
            .view([n, 1, 8, 8]);
        Dataset::from_pixels(px, "pictures").unwrap()
    }

    fn opts(dir: &Path, resume: bool) -> TrainOptions {
        TrainOptions {
            run_dir: dir.to_path_buf(),
            device: Device::Cpu,
            resume,
            resume_must_match: false,
            stop: StopFlag::new(),
            resume_data: ResumeData::default(),
        }
    }

    fn same_tensors(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
    }

    /// metrics.jsonl of a run as JSON objects, one a line.
    fn metrics_lines(run: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_metrics_line_holds_the_mean_loss_and_the_rate_since_the_line_before() {
        let _guard = crate::sampler::rng_lock();
        let field = |line: &serde_json::Value, key: &str| line[key].as_f64().unwrap();
        let mut cfg = tiny(4);
        let each = test_dir("train_log_each");
        train_on(&cfg, pictures(10), &opts(&each, false), None, &mut Silent).unwrap();
        cfg.train.log_every = 2;
        let pairs = test_dir("train_log_pairs");
        train_on(&cfg, pictures(10), &opts(&pairs, false), None, &mut Silent).unwrap();
        let (each, pairs) = (metrics_lines(&each), metrics_lines(&pairs));
        assert_eq!((each.len(), pairs.len()), (4, 2));
        // Logging does not change the run, so a line every second step holds the mean of the
        // two per-step losses (both sums of the same f64 numbers).
        for (i, line) in pairs.iter().enumerate() {
            assert_eq!(field(line, "step"), 2.0 * (i + 1) as f64);
            let want = (field(&each[2 * i], "loss") + field(&each[2 * i + 1], "loss")) / 2.0;
            let got = field(line, "loss");
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "line {i}: {got}, mean {want}"
            );
        }
        for lines in [&each, &pairs] {
            // Each rate is that of its own window, log_every steps; the windows are disjoint
            // and inside the run, so their lengths add up to no more than its time.
            let every = 4 / lines.len();
            let windows: f64 = lines
                .iter()
                .map(|l| every as f64 / field(l, "steps_per_s"))
                .sum();
            let run = field(lines.last().unwrap(), "elapsed_s");
            assert!(
                windows > 0.0 && windows <= run,
                "windows {windows} s, run {run} s"
            );
            for l in lines.iter() {
                assert!(field(l, "grad_norm") > 0.0, "{l}");
            }
        }
    }

    fn ckpt_at(run: &Path, step: u64) -> Checkpoint {
        checkpoint::load(&checkpoints_dir(run).join(checkpoint::dir_name(step))).unwrap()
    }

    #[test]
    fn a_weight_that_is_not_finite_is_a_typed_error_naming_it() {
        let trainer = Trainer::new(&tiny(1), Device::Cpu).unwrap();
        trainer.check_finite().unwrap();
        let (name, w) = trainer.vs.variables().into_iter().next().unwrap();
        let _ = tch::no_grad(|| w.view([-1]).get(0).fill_(f64::INFINITY));
        match trainer.check_finite() {
            Err(DdpmError::StateMismatch {
                part: "weights",
                reason,
            }) => {
                assert!(reason.contains(&name), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_resumed_run_ends_bitwise_where_an_uninterrupted_one_does() {
        let _guard = crate::sampler::rng_lock();
        let cfg = tiny(7);
        let whole = test_dir("train_whole");
        let summary =
            train_on(&cfg, pictures(10), &opts(&whole, false), None, &mut Silent).unwrap();
        assert_eq!(summary.steps, 7);
        assert!(summary.grid.exists());
        let lines = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 7);

        let resumed = test_dir("train_resumed");
        let from = checkpoints_dir(&resumed).join("step-0000003");
        std::fs::create_dir_all(&from).unwrap();
        for entry in std::fs::read_dir(checkpoints_dir(&whole).join("step-0000003")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), from.join(entry.file_name())).unwrap();
        }
        let ckpt = checkpoint::latest_good(&checkpoints_dir(&resumed))
            .unwrap()
            .unwrap();
        assert_eq!(ckpt.manifest.step, 3);
        train_on(
            &cfg,
            pictures(10),
            &opts(&resumed, true),
            Some(ckpt),
            &mut Silent,
        )
        .unwrap();

        let a = ckpt_at(&whole, 7);
        let b = ckpt_at(&resumed, 7);
        assert!(
            same_tensors(&a.state.model, &b.state.model),
            "weights differ"
        );
        assert!(same_tensors(&a.state.ema, &b.state.ema), "EMA differs");
        assert!(
            same_tensors(&a.state.optim, &b.state.optim),
            "LAMB state differs"
        );
        let start = ckpt_at(&whole, 3);
        // The manifest says where the next step, the 0-based k-th batch, reads.
        for ckpt in [&start, &a] {
            let (k, at) = (ckpt.manifest.step, ckpt.manifest.data_position);
            let per = at.steps_per_epoch;
            assert!(
                per >= 1 && (at.epoch, at.batch_in_epoch) == (k / per, k % per),
                "{at:?}"
            );
        }
        assert!(
            !same_tensors(&start.state.model, &a.state.model),
            "training did not move the weights"
        );

        let err =
            train_on(&cfg, pictures(10), &opts(&whole, false), None, &mut Silent).unwrap_err();
        assert!(matches!(err, DdpmError::RunExists { .. }), "{err}");
    }

    #[test]
    fn a_raised_stop_ends_the_run_after_its_step_with_a_checkpoint_and_the_lock_is_exclusive() {
        let _guard = crate::sampler::rng_lock();
        let cfg = tiny(7);
        let dir = test_dir("train_stop");
        let o = opts(&dir, false);
        o.stop.raise();
        let summary = train_on(&cfg, pictures(10), &o, None, &mut Silent).unwrap();
        assert!(summary.stopped);
        assert_eq!(summary.steps, 1);
        assert_eq!(
            summary.checkpoint,
            checkpoints_dir(&dir).join("step-0000001")
        );
        assert_eq!(
            checkpoint::load(&summary.checkpoint).unwrap().manifest.step,
            1
        );

        let held = RunLock::acquire(&dir).unwrap();
        let err = train_on(&cfg, pictures(10), &opts(&dir, true), None, &mut Silent).unwrap_err();
        let DdpmError::RunLocked { pid, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(pid, Some(std::process::id()));
        drop(held);
        RunLock::acquire(&dir).unwrap();
    }

    /// A resume of a run directory that does not exist fails having created nothing (no
    /// directory, no lock file): a mistyped `--out` leaves no empty run behind.
    #[test]
    fn resuming_a_directory_that_does_not_exist_fails_and_creates_nothing() {
        let parent = test_dir("train_resume_missing");
        let dir = parent.join("typo");
        let err = train(&tiny(3), &opts(&dir, true), None, &mut Silent).unwrap_err();
        assert!(
            matches!(&err, DdpmError::Checkpoint { reason, .. } if reason.contains("no checkpoint")),
            "{err}"
        );
        assert!(!dir.exists());
    }

    /// Eight 8×8 grey pictures as PNG files in a fresh directory named `name`.
    fn picture_folder(name: &str) -> crate::data::TestDir {
        let images = test_dir(name);
        for i in 0..8u8 {
            image::GrayImage::from_fn(8, 8, |x, y| image::Luma([i * 30 + (x + y) as u8]))
                .save(images.join(format!("{i}.png")))
                .unwrap();
        }
        images
    }

    /// What a run reports, in order (statuses left out).
    #[derive(Default)]
    struct Reports(Vec<String>);

    impl Progress for Reports {
        fn start(&mut self, total: u64, done: u64, unit: &'static str) {
            self.0.push(format!("start {total} {done} {unit}"));
        }
        fn update(&mut self, done: u64) {
            self.0.push(format!("update {done}"));
        }
        fn note(&mut self, line: &str) {
            self.0.push(format!("note {line}"));
        }
        fn warn(&mut self, line: &str) {
            self.0.push(format!("warn {line}"));
        }
        fn finish(&mut self) {
            self.0.push("finish".into());
        }
    }

    /// A run without a group is rank 0 and reports to its caller itself: the steps to do,
    /// each one done, each file written and the end (only other ranks are kept to warnings).
    #[test]
    fn a_lone_run_reports_its_steps_its_files_and_its_end() {
        let _guard = crate::sampler::rng_lock();
        let images = picture_folder("train_reports_images");
        let mut cfg = tiny(3);
        cfg.data.path = Some(images.to_path_buf());
        cfg.data.holdout = 2;
        let dir = test_dir("train_reports_run");
        let mut reports = Reports::default();
        let summary = train(&cfg, &opts(&dir, false), None, &mut reports).unwrap();
        let ckpt = format!("note step 3: checkpoint {}", summary.checkpoint.display());
        let grid = format!("note step 3: samples {}", summary.grid.display());
        assert_eq!(
            reports.0,
            [
                "start 3 0 steps",
                "update 1",
                "update 2",
                "update 3",
                &ckpt,
                &grid,
                "finish"
            ]
        );
    }

    /// A fresh run creates its directory, parents included, and writes there the
    /// configuration it ran with, which reads back as that configuration.
    #[test]
    fn a_fresh_run_creates_its_directory_and_writes_its_config_there() {
        let _guard = crate::sampler::rng_lock();
        let root = test_dir("train_fresh_dir");
        let dir = root.join("runs").join("first");
        let cfg = tiny(1);
        train_on(&cfg, pictures(10), &opts(&dir, false), None, &mut Silent).unwrap();
        assert_eq!(Config::from_file(&dir.join("config.toml")).unwrap(), cfg);
    }

    /// A stop asked for during the last step changes nothing: the run is complete, not
    /// stopped.
    #[test]
    fn a_stop_raised_in_the_last_step_leaves_a_complete_run() {
        let _guard = crate::sampler::rng_lock();
        let dir = test_dir("train_stop_last");
        let o = opts(&dir, false);
        o.stop.raise();
        let summary = train_on(&tiny(1), pictures(10), &o, None, &mut Silent).unwrap();
        assert_eq!((summary.steps, summary.stopped), (1, false));
        assert!(summary.grid.is_file());
    }

    /// A stop asked for in a step that writes a checkpoint ends the run on that checkpoint,
    /// written once.
    #[test]
    fn a_stop_in_a_checkpoint_step_writes_that_checkpoint_once() {
        /// Raises the stop when step `.0` is reported done; keeps the notes.
        struct StopAt(u64, StopFlag, Reports);
        impl Progress for StopAt {
            fn update(&mut self, done: u64) {
                if done == self.0 {
                    self.1.raise();
                }
            }
            fn note(&mut self, line: &str) {
                self.2.note(line);
            }
        }
        let _guard = crate::sampler::rng_lock();
        let dir = test_dir("train_stop_checkpoint");
        let o = opts(&dir, false);
        let mut progress = StopAt(3, o.stop.clone(), Reports::default());
        let summary = train_on(&tiny(7), pictures(10), &o, None, &mut progress).unwrap();
        assert_eq!((summary.steps, summary.stopped), (3, true));
        let ckpt = format!("note step 3: checkpoint {}", summary.checkpoint.display());
        assert_eq!(progress.2 .0, [ckpt]);
    }

    /// A grid is drawn every `train.sample_every` steps and at the end; with 0, only at the
    /// end.
    #[test]
    fn grids_are_drawn_every_sample_every_steps_and_at_the_end() {
        let _guard = crate::sampler::rng_lock();
        for (every, steps) in [(2, vec![2, 4, 5]), (0, vec![5])] {
            let mut cfg = tiny(5);
            cfg.train.sample_every = every;
            let dir = test_dir("train_grids");
            train_on(&cfg, pictures(10), &opts(&dir, false), None, &mut Silent).unwrap();
            let mut drawn: Vec<PathBuf> = std::fs::read_dir(dir.join("samples"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            drawn.sort();
            let want: Vec<PathBuf> = steps.iter().map(|&k| grid_path(&dir, k)).collect();
            assert_eq!(drawn, want, "sample_every = {every}");
        }
    }

    #[test]
    fn a_resume_on_other_data_is_a_typed_error_unless_allowed() {
        let _guard = crate::sampler::rng_lock();
        let images = picture_folder("train_data_images");
        let mut cfg = tiny(3);
        cfg.data.path = Some(images.to_path_buf());
        cfg.data.holdout = 2;
        let dir = test_dir("train_data_run");
        train(&cfg, &opts(&dir, false), None, &mut Silent).unwrap();
        let first = ckpt_at(&dir, 3);
        let record = first.manifest.data.clone().unwrap();
        assert_eq!(record.path_given.as_deref(), Some(&*images));
        assert_eq!(
            first.manifest.config.data.path,
            Some(std::fs::canonicalize(&images).unwrap())
        );

        std::fs::copy(images.join("0.png"), images.join("9.png")).unwrap();
        let err = train(&cfg, &opts(&dir, true), Some(5), &mut Silent).unwrap_err();
        let DdpmError::DataChanged {
            saved,
            found,
            change,
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!((saved.count, found.count), (8, 9));
        assert_eq!(**saved, record.fingerprint);
        assert!(change.contains("1 added"), "{err}");
        assert!(checkpoint::list(&checkpoints_dir(&dir)).unwrap().len() == 1);

        let mut allowed = opts(&dir, true);
        allowed.resume_data.allow_change = true;
        train(&cfg, &allowed, Some(5), &mut Silent).unwrap();
        let last = ckpt_at(&dir, 5);
        assert_eq!(last.manifest.data.unwrap().fingerprint.count, 9);
    }

    #[test]
    fn a_non_finite_loss_stops_or_skips_without_writing_a_bad_checkpoint() {
        let _guard = crate::sampler::rng_lock();
        // Eight pictures, one of them NaN: each epoch has one bad batch of the two.
        let x =
            crate::data::pixels_to_model(&pictures(8).raw(&(0..8).collect::<Vec<_>>()).unwrap())
                .unwrap();
        let _ = x.get(5).fill_(f64::NAN);
        let data = Dataset::from_values(x, "with a NaN").unwrap();
        let mut cfg = tiny(6);
        let dir = test_dir("train_nan");
        let err = train_on(&cfg, data.clone(), &opts(&dir, false), None, &mut Silent).unwrap_err();
        let DdpmError::NonFinite { step, .. } = err else {
            panic!("{err}")
        };
        assert!(
            step <= 2,
            "the bad batch comes within the first epoch, got step {step}"
        );
        assert!(checkpoint::list(&checkpoints_dir(&dir))
            .unwrap()
            .iter()
            .all(|(s, _)| *s < step));

        cfg.train.skip_nonfinite = true;
        let dir = test_dir("train_nan_skip");
        let summary = train_on(&cfg, data, &opts(&dir, false), None, &mut Silent).unwrap();
        assert_eq!((summary.steps, summary.skipped), (6, 3));
        let last = checkpoint::load(&summary.checkpoint).unwrap();
        assert_eq!(last.manifest.skipped_steps, 3);
        assert!(last
            .state
            .model
            .iter()
            .all(|(_, w)| bool::try_from(w.isfinite().all()).unwrap()));
    }
}
