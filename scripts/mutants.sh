#!/usr/bin/env bash
# Mutation score of the accelerated crate's product files (issue 13; docs/verification.md,
# "Mutation score"). Usage: bash scripts/mutants.sh [FILE-KEY ...]   (default: every key below)
# Environment: MUTANTS_DIR (the mutated copy), MUTANTS_OUT (results), MUTANTS_TIMEOUT (test
# timeout, s), MUTANTS_ARGS (extra cargo-mutants arguments), MUTANTS_NICE (niceness, default
# 19; 0 on a machine kept for it: at 19 a mutant gets ~1 % of a core beside a build), LIBTORCH.
#
# Each mutant costs an incremental release rebuild of `ddpm` and the test binaries named for
# its file, then those tests. To keep that cheap and leave the working tree alone, the tree
# (with its warm target/) is copied once to $MUTANTS_DIR and mutated there in place; release
# builds are made incremental there (CARGO_INCREMENTAL=1: only workspace crates are affected,
# the dependencies' artefacts are reused). The baseline (unmutated tests pass) is checked once
# by hand with the same cargo test command, hence --baseline skip.
#
# The tests per file are a SUBSET of the README's test command (bash scripts/test.sh runs every
# package's tests): a mutant missed here may be caught by a test not run, so the score is a
# lower bound of what the whole suite catches.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
dir="${MUTANTS_DIR:-/tmp/ddpm-mutants}"
out="${MUTANTS_OUT:-$root/target/mutants}"
# LIBTORCH as the warm target/ was built with (recorded in torch-sys's build-script
# fingerprint): a different string, even a link to the same libtorch (another worktree's
# .libtorch), reruns torch-sys's C++ build, minutes on a busy machine. Else ./.libtorch.
recorded=$(grep -oh '"var":"LIBTORCH","val":"[^"]*"' \
  "$root"/target/release/.fingerprint/torch-sys-*/run-build-script-build-script-build.json \
  2>/dev/null | head -1 | sed 's/.*"val":"\(.*\)"/\1/' || true)
export LIBTORCH="${LIBTORCH:-${recorded:-$root/.libtorch}}"
export CARGO_INCREMENTAL=1
# Test timeout per mutant, s: 120 is ample on an idle machine (the slowest narrowed set runs
# in ~15 s), but under load 15 a niced `--lib` run alone took 70 s and one went past 120 s:
# set MUTANTS_TIMEOUT higher on a busy machine.
# Extra cargo-mutants arguments for every key, e.g. MUTANTS_ARGS="-F import" (a name filter).
read -r -a extra <<<"${MUTANTS_ARGS:-}"

# cargo-mutants itself (27.1.0 measured); installed here, not by bootstrap.sh: only this needs it.
cargo mutants --version >/dev/null 2>&1 || cargo install cargo-mutants --locked

# file key -> mutated file(s) and the test targets (cargo test args) that exercise them.
declare -A files=(
  [ema]="accelerated/src/ema.rs"
  [loss]="accelerated/src/loss.rs"
  [eval]="accelerated/src/eval.rs"
  [lamb]="accelerated/src/lamb.rs"
  [sampler]="accelerated/src/sampler.rs"
  [train]="accelerated/src/train.rs"
  [checkpoint]="accelerated/src/checkpoint.rs"
  [config]="accelerated/src/config.rs"
  [data]="accelerated/src/data.rs accelerated/src/data/*.rs"
)
declare -A tests=(
  [ema]="--lib --test=training"
  [loss]="--lib --test=loss --test=training"
  [eval]="--lib --test=product --test=bound"
  [lamb]="--lib --test=lamb --test=training"
  [sampler]="--lib --test=sampler_steps --test=product --test=oracle_sampling --test=dpm_solver"
  [train]="--lib --test=training --test=faults --test=signals --test=writes --test=outputs --test=conditional --test=distributed"
  [checkpoint]="--lib --test=product --test=faults --test=bad_input"
  [config]="--lib --test=bad_input --test=product"
  [data]="--lib --test=product --test=training"
)
keys=("$@")
[[ ${#keys[@]} -gt 0 ]] || keys=(ema loss eval lamb sampler train checkpoint config data)

mkdir -p "$dir" "$out"
# One copy of the tree with its target/ (the first time only: after that the copy's own,
# incremental target/ is the warm one); later runs update the sources.
[[ -d "$dir/target" ]] || cp -a "$root/target" "$dir/target"
tar -C "$root" --exclude=./.git --exclude=./target -cf - . | tar -C "$dir" -xf -
cd "$dir"
for key in "${keys[@]}"; do
  fargs=() targs=()
  for f in ${files[$key]}; do fargs+=(-f "$f"); done
  # --cargo-arg, not `-- ARGS`: arguments after `--` reach `cargo test` but not the build
  # (`cargo test --no-run`), which would then build every test binary of both packages.
  for a in ${tests[$key]}; do targs+=("--cargo-arg=$a"); done
  start=$(date +%s)
  # --in-place runs one mutant at a time (no -j).
  nice -n "${MUTANTS_NICE:-19}" cargo mutants --in-place --no-shuffle -p ddpm "${fargs[@]}" \
    --test-package ddpm,ddpm-tests --baseline skip --timeout "${MUTANTS_TIMEOUT:-120}" --build-timeout 600 \
    --profile release --output "$out/$key" "${targs[@]}" ${extra[@]+"${extra[@]}"} || true
  echo "[mutants] $key: $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
done
