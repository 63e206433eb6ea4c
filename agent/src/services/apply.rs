//! The I/O half of the data path: puts [`rules::ruleset`]'s text into the kernel with
//! `iptables-restore --noflush -w` and keeps the jumps into our chains in place.
//!
//! One restore is one transaction: our chains are declared (so emptied) and refilled, chains
//! of services that left are emptied and deleted, and nothing else in the tables is touched
//! (the node's other rules, CNI's portmap and masquerade, Docker's, stay as they are).
//!
//! These calls block (they run processes): an async caller uses `spawn_blocking`.
//!
//! Measured (root test `agent/tests/services_netns.rs`, iptables 1.8.9 with the nf_tables
//! backend, 2-core VM, each command through `ip netns exec`): applying 50 services × 4
//! endpoints (about 250 chains and 700 rules) takes 60–150 ms from nothing and about as long for a
//! one-endpoint change, since every apply rewrites all our chains. Of that, roughly 8 ms per
//! process is fixed cost (5 ms of it `ip netns exec`): one `iptables-save`, one
//! `iptables-restore`, five `iptables -C` for the jumps. An unchanged table costs nothing
//! ([`DataPath::update`] compares the text first).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use proto::service::ServiceTable;

use super::rules;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run {command}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
}

/// How to run iptables: which chain prefix is ours, and an optional command prefix (`ip netns
/// exec NAME` in tests; empty on a node).
#[derive(Debug, Clone)]
pub struct Iptables {
    pub chain_prefix: String,
    pub wrapper: Vec<String>,
}

impl Iptables {
    /// The agent's own chains, `FLOTILLA-…`, in the current network namespace.
    pub fn new() -> Self {
        Iptables { chain_prefix: "FLOTILLA".into(), wrapper: Vec::new() }
    }

    /// The same, run inside the named network namespace (`ip netns exec NAME`).
    pub fn in_netns(mut self, name: &str) -> Self {
        self.wrapper = vec!["ip".into(), "netns".into(), "exec".into(), name.into()];
        self
    }

    fn command(&self, program: &str) -> Command {
        let mut c = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    fn run(&self, program: &str, args: &[&str], input: Option<&str>) -> Result<String, ApplyError> {
        let command = format!("{program} {}", args.join(" "));
        let mut c = self.command(program);
        c.args(args);
        if input.is_some() {
            c.stdin(Stdio::piped());
        }
        let spawn = |source| ApplyError::Spawn { command: command.clone(), source };
        let mut child = c.spawn().map_err(spawn)?;
        if let Some(text) = input {
            // iptables-restore reads all its input before acting, and the input is at most a
            // few hundred KiB: written whole before reading its (small) output.
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin.write_all(text.as_bytes()).map_err(spawn)?;
        }
        let out = child.wait_with_output().map_err(spawn)?;
        if !out.status.success() {
            return Err(ApplyError::Failed {
                command,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().chars().take(2000).collect(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What the tables hold now (all of them in one run: each process costs milliseconds).
    fn saved(&self) -> Result<String, ApplyError> {
        self.run("iptables-save", &[], None)
    }

    /// Replaces our chains with `text` (from [`rules::ruleset`]), deletes our chains it no
    /// longer uses, then makes sure the built-in chains jump to ours.
    pub fn apply_ruleset(&self, text: &str) -> Result<(), ApplyError> {
        let input = rules::with_stale_removed(text, &self.saved()?, &self.chain_prefix);
        self.run("iptables-restore", &["--noflush", "-w"], Some(&input))?;
        self.ensure_jumps()
    }

    /// Inserts each jump into our chains at the top of its built-in chain unless it is there.
    pub fn ensure_jumps(&self) -> Result<(), ApplyError> {
        for (table, chain, rule) in rules::jumps(&self.chain_prefix) {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            let mut check = vec!["-w", "-t", table, "-C", chain];
            check.extend(&rule);
            if self.run("iptables", &check, None).is_ok() {
                continue;
            }
            let mut insert = vec!["-w", "-t", table, "-I", chain, "1"];
            insert.extend(&rule);
            self.run("iptables", &insert, None)?;
        }
        Ok(())
    }

    /// Removes the jumps and every chain of ours: the node as if no service had been applied.
    pub fn remove_all(&self) -> Result<(), ApplyError> {
        for (table, chain, rule) in rules::jumps(&self.chain_prefix) {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            let mut delete = vec!["-w", "-t", table, "-D", chain];
            delete.extend(&rule);
            // A jump inserted twice (by hand, or by two agents racing) is deleted twice; the
            // bound keeps a failing `-D` that still reports success from looping.
            for _ in 0..16 {
                if self.run("iptables", &delete, None).is_err() {
                    break;
                }
            }
        }
        let input = rules::removal(&self.saved()?, &self.chain_prefix);
        if !input.is_empty() {
            self.run("iptables-restore", &["--noflush", "-w"], Some(&input))?;
        }
        Ok(())
    }
}

impl Default for Iptables {
    fn default() -> Self {
        Iptables::new()
    }
}

impl Iptables {
    /// Deletes the conntrack entries of UDP flows sent to endpoints the rules no longer name
    /// (`conntrack -D`, as kube-proxy does). Best effort: an entry that is not there is not an
    /// error, and without `conntrack(8)` the flows time out on their own (30 s to 180 s).
    pub fn forget_flows(&self, flows: &[rules::StaleFlow]) -> Result<(), ApplyError> {
        for f in flows {
            let (vip, port, endpoint) = (f.vip.to_string(), f.port.to_string(), f.endpoint.to_string());
            let args = ["-D", "-p", "udp", "--orig-dst", &vip, "--dport", &port, "--dst-nat", &endpoint];
            match self.run("conntrack", &args, None) {
                Ok(_) => {}
                // conntrack exits 1 when no entry matched.
                Err(ApplyError::Failed { status, .. }) if status.code() == Some(1) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Applies the table's rules only when they differ from the last applied ones.
#[derive(Debug)]
pub struct DataPath {
    iptables: Iptables,
    last: Option<String>,
    /// What the last applied rules chose, for the UDP flows a change leaves behind.
    last_plan: Vec<rules::PortPlan>,
}

impl DataPath {
    pub fn new(iptables: Iptables) -> Self {
        DataPath { iptables, last: None, last_plan: Vec::new() }
    }

    /// Brings the kernel's rules to `table` with this node's readiness of its own replicas.
    /// Returns whether anything was applied. On an error the next call applies again.
    pub fn update(&mut self, table: &ServiceTable, local_ready: &BTreeMap<String, bool>) -> Result<bool, ApplyError> {
        let text = rules::ruleset(table, local_ready, &self.iptables.chain_prefix);
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        self.last = None;
        self.iptables.apply_ruleset(&text)?;
        self.last = Some(text);
        let plan = rules::plan(table, local_ready);
        let stale = rules::withdrawn_udp(&self.last_plan, &plan);
        self.last_plan = plan;
        if let Err(e) = self.iptables.forget_flows(&stale) {
            // The rules are in; flows left behind only time out later.
            tracing::warn!(error = %e, flows = stale.len(), "cannot delete UDP flows to withdrawn endpoints");
        }
        Ok(true)
    }

    /// Removes every rule and chain of ours (the agent leaving the node, or a janitor).
    pub fn remove_all(&mut self) -> Result<(), ApplyError> {
        self.last = None;
        self.last_plan.clear();
        self.iptables.remove_all()
    }
}
