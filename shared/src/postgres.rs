//! The size of a service's PostgreSQL pool (`AUTH_DATABASE_MAX_CONNECTIONS`,
//! `API_DATABASE_MAX_CONNECTIONS`): each replica opens at most this many connections, so
//! that replicas times this stays within the server's `max_connections` (deploy/README.md
//! counts the budget at the autoscalers' bounds).

/// Connections per replica when the setting is unset.
pub const DEFAULT_POOL_SIZE: u32 = 10;

/// The most a setting may ask for: a typo such as `10000` is refused at start-up rather than
/// found when PostgreSQL refuses connections under load.
pub const MAX_POOL_SIZE: u32 = 1000;

/// The pool size `value` asks for: [`DEFAULT_POOL_SIZE`] when unset, else a whole number from 1
/// to [`MAX_POOL_SIZE`]; the error is the problem, for the caller to name the setting.
pub fn pool_size(value: Option<&str>) -> Result<u32, &'static str> {
    let Some(value) = value else {
        return Ok(DEFAULT_POOL_SIZE);
    };
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_POOL_SIZE).contains(n))
        .ok_or("must be a whole number from 1 to 1000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_is_the_default_and_only_1_to_1000_is_taken() {
        assert_eq!(pool_size(None), Ok(DEFAULT_POOL_SIZE));
        assert_eq!(pool_size(Some("1")), Ok(1));
        assert_eq!(pool_size(Some(" 40 ")), Ok(40));
        assert_eq!(pool_size(Some("1000")), Ok(1000));
        for bad in ["0", "1001", "-3", "ten", "", "2.5"] {
            assert!(pool_size(Some(bad)).is_err(), "{bad:?}");
        }
    }
}
