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
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::messages::ClientConfigFile;
use proto::token::JoinToken;
use rand::RngCore;
use transport::pki::{Ca, CertifiedKey};

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("certificate authority in {path}: {source}")]
    Pki { path: PathBuf, source: transport::pki::PkiError },
    #[error("join token in {path} is unusable: {message}")]
    Token { path: PathBuf, message: String },
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
}

/// Writes `data` to `path` atomically with mode 0600 (temp file, fsync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), BootstrapError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Loads the hub's identity from `data_dir`, creating what is missing. `advertise` is the
/// address written into the admin config; `extra_names` go into the serving certificate.
pub fn load_or_create(data_dir: &Path, advertise: &str, extra_names: &[String]) -> Result<Identity, BootstrapError> {
    let tls = data_dir.join("tls");
    fs::create_dir_all(&tls).map_err(io("create", &tls))?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict", data_dir))?;

    let ca_cert = tls.join("ca.pem");
    let ca_key = tls.join("ca.key");
    let ca = if ca_cert.exists() {
        let cert = fs::read_to_string(&ca_cert).map_err(io("read", &ca_cert))?;
        let key = fs::read_to_string(&ca_key).map_err(io("read", &ca_key))?;
        Ca::load(&cert, &key).map_err(|source| BootstrapError::Pki { path: ca_cert.clone(), source })?
    } else {
        let ca = Ca::generate("flotilla cluster CA")
            .map_err(|source| BootstrapError::Pki { path: ca_cert.clone(), source })?;
        write_private(&ca_key, ca.key_pem().as_bytes())?;
        write_private(&ca_cert, ca.cert_pem().as_bytes())?;
        tracing::info!(fingerprint = %ca.fingerprint(), "created cluster certificate authority");
        ca
    };

    // The serving certificate is cheap to make and its names depend on flags, so it is issued
    // afresh at every start.
    let server = ca
        .issue_server(extra_names, YEAR)
        .map_err(|source| BootstrapError::Pki { path: tls.join("hub.pem"), source })?;
    write_private(&tls.join("hub.pem"), server.cert_pem.as_bytes())?;
    write_private(&tls.join("hub.key"), server.key_pem.as_bytes())?;

    let token_path = data_dir.join("token");
    let token = if token_path.exists() {
        let text = fs::read_to_string(&token_path).map_err(io("read", &token_path))?;
        let token: JoinToken = text.parse().map_err(|e: proto::token::TokenError| BootstrapError::Token {
            path: token_path.clone(),
            message: e.to_string(),
        })?;
        if token.ca_fingerprint != ca.fingerprint() {
            return Err(BootstrapError::Token {
                path: token_path,
                message: "it pins a different certificate authority than tls/ca.pem".into(),
            });
        }
        token
    } else {
        let token = JoinToken { ca_fingerprint: ca.fingerprint(), secret: random_hex(24) };
        write_private(&token_path, format!("{token}\n").as_bytes())?;
        token
    };

    // The admin config is rewritten at every start so it follows the advertised address; the
    // admin key is kept so configs copied elsewhere stay valid.
    let admin_config_path = data_dir.join("admin.yaml");
    let admin = match fs::read_to_string(&admin_config_path)
        .ok()
        .and_then(|t| serde_yaml::from_str::<ClientConfigFile>(&t).ok())
    {
        Some(old) if old.ca_pem == ca.cert_pem() => CertifiedKey { cert_pem: old.cert_pem, key_pem: old.key_pem },
        _ => ca
            .issue_client("admin:admin", 10 * YEAR)
            .map_err(|source| BootstrapError::Pki { path: admin_config_path.clone(), source })?,
    };
    let config = ClientConfigFile {
        hub: advertise.to_string(),
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: admin.cert_pem,
        key_pem: admin.key_pem,
    };
    let yaml = serde_yaml::to_string(&config).expect("client config serializes");
    write_private(&admin_config_path, yaml.as_bytes())?;

    Ok(Identity { ca, server, token, admin_config_path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_keeps_ca_token_and_admin_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path(), "127.0.0.1:7443", &[]).unwrap();
        let admin_a: ClientConfigFile =
            serde_yaml::from_str(&fs::read_to_string(&a.admin_config_path).unwrap()).unwrap();
        let b = load_or_create(dir.path(), "10.0.0.1:7443", &[]).unwrap();
        let admin_b: ClientConfigFile =
            serde_yaml::from_str(&fs::read_to_string(&b.admin_config_path).unwrap()).unwrap();
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
        load_or_create(dir.path(), "x:1", &[]).unwrap();
        let other = JoinToken { ca_fingerprint: "0".repeat(64), secret: "1".repeat(48) };
        fs::write(dir.path().join("token"), other.to_string()).unwrap();
        let err = load_or_create(dir.path(), "x:1", &[]).err().unwrap();
        assert!(err.to_string().contains("different certificate authority"), "{err}");
    }
}
