//! A request's first delivery, in the foreground: refused, or stored if the
//! dispatcher has a store, then
//! sent through the retry layer until it is delivered, refused for good, or
//! left to the replay.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use super::{
    dispatcher::{AttemptClassifier, AttemptService, Shared, Step},
    store::{Claim, Inserted},
    Delivery, Durability, Entry, Outbox, OutboxError, Tag,
};

/// Counts a foreground call's attempts; carried in the request's extensions,
/// so every clone the retry layer makes shares it.
#[derive(Clone)]
struct AttemptCounter(Arc<AtomicU32>);

/// Counts one attempt of the request it is given, if it carries a counter.
pub(super) fn count_attempt(request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    if let Some(AttemptCounter(attempts)) = request.extensions().get() {
        // Saturates rather than wraps: a count is never read as zero again.
        let _ = attempts.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| {
            Some(count.saturating_add(1))
        });
    }
    request
}

impl<S, C> Shared<S, C>
where
    S: AttemptService,
    S::Future: Send,
    C: AttemptClassifier<S>,
{
    /// The foreground delivery: store, send through the retry layer, record
    /// the end. `on_stored` hears whether the request was stored as soon as
    /// that is known.
    pub(super) async fn deliver(
        self: Arc<Self>,
        key: String,
        request: Request<Bytes>,
        on_stored: impl FnOnce(Durability) + Send,
    ) -> Delivery {
        let refused = self
            .refusal(request.uri())
            .map(Err)
            .unwrap_or_else(|| Tag::of(&request));
        let tag = match refused {
            Ok(tag) => tag,
            Err(failure) => {
                tracing::error!(key, failure, "request refused: neither stored nor sent");
                on_stored(Durability::Refused);
                return Delivery::Undelivered {
                    transient: false,
                    failure,
                };
            }
        };
        let mut entry = Entry::new(key, &request, tag);
        let (claim, seq, late) = match self.outbox.clone() {
            None => {
                on_stored(Durability::InMemory);
                (None, None, None)
            }
            Some(outbox) => match self.store_first(&outbox, &mut entry, on_stored).await {
                Some((claim, seq, late)) => (Some(claim), seq, late),
                None => return Delivery::AlreadyStored,
            },
        };
        let mut request = entry.keyed(request);
        let mut fell_back = false;
        loop {
            let attempts = Arc::new(AtomicU32::new(0));
            request
                .extensions_mut()
                .insert(AttemptCounter(attempts.clone()));
            let sent = self.send_through(self.retrying.clone(), request).await;
            if seq.is_some() {
                self.note_lane(&entry.uri, &sent, false).await;
            }
            let attempts = attempts.load(Ordering::Relaxed);
            match self.settle(&entry, seq, sent, attempts, fell_back).await {
                Step::Retired(delivery, Some(seq)) => {
                    // The caller need not wait for the removal: the claim,
                    // held until it is committed, keeps the replay off.
                    let shared = self.clone();
                    let key = entry.key.clone();
                    tokio::spawn(async move {
                        shared.remove(&key, seq).await;
                        if let Some(claim) = claim {
                            claim.settle();
                        }
                    });
                    return delivery;
                }
                Step::Retired(delivery, None) => {
                    if let Some(claim) = claim {
                        claim.settle();
                    }
                    if let Some(insert) = late {
                        let shared = self.clone();
                        let key = entry.key.clone();
                        tokio::spawn(async move {
                            if let Ok(Inserted::Stored(seq)) = insert.await {
                                shared.remove(&key, seq).await;
                            }
                        });
                    }
                    return delivery;
                }
                Step::Done(delivery) => {
                    if let Some(claim) = claim {
                        claim.settle();
                    }
                    return delivery;
                }
                Step::Queued => {
                    drop(claim);
                    return Delivery::Queued;
                }
                Step::FallBack(fallback) => {
                    fell_back = true;
                    (request, entry) = *fallback;
                }
            }
        }
    }

    /// Claims `entry`'s key and stores it in `outbox`, before its first
    /// attempt: the claim, its sequence number if stored, and the insert if
    /// it outlived the store wait (should it land after all, a request
    /// delivered meanwhile is removed again rather than replayed). `None`
    /// when a request under the key is stored already.
    async fn store_first(
        &self,
        outbox: &Outbox,
        entry: &mut Entry,
        on_stored: impl FnOnce(Durability),
    ) -> Option<(Claim, Option<u64>, Option<LateInsert>)> {
        // The insert below leases the record: no claim in the store first.
        let Some(claim) = outbox.claim_new(&entry.key) else {
            // Being sent now, so stored (or being stored) already.
            on_stored(Durability::AlreadyStored);
            return None;
        };
        let mut insert: LateInsert = {
            let outbox = outbox.clone();
            let entry = entry.clone();
            Box::pin(async move { outbox.insert(entry).await })
        };
        let wait = self.settings.store_wait;
        let mut late = None;
        let inserted = match tokio::time::timeout(wait, &mut insert).await {
            Ok(inserted) => inserted,
            Err(_) => {
                late = Some(insert);
                Err(OutboxError::unanswered(outbox.path(), wait))
            }
        };
        let seq = match inserted {
            Ok(Inserted::Stored(seq)) => {
                tracing::debug!(
                    key = entry.key,
                    pending = outbox.pending_count(),
                    "request stored in the outbox"
                );
                on_stored(Durability::Stored);
                *entry = entry.clone().stored_as(seq);
                Some(seq)
            }
            Ok(Inserted::Taken) => {
                on_stored(Durability::AlreadyStored);
                return None;
            }
            Err(error) => {
                // A store that stopped answering is a warning: it may well
                // have the request by now, and its replay sends it again.
                match error.is_unanswered() {
                    true => tracing::warn!(
                        key = entry.key,
                        error = %error,
                        "request not stored in the outbox in time: it may not be durable, sending it in process"
                    ),
                    false => tracing::error!(
                        key = entry.key,
                        error = %error,
                        "request could not be stored in the outbox: it is not durable, sending it in process only"
                    ),
                }
                on_stored(Durability::NotStored(error));
                None
            }
        };
        Some((claim, seq, late))
    }
}

/// An insert into the store that may outlive the store wait.
type LateInsert = Pin<Box<dyn Future<Output = Result<Inserted, OutboxError>> + Send>>;
