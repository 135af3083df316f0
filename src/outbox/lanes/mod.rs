//! The replay, as a scheduler over destinations: each destination (the
//! origin of a request's URI) is a lane of its own, so that one that is
//! dead, paused, slow or flooded holds up no other.
//!
//! A lane that is up sends its stored requests, oldest first, at most
//! [`Replay::rate`](super::Replay::rate) a second (its [`Pace`], the crate's
//! one pace, which also spaces a [`Recovery`](crate::Recovery)'s releases)
//! and at most its share of the replay's slots at once; one that is down
//! gets one probe at a time, on a jittered backoff capped at the replay
//! interval; one that asked for a pause (`Retry-After`) gets nothing until it
//! ends. Lanes with work are served in turn, one start each per round, never
//! first in first out across the whole store. What a lane is (up, down,
//! paused, probed) is kept by the store ([`Outbox`](super::Outbox)), so that
//! on PostgreSQL every dispatcher on the queue honours it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Weak},
    time::Duration,
};

use http::Uri;
use tokio::{
    sync::Notify,
    task::JoinSet,
    time::{sleep_until, Instant},
};

use super::{
    dispatcher::{AttemptClassifier, AttemptService, Handles, Shared, Step},
    store::{Claim, LaneEvent, LaneState},
    Entry, Outbox,
};
use crate::{classify::Outcome, pace::Pace, recovery::Woken};

/// The wait before a replay worker that stopped unexpectedly is started
/// again: a fault that recurs at once does not spin.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// The longest part of a panic's message an event shows.
const PANIC_MESSAGE_CAP: usize = 512;
/// The most destinations the replay schedules at once (the others wait for
/// the next read of the store): memory stays bounded whatever is stored.
const LANE_CAP: usize = 10_000;
/// The most records a lane claims at once, ahead of its pace.
const CLAIM_BATCH: usize = 64;
/// How often lanes that are sending read the store's state of every
/// destination again: a pause or a probe taken by another dispatcher on the
/// queue is seen within it.
const STATE_REFRESH: Duration = Duration::from_secs(1);

/// Runs the replay worker, and starts it again, with an `error` event,
/// whenever it stops unexpectedly (a panic in a classifier, a fallback or a
/// store): nothing stops the delivery of what is stored but the end of the
/// dispatcher or of the runtime.
pub(super) async fn supervise<S, C>(
    dispatcher: Weak<Shared<S, C>>,
    handles: Weak<Handles>,
    wake: Arc<Notify>,
) where
    S: AttemptService,
    S::Future: Send,
    C: AttemptClassifier<S>,
{
    loop {
        let scheduler = Scheduler::new(dispatcher.clone(), handles.clone(), wake.clone());
        let worker = tokio::spawn(scheduler.run());
        let stopped = match worker.await {
            Ok(()) => return,
            Err(error) if error.is_cancelled() => return,
            Err(error) => error.into_panic(),
        };
        if handles.strong_count() == 0 {
            return;
        }
        tracing::error!(
            panic = panic_message(stopped),
            "the outbox's replay stopped unexpectedly: started again"
        );
        tokio::time::sleep(RESTART_DELAY).await;
    }
}

/// Gives back the probe of `origin` taken here, unused; a failure is said,
/// and the probe runs out at its lease.
async fn give_back_probe(store: &Outbox, origin: &str) {
    if let Err(error) = store.return_probe(origin).await {
        tracing::warn!(origin, error = %error, "outbox could not give back a probe");
    }
}

/// One destination, as the replay schedules it.
struct Lane {
    /// Its origin as a URI, for the recovery signal.
    uri: Option<Uri>,
    /// Records claimed for it, waiting for its pace or a slot.
    claimed: VecDeque<(Entry, Claim)>,
    /// The store had no more records of it to claim, when last asked.
    exhausted: bool,
    /// Its attempts under way.
    in_flight: usize,
    pace: Pace,
    /// Its state, as the store last said, and when.
    state: LaneState,
    read_at: Instant,
    /// Its probe is under way, from here.
    probing: bool,
    /// New here: one attempt first, the rest once it answers, so that a
    /// destination that is down (after a restart, say) gets one request,
    /// not a slot's worth, before it is known to be.
    trial: bool,
}

impl Lane {
    fn new(origin: &str, rate: u32, state: LaneState) -> Lane {
        Lane {
            uri: origin.parse().ok(),
            claimed: VecDeque::new(),
            exhausted: false,
            in_flight: 0,
            pace: Pace::new(rate),
            state,
            read_at: Instant::now(),
            probing: false,
            trial: true,
        }
    }

    /// When the pause it asked for ends, if it is ahead.
    fn paused_until(&self) -> Option<Instant> {
        let until = self.read_at + self.state.paused_for?;
        (until > Instant::now()).then_some(until)
    }

    /// When its next probe is due, while it is down.
    fn probe_at(&self) -> Instant {
        self.read_at + self.state.probe_in
    }

    /// Releases what it claimed and has not sent: a lane that is down
    /// probes with what it claims then, and its records stay free for any
    /// dispatcher meanwhile.
    fn release_claimed(&mut self) {
        for (_, claim) in self.claimed.drain(..) {
            claim.settle();
        }
        self.exhausted = false;
    }
}

/// What a lane can do now.
enum Turn {
    /// It started an attempt.
    Started,
    /// Nothing before this instant (its pace, pause or probe).
    Until(Instant),
    /// Nothing until an attempt ends or the store is read again.
    Idle,
}

/// The replay worker: the lanes, their attempts, and when to look again.
/// Holds the dispatcher weakly, and ends with its last handle.
struct Scheduler<S, C> {
    dispatcher: Weak<Shared<S, C>>,
    /// The dispatcher's store, if shared: kept to give back the probes held
    /// here when the replay ends.
    store: Option<Outbox>,
    handles: Weak<Handles>,
    wake: Arc<Notify>,
    lanes: HashMap<String, Lane>,
    /// The lanes in turn: the next to serve first.
    turns: VecDeque<String>,
    running: JoinSet<Option<LaneState>>,
    /// The lane of each attempt under way, and whether it is its probe.
    attempts: HashMap<tokio::task::Id, (String, bool)>,
    /// Whether the store's lanes are to be read again before the next
    /// round.
    stale: bool,
    next_read: Instant,
    /// The store is asked to recover at most once per replay interval.
    next_recovery: Instant,
}

impl<S, C> Scheduler<S, C>
where
    S: AttemptService,
    S::Future: Send,
    C: AttemptClassifier<S>,
{
    fn new(
        dispatcher: Weak<Shared<S, C>>,
        handles: Weak<Handles>,
        wake: Arc<Notify>,
    ) -> Scheduler<S, C> {
        // A file's probes live and end with its store; only a shared store
        // keeps them for others, renewed while it lives.
        let store = dispatcher
            .upgrade()
            .map(|shared| shared.store().clone())
            .filter(Outbox::is_shared);
        Scheduler {
            dispatcher,
            store,
            handles,
            wake,
            lanes: HashMap::new(),
            turns: VecDeque::new(),
            running: JoinSet::new(),
            attempts: HashMap::new(),
            stale: true,
            next_read: Instant::now(),
            next_recovery: Instant::now(),
        }
    }

    async fn run(mut self) {
        self.serve_until_gone().await;
        self.give_back_probes().await;
    }

    /// Serves the lanes until the dispatcher is gone.
    async fn serve_until_gone(&mut self) {
        loop {
            // No attempt starts once the last handle is gone, though those
            // under way keep the dispatcher's state alive.
            if self.handles.strong_count() == 0 {
                return;
            }
            let Some(shared) = self.dispatcher.upgrade() else {
                return;
            };
            let interval = shared.settings.replay.interval;
            // No replay while the store cannot record a delivery (it would
            // be sent again and again), asked to recover once per interval.
            let mut writable = shared.store().is_writable();
            if !writable && Instant::now() >= self.next_recovery {
                self.next_recovery = Instant::now() + interval;
                writable = shared.store().recover().await;
                match writable {
                    true => tracing::info!("the outbox can be written again: the replay resumes"),
                    false => tracing::warn!("the outbox cannot be written: the replay waits"),
                }
            }
            let mut until = match writable {
                true => {
                    shared.remove_again().await;
                    if self.stale || Instant::now() >= self.next_read {
                        self.read_lanes(&shared).await;
                    }
                    self.serve(&shared).await
                }
                false => Some(self.next_recovery),
            };
            if writable {
                until = earliest(until, Some(self.next_read));
            }
            // Early release: a success to the next destination to probe,
            // seen by the recovery signal, brings it back before its probe.
            let parked = self.next_probe(&shared).and_then(|(origin, uri, at)| {
                let recovery = shared.settings.recovery.as_ref()?;
                Some((origin, recovery.park(&uri, at)))
            });
            drop(shared);
            if !self.wait(until, parked).await {
                return;
            }
        }
    }

    /// Gives back the probes held here, whose attempts end with the replay
    /// (on a shared store, the outbox may live on, renewing them): another
    /// dispatcher may take them at once.
    async fn give_back_probes(&self) {
        let Some(store) = &self.store else {
            return;
        };
        for (origin, lane) in &self.lanes {
            if lane.probing {
                give_back_probe(store, origin).await;
            }
        }
    }

    /// Waits for an attempt to end, a wake, `until`, or the release of
    /// `parked`; false once the dispatcher is gone.
    async fn wait(
        &mut self,
        until: Option<Instant>,
        parked: Option<(String, crate::recovery::Parked)>,
    ) -> bool {
        let sleep = async {
            match until {
                Some(until) => sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        let released = async {
            match parked {
                Some((origin, parked)) => match parked.await {
                    Woken::Released => origin,
                    Woken::Deadline => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(finished) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                self.finished(finished).await;
            }
            () = self.wake.notified() => {
                if self.handles.strong_count() == 0 {
                    return false;
                }
                self.stale = true;
            }
            origin = released => {
                tracing::debug!(origin, "a request to a destination that is down succeeded: replaying it");
                if let Some(shared) = self.dispatcher.upgrade() {
                    let event = LaneEvent::Answered { pause: None };
                    if let Ok(state) = shared.store().note(&origin, event).await {
                        self.update(&origin, state);
                    }
                }
            }
            () = sleep => {}
        }
        true
    }

    /// The lane whose probe is due first, with its URI and when.
    fn next_probe(&self, shared: &Shared<S, C>) -> Option<(String, Uri, Instant)> {
        shared.settings.recovery.as_ref()?;
        self.lanes
            .iter()
            .filter(|(_, lane)| lane.state.is_down() && !lane.probing)
            .filter_map(|(origin, lane)| Some((origin.clone(), lane.uri.clone()?, lane.probe_at())))
            .min_by_key(|(_, _, at)| *at)
    }

    /// Reads the destinations with work from the store, and their state;
    /// forgets lanes with nothing stored and nothing under way, and gives up
    /// on those down too long.
    async fn read_lanes(&mut self, shared: &Arc<Shared<S, C>>) {
        self.stale = false;
        let interval = shared.settings.replay.interval;
        let listed = match shared
            .store()
            .lanes(&shared.settings.origins, LANE_CAP)
            .await
        {
            Ok(listed) => listed,
            Err(error) => {
                tracing::error!(error = %error, "outbox cannot be read for replay");
                self.next_read = Instant::now() + interval.min(STATE_REFRESH);
                return;
            }
        };
        let mut seen = std::collections::HashSet::with_capacity(listed.len());
        for (origin, state) in listed {
            seen.insert(origin.clone());
            match self.lanes.get_mut(&origin) {
                Some(lane) => lane.exhausted = false,
                None => {
                    let lane =
                        Lane::new(&origin, shared.settings.replay.rate, LaneState::default());
                    self.lanes.insert(origin.clone(), lane);
                    self.turns.push_back(origin.clone());
                }
            }
            self.update(&origin, state);
        }
        self.lanes.retain(|origin, lane| {
            seen.contains(origin) || lane.in_flight > 0 || !lane.claimed.is_empty()
        });
        let lanes = &self.lanes;
        self.turns.retain(|origin| lanes.contains_key(origin));
        self.give_up(shared).await;
        let active = self
            .lanes
            .values()
            .any(|lane| lane.in_flight > 0 || !lane.claimed.is_empty() || lane.state.is_down());
        self.next_read = Instant::now()
            + match active {
                true => interval.min(STATE_REFRESH),
                false => interval,
            };
    }

    /// Takes the store's word for `origin`'s state, and says what changed.
    fn update(&mut self, origin: &str, state: LaneState) {
        let Some(lane) = self.lanes.get_mut(origin) else {
            return;
        };
        let was_down = lane.state.is_down();
        let was_paused = lane.paused_until().is_some();
        lane.state = state;
        lane.read_at = Instant::now();
        match (was_down, lane.state.is_down()) {
            (false, true) => {
                tracing::warn!(
                    origin,
                    pending = lane.claimed.len(),
                    "a destination is down: probing it, one request at a time"
                );
                lane.release_claimed();
            }
            (true, false) => {
                tracing::info!(origin, "a destination is back: replaying its requests");
                lane.exhausted = false;
            }
            _ => {}
        }
        if let (false, Some(paused_for)) = (was_paused, lane.state.paused_for) {
            tracing::info!(
                origin,
                paused_for_s = paused_for.as_secs_f64(),
                "a destination asked for a pause: nothing is sent to it until it ends"
            );
        }
    }

    /// Quarantines the records of destinations down for longer than the
    /// dispatcher's `give_up_after`, with one `warn` event each.
    async fn give_up(&mut self, shared: &Arc<Shared<S, C>>) {
        let Some(limit) = shared.settings.give_up_after else {
            return;
        };
        let due: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.state.down_for.is_some_and(|down| down >= limit))
            .map(|(origin, _)| origin.clone())
            .collect();
        for origin in due {
            if let Some(lane) = self.lanes.get_mut(&origin) {
                lane.release_claimed();
            }
            let failure = format!(
                "given up: {origin} failed for {}s without a success (give_up_after); requeue \
                 the request to deliver it again",
                limit.as_secs()
            );
            match shared.store().give_up(&origin, &failure).await {
                Ok(0) => {}
                Ok(quarantined) => tracing::warn!(
                    origin,
                    quarantined,
                    down_for_s = limit.as_secs(),
                    "a destination down too long is given up on: its requests are quarantined"
                ),
                Err(error) => {
                    tracing::error!(origin, error = %error, "a destination could not be given up on")
                }
            }
        }
    }

    /// Serves the lanes in turn, one start each per round, while slots are
    /// free; when to look again, if a lane waits for its time.
    async fn serve(&mut self, shared: &Arc<Shared<S, C>>) -> Option<Instant> {
        let concurrency = shared.settings.replay.concurrency;
        let mut until = None;
        loop {
            let mut started = false;
            for _ in 0..self.turns.len() {
                if self.running.len() >= concurrency || !shared.store().is_writable() {
                    return until;
                }
                let Some(origin) = self.turns.pop_front() else {
                    break;
                };
                self.turns.push_back(origin.clone());
                match self.turn(shared, &origin).await {
                    Turn::Started => started = true,
                    Turn::Until(at) => until = earliest(until, Some(at)),
                    Turn::Idle => {}
                }
            }
            if !started {
                return until;
            }
            until = None;
        }
    }

    /// Starts one attempt to `origin`, if it may have one now.
    async fn turn(&mut self, shared: &Arc<Shared<S, C>>, origin: &str) -> Turn {
        let per_destination = shared.settings.per_destination();
        let Some(lane) = self.lanes.get_mut(origin) else {
            return Turn::Idle;
        };
        if let Some(until) = lane.paused_until() {
            return Turn::Until(until);
        }
        let probe = lane.state.is_down();
        if probe {
            if lane.probing || lane.state.probed_elsewhere {
                return Turn::Idle;
            }
            if lane.probe_at() > Instant::now() {
                return Turn::Until(lane.probe_at());
            }
            match shared.store().take_probe(origin).await {
                Ok(true) => {}
                // Taken by another dispatcher, or no longer due: the next
                // read of the store says which.
                Ok(false) => {
                    lane.state.probed_elsewhere = true;
                    return Turn::Idle;
                }
                Err(error) => {
                    tracing::error!(origin, error = %error, "outbox cannot be read for replay");
                    return Turn::Idle;
                }
            }
        } else {
            let slots = match lane.trial {
                true => 1,
                false => per_destination,
            };
            if lane.in_flight >= slots {
                return Turn::Idle;
            }
            if !lane.pace.is_due() {
                return Turn::Until(lane.pace.next_start());
            }
        }
        let Some((entry, claim)) = self.next_record(shared, origin, probe).await else {
            if probe {
                // Nothing to probe with (its records are held elsewhere, or
                // gone): the probe goes back unused, the destination still
                // down, until the next read of the store.
                give_back_probe(shared.store(), origin).await;
                if let Some(lane) = self.lanes.get_mut(origin) {
                    lane.state.probed_elsewhere = true;
                }
            }
            return Turn::Idle;
        };
        let Some(lane) = self.lanes.get_mut(origin) else {
            return Turn::Idle;
        };
        lane.pace.start();
        lane.in_flight += 1;
        lane.probing = probe;
        match probe {
            true => tracing::info!(
                key = entry.key,
                origin,
                attempts = entry.attempts,
                stored_for_s = age(entry.stored_at).as_secs(),
                "probing a destination that is down with its oldest stored request"
            ),
            false => tracing::info!(
                key = entry.key,
                origin,
                attempts = entry.attempts,
                stored_for_s = age(entry.stored_at).as_secs(),
                pending = shared.store().pending_count(),
                "replaying a stored request"
            ),
        }
        let attempt = shared.clone().replay_one(entry, claim, probe);
        let task = self.running.spawn(attempt);
        self.attempts.insert(task.id(), (origin.to_owned(), probe));
        Turn::Started
    }

    /// The next record to send to `origin`: one claimed already, or the
    /// oldest the store has that no one holds (a batch of them, unless
    /// `probe`). Records it must not send are settled here: delivered but
    /// not yet removed, or going where the dispatcher sends nothing
    /// (quarantined).
    async fn next_record(
        &mut self,
        shared: &Arc<Shared<S, C>>,
        origin: &str,
        probe: bool,
    ) -> Option<(Entry, Claim)> {
        loop {
            let lane = self.lanes.get_mut(origin)?;
            if let Some(next) = lane.claimed.pop_front() {
                match shared.sendable(next).await {
                    Some(next) => return Some(next),
                    None => continue,
                }
            }
            if lane.exhausted {
                return None;
            }
            let batch = match probe {
                true => 1,
                false => CLAIM_BATCH.min(shared.settings.per_destination() * 4),
            };
            match shared.store().claim_lane(origin, batch).await {
                Ok(claimed) => {
                    let lane = self.lanes.get_mut(origin)?;
                    lane.exhausted = claimed.len() < batch;
                    if claimed.is_empty() {
                        return None;
                    }
                    lane.claimed.extend(claimed);
                }
                Err(error) => {
                    tracing::error!(origin, error = %error, "outbox cannot be read for replay");
                    return None;
                }
            }
        }
    }

    /// An attempt ended: its lane's slot is free, its state as the store
    /// says. One that panicked (in a classifier, a fallback) is reported,
    /// and counts as a failure to its destination: its record, released by
    /// its claim, is tried again.
    async fn finished(
        &mut self,
        finished: Result<(tokio::task::Id, Option<LaneState>), tokio::task::JoinError>,
    ) {
        let (id, state) = match finished {
            Ok((id, state)) => (id, state),
            Err(error) => {
                let id = error.id();
                report_panic(error);
                let Some((origin, probe)) = self.attempts.get(&id).cloned() else {
                    return;
                };
                let failure = "the attempt panicked".to_owned();
                let event = LaneEvent::Failed {
                    failure,
                    pause: None,
                    probe,
                };
                let noted = match self.dispatcher.upgrade() {
                    Some(shared) => shared.store().note(&origin, event).await.ok(),
                    None => None,
                };
                (id, noted)
            }
        };
        let Some((origin, probe)) = self.attempts.remove(&id) else {
            return;
        };
        if let Some(lane) = self.lanes.get_mut(&origin) {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            if probe {
                lane.probing = false;
            }
            // Its first attempt answered: the rest may go.
            if state.as_ref().is_some_and(|state| !state.is_down()) {
                lane.trial = false;
            }
        }
        match state {
            Some(state) => self.update(&origin, state),
            None => self.stale = true,
        }
    }
}

/// The earlier of two instants, either maybe absent.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<S, C> Shared<S, C>
where
    S: AttemptService,
    S::Future: Send,
    C: AttemptClassifier<S>,
{
    /// `claimed` as the replay may send it; `None`, settled, when it must
    /// not be sent: delivered but not yet removed, or going where the
    /// dispatcher sends nothing (then quarantined, with an `error` event).
    async fn sendable(&self, claimed: (Entry, Claim)) -> Option<(Entry, Claim)> {
        let (entry, claim) = claimed;
        if crate::sync::lock(&self.unremoved).contains(&entry.seq) {
            claim.settle();
            return None;
        }
        if let Some(failure) = self.refusal(&entry.uri) {
            tracing::error!(
                key = entry.key,
                failure,
                "stored request not sent: quarantined in the outbox"
            );
            let written = self.store().quarantine(entry.seq, failure).await;
            Self::recorded(&entry.key, written);
            claim.settle();
            return None;
        }
        Some((entry, claim))
    }

    /// One attempt of a stored record (and of its fallback, if it has one
    /// and is refused for good); the destination's state after it, as the
    /// store recorded it.
    async fn replay_one(
        self: Arc<Self>,
        mut entry: Entry,
        claim: Claim,
        probe: bool,
    ) -> Option<LaneState> {
        let mut fell_back = false;
        loop {
            let sent = self
                .send_through(self.attempt.clone(), entry.request())
                .await;
            if sent.outcome == Outcome::Success {
                if let Some(recovery) = &self.settings.recovery {
                    recovery.observe(&entry.uri);
                }
            }
            let state = self.note_lane(&entry.uri, &sent, probe).await;
            match self
                .settle(&entry, Some(entry.seq), sent, 1, fell_back)
                .await
            {
                Step::FallBack(fallback) => {
                    fell_back = true;
                    entry = fallback.1;
                }
                Step::Retired(_, seq) => {
                    let shared = self.clone();
                    let removal = async move {
                        if let Some(seq) = seq {
                            shared.remove(&entry.key, seq).await;
                        }
                        claim.settle();
                    };
                    // A probe's removal is awaited: the destination's
                    // backlog goes once the store took it (a store that
                    // cannot record a delivery holds the replay). Otherwise
                    // the slot is free once the destination answered; the
                    // claim, held until the removal is committed, keeps
                    // every sender off the record meanwhile.
                    match probe {
                        true => removal.await,
                        false => drop(tokio::spawn(removal)),
                    }
                    return state;
                }
                // The replay itself goes on with what is queued.
                Step::Done(_) | Step::Queued => {
                    claim.settle();
                    return state;
                }
            }
        }
    }
}

/// Reports an attempt of the replay that panicked (in a classifier, a
/// fallback): the record, released by its claim, is tried again.
fn report_panic(error: tokio::task::JoinError) {
    if error.is_panic() {
        tracing::error!(
            panic = panic_message(error.into_panic()),
            "a replayed request's attempt panicked: it stays stored"
        );
    }
}

/// The message of a panic, cleaned and capped for an event.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|message| message.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    crate::response::clean(&message, &[])
        .chars()
        .take(PANIC_MESSAGE_CAP)
        .collect()
}

/// How long ago `at` was, for events; zero for a time in the future.
fn age(at: std::time::SystemTime) -> Duration {
    std::time::SystemTime::now()
        .duration_since(at)
        .unwrap_or_default()
}
#[cfg(test)]
mod tests {
    use super::super::{Delivery, Dispatcher, Outbox};
    use crate::{sync::lock, TerminalRetryLayer, TerminalRetryPolicy};
    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use std::time::Duration;

    /// A commit that fails for real and then works again cannot be made from
    /// outside the store: a removal that failed is recorded here by hand.
    #[cfg(feature = "test-server")]
    #[tokio::test(start_paused = true)]
    async fn a_delivery_left_unremoved_is_removed_once_the_store_can_be_written_not_resent() {
        use crate::test_server::{Reply, TestServer};
        use hyper_util::{client::legacy::Client, rt::TokioExecutor};

        let directory =
            std::env::temp_dir().join(format!("terminal-retry-unremoved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        let outbox = Outbox::open(directory.join("requests.redb")).unwrap();
        let server = TestServer::scripted([Reply::status(502)]).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let once = TerminalRetryLayer::new(
            TerminalRetryPolicy::default().with_schedule(crate::Schedule::new([]).unwrap()),
        );
        let dispatcher = Dispatcher::builder(outbox, client)
            .layer(once)
            .build()
            .unwrap();
        let request = Request::post(server.url("/r/1"))
            .body(Bytes::new())
            .unwrap();
        assert_eq!(dispatcher.send("r1", request).await, Delivery::Queued);
        let seq = dispatcher.outbox().unwrap().pending().unwrap()[0].seq;
        // As if it had been delivered and its removal had failed.
        lock(&dispatcher.shared.unremoved).insert(seq);

        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(dispatcher.outbox().unwrap().pending().unwrap().is_empty());
        assert!(lock(&dispatcher.shared.unremoved).is_empty());
        assert_eq!(server.requests().len(), 1, "not sent again");
        drop(dispatcher);
        let _ = std::fs::remove_dir_all(&directory);
    }
}
