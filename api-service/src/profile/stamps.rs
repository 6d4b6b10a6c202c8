//! Profile stamps in Redis (`API_REDIS_URL`), so that every replica on PostgreSQL may keep
//! the profiles it reads in memory and still see a change made through another replica.
//!
//! Each user's profile has a key `wxauth:api:profile:<openid>` (openids are unique per
//! mini-program, so apps sharing one Redis do not collide):
//! - absent: no stamp yet, or it lapsed; a read makes one (`SET NX`, random, for
//!   [`STAMP_FOR`]) before it reads the database, and keeps what it read under it;
//! - random hex: the stamp now; a profile read under it is current while it stays;
//! - `writing:<n>`: `n` changes run ([`shared::WRITING`]: set before a change starts, one
//!   less when it ends and deleted with the last; if that fails, it lapses after
//!   [`WRITING_FOR`]); nothing is kept, nothing kept is used, and no stamp is made.
//!
//! A change replaces the stamp before it touches the database, and a random stamp never
//! comes back, so a copy read before the change is never used after it has begun.
//!
//! Redis failing costs reads of the database, never a stale answer: a stamp that cannot be
//! read counts as `writing`, and a change that cannot set `writing` is refused (503
//! `unavailable`), since the other replicas could not be told of it. The connection is
//! lazy ([`LazyRedis`]: the edge starts while Redis is down) and reconnects by itself;
//! every call gives up after [`CALL_DEADLINE`], and after a failure the calls of the next
//! [`shared::REST_AFTER_FAILURE`] are not sent (but for one, and for the end of a change):
//! a Redis that hangs costs one call's timeout per rest, not every read's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{RedisError, Script};
use secrecy::SecretString;
use shared::{LazyRedis, Rest, Stamp};
use tracing::warn;

use crate::error::ApiError;
use crate::time::now_millis;

/// How long a stamp lives: when it lapses, the next read makes another, and the profiles
/// kept under the old one are read again once.
const STAMP_FOR: Duration = Duration::from_secs(24 * 3600);
/// The longest a change keeps the stamp at `writing` if it cannot delete it (far above
/// one database write; until then that user's profile is read from the database).
const WRITING_FOR: Duration = Duration::from_secs(300);
/// The most one call may take, connecting included.
const CALL_DEADLINE: Duration = Duration::from_secs(2);
/// At most one warning about Redis failures per this long (in milliseconds).
const WARN_EVERY_MS: u64 = 10_000;

/// The stamps of profiles in one Redis.
pub struct Stamps {
    redis: LazyRedis,
    /// [`shared::WRITE_STARTED_LUA`] and [`shared::WRITE_ENDED_LUA`].
    write_started: Script,
    write_ended: Script,
    /// When the last warning was logged (ms since the epoch).
    warned_at: AtomicU64,
    /// Whether to ask Redis after a failure.
    rest: Rest,
}

impl std::fmt::Debug for Stamps {
    // Not the client: its connection info holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stamps")
            .field("connected", &self.redis.connected())
            .finish_non_exhaustive()
    }
}

impl Stamps {
    /// Stamps in the Redis at `url`; nothing is connected until the first call.
    pub fn new(url: &SecretString) -> anyhow::Result<Self> {
        Ok(Self {
            redis: LazyRedis::new(url).map_err(|e| e.context("API_REDIS_URL is not usable"))?,
            write_started: Script::new(shared::WRITE_STARTED_LUA),
            write_ended: Script::new(shared::WRITE_ENDED_LUA),
            warned_at: AtomicU64::new(0),
            rest: Rest::default(),
        })
    }

    fn key(openid: &str) -> String {
        format!("wxauth:api:profile:{openid}")
    }

    /// The stamp of `openid`'s profile; [`Stamp::Unusable`] when Redis does not answer.
    pub async fn get(&self, openid: &str) -> Stamp {
        let got = self
            .call("GET", |mut conn| async move {
                redis::cmd("GET")
                    .arg(Self::key(openid))
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await;
        match got {
            Ok(None) => Stamp::Missing,
            Ok(Some(s)) if shared::is_writing(&s) => Stamp::Unusable,
            Ok(Some(s)) => Stamp::Current(s),
            Err(e) => {
                self.warn(&e);
                Stamp::Unusable
            }
        }
    }

    /// Gives `openid`'s profile a new stamp unless it has one; `None`: it had one, a change
    /// began, or Redis did not answer (the read that asked keeps nothing).
    pub async fn make(&self, openid: &str) -> Option<String> {
        let stamp = uuid::Uuid::new_v4().simple().to_string();
        let set = self
            .call("SET NX", |mut conn| {
                let stamp = stamp.clone();
                async move {
                    redis::cmd("SET")
                        .arg(Self::key(openid))
                        .arg(stamp)
                        .arg("NX")
                        .arg("PX")
                        .arg(ms(STAMP_FOR))
                        .query_async::<Option<String>>(&mut conn)
                        .await
                }
            })
            .await;
        match set {
            Ok(set) => set.map(|_| stamp),
            Err(e) => {
                self.warn(&e);
                None
            }
        }
    }

    /// A change of `openid`'s profile begins. An error (503 `unavailable`) means it must not
    /// go on: the other replicas could not be told.
    pub async fn write_started(&self, openid: &str) -> Result<(), ApiError> {
        self.call("SET writing", |mut conn| async move {
            self.write_started
                .key(Self::key(openid))
                .arg(ms(WRITING_FOR))
                .invoke_async::<i64>(&mut conn)
                .await
                .map(drop)
        })
        .await
        .map_err(|e| {
            self.warn(&e);
            ApiError::unavailable(e)
        })
    }

    /// That change ended (committed or not): the stamp goes; if Redis does not take it,
    /// `writing` lapses by itself.
    /// Sent even while Redis rests after a failure: without it, the user's profile is read
    /// from the database until `writing` lapses.
    pub async fn write_ended(&self, openid: &str) {
        let deleted = self
            .send("DEL", |mut conn| async move {
                self.write_ended
                    .key(Self::key(openid))
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop)
            })
            .await;
        if let Err(e) = deleted {
            self.warn(&e);
        }
    }

    /// Runs one command on the connection under [`CALL_DEADLINE`], unless Redis rests after
    /// a failure (then an error, and nothing is sent).
    async fn call<T, F, Fut>(&self, what: &'static str, command: F) -> anyhow::Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        if !self.rest.ask(tokio::time::Instant::now()) {
            return Err(anyhow::Error::new(NotSent(what)));
        }
        self.send(what, command).await
    }

    /// Runs one command on the connection under [`CALL_DEADLINE`], rest or not, and records
    /// whether Redis answered.
    async fn send<T, F, Fut>(&self, what: &'static str, command: F) -> anyhow::Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let run = async {
            let conn = self.redis.connection().await?;
            command(conn)
                .await
                .map_err(|e| anyhow::Error::new(e).context(format!("Redis {what} failed")))
        };
        let answer = tokio::time::timeout(CALL_DEADLINE, run)
            .await
            .map_err(|_| {
                anyhow::Error::new(shared::Unreachable).context(format!(
                    "Redis {what} did not finish within {CALL_DEADLINE:?}"
                ))
            })
            .and_then(|answer| answer);
        // Only Redis being away rests it: one that answered with an error still answers.
        match &answer {
            Err(e) if shared::is_outage(e) => self.rest.failed(tokio::time::Instant::now()),
            _ => {
                self.rest.answered();
            }
        }
        answer
    }

    /// Logs a failure, at most once per [`WARN_EVERY_MS`]; a call not sent is none (the
    /// failure that began the rest was, or will be, logged).
    fn warn(&self, e: &anyhow::Error) {
        if e.is::<NotSent>() {
            return;
        }
        let now = u64::try_from(now_millis()).unwrap_or(0);
        let last = self.warned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < WARN_EVERY_MS
            || self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        warn!(
            error = format!("{e:#}"),
            "Redis does not answer: profiles are read from the database, changes are refused"
        );
    }
}

/// A call not sent: Redis failed moments ago ([`shared::Rest`]).
#[derive(Debug, thiserror::Error)]
#[error("Redis failed moments ago: {0} not sent")]
struct NotSent(&'static str);

/// Milliseconds for `PX`, which refuses 0.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
