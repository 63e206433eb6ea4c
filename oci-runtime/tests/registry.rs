//! Wasm artifacts pushed to and pulled from a real registry (Debian's `docker-registry`; see
//! `support/mod.rs`) through the one artifact store.

#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flotilla_oci_runtime::{
    ArtifactKind, BlobStore, ImageError, ImageStore, Registry, RegistryConfig, RegistryError, WASM_LAYER_MEDIA_TYPE,
    sha256_digest,
};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{
    ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciImageIndex, Platform,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use proxy::CuttingProxy;
use support::TestRegistry;

/// A minimal valid Wasm module, made unique by a custom section named `tag`.
fn module(tag: &str) -> Vec<u8> {
    assert!(tag.len() < 100);
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.push(0); // custom section
    m.push(1 + tag.len() as u8);
    m.push(tag.len() as u8);
    m.extend_from_slice(tag.as_bytes());
    m
}

/// A valid Wasm module of `size` bytes or a little more: one custom section of incompressible
/// bytes.
fn big_module(size: usize) -> Vec<u8> {
    let mut payload = b"\x03big".to_vec();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while payload.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        payload.extend_from_slice(&x.to_le_bytes());
    }
    let mut m = b"\0asm\x01\0\0\0\0".to_vec();
    let mut len = payload.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            m.push(byte);
            break;
        }
        m.push(byte | 0x80);
    }
    m.extend_from_slice(&payload);
    m
}

fn open_store(dir: &Path) -> ImageStore {
    ImageStore::open(dir, BlobStore::open(dir).unwrap()).unwrap()
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

fn raw_client() -> Client {
    // Registry::new installs the rustls provider that this client also needs.
    let _ = Registry::new(RegistryConfig::default());
    Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() })
}

/// Pushes a single-layer image with arbitrary media types; returns its manifest digest.
async fn push_raw(reference: &str, config_type: &str, layer_type: &str, layer: &[u8]) -> String {
    let client = raw_client();
    let r: Reference = reference.parse().unwrap();
    client
        .push(
            &r,
            &[ImageLayer::new(layer.to_vec(), layer_type.to_owned(), None)],
            Config::new(b"{}".to_vec(), config_type.to_owned(), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap();
    client.fetch_manifest_digest(&r, &RegistryAuth::Anonymous).await.unwrap()
}

fn index_entry(digest: &str, os: &str, arch: &str) -> ImageIndexEntry {
    ImageIndexEntry {
        media_type: OCI_IMAGE_MEDIA_TYPE.to_owned(),
        digest: digest.to_owned(),
        size: 0,
        platform: Some(Platform {
            architecture: arch.into(),
            os: os.into(),
            os_version: None,
            os_features: None,
            variant: None,
            features: None,
        }),
        annotations: None,
        artifact_type: None,
    }
}

async fn push_index(reference: &str, entries: Vec<ImageIndexEntry>) {
    let client = raw_client();
    let r: Reference = reference.parse().unwrap();
    // The registry checks that the entries exist and wants their real sizes.
    let mut manifests = Vec::new();
    for mut e in entries {
        let (raw, _) = client
            .pull_manifest_raw(
                &r.clone_with_digest(e.digest.clone()),
                &RegistryAuth::Anonymous,
                &[OCI_IMAGE_MEDIA_TYPE],
            )
            .await
            .unwrap();
        e.size = raw.len() as i64;
        manifests.push(e);
    }
    client
        .push_manifest_list(
            &r,
            &RegistryAuth::Anonymous,
            OciImageIndex {
                schema_version: 2,
                media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.to_owned()),
                manifests,
                artifact_type: None,
                annotations: None,
            },
        )
        .await
        .unwrap();
}

/// The layer digest of the artifact `push_wasm` made for `wasm`.
fn layer_digest(wasm: &[u8]) -> String {
    sha256_digest(wasm)
}

#[tokio::test]
async fn push_then_pull_round_trip() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let wasm = module("round-trip");
    let reference = reg.reference("flotilla/hello:v1");

    let manifest_digest = registry.push_wasm(&reference, &wasm).await.unwrap();
    assert!(manifest_digest.starts_with("sha256:"));
    // Pushing again is idempotent.
    assert_eq!(registry.push_wasm(&reference, &wasm).await.unwrap(), manifest_digest);

    let pulled = store.pull_wasm(&registry, &reference).await.unwrap();
    assert_eq!(pulled.reference, reference);
    assert_eq!(pulled.manifest_digest, manifest_digest);
    assert_eq!(pulled.wasm_digest, layer_digest(&wasm));
    assert!(!pulled.from_cache);
    assert!(pulled.path.starts_with(dir.path()));
    assert_eq!(std::fs::read(&pulled.path).unwrap(), wasm);
    assert_eq!(sha256_digest(&std::fs::read(&pulled.path).unwrap()), pulled.wasm_digest);
    assert!(store.blobs().contains(&pulled.wasm_digest));
    assert!(dir_is_empty(&dir.path().join("ingest")));

    // The manifest is in the CNCF Wasm layout.
    let client = raw_client();
    let (manifest, _) =
        client.pull_image_manifest(&reference.parse().unwrap(), &RegistryAuth::Anonymous).await.unwrap();
    assert_eq!(manifest.config.media_type, "application/vnd.wasm.config.v0+json");
    assert_eq!(manifest.layers.len(), 1);
    assert_eq!(manifest.layers[0].media_type, WASM_LAYER_MEDIA_TYPE);

    // The artifact index records the pull, and the manifest and config are stored too.
    let entry = store.images().unwrap().remove(&reference).expect("reference recorded");
    assert_eq!(entry.kind, ArtifactKind::Wasm);
    assert_eq!(entry.manifest_digest, manifest_digest);
    assert_eq!(entry.layers[0].digest, pulled.wasm_digest);
    for digest in entry.blobs() {
        assert!(store.blobs().contains(digest), "{digest}");
    }
    // A lookup finds it without a registry.
    let local = store.wasm(&reference).unwrap();
    assert_eq!((local.wasm_digest.as_str(), local.from_cache), (pulled.wasm_digest.as_str(), true));

    // By digest.
    let by_digest = format!("{}@{manifest_digest}", reg.reference("flotilla/hello"));
    let again = store.pull_wasm(&registry, &by_digest).await.unwrap();
    assert_eq!(again.wasm_digest, pulled.wasm_digest);
    assert_eq!(again.path, pulled.path);

    // A second pull skips the download: corrupt the registry's copy of the layer and the
    // pull still succeeds with the verified local blob.
    let data = reg.blob_data_path(&pulled.wasm_digest);
    std::fs::write(&data, module("corrupted!")).unwrap();
    let second = store.pull_wasm(&registry, &reference).await.unwrap();
    assert!(!second.from_cache);
    assert_eq!(second.path, pulled.path);
    assert_eq!(std::fs::read(&second.path).unwrap(), wasm);
}

#[tokio::test]
async fn pull_of_missing_tag_is_not_found() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());

    // Unknown repository.
    let reference = reg.reference("nothing/here:v1");
    let err = store.pull_wasm(&registry, &reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(RegistryError::NotFound { .. })), "{err:?}");
    assert_eq!(err.to_string(), format!("image {reference} not found in registry"));

    // Known repository, unknown tag.
    registry.push_wasm(&reg.reference("flotilla/app:v1"), &module("app")).await.unwrap();
    let reference = reg.reference("flotilla/app:v2");
    let err = store.pull_wasm(&registry, &reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(RegistryError::NotFound { .. })), "{err:?}");
    assert_eq!(err.to_string(), format!("image {reference} not found in registry"));

    // Nothing recorded, nothing stored.
    assert!(store.images().unwrap().is_empty());
    assert!(dir_is_empty(&dir.path().join("blobs/sha256")));
}

#[tokio::test]
async fn tampered_blob_is_refused() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let wasm = module("tamper-me");
    let reference = reg.reference("flotilla/tampered:v1");
    registry.push_wasm(&reference, &wasm).await.unwrap();

    let digest = layer_digest(&wasm);
    let data = reg.blob_data_path(&digest);
    assert_eq!(std::fs::read(&data).unwrap(), wasm, "registry storage layout");
    // Same length, still a Wasm module, different content.
    std::fs::write(&data, module("tamper-mE")).unwrap();

    let err = store.pull_wasm(&registry, &reference).await.unwrap_err();
    match &err {
        ImageError::DigestMismatch { digest: expected, actual, .. } => {
            assert_eq!(expected, &digest);
            assert_eq!(actual, &sha256_digest(&module("tamper-mE")));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains(&digest), "{err}");
    assert!(!store.blobs().contains(&digest));
    assert!(dir_is_empty(&dir.path().join("blobs/sha256")));
    assert!(dir_is_empty(&dir.path().join("ingest")));
    assert!(store.images().unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_registry_falls_back_to_last_pull() {
    let Some(mut reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let wasm = module("offline");
    let reference = reg.reference("flotilla/offline:v1");
    let never_pulled = reg.reference("flotilla/offline:v2");
    registry.push_wasm(&reference, &wasm).await.unwrap();
    registry.push_wasm(&never_pulled, &module("v2")).await.unwrap();
    let first = store.pull_wasm(&registry, &reference).await.unwrap();
    assert!(!first.from_cache);

    reg.stop();

    let cached = store.pull_wasm(&registry, &reference).await.unwrap();
    assert!(cached.from_cache);
    assert_eq!(cached.reference, reference);
    assert_eq!(cached.manifest_digest, first.manifest_digest);
    assert_eq!(cached.wasm_digest, first.wasm_digest);
    assert_eq!(cached.path, first.path);
    assert_eq!(std::fs::read(&cached.path).unwrap(), wasm);

    let err = store.pull_wasm(&registry, &never_pulled).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(RegistryError::Unreachable { .. })), "{err:?}");
    assert!(err.to_string().contains(&reg.addr), "{err}");
}

#[tokio::test]
async fn non_wasm_single_layer_is_refused() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let reference = reg.reference("flotilla/tarball:v1");
    let layer = b"definitely a tarball, not a module".to_vec();
    push_raw(&reference, "application/vnd.oci.image.config.v1+json", "application/vnd.oci.image.layer.v1.tar", &layer)
        .await;

    let err = store.pull_wasm(&registry, &reference).await.unwrap_err();
    assert!(matches!(err, ImageError::NotWasm { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("not a wasm artifact"), "{msg}");
    assert!(msg.contains("application/vnd.oci.image.layer.v1.tar"), "{msg}");
    assert!(msg.contains(&reference), "{msg}");
    assert!(!store.blobs().contains(&sha256_digest(&layer)));
    assert!(dir_is_empty(&dir.path().join("blobs/sha256")));
    assert!(dir_is_empty(&dir.path().join("ingest")));

    // Pushing non-wasm bytes through push_wasm is refused before talking to the registry.
    let err = registry.push_wasm(&reg.reference("flotilla/bad:v1"), b"MZ not wasm").await.unwrap_err();
    assert!(matches!(err, RegistryError::NotWasm { .. }), "{err:?}");
}

#[tokio::test]
async fn other_wasm_layouts_are_accepted() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());

    // wasm-to-oci layout.
    let legacy = module("wasm-to-oci");
    let reference = reg.reference("flotilla/legacy:v1");
    push_raw(&reference, "application/vnd.wasm.config.v1+json", "application/vnd.wasm.content.layer.v1+wasm", &legacy)
        .await;
    let pulled = store.pull_wasm(&registry, &reference).await.unwrap();
    assert_eq!(std::fs::read(&pulled.path).unwrap(), legacy);

    // A single-layer image whose layer is a raw module.
    let raw = module("single-layer");
    let reference = reg.reference("flotilla/single:v1");
    push_raw(&reference, "application/vnd.oci.image.config.v1+json", "application/vnd.oci.image.layer.v1.tar", &raw)
        .await;
    let pulled = store.pull_wasm(&registry, &reference).await.unwrap();
    assert_eq!(std::fs::read(&pulled.path).unwrap(), raw);
}

#[tokio::test]
async fn image_index_is_followed_to_the_wasm_entry() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let wasm = module("indexed");
    let wasm_manifest = registry.push_wasm(&reg.reference("flotilla/multi:wasm"), &wasm).await.unwrap();
    let linux_manifest = push_raw(
        &reg.reference("flotilla/multi:linux"),
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        b"\x1f\x8b gzip tar stand-in",
    )
    .await;

    let reference = reg.reference("flotilla/multi:v1");
    push_index(
        &reference,
        vec![index_entry(&linux_manifest, "linux", "amd64"), index_entry(&wasm_manifest, "wasip1", "wasm")],
    )
    .await;
    let pulled = store.pull_wasm(&registry, &reference).await.unwrap();
    assert_eq!(pulled.manifest_digest, wasm_manifest);
    assert_eq!(std::fs::read(&pulled.path).unwrap(), wasm);

    let reference = reg.reference("flotilla/multi:linux-only");
    push_index(&reference, vec![index_entry(&linux_manifest, "linux", "amd64")]).await;
    let err = store.pull_wasm(&registry, &reference).await.unwrap_err();
    assert!(matches!(err, ImageError::NotWasm { .. }), "{err:?}");
    assert!(err.to_string().contains("linux/amd64"), "{err}");
}

#[tokio::test]
async fn interrupted_wasm_pull_resumes_with_a_range_request() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let wasm = big_module(3 << 20);
    let digest = layer_digest(&wasm);
    registry.push_wasm(&reg.reference("flotilla/big:v1"), &wasm).await.unwrap();

    // The first download of the module is cut after 1 MiB.
    let proxy = CuttingProxy::start(reg.addr.clone(), digest.clone(), 1 << 20);
    let reference = format!("{}/flotilla/big:v1", proxy.addr);
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());

    let err = store.pull_wasm(&registry, &reference).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    assert!(!store.blobs().contains(&digest));
    assert!(store.images().unwrap().is_empty(), "nothing recorded for a failed pull");
    let partial = dir.path().join("ingest").join(format!("{}.partial", &digest[7..]));
    let kept = std::fs::metadata(&partial).expect("the partial download is kept").len();
    assert!(kept > 0 && kept < wasm.len() as u64, "kept {kept} bytes");
    assert!(!proxy.saw_range.load(Ordering::SeqCst));

    let pulled = store.pull_wasm(&registry, &reference).await.unwrap();
    let ranges = proxy.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert!(ranges[0].to_ascii_lowercase().contains(&format!("bytes={kept}-")), "{ranges:?}");
    assert_eq!(proxy.blob_requests.load(Ordering::SeqCst), 2);
    assert_eq!(pulled.wasm_digest, digest);
    assert_eq!(std::fs::read(&pulled.path).unwrap(), wasm);
    assert!(!partial.exists());
    assert!(dir_is_empty(&dir.path().join("ingest")));
}

#[tokio::test]
async fn concurrent_pulls_of_one_module_download_it_once() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let wasm = big_module(1 << 20);
    let digest = layer_digest(&wasm);
    for tag in ["a", "b"] {
        registry.push_wasm(&reg.reference(&format!("flotilla/shared:{tag}")), &wasm).await.unwrap();
    }
    // Every download of the module is held back, so the two pulls are both at it at once.
    let proxy = CuttingProxy::start_with(reg.addr.clone(), digest.clone(), None, Duration::from_millis(700));
    let (ra, rb) = (format!("{}/flotilla/shared:a", proxy.addr), format!("{}/flotilla/shared:b", proxy.addr));
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    // A second handle on the same store, as another part of the agent would hold.
    let other = open_store(dir.path());

    let (a, b) = tokio::join!(store.pull_wasm(&registry, &ra), other.pull_wasm(&registry, &rb));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(proxy.blob_requests.load(Ordering::SeqCst), 1, "two pulls of one blob download it once");
    assert_eq!((a.wasm_digest.as_str(), b.wasm_digest.as_str()), (digest.as_str(), digest.as_str()));
    assert_eq!(a.path, b.path);
    assert_eq!(std::fs::read(&a.path).unwrap(), wasm);
    // Both references are recorded, by either handle.
    let recorded = store.images().unwrap();
    assert!(recorded.contains_key(&ra) && recorded.contains_key(&rb), "{:?}", recorded.keys());
    assert!(dir_is_empty(&dir.path().join("ingest")));
}
