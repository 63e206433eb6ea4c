//! `flotilla oci ...`: Flotilla's container executor as an OCI runtime command line with
//! runc's verbs (create, start, state, kill, delete, run, exec), `spec` to write a default
//! bundle config, and the hidden `shim` the agent spawns per container. The agent also
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
    ShimOptions, SigSet, Signal, SpecInputs, default_spec, exec, run_shim, signal_process,
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
        /// The container's id.
        id: String,
    },
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

/// Runs an `oci` command; the process must still be single-threaded.
pub fn main(args: OciArgs) -> ExitCode {
    match run(args) {
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
            eprintln!("error: {text}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: OciArgs) -> Result<u8> {
    let runtime = Runtime::new(RuntimeConfig {
        state_root: args.root,
        cgroup: CgroupConfig { root: args.cgroup_root, version: args.cgroup_version },
    });
    match args.command {
        OciCommand::Create { bundle, id } => {
            runtime.create(&id, &bundle, CreateOptions::default())?;
        }
        OciCommand::Start { id } => runtime.start(&id)?,
        OciCommand::State { id } => {
            println!("{}", serde_json::to_string_pretty(&runtime.state(&id)?)?);
        }
        OciCommand::Kill { id, signal, all } => runtime.kill(&id, parse_signal(&signal)?, all)?,
        OciCommand::Delete { id, force } => runtime.delete(&id, force)?,
        OciCommand::Run { bundle, id } => {
            let created = runtime.create(&id, &bundle, CreateOptions::default())?;
            if let Err(e) = runtime.start(&id) {
                let _ = runtime.delete(&id, true);
                return Err(e.into());
            }
            // As runc does: termination signals for this command go to the container, which
            // decides; the command ends when the container does. Threads are fine now.
            let mut mask = SigSet::empty();
            for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT] {
                mask.add(s);
            }
            mask.thread_block().context("blocking signals")?;
            let pid = created.pid;
            std::thread::spawn(move || {
                while let Ok(sig) = mask.wait() {
                    let _ = signal_process(pid, sig);
                }
            });
            let exit = runtime.wait_child(&id, created.pid);
            runtime.delete(&id, true)?;
            let exit = exit?;
            if exit.oom_killed {
                eprintln!("container {id} was killed by the OOM killer");
            }
            return Ok(u8::try_from(exit.code).unwrap_or(255));
        }
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
