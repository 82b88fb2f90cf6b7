#!/usr/bin/env bash
# The main job from a fresh clone: set-up (cached), then train the `mnist-conditional` preset
# (the `mnist` network on the embedded MNIST-5k and its labels, sampled with guidance 0.5) and
# write its grid, one row a digit. Extra arguments go to `ddpm train`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
cargo build --release --bin ddpm
exec target/release/ddpm train --preset mnist-conditional --out runs/mnist "$@"
