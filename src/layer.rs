//! The layer: [`TerminalRetryLayer`] wraps any `Service<http::Request<B>>`.
//!
//! The wrapped service is tower's own [`Retry`] driven by a
//! [`TerminalRetryPolicy`]. It has
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
//! use tower_terminal_retry::{TerminalRetryLayer, TerminalRetryPolicy};
//! # use tower_terminal_retry::test_server::{Reply, TestServer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! // A server that answers 503, then hangs, then answers 200.
//! # let server = TestServer::scripted([Reply::status(503), Reply::Hang]).await?;
//! # let url = server.url("/api/daemon/tasks/t1/complete");
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let service = ServiceBuilder::new()
//!     .layer(TerminalRetryLayer::default())
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

use tower::{retry::Retry, Layer};

use crate::{classify::DefaultClassifier, policy::TerminalRetryPolicy};

/// Retries idempotent requests on transient failures: see the
/// [crate docs](crate).
///
/// Wraps any `Service<http::Request<B>>` (with `B: Clone`) into tower's
/// [`Retry`] with a [`TerminalRetryPolicy`]: the
/// inner service's `Response` and `Error` types are kept, and after the last
/// attempt the caller gets the last response or error, unchanged. Clones
/// share the schedule, classifier and budget.
#[derive(Debug, Clone)]
pub struct TerminalRetryLayer<C = DefaultClassifier> {
    policy: TerminalRetryPolicy<C>,
}

impl<C> TerminalRetryLayer<C> {
    /// A layer that retries with `policy`: its schedule, classifier and
    /// every other setting are the policy's (see [`TerminalRetryPolicy`]).
    /// [`TerminalRetryLayer::default`] is the default policy's.
    pub fn new(policy: TerminalRetryPolicy<C>) -> Self {
        TerminalRetryLayer { policy }
    }

    /// The policy each wrapped service starts from.
    pub fn policy(&self) -> &TerminalRetryPolicy<C> {
        &self.policy
    }
}

/// The default policy's layer: the schedule 4, 8, 16, 32, 64 s and the
/// default classifier.
impl Default for TerminalRetryLayer {
    fn default() -> Self {
        TerminalRetryLayer::new(TerminalRetryPolicy::default())
    }
}

impl<S, C> Layer<S> for TerminalRetryLayer<C> {
    type Service = Retry<TerminalRetryPolicy<C>, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(self.policy.clone(), inner)
    }
}
