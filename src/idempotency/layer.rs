//! The layer and its service: which key a request has, its fingerprint, and
//! the settings.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{request::Parts, HeaderName, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use super::{
    future::{refusal, Req, ResponseFuture, Settings},
    Fingerprint, Store,
};
use crate::ConfigError;

/// The request header that carries the key (the IETF httpapi draft's name).
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The longest key taken, in bytes.
const MAX_KEY_LEN: usize = 255;
/// The default retention: Stripe's 24 hours.
const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The longest retention taken.
const MAX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The default largest response body kept: 1 MiB.
const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// A tower layer for servers that runs each request with an
/// `Idempotency-Key` once, and answers its repeats with the response it
/// kept: see the [module docs](super).
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    settings: Settings,
}

impl IdempotencyLayer {
    /// A layer keeping its keys in `store`, for 24 hours, with response
    /// bodies of up to 1 MiB, and requests without a key passed through.
    pub fn new(store: impl Store) -> IdempotencyLayer {
        IdempotencyLayer {
            settings: Settings {
                store: Arc::new(store),
                retention: DEFAULT_RETENTION,
                max_body: DEFAULT_MAX_BODY,
                require_key: false,
            },
        }
    }

    /// How long a finished key is kept (default 24 hours): a repeat within
    /// it gets the kept response, a later one runs the handler again. Tell
    /// your senders: their retries must end within it.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSetting`] when `retention` is zero or
    /// longer than 30 days.
    pub fn retention(mut self, retention: Duration) -> Result<IdempotencyLayer, ConfigError> {
        if retention.is_zero() || retention > MAX_RETENTION {
            return Err(ConfigError::InvalidSetting {
                reason: "the retention must be more than zero and at most 30 days",
            });
        }
        self.settings.retention = retention;
        Ok(self)
    }

    /// The largest response body kept, in bytes (default 1 MiB). A larger
    /// one, or one whose length is not known in advance, goes to the client
    /// whole but is not kept: a repeat of its request gets `409 Conflict`
    /// saying so, never a truncated body.
    pub fn max_body(mut self, limit: usize) -> IdempotencyLayer {
        self.settings.max_body = limit;
        self
    }

    /// Whether a request without a key is refused with `400 Bad Request`
    /// (default `false`: it passes through, nothing kept).
    pub fn require_key(mut self, required: bool) -> IdempotencyLayer {
        self.settings.require_key = required;
        self
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency {
            inner,
            settings: Arc::new(self.settings.clone()),
        }
    }
}

/// The service [`IdempotencyLayer`] makes: see the [module docs](super).
#[derive(Debug, Clone)]
pub struct Idempotency<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, B> Service<Req> for Idempotency<S>
where
    S: Service<Req, Response = Response<B>> + Clone,
    B: Body + From<Bytes>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> ResponseFuture<S, B> {
        let settings = self.settings.clone();
        let (parts, mut body) = request.into_parts();
        let key = match key_of(&parts) {
            Ok(Some(key)) => key,
            Ok(None) if !settings.require_key => {
                let future = self.inner.call(Request::from_parts(parts, body));
                return ResponseFuture::passed(future, settings);
            }
            Ok(None) => {
                let reason = "this endpoint requires an idempotency-key header";
                return ResponseFuture::answered(
                    refusal(StatusCode::BAD_REQUEST, reason),
                    settings,
                );
            }
            Err(reason) => {
                return ResponseFuture::answered(refusal(StatusCode::BAD_REQUEST, reason), settings)
            }
        };
        let fingerprint = fingerprint(&parts, &mut body);
        let begin = settings.store.begin(key, fingerprint, settings.retention);
        // The service made ready goes with the request; a clone stays for
        // the next call, which polls it ready again.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let request = Request::from_parts(parts, body);
        ResponseFuture::begun(begin, fingerprint, inner, request, settings)
    }
}

/// The request's key: the verified `webhook-id` when the signature check of
/// the `webhooks` feature ran in front, else its `idempotency-key` header;
/// `None` without either; the reason to refuse a bad one.
fn key_of(parts: &Parts) -> Result<Option<&str>, &'static str> {
    #[cfg(feature = "webhooks")]
    if let Some(id) = parts.extensions.get::<crate::webhooks::WebhookId>() {
        return checked(id.as_str().as_bytes()).map(Some);
    }
    let mut values = parts.headers.get_all(IDEMPOTENCY_KEY).into_iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("a request carries one idempotency-key header at most");
    }
    checked(value.as_bytes()).map(Some)
}

/// `key` as text, if it is 1 to 255 bytes of visible ASCII.
fn checked(key: &[u8]) -> Result<&str, &'static str> {
    let visible = key.iter().all(|byte| (0x21..=0x7e).contains(byte));
    if key.is_empty() || key.len() > MAX_KEY_LEN || !visible {
        return Err("an idempotency key is 1 to 255 bytes of visible ASCII (no spaces)");
    }
    // Visible ASCII is UTF-8.
    std::str::from_utf8(key).map_err(|_| "an idempotency key is visible ASCII")
}

/// The request's fingerprint: a SHA-256 over its method, path and query,
/// and body, each prefixed with its length so that no two requests run
/// together. `body` is read and put back, the same bytes.
fn fingerprint(parts: &Parts, body: &mut Full<Bytes>) -> Fingerprint {
    let bytes = take_bytes(body);
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |target| target.as_str());
    let mut hasher = Sha256::new();
    for part in [parts.method.as_str().as_bytes(), target.as_bytes(), &bytes] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    *body = Full::new(bytes);
    Fingerprint::from_bytes(hasher.finalize().into())
}

/// The bytes of a `Full` body: it holds one frame, ready at once.
fn take_bytes(body: &mut Full<Bytes>) -> Bytes {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts_and_body(method: &str, uri: &str, body: &'static str) -> (Parts, Full<Bytes>) {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
            .into_parts()
    }

    fn of(method: &str, uri: &str, body: &'static str) -> Fingerprint {
        let (parts, mut body) = parts_and_body(method, uri, body);
        fingerprint(&parts, &mut body)
    }

    #[test]
    fn the_fingerprint_tells_method_path_query_and_body_apart() {
        let first = of("POST", "/orders", "{}");
        assert_eq!(first, of("POST", "/orders", "{}"));
        assert_ne!(first, of("PUT", "/orders", "{}"));
        assert_ne!(first, of("POST", "/orders/", "{}"));
        assert_ne!(first, of("POST", "/orders?dry=1", "{}"));
        assert_ne!(first, of("POST", "/orders", "{ }"));
        // Lengths keep the parts apart.
        assert_ne!(of("POST", "/a", "b"), of("POST", "/ab", ""));
    }

    #[test]
    fn the_body_is_read_and_put_back_whole() {
        let (parts, mut body) = parts_and_body("POST", "/", "payload");
        fingerprint(&parts, &mut body);
        assert_eq!(take_bytes(&mut body), "payload");
    }

    #[test]
    fn keys_are_one_to_255_bytes_of_visible_ascii() {
        assert_eq!(checked(b"a"), Ok("a"));
        assert!(checked("k".repeat(255).as_bytes()).is_ok());
        assert!(checked(br#""quoted-uuid""#).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; 256],
            b"a b",
            b"a\tb",
            b"a\x7f",
            "é".as_bytes(),
        ] {
            assert!(checked(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retention_is_between_zero_and_30_days() {
        let layer = || IdempotencyLayer::new(super::super::MemoryStore::new());
        assert!(layer().retention(Duration::ZERO).is_err());
        assert!(layer()
            .retention(MAX_RETENTION + Duration::from_secs(1))
            .is_err());
        let layer = layer().retention(MAX_RETENTION).unwrap();
        assert_eq!(layer.settings.retention, MAX_RETENTION);
    }
}
