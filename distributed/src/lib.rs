//! PyTorch's c10d process groups for tch tensors: a Gloo group (CPU) or, with the `nccl`
//! feature, an NCCL group (one GPU per rank) set up from a TCPStore, with in-place all-reduce,
//! broadcast and barrier.
//!
//! tch has no distributed API; this crate compiles a small C++ shim (csrc/c10d_shim.cpp) against
//! the c10d headers of the pinned libtorch and the gloo headers vendored in third_party/gloo
//! (see its README). The shim catches every C++ exception: errors arrive here as
//! [`C10dError`] with libtorch's message. See docs/distributed.md.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use tch::{Device, Tensor};

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn ddpm_c10d_free_error(err: *mut c_char);
        pub fn ddpm_c10d_init_gloo(
            master_addr: *const c_char,
            port: u16,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            gloo_host: *const c_char,
            serve: c_int,
            prefix: *const c_char,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn ddpm_c10d_init_nccl(
            master_addr: *const c_char,
            port: u16,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            device_index: c_int,
            serve: c_int,
            prefix: *const c_char,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn ddpm_c10d_allreduce(
            pg: *mut c_void,
            tensor: *mut c_void,
            average: c_int,
        ) -> *mut c_char;
        pub fn ddpm_c10d_broadcast(
            pg: *mut c_void,
            tensor: *mut c_void,
            root: c_int,
        ) -> *mut c_char;
        pub fn ddpm_c10d_barrier(pg: *mut c_void) -> *mut c_char;
        pub fn ddpm_c10d_destroy(pg: *mut c_void);
    }
}

/// A c10d call that failed: which one, and libtorch's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("c10d {op} failed: {message}")]
pub struct C10dError {
    /// `init`, `all_reduce`, `broadcast` or `barrier`.
    pub op: &'static str,
    pub message: String,
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    /// The sum divided by the world size (Gloo has no AVG: the shim divides after the sum).
    Average,
}

/// Where and how to meet the other ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlooConfig {
    /// The TCPStore's address (torchrun's MASTER_ADDR); rank 0's store listens there only.
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// For joining the store and for every collective.
    pub timeout: Duration,
    /// The address or host name of this machine that Gloo's transport binds to; `None`:
    /// libtorch's default device (this host's name).
    pub gloo_host: Option<String>,
    /// Whether rank 0 serves the TCPStore (bound to `master_addr`); `false` when one already
    /// listens there (torchrun's agent store: `TORCHELASTIC_USE_AGENT_STORE=True`), and every
    /// rank is a client.
    pub serve_store: bool,
    /// The prefix of the group's keys in the store (empty: none); torchrun's store is shared
    /// with its agents, and a restart needs fresh keys.
    pub store_prefix: String,
}

/// A Gloo or NCCL process group; destroyed on drop. Collectives are in place, on contiguous
/// tensors: CPU tensors for Gloo; for NCCL the group's GPU's, or CPU tensors that the shim
/// copies there and back (small ones: flags, a loss).
#[derive(Debug)]
pub struct ProcessGroup {
    raw: NonNull<c_void>,
    rank: usize,
    world_size: usize,
    device: Device,
}

/// The backends compiled into this crate.
#[cfg(not(feature = "nccl"))]
pub const BACKENDS: &[&str] = &["gloo"];
/// The backends compiled into this crate.
#[cfg(feature = "nccl")]
pub const BACKENDS: &[&str] = &["gloo", "nccl"];

fn check(op: &'static str, err: *mut c_char) -> Result<(), C10dError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string malloc'd by the shim, freed once here.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::ddpm_c10d_free_error(err) };
    Err(C10dError { op, message })
}

fn cstring(op: &'static str, what: &str, s: &str) -> Result<CString, C10dError> {
    CString::new(s).map_err(|_| C10dError {
        op,
        message: format!("{what} contains a NUL byte"),
    })
}

/// The C form of what both backends' init calls take from a [`GlooConfig`].
struct InitArgs {
    rank: c_int,
    world: c_int,
    timeout_ms: i64,
    addr: CString,
    prefix: CString,
}

/// `what` does not fit a C int, as an init error.
fn too_big(what: &str) -> C10dError {
    C10dError {
        op: "init",
        message: format!("{what} does not fit a C int"),
    }
}

impl InitArgs {
    fn new(config: &GlooConfig) -> Result<Self, C10dError> {
        Ok(Self {
            rank: c_int::try_from(config.rank).map_err(|_| too_big("rank"))?,
            world: c_int::try_from(config.world_size).map_err(|_| too_big("world size"))?,
            timeout_ms: i64::try_from(config.timeout.as_millis()).unwrap_or(i64::MAX),
            addr: cstring("init", "MASTER_ADDR", &config.master_addr)?,
            prefix: cstring("init", "the store prefix", &config.store_prefix)?,
        })
    }
}

impl ProcessGroup {
    /// The group a shim init call returned (`err`, `out`), on `device`.
    fn joined(
        config: &GlooConfig,
        err: *mut c_char,
        out: *mut c_void,
        device: Device,
    ) -> Result<Self, C10dError> {
        check("init", err)?;
        let raw = NonNull::new(out).ok_or_else(|| C10dError {
            op: "init",
            message: "the shim returned no group".into(),
        })?;
        Ok(Self {
            raw,
            rank: config.rank,
            world_size: config.world_size,
            device,
        })
    }

    /// Joins the group: blocks until all `world_size` ranks have joined the store, or fails after
    /// `timeout`.
    pub fn gloo(config: &GlooConfig) -> Result<Self, C10dError> {
        let op = "init";
        let a = InitArgs::new(config)?;
        let host = config
            .gloo_host
            .as_deref()
            .map(|h| cstring(op, "the Gloo host", h))
            .transpose()?;
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; `out` is written by the shim before it returns.
        let err = unsafe {
            ffi::ddpm_c10d_init_gloo(
                a.addr.as_ptr(),
                config.master_port,
                a.rank,
                a.world,
                a.timeout_ms,
                host.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()),
                c_int::from(config.serve_store),
                a.prefix.as_ptr(),
                &mut out,
            )
        };
        Self::joined(config, err, out, Device::Cpu)
    }

    /// Joins an NCCL group on GPU `cuda_index` (this rank's; made the current CUDA device):
    /// the store as for [`ProcessGroup::gloo`] (`gloo_host` is not used). NCCL needs one GPU
    /// per rank. Without the `nccl` feature: an error saying so.
    pub fn nccl(config: &GlooConfig, cuda_index: usize) -> Result<Self, C10dError> {
        let a = InitArgs::new(config)?;
        let index = c_int::try_from(cuda_index).map_err(|_| too_big("the CUDA device"))?;
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: as in `gloo`.
        let err = unsafe {
            ffi::ddpm_c10d_init_nccl(
                a.addr.as_ptr(),
                config.master_port,
                a.rank,
                a.world,
                a.timeout_ms,
                index,
                c_int::from(config.serve_store),
                a.prefix.as_ptr(),
                &mut out,
            )
        };
        Self::joined(config, err, out, Device::Cuda(cuda_index))
    }

    /// Where the collectives run: the CPU (Gloo) or the group's GPU (NCCL); a buffer there
    /// is reduced without a copy.
    pub fn device(&self) -> Device {
        self.device
    }

    /// `gloo` or `nccl`.
    pub fn backend(&self) -> &'static str {
        match self.device {
            Device::Cpu => "gloo",
            _ => "nccl",
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn cpu_contiguous(&self, op: &'static str, tensor: &Tensor) -> Result<(), C10dError> {
        let here = tensor.device() == Device::Cpu || tensor.device() == self.device;
        if !here || !tensor.is_contiguous() {
            let wanted = match self.device {
                Device::Cpu => "Gloo needs a contiguous CPU tensor".to_string(),
                d => format!("NCCL needs a contiguous tensor on {d:?} or the CPU"),
            };
            return Err(C10dError {
                op,
                message: format!(
                    "{wanted}, got one on {:?} (contiguous: {})",
                    tensor.device(),
                    tensor.is_contiguous()
                ),
            });
        }
        Ok(())
    }

    /// In place on every rank: the sum (or average) of the ranks' tensors, which must have the
    /// same shape and kind everywhere.
    pub fn all_reduce(&self, tensor: &mut Tensor, reduce: Reduce) -> Result<(), C10dError> {
        let op = "all_reduce";
        self.cpu_contiguous(op, tensor)?;
        let average = c_int::from(reduce == Reduce::Average);
        // SAFETY: `raw` is a live group; `as_mut_ptr` is tch's `at::Tensor*`, valid for the call.
        check(op, unsafe {
            ffi::ddpm_c10d_allreduce(self.raw.as_ptr(), tensor.as_mut_ptr().cast(), average)
        })
    }

    /// In place on every rank: `root`'s tensor.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), C10dError> {
        let op = "broadcast";
        self.cpu_contiguous(op, tensor)?;
        let root = c_int::try_from(root).map_err(|_| C10dError {
            op,
            message: "root does not fit a C int".into(),
        })?;
        // SAFETY: as in `all_reduce`.
        check(op, unsafe {
            ffi::ddpm_c10d_broadcast(self.raw.as_ptr(), tensor.as_mut_ptr().cast(), root)
        })
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<(), C10dError> {
        // SAFETY: `raw` is a live group.
        check("barrier", unsafe {
            ffi::ddpm_c10d_barrier(self.raw.as_ptr())
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim's init and is destroyed once, here.
        unsafe { ffi::ddpm_c10d_destroy(self.raw.as_ptr()) }
    }
}
