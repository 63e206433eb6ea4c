//! Rollout history and rollbacks over the store: `flotilla rollout history|undo|status`,
//! `flotilla scale`, and the controller's automatic rollback of a rollout that stopped
//! progressing. A rollback is an apply: the workload keeps its replicas, placement and strategy
//! and takes an earlier revision's replica template, recorded as a new revision with its cause.

use std::fmt::Write as _;

use proto::manifest::WorkloadKind;

use crate::store::{Applied, ReplicaRow, RevisionRow, Store, StoreError, WorkloadRow};

/// Why an operation on a workload was not done. The messages are what the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    #[error("workload {0:?} not found")]
    NotFound(String),
    #[error("workload {name:?} is {kind:?}; only Replicated workloads scale")]
    NotScalable { name: String, kind: WorkloadKind },
    /// The scaled manifest fails validation (`spec.replicas` out of range).
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// No revision to roll back to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("no revision {wanted} (revisions: {known})")]
    NoSuchRevision { wanted: u64, known: String },
    #[error("no earlier revision with a different template to roll back to")]
    NoEarlierTemplate,
}

/// Which revision a rollback goes to: `to`, or the newest one before the current template
/// whose template differs from it.
pub fn rollback_target<'a>(
    revisions: &'a [RevisionRow],
    current_hash: &str,
    to: Option<u64>,
) -> Result<&'a RevisionRow, TargetError> {
    if let Some(n) = to {
        return revisions.iter().find(|r| r.revision == n).ok_or_else(|| {
            let known: Vec<String> = revisions.iter().map(|r| r.revision.to_string()).collect();
            TargetError::NoSuchRevision { wanted: n, known: known.join(", ") }
        });
    }
    // The current template's own revision is the newest with its hash; go before it.
    let current = revisions.iter().rposition(|r| r.template_hash == current_hash).unwrap_or(revisions.len());
    revisions[..current].iter().rev().find(|r| r.template_hash != current_hash).ok_or(TargetError::NoEarlierTemplate)
}

/// Rolls `name` back to revision `to` (or the previous template), recording `cause`: one
/// read-modify-write under the store's write lock, so an apply landing meanwhile is never
/// overwritten. Returns the revision whose template it took.
pub async fn rollback(
    store: &Store,
    name: &str,
    to: Option<u64>,
    cause: &str,
    now_ms: u64,
) -> Result<(u64, Applied), RevisionError> {
    let done = store
        .modify_workload(name, cause, now_ms, |w, revisions| {
            let target = rollback_target(revisions, &w.manifest.template().hash(), to)?;
            Ok::<_, RevisionError>((w.manifest.with_template_of(&target.manifest), target.revision))
        })
        .await?;
    done.ok_or_else(|| RevisionError::NotFound(name.to_string()))
}

/// Sets a Replicated workload's replica count, as one read-modify-write (see [`rollback`]).
pub async fn scale(store: &Store, name: &str, replicas: u32, now_ms: u64) -> Result<Applied, RevisionError> {
    let done = store
        .modify_workload(name, "scale", now_ms, |w, _| {
            if w.manifest.spec.kind != WorkloadKind::Replicated {
                return Err(RevisionError::NotScalable { name: name.to_string(), kind: w.manifest.spec.kind });
            }
            let mut m = w.manifest.clone();
            m.spec.replicas = Some(replicas);
            m.validate().map_err(|(path, message)| RevisionError::Invalid { path, message })?;
            Ok((m, ()))
        })
        .await?;
    done.map(|((), applied)| applied).ok_or_else(|| RevisionError::NotFound(name.to_string()))
}

/// `flotilla rollout history` text.
pub fn history_text(name: &str, revisions: &[RevisionRow], current_hash: &str) -> String {
    let mut s = format!("workload/{name}\n");
    let _ = writeln!(s, "{:<9} {:<17} {:<8} CAUSE", "REVISION", "TEMPLATE", "CURRENT");
    for r in revisions {
        let current = if r.template_hash == current_hash { "*" } else { "" };
        let _ = writeln!(s, "{:<9} {:<17} {:<8} {}", r.revision, r.template_hash, current, r.cause);
    }
    s
}

/// Where a workload's rollout stands: (complete, one-line text).
pub fn status(w: &WorkloadRow, replicas: &[&ReplicaRow], available: impl Fn(&ReplicaRow) -> bool) -> (bool, String) {
    let current = w.manifest.template().hash();
    let desired = replicas.len() as u32;
    let updated: Vec<&&ReplicaRow> = replicas.iter().filter(|r| r.template_hash == current).collect();
    let ready = updated.iter().filter(|r| available(r)).count() as u32;
    let total_available = replicas.iter().filter(|r| available(r)).count();
    let complete = updated.len() as u32 == desired && ready == desired;
    let text = if complete {
        format!("rollout of template {current} complete: {desired}/{desired} updated and available")
    } else {
        let waiting: Vec<&str> = updated.iter().filter(|r| !available(r)).map(|r| r.name.as_str()).take(5).collect();
        format!(
            "rolling out template {current}: {}/{desired} updated, {ready} of them available, {total_available} available in all{}",
            updated.len(),
            if waiting.is_empty() {
                String::new()
            } else {
                format!("; waiting for {} to become ready", waiting.join(", "))
            }
        )
    };
    (complete, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::parse_manifests;

    fn rev(revision: u64, hash: &str, cause: &str) -> RevisionRow {
        let m = parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec: {runtime: wasm, image: r/w:1}\n",
        )
        .unwrap()
        .remove(0);
        RevisionRow { revision, template_hash: hash.into(), manifest: m, cause: cause.into(), created_at_ms: 0 }
    }

    #[test]
    fn rollback_goes_to_the_previous_different_template_or_the_one_named() {
        let revs = [rev(1, "a", "apply"), rev(3, "b", "apply"), rev(4, "c", "apply")];
        assert_eq!(rollback_target(&revs, "c", None).unwrap().revision, 3);
        assert_eq!(rollback_target(&revs, "c", Some(1)).unwrap().revision, 1);
        assert_eq!(rollback_target(&revs, "c", Some(2)).unwrap_err().to_string(), "no revision 2 (revisions: 1, 3, 4)");
        // After an undo to a's template (revision 5), the previous different one is c.
        let revs = [rev(1, "a", "apply"), rev(3, "b", "apply"), rev(4, "c", "apply"), rev(5, "a", "undo")];
        assert_eq!(rollback_target(&revs, "a", None).unwrap().revision, 4);
        assert!(rollback_target(&revs[..1], "a", None).is_err());
    }

    #[test]
    fn a_rollback_keeps_replicas_and_placement_and_takes_the_template() {
        let a = parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec:\n  runtime: container\n  image: r/w:1\n  replicas: 5\n  env: {V: \"1\"}\n  nodeSelector: {site: x}\n  resources: {memory: 64Mi, requests: {cpu: 100m}}\n  strategy: {maxUnavailable: 2}\n",
        )
        .unwrap()
        .remove(0);
        let b = parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec:\n  runtime: container\n  image: r/w:2\n  replicas: 1\n  command: [/bin/app]\n  env: {V: \"2\"}\n  resources: {memory: 32Mi, pids: 9}\n  terminationGracePeriod: 3s\n  readinessProbe: {tcpSocket: {port: 80}}\n",
        )
        .unwrap()
        .remove(0);
        let back = a.with_template_of(&b);
        assert_eq!(back.template(), b.template());
        assert_eq!(back.spec.replicas, Some(5));
        assert_eq!(back.spec.node_selector, a.spec.node_selector);
        assert_eq!(back.spec.resources.requests, a.spec.resources.requests);
        assert_eq!(back.spec.strategy, a.spec.strategy);
    }
}
