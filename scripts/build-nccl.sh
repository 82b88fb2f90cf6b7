#!/usr/bin/env bash
# Builds ddpm with NCCL (cargo feature `nccl`, docs/distributed.md): fetches the two CUDA 13.0
# header sets that the torch wheel's nvidia packages lack — crt/host_config.h (nvidia-cuda-crt)
# and nv/target (nvidia-cuda-cccl) — into .nccl-headers/ (git-ignored; the venv's packages
# are not touched), then `cargo build --release --features nccl`. Needs no GPU: NCCL is only
# compiled and linked here. Extra arguments go to cargo (e.g. `--tests`, or `--features
# cuda-graph`: the CUDA-graph shim of cuda/ needs the same headers).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.nccl-headers
if [ ! -e "$dest/nvidia/cu13/include/crt/host_config.h" ] || [ ! -e "$dest/nvidia/cu13/include/nv/target" ]; then
    mkdir -p "$dest/wheels"
    # 13.0.x: the CUDA of the pinned torch 2.11.0+cu130 (its nvidia-cuda-runtime is 13.0.96).
    .venv/bin/pip download --no-deps --only-binary=:all: -d "$dest/wheels" \
        "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
    for w in "$dest"/wheels/*.whl; do
        .venv/bin/python -m zipfile -e "$w" "$dest"
    done
fi
export DDPM_CUDA_HEADERS="$PWD/$dest/nvidia/cu13/include"
cargo build --release -p ddpm --features nccl "$@"
