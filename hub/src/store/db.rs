//! The two SQL backends behind [`super::Store`]: an enum over a SQLite pool and a PostgreSQL
//! pool, with one SQL text per query. It owns connection setup, transaction start (the write
//! lock each backend needs), argument binding, placeholder translation and row decoding; it
//! must never hold business logic, which lives once in `store/mod.rs`.
//!
//! Why an enum and not sqlx's `Any` driver: `Any` does not translate placeholders either
//! (`?` vs `$1`), cannot start SQLite's `BEGIN IMMEDIATE`, and needs a further sqlx feature.
//! Here each query is written once with `?` placeholders in the common subset of both
//! dialects; [`translate`] rewrites `?` to `$n` and the one dialect fragment (`{now_ms}`, the
//! database's clock) for PostgreSQL. Values cross the boundary as [`Arg`] (in) and [`Rec`]
//! (out), so the typed sqlx layer stays per backend and nothing here can panic on a row.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgSslMode};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Postgres, Row, Sqlite, Transaction};

/// Any transaction-scoped advisory lock key works as long as every hub uses the same one:
/// "flotilla" in ASCII.
const PG_WRITE_LOCK: i64 = 0x666c_6f74_696c_6c61;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// A bound argument.
pub(crate) enum Arg<'a> {
    I64(i64),
    OptI64(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(s: &'a str) -> Self {
        Arg::Text(s)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(s: &'a String) -> Self {
        Arg::Text(s)
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(s: Option<&'a str>) -> Self {
        Arg::OptText(s)
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::I64(v)
    }
}

impl From<Option<u64>> for Arg<'_> {
    fn from(v: Option<u64>) -> Self {
        Arg::OptI64(v.map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
    }
}

impl From<u64> for Arg<'_> {
    fn from(v: u64) -> Self {
        // Values above i64::MAX (milliseconds in 292 million years, generations no writer
        // reaches) saturate rather than wrap negative.
        Arg::I64(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::I64(i64::from(v))
    }
}

/// One result row, decoded by column index.
pub(crate) enum Rec {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

impl Rec {
    pub(crate) fn i64(&self, i: usize) -> Result<i64, sqlx::Error> {
        match self {
            Rec::Sqlite(r) => r.try_get(i),
            Rec::Postgres(r) => r.try_get(i),
        }
    }

    pub(crate) fn u64(&self, i: usize) -> Result<u64, sqlx::Error> {
        self.i64(i).map(|v| v.max(0) as u64)
    }

    pub(crate) fn opt_u64(&self, i: usize) -> Result<Option<u64>, sqlx::Error> {
        let v: Option<i64> = match self {
            Rec::Sqlite(r) => r.try_get(i)?,
            Rec::Postgres(r) => r.try_get(i)?,
        };
        Ok(v.map(|v| v.max(0) as u64))
    }

    pub(crate) fn text(&self, i: usize) -> Result<String, sqlx::Error> {
        match self {
            Rec::Sqlite(r) => r.try_get(i),
            Rec::Postgres(r) => r.try_get(i),
        }
    }

    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>, sqlx::Error> {
        match self {
            Rec::Sqlite(r) => r.try_get(i),
            Rec::Postgres(r) => r.try_get(i),
        }
    }
}

/// Rewrites a query written for SQLite (`?` placeholders, `{now_ms}`) for `backend`. The
/// queries in this crate contain no `?` inside string literals.
pub(crate) fn translate(backend: Backend, sql: &str) -> String {
    match backend {
        Backend::Sqlite => sql.replace("{now_ms}", "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"),
        Backend::Postgres => {
            let sql = sql.replace("{now_ms}", "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)");
            let mut out = String::with_capacity(sql.len() + 8);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                Arg::I64(v) => q.bind(*v),
                Arg::OptI64(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.to_string()),
                Arg::OptText(v) => q.bind(v.map(str::to_string)),
            };
        }
        q
    }};
}

/// Whether a PostgreSQL connection is either verified (`sslmode=verify-full`) or stays on this
/// machine (a unix socket or a loopback address), where TLS adds nothing.
fn verified_or_local(opts: &PgConnectOptions) -> bool {
    if matches!(opts.get_ssl_mode(), PgSslMode::VerifyFull) || opts.get_socket().is_some() {
        return true;
    }
    let host = opts.get_host();
    host == "localhost" || host.starts_with('/') || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Pool {
    pub(crate) async fn open_sqlite(opts: sqlx::sqlite::SqliteConnectOptions) -> Result<Pool, sqlx::Error> {
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        Ok(Pool::Sqlite(pool))
    }

    /// Connects to PostgreSQL. TLS follows the URL's `sslmode` (and `sslrootcert`), as libpq
    /// does: `verify-full` checks the server's chain and name; sqlx's default, `prefer`, uses
    /// TLS when the server offers it but verifies nothing. The cluster's CA key and join token
    /// travel over this connection, so anything short of `verify-full` to a server off this
    /// machine is logged as a warning.
    pub(crate) async fn open_postgres(url: &str) -> Result<Pool, sqlx::Error> {
        let opts: PgConnectOptions = url.parse()?;
        if !verified_or_local(&opts) {
            tracing::warn!(
                host = opts.get_host(),
                sslmode = ?opts.get_ssl_mode(),
                "the PostgreSQL connection is not verified (add sslmode=verify-full&sslrootcert=CA.pem to the URL): \
                 cluster secrets travel over it"
            );
        }
        let pool =
            PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(10)).connect_with(opts).await?;
        Ok(Pool::Postgres(pool))
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    pub(crate) async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        // One migrations directory serves both backends: the schema uses only the common
        // subset (TEXT, BIGINT, UNIQUE, REFERENCES ... ON DELETE CASCADE). On PostgreSQL the
        // migrator holds an advisory lock, so hubs starting together migrate once.
        let migrator = sqlx::migrate!("./migrations");
        match self {
            Pool::Sqlite(p) => migrator.run(p).await,
            Pool::Postgres(p) => migrator.run(p).await,
        }
    }

    /// A read-only transaction: one consistent snapshot across several statements.
    pub(crate) async fn read_tx(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Pool::Sqlite(p) => Tx::Sqlite(p.begin().await?),
            Pool::Postgres(p) => Tx::Postgres(p.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?),
        })
    }

    /// A transaction that holds the store's write lock from its first statement, so a
    /// read-modify-write inside it cannot lose an update to another writer, on this hub or
    /// another one. SQLite: `BEGIN IMMEDIATE` (the database's one writer lock; a deferred
    /// transaction would fail with SQLITE_BUSY_SNAPSHOT instead of waiting). PostgreSQL: a
    /// transaction-scoped advisory lock shared by every hub; the transaction stays READ
    /// COMMITTED, so each statement after the lock sees every earlier writer's commit.
    pub(crate) async fn write_tx(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Pool::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_WRITE_LOCK).execute(&mut *tx).await?;
                Tx::Postgres(tx)
            }
        })
    }

    /// Runs one statement outside a transaction (it is atomic by itself); returns the number
    /// of rows it changed.
    pub(crate) async fn exec(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, sqlx::Error> {
        let sql = AssertSqlSafe(translate(self.backend(), sql));
        Ok(match self {
            Pool::Sqlite(p) => bind_all!(sqlx::query::<Sqlite>(sql), args).execute(p).await?.rows_affected(),
            Pool::Postgres(p) => bind_all!(sqlx::query::<Postgres>(sql), args).execute(p).await?.rows_affected(),
        })
    }

    pub(crate) async fn fetch(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Rec>, sqlx::Error> {
        let sql = AssertSqlSafe(translate(self.backend(), sql));
        Ok(match self {
            Pool::Sqlite(p) => {
                bind_all!(sqlx::query::<Sqlite>(sql), args).fetch_all(p).await?.into_iter().map(Rec::Sqlite).collect()
            }
            Pool::Postgres(p) => bind_all!(sqlx::query::<Postgres>(sql), args)
                .fetch_all(p)
                .await?
                .into_iter()
                .map(Rec::Postgres)
                .collect(),
        })
    }
}

impl Tx {
    fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    pub(crate) async fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, sqlx::Error> {
        let sql = AssertSqlSafe(translate(self.backend(), sql));
        Ok(match self {
            Tx::Sqlite(tx) => bind_all!(sqlx::query::<Sqlite>(sql), args).execute(&mut **tx).await?.rows_affected(),
            Tx::Postgres(tx) => bind_all!(sqlx::query::<Postgres>(sql), args).execute(&mut **tx).await?.rows_affected(),
        })
    }

    pub(crate) async fn fetch(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Rec>, sqlx::Error> {
        let sql = AssertSqlSafe(translate(self.backend(), sql));
        Ok(match self {
            Tx::Sqlite(tx) => bind_all!(sqlx::query::<Sqlite>(sql), args)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(Rec::Sqlite)
                .collect(),
            Tx::Postgres(tx) => bind_all!(sqlx::query::<Postgres>(sql), args)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(Rec::Postgres)
                .collect(),
        })
    }

    pub(crate) async fn fetch_optional(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Rec>, sqlx::Error> {
        Ok(self.fetch(sql, args).await?.into_iter().next())
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(tx) => tx.commit().await,
            Tx::Postgres(tx) => tx.commit().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        let sql = "UPDATE t SET a = ? WHERE b = ? AND c < {now_ms}";
        let pg = translate(Backend::Postgres, sql);
        assert_eq!(
            pg,
            "UPDATE t SET a = $1 WHERE b = $2 AND c < CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        );
        let lite = translate(Backend::Sqlite, sql);
        assert!(lite.starts_with("UPDATE t SET a = ? WHERE b = ? AND c < CAST((julianday"), "{lite}");
    }

    #[test]
    fn unverified_postgres_off_this_machine_is_flagged() {
        let opts = |url: &str| url.parse::<PgConnectOptions>().unwrap();
        assert!(!verified_or_local(&opts("postgres://u@db.example/flotilla")));
        assert!(!verified_or_local(&opts("postgres://u@10.0.0.5/flotilla?sslmode=require")));
        assert!(!verified_or_local(&opts("postgres://u@db.example/flotilla?sslmode=verify-ca")));
        assert!(verified_or_local(&opts("postgres://u@db.example/flotilla?sslmode=verify-full")));
        assert!(verified_or_local(&opts("postgres://u@127.0.0.1:5432/flotilla")));
        assert!(verified_or_local(&opts("postgres://u@localhost/flotilla")));
        assert!(verified_or_local(&opts("postgres://u@%2Frun%2Fpostgresql/flotilla")));
    }
}
