//! What `Verify` remembers of the access tokens it has seen, so that a live session costs a
//! look-up of its mark (in memory, or one key of a Redis `MGET`: a `VerifyBatch`'s items, or
//! `Verify` calls that arrive together, have their marks read in one) instead of a database
//! read.
//!
//! An entry holds a token's facts as the database gave them: whose it is, its session, its
//! expiry and its session's. None of them alone lets a token in: a hit also needs the
//! session's mark to say `Alive` (see [`crate::cache::SessionMark`]), and the mark is what
//! every end of a session replaces. An entry is only ever used to say yes: a token whose
//! entry is stale, expired or whose session is not marked alive goes to the database, which
//! gives the exact answer (`token_revoked`, `session_replaced`, `token_expired`, …).
//!
//! Entries are refreshed from the database after [`FACTS_FOR`] (so a unionid learned by a
//! later login shows within that time) and the whole map is bounded (S3-FIFO eviction by
//! `quick_cache`), so memory stays flat under any number of tokens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use quick_cache::sync::Cache;

use crate::crypto::TokenHash;
use crate::domain::Millis;
use crate::store::AccessRecord;

/// How long an entry's facts are used before the database is read again.
pub const FACTS_FOR: Millis = 60_000;

/// One access token's facts.
#[derive(Debug)]
pub struct Known {
    /// The user's openid.
    pub openid: String,
    /// The user's unionid, as of `read_at`.
    pub unionid: Option<String>,
    /// The session.
    pub session_id: String,
    /// The token's expiry.
    pub expires_at: Millis,
    /// The session's refresh expiry as of `read_at` (a later refresh only moves it later).
    pub refresh_expires_at: Millis,
    /// When the facts were read from the database.
    read_at: Millis,
    /// When this process last saw `last_active_at` written (or read it): the one-a-minute
    /// touch is sent by one `Verify`, not by every one in that minute.
    touched_at: AtomicI64,
}

impl Known {
    /// Claims the touch of `last_active_at` due at `now`, if one is due after `interval`:
    /// true for exactly one caller per interval.
    pub fn claim_touch(&self, now: Millis, interval: Millis) -> bool {
        let last = self.touched_at.load(Ordering::Relaxed);
        now.saturating_sub(last) >= interval
            && self
                .touched_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The bounded map of token hash → facts; with a capacity of 0 it keeps nothing.
pub struct Verified {
    tokens: Option<Cache<[u8; 32], Arc<Known>>>,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("entries", &self.tokens.as_ref().map_or(0, Cache::len))
            .finish()
    }
}

impl Verified {
    /// Room for `capacity` tokens; 0 turns the cache off.
    pub fn new(capacity: usize) -> Self {
        Self {
            tokens: (capacity > 0).then(|| Cache::new(capacity)),
        }
    }

    /// The token's facts, when they are fresh and say it has not expired at `now`.
    pub fn get(&self, hash: &TokenHash, now: Millis) -> Option<Arc<Known>> {
        let known = self.tokens.as_ref()?.get(&hash.0)?;
        let usable = now.saturating_sub(known.read_at) < FACTS_FOR
            && now < known.expires_at
            && now < known.refresh_expires_at;
        usable.then_some(known)
    }

    /// Keeps the facts the database just gave (read at `now`, its touch claimed at
    /// `touched_at`) and hands them back.
    pub fn put(
        &self,
        hash: &TokenHash,
        record: &AccessRecord,
        now: Millis,
        touched_at: Millis,
    ) -> Arc<Known> {
        let known = Arc::new(Known {
            openid: record.openid.clone(),
            unionid: record.unionid.clone(),
            session_id: record.session_id.clone(),
            expires_at: record.expires_at,
            refresh_expires_at: record.refresh_expires_at,
            read_at: now,
            touched_at: AtomicI64::new(touched_at),
        });
        if let Some(tokens) = &self.tokens {
            tokens.insert(hash.0, known.clone());
        }
        known
    }

    /// True when the cache is turned off (and marks are neither read nor written).
    pub fn is_off(&self) -> bool {
        self.tokens.is_none()
    }

    /// How many tokens are kept.
    pub fn len(&self) -> usize {
        self.tokens.as_ref().map_or(0, Cache::len)
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sessions this process ended whose `Ended` mark the cache has not taken yet (Redis
/// cut off or reset at that moment), each until a deadline.
///
/// While such a mark is missing, the session's `Alive` mark may still be in Redis, and this
/// process would go on answering the session's tokens from memory if its next mark read
/// succeeds (Redis back) before the end's retry lands. A `Verify` that would answer from
/// memory asks here first, and goes to the database (which has the end) for a session
/// listed. Checking costs one atomic load while nothing is listed.
#[derive(Debug, Default)]
pub struct UnmarkedEnds {
    /// True while `until` may hold an entry.
    any: AtomicBool,
    /// Session id → until when it is listed.
    until: Mutex<HashMap<String, Millis>>,
}

impl UnmarkedEnds {
    /// Lists `session_ids` until `until` (a deadline from `now`); entries past theirs go,
    /// so that the list stays as long as the last [`Millis`] of ends while Redis refuses
    /// marks, however long that lasts.
    pub fn add(&self, session_ids: &[String], now: Millis, until: Millis) {
        let mut map = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, u| *u > now);
        for id in session_ids {
            map.insert(id.clone(), until);
        }
        self.any.store(!map.is_empty(), Ordering::Release);
    }

    /// Takes `session_ids` off the list: their marks are in the cache now.
    pub fn remove(&self, session_ids: &[String]) {
        let mut map = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        for id in session_ids {
            map.remove(id);
        }
        self.any.store(!map.is_empty(), Ordering::Release);
    }

    /// True when `session_id` is listed at `now`: one look-up, under the lock only while
    /// something is listed.
    pub fn holds(&self, session_id: &str, now: Millis) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let map = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(session_id).is_some_and(|until| *until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expires_at: Millis, refresh_expires_at: Millis) -> AccessRecord {
        AccessRecord {
            openid: "o".into(),
            unionid: None,
            session_id: "s".into(),
            expires_at,
            last_active_at: 0,
            ended: None,
            refresh_expires_at,
        }
    }

    #[test]
    fn facts_are_used_only_while_fresh_and_unexpired() {
        let v = Verified::new(10);
        let h = TokenHash([1; 32]);
        v.put(&h, &record(1_000_000, 2_000_000), 0, 0);
        assert!(v.get(&h, FACTS_FOR - 1).is_some());
        assert!(
            v.get(&h, FACTS_FOR).is_none(),
            "stale facts go to the database"
        );
        v.put(&h, &record(100, 2_000_000), 0, 0);
        assert!(
            v.get(&h, 100).is_none(),
            "an expired token goes to the database"
        );
        v.put(&h, &record(1_000, 50), 0, 0);
        assert!(
            v.get(&h, 50).is_none(),
            "an expired session goes to the database"
        );
        assert!(v.get(&TokenHash([2; 32]), 0).is_none());
    }

    #[test]
    fn a_capacity_of_zero_keeps_nothing_and_the_map_is_bounded() {
        let off = Verified::new(0);
        let h = TokenHash([1; 32]);
        off.put(&h, &record(1_000, 1_000), 0, 0);
        assert!(off.get(&h, 1).is_none());
        assert!(off.is_empty());

        let v = Verified::new(100);
        for i in 0..1_000u16 {
            let mut b = [0; 32];
            b[..2].copy_from_slice(&i.to_be_bytes());
            v.put(&TokenHash(b), &record(1_000, 1_000), 0, 0);
        }
        assert!(v.len() <= 100, "{} entries kept", v.len());
    }

    #[test]
    fn one_caller_per_interval_claims_the_touch() {
        let v = Verified::new(10);
        let known = v.put(&TokenHash([1; 32]), &record(1_000_000, 1_000_000), 0, 0);
        assert!(!known.claim_touch(59_999, 60_000));
        assert!(known.claim_touch(60_000, 60_000));
        assert!(!known.claim_touch(60_001, 60_000), "claimed already");
        assert!(known.claim_touch(120_000, 60_000));
    }

    #[test]
    fn an_unmarked_end_is_held_until_its_deadline_or_its_mark() {
        let ends = UnmarkedEnds::default();
        assert!(!ends.holds("s1", 0));
        ends.add(&["s1".into(), "s2".into()], 0, 1_000);
        assert!(ends.holds("s1", 999));
        assert!(ends.holds("s2", 999));
        assert!(!ends.holds("s3", 999));
        ends.remove(&["s1".into()]);
        assert!(!ends.holds("s1", 999), "marked in the cache since");
        assert!(!ends.holds("s2", 1_000), "past its deadline");
        // A later end clears what is past its deadline.
        ends.add(&["s3".into()], 1_000, 2_000);
        assert!(ends.holds("s3", 1_999));
        assert_eq!(ends.until.lock().expect("lock").len(), 1, "s2 went");
        ends.remove(&["s3".into()]);
        assert!(!ends.any.load(Ordering::Acquire), "nothing left to look at");
    }
}
