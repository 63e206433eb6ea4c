//! `flotilla backup` and `flotilla restore`: a hub's state as a directory of files, taken while
//! the hub runs, and put back into an empty data dir.
//!
//! A backup holds what a hub on SQLite cannot be rebuilt without:
//! ```text
//! hub.db        a consistent snapshot of the store (SQLite's VACUUM INTO, through a read-only
//!               connection: the running hub is neither stopped nor blocked)
//! tls/ca.pem    the cluster CA: agents trust the hub because its certificate chains to it
//! tls/ca.key    (the hub's own serving certificate is issued again at every start)
//! token         the join token (its CA fingerprint is what joining agents pin)
//! cluster.key   the key ring that seals configs, secrets and keys in the store
//! admin.yaml    the admin's CLI config
//! ```
//! Every file is written 0600, the directory 0700: the backup is as secret as the data dir.
//! Restoring puts the files back into a data dir that holds no hub (refused otherwise), so a
//! hub started on it has the same CA, store and keys: agents reconnect with their certificates
//! as after a restart, and what they run is kept.
//!
//! With PostgreSQL the store is the database's: back it up with `pg_dump` and keep the cluster
//! key file; [`backup`] says so rather than copying keys alone.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::ConnectOptions as _;
use sqlx::sqlite::SqliteConnectOptions;

use crate::fsutil::write_private;

/// The files of a backup besides `hub.db`, relative to the data dir; `true`: required.
const FILES: [(&str, bool); 5] =
    [("tls/ca.pem", true), ("tls/ca.key", true), ("token", true), ("cluster.key", false), ("admin.yaml", false)];

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "{0} holds no hub.db: a hub on PostgreSQL keeps its state in the database; back it up with pg_dump and keep a copy of the cluster key file (--cluster-key-file, default DATA_DIR/cluster.key)"
    )]
    NoStore(PathBuf),
    #[error("{0} is missing: is this a hub's data dir (or a backup of one)?")]
    Missing(PathBuf),
    #[error("{0} already holds a hub (hub.db): restore into an empty data dir, or move this one away first")]
    NotEmpty(PathBuf),
    #[error("{0} exists: a backup goes into a new directory")]
    Exists(PathBuf),
    #[error("snapshot of {path}: {source}")]
    Snapshot { path: PathBuf, source: sqlx::Error },
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] crate::fsutil::WriteError),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
    move |source| BackupError::Io { action, path: path.to_path_buf(), source }
}

/// Makes `dir` (and `dir/tls`) readable by the owner only; `dir` must not exist unless
/// `may_exist`.
fn private_dir(dir: &Path, may_exist: bool) -> Result<(), BackupError> {
    if dir.exists() && !may_exist {
        return Err(BackupError::Exists(dir.to_path_buf()));
    }
    for d in [dir.to_path_buf(), dir.join("tls")] {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(io("create", &d))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).map_err(io("chmod", &d))?;
    }
    Ok(())
}

/// Copies the key and config files from `from` to `to` (0600 each).
fn copy_files(from: &Path, to: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut copied = Vec::new();
    for (name, required) in FILES {
        let src = from.join(name);
        if !src.exists() {
            if required {
                return Err(BackupError::Missing(src));
            }
            continue;
        }
        let data = fs::read(&src).map_err(io("read", &src))?;
        write_private(&to.join(name), &data)?;
        copied.push(PathBuf::from(name));
    }
    Ok(copied)
}

/// Backs up the hub whose data dir is `data_dir` (running or not) into the new directory
/// `to`. Returns the files written, relative to `to`. `cluster_key` is the hub's
/// `--cluster-key-file` when it is not the data dir's `cluster.key`.
pub async fn backup(data_dir: &Path, cluster_key: Option<&Path>, to: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let db = data_dir.join("hub.db");
    if !db.exists() {
        return Err(BackupError::NoStore(data_dir.to_path_buf()));
    }
    for (name, required) in FILES {
        if required && !data_dir.join(name).exists() {
            return Err(BackupError::Missing(data_dir.join(name)));
        }
    }
    private_dir(to, false)?;
    let snapshot = to.join("hub.db");
    let snap = |source| BackupError::Snapshot { path: db.clone(), source };
    let mut conn = SqliteConnectOptions::from_str("sqlite://")
        .map_err(snap)?
        .filename(&db)
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(snap)?;
    sqlx::query("VACUUM INTO ?")
        .bind(snapshot.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await
        .map_err(snap)?;
    drop(conn);
    fs::set_permissions(&snapshot, fs::Permissions::from_mode(0o600)).map_err(io("chmod", &snapshot))?;
    let mut written = vec![PathBuf::from("hub.db")];
    written.extend(copy_files(data_dir, to)?);
    if let Some(key) = cluster_key {
        let data = fs::read(key).map_err(io("read", key))?;
        write_private(&to.join("cluster.key"), &data)?;
        if !written.iter().any(|p| p == Path::new("cluster.key")) {
            written.push(PathBuf::from("cluster.key"));
        }
    }
    fs::File::open(&snapshot).and_then(|f| f.sync_all()).map_err(io("sync", &snapshot))?;
    Ok(written)
}

/// Puts the backup in `from` into `data_dir`, which must hold no hub. Returns the files
/// written, relative to `data_dir`.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let snapshot = from.join("hub.db");
    if !snapshot.exists() {
        return Err(BackupError::Missing(snapshot));
    }
    if data_dir.join("hub.db").exists() {
        return Err(BackupError::NotEmpty(data_dir.to_path_buf()));
    }
    for (name, required) in FILES {
        if required && !from.join(name).exists() {
            return Err(BackupError::Missing(from.join(name)));
        }
    }
    private_dir(data_dir, true)?;
    let mut written = copy_files(from, data_dir)?;
    // The store last: a data dir with hub.db is a hub's, so an interrupted restore can be run
    // again.
    let data = fs::read(&snapshot).map_err(io("read", &snapshot))?;
    write_private(&data_dir.join("hub.db"), &data)?;
    written.insert(0, PathBuf::from("hub.db"));
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    async fn hub_dir(dir: &Path) -> Store {
        fs::create_dir_all(dir.join("tls")).unwrap();
        for (name, _) in FILES {
            fs::write(dir.join(name), format!("contents of {name}")).unwrap();
        }
        Store::open(&dir.join("hub.db")).await.unwrap()
    }

    #[tokio::test]
    async fn a_backup_of_a_running_store_restores_into_an_empty_dir_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, out, fresh) = (tmp.path().join("hub"), tmp.path().join("backup"), tmp.path().join("restored"));
        let store = hub_dir(&data).await;
        let id = store.id().to_string();
        // The store stays open (a running hub) while the backup is taken.
        let written = backup(&data, None, &out).await.unwrap();
        assert_eq!(written.len(), 6, "{written:?}");
        for f in &written {
            let mode = fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o700);
        // Not twice into the same place.
        assert!(matches!(backup(&data, None, &out).await, Err(BackupError::Exists(_))));
        drop(store);

        restore(&out, &fresh).unwrap();
        assert_eq!(fs::read_to_string(fresh.join("tls/ca.key")).unwrap(), "contents of tls/ca.key");
        let restored = Store::open(&fresh.join("hub.db")).await.unwrap();
        assert_eq!(restored.id(), id, "the same cluster, not a new one");
        // Never over a hub.
        assert!(matches!(restore(&out, &fresh), Err(BackupError::NotEmpty(_))));
        assert!(matches!(restore(&out, &data), Err(BackupError::NotEmpty(_))));
    }

    #[tokio::test]
    async fn without_a_store_or_a_key_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, out) = (tmp.path().join("hub"), tmp.path().join("backup"));
        fs::create_dir_all(&data).unwrap();
        let e = backup(&data, None, &out).await.unwrap_err();
        assert!(e.to_string().contains("pg_dump"), "{e}");
        let _store = hub_dir(&data).await;
        fs::remove_file(data.join("tls/ca.key")).unwrap();
        assert!(matches!(backup(&data, None, &out).await, Err(BackupError::Missing(p)) if p.ends_with("tls/ca.key")));
        assert!(!out.exists(), "a refused backup leaves nothing behind");
        assert!(matches!(restore(&out, &tmp.path().join("x")), Err(BackupError::Missing(_))));
    }
}
