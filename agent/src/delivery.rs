//! Configs and secrets on the node: which versions the hub's set asks for, fetching them over
//! the session, keeping them sealed on disk ([`crate::objects::ObjectCache`]) and plaintext
//! only in this process and on tmpfs, where each replica's config and secret volumes live
//! (`<secrets dir>/<replica>/<volume>`, updated in place by an atomic swap).
//!
//! The event loop owns [`Objects`]; fetches run as tasks over the current connection
//! ([`fetch`]) and come back as events. A replica is started from a template [`Objects::resolve`]
//! made concrete: environment values filled in, config and secret volumes turned into
//! read-only host directories on tmpfs, so the runtimes need know nothing of objects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use proto::manifest::ReplicaTemplate;
use proto::messages::{AgentRequest, AssignmentSet, ObjectAnswer};
use proto::objects::{ObjectData, ObjectRef, ObjectVersion};
use tokio::sync::watch;
use tracing::{info, warn};
use transport::frame;

use crate::objects::{self, ObjectCache};

/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Fetch attempts before giving up until the next set (or connection) asks again.
const FETCH_ATTEMPTS: u32 = 5;

/// Why a template cannot start as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// An object or one of its keys is not on the node (yet): the replica waits for it.
    Waiting(String),
    /// The node cannot give the replica its volumes (no tmpfs, a write failed).
    Failed(String),
}

/// Why a fetch gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("refused by the hub: {0}")]
    Refused(String),
    #[error("not connected to the hub")]
    NotConnected,
    #[error("cannot open a stream to the hub: {0}")]
    Stream(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] transport::frame::FrameError),
    #[error("the hub closed the stream without an answer")]
    NoAnswer,
    #[error("no answer in time")]
    TimedOut,
}

/// An object a template reads that the node does not hold.
#[derive(Debug, thiserror::Error)]
enum Missing {
    #[error("waiting for {0}: not yet fetched from the hub")]
    NotFetched(ObjectRef),
    #[error("{0} not found: the replica starts once it exists")]
    NotFound(ObjectRef),
}

/// Why a config or secret volume could not be written.
#[derive(Debug, thiserror::Error)]
enum VolumeError {
    #[error(transparent)]
    MissingKey(#[from] objects::MissingKey),
    #[error(transparent)]
    NoTmpfs(std::io::Error),
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

pub struct Objects {
    cache: ObjectCache,
    /// Plaintext of what the cache holds, loaded once at start.
    loaded: BTreeMap<ObjectRef, (ObjectVersion, ObjectData)>,
    /// The versions the current set names (objects that exist on the hub).
    wanted: BTreeMap<ObjectRef, ObjectVersion>,
    /// Fetches in flight.
    fetching: BTreeSet<ObjectRef>,
    /// tmpfs: one directory per replica that has config or secret volumes.
    root: PathBuf,
}

impl Objects {
    /// Opens the cache and loads what it holds. Unreadable entries (another node key, altered)
    /// are dropped with a warning: the hub gives them again.
    pub fn open(cache: ObjectCache, root: PathBuf) -> Objects {
        let mut loaded = BTreeMap::new();
        for r in cache.list().unwrap_or_default() {
            match cache.load(&r) {
                Ok(Some(entry)) => {
                    loaded.insert(r, entry);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(object = %r, error = %e, "dropping an unreadable cached object");
                    let _ = cache.remove(&r);
                }
            }
        }
        Objects { cache, loaded, wanted: BTreeMap::new(), fetching: BTreeSet::new(), root }
    }

    /// Takes the set's versions; returns those to fetch (not held at that version and not
    /// already being fetched). Cached objects no assignment reads any more are forgotten.
    pub fn want(&mut self, set: &AssignmentSet) -> Vec<ObjectRef> {
        let read: BTreeSet<ObjectRef> = set.assignments.iter().flat_map(|a| a.template.objects()).collect();
        self.wanted =
            set.objects.iter().filter(|v| read.contains(&v.reference())).map(|v| (v.reference(), v.clone())).collect();
        let stale: Vec<ObjectRef> = self.loaded.keys().filter(|r| !read.contains(*r)).cloned().collect();
        for r in stale {
            self.loaded.remove(&r);
            if let Err(e) = self.cache.remove(&r) {
                warn!(object = %r, error = %e, "cannot remove a cached object");
            }
        }
        self.missing()
    }

    /// Wanted versions not held and not being fetched; marks them as being fetched.
    pub fn missing(&mut self) -> Vec<ObjectRef> {
        let out: Vec<ObjectRef> = self
            .wanted
            .iter()
            .filter(|(r, v)| self.loaded.get(*r).is_none_or(|(have, _)| have.version != v.version))
            .filter(|(r, _)| !self.fetching.contains(*r))
            .map(|(r, _)| r.clone())
            .collect();
        self.fetching.extend(out.iter().cloned());
        out
    }

    /// A fetch ended. On success the object is sealed to the cache and held; returns whether
    /// it is new content (running replicas' volumes need refreshing).
    pub fn fetched(&mut self, r: &ObjectRef, result: Result<(ObjectVersion, ObjectData), FetchError>) -> bool {
        self.fetching.remove(r);
        let (version, data) = match result {
            Ok(v) => v,
            Err(e) => {
                warn!(object = %r, error = %e, "cannot fetch an object from the hub");
                return false;
            }
        };
        if data.reference() != *r || data.digest() != version.digest {
            warn!(object = %r, "the hub's answer does not match the version asked for; dropped");
            return false;
        }
        if let Err(e) = self.cache.save(&version, &data) {
            // Held in memory all the same: the replica runs; only an offline restart needs it.
            warn!(object = %r, error = %e, "cannot store a fetched object");
        }
        info!(object = %r, version = version.version, "object fetched");
        let changed = self.loaded.get(r).is_none_or(|(have, _)| have.digest != version.digest);
        self.loaded.insert(r.clone(), (version, data));
        changed
    }

    /// The objects `t` reads, or why it cannot start yet, naming the missing one.
    fn lookup(&self, t: &ReplicaTemplate) -> Result<BTreeMap<ObjectRef, ObjectData>, Missing> {
        let mut out = BTreeMap::new();
        for r in t.objects() {
            match self.loaded.get(&r) {
                Some((_, data)) => {
                    out.insert(r, data.clone());
                }
                None if self.wanted.contains_key(&r) || self.fetching.contains(&r) => {
                    return Err(Missing::NotFetched(r));
                }
                None => return Err(Missing::NotFound(r)),
            }
        }
        Ok(out)
    }

    /// `t` made concrete for a start: environment values in `env`, config and secret volumes
    /// as read-only directories on tmpfs. An error says what is missing.
    pub fn resolve(&self, replica: &str, t: &ReplicaTemplate) -> Result<ReplicaTemplate, Unresolved> {
        if t.objects().is_empty() {
            return Ok(t.clone());
        }
        let data = self.lookup(t).map_err(|e| Unresolved::Waiting(e.to_string()))?;
        for v in &t.volumes {
            if let Some(r) = v.object() {
                objects::volume_files(v, &data[&r]).map_err(|e| Unresolved::Waiting(e.to_string()))?;
            }
        }
        let mut out = t.clone();
        out.env = objects::environment(t, &data).map_err(|e| Unresolved::Waiting(e.to_string()))?.into_iter().collect();
        out.env_refs.clear();
        out.env_from.clear();
        for v in out.volumes.iter_mut() {
            let Some(r) = v.object() else { continue };
            let dir = self.volume_dir(replica, &v.name);
            self.write_volume(&dir, v, &data[&r]).map_err(|e| Unresolved::Failed(e.to_string()))?;
            v.host_path = Some(dir.display().to_string());
            v.read_only = true;
            v.config = None;
            v.secret = None;
            v.items.clear();
        }
        Ok(out)
    }

    /// Rewrites, in place, the volumes of `replica` that hold `r` (a new version arrived).
    pub fn refresh(&self, replica: &str, t: &ReplicaTemplate, r: &ObjectRef) {
        let Some((_, data)) = self.loaded.get(r) else { return };
        for v in t.volumes.iter().filter(|v| v.object().as_ref() == Some(r)) {
            let dir = self.volume_dir(replica, &v.name);
            if !dir.exists() {
                continue;
            }
            match self.write_volume(&dir, v, data) {
                Ok(()) => info!(%replica, volume = %v.name, object = %r, "volume updated in place"),
                Err(e) => warn!(%replica, volume = %v.name, error = %e, "cannot update a volume"),
            }
        }
    }

    fn volume_dir(&self, replica: &str, volume: &str) -> PathBuf {
        self.root.join(replica).join(volume)
    }

    fn write_volume(
        &self,
        dir: &std::path::Path,
        v: &proto::manifest::Volume,
        data: &ObjectData,
    ) -> Result<(), VolumeError> {
        let files = objects::volume_files(v, data)?;
        objects::ensure_tmpfs(&self.root).map_err(VolumeError::NoTmpfs)?;
        let io = |action| move |source| VolumeError::Io { action, path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io("create"))?;
        objects::write_files(dir, &files).map_err(io("write"))
    }

    /// Removes a replica's volumes (it left the node).
    pub fn remove_replica(&self, replica: &str) {
        let dir = self.root.join(replica);
        if dir.exists()
            && let Err(e) = objects::remove_dir(&dir)
        {
            warn!(%replica, error = %e, "cannot remove the replica's config and secret volumes");
        }
    }
}

/// Fetches `r` over the current connection, waiting for one, retrying transient failures
/// a few times. A refusal is final.
pub async fn fetch(
    mut conn: watch::Receiver<Option<quinn::Connection>>,
    r: ObjectRef,
) -> Result<(ObjectVersion, ObjectData), FetchError> {
    let mut last = FetchError::NotConnected;
    for attempt in 0..FETCH_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
        }
        let current = conn.borrow_and_update().clone();
        let Some(c) = current else {
            last = FetchError::NotConnected;
            let _ = tokio::time::timeout(FETCH_TIMEOUT, conn.changed()).await;
            continue;
        };
        let exchange = async {
            let (mut send, mut recv) = c.open_bi().await?;
            frame::write(&mut send, &AgentRequest::Object { object: r.clone() }).await?;
            let _ = send.finish();
            Ok::<_, FetchError>(frame::read::<ObjectAnswer>(&mut recv).await?)
        };
        match tokio::time::timeout(FETCH_TIMEOUT, exchange).await {
            Ok(Ok(Some(ObjectAnswer::Found { version, data }))) => return Ok((version, data)),
            Ok(Ok(Some(ObjectAnswer::Refused { message }))) => return Err(FetchError::Refused(message)),
            Ok(Ok(None)) => last = FetchError::NoAnswer,
            Ok(Err(e)) => last = e,
            Err(_) => last = FetchError::TimedOut,
        }
    }
    Err(last)
}
