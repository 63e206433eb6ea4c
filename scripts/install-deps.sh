#!/usr/bin/env bash
# Installs what Flotilla's build, tests and quickstart need on Debian 12.
# Idempotent: installs only missing packages (running `apt-get update` first
# only when something is missing) and adds the wasm32-wasip1 Rust target.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(docker-registry busybox-static ca-certificates curl procps)

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

if ! command -v rustup >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/rustup" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null 2>&1; then
    log "rustup not found: install Rust from https://rustup.rs first" >&2
    exit 1
fi
if rustup target list --installed | grep -qx wasm32-wasip1; then
    log "rust target present: wasm32-wasip1"
else
    log "adding rust target wasm32-wasip1"
    rustup target add wasm32-wasip1
fi
