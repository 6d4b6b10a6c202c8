//! `AUTH_MAX_CONNECTION_AGE`: auth-service ends every connection gracefully after that age, so
//! clients connect again (through a ClusterIP Service, to whichever replica kube-proxy picks)
//! and new replicas get their share. Counted at a proxy between client and server.

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
