//! Removes what agents' containers may leave behind when a test or bench fails half-way:
//! processes in their cgroups, overlay mounts under the cluster dir, the cgroups, and any
//! directory named with [`Janitor::removing`] (tmpfs volumes). Declare it after the cluster,
//! so it runs before the cluster's temporary directory is removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Janitor {
    dir: PathBuf,
    nodes: Vec<String>,
    also: Vec<PathBuf>,
}

impl Janitor {
    /// Cleans up after the agents `nodes` of the cluster in `dir`.
    pub fn new<S: AsRef<str>>(dir: &Path, nodes: &[S]) -> Janitor {
        Janitor {
            dir: dir.to_path_buf(),
            nodes: nodes.iter().map(|n| n.as_ref().to_string()).collect(),
            also: Vec::new(),
        }
    }

    /// Removes `dir` too, last.
    #[allow(dead_code)]
    pub fn removing(mut self, dir: PathBuf) -> Janitor {
        self.also.push(dir);
        self
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        let hierarchies: Vec<PathBuf> =
            std::fs::read_dir("/sys/fs/cgroup").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        for node in &self.nodes {
            for h in &hierarchies {
                let parent = h.join("flotilla").join(node);
                let Ok(children) = std::fs::read_dir(&parent) else { continue };
                for child in children.flatten().filter(|e| e.path().is_dir()) {
                    let procs = std::fs::read_to_string(child.path().join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        // A process may have exited since the cgroup was read: nothing to say then.
                        let _ = std::process::Command::new("kill")
                            .args(["-9", &pid.to_string()])
                            .stderr(std::process::Stdio::null())
                            .status();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.to_string_lossy().into_owned();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)) {
            let _ = std::process::Command::new("umount").args(["-l", m]).status();
        }
        for node in &self.nodes {
            for h in &hierarchies {
                let parent = h.join("flotilla").join(node);
                if let Ok(children) = std::fs::read_dir(&parent) {
                    for child in children.flatten().filter(|e| e.path().is_dir()) {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
                let _ = std::fs::remove_dir(&parent);
            }
        }
        // The bridges of agents in this namespace and their masquerade rules (named after the
        // bridge); agents in namespaces of their own took theirs with the namespace.
        let rules = std::process::Command::new("iptables")
            .args(["-w", "-t", "nat", "-S", "POSTROUTING"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for node in &self.nodes {
            let bridge = crate::cluster::test_bridge(&self.dir.join(format!("agent-{node}")));
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &bridge])
                .stderr(std::process::Stdio::null())
                .status();
            for rule in rules.lines().filter(|l| l.contains(&format!("from {bridge}\""))) {
                let Some(spec) = rule.strip_prefix("-A POSTROUTING ") else { continue };
                let _ = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("iptables -w -t nat -D POSTROUTING {spec}"))
                    .status();
            }
        }
        for dir in &self.also {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
