//! The business database, chosen once at start-up from `API_DATABASE_URL`'s scheme (as atuin
//! does): one SQLite file (WAL), or PostgreSQL shared by any number of replicas. Each module's
//! store (profiles, notes, idempotency) has one implementation per backend, built on the pool
//! held here; [`db_error`] sorts both backends' errors into the contract's answers.
//!
//! SQLite is opened and migrated before the edge starts. PostgreSQL is not waited for: its pool
//! connects lazily, and its migrations run in a background task that retries until they
//! succeed (sqlx takes an advisory lock around them, so replicas starting together are safe).
//! Until then /readyz answers 503 and every store call 503 `unavailable` with `Retry-After`.

use std::future::Future;
use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use shared::OneProcess;
use sqlx::error::DatabaseError as _;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteError, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection as _, PgPool, SqlitePool};
use tokio::sync::watch;

use crate::config::DatabaseSettings;
use crate::error::ApiError;

/// Longest wait for a pooled PostgreSQL connection; past it the call answers 503.
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a PostgreSQL statement of a request may run (the server cancels it: 503).
const PG_STATEMENT_TIMEOUT: &str = "5s";
/// Longest a PostgreSQL session may sit idle inside a transaction before the server ends it.
const PG_IDLE_IN_TRANSACTION_TIMEOUT: &str = "15s";
/// A pooled PostgreSQL connection idle longer than this is pinged before use (a server
/// restart or a dropped idle connection is then noticed before a request's statement).
const PG_PING_IF_IDLE_FOR: Duration = Duration::from_secs(30);
/// Longest wait for the migration connection.
const PG_MIGRATION_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause between two migration attempts.
const PG_MIGRATION_RETRY: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(15));

/// The business database: one of the two backends, chosen at start-up.
#[derive(Debug, Clone)]
pub enum Db {
    /// An SQLite file, migrated before start, and this process's lock on it (the edge keeps
    /// profiles in memory on the strength of it: [`crate::profile::KeptProfiles`]).
    Sqlite(SqlitePool, Arc<OneProcess>),
    /// PostgreSQL, migrated in the background.
    Postgres(PgDb),
}

impl Db {
    /// Opens the database `settings` name: SQLite is opened and migrated now; PostgreSQL gets
    /// a lazy pool and a background migration task (call from within a Tokio runtime).
    pub async fn open(settings: &DatabaseSettings) -> anyhow::Result<Self> {
        match settings {
            DatabaseSettings::Sqlite { path } => Self::open_sqlite(path).await,
            DatabaseSettings::Postgres {
                url,
                max_connections,
            } => Ok(Self::Postgres(PgDb::open(url, *max_connections)?)),
        }
    }

    /// Opens (creating it and its directory if missing) and migrates an SQLite database.
    pub async fn open_sqlite(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the database directory {}", dir.display())
            })?;
        }
        let lock = OneProcess::take(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            // Statement journals and temporary b-trees in memory: a multi-row statement in a
            // transaction otherwise opens, writes and deletes a file under /var/tmp.
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            // An SQLite connection is a file handle in this process: it cannot go stale the way a
            // network connection can. sqlx's default ping before every acquire is one more round
            // trip to the connection's thread per statement (measured: about a third of the
            // edge's CPU on `GET /v1/me`).
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        let applied = shared::migrations::applied_sqlite(&pool)
            .await
            .context("cannot read the SQLite database's migration history")?;
        shared::migrations::prepare(&applied, &mut migrator, "api-service (API_DATABASE_URL)")
            .context("cannot apply the SQLite migrations")?;
        migrator
            .run(&pool)
            .await
            .context("cannot apply the SQLite migrations")?;
        Ok(Self::Sqlite(pool, Arc::new(lock)))
    }

    /// Which backend, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(..) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// A cheap round trip, for readiness; PostgreSQL is ready only once migrated.
    pub async fn ping(&self) -> bool {
        match self {
            Self::Sqlite(pool, _) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
            Self::Postgres(pg) => {
                pg.is_migrated() && sqlx::query("SELECT 1").execute(&pg.pool).await.is_ok()
            }
        }
    }
}

/// PostgreSQL: the lazy pool, and whether the migrations have run.
#[derive(Debug, Clone)]
pub struct PgDb {
    pool: PgPool,
    migrated: watch::Receiver<bool>,
}

impl PgDb {
    /// A lazy pool on `url` (nothing is connected yet; at most `max_connections` at a time)
    /// and the background task that migrates the database, retrying until it succeeds or
    /// every handle of this `PgDb` is dropped.
    pub fn open(url: &SecretString, max_connections: u32) -> anyhow::Result<Self> {
        // The parse error is not passed on: it could quote the URL, password included.
        let base = PgConnectOptions::from_str(url.expose_secret())
            .map_err(|_| anyhow::anyhow!("API_DATABASE_URL is not a valid PostgreSQL URL"))?
            .application_name("api-service");
        let requests = base.clone().options([
            ("statement_timeout", PG_STATEMENT_TIMEOUT),
            (
                "idle_in_transaction_session_timeout",
                PG_IDLE_IN_TRANSACTION_TIMEOUT,
            ),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(PG_ACQUIRE_TIMEOUT)
            .idle_timeout(Duration::from_secs(300))
            // sqlx pings every connection it hands out by default: one more network round trip
            // per statement. Only a connection that sat idle for a while is pinged (a failed
            // ping closes it and the pool hands out another).
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PG_PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(requests);
        let runtime = tokio::runtime::Handle::try_current()
            .context("PostgreSQL's migrations need a Tokio runtime")?;
        let (done, migrated) = watch::channel(false);
        // Migrations get a connection of their own, without the statement timeout: a schema
        // change may rightly take longer than a request.
        runtime.spawn(migrate_until_done(base, done));
        Ok(Self { pool, migrated })
    }

    /// The pool, whether or not the migrations have run (readiness, tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool once the migrations have run; before that 503 `unavailable`.
    pub fn ready_pool(&self) -> Result<&PgPool, ApiError> {
        if self.is_migrated() {
            Ok(&self.pool)
        } else {
            Err(ApiError::unavailable(anyhow::anyhow!(
                "the PostgreSQL migrations have not run yet"
            )))
        }
    }

    /// True once the migrations have run.
    pub fn is_migrated(&self) -> bool {
        *self.migrated.borrow()
    }

    /// Completes once the migrations have run (tests, tools).
    pub async fn migrated(&self) {
        let mut migrated = self.migrated.clone();
        // An error means the task ended without success, which only a dropped runtime does.
        let _ended = migrated.wait_for(|done| *done).await;
    }
}

/// Runs the PostgreSQL migrations, retrying with growing pauses, then reports through `done`.
async fn migrate_until_done(options: PgConnectOptions, done: watch::Sender<bool>) {
    let (mut pause, longest) = PG_MIGRATION_RETRY;
    let mut attempt: u32 = 1;
    loop {
        match migrate_once(&options).await {
            Ok(()) => {
                tracing::info!(attempt, "PostgreSQL migrations applied");
                done.send_replace(true);
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, error = %format_args!("{e:#}"), retry_in = ?pause,
                    "PostgreSQL is not migrated yet; /readyz answers 503 until it is");
            }
        }
        tokio::select! {
            () = done.closed() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(longest);
        attempt = attempt.saturating_add(1);
    }
}

async fn migrate_once(options: &PgConnectOptions) -> anyhow::Result<()> {
    // A pool of one connection, used once: the migrator holds its advisory lock on it, and
    // closing the pool releases the lock even when a migration failed half-way.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(PG_MIGRATION_CONNECT_TIMEOUT)
        .connect_with(options.clone())
        .await
        .context("cannot connect to PostgreSQL")?;
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    let migrated = match shared::migrations::applied_postgres(&pool).await {
        Ok(applied) => {
            match shared::migrations::prepare(
                &applied,
                &mut migrator,
                "api-service (API_DATABASE_URL)",
            ) {
                Ok(_) => migrator.run(&pool).await.map_err(anyhow::Error::from),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e.context("cannot read the database's migration history")),
    }
    .context("cannot apply the PostgreSQL migrations");
    pool.close().await;
    migrated
}

/// PostgreSQL aborted the transaction so that it may be run again: serialization failure
/// (40001) or deadlock (40P01).
pub fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.try_downcast_ref::<PgDatabaseError>()
            .is_some_and(|pg| matches!(pg.code(), "40001" | "40P01")))
}

/// Runs `op`, once more when PostgreSQL aborted it as a serialization failure or deadlock,
/// and sorts a remaining error with [`db_error`] (a second abort is 503 `unavailable`).
pub async fn retry_once<T, F, Fut>(op: F) -> Result<T, ApiError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    match op().await {
        Err(e) if is_retryable(&e) => {
            tracing::debug!(error = %e, "transaction aborted by PostgreSQL; running it again");
            op().await.map_err(db_error)
        }
        done => done.map_err(db_error),
    }
}

/// Sorts a database error into the contract's answer, by kind, never by message text:
/// unreachable, timed out, closed, busy, shutting down or overloaded is 503 `unavailable`
/// (retry), anything else 500 with the cause logged.
pub fn db_error(e: sqlx::Error) -> ApiError {
    if transient(&e) {
        ApiError::unavailable(e)
    } else {
        ApiError::internal(e)
    }
}

/// True for the errors after which the same request may well succeed a moment later (503
/// `unavailable`); the others are 500 `internal`.
pub fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(d) => {
            if let Some(pg) = d.try_downcast_ref::<PgDatabaseError>() {
                transient_pg(pg.code())
            } else if let Some(lite) = d.try_downcast_ref::<SqliteError>() {
                // SQLITE_BUSY and SQLITE_LOCKED, and their extended codes.
                matches!(
                    lite.code().as_deref(),
                    Some("5" | "6" | "261" | "262" | "517" | "773")
                )
            } else {
                false
            }
        }
        _ => false,
    }
}

/// The SQLSTATEs after which the same request may well succeed a moment later.
fn transient_pg(sqlstate: &str) -> bool {
    // 08: connection exception; 53: insufficient resources (too many connections...).
    sqlstate.starts_with("08")
        || sqlstate.starts_with("53")
        || matches!(
            sqlstate,
            // serialization failure, deadlock (after one retry)
            "40001" | "40P01"
            // query canceled (statement_timeout), lock not available
            | "57014" | "55P03"
            // admin shutdown, crash shutdown, cannot connect now (starting, in recovery)
            | "57P01" | "57P02" | "57P03"
            // read-only transaction: connected to a standby, as during a failover
            | "25006"
        )
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[tokio::test]
    async fn a_second_opening_of_one_sqlite_file_stops_saying_why() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("api.db");
        let first = Db::open_sqlite(&path).await.expect("the first opening");

        let second = Db::open_sqlite(&path).await.expect_err("a second process");

        let why = format!("{second:#}");
        assert!(
            why.contains("another process has the SQLite database"),
            "{why}"
        );
        assert!(why.contains("use PostgreSQL for more"), "{why}");
        // Once the first is gone (its process ended), the file opens again.
        drop(first);
        Db::open_sqlite(&path)
            .await
            .expect("opens after the first closed");
    }

    #[test]
    fn unreachable_or_exhausted_is_503_and_the_rest_500() {
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
        ] {
            let answer = db_error(e);
            assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(answer.code(), "unavailable");
        }
        for e in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("x".into()),
        ] {
            assert_eq!(db_error(e).status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
    }

    #[test]
    fn sqlstates_that_pass_are_transient() {
        for code in [
            "08006", "08001", "53300", "40001", "40P01", "57014", "57P01", "57P03", "25006",
        ] {
            assert!(transient_pg(code), "{code}");
        }
        for code in ["23505", "42P01", "22001", "XX000", "40003"] {
            assert!(!transient_pg(code), "{code}");
        }
    }

    #[tokio::test]
    async fn postgres_starts_unmigrated_and_answers_503_while_unreachable() {
        // Nothing listens on port 1: the pool is lazy, so opening succeeds anyway.
        let url = SecretString::from("postgres://api:pw-secret@127.0.0.1:1/api");
        let db = Db::open(&DatabaseSettings::Postgres {
            url,
            max_connections: 3,
        })
        .await
        .expect("a lazy pool opens without PostgreSQL");
        assert_eq!(db.backend(), "postgres");
        assert!(!format!("{db:?}").contains("pw-secret"));
        assert!(!db.ping().await);
        let Db::Postgres(pg) = &db else {
            panic!("postgres:// must select PostgreSQL");
        };
        assert_eq!(pg.pool.options().get_max_connections(), 3);
        let e = pg.ready_pool().expect_err("not migrated");
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
    }
}
