//! `AUTH_LOGIN_RATE`: how many logins one client IP may make per window.

use std::time::Duration;

use super::Invalid;

/// A limit of `count` events per `window`, written `N/sec`, `N/min` or `N/hour`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRate {
    /// Events allowed in one window.
    pub count: u32,
    /// The window's length.
    pub window: Duration,
}

impl LoginRate {
    /// Parses `600/min`, `10/s`, `5000/hour` and the like.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let err = || {
            Invalid::new(
                "AUTH_LOGIN_RATE",
                "must look like 600/min (per s, min or hour)",
            )
        };
        let (count, unit) = raw.trim().split_once('/').ok_or_else(err)?;
        let count: u32 = count.trim().parse().map_err(|_| err())?;
        if count == 0 {
            return Err(Invalid::new("AUTH_LOGIN_RATE", "must allow at least 1"));
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
            LoginRate::parse("600/min"),
            Ok(LoginRate {
                count: 600,
                window: Duration::from_secs(60)
            })
        );
        assert_eq!(
            LoginRate::parse("10/s").map(|r| r.window),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(LoginRate::parse("5/hour").map(|r| r.count), Ok(5));
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["", "600", "x/min", "0/min", "10/day", "-1/min"] {
            assert!(LoginRate::parse(bad).is_err(), "{bad}");
        }
    }
}
