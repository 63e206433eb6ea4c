//! Cluster secrets sealed with a key the database does not hold.
//!
//! The store holds the cluster's CA key and join token (`cluster_secrets`, shared by hubs on
//! PostgreSQL) and every config and secret (`objects`, see [`crate::objects`]). Whoever
//! reads the database, or a backup of it, must not get them: each value is sealed
//! (ChaCha20-Poly1305, from `ring`, the AEAD the TLS stack already links) with a key derived
//! (HKDF-SHA256) from the *cluster key file*, which every hub of the cluster has and the
//! database never sees (`hub --cluster-key-file`, by default `<data dir>/cluster.key`, made
//! by the first hub). The row's name is the associated data, so a sealed value cannot be
//! moved to another row.
//!
//! The key file is a ring: one key per line (hex), oldest first; the last one seals. A value
//! names the key that sealed it (`sealed:v2:<key id>:...`), so after a rotation
//! ([`ClusterKey::rotated`]: a new line, every value sealed again) old values still open
//! until they are sealed again, and a hub whose file lacks a key says which one. Values of
//! format v1 (no key id, from before rotation) open with any key of the ring.
//!
//! Pure but for the random nonce and key: [`ClusterKey::seal`] and [`ClusterKey::open`].

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// What a value sealed before key rotation starts with.
const SEALED_V1: &str = "sealed:v1:";
/// What a sealed value starts with: `sealed:v2:<key id>:<hex of nonce and ciphertext>`.
const SEALED_V2: &str = "sealed:v2:";

/// The least key material one key of a cluster key file must hold.
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("a key of the cluster key file holds {0} bytes; at least {MIN_KEY_BYTES} are needed")]
    ShortKey(usize),
    #[error("the cluster key file holds no key")]
    NoKey,
    #[error("the value is not sealed (it does not start with sealed:v1: or sealed:v2:)")]
    NotSealed,
    #[error("the sealed value is malformed")]
    Malformed,
    #[error("the sealed value does not open with this cluster key (another cluster's key, or altered)")]
    WrongKey,
    #[error(
        "the value is sealed with key {0}, which this hub's cluster key file lacks (copy the file from the hub that rotated it)"
    )]
    UnknownKey(String),
    #[error("no randomness for a nonce")]
    Random,
}

/// One key of the ring.
struct Key {
    /// First 8 bytes of SHA-256 of the derived key, hex: names the key in sealed values
    /// without revealing anything of it.
    id: String,
    key: LessSafeKey,
}

/// The keys that seal cluster secrets: the last one seals, all of them open.
pub struct ClusterKey {
    keys: Vec<Key>,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey({} keys, current {})", self.keys.len(), self.current_id())
    }
}

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        CHACHA20_POLY1305.key_len()
    }
}

fn derive(material: &[u8]) -> Result<Key, SealError> {
    if material.len() < MIN_KEY_BYTES {
        return Err(SealError::ShortKey(material.len()));
    }
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"flotilla cluster secrets");
    let prk = salt.extract(material);
    let okm = prk.expand(&[b"sealed:v1"], KeyLen).map_err(|_| SealError::Malformed)?;
    let mut bytes = [0u8; 32];
    okm.fill(&mut bytes).map_err(|_| SealError::Malformed)?;
    let id = hex::encode(&Sha256::digest(bytes)[..8]);
    let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| SealError::Malformed)?;
    Ok(Key { id, key: LessSafeKey::new(key) })
}

impl ClusterKey {
    /// The ring in the contents of a cluster key file: each non-empty line (surrounding
    /// whitespace ignored) is one key's material, oldest first.
    pub fn from_material(material: &[u8]) -> Result<ClusterKey, SealError> {
        let keys = material
            .split(|b| *b == b'\n')
            .map(<[u8]>::trim_ascii)
            .filter(|l| !l.is_empty())
            .map(derive)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(SealError::NoKey);
        }
        Ok(ClusterKey { keys })
    }

    /// New key material for a cluster key file: 32 random bytes, hex, one line.
    pub fn generate_material() -> Result<String, SealError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes).map_err(|_| SealError::Random)?;
        Ok(format!("{}\n", hex::encode(bytes)))
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.keys.last().expect("a ring holds a key").id
    }

    /// Whether `sealed` was sealed by the current key (no need to seal it again).
    pub fn is_current(&self, sealed: &str) -> bool {
        sealed
            .strip_prefix(SEALED_V2)
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(id, _)| id == self.current_id())
    }

    /// Seals `value` for the row `name` with the current key.
    pub fn seal(&self, name: &str, value: &str) -> Result<String, SealError> {
        let current = self.keys.last().expect("a ring holds a key");
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut data = value.as_bytes().to_vec();
        current
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| SealError::Malformed)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{SEALED_V2}{}:{}", current.id, hex::encode(out)))
    }

    /// Opens a value [`ClusterKey::seal`] made for the row `name`, with whichever key of the
    /// ring sealed it.
    pub fn open(&self, name: &str, sealed: &str) -> Result<String, SealError> {
        let (candidates, hex_text): (Vec<&Key>, &str) = if let Some(rest) = sealed.strip_prefix(SEALED_V2) {
            let (id, hex_text) = rest.split_once(':').ok_or(SealError::Malformed)?;
            let key = self.keys.iter().find(|k| k.id == id).ok_or_else(|| SealError::UnknownKey(id.to_string()))?;
            (vec![key], hex_text)
        } else if let Some(hex_text) = sealed.strip_prefix(SEALED_V1) {
            (self.keys.iter().collect(), hex_text)
        } else {
            return Err(SealError::NotSealed);
        };
        let bytes = hex::decode(hex_text).map_err(|_| SealError::Malformed)?;
        if bytes.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(SealError::Malformed);
        }
        for key in candidates {
            let mut data = bytes[NONCE_LEN..].to_vec();
            let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN]).map_err(|_| SealError::Malformed)?;
            if let Ok(plain) = key.key.open_in_place(nonce, Aad::from(name.as_bytes()), &mut data) {
                return String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed);
            }
        }
        Err(SealError::WrongKey)
    }

    /// `material` (the key file's contents) with a new key appended: the file to write for a
    /// rotation, and the ring it makes.
    pub fn rotated(material: &str) -> Result<(String, ClusterKey), SealError> {
        let mut text = material.trim_end().to_string();
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&ClusterKey::generate_material()?);
        let ring = ClusterKey::from_material(text.as_bytes())?;
        Ok((text, ring))
    }
}

/// Whether a stored value is sealed (rather than written by a hub from before sealing).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_V1) || value.starts_with(SEALED_V2)
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
        assert_eq!(other.open("cluster-identity", &sealed), Err(SealError::UnknownKey(k.current_id().to_string())));
        // Another key claiming the same id (or a v1 value, which names none) does not open.
        let as_v1 = format!("sealed:v1:{}", sealed.rsplit(':').next().unwrap());
        assert_eq!(k.open("cluster-identity", &as_v1).unwrap(), secret, "values from before rotation open");
        assert_eq!(other.open("cluster-identity", &as_v1), Err(SealError::WrongKey));
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
        assert_eq!(k.open("r", "sealed:v2:nocolon"), Err(SealError::Malformed));
        assert_eq!(ClusterKey::from_material(b" \n\n").unwrap_err(), SealError::NoKey);
    }

    #[test]
    fn a_rotation_seals_with_the_new_key_and_old_values_open_until_sealed_again() {
        let first = ClusterKey::generate_material().unwrap();
        let old = key(&first);
        let before = old.seal("object:secret/db", "v").unwrap();
        let (file, ring) = ClusterKey::rotated(&first).unwrap();
        assert_eq!(file.lines().count(), 2, "{file}");
        assert!(file.starts_with(first.trim()), "the old key stays in the file");
        assert_ne!(ring.current_id(), old.current_id());
        assert!(old.is_current(&before) && !ring.is_current(&before));
        // Readable until done: the ring opens what the old key sealed.
        assert_eq!(ring.open("object:secret/db", &before).unwrap(), "v");
        let after = ring.seal("object:secret/db", "v").unwrap();
        assert!(ring.is_current(&after));
        // Once every value is sealed again, the old key can go from the file.
        let new_only = key(file.lines().last().unwrap());
        assert_eq!(new_only.open("object:secret/db", &after).unwrap(), "v");
        assert_eq!(new_only.open("object:secret/db", &before), Err(SealError::UnknownKey(old.current_id().into())));
        // The old key alone cannot read what the new one sealed.
        assert_eq!(old.open("object:secret/db", &after), Err(SealError::UnknownKey(ring.current_id().into())));
    }
}
