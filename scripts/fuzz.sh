#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (issue 14, item 9; docs/reliability.md):
#
#   scripts/fuzz.sh [TARGET|all] [RUNS] [extra libFuzzer flags...]
#
# TARGET is one of config, manifest, checkpoint, image, mnist_csv (default: all, one after
# the other); RUNS the inputs to run each (default 1000000; 0 = until stopped or -max_total_time
# says). Each target starts from its committed seeds (fuzz/seeds/TARGET/) and its working corpus
# (fuzz/corpus/TARGET/, git-ignored), with its dictionary (fuzz/dicts/TARGET.dict); crashes
# land in fuzz/artifacts/TARGET/. Prints the executions run and the rate of each target.
#
# Needs a nightly Rust toolchain (libFuzzer's instrumentation is nightly-only: `rustup toolchain
# install nightly`) and installs cargo-fuzz with it when missing. Built without a sanitizer
# (`-s none`; FUZZ_SANITIZER=address to try ASan) but with debug assertions and overflow checks
# (`-a`, all targets but image): the harnesses and the parsers they reach are safe Rust (the
# library's one `unsafe` is the CUDA autocast call), so ASan would mostly cost speed on a shared
# machine. Not part of scripts/test.sh or CI: it needs nightly, and 10⁶ inputs a target
# take tens of minutes; tests/tests/fuzz_inputs.rs runs the same harnesses briefly there.
# Long runs share the machine politely: `nice -n 19 scripts/fuzz.sh`.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
all=(config manifest checkpoint image mnist_csv)
target="${1:-all}"
runs="${2:-1000000}"
shift $(($# > 2 ? 2 : $#))
sanitizer="${FUZZ_SANITIZER:-none}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (cargo +nightly install cargo-fuzz --locked)"
    cargo +nightly install cargo-fuzz --locked
fi

export LIBTORCH="${LIBTORCH:-$root/.libtorch}"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd "$root/fuzz"

if [[ "$target" == all ]]; then
    targets=("${all[@]}")
else
    targets=("$target")
fi

# Debug assertions and overflow checks (-a) for every target but `image`: with them the image
# crate's JPEG decoder (zune-jpeg) panics on an i32 overflow that a release build wraps (see
# docs/reliability.md); `image` is fuzzed as shipped, in a target directory of its own.
flags_for() {
    if [[ "$1" == image ]]; then
        echo "-O -s $sanitizer --target-dir target-plain"
    else
        echo "-O -a -s $sanitizer"
    fi
}

summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" logs
    dict=()
    [[ -f "dicts/$t.dict" ]] && dict=("-dict=dicts/$t.dict")
    log="logs/$t.log"
    echo "== $t: $runs runs (log fuzz/$log)"
    status=0
    # shellcheck disable=SC2046 # the flags are words
    cargo +nightly fuzz run $(flags_for "$t") "$t" "corpus/$t" "seeds/$t" -- \
        -runs="$runs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "${dict[@]}" "$@" >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{print $2}' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{print $2}' | tail -1)
    secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | awk '{print $5}' | tail -1)
    line="$t: ${execs:-?} executions, ${rate:-?} exec/s, ${secs:-?} s, exit $status"
    if ((status != 0)); then
        line+=" — see fuzz/$log and fuzz/artifacts/$t/"
    fi
    echo "$line"
    summary+=("$line")
    # The targets' scratch directories (fuzz/src/lib.rs) of processes that have ended.
    for d in /dev/shm/ddpm-fuzz-* "${TMPDIR:-/tmp}"/ddpm-fuzz-*; do
        [[ -d "$d" ]] || continue
        kill -0 "${d##*-}" 2>/dev/null || rm -rf "$d"
    done
done
echo "== summary"
printf '%s\n' "${summary[@]}"
for line in "${summary[@]}"; do
    [[ "$line" == *"exit 0" ]] || exit 1
done
