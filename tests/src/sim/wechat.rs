//! What every WeChat endpoint shares: the list of endpoints, the error shape, the answer, and
//! [`begin_call`], which each endpoint's handler awaits first to count the call and apply the
//! faults staged for it.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::faults::FaultAction;
use super::ids::{self, RandomError};
use super::server;
use super::state::SimState;

/// The WeChat calls the simulator plays. The serde name is the one the control API uses
/// (`"endpoint"` of a fault, keys of `/sim/calls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub(crate) enum Endpoint {
    /// `GET /sns/jscode2session`.
    #[serde(rename = "jscode2session")]
    Jscode2session,
    /// `POST /cgi-bin/stable_token`.
    #[serde(rename = "stable_token")]
    StableToken,
    /// `GET /cgi-bin/token`.
    #[serde(rename = "token")]
    Token,
    /// `POST /wxa/business/getuserphonenumber`.
    #[serde(rename = "getuserphonenumber")]
    Getuserphonenumber,
    /// `GET /wxa/checksession`.
    #[serde(rename = "checksession")]
    Checksession,
    /// `GET /wxa/resetusersessionkey`.
    #[serde(rename = "resetusersessionkey")]
    Resetusersessionkey,
}

impl Endpoint {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Jscode2session => "jscode2session",
            Self::StableToken => "stable_token",
            Self::Token => "token",
            Self::Getuserphonenumber => "getuserphonenumber",
            Self::Checksession => "checksession",
            Self::Resetusersessionkey => "resetusersessionkey",
        }
    }

    /// The `Content-Type` WeChat gives this call's answers (its body is JSON whatever it says).
    pub(crate) const fn content_type(self) -> &'static str {
        match self {
            Self::Jscode2session => "text/plain",
            Self::StableToken
            | Self::Token
            | Self::Getuserphonenumber
            | Self::Checksession
            | Self::Resetusersessionkey => "application/json; encoding=utf-8",
        }
    }
}

/// An error answer: `{"errcode": N, "errmsg": "…"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WechatError {
    errcode: i64,
    errmsg: Errmsg,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Errmsg {
    /// WeChat's text, answered as `"<text>, rid: <id>"` with a fresh rid.
    Wechat(&'static str),
    /// A text a test asked for, answered exactly as it is.
    Verbatim(String),
}

impl WechatError {
    pub(crate) const SYSTEM_ERROR: i64 = -1;
    pub(crate) const INVALID_ACCESS_TOKEN: i64 = 40001;
    pub(crate) const INVALID_GRANT_TYPE: i64 = 40002;
    pub(crate) const INVALID_OPENID: i64 = 40003;
    pub(crate) const INVALID_APPID: i64 = 40013;
    pub(crate) const INVALID_CODE: i64 = 40029;
    pub(crate) const INVALID_APPSECRET: i64 = 40125;
    pub(crate) const CODE_USED: i64 = 40163;
    pub(crate) const MISSING_ACCESS_TOKEN: i64 = 41001;
    pub(crate) const MISSING_APPID: i64 = 41002;
    pub(crate) const MISSING_APPSECRET: i64 = 41004;
    pub(crate) const MISSING_CODE: i64 = 41008;
    pub(crate) const EXPIRED_ACCESS_TOKEN: i64 = 42001;
    pub(crate) const DAILY_QUOTA: i64 = 45009;
    pub(crate) const MINUTE_QUOTA: i64 = 45011;
    pub(crate) const DATA_FORMAT: i64 = 47001;
    pub(crate) const INVALID_SIGNATURE: i64 = 87009;

    /// The error `errcode` with WeChat's text for it, and a rid.
    pub(crate) fn new(errcode: i64) -> Self {
        Self {
            errcode,
            errmsg: Errmsg::Wechat(default_errmsg(errcode)),
        }
    }

    /// The error `errcode` with exactly `errmsg` (no rid added).
    pub(crate) fn with_message(errcode: i64, errmsg: impl Into<String>) -> Self {
        Self {
            errcode,
            errmsg: Errmsg::Verbatim(errmsg.into()),
        }
    }

    pub(crate) fn errcode(&self) -> i64 {
        self.errcode
    }

    fn errmsg(&self) -> String {
        match &self.errmsg {
            Errmsg::Wechat(text) => format!("{text}, rid: {}", ids::rid()),
            Errmsg::Verbatim(text) => text.clone(),
        }
    }

    pub(crate) fn answer(&self, endpoint: Endpoint) -> Response {
        let body = serde_json::json!({
            "errcode": self.errcode,
            "errmsg": self.errmsg(),
        });
        answer(endpoint, &body)
    }
}

/// The operating system's random numbers failed while serving a WeChat call: logged, and
/// answered as WeChat's "system error" (-1).
impl From<RandomError> for WechatError {
    fn from(cause: RandomError) -> Self {
        tracing::error!(error = %cause, "a WeChat call failed");
        Self::new(Self::SYSTEM_ERROR)
    }
}

/// WeChat's text for the errcodes it documents; `"simulated error"` for any other.
pub(crate) fn default_errmsg(errcode: i64) -> &'static str {
    match errcode {
        -1 => "system error",
        40001 => "invalid credential, access_token is invalid or not latest",
        40002 => "invalid grant_type",
        40003 => "invalid openid",
        40013 => "invalid appid",
        40029 => "invalid code",
        40125 => "invalid appsecret",
        40163 => "code been used",
        40164 => "invalid ip, not in whitelist",
        40226 => "invalid risk user",
        41001 => "access_token missing",
        41002 => "appid missing",
        41004 => "appsecret missing",
        41008 => "missing code",
        42001 => "access_token expired",
        45009 => "reach max api daily quota limit",
        45011 => "api minute-quota reach limit  mustslower  retry next minute",
        47001 => "data format error",
        87009 => "invalid signature",
        _ => "simulated error",
    }
}

/// A success that says so: `{"errcode": 0, "errmsg": "ok"}` with the fields of `fields`.
pub(crate) fn ok_body(fields: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::Map::new();
    body.insert("errcode".into(), 0.into());
    body.insert("errmsg".into(), "ok".into());
    if let serde_json::Value::Object(fields) = fields {
        body.extend(fields);
    }
    body.into()
}

/// The query parameters of a WeChat call. A query that does not parse has, as far as WeChat is
/// concerned, no parameters; an empty value counts as absent.
#[derive(Debug, Default)]
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn from_query(
        query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ) -> Self {
        Self(query.map(|Query(params)| params).unwrap_or_default())
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    }
}

/// The JSON object a POSTed WeChat call carries; `None` when the body is not one (47001).
pub(crate) fn json_object(
    body: Result<Bytes, BytesRejection>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(&body.ok()?) {
        Ok(serde_json::Value::Object(object)) => Some(object),
        _ => None,
    }
}

/// A field of a JSON body that must be a string when present: `Ok(None)` when absent or null,
/// 47001 when of another type.
pub(crate) fn string_field<'a>(
    object: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<&'a str>, WechatError> {
    match object.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(WechatError::new(WechatError::DATA_FORMAT)),
    }
}

/// Answers `result`: the success body, or the error (logged).
pub(crate) fn respond(
    endpoint: Endpoint,
    result: Result<serde_json::Value, WechatError>,
) -> Response {
    match result {
        Ok(body) => answer(endpoint, &body),
        Err(error) => {
            tracing::info!(
                endpoint = endpoint.name(),
                errcode = error.errcode(),
                "a WeChat call refused"
            );
            error.answer(endpoint)
        }
    }
}

/// A WeChat answer: HTTP 200, the JSON `body`, and the endpoint's `Content-Type`.
pub(crate) fn answer(endpoint: Endpoint, body: &serde_json::Value) -> Response {
    ([(CONTENT_TYPE, endpoint.content_type())], body.to_string()).into_response()
}

/// Counts the call and applies the first active fault that matches it. `None`: process the call
/// normally (after the fault's delay, if any); `Some`: answer this instead (an error, or the
/// order to drop the connection). A hang never returns: the future is dropped, and the call
/// released, when the client goes away.
pub(crate) async fn begin_call(
    state: &SimState,
    endpoint: Endpoint,
    code: Option<&str>,
) -> Option<Response> {
    let action = state.with_world(|world| {
        world.calls.record(endpoint, code);
        world.faults.take(endpoint, code)
    })?;
    match action {
        FaultAction::Drop => Some(server::drop_connection()),
        FaultAction::DropAfter => {
            // The handler goes on; `drop_after_processing` then drops its answer.
            let _outside_the_layer = DROP_AFTER.try_with(|drop| drop.set(true));
            None
        }
        FaultAction::Hang => {
            let _released = HungCall(endpoint);
            match std::future::pending::<Infallible>().await {}
        }
        FaultAction::Answer { delay, error } => {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            error.map(|error| error.answer(endpoint))
        }
    }
}

tokio::task_local! {
    /// Set by a `drop_after` fault for the call being answered.
    static DROP_AFTER: std::cell::Cell<bool>;
}

/// The layer that carries out `drop_after` faults: the call is processed in full, then its
/// answer is replaced by a dropped connection.
pub(crate) async fn drop_after_processing(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    DROP_AFTER
        .scope(std::cell::Cell::new(false), async move {
            let answer = next.run(request).await;
            if DROP_AFTER.with(std::cell::Cell::get) {
                tracing::info!(
                    "dropping the connection after processing the call, as a fault asked"
                );
                server::drop_connection()
            } else {
                answer
            }
        })
        .await
}

/// Logs when a hung call is let go, which shows that hanging leaks nothing.
struct HungCall(Endpoint);

impl Drop for HungCall {
    fn drop(&mut self) {
        tracing::info!(
            endpoint = self.0.name(),
            "released a hung call: the client went away or the simulator is stopping"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_errcodes_have_wechat_texts_and_a_rid() {
        let errmsg = WechatError::new(40029).errmsg();
        assert!(errmsg.starts_with("invalid code, rid: "), "{errmsg}");
        assert!(
            WechatError::new(-1)
                .errmsg()
                .starts_with("system error, rid: ")
        );
        assert!(
            WechatError::new(12345)
                .errmsg()
                .starts_with("simulated error, rid: ")
        );
    }

    #[test]
    fn a_given_errmsg_is_answered_as_it_is() {
        assert_eq!(WechatError::with_message(-1, "busy").errmsg(), "busy");
    }

    #[test]
    fn an_endpoint_reads_by_its_control_name() {
        let endpoint: Endpoint = serde_json::from_str("\"jscode2session\"").expect("known");
        assert_eq!(endpoint, Endpoint::Jscode2session);
        assert_eq!(endpoint.name(), "jscode2session");
        assert!(serde_json::from_str::<Endpoint>("\"nowhere\"").is_err());
        for name in [
            "stable_token",
            "token",
            "getuserphonenumber",
            "checksession",
            "resetusersessionkey",
        ] {
            let endpoint: Endpoint = serde_json::from_str(&format!("\"{name}\"")).expect("known");
            assert_eq!(endpoint.name(), name);
            assert_eq!(endpoint.content_type(), "application/json; encoding=utf-8");
        }
    }

    #[test]
    fn a_success_says_ok_before_its_fields() {
        let body = ok_body(serde_json::json!({"openid": "oA"}));
        assert_eq!(
            body,
            serde_json::json!({"errcode": 0, "errmsg": "ok", "openid": "oA"})
        );
    }

    #[test]
    fn only_a_json_object_is_a_body() {
        assert!(json_object(Ok(Bytes::from_static(b"{\"code\":\"c\"}"))).is_some());
        for body in [&b"not json"[..], b"[1]", b"\"text\"", b""] {
            assert!(json_object(Ok(Bytes::from_static(body))).is_none());
        }
    }
}
