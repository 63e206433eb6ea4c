#!/usr/bin/env bash
# Builds Flotilla's fuzz targets and runs each for SECONDS (default 30) from its seeds,
# keeping new inputs in fuzz/corpus/<target>. Stops at the first crash (its input is left in
# fuzz/artifacts/<target>/ or fuzz/oci/artifacts/<target>/). See SECURITY.md, "Fuzzing".
#
#   scripts/fuzz.sh                     # every target, 30 s each
#   scripts/fuzz.sh 5 frame manifest    # what CI runs
#   scripts/fuzz.sh 1800 oci_unpack     # 30 minutes of one target
#
# Protocol targets (frame, manifest) live in fuzz/, oci-runtime's (oci_json, oci_archive,
# oci_unpack) in fuzz/oci/; both share fuzz/target.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
seconds=${1:-30}
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "[fuzz] installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly-only compiler flags (sanitizers, coverage); the stable toolchain
# accepts them with RUSTC_BOOTSTRAP and ships the sanitizer runtimes.
export RUSTC_BOOTSTRAP=1

dir_of() { case $1 in oci_*) echo oci ;; *) echo . ;; esac; }
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list; cargo fuzz list --fuzz-dir oci)
fi
for d in $(for t in "${targets[@]}"; do dir_of "$t"; done | sort -u); do
    for t in "${targets[@]}"; do
        [[ $(dir_of "$t") == "$d" ]] && cargo fuzz build --fuzz-dir "$d" "$t"
    done
done

# The archive and unpack targets write files: keep them in a scratch dir of their own.
scratch=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$scratch" "$log"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "[fuzz] $t for ${seconds}s"
    status=0
    TMPDIR=$scratch cargo fuzz run --fuzz-dir "$(dir_of "$t")" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
    if ((status != 0)); then
        tail -40 "$log" >&2
        echo "[fuzz] $t failed (exit $status); its input is in fuzz/$(dir_of "$t")/artifacts/$t" >&2
        exit 1
    fi
done
echo "[fuzz] ${targets[*]}: ${seconds}s each without a crash"
