//! The sender's layer: [`SignLayer`] signs each attempt with that attempt's
//! time.
//!
//! Stack it inside the retry layer (the outbox's dispatcher puts its
//! service there), so that every attempt goes through it:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::ServiceBuilder;
//! use tower_terminal_retry::{webhooks::SignLayer, TerminalRetryLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse()?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let service = ServiceBuilder::new()
//!     .layer(TerminalRetryLayer::default())
//!     .layer(SignLayer::new([key])?) // each attempt signed with its own time
//!     .timeout(Duration::from_secs(30))
//!     .service(client);
//! # let _ = service;
//! # Ok(())
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::SystemTime,
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body::Body;
use http_body_util::Full;
use tower::{BoxError, Layer, Service};

use super::{
    is_valid_id,
    key::{Content, Key, KeyError},
    system_clock, unix_seconds, Clock, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};

/// The header the outbox sends each stored request's key in, the same on
/// every attempt, replay and restart: the webhook's id when present.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Signs each request, as the Standard Webhooks specification has it, with
/// the time of the attempt: see the [module docs](super).
///
/// Wraps services of `http::Request<Full<Bytes>>` (what the retry layer and
/// the outbox send) into [`Sign`]. The id signed and sent as `webhook-id` is
/// the request's `idempotency-key` header, or else its `webhook-id` header;
/// a request with neither (or with an id that is not 1 to 255 visible ASCII
/// characters without a `.`) is refused with a [`SignError`] and never sent.
/// `webhook-timestamp` and `webhook-signature` are set on each attempt,
/// replacing any the request carried. With several keys, the header carries
/// a signature for each, in their order.
///
/// Clones share the keys.
#[derive(Clone)]
pub struct SignLayer {
    signer: Arc<Signer>,
}

/// What every clone of the layer and its services shares.
#[derive(Clone)]
struct Signer {
    keys: Vec<Key>,
    /// Whether a key signs with ed25519, which needs the content joined.
    any_ed25519: bool,
    clock: Clock,
}

impl SignLayer {
    /// A layer that signs with each of `keys`: HMAC secrets (`whsec_`) and
    /// ed25519 signing keys (`whsk_`).
    ///
    /// # Errors
    ///
    /// [`KeyError::NoKeys`] for an empty list, and
    /// [`KeyError::PublicKeyCannotSign`] for a `whpk_` key.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Result<SignLayer, KeyError> {
        let keys: Vec<Key> = keys.into_iter().collect();
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        if !keys.iter().all(Key::can_sign) {
            return Err(KeyError::PublicKeyCannotSign);
        }
        let any_ed25519 = keys.iter().any(Key::is_ed25519);
        let signer = Signer {
            keys,
            any_ed25519,
            clock: system_clock(),
        };
        Ok(SignLayer {
            signer: Arc::new(signer),
        })
    }

    /// Reads the time of each attempt from `now` instead of the system's
    /// clock: for tests that move time on, and for a process whose clock is
    /// not the system's.
    pub fn clock(mut self, now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Arc::make_mut(&mut self.signer).clock = Arc::new(now);
        self
    }
}

impl fmt::Debug for SignLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignLayer")
            .field("keys", &self.signer.keys)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for SignLayer {
    type Service = Sign<S>;

    fn layer(&self, inner: S) -> Sign<S> {
        Sign {
            inner,
            signer: self.signer.clone(),
        }
    }
}

/// The service [`SignLayer`] produces.
///
/// Its response is the inner service's; its error is a [`BoxError`], as
/// tower's own layers have it: the inner service's error, boxed, or a
/// [`SignError`] when the request was refused unsent. The crate's
/// [`DefaultClassifier`](crate::DefaultClassifier) (and so the retry layer
/// and the outbox) classifies a `SignError` as permanent: a request that
/// cannot be signed is never retried.
#[derive(Clone)]
pub struct Sign<S> {
    inner: S,
    signer: Arc<Signer>,
}

impl<S: fmt::Debug> fmt::Debug for Sign<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sign")
            .field("inner", &self.inner)
            .field("keys", &self.signer.keys)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Request<Full<Bytes>>> for Sign<S>
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = SignFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<Full<Bytes>>) -> Self::Future {
        let state = match self.signer.sign(&mut request) {
            Ok(()) => State::Sending {
                future: self.inner.call(request),
            },
            Err(error) => State::Refused { error: Some(error) },
        };
        SignFuture { state }
    }
}

impl Signer {
    /// Sets the three headers on `request`, signed now.
    fn sign(&self, request: &mut Request<Full<Bytes>>) -> Result<(), SignError> {
        let headers = request.headers();
        let id = headers
            .get(IDEMPOTENCY_KEY)
            .or_else(|| headers.get(WEBHOOK_ID))
            .ok_or(SignError::MissingId)?
            .clone();
        if !is_valid_id(id.as_bytes()) {
            return Err(SignError::InvalidId);
        }
        let seconds = unix_seconds((self.clock)());
        let timestamp = seconds.to_string();
        let body = body_bytes(request.body());
        let content = Content {
            id: id.to_str().expect("checked: visible ASCII"),
            timestamp: &timestamp,
            body: &body,
        };
        let joined = self.any_ed25519.then(|| content.joined());
        let signatures: Vec<String> = self
            .keys
            .iter()
            .map(|key| key.sign(content, joined.as_deref()))
            .collect();
        let signatures =
            HeaderValue::try_from(signatures.join(" ")).expect("base64 is a header value");
        let headers = request.headers_mut();
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(seconds));
        headers.insert(WEBHOOK_SIGNATURE, signatures);
        headers.insert(WEBHOOK_ID, id);
        Ok(())
    }
}

/// The bytes of a `Full` body, which holds them in one piece, without
/// consuming it: a clone is polled once, and is always ready.
fn body_bytes(body: &Full<Bytes>) -> Bytes {
    let mut body = body.clone();
    match Pin::new(&mut body).poll_frame(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// Why [`Sign`] refused a request without sending it. A request refused
/// once is refused again: the crate's classifier takes it as permanent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignError {
    /// The request has neither an `idempotency-key` nor a `webhook-id`
    /// header: no id to sign.
    MissingId,
    /// The id is not 1 to 255 visible ASCII characters without a `.`.
    InvalidId,
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignError::MissingId => {
                "webhook not sent: the request has neither an idempotency-key nor a webhook-id \
                 header to sign as its id"
            }
            SignError::InvalidId => {
                "webhook not sent: its id (idempotency-key or webhook-id) is not 1 to 255 \
                 visible ASCII characters without a '.'"
            }
        })
    }
}

impl std::error::Error for SignError {}

pin_project_lite::pin_project! {
    /// The response future of [`Sign`]: the inner service's, or a refusal.
    pub struct SignFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProjection]
    enum State<F> {
        Sending { #[pin] future: F },
        Refused { error: Option<SignError> },
    }
}

impl<F> fmt::Debug for SignFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Sending { .. } => "sending",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("SignFuture").field("state", &state).finish()
    }
}

impl<F, T, E> Future for SignFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProjection::Sending { future } => future.poll(cx).map_err(Into::into),
            StateProjection::Refused { error } => {
                let error = error.take().expect("a refusal is polled to its end once");
                Poll::Ready(Err(error.into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> Key {
        text.parse().unwrap()
    }

    /// Signs `body` as the layer would at Unix second `at`, and returns the
    /// three headers.
    fn signed(keys: Vec<Key>, id: &str, at: u64, body: &'static str) -> [String; 3] {
        let layer = SignLayer::new(keys)
            .unwrap()
            .clock(move || SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(at));
        let mut request = Request::post("/")
            .header("webhook-id", id)
            .body(Full::from(body))
            .unwrap();
        layer.signer.sign(&mut request).unwrap();
        let header = |name: &str| request.headers()[name].to_str().unwrap().to_owned();
        [
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
        ]
    }

    #[test]
    fn the_specifications_vector_hmac() {
        // The reference Python library's test of `sign`.
        let [id, timestamp, signature] = signed(
            vec![key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(id, "msg_p5jXN8AQM9LWM0D4loKWxJek");
        assert_eq!(timestamp, "1614265330");
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn the_reference_vector_ed25519_and_rotation_in_key_order() {
        // The reference Go library's test of its asymmetric `Sign`: the
        // signing key is the base64 of a 32-byte seed.
        let ed25519 = key("whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=");
        let hmac = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let [_, _, signature] = signed(
            vec![ed25519, hmac],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(
            signature,
            "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag== \
             v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_public_key_or_no_key_cannot_make_a_signer() {
        // RFC 8032's first test key.
        let public = "whpk_11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        assert_eq!(
            SignLayer::new([key(public)]).unwrap_err(),
            KeyError::PublicKeyCannotSign
        );
        assert_eq!(SignLayer::new([]).unwrap_err(), KeyError::NoKeys);
    }

    #[test]
    fn the_body_of_a_full_is_read_without_consuming_it() {
        let body = Full::from("héllo");
        assert_eq!(body_bytes(&body), "héllo".as_bytes());
        assert_eq!(body_bytes(&body), "héllo".as_bytes());
        assert!(body_bytes(&Full::default()).is_empty());
    }
}
