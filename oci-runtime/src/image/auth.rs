//! Registry credentials: a typed table of basic or bearer credentials per registry host, and
//! a parser for Docker's `config.json` (`auths.<host>.auth` = base64 `user:password`, or
//! `username`/`password`, or `identitytoken`/`registrytoken`). The caller reads the file; this
//! module never touches the file system or the environment, and its `Debug` output never shows
//! a secret.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// Errors parsing a Docker `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The document is not JSON of the expected shape.
    #[error("docker config is not valid json: {0}")]
    Json(#[from] serde_json::Error),
    /// An `auth` field is not base64 of `user:password`.
    #[error("docker config entry for registry {registry}: {reason}")]
    BadEntry {
        /// The registry key of the entry.
        registry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// One registry's credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// HTTP basic (exchanged for a bearer token when the registry asks for one).
    Basic {
        /// User name.
        username: String,
        /// Password or access token.
        password: String,
    },
    /// A bearer token sent as is.
    Bearer(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => {
                f.debug_struct("Basic").field("username", username).field("password", &"<redacted>").finish()
            }
            Credential::Bearer(_) => f.debug_tuple("Bearer").field(&"<redacted>").finish(),
        }
    }
}

/// Credentials per registry host (`host[:port]`, as in image references; `docker.io` and
/// `index.docker.io` are the same registry).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    by_registry: BTreeMap<String, Credential>,
}

impl Credentials {
    /// No credentials: every registry is accessed anonymously.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the credentials for `registry` (`host[:port]`, or a URL such as
    /// `https://index.docker.io/v1/`, whose scheme and path are ignored).
    pub fn insert(&mut self, registry: &str, credential: Credential) {
        self.by_registry.insert(normalize_registry(registry), credential);
    }

    /// The credentials for `registry`, if any.
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.by_registry.get(&normalize_registry(registry))
    }

    /// Number of registries with credentials.
    pub fn len(&self) -> usize {
        self.by_registry.len()
    }

    /// Whether there are no credentials at all.
    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty()
    }

    /// Parses a Docker `config.json` document. Entries without usable credentials (for
    /// example ones that defer to a credential helper) are skipped.
    pub fn from_docker_config(json: &[u8]) -> Result<Self, AuthError> {
        let doc: DockerConfig = serde_json::from_slice(json)?;
        let mut out = Credentials::new();
        for (registry, entry) in doc.auths {
            let bad = |reason: String| AuthError::BadEntry { registry: registry.clone(), reason };
            let credential = if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| bad(format!("auth is not base64: {e}")))?;
                let decoded = String::from_utf8(decoded).map_err(|_| bad("auth is not utf-8".to_owned()))?;
                let (username, password) =
                    decoded.split_once(':').ok_or_else(|| bad("auth is not of the form user:password".to_owned()))?;
                Credential::Basic { username: username.to_owned(), password: password.to_owned() }
            } else if let (Some(username), Some(password)) = (entry.username, entry.password) {
                Credential::Basic { username, password }
            } else if let Some(token) = entry.registrytoken.filter(|t| !t.is_empty()) {
                Credential::Bearer(token)
            } else if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                // An identity token is a refresh token presented as a password with the fixed
                // user name Docker uses for it.
                Credential::Basic { username: "<token>".to_owned(), password: token }
            } else {
                tracing::debug!(registry = %registry, "docker config entry has no inline credentials, skipped");
                continue;
            };
            out.insert(&registry, credential);
        }
        Ok(out)
    }

    /// The oci-client authentication for a reference whose registry is `registry` (as
    /// written) or `resolved` (after docker.io → index.docker.io).
    pub(crate) fn auth_for(&self, registry: &str, resolved: &str) -> RegistryAuth {
        match self.get(registry).or_else(|| self.get(resolved)) {
            Some(Credential::Basic { username, password }) => RegistryAuth::Basic(username.clone(), password.clone()),
            Some(Credential::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
}

#[derive(Deserialize, Default)]
struct DockerAuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

/// `https://index.docker.io/v1/` → `docker.io`; `Registry.Example:5000/` → `registry.example:5000`.
fn normalize_registry(registry: &str) -> String {
    let s = registry.trim();
    let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_config() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                "registry.lan:5000": {{"username": "bob", "password": "pw"}},
                "tokens.example": {{"registrytoken": "tok"}},
                "helper.example": {{}}
            }}, "credsStore": "desktop"}}"#
        );
        let creds = Credentials::from_docker_config(json.as_bytes()).unwrap();
        assert_eq!(creds.len(), 3);
        assert_eq!(
            creds.get("docker.io"),
            Some(&Credential::Basic { username: "alice".into(), password: "s3cr:et".into() })
        );
        // oci-client resolves docker.io to index.docker.io; both find the entry.
        assert!(matches!(creds.auth_for("docker.io", "index.docker.io"), RegistryAuth::Basic(u, _) if u == "alice"));
        assert!(matches!(creds.auth_for("x", "index.docker.io"), RegistryAuth::Basic(..)));
        assert!(
            matches!(creds.auth_for("registry.lan:5000", "registry.lan:5000"), RegistryAuth::Basic(u, p) if u == "bob" && p == "pw")
        );
        assert!(matches!(creds.auth_for("tokens.example", "tokens.example"), RegistryAuth::Bearer(t) if t == "tok"));
        assert!(matches!(creds.auth_for("helper.example", "helper.example"), RegistryAuth::Anonymous));
        assert!(matches!(creds.auth_for("registry.lan", "registry.lan"), RegistryAuth::Anonymous));
        // Secrets never show in Debug output.
        let dbg = format!("{creds:?}");
        assert!(!dbg.contains("s3cr") && !dbg.contains("tok\"") && !dbg.contains("\"pw\""), "{dbg}");
    }

    #[test]
    fn bad_docker_config_is_named() {
        let err = Credentials::from_docker_config(br#"{"auths": {"r.example": {"auth": "%%%"}}}"#).unwrap_err();
        assert!(err.to_string().contains("r.example"), "{err}");
        let no_colon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        let json = format!(r#"{{"auths": {{"r.example": {{"auth": "{no_colon}"}}}}}}"#);
        let err = Credentials::from_docker_config(json.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("user:password"), "{err}");
        assert!(matches!(Credentials::from_docker_config(b"[1,2]"), Err(AuthError::Json(_))));
        assert!(Credentials::from_docker_config(b"{}").unwrap().is_empty());
    }
}
