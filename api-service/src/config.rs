//! api-service's settings, read from the environment (names fixed by CONTRACT.md, plus a few
//! of our own, all `API_*`). A missing or malformed one stops the process with a message that
//! names it; secrets are `SecretString`s and never printed.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// `API_BODY_LIMIT`'s default: room for the largest note the contract allows even from a
/// client that writes every character as a JSON escape (a character outside the BMP as two
/// `\uXXXX`, 12 bytes: 10,100 of them are 121,200 bytes), as Python's `json.dumps` does.
pub const DEFAULT_BODY_LIMIT: usize = 128 * 1024;

/// A setting that is missing or malformed.
#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub name: &'static str,
    /// What is wrong (never a secret's value).
    pub problem: String,
}

fn bad(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        problem: problem.into(),
    }
}

/// Where the business data lives (`API_DATABASE_URL`), chosen once at start-up by the URL's
/// scheme.
#[derive(Debug, Clone)]
pub enum DatabaseSettings {
    /// `sqlite://PATH`: one SQLite file (the embedded default, one replica).
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// `postgres://…` or `postgresql://…`: PostgreSQL, shared by any number of replicas.
    Postgres {
        /// The whole URL; it may carry a password, so it is a secret (never in Debug or logs).
        url: SecretString,
        /// `API_DATABASE_MAX_CONNECTIONS`: the most connections this process opens.
        max_connections: u32,
    },
}

/// The PEM files of the edge's own certificate.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `API_TLS_CERT`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `API_TLS_KEY`: its private key.
    pub key: PathBuf,
}

/// All of api-service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `API_HTTP_ADDR`.
    pub http_addr: SocketAddr,
    /// `API_AUTH_URL`: auth-service's gRPC endpoint.
    pub auth_url: String,
    /// `API_AUTH_CLIENT_KEY`: sent as `x-client-key`.
    pub auth_client_key: Option<SecretString>,
    /// `API_AUTH_TIMEOUT`: deadline of one call to auth-service.
    pub auth_timeout: Duration,
    /// `API_AUTH_WECHAT_TIMEOUT`: deadline of a call that waits on WeChat (login, phone
    /// number); at least twice `AUTH_WECHAT_TIMEOUT` plus slack, since a busy WeChat is retried
    /// once.
    pub auth_wechat_timeout: Duration,
    /// `API_DATABASE_URL`: where the business data lives.
    pub database: DatabaseSettings,
    /// `API_TLS_CERT` and `API_TLS_KEY`, when both are set.
    pub tls: Option<TlsSettings>,
    /// `API_METRICS_ADDR`.
    pub metrics_addr: SocketAddr,
    /// `API_REQUEST_TIMEOUT`: the longest a request may take.
    pub request_timeout: Duration,
    /// `API_IDLE_TIMEOUT`: the longest an HTTP/1.1 connection may go without sending a whole
    /// request head, idle between requests included, before it is closed.
    pub idle_timeout: Duration,
    /// `API_BODY_LIMIT`: the largest request body, in bytes.
    pub body_limit: usize,
    /// `API_TRUSTED_PROXY_HOPS`: how many proxies in front of the edge append to
    /// `X-Forwarded-For` (0: the client is the TCP peer).
    pub trusted_proxy_hops: usize,
    /// `API_AUTH_CONNECTIONS`: how many HTTP/2 connections to auth-service calls are spread
    /// over, in turn (kube-proxy spreads connections over the replicas, not calls).
    pub auth_connections: usize,
    /// `API_REDIS_URL` (`redis://` or `rediss://`; may hold a password): profile stamps, so
    /// that replicas on PostgreSQL can keep profiles in memory. `None`: every replica on
    /// PostgreSQL reads each profile from the database.
    pub redis_url: Option<SecretString>,
    /// `API_DRAIN_DELAY`: after SIGTERM, how long /readyz answers 503 before the port closes.
    pub drain_delay: Duration,
    /// `API_SHUTDOWN_GRACE`: then, how long in-flight requests may take.
    pub shutdown_grace: Duration,
    /// `API_WORKER_THREADS`: the async runtime's worker threads; `None` (unset): one per CPU
    /// the process may use. Lower it when the process shares its cores with others (the
    /// whole pair on one machine; see the README's benchmarks).
    pub worker_threads: Option<NonZeroUsize>,
}

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get`; an empty value counts as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());

        let auth_url = get("API_AUTH_URL").unwrap_or_else(|| "http://127.0.0.1:50051".into());
        let parsed = url::Url::parse(auth_url.trim())
            .ok()
            .filter(|u| u.scheme() == "http" && u.host().is_some());
        if parsed.is_none() {
            // auth-service serves plaintext HTTP/2 only (inside the cluster's network, behind
            // its NetworkPolicy); an https:// URL could never be reached, so it is refused here
            // rather than turning every call into a 503.
            return Err(bad(
                "API_AUTH_URL",
                "must be an http:// URL like http://127.0.0.1:50051 (auth-service speaks plaintext gRPC)",
            ));
        }

        // Trimmed, as auth-service trims the keys it accepts: a stray newline from a mounted
        // file would otherwise fail every call.
        let auth_client_key = get("API_AUTH_CLIENT_KEY").map(|k| SecretString::from(k.trim()));
        if auth_client_key
            .as_ref()
            .is_some_and(|k| k.expose_secret().len() < 32 || !k.expose_secret().is_ascii())
        {
            return Err(bad(
                "API_AUTH_CLIENT_KEY",
                "must be at least 32 ASCII characters",
            ));
        }

        // Idempotency keys stay in the database, written in the same transaction as the note
        // (stronger than Redis could make them); Redis holds the profiles' stamps.
        // Checked as redis-rs will read it, as auth-service checks AUTH_REDIS_URL, even where
        // SQLite leaves it unused: a malformed URL is a mistake whichever database is set.
        let redis_url = get("API_REDIS_URL")
            .map(|url| {
                shared::LazyRedis::check_url(&url).map_err(|problem| bad("API_REDIS_URL", problem))
            })
            .transpose()?;
        let pool_size = shared::postgres::pool_size(get("API_DATABASE_MAX_CONNECTIONS").as_deref())
            .map_err(|problem| bad("API_DATABASE_MAX_CONNECTIONS", problem))?;
        let database = database(get("API_DATABASE_URL"), pool_size)?;

        let tls = match (get("API_TLS_CERT"), get("API_TLS_KEY")) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert: cert.into(),
                key: key.into(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(bad("API_TLS_KEY", "is required when API_TLS_CERT is set"));
            }
            (None, Some(_)) => {
                return Err(bad("API_TLS_CERT", "is required when API_TLS_KEY is set"));
            }
        };

        let body_limit = number(
            &get,
            "API_BODY_LIMIT",
            DEFAULT_BODY_LIMIT,
            1024..=16 * 1024 * 1024,
            "must be a byte count from 1024 to 16777216",
        )?;
        let auth_connections = number(
            &get,
            "API_AUTH_CONNECTIONS",
            4,
            1..=32,
            "must be a whole number from 1 to 32",
        )?;
        let trusted_proxy_hops = number(
            &get,
            "API_TRUSTED_PROXY_HOPS",
            0,
            0..=10,
            "must be a whole number from 0 to 10",
        )?;

        let settings = Self {
            http_addr: addr(&get, "API_HTTP_ADDR", "127.0.0.1:8080")?,
            auth_url: auth_url.trim().to_owned(),
            auth_client_key,
            auth_timeout: duration(&get, "API_AUTH_TIMEOUT", "3s", AUTH_TIMEOUT_MAX)?,
            auth_wechat_timeout: duration(
                &get,
                "API_AUTH_WECHAT_TIMEOUT",
                "15s",
                AUTH_WECHAT_TIMEOUT_MAX,
            )?,
            database,
            tls,
            metrics_addr: addr(&get, "API_METRICS_ADDR", "127.0.0.1:9102")?,
            request_timeout: duration(&get, "API_REQUEST_TIMEOUT", "30s", REQUEST_TIMEOUT_MAX)?,
            idle_timeout: duration(&get, "API_IDLE_TIMEOUT", "75s", IDLE_TIMEOUT_MAX)?,
            body_limit,
            trusted_proxy_hops,
            auth_connections,
            redis_url,
            drain_delay: duration(&get, "API_DRAIN_DELAY", "0s", DRAIN_DELAY_MAX)?,
            shutdown_grace: duration(&get, "API_SHUTDOWN_GRACE", "20s", SHUTDOWN_GRACE_MAX)?,
            worker_threads: shared::runtime::worker_threads(get("API_WORKER_THREADS").as_deref())
                .map_err(|problem| bad("API_WORKER_THREADS", problem))?,
        };
        let mut settings = settings;
        if get("API_AUTH_WECHAT_TIMEOUT").is_none() {
            // Unset: never shorter than the ordinary deadline.
            settings.auth_wechat_timeout = settings.auth_wechat_timeout.max(settings.auth_timeout);
        }
        if settings.auth_wechat_timeout < settings.auth_timeout {
            return Err(bad(
                "API_AUTH_WECHAT_TIMEOUT",
                "must be at least API_AUTH_TIMEOUT",
            ));
        }
        if settings.auth_timeout.is_zero() {
            return Err(bad("API_AUTH_TIMEOUT", "must be more than 0"));
        }
        if settings.request_timeout.is_zero() {
            return Err(bad("API_REQUEST_TIMEOUT", "must be more than 0"));
        }
        if settings.idle_timeout.is_zero() {
            return Err(bad("API_IDLE_TIMEOUT", "must be more than 0"));
        }
        Ok(settings)
    }
}

fn addr(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    get(name)
        .unwrap_or_else(|| default.into())
        .trim()
        .parse()
        .map_err(|_| bad(name, "must be an address like 127.0.0.1:8080"))
}

/// A whole-number setting within `range`; `default` when unset; else `problem`.
fn number(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
    problem: &str,
) -> Result<usize, ConfigError> {
    match get(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| bad(name, problem)),
    }
}

/// A duration setting's longest accepted value, and how the error names it: far above any
/// sensible one, and low enough that no arithmetic done with it (`Instant + deadline`) can
/// overflow at run time.
type Max = (Duration, &'static str);
const MINUTE: u64 = 60;
const AUTH_TIMEOUT_MAX: Max = (Duration::from_secs(MINUTE), "1m");
const AUTH_WECHAT_TIMEOUT_MAX: Max = (Duration::from_secs(10 * MINUTE), "10m");
const REQUEST_TIMEOUT_MAX: Max = (Duration::from_secs(10 * MINUTE), "10m");
const IDLE_TIMEOUT_MAX: Max = (Duration::from_secs(60 * MINUTE), "1h");
const DRAIN_DELAY_MAX: Max = (Duration::from_secs(10 * MINUTE), "10m");
const SHUTDOWN_GRACE_MAX: Max = (Duration::from_secs(60 * MINUTE), "1h");

/// A duration setting, at most `max`.
fn duration(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: &str,
    (max, max_text): Max,
) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(get(name).as_deref().unwrap_or(default).trim())
        .map_err(|_| bad(name, "must be a duration like 500ms, 3s or 1m"))?;
    if d > max {
        return Err(bad(name, format!("must be at most {max_text}")));
    }
    Ok(d)
}

fn database(url: Option<String>, max_connections: u32) -> Result<DatabaseSettings, ConfigError> {
    const NAME: &str = "API_DATABASE_URL";
    let url = url.unwrap_or_else(|| "sqlite://./data/api.db".into());
    let url = url.trim();
    if let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let path = rest.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" {
            return Err(bad(NAME, "needs a file path, like sqlite://./data/api.db"));
        }
        return Ok(DatabaseSettings::Sqlite { path: path.into() });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // Checked here so that a malformed URL stops the start; the error is not echoed,
        // as it could quote the password.
        if sqlx::postgres::PgConnectOptions::from_str(url).is_err() {
            return Err(bad(
                NAME,
                "is not a valid PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE)",
            ));
        }
        return Ok(DatabaseSettings::Postgres {
            url: SecretString::from(url),
            max_connections,
        });
    }
    Err(bad(NAME, "must start with sqlite:// or postgres://"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(env: &[(&'static str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<&str, String> = env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        Settings::from_lookup(|k| env.get(k).cloned())
    }

    #[test]
    fn every_duration_has_an_upper_bound_named_at_start_up() {
        // At its bound a setting is taken; a second more, or a value that would overflow
        // `Instant + deadline` on every request, stops start-up naming it.
        for (name, max) in [
            ("API_AUTH_TIMEOUT", "1m"),
            ("API_AUTH_WECHAT_TIMEOUT", "10m"),
            ("API_REQUEST_TIMEOUT", "10m"),
            ("API_IDLE_TIMEOUT", "1h"),
            ("API_DRAIN_DELAY", "10m"),
            ("API_SHUTDOWN_GRACE", "1h"),
        ] {
            if let Err(e) = load(&[(name, max)]) {
                panic!("{name}={max} is refused: {e}");
            }
            for over in [format!("{max} 1s"), "100000000000y".into()] {
                let err = load(&[(name, &over)]).expect_err(&over);
                assert_eq!(err.name, name, "{over}: {err}");
                assert!(
                    err.to_string().ends_with(&format!("at most {max}")),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn four_connections_to_auth_service_unless_set() {
        assert_eq!(load(&[]).expect("valid").auth_connections, 4);
        assert_eq!(
            load(&[("API_AUTH_CONNECTIONS", " 1 ")])
                .expect("valid")
                .auth_connections,
            1
        );
        for bad in ["0", "33", "many"] {
            assert_eq!(
                load(&[("API_AUTH_CONNECTIONS", bad)]).expect_err(bad).name,
                "API_AUTH_CONNECTIONS"
            );
        }
    }

    #[test]
    fn the_client_key_is_trimmed_as_auth_service_trims_its_keys() {
        let key = "k".repeat(32);
        let s = load(&[("API_AUTH_CLIENT_KEY", &format!("{key}\n"))]).expect("valid");
        assert_eq!(
            s.auth_client_key
                .as_ref()
                .map(|k| k.expose_secret().to_owned()),
            Some(key)
        );
    }

    #[test]
    fn the_default_body_limit_takes_the_largest_note_however_it_is_escaped() {
        use crate::notes::{BODY_MAX_CHARS, TITLE_MAX_CHARS};
        let escaped = |n: usize| "\\ud83d\\ude00".repeat(n);
        let body = format!(
            r#"{{"title": "{}", "body": "{}"}}"#,
            escaped(TITLE_MAX_CHARS),
            escaped(BODY_MAX_CHARS)
        );
        let note: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(
            note["body"].as_str().map(|b| b.chars().count()),
            Some(BODY_MAX_CHARS)
        );
        assert!(body.len() <= DEFAULT_BODY_LIMIT, "{} bytes", body.len());
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = load(&[]).expect("valid");
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.auth_url, "http://127.0.0.1:50051");
        assert_eq!(s.metrics_addr.to_string(), "127.0.0.1:9102");
        assert!(s.tls.is_none());
        assert!(s.auth_client_key.is_none());
        assert!(
            matches!(s.database, DatabaseSettings::Sqlite { ref path } if path.ends_with("data/api.db"))
        );
        assert_eq!(s.body_limit, 131_072);
        assert_eq!(s.worker_threads, None);
        let s = load(&[("API_WORKER_THREADS", "3")]).expect("valid");
        assert_eq!(s.worker_threads.map(NonZeroUsize::get), Some(3));
        let err = load(&[("API_WORKER_THREADS", "0")]).expect_err("zero");
        assert_eq!(err.name, "API_WORKER_THREADS");
    }

    #[test]
    fn malformed_settings_are_named_without_their_value() {
        let cases: [(&'static str, &str); 18] = [
            ("API_HTTP_ADDR", "localhost:80"),
            ("API_AUTH_URL", "grpc-server"),
            ("API_AUTH_URL", "https://auth-service:50051"),
            ("API_AUTH_CLIENT_KEY", "short-key-value"),
            ("API_AUTH_TIMEOUT", "soon"),
            ("API_DATABASE_URL", "mysql://db"),
            (
                "API_DATABASE_URL",
                "postgres://api:pw-secret@db:notaport/api",
            ),
            ("API_DATABASE_URL", "sqlite://:memory:"),
            ("API_REDIS_URL", "memcached://127.0.0.1"),
            ("API_BODY_LIMIT", "12"),
            ("API_TRUSTED_PROXY_HOPS", "many"),
            ("API_WORKER_THREADS", "-3"),
            ("API_WORKER_THREADS", "5000"),
            ("API_WORKER_THREADS", "all"),
            ("API_DATABASE_MAX_CONNECTIONS", "-2"),
            ("API_DATABASE_MAX_CONNECTIONS", "5000"),
            ("API_DATABASE_MAX_CONNECTIONS", "many"),
            ("API_TLS_CERT", "/tmp/cert.pem"),
        ];
        for (name, value) in cases {
            let err = load(&[(name, value)]).expect_err(name);
            let expected = if name == "API_TLS_CERT" {
                "API_TLS_KEY"
            } else {
                name
            };
            assert_eq!(err.name, expected, "{value}");
            assert!(!err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn a_redis_url_redis_rs_cannot_read_stops_start_up_without_being_quoted() {
        // Arrange
        let url = "redis://:pw-secret@redis.internal:6379/not-a-db";

        // Act
        let err = load(&[("API_REDIS_URL", url)]).expect_err("not a database number");

        // Assert
        assert_eq!(err.name, "API_REDIS_URL");
        assert!(err.problem.contains("is not usable"), "{err}");
        assert!(!err.to_string().contains("pw-secret"), "{err}");
    }

    #[test]
    fn redis_urls_are_kept_trimmed_and_secret() {
        // Arrange
        let urls = [
            "redis://127.0.0.1:6379",
            " redis://:pw-secret@10.0.0.5:6380/2 ",
            "rediss://user:pw-secret@redis.internal",
        ];

        for url in urls {
            // Act
            let s = load(&[("API_REDIS_URL", url)]).expect(url);

            // Assert
            assert_eq!(
                s.redis_url.as_ref().map(|u| u.expose_secret().to_owned()),
                Some(url.trim().to_owned())
            );
            assert!(!format!("{s:?}").contains("pw-secret"), "{url}");
        }
    }

    #[test]
    fn calls_that_wait_on_wechat_get_their_own_longer_deadline() {
        let s = load(&[]).expect("valid");
        assert_eq!(s.auth_timeout, std::time::Duration::from_secs(3));
        assert_eq!(s.auth_wechat_timeout, std::time::Duration::from_secs(15));
        let err = load(&[
            ("API_AUTH_TIMEOUT", "10s"),
            ("API_AUTH_WECHAT_TIMEOUT", "5s"),
        ])
        .expect_err("shorter than the ordinary deadline");
        assert_eq!(err.name, "API_AUTH_WECHAT_TIMEOUT");
    }

    #[test]
    fn tls_needs_both_files() {
        let s = load(&[("API_TLS_CERT", "/c.pem"), ("API_TLS_KEY", "/k.pem")]).expect("valid");
        assert!(s.tls.is_some());
        assert_eq!(
            load(&[("API_TLS_KEY", "/k.pem")])
                .expect_err("no cert")
                .name,
            "API_TLS_CERT"
        );
    }

    #[test]
    fn the_database_is_sqlite_or_postgres_and_its_url_stays_secret() {
        let s = load(&[("API_DATABASE_URL", "sqlite:///var/lib/api/api.db")]).expect("sqlite");
        assert!(
            matches!(s.database, DatabaseSettings::Sqlite { ref path } if path == &PathBuf::from("/var/lib/api/api.db"))
        );
        for url in [
            "postgres://api:pw-secret@db.internal:5432/api",
            "postgresql://api:pw-secret@db.internal/api?sslmode=require",
        ] {
            let s = load(&[("API_DATABASE_URL", url)]).expect(url);
            let DatabaseSettings::Postgres {
                url: ref kept,
                max_connections,
            } = s.database
            else {
                panic!("{url} must select PostgreSQL");
            };
            assert_eq!(kept.expose_secret(), url);
            assert_eq!(max_connections, 10);
            let printed = format!("{s:?}");
            assert!(!printed.contains("pw-secret"), "{printed}");
        }
        let s = load(&[
            ("API_DATABASE_URL", "postgres://api@db/api"),
            ("API_DATABASE_MAX_CONNECTIONS", "25"),
        ])
        .expect("valid");
        assert!(matches!(
            s.database,
            DatabaseSettings::Postgres {
                max_connections: 25,
                ..
            }
        ));
    }
}
