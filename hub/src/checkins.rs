//! Sessions' hellos written together: a group commit.
//!
//! A session's start writes the node's claims, the statuses its hello carried, that this hub
//! holds it, and its `Ready` event. Each in a transaction of its own, that was four commits
//! (four syncs of the store's log) per session; a hub restarted under 10,000 agents then took 20 s after the last of them had
//! connected to record them all, and showed them NotReady meanwhile (BENCHMARKS.md, "Fleet
//! scale"). Here a session queues its hello and waits for one committer at a time: the one
//! that gets the turn writes everything queued so far in one transaction
//! ([`Store::check_in_many`]), answers each waiter, and hands the turn on. Alone, a hello is
//! written at once as before; in a storm, the hellos that arrive while one batch commits go
//! in the next. No task of its own: the committer is whichever waiting session gets the turn.
//!
//! A batch that fails is written again one hello at a time, so each session gets its own
//! answer (one node's bad record does not refuse the others).

use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::identity::CertVerdict;
use crate::store::{NodeRow, Result, SessionStart, Store};

/// The most hellos written in one transaction: a bound on how long the write lock is held.
const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<(CertVerdict, Option<NodeRow>)>>;

#[derive(Default)]
pub(crate) struct CheckIns {
    /// Hellos waiting for a committer. std Mutex: pushed and taken, never held across an await.
    queue: Mutex<Vec<(SessionStart, Reply)>>,
    /// The committer's turn.
    turn: tokio::sync::Mutex<()>,
}

impl CheckIns {
    /// Writes `start` (with the hellos of other sessions waiting meanwhile) as held by `hub`;
    /// the verdict on its certificate and, when admitted, the node as the hub now sees it.
    pub(crate) async fn check_in(
        &self,
        store: &Store,
        hub: &str,
        start: SessionStart,
    ) -> Result<(CertVerdict, Option<NodeRow>)> {
        let (tx, mut rx) = oneshot::channel();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push((start.clone(), tx));
        loop {
            {
                let _turn = self.turn.lock().await;
                // Ours may have gone with an earlier committer's batch: its answer was sent
                // before that committer gave up the turn.
                let batch: Vec<_> = {
                    let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                    let n = q.len().min(MAX_BATCH);
                    q.drain(..n).collect()
                };
                if !batch.is_empty() {
                    Box::pin(commit(store, hub, batch)).await;
                }
            }
            match rx.try_recv() {
                Ok(answer) => return answer,
                // Still queued behind a full batch: another turn.
                Err(oneshot::error::TryRecvError::Empty) => continue,
                // The committer that took it was cancelled mid-write (its session's task
                // ended): written here, alone.
                Err(oneshot::error::TryRecvError::Closed) => return Box::pin(one(store, hub, &start)).await,
            }
        }
    }
}

/// Writes `batch` in one transaction and answers each hello; after an error, one by one.
async fn commit(store: &Store, hub: &str, batch: Vec<(SessionStart, Reply)>) {
    let (starts, replies): (Vec<SessionStart>, Vec<Reply>) = batch.into_iter().unzip();
    match store.check_in_many(hub, &starts).await {
        // One answer per hello, in order (`check_in_many`).
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, hellos = starts.len(), "hellos not written together; writing them one by one");
            for (start, reply) in starts.iter().zip(replies) {
                let _ = reply.send(one(store, hub, start).await);
            }
        }
    }
}

/// One hello in transactions of its own, as before batching: its own answer, or error.
async fn one(store: &Store, hub: &str, s: &SessionStart) -> Result<(CertVerdict, Option<NodeRow>)> {
    let checked = store.check_in(&s.name, &s.cert_sha256, s.cert_not_after_ms, &s.claimed, s.now_ms).await?;
    if checked.1.is_some() {
        if let Err(e) = store.record_statuses(&s.name, &s.statuses).await {
            tracing::warn!(node = %s.name, error = %e, "cannot record statuses");
        }
        if let Err(e) = store.set_node_session(&s.name, hub, true, s.now_ms).await {
            tracing::warn!(node = %s.name, error = %e, "cannot record the node's session");
        }
        if let Err(e) = store.record_event(&crate::store::EventRow::node_ready(&s.name, hub, s.now_ms)).await {
            tracing::warn!(node = %s.name, error = %e, "node event not recorded");
        }
    }
    Ok(checked)
}
