//! auth-service's settings, read from the environment (names fixed by CONTRACT.md).
//!
//! Every setting is parsed here, once, at start-up; a missing or malformed one stops the
//! process with a message that names it. Secrets are `SecretString`s: their Debug output is
//! redacted, so logging the settings never shows them.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::domain::{Rate, SessionPolicy};

/// A setting that is missing or malformed.
#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub name: &'static str,
    /// What is wrong with it (never its value when it is a secret).
    pub problem: String,
}

fn bad(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        problem: problem.into(),
    }
}

/// Where data lives.
#[derive(Debug, Clone)]
pub enum DatabaseSettings {
    /// An SQLite file (the embedded default).
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database, shared by every replica.
    Postgres {
        /// `postgres://USER:PASSWORD@HOST:PORT/DB` (a secret: it may hold the password).
        url: SecretString,
        /// `AUTH_DATABASE_MAX_CONNECTIONS`: the most connections this process opens.
        max_connections: u32,
    },
}

/// WeChat's server API.
#[derive(Debug, Clone)]
pub struct WechatSettings {
    /// The mini-program's appid.
    pub appid: String,
    /// The mini-program's app secret.
    pub secret: SecretString,
    /// Base URL of WeChat's server API (a simulator in dev and tests).
    pub api_base: reqwest::Url,
    /// Time limit of one call.
    pub timeout: Duration,
}

/// All of auth-service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `AUTH_GRPC_ADDR`.
    pub grpc_addr: SocketAddr,
    /// `AUTH_DATABASE_URL`.
    pub database: DatabaseSettings,
    /// `AUTH_REDIS_URL` (`redis://` or `rediss://`; may hold a password): the cache shared by
    /// replicas. `None`: the in-process cache.
    pub redis_url: Option<SecretString>,
    /// `WECHAT_APPID`, `WECHAT_SECRET`, `WECHAT_API_BASE`, `AUTH_WECHAT_TIMEOUT`.
    pub wechat: WechatSettings,
    /// `AUTH_TOKEN_KEY`: keys token hashing and encryption at rest.
    pub token_key: SecretString,
    /// `AUTH_SESSION_POLICY` with `AUTH_MAX_SESSIONS`.
    pub session_policy: SessionPolicy,
    /// `AUTH_ACCESS_TTL`.
    pub access_ttl: Duration,
    /// `AUTH_REFRESH_TTL`.
    pub refresh_ttl: Duration,
    /// `AUTH_REFRESH_GRACE`.
    pub refresh_grace: Duration,
    /// `AUTH_HISTORY_RETENTION`: ended sessions and timeline events older than this are
    /// deleted by housekeeping. At least `AUTH_REFRESH_TTL` plus [`HISTORY_MARGIN`], so that
    /// every token row of a session is gone before the session is.
    pub history_retention: Duration,
    /// `AUTH_LOGIN_RATE`.
    pub login_rate: Rate,
    /// `AUTH_PHONE_RATE`.
    pub phone_rate: Rate,
    /// `AUTH_REFRESH_RATE`.
    pub refresh_rate: Rate,
    /// `AUTH_CLIENT_KEYS`: empty means any caller may call (dev only).
    pub client_keys: Vec<SecretString>,
    /// `AUTH_OPERATOR_KEYS`: when set, the operators' RPCs (`RevokeUser`,
    /// `ListSessionEvents`, `GetWechatAccessToken`) need one of these, and a key of
    /// `AUTH_CLIENT_KEYS` is refused for them; these keys may call every RPC.
    pub operator_keys: Vec<SecretString>,
    /// `AUTH_METRICS_ADDR`.
    pub metrics_addr: SocketAddr,
    /// `AUTH_MAX_CONNECTION_AGE`: connections are closed gracefully (GOAWAY) after this long,
    /// so that clients connect again and spread over new replicas; `None` (unset or 0): never.
    pub max_connection_age: Option<Duration>,
    /// `AUTH_DRAIN_DELAY`: after SIGTERM, how long to keep serving while reporting
    /// NOT_SERVING, so load balancers stop sending new calls before the port closes.
    pub drain_delay: Duration,
    /// `AUTH_SHUTDOWN_GRACE`: how long in-flight calls may take to finish after that.
    pub shutdown_grace: Duration,
    /// `AUTH_VERIFY_CACHE_SIZE`: how many access tokens' facts `Verify` keeps in memory, so
    /// that a live session costs a mark look-up instead of a database read; 0 turns it off.
    pub verify_cache_size: usize,
    /// `AUTH_WORKER_THREADS`: the async runtime's worker threads; `None` (unset): one per CPU
    /// the process may use. Lower it when the process shares its cores with others (the
    /// whole pair on one machine; see the README's benchmarks).
    pub worker_threads: Option<NonZeroUsize>,
}

/// Smallest accepted length, in bytes, of `AUTH_TOKEN_KEY` and of each client key.
const MIN_SECRET_BYTES: usize = 32;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
/// The longest accepted value of a duration setting, and how the error names it.
type Max = (Duration, &'static str);
/// The longest accepted value of each duration setting: far above any sensible one, and low
/// enough that no arithmetic done with it (`AUTH_WECHAT_TIMEOUT * 8`, `Instant + ttl`, a
/// timestamp) can overflow at run time.
/// A renewal of the app's token holds its PostgreSQL row for two WeChat calls at most (one
/// retry of -1) within the store's 60 s hold (`APP_TOKEN_LOCK_HOLD`), past which PostgreSQL
/// ends the transaction and the renewed token would be lost.
const WECHAT_TIMEOUT_MAX: Max = (Duration::from_secs(25), "25s");
const ACCESS_TTL_MAX: Max = (Duration::from_secs(30 * DAY), "30d");
const REFRESH_TTL_MAX: Max = (Duration::from_secs(3650 * DAY), "3650d");
const REFRESH_GRACE_MAX: Max = (Duration::from_secs(5 * MINUTE), "5m");
const MAX_CONNECTION_AGE_MAX: Max = (Duration::from_secs(30 * DAY), "30d");
const DRAIN_DELAY_MAX: Max = (Duration::from_secs(10 * MINUTE), "10m");
const SHUTDOWN_GRACE_MAX: Max = (Duration::from_secs(HOUR), "1h");
const HISTORY_RETENTION_MAX: Max = (Duration::from_secs(3660 * DAY), "3660d");
/// `AUTH_HISTORY_RETENTION`'s default, unless `AUTH_REFRESH_TTL` + [`HISTORY_MARGIN`] is
/// longer.
const HISTORY_RETENTION_DEFAULT: Duration = Duration::from_secs(90 * DAY);
/// How much longer than `AUTH_REFRESH_TTL` the history is kept at least: the day expired
/// token rows are kept (to answer `token_expired`), and a day of slack.
pub const HISTORY_MARGIN: Duration = Duration::from_secs(2 * DAY);

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get` (the environment, or a map in tests). An empty
    /// value counts as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let required = |name: &'static str| get(name).ok_or_else(|| bad(name, "is required"));

        let grpc_addr = addr(&get, "AUTH_GRPC_ADDR", "127.0.0.1:50051")?;
        let metrics_addr = addr(&get, "AUTH_METRICS_ADDR", "127.0.0.1:9101")?;

        let pool_size =
            shared::postgres::pool_size(get("AUTH_DATABASE_MAX_CONNECTIONS").as_deref())
                .map_err(|problem| bad("AUTH_DATABASE_MAX_CONNECTIONS", problem))?;
        let database = database(get("AUTH_DATABASE_URL"), pool_size)?;
        let redis_url = get("AUTH_REDIS_URL").map(redis_url).transpose()?;

        let appid = required("WECHAT_APPID")?;
        if !appid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad("WECHAT_APPID", "must be letters, digits, `_` or `-`"));
        }
        let secret = SecretString::from(required("WECHAT_SECRET")?);
        let api_base = api_base(
            get("WECHAT_API_BASE")
                .as_deref()
                .unwrap_or("https://api.weixin.qq.com"),
        )?;
        let wechat = WechatSettings {
            appid,
            secret,
            api_base,
            timeout: duration(&get, "AUTH_WECHAT_TIMEOUT", "5s", WECHAT_TIMEOUT_MAX)?,
        };

        let token_key = SecretString::from(required("AUTH_TOKEN_KEY")?);
        if token_key.expose_secret().len() < MIN_SECRET_BYTES {
            return Err(bad(
                "AUTH_TOKEN_KEY",
                format!("must be at least {MIN_SECRET_BYTES} bytes"),
            ));
        }

        let max_sessions = match get("AUTH_MAX_SESSIONS") {
            None => 5,
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| bad("AUTH_MAX_SESSIONS", "must be a whole number"))?,
        };
        let policy = get("AUTH_SESSION_POLICY").unwrap_or_else(|| "multi".into());
        let session_policy = SessionPolicy::parse(policy.trim(), max_sessions)
            .map_err(|e| bad(e.field, e.message))?;

        let rate = |setting: &'static str, default: &str| {
            Rate::parse(setting, &get(setting).unwrap_or_else(|| default.into()))
                .map_err(|e| bad(e.field, e.message))
        };
        let login_rate = rate("AUTH_LOGIN_RATE", "600/min")?;
        let phone_rate = rate("AUTH_PHONE_RATE", "10/min")?;
        let refresh_rate = rate("AUTH_REFRESH_RATE", "10/min")?;

        let client_keys = keys(&get, "AUTH_CLIENT_KEYS")?;
        let operator_keys = keys(&get, "AUTH_OPERATOR_KEYS")?;
        if operator_keys.iter().any(|o| {
            client_keys
                .iter()
                .any(|c| c.expose_secret() == o.expose_secret())
        }) {
            return Err(bad(
                "AUTH_OPERATOR_KEYS",
                "a key is also in AUTH_CLIENT_KEYS: an operator's key must be its own",
            ));
        }

        let verify_cache_size = match get("AUTH_VERIFY_CACHE_SIZE") {
            None => 100_000,
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| bad("AUTH_VERIFY_CACHE_SIZE", "must be a whole number"))?,
        };

        let worker_threads = shared::runtime::worker_threads(get("AUTH_WORKER_THREADS").as_deref())
            .map_err(|problem| bad("AUTH_WORKER_THREADS", problem))?;

        let mut settings = Self {
            grpc_addr,
            database,
            redis_url,
            wechat,
            token_key,
            session_policy,
            access_ttl: duration(&get, "AUTH_ACCESS_TTL", "2h", ACCESS_TTL_MAX)?,
            refresh_ttl: duration(&get, "AUTH_REFRESH_TTL", "30d", REFRESH_TTL_MAX)?,
            refresh_grace: duration(&get, "AUTH_REFRESH_GRACE", "10s", REFRESH_GRACE_MAX)?,
            history_retention: Duration::ZERO,
            login_rate,
            phone_rate,
            refresh_rate,
            client_keys,
            operator_keys,
            metrics_addr,
            max_connection_age: Some(duration(
                &get,
                "AUTH_MAX_CONNECTION_AGE",
                "0s",
                MAX_CONNECTION_AGE_MAX,
            )?)
            .filter(|d| !d.is_zero()),
            drain_delay: duration(&get, "AUTH_DRAIN_DELAY", "0s", DRAIN_DELAY_MAX)?,
            shutdown_grace: duration(&get, "AUTH_SHUTDOWN_GRACE", "20s", SHUTDOWN_GRACE_MAX)?,
            verify_cache_size,
            worker_threads,
        };
        if settings.access_ttl.is_zero() {
            return Err(bad("AUTH_ACCESS_TTL", "must be more than 0"));
        }
        if settings.refresh_ttl < settings.access_ttl {
            return Err(bad("AUTH_REFRESH_TTL", "must be at least AUTH_ACCESS_TTL"));
        }
        let least = settings.refresh_ttl + HISTORY_MARGIN;
        settings.history_retention = match get("AUTH_HISTORY_RETENTION") {
            None => HISTORY_RETENTION_DEFAULT.max(least),
            Some(_) => {
                let d = duration(&get, "AUTH_HISTORY_RETENTION", "", HISTORY_RETENTION_MAX)?;
                if d < least {
                    return Err(bad(
                        "AUTH_HISTORY_RETENTION",
                        format!(
                            "must be at least AUTH_REFRESH_TTL plus 2 days ({}d): a session's \
                             tokens must be gone before it is",
                            least.as_secs().div_ceil(DAY)
                        ),
                    ));
                }
                d
            }
        };
        if settings.wechat.timeout.is_zero() {
            return Err(bad("AUTH_WECHAT_TIMEOUT", "must be more than 0"));
        }
        Ok(settings)
    }
}

/// A comma-separated list of keys (spaces around each trimmed), each at least
/// [`MIN_SECRET_BYTES`] long; unset: none.
fn keys(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Vec<SecretString>, ConfigError> {
    let Some(raw) = get(name) else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, key)| {
            if key.len() < MIN_SECRET_BYTES {
                return Err(bad(
                    name,
                    format!("key #{} is shorter than {MIN_SECRET_BYTES} bytes", i + 1),
                ));
            }
            Ok(SecretString::from(key.to_owned()))
        })
        .collect()
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
        .map_err(|_| bad(name, "must be an address like 127.0.0.1:50051"))
}

/// A duration setting, at most `max`.
fn duration(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: &str,
    (max, max_text): Max,
) -> Result<Duration, ConfigError> {
    let d =
        humantime::parse_duration(get(name).as_deref().unwrap_or(default).trim()).map_err(|e| {
            bad(
                name,
                format!("must be a duration like 10s, 2h or 30d ({e})"),
            )
        })?;
    if d > max {
        return Err(bad(name, format!("must be at most {max_text}")));
    }
    Ok(d)
}

/// `WECHAT_API_BASE`, its path ending with `/`: the calls' paths are joined to it
/// (`Url::join("sns/jscode2session")`), which would replace a last segment without one
/// (`http://gw/wechat` would call `http://gw/sns/jscode2session`) and drop any query or
/// fragment (refused, then).
fn api_base(raw: &str) -> Result<reqwest::Url, ConfigError> {
    const NAME: &str = "WECHAT_API_BASE";
    let mut url = reqwest::Url::parse(raw.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| bad(NAME, "must be an http:// or https:// URL"))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(NAME, "must have no query (`?…`) or fragment (`#…`)"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Checks `AUTH_REDIS_URL` as redis-rs will read it, without echoing it (it may hold a
/// password).
fn redis_url(url: String) -> Result<SecretString, ConfigError> {
    shared::LazyRedis::check_url(&url).map_err(|problem| bad("AUTH_REDIS_URL", problem))
}

fn database(url: Option<String>, max_connections: u32) -> Result<DatabaseSettings, ConfigError> {
    const NAME: &str = "AUTH_DATABASE_URL";
    let url = url.unwrap_or_else(|| "sqlite://./data/auth.db".into());
    let url = url.trim();
    if let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let path = rest.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" {
            return Err(bad(NAME, "needs a file path, like sqlite://./data/auth.db"));
        }
        return Ok(DatabaseSettings::Sqlite { path: path.into() });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // Checked as sqlx will read it; its message is not passed on (it could quote the
        // password).
        if sqlx::postgres::PgConnectOptions::from_str(url).is_err() {
            return Err(bad(
                NAME,
                "is not a valid PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DB)",
            ));
        }
        return Ok(DatabaseSettings::Postgres {
            url: SecretString::from(url.to_owned()),
            max_connections,
        });
    }
    Err(bad(
        NAME,
        "must start with sqlite://, postgres:// or postgresql://",
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn base() -> HashMap<&'static str, String> {
        HashMap::from([
            ("WECHAT_APPID", "wx1234567890abcdef".to_string()),
            ("WECHAT_SECRET", "s3cr3t-value".to_string()),
            ("AUTH_TOKEN_KEY", "k".repeat(32)),
        ])
    }

    fn load(env: &HashMap<&'static str, String>) -> Result<Settings, ConfigError> {
        Settings::from_lookup(|k| env.get(k).cloned())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = load(&base()).expect("valid");
        assert_eq!(s.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(s.metrics_addr.to_string(), "127.0.0.1:9101");
        assert_eq!(s.session_policy, SessionPolicy::Multi { max: 5 });
        assert_eq!(s.access_ttl, Duration::from_secs(7200));
        assert_eq!(s.refresh_ttl, Duration::from_secs(30 * 86400));
        assert_eq!(s.refresh_grace, Duration::from_secs(10));
        assert_eq!(s.wechat.timeout, Duration::from_secs(5));
        assert_eq!(s.wechat.api_base.as_str(), "https://api.weixin.qq.com/");
        assert_eq!(s.login_rate.count, 600);
        assert_eq!(
            (s.phone_rate.count, s.phone_rate.window),
            (10, Duration::from_secs(60))
        );
        assert_eq!(
            (s.refresh_rate.count, s.refresh_rate.window),
            (10, Duration::from_secs(60))
        );
        assert!(s.client_keys.is_empty());
        assert_eq!(s.verify_cache_size, 100_000);
        assert!(
            matches!(s.database, DatabaseSettings::Sqlite { ref path } if path.ends_with("data/auth.db"))
        );
    }

    #[test]
    fn worker_threads_are_one_per_cpu_unless_set() {
        assert_eq!(load(&base()).expect("valid").worker_threads, None);
        let mut env = base();
        env.insert("AUTH_WORKER_THREADS", " 1 ".into());
        assert_eq!(
            load(&env)
                .expect("valid")
                .worker_threads
                .map(NonZeroUsize::get),
            Some(1)
        );
        env.insert("AUTH_WORKER_THREADS", "0".into());
        assert_eq!(load(&env).expect_err("zero").name, "AUTH_WORKER_THREADS");
    }

    #[test]
    fn max_connection_age_is_off_unless_set() {
        assert_eq!(load(&base()).expect("valid").max_connection_age, None);
        let mut env = base();
        env.insert("AUTH_MAX_CONNECTION_AGE", "5m".into());
        assert_eq!(
            load(&env).expect("valid").max_connection_age,
            Some(Duration::from_secs(300))
        );
        env.insert("AUTH_MAX_CONNECTION_AGE", "soon".into());
        assert_eq!(
            load(&env).expect_err("malformed").name,
            "AUTH_MAX_CONNECTION_AGE"
        );
    }

    #[test]
    fn each_missing_required_setting_is_named() {
        for name in ["WECHAT_APPID", "WECHAT_SECRET", "AUTH_TOKEN_KEY"] {
            let mut env = base();
            env.remove(name);
            let err = load(&env).expect_err(name);
            assert_eq!(err.name, name);
        }
    }

    #[test]
    fn malformed_settings_are_named_and_secrets_not_echoed() {
        let cases = [
            ("AUTH_TOKEN_KEY", "short-secret-value"),
            ("AUTH_GRPC_ADDR", "localhost"),
            ("AUTH_ACCESS_TTL", "two hours"),
            ("AUTH_SESSION_POLICY", "many"),
            ("AUTH_MAX_SESSIONS", "-1"),
            ("AUTH_LOGIN_RATE", "lots"),
            ("AUTH_PHONE_RATE", "0/min"),
            ("AUTH_REFRESH_RATE", "10/week"),
            ("AUTH_CLIENT_KEYS", "tiny-client-key"),
            ("WECHAT_API_BASE", "ftp://x"),
            ("AUTH_DATABASE_URL", "mysql://x"),
            ("AUTH_DATABASE_URL", "postgres://u:pw-secret@h:port/db"),
            ("AUTH_REDIS_URL", "http://127.0.0.1:6379"),
            (
                "AUTH_REDIS_URL",
                "redis://:pw-secret@127.0.0.1:6379/not-a-db",
            ),
            ("AUTH_REDIS_URL", "redis//:pw-secret@127.0.0.1"),
            ("AUTH_WECHAT_TIMEOUT", "0s"),
            ("AUTH_VERIFY_CACHE_SIZE", "lots"),
            ("AUTH_WORKER_THREADS", "-3"),
            ("AUTH_WORKER_THREADS", "5000"),
            ("AUTH_WORKER_THREADS", "two"),
            ("AUTH_DATABASE_MAX_CONNECTIONS", "-2"),
            ("AUTH_DATABASE_MAX_CONNECTIONS", "5000"),
            ("AUTH_DATABASE_MAX_CONNECTIONS", "many"),
        ];
        for (name, value) in cases {
            let mut env = base();
            env.insert(name, value.to_string());
            let err = load(&env).expect_err(name);
            assert_eq!(err.name, name, "{value}");
            assert!(!err.to_string().contains(value), "{err} echoes {value}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut env = base();
        env.insert(
            "AUTH_CLIENT_KEYS",
            format!("{},{}", "c".repeat(32), "d".repeat(33)),
        );
        let s = load(&env).expect("valid");
        assert_eq!(s.client_keys.len(), 2);
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("s3cr3t-value"));
        assert!(!dbg.contains(&"k".repeat(32)));
        assert!(!dbg.contains(&"c".repeat(32)));
    }

    #[test]
    fn redis_urls_are_accepted_and_kept_secret() {
        assert!(load(&base()).expect("valid").redis_url.is_none());
        for url in [
            "redis://127.0.0.1:6379",
            "redis://:pw-secret@10.0.0.5:6380/2",
            "rediss://user:pw-secret@redis.internal",
        ] {
            let mut env = base();
            env.insert("AUTH_REDIS_URL", url.to_string());
            let s = load(&env).expect(url);
            assert_eq!(
                s.redis_url.as_ref().map(|u| u.expose_secret().to_owned()),
                Some(url.to_owned())
            );
            assert!(!format!("{s:?}").contains("pw-secret"), "{url}");
        }
    }

    #[test]
    fn postgres_urls_in_both_spellings_and_kept_secret() {
        for url in [
            "postgres://auth:pw-secret@db.internal:5432/wxauth",
            "postgresql://auth:pw-secret@127.0.0.1/wxauth?sslmode=require",
        ] {
            let mut env = base();
            env.insert("AUTH_DATABASE_URL", url.to_string());
            let s = load(&env).expect(url);
            assert!(
                matches!(s.database, DatabaseSettings::Postgres { url: ref u, .. } if u.expose_secret() == url),
                "{url}"
            );
            assert!(!format!("{s:?}").contains("pw-secret"), "{url}");
        }
    }

    #[test]
    fn the_postgres_pool_is_10_unless_set() {
        let pool = |size: Option<&str>| {
            let mut env = base();
            env.insert("AUTH_DATABASE_URL", "postgres://auth@db/wxauth".to_string());
            if let Some(size) = size {
                env.insert("AUTH_DATABASE_MAX_CONNECTIONS", size.to_string());
            }
            match load(&env).expect("valid").database {
                DatabaseSettings::Postgres {
                    max_connections, ..
                } => Some(max_connections),
                DatabaseSettings::Sqlite { .. } => None,
            }
        };
        assert_eq!(pool(None), Some(10));
        assert_eq!(pool(Some("25")), Some(25));
    }

    #[test]
    fn every_duration_has_an_upper_bound_named_at_start_up() {
        // Each setting at its bound is taken; a second more, or an absurd value that would
        // overflow the arithmetic done with it (`AUTH_WECHAT_TIMEOUT * 8`, `Instant + ttl`),
        // stops start-up naming the setting.
        for (name, max) in [
            ("AUTH_WECHAT_TIMEOUT", "25s"),
            ("AUTH_ACCESS_TTL", "30d"),
            ("AUTH_REFRESH_TTL", "3650d"),
            ("AUTH_REFRESH_GRACE", "5m"),
            ("AUTH_MAX_CONNECTION_AGE", "30d"),
            ("AUTH_DRAIN_DELAY", "10m"),
            ("AUTH_SHUTDOWN_GRACE", "1h"),
            ("AUTH_HISTORY_RETENTION", "3660d"),
        ] {
            let mut env = base();
            env.insert(name, max.into());
            if let Err(e) = load(&env) {
                panic!("{name}={max} is refused: {e}");
            }
            for over in [format!("{max} 1s"), "100000000000y".into()] {
                let mut env = base();
                env.insert(name, over.clone());
                let err = load(&env).expect_err(&over);
                assert_eq!(err.name, name, "{over}: {err}");
                assert!(
                    err.to_string().ends_with(&format!("at most {max}")),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn operator_keys_are_checked_like_client_keys_and_never_shared_with_them() {
        let (client, operator) = ("c".repeat(32), "o".repeat(32));
        assert!(load(&base()).expect("valid").operator_keys.is_empty());
        let mut env = base();
        env.insert("AUTH_CLIENT_KEYS", client.clone());
        env.insert(
            "AUTH_OPERATOR_KEYS",
            format!(" {operator} ,{}", "p".repeat(40)),
        );
        let s = load(&env).expect("valid");
        assert_eq!(s.operator_keys.len(), 2);
        assert_eq!(s.operator_keys[0].expose_secret(), operator);
        env.insert("AUTH_OPERATOR_KEYS", "short".into());
        assert_eq!(load(&env).expect_err("short").name, "AUTH_OPERATOR_KEYS");
        env.insert("AUTH_OPERATOR_KEYS", format!("{operator},{client}"));
        let err = load(&env).expect_err("shared with a client");
        assert_eq!(err.name, "AUTH_OPERATOR_KEYS");
        assert!(!err.to_string().contains(&client), "{err}");
    }

    #[test]
    fn history_is_kept_90_days_and_never_less_than_the_refresh_ttl_and_2_days() {
        let day = Duration::from_secs(DAY);
        assert_eq!(load(&base()).expect("valid").history_retention, 90 * day);
        let mut env = base();
        env.insert("AUTH_REFRESH_TTL", "120d".into());
        assert_eq!(load(&env).expect("valid").history_retention, 122 * day);
        env.insert("AUTH_HISTORY_RETENTION", "122d".into());
        assert_eq!(load(&env).expect("valid").history_retention, 122 * day);
        env.insert("AUTH_HISTORY_RETENTION", "121d".into());
        let err = load(&env).expect_err("below the refresh TTL and 2 days");
        assert_eq!(err.name, "AUTH_HISTORY_RETENTION");
        assert!(err.to_string().contains("(122d)"), "{err}");
        env.insert("AUTH_HISTORY_RETENTION", "forever".into());
        assert_eq!(
            load(&env).expect_err("malformed").name,
            "AUTH_HISTORY_RETENTION"
        );
    }

    #[test]
    fn the_wechat_api_base_keeps_its_path_prefix() {
        for (given, want) in [
            ("http://gw/wechat", "http://gw/wechat/sns/jscode2session"),
            ("http://gw/wechat/", "http://gw/wechat/sns/jscode2session"),
            (
                "http://127.0.0.1:9000/a/b",
                "http://127.0.0.1:9000/a/b/sns/jscode2session",
            ),
            (
                "https://api.weixin.qq.com",
                "https://api.weixin.qq.com/sns/jscode2session",
            ),
        ] {
            let mut env = base();
            env.insert("WECHAT_API_BASE", given.into());
            let base = load(&env).expect(given).wechat.api_base;
            let joined = base.join("sns/jscode2session").expect("joins");
            assert_eq!(joined.as_str(), want, "{given}");
        }
        // A query or a fragment would be dropped by every join: refused, not ignored.
        for given in ["http://gw/wechat?x=1", "http://gw/wechat#top"] {
            let mut env = base();
            env.insert("WECHAT_API_BASE", given.into());
            assert_eq!(load(&env).expect_err(given).name, "WECHAT_API_BASE");
        }
    }

    #[test]
    fn sqlite_urls_in_both_spellings() {
        // `sqlite://PATH` and `sqlite:PATH`, each with an absolute and a relative path,
        // with and without sqlx's query options.
        for (given, want) in [
            ("sqlite:///tmp/x.db", "/tmp/x.db"),
            ("sqlite://./data/x.db", "./data/x.db"),
            ("sqlite://data/x.db?mode=rwc", "data/x.db"),
            ("sqlite:/tmp/x.db?mode=rwc", "/tmp/x.db"),
            ("sqlite:./data/x.db", "./data/x.db"),
            ("sqlite:data/x.db", "data/x.db"),
        ] {
            let mut env = base();
            env.insert("AUTH_DATABASE_URL", given.into());
            let s = load(&env).expect(given);
            assert!(
                matches!(s.database, DatabaseSettings::Sqlite { ref path } if path == &PathBuf::from(want)),
                "{given}: {:?}",
                s.database
            );
        }
        // Either spelling needs a file.
        for given in [
            "sqlite://",
            "sqlite:",
            "sqlite://:memory:",
            "sqlite::memory:",
        ] {
            let mut env = base();
            env.insert("AUTH_DATABASE_URL", given.into());
            assert_eq!(load(&env).expect_err(given).name, "AUTH_DATABASE_URL");
        }
    }
}
