//! Instants: milliseconds since the Unix epoch inside, RFC 3339 UTC on the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Now, in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `2026-11-24T23:59:01.123Z`.
pub fn rfc3339(ms: Millis) -> String {
    Rfc3339(ms).to_string()
}

/// An instant that shows (and serializes) as RFC 3339 UTC with milliseconds,
/// `2026-11-24T23:59:01.123Z`; serialized straight into the output, without a `String` of
/// its own (a page of notes has forty of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub Millis);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(self.0).unwrap_or(0));
        humantime::format_rfc3339_millis(at).fmt(f)
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_564_265_123), "2026-11-24T23:51:05.123Z");
    }

    #[test]
    fn serializes_as_the_same_string() {
        let json = serde_json::to_string(&[Rfc3339(0), Rfc3339(1_795_564_265_123)]).expect("json");
        assert_eq!(
            json,
            r#"["1970-01-01T00:00:00.000Z","2026-11-24T23:51:05.123Z"]"#
        );
    }
}
