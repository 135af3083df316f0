//! The file's destinations, in memory: its pending records by destination,
//! oldest first, and each destination's state. One process holds the file,
//! so memory is where the state of its one replay lives. That a destination
//! is down, since when, is also kept in the file, and restored when it is
//! opened again; the rest (its pause, its probe's backoff) starts afresh.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::super::lane_state::{
    next_probe_delay, probe_wait, LaneEvent, LaneState, FIRST_PROBE_DELAY,
};
use crate::outbox::Destination;

/// How long a probe taken is held at most: far longer than an attempt
/// takes.
const PROBE_HOLD: Duration = Duration::from_secs(300);

/// The pending records by destination, and the state of each destination
/// with pending records.
#[derive(Default)]
pub(super) struct Lanes {
    /// The pending records by origin: their keys by sequence number.
    pending: HashMap<String, BTreeMap<u64, String>>,
    /// The origin of each pending record.
    origin_of: HashMap<u64, String>,
    /// The state of destinations that are down or paused; one up and
    /// unpaused has none.
    state: HashMap<String, Kept>,
    /// The longest probe delay: the replay interval.
    longest_probe: Duration,
}

/// A destination's state, in this process's clock.
#[derive(Debug, Clone)]
struct Kept {
    down_since: Option<(Instant, SystemTime)>,
    paused_until: Option<Instant>,
    probe_at: Instant,
    probe_delay: Duration,
    /// Until when the probe taken is held: a replay that stopped holding it
    /// (it panicked) does not hold it for ever.
    probing_until: Option<Instant>,
    last_failure: Option<String>,
}

impl Kept {
    fn up() -> Kept {
        Kept {
            down_since: None,
            paused_until: None,
            probe_at: Instant::now(),
            probe_delay: Duration::ZERO,
            probing_until: None,
            last_failure: None,
        }
    }

    fn view(&self) -> LaneState {
        let now = Instant::now();
        LaneState {
            down_for: self.down_since.map(|(since, _)| now - since),
            paused_for: self
                .paused_until
                .filter(|until| *until > now)
                .map(|until| until - now),
            probe_in: match self.down_since {
                Some(_) => self.probe_at.saturating_duration_since(now),
                None => Duration::ZERO,
            },
            probe_delay: self.probe_delay,
            probed_elsewhere: false,
        }
    }

    /// Up, with no pause ahead: nothing worth keeping.
    fn is_plain(&self) -> bool {
        self.down_since.is_none()
            && self
                .paused_until
                .is_none_or(|until| until <= Instant::now())
    }
}

impl Lanes {
    pub(super) fn new(longest_probe: Duration) -> Lanes {
        Lanes {
            longest_probe,
            ..Lanes::default()
        }
    }

    pub(super) fn set_longest_probe(&mut self, longest: Duration) {
        self.longest_probe = longest;
    }

    /// Records `seq`, under `key`, as pending to `origin` (in its place, if
    /// it was pending to another).
    pub(super) fn add(&mut self, seq: u64, origin: String, key: String) {
        self.remove(seq);
        self.pending
            .entry(origin.clone())
            .or_default()
            .insert(seq, key);
        self.origin_of.insert(seq, origin);
    }

    /// `seq` is no longer pending; a destination left with nothing pending
    /// is forgotten.
    pub(super) fn remove(&mut self, seq: u64) {
        let Some(origin) = self.origin_of.remove(&seq) else {
            return;
        };
        if let Some(records) = self.pending.get_mut(&origin) {
            records.remove(&seq);
            if records.is_empty() {
                self.pending.remove(&origin);
                self.state.remove(&origin);
            }
        }
    }

    /// Whether any record is pending to `origin`.
    pub(super) fn holds(&self, origin: &str) -> bool {
        self.pending.contains_key(origin)
    }

    /// The pending records to `origin`, oldest first.
    pub(super) fn pending_to(&self, origin: &str) -> Vec<u64> {
        self.pending
            .get(origin)
            .map(|records| records.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Up to `limit` pending records to `origin` whose keys `free` takes,
    /// oldest first: their sequence numbers and keys.
    pub(super) fn take(
        &self,
        origin: &str,
        limit: usize,
        mut free: impl FnMut(&str) -> bool,
    ) -> Vec<(u64, String)> {
        let Some(records) = self.pending.get(origin) else {
            return Vec::new();
        };
        records
            .iter()
            .filter(|(_, key)| free(key))
            .take(limit)
            .map(|(seq, key)| (*seq, key.clone()))
            .collect()
    }

    /// The destinations with pending records, oldest record first, and the
    /// state of each; at most `cap`.
    pub(super) fn lanes(&self, cap: usize) -> Vec<(String, LaneState)> {
        let mut lanes: Vec<(u64, &String)> = self
            .pending
            .iter()
            .filter_map(|(origin, records)| Some((*records.keys().next()?, origin)))
            .collect();
        lanes.sort_unstable();
        lanes
            .into_iter()
            .take(cap)
            .map(|(_, origin)| (origin.clone(), self.state_of(origin)))
            .collect()
    }

    fn state_of(&self, origin: &str) -> LaneState {
        self.state.get(origin).map(Kept::view).unwrap_or_default()
    }

    /// Records how an attempt to `origin` went; its state after it. Keeps
    /// nothing for an origin with nothing pending.
    pub(super) fn note(&mut self, origin: &str, event: LaneEvent) -> LaneState {
        // Nothing pending to it, or an answer from one up and unpaused (the
        // healthy path): nothing to keep.
        let plain = matches!(event, LaneEvent::Answered { pause: None })
            && !self.state.contains_key(origin);
        if plain || !self.pending.contains_key(origin) {
            return LaneState::default();
        }
        let longest = self.longest_probe;
        let kept = self.state.entry(origin.to_owned()).or_insert_with(Kept::up);
        let now = Instant::now();
        let pause = match &event {
            LaneEvent::Answered { pause } | LaneEvent::Failed { pause, .. } => *pause,
        };
        if let Some(pause) = pause {
            let until = now + pause;
            kept.paused_until = Some(kept.paused_until.map_or(until, |at| at.max(until)));
        }
        kept.probing_until = None;
        match event {
            LaneEvent::Answered { .. } => {
                kept.down_since = None;
                kept.probe_delay = Duration::ZERO;
                kept.last_failure = None;
            }
            LaneEvent::Failed { failure, probe, .. } => {
                let delay = next_probe_delay(&kept.view(), probe, longest);
                if kept.down_since.is_none() || probe {
                    kept.probe_at = now + probe_wait(delay);
                }
                kept.down_since.get_or_insert((now, SystemTime::now()));
                kept.probe_delay = delay;
                kept.last_failure = Some(failure);
            }
        }
        let state = kept.view();
        if kept.is_plain() {
            self.state.remove(origin);
        }
        state
    }

    /// Since when `origin` is down, if it is.
    pub(super) fn down_since(&self, origin: &str) -> Option<SystemTime> {
        self.state.get(origin)?.down_since.map(|(_, at)| at)
    }

    /// Restores `origin` as down since `since`, with `failure` its last, as
    /// the file kept it: its probe is due at once. Nothing is kept for an
    /// origin with nothing pending.
    pub(super) fn restore(&mut self, origin: &str, since: SystemTime, failure: String) {
        if !self.holds(origin) {
            return;
        }
        let now = Instant::now();
        // A time ahead of this clock counts as now.
        let wall = SystemTime::now();
        let since = since.min(wall);
        let down_for = wall.duration_since(since).unwrap_or_default();
        let mut kept = Kept::up();
        kept.down_since = Some((now.checked_sub(down_for).unwrap_or(now), since));
        kept.probe_delay = FIRST_PROBE_DELAY.min(self.longest_probe);
        kept.last_failure = Some(failure);
        self.state.insert(origin.to_owned(), kept);
    }

    /// Forgets `origin`'s state: it starts afresh, up.
    pub(super) fn forget(&mut self, origin: &str) {
        self.state.remove(origin);
    }

    /// Takes `origin`'s probe: whether it is down, due and not probed.
    pub(super) fn take_probe(&mut self, origin: &str) -> bool {
        let Some(kept) = self.state.get_mut(origin) else {
            return false;
        };
        let view = kept.view();
        let due = view.is_down() && view.paused_for.is_none() && view.probe_in.is_zero();
        let probing = kept
            .probing_until
            .is_some_and(|until| until > Instant::now());
        if !due || probing {
            return false;
        }
        kept.probing_until = Some(Instant::now() + PROBE_HOLD);
        true
    }

    /// Gives back `origin`'s probe, unused: its state stays as it was.
    pub(super) fn return_probe(&mut self, origin: &str) {
        if let Some(kept) = self.state.get_mut(origin) {
            kept.probing_until = None;
        }
    }

    /// Each destination with pending records, with its count and state,
    /// the most pending first; quarantined counts are added by the caller.
    pub(super) fn destinations(&self) -> HashMap<String, Destination> {
        let now = Instant::now();
        self.pending
            .iter()
            .map(|(origin, records)| {
                let mut destination = Destination::new(origin.clone());
                destination.pending = records.len() as u64;
                if let Some(kept) = self.state.get(origin) {
                    destination.down_since = kept.down_since.map(|(_, at)| at);
                    destination.paused_until = kept
                        .paused_until
                        .filter(|until| *until > now)
                        .map(|until| SystemTime::now() + (until - now));
                    destination.last_failure.clone_from(&kept.last_failure);
                }
                (origin.clone(), destination)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(probe: bool) -> LaneEvent {
        LaneEvent::Failed {
            failure: "502".into(),
            pause: None,
            probe,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_is_kept_while_it_has_pending_records_and_forgotten_after() {
        let mut lanes = Lanes::new(Duration::from_secs(30));
        // Nothing pending to it: a failure keeps no state.
        assert_eq!(
            lanes.note("http://a:80", failed(false)),
            LaneState::default()
        );
        assert!(lanes.state.is_empty());
        lanes.add(1, "http://a:80".into(), "k1".into());
        lanes.add(2, "http://b:80".into(), "k2".into());
        lanes.add(3, "http://a:80".into(), "k3".into());
        let state = lanes.note("http://a:80", failed(false));
        assert!(state.is_down());
        assert_eq!(state.probe_delay, Duration::from_secs(1));
        assert_eq!(lanes.pending_to("http://a:80"), [1, 3]);
        assert_eq!(
            lanes.take("http://a:80", 5, |key| key != "k1"),
            [(3, "k3".to_owned())]
        );
        assert_eq!(
            lanes
                .lanes(10)
                .into_iter()
                .map(|(origin, state)| (origin, state.is_down()))
                .collect::<Vec<_>>(),
            [
                ("http://a:80".to_owned(), true),
                ("http://b:80".to_owned(), false)
            ]
        );
        lanes.remove(1);
        lanes.remove(3);
        assert!(lanes.state.is_empty(), "forgotten with its last record");
        assert_eq!(lanes.lanes(10).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_once_due_and_never_while_paused() {
        let mut lanes = Lanes::new(Duration::from_secs(30));
        lanes.add(1, "http://a:80".into(), "k1".into());
        assert!(!lanes.take_probe("http://a:80"), "up: nothing to probe");
        lanes.note(
            "http://a:80",
            LaneEvent::Failed {
                failure: "503".into(),
                pause: Some(Duration::from_secs(10)),
                probe: false,
            },
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!lanes.take_probe("http://a:80"), "paused");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(lanes.take_probe("http://a:80"));
        assert!(!lanes.take_probe("http://a:80"), "one at a time");
        // Given back unused: free again, and the destination still down.
        lanes.return_probe("http://a:80");
        assert!(lanes.take_probe("http://a:80"));
        assert!(lanes.state["http://a:80"].view().is_down());
        let state = lanes.note("http://a:80", failed(true));
        assert_eq!(state.probe_delay, Duration::from_secs(2));
        assert!(state.probe_in <= Duration::from_secs(2));
        let state = lanes.note("http://a:80", LaneEvent::Answered { pause: None });
        assert_eq!(state, LaneState::default());
        assert!(lanes.state.is_empty(), "up again: nothing kept");
    }
}
