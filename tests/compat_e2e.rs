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
    let out = cli(program, config, &["get", what, "-o", "json"], None);
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

/// A hub of `hub_bin` (also the CLI, as an operator runs the hub's own), an agent of
/// `agent_bin`, and the example module: it must run.
fn runs_a_workload(hub_bin: &str, agent_bin: &str, image: &str) {
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
    let ready = || json(hub_bin, &config, "nodes").iter().any(|n| n["name"] == "edge-1" && n["ready"] == true);
    wait("edge-1 Ready", ready);
    let manifest = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: hello\nspec:\n  runtime: wasm\n  image: {image}\n  replicas: 1\n"
    );
    let out = cli(hub_bin, &config, &["apply", "-f", "-"], Some(&manifest));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let running = || {
        json(hub_bin, &config, "replicas")
            .iter()
            .any(|r| r["workload"] == "hello" && r["status"]["phase"] == "Running" && r["node"] == "edge-1")
    };
    let start = Instant::now();
    while !running() {
        assert!(
            start.elapsed() < WAIT,
            "hello never ran\nhub log:\n{}\nagent log:\n{}",
            hub.log_text(),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!hub.log_text().contains("version skew"), "{}", hub.log_text());
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
