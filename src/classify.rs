//! Deciding whether an attempt succeeded, may succeed if replayed, or never will.
//!
//! Every attempt ends in one of three [`Outcome`]s. The policy retries only a
//! [`Outcome::Transient`] one; a [`Outcome::Permanent`] rejection ends the call
//! at once, because replaying a request the server has refused only burns the
//! schedule.
//!
//! [`DefaultClassifier`] is the rule of the terminal callbacks: only a 2xx is a
//! success; 5xx, 408 and 429 are transient; every other status (any other 4xx,
//! and 1xx and 3xx: a redirect is not followed, the request did not reach its
//! handler) is permanent, except a `409 Conflict` with `Retry-After`, transient
//! (an idempotent server's "the first request with this key still runs, ask
//! again"); and any error of the inner service (refused or reset connection, an
//! elapsed per-attempt timeout) is transient, but for the one the crate's
//! signing layer returns for a request it cannot sign and never sent (feature
//! `webhooks`), which is permanent. Its status rule is
//! [`classify_status`], usable on its own.
//!
//! A closure wrapped in [`ClassifyFn`] is a classifier too, so a special case
//! can be layered over the default:
//!
//! ```
//! use http::{Response, StatusCode};
//! use tower_terminal_retry::{Classify, ClassifyFn, DefaultClassifier, Outcome};
//!
//! // This server answers 409 when a report was already accepted: a success.
//! let classifier = ClassifyFn(|result: &Result<Response<()>, std::io::Error>| match result {
//!     Ok(response) if response.status() == StatusCode::CONFLICT => Outcome::Success,
//!     other => DefaultClassifier.classify(other),
//! });
//!
//! let conflict = Ok(Response::builder().status(409).body(()).unwrap());
//! assert_eq!(classifier.classify(&conflict), Outcome::Success);
//! let bad_gateway = Ok(Response::builder().status(502).body(()).unwrap());
//! assert_eq!(classifier.classify(&bad_gateway), Outcome::Transient);
//! let refused = Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
//! assert_eq!(classifier.classify(&refused), Outcome::Transient);
//! ```

use http::{header::RETRY_AFTER, Response, StatusCode};

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The server took the request: return it, no retry.
    Success,
    /// A hiccup that a replay may get past: retry while the schedule lasts.
    Transient,
    /// The server refused the request for good: return it at once.
    Permanent,
}

impl Outcome {
    /// The name used in `tracing` events: `success`, `transient` or `permanent`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Transient => "transient",
            Outcome::Permanent => "permanent",
        }
    }
}

/// Sorts the result of one attempt into an [`Outcome`].
///
/// Implemented by [`DefaultClassifier`], and by [`ClassifyFn`] for a closure.
pub trait Classify<Res, E> {
    /// Classifies the result of one attempt.
    fn classify(&self, result: &Result<Res, E>) -> Outcome;
}

/// A closure `Fn(&Result<Res, E>) -> Outcome` as a [`Classify`]: see the
/// [crate docs](crate#classifying-an-answer). A wrapper rather than an
/// implementation for every closure, so that the compiler can tell which
/// `Res` and `E` a closure is for.
#[derive(Clone, Copy)]
pub struct ClassifyFn<F>(pub F);

impl<F, Res, E> Classify<Res, E> for ClassifyFn<F>
where
    F: Fn(&Result<Res, E>) -> Outcome,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        (self.0)(result)
    }
}

impl<F> std::fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClassifyFn").finish_non_exhaustive()
    }
}

/// The terminal-callback rule: statuses by [`classify_status`], except a `409
/// Conflict` with a `Retry-After` header, transient (a server's idempotency
/// layer says so when the first request with the same key still runs); every
/// inner service error transient, but for a request the crate refused to
/// send.
///
/// That one exception: with the `webhooks` feature, a `webhooks::SignError`
/// (a request that cannot be signed, refused unsent by the signing layer)
/// is permanent, whether it is the error itself or boxed in a
/// `tower::BoxError` (at any depth of its sources), as the signing layer
/// and tower's own layers box errors. Looking inside the error takes
/// `E: 'static`, which every error a tower service returns is.
///
/// ```
/// use http::Response;
/// use tower_terminal_retry::{Classify, DefaultClassifier, Outcome};
///
/// let running = Response::builder().status(409).header("retry-after", "1").body(()).unwrap();
/// let superseded = Response::builder().status(409).body(()).unwrap();
/// let classify = |response| DefaultClassifier.classify(&Ok::<_, std::io::Error>(response));
/// assert_eq!(classify(running), Outcome::Transient);
/// assert_eq!(classify(superseded), Outcome::Permanent);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultClassifier;

impl<B, E: 'static> Classify<Response<B>, E> for DefaultClassifier {
    fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
        match result {
            // The status first: a success is one range check.
            Ok(response) => match classify_status(response.status()) {
                Outcome::Permanent
                    if response.status() == StatusCode::CONFLICT
                        && response.headers().contains_key(RETRY_AFTER) =>
                {
                    Outcome::Transient
                }
                outcome => outcome,
            },
            Err(error) if refused_unsent(error) => Outcome::Permanent,
            // The inner service failed before a status came back: a refused or
            // reset connection, a TLS or I/O error, an elapsed timeout. None of
            // them says the server rejected the request.
            Err(_) => Outcome::Transient,
        }
    }
}

/// Whether `error` is the crate's own refusal of a request it will never
/// send, which a replay cannot cure.
#[cfg(feature = "webhooks")]
fn refused_unsent<E: 'static>(error: &E) -> bool {
    use crate::webhooks::SignError;
    let error = error as &dyn std::any::Any;
    if let Some(boxed) = error.downcast_ref::<Box<dyn std::error::Error + Send + Sync>>() {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&**boxed);
        while let Some(error) = cause {
            if error.is::<SignError>() {
                return true;
            }
            cause = error.source();
        }
        return false;
    }
    error.is::<SignError>()
}

/// Without the `webhooks` feature the crate refuses no request unsent.
#[cfg(not(feature = "webhooks"))]
fn refused_unsent<E>(_error: &E) -> bool {
    false
}

/// Classifies a response status: 2xx is [`Outcome::Success`]; 5xx (and any
/// non-standard code above 599), 408 (Request Timeout) and 429 (Too Many
/// Requests) are [`Outcome::Transient`]; every other status is
/// [`Outcome::Permanent`]: any other 4xx, and 1xx and 3xx too. A redirect
/// (`301 Moved Permanently` to `https`, say) means the request did not reach
/// its handler; it is not followed, as that would send the request, and its
/// credentials, to wherever the server points. Set the final URL instead.
///
/// ```
/// use http::StatusCode;
/// use tower_terminal_retry::{classify_status, Outcome};
///
/// assert_eq!(classify_status(StatusCode::OK), Outcome::Success);
/// assert_eq!(classify_status(StatusCode::BAD_GATEWAY), Outcome::Transient);
/// assert_eq!(classify_status(StatusCode::TOO_MANY_REQUESTS), Outcome::Transient);
/// assert_eq!(classify_status(StatusCode::NOT_FOUND), Outcome::Permanent);
/// assert_eq!(classify_status(StatusCode::MOVED_PERMANENTLY), Outcome::Permanent);
/// assert_eq!(classify_status(StatusCode::CONTINUE), Outcome::Permanent);
/// ```
#[inline]
pub fn classify_status(status: StatusCode) -> Outcome {
    let code = status.as_u16();
    // Tested first: the answer of nearly every call.
    if (200..=299).contains(&code) {
        return Outcome::Success;
    }
    match code {
        // 5xx and the non-standard codes above it, as the Go original did.
        500.. | 408 | 429 => Outcome::Transient,
        _ => Outcome::Permanent,
    }
}
