// C ABI over libtorch's c10d (Gloo on CPU) for the ddpm-c10d crate.
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

namespace {

struct PG {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
  int world;
  std::chrono::milliseconds timeout;
};

char* message(const std::string& what) {
  char* out = static_cast<char*>(std::malloc(what.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, what.c_str(), what.size() + 1);
  }
  return out;
}

template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception in c10d");
  }
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
    if (world < 1 || rank < 0 || rank >= world) {
      throw std::runtime_error(
          "rank " + std::to_string(rank) + " is not in a world of size " + std::to_string(world));
    }
    auto timeout = std::chrono::milliseconds(timeout_ms);
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
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (gloo_host != nullptr && gloo_host[0] != '\0') {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(gloo_host));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    *out = new PG{store, gloo, world, timeout};
  });
}

// In place: the sum over ranks, or (average != 0) the sum divided by the world size.
char* ddpm_c10d_allreduce(void* pg, at::Tensor* tensor, int average) {
  return guarded([&] {
    auto* g = static_cast<PG*>(pg);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = g->timeout;
    wait(g->gloo->allreduce(tensors, opts), g->timeout);
    if (average != 0 && g->world > 1) {
      tensor->div_(static_cast<double>(g->world));
    }
  });
}

// In place: every rank gets root's tensor.
char* ddpm_c10d_broadcast(void* pg, at::Tensor* tensor, int root) {
  return guarded([&] {
    auto* g = static_cast<PG*>(pg);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    wait(g->gloo->broadcast(tensors, opts), g->timeout);
  });
}

char* ddpm_c10d_barrier(void* pg) {
  return guarded([&] {
    auto* g = static_cast<PG*>(pg);
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait(g->gloo->barrier(opts), g->timeout);
  });
}

void ddpm_c10d_destroy(void* pg) {
  try {
    delete static_cast<PG*>(pg);
  } catch (...) {
  }
}

} // extern "C"
