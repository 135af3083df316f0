//! Terminal reports kept in an outbox until the server takes them, through
//! the outbox's public API: each report is a request tagged with its route,
//! handed to a [`Dispatcher`].

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use tokio::sync::oneshot;

use super::{
    body::{self, Completion},
    error::Error,
    in_flight::StoreState,
    report::{Report, ReportOutcome, StoredReport, TaskResult, TerminalAction},
    route::Action,
    transport::{Attempt, Transport},
};
use crate::{
    outbox::{Delivery, Dispatcher, Durability, Entry, Outbox, Tag},
    Recovery, TerminalRetryLayer,
};

/// Where and how terminal reports are kept on disk; the replay settings
/// apply once a path is set, whatever the order of the calls. A setting
/// left unset keeps the dispatcher's default.
#[derive(Debug, Default)]
pub(super) struct OutboxSettings {
    pub(super) path: Option<PathBuf>,
    pub(super) replay_interval: Option<Duration>,
    pub(super) replay_concurrency: Option<usize>,
    pub(super) replay_rate: Option<u32>,
}

/// How the client's reports are sent: what its dispatcher needs of it.
pub(super) struct Sending<'a> {
    pub(super) attempt: Attempt,
    pub(super) layer: TerminalRetryLayer,
    pub(super) recovery: Option<Recovery>,
    /// The base URL: only its origin gets stored reports, and a fallback
    /// goes below it.
    pub(super) base: &'a str,
    /// Redacted from whatever the server sends back.
    pub(super) token: Option<&'a str>,
}

/// Opens the outbox at `path` and starts its replay worker.
pub(super) fn dispatcher(
    path: &std::path::Path,
    settings: &OutboxSettings,
    sending: Sending<'_>,
) -> Result<Dispatcher<Attempt>, Error> {
    let origin: Uri = sending
        .base
        .parse()
        .map_err(|error: http::uri::InvalidUri| {
            Error::config("the base URL is not a URL", Some(error.into()))
        })?;
    let outbox = Outbox::open(path).map_err(Error::outbox)?;
    let base = sending.base.to_owned();
    let mut builder = Dispatcher::builder(outbox, sending.attempt)
        .layer(sending.layer)
        .recovery(sending.recovery)
        .origin(&origin)
        .fallback(move |entry: &Entry, _: StatusCode, failure: &str| {
            fallback(&base, entry, failure)
        });
    if let Some(interval) = settings.replay_interval {
        builder = builder.replay_interval(interval);
    }
    if let Some(concurrency) = settings.replay_concurrency {
        builder = builder.replay_concurrency(concurrency);
    }
    if let Some(rate) = settings.replay_rate {
        builder = builder.replay_rate(rate);
    }
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
    if terminal_action(entry)? != TerminalAction::Complete {
        return None;
    }
    let completion: Completion = serde_json::from_slice(&entry.body).ok()?;
    let failure = completion.fallback(format!("complete task failed: {failure}"));
    let mut request = entry.request();
    *request.uri_mut() = format!("{base}{}", Action::Fail.path(&entry.key))
        .parse()
        .ok()?;
    *request.body_mut() = body::json(&failure);
    request.extensions_mut().insert(tag(TerminalAction::Fail));
    Some(request)
}

/// The route a stored report goes to, from its tag; none for a record the
/// client did not store.
fn terminal_action(entry: &Entry) -> Option<TerminalAction> {
    let tag = entry.tag.as_deref()?;
    [TerminalAction::Complete, TerminalAction::Fail]
        .into_iter()
        .find(|action| route(*action).as_str() == tag)
}

fn route(action: TerminalAction) -> Action {
    match action {
        TerminalAction::Complete => Action::Complete,
        TerminalAction::Fail => Action::Fail,
    }
}

/// The tag a report to `action` is stored with: the route's name.
fn tag(action: TerminalAction) -> Tag {
    Tag::new(route(action).as_str())
}

/// The report kept in `entry`; none for a record the client did not store.
pub(super) fn stored_report(entry: &Entry) -> Option<StoredReport> {
    Some(StoredReport {
        task_id: entry.key.clone(),
        action: terminal_action(entry)?,
        attempts: entry.attempts,
        stored_at: entry.stored_at,
        last_failure: entry.last_failure.clone(),
    })
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
    let (action, body) = match &result.report {
        Report::Completed(completion) => (TerminalAction::Complete, body::json(completion)),
        Report::Failed(failure) => (TerminalAction::Fail, body::json(failure)),
    };
    let completed = action == TerminalAction::Complete;
    let mut request = match transport.request(&route(action).path(task_id), body) {
        Ok(request) => request,
        Err(error) => {
            tracing::error!(task_id, error = %error, "terminal report cannot be made");
            signal.tell(Durability::Refused);
            return ReportOutcome::NotDelivered;
        }
    };
    request.extensions_mut().insert(tag(action));
    if !signal.store.hand_over() {
        // `shutdown` took it first, and returns it.
        return ReportOutcome::Abandoned;
    }
    let mut dispatch = dispatcher.send(task_id, request);
    signal.tell(dispatch.stored().await);
    match dispatch.await {
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
                "complete task failed after retries and could not be stored; leaving the task \
                 running rather than falling back to fail"
            );
            ReportOutcome::LeftRunning
        }
        Delivery::Undelivered { failure, .. } => {
            tracing::error!(task_id, failure, "terminal report not delivered nor stored");
            ReportOutcome::NotDelivered
        }
    }
}
