#!/usr/bin/env bash
# Writes the seed corpora in fuzz/seeds/<target>/ from the project's own examples and from
# inputs shaped like the tests' (messages, manifests, layer tars, an OCI layout made by umoci).
# Re-run after a format changes; the seeds are committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
rm -rf seeds && mkdir -p seeds/{frame,manifest,oci_json,oci_archive,oci_unpack}

python3 - <<'PY'
import json, struct, tarfile, io, gzip, os
def frame(name, msg):
    body = json.dumps(msg).encode()
    open(f"seeds/frame/{name}", "wb").write(struct.pack(">I", len(body)) + body)
tmpl = {"runtime": "wasm", "image": "r/x:1", "command": [], "args": ["a"], "env": {"A": "1"}}
frame("join", {"secret": "ab" * 16, "nodeName": "edge-1", "csrPem": "-----BEGIN CERTIFICATE REQUEST-----\n"})
frame("join-refused", {"refused": {"message": "invalid join token"}})
frame("hello", {"type": "hello", "facts": {}, "generation": 3, "statuses": {"w-0": {"phase": "Running"}}})
frame("ack", {"type": "ack", "generation": 4})
frame("status", {"type": "status", "statuses": {"w-0": {"phase": "Failed", "restarts": 2}}})
frame("heartbeat", {"type": "heartbeat"})
frame("assign", {"type": "assign", "generation": 2, "assignments": [{"name": "w-0", "workload": "w", "template": tmpl, "templateHash": "0123456789abcdef"}]})
frame("logs", {"logs": {"replica": "w-0", "follow": True, "tailLines": 10}})
frame("apply", {"apply": {"source": "apiVersion: flotilla.dev/v1\nkind: Workload\n"}})
frame("get", {"get": {"kind": "node"}})
frame("error", {"error": {"message": "nope"}})
frame("oversized", {})
open("seeds/frame/oversized", "wb").write(struct.pack(">I", 16 << 20) + b"{")

# Layer tars: files, directories, links, whiteouts, an opaque directory; plain and gzip.
def tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "dir": info.type = tarfile.DIRTYPE; info.mode = 0o755
            elif kind == "sym": info.type = tarfile.SYMTYPE; info.linkname = extra
            elif kind == "hard": info.type = tarfile.LNKTYPE; info.linkname = extra
            else: data = extra; info.size = len(data); info.mode = 0o4755 if kind == "setuid" else 0o644
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()
layer = tar([("etc", "dir", None), ("etc/hostname", "file", b"edge\n"), ("bin", "dir", None),
             ("bin/sh", "setuid", b"\x7fELF"), ("bin/ash", "hard", "bin/sh"), ("lib", "sym", "usr/lib"),
             ("var/.wh.cache", "file", b""), ("opt/.wh..wh..opq", "file", b""), ("../escape", "file", b"x"),
             ("link-out", "sym", "/etc/passwd")])
open("seeds/oci_unpack/layer.tar", "wb").write(layer)
open("seeds/oci_unpack/layer.tar.gz", "wb").write(gzip.compress(layer))
open("seeds/oci_unpack/empty.tar", "wb").write(tar([]))

# JSON oci-runtime reads: a Docker config.json and references.
open("seeds/oci_json/config.json", "w").write(json.dumps({"auths": {"registry.example:5000": {"auth": "dXNlcjpwYXNz"}, "r2": {"username": "u", "password": "p"}}}))
open("seeds/oci_json/reference", "w").write("127.0.0.1:5000/busybox:1.36@sha256:" + "a" * 64)
open("seeds/oci_json/platform", "w").write("linux/arm64/v8")
PY

for f in ../examples/*.yaml; do cp "$f" "seeds/manifest/$(basename "$f")"; done
printf 'apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: a}\nspec: {runtime: wasm, image: r/a:1}\n---\nbase: &b {cpu: 250m}\n' > seeds/manifest/two-docs.yaml

# An OCI image layout with one layer, made by umoci as the archive tests make theirs.
if command -v umoci >/dev/null; then
    work=$(mktemp -d)
    umoci init --layout "$work/layout" >/dev/null
    umoci new --image "$work/layout:v1" >/dev/null
    mkdir -p "$work/rootfs/etc" && echo edge >"$work/rootfs/etc/hostname"
    umoci insert --image "$work/layout:v1" "$work/rootfs/etc" /etc >/dev/null
    tar -C "$work/layout" -cf seeds/oci_archive/layout.tar .
    gzip -c seeds/oci_archive/layout.tar >seeds/oci_archive/layout.tar.gz
    rm -rf "$work"
else
    echo "umoci not found: no OCI layout seed" >&2
fi
ls -R seeds | head -50
