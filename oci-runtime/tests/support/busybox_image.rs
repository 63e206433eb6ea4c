//! Building container images for tests: layer tars (including deliberately malicious
//! entries, written byte by byte so no tar library refuses them), image configs and manifests,
//! OCI image layouts, and a busybox image made from the host's static `/bin/busybox`.
//!
//! Self-contained (std + tar + flate2 + sha2 + serde_json) so other test crates can include
//! it with `#[path = "../../oci-runtime/tests/support/busybox_image.rs"] mod busybox_image;`.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// One entry of a layer tar. Paths are written exactly as given (`..` and absolute paths
/// included).
#[derive(Debug, Clone)]
pub enum TarEntry {
    /// A directory.
    Dir(&'static str, u32),
    /// A regular file with content and mode.
    File(String, Vec<u8>, u32),
    /// A symbolic link `path -> target`.
    Symlink(&'static str, &'static str),
    /// A hard link `path` to `target`.
    Hardlink(&'static str, &'static str),
    /// A character device `path` with major, minor.
    CharDev(&'static str, u32, u32),
}

/// Shorthand for a regular file.
pub fn file(path: &str, data: &[u8], mode: u32) -> TarEntry {
    TarEntry::File(path.to_owned(), data.to_vec(), mode)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    let name = path.as_bytes();
    assert!(name.len() <= 100, "test paths fit the ustar name field");
    let old = h.as_old_mut();
    old.name[..name.len()].copy_from_slice(name);
    h
}

fn set_link(h: &mut tar::Header, target: &str) {
    let t = target.as_bytes();
    assert!(t.len() <= 100);
    h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
}

/// An uncompressed layer tar with `entries`, in order.
pub fn layer_tar(entries: &[TarEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            TarEntry::Dir(p, mode) => {
                let mut h = header(p, tar::EntryType::Directory, 0, *mode);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            TarEntry::File(p, data, mode) => {
                let mut h = header(p, tar::EntryType::Regular, data.len() as u64, *mode);
                h.set_cksum();
                b.append(&h, &data[..]).unwrap();
            }
            TarEntry::Symlink(p, target) => {
                let mut h = header(p, tar::EntryType::Symlink, 0, 0o777);
                set_link(&mut h, target);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            TarEntry::Hardlink(p, target) => {
                let mut h = header(p, tar::EntryType::Link, 0, 0o644);
                set_link(&mut h, target);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            TarEntry::CharDev(p, major, minor) => {
                let mut h = header(p, tar::EntryType::Char, 0, 0o666);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Gzip-compresses `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A built image: blobs plus manifest.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Config JSON.
    pub config: Vec<u8>,
    /// `(media type, blob, diff id)` per layer, bottom first.
    pub layers: Vec<(String, Vec<u8>, String)>,
    /// Manifest JSON.
    pub manifest: Vec<u8>,
}

impl BuiltImage {
    /// The manifest digest.
    pub fn digest(&self) -> String {
        sha256(&self.manifest)
    }

    /// Every blob (config and layers) as `(digest, bytes)`.
    pub fn blobs(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![(sha256(&self.config), self.config.clone())];
        out.extend(self.layers.iter().map(|(_, b, _)| (sha256(b), b.clone())));
        out
    }
}

/// Builds an OCI image from `(uncompressed tar, gzip?)` layers for `os`/`arch`, with
/// `cmd` as its command.
pub fn build_image(layers: &[(Vec<u8>, bool)], os: &str, arch: &str, cmd: &[&str]) -> BuiltImage {
    let mut built = Vec::new();
    for (tar, compress) in layers {
        let diff_id = sha256(tar);
        if *compress {
            built.push(("application/vnd.oci.image.layer.v1.tar+gzip".to_owned(), gzip(tar), diff_id));
        } else {
            built.push(("application/vnd.oci.image.layer.v1.tar".to_owned(), tar.clone(), diff_id));
        }
    }
    build_image_from_blobs(built, os, arch, cmd)
}

/// Builds an OCI image from ready layer blobs `(media type, blob, diff id)`.
pub fn build_image_from_blobs(
    layers: Vec<(String, Vec<u8>, String)>,
    os: &str,
    arch: &str,
    cmd: &[&str],
) -> BuiltImage {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/",
            "ExposedPorts": {"8080/tcp": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, _, d)| d.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": layers.iter().map(|(mt, blob, _)| serde_json::json!({
            "mediaType": mt, "digest": sha256(blob), "size": blob.len(),
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    BuiltImage { config, layers, manifest }
}

/// An image index over `(image, os, arch, variant)`.
pub fn build_index(entries: &[(&BuiltImage, &str, &str, Option<&str>)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries.iter().map(|(img, os, arch, variant)| {
            let mut platform = serde_json::json!({"os": os, "architecture": arch});
            if let Some(v) = variant {
                platform["variant"] = serde_json::json!(v);
            }
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": img.digest(),
                "size": img.manifest.len(),
                "platform": platform,
            })
        }).collect::<Vec<_>>(),
    }))
    .unwrap()
}

fn write_blob(dir: &Path, bytes: &[u8]) {
    let digest = sha256(bytes);
    let path = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Writes `image` as an OCI image layout at `dir`, tagged `ref_name` (the
/// `org.opencontainers.image.ref.name` annotation, e.g. `latest`).
pub fn write_oci_layout(dir: &Path, image: &BuiltImage, ref_name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for (_, blob) in image.blobs() {
        write_blob(dir, &blob);
    }
    write_blob(dir, &image.manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.digest(),
            "size": image.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": ref_name},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Busybox applets the busybox image links into `/bin`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "ls", "env", "id", "hostname", "ps", "mount", "wget", "nc", "kill",
    "test", "httpd", "mkdir", "rm", "touch",
];

/// A one-layer linux image of the host's static `/bin/busybox` with its applets as symlinks,
/// `/etc/passwd`, `/tmp` and `/proc`, `/sys`, `/dev` mount points; `None` (after saying why)
/// when `/bin/busybox` is missing or not static.
pub fn busybox_image(cmd: &[&str]) -> Option<BuiltImage> {
    let busybox = match std::fs::read("/bin/busybox") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("no busybox image: cannot read /bin/busybox ({e}); install Debian's busybox-static");
            return None;
        }
    };
    // A dynamically linked ELF has a PT_INTERP program header naming its loader.
    if busybox.windows(b"/lib64/ld-linux".len()).any(|w| w == b"/lib64/ld-linux") {
        eprintln!("no busybox image: /bin/busybox is dynamically linked; install Debian's busybox-static");
        return None;
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut entries = vec![
        TarEntry::Dir("bin/", 0o755),
        TarEntry::File("bin/busybox".to_owned(), busybox, 0o755),
        TarEntry::Dir("etc/", 0o755),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644),
        file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644),
        TarEntry::Dir("tmp/", 0o1777),
        TarEntry::Dir("proc/", 0o555),
        TarEntry::Dir("sys/", 0o555),
        TarEntry::Dir("dev/", 0o755),
        TarEntry::Dir("root/", 0o700),
    ];
    for applet in BUSYBOX_APPLETS {
        let path: &'static str = Box::leak(format!("bin/{applet}").into_boxed_str());
        entries.push(TarEntry::Symlink(path, "busybox"));
    }
    Some(build_image(&[(layer_tar(&entries), true)], "linux", arch, cmd))
}

/// Writes the busybox image as an OCI layout at `dir` tagged `ref_name`; false if it cannot
/// be built (see [`busybox_image`]).
pub fn write_busybox_layout(dir: &Path, ref_name: &str, cmd: &[&str]) -> bool {
    match busybox_image(cmd) {
        Some(image) => {
            write_oci_layout(dir, &image, ref_name);
            true
        }
        None => false,
    }
}
