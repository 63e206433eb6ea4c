//! Fleet upgrades of agents (`flotilla upgrade agents --to IMAGE`): which nodes to order next,
//! which are done, which failed, and when the upgrade pauses. [`plan`] is pure: it takes the
//! upgrade, the nodes as the store and the sessions see them, what was ordered so far and the
//! time, and returns what to record. [`shell`] runs it on the leader and delivers the orders
//! from every hub to the agents connected to it.
//!
//! Rules:
//! - The upgrade covers the nodes whose labels match its selector, in name order, whenever
//!   they are connected: a node offline at the start is upgraded when it comes back.
//! - At most `max_unavailable` nodes are on order at once (sent, not yet back on the new
//!   binary). A node is done when its hello reports the image (and the hub has its session);
//!   one already on the image is done without an order.
//! - A node failed when its agent reports the attempt rolled back, refuses the order, or is
//!   not back on the new binary by the deadline (plus [`REPORT_SLACK_MS`] for the rollback
//!   and reconnect). The first failure pauses the upgrade: nodes on order finish, nothing new
//!   is ordered, until an operator starts another upgrade.
//! - Complete once every selected node is done.

pub mod shell;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use proto::messages::{AgentBinary, NodeUpgradeView, UpgradeOutcome, UpgradeView};

/// Beyond the deadline an agent has, how long the hub waits to hear how it ended (the agent's
/// own rollback, its restart and its reconnect) before calling the node failed.
pub const REPORT_SLACK_MS: u64 = 60_000;

/// The fleet upgrade, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub attempt: u64,
    pub image: String,
    pub selector: BTreeMap<String, String>,
    pub max_unavailable: u32,
    pub deadline_ms: u64,
    pub started_at_ms: u64,
    pub started_by: String,
    /// Why it stopped ordering nodes; empty while it goes on.
    pub paused: String,
    pub completed_at_ms: Option<u64>,
}

/// Where one node of the upgrade stands, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Sent the order (or about to be); not yet back on the new binary.
    Ordered,
    Done,
    Failed,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ordered => "ordered",
            NodeState::Done => "done",
            NodeState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        match s {
            "ordered" => Some(NodeState::Ordered),
            "done" => Some(NodeState::Done),
            "failed" => Some(NodeState::Failed),
            _ => None,
        }
    }
}

/// A node the upgrade ordered (or found done), as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProgress {
    pub node: String,
    pub attempt: u64,
    pub state: NodeState,
    /// When it was ordered (wall clock: the deadline must hold across a change of leader).
    pub ordered_at_ms: u64,
    pub message: String,
}

/// What the planner needs of a node.
#[derive(Debug, Clone, Copy)]
pub struct NodeInput<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// Its agent holds a session with a hub.
    pub connected: bool,
    pub agent_binary: Option<&'a AgentBinary>,
    pub last_upgrade: Option<&'a UpgradeOutcome>,
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Node rows to write (new orders, and nodes now done or failed).
    pub writes: Vec<NodeProgress>,
    /// Set when the upgrade pauses in this pass.
    pub pause: Option<String>,
    /// Set when the upgrade completes in this pass.
    pub complete: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.pause.is_none() && !self.complete
    }
}

fn selected(up: &Upgrade, n: &NodeInput<'_>) -> bool {
    up.selector.iter().all(|(k, v)| n.labels.get(k) == Some(v))
}

/// Why this attempt was rolled back on the node, if its agent said it was.
fn rolled_back<'a>(up: &Upgrade, n: &NodeInput<'a>) -> Option<&'a str> {
    n.last_upgrade.filter(|o| o.attempt == up.attempt && !o.ok).map(|o| o.message.as_str())
}

fn on_image(up: &Upgrade, n: &NodeInput<'_>) -> bool {
    n.agent_binary.is_some_and(|b| b.image == up.image) && rolled_back(up, n).is_none()
}

/// One pass over the upgrade. `progress` holds the node rows of this attempt.
pub fn plan(up: &Upgrade, nodes: &[NodeInput<'_>], progress: &BTreeMap<String, NodeProgress>, now_ms: u64) -> Plan {
    let mut out = Plan::default();
    if up.completed_at_ms.is_some() {
        return out;
    }
    let row = |node: &str, state: NodeState, ordered_at_ms: u64, message: String| NodeProgress {
        node: node.to_string(),
        attempt: up.attempt,
        state,
        ordered_at_ms,
        message,
    };
    let mut targets: Vec<&NodeInput<'_>> = nodes.iter().filter(|n| selected(up, n)).collect();
    targets.sort_by_key(|n| n.name);
    let mut in_flight = 0u32;
    let mut done = 0usize;
    let mut first_failure: Option<String> = None;
    let mut pending = Vec::new();
    for n in &targets {
        let current = progress.get(n.name).filter(|p| p.attempt == up.attempt);
        let failed = |message: String, ordered_at: u64| row(n.name, NodeState::Failed, ordered_at, message);
        match current.map(|p| (p.state, p.ordered_at_ms)) {
            Some((NodeState::Failed, _)) => {
                let message = current.map(|p| p.message.clone()).unwrap_or_default();
                first_failure.get_or_insert(format!("node {}: {message}", n.name));
            }
            Some((state @ (NodeState::Ordered | NodeState::Done), ordered_at)) => {
                if let Some(why) = rolled_back(up, n) {
                    let message = format!("rolled back: {why}");
                    first_failure.get_or_insert(format!("node {}: {message}", n.name));
                    out.writes.push(failed(message, ordered_at));
                } else if state == NodeState::Done || (on_image(up, n) && n.connected) {
                    if state == NodeState::Ordered {
                        out.writes.push(row(n.name, NodeState::Done, ordered_at, String::new()));
                    }
                    done += 1;
                } else if now_ms > ordered_at.saturating_add(up.deadline_ms).saturating_add(REPORT_SLACK_MS) {
                    let message = format!(
                        "not back on the new binary within {}s of the order",
                        (up.deadline_ms + REPORT_SLACK_MS) / 1000
                    );
                    first_failure.get_or_insert(format!("node {}: {message}", n.name));
                    out.writes.push(failed(message, ordered_at));
                } else {
                    in_flight += 1;
                }
            }
            None if on_image(up, n) && n.connected => {
                out.writes.push(row(n.name, NodeState::Done, now_ms, String::new()));
                done += 1;
            }
            None => pending.push(*n),
        }
    }
    if up.paused.is_empty()
        && let Some(why) = first_failure
    {
        out.pause = Some(why);
    }
    if !up.paused.is_empty() || out.pause.is_some() {
        return out;
    }
    let budget = up.max_unavailable.saturating_sub(in_flight) as usize;
    for n in pending.iter().filter(|n| n.connected).take(budget) {
        out.writes.push(row(n.name, NodeState::Ordered, now_ms, String::new()));
    }
    out.complete = !targets.is_empty() && done == targets.len();
    out
}

/// The phase `upgrade status` shows.
pub fn phase(up: &Upgrade) -> &'static str {
    if up.completed_at_ms.is_some() {
        "Complete"
    } else if !up.paused.is_empty() {
        "Paused"
    } else {
        "Progressing"
    }
}

/// A node's line in `upgrade status`.
fn node_state(up: &Upgrade, n: &NodeInput<'_>, p: Option<&NodeProgress>) -> (String, String) {
    match p.filter(|p| p.attempt == up.attempt) {
        Some(p) => match p.state {
            NodeState::Done => ("Upgraded".into(), String::new()),
            NodeState::Failed => ("Failed".into(), p.message.clone()),
            NodeState::Ordered => ("Upgrading".into(), String::new()),
        },
        None if !n.connected => ("Pending (NotReady)".into(), String::new()),
        None => ("Pending".into(), String::new()),
    }
}

/// A view of the upgrade over the nodes it selects.
pub struct NodeFactsOf<'a> {
    pub input: NodeInput<'a>,
    pub version: &'a str,
}

pub fn view(up: &Upgrade, nodes: &[NodeFactsOf<'_>], progress: &BTreeMap<String, NodeProgress>) -> UpgradeView {
    let mut rows: Vec<NodeUpgradeView> = nodes
        .iter()
        .filter(|n| selected(up, &n.input))
        .map(|n| {
            let (state, message) = node_state(up, &n.input, progress.get(n.input.name));
            NodeUpgradeView {
                node: n.input.name.to_string(),
                state,
                version: n.version.to_string(),
                binary: n.input.agent_binary.cloned(),
                message,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    UpgradeView {
        attempt: up.attempt,
        image: up.image.clone(),
        selector: up.selector.clone(),
        max_unavailable: up.max_unavailable,
        deadline_ms: up.deadline_ms,
        started_at_ms: up.started_at_ms,
        started_by: up.started_by.clone(),
        phase: phase(up).to_string(),
        message: up.paused.clone(),
        nodes: rows,
    }
}
