//! The CUDA include folders of a shim compiled against libtorch's CUDA headers (ddpm-c10d's
//! `nccl` feature, ddpm-cuda's `cuda`), shared by their build scripts (`#[path]`): the
//! torch wheel's nvidia packages beside `$LIBTORCH` (`nvidia/cu13/include` and the `more` ones)
//! and the two CUDA 13.0 header sets those lack, `crt/host_config.h` (nvidia-cuda-crt) and
//! `nv/target` (nvidia-cuda-cccl), from `DDPM_CUDA_HEADERS` (a folder holding `crt/` and `nv/`;
//! default `.nccl-headers/nvidia/cu13/include` at the workspace root, which
//! scripts/build-nccl.sh fills). Stops the build naming the header that is missing and where it
//! comes from.
use std::path::{Path, PathBuf};

/// One more header the shim needs: the folder under the wheel's `nvidia/` that holds it, the
/// header, and the wheel it comes from.
pub struct Needed {
    pub dir: &'static str,
    pub header: &'static str,
    pub from: &'static str,
}

/// Adds the include folders to `build` (after checking every header is there), for `feature`
/// (named in the error); `root` is the workspace root.
pub fn add_cuda_includes(
    build: &mut cc::Build,
    libtorch: &Path,
    root: &Path,
    feature: &str,
    more: &[Needed],
) {
    println!("cargo:rerun-if-env-changed=DDPM_CUDA_HEADERS");
    let nvidia = libtorch.join("../nvidia");
    let extra = std::env::var_os("DDPM_CUDA_HEADERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".nccl-headers/nvidia/cu13/include"));
    let mut dirs = vec![nvidia.join("cu13/include")];
    dirs.extend(more.iter().map(|n| nvidia.join(n.dir)));
    dirs.push(extra.clone());
    let base = [
        (
            "cuda_runtime.h",
            "the nvidia-cuda-runtime wheel (a torch dependency)",
        ),
        ("crt/host_config.h", "the nvidia-cuda-crt 13.0 wheel"),
        ("nv/target", "the nvidia-cuda-cccl 13.0 wheel"),
    ];
    let needed = base
        .into_iter()
        .chain(more.iter().map(|n| (n.header, n.from)));
    for (header, from) in needed {
        if !dirs.iter().any(|d| d.join(header).exists()) {
            println!(
                "cargo:warning=the `{feature}` feature needs {header} (from {from}), found in none of {}; run scripts/build-nccl.sh, or set DDPM_CUDA_HEADERS to a folder holding crt/ and nv/",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            std::process::exit(1);
        }
    }
    println!("cargo:rerun-if-changed={}", extra.display());
    for d in dirs {
        build.include(d);
    }
}
