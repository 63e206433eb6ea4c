//! Docker's credential helper protocol: a program `docker-credential-<name>` run with one
//! verb, `get` (server address on stdin; `{"ServerURL","Username","Secret"}` JSON on stdout),
//! `store` (that JSON on stdin) or `erase` (server address on stdin). A helper that has
//! nothing for a server exits non-zero saying "credentials not found", which is an answer,
//! not a failure. Every other failure, a helper that hangs, or one that prints something
//! other than that JSON is a [`HelperError`] naming the helper, the verb and the server.
//!
//! Written here rather than taken from the `docker_credential` crate: that crate only reads
//! (`get`), where `flotilla login`/`logout` also need `store` and `erase`, and it finds the
//! config through environment variables itself, which this library must not read.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::Credential;

/// Bound on one helper run: a helper waiting for a keychain prompt nobody answers must not
/// stall a pull for ever.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most of a helper's output read; credentials are a few hundred bytes.
const MAX_OUTPUT: u64 = 64 * 1024;
/// What helpers print (the `credentials.ErrCredentialsNotFound` text) when they hold nothing
/// for a server.
const NOT_FOUND: &str = "credentials not found";
/// The user name helpers return with an identity (refresh) token as the secret.
const TOKEN_USER: &str = "<token>";

/// Errors running a credential helper.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The configured name cannot name a helper program.
    #[error("credential helper name {0:?} is not usable (it must be a plain name like \"pass\")")]
    BadName(String),
    /// The program could not be started (typically: not installed, not on PATH).
    #[error("cannot run credential helper {program}: {source}")]
    Spawn {
        /// The program name.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The helper exited with a failure.
    #[error("credential helper {program} {verb} for {server} failed ({status}): {message}")]
    Failed {
        /// The program name.
        program: String,
        /// `get`, `store` or `erase`.
        verb: &'static str,
        /// The server address asked about.
        server: String,
        /// Its exit status.
        status: String,
        /// What it printed (trimmed, bounded).
        message: String,
    },
    /// The helper did not finish in time.
    #[error("credential helper {program} {verb} for {server} did not finish within {timeout:?}")]
    Timeout {
        /// The program name.
        program: String,
        /// `get`, `store` or `erase`.
        verb: &'static str,
        /// The server address asked about.
        server: String,
        /// The bound.
        timeout: Duration,
    },
    /// `get` printed something other than the credentials JSON.
    #[error("credential helper {program} get for {server} printed no usable credentials: {reason}")]
    BadOutput {
        /// The program name.
        program: String,
        /// The server address asked about.
        server: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The JSON helpers read (`store`) and print (`get`).
#[derive(Serialize, Deserialize)]
struct HelperCredentials {
    #[serde(rename = "ServerURL", default)]
    server_url: String,
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// One credential helper program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHelper {
    program: PathBuf,
}

impl CredentialHelper {
    /// The helper Docker's config names `name`: the program `docker-credential-<name>`, found
    /// on `PATH` when run.
    pub fn named(name: &str) -> Result<Self, HelperError> {
        let usable = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !name.starts_with('.');
        if !usable {
            return Err(HelperError::BadName(name.to_owned()));
        }
        Ok(Self { program: PathBuf::from(format!("docker-credential-{name}")) })
    }

    /// A helper at an explicit path (tests, or a helper outside `PATH`).
    pub fn at(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into() }
    }

    fn name(&self) -> String {
        self.program.display().to_string()
    }

    /// The credentials the helper holds for `server` (see [`super::auth::server_address`]),
    /// or `None` when it holds none.
    pub async fn get(&self, server: &str) -> Result<Option<Credential>, HelperError> {
        let out = match self.run("get", server, server.as_bytes()).await? {
            Ok(out) => out,
            Err(failed) => {
                return match failed {
                    HelperError::Failed { ref message, .. } if message.contains(NOT_FOUND) => Ok(None),
                    other => Err(other),
                };
            }
        };
        let bad = |reason: String| HelperError::BadOutput { program: self.name(), server: server.to_owned(), reason };
        let creds: HelperCredentials =
            serde_json::from_slice(&out).map_err(|e| bad(format!("not the credentials json ({e})")))?;
        if creds.secret.is_empty() {
            return Err(bad("the secret is empty".to_owned()));
        }
        if creds.username.is_empty() || creds.username == TOKEN_USER {
            // An identity token: presented as the password of the fixed user Docker uses
            // (as `identitytoken` in config.json is, see `Credentials::from_docker_config`).
            return Ok(Some(Credential::Basic { username: TOKEN_USER.to_owned(), password: creds.secret }));
        }
        Ok(Some(Credential::Basic { username: creds.username, password: creds.secret }))
    }

    /// Stores `username`/`secret` for `server` in the helper.
    pub async fn store(&self, server: &str, username: &str, secret: &str) -> Result<(), HelperError> {
        let input = HelperCredentials {
            server_url: server.to_owned(),
            username: username.to_owned(),
            secret: secret.to_owned(),
        };
        // Serialising three strings cannot fail.
        let json = serde_json::to_vec(&input).unwrap_or_default();
        self.run("store", server, &json).await?.map(drop)
    }

    /// Removes what the helper holds for `server`; holding nothing is no error.
    pub async fn erase(&self, server: &str) -> Result<(), HelperError> {
        match self.run("erase", server, server.as_bytes()).await? {
            Ok(_) => Ok(()),
            Err(HelperError::Failed { ref message, .. }) if message.contains(NOT_FOUND) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs the helper with `verb`, `input` on its stdin. The outer error is a helper that
    /// could not run or finish; the inner one a helper that exited with a failure (its
    /// message from stdout, where helpers print it, or stderr).
    async fn run(
        &self,
        verb: &'static str,
        server: &str,
        input: &[u8],
    ) -> Result<Result<Vec<u8>, HelperError>, HelperError> {
        let program = self.name();
        let mut child = tokio::process::Command::new(&self.program)
            .arg(verb)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| HelperError::Spawn { program: program.clone(), source })?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(HelperError::Spawn { program, source: std::io::Error::other("no pipes to the helper") });
        };
        let input = input.to_vec();
        let work = async move {
            // A helper that exits without reading its input is not an error of ours.
            let _ = stdin.write_all(&input).await;
            drop(stdin);
            // Each pipe is closed as soon as its bound is read, so a helper still writing past
            // it gets EPIPE and ends instead of blocking the other pipe's end-of-file.
            async fn bounded(pipe: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
                let mut buf = Vec::new();
                pipe.take(MAX_OUTPUT).read_to_end(&mut buf).await.map(|_| buf)
            }
            let (out, err) = tokio::join!(bounded(stdout), bounded(stderr));
            let status = child.wait().await;
            match (out, err, status) {
                (Ok(out), Ok(err), Ok(status)) => (Ok(status), out, err),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => (Err(e), Vec::new(), Vec::new()),
            }
        };
        let timeout = HELPER_TIMEOUT;
        let (status, out, err) = tokio::time::timeout(timeout, work).await.map_err(|_| HelperError::Timeout {
            program: program.clone(),
            verb,
            server: server.to_owned(),
            timeout,
        })?;
        let status = status.map_err(|source| HelperError::Spawn { program: program.clone(), source })?;
        if status.success() {
            return Ok(Ok(out));
        }
        let text = if out.iter().any(|b| !b.is_ascii_whitespace()) { out } else { err };
        let mut message = String::from_utf8_lossy(&text).trim().to_owned();
        if message.len() > 400 {
            let cut = (0..=400).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
            message.truncate(cut);
            message.push('…');
        }
        if message.is_empty() {
            message = "no message".to_owned();
        }
        Ok(Err(HelperError::Failed { program, verb, server: server.to_owned(), status: status.to_string(), message }))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;

    /// A helper script in `dir` keeping what it stores in `dir/creds`, as real helpers do in
    /// their keychain.
    fn fake_helper(dir: &Path, body: &str) -> CredentialHelper {
        let path = dir.join("docker-credential-fake");
        std::fs::write(&path, format!("#!/bin/sh\nstore={}\n{body}", dir.display())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        CredentialHelper::at(path)
    }

    const KEEPER: &str = r#"case "$1" in
  store) cat > "$store/creds" ;;
  get) read -r server; echo "$server" > "$store/asked"
       if [ -f "$store/creds" ]; then cat "$store/creds"; else echo "credentials not found in native keychain"; exit 1; fi ;;
  erase) read -r server; [ -f "$store/creds" ] || { echo "credentials not found in native keychain"; exit 1; }; rm "$store/creds" ;;
  *) echo "unknown verb $1" >&2; exit 2 ;;
esac
"#;

    #[tokio::test]
    async fn store_get_erase_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let helper = fake_helper(dir.path(), KEEPER);
        assert_eq!(helper.get("r.example:5000").await.unwrap(), None);
        helper.store("r.example:5000", "alice", "s3cret").await.unwrap();
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("creds")).unwrap()).unwrap();
        assert_eq!(stored, serde_json::json!({"ServerURL": "r.example:5000", "Username": "alice", "Secret": "s3cret"}));
        assert_eq!(
            helper.get("r.example:5000").await.unwrap(),
            Some(Credential::Basic { username: "alice".into(), password: "s3cret".into() })
        );
        assert_eq!(std::fs::read_to_string(dir.path().join("asked")).unwrap().trim(), "r.example:5000");
        helper.erase("r.example:5000").await.unwrap();
        assert_eq!(helper.get("r.example:5000").await.unwrap(), None);
        // Erasing what is not there is fine.
        helper.erase("r.example:5000").await.unwrap();
    }

    #[tokio::test]
    async fn identity_tokens_come_back_as_the_token_user() {
        let dir = tempfile::tempdir().unwrap();
        let helper = fake_helper(dir.path(), r#"echo '{"ServerURL":"x","Username":"<token>","Secret":"refresh"}'"#);
        assert_eq!(
            helper.get("x").await.unwrap(),
            Some(Credential::Basic { username: "<token>".into(), password: "refresh".into() })
        );
    }

    #[tokio::test]
    async fn failing_garbage_and_missing_helpers_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let failing = fake_helper(dir.path(), "echo 'keychain locked' >&2; exit 3");
        let err = failing.get("r.example").await.unwrap_err();
        assert!(matches!(err, HelperError::Failed { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("get for r.example") && text.contains("keychain locked"), "{text}");
        assert!(failing.store("r.example", "u", "p").await.unwrap_err().to_string().contains("store"));
        assert!(failing.erase("r.example").await.is_err());

        let garbage = fake_helper(dir.path(), "echo 'hello, not json'");
        let err = garbage.get("r.example").await.unwrap_err();
        assert!(matches!(err, HelperError::BadOutput { .. }) && err.to_string().contains("not the credentials json"));
        let empty = fake_helper(dir.path(), r#"echo '{"Username":"u","Secret":""}'"#);
        assert!(empty.get("r.example").await.unwrap_err().to_string().contains("secret is empty"));

        let missing = CredentialHelper::at(dir.path().join("docker-credential-none"));
        let err = missing.get("r.example").await.unwrap_err();
        assert!(matches!(err, HelperError::Spawn { .. }) && err.to_string().contains("docker-credential-none"));

        assert!(matches!(CredentialHelper::named("../evil"), Err(HelperError::BadName(_))));
        assert!(matches!(CredentialHelper::named(""), Err(HelperError::BadName(_))));
        assert_eq!(CredentialHelper::named("pass").unwrap().name(), "docker-credential-pass");
    }

    #[tokio::test]
    async fn a_helper_flooding_its_output_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        // Endless output: read up to the bound, then the pipe closes and the helper dies.
        let flood = fake_helper(dir.path(), "yes '{' ");
        let err = flood.get("r.example").await.unwrap_err();
        assert!(matches!(err, HelperError::BadOutput { .. } | HelperError::Failed { .. }), "{err:?}");
    }
}
