//! Compiles csrc/c10d_shim.cpp against the c10d headers of the libtorch at LIBTORCH (the pinned
//! torch wheel; .cargo/config.toml points at .libtorch) and gloo's headers vendored under
//! third_party/gloo, with the flags the wheel was built with. Then the same link set-up as
//! scripts/link_libtorch.rs: the libtorch search path, `-ltorch` kept by `--no-as-needed`, and
//! an rpath so the test executables start without LD_LIBRARY_PATH.
//!
//! With the `nccl` feature the shim is compiled with `-DUSE_C10D_NCCL` too, against the CUDA
//! and NCCL headers of the wheel's nvidia packages (beside `$LIBTORCH`: `nvidia/cu13/include`,
//! `nvidia/nccl/include`) and the two CUDA 13.0 header sets those lack, `crt/host_config.h`
//! (nvidia-cuda-crt) and `nv/target` (nvidia-cuda-cccl), from `DDPM_CUDA_HEADERS` (a folder
//! holding `crt/` and `nv/`; default `.nccl-headers/nvidia/cu13/include`, which
//! scripts/build-nccl.sh fills), and linked to libtorch_cuda and c10_cuda.
use std::path::{Path, PathBuf};

#[path = "../scripts/cuda_headers.rs"]
mod cuda_headers;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=../scripts/shim_errors.h");
    println!("cargo:rerun-if-changed=../third_party/gloo");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/bootstrap.sh first");
        std::process::exit(1);
    };
    let libtorch = PathBuf::from(libtorch);
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let gloo = manifest.join("../third_party/gloo");
    let mut build = cc::Build::new();
    let nccl = std::env::var_os("CARGO_FEATURE_NCCL").is_some();
    if nccl {
        nccl_includes(&mut build, &libtorch, &manifest);
    }
    build
        .cpp(true)
        .file(manifest.join("csrc/c10d_shim.cpp"))
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(&gloo)
        .include(manifest.join("../scripts"))
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        // libtorch's own headers are not warning-clean; the shim is small enough to read.
        .warnings(false)
        .compile("ddpm_c10d_shim");
    link(&libtorch.join("lib"));
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

/// `-DUSE_C10D_NCCL` and the CUDA / NCCL include folders (scripts/cuda_headers.rs).
fn nccl_includes(build: &mut cc::Build, libtorch: &Path, manifest: &Path) {
    let nccl = cuda_headers::Needed {
        dir: "nccl/include",
        header: "nccl.h",
        from: "the nvidia-nccl-cu13 wheel (a torch dependency)",
    };
    cuda_headers::add_cuda_includes(build, libtorch, &manifest.join(".."), "nccl", &[nccl]);
    build.define("USE_C10D_NCCL", None);
}

fn link(lib: &Path) {
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
