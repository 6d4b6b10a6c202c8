//! Two replicas of each service on one PostgreSQL and one Redis, as production runs them:
//! api A → auth A and api B → auth B, every process real. What one replica does, the other
//! sees at once.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tests::harness::external::{External, postgres_database, redis};
use tests::harness::sim::{Fault, MintCode};
use tests::harness::{ApiProcess, AuthProcess, SimProcess};

use crate::common::random_client_ip;

/// The two-by-two deployment.
struct Cluster {
    sim: SimProcess,
    _auth: [AuthProcess; 2],
    api: [ApiProcess; 2],
    /// This test's client address: the shared test Redis holds every test's rate counters,
    /// so each cluster logs in from an address of its own (through one trusted proxy hop).
    client_ip: String,
}

/// Starts the cluster with extra auth-service settings, or `None` when skipping was asked.
async fn cluster(test: &str, auth_env: &[(&str, &str)]) -> Option<Cluster> {
    let External::Run(redis_url) = redis(test) else {
        return None;
    };
    let External::Run(auth_db) = postgres_database(test).await.expect("auth database") else {
        return None;
    };
    let External::Run(api_db) = postgres_database(test).await.expect("api database") else {
        return None;
    };
    let sim = SimProcess::start().await.expect("simulator");
    let mut env: Vec<(&str, &str)> = vec![
        ("AUTH_DATABASE_URL", auth_db.as_str()),
        ("AUTH_REDIS_URL", redis_url.as_str()),
    ];
    env.extend_from_slice(auth_env);
    // Replica A of each service runs the multi-threaded scheduler, B the current-thread one
    // (the harness's default), so that both serve the same users side by side.
    let mut env_a = env.clone();
    env_a.push(("AUTH_WORKER_THREADS", "2"));
    let a = AuthProcess::start(&sim, &env_a).await.expect("auth A");
    let b = AuthProcess::start(&sim, &env).await.expect("auth B");
    let api_env = [
        ("API_DATABASE_URL", api_db.as_str()),
        ("API_REDIS_URL", redis_url.as_str()),
        ("API_AUTH_TIMEOUT", "10s"),
        ("API_TRUSTED_PROXY_HOPS", "1"),
    ];
    let mut api_env_a = api_env.to_vec();
    api_env_a.push(("API_WORKER_THREADS", "2"));
    let api_a = ApiProcess::start(&a, &api_env_a).await.expect("api A");
    let api_b = ApiProcess::start(&b, &api_env).await.expect("api B");
    Some(Cluster {
        sim,
        _auth: [a, b],
        api: [api_a, api_b],
        client_ip: random_client_ip(),
    })
}

/// Status and JSON body of one request to `api`.
async fn call(
    api: &ApiProcess,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut req = api.http().request(method, api.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("an answer");
    let status = r.status();
    let bytes = r.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON")
    };
    (status, body)
}

impl Cluster {
    async fn login(&self, on: usize) -> Value {
        let m = self
            .sim
            .mint_code(&MintCode::default())
            .await
            .expect("mint");
        let (status, body) = self.login_with(on, &m.code).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn login_with(&self, on: usize, code: &str) -> (StatusCode, Value) {
        call(
            &self.api[on],
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"code": code})),
            &[("x-forwarded-for", self.client_ip.as_str())],
        )
        .await
    }
}

fn field(v: &Value, name: &str) -> String {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
        .to_owned()
}

#[tokio::test]
async fn what_one_replica_does_the_other_sees_at_once() {
    let Some(c) = cluster("replicas::what_one_replica_does", &[]).await else {
        return;
    };

    // Log in through A, use the token through B.
    let pair = c.login(0).await;
    let access = field(&pair, "access_token");
    let (status, me) = call(&c.api[1], Method::GET, "/v1/me", Some(&access), None, &[]).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["openid"], pair["openid"]);

    // A profile both replicas keep in memory: a change through one is what the other
    // answers next (each copy is checked against its stamp in Redis).
    for name in ["first", "second"] {
        let (status, _) = call(&c.api[0], Method::GET, "/v1/me", Some(&access), None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, changed) = call(
            &c.api[0],
            Method::PATCH,
            "/v1/me",
            Some(&access),
            Some(json!({"nickname": name})),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{changed}");
        let (status, seen) = call(&c.api[1], Method::GET, "/v1/me", Some(&access), None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seen["nickname"], name, "B answered a stale profile");
    }

    // An Idempotency-Key retried on the other replica returns the first answer.
    let note = json!({"title": "once", "body": "only once"});
    let key = [("idempotency-key", "replica-key-1")];
    let (s1, first) = call(
        &c.api[0],
        Method::POST,
        "/v1/notes",
        Some(&access),
        Some(note.clone()),
        &key,
    )
    .await;
    let (s2, again) = call(
        &c.api[1],
        Method::POST,
        "/v1/notes",
        Some(&access),
        Some(note),
        &key,
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(first, again);
    let (_, list) = call(
        &c.api[1],
        Method::GET,
        "/v1/notes",
        Some(&access),
        None,
        &[],
    )
    .await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));

    // Log out on A: refused on B on the very next request.
    let (status, _) = call(
        &c.api[0],
        Method::POST,
        "/v1/auth/logout",
        Some(&access),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, refused) = call(&c.api[1], Method::GET, "/v1/me", Some(&access), None, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused["error"]["code"], "token_revoked");
}

#[tokio::test]
async fn the_login_rate_counts_across_replicas() {
    let Some(c) = cluster("replicas::the_login_rate", &[("AUTH_LOGIN_RATE", "2/min")]).await else {
        return;
    };
    // Every login of this cluster comes from its own client address.
    c.login(0).await;
    c.login(1).await;

    let m = c.sim.mint_code(&MintCode::default()).await.expect("mint");
    let (status, body) = c.login_with(0, &m.code).await;

    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(c.sim.code_calls(&m.code).await.expect("calls"), 0);
}

#[tokio::test]
async fn races_across_replicas_have_one_winner() {
    let Some(c) = cluster("replicas::races", &[]).await else {
        return;
    };

    // Two parallel refreshes of one token on two replicas return one pair (several rounds,
    // so that the two really overlap at least some of the time).
    for _ in 0..5 {
        let pair = c.login(0).await;
        let refresh = json!({"refresh_token": field(&pair, "refresh_token")});
        let (a, b) = tokio::join!(
            call(
                &c.api[0],
                Method::POST,
                "/v1/auth/refresh",
                None,
                Some(refresh.clone()),
                &[]
            ),
            call(
                &c.api[1],
                Method::POST,
                "/v1/auth/refresh",
                None,
                Some(refresh),
                &[]
            ),
        );
        assert_eq!(
            (a.0, b.0),
            (StatusCode::OK, StatusCode::OK),
            "{} / {}",
            a.1,
            b.1
        );
        assert_eq!(a.1["access_token"], b.1["access_token"]);
        assert_eq!(a.1["refresh_token"], b.1["refresh_token"]);
    }

    // A code raced on two replicas reaches WeChat once.
    let m = c.sim.mint_code(&MintCode::default()).await.expect("mint");
    c.sim
        .add_fault(&Fault::delay(500).for_code(&m.code))
        .await
        .expect("slow WeChat");
    let (a, b) = tokio::join!(c.login_with(0, &m.code), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.login_with(1, &m.code).await
    });
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::BAD_REQUEST],
        "{} / {}",
        a.1,
        b.1
    );
    let loser = if a.0 == StatusCode::OK { &b.1 } else { &a.1 };
    assert_eq!(loser["error"]["code"], "code_used");
    assert_eq!(c.sim.code_calls(&m.code).await.expect("calls"), 1);
}
