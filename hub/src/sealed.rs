//! Cluster secrets sealed with a key the database does not hold.
//!
//! Hubs that share a PostgreSQL store share the cluster's CA key and join token through it
//! (`cluster_secrets`). Whoever reads the database, or a backup of it, must not get them: the
//! row holds them sealed (ChaCha20-Poly1305, from `ring`, the AEAD the TLS stack already
//! links) with a key derived (HKDF-SHA256) from the *cluster key*, a file every hub of the
//! cluster has and the database never sees (`hub --cluster-key-file`, by default
//! `<data dir>/cluster.key`, made by the first hub). The row's name is the associated data,
//! so a sealed value cannot be moved to another row.
//!
//! Pure but for the random nonce: [`ClusterKey::seal`] and [`ClusterKey::open`].

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// What a sealed value starts with (the version names the algorithm and derivation).
pub const SEALED_PREFIX: &str = "sealed:v1:";

/// The least key material a cluster key file must hold.
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the cluster key holds {0} bytes; at least {MIN_KEY_BYTES} are needed")]
    ShortKey(usize),
    #[error("the value is not sealed (it does not start with {SEALED_PREFIX:?})")]
    NotSealed,
    #[error("the sealed value is malformed")]
    Malformed,
    #[error("the sealed value does not open with this cluster key (another cluster's key, or altered)")]
    WrongKey,
    #[error("no randomness for a nonce")]
    Random,
}

/// The key that seals cluster secrets.
pub struct ClusterKey(LessSafeKey);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        CHACHA20_POLY1305.key_len()
    }
}

impl ClusterKey {
    /// Derives the sealing key from the contents of a cluster key file (surrounding
    /// whitespace ignored, so a hex line with a newline is as good as raw bytes).
    pub fn from_material(material: &[u8]) -> Result<ClusterKey, SealError> {
        let material = material.trim_ascii();
        if material.len() < MIN_KEY_BYTES {
            return Err(SealError::ShortKey(material.len()));
        }
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"flotilla cluster secrets");
        let prk = salt.extract(material);
        let okm = prk.expand(&[b"sealed:v1"], KeyLen).map_err(|_| SealError::Malformed)?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).map_err(|_| SealError::Malformed)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| SealError::Malformed)?;
        Ok(ClusterKey(LessSafeKey::new(key)))
    }

    /// New key material for a cluster key file: 32 random bytes, hex, one line.
    pub fn generate_material() -> Result<String, SealError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| SealError::Random)?;
        Ok(format!("{}\n", hex::encode(bytes)))
    }

    /// Seals `value` for the row `name`.
    pub fn seal(&self, name: &str, value: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut data = value.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| SealError::Malformed)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{SEALED_PREFIX}{}", hex::encode(out)))
    }

    /// Opens a value [`ClusterKey::seal`] made for the row `name`.
    pub fn open(&self, name: &str, sealed: &str) -> Result<String, SealError> {
        let hex_text = sealed.strip_prefix(SEALED_PREFIX).ok_or(SealError::NotSealed)?;
        let mut bytes = hex::decode(hex_text).map_err(|_| SealError::Malformed)?;
        if bytes.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(SealError::Malformed);
        }
        let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN]).map_err(|_| SealError::Malformed)?;
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut bytes[NONCE_LEN..])
            .map_err(|_| SealError::WrongKey)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed)
    }
}

/// Whether a stored value is sealed (rather than written by a hub from before sealing).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(material: &str) -> ClusterKey {
        ClusterKey::from_material(material.as_bytes()).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_its_row() {
        let material = ClusterKey::generate_material().unwrap();
        assert_eq!(material.trim().len(), 64);
        let k = key(&material);
        let secret = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n";
        let sealed = k.seal("cluster-identity", secret).unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("PRIVATE"), "nothing readable is left: {sealed}");
        assert_ne!(sealed, k.seal("cluster-identity", secret).unwrap(), "each seal has its own nonce");
        assert_eq!(k.open("cluster-identity", &sealed).unwrap(), secret);
        // The same material with a trailing newline or without is the same key.
        assert_eq!(key(material.trim()).open("cluster-identity", &sealed).unwrap(), secret);

        let other = key(&ClusterKey::generate_material().unwrap());
        assert_eq!(other.open("cluster-identity", &sealed), Err(SealError::WrongKey));
        assert_eq!(k.open("another-row", &sealed), Err(SealError::WrongKey), "bound to its row");
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.open("cluster-identity", std::str::from_utf8(&altered).unwrap()), Err(SealError::WrongKey));
    }

    #[test]
    fn bad_keys_and_bad_values_are_named() {
        assert_eq!(ClusterKey::from_material(b"  short  \n").unwrap_err(), SealError::ShortKey(5));
        let k = key(&"k".repeat(40));
        assert_eq!(k.open("r", "{\"json\": 1}"), Err(SealError::NotSealed));
        assert_eq!(k.open("r", "sealed:v1:zz"), Err(SealError::Malformed));
        assert_eq!(k.open("r", "sealed:v1:00"), Err(SealError::Malformed));
    }
}
