#!/usr/bin/env bash
# Fleet scale: N simulated agents (`flotilla sim`) against one hub on SQLite, both release
# builds on this machine. Each run starts a fresh hub, joins and connects every node (paced
# at 150 per second; each node makes two handshakes, a join and a session, against the hub's
# rate of 300), measures a 30 s idle window, then
# applies an EveryNode workload and measures until every replica is reported Running.
#
#   scripts/bench/fleet.sh            # 1,000 nodes, 3 runs
#   scripts/bench/fleet.sh 10000      # 10,000 nodes
#   RUNS=1 IDLE=60s scripts/bench/fleet.sh 10000
#   BIN=/work/bench/base/flotilla scripts/bench/fleet.sh 1000   # a given build (A/B runs)
#   SIM_BIN=/work/bench/head/flotilla BIN=... scripts/bench/fleet.sh 1000  # the simulator of another
#
# Further phases, each when its variable is set, in this order after the apply:
#   UPDATE=1       a rolling update of the EveryNode workload (new image, maxUnavailable: 10%)
#   DROP=1000      cut the links of 1,000 nodes for DROP_FOR (default 20s), then restore them
#   RESTART=1      SIGKILL the hub and start it again on the same data dir
#   UPDATE=1 DROP=1000 RESTART=1 RUNS=3 scripts/bench/fleet.sh 10000
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
sim=${SIM_BIN:-$bin}
for r in $(seq 1 "$runs"); do
    dir=$(mktemp -d /tmp/flotilla-fleet.XXXXXX)
    port=$((20000 + RANDOM % 20000))
    hub_cmd=(env "FLOTILLA_LOG=${FLOTILLA_LOG:-info}" "$bin" hub --data-dir "$dir/hub" --listen "127.0.0.1:$port")
    "${hub_cmd[@]}" >"$dir/hub.log" 2>&1 &
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
    sed -e 's|tick:1|tick:2|' "$dir/every.yaml" >"$dir/update.yaml"
    printf '  strategy: {maxUnavailable: 10%%}\n' >>"$dir/update.yaml"
    modes=()
    [[ -n ${UPDATE:-} ]] && modes+=(--update "$dir/update.yaml")
    [[ -n ${DROP:-} ]] && modes+=(--drop-links "$DROP" --drop-for "${DROP_FOR:-20s}")
    [[ -n ${RESTART:-} ]] && modes+=(--restart-hub "exec ${hub_cmd[*]@Q} >>$dir/hub.log 2>&1")
    echo "== run $r of $runs: $n nodes"
    "$sim" sim --hub "127.0.0.1:$port" --token-file "$dir/hub/token" --agents "$n" --idle "$idle" \
        --apply "$dir/every.yaml" --config "$dir/hub/admin.yaml" --hub-pid "$hub" --wait 600s "${modes[@]}"
    # After --restart-hub the first hub is gone (the simulator stopped the second).
    kill "$hub" 2>/dev/null || true
    wait "$hub" 2>/dev/null || true
    rm -rf "$dir"
    trap - EXIT
done
