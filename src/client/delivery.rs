//! A terminal report on its way: delivered directly, or durably through an
//! outbox, on a task of its own, with the fallback rules of the
//! [module docs](super); and [`ReportFuture`], which tells how it ended.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use http::StatusCode;
use tokio::{runtime::Handle, task::JoinHandle};
use tracing::Instrument;

use super::{
    body,
    error::Chain,
    in_flight::InFlight,
    report::{Report, ReportOutcome, TaskResult, UndeliveredReport},
    route::Action,
    transport::Transport,
};
#[cfg(feature = "outbox")]
use super::{
    durable::{self, StoredAnswer},
    in_flight::StoreState,
    transport::Attempt,
};

/// The outcome of a report that is being delivered; made by
/// [`TaskClient::report_task_result`](super::TaskClient::report_task_result).
///
/// Dropping it does not stop the delivery.
#[derive(Debug)]
#[must_use = "the report is delivered anyway; await this to learn how it ended"]
pub struct ReportFuture {
    handle: ReportHandle,
}

/// What a report is: refused before it started, or delivered in memory, or
/// delivered through the outbox.
#[derive(Debug)]
enum ReportHandle {
    /// Ended as soon as it was made, sending nothing.
    Refused(ReportOutcome),
    /// Delivered by this process only, without an outbox.
    Direct(JoinHandle<ReportOutcome>),
    /// Stored in the outbox before its first attempt.
    #[cfg(feature = "outbox")]
    Durable {
        delivery: JoinHandle<ReportOutcome>,
        store: Arc<StoreState>,
        stored: StoredAnswer,
    },
}

/// Where a client sends its terminal reports.
pub(super) struct Destination<'a> {
    pub(super) transport: &'a Arc<Transport>,
    pub(super) reports: &'a InFlight,
    pub(super) runtime: &'a Handle,
    /// The outbox's dispatcher, for durable reports.
    #[cfg(feature = "outbox")]
    pub(super) dispatcher: Option<&'a crate::outbox::Dispatcher<Attempt>>,
}

impl ReportFuture {
    /// A report that ends as soon as it is made, sending nothing.
    pub(super) fn refused(outcome: ReportOutcome) -> ReportFuture {
        ReportFuture {
            handle: ReportHandle::Refused(outcome),
        }
    }

    /// Starts delivering `result` on a task of its own, listed in
    /// `reports` until it ends; the delivery's events stay in the caller's
    /// span.
    pub(super) fn start(to: Destination<'_>, task_id: &str, result: TaskResult) -> ReportFuture {
        let report = UndeliveredReport {
            task_id: task_id.to_owned(),
            result: result.clone(),
        };
        let transport = to.transport.clone();
        let task_id = task_id.to_owned();
        let span = tracing::Span::current();
        #[cfg(feature = "outbox")]
        if let Some(dispatcher) = to.dispatcher {
            let store = Arc::<StoreState>::default();
            let (signal, stored) = durable::stored_signal(store.clone());
            let dispatcher = dispatcher.clone();
            let delivery = async move {
                durable::deliver(&transport, &dispatcher, &task_id, &result, signal).await
            };
            let delivery = to.reports.spawn(
                to.runtime,
                report,
                Some(store.clone()),
                delivery.instrument(span),
            );
            return ReportFuture {
                handle: ReportHandle::Durable {
                    delivery,
                    store,
                    stored,
                },
            };
        }
        let delivery = async move { deliver(&transport, &task_id, result).await };
        let delivery = to.reports.spawn(
            to.runtime,
            report,
            #[cfg(feature = "outbox")]
            None,
            delivery.instrument(span),
        );
        ReportFuture {
            handle: ReportHandle::Direct(delivery),
        }
    }
}

#[cfg(feature = "outbox")]
impl ReportFuture {
    /// Waits until the report is safe on disk, without waiting for its
    /// delivery: `Some(`[`Durability::Stored`](crate::outbox::Durability::Stored)`)`
    /// once the outbox committed it, before its first attempt. A daemon can
    /// clean up after the task from then on: a crash no longer loses the
    /// result.
    ///
    /// `None` at once for a client without an outbox: the report lives in
    /// memory only. [`Refused`](crate::outbox::Durability::Refused) for a
    /// report refused before it was stored: an invalid task id
    /// ([`ReportOutcome::InvalidTaskId`]), or one that
    /// [`shutdown`](super::TaskClient::shutdown) stopped first.
    pub async fn stored(&mut self) -> Option<crate::outbox::Durability> {
        use crate::outbox::Durability;
        match &mut self.handle {
            ReportHandle::Refused(_) => Some(Durability::Refused),
            ReportHandle::Direct(_) => None,
            ReportHandle::Durable { stored, .. } => Some(stored.wait().await),
        }
    }
}

impl Future for ReportFuture {
    type Output = ReportOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReportOutcome> {
        let (delivery, stored) = match &mut self.handle {
            ReportHandle::Refused(outcome) => return Poll::Ready(*outcome),
            ReportHandle::Direct(delivery) => (delivery, false),
            #[cfg(feature = "outbox")]
            ReportHandle::Durable {
                delivery, store, ..
            } => {
                let stored = store.is_stored();
                (delivery, stored)
            }
        };
        Poll::Ready(match ready!(Pin::new(delivery).poll(cx)) {
            Ok(outcome) => outcome,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Aborted by `shutdown`, or its runtime shut down: a stored
            // report is the next replay's.
            Err(_) if stored => ReportOutcome::Queued,
            Err(_) => ReportOutcome::Abandoned,
        })
    }
}

/// The rules of a terminal report without an outbox; see the
/// [module docs](super).
async fn deliver(transport: &Transport, task_id: &str, result: TaskResult) -> ReportOutcome {
    let completion = match result.report {
        Report::Completed(completion) => completion,
        Report::Failed(failure) => return fail(transport, task_id, &failure).await,
    };
    let sent = transport
        .send_terminal(Action::Complete, task_id, body::json(&completion))
        .await;
    match sent {
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
        Err(error) if error.status() == Some(StatusCode::CONFLICT) => {
            ReportOutcome::superseded(task_id)
        }
        Err(error) => {
            tracing::error!(
                task_id,
                error = %Chain(&error),
                "complete task rejected by the server, falling back to fail"
            );
            let fallback = completion.fallback(format!("complete task failed: {error}"));
            match fail(transport, task_id, &fallback).await {
                ReportOutcome::Failed => ReportOutcome::FellBackToFail,
                other => other,
            }
        }
    }
}

async fn fail(transport: &Transport, task_id: &str, failure: &body::Failure) -> ReportOutcome {
    match transport
        .send_terminal(Action::Fail, task_id, body::json(failure))
        .await
    {
        Ok(()) => {
            tracing::info!(task_id, "task failure reported");
            ReportOutcome::Failed
        }
        Err(error) if error.status() == Some(StatusCode::CONFLICT) => {
            ReportOutcome::superseded(task_id)
        }
        Err(error) => {
            tracing::error!(task_id, error = %Chain(&error), "fail task failed");
            ReportOutcome::NotDelivered
        }
    }
}
