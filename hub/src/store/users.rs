//! The store's side of API users: each user's role, the certificates issued to it, and the
//! audit log. The rules (who may ask what) are pure, in [`crate::access`]; here they meet the
//! write-locked transactions that keep them, so two admins revoking the last two admins
//! cannot both win.

use proto::messages::{AuditView, Role, UserView};

use super::db::Rec;
use super::{Result, Store, StoreError};

/// The most audit entries kept; older ones are pruned as new ones arrive.
pub const AUDIT_KEEP: u64 = 100_000;

/// A user to store.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: String,
    pub role: Role,
    pub created_by: String,
    pub cert_validity_ms: u64,
}

/// A user as the hub checks it at each connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub role: Role,
    pub created_at_ms: u64,
    pub created_by: String,
    pub cert_validity_ms: u64,
    pub revoked_at_ms: Option<u64>,
    /// When its newest certificate expires.
    pub cert_expires_ms: Option<u64>,
}

impl UserRow {
    pub fn view(&self) -> UserView {
        UserView {
            name: self.name.clone(),
            role: self.role,
            created_at_ms: self.created_at_ms,
            created_by: self.created_by.clone(),
            cert_expires_ms: self.cert_expires_ms,
            revoked_at_ms: self.revoked_at_ms,
        }
    }
}

/// Why a user was not added or revoked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserRefusal {
    #[error("user {0:?} exists; revoked users keep their name, so choose another")]
    Exists(String),
    #[error("user {0:?} not found")]
    NotFound(String),
    #[error("user {0:?} is the last admin; add another admin before revoking it")]
    LastAdmin(String),
}

/// An entry to add to the audit log.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub user: String,
    pub role: Role,
    pub peer: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

const USER_COLUMNS: &str = "u.name, u.role, u.created_at_ms, u.created_by, u.cert_validity_ms, u.revoked_at_ms, \
     (SELECT MAX(c.not_after_ms) FROM user_certs c WHERE c.name = u.name) FROM users u";

fn role(text: &str, name: &str) -> Result<Role> {
    text.parse().map_err(|source| StoreError::BadRole { user: name.to_string(), source })
}

fn user_row(r: &Rec) -> Result<UserRow> {
    let name = r.text(0)?;
    Ok(UserRow {
        role: role(&r.text(1)?, &name)?,
        created_at_ms: r.u64(2)?,
        created_by: r.text(3)?,
        cert_validity_ms: r.u64(4)?,
        revoked_at_ms: r.opt_u64(5)?,
        cert_expires_ms: r.opt_u64(6)?,
        name,
    })
}

impl Store {
    /// Adds `user` holding certificate `cert_sha256` (valid until `not_after_ms`); refused when
    /// the name is taken, even by a revoked user.
    pub async fn add_user(
        &self,
        user: &NewUser,
        cert_sha256: &str,
        not_after_ms: u64,
        now_ms: u64,
    ) -> Result<std::result::Result<UserRow, UserRefusal>> {
        let mut tx = self.pool.write_tx().await?;
        if tx.fetch_optional("SELECT name FROM users WHERE name = ?", &[(&user.name).into()]).await?.is_some() {
            return Ok(Err(UserRefusal::Exists(user.name.clone())));
        }
        insert_user(&mut tx, user, now_ms, "").await?;
        insert_cert(&mut tx, &user.name, cert_sha256, not_after_ms, now_ms).await?;
        let row = tx.fetch_optional(&format!("SELECT {USER_COLUMNS} WHERE u.name = ?"), &[(&user.name).into()]).await?;
        tx.commit().await?;
        row.as_ref().map(user_row).transpose()?.map(Ok).ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    /// The admin a hub makes at its first start, and the certificate of its admin config:
    /// the user is created only if absent (once revoked, it stays revoked), the certificate
    /// recorded if new.
    pub async fn ensure_user(&self, user: &NewUser, cert_sha256: &str, not_after_ms: u64, now_ms: u64) -> Result<()> {
        let mut tx = self.pool.write_tx().await?;
        insert_user(&mut tx, user, now_ms, " ON CONFLICT (name) DO NOTHING").await?;
        tx.exec(
            "INSERT INTO user_certs (cert_sha256, name, issued_at_ms, not_after_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (cert_sha256) DO NOTHING",
            &[cert_sha256.into(), (&user.name).into(), now_ms.into(), not_after_ms.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a renewal: a new certificate for `name` (the old ones stay valid until they
    /// expire; revoking the user refuses them all).
    pub async fn add_user_cert(&self, name: &str, cert_sha256: &str, not_after_ms: u64, now_ms: u64) -> Result<()> {
        let mut tx = self.pool.write_tx().await?;
        insert_cert(&mut tx, name, cert_sha256, not_after_ms, now_ms).await?;
        // Certificates long expired say nothing any more; keep the table small.
        tx.exec("DELETE FROM user_certs WHERE name = ? AND not_after_ms < ?", &[name.into(), now_ms.into()]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The user certificate `cert_sha256` was issued to, whether or not it is revoked.
    pub async fn user_by_cert(&self, cert_sha256: &str) -> Result<Option<UserRow>> {
        let rows = self
            .pool
            .fetch(
                &format!("SELECT {USER_COLUMNS} WHERE u.name = (SELECT name FROM user_certs WHERE cert_sha256 = ?)"),
                &[cert_sha256.into()],
            )
            .await?;
        rows.first().map(user_row).transpose()
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserRow>> {
        let rows = self.pool.fetch(&format!("SELECT {USER_COLUMNS} ORDER BY u.name"), &[]).await?;
        rows.iter().map(user_row).collect()
    }

    /// Revokes `name`; refused for the last admin not revoked (nobody could manage the
    /// cluster's people after). Revoking a revoked user changes nothing.
    pub async fn revoke_user(&self, name: &str, now_ms: u64) -> Result<std::result::Result<UserRow, UserRefusal>> {
        let mut tx = self.pool.write_tx().await?;
        let Some(row) = tx.fetch_optional(&format!("SELECT {USER_COLUMNS} WHERE u.name = ?"), &[name.into()]).await?
        else {
            return Ok(Err(UserRefusal::NotFound(name.to_string())));
        };
        let user = user_row(&row)?;
        if user.revoked_at_ms.is_none() && user.role == Role::Admin {
            let admins = tx
                .fetch(
                    "SELECT COUNT(*) FROM users WHERE role = ? AND revoked_at_ms IS NULL",
                    &[Role::Admin.as_str().into()],
                )
                .await?;
            if admins.first().map(|r| r.i64(0)).transpose()?.unwrap_or(0) <= 1 {
                return Ok(Err(UserRefusal::LastAdmin(name.to_string())));
            }
        }
        tx.exec(
            "UPDATE users SET revoked_at_ms = ? WHERE name = ? AND revoked_at_ms IS NULL",
            &[now_ms.into(), name.into()],
        )
        .await?;
        let row = tx.fetch_optional(&format!("SELECT {USER_COLUMNS} WHERE u.name = ?"), &[name.into()]).await?;
        tx.commit().await?;
        row.as_ref().map(user_row).transpose()?.map(Ok).ok_or(StoreError::Query(sqlx::Error::RowNotFound))
    }

    /// Adds `entry` to the audit log, and keeps the log to its newest [`AUDIT_KEEP`] entries.
    pub async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        let mut id = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        let id = hex::encode(id);
        self.pool
            .exec(
                "INSERT INTO audit_log (id, at_ms, username, role, peer, action, target, outcome) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                &[
                    (&id).into(),
                    entry.at_ms.into(),
                    (&entry.user).into(),
                    entry.role.as_str().into(),
                    (&entry.peer).into(),
                    (&entry.action).into(),
                    (&entry.target).into(),
                    (&entry.outcome).into(),
                ],
            )
            .await?;
        self.prune_audit(AUDIT_KEEP).await
    }

    /// Deletes all but the newest `keep` audit entries (by time; entries of the same
    /// millisecond as the `keep`-th newest stay).
    pub async fn prune_audit(&self, keep: u64) -> Result<()> {
        self.pool
            .exec(
                "DELETE FROM audit_log WHERE at_ms < \
                 (SELECT at_ms FROM audit_log ORDER BY at_ms DESC LIMIT 1 OFFSET ?)",
                &[keep.saturating_sub(1).into()],
            )
            .await?;
        Ok(())
    }

    /// The newest `limit` entries at or after `since_ms`, oldest first.
    pub async fn audit(&self, limit: u32, since_ms: u64) -> Result<Vec<AuditView>> {
        let rows = self
            .pool
            .fetch(
                "SELECT at_ms, username, role, peer, action, target, outcome FROM audit_log \
                 WHERE at_ms >= ? ORDER BY at_ms DESC, id DESC LIMIT ?",
                &[since_ms.into(), u64::from(limit).into()],
            )
            .await?;
        let mut items = rows
            .iter()
            .map(|r| {
                let user = r.text(1)?;
                Ok(AuditView {
                    at_ms: r.u64(0)?,
                    role: role(&r.text(2)?, &user)?,
                    user,
                    peer: r.text(3)?,
                    action: r.text(4)?,
                    target: r.text(5)?,
                    outcome: r.text(6)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        items.reverse();
        Ok(items)
    }
}

async fn insert_user(tx: &mut super::db::Tx, user: &NewUser, now_ms: u64, conflict: &str) -> Result<()> {
    tx.exec(
        &format!(
            "INSERT INTO users (name, role, created_at_ms, created_by, cert_validity_ms) VALUES (?, ?, ?, ?, ?){conflict}"
        ),
        &[
            (&user.name).into(),
            user.role.as_str().into(),
            now_ms.into(),
            (&user.created_by).into(),
            user.cert_validity_ms.into(),
        ],
    )
    .await?;
    Ok(())
}

async fn insert_cert(
    tx: &mut super::db::Tx,
    name: &str,
    cert_sha256: &str,
    not_after_ms: u64,
    now_ms: u64,
) -> Result<()> {
    tx.exec(
        "INSERT INTO user_certs (cert_sha256, name, issued_at_ms, not_after_ms) VALUES (?, ?, ?, ?)",
        &[cert_sha256.into(), name.into(), now_ms.into(), not_after_ms.into()],
    )
    .await?;
    Ok(())
}
