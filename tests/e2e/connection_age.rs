//! `AUTH_MAX_CONNECTION_AGE`: auth-service ends every connection gracefully after that age, so
//! clients connect again (through a ClusterIP Service, to whichever replica kube-proxy picks)
//! and new replicas get their share. Counted at a proxy between client and server; and through
//! api-service under load, where no request may fail while its connection is recycled.

use std::time::Duration;

use proto::v1::VerifyRequest;
use proto::v1::auth_service_client::AuthServiceClient;
use tests::harness::proxy::Proxy;
use tests::harness::{AuthProcess, SimProcess};
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
    // api-service's own client this time: every second auth-service ends the connection
    // (GOAWAY) while calls are in flight on it, and the edge connects again.
    let w = crate::api_common::api_world(&[("AUTH_MAX_CONNECTION_AGE", "1s")], &[]).await;
    let access = w.login().await.access_token;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3500);
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (caller, access) = (w.caller(), access.clone());
        callers.spawn(async move {
            let (mut answered, mut failed) = (0u32, Vec::new());
            while tokio::time::Instant::now() < deadline {
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
    let mut answered = 0;
    while let Some(done) = callers.join_next().await {
        let (ok, failed) = done.expect("a caller");
        assert!(failed.is_empty(), "requests failed: {failed:?}");
        answered += ok;
    }
    assert!(answered >= 100, "only {answered} answers in 3.5 s");
}
