//! How an accept loop waits after a failed accept, and how often it says so. Without a pause, an
//! error that persists (EMFILE: no descriptor left) makes the loop spin a core; without a rate
//! limit, logging each failure floods the log.

use std::time::{Duration, Instant};

/// First pause after a failed accept; doubled per failure in a row.
const FIRST: Duration = Duration::from_millis(5);
/// Longest pause: a freed descriptor is picked up within a second.
const LONGEST: Duration = Duration::from_secs(1);

/// Exponential pause between failed accepts, reset by a success.
#[derive(Debug, Default)]
pub struct Backoff {
    pause: Option<Duration>,
    failures: u64,
    log: Every,
}

impl Backoff {
    /// Records a failure and returns how long to wait before the next accept; logs (at most
    /// once per [`Every`] period) what failed and how often.
    pub fn failed(&mut self, error: &std::io::Error) -> Duration {
        let pause = self.pause.map_or(FIRST, |p| (p * 2).min(LONGEST));
        self.pause = Some(pause);
        self.failures += 1;
        if self.log.due() {
            tracing::warn!(%error, failures = self.failures, retry_in = ?pause, "accepting a connection failed; backing off");
        }
        pause
    }

    /// Records a success: the next failure starts again from the first pause.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
        }
        *self = Backoff::default();
    }
}

/// A rate limit for a log line: due the first time, then at most once per period.
#[derive(Debug)]
pub struct Every {
    period: Duration,
    last: Option<Instant>,
}

impl Every {
    pub fn new(period: Duration) -> Every {
        Every { period, last: None }
    }

    /// Whether to log now; if so, the next one is a period away.
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < self.period) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

impl Default for Every {
    /// Ten seconds: often enough to see that a condition persists.
    fn default() -> Every {
        Every::new(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_second_and_a_success_resets_them() {
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let mut b = Backoff::default();
        let pauses: Vec<_> = (0..10).map(|_| b.failed(&e).as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(&e), FIRST);
    }

    #[test]
    fn a_rate_limited_line_is_due_once_per_period() {
        let mut every = Every::new(Duration::from_secs(3600));
        assert!(every.due());
        assert!(!every.due());
        let mut always = Every::new(Duration::ZERO);
        assert!(always.due() && always.due());
    }
}
