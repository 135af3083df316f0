//! The replay worker: delivers what the outbox holds, probing a server that
//! is down one request at a time, and sending the whole backlog, paced,
//! once it is back.

use std::{
    future::Future,
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::{
    sync::Notify,
    task::JoinSet,
    time::{sleep_until, Instant},
};

use super::{
    backoff::Backoff,
    dispatcher::{AttemptClassifier, AttemptService, Shared, Step},
    pace::Pace,
    store::Claim,
    Entry,
};
use crate::{classify::Outcome, recovery::Woken, sync::lock, Jitter};

/// The first wait between probes (or the replay interval, if shorter);
/// doubled after each failed probe up to the replay interval.
const FIRST_PROBE_DELAY: Duration = Duration::from_secs(1);
/// How many pending records the replay reads at a time.
const REPLAY_PAGE: usize = 256;
/// The wait before a replay worker that stopped unexpectedly is started
/// again: a fault that recurs at once does not spin.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// The longest part of a panic's message an event shows.
const PANIC_MESSAGE_CAP: usize = 512;

/// Runs the replay worker, and starts it again, with an `error` event,
/// whenever it stops unexpectedly (a panic in a classifier, a fallback or a
/// store): nothing stops the delivery of what is stored but the end of the
/// dispatcher or of the runtime.
pub(super) async fn supervise<S, C>(dispatcher: Weak<Shared<S, C>>, wake: Arc<Notify>, rate: u32)
where
    S: AttemptService,
    S::Future: Send,
    C: AttemptClassifier<S>,
{
    loop {
        let worker = tokio::spawn(replay(dispatcher.clone(), wake.clone(), Pace::new(rate)));
        let stopped = match worker.await {
            Ok(()) => return,
            Err(error) if error.is_cancelled() => return,
            Err(error) => error.into_panic(),
        };
        if dispatcher.strong_count() == 0 {
            return;
        }
        tracing::error!(
            panic = panic_message(stopped),
            "the outbox's replay stopped unexpectedly: started again"
        );
        tokio::time::sleep(RESTART_DELAY).await;
    }
}

/// Runs `until` to its end, unless the dispatcher is dropped first (`None`).
/// Holds the dispatcher weakly meanwhile, so that it can be dropped.
async fn unless_gone<T, F: Future>(
    dispatcher: &Weak<T>,
    wake: &Notify,
    until: F,
) -> Option<F::Output> {
    tokio::pin!(until);
    let mut woken = false;
    let output = loop {
        tokio::select! {
            output = &mut until => break output,
            () = wake.notified() => match dispatcher.strong_count() {
                0 => return None,
                _ => woken = true,
            },
        }
    };
    // A wake taken here (a record enqueued or released meanwhile) is handed
    // on: swallowed, the record would wait for the next poll.
    if woken {
        wake.notify_one();
    }
    Some(output)
}

/// The replay worker: delivers what the outbox holds, probing a server that is
/// down one request at a time, at most at the replay rate, never while the
/// server asked for a pause or the store cannot record a delivery. Holds the
/// dispatcher weakly, so that it ends with the last handle.
pub(super) async fn replay<S, C>(dispatcher: Weak<Shared<S, C>>, wake: Arc<Notify>, mut pace: Pace)
where
    S: AttemptService,
    S::Future: Send,
    C: AttemptClassifier<S>,
{
    let jitter = Jitter::full();
    let Some(interval) = dispatcher
        .upgrade()
        .map(|shared| shared.settings.replay.interval)
    else {
        return;
    };
    let down = || Backoff::new(FIRST_PROBE_DELAY, interval);
    // The wait before the next probe; `None` while the server is taken to
    // be up. At start, a probe at once: what an earlier run left goes before
    // anything else.
    let mut probe = Some(Backoff::immediate(FIRST_PROBE_DELAY, interval));
    // The store is asked to recover at most once per replay interval.
    let mut next_recovery = Instant::now();
    // Whether the replay was woken while nothing was stored.
    let mut woken_idle = false;
    loop {
        let Some(shared) = dispatcher.upgrade() else {
            return;
        };
        // No replay while the store cannot record a delivery (it would be
        // sent again and again), asked to recover once per interval; nor
        // while the server asked for a pause.
        let mut writable = shared.store().is_writable();
        if !writable && Instant::now() >= next_recovery {
            next_recovery = Instant::now() + interval;
            writable = shared.store().recover().await;
            match writable {
                true => tracing::info!("the outbox can be written again: the replay resumes"),
                false => tracing::warn!("the outbox cannot be written: the replay waits"),
            }
        }
        let rest = match writable {
            true => {
                shared.remove_again().await;
                shared.quiet()
            }
            false => Some(next_recovery),
        };
        if let Some(until) = rest {
            drop(shared);
            if unless_gone(&dispatcher, &wake, sleep_until(until))
                .await
                .is_none()
            {
                return;
            }
            continue;
        }
        let oldest = match shared
            .store()
            .pending_after(0, 1, &shared.settings.origins)
            .await
        {
            Ok(oldest) => oldest.into_iter().next(),
            Err(error) => {
                tracing::error!(error = %error, "outbox cannot be read for replay");
                None
            }
        };
        // A record never attempted that woke an idle replay (enqueued by
        // another process, or left by a holder that died before its first
        // attempt) is probed at once: nothing says the server is down.
        if std::mem::take(&mut woken_idle)
            && oldest.as_ref().is_some_and(|entry| entry.attempts == 0)
        {
            probe = Some(Backoff::immediate(FIRST_PROBE_DELAY, interval));
        }
        match (oldest, probe) {
            (None, _) => {
                // Nothing stored: wait for a record to be queued or requeued.
                drop(shared);
                wake.notified().await;
                woken_idle = true;
                probe = Some(down());
            }
            (Some(oldest), Some(mut backoff)) => {
                let deadline = Instant::now() + jitter.apply(backoff.delay());
                let recovery = shared.settings.recovery.clone();
                drop(shared);
                // Only a success or the deadline ends the wait: a record
                // queued meanwhile is covered by the probe.
                let wait = async {
                    match recovery {
                        Some(recovery) => {
                            recovery.park(&oldest.uri, deadline).await == Woken::Released
                        }
                        None => {
                            sleep_until(deadline).await;
                            false
                        }
                    }
                };
                let Some(released) = unless_gone(&dispatcher, &wake, wait).await else {
                    return;
                };
                let Some(shared) = dispatcher.upgrade() else {
                    return;
                };
                if shared.quiet().is_some() {
                    // Asked for a pause meanwhile: that comes first.
                    continue;
                }
                let up = released || shared.probe(&mut pace).await;
                if released {
                    tracing::debug!("a request to the server succeeded: replaying the outbox");
                }
                probe = match up {
                    true => None,
                    false => {
                        backoff.failed();
                        Some(backoff)
                    }
                };
            }
            (Some(_), None) => match shared.replay_all(&mut pace).await {
                Replayed::Down => probe = Some(down()),
                Replayed::All { sent } if sent > 0 => {}
                // What is left is being sent by the foreground, which wakes
                // the replay if it leaves something behind.
                Replayed::All { .. } => wake.notified().await,
            },
        }
    }
}

/// How a replay of the whole outbox went.
enum Replayed {
    /// Every record not being sent already was sent; `sent` of them.
    All { sent: usize },
    /// A transient failure, or the server asked for a pause: it is down
    /// again.
    Down,
}

impl<S, C> Shared<S, C>
where
    S: AttemptService,
    S::Future: Send,
    C: AttemptClassifier<S>,
{
    /// Sends the oldest record the replay may send once; whether the server
    /// took it (or refused it for good: it is up either way).
    async fn probe(self: Arc<Self>, pace: &mut Pace) -> bool {
        let Ok(entries) = self
            .store()
            .pending_after(0, REPLAY_PAGE, &self.settings.origins)
            .await
        else {
            return false;
        };
        for listed in entries {
            if let Some((entry, claim)) = self.take(&listed).await {
                pace.wait().await;
                tracing::info!(
                    key = entry.key,
                    pending = self.store().pending_count(),
                    oldest_pending_age_s = age(entry.stored_at).as_secs(),
                    "probing the server with the oldest stored request"
                );
                return self.replay_one(entry, claim).await;
            }
        }
        // Every record is being sent by the foreground, or awaits its
        // removal: nothing to probe with.
        false
    }

    /// Sends every record the replay may send, oldest first, at most
    /// [`Replay::concurrency`](super::Replay::concurrency) at once and at
    /// its rate; stops at the
    /// first transient failure.
    async fn replay_all(self: Arc<Self>, pace: &mut Pace) -> Replayed {
        let mut after = 0;
        let mut running = JoinSet::new();
        let mut healthy = true;
        let mut sent = 0;
        'pages: while healthy {
            let entries = match self
                .store()
                .pending_after(after, REPLAY_PAGE, &self.settings.origins)
                .await
            {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::error!(error = %error, "outbox cannot be read for replay");
                    healthy = false;
                    break;
                }
            };
            let Some(last) = entries.last() else {
                break;
            };
            after = last.seq;
            for listed in entries {
                while running.len() >= self.settings.replay.concurrency {
                    if let Some(done) = running.join_next().await {
                        if !answered(done) {
                            healthy = false;
                            break 'pages;
                        }
                    }
                }
                let Some((entry, claim)) = self.take(&listed).await else {
                    continue;
                };
                pace.wait().await;
                // Asked for a pause, or a removal failed, meanwhile: the
                // claim's release wakes the replay for this record later.
                if self.quiet().is_some() || !self.store().is_writable() {
                    healthy = false;
                    break 'pages;
                }
                tracing::info!(
                    key = entry.key,
                    attempts = entry.attempts,
                    stored_for_s = age(entry.stored_at).as_secs(),
                    pending = self.store().pending_count(),
                    "replaying a stored request"
                );
                running.spawn(self.clone().replay_one(entry, claim));
                sent += 1;
            }
        }
        while let Some(done) = running.join_next().await {
            healthy &= answered(done);
        }
        match healthy {
            true => Replayed::All { sent },
            false => Replayed::Down,
        }
    }

    /// Claims `listed` (as a page of the outbox had it) for the replay, and
    /// reads it again, now that no one else may send it. `None` when it is
    /// not to be sent: it is being sent, is gone or changed since the page
    /// was read (delivered in the foreground, say), awaits its removal, or
    /// goes where the dispatcher sends nothing (it is quarantined here).
    async fn take(self: &Arc<Self>, listed: &Entry) -> Option<(Entry, Claim)> {
        if lock(&self.unremoved).contains(&listed.seq) {
            return None;
        }
        // Another dispatcher's, on a shared outbox: not claimed, not
        // changed, left to the one whose allow-list holds its origin.
        if self.store().is_shared() && !self.allows(&listed.uri) {
            return None;
        }
        let claim = self.store().claim(&listed.key).await?;
        let entry = match self.store().get(listed.seq).await {
            Ok(Some(entry)) if entry.idempotency_key == listed.idempotency_key => entry,
            // Replaced (by a fallback): the next pass reads it as it is now.
            Ok(Some(_)) => return None,
            Ok(None) => {
                claim.settle();
                return None;
            }
            Err(error) => {
                tracing::error!(key = listed.key, error = %error, "outbox cannot be read for replay");
                claim.settle();
                return None;
            }
        };
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
    /// and is refused for good); whether the server answered.
    async fn replay_one(self: Arc<Self>, mut entry: Entry, claim: Claim) -> bool {
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
            let answered = sent.outcome != Outcome::Transient;
            match self
                .settle(&entry, Some(entry.seq), sent, 1, fell_back)
                .await
            {
                Step::FallBack(fallback) => {
                    fell_back = true;
                    entry = fallback.1;
                }
                Step::Retired(_, seq) => {
                    if let Some(seq) = seq {
                        self.remove(&entry.key, seq).await;
                    }
                    claim.settle();
                    return answered;
                }
                // The replay itself goes on with what is queued.
                Step::Done(_) | Step::Queued => {
                    claim.settle();
                    return answered;
                }
            }
        }
    }
}

/// Whether a replayed record's server answered; a replay that panicked (in a
/// classifier, a fallback) says so in an `error` event, and counts as no
/// answer: the record, released by its claim, is tried again.
fn answered(done: Result<bool, tokio::task::JoinError>) -> bool {
    match done {
        Ok(answered) => answered,
        Err(error) => {
            if error.is_panic() {
                tracing::error!(
                    panic = panic_message(error.into_panic()),
                    "a replayed request's attempt panicked: it stays stored"
                );
            }
            false
        }
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

#[cfg(test)]
mod wake_tests {
    use std::sync::Arc;

    use tokio::{sync::Notify, time::Duration};

    use super::unless_gone;

    #[tokio::test(start_paused = true)]
    async fn a_wake_taken_while_waiting_is_handed_on_not_swallowed() {
        let dispatcher = Arc::new(());
        let weak = Arc::downgrade(&dispatcher);
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        let waited = unless_gone(&weak, &wake, async move {
            // A record enqueued while the replay waits for something else.
            woken.notify_one();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert!(waited.await.is_some());
        // The wake is still there for the wait that follows.
        tokio::time::timeout(Duration::from_millis(1), wake.notified())
            .await
            .expect("the wake handed on");
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_once_the_dispatcher_is_gone() {
        let dispatcher = Arc::new(());
        let weak = Arc::downgrade(&dispatcher);
        drop(dispatcher);
        let wake = Notify::new();
        wake.notify_one();
        let waited = unless_gone(&weak, &wake, tokio::time::sleep(Duration::from_secs(60)));
        assert!(waited.await.is_none());
    }
}
