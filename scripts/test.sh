#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up (cached), then every package's tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
cargo test --workspace --release "$@"
