//! What tch lacks of libtorch's CUDA side, through a small C++ shim (csrc/cuda_shim.cpp):
//! - [`pin_memory`]: a tensor's values in page-locked host memory, from which a copy to the GPU
//!   can run asynchronously. tch's `Tensor::pin_memory(device)` always passes a device, an
//!   argument libtorch 2.11 deprecates with a warning on stderr at every call.
//! - CUDA graphs: [`CudaGraph::capture`] records the kernels a closure launches (tch ops on
//!   CUDA tensors) once, [`CudaGraph::replay`] launches them all again at the cost of one
//!   launch, on the same memory. Compiled for real with the `cuda` feature (it needs CUDA
//!   13.0's `crt/` and `nv/` headers, as ddpm-c10d's `nccl`: scripts/build-nccl.sh); without
//!   it the crate still builds, anywhere, and every capture fails with a [`CudaError`] saying
//!   so.
//!
//! The shim catches every C++ exception: errors arrive here with libtorch's message.
//!
//! What a capture may hold is libtorch's rule: device work only — no host read of a device
//! value, no synchronisation, no copy from pageable host memory, no new random generator state.
//! Tensors the captured ops allocate come from the graph's private memory pool and are
//! rewritten by every replay; inputs are the tensors they read, allocated before the capture
//! (copy new values into them, then replay).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::NonNull;
use tch::Tensor;

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn ddpm_cuda_graph_free_error(err: *mut c_char);
        pub fn ddpm_cuda_pin_memory(tensor: *mut c_void, out: *mut *mut c_void) -> *mut c_char;
        pub fn ddpm_cuda_graph_built() -> c_int;
        pub fn ddpm_cuda_graph_new(device: c_int, out: *mut *mut c_void) -> *mut c_char;
        pub fn ddpm_cuda_graph_enter(graph: *mut c_void) -> *mut c_char;
        pub fn ddpm_cuda_graph_capture_begin(graph: *mut c_void) -> *mut c_char;
        pub fn ddpm_cuda_graph_capture_end(graph: *mut c_void) -> *mut c_char;
        pub fn ddpm_cuda_graph_leave(graph: *mut c_void) -> *mut c_char;
        pub fn ddpm_cuda_graph_replay(graph: *mut c_void) -> *mut c_char;
        pub fn ddpm_cuda_graph_destroy(graph: *mut c_void);
    }
}

/// A call of the shim that failed: which one, and libtorch's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CUDA {op} failed: {message}")]
pub struct CudaError {
    /// The call: `pin_memory`, or a graph's `new`, `enter`, `capture_begin`, `capture_end`,
    /// `leave` or `replay`.
    pub op: &'static str,
    /// libtorch's message (or this crate's, when CUDA graphs are not built in).
    pub message: String,
}

/// `t`'s values in a new tensor in page-locked ("pinned") host memory, from which a copy to
/// a CUDA device can be `non_blocking` (libtorch's caching host allocator keeps the block
/// alive until such a copy is done); libtorch's error where there is no GPU to pin for.
pub fn pin_memory(t: &Tensor) -> Result<Tensor, CudaError> {
    let mut src = t.shallow_clone();
    let mut out = std::ptr::null_mut();
    // SAFETY: `as_mut_ptr` is tch's `at::Tensor*`, valid for the call; on success `out` is a
    // new `at::Tensor*` that tch takes over.
    check("pin_memory", unsafe {
        ffi::ddpm_cuda_pin_memory(src.as_mut_ptr().cast(), &mut out)
    })?;
    if out.is_null() {
        return Err(CudaError {
            op: "pin_memory",
            message: "the shim returned no tensor".into(),
        });
    }
    // SAFETY: a fresh `at::Tensor*` from the shim, owned from here on.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Whether this build can capture graphs (the `cuda` feature).
pub fn is_built() -> bool {
    // SAFETY: a constant of the shim, no arguments.
    unsafe { ffi::ddpm_cuda_graph_built() != 0 }
}

/// Turns the shim's answer into a `Result`, freeing its message.
fn check(op: &'static str, err: *mut c_char) -> Result<(), CudaError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null answer is a NUL-terminated string malloc'd by the shim, read once and
    // freed by the shim's own free.
    let message = unsafe {
        let text = CStr::from_ptr(err).to_string_lossy().into_owned();
        ffi::ddpm_cuda_graph_free_error(err);
        text
    };
    Err(CudaError { op, message })
}

/// A captured CUDA graph on one device, with its private memory pool.
#[derive(Debug)]
pub struct CudaGraph {
    raw: NonNull<c_void>,
}

impl CudaGraph {
    /// Runs `body` `warmup` times and then captures one more call of it, all on a side stream
    /// of CUDA device `device` ordered after the work already queued; returns the graph and the
    /// captured call's value (its output tensors, which every [`replay`](Self::replay)
    /// rewrites). The warm-up lets cuDNN choose its algorithms and the allocator its blocks
    /// outside the capture, as PyTorch's `torch.cuda.graph` asks. The previous stream is
    /// current again afterwards, whatever happened.
    pub fn capture<T>(
        device: usize,
        warmup: usize,
        mut body: impl FnMut() -> T,
    ) -> Result<(CudaGraph, T), CudaError> {
        let index = c_int::try_from(device).map_err(|_| CudaError {
            op: "new",
            message: format!("no CUDA device {device}"),
        })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is written by the shim, a valid graph only on success.
        check("new", unsafe { ffi::ddpm_cuda_graph_new(index, &mut raw) })?;
        let graph = CudaGraph {
            raw: NonNull::new(raw).ok_or_else(|| CudaError {
                op: "new",
                message: "the shim returned no graph".into(),
            })?,
        };
        let p = graph.raw.as_ptr();
        // SAFETY: `p` is this live graph for every call below.
        check("enter", unsafe { ffi::ddpm_cuda_graph_enter(p) })?;
        // Restores the previous stream however this ends, a panic of `body` included.
        let side = SideStream(p);
        for _ in 0..warmup {
            drop(body());
        }
        check("capture_begin", unsafe {
            ffi::ddpm_cuda_graph_capture_begin(p)
        })?;
        let value = body();
        check("capture_end", unsafe {
            ffi::ddpm_cuda_graph_capture_end(p)
        })?;
        side.leave()?;
        Ok((graph, value))
    }

    /// Launches the captured work again on the current stream (asynchronously, as any kernel).
    pub fn replay(&self) -> Result<(), CudaError> {
        // SAFETY: `raw` is a live, captured graph.
        check("replay", unsafe {
            ffi::ddpm_cuda_graph_replay(self.raw.as_ptr())
        })
    }
}

/// The side stream `enter` made current: [`SideStream::leave`] restores the previous one and
/// reports how it went; dropped without it (an early return, a panic), it restores it quietly.
struct SideStream(*mut c_void);

impl SideStream {
    fn leave(self) -> Result<(), CudaError> {
        let p = self.0;
        std::mem::forget(self);
        // SAFETY: `p` is the live graph `enter` was called on.
        check("leave", unsafe { ffi::ddpm_cuda_graph_leave(p) })
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: as in `leave`; the error, if any, has nowhere to go.
        let _ = check("leave", unsafe { ffi::ddpm_cuda_graph_leave(self.0) });
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the graph was created by the shim and is dropped once.
        unsafe { ffi::ddpm_cuda_graph_destroy(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU pinning is libtorch's error, not a crash; with one, the
    /// values are the same and the memory is page-locked.
    #[test]
    fn pinning_copies_into_page_locked_memory_or_says_why_not() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        match pin_memory(&t) {
            Ok(pinned) => {
                assert!(tch::Cuda::is_available(), "pinned without a GPU");
                assert!(pinned.equal(&t));
                assert!(pinned.is_pinned(tch::Device::Cuda(0)));
            }
            Err(e) => {
                assert!(!tch::Cuda::is_available(), "a GPU, yet: {e}");
                assert_eq!(e.op, "pin_memory");
                assert!(!e.message.is_empty());
            }
        }
    }

    /// Without the `cuda` feature a capture is refused with a message that says how to build
    /// it in, and the body never runs (not even its warm-up).
    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_build_without_cuda_says_so() {
        assert!(!is_built());
        let mut ran = 0;
        let err = CudaGraph::capture(0, 2, || ran += 1).unwrap_err();
        assert_eq!(err.op, "new");
        assert!(err.message.contains("--features cuda-graph"), "{err}");
        assert_eq!(ran, 0);
    }

    /// Built in, a device that no machine has is libtorch's error through the shim (its C++
    /// exception caught), not a crash, and the body never runs; on any machine, GPU or not.
    #[test]
    #[cfg(feature = "cuda")]
    fn a_missing_device_is_an_error_from_libtorch() {
        assert!(is_built());
        let mut ran = 0;
        let err = CudaGraph::capture(1000, 2, || ran += 1).unwrap_err();
        assert_eq!(err.op, "new");
        assert!(
            err.message.contains("CUDA") || err.message.contains("device"),
            "{err}"
        );
        assert!(!err.message.contains("--features"), "{err}");
        assert_eq!(ran, 0);
    }
}
