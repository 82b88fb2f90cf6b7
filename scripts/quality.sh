#!/usr/bin/env bash
# Regenerates the σ_t × steps quality table (docs/quality.md, docs/quality/) from an
# unconditional mnist run, RUN (default runs/mnist-unconditional: `ddpm train --preset mnist`;
# the main job's conditional run is scored by `ddpm score` and `ddpm guidance` instead). Extra
# arguments go to `ddpm quality` (see its --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=${RUN:-runs/mnist-unconditional}
if [ ! -d "$RUN/checkpoints" ]; then
    echo "error: $RUN has no checkpoints; train it first with: target/release/ddpm train --preset mnist --out $RUN" >&2
    exit 1
fi
bash scripts/bootstrap.sh
cargo build --release --bin ddpm
exec target/release/ddpm quality --checkpoint "$RUN" --doc docs/quality.md "$@"
