//! Sessions and their timeline.

use super::{Device, Millis};

/// Why a session ended (CONTRACT.md, Refresh and sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The user logged out of this session.
    Logout,
    /// The user logged out of every session.
    LogoutAll,
    /// Another login pushed it out.
    Replaced,
    /// A rotated refresh token came back after the grace window.
    RefreshReused,
    /// An operator revoked the user.
    RevokedByOperator,
    /// Its refresh token expired.
    Expired,
}

impl EndReason {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Logout => "logout",
            Self::LogoutAll => "logout_all",
            Self::Replaced => "replaced",
            Self::RefreshReused => "refresh_reused",
            Self::RevokedByOperator => "revoked_by_operator",
            Self::Expired => "expired",
        }
    }

    /// Reads a stored name back.
    pub fn from_stored(s: &str) -> Option<Self> {
        Some(match s {
            "logout" => Self::Logout,
            "logout_all" => Self::LogoutAll,
            "replaced" => Self::Replaced,
            "refresh_reused" => Self::RefreshReused,
            "revoked_by_operator" => Self::RevokedByOperator,
            "expired" => Self::Expired,
            _ => return None,
        })
    }
}

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Opened by a login.
    Login,
    /// Refresh token rotated.
    Refresh,
    /// Ended.
    End,
}

impl EventKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::Refresh => "refresh",
            Self::End => "end",
        }
    }

    /// Reads a stored name back.
    pub fn from_stored(s: &str) -> Option<Self> {
        Some(match s {
            "login" => Self::Login,
            "refresh" => Self::Refresh,
            "end" => Self::End,
            _ => return None,
        })
    }
}

/// A live session as listed to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Its id.
    pub id: String,
    /// Where it was opened.
    pub device: Device,
    /// When it was opened.
    pub created_at: Millis,
    /// When it was last used (moves at most once a minute).
    pub last_active_at: Millis,
}

/// One entry of a user's session timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    /// Orders events; larger is newer.
    pub id: i64,
    /// The session concerned.
    pub session_id: String,
    /// What happened.
    pub kind: EventKind,
    /// For an end: why.
    pub reason: Option<EndReason>,
    /// The session's device.
    pub device: Device,
    /// For a replacement: the session that replaced it.
    pub replaced_by_session: Option<String>,
    /// For a replacement: the device id of that login.
    pub replaced_by_device: Option<String>,
    /// When.
    pub at: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_round_trip() {
        for r in [
            EndReason::Logout,
            EndReason::LogoutAll,
            EndReason::Replaced,
            EndReason::RefreshReused,
            EndReason::RevokedByOperator,
            EndReason::Expired,
        ] {
            assert_eq!(EndReason::from_stored(r.as_str()), Some(r));
        }
        for k in [EventKind::Login, EventKind::Refresh, EventKind::End] {
            assert_eq!(EventKind::from_stored(k.as_str()), Some(k));
        }
        assert_eq!(EndReason::from_stored("nope"), None);
    }
}
