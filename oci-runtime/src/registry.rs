//! Talking to OCI registries: pushing Wasm modules as OCI artifacts and pulling them into the
//! [`BlobStore`], digest-verified, with a fallback to the last pull when the registry is
//! unreachable.

use std::error::Error as StdError;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Serialize;

use crate::image::Credentials;
use crate::refs::{RefEntry, RefsFile};
use crate::store::{BlobStore, StoreError, sha256_digest};

/// Config media type of the CNCF Wasm OCI artifact layout.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Layer media type of the CNCF Wasm OCI artifact layout.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Layer media type of the older wasm-to-oci layout.
pub const LEGACY_WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// Largest Wasm module accepted from a registry.
pub const MAX_MODULE_BYTES: u64 = 256 * 1024 * 1024;

/// First four bytes of every Wasm binary (core module or component).
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// The version and layer fields after the magic that mark a component-model binary
/// (version 0x0d, layer 1); a core module has version 1, layer 0 (`01 00 00 00`).
const COMPONENT_VERSION_LAYER: &[u8; 4] = b"\x0d\x00\x01\x00";
/// Bound on establishing a TCP (and TLS) connection to a registry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for the next piece of a response.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(60);
const USER_AGENT: &str = concat!("flotilla-oci-runtime/", env!("CARGO_PKG_VERSION"));

/// Errors talking to a registry. Every variant names the image reference as the caller gave it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse (or is unusable for the operation).
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it was refused.
        reason: String,
    },
    /// The registry has no such repository, tag or manifest.
    #[error("image {reference} not found in registry")]
    NotFound {
        /// The reference as given.
        reference: String,
    },
    /// The registry could not be reached (connection refused, timeout, name resolution).
    #[error("registry {registry} unreachable for image {reference}: {reason}")]
    Unreachable {
        /// Registry host[:port].
        registry: String,
        /// The reference as given.
        reference: String,
        /// The underlying error chain.
        reason: String,
    },
    /// The registry refused the (anonymous) credentials.
    #[error("registry {registry} denied access to image {reference}: {reason}")]
    Unauthorized {
        /// Registry host[:port].
        registry: String,
        /// The reference as given.
        reference: String,
        /// The underlying error.
        reason: String,
    },
    /// Content from the registry did not hash to the digest it was requested under.
    #[error("digest mismatch for {expected} of image {reference}: received content has digest {actual}")]
    DigestMismatch {
        /// The reference as given.
        reference: String,
        /// The digest of the blob (or manifest) requested.
        expected: String,
        /// The digest of what was received.
        actual: String,
    },
    /// The image is not a Wasm module artifact.
    #[error("image {reference} is not a wasm artifact: {found}")]
    NotWasm {
        /// The reference as given.
        reference: String,
        /// What was found instead (media types, platforms, first bytes).
        found: String,
    },
    /// A blob is larger than its descriptor declares or than [`MAX_MODULE_BYTES`].
    #[error("blob {digest} of image {reference} is larger than {limit} bytes")]
    TooLarge {
        /// The reference as given.
        reference: String,
        /// The blob digest.
        digest: String,
        /// The limit exceeded.
        limit: u64,
    },
    /// Any other failure reported by the registry or the client.
    #[error("registry error for image {reference}: {message}")]
    Registry {
        /// The reference as given.
        reference: String,
        /// The underlying error chain.
        message: String,
    },
    /// The local blob store failed.
    #[error("blob store error for image {reference}: {source}")]
    Store {
        /// The reference as given.
        reference: String,
        /// The store error.
        #[source]
        source: StoreError,
    },
}

/// Registry settings.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// registries (host[:port]) spoken to over plain HTTP. Loopback hosts (127.0.0.0/8,
    /// localhost, [::1]) are always plain HTTP.
    pub insecure: Vec<String>,
}

impl RegistryConfig {
    /// Whether `registry` (host[:port]) is spoken to over plain HTTP.
    pub fn is_plain_http(&self, registry: &str) -> bool {
        is_loopback_registry(registry) || self.insecure.iter().any(|r| r.trim().eq_ignore_ascii_case(registry))
    }
}

/// The result of [`Registry::pull_wasm`].
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
    /// True when the registry was unreachable and the last successful pull of this reference
    /// was used instead.
    pub from_cache: bool,
}

/// A registry client: wraps [`oci_client::Client`] plus [`RegistryConfig`].
#[derive(Clone)]
pub struct Registry {
    cfg: RegistryConfig,
    credentials: Credentials,
    https: Client,
    http: Client,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("cfg", &self.cfg).field("credentials", &self.credentials).finish()
    }
}

/// What a failing client call was doing, to tell "image not found" from a missing blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Manifest,
    Blob,
    Push,
}

/// The config blob of the CNCF Wasm OCI artifact layout.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfig<'a> {
    architecture: &'a str,
    os: &'a str,
    layer_digests: Vec<String>,
}

impl Registry {
    /// A registry client with the given settings.
    pub fn new(cfg: RegistryConfig) -> Self {
        // oci-client's reqwest is built with `rustls-no-provider`, so no rustls CryptoProvider
        // is chosen at compile time and building an HTTPS client without one panics. Install
        // ring as the process default; if another component installed one already, keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            https: build_client(ClientProtocol::Https),
            http: build_client(ClientProtocol::Http),
            cfg,
            credentials: Credentials::default(),
        }
    }

    /// The same client, presenting `credentials` to the registries they name (basic or bearer;
    /// oci-client exchanges basic credentials for a bearer token when the registry asks).
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// The settings this client was built with.
    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Pushes a Wasm module as an OCI artifact in the CNCF Wasm OCI artifact layout: config
    /// media type `application/vnd.wasm.config.v0+json` (config JSON like
    /// `{"architecture":"wasm","os":"wasip1","layerDigests":["sha256:.."]}`), one layer
    /// `application/wasm`, OCI image manifest. Returns the manifest digest ("sha256:..").
    /// The config's `os` is `wasip2` for a component (see [`wasm_os`]), else `wasip1`.
    ///
    /// The reference must name a tag (or none, meaning `latest`), not a digest.
    pub async fn push_wasm(&self, reference: &str, wasm: &[u8]) -> Result<String, RegistryError> {
        let r = parse_reference(reference)?;
        if r.digest().is_some() {
            return Err(RegistryError::InvalidReference {
                reference: reference.to_owned(),
                reason: "a push needs a tag, not a digest".to_owned(),
            });
        }
        if !wasm.starts_with(WASM_MAGIC) {
            return Err(RegistryError::NotWasm {
                reference: reference.to_owned(),
                found: format!(
                    "{} bytes starting with {} instead of the wasm magic \\0asm",
                    wasm.len(),
                    describe_head(wasm)
                ),
            });
        }
        let other = |message: String| RegistryError::Registry { reference: reference.to_owned(), message };

        let layer_digest = sha256_digest(wasm);
        let config = serde_json::to_vec(&WasmConfig {
            architecture: "wasm",
            os: wasm_os(wasm),
            layer_digests: vec![layer_digest.clone()],
        })
        .map_err(|e| other(format!("cannot encode wasm config: {e}")))?;
        let config_digest = sha256_digest(&config);
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_owned()),
            config: OciDescriptor {
                media_type: WASM_CONFIG_MEDIA_TYPE.to_owned(),
                digest: config_digest.clone(),
                size: config.len() as i64,
                ..Default::default()
            },
            layers: vec![OciDescriptor {
                media_type: WASM_LAYER_MEDIA_TYPE.to_owned(),
                digest: layer_digest.clone(),
                size: wasm.len() as i64,
                ..Default::default()
            }],
            ..Default::default()
        };
        // Serialised once here so the digest returned is the digest of the bytes pushed.
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| other(format!("cannot encode manifest: {e}")))?;
        let manifest_digest = sha256_digest(&manifest_bytes);

        let client = self.client_for(&r);
        let auth = self.auth_for(&r);
        client.store_auth_if_needed(r.resolve_registry(), &auth).await;
        let map = |e| self.map_oci_error(reference, &r, Op::Push, e);
        for (data, digest) in [(wasm, &layer_digest), (&config[..], &config_digest)] {
            if client.blob_exists(&r, digest).await.map_err(map)? {
                tracing::debug!(reference, digest, "blob already in registry");
                continue;
            }
            client.push_blob(&r, bytes::Bytes::copy_from_slice(data), digest).await.map_err(map)?;
        }
        let content_type =
            header_value(OCI_IMAGE_MEDIA_TYPE).ok_or_else(|| other("cannot build content-type header".to_owned()))?;
        client.push_manifest_raw(&r, manifest_bytes, content_type).await.map_err(map)?;
        tracing::info!(reference, %manifest_digest, "pushed wasm module");
        Ok(manifest_digest)
    }

    /// Resolves `reference` (tag or digest) and stores the module's layer in `store`,
    /// digest-verified; skips the download if the blob is already present.
    ///
    /// Accepts the CNCF Wasm artifact layout (layer `application/wasm`), the older wasm-to-oci
    /// layout (layer `application/vnd.wasm.content.layer.v1+wasm`), and single-layer images
    /// whose only layer, whatever its media type, is a raw Wasm binary; anything whose layer
    /// does not start with `\0asm` is refused with [`RegistryError::NotWasm`]. An image index
    /// is followed to its wasm/wasip1 (or wasm/wasi) platform entry.
    ///
    /// Records reference -> (manifest digest, wasm digest) in `<store root>/refs.json`, so that
    /// when the registry is unreachable (connection refused, timeout; not 404 or auth errors)
    /// and the reference was pulled before, the cached entry is returned with
    /// `from_cache: true`.
    pub async fn pull_wasm(&self, reference: &str, store: &BlobStore) -> Result<PulledWasm, RegistryError> {
        let r = parse_reference(reference)?;
        let key = r.whole();
        let refs = RefsFile::in_store(store.root());
        match self.pull_remote(reference, &r, store).await {
            Ok(pulled) => {
                let entry = RefEntry {
                    manifest_digest: pulled.manifest_digest.clone(),
                    wasm_digest: pulled.wasm_digest.clone(),
                };
                let recorded = tokio::task::spawn_blocking(move || refs.record(&key, entry)).await;
                match recorded {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(reference, error = %e, "cannot record pulled reference")
                    }
                    Err(e) => {
                        tracing::warn!(reference, error = %e, "cannot record pulled reference")
                    }
                }
                Ok(pulled)
            }
            Err(err @ RegistryError::Unreachable { .. }) => {
                let lookup_key = key.clone();
                let cached = tokio::task::spawn_blocking(move || refs.get(&lookup_key))
                    .await
                    .ok()
                    .and_then(|r| {
                        r.map_err(|e| tracing::warn!(reference, error = %e, "cannot read reference cache")).ok()
                    })
                    .flatten();
                let Some(entry) = cached else {
                    return Err(err);
                };
                let Ok(path) = store.path(&entry.wasm_digest) else {
                    return Err(err);
                };
                if !path.is_file() {
                    return Err(err);
                }
                tracing::warn!(
                    reference,
                    error = %err,
                    wasm_digest = %entry.wasm_digest,
                    "registry unreachable, using the module from the last pull"
                );
                Ok(PulledWasm {
                    reference: reference.to_owned(),
                    manifest_digest: entry.manifest_digest,
                    wasm_digest: entry.wasm_digest,
                    path,
                    from_cache: true,
                })
            }
            Err(err) => Err(err),
        }
    }

    async fn pull_remote(
        &self,
        reference: &str,
        r: &Reference,
        store: &BlobStore,
    ) -> Result<PulledWasm, RegistryError> {
        let client = self.client_for(r);
        let auth = self.auth_for(r);
        client.store_auth_if_needed(r.resolve_registry(), &auth).await;
        let not_wasm = |found: String| RegistryError::NotWasm { reference: reference.to_owned(), found };
        let other = |message: String| RegistryError::Registry { reference: reference.to_owned(), message };
        let store_err = |source: StoreError| match source {
            StoreError::DigestMismatch { expected, actual } => {
                RegistryError::DigestMismatch { reference: reference.to_owned(), expected, actual }
            }
            source => RegistryError::Store { reference: reference.to_owned(), source },
        };

        let (manifest, digest) =
            client.pull_manifest(r, &auth).await.map_err(|e| self.map_oci_error(reference, r, Op::Manifest, e))?;
        let (manifest, manifest_digest) = match manifest {
            OciManifest::Image(m) => (m, digest),
            OciManifest::ImageIndex(index) => {
                let entry = select_platform(&index.manifests).ok_or_else(|| {
                    not_wasm(format!(
                        "image index has no wasm/wasip1, wasm/wasip2 or wasm/wasi entry (platforms: [{}])",
                        describe_platforms(&index.manifests)
                    ))
                })?;
                crate::store::validate_digest(&entry.digest)
                    .map_err(|e| other(format!("image index entry has an unusable digest: {e}")))?;
                tracing::debug!(reference, digest = %entry.digest, "following image index");
                let child = r.clone_with_digest(entry.digest.clone());
                let (m, d) = client
                    .pull_manifest(&child, &auth)
                    .await
                    .map_err(|e| self.map_oci_error(reference, r, Op::Manifest, e))?;
                match m {
                    OciManifest::Image(m) => (m, d),
                    OciManifest::ImageIndex(_) => {
                        return Err(not_wasm(format!("image index entry {} is itself an image index", entry.digest)));
                    }
                }
            }
        };

        let layer = select_layer(&manifest).map_err(not_wasm)?;
        let wasm_digest = layer.digest.clone();
        store.path(&wasm_digest).map_err(|e| other(format!("wasm layer has an unusable digest: {e}")))?;
        let limit = match u64::try_from(layer.size) {
            Ok(size) if size <= MAX_MODULE_BYTES => size,
            _ => {
                return Err(RegistryError::TooLarge {
                    reference: reference.to_owned(),
                    digest: wasm_digest,
                    limit: MAX_MODULE_BYTES,
                });
            }
        };
        let refuse_head = |head: &[u8]| {
            not_wasm(format!(
                "layer {} ({}) starts with {} instead of the wasm magic \\0asm; {}",
                wasm_digest,
                layer.media_type,
                describe_head(head),
                describe_manifest(&manifest)
            ))
        };

        if store.contains(&wasm_digest) {
            // Content-addressed: the stored blob was verified when it was written. The store
            // is shared with container layers, so check it really is a module.
            let head = store.read_head(&wasm_digest, 4).map_err(store_err)?;
            if head != WASM_MAGIC {
                return Err(refuse_head(&head));
            }
            tracing::debug!(reference, %wasm_digest, "wasm blob already present, skipping download");
            return Ok(PulledWasm {
                reference: reference.to_owned(),
                manifest_digest,
                path: store.path(&wasm_digest).map_err(store_err)?,
                wasm_digest,
                from_cache: false,
            });
        }

        let too_large =
            || RegistryError::TooLarge { reference: reference.to_owned(), digest: wasm_digest.clone(), limit };
        let mut stream =
            client.pull_blob_stream(r, layer).await.map_err(|e| self.map_oci_error(reference, r, Op::Blob, e))?;
        if stream.content_length.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let mut ingest = store.begin_ingest(&wasm_digest).await.map_err(store_err)?;
        let mut head = Vec::with_capacity(WASM_MAGIC.len());
        loop {
            let next = match tokio::time::timeout(READ_TIMEOUT, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    return Err(RegistryError::Unreachable {
                        registry: r.resolve_registry().to_owned(),
                        reference: reference.to_owned(),
                        reason: format!("no data for {} s while downloading {wasm_digest}", READ_TIMEOUT.as_secs()),
                    });
                }
            };
            match next {
                None => break,
                Some(Ok(chunk)) => {
                    if ingest.bytes_written() + chunk.len() as u64 > limit {
                        return Err(too_large());
                    }
                    let need = WASM_MAGIC.len().saturating_sub(head.len());
                    head.extend_from_slice(&chunk[..need.min(chunk.len())]);
                    ingest.write(&chunk).await.map_err(store_err)?;
                }
                // oci-client verifies the digest itself and reports a mismatch as the stream's
                // last item; we hash independently below and report it with both digests.
                Some(Err(e)) if is_digest_verification(&e) => break,
                Some(Err(e)) => return Err(self.map_io_error(reference, r, e)),
            }
        }
        let actual = ingest.digest_so_far();
        if actual != wasm_digest {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_owned(),
                expected: wasm_digest,
                actual,
            });
        }
        if head != WASM_MAGIC {
            return Err(refuse_head(&head));
        }
        let path = ingest.commit().await.map_err(store_err)?;
        tracing::info!(reference, %manifest_digest, %wasm_digest, "pulled wasm module");
        Ok(PulledWasm { reference: reference.to_owned(), manifest_digest, wasm_digest, path, from_cache: false })
    }

    pub(crate) fn client_for(&self, r: &Reference) -> &Client {
        if self.cfg.is_plain_http(r.registry()) || self.cfg.is_plain_http(r.resolve_registry()) {
            &self.http
        } else {
            &self.https
        }
    }

    /// Credentials for the registry of `r`: the configured ones for its host, else anonymous.
    pub(crate) fn auth_for(&self, r: &Reference) -> RegistryAuth {
        self.credentials.auth_for(r.registry(), r.resolve_registry())
    }

    pub(crate) fn map_oci_error(
        &self,
        reference: &str,
        r: &Reference,
        op: Op,
        e: OciDistributionError,
    ) -> RegistryError {
        use OciDistributionError as E;
        let registry = r.resolve_registry().to_owned();
        let reference = reference.to_owned();
        let unauthorized = |reason: String| RegistryError::Unauthorized {
            registry: registry.clone(),
            reference: reference.clone(),
            reason,
        };
        let not_found = || RegistryError::NotFound { reference: reference.clone() };
        match &e {
            E::RegistryError { envelope, .. } => {
                let codes = || envelope.errors.iter().map(|err| &err.code);
                if codes().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    return unauthorized(envelope.to_string());
                }
                if op == Op::Manifest
                    && codes().any(|c| {
                        matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound)
                    })
                {
                    return not_found();
                }
            }
            E::ServerError { code: 404, .. } if op == Op::Manifest => return not_found(),
            E::ServerError { code: 401 | 403, .. } | E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => {
                return unauthorized(error_chain(&e));
            }
            E::DigestError(DigestError::VerificationError { expected, actual }) => {
                return RegistryError::DigestMismatch { reference, expected: expected.clone(), actual: actual.clone() };
            }
            _ => {}
        }
        if is_unreachable(&e) {
            return RegistryError::Unreachable { registry, reference, reason: error_chain(&e) };
        }
        RegistryError::Registry { reference, message: error_chain(&e) }
    }

    pub(crate) fn map_io_error(&self, reference: &str, r: &Reference, e: io::Error) -> RegistryError {
        if is_unreachable(&e) {
            RegistryError::Unreachable {
                registry: r.resolve_registry().to_owned(),
                reference: reference.to_owned(),
                reason: error_chain(&e),
            }
        } else {
            RegistryError::Registry { reference: reference.to_owned(), message: error_chain(&e) }
        }
    }
}

fn build_client(protocol: ClientProtocol) -> Client {
    Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(|entries| select_platform(entries).map(|e| e.digest.clone()))),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: USER_AGENT,
        ..Default::default()
    })
}

pub(crate) fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    reference
        .parse::<Reference>()
        .map_err(|e| RegistryError::InvalidReference { reference: reference.to_owned(), reason: e.to_string() })
}

/// Builds an HTTP header value without naming the `http` crate (oci-client does not re-export
/// it); the type is inferred from the call site.
pub(crate) fn header_value<H: std::str::FromStr>(s: &str) -> Option<H> {
    s.parse().ok()
}

/// Whether `registry` (host[:port]) is a loopback host: 127.0.0.0/8, localhost, [::1].
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((host, _)) => host,
            None => return false,
        }
    } else {
        match registry.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => registry,
        }
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The config `os` for a Wasm binary that starts with the wasm magic: `wasip2` for a
/// component (version/layer `0d 00 01 00`), `wasip1` for a core module or anything else.
fn wasm_os(wasm: &[u8]) -> &'static str {
    if wasm.get(WASM_MAGIC.len()..).is_some_and(|rest| rest.starts_with(COMPONENT_VERSION_LAYER)) {
        "wasip2"
    } else {
        "wasip1"
    }
}

/// Picks the Wasm entry of an image index: wasm/wasip1 first, then wasm/wasip2, then wasm/wasi.
fn select_platform(entries: &[ImageIndexEntry]) -> Option<&ImageIndexEntry> {
    ["wasip1", "wasip2", "wasi"].into_iter().find_map(|os| {
        entries.iter().find(|e| {
            e.platform.as_ref().is_some_and(|p| p.architecture.to_string() == "wasm" && p.os.to_string() == os)
        })
    })
}

fn describe_platforms(entries: &[ImageIndexEntry]) -> String {
    entries
        .iter()
        .map(|e| match &e.platform {
            Some(p) => format!("{}/{}", p.os, p.architecture),
            None => "unspecified".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_manifest(m: &OciImageManifest) -> String {
    format!(
        "config media type {}, layer media types [{}]",
        m.config.media_type,
        m.layers.iter().map(|l| l.media_type.as_str()).collect::<Vec<_>>().join(", ")
    )
}

fn describe_head(head: &[u8]) -> String {
    if head.is_empty() {
        "nothing (empty)".to_owned()
    } else {
        format!("{:?}", String::from_utf8_lossy(&head[..head.len().min(4)]))
    }
}

/// The layer holding the module: the single layer typed as Wasm, else the only layer of a
/// single-layer image (its content is checked for the Wasm magic later). The error says
/// what was found.
fn select_layer(m: &OciImageManifest) -> Result<&OciDescriptor, String> {
    let wasm: Vec<&OciDescriptor> = m
        .layers
        .iter()
        .filter(|l| l.media_type == WASM_LAYER_MEDIA_TYPE || l.media_type == LEGACY_WASM_LAYER_MEDIA_TYPE)
        .collect();
    match (wasm.as_slice(), m.layers.as_slice()) {
        ([layer], _) => Ok(layer),
        ([], [only]) => Ok(only),
        ([], []) => Err(format!("manifest has no layers; {}", describe_manifest(m))),
        ([], _) => Err(format!("no wasm layer; {}", describe_manifest(m))),
        (several, _) => Err(format!("{} wasm layers where one is expected; {}", several.len(), describe_manifest(m))),
    }
}

pub(crate) fn is_digest_verification(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<DigestError>())
        .is_some_and(|d| matches!(d, DigestError::VerificationError { .. }))
}

/// Whether an error chain bottoms out in a network failure that means "registry not
/// reachable" (connection refused or reset, timeout, no route, name resolution) rather than
/// "registry said no". A TLS failure (bad certificate, handshake) is a misconfiguration or an
/// impostor, not an outage, so it never counts even though reqwest files it under "connect".
fn is_unreachable(e: &(dyn StdError + 'static)) -> bool {
    let mut network = false;
    // io::Error::source() and `#[error(transparent)]` skip their own payload, so payloads are
    // pushed explicitly as well as sources.
    let mut stack: Vec<&(dyn StdError + 'static)> = vec![e];
    let mut seen = 0;
    while let Some(err) = stack.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        if err.downcast_ref::<rustls::Error>().is_some() {
            return false;
        }
        if let Some(io_err) = err.downcast_ref::<io::Error>() {
            use io::ErrorKind as K;
            network |= matches!(
                io_err.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::TimedOut
                    | K::HostUnreachable
                    | K::NetworkUnreachable
            );
            if let Some(inner) = io_err.get_ref() {
                stack.push(inner);
            }
        }
        match err.downcast_ref::<OciDistributionError>() {
            Some(OciDistributionError::RequestError(re)) => {
                network |= re.is_connect() || re.is_timeout();
            }
            Some(OciDistributionError::IoError(io_err)) => stack.push(io_err),
            _ => {}
        }
        if let Some(src) = err.source() {
            stack.push(src);
        }
    }
    network
}

/// `error: source: source...`, skipping sources whose text the previous level already shows.
pub(crate) fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let s = src.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = src.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::errors::{OciEnvelope, OciError};
    use oci_client::manifest::{OciImageIndex, Platform};

    fn descriptor(media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.to_owned(),
            digest: sha256_digest(media_type.as_bytes()),
            size: 4,
            ..Default::default()
        }
    }

    fn manifest(config: &str, layers: &[&str]) -> OciImageManifest {
        OciImageManifest {
            config: descriptor(config),
            layers: layers.iter().map(|l| descriptor(l)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn loopback_and_insecure() {
        for r in ["127.0.0.1:5000", "127.1.2.3", "localhost", "LOCALHOST:5000", "[::1]:5000", "[::1]"] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in
            ["registry.example.com", "10.0.0.1:5000", "128.0.0.1", "[::2]:5000", "localhost.example.com", "[::1", ""]
        {
            assert!(!is_loopback_registry(r), "{r}");
        }
        let cfg = RegistryConfig { insecure: vec!["registry.lan:5000".to_owned()] };
        assert!(cfg.is_plain_http("registry.lan:5000"));
        assert!(cfg.is_plain_http("127.0.0.1:5000"));
        assert!(!cfg.is_plain_http("registry.lan"));
        assert!(!RegistryConfig::default().is_plain_http("ghcr.io"));
    }

    #[test]
    fn invalid_reference_is_named() {
        for bad in ["", "a b", "x@sha256:abc", "x:tag:tag", "/x"] {
            let err = parse_reference(bad).unwrap_err();
            assert!(matches!(err, RegistryError::InvalidReference { .. }), "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn layer_selection() {
        let m = manifest(WASM_CONFIG_MEDIA_TYPE, &[WASM_LAYER_MEDIA_TYPE]);
        assert_eq!(select_layer(&m).unwrap().media_type, WASM_LAYER_MEDIA_TYPE);

        let m = manifest("application/vnd.wasm.config.v1+json", &[LEGACY_WASM_LAYER_MEDIA_TYPE]);
        assert_eq!(select_layer(&m).unwrap().media_type, LEGACY_WASM_LAYER_MEDIA_TYPE);

        // A single layer of any type is a candidate; its bytes decide.
        let m = manifest("application/vnd.oci.image.config.v1+json", &["application/vnd.oci.image.layer.v1.tar"]);
        assert!(select_layer(&m).is_ok());

        // The wasm-typed layer wins among several.
        let m = manifest(WASM_CONFIG_MEDIA_TYPE, &["application/json", WASM_LAYER_MEDIA_TYPE]);
        assert_eq!(select_layer(&m).unwrap().media_type, WASM_LAYER_MEDIA_TYPE);

        let m = manifest(
            "application/vnd.oci.image.config.v1+json",
            &["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+gzip"],
        );
        let err = select_layer(&m).unwrap_err();
        assert!(err.contains("no wasm layer"), "{err}");
        assert!(err.contains("application/vnd.oci.image.layer.v1.tar+gzip"), "{err}");
        assert!(err.contains("application/vnd.oci.image.config.v1+json"), "{err}");

        let m = manifest(WASM_CONFIG_MEDIA_TYPE, &[WASM_LAYER_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE]);
        assert!(select_layer(&m).unwrap_err().contains("2 wasm layers"));

        let m = manifest(WASM_CONFIG_MEDIA_TYPE, &[]);
        assert!(select_layer(&m).unwrap_err().contains("no layers"));
    }

    #[test]
    fn index_platform_selection() {
        let entry = |os: &str, arch: &str, n: u8| ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.to_owned(),
            digest: format!("sha256:{}", hex::encode([n; 32])),
            size: 1,
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
        };
        let idx = OciImageIndex {
            schema_version: 2,
            media_type: None,
            manifests: vec![entry("linux", "amd64", 1), entry("wasi", "wasm", 2), entry("wasip1", "wasm", 3)],
            artifact_type: None,
            annotations: None,
        };
        assert_eq!(select_platform(&idx.manifests).unwrap().digest, idx.manifests[2].digest);
        assert_eq!(select_platform(&idx.manifests[..2]).unwrap().digest, idx.manifests[1].digest);
        assert!(select_platform(&idx.manifests[..1]).is_none());
        assert_eq!(describe_platforms(&idx.manifests[..1]), "linux/amd64");
    }

    #[test]
    fn error_mapping() {
        let reg = Registry::new(RegistryConfig::default());
        let r: Reference = "127.0.0.1:5000/x:v1".parse().unwrap();
        let envelope = |code: OciErrorCode| OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError { code, message: "m".to_owned(), detail: serde_json::Value::Null }],
            },
            url: "http://127.0.0.1:5000/v2/x/manifests/v1".to_owned(),
        };

        let err = reg.map_oci_error("127.0.0.1:5000/x:v1", &r, Op::Manifest, envelope(OciErrorCode::ManifestUnknown));
        assert!(matches!(err, RegistryError::NotFound { .. }));
        assert_eq!(err.to_string(), "image 127.0.0.1:5000/x:v1 not found in registry");
        let err = reg.map_oci_error("127.0.0.1:5000/x:v1", &r, Op::Manifest, envelope(OciErrorCode::NameUnknown));
        assert!(matches!(err, RegistryError::NotFound { .. }));
        // A missing blob is not a missing image.
        let err = reg.map_oci_error("127.0.0.1:5000/x:v1", &r, Op::Blob, envelope(OciErrorCode::BlobUnknown));
        assert!(matches!(err, RegistryError::Registry { .. }));
        let err = reg.map_oci_error("127.0.0.1:5000/x:v1", &r, Op::Manifest, envelope(OciErrorCode::Denied));
        assert!(matches!(err, RegistryError::Unauthorized { .. }));

        let refused = OciDistributionError::IoError(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"));
        let err = reg.map_oci_error("127.0.0.1:5000/x:v1", &r, Op::Manifest, refused);
        assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");

        let wrapped = io::Error::other(io::Error::new(io::ErrorKind::TimedOut, "slow"));
        assert!(is_unreachable(&wrapped));
        assert!(!is_unreachable(&io::Error::other("nope")));
        // A certificate problem is not an outage, even if the socket also failed.
        let tls = io::Error::new(
            io::ErrorKind::ConnectionReset,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
        );
        assert!(!is_unreachable(&tls));
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

        let config = |wasm: &[u8]| {
            serde_json::to_string(&WasmConfig {
                architecture: "wasm",
                os: wasm_os(wasm),
                layer_digests: vec!["sha256:ab".to_owned()],
            })
            .unwrap()
        };
        assert_eq!(
            config(b"\0asm\x0d\x00\x01\x00"),
            r#"{"architecture":"wasm","os":"wasip2","layerDigests":["sha256:ab"]}"#
        );
        assert!(config(b"\0asm\x01\x00\x00\x00").contains(r#""os":"wasip1""#));
    }

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let reg = Registry::new(RegistryConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let pull = reg.pull_wasm("127.0.0.1:1/x:v1", &store);
        assert_send(&pull);
        let push = reg.push_wasm("127.0.0.1:1/x:v1", b"\0asm");
        assert_send(&push);
    }
}
