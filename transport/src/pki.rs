//! The cluster's certificate authority and the certificates it issues.
//!
//! Every key is ECDSA P-256. Certificates carry only what Flotilla relies on: the hub's server
//! certificate names [`HUB_SERVER_NAME`](crate::HUB_SERVER_NAME) (plus any extra names), client
//! certificates carry the identity in their common name (`node:<name>`, `admin:<name>`) and the
//! clientAuth extended key usage. Nothing a certificate signing request asks for is copied into
//! the certificate except its public key: the subject, the extensions and the CA flag all come
//! from the hub.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// How long the cluster CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Issued certificates start this far in the past so that a peer whose clock runs slightly
/// behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating a key pair failed: {0}")]
    KeyGeneration(rcgen::Error),
    #[error("private key is not a valid PEM key: {0}")]
    InvalidKey(rcgen::Error),
    #[error("certificate is not a valid PEM certificate: {0}")]
    InvalidCertificate(String),
    #[error("certificate authority certificate is not a CA certificate")]
    NotACa,
    #[error("certificate authority key does not match its certificate")]
    KeyMismatch,
    #[error("certificate signing request is invalid: {0}")]
    InvalidCsr(rcgen::Error),
    #[error("subject alternative name {name:?} is neither a DNS name nor an IP address")]
    InvalidName { name: String },
    #[error("validity of {0:?} is out of range")]
    InvalidValidity(Duration),
    #[error("signing the certificate failed: {0}")]
    Signing(rcgen::Error),
    #[error("generating a serial number failed")]
    Random,
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey").field("cert_pem", &self.cert_pem).field("key_pem", &"[elided]").finish()
    }
}

/// The cluster certificate authority: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new self-signed CA (ECDSA P-256, CA:true, valid for 10 years).
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(serial()?);
        set_validity(&mut params, CA_VALIDITY)?;
        let cert = params.self_signed(&key).map_err(PkiError::Signing)?;
        let cert_der = cert.der().clone();
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key), cert_der })
    }

    /// Loads a CA from its certificate and private key, checking that they belong together.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let cert_der = parse_cert_pem(cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::InvalidKey)?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
        if !x509.is_ca() {
            return Err(PkiError::NotACa);
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
        Ok(Ca { cert_pem: pem_of(&cert_der), cert_der, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Lowercase hex SHA-256 of the CA certificate DER: what join tokens pin.
    pub fn fingerprint(&self) -> String {
        fingerprint_der(&self.cert_der)
    }

    /// Issues the hub's server certificate: SAN `flotilla-hub` plus `extra_names` (strings that
    /// parse as IP addresses become IP SANs, the rest DNS SANs), serverAuth EKU.
    pub fn issue_server(&self, extra_names: &[String], validity: Duration) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::default();
        let mut names = vec![crate::HUB_SERVER_NAME.to_string()];
        for name in extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(&name) => match Ia5String::try_from(name.as_str()) {
                    Ok(dns) => SanType::DnsName(dns),
                    Err(_) => return Err(PkiError::InvalidName { name }),
                },
                Err(_) => return Err(PkiError::InvalidName { name }),
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name = subject(crate::HUB_SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = new_key()?;
        let cert_pem = self.sign_leaf(params, &key, validity)?;
        Ok(CertifiedKey { cert_pem, key_pem: key.serialize_pem() })
    }

    /// Issues a client certificate with a freshly generated key (admin credentials).
    pub fn issue_client(&self, common_name: &str, validity: Duration) -> Result<CertifiedKey, PkiError> {
        let key = new_key()?;
        let cert_pem = self.sign_leaf(client_params(common_name), &key, validity)?;
        Ok(CertifiedKey { cert_pem, key_pem: key.serialize_pem() })
    }

    /// Signs a PEM CSR; the subject is REPLACED by `common_name` (never trust the CSR's
    /// subject), clientAuth EKU; returns cert PEM.
    ///
    /// The CSR's signature is checked (the requester holds the key); only its public key is
    /// used. Requested extensions, including any CA flag, are ignored.
    pub fn sign_csr(&self, csr_pem: &str, common_name: &str, validity: Duration) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::InvalidCsr)?;
        self.sign_leaf(client_params(common_name), &csr.public_key, validity)
    }

    /// For tests: issue a client cert whose validity already ended.
    pub fn issue_client_expired(&self, common_name: &str) -> Result<CertifiedKey, PkiError> {
        let key = new_key()?;
        let mut params = client_params(common_name);
        params.serial_number = Some(serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(2);
        params.not_after = now - time::Duration::days(1);
        let cert = params.signed_by(&key, &self.issuer).map_err(PkiError::Signing)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        validity: Duration,
    ) -> Result<String, PkiError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial()?);
        set_validity(&mut params, validity)?;
        let cert = params.signed_by(public_key, &self.issuer).map_err(PkiError::Signing)?;
        Ok(cert.pem())
    }
}

/// Generates a key and a CSR for it with subject CN `common_name`; returns `(key_pem, csr_pem)`.
pub fn generate_csr(common_name: &str) -> Result<(String, String), PkiError> {
    let key = new_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name);
    let csr = params.serialize_request(&key).map_err(PkiError::Signing)?.pem().map_err(PkiError::Signing)?;
    Ok((key.serialize_pem(), csr))
}

/// A CSR with subject CN `common_name` for the existing key `key_pem`: what an agent sends to
/// renew its certificate. Its signature proves the sender holds the key the certificate names.
pub fn csr_for_key(key_pem: &str, common_name: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(PkiError::InvalidKey)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name);
    params.serialize_request(&key).map_err(PkiError::Signing)?.pem().map_err(PkiError::Signing)
}

/// The public key (the raw subjectPublicKey bits) of a PEM CSR, after checking its signature.
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    use rcgen::PublicKeyData as _;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::InvalidCsr)?;
    Ok(csr.public_key.der_bytes().to_vec())
}

/// What the hub and agents read from a certificate: its name, its validity, its key and its
/// fingerprint. Nothing here is verified; see [`crate::tls::verify_client_cert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    /// The subject's common name (`node:<name>`, `admin:<name>`), empty if it has none.
    pub common_name: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The raw subjectPublicKey bits, comparable with [`csr_public_key`].
    pub public_key: Vec<u8>,
    /// As [`fingerprint_pem`].
    pub fingerprint: String,
}

impl LeafFacts {
    /// When to renew: two thirds into the certificate's life, counted from when it was issued
    /// (certificates are backdated by a few minutes for slow clocks; that is not life used).
    pub fn renew_after(&self) -> SystemTime {
        let issued = (self.not_before + BACKDATE).min(self.not_after);
        let life = self.not_after.duration_since(issued).unwrap_or_default();
        issued + life * 2 / 3
    }
}

/// Reads the first certificate of `cert_pem`.
pub fn leaf_facts(cert_pem: &str) -> Result<LeafFacts, PkiError> {
    leaf_facts_der(&parse_cert_pem(cert_pem)?)
}

pub(crate) fn leaf_facts_der(der: &[u8]) -> Result<LeafFacts, PkiError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    let common_name =
        x509.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
    Ok(LeafFacts {
        common_name,
        not_before: system_time(x509.validity().not_before.timestamp())?,
        not_after: system_time(x509.validity().not_after.timestamp())?,
        public_key: x509.public_key().subject_public_key.data.to_vec(),
        fingerprint: fingerprint_der(der),
    })
}

fn system_time(secs: i64) -> Result<SystemTime, PkiError> {
    let out = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    out.ok_or_else(|| PkiError::InvalidCertificate("validity date is out of range".into()))
}

/// Lowercase hex SHA-256 of the DER of the first certificate in `cert_pem`.
pub fn fingerprint_pem(cert_pem: &str) -> Result<String, PkiError> {
    Ok(fingerprint_der(&parse_cert_pem(cert_pem)?))
}

/// The end of the validity period of the first certificate in `cert_pem`.
pub fn cert_not_after(cert_pem: &str) -> Result<SystemTime, PkiError> {
    Ok(leaf_facts(cert_pem)?.not_after)
}

pub(crate) fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses the first certificate of a PEM bundle.
pub(crate) fn parse_cert_pem(cert_pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::InvalidCertificate(e.to_string()))
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Letters, digits, hyphens and dots (and a leading `*.` wildcard label), as webpki accepts.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn new_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn client_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    let span = time::Duration::try_from(validity).map_err(|_| PkiError::InvalidValidity(validity))?;
    params.not_before = now - time::Duration::try_from(BACKDATE).unwrap_or(time::Duration::ZERO);
    params.not_after = now.checked_add(span).ok_or(PkiError::InvalidValidity(validity))?;
    Ok(())
}

/// A random 16-byte positive serial number.
fn serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // non-zero leading byte keeps the DER encoding at full length
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn parse(pem: &str) -> (String, bool, Vec<String>, bool, bool) {
        let der = parse_cert_pem(pem).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn =
            x509.subject().iter_common_name().map(|cn| cn.as_str().unwrap().to_string()).collect::<Vec<_>>().join(",");
        let sans = x509
            .subject_alternative_name()
            .unwrap()
            .map(|ext| ext.value.general_names.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default();
        let eku = x509.extended_key_usage().unwrap().map(|e| e.value.clone());
        let client = eku.as_ref().is_some_and(|e| e.client_auth);
        let server = eku.as_ref().is_some_and(|e| e.server_auth);
        (cn, x509.is_ca(), sans, client, server)
    }

    #[test]
    fn a_renewal_csr_names_the_key_of_the_certificate_it_renews() {
        let ca = Ca::generate("test ca").unwrap();
        let (key_pem, csr_pem) = generate_csr("node:edge-1").unwrap();
        let cert = ca.sign_csr(&csr_pem, "node:edge-1", HOUR * 3).unwrap();
        let facts = leaf_facts(&cert).unwrap();
        assert_eq!(facts.common_name, "node:edge-1");
        assert_eq!(facts.fingerprint, fingerprint_pem(&cert).unwrap());
        let renewal = csr_for_key(&key_pem, "node:edge-1").unwrap();
        assert_eq!(csr_public_key(&renewal).unwrap(), facts.public_key);
        let (_, other) = generate_csr("node:edge-1").unwrap();
        assert_ne!(csr_public_key(&other).unwrap(), facts.public_key);
        assert!(csr_public_key("not a csr").is_err());
        // Two hours into a three-hour life, not counting the backdating.
        let issued = facts.not_before + BACKDATE;
        let renew = facts.renew_after().duration_since(issued).unwrap();
        assert!(renew.abs_diff(HOUR * 2) <= Duration::from_secs(2), "{renew:?}");
    }

    #[test]
    fn ca_fingerprint_is_sha256_of_der() {
        let ca = Ca::generate("test ca").unwrap();
        let fp = ca.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(fp.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(fingerprint_pem(ca.cert_pem()).unwrap(), fp);
        let (cn, is_ca, ..) = parse(ca.cert_pem());
        assert_eq!(cn, "test ca");
        assert!(is_ca);
        let ten_years = SystemTime::now() + CA_VALIDITY;
        let not_after = cert_not_after(ca.cert_pem()).unwrap();
        let diff = ten_years.duration_since(not_after).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(60), "{diff:?}");
    }

    #[test]
    fn load_round_trips_and_checks_the_key() {
        let ca = Ca::generate("test ca").unwrap();
        let loaded = Ca::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());

        let other = Ca::generate("other").unwrap();
        let err = Ca::load(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");

        let leaf = ca.issue_client("admin:x", HOUR).unwrap();
        let err = Ca::load(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(err, PkiError::NotACa), "{err}");

        assert!(Ca::load("garbage", &ca.key_pem()).is_err());
        assert!(Ca::load(ca.cert_pem(), "garbage").is_err());
    }

    #[test]
    fn server_cert_names_the_hub_and_extra_names() {
        let ca = Ca::generate("test ca").unwrap();
        let names = ["10.0.0.7".to_string(), "hub.example.org".to_string()];
        let server = ca.issue_server(&names, HOUR).unwrap();
        let (cn, is_ca, sans, client, srv) = parse(&server.cert_pem);
        assert_eq!(cn, crate::HUB_SERVER_NAME);
        assert!(!is_ca);
        assert!(srv && !client);
        assert_eq!(sans, ["DNSName(flotilla-hub)", "IPAddress(0a:00:00:07)", "DNSName(hub.example.org)"]);
        let err = ca.issue_server(&["not a name".to_string()], HOUR).unwrap_err();
        assert!(matches!(err, PkiError::InvalidName { ref name } if name == "not a name"), "{err}");
    }

    #[test]
    fn client_cert_has_cn_and_client_auth() {
        let ca = Ca::generate("test ca").unwrap();
        let admin = ca.issue_client("admin:alice", HOUR).unwrap();
        let (cn, is_ca, sans, client, server) = parse(&admin.cert_pem);
        assert_eq!(cn, "admin:alice");
        assert!(!is_ca && client && !server && sans.is_empty());
        let left = cert_not_after(&admin.cert_pem).unwrap().duration_since(SystemTime::now()).unwrap();
        assert!(left <= HOUR && left > HOUR - Duration::from_secs(60), "{left:?}");
        assert!(!format!("{admin:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn sign_csr_replaces_the_subject_and_ignores_requested_extensions() {
        let ca = Ca::generate("test ca").unwrap();
        // A hostile CSR: admin subject, asks to be a CA, with a server SAN and serverAuth.
        let key = new_key().unwrap();
        let mut params = CertificateParams::new(vec!["flotilla-hub".to_string()]).unwrap();
        params.distinguished_name = subject("admin:root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let cert = ca.sign_csr(&csr, "node:alpha", HOUR).unwrap();
        let (cn, is_ca, sans, client, server) = parse(&cert);
        assert_eq!(cn, "node:alpha");
        assert!(!is_ca, "a CSR must never yield a CA certificate");
        assert!(sans.is_empty(), "requested SANs must be dropped: {sans:?}");
        assert!(client && !server);

        // The certificate is for the CSR's key.
        let der = parse_cert_pem(&cert).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(x509.public_key().subject_public_key.data.as_ref(), key.public_key_raw());
    }

    #[test]
    fn generate_csr_round_trips() {
        let ca = Ca::generate("test ca").unwrap();
        let (key_pem, csr_pem) = generate_csr("whatever").unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let cert = ca.sign_csr(&csr_pem, "node:b", HOUR).unwrap();
        assert_eq!(parse(&cert).0, "node:b");
    }

    #[test]
    fn garbage_csr_is_an_error() {
        let ca = Ca::generate("test ca").unwrap();
        let err = ca
            .sign_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "node:x", HOUR)
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr(_)), "{err}");
        assert!(ca.sign_csr("", "node:x", HOUR).is_err());
    }

    #[test]
    fn serials_differ_for_the_same_key() {
        let ca = Ca::generate("test ca").unwrap();
        let (_, csr) = generate_csr("x").unwrap();
        let a = parse_cert_pem(&ca.sign_csr(&csr, "node:a", HOUR).unwrap()).unwrap();
        let b = parse_cert_pem(&ca.sign_csr(&csr, "node:a", HOUR).unwrap()).unwrap();
        let serial = |d: &CertificateDer<'_>| x509_parser::parse_x509_certificate(d).unwrap().1.raw_serial().to_vec();
        assert_ne!(serial(&a), serial(&b));
    }

    #[test]
    fn huge_validity_is_an_error_not_a_panic() {
        let ca = Ca::generate("test ca").unwrap();
        let err = ca.issue_client("admin:x", Duration::MAX).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity(_)), "{err}");
    }
}
