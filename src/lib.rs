//! Retries for HTTP callbacks that must reach the server.
//!
//! A terminal callback (a daemon telling its server that a task completed or
//! failed) is sent once and must arrive: if it is lost, the task stays
//! "running" forever. [`TerminalRetryLayer`] is a tower layer that replays such
//! a request on transient failures, on a bounded schedule, and gives up at once
//! when the server rejects it for good:
//!
//! - only a 2xx status is a success; 5xx, 408 and 429 are transient; every
//!   other status (4xx, and 1xx and 3xx: redirects are not followed) is
//!   permanent, but for a 409 with `Retry-After` (an idempotent server's
//!   "the first request with this key still runs"), transient; every error
//!   of the inner service (refused or reset connection, an elapsed
//!   per-attempt timeout) is transient, but for a request the crate's
//!   signing layer refused unsent ([`DefaultClassifier`]);
//! - the default [`Schedule`] waits 4, 8, 16, 32 and 64 s: six attempts over
//!   124 s at most; a 429, 503 or 409 with `Retry-After` sets its own delay
//!   ([`RetryAfter`]);
//! - jitter ([`Jitter`]), a retry budget ([`RetryBudget`]) and an attempt
//!   header are there when asked for, off by default;
//! - the wrapped service keeps the inner service's `Response` and `Error`
//!   types: after the last attempt the caller gets the last response or error,
//!   unchanged.
//!
//! # The crate's map
//!
//! | what | where | feature |
//! | --- | --- | --- |
//! | the layer and its policy | [`TerminalRetryLayer`], [`TerminalRetryPolicy`], [`Backoff`], [`OutcomeSlot`] | none: always there |
//! | classifying an answer | [`Classify`], [`ClassifyFn`], [`DefaultClassifier`], [`classify_status`], [`Outcome`] | none |
//! | when to retry | [`Schedule`], [`RetryAfter`], [`parse_retry_after`], [`Jitter`], [`RetryBudget`] | none |
//! | early release | [`Recovery`], [`Parked`], [`Woken`] | none |
//! | bad configuration | [`ConfigError`] | none |
//! | the task-callback client | [`client`](client/index.html): [`TaskClient`](client/struct.TaskClient.html) | `client` (`rustls` adds HTTPS) |
//! | the durable outbox, for any tower service | [`outbox`](outbox/index.html): [`Outbox`](outbox/struct.Outbox.html), [`Dispatcher`](outbox/struct.Dispatcher.html) | `outbox` (a redb file); `postgres` (a queue shared by many senders); with `client`, the durable task client |
//! | signed webhooks (Standard Webhooks), for senders and receivers | [`webhooks`](webhooks/index.html): [`SignLayer`](webhooks/struct.SignLayer.html), [`VerifyLayer`](webhooks/struct.VerifyLayer.html), [`Key`](webhooks/struct.Key.html) | `webhooks` |
//! | the receiving end: an `Idempotency-Key` layer for servers | [`idempotency`](idempotency/index.html): [`IdempotencyLayer`](idempotency/struct.IdempotencyLayer.html), [`MemoryStore`](idempotency/struct.MemoryStore.html) | `idempotency` (with `postgres`, a store shared by replicas) |
//! | loopback test servers with scripted faults | [`test_server`](test_server/index.html): [`TestServer`](test_server/struct.TestServer.html), [`TaskServer`](test_server/struct.TaskServer.html) | `test-server` |
//!
//! With no feature, the crate is the layer alone: tower, http, tokio's timer,
//! tracing and httpdate. The modules of the features are documented when
//! their feature is on, as on docs.rs.
//!
//! # Classifying an answer
//!
//! [`DefaultClassifier`] is the rule above; a special case goes in a
//! [`ClassifyFn`] over it, given to
//! [`TerminalRetryPolicy::with_classifier`]:
//!
//! ```
//! use http::{Response, StatusCode};
//! use tower_terminal_retry::{TerminalRetryPolicy, Classify, ClassifyFn, DefaultClassifier, Outcome, TerminalRetryLayer};
//!
//! // This server answers 409 when a report was already accepted: a success.
//! let layer = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_classifier(ClassifyFn(
//!     |result: &Result<Response<()>, std::io::Error>| match result {
//!         Ok(response) if response.status() == StatusCode::CONFLICT => Outcome::Success,
//!         other => DefaultClassifier.classify(other),
//!     },
//! )));
//! # let _ = layer;
//! ```
//!
//! # Early release
//!
//! A retry parked in backoff waits its whole delay even when the server came
//! back a moment after it fell asleep. Give the layers that talk to a server
//! one [`Recovery`] ([`TerminalRetryPolicy::with_recovery`]), and the first
//! success through any of them releases the retries waiting on a schedule
//! delay for the same scheme, host and port, oldest first, at a bounded rate.
//! A wait the server asked for with `Retry-After` is never cut short.
//!
//! ```
//! use tower_terminal_retry::{TerminalRetryPolicy, Recovery, TerminalRetryLayer};
//!
//! let recovery = Recovery::new(1_000)?; // at most 1,000 releases a second
//! let policy = TerminalRetryPolicy::default().with_recovery(recovery);
//! let reports = TerminalRetryLayer::new(policy.clone());
//! let heartbeats = TerminalRetryLayer::new(policy);
//! # let _ = (reports, heartbeats);
//! # Ok::<(), tower_terminal_retry::ConfigError>(())
//! ```
//!
//! # When to use it, and when not
//!
//! Only for idempotent requests: the server must treat a replay as a no-op
//! (for example "already completed" answers 200 and changes nothing). A
//! transient failure does not say the server did not act: the 502 may have
//! come after the state was committed. Retrying a non-idempotent POST (create
//! an order, send a mail) with this layer duplicates it. For those, use an
//! idempotency key the server honours, or do not retry.
//!
//! # Request bodies
//!
//! Each attempt sends a clone of the request, so the body type must be
//! `Clone`. `http_body_util::Full<Bytes>` clones without copying its bytes. A
//! streaming body (such as `hyper::body::Incoming`) cannot be replayed: collect
//! it into bytes before the layer.
//!
//! ```
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::{BodyExt, Full};
//!
//! # async fn buffer<B: hyper::body::Body>(request: Request<B>) -> Result<Request<Full<Bytes>>, B::Error> {
//! let (parts, body) = request.into_parts();
//! let bytes = body.collect().await?.to_bytes();
//! let replayable = Request::from_parts(parts, Full::new(bytes));
//! # Ok(replayable)
//! # }
//! ```
//!
//! # Example
//!
//! A server that answers 502 twice, then 200; on tokio's paused clock the three
//! attempts start at 0, 4 and 12 s.
//!
//! ```
//! use std::{convert::Infallible, sync::atomic::{AtomicUsize, Ordering}, sync::Arc};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_terminal_retry::TerminalRetryLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let attempts = Arc::new(AtomicUsize::new(0));
//! let seen = attempts.clone();
//! let flaky = service_fn(move |_request: Request<Full<Bytes>>| {
//!     let status = match seen.fetch_add(1, Ordering::SeqCst) {
//!         0 | 1 => StatusCode::BAD_GATEWAY,
//!         _ => StatusCode::OK,
//!     };
//!     async move { Ok::<_, Infallible>(Response::builder().status(status).body(Full::<Bytes>::default()).unwrap()) }
//! });
//!
//! let start = tokio::time::Instant::now();
//! let service = TerminalRetryLayer::default().layer(flaky);
//! let request = Request::post("/api/daemon/tasks/t1/complete").body(Full::from("{}"))?;
//! let response = service.oneshot(request).await?;
//!
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(attempts.load(Ordering::SeqCst), 3);
//! assert_eq!(start.elapsed().as_secs(), 12);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(
    missing_docs,
    rustdoc::broken_intra_doc_links,
    rustdoc::private_intra_doc_links
)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The layer's concepts, each a module of its own; their items are
// re-exported here, their one public path.
mod budget;
mod classify;
mod error;
mod future;
mod jitter;
mod layer;
mod policy;
mod recovery;
mod retry_after;
mod schedule;

// Leaf utilities the concepts share, crate-private and importing none of
// them: an origin compared one way everywhere, evenly spaced starts (the
// replay's pace and the early release's), a lock that outlives a panic.
mod origin;
mod pace;
mod sync;

// Reading a server's answer as untrusted text: the client's and the outbox's.
#[cfg(any(feature = "client", feature = "outbox"))]
mod response;

// The task routes, for the client and the test server alike; public only as
// `test_server::Action`.
#[cfg(any(feature = "client", feature = "test-server"))]
#[cfg_attr(not(feature = "test-server"), allow(unreachable_pub))]
mod task_route;

// Connecting to PostgreSQL from a URL, as libpq does: TLS by sslmode,
// bounded waits. The shared outbox's and the idempotency store's.
#[cfg(feature = "postgres")]
mod postgres;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "idempotency")]
pub mod idempotency;
// With `client` alone, the dispatcher without a store; the stores with
// `outbox`.
#[cfg(any(feature = "client", feature = "outbox"))]
pub mod outbox;
#[cfg(feature = "test-server")]
pub mod test_server;
#[cfg(feature = "webhooks")]
pub mod webhooks;

pub use budget::RetryBudget;
pub use classify::{classify_status, Classify, ClassifyFn, DefaultClassifier, Outcome};
pub use error::ConfigError;
pub use future::Backoff;
pub use jitter::Jitter;
pub use layer::TerminalRetryLayer;
pub use policy::{OutcomeSlot, TerminalRetryPolicy};
pub use recovery::{Parked, Recovery, Woken};
pub use retry_after::{parse_retry_after, RetryAfter};
pub use schedule::Schedule;

// Compiles the README's examples with the doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;
