//! Manifests and indexes read with a bound. oci-client's `pull_manifest_raw` reads the whole
//! response body into memory before a caller can look at its size, so a hostile registry
//! could make a node hold hundreds of MiB for a document that must be a few KiB. Here the
//! request is the same (URL, `Accept`, credentials through oci-client's own token exchange),
//! but the body is refused from its declared length, or read chunk by chunk and abandoned as
//! soon as it passes the limit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::errors::{OciDistributionError, OciEnvelope};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::{CONNECT_TIMEOUT, READ_TIMEOUT, USER_AGENT};

/// How long a pull token (or the finding that a registry wants none) is reused before
/// oci-client is asked again. Registries issue tokens for 60 s or more.
const TOKEN_REUSE: Duration = Duration::from_secs(50);

/// Why a bounded manifest fetch failed.
#[derive(Debug)]
pub(crate) enum ManifestError {
    /// What oci-client would have reported (status, envelope, transport), for the usual mapping.
    Oci(OciDistributionError),
    /// The body is (or declared itself) larger than the limit; nothing past it was read.
    TooLarge { limit: u64, declared: Option<u64> },
}

impl From<OciDistributionError> for ManifestError {
    fn from(e: OciDistributionError) -> Self {
        ManifestError::Oci(e)
    }
}

impl From<reqwest::Error> for ManifestError {
    fn from(e: reqwest::Error) -> Self {
        ManifestError::Oci(OciDistributionError::RequestError(e))
    }
}

/// (registry, repository): the key pull credentials are cached under.
type RepoKey = (String, String);
/// When the credentials were found, and the bearer token (`None` for basic/anonymous).
type FoundToken = (Instant, Option<String>);

/// The HTTP side of bounded manifest reads: one reqwest client (the same crate and TLS
/// stack oci-client uses) and the pull credentials last found per repository.
pub(crate) struct ManifestReader {
    http: reqwest::Client,
    tokens: Mutex<HashMap<RepoKey, FoundToken>>,
}

impl std::fmt::Debug for ManifestReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestReader").finish_non_exhaustive()
    }
}

impl ManifestReader {
    /// The HTTP client (for requests oci-client has no call for, such as a login check).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub(crate) fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(USER_AGENT)
            .build()
            // Only a TLS backend that cannot initialise fails here; fall back to reqwest's
            // default client, which then reports the same problem on the first request.
            .unwrap_or_default();
        ManifestReader { http, tokens: Mutex::new(HashMap::new()) }
    }

    /// GETs the manifest or index `r` names from `scheme://registry`, reading at most `limit`
    /// bytes of body, and returns it with the registry's `Docker-Content-Digest` if it sent one.
    pub(crate) async fn get(
        &self,
        client: &Client,
        scheme: &str,
        r: &Reference,
        auth: &RegistryAuth,
        accepted: &[&str],
        limit: u64,
    ) -> Result<(Vec<u8>, Option<String>), ManifestError> {
        let url = manifest_url(scheme, r);
        let mut retried = false;
        let mut resent = false;
        loop {
            let token = self.token(client, r, auth).await?;
            let mut request = self.http.get(&url).header(reqwest::header::ACCEPT, accepted.join(", "));
            request = match (&token, auth) {
                (Some(bearer), _) => request.bearer_auth(bearer),
                (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
                (None, _) => request,
            };
            let mut response = match request.send().await {
                Ok(response) => response,
                // A pooled connection the registry closed while idle fails the first request
                // sent on it ("connection closed before message completed"). The GET is
                // idempotent: try once more on a fresh connection, which then either works or
                // fails the way an unreachable registry does.
                Err(e) if !resent && !e.is_timeout() => {
                    resent = true;
                    tracing::debug!(error = %e, url = %url, "manifest request failed; retrying on a new connection");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && !retried {
                // A token that expired early, or a registry that started asking: ask again.
                retried = true;
                self.forget(r);
                continue;
            }
            if status != reqwest::StatusCode::OK {
                // Error bodies are small JSON envelopes; read no more of them than of a manifest.
                let body = read_bounded(&mut response, limit).await.unwrap_or_default();
                return Err(status_error(status, &body, &url).into());
            }
            let digest =
                response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
            return Ok((read_bounded(&mut response, limit).await?, digest));
        }
    }

    async fn token(
        &self,
        client: &Client,
        r: &Reference,
        auth: &RegistryAuth,
    ) -> Result<Option<String>, ManifestError> {
        let key = (r.resolve_registry().to_owned(), r.repository().to_owned());
        if let Some((at, token)) = self.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < TOKEN_REUSE
        {
            return Ok(token.clone());
        }
        let token = client.auth(r, auth, RegistryOperation::Pull).await?;
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the repositories this node pulls from; drop the stale ones as it goes.
        tokens.retain(|_, (at, _)| at.elapsed() < TOKEN_REUSE);
        tokens.insert(key, (Instant::now(), token.clone()));
        Ok(token)
    }

    fn forget(&self, r: &Reference) {
        let key = (r.resolve_registry().to_owned(), r.repository().to_owned());
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }
}

/// The body, refused up front when its declared length passes `limit`, else read chunk by
/// chunk and abandoned (the connection dropped) once it passes `limit`.
async fn read_bounded(response: &mut reqwest::Response, limit: u64) -> Result<Vec<u8>, ManifestError> {
    let declared = response.content_length();
    if let Some(n) = declared
        && n > limit
    {
        return Err(ManifestError::TooLarge { limit, declared });
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = response.chunk().await? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(ManifestError::TooLarge { limit, declared });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The manifest URL as oci-client builds it (`/v2/<repository>/manifests/<digest or tag>`,
/// with `?ns=` for a mirrored namespace).
fn manifest_url(scheme: &str, r: &Reference) -> String {
    let reference = r.digest().or(r.tag()).unwrap_or("latest");
    let ns = r.namespace().map(|ns| format!("?ns={ns}")).unwrap_or_default();
    format!("{scheme}://{}/v2/{}/manifests/{reference}{ns}", r.resolve_registry(), r.repository())
}

/// The error oci-client gives for a non-200 manifest response, so one mapping
/// ([`super::Registry::map_oci_error`]) serves both.
fn status_error(status: reqwest::StatusCode, body: &[u8], url: &str) -> OciDistributionError {
    match status {
        reqwest::StatusCode::UNAUTHORIZED => OciDistributionError::UnauthorizedError { url: url.to_owned() },
        s if s.is_client_error() => match serde_json::from_slice::<OciEnvelope>(body) {
            Ok(envelope) => OciDistributionError::RegistryError { envelope, url: url.to_owned() },
            Err(_) => OciDistributionError::ServerError {
                code: s.as_u16(),
                url: url.to_owned(),
                message: String::from_utf8_lossy(body).into_owned(),
            },
        },
        s => OciDistributionError::ServerError {
            code: s.as_u16(),
            url: url.to_owned(),
            message: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_distribution_spec() {
        let r: Reference = "127.0.0.1:5000/team/app:v1".parse().unwrap();
        assert_eq!(manifest_url("http", &r), "http://127.0.0.1:5000/v2/team/app/manifests/v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r: Reference = format!("registry.example/app@{d}").parse().unwrap();
        assert_eq!(manifest_url("https", &r), format!("https://registry.example/v2/app/manifests/{d}"));
    }

    #[test]
    fn statuses_become_the_errors_oci_client_gives() {
        let url = "http://r/v2/a/manifests/b";
        assert!(matches!(
            status_error(reqwest::StatusCode::UNAUTHORIZED, b"", url),
            OciDistributionError::UnauthorizedError { .. }
        ));
        let envelope = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        assert!(matches!(
            status_error(reqwest::StatusCode::NOT_FOUND, envelope, url),
            OciDistributionError::RegistryError { .. }
        ));
        assert!(matches!(
            status_error(reqwest::StatusCode::NOT_FOUND, b"nope", url),
            OciDistributionError::ServerError { code: 404, .. }
        ));
        assert!(matches!(
            status_error(reqwest::StatusCode::BAD_GATEWAY, b"", url),
            OciDistributionError::ServerError { code: 502, .. }
        ));
    }
}
