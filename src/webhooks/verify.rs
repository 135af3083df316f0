//! The receiver's layer: [`VerifyLayer`] lets a request through only when
//! it is signed by one of its keys, and recently.
//!
//! What a request must carry, checked in this order, each refusal a 401 with
//! its reason in `WWW-Authenticate` (never a secret, never a signature):
//!
//! 1. each of `webhook-id`, `webhook-timestamp` and `webhook-signature`,
//!    once;
//! 2. an id of 1 to 255 visible ASCII characters without a `.`;
//! 3. a timestamp of whole Unix seconds within the tolerance of the
//!    receiver's clock, in the past or the future (5 minutes by default);
//! 4. at most 8 signatures, at least one of them a well-formed `v1` or `v1a`
//!    one (others, such as a later version's, are skipped);
//! 5. a body no longer than the limit (1 MiB by default; over it, 413);
//! 6. a signature that matches one of the keys.
//!
//! The first four are read from the headers before the body is read. An
//! HMAC key takes in the content once, however many `v1` signatures there
//! are; each `v1a` signature costs an ed25519 verification per ed25519 key,
//! hence the cap on their number.

use std::{fmt, mem, sync::Arc, task::Context, task::Poll, time::Duration, time::SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use tower::{BoxError, Layer, Service};

use super::{
    check::{Refusal, Verifier},
    key::{Key, KeyError},
    system_clock,
    verify_future::VerifyFuture,
    WebhookId,
};

/// How far a timestamp may be from the receiver's clock by default, as in
/// the reference libraries.
const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// The longest body read by default.
const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// Verifies Standard Webhooks signatures on the way in: see the
/// [module docs](super).
///
/// Wraps any `Service<Request<Full<Bytes>>>` into [`Verify`], a service of
/// `Request<B>` for any body `B`: it reads the body (up to the limit) and
/// hands the inner service the same bytes in a `Full`, with the verified
/// [`WebhookId`] in the request's extensions. A request that does not
/// verify never reaches the inner service: it is answered with a 401
/// (`WWW-Authenticate: webhook-signature error="..."` says why), a 413 when
/// the body is over the limit, or a 400 when the body could not be read;
/// those answers have an empty body, so the inner service's response body
/// must be `Default`.
///
/// [`verify`](VerifyLayer::verify) checks a request already read, for a
/// server that is not a tower one.
///
/// Clones share the keys.
#[derive(Clone)]
pub struct VerifyLayer {
    verifier: Arc<Verifier>,
}

impl VerifyLayer {
    /// A layer that accepts a signature by any of `keys`: HMAC secrets
    /// (`whsec_`) for `v1` signatures; ed25519 public keys (`whpk_`), or the
    /// signing keys they belong to (`whsk_`), for `v1a`. Give the old and
    /// the new key while the sender rotates.
    ///
    /// # Errors
    ///
    /// [`KeyError::NoKeys`] for an empty list.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Result<VerifyLayer, KeyError> {
        let keys: Vec<Key> = keys.into_iter().collect();
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        let verifier = Verifier {
            keys,
            tolerance: DEFAULT_TOLERANCE,
            body_limit: DEFAULT_BODY_LIMIT,
            clock: system_clock(),
        };
        Ok(VerifyLayer {
            verifier: Arc::new(verifier),
        })
    }

    /// How far a request's timestamp may be from the receiver's clock, in
    /// the past or the future (by default 5 minutes). The sender's clock
    /// must be within it of the receiver's.
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        Arc::make_mut(&mut self.verifier).tolerance = tolerance;
        self
    }

    /// The longest body read, in bytes (by default 1 MiB): a longer one is
    /// answered with 413, unread past the limit.
    pub fn body_limit(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.verifier).body_limit = limit;
        self
    }

    /// Reads the time from `now` instead of the system's clock: for tests
    /// that move time on, and for a process whose clock is not the system's.
    pub fn clock(mut self, now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Arc::make_mut(&mut self.verifier).clock = Arc::new(now);
        self
    }

    /// Checks a request already read, `headers` and `body`, as the layer
    /// does: the verified id, or why it is refused.
    ///
    /// # Errors
    ///
    /// A [`Refusal`], with the status to answer and its reason.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<WebhookId, Refusal> {
        let claim = self.verifier.read_headers(headers)?;
        if body.len() > self.verifier.body_limit {
            return Err(Refusal::too_large());
        }
        self.verifier.check(claim, body)
    }
}

impl fmt::Debug for VerifyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.verifier.fmt(f)
    }
}

impl<S> Layer<S> for VerifyLayer {
    type Service = Verify<S>;

    fn layer(&self, inner: S) -> Verify<S> {
        Verify {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service [`VerifyLayer`] produces. Its response and error types are
/// the inner service's.
#[derive(Clone)]
pub struct Verify<S> {
    inner: S,
    verifier: Arc<Verifier>,
}

impl<S: fmt::Debug> fmt::Debug for Verify<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verify")
            .field("inner", &self.inner)
            .field("verifier", &self.verifier)
            .finish()
    }
}

impl<S, B, ResBody> Service<Request<B>> for Verify<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = VerifyFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let claim = match self.verifier.read_headers(&parts.headers) {
            Ok(claim) => claim,
            Err(refusal) => return VerifyFuture::answered(refusal.response()),
        };
        let limit = self.verifier.body_limit;
        if body.size_hint().lower() > limit as u64 {
            return VerifyFuture::answered(Refusal::too_large().response());
        }
        // The service made ready is the one that takes the request, once the
        // body is read; this one gets a clone.
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        let reading = Limited::new(body, limit).collect();
        VerifyFuture::reading(reading, parts, claim, self.verifier.clone(), inner)
    }
}
