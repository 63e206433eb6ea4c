//! Overlay root filesystems for containers: [`mount_overlay`] stacks read-only layer
//! directories under a writable upper directory at a target, [`unmount`] detaches it. It owns
//! only the mount itself; the layer snapshots belong to the image side and the directories to
//! the caller. It never mounts anything but overlayfs and never deletes files.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay needs at least one lower directory")]
    NoLayers,
    #[error("overlay path {0} contains a ',' or ':' which overlayfs options cannot carry")]
    BadPath(PathBuf),
    #[error("cannot mount overlay on {target}: {source}")]
    Mount { target: PathBuf, source: nix::Error },
    #[error("cannot unmount {target}: {source}")]
    Unmount { target: PathBuf, source: nix::Error },
}

fn checked(p: &Path) -> Result<String, OverlayError> {
    let s = p.to_str().ok_or_else(|| OverlayError::BadPath(p.into()))?;
    if s.contains([',', ':']) {
        return Err(OverlayError::BadPath(p.into()));
    }
    Ok(s.to_string())
}

/// Mounts an overlay at `target`. `lowerdirs` go from the top layer to the bottom one (the
/// order overlayfs's `lowerdir=` takes).
pub fn mount_overlay(lowerdirs: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<(), OverlayError> {
    if lowerdirs.is_empty() {
        return Err(OverlayError::NoLayers);
    }
    let lower = lowerdirs.iter().map(|p| checked(p)).collect::<Result<Vec<_>, _>>()?.join(":");
    let data = format!("lowerdir={lower},upperdir={},workdir={}", checked(upper)?, checked(work)?);
    mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(data.as_str()))
        .map_err(|source| OverlayError::Mount { target: target.into(), source })
}

/// Detaches the mount at `target`; a path that is not a mount point (already unmounted) or
/// no longer exists is fine.
pub fn unmount(target: &Path) -> Result<(), OverlayError> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(source) => Err(OverlayError::Unmount { target: target.into(), source }),
    }
}

/// Whether `path` is a mount point of this process's mount namespace (field 5 of a line of
/// `/proc/self/mountinfo`).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}
