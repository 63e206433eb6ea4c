//! The one artifact store of a node: container images and Wasm modules and components alike
//! are pulled from OCI distribution registries or imported from archives into one
//! content-addressed [`BlobStore`], recorded in one index ([`ImageIndex`],
//! `<blob root>/artifacts.json`) and collected by one garbage collector. Every blob is
//! digest-verified before it becomes visible; downloads are resumable (range requests) and
//! single-flight per digest ([`pull`]). Container images (index → platform manifest → config
//! and layers) are also unpacked, layer by layer, into overlay-style snapshots keyed by chain
//! id; Wasm artifacts ([`wasm`]) are a module blob the Wasm runtime loads as it is; agent
//! binaries ([`agent`]) are an executable blob an agent upgrade copies out of the store.
//!
//! [`ImageStore`] owns the index, the snapshots under its root (`snapshots/<chain id hex>/`,
//! one directory per layer holding only that layer's files, overlayfs whiteouts included;
//! complete or absent, never partial, since each is renamed into place from a
//! `snapshots/.tmp-*` directory) and the holds runtimes take on the artifacts they run. It
//! must never make content visible before its digest (or diff id) matched, never write
//! outside a snapshot while unpacking, never delete a blob a remaining artifact needs or an
//! artifact someone holds, and never panic on what a registry or an archive contains. It
//! knows nothing of containers or Wasm instances: the runtimes mount the lower directories
//! [`ImageStore::unpack`] returns, or load the module [`ImageStore::pull_wasm`] returns.

mod agent;
mod archive;
mod auth;
mod cred_helper;
mod docker_config;
mod gc;
mod index;
mod platform;
mod pull;
mod spec;
mod unpack;
mod wasm;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::{Descriptor, ImageConfiguration};

pub use agent::{
    AGENT_BINARY_MEDIA_TYPE, AGENT_CONFIG_MEDIA_TYPE, AgentArtifact, AgentError, AgentManifest, MAX_AGENT_BYTES,
    PulledAgent, elf_platform,
};
pub use archive::{Imported, push_archive, save_wasm};
pub use auth::{AuthError, Credential, Credentials, encode_basic_auth, registry_host, server_address};
pub use cred_helper::{CredentialHelper, HelperError};
pub use docker_config::{DockerConfigError, DockerConfigFile};
pub use gc::{ArtifactHold, GcReport};
pub use index::{ArtifactKind, ImageIndex, ImageRecord, IndexError, LayerRecord};
pub use platform::Platform;
pub use spec::{ManifestError, chain_ids};
pub use unpack::{UnpackError, UnpackOptions, UnpackStats, can_unpack_whiteouts, unpack_layer};
pub use wasm::{PulledWasm, WasmArtifact, WasmError};

use crate::registry::{RegistryError, parse_reference};
use crate::store::{BlobStore, StoreError, validate_digest};

/// Errors of the image store. Each names the image reference (or archive) and, for content
/// problems, the digest of the blob concerned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Talking to the registry failed (or the reference does not parse).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A blob did not hash to its digest. Nothing of it was kept.
    #[error("blob {digest} of image {reference} failed verification: received content has digest {actual}")]
    DigestMismatch {
        /// The reference (or archive).
        reference: String,
        /// The digest the blob was requested under.
        digest: String,
        /// What the content hashed to.
        actual: String,
    },
    /// The index has no manifest for the platform.
    #[error("image {reference}: {reason}")]
    Platform {
        /// The reference.
        reference: String,
        /// Which platform was wanted and which exist.
        reason: String,
    },
    /// The artifact is not a Wasm module or component (what it is instead is said).
    #[error("image {reference} is not a wasm artifact: {found}")]
    NotWasm {
        /// The reference (or archive).
        reference: String,
        /// What was found instead (media types, platforms, first bytes).
        found: String,
    },
    /// The reference is recorded as another kind of artifact than the one asked for.
    #[error("image {reference} is {}, not {}", found.with_article(), wanted.with_article())]
    WrongKind {
        /// The reference.
        reference: String,
        /// What it is.
        found: ArtifactKind,
        /// What was asked for.
        wanted: ArtifactKind,
    },
    /// An agent binary artifact's manifest, config or binary is unusable.
    #[error("image {reference} is not a usable agent binary artifact: {reason}")]
    BadAgent {
        /// The reference.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A manifest, config or layer description is unusable.
    #[error("image {reference} is not a usable container image: {reason}")]
    BadImage {
        /// The reference (or archive).
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A blob is larger than its descriptor says, or than the limit for its kind.
    #[error("blob {digest} of image {reference} is larger than {limit} bytes")]
    TooLarge {
        /// The reference.
        reference: String,
        /// The blob.
        digest: String,
        /// The declared size.
        limit: u64,
    },
    /// The artifact is not in the local store.
    #[error("image {reference} is not in the local image store")]
    NotFound {
        /// The reference.
        reference: String,
    },
    /// Unpacking a layer failed; its snapshot was not created.
    #[error("cannot unpack layer {layer} of image {reference}: {source}")]
    Unpack {
        /// The reference.
        reference: String,
        /// The layer blob digest.
        layer: String,
        /// What failed.
        #[source]
        source: UnpackError,
    },
    /// The blob store failed.
    #[error("blob store error for image {reference}: {source}")]
    Store {
        /// The reference (or archive).
        reference: String,
        /// The error.
        #[source]
        source: StoreError,
    },
    /// The image index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// An archive or layout cannot be read.
    #[error("image archive {}: {reason}", path.display())]
    Archive {
        /// The archive or layout directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file system operation of the store failed.
    #[error("image store i/o error on {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    fn store(reference: &str) -> impl FnOnce(StoreError) -> ImageError + '_ {
        move |source| match source {
            StoreError::DigestMismatch { expected, actual } => {
                ImageError::DigestMismatch { reference: reference.to_owned(), digest: expected, actual }
            }
            source => ImageError::Store { reference: reference.to_owned(), source },
        }
    }

    fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }
}

/// The execution defaults an image config carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`KEY=value`).
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User` (`uid[:gid]` or names).
    pub user: Option<String>,
    /// `ExposedPorts` keys, e.g. `80/tcp`.
    pub exposed_ports: Vec<String>,
    /// `Volumes` keys.
    pub volumes: Vec<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `StopSignal`.
    pub stop_signal: Option<String>,
}

/// A pulled or imported image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The reference, normalised (`docker.io/library/busybox:latest`, `host:port/name:tag`,
    /// or `...@sha256:...`); the key of the image index.
    pub reference: String,
    /// Digest of the platform image manifest.
    pub manifest_digest: String,
    /// Digest of the image index it was chosen from, if the reference named an index.
    pub index_digest: Option<String>,
    /// Digest of the config blob.
    pub config_digest: String,
    /// Platform the manifest is for.
    pub platform: Platform,
    /// Execution defaults.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Chain ids, bottom first.
    pub chain_ids: Vec<String>,
}

/// The node's artifact store; cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    blobs: BlobStore,
    index: ImageIndex,
    /// Pulls, imports and unpacks hold it shared; collection holds it exclusively, so it never
    /// deletes a blob or snapshot that one of them is about to use.
    gc_lock: tokio::sync::RwLock<()>,
    /// Artifacts runtimes hold, by normalised reference; see [`ImageStore::hold`].
    holds: std::sync::Mutex<gc::Holds>,
    unpack: UnpackOptions,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ImageStore {
    /// Opens (creating if needed) the artifact store whose blobs and index live in `blobs`
    /// (`<blob root>/artifacts.json`) and whose container snapshots live under `root` (which
    /// may be the blob store's own root). Removes snapshot directories left half-made by an
    /// earlier crash, and folds the indexes of earlier versions (`<root>/images.json`,
    /// `<blob root>/refs.json`) into the one index.
    pub fn open(root: impl Into<PathBuf>, blobs: BlobStore) -> Result<Self, ImageError> {
        Self::open_with(root, blobs, UnpackOptions::default())
    }

    /// [`ImageStore::open`] with unpacking options.
    pub fn open_with(root: impl Into<PathBuf>, blobs: BlobStore, unpack: UnpackOptions) -> Result<Self, ImageError> {
        let root = root.into();
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(ImageError::io(&snapshots))?;
        for entry in std::fs::read_dir(&snapshots).map_err(ImageError::io(&snapshots))? {
            let entry = entry.map_err(ImageError::io(&snapshots))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let path = entry.path();
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover snapshot directory");
                }
            }
        }
        let index = ImageIndex::in_root(blobs.root());
        index.migrate(
            &root.join("images.json"),
            &blobs.root().join("refs.json"),
            |digest| blobs.path(digest).ok(),
            now_unix(),
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                blobs,
                index,
                gc_lock: tokio::sync::RwLock::new(()),
                holds: Default::default(),
                unpack,
            }),
        })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The blob store.
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// Where the snapshot of `chain_id` lives (whether or not it exists).
    pub fn snapshot_dir(&self, chain_id: &str) -> Result<PathBuf, ImageError> {
        let hex = validate_digest(chain_id).map_err(ImageError::store(chain_id))?;
        Ok(self.inner.root.join("snapshots").join(hex))
    }

    /// The container image recorded for `reference`, from the local store only.
    /// [`ImageError::WrongKind`] if the reference is a Wasm artifact.
    pub fn image(&self, reference: &str) -> Result<Image, ImageError> {
        let key = normalize_reference(reference)?;
        let record = self.inner.index.load()?.remove(&key).ok_or(ImageError::NotFound { reference: key.clone() })?;
        if record.kind != ArtifactKind::Container {
            return Err(ImageError::WrongKind { reference: key, found: record.kind, wanted: ArtifactKind::Container });
        }
        self.image_from_record(&key, record)
    }

    /// Every recorded artifact (container images and Wasm alike), by normalised reference.
    pub fn images(&self) -> Result<BTreeMap<String, ImageRecord>, ImageError> {
        Ok(self.inner.index.load()?)
    }

    /// Unpacks every layer of `image` not unpacked yet and returns the overlay lower
    /// directories, top layer first. Blocking work runs on tokio's blocking pool.
    pub async fn unpack(&self, image: &Image) -> Result<Vec<PathBuf>, ImageError> {
        let this = self.clone();
        let image = image.clone();
        let _shared = self.inner.gc_lock.read().await;
        tokio::task::spawn_blocking(move || this.unpack_sync(&image)).await.map_err(|e| ImageError::Io {
            path: self.inner.root.join("snapshots"),
            source: io::Error::other(format!("unpack task failed: {e}")),
        })?
    }

    fn unpack_sync(&self, image: &Image) -> Result<Vec<PathBuf>, ImageError> {
        if image.layers.len() != image.chain_ids.len() {
            return Err(ImageError::BadImage {
                reference: image.reference.clone(),
                reason: format!("{} layers but {} chain ids", image.layers.len(), image.chain_ids.len()),
            });
        }
        let mut lower = Vec::with_capacity(image.layers.len());
        for (layer, chain_id) in image.layers.iter().zip(&image.chain_ids) {
            let dir = self.snapshot_dir(chain_id)?;
            if !dir.is_dir() {
                let blob = self.inner.blobs.path(&layer.digest).map_err(ImageError::store(&image.reference))?;
                let hex = validate_digest(chain_id).map_err(ImageError::store(&image.reference))?;
                let tmp = self.inner.root.join("snapshots").join(format!(
                    ".tmp-{hex}-{}-{}",
                    std::process::id(),
                    TMP_SEQ.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir(&tmp).map_err(ImageError::io(&tmp))?;
                let started = std::time::Instant::now();
                let result = unpack_layer(&blob, &layer.diff_id, &tmp, &self.inner.unpack);
                let stats = match result {
                    Ok(stats) => stats,
                    Err(source) => {
                        let _ = std::fs::remove_dir_all(&tmp);
                        return Err(ImageError::Unpack {
                            reference: image.reference.clone(),
                            layer: layer.digest.clone(),
                            source,
                        });
                    }
                };
                if let Err(e) = std::fs::rename(&tmp, &dir) {
                    let _ = std::fs::remove_dir_all(&tmp);
                    // Another unpack of the same layer won the race; its result is identical.
                    if !dir.is_dir() {
                        return Err(ImageError::Io { path: dir, source: e });
                    }
                }
                tracing::info!(
                    reference = %image.reference,
                    layer = %layer.digest,
                    chain_id = %chain_id,
                    files = stats.files,
                    whiteouts = stats.whiteouts,
                    ms = started.elapsed().as_millis() as u64,
                    "unpacked layer"
                );
            }
            lower.push(dir);
        }
        self.touch(&image.reference);
        lower.reverse();
        Ok(lower)
    }

    /// Marks `reference` as used now (for least-recently-used collection). Best effort.
    fn touch(&self, reference: &str) {
        let now = now_unix();
        if let Err(e) = self.inner.index.update(|images| {
            if let Some(r) = images.get_mut(reference) {
                r.last_used_unix = now;
            }
        }) {
            tracing::warn!(reference, error = %e, "cannot record image use");
        }
    }

    /// Records `record` under `key`, used now, and returns it.
    fn record_raw(&self, key: &str, mut record: ImageRecord) -> Result<ImageRecord, ImageError> {
        record.last_used_unix = now_unix();
        let r = record.clone();
        self.inner.index.update(|images| images.insert(key.to_owned(), r))?;
        Ok(record)
    }

    /// Records the container image `record` under `key` and returns the image.
    fn record(&self, key: &str, record: ImageRecord) -> Result<Image, ImageError> {
        let record = self.record_raw(key, record)?;
        self.image_from_record(key, record)
    }

    fn image_from_record(&self, key: &str, record: ImageRecord) -> Result<Image, ImageError> {
        let config_digest = record.config_digest.ok_or(ImageError::NotFound { reference: key.to_owned() })?;
        let path = self.inner.blobs.path(&config_digest).map_err(ImageError::store(key))?;
        let bytes = std::fs::read(&path).map_err(|_| ImageError::NotFound { reference: key.to_owned() })?;
        let doc = spec::parse_config(&bytes).map_err(|e| ImageError::BadImage {
            reference: key.to_owned(),
            reason: format!("config {config_digest} is not an image config: {e}"),
        })?;
        Ok(Image {
            reference: key.to_owned(),
            manifest_digest: record.manifest_digest,
            index_digest: record.index_digest,
            config_digest,
            platform: record.platform,
            config: exec_config(&doc),
            layers: record.layers,
            chain_ids: record.chain_ids,
        })
    }
}

fn exec_config(doc: &ImageConfiguration) -> ImageConfig {
    let Some(c) = doc.config() else { return ImageConfig::default() };
    // oci-spec reads these sets through a HashMap; sorted, they come in the order they always
    // have, whatever the run.
    let sorted = |set: &Option<Vec<String>>| {
        let mut keys = set.clone().unwrap_or_default();
        keys.sort();
        keys
    };
    ImageConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
        user: c.user().clone().filter(|u| !u.is_empty()),
        exposed_ports: sorted(c.exposed_ports()),
        volumes: sorted(c.volumes()),
        labels: c.labels().clone().unwrap_or_default().into_iter().collect(),
        stop_signal: c.stop_signal().clone().filter(|s| !s.is_empty()),
    }
}

/// The index key of a reference: oci-client's normalised form.
pub fn normalize_reference(reference: &str) -> Result<String, ImageError> {
    Ok(parse_reference(reference)?.whole())
}

/// Builds the record of an image manifest whose config is `config_bytes`: checks the layers
/// are unpackable layer tars with valid digests and that the config lists one valid diff id
/// per layer.
fn build_record(
    reference: &str,
    manifest_digest: &str,
    index_digest: Option<String>,
    config: &Descriptor,
    layers: &[Descriptor],
    config_bytes: &[u8],
    platform: &Platform,
) -> Result<ImageRecord, ImageError> {
    let bad = |reason: String| ImageError::BadImage { reference: reference.to_owned(), reason };
    let doc = spec::parse_config(config_bytes)
        .map_err(|e| bad(format!("config {} is not an image config: {e}", config.digest())))?;
    let diff_ids = doc.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(bad(format!("manifest has {} layers but config lists {} diff ids", layers.len(), diff_ids.len())));
    }
    let mut out = Vec::with_capacity(layers.len());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let digest = layer.digest().as_ref();
        validate_digest(digest).map_err(|e| bad(format!("layer digest: {e}")))?;
        validate_digest(diff_id).map_err(|e| bad(format!("diff id of layer {digest}: {e}")))?;
        if !spec::is_layer_media_type(layer.media_type()) {
            return Err(bad(format!("layer {digest} has media type {}, not a layer tar", layer.media_type())));
        }
        out.push(LayerRecord {
            digest: digest.to_owned(),
            media_type: layer.media_type().to_string(),
            size: layer.size(),
            diff_id: diff_id.clone(),
        });
    }
    let os = doc.os().to_string();
    let platform = if os.is_empty() {
        platform.clone()
    } else {
        Platform::new(&os, &doc.architecture().to_string(), doc.variant().as_deref())
    };
    Ok(ImageRecord {
        kind: ArtifactKind::Container,
        manifest_digest: manifest_digest.to_owned(),
        index_digest,
        config_digest: Some(config.digest().to_string()),
        chain_ids: spec::chain_ids(diff_ids),
        layers: out,
        platform,
        last_used_unix: 0,
    })
}
