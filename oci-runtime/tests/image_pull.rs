//! Pulling and unpacking container images from a real registry (Debian's `docker-registry`):
//! multi-layer images with whiteouts and opaque directories mounted as overlayfs, tampered
//! layers, platform selection, resumed downloads through a proxy that cuts the connection.

#[path = "support/busybox_image.rs"]
mod busybox_image;
#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;
use std::sync::atomic::Ordering;

use busybox_image::{BuiltImage, TarEntry, build_image, build_image_from_blobs, build_index, file, layer_tar, sha256};
use flotilla_oci_runtime::{
    BlobStore, ImageError, ImageStore, Platform, Registry, RegistryConfig, RegistryError, image::can_unpack_whiteouts,
};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::{Client, Reference};
use proxy::CuttingProxy;
use support::TestRegistry;

fn raw_client() -> Client {
    let _ = Registry::new(RegistryConfig::default());
    Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() })
}

async fn push_built(reference: &str, img: &BuiltImage) {
    let client = raw_client();
    let r: Reference = reference.parse().unwrap();
    for (digest, bytes) in img.blobs() {
        client.push_blob(&r, bytes, &digest).await.unwrap();
    }
    client
        .push_manifest_raw(&r, img.manifest.clone(), "application/vnd.oci.image.manifest.v1+json".parse().unwrap())
        .await
        .unwrap();
}

async fn push_index(reference: &str, index: Vec<u8>) {
    let client = raw_client();
    let r: Reference = reference.parse().unwrap();
    client.push_manifest_raw(&r, index, "application/vnd.oci.image.index.v1+json".parse().unwrap()).await.unwrap();
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(true)
}

fn amd64() -> Platform {
    Platform::new("linux", "amd64", None)
}

/// Root is needed to create whiteout devices, `trusted.*` xattrs and overlay mounts.
fn need_root(test: &str) -> bool {
    if can_unpack_whiteouts() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root (whiteouts, trusted xattrs, overlay mounts); CI is set, so it must not skip");
    }
    eprintln!("skipping {test}: needs root for whiteouts, trusted xattrs and overlay mounts");
    false
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 3).unwrap()
}

/// Three layers (gzip, zstd, plain): the second deletes a file with a whiteout and makes
/// `opt/` opaque.
fn layered_image() -> BuiltImage {
    let l0 = layer_tar(&[
        TarEntry::Dir("etc/", 0o755),
        file("etc/keep", b"keep", 0o644),
        file("etc/gone", b"to be deleted", 0o644),
        TarEntry::Dir("opt/", 0o755),
        file("opt/a", b"a", 0o644),
        file("opt/b", b"b", 0o4755),
        TarEntry::Symlink("etc/link", "keep"),
        TarEntry::Hardlink("etc/hard", "etc/keep"),
    ]);
    let l1 = layer_tar(&[
        TarEntry::Dir("etc/", 0o755),
        file("etc/.wh.gone", b"", 0o644),
        TarEntry::Dir("opt/", 0o755),
        file("opt/.wh..wh..opq", b"", 0o644),
        file("opt/c", b"c", 0o600),
    ]);
    let l2 = layer_tar(&[file("new", b"top", 0o644)]);
    let blobs = vec![
        ("application/vnd.oci.image.layer.v1.tar+gzip".to_owned(), busybox_image::gzip(&l0), sha256(&l0)),
        ("application/vnd.oci.image.layer.v1.tar+zstd".to_owned(), zstd(&l1), sha256(&l1)),
        ("application/vnd.docker.image.rootfs.diff.tar".to_owned(), l2.clone(), sha256(&l2)),
    ];
    build_image_from_blobs(blobs, "linux", "amd64", &["/bin/sh"])
}

#[tokio::test]
async fn pull_unpack_and_mount_overlay() {
    let Some(reg) = TestRegistry::start() else { return };
    if !need_root("pull_unpack_and_mount_overlay") {
        return;
    }
    let img = layered_image();
    let reference = reg.reference("flotilla/layered:v1");
    push_built(&reference, &img).await;

    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let store = ImageStore::open(dir.path(), blobs).unwrap();
    let registry = Registry::new(RegistryConfig::default());
    let image = store.pull(&registry, &reference, &amd64()).await.unwrap();
    assert_eq!(image.reference, reference);
    assert_eq!(image.manifest_digest, img.digest());
    assert_eq!(image.index_digest, None);
    assert_eq!(image.config.cmd, vec!["/bin/sh"]);
    assert_eq!(image.config.exposed_ports, vec!["8080/tcp"]);
    assert_eq!(image.layers.len(), 3);
    let diff_ids: Vec<String> = img.layers.iter().map(|(_, _, d)| d.clone()).collect();
    assert_eq!(image.chain_ids, flotilla_oci_runtime::image::chain_ids(&diff_ids));
    for (digest, _) in img.blobs() {
        assert!(store.blobs().contains(&digest), "{digest}");
    }
    assert!(store.blobs().contains(&img.digest()));
    assert!(is_empty_dir(&dir.path().join("ingest")));

    let lower = store.unpack(&image).await.unwrap();
    assert_eq!(lower.len(), 3);
    // Top first, each named by its chain id.
    for (l, chain) in lower.iter().zip(image.chain_ids.iter().rev()) {
        assert_eq!(l, &store.snapshot_dir(chain).unwrap());
    }
    let (top, mid, bottom) = (&lower[0], &lower[1], &lower[2]);
    // Each snapshot holds only its layer's files.
    assert_eq!(std::fs::read(bottom.join("etc/keep")).unwrap(), b"keep");
    assert!(!bottom.join("new").exists());
    assert!(!top.join("etc").exists());
    assert_eq!(std::fs::read_link(bottom.join("etc/link")).unwrap(), Path::new("keep"));
    let keep = std::fs::metadata(bottom.join("etc/keep")).unwrap();
    assert_eq!(keep.ino(), std::fs::metadata(bottom.join("etc/hard")).unwrap().ino());
    assert_eq!(keep.mtime(), 1_700_000_000);
    assert_eq!(std::fs::metadata(bottom.join("opt/b")).unwrap().mode() & 0o7777, 0o4755, "setuid kept by default");
    assert_eq!(std::fs::metadata(mid.join("opt/c")).unwrap().mode() & 0o7777, 0o600);
    // Whiteout: a 0/0 character device; opaque: the trusted xattr.
    let wh = std::fs::symlink_metadata(mid.join("etc/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!mid.join("etc/.wh.gone").exists());
    let mut buf = [0u8; 4];
    let n = rustix::fs::getxattr(mid.join("opt"), "trusted.overlay.opaque", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"y");
    assert!(!mid.join("opt/.wh..wh..opq").exists());

    // Unpacking again reuses the snapshots.
    let before = std::fs::metadata(bottom).unwrap().ino();
    assert_eq!(store.unpack(&image).await.unwrap(), lower);
    assert_eq!(std::fs::metadata(bottom).unwrap().ino(), before);

    // The merged overlay view hides the deleted file and the lower opt/ content.
    let merged = tempfile::tempdir().unwrap();
    let lowerdir = lower.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
    let status = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &format!("lowerdir={lowerdir}")])
        .arg(merged.path())
        .status()
        .unwrap();
    assert!(status.success(), "overlay mount failed");
    let m = merged.path();
    let view = (
        m.join("etc/keep").exists(),
        m.join("etc/gone").exists(),
        m.join("opt/a").exists(),
        m.join("opt/c").exists(),
        std::fs::read(m.join("new")).ok(),
    );
    let _ = std::process::Command::new("umount").arg(m).status();
    assert_eq!(view, (true, false, false, true, Some(b"top".to_vec())));

    // A restart finds the image offline.
    let store2 = ImageStore::open(dir.path(), BlobStore::open(dir.path()).unwrap()).unwrap();
    let again = store2.image(&reference).unwrap();
    assert_eq!(again, image);
    assert!(matches!(store2.image(&reg.reference("flotilla/other:v1")), Err(ImageError::NotFound { .. })));
}

#[tokio::test]
async fn tampered_layer_is_refused_and_leaves_nothing() {
    let Some(reg) = TestRegistry::start() else { return };
    let tar = layer_tar(&[file("hello", b"hello world, this is the real layer", 0o644)]);
    let img = build_image(&[(tar, true)], "linux", "amd64", &["/hello"]);
    let reference = reg.reference("flotilla/tampered:v1");
    push_built(&reference, &img).await;
    let layer_digest = sha256(&img.layers[0].1);
    let data = reg.blob_data_path(&layer_digest);
    let mut evil = std::fs::read(&data).unwrap();
    let last = evil.len() - 1;
    evil[last] ^= 0xff;
    std::fs::write(&data, &evil).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), BlobStore::open(dir.path()).unwrap()).unwrap();
    let registry = Registry::new(RegistryConfig::default());
    let err = store.pull(&registry, &reference, &amd64()).await.unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer_digest), "{err}");
    assert!(is_empty_dir(&dir.path().join("blobs/sha256")), "nothing may become visible");
    assert!(is_empty_dir(&dir.path().join("snapshots")));
    assert!(is_empty_dir(&dir.path().join("ingest")), "a corrupt partial must not be resumed");
    assert!(store.images().unwrap().is_empty());
}

#[tokio::test]
async fn index_selects_the_platform_or_names_the_choices() {
    let Some(reg) = TestRegistry::start() else { return };
    let amd = build_image(&[(layer_tar(&[file("arch", b"amd64", 0o644)]), true)], "linux", "amd64", &["/a"]);
    let arm = build_image(&[(layer_tar(&[file("arch", b"arm64", 0o644)]), true)], "linux", "arm64", &["/b"]);
    let arm7 = build_image(&[(layer_tar(&[file("arch", b"armv7", 0o644)]), false)], "linux", "arm", &["/c"]);
    for (name, img) in [("amd", &amd), ("arm", &arm), ("arm7", &arm7)] {
        push_built(&reg.reference(&format!("flotilla/multi:{name}")), img).await;
    }
    let index = build_index(&[
        (&amd, "linux", "amd64", None),
        (&arm, "linux", "arm64", Some("v8")),
        (&arm7, "linux", "arm", Some("v7")),
    ]);
    let reference = reg.reference("flotilla/multi:v1");
    push_index(&reference, index.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), BlobStore::open(dir.path()).unwrap()).unwrap();
    let registry = Registry::new(RegistryConfig::default());
    let image = store.pull(&registry, &reference, &Platform::new("linux", "arm64", None)).await.unwrap();
    assert_eq!(image.manifest_digest, arm.digest());
    assert_eq!(image.index_digest.as_deref(), Some(sha256(&index).as_str()));
    assert_eq!(image.config.cmd, vec!["/b"]);
    assert!(!store.blobs().contains(&sha256(&amd.layers[0].1)), "other platforms' layers are not fetched");

    let by_digest = format!("{}@{}", reg.reference("flotilla/multi"), sha256(&index));
    let image = store.pull(&registry, &by_digest, &Platform::new("linux", "arm", Some("v7"))).await.unwrap();
    assert_eq!(image.manifest_digest, arm7.digest());

    let err = store.pull(&registry, &reference, &Platform::new("linux", "s390x", None)).await.unwrap_err();
    assert!(matches!(err, ImageError::Platform { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("linux/s390x") && msg.contains("linux/amd64, linux/arm64/v8, linux/arm/v7"), "{msg}");

    let err = store.pull(&registry, &reg.reference("flotilla/absent:v1"), &amd64()).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(RegistryError::NotFound { .. })), "{err}");
}

#[tokio::test]
async fn interrupted_download_resumes_with_a_range_request() {
    let Some(reg) = TestRegistry::start() else { return };
    // 3 MiB of incompressible bytes in an uncompressed layer.
    let mut payload = Vec::with_capacity(3 << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while payload.len() < 3 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        payload.extend_from_slice(&x.to_le_bytes());
    }
    let tar = layer_tar(&[file("big", &payload, 0o644)]);
    let img = build_image(&[(tar, false)], "linux", "amd64", &["/big"]);
    let layer_digest = sha256(&img.layers[0].1);
    push_built(&reg.reference("flotilla/big:v1"), &img).await;

    let proxy = CuttingProxy::start(reg.addr.clone(), layer_digest.clone(), 1 << 20);
    let reference = format!("{}/flotilla/big:v1", proxy.addr);
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), BlobStore::open(dir.path()).unwrap()).unwrap();
    let registry = Registry::new(RegistryConfig::default());

    let err = store.pull(&registry, &reference, &amd64()).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    assert!(!store.blobs().contains(&layer_digest));
    let partial = dir.path().join("ingest").join(format!("{}.partial", &layer_digest[7..]));
    let kept = std::fs::metadata(&partial).expect("the partial download is kept").len();
    assert!(kept > 0 && kept < img.layers[0].1.len() as u64, "kept {kept} bytes");
    assert!(!proxy.saw_range.load(Ordering::SeqCst));

    let image = store.pull(&registry, &reference, &amd64()).await.unwrap();
    assert!(proxy.saw_range.load(Ordering::SeqCst), "the second pull must ask for a range");
    let ranges = proxy.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert!(ranges[0].to_ascii_lowercase().contains(&format!("bytes={kept}-")), "{ranges:?}");
    assert_eq!(proxy.blob_requests.load(Ordering::SeqCst), 2);
    assert_eq!(image.layers[0].digest, layer_digest);
    let stored = std::fs::read(store.blobs().path(&layer_digest).unwrap()).unwrap();
    assert_eq!(sha256(&stored), layer_digest);
    assert!(!partial.exists());
}

#[tokio::test]
async fn concurrent_pulls_of_images_sharing_a_layer_download_it_once() {
    let Some(reg) = TestRegistry::start() else { return };
    let base = layer_tar(&[file("base", &vec![7u8; 1 << 20], 0o644)]);
    let base_digest = sha256(&busybox_image::gzip(&base));
    let mk = |name: &str| {
        let own = layer_tar(&[file(name, name.as_bytes(), 0o644)]);
        build_image(&[(base.clone(), true), (own, false)], "linux", "amd64", &["/x"])
    };
    let (a, b) = (mk("a"), mk("b"));
    assert_eq!(sha256(&a.layers[0].1), base_digest);
    push_built(&reg.reference("flotilla/one:v1"), &a).await;
    push_built(&reg.reference("flotilla/two:v1"), &b).await;
    // Every download of the shared layer is held back, so both pulls want it at once.
    let proxy =
        CuttingProxy::start_with(reg.addr.clone(), base_digest.clone(), None, std::time::Duration::from_millis(700));
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path(), BlobStore::open(dir.path()).unwrap()).unwrap();
    let registry = Registry::new(RegistryConfig::default());
    let (one, two) = (format!("{}/flotilla/one:v1", proxy.addr), format!("{}/flotilla/two:v1", proxy.addr));
    let platform = amd64();
    let (x, y) = tokio::join!(store.pull(&registry, &one, &platform), store.pull(&registry, &two, &platform));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(proxy.blob_requests.load(Ordering::SeqCst), 1, "the shared layer is downloaded once");
    assert_eq!(x.layers[0].digest, base_digest);
    assert_eq!(y.layers[0].digest, base_digest);
    assert!(store.blobs().contains(&base_digest));
    assert!(is_empty_dir(&dir.path().join("ingest")));
}
