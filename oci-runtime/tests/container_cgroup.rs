//! Container plumbing against the real kernel, without starting containers: cgroup v1 limits
//! and membership, cgroup v2 membership on the host's v2 mount, overlay mounts, and the
//! executor's refusal to clone from a multi-threaded process (this test harness is one).
//!
//! They need root; without it they say why and skip, unless `CI` is set.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_oci_runtime::container::cgroup::{V1Manager, V2Manager};
use flotilla_oci_runtime::container::{
    CgroupManager, ContainerError, CreateOptions, OverlayError, Resources, Runtime, RuntimeConfig, mount_overlay,
    unmount,
};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn skip(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so this test must not be skipped");
    }
    eprintln!("skipping: {why}");
    true
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
    })
}

#[test]
fn v1_limits_membership_and_destroy() {
    if !is_root() && skip("not root") {
        return;
    }
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("memory/memory.limit_in_bytes").exists() {
        eprintln!("skipping: no cgroup v1 memory controller on this host (the v2 test covers it)");
        return;
    }
    let path = PathBuf::from(format!("flotilla-test/v1-{}", std::process::id()));
    let m = V1Manager::new(root, &path, &[]).unwrap();
    m.create().unwrap();
    m.apply(&Resources {
        memory_bytes: Some(32 << 20),
        memory_swap_bytes: Some(32 << 20),
        cpu_shares: Some(512),
        cpu_quota: Some(50_000),
        cpu_period: Some(100_000),
        pids_max: Some(10),
        ..Default::default()
    })
    .unwrap();
    let read = |c: &str, f: &str| std::fs::read_to_string(root.join(c).join(&path).join(f)).unwrap().trim().to_string();
    assert_eq!(read("memory", "memory.limit_in_bytes"), "33554432");
    if root.join("memory").join(&path).join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(read("memory", "memory.memsw.limit_in_bytes"), "33554432");
    }
    assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(read("cpu", "cpu.shares"), "512");
    assert_eq!(read("pids", "pids.max"), "10");

    let mut child = Command::new("sleep").arg("100").spawn().unwrap();
    m.add_process(child.id() as i32).unwrap();
    assert_eq!(m.procs().unwrap(), vec![child.id() as i32]);
    assert!(!m.oom_killed().unwrap());
    // destroy() signals and waits for an empty cgroup; reap in parallel as a parent would.
    let reaper = std::thread::spawn(move || child.wait().unwrap());
    m.destroy(Duration::from_secs(5)).unwrap();
    let status = reaper.join().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    for p in m.paths() {
        assert!(!p.exists(), "{} remains", p.display());
    }
    let _ = std::fs::remove_dir(root.join("memory/flotilla-test"));
    for c in ["cpu", "cpuacct", "pids"] {
        let _ = std::fs::remove_dir(root.join(c).join("flotilla-test"));
    }
}

#[test]
fn v2_membership_and_destroy_on_the_host_mount() {
    if !is_root() && skip("not root") {
        return;
    }
    let Some(root) = cgroup2_mount() else {
        eprintln!("skipping: no cgroup2 mount on this host");
        return;
    };
    let path = PathBuf::from(format!("flotilla-test-v2-{}", std::process::id()));
    let m = V2Manager::new(&root, &path, &[]).unwrap();
    m.create().unwrap();
    let controllers = std::fs::read_to_string(root.join(&path).join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "pids") {
        m.apply(&Resources { pids_max: Some(7), ..Default::default() }).unwrap();
        assert_eq!(std::fs::read_to_string(root.join(&path).join("pids.max")).unwrap().trim(), "7");
    }
    let mut child = Command::new("sleep").arg("100").spawn().unwrap();
    m.add_process(child.id() as i32).unwrap();
    assert_eq!(m.procs().unwrap(), vec![child.id() as i32]);
    let reaper = std::thread::spawn(move || child.wait().unwrap());
    m.destroy(Duration::from_secs(5)).unwrap();
    assert!(reaper.join().unwrap().code().is_none(), "sleep must have been killed");
    assert!(!root.join(&path).exists());
}

#[test]
fn overlay_mounts_layers_in_order_and_unmounts() {
    if !is_root() && skip("not root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| {
        let p = dir.path().join(n);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let (top, bottom, upper, work, target) = (d("top"), d("bottom"), d("upper"), d("work"), d("merged"));
    std::fs::write(bottom.join("a"), "bottom").unwrap();
    std::fs::write(bottom.join("b"), "bottom-only").unwrap();
    std::fs::write(top.join("a"), "top").unwrap();
    mount_overlay(&[top.clone(), bottom.clone()], &upper, &work, &target).unwrap();
    assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "top");
    assert_eq!(std::fs::read_to_string(target.join("b")).unwrap(), "bottom-only");
    std::fs::write(target.join("new"), "written").unwrap();
    assert_eq!(std::fs::read_to_string(upper.join("new")).unwrap(), "written");
    assert!(std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(target.to_str().unwrap()));
    unmount(&target).unwrap();
    assert!(!target.join("a").exists());
    assert!(!std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(target.to_str().unwrap()));
    unmount(&target).unwrap();
    assert!(matches!(mount_overlay(&[], &upper, &work, &target), Err(OverlayError::NoLayers)));
    assert!(matches!(mount_overlay(&[dir.path().join("a,b")], &upper, &work, &target), Err(OverlayError::BadPath(_))));
}

#[test]
fn create_refuses_a_multithreaded_process() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(RuntimeConfig { state_root: dir.path().join("state"), ..Default::default() });
    // The test harness runs each test on its own thread, so this process has several.
    let err = runtime.create("mt", dir.path(), CreateOptions::default()).unwrap_err();
    assert!(matches!(err, ContainerError::Multithreaded(n) if n > 1), "{err}");
    assert!(!dir.path().join("state/mt").exists());
}
