//! `/v1/auth/*`: login, refresh, logout and the session list, passed to auth-service with the
//! client's IP and device, its verdicts mapped to the contract's statuses and codes.

use crate::redact::redacted_debug;
use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{BearerToken, CallContext, Device, SessionItem, TokenPair};
use crate::client_ip::{PeerAddr, client_ip};
use crate::error::{ApiError, ErrorEnvelope};
use crate::json::{Json, JsonOrEmpty};
use crate::middleware::RequestId;
use crate::state::AppState;

/// `POST /v1/auth/login`'s body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    /// The code from `wx.login()`: 1 to 128 characters of `[A-Za-z0-9_-]`, single use
    /// (missing, `null` or not a string: 400 `invalid_code`).
    #[serde(default, deserialize_with = "crate::json::code")]
    #[schema(value_type = Option<String>)]
    pub code: Option<String>,
    /// The device, optional: a login with the `id` of a live session replaces it.
    #[serde(default, deserialize_with = "crate::json::optional_object")]
    pub device: Option<Device>,
}

redacted_debug!(LoginBody { device; code });

/// `POST /v1/auth/refresh`'s body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    /// The refresh token of the current pair.
    #[serde(default)]
    pub refresh_token: Option<String>,
}

redacted_debug!(RefreshBody { ; refresh_token });

/// `POST /v1/auth/logout`'s body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogoutBody {
    /// True: end every session of the user, not only this one.
    #[serde(default)]
    pub all: bool,
}

/// `POST /v1/auth/logout`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogoutAnswer {
    /// How many sessions were ended.
    pub revoked_sessions: u32,
}

/// `GET /v1/auth/sessions`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// The user's live sessions, newest first.
    pub items: Vec<SessionItem>,
}

/// Log in with a `wx.login()` code.
#[utoipa::path(
    post, path = "/v1/auth/login", tag = "auth",
    request_body = LoginBody,
    responses(
        (status = 200, description = "A new session", body = TokenPair),
        (status = 400, description = "invalid_code, code_used, wechat_invalid_code, wechat_code_used, invalid_argument, invalid_request, invalid_json", body = ErrorEnvelope),
        (status = 403, description = "wechat_risky_user", body = ErrorEnvelope),
        (status = 413, description = "payload_too_large", body = ErrorEnvelope),
        (status = 415, description = "unsupported_media_type", body = ErrorEnvelope),
        (status = 429, description = "rate_limited (with Retry-After), wechat_rate_limited", body = ErrorEnvelope),
        (status = 502, description = "wechat_error", body = ErrorEnvelope),
        (status = 503, description = "wechat_busy, wechat_unavailable, auth_unavailable", body = ErrorEnvelope),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    PeerAddr(peer): PeerAddr,
    headers: HeaderMap,
    Json(body): Json<LoginBody>,
) -> Result<axum::Json<TokenPair>, ApiError> {
    let ip = client_ip(&headers, peer, state.trusted_proxy_hops)
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let code = body.code.as_deref().unwrap_or_default();
    // Refused here as auth-service would refuse it: the answer does not hang on auth-service
    // (a 400 stays a 400 while it is away), and no call is made for it.
    if let Some(problem) = shared::code_problem(code) {
        return Err(ApiError::malformed_code(problem));
    }
    let ctx = CallContext { request_id };
    let pair = state.auth.login(&ctx, code, body.device, &ip).await?;
    Ok(axum::Json(pair))
}

/// Exchange a refresh token for the next pair.
#[utoipa::path(
    post, path = "/v1/auth/refresh", tag = "auth",
    request_body = RefreshBody,
    responses(
        (status = 200, description = "The next pair (the same one for a retry within the grace window)", body = TokenPair),
        (status = 400, description = "invalid_request, invalid_json", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced, refresh_token_reused", body = ErrorEnvelope),
        (status = 429, description = "rate_limited (with Retry-After: the session's AUTH_REFRESH_RATE; the token is not spent)", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable", body = ErrorEnvelope),
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    Json(body): Json<RefreshBody>,
) -> Result<axum::Json<TokenPair>, ApiError> {
    let ctx = CallContext { request_id };
    let pair = state
        .auth
        .refresh(&ctx, body.refresh_token.as_deref().unwrap_or_default())
        .await?;
    Ok(axum::Json(pair))
}

/// End this session, or every session of the user.
#[utoipa::path(
    post, path = "/v1/auth/logout", tag = "auth",
    request_body(content = LogoutBody, description = "Optional (no body, or an empty one, ends this session); `{\"all\": true}` ends every session"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Sessions ended (an expired access token is taken for its own session while that session lives on, not with all)", body = LogoutAnswer),
        (status = 400, description = "invalid_request, invalid_json", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired (the session is over too, or all with an expired token), token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 415, description = "unsupported_media_type", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable", body = ErrorEnvelope),
    )
)]
pub async fn logout(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    BearerToken(token): BearerToken,
    JsonOrEmpty(body): JsonOrEmpty<LogoutBody>,
) -> Result<axum::Json<LogoutAnswer>, ApiError> {
    let ctx = CallContext { request_id };
    let n = state.auth.logout(&ctx, &token, body.all).await?;
    Ok(axum::Json(LogoutAnswer {
        revoked_sessions: n,
    }))
}

/// The user's live sessions.
#[utoipa::path(
    get, path = "/v1/auth/sessions", tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Live sessions, newest first", body = SessionList),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable", body = ErrorEnvelope),
    )
)]
pub async fn sessions(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    BearerToken(token): BearerToken,
) -> Result<axum::Json<SessionList>, ApiError> {
    let ctx = CallContext { request_id };
    let items = state.auth.list_sessions(&ctx, &token).await?;
    Ok(axum::Json(SessionList { items }))
}
