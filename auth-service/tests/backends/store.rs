//! The `Store` contract: every test is written once, over `Arc<dyn Store>`, and run against
//! SQLite (a temporary file) and PostgreSQL (a fresh database). The concurrency tests use
//! two stores on one database, as two replicas would (on SQLite, which is one process, two
//! handles on one store).

use std::collections::HashSet;
use std::sync::Arc;

use auth_service::crypto::{Keys as Crypto, TokenHash};
use auth_service::domain::{Device, EndReason, EventKind, Millis, SessionEvent, SessionPolicy};
use auth_service::store::postgres::PostgresStore;
use auth_service::store::sqlite::SqliteStore;
use auth_service::store::{
    CLEAR_SUCCESSORS, EndTarget, FORGET_EVENTS, FORGET_SESSIONS, NewLogin, Owner, PURGE_ACCESS,
    PURGE_REFRESH, RotateOutcome, Rotation, SUCCESSOR_MARGIN, SealedSessionKeys, Store,
    StoredAppToken,
};
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};
use shared::postgres::DEFAULT_POOL_SIZE;
use sqlx::{PgPool, SqlitePool};

use crate::support::{External, postgres_database};

const T0: Millis = 1_700_000_000_000;
const SEC: Millis = 1_000;
const MIN: Millis = 60 * SEC;
const HOUR: Millis = 60 * MIN;
const DAY: Millis = 24 * HOUR;
const MULTI_5: SessionPolicy = SessionPolicy::Multi { max: 5 };
const MULTI_2: SessionPolicy = SessionPolicy::Multi { max: 2 };

// ---------------------------------------------------------------------------------------
// Fixtures: one database per test, on either backend.

enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

struct Fixture {
    backend: Backend,
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        Self {
            backend: Backend::Sqlite(dir),
        }
    }

    /// `None` when skipping was asked for.
    async fn postgres(test: &str) -> Option<Self> {
        match postgres_database(test).await {
            External::Run(url) => Some(Self {
                backend: Backend::Postgres(url),
            }),
            External::Skip => None,
        }
    }

    /// `n` stores on this test's database, each with a pool of its own, as `n` replicas;
    /// the PostgreSQL ones migrate at the same time.
    async fn open(&self, n: usize) -> Vec<Arc<dyn Store>> {
        let mut stores: Vec<Arc<dyn Store>> = Vec::new();
        match &self.backend {
            Backend::Sqlite(dir) => {
                // SQLite is one process (a second opening of the file is refused), so the
                // "replicas" are handles on one store, racing on its connections.
                let store = SqliteStore::open(&dir.path().join("auth.db"))
                    .await
                    .expect("SQLite store");
                for _ in 0..n {
                    stores.push(Arc::new(store.clone()));
                }
            }
            Backend::Postgres(url) => {
                let pgs: Vec<PostgresStore> = (0..n)
                    .map(|_| {
                        PostgresStore::connect_lazy(
                            &SecretString::from(url.clone()),
                            DEFAULT_POOL_SIZE,
                        )
                        .expect("PostgreSQL store")
                    })
                    .collect();
                let migrations = pgs.iter().map(|pg| {
                    let pg = pg.clone();
                    tokio::spawn(async move { pg.migrate().await })
                });
                for migrated in migrations.collect::<Vec<_>>() {
                    migrated.await.expect("join").expect("migrations");
                }
                for pg in pgs {
                    assert!(pg.is_ready());
                    stores.push(Arc::new(pg));
                }
            }
        }
        stores
    }

    async fn store(&self) -> Arc<dyn Store> {
        self.open(1).await.remove(0)
    }

    async fn replicas(&self) -> Vec<Arc<dyn Store>> {
        self.open(2).await
    }

    /// A plain connection pool on the same database, to look at what the trait does not
    /// return.
    async fn raw(&self) -> Raw {
        match &self.backend {
            Backend::Sqlite(dir) => Raw::Sqlite(
                SqlitePool::connect(&format!(
                    "sqlite://{}",
                    dir.path().join("auth.db").display()
                ))
                .await
                .expect("SQLite pool"),
            ),
            Backend::Postgres(url) => Raw::Postgres(PgPool::connect(url).await.expect("pool")),
        }
    }
}

enum Raw {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A user's stored session_key columns.
#[derive(Debug, PartialEq, Eq)]
struct Keys {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
    fingerprint: Vec<u8>,
    updated_at: Millis,
}

impl Raw {
    /// One BLOB/BYTEA column of one row, selected by a text key.
    async fn bytes(&self, sql: &'static str, key: &str) -> Option<Vec<u8>> {
        let row: Option<(Option<Vec<u8>>,)> = match self {
            Raw::Sqlite(pool) => sqlx::query_as(sql).bind(key).fetch_optional(pool).await,
            Raw::Postgres(pool) => sqlx::query_as(sql).bind(key).fetch_optional(pool).await,
        }
        .expect("query");
        row.and_then(|(b,)| b)
    }

    async fn keys(&self, openid: &str) -> Keys {
        const SQL: &str = "SELECT session_key, prev_session_key, session_key_fp, \
                           session_key_updated_at FROM users WHERE openid = $1";
        type Row = (Vec<u8>, Option<Vec<u8>>, Vec<u8>, Millis);
        let (current, previous, fingerprint, updated_at): Row = match self {
            Raw::Sqlite(pool) => sqlx::query_as(SQL).bind(openid).fetch_one(pool).await,
            Raw::Postgres(pool) => sqlx::query_as(SQL).bind(openid).fetch_one(pool).await,
        }
        .expect("user row");
        Keys {
            current,
            previous,
            fingerprint,
            updated_at,
        }
    }
}

/// Declares each contract test twice, `sqlite::NAME` and `postgres::NAME`; the arguments
/// name the fixture's accessors (`store`, `replicas`, `raw`).
macro_rules! contract {
    ($($name:ident($($arg:ident),*);)*) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fx = super::Fixture::sqlite().await;
                    super::$name($(fx.$arg().await),*).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let test = concat!("store::postgres::", stringify!($name));
                    let Some(fx) = super::Fixture::postgres(test).await else {
                        return;
                    };
                    super::$name($(fx.$arg().await),*).await;
                }
            )*
        }
    };
}

contract! {
    login_creates_the_user_then_updates_it(store);
    session_key_rotates_unless_the_same_key_comes_back(store, raw);
    multi_policy_pushes_out_the_oldest_and_names_the_replacer(store);
    single_policy_pushes_out_every_other_session(store);
    same_device_replaces_its_own_session(store);
    find_access_reports_the_session_state(store);
    touch_moves_last_active_at_at_most_once_per_interval(store);
    rotate_once_then_already_rotated_with_the_same_successor(store);
    rotate_reports_ended_expired_and_unknown_tokens(store);
    refresh_session_names_the_session_and_whether_it_would_rotate(store);
    end_sessions_counts_and_is_idempotent(store);
    list_sessions_is_newest_first_and_only_live(store);
    list_events_pages_newest_first(store);
    expire_sessions_records_each_end_once(store);
    login_expires_lapsed_sessions_before_the_policy(store);
    purge_deletes_dead_tokens_and_clears_successors(store);
    purge_keeps_the_successor_a_refresh_within_grace_is_owed(store);
    housekeeping_finds_its_rows_by_index(store, raw);
    forget_deletes_the_history_before_its_cutoff_oldest_first(store, raw);
    ping_answers_once_ready(store);
    parallel_rotations_of_one_token_rotate_once(replicas);
    parallel_logins_of_one_user_keep_the_session_limit(replicas);
    session_keys_are_the_newest_then_the_previous(store);
    phone_is_kept_sealed_per_user_and_replaced(store, raw);
    app_token_round_trips_sealed_and_counts_generations(store, raw);
    app_token_lock_makes_another_replica_wait_then_see_the_renewal(replicas);
    a_dropped_app_token_lock_is_released(replicas);
    a_held_app_token_lock_keeps_no_other_write_waiting(replicas);
    renewals_racing_on_two_replicas_recheck_and_renew_once(replicas);
}

// ---------------------------------------------------------------------------------------
// Builders.

fn hash(tag: &str) -> TokenHash {
    TokenHash(Sha256::digest(tag.as_bytes()).into())
}

fn access(session: &str) -> TokenHash {
    hash(&format!("access:{session}"))
}

fn refresh(session: &str) -> TokenHash {
    hash(&format!("refresh:{session}"))
}

fn device(id: &str) -> Device {
    Device::parse(id, "ios", "iPhone 15").expect("valid device")
}

/// A login of `openid` opening `session` at `now`: access for 2 hours, refresh for 30
/// days, no device, `multi` with 5 places, the same session_key each time.
fn login(openid: &str, session: &str, now: Millis) -> NewLogin {
    NewLogin {
        openid: openid.into(),
        unionid: None,
        session_key_sealed: format!("sealed-key-1-{session}").into_bytes(),
        session_key_fp: [1; 32],
        session_id: session.into(),
        device: Device::default(),
        access: (access(session), now + 2 * HOUR),
        refresh: (refresh(session), now + 30 * DAY),
        policy: MULTI_5,
        now,
    }
}

fn with_policy(mut l: NewLogin, policy: SessionPolicy) -> NewLogin {
    l.policy = policy;
    l
}

fn with_device(mut l: NewLogin, id: &str) -> NewLogin {
    l.device = device(id);
    l
}

/// Exchanges the refresh token of `old` (a session id, or a previous `new`) for the pair
/// named `new`, at `now`; the sealed successor is `successor:{new}`.
fn rotation(old: &str, new: &str, now: Millis) -> Rotation {
    Rotation {
        old: refresh(old),
        access: (access(new), now + 2 * HOUR),
        refresh: (refresh(new), now + 30 * DAY),
        successor: successor(new),
        now,
    }
}

fn successor(new: &str) -> Vec<u8> {
    format!("successor:{new}").into_bytes()
}

async fn live_ids(store: &Arc<dyn Store>, openid: &str, now: Millis) -> Vec<String> {
    store
        .list_sessions(openid, now)
        .await
        .expect("list_sessions")
        .into_iter()
        .map(|s| s.id)
        .collect()
}

async fn events(store: &Arc<dyn Store>, openid: &str) -> Vec<SessionEvent> {
    store
        .list_events(openid, None, 1000)
        .await
        .expect("list_events")
}

fn ends_of<'a>(events: &'a [SessionEvent], session: &str) -> Vec<&'a SessionEvent> {
    events
        .iter()
        .filter(|e| e.kind == EventKind::End && e.session_id == session)
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// The contract.

async fn login_creates_the_user_then_updates_it(store: Arc<dyn Store>) {
    assert!(!store.user_exists("o1").await.expect("user_exists"));

    let first = store.login(login("o1", "s1", T0)).await.expect("login");
    assert!(first.is_new_user);
    assert_eq!(first.unionid, None);
    assert!(first.replaced.is_empty());
    assert!(store.user_exists("o1").await.expect("user_exists"));

    let mut l = login("o1", "s2", T0 + MIN);
    l.unionid = Some("u1".into());
    let second = store.login(l).await.expect("login");
    assert!(!second.is_new_user);
    assert_eq!(second.unionid.as_deref(), Some("u1"));

    // A login without a unionid keeps the one known.
    let third = store
        .login(login("o1", "s3", T0 + 2 * MIN))
        .await
        .expect("login");
    assert!(!third.is_new_user);
    assert_eq!(third.unionid.as_deref(), Some("u1"));
    let record = store
        .find_access(&access("s3"))
        .await
        .expect("find_access")
        .expect("token");
    assert_eq!(record.openid, "o1");
    assert_eq!(record.unionid.as_deref(), Some("u1"));
    assert!(!store.user_exists("o2").await.expect("user_exists"));
}

async fn session_key_rotates_unless_the_same_key_comes_back(store: Arc<dyn Store>, raw: Raw) {
    let mut l = login("o1", "s1", T0);
    l.session_key_sealed = b"sealed-A".to_vec();
    l.session_key_fp = [0xA; 32];
    store.login(l).await.expect("login");
    assert_eq!(
        raw.keys("o1").await,
        Keys {
            current: b"sealed-A".to_vec(),
            previous: None,
            fingerprint: vec![0xA; 32],
            updated_at: T0,
        }
    );

    // A new key: the newest moves to previous.
    let mut l = login("o1", "s2", T0 + MIN);
    l.session_key_sealed = b"sealed-B".to_vec();
    l.session_key_fp = [0xB; 32];
    store.login(l).await.expect("login");
    assert_eq!(
        raw.keys("o1").await,
        Keys {
            current: b"sealed-B".to_vec(),
            previous: Some(b"sealed-A".to_vec()),
            fingerprint: vec![0xB; 32],
            updated_at: T0 + MIN,
        }
    );

    // The same key again (sealed anew): no shift, previous kept, rotation time kept.
    let mut l = login("o1", "s3", T0 + 2 * MIN);
    l.session_key_sealed = b"sealed-B-again".to_vec();
    l.session_key_fp = [0xB; 32];
    store.login(l).await.expect("login");
    assert_eq!(
        raw.keys("o1").await,
        Keys {
            current: b"sealed-B-again".to_vec(),
            previous: Some(b"sealed-A".to_vec()),
            fingerprint: vec![0xB; 32],
            updated_at: T0 + MIN,
        }
    );
}

async fn multi_policy_pushes_out_the_oldest_and_names_the_replacer(store: Arc<dyn Store>) {
    for (i, s) in ["s1", "s2"].into_iter().enumerate() {
        let l = with_device(with_policy(login("o1", s, T0 + i as Millis), MULTI_2), s);
        assert!(store.login(l).await.expect("login").replaced.is_empty());
    }

    let l = with_device(with_policy(login("o1", "s3", T0 + 10), MULTI_2), "dev-3");
    let outcome = store.login(l).await.expect("login");

    assert_eq!(outcome.replaced, vec!["s1".to_string()]);
    assert_eq!(live_ids(&store, "o1", T0 + 20).await, vec!["s3", "s2"]);
    let record = store
        .find_access(&access("s1"))
        .await
        .expect("find_access")
        .expect("token");
    assert_eq!(record.ended, Some(EndReason::Replaced));
    let events = events(&store, "o1").await;
    let ends = ends_of(&events, "s1");
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].reason, Some(EndReason::Replaced));
    assert_eq!(ends[0].replaced_by_session.as_deref(), Some("s3"));
    assert_eq!(ends[0].replaced_by_device.as_deref(), Some("dev-3"));
    assert_eq!(ends[0].at, T0 + 10);
    assert_eq!(ends[0].device.id(), Some("s1"));
}

async fn single_policy_pushes_out_every_other_session(store: Arc<dyn Store>) {
    store.login(login("o1", "s1", T0)).await.expect("login");
    store.login(login("o1", "s2", T0 + 1)).await.expect("login");
    store
        .login(login("o2", "other", T0 + 2))
        .await
        .expect("login");

    let outcome = store
        .login(with_policy(
            login("o1", "s3", T0 + 3),
            SessionPolicy::Single,
        ))
        .await
        .expect("login");

    assert_eq!(sorted(outcome.replaced), vec!["s1", "s2"]);
    assert_eq!(live_ids(&store, "o1", T0 + 10).await, vec!["s3"]);
    assert_eq!(live_ids(&store, "o2", T0 + 10).await, vec!["other"]);
    let events = events(&store, "o1").await;
    for s in ["s1", "s2"] {
        let ends = ends_of(&events, s);
        assert_eq!(ends.len(), 1, "{s}");
        assert_eq!(ends[0].reason, Some(EndReason::Replaced));
        assert_eq!(ends[0].replaced_by_session.as_deref(), Some("s3"));
        assert_eq!(ends[0].replaced_by_device, None);
    }
}

async fn same_device_replaces_its_own_session(store: Arc<dyn Store>) {
    let l = with_device(with_policy(login("o1", "s1", T0), MULTI_2), "phone");
    store.login(l).await.expect("login");
    let l = with_device(with_policy(login("o1", "s2", T0 + 1), MULTI_2), "tablet");
    store.login(l).await.expect("login");

    // The phone logs in again: its old session goes, the tablet's stays.
    let l = with_device(with_policy(login("o1", "s3", T0 + 2), MULTI_2), "phone");
    let outcome = store.login(l).await.expect("login");

    assert_eq!(outcome.replaced, vec!["s1".to_string()]);
    assert_eq!(live_ids(&store, "o1", T0 + 10).await, vec!["s3", "s2"]);
    let events = events(&store, "o1").await;
    let ends = ends_of(&events, "s1");
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].replaced_by_session.as_deref(), Some("s3"));
    assert_eq!(ends[0].replaced_by_device.as_deref(), Some("phone"));
}

async fn find_access_reports_the_session_state(store: Arc<dyn Store>) {
    let mut l = login("o1", "s1", T0);
    l.unionid = Some("u1".into());
    store.login(l).await.expect("login");

    let record = store
        .find_access(&access("s1"))
        .await
        .expect("find_access")
        .expect("token");
    assert_eq!(record.openid, "o1");
    assert_eq!(record.unionid.as_deref(), Some("u1"));
    assert_eq!(record.session_id, "s1");
    assert_eq!(record.expires_at, T0 + 2 * HOUR);
    assert_eq!(record.last_active_at, T0);
    assert_eq!(record.ended, None);
    assert_eq!(record.refresh_expires_at, T0 + 30 * DAY);
    assert_eq!(
        store
            .find_access(&access("nope"))
            .await
            .expect("find_access"),
        None
    );
    // A refresh token is not an access token.
    assert_eq!(
        store
            .find_access(&refresh("s1"))
            .await
            .expect("find_access"),
        None
    );

    // Ended.
    store
        .end_sessions(EndTarget::Session("s1"), EndReason::Logout, T0 + MIN)
        .await
        .expect("end_sessions");
    let record = store
        .find_access(&access("s1"))
        .await
        .expect("find_access")
        .expect("token");
    assert_eq!(record.ended, Some(EndReason::Logout));

    // Expired: the record shows the refresh expiry; once recorded, the end too.
    let mut l = login("o1", "s2", T0);
    l.refresh.1 = T0 + HOUR;
    store.login(l).await.expect("login");
    let record = store
        .find_access(&access("s2"))
        .await
        .expect("find_access")
        .expect("token");
    assert_eq!(record.refresh_expires_at, T0 + HOUR);
    assert_eq!(record.ended, None);
    store
        .expire_sessions(Some("o1"), T0 + 2 * HOUR)
        .await
        .expect("expire_sessions");
    let record = store
        .find_access(&access("s2"))
        .await
        .expect("find_access")
        .expect("token");
    assert_eq!(record.ended, Some(EndReason::Expired));
}

async fn touch_moves_last_active_at_at_most_once_per_interval(store: Arc<dyn Store>) {
    store.login(login("o1", "s1", T0)).await.expect("login");
    let last_active = async |store: &Arc<dyn Store>| {
        store
            .find_access(&access("s1"))
            .await
            .expect("find_access")
            .expect("token")
            .last_active_at
    };

    store.touch("s1", T0 + 30 * SEC, MIN).await.expect("touch");
    assert_eq!(last_active(&store).await, T0, "within the interval");
    store.touch("s1", T0 + 61 * SEC, MIN).await.expect("touch");
    assert_eq!(last_active(&store).await, T0 + 61 * SEC, "past it");
    store.touch("s1", T0 + 90 * SEC, MIN).await.expect("touch");
    assert_eq!(last_active(&store).await, T0 + 61 * SEC, "within again");

    store
        .end_sessions(EndTarget::Session("s1"), EndReason::Logout, T0 + 2 * MIN)
        .await
        .expect("end_sessions");
    store.touch("s1", T0 + 10 * MIN, MIN).await.expect("touch");
    assert_eq!(last_active(&store).await, T0 + 61 * SEC, "ended");
    store.touch("unknown", T0, MIN).await.expect("touch");
}

async fn refresh_session_names_the_session_and_whether_it_would_rotate(store: Arc<dyn Store>) {
    store.login(login("o1", "s1", T0)).await.expect("login");
    let of = async |token: &str, now: Millis| {
        store
            .refresh_session(&refresh(token), now)
            .await
            .expect("refresh_session")
    };
    let rotates = |yes: bool| Some(("s1".to_owned(), yes));
    assert_eq!(of("s1", T0 + MIN).await, rotates(true));
    assert_eq!(of("nobody", T0 + MIN).await, None);

    // Rotated: the old token would not rotate again, the new one would, until it expires.
    store
        .rotate(rotation("s1", "n1", T0 + MIN))
        .await
        .expect("rotate");
    assert_eq!(of("s1", T0 + 2 * MIN).await, rotates(false));
    assert_eq!(of("n1", T0 + 2 * MIN).await, rotates(true));
    assert_eq!(of("n1", T0 + MIN + 30 * DAY).await, rotates(false));

    // Its session ended: no longer.
    store
        .end_sessions(EndTarget::Session("s1"), EndReason::Logout, T0 + 3 * MIN)
        .await
        .expect("end");
    assert_eq!(of("n1", T0 + 4 * MIN).await, rotates(false));
}

async fn rotate_once_then_already_rotated_with_the_same_successor(store: Arc<dyn Store>) {
    let mut l = login("o1", "s1", T0);
    l.unionid = Some("u1".into());
    store.login(l).await.expect("login");
    let owner = Owner {
        openid: "o1".into(),
        unionid: Some("u1".into()),
        session_id: "s1".into(),
    };

    let first = store
        .rotate(rotation("s1", "n1", T0 + MIN))
        .await
        .expect("rotate");
    assert!(
        matches!(first, RotateOutcome::Rotated(ref o) if *o == owner),
        "{first:?}"
    );
    let record = store
        .find_access(&access("n1"))
        .await
        .expect("find_access")
        .expect("the new access token");
    assert_eq!(record.session_id, "s1");
    assert_eq!(record.last_active_at, T0 + MIN);
    assert_eq!(record.refresh_expires_at, T0 + MIN + 30 * DAY);

    // The same token again: the first exchange's successor, and nothing new stored.
    let again = store
        .rotate(rotation("s1", "n2", T0 + 2 * MIN))
        .await
        .expect("rotate");
    match again {
        RotateOutcome::AlreadyRotated {
            owner: o,
            rotated_at,
            successor: sealed,
        } => {
            assert_eq!(o, owner);
            assert_eq!(rotated_at, T0 + MIN);
            assert_eq!(sealed, Some(successor("n1")));
        }
        other => panic!("expected AlreadyRotated, got {other:?}"),
    }
    assert_eq!(
        store.find_access(&access("n2")).await.expect("find_access"),
        None
    );

    // The successor's refresh token rotates in turn.
    let next = store
        .rotate(rotation("n1", "n3", T0 + 3 * MIN))
        .await
        .expect("rotate");
    assert!(matches!(next, RotateOutcome::Rotated(_)), "{next:?}");
    let refreshes: Vec<Millis> = events(&store, "o1")
        .await
        .iter()
        .filter(|e| e.kind == EventKind::Refresh)
        .map(|e| e.at)
        .collect();
    assert_eq!(refreshes, vec![T0 + 3 * MIN, T0 + MIN]);
}

async fn rotate_reports_ended_expired_and_unknown_tokens(store: Arc<dyn Store>) {
    assert!(matches!(
        store.rotate(rotation("nope", "n0", T0)).await,
        Ok(RotateOutcome::NotFound)
    ));

    store.login(login("o1", "s1", T0)).await.expect("login");
    store
        .end_sessions(
            EndTarget::Session("s1"),
            EndReason::RevokedByOperator,
            T0 + 1,
        )
        .await
        .expect("end_sessions");
    assert!(matches!(
        store.rotate(rotation("s1", "n1", T0 + MIN)).await,
        Ok(RotateOutcome::Ended(EndReason::RevokedByOperator))
    ));

    let mut l = login("o1", "s2", T0);
    l.refresh.1 = T0 + HOUR;
    store.login(l).await.expect("login");
    assert!(matches!(
        store.rotate(rotation("s2", "n2", T0 + 2 * HOUR)).await,
        Ok(RotateOutcome::Expired)
    ));
    // The expiry is recorded, once, at the instant the token expired.
    let events = events(&store, "o1").await;
    let ends = ends_of(&events, "s2");
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].reason, Some(EndReason::Expired));
    assert_eq!(ends[0].at, T0 + HOUR);
    assert_eq!(
        store.find_access(&access("n2")).await.expect("find_access"),
        None
    );
    assert!(matches!(
        store.rotate(rotation("s2", "n3", T0 + 3 * HOUR)).await,
        Ok(RotateOutcome::Ended(EndReason::Expired))
    ));
}

async fn end_sessions_counts_and_is_idempotent(store: Arc<dyn Store>) {
    for (i, s) in ["s1", "s2", "s3"].into_iter().enumerate() {
        store
            .login(login("o1", s, T0 + i as Millis))
            .await
            .expect("login");
    }
    store.login(login("o2", "other", T0)).await.expect("login");
    let end = async |target: EndTarget<'static>, reason: EndReason| {
        store
            .end_sessions(target, reason, T0 + MIN)
            .await
            .expect("end_sessions")
    };

    let none: Vec<String> = Vec::new();
    assert_eq!(
        end(EndTarget::Session("s1"), EndReason::Logout).await,
        vec!["s1"]
    );
    assert_eq!(end(EndTarget::Session("s1"), EndReason::Logout).await, none);
    assert_eq!(
        end(EndTarget::Session("unknown"), EndReason::Logout).await,
        none
    );
    let mut all = end(EndTarget::User("o1"), EndReason::LogoutAll).await;
    all.sort();
    assert_eq!(all, vec!["s2", "s3"], "the ids of the sessions it ended");
    assert_eq!(end(EndTarget::User("o1"), EndReason::LogoutAll).await, none);
    assert_eq!(
        end(EndTarget::User("nobody"), EndReason::LogoutAll).await,
        none
    );

    assert!(live_ids(&store, "o1", T0 + HOUR).await.is_empty());
    assert_eq!(live_ids(&store, "o2", T0 + HOUR).await, vec!["other"]);
    let events = events(&store, "o1").await;
    for (s, reason) in [
        ("s1", EndReason::Logout),
        ("s2", EndReason::LogoutAll),
        ("s3", EndReason::LogoutAll),
    ] {
        let ends = ends_of(&events, s);
        assert_eq!(ends.len(), 1, "{s}");
        assert_eq!(ends[0].reason, Some(reason), "{s}");
        assert_eq!(ends[0].at, T0 + MIN, "{s}");
    }
}

async fn list_sessions_is_newest_first_and_only_live(store: Arc<dyn Store>) {
    // Room for every session: only ends and expiry filter here.
    let login = |openid: &str, session: &str, now: Millis| {
        with_policy(
            login(openid, session, now),
            SessionPolicy::Multi { max: 10 },
        )
    };
    let mut l = login("o1", "s1", T0);
    l.device = Device::parse("d1", "android", "Pixel 9").expect("device");
    store.login(l).await.expect("login");
    store.login(login("o1", "s2", T0 + 1)).await.expect("login");
    store.login(login("o1", "s3", T0 + 2)).await.expect("login");
    // Same instant: the larger id first.
    store.login(login("o1", "s5", T0 + 5)).await.expect("login");
    store.login(login("o1", "s4", T0 + 5)).await.expect("login");
    let mut l = login("o1", "lapsed", T0 + 6);
    l.refresh.1 = T0 + HOUR;
    store.login(l).await.expect("login");
    store
        .login(login("o2", "other", T0 + 7))
        .await
        .expect("login");
    store
        .end_sessions(EndTarget::Session("s2"), EndReason::Logout, T0 + 10)
        .await
        .expect("end_sessions");

    let sessions = store
        .list_sessions("o1", T0 + 2 * HOUR)
        .await
        .expect("list_sessions");

    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["s5", "s4", "s3", "s1"]);
    let s1 = &sessions[3];
    assert_eq!(
        s1.device,
        Device::parse("d1", "android", "Pixel 9").expect("device")
    );
    assert_eq!(s1.created_at, T0);
    assert_eq!(s1.last_active_at, T0);
    assert!(
        store
            .list_sessions("nobody", T0)
            .await
            .expect("list_sessions")
            .is_empty()
    );
}

async fn list_events_pages_newest_first(store: Arc<dyn Store>) {
    store
        .login(with_device(login("o1", "s1", T0), "d1"))
        .await
        .expect("login");
    store.login(login("o1", "s2", T0 + 1)).await.expect("login");
    store
        .login(login("o2", "other", T0 + 2))
        .await
        .expect("login");
    store.login(login("o1", "s3", T0 + 3)).await.expect("login");
    store
        .rotate(rotation("s1", "n1", T0 + 4))
        .await
        .expect("rotate");
    store
        .end_sessions(EndTarget::Session("s2"), EndReason::Logout, T0 + 5)
        .await
        .expect("end_sessions");

    let all = events(&store, "o1").await;
    let seen: Vec<(&str, EventKind, Option<EndReason>, Millis)> = all
        .iter()
        .map(|e| (e.session_id.as_str(), e.kind, e.reason, e.at))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("s2", EventKind::End, Some(EndReason::Logout), T0 + 5),
            ("s1", EventKind::Refresh, None, T0 + 4),
            ("s3", EventKind::Login, None, T0 + 3),
            ("s2", EventKind::Login, None, T0 + 1),
            ("s1", EventKind::Login, None, T0),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    assert_eq!(all[4].device.id(), Some("d1"));

    // Pages of two, each older than the last one's id.
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .list_events("o1", before, 2)
            .await
            .expect("list_events");
        if page.is_empty() {
            break;
        }
        before = page.last().map(|e| e.id);
        pages.push(page.len());
        assert!(pages.len() <= 3, "paging does not end");
    }
    assert_eq!(pages, vec![2, 2, 1]);
    let after_first = store
        .list_events("o1", Some(all[0].id), 10)
        .await
        .expect("list_events");
    assert_eq!(after_first, all[1..].to_vec());
    assert!(
        store
            .list_events("nobody", None, 10)
            .await
            .expect("list_events")
            .is_empty()
    );
}

async fn expire_sessions_records_each_end_once(store: Arc<dyn Store>) {
    let lapsing = |openid: &str, session: &str| {
        let mut l = login(openid, session, T0);
        l.refresh.1 = T0 + HOUR;
        l
    };
    store.login(lapsing("o1", "s1")).await.expect("login");
    store.login(login("o1", "s2", T0)).await.expect("login");
    store.login(lapsing("o2", "s3")).await.expect("login");

    // Not yet due.
    assert_eq!(
        store
            .expire_sessions(None, T0 + HOUR - 1)
            .await
            .expect("expire"),
        0
    );
    // One user.
    assert_eq!(
        store
            .expire_sessions(Some("o1"), T0 + 2 * HOUR)
            .await
            .expect("expire"),
        1
    );
    assert_eq!(live_ids(&store, "o2", T0).await, vec!["s3"]);
    // Everyone, then nothing left.
    assert_eq!(
        store
            .expire_sessions(None, T0 + 2 * HOUR)
            .await
            .expect("expire"),
        1
    );
    assert_eq!(
        store
            .expire_sessions(None, T0 + 3 * HOUR)
            .await
            .expect("expire"),
        0
    );

    assert_eq!(live_ids(&store, "o1", T0).await, vec!["s2"]);
    for (openid, session) in [("o1", "s1"), ("o2", "s3")] {
        let events = events(&store, openid).await;
        let ends = ends_of(&events, session);
        assert_eq!(ends.len(), 1, "{session}");
        assert_eq!(ends[0].reason, Some(EndReason::Expired));
        assert_eq!(ends[0].at, T0 + HOUR, "at the expiry instant");
    }
}

async fn login_expires_lapsed_sessions_before_the_policy(store: Arc<dyn Store>) {
    let mut l = with_policy(login("o1", "lapsed", T0), MULTI_2);
    l.refresh.1 = T0 + HOUR;
    store.login(l).await.expect("login");
    store
        .login(with_policy(login("o1", "s2", T0 + 1), MULTI_2))
        .await
        .expect("login");

    // Two places: the lapsed session is recorded as expired, not pushed out.
    let outcome = store
        .login(with_policy(login("o1", "s3", T0 + 2 * HOUR), MULTI_2))
        .await
        .expect("login");

    assert!(outcome.replaced.is_empty(), "{:?}", outcome.replaced);
    assert_eq!(
        live_ids(&store, "o1", T0 + 2 * HOUR).await,
        vec!["s3", "s2"]
    );
    let events = events(&store, "o1").await;
    let ends = ends_of(&events, "lapsed");
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].reason, Some(EndReason::Expired));
    assert_eq!(ends[0].at, T0 + HOUR);
}

async fn purge_deletes_dead_tokens_and_clears_successors(store: Arc<dyn Store>) {
    const KEEP: Millis = DAY;
    const GRACE: Millis = 10 * SEC;
    // A row of each statement a transaction: the last purge below takes three.
    const BATCH: u32 = 1;
    store.login(login("o1", "s1", T0)).await.expect("login");
    store
        .rotate(rotation("s1", "n1", T0 + MIN))
        .await
        .expect("rotate");
    let kept_successor = async || match store
        .rotate(rotation("s1", "late", T0 + MIN))
        .await
        .expect("rotate")
    {
        RotateOutcome::AlreadyRotated { successor, .. } => successor,
        other => panic!("expected AlreadyRotated, got {other:?}"),
    };

    // Within the grace window, and within the margin kept past it: nothing to do.
    for now in [T0 + MIN + 5 * SEC, T0 + MIN + GRACE + SUCCESSOR_MARGIN] {
        assert_eq!(
            store.purge(now, KEEP, GRACE, BATCH).await.expect("purge"),
            0
        );
        assert_eq!(kept_successor().await, Some(successor("n1")));
    }

    // Past both: the successor pair goes, the rotation stays known.
    assert_eq!(
        store
            .purge(T0 + MIN + GRACE + SUCCESSOR_MARGIN + 1, KEEP, GRACE, BATCH)
            .await
            .expect("purge"),
        1
    );
    assert_eq!(kept_successor().await, None);

    // A day after s1's access token expired, it goes; n1's (a minute younger) stays.
    assert_eq!(
        store
            .purge(T0 + 2 * HOUR + KEEP + 1, KEEP, GRACE, BATCH)
            .await
            .expect("purge"),
        1
    );
    assert_eq!(
        store.find_access(&access("s1")).await.expect("find_access"),
        None
    );
    assert!(
        store
            .find_access(&access("n1"))
            .await
            .expect("find_access")
            .is_some()
    );
    // Long after everything expired: n1's access token and both refresh tokens.
    assert_eq!(
        store
            .purge(T0 + MIN + 30 * DAY + KEEP + 1, KEEP, GRACE, BATCH)
            .await
            .expect("purge"),
        3
    );
    assert!(matches!(
        store.rotate(rotation("n1", "n2", T0 + 40 * DAY)).await,
        Ok(RotateOutcome::NotFound)
    ));
}

/// Housekeeping runs every 5 minutes over tables that only grow (a refresh token row per
/// rotation for 31 days, every session ever opened): each of its look-ups must reach its rows
/// through an index made for it, not by reading the table. On PostgreSQL sequential scans are
/// priced out for the test, and the plan must name that index (a walk of the whole primary
/// key would read every row too).
async fn housekeeping_finds_its_rows_by_index(store: Arc<dyn Store>, raw: Raw) {
    use auth_service::store::postgres::EXPIRE_DUE_SESSIONS;
    use auth_service::store::sqlite::DUE_SESSIONS;
    const SUCCESSORS: &str = "refresh_tokens_successors_by_rotation";
    const DUE: &str = "sessions_live_by_refresh_expiry";
    const ENDED: &str = "sessions_ended_by_time";
    const EVENTS: &str = "session_events_by_time";
    const ACCESS_BY_SESSION: &str = "access_tokens_by_session";
    const REFRESH_BY_SESSION: &str = "refresh_tokens_by_session";
    const ACCESS_BY_EXPIRY: &str = "access_tokens_by_expiry";
    const REFRESH_BY_EXPIRY: &str = "refresh_tokens_by_expiry";
    // The schema is the store's (it migrated on opening); a row or two, as a live one has.
    store.login(login("o1", "s1", T0)).await.expect("login");
    store
        .rotate(rotation("s1", "n1", T0 + MIN))
        .await
        .expect("rotate");

    let plans: Vec<(String, &str)> = match &raw {
        Raw::Sqlite(pool) => {
            let mut plans = Vec::new();
            for (sql, index) in [
                (CLEAR_SUCCESSORS, SUCCESSORS),
                (PURGE_ACCESS, ACCESS_BY_EXPIRY),
                (PURGE_REFRESH, REFRESH_BY_EXPIRY),
                (DUE_SESSIONS, DUE),
                (FORGET_SESSIONS, ENDED),
                (FORGET_SESSIONS, ACCESS_BY_SESSION),
                (FORGET_SESSIONS, REFRESH_BY_SESSION),
                (FORGET_EVENTS, EVENTS),
            ] {
                let rows: Vec<(i64, i64, i64, String)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                        .bind(T0)
                        .bind(100_i64)
                        .fetch_all(pool)
                        .await
                        .expect("the plan");
                let plan: Vec<String> = rows.into_iter().map(|(_, _, _, detail)| detail).collect();
                plans.push((plan.join("\n"), index));
            }
            plans
        }
        Raw::Postgres(pool) => {
            let mut conn = pool.acquire().await.expect("a connection");
            sqlx::query("SET enable_seqscan = off")
                .execute(&mut *conn)
                .await
                .expect("set");
            let successors: Vec<(String,)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {CLEAR_SUCCESSORS}")))
                    .bind(T0)
                    .bind(100_i64)
                    .fetch_all(&mut *conn)
                    .await
                    .expect("the plan");
            let due: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "EXPLAIN {EXPIRE_DUE_SESSIONS}"
            )))
            .bind(T0)
            .bind(None::<String>)
            .bind("expired")
            .bind("end")
            .fetch_all(&mut *conn)
            .await
            .expect("the plan");
            let text = |rows: Vec<(String,)>| {
                rows.into_iter()
                    .map(|(line,)| line)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let mut plans = vec![(text(successors), SUCCESSORS), (text(due), DUE)];
            for (sql, index) in [
                (PURGE_ACCESS, ACCESS_BY_EXPIRY),
                (PURGE_REFRESH, REFRESH_BY_EXPIRY),
                (FORGET_SESSIONS, ENDED),
                (FORGET_SESSIONS, ACCESS_BY_SESSION),
                (FORGET_SESSIONS, REFRESH_BY_SESSION),
                (FORGET_EVENTS, EVENTS),
            ] {
                let plan: Vec<(String,)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
                        .bind(T0)
                        .bind(100_i64)
                        .fetch_all(&mut *conn)
                        .await
                        .expect("the plan");
                plans.push((text(plan), index));
            }
            plans
        }
    };
    for (plan, index) in plans {
        assert!(plan.contains(index), "not through {index}:\n{plan}");
    }
}

/// How many sessions the database holds, live or ended.
async fn session_rows(raw: &Raw) -> i64 {
    const SQL: &str = "SELECT count(*) FROM sessions";
    match raw {
        Raw::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
        Raw::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
    }
    .expect("count the sessions")
}

/// `AUTH_HISTORY_RETENTION`: events and ended sessions before the cutoff go, a batch at a
/// time and oldest first; live sessions and later events stay; a session whose token rows
/// are still there is skipped (not a failure of the batch) until they are purged.
async fn forget_deletes_the_history_before_its_cutoff_oldest_first(
    store: Arc<dyn Store>,
    raw: Raw,
) {
    const KEEP: Millis = DAY;
    const GRACE: Millis = 10 * SEC;
    // Arrange: s1 opened at T0 and ended a minute later; s2 opened an hour after, still
    // live. Events: s1's login (T0), s1's end (T0 + 1 min), s2's login (T0 + 1 h).
    store.login(login("o1", "s1", T0)).await.expect("login");
    store
        .end_sessions(EndTarget::Session("s1"), EndReason::Logout, T0 + MIN)
        .await
        .expect("end");
    store
        .login(login("o1", "s2", T0 + HOUR))
        .await
        .expect("login");
    let cutoff = T0 + 30 * MIN;

    // Act: a batch of one at a time while s1's token rows are still there, then after the
    // purge that deletes them.
    let first = store.forget(cutoff, 1).await.expect("forget");
    let after_first = events(&store, "o1").await;
    let second = store.forget(cutoff, 1).await.expect("forget");
    let sessions_before_purge = session_rows(&raw).await;
    store
        .purge(T0 + HOUR + 30 * DAY + KEEP + 1, KEEP, GRACE, 5_000)
        .await
        .expect("purge");
    let third = store.forget(cutoff, 1).await.expect("forget");
    let fourth = store.forget(cutoff, 1).await.expect("forget");

    // Assert: s1's login event first, then its end; s1 itself only once its tokens were
    // purged (skipped, not refused, before); then nothing.
    assert_eq!(
        (first, second, third, fourth),
        ((1, 0), (1, 0), (0, 1), (0, 0))
    );
    assert_eq!(
        after_first
            .iter()
            .map(|e| (e.session_id.as_str(), e.kind))
            .collect::<Vec<_>>(),
        vec![("s2", EventKind::Login), ("s1", EventKind::End)],
        "the oldest event went first"
    );
    assert_eq!(sessions_before_purge, 2);
    let left = events(&store, "o1").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (left[0].session_id.as_str(), left[0].kind),
        ("s2", EventKind::Login)
    );
    assert_eq!(session_rows(&raw).await, 1);
    assert_eq!(
        live_ids(&store, "o1", T0 + 2 * HOUR).await,
        vec!["s2".to_owned()]
    );
}

/// A refresh decides "within the grace window" by its own clock, read before its rotation
/// reaches the database (and on another replica than the purger's): the purger, a moment
/// later by its clock, must not have cleared the successor that refresh is owed.
async fn purge_keeps_the_successor_a_refresh_within_grace_is_owed(store: Arc<dyn Store>) {
    const KEEP: Millis = DAY;
    const GRACE: Millis = 10 * SEC;
    let rotated_at = T0 + MIN;
    store.login(login("o1", "s1", T0)).await.expect("login");
    store
        .rotate(rotation("s1", "n1", rotated_at))
        .await
        .expect("rotate");

    // The purger runs just past the grace window by its clock...
    store
        .purge(rotated_at + GRACE + 2 * SEC, KEEP, GRACE, 5_000)
        .await
        .expect("purge");
    // ... and a parallel refresh whose clock reads just inside it comes in after.
    match store
        .rotate(rotation("s1", "late", rotated_at + GRACE - SEC))
        .await
        .expect("rotate")
    {
        RotateOutcome::AlreadyRotated {
            rotated_at: at,
            successor: kept,
            ..
        } => {
            assert_eq!(at, rotated_at);
            assert_eq!(
                kept,
                Some(successor("n1")),
                "the successor a refresh within grace is owed was cleared"
            );
        }
        other => panic!("expected AlreadyRotated, got {other:?}"),
    }
}

async fn ping_answers_once_ready(store: Arc<dyn Store>) {
    store.ready().await;
    store.ping().await.expect("ping");
}

// ---------------------------------------------------------------------------------------
// Concurrency, across two replicas.

async fn parallel_rotations_of_one_token_rotate_once(replicas: Vec<Arc<dyn Store>>) {
    const N: usize = 8;
    replicas[0]
        .login(login("o1", "s1", T0))
        .await
        .expect("login");

    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = replicas[i % replicas.len()].clone();
            tokio::spawn(async move {
                store
                    .rotate(rotation("s1", &format!("n{i}"), T0 + MIN))
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("join").expect("rotate"));
    }

    let winners: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, RotateOutcome::Rotated(_)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner = winners[0];
    for (i, outcome) in outcomes.iter().enumerate().filter(|(i, _)| *i != winner) {
        match outcome {
            RotateOutcome::AlreadyRotated { successor: s, .. } => {
                assert_eq!(
                    s.as_deref(),
                    Some(&successor(&format!("n{winner}"))[..]),
                    "{i}"
                );
            }
            other => panic!("rotation {i}: expected AlreadyRotated, got {other:?}"),
        }
    }
    for i in 0..N {
        let found = replicas[0]
            .find_access(&access(&format!("n{i}")))
            .await
            .expect("find_access");
        assert_eq!(found.is_some(), i == winner, "n{i}");
    }
    let refreshes = events(&replicas[1], "o1")
        .await
        .iter()
        .filter(|e| e.kind == EventKind::Refresh)
        .count();
    assert_eq!(refreshes, 1);
}

async fn parallel_logins_of_one_user_keep_the_session_limit(replicas: Vec<Arc<dyn Store>>) {
    const N: usize = 8;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = replicas[i % replicas.len()].clone();
            tokio::spawn(async move {
                let l = with_policy(login("o1", &format!("p{i}"), T0 + i as Millis), MULTI_2);
                store.login(l).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("join").expect("login"));
    }

    assert_eq!(outcomes.iter().filter(|o| o.is_new_user).count(), 1);
    let live = live_ids(&replicas[0], "o1", T0 + HOUR).await;
    assert_eq!(live.len(), 2, "{live:?}");
    let replaced: Vec<String> = outcomes.into_iter().flat_map(|o| o.replaced).collect();
    assert_eq!(replaced.len(), N - 2, "{replaced:?}");
    let unique: HashSet<&String> = replaced.iter().collect();
    assert_eq!(unique.len(), N - 2, "each session is pushed out once");
    assert!(live.iter().all(|s| !unique.contains(s)));
    let events = events(&replicas[1], "o1").await;
    for s in &replaced {
        let ends = ends_of(&events, s);
        assert_eq!(ends.len(), 1, "{s}");
        assert_eq!(ends[0].reason, Some(EndReason::Replaced));
    }
    let logins = events.iter().filter(|e| e.kind == EventKind::Login).count();
    assert_eq!(logins, N);
}

// ---------------------------------------------------------------------------------------
// Sensitive data: session_keys read back, the phone number, the app's access_token.

const APP: &str = "wx5e1e2e0000000001";

/// Real sealing, as the service does it, to show the round trip through the store.
fn crypto() -> Crypto {
    Crypto::derive(&SecretString::from(
        "store-contract-key-0123456789abcdef".to_owned(),
    ))
}

fn app_context(appid: &str) -> Vec<u8> {
    format!("wechat-access-token:{appid}").into_bytes()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn session_keys_are_the_newest_then_the_previous(store: Arc<dyn Store>) {
    assert_eq!(store.session_keys("o1").await.expect("session_keys"), None);
    let with_key = |session: &str, now: Millis, sealed: &[u8], fp: u8| {
        let mut l = login("o1", session, now);
        l.session_key_sealed = sealed.to_vec();
        l.session_key_fp = [fp; 32];
        l
    };

    store
        .login(with_key("s1", T0, b"sealed-A", 0xA))
        .await
        .expect("login");
    assert_eq!(
        store.session_keys("o1").await.expect("session_keys"),
        Some(SealedSessionKeys {
            newest: b"sealed-A".to_vec(),
            previous: None,
        })
    );

    store
        .login(with_key("s2", T0 + MIN, b"sealed-B", 0xB))
        .await
        .expect("login");
    store
        .login(with_key("s3", T0 + 2 * MIN, b"sealed-C", 0xC))
        .await
        .expect("login");

    // Two kept: the newest and the one before it.
    assert_eq!(
        store.session_keys("o1").await.expect("session_keys"),
        Some(SealedSessionKeys {
            newest: b"sealed-C".to_vec(),
            previous: Some(b"sealed-B".to_vec()),
        })
    );
    assert_eq!(store.session_keys("o2").await.expect("session_keys"), None);
}

async fn phone_is_kept_sealed_per_user_and_replaced(store: Arc<dyn Store>, raw: Raw) {
    const PHONE: &str = "SELECT phone FROM users WHERE openid = $1";
    let c = crypto();
    store.login(login("o1", "s1", T0)).await.expect("login");
    store.login(login("o2", "s2", T0)).await.expect("login");
    assert_eq!(store.phone("o1").await.expect("phone"), None);

    let plain =
        br#"{"phone_number":"13800138000","pure_phone_number":"13800138000","country_code":"86"}"#;
    let sealed = c.seal(plain, b"o1").expect("seal");
    assert!(
        store
            .set_phone("o1", &sealed, T0 + MIN)
            .await
            .expect("set_phone")
    );

    let stored = store.phone("o1").await.expect("phone").expect("a number");
    assert_eq!(stored, sealed);
    assert_eq!(c.open(&stored, b"o1").expect("opens for its owner"), plain);
    assert!(c.open(&stored, b"o2").is_err(), "bound to the openid");
    assert_eq!(store.phone("o2").await.expect("phone"), None);
    let column = raw.bytes(PHONE, "o1").await.expect("the column is set");
    assert!(!contains(&column, b"13800138000"), "stored in clear");

    // A new number replaces the old one.
    let sealed2 = c
        .seal(br#"{"phone_number":"13900139000"}"#, b"o1")
        .expect("seal");
    assert!(
        store
            .set_phone("o1", &sealed2, T0 + 2 * MIN)
            .await
            .expect("set_phone")
    );
    assert_eq!(store.phone("o1").await.expect("phone"), Some(sealed2));

    // No such user: nothing stored, nothing found.
    assert!(
        !store
            .set_phone("nobody", &sealed, T0)
            .await
            .expect("set_phone")
    );
    assert_eq!(store.phone("nobody").await.expect("phone"), None);
}

async fn app_token_round_trips_sealed_and_counts_generations(store: Arc<dyn Store>, raw: Raw) {
    const TOKEN: &str = "SELECT token FROM wechat_access_tokens WHERE appid = $1";
    let c = crypto();
    assert_eq!(store.app_token(APP).await.expect("app_token"), None);

    // Locked and released before any token: still none.
    let lock = store.lock_app_token(APP).await.expect("lock");
    assert_eq!(lock.current(), None);
    lock.release().await.expect("release");
    assert_eq!(store.app_token(APP).await.expect("app_token"), None);

    let first = c
        .seal(b"AT-first-0123456789", &app_context(APP))
        .expect("seal");
    let lock = store.lock_app_token(APP).await.expect("lock");
    let stored = lock
        .replace(first.clone(), T0 + 2 * HOUR, T0)
        .await
        .expect("replace");
    let want = StoredAppToken {
        sealed: first.clone(),
        expires_at: T0 + 2 * HOUR,
        renewed_at: T0,
        generation: 1,
    };
    assert_eq!(stored, want);
    let read = store
        .app_token(APP)
        .await
        .expect("app_token")
        .expect("a token");
    assert_eq!(read, want);
    assert_eq!(
        c.open(&read.sealed, &app_context(APP)).expect("opens"),
        b"AT-first-0123456789"
    );
    let column = raw.bytes(TOKEN, APP).await.expect("the column is set");
    assert!(!contains(&column, b"AT-first"), "stored in clear");

    // The lock shows what is stored; a replacement is the next generation.
    let second = c.seal(b"AT-second", &app_context(APP)).expect("seal");
    let lock = store.lock_app_token(APP).await.expect("lock");
    assert_eq!(lock.current(), Some(&want));
    let stored = lock
        .replace(second.clone(), T0 + 4 * HOUR, T0 + 2 * HOUR)
        .await
        .expect("replace");
    assert_eq!(stored.generation, 2);
    assert_eq!(
        store.app_token(APP).await.expect("app_token"),
        Some(StoredAppToken {
            sealed: second,
            expires_at: T0 + 4 * HOUR,
            renewed_at: T0 + 2 * HOUR,
            generation: 2,
        })
    );

    // One row per appid.
    let other = store.lock_app_token("wx_other").await.expect("lock");
    assert_eq!(other.current(), None);
    let stored = other.replace(first, T0 + HOUR, T0).await.expect("replace");
    assert_eq!(stored.generation, 1);
    assert_eq!(
        store
            .app_token(APP)
            .await
            .expect("app_token")
            .map(|t| t.generation),
        Some(2)
    );
}

async fn app_token_lock_makes_another_replica_wait_then_see_the_renewal(
    replicas: Vec<Arc<dyn Store>>,
) {
    let held = replicas[0].lock_app_token(APP).await.expect("lock A");
    assert_eq!(held.current(), None);

    let b = replicas[1].clone();
    let waiting = tokio::spawn(async move {
        let lock = b.lock_app_token(APP).await.expect("lock B");
        let seen = lock.current().cloned();
        lock.release().await.expect("release B");
        seen
    });
    // Every chance for B to take the lock, if it could: it must not while A holds it.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a second replica got the lock while the first held it"
    );

    let stored = held
        .replace(b"sealed-by-A".to_vec(), T0 + 2 * HOUR, T0)
        .await
        .expect("replace");
    assert_eq!(stored.generation, 1);

    // B's turn: it sees A's renewal (and so would not ask WeChat again).
    assert_eq!(waiting.await.expect("join"), Some(stored));
}

async fn a_dropped_app_token_lock_is_released(replicas: Vec<Arc<dyn Store>>) {
    let first = replicas[0].lock_app_token(APP).await.expect("lock");
    first
        .replace(b"sealed-1".to_vec(), T0 + HOUR, T0)
        .await
        .expect("replace");

    // A renewal abandoned halfway (its call cancelled): nothing it did remains.
    let lock = replicas[0].lock_app_token(APP).await.expect("lock");
    drop(lock);

    let lock = replicas[1]
        .lock_app_token(APP)
        .await
        .expect("lock after a drop");
    assert_eq!(lock.current().map(|t| t.generation), Some(1));
    lock.release().await.expect("release");
}

async fn a_held_app_token_lock_keeps_no_other_write_waiting(replicas: Vec<Arc<dyn Store>>) {
    // More logins than either store has connections (SQLite 8).
    const LOGINS: usize = 12;
    // Held while WeChat is asked for a new token, which may take its whole timeout.
    let held = replicas[0].lock_app_token(APP).await.expect("lock");

    // Each login, and a read, is done while the lock is still held. (On SQLite, when the
    // lock was a write transaction, every write waited for it, then failed.)
    let logins = (0..LOGINS).map(|i| {
        let store = replicas[1].clone();
        async move {
            store
                .login(login(&format!("writer-{i}"), &format!("w{i}"), T0))
                .await
        }
    });
    let writes = async {
        let done = futures_util::future::join_all(logins).await;
        let read = replicas[1].app_token(APP).await;
        (done, read)
    };
    // A hang guard, not a speed check: writes queued behind the lock would wait for ever
    // on PostgreSQL (the lock is released below, after this), and fail on SQLite.
    let (done, read) = tokio::time::timeout(std::time::Duration::from_secs(30), writes)
        .await
        .expect("writes kept waiting behind the app's access_token lock");
    for (i, login) in done.into_iter().enumerate() {
        login.unwrap_or_else(|e| panic!("login {i} while the lock was held: {e:?}"));
    }
    assert_eq!(read.expect("read while the lock was held"), None);
    assert_eq!(live_ids(&replicas[1], "writer-0", T0).await, vec!["w0"]);

    // The lock still holds: another replica's lock waits for it.
    let b = replicas[1].clone();
    let waiting = tokio::spawn(async move {
        let lock = b.lock_app_token(APP).await.expect("lock B");
        lock.release().await.expect("release B");
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a second lock while the first was held"
    );
    held.release().await.expect("release");
    waiting.await.expect("join");
}

async fn renewals_racing_on_two_replicas_recheck_and_renew_once(replicas: Vec<Arc<dyn Store>>) {
    const N: usize = 8;
    /// Locks the row and renews it only if it still holds generation `seen`: the re-check
    /// the service does before asking WeChat. Answers whether it renewed.
    async fn renew_if_still(store: Arc<dyn Store>, seen: Option<i64>, i: usize) -> bool {
        let lock = store.lock_app_token(APP).await.expect("lock");
        if lock.current().map(|t| t.generation) != seen {
            lock.release().await.expect("release");
            return false;
        }
        lock.replace(format!("sealed-{i}").into_bytes(), T0 + 2 * HOUR, T0)
            .await
            .expect("replace");
        true
    }

    for (round, seen) in [None, Some(1)].into_iter().enumerate() {
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let store = replicas[i % replicas.len()].clone();
                tokio::spawn(renew_if_still(store, seen, i))
            })
            .collect();
        let mut renewed = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            if task.await.expect("join") {
                renewed.push(i);
            }
        }
        assert_eq!(renewed.len(), 1, "round {round}: {renewed:?}");
        let stored = replicas[1]
            .app_token(APP)
            .await
            .expect("app_token")
            .expect("a token");
        assert_eq!(stored.generation, round as i64 + 1);
        assert_eq!(stored.sealed, format!("sealed-{}", renewed[0]).into_bytes());
    }
}

// ---------------------------------------------------------------------------------------
// SQLite alone.

#[tokio::test]
async fn a_second_opening_of_one_sqlite_file_is_refused_while_the_first_is_open() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("auth.db");
    let first = SqliteStore::open(&path).await.expect("the first opening");

    let second = SqliteStore::open(&path)
        .await
        .expect_err("a second process on the file");

    let why = format!("{second:#}");
    assert!(
        why.contains("another process has the SQLite database"),
        "{why}"
    );
    assert!(why.contains("use PostgreSQL for more"), "{why}");
    drop(first);
    SqliteStore::open(&path)
        .await
        .expect("opens once the first is closed");
}

// ---------------------------------------------------------------------------------------
// A database that holds the edge's schema (both services pointed at one database).

#[tokio::test]
async fn sqlite_refuses_a_file_that_holds_the_edges_schema_and_says_why() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("shared.db");
    let edge = SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await
    .expect("SQLite");
    sqlx::migrate!("../api-service/migrations/sqlite")
        .run(&edge)
        .await
        .expect("the edge's migrations");
    edge.close().await;

    let why = SqliteStore::open(&path)
        .await
        .map(|_| ())
        .expect_err("a file with the edge's schema");

    let why = format!("{why:#}");
    assert!(why.contains("another program's schema"), "{why}");
    assert!(
        why.contains(
            r#"its migration 1 is "profiles", where auth-service (AUTH_DATABASE_URL)'s is "init""#
        ),
        "{why}"
    );
}

#[tokio::test]
async fn postgres_refuses_a_database_that_holds_the_edges_schema_and_says_why() {
    let Some(fixture) = Fixture::postgres("postgres_refuses_a_database_that_holds_the_edges").await
    else {
        return;
    };
    let Backend::Postgres(url) = &fixture.backend else {
        unreachable!("a PostgreSQL fixture");
    };
    let edge = PgPool::connect(url).await.expect("PostgreSQL");
    sqlx::migrate!("../api-service/migrations/postgres")
        .run(&edge)
        .await
        .expect("the edge's migrations");
    edge.close().await;
    let store = PostgresStore::connect_lazy(&SecretString::from(url.clone()), DEFAULT_POOL_SIZE)
        .expect("store");

    let why = store.migrate().await.expect_err("the edge's schema");

    let why = format!("{why:#}");
    assert!(why.contains("another program's schema"), "{why}");
    assert!(
        why.contains(
            r#"its migration 1 is "profiles", where auth-service (AUTH_DATABASE_URL)'s is "init""#
        ),
        "{why}"
    );
    assert!(!store.is_ready());
}

/// A migration this release does not know, as a newer release would have left it.
const NEWER_MIGRATION: &str = "INSERT INTO _sqlx_migrations \
     (version, description, success, checksum, execution_time) \
     VALUES (9999, 'from a newer release', TRUE, $1, 0)";

#[tokio::test]
async fn sqlite_opens_a_file_a_newer_release_migrated_further() {
    // Arrange: a file migrated by this release, then by a newer one (as after `kubectl
    // rollout undo`), with a session in it.
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("auth.db");
    let store = SqliteStore::open(&path).await.expect("first start");
    store.login(login("o1", "s1", T0)).await.expect("login");
    drop(store);
    let raw = SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("SQLite");
    sqlx::query(NEWER_MIGRATION)
        .bind(&[0u8][..])
        .execute(&raw)
        .await
        .expect("a newer release's migration");
    raw.close().await;

    // Act, assert: this release starts on it and reads what was there.
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&path)
            .await
            .expect("an older release on a newer schema"),
    );
    assert_eq!(live_ids(&store, "o1", T0).await, vec!["s1"]);
}

#[tokio::test]
async fn postgres_serves_a_database_a_newer_release_migrated_further() {
    let Some(fixture) = Fixture::postgres("postgres_serves_a_database_a_newer_release").await
    else {
        return;
    };
    let Backend::Postgres(url) = &fixture.backend else {
        unreachable!("a PostgreSQL fixture");
    };
    let store = fixture.store().await;
    store.login(login("o1", "s1", T0)).await.expect("login");
    let raw = PgPool::connect(url).await.expect("PostgreSQL");
    sqlx::query(NEWER_MIGRATION)
        .bind(&[0u8][..])
        .execute(&raw)
        .await
        .expect("a newer release's migration");

    let replica = PostgresStore::connect_lazy(&SecretString::from(url.clone()), DEFAULT_POOL_SIZE)
        .expect("store");
    replica
        .migrate()
        .await
        .expect("an older release on a newer schema");

    assert!(replica.is_ready());
    let replica: Arc<dyn Store> = Arc::new(replica);
    assert_eq!(live_ids(&replica, "o1", T0).await, vec!["s1"]);
}

#[tokio::test]
async fn postgres_builds_again_an_index_whose_concurrent_build_was_cut_short() {
    let Some(fixture) =
        Fixture::postgres("postgres_builds_again_an_index_whose_build_was_cut").await
    else {
        return;
    };
    let Backend::Postgres(url) = &fixture.backend else {
        unreachable!("a PostgreSQL fixture");
    };
    let store = fixture.store().await;
    store.login(login("o1", "s1", T0)).await.expect("login");
    store
        .rotate(rotation("s1", "n1", T0 + MIN))
        .await
        .expect("rotate");
    store.login(login("o2", "s2", T0)).await.expect("login");
    store
        .rotate(rotation("s2", "n2", T0 + MIN))
        .await
        .expect("rotate");
    // Arrange: migration 3 as a build cut short leaves it: unapplied, its index INVALID
    // (a unique build over two equal keys fails after creating the index, as a kill would).
    let raw = PgPool::connect(url).await.expect("PostgreSQL");
    for sql in [
        "DROP INDEX refresh_tokens_successors_by_rotation",
        "DELETE FROM _sqlx_migrations WHERE version = 3",
    ] {
        sqlx::query(sql).execute(&raw).await.expect(sql);
    }
    sqlx::query(
        "CREATE UNIQUE INDEX CONCURRENTLY refresh_tokens_successors_by_rotation \
         ON refresh_tokens (rotated_at) WHERE successor IS NOT NULL",
    )
    .execute(&raw)
    .await
    .expect_err("two successors rotated at the same instant");
    let valid = async || -> Vec<(String, bool)> {
        sqlx::query_as(
            "SELECT c.relname::TEXT, i.indisvalid FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'refresh_tokens_successors_by_rotation'",
        )
        .fetch_all(&raw)
        .await
        .expect("pg_index")
    };
    assert_eq!(
        valid().await,
        [("refresh_tokens_successors_by_rotation".to_owned(), false)]
    );

    // Act: a replica starts.
    let replica = PostgresStore::connect_lazy(&SecretString::from(url.clone()), DEFAULT_POOL_SIZE)
        .expect("store");
    replica.migrate().await.expect("migrated");

    // Assert: the leftover was dropped and the index built again, valid; migration 3 applied.
    assert_eq!(
        valid().await,
        [("refresh_tokens_successors_by_rotation".to_owned(), true)]
    );
    let applied: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = 3)")
            .fetch_one(&raw)
            .await
            .expect("history");
    assert!(applied);
    assert!(replica.is_ready());
}
