//! The request context, around every request: the `X-Request-Id` (echoed when well formed,
//! made otherwise), the request id in the logs, the contract's shape for every error body (ours
//! and the framework's), the exact JSON Content-Type, and the request's metrics.
//!
//! Logs: the lines the edge writes about a request (a 5xx and its cause, auth-service failing)
//! name its `request_id`, `method` and `route` in their own fields. The `http` span that puts
//! every event of the request in context, libraries' included, is at debug level: at the
//! default `info` it would be created, formatted and entered on every poll of every request
//! (measured: about 8 % of the edge's CPU on `GET /v1/me`) for lines that are almost never
//! written; `RUST_LOG=debug` (or `api_service=debug`) turns it on.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument as _;

use crate::error::{ApiError, JSON_UTF8, PendingError, render};
use crate::state::AppState;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    /// The id of the request these parts belong to ("" outside the middleware).
    pub fn of(parts: &Parts) -> String {
        parts
            .extensions
            .get::<Self>()
            .map(|r| r.0.clone())
            .unwrap_or_default()
    }
}

/// An id we accept from a caller: 1 to 128 characters of `[A-Za-z0-9._:-]`.
fn well_formed(id: &HeaderValue) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// The middleware (installed outermost by `routes::router`).
pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if well_formed(v) => v.to_str().unwrap_or_default().to_owned(),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let span = tracing::debug_span!("http", method = %method, route, request_id = %id);

    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let request = RequestLog {
        id: &id,
        method: &method,
        route,
    };
    span.in_scope(|| finish(&mut response, &request));
    state.metrics.observe_http(
        &method,
        route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// What a log line says of the request it is about.
struct RequestLog<'a> {
    id: &'a str,
    method: &'a Method,
    route: &'a str,
}

/// Writes the error body with the request id (logging a 5xx's cause), gives framework errors
/// the contract's shape, and sets the exact JSON Content-Type.
fn finish(response: &mut Response, request: &RequestLog<'_>) {
    let status = response.status();
    let pending = response
        .extensions_mut()
        .remove::<PendingError>()
        .or_else(|| {
            {
                // An error the framework or a layer made (unknown route, wrong method, timeout,
                // a body it refused): same shape as ours.
                let is_json = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json"));
                (status.is_client_error() || status.is_server_error()) && !is_json
            }
            .then(|| {
                let r = ApiError::from_status(status).into_response();
                r.extensions().get::<PendingError>().cloned()
            })
            .flatten()
        });

    if let Some(PendingError { body, cause }) = pending {
        if status.is_server_error() {
            let (request_id, method, route) = (request.id, request.method.as_str(), request.route);
            match cause {
                Some(c) => tracing::error!(request_id, method, route, status = status.as_u16(),
                    error = ?c, "request failed"),
                None => tracing::error!(
                    request_id,
                    method,
                    route,
                    status = status.as_u16(),
                    "request failed"
                ),
            }
        }
        *response.body_mut() = Body::from(render(body, request.id));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_UTF8));
        response.headers_mut().remove(header::CONTENT_LENGTH);
    } else if response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
    {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_UTF8));
    }
    if let Ok(v) = HeaderValue::from_str(request.id) {
        response.headers_mut().insert(X_REQUEST_ID, v);
    }
    tracing::debug!(status = status.as_u16(), "answered");
}

/// Turns a panic in a handler into a 500 in the contract's shape (the payload is logged by
/// the middleware as the cause).
pub fn panic_response(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("a panic")
        .to_owned();
    ApiError::internal(anyhow::anyhow!("handler panicked: {what}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_checked() {
        assert!(well_formed(&HeaderValue::from_static("a-1_b.c:d")));
        assert!(!well_formed(&HeaderValue::from_static("")));
        assert!(!well_formed(&HeaderValue::from_static("a b")));
        assert!(!well_formed(
            &HeaderValue::from_str(&"x".repeat(129)).expect("ascii")
        ));
    }

    #[test]
    fn framework_errors_get_the_contract_shape() {
        let mut r = axum::http::StatusCode::METHOD_NOT_ALLOWED.into_response();
        let request = RequestLog {
            id: "rid",
            method: &Method::DELETE,
            route: "unmatched",
        };
        finish(&mut r, &request);
        assert_eq!(
            r.headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some(JSON_UTF8)
        );
        assert_eq!(
            r.headers().get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()),
            Some("rid")
        );
    }
}
