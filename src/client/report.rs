//! The data of terminal reports: what a daemon reports when an agent
//! finishes, how a report ended, and what is left of one undelivered.

/// An agent's result, the one report of the terminal routes: a completion,
/// sent to `complete`, or a failure, sent to `fail`.
///
/// Sent by [`TaskClient::report_task_result`](super::TaskClient::report_task_result),
/// with its fallback rules.
///
/// ```
/// use tower_terminal_retry::client::{Completion, TaskResult};
///
/// let done = TaskResult::completed("all done");
/// let pushed = TaskResult::Completed(Completion {
///     output: "all done".into(),
///     branch_name: "feature/x".into(),
///     ..Completion::default()
/// });
/// assert!(matches!(done, TaskResult::Completed(_)));
/// # let _ = pushed;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskResult {
    /// The agent finished its work.
    Completed(Completion),
    /// The agent failed.
    Failed(Failure),
}

impl TaskResult {
    /// The agent finished its work, with this output and nothing else.
    pub fn completed(output: impl Into<String>) -> TaskResult {
        TaskResult::Completed(Completion {
            output: output.into(),
            ..Completion::default()
        })
    }

    /// The agent failed, with this error and nothing else.
    pub fn failed(error: impl Into<String>) -> TaskResult {
        TaskResult::Failed(Failure {
            error: error.into(),
            ..Failure::default()
        })
    }
}

/// What a completed agent reports: the body of `complete`,
/// `{output, branch_name?, session_id?, work_dir?}`.
///
/// An empty string is not sent (the server takes absent and empty alike),
/// and NUL bytes are removed from every string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    /// The agent's output.
    pub output: String,
    /// The branch the agent pushed to.
    pub branch_name: String,
    /// The agent's session, so the task can be resumed.
    pub session_id: String,
    /// The directory the agent worked in.
    pub work_dir: String,
}

/// What a failed agent reports: the body of `fail`,
/// `{error, session_id?, work_dir?, failure_reason?}`.
///
/// An empty string is not sent, and NUL bytes are removed from every
/// string, as for a [`Completion`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub error: String,
    /// The failure's machine-readable reason, such as `agent_error` or
    /// `timeout`.
    pub failure_reason: String,
    /// The agent's session, so the task can be resumed.
    pub session_id: String,
    /// The directory the agent worked in.
    pub work_dir: String,
}

impl Completion {
    /// The failure sent when the server refuses this completion for good:
    /// same session and work dir, reason `agent_error`.
    pub(super) fn fallback(&self, error: String) -> Failure {
        Failure {
            error,
            failure_reason: "agent_error".to_owned(),
            session_id: self.session_id.clone(),
            work_dir: self.work_dir.clone(),
        }
    }
}

/// How a terminal report ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReportOutcome {
    /// The server took the completion.
    Completed,
    /// The server took the failure.
    Failed,
    /// The server refused the completion for good (a 4xx other than 408 and
    /// 429), and took the failure sent instead, with reason `agent_error`.
    FellBackToFail,
    /// The completion still failed transiently after the whole schedule. No
    /// failure was sent, as it would turn a success red: the task stays
    /// running on the server until something recovers it.
    ///
    /// Precisely: no success answer was received. A proxy that gave up on
    /// its upstream (a 502 or 504) may still have passed the request on, so
    /// the server may have taken it after all.
    LeftRunning,
    /// The failure (reported, or the fallback of a refused completion) did not
    /// reach the server: no success answer was received. As with
    /// [`LeftRunning`](ReportOutcome::LeftRunning), a proxy in between may
    /// still have passed it on.
    NotDelivered,
    /// [`TaskClient::shutdown`](super::TaskClient::shutdown) stopped the delivery, and returned it among
    /// the undelivered reports.
    Abandoned,
    /// With an outbox: the report is stored and will be delivered later, by
    /// the replay worker of this client or of the next one on the same
    /// file. Transient failures outlived the schedule (where, without an
    /// outbox, a completion is [`LeftRunning`](ReportOutcome::LeftRunning)),
    /// or [`TaskClient::shutdown`](super::TaskClient::shutdown) stopped the delivery.
    Queued,
    /// With an outbox: the server refused the report for good with nothing
    /// left to fall back to (a refused `fail`). It is kept, not retried, and
    /// listed by the outbox's [`quarantined`](crate::outbox::Outbox::quarantined)
    /// ([`TaskClient::outbox`](super::TaskClient::outbox)).
    Quarantined,
    /// With an outbox: a report for this task is still stored. It stands (as
    /// on the server, the first terminal report wins); this one was neither
    /// stored nor sent.
    AlreadyStored,
    /// The server answered `409 Conflict`: the task belongs to another run
    /// (it was dispatched again), or already ended differently. No fallback
    /// `fail` is sent, as it could fail the other run. With an outbox the
    /// report is retired (an event at `warn`): neither pending nor
    /// quarantined.
    Superseded,
    /// The task id is empty, holds a control character or is longer than
    /// 1024 bytes: nothing was sent or stored (an `error` event says which).
    InvalidTaskId,
}

impl ReportOutcome {
    /// A `409 Conflict` to a terminal report: the task is another run's now.
    pub(super) fn superseded(task_id: &str) -> ReportOutcome {
        tracing::warn!(
            task_id,
            "the server answered 409 Conflict: the task belongs to another run or already ended; \
             no fallback is sent"
        );
        ReportOutcome::Superseded
    }
}

/// A report [`TaskClient::shutdown`](super::TaskClient::shutdown) stopped
/// before it was delivered, to be reported again later.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UndeliveredReport {
    /// The task it was about.
    pub task_id: String,
    /// The result it carried.
    pub result: TaskResult,
}
