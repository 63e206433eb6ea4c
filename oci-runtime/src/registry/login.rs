//! Checking credentials the way `docker login` does before it stores them: `GET /v2/` with
//! them (a registry with basic authentication, such as distribution with htpasswd, answers
//! 200 or 401), and where the registry answers with a bearer challenge, asking its token
//! service for a token with them.

use std::collections::BTreeMap;

use super::{Registry, RegistryError, error_chain};

impl Registry {
    /// Whether `registry` (host[:port]) accepts `username`/`password`: `Ok` if it does,
    /// [`RegistryError::Login`] saying why not (refused, unreachable, an unexpected answer).
    pub async fn check_login(&self, registry: &str, username: &str, password: &str) -> Result<(), RegistryError> {
        let fail = |reason: String| RegistryError::Login { registry: registry.to_owned(), reason };
        // Docker Hub's registry API lives on its own host.
        let host = match crate::image::registry_host(registry).as_str() {
            "docker.io" => "registry-1.docker.io".to_owned(),
            other => other.to_owned(),
        };
        let scheme = if self.cfg.is_plain_http(&host) { "http" } else { "https" };
        let http = self.manifests.http();
        let url = format!("{scheme}://{host}/v2/");
        let send = async |req: reqwest::RequestBuilder, to: &str| {
            req.basic_auth(username, Some(password))
                .send()
                .await
                .map_err(|e| fail(format!("{to}: {}", error_chain(&e))))
        };
        let answer = send(http.get(&url), &url).await?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        if status != reqwest::StatusCode::UNAUTHORIZED {
            return Err(fail(format!("unexpected answer {status} to GET {url}")));
        }
        let challenge =
            answer.headers().get(reqwest::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(parse_challenge);
        let Some(Some((scheme, params))) = challenge.filter(|c| c.as_ref().is_some_and(|(s, _)| s == "bearer")) else {
            return Err(fail("the registry refused the user name or password (HTTP 401)".to_owned()));
        };
        debug_assert_eq!(scheme, "bearer");
        let Some(realm) = params.get("realm") else {
            return Err(fail("the registry's bearer challenge names no token service (realm)".to_owned()));
        };
        let mut query: Vec<(&str, &str)> = vec![("account", username)];
        if let Some(service) = params.get("service") {
            query.push(("service", service));
        }
        let token = send(http.get(realm.as_str()).query(&query), realm).await?;
        match token.status() {
            s if s.is_success() => Ok(()),
            s @ (reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN) => {
                Err(fail(format!("the token service {realm} refused the user name or password ({s})")))
            }
            s => Err(fail(format!("unexpected answer {s} from the token service {realm}"))),
        }
    }
}

/// `Bearer realm="https://auth.example/token",service="registry.example"` → `("bearer",
/// {realm: .., service: ..})`; `None` if it is not of that shape.
fn parse_challenge(header: &str) -> Option<(String, BTreeMap<String, String>)> {
    let header = header.trim();
    let (scheme, mut rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.is_empty() {
            break;
        }
        let (key, after) = rest.split_once('=')?;
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = after;
    }
    Some((scheme.to_ascii_lowercase(), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (scheme, p) =
            parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#).unwrap();
        assert_eq!(scheme, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        let (scheme, p) = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!((scheme.as_str(), p["realm"].as_str()), ("basic", "basic-realm"));
        let (_, p) = parse_challenge("Bearer realm=https://a/t, scope=x").unwrap();
        assert_eq!((p["realm"].as_str(), p["scope"].as_str()), ("https://a/t", "x"));
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge("Bearer garbage").is_none());
    }
}
