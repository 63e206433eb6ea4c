//! Mixed versions end to end: a hub of this build with an agent of a previous build, and a
//! hub of the previous build with an agent of this one; each runs the example module from a
//! real registry.
//!
//! The previous build is the binary at `FLOTILLA_PREVIOUS_BIN`. `scripts/compat.sh REV` builds
//! it from a git revision (the last release, or the last landed commit) and runs this test.
//! Without the variable the test skips and says why: building another revision takes minutes,
//! so it is a documented command rather than part of every CI run.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::path::Path;
use std::time::{Duration, Instant};

use cluster::Proc;
use registry::TestRegistry;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn previous() -> Option<String> {
    match std::env::var("FLOTILLA_PREVIOUS_BIN") {
        Ok(p) if Path::new(&p).is_file() => Some(p),
        _ => {
            eprintln!("skipping: FLOTILLA_PREVIOUS_BIN is not set to a binary (run scripts/compat.sh REV)");
            None
        }
    }
}

fn cli(program: &str, config: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(program);
    cmd.arg("--config").arg(config).args(args);
    cluster::run_with_stdin(cmd, stdin)
}

fn json(program: &str, config: &Path, what: &str) -> Vec<Value> {
    let mut out = cli(program, config, &["get", what, "-o", "api-json"], None);
    // A build from before `-o api-json` printed the API's list as `-o json`.
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("api-json") {
        out = cli(program, config, &["get", what, "-o", "json"], None);
    }
    assert!(out.status.success(), "get {what}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A hub of `hub_bin` (also the CLI, as an operator runs the hub's own) and one agent,
/// `edge-1`, running the binary at `agent_bin`, with the example module applied and running.
struct Site {
    hub_bin: String,
    config: std::path::PathBuf,
    agent: Proc,
    hub: Proc,
    /// Holds the data dirs and logs; removed last.
    _dir: tempfile::TempDir,
}

impl Site {
    fn start(hub_bin: &str, agent_bin: &str, image: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", cluster::free_udp_port());
        let hub_dir = dir.path().join("hub");
        let hub_args: Vec<String> =
            ["hub", "--data-dir", hub_dir.to_str().unwrap(), "--listen", &addr].iter().map(|s| s.to_string()).collect();
        let hub = Proc::spawn_program("hub", hub_bin, &hub_args, dir.path().join("hub.log"));
        let config = hub_dir.join("admin.yaml");
        wait("the hub's token and admin config", || config.exists() && hub_dir.join("token").exists());
        let agent_args: Vec<String> = [
            "agent",
            "--hub",
            &addr,
            "--token-file",
            hub_dir.join("token").to_str().unwrap(),
            "--name",
            "edge-1",
            "--data-dir",
            dir.path().join("agent").to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let agent = Proc::spawn_program("agent", agent_bin, &agent_args, dir.path().join("agent.log"));
        let site = Site { hub_bin: hub_bin.to_string(), config, agent, hub, _dir: dir };
        wait("edge-1 Ready", || site.ready());
        let manifest = format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: hello\nspec:\n  runtime: wasm\n  image: {image}\n  replicas: 1\n"
        );
        let out = cli(hub_bin, &site.config, &["apply", "-f", "-"], Some(&manifest));
        assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
        site.wait_running();
        site
    }

    fn ready(&self) -> bool {
        json(&self.hub_bin, &self.config, "nodes").iter().any(|n| n["name"] == "edge-1" && n["ready"] == true)
    }

    fn wait_running(&self) {
        let running = || {
            json(&self.hub_bin, &self.config, "replicas")
                .iter()
                .any(|r| r["workload"] == "hello" && r["status"]["phase"] == "Running" && r["node"] == "edge-1")
        };
        let start = Instant::now();
        while !running() {
            assert!(
                start.elapsed() < WAIT,
                "hello never ran\nhub log:\n{}\nagent log:\n{}",
                self.hub.log_text(),
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(!self.hub.log_text().contains("version skew"), "{}", self.hub.log_text());
    }
}

/// A hub of `hub_bin` and an agent of `agent_bin` run the example module.
fn runs_a_workload(hub_bin: &str, agent_bin: &str, image: &str) {
    Site::start(hub_bin, agent_bin, image);
}

#[test]
fn a_hub_and_an_agent_one_build_apart_run_a_workload_either_way() {
    let Some(previous) = previous() else { return };
    let Some(reg) = TestRegistry::start() else { return };
    let image = reg.reference("hello:v1");
    let wasm = cluster::example_wasm();
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), image.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    let current = cluster::bin();
    runs_a_workload(current, &previous, &image);
    runs_a_workload(&previous, current, &image);
}

/// An agent of the previous build upgraded to this one with `flotilla upgrade agents`, while
/// its workload runs: the agent restarts into this build in the same process, reports its
/// digest, keeps the previous binary, and runs the workload again. Agents take upgrade orders
/// from the build that introduced them on; against an older previous build the test says so
/// and skips.
#[test]
fn an_agent_of_the_previous_build_is_upgraded_to_this_one_while_its_workload_runs() {
    let Some(previous) = previous() else { return };
    let takes_orders = std::process::Command::new(&previous)
        .args(["agent-upgrade-watch", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !takes_orders {
        eprintln!("skipping: the previous build predates remote agent upgrades");
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let image = reg.reference("hello:v1");
    let wasm = cluster::example_wasm();
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), image.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    // The agent runs a copy of the previous binary of its own: the upgrade replaces it.
    let bin_dir = tempfile::tempdir().unwrap();
    let agent_bin = bin_dir.path().join("flotilla");
    std::fs::copy(&previous, &agent_bin).unwrap();
    let current = cluster::bin();
    let mut site = Site::start(current, agent_bin.to_str().unwrap(), &image);
    let agent_ref = reg.reference("flotilla-agent:current");
    let out = cluster::flotilla(&["push", "--agent", current, &agent_ref]);
    assert!(out.status.success(), "push --agent: {}", String::from_utf8_lossy(&out.stderr));
    let out = cli(current, &site.config, &["upgrade", "agents", "--to", &agent_ref, "--deadline", "60s"], None);
    assert!(out.status.success(), "upgrade: {}", String::from_utf8_lossy(&out.stderr));
    let status = || -> Value {
        let out = cli(current, &site.config, &["upgrade", "status", "-o", "json"], None);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let start = Instant::now();
    while status()["phase"] != "Complete" {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "upgrade: {}\nhub log:\n{}\nagent log:\n{}",
            status(),
            site.hub.log_text(),
            site.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let digest = std::process::Command::new("sha256sum").arg(current).output().unwrap();
    let digest = format!("sha256:{}", String::from_utf8_lossy(&digest.stdout).split_whitespace().next().unwrap());
    assert_eq!(status()["nodes"][0]["binary"]["digest"], digest.as_str(), "{}", status());
    assert_eq!(std::fs::read(&agent_bin).unwrap(), std::fs::read(current).unwrap());
    assert_eq!(std::fs::read(bin_dir.path().join("flotilla.previous")).unwrap(), std::fs::read(&previous).unwrap());
    assert!(site.agent.child.try_wait().unwrap().is_none(), "the agent process ended instead of exec'ing");
    site.wait_running();
}
