//! The `Cache` contract: the same tests against `MemoryCache` and `RedisCache` (each Redis
//! test on an appid of its own, so keys never collide), then what only a shared cache does
//! (two replicas, one Redis), and `FallbackCache` with Redis away.
//!
//! Windows and TTLs are short and real: tests wait for outcomes (with deadlines), and never
//! assert how long something took.

use std::sync::Arc;
use std::time::Duration;

use auth_service::cache::{
    Cache, CodeClaim, FallbackCache, MarkAsk, MemoryCache, PhoneStamp, RateDecision, RedisCache,
    SessionMark,
};
use secrecy::SecretString;
use shared::REST_AFTER_FAILURE;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::{self, External};

/// How long a test waits for something that should happen well before.
const PATIENCE: Duration = Duration::from_secs(10);
const USED_TTL: Duration = Duration::from_secs(60);
const IN_FLIGHT_TTL: Duration = Duration::from_secs(30);

fn new_appid() -> String {
    format!("wxtest{}", uuid::Uuid::new_v4().simple())
}

fn redis_at(url: &str, appid: &str) -> RedisCache {
    RedisCache::new(&SecretString::from(url.to_owned()), appid).expect("a usable Redis URL")
}

/// A Redis cache on a fresh appid for `test`, or `None` when skipping was asked.
fn redis_for(test: &str) -> Option<RedisCache> {
    match support::redis(test) {
        External::Run(url) => Some(redis_at(&url, &new_appid())),
        External::Skip => None,
    }
}

/// A loopback URL where nothing listens.
fn dead_redis_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("its address").port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

fn code() -> String {
    format!("hash-{}", uuid::Uuid::new_v4().simple())
}

async fn claim(c: &dyn Cache, code: &str, ttl: Duration) -> CodeClaim {
    c.claim_code(code, ttl).await.expect("claim_code answers")
}

async fn hit(c: &dyn Cache, key: &str, limit: u32, window: Duration) -> RateDecision {
    c.hit(key, limit, window).await.expect("hit answers")
}

/// Claims `code` until it is `Acquired` (panics after [`PATIENCE`]).
async fn wait_until_acquired(c: &dyn Cache, code: &str, ttl: Duration) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match claim(c, code, ttl).await {
            CodeClaim::Acquired => return,
            other if Instant::now() > deadline => panic!("still {other:?} after {PATIENCE:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Hits `key` until it is allowed again (panics after [`PATIENCE`]).
async fn wait_until_allowed(c: &dyn Cache, key: &str, limit: u32, window: Duration) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match hit(c, key, limit, window).await {
            RateDecision::Allowed => return,
            RateDecision::Limited { .. } if Instant::now() > deadline => {
                panic!("still limited after {PATIENCE:?}")
            }
            RateDecision::Limited { retry_after } => {
                tokio::time::sleep(retry_after.max(Duration::from_millis(20))).await;
            }
        }
    }
}

// ---- the contract, for every backend ----

async fn a_code_is_claimed_once_and_then_remembered_as_used(c: &dyn Cache) {
    let code = code();

    let first = claim(c, &code, IN_FLIGHT_TTL).await;
    let second = claim(c, &code, IN_FLIGHT_TTL).await;
    c.finish_code(&code, true, USED_TTL).await.expect("finish");
    let after = claim(c, &code, IN_FLIGHT_TTL).await;

    assert_eq!(first, CodeClaim::Acquired);
    assert_eq!(second, CodeClaim::InFlight);
    assert_eq!(after, CodeClaim::Used);
    // Another code is its own.
    assert_eq!(
        claim(c, &self::code(), IN_FLIGHT_TTL).await,
        CodeClaim::Acquired
    );
}

async fn a_failed_exchange_releases_the_code(c: &dyn Cache) {
    let code = code();
    assert_eq!(claim(c, &code, IN_FLIGHT_TTL).await, CodeClaim::Acquired);

    c.finish_code(&code, false, USED_TTL).await.expect("finish");

    assert_eq!(claim(c, &code, IN_FLIGHT_TTL).await, CodeClaim::Acquired);
}

async fn an_in_flight_claim_lapses_after_its_ttl(c: &dyn Cache) {
    let code = code();
    let ttl = Duration::from_millis(1000);
    assert_eq!(claim(c, &code, ttl).await, CodeClaim::Acquired);
    assert_eq!(claim(c, &code, ttl).await, CodeClaim::InFlight);

    // Nobody finishes it: it must become free again by itself.
    wait_until_acquired(c, &code, ttl).await;
}

async fn the_window_allows_limit_then_refuses_then_resets(c: &dyn Cache) {
    let key = format!("login-ip:{}", uuid::Uuid::new_v4());
    let window = Duration::from_secs(2);

    let allowed = [
        hit(c, &key, 3, window).await,
        hit(c, &key, 3, window).await,
        hit(c, &key, 3, window).await,
    ];
    let refused = hit(c, &key, 3, window).await;

    assert_eq!(allowed, [RateDecision::Allowed; 3]);
    match refused {
        RateDecision::Limited { retry_after } => {
            assert!(retry_after <= window, "{retry_after:?} > {window:?}");
        }
        RateDecision::Allowed => panic!("the 4th event of 3 was allowed"),
    }
    // Another key has a window of its own.
    assert_eq!(
        hit(c, &format!("{key}-other"), 3, window).await,
        RateDecision::Allowed
    );
    // The window ends, and counting starts again.
    wait_until_allowed(c, &key, 3, window).await;
}

async fn a_short_window_resets(c: &dyn Cache) {
    let key = format!("login-ip:{}", uuid::Uuid::new_v4());
    let window = Duration::from_millis(300);
    assert_eq!(hit(c, &key, 1, window).await, RateDecision::Allowed);

    tokio::time::sleep(Duration::from_millis(600)).await;

    assert_eq!(hit(c, &key, 1, window).await, RateDecision::Allowed);
}

async fn mark(c: &dyn Cache, session_id: &str) -> Option<SessionMark> {
    c.session_mark(session_id)
        .await
        .expect("session_mark answers")
}

async fn an_end_mark_wins_over_alive_and_alive_never_replaces_one(c: &dyn Cache) {
    let (s, t) = (code(), code());
    let live = Duration::from_secs(30);
    assert_eq!(mark(c, &s).await, None);
    c.mark_alive(&s, live).await.expect("mark_alive");
    assert_eq!(mark(c, &s).await, Some(SessionMark::Alive));
    c.mark_ended(&[s.clone(), t.clone()], Duration::from_secs(60))
        .await
        .expect("mark_ended");
    assert_eq!(mark(c, &s).await, Some(SessionMark::Ended));
    assert_eq!(mark(c, &t).await, Some(SessionMark::Ended));
    // A Verify that read the database before the end committed writes its mark too late.
    c.mark_alive(&s, live).await.expect("mark_alive");
    assert_eq!(mark(c, &s).await, Some(SessionMark::Ended));
    c.mark_ended(&[], live).await.expect("nothing to mark");
}

/// Reads `session_id`'s mark until there is none (panics after [`PATIENCE`]).
async fn wait_until_unmarked(c: &dyn Cache, session_id: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match mark(c, session_id).await {
            None => return,
            Some(other) if Instant::now() > deadline => {
                panic!("still {other:?} after {PATIENCE:?}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn a_mark_lapses(c: &dyn Cache) {
    let s = code();
    // Long enough that the first read is well inside it, short next to `PATIENCE`.
    c.mark_alive(&s, Duration::from_secs(2))
        .await
        .expect("mark_alive");
    assert_eq!(mark(c, &s).await, Some(SessionMark::Alive));
    wait_until_unmarked(c, &s).await;
}

/// `stamps`: whether `c` stamps phone numbers (Redis; the in-process cache answers `Local`).
async fn many_marks_are_read_at_once_in_order(c: &dyn Cache, stamps: bool) {
    let (alive, ended, none) = (code(), code(), code());
    let (with_stamp, without) = (code(), code());
    c.mark_alive(&alive, Duration::from_secs(30))
        .await
        .expect("mark_alive");
    c.mark_ended(std::slice::from_ref(&ended), Duration::from_secs(60))
        .await
        .expect("mark_ended");
    // Redis makes a stamp (the memory cache's is always `Local`).
    c.new_phone_stamp(&with_stamp).await.expect("answers");
    let asks = [
        MarkAsk {
            session_id: &alive,
            phone_of: Some(&with_stamp),
        },
        MarkAsk {
            session_id: &ended,
            phone_of: None,
        },
        MarkAsk {
            session_id: &none,
            phone_of: Some(&without),
        },
        MarkAsk {
            session_id: &alive,
            phone_of: None,
        },
    ];
    let read = c.session_marks(&asks).await.expect("session_marks answers");
    let marks: Vec<_> = read.iter().map(|(mark, _)| *mark).collect();
    assert_eq!(
        marks,
        [
            Some(SessionMark::Alive),
            Some(SessionMark::Ended),
            None,
            Some(SessionMark::Alive)
        ]
    );
    // Each answer is what the same ask alone reads.
    for (ask, read) in asks.iter().zip(&read) {
        let alone = match ask.phone_of {
            Some(openid) => {
                let (mark, stamp) = c
                    .session_mark_and_phone_stamp(ask.session_id, openid)
                    .await
                    .expect("answers");
                (mark, Some(stamp))
            }
            None => (mark(c, ask.session_id).await, None),
        };
        assert_eq!(*read, alone, "{ask:?}");
    }
    if stamps {
        assert!(
            matches!(read[0].1, Some(PhoneStamp::Current(_))),
            "{:?}",
            read[0].1
        );
        assert_eq!(read[2].1, Some(PhoneStamp::Missing));
    } else {
        assert_eq!(read[0].1, Some(PhoneStamp::Local));
        assert_eq!(read[2].1, Some(PhoneStamp::Local));
    }
    assert!(c.session_marks(&[]).await.expect("answers").is_empty());
}

/// Reads made at once (as `Verify` calls arriving together make them) each get their own
/// session's mark and user's stamp, whether Redis sends them together or not (`stamps`: as
/// for [`many_marks_are_read_at_once_in_order`]).
async fn single_reads_at_once_each_get_their_own(c: &dyn Cache, stamps: bool) {
    let sessions: Vec<String> = (0..40).map(|_| code()).collect();
    let openids: Vec<String> = (0..40).map(|_| code()).collect();
    for (i, s) in sessions.iter().enumerate() {
        match i % 3 {
            0 => c
                .mark_alive(s, Duration::from_secs(30))
                .await
                .expect("alive"),
            1 => c
                .mark_ended(std::slice::from_ref(s), Duration::from_secs(60))
                .await
                .expect("ended"),
            _ => {}
        }
        if i % 4 == 0 {
            c.new_phone_stamp(&openids[i]).await.expect("answers");
        }
    }
    let want_mark = |i: usize| match i % 3 {
        0 => Some(SessionMark::Alive),
        1 => Some(SessionMark::Ended),
        _ => None,
    };
    let reads = sessions
        .iter()
        .zip(&openids)
        .enumerate()
        .map(|(i, (s, o))| async move {
            if i % 2 == 0 {
                let (mark, stamp) = c.session_mark_and_phone_stamp(s, o).await.expect("answers");
                (mark, Some(stamp))
            } else {
                (c.session_mark(s).await.expect("answers"), None)
            }
        });
    let got = futures_util::future::join_all(reads).await;
    for (i, (mark, stamp)) in got.into_iter().enumerate() {
        assert_eq!(mark, want_mark(i), "session {i}");
        match stamp {
            None => assert!(i % 2 == 1, "session {i}: a stamp was asked"),
            Some(PhoneStamp::Local) => assert!(!stamps, "session {i}: no stamp"),
            Some(PhoneStamp::Current(_)) => {
                assert!(stamps && i % 4 == 0, "session {i}: {stamp:?}")
            }
            Some(PhoneStamp::Missing) => {
                assert!(stamps && i % 4 != 0, "session {i}: a stamp was made")
            }
            Some(other) => panic!("session {i}: {other:?}"),
        }
    }
}

/// Runs each contract test against the in-process cache and against Redis (with `stamps`:
/// telling the test whether the cache stamps phone numbers, which only Redis does).
macro_rules! for_each_backend {
    (stamps: $($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn memory() {
                super::$test(&auth_service::cache::MemoryCache::new(), false).await;
            }

            #[tokio::test]
            async fn redis() {
                let name = concat!("cache::", stringify!($test), "::redis");
                let Some(cache) = super::redis_for(name) else {
                    return;
                };
                super::$test(&cache, true).await;
            }
        }
    )*};
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn memory() {
                super::$test(&auth_service::cache::MemoryCache::new()).await;
            }

            #[tokio::test]
            async fn redis() {
                let name = concat!("cache::", stringify!($test), "::redis");
                let Some(cache) = super::redis_for(name) else {
                    return;
                };
                super::$test(&cache).await;
            }
        }
    )*};
}

for_each_backend!(
    a_code_is_claimed_once_and_then_remembered_as_used,
    a_failed_exchange_releases_the_code,
    an_in_flight_claim_lapses_after_its_ttl,
    the_window_allows_limit_then_refuses_then_resets,
    a_short_window_resets,
    an_end_mark_wins_over_alive_and_alive_never_replaces_one,
    a_mark_lapses,
);

for_each_backend!(
    stamps: many_marks_are_read_at_once_in_order,
    single_reads_at_once_each_get_their_own,
);

// ---- one code, many logins at once ----

/// Claims `code` 16 times at once across `caches` (round robin) and counts the outcomes.
async fn claim_16_at_once(caches: &[Arc<dyn Cache>], code: &str) -> (usize, usize) {
    let mut set = JoinSet::new();
    for i in 0..16 {
        let cache = caches[i % caches.len()].clone();
        let code = code.to_owned();
        set.spawn(async move { cache.claim_code(&code, IN_FLIGHT_TTL).await });
    }
    let mut acquired = 0;
    let mut in_flight = 0;
    while let Some(joined) = set.join_next().await {
        match joined.expect("task").expect("claim_code answers") {
            CodeClaim::Acquired => acquired += 1,
            CodeClaim::InFlight => in_flight += 1,
            CodeClaim::Used => panic!("nobody finished the code"),
        }
    }
    (acquired, in_flight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_claims_of_one_code_in_memory_acquire_it_once() {
    let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());

    let (acquired, in_flight) = claim_16_at_once(&[cache], &code()).await;

    assert_eq!((acquired, in_flight), (1, 15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_claims_of_one_code_on_two_redis_replicas_acquire_it_once() {
    let External::Run(url) =
        support::redis("cache::parallel_claims_of_one_code_on_two_redis_replicas_acquire_it_once")
    else {
        return;
    };
    let appid = new_appid();
    let a: Arc<dyn Cache> = Arc::new(redis_at(&url, &appid));
    let b: Arc<dyn Cache> = Arc::new(redis_at(&url, &appid));

    let (acquired, in_flight) = claim_16_at_once(&[a, b], &code()).await;

    assert_eq!((acquired, in_flight), (1, 15));
}

// ---- what only a shared cache does ----

#[tokio::test]
async fn two_redis_replicas_share_claims_and_counts() {
    let External::Run(url) = support::redis("cache::two_redis_replicas_share_claims_and_counts")
    else {
        return;
    };
    let appid = new_appid();
    let a = redis_at(&url, &appid);
    let b = redis_at(&url, &appid);
    let code = code();
    let key = "login-ip:203.0.113.7";
    let window = Duration::from_secs(60);

    assert_eq!(claim(&a, &code, IN_FLIGHT_TTL).await, CodeClaim::Acquired);
    assert_eq!(claim(&b, &code, IN_FLIGHT_TTL).await, CodeClaim::InFlight);
    a.finish_code(&code, true, USED_TTL).await.expect("finish");
    assert_eq!(claim(&b, &code, IN_FLIGHT_TTL).await, CodeClaim::Used);

    assert_eq!(hit(&a, key, 2, window).await, RateDecision::Allowed);
    assert_eq!(hit(&a, key, 2, window).await, RateDecision::Allowed);
    assert!(matches!(
        hit(&b, key, 2, window).await,
        RateDecision::Limited { .. }
    ));
}

#[tokio::test]
async fn another_app_on_the_same_redis_shares_nothing() {
    let External::Run(url) = support::redis("cache::another_app_on_the_same_redis_shares_nothing")
    else {
        return;
    };
    let ours = redis_at(&url, &new_appid());
    let theirs = redis_at(&url, &new_appid());
    let code = code();
    let key = "login-ip:203.0.113.7";
    let window = Duration::from_secs(60);

    ours.finish_code(&code, true, USED_TTL)
        .await
        .expect("finish");
    assert_eq!(hit(&ours, key, 1, window).await, RateDecision::Allowed);

    assert_eq!(
        claim(&theirs, &code, IN_FLIGHT_TTL).await,
        CodeClaim::Acquired
    );
    assert_eq!(hit(&theirs, key, 1, window).await, RateDecision::Allowed);
}

#[tokio::test]
async fn a_released_claim_never_erases_a_used_mark() {
    let External::Run(url) = support::redis("cache::a_released_claim_never_erases_a_used_mark")
    else {
        return;
    };
    let appid = new_appid();
    let a = redis_at(&url, &appid);
    let b = redis_at(&url, &appid);
    let code = code();
    // B spent the code (say A's claim had lapsed); A's exchange then fails and releases.
    b.finish_code(&code, true, USED_TTL).await.expect("finish");

    a.finish_code(&code, false, USED_TTL)
        .await
        .expect("release");

    assert_eq!(claim(&b, &code, IN_FLIGHT_TTL).await, CodeClaim::Used);
}

#[tokio::test]
async fn no_phone_stamp_is_made_while_any_write_of_the_number_runs() {
    let External::Run(url) =
        support::redis("cache::no_phone_stamp_is_made_while_any_write_of_the_number_runs")
    else {
        return;
    };
    let appid = new_appid();
    let (a, b) = (redis_at(&url, &appid), redis_at(&url, &appid));
    let openid = "o-stamped";
    let ttl = Duration::from_secs(60);
    // Two writes of one number overlap, on two replicas.
    a.phone_write_started(openid, ttl).await.expect("A starts");
    b.phone_write_started(openid, ttl).await.expect("B starts");

    // Act: A's write ends first; B's has not (and may never say so: its end may fail).
    a.phone_write_ended(openid).await.expect("A ends");

    // Assert: no stamp can be made, and none is usable, until B's write ends too.
    assert_eq!(
        a.phone_stamp(openid).await.expect("read"),
        PhoneStamp::Unusable
    );
    assert_eq!(a.new_phone_stamp(openid).await.expect("make"), None);
    b.phone_write_ended(openid).await.expect("B ends");
    assert_eq!(
        a.phone_stamp(openid).await.expect("read"),
        PhoneStamp::Missing
    );
    let made = a.new_phone_stamp(openid).await.expect("make");
    assert!(made.is_some());
    assert_eq!(
        b.phone_stamp(openid).await.expect("read"),
        PhoneStamp::Current(made.unwrap_or_default())
    );
}

// ---- Redis away ----

#[tokio::test]
async fn a_redis_cache_builds_without_redis_and_its_calls_fail() {
    let cache = redis_at(&dead_redis_url(), &new_appid());

    let claimed = cache.claim_code(&code(), IN_FLIGHT_TTL).await;
    let counted = cache.hit("k", 1, Duration::from_secs(1)).await;

    assert!(claimed.is_err(), "{claimed:?}");
    assert!(counted.is_err(), "{counted:?}");
    assert!(cache.ping().await.is_err());
}

#[tokio::test]
async fn the_fallback_answers_from_memory_while_redis_is_away() {
    let cache = FallbackCache::new(
        redis_at(&dead_redis_url(), &new_appid()),
        MemoryCache::new(),
    );
    let code = code();
    let window = Duration::from_secs(60);

    let first = claim(&cache, &code, IN_FLIGHT_TTL).await;
    let second = claim(&cache, &code, IN_FLIGHT_TTL).await;
    cache
        .finish_code(&code, true, USED_TTL)
        .await
        .expect("finish");
    let after = claim(&cache, &code, IN_FLIGHT_TTL).await;
    let counts = [
        hit(&cache, "ip", 2, window).await,
        hit(&cache, "ip", 2, window).await,
        hit(&cache, "ip", 2, window).await,
    ];

    assert_eq!(
        (first, second, after),
        (CodeClaim::Acquired, CodeClaim::InFlight, CodeClaim::Used)
    );
    assert_eq!(counts[..2], [RateDecision::Allowed; 2]);
    assert!(matches!(counts[2], RateDecision::Limited { .. }));
    assert!(!cache.redis_ok().await);
}

#[tokio::test]
async fn the_fallback_never_answers_a_session_mark_from_memory() {
    let cache = FallbackCache::new(
        redis_at(&dead_redis_url(), &new_appid()),
        MemoryCache::new(),
    );
    let s = code();
    // Marks are not kept in memory while Redis is away: another replica could not see them.
    cache
        .mark_alive(&s, Duration::from_secs(30))
        .await
        .expect("mark_alive is best effort");
    assert_eq!(
        mark(&cache, &s).await,
        None,
        "no mark: Verify asks the database"
    );
    assert!(
        cache
            .mark_ended(std::slice::from_ref(&s), Duration::from_secs(60))
            .await
            .is_err(),
        "an end's mark that Redis did not take is reported, to be retried"
    );
}

/// A TCP proxy to Redis that can hang: once frozen it forwards nothing either way and keeps
/// every connection open, as a Redis on a lost node would, and counts the bytes clients
/// still send it.
struct HangingRedis {
    addr: std::net::SocketAddr,
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    sent_while_frozen: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HangingRedis {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let frozen = Arc::new(tokio::sync::watch::channel(false).0);
        let sent_while_frozen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (f, sent) = (frozen.clone(), sent_while_frozen.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (mut frozen, sent) = (f.subscribe(), sent.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        _ = frozen.wait_for(|f| *f) => {}
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = client.read(&mut buf).await {
                        sent.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    }
                    drop(server);
                });
            }
        });
        Self {
            addr,
            frozen,
            sent_while_frozen,
            task,
        }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    fn sent_while_frozen(&self) -> usize {
        self.sent_while_frozen
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HangingRedis {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_hung_redis_is_asked_once_per_rest_not_by_every_call() {
    // Arrange: a fallback whose Redis answers, then hangs.
    let External::Run(url) =
        support::redis("cache::a_hung_redis_is_asked_once_per_rest_not_by_every_call")
    else {
        return;
    };
    let mut via = url::Url::parse(&url).expect("a Redis URL");
    let target = via
        .socket_addrs(|| Some(6379))
        .expect("Redis's address")
        .into_iter()
        .next()
        .expect("an address");
    let proxy = HangingRedis::start(target).await;
    via.set_ip_host(proxy.addr.ip()).expect("an IP host");
    via.set_port(Some(proxy.addr.port())).expect("a port");
    let cache = FallbackCache::new(redis_at(via.as_str(), &new_appid()), MemoryCache::new());
    let s = code();
    cache
        .mark_alive(&s, Duration::from_secs(30))
        .await
        .expect("best effort");
    assert_eq!(
        mark(&cache, &s).await,
        Some(SessionMark::Alive),
        "Redis answers"
    );
    proxy.freeze();

    // Act: the first call waits for its timeout; the calls right after it are answered
    // without asking.
    assert_eq!(
        mark(&cache, &s).await,
        None,
        "no mark: the database answers"
    );
    let asked_once = proxy.sent_while_frozen();
    for _ in 0..10 {
        assert_eq!(mark(&cache, &s).await, None);
        cache
            .mark_alive(&s, Duration::from_secs(30))
            .await
            .expect("best effort");
        assert_eq!(
            hit(&cache, "ip", 100, Duration::from_secs(60)).await,
            RateDecision::Allowed
        );
    }
    let resting = proxy.sent_while_frozen();
    tokio::time::sleep(REST_AFTER_FAILURE).await;
    assert_eq!(mark(&cache, &s).await, None);
    let after_rest = proxy.sent_while_frozen();

    // Assert
    assert!(asked_once > 0, "the first call was sent");
    assert_eq!(resting, asked_once, "nothing sent while resting");
    assert!(after_rest > resting, "asked again after the rest");
}

#[tokio::test]
async fn an_error_redis_answers_does_not_rest_the_fallback_from_it() {
    // Arrange: a rate window's key holds a hash, which the counter's INCR refuses
    // (WRONGTYPE): Redis answers, with an error, as a full memory refuses writes.
    let External::Run(url) =
        support::redis("cache::an_error_redis_answers_does_not_rest_the_fallback_from_it")
    else {
        return;
    };
    let appid = new_appid();
    let cache = FallbackCache::new(redis_at(&url, &appid), MemoryCache::new());
    let good = code();
    cache
        .mark_alive(&good, Duration::from_secs(30))
        .await
        .expect("best effort");
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd("HSET")
        .arg(format!("wxauth:{appid}:rate:wrong"))
        .arg("f")
        .arg("v")
        .query_async::<()>(&mut conn)
        .await
        .expect("HSET");

    // Act: the refused count, then at once a read.
    let counted = hit(&cache, "wrong", 5, Duration::from_secs(60)).await;
    let next = mark(&cache, &good).await;

    // Assert: the count falls back to memory; the read is Redis's, not a rest's.
    assert_eq!(counted, RateDecision::Allowed);
    assert_eq!(next, Some(SessionMark::Alive), "the next call asked Redis");
}

#[tokio::test]
async fn a_value_redis_holds_that_is_no_mark_fails_its_own_read_only() {
    let External::Run(url) =
        support::redis("cache::a_value_redis_holds_that_is_no_mark_fails_its_own_read_only")
    else {
        return;
    };
    let appid = new_appid();
    let c = redis_at(&url, &appid);
    let (bogus, binary, good, openid) = (code(), code(), code(), code());
    c.mark_alive(&good, Duration::from_secs(30))
        .await
        .expect("mark_alive");
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for (key, value) in [
        (format!("wxauth:{appid}:session:{bogus}"), b"bogus".to_vec()),
        (format!("wxauth:{appid}:session:{binary}"), vec![0xff, 0xfe]),
        (format!("wxauth:{appid}:phone:{openid}"), vec![0xff]),
    ] {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(60)
            .query_async::<()>(&mut conn)
            .await
            .expect("SET");
    }

    // Read at once (as calls arriving together read), so in one MGET.
    let (bogus_read, binary_read, good_read) = tokio::join!(
        c.session_mark(&bogus),
        c.session_mark(&binary),
        c.session_mark_and_phone_stamp(&good, &openid)
    );
    assert!(bogus_read.is_err(), "{bogus_read:?}");
    assert!(binary_read.is_err(), "{binary_read:?}");
    assert_eq!(
        good_read.expect("answers"),
        (Some(SessionMark::Alive), PhoneStamp::Unusable),
        "a stamp that is not text is unusable"
    );

    // A batch's reads: the bad ones read as no mark (the database answers them).
    let read = c
        .session_marks(&[
            MarkAsk {
                session_id: &bogus,
                phone_of: None,
            },
            MarkAsk {
                session_id: &good,
                phone_of: Some(&openid),
            },
            MarkAsk {
                session_id: &binary,
                phone_of: None,
            },
        ])
        .await
        .expect("answers");
    assert_eq!(
        read,
        [
            (None, None),
            (Some(SessionMark::Alive), Some(PhoneStamp::Unusable)),
            (None, None)
        ]
    );
}

// ---- phone numbers' stamps ----

async fn stamp(c: &dyn Cache, openid: &str) -> PhoneStamp {
    c.phone_stamp(openid).await.expect("phone_stamp answers")
}

/// Reads `openid`'s phone stamp until it is `want` (panics after [`PATIENCE`]).
async fn wait_until_stamp(c: &dyn Cache, openid: &str, want: PhoneStamp) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match stamp(c, openid).await {
            got if got == want => return,
            other if Instant::now() > deadline => panic!("still {other:?} after {PATIENCE:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn in_memory_a_phone_stamp_is_always_local() {
    let c = MemoryCache::new();
    assert_eq!(stamp(&c, "o").await, PhoneStamp::Local);
    c.phone_write_started("o", Duration::from_secs(60))
        .await
        .expect("no-op");
    assert_eq!(stamp(&c, "o").await, PhoneStamp::Local);
    assert_eq!(c.new_phone_stamp("o").await.expect("answers"), None);
}

#[tokio::test]
async fn a_phone_stamp_is_made_once_shared_by_replicas_and_replaced_by_a_write() {
    let External::Run(url) = support::redis(
        "cache::a_phone_stamp_is_made_once_shared_by_replicas_and_replaced_by_a_write",
    ) else {
        return;
    };
    let appid = new_appid();
    let (a, b) = (redis_at(&url, &appid), redis_at(&url, &appid));
    let openid = code();

    assert_eq!(stamp(&a, &openid).await, PhoneStamp::Missing);
    let made = a.new_phone_stamp(&openid).await.expect("answers");
    let made = made.expect("the first read makes the stamp");
    assert_eq!(
        b.new_phone_stamp(&openid).await.expect("answers"),
        None,
        "a stamp is made once"
    );
    let session = code();
    b.mark_alive(&session, Duration::from_secs(30))
        .await
        .expect("mark_alive");
    assert_eq!(
        b.session_mark_and_phone_stamp(&session, &openid)
            .await
            .expect("answers"),
        (Some(SessionMark::Alive), PhoneStamp::Current(made.clone())),
        "both in one read, on the other replica"
    );

    // B writes the number: while it runs nothing counts, and no read makes a stamp.
    b.phone_write_started(&openid, Duration::from_secs(60))
        .await
        .expect("phone_write_started");
    assert_eq!(stamp(&a, &openid).await, PhoneStamp::Unusable);
    assert_eq!(a.new_phone_stamp(&openid).await.expect("answers"), None);
    b.phone_write_ended(&openid)
        .await
        .expect("phone_write_ended");

    // After it, the next read makes a stamp that is not the old one.
    assert_eq!(stamp(&a, &openid).await, PhoneStamp::Missing);
    let next = a.new_phone_stamp(&openid).await.expect("answers");
    let next = next.expect("a new stamp");
    assert_ne!(next, made);
    assert_eq!(stamp(&b, &openid).await, PhoneStamp::Current(next));
}

#[tokio::test]
async fn a_phone_write_that_never_ends_lapses() {
    let Some(c) = redis_for("cache::a_phone_write_that_never_ends_lapses") else {
        return;
    };
    let openid = code();
    // Long enough that the first read is well inside it, short next to `PATIENCE`.
    c.phone_write_started(&openid, Duration::from_secs(2))
        .await
        .expect("phone_write_started");
    assert_eq!(stamp(&c, &openid).await, PhoneStamp::Unusable);
    wait_until_stamp(&c, &openid, PhoneStamp::Missing).await;
}

#[tokio::test]
async fn the_fallback_never_keeps_numbers_and_refuses_a_write_while_redis_is_away() {
    let cache = FallbackCache::new(
        redis_at(&dead_redis_url(), &new_appid()),
        MemoryCache::new(),
    );
    assert_eq!(stamp(&cache, "o").await, PhoneStamp::Unusable);
    assert_eq!(
        cache
            .session_mark_and_phone_stamp("s", "o")
            .await
            .expect("answers"),
        (None, PhoneStamp::Unusable)
    );
    assert_eq!(
        cache
            .session_marks(&[
                MarkAsk {
                    session_id: "s",
                    phone_of: Some("o")
                },
                MarkAsk {
                    session_id: "t",
                    phone_of: None
                },
            ])
            .await
            .expect("answers"),
        [(None, Some(PhoneStamp::Unusable)), (None, None)],
        "as each alone: no mark, no usable stamp"
    );
    assert_eq!(cache.new_phone_stamp("o").await.expect("answers"), None);
    assert!(
        cache
            .phone_write_started("o", Duration::from_secs(60))
            .await
            .is_err(),
        "other replicas could not be told of the write"
    );
    cache
        .phone_write_ended("o")
        .await
        .expect("best effort: the mark lapses");
}

#[tokio::test]
async fn the_fallback_uses_redis_when_it_answers() {
    let External::Run(url) = support::redis("cache::the_fallback_uses_redis_when_it_answers")
    else {
        return;
    };
    let appid = new_appid();
    let fallback = FallbackCache::new(redis_at(&url, &appid), MemoryCache::new());
    let replica = redis_at(&url, &appid);
    let code = code();

    assert!(fallback.redis_ok().await);
    assert_eq!(
        claim(&fallback, &code, IN_FLIGHT_TTL).await,
        CodeClaim::Acquired
    );
    assert_eq!(
        claim(&replica, &code, IN_FLIGHT_TTL).await,
        CodeClaim::InFlight
    );
    fallback
        .finish_code(&code, true, USED_TTL)
        .await
        .expect("finish");
    assert_eq!(claim(&replica, &code, IN_FLIGHT_TTL).await, CodeClaim::Used);
}
