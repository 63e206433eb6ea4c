//! What the agent tells the hub about its machine.

use std::collections::BTreeMap;

use proto::manifest::Runtime;
use proto::messages::NodeFacts;

pub fn collect(labels: &BTreeMap<String, String>, runtimes: Vec<Runtime>) -> NodeFacts {
    NodeFacts {
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
        cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        memory_bytes: mem_total().unwrap_or(0),
        runtimes,
        labels: labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        clock_ms: None,
        clock_skew_ms: None,
        taints: Vec::new(),
        agent_binary: None,
        last_upgrade: None,
        node_ip: None,
    }
}

fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The machine's hostname as a valid node name, or "node".
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .take(proto::manifest::MAX_NAME_LEN)
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() { "node".into() } else { name }
}

#[cfg(test)]
mod tests {
    #[test]
    fn facts_describe_this_machine() {
        let f = super::collect(&Default::default(), vec![proto::manifest::Runtime::Wasm]);
        assert!(f.cpus >= 1);
        assert!(f.memory_bytes > 0);
        assert_eq!(f.os, "linux");
        assert!(proto::manifest::validate_name(&super::default_node_name()).is_ok());
    }
}
