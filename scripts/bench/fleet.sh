#!/usr/bin/env bash
# Fleet scale: N simulated agents (`flotilla sim`) against one hub on SQLite, both release
# builds on this machine. Each run starts a fresh hub, joins and connects every node (paced
# at 150 per second, the hub's handshake rate being 200), measures a 30 s idle window, then
# applies an EveryNode workload and measures until every replica is reported Running.
#
#   scripts/bench/fleet.sh            # 1,000 nodes, 3 runs
#   scripts/bench/fleet.sh 10000      # 10,000 nodes
#   RUNS=1 IDLE=60s scripts/bench/fleet.sh 10000
#   BIN=/work/bench/base/flotilla scripts/bench/fleet.sh 1000   # a given build (A/B runs)
#
# Prints the simulator's lines for each run (see BENCHMARKS.md, "Fleet scale").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
n=${1:-1000}
runs=${RUNS:-3}
idle=${IDLE:-30s}
if [[ -n ${BIN:-} ]]; then
    bin=$BIN
else
    cargo build --release --bin flotilla
    bin=$PWD/target/release/flotilla
fi
for r in $(seq 1 "$runs"); do
    dir=$(mktemp -d /tmp/flotilla-fleet.XXXXXX)
    port=$((20000 + RANDOM % 20000))
    FLOTILLA_LOG=${FLOTILLA_LOG:-info} "$bin" hub --data-dir "$dir/hub" --listen "127.0.0.1:$port" >"$dir/hub.log" 2>&1 &
    hub=$!
    trap 'kill "$hub" 2>/dev/null || true; rm -rf "$dir"' EXIT
    for _ in $(seq 1 100); do
        [[ -f $dir/hub/token && -f $dir/hub/admin.yaml ]] && break
        sleep 0.1
    done
    cat >"$dir/every.yaml" <<'MANIFEST'
apiVersion: flotilla.dev/v1
kind: Workload
metadata:
  name: tick
spec:
  runtime: wasm
  image: registry.invalid/tick:1
  kind: EveryNode
MANIFEST
    echo "== run $r of $runs: $n nodes"
    "$bin" sim --hub "127.0.0.1:$port" --token-file "$dir/hub/token" --agents "$n" --idle "$idle" \
        --apply "$dir/every.yaml" --config "$dir/hub/admin.yaml" --hub-pid "$hub" --wait 600s
    kill "$hub"
    wait "$hub" 2>/dev/null || true
    rm -rf "$dir"
    trap - EXIT
done
