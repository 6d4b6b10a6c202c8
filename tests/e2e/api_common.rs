//! What the api-service end-to-end tests share: a simulator, an auth-service and an
//! api-service per test (all real processes), logging in through `POST /v1/auth/login`, and
//! reading answers with the contract's rules (exact JSON Content-Type, error shape) checked.

use reqwest::header::{CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tests::harness::sim::MintCode;
use tests::harness::{ApiProcess, AuthProcess, SimProcess};

/// The exact Content-Type of every JSON answer (CONTRACT.md).
pub(crate) const JSON_UTF8: &str = "application/json; charset=utf-8";

/// One test's world: its own simulator, auth-service and api-service.
pub(crate) struct ApiWorld {
    pub(crate) sim: SimProcess,
    #[allow(
        dead_code,
        reason = "kept running for the test; some tests restart or stop it"
    )]
    pub(crate) auth: AuthProcess,
    pub(crate) api: ApiProcess,
}

/// A user logged in through the edge.
#[derive(Debug, Clone)]
pub(crate) struct Login {
    /// The access token, for `Authorization: Bearer`.
    pub(crate) access_token: String,
    /// The user's openid.
    pub(crate) openid: String,
    /// The whole token pair as the edge answered it.
    pub(crate) pair: Value,
}

/// Starts a simulator, an auth-service (with `auth_env` on top of the test defaults) and an
/// api-service in front of it (with `api_env`), each ready.
pub(crate) async fn api_world(auth_env: &[(&str, &str)], api_env: &[(&str, &str)]) -> ApiWorld {
    let sim = SimProcess::start().await.expect("the simulator starts");
    let auth = AuthProcess::start(&sim, auth_env)
        .await
        .expect("auth-service starts");
    let api = ApiProcess::start(&auth, api_env)
        .await
        .expect("api-service starts");
    ApiWorld { sim, auth, api }
}

impl ApiWorld {
    /// A handle for requests to this api-service that can move into tasks (make a new one
    /// after `api.restart()`: the port may change).
    pub(crate) fn caller(&self) -> Caller {
        Caller::of(&self.api)
    }

    /// Sends a request to the api-service (see [`Caller::send`]).
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.caller().send(method, path, token, body, headers).await
    }

    /// Mints a code at the simulator (as `wx.login()` does) and logs in with it through
    /// `POST /v1/auth/login`; panics unless the edge answers 200 with a token pair.
    pub(crate) async fn login_with(&self, mint: &MintCode) -> Login {
        let minted = self.sim.mint_code(mint).await.expect("mint a code");
        let a = self
            .send(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({ "code": minted.code })),
                &[],
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "login: {}", a.text());
        let pair = a.json();
        assert_eq!(pair["token_type"], "Bearer", "{pair}");
        assert_eq!(pair["openid"], minted.openid.as_str(), "{pair}");
        let access_token = pair["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {pair}"))
            .to_owned();
        Login {
            access_token,
            openid: minted.openid,
            pair,
        }
    }

    /// Logs in a new user.
    pub(crate) async fn login(&self) -> Login {
        self.login_with(&MintCode::default()).await
    }
}

/// Requests to one api-service: cheap to clone, `'static`, for concurrent tasks.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    http: reqwest::Client,
    base_url: String,
}

impl Caller {
    /// Requests to `api` as it is now.
    pub(crate) fn of(api: &ApiProcess) -> Self {
        Self {
            http: api.http().clone(),
            base_url: api.base_url(),
        }
    }

    /// `method path` with the bearer `token`, JSON `body` (sent as `application/json`) and
    /// extra `headers`; panics when no HTTP answer arrives.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base_url));
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&b).expect("serialize the body"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: cannot read the body: {e}"))
            .to_vec();
        Answer {
            status,
            headers,
            bytes,
        }
    }
}

/// An answer as it came.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) bytes: Vec<u8>,
}

impl Answer {
    /// A header's value, when present and text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text, for messages.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The body as JSON, after checking the exact Content-Type.
    pub(crate) fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some(JSON_UTF8),
            "{} answered with the wrong Content-Type: {}",
            self.status,
            self.text()
        );
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Checks the contract's error shape with `status` and `code` (and the request id of
    /// the header in the body); answers the error object.
    pub(crate) fn error(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let body = self.json();
        let error = &body["error"];
        assert_eq!(error["code"], code, "{body}");
        assert!(error["message"].is_string(), "{body}");
        let request_id = self.header("x-request-id").expect("X-Request-Id");
        assert_eq!(error["request_id"], request_id, "{body}");
        error.clone()
    }

    /// The body with the request id's value emptied, byte for byte otherwise: two answers
    /// that differ only by request id compare equal.
    pub(crate) fn bytes_without_request_id(&self) -> Vec<u8> {
        let id = self.header("x-request-id").expect("X-Request-Id");
        assert!(!id.is_empty());
        let needle = format!("\"request_id\":\"{id}\"");
        let text = self.text();
        assert_eq!(text.matches(&needle).count(), 1, "{text}");
        text.replace(&needle, "\"request_id\":\"\"").into_bytes()
    }
}
