//! Docker's `config.json` as a file, the way `docker login` and `docker logout` keep it: read
//! (a missing file is an empty config), entries of `auths` set or removed, written back
//! atomically with mode 0600 and every key this module does not own left as it was (other
//! tools keep their settings in the same file). The caller decides where the file is; this
//! module never reads the environment.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::auth::{Credentials, encode_basic_auth, registry_host};

/// Errors reading or writing a Docker config file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    /// The file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not a JSON object, or `auths` is not one.
    #[error("{path} is not a docker config: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Its credentials do not parse.
    #[error("{path}: {source}")]
    Auth {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: super::auth::AuthError,
    },
}

/// A Docker `config.json`, loaded for reading credentials or for a login or logout.
#[derive(Debug, Clone)]
pub struct DockerConfigFile {
    path: PathBuf,
    doc: Map<String, Value>,
}

impl DockerConfigFile {
    /// Reads the file at `path`; a file that does not exist is an empty config.
    pub fn load(path: &Path) -> Result<Self, DockerConfigError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(DockerConfigError::Io { what: "reading", path: path.to_owned(), source }),
        };
        let invalid = |reason: String| DockerConfigError::Invalid { path: path.to_owned(), reason };
        let doc = if bytes.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(invalid("the document is not a json object".to_owned())),
                Err(e) => return Err(invalid(format!("not valid json ({e})"))),
            }
        };
        if doc.get("auths").is_some_and(|a| !a.is_object()) {
            return Err(invalid("\"auths\" is not an object".to_owned()));
        }
        Ok(Self { path: path.to_owned(), doc })
    }

    /// The file this config is read from and written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credentials and credential helpers it names.
    pub fn credentials(&self) -> Result<Credentials, DockerConfigError> {
        // Serialising a map of JSON values cannot fail.
        let json = serde_json::to_vec(&self.doc).unwrap_or_default();
        Credentials::from_docker_config(&json)
            .map_err(|source| DockerConfigError::Auth { path: self.path.clone(), source })
    }

    /// Records `username:password` for `server` (a [`super::auth::server_address`]) in
    /// `auths`, replacing any entry for the same registry. With `None`, records the empty
    /// entry Docker writes when a credential helper holds the secret.
    pub fn set_auth(&mut self, server: &str, credentials: Option<(&str, &str)>) {
        self.remove_auth(server);
        let mut entry = Map::new();
        if let Some((username, password)) = credentials {
            entry.insert("auth".to_owned(), Value::String(encode_basic_auth(username, password)));
        }
        self.auths().insert(server.to_owned(), Value::Object(entry));
    }

    /// Removes every `auths` entry naming `registry` (however its key is spelled: with a
    /// scheme, `index.docker.io` for `docker.io`, ...); whether there was one.
    pub fn remove_auth(&mut self, registry: &str) -> bool {
        let host = registry_host(registry);
        let auths = self.auths();
        let before = auths.len();
        auths.retain(|key, _| registry_host(key) != host);
        auths.len() != before
    }

    fn auths(&mut self) -> &mut Map<String, Value> {
        let auths = self.doc.entry("auths").or_insert_with(|| Value::Object(Map::new()));
        if !auths.is_object() {
            // `load` refuses such a file, so only a config built otherwise gets here.
            *auths = Value::Object(Map::new());
        }
        match auths {
            Value::Object(map) => map,
            _ => unreachable!("made an object just above"),
        }
    }

    /// Writes the config back: to a temporary file (mode 0600) beside it, synced, then
    /// renamed over it, so a crash leaves the old file or the new one. Creates the directory
    /// (mode 0700) if needed.
    pub fn save(&self) -> Result<(), DockerConfigError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| DockerConfigError::Io { what, path, source }
        };
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("creating", dir))?;
        let mut json = serde_json::to_vec_pretty(&self.doc).unwrap_or_default();
        json.push(b'\n');
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", &self.path)(e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::super::auth::{Credential, server_address};
    use super::*;

    #[test]
    fn login_and_logout_keep_other_keys_and_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker/config.json");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            r#"{"psFormat": "table {{.ID}}", "auths": {"other.example": {"auth": "b3RoZXI6cHc="}}, "credHelpers": {"gcr.io": "gcloud"}}"#,
        )
        .unwrap();
        let mut config = DockerConfigFile::load(&path).unwrap();
        config.set_auth("r.example:5000", Some(("alice", "s3:cret")));
        config.save().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(doc["psFormat"], "table {{.ID}}");
        assert_eq!(doc["credHelpers"]["gcr.io"], "gcloud");
        assert_eq!(doc["auths"]["other.example"]["auth"], "b3RoZXI6cHc=");
        // base64("alice:s3:cret"), as `docker login` writes it.
        assert_eq!(doc["auths"]["r.example:5000"]["auth"], "YWxpY2U6czM6Y3JldA==");

        let creds = DockerConfigFile::load(&path).unwrap().credentials().unwrap();
        assert_eq!(
            creds.get("r.example:5000"),
            Some(&Credential::Basic { username: "alice".into(), password: "s3:cret".into() })
        );
        assert_eq!(creds.helper_for("gcr.io"), Some("gcloud"));

        let mut config = DockerConfigFile::load(&path).unwrap();
        assert!(config.remove_auth("http://R.example:5000/"));
        assert!(!config.remove_auth("r.example:5000"));
        config.save().unwrap();
        let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(doc["auths"].get("r.example:5000").is_none() && doc["auths"].get("other.example").is_some());
        assert_eq!(doc["psFormat"], "table {{.ID}}");
    }

    #[test]
    fn docker_hub_and_helper_entries_are_spelled_as_docker_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut config = DockerConfigFile::load(&path).unwrap();
        assert!(config.credentials().unwrap().is_empty());
        config.set_auth(&server_address("index.docker.io"), Some(("bob", "pw")));
        config.set_auth(&server_address("helper.example"), None);
        config.save().unwrap();
        let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(doc["auths"]["https://index.docker.io/v1/"]["auth"].is_string(), "{doc}");
        assert_eq!(doc["auths"]["helper.example"], serde_json::json!({}));
        // Setting again replaces the entry under any spelling.
        let mut config = DockerConfigFile::load(&path).unwrap();
        config.set_auth("docker.io", Some(("carol", "pw")));
        assert_eq!(config.doc["auths"].as_object().unwrap().len(), 2, "{:?}", config.doc);
    }

    #[test]
    fn corrupt_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        for (content, want) in [
            ("{not json", "not valid json"),
            ("[1, 2]", "not a json object"),
            (r#"{"auths": "x"}"#, "\"auths\" is not an object"),
        ] {
            std::fs::write(&path, content).unwrap();
            let err = DockerConfigFile::load(&path).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("config.json"), "{content}: {err}");
        }
        std::fs::write(&path, r#"{"auths": {"r.example": {"auth": "%%%"}}}"#).unwrap();
        let err = DockerConfigFile::load(&path).unwrap().credentials().unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("r.example"), "{err}");
        std::fs::write(&path, r#"{"credsStore": 7}"#).unwrap();
        assert!(DockerConfigFile::load(&path).unwrap().credentials().is_err());
        // Empty files are what some tools leave behind: an empty config.
        std::fs::write(&path, "\n").unwrap();
        assert!(DockerConfigFile::load(&path).unwrap().credentials().unwrap().is_empty());
    }
}
