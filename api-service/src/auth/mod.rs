//! auth-service, as api-service sees it: a trait ([`AuthApi`]) with a gRPC implementation
//! ([`GrpcAuth`]), and the [`Authenticated`] extractors that call `Verify` on every business
//! request. No verdict is cached: a revoked session is refused on its next request.

mod batch;
mod extract;
#[cfg(test)]
pub(crate) mod fake;
mod grpc;

use async_trait::async_trait;
use axum::http::StatusCode;
use serde::Serialize;

pub use extract::{Authenticated, AuthenticatedWithPhone, BearerToken};

/// The longest bearer token the edge passes on (auth-service's are 47 bytes): a longer one
/// is refused `token_invalid` at once.
pub(crate) const TOKEN_MAX: usize = 512;

/// auth-service's reason when a user has no phone number stored.
pub(crate) const PHONE_NOT_SET: &str = "PHONE_NOT_SET";
pub use grpc::GrpcAuth;

use crate::error::ApiError;
use crate::redact::redacted_debug;

/// Who the caller is, as `Verify` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's openid: every business read and write is scoped to it.
    pub openid: String,
    /// The user's unionid, when known.
    pub unionid: Option<String>,
    /// The session of the token.
    pub session_id: String,
    /// The user's kept phone number. Only a `Verify` with `include_phone` asks for it
    /// ([`AuthenticatedWithPhone`]); otherwise it is always `None`.
    pub phone: Option<PhoneNumber>,
}

/// The device a login comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// A stable id the mini-program keeps for this install (at most 128 characters).
    #[serde(default)]
    pub id: Option<String>,
    /// `ios`, `android`, `devtools`, ... (at most 32 characters).
    #[serde(default)]
    pub platform: Option<String>,
    /// The device model (at most 128 characters).
    #[serde(default)]
    pub model: Option<String>,
}

/// The device a live session was opened from, as `GET /v1/auth/sessions` shows it: each
/// field always there, `null` when the login did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SessionDevice {
    /// The id the mini-program gave at login, or null.
    #[schema(required = true)]
    pub id: Option<String>,
    /// The platform given at login, or null.
    #[schema(required = true)]
    pub platform: Option<String>,
    /// The model given at login, or null.
    #[schema(required = true)]
    pub model: Option<String>,
}

/// A token pair as the contract shows it.
#[derive(Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    /// Send as `Authorization: Bearer` on business requests.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// Exchange at `POST /v1/auth/refresh` for the next pair.
    pub refresh_token: String,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: i64,
    /// The user's openid.
    pub openid: String,
    /// True when this login created the user (always false on refresh).
    pub is_new_user: bool,
}

redacted_debug!(TokenPair {
    token_type, expires_in, refresh_expires_in, openid, is_new_user;
    access_token, refresh_token
});

/// A live session of the caller's user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SessionItem {
    /// The session's id.
    pub session_id: String,
    /// The device it was opened from.
    pub device: SessionDevice,
    /// When it was opened (RFC 3339, UTC).
    pub created_at: String,
    /// When it was last used (RFC 3339, UTC; moves at most once a minute).
    pub last_active_at: String,
    /// True for the session of this request's token.
    pub current: bool,
}

/// The user's phone number, as WeChat confirmed it.
#[derive(Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PhoneNumber {
    /// With the country code when it is not mainland China's (`+1 2025550123`), as WeChat gives it.
    pub phone_number: String,
    /// Without the country code.
    pub pure_phone_number: String,
    /// The country code (`86`).
    pub country_code: String,
}

redacted_debug!(PhoneNumber { ; phone_number, pure_phone_number, country_code });

/// What the edge passes along with every call: the request id and, for logins, the client.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The request's `X-Request-Id`, sent as `x-request-id`.
    pub request_id: String,
}

/// A refusal or failure of auth-service, already in the contract's HTTP terms.
pub type AuthResult<T> = Result<T, ApiError>;

/// auth-service's RPCs that the edge uses.
#[async_trait]
pub trait AuthApi: Send + Sync + std::fmt::Debug + 'static {
    /// `Verify`; with `include_phone`, the same call also answers the user's kept phone number
    /// (in [`Identity::phone`]), so that showing it needs no second call.
    async fn verify(
        &self,
        ctx: &CallContext,
        access_token: &str,
        include_phone: bool,
    ) -> AuthResult<Identity>;
    /// `Login`.
    async fn login(
        &self,
        ctx: &CallContext,
        code: &str,
        device: Option<Device>,
        client_ip: &str,
    ) -> AuthResult<TokenPair>;
    /// `Refresh`.
    async fn refresh(&self, ctx: &CallContext, refresh_token: &str) -> AuthResult<TokenPair>;
    /// `Logout`.
    async fn logout(&self, ctx: &CallContext, access_token: &str, all: bool) -> AuthResult<u32>;
    /// `ListSessions`.
    async fn list_sessions(
        &self,
        ctx: &CallContext,
        access_token: &str,
    ) -> AuthResult<Vec<SessionItem>>;
    /// `DecryptData`: the decrypted JSON of `encryptedData`, its watermark checked.
    async fn decrypt_data(
        &self,
        ctx: &CallContext,
        access_token: &str,
        encrypted_data: &str,
        iv: &str,
    ) -> AuthResult<serde_json::Value>;
    /// `GetPhoneNumber`: with a code, exchanges it (once) and stores the number; with an empty
    /// code, the stored number of the token's user, `None` when there is none.
    async fn phone_number(
        &self,
        ctx: &CallContext,
        access_token: &str,
        code: &str,
    ) -> AuthResult<Option<PhoneNumber>>;
    /// Whether auth-service reports SERVING (for /readyz).
    async fn ready(&self) -> bool;
}

/// The HTTP answer for an ErrorInfo reason from auth-service (CONTRACT.md). `None`: a reason
/// the edge does not know, which it treats as auth-service failing.
pub(crate) fn http_status_for(reason: &str) -> Option<(StatusCode, &'static str)> {
    use StatusCode as S;
    Some(match reason {
        "TOKEN_MISSING" => (S::UNAUTHORIZED, "token_missing"),
        "TOKEN_INVALID" => (S::UNAUTHORIZED, "token_invalid"),
        "TOKEN_EXPIRED" => (S::UNAUTHORIZED, "token_expired"),
        "TOKEN_REVOKED" => (S::UNAUTHORIZED, "token_revoked"),
        "SESSION_REPLACED" => (S::UNAUTHORIZED, "session_replaced"),
        "REFRESH_TOKEN_REUSED" => (S::UNAUTHORIZED, "refresh_token_reused"),
        "INVALID_CODE" => (S::BAD_REQUEST, "invalid_code"),
        "CODE_USED" => (S::BAD_REQUEST, "code_used"),
        "INVALID_ARGUMENT" => (S::BAD_REQUEST, "invalid_argument"),
        "WECHAT_INVALID_CODE" => (S::BAD_REQUEST, "wechat_invalid_code"),
        "WECHAT_CODE_USED" => (S::BAD_REQUEST, "wechat_code_used"),
        "WECHAT_RATE_LIMITED" => (S::TOO_MANY_REQUESTS, "wechat_rate_limited"),
        "WECHAT_RISKY_USER" => (S::FORBIDDEN, "wechat_risky_user"),
        "WECHAT_BUSY" => (S::SERVICE_UNAVAILABLE, "wechat_busy"),
        "WECHAT_ERROR" => (S::BAD_GATEWAY, "wechat_error"),
        "WECHAT_UNAVAILABLE" => (S::SERVICE_UNAVAILABLE, "wechat_unavailable"),
        "RATE_LIMITED" => (S::TOO_MANY_REQUESTS, "rate_limited"),
        "NOT_FOUND" => (S::NOT_FOUND, "not_found"),
        "INVALID_ENCRYPTED_DATA" => (S::BAD_REQUEST, "invalid_encrypted_data"),
        "SESSION_KEY_STALE" => (S::CONFLICT, "session_key_stale"),
        "WATERMARK_MISMATCH" => (S::BAD_REQUEST, "watermark_mismatch"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_reason_has_its_status() {
        use StatusCode as S;
        // Every reason of CONTRACT.md's error tables, with its status and code.
        let contract = [
            ("TOKEN_MISSING", S::UNAUTHORIZED, "token_missing"),
            ("TOKEN_INVALID", S::UNAUTHORIZED, "token_invalid"),
            ("TOKEN_EXPIRED", S::UNAUTHORIZED, "token_expired"),
            ("TOKEN_REVOKED", S::UNAUTHORIZED, "token_revoked"),
            ("SESSION_REPLACED", S::UNAUTHORIZED, "session_replaced"),
            (
                "REFRESH_TOKEN_REUSED",
                S::UNAUTHORIZED,
                "refresh_token_reused",
            ),
            ("INVALID_CODE", S::BAD_REQUEST, "invalid_code"),
            ("CODE_USED", S::BAD_REQUEST, "code_used"),
            ("INVALID_ARGUMENT", S::BAD_REQUEST, "invalid_argument"),
            ("WECHAT_INVALID_CODE", S::BAD_REQUEST, "wechat_invalid_code"),
            ("WECHAT_CODE_USED", S::BAD_REQUEST, "wechat_code_used"),
            (
                "WECHAT_RATE_LIMITED",
                S::TOO_MANY_REQUESTS,
                "wechat_rate_limited",
            ),
            ("WECHAT_RISKY_USER", S::FORBIDDEN, "wechat_risky_user"),
            ("WECHAT_BUSY", S::SERVICE_UNAVAILABLE, "wechat_busy"),
            ("WECHAT_ERROR", S::BAD_GATEWAY, "wechat_error"),
            (
                "WECHAT_UNAVAILABLE",
                S::SERVICE_UNAVAILABLE,
                "wechat_unavailable",
            ),
            ("RATE_LIMITED", S::TOO_MANY_REQUESTS, "rate_limited"),
            ("NOT_FOUND", S::NOT_FOUND, "not_found"),
            (
                "INVALID_ENCRYPTED_DATA",
                S::BAD_REQUEST,
                "invalid_encrypted_data",
            ),
            ("SESSION_KEY_STALE", S::CONFLICT, "session_key_stale"),
            ("WATERMARK_MISMATCH", S::BAD_REQUEST, "watermark_mismatch"),
        ];
        for (reason, status, code) in contract {
            assert_eq!(http_status_for(reason), Some((status, code)), "{reason}");
            // The reason is the upper-case form of the code (CONTRACT.md, gRPC API).
            assert_eq!(reason, code.to_uppercase(), "{reason}");
        }
        // Anything auth-service should never send the edge's callers is not mapped, nor is
        // a code in the HTTP spelling.
        for r in [
            "INTERNAL",
            "UNAVAILABLE",
            "CLIENT_KEY_INVALID",
            PHONE_NOT_SET,
            "SOMETHING_NEW",
            "token_expired",
            "",
        ] {
            assert_eq!(http_status_for(r), None, "{r}");
        }
    }
}
