//! The one error type of the HTTP API and the contract's error shape:
//! `{"error": {"code", "message", "request_id", "field"?, "wechat"?}}`.
//!
//! Handlers return [`ApiError`]; its response carries the body as an extension, and the
//! request-context middleware (`middleware.rs`) writes it out with the request id. The same
//! middleware gives framework answers (404, 405, 413, 415, timeouts, panics) the same shape.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// WeChat's own answer, when it caused the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WechatDetail {
    /// WeChat's errcode.
    pub errcode: i64,
    /// WeChat's errmsg, as WeChat sent it.
    pub errmsg: String,
}

/// The inside of an error body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable snake_case code (`token_expired`, `not_found`, ...).
    pub code: Cow<'static, str>,
    /// A sentence for humans; may change.
    pub message: String,
    /// The request's id (also in the `X-Request-Id` header).
    pub request_id: String,
    /// The input field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// WeChat's errcode and errmsg, when WeChat's answer caused the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wechat: Option<WechatDetail>,
}

/// The error envelope every error response has.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// What the middleware needs to finish an error response: the body (without request id)
/// and the cause to log.
#[derive(Debug, Clone)]
pub(crate) struct PendingError {
    pub(crate) body: ErrorBody,
    pub(crate) cause: Option<Arc<anyhow::Error>>,
}

/// An error answer (boxed: it travels in every `Result` of the request path).
#[derive(Debug)]
pub struct ApiError(Box<Inner>);

#[derive(Debug)]
struct Inner {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<u64>,
    bearer_challenge: bool,
    cause: Option<anyhow::Error>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            status,
            body: ErrorBody {
                code: Cow::Borrowed(code),
                message: message.into(),
                request_id: String::new(),
                field: None,
                wechat: None,
            },
            retry_after: None,
            bearer_challenge: false,
            cause: None,
        }))
    }

    /// 400 for one input field.
    pub fn invalid(field: &str, code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message).with_field(field)
    }

    /// 400 `invalid_code` for a WeChat code that breaks the rule ([`shared::code_problem`]'s
    /// `problem`), field `code`.
    pub fn malformed_code(problem: &str) -> Self {
        Self::invalid("code", "invalid_code", format!("code {problem}"))
    }

    /// 401 with `WWW-Authenticate: Bearer error="invalid_token"`.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, code, message);
        e.0.bearer_challenge = true;
        e
    }

    /// 404 `not_found`: the same answer whether the thing never existed or is another user's.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "not found")
    }

    /// 503 `auth_unavailable` with `Retry-After`: auth-service cannot vouch for the caller.
    pub fn auth_unavailable(cause: impl Into<anyhow::Error>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "auth_unavailable",
            "authentication is unavailable; retry shortly",
        )
        .retry_after(1);
        e.0.cause = Some(cause.into());
        e
    }

    /// 503 `unavailable` with `Retry-After`: the database is down or overloaded.
    pub fn unavailable(cause: impl Into<anyhow::Error>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the service is temporarily unavailable; retry shortly",
        )
        .retry_after(1);
        e.0.cause = Some(cause.into());
        e
    }

    /// 500 `internal`: the cause is logged, the caller sees nothing of it.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong on our side",
        );
        e.0.cause = Some(cause.into());
        e
    }

    /// The generic error for a status the framework produced (unknown route, wrong method...).
    pub fn from_status(status: StatusCode) -> Self {
        let (code, message) = match status {
            StatusCode::BAD_REQUEST => ("invalid_request", "the request is malformed"),
            StatusCode::NOT_FOUND => ("not_found", "not found"),
            StatusCode::METHOD_NOT_ALLOWED => {
                ("method_not_allowed", "this method is not allowed here")
            }
            StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
            StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "the body must be JSON with Content-Type: application/json",
            ),
            StatusCode::UNPROCESSABLE_ENTITY => ("invalid_request", "the request is malformed"),
            StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "the service is unavailable"),
            s if s.is_server_error() => ("internal", "something went wrong on our side"),
            _ => ("error", "the request failed"),
        };
        Self::new(status, code, message)
    }

    /// Names the input field at fault.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.0.body.field = Some(field.into());
        self
    }

    /// Attaches WeChat's errcode and errmsg.
    #[must_use]
    pub fn with_wechat(mut self, errcode: i64, errmsg: impl Into<String>) -> Self {
        self.0.body.wechat = Some(WechatDetail {
            errcode,
            errmsg: errmsg.into(),
        });
        self
    }

    /// Adds `Retry-After: secs`.
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.0.retry_after = Some(secs.max(1));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The error code.
    pub fn code(&self) -> &str {
        &self.0.body.code
    }

    /// The message for humans.
    pub fn message(&self) -> &str {
        &self.0.body.message
    }

    /// The input field at fault, if one is named.
    pub fn field(&self) -> Option<&str> {
        self.0.body.field.as_deref()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let inner = *self.0;
        let mut response = inner.status.into_response();
        let headers = response.headers_mut();
        if inner.bearer_challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
        }
        if let Some(secs) = inner.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // The body is written by the middleware, which knows the request id.
        response.extensions_mut().insert(PendingError {
            body: inner.body,
            cause: inner.cause.map(Arc::new),
        });
        response
    }
}

/// The exact Content-Type of every JSON answer (CONTRACT.md).
pub const JSON_UTF8: &str = "application/json; charset=utf-8";

/// Renders an error envelope.
pub(crate) fn render(mut body: ErrorBody, request_id: &str) -> Vec<u8> {
    body.request_id = request_id.to_owned();
    serde_json::to_vec(&ErrorEnvelope { error: body }).unwrap_or_else(|_| {
        // Serializing strings and integers cannot fail; keep a valid answer regardless.
        br#"{"error":{"code":"internal","message":"error","request_id":""}}"#.to_vec()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_carries_the_bearer_challenge() {
        let r = ApiError::unauthorized("token_expired", "expired").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok()),
            Some(r#"Bearer error="invalid_token""#)
        );
        let pending = r.extensions().get::<PendingError>().expect("pending body");
        assert_eq!(pending.body.code, "token_expired");
    }

    #[test]
    fn the_body_has_the_contract_shape() {
        let e = ApiError::invalid("nickname", "invalid_argument", "too long")
            .with_wechat(40029, "invalid code");
        let bytes = render(e.0.body, "req-1");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["error"]["code"], "invalid_argument");
        assert_eq!(v["error"]["field"], "nickname");
        assert_eq!(v["error"]["request_id"], "req-1");
        assert_eq!(v["error"]["wechat"]["errcode"], 40029);
        let plain = render(ApiError::not_found().0.body, "r");
        let v: serde_json::Value = serde_json::from_slice(&plain).expect("json");
        assert!(v["error"].get("field").is_none() && v["error"].get("wechat").is_none());
    }

    #[test]
    fn internal_errors_keep_the_cause_out_of_the_body() {
        let e = ApiError::internal(anyhow::anyhow!("db row 7 is corrupt"));
        let r = e.into_response();
        let pending = r.extensions().get::<PendingError>().expect("pending");
        assert!(!pending.body.message.contains("corrupt"));
        assert!(pending.cause.is_some());
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
