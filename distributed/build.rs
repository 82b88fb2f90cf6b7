//! Compiles csrc/c10d_shim.cpp against the c10d headers of the libtorch at LIBTORCH (the pinned
//! torch wheel; .cargo/config.toml points at .libtorch) and gloo's headers vendored under
//! third_party/gloo, with the flags the wheel was built with. Then the same link set-up as
//! scripts/link_libtorch.rs: the libtorch search path, `-ltorch` kept by `--no-as-needed`, and
//! an rpath so the test executables start without LD_LIBRARY_PATH.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=../third_party/gloo");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/bootstrap.sh first");
        std::process::exit(1);
    };
    let libtorch = PathBuf::from(libtorch);
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let gloo = manifest.join("../third_party/gloo");
    cc::Build::new()
        .cpp(true)
        .file(manifest.join("csrc/c10d_shim.cpp"))
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(&gloo)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        // libtorch's own headers are not warning-clean; the shim is small enough to read.
        .warnings(false)
        .compile("ddpm_c10d_shim");
    link(&libtorch.join("lib"));
}

fn link(lib: &Path) {
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
