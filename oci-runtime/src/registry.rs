//! Talking to OCI registries: the client (plain HTTP for loopback and `--insecure`
//! registries, credentials per host, timeouts), the mapping of its errors onto
//! [`RegistryError`], and pushing Wasm modules and agent binaries as OCI artifacts. Pulls of
//! every artifact kind go through [`crate::ImageStore`], which uses this client.
//!
//! Credentials are looked up per session (one pull, one push), as Docker does: the
//! registry's credential helper if the config names one (`credHelpers`, then `credsStore`),
//! else its inline `auths` entry, else anonymous. Docker config files given with
//! [`Registry::with_docker_config`] are read again at each lookup, so a `flotilla login`
//! reaches a running agent without a restart.

use std::error::Error as StdError;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::MediaType;

use crate::image::{
    AgentArtifact, AgentError, Credential, CredentialHelper, Credentials, DockerConfigFile, Platform, WasmArtifact,
    server_address,
};
use crate::store::sha256_digest;

mod login;
mod manifest;
pub(crate) use manifest::ManifestError;

/// Config media type of the CNCF Wasm OCI artifact layout.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Layer media type of the CNCF Wasm OCI artifact layout.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Layer media type of the older wasm-to-oci layout.
pub const LEGACY_WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// Largest Wasm module accepted from a registry.
pub const MAX_MODULE_BYTES: u64 = 256 * 1024 * 1024;

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
    /// The binaries given for an agent artifact are unusable (not a Linux executable, built
    /// for another platform than the one given, a platform twice).
    #[error("cannot push agent binaries as {reference}: {source}")]
    BadAgent {
        /// The reference as given.
        reference: String,
        /// What is wrong.
        #[source]
        source: AgentError,
    },
    /// The credentials for a registry could not be found: a Docker config that does not
    /// parse, a credential helper that fails or answers nonsense.
    #[error("credentials for registry {registry}: {reason}")]
    Credentials {
        /// Registry host[:port].
        registry: String,
        /// What failed.
        reason: String,
    },
    /// A login was refused, or could not be checked.
    #[error("cannot log in to registry {registry}: {reason}")]
    Login {
        /// Registry host[:port].
        registry: String,
        /// Why.
        reason: String,
    },
    /// Any other failure reported by the registry or the client.
    #[error("registry error for image {reference}: {message}")]
    Registry {
        /// The reference as given.
        reference: String,
        /// The underlying error chain.
        message: String,
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

/// Told how a push advances, for a progress display: the bytes of all its blobs once, then
/// each blob as it is sent (or found in the registry already).
pub trait PushProgress: Send + Sync {
    /// The push has `blobs` blobs of `bytes` bytes in all.
    fn start(&self, blobs: usize, bytes: u64);
    /// One blob of `bytes` bytes is in the registry.
    fn blob_done(&self, bytes: u64);
}

/// A registry client: wraps [`oci_client::Client`] plus [`RegistryConfig`].
#[derive(Clone)]
pub struct Registry {
    cfg: RegistryConfig,
    credentials: Credentials,
    /// Docker config files read at each lookup, after `credentials`.
    docker_configs: Vec<PathBuf>,
    progress: Option<Arc<dyn PushProgress>>,
    https: Client,
    http: Client,
    /// Manifests and indexes are read through this, with a bound (see [`manifest`]).
    manifests: Arc<manifest::ManifestReader>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("cfg", &self.cfg)
            .field("credentials", &self.credentials)
            .field("docker_configs", &self.docker_configs)
            .finish_non_exhaustive()
    }
}

/// What a failing client call was doing, to tell "image not found" from a missing blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Manifest,
    Blob,
    Push,
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
            manifests: Arc::new(manifest::ManifestReader::new()),
            cfg,
            credentials: Credentials::default(),
            docker_configs: Vec::new(),
            progress: None,
        }
    }

    /// The same client, also reading credentials from the Docker config file at `path`
    /// (`auths`, `credsStore`, `credHelpers`) at each lookup. A missing file holds nothing;
    /// one that does not parse fails the lookup. Credentials given with
    /// [`Registry::with_credentials`] and earlier files win, registry by registry.
    pub fn with_docker_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.docker_configs.push(path.into());
        self
    }

    /// The same client, telling `progress` how its pushes advance.
    pub fn with_progress(mut self, progress: Arc<dyn PushProgress>) -> Self {
        self.progress = Some(progress);
        self
    }

    pub(crate) fn progress_start(&self, blobs: usize, bytes: u64) {
        if let Some(p) = &self.progress {
            p.start(blobs, bytes);
        }
    }

    pub(crate) fn progress_blob(&self, bytes: u64) {
        if let Some(p) = &self.progress {
            p.blob_done(bytes);
        }
    }

    /// The credentials this client presents to `registry` (host[:port]): from its credential
    /// helper if one is configured for it and holds some, else the inline ones, else `None`
    /// (anonymous).
    pub async fn credential_for(&self, registry: &str) -> Result<Option<Credential>, RegistryError> {
        let failed = |reason: String| RegistryError::Credentials { registry: registry.to_owned(), reason };
        let mut credentials = self.credentials.clone();
        for path in &self.docker_configs {
            let file = DockerConfigFile::load(path).and_then(|f| f.credentials()).map_err(|e| failed(e.to_string()))?;
            credentials.merge(file);
        }
        if let Some(name) = credentials.helper_for(registry) {
            let helper = CredentialHelper::named(name).map_err(|e| failed(e.to_string()))?;
            if let Some(found) = helper.get(&server_address(registry)).await.map_err(|e| failed(e.to_string()))? {
                return Ok(Some(found));
            }
        }
        Ok(credentials.get(registry).cloned())
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

    /// Pushes a Wasm module as an OCI artifact in the CNCF Wasm OCI artifact layout
    /// ([`WasmArtifact`]: the same bytes `flotilla image save` writes into an archive).
    /// Returns the manifest digest ("sha256:..").
    ///
    /// The reference must name a tag (or none, meaning `latest`), not a digest.
    pub async fn push_wasm(&self, reference: &str, wasm: &[u8]) -> Result<String, RegistryError> {
        let r = parse_push_reference(reference)?;
        let artifact = WasmArtifact::build(wasm)
            .map_err(|e| RegistryError::NotWasm { reference: reference.to_owned(), found: e.to_string() })?;
        let WasmArtifact { config, config_digest, layer_digest, manifest, manifest_digest, .. } = artifact;
        let blobs = [(wasm, layer_digest.as_str()), (&config[..], config_digest.as_str())];
        self.push_documents(reference, &r, &blobs, vec![(manifest, MediaType::ImageManifest)]).await?;
        tracing::info!(reference, %manifest_digest, "pushed wasm module");
        Ok(manifest_digest)
    }

    /// Pushes Flotilla agent binaries, one per platform, as one artifact ([`AgentArtifact`]:
    /// an OCI image index with one manifest per platform, each with the raw binary as its one
    /// layer), annotated with `version` if given. Returns the index digest ("sha256:..").
    ///
    /// Each binary must be a Linux ELF executable for the OS and architecture it is given
    /// for, and no platform may come twice ([`RegistryError::BadAgent`] says which is not).
    /// The reference must name a tag (or none, meaning `latest`), not a digest.
    pub async fn push_agent(
        &self,
        reference: &str,
        binaries: &[(Platform, &[u8])],
        version: Option<&str>,
    ) -> Result<String, RegistryError> {
        let r = parse_push_reference(reference)?;
        let artifact = AgentArtifact::build(binaries, version)
            .map_err(|source| RegistryError::BadAgent { reference: reference.to_owned(), source })?;
        let mut blobs = Vec::with_capacity(2 * artifact.manifests.len());
        let mut manifests = Vec::with_capacity(artifact.manifests.len() + 1);
        for m in &artifact.manifests {
            // `build` refuses duplicates, so each platform names one binary.
            let Some((_, binary)) = binaries.iter().find(|(p, _)| *p == m.platform) else { continue };
            blobs.push((*binary, m.binary_digest.as_str()));
            blobs.push((&m.config[..], m.config_digest.as_str()));
            manifests.push((m.manifest.clone(), MediaType::ImageManifest));
        }
        manifests.push((artifact.index.clone(), MediaType::ImageIndex));
        self.push_documents(reference, &r, &blobs, manifests).await?;
        tracing::info!(
            reference,
            index_digest = %artifact.index_digest,
            platforms = artifact.manifests.len(),
            version,
            "pushed agent binaries"
        );
        Ok(artifact.index_digest)
    }

    /// Pushes the `(content, digest)` blobs the registry does not have yet, then the
    /// `(bytes, media type)` manifests in order: each by its digest, except the last, which
    /// `r` tags. A manifest's blobs (and, for an index, its manifests) must come before it.
    async fn push_documents(
        &self,
        reference: &str,
        r: &Reference,
        blobs: &[(&[u8], &str)],
        manifests: Vec<(Vec<u8>, MediaType)>,
    ) -> Result<(), RegistryError> {
        let client = self.client_for(r);
        let auth = self.auth_for(r).await?;
        client.store_auth_if_needed(r.resolve_registry(), &auth).await;
        let map = |e| self.map_oci_error(reference, r, Op::Push, e);
        self.progress_start(blobs.len(), blobs.iter().map(|(data, _)| data.len() as u64).sum());
        for (data, digest) in blobs {
            if client.blob_exists(r, digest).await.map_err(map)? {
                tracing::debug!(reference, digest, "blob already in registry");
            } else {
                client.push_blob(r, bytes::Bytes::copy_from_slice(data), digest).await.map_err(map)?;
            }
            self.progress_blob(data.len() as u64);
        }
        let count = manifests.len();
        for (i, (bytes, media_type)) in manifests.into_iter().enumerate() {
            let target = if i + 1 == count { r.clone() } else { r.clone_with_digest(sha256_digest(&bytes)) };
            let content_type = header_value(media_type.as_ref()).ok_or_else(|| RegistryError::Registry {
                reference: reference.to_owned(),
                message: format!("cannot build a content-type header of {media_type}"),
            })?;
            client.push_manifest_raw(&target, bytes, content_type).await.map_err(map)?;
        }
        Ok(())
    }

    pub(crate) fn client_for(&self, r: &Reference) -> &Client {
        if self.cfg.is_plain_http(r.registry()) || self.cfg.is_plain_http(r.resolve_registry()) {
            &self.http
        } else {
            &self.https
        }
    }

    /// The manifest or index `r` names, reading at most `limit` bytes of it, with the
    /// registry's `Docker-Content-Digest` if it sent one.
    pub(crate) async fn manifest_bounded(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        accepted: &[&str],
        limit: u64,
    ) -> Result<(Vec<u8>, Option<String>), ManifestError> {
        let plain = self.cfg.is_plain_http(r.registry()) || self.cfg.is_plain_http(r.resolve_registry());
        let scheme = if plain { "http" } else { "https" };
        self.manifests.get(self.client_for(r), scheme, r, auth, accepted, limit).await
    }

    /// Credentials for the registry of `r` (see [`Registry::credential_for`]).
    pub(crate) async fn auth_for(&self, r: &Reference) -> Result<RegistryAuth, RegistryError> {
        let found = match self.credential_for(r.registry()).await? {
            Some(c) => Some(c),
            None if r.resolve_registry() != r.registry() => self.credential_for(r.resolve_registry()).await?,
            None => None,
        };
        Ok(match found {
            Some(Credential::Basic { username, password }) => RegistryAuth::Basic(username, password),
            Some(Credential::Bearer(token)) => RegistryAuth::Bearer(token),
            None => RegistryAuth::Anonymous,
        })
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
            // oci-client reports some refusals (a blob's HEAD before a push) as the plain
            // HTTP status of its request.
            E::RequestError(req) if req.status().is_some_and(|s| matches!(s.as_u16(), 401 | 403)) => {
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
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: USER_AGENT,
        ..Default::default()
    })
}

/// [`parse_reference`] of a reference to push to: it must name a tag (or none), not a digest.
fn parse_push_reference(reference: &str) -> Result<Reference, RegistryError> {
    let r = parse_reference(reference)?;
    if r.digest().is_some() {
        return Err(RegistryError::InvalidReference {
            reference: reference.to_owned(),
            reason: "a push needs a tag, not a digest".to_owned(),
        });
    }
    Ok(r)
}

pub(crate) fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidReference { reference: reference.to_owned(), reason };
    let parsed = reference.parse::<Reference>().map_err(|e| invalid(e.to_string()))?;
    // The normalised form is the artifact index's key, so it must name the same thing when
    // read again. It does not when an upper-case first component ("Ux/app") is taken for a
    // registry host but printed under docker.io (found by the `oci_json` fuzz target).
    let whole = parsed.whole();
    match whole.parse::<Reference>() {
        Ok(again) if again.whole() == whole => Ok(parsed),
        _ => Err(invalid(format!("ambiguous: it normalises to {whole:?}, which names something else"))),
    }
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
        // "Ux/arm6441v/v8": the fuzz target's find, a reference whose normal form reads back as
        // another.
        for bad in ["", "a b", "x@sha256:abc", "x:tag:tag", "/x", "Ux/arm6441v/v8"] {
            let err = parse_reference(bad).unwrap_err();
            assert!(matches!(err, RegistryError::InvalidReference { .. }), "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
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
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let reg = Registry::new(RegistryConfig::default());
        let push = reg.push_wasm("127.0.0.1:1/x:v1", b"\0asm");
        assert_send(&push);
        let binaries = [(Platform::host(), &b"\x7fELF"[..])];
        assert_send(&reg.push_agent("127.0.0.1:1/x:v1", &binaries, Some("1")));
    }
}
