//! [`TaskClient`]: a daemon's calls of its task routes.

use std::{fmt, sync::Arc, time::Duration};

use tokio::runtime::Handle;

use super::transport::Attempt;
use super::{
    body::{self, Progress, Session, Usage, UsageEntry},
    delivery::{Destination, ReportFuture},
    error::Error,
    in_flight::InFlight,
    report::{ReportOutcome, TaskResult, UndeliveredReport},
    route::{check_task_id, Action},
    transport::Transport,
};
use crate::outbox::{Dispatcher, Outbox};

/// Sends a daemon's task callbacks: see the [module docs](super).
///
/// Cloning is cheap: clones share the connection pool and the reports in
/// flight.
#[derive(Clone)]
pub struct TaskClient {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<Transport>,
    /// The one path of terminal reports: sends, falls back, settles; with
    /// an outbox, stores and replays.
    dispatcher: Dispatcher<Attempt>,
    /// Where terminal reports are delivered.
    runtime: Handle,
    reports: InFlight,
}

impl TaskClient {
    /// A client over `transport`, delivering its reports on `runtime`.
    pub(super) fn new(
        transport: Transport,
        dispatcher: Dispatcher<Attempt>,
        runtime: Handle,
    ) -> TaskClient {
        TaskClient {
            inner: Arc::new(Inner {
                transport: Arc::new(transport),
                dispatcher,
                runtime,
                reports: InFlight::default(),
            }),
        }
    }

    /// Tells the server the agent started on the task: `POST .../start`, once.
    ///
    /// # Errors
    ///
    /// The server's rejection or a transport error; see [`Error`].
    pub async fn start_task(&self, task_id: &str) -> Result<(), Error> {
        self.inner
            .transport
            .send_once(Action::Start, task_id, body::EMPTY)
            .await
    }

    /// Reports progress, step `step` of `total`: `POST .../progress` with
    /// `{summary, step, total}`, once.
    ///
    /// # Errors
    ///
    /// The server's rejection or a transport error; see [`Error`].
    pub async fn report_progress(
        &self,
        task_id: &str,
        summary: &str,
        step: u32,
        total: u32,
    ) -> Result<(), Error> {
        let body = body::json(&Progress {
            summary,
            step,
            total,
        });
        self.inner
            .transport
            .send_once(Action::Progress, task_id, body)
            .await
    }

    /// Reports the tokens used: `POST .../usage` with `{usage: [...]}`, once.
    /// An empty list sends nothing.
    ///
    /// # Errors
    ///
    /// The server's rejection or a transport error; see [`Error`].
    pub async fn report_usage(&self, task_id: &str, usage: &[UsageEntry]) -> Result<(), Error> {
        check_task_id(task_id)?;
        if usage.is_empty() {
            return Ok(());
        }
        let body = body::json(&Usage { usage });
        self.inner
            .transport
            .send_once(Action::Usage, task_id, body)
            .await
    }

    /// Records the agent's session and work dir on the task, so it can be
    /// resumed: `POST .../session` with `{session_id?, work_dir?}`, once.
    /// Nothing is sent when both are empty.
    ///
    /// # Errors
    ///
    /// The server's rejection or a transport error; see [`Error`].
    pub async fn pin_session(
        &self,
        task_id: &str,
        session_id: &str,
        work_dir: &str,
    ) -> Result<(), Error> {
        check_task_id(task_id)?;
        let session = Session {
            session_id,
            work_dir,
        };
        if session.is_empty() {
            return Ok(());
        }
        self.inner
            .transport
            .send_once(Action::Session, task_id, body::json(&session))
            .await
    }

    /// Reports an agent's result, completed or failed, with the fallback rules
    /// of the [module docs](super).
    ///
    /// The delivery starts now, on a task of the runtime the client was built
    /// in, and goes on if the returned future is dropped. It is bounded in
    /// time: at most two terminal calls, each at most the schedule's attempts,
    /// delays and per-attempt timeouts (a `Retry-After` may stretch a delay,
    /// up to its cap).
    ///
    /// A task id that is refused (see the [module docs](super)) resolves at
    /// once to [`ReportOutcome::InvalidTaskId`]: nothing is sent or stored.
    pub fn report_task_result(&self, task_id: &str, result: TaskResult) -> ReportFuture {
        if let Err(error) = check_task_id(task_id) {
            tracing::error!(error = %error, "terminal report refused");
            return ReportFuture::refused(ReportOutcome::InvalidTaskId);
        }
        let inner = &self.inner;
        let destination = Destination {
            transport: &inner.transport,
            reports: &inner.reports,
            runtime: &inner.runtime,
            dispatcher: &inner.dispatcher,
        };
        ReportFuture::start(destination, task_id, result)
    }

    /// Waits up to `grace` for the reports in flight, then stops those still
    /// running and returns them, in the order they were started, so the
    /// caller can keep them for later; nothing vanishes silently.
    ///
    /// Reports started while it waits are waited for too.
    pub async fn shutdown(&self, grace: Duration) -> Vec<UndeliveredReport> {
        self.inner.reports.settle(grace).await
    }

    /// How many terminal reports are being delivered.
    pub fn reports_in_flight(&self) -> usize {
        self.inner.reports.len()
    }
}

impl TaskClient {
    /// The outbox its terminal reports are kept in, if it has one
    /// ([`TaskClientBuilder::outbox`](super::TaskClientBuilder::outbox)):
    /// what is stored and not yet delivered ([`Outbox::pending`], readable
    /// right after [`build`](super::TaskClientBuilder::build), before any
    /// replay, so that a daemon can skip its orphan handling for tasks whose
    /// result is already safe), what the server refused for good
    /// ([`Outbox::quarantined`]), and [`Outbox::requeue`] or
    /// [`Outbox::discard`]. A report's [`Entry::key`](crate::outbox::Entry::key)
    /// is its task id, its [`Entry::tag`](crate::outbox::Entry::tag) its
    /// route, `complete` or `fail`.
    pub fn outbox(&self) -> Option<&Outbox> {
        self.inner.dispatcher.outbox()
    }
}

impl fmt::Debug for TaskClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = &self.inner.transport;
        f.debug_struct("TaskClient")
            .field("base_url", &transport.base)
            .field("token", &transport.token.as_ref().map(|_| "<redacted>"))
            .field("client_version", &transport.client_version)
            .field("schedule", &transport.schedule.delays())
            .field("timeout", &transport.timeout)
            .field("reports_in_flight", &self.inner.reports.len())
            .finish()
    }
}
