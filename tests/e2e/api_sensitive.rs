//! The sensitive-data endpoints of the edge: `POST /v1/wechat/decrypt` across devices and
//! session_key rotations, and `POST /v1/me/phone` with the number shown to its owner only.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tests::harness::sim::{Encrypt, Fault, MintCode, MintPhoneCode, MintedCode};
use tests::harness::{ApiProcess, AuthProcess, SimProcess};

use crate::api_common::api_world;
use crate::common::stop_and_read_logs;

struct Edge {
    sim: SimProcess,
    auth: AuthProcess,
    api: ApiProcess,
}

async fn edge() -> Edge {
    edge_with(&[]).await
}

/// [`edge`] with settings `api_env` for api-service.
async fn edge_with(api_env: &[(&str, &str)]) -> Edge {
    let sim = SimProcess::start().await.expect("simulator");
    let auth = AuthProcess::start(&sim, &[]).await.expect("auth-service");
    let api = ApiProcess::start(&auth, api_env)
        .await
        .expect("api-service");
    Edge { sim, auth, api }
}

impl Edge {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .api
            .http()
            .request(method, self.api.url(path))
            .header("authorization", format!("Bearer {token}"));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = req.send().await.expect("an answer");
        let status = r.status();
        let bytes = r.bytes().await.expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// wx.login on a device of `openid` (a new user when None), then the edge's login.
    async fn login(&self, openid: Option<&str>, device: &str) -> (MintedCode, String) {
        let mint = openid.map_or_else(MintCode::default, MintCode::for_openid);
        let minted = self.sim.mint_code(&mint).await.expect("mint");
        let r = self
            .api
            .http()
            .post(self.api.url("/v1/auth/login"))
            .header("content-type", "application/json")
            .body(json!({"code": minted.code, "device": {"id": device}}).to_string())
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
        let token = body["access_token"].as_str().expect("token").to_owned();
        (minted, token)
    }

    async fn decrypt(
        &self,
        token: &str,
        sealed: &tests::harness::sim::Encrypted,
    ) -> (StatusCode, Value) {
        self.send(
            Method::POST,
            "/v1/wechat/decrypt",
            token,
            Some(json!({"encrypted_data": sealed.encrypted_data, "iv": sealed.iv})),
        )
        .await
    }
}

#[tokio::test]
async fn data_from_either_device_decrypts_for_either_session_until_two_rotations_later() {
    let e = edge().await;
    // Device A logs in, then device B of the same user (WeChat rotates the session_key).
    let (a, token_a) = e.login(None, "phone").await;
    let (b, token_b) = e.login(Some(&a.openid), "tablet").await;
    let steps = json!({"stepInfoList": [{"timestamp": 1700000000, "step": 4321}]});
    let with_a = e
        .sim
        .encrypt(&Encrypt::with_session_key(
            a.session_key.clone(),
            steps.clone(),
        ))
        .await
        .expect("encrypt with A's key");
    let with_b = e
        .sim
        .encrypt(&Encrypt::with_session_key(
            b.session_key.clone(),
            steps.clone(),
        ))
        .await
        .expect("encrypt with B's key");

    for token in [&token_a, &token_b] {
        for sealed in [&with_a, &with_b] {
            let (status, body) = e.decrypt(token, sealed).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["data"]["stepInfoList"][0]["step"], 4321);
            assert!(body["data"]["watermark"]["appid"].is_string());
        }
    }

    // A third login rotates again: A's key is now two rotations old.
    let (_, token_c) = e.login(Some(&a.openid), "laptop").await;
    let (status, body) = e.decrypt(&token_c, &with_a).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "session_key_stale");
    let (status, _) = e.decrypt(&token_c, &with_b).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_and_a_foreign_watermark_are_told_apart() {
    let e = edge().await;
    let (a, token) = e.login(None, "phone").await;

    let (status, body) = e
        .send(
            Method::POST,
            "/v1/wechat/decrypt",
            &token,
            Some(json!({"encrypted_data": "not base64!", "iv": "r7BXXKkLb8qrSNn05n0qiA=="})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_encrypted_data");
    assert_eq!(body["error"]["field"], "encrypted_data");
    let (status, body) = e
        .send(
            Method::POST,
            "/v1/wechat/decrypt",
            &token,
            Some(json!({"encrypted_data": "AAAAAAAAAAAAAAAAAAAAAA==", "iv": "c2hvcnQ="})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "iv");

    let foreign = e
        .sim
        .encrypt(
            &Encrypt::for_openid(a.openid.clone(), json!({"openGId": "g1"}))
                .appid("wxanotherapp0000001"),
        )
        .await
        .expect("encrypt");
    let (status, body) = e.decrypt(&token, &foreign).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "watermark_mismatch");

    // No token, no decryption.
    let (status, body) = e.decrypt("", &foreign).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn a_phone_code_is_exchanged_once_and_the_number_shown_to_its_owner_only() {
    let e = edge().await;
    let (owner, token) = e.login(None, "phone").await;
    let (_, stranger) = e.login(None, "other-phone").await;
    let code = e
        .sim
        .mint_phone_code(&MintPhoneCode::new("13800138000").for_openid(owner.openid.clone()))
        .await
        .expect("phone code");

    let (status, body) = e
        .send(
            Method::POST,
            "/v1/me/phone",
            &token,
            Some(json!({"code": code})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["phone_number"], "13800138000");
    assert_eq!(body["pure_phone_number"], "13800138000");
    assert_eq!(body["country_code"], "86");

    let (_, me) = e.send(Method::GET, "/v1/me", &token, None).await;
    assert_eq!(me["phone_number"], "13800138000");
    let (_, theirs) = e.send(Method::GET, "/v1/me", &stranger, None).await;
    assert!(theirs["phone_number"].is_null(), "{theirs}");

    // The same code again: refused, and WeChat is not asked (billed) a second time.
    let (status, body) = e
        .send(
            Method::POST,
            "/v1/me/phone",
            &token,
            Some(json!({"code": code})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "code_used");
    assert_eq!(
        e.sim
            .endpoint_calls("getuserphonenumber")
            .await
            .expect("calls"),
        1
    );
}

#[tokio::test]
async fn a_users_phone_code_exchanges_are_limited_per_user_before_wechat_is_asked() {
    let sim = SimProcess::start().await.expect("simulator");
    let auth = AuthProcess::start(&sim, &[("AUTH_PHONE_RATE", "2/min")])
        .await
        .expect("auth-service");
    let api = ApiProcess::start(&auth, &[]).await.expect("api-service");
    let e = Edge { sim, auth, api };
    let (owner, token) = e.login(None, "phone").await;
    let (other, other_token) = e.login(None, "other-phone").await;
    let exchange = async |openid: &str, token: &str, number: &str| {
        let code = e
            .sim
            .mint_phone_code(&MintPhoneCode::new(number).for_openid(openid.to_owned()))
            .await
            .expect("phone code");
        let response = e
            .api
            .http()
            .post(e.api.url("/v1/me/phone"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(json!({ "code": code }).to_string())
            .send()
            .await
            .expect("POST /v1/me/phone");
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let status = response.status();
        let body: Value =
            serde_json::from_slice(&response.bytes().await.expect("a body")).expect("JSON");
        (status, body, retry_after)
    };

    // Two exchanges in the window, each answered by WeChat.
    for number in ["13800000001", "13800000002"] {
        let (status, body, _) = exchange(&owner.openid, &token, number).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The third: 429 rate_limited with Retry-After, and WeChat is not asked.
    let (status, body, retry_after) = exchange(&owner.openid, &token, "13800000003").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        retry_after.is_some_and(|s| (1..=60).contains(&s)),
        "{retry_after:?}"
    );
    let asked = e
        .sim
        .endpoint_calls("getuserphonenumber")
        .await
        .expect("calls");
    assert_eq!(asked, 2);
    // The limit is the user's, not the session's: another session of theirs is refused too.
    let (again, second_token) = e.login(Some(&owner.openid), "tablet").await;
    assert_eq!(again.openid, owner.openid);
    let (status, body, _) = exchange(&owner.openid, &second_token, "13800000004").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    // The number kept is the last one exchanged; another user has a window of their own.
    let (_, me) = e.send(Method::GET, "/v1/me", &token, None).await;
    assert_eq!(me["phone_number"], "13800000002", "{me}");
    let (status, body, _) = exchange(&other.openid, &other_token, "13900000001").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn session_keys_and_the_phone_number_stay_inside_auth_service() {
    // Debug logs on the edge: the most it ever writes.
    let mut e = edge_with(&[("RUST_LOG", "debug")]).await;
    let (a, token_a) = e.login(None, "phone").await;
    let (b, token_b) = e.login(Some(&a.openid), "tablet").await;
    let sealed = e
        .sim
        .encrypt(&Encrypt::with_session_key(
            a.session_key.clone(),
            json!({"openGId": "g"}),
        ))
        .await
        .expect("encrypt");
    let code = e
        .sim
        .mint_phone_code(&MintPhoneCode::new("13912345678").for_openid(a.openid.clone()))
        .await
        .expect("phone code");

    // Each call succeeds (an error answer would carry no session_key trivially).
    let mut answers = Vec::new();
    for (what, (status, answer)) in [
        ("decrypt", e.decrypt(&token_b, &sealed).await),
        (
            "phone",
            e.send(
                Method::POST,
                "/v1/me/phone",
                &token_a,
                Some(json!({"code": code})),
            )
            .await,
        ),
        ("me", e.send(Method::GET, "/v1/me", &token_b, None).await),
        (
            "sessions",
            e.send(Method::GET, "/v1/auth/sessions", &token_a, None)
                .await,
        ),
    ] {
        assert_eq!(status, StatusCode::OK, "{what}: {answer}");
        answers.push(answer);
    }
    assert_eq!(answers[0]["data"]["openGId"], "g", "{}", answers[0]);
    assert_eq!(answers[1]["phone_number"], "13912345678", "{}", answers[1]);
    assert_eq!(
        answers[3]["items"].as_array().map(Vec::len),
        Some(2),
        "{}",
        answers[3]
    );

    // No answer carries a session_key (the phone number is in its owner's answers by design).
    let keys = [a.session_key.as_str(), b.session_key.as_str()];
    for answer in &answers {
        let text = answer.to_string();
        for key in keys {
            assert!(
                !text.contains(key),
                "an answer carries a session_key: {text}"
            );
        }
    }
    assert_eq!(answers[2]["phone_number"], "13912345678");

    // api-service never holds either: not in its database files (read while it runs)...
    let secrets = [keys[0], keys[1], "13912345678"];
    for entry in std::fs::read_dir(e.api.data_dir()).expect("data dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        for s in secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{} holds {s}",
                path.display()
            );
        }
    }
    // ...nor in its logs, read once it has exited and every line it wrote is in.
    let logs = stop_and_read_logs(e.api.process_mut()).await;
    assert!(
        logs.contains("/v1/me/phone") && logs.contains("/v1/wechat/decrypt"),
        "the requests' debug lines were not captured:\n{logs}"
    );
    for s in secrets {
        assert!(!logs.contains(s), "api-service logged {s}");
    }
    // And auth-service keeps the number sealed, not in clear.
    for entry in std::fs::read_dir(e.auth.data_dir()).expect("data dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        assert!(!bytes.windows(11).any(|w| w == b"13912345678"));
    }
}

#[tokio::test]
async fn wechat_errors_of_the_phone_exchange_carry_the_contract_status_code_and_wechat_details() {
    let w = api_world(&[], &[]).await;
    let user = w.login().await;
    let phone_code = || {
        let w = &w;
        let openid = user.openid.clone();
        async move {
            w.sim
                .mint_phone_code(&MintPhoneCode::new("13700137000").for_openid(openid))
                .await
                .expect("phone code")
        }
    };

    // CONTRACT.md, Login errors: WeChat's own errors pass through, for the phone too.
    let cases = [
        (40029, StatusCode::BAD_REQUEST, "wechat_invalid_code", 1),
        (40163, StatusCode::BAD_REQUEST, "wechat_code_used", 1),
        (
            45011,
            StatusCode::TOO_MANY_REQUESTS,
            "wechat_rate_limited",
            1,
        ),
        (40226, StatusCode::FORBIDDEN, "wechat_risky_user", 1),
        // -1 is retried once, then passed on.
        (-1, StatusCode::SERVICE_UNAVAILABLE, "wechat_busy", 2),
        (61450, StatusCode::BAD_GATEWAY, "wechat_error", 1),
    ];
    let mut rate_limited_code = None;
    for (errcode, status, code, calls) in cases {
        let phone = phone_code().await;
        let mut fault = Fault::error(errcode)
            .on_endpoint("getuserphonenumber")
            .for_code(&phone);
        fault.errmsg = Some(format!("simulated {errcode}, rid: 6650ab12-{errcode}"));
        w.sim.add_fault(&fault).await.expect("fault");

        let a = w
            .send(
                Method::POST,
                "/v1/me/phone",
                Some(&user.access_token),
                Some(json!({"code": phone})),
                &[],
            )
            .await;
        let error = a.error(status, code);
        assert_eq!(error["wechat"]["errcode"], errcode, "{error}");
        assert_eq!(
            error["wechat"]["errmsg"],
            format!("simulated {errcode}, rid: 6650ab12-{errcode}"),
            "{error}"
        );
        assert_eq!(
            w.sim.code_calls(&phone).await.expect("calls"),
            calls,
            "errcode {errcode}: the exchange was asked a wrong number of times"
        );
        if errcode == 45011 {
            rate_limited_code = Some(phone);
        }
    }

    // No number was kept by a refused exchange.
    let me = w
        .send(Method::GET, "/v1/me", Some(&user.access_token), None, &[])
        .await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text());
    assert!(me.json()["phone_number"].is_null(), "{}", me.text());

    // A code WeChat refused for a moment (rate limited) is not used up: once WeChat answers
    // again, the same code binds the number.
    w.sim.clear_faults().await.expect("clear faults");
    let again = w
        .send(
            Method::POST,
            "/v1/me/phone",
            Some(&user.access_token),
            Some(json!({"code": rate_limited_code.expect("the 45011 case ran")})),
            &[],
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(again.json()["phone_number"], "13700137000");
}
