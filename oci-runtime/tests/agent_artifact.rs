//! Agent binaries pushed to and pulled from a real registry (Debian's `docker-registry`; see
//! `support/mod.rs`): an image index with one binary per platform, the host's binary (this
//! test executable itself) pulled back byte for byte, a platform the index lacks, a Wasm
//! artifact or container image asked for as an agent, a tampered binary, and a tag that is
//! never answered from the store while a digest is; and an agent artifact in an OCI layout,
//! which `image import` refuses.

#[path = "support/elf.rs"]
mod elf;
mod support;

use std::collections::HashSet;
use std::path::Path;

use flotilla_oci_runtime::{
    AGENT_BINARY_MEDIA_TYPE, AgentArtifact, ArtifactKind, BlobStore, ImageError, ImageStore, Platform, Registry,
    RegistryConfig, RegistryError, elf_platform, sha256_digest,
};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use support::TestRegistry;

fn open_store(dir: &Path) -> ImageStore {
    ImageStore::open(dir, BlobStore::open(dir).unwrap()).unwrap()
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

/// This test executable: a real agent-sized ELF binary for the host.
fn host_binary() -> (Platform, Vec<u8>) {
    let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let platform = elf_platform(&bytes).expect("the test binary is an ELF executable of a known platform");
    (platform, bytes)
}

/// A small fake executable for a platform other than the host's, with `tag` as its "code".
fn foreign_binary(tag: &str) -> (Platform, Vec<u8>) {
    let elf = elf::foreign_elf(tag);
    let platform = elf_platform(&elf).unwrap();
    (platform, elf)
}

/// Pushes the host binary and a foreign one; returns them and the index digest.
async fn push_two(registry: &Registry, reference: &str) -> ((Platform, Vec<u8>), (Platform, Vec<u8>), String) {
    let host = host_binary();
    let foreign = foreign_binary("foreign");
    let binaries = [(host.0.clone(), &host.1[..]), (foreign.0.clone(), &foreign.1[..])];
    let digest = registry.push_agent(reference, &binaries, Some("0.9.1")).await.unwrap();
    (host, foreign, digest)
}

#[tokio::test]
async fn two_platforms_push_and_the_hosts_binary_comes_back_identical() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let reference = reg.reference("flotilla/agent:0.9.1");

    let (host, foreign, index_digest) = push_two(&registry, &reference).await;
    let expected =
        AgentArtifact::build(&[(host.0.clone(), &host.1), (foreign.0.clone(), &foreign.1)], Some("0.9.1")).unwrap();
    assert_eq!(index_digest, expected.index_digest);
    // Pushing again is idempotent.
    let binaries = [(host.0.clone(), &host.1[..]), (foreign.0.clone(), &foreign.1[..])];
    assert_eq!(registry.push_agent(&reference, &binaries, Some("0.9.1")).await.unwrap(), index_digest);

    // The registry serves the index under the tag, with both platforms.
    let client = raw_client();
    let r: Reference = reference.parse().unwrap();
    let (raw, digest) =
        client.pull_manifest_raw(&r, &RegistryAuth::Anonymous, &[OCI_IMAGE_INDEX_MEDIA_TYPE]).await.unwrap();
    assert_eq!(digest, index_digest);
    assert_eq!(&raw[..], &expected.index[..]);

    let pulled = store.pull_agent_binary(&registry, &reference, &Platform::host()).await.unwrap();
    let host_manifest = expected.manifests.iter().find(|m| m.platform == host.0).unwrap();
    assert_eq!(pulled.reference, reference);
    assert_eq!(pulled.binary_digest, sha256_digest(&host.1));
    assert_eq!(pulled.manifest_digest, host_manifest.manifest_digest);
    assert_eq!(pulled.index_digest.as_deref(), Some(index_digest.as_str()));
    assert_eq!(pulled.platform, host.0);
    assert_eq!(pulled.version.as_deref(), Some("0.9.1"));
    assert_eq!(pulled.size, host.1.len() as u64);
    assert!(pulled.path.starts_with(dir.path()));
    let bytes = std::fs::read(&pulled.path).unwrap();
    assert!(bytes == host.1, "the pulled binary differs from the pushed one");
    assert_eq!(sha256_digest(&bytes), pulled.binary_digest);
    assert!(dir_is_empty(&dir.path().join("ingest")));

    // Recorded as an agent binary, with its manifest, config and index stored.
    let record = store.images().unwrap().remove(&reference).expect("reference recorded");
    assert_eq!(record.kind, ArtifactKind::Agent);
    assert_eq!(record.layers.len(), 1);
    assert_eq!(record.layers[0].media_type, AGENT_BINARY_MEDIA_TYPE);
    for digest in record.blobs() {
        assert!(store.blobs().contains(digest), "{digest}");
    }
    // It is no container image and no Wasm module.
    let err = store.image(&reference).unwrap_err();
    assert!(err.to_string().contains("is an agent binary, not a container image"), "{err}");
    assert!(matches!(store.wasm(&reference), Err(ImageError::WrongKind { found: ArtifactKind::Agent, .. })));

    // While a pull result lives, collection keeps its binary; once dropped, it may go.
    let report = store.gc(&HashSet::new(), 0).await.unwrap();
    assert!(report.removed_images.is_empty(), "{report:?}");
    assert!(pulled.path.is_file());
    let path = pulled.path.clone();
    drop(pulled);
    let report = store.gc(&HashSet::new(), 0).await.unwrap();
    assert_eq!(report.removed_images, vec![reference.clone()]);
    assert!(!path.exists());

    // The foreign platform, asked for by name, gives the fake binary.
    let other = store.pull_agent_binary(&registry, &reference, &foreign.0).await.unwrap();
    assert_eq!(std::fs::read(&other.path).unwrap(), foreign.1);
    assert_eq!(other.platform, foreign.0);
}

#[tokio::test]
async fn a_platform_the_index_lacks_is_refused_naming_those_it_has() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let reference = reg.reference("flotilla/agent:two");
    let (host, foreign, _) = push_two(&registry, &reference).await;

    let riscv = Platform::new("linux", "riscv64", None);
    let err = store.pull_agent_binary(&registry, &reference, &riscv).await.unwrap_err();
    assert!(matches!(err, ImageError::Platform { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("linux/riscv64"), "{text}");
    for p in [&host.0, &foreign.0] {
        assert!(text.contains(&p.to_string()), "{text} should name {p}");
    }
    assert!(store.images().unwrap().is_empty());
    assert!(dir_is_empty(&dir.path().join("blobs/sha256")));
}

#[tokio::test]
async fn a_wasm_artifact_or_container_image_is_not_an_agent() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());

    let wasm_ref = reg.reference("flotilla/module:v1");
    registry.push_wasm(&wasm_ref, b"\0asm\x01\0\0\0").await.unwrap();
    let err = store.pull_agent_binary(&registry, &wasm_ref, &Platform::host()).await.unwrap_err();
    assert!(
        matches!(err, ImageError::WrongKind { found: ArtifactKind::Wasm, wanted: ArtifactKind::Agent, .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("image {wasm_ref} is a wasm artifact, not an agent binary"));

    let image_ref = reg.reference("flotilla/image:v1");
    let client = raw_client();
    client
        .push(
            &image_ref.parse().unwrap(),
            &[ImageLayer::new(b"not really a tar".to_vec(), "application/vnd.oci.image.layer.v1.tar".to_owned(), None)],
            Config::new(b"{}".to_vec(), "application/vnd.oci.image.config.v1+json".to_owned(), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap();
    let err = store.pull_agent_binary(&registry, &image_ref, &Platform::host()).await.unwrap_err();
    assert!(matches!(err, ImageError::WrongKind { found: ArtifactKind::Container, .. }), "{err:?}");

    assert!(store.images().unwrap().is_empty());
    assert!(dir_is_empty(&dir.path().join("blobs/sha256")));
}

#[tokio::test]
async fn a_tampered_binary_is_refused_by_digest() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let reference = reg.reference("flotilla/agent:tampered");
    let (platform, binary) = foreign_binary("the real code");
    registry.push_agent(&reference, &[(platform.clone(), &binary)], None).await.unwrap();

    let digest = sha256_digest(&binary);
    let data = reg.blob_data_path(&digest);
    assert_eq!(std::fs::read(&data).unwrap(), binary, "registry storage layout");
    // Same length, the same ELF header, other code.
    let (_, evil) = foreign_binary("the evil code");
    assert_eq!(evil.len(), binary.len());
    std::fs::write(&data, &evil).unwrap();

    let err = store.pull_agent_binary(&registry, &reference, &platform).await.unwrap_err();
    match &err {
        ImageError::DigestMismatch { digest: expected, actual, .. } => {
            assert_eq!(expected, &digest);
            assert_eq!(actual, &sha256_digest(&evil));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!store.blobs().contains(&digest));
    assert!(dir_is_empty(&dir.path().join("blobs/sha256")));
    assert!(dir_is_empty(&dir.path().join("ingest")));
    assert!(store.images().unwrap().is_empty());
}

#[tokio::test]
async fn a_tag_always_asks_the_registry_and_a_digest_is_answered_from_the_store() {
    let Some(mut reg) = TestRegistry::start() else {
        return;
    };
    let registry = Registry::new(RegistryConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let reference = reg.reference("flotilla/agent:offline");
    let (platform, binary) = foreign_binary("offline");
    let index_digest = registry.push_agent(&reference, &[(platform.clone(), &binary)], Some("2")).await.unwrap();
    let by_digest = format!("{}@{index_digest}", reg.reference("flotilla/agent"));
    let by_tag = store.pull_agent_binary(&registry, &reference, &platform).await.unwrap();
    let first = store.pull_agent_binary(&registry, &by_digest, &platform).await.unwrap();
    assert_eq!(first.binary_digest, by_tag.binary_digest);
    assert_eq!(first.index_digest.as_deref(), Some(index_digest.as_str()));

    reg.stop();

    let err = store.pull_agent_binary(&registry, &reference, &platform).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(RegistryError::Unreachable { .. })), "{err:?}");
    let cached = store.pull_agent_binary(&registry, &by_digest, &platform).await.unwrap();
    assert_eq!(cached.binary_digest, first.binary_digest);
    assert_eq!(cached.manifest_digest, first.manifest_digest);
    assert_eq!(cached.path, first.path);
    assert_eq!(cached.version.as_deref(), Some("2"));
    assert_eq!(std::fs::read(&cached.path).unwrap(), binary);
    // Not for a platform it was not pulled for.
    let other = Platform::new("linux", "s390x", None);
    let err = store.pull_agent_binary(&registry, &by_digest, &other).await.unwrap_err();
    assert!(matches!(err, ImageError::Registry(RegistryError::Unreachable { .. })), "{err:?}");
}

#[tokio::test]
async fn unusable_pushes_are_refused_before_any_upload() {
    // No registry listens on port 1: these fail before reaching for one.
    let registry = Registry::new(RegistryConfig::default());
    let (host, binary) = host_binary();
    let err = registry
        .push_agent(
            "127.0.0.1:1/flotilla/agent@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            &[(host.clone(), &binary)],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::InvalidReference { .. }), "{err:?}");
    let err = registry
        .push_agent("127.0.0.1:1/flotilla/agent:v1", &[(host.clone(), &binary), (host.clone(), &binary)], None)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::BadAgent { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("two binaries for platform {host}")), "{err}");
    let err =
        registry.push_agent("127.0.0.1:1/flotilla/agent:v1", &[(host, b"\0asm\x01\0\0\0")], None).await.unwrap_err();
    assert!(err.to_string().contains("not an ELF executable"), "{err}");
}

fn raw_client() -> Client {
    // Registry::new installs the rustls provider that this client also needs.
    let _ = Registry::new(RegistryConfig::default());
    Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() })
}

#[tokio::test]
async fn an_agent_artifact_in_an_archive_is_not_imported() {
    // An OCI layout holding the agent artifact (its index under a name), as `skopeo copy` of a
    // pushed one would write it.
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let (host, binary) = host_binary();
    // The first 4 KiB of the test binary: its ELF header and then some.
    let artifact = AgentArtifact::build(&[(host, &binary[..4096])], Some("1")).unwrap();
    let put = |bytes: &[u8]| std::fs::write(blobs.join(&sha256_digest(bytes)["sha256:".len()..]), bytes).unwrap();
    put(&binary[..4096]);
    put(&artifact.index);
    for m in &artifact.manifests {
        put(&m.manifest);
        put(&m.config);
    }
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": artifact.index_digest,
            "size": artifact.index.len(),
            "annotations": {"io.containerd.image.name": "registry.invalid/flotilla/agent:1"},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();

    let store_dir = dir.path().join("store");
    let store = open_store(&store_dir);
    let err = store.import(&layout, &Platform::host(), None).await.unwrap_err();
    assert!(matches!(err, ImageError::Archive { .. }), "{err:?}");
    assert!(err.to_string().contains("is an agent binary artifact, which is not imported"), "{err}");
    assert!(store.images().unwrap().is_empty());
}
