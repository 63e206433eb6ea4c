#!/usr/bin/env bash
# Builds the example container image: Debian's static busybox (/bin/busybox from the
# busybox-static package) in an OCI image layout, tagged v1, with umoci.
#
#   examples/busybox/build.sh OUT_DIR     # then: flotilla push OUT_DIR 127.0.0.1:5000/busybox:v1
set -euo pipefail

out=${1:?usage: build.sh OUT_DIR}
[[ -x /bin/busybox ]] || { echo "/bin/busybox missing: install Debian's busybox-static" >&2; exit 1; }
command -v umoci >/dev/null || { echo "umoci missing: install Debian's umoci" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:v1"
umoci unpack --image "$out:v1" "$work/bundle" >/dev/null
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc"
chmod 1777 "$rootfs/tmp"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in sh echo cat cut date env hostname id ls mkdir ps rm sleep tail true false uname wc; do
    ln -s busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
umoci repack --image "$out:v1" "$work/bundle"
umoci config --image "$out:v1" --config.cmd sh --config.cmd -c \
    --config.cmd 'while true; do echo "$GREETING from container $(hostname) at $(date +%T)"; sleep 2; done'
umoci gc --layout "$out"
echo "built $out:v1"
