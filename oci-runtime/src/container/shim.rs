//! The per-container supervisor ("shim", as containerd calls it) and the agent's handle on
//! it. The shim is a small process of its own session that creates and starts one container,
//! copies its stdout/stderr into a size-rotated log file, forwards the termination signals it
//! receives, reaps the container as a child subreaper and writes `<root>/<id>/exit.json`
//! atomically before exiting. Because it is not the agent's child, an agent restart does not
//! touch the container: [`ShimHandle::adopt`] finds it again from its state, checking pids
//! against their start times so a reused pid is never mistaken for it. The shim owns the
//! log file's rotation and exit.json; it never deletes the container (the agent does, with
//! [`ShimHandle::delete`]).

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::cgroup::CgroupVersion;
use super::runtime::{
    ContainerError, CreateOptions, ExitInfo, Runtime, RuntimeConfig, rfc3339, same_process, write_atomic,
};
use super::sys::{self, Forked};

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("container: {0}")]
    Container(#[from] ContainerError),
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("shim for container {id} failed: {message}")]
    Failed { id: String, message: String },
    #[error("container {0} has no shim")]
    NoShim(String),
    #[error("shim of container {0} is gone and left no exit status")]
    Lost(String),
    #[error("exit status of container {id} is unreadable: {message}")]
    BadExit { id: String, message: String },
    #[error("container {0} did not exit within {1:?}")]
    Timeout(String, Duration),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ShimError + use<> {
    let path = path.to_path_buf();
    move |source| ShimError::Io { action, path, source }
}

/// What a shim runs.
#[derive(Debug, Clone)]
pub struct ShimOptions {
    pub id: String,
    pub bundle: PathBuf,
    /// Output of the container, appended; the agent appends its own notes to the same file.
    pub log: PathBuf,
    /// Once the log passes this size it is renamed to `<log>.1` and a new one is started.
    pub log_max_bytes: u64,
    /// Write the output as timestamped records ([`crate::logline`]), as the agent reads it;
    /// off, the bytes go in as they are (`flotilla oci`, whose users read the file).
    pub log_timestamps: bool,
}

/// An append-only log file rotated by size.
struct RotatingLog {
    path: PathBuf,
    file: fs::File,
    max: u64,
    timestamps: bool,
}

fn open_append(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// `x.log` → `x.log.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl RotatingLog {
    fn open(path: &Path, max: u64, timestamps: bool) -> io::Result<Self> {
        Ok(RotatingLog { path: path.to_path_buf(), file: open_append(path)?, max, timestamps })
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.timestamps {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let mut framed = Vec::with_capacity(buf.len() + crate::logline::HEADER_LEN);
            crate::logline::frame(now.as_nanos() as u64, buf, &mut framed);
            self.file.write_all(&framed)?;
        } else {
            self.file.write_all(buf)?;
        }
        // Measured on the file, not counted: the agent appends to it too.
        if self.max > 0 && self.file.metadata()?.len() > self.max {
            fs::rename(&self.path, rotated_path(&self.path))?;
            self.file = open_append(&self.path)?;
        }
        Ok(())
    }
}

fn copy_into_log(source: OwnedFd, log: Arc<Mutex<RotatingLog>>, done: mpsc::Sender<()>) {
    let mut source = fs::File::from(source);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Ok(mut log) = log.lock() {
                    let _ = log.write(&buf[..n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = done.send(());
}

const FORWARDED: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT];

/// Body of `flotilla oci shim`. The calling process detaches (new session), forks the shim
/// and returns once the container runs (Ok) or failed to start (Err); the shim itself never
/// returns from here.
pub fn run_shim(runtime: &Runtime, opts: &ShimOptions) -> Result<(), ShimError> {
    // Fails only when already a session leader, which is as detached as it gets.
    let _ = nix::unistd::setsid();
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ShimError::Failed { id: opts.id.clone(), message: format!("creating pipe: {e}") })?;
    match sys::clone_process(0).map_err(io_err("fork", Path::new("shim")))? {
        Forked::Parent(_) => {
            drop(report_w);
            // Read the two-byte "OK" (or an error up to EOF); the container may still hold a
            // copy of the write end until it execs, so success does not wait for EOF.
            let mut report = fs::File::from(report_r);
            let mut head = [0u8; 2];
            let mut n = 0;
            while n < head.len() {
                match report.read(&mut head[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if &head[..n] == b"OK" {
                return Ok(());
            }
            let mut text = String::from_utf8_lossy(&head[..n]).into_owned();
            let _ = report.read_to_string(&mut text);
            match text.strip_prefix("OK") {
                Some(_) => Ok(()),
                None => Err(ShimError::Failed {
                    id: opts.id.clone(),
                    message: text.strip_prefix('E').unwrap_or("shim exited before starting the container").into(),
                }),
            }
        }
        Forked::Child => {
            drop(report_r);
            let mut report = Some(fs::File::from(report_w));
            let code = match supervise(runtime, opts, &mut report) {
                Ok(()) => 0,
                Err(e) => {
                    // Before the report this reaches the caller; after it, the log (stderr).
                    if let Some(mut r) = report.take() {
                        let _ = r.write_all(format!("E{e}").as_bytes());
                    }
                    let _ = writeln!(io::stderr(), "flotilla-oci shim {}: {e}", opts.id);
                    1
                }
            };
            sys::exit_now(code)
        }
    }
}

/// `report` is written and closed once the container runs, so the caller stops waiting.
fn supervise(runtime: &Runtime, opts: &ShimOptions, report: &mut Option<fs::File>) -> Result<(), ShimError> {
    sys::set_child_subreaper().map_err(io_err("become subreaper", Path::new("shim")))?;
    let log =
        RotatingLog::open(&opts.log, opts.log_max_bytes, opts.log_timestamps).map_err(io_err("open", &opts.log))?;
    let null: OwnedFd = fs::File::open("/dev/null").map_err(io_err("open", Path::new("/dev/null")))?.into();
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ShimError::Failed { id: opts.id.clone(), message: format!("creating pipe: {e}") })
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let me = nix::unistd::getpid().as_raw();
    let created = runtime.create(
        &opts.id,
        &opts.bundle,
        CreateOptions { stdio: [Some(null), Some(out_w), Some(err_w)], shim_pid: Some(me), ..Default::default() },
    )?;
    if let Err(e) = runtime.start(&opts.id) {
        let _ = runtime.delete(&opts.id, true);
        return Err(e.into());
    }
    // From here on the shim's own messages go to the container's log.
    if let Ok(f) = open_append(&opts.log) {
        let fd = OwnedFd::from(f);
        let _ = nix::unistd::dup2_stdout(&fd);
        let _ = nix::unistd::dup2_stderr(&fd);
    }
    if let Ok(f) = fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&f);
    }
    if let Some(mut r) = report.take() {
        let _ = r.write_all(b"OK");
    }

    // Block the forwarded signals in every thread (threads inherit the mask) and take them
    // synchronously in one thread.
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    let _ = mask.thread_block();
    let container = created.pid;
    std::thread::spawn(move || {
        loop {
            if let Ok(sig) = mask.wait() {
                let _ = nix::sys::signal::kill(Pid::from_raw(container), sig);
            }
        }
    });
    let log = Arc::new(Mutex::new(log));
    let (done_tx, done_rx) = mpsc::channel();
    for source in [out_r, err_r] {
        let (log, done) = (log.clone(), done_tx.clone());
        std::thread::spawn(move || copy_into_log(source, log, done));
    }
    drop(done_tx);

    let (code, signal) = loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == container => break (code, None),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid.as_raw() == container => {
                break (128 + sig as i32, Some(sig as i32));
            }
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => {
                return Err(ShimError::Failed { id: opts.id.clone(), message: format!("waiting for container: {e}") });
            }
        }
    };
    // Reap whatever else was reparented to us.
    while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
    // The pipes close when the last container process is gone; do not hang on a straggler.
    let deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    // The state may already belong to a newer container of the same id (the agent removed
    // this one and started another while this shim was finishing): then this exit is no one's
    // business, and writing it would make the new container look dead.
    if runtime.record(&opts.id).map_or(true, |r| r.pid != container) {
        return Ok(());
    }
    let oom_killed = runtime.oom_killed(&opts.id).unwrap_or(false);
    let exit = ExitInfo { code, signal, oom_killed, finished_at: rfc3339(SystemTime::now()), pid: Some(container) };
    let json =
        serde_json::to_vec(&exit).map_err(|e| ShimError::BadExit { id: opts.id.clone(), message: e.to_string() })?;
    write_atomic(&runtime.state_dir(&opts.id).join("exit.json"), &json)?;
    Ok(())
}

/// The agent's handle on a shim-supervised container.
#[derive(Debug, Clone)]
pub struct ShimHandle {
    runtime: Runtime,
    id: String,
    shim_pid: i32,
    shim_start: u64,
    pid: i32,
    pid_start: u64,
}

const POLL: Duration = Duration::from_millis(10);
const KILL_WAIT: Duration = Duration::from_secs(10);

impl ShimHandle {
    /// Starts `exe oci ... shim` for the container and returns once it runs. Blocking; the
    /// shim ends up in its own session, not a child of the caller.
    pub fn spawn(exe: &Path, config: &RuntimeConfig, opts: &ShimOptions) -> Result<ShimHandle, ShimError> {
        let version = match config.cgroup.version {
            CgroupVersion::Auto => "auto",
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        };
        let output = Command::new(exe)
            .arg("oci")
            .arg("--root")
            .arg(&config.state_root)
            .arg("--cgroup-root")
            .arg(&config.cgroup.root)
            .arg("--cgroup-version")
            .arg(version)
            .arg("shim")
            .arg("--id")
            .arg(&opts.id)
            .arg("--bundle")
            .arg(&opts.bundle)
            .arg("--log")
            .arg(&opts.log)
            .arg("--log-max-bytes")
            .arg(opts.log_max_bytes.to_string())
            .args(opts.log_timestamps.then_some("--log-timestamps"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(io_err("run", exe))?;
        if !output.status.success() {
            let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
            return Err(ShimError::Failed { id: opts.id.clone(), message });
        }
        Self::adopt(config, &opts.id)
    }

    /// Finds the shim and container of `id` from their state (after an agent restart).
    pub fn adopt(config: &RuntimeConfig, id: &str) -> Result<ShimHandle, ShimError> {
        let runtime = Runtime::new(config.clone());
        let record = runtime.record(id)?;
        let (Some(shim_pid), Some(shim_start)) = (record.shim_pid, record.shim_start) else {
            return Err(ShimError::NoShim(id.into()));
        };
        let handle =
            ShimHandle { runtime, id: id.into(), shim_pid, shim_start, pid: record.pid, pid_start: record.pid_start };
        if !handle.shim_alive() && handle.try_exit()?.is_none() {
            return Err(ShimError::Lost(id.into()));
        }
        Ok(handle)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's init pid (host pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn shim_pid(&self) -> i32 {
        self.shim_pid
    }

    pub fn shim_alive(&self) -> bool {
        same_process(self.shim_pid, self.shim_start)
    }

    fn container_alive(&self) -> bool {
        same_process(self.pid, self.pid_start)
    }

    /// The exit status, once the shim has written it.
    pub fn try_exit(&self) -> Result<Option<ExitInfo>, ShimError> {
        let path = self.runtime.state_dir(&self.id).join("exit.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<ExitInfo>(&bytes)
                .map(|exit| exit.pid.is_none_or(|pid| pid == self.pid).then_some(exit))
                .map_err(|e| ShimError::BadExit { id: self.id.clone(), message: e.to_string() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShimError::Io { action: "read", path, source: e }),
        }
    }

    /// Waits (blocking, polling) for the exit status; `None` timeout waits forever. From
    /// tokio, call it in `spawn_blocking`.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Result<ExitInfo, ShimError> {
        let start = Instant::now();
        loop {
            if let Some(exit) = self.try_exit()? {
                return Ok(exit);
            }
            if !self.shim_alive() {
                // The shim may have written exit.json between the two checks.
                return self.try_exit()?.ok_or_else(|| ShimError::Lost(self.id.clone()));
            }
            if let Some(t) = timeout
                && start.elapsed() >= t
            {
                return Err(ShimError::Timeout(self.id.clone(), t));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends a signal to the container's init (if it is still the same process).
    pub fn signal(&self, signal: Signal) -> Result<(), ShimError> {
        if self.container_alive() {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), signal);
        }
        Ok(())
    }

    /// SIGTERM through the shim, then SIGKILL after `grace`; returns how the container ended.
    pub fn stop(&self, grace: Duration) -> Result<ExitInfo, ShimError> {
        if let Some(exit) = self.try_exit()? {
            return Ok(exit);
        }
        if self.shim_alive() {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.shim_pid), Signal::SIGTERM);
        } else {
            self.signal(Signal::SIGTERM)?;
        }
        match self.wait_exit(Some(grace)) {
            Err(ShimError::Timeout(..)) => {}
            other => return other,
        }
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Some(KILL_WAIT))
    }

    /// Kills the container if it still runs, waits for the shim to finish, and removes the
    /// cgroups, owned mounts and state, leaving nothing behind.
    pub fn delete(self) -> Result<(), ShimError> {
        if self.try_exit()?.is_none() {
            self.signal(Signal::SIGKILL)?;
            match self.wait_exit(Some(KILL_WAIT)) {
                Ok(_) | Err(ShimError::Lost(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let deadline = Instant::now() + KILL_WAIT;
        while self.shim_alive() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        self.runtime.delete(&self.id, true)?;
        Ok(())
    }
}

/// Opens `/dev/null` as an owned descriptor (for callers building stdio).
pub fn dev_null() -> io::Result<OwnedFd> {
    let f = fs::File::open("/dev/null")?;
    Ok(OwnedFd::from(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_rotates_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut log = RotatingLog::open(&path, 10, false).unwrap();
        log.write(b"0123456789").unwrap();
        assert!(!rotated_path(&path).exists());
        log.write(b"abc").unwrap();
        assert_eq!(fs::read(rotated_path(&path)).unwrap(), b"0123456789abc");
        log.write(b"next").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"next");
        assert_eq!(rotated_path(Path::new("/x/y.log")), Path::new("/x/y.log.1"));
    }

    #[test]
    fn the_agents_log_gets_timestamped_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut log = RotatingLog::open(&path, 1 << 20, true).unwrap();
        log.write(b"out\npart").unwrap();
        log.write(b"ial\n").unwrap();
        let stored = fs::read(&path).unwrap();
        assert_eq!(stored.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count(), 3, "one record a chunk line");
        for record in stored.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(crate::logline::parse_record(record).at_ns.is_some(), "{}", String::from_utf8_lossy(record));
        }
        assert_eq!(crate::logline::decode(&stored, false, None), b"out\npartial\n");
    }
}
