//! Wasm modules and components as OCI artifacts in the one artifact store: building the
//! artifact a `.wasm` file becomes (the CNCF Wasm OCI layout, the same bytes whether it is
//! pushed to a registry or saved to an archive), pulling one (tag or digest, an image index
//! followed to its wasm platform entry) through the same resumable, single-flight,
//! digest-verified blob fetch as container layers, and finding a pulled or imported module
//! again without a registry. Pure except for the pull, which goes through [`super::pull`].

use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageManifestBuilder, MediaType, Os, SCHEMA_VERSION};
use serde::Serialize;

use super::pull::Session;
use super::spec::{self, ManifestError, Parsed};
use super::{ArtifactKind, ImageError, ImageRecord, ImageStore, LayerRecord, Platform, normalize_reference};
use crate::registry::{
    LEGACY_WASM_LAYER_MEDIA_TYPE, MAX_MODULE_BYTES, Registry, RegistryError, WASM_CONFIG_MEDIA_TYPE,
    WASM_LAYER_MEDIA_TYPE, parse_reference,
};
use crate::store::{sha256_digest, validate_digest};

/// First four bytes of every Wasm binary (core module or component).
pub(crate) const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// The version and layer fields after the magic that mark a component-model binary
/// (version 0x0d, layer 1); a core module has version 1, layer 0 (`01 00 00 00`).
const COMPONENT_VERSION_LAYER: &[u8; 4] = b"\x0d\x00\x01\x00";
/// Largest config blob of a Wasm artifact accepted.
const MAX_WASM_CONFIG_BYTES: u64 = 1024 * 1024;

/// Why bytes or a manifest are not a Wasm artifact; the text says what was found instead.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The bytes do not start with the Wasm magic.
    #[error("{len} bytes starting with {head} instead of the wasm magic \\0asm")]
    NotWasm {
        /// How many bytes there are.
        len: usize,
        /// Their first bytes, described.
        head: String,
    },
    /// A manifest without layers.
    #[error("manifest has no layers; {manifest}")]
    NoLayers {
        /// The manifest's media types, described.
        manifest: String,
    },
    /// Several layers, none typed as Wasm.
    #[error("no wasm layer; {manifest}")]
    NoWasmLayer {
        /// The manifest's media types, described.
        manifest: String,
    },
    /// More than one Wasm-typed layer.
    #[error("{count} wasm layers where one is expected; {manifest}")]
    SeveralWasmLayers {
        /// How many.
        count: usize,
        /// The manifest's media types, described.
        manifest: String,
    },
    /// A document could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// Which document.
        what: &'static str,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// A document could not be built of its parts.
    #[error("cannot build {what}: {source}")]
    Build {
        /// Which document.
        what: &'static str,
        /// The error.
        #[source]
        source: oci_spec::OciSpecError,
    },
}

/// A Wasm module in the artifact store: the result of [`ImageStore::pull_wasm`] and
/// [`ImageStore::wasm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledWasm {
    /// The reference as given by the caller.
    pub reference: String,
    /// Digest of the image manifest the module came from (for an image index: the digest of
    /// the selected platform manifest).
    pub manifest_digest: String,
    /// Digest of the Wasm module blob.
    pub wasm_digest: String,
    /// Path of the verified module in the blob store.
    pub path: PathBuf,
    /// True when the module was found in the store without asking a registry: a lookup, or a
    /// pull whose registry was unreachable.
    pub from_cache: bool,
}

/// The config blob of the CNCF Wasm OCI artifact layout: not an OCI image config (no
/// `rootfs`, a `layerDigests` of its own), so not oci-spec's `ImageConfiguration`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfig<'a> {
    architecture: &'a str,
    os: &'a str,
    layer_digests: Vec<String>,
}

/// The OCI artifact a Wasm binary becomes: config media type
/// `application/vnd.wasm.config.v0+json` (config JSON like
/// `{"architecture":"wasm","os":"wasip1","layerDigests":["sha256:.."]}`), one layer
/// `application/wasm`, an OCI image manifest. The same binary always gives the same bytes,
/// so a module pushed to a registry and one saved to an archive have one manifest digest.
#[derive(Debug, Clone)]
pub struct WasmArtifact {
    /// The config blob.
    pub config: Vec<u8>,
    /// Its digest.
    pub config_digest: String,
    /// The digest of the layer (the binary).
    pub layer_digest: String,
    /// The manifest, as pushed or saved.
    pub manifest: Vec<u8>,
    /// Its digest.
    pub manifest_digest: String,
    /// `wasip2` for a component, else `wasip1`.
    pub os: &'static str,
}

impl WasmArtifact {
    /// The artifact of `wasm`, which must start with the Wasm magic (the error says what it
    /// starts with instead).
    pub fn build(wasm: &[u8]) -> Result<WasmArtifact, WasmError> {
        if !wasm.starts_with(WASM_MAGIC) {
            return Err(WasmError::NotWasm { len: wasm.len(), head: describe_head(wasm) });
        }
        let layer_digest = sha256_digest(wasm);
        let os = wasm_os(wasm);
        let config =
            serde_json::to_vec(&WasmConfig { architecture: "wasm", os, layer_digests: vec![layer_digest.clone()] })
                .map_err(|source| WasmError::Encode { what: "wasm config", source })?;
        let config_digest = sha256_digest(&config);
        // oci-spec serializes the fields in the order oci-client's manifest type did, so the
        // bytes (and digest) are those `flotilla push` has always produced for the same module
        // (pinned by `the_manifest_bytes_are_pinned`).
        let build = |source| WasmError::Build { what: "manifest", source };
        let manifest = ImageManifestBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .media_type(MediaType::ImageManifest)
            .config(
                spec::descriptor(WASM_CONFIG_MEDIA_TYPE.into(), &config_digest, config.len() as u64).map_err(build)?,
            )
            .layers(vec![
                spec::descriptor(WASM_LAYER_MEDIA_TYPE.into(), &layer_digest, wasm.len() as u64).map_err(build)?,
            ])
            .build()
            .map_err(build)?;
        let manifest =
            serde_json::to_vec(&manifest).map_err(|source| WasmError::Encode { what: "manifest", source })?;
        let manifest_digest = sha256_digest(&manifest);
        Ok(WasmArtifact { config, config_digest, layer_digest, manifest, manifest_digest, os })
    }
}

/// The config `os` for a Wasm binary that starts with the wasm magic: `wasip2` for a
/// component (version/layer `0d 00 01 00`), `wasip1` for a core module or anything else.
pub(crate) fn wasm_os(wasm: &[u8]) -> &'static str {
    if wasm.get(WASM_MAGIC.len()..).is_some_and(|rest| rest.starts_with(COMPONENT_VERSION_LAYER)) {
        "wasip2"
    } else {
        "wasip1"
    }
}

/// [`wasm_os`] of the binary in a file (`wasip1` if it cannot be read).
pub(crate) fn wasm_os_of_file(path: &Path) -> &'static str {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(8);
    let _ = std::fs::File::open(path).and_then(|f| f.take(8).read_to_end(&mut head));
    wasm_os(&head)
}

/// Picks the Wasm entry of an image index: wasm/wasip1 first, then wasm/wasip2, then wasm/wasi.
pub(crate) fn select_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    ["wasip1", "wasip2", "wasi"].into_iter().map(Os::from).find_map(|os| {
        entries.iter().find(|e| e.platform().as_ref().is_some_and(|p| *p.architecture() == Arch::Wasm && *p.os() == os))
    })
}

pub(crate) fn describe_platforms(entries: &[Descriptor]) -> String {
    entries
        .iter()
        .map(|e| match e.platform() {
            Some(p) => format!("{}/{}", p.os(), p.architecture()),
            None => "unspecified".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn describe_manifest(config: &Descriptor, layers: &[Descriptor]) -> String {
    format!(
        "config media type {}, layer media types [{}]",
        config.media_type(),
        layers.iter().map(|l| l.media_type().as_ref()).collect::<Vec<_>>().join(", ")
    )
}

pub(crate) fn describe_head(head: &[u8]) -> String {
    if head.is_empty() {
        "nothing (empty)".to_owned()
    } else {
        format!("{:?}", String::from_utf8_lossy(&head[..head.len().min(4)]))
    }
}

fn is_wasm_layer_type(media_type: &MediaType) -> bool {
    matches!(media_type.as_ref(), WASM_LAYER_MEDIA_TYPE | LEGACY_WASM_LAYER_MEDIA_TYPE)
}

/// Whether a manifest says by its media types that it is a Wasm artifact (a Wasm config or
/// a Wasm-typed layer). A single raw layer of another type may still hold a module; only its
/// bytes tell.
pub(crate) fn is_wasm_manifest(config: &Descriptor, layers: &[Descriptor]) -> bool {
    config.media_type().as_ref().starts_with("application/vnd.wasm.config")
        || layers.iter().any(|l| is_wasm_layer_type(l.media_type()))
}

/// The layer holding the module: the single layer typed as Wasm, else the only layer of a
/// single-layer image (its content is checked for the Wasm magic later). The error says
/// what was found.
pub(crate) fn select_layer<'a>(config: &Descriptor, layers: &'a [Descriptor]) -> Result<&'a Descriptor, WasmError> {
    let wasm: Vec<&Descriptor> = layers.iter().filter(|l| is_wasm_layer_type(l.media_type())).collect();
    let manifest = || describe_manifest(config, layers);
    match (wasm.as_slice(), layers) {
        ([layer], _) => Ok(layer),
        ([], [only]) => Ok(only),
        ([], []) => Err(WasmError::NoLayers { manifest: manifest() }),
        ([], _) => Err(WasmError::NoWasmLayer { manifest: manifest() }),
        (several, _) => Err(WasmError::SeveralWasmLayers { count: several.len(), manifest: manifest() }),
    }
}

/// The index record of a Wasm artifact.
pub(crate) fn record(
    manifest_digest: &str,
    index_digest: Option<String>,
    config: &Descriptor,
    layer: &Descriptor,
    head: &[u8],
) -> ImageRecord {
    ImageRecord {
        kind: ArtifactKind::Wasm,
        manifest_digest: manifest_digest.to_owned(),
        index_digest,
        config_digest: Some(config.digest().to_string()),
        layers: vec![LayerRecord {
            digest: layer.digest().to_string(),
            media_type: layer.media_type().to_string(),
            size: layer.size(),
            diff_id: layer.digest().to_string(),
        }],
        chain_ids: Vec::new(),
        platform: Platform::new(wasm_os(head), "wasm", None),
        last_used_unix: 0,
    }
}

impl ImageStore {
    /// Pulls the Wasm module `reference` (tag or digest) names into the store and records it
    /// in the artifact index. Blobs already present are not downloaded again; an interrupted
    /// download resumes with a range request; two concurrent pulls of one blob download it
    /// once.
    ///
    /// Accepts the CNCF Wasm artifact layout (layer `application/wasm`), the older wasm-to-oci
    /// layout (layer `application/vnd.wasm.content.layer.v1+wasm`), and single-layer images
    /// whose only layer, whatever its media type, is a raw Wasm binary; anything whose layer
    /// does not start with `\0asm` is refused with [`ImageError::NotWasm`] and nothing of it
    /// kept. An image index is followed to its wasm/wasip1 (or wasip2, or wasi) entry.
    ///
    /// When the registry is unreachable (connection refused, timeout; not 404 or auth errors)
    /// and the reference was pulled or imported before, the recorded module is returned with
    /// `from_cache: true`.
    pub async fn pull_wasm(&self, registry: &Registry, reference: &str) -> Result<PulledWasm, ImageError> {
        let r = parse_reference(reference)?;
        let key = r.whole();
        let _shared = self.inner.gc_lock.read().await;
        match self.pull_wasm_remote(registry, reference, r).await {
            Ok(record) => {
                let record = self.record_raw(&key, record)?;
                let wasm_digest = record.layers[0].digest.clone();
                tracing::info!(reference, manifest_digest = %record.manifest_digest, %wasm_digest, "pulled wasm module");
                Ok(PulledWasm {
                    reference: reference.to_owned(),
                    manifest_digest: record.manifest_digest,
                    path: self.blobs().path(&wasm_digest).map_err(ImageError::store(reference))?,
                    wasm_digest,
                    from_cache: false,
                })
            }
            Err(err @ ImageError::Registry(RegistryError::Unreachable { .. })) => {
                let Ok(pulled) = self.wasm(reference) else { return Err(err) };
                tracing::warn!(
                    reference,
                    error = %err,
                    wasm_digest = %pulled.wasm_digest,
                    "registry unreachable, using the module from the last pull"
                );
                Ok(pulled)
            }
            Err(e) => Err(e),
        }
    }

    /// The Wasm module recorded for `reference` (pulled or imported before), from the local
    /// store only: no registry is asked. [`ImageError::NotFound`] if it was never recorded or
    /// its blob is gone, [`ImageError::WrongKind`] if the reference is a container image.
    pub fn wasm(&self, reference: &str) -> Result<PulledWasm, ImageError> {
        let key = normalize_reference(reference)?;
        let record = self.inner.index.load()?.remove(&key).ok_or(ImageError::NotFound { reference: key.clone() })?;
        if record.kind != ArtifactKind::Wasm {
            return Err(ImageError::WrongKind { reference: key, found: record.kind, wanted: ArtifactKind::Wasm });
        }
        let layer = record.layers.first().ok_or(ImageError::NotFound { reference: key.clone() })?;
        let path = self.blobs().path(&layer.digest).map_err(ImageError::store(&key))?;
        if !path.is_file() {
            return Err(ImageError::NotFound { reference: key });
        }
        Ok(PulledWasm {
            reference: reference.to_owned(),
            manifest_digest: record.manifest_digest,
            wasm_digest: layer.digest.clone(),
            path,
            from_cache: true,
        })
    }

    async fn pull_wasm_remote(
        &self,
        registry: &Registry,
        reference: &str,
        r: oci_client::Reference,
    ) -> Result<ImageRecord, ImageError> {
        let s = Session::open(registry, r, reference).await?;
        let not_wasm = |found: String| ImageError::NotWasm { reference: reference.to_owned(), found };
        let not_wasm_e = |e: &dyn std::fmt::Display| not_wasm(e.to_string());
        // A document that breaks the image spec (a malformed digest, a negative size) is
        // unusable, as an unusable digest is below; any other is not a Wasm artifact.
        let parse_err = |e: ManifestError| match e {
            e @ ManifestError::Invalid { .. } => s.bad(e.to_string()),
            e => not_wasm_e(&e),
        };

        let (top_bytes, top_digest) = s.manifest(&s.r, None).await?;
        let (index, manifest_bytes, manifest_digest, manifest) =
            match spec::parse_manifest(&top_bytes).map_err(parse_err)? {
                Parsed::Manifest(manifest) => (None, top_bytes, top_digest, manifest),
                Parsed::Index(index) => {
                    let entries = index.manifests();
                    let entry = select_platform(entries).ok_or_else(|| {
                        not_wasm(format!(
                            "image index has no wasm/wasip1, wasm/wasip2 or wasm/wasi entry (platforms: [{}])",
                            describe_platforms(entries)
                        ))
                    })?;
                    let entry_digest = entry.digest().as_ref();
                    validate_digest(entry_digest)
                        .map_err(|e| s.bad(format!("image index entry has an unusable digest: {e}")))?;
                    tracing::debug!(reference, digest = entry_digest, "following image index");
                    let child = s.r.clone_with_digest(entry_digest.to_owned());
                    let (bytes, digest) = s.manifest(&child, Some(entry_digest)).await?;
                    match spec::parse_manifest(&bytes).map_err(parse_err)? {
                        Parsed::Manifest(manifest) => (Some((top_bytes, top_digest)), bytes, digest, manifest),
                        Parsed::Index(_) => {
                            return Err(not_wasm(format!("image index entry {entry_digest} is itself an image index")));
                        }
                    }
                }
            };
        let (config, layers) = (manifest.config(), manifest.layers());
        let layer = select_layer(config, layers).map_err(|e| not_wasm_e(&e))?;
        validate_digest(layer.digest().as_ref())
            .map_err(|e| s.bad(format!("wasm layer has an unusable digest: {e}")))?;
        validate_digest(config.digest().as_ref()).map_err(|e| s.bad(format!("config digest: {e}")))?;
        if layer.size() > MAX_MODULE_BYTES {
            return Err(ImageError::TooLarge {
                reference: reference.to_owned(),
                digest: layer.digest().to_string(),
                limit: MAX_MODULE_BYTES,
            });
        }
        let refuse = |head: &[u8]| {
            not_wasm(format!(
                "layer {} ({}) starts with {} instead of the wasm magic \\0asm; {}",
                layer.digest(),
                layer.media_type(),
                describe_head(head),
                describe_manifest(config, layers)
            ))
        };
        let config_bytes = s.config(self, config, MAX_WASM_CONFIG_BYTES).await?;
        // The magic is checked as soon as four bytes are in, so a tarball behind a mistaken
        // reference is refused without downloading it, and before it becomes visible.
        let check = |head: &[u8], complete: bool| -> Result<(), ImageError> {
            if (head.len() >= WASM_MAGIC.len() || complete) && !head.starts_with(WASM_MAGIC) {
                return Err(refuse(head));
            }
            Ok(())
        };
        s.blob(self, layer, Some(&check)).await?;
        // Content-addressed: a blob already present was verified when it was written, but it
        // may be a container layer, so it must be a module too.
        let head = self.blobs().read_head(layer.digest().as_ref(), 8).map_err(ImageError::store(reference))?;
        check(&head, true)?;

        // Everything verified; now the small documents become visible too.
        s.publish_documents(
            self,
            (&config_bytes, config.digest().as_ref()),
            (&manifest_bytes, &manifest_digest),
            index.as_ref(),
        )?;
        Ok(record(&manifest_digest, index.map(|(_, d)| d), config, layer, &head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(media_type: &str) -> Descriptor {
        spec::descriptor(media_type.into(), &sha256_digest(media_type.as_bytes()), 4).unwrap()
    }

    fn layers(types: &[&str]) -> Vec<Descriptor> {
        types.iter().map(|t| descriptor(t)).collect()
    }

    #[test]
    fn layer_selection() {
        let wasm_config = descriptor(WASM_CONFIG_MEDIA_TYPE);
        let oci_config = descriptor("application/vnd.oci.image.config.v1+json");
        let l = layers(&[WASM_LAYER_MEDIA_TYPE]);
        assert_eq!(select_layer(&wasm_config, &l).unwrap().media_type().as_ref(), WASM_LAYER_MEDIA_TYPE);
        assert!(is_wasm_manifest(&oci_config, &l));

        let l = layers(&[LEGACY_WASM_LAYER_MEDIA_TYPE]);
        assert_eq!(
            select_layer(&descriptor("application/vnd.wasm.config.v1+json"), &l).unwrap().media_type(),
            l[0].media_type()
        );

        // A single layer of any type is a candidate; its bytes decide.
        let l = layers(&["application/vnd.oci.image.layer.v1.tar"]);
        assert!(select_layer(&oci_config, &l).is_ok());
        assert!(!is_wasm_manifest(&oci_config, &l));

        // The wasm-typed layer wins among several.
        let l = layers(&["application/json", WASM_LAYER_MEDIA_TYPE]);
        assert_eq!(select_layer(&wasm_config, &l).unwrap().media_type().as_ref(), WASM_LAYER_MEDIA_TYPE);

        let l = layers(&["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+gzip"]);
        let err = select_layer(&oci_config, &l).unwrap_err().to_string();
        assert!(err.contains("no wasm layer"), "{err}");
        assert!(err.contains("application/vnd.oci.image.layer.v1.tar+gzip"), "{err}");
        assert!(err.contains("application/vnd.oci.image.config.v1+json"), "{err}");

        let l = layers(&[WASM_LAYER_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE]);
        assert!(select_layer(&wasm_config, &l).unwrap_err().to_string().contains("2 wasm layers"));
        assert!(select_layer(&wasm_config, &[]).unwrap_err().to_string().contains("no layers"));
    }

    #[test]
    fn index_platform_selection() {
        let entry = |os: &str, arch: &str, n: u8| {
            let mut d =
                spec::descriptor(MediaType::ImageManifest, &format!("sha256:{}", hex::encode([n; 32])), 1).unwrap();
            d.set_platform(Some((&Platform::new(os, arch, None)).into()));
            d
        };
        let entries = vec![entry("linux", "amd64", 1), entry("wasi", "wasm", 2), entry("wasip1", "wasm", 3)];
        assert_eq!(select_platform(&entries).unwrap().digest(), entries[2].digest());
        assert_eq!(select_platform(&entries[..2]).unwrap().digest(), entries[1].digest());
        assert!(select_platform(&entries[..1]).is_none());
        assert_eq!(describe_platforms(&entries[..1]), "linux/amd64");
    }

    #[test]
    fn config_os_follows_the_binary_kind() {
        // A core module (version 1, layer 0) and a component (version 0x0d, layer 1).
        assert_eq!(wasm_os(b"\0asm\x01\x00\x00\x00"), "wasip1");
        assert_eq!(wasm_os(b"\0asm\x01\x00\x00\x00\x01\x04\x01\x60\x00\x00"), "wasip1");
        assert_eq!(wasm_os(b"\0asm\x0d\x00\x01\x00"), "wasip2");
        assert_eq!(wasm_os(b"\0asm\x0d\x00\x01\x00\x00\x08\x04name\x00\x00\x00"), "wasip2");
        // Too short to tell, or a version this code does not know: the preview-1 default.
        assert_eq!(wasm_os(b"\0asm"), "wasip1");
        assert_eq!(wasm_os(b"\0asm\x0d\x00\x01"), "wasip1");
        assert_eq!(wasm_os(b"\0asm\x0d\x00\x00\x00"), "wasip1");

        let a = WasmArtifact::build(b"\0asm\x0d\x00\x01\x00").unwrap();
        let config = String::from_utf8(a.config.clone()).unwrap();
        assert_eq!(config, format!(r#"{{"architecture":"wasm","os":"wasip2","layerDigests":["{}"]}}"#, a.layer_digest));
        assert_eq!(a.os, "wasip2");
        let b = WasmArtifact::build(b"\0asm\x01\x00\x00\x00").unwrap();
        assert!(String::from_utf8(b.config).unwrap().contains(r#""os":"wasip1""#));
    }

    /// The bytes `flotilla push` and `image save` write for a module are pinned: a registry,
    /// skopeo and every earlier push name the artifact by their digest, so no change of types
    /// or serializer may move a byte.
    #[test]
    fn the_manifest_bytes_are_pinned() {
        let core = WasmArtifact::build(b"\0asm\x01\x00\x00\x00").unwrap();
        assert_eq!(
            String::from_utf8(core.manifest.clone()).unwrap(),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.wasm.config.v0+json","digest":"sha256:44baf8d006feb6f6da7b91f2d1767c82e8fdfedee427aaa406feaee55be89f16","size":128},"layers":[{"mediaType":"application/wasm","digest":"sha256:93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476","size":8}]}"#
        );
        assert_eq!(core.manifest_digest, "sha256:81b5e3c266ef5da36063e7f98304b2fb02de5e23c5cb9ea3dadcf2f1f9de3f18");
        let component = WasmArtifact::build(b"\0asm\x0d\x00\x01\x00").unwrap();
        assert_eq!(
            component.manifest_digest,
            "sha256:6da360538846aeeeae3f14172a9c10e1ee1edab8df87de64311353cd7843c1dc"
        );
    }

    #[test]
    fn the_artifact_is_deterministic_and_well_formed() {
        let wasm = b"\0asm\x01\x00\x00\x00";
        let a = WasmArtifact::build(wasm).unwrap();
        let b = WasmArtifact::build(wasm).unwrap();
        assert_eq!(a.manifest, b.manifest);
        assert_eq!(a.manifest_digest, sha256_digest(&a.manifest));
        assert_eq!(a.config_digest, sha256_digest(&a.config));
        let Ok(Parsed::Manifest(m)) = spec::parse_manifest(&a.manifest) else { panic!("not a manifest") };
        let (config, layers) = (m.config(), m.layers());
        assert_eq!(config.media_type().as_ref(), WASM_CONFIG_MEDIA_TYPE);
        assert_eq!(config.digest().as_ref(), a.config_digest);
        assert_eq!(config.size() as usize, a.config.len());
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].media_type().as_ref(), WASM_LAYER_MEDIA_TYPE);
        assert_eq!(layers[0].digest().as_ref(), sha256_digest(wasm));
        assert_eq!(layers[0].size() as usize, wasm.len());
        assert!(is_wasm_manifest(config, layers));

        let err = WasmArtifact::build(b"MZ not wasm").unwrap_err().to_string();
        assert!(err.contains("instead of the wasm magic") && err.contains("\"MZ n\""), "{err}");
    }
}
