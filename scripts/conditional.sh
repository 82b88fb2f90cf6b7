#!/usr/bin/env bash
# Issue 17's guidance table: the `mnist` preset trained conditionally (`--conditional`, label
# dropout 0.1, the main job's budget) into RUN, then `ddpm guidance` at 100 steps for
# w ∈ {0, 0.5, 1, 2, 4}: the share of samples the seed-0 classifier assigns to the class asked
# for, FD-MNIST per class and overall, and a grid per w, in RUN/guidance/ (guidance.json,
# guidance.md, guidance-wW.png). A finished run is not retrained; a half-trained one is resumed.
#
#   bash scripts/conditional.sh [ddpm train flags...]
#
# Environment: RUN (runs/mnist-conditional), DEVICE (auto), PER_CLASS (100), STEPS (100),
# WEIGHTS (0,0.5,1,2,4), SEED (0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${RUN:-runs/mnist-conditional}
DEVICE=${DEVICE:-auto}
cargo build --release --bin ddpm
BIN=target/release/ddpm
if [ -d "$RUN/checkpoints" ]; then
    "$BIN" --device "$DEVICE" train --resume --out "$RUN" || true   # finished runs say so
else
    "$BIN" --device "$DEVICE" train --conditional --out "$RUN" "$@"
fi
"$BIN" --device "$DEVICE" guidance --checkpoint "$RUN" --out "$RUN/guidance" \
    --weights "${WEIGHTS:-0,0.5,1,2,4}" --steps "${STEPS:-100}" \
    --per-class "${PER_CLASS:-100}" --seed "${SEED:-0}"
