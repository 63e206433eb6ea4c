//! Configs and secrets: named sets of keys and values that workloads read as files or as
//! environment variables (`kind: Config`, `kind: Secret`).
//!
//! The two kinds have one shape; a Secret's values are confidential, and this module is
//! written so they do not leak through it: parse errors name a key's path and never echo a
//! value, `Debug` of [`ObjectData`] prints keys and sizes only, and what `get` and `describe`
//! show is an [`ObjectView`] (keys, sizes, a digest), never the data.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::manifest::{API_VERSION, InvalidValue, ManifestError, Metadata, validate_name};

/// Largest object, counting every key and value: 1 MiB.
pub const MAX_OBJECT_DATA: usize = 1024 * 1024;
/// Longest key (a key becomes a file name).
pub const MAX_KEY_LEN: usize = 253;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ObjectKind {
    /// `kind: Config`: plain settings and files.
    Config,
    /// `kind: Secret`: confidential values, sealed in the hub's store, sent only to the nodes
    /// that run a reader, and never shown.
    Secret,
}

impl ObjectKind {
    /// The lowercase word used in references and on the command line (`secret/db`).
    pub fn word(self) -> &'static str {
        match self {
            ObjectKind::Config => "config",
            ObjectKind::Secret => "secret",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Config => "Config",
            ObjectKind::Secret => "Secret",
        })
    }
}

/// A config or a secret named by a workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.word(), self.name)
    }
}

impl ObjectRef {
    pub fn new(kind: ObjectKind, name: impl Into<String>) -> ObjectRef {
        ObjectRef { kind, name: name.into() }
    }

    /// Parses `secret/db` or `config/app`.
    pub fn parse(s: &str) -> Option<ObjectRef> {
        let (kind, name) = s.split_once('/')?;
        let kind = match kind {
            "secret" => ObjectKind::Secret,
            "config" => ObjectKind::Config,
            _ => return None,
        };
        validate_name(name).ok()?;
        Some(ObjectRef::new(kind, name))
    }
}

/// A config's or a secret's content. Values are bytes (a key file, a certificate); on the wire
/// they travel as base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectData {
    pub kind: ObjectKind,
    pub name: String,
    #[serde(with = "b64_map")]
    pub data: BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for ObjectData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sizes: BTreeMap<&str, usize> = self.data.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
        f.debug_struct("ObjectData").field("kind", &self.kind).field("name", &self.name).field("sizes", &sizes).finish()
    }
}

impl ObjectData {
    pub fn reference(&self) -> ObjectRef {
        ObjectRef::new(self.kind, self.name.clone())
    }

    /// Bytes of keys and values together (what [`MAX_OBJECT_DATA`] bounds).
    pub fn size(&self) -> usize {
        self.data.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// SHA-256 over the keys and values (each length-prefixed), hex: equal digests mean equal
    /// content. Shown in place of the values.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (k, v) in &self.data {
            h.update((k.len() as u64).to_be_bytes());
            h.update(k.as_bytes());
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
        hex::encode(h.finalize())
    }

    /// Checks the name, the keys and the size.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Err(InvalidValue(m)) = validate_name(&self.name) {
            return Err(("metadata.name".into(), m));
        }
        for k in self.data.keys() {
            if let Err(InvalidValue(m)) = validate_key(k) {
                return Err((format!("data.{k}"), m));
            }
        }
        let size = self.size();
        if size > MAX_OBJECT_DATA {
            return Err((
                "data".into(),
                format!("the {} holds {size} bytes; the limit is {MAX_OBJECT_DATA} bytes (1 MiB)", self.kind),
            ));
        }
        Ok(())
    }

    /// What may be shown of it.
    pub fn view(&self, version: u64, in_use_by: Vec<String>) -> ObjectView {
        ObjectView {
            kind: self.kind,
            name: self.name.clone(),
            version,
            digest: self.digest(),
            keys: self.data.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect(),
            used_by: in_use_by,
        }
    }
}

/// A key names a file: letters, digits, `-`, `_` and `.`, not `.` or `..` and not starting
/// with `..` (the file updater's own names do).
pub fn validate_key(key: &str) -> Result<(), InvalidValue> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.chars().all(ok) || key == "." || key.starts_with("..") {
        return Err(InvalidValue(format!(
            "key {key:?} must be 1-{MAX_KEY_LEN} letters, digits, '-', '_' or '.', and neither '.' nor start with '..'"
        )));
    }
    Ok(())
}

/// What `get` and `describe` show of a config or secret: never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectView {
    pub kind: ObjectKind,
    pub name: String,
    /// Grows by one with each change of content.
    pub version: u64,
    pub digest: String,
    /// Each key and its value's size in bytes.
    pub keys: BTreeMap<String, u64>,
    /// The workloads that read it.
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// The current version of an object a node's replicas read; part of an assignment so the
/// node knows when to fetch it again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectVersion {
    pub kind: ObjectKind,
    pub name: String,
    pub version: u64,
    /// [`ObjectData::digest`] of that version: the node checks what it fetched against it.
    pub digest: String,
}

impl ObjectVersion {
    pub fn reference(&self) -> ObjectRef {
        ObjectRef::new(self.kind, self.name.clone())
    }
}

/// Named keys and values that workloads read as files (a volume's `config` or `secret`) or as
/// environment variables (`env`, `envFrom`); at most 1 MiB of keys and values.
// The shape [`parse_object`] reads, for the manifest schema only: that function reads these
// documents by hand, so that no error echoes a value, and keeps only `metadata.name`.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectManifest {
    /// Always `flotilla.dev/v1`.
    #[schemars(extend("const" = API_VERSION))]
    pub api_version: String,
    /// `Config` or `Secret`.
    pub kind: ObjectKind,
    /// The object's name (labels are accepted and not kept).
    pub metadata: Metadata,
    /// Keys and their text values (quote numbers and booleans). A key names a file: letters,
    /// digits, '-', '_' and '.'.
    pub data: Option<BTreeMap<String, String>>,
    /// Keys and their binary values, base64-encoded; a key may not also be in `data`.
    pub binary_data: Option<BTreeMap<String, String>>,
}

/// Reads one `kind: Config` or `kind: Secret` document (already parsed from YAML within
/// limits). Errors name the field and never the value.
pub fn parse_object(document: usize, value: Value) -> Result<ObjectData, ManifestError> {
    let err = |path: &str, msg: String| ManifestError::new(document, path, msg);
    let Value::Object(mut map) = value else {
        return Err(err("(document)", "expected a mapping".into()));
    };
    for key in map.keys() {
        if !matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "data" | "binaryData") {
            return Err(err(
                key,
                "unknown field; a Config or Secret has apiVersion, kind, metadata, data and binaryData".into(),
            ));
        }
    }
    match map.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        _ => return Err(err("apiVersion", format!("expected {API_VERSION:?}"))),
    }
    let kind = match map.get("kind") {
        Some(Value::String(k)) if k == "Config" => ObjectKind::Config,
        Some(Value::String(k)) if k == "Secret" => ObjectKind::Secret,
        _ => return Err(err("kind", "expected Config or Secret".into())),
    };
    let metadata: Metadata = match map.remove("metadata") {
        None => return Err(err("metadata", "missing".into())),
        Some(m) => serde_path_to_error::deserialize(m)
            .map_err(|e| err(&format!("metadata.{}", e.path()), e.into_inner().to_string()))?,
    };
    let mut data = BTreeMap::new();
    for (field, binary) in [("data", false), ("binaryData", true)] {
        match map.remove(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(entries)) => {
                for (k, v) in entries {
                    let path = format!("{field}.{k}");
                    // Only the type is named: a value may be confidential.
                    let Value::String(s) = v else {
                        return Err(err(&path, "must be a string (quote numbers and booleans)".into()));
                    };
                    let bytes = if binary {
                        base64::engine::general_purpose::STANDARD
                            .decode(s.trim())
                            .map_err(|_| err(&path, "is not valid base64".into()))?
                    } else {
                        s.into_bytes()
                    };
                    if data.insert(k, bytes).is_some() {
                        return Err(err(&path, "is in both data and binaryData".into()));
                    }
                }
            }
            Some(_) => return Err(err(field, "must be a mapping of keys to values".into())),
        }
    }
    let object = ObjectData { kind, name: metadata.name, data };
    object.validate().map_err(|(path, msg)| err(&path, msg))?;
    Ok(object)
}

/// Serde for a map of byte values as base64 strings.
mod b64_map {
    use std::collections::BTreeMap;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, STANDARD.encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let text: BTreeMap<String, String> = BTreeMap::deserialize(d)?;
        text.into_iter()
            .map(|(k, v)| {
                let bytes = STANDARD.decode(v).map_err(|_| serde::de::Error::custom("a value is not valid base64"))?;
                Ok((k, bytes))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> Value {
        crate::yaml::documents(yaml, &crate::yaml::Limits::default()).unwrap().remove(0)
    }

    #[test]
    fn a_secret_parses_with_text_and_binary_values() {
        let s = parse_object(
            1,
            doc("apiVersion: flotilla.dev/v1\nkind: Secret\nmetadata: {name: db}\ndata: {password: hunter2}\nbinaryData: {key.bin: AAEC}\n"),
        )
        .unwrap();
        assert_eq!(s.kind, ObjectKind::Secret);
        assert_eq!(s.data["password"], b"hunter2");
        assert_eq!(s.data["key.bin"], vec![0, 1, 2]);
        assert_eq!(s.size(), "password".len() + 7 + "key.bin".len() + 3);
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        let wire = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ObjectData>(&wire).unwrap(), s);
    }

    #[test]
    fn errors_name_the_field_and_never_the_value() {
        for (yaml, path) in [
            ("kind: Secret\nmetadata: {name: db}\ndata: {pin: 123456789}", "data.pin"),
            ("kind: Secret\nmetadata: {name: db}\nbinaryData: {k: 'sekrit!!'}", "binaryData.k"),
            ("kind: Secret\nmetadata: {name: db}\ndata: {'../x': sekrit}", "data.../x"),
            ("kind: Secret\nmetadata: {name: db}\ndata: {a: sekrit}\nbinaryData: {a: AAEC}", "binaryData.a"),
            ("kind: Secret\nmetadata: {name: db}\nspec: {a: sekrit}", "spec"),
        ] {
            let e = parse_object(1, doc(&format!("apiVersion: flotilla.dev/v1\n{yaml}"))).unwrap_err();
            assert_eq!(e.path, path, "{e}");
            let text = e.to_string();
            assert!(!text.contains("123456789") && !text.contains("sekrit"), "{text}");
        }
    }

    #[test]
    fn an_object_past_one_mebibyte_is_refused_with_its_size() {
        let big = "x".repeat(MAX_OBJECT_DATA);
        let e = parse_object(
            1,
            doc(&format!("apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {{name: c}}\ndata: {{k: {big}}}")),
        )
        .unwrap_err();
        assert_eq!(e.path, "data");
        assert!(e.message.contains(&format!("{} bytes", MAX_OBJECT_DATA + 1)), "{e}");
    }

    #[test]
    fn the_digest_follows_the_content() {
        let a =
            ObjectData { kind: ObjectKind::Config, name: "c".into(), data: [("k".to_string(), b"v".to_vec())].into() };
        let mut b = a.clone();
        assert_eq!(a.digest(), b.digest());
        b.data.insert("k".into(), b"w".to_vec());
        assert_ne!(a.digest(), b.digest());
        // Keys and values cannot trade bytes.
        let c =
            ObjectData { kind: ObjectKind::Config, name: "c".into(), data: [("kv".to_string(), Vec::new())].into() };
        let d =
            ObjectData { kind: ObjectKind::Config, name: "c".into(), data: [("k".to_string(), b"v".to_vec())].into() };
        assert_ne!(c.digest(), d.digest());
        assert_eq!(ObjectRef::parse("secret/db"), Some(ObjectRef::new(ObjectKind::Secret, "db")));
        assert_eq!(ObjectRef::parse("vault/db"), None);
        assert_eq!(ObjectRef::new(ObjectKind::Config, "app").to_string(), "config/app");
    }
}
