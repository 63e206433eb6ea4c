//! First start and every start after it: the hub's data dir, its cluster CA, its serving
//! certificate, the node join token and the admin client config. Created once, then loaded, so
//! a restarted hub keeps its identity and every agent keeps trusting it.
//!
//! Layout of the data dir:
//! ```text
//! hub.db            SQLite store
//! tls/ca.pem        cluster CA certificate
//! tls/ca.key        cluster CA key (0600)
//! tls/hub.pem       hub serving certificate (SAN flotilla-hub), reissued at every start
//! tls/hub.key
//! token             node join token FLT1::<ca fingerprint>::<secret> (0600)
//! admin.yaml        CLI config: hub address, CA, admin certificate and key (0600)
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::messages::ClientConfigFile;
use proto::token::JoinToken;
use rand::RngCore;
use tracing::info;
use transport::pki::{Ca, CertifiedKey, leaf_facts};

pub use crate::fsutil::WriteError;
use crate::fsutil::write_private;
use crate::sealed::ClusterKey;
use crate::store::{Store, StoreError};

pub const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
/// The cluster-wide record of the CA and join token on a shared store.
pub(crate) const IDENTITY_SECRET: &str = "cluster-identity";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("certificate authority in {path}: {source}")]
    Pki { path: PathBuf, source: transport::pki::PkiError },
    #[error("join token in {path} is unusable: {source}")]
    Token { path: PathBuf, source: proto::token::TokenError },
    #[error("join token in {path} is unusable: it pins a different certificate authority than tls/ca.pem")]
    TokenPinsOtherCa { path: PathBuf },
    #[error("cluster identity: the store's {IDENTITY_SECRET} record is unreadable: {0}")]
    SharedIdentityUnreadable(serde_json::Error),
    #[error(
        "cluster identity: {0} holds a different cluster CA than the shared store; move the data dir's tls/ and token aside to join this cluster"
    )]
    SharedIdentityConflict(PathBuf),
    #[error("cluster identity: {0}")]
    Store(#[from] StoreError),
    #[error("cluster key {path}: {source}")]
    ClusterKey { path: PathBuf, source: crate::sealed::SealError },
    #[error(
        "cluster identity: the shared store's CA key and token are sealed with a cluster key this hub does not have at {0}; copy the cluster key file from a hub of this cluster there (or pass --cluster-key-file)"
    )]
    NoClusterKey(PathBuf),
    #[error(
        "cluster identity: the store's {IDENTITY_SECRET} record does not open with the cluster key {path}: {source}"
    )]
    Unseal { path: PathBuf, source: crate::sealed::SealError },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BootstrapError + 'a {
    move |source| BootstrapError::Io { action, path: path.to_path_buf(), source }
}

/// Everything the hub loads from its data dir at start.
pub struct Identity {
    pub ca: Ca,
    pub server: CertifiedKey,
    pub token: JoinToken,
    pub admin_config_path: PathBuf,
    /// The certificate in `admin.yaml` (the hub records it as the first admin's).
    pub admin_cert_pem: String,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The cluster CA, made once per cluster: by a hub's first start on its own data dir, or by
/// the first hub on a shared store ([`share`]). This and [`new_token`] are the only places
/// that create them.
fn new_ca(path: &Path) -> Result<Ca, BootstrapError> {
    let ca = Ca::generate("flotilla cluster CA").map_err(|source| BootstrapError::Pki { path: path.into(), source })?;
    info!(fingerprint = %ca.fingerprint(), "created cluster certificate authority");
    Ok(ca)
}

/// A join token pinning `ca`, with a fresh secret.
fn new_token(ca: &Ca) -> JoinToken {
    JoinToken { ca_fingerprint: ca.fingerprint(), secret: random_hex(24) }
}

/// Where the CA and token live in a data dir.
struct Paths {
    tls: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    token: PathBuf,
}

impl Paths {
    fn of(data_dir: &Path) -> Paths {
        let tls = data_dir.join("tls");
        Paths { ca_cert: tls.join("ca.pem"), ca_key: tls.join("ca.key"), token: data_dir.join("token"), tls }
    }
}

/// The CA and join token as several hubs share them through the store.
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedIdentity {
    ca_cert_pem: String,
    ca_key_pem: String,
    token: String,
}

/// Where a hub looks for the cluster key without `--cluster-key-file`.
pub fn default_cluster_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster.key")
}

/// Reads the cluster key at `path`; `None` when there is no such file.
fn read_cluster_key(path: &Path) -> Result<Option<ClusterKey>, BootstrapError> {
    match fs::read(path) {
        Ok(material) => ClusterKey::from_material(&material)
            .map(Some)
            .map_err(|source| BootstrapError::ClusterKey { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Makes a new cluster key at `path` (0600).
fn create_cluster_key(path: &Path) -> Result<ClusterKey, BootstrapError> {
    let material = ClusterKey::generate_material()
        .map_err(|source| BootstrapError::ClusterKey { path: path.to_path_buf(), source })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    write_private(path, material.as_bytes())?;
    info!(
        path = %path.display(),
        "cluster key created: it seals configs and secrets in the store; every hub sharing a store needs a copy"
    );
    ClusterKey::from_material(material.as_bytes())
        .map_err(|source| BootstrapError::ClusterKey { path: path.to_path_buf(), source })
}

/// The cluster key at `path`, made there if absent.
pub fn cluster_key(path: &Path) -> Result<ClusterKey, BootstrapError> {
    match read_cluster_key(path)? {
        Some(key) => Ok(key),
        None => create_cluster_key(path),
    }
}

/// On a shared store every hub must have the same CA and join token, so agents trust and join
/// any of them. The first hub stores its own (or new ones) in the store, sealed with the
/// cluster key at `key_path` ([`crate::sealed`]; made there if the store holds no identity
/// yet); every hub then opens the stored ones and writes them into its data dir, where
/// [`load_or_create`] loads them. A data dir that already has a different CA is refused rather
/// than silently replaced; a hub without the cluster key is refused with where to put it; a
/// record from before sealing is sealed in place.
pub async fn share(store: &Store, data_dir: &Path, key_path: &Path) -> Result<(), BootstrapError> {
    let paths = Paths::of(data_dir);
    fs::create_dir_all(&paths.tls).map_err(io("create", &paths.tls))?;
    let existing = store.secret(IDENTITY_SECRET).await?;
    let key = match (read_cluster_key(key_path)?, &existing) {
        (Some(key), _) => key,
        (None, Some(v)) if crate::sealed::is_sealed(v) => {
            return Err(BootstrapError::NoClusterKey(key_path.to_path_buf()));
        }
        // A new cluster, or one from before sealing: this hub's key seals it from now on.
        (None, _) => create_cluster_key(key_path)?,
    };
    let unseal = |value: &str| {
        key.open(IDENTITY_SECRET, value)
            .map_err(|source| BootstrapError::Unseal { path: key_path.to_path_buf(), source })
    };
    if let Some(plain) = existing.as_deref().filter(|v| !crate::sealed::is_sealed(v)) {
        let sealed = seal(&key, key_path, plain)?;
        if store.replace_secret(IDENTITY_SECRET, plain, &sealed).await? {
            info!("the store's cluster identity was stored in clear; it is now sealed with the cluster key");
        }
    }
    let local =
        match (fs::read_to_string(&paths.ca_cert), fs::read_to_string(&paths.ca_key), fs::read_to_string(&paths.token))
        {
            (Ok(cert), Ok(key), Ok(token)) => {
                Some(SharedIdentity { ca_cert_pem: cert, ca_key_pem: key, token: token.trim().to_string() })
            }
            _ => None,
        };
    let candidate = match &local {
        Some(l) => SharedIdentity {
            ca_cert_pem: l.ca_cert_pem.clone(),
            ca_key_pem: l.ca_key_pem.clone(),
            token: l.token.clone(),
        },
        None => {
            let ca = new_ca(&paths.ca_cert)?;
            let token = new_token(&ca);
            SharedIdentity {
                ca_cert_pem: ca.cert_pem().to_string(),
                ca_key_pem: ca.key_pem().to_string(),
                token: token.to_string(),
            }
        }
    };
    let candidate_json = serde_json::to_string(&candidate).expect("identity serializes");
    let stored = store.get_or_insert_secret(IDENTITY_SECRET, &seal(&key, key_path, &candidate_json)?).await?;
    let stored = unseal(&stored)?;
    let stored: SharedIdentity = serde_json::from_str(&stored).map_err(BootstrapError::SharedIdentityUnreadable)?;
    if let Some(l) = &local {
        if l.ca_cert_pem != stored.ca_cert_pem {
            return Err(BootstrapError::SharedIdentityConflict(data_dir.to_path_buf()));
        }
        if l.token == stored.token {
            return Ok(());
        }
    }
    write_private(&paths.ca_key, stored.ca_key_pem.as_bytes())?;
    write_private(&paths.ca_cert, stored.ca_cert_pem.as_bytes())?;
    write_private(&paths.token, format!("{}\n", stored.token).as_bytes())?;
    info!("cluster identity loaded from the shared store");
    Ok(())
}

fn seal(key: &ClusterKey, key_path: &Path, value: &str) -> Result<String, BootstrapError> {
    key.seal(IDENTITY_SECRET, value)
        .map_err(|source| BootstrapError::ClusterKey { path: key_path.to_path_buf(), source })
}

/// Issues the hub's serving certificate for `names` (and `flotilla-hub`) and writes it to
/// `tls/hub.{pem,key}`.
pub fn issue_serving(
    ca: &Ca,
    data_dir: &Path,
    names: &[String],
    validity: Duration,
) -> Result<CertifiedKey, BootstrapError> {
    let tls = data_dir.join("tls");
    let server =
        ca.issue_server(names, validity).map_err(|source| BootstrapError::Pki { path: tls.join("hub.pem"), source })?;
    write_private(&tls.join("hub.pem"), server.cert_pem.as_bytes())?;
    write_private(&tls.join("hub.key"), server.key_pem.as_bytes())?;
    Ok(server)
}

/// Loads the hub's identity from `data_dir`, creating what is missing. `advertise` is the
/// address written into the admin config; `extra_names` go into the serving certificate.
pub fn load_or_create(
    data_dir: &Path,
    advertise: &str,
    extra_names: &[String],
    serving_validity: Duration,
) -> Result<Identity, BootstrapError> {
    let Paths { tls, ca_cert, ca_key, token: token_path } = Paths::of(data_dir);
    fs::create_dir_all(&tls).map_err(io("create", &tls))?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict", data_dir))?;

    let ca = if ca_cert.exists() {
        let cert = fs::read_to_string(&ca_cert).map_err(io("read", &ca_cert))?;
        let key = fs::read_to_string(&ca_key).map_err(io("read", &ca_key))?;
        Ca::load(&cert, &key).map_err(|source| BootstrapError::Pki { path: ca_cert.clone(), source })?
    } else {
        let ca = new_ca(&ca_cert)?;
        write_private(&ca_key, ca.key_pem().as_bytes())?;
        write_private(&ca_cert, ca.cert_pem().as_bytes())?;
        ca
    };

    // The serving certificate is cheap to make and its names depend on flags, so it is issued
    // afresh at every start (and by a running hub two thirds into its life).
    let server = issue_serving(&ca, data_dir, extra_names, serving_validity)?;

    let token = if token_path.exists() {
        let text = fs::read_to_string(&token_path).map_err(io("read", &token_path))?;
        let token: JoinToken =
            text.parse().map_err(|source| BootstrapError::Token { path: token_path.clone(), source })?;
        if token.ca_fingerprint != ca.fingerprint() {
            return Err(BootstrapError::TokenPinsOtherCa { path: token_path });
        }
        token
    } else {
        let token = new_token(&ca);
        write_private(&token_path, format!("{token}\n").as_bytes())?;
        token
    };

    // The admin config is rewritten at every start so it follows the advertised address. Its
    // certificate is kept (configs copied elsewhere stay valid, and the CLI renews its own)
    // until two thirds of its year are gone; then it is issued afresh.
    let admin_config_path = data_dir.join("admin.yaml");
    let kept = fs::read_to_string(&admin_config_path)
        .ok()
        .and_then(|t| serde_saphyr::from_str::<ClientConfigFile>(&t).ok())
        .filter(|old| old.ca_pem == ca.cert_pem())
        .filter(|old| leaf_facts(&old.cert_pem).is_ok_and(|f| f.renew_after() > std::time::SystemTime::now()));
    let admin = match kept {
        Some(old) => CertifiedKey { cert_pem: old.cert_pem, key_pem: old.key_pem },
        None => ca
            .issue_client("admin:admin", YEAR)
            .map_err(|source| BootstrapError::Pki { path: admin_config_path.clone(), source })?,
    };
    let admin_cert_pem = admin.cert_pem.clone();
    let config = ClientConfigFile {
        hub: advertise.to_string(),
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: admin.cert_pem,
        key_pem: admin.key_pem,
    };
    let yaml = serde_saphyr::to_string(&config).expect("client config serializes");
    write_private(&admin_config_path, yaml.as_bytes())?;

    Ok(Identity { ca, server, token, admin_config_path, admin_cert_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_keeps_ca_token_and_admin_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path(), "127.0.0.1:7443", &[], YEAR).unwrap();
        let admin_a: ClientConfigFile =
            serde_saphyr::from_str(&fs::read_to_string(&a.admin_config_path).unwrap()).unwrap();
        let b = load_or_create(dir.path(), "10.0.0.1:7443", &[], YEAR).unwrap();
        let admin_b: ClientConfigFile =
            serde_saphyr::from_str(&fs::read_to_string(&b.admin_config_path).unwrap()).unwrap();
        assert_eq!(a.ca.fingerprint(), b.ca.fingerprint());
        assert_eq!(a.token, b.token);
        assert_eq!(a.token.ca_fingerprint, a.ca.fingerprint());
        assert_eq!(admin_a.key_pem, admin_b.key_pem);
        assert_eq!(admin_b.hub, "10.0.0.1:7443");
        let mode = fs::metadata(dir.path().join("tls/ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_token_pinning_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), "x:1", &[], YEAR).unwrap();
        let other = JoinToken { ca_fingerprint: "0".repeat(64), secret: "1".repeat(48) };
        fs::write(dir.path().join("token"), other.to_string()).unwrap();
        let err = load_or_create(dir.path(), "x:1", &[], YEAR).err().unwrap();
        assert!(err.to_string().contains("different certificate authority"), "{err}");
    }
}
