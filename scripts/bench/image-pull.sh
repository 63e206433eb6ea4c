#!/bin/bash
# Pull-and-unpack of a Debian 12 image from a loopback registry: Flotilla's image store (the
# oci-runtime `pull` bench: pull into a fresh store, then unpack every layer into snapshots) vs
# `skopeo copy docker://… oci:DIR:12` followed by `umoci unpack` (and, for reference,
# `umoci raw unpack`, which extracts the rootfs without umoci's mtree manifest and runtime config).
#
# The image is built once from a debootstrap minbase rootfs and kept (BENCH_DATA): three gzip
# layers shaped like a real image: the base system, /usr/share/{doc,man,info,locale}, and what an
# `apt-get update` leaves (/var/lib/apt/lists, /var/cache/apt). Each round runs both tools once,
# the order alternating, each into fresh directories (removed at the end, or after each run with
# CLEAN=each). Page caches are not dropped: every run reads the registry's blobs warm, the same
# for both. Needs about 1.1 GB of free disk per round.
#
# Usage: scripts/bench/image-pull.sh              (as root: unpacking creates devices/whiteouts)
# Environment: RUNS rounds (default 5), BENCH_DATA (default: bench-data beside the repository;
#              holds debian-rootfs/ and debian-oci/), MIRROR (http://deb.debian.org/debian),
#              CLEAN=end|each (when run outputs are removed, see below), KEEP_WORK=1 to keep the
#              work directory, PULL_BENCH (path of the built bench binary;
#              default: built with cargo bench --no-run).
# Needs: debootstrap (first run only), skopeo, umoci, docker-registry, jq, curl, gzip, GNU tar.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DATA=${BENCH_DATA:-$(dirname "$ROOT")/bench-data}
ROOTFS=$BENCH_DATA/debian-rootfs
LAYOUT=$BENCH_DATA/debian-oci
MIRROR=${MIRROR:-http://deb.debian.org/debian}
RUNS=${RUNS:-5}
TAG=12

for tool in skopeo umoci docker-registry jq curl gzip tar sha256sum; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (unpacking creates whiteouts and chowns files)" >&2; exit 1; }
mkdir -p "$BENCH_DATA"

# --- 1. The rootfs (debootstrap, once) -------------------------------------------------------
if [ ! -f "$ROOTFS.done" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is needed to build $ROOTFS" >&2; exit 1; }
    rm -rf "$ROOTFS.tmp"
    debootstrap --variant=minbase bookworm "$ROOTFS.tmp" "$MIRROR"
    echo "deb $MIRROR bookworm main" >"$ROOTFS.tmp/etc/apt/sources.list"
    chroot "$ROOTFS.tmp" apt-get update
    : >"$ROOTFS.tmp/etc/resolv.conf" # the host's; an image carries an empty one
    rm -f "$ROOTFS.tmp"/var/cache/apt/archives/*.deb
    rm -rf "$ROOTFS"
    mv "$ROOTFS.tmp" "$ROOTFS"
    date -u +%FT%TZ >"$ROOTFS.done"
fi

# --- 2. The OCI layout (once) ----------------------------------------------------------------
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

build_layout() {
    local out=$LAYOUT.tmp
    rm -rf "$out"
    mkdir -p "$out/blobs/sha256"
    local docs=(./usr/share/doc ./usr/share/man ./usr/share/info ./usr/share/locale)
    local lists=(./var/lib/apt/lists ./var/cache/apt)
    local tarflags=(--format=pax --sort=name --numeric-owner --xattrs --xattrs-include='security.capability')
    local ex=()
    for d in "${docs[@]}" "${lists[@]}"; do ex+=(--exclude="$d"); done
    tar -C "$ROOTFS" "${tarflags[@]}" "${ex[@]}" -cf "$out/l1.tar" .
    tar -C "$ROOTFS" "${tarflags[@]}" -cf "$out/l2.tar" "${docs[@]}"
    tar -C "$ROOTFS" "${tarflags[@]}" -cf "$out/l3.tar" "${lists[@]}"
    local diff_ids=() layers=() n
    for l in l1 l2 l3; do
        diff_ids+=("sha256:$(sha "$out/$l.tar")")
        gzip -n -6 <"$out/$l.tar" >"$out/$l.tar.gz"
        # A layer that does not list back whole is not pushed.
        n=$(tar -tf "$out/$l.tar" | wc -l)
        [ "$(tar -tzf "$out/$l.tar.gz" | wc -l)" = "$n" ] || { echo "layer $l.tar.gz is truncated" >&2; exit 1; }
        gzip -t "$out/$l.tar.gz"
        local d; d=$(sha "$out/$l.tar.gz")
        layers+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$d\",\"size\":$(size "$out/$l.tar.gz")}")
        mv "$out/$l.tar.gz" "$out/blobs/sha256/$d"
        rm "$out/$l.tar"
    done
    # The whole rootfs must be covered: the three layers list as many entries as one tar of it.
    local total parts=0
    total=$(tar -C "$ROOTFS" -cf - . | tar -tf - | wc -l)
    for l in "${layers[@]}"; do
        n=$(tar -tzf "$out/blobs/sha256/$(echo "$l" | jq -r .digest | cut -d: -f2)" | wc -l)
        parts=$((parts + n))
    done
    [ "$parts" = "$total" ] || { echo "layers list $parts entries, the rootfs has $total" >&2; exit 1; }
    echo "layout: $total entries in 3 layers"
    jq -n --args '{
        architecture: "amd64", os: "linux",
        config: {Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], Cmd: ["bash"]},
        rootfs: {type: "layers", diff_ids: $ARGS.positional},
        history: [{created_by: "debootstrap --variant=minbase bookworm"},
                  {created_by: "usr/share/{doc,man,info,locale}"},
                  {created_by: "apt-get update"}]
    }' "${diff_ids[@]}" >"$out/config.json"
    local cd; cd=$(sha "$out/config.json")
    local cs; cs=$(size "$out/config.json")
    mv "$out/config.json" "$out/blobs/sha256/$cd"
    printf '%s\n' "${layers[@]}" | jq -s --arg cd "sha256:$cd" --argjson cs "$cs" '{
        schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
        layers: .
    }' >"$out/manifest.json"
    local md; md=$(sha "$out/manifest.json")
    local ms; ms=$(size "$out/manifest.json")
    mv "$out/manifest.json" "$out/blobs/sha256/$md"
    jq -n --arg md "sha256:$md" --argjson ms "$ms" --arg tag "$TAG" '{
        schemaVersion: 2,
        manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
                     annotations: {"org.opencontainers.image.ref.name": $tag}}]
    }' >"$out/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
    rm -rf "$LAYOUT"
    mv "$out" "$LAYOUT"
}
[ -f "$LAYOUT/index.json" ] || build_layout

# --- 3. A registry on a free loopback port ---------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/var/tmp}/flotilla-image-bench.XXXXXX")
registry_pid=
cleanup() {
    local status=$?
    if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
    [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=0
for _ in $(seq 50); do
    p=$((20000 + RANDOM % 40000))
    if port_free "$p"; then port=$p; break; fi
done
[ "$port" != 0 ] || { echo "no free loopback port found" >&2; exit 1; }
addr=127.0.0.1:$port
mkdir -p "$work/registry"
cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $addr
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
    curl -fs "http://$addr/v2/" >/dev/null && break
    kill -0 "$registry_pid" 2>/dev/null || { cat "$work/registry.log" >&2; exit 1; }
    sleep 0.1
done
curl -fs "http://$addr/v2/" >/dev/null || { echo "registry on $addr did not start" >&2; exit 1; }
REF=$addr/debian:$TAG
skopeo copy --quiet --dest-tls-verify=false "oci:$LAYOUT:$TAG" "docker://$REF"

# --- 4. The Flotilla bench binary ------------------------------------------------------------
if [ -z "${PULL_BENCH:-}" ]; then
    PULL_BENCH=$(cd "$ROOT" && cargo bench -p flotilla-oci-runtime --bench pull --no-run --message-format=json 2>/dev/null |
        jq -r 'select(.reason == "compiler-artifact" and .target.name == "pull" and .executable != null) | .executable' |
        tail -n1)
fi
[ -x "$PULL_BENCH" ] || { echo "cannot find the pull bench binary" >&2; exit 1; }

# --- 5. Rounds -------------------------------------------------------------------------------
ms_now() { echo $(($(date +%s%N) / 1000000)); }
results=$work/results.tsv # tool phase ms
: >"$results"

# Each run writes into directories of its own round. With CLEAN=end they are removed only after
# the last round: ext4 without a journal does not reuse an inode freed less than 60 s ago (360 s
# while its inode table block is dirty), and with 6,700 inodes freed after every run, creating
# files in the next run spends most of its time skipping over them (recently_deleted in perf).
# CLEAN=each removes them after every run, to show that effect.
CLEAN=${CLEAN:-end}
done_with() { if [ "$CLEAN" = each ]; then rm -rf "$@"; fi; }

run_flotilla() {
    local keep=$work/r$round/flotilla out t0 t1
    t0=$(ms_now)
    out=$("$PULL_BENCH" "$REF" --bench --insecure "$addr" --runs 1 --keep "$keep")
    t1=$(ms_now)
    # "run pull unpack total bytes layers" on the data line.
    echo "$out" | awk -v wall=$((t1 - t0)) '$1 == "0" {
        printf "flotilla\tpull\t%s\nflotilla\tunpack\t%s\nflotilla\ttotal\t%s\nflotilla\tprocess\t%s\n", $2, $3, $4, wall }' >>"$results"
    [ -d "$keep/run-0/snapshots" ] || { echo "flotilla run left no snapshots: $out" >&2; exit 1; }
    du -sb "$keep/run-0/snapshots" | cut -f1 >"$work/flotilla-unpacked-bytes"
    done_with "$keep"
}

run_peer() {
    local dir=$work/r$round/skopeo-oci bundle=$work/r$round/umoci-bundle raw=$work/r$round/umoci-raw t0 t1 t2 t3 t4
    t0=$(ms_now)
    skopeo copy --quiet --src-tls-verify=false "docker://$REF" "oci:$dir:$TAG"
    t1=$(ms_now)
    umoci --log=error unpack --image "$dir:$TAG" "$bundle" >/dev/null
    t2=$(ms_now)
    du -sb "$bundle/rootfs" | cut -f1 >"$work/umoci-unpacked-bytes"
    done_with "$bundle"
    t3=$(ms_now)
    umoci --log=error raw unpack --image "$dir:$TAG" "$raw" >/dev/null
    t4=$(ms_now)
    printf 'peer\tpull\t%s\npeer\tunpack\t%s\npeer\ttotal\t%s\npeer\traw-unpack\t%s\npeer\traw-total\t%s\n' \
        $((t1 - t0)) $((t2 - t1)) $((t2 - t0)) $((t4 - t3)) $((t1 - t0 + t4 - t3)) >>"$results"
    done_with "$dir" "$raw"
}

echo "image $REF, $RUNS rounds, CLEAN=$CLEAN"
echo "versions: $(skopeo --version), $(umoci --version), $(docker-registry --version 2>/dev/null | head -n1)"
round=1
while [ "$round" -le "$RUNS" ]; do
    mkdir -p "$work/r$round"
    if [ $((round % 2)) = 1 ]; then run_flotilla; run_peer; else run_peer; run_flotilla; fi
    awk -v r="$round" -F'\t' 'BEGIN{ORS=""} {last[$1" "$2]=$3} END{
        print "round " r ": flotilla pull " last["flotilla pull"] " unpack " last["flotilla unpack"] " total " last["flotilla total"] " (process " last["flotilla process"] ")"
        print " | skopeo " last["peer pull"] " umoci unpack " last["peer unpack"] " total " last["peer total"] " (raw unpack " last["peer raw-unpack"] ")\n" }' \
        <(tail -n 9 "$results")
    round=$((round + 1))
done

# --- 6. Summary ------------------------------------------------------------------------------
stats() { # tool phase -> "median min max"
    awk -F'\t' -v t="$1" -v p="$2" '$1 == t && $2 == p { print $3 }' "$results" | sort -n |
        awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'
}
compressed=$(jq -r '.layers | map(.size) | add' "$LAYOUT/blobs/sha256/$(jq -r '.manifests[0].digest' "$LAYOUT/index.json" | cut -d: -f2)")
layers=$(jq -r '.layers | length' "$LAYOUT/blobs/sha256/$(jq -r '.manifests[0].digest' "$LAYOUT/index.json" | cut -d: -f2)")
echo
echo "image: $layers layers, $compressed bytes compressed; unpacked: flotilla snapshots $(cat "$work/flotilla-unpacked-bytes") bytes, umoci rootfs $(cat "$work/umoci-unpacked-bytes") bytes (du -sb)"
echo
printf '%-22s %26s %26s %8s\n' "phase (ms)" "flotilla median [min-max]" "skopeo+umoci median [min-max]" "ratio"
row() { # label flotilla-phase peer-phase
    read -r fm fl fh <<<"$(stats flotilla "$2")"
    read -r pm pl ph <<<"$(stats peer "$3")"
    printf '%-22s %26s %26s %8s\n' "$1" "$fm [$fl-$fh]" "$pm [$pl-$ph]" "$(awk -v a="$fm" -v b="$pm" 'BEGIN { printf "%.2f", a / b }')"
}
row "pull" pull pull
row "unpack" unpack unpack
row "total" total total
row "unpack vs raw unpack" unpack raw-unpack
row "total vs raw total" total raw-total
row "process vs total" process total
