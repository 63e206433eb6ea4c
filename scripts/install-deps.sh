#!/usr/bin/env bash
# Installs what Flotilla's build, tests and quickstart need on Debian 12.
# Idempotent: installs only missing packages (running `apt-get update` first
# only when something is missing) and adds the wasm32-wasip1 and wasm32-wasip2
# Rust targets.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    docker-registry busybox-static ca-certificates curl procps
    # examples/hello-c: make, Debian's clang and wasm-ld, wasi-libc (installed
    # multiarch-style under /usr/include/wasm32-wasi and /usr/lib/wasm32-wasi,
    # which clang --target=wasm32-wasi finds without --sysroot) and the wasm32
    # compiler-rt builtins.
    make clang lld wasi-libc libclang-rt-14-dev-wasm32
    # tests/oci_cli.rs builds a static syscall probe (tests/fixtures/syscall_probe.c).
    gcc libc6-dev
    # Containers: iproute2 for network namespaces in tests; runc, crun, skopeo,
    # umoci and debootstrap are the peers the container benchmarks compare with
    # and the tools that build their images.
    iproute2 runc crun skopeo umoci debootstrap
    # tests/oci_cli.rs runs `podman run --runtime` with `flotilla oci` as Podman's runtime.
    podman
    # Fault injection in the autonomy tests: packet loss by iptables where the
    # kernel lacks netem; nsenter (util-linux) runs agents in their namespaces.
    iptables util-linux
    # Container networks: the agent runs the standard CNI plugins (bridge, host-local,
    # portmap, and macvlan/ipvlan for `network: {cni: NAME}`) from /usr/lib/cni.
    containernetworking-plugins
    # Services: conntrack(8) forgets UDP flows to a withdrawn endpoint (agent/src/services).
    conntrack
    # The hub's PostgreSQL datastore: the store and multi-hub tests start their
    # own throwaway server from /usr/lib/postgresql/<major>/bin as user postgres.
    postgresql
    # The metrics test scrapes a hub and agents with a real Prometheus of its own.
    prometheus
    # tests/service.rs: `systemd-analyze verify` on deploy/systemd/*.service and shellcheck
    # on scripts/install.sh.
    systemd shellcheck
)

log() { printf '[install-deps] %s\n' "$*"; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo -E)
    else
        log "missing packages: ${missing[*]} (run as root or install sudo)" >&2
        exit 1
    fi
    log "installing: ${missing[*]}"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "system packages present: ${PACKAGES[*]}"
fi

# Debian's prometheus package starts a server on :9090 where an init system runs;
# the tests start their own. Stop it so it holds no port.
if command -v service >/dev/null 2>&1 && service prometheus status >/dev/null 2>&1; then
    service prometheus stop >/dev/null 2>&1 || true
fi

# Debian's postinst creates (and, with systemd, starts) a `main` cluster on
# port 5432. Nothing here uses it: tests start their own server in a temp dir.
# Stop it and keep it from starting at boot, so it holds no port or memory.
if command -v pg_lsclusters >/dev/null 2>&1; then
    while read -r version cluster _; do
        [[ -n "$version" ]] || continue
        conf="/etc/postgresql/$version/$cluster/start.conf"
        if [[ -w "$conf" ]] && ! grep -qx disabled "$conf"; then
            log "disabling the packaged PostgreSQL cluster $version/$cluster (tests start their own)"
            echo disabled >"$conf"
        fi
        pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
    done < <(pg_lsclusters -h 2>/dev/null)
fi

if ! command -v rustup >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/rustup" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null 2>&1; then
    log "rustup not found: install Rust from https://rustup.rs first" >&2
    exit 1
fi
installed_targets=$(rustup target list --installed)
for target in wasm32-wasip1 wasm32-wasip2; do
    if grep -qx "$target" <<<"$installed_targets"; then
        log "rust target present: $target"
    else
        log "adding rust target $target"
        rustup target add "$target"
    fi
done

# Fuzzing (scripts/fuzz.sh, and its short run in scripts/test.sh): cargo-fuzz from crates.io.
# It drives libFuzzer with the stable toolchain under RUSTC_BOOTSTRAP (see SECURITY.md).
if cargo fuzz --version >/dev/null 2>&1; then
    log "cargo-fuzz present"
else
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
