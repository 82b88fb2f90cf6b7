// C ABI over libtorch's c10d (Gloo on CPU; NCCL on CUDA when compiled with USE_C10D_NCCL, the
// ddpm-c10d crate's `nccl` feature) for the ddpm-c10d crate.
//
// Every entry point catches everything: a C++ exception never crosses into Rust. Errors come back
// as a malloc'd message (free it with ddpm_c10d_free_error); success is a null pointer.
// Tensors are tch's `at::Tensor*` (tch::Tensor::as_mut_ptr()).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <optional>

#include "shim_errors.h"

namespace {

struct PG {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int world;
  std::chrono::milliseconds timeout;
  // NCCL's GPU: a tensor elsewhere (a CPU scalar, a flag) is copied there and back.
  std::optional<at::Device> device;
};

using ddpm_shim::message;

template <typename F>
char* guarded(F&& body) {
  return ddpm_shim::guarded(body, "unknown C++ exception in c10d");
}

// A listening IPv4 socket bound to `addr:port`, so that the TCPStore server does not listen on
// every interface (its default).
int bound_listener(const std::string& addr, uint16_t port) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  if (inet_pton(AF_INET, addr.c_str(), &sa.sin_addr) != 1) {
    throw std::runtime_error("MASTER_ADDR `" + addr + "` is not an IPv4 address");
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  }
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 || ::listen(fd, 128) != 0) {
    std::string err = std::strerror(errno);
    ::close(fd);
    throw std::runtime_error("cannot listen on " + addr + ":" + std::to_string(port) + ": " + err);
  }
  return fd;
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  work->wait(timeout);
}

void check_world(int rank, int world) {
  if (world < 1 || rank < 0 || rank >= world) {
    throw std::runtime_error(
        "rank " + std::to_string(rank) + " is not in a world of size " + std::to_string(world));
  }
}

// The TCPStore every rank joins (rank 0 serving it, bound to master_addr, when `serve`), under
// `prefix` when it is not empty.
c10::intrusive_ptr<c10d::Store> join_store(
    const char* master_addr,
    uint16_t port,
    int rank,
    int world,
    std::chrono::milliseconds timeout,
    int serve,
    const char* prefix) {
  std::string host(master_addr);
  c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = serve != 0 && rank == 0;
  opts.numWorkers = static_cast<std::size_t>(world);
  opts.waitWorkers = true;
  opts.timeout = timeout;
  if (opts.isServer) {
    opts.masterListenFd = bound_listener(host, port);
  }
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(host, opts);
  if (prefix != nullptr && prefix[0] != '\0') {
    store = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
  }
  return store;
}

// The tensor the collective runs on: `t` itself, or (NCCL, `t` not on its GPU) a copy there.
at::Tensor on_device(const PG& g, const at::Tensor& t) {
  if (g.device.has_value() && t.device() != *g.device) {
    return t.to(*g.device);
  }
  return t;
}

// Back into the caller's tensor when the collective ran on a copy (the copy to the CPU waits
// for the collective's stream).
void copy_back(at::Tensor* tensor, const at::Tensor& used) {
  if (!used.is_same(*tensor)) {
    tensor->copy_(used);
  }
}

} // namespace

extern "C" {

void ddpm_c10d_free_error(char* err) {
  std::free(err);
}

// With `serve` set, rank 0 runs the TCPStore server on master_addr:port (bound there only);
// without it the server is already there (torchrun's agent store, TORCHELASTIC_USE_AGENT_STORE)
// and every rank, rank 0 too, is a client. Every rank connects to it and builds a Gloo group,
// its keys under the prefix `prefix`, whose transport binds to `gloo_host` (an address or host
// name of this machine; null or empty: libtorch's default device, this host's name).
char* ddpm_c10d_init_gloo(
    const char* master_addr,
    uint16_t port,
    int rank,
    int world,
    int64_t timeout_ms,
    const char* gloo_host,
    int serve,
    const char* prefix,
    void** out) {
  return guarded([&] {
    *out = nullptr;
    check_world(rank, world);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = join_store(master_addr, port, rank, world, timeout, serve, prefix);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (gloo_host != nullptr && gloo_host[0] != '\0') {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(gloo_host));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    *out = new PG{store, gloo, world, timeout, std::nullopt};
  });
}

// 1 when this shim was compiled with NCCL (USE_C10D_NCCL), else 0.
int ddpm_c10d_has_nccl(void) {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// As ddpm_c10d_init_gloo, an NCCL group on GPU `device_index` (this rank's cuda:LOCAL_RANK,
// made the current device): one GPU per rank. Without USE_C10D_NCCL: an error saying so.
char* ddpm_c10d_init_nccl(
    const char* master_addr,
    uint16_t port,
    int rank,
    int world,
    int64_t timeout_ms,
    int device_index,
    int serve,
    const char* prefix,
    void** out) {
  return guarded([&] {
    *out = nullptr;
#ifdef USE_C10D_NCCL
    check_world(rank, world);
    if (device_index < 0 || device_index >= static_cast<int>(c10::cuda::device_count())) {
      throw std::runtime_error(
          "CUDA device " + std::to_string(device_index) + " is not one of the " +
          std::to_string(static_cast<int>(c10::cuda::device_count())) + " visible devices");
    }
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
    auto store = join_store(master_addr, port, rank, world, timeout, serve, prefix);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
    nccl->setBoundDeviceId(device);
    *out = new PG{store, nccl, world, timeout, device};
#else
    (void)master_addr;
    (void)port;
    (void)rank;
    (void)world;
    (void)timeout_ms;
    (void)device_index;
    (void)serve;
    (void)prefix;
    throw std::runtime_error("this ddpm-c10d was built without NCCL (cargo feature `nccl`)");
#endif
  });
}

// In place: the sum over ranks, or (average != 0) the sum divided by the world size.
char* ddpm_c10d_allreduce(void* pg, at::Tensor* tensor, int average) {
  return guarded([&] {
    auto* g = static_cast<PG*>(pg);
    at::Tensor used = on_device(*g, *tensor);
    std::vector<at::Tensor> tensors{used};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = g->timeout;
    wait(g->backend->allreduce(tensors, opts), g->timeout);
    if (average != 0 && g->world > 1) {
      used.div_(static_cast<double>(g->world));
    }
    copy_back(tensor, used);
  });
}

// In place: every rank gets root's tensor.
char* ddpm_c10d_broadcast(void* pg, at::Tensor* tensor, int root) {
  return guarded([&] {
    auto* g = static_cast<PG*>(pg);
    at::Tensor used = on_device(*g, *tensor);
    std::vector<at::Tensor> tensors{used};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    wait(g->backend->broadcast(tensors, opts), g->timeout);
    copy_back(tensor, used);
  });
}

char* ddpm_c10d_barrier(void* pg) {
  return guarded([&] {
    auto* g = static_cast<PG*>(pg);
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait(g->backend->barrier(opts), g->timeout);
  });
}

void ddpm_c10d_destroy(void* pg) {
  try {
    delete static_cast<PG*>(pg);
  } catch (...) {
  }
}

} // extern "C"
