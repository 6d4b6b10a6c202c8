//! `AUTH_MAX_CONNECTION_AGE`: auth-service ends every connection gracefully after that age, so
//! clients connect again (through a ClusterIP Service, to whichever replica kube-proxy picks)
//! and new replicas get their share. Counted at a proxy between client and server: for a
//! plain gRPC client, and for api-service under load, where no request may fail while its
//! connection is recycled.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proto::v1::VerifyRequest;
use proto::v1::auth_service_client::AuthServiceClient;
use tests::harness::proxy::Proxy;
use tests::harness::{ApiProcess, AuthProcess, SimProcess};
use tonic::Code;

/// Calls Verify through a proxy every 100 ms for 3 s; returns how many connections the
/// channel made and whether every call got auth-service's own answer.
async fn connections_over_three_seconds(extra: &[(&str, &str)]) -> (usize, bool) {
    let sim = SimProcess::start().await.expect("sim");
    let auth = AuthProcess::start(&sim, extra).await.expect("auth-service");
    let proxy = Proxy::start(auth.addr()).await.expect("proxy");
    let channel = tests::harness::auth::channel(proxy.addr())
        .await
        .expect("channel");
    let mut client = AuthServiceClient::new(channel);
    let mut all_answered = true;
    for _ in 0..30 {
        let answer = client
            .verify(VerifyRequest {
                access_token: "wxa_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
                include_phone: false,
            })
            .await;
        // An unknown token is refused by auth-service itself: that is an answer.
        all_answered &= matches!(&answer, Err(s) if s.code() == Code::Unauthenticated);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (proxy.connections(), all_answered)
}

/// The pair, auth-service started with `auth_env` and api-service with `api_env` reaching it
/// through a proxy that counts connections, and the access token of a user logged in
/// through the edge.
async fn edge_behind_a_proxy(
    auth_env: &[(&str, &str)],
    api_env: &[(&str, &str)],
) -> (crate::api_common::ApiWorld, Proxy, String) {
    let sim = SimProcess::start().await.expect("sim");
    let auth = AuthProcess::start(&sim, auth_env)
        .await
        .expect("auth-service");
    let proxy = Proxy::start(auth.addr()).await.expect("proxy");
    let api = ApiProcess::start_for(&format!("http://{}", proxy.addr()), api_env, true)
        .await
        .expect("api-service");
    let w = crate::api_common::ApiWorld { sim, auth, api };
    let access = w.login().await.access_token;
    (w, proxy, access)
}

#[tokio::test]
async fn connections_are_recycled_after_the_max_age_without_failing_a_call() {
    let (connections, all_answered) =
        connections_over_three_seconds(&[("AUTH_MAX_CONNECTION_AGE", "1s")]).await;
    assert!(
        all_answered,
        "a call failed while its connection was recycled"
    );
    assert!(
        connections >= 2,
        "only {connections} connection(s) in 3 s with a 1 s max age"
    );
}

#[tokio::test]
async fn without_a_max_age_one_connection_serves_every_call() {
    let (connections, all_answered) = connections_over_three_seconds(&[]).await;
    assert!(all_answered);
    assert_eq!(connections, 1);
}

#[tokio::test]
async fn the_edge_rides_recycled_connections_without_failing_a_request() {
    // Arrange: api-service's own client this time, reaching auth-service through a proxy
    // that counts its connections: every second auth-service ends the connection (GOAWAY)
    // while calls are in flight on it, and the edge connects again.
    let (w, proxy, access) = edge_behind_a_proxy(&[("AUTH_MAX_CONNECTION_AGE", "1s")], &[]).await;

    // Act: eight callers, each sending its next request as soon as the last is answered,
    // for at least 3.5 s and until the edge has made two connections of its own while they
    // ran (or 15 s have passed: the count below fails then).
    let before = proxy.connections();
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (caller, access, stop) = (w.caller(), access.clone(), stop.clone());
        callers.spawn(async move {
            let (mut answered, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let a = caller
                    .send(reqwest::Method::GET, "/v1/me", Some(&access), None, &[])
                    .await;
                if a.status == reqwest::StatusCode::OK {
                    answered += 1;
                } else {
                    failed.push(format!("{}: {}", a.status, a.text()));
                }
            }
            (answered, failed)
        });
    }
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline
        && (started.elapsed() < Duration::from_millis(3500) || proxy.connections() - before < 2)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    while let Some(done) = callers.join_next().await {
        let (answered, failed) = done.expect("a caller");
        assert!(failed.is_empty(), "requests failed: {failed:?}");
        answers.push(answered);
    }
    let made = proxy.connections() - before;

    // Assert: the connection was recycled under the callers (more than one made while they
    // ran), and every request of every caller was answered.
    assert!(
        made >= 2,
        "{made} connection(s) to auth-service in {:?} of requests with a 1 s max age: \
         AUTH_MAX_CONNECTION_AGE did not end the edge's connection",
        started.elapsed()
    );
    assert!(
        answers.iter().all(|&a| a > 0),
        "a caller got no answer at all: {answers:?}"
    );
}

#[tokio::test]
async fn the_edge_leaves_a_connection_that_stopped_answering_and_connects_again() {
    // Arrange: the edge reaches auth-service through a proxy, and has made its connection
    // (one: with several, the calls on the others would be answered meanwhile).
    let (w, proxy, access) = edge_behind_a_proxy(&[], &[("API_AUTH_CONNECTIONS", "1")]).await;
    let caller = w.caller();
    let before = proxy.connections();

    // Act: that connection goes silent without closing (the node behind it lost); new
    // connections still reach auth-service. A request at a time until one is answered.
    // (The edge's keep-alive gives it up after 5 s without a frame and 5 s more for the
    // PING's answer; 120 s is only a guard against a hang, not a bound on that.)
    proxy.freeze();
    let hang_guard = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut failed = Vec::new();
    let answered = loop {
        let a = caller
            .send(reqwest::Method::GET, "/v1/me", Some(&access), None, &[])
            .await;
        if a.status == reqwest::StatusCode::OK {
            break true;
        }
        failed.push(a);
        if tokio::time::Instant::now() > hang_guard {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Assert: the edge gave the silent connection up and answered on a new one; the
    // requests in between were 503 auth_unavailable, never a hang or a 500.
    assert!(
        answered,
        "no answer 120 s after the connection went silent; {} request(s) failed",
        failed.len()
    );
    assert!(proxy.frozen() >= 1, "the edge's connection was not frozen");
    assert!(
        proxy.connections() > before,
        "answered without a new connection"
    );
    assert!(
        !failed.is_empty(),
        "the silent connection failed no request"
    );
    for a in &failed {
        a.error(reqwest::StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable");
    }
}

#[tokio::test]
async fn the_edge_spreads_its_calls_over_its_connections() {
    // Arrange: the edge reaches auth-service through a proxy that counts connections (as
    // kube-proxy picks a replica per connection, not per call), with three of them.
    let (w, proxy, access) = edge_behind_a_proxy(&[], &[("API_AUTH_CONNECTIONS", "3")]).await;
    let caller = w.caller();

    // Act: requests one after another, each a Verify call of its own.
    for _ in 0..12 {
        let a = caller
            .send(reqwest::Method::GET, "/v1/me", Some(&access), None, &[])
            .await;
        assert_eq!(a.status, reqwest::StatusCode::OK, "{}", a.text());
    }

    // Assert: the calls went over three connections, not one.
    assert_eq!(proxy.connections(), 3);
}
