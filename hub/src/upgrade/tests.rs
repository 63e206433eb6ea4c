use std::collections::BTreeMap;

use proto::messages::{AgentBinary, UpgradeOutcome};

use super::*;

const IMAGE: &str = "reg/flotilla-agent:2";

fn upgrade(max_unavailable: u32) -> Upgrade {
    Upgrade {
        attempt: 4,
        image: IMAGE.into(),
        selector: BTreeMap::new(),
        max_unavailable,
        deadline_ms: 60_000,
        started_at_ms: 0,
        started_by: "admin".into(),
        paused: String::new(),
        completed_at_ms: None,
    }
}

struct Node {
    name: String,
    labels: BTreeMap<String, String>,
    connected: bool,
    binary: Option<AgentBinary>,
    last: Option<UpgradeOutcome>,
}

fn node(name: &str) -> Node {
    Node { name: name.into(), labels: BTreeMap::new(), connected: true, binary: None, last: None }
}

impl Node {
    fn on(mut self, image: &str) -> Node {
        self.binary = Some(AgentBinary { image: image.into(), digest: "sha256:00".into() });
        self
    }
    fn rolled_back(mut self, attempt: u64) -> Node {
        self.last = Some(UpgradeOutcome { attempt, image: IMAGE.into(), ok: false, message: "exited".into() });
        self
    }
    fn input(&self) -> NodeInput<'_> {
        NodeInput {
            name: &self.name,
            labels: &self.labels,
            connected: self.connected,
            agent_binary: self.binary.as_ref(),
            last_upgrade: self.last.as_ref(),
        }
    }
}

fn inputs(nodes: &[Node]) -> Vec<NodeInput<'_>> {
    nodes.iter().map(Node::input).collect()
}

fn apply(progress: &mut BTreeMap<String, NodeProgress>, plan: &Plan) {
    for w in &plan.writes {
        progress.insert(w.node.clone(), w.clone());
    }
}

fn ordered(plan: &Plan) -> Vec<&str> {
    plan.writes.iter().filter(|w| w.state == NodeState::Ordered).map(|w| w.node.as_str()).collect()
}

#[test]
fn nodes_are_ordered_in_batches_of_max_unavailable_and_the_next_batch_waits() {
    let up = upgrade(2);
    let mut nodes = vec![node("c"), node("a"), node("b"), node("d")];
    let mut progress = BTreeMap::new();
    let p = plan(&up, &inputs(&nodes), &progress, 1_000);
    assert_eq!(ordered(&p), ["a", "b"]);
    apply(&mut progress, &p);
    // Nothing new while both are on order.
    let p = plan(&up, &inputs(&nodes), &progress, 2_000);
    assert!(p.is_empty(), "{p:?}");
    // One back on the new binary: done, and one more ordered.
    nodes[1] = node("a").on(IMAGE);
    let p = plan(&up, &inputs(&nodes), &progress, 3_000);
    assert_eq!(
        p.writes[0],
        NodeProgress {
            node: "a".into(),
            attempt: 4,
            state: NodeState::Done,
            ordered_at_ms: 1_000,
            message: String::new()
        }
    );
    assert_eq!(ordered(&p), ["c"]);
    apply(&mut progress, &p);
    for (i, name) in [(2, "b"), (0, "c")] {
        nodes[i] = node(name).on(IMAGE);
    }
    let p = plan(&up, &inputs(&nodes), &progress, 4_000);
    assert_eq!(ordered(&p), ["d"]);
    assert!(!p.complete);
    apply(&mut progress, &p);
    nodes[3] = node("d").on(IMAGE);
    let p = plan(&up, &inputs(&nodes), &progress, 5_000);
    assert!(p.complete, "{p:?}");
}

#[test]
fn a_node_already_on_the_image_is_done_without_an_order_and_offline_ones_wait() {
    let up = upgrade(5);
    let mut offline = node("b");
    offline.connected = false;
    let nodes = vec![node("a").on(IMAGE), offline, node("c").on("reg/flotilla-agent:1")];
    let p = plan(&up, &inputs(&nodes), &BTreeMap::new(), 1_000);
    assert_eq!(
        p.writes.iter().map(|w| (w.node.as_str(), w.state)).collect::<Vec<_>>(),
        [("a", NodeState::Done), ("c", NodeState::Ordered)]
    );
    assert!(!p.complete, "b is still to do");
}

#[test]
fn a_rollback_fails_the_node_and_pauses_the_upgrade_while_orders_in_flight_finish() {
    let up = upgrade(2);
    let mut nodes = vec![node("a"), node("b"), node("c")];
    let mut progress = BTreeMap::new();
    let first = plan(&up, &inputs(&nodes), &progress, 1_000);
    apply(&mut progress, &first);
    nodes[0] = node("a").rolled_back(4);
    let p = plan(&up, &inputs(&nodes), &progress, 2_000);
    assert_eq!(p.pause.as_deref(), Some("node a: rolled back: exited"));
    assert!(ordered(&p).is_empty(), "nothing new once paused: {p:?}");
    apply(&mut progress, &p);
    let paused = Upgrade { paused: p.pause.clone().unwrap(), ..up.clone() };
    // b comes back on the new binary: recorded, but c is not ordered.
    nodes[1] = node("b").on(IMAGE);
    let p = plan(&paused, &inputs(&nodes), &progress, 3_000);
    assert_eq!(p.writes.iter().map(|w| (w.node.as_str(), w.state)).collect::<Vec<_>>(), [("b", NodeState::Done)]);
    assert_eq!(p.pause, None, "already paused");
    // A rollback reported for another attempt says nothing about this one.
    let nodes = vec![node("a").rolled_back(3)];
    let p = plan(&up, &inputs(&nodes), &BTreeMap::new(), 1_000);
    assert_eq!(ordered(&p), ["a"]);
}

#[test]
fn a_node_silent_past_its_deadline_fails() {
    let up = upgrade(1);
    let nodes = vec![node("a"), node("b")];
    let mut progress = BTreeMap::new();
    let first = plan(&up, &inputs(&nodes), &progress, 1_000);
    apply(&mut progress, &first);
    let in_time = 1_000 + up.deadline_ms + REPORT_SLACK_MS;
    assert!(plan(&up, &inputs(&nodes), &progress, in_time).is_empty());
    let p = plan(&up, &inputs(&nodes), &progress, in_time + 1);
    assert_eq!(p.writes[0].state, NodeState::Failed);
    assert!(p.pause.unwrap().starts_with("node a: not back on the new binary within 120s"));
}

#[test]
fn the_selector_picks_the_nodes_and_a_complete_upgrade_does_nothing() {
    let mut up = upgrade(10);
    up.selector.insert("ring".into(), "canary".into());
    let mut canary = node("b");
    canary.labels.insert("ring".into(), "canary".into());
    let nodes = vec![node("a"), canary];
    let p = plan(&up, &inputs(&nodes), &BTreeMap::new(), 1_000);
    assert_eq!(ordered(&p), ["b"]);
    up.completed_at_ms = Some(5);
    assert!(plan(&up, &inputs(&nodes), &BTreeMap::new(), 1_000).is_empty());
    // No node selected: never complete (nothing was upgraded).
    up.completed_at_ms = None;
    up.selector.insert("ring".into(), "none".into());
    assert!(!plan(&up, &inputs(&nodes), &BTreeMap::new(), 1_000).complete);
}

#[test]
fn rows_of_an_earlier_attempt_count_for_nothing() {
    let up = upgrade(1);
    let nodes = vec![node("a")];
    let mut progress = BTreeMap::new();
    progress.insert(
        "a".to_string(),
        NodeProgress {
            node: "a".into(),
            attempt: 3,
            state: NodeState::Failed,
            ordered_at_ms: 0,
            message: "old".into(),
        },
    );
    let p = plan(&up, &inputs(&nodes), &progress, 1_000);
    assert_eq!(ordered(&p), ["a"]);
    assert_eq!(p.pause, None);
}
