//! OCI runtime specs for the executor: [`default_spec`] turns a few workload inputs into a
//! complete `config.json` (Docker-like isolation), and [`load_bundle`] reads a bundle and
//! checks its spec into a [`Plan`], the resolved form the executor acts on. It owns the
//! decision of what the executor supports: every known field it cannot honour exactly —
//! AppArmor labels, time namespaces and so on — is refused with an error naming
//! it, never a panic. Properties the spec does not define are ignored, as the runtime spec
//! requires, and named in [`Plan::warnings`]; so are SELinux labels on a host without
//! SELinux (they mean nothing there, as runc and crun treat them). It performs no system
//! calls beyond reading the bundle and asking whether SELinux is enabled.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use oci_spec::runtime::{Capability, LinuxNamespaceType, PosixRlimitType, Spec};
use serde_json::{Value, json};

use super::cgroup::{DeviceRule, Resources};
use super::seccomp::{self, SeccompError, SeccompProgram};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("bundle {0} has no config.json")]
    MissingConfig(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid OCI runtime spec: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("spec field {0} is not supported by this runtime")]
    Unsupported(String),
    #[error("rootfs {0} does not exist or is not a directory")]
    MissingRootfs(PathBuf),
    #[error("spec is inconsistent: {0}")]
    Inconsistent(String),
    #[error("seccomp: {0}")]
    Seccomp(#[from] SeccompError),
    #[error("spec is inconsistent: {0}")]
    Hook(#[from] super::hooks::HookSpecError),
}

/// Network mode of a generated spec.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Own network namespace with only loopback, up.
    #[default]
    None,
    /// The host's network namespace.
    Host,
    /// The network namespace bound at this path (see [`super::netns`]), made and plumbed
    /// before the container.
    Joined(PathBuf),
}

/// A host path bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub readonly: bool,
}

/// What a workload asks for; [`default_spec`] fills in the rest.
#[derive(Debug, Clone, Default)]
pub struct SpecInputs {
    pub args: Vec<String>,
    /// `KEY=VALUE`; a PATH is added when absent.
    pub env: Vec<String>,
    /// Working directory; `/` when empty.
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub hostname: Option<String>,
    pub memory_bytes: Option<i64>,
    /// CPU limit in thousandths of a CPU (quota over a 100 ms period, and matching shares).
    pub cpu_millicores: Option<u64>,
    pub pids_limit: Option<i64>,
    pub network: NetworkMode,
    pub binds: Vec<BindMount>,
    pub readonly_rootfs: bool,
    /// Rootfs path as written into the spec (relative to the bundle); `rootfs` when empty.
    pub rootfs: String,
    /// Run in a user namespace mapping container root to this host uid/gid range start
    /// (65536 ids).
    pub user_namespace: Option<(u32, u32)>,
}

/// Docker's default capability set minus CAP_MKNOD: without a devices cgroup (cgroup v2
/// needs eBPF for it) MKNOD would let root in the container create block devices for the
/// host's disks.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// /proc and /sys paths hidden from the container (Docker's list).
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

pub const DEFAULT_READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

const CPU_PERIOD_US: u64 = 100_000;

/// Builds a complete spec from workload inputs.
pub fn default_spec(inputs: &SpecInputs) -> Result<Spec, SpecError> {
    if inputs.args.is_empty() {
        return Err(SpecError::Inconsistent("process args are empty".into()));
    }
    let mut env = inputs.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "mount"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "cgroup"}),
    ];
    match &inputs.network {
        NetworkMode::None => namespaces.push(json!({"type": "network"})),
        NetworkMode::Joined(path) => namespaces.push(json!({"type": "network", "path": path})),
        NetworkMode::Host => {}
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    let mut linux = json!({
        "namespaces": namespaces,
        "maskedPaths": DEFAULT_MASKED_PATHS,
        "readonlyPaths": DEFAULT_READONLY_PATHS,
        "seccomp": seccomp::default_profile(),
    });
    if let Some((uid, gid)) = inputs.user_namespace {
        if let Some(ns) = linux["namespaces"].as_array_mut() {
            ns.push(json!({"type": "user"}));
        }
        linux["uidMappings"] = json!([{"containerID": 0, "hostID": uid, "size": 65536}]);
        linux["gidMappings"] = json!([{"containerID": 0, "hostID": gid, "size": 65536}]);
        // A user namespace may not mount sysfs for a network namespace it does not own, and
        // mqueue needs its own ipc namespace owned by it; bind the host's read-only instead.
        if inputs.network != NetworkMode::None {
            mounts[5] = json!({"destination": "/sys", "type": "bind", "source": "/sys",
                               "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]});
        }
    }
    for b in &inputs.binds {
        let mut options = vec!["rbind", "nosuid", "nodev"];
        // Read-only all the way down: a host path's submounts (its /proc, /sys, cgroups when
        // the path is `/`) are read-only too.
        options.extend(if b.readonly { ["ro", "rro"].as_slice() } else { ["rw"].as_slice() });
        mounts.push(json!({"destination": b.destination, "type": "bind", "source": b.source, "options": options}));
    }
    let mut resources = serde_json::Map::new();
    if let Some(m) = inputs.memory_bytes {
        resources.insert("memory".into(), json!({"limit": m, "swap": m}));
    }
    if let Some(mc) = inputs.cpu_millicores {
        let quota = (mc * CPU_PERIOD_US / 1000).max(1000);
        let shares = (mc * 1024 / 1000).max(2);
        resources.insert("cpu".into(), json!({"quota": quota, "period": CPU_PERIOD_US, "shares": shares}));
    }
    if let Some(p) = inputs.pids_limit {
        resources.insert("pids".into(), json!({"limit": p}));
    }
    if !resources.is_empty() {
        linux["resources"] = Value::Object(resources);
    }
    let caps = DEFAULT_CAPABILITIES;
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": inputs.uid, "gid": inputs.gid, "additionalGids": inputs.additional_gids},
            "args": inputs.args,
            "env": env,
            "cwd": if inputs.cwd.is_empty() { "/" } else { inputs.cwd.as_str() },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": if inputs.rootfs.is_empty() { "rootfs" } else { inputs.rootfs.as_str() },
                 "readonly": inputs.readonly_rootfs},
        "hostname": inputs.hostname.clone().unwrap_or_else(|| "flotilla".into()),
        "mounts": mounts,
        "linux": linux,
    });
    serde_json::from_value(spec)
        .map_err(|e| SpecError::Invalid { path: "generated spec".into(), message: e.to_string() })
}

/// One mount as the executor performs it.
#[derive(Debug, Clone)]
pub(crate) struct MountPlan {
    pub destination: PathBuf,
    pub fstype: String,
    pub source: Option<PathBuf>,
    pub flags: MsFlags,
    pub data: String,
    pub bind: bool,
    /// Propagation to set after mounting (MS_PRIVATE, MS_SLAVE, … with MS_REC).
    pub propagation: MsFlags,
    /// `rro` (runtime-spec 1.1): read-only through every mount below the destination too
    /// (`mount_setattr` with `AT_RECURSIVE`); plain `ro` leaves the submounts of an `rbind`
    /// (a host's /proc, /sys, cgroups under `/`) writable.
    pub recursive_readonly: bool,
}

/// A device node to create under /dev.
#[derive(Debug, Clone)]
pub(crate) struct DevicePlan {
    pub path: PathBuf,
    pub kind: nix::sys::stat::SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Capability sets as bit masks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// A bundle's spec, checked and resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) bundle: PathBuf,
    pub(crate) rootfs: PathBuf,
    pub(crate) readonly_rootfs: bool,
    pub(crate) rootfs_propagation: MsFlags,
    /// CLONE_NEW* flags for the clone itself (the cgroup namespace is entered later).
    pub(crate) clone_flags: CloneFlags,
    pub(crate) cgroup_ns: bool,
    /// Namespaces the init joins by path (a user namespace first).
    pub(crate) join_namespaces: Vec<(CloneFlags, PathBuf)>,
    /// A pid namespace the runtime enters before cloning the init into it.
    pub(crate) join_pid: Option<PathBuf>,
    pub(crate) uid_map: String,
    pub(crate) gid_map: String,
    pub(crate) mounts: Vec<MountPlan>,
    pub(crate) devices: Vec<DevicePlan>,
    pub(crate) masked_paths: Vec<PathBuf>,
    pub(crate) readonly_paths: Vec<PathBuf>,
    pub(crate) hostname: Option<String>,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<String>,
    pub(crate) cwd: PathBuf,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) additional_gids: Vec<u32>,
    pub(crate) umask: Option<u32>,
    pub(crate) caps: Option<CapSets>,
    pub(crate) no_new_privs: bool,
    pub(crate) rlimits: Vec<(nix::sys::resource::Resource, u64, u64)>,
    pub(crate) oom_score_adj: Option<i32>,
    pub(crate) seccomp: Option<SeccompProgram>,
    pub(crate) sysctl: Vec<(String, String)>,
    pub(crate) resources: Resources,
    pub(crate) cgroups_path: Option<PathBuf>,
    pub(crate) annotations: std::collections::BTreeMap<String, String>,
    pub(crate) warnings: Vec<String>,
    pub(crate) hooks: super::hooks::Hooks,
    /// The process gets a new pseudo-terminal as its stdio and controlling terminal; its
    /// master goes to the caller's console socket.
    pub(crate) terminal: bool,
    /// Rows and columns for that terminal.
    pub(crate) console_size: Option<(u16, u16)>,
}

impl Plan {
    /// What the spec held that the runtime ignored, one sentence each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether the spec asks for a terminal (`process.terminal`), which needs a console
    /// socket from the caller.
    pub fn terminal(&self) -> bool {
        self.terminal
    }

    /// Whether the container gets its own network namespace (the hook point for bridged
    /// networking: the parent sees the child's pid before the container continues).
    pub fn has_network_namespace(&self) -> bool {
        self.clone_flags.contains(CloneFlags::CLONE_NEWNET)
            || self.join_namespaces.iter().any(|(f, _)| *f == CloneFlags::CLONE_NEWNET)
    }
}

/// Reads `<bundle>/config.json` and checks it into a [`Plan`].
pub fn load_bundle(bundle: &Path) -> Result<Plan, SpecError> {
    let path = bundle.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SpecError::MissingConfig(bundle.into())),
        Err(e) => return Err(SpecError::Read { path, source: e }),
    };
    let raw: Value =
        serde_json::from_str(&text).map_err(|e| SpecError::Invalid { path: path.clone(), message: e.to_string() })?;
    let spec: Spec = serde_json::from_value(raw.clone())
        .map_err(|e| SpecError::Invalid { path: path.clone(), message: e.to_string() })?;
    let parsed = serde_json::to_value(&spec).map_err(|e| SpecError::Invalid { path, message: e.to_string() })?;
    let mut unknown = Vec::new();
    find_unknown(&raw, &parsed, "", &mut unknown);
    let mut plan = plan(bundle, &spec, selinux_enabled())?;
    let mut warnings: Vec<String> =
        unknown.into_iter().map(|f| format!("spec field {f} is not known to this runtime; ignored")).collect();
    warnings.append(&mut plan.warnings);
    plan.warnings = warnings;
    Ok(plan)
}

/// Whether the host enforces or audits SELinux labels (selinuxfs is mounted).
fn selinux_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// Collects the keys of `raw` that did not survive parsing into the typed spec (serde drops
/// unknown fields silently); the runtime spec says to ignore them, and the caller says so.
/// Annotations are free-form and skipped.
fn find_unknown(raw: &Value, parsed: &Value, at: &str, unknown: &mut Vec<String>) {
    match (raw, parsed) {
        (Value::Object(r), Value::Object(p)) => {
            if at == ".annotations" {
                return;
            }
            for (k, v) in r {
                let here = format!("{at}.{k}");
                match p.get(k) {
                    Some(pv) => find_unknown(v, pv, &here, unknown),
                    // Explicit nulls and empty containers may be dropped when serialized back.
                    None if v.is_null() || v == &json!({}) || v == &json!([]) => {}
                    None => unknown.push(here.trim_start_matches('.').to_string()),
                }
            }
        }
        (Value::Array(r), Value::Array(p)) => {
            for (i, (rv, pv)) in r.iter().zip(p).enumerate() {
                find_unknown(rv, pv, &format!("{at}[{i}]"), unknown);
            }
        }
        _ => {}
    }
}

fn unsupported<T>(field: &str, value: &Option<T>) -> Result<(), SpecError> {
    if value.is_some() { Err(SpecError::Unsupported(field.into())) } else { Ok(()) }
}

/// Capability names this runtime knows, in kernel order (the index is the number).
pub const KNOWN_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub(crate) fn cap_number(cap: &Capability) -> Result<u32, SpecError> {
    let name = serde_json::to_value(cap).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    KNOWN_CAPABILITIES
        .iter()
        .position(|n| *n == name)
        .map(|p| p as u32)
        .ok_or_else(|| SpecError::Unsupported(format!("process.capabilities {name}")))
}

fn cap_mask(set: &Option<HashSet<Capability>>) -> Result<u64, SpecError> {
    let mut mask = 0u64;
    for cap in set.iter().flatten() {
        mask |= 1u64 << cap_number(cap)?;
    }
    Ok(mask)
}

fn rlimit_resource(t: PosixRlimitType) -> Result<nix::sys::resource::Resource, SpecError> {
    use nix::sys::resource::Resource as R;
    Ok(match t {
        PosixRlimitType::RlimitCpu => R::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => R::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => R::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => R::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => R::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => R::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => R::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => R::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => R::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => R::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => R::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => R::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => R::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => R::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => R::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => R::RLIMIT_RTTIME,
    })
}

/// A mount's options, parsed.
#[derive(Debug, PartialEq, Eq)]
struct MountOptions {
    flags: MsFlags,
    bind: bool,
    propagation: MsFlags,
    /// What the filesystem gets as data: the options that are not flags.
    data: String,
    recursive_readonly: bool,
}

/// Mount options: flags to set, flags to clear, propagation, and the rest as fs data.
fn parse_mount_options(options: &[String]) -> Result<MountOptions, SpecError> {
    let mut recursive_readonly = false;
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut bind = false;
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "rro" => {
                recursive_readonly = true;
                (MsFlags::MS_RDONLY, MsFlags::empty())
            }
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => {
                bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable" => {
                propagation = propagation_flags(o)?;
                continue;
            }
            other => {
                if other.contains(',') {
                    return Err(SpecError::Inconsistent(format!("mount option {other:?} contains a comma")));
                }
                data.push(other.to_string());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    Ok(MountOptions { flags, bind, propagation, data: data.join(","), recursive_readonly })
}

fn propagation_flags(name: &str) -> Result<MsFlags, SpecError> {
    Ok(match name {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        other => return Err(SpecError::Unsupported(format!("linux.rootfsPropagation {other:?}"))),
    })
}

fn id_map(maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>) -> String {
    maps.iter().flatten().map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size())).collect()
}

fn default_devices() -> Vec<DevicePlan> {
    use nix::sys::stat::SFlag;
    [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
        .into_iter()
        .map(|(name, major, minor)| DevicePlan {
            path: PathBuf::from("/dev").join(name),
            kind: SFlag::S_IFCHR,
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        })
        .collect()
}

/// `linux.resources` given as JSON (what `update --resources` reads), checked.
pub fn resources_from_json(text: &str) -> Result<Resources, SpecError> {
    let res: oci_spec::runtime::LinuxResources = serde_json::from_str(text)
        .map_err(|e| SpecError::Invalid { path: "resources".into(), message: e.to_string() })?;
    resources_from_spec(&res)
}

/// `linux.resources` as the cgroup managers apply them (also what `update` takes).
pub fn resources_from_spec(res: &oci_spec::runtime::LinuxResources) -> Result<Resources, SpecError> {
    let mut resources = Resources::default();
    unsupported("linux.resources.blockIO", res.block_io())?;
    unsupported("linux.resources.hugepageLimits", res.hugepage_limits())?;
    unsupported("linux.resources.network", res.network())?;
    unsupported("linux.resources.rdma", res.rdma())?;
    unsupported("linux.resources.unified", res.unified())?;
    for rule in res.devices().iter().flatten() {
        use oci_spec::runtime::LinuxDeviceType as T;
        let kind = match rule.typ() {
            None | Some(T::A) => 'a',
            Some(T::C) => 'c',
            Some(T::B) => 'b',
            Some(other) => {
                return Err(SpecError::Inconsistent(format!(
                    "linux.resources.devices type {other:?} is not a, c or b"
                )));
            }
        };
        let access = rule.access().clone().unwrap_or_else(|| "rwm".into());
        if access.is_empty() || !access.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
            return Err(SpecError::Inconsistent(format!(
                "linux.resources.devices access {access:?} is not made of r, w and m"
            )));
        }
        resources.device_rules.push(DeviceRule {
            allow: rule.allow(),
            kind,
            major: rule.major(),
            minor: rule.minor(),
            access,
        });
    }
    if let Some(mem) = res.memory() {
        #[allow(deprecated)]
        let kernel = mem.kernel();
        // Kernel memory limits were removed from Linux (5.16 deprecates, 6.x refuses).
        unsupported("linux.resources.memory.kernel", &kernel)?;
        resources.memory_reservation = mem.reservation();
        resources.memory_kernel_tcp = mem.kernel_tcp();
        resources.memory_swappiness = mem.swappiness();
        if resources.memory_swappiness.is_some_and(|s| s > 100) {
            return Err(SpecError::Inconsistent("linux.resources.memory.swappiness is above 100".into()));
        }
        resources.disable_oom_killer = mem.disable_oom_killer() == Some(true);
        resources.memory_bytes = mem.limit();
        resources.memory_swap_bytes = mem.swap();
        if let (Some(l), Some(s)) = (mem.limit(), mem.swap())
            && s >= 0
            && s < l
        {
            return Err(SpecError::Inconsistent("memory.swap is below memory.limit".into()));
        }
    }
    if let Some(cpu) = res.cpu() {
        resources.cpu_realtime_runtime = cpu.realtime_runtime();
        resources.cpu_realtime_period = cpu.realtime_period();
        resources.cpuset_cpus = cpu.cpus().clone().filter(|c| !c.is_empty());
        resources.cpuset_mems = cpu.mems().clone().filter(|m| !m.is_empty());
        unsupported("linux.resources.cpu.idle", &cpu.idle())?;
        unsupported("linux.resources.cpu.burst", &cpu.burst())?;
        resources.cpu_shares = cpu.shares();
        resources.cpu_quota = cpu.quota();
        resources.cpu_period = cpu.period();
    }
    if let Some(pids) = res.pids() {
        resources.pids_max = Some(pids.limit());
    }
    Ok(resources)
}

/// Whether `ociVersion` names a runtime spec this runtime implements: 1.x.y, with an
/// optional pre-release suffix (`1.0.2-dev`).
fn supported_oci_version(version: &str) -> bool {
    let core = version.split_once(['-', '+']).map_or(version, |(c, _)| c);
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3 && parts[0] == "1" && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn plan(bundle: &Path, spec: &Spec, selinux: bool) -> Result<Plan, SpecError> {
    if !supported_oci_version(spec.version()) {
        return Err(SpecError::Inconsistent(format!(
            "ociVersion {:?} is not a runtime spec version 1.x.y",
            spec.version()
        )));
    }
    let mut warnings = Vec::new();
    let mut label = |field: &str, value: &Option<String>| -> Result<(), SpecError> {
        match value {
            Some(_) if selinux => Err(SpecError::Unsupported(format!("{field} (SELinux labels)"))),
            Some(v) => {
                warnings.push(format!("{field} {v:?} ignored: SELinux is not enabled on this host"));
                Ok(())
            }
            None => Ok(()),
        }
    };
    let hooks = match spec.hooks() {
        Some(h) => super::hooks::from_spec(h)?,
        None => super::hooks::Hooks::default(),
    };
    unsupported("domainname", spec.domainname())?;
    unsupported("solaris", spec.solaris())?;
    unsupported("windows", spec.windows())?;
    unsupported("vm", spec.vm())?;
    unsupported("zos", spec.zos())?;
    let process = spec.process().as_ref().ok_or_else(|| SpecError::Inconsistent("process is missing".into()))?;
    let terminal = process.terminal() == Some(true);
    let console_size = process.console_size().map(|b| {
        let clamp = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
        (clamp(b.height()), clamp(b.width()))
    });
    unsupported("process.commandLine", process.command_line())?;
    unsupported("process.apparmorProfile", process.apparmor_profile())?;
    label("process.selinuxLabel", process.selinux_label())?;
    unsupported("process.ioPriority", process.io_priority())?;
    unsupported("process.scheduler", process.scheduler())?;
    unsupported("process.execCPUAffinity", process.exec_cpu_affinity())?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(SpecError::Inconsistent("process.args is empty".into()));
    }
    let linux = spec.linux().as_ref().ok_or_else(|| SpecError::Inconsistent("linux is missing".into()))?;
    unsupported("linux.netDevices", linux.net_devices())?;
    label("linux.mountLabel", linux.mount_label())?;
    unsupported("linux.intelRdt", linux.intel_rdt())?;
    unsupported("linux.memoryPolicy", linux.memory_policy())?;
    unsupported("linux.personality", linux.personality())?;
    unsupported("linux.timeOffsets", linux.time_offsets())?;

    let root = spec.root().as_ref().ok_or_else(|| SpecError::Inconsistent("root is missing".into()))?;
    let rootfs = if root.path().is_absolute() { root.path().clone() } else { bundle.join(root.path()) };
    if !rootfs.is_dir() {
        return Err(SpecError::MissingRootfs(rootfs));
    }

    let mut clone_flags = CloneFlags::empty();
    let mut cgroup_ns = false;
    let mut join_namespaces = Vec::new();
    let mut join_pid = None;
    let mut seen = HashSet::new();
    for ns in linux.namespaces().iter().flatten() {
        let flag = match ns.typ() {
            LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
            LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
            LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
            LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
            LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
            LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
            LinuxNamespaceType::Time => return Err(SpecError::Unsupported("linux.namespaces time".into())),
        };
        if !seen.insert(flag.bits()) {
            return Err(SpecError::Inconsistent(format!("namespace {} is listed twice", ns.typ())));
        }
        match ns.path() {
            // A pid namespace is entered by the runtime before the clone (setns of a pid
            // namespace applies to children); the init joins the others itself.
            Some(path) if flag == CloneFlags::CLONE_NEWPID => join_pid = Some(path.clone()),
            Some(path) => join_namespaces.push((flag, path.clone())),
            None if flag == CloneFlags::CLONE_NEWCGROUP => cgroup_ns = true,
            None => clone_flags |= flag,
        }
    }
    // The user namespace first: joining it grants the rights to join the others.
    join_namespaces.sort_by_key(|(flag, _)| *flag != CloneFlags::CLONE_NEWUSER);
    let joins = |flag: CloneFlags| join_namespaces.iter().any(|(f, _)| *f == flag);
    if !clone_flags.contains(CloneFlags::CLONE_NEWNS) && !joins(CloneFlags::CLONE_NEWNS) {
        // Without one, the spec's mounts would land on the host and outlive the container.
        return Err(SpecError::Unsupported(
            "a container without its own mount namespace (linux.namespaces has no mount)".into(),
        ));
    }
    let user_ns = clone_flags.contains(CloneFlags::CLONE_NEWUSER);
    if user_ns && (linux.uid_mappings().is_none() || linux.gid_mappings().is_none()) {
        return Err(SpecError::Inconsistent("a user namespace needs uidMappings and gidMappings".into()));
    }
    if !user_ns && (linux.uid_mappings().is_some() || linux.gid_mappings().is_some()) {
        return Err(SpecError::Inconsistent(
            "uidMappings without a new user namespace (a joined one has its mappings already)".into(),
        ));
    }
    let has_uts = seen.contains(&CloneFlags::CLONE_NEWUTS.bits());
    if spec.hostname().is_some() && !has_uts {
        return Err(SpecError::Inconsistent("hostname is set without a uts namespace".into()));
    }

    let mut mounts = Vec::new();
    let mut dev_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
            return Err(SpecError::Unsupported(format!("mounts {} uidMappings", m.destination().display())));
        }
        if !m.destination().is_absolute() {
            return Err(SpecError::Inconsistent(format!(
                "mount destination {} is not absolute",
                m.destination().display()
            )));
        }
        let MountOptions { flags, bind, propagation, data, recursive_readonly } =
            parse_mount_options(m.options().as_deref().unwrap_or(&[]))?;
        let fstype = m.typ().clone().unwrap_or_else(|| if bind { "bind".into() } else { String::new() });
        let bind = bind || fstype == "bind";
        match fstype.as_str() {
            "bind" | "proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" | "overlay" | "cgroup" => {}
            other => {
                return Err(SpecError::Unsupported(format!("mount type {other:?} at {}", m.destination().display())));
            }
        }
        if recursive_readonly && !bind {
            return Err(SpecError::Unsupported(format!(
                "rro at {}: recursive read-only is for bind mounts",
                m.destination().display()
            )));
        }
        if bind && m.source().is_none() {
            return Err(SpecError::Inconsistent(format!("bind mount at {} has no source", m.destination().display())));
        }
        if m.destination() == Path::new("/dev") && fstype == "tmpfs" {
            dev_tmpfs = true;
        }
        let flags =
            if bind && !flags.contains(MsFlags::MS_BIND) { flags | MsFlags::MS_BIND | MsFlags::MS_REC } else { flags };
        mounts.push(MountPlan {
            destination: m.destination().clone(),
            fstype,
            source: m.source().clone(),
            flags,
            data,
            bind,
            propagation,
            recursive_readonly,
        });
    }
    let mut devices = if dev_tmpfs { default_devices() } else { Vec::new() };
    for d in linux.devices().iter().flatten() {
        use nix::sys::stat::SFlag;
        use oci_spec::runtime::LinuxDeviceType as T;
        let kind = match d.typ() {
            T::C | T::U => SFlag::S_IFCHR,
            T::B => SFlag::S_IFBLK,
            T::P => SFlag::S_IFIFO,
            T::A => return Err(SpecError::Inconsistent(format!("device {} has type a", d.path().display()))),
        };
        if !d.path().starts_with("/dev") {
            return Err(SpecError::Inconsistent(format!("device {} is outside /dev", d.path().display())));
        }
        devices.retain(|x| x.path != *d.path());
        devices.push(DevicePlan {
            path: d.path().clone(),
            kind,
            major: d.major() as u64,
            minor: d.minor() as u64,
            mode: d.file_mode().unwrap_or(0o666) & 0o7777,
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }

    let caps = match process.capabilities() {
        None => None,
        Some(c) => {
            let sets = CapSets {
                bounding: cap_mask(c.bounding())?,
                effective: cap_mask(c.effective())?,
                permitted: cap_mask(c.permitted())?,
                inheritable: cap_mask(c.inheritable())?,
                ambient: cap_mask(c.ambient())?,
            };
            if sets.ambient & !(sets.permitted & sets.bounding) != 0 {
                return Err(SpecError::Inconsistent(
                    "process.capabilities.ambient holds capabilities missing from permitted or bounding".into(),
                ));
            }
            // The kernel raises an ambient capability only if it is also inheritable; a spec
            // that asks for ambient capabilities (runc's default does, without inheritable)
            // means them to survive exec, so they are made inheritable too.
            Some(CapSets { inheritable: sets.inheritable | sets.ambient, ..sets })
        }
    };
    let mut rlimits = Vec::new();
    for r in process.rlimits().iter().flatten() {
        if r.soft() > r.hard() {
            return Err(SpecError::Inconsistent(format!("rlimit {:?} soft limit is above its hard limit", r.typ())));
        }
        rlimits.push((rlimit_resource(r.typ())?, r.soft(), r.hard()));
    }

    let mut resources = match linux.resources() {
        Some(res) => resources_from_spec(res)?,
        None => Resources::default(),
    };
    // The spec's device nodes stay usable under its device rules, as runc and crun allow them.
    if !resources.device_rules.is_empty() {
        for d in linux.devices().iter().flatten() {
            use oci_spec::runtime::LinuxDeviceType as T;
            let kind = match d.typ() {
                T::C | T::U => 'c',
                T::B => 'b',
                _ => continue,
            };
            resources.device_nodes.push(DeviceRule {
                allow: true,
                kind,
                major: Some(d.major()),
                minor: Some(d.minor()),
                access: "rwm".into(),
            });
        }
    }
    let seccomp = match linux.seccomp() {
        Some(s) => Some(seccomp::compile(s)?),
        None => None,
    };
    for name in seccomp.iter().flat_map(|p| &p.unknown_names) {
        warnings.push(format!("seccomp syscall {name:?} is unknown on every architecture this runtime knows; skipped"));
    }
    let rootfs_propagation = match linux.rootfs_propagation() {
        Some(p) => propagation_flags(p)?,
        None => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
    };
    let cwd = process.cwd().clone();
    if !cwd.is_absolute() {
        return Err(SpecError::Inconsistent(format!("process.cwd {} is not absolute", cwd.display())));
    }
    let user = process.user();
    Ok(Plan {
        bundle: bundle.to_path_buf(),
        rootfs,
        readonly_rootfs: root.readonly().unwrap_or(false),
        rootfs_propagation,
        clone_flags,
        cgroup_ns,
        join_namespaces,
        join_pid,
        uid_map: id_map(linux.uid_mappings()),
        gid_map: id_map(linux.gid_mappings()),
        mounts,
        devices,
        masked_paths: linux.masked_paths().iter().flatten().map(PathBuf::from).collect(),
        readonly_paths: linux.readonly_paths().iter().flatten().map(PathBuf::from).collect(),
        hostname: spec.hostname().clone(),
        args,
        env: process.env().clone().unwrap_or_default(),
        cwd,
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        caps,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        rlimits,
        oom_score_adj: process.oom_score_adj(),
        seccomp,
        sysctl: linux.sysctl().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect(),
        resources,
        cgroups_path: linux.cgroups_path().clone(),
        annotations: spec.annotations().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect(),
        warnings,
        hooks,
        terminal,
        console_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    fn generated() -> Value {
        let spec = default_spec(&SpecInputs {
            args: vec!["/bin/true".into()],
            memory_bytes: Some(64 << 20),
            cpu_millicores: Some(500),
            pids_limit: Some(32),
            ..Default::default()
        })
        .unwrap();
        serde_json::to_value(&spec).unwrap()
    }

    #[test]
    fn generated_spec_loads_into_a_plan() {
        let dir = bundle_with(&generated().to_string());
        let plan = load_bundle(dir.path()).unwrap();
        assert!(plan.clone_flags.contains(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWPID));
        assert!(plan.cgroup_ns);
        assert_eq!(plan.resources.memory_bytes, Some(64 << 20));
        assert_eq!(plan.resources.memory_swap_bytes, Some(64 << 20));
        assert_eq!(plan.resources.cpu_quota, Some(50_000));
        assert_eq!(plan.resources.pids_max, Some(32));
        assert!(plan.no_new_privs);
        let caps = plan.caps.unwrap();
        assert_eq!(caps.bounding.count_ones() as usize, DEFAULT_CAPABILITIES.len());
        assert_eq!(caps.bounding & (1 << 21), 0, "CAP_SYS_ADMIN is not in the default set");
        assert_eq!(plan.devices.len(), 6);
        assert!(plan.seccomp.is_some());
    }

    #[test]
    fn unknown_properties_are_ignored_with_a_warning() {
        let mut v = generated();
        v["process"]["bogus"] = json!(1);
        v["unknownTopLevel"] = json!({"a": 1});
        let dir = bundle_with(&v.to_string());
        let plan = load_bundle(dir.path()).unwrap();
        assert_eq!(
            plan.warnings(),
            [
                "spec field process.bogus is not known to this runtime; ignored",
                "spec field unknownTopLevel is not known to this runtime; ignored"
            ]
        );
    }

    #[test]
    fn selinux_labels_are_ignored_only_without_selinux() {
        let mut v = generated();
        v["linux"]["mountLabel"] = json!("system_u:object_r:container_file_t:s0");
        let spec: Spec = serde_json::from_value(v).unwrap();
        let dir = bundle_with("{}");
        let plan = plan(dir.path(), &spec, false).unwrap();
        assert!(plan.warnings()[0].starts_with("linux.mountLabel"), "{:?}", plan.warnings());
        let err = super::plan(dir.path(), &spec, true).unwrap_err();
        assert!(matches!(err, SpecError::Unsupported(f) if f.starts_with("linux.mountLabel")));
    }

    #[test]
    fn resources_map_onto_the_cgroup_settings() {
        let mut v = generated();
        v["linux"]["resources"]["memory"] =
            json!({"limit": 1 << 26, "reservation": 1 << 25, "swappiness": 10, "disableOOMKiller": true});
        v["linux"]["resources"]["cpu"] =
            json!({"cpus": "0-1", "mems": "0", "realtimeRuntime": 100, "realtimePeriod": 1000});
        v["linux"]["resources"]["devices"] = json!([{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"}]);
        v["linux"]["devices"] = json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]);
        let dir = bundle_with(&v.to_string());
        let r = load_bundle(dir.path()).unwrap().resources;
        assert_eq!(r.memory_reservation, Some(1 << 25));
        assert_eq!(r.memory_swappiness, Some(10));
        assert!(r.disable_oom_killer);
        assert_eq!((r.cpuset_cpus.as_deref(), r.cpuset_mems.as_deref()), (Some("0-1"), Some("0")));
        assert_eq!((r.cpu_realtime_runtime, r.cpu_realtime_period), (Some(100), Some(1000)));
        let lines: Vec<String> = r.device_rules.iter().map(DeviceRule::v1_line).collect();
        assert_eq!(lines, ["a *:* rwm", "c 10:229 rw"]);
        assert_eq!(r.device_nodes[0].v1_line(), "c 10:229 rwm");
        assert_eq!(r.extra_controllers(), ["devices", "cpuset"]);

        let mut v = generated();
        v["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwx"}]);
        let dir = bundle_with(&v.to_string());
        assert!(matches!(load_bundle(dir.path()), Err(SpecError::Inconsistent(m)) if m.contains("rwx")));
    }

    #[test]
    fn namespaces_by_path_are_joined_user_first_and_pid_by_the_runtime() {
        let mut v = generated();
        v["linux"]["namespaces"] = json!([
            {"type": "mount", "path": "/proc/1/ns/mnt"},
            {"type": "pid", "path": "/proc/1/ns/pid"},
            {"type": "user", "path": "/proc/1/ns/user"},
            {"type": "network"}
        ]);
        v.as_object_mut().unwrap().remove("hostname");
        let dir = bundle_with(&v.to_string());
        let plan = load_bundle(dir.path()).unwrap();
        let joined: Vec<CloneFlags> = plan.join_namespaces.iter().map(|(f, _)| *f).collect();
        assert_eq!(joined, [CloneFlags::CLONE_NEWUSER, CloneFlags::CLONE_NEWNS]);
        assert_eq!(plan.join_pid.as_deref(), Some(Path::new("/proc/1/ns/pid")));
        assert_eq!(plan.clone_flags, CloneFlags::CLONE_NEWNET);

        let mut v = generated();
        v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "uts"}]);
        let dir = bundle_with(&v.to_string());
        let err = load_bundle(dir.path()).unwrap_err().to_string();
        assert!(err.contains("without its own mount namespace"), "{err}");
    }

    #[test]
    fn oci_versions_are_checked() {
        for ok in ["1.0.0", "1.0.2-dev", "1.2.1", "1.1.0+dirty"] {
            assert!(supported_oci_version(ok), "{ok}");
        }
        for bad in ["invalid", "2.0.0", "1.0", "1..0", "", "1.0.x"] {
            assert!(!supported_oci_version(bad), "{bad}");
        }
        let mut v = generated();
        v["ociVersion"] = json!("invalid");
        let dir = bundle_with(&v.to_string());
        let err = load_bundle(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ociVersion \"invalid\""), "{err}");
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let mut v = generated();
        v["process"]["apparmorProfile"] = json!("unconfined");
        let dir = bundle_with(&v.to_string());
        assert!(matches!(load_bundle(dir.path()), Err(SpecError::Unsupported(f)) if f == "process.apparmorProfile"));

        let mut v = generated();
        v["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "bogus"}));
        let dir = bundle_with(&v.to_string());
        let err = load_bundle(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid OCI runtime spec"), "{err}");

        let mut v = generated();
        v["mounts"].as_array_mut().unwrap().push(json!({"destination": "/x", "type": "nfs", "source": "h:/x"}));
        let dir = bundle_with(&v.to_string());
        assert!(matches!(load_bundle(dir.path()), Err(SpecError::Unsupported(f)) if f.contains("nfs")));
    }

    #[test]
    fn missing_pieces_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load_bundle(dir.path()), Err(SpecError::MissingConfig(_))));
        let dir = bundle_with("{ not json");
        assert!(matches!(load_bundle(dir.path()), Err(SpecError::Invalid { .. })));
        let dir = bundle_with(&generated().to_string());
        std::fs::remove_dir(dir.path().join("rootfs")).unwrap();
        assert!(matches!(load_bundle(dir.path()), Err(SpecError::MissingRootfs(_))));
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let opts: Vec<String> = ["nosuid", "ro", "mode=755", "size=1k", "rbind", "rslave"].map(String::from).to_vec();
        let o = parse_mount_options(&opts).unwrap();
        assert!(o.flags.contains(MsFlags::MS_NOSUID | MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert!(o.bind);
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(o.data, "mode=755,size=1k");
        assert!(!o.recursive_readonly, "plain ro is not recursive");
        let o = parse_mount_options(&["rbind".to_string(), "rro".to_string()]).unwrap();
        assert!(o.recursive_readonly && o.flags.contains(MsFlags::MS_RDONLY));
    }
}
