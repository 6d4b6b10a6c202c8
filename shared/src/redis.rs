//! A Redis connection made on first use, for a service that must start (and keep answering)
//! while Redis is down.

use std::sync::Mutex;
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
                    ));
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
                Err(error)
            })
            .await?;
        Ok(conn.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
