#!/usr/bin/env bash
# Cross-builds the `flotilla` binary for an ARM gateway with Debian's cross compiler:
#
#   scripts/cross.sh aarch64        # -> target/aarch64-unknown-linux-gnu/release/flotilla
#
# Installs what it needs (gcc-aarch64-linux-gnu and the rustup target) when missing, builds
# in release, and writes a stripped copy next to the binary (flotilla.stripped). Run the
# result on this machine under emulation with Debian's qemu-user-static:
#
#   qemu-aarch64-static -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/release/flotilla version
#
# Only aarch64 for now: wasmtime's compiler (Cranelift) has no 32-bit ARM backend, so an
# armv7 agent needs the compiler-less build that is still to come.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

arch=${1:-}
case $arch in
    aarch64)
        triple=aarch64-unknown-linux-gnu
        gcc=aarch64-linux-gnu-gcc
        packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
        ;;
    *)
        echo "usage: scripts/cross.sh aarch64" >&2
        exit 2
        ;;
esac

if ! command -v "$gcc" >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >&2
fi
if ! rustup target list --installed | grep -qx "$triple"; then
    rustup target add "$triple" >&2
fi

upper=${triple^^}
upper=${upper//-/_}
export "CARGO_TARGET_${upper}_LINKER=$gcc"
export "CC_${triple//-/_}=$gcc"
cargo build --release --target "$triple" --bin flotilla
out=target/$triple/release/flotilla
"${gcc%-gcc}-strip" -o "$out.stripped" "$out"
ls -l "$out" "$out.stripped"
