//! Instants: milliseconds since the Unix epoch inside, RFC 3339 UTC on the wire.

use std::time::{SystemTime, UNIX_EPOCH};

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
    Rfc3339(ms).format().as_str().to_owned()
}

/// An instant that shows (and serializes) as RFC 3339 UTC with milliseconds,
/// `2026-11-24T23:59:01.123Z`; serialized straight into the output as one string, without a
/// `String` of its own (a page of notes has forty of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub Millis);

/// The first millisecond of the year 10000: the four-digit years end before it.
const YEAR_10000: Millis = 253_402_300_800_000;

/// A formatted instant: always 24 ASCII bytes.
struct Formatted([u8; 24]);

impl Formatted {
    fn as_str(&self) -> &str {
        // Only ASCII digits and `-T:.Z` are ever written.
        std::str::from_utf8(&self.0).unwrap_or("1970-01-01T00:00:00.000Z")
    }
}

impl Rfc3339 {
    /// The 24 bytes, built by hand: this runs for every timestamp of every answer, and
    /// going through `fmt` (humantime's `Display`, then serde_json's escaping adapter for
    /// each piece written) cost several times the arithmetic. Instants before 1970 show as
    /// its first millisecond and those past the year 9999 as its last (humantime's format
    /// failed there, and a failed `Display` panics in `to_string`).
    fn format(self) -> Formatted {
        let ms = self.0.clamp(0, YEAR_10000 - 1);
        // Fewer than 3,000,000 days and 86,400,000 ms a day: both fit a u32.
        let days = u32::try_from(ms / 86_400_000).unwrap_or(0);
        let ms_of_day = u32::try_from(ms % 86_400_000).unwrap_or(0);
        let (year, month, day) = civil_from_days(days);
        let secs = ms_of_day / 1000;
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut pair = |at: usize, n: u32| {
            out[at] = digit(n / 10);
            out[at + 1] = digit(n);
        };
        pair(0, year / 100);
        pair(2, year % 100);
        pair(5, month);
        pair(8, day);
        pair(11, secs / 3600);
        pair(14, secs / 60 % 60);
        pair(17, secs % 60);
        pair(21, ms_of_day % 100);
        out[20] = digit(ms_of_day / 100);
        Formatted(out)
    }
}

/// The last decimal digit of `n`, in ASCII.
fn digit(n: u32) -> u8 {
    b"0123456789"[usize::try_from(n % 10).unwrap_or(0)]
}

/// Year, month (1-12) and day (1-31) of `days` after 1970-01-01: Howard Hinnant's
/// `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>), on eras of
/// 400 years counted from 0000-03-01.
fn civil_from_days(days: u32) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], from March
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u32::from(month <= 2);
    (year, month, day)
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.format().as_str())
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.format().as_str())
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

    /// humantime's formatting, which this one replaced.
    fn humantime(ms: Millis) -> String {
        let at = UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).expect("ms"));
        humantime::format_rfc3339_millis(at).to_string()
    }

    #[test]
    fn matches_humantime_on_every_day_and_across_the_range() {
        const DAY: Millis = 86_400_000;
        // Every day to 2200 (each leap day and year's end among them), at a time of day
        // that moves; then every 7th day to the year 9999.
        let mut days: Vec<Millis> = (0..84_000).collect();
        days.extend((84_000..YEAR_10000 / DAY).step_by(7));
        for (i, day) in days.into_iter().enumerate() {
            let ms = day * DAY + (i64::try_from(i).expect("i") * 7_919_347) % DAY;
            assert_eq!(rfc3339(ms), humantime(ms), "{ms}");
        }
        // Scattered instants (a fixed linear congruential walk).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..100_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let ms = i64::try_from(x >> 1).expect("63 bits") % YEAR_10000;
            assert_eq!(rfc3339(ms), humantime(ms), "{ms}");
        }
        for ms in [
            0,
            999,
            1000,
            DAY - 1,
            DAY,
            951_782_400_000,
            4_107_542_400_000,
        ] {
            assert_eq!(rfc3339(ms), humantime(ms), "{ms}");
        }
        assert_eq!(rfc3339(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn clamps_what_four_digit_years_cannot_show() {
        assert_eq!(rfc3339(YEAR_10000 - 1), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(YEAR_10000), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(Millis::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(-1), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(Millis::MIN), "1970-01-01T00:00:00.000Z");
        assert_eq!(Rfc3339(Millis::MAX).to_string(), "9999-12-31T23:59:59.999Z");
    }
}
