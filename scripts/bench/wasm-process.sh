#!/bin/sh
# Whole-process start of examples/hello (`--count 1 --interval-ms 0`: one line, exit 0):
# `flotilla run` (compile cache on disk) vs `wasmtime run` (its default compile cache) vs
# `wasmtime run --allow-precompiled` of a `wasmtime compile`d .cwasm, measured side by side by
# hyperfine, in several rounds with the order rotated. Every command is run once before hyperfine
# (to fill the caches) and hyperfine adds its own warm-up runs.
#
# Usage: scripts/bench/wasm-process.sh            (after `cargo build --release`)
# Environment: RUNS per command per round (default 50), ROUNDS (6), WARMUP (3), FLOTILLA (target/release/flotilla),
#              WASMTIME (/opt/wasmtime-cli/bin/wasmtime, else `wasmtime` on PATH), OUT (a
#              directory to keep hyperfine's JSON exports and outputs in).
# Needs: hyperfine (apt-get install hyperfine), jq.
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FLOTILLA=${FLOTILLA:-$ROOT/target/release/flotilla}
if [ -z "${WASMTIME:-}" ]; then
    if [ -x /opt/wasmtime-cli/bin/wasmtime ]; then WASMTIME=/opt/wasmtime-cli/bin/wasmtime; else WASMTIME=$(command -v wasmtime); fi
fi
HELLO=$ROOT/examples/hello/target/wasm32-wasip1/release/hello.wasm
RUNS=${RUNS:-50}
ROUNDS=${ROUNDS:-6}
WARMUP=${WARMUP:-3}

for tool in hyperfine jq; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install $tool)" >&2; exit 1; }
done
[ -x "$FLOTILLA" ] || { echo "no $FLOTILLA; run cargo build --release" >&2; exit 1; }
[ -x "$WASMTIME" ] || { echo "no wasmtime CLI; set WASMTIME" >&2; exit 1; }
[ -f "$HELLO" ] || { echo "no $HELLO; build examples/hello for wasm32-wasip1" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$HELLO" "$work/hello.wasm"
"$WASMTIME" compile "$work/hello.wasm" -o "$work/hello.cwasm"

ARGS="--count 1 --interval-ms 0"
CMD_FLOTILLA="$FLOTILLA run --cache-dir $work/flotilla-cache $work/hello.wasm $ARGS"
CMD_WASMTIME="$WASMTIME run $work/hello.wasm $ARGS"
CMD_PRECOMPILED="$WASMTIME run --allow-precompiled $work/hello.cwasm $ARGS"

echo "versions: $("$FLOTILLA" --version), $("$WASMTIME" --version), $(hyperfine --version)"
echo "check (each prints one line; the first run fills the compile caches):"
for cmd in "$CMD_FLOTILLA" "$CMD_WASMTIME" "$CMD_PRECOMPILED"; do
    echo "  \$ $cmd"
    printf '    '
    $cmd
done

# -N: no intermediate shell (hyperfine >= 1.13). The machine is shared and noisy, so the three
# commands are measured in ROUNDS rounds of RUNS runs each, the order rotated every round, and
# the summary pools every run of every round.
round=1
while [ "$round" -le "$ROUNDS" ]; do
    case $((round % 3)) in
        1) order="F W P" ;;
        2) order="W P F" ;;
        0) order="P F W" ;;
    esac
    set --
    for k in $order; do
        case $k in
            F) set -- "$@" -n "flotilla run" "$CMD_FLOTILLA" ;;
            W) set -- "$@" -n "wasmtime run (.wasm, cache)" "$CMD_WASMTIME" ;;
            P) set -- "$@" -n "wasmtime run --allow-precompiled (.cwasm)" "$CMD_PRECOMPILED" ;;
        esac
    done
    echo "== round $round of $ROUNDS (order: $order)"
    hyperfine -N --warmup "$WARMUP" --runs "$RUNS" --export-json "$work/round-$round.json" "$@" \
        </dev/null >"$work/hyperfine-$round.txt" 2>&1 || { cat "$work/hyperfine-$round.txt"; exit 1; }
    grep -E "^Benchmark|Time \(mean" "$work/hyperfine-$round.txt"
    round=$((round + 1))
done

echo
echo "all rounds pooled ($ROUNDS x $RUNS runs per command):"
echo
echo "| command | median (ms) | mean (ms) | min (ms) | p10 (ms) | p90 (ms) | median of round medians (ms) | median vs \`flotilla run\` |"
echo "|---|---|---|---|---|---|---|---|"
jq -s -r '
  def q(p): sort | .[((length - 1) * p | round)];
  def r2: . * 100000 | round / 100;
  [ .[].results[] ] | group_by(.command)
  | map({ command: .[0].command,
          times: [ .[].times[] ],
          round_medians: [ .[].median ] })
  | (map(select(.command == "flotilla run"))[0].times | q(0.5)) as $base
  | sort_by(.times | q(0.5))
  | .[]
  | "| \(.command) | \(.times | q(0.5) | r2) | \(.times | add / length | r2) | \(.times | min | r2) | \(.times | q(0.1) | r2) | \(.times | q(0.9) | r2) | \(.round_medians | q(0.5) | r2) | \((.times | q(0.5)) / $base * 100 | round / 100) |"
' "$work"/round-*.json | tee "$work/summary.md"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$work"/round-*.json "$work"/hyperfine-*.txt "$work/summary.md" "$OUT/"
fi
