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
# Flags added to every row (for a smoke run elsewhere, e.g. "--threads 1").
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || exit 1
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))' || echo "no CUDA device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi"

run() {
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$BIN" --python "$PY" --twin accelerated/benches/pytorch_twin.py \
        --device "${DEVICE:-cuda}" --json "$OUT/$name.json" "$@" $EXTRA 2>"$OUT/$name.log" | tail -n 16
    echo "exit ${PIPESTATUS[0]}"
}

# Most important first: the cifar32 bf16 targets (training ≥ 5,000 images/s and ≥ 1.3× a
# foreach twin, 256 images over 1000 ancestral steps in ≤ 8 s), sampling with the weights
# cast to bf16 once (`ddpm sample --bf16-weights`) and then also replayed from a CUDA graph
# (`--cuda-graph`: the bench must be built with `--features cuda-graph`), the optimiser alone
# (flat LAMB + EMA against the twin's per-tensor and foreach ones), mnist fp32 (its 50-step
# sampling: target ≥ 2× today). Every row reports peak device memory: nvidia-smi's
# per-process figure for both sides and the twin's torch.cuda.max_memory_allocated (tch
# exposes no allocator statistics). The default rows' limits add up to 570 s, inside one 600 s
# device call; ROWS picks rows. A second call:
#   ROWS="mnist-bf16-weights mnist-graph cifar32-bf16-channels-last cifar32-fp32 celeba128-bf16"
# (channels-last measures the product's trainer through train.channels_last). A smoke run
# of the script on a machine without a GPU (mnist's optimiser rows, seconds):
#   DEVICE=cpu PYTHON=.venv/bin/python EXTRA="--threads 1 --strided-images 1 --ancestral-images 0" \
#     ROWS="mnist-optim mnist-optim-foreach" accelerated/benches/gpu.sh BINARY OUTDIR
ROWS=${ROWS:-"cifar32-bf16 cifar32-bf16-twin-foreach cifar32-bf16-weights cifar32-bf16-weights-graph cifar32-optim cifar32-optim-foreach mnist-fp32"}
for row in $ROWS; do
    case $row in
    cifar32-bf16) run 200 "$row" --config cifar32 --precision bf16 --rounds 2 --phases train,trainer,strided,ancestral ;;
    cifar32-bf16-twin-foreach) run 60 "$row" --config cifar32 --precision bf16 --rounds 2 --twin-foreach --phases train,trainer ;;
    cifar32-optim) run 35 "$row" --config cifar32 --rounds 3 --phases optim --optim-steps "${OPTIM_STEPS:-50}" ;;
    cifar32-optim-foreach) run 35 "$row" --config cifar32 --rounds 3 --phases optim --optim-steps "${OPTIM_STEPS:-50}" --twin-foreach ;;
    cifar32-bf16-weights-graph) run 90 "$row" --config cifar32 --precision bf16 --rounds 2 --bf16-weights --cuda-graph --phases strided,ancestral ;;
    mnist-graph) run 30 "$row" --config mnist --rounds 3 --cuda-graph --phases strided ;;
    cifar32-bf16-weights) run 90 "$row" --config cifar32 --precision bf16 --rounds 2 --bf16-weights --phases strided,ancestral ;;
    cifar32-bf16-channels-last) run 60 "$row" --config cifar32 --precision bf16 --rounds 2 --channels-last --phases train,trainer,strided ;;
    mnist-bf16-weights) run 30 "$row" --config mnist --rounds 3 --bf16-weights --phases strided ;;
    mnist-optim) run 35 "$row" --config mnist --rounds 3 --phases optim --optim-steps "${OPTIM_STEPS:-50}" ;;
    mnist-optim-foreach) run 35 "$row" --config mnist --rounds 3 --phases optim --optim-steps "${OPTIM_STEPS:-50}" --twin-foreach ;;
    mnist-fp32) run 60 "$row" --config mnist --rounds 3 --phases train,trainer,strided,ancestral,optim ;;
    cifar32-fp32) run 70 "$row" --config cifar32 --rounds 2 --phases train,trainer,strided ;;
    celeba128-bf16) run 120 "$row" --config celeba128 --precision bf16 --rounds 2 ;;
    *) echo "unknown row $row" ;;
    esac
done
