//! The artifact index: `<blob store root>/artifacts.json`, the one record of every artifact
//! on the node, whatever its kind: each reference pulled or imported, with the kind (a
//! container image, a Wasm module or component, or an agent binary), its manifest, config and
//! layers and, for container images, their chain ids. It is what lets an agent restart find its artifacts
//! without a registry, and what garbage collection reads to know which blobs are still
//! needed. Written with the crate's one durable write ([`crate::durable::write_atomic`]); the
//! caller serialises read-modify-write cycles. It never holds blob content, only digests.
//!
//! Earlier versions kept two files: `images.json` beside the snapshots (container images) and
//! `refs.json` in the blob store root (reference → manifest and module digests of Wasm
//! pulls). [`ImageIndex::migrate`] folds both into the index once, so an upgraded agent still
//! starts offline from what it had, then removes them.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::platform::Platform;

/// Errors reading or writing the artifact index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Reading or writing the file failed.
    #[error("artifact index i/o error on {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid artifact index.
    #[error("artifact index {} is corrupt: {source}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl From<crate::durable::DurableError> for IndexError {
    fn from(e: crate::durable::DurableError) -> Self {
        IndexError::Io { path: e.path, source: e.source }
    }
}

/// What an artifact holds, and so which runtime can use it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A container image: layer tars, an image config, unpacked into snapshots.
    #[default]
    Container,
    /// A Wasm module or component: one layer that is the binary itself.
    Wasm,
    /// A Flotilla agent binary for one platform (an ELF executable): one layer that is the
    /// binary itself, chosen from an image index by platform. Nothing runs it in place; an
    /// agent upgrade copies it out of the store.
    Agent,
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArtifactKind::Container => "container image",
            ArtifactKind::Wasm => "wasm artifact",
            ArtifactKind::Agent => "agent binary",
        })
    }
}

impl ArtifactKind {
    /// The kind with its indefinite article ("a container image", "an agent binary"), for
    /// messages.
    pub fn with_article(self) -> &'static str {
        match self {
            ArtifactKind::Container => "a container image",
            ArtifactKind::Wasm => "a wasm artifact",
            ArtifactKind::Agent => "an agent binary",
        }
    }
}

/// One layer of a recorded artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the (possibly compressed) layer blob.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (from the config's `rootfs.diff_ids`); for a Wasm
    /// layer, the layer's own digest.
    pub diff_id: String,
}

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The kind of artifact (absent in records written before Wasm artifacts were indexed:
    /// those are container images).
    #[serde(default)]
    pub kind: ArtifactKind,
    /// Digest of the platform image manifest.
    pub manifest_digest: String,
    /// Digest of the index the manifest was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    /// Digest of the config blob. Always set for container images; absent only for Wasm
    /// modules migrated from a `refs.json`, which never stored their config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Layers, bottom first (a Wasm artifact or an agent binary has one: the binary).
    pub layers: Vec<LayerRecord>,
    /// Chain ids, bottom first (one per layer of a container image; none for the other kinds).
    #[serde(default)]
    pub chain_ids: Vec<String>,
    /// Platform the manifest was chosen for (`wasip1/wasm`, `wasip2/wasm` for Wasm; the
    /// binary's, e.g. `linux/arm64`, for an agent binary).
    pub platform: Platform,
    /// Last pull, import or unpack, in seconds since the Unix epoch (for LRU collection).
    pub last_used_unix: u64,
}

impl ImageRecord {
    /// Every blob digest this artifact needs: index, manifest, config, layers.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        self.index_digest
            .iter()
            .chain(std::iter::once(&self.manifest_digest))
            .chain(self.config_digest.iter())
            .map(String::as_str)
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexDoc {
    version: u32,
    artifacts: BTreeMap<String, ImageRecord>,
}

const INDEX_VERSION: u32 = 2;
/// The index's file name in the blob store root.
pub const INDEX_FILE: &str = "artifacts.json";
/// The lock file serialising updates of the index.
const LOCK_FILE: &str = ".artifacts.lock";

/// Handle on an `artifacts.json` file.
#[derive(Debug, Clone)]
pub struct ImageIndex {
    path: PathBuf,
}

impl ImageIndex {
    /// The index kept in the blob store rooted at `root`.
    pub fn in_root(root: &Path) -> Self {
        Self { path: root.join(INDEX_FILE) }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All records; a missing file is an empty index.
    pub fn load(&self) -> Result<BTreeMap<String, ImageRecord>, IndexError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => return Err(IndexError::Io { path: self.path.clone(), source }),
        };
        let doc: IndexDoc =
            serde_json::from_slice(&bytes).map_err(|source| IndexError::Corrupt { path: self.path.clone(), source })?;
        Ok(doc.artifacts)
    }

    /// Replaces the whole index, durably.
    pub fn store(&self, artifacts: BTreeMap<String, ImageRecord>) -> Result<(), IndexError> {
        let doc = IndexDoc { version: INDEX_VERSION, artifacts };
        let bytes = serde_json::to_vec_pretty(&doc)
            .map_err(|source| IndexError::Corrupt { path: self.path.clone(), source })?;
        Ok(crate::durable::write_atomic(&self.path, &bytes)?)
    }

    /// Loads, applies `change`, stores, holding an exclusive `flock` on `.artifacts.lock`
    /// beside the index all the while, so read-modify-write cycles of every thread and every
    /// process (an agent, and `flotilla image import` beside it) never lose each other's
    /// records. A corrupt index is replaced (after a warning) rather than left to block every
    /// later pull.
    pub fn update<T>(&self, change: impl FnOnce(&mut BTreeMap<String, ImageRecord>) -> T) -> Result<T, IndexError> {
        let lock_path = self.path.with_file_name(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| IndexError::Io { path: lock_path.clone(), source })?;
        // Blocking: the holder only reads, changes and writes one small file.
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| IndexError::Io { path: lock_path.clone(), source: e.into() })?;
        let mut artifacts = match self.load() {
            Ok(artifacts) => artifacts,
            Err(e @ IndexError::Corrupt { .. }) => {
                tracing::warn!(error = %e, "replacing corrupt artifact index");
                BTreeMap::new()
            }
            Err(e) => return Err(e),
        };
        let out = change(&mut artifacts);
        self.store(artifacts)?;
        Ok(out)
    }

    /// Folds the indexes of earlier versions into this one: the container images of
    /// `images_json` and the Wasm pulls of `refs_json` (whose modules must still be in the
    /// blob store, `blob_path` says where). Entries already in the index win. Once the index
    /// is durably written, the old files are removed; a crash before that repeats the
    /// migration, which is idempotent. An unreadable old file is reported and removed.
    /// Returns how many records were added.
    pub fn migrate(
        &self,
        images_json: &Path,
        refs_json: &Path,
        blob_path: impl Fn(&str) -> Option<PathBuf>,
        now_unix: u64,
    ) -> Result<usize, IndexError> {
        let (images, refs) = (images_json.is_file(), refs_json.is_file());
        if !images && !refs {
            return Ok(0);
        }
        let mut legacy: BTreeMap<String, ImageRecord> = BTreeMap::new();
        if images {
            match read_legacy::<LegacyImages>(images_json) {
                Ok(doc) => legacy.extend(doc.images),
                Err(e) => tracing::warn!(file = %images_json.display(), error = %e, "dropping unreadable image index"),
            }
        }
        if refs {
            match read_legacy::<LegacyRefs>(refs_json) {
                Ok(doc) => {
                    for (reference, entry) in doc.refs {
                        let Some(path) = blob_path(&entry.wasm_digest) else { continue };
                        let Ok(meta) = fs::metadata(&path) else { continue };
                        legacy.entry(reference).or_insert_with(|| ImageRecord {
                            kind: ArtifactKind::Wasm,
                            manifest_digest: entry.manifest_digest,
                            index_digest: None,
                            config_digest: None,
                            layers: vec![LayerRecord {
                                digest: entry.wasm_digest.clone(),
                                media_type: crate::registry::WASM_LAYER_MEDIA_TYPE.to_owned(),
                                size: meta.len(),
                                diff_id: entry.wasm_digest,
                            }],
                            chain_ids: Vec::new(),
                            platform: Platform::new(super::wasm::wasm_os_of_file(&path), "wasm", None),
                            last_used_unix: now_unix,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(file = %refs_json.display(), error = %e, "dropping unreadable reference cache")
                }
            }
        }
        let added = self.update(|artifacts| {
            let mut added = 0;
            for (reference, record) in legacy {
                if let std::collections::btree_map::Entry::Vacant(v) = artifacts.entry(reference) {
                    v.insert(record);
                    added += 1;
                }
            }
            added
        })?;
        for old in [images_json, refs_json] {
            match fs::remove_file(old) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(IndexError::Io { path: old.to_owned(), source }),
            }
        }
        for dir in [images_json, refs_json] {
            crate::durable::sync_parent(dir)?;
        }
        tracing::info!(added, index = %self.path.display(), "migrated earlier artifact indexes");
        Ok(added)
    }
}

/// `images.json` of earlier versions: `{"version": 1, "images": {reference: record}}`.
#[derive(Deserialize)]
struct LegacyImages {
    images: BTreeMap<String, ImageRecord>,
}

/// `refs.json` of earlier versions: `{"version": 1, "refs": {reference: entry}}`.
#[derive(Deserialize)]
struct LegacyRefs {
    refs: BTreeMap<String, LegacyRef>,
}

#[derive(Deserialize)]
struct LegacyRef {
    manifest_digest: String,
    wasm_digest: String,
}

fn read_legacy<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, IndexError> {
    let bytes = fs::read(path).map_err(|source| IndexError::Io { path: path.to_owned(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| IndexError::Corrupt { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(k: u8) -> String {
        format!("sha256:{}", hex::encode([k; 32]))
    }

    fn record(n: u8) -> ImageRecord {
        ImageRecord {
            kind: ArtifactKind::Container,
            manifest_digest: d(n),
            index_digest: None,
            config_digest: Some(d(n + 1)),
            layers: vec![LayerRecord { digest: d(n + 2), media_type: "m".into(), size: 3, diff_id: d(n + 3) }],
            chain_ids: vec![d(n + 3)],
            platform: Platform::new("linux", "amd64", None),
            last_used_unix: 7,
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let idx = ImageIndex::in_root(dir.path());
        assert!(idx.load().unwrap().is_empty());
        idx.update(|m| m.insert("a".into(), record(1))).unwrap();
        idx.update(|m| m.insert("b".into(), record(10))).unwrap();
        let all = ImageIndex::in_root(dir.path()).load().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["b"], record(10));
        assert_eq!(all["a"].blobs().count(), 3);
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from(LOCK_FILE), std::ffi::OsString::from(INDEX_FILE)]);

        fs::write(idx.path(), b"{").unwrap();
        assert!(matches!(idx.load(), Err(IndexError::Corrupt { .. })));
        idx.update(|m| m.insert("c".into(), record(20))).unwrap();
        assert_eq!(idx.load().unwrap().len(), 1);
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        // Separate handles, as separate processes (an agent and `flotilla image import`) have.
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let root = dir.path().to_owned();
                std::thread::spawn(move || {
                    let idx = ImageIndex::in_root(&root);
                    for i in 0..20u8 {
                        idx.update(|m| m.insert(format!("r{t}-{i}"), record(i))).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ImageIndex::in_root(dir.path()).load().unwrap().len(), 160);
    }

    #[test]
    fn migration_folds_both_old_files_in_once() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        fs::create_dir(&blobs).unwrap();
        let module = b"\0asm\x0d\x00\x01\x00component";
        let wasm_digest = crate::store::sha256_digest(module);
        fs::write(blobs.join(&wasm_digest[7..]), module).unwrap();
        let blob_path = |digest: &str| Some(blobs.join(&digest[7..]));

        // An images.json as version 1 wrote it (no kind, a plain config digest).
        let images_json = dir.path().join("images.json");
        let old = serde_json::json!({"version": 1, "images": {"reg/app:v1": {
            "manifest_digest": d(1), "config_digest": d(2),
            "layers": [{"digest": d(3), "media_type": "application/vnd.oci.image.layer.v1.tar", "size": 5, "diff_id": d(4)}],
            "chain_ids": [d(4)], "platform": {"os": "linux", "architecture": "amd64"}, "last_used_unix": 9}}});
        fs::write(&images_json, serde_json::to_vec(&old).unwrap()).unwrap();
        // A refs.json: one module present, one whose blob is gone.
        let refs_json = dir.path().join("refs.json");
        let refs = serde_json::json!({"version": 1, "refs": {
            "reg/mod:v1": {"manifest_digest": d(5), "wasm_digest": wasm_digest},
            "reg/gone:v1": {"manifest_digest": d(6), "wasm_digest": d(7)}}});
        fs::write(&refs_json, serde_json::to_vec(&refs).unwrap()).unwrap();

        let idx = ImageIndex::in_root(dir.path());
        // An entry already in the index wins over the old files.
        idx.update(|m| m.insert("reg/mod:v1".into(), record(30))).unwrap();
        assert_eq!(idx.migrate(&images_json, &refs_json, blob_path, 100).unwrap(), 1);
        let all = idx.load().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["reg/app:v1"].kind, ArtifactKind::Container);
        assert_eq!(all["reg/app:v1"].config_digest, Some(d(2)));
        assert_eq!(all["reg/mod:v1"], record(30));
        assert!(!images_json.exists() && !refs_json.exists());

        // Without an entry in the way the module is indexed as Wasm, kind from its bytes.
        fs::write(&refs_json, serde_json::to_vec(&refs).unwrap()).unwrap();
        idx.update(|m| m.remove("reg/mod:v1")).unwrap();
        assert_eq!(idx.migrate(&images_json, &refs_json, blob_path, 100).unwrap(), 1);
        let m = &idx.load().unwrap()["reg/mod:v1"];
        assert_eq!(m.kind, ArtifactKind::Wasm);
        assert_eq!(m.manifest_digest, d(5));
        assert_eq!(m.layers[0].digest, wasm_digest);
        assert_eq!(m.layers[0].size, module.len() as u64);
        assert_eq!(m.platform, Platform::new("wasip2", "wasm", None));
        assert_eq!(m.blobs().collect::<Vec<_>>(), vec![d(5).as_str(), wasm_digest.as_str()]);

        // Nothing to migrate: nothing happens. A corrupt old file is dropped, not fatal.
        assert_eq!(idx.migrate(&images_json, &refs_json, blob_path, 100).unwrap(), 0);
        fs::write(&refs_json, b"{not json").unwrap();
        assert_eq!(idx.migrate(&images_json, &refs_json, blob_path, 100).unwrap(), 0);
        assert!(!refs_json.exists());
        assert_eq!(idx.load().unwrap().len(), 2);
    }
}
