#!/usr/bin/env bash
# The main job from a fresh clone: set-up (cached), then train the `mnist` preset on the
# embedded MNIST-5k and write sample grids. Extra arguments go to `ddpm train`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
cargo build --release --bin ddpm
exec target/release/ddpm train --preset mnist --out runs/mnist "$@"
