//! The data of terminal reports: what a daemon reports when an agent
//! finishes, how a report ended, and what is left of one undelivered.

use super::body::{Completion, Failure};

/// An agent's result, the one report of the terminal routes: a completion
/// (`complete`) or a failure (`fail`), with what goes along.
///
/// Sent by [`TaskClient::report_task_result`](super::TaskClient::report_task_result),
/// with its fallback rules, or by
/// [`TaskClient::send_task_result`](super::TaskClient::send_task_result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskResult {
    pub(super) report: Report,
}

/// The body a [`TaskResult`] is sent as, and so its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Report {
    Completed(Completion),
    Failed(Failure),
}

impl TaskResult {
    /// The agent finished its work, with this output.
    pub fn completed(output: impl Into<String>) -> TaskResult {
        TaskResult {
            report: Report::Completed(Completion {
                output: output.into(),
                ..Completion::default()
            }),
        }
    }

    /// The agent failed, with this error.
    pub fn failed(error: impl Into<String>) -> TaskResult {
        TaskResult {
            report: Report::Failed(Failure {
                error: error.into(),
                ..Failure::default()
            }),
        }
    }

    /// The branch the agent pushed to; sent with a completed result only.
    pub fn branch_name(mut self, branch_name: impl Into<String>) -> TaskResult {
        if let Report::Completed(completion) = &mut self.report {
            completion.branch_name = branch_name.into();
        }
        self
    }

    /// The failure's machine-readable reason, such as `agent_error` or
    /// `timeout`; sent with a failed result only.
    pub fn failure_reason(mut self, failure_reason: impl Into<String>) -> TaskResult {
        if let Report::Failed(failure) = &mut self.report {
            failure.failure_reason = failure_reason.into();
        }
        self
    }

    /// The agent's session, so the task can be resumed.
    pub fn session_id(mut self, session_id: impl Into<String>) -> TaskResult {
        let session_id = session_id.into();
        match &mut self.report {
            Report::Completed(completion) => completion.session_id = session_id,
            Report::Failed(failure) => failure.session_id = session_id,
        }
        self
    }

    /// The directory the agent worked in.
    pub fn work_dir(mut self, work_dir: impl Into<String>) -> TaskResult {
        let work_dir = work_dir.into();
        match &mut self.report {
            Report::Completed(completion) => completion.work_dir = work_dir,
            Report::Failed(failure) => failure.work_dir = work_dir,
        }
        self
    }

    /// Whether the agent completed its work.
    pub fn is_completed(&self) -> bool {
        matches!(self.report, Report::Completed(_))
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
