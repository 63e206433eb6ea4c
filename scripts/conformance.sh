#!/usr/bin/env bash
# Runs the Open Containers Initiative's runtime validation suite (opencontainers/runtime-tools
# `validation/`, the tests crun, runc and youki use) against crun, runc and `flotilla oci`
# side by side, and prints a table: tests fully passed and assertions ok per runtime, then
# every test flotilla does not fully pass with its first failing assertion.
#
#   scripts/conformance.sh                      # all three runtimes, every test
#   RUNTIMES="flotilla" TESTS="default linux_devices" scripts/conformance.sh
#   FLOTILLA_PREBUILT=1 FLOTILLA=target/debug/flotilla scripts/conformance.sh   # no build
#
# The suite's source is fetched, never kept in this project: a git clone of
# https://github.com/opencontainers/runtime-tools at $RT_COMMIT (the tree Debian 12 packages,
# whose vendor/ directory holds every Go dependency, so the build is offline), or the
# checkout named by RUNTIME_TOOLS_SRC (a directory or a bare git directory; where GitHub is
# out of reach, a copy of the repository brought by other means). It builds with
# Debian's golang-go in GOPATH mode. Needs root. Work files: $WORK (default
# /var/tmp/flotilla-conformance); TAP output per runtime and test in $WORK/out.
#
# Host note: crun refuses a hybrid cgroup host whose v2 hierarchy holds controllers (here,
# hugetlb: "cgroups in hybrid mode not supported"). The run happens in a private mount
# namespace that mounts a v1 hugetlb hierarchy, which moves hugetlb off v2 for every runtime
# alike (the controller stays on that v1 hierarchy until reboot; nothing else here uses it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
RT_COMMIT=${RT_COMMIT:-0105384} # runtime-tools master of 2022-04-23 (Debian 12's snapshot)
WORK=${WORK:-/var/tmp/flotilla-conformance}
RUNTIMES=${RUNTIMES:-"crun runc flotilla"}
PER_TEST_TIMEOUT=${PER_TEST_TIMEOUT:-120}
FLOTILLA=${FLOTILLA:-$REPO/target/release/flotilla}

log() { printf '[conformance] %s\n' "$*" >&2; }

if [[ ${1:-} != --inside ]]; then
    [[ $(id -u) -eq 0 ]] || { log "needs root"; exit 1; }
    command -v go >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >&2
    for r in $RUNTIMES; do
        [[ $r == flotilla ]] || command -v "$r" >/dev/null ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$r" >&2
    done
    if [[ " $RUNTIMES " == *" flotilla "* && -z ${FLOTILLA_PREBUILT:-} ]]; then
        log "building flotilla (release)"
        cargo build --release --bin flotilla >&2
    fi

    src=$WORK/gopath/src/github.com/opencontainers/runtime-tools
    if [[ ! -f $src/.built-$RT_COMMIT ]]; then
        rm -rf "$WORK/gopath"
        mkdir -p "$(dirname "$src")"
        from=${RUNTIME_TOOLS_SRC:-}
        if [[ -z $from ]]; then
            from=$WORK/runtime-tools.git
            [[ -d $from ]] || git clone --bare -q https://github.com/opencontainers/runtime-tools "$from"
        fi
        log "runtime-tools $RT_COMMIT from $from"
        if [[ -d $from/validation ]]; then
            cp -a "$from" "$src"
        else
            git --git-dir="$from" archive --prefix=runtime-tools/ "$RT_COMMIT" | tar -x -C "$(dirname "$src")"
        fi
        log "building runtimetest and the validation tests (GOPATH mode, vendored dependencies)"
        (
            cd "$src"
            export GOPATH=$WORK/gopath GO111MODULE=off GOCACHE=$WORK/gocache
            go build -tags "netgo osusergo" -ldflags "-extldflags -static" -o runtimetest ./cmd/runtimetest
            for f in $(find validation -name '*.go' -not -path '*/util/*' | sort); do
                go build -o "${f%.go}.t" "./$f"
            done
        )
        touch "$src/.built-$RT_COMMIT"
    fi
    exec unshare -m --propagation private "${BASH_SOURCE[0]}" --inside
fi

# --- inside a private mount namespace ---
# Once moved off v2, hugetlb stays on its v1 hierarchy (unmounted) until reboot: mount it
# whenever the kernel has it and it is not mounted, so no runtime sees a bare directory.
# The mount point lives in the host's /sys/fs/cgroup tmpfs; it is removed on the way out.
hugetlb=/sys/fs/cgroup/hugetlb
if grep -qw '^hugetlb' /proc/cgroups && ! mountpoint -q "$hugetlb" &&
    ! grep -qw hugetlb /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    made=0
    [[ -d $hugetlb ]] || { mkdir "$hugetlb" && made=1; }
    mount -t cgroup -o hugetlb cgroup "$hugetlb"
    unmount_hugetlb() {
        umount "$hugetlb"
        if ((made)); then rmdir "$hugetlb"; fi
    }
    trap unmount_hugetlb EXIT
fi

src=$WORK/gopath/src/github.com/opencontainers/runtime-tools
out=$WORK/out
mkdir -p "$out" "$WORK/bin"
# `flotilla oci` under one executable name, as the suite calls $RUNTIME VERB ARGS.
cat >"$WORK/bin/flotilla-oci" <<EOF
#!/bin/sh
exec "$FLOTILLA" oci --root "$WORK/flotilla-state" "\$@"
EOF
chmod +x "$WORK/bin/flotilla-oci"

cd "$src"
tests=()
if [[ -n ${TESTS:-} ]]; then
    for t in $TESTS; do tests+=("validation/$t/$t.t"); done
else
    mapfile -t tests < <(find validation -name '*.t' | sort)
fi

declare -A passed total_ok total_all
for r in $RUNTIMES; do
    cmd=$r
    [[ $r == flotilla ]] && cmd=$WORK/bin/flotilla-oci
    passed[$r]=0 total_ok[$r]=0 total_all[$r]=0
    rm -f "$out/$r".*
    for t in "${tests[@]}"; do
        name=$(basename "$t" .t)
        f=$out/$r.$name.tap
        rc=0
        RUNTIME=$cmd timeout "$PER_TEST_TIMEOUT" "./$t" >"$f" 2>&1 || rc=$?
        ok=$(grep -c '^ok ' "$f" || true)
        notok=$(grep -c '^not ok ' "$f" || true)
        total_ok[$r]=$((total_ok[$r] + ok))
        total_all[$r]=$((total_all[$r] + ok + notok))
        # A test passes when it exits 0 with no failed assertion and no error reported outside
        # an ok assertion: several tests report their failure only as a YAML block with an
        # "error" after zero assertions, and the *_fail tests print nothing when the runtime
        # refuses as it must.
        stray=$(awk '/^ok /{last="ok"} /^not ok /{last="not"} /^  ---$/{inb=(last != "ok")} /^  \.\.\.$/{inb=0}
            inb && /^    "error": "[^"]/{n++} END{print n+0}' "$f")
        if [[ $rc -eq 0 && $notok -eq 0 && $stray -eq 0 ]]; then
            passed[$r]=$((passed[$r] + 1))
            echo "pass" >"$out/$r.$name.result"
        else
            echo "fail" >"$out/$r.$name.result"
        fi
    done
    log "$r: ${passed[$r]}/${#tests[@]} tests, ${total_ok[$r]}/${total_all[$r]} assertions"
done

printf '\n| | %s |\n|---|%s\n' "${RUNTIMES// / | }" "$(for _ in $RUNTIMES; do printf -- '---|'; done)"
printf '| tests fully passed (of %d) |' "${#tests[@]}"
for r in $RUNTIMES; do printf ' %d |' "${passed[$r]}"; done
printf '\n| assertions ok/total |'
for r in $RUNTIMES; do printf ' %d/%d |' "${total_ok[$r]}" "${total_all[$r]}"; done
printf '\n\nPer test (pass/fail):\n\n| test |%s\n|---|%s\n' "$(for r in $RUNTIMES; do printf ' %s |' "$r"; done)" "$(for _ in $RUNTIMES; do printf -- '---|'; done)"
for t in "${tests[@]}"; do
    name=$(basename "$t" .t)
    printf '| %s |' "$name"
    for r in $RUNTIMES; do printf ' %s |' "$(cat "$out/$r.$name.result")"; done
    printf '\n'
done
last=${RUNTIMES##* }
printf '\nFirst failing line per test that %s does not fully pass (TAP in %s):\n\n' "$last" "$out"
for t in "${tests[@]}"; do
    name=$(basename "$t" .t)
    [[ $(cat "$out/$last.$name.result") == fail ]] || continue
    why=$(grep -m1 -E '^not ok|error|failed' "$out/$last.$name.tap" | cut -c1-160 || true)
    printf -- '- %s: %s\n' "$name" "${why:-$(tail -n1 "$out/$last.$name.tap" | cut -c1-160)}"
done
