#!/usr/bin/env bash
# GPU check of data-parallel training (issue 16), for a session that has a GPU machine; never
# run yet (written without a GPU). Needs the NCCL build (scripts/build-nccl.sh; the headers
# fetch needs the package registry, so build before going to the device machine and carry
# target/) and the venv's torchrun. Writes under $OUT (default ./gpucheck):
#   info.txt                  ddpm info (must list "gloo, nccl" and the GPU)
#   plain.log / plain/        1 process on cuda:0, no torchrun               (the reference)
#   nccl1.log / nccl1/        torchrun --nproc_per_node=1: NCCL at world size 1 on cuda:0
#   gloo2.log / gloo2/        a Gloo build's 2 ranks sharing cuda:0 (only with GLOO_BIN set:
#                             a default, non-NCCL ddpm binary): CUDA tensors reduced via the CPU
#   nccl2.log                 2 ranks with NCCL: on one GPU this must fail with an error naming
#                             LOCAL_RANK (NCCL needs one GPU per rank); with ≥ 2 GPUs it trains
#   figures.txt               wall time of each run and the last metrics line of each
# NCCL with 2 ranks on 2 GPUs, and several nodes, cannot be checked on a 1-GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpucheck}
mkdir -p "$OUT"
BIN=${BIN:-target/release/ddpm}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
STEPS=${STEPS:-200}
COMMON=(--device cuda train --preset mnist --steps "$STEPS" --batch-size 64)
"$BIN" --device cuda info > "$OUT/info.txt" 2>&1
timed() { # name, command…
    local name=$1; shift
    local t0; t0=$(date +%s.%N)
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local t1; t1=$(date +%s.%N)
    printf '%s rc=%d wall_s=%.1f last=%s\n' "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" \
        "$(tail -n 1 "$OUT/$name/metrics.jsonl" 2>/dev/null)" >> "$OUT/figures.txt"
}
: > "$OUT/figures.txt"
timed plain "$BIN" "${COMMON[@]}" --out "$OUT/plain"
timed nccl1 "$TORCHRUN" --nproc_per_node=1 --master_port=29511 "$BIN" "${COMMON[@]}" --out "$OUT/nccl1"
if [ -n "${GLOO_BIN:-}" ]; then
    # Two ranks on one GPU: only Gloo allows it (the LOCAL_RANK check stops a second rank on
    # cuda:1 when there is one GPU, so this needs CUDA_VISIBLE_DEVICES unset and ≥ 2 GPUs, or
    # it shows the LOCAL_RANK error: recorded either way).
    timed gloo2 "$TORCHRUN" --nproc_per_node=2 --master_port=29512 "$GLOO_BIN" "${COMMON[@]}" --out "$OUT/gloo2"
fi
timed nccl2 "$TORCHRUN" --nproc_per_node=2 --master_port=29513 "$BIN" "${COMMON[@]}" --out "$OUT/nccl2"
grep -h "LOCAL_RANK" "$OUT/nccl2.log" | head -n 3 >> "$OUT/figures.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/figures.txt"
