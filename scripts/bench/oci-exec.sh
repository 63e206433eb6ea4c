#!/bin/sh
# Exec latency into a running container: `flotilla oci exec ID -- /bin/true` against
# `runc exec ID /bin/true` and `crun exec ID /bin/true`. Each runtime gets its own running
# container (`sleep`) made from one bundle: the generated default spec (busybox rootfs; pid,
# mount, ipc, uts, cgroup and network namespaces; Docker-like capabilities, no_new_privs, the
# default seccomp profile, NOFILE 1024; memory, cpu and pids limits). hyperfine runs every
# command RUNS times without a shell, in ROUNDS rounds with the order rotated; the script
# prints each round's medians and the median over all rounds.
#
# crun refuses the hybrid cgroup layout (v1 controllers plus a v2 mount at
# /sys/fs/cgroup/unified), so the script re-executes itself in a private mount namespace with
# that mount detached, as benches/oci.rs does; all three runtimes run in it.
#
# Usage: scripts/bench/oci-exec.sh            (as root, after `cargo build --release`)
# Environment: RUNS per command per round (default 50), ROUNDS (3), WARMUP (5), FLOTILLA
#              (target/release/flotilla), RUNC (runc), CRUN (crun), OUT (a directory to keep
#              hyperfine's JSON exports in).
# Needs: hyperfine, jq, busybox-static, runc, crun.
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FLOTILLA=${FLOTILLA:-$ROOT/target/release/flotilla}
RUNC=${RUNC:-runc}
CRUN=${CRUN:-crun}
RUNS=${RUNS:-50}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-5}

if [ -z "${FLOTILLA_BENCH_EXEC_NS:-}" ]; then
    export FLOTILLA_BENCH_EXEC_NS=1
    exec unshare -m --propagation private "$0" "$@"
fi
if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi

for tool in hyperfine jq "$RUNC" "$CRUN"; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
[ -x "$FLOTILLA" ] || { echo "no $FLOTILLA; run cargo build --release" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "/bin/busybox is needed (busybox-static)" >&2; exit 1; }

work=$(mktemp -d /tmp/flotilla-exec-bench.XXXXXX)
OUT=${OUT:-$work/out}
mkdir -p "$OUT"
cleanup() {
    "$FLOTILLA" oci --root "$work/flotilla" delete --force bench-fl >/dev/null 2>&1 || true
    "$RUNC" --root "$work/runc" delete --force bench-rc >/dev/null 2>&1 || true
    "$CRUN" --root "$work/crun" delete --force bench-cr >/dev/null 2>&1 || true
    case "$OUT" in "$work"/*) rm -rf "$work" ;; *) rm -rf "$work/bundle" "$work/flotilla" "$work/runc" "$work/crun" ;; esac
}
trap cleanup EXIT

bundle=$work/bundle
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/tmp"
cp /bin/busybox "$bundle/rootfs/bin/busybox"
for applet in sh true sleep; do ln -s busybox "$bundle/rootfs/bin/$applet"; done
"$FLOTILLA" oci spec -b "$bundle" --memory 67108864 --cpu-millicores 1000 --pids 64 -- sleep 1000000

"$FLOTILLA" oci --root "$work/flotilla" create -b "$bundle" bench-fl </dev/null >/dev/null 2>&1
"$FLOTILLA" oci --root "$work/flotilla" start bench-fl
"$RUNC" --root "$work/runc" run -d -b "$bundle" bench-rc </dev/null >/dev/null 2>&1
"$CRUN" --root "$work/crun" run -d -b "$bundle" bench-cr </dev/null >/dev/null 2>&1

CMD_FL="$FLOTILLA oci --root $work/flotilla exec bench-fl -- /bin/true"
CMD_RC="$RUNC --root $work/runc exec bench-rc /bin/true"
CMD_CR="$CRUN --root $work/crun exec bench-cr /bin/true"
for cmd in "$CMD_FL" "$CMD_RC" "$CMD_CR"; do
    $cmd || { echo "failed: $cmd" >&2; exit 1; }
done

echo "flotilla: $("$FLOTILLA" --version 2>/dev/null || echo "$FLOTILLA")"
echo "runc:     $("$RUNC" --version | head -n 1)"
echo "crun:     $("$CRUN" --version | head -n 1)"
echo "kernel:   $(uname -r), $(nproc) CPUs; $RUNS runs x $ROUNDS rounds, order rotated"
round=1
while [ "$round" -le "$ROUNDS" ]; do
    case $((round % 3)) in
        1) set -- -n flotilla "$CMD_FL" -n runc "$CMD_RC" -n crun "$CMD_CR" ;;
        2) set -- -n runc "$CMD_RC" -n crun "$CMD_CR" -n flotilla "$CMD_FL" ;;
        0) set -- -n crun "$CMD_CR" -n flotilla "$CMD_FL" -n runc "$CMD_RC" ;;
    esac
    hyperfine -N --style none --warmup "$WARMUP" --runs "$RUNS" --export-json "$OUT/round$round.json" "$@" >/dev/null
    printf 'round %s medians (ms):' "$round"
    jq -r '.results[] | " \(.command) \(.median * 1000 * 100 | round / 100)"' "$OUT/round$round.json" | tr -d '\n'
    echo
    round=$((round + 1))
done
echo "median over all rounds (ms), p90, runs:"
jq -rs 'map(.results[]) | group_by(.command)[] | (map(.times[]) | sort) as $t
        | "  \(.[0].command): \($t[($t | length) / 2 | floor] * 1000 * 100 | round / 100)"
          + "  p90 \($t[(($t | length) - 1) * 0.9 | round] * 1000 * 100 | round / 100)  n=\($t | length)"' \
    "$OUT"/round*.json
