//! The store's side of fleet upgrades of agents: the one upgrade at a time and the nodes it
//! ordered. The planner ([`crate::upgrade`]) decides; the leader writes its passes here
//! under the lease, and every hub reads the orders for the agents connected to it.

use std::collections::BTreeMap;

use super::db::Rec;
use super::{Fence, Result, Store, StoreError, check_fence, corrupt, to_json};
use crate::upgrade::{NodeProgress, NodeState, Plan, Upgrade};

/// An upgrade to start (its attempt number is the store's to give).
#[derive(Debug, Clone)]
pub struct NewUpgrade {
    pub image: String,
    pub selector: BTreeMap<String, String>,
    pub max_unavailable: u32,
    pub deadline_ms: u64,
    pub started_by: String,
}

/// A node's order, for the hub its agent is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeOrder {
    pub node: String,
    pub attempt: u64,
    pub image: String,
    pub deadline_ms: u64,
}

const UPGRADE_COLUMNS: &str = "attempt, image, selector, max_unavailable, deadline_ms, started_at_ms, started_by, \
     paused, completed_at_ms FROM agent_upgrade WHERE id = 1";

fn upgrade_row(r: &Rec) -> Result<Upgrade> {
    let attempt = r.u64(0)?;
    Ok(Upgrade {
        attempt,
        image: r.text(1)?,
        selector: serde_json::from_str(&r.text(2)?).map_err(corrupt("agent upgrade", "selector"))?,
        max_unavailable: u32::try_from(r.u64(3)?).unwrap_or(u32::MAX),
        deadline_ms: r.u64(4)?,
        started_at_ms: r.u64(5)?,
        started_by: r.text(6)?,
        paused: r.text(7)?,
        completed_at_ms: r.opt_u64(8)?,
    })
}

fn progress_row(r: &Rec) -> Result<NodeProgress> {
    let node = r.text(0)?;
    let state = r.text(2)?;
    let state = NodeState::parse(&state).ok_or_else(|| StoreError::Corrupt {
        what: "agent upgrade node",
        name: node.clone(),
        source: serde::de::Error::custom(format!("unknown state {state:?}")),
    })?;
    Ok(NodeProgress { attempt: r.u64(1)?, state, ordered_at_ms: r.u64(3)?, message: r.text(4)?, node })
}

impl Store {
    /// Starts a fleet upgrade, replacing the one before (whose node rows go): its attempt is
    /// one more than the last.
    pub async fn start_agent_upgrade(&self, new: &NewUpgrade, now_ms: u64) -> Result<Upgrade> {
        let mut tx = self.pool.write_tx().await?;
        let last = tx.fetch_optional("SELECT attempt FROM agent_upgrade WHERE id = 1", &[]).await?;
        let attempt = match last {
            Some(r) => r.u64(0)? + 1,
            None => 1,
        };
        let selector = to_json(&new.selector);
        tx.exec(
            "INSERT INTO agent_upgrade (id, attempt, image, selector, max_unavailable, deadline_ms, started_at_ms, \
             started_by, paused, completed_at_ms) VALUES (1, ?, ?, ?, ?, ?, ?, ?, '', NULL) \
             ON CONFLICT (id) DO UPDATE SET attempt = excluded.attempt, image = excluded.image, \
             selector = excluded.selector, max_unavailable = excluded.max_unavailable, \
             deadline_ms = excluded.deadline_ms, started_at_ms = excluded.started_at_ms, \
             started_by = excluded.started_by, paused = '', completed_at_ms = NULL",
            &[
                attempt.into(),
                (&new.image).into(),
                (&selector).into(),
                u64::from(new.max_unavailable).into(),
                new.deadline_ms.into(),
                now_ms.into(),
                (&new.started_by).into(),
            ],
        )
        .await?;
        tx.exec("DELETE FROM agent_upgrade_nodes WHERE attempt <> ?", &[attempt.into()]).await?;
        let row = tx.fetch_optional(&format!("SELECT {UPGRADE_COLUMNS}"), &[]).await?;
        tx.commit().await?;
        row.as_ref().map(upgrade_row).transpose()?.ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    /// The fleet upgrade and the node rows of its attempt, if one was ever started.
    pub async fn agent_upgrade(&self) -> Result<Option<(Upgrade, BTreeMap<String, NodeProgress>)>> {
        let mut tx = self.pool.read_tx().await?;
        let Some(row) = tx.fetch_optional(&format!("SELECT {UPGRADE_COLUMNS}"), &[]).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let up = upgrade_row(&row)?;
        let rows = tx
            .fetch(
                "SELECT node, attempt, state, ordered_at_ms, message FROM agent_upgrade_nodes WHERE attempt = ?",
                &[up.attempt.into()],
            )
            .await?;
        tx.commit().await?;
        let progress = rows.iter().map(|r| progress_row(r).map(|p| (p.node.clone(), p))).collect::<Result<_>>()?;
        Ok(Some((up, progress)))
    }

    /// Writes one planner pass for upgrade `attempt` as leader. False (nothing written) when
    /// another upgrade started meanwhile.
    pub async fn write_upgrade_plan(&self, fence: Fence<'_>, attempt: u64, plan: &Plan, now_ms: u64) -> Result<bool> {
        let mut tx = self.pool.write_tx().await?;
        check_fence(&mut tx, fence).await?;
        let current = tx.fetch_optional("SELECT attempt FROM agent_upgrade WHERE id = 1", &[]).await?;
        if current.map(|r| r.u64(0)).transpose()? != Some(attempt) {
            return Ok(false);
        }
        for w in &plan.writes {
            // A refusal another hub recorded meanwhile is not overwritten by a pass that had
            // not seen it.
            tx.exec(
                "INSERT INTO agent_upgrade_nodes (node, attempt, state, ordered_at_ms, message) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (node) DO UPDATE SET attempt = excluded.attempt, state = excluded.state, \
                 ordered_at_ms = excluded.ordered_at_ms, message = excluded.message \
                 WHERE agent_upgrade_nodes.state <> 'failed' OR agent_upgrade_nodes.attempt <> excluded.attempt",
                &[
                    (&w.node).into(),
                    w.attempt.into(),
                    w.state.as_str().into(),
                    w.ordered_at_ms.into(),
                    (&w.message).into(),
                ],
            )
            .await?;
        }
        if let Some(why) = &plan.pause {
            tx.exec("UPDATE agent_upgrade SET paused = ? WHERE id = 1 AND paused = ''", &[why.into()]).await?;
        }
        if plan.complete {
            tx.exec(
                "UPDATE agent_upgrade SET completed_at_ms = ? WHERE id = 1 AND completed_at_ms IS NULL",
                &[now_ms.into()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The orders of the current upgrade not yet carried out: nodes ordered, not done or
    /// failed.
    pub async fn upgrade_orders(&self) -> Result<Vec<UpgradeOrder>> {
        let rows = self
            .pool
            .fetch(
                "SELECT n.node, n.attempt, u.image, u.deadline_ms FROM agent_upgrade_nodes n \
                 JOIN agent_upgrade u ON u.id = 1 AND u.attempt = n.attempt \
                 WHERE n.state = 'ordered' ORDER BY n.node",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UpgradeOrder { node: r.text(0)?, attempt: r.u64(1)?, image: r.text(2)?, deadline_ms: r.u64(3)? })
            })
            .collect()
    }

    /// Records that a node's agent refused (or could not take) its order: the node failed.
    /// Any hub records this, for the agents connected to it; the leader's next pass pauses
    /// the upgrade.
    pub async fn fail_upgrade_order(&self, node: &str, attempt: u64, message: &str) -> Result<()> {
        self.pool
            .exec(
                "UPDATE agent_upgrade_nodes SET state = 'failed', message = ? \
                 WHERE node = ? AND attempt = ? AND state = 'ordered'",
                &[message.into(), node.into(), attempt.into()],
            )
            .await?;
        Ok(())
    }
}
