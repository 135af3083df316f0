//! Evenly spaced starts at a rate: at most a given number a second, one per
//! gap, on a grid that the timer's delays do not shift. The replay's pace
//! towards each destination, and the early release of parked retries.

use std::time::Duration;

use tokio::time::Instant;

/// tokio's timer resolution.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Spaces starts evenly: one per `gap`, on a grid, so that at most `per_second`
/// start in a second.
pub(crate) struct Pace {
    gap: Duration,
    next: Instant,
}

impl Pace {
    /// A pace of `per_second` starts a second (at least one); the first may
    /// go at once.
    pub(crate) fn new(per_second: u32) -> Pace {
        // Rounded up, so that the rate is never exceeded.
        let gap = 1_000_000_000u64.div_ceil(u64::from(per_second.max(1)));
        Pace {
            gap: Duration::from_nanos(gap),
            next: Instant::now(),
        }
    }

    /// When the next start may go: on its point of the grid, or, at a rate
    /// above a start a tick, a tick early. The timer rounds a sleep up to its
    /// next tick, and wakes later still on a busy runtime: a start due within
    /// the tick goes now, or such a rate would be capped near one start a
    /// millisecond. A slower rate keeps to its grid exactly (the grid rule of
    /// [`start`](Pace::start) makes up for a late wake-up).
    pub(crate) fn next_start(&self) -> Instant {
        match self.gap < TIMER_TICK {
            // Never before the clock's start, however close to it.
            true => self.next.checked_sub(TIMER_TICK).unwrap_or(self.next),
            false => self.next,
        }
    }

    /// Whether a start may go now.
    pub(crate) fn is_due(&self) -> bool {
        self.next_start() <= Instant::now()
    }

    /// Records a start, now.
    pub(crate) fn start(&mut self) {
        let now = Instant::now();
        // Late by less than a gap (or a tick, at a rate above a start a
        // tick): keep to the grid, so that timer delays do not add up.
        // Idle longer: from now, with no burst to catch up.
        let from = match now < self.next + self.gap.max(TIMER_TICK) {
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
    async fn at_a_rate_above_a_start_a_tick_a_start_due_within_the_tick_goes_now() {
        let mut fast = Pace::new(10_000);
        fast.start();
        // The next is 100 us away: due now, with no sleep rounded up to
        // the next tick.
        assert!(fast.is_due());
        for _ in 0..10 {
            fast.start();
        }
        // Eleven starts go within a tick: the next waits.
        assert!(!fast.is_due());
        // A slower rate waits for its point of the grid.
        let mut slow = Pace::new(500);
        slow.start();
        assert!(!slow.is_due());
        assert_eq!(slow.next_start() - Instant::now(), Duration::from_millis(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_rate_spaces_its_starts() {
        let mut pace = Pace::new(100);
        let start = Instant::now();
        for _ in 0..11 {
            pace.wait().await;
        }
        // The first at once, then one every 10 ms, each on its point of the
        // grid.
        let elapsed = start.elapsed();
        assert_eq!(elapsed, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_longer_than_a_gap_it_starts_from_now_with_no_burst() {
        let mut pace = Pace::new(10);
        pace.wait().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let idle = Instant::now();
        pace.wait().await;
        pace.wait().await;
        assert_eq!(idle.elapsed(), Duration::from_millis(100));
    }

    #[test]
    fn a_gap_is_rounded_up_so_the_rate_is_never_exceeded() {
        assert_eq!(Pace::new(3).gap, Duration::from_nanos(333_333_334));
    }
}
