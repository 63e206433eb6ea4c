//! `exec`: one more process inside a running container, as `runc exec` runs it and as exec
//! health probes need it. The caller's process forks a helper that joins the container's
//! cgroups and the namespaces of its init (user first, then ipc, uts, net, pid, cgroup,
//! mount) and clones, as a sibling of itself, a supervisor inside the container's pid
//! namespace. The supervisor takes on the restrictions of the container's process from the
//! bundle's config.json (rlimits, groups, uid/gid, capabilities, no_new_privs, seccomp),
//! becomes a child subreaper, forks the command and waits for it until the deadline; then it
//! SIGKILLs whatever the command left (every descendant is reparented to it, so none can slip
//! away), reaps everything and reports the status over a pipe. It owns nothing that outlives
//! the call: no process, zombie or file is left behind, and the caller reaps both its
//! children. It must never be called from a multi-threaded process (it forks; this is checked
//! and refused) and never runs the command with more privilege than the container's process.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::cgroup::{AnyCgroupManager, CgroupError, CgroupManager};
use super::privileges;
use super::runtime::{ContainerError, Runtime, RuntimeConfig, Status, same_process};
use super::spec::{self, Plan, SpecError};
use super::sys::{self, Forked};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("container {id} is {status}; exec needs it running")]
    NotRunning { id: String, status: Status },
    #[error("bundle of container {id}: {source}")]
    Spec { id: String, source: SpecError },
    #[error("cgroup of container {id}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("exec needs a command")]
    EmptyCommand,
    #[error("{what} {value:?} contains a NUL byte")]
    Nul { what: &'static str, value: String },
    #[error("env entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error("the process has {0} threads; exec can only fork from a single-threaded process")]
    Multithreaded(usize),
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("executable {program:?} not found in container {id} ({detail})")]
    ProgramNotFound { id: String, program: String, detail: String },
    #[error("executable {program:?} in container {id} cannot be run: {message}")]
    CannotRun { id: String, program: String, message: String },
    #[error("exec in container {id} failed: {message}")]
    Setup { id: String, message: String },
}

impl ExecError {
    /// The exit code a command line reports for this error, as `timeout(1)` and `env(1)` do:
    /// 127 when the program does not exist, 126 when it cannot be run, 125 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::ProgramNotFound { .. } => 127,
            ExecError::CannotRun { .. } => 126,
            _ => 125,
        }
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ExecError + use<> {
    let path = path.to_path_buf();
    move |source| ExecError::Io { action, path, source }
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ExecError {
    let what = what.into();
    move |source| ExecError::Sys { what, source }
}

/// What to run in the container.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The program (searched in the container's PATH unless it contains a slash) and its
    /// arguments.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries added to the container process's environment (replacing a key it
    /// already has).
    pub env: Vec<String>,
    /// Working directory inside the container; the container process's when None.
    pub cwd: Option<String>,
    /// After this the command and everything it started are SIGKILLed. `Duration::MAX` (or
    /// anything past the clock's range) waits for ever.
    pub timeout: Duration,
    /// Bytes kept of stdout and of stderr each; the rest is read and dropped.
    pub output_limit: usize,
    /// The command reads the caller's stdin and writes to the caller's stdout and stderr
    /// itself; nothing is collected (the outcome's output is empty). `flotilla exec` runs
    /// this way, its agent holding the other ends (pipes or a terminal).
    pub interactive: bool,
    /// With `interactive`: the caller's stdin is a terminal, which the command gets as the
    /// controlling terminal of a session of its own (^C, job control, window size changes).
    pub tty: bool,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExecStatus {
    /// The exit code, or 128 + signal when killed by a signal (as shells report it).
    pub fn code(self) -> i32 {
        match self {
            ExecStatus::Exited(c) => c,
            ExecStatus::Signaled(s) => 128 + s,
        }
    }
}

/// The result of a command that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub status: ExecStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The deadline passed and the command was killed (its status is then SIGKILL's).
    pub timed_out: bool,
}

impl ExecOutcome {
    /// 124 when timed out (as `timeout(1)`), otherwise [`ExecStatus::code`] clamped to 255.
    pub fn exit_code(&self) -> u8 {
        if self.timed_out { 124 } else { u8::try_from(self.status.code()).unwrap_or(255) }
    }
}

/// How long the caller waits past the deadline for the supervisor before killing it, and how
/// long the supervisor keeps killing and reaping the command's leftovers.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Longest error text sent over the report pipe (one write stays below PIPE_BUF, so the
/// messages of the helper, the supervisor and the command never interleave).
const MAX_MESSAGE: usize = 1000;
/// Namespaces joined, in order: the user namespace first so that the others, which it owns,
/// may be joined; mount last so that the others are opened... from descriptors already open.
const NAMESPACES: &[(&str, CloneFlags)] = &[
    ("user", CloneFlags::CLONE_NEWUSER),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Everything the forked processes need, prepared before the fork so that errors in the
/// caller's input are reported by the caller.
struct Prepared<'a> {
    plan: &'a Plan,
    program: String,
    args: Vec<CString>,
    env: Vec<CString>,
    search_path: String,
    cwd: PathBuf,
    namespaces: Vec<(CloneFlags, fs::File)>,
    user_ns: bool,
    /// cgroup files the helper writes `0` into to join the container's cgroups.
    attach: Vec<OwnedFd>,
    deadline: Option<Instant>,
    tty: bool,
    /// Read end of a pipe whose only writer is the caller: when the caller dies (even by
    /// SIGKILL) it reads end-of-file and the supervisor kills the command and all it started,
    /// so an abandoned `exec` leaves nothing running in the container.
    lifeline: Option<OwnedFd>,
}

/// Runs `req` inside the running container `id` whose state lives under `root` (the
/// runtime's state root) and returns its status and output. Blocks until the command and
/// everything it started have ended, or the timeout killed them. When the command exits,
/// whatever it left running in the container is killed too: a probe leaves nothing behind.
///
/// The calling process must be single-threaded (a forked copy of a multi-threaded process can
/// deadlock on locks held by threads that do not exist in it); this is checked. Children the
/// caller has are left alone: only the two processes forked here are reaped.
pub fn exec(root: &Path, id: &str, req: &ExecRequest) -> Result<ExecOutcome, ExecError> {
    if req.args.is_empty() {
        return Err(ExecError::EmptyCommand);
    }
    let threads = sys::thread_count().map_err(io_err("count threads of", Path::new("/proc/self/task")))?;
    if threads != 1 {
        return Err(ExecError::Multithreaded(threads));
    }
    let runtime = Runtime::new(RuntimeConfig { state_root: root.to_path_buf(), ..Default::default() });
    let record = runtime.record(id)?;
    let status = runtime.status(&record);
    if status != Status::Running {
        return Err(ExecError::NotRunning { id: id.into(), status });
    }
    let plan = spec::load_bundle(&record.bundle).map_err(|source| ExecError::Spec { id: id.into(), source })?;
    let env = merge_env(&plan.env, &req.env)?;
    let search_path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .to_string();
    let cstring =
        |what: &'static str, s: &str| CString::new(s).map_err(|_| ExecError::Nul { what, value: s.to_string() });
    let args = req.args.iter().map(|a| cstring("argument", a)).collect::<Result<Vec<_>, _>>()?;
    let env = env.iter().map(|e| cstring("env entry", e)).collect::<Result<Vec<_>, _>>()?;
    let cwd = match &req.cwd {
        Some(c) if !c.is_empty() => PathBuf::from(c),
        _ => plan.cwd.clone(),
    };
    cstring("cwd", &cwd.to_string_lossy())?;
    if !cwd.is_absolute() {
        return Err(ExecError::Setup { id: id.into(), message: format!("cwd {} is not absolute", cwd.display()) });
    }
    let cgroups = AnyCgroupManager::new(&record.cgroup_config, &record.cgroup_path, &record.cgroup_controllers())
        .map_err(|source| ExecError::Cgroup { id: id.into(), source })?;
    // v1: the per-controller `tasks` files (no threadgroup lock, as create does); v2: the
    // directory's cgroup.procs. Either way the writer moves itself by writing `0`.
    let mut attach_files = cgroups.self_attach_files();
    if attach_files.is_empty() {
        attach_files = cgroups.paths().into_iter().map(|p| p.join("cgroup.procs")).collect();
    }
    let mut attach = Vec::new();
    for file in attach_files {
        let f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&file)
            .map_err(io_err("open", &file))?;
        attach.push(OwnedFd::from(f));
    }
    let (namespaces, user_ns) = open_namespaces(record.pid)?;
    // The descriptors are the init's namespaces only if the init is still the same process.
    if !same_process(record.pid, record.pid_start) {
        return Err(ExecError::NotRunning { id: id.into(), status: Status::Stopped });
    }
    let prepared = Prepared {
        plan: &plan,
        program: req.args[0].clone(),
        args,
        env,
        search_path,
        cwd,
        namespaces,
        user_ns,
        attach,
        deadline: Instant::now().checked_add(req.timeout),
        tty: req.interactive && req.tty,
        lifeline: None,
    };
    run(id, prepared, req.output_limit, req.interactive)
}

/// The container process's environment with `extra` added; a key in `extra` replaces the
/// same key of `base` in place.
pub(crate) fn merge_env(base: &[String], extra: &[String]) -> Result<Vec<String>, ExecError> {
    let mut env: Vec<String> = base.to_vec();
    for entry in extra {
        let Some((key, _)) = entry.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(ExecError::BadEnv(entry.clone()));
        };
        match env.iter_mut().find(|e| e.split_once('=').is_some_and(|(k, _)| k == key)) {
            Some(existing) => existing.clone_from(entry),
            None => env.push(entry.clone()),
        }
    }
    Ok(env)
}

/// Opens the namespaces of `pid` that differ from this process's, in joining order, and
/// says whether a user namespace is among them.
fn open_namespaces(pid: i32) -> Result<(Vec<(CloneFlags, fs::File)>, bool), ExecError> {
    let mut out = Vec::new();
    let mut user_ns = false;
    for (name, flag) in NAMESPACES {
        let ours = Path::new("/proc/self/ns").join(name);
        let Ok(mine) = fs::metadata(&ours) else {
            // A kernel without this namespace type: nothing to join.
            continue;
        };
        let theirs = PathBuf::from(format!("/proc/{pid}/ns/{name}"));
        let file = fs::File::open(&theirs).map_err(io_err("open", &theirs))?;
        let meta = file.metadata().map_err(io_err("stat", &theirs))?;
        if (meta.dev(), meta.ino()) == (mine.dev(), mine.ino()) {
            continue;
        }
        user_ns |= *flag == CloneFlags::CLONE_NEWUSER;
        out.push((*flag, file));
    }
    Ok((out, user_ns))
}

/// A child of the caller that is killed and reaped if the caller returns early.
struct Reaped {
    pid: Pid,
    /// Also kill its process group (the supervisor leads one).
    group: bool,
    done: bool,
}

impl Reaped {
    fn wait(&mut self) -> Result<WaitStatus, nix::Error> {
        loop {
            match waitpid(self.pid, None) {
                Err(nix::Error::EINTR) => continue,
                other => {
                    self.done = true;
                    return other;
                }
            }
        }
    }

    fn kill(&self) {
        if self.group {
            let _ = kill(Pid::from_raw(-self.pid.as_raw()), Signal::SIGKILL);
        }
        let _ = kill(self.pid, Signal::SIGKILL);
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !self.done {
            self.kill();
            let _ = self.wait();
        }
    }
}

/// One of the caller's pipes (none: not collected) and what has been read from it.
struct Stream {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
    open: bool,
}

impl Stream {
    fn new(fd: Option<OwnedFd>, limit: usize) -> Stream {
        Stream { open: fd.is_some(), fd, buf: Vec::new(), limit, truncated: false }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.buf.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&data[..data.len().min(room)]);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ExecError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("creating a pipe"))
}

/// The caller's side: fork the helper, learn the supervisor's pid from it, collect output
/// and reports until every writer is gone, reap both.
fn run(id: &str, mut p: Prepared<'_>, output_limit: usize, interactive: bool) -> Result<ExecOutcome, ExecError> {
    let (stdio, out_r, err_r) = if interactive {
        let dup =
            |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(io_err("duplicate", Path::new("stdio")));
        ([dup(io::stdin().as_fd())?, dup(io::stdout().as_fd())?, dup(io::stderr().as_fd())?], None, None)
    } else {
        let null = super::shim::dev_null().map_err(io_err("open", Path::new("/dev/null")))?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        ([null, out_w, err_w], Some(out_r), Some(err_r))
    };
    let (rep_r, rep_w) = pipe()?;
    let (pid_r, pid_w) = pipe()?;
    let (life_r, life_w) = pipe()?;
    p.lifeline = Some(life_r);
    let helper = match sys::clone_process(0).map_err(io_err("fork the exec helper for", Path::new(id)))? {
        Forked::Child => {
            drop((out_r, err_r, rep_r, pid_r, life_w));
            helper_main(p, stdio, rep_w, pid_w)
        }
        Forked::Parent(pid) => pid,
    };
    drop((stdio, rep_w, pid_w));
    let (deadline, program) = (p.deadline, p.program.clone());
    // Closes this side's read end of the lifeline; the write end stays open until return.
    drop(p);
    let mut helper = Reaped { pid: Pid::from_raw(helper), group: false, done: false };
    let mut pid_bytes = Vec::with_capacity(4);
    let _ = fs::File::from(pid_r).read_to_end(&mut pid_bytes);
    let _ = helper.wait();
    let supervisor = <[u8; 4]>::try_from(pid_bytes.as_slice()).ok().map(i32::from_ne_bytes);
    let mut supervisor = supervisor.map(|pid| Reaped { pid: Pid::from_raw(pid), group: true, done: false });

    let mut streams =
        [Stream::new(out_r, output_limit), Stream::new(err_r, output_limit), Stream::new(Some(rep_r), 64 * 1024)];
    // The supervisor enforces the deadline itself; this is the backstop should it not.
    let mut stop_at = deadline.and_then(|d| d.checked_add(KILL_GRACE));
    let mut killed = false;
    let mut chunk = vec![0u8; 64 * 1024];
    while streams.iter().any(|s| s.open) {
        let mut ready = [false; 3];
        {
            let mut fds = Vec::with_capacity(3);
            let mut which = Vec::with_capacity(3);
            for (i, fd) in streams.iter().enumerate().filter_map(|(i, s)| Some((i, s.fd.as_ref().filter(|_| s.open)?)))
            {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
            match poll(&mut fds, poll_timeout(stop_at)) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ExecError::Sys { what: "polling the output of exec".into(), source: e }),
                Ok(0) if killed => break,
                Ok(0) => {
                    if let Some(s) = &supervisor {
                        s.kill();
                    }
                    killed = true;
                    stop_at = Some(Instant::now() + KILL_GRACE);
                    continue;
                }
                Ok(_) => {}
            }
            for (f, i) in fds.iter().zip(which) {
                ready[i] = f.any().unwrap_or(true);
            }
        }
        for (s, _) in streams.iter_mut().zip(ready).filter(|(_, r)| *r) {
            let Some(fd) = &s.fd else { continue };
            match nix::unistd::read(fd, &mut chunk) {
                Ok(0) => s.open = false,
                Ok(n) => s.push(&chunk[..n]),
                Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => {}
                Err(_) => s.open = false,
            }
        }
    }
    let waited = supervisor.as_mut().map(|s| {
        if killed {
            s.kill();
        }
        s.wait()
    });
    let [out, err, report] = streams;
    let reports = parse_reports(&report.buf);
    let failure = reports.iter().find_map(|r| match r {
        Report::Setup(message) => Some(ExecError::Setup { id: id.into(), message: message.clone() }),
        Report::NotFound(detail) => {
            Some(ExecError::ProgramNotFound { id: id.into(), program: program.clone(), detail: detail.clone() })
        }
        Report::CannotRun(message) => {
            Some(ExecError::CannotRun { id: id.into(), program: program.clone(), message: message.clone() })
        }
        Report::Done { .. } => None,
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let done = reports.iter().find_map(|r| match r {
        Report::Done { status, timed_out } => Some((*status, *timed_out)),
        _ => None,
    });
    let (status, timed_out) = match (done, killed) {
        (Some((status, timed_out)), _) => (status, timed_out || killed),
        (None, true) => (ExecStatus::Signaled(libc::SIGKILL), true),
        (None, false) => {
            let message = match waited {
                Some(w) => format!("the exec supervisor ended without reporting ({w:?})"),
                None => "the exec helper ended without starting the supervisor".to_string(),
            };
            return Err(ExecError::Setup { id: id.into(), message });
        }
    };
    Ok(ExecOutcome {
        status,
        stdout: out.buf,
        stderr: err.buf,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        timed_out,
    })
}

/// A poll timeout until `deadline` (None: for ever), rounded up to whole milliseconds so a
/// deadline less than a millisecond away does not spin.
fn poll_timeout(deadline: Option<Instant>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// A message on the report pipe, one line each: from the helper or the supervisor when
/// setting up fails, from the command's process when its exec fails, from the supervisor
/// when the command has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Report {
    /// `E<text>`
    Setup(String),
    /// `N<text>`: the program does not exist.
    NotFound(String),
    /// `X<text>`: the program exists but cannot be executed.
    CannotRun(String),
    /// `De<code>` or `Ds<signal>`, with `t` appended when the deadline killed it.
    Done { status: ExecStatus, timed_out: bool },
}

impl Report {
    fn encode(&self) -> Vec<u8> {
        let (tag, text) = match self {
            Report::Setup(t) => (b'E', t.clone()),
            Report::NotFound(t) => (b'N', t.clone()),
            Report::CannotRun(t) => (b'X', t.clone()),
            Report::Done { status, timed_out } => {
                let s = match status {
                    ExecStatus::Exited(c) => format!("e{c}"),
                    ExecStatus::Signaled(s) => format!("s{s}"),
                };
                (b'D', if *timed_out { s + "t" } else { s })
            }
        };
        let mut cut = text.len().min(MAX_MESSAGE);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut line = Vec::with_capacity(cut + 2);
        line.push(tag);
        line.extend(text[..cut].bytes().map(|b| if b == b'\n' { b' ' } else { b }));
        line.push(b'\n');
        line
    }
}

/// Parses the report pipe's content; lines it does not understand are skipped.
fn parse_reports(data: &[u8]) -> Vec<Report> {
    let mut out = Vec::new();
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let text = String::from_utf8_lossy(&line[1..]).into_owned();
        let report = match line[0] {
            b'E' => Report::Setup(text),
            b'N' => Report::NotFound(text),
            b'X' => Report::CannotRun(text),
            b'D' => {
                let (body, timed_out) = match text.strip_suffix('t') {
                    Some(b) => (b, true),
                    None => (text.as_str(), false),
                };
                let status = match (body.get(..1), body.get(1..).and_then(|n| n.parse::<i32>().ok())) {
                    (Some("e"), Some(c)) => ExecStatus::Exited(c),
                    (Some("s"), Some(s)) => ExecStatus::Signaled(s),
                    _ => continue,
                };
                Report::Done { status, timed_out }
            }
            _ => continue,
        };
        out.push(report);
    }
    out
}

fn send(report: &mut fs::File, message: &Report) {
    // One write of less than PIPE_BUF bytes: atomic with respect to the other writers.
    let _ = report.write_all(&message.encode());
}

/// The helper: a fork of the caller, still in the caller's namespaces. It moves itself into
/// the container's cgroups, joins the init's namespaces and clones the supervisor as the
/// caller's child (CLONE_PARENT), sends its pid and exits. Never returns.
fn helper_main(mut p: Prepared<'_>, stdio: [OwnedFd; 3], report: OwnedFd, pid_out: OwnedFd) -> ! {
    let mut report = fs::File::from(report);
    let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| join(&p, stdio)));
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            send(&mut report, &Report::Setup(e.to_string()));
            sys::exit_now(1)
        }
        Err(_) => {
            send(&mut report, &Report::Setup("the exec helper panicked".into()));
            sys::exit_now(1)
        }
    }
    // Host-side descriptors have no business in the container.
    p.attach.clear();
    p.namespaces.clear();
    match sys::clone_process(libc::CLONE_PARENT) {
        Ok(Forked::Child) => {
            drop(pid_out);
            supervisor_main(&p, report)
        }
        Ok(Forked::Parent(pid)) => {
            let _ = fs::File::from(pid_out).write_all(&pid.to_ne_bytes());
            sys::exit_now(0)
        }
        Err(e) => {
            let message = if e.raw_os_error() == Some(libc::ENOMEM) {
                "the container's pid namespace has no init any more (it stopped)".to_string()
            } else {
                format!("cloning into the container: {e}")
            };
            send(&mut report, &Report::Setup(message));
            sys::exit_now(1)
        }
    }
}

fn join(p: &Prepared<'_>, stdio: [OwnedFd; 3]) -> Result<(), ExecError> {
    // Not dumpable: once in the container, its processes cannot open this one's /proc files
    // (exe is the runtime's binary on the host) nor trace it. Forks inherit it; exec resets it.
    sys::set_dumpable(false).map_err(|e| sys_err("clearing dumpable")(errno(&e)))?;
    let [stdin, stdout, stderr] = stdio;
    nix::unistd::dup2_stdin(&stdin).map_err(sys_err("redirecting stdin"))?;
    nix::unistd::dup2_stdout(&stdout).map_err(sys_err("redirecting stdout"))?;
    nix::unistd::dup2_stderr(&stderr).map_err(sys_err("redirecting stderr"))?;
    // Cgroups first, with this process's host credentials, before any namespace changes them.
    for fd in &p.attach {
        nix::unistd::write(fd, b"0").map_err(sys_err("joining the container's cgroup"))?;
    }
    for (flag, file) in &p.namespaces {
        nix::sched::setns(file, *flag).map_err(sys_err(format!("joining namespace {flag:?}")))?;
    }
    Ok(())
}

/// The errno of an error from a system call.
fn errno(e: &io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(0))
}

/// The supervisor, inside every namespace of the container and the caller's child. It never
/// returns: it reports and exits.
fn supervisor_main(p: &Prepared<'_>, mut report: fs::File) -> ! {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| supervise(p, &mut report)));
    let (message, code) = match result {
        Ok(Ok(done)) => (done, 0),
        Ok(Err(failure)) => (failure, 1),
        Err(_) => (Report::Setup("the exec supervisor panicked".into()), 1),
    };
    send(&mut report, &message);
    sys::exit_now(code)
}

fn setup<E: std::fmt::Display>(what: impl Fn() -> String) -> impl FnOnce(E) -> Report {
    move |e| Report::Setup(format!("{}: {e}", what()))
}

/// Takes on the container process's restrictions, starts the command, waits for it and
/// clears up after it. Returns the `Done` report, or the failure to report.
fn supervise(p: &Prepared<'_>, report: &mut fs::File) -> Result<Report, Report> {
    // Its own session and process group, which the caller's backstop kills as a whole.
    nix::unistd::setsid().map_err(setup(|| "starting a session".into()))?;
    // Orphans of the command are reparented here, not to the container's init, so every
    // descendant is found, killed and reaped before the supervisor reports.
    sys::set_child_subreaper().map_err(setup(|| "becoming a child subreaper".into()))?;
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&chld), None).map_err(setup(|| "blocking SIGCHLD".into()))?;
    let sfd = SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(setup(|| "creating a signalfd".into()))?;
    restrict(p)?;
    nix::unistd::chdir(&p.cwd).map_err(setup(|| format!("changing to cwd {}", p.cwd.display())))?;
    umask(Mode::from_bits_truncate(p.plan.umask.unwrap_or(0o022)));
    let path = resolve_program(&p.program, &p.search_path)?;
    let path = CString::new(path.as_os_str().as_bytes()).map_err(setup(|| "program path".into()))?;
    if p.plan.no_new_privs
        && let Some(program) = &p.plan.seccomp
    {
        sys::install_seccomp(&program.filter, program.flags).map_err(setup(|| "installing seccomp".into()))?;
    }
    let child = match sys::clone_process(0).map_err(setup(|| "forking the command".into()))? {
        Forked::Child => command_main(&path, p, report),
        Forked::Parent(pid) => Pid::from_raw(pid),
    };
    Ok(wait_and_clear(child, &sfd, p.deadline, p.lifeline.as_ref()))
}

/// The container process's oom score, then the privilege drop init does too
/// ([`privileges::drop_privileges`]: rlimits, seccomp without no_new_privs, bounding set,
/// groups, ids, capabilities, no_new_privs), then non-dumpable again.
fn restrict(p: &Prepared<'_>) -> Result<(), Report> {
    let plan = p.plan;
    if let Some(adj) = plan.oom_score_adj {
        fs::write("/proc/self/oom_score_adj", adj.to_string()).map_err(setup(|| "setting oom_score_adj".into()))?;
    }
    privileges::drop_privileges(plan, p.user_ns, privileges::last_cap()).map_err(|e| Report::Setup(e.to_string()))?;
    // Changing credentials may have reset it; keep the supervisor closed to the container.
    sys::set_dumpable(false).map_err(setup(|| "clearing dumpable".into()))?;
    Ok(())
}

/// Finds the program as execvp would: a name with a slash is taken as is (relative to the
/// working directory), otherwise the first executable file of that name on `search`.
fn resolve_program(program: &str, search: &str) -> Result<PathBuf, Report> {
    let path = if program.contains('/') {
        let path = PathBuf::from(program);
        if let Err(e) = fs::metadata(&path) {
            return Err(if e.kind() == io::ErrorKind::NotFound {
                Report::NotFound(format!("no such file {}", path.display()))
            } else {
                Report::CannotRun(format!("{}: {e}", path.display()))
            });
        }
        path
    } else {
        search
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| Path::new(dir).join(program))
            .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
            .ok_or_else(|| Report::NotFound(format!("searched PATH {search:?}")))?
    };
    if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
        return Err(Report::CannotRun(format!("{} is a directory", path.display())));
    }
    nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| Report::CannotRun(format!("{}: {e}", path.display())))?;
    Ok(path)
}

/// The command's process: default signal handling, no inherited descriptors past stderr,
/// then exec. Never returns.
fn command_main(path: &CString, p: &Prepared<'_>, report: &mut fs::File) -> ! {
    sys::reset_signals();
    let _ = sys::cloexec_from(3);
    if p.tty {
        // A session of its own whose controlling terminal is stdin: the line discipline's
        // ^C and window size changes reach the command's foreground process group.
        let made =
            nix::unistd::setsid().map_err(io::Error::from).and_then(|_| sys::set_controlling_terminal(&io::stdin()));
        if let Err(e) = made {
            send(report, &Report::Setup(format!("making the terminal the command's controlling terminal: {e}")));
            sys::exit_now(125)
        }
    }
    let err = nix::unistd::execve(path, &p.args, &p.env).err();
    let text = format!("{}: {}", path.to_string_lossy(), err.map(|e| e.desc()).unwrap_or("exec returned"));
    if err == Some(nix::Error::ENOENT) {
        send(report, &Report::NotFound(text));
        sys::exit_now(127)
    }
    send(report, &Report::CannotRun(text));
    sys::exit_now(126)
}

fn status_of(w: WaitStatus) -> Option<(Pid, ExecStatus)> {
    match w {
        WaitStatus::Exited(pid, code) => Some((pid, ExecStatus::Exited(code))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, ExecStatus::Signaled(sig as i32))),
        _ => None,
    }
}

/// Waits for the command until the deadline or until the caller is gone (killing it then),
/// kills and reaps everything it left, and returns the `Done` report.
fn wait_and_clear(child: Pid, sfd: &SignalFd, deadline: Option<Instant>, lifeline: Option<&OwnedFd>) -> Report {
    let mut status = None;
    let mut timed_out = false;
    let wait_signal = |until: Option<Instant>| {
        let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, poll_timeout(until));
        while let Ok(Some(_)) = sfd.read_signal() {}
        n
    };
    // Like `wait_signal`, but also wakes when the caller has gone: Ok(None).
    let wait_signal_or_caller = |until: Option<Instant>| -> nix::Result<Option<i32>> {
        let Some(life) = lifeline else { return wait_signal(until).map(Some) };
        let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN), PollFd::new(life.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, poll_timeout(until))?;
        while let Ok(Some(_)) = sfd.read_signal() {}
        // The pipe is never written: readable or hung up means its writer is gone.
        let gone = fds[1].revents().is_some_and(|r| !r.is_empty());
        Ok(if gone { None } else { Some(n) })
    };
    'command: while status.is_none() {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => break,
                Ok(w) => {
                    if let Some((pid, s)) = status_of(w)
                        && pid == child
                    {
                        status = Some(s);
                        break 'command;
                    }
                }
                Err(nix::Error::EINTR) => {}
                Err(_) => break,
            }
        }
        match wait_signal_or_caller(deadline) {
            Ok(Some(0)) => {
                timed_out = true;
                break;
            }
            // Nobody waits for the outcome any more: clear everything up now.
            Ok(None) => break,
            _ => {}
        }
    }
    // Whatever is left: the command itself after a timeout, and all it started.
    let me = nix::unistd::getpid();
    let give_up = Instant::now() + KILL_GRACE;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(nix::Error::ECHILD) => break,
            Err(nix::Error::EINTR) => continue,
            Err(_) => break,
            Ok(WaitStatus::StillAlive) => {
                if status.is_none() {
                    let _ = kill(child, Signal::SIGKILL);
                }
                for pid in descendants(me.as_raw()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                if Instant::now() >= give_up {
                    break;
                }
                // Woken by the next exit, or soon anyway to catch processes forked meanwhile.
                let _ = wait_signal(Some((Instant::now() + Duration::from_millis(20)).min(give_up)));
            }
            Ok(w) => {
                if let Some((pid, s)) = status_of(w)
                    && pid == child
                {
                    status = Some(s);
                }
            }
        }
    }
    Report::Done { status: status.unwrap_or(ExecStatus::Signaled(libc::SIGKILL)), timed_out }
}

/// Live descendants of `root`, from the container's /proc.
fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let table: Vec<(i32, i32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_ppid(&stat)?))
        })
        .collect();
    descendants_in(root, &table)
}

/// The parent pid from the text of /proc/PID/stat (field 4, after the parenthesised name).
fn parse_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// Every pid below `root` in a (pid, ppid) table.
fn descendants_in(root: i32, table: &[(i32, i32)]) -> Vec<i32> {
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(table.iter().filter(|(pid, ppid)| *ppid == parent && *pid != root).map(|(pid, _)| *pid));
        i += 1;
    }
    found.remove(0);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_entries_replace_or_append() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let extra = vec!["A=2".to_string(), "B=x=y".to_string()];
        assert_eq!(merge_env(&base, &extra).unwrap(), ["PATH=/bin", "A=2", "B=x=y"]);
        assert!(matches!(merge_env(&base, &["noequals".into()]), Err(ExecError::BadEnv(e)) if e == "noequals"));
        assert!(matches!(merge_env(&base, &["=v".into()]), Err(ExecError::BadEnv(_))));
    }

    #[test]
    fn reports_round_trip_and_junk_is_skipped() {
        let reports = [
            Report::Setup("joining\nnamespace".into()),
            Report::NotFound("searched PATH".into()),
            Report::CannotRun("x".into()),
            Report::Done { status: ExecStatus::Exited(7), timed_out: false },
            Report::Done { status: ExecStatus::Signaled(9), timed_out: true },
        ];
        let mut wire: Vec<u8> = reports.iter().flat_map(|r| r.encode()).collect();
        wire.extend_from_slice(b"Dq1\nZjunk\nDe\n");
        let parsed = parse_reports(&wire);
        assert_eq!(parsed[0], Report::Setup("joining namespace".into()), "newlines would break the framing");
        assert_eq!(&parsed[1..], &reports[1..]);
        let long = Report::Setup("é".repeat(MAX_MESSAGE)).encode();
        assert!(long.len() <= MAX_MESSAGE + 2 && std::str::from_utf8(&long).is_ok());
    }

    #[test]
    fn exit_codes_follow_timeout_1() {
        let outcome = |status, timed_out| ExecOutcome {
            status,
            stdout: vec![],
            stderr: vec![],
            stdout_truncated: false,
            stderr_truncated: false,
            timed_out,
        };
        assert_eq!(outcome(ExecStatus::Exited(3), false).exit_code(), 3);
        assert_eq!(outcome(ExecStatus::Signaled(15), false).exit_code(), 143);
        assert_eq!(outcome(ExecStatus::Signaled(9), true).exit_code(), 124);
        assert_eq!(outcome(ExecStatus::Exited(300), false).exit_code(), 255);
        let nf = ExecError::ProgramNotFound { id: "c".into(), program: "x".into(), detail: String::new() };
        assert_eq!(nf.exit_code(), 127);
        assert_eq!(
            ExecError::CannotRun { id: "c".into(), program: "x".into(), message: String::new() }.exit_code(),
            126
        );
        assert_eq!(ExecError::EmptyCommand.exit_code(), 125);
    }

    #[test]
    fn output_is_cut_at_the_limit() {
        let (r, _w) = pipe().unwrap();
        let mut s = Stream::new(Some(r), 5);
        s.push(b"abc");
        assert!(!s.truncated);
        s.push(b"defg");
        assert_eq!((s.buf.as_slice(), s.truncated), (&b"abcde"[..], true));
    }

    #[test]
    fn descendants_follow_parent_links() {
        let table = [(1, 0), (10, 1), (11, 10), (12, 11), (13, 1), (20, 10), (30, 99)];
        let mut d = descendants_in(10, &table);
        d.sort();
        assert_eq!(d, [11, 12, 20]);
        assert_eq!(descendants_in(30, &table), Vec::<i32>::new());
        assert_eq!(parse_ppid("42 (a) b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn programs_resolve_like_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("tool"), "").unwrap();
        fs::write(b.join("tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(b.join("tool"), fs::Permissions::from_mode(0o755)).unwrap();
        let search = format!("{}::{}", a.display(), b.display());
        assert_eq!(resolve_program("tool", &search).unwrap(), b.join("tool"), "a non-executable file is skipped");
        assert!(matches!(resolve_program("missing", &search), Err(Report::NotFound(_))));
        let missing = dir.path().join("nope");
        assert!(matches!(resolve_program(missing.to_str().unwrap(), &search), Err(Report::NotFound(_))));
        assert!(matches!(resolve_program(a.to_str().unwrap(), &search), Err(Report::CannotRun(_))));
        let poll = poll_timeout(Some(Instant::now() + Duration::from_micros(10)));
        assert!(poll.is_some(), "a deadline just ahead is a finite timeout");
        assert_eq!(poll_timeout(None), PollTimeout::NONE);
    }
}
