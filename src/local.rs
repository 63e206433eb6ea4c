//! `flotilla run`: one Wasm program on this machine, through the same wasmtime host the agent
//! uses (shared engine, on-disk compile cache, limits), with stdio passed through. For trying a
//! module before pushing it, and for comparing a whole start against the `wasmtime` CLI.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use wasm_runtime::{Exit, HostConfig, Limits, OutputSink, Preopen, RunOptions, WasmHost};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The .wasm module or component.
    file: PathBuf,
    /// Arguments for the program.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
    /// Environment variable KEY=VALUE, repeatable.
    #[arg(long = "env", value_parser = crate::parse_label)]
    env: Vec<(String, String)>,
    /// Directory to give the program: HOST[::GUEST] (GUEST defaults to HOST), repeatable.
    #[arg(long = "dir")]
    dirs: Vec<String>,
    /// Linear memory cap, e.g. 64Mi.
    #[arg(long)]
    memory: Option<String>,
    /// CPU time the program may use, e.g. 2s.
    #[arg(long)]
    cpu_time: Option<String>,
    /// Allow sockets and name lookups.
    #[arg(long)]
    network: bool,
    /// Compile cache (default: $XDG_CACHE_HOME/flotilla/wasm or ~/.cache/flotilla/wasm).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

struct Stdout;
struct Stderr;

impl OutputSink for Stdout {
    fn write(&self, bytes: &[u8]) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }
}

impl OutputSink for Stderr {
    fn write(&self, bytes: &[u8]) {
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(bytes);
    }
}

fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("flotilla/wasm")
}

/// Runs the program; returns the exit code for the process.
pub async fn run(a: RunArgs) -> Result<i32> {
    let cache_dir = a.cache_dir.unwrap_or_else(default_cache_dir);
    let host = WasmHost::new(HostConfig { cache_dir, ..Default::default() })?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let program = tokio::task::spawn_blocking({
        let host = host.clone();
        move || host.load_bytes(&bytes)
    })
    .await??;
    let name = a.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "main.wasm".into());
    let mut opts = RunOptions::new(name, Arc::new(Stdout), Arc::new(Stderr));
    opts.args = a.args;
    opts.env = a.env;
    opts.network = a.network;
    opts.limits = Limits {
        memory_bytes: a
            .memory
            .as_deref()
            .map(proto::manifest::parse_quantity)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        cpu_time: a
            .cpu_time
            .as_deref()
            .map(proto::manifest::parse_duration_ms)
            .transpose()
            .map_err(anyhow::Error::msg)?
            .map(std::time::Duration::from_millis),
        fuel: None,
    };
    for d in a.dirs {
        let (host_dir, guest) = d.split_once("::").unwrap_or((&d, &d));
        opts.preopens.push(Preopen { host: host_dir.into(), guest: guest.to_string(), read_only: false });
    }
    match host.run(&program, opts).await? {
        Exit::Code(code) => Ok(code),
        Exit::Trap(message) => {
            eprintln!("error: {message}");
            // What a process killed by SIGABRT reports, as the wasmtime CLI does for traps.
            Ok(134)
        }
    }
}
