#!/usr/bin/env bash
# Issue 15's candidates: each is the `mnist` preset plus `ddpm train` flags (or --config FILE),
# trained into runs/candidates/NAME with the same seed, timed (CPU seconds user+sys and wall
# seconds, per step), then scored by `ddpm score` at 100 steps on its final checkpoint; one
# JSON line per candidate is appended to runs/candidates/results.jsonl.
#
#   bash scripts/candidates.sh NAME [ddpm train flags...]   one candidate
#   bash scripts/candidates.sh --queue                      the issue-15 queue, (a)–(e) in order
#   bash scripts/candidates.sh --start                      the queue in the background (nohup,
#                                                           nice 19), log runs/candidates/queue.log
#
# Every candidate runs with one libtorch thread (THREADS, default 1): on a shared 2-core
# machine one thread keeps candidates comparable and makes the CPU seconds the work of that
# candidate alone; wall seconds depend on what else runs. The binary is copied once to
# runs/candidates/bin/ddpm, so rebuilding target/ during a queue changes nothing in it.
# A candidate already in results.jsonl is skipped; a half-trained run is resumed.
#
# Environment: THREADS (1), SEED (train.seed, 0), SCORE_SEED (0), SAMPLES (400), STEPS (100),
# CANDIDATES_DIR (runs/candidates). The seed-0 classifier is cached once, in DIR/classifier.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${CANDIDATES_DIR:-runs/candidates}
THREADS=${THREADS:-1}
SEED=${SEED:-0}
SCORE_SEED=${SCORE_SEED:-0}
SAMPLES=${SAMPLES:-400}
STEPS=${STEPS:-100}
BIN=$DIR/bin/ddpm
RESULTS=$DIR/results.jsonl
mkdir -p "$DIR/bin"

freeze_binary() {
    if [[ ! -x $BIN ]]; then
        [[ -x target/release/ddpm ]] || cargo build --release --bin ddpm
        cp target/release/ddpm "$BIN.part" && mv "$BIN.part" "$BIN"
    fi
}

one() {
    local name=$1
    shift
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "bad candidate name: $name" >&2; return 2; }
    if [[ -f $RESULTS ]] && [[ $(jq -s --arg n "$name" 'any(.[]; .name == $n)' "$RESULTS") == true ]]; then
        echo "$name: already in $RESULTS, skipped"
        return 0
    fi
    freeze_binary
    local run=$DIR/$name
    local times=$DIR/$name.time
    local start=$(date -u +%FT%TZ)
    echo "$start $name: training with: $*"
    local flags
    flags=$(printf '%s\n' "$@" | jq -R . | jq -s -c 'map(select(. != ""))')
    local base=(--preset mnist)
    for f in "$@"; do [[ $f == --config ]] && base=(); done
    local resume=()
    if [[ -f $run/config.toml ]]; then
        # A run stopped half-way continues where it stopped, with its saved settings; its
        # earlier seconds are lost, so the line says "resumed".
        resume=(--resume)
        base=()
        set --
    fi
    if ! /usr/bin/time -o "$times" -f '%U %S %e' \
        "$BIN" --threads "$THREADS" --no-progress train "${base[@]}" --seed "$SEED" \
        --out "$run" "${resume[@]}" "$@" >"$DIR/$name.train.log" 2>&1; then
        echo "$(date -u +%FT%TZ) $name: training failed; see $DIR/$name.train.log"
        return 1
    fi
    local user sys wall
    read -r user sys wall < <(tail -n 1 "$times")
    echo "$(date -u +%FT%TZ) $name: trained (user $user s, sys $sys s, wall $wall s); scoring"
    if ! "$BIN" --threads "$THREADS" --no-progress score --checkpoint "$run" \
        --cache "$DIR/classifier" --samples "$SAMPLES" --steps "$STEPS" --seed "$SCORE_SEED" \
        >"$DIR/$name.score.log" 2>&1; then
        echo "$(date -u +%FT%TZ) $name: scoring failed; see $DIR/$name.score.log"
        return 1
    fi
    tail -n 1 "$DIR/$name.score.log"
    jq -c --arg name "$name" --argjson flags "$flags" --arg started "$start" \
        --argjson user "$user" --argjson sys "$sys" --argjson wall "$wall" \
        --argjson threads "$THREADS" --argjson resumed "$([[ ${#resume[@]} -gt 0 ]] && echo true || echo false)" \
        --arg grid "$run/score/grid.png" '
        {name: $name, flags: $flags, started: $started, threads: $threads, resumed: $resumed,
         steps: .step,
         cpu_seconds: ($user + $sys), wall_seconds: $wall,
         cpu_seconds_per_step: (($user + $sys) / .step), wall_seconds_per_step: ($wall / .step),
         sample_steps: .sampler.steps, samples: .generated.images,
         fd: .generated.fd, fd_ci: [.generated.fd_ci.lo, .generated.fd_ci.hi],
         confident_share: .generated.confident_share, entropy: .generated.entropy,
         marginal_entropy: .generated.marginal_entropy,
         floor_fd: .floor.fd, floor_fd_ci: [.floor.fd_ci.lo, .floor.fd_ci.hi],
         ceiling_confident_share: .ceiling.confident_share, ceiling_split: .ceiling.split,
         classifier_accuracy: .classifier.heldout_accuracy, threshold: .threshold,
         grid: $grid}' "$run/score/score.json" >>"$RESULTS"
    echo "$(date -u +%FT%TZ) $name: appended to $RESULTS"
}

# (e) sees the baseline's images in twice the steps: the warm-up and the decay point (which
# the preset puts at its last step, 2000) are stretched with it, in a config file.
batch32_config() {
    local f=$DIR/e-batch32x4000.toml
    cat >"$f" <<'TOML'
preset = "mnist"
[train]
batch_size = 32
steps = 4000
warmup_steps = 200
lr_decay = [{ step = 4000, factor = 0.1 }]
TOML
    echo "$f"
}

queue() {
    one a-baseline || true
    one b-ema0.995 --ema-decay 0.995 || true
    one c-lr1e-2 --lr 1e-2 || true
    one d-base48 --base-channels 48 || true
    one e-batch32x4000 --config "$(batch32_config)" || true
    echo "$(date -u +%FT%TZ) queue done"
}

case ${1:-} in
    --queue) queue ;;
    --start)
        freeze_binary
        nohup nice -n 19 bash "$0" --queue >>"$DIR/queue.log" 2>&1 </dev/null &
        echo "queue started (pid $!); log $DIR/queue.log, results $RESULTS"
        ;;
    "" | -h | --help) sed -n '2,20p' "$0" ;;
    *) one "$@" ;;
esac
