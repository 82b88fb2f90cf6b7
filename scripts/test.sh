#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up (cached), then every package's tests.
# Ends with one line `tests: N passed, M failed` summed over every test binary, because
# cargo's own last line belongs to whichever binary ran last (often a doc-test run of 0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --release "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
