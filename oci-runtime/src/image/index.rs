//! The image index: `<image root>/images.json`, mapping each image reference pulled or
//! imported to its manifest, config and layers, so an agent restart finds its images without
//! a registry. Writes are atomic (temporary file, fsync, rename); the caller serialises
//! read-modify-write cycles. It never holds blob content, only digests.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::platform::Platform;

/// Errors reading or writing the image index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Reading or writing the file failed.
    #[error("image index i/o error on {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid image index.
    #[error("image index {} is corrupt: {source}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// One layer of a recorded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the (possibly compressed) layer blob.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (from the config's `rootfs.diff_ids`).
    pub diff_id: String,
}

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the platform image manifest.
    pub manifest_digest: String,
    /// Digest of the index the manifest was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    /// Digest of the config blob.
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Chain ids, bottom first (one per layer).
    pub chain_ids: Vec<String>,
    /// Platform the manifest was chosen for.
    pub platform: Platform,
    /// Last pull, import or unpack, in seconds since the Unix epoch (for LRU collection).
    pub last_used_unix: u64,
}

impl ImageRecord {
    /// Every blob digest this image needs: index, manifest, config, layers.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        self.index_digest
            .iter()
            .map(String::as_str)
            .chain([self.manifest_digest.as_str(), self.config_digest.as_str()])
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexDoc {
    version: u32,
    images: BTreeMap<String, ImageRecord>,
}

const INDEX_VERSION: u32 = 1;
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Handle on an `images.json` file.
#[derive(Debug, Clone)]
pub struct ImageIndex {
    path: PathBuf,
}

impl ImageIndex {
    /// The index kept under `root`.
    pub fn in_root(root: &Path) -> Self {
        Self { path: root.join("images.json") }
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
        Ok(doc.images)
    }

    /// Replaces the whole index atomically.
    pub fn store(&self, images: BTreeMap<String, ImageRecord>) -> Result<(), IndexError> {
        let doc = IndexDoc { version: INDEX_VERSION, images };
        let bytes = serde_json::to_vec_pretty(&doc)
            .map_err(|source| IndexError::Corrupt { path: self.path.clone(), source })?;
        let tmp = self.path.with_file_name(format!(
            ".images.json.tmp-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| IndexError::Io { path, source }
        };
        let result = (|| {
            let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            drop(f);
            fs::rename(&tmp, &self.path).map_err(io_err(&self.path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Loads, applies `change`, stores. A corrupt index is replaced (after a warning) rather
    /// than left to block every later pull.
    pub fn update<T>(&self, change: impl FnOnce(&mut BTreeMap<String, ImageRecord>) -> T) -> Result<T, IndexError> {
        let mut images = match self.load() {
            Ok(images) => images,
            Err(e @ IndexError::Corrupt { .. }) => {
                tracing::warn!(error = %e, "replacing corrupt image index");
                BTreeMap::new()
            }
            Err(e) => return Err(e),
        };
        let out = change(&mut images);
        self.store(images)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> ImageRecord {
        let d = |k: u8| format!("sha256:{}", hex::encode([k; 32]));
        ImageRecord {
            manifest_digest: d(n),
            index_digest: None,
            config_digest: d(n + 1),
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
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("images.json")]);

        fs::write(idx.path(), b"{").unwrap();
        assert!(matches!(idx.load(), Err(IndexError::Corrupt { .. })));
        idx.update(|m| m.insert("c".into(), record(20))).unwrap();
        assert_eq!(idx.load().unwrap().len(), 1);
    }
}
