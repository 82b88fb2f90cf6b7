// C ABI for the ddpm-cuda crate over what tch lacks of libtorch's CUDA side: page-locked host
// memory (`at::Tensor::pin_memory()` without the device argument that tch always passes and
// libtorch 2.11 deprecates with a warning at every call), built in always; and CUDA graphs
// (at::cuda::CUDAGraph), compiled for real with DDPM_CUDA_GRAPH (the crate's `cuda` feature) —
// without it every graph entry point answers that it is not built in, so the crate builds on
// any machine.
//
// Errors follow scripts/shim_errors.h: a C++ exception never crosses into Rust; a failure is a
// malloc'd message (free it with ddpm_cuda_graph_free_error), success a null pointer.
//
// A graph cannot be captured on the legacy default stream, so the work to capture (and its
// warm-up) runs on a pooled side stream: `enter` makes it current once it has waited for what the
// current stream has queued, `leave` restores the previous stream and makes it wait for the side
// stream's work. Between `capture_begin` and `capture_end` libtorch's ops (tch's) are recorded,
// not run; allocations come from the graph's private memory pool, which it keeps for its
// replays. `replay` launches the recorded kernels again, on the current stream, on the same
// memory: new inputs are copied into the tensors the captured ops read.

#include <cstdlib>

#include <ATen/core/Tensor.h>

#ifdef DDPM_CUDA_GRAPH
// c10's device-generic event and stream guard dispatch to c10_cuda at run time; their CUDA
// forms (CUDAEvent, CUDAStreamGuard) are inline calls into the CUDA runtime, which would have
// to be linked here, and libcudart is not where the binary's RUNPATH and LD_LIBRARY_PATH look.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#endif

#include "shim_errors.h"

namespace {

using ddpm_shim::message;

template <typename F>
char* guarded(F&& body) {
  return ddpm_shim::guarded(body, "unknown C++ exception in the CUDA graph shim");
}

#ifdef DDPM_CUDA_GRAPH
struct Graph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  std::optional<c10::StreamGuard> guard;
  explicit Graph(c10::DeviceIndex device)
      : side(c10::cuda::getStreamFromPool(false, device)) {}
};


// `later` waits for the work queued on `earlier` so far (on the device, not the host).
void wait_for(c10::cuda::CUDAStream later, c10::cuda::CUDAStream earlier) {
  c10::Event done(c10::DeviceType::CUDA);
  done.record(earlier.unwrap());
  done.block(later.unwrap());
}

Graph* as_graph(void* g) { return static_cast<Graph*>(g); }
#else
char* not_built() {
  return message(
      "this build has no CUDA graphs: ddpm-cuda was compiled without its `cuda` feature "
      "(build with --features cuda-graph, scripts/build-nccl.sh)");
}
#endif

}  // namespace

extern "C" {

void ddpm_cuda_graph_free_error(char* err) { std::free(err); }

// `*out` = a new `at::Tensor*` holding `tensor`'s values in page-locked memory (tch takes it
// over with Tensor::from_ptr); libtorch's error where no accelerator is there to pin for.
char* ddpm_cuda_pin_memory(void* tensor, void** out) {
  return guarded([&] {
    *out = new at::Tensor(static_cast<at::Tensor*>(tensor)->pin_memory());
  });
}

int ddpm_cuda_graph_built() {
#ifdef DDPM_CUDA_GRAPH
  return 1;
#else
  return 0;
#endif
}

char* ddpm_cuda_graph_new(int device, void** out) {
#ifdef DDPM_CUDA_GRAPH
  return guarded([&] { *out = new Graph(static_cast<c10::DeviceIndex>(device)); });
#else
  (void)device;
  *out = nullptr;
  return not_built();
#endif
}

char* ddpm_cuda_graph_enter(void* g) {
#ifdef DDPM_CUDA_GRAPH
  return guarded([&] {
    Graph* graph = as_graph(g);
    wait_for(graph->side, c10::cuda::getCurrentCUDAStream(graph->side.device_index()));
    graph->guard.emplace(graph->side.unwrap());
  });
#else
  (void)g;
  return not_built();
#endif
}

char* ddpm_cuda_graph_capture_begin(void* g) {
#ifdef DDPM_CUDA_GRAPH
  return guarded([&] { as_graph(g)->graph.capture_begin(); });
#else
  (void)g;
  return not_built();
#endif
}

char* ddpm_cuda_graph_capture_end(void* g) {
#ifdef DDPM_CUDA_GRAPH
  return guarded([&] { as_graph(g)->graph.capture_end(); });
#else
  (void)g;
  return not_built();
#endif
}

// Restores the stream `enter` replaced (whatever happened in between) and orders it after the
// side stream's work.
char* ddpm_cuda_graph_leave(void* g) {
#ifdef DDPM_CUDA_GRAPH
  Graph* graph = as_graph(g);
  if (!graph->guard.has_value()) {
    return nullptr;
  }
  graph->guard.reset();
  return guarded([&] {
    wait_for(c10::cuda::getCurrentCUDAStream(graph->side.device_index()), graph->side);
  });
#else
  (void)g;
  return not_built();
#endif
}

char* ddpm_cuda_graph_replay(void* g) {
#ifdef DDPM_CUDA_GRAPH
  return guarded([&] { as_graph(g)->graph.replay(); });
#else
  (void)g;
  return not_built();
#endif
}

void ddpm_cuda_graph_destroy(void* g) {
#ifdef DDPM_CUDA_GRAPH
  delete as_graph(g);
#else
  (void)g;
#endif
}

}  // extern "C"
