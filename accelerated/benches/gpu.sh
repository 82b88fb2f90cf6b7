#!/usr/bin/env bash
# The versus_pytorch bench on a CUDA machine, with a bench binary built on another machine.
#
#   accelerated/benches/gpu.sh BINARY OUTDIR
#
# Run from the repository root. BINARY is a release build of the bench (see docs/performance.md);
# it was linked against libtorch 2.11, and this machine's own torch 2.11 supplies the libraries
# (LD_LIBRARY_PATH overrides the binary's RUNPATH) and the twin's Python. Each configuration gets
# its own time limit so that one slow run cannot eat the others' time; results go to OUTDIR as
# JSON, the tables to stdout. Set PYTHON to pick another interpreter.
set -u
BIN=${1:?usage: gpu.sh BINARY OUTDIR}
OUT=${2:?usage: gpu.sh BINARY OUTDIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || exit 1
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader

run() {
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$BIN" --python "$PY" --twin accelerated/benches/pytorch_twin.py \
        --device cuda --json "$OUT/$name.json" "$@" 2>"$OUT/$name.log" | tail -n 16
    echo "exit ${PIPESTATUS[0]}"
}

# Most important first: the cifar32 bf16 targets (training ≥ 2,690 images/s, 256 images over
# 1000 ancestral steps in < 8 s), then channels-last and a multi-tensor twin for comparison.
# The limits add up to 555 s, inside one 600 s device call.
run 200 cifar32-bf16 --config cifar32 --precision bf16 --rounds 2
run 60 cifar32-bf16-channels-last --config cifar32 --precision bf16 --rounds 2 --channels-last --phases train,strided
run 45 cifar32-bf16-twin-foreach --config cifar32 --precision bf16 --rounds 2 --twin-foreach --phases train
run 60 mnist-fp32 --config mnist --rounds 3
run 70 cifar32-fp32 --config cifar32 --rounds 2 --phases train,trainer,strided
run 120 celeba128-bf16 --config celeba128 --precision bf16 --rounds 2
