//! Durable writes of the hub's own files (its data dir: CA, token, serving certificate, admin
//! config, hub id). One helper, one durability level, so no file is written more carelessly
//! than another: the data goes to a temp file beside the target, the temp file is fsynced,
//! renamed over the target, and the directory is fsynced so the rename itself survives a
//! power loss. A reader sees the old file or the new one, never a torn one.
//!
//! The store's own durability is SQLite's or PostgreSQL's business (see [`crate::store`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A durable write that failed: which step, on which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct WriteError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn step<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WriteError + 'a {
    move |source| WriteError { action, path: path.to_path_buf(), source }
}

/// Writes `data` to `path` with permission bits `mode` (temp file, fsync, rename, fsync of
/// the directory). The temp file is `<name>.tmp` beside `path`; a leftover from a crash is
/// overwritten by the next write.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    let name = path.file_name().ok_or_else(|| WriteError {
        action: "write",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(step("create", &tmp))?;
    f.write_all(data).map_err(step("write", &tmp))?;
    f.sync_all().map_err(step("sync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(step("rename into place", path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(step("sync the directory of", path))?;
    Ok(())
}

/// [`write_atomic`] readable by the owner only (0600): keys, tokens, credentials.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), WriteError> {
    write_atomic(path, data, 0o600)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_whole_with_its_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["token"]);
        // Files with the same stem do not share a temp file.
        write_atomic(&dir.path().join("ca.pem"), b"cert", 0o644).unwrap();
        write_private(&dir.path().join("ca.key"), b"key").unwrap();
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), b"cert");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_private(&dir.path().join("absent/token"), b"x").unwrap_err();
        assert_eq!(err.action, "create");
        assert!(err.to_string().contains("absent/token.tmp"), "{err}");
    }
}
