//! Registry credentials: a typed table of basic or bearer credentials per registry host, the
//! credential helpers Docker defers to (`credsStore` for every registry, `credHelpers` per
//! registry), and a parser for Docker's `config.json` (`auths.<host>.auth` = base64
//! `user:password`, or `username`/`password`, or `identitytoken`/`registrytoken`). The caller
//! reads the file (see [`super::docker_config`]) and runs the helpers (see
//! [`super::cred_helper`]); this module never touches the file system, a process or the
//! environment, and its `Debug` output never shows a secret.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
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
/// `index.docker.io` are the same registry), and the credential helpers to ask first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    by_registry: BTreeMap<String, Credential>,
    /// `credsStore`: the helper (`docker-credential-<name>`) for every registry.
    helper_default: Option<String>,
    /// `credHelpers`: a helper per registry host, ahead of `credsStore`.
    helper_by_registry: BTreeMap<String, String>,
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

    /// The credential helper to ask for `registry`'s credentials, as Docker picks it:
    /// `credHelpers` for that registry, else `credsStore`. Only a name: the helper program is
    /// `docker-credential-<name>`.
    pub fn helper_for(&self, registry: &str) -> Option<&str> {
        self.helper_by_registry.get(&normalize_registry(registry)).or(self.helper_default.as_ref()).map(String::as_str)
    }

    /// Sets `credsStore`: the helper asked for every registry without a `credHelpers` entry.
    pub fn set_default_helper(&mut self, name: Option<String>) {
        self.helper_default = name.filter(|n| !n.is_empty());
    }

    /// Sets the `credHelpers` entry for `registry`.
    pub fn set_helper(&mut self, registry: &str, name: &str) {
        self.helper_by_registry.insert(normalize_registry(registry), name.to_owned());
    }

    /// Adds what `other` has and `self` lacks: its credentials for registries `self` has none
    /// for, its per-registry helpers likewise, and its `credsStore` if `self` has none. So the
    /// first source merged into wins, registry by registry.
    pub fn merge(&mut self, other: Credentials) {
        for (registry, credential) in other.by_registry {
            self.by_registry.entry(registry).or_insert(credential);
        }
        for (registry, helper) in other.helper_by_registry {
            self.helper_by_registry.entry(registry).or_insert(helper);
        }
        if self.helper_default.is_none() {
            self.helper_default = other.helper_default;
        }
    }

    /// Parses a Docker `config.json` document: its `auths`, `credsStore` and `credHelpers`.
    /// Entries without inline credentials (for example the empty ones Docker writes beside a
    /// credential helper) are skipped.
    pub fn from_docker_config(json: &[u8]) -> Result<Self, AuthError> {
        let doc: DockerConfig = serde_json::from_slice(json)?;
        let mut out = Credentials::new();
        out.set_default_helper(doc.creds_store);
        for (registry, helper) in doc.cred_helpers {
            if !helper.is_empty() {
                out.set_helper(&registry, &helper);
            }
        }
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
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

/// Encodes `user:password` as Docker's `auths.<registry>.auth` holds it (standard base64).
pub fn encode_basic_auth(username: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
}

/// The server address Docker uses for `registry` in `config.json` keys and with credential
/// helpers: `https://index.docker.io/v1/` for Docker Hub, else `host[:port]`.
pub fn server_address(registry: &str) -> String {
    match normalize_registry(registry).as_str() {
        "docker.io" => "https://index.docker.io/v1/".to_owned(),
        host => host.to_owned(),
    }
}

/// The registry host a `config.json` key or image registry names: scheme and path dropped,
/// lower case, Docker Hub's aliases as `docker.io`.
pub fn registry_host(registry: &str) -> String {
    normalize_registry(registry)
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
        // Docker Hub's aliases find the same entry.
        assert!(
            matches!(creds.get("index.docker.io"), Some(Credential::Basic { username, .. }) if username == "alice")
        );
        assert_eq!(
            creds.get("registry.lan:5000"),
            Some(&Credential::Basic { username: "bob".into(), password: "pw".into() })
        );
        assert_eq!(creds.get("tokens.example"), Some(&Credential::Bearer("tok".into())));
        assert_eq!(creds.get("helper.example"), None);
        assert_eq!(creds.get("registry.lan"), None);
        // Secrets never show in Debug output.
        let dbg = format!("{creds:?}");
        assert!(!dbg.contains("s3cr") && !dbg.contains("tok\"") && !dbg.contains("\"pw\""), "{dbg}");
    }

    #[test]
    fn helpers_are_picked_as_docker_picks_them_and_merges_keep_the_first_source() {
        let json = br#"{"auths": {"r.example": {}, "plain.example": {"auth": "dTpw"}},
            "credsStore": "desktop", "credHelpers": {"https://GCR.io": "gcloud", "empty.example": ""}}"#;
        let file = Credentials::from_docker_config(json).unwrap();
        assert_eq!(file.helper_for("gcr.io"), Some("gcloud"));
        assert_eq!(file.helper_for("r.example"), Some("desktop"));
        assert_eq!(file.helper_for("empty.example"), Some("desktop"));
        assert_eq!(file.len(), 1, "the empty entry defers to the helper");

        let mut option = Credentials::new();
        option.insert("plain.example", Credential::Basic { username: "opt".into(), password: "x".into() });
        option.set_helper("r.example", "pass");
        option.merge(file.clone());
        // The first source wins per registry; the rest fills the gaps.
        assert!(matches!(option.get("plain.example"), Some(Credential::Basic { username, .. }) if username == "opt"));
        assert_eq!(option.helper_for("r.example"), Some("pass"));
        assert_eq!(option.helper_for("gcr.io"), Some("gcloud"));
        assert_eq!(option.helper_for("other.example"), Some("desktop"));
        assert_eq!(Credentials::new().helper_for("x"), None);
    }

    #[test]
    fn auth_encoding_and_server_addresses_match_docker() {
        assert_eq!(encode_basic_auth("alice", "pw"), "YWxpY2U6cHc=");
        let decoded = base64::engine::general_purpose::STANDARD.decode(encode_basic_auth("a", "b:c")).unwrap();
        assert_eq!(decoded, b"a:b:c");
        assert_eq!(server_address("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(server_address("registry-1.docker.io"), "https://index.docker.io/v1/");
        assert_eq!(server_address("https://Registry.Lan:5000/v2/"), "registry.lan:5000");
        assert_eq!(registry_host("https://index.docker.io/v1/"), "docker.io");
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
