//! Build script shared by every package that links libtorch.
//!
//! torch-sys lists libtorch_cuda among its libraries, but the linker's default `--as-needed`
//! drops it because no symbol is referenced directly; then `Cuda::is_available()` is false even
//! on a GPU. Linking `-ltorch` after `--no-as-needed` keeps it. The rpath lets binaries and test
//! executables start without LD_LIBRARY_PATH (which still overrides it: the rpath is a RUNPATH).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/bootstrap.sh first");
        return;
    };
    let lib = std::path::Path::new(&libtorch).join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
