//! A task-callback client: a daemon's reports to its server, with the terminal
//! ones retried until they land.
//!
//! [`TaskClient`] sends a daemon's task callbacks over hyper-util's client.
//! The terminal routes, [`complete_task`](TaskClient::complete_task) and
//! [`fail_task`](TaskClient::fail_task), go through the
//! [`TerminalRetryLayer`](crate::TerminalRetryLayer) with a per-attempt
//! timeout inside it; the others (start, progress, usage, session) are tried
//! once, through the same connection pool.
//!
//! [`report_task_result`](TaskClient::report_task_result) is what a daemon
//! calls when an agent finishes:
//!
//! - a completed result is sent to `complete`. If it still fails transiently
//!   after the whole schedule, the task is left running (an `error` event):
//!   reporting a failure instead would turn a success red. Only a permanent
//!   rejection falls back to `fail`, once, with reason `agent_error`;
//! - any other result is sent to `fail`;
//! - the delivery runs on its own tokio task: dropping the returned future
//!   does not stop it, and [`TaskClient::shutdown`] waits for the reports in
//!   flight and hands back those that could not be delivered.
//!
//! With an outbox (`TaskClientBuilder::outbox`, feature `outbox`), each
//! report is committed to disk before its first attempt
//! (`ReportFuture::stored` says when). A completion whose retries run out is
//! then [`Queued`](ReportOutcome::Queued) instead of left running, and a
//! replay worker delivers it once the server is back, across restarts; the
//! `outbox` module says what that guarantees.
//!
//! All routes share one [`Recovery`], on by default
//! ([`TaskClientBuilder::recovery`]): any successful call (a `start`, a
//! `progress`, a report) ends the backoff of the terminal reports waiting on
//! the same server, at most
//! [`DEFAULT_RELEASE_PER_SECOND`](crate::recovery::DEFAULT_RELEASE_PER_SECOND)
//! a second.
//!
//! Every request is a `POST` of JSON to `{base}/api/daemon/tasks/{id}/...`
//! (the id path-escaped) with `Content-Type: application/json`,
//! `X-Client-Platform: daemon`, `X-Client-OS` (`linux`, `macos`, `windows`),
//! `X-Client-Version` when set and `Authorization: Bearer` when a token is
//! set, marked sensitive and sent to the base URL's origin only. NUL bytes
//! are removed from every string in a body. A task id that is empty, holds a
//! control character (NUL included) or is longer than
//! [`MAX_TASK_ID`] bytes is refused before anything is sent or stored.
//!
//! At most [`concurrency_limit`](TaskClientBuilder::concurrency_limit)
//! requests are in flight at once (by default [`DEFAULT_CONCURRENCY_LIMIT`]),
//! across every route and the outbox's replay. Only a 2xx answer is a
//! success: a redirect is not followed (the error names where it points,
//! set the base URL to the final URL). Text taken from the server's answers
//! (error bodies) is cleaned before it goes into an [`Error`], an event, a
//! fallback report or the outbox: the client's token is replaced by
//! `[redacted]`, control characters are escaped, and it is cut to 4 KiB.
//!
//! ```
//! use std::time::Duration;
//! use http::StatusCode;
//! use tower_terminal_retry::client::{ReportOutcome, TaskClient, TaskResult};
//! use tower_terminal_retry::test_server::{Action, Fault, TaskServer, TaskState};
//! use tower_terminal_retry::Schedule;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = TaskServer::start().await?;
//! server.add_task("t1");
//! // The first two attempts of `complete` meet a 502.
//! let bad_gateway = Fault::Status(StatusCode::BAD_GATEWAY);
//! server.script("t1", Action::Complete, [bad_gateway; 2]);
//!
//! let client = TaskClient::builder(server.url())
//!     .token("secret")
//!     .terminal_schedule(Schedule::new([Duration::from_secs(1); 3])?)
//!     .build()?;
//! let outcome = client.report_task_result("t1", TaskResult::completed("all done")).await;
//!
//! assert_eq!(outcome, ReportOutcome::Completed);
//! assert_eq!(server.state("t1"), Some(TaskState::Completed));
//! assert_eq!(server.attempts_of("t1", Action::Complete), 3);
//! assert_eq!(server.attempts_of("t1", Action::Fail), 0);
//! # Ok(())
//! # }
//! ```

mod body;
mod builder;
#[cfg(feature = "outbox")]
mod durable;
mod error;
mod report;

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use tokio::runtime::Handle;
use tower::{limit::ConcurrencyLimit, timeout::Timeout, BoxError, Service, ServiceExt};
use tower_http::{sensitive_headers::SetSensitiveRequestHeaders, set_header::SetRequestHeader};
use tracing::Instrument;

pub use body::{CompleteTask, FailTask, UsageEntry};
pub use builder::{TaskClientBuilder, DEFAULT_CONCURRENCY_LIMIT, DEFAULT_TIMEOUT};
#[cfg(feature = "outbox")]
pub use durable::StoredReport;
pub use error::Error;
pub use report::{ReportFuture, ReportOutcome, TaskResult, UndeliveredReport};

use crate::{
    classify::{Classify, DefaultClassifier, Outcome},
    Recovery, Schedule, TerminalRetry,
};
use builder::{Connector, Credentials};
use report::InFlight;

/// One attempt: hyper-util's client under a timeout, waiting its turn under
/// the concurrency limit, with the token for the client's own origin.
type Attempt = SetRequestHeader<
    SetSensitiveRequestHeaders<ConcurrencyLimit<Timeout<Client<Connector, Full<Bytes>>>>>,
    Credentials,
>;

/// The longest task id accepted, in bytes.
pub const MAX_TASK_ID: usize = 1024;

/// Sends a daemon's task callbacks: see the [module docs](self).
///
/// Cloning is cheap: clones share the connection pool and the reports in
/// flight.
#[derive(Clone)]
pub struct TaskClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// `scheme://authority/prefix`, no trailing slash.
    base: String,
    /// Sent with every request (the token is added per attempt).
    headers: HeaderMap,
    /// Kept to redact it from whatever the server sends back.
    token: Option<String>,
    client_version: Option<String>,
    schedule: Schedule,
    timeout: Duration,
    /// Told of every success; releases parked terminal reports.
    recovery: Option<Recovery>,
    /// The routes tried once.
    single: Attempt,
    /// `complete` and `fail`, retried.
    terminal: TerminalRetry<Attempt>,
    /// Where terminal reports are made durable, if anywhere.
    #[cfg(feature = "outbox")]
    dispatcher: Option<crate::outbox::Dispatcher<Attempt>>,
    /// Where terminal reports are delivered.
    runtime: Handle,
    reports: InFlight,
}

/// Where the task routes start, below the base URL.
pub(crate) const TASKS_PATH: &str = "/api/daemon/tasks/";

/// The routes of a task, `POST {base}/api/daemon/tasks/{id}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `start`: the agent started on the task.
    Start,
    /// `progress`: `{summary, step, total}`.
    Progress,
    /// `usage`: `{usage: [...]}`.
    Usage,
    /// `session`: `{session_id?, work_dir?}`.
    Session,
    /// `complete`: `{output, ...}`; terminal, retried.
    Complete,
    /// `fail`: `{error, ...}`; terminal, retried.
    Fail,
}

impl Action {
    /// Every route, in the order above.
    pub const ALL: [Action; 6] = [
        Action::Start,
        Action::Progress,
        Action::Usage,
        Action::Session,
        Action::Complete,
        Action::Fail,
    ];

    /// The last segment of the route.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Progress => "progress",
            Action::Usage => "usage",
            Action::Session => "session",
            Action::Complete => "complete",
            Action::Fail => "fail",
        }
    }

    /// The path of this route for `task_id`, the id path-escaped.
    pub fn path(self, task_id: &str) -> String {
        format!("{TASKS_PATH}{}/{}", escape_segment(task_id), self.as_str())
    }
}

impl TaskClient {
    /// Starts configuring a client for the server at `base_url`, such as
    /// `http://127.0.0.1:8080` (a path prefix is kept).
    pub fn builder(base_url: impl Into<String>) -> TaskClientBuilder {
        TaskClientBuilder::new(base_url.into())
    }

    /// Tells the server the agent started on the task: `POST .../start`, once.
    ///
    /// # Errors
    ///
    /// The server's rejection or a transport error; see [`Error`].
    pub async fn start_task(&self, task_id: &str) -> Result<(), Error> {
        self.send_once(Action::Start, task_id, body::empty_json())
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
        let body = body::progress_json(summary, step, total);
        self.send_once(Action::Progress, task_id, body).await
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
        self.send_once(Action::Usage, task_id, body::usage_json(usage))
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
        let only_nul = |text: &str| text.bytes().all(|byte| byte == 0);
        if only_nul(session_id) && only_nul(work_dir) {
            return Ok(());
        }
        let body = body::session_json(session_id, work_dir);
        self.send_once(Action::Session, task_id, body).await
    }

    /// Reports the task completed: `POST .../complete`, retried on transient
    /// failures along the terminal schedule.
    ///
    /// # Errors
    ///
    /// A permanent rejection at once, or the last transient failure once the
    /// schedule is exhausted; see [`Error::is_transient`].
    pub async fn complete_task(&self, task_id: &str, complete: &CompleteTask) -> Result<(), Error> {
        let inner = &self.inner;
        self.send(
            &inner.terminal,
            Action::Complete,
            task_id,
            complete.to_json(),
        )
        .await
    }

    /// Reports the task failed: `POST .../fail`, retried on transient failures
    /// along the terminal schedule.
    ///
    /// # Errors
    ///
    /// A permanent rejection at once, or the last transient failure once the
    /// schedule is exhausted; see [`Error::is_transient`].
    pub async fn fail_task(&self, task_id: &str, fail: &FailTask) -> Result<(), Error> {
        let inner = &self.inner;
        self.send(&inner.terminal, Action::Fail, task_id, fail.to_json())
            .await
    }

    /// Reports an agent's result, completed or failed, with the fallback rules
    /// of the [module docs](self).
    ///
    /// The delivery starts now, on a task of the runtime the client was built
    /// in, and goes on if the returned future is dropped. It is bounded in
    /// time: at most two terminal calls, each at most the schedule's attempts,
    /// delays and per-attempt timeouts (a `Retry-After` may stretch a delay,
    /// up to its cap).
    ///
    /// A task id that is refused (see the [module docs](self)) resolves at
    /// once to [`ReportOutcome::InvalidTaskId`]: nothing is sent or stored.
    pub fn report_task_result(&self, task_id: &str, result: TaskResult) -> ReportFuture {
        if let Err(error) = check_task_id(task_id) {
            tracing::error!(error = %error, "terminal report refused");
            return ReportFuture::ready(ReportOutcome::InvalidTaskId);
        }
        let client = self.clone();
        let reported = task_id.to_owned();
        let tracked = (task_id.to_owned(), result.clone());
        self.inner
            .reports
            .spawn(&self.inner.runtime, tracked, move |id, stored| {
                async move {
                    let outcome = report::deliver(&client, &reported, result, stored).await;
                    client.inner.reports.finish(id);
                    outcome
                }
                // The delivery's events stay in the caller's span.
                .instrument(tracing::Span::current())
            })
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

    async fn send_once(&self, route: Action, task_id: &str, body: Bytes) -> Result<(), Error> {
        self.send(&self.inner.single, route, task_id, body).await
    }

    /// `POST {base}{path}` with the client's headers and `body`.
    fn request(&self, path: &str, body: Bytes) -> Result<Request<Bytes>, Error> {
        let mut request = Request::post(format!("{}{path}", self.inner.base))
            .body(body)
            .map_err(|error| {
                Error::config(
                    format!("no request can be made for {path}"),
                    Some(error.into()),
                )
            })?;
        *request.headers_mut() = self.inner.headers.clone();
        Ok(request)
    }

    /// Sends one request through `service` and sorts its result with the
    /// classifier the retry layer uses.
    async fn send<S>(
        &self,
        service: &S,
        route: Action,
        task_id: &str,
        body: Bytes,
    ) -> Result<(), Error>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Incoming>, Error = BoxError> + Clone,
    {
        check_task_id(task_id)?;
        let path = route.path(task_id);
        let request = self.request(&path, body)?.map(Full::new);
        // Kept only for the recovery signal.
        let uri = self.inner.recovery.as_ref().map(|_| request.uri().clone());

        let result = service.clone().oneshot(request).await;
        let outcome = DefaultClassifier.classify(&result);
        if let (Outcome::Success, Some(recovery), Some(uri)) = (outcome, &self.inner.recovery, &uri)
        {
            // The terminal layer tells it itself; the routes tried once do not.
            recovery.observe(uri);
        }
        let response = result
            .map_err(|source| Error::transport(Method::POST, path.clone(), source, outcome))?;
        let status = response.status();
        let redirect = crate::response::redirect_note(status, response.headers());
        // Read even on success, so the connection goes back to the pool.
        let body =
            crate::response::body_start(response.into_body(), self.inner.timeout, &self.secrets())
                .await;
        let body = redirect.unwrap_or(body);
        match outcome {
            Outcome::Success => Ok(()),
            Outcome::Transient | Outcome::Permanent => {
                Err(Error::rejected(Method::POST, path, status, body, outcome))
            }
        }
    }
}

impl fmt::Debug for TaskClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("TaskClient")
            .field("base_url", &inner.base)
            .field("token", &inner.token.as_ref().map(|_| "<redacted>"))
            .field("client_version", &inner.client_version)
            .field("terminal_schedule", &inner.schedule.delays())
            .field("timeout", &inner.timeout)
            .field("reports_in_flight", &inner.reports.len())
            .finish()
    }
}

impl TaskClient {
    /// What never leaves the client in text taken from a response.
    fn secrets(&self) -> Vec<&str> {
        self.inner.token.as_deref().into_iter().collect()
    }
}

/// Refuses a task id that is empty, holds a control character or is longer
/// than [`MAX_TASK_ID`]; the message quotes none of it.
fn check_task_id(task_id: &str) -> Result<(), Error> {
    let reason = if task_id.is_empty() {
        "is empty"
    } else if task_id.len() > MAX_TASK_ID {
        "is longer than 1024 bytes"
    } else if task_id.chars().any(char::is_control) {
        "holds a control character"
    } else {
        return Ok(());
    };
    Err(Error::config(format!("the task id {reason}"), None))
}

/// Percent-encodes everything but the unreserved characters of RFC 3986, so
/// an id is one path segment whatever it holds; the dots of `.` and `..` too,
/// which a proxy would otherwise resolve as "this" and "parent".
fn escape_segment(segment: &str) -> String {
    use std::fmt::Write;

    let dots_only = segment.bytes().all(|byte| byte == b'.');
    let mut escaped = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        let unreserved = byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~');
        if unreserved || (byte == b'.' && !dots_only) {
            escaped.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(escaped, "%{byte:02X}");
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped_into_one_segment() {
        assert_eq!(escape_segment("t-1_a.b~"), "t-1_a.b~");
        assert_eq!(escape_segment("a/b c?d#%"), "a%2Fb%20c%3Fd%23%25");
        assert_eq!(escape_segment("é"), "%C3%A9");
        assert_eq!(escape_segment(".."), "%2E%2E");
        assert_eq!(escape_segment("v1.2"), "v1.2");
        assert_eq!(
            Action::Complete.path("../x"),
            "/api/daemon/tasks/..%2Fx/complete"
        );
    }
}
