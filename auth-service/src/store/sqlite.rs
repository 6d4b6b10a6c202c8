//! The embedded default store: one SQLite file in WAL mode.
//!
//! Write transactions start with `BEGIN IMMEDIATE`, so two of them never deadlock while
//! upgrading a read lock: SQLite serializes them, which is what makes a login's policy
//! decision and a refresh-token exchange atomic here (PostgreSQL will lock rows instead).
//! Writers take their turn in this process first ([`WriteTurn`], first come first served)
//! rather than in SQLite's busy handler (the bench, 16 logins in flight: p99 186 ms, p99.9
//! 739 ms, for a p50 of 7.7 ms, before they did).

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use shared::{OneProcess, TURN_WAIT, WriteTurn};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{
    AccessRecord, AppTokenLock, EndTarget, FORGET_EVENTS, FORGET_SESSIONS, LoginOutcome, NewLogin,
    Owner, REFRESH_SESSION, RotateOutcome, Rotation, SealedSessionKeys, Store, StoreError,
    StoredAppToken, device, purge_statements, reason,
};
use crate::crypto::TokenHash;
use crate::domain::{
    EndReason, EventKind, LiveSession, Millis, SessionEvent, SessionInfo, plan_evictions,
};

/// The SQLite-backed store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// This process's lock on the file: `Verify`'s session marks and the phone numbers it
    /// keeps ([`crate::phones::KeptPhones`]) live in this process alone.
    _one_process: Arc<OneProcess>,
    /// The turn to write: held from a write transaction's `BEGIN` to its end, or for a
    /// statement that writes.
    turn: WriteTurn,
    /// The lock on the app's access_token rows ([`SqliteAppTokenLock`]).
    app_token: Arc<Mutex<()>>,
}

/// A write transaction that holds this process's turn to write until it ends.
struct Turn {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    _held: OwnedMutexGuard<()>,
}

impl Turn {
    async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(map_err)
    }
}

impl Deref for Turn {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl DerefMut for Turn {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) the database file and applies
    /// pending migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the database directory {}", dir.display())
            })?;
        }
        let one_process = OneProcess::take(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the answer leaves; nothing acknowledged is
            // lost on a crash or power cut.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            // Statement journals and temporary b-trees in memory: a multi-row statement in a
            // transaction otherwise opens, writes and deletes a file under /var/tmp.
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            // An SQLite connection is a file handle in this process: it cannot go stale the
            // way a network connection can, and sqlx's default ping before every acquire is
            // one more round trip to the connection's thread per statement.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        let applied = shared::migrations::applied_sqlite(&pool)
            .await
            .context("cannot read the SQLite database's migration history")?;
        shared::migrations::prepare(&applied, &mut migrator, "auth-service (AUTH_DATABASE_URL)")
            .context("cannot apply the SQLite migrations")?;
        migrator
            .run(&pool)
            .await
            .context("cannot apply the SQLite migrations")?;
        Ok(Self {
            pool,
            turn: one_process.turn(),
            app_token: Arc::default(),
            _one_process: Arc::new(one_process),
        })
    }

    /// A write transaction, begun once this process's earlier writers are done.
    async fn begin_write(&self) -> Result<Turn, StoreError> {
        let held = self.turn.take().await.map_err(StoreError::Unavailable)?;
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err)?;
        Ok(Turn { tx, _held: held })
    }
}

/// Sorts sqlx errors into "retry later" and "something is wrong", by kind, never by text.
fn map_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.into())
        }
        sqlx::Error::Database(ref d) if busy(d.code().as_deref()) => {
            StoreError::Unavailable(e.into())
        }
        other => StoreError::Other(other.into()),
    }
}

/// SQLITE_BUSY (5) and SQLITE_LOCKED (6), and their extended codes (`BUSY_RECOVERY` 261,
/// `LOCKED_SHAREDCACHE` 262, `BUSY_SNAPSHOT` 517, `BUSY_TIMEOUT` 773), which sqlx reports:
/// another writer held the file too long; as api-service sorts them (`db::transient`).
fn busy(code: Option<&str>) -> bool {
    matches!(code, Some("5" | "6" | "261" | "262" | "517" | "773"))
}

/// Ends one live session inside a transaction and records why; false if it was not live.
async fn end_one(
    conn: &mut SqliteConnection,
    session_id: &str,
    reason: EndReason,
    replaced_by: Option<(&str, Option<&str>)>,
    at: Millis,
) -> Result<bool, StoreError> {
    let openid: Option<(String,)> = sqlx::query_as(
        "UPDATE sessions SET ended_at = $1, end_reason = $2 \
         WHERE id = $3 AND ended_at IS NULL RETURNING openid",
    )
    .bind(at)
    .bind(reason.as_str())
    .bind(session_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    let Some((openid,)) = openid else {
        return Ok(false);
    };
    sqlx::query(
        "INSERT INTO session_events \
         (openid, session_id, kind, reason, replaced_by_session, replaced_by_device, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(openid)
    .bind(session_id)
    .bind(EventKind::End.as_str())
    .bind(reason.as_str())
    .bind(replaced_by.map(|r| r.0))
    .bind(replaced_by.and_then(|r| r.1))
    .bind(at)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(true)
}

async fn record_event(
    conn: &mut SqliteConnection,
    openid: &str,
    session_id: &str,
    kind: EventKind,
    at: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO session_events (openid, session_id, kind, at) VALUES ($1, $2, $3, $4)",
    )
    .bind(openid)
    .bind(session_id)
    .bind(kind.as_str())
    .bind(at)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Marks sessions past their refresh expiry as ended (`expired`, at that instant).
async fn expire_in(
    conn: &mut SqliteConnection,
    openid: Option<&str>,
    now: Millis,
) -> Result<u32, StoreError> {
    // Two statements, not one with `($2 IS NULL OR openid = $2)`: SQLite cannot use the
    // user's index through that OR, and every login scanned all live sessions.
    let due: Vec<(String, Millis)> = match openid {
        Some(openid) => {
            sqlx::query_as(
                "SELECT id, refresh_expires_at FROM sessions \
                 WHERE openid = $2 AND ended_at IS NULL AND refresh_expires_at <= $1 \
                 LIMIT 1000",
            )
            .bind(now)
            .bind(openid)
            .fetch_all(&mut *conn)
            .await
        }
        None => {
            sqlx::query_as(DUE_SESSIONS)
                .bind(now)
                .fetch_all(&mut *conn)
                .await
        }
    }
    .map_err(map_err)?;
    let mut n = 0;
    for (id, at) in due {
        if end_one(conn, &id, EndReason::Expired, None, at).await? {
            n += 1;
        }
    }
    Ok(n)
}

/// Runs each `(statement, $1)` of housekeeping's with `$2` the batch, in order, on `conn`;
/// how many rows each changed.
async fn run_batch<const N: usize>(
    conn: &mut SqliteConnection,
    statements: [(&'static str, Millis); N],
    batch: u32,
) -> Result<[u64; N], StoreError> {
    let mut changed = [0; N];
    for (n, (sql, before)) in changed.iter_mut().zip(statements) {
        *n = sqlx::query(sql)
            .bind(before)
            .bind(i64::from(batch))
            .execute(&mut *conn)
            .await
            .map_err(map_err)?
            .rows_affected();
    }
    Ok(changed)
}

/// Housekeeping's look for live sessions past their refresh expiry (`$1`: now), at most 1000
/// (public for the test that checks it finds them by index).
pub const DUE_SESSIONS: &str = "SELECT id, refresh_expires_at FROM sessions \
     WHERE ended_at IS NULL AND refresh_expires_at <= $1 LIMIT 1000";

async fn insert_tokens(
    conn: &mut SqliteConnection,
    session_id: &str,
    access: (TokenHash, Millis),
    refresh: (TokenHash, Millis),
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO access_tokens (hash, session_id, expires_at) VALUES ($1, $2, $3)")
        .bind(&access.0.0[..])
        .bind(session_id)
        .bind(access.1)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    sqlx::query("INSERT INTO refresh_tokens (hash, session_id, expires_at) VALUES ($1, $2, $3)")
        .bind(&refresh.0.0[..])
        .bind(session_id)
        .bind(refresh.1)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    Ok(())
}

/// The app's access_token row, held by this process's lock on it ([`SqliteStore`]'s
/// `app_token`; this process is the file's only one): every other lock waits for it, and
/// nothing else does. The renewal writes the row in a short transaction of its own, in its
/// turn, so the WeChat call made while the lock is held keeps no other write waiting (it
/// did when the lock was a `BEGIN IMMEDIATE` held across the call: every login waited for
/// WeChat). Dropped without [`AppTokenLock::replace`] or [`AppTokenLock::release`], the
/// lock is released.
struct SqliteAppTokenLock {
    store: SqliteStore,
    _held: OwnedMutexGuard<()>,
    appid: String,
    current: Option<StoredAppToken>,
}

#[async_trait]
impl AppTokenLock for SqliteAppTokenLock {
    fn current(&self) -> Option<&StoredAppToken> {
        self.current.as_ref()
    }

    async fn replace(
        self: Box<Self>,
        sealed: Vec<u8>,
        expires_at: Millis,
        now: Millis,
    ) -> Result<StoredAppToken, StoreError> {
        let generation = self.current.as_ref().map_or(0, |t| t.generation) + 1;
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO wechat_access_tokens (appid, token, expires_at, generation, updated_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (appid) DO UPDATE SET \
             token = excluded.token, expires_at = excluded.expires_at, \
             generation = excluded.generation, updated_at = excluded.updated_at",
        )
        .bind(&self.appid)
        .bind(&sealed)
        .bind(expires_at)
        .bind(generation)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await?;
        Ok(StoredAppToken {
            sealed,
            expires_at,
            renewed_at: now,
            generation,
        })
    }

    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}

async fn read_app_token<'c>(
    conn: impl sqlx::SqliteExecutor<'c>,
    appid: &str,
) -> Result<Option<StoredAppToken>, StoreError> {
    let row: Option<(Vec<u8>, Millis, Millis, i64)> = sqlx::query_as(
        "SELECT token, expires_at, updated_at, generation FROM wechat_access_tokens \
         WHERE appid = $1",
    )
    .bind(appid)
    .fetch_optional(conn)
    .await
    .map_err(map_err)?;
    Ok(row.map(
        |(sealed, expires_at, renewed_at, generation)| StoredAppToken {
            sealed,
            expires_at,
            renewed_at,
            generation,
        },
    ))
}

#[async_trait]
impl Store for SqliteStore {
    async fn login(&self, l: NewLogin) -> Result<LoginOutcome, StoreError> {
        let mut tx = self.begin_write().await?;

        let existing: Option<(Option<String>, Vec<u8>)> =
            sqlx::query_as("SELECT unionid, session_key_fp FROM users WHERE openid = $1")
                .bind(&l.openid)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_err)?;
        let (is_new_user, unionid) = match existing {
            None => {
                sqlx::query(
                    "INSERT INTO users (openid, unionid, session_key, session_key_fp, \
                     session_key_updated_at, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $5, $5)",
                )
                .bind(&l.openid)
                .bind(&l.unionid)
                .bind(&l.session_key_sealed)
                .bind(&l.session_key_fp[..])
                .bind(l.now)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                (true, l.unionid.clone())
            }
            Some((old_unionid, old_fp)) => {
                let unionid = l.unionid.clone().or(old_unionid);
                if old_fp == l.session_key_fp {
                    // WeChat handed out the same key again: no rotation, keep the previous.
                    sqlx::query(
                        "UPDATE users SET unionid = $2, session_key = $3, updated_at = $4 \
                         WHERE openid = $1",
                    )
                    .bind(&l.openid)
                    .bind(&unionid)
                    .bind(&l.session_key_sealed)
                    .bind(l.now)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                } else {
                    sqlx::query(
                        "UPDATE users SET unionid = $2, prev_session_key = session_key, \
                         session_key = $3, session_key_fp = $4, session_key_updated_at = $5, \
                         updated_at = $5 WHERE openid = $1",
                    )
                    .bind(&l.openid)
                    .bind(&unionid)
                    .bind(&l.session_key_sealed)
                    .bind(&l.session_key_fp[..])
                    .bind(l.now)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                }
                (false, unionid)
            }
        };

        expire_in(&mut tx, Some(&l.openid), l.now).await?;
        let live: Vec<(String, Option<String>, Millis)> = sqlx::query_as(
            "SELECT id, device_id, created_at FROM sessions WHERE openid = $1 AND ended_at IS NULL",
        )
        .bind(&l.openid)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let live: Vec<LiveSession> = live
            .into_iter()
            .map(|(id, device_id, created_at)| LiveSession {
                id,
                device_id,
                created_at,
            })
            .collect();
        let mut replaced = Vec::new();
        for id in plan_evictions(l.policy, &live, l.device.id()) {
            let by = Some((l.session_id.as_str(), l.device.id()));
            if end_one(&mut tx, &id, EndReason::Replaced, by, l.now).await? {
                replaced.push(id);
            }
        }

        sqlx::query(
            "INSERT INTO sessions (id, openid, device_id, device_platform, device_model, \
             created_at, last_active_at, refresh_expires_at) VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
        )
        .bind(&l.session_id)
        .bind(&l.openid)
        .bind(l.device.id())
        .bind(l.device.platform())
        .bind(l.device.model())
        .bind(l.now)
        .bind(l.refresh.1)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_tokens(&mut tx, &l.session_id, l.access, l.refresh).await?;
        record_event(&mut tx, &l.openid, &l.session_id, EventKind::Login, l.now).await?;
        tx.commit().await?;
        Ok(LoginOutcome {
            is_new_user,
            unionid,
            replaced,
        })
    }

    async fn find_access(&self, hash: &TokenHash) -> Result<Option<AccessRecord>, StoreError> {
        type Row = (
            String,
            Option<String>,
            String,
            Millis,
            Millis,
            Option<String>,
            Millis,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT s.openid, u.unionid, a.session_id, a.expires_at, s.last_active_at, \
             s.end_reason, s.refresh_expires_at \
             FROM access_tokens a JOIN sessions s ON s.id = a.session_id \
             JOIN users u ON u.openid = s.openid WHERE a.hash = $1",
        )
        .bind(&hash.0[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.map(
            |(
                openid,
                unionid,
                session_id,
                expires_at,
                last_active_at,
                ended,
                refresh_expires_at,
            )| {
                Ok(AccessRecord {
                    openid,
                    unionid,
                    session_id,
                    expires_at,
                    last_active_at,
                    ended: reason(ended)?,
                    refresh_expires_at,
                })
            },
        )
        .transpose()
    }

    async fn touch(
        &self,
        session_id: &str,
        now: Millis,
        min_interval: Millis,
    ) -> Result<(), StoreError> {
        let _turn = self.turn.take().await.map_err(StoreError::Unavailable)?;
        sqlx::query(
            "UPDATE sessions SET last_active_at = $1 \
             WHERE id = $2 AND ended_at IS NULL AND last_active_at <= $3",
        )
        .bind(now)
        .bind(session_id)
        .bind(now.saturating_sub(min_interval))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn refresh_session(
        &self,
        hash: &TokenHash,
        now: Millis,
    ) -> Result<Option<(String, bool)>, StoreError> {
        sqlx::query_as(REFRESH_SESSION)
            .bind(&hash.0[..])
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn rotate(&self, r: Rotation) -> Result<RotateOutcome, StoreError> {
        type Row = (
            String,
            Millis,
            Option<Millis>,
            Option<Vec<u8>>,
            String,
            Option<String>,
            Option<String>,
        );
        let mut tx = self.begin_write().await?;
        let row: Option<Row> = sqlx::query_as(
            "SELECT t.session_id, t.expires_at, t.rotated_at, t.successor, s.openid, u.unionid, \
             s.end_reason FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id \
             JOIN users u ON u.openid = s.openid WHERE t.hash = $1",
        )
        .bind(&r.old.0[..])
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some((session_id, expires_at, rotated_at, successor, openid, unionid, ended)) = row
        else {
            return Ok(RotateOutcome::NotFound);
        };
        if let Some(ended) = reason(ended)? {
            return Ok(RotateOutcome::Ended(ended));
        }
        let owner = Owner {
            openid,
            unionid,
            session_id,
        };
        if let Some(rotated_at) = rotated_at {
            return Ok(RotateOutcome::AlreadyRotated {
                owner,
                rotated_at,
                successor,
            });
        }
        if expires_at <= r.now {
            end_one(
                &mut tx,
                &owner.session_id,
                EndReason::Expired,
                None,
                expires_at,
            )
            .await?;
            tx.commit().await?;
            return Ok(RotateOutcome::Expired);
        }
        sqlx::query("UPDATE refresh_tokens SET rotated_at = $1, successor = $2 WHERE hash = $3")
            .bind(r.now)
            .bind(&r.successor)
            .bind(&r.old.0[..])
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        insert_tokens(&mut tx, &owner.session_id, r.access, r.refresh).await?;
        sqlx::query(
            "UPDATE sessions SET refresh_expires_at = $1, last_active_at = $2 WHERE id = $3",
        )
        .bind(r.refresh.1)
        .bind(r.now)
        .bind(&owner.session_id)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        record_event(
            &mut tx,
            &owner.openid,
            &owner.session_id,
            EventKind::Refresh,
            r.now,
        )
        .await?;
        tx.commit().await?;
        Ok(RotateOutcome::Rotated(owner))
    }

    async fn end_sessions(
        &self,
        target: EndTarget<'_>,
        reason: EndReason,
        now: Millis,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin_write().await?;
        let ids: Vec<String> = match target {
            EndTarget::Session(id) => vec![id.to_owned()],
            EndTarget::User(openid) => sqlx::query_as::<_, (String,)>(
                "SELECT id FROM sessions WHERE openid = $1 AND ended_at IS NULL",
            )
            .bind(openid)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
            .into_iter()
            .map(|(id,)| id)
            .collect(),
        };
        let mut ended = Vec::with_capacity(ids.len());
        for id in ids {
            if end_one(&mut tx, &id, reason, None, now).await? {
                ended.push(id);
            }
        }
        tx.commit().await?;
        Ok(ended)
    }

    async fn list_sessions(
        &self,
        openid: &str,
        now: Millis,
    ) -> Result<Vec<SessionInfo>, StoreError> {
        type Row = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Millis,
            Millis,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, device_id, device_platform, device_model, created_at, last_active_at \
             FROM sessions WHERE openid = $1 AND ended_at IS NULL AND refresh_expires_at > $2 \
             ORDER BY created_at DESC, id DESC",
        )
        .bind(openid)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows
            .into_iter()
            .map(
                |(id, d_id, d_platform, d_model, created_at, last_active_at)| SessionInfo {
                    id,
                    device: device(d_id, d_platform, d_model),
                    created_at,
                    last_active_at,
                },
            )
            .collect())
    }

    async fn user_exists(&self, openid: &str) -> Result<bool, StoreError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT 1 FROM users WHERE openid = $1")
            .bind(openid)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.is_some())
    }

    async fn list_events(
        &self,
        openid: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        type Row = (
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Millis,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT e.id, e.session_id, e.kind, e.reason, e.replaced_by_session, \
             e.replaced_by_device, e.at, s.device_id, s.device_platform, s.device_model \
             FROM session_events e LEFT JOIN sessions s ON s.id = e.session_id \
             WHERE e.openid = $1 AND ($2 IS NULL OR e.id < $2) ORDER BY e.id DESC LIMIT $3",
        )
        .bind(openid)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.into_iter()
            .map(
                |(id, session_id, kind, end, by_session, by_device, at, d_id, d_pf, d_model)| {
                    let kind = EventKind::from_stored(&kind).ok_or_else(|| {
                        StoreError::Other(anyhow::anyhow!("unknown event kind {kind:?}"))
                    })?;
                    Ok(SessionEvent {
                        id,
                        session_id,
                        kind,
                        reason: reason(end)?,
                        device: device(d_id, d_pf, d_model),
                        replaced_by_session: by_session,
                        replaced_by_device: by_device,
                        at,
                    })
                },
            )
            .collect()
    }

    async fn expire_sessions(&self, openid: Option<&str>, now: Millis) -> Result<u32, StoreError> {
        let mut tx = self.begin_write().await?;
        let n = expire_in(&mut tx, openid, now).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn purge(
        &self,
        now: Millis,
        keep: Millis,
        grace: Millis,
        batch: u32,
    ) -> Result<u64, StoreError> {
        let mut changed = 0;
        loop {
            // A write turn per batch: logins and refreshes take theirs in between.
            let mut tx = self.begin_write().await?;
            let counts = run_batch(&mut tx, purge_statements(now, keep, grace), batch).await?;
            tx.commit().await?;
            changed += counts.iter().sum::<u64>();
            if counts.iter().all(|&n| n < u64::from(batch)) {
                return Ok(changed);
            }
        }
    }

    async fn forget(&self, before: Millis, batch: u32) -> Result<(u64, u64), StoreError> {
        // One write turn for both: two short deletes by index, a batch each.
        let mut tx = self.begin_write().await?;
        let [events, sessions] = run_batch(
            &mut tx,
            [(FORGET_EVENTS, before), (FORGET_SESSIONS, before)],
            batch,
        )
        .await?;
        tx.commit().await?;
        Ok((events, sessions))
    }

    async fn session_keys(&self, openid: &str) -> Result<Option<SealedSessionKeys>, StoreError> {
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> =
            sqlx::query_as("SELECT session_key, prev_session_key FROM users WHERE openid = $1")
                .bind(openid)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(row.map(|(newest, previous)| SealedSessionKeys { newest, previous }))
    }

    async fn set_phone(
        &self,
        openid: &str,
        sealed: &[u8],
        now: Millis,
    ) -> Result<bool, StoreError> {
        let _turn = self.turn.take().await.map_err(StoreError::Unavailable)?;
        let done = sqlx::query(
            "UPDATE users SET phone = $2, phone_updated_at = $3, updated_at = $3 WHERE openid = $1",
        )
        .bind(openid)
        .bind(sealed)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn phone(&self, openid: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT phone FROM users WHERE openid = $1")
                .bind(openid)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(row.and_then(|(phone,)| phone))
    }

    async fn app_token(&self, appid: &str) -> Result<Option<StoredAppToken>, StoreError> {
        read_app_token(&self.pool, appid).await
    }

    async fn lock_app_token(&self, appid: &str) -> Result<Box<dyn AppTokenLock>, StoreError> {
        let held = tokio::time::timeout(TURN_WAIT, Arc::clone(&self.app_token).lock_owned())
            .await
            .map_err(|_| {
                StoreError::Unavailable(anyhow::anyhow!(
                    "the app's access_token stayed locked for {TURN_WAIT:?}"
                ))
            })?;
        let current = read_app_token(&self.pool, appid).await?;
        Ok(Box::new(SqliteAppTokenLock {
            store: self.clone(),
            _held: held,
            appid: appid.to_owned(),
            current,
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    #[test]
    fn busy_and_locked_are_told_by_their_extended_codes_too() {
        for code in ["5", "6", "261", "262", "517", "773"] {
            assert!(busy(Some(code)), "{code}");
        }
        // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CORRUPT, SQLITE_FULL, none: something is wrong.
        for code in [Some("2067"), Some("11"), Some("13"), None] {
            assert!(!busy(code), "{code:?}");
        }
    }

    /// Not a deadline on the behaviour: only how long a test waits before it calls a hang one.
    const HANG: Duration = Duration::from_secs(60);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_waiting_for_their_turn_leave_reads_answering() {
        // Arrange: a write in progress, in its turn, holding SQLite's lock.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = SqliteStore::open(&dir.path().join("auth.db"))
            .await
            .expect("the store");
        let turn = store.turn.take().await.expect("the turn");
        let mut writing = store.pool.acquire().await.expect("a connection");
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut *writing)
            .await
            .expect("the lock");

        // Act: more writes than the pool has connections wait behind it, each started
        // (polled once, so waiting on what it waits for) before the read.
        let mut started = Vec::new();
        let writes: Vec<_> = (0..12)
            .map(|_| {
                let store = store.clone();
                let (polled, start) = oneshot::channel();
                started.push(start);
                tokio::spawn(async move {
                    shared::saying_when_polled(store.expire_sessions(None, 1_000), polled).await
                })
            })
            .collect();
        for start in started {
            tokio::time::timeout(HANG, start)
                .await
                .expect("hang guard: a write never started")
                .expect("the write's task ran");
        }

        // Assert: a write waiting for its turn holds no connection, so a read gets one
        // (waiting in SQLite's busy handler, they held them all); it answers while every
        // write still waits, and the turn is still held.
        tokio::time::timeout(HANG, store.ping())
            .await
            .expect("hang guard: a read starved by writes waiting behind a write")
            .expect("ping");
        assert!(
            writes.iter().all(|w| !w.is_finished()),
            "a write ended before the first did: the read waited for it"
        );

        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *writing)
            .await
            .expect("unlock");
        drop(writing);
        drop(turn);
        for write in writes {
            write
                .await
                .expect("join")
                .expect("a write after the first ended");
        }
    }
}
