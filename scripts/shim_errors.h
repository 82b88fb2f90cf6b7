// The error convention of this project's C++ shims (distributed/csrc/c10d_shim.cpp,
// cuda/csrc/cuda_shim.cpp; their build scripts put scripts/ on the include path):
// a C++ exception never crosses into Rust. An entry point returns null on success, else a
// malloc'd message that Rust reads once and hands back to the shim's free.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace ddpm_shim {

// A malloc'd copy of `what` (null if the allocation fails).
inline char* message(const std::string& what) {
  char* out = static_cast<char*>(std::malloc(what.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, what.c_str(), what.size() + 1);
  }
  return out;
}

// Runs `body`: null when it returns, else the message of what it threw (libtorch's without its
// C++ backtrace); `unknown` names anything thrown that is not a std::exception.
template <typename F>
char* guarded(F&& body, const char* unknown) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message(unknown);
  }
}

}  // namespace ddpm_shim
