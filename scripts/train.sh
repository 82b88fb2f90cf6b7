#!/usr/bin/env bash
# The main job from a fresh clone: set-up (cached), then train the `mnist-conditional` preset
# (the `mnist` network on the embedded MNIST-5k and its labels, sampled with guidance 0.5) and
# write its grid, one row a digit. Extra arguments go to `ddpm train`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
cargo build --release --bin ddpm
# Every core (DDPM_THREADS to choose): ddpm's default counts the cores the one-minute load
# average leaves free, and right after the build above that average is the build's own — a
# fresh clone would train on one thread of two (about 18 minutes instead of 11).
exec target/release/ddpm --threads "${DDPM_THREADS:-$(nproc)}" train --preset mnist-conditional --out runs/mnist "$@"
