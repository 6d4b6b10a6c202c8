//! The HTTP edge in front of the real auth-service: auth endpoints, the profile, every 401,
//! login errors with WeChat's details, the framework's own errors in the contract's shape,
//! request ids, auth-service going away and coming back, and a graceful stop.

use std::time::Duration;

use proto::v1::{ListSessionEventsRequest, SessionEventKind};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tests::harness::sim::{Fault, MintCode};
use tests::harness::{ApiProcess, AuthProcess, Process, SimProcess};
use tokio::task::JoinSet;

use crate::api_common::{Caller, api_world};
use crate::common::{
    assert_lines_in_order, stop_and_read_logs, wait_for_log_line, wait_for_wechat_call,
};
use crate::metrics::{VERIFY_BATCH, auth_calls, sample, scrape};

const JSON_UTF8: &str = "application/json; charset=utf-8";

/// One test's world: simulator, auth-service and api-service, all real processes.
struct Edge {
    sim: SimProcess,
    auth: AuthProcess,
    api: ApiProcess,
}

async fn edge(auth_env: &[(&str, &str)], api_env: &[(&str, &str)]) -> Edge {
    let sim = SimProcess::start().await.expect("simulator");
    let auth = AuthProcess::start(&sim, auth_env)
        .await
        .expect("auth-service");
    let api = ApiProcess::start(&auth, api_env)
        .await
        .expect("api-service");
    Edge { sim, auth, api }
}

/// An answer: status, headers, body as JSON (`Value::Null` when empty).
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn header(&self, name: impl reqwest::header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The contract's error shape, with the status and code expected.
    fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.code(), code, "{}", self.body);
        assert_eq!(self.header(CONTENT_TYPE), Some(JSON_UTF8));
        let request_id = self.header("x-request-id").expect("X-Request-Id");
        assert_eq!(self.body["error"]["request_id"], request_id);
        assert!(self.body["error"]["message"].is_string());
    }
}

impl Edge {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        send(&self.api, method, path, token, body, &[]).await
    }

    /// Mints a code (as `wx.login()` does) and logs in through the edge.
    async fn login(&self, openid: Option<&str>, device_id: &str) -> Value {
        let mint = openid.map_or_else(MintCode::default, MintCode::for_openid);
        let minted = self.sim.mint_code(&mint).await.expect("mint");
        let a = self
            .send(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"code": minted.code, "device": {"id": device_id, "platform": "ios", "model": "iPhone 15"}})),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body
    }
}

async fn send(
    api: &ApiProcess,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = api.http().request(method, api.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&b).expect("json"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("an HTTP answer");
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn token(v: &Value, name: &str) -> String {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
        .to_owned()
}

#[tokio::test]
async fn the_whole_walkthrough_login_me_sessions_refresh_logout() {
    let e = edge(&[], &[]).await;

    let pair = e.login(None, "phone-1").await;
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["is_new_user"], true);
    // Seconds left, rounded when the answer is built: a slow run may lose a few.
    let expires_in = pair["expires_in"]
        .as_u64()
        .unwrap_or_else(|| panic!("expires_in: {pair}"));
    assert!((7190..=7200).contains(&expires_in), "{pair}");
    let refresh_expires_in = pair["refresh_expires_in"]
        .as_u64()
        .unwrap_or_else(|| panic!("refresh_expires_in: {pair}"));
    assert!(
        (30 * 86400 - 10..=30 * 86400).contains(&refresh_expires_in),
        "{pair}"
    );
    let access = token(&pair, "access_token");
    let openid = token(&pair, "openid");

    let me = e.send(Method::GET, "/v1/me", Some(&access), None).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.header(CONTENT_TYPE), Some(JSON_UTF8));
    assert_eq!(me.body["openid"], openid.as_str());
    for null in ["unionid", "nickname", "avatar_url", "phone_number"] {
        assert!(me.body[null].is_null(), "{null}: {}", me.body);
    }
    assert!(
        me.body["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let patched = e
        .send(
            Method::PATCH,
            "/v1/me",
            Some(&access),
            Some(json!({"nickname": "小明 🌸", "avatar_url": "https://thirdwx.qlogo.cn/a/132"})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.body["nickname"], "小明 🌸");
    let again = e.send(Method::GET, "/v1/me", Some(&access), None).await;
    assert_eq!(again.body["avatar_url"], "https://thirdwx.qlogo.cn/a/132");
    // null clears a field; leaving a field out keeps it.
    let cleared = e
        .send(
            Method::PATCH,
            "/v1/me",
            Some(&access),
            Some(json!({"avatar_url": null})),
        )
        .await;
    assert!(cleared.body["avatar_url"].is_null());
    assert_eq!(cleared.body["nickname"], "小明 🌸");
    // A read after each change shows it (the edge on SQLite keeps profiles in memory).
    let read_back = e.send(Method::GET, "/v1/me", Some(&access), None).await;
    assert!(read_back.body["avatar_url"].is_null(), "{}", read_back.body);
    assert_eq!(read_back.body["nickname"], "小明 🌸");

    // The device of the login reached auth-service.
    let sessions = e
        .send(Method::GET, "/v1/auth/sessions", Some(&access), None)
        .await;
    assert_eq!(sessions.status, StatusCode::OK);
    let items = sessions.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["current"], true);
    assert_eq!(items[0]["device"]["id"], "phone-1");
    assert_eq!(items[0]["device"]["model"], "iPhone 15");

    let refreshed = e
        .send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": token(&pair, "refresh_token")})),
        )
        .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.body);
    assert_eq!(refreshed.body["is_new_user"], false);
    let access2 = token(&refreshed.body, "access_token");
    assert_ne!(access2, access);

    let out = e
        .send(Method::POST, "/v1/auth/logout", Some(&access2), None)
        .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    assert_eq!(out.body["revoked_sessions"], 1);
    let refused = e.send(Method::GET, "/v1/me", Some(&access2), None).await;
    refused.assert_error(StatusCode::UNAUTHORIZED, "token_revoked");
    assert_eq!(
        refused.header(WWW_AUTHENTICATE),
        Some(r#"Bearer error="invalid_token""#)
    );
}

/// A 401 `token_revoked` with the Bearer challenge.
fn assert_revoked(a: &Answer, which: &str) {
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{which}: {}", a.body);
    a.assert_error(StatusCode::UNAUTHORIZED, "token_revoked");
    assert_eq!(
        a.header(WWW_AUTHENTICATE),
        Some(r#"Bearer error="invalid_token""#),
        "{which}"
    );
}

#[tokio::test]
async fn logout_ends_this_session_only_unless_all_is_true() {
    // Arrange: four sessions of one user (four devices), and another user.
    let e = edge(&[], &[]).await;
    let phone = e.login(None, "phone").await;
    let openid = token(&phone, "openid");
    let tablet = e.login(Some(&openid), "tablet").await;
    let laptop = e.login(Some(&openid), "laptop").await;
    let watch = e.login(Some(&openid), "watch").await;
    let stranger = e.login(None, "stranger-phone").await;
    let [phone_at, tablet_at, laptop_at, watch_at, stranger_at] =
        [&phone, &tablet, &laptop, &watch, &stranger].map(|p| token(p, "access_token"));
    let me = |access: &str| {
        let (e, access) = (&e, access.to_owned());
        async move { e.send(Method::GET, "/v1/me", Some(&access), None).await }
    };
    let logout = |access: &str, body: Option<Value>| {
        let (e, access) = (&e, access.to_owned());
        async move {
            let out = e
                .send(Method::POST, "/v1/auth/logout", Some(&access), body)
                .await;
            assert_eq!(out.status, StatusCode::OK, "{}", out.body);
            assert_eq!(out.header(CONTENT_TYPE), Some(JSON_UTF8));
            out.body
        }
    };
    let alive = |answer: Answer, which: &str| {
        assert_eq!(answer.status, StatusCode::OK, "{which}: {}", answer.body);
        assert_eq!(answer.body["openid"], openid.as_str(), "{which}");
    };

    // `{"all": false}` ends the session it was sent from, and no other.
    assert_eq!(
        logout(&watch_at, Some(json!({"all": false}))).await,
        json!({"revoked_sessions": 1})
    );
    assert_revoked(&me(&watch_at).await, "watch");
    for (access, which) in [
        (&phone_at, "phone"),
        (&tablet_at, "tablet"),
        (&laptop_at, "laptop"),
    ] {
        alive(me(access).await, which);
    }

    // No body: the same.
    assert_eq!(
        logout(&laptop_at, None).await,
        json!({"revoked_sessions": 1})
    );
    assert_revoked(&me(&laptop_at).await, "laptop");
    for (access, which) in [(&phone_at, "phone"), (&tablet_at, "tablet")] {
        alive(me(access).await, which);
    }
    let sessions = e
        .send(Method::GET, "/v1/auth/sessions", Some(&phone_at), None)
        .await;
    assert_eq!(sessions.status, StatusCode::OK, "{}", sessions.body);
    let mut devices: Vec<(&str, bool)> = sessions.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|s| {
            (
                s["device"]["id"].as_str().unwrap_or(""),
                s["current"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    devices.sort_unstable();
    assert_eq!(
        devices,
        [("phone", true), ("tablet", false)],
        "{}",
        sessions.body
    );

    // `{"all": true}` from the phone ends both sessions left, the tablet's too.
    assert_eq!(
        logout(&phone_at, Some(json!({"all": true}))).await,
        json!({"revoked_sessions": 2})
    );
    assert_revoked(&me(&phone_at).await, "phone");
    assert_revoked(&me(&tablet_at).await, "tablet");
    // Their refresh tokens end with them.
    for (pair, which) in [(&phone, "phone"), (&tablet, "tablet")] {
        let refresh = e
            .send(
                Method::POST,
                "/v1/auth/refresh",
                None,
                Some(json!({"refresh_token": token(pair, "refresh_token")})),
            )
            .await;
        assert_revoked(&refresh, which);
    }
    // Another user's session is not touched.
    let theirs = me(&stranger_at).await;
    assert_eq!(theirs.status, StatusCode::OK, "{}", theirs.body);
    assert_eq!(theirs.body["openid"], stranger["openid"]);
}

#[tokio::test]
async fn a_sessions_rotations_are_limited_and_replays_within_grace_do_not_count() {
    let e = edge(&[("AUTH_REFRESH_RATE", "2/min")], &[]).await;
    let first = e.login(None, "phone").await;
    let openid = token(&first, "openid");
    let other = e.login(Some(&openid), "tablet").await;
    let refresh = async |pair: &Value| {
        e.send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": token(pair, "refresh_token")})),
        )
        .await
    };

    // Two rotations in the window.
    let second = refresh(&first).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    let third = refresh(&second.body).await;
    assert_eq!(third.status, StatusCode::OK, "{}", third.body);
    // A replay of a rotated token within the grace window writes nothing: not counted,
    // and answered with the same pair.
    let replay = refresh(&second.body).await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(
        token(&replay.body, "refresh_token"),
        token(&third.body, "refresh_token")
    );
    // The third rotation: 429 rate_limited with Retry-After, and the token is not spent:
    // the timeline holds the two rotations only (a replay or a rotation would add one).
    let limited = refresh(&third.body).await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let timeline = e
        .auth
        .client()
        .await
        .expect("a gRPC client")
        .list_session_events(ListSessionEventsRequest {
            openid: openid.clone(),
            ..Default::default()
        })
        .await
        .expect("the timeline")
        .into_inner();
    // (The user's other session has not refreshed yet.)
    let rotations = timeline
        .events
        .iter()
        .filter(|ev| ev.kind() == SessionEventKind::Refresh)
        .count();
    assert_eq!(rotations, 2, "{timeline:?}");
    // Another session of the same user has a window of its own.
    let theirs = refresh(&other).await;
    assert_eq!(theirs.status, StatusCode::OK, "{}", theirs.body);
}

#[tokio::test]
async fn an_expired_access_token_still_logs_its_live_session_out() {
    let e = edge(&[("AUTH_ACCESS_TTL", "1s")], &[]).await;
    let pair = e.login(None, "phone").await;
    let access = token(&pair, "access_token");
    // Wait for the token to lapse, as the edge sees it (a hang guard, not a speed check).
    let lapsed = async {
        loop {
            let a = e.send(Method::GET, "/v1/me", Some(&access), None).await;
            if a.status == StatusCode::UNAUTHORIZED {
                a.assert_error(StatusCode::UNAUTHORIZED, "token_expired");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), lapsed)
        .await
        .expect("the access token never expired");

    // Not every session of the user: that takes a live token.
    e.send(
        Method::POST,
        "/v1/auth/logout",
        Some(&access),
        Some(json!({"all": true})),
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "token_expired");
    // The session lives on (its refresh token works): the expired token ends it.
    let out = e
        .send(Method::POST, "/v1/auth/logout", Some(&access), None)
        .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    assert_eq!(out.body["revoked_sessions"], 1, "{}", out.body);
    let refresh = e
        .send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": token(&pair, "refresh_token")})),
        )
        .await;
    refresh.assert_error(StatusCode::UNAUTHORIZED, "token_revoked");
    // Once ended, the same token says so.
    e.send(Method::POST, "/v1/auth/logout", Some(&access), None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "token_revoked");
}

#[tokio::test]
async fn every_401_says_precisely_why_with_the_bearer_challenge() {
    let e = edge(
        &[
            ("AUTH_ACCESS_TTL", "1s"),
            ("AUTH_SESSION_POLICY", "single"),
            ("AUTH_REFRESH_GRACE", "1s"),
        ],
        &[],
    )
    .await;
    let check = |a: Answer, code: &str| {
        a.assert_error(StatusCode::UNAUTHORIZED, code);
        assert_eq!(
            a.header(WWW_AUTHENTICATE),
            Some(r#"Bearer error="invalid_token""#),
            "{code}"
        );
    };

    check(
        e.send(Method::GET, "/v1/me", None, None).await,
        "token_missing",
    );
    let basic = send(
        &e.api,
        Method::GET,
        "/v1/me",
        None,
        None,
        &[("authorization", "Basic dXNlcjpwdw==")],
    )
    .await;
    check(basic, "token_invalid");
    check(
        e.send(Method::GET, "/v1/me", Some("garbage"), None).await,
        "token_invalid",
    );

    let first = e.login(None, "a").await;
    let openid = token(&first, "openid");
    let second = e.login(Some(&openid), "b").await;
    check(
        e.send(
            Method::GET,
            "/v1/me",
            Some(&token(&first, "access_token")),
            None,
        )
        .await,
        "session_replaced",
    );

    // Reuse of a rotated refresh token after the grace window.
    let r = e
        .send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": token(&second, "refresh_token")})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let reuse = e
        .send(
            Method::POST,
            "/v1/auth/refresh",
            None,
            Some(json!({"refresh_token": token(&second, "refresh_token")})),
        )
        .await;
    check(reuse, "refresh_token_reused");

    // Expiry (the access TTL is 1 s).
    let third = e.login(Some(&openid), "c").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    check(
        e.send(
            Method::GET,
            "/v1/me",
            Some(&token(&third, "access_token")),
            None,
        )
        .await,
        "token_expired",
    );
    check(
        e.send(Method::POST, "/v1/auth/refresh", None, Some(json!({})))
            .await,
        "token_missing",
    );
}

#[tokio::test]
async fn login_errors_carry_the_contract_status_code_and_wechat_details() {
    let e = edge(&[("AUTH_WECHAT_TIMEOUT", "500ms")], &[]).await;
    let login = |code: String| {
        let e = &e;
        async move {
            e.send(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"code": code})),
            )
            .await
        }
    };

    for bad in ["", "has space", &"a".repeat(129)] {
        let a = login(bad.to_owned()).await;
        a.assert_error(StatusCode::BAD_REQUEST, "invalid_code");
        assert_eq!(a.body["error"]["field"], "code");
    }
    // No code, or a value that is no string: the same answer as a malformed code.
    for body in [
        json!({}),
        json!({"code": null}),
        json!({"code": 123}),
        json!({"code": {"code": "abc"}}),
    ] {
        let missing = e
            .send(Method::POST, "/v1/auth/login", None, Some(body.clone()))
            .await;
        missing.assert_error(StatusCode::BAD_REQUEST, "invalid_code");
        assert_eq!(missing.body["error"]["field"], "code", "{body}");
    }

    let used = e.sim.mint_code(&MintCode::default()).await.expect("mint");
    assert_eq!(login(used.code.clone()).await.status, StatusCode::OK);
    login(used.code)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "code_used");

    let cases = [
        (40029, StatusCode::BAD_REQUEST, "wechat_invalid_code"),
        (40163, StatusCode::BAD_REQUEST, "wechat_code_used"),
        (45011, StatusCode::TOO_MANY_REQUESTS, "wechat_rate_limited"),
        (40226, StatusCode::FORBIDDEN, "wechat_risky_user"),
        (-1, StatusCode::SERVICE_UNAVAILABLE, "wechat_busy"),
        (40125, StatusCode::BAD_GATEWAY, "wechat_error"),
    ];
    for (errcode, status, code) in cases {
        let m = e.sim.mint_code(&MintCode::default()).await.expect("mint");
        let mut fault = Fault::error(errcode).for_code(&m.code);
        fault.errmsg = Some(format!("simulated {errcode}"));
        e.sim.add_fault(&fault).await.expect("fault");
        let a = login(m.code).await;
        a.assert_error(status, code);
        assert_eq!(a.body["error"]["wechat"]["errcode"], errcode, "{}", a.body);
        assert!(
            a.body["error"]["wechat"]["errmsg"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("simulated {errcode}"))),
            "{}",
            a.body
        );
    }

    let m = e.sim.mint_code(&MintCode::default()).await.expect("mint");
    e.sim
        .add_fault(&Fault::hang().for_code(&m.code))
        .await
        .expect("fault");
    let a = login(m.code).await;
    a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "wechat_unavailable");
    assert!(a.body["error"].get("wechat").is_none());
}

#[tokio::test]
async fn the_login_rate_counts_the_client_ip_the_trusted_proxy_saw() {
    let e = edge(
        &[("AUTH_LOGIN_RATE", "2/min")],
        &[("API_TRUSTED_PROXY_HOPS", "1")],
    )
    .await;
    let login_from = |ip: &'static str| {
        let e = &e;
        async move {
            let m = e.sim.mint_code(&MintCode::default()).await.expect("mint");
            send(
                &e.api,
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"code": m.code})),
                &[("x-forwarded-for", ip)],
            )
            .await
        }
    };
    assert_eq!(login_from("203.0.113.1").await.status, StatusCode::OK);
    assert_eq!(login_from("203.0.113.1").await.status, StatusCode::OK);

    let refused = login_from("203.0.113.1").await;

    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = refused
        .header(RETRY_AFTER)
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry));
    // Another client behind the same proxy has its own budget.
    assert_eq!(login_from("203.0.113.2").await.status, StatusCode::OK);
}

#[tokio::test]
async fn profile_input_is_checked_with_the_field_at_fault() {
    let e = edge(&[], &[]).await;
    let access = token(&e.login(None, "d").await, "access_token");
    let cases = [
        (json!({"nickname": ""}), "nickname"),
        (json!({"nickname": "   "}), "nickname"),
        (json!({"nickname": "名".repeat(65)}), "nickname"),
        (json!({"nickname": "tab\there"}), "nickname"),
        (json!({"nickname": 42}), "nickname"),
        (
            json!({"avatar_url": "http://example.com/a.png"}),
            "avatar_url",
        ),
        (
            json!({"avatar_url": format!("https://example.com/{}", "a".repeat(1010))}),
            "avatar_url",
        ),
        (json!({"avatar_url": "javascript:alert(1)"}), "avatar_url"),
    ];
    for (body, field) in cases {
        let a = e
            .send(Method::PATCH, "/v1/me", Some(&access), Some(body.clone()))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.body);
        assert_eq!(a.body["error"]["field"], field, "{body}");
        a.assert_error(StatusCode::BAD_REQUEST, a.code());
    }
    let unknown = e
        .send(
            Method::PATCH,
            "/v1/me",
            Some(&access),
            Some(json!({"role": "admin"})),
        )
        .await;
    unknown.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(unknown.body["error"]["field"], "role");
    // 64 characters of any script are fine.
    let ok = e
        .send(
            Method::PATCH,
            "/v1/me",
            Some(&access),
            Some(json!({"nickname": "名".repeat(64)})),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn the_frameworks_own_errors_have_the_contract_shape() {
    let e = edge(&[], &[("API_BODY_LIMIT", "1024")]).await;

    e.send(Method::GET, "/no/such/route", None, None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let wrong = e.send(Method::DELETE, "/v1/me", None, None).await;
    wrong.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert!(wrong.header("allow").is_some_and(|a| a.contains("GET")));

    let big = json!({"code": "a".repeat(4096)});
    e.send(Method::POST, "/v1/auth/login", None, Some(big))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // A nested object given as an array is the wrong type, not filled in order.
    let array = json!({"code": "a-code", "device": ["my-phone", "ios"]});
    let refused = e
        .send(Method::POST, "/v1/auth/login", None, Some(array))
        .await;
    refused.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(refused.body["error"]["field"], "device", "{}", refused.body);

    let raw = |ct: &'static str, body: &'static str| {
        let e = &e;
        async move {
            let r = e
                .api
                .http()
                .post(e.api.url("/v1/auth/login"))
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .expect("answer");
            let status = r.status();
            let headers = r.headers().clone();
            let body: Value =
                serde_json::from_slice(&r.bytes().await.expect("body")).expect("JSON");
            Answer {
                status,
                headers,
                body,
            }
        }
    };
    raw("application/json", "{\"code\": ")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    raw("text/plain", "{\"code\": \"x\"}")
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    // Successful answers have the exact Content-Type too, the generated document included.
    let doc = e.send(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert_eq!(doc.header(CONTENT_TYPE), Some(JSON_UTF8));
    assert_eq!(doc.body["openapi"], "3.1.0");
    for path in [
        "/v1/auth/login",
        "/v1/auth/refresh",
        "/v1/auth/logout",
        "/v1/auth/sessions",
        "/v1/me",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(
            doc.body["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    let health = e.send(Method::GET, "/healthz", None, None).await;
    assert_eq!(health.header(CONTENT_TYPE), Some(JSON_UTF8));
    assert_eq!(health.body["status"], "ok");
}

#[tokio::test]
async fn request_ids_are_echoed_or_made_and_reach_auth_service() {
    let e = edge(&[], &[]).await;
    let m = e.sim.mint_code(&MintCode::default()).await.expect("mint");

    let a = send(
        &e.api,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"code": m.code})),
        &[("x-request-id", "edge-req-42")],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-request-id"), Some("edge-req-42"));
    // Read as the lines arrive, within a deadline.
    let seen = wait_for_log_line(|| e.auth.logs(), |l| l.contains("edge-req-42")).await;
    if let Err(logs) = seen {
        panic!(
            "auth-service never saw the request id; its logs:\n{}",
            logs.join("\n")
        );
    }

    let made = send(
        &e.api,
        Method::GET,
        "/healthz",
        None,
        None,
        &[("x-request-id", "bad id!")],
    )
    .await;
    let id = made.header("x-request-id").expect("an id");
    assert_ne!(id, "bad id!");
    assert_eq!(id.len(), 36);
}

#[tokio::test]
async fn with_debug_logs_no_token_code_or_client_key_reaches_the_edges_logs() {
    // Arrange: a client key on both sides, and the edge's debug logs: every line it can write.
    let key = "edge-log-client-key-0123456789abcdef0123";
    let mut e = edge(
        &[("AUTH_CLIENT_KEYS", key)],
        &[("RUST_LOG", "debug"), ("API_AUTH_CLIENT_KEY", key)],
    )
    .await;
    let m = e.sim.mint_code(&MintCode::default()).await.expect("mint");
    let call = |id: &'static str| [("x-request-id", id)];

    // Act: a login, a refresh, business requests (a read and a write), a logout.
    let login = send(
        &e.api,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"code": m.code})),
        &call("logs-login"),
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.body);
    let refreshed = send(
        &e.api,
        Method::POST,
        "/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": token(&login.body, "refresh_token")})),
        &call("logs-refresh"),
    )
    .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.body);
    let access = token(&refreshed.body, "access_token");
    let me = send(
        &e.api,
        Method::GET,
        "/v1/me",
        Some(&access),
        None,
        &call("logs-me"),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    let note = send(
        &e.api,
        Method::POST,
        "/v1/notes",
        Some(&access),
        Some(json!({"title": "t", "body": "b"})),
        &call("logs-note"),
    )
    .await;
    assert_eq!(note.status, StatusCode::CREATED, "{}", note.body);
    let out = send(
        &e.api,
        Method::POST,
        "/v1/auth/logout",
        Some(&access),
        None,
        &call("logs-logout"),
    )
    .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);

    // Assert: the edge's logs, read once it has exited and every line it wrote is in; each
    // request left lines (debug is on), and none of them holds a secret.
    let logs = stop_and_read_logs(e.api.process_mut()).await;
    for id in [
        "logs-login",
        "logs-refresh",
        "logs-me",
        "logs-note",
        "logs-logout",
    ] {
        assert!(
            logs.lines().any(|l| l.contains(id) && l.contains("DEBUG")),
            "no debug line of request {id}: the logs were not captured\n{logs}"
        );
    }
    let mut secrets = vec![m.code.clone(), key.to_owned()];
    for pair in [&login.body, &refreshed.body] {
        secrets.push(token(pair, "access_token"));
        secrets.push(token(pair, "refresh_token"));
    }
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "api-service logged {s}");
        // A token's random part alone counts too.
        if let Some(body) = s.strip_prefix("wxa_").or_else(|| s.strip_prefix("wxr_")) {
            assert!(
                !logs.contains(body),
                "api-service logged a token body of {s}"
            );
        }
    }
}

/// A port nobody listens on now (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn auth_service_down_is_503_with_retry_after_and_recovery_needs_no_restart() {
    // Arrange: auth-service on a fixed port, so that it can come back where it was.
    let port = free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let sim = SimProcess::start().await.expect("sim");
    let mut auth = AuthProcess::start(&sim, &[("AUTH_GRPC_ADDR", addr.as_str())])
        .await
        .expect("auth");
    let api = ApiProcess::start(&auth, &[("API_AUTH_TIMEOUT", "500ms")])
        .await
        .expect("api");
    let e_login = |code: String| {
        let api = &api;
        async move {
            send(
                api,
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"code": code})),
                &[],
            )
            .await
        }
    };
    let m = sim.mint_code(&MintCode::default()).await.expect("mint");
    let pair = e_login(m.code).await.body;
    let access = token(&pair, "access_token");

    // Act: auth-service dies.
    auth.process_mut().kill().await.expect("kill auth-service");

    // Assert: fail closed, promptly, in the contract's shape.
    for _ in 0..3 {
        let a = send(&api, Method::GET, "/v1/me", Some(&access), None, &[]).await;
        a.assert_error(StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable");
        assert!(a.header(RETRY_AFTER).is_some());
    }
    let m = sim.mint_code(&MintCode::default()).await.expect("mint");
    e_login(m.code)
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable");
    let (ready, checks) = api
        .readiness(StatusCode::SERVICE_UNAVAILABLE)
        .await
        .expect("readyz");
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE, "{checks}");
    assert_eq!(checks["checks"]["auth_service"], false);

    // auth-service comes back (same address, same database): the edge recovers by itself.
    auth.relaunch().await.expect("relaunch");
    let mut recovered = false;
    for _ in 0..100 {
        let a = send(&api, Method::GET, "/v1/me", Some(&access), None, &[]).await;
        if a.status == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the edge never recovered");
    let (ready, checks) = api.readiness(StatusCode::OK).await.expect("readyz");
    assert_eq!(ready, StatusCode::OK, "{checks}");
}

#[tokio::test]
async fn a_misconfigured_client_key_fails_closed() {
    let key = "edge-client-key-0123456789abcdef0123456789";
    let sim = SimProcess::start().await.expect("sim");
    let auth = AuthProcess::start(&sim, &[("AUTH_CLIENT_KEYS", key)])
        .await
        .expect("auth");
    let good = ApiProcess::start(&auth, &[("API_AUTH_CLIENT_KEY", key)])
        .await
        .expect("api with key");
    let m = sim.mint_code(&MintCode::default()).await.expect("mint");
    let ok = send(
        &good,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"code": m.code})),
        &[],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);

    let without = ApiProcess::start_for(&format!("http://{}", auth.addr()), &[], false)
        .await
        .expect("api without key");
    let m = sim.mint_code(&MintCode::default()).await.expect("mint");
    let refused = send(
        &without,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({"code": m.code})),
        &[],
    )
    .await;
    refused.assert_error(StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable");
}

#[tokio::test]
async fn sigterm_turns_readiness_off_lets_in_flight_requests_finish_and_exits_0() {
    // Arrange: WeChat answers this login's code after 10 s (auth-service waits up to 20 s
    // for it, the edge up to 45 s for auth-service); after SIGTERM the edge answers /readyz
    // 503 for 5 s, then closes its port and gives what is in flight up to 30 s. Its own
    // debug lines on: it writes one per answered request. The login reaches WeChat before
    // the signal.
    let mut e = edge(
        &[("AUTH_WECHAT_TIMEOUT", "20s")],
        &[
            ("API_DRAIN_DELAY", "5s"),
            ("API_SHUTDOWN_GRACE", "30s"),
            ("API_AUTH_WECHAT_TIMEOUT", "45s"),
            ("RUST_LOG", "info,api_service=debug"),
        ],
    )
    .await;
    let m = e.sim.mint_code(&MintCode::default()).await.expect("mint");
    e.sim
        .add_fault(&Fault::delay(10_000).for_code(&m.code))
        .await
        .expect("slow WeChat");
    let request_id = format!("sigterm-in-flight-{}", uuid::Uuid::new_v4());
    let http = e.api.http().clone();
    let url = e.api.url("/v1/auth/login");
    let (code, id) = (m.code.clone(), request_id.clone());
    let in_flight = tokio::spawn(async move {
        http.post(url)
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .body(json!({"code": code}).to_string())
            .send()
            .await
    });
    wait_for_wechat_call(&e.sim, &m.code).await;

    // Act
    e.api.process_mut().terminate().expect("SIGTERM");

    // Assert: readiness off while still answering; the login answered; a clean exit.
    let (status, body) = e
        .api
        .readiness(StatusCode::SERVICE_UNAVAILABLE)
        .await
        .expect("/readyz answers while draining");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["checks"]["draining"], true, "{body}");
    let answer = in_flight
        .await
        .expect("task")
        .expect("the in-flight login is answered");
    assert_eq!(answer.status(), StatusCode::OK);
    let code = e
        .api
        .process_mut()
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("exits");
    assert_eq!(code, Some(0));
    // And the login was in flight when the port closed: the edge answered it after, in the
    // process's own order of events.
    assert_lines_in_order(
        &e.api.logs(),
        &[
            &["stopping: /readyz answers 503"],
            &["no longer accepting connections"],
            &[r#""message":"answered""#, &request_id, r#""status":200"#],
            &[r#""message":"stopped""#],
        ],
    );
}

#[tokio::test]
async fn with_its_log_pipes_closed_the_edge_still_serves_and_stops_on_sigterm() {
    // Debug logs: every request writes lines, each to a pipe nobody reads any more.
    let mut e = edge(&[], &[("RUST_LOG", "debug")]).await;
    e.api.process_mut().close_output().await;

    for _ in 0..3 {
        let health = send(&e.api, Method::GET, "/healthz", None, None, &[]).await;
        assert_eq!(health.status, StatusCode::OK);
    }
    let code = e.api.process_mut().stop(Duration::from_secs(15)).await;
    assert_eq!(code.expect("exits"), Some(0));
}

#[tokio::test]
async fn a_malformed_setting_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().expect("dir");
    for (name, value) in [
        ("API_AUTH_CLIENT_KEY", "too-short"),
        ("API_HTTP_ADDR", "everywhere"),
        ("API_TLS_KEY", "/only/the/key.pem"),
    ] {
        let env = vec![
            ("API_HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
            ("API_METRICS_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "API_DATABASE_URL".to_owned(),
                format!("sqlite://{}/api.db", dir.path().display()),
            ),
            (name.to_owned(), value.to_owned()),
        ];
        let mut p = Process::spawn("api-service", &env, dir.path()).expect("spawn");
        let code = p.wait_exit(Duration::from_secs(20)).await.expect("exits");
        assert_eq!(code, Some(2), "{name}");
        let out = p.logs().join("\n");
        let expected = if name == "API_TLS_KEY" {
            "API_TLS_CERT"
        } else {
            name
        };
        assert!(out.contains(expected), "{name}: {out}");
        assert!(
            !out.contains(value) || name == "API_TLS_KEY",
            "{name} echoed its value: {out}"
        );
    }
}

/// `GET /v1/me` with each of `tokens`, all at once: the answers, in the tokens' order.
async fn me_at_once(c: &Caller, tokens: &[&str]) -> Vec<crate::api_common::Answer> {
    let mut calls = JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let (c, token) = (c.clone(), (*token).to_owned());
        calls.spawn(async move {
            (
                i,
                c.send(Method::GET, "/v1/me", Some(&token), None, &[]).await,
            )
        });
    }
    let mut answers = calls.join_all().await;
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, a)| a).collect()
}

#[tokio::test]
async fn requests_verified_together_each_get_their_own_verdict_and_a_logout_counts_at_once() {
    // Arrange: users A and B
    let w = api_world(&[], &[]).await;
    let c = w.caller();
    let a = w.login().await;
    let b = w.login().await;

    // Act + Assert: five times, a new session of A, its requests interleaved with B's (so
    // that their Verify calls share batches): each is answered as its own user; then A's
    // session is logged out and each of its requests sent after that is refused, B's not
    for round in 0..5 {
        let session = w.login_with(&MintCode::for_openid(&a.openid)).await;
        let tokens: Vec<&str> = (0..32)
            .map(|i| {
                if i % 2 == 0 {
                    session.access_token.as_str()
                } else {
                    b.access_token.as_str()
                }
            })
            .collect();
        for (i, me) in me_at_once(&c, &tokens).await.iter().enumerate() {
            let want = if i % 2 == 0 { &a.openid } else { &b.openid };
            assert_eq!(me.status, StatusCode::OK, "round {round}: {}", me.text());
            assert_eq!(
                me.json()["openid"],
                want.as_str(),
                "round {round}, request {i}"
            );
        }
        let out = c
            .send(
                Method::POST,
                "/v1/auth/logout",
                Some(&session.access_token),
                None,
                &[],
            )
            .await;
        assert_eq!(out.status, StatusCode::OK, "{}", out.text());
        for (i, me) in me_at_once(&c, &tokens).await.iter().enumerate() {
            if i % 2 == 0 {
                me.error(StatusCode::UNAUTHORIZED, "token_revoked");
            } else {
                assert_eq!(me.status, StatusCode::OK, "round {round}: {}", me.text());
                assert_eq!(me.json()["openid"], b.openid.as_str());
            }
        }
    }
    // The edge did send batches (else this test would not be about them).
    let metrics = scrape(w.auth.metrics_addr()).await;
    assert!(
        sample(&metrics, &auth_calls(VERIFY_BATCH, "OK")) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_connection_that_sends_no_whole_request_head_is_closed_after_the_idle_timeout() {
    // Arrange: one connection that sends nothing, one that sends half a request head.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let world = api_world(&[], &[("API_IDLE_TIMEOUT", "1s")]).await;
    let silent = tokio::net::TcpStream::connect(world.api.addr())
        .await
        .expect("connect");
    let mut slow = tokio::net::TcpStream::connect(world.api.addr())
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n")
        .await
        .expect("half a head");
    // And one kept alive after a whole request, answered, then idle.
    let mut idle = tokio::net::TcpStream::connect(world.api.addr())
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        .await
        .expect("a request");
    let mut answer = [0u8; 1024];
    let n = idle.read(&mut answer).await.expect("the answer");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );

    // Act: wait (far longer than the timeout) for the edge to close each.
    let closed = |mut stream: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await;
        matches!(read, Ok(Ok(0) | Err(_)))
    };
    let (silent_closed, slow_closed, idle_closed) =
        tokio::join!(closed(silent), closed(slow), closed(idle));

    // Assert
    assert!(silent_closed, "a silent connection is held open");
    assert!(slow_closed, "a half-sent head is held open");
    assert!(idle_closed, "an idle kept-alive connection is held open");
}
