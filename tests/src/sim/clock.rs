//! The simulator's clock: real time since the world was created, plus whatever the control API
//! added. Code and token expiry, the quotas and the watermarks' timestamps read it, so tests can
//! move time forward instead of waiting.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A point on the simulator's clock: how long after the world's creation it is.
pub(crate) type SimTime = Duration;

#[derive(Debug)]
pub(crate) struct Clock {
    started: Instant,
    /// The wall-clock time at `started`, as a duration since the Unix epoch.
    started_unix: Duration,
    offset: Duration,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            offset: Duration::ZERO,
        }
    }
}

impl Clock {
    pub(crate) fn now(&self) -> SimTime {
        self.started.elapsed().saturating_add(self.offset)
    }

    /// `at` as Unix seconds: the wall clock when the world was created, plus `at`.
    pub(crate) fn unix_seconds(&self, at: SimTime) -> u64 {
        self.started_unix.saturating_add(at).as_secs()
    }

    /// Now as Unix seconds (the wall clock plus the advance), as watermarks carry it.
    pub(crate) fn unix_now(&self) -> u64 {
        self.unix_seconds(self.now())
    }

    /// Moves the clock forward by `by`; answers the total advance so far.
    pub(crate) fn advance(&mut self, by: Duration) -> Duration {
        self.offset = self.offset.saturating_add(by);
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_now_and_adds_up() {
        let mut clock = Clock::default();
        let before = clock.now();
        assert_eq!(
            clock.advance(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            clock.advance(Duration::from_secs(31)),
            Duration::from_secs(61)
        );
        assert!(clock.now() >= before + Duration::from_secs(61));
    }

    #[test]
    fn unix_time_follows_the_advance() {
        let mut clock = Clock::default();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        assert!(clock.unix_now().abs_diff(wall) <= 1);
        clock.advance(Duration::from_secs(3600));
        assert!(clock.unix_now().abs_diff(wall + 3600) <= 1);
        assert_eq!(
            clock.unix_seconds(Duration::from_secs(10)) + 5,
            clock.unix_seconds(Duration::from_secs(15))
        );
    }
}
