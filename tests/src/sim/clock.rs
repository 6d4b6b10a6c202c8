//! The simulator's clock: real time since the world was created, plus whatever the control API
//! added. Code expiry and the per-minute quota read it, so tests can move time forward instead of
//! waiting.

use std::time::{Duration, Instant};

/// A point on the simulator's clock: how long after the world's creation it is.
pub(crate) type SimTime = Duration;

#[derive(Debug)]
pub(crate) struct Clock {
    started: Instant,
    offset: Duration,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            offset: Duration::ZERO,
        }
    }
}

impl Clock {
    pub(crate) fn now(&self) -> SimTime {
        self.started.elapsed().saturating_add(self.offset)
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
}
