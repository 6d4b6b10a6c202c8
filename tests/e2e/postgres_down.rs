//! PostgreSQL going away under both services, and coming back: answers in the contract's
//! shape (never a 500, never an allow), readiness says so, and both recover by themselves.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::external::{External, postgres_database};
use tests::harness::proxy::{Proxy, reroute};
use tests::harness::sim::MintCode;
use tests::harness::{ApiProcess, AuthProcess, SimProcess};

async fn get(api: &ApiProcess, path: &str, token: &str) -> (StatusCode, Value) {
    let r = api
        .http()
        .get(api.url(path))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("an answer");
    let status = r.status();
    let bytes = r.bytes().await.unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn postgres_down_is_503_in_the_contract_shape_and_both_services_recover() {
    let test = "postgres_down::postgres_down_is_503";
    let External::Run(auth_db) = postgres_database(test).await.expect("auth db") else {
        return;
    };
    let External::Run(api_db) = postgres_database(test).await.expect("api db") else {
        return;
    };
    // Both services reach PostgreSQL through a proxy the test can cut.
    let (target, _) = reroute(&auth_db, "127.0.0.1:1".parse().expect("addr")).expect("url");
    let proxy = Proxy::start(target).await.expect("proxy");
    let (_, auth_db) = reroute(&auth_db, proxy.addr()).expect("url");
    let (_, api_db) = reroute(&api_db, proxy.addr()).expect("url");

    let sim = SimProcess::start().await.expect("sim");
    let auth = AuthProcess::start(&sim, &[("AUTH_DATABASE_URL", auth_db.as_str())])
        .await
        .expect("auth-service");
    let api = ApiProcess::start(&auth, &[("API_DATABASE_URL", api_db.as_str())])
        .await
        .expect("api-service");
    let m = sim.mint_code(&MintCode::default()).await.expect("mint");
    let login: Value = api
        .http()
        .post(api.url("/v1/auth/login"))
        .header("content-type", "application/json")
        .body(json!({"code": m.code}).to_string())
        .send()
        .await
        .expect("login")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("JSON"))
        .expect("body");
    let token = login["access_token"].as_str().expect("token").to_owned();
    assert_eq!(get(&api, "/v1/me", &token).await.0, StatusCode::OK);

    // Act: PostgreSQL goes away.
    proxy.cut();

    // Assert: 503 in the contract's shape, for the edge's own data and for Verify.
    let (status, body) = get(&api, "/v1/me", &token).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let code = body["error"]["code"].as_str().unwrap_or_default();
    assert!(
        code == "auth_unavailable" || code == "unavailable",
        "{body}"
    );
    assert!(body["error"]["request_id"].is_string());
    let (ready, checks) = api
        .readiness(StatusCode::SERVICE_UNAVAILABLE)
        .await
        .expect("readyz");
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE, "{checks}");

    // PostgreSQL comes back: both recover without a restart.
    proxy.restore();
    let mut recovered = false;
    for _ in 0..100 {
        if get(&api, "/v1/me", &token).await.0 == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        recovered,
        "the services never recovered once PostgreSQL was back"
    );
    let (ready, checks) = api.readiness(StatusCode::OK).await.expect("readyz");
    assert_eq!(ready, StatusCode::OK, "{checks}");
}
