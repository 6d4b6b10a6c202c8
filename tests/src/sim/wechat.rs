//! What every WeChat endpoint shares: the list of endpoints, the error shape, the answer, and
//! [`begin_call`], which each endpoint's handler awaits first to count the call and apply the
//! faults staged for it.

use std::convert::Infallible;

use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::faults::FaultAction;
use super::ids;
use super::server;
use super::state::SimState;

/// The WeChat calls the simulator plays. The serde name is the one the control API uses
/// (`"endpoint"` of a fault, keys of `/sim/calls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub(crate) enum Endpoint {
    /// `GET /sns/jscode2session`.
    #[serde(rename = "jscode2session")]
    Jscode2session,
}

impl Endpoint {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Jscode2session => "jscode2session",
        }
    }

    /// The `Content-Type` WeChat gives this call's answers (its body is JSON whatever it says).
    pub(crate) const fn content_type(self) -> &'static str {
        match self {
            Self::Jscode2session => "text/plain",
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
    pub(crate) const INVALID_GRANT_TYPE: i64 = 40002;
    pub(crate) const INVALID_APPID: i64 = 40013;
    pub(crate) const INVALID_CODE: i64 = 40029;
    pub(crate) const INVALID_APPSECRET: i64 = 40125;
    pub(crate) const CODE_USED: i64 = 40163;
    pub(crate) const MISSING_CODE: i64 = 41008;
    pub(crate) const MINUTE_QUOTA: i64 = 45011;

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

/// WeChat's text for the errcodes it documents; `"simulated error"` for any other.
pub(crate) fn default_errmsg(errcode: i64) -> &'static str {
    match errcode {
        -1 => "system error",
        40001 => "invalid credential, access_token is invalid or not latest",
        40002 => "invalid grant_type",
        40013 => "invalid appid",
        40029 => "invalid code",
        40125 => "invalid appsecret",
        40163 => "code been used",
        40164 => "invalid ip, not in whitelist",
        40226 => "invalid risk user",
        41001 => "access_token missing",
        41008 => "missing code",
        42001 => "access_token expired",
        45011 => "api minute-quota reach limit  mustslower  retry next minute",
        47001 => "data format error",
        87009 => "invalid signature",
        _ => "simulated error",
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
        assert!(serde_json::from_str::<Endpoint>("\"token\"").is_err());
    }
}
