//! The hub's state store: sqlx over one SQLite file in WAL mode. The schema lives in
//! `hub/migrations` and is applied at open. Queries avoid SQLite-only features beyond `?`
//! placeholders and two-argument `MAX`, which a PostgreSQL backend will need to translate.
//!
//! Invariants:
//! - Every write that changes what a node must run bumps that node's `generation` in the same
//!   transaction, so an agent that acknowledged generation `g` has seen every change up to it.
//! - Timestamps are passed in by the caller; nothing here reads the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;

use proto::manifest::{Manifest, ReplicaTemplate};
use proto::messages::{Assignment, AssignmentSet, NodeFacts, ReplicaStatus};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::scheduler::Placement;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("cannot migrate the store: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("corrupt {what} record {name:?} in the store: {source}")]
    Corrupt { what: &'static str, name: String, source: serde_json::Error },
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone)]
pub struct WorkloadRow {
    pub manifest: Manifest,
    pub revision: u64,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub facts: NodeFacts,
    pub generation: u64,
    pub acked_generation: u64,
    pub joined_at_ms: u64,
    pub last_seen_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub name: String,
    pub workload: String,
    pub index: u32,
    pub node: Option<String>,
    pub template: ReplicaTemplate,
    pub template_hash: String,
    pub status: ReplicaStatus,
    pub unschedulable: String,
}

/// What `apply_workloads` did to one manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn corrupt<'a>(what: &'static str, name: &'a str) -> impl FnOnce(serde_json::Error) -> StoreError + 'a {
    move |source| StoreError::Corrupt { what, name: name.to_string(), source }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("store records serialize")
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with synchronous=FULL: a commit the API acknowledged survives power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    /// A transaction that takes SQLite's write lock at its start. A deferred transaction that
    /// reads and then writes fails at once (SQLITE_BUSY_SNAPSHOT) when another writer
    /// committed in between; taking the lock first makes it wait its turn instead.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    // -----------------------------------------------------------------------------------------
    // Workloads

    /// Stores `manifests` in one transaction: all or nothing. A manifest identical to the
    /// stored one is left untouched.
    pub async fn apply_workloads(&self, manifests: &[Manifest], now_ms: u64) -> Result<Vec<Applied>> {
        let mut tx = self.write_tx().await?;
        let mut out = Vec::with_capacity(manifests.len());
        for m in manifests {
            let name = &m.metadata.name;
            let json = to_json(m);
            let existing = sqlx::query("SELECT manifest, revision FROM workloads WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            let outcome = match existing {
                None => {
                    sqlx::query(
                        "INSERT INTO workloads (name, manifest, revision, created_at_ms, updated_at_ms) VALUES (?, ?, 1, ?, ?)",
                    )
                    .bind(name)
                    .bind(&json)
                    .bind(now_ms as i64)
                    .bind(now_ms as i64)
                    .execute(&mut *tx)
                    .await?;
                    Applied::Created
                }
                Some(row) => {
                    let old: Manifest =
                        serde_json::from_str(row.get::<&str, _>(0)).map_err(corrupt("workload", name))?;
                    if &old == m {
                        Applied::Unchanged
                    } else {
                        sqlx::query("UPDATE workloads SET manifest = ?, revision = revision + 1, updated_at_ms = ? WHERE name = ?")
                            .bind(&json)
                            .bind(now_ms as i64)
                            .bind(name)
                            .execute(&mut *tx)
                            .await?;
                        Applied::Configured
                    }
                }
            };
            out.push(outcome);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Deletes the named workloads; returns those that existed and the nodes whose assignment
    /// sets changed (their replicas go with the workload and they get a new generation).
    pub async fn delete_workloads(&self, names: &[String]) -> Result<(Vec<String>, BTreeSet<String>)> {
        let mut tx = self.write_tx().await?;
        let mut deleted = Vec::new();
        let mut nodes = BTreeSet::new();
        for name in names {
            let rows = sqlx::query("SELECT DISTINCT node FROM replicas WHERE workload = ? AND node IS NOT NULL")
                .bind(name)
                .fetch_all(&mut *tx)
                .await?;
            nodes.extend(rows.iter().map(|r| r.get::<String, _>(0)));
            let res = sqlx::query("DELETE FROM workloads WHERE name = ?").bind(name).execute(&mut *tx).await?;
            if res.rows_affected() > 0 {
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
        let rows = sqlx::query("SELECT name, manifest, revision, created_at_ms FROM workloads ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let name: String = r.get(0);
                Ok(WorkloadRow {
                    manifest: serde_json::from_str(r.get::<&str, _>(1)).map_err(corrupt("workload", &name))?,
                    revision: r.get::<i64, _>(2) as u64,
                    created_at_ms: r.get::<i64, _>(3) as u64,
                })
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // Nodes

    /// Records a node's facts when it connects; creates the node on first contact.
    pub async fn upsert_node(&self, name: &str, facts: &NodeFacts, now_ms: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (name, facts, joined_at_ms, last_seen_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET facts = excluded.facts, last_seen_ms = excluded.last_seen_ms",
        )
        .bind(name)
        .bind(to_json(facts))
        .bind(now_ms as i64)
        .bind(now_ms as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn touch_node(&self, name: &str, now_ms: u64) -> Result<()> {
        sqlx::query("UPDATE nodes SET last_seen_ms = ? WHERE name = ?")
            .bind(now_ms as i64)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn ack_generation(&self, name: &str, generation: u64) -> Result<()> {
        sqlx::query("UPDATE nodes SET acked_generation = MAX(acked_generation, ?) WHERE name = ?")
            .bind(generation as i64)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query(
            "SELECT name, facts, generation, acked_generation, joined_at_ms, last_seen_ms FROM nodes ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let name: String = r.get(0);
                Ok(NodeRow {
                    facts: serde_json::from_str(r.get::<&str, _>(1)).map_err(corrupt("node", &name))?,
                    generation: r.get::<i64, _>(2) as u64,
                    acked_generation: r.get::<i64, _>(3) as u64,
                    joined_at_ms: r.get::<i64, _>(4) as u64,
                    last_seen_ms: r.get::<Option<i64>, _>(5).map(|v| v as u64),
                    name,
                })
            })
            .collect()
    }

    /// The assignment set a node must run, at its current generation.
    pub async fn assignment_set(&self, node: &str) -> Result<AssignmentSet> {
        let mut tx = self.pool.begin().await?;
        let generation: i64 = sqlx::query_scalar("SELECT generation FROM nodes WHERE name = ?")
            .bind(node)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(0);
        let rows =
            sqlx::query("SELECT name, workload, template, template_hash FROM replicas WHERE node = ? ORDER BY name")
                .bind(node)
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let assignments = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                Ok(Assignment {
                    template: serde_json::from_str(r.get::<&str, _>(2)).map_err(corrupt("replica", &name))?,
                    workload: r.get(1),
                    template_hash: r.get(3),
                    name,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AssignmentSet { generation: generation as u64, assignments })
    }

    // -----------------------------------------------------------------------------------------
    // Replicas

    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        let rows = sqlx::query(
            "SELECT name, workload, idx, node, template, template_hash, status, unschedulable FROM replicas ORDER BY workload, idx",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let name: String = r.get(0);
                Ok(ReplicaRow {
                    workload: r.get(1),
                    index: r.get::<i64, _>(2) as u32,
                    node: r.get(3),
                    template: serde_json::from_str(r.get::<&str, _>(4)).map_err(corrupt("replica", &name))?,
                    template_hash: r.get(5),
                    status: serde_json::from_str(r.get::<&str, _>(6)).map_err(corrupt("replica", &name))?,
                    unschedulable: r.get(7),
                    name,
                })
            })
            .collect()
    }

    /// Makes the replicas table match `placements` (the scheduler's full answer), with each
    /// replica's template taken from its workload. Nodes whose assignment sets change get a
    /// new generation; returns those nodes.
    pub async fn write_placements(
        &self,
        placements: &[Placement],
        templates: &BTreeMap<String, ReplicaTemplate>,
        unschedulable: &BTreeMap<String, String>,
    ) -> Result<BTreeSet<String>> {
        let mut tx = self.write_tx().await?;
        let rows =
            sqlx::query("SELECT name, node, template_hash, unschedulable FROM replicas").fetch_all(&mut *tx).await?;
        let mut existing: BTreeMap<String, (Option<String>, String, String)> =
            rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3)))).collect();
        let mut changed_nodes = BTreeSet::new();

        for p in placements {
            let Some(template) = templates.get(&p.workload) else { continue };
            let hash = template.hash();
            let why = unschedulable.get(&p.replica).cloned().unwrap_or_default();
            match existing.remove(&p.replica) {
                Some((node, old_hash, old_why)) => {
                    if node == p.node && old_hash == hash && old_why == why {
                        continue;
                    }
                    if node != p.node || old_hash != hash {
                        changed_nodes.extend(node.clone());
                        changed_nodes.extend(p.node.clone());
                    }
                    // A replica that moved starts over as Pending; one whose template
                    // changed keeps its status until the agent reports on the new template.
                    if node != p.node {
                        sqlx::query("UPDATE replicas SET node = ?, template = ?, template_hash = ?, unschedulable = ?, status = ? WHERE name = ?")
                            .bind(&p.node)
                            .bind(to_json(template))
                            .bind(&hash)
                            .bind(&why)
                            .bind(to_json(&ReplicaStatus::default()))
                            .bind(&p.replica)
                            .execute(&mut *tx)
                            .await?;
                    } else {
                        sqlx::query(
                            "UPDATE replicas SET template = ?, template_hash = ?, unschedulable = ? WHERE name = ?",
                        )
                        .bind(to_json(template))
                        .bind(&hash)
                        .bind(&why)
                        .bind(&p.replica)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                None => {
                    changed_nodes.extend(p.node.clone());
                    sqlx::query(
                        "INSERT INTO replicas (name, workload, idx, node, template, template_hash, status, unschedulable) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&p.replica)
                    .bind(&p.workload)
                    .bind(p.index as i64)
                    .bind(&p.node)
                    .bind(to_json(template))
                    .bind(&hash)
                    .bind(to_json(&ReplicaStatus::default()))
                    .bind(&why)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        // Replicas the scheduler no longer wants.
        for (name, (node, _, _)) in existing {
            changed_nodes.extend(node);
            sqlx::query("DELETE FROM replicas WHERE name = ?").bind(&name).execute(&mut *tx).await?;
        }
        for node in &changed_nodes {
            bump_generation(&mut tx, node).await?;
        }
        tx.commit().await?;
        Ok(changed_nodes)
    }

    /// Records statuses a node reported. Only replicas assigned to that node are updated: a
    /// node cannot write another node's replicas. Returns how many rows changed.
    pub async fn record_statuses(&self, node: &str, statuses: &BTreeMap<String, ReplicaStatus>) -> Result<u64> {
        let mut tx = self.write_tx().await?;
        let mut n = 0;
        for (name, status) in statuses {
            n += sqlx::query("UPDATE replicas SET status = ? WHERE name = ? AND node = ?")
                .bind(to_json(status))
                .bind(name)
                .bind(node)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }
}

async fn bump_generation(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, node: &str) -> Result<()> {
    sqlx::query("UPDATE nodes SET generation = generation + 1 WHERE name = ?").bind(node).execute(&mut **tx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::parse_manifests;
    use proto::messages::Phase;

    const M: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: hello}\nspec: {runtime: wasm, image: r/hello:1, replicas: 2}\n";

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("hub.db")).await.unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn apply_is_idempotent_and_tracks_revisions() {
        let (_d, s) = store().await;
        let m = parse_manifests(M).unwrap();
        assert_eq!(s.apply_workloads(&m, 1).await.unwrap(), [Applied::Created]);
        assert_eq!(s.apply_workloads(&m, 2).await.unwrap(), [Applied::Unchanged]);
        let changed = parse_manifests(&M.replace("r/hello:1", "r/hello:2")).unwrap();
        assert_eq!(s.apply_workloads(&changed, 3).await.unwrap(), [Applied::Configured]);
        let w = s.workloads().await.unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].revision, 2);
        assert_eq!(w[0].created_at_ms, 1);
    }

    #[tokio::test]
    async fn placements_bump_generations_and_statuses_are_fenced_per_node() {
        let (_d, s) = store().await;
        let m = parse_manifests(M).unwrap();
        s.apply_workloads(&m, 1).await.unwrap();
        for n in ["a", "b"] {
            s.upsert_node(n, &NodeFacts::default(), 1).await.unwrap();
        }
        let templates = BTreeMap::from([("hello".to_string(), m[0].template())]);
        let placements = vec![
            Placement { replica: "hello-0".into(), workload: "hello".into(), index: 0, node: Some("a".into()) },
            Placement { replica: "hello-1".into(), workload: "hello".into(), index: 1, node: Some("b".into()) },
        ];
        let changed = s.write_placements(&placements, &templates, &BTreeMap::new()).await.unwrap();
        assert_eq!(changed, BTreeSet::from(["a".to_string(), "b".to_string()]));
        let set = s.assignment_set("a").await.unwrap();
        assert_eq!(set.generation, 1);
        assert_eq!(set.assignments.len(), 1);
        assert_eq!(set.assignments[0].name, "hello-0");
        // Writing the same placements again changes nothing.
        assert!(s.write_placements(&placements, &templates, &BTreeMap::new()).await.unwrap().is_empty());

        // Node b cannot report for a's replica.
        let running = ReplicaStatus { phase: Phase::Running, ..Default::default() };
        let st = BTreeMap::from([("hello-0".to_string(), running)]);
        assert_eq!(s.record_statuses("b", &st).await.unwrap(), 0);
        assert_eq!(s.record_statuses("a", &st).await.unwrap(), 1);

        // Deleting the workload removes its replicas and bumps both nodes.
        let (deleted, nodes) = s.delete_workloads(&["hello".into(), "nope".into()]).await.unwrap();
        assert_eq!(deleted, ["hello"]);
        assert_eq!(nodes, BTreeSet::from(["a".to_string(), "b".to_string()]));
        assert!(s.replicas().await.unwrap().is_empty());
        let set = s.assignment_set("b").await.unwrap();
        assert_eq!((set.generation, set.assignments.len()), (2, 0));
    }

    /// The hub's writers run concurrently (API applies, the controller's placements, agents'
    /// statuses). Each must wait its turn for the write lock, never fail with "database is
    /// locked".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_do_not_fail() {
        let (_d, s) = store().await;
        s.upsert_node("a", &NodeFacts::default(), 1).await.unwrap();
        let m = parse_manifests(M).unwrap();
        s.apply_workloads(&m, 1).await.unwrap();
        let templates = BTreeMap::from([("hello".to_string(), m[0].template())]);
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let s = s.clone();
            let templates = templates.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50u64 {
                    let replicas = if (i + t) % 2 == 0 { 1 } else { 2 };
                    let placements: Vec<Placement> = (0..replicas)
                        .map(|idx| Placement {
                            replica: format!("hello-{idx}"),
                            workload: "hello".into(),
                            index: idx,
                            node: Some("a".into()),
                        })
                        .collect();
                    s.write_placements(&placements, &templates, &BTreeMap::new()).await?;
                    let changed = parse_manifests(&M.replace("r/hello:1", &format!("r/hello:{t}{i}"))).unwrap();
                    s.apply_workloads(&changed, i).await?;
                    let st = BTreeMap::from([("hello-0".to_string(), ReplicaStatus::default())]);
                    s.record_statuses("a", &st).await?;
                    s.ack_generation("a", i).await?;
                }
                Ok::<_, StoreError>(())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let s = Store::open(&path).await.unwrap();
            s.apply_workloads(&parse_manifests(M).unwrap(), 1).await.unwrap();
        }
        let s = Store::open(&path).await.unwrap();
        assert_eq!(s.workloads().await.unwrap().len(), 1);
    }
}
