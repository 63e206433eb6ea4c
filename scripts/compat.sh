#!/usr/bin/env bash
# Mixed versions end to end: builds `flotilla` at git revision REV (default: the previous
# commit) in a worktree of its own, then runs tests/compat_e2e.rs, where a hub of this build
# serves an agent of REV's and the reverse, each running the example module.
#
#   scripts/compat.sh            # against HEAD~1
#   scripts/compat.sh v0.1.0     # against a release
#
# It also upgrades an agent of REV to this build with `flotilla upgrade agents` (when REV
# takes upgrade orders, as every build from the one that introduced them does).
#
# Not part of scripts/test.sh: building another revision takes minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rev=${1:-HEAD~1}
sha=$(git rev-parse --verify "$rev^{commit}")
root=${COMPAT_DIR:-/tmp/flotilla-compat}
src=$root/src-$sha
if [[ ! -d $src ]]; then
    mkdir -p "$root"
    git worktree add --detach "$src" "$sha"
fi
echo "[compat] building flotilla at $sha"
cargo build --manifest-path "$src/Cargo.toml" --bin flotilla --target-dir "$root/target"
export FLOTILLA_PREVIOUS_BIN=$root/target/debug/flotilla
cargo build --release --target wasm32-wasip1 --manifest-path examples/hello/Cargo.toml
echo "[compat] hub and agent of this build against $sha"
flock /tmp/flotilla-e2e.lock cargo test --test compat_e2e -- --nocapture
