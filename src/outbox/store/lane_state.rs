//! A destination's shared state, as the store keeps it for every dispatcher
//! on it: up or down (since when), the pause it asked for, when its next
//! probe is due and who holds it, and its last failure.
//!
//! The replay schedules each destination from it (see `outbox::lanes`); the
//! foreground records how its deliveries went in it too. The redb store
//! keeps it in memory, for the one process that holds the file, and keeps
//! in the file only when each destination went down and why, so that a
//! restart goes on counting `give_up_after` from there; the PostgreSQL
//! store keeps it in a table of the queue, so that every dispatcher honours
//! one probe at a time and a pause given to any of them.
//! A destination's state lives only while it has stored records: one with
//! none is forgotten, so a receiver cannot make a store keep state for an
//! origin nothing is stored for.

use std::time::Duration;

/// The first wait before a destination that went down is probed (or the
/// replay interval, if shorter); doubled after each failed probe, up to the
/// replay interval.
#[cfg(feature = "outbox")]
pub(crate) const FIRST_PROBE_DELAY: Duration = Duration::from_secs(1);

/// What a store knows of one destination, as of the moment it was read:
/// the times in it are durations from then, so that the clocks of the
/// processes sharing a store need not agree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LaneState {
    /// How long it has been down: failing, without a success since its first
    /// failure. `None` while it is up.
    pub(crate) down_for: Option<Duration>,
    /// What is left of the pause it asked for (`Retry-After`).
    pub(crate) paused_for: Option<Duration>,
    /// While it is down: the wait before its next probe is due (zero: due).
    pub(crate) probe_in: Duration,
    /// While it is down: the delay that a failed probe doubles.
    pub(crate) probe_delay: Duration,
    /// A probe of it is under way, held by another dispatcher.
    pub(crate) probed_elsewhere: bool,
}

impl LaneState {
    /// Whether it is down.
    pub(crate) fn is_down(&self) -> bool {
        self.down_for.is_some()
    }
}

/// How an attempt to a destination went, for its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LaneEvent {
    /// The destination answered (a success, or a refusal for good): it is
    /// up. A probe held here is released.
    Answered {
        /// The pause it asked for with its answer, if any.
        pause: Option<Duration>,
    },
    /// A transient failure: it is down, since now if it was up. Its next
    /// probe is due after [`FIRST_PROBE_DELAY`] if it was up, after its
    /// delay doubled if this was its probe, and as it was otherwise. A probe
    /// held here is released.
    Failed {
        /// What went wrong, cleaned.
        failure: String,
        /// The pause it asked for with its answer, if any.
        pause: Option<Duration>,
        /// Whether the attempt was the destination's probe.
        probe: bool,
    },
}

/// The probe delay after a failure, given the state before it: the first
/// after the destination went down, doubled after a failed probe, kept
/// otherwise; never over `longest` (the replay interval).
#[cfg(feature = "outbox")]
pub(crate) fn next_probe_delay(before: &LaneState, probe: bool, longest: Duration) -> Duration {
    // Never `clamp`: the replay interval may be shorter than the first.
    let kept = |delay: Duration| delay.max(FIRST_PROBE_DELAY).min(longest);
    if !before.is_down() {
        return kept(FIRST_PROBE_DELAY);
    }
    let resumed = kept(before.probe_delay);
    match probe {
        true => kept(resumed.saturating_mul(2)),
        false => resumed,
    }
}

/// The wait before a probe after `delay`: a random part of it (full
/// jitter), so that dispatchers and destinations that went down together do
/// not all probe together.
#[cfg(feature = "outbox")]
pub(crate) fn probe_wait(delay: Duration) -> Duration {
    crate::Jitter::full().apply(delay)
}

#[cfg(all(test, feature = "outbox"))]
mod tests {
    use super::*;

    #[test]
    fn probe_delays_start_at_the_first_double_after_failed_probes_up_to_the_longest() {
        let longest = Duration::from_secs(5);
        let mut state = LaneState::default();
        let mut delays = Vec::new();
        for probe in [false, true, true, true, true, false] {
            state.probe_delay = next_probe_delay(&state, probe, longest);
            state.down_for = Some(Duration::ZERO);
            delays.push(state.probe_delay.as_secs());
        }
        // Down (1), probes failed (2, 4, 5, 5), a failure of another
        // attempt keeps the delay.
        assert_eq!(delays, [1, 2, 4, 5, 5, 5]);
        let short = Duration::from_millis(500);
        assert_eq!(next_probe_delay(&LaneState::default(), false, short), short);
        // A replay interval under the first delay bounds every probe.
        let down = LaneState {
            down_for: Some(Duration::ZERO),
            probe_delay: short,
            ..LaneState::default()
        };
        assert_eq!(next_probe_delay(&down, true, short), short);
        // A delay read back out of bounds (a store shared with another
        // configuration) is brought within them.
        let far = LaneState {
            probe_delay: Duration::from_secs(3600),
            ..down.clone()
        };
        assert_eq!(next_probe_delay(&far, false, longest), longest);
        let none = LaneState {
            probe_delay: Duration::ZERO,
            ..down
        };
        assert_eq!(
            next_probe_delay(&none, true, longest),
            Duration::from_secs(2)
        );
    }
}
