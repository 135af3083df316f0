//! What a sender hears back: [`Dispatch`], the handle of a request handed
//! to the dispatcher; [`Durability`], whether it is safe on disk; and
//! [`Delivery`], how it ended.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::{sync::oneshot, task::JoinHandle};

use super::OutboxError;

/// How a request handed to the [`Dispatcher`](super::Dispatcher) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// The server took the request (a 2xx).
    Delivered,
    /// The server refused the request for good and took the fallback sent
    /// instead.
    FallbackDelivered,
    /// Transient failures outlived the retry schedule; the request is stored
    /// and the replay worker delivers it once the server is back.
    Queued,
    /// The server refused it for good, with nothing (left) to fall back to:
    /// it is kept in the outbox's quarantine, not retried.
    Quarantined,
    /// The server answered `409 Conflict`: what the request reports belongs
    /// to another run, or already ended otherwise. No fallback is sent, and
    /// the record is retired: neither pending nor quarantined.
    Superseded,
    /// A request under the same key is still stored: it stands, and this one
    /// was neither stored nor sent.
    AlreadyStored,
    /// It was not delivered, and is not stored: the caller must keep it.
    /// Either it could not be stored and did not reach the server, or it was
    /// refused before either (credentials in its URI, another origin than
    /// the dispatcher's, an invalid [`Tag`](super::Tag)). `transient` says
    /// whether a replay may succeed.
    Undelivered {
        /// Whether the last failure was transient.
        transient: bool,
        /// The last failure.
        failure: String,
    },
    /// The server refused the request for good; the fallback sent instead
    /// was not delivered, and is not stored (the dispatcher has no store, or
    /// its store could not take it): the caller must keep it. `transient`
    /// says whether a replay of the fallback may succeed.
    FallbackUndelivered {
        /// Whether the fallback's last failure was transient.
        transient: bool,
        /// The fallback's last failure.
        failure: String,
    },
}

impl Delivery {
    /// Not delivered nor stored: the request, or the fallback sent in its
    /// place.
    pub(super) fn undelivered(fell_back: bool, transient: bool, failure: String) -> Delivery {
        match fell_back {
            true => Delivery::FallbackUndelivered { transient, failure },
            false => Delivery::Undelivered { transient, failure },
        }
    }
}

/// Whether a request handed to the [`Dispatcher`](super::Dispatcher) is safe
/// on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Committed to the outbox before its first attempt: it survives a crash
    /// and is delivered by a later start if not now.
    Stored,
    /// A request under the same key is stored already: that one stands.
    AlreadyStored,
    /// The outbox could not take it (an `error` event says why): it is sent
    /// in process only, and lost if the process dies first.
    NotStored(OutboxError),
    /// Refused before it was stored: neither stored nor sent (its URI holds
    /// credentials, goes to another origin than the dispatcher's, or its
    /// [`Tag`](super::Tag) is invalid); [`Delivery::Undelivered`] says why.
    Refused,
    /// The dispatcher has no store ([`Dispatcher::in_memory`](super::Dispatcher::in_memory)):
    /// the request is sent in process only, with the same rules (retries,
    /// fallback, `409`), and lost if the process dies first.
    InMemory,
}

/// A request handed to [`Dispatcher::send`](super::Dispatcher::send): await
/// it for how it ended, or [`stored`](Dispatch::stored) first to learn when
/// it is safe on disk.
///
/// Dropping it does not stop the delivery.
#[derive(Debug)]
#[must_use = "the request is delivered anyway; await this to learn how it ended"]
pub struct Dispatch {
    durability: DurabilityWatch,
    delivery: JoinHandle<Delivery>,
}

impl Dispatch {
    pub(super) fn new(durability: DurabilityWatch, delivery: JoinHandle<Delivery>) -> Dispatch {
        Dispatch {
            durability,
            delivery,
        }
    }

    /// Waits until the request is stored (or could not be), without waiting
    /// for its delivery.
    pub async fn stored(&mut self) -> Durability {
        self.durability.wait().await
    }

    /// Stops the delivery, as [`JoinHandle::abort`] does: a request stored
    /// is left to the replay; one not stored is dropped, unsent from then on.
    pub fn abort(&self) {
        self.delivery.abort();
    }
}

impl Future for Dispatch {
    type Output = Delivery;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Delivery> {
        Poll::Ready(match ready!(Pin::new(&mut self.delivery).poll(cx)) {
            Ok(delivery) => delivery,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // The runtime is shutting down.
            Err(_) => match self.durability.now() {
                Some(Durability::Stored) => Delivery::Queued,
                Some(Durability::AlreadyStored) => Delivery::AlreadyStored,
                _ => Delivery::Undelivered {
                    transient: true,
                    failure: "the runtime shut down before delivery".into(),
                },
            },
        })
    }
}

/// Where a delivery says how durable its request is.
#[derive(Debug)]
pub(super) struct DurabilityWatch {
    receiver: Option<oneshot::Receiver<Durability>>,
    known: Option<Durability>,
}

impl DurabilityWatch {
    pub(super) fn new() -> (oneshot::Sender<Durability>, DurabilityWatch) {
        let (sender, receiver) = oneshot::channel();
        let watch = DurabilityWatch {
            receiver: Some(receiver),
            known: None,
        };
        (sender, watch)
    }

    /// Waits for the answer; a delivery gone without one may not have stored.
    async fn wait(&mut self) -> Durability {
        // Awaited in place: a caller that stops waiting (a timeout around
        // `stored`) can ask again.
        if let Some(receiver) = &mut self.receiver {
            let stopped = |_| Durability::NotStored(OutboxError::stopped());
            self.known = Some(receiver.await.unwrap_or_else(stopped));
            self.receiver = None;
        }
        self.known
            .clone()
            .unwrap_or_else(|| Durability::NotStored(OutboxError::stopped()))
    }

    /// The answer, if it came.
    fn now(&mut self) -> Option<Durability> {
        if let Some(receiver) = &mut self.receiver {
            if let Ok(durability) = receiver.try_recv() {
                self.known = Some(durability);
                self.receiver = None;
            }
        }
        self.known.clone()
    }
}
