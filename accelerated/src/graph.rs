//! CUDA-graph replay of a noise predictor (`ddpm sample --cuda-graph`): [`Graphed`] captures
//! the predictor's call once per batch shape, through the `ddpm-cuda` crate's shim over
//! libtorch's `at::cuda::CUDAGraph`, and then answers every call with one graph launch instead
//! of the network's hundreds of kernel launches: the sampler's loop is the same, step for step.
//!
//! The predictor must be capturable (device work only, see `ddpm_cuda_graph`): the U-Net is
//! (its shape checks read sizes, not values), and so is `generate`'s guided one (its labels are
//! on the device already); autocast is not (its cache of cast weights outlives the capture:
//! `generate` refuses the pair; bfloat16 weights do the same work without it). What cannot be
//! captured fails with [`DdpmError::Cuda`], not a panic.

use crate::error::{DdpmError, Result};
use crate::sampler::NoisePredictor;
use ddpm_cuda::CudaGraph;
use std::cell::RefCell;
use tch::{Device, Tensor};

/// Whether this build can capture CUDA graphs (the `cuda-graph` feature).
pub fn is_built() -> bool {
    ddpm_cuda::is_built()
}

/// Calls of the predictor before the capture (cuDNN's algorithm choice, the allocator's
/// blocks), as PyTorch's `torch.cuda.graph` recipe asks.
const WARMUP_CALLS: usize = 3;

/// A new tensor holding `t`'s values (shape, kind, device and strides of `t`).
fn fresh_copy(t: &Tensor) -> Result<Tensor> {
    let mut copy = t.f_empty_like()?;
    copy.f_copy_(t)?;
    Ok(copy)
}

/// The graph of one batch shape: its input tensors, its output and the graph.
struct Captured {
    shape: Vec<i64>,
    x: Tensor,
    t: Tensor,
    eps: Tensor,
    graph: CudaGraph,
}

/// `model`, each call replayed from a CUDA graph captured at the first call of its shape
/// (when enabled; else `model` itself, call for call).
pub struct Graphed<'a, M: ?Sized> {
    model: &'a M,
    enabled: bool,
    captured: RefCell<Option<Captured>>,
}

impl<'a, M: NoisePredictor + ?Sized> Graphed<'a, M> {
    /// `model` behind a graph (captured at the first call) when `enabled`
    /// (`SampleOptions::cuda_graph`), else passed through.
    pub fn new(model: &'a M, enabled: bool) -> Self {
        Graphed {
            model,
            enabled,
            captured: RefCell::new(None),
        }
    }

    fn capture(&self, x_t: &Tensor, t: &Tensor) -> Result<Captured> {
        let index = match x_t.device() {
            Device::Cuda(i) => i,
            other => {
                return Err(DdpmError::Incompatible {
                    key: "cuda_graph",
                    other: "the device".into(),
                    reason: format!("CUDA graphs need a CUDA device, the batch is on {other:?}"),
                })
            }
        };
        // The graph reads its inputs from these tensors: allocated outside the capture.
        let x = fresh_copy(x_t)?;
        let t_in = fresh_copy(t)?;
        // The predictor's own error, if it fails in the warm-up or the capture, says more than
        // the invalidated capture that follows it.
        let mut failed = None;
        let captured = CudaGraph::capture(index, WARMUP_CALLS, || {
            match tch::no_grad(|| self.model.predict(&x, &t_in)) {
                Ok(eps) => Some(eps),
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let (graph, eps) = captured?;
        let eps = eps.ok_or_else(|| DdpmError::ShapeMismatch {
            what: "the captured prediction",
            expected: "the predictor's output".into(),
            got: Vec::new(),
        })?;
        Ok(Captured {
            shape: x_t.size(),
            x,
            t: t_in,
            eps,
            graph,
        })
    }
}

impl<M: NoisePredictor + ?Sized> NoisePredictor for Graphed<'_, M> {
    /// The model's ε̂, from a replay of its graph (captured for a new shape).
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        if !self.enabled {
            return self.model.predict(x_t, t);
        }
        let mut slot = self.captured.borrow_mut();
        let fits = slot
            .as_ref()
            .is_some_and(|c| c.shape == x_t.size() && c.x.kind() == x_t.kind());
        if !fits {
            *slot = Some(self.capture(x_t, t)?);
        }
        let c = slot.as_mut().ok_or_else(|| DdpmError::ShapeMismatch {
            what: "the captured graph",
            expected: "a graph for this batch".into(),
            got: x_t.size(),
        })?;
        tch::no_grad(|| -> Result<Tensor> {
            c.x.f_copy_(x_t)?;
            c.t.f_copy_(t)?;
            c.graph.replay()?;
            // The next replay rewrites the output: hand out a copy.
            fresh_copy(&c.eps)
        })
    }

    fn check_input(&self, shape: &[i64]) -> Result<()> {
        self.model.check_input(shape)
    }

    fn bytes_per_sample(&self) -> Option<u64> {
        self.model.bytes_per_sample()
    }
}
