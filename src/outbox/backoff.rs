//! A delay that doubles after each failure: the one backoff of the outbox,
//! for the probes of a destination that is down and the store's recoveries
//! alike.

use std::time::Duration;

/// A delay from `first`, doubled after each failure, never over `longest`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    first: Duration,
    longest: Duration,
    delay: Duration,
}

impl Backoff {
    /// A backoff at `first` (or `longest`, if shorter).
    pub(crate) fn new(first: Duration, longest: Duration) -> Backoff {
        Backoff {
            first,
            longest,
            delay: first.min(longest),
        }
    }

    /// A backoff resumed at `delay`, kept within `first` and `longest`.
    pub(crate) fn resume(first: Duration, longest: Duration, delay: Duration) -> Backoff {
        Backoff {
            delay: delay.max(first).min(longest),
            ..Backoff::new(first, longest)
        }
    }

    /// The delay to wait now.
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    /// After a failure: the delay doubled, at least `first`, at most
    /// `longest`.
    pub(crate) fn failed(&mut self) {
        self.delay = self
            .delay
            .saturating_mul(2)
            .max(self.first)
            .min(self.longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_first_up_to_the_longest() {
        let second = Duration::from_secs(1);
        let mut probe = Backoff::new(second, 5 * second);
        let mut delays = Vec::new();
        for _ in 0..5 {
            delays.push(probe.delay().as_secs());
            probe.failed();
        }
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        let resumed = Backoff::resume(second, 5 * second, 3 * second);
        assert_eq!(resumed.delay(), 3 * second);
        assert_eq!(
            Backoff::resume(second, 5 * second, 9 * second).delay(),
            5 * second
        );
        let mut short = Backoff::new(second, second / 2);
        assert_eq!(short.delay(), second / 2);
        short.failed();
        assert_eq!(short.delay(), second / 2);
    }
}
