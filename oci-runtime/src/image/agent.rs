//! Flotilla agent binaries as OCI artifacts, so a hub can tell its agents "upgrade to IMAGE":
//! reading an executable's platform from its ELF header ([`elf_platform`]), building the
//! artifact a set of per-platform binaries becomes ([`AgentArtifact`]: one OCI image manifest
//! per platform, config `application/vnd.flotilla.agent.config.v1+json` and one layer
//! `application/vnd.flotilla.agent.binary.v1` that is the raw binary, all under an OCI image
//! index, even for one platform), and pulling the binary for one platform into the store
//! ([`ImageStore::pull_agent_binary`]) through the same resumable, single-flight,
//! digest-verified blob fetch as every other artifact.
//!
//! It never runs, copies out or replaces a binary: the agent's upgrade does that with the
//! path [`PulledAgent`] gives, while the hold inside it keeps the collector off the blob. A
//! pull by tag always asks the registry (an upgrade must not act on a stale tag); only a
//! digest reference, which names immutable content, is answered from the store. Pure except
//! for the pull, which goes through [`super::pull`].

use std::collections::HashMap;
use std::path::PathBuf;

use oci_spec::image::{Arch, Descriptor, ImageIndexBuilder, ImageManifestBuilder, MediaType, SCHEMA_VERSION};
use serde::{Deserialize, Serialize};

use super::pull::Session;
use super::spec::{self, Parsed};
use super::{ArtifactHold, ArtifactKind, ImageError, ImageRecord, ImageStore, LayerRecord, Platform, wasm};
use crate::registry::{Registry, parse_reference};
use crate::store::{sha256_digest, validate_digest};

/// Config media type (and `artifactType`) of a Flotilla agent binary artifact.
pub const AGENT_CONFIG_MEDIA_TYPE: &str = "application/vnd.flotilla.agent.config.v1+json";
/// Layer media type of a Flotilla agent binary: the raw executable.
pub const AGENT_BINARY_MEDIA_TYPE: &str = "application/vnd.flotilla.agent.binary.v1";
/// Largest agent binary accepted from a registry.
pub const MAX_AGENT_BYTES: u64 = 1024 * 1024 * 1024;
/// Largest agent config blob accepted from a registry.
const MAX_AGENT_CONFIG_BYTES: u64 = 64 * 1024;
/// The annotation that carries the agent's version on manifests and the index.
const VERSION_ANNOTATION: &str = "org.opencontainers.image.version";

/// First four bytes of every ELF file.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// How much of an ELF header [`elf_platform`] reads: `e_ident` (16 bytes), `e_type` and
/// `e_machine` (2 each).
pub(crate) const ELF_HEAD_BYTES: usize = 20;

/// Why binaries cannot become an agent artifact; the text says what was found instead.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The bytes are not an ELF file.
    #[error("{len} bytes starting with {head}, not an ELF executable")]
    NotElf {
        /// How many bytes there are.
        len: usize,
        /// Their first bytes, described.
        head: String,
    },
    /// An ELF file, but not a Linux executable of a platform this crate knows.
    #[error(
        "ELF file of class {class}, data encoding {data}, OS ABI {os_abi}, type {e_type}, machine {machine} \
         is not a Linux executable for a known platform (amd64, arm64, arm/v7, 386, riscv64, ppc64le, \
         ppc64, s390x, loong64)"
    )]
    UnsupportedElf {
        /// `EI_CLASS`: 1 for 32-bit, 2 for 64-bit.
        class: u8,
        /// `EI_DATA`: 1 for little-endian, 2 for big-endian.
        data: u8,
        /// `EI_OSABI`: 0 (System V) or 3 (GNU/Linux) are Linux's.
        os_abi: u8,
        /// `e_type`: 2 (executable) or 3 (position-independent executable) are accepted.
        e_type: u16,
        /// `e_machine`.
        machine: u16,
    },
    /// The binary given for one platform is built for another.
    #[error("the binary given for {declared} is an ELF executable for {elf}")]
    PlatformMismatch {
        /// The platform it was given for.
        declared: Box<Platform>,
        /// The platform its ELF header says.
        elf: Box<Platform>,
    },
    /// Two binaries for one platform.
    #[error("two binaries for platform {platform}; give one per platform")]
    DuplicatePlatform {
        /// The platform.
        platform: Platform,
    },
    /// No binaries at all.
    #[error("no agent binaries given")]
    NoBinaries,
    /// A document could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// Which document.
        what: &'static str,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// A document could not be built of its parts.
    #[error("cannot build {what}: {source}")]
    Build {
        /// Which document.
        what: &'static str,
        /// The error.
        #[source]
        source: oci_spec::OciSpecError,
    },
}

/// The platform of a Linux executable, read from its ELF header (`EI_CLASS`, `EI_DATA`,
/// `EI_OSABI`, `e_type`, `e_machine`), with Go's names as in image indexes: `linux/amd64`,
/// `linux/arm64`, `linux/arm/v7` (any 32-bit ARM executable; the header does not tell v6 from
/// v7), `linux/386`, `linux/riscv64`, `linux/ppc64le`, `linux/ppc64`, `linux/s390x`,
/// `linux/loong64`. `None` for anything else: not ELF, not an executable, another OS ABI,
/// another machine or byte order.
pub fn elf_platform(bytes: &[u8]) -> Option<Platform> {
    read_elf_platform(bytes).ok()
}

/// [`elf_platform`], saying what was found when it is not a known Linux executable.
pub(crate) fn read_elf_platform(bytes: &[u8]) -> Result<Platform, AgentError> {
    let Some(head) = bytes.get(..ELF_HEAD_BYTES).filter(|h| h.starts_with(ELF_MAGIC)) else {
        return Err(AgentError::NotElf { len: bytes.len(), head: wasm::describe_head(bytes) });
    };
    let (class, data, os_abi) = (head[4], head[5], head[7]);
    let u16_at = |i: usize| {
        let pair = [head[i], head[i + 1]];
        if data == 2 { u16::from_be_bytes(pair) } else { u16::from_le_bytes(pair) }
    };
    let (e_type, machine) = (u16_at(16), u16_at(18));
    let unsupported = AgentError::UnsupportedElf { class, data, os_abi, e_type, machine };
    // System V or GNU/Linux ABI; an executable or a position-independent one (static-pie).
    if !matches!(os_abi, 0 | 3) || !matches!(e_type, 2 | 3) {
        return Err(unsupported);
    }
    let (arch, variant) = match (class, data, machine) {
        (2, 1, 62) => ("amd64", None),
        (2, 1, 183) => ("arm64", None),
        (1, 1, 40) => ("arm", Some("v7")),
        (1, 1, 3) => ("386", None),
        (2, 1, 243) => ("riscv64", None),
        (2, 1, 21) => ("ppc64le", None),
        (2, 2, 21) => ("ppc64", None),
        (2, 2, 22) => ("s390x", None),
        (2, 1, 258) => ("loong64", None),
        _ => return Err(unsupported),
    };
    Ok(Platform::new("linux", arch, variant))
}

/// The config blob of an agent artifact:
/// `{"os":"linux","architecture":"arm","variant":"v7","version":"1.2.0"}`. Flotilla's own
/// format, not an OCI image config (it has no `rootfs`), so not oci-spec's
/// `ImageConfiguration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgentConfig {
    os: String,
    architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

/// One platform's manifest in an [`AgentArtifact`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentManifest {
    /// The platform the binary is for.
    pub platform: Platform,
    /// The config blob.
    pub config: Vec<u8>,
    /// Its digest.
    pub config_digest: String,
    /// The digest of the binary (the one layer).
    pub binary_digest: String,
    /// The binary's size in bytes.
    pub binary_size: u64,
    /// The image manifest, as pushed.
    pub manifest: Vec<u8>,
    /// Its digest.
    pub manifest_digest: String,
}

/// The OCI artifact a set of agent binaries becomes: per platform an OCI image manifest
/// (`artifactType` and config media type [`AGENT_CONFIG_MEDIA_TYPE`], one layer
/// [`AGENT_BINARY_MEDIA_TYPE`] that is the raw binary), all under one OCI image index whose
/// entries carry their platform. With a version, the config, every manifest and the index
/// carry it (`org.opencontainers.image.version`). The same binaries and version always give
/// the same bytes, whatever order the binaries come in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentArtifact {
    /// One manifest per platform, in platform order.
    pub manifests: Vec<AgentManifest>,
    /// The image index, as pushed.
    pub index: Vec<u8>,
    /// Its digest: what a reference to the artifact resolves to.
    pub index_digest: String,
}

impl AgentArtifact {
    /// The artifact of `binaries`, each labelled with its platform. Each binary must be a
    /// Linux ELF executable whose header names the platform's OS and architecture (the
    /// variant is taken as given); no platform may come twice.
    pub fn build(binaries: &[(Platform, &[u8])], version: Option<&str>) -> Result<AgentArtifact, AgentError> {
        if binaries.is_empty() {
            return Err(AgentError::NoBinaries);
        }
        let mut sorted: Vec<&(Platform, &[u8])> = binaries.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(AgentError::DuplicatePlatform { platform: pair[0].0.clone() });
        }
        // oci-spec's documents serialize their fields in the order Flotilla's own types did, so
        // the bytes and digests are unchanged (pinned by `the_document_bytes_are_pinned`). Its
        // annotations are a HashMap, whose order varies from run to run: one annotation at
        // most, or the same binaries would give another digest at each push.
        let annotations: Option<HashMap<String, String>> =
            version.map(|v| HashMap::from([(VERSION_ANNOTATION.to_owned(), v.to_owned())]));
        let artifact_type = MediaType::from(AGENT_CONFIG_MEDIA_TYPE);
        let mut manifests = Vec::with_capacity(sorted.len());
        for (platform, binary) in sorted {
            let elf = read_elf_platform(binary)?;
            if elf.os != platform.os || elf.architecture != platform.architecture {
                return Err(AgentError::PlatformMismatch { declared: Box::new(platform.clone()), elf: Box::new(elf) });
            }
            let config = serde_json::to_vec(&AgentConfig {
                os: platform.os.clone(),
                architecture: platform.architecture.clone(),
                variant: platform.variant.clone(),
                version: version.map(str::to_owned),
            })
            .map_err(|source| AgentError::Encode { what: "agent config", source })?;
            let config_digest = sha256_digest(&config);
            let binary_digest = sha256_digest(binary);
            let build = |source| AgentError::Build { what: "agent manifest", source };
            let mut manifest = ImageManifestBuilder::default()
                .schema_version(SCHEMA_VERSION)
                .media_type(MediaType::ImageManifest)
                .artifact_type(artifact_type.clone())
                .config(spec::descriptor(artifact_type.clone(), &config_digest, config.len() as u64).map_err(build)?)
                .layers(vec![
                    spec::descriptor(AGENT_BINARY_MEDIA_TYPE.into(), &binary_digest, binary.len() as u64)
                        .map_err(build)?,
                ])
                .build()
                .map_err(build)?;
            manifest.set_annotations(annotations.clone());
            let manifest = serde_json::to_vec(&manifest)
                .map_err(|source| AgentError::Encode { what: "agent manifest", source })?;
            manifests.push(AgentManifest {
                platform: platform.clone(),
                manifest_digest: sha256_digest(&manifest),
                config,
                config_digest,
                binary_digest,
                binary_size: binary.len() as u64,
                manifest,
            });
        }
        let build = |source| AgentError::Build { what: "agent image index", source };
        let entries = manifests
            .iter()
            .map(|m| {
                let mut entry =
                    spec::descriptor(MediaType::ImageManifest, &m.manifest_digest, m.manifest.len() as u64)?;
                entry.set_platform(Some((&m.platform).into())).set_artifact_type(Some(artifact_type.clone()));
                Ok(entry)
            })
            .collect::<Result<Vec<Descriptor>, _>>()
            .map_err(build)?;
        let mut index = ImageIndexBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .media_type(MediaType::ImageIndex)
            .artifact_type(artifact_type)
            .manifests(entries)
            .build()
            .map_err(build)?;
        index.set_annotations(annotations);
        let index =
            serde_json::to_vec(&index).map_err(|source| AgentError::Encode { what: "agent image index", source })?;
        let index_digest = sha256_digest(&index);
        Ok(AgentArtifact { manifests, index, index_digest })
    }
}

/// Whether a manifest says by its config media type that it is an agent binary artifact.
pub(crate) fn is_agent_manifest(config: &Descriptor) -> bool {
    config.media_type().as_ref() == AGENT_CONFIG_MEDIA_TYPE
}

/// An agent binary in the artifact store: the result of [`ImageStore::pull_agent_binary`].
///
/// It holds the artifact ([`ImageStore::hold`]) for as long as it lives, so the collector does
/// not delete the blob at `path` while the caller copies it out; drop it once the copy is
/// done. The blob is the store's own: copy it, never move, change or execute it in place.
#[derive(Debug)]
pub struct PulledAgent {
    /// The reference as given by the caller.
    pub reference: String,
    /// Path of the verified binary in the blob store.
    pub path: PathBuf,
    /// Digest of the binary (the manifest's one layer); the content at `path` hashes to it.
    pub binary_digest: String,
    /// Digest of the platform's image manifest.
    pub manifest_digest: String,
    /// Digest of the image index the manifest was chosen from (absent if the reference named
    /// a manifest directly).
    pub index_digest: Option<String>,
    /// The platform the binary is for, as its config says.
    pub platform: Platform,
    /// The agent's version, as its config says, if it says one.
    pub version: Option<String>,
    /// The binary's size in bytes.
    pub size: u64,
    /// Keeps the collector away from the blob while this lives.
    _hold: ArtifactHold,
}

impl ImageStore {
    /// Pulls the agent binary for `platform` that `reference` names into the store, records
    /// it in the artifact index (kind [`ArtifactKind::Agent`]) and returns where it is,
    /// holding the artifact until the result is dropped.
    ///
    /// The reference names an image index of agent binaries (the layout of
    /// [`AgentArtifact`]; a single agent manifest is accepted too); the entry for `platform`
    /// is chosen as for container images, and [`ImageError::Platform`] lists the platforms
    /// the index has when none fits. A container image or Wasm artifact is refused with
    /// [`ImageError::WrongKind`]; a manifest whose config or layer media types are not an
    /// agent artifact's, a config for another platform, or a binary whose ELF header names
    /// another platform (checked as its first bytes arrive) with [`ImageError::BadAgent`].
    /// The binary is downloaded like every blob: resumable, single-flight, never larger than
    /// declared (nor than [`MAX_AGENT_BYTES`]) and visible only once its sha256 matched.
    ///
    /// A tag is always resolved by the registry, so an upgrade never acts on what the tag
    /// named at an earlier pull; an unreachable registry is an error. A digest reference
    /// whose binary is already in the store is answered from it without a registry.
    pub async fn pull_agent_binary(
        &self,
        registry: &Registry,
        reference: &str,
        platform: &Platform,
    ) -> Result<PulledAgent, ImageError> {
        let r = parse_reference(reference)?;
        let key = r.whole();
        let _shared = self.inner.gc_lock.read().await;
        if r.digest().is_some()
            && let Some(pulled) = self.stored_agent(reference, &key, platform)
        {
            tracing::info!(reference, binary_digest = %pulled.binary_digest, "agent binary already in the store");
            return Ok(pulled);
        }
        let (record, version) = self.pull_agent_remote(registry, reference, r, platform).await?;
        // Taken while collection is still locked out, so the blob cannot go before the caller
        // has it.
        let hold = self.hold(&key);
        let record = self.record_raw(&key, record)?;
        let pulled = self.pulled_agent(reference, record, version, hold)?;
        tracing::info!(
            reference,
            manifest_digest = %pulled.manifest_digest,
            binary_digest = %pulled.binary_digest,
            platform = %pulled.platform,
            "pulled agent binary"
        );
        Ok(pulled)
    }

    /// The agent binary recorded under `key` for `platform`, if its blob is in the store.
    fn stored_agent(&self, reference: &str, key: &str, platform: &Platform) -> Option<PulledAgent> {
        let record = self.inner.index.load().ok()?.remove(key)?;
        let fits = platform.fit(&record.platform.os, &record.platform.architecture, record.platform.variant.as_deref());
        if record.kind != ArtifactKind::Agent || fits.is_none() {
            return None;
        }
        let config_digest = record.config_digest.as_deref()?;
        let config: AgentConfig =
            serde_json::from_slice(&std::fs::read(self.blobs().path(config_digest).ok()?).ok()?).ok()?;
        let hold = self.hold(key);
        self.touch(key);
        self.pulled_agent(reference, record, config.version, hold).ok()
    }

    fn pulled_agent(
        &self,
        reference: &str,
        record: ImageRecord,
        version: Option<String>,
        hold: ArtifactHold,
    ) -> Result<PulledAgent, ImageError> {
        let layer = record.layers.first().ok_or_else(|| ImageError::NotFound { reference: reference.to_owned() })?;
        let path = self.blobs().path(&layer.digest).map_err(ImageError::store(reference))?;
        if !path.is_file() {
            return Err(ImageError::NotFound { reference: reference.to_owned() });
        }
        Ok(PulledAgent {
            reference: reference.to_owned(),
            path,
            binary_digest: layer.digest.clone(),
            size: layer.size,
            manifest_digest: record.manifest_digest,
            index_digest: record.index_digest,
            platform: record.platform,
            version,
            _hold: hold,
        })
    }

    async fn pull_agent_remote(
        &self,
        registry: &Registry,
        reference: &str,
        r: oci_client::Reference,
        platform: &Platform,
    ) -> Result<(ImageRecord, Option<String>), ImageError> {
        let s = Session::open(registry, r, reference).await?;
        let bad = |reason: String| ImageError::BadAgent { reference: reference.to_owned(), reason };
        let wrong_kind = |found: ArtifactKind| ImageError::WrongKind {
            reference: reference.to_owned(),
            found,
            wanted: ArtifactKind::Agent,
        };

        let (top_bytes, top_digest) = s.manifest(&s.r, None).await?;
        let (index, manifest_bytes, manifest_digest, manifest) = match spec::parse_manifest(&top_bytes)
            .map_err(|e| bad(e.to_string()))?
        {
            Parsed::Manifest(manifest) => (None, top_bytes, top_digest, manifest),
            Parsed::Index(index) => {
                let entries = index.manifests();
                let entry = match spec::select_platform(entries, platform) {
                    Ok(entry) => entry,
                    // An index of Wasm entries only is a Wasm artifact, not an agent
                    // built for other platforms.
                    Err(_) if wasm::select_platform(entries).is_some() && entries.iter().all(is_wasm_entry) => {
                        return Err(wrong_kind(ArtifactKind::Wasm));
                    }
                    Err(e) => {
                        return Err(ImageError::Platform { reference: reference.to_owned(), reason: e.to_string() });
                    }
                };
                let entry_digest = entry.digest().as_ref();
                validate_digest(entry_digest).map_err(|e| bad(format!("image index entry digest: {e}")))?;
                tracing::debug!(reference, digest = entry_digest, %platform, "following image index");
                let child = s.r.clone_with_digest(entry_digest.to_owned());
                let (bytes, digest) = s.manifest(&child, Some(entry_digest)).await?;
                match spec::parse_manifest(&bytes).map_err(|e| bad(e.to_string()))? {
                    Parsed::Manifest(manifest) => (Some((top_bytes, top_digest)), bytes, digest, manifest),
                    Parsed::Index(_) => {
                        return Err(bad(format!("image index entry {entry_digest} is itself an image index")));
                    }
                }
            }
        };
        let (config, layers) = (manifest.config(), manifest.layers());
        if !is_agent_manifest(config) {
            let found =
                if wasm::is_wasm_manifest(config, layers) { ArtifactKind::Wasm } else { ArtifactKind::Container };
            return Err(wrong_kind(found));
        }
        let layer = match layers.as_slice() {
            [layer] if layer.media_type().as_ref() == AGENT_BINARY_MEDIA_TYPE => layer,
            _ => {
                return Err(bad(format!(
                    "one layer of media type {AGENT_BINARY_MEDIA_TYPE} expected; {}",
                    wasm::describe_manifest(config, layers)
                )));
            }
        };
        let (binary_digest, size) = (layer.digest().as_ref(), layer.size());
        validate_digest(config.digest().as_ref()).map_err(|e| bad(format!("config digest: {e}")))?;
        validate_digest(binary_digest).map_err(|e| bad(format!("binary digest: {e}")))?;
        if size > MAX_AGENT_BYTES {
            return Err(ImageError::TooLarge {
                reference: reference.to_owned(),
                digest: binary_digest.to_owned(),
                limit: MAX_AGENT_BYTES,
            });
        }
        let config_bytes = s.config(self, config, MAX_AGENT_CONFIG_BYTES).await?;
        let doc: AgentConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("config {} is not an agent config: {e}", config.digest())))?;
        let found = Platform::new(&doc.os, &doc.architecture, doc.variant.as_deref());
        if platform.fit(&doc.os, &doc.architecture, doc.variant.as_deref()).is_none() {
            return Err(ImageError::Platform {
                reference: reference.to_owned(),
                reason: format!("the agent binary is for {found}, not {platform}"),
            });
        }
        // The ELF header is checked as soon as it is in, so a binary for another machine (or
        // no executable at all) behind a mislabelled manifest is refused without downloading
        // it, and before it becomes visible.
        let check = |head: &[u8], complete: bool| -> Result<(), ImageError> {
            if head.len() < ELF_HEAD_BYTES && !complete {
                return Ok(());
            }
            match read_elf_platform(head) {
                Ok(elf) if elf.os == found.os && elf.architecture == found.architecture => Ok(()),
                Ok(elf) => {
                    Err(bad(format!("binary {binary_digest} is an ELF executable for {elf}, its config says {found}")))
                }
                Err(e) => Err(bad(format!("binary {binary_digest}: {e}"))),
            }
        };
        s.blob(self, layer, Some(&check)).await?;
        // Content-addressed: a blob already present was verified when it was written, but it
        // may have come as another kind of artifact, so its header is checked too.
        let head = self.blobs().read_head(binary_digest, ELF_HEAD_BYTES).map_err(ImageError::store(reference))?;
        check(&head, true)?;

        // Everything verified; now the small documents become visible too.
        s.publish_documents(
            self,
            (&config_bytes, config.digest().as_ref()),
            (&manifest_bytes, &manifest_digest),
            index.as_ref(),
        )?;
        let record = ImageRecord {
            kind: ArtifactKind::Agent,
            manifest_digest,
            index_digest: index.map(|(_, d)| d),
            config_digest: Some(config.digest().to_string()),
            layers: vec![LayerRecord {
                digest: binary_digest.to_owned(),
                media_type: layer.media_type().to_string(),
                size,
                diff_id: binary_digest.to_owned(),
            }],
            chain_ids: Vec::new(),
            platform: found,
            last_used_unix: 0,
        };
        Ok((record, doc.version))
    }
}

fn is_wasm_entry(entry: &Descriptor) -> bool {
    entry.platform().as_ref().is_some_and(|p| *p.architecture() == Arch::Wasm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 64 bytes of an ELF executable: class (1 = 32-bit, 2 = 64-bit), data
    /// (1 = little-, 2 = big-endian), `e_type` 2 (executable) and `e_machine`.
    fn elf(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(ELF_MAGIC);
        h[4] = class;
        h[5] = data;
        h[6] = 1; // EI_VERSION
        let put = |v: u16| if data == 2 { v.to_be_bytes() } else { v.to_le_bytes() };
        h[16..18].copy_from_slice(&put(2));
        h[18..20].copy_from_slice(&put(machine));
        h
    }

    const X86_64: u16 = 62;
    const AARCH64: u16 = 183;
    const ARM: u16 = 40;

    #[test]
    fn elf_headers_name_their_platform() {
        let p = |s: &str| Platform::parse(s);
        assert_eq!(elf_platform(&elf(2, 1, X86_64)), p("linux/amd64"));
        assert_eq!(elf_platform(&elf(2, 1, AARCH64)), p("linux/arm64"));
        assert_eq!(elf_platform(&elf(1, 1, ARM)), p("linux/arm/v7"));
        assert_eq!(elf_platform(&elf(2, 2, 22)), p("linux/s390x"));
        assert_eq!(elf_platform(&elf(2, 2, 21)), p("linux/ppc64"));
        assert_eq!(elf_platform(&elf(2, 1, 21)), p("linux/ppc64le"));
        // A position-independent executable (e_type 3) and the GNU/Linux OS ABI count too.
        let mut pie = elf(2, 1, X86_64);
        pie[16] = 3;
        pie[7] = 3;
        assert_eq!(elf_platform(&pie), p("linux/amd64"));
        // Only the header is read.
        assert_eq!(elf_platform(&elf(2, 1, AARCH64)[..ELF_HEAD_BYTES]), p("linux/arm64"));
        // This very test binary.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let host = Platform::host();
        let mine = elf_platform(&me).unwrap();
        assert_eq!((mine.os, mine.architecture), (host.os, host.architecture));
    }

    #[test]
    fn what_is_no_linux_executable_is_refused_with_what_it_is() {
        let err = read_elf_platform(b"\0asm\x01\0\0\0 a wasm module, not an executable").unwrap_err();
        assert!(matches!(err, AgentError::NotElf { .. }), "{err}");
        assert!(err.to_string().contains("not an ELF executable") && err.to_string().contains("\"\\0asm\""), "{err}");
        assert!(elf_platform(b"#!/bin/sh\necho hello world, I am a script").is_none());
        assert!(elf_platform(b"").is_none());
        assert!(elf_platform(&elf(2, 1, X86_64)[..19]).is_none(), "a truncated header");

        // x32 (64-bit machine, 32-bit class), a big-endian aarch64, an unknown machine.
        for (class, data, machine) in [(1, 1, X86_64), (2, 2, AARCH64), (2, 1, 0x1234)] {
            let err = read_elf_platform(&elf(class, data, machine)).unwrap_err();
            assert!(matches!(err, AgentError::UnsupportedElf { .. }), "{err}");
            assert!(err.to_string().contains(&format!("machine {machine}")), "{err}");
        }
        // A relocatable object, a core dump, another OS's ABI (FreeBSD).
        for (at, value) in [(16, 1u8), (16, 4), (7, 9)] {
            let mut h = elf(2, 1, X86_64);
            h[at] = value;
            assert!(elf_platform(&h).is_none(), "byte {at} = {value}");
        }
    }

    fn parse_json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn the_artifact_is_an_index_of_one_manifest_per_platform() {
        let amd64 = elf(2, 1, X86_64);
        let mut arm64 = elf(2, 1, AARCH64);
        arm64.extend_from_slice(b"more code");
        let (pa, pb) = (Platform::parse("linux/amd64").unwrap(), Platform::parse("linux/arm64").unwrap());
        let a = AgentArtifact::build(&[(pb.clone(), &arm64), (pa.clone(), &amd64)], Some("1.2.3")).unwrap();
        // The order given does not matter.
        let again = AgentArtifact::build(&[(pa.clone(), &amd64), (pb.clone(), &arm64)], Some("1.2.3")).unwrap();
        assert_eq!(a, again);
        assert_eq!(a.index_digest, sha256_digest(&a.index));

        let index = parse_json(&a.index);
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], MediaType::ImageIndex.as_ref());
        assert_eq!(index["artifactType"], AGENT_CONFIG_MEDIA_TYPE);
        assert_eq!(index["annotations"][VERSION_ANNOTATION], "1.2.3");
        let entries = index["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        for ((entry, m), (platform, binary)) in entries.iter().zip(&a.manifests).zip([(&pa, &amd64), (&pb, &arm64)]) {
            assert_eq!(&m.platform, platform);
            assert_eq!(entry["mediaType"], MediaType::ImageManifest.as_ref());
            assert_eq!(entry["digest"], m.manifest_digest.as_str());
            assert_eq!(entry["size"], m.manifest.len());
            assert_eq!(entry["platform"]["os"], "linux");
            assert_eq!(entry["platform"]["architecture"], platform.architecture.as_str());
            assert!(entry["platform"].get("variant").is_none());
            assert_eq!(entry["artifactType"], AGENT_CONFIG_MEDIA_TYPE);

            assert_eq!(m.manifest_digest, sha256_digest(&m.manifest));
            assert_eq!(m.config_digest, sha256_digest(&m.config));
            assert_eq!(m.binary_digest, sha256_digest(binary));
            assert_eq!(m.binary_size, binary.len() as u64);
            let manifest = parse_json(&m.manifest);
            assert_eq!(manifest["schemaVersion"], 2);
            assert_eq!(manifest["mediaType"], MediaType::ImageManifest.as_ref());
            assert_eq!(manifest["artifactType"], AGENT_CONFIG_MEDIA_TYPE);
            assert_eq!(manifest["annotations"][VERSION_ANNOTATION], "1.2.3");
            assert_eq!(manifest["config"]["mediaType"], AGENT_CONFIG_MEDIA_TYPE);
            assert_eq!(manifest["config"]["digest"], m.config_digest.as_str());
            assert_eq!(manifest["config"]["size"], m.config.len());
            let layers = manifest["layers"].as_array().unwrap();
            assert_eq!(layers.len(), 1);
            assert_eq!(layers[0]["mediaType"], AGENT_BINARY_MEDIA_TYPE);
            assert_eq!(layers[0]["digest"], m.binary_digest.as_str());
            assert_eq!(layers[0]["size"], binary.len());
            assert_eq!(
                String::from_utf8(m.config.clone()).unwrap(),
                format!(r#"{{"os":"linux","architecture":"{}","version":"1.2.3"}}"#, platform.architecture)
            );
            // What a pull reads of it.
            let Ok(Parsed::Manifest(parsed)) = spec::parse_manifest(&m.manifest) else { panic!("not a manifest") };
            assert!(is_agent_manifest(parsed.config()) && !wasm::is_wasm_manifest(parsed.config(), parsed.layers()));
        }
        let Ok(Parsed::Index(parsed)) = spec::parse_manifest(&a.index) else { panic!("not an index") };
        let entries = parsed.manifests();
        let picked = spec::select_platform(entries, &pb).unwrap();
        assert_eq!(picked.digest().as_ref(), a.manifests[1].manifest_digest);
        let err = spec::select_platform(entries, &Platform::parse("linux/riscv64").unwrap()).unwrap_err();
        assert!(err.to_string().contains("linux/amd64, linux/arm64"), "{err}");
    }

    #[test]
    fn one_binary_is_an_index_too_and_without_a_version_nothing_says_one() {
        let arm = elf(1, 1, ARM);
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        let a = AgentArtifact::build(&[(v7.clone(), &arm)], None).unwrap();
        let index = parse_json(&a.index);
        assert_eq!(index["mediaType"], MediaType::ImageIndex.as_ref());
        assert!(index.get("annotations").is_none());
        assert_eq!(index["manifests"][0]["platform"]["variant"], "v7");
        assert!(parse_json(&a.manifests[0].manifest).get("annotations").is_none());
        assert_eq!(
            String::from_utf8(a.manifests[0].config.clone()).unwrap(),
            r#"{"os":"linux","architecture":"arm","variant":"v7"}"#
        );
    }

    /// The bytes of an agent artifact are pinned: agents are told to upgrade to a digest, and
    /// an index pushed again must name the same one.
    #[test]
    fn the_document_bytes_are_pinned() {
        let (amd64, arm64) = (elf(2, 1, X86_64), elf(2, 1, AARCH64));
        let (pa, pb) = (Platform::parse("linux/amd64").unwrap(), Platform::parse("linux/arm64").unwrap());
        let a = AgentArtifact::build(&[(pa, &amd64), (pb, &arm64)], Some("1.2.3")).unwrap();
        assert_eq!(
            String::from_utf8(a.index.clone()).unwrap(),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","artifactType":"application/vnd.flotilla.agent.config.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:8ce560e5884b6a961975d8eaa64dcc452f819ea9b40af068c6c8ea6646d4d3d7","size":523,"platform":{"architecture":"amd64","os":"linux"},"artifactType":"application/vnd.flotilla.agent.config.v1+json"},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:184068faa0f743b66072fe7e3955c3e33dfd35c183a8082d9582d9e7905e22f8","size":523,"platform":{"architecture":"arm64","os":"linux"},"artifactType":"application/vnd.flotilla.agent.config.v1+json"}],"annotations":{"org.opencontainers.image.version":"1.2.3"}}"#
        );
        assert_eq!(
            String::from_utf8(a.manifests[0].manifest.clone()).unwrap(),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.flotilla.agent.config.v1+json","config":{"mediaType":"application/vnd.flotilla.agent.config.v1+json","digest":"sha256:856960b945c2520a6dd5aaa5859b9e23dfb84aac38ba601e9f5fb9e1d069d4d8","size":55},"layers":[{"mediaType":"application/vnd.flotilla.agent.binary.v1","digest":"sha256:fac1ecd4990500ce3d68a41947d21e042f592eb9007dddd2d636e8f514605ca0","size":64}],"annotations":{"org.opencontainers.image.version":"1.2.3"}}"#
        );
        assert_eq!(a.index_digest, "sha256:8d794ddf0e56bcd5d429b8bcb38d509cfbb254685033e6b8e3f7285f1336ebf6");
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        let b = AgentArtifact::build(&[(v7, &elf(1, 1, ARM))], None).unwrap();
        assert_eq!(
            String::from_utf8(b.index.clone()).unwrap(),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","artifactType":"application/vnd.flotilla.agent.config.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:77f34121c9ad64bf1193bf02f01a6c5c4e557f748e9e151880471ce1a8d1188c","size":464,"platform":{"architecture":"arm","os":"linux","variant":"v7"},"artifactType":"application/vnd.flotilla.agent.config.v1+json"}]}"#
        );
        assert_eq!(b.index_digest, "sha256:53ff1ad5c17206b6ce85971bd9749bd523f108f7f55c32468c745d1275c27f6a");
        assert_eq!(
            b.manifests[0].manifest_digest,
            "sha256:77f34121c9ad64bf1193bf02f01a6c5c4e557f748e9e151880471ce1a8d1188c"
        );
    }

    #[test]
    fn unusable_binaries_are_refused() {
        let amd64 = elf(2, 1, X86_64);
        let pa = Platform::parse("linux/amd64").unwrap();
        let pb = Platform::parse("linux/arm64").unwrap();
        assert!(matches!(AgentArtifact::build(&[], None), Err(AgentError::NoBinaries)));
        let err = AgentArtifact::build(&[(pa.clone(), &amd64), (pa.clone(), &amd64)], None).unwrap_err();
        assert!(matches!(err, AgentError::DuplicatePlatform { .. }), "{err}");
        assert!(err.to_string().contains("linux/amd64"), "{err}");
        let err = AgentArtifact::build(&[(pb, &amd64)], None).unwrap_err();
        assert_eq!(err.to_string(), "the binary given for linux/arm64 is an ELF executable for linux/amd64");
        let err = AgentArtifact::build(&[(pa, b"#!/bin/sh\nexit 0\n#########")], None).unwrap_err();
        assert!(matches!(err, AgentError::NotElf { .. }), "{err}");
    }
}
