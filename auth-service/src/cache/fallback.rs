//! Redis, with this process's memory standing in while Redis does not answer.
//!
//! Every call goes to Redis first. When Redis fails (down, restarting, too slow: see
//! [`super::RedisCache`]'s deadline), the call is answered by the in-process
//! [`super::MemoryCache`] instead, and a warning is logged (at most once per
//! [`WARN_EVERY`], with the number of failures in between), so logins keep working. After a
//! failure, the calls of the next [`shared::REST_AFTER_FAILURE`] are answered that way without
//! asking Redis, but for one call that asks again once the rest is over (the ends of code
//! claims, sessions and phone writes are always sent): a Redis that hangs
//! then costs one call a timeout per rest, not every call. When Redis answers again (that
//! call, or the health report's PING) the next calls use it: nothing needs a restart.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use shared::Rest;
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
    rest: Rest,
    warnings: Mutex<Warnings>,
    /// Calls answered without asking Redis since the last warning (no lock on that path).
    not_asked: AtomicU64,
}

impl FallbackCache {
    /// Redis as `primary`, `local` standing in for it.
    pub fn new(primary: RedisCache, local: MemoryCache) -> Self {
        Self {
            primary,
            local,
            rest: Rest::default(),
            warnings: Mutex::new(Warnings::default()),
            not_asked: AtomicU64::new(0),
        }
    }

    /// True when Redis answers a PING now. A PING that answers ends a rest after failures
    /// (the health report asks every 2 s).
    pub async fn redis_ok(&self) -> bool {
        let ok = self.primary.ping().await.is_ok();
        if ok {
            self.answered();
        }
        ok
    }

    fn answered(&self) {
        if self.rest.answered() {
            info!("Redis answers again: the shared cache is in use");
        }
    }

    fn fell_back(&self, operation: &'static str, e: &CacheError) {
        let now = Instant::now();
        // Only Redis being away rests it: one that answered a command with an error (a full
        // memory refusing writes) still answers the others, reads among them.
        if shared::is_outage(&e.0) {
            self.rest.failed(now);
        } else {
            self.answered();
        }
        let mut w = self.warnings.lock().unwrap_or_else(|p| p.into_inner());
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
            calls_not_sent = self.not_asked.swap(0, Ordering::Relaxed),
            "Redis does not answer: the in-process cache stands in (not shared with other replicas)"
        );
        w.last = Some(now);
        w.suppressed = 0;
    }

    /// `call` to Redis, unless Redis is resting after a failure (then an error, and `call`
    /// is never sent); its outcome is recorded either way.
    async fn redis<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        if !self.rest.ask(Instant::now()) {
            self.not_asked.fetch_add(1, Ordering::Relaxed);
            return Err(CacheError(anyhow::anyhow!(
                "Redis failed moments ago: not asked for {operation}"
            )));
        }
        match call.await {
            Ok(answer) => {
                self.answered();
                Ok(answer)
            }
            Err(e) => {
                self.fell_back(operation, &e);
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Cache for FallbackCache {
    async fn claim_code(
        &self,
        code: &str,
        in_flight_ttl: Duration,
    ) -> Result<CodeClaim, CacheError> {
        match self
            .redis("claim_code", self.primary.claim_code(code, in_flight_ttl))
            .await
        {
            Ok(claim) => Ok(claim),
            Err(_) => self.local.claim_code(code, in_flight_ttl).await,
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
        // Sent even while Redis rests, as an end's mark is: a claim Redis granted and is
        // not told the end of stays in flight for the other replicas until it lapses (a
        // retry of a spent code would then reach WeChat again). Best effort past that.
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
        match self
            .redis("hit", self.primary.hit(key, limit, window))
            .await
        {
            Ok(decision) => Ok(decision),
            Err(_) => self.local.hit(key, limit, window).await,
        }
    }

    async fn session_mark(&self, session_id: &str) -> Result<Option<SessionMark>, CacheError> {
        // No mark: `Verify` asks the database.
        Ok(self
            .redis("session_mark", self.primary.session_mark(session_id))
            .await
            .unwrap_or(None))
    }

    async fn mark_alive(&self, session_id: &str, ttl: Duration) -> Result<(), CacheError> {
        // Best effort: without it the next `Verify` asks the database again.
        let _ = self
            .redis("mark_alive", self.primary.mark_alive(session_id, ttl))
            .await;
        Ok(())
    }

    /// Always sent to Redis, even while it rests: an end's mark is what keeps the other
    /// replicas from answering the session from memory, and ends are few.
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
        Ok(self
            .redis(
                "session_mark_and_phone_stamp",
                self.primary
                    .session_mark_and_phone_stamp(session_id, openid),
            )
            .await
            .unwrap_or((None, PhoneStamp::Unusable)))
    }

    fn reads_marks_at_once(&self) -> bool {
        true
    }

    async fn session_marks(&self, asks: &[MarkAsk<'_>]) -> Result<Vec<MarkRead>, CacheError> {
        match self
            .redis("session_marks", self.primary.session_marks(asks))
            .await
        {
            Ok(read) => Ok(read),
            // As each of them alone: no mark, and an unusable stamp.
            Err(_) => Ok(asks
                .iter()
                .map(|ask| (None, ask.phone_of.map(|_| PhoneStamp::Unusable)))
                .collect()),
        }
    }

    async fn phone_stamp(&self, openid: &str) -> Result<PhoneStamp, CacheError> {
        Ok(self
            .redis("phone_stamp", self.primary.phone_stamp(openid))
            .await
            .unwrap_or(PhoneStamp::Unusable))
    }

    async fn new_phone_stamp(&self, openid: &str) -> Result<Option<String>, CacheError> {
        Ok(self
            .redis("new_phone_stamp", self.primary.new_phone_stamp(openid))
            .await
            .unwrap_or(None))
    }

    async fn phone_write_started(&self, openid: &str, ttl: Duration) -> Result<(), CacheError> {
        // Not answered from memory: the other replicas would go on using their copies.
        self.redis(
            "phone_write_started",
            self.primary.phone_write_started(openid, ttl),
        )
        .await
    }

    async fn phone_write_ended(&self, openid: &str) -> Result<(), CacheError> {
        // Sent even while Redis rests, as api-service's end of a profile change is: else the
        // user's number is read from the database until the `writing` mark lapses (5 min).
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
