//! Per-replica log files: stdout and stderr of every run appended to `<dir>/<replica>.log`,
//! bounded by rotation to one previous file (`.log.1`), so a chatty workload cannot fill a
//! gateway's flash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where logs live and how large each file may grow before it is rotated.
#[derive(Debug, Clone)]
pub struct LogStore {
    dir: PathBuf,
    max_bytes: u64,
}

impl LogStore {
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> io::Result<LogStore> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(LogStore { dir, max_bytes })
    }

    /// The current log file of `replica`. Replica names are DNS labels plus `-<index>`
    /// (checked by the caller), so they are safe file names.
    pub fn path(&self, replica: &str) -> PathBuf {
        self.dir.join(format!("{replica}.log"))
    }

    /// A sink appending to `replica`'s log.
    pub fn sink(&self, replica: &str) -> io::Result<Arc<LogSink>> {
        let path = self.path(replica);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(Arc::new(LogSink { path, max_bytes: self.max_bytes, inner: Mutex::new(Inner { file, len }) }))
    }

    /// Deletes a replica's logs (the replica left this node).
    pub fn remove(&self, replica: &str) {
        let path = self.path(replica);
        let _ = fs::remove_file(path.with_extension("log.1"));
        let _ = fs::remove_file(path);
    }
}

struct Inner {
    file: File,
    len: u64,
}

/// An append-only, size-bounded log file. Writers on several threads share it.
pub struct LogSink {
    path: PathBuf,
    max_bytes: u64,
    // std Mutex: writes are short and never await.
    inner: Mutex<Inner>,
}

impl LogSink {
    pub fn write_bytes(&self, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.len + bytes.len() as u64 > self.max_bytes && inner.len > 0 {
            match rotate(&self.path) {
                Ok(f) => {
                    inner.file = f;
                    inner.len = 0;
                }
                Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate log"),
            }
        }
        // A full disk must not take the agent down; the bytes are lost and that is logged.
        if let Err(e) = inner.file.write_all(bytes) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write log");
        } else {
            inner.len += bytes.len() as u64;
        }
    }

    /// A line from the agent itself ("starting", "exited with code 1"), marked as such.
    pub fn note(&self, line: &str) {
        self.write_bytes(format!("[flotilla] {line}\n").as_bytes());
    }
}

fn rotate(path: &Path) -> io::Result<File> {
    fs::rename(path, path.with_extension("log.1"))?;
    OpenOptions::new().create(true).append(true).open(path)
}

impl wasm_runtime::OutputSink for LogSink {
    fn write(&self, bytes: &[u8]) {
        self.write_bytes(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_rotates_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 100).unwrap();
        let sink = store.sink("w-0").unwrap();
        sink.write_bytes(&[b'a'; 60]);
        sink.write_bytes(&[b'b'; 60]);
        assert_eq!(fs::read(store.path("w-0")).unwrap(), vec![b'b'; 60]);
        assert_eq!(fs::read(store.path("w-0").with_extension("log.1")).unwrap(), vec![b'a'; 60]);
        // A reopened sink continues the count.
        let again = store.sink("w-0").unwrap();
        again.write_bytes(&[b'c'; 30]);
        assert_eq!(fs::metadata(store.path("w-0")).unwrap().len(), 90);
        store.remove("w-0");
        assert!(!store.path("w-0").exists());
    }
}
