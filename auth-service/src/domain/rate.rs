//! Rate limits: `AUTH_LOGIN_RATE` (logins per client IP), `AUTH_REFRESH_RATE` (rotations
//! per session) and `AUTH_PHONE_RATE` (phone-code exchanges per user), each so many events
//! per window.

use std::time::Duration;

use super::Invalid;

/// A limit of `count` events per `window`, written `N/sec`, `N/min` or `N/hour`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed in one window.
    pub count: u32,
    /// The window's length.
    pub window: Duration,
}

impl Rate {
    /// Parses `600/min`, `10/s`, `5000/hour` and the like, the value of `setting`.
    pub fn parse(setting: &'static str, raw: &str) -> Result<Self, Invalid> {
        let err = || Invalid::new(setting, "must look like 600/min (per s, min or hour)");
        let (count, unit) = raw.trim().split_once('/').ok_or_else(err)?;
        let count: u32 = count.trim().parse().map_err(|_| err())?;
        if count == 0 {
            return Err(Invalid::new(setting, "must allow at least 1"));
        }
        let window = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(err()),
        };
        Ok(Self { count, window })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(
            Rate::parse("AUTH_LOGIN_RATE", "600/min"),
            Ok(Rate {
                count: 600,
                window: Duration::from_secs(60)
            })
        );
        assert_eq!(
            Rate::parse("AUTH_LOGIN_RATE", "10/s").map(|r| r.window),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            Rate::parse("AUTH_PHONE_RATE", "5/hour").map(|r| r.count),
            Ok(5)
        );
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["", "600", "x/min", "0/min", "10/day", "-1/min"] {
            assert_eq!(
                Rate::parse("AUTH_PHONE_RATE", bad).map_err(|e| e.field),
                Err("AUTH_PHONE_RATE"),
                "{bad}"
            );
        }
    }
}
