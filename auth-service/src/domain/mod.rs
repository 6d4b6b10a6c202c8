//! Newtypes and rules: what a valid WeChat code, token, device and session policy are.
//! Built only through `parse`, so the rest of the service never handles an unchecked value.

mod code;
mod device;
mod policy;
mod rate;
mod session;
mod token;

pub use code::WechatCode;
pub use device::Device;
pub use policy::{LiveSession, SessionPolicy, plan_evictions};
pub use rate::Rate;
pub use session::{EndReason, EventKind, SessionEvent, SessionInfo};
pub use token::{Token, TokenKind};

/// A rule a value broke: which field, and what is wrong, in words for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field at fault, as the caller named it (`code`, `device.id`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Milliseconds since the Unix epoch: how every instant is stored and compared.
pub type Millis = i64;

/// The current time in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: std::time::Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
