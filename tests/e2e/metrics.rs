//! Prometheus metrics of both services: each on a listener of its own (never on the public
//! port), and the counters that matter move with real traffic: requests by route and status,
//! `Verify` outcomes at the edge, and auth-service's calls by method and outcome.

use std::net::SocketAddr;
use std::time::Duration;

use proto::v1::{LoginRequest, VerifyBatchItem, VerifyBatchRequest, VerifyRequest};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tests::harness::sim::{MintCode, http_client};
use tests::harness::{ApiProcess, AuthProcess, SimProcess};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const LOGIN: &str = "/wxauth.v1.AuthService/Login";
const VERIFY: &str = "/wxauth.v1.AuthService/Verify";
pub(crate) const VERIFY_BATCH: &str = "/wxauth.v1.AuthService/VerifyBatch";

/// One test's world: simulator, auth-service and api-service, all real processes.
struct World {
    sim: SimProcess,
    auth: AuthProcess,
    api: ApiProcess,
}

async fn world() -> World {
    let sim = SimProcess::start().await.expect("simulator");
    let auth = AuthProcess::start(&sim, &[]).await.expect("auth-service");
    let api = ApiProcess::start(&auth, &[]).await.expect("api-service");
    World { sim, auth, api }
}

/// `GET http://addr/metrics`: the body, after checking status and content type.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    let answer = http_client(Duration::from_secs(30))
        .expect("client")
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("the metrics listener answers");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        answer
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some(OPENMETRICS)
    );
    let text = answer.text().await.expect("a text body");
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics text:\n{text}");
    text
}

/// The value of one series (`name{labels}`, labels in the order the service writes them);
/// 0 when the series does not exist yet.
pub(crate) fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| {
            v.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{series} has no numeric value in:\n{text}"))
        })
}

/// How much `series` grew between two scrapes.
fn moved(before: &str, after: &str, series: &str) -> f64 {
    sample(after, series) - sample(before, series)
}

pub(crate) fn auth_calls(method: &str, outcome: &str) -> String {
    format!(r#"wxauth_auth_grpc_calls_total{{method="{method}",outcome="{outcome}"}}"#)
}

fn api_requests(method: &str, route: &str, status: u16) -> String {
    format!(
        r#"wxauth_api_http_requests_total{{method="{method}",route="{route}",status="{status}"}}"#
    )
}

#[tokio::test]
async fn each_service_serves_metrics_on_its_own_listener_only() {
    // Arrange
    let w = world().await;
    assert_ne!(w.api.metrics_addr(), w.api.addr());
    assert_ne!(w.auth.metrics_addr(), w.auth.addr());

    // Act
    let api_text = scrape(w.api.metrics_addr()).await;
    let auth_text = scrape(w.auth.metrics_addr()).await;
    let public = w
        .api
        .http()
        .get(w.api.url("/metrics"))
        .send()
        .await
        .expect("the public port answers");
    let grpc_port = http_client(Duration::from_secs(30))
        .expect("client")
        .get(format!("http://{}/metrics", w.auth.addr()))
        .send()
        .await;

    // Assert: each service's own metrics (families appear once they have a sample: the
    // harness's /readyz polls are the edge's first requests).
    assert!(
        api_text.contains(
            r#"wxauth_api_http_requests_total{method="GET",route="/readyz",status="200"}"#
        ),
        "{api_text}"
    );
    assert!(!api_text.contains("wxauth_auth_") && !auth_text.contains("wxauth_api_"));

    // The public HTTP port has no /metrics: a 404 in the contract's JSON shape.
    assert_eq!(public.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        public
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json; charset=utf-8")
    );
    let body: Value =
        serde_json::from_slice(&public.bytes().await.expect("a body")).expect("a JSON body");
    assert_eq!(body["error"]["code"], "not_found", "{body}");

    // The gRPC port speaks HTTP/2 gRPC only: an HTTP/1 GET gets no metrics.
    match grpc_port {
        Err(_) => {}
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            assert!(
                status != StatusCode::OK && !text.contains("wxauth_auth_"),
                "the gRPC port served metrics: {status} {text}"
            );
        }
    }
}

#[tokio::test]
async fn counters_move_with_logins_verified_requests_and_refused_tokens() {
    // Arrange
    let w = world().await;
    let minted = w
        .sim
        .mint_code(&MintCode::default())
        .await
        .expect("mint a code");
    let api_before = scrape(w.api.metrics_addr()).await;
    let auth_before = scrape(w.auth.metrics_addr()).await;

    // Act: a login and a profile read through the edge, a refused token, and a login that
    // auth-service refuses itself.
    let login = w
        .api
        .http()
        .post(w.api.url("/v1/auth/login"))
        .header(CONTENT_TYPE, "application/json")
        .body(json!({"code": minted.code}).to_string())
        .send()
        .await
        .expect("login answers");
    assert_eq!(login.status(), StatusCode::OK);
    let pair: Value =
        serde_json::from_slice(&login.bytes().await.expect("a body")).expect("a token pair");
    let access = pair["access_token"].as_str().expect("an access token");

    let me = w
        .api
        .http()
        .get(w.api.url("/v1/me"))
        .bearer_auth(access)
        .send()
        .await
        .expect("/v1/me answers");
    assert_eq!(me.status(), StatusCode::OK);

    let unknown = format!("wxa_{}", "A".repeat(43));
    let refused = w
        .api
        .http()
        .get(w.api.url("/v1/me"))
        .bearer_auth(&unknown)
        .send()
        .await
        .expect("/v1/me answers");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    let mut client = w.auth.client().await.expect("gRPC client");
    let bad_code = client
        .login(LoginRequest {
            code: "not a code!".to_owned(),
            ..LoginRequest::default()
        })
        .await
        .expect_err("a malformed code is refused");
    assert_eq!(bad_code.code(), tonic::Code::InvalidArgument);
    // A batch's items count as the Verify calls they answer; the batch as a call of its own.
    let item = |token: &str| VerifyBatchItem {
        request: Some(VerifyRequest {
            access_token: token.to_owned(),
            include_phone: false,
        }),
        request_id: String::new(),
    };
    let batch = client
        .verify_batch(VerifyBatchRequest {
            items: vec![item(access), item(&unknown)],
        })
        .await
        .expect("VerifyBatch answers");
    assert_eq!(batch.get_ref().results.len(), 2);

    let api_after = scrape(w.api.metrics_addr()).await;
    let auth_after = scrape(w.auth.metrics_addr()).await;

    // Assert: the edge.
    let d = |series: &str| moved(&api_before, &api_after, series);
    assert_eq!(d(&api_requests("POST", "/v1/auth/login", 200)), 1.0);
    assert_eq!(d(&api_requests("GET", "/v1/me", 200)), 1.0);
    assert_eq!(d(&api_requests("GET", "/v1/me", 401)), 1.0);
    assert_eq!(
        d(r#"wxauth_api_http_request_duration_seconds_count{method="GET",route="/v1/me"}"#),
        2.0
    );
    assert_eq!(d(r#"wxauth_api_verify_total{outcome="ok"}"#), 1.0);
    assert_eq!(d(r#"wxauth_api_verify_total{outcome="refused"}"#), 1.0);
    assert_eq!(d(r#"wxauth_api_verify_total{outcome="unavailable"}"#), 0.0);
    // One after the other: each its own plain Verify call, none batched or stalled.
    assert_eq!(d(r#"wxauth_api_verify_calls_total{rpc="Verify"}"#), 2.0);
    assert_eq!(
        d(r#"wxauth_api_verify_calls_total{rpc="VerifyBatch"}"#),
        0.0
    );
    assert_eq!(d("wxauth_api_verify_stalls_total"), 0.0);
    assert_eq!(d("wxauth_api_verify_call_requests_count"), 2.0);
    assert_eq!(d("wxauth_api_verify_call_requests_sum"), 2.0);

    // Assert: auth-service, by method and outcome (OK or the ErrorInfo reason).
    let d = |series: &str| moved(&auth_before, &auth_after, series);
    assert_eq!(d(&auth_calls(LOGIN, "OK")), 1.0, "{auth_after}");
    assert_eq!(d(&auth_calls(LOGIN, "INVALID_CODE")), 1.0, "{auth_after}");
    assert_eq!(d(&auth_calls(VERIFY, "OK")), 2.0, "{auth_after}");
    assert_eq!(d(&auth_calls(VERIFY, "TOKEN_INVALID")), 2.0, "{auth_after}");
    assert_eq!(d(&auth_calls(VERIFY_BATCH, "OK")), 1.0, "{auth_after}");
    assert_eq!(
        d(&format!(
            r#"wxauth_auth_grpc_call_duration_seconds_count{{method="{VERIFY}"}}"#
        )),
        4.0
    );
    assert_eq!(d(r#"wxauth_auth_logins_total{outcome="OK"}"#), 1.0);
    assert_eq!(
        d(r#"wxauth_auth_logins_total{outcome="INVALID_CODE"}"#),
        1.0
    );
}

#[tokio::test]
async fn auth_service_will_not_start_when_its_metrics_port_is_taken() {
    // Arrange: a port someone else holds.
    let sim = SimProcess::start().await.expect("simulator");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address").to_string();

    // Act
    let err = AuthProcess::start(&sim, &[("AUTH_METRICS_ADDR", &addr)])
        .await
        .expect_err("auth-service must not start");

    // Assert: it exits before serving, naming the setting.
    let err = format!("{err:#}");
    assert!(err.contains("AUTH_METRICS_ADDR"), "{err}");
    assert!(err.contains(&addr), "{err}");
}
