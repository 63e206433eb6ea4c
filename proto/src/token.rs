//! Join tokens: `FLT1::<ca-sha256-hex>::<secret-hex>`. The first part pins the cluster CA, so
//! an agent holding the token cannot be fooled by another server; the second part is the
//! shared secret the hub checks before it signs a node certificate.

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "FLT1";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Lowercase hex SHA-256 of the CA certificate (DER).
    pub ca_fingerprint: String,
    /// Lowercase hex secret.
    pub secret: String,
}

// Never print the secret, not even in debug logs.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}::{}::{}", self.ca_fingerprint, self.secret)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed join token: {0}")]
pub struct TokenError(&'static str);

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split("::");
        if parts.next() != Some(PREFIX) {
            return Err(TokenError("expected it to start with FLT1::"));
        }
        let (Some(fp), Some(secret), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError("expected FLT1::<ca fingerprint>::<secret>"));
        };
        if fp.len() != 64 || !is_hex(fp) {
            return Err(TokenError("the CA fingerprint must be 64 lowercase hex characters"));
        }
        if secret.len() < 32 || !is_hex(secret) {
            return Err(TokenError("the secret must be at least 32 lowercase hex characters"));
        }
        Ok(JoinToken { ca_fingerprint: fp.to_string(), secret: secret.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_redaction() {
        let t = JoinToken { ca_fingerprint: "a".repeat(64), secret: "b".repeat(32) };
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(!format!("{t:?}").contains(&"b".repeat(32)));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "K10::x::y",
            "FLT1::abc::def",
            &format!("FLT1::{}::short", "a".repeat(64)),
            &format!("FLT1::{}::{}::x", "a".repeat(64), "b".repeat(32)),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }
}
