//! The receiving end of retried requests: an `Idempotency-Key` layer for
//! servers (enable the `idempotency` feature).
//!
//! Everything a retrying sender does is at-least-once: a reply lost after
//! the server committed, a sender that crashed before it recorded the
//! delivery, a lease taken over by another replica, each sends the same
//! request again. [`IdempotencyLayer`] turns that into an exactly-once
//! effect on the server, as the IETF httpapi draft
//! (`draft-ietf-httpapi-idempotency-key-header`) and Stripe have it:
//!
//! | the request | the layer answers | the handler |
//! | --- | --- | --- |
//! | a key seen for the first time | the handler's response; kept if final | runs once |
//! | a repeat, the first finished | the kept response, byte for byte, with `idempotent-replayed: true` | not called |
//! | a repeat, the first still running | `409 Conflict`, `Retry-After: 1` | not called |
//! | the same key, another request | `422 Unprocessable Content` | not called |
//! | a key that is empty, over 255 bytes or not visible ASCII | `400 Bad Request` | not called |
//! | no key | passed through, nothing kept; `400` with [`require_key(true)`](IdempotencyLayer::require_key) | runs |
//! | the store cannot answer | `503 Service Unavailable`, `Retry-After: 1` (`500` for a damaged record) | not called |
//!
//! - **The key** is the request's `idempotency-key` header, taken as it is
//!   (a quoted value keeps its quotes). With the `webhooks` feature, when
//!   the signature check runs in front, the verified `webhook-id` it hands
//!   on (`webhooks::WebhookId`) is the key instead: a sender signing
//!   through the outbox sends the same value in both.
//! - **The fingerprint** ([`Fingerprint`]) is a SHA-256 over the method,
//!   the path and query, and the body: the same key with a different
//!   request is refused, never answered with another request's response.
//! - **Final responses are kept:** 2xx, 3xx and every 4xx but 408 and 429,
//!   what the crate's own retry layer gives up on (see
//!   [`classify_status`](crate::classify_status)). A 5xx, 408 or 429, or an
//!   error of the inner service, keeps nothing and frees the key: a
//!   transient failure stays retryable, and the sender's retry runs the
//!   handler again.
//! - **What is kept:** the status, the headers that describe the content
//!   (see [`KeptResponse`]; never `Set-Cookie` or `Authorization`-like
//!   ones), and the body, up to [`max_body`](IdempotencyLayer::max_body)
//!   (1 MiB by default). A larger body, or one whose length is not known in
//!   advance (a stream), goes to the client whole but is not kept: a repeat
//!   then gets `409 Conflict` saying so, never a truncated body. A body is
//!   read into memory only when its length is known and within the limit;
//!   its trailers are not kept.
//! - **Expiry:** a finished key is kept for its
//!   [`retention`](IdempotencyLayer::retention) (24 hours by default); a
//!   repeat after it runs the handler again.
//! - **Cancellation:** a request dropped on its way (its connection
//!   closed, the server shut down) never leaves its key held: dropped while
//!   the store claims the key, the claim is freed as soon as it comes;
//!   dropped mid-handler, the key is freed, and the next repeat runs the
//!   handler (a handler cancelled after its effect but before it returns
//!   therefore runs twice: commit the effect last); dropped once the
//!   handler answered, its response is still kept. That work goes on in
//!   tasks of the current tokio runtime. On PostgreSQL, a claim is a lease
//!   too: a replica killed mid-request frees its keys when their lease runs
//!   out.
//!
//! # Whose keys
//!
//! A store's keys are one namespace: a client that sends another's key with
//! the same request (method, path, body) gets the other's kept response.
//! Where several clients reach one endpoint, put the layer behind their
//! authentication and keep their keys apart (a store per client, or keys
//! the clients cannot guess, as the outbox's random ones are).
//!
//! # Requests and responses
//!
//! The layer serves `http::Request<http_body_util::Full<Bytes>>`: a body
//! in memory, to fingerprint and to hand on unchanged. Behind the `webhooks`
//! feature's signature check it gets one as is; otherwise collect the body
//! in front (the [crate docs](crate#request-bodies) show how).
//!
//! The inner service answers `http::Response<B>` for any body `B` with
//! `B: http_body::Body + From<Bytes>`, as `Full<Bytes>` and axum's `Body`
//! are: the layer makes a body from bytes for a replay and for its own
//! answers (plain text, `text/plain; charset=utf-8`, saying why). The
//! response and error types are the inner service's own.
//!
//! # Stores
//!
//! - [`MemoryStore`]: for one process; bounded in keys and bytes (the
//!   oldest finished keys are evicted first, and
//!   [`MemoryStore::evictions`] counts them), expired keys removed a few at
//!   a time from the front of an expiry index.
//! - `PostgresStore` (features `idempotency` and `postgres`): one table
//!   shared by replicas behind a load balancer, a running request's claim
//!   held as a lease; its docs list what it stores.
//! - Your own: implement [`Store`].
//!
//! # The sender's side
//!
//! The crate's outbox sends every request with an `idempotency-key` made
//! when the request is stored, the same on every attempt, replay, restart
//! and takeover: behind this layer, each reaches the handler once. The
//! layer's `409` carries `Retry-After`, which the crate's retry layer takes
//! as transient: it waits and asks again, and gets the kept response once
//! the first request finished.
//!
//! ```
//! use std::{convert::Infallible, sync::{atomic::{AtomicUsize, Ordering}, Arc}};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_terminal_retry::idempotency::{IdempotencyLayer, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let payments = Arc::new(AtomicUsize::new(0));
//! let paid = payments.clone();
//! let handler = service_fn(move |_request: Request<Full<Bytes>>| {
//!     let n = paid.fetch_add(1, Ordering::SeqCst) + 1;
//!     async move {
//!         let body = Full::<Bytes>::from(format!(r#"{{"payment":{n}}}"#));
//!         Ok::<_, Infallible>(Response::builder().status(201).body(body).unwrap())
//!     }
//! });
//! let service = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
//!
//! let pay = || {
//!     Request::post("/payments")
//!         .header("idempotency-key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
//!         .body(Full::<Bytes>::from(r#"{"amount":42}"#))
//! };
//! let first = service.clone().oneshot(pay()?).await?;
//! let repeat = service.clone().oneshot(pay()?).await?;
//!
//! assert_eq!(payments.load(Ordering::SeqCst), 1); // paid once
//! assert_eq!(repeat.status(), StatusCode::CREATED);
//! assert_eq!(repeat.headers()["idempotent-replayed"], "true");
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! # Ok(())
//! # }
//! ```

mod future;
mod layer;
mod store;

pub use future::{ResponseFuture, IDEMPOTENT_REPLAYED};
pub use layer::{Idempotency, IdempotencyLayer};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::PostgresStore;
pub use store::{
    Begin, Claim, Fingerprint, KeptResponse, MemoryStore, Store, StoreError, StoreFuture,
};
