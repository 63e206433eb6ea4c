//! The hub's state store: the desired state (workloads), the nodes, the placements and their
//! observed status, plus the few cluster-wide records several hubs share (the controller lease,
//! the cluster identity). It is the only module that speaks SQL, and it never reads the clock:
//! timestamps come from the caller, except lease expiry, which uses the database's own clock.
//!
//! Two backends, one schema and one text per query ([`db`] explains the dialect bridge):
//! - **SQLite** (embedded default): one file in the hub's data dir, WAL, `synchronous=FULL`, so
//!   a commit the API acknowledged survives a SIGKILL or a power loss. One hub.
//! - **PostgreSQL** (`--datastore postgres://...`): several hubs share it. Read-modify-write
//!   transactions take one cluster-wide advisory lock, the PostgreSQL twin of SQLite's
//!   `BEGIN IMMEDIATE`; single-statement writes (heartbeats, acks) rely on row atomicity.
//!   Serializing writers costs little at a hub's write rate and rules out lost updates,
//!   deadlocks between multi-row writers and serialization-failure retries.
//!
//! Invariants:
//! - Every write that changes what a node must run bumps that node's `generation` in the same
//!   transaction, so an agent that acknowledged generation `g` has seen every change up to it;
//!   generations only grow, whichever hub writes.
//! - A workload's `revision` grows by one per stored change. Stored manifests never carry
//!   `metadata.resourceVersion`; an apply that carries one is refused with
//!   [`StoreError::Conflict`] unless it equals the stored revision (optimistic concurrency).
//! - The store persists what a controller pass decided ([`Store::write_pass`]) and decides
//!   nothing itself. A pass is written whole or not at all, and only while what it read still
//!   holds: every workload at the revision it saw, every replica row it changes on the node
//!   and template it saw. So a finished Job attempt's replica row is deleted in the
//!   transaction that records its outcome in `job_indexes`, and each attempt counts once
//!   however often a pass is replayed.
//! - Passes written "as leader" commit only while the writer still holds the lease (checked
//!   under the write lock, by the database clock): a deposed leader cannot overwrite its
//!   successor's decisions.

mod db;
mod events;
mod identity;
mod network;
mod objects;
mod routes;
mod services;
mod upgrades;
mod users;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use proto::manifest::Manifest;
use proto::messages::{Assignment, AssignmentSet, NodeFacts, ReplicaStatus};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

use self::db::{Pool, Rec, Tx};
pub use self::events::{EVENTS_KEPT, EventRow};
pub use self::identity::{Admitted, NewToken, SessionStart, TokenRow};
pub use self::network::SubnetOutcome;
pub use self::objects::{AppliedDocuments, NewObject, ObjectDeletion, ObjectRow};
pub use self::routes::{AppliedServices, ApplyRefusal, RouteRow};
pub use self::services::{ServiceDeletion, ServiceRefusal, ServiceRow};
pub use self::upgrades::{NewUpgrade, UpgradeOrder};
pub use self::users::{AUDIT_KEEP, AuditEntry, NewUser, UserRefusal, UserRow};
use crate::controller::time::ClockAnchor;
use crate::controller::{self, JobIndex, Pass, Reported, RevisionEntry, RolloutRecord, WriteOp};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("cannot migrate the store: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("user {user:?} in the store has an {source}")]
    BadRole { user: String, source: proto::messages::UnknownRole },
    #[error("corrupt {what} record {name:?} in the store: {source}")]
    Corrupt { what: &'static str, name: String, source: serde_json::Error },
    /// An apply carried `metadata.resourceVersion` and the stored workload moved on.
    #[error("workload {name} was changed since revision {expected} ({now}); get it again and re-apply")]
    Conflict { name: String, expected: u64, now: String },
    /// A controller pass that gives a replica a template it does not carry (a bug).
    #[error("the controller pass gives replica {replica} the template of workload {workload} but carries none")]
    PassWithoutTemplate { replica: String, workload: String },
    /// A leader-only write whose writer no longer holds the lease.
    #[error("lease {lease:?} is no longer held by {holder}; write refused")]
    NotLeader { lease: String, holder: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Where a hub keeps its state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Datastore {
    /// The embedded SQLite file `hub.db` in the hub's data dir.
    #[default]
    Sqlite,
    /// A PostgreSQL connection URL (`postgres://user:pass@host:port/db`), shared by all hubs.
    Postgres(String),
}

/// A `--datastore` value that names no supported store.
#[derive(Debug, thiserror::Error)]
#[error("unsupported datastore {0:?}: use sqlite or a postgres://USER@HOST:PORT/DB URL")]
pub struct UnsupportedDatastore(pub String);

impl FromStr for Datastore {
    type Err = UnsupportedDatastore;

    /// `sqlite` (or an empty string) for the embedded store; `postgres://...` or
    /// `postgresql://...` for PostgreSQL.
    fn from_str(s: &str) -> std::result::Result<Self, UnsupportedDatastore> {
        if s.is_empty() || s == "sqlite" {
            Ok(Datastore::Sqlite)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Datastore::Postgres(s.to_string()))
        } else {
            Err(UnsupportedDatastore(s.to_string()))
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkloadRow {
    /// As applied, without `metadata.resourceVersion`.
    pub manifest: Manifest,
    pub revision: u64,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    /// What the hub uses: the agent's claims under the admin's labels and taints, reserved
    /// labels dropped, capacity held to what it reported at join (see
    /// [`crate::identity::effective`]).
    pub facts: NodeFacts,
    /// What the agent claimed in its last hello.
    pub claimed: NodeFacts,
    /// What the hub ignored or held back of `claimed`.
    pub notices: Vec<crate::identity::Notice>,
    pub admin_labels: BTreeMap<String, String>,
    pub admin_taints: Vec<proto::manifest::Taint>,
    /// The node's current certificate (SHA-256 of its DER), once recorded.
    pub cert_sha256: Option<String>,
    /// When the current certificate expires, once the hub has seen it (at a connect or a
    /// renewal).
    pub cert_not_after_ms: Option<u64>,
    /// The join token it joined with.
    pub joined_with: String,
    /// An admin let a join under this name through until then.
    pub rejoin_until_ms: Option<u64>,
    /// Capacity of its first hello after joining.
    pub joined_capacity: Option<crate::identity::Capacity>,
    /// Why it is not on its current set (the agent refused it, or it could not be sent).
    pub problem: String,
    pub generation: u64,
    pub acked_generation: u64,
    pub joined_at_ms: u64,
    pub last_seen_ms: Option<u64>,
    /// The hub holding the node's agent session, if any (see [`Store::set_node_session`]).
    pub connected_via: Option<String>,
    /// No new placements (see [`Store::set_node_scheduling`]).
    pub cordoned: bool,
    /// Cordoned, and its replicas are being moved off.
    pub draining: bool,
}

/// A replica as the API shows it: placement and status, and which template it runs by hash.
/// The template itself (as large as a workload's environment) is read only where a node's
/// set is built ([`Store::assignment_set`]), so listing replicas stays cheap.
#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub name: String,
    pub workload: String,
    pub index: u32,
    pub node: Option<String>,
    pub template_hash: String,
    pub status: ReplicaStatus,
    pub unschedulable: String,
    /// A Job replica's attempt number (see migration 0010); `None` for other kinds.
    pub attempt: Option<u32>,
}

/// A Job attempt that ended (table `job_attempts`): where it ran and the status its node
/// last reported (its termination and last output lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAttemptRow {
    pub workload: String,
    pub index: u32,
    pub attempt: u32,
    pub replica: String,
    pub node: String,
    pub succeeded: bool,
    pub status: ReplicaStatus,
    /// When the attempt was recorded (hub wall clock, for display).
    pub finished_at_ms: u64,
}

/// What the controller reads for one pass (see [`Store::controller_rows`]).
#[derive(Debug, Clone)]
pub struct ControllerRows {
    pub workloads: Vec<WorkloadRow>,
    pub nodes: Vec<NodeRow>,
    pub replicas: Vec<controller::Replica>,
    pub job_indexes: Vec<JobIndex>,
    pub rollouts: Vec<RolloutRecord>,
    pub revisions: Vec<RevisionEntry>,
    /// Where cluster time stood at the last pass written ([`crate::controller::time`]).
    pub clock: Option<ClockAnchor>,
}

/// What [`Store::write_pass`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Done,
    /// Nothing: the pass was computed from rows that changed since. Run it again.
    Stale(Stale),
}

/// What changed under a pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error("workloads were applied or deleted since the pass read them")]
    Workloads,
    #[error("replica {0} changed since the pass read it")]
    Replica(String),
}

/// A `SELECT name, manifest, revision, created_at_ms FROM workloads` row.
fn workload_row(r: &Rec) -> Result<WorkloadRow> {
    let name = r.text(0)?;
    Ok(WorkloadRow {
        manifest: serde_json::from_str(&r.text(1)?).map_err(corrupt("workload", &name))?,
        revision: r.u64(2)?,
        created_at_ms: r.u64(3)?,
    })
}

/// One template a workload had (`flotilla rollout history`).
#[derive(Debug, Clone)]
pub struct RevisionRow {
    /// The workload's revision when this template was applied.
    pub revision: u64,
    pub template_hash: String,
    pub manifest: Manifest,
    /// "apply", "undo to revision N", or why the controller rolled back.
    pub cause: String,
    pub created_at_ms: u64,
}

async fn record_revision(tx: &mut Tx, name: &str, revision: u64, m: &Manifest, cause: &str, now_ms: u64) -> Result<()> {
    let (hash, json) = (m.template().hash(), to_json(m));
    tx.exec(
        "INSERT INTO workload_revisions (workload, revision, template_hash, manifest, cause, created_at_ms) \
         VALUES (?, ?, ?, ?, ?, ?)",
        &[name.into(), revision.into(), (&hash).into(), (&json).into(), cause.into(), now_ms.into()],
    )
    .await?;
    Ok(())
}

const REVISIONS_OF: &str = "SELECT revision, template_hash, manifest, cause, created_at_ms FROM workload_revisions \
     WHERE workload = ? ORDER BY revision";

/// A [`REVISIONS_OF`] row.
fn revision_row(r: &Rec, workload: &str) -> Result<RevisionRow> {
    Ok(RevisionRow {
        revision: r.u64(0)?,
        template_hash: r.text(1)?,
        manifest: serde_json::from_str(&r.text(2)?).map_err(corrupt("workload revision", workload))?,
        cause: r.text(3)?,
        created_at_ms: r.u64(4)?,
    })
}

/// Stores one manifest inside a write transaction (see [`Store::apply_workloads`]).
async fn apply_in(tx: &mut Tx, given: &Manifest, now_ms: u64, cause: &str) -> Result<Applied> {
    let m = objects::stamp(tx, stored_form(given)).await?;
    let name = &m.metadata.name;
    let json = to_json(&m);
    let existing = tx.fetch_optional("SELECT manifest, revision FROM workloads WHERE name = ?", &[name.into()]).await?;
    let existing = match existing {
        Some(r) => Some((r.text(0)?, r.u64(1)?)),
        None => None,
    };
    if let Some(expected) = given.metadata.resource_version {
        let current = existing.as_ref().map(|(_, rev)| *rev);
        if current != Some(expected) {
            return Err(StoreError::Conflict {
                name: name.clone(),
                expected,
                now: match current {
                    Some(rev) => format!("now {rev}"),
                    None => "it was deleted".into(),
                },
            });
        }
    }
    Ok(match existing {
        None => {
            tx.exec(
                "INSERT INTO workloads (name, manifest, revision, created_at_ms, updated_at_ms) VALUES (?, ?, 1, ?, ?)",
                &[name.into(), (&json).into(), now_ms.into(), now_ms.into()],
            )
            .await?;
            record_revision(tx, name, 1, &m, cause, now_ms).await?;
            Applied::Created
        }
        Some((old_json, revision)) => {
            let old: Manifest = serde_json::from_str(&old_json).map_err(corrupt("workload", name))?;
            if stored_form(&old) == m {
                Applied::Unchanged
            } else {
                tx.exec(
                    "UPDATE workloads SET manifest = ?, revision = revision + 1, updated_at_ms = ? WHERE name = ?",
                    &[(&json).into(), now_ms.into(), name.into()],
                )
                .await?;
                if old.template().hash() != m.template().hash() {
                    record_revision(tx, name, revision + 1, &m, cause, now_ms).await?;
                }
                Applied::Configured
            }
        }
    })
}

/// What `apply_workloads` did to one manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    /// Grows by one each time the lease changes holder.
    pub term: u64,
    /// Expiry by the database's clock.
    pub expires_at_ms: u64,
}

/// A leader-only write names the lease and holder it is made under.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    pub lease: &'a str,
    pub holder: &'a str,
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// The store's identity (see [`Store::id`]).
    id: String,
}

fn corrupt<'a>(what: &'static str, name: &'a str) -> impl FnOnce(serde_json::Error) -> StoreError + 'a {
    move |source| StoreError::Corrupt { what, name: name.to_string(), source }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("store records serialize")
}

/// The manifest as stored: without the revision it was read at, and with a Replicated
/// workload's default replica count spelled out (as stores written before the count became
/// optional hold it), so comparisons stay stable.
fn stored_form(m: &Manifest) -> Manifest {
    let mut m = m.clone();
    m.metadata.resource_version = None;
    if m.spec.kind == proto::manifest::WorkloadKind::Replicated && m.spec.replicas.is_none() {
        m.spec.replicas = Some(1);
    }
    m
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        // The store holds the cluster's secrets: only the hub's user may read it. SQLite gives
        // its -wal and -shm files the database file's mode, so setting it here covers them.
        private_file(path)
            .map_err(|e| StoreError::Open { path: path.display().to_string(), source: sqlx::Error::Io(e) })?;
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with synchronous=FULL: a commit the API acknowledged survives power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = Pool::open_sqlite(opts)
            .await
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        pool.migrate().await?;
        let id = Store::load_identity(&pool).await?;
        Ok(Store { pool, id })
    }

    /// Connects to the PostgreSQL database at `url` and applies migrations (once, however
    /// many hubs start together).
    pub async fn open_postgres(url: &str) -> Result<Store> {
        let pool = Pool::open_postgres(url).await.map_err(|source| StoreError::Open { path: redact(url), source })?;
        pool.migrate().await?;
        let id = Store::load_identity(&pool).await?;
        Ok(Store { pool, id })
    }

    /// Opens the store `datastore` names; `data_dir` holds the SQLite file.
    pub async fn connect(datastore: &Datastore, data_dir: &Path) -> Result<Store> {
        match datastore {
            Datastore::Sqlite => Store::open(&data_dir.join("hub.db")).await,
            Datastore::Postgres(url) => Store::open_postgres(url).await,
        }
    }

    /// `"sqlite"` or `"postgres"`, for logs.
    pub fn backend_name(&self) -> &'static str {
        match self.pool.backend() {
            db::Backend::Sqlite => "sqlite",
            db::Backend::Postgres => "postgres",
        }
    }

    /// Whether other hubs may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.pool.backend() == db::Backend::Postgres
    }

    // -----------------------------------------------------------------------------------------
    // Workloads

    /// Stores `manifests` in one transaction: all or nothing. A manifest identical to the
    /// stored one is left untouched. A manifest carrying `metadata.resourceVersion` is
    /// refused with [`StoreError::Conflict`] (and nothing is stored) unless that is the
    /// workload's current revision.
    pub async fn apply_workloads(&self, manifests: &[Manifest], now_ms: u64) -> Result<Vec<Applied>> {
        self.apply_workloads_because(manifests, now_ms, "apply").await
    }

    /// [`Store::apply_workloads`], recording `cause` with any new template revision.
    pub async fn apply_workloads_because(
        &self,
        manifests: &[Manifest],
        now_ms: u64,
        cause: &str,
    ) -> Result<Vec<Applied>> {
        let mut tx = self.pool.write_tx().await?;
        let mut out = Vec::with_capacity(manifests.len());
        for given in manifests {
            out.push(apply_in(&mut tx, given, now_ms, cause).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Changes one workload in one transaction under the store's write lock: reads it and
    /// its revisions, lets `change` compute the new manifest (or refuse, storing nothing), and
    /// stores that with `cause`. No apply can land between the read and the write, so none
    /// is overwritten unseen. `None`: there is no such workload.
    pub async fn modify_workload<T, E: From<StoreError>>(
        &self,
        name: &str,
        cause: &str,
        now_ms: u64,
        change: impl FnOnce(&WorkloadRow, &[RevisionRow]) -> std::result::Result<(Manifest, T), E>,
    ) -> std::result::Result<Option<(T, Applied)>, E> {
        let mut tx = self.pool.write_tx().await.map_err(StoreError::from)?;
        let row = tx
            .fetch_optional(
                "SELECT name, manifest, revision, created_at_ms FROM workloads WHERE name = ?",
                &[name.into()],
            )
            .await
            .map_err(StoreError::from)?;
        let Some(row) = row else { return Ok(None) };
        let workload = workload_row(&row)?;
        let rows = tx.fetch(REVISIONS_OF, &[name.into()]).await.map_err(StoreError::from)?;
        let revisions = rows.iter().map(|r| revision_row(r, name)).collect::<Result<Vec<_>>>()?;
        let (mut manifest, out) = change(&workload, &revisions)?;
        // What was read is what is written over: the change is made at the revision read.
        manifest.metadata.resource_version = Some(workload.revision);
        let applied = apply_in(&mut tx, &manifest, now_ms, cause).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(Some((out, applied)))
    }

    /// The templates `workload` has had, oldest first.
    pub async fn revisions(&self, workload: &str) -> Result<Vec<RevisionRow>> {
        let rows = self.pool.fetch(REVISIONS_OF, &[workload.into()]).await?;
        rows.iter().map(|r| revision_row(r, workload)).collect()
    }

    /// Deletes the named workloads; returns those that existed and the nodes whose assignment
    /// sets changed (their replicas go with the workload and they get a new generation).
    pub async fn delete_workloads(&self, names: &[String]) -> Result<(Vec<String>, BTreeSet<String>)> {
        let mut tx = self.pool.write_tx().await?;
        let mut deleted = Vec::new();
        let mut nodes = BTreeSet::new();
        for name in names {
            // The nodes that run its replicas, and those that keep logs of its Job attempts
            // (their next set no longer names the workload, so they delete them).
            let rows = tx
                .fetch(
                    "SELECT node FROM replicas WHERE workload = ? AND node IS NOT NULL                      UNION SELECT node FROM job_attempts WHERE workload = ?",
                    &[name.into(), name.into()],
                )
                .await?;
            for r in &rows {
                nodes.insert(r.text(0)?);
            }
            if tx.exec("DELETE FROM workloads WHERE name = ?", &[name.into()]).await? > 0 {
                deleted.push(name.clone());
            }
        }
        for node in &nodes {
            bump_generation(&mut tx, node).await?;
        }
        tx.commit().await?;
        Ok((deleted, nodes))
    }

    pub async fn workloads(&self) -> Result<Vec<WorkloadRow>> {
        let rows =
            self.pool.fetch("SELECT name, manifest, revision, created_at_ms FROM workloads ORDER BY name", &[]).await?;
        rows.iter().map(workload_row).collect()
    }

    /// One workload, if it exists.
    pub async fn workload(&self, name: &str) -> Result<Option<WorkloadRow>> {
        let rows = self
            .pool
            .fetch("SELECT name, manifest, revision, created_at_ms FROM workloads WHERE name = ?", &[name.into()])
            .await?;
        rows.first().map(workload_row).transpose()
    }

    /// Each workload's revision: a cheap change detector for hubs that poll the store.
    pub async fn workload_revisions(&self) -> Result<BTreeMap<String, u64>> {
        let rows = self.pool.fetch("SELECT name, revision FROM workloads", &[]).await?;
        rows.iter().map(|r| Ok((r.text(0)?, r.u64(1)?))).collect()
    }

    // -----------------------------------------------------------------------------------------
    // Nodes

    /// Records a node's facts when it connects; creates the node on first contact.
    pub async fn upsert_node(&self, name: &str, facts: &NodeFacts, now_ms: u64) -> Result<()> {
        let facts = to_json(facts);
        self.pool
            .exec(
                "INSERT INTO nodes (name, facts, joined_at_ms, last_seen_ms) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (name) DO UPDATE SET facts = excluded.facts, last_seen_ms = excluded.last_seen_ms",
                &[name.into(), (&facts).into(), now_ms.into(), now_ms.into()],
            )
            .await?;
        Ok(())
    }

    pub async fn touch_node(&self, name: &str, now_ms: u64) -> Result<()> {
        self.pool.exec("UPDATE nodes SET last_seen_ms = ? WHERE name = ?", &[now_ms.into(), name.into()]).await?;
        Ok(())
    }

    /// Records which hub holds the node's agent session: `Some(hub)` when a session starts,
    /// `None` when it ends. Ending clears the mark only if `hub` still holds it, so a session
    /// that moved to another hub is not marked gone by the old one. `hub` is required even
    /// when ending, to name whose session ended.
    pub async fn set_node_session(&self, name: &str, hub: &str, connected: bool, now_ms: u64) -> Result<()> {
        if connected {
            self.pool.exec(HOLD_NODE, &[hub.into(), now_ms.into(), name.into()]).await?;
        } else {
            self.pool
                .exec(
                    "UPDATE nodes SET connected_via = NULL, last_seen_ms = ? WHERE name = ? AND connected_via = ?",
                    &[now_ms.into(), name.into(), hub.into()],
                )
                .await?;
        }
        Ok(())
    }

    /// Sets the operator's scheduling controls of a node (a drain implies a cordon: `draining`
    /// also sets `cordoned`). Returns false when no such node exists.
    pub async fn set_node_scheduling(&self, name: &str, cordoned: bool, draining: bool) -> Result<bool> {
        let flag = |b: bool| i64::from(b);
        let n = self
            .pool
            .exec(
                "UPDATE nodes SET cordoned = ?, draining = ? WHERE name = ?",
                &[flag(cordoned || draining).into(), flag(draining).into(), name.into()],
            )
            .await?;
        Ok(n > 0)
    }

    /// Raises the node's acknowledged generation to `generation` (never lowers it).
    pub async fn ack_generation(&self, name: &str, generation: u64) -> Result<()> {
        self.pool
            .exec(
                "UPDATE nodes SET acked_generation = ? WHERE name = ? AND acked_generation < ?",
                &[generation.into(), name.into(), generation.into()],
            )
            .await?;
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = self.pool.fetch(&format!("SELECT {} ORDER BY name", identity::NODE_COLUMNS), &[]).await?;
        rows.iter().map(identity::node_row).collect()
    }

    /// The assignment set a node must run, at its current generation.
    pub async fn assignment_set(&self, node: &str) -> Result<AssignmentSet> {
        let mut tx = self.pool.read_tx().await?;
        let generation = match tx.fetch_optional("SELECT generation FROM nodes WHERE name = ?", &[node.into()]).await? {
            Some(r) => r.u64(0)?,
            None => 0,
        };
        let rows = tx
            .fetch(
                "SELECT name, workload, template, template_hash, attempt FROM replicas WHERE node = ? ORDER BY name",
                &[node.into()],
            )
            .await?;
        let kept_logs = tx
            .fetch("SELECT DISTINCT workload FROM job_attempts WHERE node = ? ORDER BY workload", &[node.into()])
            .await?
            .iter()
            .map(|r| r.text(0))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let assignments: Vec<Assignment> = rows
            .iter()
            .map(|r| {
                let name = r.text(0)?;
                Ok(Assignment {
                    template: serde_json::from_str(&r.text(2)?).map_err(corrupt("replica", &name))?,
                    workload: r.text(1)?,
                    template_hash: r.text(3)?,
                    attempt: opt_u32(r.opt_u64(4)?),
                    name,
                })
            })
            .collect::<Result<_>>()?;
        let refs = assignments.iter().flat_map(|a| a.template.objects()).collect();
        let objects = objects::versions_in(&mut tx, &refs).await?;
        let network = network::node_network(&mut tx, node).await?;
        let services = services::node_table(&mut tx, node).await?;
        tx.commit().await?;
        Ok(AssignmentSet {
            generation,
            store: self.id.clone(),
            assignments,
            kept_logs,
            objects,
            network,
            services,
            connection_liveness: false,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Replicas

    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        let rows = self
            .pool
            .fetch(
                "SELECT name, workload, idx, node, template_hash, status, unschedulable, attempt \
                 FROM replicas ORDER BY workload, idx",
                &[],
            )
            .await?;
        rows.iter().map(replica_row).collect()
    }

    /// The ended attempts of Job `workload`, by index and attempt.
    pub async fn job_attempts(&self, workload: &str) -> Result<Vec<JobAttemptRow>> {
        let rows = self
            .pool
            .fetch(&format!("{JOB_ATTEMPTS} WHERE workload = ? ORDER BY idx, attempt"), &[workload.into()])
            .await?;
        rows.iter().map(job_attempt_row).collect()
    }

    /// Ended attempt `attempt` of Job replica `replica`, if recorded.
    pub async fn job_attempt(&self, replica: &str, attempt: u32) -> Result<Option<JobAttemptRow>> {
        let rows = self
            .pool
            .fetch(
                &format!("{JOB_ATTEMPTS} WHERE replica = ? AND attempt = ? ORDER BY finished_at_ms DESC"),
                &[replica.into(), i64::from(attempt).into()],
            )
            .await?;
        rows.first().map(job_attempt_row).transpose()
    }

    /// Every Job index outcome recorded so far.
    pub async fn job_indexes(&self) -> Result<Vec<JobIndex>> {
        let rows = self.pool.fetch(JOB_INDEXES, &[]).await?;
        rows.iter().map(job_index).collect()
    }

    /// What the controller reads for one pass, in one read transaction (one consistent view).
    pub async fn controller_rows(&self) -> Result<ControllerRows> {
        let mut tx = self.pool.read_tx().await?;
        let workloads = tx
            .fetch("SELECT name, manifest, revision, created_at_ms FROM workloads ORDER BY name", &[])
            .await?
            .iter()
            .map(workload_row)
            .collect::<Result<Vec<_>>>()?;
        let nodes = tx
            .fetch(&format!("SELECT {} ORDER BY name", identity::NODE_COLUMNS), &[])
            .await?
            .iter()
            .map(identity::node_row)
            .collect::<Result<Vec<_>>>()?;
        // Not the template: the controller compares hashes, and a replica that takes a
        // template takes its workload's.
        let replicas = tx
            .fetch(
                "SELECT name, workload, idx, node, template_hash, status, unschedulable FROM replicas \
                 ORDER BY workload, idx",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                let name = r.text(0)?;
                Ok(controller::Replica {
                    workload: r.text(1)?,
                    index: u32::try_from(r.i64(2)?).unwrap_or(u32::MAX),
                    node: r.opt_text(3)?,
                    template_hash: r.text(4)?,
                    reported: serde_json::from_str::<Reported>(&r.text(5)?).map_err(corrupt("replica", &name))?,
                    unschedulable: r.text(6)?,
                    name,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let job_indexes = tx.fetch(JOB_INDEXES, &[]).await?.iter().map(job_index).collect::<Result<Vec<_>>>()?;
        let rollouts = tx
            .fetch("SELECT workload, template_hash, best, since_ms, done FROM rollouts ORDER BY workload", &[])
            .await?
            .iter()
            .map(|r| {
                Ok(RolloutRecord {
                    workload: r.text(0)?,
                    template_hash: r.text(1)?,
                    best: u32::try_from(r.i64(2)?).unwrap_or(u32::MAX),
                    since_ms: r.u64(3)?,
                    done: r.i64(4)? != 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let revisions = tx
            .fetch(
                "SELECT workload, revision, template_hash, cause FROM workload_revisions ORDER BY workload, revision",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(RevisionEntry {
                    workload: r.text(0)?,
                    revision: r.u64(1)?,
                    template_hash: r.text(2)?,
                    cause: r.text(3)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let clock = tx.fetch_optional("SELECT cluster_ms, clock, mono_ms FROM cluster_clock WHERE id = 1", &[]).await?;
        let clock = match clock {
            Some(r) => Some(ClockAnchor { cluster_ms: r.u64(0)?, clock: r.text(1)?, mono_ms: r.u64(2)? }),
            None => None,
        };
        tx.commit().await?;
        Ok(ControllerRows { workloads, nodes, replicas, job_indexes, rollouts, revisions, clock })
    }

    /// Writes a controller pass in one transaction, with cluster time's new `anchor`:
    /// finished Job attempts (their replica rows leave their nodes, their indexes' outcomes
    /// are updated), the replica writes, a new generation for every node whose set changed,
    /// rollout progress and rollbacks. With a `fence`, refused with [`StoreError::NotLeader`]
    /// unless its holder holds the lease by the database's clock once the write lock is held.
    /// Nothing is written, and [`Written::Stale`] returned, when what the pass read changed
    /// meanwhile: a workload's revision, or a replica row a write names. `wall_ms` stamps the
    /// revisions a rollback records (for display).
    pub async fn write_pass(
        &self,
        fence: Option<Fence<'_>>,
        pass: &Pass,
        anchor: &ClockAnchor,
        wall_ms: u64,
    ) -> Result<Written> {
        let mut tx = self.pool.write_tx().await?;
        if let Some(f) = fence {
            check_fence(&mut tx, f).await?;
        }
        let rows = tx.fetch("SELECT name, revision FROM workloads", &[]).await?;
        let revisions: BTreeMap<String, u64> =
            rows.iter().map(|r| Ok((r.text(0)?, r.u64(1)?))).collect::<Result<_>>()?;
        if revisions != pass.revisions_seen {
            return Ok(Written::Stale(Stale::Workloads));
        }
        for a in &pass.job_attempts {
            // The attempt's last status (exit, reason, output) is kept with its number.
            let Some(row) = tx
                .fetch_optional(
                    "SELECT status, attempt FROM replicas WHERE name = ? AND node = ?",
                    &[(&a.replica).into(), (&a.node).into()],
                )
                .await?
            else {
                return Ok(Written::Stale(Stale::Replica(a.replica.clone())));
            };
            let (status, numbered) = (row.text(0)?, opt_u32(row.opt_u64(1)?));
            let failures_before = tx
                .fetch_optional(
                    "SELECT failures FROM job_indexes WHERE workload = ? AND idx = ?",
                    &[(&a.workload).into(), i64::from(a.index).into()],
                )
                .await?
                .map(|r| r.u64(0))
                .transpose()?
                .unwrap_or(0);
            // Rows from before attempt numbers: the attempt after the failures so far.
            let attempt = numbered.map_or(failures_before.saturating_add(1), u64::from);
            tx.exec(
                "INSERT INTO job_attempts (workload, idx, attempt, replica, node, succeeded, status, finished_at_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (workload, idx, attempt) DO UPDATE SET \
                   replica = excluded.replica, node = excluded.node, succeeded = excluded.succeeded, \
                   status = excluded.status, finished_at_ms = excluded.finished_at_ms",
                &[
                    (&a.workload).into(),
                    i64::from(a.index).into(),
                    attempt.into(),
                    (&a.replica).into(),
                    (&a.node).into(),
                    a.succeeded.into(),
                    (&status).into(),
                    wall_ms.into(),
                ],
            )
            .await?;
            tx.exec("DELETE FROM replicas WHERE name = ? AND node = ?", &[(&a.replica).into(), (&a.node).into()])
                .await?;
            let (succeeded, failures, failed_at) =
                if a.succeeded { (1i64, 0i64, None) } else { (0, 1, Some(pass.now_ms)) };
            tx.exec(
                "INSERT INTO job_indexes (workload, idx, succeeded, failures, failed_at_ms) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (workload, idx) DO UPDATE SET \
                   succeeded = CASE WHEN excluded.succeeded = 1 THEN 1 ELSE job_indexes.succeeded END, \
                   failures = job_indexes.failures + excluded.failures, \
                   failed_at_ms = CASE WHEN excluded.failures > 0 THEN excluded.failed_at_ms \
                                  ELSE job_indexes.failed_at_ms END",
                &[(&a.workload).into(), i64::from(a.index).into(), succeeded.into(), failures.into(), failed_at.into()],
            )
            .await?;
        }
        let templates: BTreeMap<&str, (String, &str)> =
            pass.templates.iter().map(|(w, t)| (w.as_str(), (to_json(&t.template), t.hash.as_str()))).collect();
        let pending = to_json(&ReplicaStatus::default());
        for w in &pass.writes {
            let template = || {
                templates.get(w.workload.as_str()).ok_or_else(|| StoreError::PassWithoutTemplate {
                    replica: w.replica.clone(),
                    workload: w.workload.clone(),
                })
            };
            let changed = match &w.op {
                WriteOp::Create { node, unschedulable } => {
                    let (json, hash) = template()?;
                    tx.exec(
                        "INSERT INTO replicas \
                         (name, workload, idx, node, template, template_hash, status, unschedulable, attempt) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        &[
                            (&w.replica).into(),
                            (&w.workload).into(),
                            i64::from(w.index).into(),
                            node.as_deref().into(),
                            json.into(),
                            (*hash).into(),
                            (&pending).into(),
                            unschedulable.into(),
                            pass.attempt_numbers.get(&w.replica).map(|&n| u64::from(n)).into(),
                        ],
                    )
                    .await?
                }
                WriteOp::Change { from_node, from_hash, node, new_template, unschedulable } => {
                    // A replica that moved starts over as Pending; one whose template changed
                    // keeps its status until the agent reports on the new template.
                    let moved = from_node != node;
                    let mut sql = String::from("UPDATE replicas SET node = ?, unschedulable = ?");
                    let mut args: Vec<db::Arg> = vec![node.as_deref().into(), unschedulable.into()];
                    if moved {
                        sql.push_str(", status = ?");
                        args.push((&pending).into());
                    }
                    if *new_template {
                        let (json, hash) = template()?;
                        sql.push_str(", template = ?, template_hash = ?");
                        args.push(json.into());
                        args.push((*hash).into());
                    }
                    sql.push_str(" WHERE name = ? AND node IS NOT DISTINCT FROM ? AND template_hash = ?");
                    args.extend([(&w.replica).into(), from_node.as_deref().into(), from_hash.into()]);
                    tx.exec(&sql, &args).await?
                }
                WriteOp::Delete { from_node } => {
                    tx.exec(
                        "DELETE FROM replicas WHERE name = ? AND node IS NOT DISTINCT FROM ?",
                        &[(&w.replica).into(), from_node.as_deref().into()],
                    )
                    .await?
                }
            };
            if changed == 0 {
                return Ok(Written::Stale(Stale::Replica(w.replica.clone())));
            }
        }
        for node in &pass.changed_nodes {
            bump_generation(&mut tx, node).await?;
        }
        for p in &pass.rollouts {
            tx.exec(
                "INSERT INTO rollouts (workload, template_hash, best, since_ms, done) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (workload) DO UPDATE SET template_hash = excluded.template_hash, best = excluded.best, \
                   since_ms = excluded.since_ms, done = excluded.done",
                &[
                    (&p.workload).into(),
                    (&p.template_hash).into(),
                    i64::from(p.best).into(),
                    p.since_ms.into(),
                    p.done.into(),
                ],
            )
            .await?;
        }
        for r in &pass.rollbacks {
            let current = tx
                .fetch_optional(
                    "SELECT name, manifest, revision, created_at_ms FROM workloads WHERE name = ?",
                    &[(&r.workload).into()],
                )
                .await?;
            let target = tx
                .fetch_optional(
                    "SELECT manifest FROM workload_revisions WHERE workload = ? AND revision = ?",
                    &[(&r.workload).into(), r.to_revision.into()],
                )
                .await?;
            let (Some(current), Some(target)) = (current, target) else {
                return Ok(Written::Stale(Stale::Workloads));
            };
            let current = workload_row(&current)?;
            let target: Manifest =
                serde_json::from_str(&target.text(0)?).map_err(corrupt("workload revision", &r.workload))?;
            let mut m = current.manifest.with_template_of(&target);
            m.metadata.resource_version = Some(r.expected_revision);
            match apply_in(&mut tx, &m, wall_ms, &r.cause).await {
                Ok(_) => {}
                Err(StoreError::Conflict { .. }) => return Ok(Written::Stale(Stale::Workloads)),
                Err(e) => return Err(e),
            }
        }
        tx.exec(
            "INSERT INTO cluster_clock (id, cluster_ms, clock, mono_ms) VALUES (1, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET cluster_ms = excluded.cluster_ms, clock = excluded.clock, \
               mono_ms = excluded.mono_ms",
            &[anchor.cluster_ms.into(), (&anchor.clock).into(), anchor.mono_ms.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(Written::Done)
    }

    /// Records statuses a node reported. Only replicas assigned to that node are updated: a
    /// node cannot write another node's replicas. Returns how many rows changed.
    pub async fn record_statuses(&self, node: &str, statuses: &BTreeMap<String, ReplicaStatus>) -> Result<u64> {
        if statuses.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.write_tx().await?;
        let n = statuses_tx(&mut tx, node, statuses).await?;
        tx.commit().await?;
        Ok(n)
    }

    // -----------------------------------------------------------------------------------------
    // Leases

    /// Takes or renews lease `name` for `holder` until `ttl` past the database's clock, in one
    /// compare-and-swap statement: it succeeds when the lease is free, expired, or already
    /// `holder`'s. Returns the lease's term when `holder` holds it, `None` when another
    /// holder's lease is still running. Hub clocks play no part, so skew cannot make two
    /// holders.
    pub async fn try_acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<Option<u64>> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2);
        let rows = self
            .pool
            .fetch(
                "INSERT INTO leases (name, holder, term, expires_at_ms) VALUES (?, ?, 1, {now_ms} + ?) \
                 ON CONFLICT (name) DO UPDATE SET \
                   term = CASE WHEN leases.holder = excluded.holder THEN leases.term ELSE leases.term + 1 END, \
                   holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
                 WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= {now_ms} \
                 RETURNING term",
                &[name.into(), holder.into(), ttl_ms.into()],
            )
            .await?;
        match rows.first() {
            Some(r) => Ok(Some(r.u64(0)?)),
            None => Ok(None),
        }
    }

    /// Gives up `holder`'s lease at once (a clean shutdown), so a successor need not wait for
    /// it to expire. The row stays, keeping the term counting.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.pool
            .exec("UPDATE leases SET expires_at_ms = 0 WHERE name = ? AND holder = ?", &[name.into(), holder.into()])
            .await?;
        Ok(())
    }

    /// The lease as stored, whoever holds it and whether or not it expired.
    pub async fn lease(&self, name: &str) -> Result<Option<LeaseRow>> {
        let rows =
            self.pool.fetch("SELECT holder, term, expires_at_ms FROM leases WHERE name = ?", &[name.into()]).await?;
        match rows.first() {
            Some(r) => Ok(Some(LeaseRow { holder: r.text(0)?, term: r.u64(1)?, expires_at_ms: r.u64(2)? })),
            None => Ok(None),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Cluster-wide values

    /// Returns the stored value of `name`, storing `value` first when there is none. Hubs
    /// racing to initialize all get the first writer's value.
    pub async fn get_or_insert_secret(&self, name: &str, value: &str) -> Result<String> {
        self.pool
            .exec(
                "INSERT INTO cluster_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                &[name.into(), value.into()],
            )
            .await?;
        let rows = self.pool.fetch("SELECT value FROM cluster_secrets WHERE name = ?", &[name.into()]).await?;
        match rows.first() {
            Some(r) => Ok(r.text(0)?),
            None => Err(StoreError::Query(sqlx::Error::RowNotFound)),
        }
    }

    /// Replaces the value of `name` if it is still `old`; whether it was replaced.
    pub async fn replace_secret(&self, name: &str, old: &str, new: &str) -> Result<bool> {
        let n = self
            .pool
            .exec(
                "UPDATE cluster_secrets SET value = ? WHERE name = ? AND value = ?",
                &[new.into(), name.into(), old.into()],
            )
            .await?;
        Ok(n == 1)
    }

    /// The stored value of `name`, if any.
    pub async fn secret(&self, name: &str) -> Result<Option<String>> {
        let rows = self.pool.fetch("SELECT value FROM cluster_secrets WHERE name = ?", &[name.into()]).await?;
        match rows.first() {
            Some(r) => Ok(Some(r.text(0)?)),
            None => Ok(None),
        }
    }
}

const JOB_INDEXES: &str =
    "SELECT workload, idx, succeeded, failures, failed_at_ms FROM job_indexes ORDER BY workload, idx";

/// A [`JOB_INDEXES`] row.
fn job_index(r: &Rec) -> Result<JobIndex> {
    Ok(JobIndex {
        workload: r.text(0)?,
        index: u32::try_from(r.i64(1)?).unwrap_or(u32::MAX),
        succeeded: r.i64(2)? != 0,
        failures: u32::try_from(r.i64(3)?).unwrap_or(u32::MAX),
        failed_at_ms: r.opt_u64(4)?,
    })
}

/// Refuses a leader-only write whose writer no longer holds the lease (by the database's
/// clock, under the write lock).
async fn check_fence(tx: &mut Tx, f: Fence<'_>) -> Result<()> {
    let held = tx
        .fetch_optional(
            "SELECT holder FROM leases WHERE name = ? AND holder = ? AND expires_at_ms > {now_ms}",
            &[f.lease.into(), f.holder.into()],
        )
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::NotLeader { lease: f.lease.to_string(), holder: f.holder.to_string() }),
    }
}

fn replica_row(r: &Rec) -> Result<ReplicaRow> {
    let name = r.text(0)?;
    Ok(ReplicaRow {
        workload: r.text(1)?,
        index: u32::try_from(r.i64(2)?).unwrap_or(u32::MAX),
        node: r.opt_text(3)?,
        template_hash: r.text(4)?,
        status: serde_json::from_str(&r.text(5)?).map_err(corrupt("replica", &name))?,
        unschedulable: r.text(6)?,
        attempt: opt_u32(r.opt_u64(7)?),
        name,
    })
}

const JOB_ATTEMPTS: &str =
    "SELECT workload, idx, attempt, replica, node, succeeded, status, finished_at_ms FROM job_attempts";

fn job_attempt_row(r: &Rec) -> Result<JobAttemptRow> {
    let replica = r.text(3)?;
    Ok(JobAttemptRow {
        workload: r.text(0)?,
        index: u32::try_from(r.i64(1)?).unwrap_or(u32::MAX),
        attempt: u32::try_from(r.i64(2)?).unwrap_or(u32::MAX),
        node: r.text(4)?,
        succeeded: r.i64(5)? != 0,
        status: serde_json::from_str(&r.text(6)?).map_err(corrupt("job attempt", &replica))?,
        finished_at_ms: r.u64(7)?,
        replica,
    })
}

fn opt_u32(v: Option<u64>) -> Option<u32> {
    v.map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

async fn bump_generation(tx: &mut Tx, node: &str) -> Result<()> {
    tx.exec("UPDATE nodes SET generation = generation + 1 WHERE name = ?", &[node.into()]).await?;
    Ok(())
}

/// Creates `path` with mode 0600 if it does not exist, and makes an existing file 0600.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// A connection URL with its password replaced, for error messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Records node `?3` as held by hub `?1` since `?2` ([`Store::set_node_session`], and each
/// hello of [`Store::check_in_many`]).
const HOLD_NODE: &str = "UPDATE nodes SET connected_via = ?, last_seen_ms = ? WHERE name = ?";

/// [`Store::record_statuses`] within `tx`: how many replicas of `node` took their status.
pub(crate) async fn statuses_tx(
    tx: &mut db::Tx,
    node: &str,
    statuses: &BTreeMap<String, ReplicaStatus>,
) -> Result<u64> {
    let mut n = 0;
    for (name, status) in statuses {
        let status = to_json(status);
        n += tx
            .exec(
                "UPDATE replicas SET status = ? WHERE name = ? AND node = ?",
                &[(&status).into(), name.into(), node.into()],
            )
            .await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_flag_parses_and_urls_are_redacted() {
        assert_eq!("sqlite".parse::<Datastore>().unwrap(), Datastore::Sqlite);
        assert_eq!(
            "postgres://u@h:5/db".parse::<Datastore>().unwrap(),
            Datastore::Postgres("postgres://u@h:5/db".into())
        );
        assert!("mysql://x".parse::<Datastore>().unwrap_err().to_string().contains("unsupported datastore"));
        assert_eq!(redact("postgres://u:secret@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[tokio::test]
    async fn the_sqlite_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        // A file left readable by an older version is tightened too.
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(&path).await.unwrap();
        store.apply_workloads(&proto::manifest::parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: a}\nspec: {runtime: wasm, image: r/a:1}\n",
        ).unwrap(), 1).await.unwrap();
        for file in ["hub.db", "hub.db-wal", "hub.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }
}
