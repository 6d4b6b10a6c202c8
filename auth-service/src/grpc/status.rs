//! The one translation of domain errors to gRPC: a status code, a message for humans, and
//! a `google.rpc.ErrorInfo` (domain `wxauth`, upper-case reason, WeChat's errcode/errmsg or
//! the faulty field in its metadata). Internal causes are logged here and never sent.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::error;

use crate::error::{AuthError, WechatErr};

/// ErrorInfo's domain for every wxauth error.
pub const DOMAIN: &str = "wxauth";

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        use AuthError as E;
        let code = match &e {
            E::InvalidCode(_) => Code::InvalidArgument,
            E::CodeUsed => Code::InvalidArgument,
            E::InvalidArgument(_) => Code::InvalidArgument,
            E::WechatInvalidCode(_) => Code::InvalidArgument,
            E::WechatCodeUsed(_) => Code::InvalidArgument,
            E::WechatRateLimited(_) => Code::ResourceExhausted,
            E::WechatRiskyUser(_) => Code::PermissionDenied,
            E::WechatBusy(_) => Code::Unavailable,
            E::WechatError(_) => Code::FailedPrecondition,
            E::WechatUnavailable => Code::Unavailable,
            E::RateLimited { .. } => Code::ResourceExhausted,
            E::TokenMissing => Code::Unauthenticated,
            E::TokenInvalid => Code::Unauthenticated,
            E::TokenExpired => Code::Unauthenticated,
            E::TokenRevoked => Code::Unauthenticated,
            E::SessionReplaced => Code::Unauthenticated,
            E::RefreshTokenReused => Code::Unauthenticated,
            E::UserNotFound => Code::NotFound,
            E::InvalidEncryptedData(_) => Code::InvalidArgument,
            E::SessionKeyStale => Code::FailedPrecondition,
            E::WatermarkMismatch => Code::InvalidArgument,
            E::PhoneNotSet => Code::NotFound,
            E::Unavailable(_) => Code::Unavailable,
            E::Internal(_) => Code::Internal,
        };
        let reason = e.reason();

        let mut metadata = HashMap::new();
        let mut retry_after = None;
        let wechat = |m: &mut HashMap<String, String>, w: &WechatErr| {
            m.insert("wechat_errcode".into(), w.errcode.to_string());
            m.insert("wechat_errmsg".into(), w.errmsg.clone());
        };
        match &e {
            E::InvalidCode(i) | E::InvalidArgument(i) | E::InvalidEncryptedData(i) => {
                metadata.insert("field".into(), i.field.to_owned());
            }
            E::WechatInvalidCode(w)
            | E::WechatCodeUsed(w)
            | E::WechatRateLimited(w)
            | E::WechatRiskyUser(w)
            | E::WechatBusy(w)
            | E::WechatError(Some(w)) => wechat(&mut metadata, w),
            E::RateLimited { retry_after: d, .. } => {
                // Whole seconds, rounded up: "retry after 0 s" would invite a storm.
                let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                metadata.insert("retry_after_secs".into(), secs.max(1).to_string());
                retry_after = Some(*d);
            }
            _ => {}
        }

        let message = match &e {
            E::Internal(cause) => {
                error!(error = ?cause, "internal error");
                e.to_string()
            }
            E::Unavailable(cause) => {
                error!(error = ?cause, "backing service unavailable");
                e.to_string()
            }
            E::InvalidCode(i) | E::InvalidArgument(i) | E::InvalidEncryptedData(i) => i.to_string(),
            _ => e.to_string(),
        };

        let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
        if retry_after.is_some() {
            details.set_retry_info(retry_after);
        }
        Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::Invalid;

    fn info(s: &Status) -> tonic_types::ErrorInfo {
        s.get_details_error_info().expect("ErrorInfo detail")
    }

    #[test]
    fn wechat_errors_carry_errcode_and_errmsg() {
        let s = Status::from(AuthError::WechatInvalidCode(WechatErr {
            errcode: 40029,
            errmsg: "invalid code, rid: 1".into(),
        }));
        assert_eq!(s.code(), Code::InvalidArgument);
        let i = info(&s);
        assert_eq!(i.reason, "WECHAT_INVALID_CODE");
        assert_eq!(i.domain, DOMAIN);
        assert_eq!(
            i.metadata.get("wechat_errcode").map(String::as_str),
            Some("40029")
        );
        assert_eq!(
            i.metadata.get("wechat_errmsg").map(String::as_str),
            Some("invalid code, rid: 1")
        );
    }

    #[test]
    fn internal_causes_stay_inside() {
        let s = Status::from(AuthError::internal(anyhow::anyhow!(
            "secret detail at row 7"
        )));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret detail"));
        assert_eq!(info(&s).reason, "INTERNAL");
    }

    #[test]
    fn fields_and_retry_after_are_in_the_metadata() {
        let s = Status::from(AuthError::InvalidCode(Invalid::new("code", "is missing")));
        assert_eq!(
            info(&s).metadata.get("field").map(String::as_str),
            Some("code")
        );
        let s = Status::from(AuthError::RateLimited {
            retry_after: Duration::from_millis(1500),
            what: "too many",
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            info(&s)
                .metadata
                .get("retry_after_secs")
                .map(String::as_str),
            Some("2")
        );
    }

    #[test]
    fn sensitive_data_failures_are_told_apart() {
        let s = Status::from(AuthError::InvalidEncryptedData(Invalid::new(
            "iv",
            "is not 16 bytes of base64",
        )));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(info(&s).reason, "INVALID_ENCRYPTED_DATA");
        assert_eq!(
            info(&s).metadata.get("field").map(String::as_str),
            Some("iv")
        );
        for (e, code, reason) in [
            (
                AuthError::SessionKeyStale,
                Code::FailedPrecondition,
                "SESSION_KEY_STALE",
            ),
            (
                AuthError::WatermarkMismatch,
                Code::InvalidArgument,
                "WATERMARK_MISMATCH",
            ),
            (AuthError::PhoneNotSet, Code::NotFound, "PHONE_NOT_SET"),
        ] {
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{reason}");
            assert_eq!(info(&s).reason, reason);
            assert!(info(&s).metadata.is_empty(), "{reason}");
        }
    }

    #[test]
    fn token_failures_are_unauthenticated_and_told_apart() {
        for (e, reason) in [
            (AuthError::TokenMissing, "TOKEN_MISSING"),
            (AuthError::TokenInvalid, "TOKEN_INVALID"),
            (AuthError::TokenExpired, "TOKEN_EXPIRED"),
            (AuthError::TokenRevoked, "TOKEN_REVOKED"),
            (AuthError::SessionReplaced, "SESSION_REPLACED"),
            (AuthError::RefreshTokenReused, "REFRESH_TOKEN_REUSED"),
        ] {
            let s = Status::from(e);
            assert_eq!(s.code(), Code::Unauthenticated);
            assert_eq!(info(&s).reason, reason);
        }
    }
}
