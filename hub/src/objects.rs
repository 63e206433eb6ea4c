//! Configs and secrets on the hub: sealed into the store with the cluster key, shown as
//! keys, sizes and a digest, and given to a node only for the replicas assigned to it.
//!
//! Who can read what:
//! - The store holds every object sealed ([`seal`]: ChaCha20-Poly1305 under the cluster key,
//!   the object's reference as associated data), so `hub.db`, a PostgreSQL dump or a backup
//!   reveals keys and sizes, never a value. The cluster key file never enters the store.
//! - The API shows [`proto::objects::ObjectView`]s: no request returns a value.
//! - A node gets an object over its own authenticated link ([`answer_node`]) only while a
//!   replica assigned to it reads the object; any other request is refused and logged.

use std::fmt::Write as _;
use std::sync::Arc;

use proto::messages::{ApiResponse, ObjectAnswer};
use proto::objects::{ObjectData, ObjectKind, ObjectRef};
use tracing::{info, warn};

use crate::cluster::Shared;
use crate::sealed::{ClusterKey, SealError};
use crate::store::{NewObject, ObjectDeletion, ObjectRow, StoreError};

/// The associated data an object is sealed with: its reference, so a sealed value cannot be
/// moved to another object's row.
fn aad(r: &ObjectRef) -> String {
    format!("object:{r}")
}

/// Seals `data` for the store.
pub(crate) fn seal(key: &ClusterKey, data: &ObjectData) -> Result<NewObject, SealError> {
    let json = serde_json::to_string(data).expect("object data serializes");
    Ok(NewObject {
        kind: data.kind,
        name: data.name.clone(),
        digest: data.digest(),
        keys: data.data.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect(),
        sealed: key.seal(&aad(&data.reference()), &json)?,
    })
}

/// Why a stored object could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("{object} does not open with this hub's cluster key: {source}")]
    Seal { object: ObjectRef, source: SealError },
    #[error("{object} is stored in an unreadable form")]
    Corrupt { object: ObjectRef },
    #[error("cannot seal {object} again: {source}")]
    Reseal { object: ObjectRef, source: SealError },
}

/// Opens a stored object.
pub(crate) fn open(key: &ClusterKey, row: &ObjectRow) -> Result<ObjectData, OpenError> {
    let r = row.reference();
    let json = key.open(&aad(&r), &row.sealed).map_err(|source| OpenError::Seal { object: r.clone(), source })?;
    let data: ObjectData = serde_json::from_str(&json).map_err(|_| OpenError::Corrupt { object: r.clone() })?;
    if data.reference() != r || data.digest() != row.digest {
        return Err(OpenError::Corrupt { object: r });
    }
    Ok(data)
}

/// Opens a stored object; a value sealed with a key this hub's ring lacks (another hub
/// rotated the key) makes it read its key file again once.
fn open_current(shared: &Shared, row: &ObjectRow) -> Result<ObjectData, OpenError> {
    match open(&shared.objects_key(), row) {
        Err(OpenError::Seal { source: SealError::UnknownKey(_), .. }) => {
            if let Ok(material) = std::fs::read(&shared.key_path)
                && let Ok(ring) = ClusterKey::from_material(&material)
            {
                info!(path = %shared.key_path.display(), "cluster key file read again: a value names a newer key");
                shared.set_objects_key(ring);
            }
            open(&shared.objects_key(), row)
        }
        other => other,
    }
}

/// `flotilla secrets rotate-key`: a new key is appended to the cluster key file and seals
/// every object and cluster secret again; older keys stay in the file (they open what they
/// sealed until it is sealed again, and other hubs may not have the new file yet).
pub(crate) async fn rotate_key(shared: &Shared) -> Result<ApiResponse, StoreError> {
    let _one = shared.rotation.lock().await;
    let path = shared.key_path.clone();
    let material = match std::fs::read_to_string(&path) {
        Ok(m) => m,
        Err(e) => {
            return Ok(ApiResponse::Error {
                message: format!("cannot read the cluster key file {}: {e}", path.display()),
            });
        }
    };
    let (text, ring) = match ClusterKey::rotated(&material) {
        Ok(r) => r,
        Err(e) => return Ok(ApiResponse::Error { message: format!("cannot rotate the cluster key: {e}") }),
    };
    if let Err(e) = crate::fsutil::write_private(&path, text.as_bytes()) {
        return Ok(ApiResponse::Error {
            message: format!("cannot write the cluster key file {}: {e}", path.display()),
        });
    }
    shared.set_objects_key(ClusterKey::from_material(text.as_bytes()).expect("the ring just made parses"));
    let id = ring.current_id().to_string();
    let resealed = shared
        .store
        .reseal_objects(|row| {
            if ring.is_current(&row.sealed) {
                return Ok(None);
            }
            let object = row.reference();
            let aad = aad(&object);
            let plain =
                ring.open(&aad, &row.sealed).map_err(|source| OpenError::Seal { object: object.clone(), source })?;
            ring.seal(&aad, &plain).map(Some).map_err(|source| OpenError::Reseal { object, source })
        })
        .await?;
    let objects = match resealed {
        Ok(n) => n,
        Err(e) => {
            return Ok(ApiResponse::Error {
                message: format!(
                    "the new key {id} is in the key file, but sealing again stopped at {e}; nothing was lost: retry"
                ),
            });
        }
    };
    // The cluster identity a shared store holds.
    let mut cluster = 0;
    let name = crate::bootstrap::IDENTITY_SECRET;
    if let Some(old) = shared.store.secret(name).await?.filter(|v| crate::sealed::is_sealed(v) && !ring.is_current(v)) {
        match ring.open(name, &old).and_then(|plain| ring.seal(name, &plain)) {
            Ok(new) => {
                if shared.store.replace_secret(name, &old, &new).await? {
                    cluster = 1;
                }
            }
            Err(e) => warn!(error = %e, "the cluster identity was not sealed again"),
        }
    }
    info!(key = %id, objects, cluster, "cluster key rotated");
    Ok(ApiResponse::Described {
        text: format!(
            "cluster key rotated: new key {id}; {objects} configs and secrets and {cluster} cluster secrets sealed with it.\n\
             {} keeps the older keys, which open nothing sealed since. Copy it to every hub sharing this store;\n\
             then the older lines may be removed.\n",
            path.display()
        ),
    })
}

/// `get configs` / `get secrets`.
pub(crate) async fn get(shared: &Shared, kind: ObjectKind) -> Result<ApiResponse, StoreError> {
    let rows = shared.store.objects(kind).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        let used_by = shared.store.object_readers(&row.reference()).await?;
        items.push(view(&row, used_by));
    }
    Ok(ApiResponse::Objects { items })
}

/// A config's contents (`ApiRequest::ConfigData`); secrets' are never answered.
pub(crate) async fn config_data(shared: &Shared, name: &str) -> Result<ApiResponse, StoreError> {
    let r = ObjectRef::new(ObjectKind::Config, name.to_string());
    let Some(row) = shared.store.object(&r).await? else {
        return Ok(ApiResponse::Error { message: format!("config {name:?} not found") });
    };
    Ok(match open_current(shared, &row) {
        Ok(object) => ApiResponse::ConfigData { object },
        Err(e) => ApiResponse::Error { message: e.to_string() },
    })
}

fn view(row: &ObjectRow, used_by: Vec<String>) -> proto::objects::ObjectView {
    proto::objects::ObjectView {
        kind: row.kind,
        name: row.name.clone(),
        version: row.version,
        digest: row.digest.clone(),
        keys: row.keys.clone(),
        used_by,
    }
}

/// `describe config NAME` / `describe secret NAME`: never a value.
pub(crate) async fn describe(shared: &Shared, r: &ObjectRef) -> Result<Option<String>, StoreError> {
    let Some(row) = shared.store.object(r).await? else { return Ok(None) };
    let used_by = shared.store.object_readers(r).await?;
    let mut s = String::new();
    let _ = writeln!(s, "Name:       {}", row.name);
    let _ = writeln!(s, "Kind:       {}", row.kind);
    let _ = writeln!(s, "Version:    {}", row.version);
    let _ = writeln!(s, "Digest:     sha256:{}", row.digest);
    let _ = writeln!(s, "Updated:    {}", crate::api::age_since_ms(row.updated_at_ms));
    let _ = writeln!(s, "Used by:    {}", if used_by.is_empty() { "<none>".to_string() } else { used_by.join(", ") });
    let _ = writeln!(s, "Keys:");
    for (k, size) in &row.keys {
        let _ = writeln!(s, "  {k}: {size} bytes");
    }
    Ok(Some(s))
}

/// `delete config|secret NAME [--force]`.
pub(crate) async fn delete(shared: &Shared, r: &ObjectRef, force: bool) -> Result<ApiResponse, StoreError> {
    let (outcome, nodes) = shared.store.delete_object(r, force, crate::now_ms()).await?;
    Ok(match outcome {
        ObjectDeletion::NotFound => ApiResponse::Error { message: format!("{} {:?} not found", r.kind.word(), r.name) },
        ObjectDeletion::InUse(readers) => ApiResponse::Error {
            message: format!(
                "{r} is in use by {}; delete or change those workloads first, or delete with --force (their replicas then wait for it)",
                readers.join(", ")
            ),
        },
        ObjectDeletion::Deleted => {
            info!(object = %r, "deleted");
            shared.wake_nodes(&nodes);
            shared.trigger_reconcile();
            ApiResponse::Deleted { names: vec![r.to_string()] }
        }
    })
}

/// A node's request for an object on its authenticated link. Refused (and logged) unless a
/// replica assigned to the node reads the object.
pub(crate) async fn answer_node(shared: &Arc<Shared>, node: &str, r: &ObjectRef) -> ObjectAnswer {
    let refused = |message: String| ObjectAnswer::Refused { message };
    match shared.store.node_reads(node, r).await {
        Err(e) => {
            warn!(%node, object = %r, error = %e, "cannot check an object request");
            return refused("the hub's store is unreachable; retry".into());
        }
        Ok(false) => {
            warn!(%node, object = %r, "refused an object to a node that runs no replica reading it");
            return refused(format!("no replica assigned to node {node} reads {r}"));
        }
        Ok(true) => {}
    }
    let row = match shared.store.object(r).await {
        Err(e) => {
            warn!(%node, object = %r, error = %e, "cannot read an object");
            return refused("the hub's store is unreachable; retry".into());
        }
        Ok(None) => return refused(format!("{r} does not exist")),
        Ok(Some(row)) => row,
    };
    match open_current(shared, &row) {
        Ok(data) => ObjectAnswer::Found { version: row.version(), data },
        Err(e) => {
            warn!(%node, error = %e, "cannot open a stored object");
            refused(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::from_material(ClusterKey::generate_material().unwrap().as_bytes()).unwrap()
    }

    fn row(o: &NewObject) -> ObjectRow {
        ObjectRow {
            kind: o.kind,
            name: o.name.clone(),
            version: 1,
            digest: o.digest.clone(),
            keys: o.keys.clone(),
            sealed: o.sealed.clone(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn a_sealed_object_reveals_keys_and_sizes_only_and_opens_only_as_itself() {
        let k = key();
        let data = ObjectData {
            kind: ObjectKind::Secret,
            name: "db".into(),
            data: [("password".to_string(), b"hunter2-very-secret".to_vec())].into(),
        };
        let sealed = seal(&k, &data).unwrap();
        assert_eq!(sealed.keys["password"], 19);
        assert!(!sealed.sealed.contains("hunter2") && !sealed.sealed.contains(&hex::encode("hunter2")));
        assert_eq!(open(&k, &row(&sealed)).unwrap(), data);
        // Moved to another object's row: does not open.
        let mut moved = row(&sealed);
        moved.name = "other".into();
        assert!(matches!(open(&k, &moved), Err(OpenError::Seal { .. })));
        // Another cluster's key: does not open.
        assert!(matches!(open(&key(), &row(&sealed)), Err(OpenError::Seal { .. })));
        // A digest that does not match the content: refused.
        let mut wrong = row(&sealed);
        wrong.digest = "0".repeat(64);
        assert!(matches!(open(&k, &wrong), Err(OpenError::Corrupt { .. })));
    }
}
