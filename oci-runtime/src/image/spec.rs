//! The JSON documents of container images as Flotilla reads them. Image indexes, manifests,
//! descriptors and image configs are `oci-spec`'s types ([`oci_spec::image`]); this module
//! reads them ([`parse_manifest`], [`parse_config`]) so that what the registries and tools in
//! the wild serve, and oci-spec alone would refuse, still reads as it did with Flotilla's
//! earlier hand-written parser. It keeps what oci-spec has no name for: the Docker v2 media
//! types (oci-spec's [`MediaType`] knows only OCI ones), which layer media types this crate
//! unpacks, the choice of an index entry for a platform, and chain ids. Pure parsing: never
//! touches the network or the file system, and never panics on what it is given.
//!
//! What Flotilla writes (Wasm and agent artifacts, the manifest of a `docker save` archive,
//! the index of `image save`) is built in the modules that write it; each says whether it
//! serializes oci-spec's types or its own, and their bytes are pinned by tests there.

use std::str::FromStr as _;

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::platform::Platform;

/// Docker v2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Uncompressed Docker layer.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Gzip Docker layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Gzip Docker layer that registries need not redistribute (a "foreign" layer).
pub const DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Manifest media types asked for when resolving a reference.
pub fn accepted_manifests() -> [&'static str; 4] {
    // A static, so the names oci-spec gives them are borrowed for 'static.
    static OCI: [MediaType; 2] = [MediaType::ImageIndex, MediaType::ImageManifest];
    [OCI[0].as_ref(), OCI[1].as_ref(), DOCKER_MANIFEST_LIST, DOCKER_MANIFEST]
}

/// Whether `media_type` is a layer tar this crate can unpack (plain, gzip or zstd; OCI,
/// OCI non-distributable or Docker, foreign layers included).
pub fn is_layer_media_type(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageLayer
        | MediaType::ImageLayerGzip
        | MediaType::ImageLayerZstd
        | MediaType::ImageLayerNonDistributable
        | MediaType::ImageLayerNonDistributableGzip
        | MediaType::ImageLayerNonDistributableZstd => true,
        MediaType::Other(other) => {
            matches!(other.as_str(), DOCKER_LAYER_TAR | DOCKER_LAYER_GZIP | DOCKER_FOREIGN_LAYER_GZIP)
        }
        _ => false,
    }
}

/// A descriptor of content Flotilla hashed itself (`digest` is `sha256:<hex>`).
pub fn descriptor(media_type: MediaType, digest: &str, size: u64) -> Result<Descriptor, oci_spec::OciSpecError> {
    Ok(Descriptor::new(media_type, size, Digest::from_str(digest)?))
}

/// A parsed manifest document (each kind boxed: oci-spec's documents are several hundred
/// bytes before their first descriptor).
#[derive(Debug, Clone)]
pub enum Parsed {
    /// An image index or Docker manifest list.
    Index(Box<ImageIndex>),
    /// An image manifest (OCI or Docker v2 schema 2).
    Manifest(Box<ImageManifest>),
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
    /// An index or manifest whose fields break the image spec (a malformed digest, a
    /// negative size, a descriptor without a media type, ...).
    #[error("invalid {kind}: {source}")]
    Invalid {
        /// "image index" or "image manifest".
        kind: &'static str,
        /// What oci-spec's parser said.
        #[source]
        source: serde_json::Error,
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
///
/// Which one a document is comes from the fields present (`manifests`: an index; `config`: a
/// manifest), since `mediaType` is optional in OCI documents. A manifest without `layers`,
/// which oci-spec refuses, reads as one with none, as it did before oci-spec: the caller then
/// says what it expected instead of the parser failing on a field name.
pub fn parse_manifest(bytes: &[u8]) -> Result<Parsed, ManifestError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Shape {
        schema_version: u32,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<IgnoredAny>,
        #[serde(default)]
        config: Option<IgnoredAny>,
        #[serde(default)]
        layers: Option<IgnoredAny>,
    }
    let shape: Shape = serde_json::from_slice(bytes).map_err(ManifestError::NotJson)?;
    if shape.schema_version != 2 {
        return Err(ManifestError::SchemaVersion(shape.schema_version));
    }
    let invalid = |kind| move |source| ManifestError::Invalid { kind, source };
    match (shape.manifests.is_some(), shape.config.is_some(), shape.layers.is_some()) {
        (true, false, _) => {
            serde_json::from_slice(bytes).map(|i| Parsed::Index(Box::new(i))).map_err(invalid("image index"))
        }
        (false, true, true) => {
            serde_json::from_slice(bytes).map(|m| Parsed::Manifest(Box::new(m))).map_err(invalid("image manifest"))
        }
        (false, true, false) => {
            let mut doc: Map<String, Value> = serde_json::from_slice(bytes).map_err(ManifestError::NotJson)?;
            doc.insert("layers".to_owned(), Value::Array(Vec::new()));
            serde_json::from_value(Value::Object(doc))
                .map(|m| Parsed::Manifest(Box::new(m)))
                .map_err(invalid("image manifest"))
        }
        _ => Err(ManifestError::Neither { media_type: shape.media_type.unwrap_or_else(|| "unspecified".to_owned()) }),
    }
}

/// Picks the index entry for `platform`; the error lists the platforms the index has.
pub fn select_platform<'a>(entries: &'a [Descriptor], platform: &Platform) -> Result<&'a Descriptor, ManifestError> {
    entries
        .iter()
        .filter_map(|e| Some((platform.fit_entry(e.platform().as_ref()?)?, e)))
        // max_by_key returns the last maximum; reverse so the first of equals wins.
        .rev()
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e)
        .ok_or_else(|| ManifestError::NoPlatform {
            wanted: platform.clone(),
            available: entries
                .iter()
                .map(|e| match e.platform() {
                    Some(p) => Platform::from(p).to_string(),
                    None => "unspecified".to_owned(),
                })
                .collect(),
        })
}

/// Parses an image config (OCI or Docker).
///
/// oci-spec requires `architecture`, `os` and `rootfs` with its `type` and `diff_ids`. Docker
/// leaves out what is empty (`omitempty`: the `diff_ids` of an image without layers, an unset
/// `architecture` or `os`), and Flotilla's earlier parser took every one of them as empty,
/// so they are filled in before oci-spec reads the document. Of `ExposedPorts` and `Volumes`
/// only the keys mean anything, so their values are not looked at (oci-spec wants each to be
/// `{}`), and `history`, which Flotilla never reads, is dropped, so that an odd entry in
/// either cannot refuse an image that ran before.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfiguration, serde_json::Error> {
    let mut doc: Value = serde_json::from_slice(bytes)?;
    if let Some(fields) = doc.as_object_mut() {
        fields.remove("history");
        for key in ["architecture", "os"] {
            fields.entry(key).or_insert_with(|| Value::String(String::new()));
        }
        let rootfs = fields.entry("rootfs").or_insert(Value::Null);
        if rootfs.is_null() {
            *rootfs = Value::Object(Map::new());
        }
        if let Some(rootfs) = rootfs.as_object_mut() {
            rootfs.entry("type").or_insert_with(|| Value::String("layers".to_owned()));
            rootfs.entry("diff_ids").or_insert_with(|| Value::Array(Vec::new()));
        }
        if let Some(Value::Object(config)) = fields.get_mut("config") {
            for key in ["ExposedPorts", "Volumes"] {
                if let Some(Value::Object(set)) = config.get_mut(key) {
                    set.values_mut().for_each(|v| *v = Value::Object(Map::new()));
                }
            }
        }
    }
    serde_json::from_value(doc)
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
    use proptest::prelude::*;

    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        let mut d = descriptor(MediaType::ImageManifest, &format!("sha256:{}", hex::encode([n; 32])), 1).unwrap();
        d.set_platform(Some((&Platform::new(os, arch, variant)).into()));
        d
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
        let pick = |p: &str| select_platform(&entries, &Platform::parse(p).unwrap()).map(|e| e.digest().clone());
        assert_eq!(&pick("linux/arm/v7").unwrap(), entries[1].digest());
        assert_eq!(&pick("linux/amd64").unwrap(), entries[3].digest());
        assert_eq!(&pick("linux/amd64/v3").unwrap(), entries[2].digest());
        let err = pick("linux/riscv64").unwrap_err().to_string();
        assert!(err.contains("linux/riscv64"), "{err}");
        assert!(err.contains("linux/arm/v6, linux/arm/v7, linux/amd64/v3, linux/amd64, unknown/unknown"), "{err}");
    }

    #[test]
    fn manifest_parsing() {
        let d = |n: u8| format!("sha256:{}", hex::encode([n; 32]));
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(parse_manifest(idx), Ok(Parsed::Index(i)) if i.manifests().is_empty()));
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{}","size":2}},"layers":[]}}"#,
            d(1)
        );
        let Ok(Parsed::Manifest(m)) = parse_manifest(m.as_bytes()) else { panic!("not a manifest") };
        assert_eq!(m.media_type().as_ref().map(AsRef::as_ref), Some(DOCKER_MANIFEST));
        assert_eq!(m.config().media_type().as_ref(), DOCKER_CONFIG);
        assert!(parse_manifest(br#"{"schemaVersion":1}"#).unwrap_err().to_string().contains("schemaVersion 1"));
        assert!(parse_manifest(br#"{"schemaVersion":2}"#).unwrap_err().to_string().contains("neither"));
        assert!(parse_manifest(b"nope").unwrap_err().to_string().contains("not a manifest"));
        assert!(is_layer_media_type(&MediaType::ImageLayerZstd));
        assert!(is_layer_media_type(&"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into()));
        assert!(is_layer_media_type(&DOCKER_FOREIGN_LAYER_GZIP.into()));
        assert!(!is_layer_media_type(&"application/wasm".into()));
    }

    /// What registries and tools serve beyond the letter of the spec reads as before; what
    /// breaks it is refused with the reason, never a panic.
    #[test]
    fn quirks_read_and_breakage_is_refused() {
        let d = |n: u8| format!("sha256:{}", hex::encode([n; 32]));
        // Unknown fields, Docker media types, an entry without a platform, a manifest list.
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","whatever":[1],"manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":7,"platform":{{"architecture":"amd64",
                "os":"linux","os.version":"x","features":["sse4"]}},"extra":true}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":7}}]}}"#,
            d(1),
            d(2)
        );
        let Ok(Parsed::Index(i)) = parse_manifest(list.as_bytes()) else { panic!("not an index") };
        assert_eq!(i.manifests().len(), 2);
        assert_eq!(
            Platform::from(i.manifests()[0].platform().as_ref().unwrap()),
            Platform::new("linux", "amd64", None)
        );
        // A manifest without layers has none.
        let bare = format!(r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":1}}}}"#, d(1));
        assert!(matches!(parse_manifest(bare.as_bytes()), Ok(Parsed::Manifest(m)) if m.layers().is_empty()));
        let null_layers = bare.replace(r#""size":1}"#, r#""size":1},"layers":null"#);
        assert!(matches!(parse_manifest(null_layers.as_bytes()), Ok(Parsed::Manifest(m)) if m.layers().is_empty()));

        let config = |c: &str| format!(r#"{{"schemaVersion":2,"config":{c},"layers":[]}}"#);
        for broken in [
            r#"{"mediaType":"x","digest":"../../etc/passwd","size":1}"#.to_owned(),
            r#"{"mediaType":"x","digest":"sha256:00","size":1}"#.to_owned(),
            format!(r#"{{"mediaType":"x","digest":"{}","size":-1}}"#, d(1)),
            format!(r#"{{"mediaType":"x","digest":"{}","size":18446744073709551616}}"#, d(1)),
            format!(r#"{{"digest":"{}","size":1}}"#, d(1)),
            format!(r#"{{"mediaType":7,"digest":"{}","size":1}}"#, d(1)),
        ] {
            let err = parse_manifest(config(&broken).as_bytes()).unwrap_err();
            assert!(matches!(err, ManifestError::Invalid { kind: "image manifest", .. }), "{broken}: {err}");
        }
        let bad_entry = format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"x","digest":"{}"}}]}}"#, d(1));
        assert!(matches!(
            parse_manifest(bad_entry.as_bytes()),
            Err(ManifestError::Invalid { kind: "image index", .. })
        ));
        for junk in [&b"[]"[..], b"null", b"{\"schemaVersion\":-2}", b"{\"schemaVersion\":2,\"config\":{}}", b"\xff"] {
            assert!(parse_manifest(junk).is_err());
        }
    }

    #[test]
    fn configs_read_as_docker_writes_them() {
        let full = br#"{"architecture":"arm","os":"linux","variant":"v7","created":"2024-01-01T00:00:00Z",
            "config":{"User":"1000","Env":["A=1"],"Entrypoint":["/e"],"Cmd":null,"WorkingDir":"/w",
              "ExposedPorts":{"80/tcp":{},"443/tcp":null},"Volumes":{"/data":{}},"Labels":{"a":"b"},
              "StopSignal":"SIGINT","Healthcheck":{"Test":["NONE"]}},
            "rootfs":{"type":"layers","diff_ids":["sha256:00"]},
            "history":[{"created":1,"empty_layer":"yes"}],"container_config":{"Cmd":["x"]}}"#;
        let c = parse_config(full).unwrap();
        assert_eq!((c.os().to_string(), c.architecture().to_string()), ("linux".into(), "arm".into()));
        assert_eq!(c.variant().as_deref(), Some("v7"));
        assert_eq!(c.rootfs().diff_ids(), &["sha256:00".to_owned()]);
        let exec = c.config().as_ref().unwrap();
        assert_eq!(exec.user().as_deref(), Some("1000"));
        assert!(exec.cmd().is_none());
        let mut ports = exec.exposed_ports().clone().unwrap();
        ports.sort();
        assert_eq!(ports, ["443/tcp", "80/tcp"]);

        // Docker's omitempty: no layers, no architecture or os; a rootfs of null.
        for sparse in [&br#"{"rootfs":{"type":"layers"}}"#[..], b"{}", br#"{"rootfs":null,"config":null}"#] {
            let c = parse_config(sparse).unwrap();
            assert!(c.rootfs().diff_ids().is_empty());
            assert!(c.os().to_string().is_empty());
        }
        for broken in [&b"[]"[..], b"nope", br#"{"rootfs":{"diff_ids":null}}"#, br#"{"config":{"Env":"A=1"}}"#] {
            assert!(parse_config(broken).is_err());
        }
    }

    const INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0101010101010101010101010101010101010101010101010101010101010101","size":7,"platform":{"architecture":"arm","os":"linux","variant":"v7"},"annotations":{"a":"b"}}]}"#;
    const MANIFEST: &str = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0101010101010101010101010101010101010101010101010101010101010101","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"sha256:0202020202020202020202020202020202020202020202020202020202020202","size":3,"urls":["http://x"]}],"subject":{"mediaType":"x","digest":"sha256:0303030303030303030303030303030303030303030303030303030303030303","size":1}}"#;
    const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"ExposedPorts":{"80/tcp":{}},"Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":["sha256:00"]},"history":[{"empty_layer":true}]}"#;
    /// What a hostile or broken document may hold where a valid one has something else.
    const TOKENS: &[&str] = &[
        "null",
        "-1",
        "1e999",
        "18446744073709551616",
        "\"\"",
        "\"sha256:\"",
        "{}",
        "[]",
        ":",
        ",",
        "\"",
        "}",
        "]",
        "\"../../x\"",
        "\"\\u0000\"",
        "2",
        "true",
    ];

    proptest! {
        /// Whatever a registry or an archive holds, reading it is an answer, never a panic:
        /// valid documents with JSON tokens spliced in or put in place of their bytes, then
        /// cut short.
        #[test]
        fn damaged_documents_are_answered_never_a_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0..TOKENS.len(), any::<bool>()), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            prop_assert!(parse_manifest(INDEX.as_bytes()).is_ok() && parse_manifest(MANIFEST.as_bytes()).is_ok());
            prop_assert!(parse_config(CONFIG.as_bytes()).is_ok());
            for doc in [INDEX, MANIFEST, CONFIG] {
                let mut bytes = doc.as_bytes().to_vec();
                for (at, token, replace) in &edits {
                    let i = at.index(bytes.len() + 1);
                    let end = if *replace { (i + TOKENS[*token].len()).min(bytes.len()) } else { i };
                    bytes.splice(i..end, TOKENS[*token].bytes());
                }
                for bytes in [&bytes[..], &bytes[..cut.index(bytes.len() + 1)]] {
                    if let Ok(Parsed::Index(i)) = parse_manifest(bytes) {
                        let _ = select_platform(i.manifests(), &Platform::host());
                    }
                    let _ = parse_config(bytes);
                }
            }
        }
    }
}
