//! Short-lived shared state: the single-flight and memory of login codes, the login rate
//! limit, and the liveness marks that let `Verify` skip the database (see [`SessionMark`]). One process keeps it in memory ([`MemoryCache`], without `AUTH_REDIS_URL`);
//! several replicas share it through Redis ([`RedisCache`]), behind the same trait, with
//! memory standing in while Redis does not answer ([`FallbackCache`]).

mod fallback;
mod memory;
mod redis;

use std::time::Duration;

use async_trait::async_trait;

pub use self::redis::RedisCache;
pub use fallback::FallbackCache;
pub use memory::MemoryCache;

/// The cache failed (only a networked backend can).
#[derive(Debug, thiserror::Error)]
#[error("cache unavailable: {0}")]
pub struct CacheError(#[source] pub anyhow::Error);

/// The state of a login code when a login tries to claim it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClaim {
    /// This login holds the code now and may exchange it at WeChat.
    Acquired,
    /// Another login is exchanging it at this moment.
    InFlight,
    /// It was exchanged successfully before.
    Used,
}

/// Whether one more event fits under a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Counted, and allowed.
    Allowed,
    /// Over the limit until `retry_after` has passed.
    Limited {
        /// How long until the window resets.
        retry_after: Duration,
    },
}

/// What the cache knows about a session, for `Verify`.
///
/// A mark is a hint with a short life, never the truth: the database is. `Alive` is set
/// only after the database said so, and never over another mark (`SET NX`); `Ended` is set
/// after an end is committed, over anything. So a `Verify` that read the database just
/// before an end committed cannot leave an `Alive` mark behind it: either its mark comes
/// first and the end replaces it, or the end's mark is there and its own is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMark {
    /// The database said the session was live less than a mark's life ago.
    Alive,
    /// The session ended.
    Ended,
}

/// The shared short-lived state.
#[async_trait]
pub trait Cache: Send + Sync + std::fmt::Debug + 'static {
    /// Claims a code (by its keyed hash) for exchange. An `Acquired` claim lapses by
    /// itself after `in_flight_ttl`, so a crashed login does not block the code forever.
    async fn claim_code(
        &self,
        code: &str,
        in_flight_ttl: Duration,
    ) -> Result<CodeClaim, CacheError>;

    /// Ends this login's claim: remembered as used for `used_ttl` on success, released on
    /// failure (so a retry may ask WeChat again, which has the last word).
    async fn finish_code(
        &self,
        code: &str,
        used: bool,
        used_ttl: Duration,
    ) -> Result<(), CacheError>;

    /// Counts one event for `key` in a fixed window of `window`, allowing `limit` of them.
    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, CacheError>;

    /// The session's mark, if it has one.
    async fn session_mark(&self, session_id: &str) -> Result<Option<SessionMark>, CacheError>;

    /// Marks a session alive for `ttl`, unless it has a mark already.
    async fn mark_alive(&self, session_id: &str, ttl: Duration) -> Result<(), CacheError>;

    /// Marks sessions ended for `ttl`, replacing whatever mark they had.
    async fn mark_ended(&self, session_ids: &[String], ttl: Duration) -> Result<(), CacheError>;

    /// Drops expired entries (called periodically).
    async fn sweep(&self);
}
