//! Per-replica log files: stdout and stderr of a run appended to `<dir>/<replica>.log`,
//! bounded by rotation to one older file (`.log.1`), so a chatty workload cannot fill a
//! gateway's flash. Every write is stored as timestamped records ([`oci_runtime::logline`],
//! which the container shims write too), so `flotilla logs --timestamps` and `--since` can be
//! answered; read back without options the bytes are exactly the workload's. Files of older
//! agents (raw bytes) read as raw lines.
//!
//! When a replica's new run starts ([`LogSink::begin_run`], not when a restarted agent adopts
//! a container still running), the current log becomes `<replica>.prev.log` (what
//! `flotilla logs --previous` reads) and `.log.1` is deleted: a replica keeps its current run
//! (at most twice the bound) and the last part of its previous run (at most the bound). Each
//! run starts its log with an invisible marker record, so a run that wrote nothing still
//! counts as the previous one, and a start that failed before its run (a module that could
//! not be pulled) does not.
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

use oci_runtime::logline;
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

    /// The log of `replica`'s previous run (see [`LogSink::begin_run`]).
    pub fn prev_path(&self, replica: &str) -> PathBuf {
        self.dir.join(format!("{replica}.prev.log"))
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
        self.open_sink(self.path(replica), Some(self.prev_path(replica)))
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
        // An attempt runs once: it has no previous run of its own (see `--attempt`).
        self.open_sink(path, None)
    }

    /// A sink on `path`, created if missing (so `flotilla logs` finds the replica's log,
    /// empty, while its first run is still being prepared).
    fn open_sink(&self, path: PathBuf, prev: Option<PathBuf>) -> io::Result<Arc<LogSink>> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(Arc::new(LogSink {
            path,
            prev,
            max_bytes: self.max_bytes,
            inner: Mutex::new(Inner { file: Some(file), len }),
        }))
    }

    /// Deletes logs nothing names any more: the logs of replicas not in `replicas` (removed
    /// while not running, so no exit deleted them), and the Job attempt logs of workloads not
    /// in `workloads` (deleted). Errors are ignored: a file left now goes at the next sweep.
    pub fn sweep(&self, replicas: &BTreeSet<String>, workloads: &BTreeSet<String>) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let replica = name
                    .strip_suffix(".log.1")
                    .or_else(|| name.strip_suffix(".prev.log"))
                    .or_else(|| name.strip_suffix(".log"));
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
        let _ = fs::remove_file(self.prev_path(replica));
        let _ = fs::remove_file(path);
    }
}

struct Inner {
    /// `None` after the file was renamed away, until it is opened again.
    file: Option<File>,
    len: u64,
}

/// An append-only, size-bounded log file. Writers on several threads share it.
pub struct LogSink {
    path: PathBuf,
    /// Where the log goes when a new run starts; `None` for a Job attempt.
    prev: Option<PathBuf>,
    max_bytes: u64,
    // std Mutex: writes are short and never await.
    inner: Mutex<Inner>,
}

impl LogSink {
    /// Appends `bytes`, written now, as timestamped records. The bound counts the records'
    /// bytes on disk (a 33-byte header per line), so a workload gets a little less than
    /// `max_bytes` of its own output per file.
    pub fn write_bytes(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut framed = Vec::with_capacity(bytes.len() + logline::HEADER_LEN);
        logline::frame(wall_ns(), bytes, &mut framed);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.len + framed.len() as u64 > self.max_bytes && inner.len > 0 {
            match rotate(&self.path) {
                Ok(f) => {
                    inner.file = Some(f);
                    inner.len = 0;
                }
                Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate log"),
            }
        }
        // A full disk must not take the agent down; the bytes are lost and that is logged.
        let written = match self.file(&mut inner) {
            Ok(file) => file.write_all(&framed),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => inner.len += framed.len() as u64,
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot write log"),
        }
    }

    /// A new run of the replica starts (not an adopted one). If the log holds anything (a
    /// run's marker at least; or only its rotated part does, a shim having just rotated),
    /// that becomes the previous run's log (`<replica>.prev.log`, replacing the one before)
    /// and the older rotated part is deleted. Then the run's marker starts the log, so that
    /// even a run that writes nothing is the previous run for the next. Errors are logged:
    /// the run goes ahead regardless.
    pub fn begin_run(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = &self.prev {
            let older = self.path.with_extension("log.1");
            let written = fs::metadata(&self.path).is_ok_and(|m| m.len() > 0);
            let last = if written { Some(&self.path) } else { Some(&older).filter(|o| o.exists()) };
            if let Some(last) = last {
                if let Err(e) = fs::rename(last, prev) {
                    tracing::warn!(path = %last.display(), error = %e, "cannot keep the previous run's log");
                }
                let _ = fs::remove_file(&older);
                inner.file = None;
                inner.len = 0;
            }
        }
        let mut marker = Vec::with_capacity(logline::HEADER_LEN + 1);
        logline::run_start(wall_ns(), &mut marker);
        let written = match self.file(&mut inner) {
            Ok(file) => file.write_all(&marker),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => inner.len += marker.len() as u64,
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot start the run's log"),
        }
    }

    /// The open file, created (or, after a rename, reopened) when needed.
    fn file<'a>(&self, inner: &'a mut Inner) -> io::Result<&'a mut File> {
        let file = match inner.file.take() {
            Some(f) => f,
            None => {
                let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
                inner.len = f.metadata()?.len();
                f
            }
        };
        Ok(inner.file.insert(file))
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
        Ok(window_text(&buf, len > WINDOW))
    };
    let lines = last_lines(&read(path).unwrap_or_default());
    if !lines.is_empty() {
        return lines;
    }
    // Just rotated: the run's output is in the previous file.
    last_lines(&read(&path.with_extension("log.1")).unwrap_or_default())
}

/// The workload's bytes in the end of a log: a window that does not start at the file's
/// start (`cut`) begins with a cut record, which is left out.
fn window_text(bytes: &[u8], cut: bool) -> Vec<u8> {
    let whole = if cut { bytes.iter().position(|&b| b == b'\n').map_or(&[][..], |i| &bytes[i + 1..]) } else { bytes };
    logline::decode(whole, false, None)
}

/// The workload's last lines in `bytes` (the end of a log, decoded by [`window_text`]), as
/// [`last_output`] keeps them.
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

/// The wall clock, in nanoseconds since the Unix epoch: when a log line was written.
fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
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

    /// What `flotilla logs` prints of the file at `path`.
    fn read_log(path: &Path) -> Vec<u8> {
        logline::decode(&fs::read(path).unwrap(), false, None)
    }

    #[test]
    fn appends_and_rotates_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        // A 100-byte partial line takes 134 bytes as a record (33 of header, 1 of newline).
        let store = LogStore::open(dir.path(), 200).unwrap();
        let sink = store.sink("w-0").unwrap();
        sink.write_bytes(&[b'a'; 100]);
        sink.write_bytes(&[b'b'; 100]);
        assert_eq!(read_log(&store.path("w-0")), vec![b'b'; 100]);
        assert_eq!(read_log(&store.path("w-0").with_extension("log.1")), vec![b'a'; 100]);
        assert_eq!(fs::metadata(store.path("w-0")).unwrap().len(), 134);
        // A reopened sink continues the count: 134 + 64 fits, 35 more does not.
        let again = store.sink("w-0").unwrap();
        again.write_bytes(&[b'c'; 30]);
        assert_eq!(fs::metadata(store.path("w-0")).unwrap().len(), 198);
        again.write_bytes(b"d");
        let mut older = vec![b'b'; 100];
        older.extend([b'c'; 30]);
        assert_eq!(read_log(&store.path("w-0").with_extension("log.1")), older);
        assert_eq!(read_log(&store.path("w-0")), b"d");
        store.remove("w-0");
        assert!(!store.path("w-0").exists());
    }

    #[test]
    fn lines_are_stored_with_the_time_they_were_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        let sink = store.sink("w-0").unwrap();
        let before = wall_ns();
        sink.write_bytes(b"one\ntw");
        sink.write_bytes(b"o\n");
        sink.note("exited with code 0");
        let after = wall_ns();
        let stored = fs::read(store.path("w-0")).unwrap();
        assert_eq!(logline::decode(&stored, false, None), b"one\ntwo\n[flotilla] exited with code 0\n");
        let times: Vec<u64> = stored
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| logline::parse_record(l).at_ns.unwrap())
            .collect();
        assert_eq!(times.len(), 4, "one record per line or chunk");
        assert!(times.windows(2).all(|w| w[0] <= w[1]) && times[0] >= before && times[3] <= after, "{times:?}");
    }

    #[test]
    fn a_new_run_keeps_the_previous_runs_log_and_an_adopted_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        // 134 bytes per 100-byte chunk: the second rotates, "run one" and the note fit.
        let store = LogStore::open(dir.path(), 250).unwrap();
        let first = store.sink("w-0").unwrap();
        first.begin_run();
        assert!(store.path("w-0").exists() && !store.prev_path("w-0").exists(), "a first run has no previous");
        first.write_bytes(&[b'a'; 100]);
        first.write_bytes(&[b'a'; 100]);
        first.write_bytes(b"run one\n");
        assert!(store.path("w-0").with_extension("log.1").exists(), "rotated by size");
        // A restarted agent adopting the container opens a sink but starts no run.
        let adopted = store.sink("w-0").unwrap();
        adopted.note("adopted");
        assert!(!store.prev_path("w-0").exists());
        // A restart: run one's log (its last file) is the previous; its older part goes.
        let second = store.sink("w-0").unwrap();
        second.begin_run();
        second.write_bytes(b"run two\n");
        assert_eq!(read_log(&store.prev_path("w-0")), [&[b'a'; 100][..], b"run one\n[flotilla] adopted\n"].concat());
        assert_eq!(read_log(&store.path("w-0")), b"run two\n");
        assert!(!store.path("w-0").with_extension("log.1").exists());
        // A run that wrote nothing is still the previous one for the next run...
        store.sink("w-0").unwrap().begin_run();
        store.sink("w-0").unwrap().begin_run();
        assert_eq!(read_log(&store.prev_path("w-0")), b"");
        assert!(fs::metadata(store.prev_path("w-0")).unwrap().len() > 0, "its marker");
        // ... but a start that failed before its run is not.
        store.sink("w-0").unwrap().write_bytes(b"run four\n");
        let _failed_early = store.sink("w-0").unwrap();
        store.sink("w-0").unwrap().begin_run();
        assert_eq!(read_log(&store.prev_path("w-0")), b"run four\n");
        // A fresh replica: its log exists (empty) from the first start, and no previous run.
        let fresh = store.sink("f-0").unwrap();
        assert!(store.path("f-0").exists());
        fresh.begin_run();
        assert!(!store.prev_path("f-0").exists(), "a first run has no previous");
        // The shim rotated and the run wrote nothing since: the rotated part is the previous.
        fs::rename(store.path("f-0"), store.path("f-0").with_extension("log.1")).unwrap();
        fs::write(store.path("f-0"), b"").unwrap();
        store.sink("f-0").unwrap().begin_run();
        assert!(store.prev_path("f-0").exists() && !store.path("f-0").with_extension("log.1").exists());
        // Job attempts have no previous run of their own.
        let attempt = store.attempt_sink("j", "j-0", 1).unwrap();
        attempt.write_bytes(b"x\n");
        attempt.begin_run();
        assert_eq!(read_log(&store.attempt_path("j", "j-0", 1)), b"x\n");
        store.remove("w-0");
        assert!(!store.path("w-0").exists() && !store.prev_path("w-0").exists());
    }

    #[test]
    fn last_output_reads_records_and_old_raw_files() {
        let dir = tempfile::tempdir().unwrap();
        // An older agent's file: raw bytes.
        let raw = dir.path().join("old.log");
        fs::write(&raw, b"[flotilla] starting\nraw one\nraw two\n").unwrap();
        assert_eq!(last_output(&raw), ["raw one", "raw two"]);
        // A window that cuts the file leaves the cut record out rather than show its header.
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        let sink = store.sink("big-0").unwrap();
        for i in 0..2000 {
            sink.write_bytes(format!("line {i}\n").as_bytes());
        }
        assert_eq!(
            last_output(&store.path("big-0")),
            ["line 1995", "line 1996", "line 1997", "line 1998", "line 1999"]
        );
        let window = window_text(&fs::read(store.path("big-0")).unwrap()[5..], true);
        assert!(window.starts_with(b"line 1\n"), "{}", String::from_utf8_lossy(&window[..20]));
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
        assert_eq!(read_log(&store.attempt_path("j", "j-0", 1)), b"attempt one\n");
        // Rotated at the same bound as a replica's log.
        assert_eq!(read_log(&store.attempt_path("j", "j-0", 2)), vec![b'y'; 60]);
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
        fs::write(store.prev_path("gone-0"), b"older").unwrap();
        fs::write(store.prev_path("a-0"), b"kept").unwrap();
        store.attempt_sink("job", "job-0", 1).unwrap().write_bytes(b"x\n");
        store.attempt_sink("deleted", "deleted-0", 3).unwrap().write_bytes(b"x\n");
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        store.sweep(&names(&["a-0"]), &names(&["job"]));
        assert!(store.path("a-0").exists() && store.prev_path("a-0").exists());
        assert!(!store.path("gone-0").exists() && !store.path("gone-0").with_extension("log.1").exists());
        assert!(!store.prev_path("gone-0").exists());
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
