//! Terminal reports kept in an outbox until the server takes them.

use std::time::SystemTime;

use bytes::Bytes;
use http::{uri::PathAndQuery, Request, StatusCode, Uri};

use super::{
    builder::OutboxSettings,
    report::{superseded, Report, StoredSignal},
    Action, Attempt, CompleteTask, Error, ReportOutcome, TaskClient,
};
use crate::{
    outbox::{Delivery, Dispatcher, Durability, Entry, Outbox},
    Recovery, TerminalRetryLayer,
};

/// A terminal report kept in the outbox: listed by
/// [`TaskClient::pending_reports`] and [`TaskClient::quarantined_reports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReport {
    task_id: String,
    action: Action,
    attempts: u32,
    stored_at: SystemTime,
    last_failure: Option<String>,
}

impl StoredReport {
    fn from_entry(entry: &Entry) -> Option<StoredReport> {
        let action = entry.uri().path().rsplit('/').next()?;
        let action = [Action::Complete, Action::Fail]
            .into_iter()
            .find(|candidate| candidate.as_str() == action)?;
        Some(StoredReport {
            task_id: entry.key().to_owned(),
            action,
            attempts: entry.attempts(),
            stored_at: entry.stored_at(),
            last_failure: entry.last_failure().map(str::to_owned),
        })
    }

    /// The task it is about.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The route it goes to: [`Action::Complete`] or [`Action::Fail`] (the
    /// fallback of a completion refused for good).
    pub fn action(&self) -> Action {
        self.action
    }

    /// Attempts made so far, across restarts.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When it was first stored.
    pub fn stored_at(&self) -> SystemTime {
        self.stored_at
    }

    /// How the last attempt failed, if one did.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }
}

/// How the client's reports are sent: what its dispatcher needs of it.
pub(super) struct Sending<'a> {
    pub(super) attempt: Attempt,
    pub(super) layer: TerminalRetryLayer,
    pub(super) recovery: Option<Recovery>,
    /// The base URL: only its origin gets stored reports.
    pub(super) base: &'a str,
    /// Redacted from whatever the server sends back.
    pub(super) token: Option<&'a str>,
}

/// Opens the outbox and starts its replay worker.
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
    let mut builder = Dispatcher::builder(outbox, sending.attempt)
        .layer(sending.layer)
        .recovery(sending.recovery)
        .origin(&origin)
        .fallback(fallback)
        .replay_interval(settings.replay_interval)
        .replay_concurrency(settings.replay_concurrency)
        .replay_rate(settings.replay_rate);
    if let Some(token) = sending.token {
        builder = builder.redact(token);
    }
    builder
        .build()
        .map_err(|error| Error::config(error.to_string(), Some(error.into())))
}

/// The fail report that replaces a completion the server refused for good,
/// with reason `agent_error`; none for a refused fail report.
fn fallback(entry: &Entry, _status: StatusCode, failure: &str) -> Option<Request<Bytes>> {
    let task_path = entry.uri().path().strip_suffix(Action::Complete.as_str())?;
    let complete = CompleteTask::from_json(entry.body())?;
    let fail = complete.fallback(format!("complete task failed: {failure}"));
    let path = PathAndQuery::try_from(format!("{task_path}{}", Action::Fail.as_str())).ok()?;
    let mut parts = entry.uri().clone().into_parts();
    parts.path_and_query = Some(path);
    let mut request = entry.request();
    *request.uri_mut() = Uri::from_parts(parts).ok()?;
    *request.body_mut() = fail.to_json();
    Some(request)
}

/// Delivers `report` through the outbox.
pub(super) async fn deliver(
    client: &TaskClient,
    dispatcher: &Dispatcher<Attempt>,
    task_id: &str,
    report: Report,
    stored: StoredSignal,
) -> ReportOutcome {
    let completed = matches!(report, Report::Completed(_));
    let (action, body) = match &report {
        Report::Completed(complete) => (Action::Complete, complete.to_json()),
        Report::Failed(fail) => (Action::Fail, fail.to_json()),
    };
    let request = match client.request(&action.path(task_id), body) {
        Ok(request) => request,
        Err(error) => {
            tracing::error!(task_id, error = %error, "terminal report cannot be made");
            stored.tell(Durability::NoOutbox);
            return ReportOutcome::NotDelivered;
        }
    };
    if !stored.hand_over() {
        // `shutdown` took it first, and returns it.
        return ReportOutcome::Abandoned;
    }
    let mut dispatch = dispatcher.send(task_id, request);
    stored.tell(dispatch.stored().await);
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
        Delivery::Superseded => superseded(task_id),
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

impl TaskClient {
    /// The terminal reports stored and not yet delivered, oldest first:
    /// readable right after [`build`](super::TaskClientBuilder::build),
    /// before any replay, so that a daemon can skip its orphan handling for
    /// tasks whose result is already safe. Empty without an outbox.
    ///
    /// # Errors
    ///
    /// The outbox cannot be read.
    pub fn pending_reports(&self) -> Result<Vec<StoredReport>, Error> {
        self.stored(Outbox::pending)
    }

    /// The terminal reports the server refused for good with nothing left to
    /// fall back to (a refused `fail`): kept, not retried, until
    /// [`requeue_report`](TaskClient::requeue_report) or
    /// [`discard_report`](TaskClient::discard_report). Empty without an
    /// outbox.
    ///
    /// # Errors
    ///
    /// The outbox cannot be read.
    pub fn quarantined_reports(&self) -> Result<Vec<StoredReport>, Error> {
        self.stored(Outbox::quarantined)
    }

    /// Puts the quarantined report of `task_id` back among the pending ones,
    /// to be delivered again (within the replay interval). `false` when
    /// none is quarantined, or without an outbox.
    ///
    /// # Errors
    ///
    /// The outbox cannot be written.
    pub async fn requeue_report(&self, task_id: &str) -> Result<bool, Error> {
        match &self.inner.dispatcher {
            Some(dispatcher) => dispatcher
                .outbox()
                .requeue(task_id)
                .await
                .map_err(Error::outbox),
            None => Ok(false),
        }
    }

    /// Deletes the stored report of `task_id`, pending or quarantined, for
    /// good. `false` when there is none, or without an outbox.
    ///
    /// # Errors
    ///
    /// The outbox cannot be written.
    pub async fn discard_report(&self, task_id: &str) -> Result<bool, Error> {
        match &self.inner.dispatcher {
            Some(dispatcher) => dispatcher
                .outbox()
                .discard(task_id)
                .await
                .map_err(Error::outbox),
            None => Ok(false),
        }
    }

    fn stored(
        &self,
        list: impl Fn(&Outbox) -> Result<Vec<Entry>, crate::outbox::OutboxError>,
    ) -> Result<Vec<StoredReport>, Error> {
        let Some(dispatcher) = &self.inner.dispatcher else {
            return Ok(Vec::new());
        };
        let entries = list(dispatcher.outbox()).map_err(Error::outbox)?;
        Ok(entries
            .iter()
            .filter_map(StoredReport::from_entry)
            .collect())
    }
}
