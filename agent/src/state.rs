//! The agent's durable state: the last assignment set it received, with its generation,
//! written before the agent acknowledges it (on boot the agent starts from this file with no
//! hub contact); and the replicas' last statuses, so restart counts and event histories
//! carry over an agent restart and the next process can tell how the last one ended.
//! Both go through [`crate::durable::write_atomic`].

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::messages::{AssignmentSet, ReplicaStatus};
use serde::{Deserialize, Serialize};

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
    #[error("cannot encode {path}: {source}")]
    Encode { path: PathBuf, source: serde_json::Error },
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
        Ok(load_json(&self.path)?.unwrap_or_default())
    }

    /// Writes `set` durably: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, set: &AssignmentSet) -> Result<(), StateError> {
        save_json(&self.path, set)
    }
}

/// The JSON file at `path`, or `None` if there is none.
pub(crate) fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io { action: "read", path: path.to_path_buf(), source }),
    }
}

/// Writes `value` as JSON to `path` durably (0600), creating its directory.
pub(crate) fn save_json(path: &Path, value: &impl Serialize) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let bytes = serde_json::to_vec(value).map_err(|source| StateError::Encode { path: path.to_path_buf(), source })?;
    crate::durable::write_atomic(path, &bytes, 0o600).map_err(io_err("write", path))
}

/// The replicas' statuses as one agent process left them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedStatuses {
    /// Written by an agent that stopped cleanly (SIGTERM/SIGINT); a running agent keeps it
    /// `false`, so a crash, a kill or a power cut leaves `false` behind.
    pub clean: bool,
    /// The agent stopped its workloads when it exited (`--stop-workloads-on-exit`).
    #[serde(default)]
    pub workloads_stopped: bool,
    /// `/proc/sys/kernel/random/boot_id` of the boot the agent ran in: a different one at the
    /// next start means the node rebooted.
    #[serde(default)]
    pub boot_id: String,
    /// Wall-clock time of the save (ms since the epoch).
    pub saved_at_ms: u64,
    pub statuses: BTreeMap<String, ReplicaStatus>,
}

/// `state/statuses.json`. Saves may come from several tasks: each carries a sequence number
/// and an older one never overwrites a newer one.
pub struct StatusFile {
    path: PathBuf,
    // std Mutex: held for one small write, never across an await (saves run on blocking
    // threads).
    written: Mutex<u64>,
}

impl StatusFile {
    pub fn new(dir: &Path) -> StatusFile {
        StatusFile { path: dir.join("statuses.json"), written: Mutex::new(0) }
    }

    /// The statuses a previous agent process saved, if any.
    pub fn load(&self) -> Result<Option<SavedStatuses>, StateError> {
        load_json(&self.path)
    }

    /// Saves `saved` as save number `seq`, unless a later save already happened.
    pub fn save(&self, seq: u64, saved: &SavedStatuses) -> Result<(), StateError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if seq <= *written {
            return Ok(());
        }
        save_json(&self.path, saved)?;
        *written = seq;
        Ok(())
    }
}

/// This boot's id, or an empty string where the kernel does not say.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
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

    #[test]
    fn an_older_status_save_never_overwrites_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = StatusFile::new(dir.path());
        assert_eq!(file.load().unwrap(), None);
        let newer = SavedStatuses { clean: true, saved_at_ms: 2, ..Default::default() };
        file.save(2, &newer).unwrap();
        file.save(1, &SavedStatuses { saved_at_ms: 1, ..Default::default() }).unwrap();
        assert_eq!(file.load().unwrap(), Some(newer));
    }
}
