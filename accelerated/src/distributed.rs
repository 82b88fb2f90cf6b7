//! Data-parallel training's plumbing (issue 16): the torchrun launch read from the environment,
//! a c10d process group (Gloo, through the `ddpm-c10d` crate, when the `distributed` feature is
//! on), and the gradient all-reduce through one flat buffer. See docs/distributed.md.
//!
//! Without torchrun's variables nothing changes: [`Launch::from_env`] gives `None`.

use std::time::Duration;

use tch::{Device, Tensor};

use crate::data::loader::Batch;
use crate::error::{DdpmError, Result};

/// The backends compiled into this build (`ddpm info` lists them).
pub fn backends() -> &'static [&'static str] {
    #[cfg(feature = "distributed")]
    {
        ddpm_c10d::BACKENDS
    }
    #[cfg(not(feature = "distributed"))]
    {
        &[]
    }
}

/// The default of `train.distributed_timeout_s`: how long a rank waits for the others (to
/// join, and at every collective) before it gives up with an error naming them.
pub const DEFAULT_TIMEOUT_S: u64 = 300;

/// Where this process sits in a torchrun launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The rank on this node (picks the GPU where there are several).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the TCPStore at MASTER_ADDR:MASTER_PORT
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank, rank 0 too, joins it as a client.
    /// Otherwise (the variables set by hand) rank 0 serves it.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT` (0 when unset): the group's keys in the store are kept
    /// apart per restart.
    pub restart: u64,
}

const VARS: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl Launch {
    /// torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `None` when none of
    /// them is set, an error naming the variable when only some are, or one does not parse.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Launch::from_env`] over any variable source (the tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let values: Vec<Option<String>> = VARS.iter().map(|v| get(v)).collect();
        if values.iter().all(Option::is_none) {
            return Ok(None);
        }
        let value = |i: usize| -> Result<String> {
            values[i].clone().ok_or_else(|| DdpmError::DistributedEnv {
                var: VARS[i],
                value: String::new(),
                reason: format!(
                    "missing while {} set (launch with torchrun, or unset them all)",
                    VARS.iter()
                        .zip(&values)
                        .filter(|(_, v)| v.is_some())
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
        };
        let number = |i: usize| -> Result<usize> {
            let v = value(i)?;
            v.trim().parse().map_err(|_| DdpmError::DistributedEnv {
                var: VARS[i],
                value: v.clone(),
                reason: "not a non-negative integer".into(),
            })
        };
        let (rank, world_size, local_rank) = (number(0)?, number(1)?, number(2)?);
        let master_addr = value(3)?;
        let port = value(4)?;
        let master_port = port.trim().parse().map_err(|_| DdpmError::DistributedEnv {
            var: "MASTER_PORT",
            value: port.clone(),
            reason: "not a TCP port (0 to 65535)".into(),
        })?;
        if world_size == 0 || rank >= world_size {
            return Err(DdpmError::DistributedEnv {
                var: "RANK",
                value: rank.to_string(),
                reason: format!("not below WORLD_SIZE = {world_size}"),
            });
        }
        if master_addr.is_empty() {
            return Err(DdpmError::DistributedEnv {
                var: "MASTER_ADDR",
                value: master_addr,
                reason: "empty".into(),
            });
        }
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        let restart = get("TORCHELASTIC_RESTART_COUNT")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            agent_store,
            restart,
        }))
    }
}

/// The device of rank `local_rank` on this node: a CUDA choice becomes `cuda:LOCAL_RANK`
/// (one GPU per rank, as torchrun expects), refused with an error naming LOCAL_RANK when this
/// node shows `cuda_devices` GPUs or fewer; the CPU stays the CPU.
pub fn rank_device(device: Device, local_rank: usize, cuda_devices: i64) -> Result<Device> {
    match device {
        Device::Cuda(_) => {
            let visible = usize::try_from(cuda_devices).unwrap_or(0);
            if local_rank >= visible {
                return Err(DdpmError::DistributedEnv {
                    var: "LOCAL_RANK",
                    value: local_rank.to_string(),
                    reason: format!(
                        "this rank would train on cuda:{local_rank}, but {visible} CUDA device{} visible (one GPU per rank: start at most {visible} processes per node with --nproc_per_node, or train on the CPU)",
                        if visible == 1 { " is" } else { "s are" }
                    ),
                });
            }
            Ok(Device::Cuda(local_rank))
        }
        other => Ok(other),
    }
}

/// A joined group of ranks; collectives block until every rank has made the same call, or fail
/// after the timeout with an error naming this rank.
#[derive(Debug)]
pub struct ProcessGroup {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    #[cfg(feature = "distributed")]
    inner: ddpm_c10d::ProcessGroup,
}

impl ProcessGroup {
    /// Joins the launch's group for training on `device`: NCCL on this rank's GPU when
    /// `device` is CUDA and NCCL is built in (the `nccl` feature), else Gloo as
    /// [`ProcessGroup::join`] does (on CUDA without NCCL the gradients then travel through the
    /// CPU: see [`ProcessGroup::backend_for`]).
    pub fn join_on(launch: &Launch, timeout: Duration, device: Device) -> Result<ProcessGroup> {
        #[cfg(feature = "nccl")]
        {
            if let Device::Cuda(index) = device {
                let config = Self::c10d_config(launch, timeout);
                let inner = ddpm_c10d::ProcessGroup::nccl(&config, index).map_err(|e| {
                    DdpmError::Distributed {
                        rank: launch.rank,
                        world_size: launch.world_size,
                        op: e.op,
                        message: e.message,
                    }
                })?;
                return Ok(ProcessGroup {
                    rank: launch.rank,
                    world_size: launch.world_size,
                    timeout,
                    inner,
                });
            }
        }
        let _ = device;
        Self::join(launch, timeout)
    }

    /// The backend [`ProcessGroup::join_on`] takes for `device`, and, when that is Gloo for a
    /// CUDA device (NCCL not built in), what it costs: a note for the log.
    pub fn backend_for(device: Device) -> (&'static str, Option<String>) {
        match device {
            Device::Cuda(_) if backends().contains(&"nccl") => ("nccl", None),
            Device::Cuda(_) => (
                "gloo",
                Some(
                    "training on CUDA with Gloo: NCCL is not built in (cargo feature `nccl`, scripts/build-nccl.sh); each step copies the flat gradient buffer to the CPU and back and Gloo reduces it over TCP, correct but slower than NCCL"
                        .into(),
                ),
            ),
            _ => ("gloo", None),
        }
    }

    #[cfg(feature = "distributed")]
    fn c10d_config(launch: &Launch, timeout: Duration) -> ddpm_c10d::GlooConfig {
        let loopback = launch
            .master_addr
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
        ddpm_c10d::GlooConfig {
            master_addr: launch.master_addr.clone(),
            master_port: launch.master_port,
            rank: launch.rank,
            world_size: launch.world_size,
            timeout,
            gloo_host: loopback.then(|| launch.master_addr.clone()),
            serve_store: !launch.agent_store,
            store_prefix: format!("ddpm/{}/", launch.restart),
        }
    }

    /// `gloo` or `nccl` (`none` without the `distributed` feature).
    pub fn backend(&self) -> &'static str {
        #[cfg(feature = "distributed")]
        {
            self.inner.backend()
        }
        #[cfg(not(feature = "distributed"))]
        {
            "none"
        }
    }

    /// Where the collectives' buffers go: the CPU for Gloo, the group's GPU for NCCL.
    fn collective_device(&self) -> Device {
        #[cfg(feature = "distributed")]
        {
            self.inner.device()
        }
        #[cfg(not(feature = "distributed"))]
        {
            Device::Cpu
        }
    }

    /// Joins the launch's group (Gloo): rank 0 serves the TCPStore on MASTER_ADDR:MASTER_PORT,
    /// bound to that address only; Gloo's transport binds to MASTER_ADDR too when it is a
    /// loopback address (one machine), else to this host's name.
    pub fn join(launch: &Launch, timeout: Duration) -> Result<ProcessGroup> {
        #[cfg(feature = "distributed")]
        {
            let config = Self::c10d_config(launch, timeout);
            let inner =
                ddpm_c10d::ProcessGroup::gloo(&config).map_err(|e| DdpmError::Distributed {
                    rank: launch.rank,
                    world_size: launch.world_size,
                    op: e.op,
                    message: e.message,
                })?;
            Ok(ProcessGroup {
                rank: launch.rank,
                world_size: launch.world_size,
                timeout,
                inner,
            })
        }
        #[cfg(not(feature = "distributed"))]
        {
            let _ = timeout;
            Err(DdpmError::DistributedNotBuilt {
                rank: launch.rank,
                world_size: launch.world_size,
            })
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// A collective that failed: in a group that joined, that is a rank that exited (its
    /// sockets closed: at once) or did not answer within the timeout; the others are named.
    #[cfg(feature = "distributed")]
    fn error(&self, e: ddpm_c10d::C10dError) -> DdpmError {
        DdpmError::DistributedPeerLost {
            rank: self.rank,
            world_size: self.world_size,
            peers: others(self.rank, self.world_size),
            op: e.op,
            timeout_s: self.timeout.as_secs_f64(),
            message: e.message,
        }
    }

    /// Averages the gradients of `params` over the ranks in one all-reduce: the gradients are
    /// concatenated into one flat buffer (on the CPU for Gloo, the GPU for NCCL), reduced, divided by the world
    /// size and copied back. A parameter without a gradient adds zeros (so that every rank's
    /// buffer has the same layout) and keeps no gradient. Every rank must pass the same
    /// parameters in the same order, with the same kind.
    pub fn average_gradients(&self, params: &[Tensor]) -> Result<()> {
        if params.is_empty() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
        let flat: Vec<Tensor> = params
            .iter()
            .zip(&grads)
            .map(|(p, g)| {
                if g.defined() {
                    g.f_reshape([-1])
                } else {
                    p.f_zeros_like().and_then(|z| z.f_reshape([-1]))
                }
            })
            .collect::<std::result::Result<_, _>>()?;
        let mut buffer = Tensor::f_cat(&flat, 0)?.f_to_device(self.collective_device())?;
        self.all_reduce_average(&mut buffer)?;
        let mut offset = 0i64;
        for (p, mut g) in params.iter().zip(grads) {
            let n = p.numel() as i64;
            if g.defined() {
                let part = buffer.f_narrow(0, offset, n)?.f_view_as(&g)?;
                g.f_copy_(&part)?;
            }
            offset += n;
        }
        Ok(())
    }

    /// In place: the average of `tensor` over the ranks (a contiguous CPU tensor).
    pub fn all_reduce_average(&self, tensor: &mut Tensor) -> Result<()> {
        #[cfg(feature = "distributed")]
        {
            self.inner
                .all_reduce(tensor, ddpm_c10d::Reduce::Average)
                .map_err(|e| self.error(e))
        }
        #[cfg(not(feature = "distributed"))]
        {
            let _ = tensor;
            Ok(())
        }
    }

    /// In place: rank 0's `tensor` on every rank (a contiguous CPU tensor).
    pub fn broadcast_from_0(&self, tensor: &mut Tensor) -> Result<()> {
        #[cfg(feature = "distributed")]
        {
            self.inner.broadcast(tensor, 0).map_err(|e| self.error(e))
        }
        #[cfg(not(feature = "distributed"))]
        {
            let _ = tensor;
            Ok(())
        }
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        #[cfg(feature = "distributed")]
        {
            self.inner.barrier().map_err(|e| self.error(e))
        }
        #[cfg(not(feature = "distributed"))]
        {
            Ok(())
        }
    }
}

/// "rank 1" or "one of ranks 1, 2, 3": the ranks other than `rank`.
fn others(rank: usize, world_size: usize) -> String {
    let list: Vec<String> = (0..world_size)
        .filter(|&r| r != rank)
        .map(|r| r.to_string())
        .collect();
    match list.len() {
        1 => format!("rank {}", list[0]),
        _ => format!("one of ranks {}", list.join(", ")),
    }
}

impl ProcessGroup {
    /// Refuses to go on unless every rank holds the same `settings` (the resolved
    /// configuration and where the run resumes from, as text): rank 0's hash is broadcast,
    /// every rank compares it with its own, and the ranks that differ are gathered by an
    /// all-reduce, so that every rank fails, naming them.
    pub fn check_same_settings(&self, settings: &str) -> Result<()> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(settings.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let mine = i64::from_le_bytes(first);
        let mut theirs = Tensor::from_slice(&[mine]);
        self.broadcast_from_0(&mut theirs)?;
        let differs = i64::try_from(&theirs)? != mine;
        let mut flags = Tensor::f_zeros([self.world_size as i64], (tch::Kind::Float, Device::Cpu))?;
        if differs {
            let _ = flags.f_get(self.rank as i64)?.f_fill_(1.0)?;
        }
        self.all_reduce_average(&mut flags)?;
        let differing: Vec<usize> = Vec::<f32>::try_from(&flags)?
            .iter()
            .enumerate()
            .filter(|(_, f)| **f > 0.0)
            .map(|(r, _)| r)
            .collect();
        if differing.is_empty() {
            return Ok(());
        }
        Err(DdpmError::DistributedSettings {
            rank: self.rank,
            world_size: self.world_size,
            differing,
        })
    }

    /// Whether any rank asks to stop (a signal reaches the ranks at different steps; they
    /// must stop after the same one).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let mut t = Tensor::from_slice(&[f32::from(u8::from(flag))]);
        self.all_reduce_average(&mut t)?;
        Ok(f32::try_from(&t)? > 0.0)
    }

    /// The average of a number over the ranks (NaN if it is NaN anywhere).
    pub fn average(&self, value: f64) -> Result<f64> {
        let mut t = Tensor::from_slice(&[value]);
        self.all_reduce_average(&mut t)?;
        Ok(f64::try_from(&t)?)
    }
}

/// Refuses a global batch that `world_size` ranks cannot share equally
/// (`OutOfRange { key: "train.batch_size" }`).
pub fn check_batch_size(batch_size: usize, world_size: usize) -> Result<()> {
    if world_size == 0 || !batch_size.is_multiple_of(world_size) {
        return Err(DdpmError::OutOfRange {
            key: "train.batch_size",
            value: batch_size.to_string(),
            expected: format!(
                "a multiple of the world size {world_size} (the batch is global: each rank takes 1/{world_size} of it)"
            ),
        });
    }
    Ok(())
}

/// The progress of a rank other than 0: no bar, no notes (rank 0 reports the run); warnings
/// pass, prefixed with the rank.
pub struct RankProgress<'a> {
    pub rank: usize,
    pub inner: &'a mut dyn crate::progress::Progress,
}

impl crate::progress::Progress for RankProgress<'_> {
    fn warn(&mut self, line: &str) {
        self.inner.warn(&format!("rank {}: {line}", self.rank));
    }
}

/// Rank `rank`'s rows of a global batch of `world_size` equal shards: rows
/// `[rank·B/N, (rank+1)·B/N)` of x0, t and ε; the step and libtorch seed stay.
pub fn shard(batch: &Batch, rank: usize, world_size: usize) -> Result<Batch> {
    let b = batch.x0.size().first().copied().unwrap_or(0);
    let n = world_size as i64;
    if world_size == 0 || rank >= world_size || b % n != 0 {
        return Err(DdpmError::OutOfRange {
            key: "train.batch_size",
            value: b.to_string(),
            expected: format!("a multiple of the world size {world_size} (rank {rank})"),
        });
    }
    let per = b / n;
    let start = rank as i64 * per;
    Ok(Batch {
        step: batch.step,
        x0: batch.x0.f_narrow(0, start, per)?.f_contiguous()?,
        t: batch.t.f_narrow(0, start, per)?.f_contiguous()?,
        eps: batch.eps.f_narrow(0, start, per)?.f_contiguous()?,
        torch_seed: batch.torch_seed,
        y: match &batch.y {
            Some(y) => Some(y.f_narrow(0, start, per)?.f_contiguous()?),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| map.get(k).cloned())
    }

    const FULL: [(&str, &str); 5] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn no_torchrun_variables_is_no_launch() {
        assert_eq!(launch(&[]).unwrap(), None);
    }

    #[test]
    fn torchrun_variables_are_read() {
        assert_eq!(
            launch(&FULL).unwrap(),
            Some(Launch {
                rank: 1,
                world_size: 2,
                local_rank: 1,
                master_addr: "127.0.0.1".into(),
                master_port: 29500,
                agent_store: false,
                restart: 0,
            })
        );
    }

    #[test]
    fn a_missing_or_bad_variable_is_named() {
        for (drop, var) in [(0, "RANK"), (3, "MASTER_ADDR"), (4, "MASTER_PORT")] {
            let vars: Vec<_> = FULL
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != drop)
                .map(|(_, kv)| *kv)
                .collect();
            match launch(&vars) {
                Err(DdpmError::DistributedEnv { var: v, reason, .. }) => {
                    assert_eq!(v, var);
                    assert!(reason.contains("missing"), "{reason}");
                }
                other => panic!("without {var}: {other:?}"),
            }
        }
        let mut bad = FULL;
        bad[4] = ("MASTER_PORT", "70000");
        assert!(matches!(
            launch(&bad),
            Err(DdpmError::DistributedEnv {
                var: "MASTER_PORT",
                ..
            })
        ));
        bad = FULL;
        bad[0] = ("RANK", "2");
        let e = launch(&bad).unwrap_err();
        assert!(
            matches!(e, DdpmError::DistributedEnv { var: "RANK", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("WORLD_SIZE = 2"), "{e}");
        bad = FULL;
        bad[1] = ("WORLD_SIZE", "two");
        assert!(matches!(
            launch(&bad),
            Err(DdpmError::DistributedEnv {
                var: "WORLD_SIZE",
                ..
            })
        ));
    }

    #[test]
    fn backends_match_the_feature() {
        assert_eq!(backends().contains(&"gloo"), cfg!(feature = "distributed"));
        assert_eq!(backends().contains(&"nccl"), cfg!(feature = "nccl"));
    }

    #[test]
    fn the_backend_follows_the_device() {
        assert_eq!(ProcessGroup::backend_for(Device::Cpu), ("gloo", None));
        let (backend, note) = ProcessGroup::backend_for(Device::Cuda(1));
        if cfg!(feature = "nccl") {
            assert_eq!((backend, note), ("nccl", None));
        } else {
            assert_eq!(backend, "gloo");
            let note = note.expect("a note on what Gloo on CUDA costs");
            assert!(note.contains("`nccl`") && note.contains("CPU"), "{note}");
        }
    }

    #[test]
    fn local_rank_picks_the_gpu() {
        assert_eq!(rank_device(Device::Cuda(0), 0, 2).unwrap(), Device::Cuda(0));
        assert_eq!(rank_device(Device::Cuda(0), 1, 2).unwrap(), Device::Cuda(1));
        assert_eq!(rank_device(Device::Cuda(0), 3, 8).unwrap(), Device::Cuda(3));
        // The CPU is shared by every rank.
        assert_eq!(rank_device(Device::Cpu, 5, 0).unwrap(), Device::Cpu);
        assert_eq!(rank_device(Device::Cpu, 1, 1).unwrap(), Device::Cpu);
    }

    #[test]
    fn a_local_rank_without_its_gpu_is_named() {
        for (local_rank, visible) in [(1usize, 1i64), (2, 2), (0, 0)] {
            let e = rank_device(Device::Cuda(0), local_rank, visible).unwrap_err();
            match &e {
                DdpmError::DistributedEnv { var, value, reason } => {
                    assert_eq!(*var, "LOCAL_RANK");
                    assert_eq!(value, &local_rank.to_string());
                    assert!(reason.contains(&format!("cuda:{local_rank}")), "{reason}");
                    assert!(
                        reason.contains(&format!("{visible} CUDA device")),
                        "{reason}"
                    );
                }
                other => panic!("{other:?}"),
            }
            assert!(e.to_string().contains("LOCAL_RANK"), "{e}");
        }
    }
}
