//! The store's side of configs and secrets. The store keeps them sealed ([`NewObject::sealed`]
//! is made and opened by [`crate::objects`], which holds the key); here they are versioned,
//! stamped into the workloads that read them and counted in the nodes' generations:
//!
//! - An object's `version` grows by one when its content (digest) changes; the same content
//!   applied again changes nothing.
//! - Every stored workload carries in `metadata.objectVersions` the current version of each
//!   object it reads through environment variables (stamped by [`stamp`] inside
//!   `apply_in`), so a change of such an object is a new template: the workload rolls out.
//! - A change of an object bumps the generation of every node running a replica that reads
//!   it, in the same transaction, so the node learns the new version ([`AssignmentSet`]'s
//!   `objects`) and fetches it.

use std::collections::{BTreeMap, BTreeSet};

use proto::manifest::Manifest;
use proto::objects::{ObjectKind, ObjectRef, ObjectVersion};

use super::db::{Rec, Tx};
use super::{Applied, Result, Store, StoreError, apply_in, bump_generation, corrupt, to_json};

/// An object to store, already sealed.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub kind: ObjectKind,
    pub name: String,
    pub digest: String,
    /// Each key and its value's size.
    pub keys: BTreeMap<String, u64>,
    pub sealed: String,
}

impl NewObject {
    pub fn reference(&self) -> ObjectRef {
        ObjectRef::new(self.kind, self.name.clone())
    }
}

/// An object as stored.
#[derive(Debug, Clone)]
pub struct ObjectRow {
    pub kind: ObjectKind,
    pub name: String,
    pub version: u64,
    pub digest: String,
    pub keys: BTreeMap<String, u64>,
    pub sealed: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl ObjectRow {
    pub fn reference(&self) -> ObjectRef {
        ObjectRef::new(self.kind, self.name.clone())
    }

    pub fn version(&self) -> ObjectVersion {
        ObjectVersion { kind: self.kind, name: self.name.clone(), version: self.version, digest: self.digest.clone() }
    }
}

/// What deleting an object did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectDeletion {
    Deleted,
    NotFound,
    /// Refused: these workloads read it (delete them first, or force).
    InUse(Vec<String>),
}

const OBJECT_COLUMNS: &str = "kind, name, version, digest, keys, data, created_at_ms, updated_at_ms FROM objects";

fn kind_text(kind: ObjectKind) -> &'static str {
    kind.word()
}

fn object_row(r: &Rec) -> Result<ObjectRow> {
    let name = r.text(1)?;
    let kind = match r.text(0)?.as_str() {
        "config" => ObjectKind::Config,
        "secret" => ObjectKind::Secret,
        other => {
            return Err(StoreError::Corrupt {
                what: "object",
                name,
                source: serde::de::Error::custom(format!("unknown kind {other:?}")),
            });
        }
    };
    Ok(ObjectRow {
        kind,
        version: r.u64(2)?,
        digest: r.text(3)?,
        keys: serde_json::from_str(&r.text(4)?).map_err(corrupt("object", &name))?,
        sealed: r.text(5)?,
        created_at_ms: r.u64(6)?,
        updated_at_ms: r.u64(7)?,
        name,
    })
}

async fn object_in(tx: &mut Tx, r: &ObjectRef) -> Result<Option<ObjectRow>> {
    let row = tx
        .fetch_optional(
            &format!("SELECT {OBJECT_COLUMNS} WHERE kind = ? AND name = ?"),
            &[kind_text(r.kind).into(), r.name.as_str().into()],
        )
        .await?;
    row.as_ref().map(object_row).transpose()
}

/// The current versions of `refs` that exist.
pub(super) async fn versions_in(tx: &mut Tx, refs: &BTreeSet<ObjectRef>) -> Result<Vec<ObjectVersion>> {
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        let row = tx
            .fetch_optional(
                "SELECT version, digest FROM objects WHERE kind = ? AND name = ?",
                &[kind_text(r.kind).into(), r.name.as_str().into()],
            )
            .await?;
        if let Some(row) = row {
            out.push(ObjectVersion { kind: r.kind, name: r.name.clone(), version: row.u64(0)?, digest: row.text(1)? });
        }
    }
    Ok(out)
}

/// `m` with `metadata.objectVersions` set to the current version of each object it reads
/// through environment variables (objects that do not exist are left out).
pub(super) async fn stamp(tx: &mut Tx, mut m: Manifest) -> Result<Manifest> {
    let refs = m.template().env_objects();
    m.metadata.object_versions =
        versions_in(tx, &refs).await?.into_iter().map(|v| (v.reference().to_string(), v.version)).collect();
    Ok(m)
}

/// The stored workloads that read `r` (as files or through the environment).
async fn readers_in(tx: &mut Tx, r: &ObjectRef) -> Result<Vec<Manifest>> {
    let rows = tx.fetch("SELECT name, manifest FROM workloads ORDER BY name", &[]).await?;
    let mut out = Vec::new();
    for row in &rows {
        let name = row.text(0)?;
        let m: Manifest = serde_json::from_str(&row.text(1)?).map_err(corrupt("workload", &name))?;
        if m.template().objects().contains(r) {
            out.push(m);
        }
    }
    Ok(out)
}

/// After `r` changed (created, updated, deleted): its environment readers get the new
/// version stamped (a new template), and every node running a reader gets a new generation.
/// Returns those nodes.
async fn changed_in(tx: &mut Tx, r: &ObjectRef, now_ms: u64) -> Result<BTreeSet<String>> {
    let cause = format!("{r} changed");
    let mut nodes = BTreeSet::new();
    for m in readers_in(tx, r).await? {
        let name = m.metadata.name.clone();
        if m.template().env_objects().contains(r) {
            apply_in(tx, &m, now_ms, &cause).await?;
        }
        for row in tx
            .fetch(
                "SELECT DISTINCT node FROM replicas WHERE workload = ? AND node IS NOT NULL",
                &[name.as_str().into()],
            )
            .await?
        {
            nodes.insert(row.text(0)?);
        }
    }
    for node in &nodes {
        bump_generation(tx, node).await?;
    }
    Ok(nodes)
}

/// Stores one object inside a write transaction; adds the nodes that must learn of it to
/// `nodes`.
async fn put_in(tx: &mut Tx, o: &NewObject, now_ms: u64, nodes: &mut BTreeSet<String>) -> Result<Applied> {
    let r = o.reference();
    let keys = to_json(&o.keys);
    let applied = match object_in(tx, &r).await? {
        Some(old) if old.digest == o.digest => return Ok(Applied::Unchanged),
        Some(_) => {
            tx.exec(
                "UPDATE objects SET version = version + 1, digest = ?, keys = ?, data = ?, updated_at_ms = ? \
                 WHERE kind = ? AND name = ?",
                &[
                    o.digest.as_str().into(),
                    keys.as_str().into(),
                    o.sealed.as_str().into(),
                    now_ms.into(),
                    kind_text(o.kind).into(),
                    o.name.as_str().into(),
                ],
            )
            .await?;
            Applied::Configured
        }
        None => {
            tx.exec(
                "INSERT INTO objects (kind, name, version, digest, keys, data, created_at_ms, updated_at_ms) \
                 VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
                &[
                    kind_text(o.kind).into(),
                    o.name.as_str().into(),
                    o.digest.as_str().into(),
                    keys.as_str().into(),
                    o.sealed.as_str().into(),
                    now_ms.into(),
                    now_ms.into(),
                ],
            )
            .await?;
            Applied::Created
        }
    };
    nodes.extend(changed_in(tx, &r, now_ms).await?);
    Ok(applied)
}

/// What [`Store::apply_documents`] did.
#[derive(Debug, Clone, Default)]
pub struct AppliedDocuments {
    pub objects: Vec<Applied>,
    pub workloads: Vec<Applied>,
    /// Nodes whose sets changed because an object did (to wake).
    pub nodes: BTreeSet<String>,
}

impl Store {
    /// Stores `objects`, then `workloads`, in one transaction (a file of both is applied
    /// whole or not at all; its workloads see its objects' new versions).
    pub async fn apply_documents(
        &self,
        objects: &[NewObject],
        workloads: &[Manifest],
        now_ms: u64,
    ) -> Result<AppliedDocuments> {
        let mut tx = self.pool.write_tx().await?;
        let mut out = AppliedDocuments::default();
        for o in objects {
            out.objects.push(put_in(&mut tx, o, now_ms, &mut out.nodes).await?);
        }
        for m in workloads {
            out.workloads.push(apply_in(&mut tx, m, now_ms, "apply").await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    pub async fn object(&self, r: &ObjectRef) -> Result<Option<ObjectRow>> {
        let mut tx = self.pool.read_tx().await?;
        let row = object_in(&mut tx, r).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Every object of `kind`, by name.
    pub async fn objects(&self, kind: ObjectKind) -> Result<Vec<ObjectRow>> {
        let rows = self
            .pool
            .fetch(&format!("SELECT {OBJECT_COLUMNS} WHERE kind = ? ORDER BY name"), &[kind_text(kind).into()])
            .await?;
        rows.iter().map(object_row).collect()
    }

    /// The workloads that read `r`, by name.
    pub async fn object_readers(&self, r: &ObjectRef) -> Result<Vec<String>> {
        let mut tx = self.pool.read_tx().await?;
        let readers = readers_in(&mut tx, r).await?;
        tx.commit().await?;
        Ok(readers.into_iter().map(|m| m.metadata.name).collect())
    }

    /// Deletes `r`; refused while a workload reads it, unless `force`. Returns the nodes
    /// whose sets changed with it.
    pub async fn delete_object(
        &self,
        r: &ObjectRef,
        force: bool,
        now_ms: u64,
    ) -> Result<(ObjectDeletion, BTreeSet<String>)> {
        let mut tx = self.pool.write_tx().await?;
        if object_in(&mut tx, r).await?.is_none() {
            return Ok((ObjectDeletion::NotFound, BTreeSet::new()));
        }
        let readers: Vec<String> = readers_in(&mut tx, r).await?.into_iter().map(|m| m.metadata.name).collect();
        if !readers.is_empty() && !force {
            return Ok((ObjectDeletion::InUse(readers), BTreeSet::new()));
        }
        tx.exec("DELETE FROM objects WHERE kind = ? AND name = ?", &[kind_text(r.kind).into(), r.name.as_str().into()])
            .await?;
        let nodes = changed_in(&mut tx, r, now_ms).await?;
        tx.commit().await?;
        Ok((ObjectDeletion::Deleted, nodes))
    }

    /// Whether a replica assigned to `node` reads `r`: the only case a node may fetch it.
    pub async fn node_reads(&self, node: &str, r: &ObjectRef) -> Result<bool> {
        let rows = self.pool.fetch("SELECT name, template FROM replicas WHERE node = ?", &[node.into()]).await?;
        for row in &rows {
            let name = row.text(0)?;
            let t: proto::ReplicaTemplate = serde_json::from_str(&row.text(1)?).map_err(corrupt("replica", &name))?;
            if t.objects().contains(r) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Replaces every object's sealed data with `reseal(row)` (key rotation; `None` leaves a
    /// row as it is), in one transaction; versions and digests stay. Returns how many were
    /// rewritten, or `reseal`'s first error, with nothing written.
    pub async fn reseal_objects<E>(
        &self,
        mut reseal: impl FnMut(&ObjectRow) -> std::result::Result<Option<String>, E>,
    ) -> Result<std::result::Result<u64, E>> {
        let mut tx = self.pool.write_tx().await?;
        let rows = tx.fetch(&format!("SELECT {OBJECT_COLUMNS} ORDER BY kind, name"), &[]).await?;
        let mut rewritten = 0;
        for row in &rows {
            let row = object_row(row)?;
            match reseal(&row) {
                Err(e) => return Ok(Err(e)),
                Ok(None) => {}
                Ok(Some(sealed)) => {
                    tx.exec(
                        "UPDATE objects SET data = ? WHERE kind = ? AND name = ?",
                        &[sealed.as_str().into(), kind_text(row.kind).into(), row.name.as_str().into()],
                    )
                    .await?;
                    rewritten += 1;
                }
            }
        }
        tx.commit().await?;
        Ok(Ok(rewritten))
    }
}
