#!/usr/bin/env bash
# Flotilla quickstart: one command from a fresh Debian 12 machine to a running
# Wasm workload and, when run as root with cgroups, a container workload beside it.
#
#   scripts/quickstart.sh          # install deps, build, start registry + hub + agent, deploy examples/hello (+ examples/busybox)
#   scripts/quickstart.sh stop     # stop what the quickstart started
#   scripts/quickstart.sh status   # show which quickstart processes are alive
#
# Environment:
#   FLOTILLA_QUICKSTART_DIR   state dir (default /tmp/flotilla-quickstart): logs, pids, hub/agent data, registry storage
#   FLOTILLA_PROFILE          cargo profile of the flotilla binary: release (default) or debug
#   FLOTILLA_BIN              use this prebuilt flotilla binary and skip the cargo build of it
#   FLOTILLA_QUICKSTART_TIMEOUT  seconds to wait for each readiness step (default 60)
#   FLOTILLA_LOG              log filter for hub and agent (default info)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$ROOT/scripts/quickstart.sh
STOP_CMD="$SELF stop"
[[ -z ${FLOTILLA_QUICKSTART_DIR:-} ]] || STOP_CMD="FLOTILLA_QUICKSTART_DIR=$FLOTILLA_QUICKSTART_DIR $STOP_CMD"
DIR=${FLOTILLA_QUICKSTART_DIR:-/tmp/flotilla-quickstart}
PROFILE=${FLOTILLA_PROFILE:-release}
TIMEOUT=${FLOTILLA_QUICKSTART_TIMEOUT:-60}
export FLOTILLA_LOG=${FLOTILLA_LOG:-info}

REGISTRY=127.0.0.1:5000
HUB_ADDR=127.0.0.1:7443
NODE=edge-1
MANIFEST=$ROOT/examples/hello.yaml
WORKLOAD=hello
IMAGE=$REGISTRY/hello:v1
WASM=$ROOT/examples/hello/target/wasm32-wasip1/release/hello.wasm
CONFIG=$DIR/hub/admin.yaml
CONTAINER_MANIFEST=$ROOT/examples/busybox.yaml
CONTAINER_WORKLOAD=busybox
CONTAINER_IMAGE=$REGISTRY/busybox:v1
SERVICES=(agent hub registry) # stop order

if [[ -t 1 ]]; then B=$'\e[1m' R=$'\e[31m' G=$'\e[32m' N=$'\e[0m'; else B='' R='' G='' N=''; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
info() { printf '    %s\n' "$*"; }

# die MESSAGE [LOGFILE...]: explain, show the tail of the relevant logs, exit 1.
die() {
    local msg=$1
    shift
    printf '\n%squickstart failed: %s%s\n' "$R" "$msg" "$N" >&2
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf '\n--- last lines of %s ---\n' "$f" >&2
            tail -n 40 "$f" >&2
            printf -- '--- end of %s ---\n' "$f" >&2
        fi
    done
    printf '\nState and logs are in %s; stop everything with: %s\n' "$DIR" "$STOP_CMD" >&2
    exit 1
}
trap 'rc=$?; printf "\n%squickstart failed: command exited %s at line %s: %s%s\n" "$R" "$rc" "$LINENO" "$BASH_COMMAND" "$N" >&2; exit $rc' ERR

pid_of() { [[ -f $DIR/$1.pid ]] && cat "$DIR/$1.pid"; }
alive() { local p; p=$(pid_of "$1" 2>/dev/null) && [[ -n $p ]] && kill -0 "$p" 2>/dev/null; }

stop_all() {
    local svc pid i
    # Containers outlive their agent by design; delete the example's before stopping it.
    if alive hub && alive agent && [[ -s $CONFIG ]] &&
        "$BIN_FOR_STOP" --config "$CONFIG" get workloads 2>/dev/null | awk '{print $1}' | grep -qx "$CONTAINER_WORKLOAD"; then
        "$BIN_FOR_STOP" --config "$CONFIG" delete workload "$CONTAINER_WORKLOAD" >/dev/null 2>&1 || true
        # Wait (bounded) for the agent to stop the container and remove its state.
        for ((i = 0; i < 75; i++)); do
            [[ -z $(ls -A "$DIR/agent/containers/state" 2>/dev/null) ]] && break
            sleep 0.2
        done
        info "container workload $CONTAINER_WORKLOAD deleted"
    fi
    for svc in "${SERVICES[@]}"; do
        [[ -f $DIR/$svc.pid ]] || continue
        pid=$(cat "$DIR/$svc.pid")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            if kill -0 "$pid" 2>/dev/null; then
                kill -KILL "$pid" 2>/dev/null || true
                info "$svc (pid $pid): killed"
            else
                info "$svc (pid $pid): stopped"
            fi
        fi
        rm -f "$DIR/$svc.pid"
    done
}

status_all() {
    local svc
    for svc in "${SERVICES[@]}"; do
        if alive "$svc"; then
            info "$svc: running (pid $(pid_of "$svc"))"
        else
            info "$svc: not running"
        fi
    done
}

BIN_FOR_STOP=${FLOTILLA_BIN:-$ROOT/target/$PROFILE/flotilla}
[[ $PROFILE != dev ]] || BIN_FOR_STOP=$ROOT/target/debug/flotilla

case ${1:-start} in
    stop)
        trap - ERR
        step "stopping quickstart processes ($DIR)"
        stop_all
        exit 0
        ;;
    status)
        trap - ERR
        status_all
        exit 0
        ;;
    start | up) ;;
    -h | --help | help)
        sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $SELF [start|stop|status]" >&2
        exit 2
        ;;
esac

# start NAME LOGFILE COMMAND...: run COMMAND detached, logging to LOGFILE, pid in $DIR/NAME.pid.
start() {
    local name=$1 logfile=$2
    shift 2
    : >"$logfile"
    # setsid: own session, so the service outlives this script and a Ctrl-C here.
    # NO_COLOR: the log goes to a file, so ask for plain text, not terminal colours.
    NO_COLOR=${NO_COLOR:-1} setsid "$@" </dev/null >>"$logfile" 2>&1 &
    echo $! >"$DIR/$name.pid"
    info "$name started (pid $!), log: $logfile"
}

# wait_for DESCRIPTION SERVICE LOGFILE TEST-COMMAND...: poll until TEST-COMMAND succeeds,
# failing early if SERVICE died, and after $TIMEOUT seconds.
wait_for() {
    local what=$1 svc=$2 logfile=$3
    shift 3
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [[ -n $svc ]] && ! alive "$svc"; then
            die "$svc exited while waiting for $what" "$logfile"
        fi
        if ((SECONDS >= deadline)); then
            die "timed out after ${TIMEOUT}s waiting for $what" "$logfile"
        fi
        sleep 0.5
    done
}

mkdir -p "$DIR"
cd "$ROOT"

step "installing dependencies"
"$ROOT/scripts/install-deps.sh"
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

step "building flotilla ($PROFILE)"
if [[ -n ${FLOTILLA_BIN:-} ]]; then
    BIN=$FLOTILLA_BIN
    info "using prebuilt $BIN (FLOTILLA_BIN)"
else
    case $PROFILE in
        release) cargo build --release --bin flotilla ;;
        debug | dev) PROFILE=debug && cargo build --bin flotilla ;;
        *) die "FLOTILLA_PROFILE must be release or debug, not '$PROFILE'" ;;
    esac
    BIN=$ROOT/target/$PROFILE/flotilla
fi
[[ -x $BIN ]] || die "flotilla binary not found at $BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
fl() { "$BIN" --config "$CONFIG" "$@"; }

step "building the example Wasm module (examples/hello)"
cargo build --release --target wasm32-wasip1 --manifest-path examples/hello/Cargo.toml
[[ -f $WASM ]] || die "expected $WASM after the build"
info "$WASM ($(stat -c %s "$WASM") bytes)"

step "cleaning up processes from an earlier quickstart run (if any)"
stop_all

step "starting an OCI registry on $REGISTRY"
registry_up() { curl -fs -o /dev/null --max-time 2 "http://$REGISTRY/v2/"; }
if registry_up; then
    info "a registry already answers on $REGISTRY; using it"
else
    command -v docker-registry >/dev/null 2>&1 || die "docker-registry not installed (scripts/install-deps.sh)"
    mkdir -p "$DIR/registry/data"
    cat >"$DIR/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DIR/registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
    start registry "$DIR/registry.log" docker-registry serve "$DIR/registry/config.yml"
    wait_for "the registry to answer on http://$REGISTRY/v2/" registry "$DIR/registry.log" registry_up
fi

step "starting the hub on $HUB_ADDR"
start hub "$DIR/hub.log" "$BIN" hub --data-dir "$DIR/hub" --listen "$HUB_ADDR"
wait_for "$DIR/hub/token and $DIR/hub/admin.yaml" hub "$DIR/hub.log" test -s "$DIR/hub/token" -a -s "$CONFIG"
# The files survive restarts, so also wait for the hub to answer the API.
wait_for "the hub API" hub "$DIR/hub.log" fl get nodes
info "join token: $DIR/hub/token"
info "CLI config: $CONFIG"

step "starting agent $NODE"
start agent "$DIR/agent.log" "$BIN" agent --name "$NODE" --data-dir "$DIR/agent" \
    --token-file "$DIR/hub/token" --hub "$HUB_ADDR"
node_ready() { fl get nodes | awk -v n="$NODE" '$1 == n && $2 == "Ready" { found = 1 } END { exit !found }'; }
wait_for "node $NODE to be Ready" agent "$DIR/agent.log" node_ready

step "pushing $WASM to $IMAGE"
if ! out=$("$BIN" push "$WASM" "$IMAGE" 2>&1); then
    printf '%s\n' "$out" >&2
    die "flotilla push failed" "$DIR/registry.log"
fi
printf '%s\n' "$out" | sed 's/^/    /'

step "applying $MANIFEST"
if ! out=$(fl apply -f "$MANIFEST" 2>&1); then
    printf '%s\n' "$out" >&2
    die "flotilla apply failed" "$DIR/hub.log"
fi
printf '%s\n' "$out" | sed 's/^/    /'

want=$(awk '$1 == "replicas:" { print $2; exit }' "$MANIFEST")
want=${want:-1}
step "waiting up to ${TIMEOUT}s for $want replica(s) of $WORKLOAD to be Running"
replicas_running() {
    local n
    n=$(fl get replicas | awk -v w="$WORKLOAD" '$2 == w && $4 == "Running" { n++ } END { print n + 0 }')
    ((n >= want))
}
deadline=$((SECONDS + TIMEOUT))
until replicas_running 2>/dev/null; do
    alive hub || die "the hub exited" "$DIR/hub.log"
    alive agent || die "the agent exited" "$DIR/agent.log"
    if ((SECONDS >= deadline)); then
        printf '\n' >&2
        fl get replicas -o wide >&2 || true
        fl describe workload "$WORKLOAD" >&2 || true
        die "replicas of $WORKLOAD not Running after ${TIMEOUT}s" "$DIR/agent.log" "$DIR/hub.log"
    fi
    sleep 1
done
info "Running"

containers=0
if [[ $(id -u) -eq 0 ]] && { [[ -d /sys/fs/cgroup/memory ]] || [[ -f /sys/fs/cgroup/cgroup.controllers ]]; }; then
    containers=1
    step "building the example container image (examples/busybox) and pushing it to $CONTAINER_IMAGE"
    "$ROOT/examples/busybox/build.sh" "$DIR/busybox-layout" | sed 's/^/    /'
    if ! out=$("$BIN" push "$DIR/busybox-layout" "$CONTAINER_IMAGE" 2>&1); then
        printf '%s\n' "$out" >&2
        die "flotilla push of the container image failed" "$DIR/registry.log"
    fi
    printf '%s\n' "$out" | sed 's/^/    /'
    step "applying $CONTAINER_MANIFEST"
    fl apply -f "$CONTAINER_MANIFEST" | sed 's/^/    /'
    container_running() {
        fl get replicas | awk -v w="$CONTAINER_WORKLOAD" '$2 == w && $4 == "Running" { n++ } END { exit !n }'
    }
    deadline=$((SECONDS + TIMEOUT))
    until container_running 2>/dev/null; do
        alive agent || die "the agent exited" "$DIR/agent.log"
        if ((SECONDS >= deadline)); then
            fl describe workload "$CONTAINER_WORKLOAD" >&2 || true
            die "the container workload is not Running after ${TIMEOUT}s" "$DIR/agent.log"
        fi
        sleep 1
    done
    info "Running"
else
    step "skipping the container example: it needs root and cgroups (the Wasm example runs anyway)"
fi

step "flotilla get nodes"
fl get nodes
step "flotilla get workloads"
fl get workloads
step "flotilla get replicas -o wide"
fl get replicas -o wide

step "a few seconds of logs: flotilla logs $WORKLOAD --tail 400"
sleep 3
fl logs "$WORKLOAD" --tail 400
if ((containers)); then
    step "flotilla logs $CONTAINER_WORKLOAD --tail 5"
    fl logs "$CONTAINER_WORKLOAD" --tail 5
fi

trap - ERR
cat <<EOF

${G}${B}Flotilla is running.${N}
  registry  http://$REGISTRY   $(alive registry && echo "(pid $(pid_of registry), log $DIR/registry.log)" || echo "(not started by the quickstart)")
  hub       $HUB_ADDR    (pid $(pid_of hub), log $DIR/hub.log, data $DIR/hub)
  agent     $NODE           (pid $(pid_of agent), log $DIR/agent.log, data $DIR/agent)

Use the CLI:
  export FLOTILLA_CONFIG=$CONFIG
  $BIN get replicas -o wide
  $BIN logs $WORKLOAD -f                # follow the logs (Ctrl-C to stop)
  $BIN describe workload $WORKLOAD
  $BIN delete workload $WORKLOAD

Stop everything (pids in $DIR/*.pid):
  $STOP_CMD
EOF
