//! `Verify` answers a live session from memory (the token's facts, and the session's mark in
//! Redis), so every way a session ends must reach the other replicas at once: two real
//! auth-service processes on one PostgreSQL, with Redis (marks shared) and without it
//! (the in-memory path is off, every `Verify` reads the database). Each case warms replica
//! B's memory with `Verify` calls, ends the session on replica A, and expects B to refuse
//! the token on the very next call, with the end's own reason. One case cuts A alone off
//! from Redis while it ends a session, and checks that A's mark lands once Redis is back.

use std::time::{Duration, Instant};

use proto::v1::verify_batch_result::Result as Answer;
use proto::v1::{
    GetPhoneNumberRequest, LoginResponse, LogoutRequest, RefreshRequest, RevokeUserRequest,
    VerifyBatchItem, VerifyBatchRequest, VerifyRequest,
};
use sqlx::Connection as _;
use tests::harness::external::{External, postgres_database, redis};
use tests::harness::proxy::{Proxy, reroute};
use tests::harness::sim::{APPID, MintCode, MintPhoneCode, MintedCode};
use tests::harness::{AuthClient, AuthProcess, SimProcess};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{
    login_request, random_client_ip, reason, tokens, verify_openid, wait_for_redis_health,
};

struct Pair {
    /// The replicas' database.
    db: String,
    sim: SimProcess,
    auth: [AuthProcess; 2],
    a: AuthClient,
    b: AuthClient,
}

/// Two replicas on a database of their own, sharing Redis when `with_redis`; `None` when
/// skipping was asked.
async fn pair(test: &str, with_redis: bool, extra: &[(&str, &str)]) -> Option<Pair> {
    let redis_url = if with_redis {
        match redis(test) {
            External::Run(url) => Some(url),
            External::Skip => return None,
        }
    } else {
        None
    };
    let External::Run(db) = postgres_database(test).await.expect("a database") else {
        return None;
    };
    let sim = SimProcess::start().await.expect("simulator");
    let mut env: Vec<(&str, &str)> = vec![
        ("AUTH_DATABASE_URL", db.as_str()),
        ("AUTH_REFRESH_GRACE", "1ms"),
    ];
    if let Some(url) = &redis_url {
        env.push(("AUTH_REDIS_URL", url.as_str()));
    }
    env.extend_from_slice(extra);
    let auth_a = AuthProcess::start(&sim, &env).await.expect("auth A");
    let auth_b = AuthProcess::start(&sim, &env).await.expect("auth B");
    let a = auth_a.client().await.expect("client A");
    let b = auth_b.client().await.expect("client B");
    Some(Pair {
        db,
        sim,
        auth: [auth_a, auth_b],
        a,
        b,
    })
}

impl Pair {
    /// Logs `openid` (a new user when None) in on replica A, from an address of its own.
    async fn login(&mut self, openid: Option<&str>) -> (MintedCode, LoginResponse) {
        let mint = openid.map_or_else(MintCode::default, MintCode::for_openid);
        let minted = self.sim.mint_code(&mint).await.expect("mint");
        let answer = self
            .a
            .login(login_request(&minted.code, None, &random_client_ip()))
            .await
            .expect("login")
            .into_inner();
        (minted, answer)
    }

    /// Verifies on B until its memory holds the token (the second call is a hit when the
    /// in-memory path is on), and on A.
    async fn warm(&mut self, access: &str, openid: &str) {
        for _ in 0..3 {
            assert_eq!(
                verify_openid(&mut self.b, access).await.expect("live on B"),
                openid
            );
        }
        assert_eq!(
            verify_openid(&mut self.a, access).await.expect("live on A"),
            openid
        );
    }

    /// B's very next answer for `access`: the refusal's reason.
    async fn refused_on_b(&mut self, access: &str) -> String {
        let err = verify_openid(&mut self.b, access)
            .await
            .expect_err("B must refuse the token on the very next call");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        reason(&err)
    }
}

/// Logout, logout of all sessions, an operator's revocation and a reused refresh token,
/// each done on A, each refused on B at once.
async fn every_end_reaches_the_other_replica(test: &str, with_redis: bool) {
    let Some(mut p) = pair(test, with_redis, &[]).await else {
        return;
    };

    // Logout of one session.
    let (m, login) = p.login(None).await;
    let (access, _) = tokens(login.tokens.as_ref());
    p.warm(&access, &m.openid).await;
    p.a.logout(LogoutRequest {
        access_token: access.clone(),
        all: false,
    })
    .await
    .expect("logout");
    assert_eq!(p.refused_on_b(&access).await, "TOKEN_REVOKED");

    // Logout of every session: the other session's token too.
    let (m, first) = p.login(None).await;
    let (_, second) = p.login(Some(&m.openid)).await;
    let (first_access, _) = tokens(first.tokens.as_ref());
    let (second_access, _) = tokens(second.tokens.as_ref());
    p.warm(&first_access, &m.openid).await;
    p.warm(&second_access, &m.openid).await;
    p.a.logout(LogoutRequest {
        access_token: second_access.clone(),
        all: true,
    })
    .await
    .expect("logout all");
    assert_eq!(p.refused_on_b(&first_access).await, "TOKEN_REVOKED");
    assert_eq!(p.refused_on_b(&second_access).await, "TOKEN_REVOKED");

    // An operator's revocation.
    let (m, login) = p.login(None).await;
    let (access, _) = tokens(login.tokens.as_ref());
    p.warm(&access, &m.openid).await;
    p.a.revoke_user(RevokeUserRequest {
        openid: m.openid.clone(),
    })
    .await
    .expect("revoke");
    assert_eq!(p.refused_on_b(&access).await, "TOKEN_REVOKED");

    // A refresh token presented again after the grace window revokes its session, the
    // earlier access token included.
    let (m, login) = p.login(None).await;
    let (access, refresh) = tokens(login.tokens.as_ref());
    p.warm(&access, &m.openid).await;
    let request = || RefreshRequest {
        refresh_token: refresh.clone(),
    };
    p.a.refresh(request()).await.expect("refresh");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let err = p.a.refresh(request()).await.expect_err("reuse");
    assert_eq!(reason(&err), "REFRESH_TOKEN_REUSED");
    assert_eq!(p.refused_on_b(&access).await, "TOKEN_REVOKED");
}

#[tokio::test]
async fn every_end_reaches_the_other_replica_through_redis_marks() {
    every_end_reaches_the_other_replica("verify_cache::every_end_with_redis", true).await;
}

#[tokio::test]
async fn every_end_reaches_the_other_replica_through_the_database_without_redis() {
    every_end_reaches_the_other_replica("verify_cache::every_end_without_redis", false).await;
}

#[tokio::test]
async fn a_session_pushed_out_by_a_login_on_one_replica_is_refused_on_the_other() {
    let Some(mut p) = pair(
        "verify_cache::replaced",
        true,
        &[("AUTH_SESSION_POLICY", "single")],
    )
    .await
    else {
        return;
    };
    let (m, old) = p.login(None).await;
    let (old_access, _) = tokens(old.tokens.as_ref());
    p.warm(&old_access, &m.openid).await;

    let (_, new) = p.login(Some(&m.openid)).await;
    let (new_access, _) = tokens(new.tokens.as_ref());

    assert_eq!(p.refused_on_b(&old_access).await, "SESSION_REPLACED");
    assert_eq!(
        verify_openid(&mut p.b, &new_access)
            .await
            .expect("the new session"),
        m.openid
    );
}

/// `VerifyBatch` on `client`, each item `(token, include_phone)`.
async fn verify_batch(client: &mut AuthClient, asked: &[(&str, bool)]) -> Vec<Answer> {
    let items = asked
        .iter()
        .map(|&(token, include_phone)| VerifyBatchItem {
            request: Some(VerifyRequest {
                access_token: token.to_owned(),
                include_phone,
            }),
            request_id: String::new(),
        })
        .collect();
    client
        .verify_batch(VerifyBatchRequest { items })
        .await
        .expect("VerifyBatch")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.result.expect("a result"))
        .collect()
}

#[tokio::test]
async fn a_batch_answers_what_it_can_when_one_item_waits_on_a_stalled_database() {
    const TEST: &str =
        "verify_cache::a_batch_answers_what_it_can_when_one_item_waits_on_a_stalled_database";
    let Some(mut p) = pair(TEST, true, &[]).await else {
        return;
    };
    // Arrange: W is in B's memory and marked alive; C has never been seen by B.
    let (w, w_login) = p.login(None).await;
    let (w_access, _) = tokens(w_login.tokens.as_ref());
    p.warm(&w_access, &w.openid).await;
    let (c, c_login) = p.login(None).await;
    let (c_access, _) = tokens(c_login.tokens.as_ref());
    // The database stalls: a transaction holds the tokens' table, so C's read waits
    // (PostgreSQL's statement_timeout of the pool is 5 s, past the call's 4 s).
    let mut stall = sqlx::PgConnection::connect(&p.db)
        .await
        .expect("PostgreSQL");
    sqlx::raw_sql("BEGIN; LOCK TABLE access_tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut stall)
        .await
        .expect("the lock");

    // Act: one batch of both, as the edge sends it, with a 4 s deadline (auth-service
    // answers the items by 3.2 s, a fifth kept for the way back).
    let items = [&w_access, &c_access]
        .map(|token| VerifyBatchItem {
            request: Some(VerifyRequest {
                access_token: token.clone(),
                include_phone: false,
            }),
            request_id: String::new(),
        })
        .to_vec();
    let mut request = tonic::Request::new(VerifyBatchRequest { items });
    request.set_timeout(Duration::from_secs(4));
    let answers = p.b.verify_batch(request).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut stall)
        .await
        .expect("the lock released");

    // Assert: the call is answered; W's identity arrives, C alone is unavailable.
    let results: Vec<Answer> = answers
        .expect("the batch answered before its deadline, not run out by one item")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.result.expect("a result"))
        .collect();
    match &results[..] {
        [Answer::Identity(id), Answer::Error(e)] => {
            assert_eq!(id.openid, w.openid);
            let status = e.clone().into_status();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        other => panic!("{other:?}"),
    }
    // Once the database answers again, so does C.
    assert_eq!(
        verify_openid(&mut p.b, &c_access).await.expect("live"),
        c.openid
    );
}

/// The reason of a refused item.
fn refused(answer: &Answer) -> String {
    match answer {
        Answer::Error(e) => reason(&e.clone().into_status()),
        Answer::Identity(id) => panic!("accepted {id:?}"),
    }
}

#[tokio::test]
async fn a_verify_batch_on_the_other_replica_sees_an_end_and_a_new_number_at_once() {
    // A batch reads its items' marks (and phone stamps) together, in one Redis round
    // trip: each must still get its own.
    let Some(mut p) = pair("verify_cache::batch", true, &[]).await else {
        return;
    };
    let (x, x_login) = p.login(None).await;
    let (y, y_login) = p.login(None).await;
    let (z, z_login) = p.login(None).await;
    let (x_access, _) = tokens(x_login.tokens.as_ref());
    let (y_access, _) = tokens(y_login.tokens.as_ref());
    let (z_access, _) = tokens(z_login.tokens.as_ref());
    // B comes to know X's and Y's tokens (Z's it has never seen).
    for _ in 0..3 {
        let answers = verify_batch(&mut p.b, &[(&x_access, true), (&y_access, true)]).await;
        for (answer, openid) in answers.iter().zip([&x.openid, &y.openid]) {
            match answer {
                Answer::Identity(id) => {
                    assert_eq!(&id.openid, openid);
                    assert_eq!(id.phone, None, "no number kept yet");
                }
                Answer::Error(e) => panic!("refused {e:?}"),
            }
        }
    }

    // On A: X logs out, Y keeps a number.
    p.a.logout(LogoutRequest {
        access_token: x_access.clone(),
        all: false,
    })
    .await
    .expect("logout");
    let number = "13800138077";
    let code = p
        .sim
        .mint_phone_code(&MintPhoneCode::new(number).for_openid(&y.openid))
        .await
        .expect("mint");
    p.a.get_phone_number(GetPhoneNumberRequest {
        access_token: y_access.clone(),
        code,
    })
    .await
    .expect("the exchange");

    // B's very next batch: a bad token, X, a token B never saw, Y.
    let answers = verify_batch(
        &mut p.b,
        &[
            ("wxa_short", true),
            (&x_access, true),
            (&z_access, false),
            (&y_access, true),
        ],
    )
    .await;
    assert_eq!(answers.len(), 4);
    assert_eq!(refused(&answers[0]), "TOKEN_INVALID");
    assert_eq!(refused(&answers[1]), "TOKEN_REVOKED");
    match (&answers[2], &answers[3]) {
        (Answer::Identity(z_id), Answer::Identity(y_id)) => {
            assert_eq!(z_id.openid, z.openid);
            assert_eq!(z_id.phone, None, "not asked for");
            assert_eq!(y_id.openid, y.openid);
            let phone = y_id.phone.as_ref().expect("Y's new number");
            assert_eq!(phone.pure_phone_number, number);
        }
        other => panic!("Z and Y must be accepted: {other:?}"),
    }
}

/// A's ways to Redis and to its database, each through a proxy the test can cut.
struct Cuttable {
    redis: Proxy,
    db: Proxy,
}

/// Two replicas on PostgreSQL and Redis, A reaching both through proxies the test can cut;
/// also Redis's own URL. `None` when skipping was asked.
async fn pair_with_a_cuttable(test: &str) -> Option<(Pair, Cuttable, String)> {
    let External::Run(redis_url) = redis(test) else {
        return None;
    };
    let External::Run(db) = postgres_database(test).await.expect("a database") else {
        return None;
    };
    let nowhere = "127.0.0.1:1".parse().expect("addr");
    let (redis_target, _) = reroute(&redis_url, nowhere).expect("url");
    let (db_target, _) = reroute(&db, nowhere).expect("url");
    let cut = Cuttable {
        redis: Proxy::start(redis_target).await.expect("proxy"),
        db: Proxy::start(db_target).await.expect("proxy"),
    };
    let (_, redis_for_a) = reroute(&redis_url, cut.redis.addr()).expect("url");
    let (_, db_for_a) = reroute(&db, cut.db.addr()).expect("url");
    let sim = SimProcess::start().await.expect("simulator");
    let auth_a = AuthProcess::start(
        &sim,
        &[
            ("AUTH_DATABASE_URL", db_for_a.as_str()),
            ("AUTH_REDIS_URL", redis_for_a.as_str()),
        ],
    )
    .await
    .expect("auth A");
    let auth_b = AuthProcess::start(
        &sim,
        &[
            ("AUTH_DATABASE_URL", db.as_str()),
            ("AUTH_REDIS_URL", redis_url.as_str()),
        ],
    )
    .await
    .expect("auth B");
    let a = auth_a.client().await.expect("client A");
    let b = auth_b.client().await.expect("client B");
    let pair = Pair {
        db,
        sim,
        auth: [auth_a, auth_b],
        a,
        b,
    };
    Some((pair, cut, redis_url))
}

/// The session's mark as Redis holds it (`alive`, `ended`, or `None`), read with an inline
/// `GET` on a connection of its own.
async fn mark_in_redis(redis_url: &str, session_id: &str) -> Option<String> {
    let (addr, _) = reroute(redis_url, "127.0.0.1:1".parse().expect("addr")).expect("url");
    let mut redis = tokio::net::TcpStream::connect(addr).await.expect("Redis");
    redis
        .write_all(format!("GET wxauth:{APPID}:session:{session_id}\r\n").as_bytes())
        .await
        .expect("GET");
    let mut reply = vec![0; 128];
    let n = redis.read(&mut reply).await.expect("the reply");
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    match reply.split("\r\n").collect::<Vec<_>>().as_slice() {
        ["$-1", ..] => None,
        [len, value, ..] if len.starts_with('$') => Some((*value).to_owned()),
        _ => panic!("Redis answered {reply:?}"),
    }
}

#[tokio::test]
async fn a_replica_cut_off_from_redis_marks_its_end_once_back_and_the_other_then_refuses() {
    // Arrange: a session live in B's memory, its mark `alive` in Redis.
    let test = "verify_cache::cut_off_from_redis";
    let Some((mut p, cut, redis_url)) = pair_with_a_cuttable(test).await else {
        return;
    };
    let (m, login) = p.login(None).await;
    let (access, _) = tokens(login.tokens.as_ref());
    p.warm(&access, &m.openid).await;
    let mark = || mark_in_redis(&redis_url, &login.session_id);
    assert_eq!(mark().await.as_deref(), Some("alive"));

    // Act: A loses Redis and ends the session. The end is committed; its mark cannot be
    // written (the README's limit: meanwhile B may accept the token, for at most the 15 s
    // an `alive` mark lives).
    cut.redis.cut();
    p.a.logout(LogoutRequest {
        access_token: access.clone(),
        all: false,
    })
    .await
    .expect("a logout does not wait for Redis");
    assert_eq!(mark().await.as_deref(), Some("alive"), "A reached Redis");
    cut.redis.restore();

    // Assert: A's retries (every second, for 15 s after the end) write the mark once Redis
    // answers again, and B refuses at the very next call.
    let retries_end = Instant::now() + Duration::from_secs(14);
    while mark().await.as_deref() != Some("ended") {
        assert!(
            Instant::now() < retries_end,
            "A's `ended` mark never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.refused_on_b(&access).await, "TOKEN_REVOKED");
}

#[tokio::test]
async fn batches_and_calls_together_are_answered_from_memory_again_once_redis_is_back() {
    // Arrange: A reaches Redis and its database through proxies the test can cut.
    let test = "verify_cache::memory_after_redis_is_back";
    let Some((mut p, cut, _)) = pair_with_a_cuttable(test).await else {
        return;
    };
    let (x, x_login) = p.login(None).await;
    let (y, y_login) = p.login(None).await;
    let (x_access, _) = tokens(x_login.tokens.as_ref());
    let (y_access, _) = tokens(y_login.tokens.as_ref());
    let both = [(x_access.as_str(), false), (y_access.as_str(), true)];
    let accepted = |answers: &[Answer], openids: &[&str]| {
        assert_eq!(answers.len(), openids.len());
        for (answer, openid) in answers.iter().zip(openids) {
            match answer {
                Answer::Identity(id) => assert_eq!(id.openid, *openid),
                Answer::Error(e) => panic!("{openid} refused: {e:?}"),
            }
        }
    };
    for _ in 0..3 {
        accepted(
            &verify_batch(&mut p.a, &both).await,
            &[&x.openid, &y.openid],
        );
    }

    // Act 1: A loses Redis. Its reads of the marks fail, singly and together: the database
    // answers.
    cut.redis.cut();
    accepted(
        &verify_batch(&mut p.a, &both).await,
        &[&x.openid, &y.openid],
    );
    assert_eq!(
        verify_openid(&mut p.a, &x_access).await.expect("X on A"),
        x.openid
    );

    // Act 2: Redis is back; the database answers once more (and marks the sessions alive).
    // A rests from Redis for a second after each failure; its health report's PING (every
    // 2 s) or its first call after the rest finds Redis again, and says so.
    let found_again = || {
        p.auth[0]
            .logs()
            .iter()
            .filter(|l| l.contains("Redis answers again"))
            .count()
    };
    let before = found_again();
    cut.redis.restore();
    wait_for_redis_health(&p.auth[0], ServingStatus::Serving).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while found_again() == before {
        assert!(Instant::now() < deadline, "A never used Redis again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    accepted(
        &verify_batch(&mut p.a, &both).await,
        &[&x.openid, &y.openid],
    );

    // Assert: with A's database cut, what A knows is answered from memory and Redis, in a
    // batch and in single calls that come together.
    cut.db.cut();
    accepted(
        &verify_batch(&mut p.a, &both).await,
        &[&x.openid, &y.openid],
    );
    let (mut a1, mut a2) = (p.a.clone(), p.a.clone());
    let (one, two) = tokio::join!(
        verify_openid(&mut a1, &x_access),
        verify_openid(&mut a2, &y_access)
    );
    assert_eq!(one.expect("X from memory"), x.openid);
    assert_eq!(two.expect("Y from memory"), y.openid);

    // And an end on B is never accepted by A: with no database to say why, it is
    // UNAVAILABLE.
    p.b.logout(LogoutRequest {
        access_token: x_access.clone(),
        all: false,
    })
    .await
    .expect("logout on B");
    let answers = verify_batch(&mut p.a, &both).await;
    match &answers[0] {
        Answer::Error(e) => assert_eq!(e.clone().into_status().code(), Code::Unavailable),
        Answer::Identity(id) => panic!("A accepted a session ended on B: {id:?}"),
    }
    accepted(&answers[1..], &[&y.openid]);
    cut.db.restore();
}
