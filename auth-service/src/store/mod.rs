//! Durable state: users (with their sealed session_keys and phone number), sessions, token
//! hashes, the session timeline, and the app's sealed WeChat access_token.
//!
//! One app-level trait, [`Store`], with a backend per database, each with its own
//! migrations; every method is one transaction, so a crash never leaves half a login or
//! half a rotation behind. The embedded default is SQLite ([`sqlite::SqliteStore`]);
//! several replicas share PostgreSQL ([`postgres::PostgresStore`]).

pub mod postgres;
pub mod spanned;
pub mod sqlite;

use async_trait::async_trait;

use crate::crypto::TokenHash;
use crate::domain::{Device, EndReason, Millis, SessionEvent, SessionInfo, SessionPolicy};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded: retrying later may work.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] anyhow::Error),
    /// Anything else: a bug, a constraint, corrupt data.
    #[error("database error: {0}")]
    Other(#[source] anyhow::Error),
}

/// Everything a successful WeChat login writes, in one transaction.
#[derive(Debug)]
pub struct NewLogin {
    /// The user's openid.
    pub openid: String,
    /// The user's unionid, if WeChat gave one.
    pub unionid: Option<String>,
    /// The new session_key, sealed with the openid as context.
    pub session_key_sealed: Vec<u8>,
    /// Keyed fingerprint of the new session_key.
    pub session_key_fp: [u8; 32],
    /// The new session's id.
    pub session_id: String,
    /// Its device.
    pub device: Device,
    /// Hash of its access token, and the token's expiry.
    pub access: (TokenHash, Millis),
    /// Hash of its refresh token, and the token's expiry.
    pub refresh: (TokenHash, Millis),
    /// Which other sessions the login pushes out.
    pub policy: SessionPolicy,
    /// The login's instant.
    pub now: Millis,
}

/// What a login did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginOutcome {
    /// True when the user was created by this login.
    pub is_new_user: bool,
    /// The user's unionid after the login (WeChat's, or the one known before).
    pub unionid: Option<String>,
    /// The sessions it pushed out.
    pub replaced: Vec<String>,
}

/// An access token found by its hash, with its session's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    /// The user's openid.
    pub openid: String,
    /// The user's unionid.
    pub unionid: Option<String>,
    /// The session.
    pub session_id: String,
    /// The token's expiry.
    pub expires_at: Millis,
    /// When the session was last used.
    pub last_active_at: Millis,
    /// Why the session ended, if it did.
    pub ended: Option<EndReason>,
    /// When the session's refresh token expires (the session is over past it).
    pub refresh_expires_at: Millis,
}

/// One refresh-token exchange, prepared by the caller.
#[derive(Debug)]
pub struct Rotation {
    /// Hash of the presented refresh token.
    pub old: TokenHash,
    /// Hash and expiry of the new access token.
    pub access: (TokenHash, Millis),
    /// Hash and expiry of the new refresh token.
    pub refresh: (TokenHash, Millis),
    /// The new pair, sealed under the presented token, for retries within the grace window.
    pub successor: Vec<u8>,
    /// The exchange's instant.
    pub now: Millis,
}

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The user's openid.
    pub openid: String,
    /// The user's unionid.
    pub unionid: Option<String>,
    /// The session.
    pub session_id: String,
}

/// What a refresh-token exchange found.
#[derive(Debug)]
pub enum RotateOutcome {
    /// Rotated now: the new pair is stored.
    Rotated(Owner),
    /// Rotated before, at `rotated_at`; `successor` is the sealed pair (None once cleared).
    AlreadyRotated {
        /// Whose session.
        owner: Owner,
        /// When it was rotated.
        rotated_at: Millis,
        /// The sealed successor pair, while kept.
        successor: Option<Vec<u8>>,
    },
    /// The session had ended.
    Ended(EndReason),
    /// The refresh token expired.
    Expired,
    /// No such refresh token.
    NotFound,
}

/// A user's two latest session_keys as stored: each sealed with the openid as context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSessionKeys {
    /// The newest.
    pub newest: Vec<u8>,
    /// The one before it, once there has been a rotation.
    pub previous: Option<Vec<u8>>,
}

/// The app's WeChat access_token as stored (one row per appid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAppToken {
    /// The token, sealed with the appid as context.
    pub sealed: Vec<u8>,
    /// When WeChat said it expires.
    pub expires_at: Millis,
    /// When WeChat answered it (the renewal that stored it; 0 if unknown).
    pub renewed_at: Millis,
    /// Counts the renewals: 1 for the first token stored, one more each time it is replaced.
    /// Two readers holding the same generation hold the same token.
    pub generation: i64,
}

/// The app's access_token row, held exclusively: every other [`Store::lock_app_token`], on
/// any replica, waits until this one is replaced or released (or dropped, which releases
/// it). Held while WeChat is asked for a new token, so that one replica asks at a time and
/// the others find its answer when they get their turn.
#[async_trait]
pub trait AppTokenLock: Send {
    /// The token as it is now that the lock is held; `None` before the first one.
    fn current(&self) -> Option<&StoredAppToken>;

    /// Stores a new token as the next generation and releases the lock.
    async fn replace(
        self: Box<Self>,
        sealed: Vec<u8>,
        expires_at: Millis,
        now: Millis,
    ) -> Result<StoredAppToken, StoreError>;

    /// Releases the lock, changing nothing.
    async fn release(self: Box<Self>) -> Result<(), StoreError>;
}

/// Which sessions to end.
#[derive(Debug, Clone, Copy)]
pub enum EndTarget<'a> {
    /// One session.
    Session(&'a str),
    /// Every live session of a user.
    User(&'a str),
}

/// The durable store.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Upserts the user (rotating the session_key), pushes out sessions as the policy says,
    /// and opens the new session with its two tokens.
    async fn login(&self, login: NewLogin) -> Result<LoginOutcome, StoreError>;

    /// Finds an access token by hash.
    async fn find_access(&self, hash: &TokenHash) -> Result<Option<AccessRecord>, StoreError>;

    /// Moves a session's last_active_at to `now` if it is older than `now - min_interval`.
    async fn touch(
        &self,
        session_id: &str,
        now: Millis,
        min_interval: Millis,
    ) -> Result<(), StoreError>;

    /// The session of a refresh token found by hash, and whether presenting it at `now`
    /// would rotate it: not rotated yet (else the rotation answers the successor or ends
    /// the session, writing no new tokens), not expired, its session not ended; `None` for
    /// an unknown token.
    async fn refresh_session(
        &self,
        hash: &TokenHash,
        now: Millis,
    ) -> Result<Option<(String, bool)>, StoreError>;

    /// Exchanges a refresh token, once.
    async fn rotate(&self, rotation: Rotation) -> Result<RotateOutcome, StoreError>;

    /// Ends live sessions with `reason`; returns the ids of those it ended.
    async fn end_sessions(
        &self,
        target: EndTarget<'_>,
        reason: EndReason,
        now: Millis,
    ) -> Result<Vec<String>, StoreError>;

    /// The user's live sessions, newest first.
    async fn list_sessions(
        &self,
        openid: &str,
        now: Millis,
    ) -> Result<Vec<SessionInfo>, StoreError>;

    /// Whether the user exists.
    async fn user_exists(&self, openid: &str) -> Result<bool, StoreError>;

    /// The user's timeline, newest first, events older than `before` (an event id) when given.
    async fn list_events(
        &self,
        openid: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<SessionEvent>, StoreError>;

    /// Records the end (reason `expired`) of sessions whose refresh token expired, for one
    /// user or for everyone, at most [`EXPIRE_BATCH`] of them; returns how many (the caller
    /// calls again while that many were ended).
    async fn expire_sessions(&self, openid: Option<&str>, now: Millis) -> Result<u32, StoreError>;

    /// Deletes token rows dead for longer than `keep` and clears successor pairs older than
    /// `grace` plus [`SUCCESSOR_MARGIN`] ([`successors_rotated_before`]), at most `batch`
    /// rows of each a transaction ([`PURGE_ACCESS`], [`PURGE_REFRESH`],
    /// [`CLEAR_SUCCESSORS`]), until a transaction finds none of them full: after a backlog
    /// (a long stop, a failing housekeeping), one statement for everything due would outlast
    /// PostgreSQL's statement_timeout every time, or hold SQLite's write turn for as long.
    /// Returns how many rows changed.
    async fn purge(
        &self,
        now: Millis,
        keep: Millis,
        grace: Millis,
        batch: u32,
    ) -> Result<u64, StoreError>;

    /// Deletes, oldest first, at most `batch` timeline events recorded before `before` and
    /// at most `batch` sessions that ended before it ([`FORGET_EVENTS`],
    /// [`FORGET_SESSIONS`]); returns how many of each. The caller calls again while a
    /// batch came back full. A session whose token rows are still there (not yet purged)
    /// is skipped, and deleted by a later call.
    async fn forget(&self, before: Millis, batch: u32) -> Result<(u64, u64), StoreError>;

    /// The user's newest and previous session_keys, sealed; `None` for an unknown user.
    async fn session_keys(&self, openid: &str) -> Result<Option<SealedSessionKeys>, StoreError>;

    /// Keeps the user's phone number (sealed, the openid as context), replacing any before;
    /// false when there is no such user.
    async fn set_phone(&self, openid: &str, sealed: &[u8], now: Millis)
    -> Result<bool, StoreError>;

    /// The user's sealed phone number; `None` when none is kept (or no such user).
    async fn phone(&self, openid: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The app's access_token as stored, without locking; `None` before the first one.
    async fn app_token(&self, appid: &str) -> Result<Option<StoredAppToken>, StoreError>;

    /// Waits for, then holds, the exclusive lock on the app's access_token row (PostgreSQL:
    /// the row `FOR UPDATE`; SQLite: a `BEGIN IMMEDIATE` transaction).
    async fn lock_app_token(&self, appid: &str) -> Result<Box<dyn AppTokenLock>, StoreError>;

    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Completes once the store answers calls: at once for a store that is ready when
    /// built (SQLite migrates while opening); PostgreSQL's once its migrations are applied.
    async fn ready(&self) {}
}

/// The most sessions one [`Store::expire_sessions`] ends (both stores' statements say
/// `LIMIT 1000`).
pub const EXPIRE_BATCH: u32 = 1000;

/// [`Store::refresh_session`]'s read, by the token hash's primary key (both databases).
pub const REFRESH_SESSION: &str = "SELECT t.session_id, \
     t.rotated_at IS NULL AND t.expires_at > $2 AND s.end_reason IS NULL \
     FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id WHERE t.hash = $1";

/// How long past the refresh grace window [`Store::purge`] keeps a rotated refresh token's
/// successor pair. A refresh decides "within the grace window" by its own clock, read before
/// its rotation reaches the database, maybe on another replica than the purger's: a
/// successor cleared the moment the window closed by the purger's clock could be one such a
/// refresh is still owed, and it would then be taken for reuse and end a legitimate session.
/// A minute covers a refresh's time in flight and the replicas' clock skew; the refresh
/// itself still refuses a token presented after the window.
pub const SUCCESSOR_MARGIN: Millis = 60_000;

/// [`Store::purge`]'s statement that clears the oldest `$2` successor pairs of rotations
/// before `$1`, on both backends (public, as the two below, for the tests that check each
/// finds its rows by index).
pub const CLEAR_SUCCESSORS: &str = "UPDATE refresh_tokens SET successor = NULL WHERE hash IN \
     (SELECT hash FROM refresh_tokens WHERE successor IS NOT NULL AND rotated_at < $1 \
      ORDER BY rotated_at LIMIT $2)";

/// [`Store::purge`]'s statement that deletes the oldest `$2` access token rows that expired
/// before `$1`, on both backends.
pub const PURGE_ACCESS: &str = "DELETE FROM access_tokens WHERE hash IN \
     (SELECT hash FROM access_tokens WHERE expires_at < $1 ORDER BY expires_at LIMIT $2)";

/// [`Store::purge`]'s statement that deletes the oldest `$2` refresh token rows that expired
/// before `$1`, on both backends.
pub const PURGE_REFRESH: &str = "DELETE FROM refresh_tokens WHERE hash IN \
     (SELECT hash FROM refresh_tokens WHERE expires_at < $1 ORDER BY expires_at LIMIT $2)";

/// [`Store::forget`]'s statement that deletes the oldest `$2` timeline events before `$1`,
/// on both backends (public for the tests that check it finds its rows by index).
pub const FORGET_EVENTS: &str = "DELETE FROM session_events WHERE id IN \
     (SELECT id FROM session_events WHERE at < $1 ORDER BY at LIMIT $2)";

/// [`Store::forget`]'s statement that deletes the oldest `$2` sessions that ended before
/// `$1` and have no token rows left, on both backends. A session whose tokens outlive the
/// retention (issued under a longer `AUTH_REFRESH_TTL`) is skipped until they are purged,
/// rather than failing the batch on the foreign key. Each look-up, and each foreign key's
/// check of a deleted session, goes through the token tables' `*_by_session` indexes.
pub const FORGET_SESSIONS: &str = "DELETE FROM sessions WHERE id IN \
     (SELECT s.id FROM sessions s WHERE s.ended_at < $1 \
      AND NOT EXISTS (SELECT 1 FROM access_tokens a WHERE a.session_id = s.id) \
      AND NOT EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.session_id = s.id) \
      ORDER BY s.ended_at LIMIT $2)";

/// One batch of [`Store::purge`] at `now`: each statement with the instant it binds as `$1`
/// (`$2` is the batch), in the order they run.
pub(crate) fn purge_statements(
    now: Millis,
    keep: Millis,
    grace: Millis,
) -> [(&'static str, Millis); 3] {
    let dead = now.saturating_sub(keep);
    [
        (PURGE_ACCESS, dead),
        (PURGE_REFRESH, dead),
        (CLEAR_SUCCESSORS, successors_rotated_before(now, grace)),
    ]
}

/// Successor pairs of rotations before this instant are cleared by a purge at `now`.
pub(crate) fn successors_rotated_before(now: Millis, grace: Millis) -> Millis {
    now.saturating_sub(grace.saturating_add(SUCCESSOR_MARGIN))
}

/// A device read back from a row's three columns.
pub(crate) fn device(
    id: Option<String>,
    platform: Option<String>,
    model: Option<String>,
) -> Device {
    Device::from_stored(id, platform, model)
}

/// An end reason read back from a row.
pub(crate) fn reason(stored: Option<String>) -> Result<Option<EndReason>, StoreError> {
    stored
        .map(|s| {
            EndReason::from_stored(&s).ok_or_else(|| {
                StoreError::Other(anyhow::anyhow!("unknown end reason {s:?} in store"))
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn housekeepings_expiry_statements_end_expire_batch_at_a_time() {
        // `expire_due_sessions` calls again while a batch comes back full: a statement
        // limited below the constant would end one batch a run without anyone noticing.
        let limit = format!("LIMIT {EXPIRE_BATCH}");
        assert!(
            sqlite::DUE_SESSIONS.contains(&limit),
            "{}",
            sqlite::DUE_SESSIONS
        );
        assert!(
            postgres::EXPIRE_DUE_SESSIONS.contains(&limit),
            "{}",
            postgres::EXPIRE_DUE_SESSIONS
        );
    }
}
