//! One session per connected agent: the hello and its checks (certificate, version skew,
//! clock skew), presence in the store, the node's Ready/NotReady events, the assignment sets
//! pushed as the controller changes them, and the statuses and renewals the agent sends.
//! The I/O shell around decisions made elsewhere: the controller places, `crate::identity`
//! judges certificates, `proto::version` the skew, `crate::guard` which statuses a node may
//! report. Split out of `server.rs`, which accepts connections and routes them here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::messages::{AgentMsg, HubMsg};
use quinn::VarInt;
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, info, warn};
use transport::{frame, tls};

use crate::cluster::{Session, Shared};
use crate::metrics::StoreOp;
use crate::now_ms;
use crate::server::{CLOSE_PROTOCOL, CLOSE_REPLACED, CLOSE_REVOKED, CLOSE_UNAUTHORIZED, HANDSHAKE_MSG_TIMEOUT};
use crate::store::SubnetOutcome;

/// How long a session refused for the agent's version is held before it is closed.
const SKEW_HOLD: Duration = Duration::from_secs(20);

/// `statuses` limited to the replicas in `held`, with a warning for the rest.
fn held_statuses(
    statuses: BTreeMap<String, proto::messages::ReplicaStatus>,
    held: &BTreeSet<String>,
) -> BTreeMap<String, proto::messages::ReplicaStatus> {
    let (kept, dropped) = crate::guard::held_statuses(statuses, held);
    if dropped > 0 {
        warn!(dropped, kept = kept.len(), "status reported for replicas this node does not hold; ignored");
    }
    kept
}

/// The agent's clock minus the hub's: its hello was stamped about half a round trip before
/// the hub read it.
fn clock_skew_ms(agent_ms: u64, hub_ms: u64, rtt: Duration) -> i64 {
    let sent_at_hub = hub_ms as i128 - (rtt.as_millis() / 2) as i128;
    (agent_ms as i128 - sent_at_hub).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

pub(crate) async fn agent_session(shared: Arc<Shared>, conn: quinn::Connection, node: String) {
    // Only the node's current, unrevoked certificate speaks for it (see `crate::identity`).
    let Some(mut leaf) = tls::peer_leaf(&conn) else {
        conn.close(VarInt::from_u32(CLOSE_UNAUTHORIZED), b"a node certificate is required");
        return;
    };
    // The certificate this session speaks with: the handshake's, then each one it renews.
    let mut cert = leaf.fingerprint.clone();
    match Box::pin(shared.store.certificate_verdict(&node, &cert)).await {
        Ok(v) if v.admits() => {}
        Ok(v) => return refuse_certificate(&conn, &node, v),
        Err(e) => {
            warn!(error = %e, "cannot check the node's certificate");
            conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hub store error");
            return;
        }
    }
    let opened = Box::pin(tokio::time::timeout(HANDSHAKE_MSG_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        match frame::read::<AgentMsg>(&mut recv).await {
            Ok(Some(AgentMsg::Hello { facts, generation, statuses })) => {
                Some((send, recv, facts, generation, statuses))
            }
            other => {
                warn!(?other, "agent session did not start with hello");
                None
            }
        }
    }))
    .await;
    let Ok(Some((mut send, recv, mut facts, generation, statuses))) = opened else {
        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hello expected on the control stream");
        return;
    };
    // The version skew policy: outside it the node is told why, and keeps what it runs.
    if let Err(skew) = proto::version::check(proto::version::VERSION, &facts.agent_version) {
        let why = skew.to_string();
        // Said (and recorded) once per node and version, not at every retry of a fleet.
        let version: String = facts.agent_version.chars().take(64).collect();
        let first = shared.skew_refused.lock().unwrap_or_else(|e| e.into_inner()).insert(node.clone(), version.clone())
            != Some(version);
        if first {
            warn!(agent_version = %facts.agent_version, reason = %why, "agent session refused: version skew");
            if let Err(e) = Box::pin(shared.store.set_node_problem(&node, &why)).await {
                debug!(error = %e, "cannot record the node's problem");
            }
        }
        // Held a while before the close: an agent that retries at once after a session (one
        // older than this rule) then costs a handshake per node every SKEW_HOLD, not a storm.
        tokio::time::sleep(SKEW_HOLD).await;
        conn.close(VarInt::from_u32(proto::version::CLOSE_VERSION), why.as_bytes());
        return;
    }
    let now = now_ms();
    facts.clock_skew_ms = facts.clock_ms.map(|agent| clock_skew_ms(agent, now, conn.rtt()));
    info!(agent_generation = generation, replicas = statuses.len(), skew_ms = ?facts.clock_skew_ms, "agent connected");
    if let Some(skew) = facts.clock_skew_ms.filter(|s| s.abs() > proto::messages::CLOCK_SKEW_WARN_MS) {
        warn!(
            skew_ms = skew,
            "the node's clock is off; it keeps working (timers are monotonic), but its timestamps are skewed"
        );
    }
    let not_after_ms = leaf.not_after.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as u64);
    // Only statuses of replicas the node holds are recorded (see `guard::held_statuses`).
    let mut held: BTreeSet<String> = match Box::pin(shared.store.assignment_set(&node)).await {
        Ok(set) => set.assignments.into_iter().map(|a| a.name).collect(),
        Err(e) => {
            warn!(error = %e, "cannot load assignment set");
            BTreeSet::new()
        }
    };
    // The hello's claims and statuses, with the node recorded as held here and its `Ready`
    // event, written together with the hellos of other sessions starting meanwhile (see
    // `crate::checkins`).
    let start = crate::store::SessionStart {
        name: node.clone(),
        cert_sha256: cert.clone(),
        cert_not_after_ms: not_after_ms,
        claimed: facts.clone(),
        now_ms: now,
        statuses: held_statuses(statuses, &held),
    };
    let check_in = Box::pin(shared.check_ins.check_in(&shared.store, &shared.hub_id, start)).await;
    match check_in {
        Ok((_, Some(row))) => {
            // What the hub will not take from the agent's claims, said once per session.
            for notice in &row.notices {
                warn!(notice = %notice, "node claim not taken");
            }
            // A store restored from an older backup is behind the agent: its next set must
            // not look like a replay of one the agent has.
            if generation > row.generation {
                info!(
                    agent_generation = generation,
                    store_generation = row.generation,
                    "the agent is ahead of the store; raising its generation"
                );
                if let Err(e) = Box::pin(shared.store.raise_generation(&node, generation)).await {
                    warn!(error = %e, "cannot raise the node's generation");
                }
            }
        }
        Ok((v, _)) => return refuse_certificate(&conn, &node, v),
        Err(e) => {
            warn!(error = %e, "cannot record node");
            conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"hub store error");
            return;
        }
    }
    // A node that runs containers holds a subnet of the cluster CIDR from its first session on.
    if facts.runtimes.contains(&proto::manifest::Runtime::Container) {
        match Box::pin(shared.store.ensure_node_subnet(&node, shared.network)).await {
            Ok(SubnetOutcome::Held(_)) => {}
            Ok(SubnetOutcome::Allocated(n)) => info!(subnet = %n.subnet, "node got its container subnet"),
            Ok(SubnetOutcome::Exhausted { cidr, nodes }) => {
                warn!(%cidr, nodes, "no container subnet left for this node: the cluster CIDR is exhausted");
                crate::events::node(
                    &shared,
                    &node,
                    "NoSubnet",
                    format!(
                        "no container subnet left in {cidr} ({nodes} nodes hold one); bridged containers stay Pending"
                    ),
                )
                .await;
            }
            Err(e) => warn!(error = %e, "cannot allocate the node's container subnet"),
        }
    }
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let wake = Arc::new(Notify::new());
    let old = shared
        .sessions
        .lock()
        .unwrap()
        .insert(node.clone(), Session { id, conn: conn.clone(), cert: cert.clone(), wake: wake.clone() });
    if let Some(old) = old {
        old.conn.close(VarInt::from_u32(CLOSE_REPLACED), b"replaced by a newer session of the same node");
    }
    shared.trigger_reconcile();
    // The node may be back on a new agent binary, or have an order waiting.
    shared.upgrades.notify_one();

    // Frames are read on their own task: `frame::read` is not cancel-safe, so it must not sit
    // in a select! beside the wake-up.
    // Boxed: the channel allocates its slots in blocks of 32, which for `AgentMsg` inline
    // (a few hundred bytes) was 12 KiB per session, idle or not.
    let (tx, mut rx) = mpsc::channel::<Box<AgentMsg>>(64);
    let reader = tokio::spawn(async move {
        let mut recv = recv;
        loop {
            match frame::read::<AgentMsg>(&mut recv).await {
                Ok(Some(msg)) => {
                    if tx.send(Box::new(msg)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Also how a normal disconnect ends the stream.
                    debug!(error = %e, "control stream ended");
                    break;
                }
            }
        }
    });

    let (renewed_tx, mut renewed_rx) = mpsc::channel::<crate::certs::Renewed>(1);
    let mut sent_generation: Option<u64> = None;
    // The set this hub could not send, so the failure is logged once and cleared when it goes.
    let mut unsendable: Option<u64> = None;
    let mut revoked = None;
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            // A delete or a re-join revokes the certificate this session holds.
            match Box::pin(shared.store.certificate_verdict(&node, &cert)).await {
                Ok(v) if !v.admits() => {
                    revoked = Some(v);
                    break;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot check the node's certificate"),
            }
            match Box::pin(shared.store.assignment_set(&node)).await {
                Ok(mut set) if Some(set.generation) != sent_generation => {
                    // This hub takes the node's liveness from the connection itself
                    // (`crate::heartbeats`): the agent need not send heartbeats.
                    set.connection_liveness = true;
                    let generation = set.generation;
                    let names = set.assignments.iter().map(|a| a.name.clone()).collect();
                    match Box::pin(send_set(&mut send, &set)).await {
                        Ok(()) => {
                            held = names;
                            sent_generation = Some(generation);
                            if unsendable.take().is_some() {
                                let _ = Box::pin(shared.store.set_node_problem(&node, "")).await;
                            }
                        }
                        Err(SendError::Stream(_)) => break,
                        Err(SendError::Pieces(e)) => {
                            if unsendable != Some(generation) {
                                let problem = format!("assignment set generation {generation} cannot be sent: {e}");
                                tracing::error!(generation, error = %e, "assignment set cannot be sent; the node keeps its previous set");
                                let _ = Box::pin(shared.store.set_node_problem(&node, &problem)).await;
                                unsendable = Some(generation);
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot load assignment set"),
            }
        }
        tokio::select! {
            _ = wake.notified() => dirty = true,
            // Streams the agent opens: certificate renewals (see `crate::certs`).
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => {
                    let task = crate::certs::serve_stream(shared.clone(), node.clone(), leaf.clone(), s, r, renewed_tx.clone());
                    tokio::spawn(task.in_current_span());
                }
                Err(_) => break,
            },
            Some(renewed) = renewed_rx.recv() => {
                cert = renewed.facts.fingerprint.clone();
                leaf = renewed.facts;
                if let Some(s) = shared.sessions.lock().unwrap().get_mut(&node).filter(|s| s.id == id) {
                    s.cert = cert.clone();
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg.map(|m| *m) else { break };
                let msg = match msg {
                    AgentMsg::Status { statuses } => AgentMsg::Status { statuses: held_statuses(statuses, &held) },
                    other => other,
                };
                Box::pin(handle_agent_msg(&shared, &node, &cert, msg)).await;
            }
        }
    }
    if let Some(verdict) = revoked {
        Box::pin(fence_revoked(&conn, &mut send, &mut rx, &node, verdict, shared.store.id())).await;
    }
    reader.abort();
    let ended = {
        let mut sessions = shared.sessions.lock().unwrap();
        let ours = sessions.get(&node).is_some_and(|s| s.id == id);
        if ours {
            sessions.remove(&node);
            // Starts the node's failover clocks, by this hub's monotonic clock.
            shared.presence.lock().unwrap().session_ended(&node, shared.mono_ms());
            info!("agent disconnected");
        }
        ours
    };
    // After the session left the list (see `LinkTraffic`): its last bytes count once.
    shared.metrics.link_ended(&node, &conn);
    if ended {
        let _ = Box::pin(shared.store.set_node_session(&node, &shared.hub_id, false, now_ms())).await;
        Box::pin(crate::events::node(&shared, &node, "NotReady", format!("its link to hub {} ended", shared.hub_id)))
            .await;
        shared.trigger_reconcile();
    } else {
        let _ = Box::pin(shared.store.touch_node(&node, now_ms())).await;
    }
}

/// Ends a connection whose certificate may not speak for `node`, with the reason.
fn refuse_certificate(conn: &quinn::Connection, node: &str, verdict: crate::identity::CertVerdict) {
    let reason = verdict.reason(node);
    warn!(reason = %reason, "agent connection with a revoked certificate refused");
    conn.close(VarInt::from_u32(CLOSE_REVOKED), reason.as_bytes());
}

/// How long a revoked node's agent gets to take its empty set before the connection closes.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// A session whose certificate was revoked while it ran: its agent is told to stop what it
/// runs (an empty set; its replicas are placed elsewhere), given a few seconds to persist it,
/// then the connection closes with the reason.
async fn fence_revoked(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    rx: &mut mpsc::Receiver<Box<AgentMsg>>,
    node: &str,
    verdict: crate::identity::CertVerdict,
    store: &str,
) {
    let empty = proto::messages::AssignmentSet {
        generation: 0,
        store: store.to_string(),
        assignments: Vec::new(),
        kept_logs: Vec::new(),
        objects: Vec::new(),
        network: None,
        services: None,
        connection_liveness: true,
    };
    if send_set(send, &empty).await.is_ok() {
        let _ = tokio::time::timeout(FENCE_TIMEOUT, async {
            while let Some(msg) = rx.recv().await {
                if matches!(*msg, AgentMsg::Ack { generation: 0 }) {
                    break;
                }
            }
        })
        .await;
    }
    refuse_certificate(conn, node, verdict);
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Pieces(#[from] proto::pieces::PieceError),
    #[error(transparent)]
    Stream(#[from] frame::FrameError),
}

/// Sends a set: whole when it fits one piece, else in pieces (see [`proto::pieces`]), so no
/// set outgrows a frame.
async fn send_set(send: &mut quinn::SendStream, set: &proto::messages::AssignmentSet) -> Result<(), SendError> {
    let parts = proto::pieces::split(set)?;
    debug!(
        generation = set.generation,
        assignments = set.assignments.len(),
        pieces = parts.len(),
        "sending assignment set"
    );
    if parts.len() == 1 {
        frame::write(send, &HubMsg::Assign(set.clone())).await?;
        return Ok(());
    }
    for part in parts {
        frame::write(send, &HubMsg::AssignPart(part)).await?;
    }
    Ok(())
}

/// Records one message of a node's session. A heartbeat is queued for
/// [`crate::heartbeats::flush_loop`], which wakes the session when its node is gone or holds another
/// certificate now (another hub's delete or re-join), so it checks at once.
async fn handle_agent_msg(shared: &Shared, node: &str, cert: &str, msg: AgentMsg) {
    let result = match msg {
        AgentMsg::Ack { generation } => shared.store.ack_generation(node, generation).await,
        AgentMsg::Status { statuses } => {
            let r =
                shared.metrics.timed(StoreOp::Status, shared.store.record_statuses(node, &statuses)).await.map(|_| ());
            // A replica that became ready (or stopped being) may let a rollout advance.
            shared.trigger_reconcile();
            r
        }
        AgentMsg::Heartbeat => {
            shared.heartbeats.record(node, cert);
            Ok(())
        }
        AgentMsg::SetRefused { generation, message } => {
            tracing::error!(generation, reason = %message, "the node refused its assignment set and keeps running what it has");
            shared
                .store
                .set_node_problem(node, &format!("refused assignment set generation {generation}: {message}"))
                .await
        }
        AgentMsg::Hello { .. } => {
            warn!("duplicate hello ignored");
            Ok(())
        }
    };
    if let Err(e) = result {
        warn!(error = %e, "cannot record agent message");
    }
}

#[cfg(test)]
mod tests {
    use super::clock_skew_ms;
    use std::time::Duration;

    #[test]
    fn clock_skew_allows_for_half_the_round_trip() {
        // Stamped 100 ms (half of a 200 ms round trip) before the hub read it: no skew.
        assert_eq!(clock_skew_ms(1_000_000, 1_000_100, Duration::from_millis(200)), 0);
        assert_eq!(clock_skew_ms(1_005_000, 1_000_000, Duration::ZERO), 5_000);
        // A board that booted at the epoch: hugely behind, and no overflow.
        assert_eq!(clock_skew_ms(0, 1_700_000_000_000, Duration::ZERO), -1_700_000_000_000);
        assert_eq!(clock_skew_ms(u64::MAX, 0, Duration::ZERO), i64::MAX);
    }
}
