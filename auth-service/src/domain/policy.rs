//! Session policy: which live sessions a new login pushes out.

use super::{Invalid, Millis};

/// `AUTH_SESSION_POLICY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPolicy {
    /// At most `max` live sessions per user; the oldest are pushed out.
    Multi {
        /// `AUTH_MAX_SESSIONS`, at least 1.
        max: u32,
    },
    /// One live session per user: a new login pushes out all others.
    Single,
}

impl SessionPolicy {
    /// Builds the policy from its two settings.
    pub fn parse(policy: &str, max_sessions: u32) -> Result<Self, Invalid> {
        match policy {
            "multi" if max_sessions >= 1 => Ok(Self::Multi { max: max_sessions }),
            "multi" => Err(Invalid::new("AUTH_MAX_SESSIONS", "must be at least 1")),
            "single" => Ok(Self::Single),
            _ => Err(Invalid::new(
                "AUTH_SESSION_POLICY",
                "must be `multi` or `single`",
            )),
        }
    }
}

/// What the policy needs to know of a user's live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    /// The session's id.
    pub id: String,
    /// Its device id, when the login gave one.
    pub device_id: Option<String>,
    /// When it was opened.
    pub created_at: Millis,
}

/// The sessions a new login from `device_id` must end under `policy`, given the user's
/// live sessions. A live session with the same device id is always replaced (it takes no
/// second place); then, under `multi`, the oldest go until the new one fits.
pub fn plan_evictions(
    policy: SessionPolicy,
    live: &[LiveSession],
    device_id: Option<&str>,
) -> Vec<String> {
    let same_device = |s: &LiveSession| device_id.is_some() && s.device_id.as_deref() == device_id;
    match policy {
        SessionPolicy::Single => live.iter().map(|s| s.id.clone()).collect(),
        SessionPolicy::Multi { max } => {
            let mut out: Vec<String> = live
                .iter()
                .filter(|s| same_device(s))
                .map(|s| s.id.clone())
                .collect();
            let mut rest: Vec<&LiveSession> = live.iter().filter(|s| !same_device(s)).collect();
            rest.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            // Room for the new session: keep at most max - 1 of the others.
            let keep = usize::try_from(max.saturating_sub(1)).unwrap_or(usize::MAX);
            let excess = rest.len().saturating_sub(keep);
            out.extend(rest.iter().take(excess).map(|s| s.id.clone()));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, device: Option<&str>, at: Millis) -> LiveSession {
        LiveSession {
            id: id.into(),
            device_id: device.map(Into::into),
            created_at: at,
        }
    }

    #[test]
    fn parses_the_settings() {
        assert_eq!(
            SessionPolicy::parse("multi", 5),
            Ok(SessionPolicy::Multi { max: 5 })
        );
        assert_eq!(SessionPolicy::parse("single", 0), Ok(SessionPolicy::Single));
        assert!(SessionPolicy::parse("multi", 0).is_err());
        assert!(SessionPolicy::parse("many", 5).is_err());
    }

    #[test]
    fn multi_keeps_room_and_pushes_out_the_oldest() {
        let live = [s("b", None, 2), s("a", None, 1), s("c", None, 3)];
        let p = SessionPolicy::Multi { max: 3 };
        assert_eq!(plan_evictions(p, &live, None), vec!["a".to_string()]);
        let p = SessionPolicy::Multi { max: 2 };
        assert_eq!(plan_evictions(p, &live, None), vec!["a", "b"]);
        let p = SessionPolicy::Multi { max: 4 };
        assert!(plan_evictions(p, &live, None).is_empty());
    }

    #[test]
    fn same_device_is_replaced_not_counted() {
        let live = [s("a", Some("d1"), 1), s("b", Some("d2"), 2)];
        let p = SessionPolicy::Multi { max: 2 };
        assert_eq!(plan_evictions(p, &live, Some("d2")), vec!["b"]);
        // Without a device id nothing matches by device.
        assert_eq!(plan_evictions(p, &live, None), vec!["a"]);
    }

    #[test]
    fn single_ends_every_other_session() {
        let live = [s("a", None, 1), s("b", Some("d"), 2)];
        assert_eq!(
            plan_evictions(SessionPolicy::Single, &live, Some("x")),
            vec!["a", "b"]
        );
    }
}
