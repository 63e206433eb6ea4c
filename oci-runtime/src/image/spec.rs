//! The JSON documents of container images (OCI image index and manifest, their Docker v2
//! equivalents, the image config) as far as Flotilla reads them, media types, and chain ids.
//! Pure parsing: never touches the network or the file system.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::platform::Platform;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker v2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed OCI layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Gzip OCI layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Zstd OCI layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Uncompressed Docker layer.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Gzip Docker layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Manifest media types asked for when resolving a reference.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST];

/// Whether `media_type` is a layer tar this crate can unpack (plain, gzip or zstd; OCI,
/// OCI non-distributable or Docker).
pub fn is_layer_media_type(media_type: &str) -> bool {
    let base = media_type.replace(".nondistributable", "");
    matches!(base.as_str(), OCI_LAYER_TAR | OCI_LAYER_GZIP | OCI_LAYER_ZSTD | DOCKER_LAYER_TAR | DOCKER_LAYER_GZIP)
        || base == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Platform, in index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformJson>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The platform object of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformJson {
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// CPU variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index / manifest list, or an image manifest: which one is decided by the fields
/// present, since `mediaType` is optional in OCI documents.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnyManifest {
    /// Must be 2.
    pub schema_version: u32,
    /// Media type, if the document names it.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Index entries.
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    /// Manifest config descriptor.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Manifest layers.
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug, Clone)]
pub enum Parsed {
    /// An index with its entries.
    Index(Vec<Descriptor>),
    /// An image manifest with config and layers.
    Manifest {
        /// Config descriptor.
        config: Descriptor,
        /// Layer descriptors, bottom first.
        layers: Vec<Descriptor>,
    },
}

/// What is wrong with a manifest or index document, or with the choice among its entries.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of a manifest or index.
    #[error("not a manifest or index: {0}")]
    NotJson(#[source] serde_json::Error),
    /// A schema version other than 2.
    #[error("unsupported schemaVersion {0}")]
    SchemaVersion(u32),
    /// Neither entries (an index) nor a config (a manifest).
    #[error("document (media type {media_type}) is neither an image index nor an image manifest")]
    Neither {
        /// The document's media type, or "unspecified".
        media_type: String,
    },
    /// No entry of an index fits the platform.
    #[error("no manifest for platform {wanted} in image index (platforms: [{}])", available.join(", "))]
    NoPlatform {
        /// The platform wanted.
        wanted: Platform,
        /// The platforms the index has.
        available: Vec<String>,
    },
}

/// Parses a manifest or index; the error says what is wrong.
pub fn parse_manifest(bytes: &[u8]) -> Result<Parsed, ManifestError> {
    let m: AnyManifest = serde_json::from_slice(bytes).map_err(ManifestError::NotJson)?;
    if m.schema_version != 2 {
        return Err(ManifestError::SchemaVersion(m.schema_version));
    }
    match (m.manifests, m.config, m.layers) {
        (Some(entries), None, _) => Ok(Parsed::Index(entries)),
        (None, Some(config), layers) => Ok(Parsed::Manifest { config, layers: layers.unwrap_or_default() }),
        _ => Err(ManifestError::Neither { media_type: m.media_type.unwrap_or_else(|| "unspecified".to_owned()) }),
    }
}

/// Picks the index entry for `platform`; the error lists the platforms the index has.
pub fn select_platform<'a>(entries: &'a [Descriptor], platform: &Platform) -> Result<&'a Descriptor, ManifestError> {
    entries
        .iter()
        .filter_map(|e| {
            let p = e.platform.as_ref()?;
            Some((platform.fit(&p.os, &p.architecture, p.variant.as_deref())?, e))
        })
        // max_by_key returns the last maximum; reverse so the first of equals wins.
        .rev()
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e)
        .ok_or_else(|| ManifestError::NoPlatform {
            wanted: platform.clone(),
            available: entries
                .iter()
                .map(|e| match &e.platform {
                    Some(p) => Platform::new(&p.os, &p.architecture, p.variant.as_deref()).to_string(),
                    None => "unspecified".to_owned(),
                })
                .collect(),
        })
}

/// The image config document, as far as Flotilla reads it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigDoc {
    /// Architecture the image was built for.
    #[serde(default)]
    pub architecture: String,
    /// OS the image was built for.
    #[serde(default)]
    pub os: String,
    /// CPU variant.
    #[serde(default)]
    pub variant: Option<String>,
    /// Execution parameters.
    #[serde(default)]
    pub config: Option<ExecConfig>,
    /// Layer diff ids.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// The `config` object of an image config (Docker capitalisation).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    /// `User`.
    #[serde(default)]
    pub user: Option<String>,
    /// `Env`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `ExposedPorts`.
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// `Volumes`.
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    /// `Labels`.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// `StopSignal`.
    #[serde(default)]
    pub stop_signal: Option<String>,
}

/// The `rootfs` object of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    /// Digests of the uncompressed layer tars, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Chain ids per the OCI image spec: `chainid(L0) = diffid(L0)`,
/// `chainid(Ln) = sha256(chainid(Ln-1) + " " + diffid(Ln))`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(prev) => format!("sha256:{}", hex::encode(Sha256::digest(format!("{prev} {diff_id}").as_bytes()))),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.to_owned(),
            digest: format!("sha256:{}", hex::encode([n; 32])),
            size: 1,
            platform: Some(PlatformJson {
                architecture: arch.to_owned(),
                os: os.to_owned(),
                variant: variant.map(str::to_owned),
            }),
            annotations: None,
        }
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let d = |n: u8| format!("sha256:{}", hex::encode([n; 32]));
        let ids = chain_ids(&[d(1), d(2), d(3)]);
        assert_eq!(ids[0], d(1));
        let c1 = format!("sha256:{}", hex::encode(Sha256::digest(format!("{} {}", d(1), d(2)))));
        assert_eq!(ids[1], c1);
        let c2 = format!("sha256:{}", hex::encode(Sha256::digest(format!("{} {}", c1, d(3)))));
        assert_eq!(ids[2], c2);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn platform_selection() {
        let entries = vec![
            entry("linux", "arm", Some("v6"), 1),
            entry("linux", "arm", Some("v7"), 2),
            entry("linux", "amd64", Some("v3"), 3),
            entry("linux", "amd64", None, 4),
            entry("unknown", "unknown", None, 5),
        ];
        let pick = |p: &str| select_platform(&entries, &Platform::parse(p).unwrap()).map(|e| e.digest.clone());
        assert_eq!(pick("linux/arm/v7").unwrap(), entries[1].digest);
        assert_eq!(pick("linux/amd64").unwrap(), entries[3].digest);
        assert_eq!(pick("linux/amd64/v3").unwrap(), entries[2].digest);
        let err = pick("linux/riscv64").unwrap_err().to_string();
        assert!(err.contains("linux/riscv64"), "{err}");
        assert!(err.contains("linux/arm/v6, linux/arm/v7, linux/amd64/v3, linux/amd64, unknown/unknown"), "{err}");
    }

    #[test]
    fn manifest_parsing() {
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(parse_manifest(idx), Ok(Parsed::Index(e)) if e.is_empty()));
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"x","digest":"sha256:00","size":2},"layers":[]}"#;
        assert!(matches!(parse_manifest(m), Ok(Parsed::Manifest { .. })));
        assert!(parse_manifest(br#"{"schemaVersion":1}"#).unwrap_err().to_string().contains("schemaVersion 1"));
        assert!(parse_manifest(br#"{"schemaVersion":2}"#).unwrap_err().to_string().contains("neither"));
        assert!(parse_manifest(b"nope").unwrap_err().to_string().contains("not a manifest"));
        assert!(is_layer_media_type(OCI_LAYER_ZSTD));
        assert!(is_layer_media_type("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"));
        assert!(!is_layer_media_type("application/wasm"));
    }
}
