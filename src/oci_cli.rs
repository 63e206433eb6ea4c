//! `flotilla oci ...`: Flotilla's container executor as an OCI runtime command line with
//! runc's verbs and flags (create, start, state, kill, delete, run, exec, list, ps, pause,
//! resume, update, events, features; `--log`/`--log-format`, `--pid-file`), so containerd,
//! Podman and conmon can drive it as they drive runc; `spec` writes a default bundle
//! config, and the hidden `shim` is what the agent spawns per container. The agent also
//! spawns `exec` for exec probes, so its path to the library stays short (no tokio, no
//! logging setup). It only parses arguments
//! and calls `oci_runtime::container`; it runs before any async runtime or thread exists,
//! because creating a container clones the process.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use oci_runtime::container::{
    BindMount, CgroupConfig, CgroupVersion, CreateOptions, ExecRequest, NetworkMode, Runtime, RuntimeConfig,
    ShimOptions, SigSet, Signal, SpecInputs, Status, default_spec, exec, run_shim, signal_process,
};

#[derive(Args)]
pub struct OciArgs {
    /// Directory holding container state.
    #[arg(long, default_value = "/run/flotilla/oci")]
    root: PathBuf,
    /// Mount point of the cgroup filesystem.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// auto, v1 or v2.
    #[arg(long, default_value = "auto", value_parser = parse_version)]
    cgroup_version: CgroupVersion,
    /// Also write errors and warnings to this file (as runc's --log; conmon reads it).
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// text or json (runc's format: {"level","msg","time"} per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Accepted for runc compatibility; the output does not change.
    #[arg(long, hide = true)]
    debug: bool,
    /// Cgroups through systemd: refused, this runtime manages cgroupfs itself.
    #[arg(long, hide = true)]
    systemd_cgroup: bool,
    #[command(subcommand)]
    command: OciCommand,
}

#[derive(Subcommand)]
enum OciCommand {
    /// Create a container from a bundle; its process waits for `start`.
    Create {
        /// The bundle directory (config.json and rootfs).
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[command(flatten)]
        common: CreateFlags,
        /// The container's id.
        id: String,
    },
    /// Let a created container execute its program.
    Start {
        /// The container's id.
        id: String,
    },
    /// Print the OCI state of a container as JSON.
    State {
        /// The container's id.
        id: String,
    },
    /// Send a signal (name or number, default TERM) to a container.
    Kill {
        /// The container's id.
        id: String,
        /// TERM, KILL, HUP, ... or a number.
        #[arg(default_value = "TERM")]
        signal: String,
        /// Signal every process of the container, not only its init.
        #[arg(long)]
        all: bool,
    },
    /// Delete a stopped container (--force: kill it first).
    Delete {
        /// The container's id.
        id: String,
        /// Kill it first if it still runs.
        #[arg(short, long)]
        force: bool,
    },
    /// Create, start and wait for a container; exits with its exit code.
    Run {
        /// The bundle directory (config.json and rootfs).
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        #[command(flatten)]
        common: CreateFlags,
        /// Start the container and return instead of waiting for it.
        #[arg(short, long)]
        detach: bool,
        /// The container's id.
        id: String,
    },
    /// List the containers under the state root.
    #[command(visible_alias = "ls")]
    List {
        /// table or json.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// Print only the ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print the pids of a container's processes.
    Ps {
        /// table or json.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        /// The container's id.
        id: String,
    },
    /// Freeze every process of a running container.
    Pause {
        /// The container's id.
        id: String,
    },
    /// Thaw a paused container.
    Resume {
        /// The container's id.
        id: String,
    },
    /// Change a container's resource limits.
    Update(UpdateArgs),
    /// Print a container's usage as JSON events (`--stats`: once).
    Events {
        /// Print one stats event and exit.
        #[arg(long)]
        stats: bool,
        /// Seconds between stats events.
        #[arg(long, default_value = "5", value_parser = parse_timeout)]
        interval: Duration,
        /// The container's id.
        id: String,
    },
    /// Print what this runtime supports, as runtime-spec features.json.
    Features,
    /// Run a command inside a running container and wait for it.
    ///
    /// It joins the container's namespaces and cgroups and runs with the restrictions of the
    /// container's process; what the command leaves running is killed when it exits. Its
    /// output is printed once it has ended. Exit status: the command's; 128+N if a signal N
    /// killed it; 124 if the timeout killed it; 125 if exec itself failed (unknown or
    /// stopped container, bad --env or --cwd); 126 if the program cannot be run; 127 if it
    /// does not exist; 2 for a malformed command line.
    Exec(ExecArgs),
    /// Write a default config.json into a bundle directory.
    Spec(SpecArgs),
    /// Supervise one container (spawned by the agent).
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        id: String,
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value_t = 10 << 20)]
        log_max_bytes: u64,
        /// Write timestamped records (the agent's log format) instead of raw bytes.
        #[arg(long)]
        log_timestamps: bool,
    },
}

/// Flags of `create` and `run` that containerd, Podman and conmon pass.
#[derive(Args)]
struct CreateFlags {
    /// Write the container's init pid to this file.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Unix socket the container's pseudo-terminal master is sent to (SCM_RIGHTS), for a
    /// spec with `process.terminal`.
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility: the rootfs is always entered with pivot_root.
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility: no session keyring is created.
    #[arg(long)]
    no_new_keyring: bool,
    /// Accepted for runc compatibility (systemd socket activation passes no fds here).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
}

#[derive(Args)]
struct UpdateArgs {
    /// A JSON file (`-` for stdin) with linux.resources as the runtime spec writes them.
    #[arg(short, long, value_name = "FILE")]
    resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long)]
    memory: Option<i64>,
    /// Memory plus swap limit in bytes.
    #[arg(long)]
    memory_swap: Option<i64>,
    /// Memory soft limit in bytes.
    #[arg(long)]
    memory_reservation: Option<i64>,
    /// CFS quota in microseconds per period.
    #[arg(long)]
    cpu_quota: Option<i64>,
    /// CFS period in microseconds.
    #[arg(long)]
    cpu_period: Option<u64>,
    /// Relative CPU weight (cgroup v1 shares).
    #[arg(long)]
    cpu_share: Option<u64>,
    /// CPUs the container may run on (`0-1,3`).
    #[arg(long)]
    cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    #[arg(long)]
    cpuset_mems: Option<String>,
    /// Most processes the container may have.
    #[arg(long)]
    pids_limit: Option<i64>,
    /// The container's id.
    id: String,
}

#[derive(Args)]
struct ExecArgs {
    /// KEY=VALUE added to the container process's environment, repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the container (default: the container process's).
    #[arg(long)]
    cwd: Option<String>,
    /// Seconds (fractions allowed) after which the command and all it started are killed;
    /// no limit by default.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Bytes of stdout and of stderr kept each; the rest is dropped.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    output_limit: usize,
    /// The command uses this process's stdin, stdout and stderr directly (nothing is
    /// collected); only the exit code is this process's own.
    #[arg(short, long)]
    interactive: bool,
    /// With --interactive: stdin is a terminal, made the command's controlling terminal.
    #[arg(short, long, requires = "interactive")]
    tty: bool,
    /// The container, which must be running.
    id: String,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct SpecArgs {
    /// The bundle directory to write config.json into.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// The container's hostname (its own UTS namespace).
    #[arg(long)]
    hostname: Option<String>,
    /// Memory limit in bytes (swap is limited to the same total).
    #[arg(long)]
    memory: Option<i64>,
    /// CPU limit in millicores.
    #[arg(long)]
    cpu_millicores: Option<u64>,
    /// Most processes the container may have.
    #[arg(long)]
    pids: Option<i64>,
    /// none (own network namespace with loopback) or host.
    #[arg(long, default_value = "none", value_parser = parse_network)]
    network: NetworkMode,
    /// The user id the program runs as.
    #[arg(long, default_value_t = 0)]
    uid: u32,
    /// The group id the program runs as.
    #[arg(long, default_value_t = 0)]
    gid: u32,
    /// The program's working directory inside the container.
    #[arg(long, default_value = "/")]
    cwd: String,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env")]
    env: Vec<String>,
    /// SOURCE:DEST[:ro], repeatable.
    #[arg(long = "bind", value_parser = parse_bind)]
    binds: Vec<BindMount>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    readonly_rootfs: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    args: Vec<String>,
}

/// A command-line value of `flotilla oci` that does not parse; clap prints it with its flag.
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error("cgroup version {value:?} is not auto, v1 or v2")]
    CgroupVersion { value: String },
    #[error("network {value:?} is not none or host")]
    Network { value: String },
    #[error("bind {value:?} is not SOURCE:DEST[:ro|rw]")]
    Bind { value: String },
    #[error("timeout {value:?} is not a number of seconds")]
    TimeoutNotNumber { value: String },
    #[error("timeout {value:?} is not a duration")]
    TimeoutRange { value: String },
}

fn parse_version(s: &str) -> Result<CgroupVersion, ArgError> {
    match s {
        "auto" => Ok(CgroupVersion::Auto),
        "v1" | "1" => Ok(CgroupVersion::V1),
        "v2" | "2" => Ok(CgroupVersion::V2),
        _ => Err(ArgError::CgroupVersion { value: s.to_string() }),
    }
}

fn parse_network(s: &str) -> Result<NetworkMode, ArgError> {
    match s {
        "none" => Ok(NetworkMode::None),
        "host" => Ok(NetworkMode::Host),
        _ => Err(ArgError::Network { value: s.to_string() }),
    }
}

fn parse_bind(s: &str) -> Result<BindMount, ArgError> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, destination, readonly) = match parts.as_slice() {
        [s, d] => (s, d, false),
        [s, d, "ro"] => (s, d, true),
        [s, d, "rw"] => (s, d, false),
        _ => return Err(ArgError::Bind { value: s.to_string() }),
    };
    Ok(BindMount { source: source.into(), destination: destination.into(), readonly })
}

fn parse_timeout(s: &str) -> Result<Duration, ArgError> {
    let secs: f64 = s.parse().map_err(|_| ArgError::TimeoutNotNumber { value: s.to_string() })?;
    Duration::try_from_secs_f64(secs).map_err(|_| ArgError::TimeoutRange { value: s.to_string() })
}

/// `oci exec`: prints the command's output and returns its exit code (see `OciCommand::Exec`).
fn run_exec(root: &std::path::Path, args: ExecArgs) -> u8 {
    let req = ExecRequest {
        args: args.command,
        env: args.env,
        cwd: args.cwd,
        timeout: args.timeout.unwrap_or(Duration::MAX),
        output_limit: args.output_limit,
        interactive: args.interactive,
        tty: args.tty,
    };
    match exec(root, &args.id, &req) {
        Ok(outcome) => {
            let _ = std::io::stdout().write_all(&outcome.stdout);
            let _ = std::io::stdout().flush();
            let mut err = std::io::stderr();
            let _ = err.write_all(&outcome.stderr);
            for (name, cut) in [("stdout", outcome.stdout_truncated), ("stderr", outcome.stderr_truncated)] {
                if cut {
                    let _ = writeln!(err, "flotilla: {name} of the command was cut at {} bytes", req.output_limit);
                }
            }
            if outcome.timed_out {
                let _ = writeln!(err, "flotilla: the command timed out after {:?} and was killed", req.timeout);
            }
            outcome.exit_code()
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn parse_signal(s: &str) -> Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).with_context(|| format!("unknown signal number {n}"));
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
    name.parse().with_context(|| format!("unknown signal {s:?}"))
}

/// Where errors and warnings go besides stderr (`--log`, `--log-format`).
struct LogTarget {
    file: Option<PathBuf>,
    json: bool,
}

impl LogTarget {
    fn write(&self, level: &str, message: &str) {
        let prefix = if level == "error" { "error" } else { "warning" };
        eprintln!("{prefix}: {message}");
        let Some(path) = &self.file else { return };
        let line = if self.json {
            let time = oci_runtime::container::runtime::rfc3339_now();
            format!("{}\n", serde_json::json!({"level": level, "msg": message, "time": time}))
        } else {
            format!("{level}: {message}\n")
        };
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Runs an `oci` command; the process must still be single-threaded.
pub fn main(args: OciArgs) -> ExitCode {
    let log = LogTarget { file: args.log.clone(), json: args.log_format == "json" };
    match run(args, &log) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let mut text = String::new();
            for cause in e.chain() {
                let c = cause.to_string();
                if !text.contains(&c) {
                    if !text.is_empty() {
                        text.push_str(": ");
                    }
                    text.push_str(&c);
                }
            }
            log.write("error", &text);
            ExitCode::FAILURE
        }
    }
}

/// `create`'s common work: refuses what cannot be honoured, creates, writes the pid file.
fn create(runtime: &Runtime, id: &str, bundle: &std::path::Path, flags: &CreateFlags, log: &LogTarget) -> Result<i32> {
    let console_socket = match &flags.console_socket {
        Some(path) => Some(std::os::fd::OwnedFd::from(
            std::os::unix::net::UnixStream::connect(path)
                .with_context(|| format!("connecting to console socket {}", path.display()))?,
        )),
        None => None,
    };
    let created = runtime.create(id, bundle, CreateOptions { console_socket, ..Default::default() })?;
    for w in &created.warnings {
        log.write("warning", w);
    }
    if let Some(path) = &flags.pid_file {
        // Written whole and renamed into place: a reader never sees a partial pid.
        let tmp = path.with_extension("flotilla-tmp");
        let written = std::fs::write(&tmp, created.pid.to_string()).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = runtime.delete(id, true);
            return Err(e).with_context(|| format!("writing pid file {}", path.display()));
        }
    }
    Ok(created.pid)
}

/// `update`'s resources: the JSON file's, then the flags over them.
fn update_resources(u: &UpdateArgs) -> Result<oci_runtime::container::Resources> {
    let mut r = match &u.resources {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading resources from stdin")?
            } else {
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
            };
            oci_runtime::container::resources_from_json(&text)?
        }
        None => oci_runtime::container::Resources::default(),
    };
    r.memory_bytes = u.memory.or(r.memory_bytes);
    r.memory_swap_bytes = u.memory_swap.or(r.memory_swap_bytes);
    r.memory_reservation = u.memory_reservation.or(r.memory_reservation);
    r.cpu_quota = u.cpu_quota.or(r.cpu_quota);
    r.cpu_period = u.cpu_period.or(r.cpu_period);
    r.cpu_shares = u.cpu_share.or(r.cpu_shares);
    r.cpuset_cpus = u.cpuset_cpus.clone().or(r.cpuset_cpus);
    r.cpuset_mems = u.cpuset_mems.clone().or(r.cpuset_mems);
    r.pids_max = u.pids_limit.or(r.pids_max);
    Ok(r)
}

/// What this runtime supports, in the runtime spec's features.json shape.
fn features() -> serde_json::Value {
    use oci_runtime::container::seccomp;
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "rro", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async",
            "dirsync", "remount", "mand", "nomand", "atime", "noatime", "diratime", "nodiratime", "relatime",
            "norelatime", "strictatime", "nostrictatime", "bind", "rbind", "private", "rprivate", "shared",
            "rshared", "slave", "rslave", "unbindable", "runbindable"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": oci_runtime::container::spec::KNOWN_CAPABILITIES,
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false, "rdma": false},
            "seccomp": {
                "enabled": true,
                "actions": seccomp::SUPPORTED_ACTIONS,
                "operators": ["SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
                    "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"],
                "archs": [seccomp::NATIVE_ARCH],
                "knownFlags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
                "supportedFlags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": false}},
        },
        "annotations": {"org.opencontainers.runc.checkpoint.enabled": "false"},
    })
}

fn run(args: OciArgs, log: &LogTarget) -> Result<u8> {
    if args.systemd_cgroup {
        bail!("--systemd-cgroup: this runtime manages cgroups through cgroupfs only (use the cgroupfs manager)");
    }
    let runtime = Runtime::new(RuntimeConfig {
        state_root: args.root,
        cgroup: CgroupConfig { root: args.cgroup_root, version: args.cgroup_version },
    });
    match args.command {
        OciCommand::Create { bundle, common, id } => {
            create(&runtime, &id, &bundle, &common, log)?;
        }
        OciCommand::Start { id } => runtime.start(&id)?,
        OciCommand::State { id } => {
            println!("{}", serde_json::to_string_pretty(&runtime.state(&id)?)?);
        }
        OciCommand::Kill { id, signal, all } => runtime.kill(&id, parse_signal(&signal)?, all)?,
        OciCommand::Delete { id, force } => runtime.delete(&id, force)?,
        OciCommand::Run { bundle, common, detach, id } => {
            let pid = create(&runtime, &id, &bundle, &common, log)?;
            if let Err(e) = runtime.start(&id) {
                let _ = runtime.delete(&id, true);
                return Err(e.into());
            }
            if detach {
                return Ok(0);
            }
            // As runc does: termination signals for this command go to the container, which
            // decides; the command ends when the container does. Threads are fine now.
            let mut mask = SigSet::empty();
            for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT] {
                mask.add(s);
            }
            mask.thread_block().context("blocking signals")?;
            std::thread::spawn(move || {
                while let Ok(sig) = mask.wait() {
                    let _ = signal_process(pid, sig);
                }
            });
            let exit = runtime.wait_child(&id, pid);
            runtime.delete(&id, true)?;
            let exit = exit?;
            if exit.oom_killed {
                eprintln!("container {id} was killed by the OOM killer");
            }
            return Ok(u8::try_from(exit.code).unwrap_or(255));
        }
        OciCommand::List { format, quiet } => {
            let all = runtime.list()?;
            if quiet {
                for (r, _) in &all {
                    println!("{}", r.id);
                }
            } else if format == "json" {
                let list: Vec<_> = all
                    .iter()
                    .map(|(r, status)| {
                        serde_json::json!({
                            "ociVersion": "1.0.2", "id": r.id, "pid": if *status == Status::Stopped { 0 } else { r.pid },
                            "status": status.to_string(), "bundle": r.bundle, "rootfs": r.bundle.join("rootfs"),
                            "created": r.created, "owner": "root", "annotations": r.annotations,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!("{:<36} {:<8} {:<8} {:<48} CREATED", "ID", "PID", "STATUS", "BUNDLE");
                for (r, status) in &all {
                    let pid = if *status == Status::Stopped { 0 } else { r.pid };
                    println!("{:<36} {:<8} {:<8} {:<48} {}", r.id, pid, status, r.bundle.display(), r.created);
                }
            }
        }
        OciCommand::Ps { format, id } => {
            let pids = runtime.processes(&id)?;
            if format == "json" {
                println!("{}", serde_json::to_string(&pids)?);
            } else {
                println!("PID");
                for p in pids {
                    println!("{p}");
                }
            }
        }
        OciCommand::Pause { id } => runtime.pause(&id)?,
        OciCommand::Resume { id } => runtime.resume(&id)?,
        OciCommand::Update(u) => runtime.update(&u.id, &update_resources(&u)?)?,
        OciCommand::Events { stats, interval, id } => loop {
            let data = runtime.stats(&id)?;
            println!("{}", serde_json::json!({"type": "stats", "id": id, "data": data}));
            let status = runtime.state(&id)?.status;
            if stats || status == Status::Stopped {
                break;
            }
            std::thread::sleep(interval);
        },
        OciCommand::Features => println!("{}", serde_json::to_string_pretty(&features())?),
        OciCommand::Exec(e) => return Ok(run_exec(&runtime.config().state_root, e)),
        OciCommand::Spec(s) => {
            let spec = default_spec(&SpecInputs {
                args: s.args,
                env: s.env,
                cwd: s.cwd,
                uid: s.uid,
                gid: s.gid,
                hostname: s.hostname,
                memory_bytes: s.memory,
                cpu_millicores: s.cpu_millicores,
                pids_limit: s.pids,
                network: s.network,
                binds: s.binds,
                readonly_rootfs: s.readonly_rootfs,
                ..Default::default()
            })?;
            let path = s.bundle.join("config.json");
            if path.exists() {
                bail!("{} already exists", path.display());
            }
            let json = serde_json::to_string_pretty(&spec)?;
            std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        }
        OciCommand::Shim { id, bundle, log, log_max_bytes, log_timestamps } => {
            run_shim(&runtime, &ShimOptions { id, bundle, log, log_max_bytes, log_timestamps })?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_say_what_was_expected() {
        assert!(matches!(parse_version("v2"), Ok(CgroupVersion::V2)));
        let err = parse_version("v3").unwrap_err();
        assert_eq!(err.to_string(), "cgroup version \"v3\" is not auto, v1 or v2");
        assert_eq!(parse_network("bridge").unwrap_err().to_string(), "network \"bridge\" is not none or host");
        let bind = parse_bind("/a:/b:ro").unwrap();
        assert!(bind.readonly);
        assert_eq!(parse_bind("/a").unwrap_err().to_string(), "bind \"/a\" is not SOURCE:DEST[:ro|rw]");
        assert_eq!(parse_timeout("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_timeout("soon").unwrap_err().to_string(), "timeout \"soon\" is not a number of seconds");
        assert_eq!(parse_timeout("-1").unwrap_err().to_string(), "timeout \"-1\" is not a duration");
    }
}
