//! The reference cache: `<store root>/refs.json`, mapping each image reference pulled before
//! to the manifest and Wasm layer digests it resolved to. It is what lets a pull succeed from
//! the local store while the registry is unreachable.
//!
//! Writes are atomic (temporary file, fsync, rename) and serialised within the process.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Errors reading or writing the reference cache.
#[derive(Debug, thiserror::Error)]
pub enum RefsError {
    /// Reading or writing the file failed.
    #[error("reference cache i/o error on {}: {source}", path.display())]
    Io {
        /// The file the operation was on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid reference cache.
    #[error("reference cache {} is corrupt: {source}", path.display())]
    Corrupt {
        /// The cache file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// What a reference resolved to when it was last pulled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefEntry {
    /// Digest of the image manifest the module was taken from.
    pub manifest_digest: String,
    /// Digest of the Wasm module blob (a key of the blob store).
    pub wasm_digest: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RefsDoc {
    version: u32,
    refs: BTreeMap<String, RefEntry>,
}

const REFS_VERSION: u32 = 1;

/// Serialises read-modify-write cycles on any refs file within this process.
static WRITE_LOCK: Mutex<()> = Mutex::new(());
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Handle on a `refs.json` file.
#[derive(Debug, Clone)]
pub struct RefsFile {
    path: PathBuf,
}

impl RefsFile {
    /// The refs file of the blob store rooted at `store_root`.
    pub fn in_store(store_root: &Path) -> Self {
        Self { path: store_root.join("refs.json") }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All entries; a missing file is an empty cache.
    pub fn load(&self) -> Result<BTreeMap<String, RefEntry>, RefsError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(RefsError::Io { path: self.path.clone(), source });
            }
        };
        let doc: RefsDoc =
            serde_json::from_slice(&bytes).map_err(|source| RefsError::Corrupt { path: self.path.clone(), source })?;
        Ok(doc.refs)
    }

    /// The entry for `reference`, if it was recorded.
    pub fn get(&self, reference: &str) -> Result<Option<RefEntry>, RefsError> {
        Ok(self.load()?.remove(reference))
    }

    /// Records (or replaces) the entry for `reference`. A corrupt file is replaced rather
    /// than left to block every later record.
    pub fn record(&self, reference: &str, entry: RefEntry) -> Result<(), RefsError> {
        let _guard = WRITE_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut refs = match self.load() {
            Ok(refs) => refs,
            Err(e @ RefsError::Corrupt { .. }) => {
                tracing::warn!(error = %e, "replacing corrupt reference cache");
                BTreeMap::new()
            }
            Err(e) => return Err(e),
        };
        if refs.get(reference) == Some(&entry) {
            return Ok(());
        }
        refs.insert(reference.to_owned(), entry);
        self.write_atomic(&RefsDoc { version: REFS_VERSION, refs })
    }

    fn write_atomic(&self, doc: &RefsDoc) -> Result<(), RefsError> {
        let bytes =
            serde_json::to_vec_pretty(doc).map_err(|source| RefsError::Corrupt { path: self.path.clone(), source })?;
        let file_name =
            self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "refs.json".to_owned());
        let tmp = self.path.with_file_name(format!(
            ".{file_name}.tmp-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| RefsError::Io { path, source }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> RefEntry {
        RefEntry {
            manifest_digest: format!("sha256:{}", hex::encode([n; 32])),
            wasm_digest: format!("sha256:{}", hex::encode([n + 1; 32])),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let refs = RefsFile::in_store(dir.path());
        assert!(refs.load().unwrap().is_empty());
        assert_eq!(refs.get("127.0.0.1:5000/a:v1").unwrap(), None);

        refs.record("127.0.0.1:5000/a:v1", entry(1)).unwrap();
        refs.record("127.0.0.1:5000/b:v1", entry(3)).unwrap();
        refs.record("127.0.0.1:5000/a:v1", entry(5)).unwrap();

        // A fresh handle reads what was written.
        let again = RefsFile::in_store(dir.path());
        let all = again.load().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["127.0.0.1:5000/a:v1"], entry(5));
        assert_eq!(again.get("127.0.0.1:5000/b:v1").unwrap(), Some(entry(3)));

        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("refs.json")]);
    }

    #[test]
    fn corrupt_file_is_reported_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let refs = RefsFile::in_store(dir.path());
        fs::write(refs.path(), b"{not json").unwrap();
        let err = refs.get("x").unwrap_err();
        assert!(matches!(err, RefsError::Corrupt { .. }));
        assert!(err.to_string().contains("refs.json"));

        refs.record("x", entry(7)).unwrap();
        assert_eq!(refs.get("x").unwrap(), Some(entry(7)));
    }
}
