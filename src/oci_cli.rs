//! `flotilla oci ...`: Flotilla's container executor as an OCI runtime command line with
//! runc's verbs (create, start, state, kill, delete, run), `spec` to write a default bundle
//! config, and the hidden `shim` the agent spawns per container. It only parses arguments
//! and calls `oci_runtime::container`; it runs before any async runtime or thread exists,
//! because creating a container clones the process.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use oci_runtime::container::{
    BindMount, CgroupConfig, CgroupVersion, CreateOptions, NetworkMode, Runtime, RuntimeConfig, ShimOptions, SigSet,
    Signal, SpecInputs, default_spec, run_shim, signal_process,
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
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        id: String,
    },
    /// Let a created container execute its program.
    Start { id: String },
    /// Print the OCI state of a container as JSON.
    State { id: String },
    /// Send a signal (name or number, default TERM) to a container.
    Kill {
        id: String,
        #[arg(default_value = "TERM")]
        signal: String,
        /// Signal every process of the container, not only its init.
        #[arg(long)]
        all: bool,
    },
    /// Delete a stopped container (--force: kill it first).
    Delete {
        id: String,
        #[arg(short, long)]
        force: bool,
    },
    /// Create, start and wait for a container; exits with its exit code.
    Run {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        id: String,
    },
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
    },
}

#[derive(Args)]
struct SpecArgs {
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    #[arg(long)]
    hostname: Option<String>,
    /// Memory limit in bytes (swap is limited to the same total).
    #[arg(long)]
    memory: Option<i64>,
    /// CPU limit in millicores.
    #[arg(long)]
    cpu_millicores: Option<u64>,
    #[arg(long)]
    pids: Option<i64>,
    /// none (own network namespace with loopback) or host.
    #[arg(long, default_value = "none", value_parser = parse_network)]
    network: NetworkMode,
    #[arg(long, default_value_t = 0)]
    uid: u32,
    #[arg(long, default_value_t = 0)]
    gid: u32,
    #[arg(long, default_value = "/")]
    cwd: String,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env")]
    env: Vec<String>,
    /// SOURCE:DEST[:ro], repeatable.
    #[arg(long = "bind", value_parser = parse_bind)]
    binds: Vec<BindMount>,
    #[arg(long)]
    readonly_rootfs: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    args: Vec<String>,
}

fn parse_version(s: &str) -> Result<CgroupVersion, String> {
    match s {
        "auto" => Ok(CgroupVersion::Auto),
        "v1" | "1" => Ok(CgroupVersion::V1),
        "v2" | "2" => Ok(CgroupVersion::V2),
        _ => Err(format!("cgroup version {s:?} is not auto, v1 or v2")),
    }
}

fn parse_network(s: &str) -> Result<NetworkMode, String> {
    match s {
        "none" => Ok(NetworkMode::None),
        "host" => Ok(NetworkMode::Host),
        _ => Err(format!("network {s:?} is not none or host")),
    }
}

fn parse_bind(s: &str) -> Result<BindMount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, destination, readonly) = match parts.as_slice() {
        [s, d] => (s, d, false),
        [s, d, "ro"] => (s, d, true),
        [s, d, "rw"] => (s, d, false),
        _ => return Err(format!("bind {s:?} is not SOURCE:DEST[:ro|rw]")),
    };
    Ok(BindMount { source: source.into(), destination: destination.into(), readonly })
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
        OciCommand::Shim { id, bundle, log, log_max_bytes } => {
            run_shim(&runtime, &ShimOptions { id, bundle, log, log_max_bytes })?;
        }
    }
    Ok(0)
}
