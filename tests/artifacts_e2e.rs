//! End-to-end tests of the one artifact path through a real hub and agent, with no registry
//! process at all: a Wasm module saved as an archive with `flotilla image save`, imported on
//! the node with `flotilla image import` and run; and an agent whose data dir an earlier
//! version left (`refs.json` beside the blobs) starting its Wasm workload from it after the
//! upgrade. References name `registry.invalid`, which never resolves, so a replica that runs
//! can only have come from the node's own store.

#[path = "support/cluster.rs"]
mod cluster;

use std::ffi::OsStr;
use std::time::Duration;

use cluster::Cluster;
use proto::messages::{Phase, Termination};

const WAIT: Duration = Duration::from_secs(60);

fn workload(name: &str, image: &str, greeting: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  runtime: wasm\n  image: {image}\n  \
         args: [\"--interval-ms\", \"200\"]\n  env: {{GREETING: {greeting}}}\n"
    )
}

fn apply(c: &Cluster, doc: &str) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(doc));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
}

fn running(c: &Cluster, replica: &str) -> bool {
    c.replicas().iter().any(|r| r.name == replica && r.status.phase == Phase::Running)
}

fn logs(c: &Cluster, replica: &str) -> String {
    let path = c.agent_dir("air-1").join("logs").join(format!("{replica}.log"));
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_saved_wasm_archive_imports_offline_and_runs_with_no_registry() {
    let wasm = cluster::example_wasm();
    let mut c = Cluster::start();
    let reference = "registry.invalid/site/hello:v1";
    let archive = c.dir.path().join("hello.tar");
    let out = cluster::flotilla(&[
        OsStr::new("image"),
        "save".as_ref(),
        wasm.as_os_str(),
        reference.as_ref(),
        "-o".as_ref(),
        archive.as_os_str(),
    ]);
    assert!(out.status.success(), "save: {}", String::from_utf8_lossy(&out.stderr));
    // The archive holds what `flotilla push` would push: the same manifest digest.
    let bytes = std::fs::read(&wasm).unwrap();
    let digest = oci_runtime::WasmArtifact::build(&bytes).unwrap().manifest_digest;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(&format!("saved {reference}@{digest}")), "{said}");

    let agent_dir = c.agent_dir("air-1");
    let out = cluster::flotilla(&[
        OsStr::new("image"),
        "import".as_ref(),
        archive.as_os_str(),
        "--data-dir".as_ref(),
        agent_dir.as_os_str(),
    ]);
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(&format!("imported {reference} (wasm artifact, {digest})")), "{said}");

    c.add_agent("air-1", &["--containers", "off"]);
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &workload("offline", reference, "imported-greeting"));
    c.wait_for("the imported module running", WAIT, || running(&c, "offline-0"));
    c.wait_for("its output", WAIT, || logs(&c, "offline-0").contains("imported-greeting #2"));

    // A reference that was never imported fails to start with the registry's name in its
    // reason, while the imported one keeps running: nothing came from a registry.
    apply(&c, &workload("absent", "registry.invalid/site/absent:v1", "x"));
    c.wait_for("the absent module refused", WAIT, || {
        c.replicas().iter().any(|r| {
            r.name == "absent-0"
                && matches!(&r.status.last_termination,
                    Some(Termination::StartFailed { message }) if message.contains("registry.invalid/site/absent:v1"))
        })
    });
    assert!(running(&c, "offline-0"));
    let restarts = c.replicas().iter().find(|r| r.name == "offline-0").map(|r| r.status.restarts);
    assert_eq!(restarts, Some(0));
}

#[test]
fn an_agent_upgraded_from_refs_json_runs_its_wasm_module_without_a_registry() {
    let wasm = std::fs::read(cluster::example_wasm()).unwrap();
    let mut c = Cluster::start();
    // The data dir an earlier version left after pulling the module: the verified blob, and
    // the reference recorded in images/refs.json (no artifact index yet).
    let images = c.agent_dir("air-1").join("images");
    let wasm_digest = oci_runtime::sha256_digest(&wasm);
    std::fs::create_dir_all(images.join("blobs/sha256")).unwrap();
    std::fs::write(images.join("blobs/sha256").join(&wasm_digest[7..]), &wasm).unwrap();
    let reference = "registry.invalid/site/old:v1";
    let manifest_digest = oci_runtime::WasmArtifact::build(&wasm).unwrap().manifest_digest;
    let refs = serde_json::json!({"version": 1, "refs": {reference: {
        "manifest_digest": manifest_digest, "wasm_digest": wasm_digest}}});
    std::fs::write(images.join("refs.json"), refs.to_string()).unwrap();

    c.add_agent("air-1", &["--containers", "off"]);
    c.wait_for("node", WAIT, || c.nodes().iter().any(|n| n.ready));
    apply(&c, &workload("old", reference, "upgraded-greeting"));
    c.wait_for("the module an earlier version pulled running", WAIT, || running(&c, "old-0"));
    c.wait_for("its output", WAIT, || logs(&c, "old-0").contains("upgraded-greeting #2"));
    // The old index was folded into the one index.
    assert!(!images.join("refs.json").exists());
    let index = std::fs::read_to_string(images.join("artifacts.json")).unwrap();
    assert!(index.contains(reference) && index.contains("\"wasm\""), "{index}");
}
