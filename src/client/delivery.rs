//! A terminal report on its way through the client's dispatcher (durably,
//! with an outbox), on a task of its own, with the fallback rules of the
//! [module docs](super); and [`ReportFuture`], which tells how it ended.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use tokio::{runtime::Handle, task::JoinHandle};
use tracing::Instrument;

use super::{
    durable::{self, StoredAnswer},
    in_flight::{InFlight, StoreState},
    report::{ReportOutcome, TaskResult, UndeliveredReport},
    transport::{Attempt, Transport},
};
use crate::outbox::{Dispatcher, Durability};

/// The outcome of a report that is being delivered; made by
/// [`TaskClient::report_task_result`](super::TaskClient::report_task_result).
///
/// Dropping it does not stop the delivery.
#[derive(Debug)]
#[must_use = "the report is delivered anyway; await this to learn how it ended"]
pub struct ReportFuture {
    handle: ReportHandle,
}

/// What a report is: refused before it started, or on its way through the
/// client's dispatcher.
#[derive(Debug)]
enum ReportHandle {
    /// Ended as soon as it was made, sending nothing.
    Refused(ReportOutcome),
    /// Handed to the dispatcher: stored first if it has an outbox.
    Sent {
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
    /// The client's dispatcher: the one path of a terminal report.
    pub(super) dispatcher: &'a Dispatcher<Attempt>,
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
        let store = Arc::<StoreState>::default();
        let (signal, stored) = durable::stored_signal(store.clone());
        let dispatcher = to.dispatcher.clone();
        let delivery = async move {
            durable::deliver(&transport, &dispatcher, &task_id, &result, signal).await
        };
        let delivery =
            to.reports
                .spawn(to.runtime, report, store.clone(), delivery.instrument(span));
        ReportFuture {
            handle: ReportHandle::Sent {
                delivery,
                store,
                stored,
            },
        }
    }

    /// Waits until the report is safe on disk, without waiting for its
    /// delivery: `Some(`[`Durability::Stored`]`)` once the outbox committed
    /// it, before its first attempt. A daemon can clean up after the task
    /// from then on: a crash no longer loses the result.
    ///
    /// `None` for a client without an outbox: the report lives in memory
    /// only. [`Refused`](Durability::Refused) for a report refused before it
    /// was stored: an invalid task id ([`ReportOutcome::InvalidTaskId`]), or
    /// one that [`shutdown`](super::TaskClient::shutdown) stopped first.
    pub async fn stored(&mut self) -> Option<Durability> {
        match &mut self.handle {
            ReportHandle::Refused(_) => Some(Durability::Refused),
            ReportHandle::Sent { stored, .. } => match stored.wait().await {
                Durability::InMemory => None,
                durability => Some(durability),
            },
        }
    }
}

impl Future for ReportFuture {
    type Output = ReportOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReportOutcome> {
        let (delivery, store) = match &mut self.handle {
            ReportHandle::Refused(outcome) => return Poll::Ready(*outcome),
            ReportHandle::Sent {
                delivery, store, ..
            } => (delivery, store),
        };
        Poll::Ready(match ready!(Pin::new(delivery).poll(cx)) {
            Ok(outcome) => outcome,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Aborted by `shutdown`, or its runtime shut down: a stored
            // report is the next replay's.
            Err(_) if store.is_stored() => ReportOutcome::Queued,
            Err(_) => ReportOutcome::Abandoned,
        })
    }
}
