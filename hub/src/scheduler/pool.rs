//! The candidate pool of one workload during the place pass: every node that can take one
//! more replica, ordered by the workload's score, grouped by spread domain. Picking the best
//! node and re-scoring the one that got a replica are O(log n), so placing a workload costs
//! one filter pass over the nodes plus a logarithmic step per replica, never a scan per
//! replica. It only reads the snapshot and the tallies it is handed.

use std::collections::{BTreeSet, HashMap};

use super::{NodeState, Packing, SchedNode, SchedWorkload, misfit, utilisation_ppm};

/// Lexicographic score, lower is better; the last field (node position) breaks ties by name.
type Key = (u64, u64, u64, usize);

pub(super) struct Pool<'a> {
    /// Spread domain of each node (`u32::MAX`: no label); `None` without spread.
    domain_of: Option<&'a [u32]>,
    /// Replicas of the workload per node.
    per_node: HashMap<usize, u32>,
    /// Replicas of the workload per domain.
    domain_count: Vec<u32>,
    /// Candidate nodes per domain, best first.
    members: Vec<BTreeSet<Key>>,
    /// Each non-empty domain's (count, best key, domain), best first.
    top: BTreeSet<(u32, Key, usize)>,
}

fn key(w: &SchedWorkload, node: &SchedNode, st: &NodeState, per_node: u32, i: usize) -> Key {
    let util = utilisation_ppm(node, st.used, w.requests);
    match w.packing {
        Packing::LeastAllocated => (u64::from(per_node), util, u64::from(st.load), i),
        Packing::BinPack => (u64::MAX - util, u64::MAX - u64::from(st.load), 0, i),
    }
}

impl<'a> Pool<'a> {
    /// `slots` are the workload's (index, kept node) pairs; `domains` the per-node domain ids
    /// and their number when the workload spreads.
    pub(super) fn new(
        w: &SchedWorkload,
        nodes: &[&SchedNode],
        state: &[NodeState],
        slots: &[(u32, Option<usize>)],
        domains: Option<&'a (Vec<u32>, u32)>,
    ) -> Pool<'a> {
        let domain_of = domains.map(|d| d.0.as_slice());
        let n_domains = domains.map_or(1, |d| d.1 as usize);
        let domain = |i: usize| domain_of.map_or(0, |d| d[i] as usize);
        let mut per_node: HashMap<usize, u32> = HashMap::new();
        let mut domain_count = vec![0u32; n_domains];
        for &(_, node) in slots {
            let Some(i) = node else { continue };
            *per_node.entry(i).or_default() += 1;
            if let Some(c) = domain_count.get_mut(domain(i)) {
                *c += 1;
            }
        }
        let mut members = vec![BTreeSet::new(); n_domains];
        for (i, (n, st)) in nodes.iter().zip(state).enumerate() {
            if misfit(n, st, w).is_none() {
                // A spreading workload's candidates all carry the label (static filter).
                if let Some(m) = members.get_mut(domain(i)) {
                    m.insert(key(w, n, st, per_node.get(&i).copied().unwrap_or(0), i));
                }
            }
        }
        let top = members.iter().enumerate().filter_map(|(d, m)| m.first().map(|k| (domain_count[d], *k, d))).collect();
        Pool { domain_of, per_node, domain_count, members, top }
    }

    fn domain(&self, i: usize) -> Option<usize> {
        match self.domain_of {
            None => Some(0),
            Some(d) => d.get(i).filter(|&&d| d != u32::MAX).map(|&d| d as usize),
        }
    }

    /// Runs `change` on domain `d` with its entry taken out of `top`, then puts it back.
    fn with_domain(&mut self, d: usize, change: impl FnOnce(&mut Self)) {
        if let Some(first) = self.members[d].first() {
            self.top.remove(&(self.domain_count[d], *first, d));
        }
        change(self);
        if let Some(first) = self.members[d].first() {
            self.top.insert((self.domain_count[d], *first, d));
        }
    }

    /// Places one replica on the best node, records it in `state` and returns the node.
    pub(super) fn take(&mut self, w: &SchedWorkload, nodes: &[&SchedNode], state: &mut [NodeState]) -> Option<usize> {
        let &(_, best, d) = self.top.first()?;
        let i = best.3;
        self.with_domain(d, |pool| {
            pool.members[d].remove(&best);
            state[i].add(w);
            let count = pool.per_node.entry(i).or_default();
            *count += 1;
            let count = *count;
            pool.domain_count[d] += 1;
            if state[i].fits(nodes[i], w) {
                pool.members[d].insert(key(w, nodes[i], &state[i], count, i));
            }
        });
        Some(i)
    }

    /// A replica of the workload left node `from` (which is not a candidate: it drains).
    pub(super) fn moved_off(&mut self, from: usize) {
        if let Some(c) = self.per_node.get_mut(&from) {
            *c = c.saturating_sub(1);
        }
        if let Some(d) = self.domain(from) {
            self.with_domain(d, |pool| pool.domain_count[d] = pool.domain_count[d].saturating_sub(1));
        }
    }
}
