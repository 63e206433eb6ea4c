//! Per-replica log files: stdout and stderr of every run appended to `<dir>/<replica>.log`,
//! bounded by rotation to one previous file (`.log.1`), so a chatty workload cannot fill a
//! gateway's flash.
//!
//! Job attempts (assignments with an attempt number) get a log each, with the same bound:
//! `<dir>/attempts/<workload>/<replica>.<attempt>.log`. They outlive their attempt, so that
//! `flotilla logs` can read a finished or failed Job, and go when the hub's set no longer
//! names their workload ([`LogStore::sweep`]); each replica keeps its last
//! [`KEPT_ATTEMPTS`] attempts.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use proto::messages::{LAST_OUTPUT_LINE_BYTES, LAST_OUTPUT_LINES};

/// Attempts of one Job replica whose logs a node keeps; older ones are deleted when a new
/// attempt starts. Above the default back-off limit (6 failures, 7 attempts), so a Job with
/// defaults keeps every attempt.
pub const KEPT_ATTEMPTS: u32 = 8;

/// The prefix of the lines the agent itself writes into a log.
const NOTE_PREFIX: &str = "[flotilla] ";

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

    /// The log of attempt `attempt` of Job replica `replica` of `workload` (both names
    /// checked by the caller).
    pub fn attempt_path(&self, workload: &str, replica: &str, attempt: u32) -> PathBuf {
        self.attempts_dir().join(workload).join(format!("{replica}.{attempt}.log"))
    }

    fn attempts_dir(&self) -> PathBuf {
        self.dir.join("attempts")
    }

    /// A sink appending to `replica`'s log.
    pub fn sink(&self, replica: &str) -> io::Result<Arc<LogSink>> {
        self.open_sink(self.path(replica))
    }

    /// A sink appending to the log of attempt `attempt` of Job replica `replica`. A new
    /// attempt deletes the logs of the replica's attempts older than the last
    /// [`KEPT_ATTEMPTS`].
    pub fn attempt_sink(&self, workload: &str, replica: &str, attempt: u32) -> io::Result<Arc<LogSink>> {
        let path = self.attempt_path(workload, replica, attempt);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
            for old in attempts_to_drop(&attempts_in(dir, replica), attempt) {
                let old = self.attempt_path(workload, replica, old);
                let _ = fs::remove_file(old.with_extension("log.1"));
                let _ = fs::remove_file(old);
            }
        }
        self.open_sink(path)
    }

    fn open_sink(&self, path: PathBuf) -> io::Result<Arc<LogSink>> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(Arc::new(LogSink { path, max_bytes: self.max_bytes, inner: Mutex::new(Inner { file, len }) }))
    }

    /// Deletes logs nothing names any more: the logs of replicas not in `replicas` (removed
    /// while not running, so no exit deleted them), and the Job attempt logs of workloads not
    /// in `workloads` (deleted). Errors are ignored: a file left now goes at the next sweep.
    pub fn sweep(&self, replicas: &BTreeSet<String>, workloads: &BTreeSet<String>) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let replica = name.strip_suffix(".log.1").or_else(|| name.strip_suffix(".log"));
                if let Some(r) = replica
                    && !replicas.contains(r)
                    && e.file_type().is_ok_and(|t| t.is_file())
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.attempts_dir()) {
            for e in entries.flatten() {
                if !workloads.contains(e.file_name().to_string_lossy().as_ref()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
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

impl LogSink {
    /// The file this sink appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a sweep after `set` keeps: the logs of the set's replicas and of `also` (replicas the
/// agent still tracks), and the attempt logs of the set's workloads and its kept Jobs.
pub fn kept(
    set: &proto::messages::AssignmentSet,
    also: impl IntoIterator<Item = String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let replicas = set.assignments.iter().map(|a| a.name.clone()).chain(also).collect();
    let workloads = set.assignments.iter().map(|a| a.workload.clone()).chain(set.kept_logs.iter().cloned()).collect();
    (replicas, workloads)
}

/// The attempt numbers of `replica` whose logs are in `dir`.
fn attempts_in(dir: &Path, replica: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(replica)?.strip_prefix('.')?.strip_suffix(".log")?.parse().ok()
        })
        .collect()
}

/// Of the attempts `present`, those to delete when attempt `new` starts: all but the last
/// [`KEPT_ATTEMPTS`] counting `new`.
fn attempts_to_drop(present: &[u32], new: u32) -> Vec<u32> {
    let oldest_kept = new.saturating_sub(KEPT_ATTEMPTS - 1);
    let mut out: Vec<u32> = present.iter().copied().filter(|&a| a < oldest_kept).collect();
    out.sort_unstable();
    out
}

/// The last lines of the log at `path` that the workload wrote (the agent's own notes left
/// out), at most [`LAST_OUTPUT_LINES`], each cut to [`LAST_OUTPUT_LINE_BYTES`]. Reads only the
/// end of the file; a missing file has none.
pub fn last_output(path: &Path) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    const WINDOW: u64 = 16 * 1024;
    let read = |path: &Path| -> io::Result<Vec<u8>> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut buf = Vec::new();
        f.take(WINDOW).read_to_end(&mut buf)?;
        Ok(buf)
    };
    let bytes = read(path).unwrap_or_default();
    let lines = last_lines(&bytes);
    if !lines.is_empty() {
        return lines;
    }
    // Just rotated: the run's output is in the previous file.
    last_lines(&read(&path.with_extension("log.1")).unwrap_or_default())
}

/// The workload's last lines in `bytes` (the end of a log), as [`last_output`] keeps them. The
/// first line may be cut by the window, so it counts only when the window is not full.
fn last_lines(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(NOTE_PREFIX) && !l.trim().is_empty())
        .map(|l| {
            let mut end = l.len().min(LAST_OUTPUT_LINE_BYTES);
            while !l.is_char_boundary(end) {
                end -= 1;
            }
            l[..end].to_string()
        })
        .collect();
    let keep_from = lines.len().saturating_sub(LAST_OUTPUT_LINES);
    lines.drain(..keep_from);
    lines
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

    #[test]
    fn job_attempts_log_apart_with_the_same_bound_and_keep_the_last_few() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 100).unwrap();
        let first = store.attempt_sink("j", "j-0", 1).unwrap();
        first.write_bytes(b"attempt one\n");
        let second = store.attempt_sink("j", "j-0", 2).unwrap();
        second.write_bytes(&[b'x'; 60]);
        second.write_bytes(&[b'y'; 60]);
        assert_eq!(fs::read(store.attempt_path("j", "j-0", 1)).unwrap(), b"attempt one\n");
        // Rotated at the same bound as a replica's log.
        assert_eq!(fs::read(store.attempt_path("j", "j-0", 2)).unwrap(), vec![b'y'; 60]);
        assert!(store.attempt_path("j", "j-0", 2).with_extension("log.1").exists());
        assert!(!store.path("j-0").exists(), "an attempt does not write the replica's own log");
        // Attempt 1 + KEPT_ATTEMPTS drops attempt 1 (and only it).
        store.attempt_sink("j", "j-0", 1 + KEPT_ATTEMPTS).unwrap();
        assert!(!store.attempt_path("j", "j-0", 1).exists());
        assert!(store.attempt_path("j", "j-0", 2).exists());
    }

    #[test]
    fn only_the_oldest_attempts_beyond_the_kept_count_are_dropped() {
        assert_eq!(attempts_to_drop(&[1, 2, 3], 4), Vec::<u32>::new());
        assert_eq!(attempts_to_drop(&[3, 1, 2, 9, 10], 10), vec![1, 2]);
        assert_eq!(attempts_to_drop(&[], 100), Vec::<u32>::new());
    }

    #[test]
    fn a_sweep_deletes_logs_of_replicas_and_jobs_no_longer_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 1000).unwrap();
        for r in ["a-0", "gone-0"] {
            store.sink(r).unwrap().write_bytes(b"x\n");
        }
        fs::write(store.path("gone-0").with_extension("log.1"), b"old").unwrap();
        store.attempt_sink("job", "job-0", 1).unwrap().write_bytes(b"x\n");
        store.attempt_sink("deleted", "deleted-0", 3).unwrap().write_bytes(b"x\n");
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        store.sweep(&names(&["a-0"]), &names(&["job"]));
        assert!(store.path("a-0").exists());
        assert!(!store.path("gone-0").exists() && !store.path("gone-0").with_extension("log.1").exists());
        assert!(store.attempt_path("job", "job-0", 1).exists());
        assert!(!dir.path().join("attempts/deleted").exists());
    }

    #[test]
    fn last_output_keeps_the_workloads_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        let sink = store.attempt_sink("j", "j-0", 1).unwrap();
        sink.note("starting");
        for i in 0..10 {
            sink.write_bytes(format!("line {i}\n").as_bytes());
        }
        sink.write_bytes(format!("{}\n", "é".repeat(200)).as_bytes());
        sink.note("exited with code 3");
        let got = last_output(sink.path());
        assert_eq!(got.len(), LAST_OUTPUT_LINES);
        assert_eq!(got[..4], ["line 6", "line 7", "line 8", "line 9"]);
        assert!(got[4].len() <= LAST_OUTPUT_LINE_BYTES && got[4].starts_with('é'), "{}", got[4]);
        assert!(last_output(&dir.path().join("missing.log")).is_empty());
    }
}
