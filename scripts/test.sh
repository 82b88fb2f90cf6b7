#!/usr/bin/env bash
# The whole test suite from a fresh clone: set-up (cached), the format and lint gates, then
# every package's tests. Where nvidia-smi sees a GPU the CUDA twins (ignored elsewhere) run too.
# --no-fail-fast: a failing test binary does not hide the ones after it from the count.
# Ends with one line `tests: N passed, M failed, K skipped` summed over every test binary,
# because cargo's own last line belongs to whichever binary ran last (often a doc-test run of 0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
say() { printf '[test] %s\n' "$*" >&2; }

for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    say "installing the $component component"
    rustup component add "$component"
  fi
done
say "cargo fmt --all --check"
cargo fmt --all --check
say "cargo clippy --workspace --all-targets --release -- -D warnings"
cargo clippy --workspace --all-targets --release --quiet -- -D warnings

# The CUDA twins are #[ignore]d so that a machine without a GPU reports them as such.
cuda=()
if [[ $# -eq 0 ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  say "a GPU is visible: running the ignored CUDA tests too"
  cuda=(-- --include-ignored)
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --release --no-fail-fast "$@" "${cuda[@]}" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
