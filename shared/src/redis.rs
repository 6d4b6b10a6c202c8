//! A Redis connection made on first use, for a service that must start (and keep answering)
//! while Redis is down.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::anyhow;
use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Time limit of one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time limit of one command's answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The most the first connection may take (its attempt and one retry), inside a caller's
/// two-second deadline so that a failure is always recorded.
const FIRST_CONNECT_DEADLINE: Duration = Duration::from_millis(1500);
/// After a failed first connection, calls fail at once for this long rather than each
/// waiting for a connect timeout of its own.
const RECONNECT_GAP: Duration = Duration::from_millis(500);

/// The connection to one Redis: nothing is connected when it is built; the first call
/// connects, a failed connection is tried again by a later call, and once connected,
/// redis-rs' `ConnectionManager` reconnects by itself after Redis restarts.
pub struct LazyRedis {
    client: Client,
    conn: OnceCell<ConnectionManager>,
    /// When the last attempt to connect failed.
    failed_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for LazyRedis {
    // Not the client: its connection info holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRedis")
            .field("connected", &self.conn.initialized())
            .finish_non_exhaustive()
    }
}

impl LazyRedis {
    /// Checks a Redis URL setting as [`LazyRedis::new`] will read it, and answers it trimmed,
    /// as the secret it is: `redis://` or `rediss://`, a host, and the rest (database number,
    /// credentials, query) as redis-rs reads them. The error is the problem, for the caller to
    /// name the setting. It never quotes the URL, which may hold a password (redis-rs' own
    /// messages never repeat it).
    pub fn check_url(url: &str) -> Result<SecretString, String> {
        let url = url.trim();
        let parsed = redis::parse_redis_url(url)
            .filter(|u| matches!(u.scheme(), "redis" | "rediss"))
            .ok_or("must be a redis:// or rediss:// URL, like redis://HOST:PORT/DB")?;
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err("needs a host, like redis://127.0.0.1:6379".into());
        }
        redis::IntoConnectionInfo::into_connection_info(parsed)
            .map_err(|e| format!("is not usable: {e}"))?;
        Ok(SecretString::from(url.to_owned()))
    }

    /// Reads `url` (`redis://` or `rediss://`) only: nothing is connected yet.
    pub fn new(url: &SecretString) -> anyhow::Result<Self> {
        // redis-rs' messages about a URL never repeat it, so the password stays out.
        let client = Client::open(url.expose_secret())
            .map_err(|e| anyhow::Error::new(e).context("unusable Redis URL"))?;
        Ok(Self {
            client,
            conn: OnceCell::new(),
            failed_at: Mutex::new(None),
        })
    }

    /// True once a connection has been made.
    pub fn connected(&self) -> bool {
        self.conn.initialized()
    }

    /// The connection, made on first use; a failed attempt is retried by a later call (at
    /// most once per [`RECONNECT_GAP`]).
    pub async fn connection(&self) -> anyhow::Result<ConnectionManager> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let recent_failure = self
                    .failed_at
                    .lock()
                    .map(|at| at.is_some_and(|at| at.elapsed() < RECONNECT_GAP))
                    .unwrap_or(false);
                if recent_failure {
                    return Err(anyhow!(
                        "Redis could not be reached moments ago; not trying again yet"
                    )
                    .context(Unreachable));
                }
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                let connect = ConnectionManager::new_with_config(self.client.clone(), config);
                let error = match tokio::time::timeout(FIRST_CONNECT_DEADLINE, connect).await {
                    Ok(Ok(conn)) => return Ok(conn),
                    Ok(Err(e)) => anyhow::Error::new(e).context("Redis connect failed"),
                    Err(_) => anyhow!(
                        "Redis did not accept a connection within {FIRST_CONNECT_DEADLINE:?}"
                    ),
                };
                if let Ok(mut at) = self.failed_at.lock() {
                    *at = Some(Instant::now());
                }
                Err(error.context(Unreachable))
            })
            .await?;
        Ok(conn.clone())
    }
}

/// Marks an error as Redis being away (no connection, no answer in time) where no
/// `RedisError` says so: wrap one in it (`anyhow::Error::new(Unreachable)` or
/// `.context(Unreachable)`) for [`is_outage`].
#[derive(Debug)]
pub struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redis is unreachable")
    }
}

impl std::error::Error for Unreachable {}

/// Whether `e` says Redis is away (no connection, no answer in time, a connection dropped,
/// a server still loading or failing over) rather than that it answered one command with
/// an error (a full memory refusing writes, a wrong type, a value this program cannot
/// read). Only an outage starts a [`Rest`]: a Redis whose memory is full still answers
/// reads.
pub fn is_outage(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unreachable>().is_some()
        || e.chain().any(|cause| {
            cause.is::<Unreachable>()
                || cause.downcast_ref::<redis::RedisError>().is_some_and(|r| {
                    r.is_io_error()
                        || r.is_timeout()
                        || r.is_connection_dropped()
                        || r.is_connection_refusal()
                        || r.is_unrecoverable_error()
                        || matches!(
                            r.kind(),
                            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                        )
                })
        })
}

/// After a Redis call fails, how long the calls that follow are answered without asking
/// Redis, all but one: the first call after that long asks it again. A Redis that hangs (a
/// lost node, a partition) costs each call it is asked its full timeout; without the rest,
/// every request would pay it, one call after the other.
pub const REST_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Whether to ask Redis now: always while it answers (one atomic load), else once per
/// [`REST_AFTER_FAILURE`]. The caller answers the calls it does not send as it answers a
/// failure.
#[derive(Debug, Default)]
pub struct Rest {
    /// A call failed since Redis last answered.
    failing: AtomicBool,
    /// While failing: until when calls do not ask Redis.
    until: Mutex<Option<Instant>>,
}

impl Rest {
    /// Whether a call made at `now` asks Redis. After a rest, the first call to ask takes
    /// the next rest's start: the calls that come while it waits do not ask too.
    pub fn ask(&self, now: Instant) -> bool {
        if !self.failing.load(Ordering::Relaxed) {
            return true;
        }
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(end) if now < end => false,
            _ => {
                *until = Some(now + REST_AFTER_FAILURE);
                true
            }
        }
    }

    /// A call failed at `now`.
    pub fn failed(&self, now: Instant) {
        self.failing.store(true, Ordering::Relaxed);
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + REST_AFTER_FAILURE);
    }

    /// Redis answered; true if it was failing.
    pub fn answered(&self) -> bool {
        if !self.failing.swap(false, Ordering::Relaxed) {
            return false;
        }
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_redis_being_away_is_an_outage() {
        let io = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        let oom = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "OOM command not allowed when used memory > 'maxmemory'",
        ));

        assert!(is_outage(
            &anyhow::Error::new(io).context("Redis GET failed")
        ));
        assert!(is_outage(
            &anyhow::Error::new(Unreachable).context("Redis GET did not finish within 2s")
        ));
        assert!(is_outage(&anyhow!("connect failed").context(Unreachable)));
        assert!(!is_outage(
            &anyhow::Error::new(oom).context("Redis SET failed")
        ));
        assert!(!is_outage(&anyhow!("a value that is no session mark")));
    }

    #[test]
    fn after_a_failure_one_call_per_rest_asks_redis() {
        // Arrange
        let rest = Rest::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(
            rest.ask(t0) && rest.ask(t0),
            "every call asks while Redis answers"
        );

        // Act
        rest.failed(t0);

        // Assert
        assert!(!rest.ask(t0 + ms(10)), "resting");
        assert!(!rest.ask(t0 + REST_AFTER_FAILURE - ms(1)), "still resting");
        assert!(
            rest.ask(t0 + REST_AFTER_FAILURE),
            "the first call after the rest asks"
        );
        assert!(
            !rest.ask(t0 + REST_AFTER_FAILURE + ms(1)),
            "while it waits, the others do not"
        );
        assert!(rest.answered(), "it was failing");
        assert!(
            rest.ask(t0 + REST_AFTER_FAILURE + ms(2)),
            "every call asks again"
        );
        assert!(!rest.answered(), "no longer failing");
    }

    #[test]
    fn a_url_is_checked_as_redis_rs_reads_it_and_never_quoted() {
        // Arrange
        let good = " redis://:pw-secret@10.0.0.5:6380/2\n";
        let bad = [
            "http://:pw-secret@127.0.0.1:6379",
            "redis//:pw-secret@127.0.0.1",
            "unix:///tmp/pw-secret.sock",
            "redis://:pw-secret@127.0.0.1:6379/not-a-db",
            "redis://:pw-secret@127.0.0.1/?protocol=9",
        ];

        // Act
        let kept = LazyRedis::check_url(good);
        let refused = bad.map(LazyRedis::check_url);

        // Assert
        assert_eq!(
            kept.map(|u| u.expose_secret().to_owned()),
            Ok(good.trim().to_owned())
        );
        for (url, answer) in bad.iter().zip(refused) {
            let problem = answer.map(|_| ()).expect_err(url);
            assert!(!problem.contains("pw-secret"), "{url}: {problem}");
        }
    }

    #[tokio::test]
    async fn nothing_listening_fails_promptly_then_at_once_and_the_url_stays_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("address").port();
        drop(listener);
        let url = SecretString::from(format!("redis://:hunter2-password@127.0.0.1:{port}"));
        let redis = LazyRedis::new(&url).expect("a valid URL");
        assert!(!format!("{redis:?}").contains("hunter2"));

        let first = redis.connection().await.expect_err("nothing listens");
        assert!(!format!("{first:#}").contains("hunter2"), "{first:#}");
        let again = redis.connection().await.expect_err("still nothing");
        assert!(format!("{again:#}").contains("moments ago"), "{again:#}");
        assert!(!redis.connected());
    }
}
