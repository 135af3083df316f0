//! Signed webhooks end to end: signed by `SignLayer` on every attempt,
//! verified by `VerifyLayer` over real loopback servers; every refusal; the
//! reference Python library on the other side, both ways; and an outbox
//! replay hours after the event, across a restart of the sender.

mod outbox_support;
mod support;

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Outbox, Replay},
    webhooks::{Key, SignError, SignLayer, VerifyLayer, WebhookId},
    Classify, DefaultClassifier, Outcome, Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

use outbox_support::{wait_every, Scratch};
use support::{client, schedule};

const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW: &str = "whsec_dGhlIG5ldyBzZWNyZXQsIGFmdGVyIHRoZSByb3RhdGlvbg==";
const OTHER: &str = "whsec_YW4gdW5yZWxhdGVkIHNlY3JldCBvZiAzMiBieXRlcw==";
/// A payload with text outside ASCII, as the bytes go on the wire.
const NON_ASCII: &str =
    r#"{"type":"order.paid","customer":"Zoë Ångström","note":"ünïcødé ✓ 🚀 注文"}"#;

fn key(text: &str) -> Key {
    text.parse().expect("a valid key")
}

/// An ed25519 signing key (a seed of 32 bytes of `byte`) and its public
/// key, in their text forms.
fn ed25519_pair(byte: u8) -> (String, String) {
    use base64::Engine;
    let seed = [byte; 32];
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    let engine = base64::engine::general_purpose::STANDARD;
    (
        format!("whsk_{}", engine.encode(seed)),
        format!("whpk_{}", engine.encode(public.as_bytes())),
    )
}

/// Whole seconds since 1970 on the system's clock.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A request the application behind a `VerifyLayer` saw.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    body: Bytes,
}

/// The application behind the verifying layer: records what it is handed
/// (the id from the extension, the body) and answers 204.
#[derive(Clone, Default)]
struct Application {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Application {
    fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future: Send,
    > + Clone
           + Send
           + 'static {
        let seen = self.seen.clone();
        service_fn(move |request: Request<Full<Bytes>>| {
            let seen = seen.clone();
            async move {
                let id = request.extensions().get::<WebhookId>().cloned();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let id = id.expect("the verified id").as_str().to_owned();
                seen.lock().unwrap().push(Seen { id, body });
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::default())
                        .unwrap(),
                )
            }
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves `service` on a free loopback port, for as long as the test's
/// runtime runs.
async fn serve<S>(service: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            let service =
                hyper::service::service_fn(move |request| service.clone().oneshot(request));
            tokio::spawn(async move {
                let connection = auto::Builder::new(TokioExecutor::new());
                let _ = connection
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

/// A POST of `body` to `url` with the given idempotency key.
fn event(url: &str, key: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Full::new(body.into()))
        .unwrap()
}

#[tokio::test]
async fn a_signed_request_reaches_the_application_with_its_id_and_the_same_bytes() {
    let application = Application::default();
    let receiver = VerifyLayer::new([key(OLD)])
        .unwrap()
        .layer(application.service());
    let address = serve(receiver).await;
    let sender = SignLayer::new([key(OLD)]).unwrap().layer(client());
    let url = format!("http://{address}/hooks/orders");

    let response = sender
        .oneshot(event(&url, "evt_1", NON_ASCII))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let seen = application.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, "evt_1");
    assert_eq!(seen[0].body, NON_ASCII.as_bytes());
}

#[tokio::test]
async fn the_id_is_the_idempotency_key_else_the_webhook_id_else_the_request_is_refused_unsent() {
    let headers = Arc::new(Mutex::new(Vec::<HeaderMap>::new()));
    let recorded = headers.clone();
    let inner = service_fn(move |request: Request<Full<Bytes>>| {
        recorded.lock().unwrap().push(request.headers().clone());
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
    });
    let sender = SignLayer::new([key(OLD)]).unwrap().layer(inner);

    let both = Request::post("/")
        .header("idempotency-key", "key-1")
        .header("webhook-id", "id-1")
        .body(Full::from("{}"))
        .unwrap();
    sender.clone().oneshot(both).await.unwrap();
    let only_id = Request::post("/")
        .header("webhook-id", "id-2")
        .body(Full::from("{}"))
        .unwrap();
    sender.clone().oneshot(only_id).await.unwrap();
    let recorded = headers.lock().unwrap().clone();
    let ids: Vec<&str> = recorded
        .iter()
        .map(|headers| headers["webhook-id"].to_str().unwrap())
        .collect();
    assert_eq!(ids, ["key-1", "id-2"]);

    // Neither header, or an id the specification forbids: an error, and
    // nothing reaches the inner service.
    for (request, expected) in [
        (
            Request::post("/").body(Full::from("{}")).unwrap(),
            SignError::MissingId,
        ),
        (
            Request::post("/")
                .header("idempotency-key", "order.42")
                .body(Full::from("{}"))
                .unwrap(),
            SignError::InvalidId,
        ),
    ] {
        let error = sender.clone().oneshot(request).await.unwrap_err();
        assert_eq!(error.downcast_ref::<SignError>(), Some(&expected));
    }
    assert_eq!(headers.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_signed_is_permanent_not_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = service_fn(move |_: Request<Full<Bytes>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
    });
    // A tower layer outside the signer boxes its errors again: still found.
    let service = ServiceBuilder::new()
        .layer(TerminalRetryLayer::default())
        .timeout(Duration::from_secs(30))
        .layer(SignLayer::new([key(OLD)]).unwrap())
        .service(inner);
    let start = tokio::time::Instant::now();
    let unsigned = Request::post("/").body(Full::from("{}")).unwrap();
    let error = service.oneshot(unsigned).await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<SignError>(),
        Some(&SignError::MissingId)
    );
    assert_eq!(start.elapsed(), Duration::ZERO, "no retry was scheduled");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let refused: Result<Response<()>, BoxError> = Err(SignError::MissingId.into());
    assert_eq!(DefaultClassifier.classify(&refused), Outcome::Permanent);
    let other: Result<Response<()>, BoxError> = Err("connection reset".into());
    assert_eq!(DefaultClassifier.classify(&other), Outcome::Transient);
}

#[tokio::test(start_paused = true)]
async fn each_attempt_of_the_retry_layer_is_signed_with_its_own_time() {
    // The signer's and the receiver's clocks follow tokio's, paused: the
    // schedule's 400 s waits are longer than the 5 minutes of tolerance.
    let start = tokio::time::Instant::now();
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let clock = move || base + start.elapsed();
    let attempts = Arc::new(Mutex::new(Vec::<(String, StatusCode)>::new()));
    let application = {
        let attempts = attempts.clone();
        service_fn(move |request: Request<Full<Bytes>>| {
            let mut attempts = attempts.lock().unwrap();
            let timestamp = request.headers()["webhook-timestamp"].to_str().unwrap();
            // 503 twice, then 204.
            let status = match attempts.len() {
                0 | 1 => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::NO_CONTENT,
            };
            attempts.push((timestamp.to_owned(), status));
            let response = Response::builder()
                .status(status)
                .body(Full::<Bytes>::default());
            async move { Ok::<_, Infallible>(response.unwrap()) }
        })
    };
    let receiver = VerifyLayer::new([key(OLD)])
        .unwrap()
        .clock(clock)
        .layer(application);
    let sender = ServiceBuilder::new()
        .layer(TerminalRetryLayer::new(
            TerminalRetryPolicy::default().with_schedule(schedule(&[400, 400])),
        ))
        .layer(SignLayer::new([key(OLD)]).unwrap().clock(clock))
        .service(receiver);

    let response = sender
        .oneshot(event("/hooks/orders", "evt_retry", "{}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let attempts = attempts.lock().unwrap().clone();
    let first = 1_700_000_000u64;
    let expected: Vec<(String, StatusCode)> = [
        (first, StatusCode::SERVICE_UNAVAILABLE),
        (first + 400, StatusCode::SERVICE_UNAVAILABLE),
        (first + 800, StatusCode::NO_CONTENT),
    ]
    .into_iter()
    .map(|(at, status)| (at.to_string(), status))
    .collect();
    assert_eq!(
        attempts, expected,
        "every attempt verified, each at its own time"
    );
}

/// A request signed now by `keys` with the id `id`, as it would go out.
async fn signed(keys: &[&str], id: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let keys: Vec<Key> = keys.iter().map(|text| key(text)).collect();
    let capture =
        service_fn(|request: Request<Full<Bytes>>| async { Ok::<_, Infallible>(request) });
    SignLayer::new(keys)
        .unwrap()
        .layer(capture)
        .oneshot(event("/hooks/orders", id, body))
        .await
        .unwrap()
}

/// What a `VerifyLayer` with `keys` answers to `request`, and how many
/// requests reached the application behind it.
async fn verified<B>(keys: &[&str], request: Request<B>) -> (Response<Full<Bytes>>, usize)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let application = Application::default();
    let keys: Vec<Key> = keys.iter().map(|text| key(text)).collect();
    let receiver = VerifyLayer::new(keys)
        .unwrap()
        .body_limit(1024)
        .layer(application.service());
    let response = receiver.oneshot(request).await.unwrap();
    (response, application.seen().len())
}

/// `request` with the header `name` set to `value`, or removed for `None`.
fn with_header(
    mut request: Request<Full<Bytes>>,
    name: &'static str,
    value: Option<String>,
) -> Request<Full<Bytes>> {
    match value {
        Some(value) => {
            let value = HeaderValue::from_str(&value).unwrap();
            request.headers_mut().insert(name, value);
        }
        None => {
            request.headers_mut().remove(name);
        }
    }
    request
}

#[tokio::test]
async fn every_refusal_is_a_401_with_a_short_reason_and_never_reaches_the_application() {
    let good = signed(&[OLD], "evt_1", "{}").await;
    let header = |name: &str| good.headers()[name].to_str().unwrap().to_owned();
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let tag = signature.strip_prefix("v1,").unwrap().to_owned();
    let now = unix_now();
    let copy = || {
        let mut request = Request::post("/hooks/orders")
            .body(Full::from("{}"))
            .unwrap();
        *request.headers_mut() = good.headers().clone();
        request
    };
    // Signed by the right key, over another body, id or timestamp.
    let other_body = signed(&[OLD], "evt_1", r#"{"x":1}"#).await;
    let other_id = signed(&[OLD], "evt_2", "{}").await;
    let other_body_signature = other_body.headers()["webhook-signature"].clone();
    // A well-formed v1a signature, to a receiver with an HMAC key only.
    let (ed25519, _) = ed25519_pair(42);
    let by_ed25519 = signed(&[&ed25519], "evt_1", "{}").await;
    let v1a_signature = by_ed25519.headers()["webhook-signature"].clone();
    let other_id_signature = other_id.headers()["webhook-signature"].clone();
    let mut repeated = copy();
    repeated.headers_mut().append(
        "webhook-signature",
        HeaderValue::from_str(&signature).unwrap(),
    );
    let thousand = vec![signature.as_str(); 1000].join(" ");

    let cases: Vec<(&str, Request<Full<Bytes>>, &str)> = vec![
        (
            "stale",
            with_header(copy(), "webhook-timestamp", Some((now - 301).to_string())),
            "webhook-timestamp too old",
        ),
        (
            "a week old",
            with_header(
                copy(),
                "webhook-timestamp",
                Some((now - 7 * 86_400).to_string()),
            ),
            "webhook-timestamp too old",
        ),
        (
            // A minute past the tolerance: the verifier reads the clock after
            // this test, and a second may have passed (the exact bound is a
            // unit test of the check).
            "future",
            with_header(copy(), "webhook-timestamp", Some((now + 360).to_string())),
            "webhook-timestamp too new",
        ),
        (
            "no id",
            with_header(copy(), "webhook-id", None),
            "missing webhook-id header",
        ),
        (
            "no timestamp",
            with_header(copy(), "webhook-timestamp", None),
            "missing webhook-timestamp header",
        ),
        (
            "no signature",
            with_header(copy(), "webhook-signature", None),
            "missing webhook-signature header",
        ),
        (
            "another body",
            with_header(
                copy(),
                "webhook-signature",
                Some(other_body_signature.to_str().unwrap().to_owned()),
            ),
            "no matching signature",
        ),
        (
            "another id",
            with_header(
                copy(),
                "webhook-signature",
                Some(other_id_signature.to_str().unwrap().to_owned()),
            ),
            "no matching signature",
        ),
        (
            // The signature of `evt_1` at `timestamp`, sent with another id
            // and with another timestamp.
            "its id changed",
            with_header(copy(), "webhook-id", Some("evt_2".into())),
            "no matching signature",
        ),
        (
            "its timestamp changed",
            with_header(
                copy(),
                "webhook-timestamp",
                Some((timestamp.parse::<u64>().unwrap() - 1).to_string()),
            ),
            "no matching signature",
        ),
        (
            "a bare v1,",
            with_header(copy(), "webhook-signature", Some("v1,".into())),
            "no signature of a known version",
        ),
        (
            "an unknown version",
            with_header(copy(), "webhook-signature", Some(format!("v2,{tag}"))),
            "no signature of a known version",
        ),
        (
            "v1a for an HMAC key",
            with_header(
                copy(),
                "webhook-signature",
                Some(v1a_signature.to_str().unwrap().to_owned()),
            ),
            "no matching signature",
        ),
        (
            "v1a of the wrong length",
            with_header(copy(), "webhook-signature", Some(format!("v1a,{tag}"))),
            "no signature of a known version",
        ),
        (
            "no comma",
            with_header(copy(), "webhook-signature", Some(format!("v1{tag}"))),
            "no signature of a known version",
        ),
        (
            "not base64",
            with_header(
                copy(),
                "webhook-signature",
                Some(format!("v1,{}", "*".repeat(44))),
            ),
            "no signature of a known version",
        ),
        (
            "spaces only",
            with_header(copy(), "webhook-signature", Some("   ".into())),
            "no signature of a known version",
        ),
        (
            "an id with a dot",
            with_header(copy(), "webhook-id", Some(format!("{id}.1"))),
            "invalid webhook-id",
        ),
        (
            "a timestamp in milliseconds' decimals",
            with_header(copy(), "webhook-timestamp", Some(format!("{timestamp}.5"))),
            "invalid webhook-timestamp",
        ),
        (
            "two signature headers",
            repeated,
            "more than one webhook-signature header",
        ),
        (
            "a list of 1,000 entries",
            with_header(copy(), "webhook-signature", Some(thousand)),
            "too many signatures",
        ),
    ];
    for (case, request, reason) in cases {
        let (response, reached) = verified(&[OLD], request).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        let challenge = response.headers()["www-authenticate"].to_str().unwrap();
        assert_eq!(
            challenge,
            format!(r#"webhook-signature error="{reason}""#),
            "{case}"
        );
        assert!(!challenge.contains(&tag[..8]), "{case}");
        assert!(!challenge.contains(&OLD[6..14]), "{case}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "{case}");
        assert_eq!(reached, 0, "{case}");
    }
    // The same request untouched goes through.
    let (response, reached) = verified(&[OLD], copy()).await;
    assert_eq!((response.status(), reached), (StatusCode::NO_CONTENT, 1));
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_whether_announced_or_streamed() {
    // Signed over 2 KiB, against a limit of 1 KiB.
    let big = Bytes::from("x".repeat(2048));
    let announced = signed(&[OLD], "evt_big", big.clone()).await;
    let (response, reached) = verified(&[OLD], announced).await;
    assert_eq!(
        (response.status(), reached),
        (StatusCode::PAYLOAD_TOO_LARGE, 0)
    );

    // A stream that does not say its length: read up to the limit, then
    // refused.
    let streamed = signed(&[OLD], "evt_big", big.clone()).await;
    let (parts, _) = streamed.into_parts();
    let body = Chunks {
        left: 16,
        chunk: big.slice(..128),
    };
    let (response, reached) = verified(&[OLD], Request::from_parts(parts, body)).await;
    assert_eq!(
        (response.status(), reached),
        (StatusCode::PAYLOAD_TOO_LARGE, 0)
    );
    assert!(response.headers().get("www-authenticate").is_none());
}

/// A body of `left` chunks that does not say its length.
struct Chunks {
    left: usize,
    chunk: Bytes,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
}

#[tokio::test]
async fn rotation_one_signature_per_key_and_any_key_of_the_receiver_verifies() {
    let request = signed(&[OLD, NEW], "evt_rotated", NON_ASCII).await;
    let signatures = request.headers()["webhook-signature"].to_str().unwrap();
    assert_eq!(signatures.split(' ').count(), 2);
    assert!(signatures.split(' ').all(|entry| entry.starts_with("v1,")));
    let headers = request.headers().clone();
    let again = |headers: &HeaderMap| {
        let mut request = Request::post("/")
            .body(Full::<Bytes>::from(NON_ASCII))
            .unwrap();
        *request.headers_mut() = headers.clone();
        request
    };
    for receiver_keys in [&[OLD][..], &[NEW], &[OTHER, NEW]] {
        let (response, reached) = verified(receiver_keys, again(&headers)).await;
        assert_eq!((response.status(), reached), (StatusCode::NO_CONTENT, 1));
    }
    let (response, reached) = verified(&[OTHER], again(&headers)).await;
    assert_eq!((response.status(), reached), (StatusCode::UNAUTHORIZED, 0));
}

#[tokio::test]
async fn v1a_signed_by_whsk_verifies_with_whpk_or_whsk_and_no_other_key() {
    let (signing, public) = ed25519_pair(42);
    let request = signed(&[&signing, OLD], "evt_ed", NON_ASCII).await;
    let signatures = request.headers()["webhook-signature"].to_str().unwrap();
    assert!(signatures.starts_with("v1a,"), "{signatures}");
    let headers = request.headers().clone();
    let again = || {
        let mut request = Request::post("/")
            .body(Full::<Bytes>::from(NON_ASCII))
            .unwrap();
        *request.headers_mut() = headers.clone();
        request
    };
    for receiver_keys in [&[public.as_str()][..], &[&signing], &[OTHER, &public]] {
        let (response, reached) = verified(receiver_keys, again()).await;
        assert_eq!((response.status(), reached), (StatusCode::NO_CONTENT, 1));
    }
    // Checked by another public key alone.
    let (_, stranger) = ed25519_pair(7);
    let (response, reached) = verified(&[&stranger], again()).await;
    assert_eq!((response.status(), reached), (StatusCode::UNAUTHORIZED, 0));
}

/// Seconds added to the system's clock, shared by a sender and a receiver:
/// a test moves both hours on at once.
#[derive(Clone)]
struct TestClock {
    base: SystemTime,
    offset: Arc<AtomicU64>,
}

impl TestClock {
    fn new() -> TestClock {
        TestClock {
            base: SystemTime::now(),
            offset: Arc::default(),
        }
    }

    fn now(&self) -> impl Fn() -> SystemTime + Send + Sync + 'static {
        let clock = self.clone();
        move || clock.base + Duration::from_secs(clock.offset.load(Ordering::SeqCst))
    }

    fn advance(&self, by: Duration) {
        self.offset.fetch_add(by.as_secs(), Ordering::SeqCst);
    }

    fn unix(&self) -> u64 {
        (self.now())()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }
}

/// An attempt as the receiver saw it: its headers, and what it answered.
#[derive(Debug, Clone)]
struct Attempt {
    id: String,
    timestamp: u64,
    status: StatusCode,
    headers: HeaderMap,
}

#[tokio::test]
async fn an_outbox_replay_hours_after_the_event_is_signed_afresh_with_the_same_id() {
    let scratch = Scratch::new("webhooks-replay");
    let clock = TestClock::new();
    let up = Arc::new(AtomicBool::new(false));
    // The receiver: down (503) while `up` is false, each answer ten minutes
    // after the last, as a long retry schedule would have it; the verifying
    // layer in front, on the same clock, refuses any stale signature.
    let application = {
        let (clock, up) = (clock.clone(), up.clone());
        service_fn(move |_: Request<Full<Bytes>>| {
            let status = match up.load(Ordering::SeqCst) {
                true => StatusCode::NO_CONTENT,
                false => {
                    clock.advance(Duration::from_secs(600));
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            let response = Response::builder()
                .status(status)
                .body(Full::<Bytes>::default());
            async move { Ok::<_, Infallible>(response.unwrap()) }
        })
    };
    let verifying = VerifyLayer::new([key(NEW)])
        .unwrap()
        .clock(clock.now())
        .layer(application);
    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let receiver = {
        let attempts = attempts.clone();
        service_fn(move |request: Request<Incoming>| {
            let (verifying, attempts) = (verifying.clone(), attempts.clone());
            async move {
                let headers = request.headers().clone();
                let response = verifying.oneshot(request).await?;
                let text = |name: &str| headers[name].to_str().unwrap().to_owned();
                attempts.lock().unwrap().push(Attempt {
                    id: text("webhook-id"),
                    timestamp: text("webhook-timestamp").parse().unwrap(),
                    status: response.status(),
                    headers,
                });
                Ok::<_, Infallible>(response)
            }
        })
    };
    let url = format!("http://{}/hooks/orders", serve(receiver).await);
    let sender = |outbox: Outbox| {
        let signing = SignLayer::new([key(NEW)]).unwrap().clock(clock.now());
        Dispatcher::builder(outbox, signing.layer(client()))
            .layer(TerminalRetryLayer::new(
                TerminalRetryPolicy::default()
                    .with_schedule(Schedule::new([Duration::from_millis(10); 2]).unwrap()),
            ))
            .replay(Replay {
                interval: Duration::from_secs(3600),
                ..Replay::default()
            })
            .build()
            .unwrap()
    };

    // The event, stored and tried three times while the receiver is down.
    let first = clock.unix();
    let dispatcher = sender(Outbox::open(scratch.file()).unwrap());
    let body = Bytes::from_static(NON_ASCII.as_bytes());
    let stored = Request::post(&url).body(body.clone()).unwrap();
    assert_eq!(
        dispatcher.send("order-42-paid", stored).await,
        Delivery::Queued
    );
    let pending = dispatcher.outbox().unwrap().pending().unwrap();
    assert_eq!(pending.len(), 1);
    let key_stored = pending[0].idempotency_key.clone();
    drop(dispatcher);

    // Hours later, a new sender on the same file; the receiver is back.
    clock.advance(Duration::from_secs(3 * 3600));
    up.store(true, Ordering::SeqCst);
    let mut reopened = None;
    for _ in 0..250 {
        match Outbox::open(scratch.file()) {
            Ok(outbox) => {
                reopened = Some(outbox);
                break;
            }
            Err(error) if error.kind() == tower_terminal_retry::outbox::OutboxErrorKind::Locked => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(error) => panic!("{error}"),
        }
    }
    let dispatcher = sender(reopened.expect("the first sender let go of the file"));
    let drained = wait_every(Duration::from_millis(20), Duration::from_secs(10), || {
        dispatcher.outbox().unwrap().pending().unwrap().is_empty()
    })
    .await;
    assert!(drained, "the replay delivered the event");
    let replayed_at = clock.unix();

    let attempts = attempts.lock().unwrap().clone();
    let (before, after) = attempts.split_at(attempts.len() - 1);
    assert!(
        before.len() >= 3,
        "three attempts before the restart: {attempts:?}"
    );
    // Every attempt verified (a 503 comes from behind the verifying layer),
    // each signed at its own time, ten minutes apart: twice the tolerance.
    for (n, attempt) in before.iter().enumerate() {
        assert_eq!(
            attempt.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{attempt:?}"
        );
        assert_eq!(attempt.timestamp, first + 600 * n as u64, "{attempt:?}");
    }
    // The replay, hours after the event: a fresh timestamp, verified.
    assert_eq!(after[0].status, StatusCode::NO_CONTENT);
    assert_eq!(after[0].timestamp, replayed_at);
    assert!(after[0].timestamp >= first + 3 * 3600);
    // One id on every attempt and after the restart: the outbox's key.
    assert!(
        attempts.iter().all(|attempt| attempt.id == key_stored),
        "{attempts:?}"
    );

    // The receiver does refuse what is stale: the first attempt, sent again
    // as it was, now.
    let mut stale = Request::post(&url).body(Full::new(body)).unwrap();
    *stale.headers_mut() = before[0].headers.clone();
    let response = client().oneshot(stale).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"webhook-signature error="webhook-timestamp too old""#
    );
}

/// The interpreter of a virtualenv with the reference library: the one
/// `STANDARDWEBHOOKS_PYTHON` names, or the one `.ci/run` makes. `None`
/// (after one line saying so) when there is none; under CI (`CI=true`) that
/// fails the test instead.
fn reference_python() -> Option<PathBuf> {
    let named = std::env::var_os("STANDARDWEBHOOKS_PYTHON").map(PathBuf::from);
    let made =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/standardwebhooks-venv/bin/python");
    let python = named.or_else(|| made.exists().then_some(made));
    if python.is_none() {
        let under_ci = std::env::var("CI").is_ok_and(|value| value == "true");
        assert!(
            !under_ci,
            "no Python with standardwebhooks: set STANDARDWEBHOOKS_PYTHON (.ci/run makes one)"
        );
        println!("skipped: no Python with standardwebhooks (set STANDARDWEBHOOKS_PYTHON)");
    }
    python
}

/// Signs `body` with `keys` and sends it to the reference library's server
/// at `url`: its status, and the indices of the secrets that verified it.
async fn sign_and_send(url: &str, keys: &[&str], body: &'static str) -> (StatusCode, Vec<u64>) {
    let keys: Vec<Key> = keys.iter().map(|text| key(text)).collect();
    let sender = SignLayer::new(keys).unwrap().layer(client());
    let response = sender.oneshot(event(url, "evt_py", body)).await.unwrap();
    let status = response.status();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    let verified_by = answer["verified_by"].as_array().expect("a list").iter();
    (
        status,
        verified_by.map(|index| index.as_u64().unwrap()).collect(),
    )
}

fn interop_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/webhooks_interop.py")
}

#[tokio::test]
async fn the_reference_python_library_verifies_what_sign_layer_sends() {
    let Some(python) = reference_python() else {
        return;
    };
    // The reference library's server, knowing the old, the new and an
    // unrelated secret, each tried on its own.
    let mut server = tokio::process::Command::new(&python)
        .arg(interop_script())
        .args(["serve", OLD, NEW, OTHER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the reference Python starts");
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let port = lines.next_line().await.unwrap().expect("its port");
    let url = format!("http://127.0.0.1:{port}/hooks/orders");

    // Non-ASCII text, signed with one key, then with two (rotation): each
    // signature verifies with its own secret, none with the unrelated one.
    let verified_by = |keys, body| sign_and_send(&url, keys, body);
    assert_eq!(
        verified_by(&[OLD], NON_ASCII).await,
        (StatusCode::OK, vec![0])
    );
    assert_eq!(
        verified_by(&[OLD, NEW], NON_ASCII).await,
        (StatusCode::OK, vec![0, 1])
    );
    assert_eq!(
        verified_by(&[NEW], r#"{"plain":"ascii"}"#).await,
        (StatusCode::OK, vec![1])
    );
    // And the library does refuse: a key it does not know.
    let stranger = "whsec_c29tZW9uZSBlbHNlJ3Mgc2VjcmV0LCAzMiBieXRlcw==";
    assert_eq!(
        verified_by(&[stranger], NON_ASCII).await,
        (StatusCode::UNAUTHORIZED, vec![])
    );
    drop(server.stdin.take());
    server.wait().await.unwrap();
}

#[tokio::test]
async fn verify_layer_verifies_what_the_reference_python_library_sends() {
    let Some(python) = reference_python() else {
        return;
    };
    let application = Application::default();
    let receiver = VerifyLayer::new([key(NEW)])
        .unwrap()
        .layer(application.service());
    let url = format!("http://{}/hooks/orders", serve(receiver).await);
    let send = |secrets: &'static [&'static str], id: &'static str| {
        let (python, url) = (python.clone(), url.clone());
        async move {
            let mut sender = tokio::process::Command::new(python)
                .arg(interop_script())
                .args(["send", &url, id])
                .args(secrets)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("the reference Python starts");
            let mut stdin = sender.stdin.take().unwrap();
            stdin.write_all(NON_ASCII.as_bytes()).await.unwrap();
            drop(stdin);
            let mut status = String::new();
            sender
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut status)
                .await
                .unwrap();
            assert!(sender.wait().await.unwrap().success());
            status.trim().to_owned()
        }
    };
    // The new secret alone, then a rotation header (old and new) checked by
    // a receiver that knows only the new one; an unrelated key is refused.
    assert_eq!(send(&[NEW], "msg_one").await, "204");
    assert_eq!(send(&[OLD, NEW], "msg_two").await, "204");
    assert_eq!(send(&[OLD, OTHER], "msg_three").await, "401");
    let seen = application.seen();
    let ids: Vec<&str> = seen.iter().map(|seen| seen.id.as_str()).collect();
    assert_eq!(ids, ["msg_one", "msg_two"]);
    assert!(seen.iter().all(|seen| seen.body == NON_ASCII.as_bytes()));
}
