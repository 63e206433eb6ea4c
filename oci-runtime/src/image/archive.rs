//! Air-gapped artifacts: importing OCI image layouts (a directory or a tar of one) holding
//! container images or Wasm artifacts, and `docker save` archives (`manifest.json` plus
//! layer tars), into the one artifact store; saving a `.wasm` file as an OCI layout tar (the
//! artifact `flotilla push` would make of it); and pushing such a layout or archive to a
//! registry. Agent binary artifacts are refused by import (only an agent upgrade, from a
//! registry, takes them). Every blob is hashed against its digest before it is stored or pushed. Paths
//! named inside an archive are confined to it (no `..`, no absolute paths), tar archives are
//! read into a private directory under the store root holding only regular files, and
//! nothing in an archive is executed or trusted before verification.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use oci_client::Reference;
use oci_spec::image::{Descriptor, MediaType};
use serde::Deserialize;

use super::agent;
use super::spec::{self, Parsed};
use super::wasm::{self, PulledWasm, WASM_MAGIC, WasmArtifact};
use super::{ArtifactKind, Image, ImageError, ImageStore, Platform, build_record};
use crate::registry::{MAX_MODULE_BYTES, Op, Registry, header_value, parse_reference};
use crate::store::{sha256_digest, validate_digest};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Largest manifest, index or config read from an archive.
const MAX_DOC_BYTES: u64 = 8 * 1024 * 1024;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A readable layout: the directory itself, or a private extraction of a tar archive that is
/// removed when this is dropped.
struct Source {
    dir: PathBuf,
    /// What the user named (for errors).
    given: PathBuf,
    cleanup: bool,
}

impl Drop for Source {
    fn drop(&mut self) {
        if self.cleanup {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn archive_err(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Archive { path: path.to_owned(), reason: reason.into() }
}

/// `rel` inside `dir`, refusing `..` and absolute paths.
fn inside(dir: &Path, rel: &str, given: &Path) -> Result<PathBuf, ImageError> {
    let mut out = dir.to_owned();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(archive_err(given, format!("path {rel:?} leaves the archive"))),
        }
    }
    Ok(out)
}

impl Source {
    /// Opens a layout directory, or extracts a (possibly gzip-compressed) tar into
    /// `scratch_parent`.
    fn open(path: &Path, scratch_parent: &Path) -> Result<Source, ImageError> {
        let meta = fs::metadata(path).map_err(|e| archive_err(path, format!("cannot open: {e}")))?;
        if meta.is_dir() {
            return Ok(Source { dir: path.to_owned(), given: path.to_owned(), cleanup: false });
        }
        let dir =
            scratch_parent.join(format!(".import-{}-{}", std::process::id(), TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).map_err(ImageError::io(&dir))?;
        let source = Source { dir, given: path.to_owned(), cleanup: true };
        let file = fs::File::open(path).map_err(|e| archive_err(path, format!("cannot open: {e}")))?;
        let mut buffered = io::BufReader::new(file);
        let head = io::BufRead::fill_buf(&mut buffered).map_err(|e| archive_err(path, e.to_string()))?;
        let reader: Box<dyn io::Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
        } else {
            Box::new(buffered)
        };
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| archive_err(path, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| archive_err(path, format!("malformed tar: {e}")))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                if !kind.is_dir() {
                    tracing::debug!(archive = %path.display(), entry = %name, ?kind, "skipping non-file archive entry");
                }
                continue;
            }
            let dest = inside(&source.dir, &name, path)?;
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(ImageError::io(parent))?;
            }
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dest)
                .map_err(|e| archive_err(path, format!("entry {name:?}: {e}")))?;
            io::copy(&mut entry, &mut out).map_err(|e| archive_err(path, format!("entry {name:?}: {e}")))?;
        }
        Ok(source)
    }

    fn file(&self, rel: &str) -> Result<PathBuf, ImageError> {
        inside(&self.dir, rel, &self.given)
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = validate_digest(digest).map_err(|e| archive_err(&self.given, e.to_string()))?;
        Ok(self.dir.join("blobs").join("sha256").join(hex))
    }

    /// A small document from the layout's blobs, verified.
    fn doc(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        let bytes = read_limited(&path, &self.given)?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                reference: self.given.display().to_string(),
                digest: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }
}

fn read_limited(path: &Path, given: &Path) -> Result<Vec<u8>, ImageError> {
    let meta = fs::metadata(path).map_err(|e| archive_err(given, format!("{}: {e}", path.display())))?;
    if meta.len() > MAX_DOC_BYTES {
        return Err(archive_err(given, format!("{} is larger than {MAX_DOC_BYTES} bytes", path.display())));
    }
    fs::read(path).map_err(|e| archive_err(given, format!("{}: {e}", path.display())))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// One image found in a layout or archive.
struct Found {
    /// A container image, or a Wasm artifact (whose one layer is the module).
    kind: ArtifactKind,
    /// References it carries (full references; tags only when `name` completes them).
    references: Vec<String>,
    manifest_digest: String,
    manifest: Vec<u8>,
    /// The index it was chosen from, if any: (digest, bytes).
    index: Option<(String, Vec<u8>)>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    /// Where each blob (config and layers) lives in the source.
    files: Vec<(String, PathBuf)>,
}

/// Turns an annotation into a full reference: itself if it is one, else `name:tag`.
fn full_reference(annotation: Option<&str>, name: Option<&str>) -> Option<String> {
    match (annotation, name) {
        (Some(a), _) if a.contains('/') && parse_reference(a).is_ok() => parse_reference(a).ok().map(|r| r.whole()),
        (Some(tag), Some(name)) => {
            let repo = name.rsplit_once(':').filter(|(_, t)| !t.contains('/')).map(|(r, _)| r).unwrap_or(name);
            parse_reference(&format!("{repo}:{tag}")).ok().map(|r| r.whole())
        }
        (None, Some(name)) => parse_reference(name).ok().map(|r| r.whole()),
        (Some(_), None) | (None, None) => None,
    }
}

/// The name an index entry gives its image: containerd's full reference, else the OCI
/// `ref.name` (often a bare tag).
fn name_annotation(entry: &Descriptor) -> Option<&str> {
    let annotations = entry.annotations().as_ref()?;
    annotations.get(CONTAINERD_NAME).or(annotations.get(REF_NAME)).map(String::as_str)
}

/// Reads the images of a layout or docker-save archive for `platform`.
fn find_images(src: &Source, platform: &Platform, name: Option<&str>) -> Result<Vec<Found>, ImageError> {
    let given = &src.given;
    let index_path = src.file("index.json")?;
    if index_path.is_file() {
        let bytes = read_limited(&index_path, given)?;
        let layout = match spec::parse_manifest(&bytes).map_err(|e| archive_err(given, format!("index.json: {e}")))? {
            Parsed::Index(index) => index,
            Parsed::Manifest(_) => return Err(archive_err(given, "index.json is a manifest, not an index")),
        };
        let mut found = Vec::new();
        for entry in layout.manifests() {
            let entry_digest = entry.digest().as_ref();
            let reference = full_reference(name_annotation(entry), name);
            let top = src.doc(entry_digest)?;
            let (index, manifest_digest, manifest) =
                match spec::parse_manifest(&top).map_err(|e| archive_err(given, format!("{entry_digest}: {e}")))? {
                    Parsed::Index(children) => {
                        // The node's platform, else a Wasm entry: Wasm runs on any node.
                        let children = children.manifests();
                        let child = match spec::select_platform(children, platform) {
                            Ok(child) => child,
                            Err(e) => wasm::select_platform(children).ok_or_else(|| ImageError::Platform {
                                reference: given.display().to_string(),
                                reason: e.to_string(),
                            })?,
                        };
                        let child_digest = child.digest().as_ref();
                        (Some((entry_digest.to_owned(), top)), child_digest.to_owned(), src.doc(child_digest)?)
                    }
                    Parsed::Manifest(_) => (None, entry_digest.to_owned(), top),
                };
            let Parsed::Manifest(parsed) =
                spec::parse_manifest(&manifest).map_err(|e| archive_err(given, format!("{manifest_digest}: {e}")))?
            else {
                return Err(archive_err(given, format!("{manifest_digest} is an index inside an index")));
            };
            let (config, layers) = (parsed.config().clone(), parsed.layers().clone());
            let kind = if agent::is_agent_manifest(&config) {
                ArtifactKind::Agent
            } else if wasm::is_wasm_manifest(&config, &layers) || holds_raw_module(src, &layers)? {
                ArtifactKind::Wasm
            } else {
                ArtifactKind::Container
            };
            if kind == ArtifactKind::Container
                && index.is_none()
                && let Some(p) = entry.platform()
                && platform.fit_entry(p).is_none()
            {
                continue;
            }
            let mut files = Vec::with_capacity(layers.len() + 1);
            for d in std::iter::once(&config).chain(&layers) {
                let digest = d.digest().as_ref();
                files.push((digest.to_owned(), src.blob_path(digest)?));
            }
            found.push(Found {
                kind,
                references: reference.into_iter().collect(),
                manifest_digest,
                manifest,
                index,
                config,
                layers,
                files,
            });
        }
        if found.is_empty() {
            return Err(ImageError::Platform {
                reference: given.display().to_string(),
                reason: format!("layout has no image for platform {platform}"),
            });
        }
        return Ok(found);
    }
    let docker_manifest = src.file("manifest.json")?;
    if !docker_manifest.is_file() {
        return Err(archive_err(
            given,
            "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
        ));
    }
    let bytes = read_limited(&docker_manifest, given)?;
    let entries: Vec<DockerSaveEntry> =
        serde_json::from_slice(&bytes).map_err(|e| archive_err(given, format!("manifest.json: {e}")))?;
    let mut found = Vec::new();
    for entry in entries {
        let config_path = src.file(&entry.config)?;
        let config_bytes = read_limited(&config_path, given)?;
        let descriptor = |media_type: MediaType, digest: &str, size: u64| {
            spec::descriptor(media_type, digest, size).map_err(|e| archive_err(given, e.to_string()))
        };
        let config_digest = sha256_digest(&config_bytes);
        let config = descriptor(spec::DOCKER_CONFIG.into(), &config_digest, config_bytes.len() as u64)?;
        let mut files = vec![(config_digest, config_path)];
        let mut layers = Vec::new();
        for rel in &entry.layers {
            let path = src.file(rel)?;
            let (digest, size, media_type) = hash_layer_file(&path, given)?;
            layers.push(descriptor(media_type, &digest, size)?);
            files.push((digest, path));
        }
        // A map of serde_json's, which orders the keys, as this manifest has always been
        // written: its digest names the image in the store and in a push, so its bytes must
        // not change (oci-spec's ImageManifest would order the fields otherwise).
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": spec::DOCKER_MANIFEST,
            "config": {"mediaType": config.media_type(), "size": config.size(), "digest": config.digest()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type(), "size": l.size(), "digest": l.digest(),
            })).collect::<Vec<_>>(),
        }))
        .map_err(|e| archive_err(given, format!("cannot encode manifest: {e}")))?;
        let mut references: Vec<String> = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .filter_map(|t| parse_reference(t).ok().map(|r| r.whole()))
            .collect();
        if references.is_empty()
            && let Some(r) = full_reference(None, name)
        {
            references.push(r);
        }
        found.push(Found {
            kind: ArtifactKind::Container,
            references,
            manifest_digest: sha256_digest(&manifest),
            manifest,
            index: None,
            config,
            layers,
            files,
        });
    }
    Ok(found)
}

/// Whether a manifest whose media types do not say Wasm still holds a raw module: a single
/// layer that is no layer tar and whose blob in the layout starts with the Wasm magic.
fn holds_raw_module(src: &Source, layers: &[Descriptor]) -> Result<bool, ImageError> {
    let [only] = layers else { return Ok(false) };
    if spec::is_layer_media_type(only.media_type()) {
        return Ok(false);
    }
    Ok(read_head(&src.blob_path(only.digest().as_ref())?).starts_with(WASM_MAGIC))
}

/// The first bytes of a file (fewer if it is shorter or unreadable).
fn read_head(path: &Path) -> Vec<u8> {
    let mut head = Vec::with_capacity(8);
    let _ = fs::File::open(path).and_then(|f| io::Read::read_to_end(&mut io::Read::take(f, 8), &mut head));
    head
}

/// Digest, size and media type (by its first bytes) of a layer file.
fn hash_layer_file(path: &Path, given: &Path) -> Result<(String, u64, MediaType), ImageError> {
    use sha2::Digest as _;
    let mut f = fs::File::open(path).map_err(|e| archive_err(given, format!("{}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut size = 0u64;
    loop {
        let n = io::Read::read(&mut f, &mut buf).map_err(|e| archive_err(given, format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        if head.len() < 4 {
            head.extend_from_slice(&buf[..n.min(4)]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let media_type = if head.starts_with(&[0x1f, 0x8b]) {
        spec::DOCKER_LAYER_GZIP.into()
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        MediaType::ImageLayerZstd
    } else {
        spec::DOCKER_LAYER_TAR.into()
    };
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), size, media_type))
}

/// An artifact [`ImageStore::import`] recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// A container image.
    Container(Box<Image>),
    /// A Wasm module or component (`from_cache` is false).
    Wasm(PulledWasm),
}

impl Imported {
    /// The reference it was recorded under.
    pub fn reference(&self) -> &str {
        match self {
            Imported::Container(i) => &i.reference,
            Imported::Wasm(w) => &w.reference,
        }
    }

    /// The digest of its manifest.
    pub fn manifest_digest(&self) -> &str {
        match self {
            Imported::Container(i) => &i.manifest_digest,
            Imported::Wasm(w) => &w.manifest_digest,
        }
    }

    /// Its kind.
    pub fn kind(&self) -> ArtifactKind {
        match self {
            Imported::Container(_) => ArtifactKind::Container,
            Imported::Wasm(_) => ArtifactKind::Wasm,
        }
    }

    /// The container image, if it is one.
    pub fn into_image(self) -> Option<Image> {
        match self {
            Imported::Container(i) => Some(*i),
            Imported::Wasm(_) => None,
        }
    }
}

impl ImageStore {
    /// Imports the artifacts of an OCI image layout directory, an OCI layout tar (optionally
    /// gzip-compressed) or a `docker save` archive and records them under the references the
    /// archive names (`io.containerd.image.name`, a full `org.opencontainers.image.ref.name`,
    /// or `RepoTags`). A bare tag annotation is completed with `name` (`repo[:tag]`), which
    /// also names artifacts the archive leaves unnamed. Container images are taken for
    /// `platform` (from an index: its entry for `platform`); Wasm artifacts (a Wasm config or
    /// layer media type, or a single raw layer starting with the Wasm magic; from an index:
    /// its wasm entry) for any platform.
    pub async fn import(
        &self,
        path: &Path,
        platform: &Platform,
        name: Option<&str>,
    ) -> Result<Vec<Imported>, ImageError> {
        self.import_with_progress(path, platform, name, None).await
    }

    /// [`ImageStore::import`], telling `progress` the blobs to copy in (their count and bytes)
    /// once the archive is read, then each blob as it is verified and stored.
    pub async fn import_with_progress(
        &self,
        path: &Path,
        platform: &Platform,
        name: Option<&str>,
        progress: Option<Arc<dyn crate::registry::PushProgress>>,
    ) -> Result<Vec<Imported>, ImageError> {
        let _shared = self.inner.gc_lock.read().await;
        let this = self.clone();
        let (path, platform, name) = (path.to_owned(), platform.clone(), name.map(str::to_owned));
        let task_path = path.clone();
        tokio::task::spawn_blocking(move || {
            this.import_sync(&task_path, &platform, name.as_deref(), progress.as_deref())
        })
        .await
        .map_err(|e| archive_err(&path, format!("import task failed: {e}")))?
    }

    fn import_sync(
        &self,
        path: &Path,
        platform: &Platform,
        name: Option<&str>,
        progress: Option<&dyn crate::registry::PushProgress>,
    ) -> Result<Vec<Imported>, ImageError> {
        let src = Source::open(path, &self.blobs().root().join("ingest"))?;
        let shown = path.display().to_string();
        let mut imported = Vec::new();
        let found_images = find_images(&src, platform, name)?;
        let size = |file: &Path| std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if let Some(p) = progress {
            let files = found_images.iter().flat_map(|f| f.files.iter());
            let (blobs, bytes) = files.fold((0, 0), |(n, b), (_, file)| (n + 1, b + size(file)));
            p.start(blobs, bytes);
        }
        for found in found_images {
            if found.references.is_empty() {
                return Err(archive_err(
                    path,
                    format!("image {} has no reference in the archive; give it a name", found.manifest_digest),
                ));
            }
            let record = match found.kind {
                // Only an agent upgrade takes one, and it pulls from a registry; an agent binary
                // recorded here would only sit in the store until collected.
                ArtifactKind::Agent => {
                    return Err(archive_err(
                        path,
                        format!(
                            "{} is an agent binary artifact, which is not imported: import takes container \
                             images and wasm artifacts; agents take their binaries from a registry when upgraded",
                            found.manifest_digest
                        ),
                    ));
                }
                ArtifactKind::Container => {
                    let config_path = &found.files[0].1;
                    let config_bytes = read_limited(config_path, path)?;
                    build_record(
                        &shown,
                        &found.manifest_digest,
                        found.index.as_ref().map(|(d, _)| d.clone()),
                        &found.config,
                        &found.layers,
                        &config_bytes,
                        platform,
                    )?
                }
                ArtifactKind::Wasm => {
                    let layer = wasm::select_layer(&found.config, &found.layers)
                        .map_err(|e| ImageError::NotWasm { reference: shown.clone(), found: e.to_string() })?;
                    let layer_digest = layer.digest().as_ref();
                    validate_digest(layer_digest).map_err(|e| archive_err(path, e.to_string()))?;
                    if layer.size() > MAX_MODULE_BYTES {
                        return Err(ImageError::TooLarge {
                            reference: shown.clone(),
                            digest: layer_digest.to_owned(),
                            limit: MAX_MODULE_BYTES,
                        });
                    }
                    let head = read_head(&src.blob_path(layer_digest)?);
                    if !head.starts_with(WASM_MAGIC) {
                        return Err(ImageError::NotWasm {
                            reference: shown.clone(),
                            found: format!(
                                "layer {layer_digest} ({}) starts with {} instead of the wasm magic \\0asm; {}",
                                layer.media_type(),
                                wasm::describe_head(&head),
                                wasm::describe_manifest(&found.config, &found.layers)
                            ),
                        });
                    }
                    wasm::record(
                        &found.manifest_digest,
                        found.index.as_ref().map(|(d, _)| d.clone()),
                        &found.config,
                        layer,
                        &head,
                    )
                }
            };
            // The layout's blobs are verified as they are copied in; only a Wasm artifact's
            // config and module are needed of it (other layers of a Wasm manifest are not).
            for (digest, file) in &found.files {
                // Of a Wasm artifact, only its config and module.
                if found.kind != ArtifactKind::Wasm || record.blobs().any(|d| d == digest) {
                    self.blobs().ingest_file(digest, file).map_err(ImageError::store(&shown))?;
                }
                if let Some(p) = progress {
                    p.blob_done(size(file));
                }
            }
            self.blobs().ingest_bytes(&found.manifest_digest, &found.manifest).map_err(ImageError::store(&shown))?;
            if let Some((digest, bytes)) = &found.index {
                self.blobs().ingest_bytes(digest, bytes).map_err(ImageError::store(&shown))?;
            }
            for reference in &found.references {
                let artifact = match found.kind {
                    // Agent binaries were refused above.
                    ArtifactKind::Container | ArtifactKind::Agent => {
                        Imported::Container(Box::new(self.record(reference, record.clone())?))
                    }
                    ArtifactKind::Wasm => {
                        let r = self.record_raw(reference, record.clone())?;
                        let wasm_digest = r.layers[0].digest.clone();
                        Imported::Wasm(PulledWasm {
                            reference: reference.clone(),
                            manifest_digest: r.manifest_digest,
                            path: self.blobs().path(&wasm_digest).map_err(ImageError::store(&shown))?,
                            wasm_digest,
                            from_cache: false,
                        })
                    }
                };
                tracing::info!(reference = %reference, kind = %found.kind, archive = %shown, manifest = %found.manifest_digest, "imported artifact");
                imported.push(artifact);
            }
        }
        Ok(imported)
    }
}

/// Writes the OCI artifact `flotilla push` would make of the Wasm binary `wasm`
/// ([`WasmArtifact`]) as an OCI image layout tar at `out`, named `reference` (its full form in
/// `io.containerd.image.name`, its tag in `org.opencontainers.image.ref.name`), for
/// [`ImageStore::import`] on a node without a registry, `flotilla push` or `skopeo copy
/// oci-archive:`. Returns the manifest digest, which is the one a push of the same binary
/// gives. The archive is written beside `out` and renamed into place.
pub fn save_wasm(wasm: &[u8], reference: &str, out: &Path) -> Result<String, ImageError> {
    let r = parse_reference(reference)?;
    if r.digest().is_some() {
        return Err(ImageError::Registry(crate::registry::RegistryError::InvalidReference {
            reference: reference.to_owned(),
            reason: "an archive names its image by tag, not by digest".to_owned(),
        }));
    }
    let a = WasmArtifact::build(wasm)
        .map_err(|e| ImageError::NotWasm { reference: reference.to_owned(), found: e.to_string() })?;
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(CONTAINERD_NAME.to_owned(), r.whole());
    annotations.insert(REF_NAME.to_owned(), r.tag().unwrap_or("latest").to_owned());
    // serde_json's map, which orders the keys, rather than oci-spec's ImageIndex: that keeps
    // annotations in a HashMap, and with two of them the archive's bytes would vary from run
    // to run.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::ImageIndex,
        "manifests": [{
            "mediaType": MediaType::ImageManifest,
            "digest": a.manifest_digest,
            "size": a.manifest.len(),
            "platform": {"architecture": "wasm", "os": a.os},
            "annotations": annotations,
        }],
    });
    let index = serde_json::to_vec(&index).map_err(|e| archive_err(out, format!("cannot encode index.json: {e}")))?;
    let blob = |digest: &str| format!("blobs/sha256/{}", &digest["sha256:".len()..]);
    let entries: [(String, &[u8]); 5] = [
        ("oci-layout".to_owned(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".to_owned(), &index),
        (blob(&a.manifest_digest), &a.manifest),
        (blob(&a.config_digest), &a.config),
        (blob(&a.layer_digest), wasm),
    ];
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let written = (|| -> io::Result<()> {
        let mut tar = tar::Builder::new(io::BufWriter::new(fs::File::create(&tmp)?));
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            tar.append_data(&mut h, dir, io::empty())?;
        }
        for (name, data) in &entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_mtime(0);
            tar.append_data(&mut h, name, *data)?;
        }
        let file = tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, out)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(archive_err(out, format!("cannot write: {e}")));
    }
    tracing::info!(reference, archive = %out.display(), digest = %a.manifest_digest, "saved wasm artifact");
    Ok(a.manifest_digest)
}

/// Pushes the image of an OCI layout (directory or tar) or `docker save` archive at `path` to
/// `reference` (which must name a tag) and returns the digest of the manifest (or index)
/// pushed. If the archive holds several images, the one whose reference or tag matches
/// `reference` is pushed. An index is pushed with all its platform manifests. Every blob is
/// verified against its digest before it is sent. A tar archive is extracted into a private
/// directory under `scratch` for the duration of the push.
pub async fn push_archive(
    registry: &Registry,
    path: &Path,
    reference: &str,
    scratch: &Path,
) -> Result<String, ImageError> {
    let r = parse_reference(reference)?;
    if r.digest().is_some() {
        return Err(ImageError::Registry(crate::registry::RegistryError::InvalidReference {
            reference: reference.to_owned(),
            reason: "a push needs a tag, not a digest".to_owned(),
        }));
    }
    let (path_owned, r2, scratch) = (path.to_owned(), r.clone(), scratch.to_owned());
    // The source (an extraction, for an archive) lives until the push is over.
    let (_source, plan) = tokio::task::spawn_blocking(move || plan_push(&path_owned, &scratch, &r2))
        .await
        .map_err(|e| archive_err(path, format!("push task failed: {e}")))??;

    let client = registry.client_for(&r);
    let auth = registry.auth_for(&r).await?;
    client.store_auth_if_needed(r.resolve_registry(), &auth).await;
    let rr = &r;
    let map = |op: Op| move |e| ImageError::Registry(registry.map_oci_error(reference, rr, op, e));
    let sizes: Vec<u64> = plan.blobs.iter().map(|(_, file)| fs::metadata(file).map_or(0, |m| m.len())).collect();
    registry.progress_start(plan.blobs.len(), sizes.iter().sum());
    for ((digest, file), size) in plan.blobs.iter().zip(sizes) {
        if client.blob_exists(&r, digest).await.map_err(map(Op::Push))? {
            registry.progress_blob(size);
            continue;
        }
        let bytes = tokio::fs::read(file).await.map_err(ImageError::io(file))?;
        let actual = sha256_digest(&bytes);
        if &actual != digest {
            return Err(ImageError::DigestMismatch {
                reference: path.display().to_string(),
                digest: digest.clone(),
                actual,
            });
        }
        client.push_blob(&r, bytes::Bytes::from(bytes), digest).await.map_err(map(Op::Push))?;
        registry.progress_blob(size);
    }
    let mut top = String::new();
    for (i, (media_type, bytes)) in plan.manifests.iter().enumerate() {
        let digest = sha256_digest(bytes);
        let last = i + 1 == plan.manifests.len();
        let target = if last { r.clone() } else { r.clone_with_digest(digest.clone()) };
        let content_type =
            header_value(media_type).ok_or_else(|| archive_err(path, format!("unusable media type {media_type:?}")))?;
        client.push_manifest_raw(&target, bytes.clone(), content_type).await.map_err(map(Op::Push))?;
        top = digest;
    }
    tracing::info!(reference, archive = %path.display(), digest = %top, "pushed image archive");
    Ok(top)
}

struct PushPlan {
    /// (digest, file) of every config and layer blob.
    blobs: Vec<(String, PathBuf)>,
    /// (media type, bytes) of manifests to push in order; the last one is tagged.
    manifests: Vec<(String, Vec<u8>)>,
}

fn plan_push(path: &Path, scratch: &Path, r: &Reference) -> Result<(Source, PushPlan), ImageError> {
    let src = Source::open(path, scratch)?;
    let mut plan = PushPlan { blobs: Vec::new(), manifests: Vec::new() };
    let index_path = src.file("index.json")?;
    if !index_path.is_file() {
        // docker save: one image, manifest synthesised.
        let found = find_images(&src, &Platform::new("", "", None), Some(&r.whole()))?;
        let wanted = r.whole();
        let pick = match found.iter().position(|f| f.references.contains(&wanted)) {
            Some(i) => i,
            None if found.len() == 1 => 0,
            None => {
                return Err(archive_err(path, format!("archive holds {} images and none is {wanted}", found.len())));
            }
        };
        let f = &found[pick];
        plan.blobs = f.files.clone();
        plan.manifests.push((spec::DOCKER_MANIFEST.to_owned(), f.manifest.clone()));
        return Ok((src, plan));
    }
    let bytes = read_limited(&index_path, path)?;
    let Parsed::Index(index) = spec::parse_manifest(&bytes).map_err(|e| archive_err(path, e.to_string()))? else {
        return Err(archive_err(path, "index.json is not an index"));
    };
    let entries = index.manifests();
    let tag = r.tag().unwrap_or("latest");
    let wanted = r.whole();
    let entry = match entries.iter().find(|e| {
        name_annotation(e).is_some_and(|n| n == tag || full_reference(Some(n), None).as_deref() == Some(&wanted))
    }) {
        Some(e) => e,
        None if entries.len() == 1 => &entries[0],
        None => {
            return Err(archive_err(path, format!("layout holds {} images and none is tagged {tag}", entries.len())));
        }
    };
    let top = src.doc(entry.digest().as_ref())?;
    let add_manifest = |plan: &mut PushPlan, child: &Descriptor, bytes: Vec<u8>| {
        let digest = child.digest();
        let Parsed::Manifest(manifest) =
            spec::parse_manifest(&bytes).map_err(|e| archive_err(path, format!("{digest}: {e}")))?
        else {
            return Err(archive_err(path, format!("{digest} is an index inside an index")));
        };
        for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let digest = d.digest().as_ref();
            plan.blobs.push((digest.to_owned(), src.blob_path(digest)?));
        }
        plan.manifests.push((child.media_type().to_string(), bytes));
        Ok(())
    };
    match spec::parse_manifest(&top).map_err(|e| archive_err(path, e.to_string()))? {
        Parsed::Index(children) => {
            for child in children.manifests() {
                let bytes = src.doc(child.digest().as_ref())?;
                add_manifest(&mut plan, child, bytes)?;
            }
            plan.manifests.push((entry.media_type().to_string(), top));
        }
        Parsed::Manifest(_) => add_manifest(&mut plan, entry, top)?,
    }
    Ok((src, plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive `image save` writes is pinned byte for byte (its index.json included), and
    /// so is the manifest import makes of a `docker save` archive, whose digest names the image
    /// in the store and in a push.
    #[test]
    fn written_bytes_are_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.tar");
        save_wasm(b"\0asm\x01\x00\x00\x00", "registry.example/mod:v1", &out).unwrap();
        assert_eq!(
            sha256_digest(&fs::read(&out).unwrap()),
            "sha256:209bf2a760157aeece2d4a3df04af45330752c7610f5aae8d24094e309603b34"
        );

        let save = dir.path().join("save");
        fs::create_dir(&save).unwrap();
        fs::write(
            save.join("config.json"),
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        fs::write(save.join("layer.tar"), [0u8; 1024]).unwrap();
        fs::write(
            save.join("manifest.json"),
            br#"[{"Config":"config.json","RepoTags":["x/y:1"],"Layers":["layer.tar"]}]"#,
        )
        .unwrap();
        let src = Source::open(&save, dir.path()).unwrap();
        let found = find_images(&src, &Platform::new("linux", "amd64", None), None).unwrap();
        assert_eq!(
            String::from_utf8(found[0].manifest.clone()).unwrap(),
            r#"{"config":{"digest":"sha256:c5b1d63604f273462ef36fadac3182d43ae6a6138731cf594b314835cf1c034f","mediaType":"application/vnd.docker.container.image.v1+json","size":78},"layers":[{"digest":"sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef","mediaType":"application/vnd.docker.image.rootfs.diff.tar","size":1024}],"mediaType":"application/vnd.docker.distribution.manifest.v2+json","schemaVersion":2}"#
        );
        assert_eq!(found[0].manifest_digest, "sha256:36b70d792ad1afe3aa87b2ece03b2e493e8d42f41111f15ac3d12f4a331c15f7");
    }
}
