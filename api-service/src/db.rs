//! The business database: one SQLite file (WAL), migrated at start-up. Each module's store
//! (profiles, notes, idempotency) works on this pool.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::error::ApiError;

/// The pool.
#[derive(Debug, Clone)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Opens (creating it and its directory if missing) and migrates the database.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the database directory {}", dir.display())
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .context("cannot apply the SQLite migrations")?;
        Ok(Self { pool })
    }

    /// The pool, for the stores.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// Sorts a database error into the contract's answer, by kind: busy, timed out or closed is
/// 503 `unavailable` (retry), anything else 500 with the cause logged.
pub fn db_error(e: sqlx::Error) -> ApiError {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            ApiError::unavailable(e)
        }
        sqlx::Error::Database(ref d) if matches!(d.code().as_deref(), Some("5" | "6" | "517")) => {
            ApiError::unavailable(e)
        }
        other => ApiError::internal(other),
    }
}
