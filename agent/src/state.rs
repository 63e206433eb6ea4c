//! The agent's durable desired state: the last assignment set it received, with its
//! generation, written atomically and fsynced before the agent acknowledges it. On boot the
//! agent starts from this file with no hub contact.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use proto::messages::AssignmentSet;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError + use<> {
    let path = path.to_path_buf();
    move |source| StateError::Io { action, path, source }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("corrupt state file {path}: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile { path: dir.join("assignments.json") }
    }

    /// The persisted set, or an empty set at generation 0 if none was ever saved.
    pub fn load(&self) -> Result<AssignmentSet, StateError> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path: self.path.clone(), source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AssignmentSet::default()),
            Err(source) => Err(StateError::Io { action: "read", path: self.path.clone(), source }),
        }
    }

    /// Writes `set` durably: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, set: &AssignmentSet) -> Result<(), StateError> {
        let dir = self.path.parent().expect("state file has a parent");
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&serde_json::to_vec(set).expect("assignment set serializes")).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io_err("rename", &self.path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync", dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::new(dir.path());
        assert_eq!(state.load().unwrap().generation, 0);
        state.save(&AssignmentSet { generation: 4, ..Default::default() }).unwrap();
        assert_eq!(state.load().unwrap().generation, 4);
        fs::write(dir.path().join("assignments.json"), b"{garbage").unwrap();
        assert!(matches!(state.load(), Err(StateError::Corrupt { .. })));
    }
}
