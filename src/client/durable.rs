//! Terminal reports as requests of the outbox's public API: each report is a
//! request tagged with its route, handed to the client's [`Dispatcher`],
//! which sends it, falls back and settles it (and, with an outbox, stores it
//! first and replays it).

#[cfg(feature = "outbox")]
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use tokio::sync::oneshot;

use super::{
    body,
    error::Error,
    in_flight::StoreState,
    report::{ReportOutcome, TaskResult},
    route::Action,
    transport::{Attempt, Transport},
};
use crate::{
    outbox::{Delivery, Dispatch, Dispatcher, Durability, Entry, Replay, Tag},
    TerminalRetryLayer,
};

/// How the client's reports are sent: what its dispatcher needs of it.
pub(super) struct Sending<'a> {
    pub(super) attempt: Attempt,
    /// With the client's policy, and its recovery signal if any.
    pub(super) layer: TerminalRetryLayer,
    /// The outbox file, if reports are stored.
    #[cfg(feature = "outbox")]
    pub(super) outbox: Option<&'a Path>,
    pub(super) replay: Replay,
    /// The base URL: only its origin gets stored reports, and a fallback
    /// goes below it.
    pub(super) base: &'a str,
    /// Redacted from whatever the server sends back.
    pub(super) token: Option<&'a str>,
}

/// The client's dispatcher: over the outbox file if one is set (its replay
/// worker started), in memory otherwise.
pub(super) fn dispatcher(sending: Sending<'_>) -> Result<Dispatcher<Attempt>, Error> {
    let origin: Uri = sending
        .base
        .parse()
        .map_err(|error: http::uri::InvalidUri| {
            Error::config("the base URL is not a URL", Some(error.into()))
        })?;
    let base = sending.base.to_owned();
    #[cfg(feature = "outbox")]
    let builder = match sending.outbox {
        Some(path) => {
            let outbox = crate::outbox::Outbox::open(path).map_err(Error::outbox)?;
            Dispatcher::builder(outbox, sending.attempt)
        }
        None => Dispatcher::in_memory(sending.attempt),
    };
    #[cfg(not(feature = "outbox"))]
    let builder = Dispatcher::in_memory(sending.attempt);
    let mut builder = builder
        // Its recovery, if any, releases the replay too.
        .layer(sending.layer)
        .replay(sending.replay)
        // One server, one destination: no other to leave slots for.
        .per_destination_concurrency(sending.replay.concurrency)
        .origin(&origin)
        .fallback(move |entry: &Entry, _: StatusCode, failure: &str| {
            fallback(&base, entry, failure)
        });
    if let Some(token) = sending.token {
        builder = builder.redact(token);
    }
    builder
        .build()
        .map_err(|error| Error::config(error.to_string(), Some(error.into())))
}

/// The fail report that replaces a completion the server refused for good,
/// with reason `agent_error`, to the task's `fail` route below `base`; none
/// for a refused fail report.
fn fallback(base: &str, entry: &Entry, failure: &str) -> Option<Request<Bytes>> {
    if entry.tag.as_deref() != Some(Action::Complete.as_str()) {
        return None;
    }
    let completion = body::stored_completion(&entry.body)?;
    let failure = completion.fallback(format!("complete task failed: {failure}"));
    let mut request = entry.request();
    *request.uri_mut() = format!("{base}{}", Action::Fail.path(&entry.key))
        .parse()
        .ok()?;
    *request.body_mut() = body::failed(&failure);
    request.extensions_mut().insert(tag(Action::Fail));
    Some(request)
}

/// The tag a report to `route` is stored with: the route's name, `complete`
/// or `fail`.
fn tag(route: Action) -> Tag {
    Tag::new(route.as_str())
}

/// Tells a report's future, and `shutdown`, whether the report is stored.
///
/// Dropped without an answer (its delivery stopped before the outbox
/// answered), it says "not stored": `shutdown` then returns the report
/// rather than lose it, at worst to be delivered twice.
pub(super) struct StoredSignal {
    store: Arc<StoreState>,
    answer: Option<oneshot::Sender<Durability>>,
}

/// A report's side of [`StoredSignal`]: whether its report is stored.
#[derive(Debug)]
pub(super) struct StoredAnswer {
    receiver: Option<oneshot::Receiver<Durability>>,
    known: Option<Durability>,
}

/// A signal for a delivery and its answer for the report's future.
pub(super) fn stored_signal(store: Arc<StoreState>) -> (StoredSignal, StoredAnswer) {
    let (sender, receiver) = oneshot::channel();
    let signal = StoredSignal {
        store,
        answer: Some(sender),
    };
    let answer = StoredAnswer {
        receiver: Some(receiver),
        known: None,
    };
    (signal, answer)
}

impl StoredSignal {
    fn tell(mut self, durability: Durability) {
        let stored = matches!(durability, Durability::Stored | Durability::AlreadyStored);
        self.store.answer(stored);
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(durability);
        }
    }
}

impl Drop for StoredSignal {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            self.store.answer(false);
            let _ = answer.send(Durability::Refused);
        }
    }
}

impl StoredAnswer {
    /// Waits for the answer.
    pub(super) async fn wait(&mut self) -> Durability {
        // Awaited in place, so that a caller that stops waiting can ask again.
        if let Some(receiver) = &mut self.receiver {
            self.known = receiver.await.ok();
            self.receiver = None;
        }
        // The signal answers even when dropped: no answer means its runtime
        // went first.
        self.known.clone().unwrap_or(Durability::Refused)
    }
}

/// Delivers `result` through the outbox, tagged with its route.
pub(super) async fn deliver(
    transport: &Transport,
    dispatcher: &Dispatcher<Attempt>,
    task_id: &str,
    result: &TaskResult,
    signal: StoredSignal,
) -> ReportOutcome {
    let (route, body) = body::terminal(result);
    let completed = route == Action::Complete;
    let mut request = match transport.request(&route.path(task_id), body) {
        Ok(request) => request,
        Err(error) => {
            tracing::error!(task_id, error = %error, "terminal report cannot be made");
            signal.tell(Durability::Refused);
            return ReportOutcome::NotDelivered;
        }
    };
    request.extensions_mut().insert(tag(route));
    if !signal.store.hand_over() {
        // `shutdown` took it first, and returns it.
        return ReportOutcome::Abandoned;
    }
    let mut dispatch = AbortUnstored(dispatcher.send(task_id, request), false);
    let durability = dispatch.0.stored().await;
    dispatch.1 = durability == Durability::InMemory;
    signal.tell(durability);
    match (&mut dispatch.0).await {
        Delivery::Delivered if completed => ReportOutcome::Completed,
        Delivery::Delivered => ReportOutcome::Failed,
        Delivery::FallbackDelivered => ReportOutcome::FellBackToFail,
        Delivery::Queued => {
            tracing::warn!(
                task_id,
                completed,
                "terminal report not delivered within the schedule: kept in the outbox, the \
                 replay delivers it once the server is back"
            );
            ReportOutcome::Queued
        }
        Delivery::Quarantined => ReportOutcome::Quarantined,
        Delivery::Superseded => ReportOutcome::superseded(task_id),
        Delivery::AlreadyStored => {
            tracing::warn!(
                task_id,
                "a terminal report for this task is stored already: it stands, this one is dropped"
            );
            ReportOutcome::AlreadyStored
        }
        Delivery::Undelivered { transient, failure } if completed && transient => {
            tracing::error!(
                task_id,
                failure,
                "complete task failed after retries and is not stored; leaving the task running \
                 rather than falling back to fail"
            );
            ReportOutcome::LeftRunning
        }
        Delivery::Undelivered { failure, .. } | Delivery::FallbackUndelivered { failure, .. } => {
            tracing::error!(task_id, failure, "terminal report not delivered nor stored");
            ReportOutcome::NotDelivered
        }
    }
}

/// A report handed to the dispatcher; its delivery is stopped with the
/// client's (by `shutdown`) when it lives in memory only (the flag):
/// `shutdown` returns such a report, which must then not reach the server
/// behind the caller's back. A stored one is left to the replay.
struct AbortUnstored(Dispatch, bool);

impl Drop for AbortUnstored {
    fn drop(&mut self) {
        if self.1 {
            self.0.abort();
        }
    }
}
