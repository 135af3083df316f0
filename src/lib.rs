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
//!   permanent; every error of the inner service (refused or reset
//!   connection, an elapsed per-attempt timeout) is transient
//!   ([`classify`]);
//! - the default [`Schedule`] waits 4, 8, 16, 32 and 64 s: six attempts over
//!   124 s at most; a 429 or 503 with `Retry-After` sets its own delay
//!   ([`retry_after`]);
//! - jitter ([`Jitter`]), a retry budget ([`RetryBudget`]) and an attempt
//!   header are there when asked for, off by default;
//! - the wrapped service keeps the inner service's `Response` and `Error`
//!   types: after the last attempt the caller gets the last response or error,
//!   unchanged.
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
//! let service = TerminalRetryLayer::new().layer(flaky);
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
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod budget;
pub mod classify;
#[cfg(feature = "client")]
pub mod client;
mod error;
pub mod jitter;
pub mod layer;
mod origin;
#[cfg(feature = "outbox")]
pub mod outbox;
pub mod policy;
pub mod recovery;
#[cfg(any(feature = "client", feature = "outbox"))]
mod response;
pub mod retry_after;
pub mod schedule;
mod sync;

pub use budget::RetryBudget;
pub use classify::{classify_status, Classify, DefaultClassifier, Outcome};
pub use error::ConfigError;
pub use jitter::Jitter;
pub use layer::{TerminalRetry, TerminalRetryLayer};
pub use policy::TerminalRetryPolicy;
pub use recovery::Recovery;
pub use retry_after::RetryAfter;
pub use schedule::Schedule;

#[cfg(feature = "test-server")]
pub mod test_server;

// Compiles the README's examples with the doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
