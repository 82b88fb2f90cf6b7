#!/usr/bin/env bash
# Regenerates the σ_t × steps quality table (docs/quality.md, docs/quality/) from the mnist run
# that scripts/train.sh writes. Extra arguments go to `ddpm quality` (see its --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -d runs/mnist/checkpoints ]; then
    echo "error: runs/mnist has no checkpoints; train it first with: bash scripts/train.sh" >&2
    exit 1
fi
bash scripts/bootstrap.sh
cargo build --release --bin ddpm
exec target/release/ddpm quality --checkpoint runs/mnist --doc docs/quality.md "$@"
