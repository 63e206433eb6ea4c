#!/usr/bin/env bash
# Builds the test guest components (wasm32-wasip2) into $CARGO_TARGET_DIR (default:
# <workspace>/target/tmp/wasm-guests, where the test suite looks for them). The test suite runs the
# same build by itself when needed, so this script is only a convenience.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../../../target/tmp/wasm-guests}"
cargo build --release --target wasm32-wasip2 --manifest-path "$here/Cargo.toml" --workspace
ls -l "$CARGO_TARGET_DIR"/wasm32-wasip2/release/*.wasm
