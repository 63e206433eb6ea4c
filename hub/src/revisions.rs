//! The operator's rollout commands over the store: `flotilla rollout history|undo|status` and
//! `flotilla scale`. An undo is an apply: the workload keeps its replicas, placement and
//! strategy and takes an earlier revision's replica template (the revision
//! [`rollback_target`] names, the rule the controller's automatic rollback uses too),
//! recorded as a new revision with its cause. Undo and scale are each one read-modify-write
//! under the store's write lock ([`Store::modify_workload`]).

use std::fmt::Write as _;

use proto::manifest::WorkloadKind;

use crate::controller::rollout::{TargetError, rollback_target};
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

impl crate::controller::rollout::Revision for RevisionRow {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn template_hash(&self) -> &str {
        &self.template_hash
    }
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

/// How many of a workload's replicas are where, as `get workloads` and `rollout status` count
/// them (the hub's Prometheus gauge `flotilla_hub_workload_replicas`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolloutCounts {
    /// What the manifest asks for (a Replicated workload's `replicas`); for the other kinds,
    /// the replicas the controller made (one per matching node, one per running Job index).
    pub desired: u32,
    /// Replicas on the current template.
    pub updated: u32,
    /// Of those, the available ones.
    pub ready: u32,
    /// Available replicas on any template.
    pub available: u32,
}

/// Counts `replicas` (the workload's own) by [`RolloutCounts`]' states.
pub fn rollout_counts(
    w: &WorkloadRow,
    replicas: &[&ReplicaRow],
    available: impl Fn(&ReplicaRow) -> bool,
) -> RolloutCounts {
    let current = w.manifest.template().hash();
    let count = |keep: &dyn Fn(&ReplicaRow) -> bool| replicas.iter().filter(|r| keep(r)).count() as u32;
    RolloutCounts {
        desired: match w.manifest.spec.kind {
            WorkloadKind::Replicated => w.manifest.spec.replicas(),
            WorkloadKind::EveryNode | WorkloadKind::Job => replicas.len() as u32,
        },
        updated: count(&|r| r.template_hash == current),
        ready: count(&|r| r.template_hash == current && available(r)),
        available: count(&|r| available(r)),
    }
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
    use proto::manifest::parse_manifests;

    use super::*;

    #[test]
    fn rollout_counts_follow_template_and_availability() {
        let manifest = |image: &str, replicas: u32| {
            parse_manifests(&format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  runtime: container\n  image: {image}\n  replicas: {replicas}\n"
            ))
            .unwrap()
            .remove(0)
        };
        let w = WorkloadRow { manifest: manifest("r/w:2", 4), revision: 2, created_at_ms: 0 };
        let (old, new) = (manifest("r/w:1", 4).template().hash(), w.manifest.template().hash());
        let replica = |i: u32, hash: &str, phase| ReplicaRow {
            name: format!("w-{i}"),
            workload: "w".into(),
            index: i,
            node: Some("n".into()),
            template_hash: hash.to_string(),
            status: proto::messages::ReplicaStatus { phase, ..Default::default() },
            unschedulable: String::new(),
            attempt: None,
        };
        use proto::messages::Phase::{Pending, Running};
        let rows = [replica(0, &new, Running), replica(1, &new, Pending), replica(2, &old, Running)];
        let refs: Vec<&ReplicaRow> = rows.iter().collect();
        let counts = rollout_counts(&w, &refs, |r| r.status.phase == Running);
        // Desired is the manifest's 4 even while a replica is still to be made.
        assert_eq!(counts, RolloutCounts { desired: 4, updated: 2, ready: 1, available: 2 });
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
