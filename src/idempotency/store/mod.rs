//! Where the layer keeps its keys: the [`Store`] seam, what crosses it, and
//! the stores behind it (in memory, and on PostgreSQL with the `postgres`
//! feature).
//!
//! A key goes through three states in a store: absent, *running* (claimed
//! by the request that runs the handler) and *finished* (its response kept,
//! or marked as not kept, until the retention runs out). The layer asks the
//! store to [`begin`](Store::begin) a key, then either to
//! [`finish`](Store::finish) the claim or to [`release`](Store::release) it.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, StatusCode};

/// What a store's operation returns: its answer at once
/// ([`StoreFuture::ready`]: no allocation, for a store in memory), or a
/// future ([`StoreFuture::new`], boxed), so that the layer holds any store
/// behind one pointer.
pub struct StoreFuture<T>(Answer<T>);

enum Answer<T> {
    /// `None` once taken.
    Ready(Option<Result<T, StoreError>>),
    Pending(Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>),
}

impl<T> StoreFuture<T> {
    /// An answer known now.
    pub fn ready(answer: Result<T, StoreError>) -> StoreFuture<T> {
        StoreFuture(Answer::Ready(Some(answer)))
    }

    /// An answer to wait for.
    pub fn new(
        future: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> StoreFuture<T> {
        StoreFuture(Answer::Pending(Box::pin(future)))
    }
}

// Neither variant is pinned in place: the answer is moved out, the future
// is boxed.
impl<T> Unpin for StoreFuture<T> {}

impl<T> Future for StoreFuture<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Answer::Ready(answer) => {
                Poll::Ready(answer.take().expect("StoreFuture polled after completion"))
            }
            Answer::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> fmt::Debug for StoreFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            Answer::Ready(_) => "ready",
            Answer::Pending(_) => "pending",
        };
        f.debug_tuple("StoreFuture").field(&state).finish()
    }
}

/// The seam between [`IdempotencyLayer`](super::IdempotencyLayer) and where
/// it keeps its keys: [`MemoryStore`], `PostgresStore` (feature
/// `postgres`), or a store of your own.
///
/// Each operation is atomic for its key: of two requests that
/// [`begin`](Store::begin) one key at once, exactly one gets
/// [`Begin::Claimed`]. [`finish`](Store::finish) and
/// [`release`](Store::release) act on a claim only while it is the key's
/// current one: a claim the store has since given to another request (its
/// lease ran out) changes nothing.
///
/// The layer calls [`release`](Store::release) from a destructor too, when
/// a request is dropped mid-handler, and then spawns the future it returns
/// on the current tokio runtime: a store whose release can run at once
/// should do it when called.
pub trait Store: fmt::Debug + Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`, or says what holds
    /// it. A finished key whose retention ran out, or a running one whose
    /// holder is gone (its lease ran out), counts as absent: it is claimed
    /// anew. `retention` is how long the key will be kept once finished.
    fn begin(&self, key: &str, fingerprint: Fingerprint, retention: Duration)
        -> StoreFuture<Begin>;

    /// Marks the key of `claim` as finished, keeping `response` (`None`: a
    /// final response that was not kept, too large), for `retention` from
    /// now.
    fn finish(
        &self,
        claim: &Claim,
        response: Option<KeptResponse>,
        retention: Duration,
    ) -> StoreFuture<()>;

    /// Frees the key of `claim`, so that the next request with it runs the
    /// handler.
    fn release(&self, claim: &Claim) -> StoreFuture<()>;
}

/// What [`Store::begin`] found.
#[derive(Debug, Clone)]
pub enum Begin {
    /// The key was free: it is now held by this claim.
    Claimed(Claim),
    /// Another request with the key is running, since it was claimed with
    /// this fingerprint.
    Running {
        /// The fingerprint of the running request.
        fingerprint: Fingerprint,
    },
    /// The first request with the key has finished.
    Finished {
        /// The fingerprint of the first request.
        fingerprint: Fingerprint,
        /// Its response, or `None` when it was not kept (too large).
        response: Option<KeptResponse>,
    },
}

/// A store's hold on a key, from [`Begin::Claimed`] to
/// [`Store::finish`] or [`Store::release`]: the key and a token that tells
/// this claim from any later one of the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claim {
    key: Arc<str>,
    token: u64,
}

impl Claim {
    /// The claim of `key` that a store numbered `token`.
    pub fn new(key: impl Into<Arc<str>>, token: u64) -> Claim {
        Claim {
            key: key.into(),
            token,
        }
    }

    /// The key claimed.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key, shared.
    pub(crate) fn shared_key(&self) -> &Arc<str> {
        &self.key
    }

    /// The store's number for this claim.
    pub fn token(&self) -> u64 {
        self.token
    }
}

/// What tells one request from another under the same key: a SHA-256 over
/// its method, its path and query, and its body (each length-prefixed).
/// A repeat must have the first request's fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// A fingerprint as a store kept it.
    pub fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// The fingerprint's 32 bytes, for a store to keep.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    // Eight bytes in hex tell fingerprints apart in a log; the rest is noise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("..)")
    }
}

/// The headers a kept response keeps: those that describe its content
/// (`Content-Length` is not among them: it follows from the body). Every
/// other header, `Set-Cookie`, `Authorization`-like and custom ones
/// included, is dropped.
const KEPT_HEADERS: [HeaderName; 10] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LOCATION,
    header::CONTENT_DISPOSITION,
    header::LOCATION,
    header::ETAG,
    header::LAST_MODIFIED,
    header::CACHE_CONTROL,
    header::EXPIRES,
];

/// The most bytes of header names and values a kept response holds; a
/// response with more is not kept.
pub(crate) const MAX_KEPT_HEADER_BYTES: usize = 16 * 1024;

/// A response as a store keeps it, to be replayed: its status, the headers
/// that describe its content, and its body.
///
/// The headers kept are `Content-Type`, `Content-Encoding`,
/// `Content-Language`, `Content-Location`, `Content-Disposition`,
/// `Location`, `ETag`, `Last-Modified`, `Cache-Control` and `Expires`; every
/// other header (`Set-Cookie`, `Authorization`-like, custom ones) is dropped
/// by [`KeptResponse::new`], as is any value marked sensitive.
#[derive(Clone)]
pub struct KeptResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl KeptResponse {
    /// A response to keep, with only the headers that describe its content
    /// taken from `headers`.
    pub fn new(status: StatusCode, headers: &HeaderMap, body: Bytes) -> KeptResponse {
        let mut kept = HeaderMap::new();
        for (name, value) in headers {
            if KEPT_HEADERS.contains(name) && !value.is_sensitive() {
                kept.append(name.clone(), value.clone());
            }
        }
        KeptResponse {
            status,
            headers: kept,
            body,
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers kept.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body, whole.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub(crate) fn into_parts(self) -> (StatusCode, HeaderMap, Bytes) {
        (self.status, self.headers, self.body)
    }

    /// The bytes of its header names and values.
    pub(crate) fn header_bytes(&self) -> usize {
        self.headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum()
    }
}

impl fmt::Debug for KeptResponse {
    // Header values and the body stay out: they may hold personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeptResponse")
            .field("status", &self.status)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// A store that could not answer, or be made. The layer answers the
/// request itself then, without calling the handler: `500 Internal Server
/// Error` for [`Damaged`](StoreError::Damaged), else `503 Service
/// Unavailable` with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// No room for another key: the store is full of requests still
    /// running, which are never evicted.
    Full,
    /// The store cannot be reached, or did not answer in time.
    Unavailable {
        /// What went wrong, without secrets.
        reason: String,
    },
    /// What the store holds for the key cannot be read.
    Damaged {
        /// What is wrong with it.
        reason: String,
    },
    /// The store's own configuration is refused (a table name, a URL),
    /// when it is made: never from an operation.
    Invalid {
        /// What is wrong, and what is taken.
        reason: String,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Full => f.write_str(
                "the idempotency store is full of requests still running: no room for another key",
            ),
            StoreError::Unavailable { reason } => {
                write!(f, "the idempotency store is unavailable: {reason}")
            }
            StoreError::Damaged { reason } => {
                write!(f, "the idempotency store holds a damaged record: {reason}")
            }
            StoreError::Invalid { reason } => {
                write!(
                    f,
                    "the idempotency store's configuration is refused: {reason}"
                )
            }
        }
    }
}

impl std::error::Error for StoreError {}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_kept_response_keeps_the_headers_that_describe_its_content_only() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::LOCATION, HeaderValue::from_static("/orders/7"));
        headers.insert(
            header::SET_COOKIE,
            HeaderValue::from_static("session=s3cret"),
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        headers.insert("x-request-id", HeaderValue::from_static("r1"));
        let mut marked = HeaderValue::from_static("no-store");
        marked.set_sensitive(true);
        headers.insert(header::CACHE_CONTROL, marked);
        let kept = KeptResponse::new(StatusCode::CREATED, &headers, Bytes::from_static(b"{}"));
        let names: Vec<_> = kept.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "location"]);
        assert_eq!(
            kept.header_bytes(),
            "content-type".len() + 10 + "location".len() + 9
        );
        let debug = format!("{kept:?}");
        assert!(
            !debug.contains("/orders/7") && !debug.contains("{}"),
            "{debug}"
        );
    }

    #[test]
    fn a_fingerprint_shows_its_first_eight_bytes() {
        let fingerprint = Fingerprint::from_bytes([0xab; 32]);
        assert_eq!(
            format!("{fingerprint:?}"),
            "Fingerprint(abababababababab..)"
        );
        assert_eq!(fingerprint.as_bytes(), &[0xab; 32]);
    }
}
