//! Cgroups for containers: one [`CgroupManager`] trait with a v1 backend (one directory per
//! controller) and a v2 backend (one unified directory), chosen by [`AnyCgroupManager::new`]
//! from the filesystem at the configured root. It owns the container's cgroup directories:
//! creating them, writing limits (memory with swap pinned to memory, CPU quota/period and
//! shares/weight, pids.max), adding the init process, reading the OOM-kill counter, killing
//! what is left and removing the directories. It never touches a cgroup outside the
//! container's own path, and it takes the root from its caller (tests point it at a temp dir).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("cgroup path {0:?} must be relative and must not contain '..'")]
    BadPath(PathBuf),
    #[error("cgroup {0} still has processes after {1:?}")]
    Busy(PathBuf, Duration),
    #[error("{0} is not supported on cgroup {1}")]
    Unsupported(&'static str, &'static str),
    #[error("{0} needs the v1 {1} controller, which this host does not mount")]
    MissingController(&'static str, &'static str),
    #[error("cgroup controller {0:?} is not one a container can join")]
    UnknownController(String),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError + use<> {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { action, path, source }
}

/// Which cgroup hierarchy to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// v2 when the root is a cgroup2 mount, v1 otherwise.
    #[default]
    Auto,
    V1,
    V2,
}

/// Where cgroups live: `root` is the cgroup filesystem mount (`/sys/fs/cgroup`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupConfig {
    pub root: PathBuf,
    pub version: CgroupVersion,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig { root: PathBuf::from("/sys/fs/cgroup"), version: CgroupVersion::Auto }
    }
}

/// The limits the executor applies. `None` leaves the kernel default (unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_bytes: Option<i64>,
    /// Memory plus swap; the executor sets it equal to `memory_bytes` so the limit is real.
    pub memory_swap_bytes: Option<i64>,
    /// Soft limit: v1 `memory.soft_limit_in_bytes`, v2 `memory.low`.
    pub memory_reservation: Option<i64>,
    /// v1 only (`memory.swappiness`).
    pub memory_swappiness: Option<u64>,
    /// v1 only (`memory.kmem.tcp.limit_in_bytes`).
    pub memory_kernel_tcp: Option<i64>,
    /// v1 only: processes wait for memory instead of being OOM-killed (`memory.oom_control`).
    pub disable_oom_killer: bool,
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    /// v1 only: real-time scheduling budget (`cpu.rt_runtime_us`, `cpu.rt_period_us`).
    pub cpu_realtime_runtime: Option<i64>,
    pub cpu_realtime_period: Option<u64>,
    /// CPUs and memory nodes, in the kernel's list syntax (`0-1,3`).
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub pids_max: Option<i64>,
    /// Device access rules in the spec's order (v1 only; v2 would need an eBPF program).
    /// When there are any, `device_nodes` are allowed after them: the executor's default
    /// device nodes and the spec's `linux.devices`, as runc and crun allow them.
    pub device_rules: Vec<DeviceRule>,
    pub device_nodes: Vec<DeviceRule>,
}

impl Resources {
    /// The v1 controllers these resources need beyond memory, cpu, cpuacct and pids.
    pub fn extra_controllers(&self) -> Vec<String> {
        let mut extra = Vec::new();
        if !self.device_rules.is_empty() {
            extra.push("devices".to_string());
        }
        if self.cpuset_cpus.is_some() || self.cpuset_mems.is_some() {
            extra.push("cpuset".to_string());
        }
        extra
    }
}

/// A container's usage, as `events --stats` reports it (None where the host lacks the file).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub memory_usage_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub cpu_usage_nanos: Option<u64>,
    pub pids_current: Option<u64>,
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`usage_usec 123`).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls until `done` holds, for freezer state changes (the kernel settles them quickly).
fn wait_until(what: &Path, done: impl Fn() -> bool) -> Result<(), CgroupError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() > deadline {
            return Err(CgroupError::Busy(what.to_path_buf(), Duration::from_secs(10)));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// One device cgroup rule: `kind` is `a` (all), `c` or `b`; `None` numbers match any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    pub kind: char,
    pub major: Option<i64>,
    pub minor: Option<i64>,
    pub access: String,
}

impl DeviceRule {
    /// The rule as v1 `devices.allow`/`devices.deny` take it: `c 1:3 rwm`, `a *:* rwm`.
    pub fn v1_line(&self) -> String {
        let num = |n: Option<i64>| n.map_or("*".to_string(), |n| n.to_string());
        format!("{} {}:{} {}", self.kind, num(self.major), num(self.minor), self.access)
    }
}

/// The operations the executor needs from a cgroup backend.
pub trait CgroupManager {
    /// Creates the container's directories (parents included) and enables controllers.
    fn create(&self) -> Result<(), CgroupError>;
    fn apply(&self, resources: &Resources) -> Result<(), CgroupError>;
    fn add_process(&self, pid: i32) -> Result<(), CgroupError>;
    /// Pids in the container's cgroup (empty when it does not exist).
    fn procs(&self) -> Result<Vec<i32>, CgroupError>;
    /// Whether the kernel OOM killer killed a process of this cgroup.
    fn oom_killed(&self) -> Result<bool, CgroupError>;
    /// Removes the directories; a missing directory is not an error.
    fn remove(&self) -> Result<(), CgroupError>;
    /// Directories this manager owns, for reporting and tests.
    fn paths(&self) -> Vec<PathBuf>;
    /// Freezes (or thaws) every process of the cgroup and waits until the kernel says so.
    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError>;
    /// Whether the cgroup is frozen (false without a freezer).
    fn is_frozen(&self) -> bool;
    /// Usage figures: memory bytes, CPU nanoseconds, processes.
    fn stats(&self) -> Stats;

    /// Files a new process can write `0` into to move itself (its only thread) into the
    /// cgroup. On v1 that skips the global threadgroup lock whose RCU grace period makes a
    /// `cgroup.procs` write by pid cost ~10 ms; empty when the backend has no such path.
    fn self_attach_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Sends SIGKILL to every process until the cgroup is empty, then removes it.
    fn destroy(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            let procs = self.procs()?;
            if procs.is_empty() {
                break;
            }
            for pid in procs {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Busy(self.paths().into_iter().next().unwrap_or_default(), timeout));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // An emptied cgroup can stay busy for a moment while the last task finishes exiting.
        loop {
            match self.remove() {
                Err(CgroupError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => return other,
            }
        }
    }
}

fn check_relative(path: &Path) -> Result<PathBuf, CgroupError> {
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::RootDir | Component::CurDir => {}
            _ => return Err(CgroupError::BadPath(path.to_path_buf())),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(CgroupError::BadPath(path.to_path_buf()));
    }
    Ok(clean)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err("write", path))
}

fn read_procs(file: &Path) -> Result<Vec<i32>, CgroupError> {
    match fs::read_to_string(file) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(CgroupError::Io { action: "read", path: file.to_path_buf(), source: e }),
    }
}

/// The `oom_kill N` counter of a flat-keyed cgroup file (v1 memory.oom_control, v2
/// memory.events).
fn oom_kill_count(file: &Path) -> Result<u64, CgroupError> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(CgroupError::Io { action: "read", path: file.to_path_buf(), source: e }),
    };
    Ok(text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())).unwrap_or(0))
}

fn rmdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(CgroupError::Io { action: "remove", path: dir.into(), source: e })
        }
        _ => Ok(()),
    }
}

/// cgroup v1: a directory per controller under `<root>/<controller>/<path>`.
#[derive(Debug, Clone)]
pub struct V1Manager {
    root: PathBuf,
    path: PathBuf,
    /// Controllers joined beyond [`V1_CONTROLLERS`] (see [`Resources::extra_controllers`]).
    extra: Vec<String>,
}

/// The v1 controllers every container joins (those mounted under the root).
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids"];

/// Controllers a container joins when its resources need them (each costs a directory and
/// an attach at start). The freezer is joined only by `pause` (see `set_frozen`).
const V1_OPTIONAL_CONTROLLERS: &[&str] = &["devices", "cpuset"];

/// Default device nodes, as v1 `devices.allow` rules: null, zero, full, tty, random, urandom,
/// ptmx and the devpts slaves.
const V1_DEFAULT_DEVICES: &[&str] =
    &["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 5:2 rwm", "c 136:* rwm"];

impl V1Manager {
    /// `extra` names optional controllers to join (`devices`, `cpuset`); others are refused.
    pub fn new(root: &Path, path: &Path, extra: &[String]) -> Result<Self, CgroupError> {
        let mut joined = Vec::new();
        for c in extra {
            let Some(known) = V1_OPTIONAL_CONTROLLERS.iter().find(|k| **k == c) else {
                return Err(CgroupError::UnknownController(c.clone()));
            };
            if !joined.iter().any(|j: &String| j == known) {
                joined.push(known.to_string());
            }
        }
        Ok(V1Manager { root: root.to_path_buf(), path: check_relative(path)?, extra: joined })
    }

    fn controllers(&self) -> impl Iterator<Item = &str> + '_ {
        V1_CONTROLLERS
            .iter()
            .copied()
            .chain(self.extra.iter().map(String::as_str))
            .filter(|c| self.root.join(c).is_dir())
    }

    fn joins(&self, controller: &str) -> bool {
        self.extra.iter().any(|c| c == controller) && self.root.join(controller).is_dir()
    }

    fn dir(&self, controller: &str) -> PathBuf {
        self.root.join(controller).join(&self.path)
    }

    /// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and no process can
    /// join it until it has some: each level created inherits its parent's.
    fn create_cpuset(&self) -> Result<(), CgroupError> {
        let mut dir = self.root.join("cpuset");
        for component in self.path.components() {
            let parent = dir.clone();
            dir.push(component);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(CgroupError::Io { action: "create", path: dir, source: e }),
            }
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let current = fs::read_to_string(dir.join(file)).unwrap_or_default();
                if current.trim().is_empty() {
                    let from = parent.join(file);
                    let value = fs::read_to_string(&from).map_err(io_err("read", &from))?;
                    write(&dir.join(file), value.trim())?;
                }
            }
        }
        Ok(())
    }
}

impl CgroupManager for V1Manager {
    fn create(&self) -> Result<(), CgroupError> {
        for c in self.controllers() {
            if c == "cpuset" {
                self.create_cpuset()?;
                continue;
            }
            let dir = self.dir(c);
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        Ok(())
    }

    fn apply(&self, r: &Resources) -> Result<(), CgroupError> {
        let mem = self.dir("memory");
        if let Some(limit) = r.memory_bytes {
            write(&mem.join("memory.limit_in_bytes"), &limit.to_string())?;
        }
        if let Some(swap) = r.memory_swap_bytes {
            // memsw exists only with swap accounting; without it there is no swap to limit.
            let memsw = mem.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &swap.to_string())?;
            }
        }
        let cpu = self.dir("cpu");
        if let Some(shares) = r.cpu_shares {
            write(&cpu.join("cpu.shares"), &shares.to_string())?;
        }
        if let Some(period) = r.cpu_period {
            write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
        }
        if let Some(quota) = r.cpu_quota {
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        if let Some(max) = r.pids_max {
            let value = if max <= 0 { "max".to_string() } else { max.to_string() };
            write(&self.dir("pids").join("pids.max"), &value)?;
        }
        if let Some(soft) = r.memory_reservation {
            write(&mem.join("memory.soft_limit_in_bytes"), &soft.to_string())?;
        }
        if let Some(swappiness) = r.memory_swappiness {
            write(&mem.join("memory.swappiness"), &swappiness.to_string())?;
        }
        if let Some(tcp) = r.memory_kernel_tcp {
            write(&mem.join("memory.kmem.tcp.limit_in_bytes"), &tcp.to_string())?;
        }
        if r.disable_oom_killer {
            write(&mem.join("memory.oom_control"), "1")?;
        }
        // The period first: the kernel checks runtime <= period.
        if let Some(period) = r.cpu_realtime_period {
            write(&cpu.join("cpu.rt_period_us"), &period.to_string())?;
        }
        if let Some(runtime) = r.cpu_realtime_runtime {
            write(&cpu.join("cpu.rt_runtime_us"), &runtime.to_string())?;
        }
        if r.cpuset_cpus.is_some() || r.cpuset_mems.is_some() {
            if !self.joins("cpuset") {
                return Err(CgroupError::MissingController("linux.resources.cpu.cpus/mems", "cpuset"));
            }
            let dir = self.dir("cpuset");
            if let Some(cpus) = &r.cpuset_cpus {
                write(&dir.join("cpuset.cpus"), cpus)?;
            }
            if let Some(mems) = &r.cpuset_mems {
                write(&dir.join("cpuset.mems"), mems)?;
            }
        }
        if !r.device_rules.is_empty() {
            if !self.joins("devices") {
                return Err(CgroupError::MissingController("linux.resources.devices", "devices"));
            }
            let dev = self.dir("devices");
            for rule in r.device_rules.iter().chain(&r.device_nodes) {
                let file = if rule.allow { "devices.allow" } else { "devices.deny" };
                write(&dev.join(file), &rule.v1_line())?;
            }
            for rule in V1_DEFAULT_DEVICES {
                write(&dev.join("devices.allow"), rule)?;
            }
        }
        Ok(())
    }

    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for c in self.controllers() {
            write(&self.dir(c).join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        let mut all = Vec::new();
        for c in self.controllers() {
            for pid in read_procs(&self.dir(c).join("cgroup.procs"))? {
                if !all.contains(&pid) {
                    all.push(pid);
                }
            }
        }
        Ok(all)
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        Ok(oom_kill_count(&self.dir("memory").join("memory.oom_control"))? > 0)
    }

    fn remove(&self) -> Result<(), CgroupError> {
        for c in self.controllers() {
            rmdir(&self.dir(c))?;
        }
        // Made by a pause, if there was one.
        rmdir(&self.dir("freezer"))
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.controllers().map(|c| self.dir(c)).collect()
    }

    /// Pausing moves the container's processes into a freezer cgroup of its own, made then:
    /// a freezer joined at every start would cost each container a directory and an attach
    /// that only a pause needs (measured: 6 to 22 % of `flotilla oci run`'s start-to-exit).
    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        if !self.root.join("freezer").is_dir() {
            return Err(CgroupError::MissingController("pause and resume", "freezer"));
        }
        let dir = self.dir("freezer");
        let state = dir.join("freezer.state");
        if frozen {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            // A process forked while others move lands outside: go round until none is left
            // (children of moved processes are born inside).
            for _ in 0..100 {
                let inside = read_procs(&dir.join("cgroup.procs"))?;
                let outside: Vec<i32> = self.procs()?.into_iter().filter(|p| !inside.contains(p)).collect();
                if outside.is_empty() {
                    break;
                }
                for pid in outside {
                    // A process that exited meanwhile is no error (ESRCH).
                    let _ = fs::write(dir.join("cgroup.procs"), pid.to_string());
                }
            }
        } else if !state.exists() {
            return Ok(());
        }
        let want = if frozen { "FROZEN" } else { "THAWED" };
        write(&state, want)?;
        wait_until(&state, || fs::read_to_string(&state).is_ok_and(|s| s.trim() == want))
    }

    fn is_frozen(&self) -> bool {
        fs::read_to_string(self.dir("freezer").join("freezer.state")).is_ok_and(|s| s.trim() != "THAWED")
    }

    fn stats(&self) -> Stats {
        let mem = self.dir("memory");
        Stats {
            memory_usage_bytes: read_u64(&mem.join("memory.usage_in_bytes")),
            memory_limit_bytes: read_u64(&mem.join("memory.limit_in_bytes")),
            cpu_usage_nanos: read_u64(&self.dir("cpuacct").join("cpuacct.usage")),
            pids_current: read_u64(&self.dir("pids").join("pids.current")),
        }
    }

    fn self_attach_files(&self) -> Vec<PathBuf> {
        self.controllers().map(|c| self.dir(c).join("tasks")).collect()
    }
}

/// cgroup v2: one directory `<root>/<path>` with memory, cpu and pids enabled from the root
/// down.
#[derive(Debug, Clone)]
pub struct V2Manager {
    root: PathBuf,
    path: PathBuf,
    /// Enable the cpuset controller too (the spec pins CPUs or memory nodes).
    cpuset: bool,
}

impl V2Manager {
    pub fn new(root: &Path, path: &Path, extra: &[String]) -> Result<Self, CgroupError> {
        Ok(V2Manager {
            root: root.to_path_buf(),
            path: check_relative(path)?,
            cpuset: extra.iter().any(|c| c == "cpuset"),
        })
    }

    fn dir(&self) -> PathBuf {
        self.root.join(&self.path)
    }
}

/// cpu.shares (2..=262144, default 1024) to cpu.weight (1..=10000, default 100), the
/// conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

impl CgroupManager for V2Manager {
    fn create(&self) -> Result<(), CgroupError> {
        let dir = self.dir();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        // Enable the controllers in every ancestor's subtree_control, from the root down to
        // the parent of the container's directory.
        let mut parent = self.root.clone();
        for component in self.path.components() {
            let control = parent.join("cgroup.subtree_control");
            let available = fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            let wanted: Vec<String> = ["memory", "cpu", "pids"]
                .iter()
                .chain(self.cpuset.then_some(&"cpuset"))
                .filter(|c| available.split_whitespace().any(|a| a == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !wanted.is_empty() {
                write(&control, &wanted.join(" "))?;
            }
            parent.push(component);
        }
        Ok(())
    }

    fn apply(&self, r: &Resources) -> Result<(), CgroupError> {
        let dir = self.dir();
        if let Some(limit) = r.memory_bytes {
            write(&dir.join("memory.max"), &limit.to_string())?;
        }
        if let (Some(swap), Some(limit)) = (r.memory_swap_bytes, r.memory_bytes) {
            // v2 limits swap alone; memory+swap = memory means no swap at all.
            let swap_max = dir.join("memory.swap.max");
            if swap_max.exists() {
                write(&swap_max, &(swap - limit).max(0).to_string())?;
            }
        }
        if let Some(shares) = r.cpu_shares {
            write(&dir.join("cpu.weight"), &shares_to_weight(shares).to_string())?;
        }
        if r.cpu_quota.is_some() || r.cpu_period.is_some() {
            let period = r.cpu_period.unwrap_or(100_000);
            let quota = match r.cpu_quota {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
        }
        if let Some(max) = r.pids_max {
            let value = if max <= 0 { "max".to_string() } else { max.to_string() };
            write(&dir.join("pids.max"), &value)?;
        }
        if let Some(low) = r.memory_reservation {
            write(&dir.join("memory.low"), &low.to_string())?;
        }
        if let Some(cpus) = &r.cpuset_cpus {
            write(&dir.join("cpuset.cpus"), cpus)?;
        }
        if let Some(mems) = &r.cpuset_mems {
            write(&dir.join("cpuset.mems"), mems)?;
        }
        for (set, field) in [
            (r.memory_swappiness.is_some(), "linux.resources.memory.swappiness"),
            (r.memory_kernel_tcp.is_some(), "linux.resources.memory.kernelTCP"),
            (r.disable_oom_killer, "linux.resources.memory.disableOOMKiller"),
            (r.cpu_realtime_runtime.is_some() || r.cpu_realtime_period.is_some(), "linux.resources.cpu.realtime*"),
            (!r.device_rules.is_empty(), "linux.resources.devices (rules need an eBPF program)"),
        ] {
            if set {
                return Err(CgroupError::Unsupported(field, "v2"));
            }
        }
        Ok(())
    }

    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.dir().join("cgroup.procs"), &pid.to_string())
    }

    fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        read_procs(&self.dir().join("cgroup.procs"))
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        Ok(oom_kill_count(&self.dir().join("memory.events"))? > 0)
    }

    fn remove(&self) -> Result<(), CgroupError> {
        rmdir(&self.dir())
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir()]
    }

    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let dir = self.dir();
        write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
        let events = dir.join("cgroup.events");
        wait_until(&events, || read_key(&events, "frozen") == Some(u64::from(frozen)))
    }

    fn is_frozen(&self) -> bool {
        read_u64(&self.dir().join("cgroup.freeze")) == Some(1)
    }

    fn stats(&self) -> Stats {
        let dir = self.dir();
        Stats {
            memory_usage_bytes: read_u64(&dir.join("memory.current")),
            memory_limit_bytes: read_u64(&dir.join("memory.max")),
            cpu_usage_nanos: read_key(&dir.join("cpu.stat"), "usage_usec").map(|us| us * 1000),
            pids_current: read_u64(&dir.join("pids.current")),
        }
    }
}

/// Either backend, chosen once per container.
#[derive(Debug, Clone)]
pub enum AnyCgroupManager {
    V1(V1Manager),
    V2(V2Manager),
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

impl AnyCgroupManager {
    /// A manager for the container cgroup `path` (relative to the hierarchy root).
    /// `extra`: the optional v1 controllers to join ([`Resources::extra_controllers`]).
    pub fn new(config: &CgroupConfig, path: &Path, extra: &[String]) -> Result<Self, CgroupError> {
        let version = match config.version {
            CgroupVersion::Auto => {
                let fs = nix::sys::statfs::statfs(&config.root).map_err(|e| CgroupError::Io {
                    action: "statfs",
                    path: config.root.clone(),
                    source: e.into(),
                })?;
                if fs.filesystem_type().0 as i64 == CGROUP2_SUPER_MAGIC { CgroupVersion::V2 } else { CgroupVersion::V1 }
            }
            v => v,
        };
        Ok(match version {
            CgroupVersion::V2 => AnyCgroupManager::V2(V2Manager::new(&config.root, path, extra)?),
            _ => AnyCgroupManager::V1(V1Manager::new(&config.root, path, extra)?),
        })
    }

    fn inner(&self) -> &dyn CgroupManager {
        match self {
            AnyCgroupManager::V1(m) => m,
            AnyCgroupManager::V2(m) => m,
        }
    }
}

impl CgroupManager for AnyCgroupManager {
    fn create(&self) -> Result<(), CgroupError> {
        self.inner().create()
    }
    fn apply(&self, resources: &Resources) -> Result<(), CgroupError> {
        self.inner().apply(resources)
    }
    fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        self.inner().add_process(pid)
    }
    fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        self.inner().procs()
    }
    fn oom_killed(&self) -> Result<bool, CgroupError> {
        self.inner().oom_killed()
    }
    fn remove(&self) -> Result<(), CgroupError> {
        self.inner().remove()
    }
    fn paths(&self) -> Vec<PathBuf> {
        self.inner().paths()
    }
    fn self_attach_files(&self) -> Vec<PathBuf> {
        self.inner().self_attach_files()
    }
    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        self.inner().set_frozen(frozen)
    }
    fn is_frozen(&self) -> bool {
        self.inner().is_frozen()
    }
    fn stats(&self) -> Stats {
        self.inner().stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup2 tree: plain files where the kernel would have interface files.
    fn fake_v2() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids\n").unwrap();
        fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        dir
    }

    #[test]
    fn v2_writes_limits_with_swap_pinned_to_memory() {
        let root = fake_v2();
        let m = V2Manager::new(root.path(), Path::new("flotilla/c1"), &[]).unwrap();
        m.create().unwrap();
        let dir = root.path().join("flotilla/c1");
        fs::write(dir.join("memory.swap.max"), "max").unwrap();
        m.apply(&Resources {
            memory_bytes: Some(32 << 20),
            memory_swap_bytes: Some(32 << 20),
            cpu_shares: Some(1024),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            pids_max: Some(64),
            ..Default::default()
        })
        .unwrap();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), "33554432");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "39");
        assert_eq!(read("pids.max"), "64");
        assert_eq!(fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        assert!(m.oom_killed().unwrap());
        fs::write(dir.join("cgroup.procs"), "12\n13\n").unwrap();
        assert_eq!(m.procs().unwrap(), vec![12, 13]);
        let deny_all = DeviceRule { allow: false, kind: 'a', major: None, minor: None, access: "rwm".into() };
        let err = m.apply(&Resources { device_rules: vec![deny_all], ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("linux.resources.devices"), "{err}");
        let err = m.apply(&Resources { memory_swappiness: Some(10), ..Default::default() }).unwrap_err();
        assert_eq!(err.to_string(), "linux.resources.memory.swappiness is not supported on cgroup v2");
    }

    #[test]
    fn auto_detects_v1_on_a_plain_directory_and_refuses_escaping_paths() {
        let root = tempfile::tempdir().unwrap();
        let config = CgroupConfig { root: root.path().to_path_buf(), version: CgroupVersion::Auto };
        assert!(matches!(AnyCgroupManager::new(&config, Path::new("a/b"), &[]).unwrap(), AnyCgroupManager::V1(_)));
        assert!(matches!(AnyCgroupManager::new(&config, Path::new("../x"), &[]), Err(CgroupError::BadPath(_))));
        assert!(matches!(AnyCgroupManager::new(&config, Path::new("/"), &[]), Err(CgroupError::BadPath(_))));
    }

    #[test]
    fn device_rules_read_as_v1_lines_and_unknown_controllers_are_refused() {
        let rule = DeviceRule { allow: true, kind: 'c', major: Some(10), minor: None, access: "rw".into() };
        assert_eq!(rule.v1_line(), "c 10:* rw");
        let all = DeviceRule { allow: false, kind: 'a', major: None, minor: None, access: "rwm".into() };
        assert_eq!(all.v1_line(), "a *:* rwm");
        let err = V1Manager::new(Path::new("/x"), Path::new("a"), &["net_cls".to_string()]).unwrap_err();
        assert_eq!(err.to_string(), "cgroup controller \"net_cls\" is not one a container can join");
        let r = Resources { device_rules: vec![all], cpuset_cpus: Some("0".into()), ..Default::default() };
        assert_eq!(r.extra_controllers(), vec!["devices", "cpuset"]);
    }

    #[test]
    fn weight_conversion_matches_known_points() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }
}
