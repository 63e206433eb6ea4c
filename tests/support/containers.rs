#![allow(dead_code)] // shared by several test crates, each using part of it
//! What the container end-to-end tests share: whether this machine can run containers, and a
//! busybox image pushed to the test registry. The including crate declares `busybox_image`,
//! `cluster`, `netns` and `registry` (the usual `#[path]` modules) at its root.

use std::path::Path;

use crate::registry::TestRegistry;

/// Root with cgroup controllers and busybox, or the reason `what` tests cannot run here: they
/// skip with it, except under `CI`, where they must run.
pub fn containers_possible(what: &str) -> bool {
    let why = if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        Some("not running as root")
    } else if !Path::new("/sys/fs/cgroup/memory").is_dir() && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Some("no cgroup memory controller")
    } else if !Path::new("/bin/busybox").exists() {
        Some("/bin/busybox missing (Debian's busybox-static)")
    } else {
        None
    };
    crate::netns::runnable(what, why)
}

/// Builds a busybox OCI layout running `cmd` and pushes it with `flotilla push`.
pub fn push_busybox(reg: &TestRegistry, dir: &Path, name: &str, cmd: &[&str]) -> String {
    let layout = dir.join(format!("layout-{}", name.replace(':', "-")));
    assert!(crate::busybox_image::write_busybox_layout(&layout, name, cmd), "cannot build the busybox image");
    let reference = reg.reference(name);
    let out = crate::cluster::flotilla(&[std::ffi::OsStr::new("push"), layout.as_os_str(), reference.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    reference
}
