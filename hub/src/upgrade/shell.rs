//! The I/O around the upgrade planner. Every hub runs [`upgrade_loop`]: on the leader it plans
//! a pass (under the lease), and on every hub it delivers the orders of the nodes whose agents
//! are connected to it, once per session, and records a refusal as the node's failure.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proto::messages::{ApiResponse, HubRequest, UpgradeAnswer};
use tracing::{Instrument, debug, info, info_span, warn};
use transport::frame;

use super::{NodeFactsOf, NodeInput, plan, view};
use crate::cluster::Shared;
use crate::now_ms;
use crate::store::{Fence, NewUpgrade, StoreError, UpgradeOrder};

/// How often the loop looks again without being woken.
const PASS_INTERVAL: Duration = Duration::from_secs(2);
/// The shortest and longest deadline an upgrade may give each agent.
pub const MIN_DEADLINE_MS: u64 = 10_000;
pub const MAX_DEADLINE_MS: u64 = 3_600_000;
/// The longest image reference an upgrade takes.
const MAX_IMAGE_LEN: usize = 512;
/// The most selector labels.
const MAX_SELECTOR: usize = 16;

/// Plans (on the leader) and delivers orders (on every hub) until the hub stops.
pub(crate) async fn upgrade_loop(shared: Arc<Shared>) {
    // (node, attempt, session) already sent: an order goes once per session of the node.
    let mut sent: HashSet<(String, u64, u64)> = HashSet::new();
    loop {
        if *shared.leader.borrow()
            && let Err(e) = plan_pass(&shared).await
        {
            warn!(error = %e, "agent upgrade pass failed");
        }
        if let Err(e) = deliver(&shared, &mut sent).await {
            warn!(error = %e, "cannot read the agent upgrade orders");
        }
        tokio::select! {
            _ = shared.upgrades.notified() => {}
            _ = tokio::time::sleep(PASS_INTERVAL) => {}
        }
    }
}

async fn plan_pass(shared: &Shared) -> Result<(), StoreError> {
    let Some((up, progress)) = shared.store.agent_upgrade().await? else { return Ok(()) };
    if up.completed_at_ms.is_some() {
        return Ok(());
    }
    let nodes = shared.store.nodes().await?;
    let inputs: Vec<NodeInput<'_>> = nodes.iter().map(|n| input(shared, n)).collect();
    let now = now_ms();
    let pass = plan(&up, &inputs, &progress, now);
    if pass.is_empty() {
        return Ok(());
    }
    let fence = Fence { lease: crate::leader::CONTROLLER_LEASE, holder: &shared.hub_id };
    match shared.store.write_upgrade_plan(fence, up.attempt, &pass, now).await {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(StoreError::NotLeader { .. }) => {
            debug!("no longer the leader; the upgrade pass is not written");
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    for w in &pass.writes {
        match w.state {
            super::NodeState::Ordered => {
                info!(node = %w.node, image = %up.image, attempt = up.attempt, "agent upgrade ordered")
            }
            super::NodeState::Done => info!(node = %w.node, image = %up.image, "agent upgraded"),
            super::NodeState::Failed => warn!(node = %w.node, reason = %w.message, "agent upgrade failed"),
        }
    }
    if let Some(why) = &pass.pause {
        warn!(attempt = up.attempt, reason = %why, "agent upgrade paused");
    }
    if pass.complete {
        info!(attempt = up.attempt, image = %up.image, "agent upgrade complete");
    }
    Ok(())
}

/// What the planner needs of a stored node, with this hub's view of its connection.
fn input<'a>(shared: &Shared, n: &'a crate::store::NodeRow) -> NodeInput<'a> {
    NodeInput {
        name: &n.name,
        labels: &n.facts.labels,
        connected: shared.is_connected(&n.name),
        agent_binary: n.facts.agent_binary.as_ref(),
        last_upgrade: n.facts.last_upgrade.as_ref(),
    }
}

async fn deliver(shared: &Arc<Shared>, sent: &mut HashSet<(String, u64, u64)>) -> Result<(), StoreError> {
    let orders = shared.store.upgrade_orders().await?;
    // Only orders still open are remembered.
    let open: HashSet<(&str, u64)> = orders.iter().map(|o| (o.node.as_str(), o.attempt)).collect();
    sent.retain(|(node, attempt, _)| open.contains(&(node.as_str(), *attempt)));
    for order in orders {
        let Some((session, conn)) = shared.session(&order.node) else { continue };
        if !sent.insert((order.node.clone(), order.attempt, session)) {
            continue;
        }
        let span = info_span!("upgrade", node = %order.node, attempt = order.attempt);
        tokio::spawn(send_order(shared.clone(), conn, order).instrument(span));
    }
    Ok(())
}

/// Sends one order and waits for the agent's answer (it pulls and installs the binary first).
async fn send_order(shared: Arc<Shared>, conn: quinn::Connection, order: UpgradeOrder) {
    let req =
        HubRequest::Upgrade { image: order.image.clone(), attempt: order.attempt, deadline_ms: order.deadline_ms };
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        frame::write(&mut send, &req).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        frame::read::<UpgradeAnswer>(&mut recv).await.map_err(|e| e.to_string())
    };
    let failure = match tokio::time::timeout(Duration::from_millis(order.deadline_ms), exchange).await {
        Ok(Ok(Some(UpgradeAnswer::Restarting { digest }))) => {
            info!(%digest, "agent installed the new binary and is restarting into it");
            None
        }
        Ok(Ok(Some(UpgradeAnswer::Current { digest }))) => {
            debug!(%digest, "agent already runs the image");
            None
        }
        Ok(Ok(Some(UpgradeAnswer::Refused { message }))) => Some(message),
        // The connection ended: the order goes again to the node's next session.
        Ok(_) if conn.close_reason().is_some() => None,
        Ok(Ok(None)) | Ok(Err(_)) => {
            Some("the agent did not take the order (its version predates remote upgrades)".to_string())
        }
        Err(_) => {
            warn!(deadline_ms = order.deadline_ms, "agent did not answer the upgrade order in time");
            None
        }
    };
    if let Some(message) = failure {
        warn!(reason = %message, "agent refused the upgrade");
        if let Err(e) = shared.store.fail_upgrade_order(&order.node, order.attempt, &message).await {
            warn!(error = %e, "cannot record the refused upgrade");
        }
    }
    shared.upgrades.notify_one();
}

/// `flotilla upgrade agents`: checks the request and starts the upgrade.
pub(crate) async fn start(
    shared: &Shared,
    user: &str,
    image: &str,
    selector: &BTreeMap<String, String>,
    max_unavailable: u32,
    deadline_ms: u64,
) -> Result<ApiResponse, StoreError> {
    let refuse = |message: String| Ok(ApiResponse::Error { message });
    if image.len() > MAX_IMAGE_LEN {
        return refuse(format!("image reference longer than {MAX_IMAGE_LEN} characters"));
    }
    if let Err(e) = proto::manifest::validate_image(image) {
        return refuse(format!("image {image:?}: {e}"));
    }
    if selector.len() > MAX_SELECTOR {
        return refuse(format!("at most {MAX_SELECTOR} selector labels"));
    }
    for (k, v) in selector {
        if let Err(e) = proto::manifest::validate_node_label(k, v) {
            return refuse(format!("selector {k}={v}: {e}"));
        }
    }
    if max_unavailable == 0 {
        return refuse("max unavailable must be at least 1".into());
    }
    if !(MIN_DEADLINE_MS..=MAX_DEADLINE_MS).contains(&deadline_ms) {
        return refuse(format!("deadline must be between {}s and {}s", MIN_DEADLINE_MS / 1000, MAX_DEADLINE_MS / 1000));
    }
    let new = NewUpgrade {
        image: image.to_string(),
        selector: selector.clone(),
        max_unavailable,
        deadline_ms,
        started_by: user.to_string(),
    };
    let up = shared.store.start_agent_upgrade(&new, now_ms()).await?;
    info!(attempt = up.attempt, image = %up.image, max_unavailable, "agent upgrade started");
    shared.upgrades.notify_one();
    Ok(ApiResponse::Upgrade { upgrade: status(shared).await? })
}

/// `flotilla upgrade status`.
pub(crate) async fn status(shared: &Shared) -> Result<Option<proto::messages::UpgradeView>, StoreError> {
    let Some((up, progress)) = shared.store.agent_upgrade().await? else { return Ok(None) };
    let nodes = shared.store.nodes().await?;
    let facts: Vec<NodeFactsOf<'_>> =
        nodes.iter().map(|n| NodeFactsOf { input: input(shared, n), version: &n.facts.agent_version }).collect();
    Ok(Some(view(&up, &facts, &progress)))
}
