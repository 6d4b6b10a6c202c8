//! The in-process cache: right for one replica, and the default.
//!
//! Session marks live apart from the rest, behind a read-write lock, because every
//! `Verify` reads one: a hit takes the read side only.
//!
//! The rate limit is a fixed-window counter, written here rather than taken from a crate
//! (governor) so that the Redis backend can implement exactly the same rule with INCR and
//! PEXPIRE, and one replica or many count alike.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Cache, CacheError, CodeClaim, PhoneStamp, RateDecision, SessionMark};

#[derive(Debug, Clone, Copy)]
enum CodeState {
    InFlight,
    Used,
}

#[derive(Debug, Default)]
struct State {
    codes: HashMap<String, (CodeState, Instant)>,
    /// Per key: when its current window ends, and how many events it has counted.
    windows: HashMap<String, (Instant, u32)>,
}

/// Cache state held in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryCache {
    state: Mutex<State>,
    /// Session id → its mark and when the mark lapses.
    marks: RwLock<HashMap<String, (SessionMark, Instant)>>,
}

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves only counters behind: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A mark that has not lapsed.
fn current(entry: Option<&(SessionMark, Instant)>, now: Instant) -> Option<SessionMark> {
    entry.and_then(|(mark, until)| (*until > now).then_some(*mark))
}

#[async_trait]
impl Cache for MemoryCache {
    async fn claim_code(
        &self,
        code: &str,
        in_flight_ttl: Duration,
    ) -> Result<CodeClaim, CacheError> {
        let now = Instant::now();
        let mut state = self.lock();
        match state.codes.get(code) {
            Some((CodeState::Used, until)) if *until > now => Ok(CodeClaim::Used),
            Some((CodeState::InFlight, until)) if *until > now => Ok(CodeClaim::InFlight),
            _ => {
                state
                    .codes
                    .insert(code.to_owned(), (CodeState::InFlight, now + in_flight_ttl));
                Ok(CodeClaim::Acquired)
            }
        }
    }

    async fn finish_code(
        &self,
        code: &str,
        used: bool,
        used_ttl: Duration,
    ) -> Result<(), CacheError> {
        let mut state = self.lock();
        if used {
            state.codes.insert(
                code.to_owned(),
                (CodeState::Used, Instant::now() + used_ttl),
            );
        } else {
            state.codes.remove(code);
        }
        Ok(())
    }

    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, CacheError> {
        let now = Instant::now();
        let mut state = self.lock();
        let entry = state
            .windows
            .entry(key.to_owned())
            .or_insert((now + window, 0));
        if now >= entry.0 {
            *entry = (now + window, 0);
        }
        if entry.1 >= limit {
            return Ok(RateDecision::Limited {
                retry_after: entry.0.saturating_duration_since(now),
            });
        }
        entry.1 += 1;
        Ok(RateDecision::Allowed)
    }

    async fn session_mark(&self, session_id: &str) -> Result<Option<SessionMark>, CacheError> {
        let now = Instant::now();
        // A writer that panicked left whole entries behind (each is one insert): keep going.
        let marks = self.marks.read().unwrap_or_else(|p| p.into_inner());
        Ok(current(marks.get(session_id), now))
    }

    async fn mark_alive(&self, session_id: &str, ttl: Duration) -> Result<(), CacheError> {
        let now = Instant::now();
        let mut marks = self.marks.write().unwrap_or_else(|p| p.into_inner());
        if current(marks.get(session_id), now).is_none() {
            marks.insert(session_id.to_owned(), (SessionMark::Alive, now + ttl));
        }
        Ok(())
    }

    async fn mark_ended(&self, session_ids: &[String], ttl: Duration) -> Result<(), CacheError> {
        let until = Instant::now() + ttl;
        let mut marks = self.marks.write().unwrap_or_else(|p| p.into_inner());
        for id in session_ids {
            marks.insert(id.clone(), (SessionMark::Ended, until));
        }
        Ok(())
    }

    async fn session_mark_and_phone_stamp(
        &self,
        session_id: &str,
        _openid: &str,
    ) -> Result<(Option<SessionMark>, PhoneStamp), CacheError> {
        Ok((self.session_mark(session_id).await?, PhoneStamp::Local))
    }

    async fn phone_stamp(&self, _openid: &str) -> Result<PhoneStamp, CacheError> {
        Ok(PhoneStamp::Local)
    }

    async fn new_phone_stamp(&self, _openid: &str) -> Result<Option<String>, CacheError> {
        Ok(None)
    }

    async fn phone_write_started(&self, _openid: &str, _ttl: Duration) -> Result<(), CacheError> {
        Ok(())
    }

    async fn phone_write_ended(&self, _openid: &str) -> Result<(), CacheError> {
        Ok(())
    }

    async fn sweep(&self) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            state.codes.retain(|_, (_, until)| *until > now);
            state.windows.retain(|_, (ends, _)| *ends > now);
        }
        let mut marks = self.marks.write().unwrap_or_else(|p| p.into_inner());
        marks.retain(|_, (_, until)| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_code_is_claimed_once_and_remembered() {
        let c = MemoryCache::new();
        let ttl = Duration::from_secs(10);
        assert_eq!(c.claim_code("h", ttl).await.ok(), Some(CodeClaim::Acquired));
        assert_eq!(c.claim_code("h", ttl).await.ok(), Some(CodeClaim::InFlight));
        c.finish_code("h", true, Duration::from_secs(600))
            .await
            .ok();
        assert_eq!(c.claim_code("h", ttl).await.ok(), Some(CodeClaim::Used));
        tokio::time::advance(Duration::from_secs(601)).await;
        assert_eq!(c.claim_code("h", ttl).await.ok(), Some(CodeClaim::Acquired));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_exchange_releases_the_code_and_a_stale_claim_lapses() {
        let c = MemoryCache::new();
        let ttl = Duration::from_secs(10);
        assert_eq!(c.claim_code("h", ttl).await.ok(), Some(CodeClaim::Acquired));
        c.finish_code("h", false, ttl).await.ok();
        assert_eq!(c.claim_code("h", ttl).await.ok(), Some(CodeClaim::Acquired));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(c.claim_code("h", ttl).await.ok(), Some(CodeClaim::Acquired));
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_allows_limit_then_refuses_until_it_resets() {
        let c = MemoryCache::new();
        let w = Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(c.hit("ip", 3, w).await.ok(), Some(RateDecision::Allowed));
        }
        tokio::time::advance(Duration::from_secs(20)).await;
        match c.hit("ip", 3, w).await.ok() {
            Some(RateDecision::Limited { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(40));
            }
            other => panic!("expected a limit, got {other:?}"),
        }
        // Another key has its own window.
        assert_eq!(c.hit("other", 3, w).await.ok(), Some(RateDecision::Allowed));
        tokio::time::advance(Duration::from_secs(41)).await;
        assert_eq!(c.hit("ip", 3, w).await.ok(), Some(RateDecision::Allowed));
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_drops_what_has_expired_and_nothing_else() {
        let c = MemoryCache::new();
        c.hit("short", 1, Duration::from_secs(1)).await.ok();
        c.hit("long", 1, Duration::from_secs(60)).await.ok();
        c.claim_code("h", Duration::from_secs(1)).await.ok();
        tokio::time::advance(Duration::from_secs(2)).await;
        c.sweep().await;
        let state = c.lock();
        assert!(!state.windows.contains_key("short"));
        assert!(state.windows.contains_key("long"));
        assert!(state.codes.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_wins_over_alive_and_alive_never_replaces_a_mark() {
        let c = MemoryCache::new();
        let live = Duration::from_secs(30);
        let ended = Duration::from_secs(600);
        assert_eq!(c.session_mark("s").await.ok(), Some(None));
        c.mark_alive("s", live).await.ok();
        assert_eq!(
            c.session_mark("s").await.ok(),
            Some(Some(SessionMark::Alive))
        );
        c.mark_ended(&["s".to_owned()], ended).await.ok();
        assert_eq!(
            c.session_mark("s").await.ok(),
            Some(Some(SessionMark::Ended))
        );
        // A Verify that read the database before the end committed comes too late.
        c.mark_alive("s", live).await.ok();
        assert_eq!(
            c.session_mark("s").await.ok(),
            Some(Some(SessionMark::Ended))
        );
        // Marks lapse; the sweep forgets them.
        c.mark_alive("t", live).await.ok();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(c.session_mark("t").await.ok(), Some(None));
        c.sweep().await;
        let marks = c.marks.read().unwrap_or_else(|p| p.into_inner());
        assert!(!marks.contains_key("t"));
        assert!(marks.contains_key("s"));
    }
}
