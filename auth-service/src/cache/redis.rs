//! The Redis cache: the same rules as [`super::MemoryCache`], shared by every replica.
//!
//! Keys are namespaced by the mini-program's appid, so that several apps (or test runs) can
//! share one Redis:
//! - `wxauth:<appid>:code:<hash>`: a login code's state, `inflight` or `used`, keyed by the
//!   code's keyed hash (never the code itself), expiring with its TTL;
//! - `wxauth:<appid>:rate:<key>`: a fixed-window counter, expiring when its window ends;
//! - `wxauth:<appid>:session:<id>`: a session's mark for `Verify`, `alive` (set `NX`, so
//!   never over an `ended`) or `ended` (set over anything), expiring with its TTL;
//! - `wxauth:<appid>:phone:<openid>`: the stamp of a user's phone number (see
//!   [`super::PhoneStamp`]): random hex made by a read (`SET NX`, for [`PHONE_STAMP_FOR`]),
//!   or `writing:<n>` while `n` writes of the number run ([`shared::WRITING`]).
//!
//! Each decision is one atomic step on the server (a Lua script), so replicas racing on one
//! code or one counter agree. Nothing needs sweeping: Redis expires the keys.
//!
//! `Verify`'s reads of session marks (and phone stamps) that come together are sent as one
//! `MGET` ([`MarkReads`]); each is still made after its call arrived, so it sees every end
//! marked before.
//!
//! The connection is lazy and bounded ([`LazyRedis`]): nothing is connected when the cache is
//! built (the service starts while Redis is down); the first call connects, a failed
//! connection is tried again by a later call, and once connected, redis-rs'
//! `ConnectionManager` reconnects by itself after Redis restarts. Every call gives up after [`CALL_DEADLINE`], so a Redis that
//! is down or hung costs a login at most that long (and [`super::FallbackCache`] answers it).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use futures_util::future::join_all;
use redis::aio::ConnectionManager;
use redis::{Cmd, RedisError, Script};
use secrecy::SecretString;
use shared::{LazyRedis, Unreachable};
use tokio::sync::oneshot;
use tracing::warn;

use super::{
    Cache, CacheError, CodeClaim, MarkAsk, MarkRead, PhoneStamp, RateDecision, SessionMark,
};

/// The most one cache call may take, connecting included.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

/// How long a phone number's stamp lives: when it lapses, the next read makes another, and
/// the numbers kept under the old one are read again once.
const PHONE_STAMP_FOR: Duration = Duration::from_secs(24 * 3600);

/// Claims a code: `SET NX` when free, else tells what holds it.
/// KEYS[1] the code's key; ARGV[1] the in-flight TTL (ms). Returns 0 acquired, 1 in
/// flight, 2 used.
const CLAIM_LUA: &str = r"
if redis.call('SET', KEYS[1], 'inflight', 'NX', 'PX', ARGV[1]) then
  return 0
end
if redis.call('GET', KEYS[1]) == 'used' then
  return 2
end
return 1
";

/// Releases an in-flight claim, and never a `used` mark (a claim that lapsed may have been
/// taken and spent by another login since). KEYS[1] the code's key.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == 'inflight' then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Counts one event in a fixed window: the window starts with its first event and ends
/// `ARGV[1]` ms later (a counter found without expiry is given one). KEYS[1] the counter.
/// Returns the count, and the window's remaining time in ms.
const HIT_LUA: &str = r"
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if n == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
";

/// Cache state in Redis, shared by every replica of one app.
pub struct RedisCache {
    redis: Arc<LazyRedis>,
    /// Single session-mark reads waiting for the next `MGET`.
    reads: Arc<MarkReads>,
    /// `wxauth:<appid>:`.
    prefix: String,
    claim: Script,
    release: Script,
    hit: Script,
    /// [`shared::WRITE_STARTED_LUA`] and [`shared::WRITE_ENDED_LUA`], for phone stamps.
    write_started: Script,
    write_ended: Script,
}

impl std::fmt::Debug for RedisCache {
    // Not the client: its connection info holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .field("connected", &self.redis.connected())
            .finish_non_exhaustive()
    }
}

impl RedisCache {
    /// A cache at `url` (`redis://` or `rediss://`) for the app `appid`. Reads the URL only:
    /// nothing is connected until the first call.
    pub fn new(url: &SecretString, appid: &str) -> Result<Self, CacheError> {
        Ok(Self {
            redis: Arc::new(LazyRedis::new(url).map_err(CacheError)?),
            reads: Arc::default(),
            prefix: format!("wxauth:{appid}:"),
            claim: Script::new(CLAIM_LUA),
            release: Script::new(RELEASE_LUA),
            hit: Script::new(HIT_LUA),
            write_started: Script::new(shared::WRITE_STARTED_LUA),
            write_ended: Script::new(shared::WRITE_ENDED_LUA),
        })
    }

    /// Asks Redis for a `PONG`.
    pub async fn ping(&self) -> Result<(), CacheError> {
        within("PING", async {
            let mut conn = self.connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(failed("PING"))?;
            Ok(())
        })
        .await
    }

    fn code_key(&self, code: &str) -> String {
        format!("{}code:{code}", self.prefix)
    }

    fn rate_key(&self, key: &str) -> String {
        format!("{}rate:{key}", self.prefix)
    }

    fn session_key(&self, session_id: &str) -> String {
        format!("{}session:{session_id}", self.prefix)
    }

    fn phone_key(&self, openid: &str) -> String {
        format!("{}phone:{openid}", self.prefix)
    }

    /// The connection, made on first use (see [`LazyRedis`]).
    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        self.redis.connection().await.map_err(CacheError)
    }
}

/// Milliseconds for `PX`/`PEXPIRE`, which refuse 0.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn failed(what: &'static str) -> impl FnOnce(RedisError) -> CacheError {
    move |e| CacheError(anyhow::Error::new(e).context(format!("Redis {what} failed")))
}

fn session_mark(mark: Option<&[u8]>) -> Result<Option<SessionMark>, CacheError> {
    match mark {
        None => Ok(None),
        Some(b"alive") => Ok(Some(SessionMark::Alive)),
        Some(b"ended") => Ok(Some(SessionMark::Ended)),
        Some(other) => Err(CacheError(anyhow!(
            "unexpected session mark {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// A stamp as Redis holds it; one that is not text (no replica writes such) is unusable.
fn phone_stamp(stamp: Option<Vec<u8>>) -> PhoneStamp {
    match stamp.map(String::from_utf8) {
        None => PhoneStamp::Missing,
        Some(Ok(s)) if shared::is_writing(&s) => PhoneStamp::Unusable,
        Some(Ok(s)) => PhoneStamp::Current(s),
        Some(Err(_)) => PhoneStamp::Unusable,
    }
}

/// Runs one cache call under [`CALL_DEADLINE`].
async fn within<T>(
    what: &'static str,
    call: impl Future<Output = Result<T, CacheError>>,
) -> Result<T, CacheError> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .map_err(|_| {
            CacheError(anyhow::Error::new(Unreachable).context(format!(
                "Redis {what} did not finish within {CALL_DEADLINE:?}"
            )))
        })?
}

/// An `MGET` of `keys` keys (`keys > 0`): one value per key, as bytes (so that a value that
/// is not text fails only its own read).
async fn mget(
    redis: &LazyRedis,
    mget: &Cmd,
    keys: usize,
) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
    within("session marks", async {
        let mut conn = redis.connection().await.map_err(CacheError)?;
        let values: Vec<Option<Vec<u8>>> = mget
            .query_async(&mut conn)
            .await
            .map_err(failed("session marks"))?;
        if values.len() != keys {
            return Err(CacheError(anyhow!(
                "MGET of {keys} keys answered {} values",
                values.len()
            )));
        }
        Ok(values)
    })
    .await
}

/// The values of a mark's key and, when asked, of a phone stamp's key; or why Redis did not
/// give them.
type MarkValues = Result<(Option<Vec<u8>>, Option<Vec<u8>>), ReadFailed>;

/// Why a shared `MGET` failed, for each read it carried: the error's text, and whether it
/// says Redis is away ([`shared::is_outage`]), which the text alone no longer can.
#[derive(Debug, Clone)]
struct ReadFailed {
    why: String,
    outage: bool,
}

/// The most reads one `MGET` carries; more waiting go in the next.
const MGET_MOST: usize = 1000;

/// Single reads of a session's mark (and a phone stamp) that come together, sent as one
/// `MGET`: each `Verify` read its own, about 10k instructions of redis-rs each, where a
/// key more in an `MGET` costs little. The first read to wait schedules the `MGET` as a task
/// of its own, which lets the tasks already woken run first (the other calls that came in
/// the same read from their connections), so their reads join it; none waits for company.
#[derive(Default)]
struct MarkReads {
    /// The reads waiting; not empty exactly while a task to send them is scheduled.
    waiting: Mutex<Vec<WaitingRead>>,
}

struct WaitingRead {
    mark_key: String,
    stamp_key: Option<String>,
    answer: oneshot::Sender<MarkValues>,
}

/// Fails the waiting reads if the task that was to send them is dropped before it took
/// them (the runtime shutting down), so that none waits on a task that is gone.
struct Unsent<'a>(Option<&'a MarkReads>);

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(reads) = self.0 {
            reads
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }
}

/// Sends the waiting reads, at most [`MGET_MOST`] an `MGET` (those together), and answers
/// each.
async fn send_reads(redis: Arc<LazyRedis>, reads: Arc<MarkReads>) {
    let mut unsent = Unsent(Some(&reads));
    // After the tasks ready now: on the multi-threaded runtime a task just spawned would
    // run next (its LIFO slot), before the calls that came in with the first.
    tokio::task::yield_now().await;
    let mut waiting =
        std::mem::take(&mut *reads.waiting.lock().unwrap_or_else(PoisonError::into_inner));
    unsent.0 = None;
    let mut batches = Vec::with_capacity(waiting.len().div_ceil(MGET_MOST));
    while waiting.len() > MGET_MOST {
        let rest = waiting.split_off(MGET_MOST);
        batches.push(std::mem::replace(&mut waiting, rest));
    }
    batches.push(waiting);
    join_all(batches.into_iter().map(|batch| send_batch(&redis, batch))).await;
}

/// One `MGET` for `batch`, and the answer to each of its reads.
async fn send_batch(redis: &LazyRedis, batch: Vec<WaitingRead>) {
    let mut cmd = redis::cmd("MGET");
    let mut keys = 0;
    for read in &batch {
        cmd.arg(&read.mark_key);
        keys += 1;
        if let Some(key) = &read.stamp_key {
            cmd.arg(key);
            keys += 1;
        }
    }
    if keys == 0 {
        return;
    }
    match mget(redis, &cmd, keys).await {
        Ok(values) => {
            let mut values = values.into_iter();
            for read in batch {
                let mark = values.next().flatten();
                let stamp = read.stamp_key.and_then(|_| values.next().flatten());
                // A reader that gave up (its deadline) no longer listens.
                let _ = read.answer.send(Ok((mark, stamp)));
            }
        }
        Err(e) => {
            let failed = ReadFailed {
                why: format!("{:#}", e.0),
                outage: shared::is_outage(&e.0),
            };
            for read in batch {
                let _ = read.answer.send(Err(failed.clone()));
            }
        }
    }
}

impl RedisCache {
    /// A session's mark key's value and, with `stamp_key`, that key's, read in the next
    /// `MGET` (see [`MarkReads`]).
    async fn read_mark(
        &self,
        mark_key: String,
        stamp_key: Option<String>,
    ) -> Result<(Option<Vec<u8>>, Option<Vec<u8>>), CacheError> {
        let (answer, answered) = oneshot::channel();
        let first = {
            let mut waiting = self
                .reads
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            waiting.push(WaitingRead {
                mark_key,
                stamp_key,
                answer,
            });
            waiting.len() == 1
        };
        if first {
            tokio::spawn(send_reads(Arc::clone(&self.redis), Arc::clone(&self.reads)));
        }
        answered
            .await
            .map_err(|_| {
                CacheError(anyhow!("the session-mark read was not answered").context(Unreachable))
            })?
            .map_err(|failed| {
                let e = anyhow!(failed.why);
                CacheError(if failed.outage {
                    e.context(Unreachable)
                } else {
                    e
                })
            })
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn claim_code(
        &self,
        code: &str,
        in_flight_ttl: Duration,
    ) -> Result<CodeClaim, CacheError> {
        within("claim", async {
            let mut conn = self.connection().await?;
            let state: i64 = self
                .claim
                .key(self.code_key(code))
                .arg(ms(in_flight_ttl))
                .invoke_async(&mut conn)
                .await
                .map_err(failed("claim"))?;
            match state {
                0 => Ok(CodeClaim::Acquired),
                1 => Ok(CodeClaim::InFlight),
                2 => Ok(CodeClaim::Used),
                other => Err(CacheError(anyhow!("unexpected claim answer {other}"))),
            }
        })
        .await
    }

    async fn finish_code(
        &self,
        code: &str,
        used: bool,
        used_ttl: Duration,
    ) -> Result<(), CacheError> {
        within("finish", async {
            let mut conn = self.connection().await?;
            if used {
                redis::cmd("SET")
                    .arg(self.code_key(code))
                    .arg("used")
                    .arg("PX")
                    .arg(ms(used_ttl))
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(failed("finish"))
            } else {
                self.release
                    .key(self.code_key(code))
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(failed("release"))
            }
        })
        .await
    }

    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, CacheError> {
        within("rate count", async {
            let mut conn = self.connection().await?;
            let (count, ttl_ms): (i64, i64) = self
                .hit
                .key(self.rate_key(key))
                .arg(ms(window))
                .invoke_async(&mut conn)
                .await
                .map_err(failed("rate count"))?;
            if count <= i64::from(limit) {
                return Ok(RateDecision::Allowed);
            }
            let left = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
            Ok(RateDecision::Limited {
                retry_after: left.min(window),
            })
        })
        .await
    }

    async fn session_mark(&self, session_id: &str) -> Result<Option<SessionMark>, CacheError> {
        within("session mark", async {
            let (mark, _) = self.read_mark(self.session_key(session_id), None).await?;
            session_mark(mark.as_deref())
        })
        .await
    }

    async fn session_mark_and_phone_stamp(
        &self,
        session_id: &str,
        openid: &str,
    ) -> Result<(Option<SessionMark>, PhoneStamp), CacheError> {
        within("session mark and phone stamp", async {
            let (mark, stamp) = self
                .read_mark(self.session_key(session_id), Some(self.phone_key(openid)))
                .await?;
            Ok((session_mark(mark.as_deref())?, phone_stamp(stamp)))
        })
        .await
    }

    fn reads_marks_at_once(&self) -> bool {
        true
    }

    async fn session_marks(&self, asks: &[MarkAsk<'_>]) -> Result<Vec<MarkRead>, CacheError> {
        let mut cmd = redis::cmd("MGET");
        let mut keys = 0;
        for ask in asks {
            cmd.arg(self.session_key(ask.session_id));
            keys += 1;
            if let Some(openid) = ask.phone_of {
                cmd.arg(self.phone_key(openid));
                keys += 1;
            }
        }
        if keys == 0 {
            return Ok(Vec::new());
        }
        let mut values = mget(&self.redis, &cmd, keys).await?.into_iter();
        let mut read = Vec::with_capacity(asks.len());
        for ask in asks {
            // One value that is not a mark costs its own session a database read, as a
            // single read that fails does.
            let mark = session_mark(values.next().flatten().as_deref()).unwrap_or_else(|e| {
                warn!(error = %e, "a session's mark in Redis is not one: read as none");
                None
            });
            let stamp = ask.phone_of.map(|_| phone_stamp(values.next().flatten()));
            read.push((mark, stamp));
        }
        Ok(read)
    }

    async fn phone_stamp(&self, openid: &str) -> Result<PhoneStamp, CacheError> {
        within("phone stamp", async {
            let mut conn = self.connection().await?;
            let stamp: Option<Vec<u8>> = redis::cmd("GET")
                .arg(self.phone_key(openid))
                .query_async(&mut conn)
                .await
                .map_err(failed("phone stamp"))?;
            Ok(phone_stamp(stamp))
        })
        .await
    }

    async fn new_phone_stamp(&self, openid: &str) -> Result<Option<String>, CacheError> {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random)
            .map_err(|e| CacheError(anyhow!("no randomness for a phone stamp: {e}")))?;
        let stamp = hex::encode(random);
        within("new phone stamp", async {
            let mut conn = self.connection().await?;
            let set: Option<String> = redis::cmd("SET")
                .arg(self.phone_key(openid))
                .arg(&stamp)
                .arg("NX")
                .arg("PX")
                .arg(ms(PHONE_STAMP_FOR))
                .query_async(&mut conn)
                .await
                .map_err(failed("new phone stamp"))?;
            Ok(set.map(|_| stamp))
        })
        .await
    }

    async fn phone_write_started(&self, openid: &str, ttl: Duration) -> Result<(), CacheError> {
        within("phone write started", async {
            let mut conn = self.connection().await?;
            self.write_started
                .key(self.phone_key(openid))
                .arg(ms(ttl))
                .invoke_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(failed("phone write started"))
        })
        .await
    }

    async fn phone_write_ended(&self, openid: &str) -> Result<(), CacheError> {
        within("phone write ended", async {
            let mut conn = self.connection().await?;
            self.write_ended
                .key(self.phone_key(openid))
                .invoke_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(failed("phone write ended"))
        })
        .await
    }

    async fn mark_alive(&self, session_id: &str, ttl: Duration) -> Result<(), CacheError> {
        within("mark alive", async {
            let mut conn = self.connection().await?;
            redis::cmd("SET")
                .arg(self.session_key(session_id))
                .arg("alive")
                .arg("NX")
                .arg("PX")
                .arg(ms(ttl))
                .query_async::<Option<String>>(&mut conn)
                .await
                .map(drop)
                .map_err(failed("mark alive"))
        })
        .await
    }

    async fn mark_ended(&self, session_ids: &[String], ttl: Duration) -> Result<(), CacheError> {
        if session_ids.is_empty() {
            return Ok(());
        }
        within("mark ended", async {
            let mut conn = self.connection().await?;
            let mut pipe = redis::pipe();
            for id in session_ids {
                pipe.cmd("SET")
                    .arg(self.session_key(id))
                    .arg("ended")
                    .arg("PX")
                    .arg(ms(ttl))
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(failed("mark ended"))
        })
        .await
    }

    async fn sweep(&self) {
        // Redis expires the keys itself.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_by_appid() {
        let c = RedisCache::new(&SecretString::from("redis://127.0.0.1:1/0"), "wxapp")
            .expect("a valid URL");
        assert_eq!(c.code_key("abc"), "wxauth:wxapp:code:abc");
        assert_eq!(c.rate_key("login-ip:::1"), "wxauth:wxapp:rate:login-ip:::1");
        assert_eq!(c.session_key("s-1"), "wxauth:wxapp:session:s-1");
        assert_eq!(c.phone_key("o-1"), "wxauth:wxapp:phone:o-1");
    }

    #[test]
    fn debug_output_hides_the_url() {
        let c = RedisCache::new(
            &SecretString::from("redis://:hunter2-password@127.0.0.1:1/0"),
            "wxapp",
        )
        .expect("a valid URL");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("127.0.0.1"), "{dbg}");
    }

    #[test]
    fn expiries_are_whole_positive_milliseconds() {
        assert_eq!(ms(Duration::ZERO), 1);
        assert_eq!(ms(Duration::from_micros(1500)), 1);
        assert_eq!(ms(Duration::from_secs(600)), 600_000);
    }
}
