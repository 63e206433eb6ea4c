//! Static node filters: label selectors, taints and tolerations, os/arch. Each answers a
//! yes/no question about one node and one workload from their fields alone, with Kubernetes
//! semantics where Kubernetes has the concept. No state, no scoring: the caller decides which
//! filters apply to a new placement and which to a replica that is already running.

use std::collections::BTreeMap;

use super::{SchedNode, SchedWorkload, SelectorOperator, SelectorRequirement, Taint, TaintEffect, Toleration};
use proto::manifest::canonical_arch;

/// Node label carrying the agent's operating system (`linux`).
pub const OS_LABEL: &str = "flotilla.dev/os";
/// Node label carrying the agent's CPU architecture (`x86_64`, `aarch64`).
pub const ARCH_LABEL: &str = "flotilla.dev/arch";

impl SelectorRequirement {
    /// Kubernetes semantics: `NotIn` also matches a node without the key.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self.operator {
            SelectorOperator::In => labels.get(&self.key).is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => labels.get(&self.key).is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => labels.contains_key(&self.key),
            SelectorOperator::DoesNotExist => !labels.contains_key(&self.key),
        }
    }
}

impl Toleration {
    /// Kubernetes semantics: an empty key with `Exists` tolerates every taint; no effect
    /// tolerates every effect; `Equal` compares values.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        if !self.key.is_empty() && self.key != taint.key {
            return false;
        }
        match self.operator {
            super::TolerationOperator::Exists => true,
            super::TolerationOperator::Equal => self.value == taint.value,
        }
    }
}

pub(super) fn selector_matches(w: &SchedWorkload, labels: &BTreeMap<String, String>) -> bool {
    w.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        && w.match_expressions.iter().all(|e| e.matches(labels))
}

pub(super) fn platform_matches(w: &SchedWorkload, labels: &BTreeMap<String, String>) -> bool {
    let is = |want: &Option<String>, key: &str| want.as_ref().is_none_or(|want| labels.get(key) == Some(want));
    // `arch: amd64` (Go's and OCI's name) is the node that reports x86_64.
    let arch = w
        .arch
        .as_ref()
        .is_none_or(|want| labels.get(ARCH_LABEL).is_some_and(|have| canonical_arch(have) == canonical_arch(want)));
    is(&w.os, OS_LABEL) && arch
}

/// Whether `node` has a taint with one of `effects` that `w` does not tolerate.
pub(super) fn untolerated(node: &SchedNode, w: &SchedWorkload, effects: &[TaintEffect]) -> bool {
    node.taints.iter().any(|t| effects.contains(&t.effect) && !w.tolerations.iter().any(|tol| tol.tolerates(t)))
}
