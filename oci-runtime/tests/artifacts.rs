//! One store for every kind of artifact, without a registry: Wasm modules saved as OCI
//! layout archives and imported beside container images, found again offline, collected by
//! the one collector with what is held kept, and stores left by earlier versions (a
//! `refs.json` of Wasm pulls, an `images.json` of container images) upgraded in place.

#[path = "support/busybox_image.rs"]
mod busybox_image;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use busybox_image::{build_image, file, layer_tar, write_oci_layout};
use flotilla_oci_runtime::image::save_wasm;
use flotilla_oci_runtime::{
    ArtifactKind, BlobStore, ImageError, ImageStore, Imported, Platform, WasmArtifact, sha256_digest,
};

/// A minimal valid Wasm module, made unique by a custom section named `tag`.
fn module(tag: &str) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.push(0);
    m.push(1 + tag.len() as u8);
    m.push(tag.len() as u8);
    m.extend_from_slice(tag.as_bytes());
    m
}

fn open_store(dir: &Path) -> ImageStore {
    ImageStore::open(dir, BlobStore::open(dir).unwrap()).unwrap()
}

fn linux() -> Platform {
    Platform::new("linux", "amd64", None)
}

fn blob_count(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count()
}

/// Saves `wasm` as an archive named `reference` and imports it; returns the import.
async fn save_and_import(store: &ImageStore, work: &Path, wasm: &[u8], reference: &str) -> Imported {
    let archive = work.join(format!("{}.tar", sha256_digest(reference.as_bytes())));
    save_wasm(wasm, reference, &archive).unwrap();
    let mut imported = store.import(&archive, &linux(), None).await.unwrap();
    assert_eq!(imported.len(), 1);
    imported.remove(0)
}

#[tokio::test]
async fn a_saved_wasm_archive_imports_and_is_found_without_a_registry() {
    let work = tempfile::tempdir().unwrap();
    let wasm = module("saved");
    let reference = "registry.invalid/site/mod:v1";
    let archive = work.path().join("mod.tar");
    let digest = save_wasm(&wasm, reference, &archive).unwrap();
    // The archive holds the artifact a push of the same module makes: one manifest digest.
    let artifact = WasmArtifact::build(&wasm).unwrap();
    assert_eq!(digest, artifact.manifest_digest);

    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let imported = store.import(&archive, &linux(), None).await.unwrap();
    assert_eq!(imported.len(), 1);
    let Imported::Wasm(w) = &imported[0] else { panic!("not a wasm import: {imported:?}") };
    assert_eq!(w.reference, reference);
    assert_eq!(w.manifest_digest, digest);
    assert_eq!(w.wasm_digest, sha256_digest(&wasm));
    assert_eq!(imported[0].kind(), ArtifactKind::Wasm);

    // Found again with no registry anywhere, as a module and never as a container image.
    let found = store.wasm(reference).unwrap();
    assert!(found.from_cache);
    assert_eq!(std::fs::read(&found.path).unwrap(), wasm);
    let err = store.image(reference).unwrap_err();
    assert!(matches!(err, ImageError::WrongKind { found: ArtifactKind::Wasm, .. }), "{err}");
    assert!(err.to_string().contains("is a wasm artifact, not a container image"), "{err}");
    // Its manifest and config are in the store too, so nothing it names is missing.
    let record = store.images().unwrap().remove(reference).unwrap();
    assert_eq!(record.platform, Platform::new("wasip1", "wasm", None));
    for d in record.blobs() {
        assert!(store.blobs().contains(d), "{d}");
    }
    assert_eq!(record.blobs().count(), 3);

    // The same layout as a directory imports the same; a bare tag is completed by --name.
    let layout = work.path().join("layout");
    tar::Archive::new(std::fs::File::open(&archive).unwrap()).unpack(&layout).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = open_store(dir2.path());
    let again = store2.import(&layout, &linux(), None).await.unwrap();
    assert_eq!(again[0].manifest_digest(), digest);

    // A module altered inside the layout is refused, naming its digest, and nothing is kept.
    let blob = layout.join("blobs/sha256").join(&w.wasm_digest[7..]);
    std::fs::write(&blob, module("sAved")).unwrap();
    let dir3 = tempfile::tempdir().unwrap();
    let store3 = open_store(dir3.path());
    let err = store3.import(&layout, &linux(), None).await.unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&w.wasm_digest), "{err}");
    assert!(store3.images().unwrap().is_empty());
    assert!(!store3.blobs().contains(&w.wasm_digest));

    // Not a module: refused before anything is written.
    let err = save_wasm(b"MZ\x90\x00", reference, &work.path().join("bad.tar")).unwrap_err();
    assert!(matches!(err, ImageError::NotWasm { .. }), "{err}");
    assert!(!work.path().join("bad.tar").exists());
}

#[tokio::test]
async fn skopeo_reads_a_saved_wasm_archive() {
    let skopeo = Path::new("/usr/bin/skopeo");
    if !skopeo.is_file() {
        if std::env::var_os("CI").is_some() {
            panic!("skopeo is not installed; CI is set, so the cross-check must not skip");
        }
        eprintln!("skipping the skopeo cross-check: /usr/bin/skopeo is not installed");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let wasm = module("skopeo");
    let archive = work.path().join("mod.tar");
    save_wasm(&wasm, "example.com/wasm/mod:v3", &archive).unwrap();
    let out = std::process::Command::new(skopeo)
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}:v3", archive.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, WasmArtifact::build(&wasm).unwrap().manifest);
}

#[tokio::test]
async fn one_collection_for_every_kind_keeps_what_is_held_and_what_is_shared() {
    let work = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());

    // A container image, two Wasm modules, and one of them again under a second reference.
    let layer = layer_tar(&[file("data", &vec![1u8; 100_000], 0o644)]);
    let img = build_image(&[(layer, true)], "linux", "amd64", &["/x"]);
    let layout = work.path().join("img");
    write_oci_layout(&layout, &img, "v1");
    let image = store.import(&layout, &linux(), Some("registry.invalid/app")).await.unwrap().remove(0);
    let image = image.into_image().unwrap();
    let (m1, m2) = (module("one"), module("two"));
    let w1 = save_and_import(&store, work.path(), &m1, "registry.invalid/mod:one").await;
    let w1b = save_and_import(&store, work.path(), &m1, "registry.invalid/alias:one").await;
    let w2 = save_and_import(&store, work.path(), &m2, "registry.invalid/mod:two").await;
    assert_eq!(w2.kind(), ArtifactKind::Wasm);
    assert_eq!(w1.manifest_digest(), w1b.manifest_digest());
    let (d1, d2) = (sha256_digest(&m1), sha256_digest(&m2));

    // Under the threshold nothing happens.
    assert!(store.gc(&HashSet::new(), u64::MAX).await.unwrap().removed_images.is_empty());

    // The runtime running module one holds it; everything else may go.
    let hold = store.hold("registry.invalid/mod:one");
    assert!(store.held().contains("registry.invalid/mod:one"));
    let report = store.gc(&HashSet::new(), 0).await.unwrap();
    let removed: BTreeSet<&str> = report.removed_images.iter().map(String::as_str).collect();
    assert_eq!(
        removed,
        BTreeSet::from(["registry.invalid/app:v1", "registry.invalid/alias:one", "registry.invalid/mod:two"])
    );
    // Module one's blobs stay although its alias, which shares them, went.
    assert_eq!(store.wasm("registry.invalid/mod:one").unwrap().wasm_digest, d1);
    assert!(store.blobs().contains(&d1));
    // The others' blobs are gone, container layers and modules alike.
    assert!(!store.blobs().contains(&d2));
    assert!(!store.blobs().contains(&image.layers[0].digest));
    assert!(!store.blobs().contains(&image.config_digest));
    assert!(matches!(store.image("registry.invalid/app:v1"), Err(ImageError::NotFound { .. })));
    assert_eq!(blob_count(dir.path()), 3, "module one's manifest, config and module");

    // Let go: now it is collected too, and the store is empty.
    drop(hold);
    assert!(store.held().is_empty());
    let report = store.gc(&HashSet::new(), 0).await.unwrap();
    assert_eq!(report.removed_images, vec!["registry.invalid/mod:one"]);
    assert_eq!(blob_count(dir.path()), 0);
    assert!(store.images().unwrap().is_empty());
}

#[tokio::test]
async fn an_upgraded_store_keeps_what_the_old_indexes_recorded() {
    let work = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blobs_root = dir.path().join("images");
    let image_root = dir.path().join("containers/images");
    // A container image, imported, then its record written the way earlier versions did:
    // `images.json` beside the snapshots, without a kind.
    let layer = layer_tar(&[file("data", b"old", 0o644)]);
    let img = build_image(&[(layer, true)], "linux", "amd64", &["/old"]);
    let layout = work.path().join("img");
    write_oci_layout(&layout, &img, "v1");
    let image = {
        let store = ImageStore::open(&image_root, BlobStore::open(&blobs_root).unwrap()).unwrap();
        store.import(&layout, &linux(), Some("registry.invalid/old")).await.unwrap().remove(0).into_image().unwrap()
    };
    let index = blobs_root.join("artifacts.json");
    let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let mut images = doc["artifacts"].take();
    for record in images.as_object_mut().unwrap().values_mut() {
        record.as_object_mut().unwrap().remove("kind");
    }
    std::fs::write(image_root.join("images.json"), serde_json::json!({"version": 1, "images": images}).to_string())
        .unwrap();
    std::fs::remove_file(&index).unwrap();
    // A Wasm module pulled by an earlier version: its blob, and `refs.json` in the blob root.
    let wasm = module("old");
    let wasm_digest = sha256_digest(&wasm);
    std::fs::write(blobs_root.join("blobs/sha256").join(&wasm_digest[7..]), &wasm).unwrap();
    let manifest_digest = format!("sha256:{}", "ab".repeat(32));
    let refs = serde_json::json!({"version": 1, "refs": {"127.0.0.1:5000/old/mod:v1": {
        "manifest_digest": manifest_digest, "wasm_digest": wasm_digest}}});
    std::fs::write(blobs_root.join("refs.json"), refs.to_string()).unwrap();

    // The upgraded store finds both, offline, and the old files are gone.
    for _ in 0..2 {
        let store = ImageStore::open(&image_root, BlobStore::open(&blobs_root).unwrap()).unwrap();
        let found = store.wasm("127.0.0.1:5000/old/mod:v1").unwrap();
        assert_eq!(found.wasm_digest, wasm_digest);
        assert_eq!(found.manifest_digest, manifest_digest);
        assert_eq!(std::fs::read(&found.path).unwrap(), wasm);
        assert_eq!(store.image("registry.invalid/old:v1").unwrap(), image);
        assert!(!blobs_root.join("refs.json").exists());
        assert!(!image_root.join("images.json").exists());
        let kinds: Vec<ArtifactKind> = store.images().unwrap().values().map(|r| r.kind).collect();
        assert_eq!(kinds, vec![ArtifactKind::Wasm, ArtifactKind::Container]);
    }
}
