//! Terminal reports: what the daemon sends when an agent finishes, delivered
//! on tasks of their own and tracked until they land.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    runtime::Handle,
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

use super::{error::Chain, CompleteTask, FailTask, TaskClient};

/// An agent's result, as [`TaskClient::report_task_result`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskResult {
    report: Report,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Report {
    Completed(CompleteTask),
    Failed(FailTask),
}

impl TaskResult {
    /// The agent finished its work, with this output.
    pub fn completed(output: impl Into<String>) -> TaskResult {
        TaskResult {
            report: Report::Completed(CompleteTask::new(output)),
        }
    }

    /// The agent failed, with this error.
    pub fn failed(error: impl Into<String>) -> TaskResult {
        TaskResult {
            report: Report::Failed(FailTask::new(error)),
        }
    }

    /// The branch the agent pushed to; sent with a completed result only.
    pub fn branch_name(self, branch_name: impl Into<String>) -> TaskResult {
        self.map(|report| match report {
            Report::Completed(complete) => Report::Completed(complete.branch_name(branch_name)),
            failed @ Report::Failed(_) => failed,
        })
    }

    /// The failure's machine-readable reason; sent with a failed result only.
    pub fn failure_reason(self, failure_reason: impl Into<String>) -> TaskResult {
        self.map(|report| match report {
            completed @ Report::Completed(_) => completed,
            Report::Failed(fail) => Report::Failed(fail.failure_reason(failure_reason)),
        })
    }

    /// The agent's session, so the task can be resumed.
    pub fn session_id(self, session_id: impl Into<String>) -> TaskResult {
        self.map(|report| match report {
            Report::Completed(complete) => Report::Completed(complete.session_id(session_id)),
            Report::Failed(fail) => Report::Failed(fail.session_id(session_id)),
        })
    }

    /// The directory the agent worked in.
    pub fn work_dir(self, work_dir: impl Into<String>) -> TaskResult {
        self.map(|report| match report {
            Report::Completed(complete) => Report::Completed(complete.work_dir(work_dir)),
            Report::Failed(fail) => Report::Failed(fail.work_dir(work_dir)),
        })
    }

    /// Whether the agent completed its work.
    pub fn is_completed(&self) -> bool {
        matches!(self.report, Report::Completed(_))
    }

    fn map(self, change: impl FnOnce(Report) -> Report) -> TaskResult {
        TaskResult {
            report: change(self.report),
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
    LeftRunning,
    /// The failure (reported, or the fallback of a refused completion) did not
    /// reach the server.
    NotDelivered,
    /// [`TaskClient::shutdown`] stopped the delivery, and returned it among
    /// the undelivered reports.
    Abandoned,
    /// With an outbox: the report is stored and will be delivered later, by
    /// the replay worker of this client or of the next one on the same
    /// file. Transient failures outlived the schedule (where, without an
    /// outbox, a completion is [`LeftRunning`](ReportOutcome::LeftRunning)),
    /// or [`TaskClient::shutdown`] stopped the delivery.
    Queued,
    /// With an outbox: the server refused the report for good with nothing
    /// left to fall back to (a refused `fail`). It is kept, not retried, and
    /// listed by `TaskClient::quarantined_reports`.
    Quarantined,
    /// With an outbox: a report for this task is still stored. It stands (as
    /// on the server, the first terminal report wins); this one was neither
    /// stored nor sent.
    AlreadyStored,
}

/// A report [`TaskClient::shutdown`] stopped before it was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndeliveredReport {
    task_id: String,
    result: TaskResult,
}

impl UndeliveredReport {
    /// The task it was about.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The result it carried.
    pub fn result(&self) -> &TaskResult {
        &self.result
    }

    /// The task id and result, to report again later.
    pub fn into_parts(self) -> (String, TaskResult) {
        (self.task_id, self.result)
    }
}

/// The outcome of a report that is being delivered; made by
/// [`TaskClient::report_task_result`].
///
/// Dropping it does not stop the delivery.
#[derive(Debug)]
#[must_use = "the report is delivered anyway; await this to learn how it ended"]
pub struct ReportFuture {
    delivery: JoinHandle<ReportOutcome>,
    stored: StoredFlag,
    #[cfg(feature = "outbox")]
    durability: crate::outbox::DurabilityWatch,
}

#[cfg(feature = "outbox")]
impl ReportFuture {
    /// Waits until the report is safe on disk, without waiting for its
    /// delivery: [`Durability::Stored`](crate::outbox::Durability::Stored)
    /// once the outbox committed it, before its first attempt. A daemon can
    /// clean up after the task from then on: a crash no longer loses the
    /// result. [`NoOutbox`](crate::outbox::Durability::NoOutbox) at once for
    /// a client without one.
    pub async fn stored(&mut self) -> crate::outbox::Durability {
        self.durability.wait().await
    }
}

impl Future for ReportFuture {
    type Output = ReportOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReportOutcome> {
        Poll::Ready(match ready!(Pin::new(&mut self.delivery).poll(cx)) {
            Ok(outcome) => outcome,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Aborted by `shutdown`, or its runtime shut down: a stored
            // report is the next replay's.
            Err(_) if self.stored.is_set() => ReportOutcome::Queued,
            Err(_) => ReportOutcome::Abandoned,
        })
    }
}

/// Whether a report is in the outbox, shared by its delivery, its future
/// and `shutdown`; never set without the `outbox` feature.
#[derive(Debug, Clone, Default)]
struct StoredFlag(#[cfg(feature = "outbox")] std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StoredFlag {
    fn is_set(&self) -> bool {
        #[cfg(feature = "outbox")]
        return self.0.load(Ordering::Acquire);
        #[cfg(not(feature = "outbox"))]
        false
    }
}

/// Tells a report's future, and `shutdown`, whether the report is stored.
pub(super) struct StoredSignal {
    #[cfg(feature = "outbox")]
    stored: StoredFlag,
    #[cfg(feature = "outbox")]
    durable: tokio::sync::oneshot::Sender<crate::outbox::Durability>,
}

#[cfg(feature = "outbox")]
impl StoredSignal {
    pub(super) fn tell(self, durability: crate::outbox::Durability) {
        use crate::outbox::Durability;
        let stored = matches!(durability, Durability::Stored | Durability::AlreadyStored);
        self.stored.0.store(stored, Ordering::Release);
        let _ = self.durable.send(durability);
    }
}

/// The rules of a terminal report; see the [module docs](super).
pub(super) async fn deliver(
    client: &TaskClient,
    task_id: &str,
    result: TaskResult,
    stored: StoredSignal,
) -> ReportOutcome {
    #[cfg(feature = "outbox")]
    {
        if let Some(dispatcher) = &client.inner.dispatcher {
            let tell = |durability| stored.tell(durability);
            return super::durable::deliver(client, dispatcher, task_id, result.report, tell).await;
        }
        stored.tell(crate::outbox::Durability::NoOutbox);
    }
    // Nothing to tell without the `outbox` feature.
    #[cfg(not(feature = "outbox"))]
    let StoredSignal {} = stored;
    match result.report {
        Report::Completed(complete) => match client.complete_task(task_id, &complete).await {
            Ok(()) => {
                tracing::info!(task_id, "task completed");
                ReportOutcome::Completed
            }
            Err(error) if error.is_transient() => {
                tracing::error!(
                    task_id,
                    error = %Chain(&error),
                    "complete task failed after retries; leaving the task running rather than \
                     falling back to fail"
                );
                ReportOutcome::LeftRunning
            }
            Err(error) => {
                tracing::error!(
                    task_id,
                    error = %Chain(&error),
                    "complete task rejected by the server, falling back to fail"
                );
                let fallback = complete.fallback(format!("complete task failed: {error}"));
                match fail(client, task_id, &fallback).await {
                    ReportOutcome::Failed => ReportOutcome::FellBackToFail,
                    other => other,
                }
            }
        },
        Report::Failed(failure) => fail(client, task_id, &failure).await,
    }
}

async fn fail(client: &TaskClient, task_id: &str, failure: &FailTask) -> ReportOutcome {
    match client.fail_task(task_id, failure).await {
        Ok(()) => {
            tracing::info!(task_id, "task failure reported");
            ReportOutcome::Failed
        }
        Err(error) => {
            tracing::error!(task_id, error = %Chain(&error), "fail task failed");
            ReportOutcome::NotDelivered
        }
    }
}

/// The reports being delivered, so that `shutdown` can wait for them and name
/// those it gave up on.
#[derive(Debug)]
pub(super) struct InFlight {
    next_id: AtomicU64,
    reports: Mutex<BTreeMap<u64, Pending>>,
    /// How many reports are in `reports`, for `shutdown` to wait on.
    count: watch::Sender<usize>,
}

#[derive(Debug)]
struct Pending {
    report: UndeliveredReport,
    abort: AbortHandle,
    /// Whether the report is in the outbox: then it is not undelivered.
    stored: StoredFlag,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            next_id: AtomicU64::new(0),
            reports: Mutex::new(BTreeMap::new()),
            count: watch::Sender::new(0),
        }
    }
}

impl InFlight {
    /// Spawns `delivery(id, signal)` onto `runtime`, tracked under a fresh id
    /// until the delivery calls [`finish`](InFlight::finish); `signal` is for
    /// telling whether the report is stored.
    pub(super) fn spawn<F>(
        &self,
        runtime: &Handle,
        (task_id, result): (String, TaskResult),
        delivery: impl FnOnce(u64, StoredSignal) -> F,
    ) -> ReportFuture
    where
        F: Future<Output = ReportOutcome> + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stored = StoredFlag::default();
        #[cfg(feature = "outbox")]
        let (durable, durability) = crate::outbox::DurabilityWatch::new();
        let signal = StoredSignal {
            #[cfg(feature = "outbox")]
            stored: stored.clone(),
            #[cfg(feature = "outbox")]
            durable,
        };
        // Spawned under the lock, so the delivery cannot finish (and remove
        // its entry) before the entry is there.
        let mut reports = self.lock();
        let handle = runtime.spawn(delivery(id, signal));
        let report = UndeliveredReport { task_id, result };
        let abort = handle.abort_handle();
        let pending = Pending {
            report,
            abort,
            stored: stored.clone(),
        };
        reports.insert(id, pending);
        self.count.send_replace(reports.len());
        ReportFuture {
            delivery: handle,
            stored,
            #[cfg(feature = "outbox")]
            durability,
        }
    }

    /// Forgets a delivered report.
    pub(super) fn finish(&self, id: u64) {
        let mut reports = self.lock();
        reports.remove(&id);
        self.count.send_replace(reports.len());
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Waits up to `grace` for every report to finish, then aborts the rest
    /// and returns those not stored in an outbox, in the order they were
    /// started.
    pub(super) async fn settle(&self, grace: Duration) -> Vec<UndeliveredReport> {
        let mut count = self.count.subscribe();
        // The sender lives in `self`, so waiting ends only by count or time.
        let _ = tokio::time::timeout(grace, count.wait_for(|&count| count == 0)).await;
        let mut reports = self.lock();
        let abandoned = std::mem::take(&mut *reports);
        self.count.send_replace(0);
        drop(reports);
        abandoned
            .into_values()
            .filter_map(|pending| {
                pending.abort.abort();
                let (task_id, completed) = (
                    &pending.report.task_id,
                    pending.report.result.is_completed(),
                );
                if pending.stored.is_set() {
                    tracing::info!(
                        task_id,
                        completed,
                        "terminal report not delivered before shutdown: it stays in the outbox"
                    );
                    return None;
                }
                tracing::warn!(
                    task_id,
                    completed,
                    "terminal report not delivered before shutdown"
                );
                Some(pending.report)
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Pending>> {
        crate::sync::lock(&self.reports)
    }
}
