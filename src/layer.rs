//! The layer: [`TerminalRetryLayer`] wraps any `Service<http::Request<B>>`.
//!
//! The wrapped service, [`TerminalRetry`], is tower's own
//! [`Retry`] driven by a [`TerminalRetryPolicy`]. It has
//! exactly the inner service's `Response` and `Error` types: after the last
//! attempt the caller gets the last response (a 502 stays an `Ok` response with
//! its body readable) or the last error, unchanged, and can still classify it.
//!
//! Put a per-attempt timeout *inside* the layer, so that a hung attempt counts
//! as a transient error and is retried, and buffer streaming bodies *outside*
//! it (see the crate docs). Stacked onto hyper-util's client:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_terminal_retry::TerminalRetryLayer;
//! # use tower_terminal_retry::test_server::{Reply, TestServer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // A server that answers 503, then hangs, then answers 200.
//! # let server = TestServer::scripted([Reply::status(503), Reply::Hang]).await?;
//! # let url = server.url("/api/daemon/tasks/t1/complete");
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let service = ServiceBuilder::new()
//!     .layer(TerminalRetryLayer::new())
//!     .timeout(Duration::from_secs(30)) // per attempt
//!     .service(client);
//!
//! let request = http::Request::post(url)
//!     .header("content-type", "application/json")
//!     .body(Full::from(r#"{"output":"done"}"#))?;
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), 200); // the third attempt
//! # assert_eq!(server.requests().len(), 3);
//! # Ok(())
//! # }
//! ```

use http::HeaderName;
use tower::{retry::Retry, Layer};

use crate::{
    budget::RetryBudget, classify::DefaultClassifier, jitter::Jitter, policy::TerminalRetryPolicy,
    recovery::Recovery, retry_after::RetryAfter, schedule::Schedule,
};

/// The service [`TerminalRetryLayer`] produces: tower's `Retry` with the
/// terminal policy.
pub type TerminalRetry<S, C = DefaultClassifier> = Retry<TerminalRetryPolicy<C>, S>;

/// Retries idempotent requests on transient failures: see the
/// [crate docs](crate).
///
/// Wraps any `Service<http::Request<B>>` (with `B: Clone`) into
/// [`TerminalRetry`], tower's `Retry` with a [`TerminalRetryPolicy`]: the
/// inner service's `Response` and `Error` types are kept, and after the last
/// attempt the caller gets the last response or error, unchanged. Clones
/// share the schedule, classifier and budget.
#[derive(Debug, Clone)]
pub struct TerminalRetryLayer<C = DefaultClassifier> {
    policy: TerminalRetryPolicy<C>,
}

impl TerminalRetryLayer {
    /// The default layer: the schedule 4, 8, 16, 32, 64 s and the default
    /// classifier (see [`TerminalRetryPolicy`]).
    pub fn new() -> Self {
        TerminalRetryLayer::default()
    }
}

impl Default for TerminalRetryLayer {
    fn default() -> Self {
        TerminalRetryLayer::from(TerminalRetryPolicy::default())
    }
}

impl<C> From<TerminalRetryPolicy<C>> for TerminalRetryLayer<C> {
    fn from(policy: TerminalRetryPolicy<C>) -> Self {
        TerminalRetryLayer { policy }
    }
}

impl<C> TerminalRetryLayer<C> {
    /// Uses `schedule` for the delays between attempts (by default 4, 8, 16,
    /// 32 and 64 s).
    pub fn with_schedule(self, schedule: Schedule) -> Self {
        self.policy.with_schedule(schedule).into()
    }

    /// Uses `classifier` to sort results into success, transient and
    /// permanent (by default [`DefaultClassifier`]; a closure goes in a
    /// [`ClassifyFn`](crate::ClassifyFn)).
    pub fn with_classifier<D>(self, classifier: D) -> TerminalRetryLayer<D> {
        self.policy.with_classifier(classifier).into()
    }

    /// Sets how the server's `Retry-After` is honoured (by default up to five
    /// minutes).
    pub fn with_retry_after(self, retry_after: RetryAfter) -> Self {
        self.policy.with_retry_after(retry_after).into()
    }

    /// Randomises the schedule's delays (off by default).
    pub fn with_jitter(self, jitter: Jitter) -> Self {
        self.policy.with_jitter(jitter).into()
    }

    /// Limits retries with `budget`, shared by every clone of this layer.
    pub fn with_budget(self, budget: RetryBudget) -> Self {
        self.policy.with_budget(budget).into()
    }

    /// Numbers retried requests in the header `name`: the second attempt
    /// carries `name: 2`, the third `name: 3`, and so on. The first attempt
    /// goes out as the caller built it.
    pub fn with_attempt_header(self, name: HeaderName) -> Self {
        self.policy.with_attempt_header(name).into()
    }

    /// Ends schedule delays early once the server answers again: see
    /// [`Recovery`]. Every success through this layer is reported to
    /// `recovery`, and every wait on a schedule delay (not one set by
    /// `Retry-After`) can be released by it. Off by default: the schedule
    /// stays exact.
    pub fn with_recovery(self, recovery: Recovery) -> Self {
        self.policy.with_recovery(recovery).into()
    }

    /// The policy each wrapped service starts from: a
    /// [`tower::retry::Policy`], for tower's own `RetryLayer`.
    pub fn policy(&self) -> &TerminalRetryPolicy<C> {
        &self.policy
    }
}

impl<S, C> Layer<S> for TerminalRetryLayer<C> {
    type Service = TerminalRetry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(self.policy.clone(), inner)
    }
}
