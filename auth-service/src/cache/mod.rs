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

/// What the cache says of a user's phone number, so that a replica may keep the number in
/// memory ([`crate::phones::KeptPhones`]) and still see a write made by another replica.
///
/// With Redis, each user's number has a stamp: a random value that a write replaces (with
/// `writing` while it runs, then with nothing, so that the next read makes a new one); see
/// [`shared::Stamp`]. `Local`: the cache is this process's own (no Redis).
pub use shared::Stamp as PhoneStamp;

/// One session whose mark [`Cache::session_marks`] reads, with the user whose phone
/// number's stamp is read along with it, if asked.
#[derive(Debug, Clone, Copy)]
pub struct MarkAsk<'a> {
    /// The session.
    pub session_id: &'a str,
    /// The openid whose phone stamp is wanted too.
    pub phone_of: Option<&'a str>,
}

/// What [`Cache::session_marks`] read for one [`MarkAsk`]: the mark, and the phone stamp
/// when it was asked for.
pub type MarkRead = (Option<SessionMark>, Option<PhoneStamp>);

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

    /// The session's mark, and the stamp of `openid`'s phone number, in one round trip.
    async fn session_mark_and_phone_stamp(
        &self,
        session_id: &str,
        openid: &str,
    ) -> Result<(Option<SessionMark>, PhoneStamp), CacheError>;

    /// Whether [`Self::session_marks`] saves anything over reading the marks one by one: a
    /// round trip, for a networked cache.
    fn reads_marks_at_once(&self) -> bool {
        false
    }

    /// What [`Self::session_mark`] and [`Self::session_mark_and_phone_stamp`] read, for
    /// several sessions at once (a `VerifyBatch`'s): one answer per ask, in order. This
    /// default asks one after another; a networked cache reads them in one round trip.
    async fn session_marks(&self, asks: &[MarkAsk<'_>]) -> Result<Vec<MarkRead>, CacheError> {
        let mut read = Vec::with_capacity(asks.len());
        for ask in asks {
            read.push(match ask.phone_of {
                Some(openid) => self
                    .session_mark_and_phone_stamp(ask.session_id, openid)
                    .await
                    .map(|(mark, stamp)| (mark, Some(stamp)))?,
                None => (self.session_mark(ask.session_id).await?, None),
            });
        }
        Ok(read)
    }

    /// The stamp of `openid`'s phone number.
    async fn phone_stamp(&self, openid: &str) -> Result<PhoneStamp, CacheError>;

    /// Gives `openid`'s number a new stamp, unless it has one (`Ok(None)`: it had one, or
    /// a write began; the read that asked keeps nothing).
    async fn new_phone_stamp(&self, openid: &str) -> Result<Option<String>, CacheError>;

    /// A write of `openid`'s number begins: its stamp becomes `writing`, for at most `ttl`.
    /// An error means the write must not go on (other replicas would not see it).
    async fn phone_write_started(&self, openid: &str, ttl: Duration) -> Result<(), CacheError>;

    /// That write ended (committed or not): the stamp goes, and the next read makes one.
    /// If this fails, the `writing` stamp lapses by itself.
    async fn phone_write_ended(&self, openid: &str) -> Result<(), CacheError>;

    /// Drops expired entries (called periodically).
    async fn sweep(&self);
}
