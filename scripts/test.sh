#!/usr/bin/env bash
# The one command that runs all of Flotilla's tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# CI (if set) is inherited by cargo and the tests.

step() { printf '\n==> %s\n' "$*"; }

step "install dependencies"
scripts/install-deps.sh

step "build the example Wasm module (examples/hello, wasm32-wasip1)"
cargo build --release --target wasm32-wasip1 --manifest-path examples/hello/Cargo.toml

step "workspace tests: cargo test --workspace --all-targets"
cargo test --workspace --all-targets

step "example tests: cargo test --manifest-path examples/hello/Cargo.toml"
cargo test --manifest-path examples/hello/Cargo.toml

step "all tests passed"
