//! Redis, with this process's memory standing in while Redis does not answer.
//!
//! Every call goes to Redis first. When Redis fails (down, restarting, too slow: see
//! [`super::RedisCache`]'s deadline), the call is answered by the in-process
//! [`super::MemoryCache`] instead, and a warning is logged (at most once per
//! [`WARN_EVERY`], with the number of failures in between), so logins keep working. When
//! Redis answers again the next calls use it: nothing needs a restart.
//!
//! What an outage costs: each replica counts the login rate on its own, and claims codes
//! on its own. A code raced on two replicas during the outage may then reach WeChat twice;
//! WeChat spends a code once, so the second exchange gets `40163` and answers
//! `wechat_code_used`. No answer becomes wrong, only less shared.
//!
//! Session marks are never answered from memory: a mark this replica kept is not one the
//! others wrote, and trusting it could accept a token another replica just revoked. While
//! Redis fails, a mark reads as absent, so `Verify` asks the database; an end's mark that
//! could not be written is the caller's to retry (see `service`).
//!
//! Phone stamps are never answered from memory either: while Redis fails, a stamp reads as
//! unusable (every read of a number goes to the database), and a write of a number is
//! refused, since the other replicas could not be told.
//!
//! Ends of claims are mirrored into memory as well, so that a code this replica saw spent
//! stays `Used` here through a later outage.
//!
//! Whether Redis answers is [`FallbackCache::redis_ok`]; the gRPC health service reports it
//! as `wxauth.redis` (see `startup`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    Cache, CacheError, CodeClaim, MarkAsk, MarkRead, MemoryCache, PhoneStamp, RateDecision,
    RedisCache, SessionMark,
};

/// At most one warning about Redis failures per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Warnings {
    /// When the last warning was logged.
    last: Option<Instant>,
    /// Failures since then that were not logged.
    suppressed: u64,
}

/// Redis first, the in-process cache when Redis fails.
#[derive(Debug)]
pub struct FallbackCache {
    primary: RedisCache,
    local: MemoryCache,
    /// A call fell back since Redis last answered.
    degraded: AtomicBool,
    warnings: Mutex<Warnings>,
}

impl FallbackCache {
    /// Redis as `primary`, `local` standing in for it.
    pub fn new(primary: RedisCache, local: MemoryCache) -> Self {
        Self {
            primary,
            local,
            degraded: AtomicBool::new(false),
            warnings: Mutex::new(Warnings::default()),
        }
    }

    /// True when Redis answers a PING now.
    pub async fn redis_ok(&self) -> bool {
        self.primary.ping().await.is_ok()
    }

    fn answered(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            info!("Redis answers again: the shared cache is in use");
        }
    }

    fn fell_back(&self, operation: &'static str, e: &CacheError) {
        self.degraded.store(true, Ordering::Relaxed);
        let Ok(mut w) = self.warnings.lock() else {
            return;
        };
        let now = Instant::now();
        if w.last
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            w.suppressed += 1;
            return;
        }
        warn!(
            operation,
            error = format!("{:#}", e.0),
            failures_not_logged = w.suppressed,
            "Redis does not answer: the in-process cache stands in (not shared with other replicas)"
        );
        w.last = Some(now);
        w.suppressed = 0;
    }
}

#[async_trait]
impl Cache for FallbackCache {
    async fn claim_code(
        &self,
        code: &str,
        in_flight_ttl: Duration,
    ) -> Result<CodeClaim, CacheError> {
        match self.primary.claim_code(code, in_flight_ttl).await {
            Ok(claim) => {
                self.answered();
                Ok(claim)
            }
            Err(e) => {
                self.fell_back("claim_code", &e);
                self.local.claim_code(code, in_flight_ttl).await
            }
        }
    }

    async fn finish_code(
        &self,
        code: &str,
        used: bool,
        used_ttl: Duration,
    ) -> Result<(), CacheError> {
        // The claim may have been taken here while Redis was away: end it here too.
        self.local.finish_code(code, used, used_ttl).await?;
        match self.primary.finish_code(code, used, used_ttl).await {
            Ok(()) => self.answered(),
            Err(e) => self.fell_back("finish_code", &e),
        }
        Ok(())
    }

    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, CacheError> {
        match self.primary.hit(key, limit, window).await {
            Ok(decision) => {
                self.answered();
                Ok(decision)
            }
            Err(e) => {
                self.fell_back("hit", &e);
                self.local.hit(key, limit, window).await
            }
        }
    }

    async fn session_mark(&self, session_id: &str) -> Result<Option<SessionMark>, CacheError> {
        match self.primary.session_mark(session_id).await {
            Ok(mark) => {
                self.answered();
                Ok(mark)
            }
            Err(e) => {
                self.fell_back("session_mark", &e);
                Ok(None)
            }
        }
    }

    async fn mark_alive(&self, session_id: &str, ttl: Duration) -> Result<(), CacheError> {
        match self.primary.mark_alive(session_id, ttl).await {
            Ok(()) => self.answered(),
            Err(e) => self.fell_back("mark_alive", &e),
        }
        Ok(())
    }

    async fn mark_ended(&self, session_ids: &[String], ttl: Duration) -> Result<(), CacheError> {
        match self.primary.mark_ended(session_ids, ttl).await {
            Ok(()) => {
                self.answered();
                Ok(())
            }
            Err(e) => {
                self.fell_back("mark_ended", &e);
                Err(e)
            }
        }
    }

    async fn session_mark_and_phone_stamp(
        &self,
        session_id: &str,
        openid: &str,
    ) -> Result<(Option<SessionMark>, PhoneStamp), CacheError> {
        match self
            .primary
            .session_mark_and_phone_stamp(session_id, openid)
            .await
        {
            Ok(both) => {
                self.answered();
                Ok(both)
            }
            Err(e) => {
                self.fell_back("session_mark_and_phone_stamp", &e);
                Ok((None, PhoneStamp::Unusable))
            }
        }
    }

    fn reads_marks_at_once(&self) -> bool {
        true
    }

    async fn session_marks(&self, asks: &[MarkAsk<'_>]) -> Result<Vec<MarkRead>, CacheError> {
        match self.primary.session_marks(asks).await {
            Ok(read) => {
                self.answered();
                Ok(read)
            }
            Err(e) => {
                // As each of them alone: no mark, and an unusable stamp.
                self.fell_back("session_marks", &e);
                Ok(asks
                    .iter()
                    .map(|ask| (None, ask.phone_of.map(|_| PhoneStamp::Unusable)))
                    .collect())
            }
        }
    }

    async fn phone_stamp(&self, openid: &str) -> Result<PhoneStamp, CacheError> {
        match self.primary.phone_stamp(openid).await {
            Ok(stamp) => {
                self.answered();
                Ok(stamp)
            }
            Err(e) => {
                self.fell_back("phone_stamp", &e);
                Ok(PhoneStamp::Unusable)
            }
        }
    }

    async fn new_phone_stamp(&self, openid: &str) -> Result<Option<String>, CacheError> {
        match self.primary.new_phone_stamp(openid).await {
            Ok(stamp) => {
                self.answered();
                Ok(stamp)
            }
            Err(e) => {
                self.fell_back("new_phone_stamp", &e);
                Ok(None)
            }
        }
    }

    async fn phone_write_started(&self, openid: &str, ttl: Duration) -> Result<(), CacheError> {
        // Not answered from memory: the other replicas would go on using their copies.
        match self.primary.phone_write_started(openid, ttl).await {
            Ok(()) => {
                self.answered();
                Ok(())
            }
            Err(e) => {
                self.fell_back("phone_write_started", &e);
                Err(e)
            }
        }
    }

    async fn phone_write_ended(&self, openid: &str) -> Result<(), CacheError> {
        match self.primary.phone_write_ended(openid).await {
            Ok(()) => self.answered(),
            Err(e) => self.fell_back("phone_write_ended", &e),
        }
        Ok(())
    }

    async fn sweep(&self) {
        self.local.sweep().await;
        self.primary.sweep().await;
    }
}
