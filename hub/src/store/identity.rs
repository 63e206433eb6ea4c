//! The store's side of node identity: the store's own id, join tokens, each node's current
//! certificate and the revoked ones, and what admins set on nodes. The rules themselves are
//! pure functions in [`crate::tokens`] and [`crate::identity`]; here they run inside the
//! write-locked transactions that apply them, so two joins racing for a token's last use or
//! for one name, or two admins editing one node's labels, cannot both win.

use std::collections::BTreeMap;

use proto::manifest::Taint;
use proto::messages::NodeFacts;

use super::db::Rec;
use super::{NodeRow, Result, Store, StoreError, corrupt, to_json};
use crate::identity::{self, Capacity, CertVerdict};
use crate::tokens::{self, Admit, Existing, JoinRefusal};

/// The name of the store's identity among the cluster-wide values.
const STORE_ID: &str = "store-id";

/// A join token as stored (the secret itself is never kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub max_uses: Option<u64>,
    pub uses: u64,
    pub name_pattern: String,
    pub labels: BTreeMap<String, String>,
    pub revoked_at_ms: Option<u64>,
}

/// A token to store.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub secret_sha256: String,
    pub expires_at_ms: Option<u64>,
    pub max_uses: Option<u64>,
    pub name_pattern: String,
    pub labels: BTreeMap<String, String>,
}

/// A join let through: the token it used and the labels it gives the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub admit: Admit,
    pub token: String,
}

const TOKEN_COLUMNS: &str =
    "id, created_at_ms, expires_at_ms, max_uses, uses, name_pattern, labels, revoked_at_ms FROM join_tokens";

fn token_row(r: &Rec) -> Result<TokenRow> {
    let id = r.text(0)?;
    Ok(TokenRow {
        created_at_ms: r.u64(1)?,
        expires_at_ms: r.opt_u64(2)?,
        max_uses: r.opt_u64(3)?,
        uses: r.u64(4)?,
        name_pattern: r.text(5)?,
        labels: serde_json::from_str(&r.text(6)?).map_err(corrupt("join token", &id))?,
        revoked_at_ms: r.opt_u64(7)?,
        id,
    })
}

/// The columns [`node_row`] reads, in its order.
pub(super) const NODE_COLUMNS: &str = "name, facts, generation, acked_generation, joined_at_ms, last_seen_ms, \
     connected_via, cordoned, draining, cert_sha256, joined_with, rejoin_until_ms, admin_labels, admin_taints, \
     joined_cpus, joined_memory_bytes, problem, cert_not_after_ms FROM nodes";

/// A node as the hub uses it: the agent's claims under the admin's settings (see
/// [`identity::effective`]).
pub(super) fn node_row(r: &Rec) -> Result<NodeRow> {
    let name = r.text(0)?;
    let claimed: NodeFacts = serde_json::from_str(&r.text(1)?).map_err(corrupt("node", &name))?;
    let admin_labels: BTreeMap<String, String> = serde_json::from_str(&r.text(12)?).map_err(corrupt("node", &name))?;
    let admin_taints: Vec<Taint> = serde_json::from_str(&r.text(13)?).map_err(corrupt("node", &name))?;
    let joined_capacity = match (r.opt_u64(14)?, r.opt_u64(15)?) {
        (Some(cpus), Some(memory_bytes)) => {
            Some(Capacity { cpus: u32::try_from(cpus).unwrap_or(u32::MAX), memory_bytes })
        }
        _ => None,
    };
    let (facts, notices) = identity::effective(&claimed, &admin_labels, &admin_taints, joined_capacity);
    Ok(NodeRow {
        facts,
        claimed,
        generation: r.u64(2)?,
        acked_generation: r.u64(3)?,
        joined_at_ms: r.u64(4)?,
        last_seen_ms: r.opt_u64(5)?,
        connected_via: r.opt_text(6)?,
        cordoned: r.i64(7)? != 0,
        draining: r.i64(8)? != 0,
        cert_sha256: r.opt_text(9)?,
        joined_with: r.text(10)?,
        rejoin_until_ms: r.opt_u64(11)?,
        admin_labels,
        admin_taints,
        joined_capacity,
        notices,
        problem: r.text(16)?,
        cert_not_after_ms: r.opt_u64(17)?,
        name,
    })
}

impl Store {
    /// The store's identity, made with the store (see [`proto::messages::AssignmentSet::store`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads the store's identity, making it when the store has none yet (a new store, or one
    /// from before identities): every hub on one database gets the same.
    pub(super) async fn load_identity(pool: &super::db::Pool) -> Result<String> {
        let mut bytes = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let candidate = hex::encode(bytes);
        pool.exec(
            "INSERT INTO cluster_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            &[STORE_ID.into(), (&candidate).into()],
        )
        .await?;
        let rows = pool.fetch("SELECT value FROM cluster_secrets WHERE name = ?", &[STORE_ID.into()]).await?;
        match rows.first() {
            Some(r) => Ok(r.text(0)?),
            None => Err(StoreError::Query(sqlx::Error::RowNotFound)),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Tokens

    /// Stores a new token.
    pub async fn create_token(&self, t: &NewToken, now_ms: u64) -> Result<()> {
        self.insert_token(t, now_ms, "").await
    }

    /// Stores `t` unless a token with its id exists (the cluster token at every start: once
    /// revoked, it stays revoked).
    pub async fn ensure_token(&self, t: &NewToken, now_ms: u64) -> Result<()> {
        self.insert_token(t, now_ms, " ON CONFLICT (id) DO NOTHING").await
    }

    async fn insert_token(&self, t: &NewToken, now_ms: u64, conflict: &str) -> Result<()> {
        let labels = to_json(&t.labels);
        self.pool
            .exec(
                &format!(
                    "INSERT INTO join_tokens (id, secret_sha256, created_at_ms, expires_at_ms, max_uses, name_pattern, labels) \
                     VALUES (?, ?, ?, ?, ?, ?, ?){conflict}"
                ),
                &[
                    (&t.id).into(),
                    (&t.secret_sha256).into(),
                    now_ms.into(),
                    t.expires_at_ms.into(),
                    t.max_uses.into(),
                    (&t.name_pattern).into(),
                    (&labels).into(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        let rows = self.pool.fetch(&format!("SELECT {TOKEN_COLUMNS} ORDER BY created_at_ms, id"), &[]).await?;
        rows.iter().map(token_row).collect()
    }

    /// Revokes token `id` (a revoked token stays revoked as of its first revocation). `None`
    /// when there is no such token.
    pub async fn revoke_token(&self, id: &str, now_ms: u64) -> Result<Option<TokenRow>> {
        self.pool
            .exec(
                "UPDATE join_tokens SET revoked_at_ms = ? WHERE id = ? AND revoked_at_ms IS NULL",
                &[now_ms.into(), id.into()],
            )
            .await?;
        let rows = self.pool.fetch(&format!("SELECT {TOKEN_COLUMNS} WHERE id = ?"), &[id.into()]).await?;
        rows.first().map(token_row).transpose()
    }

    /// Decides a join under the store's write lock ([`tokens::admit`]) and, when it is let
    /// through, counts the token's use and records the node with certificate `cert_sha256`
    /// (and the token's labels as admin labels) in the same transaction. A re-join revokes the
    /// node's previous certificate and keeps its placements and admin settings. Without a
    /// certificate it only decides (nothing is written): the check before signing.
    pub async fn admit_node(
        &self,
        secret_sha256: &str,
        name: &str,
        cert_sha256: Option<&str>,
        now_ms: u64,
    ) -> Result<std::result::Result<Admitted, JoinRefusal>> {
        // The check before signing reads only, so strangers' joins never queue for the lock.
        let mut tx = if cert_sha256.is_some() { self.pool.write_tx().await? } else { self.pool.read_tx().await? };
        let token = match tx
            .fetch_optional(&format!("SELECT {TOKEN_COLUMNS} WHERE secret_sha256 = ?"), &[secret_sha256.into()])
            .await?
        {
            Some(r) => Some(token_row(&r)?),
            None => None,
        };
        let existing = tx
            .fetch_optional(
                "SELECT rejoin_until_ms, cert_sha256, admin_labels, prev_cert_sha256 FROM nodes WHERE name = ?",
                &[name.into()],
            )
            .await?;
        let (existing, old_cert, old_labels, old_prev) = match &existing {
            Some(r) => (
                Some(Existing { rejoin_until_ms: r.opt_u64(0)? }),
                r.opt_text(1)?,
                serde_json::from_str::<BTreeMap<String, String>>(&r.text(2)?).map_err(corrupt("node", name))?,
                r.opt_text(3)?,
            ),
            None => (None, None, BTreeMap::new(), None),
        };
        let admit = match tokens::admit(token.as_ref(), existing, name, now_ms) {
            Ok(a) => a,
            // Dropping the transaction rolls it back: nothing counted, nothing recorded.
            Err(refusal) => return Ok(Err(refusal)),
        };
        let token = token.expect("admit refuses a join without a token");
        let Some(cert_sha256) = cert_sha256 else {
            return Ok(Ok(Admitted { admit, token: token.id }));
        };
        tx.exec("UPDATE join_tokens SET uses = uses + 1 WHERE id = ?", &[(&token.id).into()]).await?;
        let mut labels = old_labels;
        labels.extend(token.labels.clone());
        let labels = to_json(&labels);
        match admit {
            Admit::New => {
                tx.exec(
                    "INSERT INTO nodes (name, facts, joined_at_ms, cert_sha256, joined_with, admin_labels) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                    &[
                        name.into(),
                        (&to_json(&NodeFacts::default())).into(),
                        now_ms.into(),
                        cert_sha256.into(),
                        (&token.id).into(),
                        (&labels).into(),
                    ],
                )
                .await?;
            }
            Admit::Rejoin => {
                for old in [old_cert.as_deref(), old_prev.as_deref()].into_iter().flatten() {
                    if old != cert_sha256 {
                        revoke_cert(&mut tx, old, name, "replaced by a re-join", now_ms).await?;
                    }
                }
                tx.exec(
                    "UPDATE nodes SET cert_sha256 = ?, joined_with = ?, admin_labels = ?, rejoin_until_ms = NULL, \
                     joined_cpus = NULL, joined_memory_bytes = NULL, problem = '', prev_cert_sha256 = NULL, \
                     cert_not_after_ms = NULL WHERE name = ?",
                    &[cert_sha256.into(), (&token.id).into(), (&labels).into(), name.into()],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(Ok(Admitted { admit, token: token.id }))
    }

    // -----------------------------------------------------------------------------------------
    // Certificates

    /// Whether `cert_sha256` may speak for node `name` (see [`identity::certificate_verdict`]).
    pub async fn certificate_verdict(&self, name: &str, cert_sha256: &str) -> Result<CertVerdict> {
        let mut tx = self.pool.read_tx().await?;
        let verdict = verdict_in(&mut tx, name, cert_sha256).await?;
        tx.commit().await?;
        Ok(verdict)
    }

    /// Records a renewal of node `name`'s certificate `presented` by `renewed` (expiring at
    /// `not_after_ms`), under the write lock, if the store still admits `presented`: `renewed`
    /// becomes current and `presented` the previous one. Renewing from the previous certificate
    /// (the agent lost the current one before saving it) revokes the current one. A node the
    /// store has no record of is recorded at its next connect. Returns the verdict on
    /// `presented`; nothing is written unless it admits.
    pub async fn renew_node_cert(
        &self,
        name: &str,
        presented: &str,
        renewed: &str,
        not_after_ms: u64,
        now_ms: u64,
    ) -> Result<CertVerdict> {
        let mut tx = self.pool.write_tx().await?;
        let verdict = verdict_in(&mut tx, name, presented).await?;
        match verdict {
            CertVerdict::Current | CertVerdict::Record => {}
            CertVerdict::Previous => {
                let r = tx.fetch_optional("SELECT cert_sha256 FROM nodes WHERE name = ?", &[name.into()]).await?;
                if let Some(lost) = r.map(|r| r.opt_text(0)).transpose()?.flatten() {
                    revoke_cert(&mut tx, &lost, name, "lost before the node saved it; renewed again", now_ms).await?;
                }
            }
            CertVerdict::Replaced | CertVerdict::Revoked => return Ok(verdict),
        }
        tx.exec(
            "UPDATE nodes SET cert_sha256 = ?, prev_cert_sha256 = ?, cert_not_after_ms = ? WHERE name = ?",
            &[renewed.into(), presented.into(), not_after_ms.into(), name.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(verdict)
    }

    /// A node's hello: checks its certificate again under the write lock and, if it is
    /// admitted, records the claims (creating the node when the store has no record of it),
    /// its certificate when none is recorded, the capacity of its first hello after joining,
    /// and clears its reported problem. Returns the verdict and, when admitted, the node as
    /// the hub now sees it.
    pub async fn check_in(
        &self,
        name: &str,
        cert_sha256: &str,
        cert_not_after_ms: Option<u64>,
        claimed: &NodeFacts,
        now_ms: u64,
    ) -> Result<(CertVerdict, Option<NodeRow>)> {
        let mut tx = self.pool.write_tx().await?;
        let checked = check_in_tx(&mut tx, name, cert_sha256, cert_not_after_ms, claimed, now_ms).await?;
        tx.commit().await?;
        Ok(checked)
    }

    /// The hellos of many sessions in one transaction (one commit, one sync of the log,
    /// instead of four each): for each, [`Store::check_in`], and when it is admitted, the
    /// statuses it carried ([`Store::record_statuses`]), the node recorded as held by `hub`
    /// ([`Store::set_node_session`]) and its `Ready` event. A
    /// hub restarted under 10,000 agents takes their hellos a few hundred at a time this way
    /// (`hub::checkins`). All or none: on an error nothing is written.
    pub async fn check_in_many(
        &self,
        hub: &str,
        starts: &[SessionStart],
    ) -> Result<Vec<(CertVerdict, Option<NodeRow>)>> {
        let mut tx = self.pool.write_tx().await?;
        let mut out = Vec::with_capacity(starts.len());
        let mut any_ready = false;
        for s in starts {
            let checked =
                check_in_tx(&mut tx, &s.name, &s.cert_sha256, s.cert_not_after_ms, &s.claimed, s.now_ms).await?;
            if checked.1.is_some() {
                super::statuses_tx(&mut tx, &s.name, &s.statuses).await?;
                tx.exec(super::HOLD_NODE, &[hub.into(), s.now_ms.into(), s.name.as_str().into()]).await?;
                super::events::insert_event(&mut tx, &super::EventRow::node_ready(&s.name, hub, s.now_ms)).await?;
                any_ready = true;
            }
            out.push(checked);
        }
        if any_ready {
            super::events::trim_events(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Records a heartbeat of the node's session holding `cert_sha256`. False when the node
    /// is gone or holds another certificate now: the session must end.
    pub async fn touch_node_as(&self, name: &str, cert_sha256: &str, now_ms: u64) -> Result<bool> {
        let stale = self.touch_nodes_as(&[(name.to_string(), cert_sha256.to_string())], now_ms).await?;
        Ok(stale.is_empty())
    }

    /// Records the heartbeats of many sessions in one transaction (the hub batches them, so a
    /// fleet's heartbeats cost one write a second, not one each): each `(node, cert_sha256)`
    /// seen at `now_ms`. Returns the nodes whose record is gone or holds another certificate
    /// now: their sessions must check it.
    pub async fn touch_nodes_as(&self, beats: &[(String, String)], now_ms: u64) -> Result<Vec<String>> {
        let mut tx = self.pool.write_tx().await?;
        let mut stale = Vec::new();
        for (name, cert) in beats {
            let n = tx
                .exec(
                    "UPDATE nodes SET last_seen_ms = ? WHERE name = ? \
                     AND (cert_sha256 = ? OR prev_cert_sha256 = ? OR cert_sha256 IS NULL)",
                    &[now_ms.into(), name.into(), cert.into(), cert.into()],
                )
                .await?;
            if n == 0 {
                stale.push(name.clone());
            }
        }
        tx.commit().await?;
        Ok(stale)
    }

    /// Raises the node's generation to at least `above + 1`. An agent reporting a generation
    /// above the store's (the store was restored from an older backup) would otherwise take
    /// the store's next sets for replays of ones it has.
    pub async fn raise_generation(&self, name: &str, above: u64) -> Result<bool> {
        let next = above.saturating_add(1);
        let n = self
            .pool
            .exec(
                "UPDATE nodes SET generation = ? WHERE name = ? AND generation < ?",
                &[next.into(), name.into(), next.into()],
            )
            .await?;
        Ok(n > 0)
    }

    // -----------------------------------------------------------------------------------------
    // What admins set on nodes

    /// One node, as [`Store::nodes`] gives it.
    pub async fn node(&self, name: &str) -> Result<Option<NodeRow>> {
        let rows = self.pool.fetch(&format!("SELECT {NODE_COLUMNS} WHERE name = ?"), &[name.into()]).await?;
        rows.first().map(node_row).transpose()
    }

    /// Applies `edit` to the node's admin labels and taints under the write lock. `None` when
    /// there is no such node; the edit's own error leaves everything as it was.
    pub async fn edit_node_admin<E>(
        &self,
        name: &str,
        edit: impl FnOnce(
            &BTreeMap<String, String>,
            &[Taint],
        ) -> std::result::Result<(BTreeMap<String, String>, Vec<Taint>), E>,
    ) -> Result<Option<std::result::Result<(), E>>> {
        let mut tx = self.pool.write_tx().await?;
        let Some(r) =
            tx.fetch_optional("SELECT admin_labels, admin_taints FROM nodes WHERE name = ?", &[name.into()]).await?
        else {
            return Ok(None);
        };
        let labels: BTreeMap<String, String> = serde_json::from_str(&r.text(0)?).map_err(corrupt("node", name))?;
        let taints: Vec<Taint> = serde_json::from_str(&r.text(1)?).map_err(corrupt("node", name))?;
        let (labels, taints) = match edit(&labels, &taints) {
            Ok(v) => v,
            Err(e) => return Ok(Some(Err(e))),
        };
        tx.exec(
            "UPDATE nodes SET admin_labels = ?, admin_taints = ? WHERE name = ?",
            &[(&to_json(&labels)).into(), (&to_json(&taints)).into(), name.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(Ok(())))
    }

    /// Lets the next join under `name` through until `until_ms`. False when there is no such
    /// node.
    pub async fn allow_rejoin(&self, name: &str, until_ms: u64) -> Result<bool> {
        let n = self
            .pool
            .exec("UPDATE nodes SET rejoin_until_ms = ? WHERE name = ?", &[until_ms.into(), name.into()])
            .await?;
        Ok(n > 0)
    }

    /// Deletes node `name` and revokes its certificate, in one transaction. Its replicas stay
    /// until the controller places them elsewhere (a node that is gone fits nothing). False
    /// when there is no such node.
    pub async fn delete_node(&self, name: &str, now_ms: u64) -> Result<bool> {
        let mut tx = self.pool.write_tx().await?;
        let Some(r) =
            tx.fetch_optional("SELECT cert_sha256, prev_cert_sha256 FROM nodes WHERE name = ?", &[name.into()]).await?
        else {
            return Ok(false);
        };
        for cert in [r.opt_text(0)?, r.opt_text(1)?].into_iter().flatten() {
            revoke_cert(&mut tx, &cert, name, "node deleted", now_ms).await?;
        }
        tx.exec("DELETE FROM nodes WHERE name = ?", &[name.into()]).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records (or, with an empty text, clears) why the node is not on its current set.
    pub async fn set_node_problem(&self, name: &str, problem: &str) -> Result<()> {
        self.pool.exec("UPDATE nodes SET problem = ? WHERE name = ?", &[problem.into(), name.into()]).await?;
        Ok(())
    }
}

async fn verdict_in(tx: &mut super::db::Tx, name: &str, cert_sha256: &str) -> Result<CertVerdict> {
    let revoked = tx
        .fetch_optional("SELECT node FROM revoked_certs WHERE cert_sha256 = ?", &[cert_sha256.into()])
        .await?
        .is_some();
    let (recorded, previous) = match tx
        .fetch_optional("SELECT cert_sha256, prev_cert_sha256 FROM nodes WHERE name = ?", &[name.into()])
        .await?
    {
        Some(r) => (Some(r.opt_text(0)?), r.opt_text(1)?),
        None => (None, None),
    };
    Ok(identity::certificate_verdict(
        recorded.as_ref().map(Option::as_deref),
        previous.as_deref(),
        revoked,
        cert_sha256,
    ))
}

async fn revoke_cert(tx: &mut super::db::Tx, cert: &str, node: &str, reason: &str, now_ms: u64) -> Result<()> {
    tx.exec(
        "INSERT INTO revoked_certs (cert_sha256, node, revoked_at_ms, reason) VALUES (?, ?, ?, ?) \
         ON CONFLICT (cert_sha256) DO NOTHING",
        &[cert.into(), node.into(), now_ms.into(), reason.into()],
    )
    .await?;
    Ok(())
}

/// One session's hello, for [`Store::check_in_many`].
#[derive(Debug, Clone)]
pub struct SessionStart {
    pub name: String,
    pub cert_sha256: String,
    pub cert_not_after_ms: Option<u64>,
    pub claimed: NodeFacts,
    pub now_ms: u64,
    /// The statuses the hello carried, of replicas the node holds (`guard::held_statuses`).
    pub statuses: BTreeMap<String, proto::messages::ReplicaStatus>,
}

/// [`Store::check_in`] within `tx`.
async fn check_in_tx(
    tx: &mut super::db::Tx,
    name: &str,
    cert_sha256: &str,
    cert_not_after_ms: Option<u64>,
    claimed: &NodeFacts,
    now_ms: u64,
) -> Result<(CertVerdict, Option<NodeRow>)> {
    let verdict = verdict_in(tx, name, cert_sha256).await?;
    if !verdict.admits() {
        return Ok((verdict, None));
    }
    let facts = to_json(claimed);
    let cpus = u64::from(claimed.cpus);
    tx.exec(
        "INSERT INTO nodes (name, facts, joined_at_ms, last_seen_ms, cert_sha256, joined_cpus, joined_memory_bytes) \
         VALUES (?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET facts = excluded.facts, last_seen_ms = excluded.last_seen_ms, \
           cert_sha256 = COALESCE(nodes.cert_sha256, excluded.cert_sha256), \
           joined_cpus = COALESCE(nodes.joined_cpus, excluded.joined_cpus), \
           joined_memory_bytes = COALESCE(nodes.joined_memory_bytes, excluded.joined_memory_bytes), \
           problem = ''",
        &[
            name.into(),
            (&facts).into(),
            now_ms.into(),
            now_ms.into(),
            cert_sha256.into(),
            cpus.into(),
            claimed.memory_bytes.into(),
        ],
    )
    .await?;
    if let Some(not_after) = cert_not_after_ms {
        tx.exec(
            "UPDATE nodes SET cert_not_after_ms = ? WHERE name = ? AND cert_sha256 = ?",
            &[not_after.into(), name.into(), cert_sha256.into()],
        )
        .await?;
    }
    let row = tx.fetch_optional(&format!("SELECT {NODE_COLUMNS} WHERE name = ?"), &[name.into()]).await?;
    let row = row.as_ref().map(node_row).transpose()?;
    Ok((verdict, row))
}
