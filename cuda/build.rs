//! Compiles csrc/cuda_shim.cpp against libtorch's headers at LIBTORCH and links libtorch_cpu
//! and c10 (pinning, c10's exception type). With the `cuda` feature also with
//! `-DDDPM_CUDA_GRAPH` against the CUDA headers of scripts/cuda_headers.rs, linked to
//! libtorch_cuda and c10_cuda; without it every graph call answers that CUDA graphs are not
//! built in.
use std::path::PathBuf;

#[path = "../scripts/cuda_headers.rs"]
mod cuda_headers;

fn main() {
    println!("cargo:rerun-if-changed=csrc/cuda_shim.cpp");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rerun-if-changed=../scripts/shim_errors.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/bootstrap.sh first");
        std::process::exit(1);
    };
    let libtorch = PathBuf::from(libtorch);
    let mut build = cc::Build::new();
    // libtorch's headers (c10's exception type, scripts/shim_errors.h) in both forms.
    build
        .cpp(true)
        .file(manifest.join("csrc/cuda_shim.cpp"))
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(manifest.join("../scripts"))
        .include(libtorch.join("include"))
        // libtorch's own headers are not warning-clean; the shim is small enough to read.
        .warnings(false);
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    if cuda {
        cuda_headers::add_cuda_includes(&mut build, &libtorch, &manifest.join(".."), "cuda", &[]);
        build
            .define("DDPM_CUDA_GRAPH", None)
            .include(libtorch.join("include/torch/csrc/api/include"));
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    // Pinning is libtorch_cpu's; c10's exception type is c10's.
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // This crate's own test executable: keep libtorch (and so libtorch_cuda, whose hooks make
    // a GPU visible) as scripts/link_libtorch.rs does, and find it without LD_LIBRARY_PATH.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    build.compile("ddpm_cuda_shim");
}
