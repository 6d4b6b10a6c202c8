//! Every way a call to auth-service can fail, in domain terms. The one translation to the
//! wire is `impl From<AuthError> for tonic::Status` in `grpc/status.rs`.

use std::time::Duration;

use crate::domain::Invalid;

/// WeChat's own error answer, kept as WeChat sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WechatErr {
    /// WeChat's errcode.
    pub errcode: i64,
    /// WeChat's errmsg (not stable text: never branch on it).
    pub errmsg: String,
}

/// A failed call, as the caller should learn of it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The login code is missing or malformed; WeChat was not called.
    #[error("invalid code: {0}")]
    InvalidCode(Invalid),
    /// The login code was already exchanged; WeChat was not called again.
    #[error("this code was already used")]
    CodeUsed,
    /// Some other input is malformed.
    #[error("{0}")]
    InvalidArgument(Invalid),
    /// WeChat refused the code (40029).
    #[error("WeChat says the code is invalid or expired")]
    WechatInvalidCode(WechatErr),
    /// WeChat says the code was used (40163).
    #[error("WeChat says the code was already used")]
    WechatCodeUsed(WechatErr),
    /// WeChat's per-user rate limit (45011).
    #[error("WeChat's rate limit for this user was reached; try again in a minute")]
    WechatRateLimited(WechatErr),
    /// WeChat blocks this user as high-risk (40226).
    #[error("WeChat blocked this user as high-risk")]
    WechatRiskyUser(WechatErr),
    /// WeChat answered -1 twice.
    #[error("WeChat is busy; try again")]
    WechatBusy(WechatErr),
    /// Any other WeChat error, or an answer we cannot read.
    #[error("WeChat refused the request")]
    WechatError(Option<WechatErr>),
    /// WeChat could not be reached, or did not answer in time.
    #[error("WeChat could not be reached in time")]
    WechatUnavailable,
    /// Too many logins from this client IP, rotations of this session, or phone-code
    /// exchanges by this user.
    #[error("{what}")]
    RateLimited {
        /// When the caller may try again.
        retry_after: Duration,
        /// Which limit, for the message.
        what: &'static str,
    },
    /// No token was given.
    #[error("no token was given")]
    TokenMissing,
    /// The token is unknown or garbled.
    #[error("the token is invalid")]
    TokenInvalid,
    /// The token expired.
    #[error("the token has expired")]
    TokenExpired,
    /// The session was ended (logout, operator, refresh-token reuse).
    #[error("the token was revoked")]
    TokenRevoked,
    /// Another login of the same user pushed this session out.
    #[error("this session was replaced by another login")]
    SessionReplaced,
    /// A rotated refresh token was presented after the grace window; the session is ended.
    #[error("this refresh token was already used; the session has been revoked")]
    RefreshTokenReused,
    /// No such user.
    #[error("no such user")]
    UserNotFound,
    /// encryptedData or its iv is not base64, or of the wrong length.
    #[error("{0}")]
    InvalidEncryptedData(Invalid),
    /// None of the session_keys held for the user decrypts the data: it was encrypted with a
    /// key that has been replaced since (or is not WeChat's at all). The mini-program calls
    /// wx.login and logs in again.
    #[error("no current session_key of this user decrypts the data; log in again")]
    SessionKeyStale,
    /// The data decrypts, but its watermark names another app (or none).
    #[error("the data's watermark does not name this app")]
    WatermarkMismatch,
    /// No phone number is kept for this user.
    #[error("no phone number is known for this user")]
    PhoneNotSet,
    /// The database or cache is down; retrying later may work.
    #[error("a backing service is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// A bug or an impossible state; the cause is logged, the caller sees a generic message.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl AuthError {
    /// Wraps an unexpected failure.
    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        Self::Internal(e.into())
    }

    /// The `google.rpc.ErrorInfo` reason callers see: the upper-case form of the HTTP API's
    /// error code. Also the `outcome` label of the metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidCode(_) => "INVALID_CODE",
            Self::CodeUsed => "CODE_USED",
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::WechatInvalidCode(_) => "WECHAT_INVALID_CODE",
            Self::WechatCodeUsed(_) => "WECHAT_CODE_USED",
            Self::WechatRateLimited(_) => "WECHAT_RATE_LIMITED",
            Self::WechatRiskyUser(_) => "WECHAT_RISKY_USER",
            Self::WechatBusy(_) => "WECHAT_BUSY",
            Self::WechatError(_) => "WECHAT_ERROR",
            Self::WechatUnavailable => "WECHAT_UNAVAILABLE",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::TokenMissing => "TOKEN_MISSING",
            Self::TokenInvalid => "TOKEN_INVALID",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::TokenRevoked => "TOKEN_REVOKED",
            Self::SessionReplaced => "SESSION_REPLACED",
            Self::RefreshTokenReused => "REFRESH_TOKEN_REUSED",
            Self::UserNotFound => "NOT_FOUND",
            Self::InvalidEncryptedData(_) => "INVALID_ENCRYPTED_DATA",
            Self::SessionKeyStale => "SESSION_KEY_STALE",
            Self::WatermarkMismatch => "WATERMARK_MISMATCH",
            Self::PhoneNotSet => "PHONE_NOT_SET",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
        }
    }
}
