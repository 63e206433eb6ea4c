//! The OCI runtime operations with runc's semantics: `create` sets a container up and leaves
//! its first process blocked before exec, `start` releases it, `state` reports
//! created/running/stopped, `kill` signals it, `delete` removes everything, and `run` does
//! create, start, wait and delete. It owns the state directory `<root>/<id>/` (state.json,
//! exec.fifo, exit.json) and the container's cgroups. It must only clone from a
//! single-threaded process (checked, refused otherwise), and it never leaves a cgroup or a
//! state directory behind after a failed create or a delete.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::cgroup::{AnyCgroupManager, CgroupConfig, CgroupError, CgroupManager};
use super::hooks::{self, Hooks};
use super::init::{ChildFds, child_main};
use super::spec::{self, Plan, SpecError};
use super::sys::{self, Forked};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container id {0:?} is invalid (use 1-64 of A-Z a-z 0-9 _ . -, not starting with . or -)")]
    BadId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {id} is {status}, expected {expected}")]
    WrongStatus { id: String, status: Status, expected: &'static str },
    #[error("the process has {0} threads; containers can only be created from a single-threaded process")]
    Multithreaded(usize),
    #[error("bundle: {0}")]
    Spec(#[from] SpecError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("container {id} failed to start: {message}")]
    Init { id: String, message: String },
    #[error("network hook for container {id}: {source}")]
    Network { id: String, source: NetworkHookError },
    #[error("state of container {id} is unreadable: {message}")]
    BadState { id: String, message: String },
    #[error(transparent)]
    Durable(#[from] crate::durable::DurableError),
    #[error("container {id}: {source}")]
    Hook { id: String, source: super::hooks::HookError },
    #[error("{0}")]
    Console(&'static str),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ContainerError + use<> {
    let path = path.to_path_buf();
    move |source| ContainerError::Io { action, path, source }
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Sys { what, source }
}

/// OCI container status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    /// Running, with every process frozen by `pause`.
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// What the runtime records about a container in `<root>/<id>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    pub id: String,
    pub bundle: PathBuf,
    /// Init process pid (host pid namespace) and its start time, which tells it from a
    /// later process that reused the pid.
    pub pid: i32,
    pub pid_start: u64,
    pub shim_pid: Option<i32>,
    pub shim_start: Option<u64>,
    pub created: String,
    pub cgroup_config: CgroupConfig,
    pub cgroup_path: PathBuf,
    /// Whether the container joined the v1 devices controller (records written before
    /// `cgroup_extra` existed say it here).
    pub cgroup_devices: bool,
    /// Optional v1 controllers the container joined (`devices`, `cpuset`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup_extra: Vec<String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Mounts made for this container by its caller, detached on delete.
    pub owned_mounts: Vec<PathBuf>,
    /// The spec's hooks as they were at create (poststart and poststop run later).
    #[serde(default, skip_serializing_if = "Hooks::is_empty")]
    pub hooks: Hooks,
}

impl ContainerRecord {
    /// The optional cgroup controllers this container joined.
    pub fn cgroup_controllers(&self) -> Vec<String> {
        let mut extra = self.cgroup_extra.clone();
        if self.cgroup_devices && !extra.iter().any(|c| c == "devices") {
            extra.push("devices".into());
        }
        extra
    }
}

/// The OCI state document (`runc state`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    /// 0 when stopped, as runc reports.
    pub pid: i32,
    pub bundle: PathBuf,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// How a container ended (`exit.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExitInfo {
    /// The exit code, or 128 + signal when killed by a signal (as shells report it).
    pub code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// RFC 3339, UTC.
    pub finished_at: String,
    /// The container init this status belongs to. A container id is reused when a replica
    /// restarts; the pid tells one run's exit from another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
}

/// Runtime settings: where state and cgroups live.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub state_root: PathBuf,
    pub cgroup: CgroupConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { state_root: PathBuf::from("/run/flotilla/oci"), cgroup: CgroupConfig::default() }
    }
}

/// An error of a [`NetworkHook`]: the hook's own error type, boxed.
pub type NetworkHookError = Box<dyn std::error::Error + Send + Sync>;

/// Called by `create` after the container's namespaces exist and before its process goes on:
/// the place to plumb a veth pair into its network namespace (`/proc/<pid>/ns/net`).
pub trait NetworkHook {
    fn setup(&self, id: &str, pid: i32) -> Result<(), NetworkHookError>;
}

/// Per-create options.
#[derive(Default)]
pub struct CreateOptions<'a> {
    /// stdin, stdout, stderr for the container (None: inherit this process's).
    pub stdio: [Option<OwnedFd>; 3],
    pub shim_pid: Option<i32>,
    pub owned_mounts: Vec<PathBuf>,
    pub network_hook: Option<&'a dyn NetworkHook>,
    /// A connected unix socket (runc's `--console-socket`): with `process.terminal` the init
    /// sends its pseudo-terminal's master over it.
    pub console_socket: Option<OwnedFd>,
}

/// A container just created: its init pid, blocked before exec.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: String,
    pub pid: i32,
    /// What the spec held that was ignored (unknown properties, labels without SELinux).
    pub warnings: Vec<String>,
}

/// The OCI state document handed to hooks on stdin (the one `state` prints).
fn hook_state(
    id: &str,
    status: Status,
    pid: i32,
    bundle: &Path,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Vec<u8> {
    let state = OciState {
        oci_version: "1.0.2".into(),
        id: id.into(),
        status,
        pid,
        bundle: bundle.into(),
        annotations: annotations.clone(),
    };
    // Serializing fails only for a bundle path that is not UTF-8: the hook then reads an
    // empty stdin rather than the runtime panicking.
    serde_json::to_vec(&state).unwrap_or_default()
}

/// A warning of a stage that does not fail its operation (poststart, poststop hooks).
fn warn(message: impl std::fmt::Display) {
    let _ = writeln!(io::stderr(), "warning: {message}");
}

/// The executor.
#[derive(Debug, Clone)]
pub struct Runtime {
    config: RuntimeConfig,
}

const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn validate_id(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok { Ok(()) } else { Err(ContainerError::BadId(id.to_string())) }
}

/// Formats a time as RFC 3339 UTC with millisecond precision.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Now, as [`rfc3339`] formats it.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// Whether `pid` is still the process that started at `start` (and not a zombie).
pub(crate) fn same_process(pid: i32, start: u64) -> bool {
    matches!(sys::proc_start_time(pid), Some((s, state)) if s == start && state != 'Z' && state != 'X')
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Self {
        Runtime { config }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.config.state_root.join(id)
    }

    pub(crate) fn cgroup_manager(record: &ContainerRecord) -> Result<AnyCgroupManager, ContainerError> {
        Ok(AnyCgroupManager::new(&record.cgroup_config, &record.cgroup_path, &record.cgroup_controllers())?)
    }

    /// Reads a container's record.
    pub fn record(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        validate_id(id)?;
        let path = self.state_dir(id).join("state.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ContainerError::NotFound(id.into())),
            Err(e) => return Err(ContainerError::Io { action: "read", path, source: e }),
        };
        serde_json::from_str(&text).map_err(|e| ContainerError::BadState { id: id.into(), message: e.to_string() })
    }

    pub(crate) fn write_record(&self, record: &ContainerRecord) -> Result<(), ContainerError> {
        let dir = self.state_dir(&record.id);
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| ContainerError::BadState { id: record.id.clone(), message: e.to_string() })?;
        write_atomic(&dir.join("state.json"), &json)
    }

    /// Sets a container up and leaves its process blocked before exec (status `created`).
    pub fn create(&self, id: &str, bundle: &Path, options: CreateOptions<'_>) -> Result<Created, ContainerError> {
        validate_id(id)?;
        let threads = sys::thread_count().map_err(io_err("count threads of", Path::new("/proc/self/task")))?;
        if threads != 1 {
            return Err(ContainerError::Multithreaded(threads));
        }
        let bundle = std::path::absolute(bundle).map_err(io_err("resolve", bundle))?;
        let plan = spec::load_bundle(&bundle)?;
        if let Some(caps) = &plan.caps
            && let Some(own) = sys::own_bounding_set()
        {
            // Asking for a capability this process does not hold could only fail later,
            // inside the init, as a bare EPERM from capset; say which ones now.
            let missing = (caps.bounding | caps.permitted | caps.effective | caps.ambient) & !own;
            if missing != 0 {
                let names: Vec<&str> = (0..64)
                    .filter(|bit| missing & (1u64 << bit) != 0)
                    .map(|bit| spec::KNOWN_CAPABILITIES.get(bit).copied().unwrap_or("CAP_?"))
                    .collect();
                return Err(ContainerError::Spec(SpecError::Unsupported(format!(
                    "process.capabilities {} (this runtime does not hold them itself)",
                    names.join(", ")
                ))));
            }
        }
        fs::create_dir_all(&self.config.state_root).map_err(io_err("create", &self.config.state_root))?;
        let dir = self.state_dir(id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(ContainerError::Exists(id.into())),
            Err(e) => return Err(ContainerError::Io { action: "create", path: dir, source: e }),
        }
        let cgroup_path = match &plan.cgroups_path {
            Some(p) => p.clone(),
            None => PathBuf::from("flotilla").join(id),
        };
        let controllers = plan.resources.extra_controllers();
        let cgroups = match AnyCgroupManager::new(&self.config.cgroup, &cgroup_path, &controllers) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        match self.create_in(id, &bundle, &plan, &dir, &cgroups, &cgroup_path, &controllers, options) {
            Ok(created) => Ok(created),
            Err(e) => {
                let _ = cgroups.destroy(DELETE_TIMEOUT);
                let _ = fs::remove_dir_all(&dir);
                // A failed hook (or init) stops the container; poststop hooks still run.
                if matches!(e, ContainerError::Hook { .. } | ContainerError::Init { .. }) {
                    let state = hook_state(id, Status::Stopped, 0, &bundle, &plan.annotations);
                    for failure in hooks::run_all("poststop", &plan.hooks.poststop, &state) {
                        warn(failure);
                    }
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_in(
        &self,
        id: &str,
        bundle: &Path,
        plan: &Plan,
        dir: &Path,
        cgroups: &AnyCgroupManager,
        cgroup_path: &Path,
        controllers: &[String],
        options: CreateOptions<'_>,
    ) -> Result<Created, ContainerError> {
        cgroups.create()?;
        cgroups.apply(&plan.resources)?;
        let fifo_path = dir.join("exec.fifo");
        nix::unistd::mkfifo(&fifo_path, Mode::from_bits_truncate(0o600)).map_err(sys_err("creating exec fifo"))?;
        // Read-write so opening does not block; the child reads from it until `start` writes.
        let fifo: OwnedFd = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&fifo_path)
            .map_err(io_err("open", &fifo_path))?
            .into();
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("creating sync pipe"))?;
        let (rep_r, rep_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys_err("creating sync pipe"))?;
        let CreateOptions { stdio, shim_pid, owned_mounts, network_hook, console_socket } = options;
        match (plan.terminal, &console_socket) {
            (true, None) => return Err(ContainerError::Console("process.terminal is set: a console socket is needed")),
            (false, Some(_)) => {
                return Err(ContainerError::Console("a console socket was given but process.terminal is not set"));
            }
            _ => {}
        }
        let mut attach = Vec::new();
        for file in cgroups.self_attach_files() {
            let fd = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&file)
                .map_err(io_err("open", &file))?;
            attach.push(OwnedFd::from(fd));
        }
        let self_attach = !attach.is_empty();

        if let Some(path) = &plan.join_pid {
            // This process stays in its own pid namespace; its children (the init) go there.
            let ns = fs::File::open(path).map_err(io_err("open", path))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWPID)
                .map_err(sys_err(format!("joining pid namespace {}", path.display())))?;
        }
        let pid = match sys::clone_process(plan.clone_flags.bits()).map_err(io_err("clone", bundle))? {
            Forked::Child => {
                drop(go_w);
                drop(rep_r);
                child_main(plan, ChildFds { go: go_r, report: rep_w, fifo, stdio, attach, console: console_socket })
            }
            Forked::Parent(pid) => pid,
        };
        drop((go_r, rep_w, fifo, stdio, attach, console_socket));
        let cgroups = if self_attach { None } else { Some(cgroups) };
        let result = self.finish_create(id, pid, bundle, plan, cgroups, network_hook, go_w, rep_r);
        if let Err(e) = result {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
            return Err(e);
        }
        let pid_start = sys::proc_start_time(pid).map(|(s, _)| s).unwrap_or(0);
        let shim_start = shim_pid.and_then(sys::proc_start_time).map(|(s, _)| s);
        let record = ContainerRecord {
            id: id.into(),
            bundle: bundle.into(),
            pid,
            pid_start,
            shim_pid,
            shim_start,
            created: rfc3339(SystemTime::now()),
            cgroup_config: self.config.cgroup.clone(),
            cgroup_path: cgroup_path.into(),
            cgroup_devices: !plan.resources.device_rules.is_empty(),
            cgroup_extra: controllers.to_vec(),
            annotations: plan.annotations.clone(),
            owned_mounts,
            hooks: plan.hooks.clone(),
        };
        if let Err(e) = self.write_record(&record) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
            return Err(e);
        }
        Ok(Created { id: id.into(), pid, warnings: plan.warnings().to_vec() })
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_create(
        &self,
        id: &str,
        pid: i32,
        bundle: &Path,
        plan: &Plan,
        cgroups: Option<&AnyCgroupManager>,
        network_hook: Option<&dyn NetworkHook>,
        go: OwnedFd,
        report: OwnedFd,
    ) -> Result<(), ContainerError> {
        if plan.clone_flags.contains(nix::sched::CloneFlags::CLONE_NEWUSER) {
            for (file, map) in [("uid_map", &plan.uid_map), ("gid_map", &plan.gid_map)] {
                let path = PathBuf::from(format!("/proc/{pid}/{file}"));
                fs::write(&path, map).map_err(io_err("write", &path))?;
            }
        }
        if let Some(cgroups) = cgroups {
            cgroups.add_process(pid)?;
        }
        if let Some(hook) = network_hook {
            hook.setup(id, pid).map_err(|source| ContainerError::Network { id: id.into(), source })?;
        }
        let hooks = &plan.hooks;
        if !hooks.prestart.is_empty() || !hooks.create_runtime.is_empty() || hooks.in_container() {
            // "created", as crun and the runtime-tools suite have it for these hooks.
            let state = hook_state(id, Status::Created, pid, bundle, &plan.annotations);
            for (stage, list) in [("prestart", &hooks.prestart), ("createRuntime", &hooks.create_runtime)] {
                hooks::run(stage, list, &state).map_err(|source| ContainerError::Hook { id: id.into(), source })?;
            }
            let mut go = fs::File::from(go);
            go.write_all(b"G").map_err(io_err("signal", Path::new("container init")))?;
            // The init's own hooks (createContainer, startContainer) read the state from here.
            if hooks.in_container() {
                go.write_all(&state).map_err(io_err("signal", Path::new("container init")))?;
            }
        } else {
            let mut go = fs::File::from(go);
            go.write_all(b"G").map_err(io_err("signal", Path::new("container init")))?;
        }
        let mut report = fs::File::from(report);
        let mut first = [0u8; 1];
        match report.read(&mut first) {
            Ok(1) if first[0] == b'R' => Ok(()),
            Ok(1) if first[0] == b'E' => {
                let mut message = String::new();
                let _ = report.read_to_string(&mut message);
                Err(ContainerError::Init { id: id.into(), message })
            }
            Ok(_) => Err(ContainerError::Init { id: id.into(), message: "init exited without reporting".into() }),
            Err(e) => Err(ContainerError::Init { id: id.into(), message: format!("reading init's report: {e}") }),
        }
    }

    /// Current status, from the init process and the exec fifo.
    pub fn status(&self, record: &ContainerRecord) -> Status {
        if !same_process(record.pid, record.pid_start) {
            Status::Stopped
        } else if self.state_dir(&record.id).join("exec.fifo").exists() {
            Status::Created
        } else if Self::cgroup_manager(record).is_ok_and(|c| c.is_frozen()) {
            Status::Paused
        } else {
            Status::Running
        }
    }

    /// Freezes every process of a running container (`pause`).
    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        self.set_frozen(id, true)
    }

    /// Thaws a paused container (`resume`).
    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        self.set_frozen(id, false)
    }

    fn set_frozen(&self, id: &str, frozen: bool) -> Result<(), ContainerError> {
        let record = self.record(id)?;
        let status = self.status(&record);
        let (from, expected) = if frozen { (Status::Running, "running") } else { (Status::Paused, "paused") };
        if status != from {
            return Err(ContainerError::WrongStatus { id: id.into(), status, expected });
        }
        Ok(Self::cgroup_manager(&record)?.set_frozen(frozen)?)
    }

    /// Every container under the state root, by id (unreadable entries are skipped).
    pub fn list(&self) -> Result<Vec<(ContainerRecord, Status)>, ContainerError> {
        let root = &self.config.state_root;
        let entries = match fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ContainerError::Io { action: "read", path: root.clone(), source: e }),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else { continue };
            if let Ok(record) = self.record(&id) {
                let status = self.status(&record);
                out.push((record, status));
            }
        }
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ok(out)
    }

    /// The pids (host namespace) of a container's processes.
    pub fn processes(&self, id: &str) -> Result<Vec<i32>, ContainerError> {
        let record = self.record(id)?;
        Ok(Self::cgroup_manager(&record)?.procs()?)
    }

    /// Changes the limits of a created, running or paused container.
    pub fn update(&self, id: &str, resources: &super::cgroup::Resources) -> Result<(), ContainerError> {
        let record = self.record(id)?;
        let status = self.status(&record);
        if status == Status::Stopped {
            return Err(ContainerError::WrongStatus { id: id.into(), status, expected: "created, running or paused" });
        }
        let cgroups = Self::cgroup_manager(&record)?;
        let needed = resources.extra_controllers();
        if let Some(missing) = needed.iter().find(|c| !record.cgroup_controllers().contains(c)) {
            return Err(CgroupError::MissingController(
                "this update (the container did not join it at create)",
                if missing == "devices" { "devices" } else { "cpuset" },
            )
            .into());
        }
        Ok(cgroups.apply(resources)?)
    }

    /// A container's usage figures.
    pub fn stats(&self, id: &str) -> Result<super::cgroup::Stats, ContainerError> {
        let record = self.record(id)?;
        Ok(Self::cgroup_manager(&record)?.stats())
    }

    /// Lets a created container exec its program.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let record = self.record(id)?;
        let status = self.status(&record);
        if status != Status::Created {
            return Err(ContainerError::WrongStatus { id: id.into(), status, expected: "created" });
        }
        let fifo = self.state_dir(id).join("exec.fifo");
        // Non-blocking: with no reader left (init died) this fails with ENXIO instead of
        // waiting forever.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&fifo)
            .map_err(io_err("open", &fifo))?;
        let exe = PathBuf::from(format!("/proc/{}/exe", record.pid));
        let runtime_exe = if record.hooks.poststart.is_empty() { None } else { fs::read_link(&exe).ok() };
        f.write_all(b"S").map_err(io_err("write", &fifo))?;
        fs::remove_file(&fifo).map_err(io_err("remove", &fifo))?;
        if !record.hooks.poststart.is_empty() {
            // Poststart hooks run once the program is executing: wait (briefly) until the init
            // is no longer this runtime's binary.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while runtime_exe.is_some()
                && same_process(record.pid, record.pid_start)
                && fs::read_link(&exe).ok() == runtime_exe
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(500));
            }
            let state = hook_state(id, Status::Running, record.pid, &record.bundle, &record.annotations);
            for failure in hooks::run_all("poststart", &record.hooks.poststart, &state) {
                warn(failure);
            }
        }
        Ok(())
    }

    pub fn state(&self, id: &str) -> Result<OciState, ContainerError> {
        let record = self.record(id)?;
        let status = self.status(&record);
        Ok(OciState {
            oci_version: "1.0.2".into(),
            id: record.id,
            status,
            pid: if status == Status::Stopped { 0 } else { record.pid },
            bundle: record.bundle,
            annotations: record.annotations,
        })
    }

    /// Sends `signal` to the container's init, or with `all` to every process of its cgroup.
    pub fn kill(&self, id: &str, signal: Signal, all: bool) -> Result<(), ContainerError> {
        let record = self.record(id)?;
        let status = self.status(&record);
        if status == Status::Stopped {
            return Err(ContainerError::WrongStatus { id: id.into(), status, expected: "created or running" });
        }
        if all {
            for pid in Self::cgroup_manager(&record)?.procs()? {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
            Ok(())
        } else {
            nix::sys::signal::kill(Pid::from_raw(record.pid), signal)
                .map_err(sys_err(format!("signalling container {id} ({})", record.pid)))
        }
    }

    /// Whether the OOM killer struck in the container's cgroup.
    pub fn oom_killed(&self, id: &str) -> Result<bool, ContainerError> {
        let record = self.record(id)?;
        Ok(Self::cgroup_manager(&record)?.oom_killed()?)
    }

    /// Removes a stopped container (with `force`, kills it first): its processes, cgroups,
    /// owned mounts and state directory.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let record = self.record(id)?;
        let status = self.status(&record);
        if status != Status::Stopped && !force {
            return Err(ContainerError::WrongStatus { id: id.into(), status, expected: "stopped (or use force)" });
        }
        if status != Status::Stopped {
            let _ = nix::sys::signal::kill(Pid::from_raw(record.pid), Signal::SIGKILL);
        }
        let cgroups = Self::cgroup_manager(&record)?;
        if status == Status::Paused {
            // Frozen processes cannot die: thaw them after the kill is queued.
            cgroups.set_frozen(false)?;
        }
        cgroups.destroy(DELETE_TIMEOUT)?;
        // A shim writes exit.json once its container is gone; let it finish first.
        if let (Some(pid), Some(start)) = (record.shim_pid, record.shim_start) {
            let deadline = std::time::Instant::now() + DELETE_TIMEOUT;
            while same_process(pid, start) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // Reap the init if it is our child (it is when create ran in this process).
        let _ = waitpid(Pid::from_raw(record.pid), Some(WaitPidFlag::WNOHANG));
        for m in &record.owned_mounts {
            super::overlay::unmount(m).map_err(|e| ContainerError::Io {
                action: "unmount",
                path: m.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        }
        let dir = self.state_dir(id);
        fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
        if !record.hooks.poststop.is_empty() {
            let state = hook_state(id, Status::Stopped, 0, &record.bundle, &record.annotations);
            for failure in hooks::run_all("poststop", &record.hooks.poststop, &state) {
                warn(failure);
            }
        }
        Ok(())
    }

    /// Creates, starts and waits for a container in this process, then deletes it.
    pub fn run(&self, id: &str, bundle: &Path, options: CreateOptions<'_>) -> Result<ExitInfo, ContainerError> {
        let created = self.create(id, bundle, options)?;
        if let Err(e) = self.start(id) {
            let _ = self.delete(id, true);
            return Err(e);
        }
        let exit = self.wait_child(id, created.pid);
        let deleted = self.delete(id, true);
        let exit = exit?;
        deleted?;
        Ok(exit)
    }

    /// Waits for the init of a container created by this process and reads the OOM state.
    pub fn wait_child(&self, id: &str, pid: i32) -> Result<ExitInfo, ContainerError> {
        let status = loop {
            match waitpid(Pid::from_raw(pid), None) {
                Err(nix::Error::EINTR) => continue,
                other => break other.map_err(sys_err(format!("waiting for container {id} ({pid})")))?,
            }
        };
        let (code, signal) = match status {
            WaitStatus::Exited(_, code) => (code, None),
            WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
            // Only exits and deaths are reported without WUNTRACED/WCONTINUED.
            _ => (128, None),
        };
        let oom_killed = self.oom_killed(id).unwrap_or(false);
        Ok(ExitInfo { code, signal, oom_killed, finished_at: rfc3339(SystemTime::now()), pid: Some(pid) })
    }
}

/// Sends `signal` to a process (for callers forwarding signals to a container they run).
pub fn signal_process(pid: i32, signal: Signal) -> Result<(), ContainerError> {
    nix::sys::signal::kill(Pid::from_raw(pid), signal).map_err(sys_err(format!("signalling process {pid}")))
}

/// Writes a state file (`state.json`, `exit.json`) with the crate's one durability level.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ContainerError> {
    Ok(crate::durable::write_atomic(path, data)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("web-1.a_b").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "-x", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }
}
