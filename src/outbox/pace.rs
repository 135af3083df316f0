//! The replay's pace: its requests spaced evenly, at most the replay rate a
//! second.

use std::time::Duration;

use tokio::time::{sleep_until, Instant};

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

    /// Waits for the next start.
    pub(super) async fn wait(&mut self) {
        sleep_until(self.next).await;
        let now = Instant::now();
        // Late by less than a gap: keep to the grid, so that timer delays do
        // not add up; idle longer: from now, with no burst to catch up.
        let from = match now < self.next + self.gap {
            true => self.next,
            false => now,
        };
        self.next = from + self.gap;
    }
}
