//! Terminal reports: what the daemon sends when an agent finishes, delivered
//! on tasks of their own and tracked until they land.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use http::StatusCode;
use tokio::{
    runtime::Handle,
    sync::{watch, Notify},
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
    /// The server answered `409 Conflict`: the task belongs to another run
    /// (it was dispatched again), or already ended differently. No fallback
    /// `fail` is sent, as it could fail the other run. With an outbox the
    /// report is retired (an event at `warn`): neither pending nor
    /// quarantined.
    Superseded,
    /// The task id is empty, holds a control character or is longer than
    /// [`MAX_TASK_ID`](super::MAX_TASK_ID) bytes: nothing was sent or stored
    /// (an `error` event says which).
    InvalidTaskId,
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
    /// The delivery's task; `None` for a report refused before it started.
    delivery: Option<JoinHandle<ReportOutcome>>,
    /// How a report refused before it started ended.
    refused: ReportOutcome,
    stored: Arc<StoreState>,
    #[cfg(feature = "outbox")]
    durability: crate::outbox::DurabilityWatch,
}

impl ReportFuture {
    /// A report that ends as soon as it is made, sending nothing.
    pub(super) fn ready(outcome: ReportOutcome) -> ReportFuture {
        #[cfg(feature = "outbox")]
        let durability = {
            let (sender, watch) = crate::outbox::DurabilityWatch::new();
            let _ = sender.send(crate::outbox::Durability::Refused);
            watch
        };
        ReportFuture {
            delivery: None,
            refused: outcome,
            stored: Arc::default(),
            #[cfg(feature = "outbox")]
            durability,
        }
    }
}

#[cfg(feature = "outbox")]
impl ReportFuture {
    /// Waits until the report is safe on disk, without waiting for its
    /// delivery: [`Durability::Stored`](crate::outbox::Durability::Stored)
    /// once the outbox committed it, before its first attempt. A daemon can
    /// clean up after the task from then on: a crash no longer loses the
    /// result. [`NoOutbox`](crate::outbox::Durability::NoOutbox) at once for
    /// a client without one; [`Refused`](crate::outbox::Durability::Refused)
    /// for a report refused before it was made
    /// ([`ReportOutcome::InvalidTaskId`]).
    pub async fn stored(&mut self) -> crate::outbox::Durability {
        self.durability.wait().await
    }
}

impl Future for ReportFuture {
    type Output = ReportOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReportOutcome> {
        let refused = self.refused;
        let Some(delivery) = &mut self.delivery else {
            return Poll::Ready(refused);
        };
        Poll::Ready(match ready!(Pin::new(delivery).poll(cx)) {
            Ok(outcome) => outcome,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Aborted by `shutdown`, or its runtime shut down: a stored
            // report is the next replay's.
            Err(_) if self.stored.get() == STORED => ReportOutcome::Queued,
            Err(_) => ReportOutcome::Abandoned,
        })
    }
}

/// Where a report stands with the outbox, shared by its delivery, its future
/// and `shutdown`, so that `shutdown` either returns a report or leaves it
/// stored, never both.
#[derive(Debug, Default)]
pub(super) struct StoreState {
    state: AtomicU8,
    /// Wakes `shutdown` when a report being stored learns whether it is.
    settled: Notify,
}

/// Not handed to an outbox (yet, or ever).
const NOT_HANDED: u8 = 0;
/// Handed to the outbox, its commit not answered yet.
const STORING: u8 = 1;
/// In the outbox: the replay delivers it if this delivery does not.
const STORED: u8 = 2;
/// The outbox could not take it: it lives in this delivery only.
#[cfg(feature = "outbox")]
const NOT_STORED: u8 = 3;
/// Stopped by `shutdown` before it was handed to the outbox: it never will be.
const ABANDONED: u8 = 4;

impl StoreState {
    fn get(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Claims the report for the outbox; `false` once `shutdown` abandoned it.
    #[cfg(feature = "outbox")]
    fn hand_over(&self) -> bool {
        self.state
            .compare_exchange(NOT_HANDED, STORING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Claims the report for `shutdown`'s list; `false` once it is handed to
    /// the outbox.
    fn abandon(&self) -> bool {
        self.state
            .compare_exchange(NOT_HANDED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Waits until a report handed to the outbox knows whether it is stored.
    async fn known(&self) -> u8 {
        loop {
            let settled = self.settled.notified();
            match self.get() {
                STORING => settled.await,
                state => return state,
            }
        }
    }
}

/// Tells a report's future, and `shutdown`, whether the report is stored.
pub(super) struct StoredSignal {
    #[cfg(feature = "outbox")]
    state: Arc<StoreState>,
    #[cfg(feature = "outbox")]
    durable: tokio::sync::oneshot::Sender<crate::outbox::Durability>,
}

#[cfg(feature = "outbox")]
impl StoredSignal {
    /// Hands the report to the outbox; `false` when `shutdown` abandoned it
    /// first, and it must not be sent.
    pub(super) fn hand_over(&self) -> bool {
        self.state.hand_over()
    }

    pub(super) fn tell(self, durability: crate::outbox::Durability) {
        use crate::outbox::Durability;
        let stored = matches!(durability, Durability::Stored | Durability::AlreadyStored);
        let state = if stored { STORED } else { NOT_STORED };
        // Only a report handed over is being stored; one never handed stays
        // as it is (not handed, or abandoned).
        let _ =
            self.state
                .state
                .compare_exchange(STORING, state, Ordering::AcqRel, Ordering::Acquire);
        self.state.settled.notify_waiters();
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
            return super::durable::deliver(client, dispatcher, task_id, result.report, stored)
                .await;
        }
        stored.tell(crate::outbox::Durability::NoOutbox);
    }
    // Nothing to tell without the `outbox` feature.
    #[cfg(not(feature = "outbox"))]
    let StoredSignal { .. } = stored;
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
            Err(error) if error.status() == Some(StatusCode::CONFLICT) => superseded(task_id),
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
        Err(error) if error.status() == Some(StatusCode::CONFLICT) => superseded(task_id),
        Err(error) => {
            tracing::error!(task_id, error = %Chain(&error), "fail task failed");
            ReportOutcome::NotDelivered
        }
    }
}

/// A `409 Conflict` to a terminal report: the task is another run's now.
pub(super) fn superseded(task_id: &str) -> ReportOutcome {
    tracing::warn!(
        task_id,
        "the server answered 409 Conflict: the task belongs to another run or already ended; \
         no fallback is sent"
    );
    ReportOutcome::Superseded
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
    stored: Arc<StoreState>,
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
        let stored = Arc::<StoreState>::default();
        #[cfg(feature = "outbox")]
        let (durable, durability) = crate::outbox::DurabilityWatch::new();
        let signal = StoredSignal {
            #[cfg(feature = "outbox")]
            state: stored.clone(),
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
            delivery: Some(handle),
            refused: ReportOutcome::Abandoned,
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
    /// started. A report whose commit is under way is waited for until the
    /// outbox answers, so that it is either returned or stored, never both.
    pub(super) async fn settle(&self, grace: Duration) -> Vec<UndeliveredReport> {
        let mut count = self.count.subscribe();
        // The sender lives in `self`, so waiting ends only by count or time.
        let _ = tokio::time::timeout(grace, count.wait_for(|&count| count == 0)).await;
        let abandoned = {
            let mut reports = self.lock();
            self.count.send_replace(0);
            std::mem::take(&mut *reports)
        };
        let mut undelivered = Vec::new();
        for pending in abandoned.into_values() {
            // Either `shutdown` claims the report before it reaches the
            // outbox, or the outbox's answer decides.
            let stored = !pending.stored.abandon() && pending.stored.known().await == STORED;
            pending.abort.abort();
            if let Some(report) = pending.into_undelivered(stored) {
                undelivered.push(report);
            }
        }
        undelivered
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Pending>> {
        crate::sync::lock(&self.reports)
    }
}

impl Pending {
    /// The report, unless it stays stored for the replay.
    fn into_undelivered(self, stored: bool) -> Option<UndeliveredReport> {
        let (task_id, completed) = (&self.report.task_id, self.report.result.is_completed());
        if stored {
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
        Some(self.report)
    }
}
