//! Air-gapped images and collection: importing OCI layouts (directory and tar) and `docker
//! save` archives, pushing them to a real registry, cross-checking with skopeo and umoci, and
//! garbage collection keeping shared and in-use content.

#[path = "support/busybox_image.rs"]
mod busybox_image;
mod support;

use std::collections::HashSet;
use std::path::Path;

use busybox_image::{build_image, file, layer_tar, sha256, write_busybox_layout, write_oci_layout};
use flotilla_oci_runtime::image::{can_unpack_whiteouts, push_archive};
use flotilla_oci_runtime::{BlobStore, Image, ImageError, ImageStore, Imported, Platform, Registry, RegistryConfig};
use support::TestRegistry;

fn host() -> Platform {
    Platform::host()
}

fn need_root(test: &str) -> bool {
    if can_unpack_whiteouts() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root; CI is set, so it must not skip");
    }
    eprintln!("skipping {test}: needs root to unpack layers with their ownership");
    false
}

fn open_store(dir: &Path) -> ImageStore {
    ImageStore::open(dir, BlobStore::open(dir).unwrap()).unwrap()
}

/// The container images of an import (all of them must be).
fn containers(imported: Vec<Imported>) -> Vec<Image> {
    imported.into_iter().map(|i| i.into_image().expect("a container image")).collect()
}

fn tar_dir(src: &Path, dest: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(dest).unwrap());
    b.append_dir_all(".", src).unwrap();
    b.finish().unwrap();
}

fn tool(name: &str) -> Option<std::path::PathBuf> {
    let p = Path::new("/usr/bin").join(name);
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name} is not installed; CI is set, so the cross-check must not skip");
    }
    eprintln!("skipping the {name} cross-check: /usr/bin/{name} is not installed");
    None
}

/// What an import told its progress: (blobs, bytes) announced, (blobs, bytes) done.
#[derive(Default)]
struct Recorder(std::sync::Mutex<(usize, u64, usize, u64)>);

impl flotilla_oci_runtime::PushProgress for Recorder {
    fn start(&self, blobs: usize, bytes: u64) {
        let mut s = self.0.lock().unwrap();
        (s.0, s.1) = (blobs, bytes);
    }
    fn blob_done(&self, bytes: u64) {
        let mut s = self.0.lock().unwrap();
        (s.2, s.3) = (s.2 + 1, s.3 + bytes);
    }
}

#[tokio::test]
async fn import_busybox_layout_dir_and_tar_then_unpack() {
    if !need_root("import_busybox_layout_dir_and_tar_then_unpack") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    if !write_busybox_layout(&layout, "v1", &["/bin/sh", "-c", "echo hi"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let images = containers(store.import(&layout, &host(), Some("example.com/flotilla/busybox")).await.unwrap());
    assert_eq!(images.len(), 1);
    let image = &images[0];
    assert_eq!(image.reference, "example.com/flotilla/busybox:v1");
    assert_eq!(image.config.cmd, vec!["/bin/sh", "-c", "echo hi"]);
    assert_eq!(store.image("example.com/flotilla/busybox:v1").unwrap(), *image);

    let lower = store.unpack(image).await.unwrap();
    assert_eq!(lower.len(), 1);
    let root = &lower[0];
    assert_eq!(std::fs::read_link(root.join("bin/sh")).unwrap(), Path::new("busybox"));
    let out =
        std::process::Command::new(root.join("bin/busybox")).args(["echo", "from-the-snapshot"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from-the-snapshot");

    // The same layout as a tar archive; without a name the bare tag cannot be a reference.
    let archive = work.path().join("layout.tar");
    tar_dir(&layout, &archive);
    let store2 = open_store(tempfile::tempdir().unwrap().keep().as_path());
    let err = store2.import(&archive, &host(), None).await.unwrap_err();
    assert!(matches!(err, ImageError::Archive { .. }) && err.to_string().contains("give it a name"), "{err}");
    // With progress: told the blobs to copy (config and layer) and their bytes, then each one.
    let progress = std::sync::Arc::new(Recorder::default());
    let imported =
        store2.import_with_progress(&archive, &host(), Some("registry.lan/bb"), Some(progress.clone())).await.unwrap();
    let imported = containers(imported);
    let blob_bytes = |d: &str| std::fs::metadata(layout.join("blobs/sha256").join(&d[7..])).unwrap().len();
    let want = blob_bytes(&image.layers[0].digest) + blob_bytes(&image.config_digest);
    let seen = *progress.0.lock().unwrap();
    assert_eq!(seen, (2, want, 2, want), "(blobs, bytes) announced, then done");
    assert_eq!(imported[0].manifest_digest, image.manifest_digest);
    assert_eq!(imported[0].reference, "registry.lan/bb:v1");
    // No extraction left behind.
    let leftovers: Vec<_> = [store2.root().to_owned(), store2.blobs().root().join("ingest")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".import"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A layout whose blob was altered is refused, naming the blob.
    let layer = &image.layers[0].digest;
    let blob = layout.join("blobs/sha256").join(&layer[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let store3 = open_store(tempfile::tempdir().unwrap().keep().as_path());
    let err = store3.import(&layout, &host(), Some("x/y")).await.unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }) && err.to_string().contains(layer.as_str()), "{err}");
    assert!(!store3.blobs().contains(layer));
    assert!(store3.images().unwrap().is_empty());
}

#[tokio::test]
async fn docker_save_archive_import_and_push() {
    let Some(reg) = TestRegistry::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let tar = layer_tar(&[file("hello.txt", b"docker save", 0o644)]);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
    }))
    .unwrap();
    let save = work.path().join("save");
    std::fs::create_dir_all(save.join("abc")).unwrap();
    std::fs::write(save.join("abc/layer.tar"), &tar).unwrap();
    std::fs::write(save.join("cfg.json"), &config).unwrap();
    std::fs::write(
        save.join("manifest.json"),
        serde_json::to_vec(&serde_json::json!([{
            "Config": "cfg.json", "RepoTags": ["busybox:save"], "Layers": ["abc/layer.tar"],
        }]))
        .unwrap(),
    )
    .unwrap();
    let archive = work.path().join("save.tar");
    tar_dir(&save, &archive);

    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let images = containers(store.import(&archive, &Platform::new("linux", "amd64", None), None).await.unwrap());
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].reference, "docker.io/library/busybox:save");
    assert_eq!(images[0].config.cmd, vec!["/hello"]);
    assert_eq!(images[0].layers[0].digest, sha256(&tar));
    assert_eq!(images[0].config_digest, sha256(&config));

    let registry = Registry::new(RegistryConfig::default());
    let reference = reg.reference("flotilla/saved:v1");
    let digest = push_archive(&registry, &archive, &reference, work.path()).await.unwrap();
    assert_eq!(digest, images[0].manifest_digest);
    let pulled = open_store(tempfile::tempdir().unwrap().keep().as_path())
        .pull(&registry, &reference, &Platform::new("linux", "amd64", None))
        .await
        .unwrap();
    assert_eq!(pulled.manifest_digest, digest);

    // Paths leaving the archive are refused.
    std::fs::write(
        save.join("manifest.json"),
        br#"[{"Config": "../../etc/passwd", "RepoTags": ["x:y"], "Layers": []}]"#,
    )
    .unwrap();
    let err = store.import(&save, &host(), None).await.unwrap_err();
    assert!(err.to_string().contains("leaves the archive"), "{err}");
}

#[tokio::test]
async fn push_layout_then_cross_check_with_skopeo_and_umoci() {
    let Some(reg) = TestRegistry::start() else { return };
    if !need_root("push_layout_then_cross_check_with_skopeo_and_umoci") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    if !write_busybox_layout(&layout, "v1", &["/bin/sh"]) {
        return;
    }
    let registry = Registry::new(RegistryConfig::default());
    let ours = reg.reference("flotilla/bb:ours");
    let digest = push_archive(&registry, &layout, &ours, work.path()).await.unwrap();

    let store = open_store(tempfile::tempdir().unwrap().keep().as_path());
    let image = store.pull(&registry, &ours, &host()).await.unwrap();
    assert_eq!(image.manifest_digest, digest);
    let lower = store.unpack(&image).await.unwrap();

    if let Some(skopeo) = tool("skopeo") {
        // skopeo reads what we pushed...
        let out = std::process::Command::new(&skopeo)
            .args(["inspect", "--tls-verify=false", "--raw", &format!("docker://{ours}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sha256(&out.stdout), digest);
        // ...and we pull what skopeo pushed.
        let theirs = reg.reference("flotilla/bb:skopeo");
        let status = std::process::Command::new(&skopeo)
            .args([
                "copy",
                "--dest-tls-verify=false",
                &format!("oci:{}:v1", layout.display()),
                &format!("docker://{theirs}"),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let pulled = store.pull(&registry, &theirs, &host()).await.unwrap();
        assert_eq!(pulled.layers[0].diff_id, image.layers[0].diff_id);
        assert_eq!(store.unpack(&pulled).await.unwrap(), lower, "same layer, same snapshot");
    }
    if let Some(umoci) = tool("umoci") {
        let bundle = work.path().join("bundle");
        let status = std::process::Command::new(umoci)
            .args(["unpack", "--image", &format!("{}:v1", layout.display())])
            .arg(&bundle)
            .status()
            .unwrap();
        assert!(status.success());
        for f in ["bin/busybox", "etc/passwd"] {
            assert_eq!(std::fs::read(bundle.join("rootfs").join(f)).unwrap(), std::fs::read(lower[0].join(f)).unwrap());
        }
        assert_eq!(
            std::fs::read_link(bundle.join("rootfs/bin/cat")).unwrap(),
            std::fs::read_link(lower[0].join("bin/cat")).unwrap()
        );
    }
}

#[tokio::test]
async fn gc_removes_least_recently_used_unshared_content() {
    if !need_root("gc_removes_least_recently_used_unshared_content") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let base = layer_tar(&[file("base", &vec![7u8; 200_000], 0o644)]);
    let mk = |tag: &str| {
        let own = layer_tar(&[file(tag, &vec![tag.as_bytes()[0]; 300_000], 0o644)]);
        build_image(&[(base.clone(), true), (own, false)], "linux", "amd64", &["/x"])
    };
    let (a, b, c) = (mk("a"), mk("b"), mk("c"));
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let linux = Platform::new("linux", "amd64", None);
    let mut images = Vec::new();
    for (name, img) in [("a", &a), ("b", &b), ("c", &c)] {
        let layout = work.path().join(name);
        write_oci_layout(&layout, img, name);
        let image = containers(store.import(&layout, &linux, Some("local/img")).await.unwrap()).remove(0);
        store.unpack(&image).await.unwrap();
        images.push(image);
        // last_used has a one-second resolution.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    let usage = store.disk_usage();
    assert!(usage > 3 * 300_000, "{usage}");

    // Under the threshold nothing happens.
    let report = store.gc(&HashSet::new(), u64::MAX).await.unwrap();
    assert!(report.removed_images.is_empty());

    // "a" is the least recently used but in use; "b" goes first, then "c" if still needed.
    let in_use: HashSet<String> = ["local/img:a".to_owned()].into();
    let report = store.gc(&in_use, usage - 100_000).await.unwrap();
    assert_eq!(report.removed_images, vec!["docker.io/local/img:b"]);
    assert!(report.bytes_after < report.bytes_before);
    let (ia, ib) = (&images[0], &images[1]);
    assert!(store.blobs().contains(&ia.layers[0].digest), "shared base layer kept");
    assert!(!store.blobs().contains(&ib.layers[1].digest), "b's own layer removed");
    assert!(!store.blobs().contains(&ib.manifest_digest));
    assert!(store.snapshot_dir(&ib.chain_ids[0]).unwrap().is_dir(), "shared snapshot kept");
    assert!(!store.snapshot_dir(&ib.chain_ids[1]).unwrap().exists());
    assert!(matches!(store.image("local/img:b"), Err(ImageError::NotFound { .. })));

    // Everything must go except what is in use (by manifest digest this time).
    let in_use: HashSet<String> = [ia.manifest_digest.clone()].into();
    let report = store.gc(&in_use, 0).await.unwrap();
    assert_eq!(report.removed_images, vec!["docker.io/local/img:c"]);
    let again = store.image("local/img:a").unwrap();
    assert_eq!(store.unpack(&again).await.unwrap().len(), 2);
    for l in &again.layers {
        assert!(store.blobs().contains(&l.digest));
    }
}
