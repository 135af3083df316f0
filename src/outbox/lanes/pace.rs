//! A destination's pace: the replay's requests to it spaced evenly, at most
//! the replay rate a second.

use std::time::Duration;

use tokio::time::Instant;

/// tokio's timer resolution.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Spaces the replay's requests evenly: at most one per `gap`, so at most the
/// replay rate start in any one second.
pub(super) struct Pace {
    gap: Duration,
    next: Instant,
}

impl Pace {
    pub(super) fn new(per_second: u32) -> Pace {
        Pace {
            gap: Duration::from_secs(1) / per_second.max(1),
            next: Instant::now(),
        }
    }

    /// When the next start may go: a tick early, for a start due within
    /// the timer's tick goes now (the timer rounds a sleep up to its next
    /// tick, which would cap any rate near one start a millisecond).
    pub(super) fn next_start(&self) -> Instant {
        self.next - TIMER_TICK
    }

    /// Whether a start may go now.
    pub(super) fn is_due(&self) -> bool {
        self.next_start() <= Instant::now()
    }

    /// Records a start, now.
    pub(super) fn start(&mut self) {
        let now = Instant::now();
        // Late by less than a gap: keep to the grid, so that timer delays do
        // not add up; idle longer: from now, with no burst to catch up.
        let from = match now < self.next + self.gap {
            true => self.next,
            false => now,
        };
        self.next = from + self.gap;
    }

    /// Waits for the next start, and records it.
    #[cfg(test)]
    async fn wait(&mut self) {
        tokio::time::sleep_until(self.next_start()).await;
        self.start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_rate_above_the_timers_tick_is_kept_not_capped_at_a_start_a_millisecond() {
        let mut pace = Pace::new(1_000_000);
        let start = Instant::now();
        for _ in 0..10_000 {
            pace.wait().await;
        }
        // 10,000 starts at a million a second: 10 ms, not 10 s.
        assert!(
            start.elapsed() <= Duration::from_millis(11),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_rate_spaces_its_starts() {
        let mut pace = Pace::new(100);
        let start = Instant::now();
        for _ in 0..11 {
            pace.wait().await;
        }
        // The first at once, then one every 10 ms, each at most a timer
        // tick early.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(99) && elapsed <= Duration::from_millis(100),
            "{elapsed:?}"
        );
    }
}
