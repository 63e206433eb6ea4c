#!/usr/bin/env bash
# The one command that runs all of Flotilla's tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# CI (if set) is inherited by cargo and the tests.

step() { printf '\n==> %s\n' "$*"; }

step "install dependencies"
scripts/install-deps.sh

# The examples are built before the workspace tests, which find them at:
#   examples/hello/target/wasm32-wasip1/release/hello.wasm                   (core module, WASI preview 1)
#   examples/hello-c/build/hello.wasm                                        (core module, WASI preview 1, C)
#   examples/hello-component/target/wasm32-wasip2/release/hello-component.wasm  (component, wasi:cli/run)
#   examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm         (component, wasi:http/proxy)
step "build the example Wasm module (examples/hello, wasm32-wasip1)"
cargo build --release --target wasm32-wasip1 --manifest-path examples/hello/Cargo.toml

step "build the C example (examples/hello-c, clang + wasi-libc, wasm32-wasi)"
make -C examples/hello-c

step "build the command component example (examples/hello-component, wasm32-wasip2)"
cargo build --release --target wasm32-wasip2 --manifest-path examples/hello-component/Cargo.toml

step "build the wasi:http component example (examples/hello-http, wasm32-wasip2)"
cargo build --release --target wasm32-wasip2 --manifest-path examples/hello-http/Cargo.toml

# A component starts with "\0asm" and version/layer 0d 00 01 00; a core module with 01 00 00 00.
check_wasm() {
    local file=$1 want=$2 head
    [[ -f $file ]] || { echo "missing $file" >&2; exit 1; }
    head=$(od -An -tx1 -N8 "$file" | tr -d ' \n')
    if [[ $head != "$want" ]]; then
        echo "$file starts with $head, expected $want" >&2
        exit 1
    fi
}
check_wasm examples/hello/target/wasm32-wasip1/release/hello.wasm 0061736d01000000
check_wasm examples/hello-c/build/hello.wasm 0061736d01000000
check_wasm examples/hello-component/target/wasm32-wasip2/release/hello-component.wasm 0061736d0d000100
check_wasm examples/hello-http/target/wasm32-wasip2/release/hello_http.wasm 0061736d0d000100

step "workspace tests: cargo test --workspace --all-targets"
cargo test --workspace --all-targets

step "example tests (host): examples/hello, examples/hello-component, examples/hello-http"
cargo test --manifest-path examples/hello/Cargo.toml
cargo test --manifest-path examples/hello-component/Cargo.toml
cargo test --manifest-path examples/hello-http/Cargo.toml

step "fuzz smoke: every fuzz target for 5 s (scripts/fuzz.sh; 30-minute runs in SECURITY.md)"
scripts/fuzz.sh 5 frame manifest oci_json oci_archive oci_unpack

step "all tests passed"
