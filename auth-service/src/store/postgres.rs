//! The PostgreSQL store, for several replicas on one database.
//!
//! SQLite serializes writers; here row locks do that work, at READ COMMITTED:
//! - a login upserts its user and locks the user row (`FOR UPDATE`) before the policy
//!   decision, so two logins of one user decide one after the other, each seeing the
//!   sessions the other opened;
//! - a refresh-token exchange locks the token row, then the session row, so of two parallel
//!   exchanges of one token one rotates and the other finds it rotated (and its successor);
//! - every end is `UPDATE … WHERE ended_at IS NULL RETURNING`, feeding the event insert in
//!   the same statement, so concurrent ends of one session record one event.
//!
//! - the app's WeChat access_token row is locked `FOR UPDATE` while one replica renews it
//!   (created empty by the first lock, so that there is a row to lock); the others wait,
//!   then find the renewed token.
//!
//! Every transaction locks its user or token row before any session row, so a deadlock
//! needs two transactions ending several sessions in different orders, which is rare; one
//! (or a serialization failure) reruns the whole transaction, at most twice more.
//!
//! The pool connects lazily and the migrations run in the background
//! ([`PostgresStore::migrate_until_ready`]), so the service starts while PostgreSQL is
//! down; until they are applied every call answers [`StoreError::Unavailable`] and
//! [`Store::ready`] does not complete.

use std::future::Future;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use async_trait::async_trait;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    AccessRecord, AppTokenLock, EndTarget, FORGET_EVENTS, FORGET_SESSIONS, LoginOutcome, NewLogin,
    Owner, REFRESH_SESSION, RotateOutcome, Rotation, SealedSessionKeys, Store, StoreError,
    StoredAppToken, device, purge_statements, reason,
};
use crate::crypto::TokenHash;
use crate::domain::{
    EndReason, EventKind, LiveSession, Millis, SessionEvent, SessionInfo, plan_evictions,
};

/// The schema, embedded.
fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    // Replicas starting together take turns on [`MIGRATION_LOCK`] instead of sqlx's lock,
    // whose `pg_advisory_lock` waits inside a statement: `CREATE INDEX CONCURRENTLY` (0003
    // to 0008) waits for every open transaction, that waiting statement among them, while its
    // holder waits for the index: a deadlock, seen with two replicas starting at once.
    migrator.set_locking(false);
    migrator
}

/// The advisory lock (per database) a replica holds while it migrates; others poll for it
/// with `pg_try_advisory_lock`, holding no transaction open while they wait.
const MIGRATION_LOCK: i64 = 0x7778_6175_7468_0001;
/// How often a replica asks for [`MIGRATION_LOCK`] again while another migrates.
const MIGRATION_LOCK_POLL: Duration = Duration::from_millis(200);
/// The indexes the migrations build `CONCURRENTLY`, outside a transaction: a build cut short
/// (a pod restarted mid-migration, as a startup probe does to a slow one) leaves the index
/// behind, INVALID, and its migration unapplied, whose next run would then stop at "already
/// exists" for good. Such a leftover is dropped before the migrations run, under
/// [`MIGRATION_LOCK`], while no one else can be building it.
pub const CONCURRENT_INDEXES: [&str; 6] = [
    "refresh_tokens_successors_by_rotation",
    "sessions_live_by_refresh_expiry",
    "sessions_ended_by_time",
    "session_events_by_time",
    "access_tokens_by_session",
    "refresh_tokens_by_session",
];

/// How long a call waits for a connection (or for PostgreSQL to accept one).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// A pooled connection idle longer than this is pinged before use (a server restart or a
/// dropped idle connection is then noticed before a call's statement).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(30);
/// Longest statement, lock waits included; past it the call answers `Unavailable`.
const STATEMENT_TIMEOUT: &str = "5s";
/// A transaction left idle this long (a stalled replica) is ended, releasing its row locks.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "15s";
/// How long one migration attempt may take to connect.
const MIGRATION_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after the first failed migration attempt; doubled up to the maximum.
const MIGRATION_RETRY_FIRST: Duration = Duration::from_millis(500);
const MIGRATION_RETRY_MAX: Duration = Duration::from_secs(30);
/// Reruns of a transaction after a deadlock or serialization failure.
const TX_RETRIES: u32 = 2;
/// How long a replica waits for another's renewal of the app's access_token (which holds
/// the row while it asks WeChat), in place of [`STATEMENT_TIMEOUT`].
const APP_TOKEN_LOCK_WAIT: &str = "30s";
/// How long the renewer may hold the row while WeChat answers, in place of
/// [`IDLE_IN_TRANSACTION_TIMEOUT`].
const APP_TOKEN_LOCK_HOLD: &str = "60s";

/// The PostgreSQL-backed store. Clones share the pool and the readiness.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// For the migration's own connections: no statement timeout, since a migration may
    /// take long and waits for another replica's advisory lock.
    migration_options: PgConnectOptions,
    /// True once the migrations are applied.
    ready: Arc<watch::Sender<bool>>,
    /// `host:port/database`, for logs (never the password).
    target: Arc<str>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connect options hold the password: they stay out of Debug.
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("ready", &*self.ready.borrow())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Builds the store for `url` without connecting: the pool connects on first use (at most
    /// `max_connections` at a time), and nothing answers until [`Self::migrate`] succeeded.
    /// Call within a Tokio runtime.
    pub fn connect_lazy(url: &SecretString, max_connections: u32) -> anyhow::Result<Self> {
        // The parser's message could quote the URL, password included: it is dropped.
        let options = PgConnectOptions::from_str(url.expose_secret())
            .map_err(|_| anyhow!("not a valid PostgreSQL URL"))?
            .application_name("auth-service");
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        );
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // sqlx pings every connection it hands out by default: one more network round
            // trip per statement. Only a connection that sat idle for a while is pinged (a
            // failed ping closes it and the pool hands out another), as in api-service.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options.clone().options([
                ("statement_timeout", STATEMENT_TIMEOUT),
                (
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_TIMEOUT,
                ),
            ]));
        Ok(Self {
            pool,
            migration_options: options,
            ready: Arc::new(watch::Sender::new(false)),
            target: target.into(),
        })
    }

    /// Applies pending migrations once, on connections of its own; on success the store
    /// answers from then on.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        // A plain connection first says precisely why PostgreSQL cannot be reached (a pool
        // would only report that it timed out).
        let probe = tokio::time::timeout(
            MIGRATION_CONNECT_TIMEOUT,
            PgConnection::connect_with(&self.migration_options),
        )
        .await
        .context("timed out connecting to PostgreSQL")?
        // sqlx's message already quotes its source: flattened, it is said once.
        .map_err(|e| anyhow!("cannot connect to PostgreSQL: {e}"))?;
        if let Err(e) = probe.close().await {
            debug!(error = %e, "closing the probe connection failed");
        }
        // Two connections: one holds the migration lock, the migrator runs on the other (over
        // a `&mut PgConnection` its future cannot be spawned: "implementation of `Acquire` is
        // not general enough", sqlx #2016).
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(MIGRATION_CONNECT_TIMEOUT)
            .connect_lazy_with(self.migration_options.clone());
        let applied = async {
            let mut lock = pool.acquire().await?;
            while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .fetch_one(&mut *lock)
                .await?
            {
                tokio::time::sleep(MIGRATION_LOCK_POLL).await;
            }
            let leftovers: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::TEXT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE NOT i.indisvalid AND pg_table_is_visible(c.oid) AND c.relname = ANY($1)",
            )
            .bind(&CONCURRENT_INDEXES[..])
            .fetch_all(&mut *lock)
            .await?;
            for index in CONCURRENT_INDEXES.iter().filter(|i| leftovers.iter().any(|l| l == *i)) {
                warn!(%index, "dropping an index whose concurrent build was cut short; it is built again");
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {index}"
                )))
                .execute(&mut *lock)
                .await?;
            }
            let history = shared::migrations::applied_postgres(&pool)
                .await
                .map_err(|e| anyhow!("cannot read the PostgreSQL migration history: {e:#}"))?;
            let mut migrator = migrator();
            shared::migrations::prepare(
                &history,
                &mut migrator,
                "auth-service (AUTH_DATABASE_URL)",
            )
            .map_err(|e| anyhow!("cannot apply the PostgreSQL migrations: {e}"))?;
            migrator
                .run(&pool)
                .await
                .map_err(|e| anyhow!("cannot apply the PostgreSQL migrations: {e}"))?;
            // Released with its connection too, should this fail.
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *lock)
                .await?;
            anyhow::Ok(())
        }
        .await;
        pool.close().await;
        applied?;
        self.ready.send_replace(true);
        Ok(())
    }

    /// Retries [`Self::migrate`] with growing pauses until it succeeds, logging each failed
    /// attempt. Runs in the background from start-up.
    pub async fn migrate_until_ready(&self) {
        let mut pause = MIGRATION_RETRY_FIRST;
        let mut attempt: u32 = 1;
        loop {
            match self.migrate().await {
                Ok(()) => {
                    info!(database = %self.target, "PostgreSQL migrations applied; the store is ready");
                    return;
                }
                Err(e) => {
                    warn!(
                        database = %self.target,
                        attempt,
                        error = %format_args!("{e:#}"),
                        retry_in = ?pause,
                        "PostgreSQL is not ready; trying again"
                    );
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MIGRATION_RETRY_MAX);
            attempt = attempt.saturating_add(1);
        }
    }

    /// Whether the migrations are applied.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    fn check_ready(&self) -> Result<(), StoreError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(anyhow!(
                "the PostgreSQL schema is not migrated yet"
            )))
        }
    }

    /// Runs `attempt` (one whole transaction) once the store is ready, again after a
    /// deadlock or serialization failure (at most [`TX_RETRIES`] more times).
    async fn transaction<T, F, Fut>(&self, what: &'static str, attempt: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, TxError>>,
    {
        self.check_ready()?;
        let mut retries = 0;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(TxError::Db(e)) if retries < TX_RETRIES && is_conflict(&e) => {
                    retries += 1;
                    debug!(what, retries, error = %e, "transaction conflict; running it again");
                }
                Err(TxError::Db(e)) => return Err(map_err(e)),
                Err(TxError::Store(e)) => return Err(e),
            }
        }
    }
}

/// How a transaction attempt failed: in the database (maybe worth rerunning), or not.
#[derive(Debug)]
enum TxError {
    Db(sqlx::Error),
    Store(StoreError),
}

impl From<sqlx::Error> for TxError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// serialization_failure (40001) or deadlock_detected (40P01): the transaction was rolled
/// back and may simply be run again.
fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(sqlstate(e).as_deref(), Some("40001" | "40P01"))
}

/// Sorts sqlx errors into "retry later" and "something is wrong", by kind and SQLSTATE,
/// never by message text.
fn map_err(e: sqlx::Error) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate(&e).is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources (too many connections,
            // out of memory, disk full); 57P: shutdown or cannot connect now; 57014:
            // statement timeout; 55P03: lock not available; 25P03: idle-in-transaction
            // timeout; 40001/40P01: conflicts that outlasted the reruns.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || matches!(
                    code.as_str(),
                    "57014" | "55P03" | "25P03" | "40001" | "40P01"
                )
        }),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(e.into())
    } else {
        StoreError::Other(e.into())
    }
}

/// Which live sessions [`end_sessions_where`] ends.
enum Ending<'a> {
    /// These ids.
    Ids(&'a [String]),
    /// Every live session of this user.
    User(&'a str),
}

/// Ends the matching live sessions with `reason` at `at` and records one `end` event for
/// each, in one statement; returns the ids it ended. A session ended meanwhile by another
/// transaction no longer matches `ended_at IS NULL` once its lock is released, so it is
/// neither ended nor recorded twice.
async fn end_sessions_where(
    conn: &mut PgConnection,
    which: Ending<'_>,
    reason: EndReason,
    replaced_by: Option<(&str, Option<&str>)>,
    at: Millis,
) -> Result<Vec<String>, sqlx::Error> {
    const BY_IDS: &str = "WITH ended AS (\
         UPDATE sessions SET ended_at = $1, end_reason = $2 \
         WHERE id = ANY($3) AND ended_at IS NULL RETURNING id, openid, created_at) \
         INSERT INTO session_events \
         (openid, session_id, kind, reason, replaced_by_session, replaced_by_device, at) \
         SELECT openid, id, $4, $2, $5, $6, $1 FROM ended ORDER BY created_at, id \
         RETURNING session_id";
    const BY_USER: &str = "WITH ended AS (\
         UPDATE sessions SET ended_at = $1, end_reason = $2 \
         WHERE openid = $3 AND ended_at IS NULL RETURNING id, openid, created_at) \
         INSERT INTO session_events \
         (openid, session_id, kind, reason, replaced_by_session, replaced_by_device, at) \
         SELECT openid, id, $4, $2, $5, $6, $1 FROM ended ORDER BY created_at, id \
         RETURNING session_id";
    let query = match which {
        Ending::Ids(ids) => sqlx::query_as(BY_IDS)
            .bind(at)
            .bind(reason.as_str())
            .bind(ids),
        Ending::User(openid) => sqlx::query_as(BY_USER)
            .bind(at)
            .bind(reason.as_str())
            .bind(openid),
    };
    let ended: Vec<(String,)> = query
        .bind(EventKind::End.as_str())
        .bind(replaced_by.map(|r| r.0))
        .bind(replaced_by.and_then(|r| r.1))
        .fetch_all(&mut *conn)
        .await?;
    Ok(ended.into_iter().map(|(id,)| id).collect())
}

async fn record_event(
    conn: &mut PgConnection,
    openid: &str,
    session_id: &str,
    kind: EventKind,
    at: Millis,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO session_events (openid, session_id, kind, at) VALUES ($1, $2, $3, $4)",
    )
    .bind(openid)
    .bind(session_id)
    .bind(kind.as_str())
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The expiry statement of [`expire_in`]: marks at most 1000 live sessions past their
/// refresh expiry (`$1`: now) as ended (`$3`: the reason) and records each end (`$4`: the
/// event's kind), narrowed by `$whose`. The outer conditions are checked again on rows
/// another transaction changed meanwhile: a session ended or extended concurrently is left
/// alone.
macro_rules! expire {
    ($whose:literal) => {
        concat!(
            "WITH ended AS (\
             UPDATE sessions SET ended_at = refresh_expires_at, end_reason = $3 \
             WHERE id IN (SELECT id FROM sessions WHERE ended_at IS NULL \
             AND refresh_expires_at <= $1 ",
            $whose,
            " ORDER BY id LIMIT 1000) \
             AND ended_at IS NULL AND refresh_expires_at <= $1 \
             RETURNING id, openid, ended_at, created_at) \
             INSERT INTO session_events (openid, session_id, kind, reason, at) \
             SELECT openid, id, $4, $3, ended_at FROM ended ORDER BY created_at, id \
             RETURNING session_id"
        )
    };
}

/// [`expire_in`] for one user (`$2`: the openid), as a login runs it.
const EXPIRE_USERS_SESSIONS: &str = expire!("AND openid = $2");

/// [`expire_in`] for everyone (`$2`: NULL), as housekeeping runs it (public for the test
/// that checks it finds its rows by index).
pub const EXPIRE_DUE_SESSIONS: &str = expire!("AND $2::TEXT IS NULL");

/// Marks sessions past their refresh expiry as ended (`expired`, at that instant), at most
/// 1000 per call, with their events; returns how many.
async fn expire_in(
    conn: &mut PgConnection,
    openid: Option<&str>,
    now: Millis,
) -> Result<u32, sqlx::Error> {
    // Two statements, not one with `($2 IS NULL OR openid = $2)`: a generic plan cannot use
    // the user's index through that OR, so a login could scan every live session.
    let statement = match openid {
        Some(_) => EXPIRE_USERS_SESSIONS,
        None => EXPIRE_DUE_SESSIONS,
    };
    let ended: Vec<(String,)> = sqlx::query_as(statement)
        .bind(now)
        .bind(openid)
        .bind(EndReason::Expired.as_str())
        .bind(EventKind::End.as_str())
        .fetch_all(&mut *conn)
        .await?;
    Ok(u32::try_from(ended.len()).unwrap_or(u32::MAX))
}

async fn insert_tokens(
    conn: &mut PgConnection,
    session_id: &str,
    access: (TokenHash, Millis),
    refresh: (TokenHash, Millis),
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO access_tokens (hash, session_id, expires_at) VALUES ($1, $2, $3)")
        .bind(&access.0.0[..])
        .bind(session_id)
        .bind(access.1)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO refresh_tokens (hash, session_id, expires_at) VALUES ($1, $2, $3)")
        .bind(&refresh.0.0[..])
        .bind(session_id)
        .bind(refresh.1)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl PostgresStore {
    async fn login_once(&self, l: &NewLogin) -> Result<LoginOutcome, TxError> {
        let mut tx = self.pool.begin().await?;

        let is_new_user = sqlx::query(
            "INSERT INTO users (openid, unionid, session_key, session_key_fp, \
             session_key_updated_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5, $5) ON CONFLICT (openid) DO NOTHING",
        )
        .bind(&l.openid)
        .bind(&l.unionid)
        .bind(&l.session_key_sealed)
        .bind(&l.session_key_fp[..])
        .bind(l.now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        // The user row's lock serializes the logins of one user: a second one waits here
        // until this one commits, then sees the session it opened.
        let (old_unionid, old_fp): (Option<String>, Vec<u8>) = sqlx::query_as(
            "SELECT unionid, session_key_fp FROM users WHERE openid = $1 FOR UPDATE",
        )
        .bind(&l.openid)
        .fetch_one(&mut *tx)
        .await?;
        let unionid = if is_new_user {
            l.unionid.clone()
        } else {
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
                .await?;
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
                .await?;
            }
            unionid
        };

        expire_in(&mut tx, Some(&l.openid), l.now).await?;
        let live: Vec<(String, Option<String>, Millis)> = sqlx::query_as(
            "SELECT id, device_id, created_at FROM sessions WHERE openid = $1 AND ended_at IS NULL",
        )
        .bind(&l.openid)
        .fetch_all(&mut *tx)
        .await?;
        let live: Vec<LiveSession> = live
            .into_iter()
            .map(|(id, device_id, created_at)| LiveSession {
                id,
                device_id,
                created_at,
            })
            .collect();
        let planned = plan_evictions(l.policy, &live, l.device.id());
        let mut replaced = Vec::new();
        if !planned.is_empty() {
            let ended = end_sessions_where(
                &mut tx,
                Ending::Ids(&planned),
                EndReason::Replaced,
                Some((l.session_id.as_str(), l.device.id())),
                l.now,
            )
            .await?;
            // In the policy's order, as the SQLite store reports them.
            replaced = planned
                .into_iter()
                .filter(|id| ended.contains(id))
                .collect();
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
        .await?;
        insert_tokens(&mut tx, &l.session_id, l.access, l.refresh).await?;
        record_event(&mut tx, &l.openid, &l.session_id, EventKind::Login, l.now).await?;
        tx.commit().await?;
        Ok(LoginOutcome {
            is_new_user,
            unionid,
            replaced,
        })
    }

    async fn rotate_once(&self, r: &Rotation) -> Result<RotateOutcome, TxError> {
        /// session_id, expires_at, rotated_at, successor.
        type TokenRow = (String, Millis, Option<Millis>, Option<Vec<u8>>);
        let mut tx = self.pool.begin().await?;
        // The token row's lock serializes the exchanges of one token, on every replica:
        // a second one waits here, then reads the rotation the first committed.
        let token: Option<TokenRow> = sqlx::query_as(
            "SELECT session_id, expires_at, rotated_at, successor FROM refresh_tokens \
             WHERE hash = $1 FOR UPDATE",
        )
        .bind(&r.old.0[..])
        .fetch_optional(&mut *tx)
        .await?;
        let Some((session_id, expires_at, rotated_at, successor)) = token else {
            tx.commit().await?;
            return Ok(RotateOutcome::NotFound);
        };
        // Then the session's: an end running meanwhile either committed before (and is
        // seen here) or waits for this exchange.
        let (openid, unionid, ended): (String, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT s.openid, u.unionid, s.end_reason FROM sessions s \
             JOIN users u ON u.openid = s.openid WHERE s.id = $1 FOR NO KEY UPDATE OF s",
        )
        .bind(&session_id)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(ended) = reason(ended)? {
            tx.commit().await?;
            return Ok(RotateOutcome::Ended(ended));
        }
        let owner = Owner {
            openid,
            unionid,
            session_id,
        };
        if let Some(rotated_at) = rotated_at {
            tx.commit().await?;
            return Ok(RotateOutcome::AlreadyRotated {
                owner,
                rotated_at,
                successor,
            });
        }
        if expires_at <= r.now {
            end_sessions_where(
                &mut tx,
                Ending::Ids(std::slice::from_ref(&owner.session_id)),
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
            .await?;
        insert_tokens(&mut tx, &owner.session_id, r.access, r.refresh).await?;
        sqlx::query(
            "UPDATE sessions SET refresh_expires_at = $1, last_active_at = $2 WHERE id = $3",
        )
        .bind(r.refresh.1)
        .bind(r.now)
        .bind(&owner.session_id)
        .execute(&mut *tx)
        .await?;
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

    async fn end_sessions_once(
        &self,
        target: EndTarget<'_>,
        reason: EndReason,
        now: Millis,
    ) -> Result<Vec<String>, TxError> {
        let mut tx = self.pool.begin().await?;
        let ended = match target {
            EndTarget::Session(id) => {
                let ids = [id.to_owned()];
                end_sessions_where(&mut tx, Ending::Ids(&ids), reason, None, now).await?
            }
            EndTarget::User(openid) => {
                end_sessions_where(&mut tx, Ending::User(openid), reason, None, now).await?
            }
        };
        tx.commit().await?;
        Ok(ended)
    }

    async fn expire_sessions_once(
        &self,
        openid: Option<&str>,
        now: Millis,
    ) -> Result<u32, TxError> {
        let mut tx = self.pool.begin().await?;
        let n = expire_in(&mut tx, openid, now).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// One batch of [`Store::purge`]: how many rows changed, and whether a statement found a
    /// full batch (more may be due).
    async fn purge_once(
        &self,
        now: Millis,
        keep: Millis,
        grace: Millis,
        batch: u32,
    ) -> Result<(u64, bool), TxError> {
        let mut tx = self.pool.begin().await?;
        let counts = run_batch(&mut tx, purge_statements(now, keep, grace), batch).await?;
        tx.commit().await?;
        let full = counts.iter().any(|&n| n >= u64::from(batch));
        Ok((counts.iter().sum(), full))
    }
}

/// Runs each `(statement, $1)` of housekeeping's with `$2` the batch, in order, on `conn`;
/// how many rows each changed.
async fn run_batch<const N: usize>(
    conn: &mut PgConnection,
    statements: [(&'static str, Millis); N],
    batch: u32,
) -> Result<[u64; N], sqlx::Error> {
    let mut changed = [0; N];
    for (n, (sql, before)) in changed.iter_mut().zip(statements) {
        *n = sqlx::query(sql)
            .bind(before)
            .bind(i64::from(batch))
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    Ok(changed)
}

/// The app's access_token row, locked `FOR UPDATE` by an open transaction. Dropped without
/// [`AppTokenLock::replace`] or [`AppTokenLock::release`], the transaction rolls back when its
/// connection returns to the pool, releasing the row.
struct PgAppTokenLock {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    appid: String,
    current: Option<StoredAppToken>,
}

#[async_trait]
impl AppTokenLock for PgAppTokenLock {
    fn current(&self) -> Option<&StoredAppToken> {
        self.current.as_ref()
    }

    async fn replace(
        mut self: Box<Self>,
        sealed: Vec<u8>,
        expires_at: Millis,
        now: Millis,
    ) -> Result<StoredAppToken, StoreError> {
        let (generation,): (i64,) = sqlx::query_as(
            "UPDATE wechat_access_tokens SET token = $2, expires_at = $3, \
             generation = generation + 1, updated_at = $4 WHERE appid = $1 RETURNING generation",
        )
        .bind(&self.appid)
        .bind(&sealed)
        .bind(expires_at)
        .bind(now)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(map_err)?;
        self.tx.commit().await.map_err(map_err)?;
        Ok(StoredAppToken {
            sealed,
            expires_at,
            renewed_at: now,
            generation,
        })
    }

    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        // Commits the empty row the first lock may have created.
        self.tx.commit().await.map_err(map_err)
    }
}

/// A stored token row's columns (`token, expires_at, updated_at, generation`).
type AppTokenRow = (Option<Vec<u8>>, Option<Millis>, Option<Millis>, i64);

/// A stored token row: the token is NULL (and generation 0) before the first one.
fn app_token_row(row: Option<AppTokenRow>) -> Option<StoredAppToken> {
    match row? {
        (Some(sealed), Some(expires_at), renewed_at, generation) => Some(StoredAppToken {
            sealed,
            expires_at,
            renewed_at: renewed_at.unwrap_or(0),
            generation,
        }),
        _ => None,
    }
}

impl PostgresStore {
    async fn lock_app_token_once(&self, appid: &str) -> Result<PgAppTokenLock, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // SET LOCAL takes no parameters; both values are constants of this file.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL statement_timeout = '{APP_TOKEN_LOCK_WAIT}'"
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL idle_in_transaction_session_timeout = '{APP_TOKEN_LOCK_HOLD}'"
        )))
        .execute(&mut *tx)
        .await?;
        // A row to lock even before the first token: two first renewals then queue on it
        // (a second insert of the same appid waits for the first to commit, then does
        // nothing) instead of both finding nothing to lock.
        sqlx::query(
            "INSERT INTO wechat_access_tokens (appid) VALUES ($1) ON CONFLICT (appid) DO NOTHING",
        )
        .bind(appid)
        .execute(&mut *tx)
        .await?;
        let row: AppTokenRow = sqlx::query_as(
            "SELECT token, expires_at, updated_at, generation FROM wechat_access_tokens \
             WHERE appid = $1 FOR UPDATE",
        )
        .bind(appid)
        .fetch_one(&mut *tx)
        .await?;
        Ok(PgAppTokenLock {
            tx,
            appid: appid.to_owned(),
            current: app_token_row(Some(row)),
        })
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn login(&self, l: NewLogin) -> Result<LoginOutcome, StoreError> {
        self.transaction("login", || self.login_once(&l)).await
    }

    async fn refresh_session(
        &self,
        hash: &TokenHash,
        now: Millis,
    ) -> Result<Option<(String, bool)>, StoreError> {
        self.check_ready()?;
        sqlx::query_as(REFRESH_SESSION)
            .bind(&hash.0[..])
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)
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
        self.check_ready()?;
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
        self.check_ready()?;
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

    async fn rotate(&self, r: Rotation) -> Result<RotateOutcome, StoreError> {
        self.transaction("rotate", || self.rotate_once(&r)).await
    }

    async fn end_sessions(
        &self,
        target: EndTarget<'_>,
        reason: EndReason,
        now: Millis,
    ) -> Result<Vec<String>, StoreError> {
        self.transaction("end_sessions", || {
            self.end_sessions_once(target, reason, now)
        })
        .await
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
        self.check_ready()?;
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
        self.check_ready()?;
        let (exists,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM users WHERE openid = $1)")
                .bind(openid)
                .fetch_one(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(exists)
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
        self.check_ready()?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT e.id, e.session_id, e.kind, e.reason, e.replaced_by_session, \
             e.replaced_by_device, e.at, s.device_id, s.device_platform, s.device_model \
             FROM session_events e LEFT JOIN sessions s ON s.id = e.session_id \
             WHERE e.openid = $1 AND ($2::BIGINT IS NULL OR e.id < $2) \
             ORDER BY e.id DESC LIMIT $3",
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
                    let kind = EventKind::from_stored(&kind)
                        .ok_or_else(|| StoreError::Other(anyhow!("unknown event kind {kind:?}")))?;
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
        self.transaction("expire_sessions", || self.expire_sessions_once(openid, now))
            .await
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
            let (n, full) = self
                .transaction("purge", || self.purge_once(now, keep, grace, batch))
                .await?;
            changed += n;
            if !full {
                return Ok(changed);
            }
        }
    }

    async fn forget(&self, before: Millis, batch: u32) -> Result<(u64, u64), StoreError> {
        self.check_ready()?;
        // Two short deletes by index, a batch each, in one transaction: all or nothing.
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let [events, sessions] = run_batch(
            &mut tx,
            [(FORGET_EVENTS, before), (FORGET_SESSIONS, before)],
            batch,
        )
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok((events, sessions))
    }

    async fn session_keys(&self, openid: &str) -> Result<Option<SealedSessionKeys>, StoreError> {
        self.check_ready()?;
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
        self.check_ready()?;
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
        self.check_ready()?;
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT phone FROM users WHERE openid = $1")
                .bind(openid)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(row.and_then(|(phone,)| phone))
    }

    async fn app_token(&self, appid: &str) -> Result<Option<StoredAppToken>, StoreError> {
        self.check_ready()?;
        let row: Option<AppTokenRow> = sqlx::query_as(
            "SELECT token, expires_at, updated_at, generation FROM wechat_access_tokens \
             WHERE appid = $1",
        )
        .bind(appid)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(app_token_row(row))
    }

    async fn lock_app_token(&self, appid: &str) -> Result<Box<dyn AppTokenLock>, StoreError> {
        self.check_ready()?;
        let lock = self.lock_app_token_once(appid).await.map_err(map_err)?;
        Ok(Box::new(lock))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check_ready()?;
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as `self`: this only ends when the store is ready.
        let _ = ready.wait_for(|ready| *ready).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::postgres::DEFAULT_POOL_SIZE;

    fn store(url: &str) -> PostgresStore {
        PostgresStore::connect_lazy(&SecretString::from(url.to_owned()), DEFAULT_POOL_SIZE)
            .expect("valid URL")
    }

    #[tokio::test]
    async fn answers_unavailable_until_migrated() {
        // Nothing listens on port 1: nothing is connected at build time either.
        let s = store("postgres://auth:pw-secret@127.0.0.1:1/auth");
        assert!(!s.is_ready());
        assert!(matches!(s.ping().await, Err(StoreError::Unavailable(_))));
        assert!(matches!(
            s.user_exists("o").await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_failed_migration_says_why_without_the_password() {
        let s = store("postgres://auth:pw-secret@127.0.0.1:1/auth");
        let err = s.migrate().await.expect_err("nothing listens on port 1");
        let shown = format!("{err:#} {err:?}");
        assert!(shown.contains("PostgreSQL"), "{shown}");
        assert!(!shown.contains("pw-secret"), "{shown}");
        assert!(!s.is_ready());
    }

    #[tokio::test]
    async fn the_pool_is_as_large_as_asked() {
        let url = SecretString::from("postgres://auth@db.internal:5432/wxauth".to_owned());
        for size in [1, DEFAULT_POOL_SIZE, 40] {
            let s = PostgresStore::connect_lazy(&url, size).expect("valid URL");
            assert_eq!(s.pool.options().get_max_connections(), size);
        }
    }

    #[tokio::test]
    async fn debug_output_hides_the_password() {
        let s = store("postgresql://auth:pw-secret@db.internal:6432/wxauth");
        let shown = format!("{s:?}");
        assert!(shown.contains("db.internal:6432/wxauth"), "{shown}");
        assert!(!shown.contains("pw-secret"), "{shown}");
    }

    #[test]
    fn a_malformed_url_is_refused_without_echoing_it() {
        let err = PostgresStore::connect_lazy(
            &SecretString::from("postgres://auth:pw-secret@host:port/db".to_owned()),
            DEFAULT_POOL_SIZE,
        )
        .expect_err("bad port");
        assert!(!format!("{err:#}").contains("pw-secret"));
    }

    /// A database error with a given SQLSTATE, as PostgreSQL would report it.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            "coded"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn coded(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Coded(code)))
    }

    /// A store that counts as migrated, without a database behind it.
    fn ready_store() -> PostgresStore {
        let s = store("postgres://auth@127.0.0.1:1/auth");
        s.ready.send_replace(true);
        s
    }

    /// Runs `transaction` over attempts that fail with `codes` in turn, then succeed;
    /// returns the result and how many attempts ran.
    async fn attempts(codes: &[&'static str]) -> (Result<u32, StoreError>, usize) {
        let s = ready_store();
        let n = std::sync::atomic::AtomicUsize::new(0);
        let result = s
            .transaction("test", || async {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match codes.get(i) {
                    Some(code) => Err(TxError::Db(coded(code))),
                    None => Ok(7),
                }
            })
            .await;
        (result, n.into_inner())
    }

    #[tokio::test]
    async fn a_deadlock_or_serialization_failure_reruns_the_transaction() {
        let (result, runs) = attempts(&["40P01", "40001"]).await;
        assert_eq!(result.expect("third run succeeds"), 7);
        assert_eq!(runs, 3);
    }

    #[tokio::test]
    async fn conflicts_past_the_reruns_are_unavailable() {
        let (result, runs) = attempts(&["40001", "40001", "40001", "40001"]).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert_eq!(runs, 3);
    }

    #[tokio::test]
    async fn other_database_errors_are_not_rerun() {
        let (result, runs) = attempts(&["23505"]).await;
        assert!(matches!(result, Err(StoreError::Other(_))), "{result:?}");
        assert_eq!(runs, 1);
    }

    #[test]
    fn outages_are_unavailable_by_kind_and_sqlstate() {
        let unavailable = [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
            coded("08006"), // connection failure
            coded("53300"), // too many connections
            coded("57P01"), // admin shutdown
            coded("57014"), // statement timeout
        ];
        for e in unavailable {
            let shown = e.to_string();
            assert!(matches!(map_err(e), StoreError::Unavailable(_)), "{shown}");
        }
        for e in [sqlx::Error::RowNotFound, coded("23505"), coded("42P01")] {
            let shown = e.to_string();
            assert!(matches!(map_err(e), StoreError::Other(_)), "{shown}");
        }
    }
}
