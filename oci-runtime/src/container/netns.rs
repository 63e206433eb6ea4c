//! Named network namespaces: a namespace kept alive by a bind mount of it onto a file (as
//! `ip netns add` does), made before a container and joined by it (`linux.namespaces`
//! `{type: network, path}`), so it outlives the container's restarts and the agent's: the
//! container's address and published ports stay while the replica stays on the node.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Makes a network namespace with loopback up, bound at `path` (its parent must exist). A
/// namespace already bound there is kept as it is.
pub fn create(path: &Path) -> io::Result<()> {
    if is_bound(path) {
        return Ok(());
    }
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
    let target = path.to_path_buf();
    // Namespaces are per thread: a thread of its own moves into the new namespace, binds it
    // and ends, so no other thread of the process (a tokio worker) ever changes namespace.
    let made = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> io::Result<()> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            super::sys::loopback_up()?;
            nix::mount::mount(Some("/proc/thread-self/ns/net"), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
            Ok(())
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Unbinds and removes the namespace at `path` (it ends once no process is in it). A path
/// that does not exist is not an error.
pub fn remove(path: &Path) -> io::Result<()> {
    if is_bound(path) {
        nix::mount::umount2(path, MntFlags::MNT_DETACH)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether a namespace is bound at `path` (it is a mount point of this mount namespace).
pub fn is_bound(path: &Path) -> bool {
    super::overlay::is_mountpoint(path)
}

/// Every file in `dir` (the namespaces made there), by file name.
pub fn list(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().filter_map(|e| Some((e.file_name().into_string().ok()?, e.path()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_namespace_outlives_its_thread_and_is_removed() {
        if !root() {
            eprintln!("skipped: making network namespaces needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns1");
        create(&path).unwrap();
        assert!(is_bound(&path));
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let self_meta = std::fs::metadata("/proc/self/ns/net").unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_ne!(meta.ino(), self_meta.ino(), "a new namespace, not ours ({ours:?})");
        // Made again: the same namespace is kept.
        create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), meta.ino());
        assert_eq!(list(dir.path()).len(), 1);
        remove(&path).unwrap();
        assert!(!is_bound(&path) && !path.exists());
        remove(&path).unwrap();
    }
}
