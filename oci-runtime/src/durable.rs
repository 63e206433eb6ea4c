//! Durable file writes, once for the whole crate: every state and index file the crate keeps
//! (the artifact index, a container's `state.json` and `exit.json`) is written by
//! [`write_atomic`], and every blob made visible in the content store is renamed into place
//! and its directory synced by [`rename_durably`]. One durability level: write a temporary
//! sibling, fsync it, rename it over the target, fsync the directory. After a crash a reader
//! sees the old file or the new one, never a torn one, and a rename that returned is not
//! undone by a power cut.
//!
//! It never chooses where files live and never serialises writers: a read-modify-write cycle
//! is the caller's to lock.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of a durable write: which step failed on which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {step} {}: {source}", path.display())]
pub struct DurableError {
    /// What was being done ("write", "sync", "rename", "sync directory").
    pub step: &'static str,
    /// The file or directory it was done to.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

impl DurableError {
    fn at(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DurableError + use<> {
        let path = path.to_owned();
        move |source| DurableError { step, path, source }
    }
}

/// Distinguishes concurrent writes of the same file within one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A temporary sibling of `path` that no other writer (in this or another process) picks.
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{}", std::process::id(), TMP_SEQ.fetch_add(1, Ordering::Relaxed)))
}

/// Replaces `path` with `data`: writes a temporary sibling, fsyncs it, renames it over `path`
/// and fsyncs the directory. On failure the temporary file is removed and `path` is
/// untouched.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), DurableError> {
    let tmp = temp_sibling(path);
    let written = (|| {
        let mut f = fs::File::create(&tmp).map_err(DurableError::at("write", &tmp))?;
        f.write_all(data).map_err(DurableError::at("write", &tmp))?;
        f.sync_all().map_err(DurableError::at("sync", &tmp))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    rename_durably(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Renames `from` (already fsynced by its writer) to `to` and fsyncs the directory of `to`,
/// so the new name survives a power cut.
pub fn rename_durably(from: &Path, to: &Path) -> Result<(), DurableError> {
    fs::rename(from, to).map_err(DurableError::at("rename", to))?;
    sync_parent(to)
}

/// Fsyncs the directory holding `path`.
pub fn sync_parent(path: &Path) -> Result<(), DurableError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(DurableError::at("sync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), vec!["state.json"]);
    }

    #[test]
    fn a_failed_write_names_the_path_and_keeps_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        write_atomic(&path, b"old").unwrap();
        // A directory where the file should go: the rename fails, the temporary goes.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        let err = write_atomic(&blocked, b"new").unwrap_err();
        assert_eq!(err.step, "rename");
        assert!(err.to_string().contains("blocked"), "{err}");
        assert_eq!(names(dir.path()), vec!["blocked", "index.json"]);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        // A missing directory: the first step fails.
        let err = write_atomic(&dir.path().join("missing/file"), b"x").unwrap_err();
        assert_eq!(err.step, "write");
    }
}
