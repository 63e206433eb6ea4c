//! Replacing the agent's own binary (a fleet upgrade, `flotilla upgrade agents`), with a way
//! back that needs nobody on site.
//!
//! An order ([`proto::messages::HubRequest::Upgrade`]) is carried out in four steps:
//! 1. the main loop pulls the agent artifact for this platform; the blob store verifies its
//!    digest;
//! 2. [`install`]: the new binary is written beside the running one, the state file
//!    (`<data-dir>/upgrade/state.json`) records the attempt as [`Phase::Trying`], a watcher
//!    process is started from the *running* binary, the running binary is kept as
//!    `<exe>.previous` (a hard link) and the new one renamed over `<exe>` (atomic);
//! 3. the agent stops as on SIGTERM (its containers keep running, its Wasm HTTP listeners go
//!    to a holder) and [`exec`]s `<exe>` in the same process: same pid, same arguments;
//! 4. the new binary, once the hub sent it a set (its session is up), marks the attempt
//!    [`Phase::Confirmed`] ([`confirm`]).
//!
//! The watcher ([`watch`]) waits for that. If the process exits first, or the deadline passes
//! (it is then stopped with SIGTERM, then SIGKILL), the watcher puts `<exe>.previous` back,
//! records [`Phase::RolledBack`] with the reason, and starts the previous binary with the
//! same arguments in its own place (or leaves that to the service manager when the agent runs
//! under one). The hub learns how the attempt ended from the next hello
//! ([`State::facts`]).
//!
//! Everything here is blocking and runs off the async workers.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::messages::{AgentBinary, UpgradeOutcome};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Where an attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Installed; the new binary has not reached the hub yet.
    Trying,
    /// The new binary reached the hub.
    Confirmed,
    /// The previous binary is back.
    RolledBack,
}

/// The upgrade state file: the last attempt and how to undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub attempt: u64,
    pub image: String,
    /// Digest of the new binary.
    pub digest: String,
    pub phase: Phase,
    /// Why it was rolled back.
    #[serde(default)]
    pub message: String,
    /// The binary before this attempt (`None`: the one the node was installed with).
    #[serde(default)]
    pub previous: Option<AgentBinary>,
    /// The agent's executable, and the previous binary kept beside it.
    pub exe: PathBuf,
    pub previous_exe: PathBuf,
    /// How long the new binary has to reach the hub, from the install.
    pub deadline_ms: u64,
    /// The agent's command line, to start the previous binary with.
    pub argv: Vec<OsString>,
    /// A service manager restarts the agent when it exits: the watcher does not.
    pub supervised: bool,
}

impl State {
    /// What the agent reports in its hello: the binary it runs and how the attempt ended.
    /// An attempt still on trial reports the new binary, and counts as ok until it is not.
    pub fn facts(&self) -> (Option<AgentBinary>, Option<UpgradeOutcome>) {
        let ok = self.phase != Phase::RolledBack;
        let binary = if ok {
            Some(AgentBinary { image: self.image.clone(), digest: self.digest.clone() })
        } else {
            self.previous.clone()
        };
        let outcome =
            UpgradeOutcome { attempt: self.attempt, image: self.image.clone(), ok, message: self.message.clone() };
        (binary, Some(outcome))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot pull {image}: {source}")]
    Pull { image: String, source: Box<oci_runtime::ImageError> },
    #[error("the install did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UpgradeError + 'a {
    move |source| UpgradeError::Io { what, path: path.to_path_buf(), source }
}

/// The state file under the agent's data dir.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join("upgrade").join("state.json")
}

pub fn load(path: &Path) -> Result<Option<State>, UpgradeError> {
    Ok(crate::state::load_json(path)?)
}

pub fn save(path: &Path, state: &State) -> Result<(), UpgradeError> {
    Ok(crate::state::save_json(path, state)?)
}

/// Called once the new binary's session is up: the attempt on trial is confirmed. True when
/// it was on trial.
pub fn confirm(path: &Path) -> Result<bool, UpgradeError> {
    match load(path)? {
        Some(mut s) if s.phase == Phase::Trying => {
            s.phase = Phase::Confirmed;
            save(path, &s)?;
            info!(attempt = s.attempt, image = %s.image, "agent upgrade confirmed: the new binary reached the hub");
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// How the agent was started, for a restart into another binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The agent's executable (as it was when the process started).
    pub exe: PathBuf,
    pub argv: Vec<OsString>,
    /// A service manager restarts the agent when it exits.
    pub supervised: bool,
}

impl Invocation {
    /// This process's, for the binary `main`: its executable and command line, and whether
    /// systemd runs it (`INVOCATION_ID` set and the parent is pid 1).
    pub fn of_this_process() -> io::Result<Invocation> {
        let exe = std::env::current_exe()?;
        let supervised = std::env::var_os("INVOCATION_ID").is_some() && std::os::unix::process::parent_id() == 1;
        Ok(Invocation { exe, argv: std::env::args_os().collect(), supervised })
    }
}

/// An order the agent takes: what it answers before doing anything.
pub fn precheck(state: Option<&State>, image: &str, attempt: u64) -> Option<proto::messages::UpgradeAnswer> {
    use proto::messages::UpgradeAnswer;
    let s = state?;
    if s.attempt == attempt && s.phase == Phase::RolledBack {
        return Some(UpgradeAnswer::Refused { message: format!("attempt {attempt} was rolled back: {}", s.message) });
    }
    (s.image == image && s.phase != Phase::RolledBack).then(|| UpgradeAnswer::Current { digest: s.digest.clone() })
}

/// What to install.
#[derive(Debug, Clone)]
pub struct Install {
    pub attempt: u64,
    pub image: String,
    pub digest: String,
    /// The verified new binary (in the blob store).
    pub binary: PathBuf,
    pub invocation: Invocation,
    pub deadline: Duration,
    /// The binary running now, as the hub knows it.
    pub previous: Option<AgentBinary>,
    pub state_path: PathBuf,
}

/// Installs the new binary in place of the running one, keeping the running one as
/// `<exe>.previous`, after starting the watcher (`spawn_watcher(state_path)`) that takes it
/// back if the new one does not reach the hub. On an error nothing is replaced.
pub fn install(i: &Install, spawn_watcher: impl FnOnce(&Path) -> io::Result<()>) -> Result<(), UpgradeError> {
    let exe = &i.invocation.exe;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(UpgradeError::Refused(format!(
            "the running binary {} was replaced on disk since the agent started; restart the agent first",
            exe.display()
        )));
    }
    let dir = exe.parent().ok_or_else(|| UpgradeError::Refused(format!("{} has no directory", exe.display())))?;
    let name = exe.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let staged = dir.join(format!(".{name}.upgrade-{}", i.attempt));
    let previous_exe = dir.join(format!("{name}.previous"));
    // 1. The new binary, whole and on disk, beside the running one.
    copy_synced(&i.binary, &staged, 0o755).map_err(io_err("stage the new binary at", &staged))?;
    // 2. The running binary kept (a second name for the same file).
    let keep = || -> io::Result<()> {
        match fs::remove_file(&previous_exe) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::hard_link(exe, &previous_exe).or_else(|_| copy_synced(exe, &previous_exe, 0o755))
    };
    if let Err(e) = keep() {
        let _ = fs::remove_file(&staged);
        return Err(io_err("keep the running binary as", &previous_exe)(e));
    }
    // 3. The state the watcher and the next process read, then the watcher.
    let mut state = State {
        attempt: i.attempt,
        image: i.image.clone(),
        digest: i.digest.clone(),
        phase: Phase::Trying,
        message: String::new(),
        previous: i.previous.clone(),
        exe: exe.clone(),
        previous_exe: previous_exe.clone(),
        deadline_ms: u64::try_from(i.deadline.as_millis()).unwrap_or(u64::MAX),
        argv: i.invocation.argv.clone(),
        supervised: i.invocation.supervised,
    };
    let undo = |state: &mut State, why: String| {
        let _ = fs::remove_file(&staged);
        state.phase = Phase::RolledBack;
        state.message = why;
        let _ = save(&i.state_path, state);
    };
    save(&i.state_path, &state)?;
    if let Err(e) = spawn_watcher(&i.state_path) {
        undo(&mut state, format!("cannot start the upgrade watcher: {e}"));
        return Err(io_err("start the upgrade watcher for", &i.state_path)(e));
    }
    // 4. The swap: atomic, and durable before the restart.
    if let Err(e) = fs::rename(&staged, exe).and_then(|_| File::open(dir)?.sync_all()) {
        undo(&mut state, format!("cannot install the new binary: {e}"));
        return Err(io_err("install the new binary at", exe)(e));
    }
    info!(attempt = i.attempt, image = %i.image, digest = %i.digest, exe = %exe.display(), "new agent binary installed; the previous one kept");
    Ok(())
}

fn copy_synced(from: &Path, to: &Path, mode: u32) -> io::Result<()> {
    let mut src = File::open(from)?;
    let mut dst = File::create(to)?;
    io::copy(&mut src, &mut dst)?;
    dst.set_permissions(fs::Permissions::from_mode(mode))?;
    dst.sync_all()
}

/// Starts the watcher for `state_path` and this process: `/proc/self/exe` (the binary running
/// now, whatever the path holds later) `agent-upgrade-watch`, which starts the real watcher
/// in a process group of its own and exits, so the watcher is nobody's child to reap.
pub fn spawn_watcher(state_path: &Path) -> io::Result<()> {
    let status = watcher_command(state_path, std::process::id()).status()?;
    if !status.success() {
        return Err(io::Error::other(format!("the upgrade watcher did not start: {status}")));
    }
    Ok(())
}

/// `/proc/self/exe agent-upgrade-watch --state S --pid P`, in a process group of its own.
fn watcher_command(state_path: &Path, pid: u32) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("agent-upgrade-watch")
        .arg("--state")
        .arg(state_path)
        .arg("--pid")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .process_group(0);
    cmd
}

/// Body of `agent-upgrade-watch` (without `--detached`): starts the watcher proper and
/// returns.
pub fn detach_watcher(state_path: &Path, pid: u32) -> io::Result<()> {
    watcher_command(state_path, pid).arg("--detached").spawn().map(drop)
}

/// Replaces this process with the agent's executable (the new binary), same arguments.
/// Returns only on failure.
pub fn exec(invocation: &Invocation) -> io::Error {
    let mut args = invocation.argv.iter();
    let arg0 = args.next().cloned().unwrap_or_else(|| invocation.exe.clone().into_os_string());
    Command::new(&invocation.exe).arg0(arg0).args(args).exec()
}

/// How often the watcher looks at the state file and the process.
const WATCH_POLL: Duration = Duration::from_millis(100);
/// How long a new binary past its deadline gets to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Whether process `pid` is the one that was there at `start` (not exited, not a zombie, not
/// a reused pid), from `/proc/<pid>/stat`. An exec keeps the start time.
fn alive(pid: u32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((state, t)) if t == start && state != 'Z' && state != 'X')
}

/// The process's state letter and start time (in clock ticks since boot).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 (starttime) of the whole line is the 20th after the state (field 3).
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// What the watcher decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// The attempt was confirmed, or is no longer the one watched.
    Settled,
    /// The previous binary is back; `restart`: the watcher must start it.
    RolledBack { restart: bool },
}

/// The watcher proper: waits for the attempt in `state_path` to be confirmed by process
/// `pid`, and rolls back when it exits first or the deadline passes.
pub fn watch(state_path: &Path, pid: u32) -> Result<Watched, UpgradeError> {
    let Some(first) = load(state_path)? else { return Ok(Watched::Settled) };
    let Some((_, start)) = proc_stat(pid) else {
        return rollback(state_path, &first, "the agent exited before the new binary started".into());
    };
    let deadline = Instant::now() + Duration::from_millis(first.deadline_ms);
    info!(attempt = first.attempt, pid, deadline_ms = first.deadline_ms, "watching the new agent binary");
    loop {
        match load(state_path) {
            Ok(Some(s)) if s.attempt == first.attempt && s.phase == Phase::Trying => {}
            Ok(_) => return Ok(Watched::Settled),
            Err(e) => warn!(error = %e, "cannot read the upgrade state; still watching"),
        }
        if !alive(pid, start) {
            let why = "the new agent binary exited before it reached the hub; back on the previous binary";
            return rollback(state_path, &first, why.into());
        }
        if Instant::now() >= deadline {
            stop(pid, start);
            let why = format!(
                "the new agent binary did not reach the hub within {}s; back on the previous binary",
                first.deadline_ms / 1000
            );
            return rollback(state_path, &first, why);
        }
        std::thread::sleep(WATCH_POLL);
    }
}

/// SIGTERM (the agent detaches from its workloads), then SIGKILL after [`STOP_GRACE`].
fn stop(pid: u32, start: u64) {
    use nix::sys::signal::{Signal, kill};
    let Ok(raw) = i32::try_from(pid) else { return };
    let target = nix::unistd::Pid::from_raw(raw);
    let _ = kill(target, Signal::SIGTERM);
    let until = Instant::now() + STOP_GRACE;
    while alive(pid, start) && Instant::now() < until {
        std::thread::sleep(WATCH_POLL);
    }
    if alive(pid, start) {
        let _ = kill(target, Signal::SIGKILL);
    }
}

fn rollback(state_path: &Path, s: &State, why: String) -> Result<Watched, UpgradeError> {
    warn!(attempt = s.attempt, image = %s.image, reason = %why, "rolling the agent binary back");
    fs::rename(&s.previous_exe, &s.exe).map_err(io_err("put the previous binary back at", &s.exe))?;
    if let Some(dir) = s.exe.parent() {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    let back = State { phase: Phase::RolledBack, message: why, ..s.clone() };
    save(state_path, &back)?;
    Ok(Watched::RolledBack { restart: !s.supervised })
}

/// After a rollback the watcher becomes the agent: the previous binary, same arguments.
/// Returns only on failure.
pub fn restart_previous(state_path: &Path) -> Result<io::Error, UpgradeError> {
    let s = load(state_path)?.ok_or_else(|| UpgradeError::Refused("the upgrade state is gone".into()))?;
    let _ = nix::unistd::setsid();
    Ok(exec(&Invocation { exe: s.exe, argv: s.argv, supervised: s.supervised }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dir: &Path) -> State {
        State {
            attempt: 2,
            image: "reg/flotilla-agent:2".into(),
            digest: "sha256:22".into(),
            phase: Phase::Trying,
            message: String::new(),
            previous: Some(AgentBinary { image: "reg/flotilla-agent:1".into(), digest: "sha256:11".into() }),
            exe: dir.join("flotilla"),
            previous_exe: dir.join("flotilla.previous"),
            deadline_ms: 60_000,
            argv: vec!["flotilla".into(), "agent".into()],
            supervised: false,
        }
    }

    #[test]
    fn facts_report_the_binary_on_trial_and_the_previous_one_after_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(dir.path());
        let (binary, outcome) = s.facts();
        assert_eq!(binary.unwrap().digest, "sha256:22");
        assert!(outcome.unwrap().ok);
        s.phase = Phase::RolledBack;
        s.message = "exited".into();
        let (binary, outcome) = s.facts();
        assert_eq!(binary.unwrap().digest, "sha256:11");
        let outcome = outcome.unwrap();
        assert_eq!((outcome.attempt, outcome.ok, outcome.message.as_str()), (2, false, "exited"));
    }

    #[test]
    fn orders_for_the_image_running_or_an_attempt_rolled_back_are_answered_at_once() {
        use proto::messages::UpgradeAnswer;
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(dir.path());
        assert_eq!(precheck(None, "reg/x:1", 1), None);
        assert_eq!(
            precheck(Some(&s), "reg/flotilla-agent:2", 2),
            Some(UpgradeAnswer::Current { digest: "sha256:22".into() })
        );
        assert_eq!(precheck(Some(&s), "reg/flotilla-agent:3", 3), None);
        s.phase = Phase::RolledBack;
        s.message = "exited".into();
        assert!(
            matches!(precheck(Some(&s), "reg/flotilla-agent:2", 2), Some(UpgradeAnswer::Refused { message }) if message.contains("exited"))
        );
        // A new attempt for the image that failed may try again.
        assert_eq!(precheck(Some(&s), "reg/flotilla-agent:2", 3), None);
    }

    #[test]
    fn install_keeps_the_running_binary_and_a_dead_process_is_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("flotilla");
        fs::write(&exe, b"old binary").unwrap();
        let new = dir.path().join("blob");
        fs::write(&new, b"new binary").unwrap();
        let state_path = dir.path().join("upgrade/state.json");
        let i = Install {
            attempt: 2,
            image: "reg/flotilla-agent:2".into(),
            digest: "sha256:22".into(),
            binary: new,
            invocation: Invocation { exe: exe.clone(), argv: vec!["flotilla".into()], supervised: true },
            deadline: Duration::from_secs(60),
            previous: None,
            state_path: state_path.clone(),
        };
        let mut watched = None;
        install(&i, |p| {
            watched = Some(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert_eq!(watched.as_deref(), Some(state_path.as_path()));
        assert_eq!(fs::read(&exe).unwrap(), b"new binary");
        assert_eq!(fs::read(dir.path().join("flotilla.previous")).unwrap(), b"old binary");
        assert_eq!(fs::metadata(&exe).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(load(&state_path).unwrap().unwrap().phase, Phase::Trying);
        // A child that exits at once stands for a new binary that cannot start.
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(watch(&state_path, pid).unwrap(), Watched::RolledBack { restart: false });
        assert_eq!(fs::read(&exe).unwrap(), b"old binary");
        let s = load(&state_path).unwrap().unwrap();
        assert_eq!(s.phase, Phase::RolledBack);
        assert!(s.message.contains("exited"), "{}", s.message);
        // A confirmed attempt is left alone.
        assert!(!confirm(&state_path).unwrap());
        save(&state_path, &State { phase: Phase::Trying, ..s }).unwrap();
        assert!(confirm(&state_path).unwrap());
        assert_eq!(watch(&state_path, std::process::id()).unwrap(), Watched::Settled);
        // A watcher that cannot start leaves the running binary in place.
        fs::write(&i.binary, b"newer").unwrap();
        let err = install(&Install { attempt: 3, ..i.clone() }, |_| Err(io::Error::other("no"))).unwrap_err();
        assert!(err.to_string().contains("watcher"), "{err}");
        assert_eq!(fs::read(&exe).unwrap(), b"old binary");
        assert_eq!(load(&state_path).unwrap().unwrap().phase, Phase::RolledBack);
    }

    #[test]
    fn proc_stat_reads_this_process() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(alive(std::process::id(), start));
        assert!(!alive(std::process::id(), start + 1));
    }
}
