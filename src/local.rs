//! `flotilla run`: one Wasm program on this machine, through the same wasmtime host the agent
//! uses (shared engine, on-disk compile cache, limits). For trying a module before pushing it,
//! and for comparing a whole start against the `wasmtime` CLI, so where a shell user relies on
//! `wasmtime run` it behaves the same: the process's own stdin, stdout and stderr
//! ([`Stdio::Inherit`]: reads, write errors such as EPIPE, isatty), `proc_exit(n)` as the exit
//! status, `--env KEY` copying the host's value.

use std::path::PathBuf;

use anyhow::{Context, Result};
use wasm_runtime::{Exit, HostConfig, Limits, Preopen, RunOptions, Stdio, WasmHost};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The .wasm module or component.
    file: PathBuf,
    /// Arguments for the program.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
    /// Environment variable KEY=VALUE, or KEY to copy this shell's value (unset if it has none),
    /// repeatable.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, Option<String>)>,
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

/// `KEY=VALUE`, or `KEY` alone (its value to come from the host's environment).
fn parse_env(s: &str) -> Result<(String, Option<String>)> {
    let (key, value) = match s.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (s, None),
    };
    if key.is_empty() {
        anyhow::bail!("expected KEY=VALUE or KEY, got {s:?}");
    }
    Ok((key.to_string(), value))
}

/// The guest's environment from `--env` entries: a bare `KEY` takes `host(KEY)`, and is left out
/// when the host has none, as `wasmtime run --env KEY` does.
fn guest_env(
    entries: Vec<(String, Option<String>)>,
    host: impl Fn(&str) -> Result<Option<String>>,
) -> Result<Vec<(String, String)>> {
    let mut env = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let value = match value {
            Some(v) => Some(v),
            None => host(&key)?,
        };
        if let Some(value) = value {
            env.push((key, value));
        }
    }
    Ok(env)
}

/// This process's value of `key`; one that is not UTF-8 is an error rather than a mangled copy.
fn host_env(key: &str) -> Result<Option<String>> {
    match std::env::var(key) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("--env {key}: the value of {key} here is not UTF-8"),
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
    let mut opts = RunOptions::with_stdio(name, Stdio::Inherit);
    opts.args = a.args;
    opts.env = guest_env(a.env, host_env)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_entries_take_a_value_or_copy_the_hosts() {
        assert_eq!(parse_env("A=1=2").unwrap(), ("A".to_string(), Some("1=2".to_string())));
        assert_eq!(parse_env("A=").unwrap(), ("A".to_string(), Some(String::new())));
        assert_eq!(parse_env("HOME").unwrap(), ("HOME".to_string(), None));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("").is_err());

        let host = |k: &str| Ok((k == "ON_HOST").then(|| "host value".to_string()));
        let entries = vec![
            ("SET".to_string(), Some("v".to_string())),
            ("ON_HOST".to_string(), None),
            ("NOT_ON_HOST".to_string(), None),
        ];
        assert_eq!(
            guest_env(entries, host).unwrap(),
            vec![("SET".to_string(), "v".to_string()), ("ON_HOST".to_string(), "host value".to_string())]
        );
    }
}
