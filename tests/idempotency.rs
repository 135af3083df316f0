//! The idempotency layer's behaviours, over the memory store, against
//! handlers in memory and on tokio's paused clock: first requests, replays,
//! conflicts, mismatches, bad keys, what is kept and what frees a key,
//! cancellation, the store's bounds, and a store that fails. The layer on
//! PostgreSQL is in `idempotency_postgres.rs`, the end-to-end proof over a
//! network in `exactly_once.rs`.

#![cfg(feature = "idempotency")]

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt};
use tower_terminal_retry::{
    idempotency::{
        Begin, Claim, Fingerprint, IdempotencyLayer, KeptResponse, MemoryStore, Store, StoreError,
        StoreFuture,
    },
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

type Body = Full<Bytes>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// What a handler answers to its n-th call.
type Answer<B> = dyn Fn(usize) -> BoxFuture<Result<Response<B>, Failed>> + Send + Sync;

const KEY: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

/// The inner service's error.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failed;

/// A handler that counts its calls and answers with `answer(call number)`.
struct Handler<B = Body> {
    calls: Arc<AtomicUsize>,
    answer: Arc<Answer<B>>,
}

impl<B> Clone for Handler<B> {
    fn clone(&self) -> Self {
        Handler {
            calls: self.calls.clone(),
            answer: self.answer.clone(),
        }
    }
}

impl<B> Handler<B> {
    fn new<F, Fut>(answer: F) -> Self
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<B>, Failed>> + Send + 'static,
    {
        Handler {
            calls: Arc::default(),
            answer: Arc::new(move |call| Box::pin(answer(call))),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<B> Service<Request<Body>> for Handler<B> {
    type Response = Response<B>;
    type Error = Failed;
    type Future = BoxFuture<Result<Response<B>, Failed>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        (self.answer)(call)
    }
}

/// A handler answering `status` with a body naming the call.
fn answering(status: u16) -> Handler {
    Handler::new(move |call| async move {
        Ok(Response::builder()
            .status(status)
            .body(Body::from(format!("call {call}")))
            .unwrap())
    })
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::new())
}

fn post(key: &str, path: &str, body: &'static str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

fn order() -> Request<Body> {
    post(KEY, "/orders", r#"{"amount":42}"#)
}

/// Sends `request` through `service` (a clone of it).
async fn send<S, B>(service: &S, request: Request<Body>) -> Response<B>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Failed> + Clone,
{
    service.clone().oneshot(request).await.expect("a response")
}

/// Sends `request` through a clone of `service` on a task of its own.
fn spawn_send<S>(service: &S, request: Request<Body>) -> tokio::task::JoinHandle<Response<Body>>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Failed> + Clone + Send + 'static,
    S::Future: Send,
{
    let service = service.clone();
    tokio::spawn(async move { service.oneshot(request).await.expect("a response") })
}

async fn body<B>(response: Response<B>) -> Bytes
where
    B: HttpBody,
    B::Error: std::fmt::Debug,
{
    response.into_body().collect().await.unwrap().to_bytes()
}

fn replayed<B>(response: &Response<B>) -> bool {
    match response.headers().get("idempotent-replayed") {
        Some(value) => {
            assert_eq!(value, "true");
            true
        }
        None => false,
    }
}

#[tokio::test]
async fn a_first_request_runs_once_and_its_repeats_get_its_response_byte_for_byte() {
    let handler = Handler::new(|call| async move {
        Ok(Response::builder()
            .status(201)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::LOCATION, "/orders/7")
            .header(header::SET_COOKIE, "session=s3cret")
            .header("x-request-id", "r-1")
            .body(Body::from(format!(r#"{{"order":7,"call":{call}}}"#)))
            .unwrap())
    });
    let service = layer().layer(handler.clone());

    let first = send(&service, order()).await;
    assert!(!replayed(&first));
    assert_eq!(first.status(), StatusCode::CREATED);
    // The first response goes out as the handler made it, every header.
    assert_eq!(first.headers()[header::SET_COOKIE], "session=s3cret");
    assert_eq!(first.headers()["x-request-id"], "r-1");
    let first_body = body(first).await;
    assert_eq!(first_body, r#"{"order":7,"call":1}"#);

    for _ in 0..3 {
        let repeat = send(&service, order()).await;
        assert!(replayed(&repeat));
        assert_eq!(repeat.status(), StatusCode::CREATED);
        assert_eq!(repeat.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(repeat.headers()[header::LOCATION], "/orders/7");
        // Kept: the headers that describe the content, nothing else.
        assert!(repeat.headers().get(header::SET_COOKIE).is_none());
        assert!(repeat.headers().get("x-request-id").is_none());
        assert_eq!(body(repeat).await, first_body);
    }
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn final_responses_are_kept_and_transient_ones_free_the_key() {
    for status in [200, 204, 302, 400, 404, 409, 410, 422] {
        let handler = answering(status);
        let service = layer().layer(handler.clone());
        assert!(!replayed(&send(&service, order()).await));
        let repeat = send(&service, order()).await;
        assert!(replayed(&repeat), "{status} is kept");
        assert_eq!(repeat.status().as_u16(), status);
        assert_eq!(body(repeat).await, "call 1", "{status}");
        assert_eq!(handler.calls(), 1, "{status}");
    }
    for status in [500, 502, 503, 504, 408, 429] {
        let handler = answering(status);
        let service = layer().layer(handler.clone());
        let first = send(&service, order()).await;
        assert_eq!(first.status().as_u16(), status);
        let repeat = send(&service, order()).await;
        assert!(!replayed(&repeat), "{status} is not kept");
        assert_eq!(body(repeat).await, "call 2", "{status} runs again");
        assert_eq!(handler.calls(), 2, "{status}");
    }
}

#[tokio::test]
async fn an_error_of_the_inner_service_frees_the_key() {
    let handler = Handler::new(|call| async move {
        match call {
            1 => Err(Failed),
            _ => Ok(Response::new(Body::from("taken"))),
        }
    });
    let service = layer().layer(handler.clone());
    let error = service.clone().oneshot(order()).await.unwrap_err();
    assert_eq!(error, Failed, "the inner service's error, unchanged");
    let retry = send(&service, order()).await;
    assert!(!replayed(&retry));
    assert_eq!(body(retry).await, "taken");
    assert_eq!(handler.calls(), 2);
}

/// A handler whose first call waits for `release`, after saying on
/// `started` that it runs.
fn held_first(started: Arc<Notify>, release: Arc<Notify>) -> Handler {
    Handler::new(move |call| {
        let (started, release) = (started.clone(), release.clone());
        async move {
            if call == 1 {
                started.notify_one();
                release.notified().await;
            }
            Ok(Response::builder()
                .status(201)
                .body(Body::from(format!("call {call}")))
                .unwrap())
        }
    })
}

#[tokio::test]
async fn a_repeat_while_the_first_runs_gets_409_with_retry_after_and_the_handler_is_not_called() {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = held_first(started.clone(), release.clone());
    let service = layer().layer(handler.clone());
    let first = spawn_send(&service, order());
    started.notified().await;

    let repeat = send(&service, order()).await;
    assert_eq!(repeat.status(), StatusCode::CONFLICT);
    assert_eq!(repeat.headers()[header::RETRY_AFTER], "1");
    assert!(!replayed(&repeat));
    assert!(String::from_utf8(body(repeat).await.to_vec())
        .unwrap()
        .contains("still running"));
    assert_eq!(handler.calls(), 1);

    release.notify_one();
    assert_eq!(body(first.await.unwrap()).await, "call 1");
    let after = send(&service, order()).await;
    assert!(replayed(&after));
    assert_eq!(body(after).await, "call 1");
    assert_eq!(handler.calls(), 1);
}

/// The two halves together: the crate's retry layer in front of a receiver
/// whose first request is still running waits out its 409's `Retry-After`,
/// asks again, and gets the kept response.
#[tokio::test(start_paused = true)]
async fn the_crates_retry_layer_waits_out_the_409_and_gets_the_kept_response() {
    let handler = Handler::new(|call| async move {
        if call == 1 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        Ok(Response::builder()
            .status(201)
            .body(Body::from(format!("call {call}")))
            .unwrap())
    });
    let receiver = layer().layer(handler.clone());
    let first = spawn_send(&receiver, order());
    tokio::task::yield_now().await;

    let schedule = Schedule::new([Duration::from_secs(30); 3]).unwrap();
    let sender = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_schedule(schedule))
        .layer(receiver.clone());
    let start = tokio::time::Instant::now();
    let repeat = sender.oneshot(order()).await.unwrap();
    // 409 at 0 s and at 1 s (still running), the kept response at 2 s: the
    // server's delay, not the schedule's 30 s.
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert!(replayed(&repeat));
    assert_eq!(repeat.status(), StatusCode::CREATED);
    assert_eq!(body(repeat).await, "call 1");
    assert_eq!(body(first.await.unwrap()).await, "call 1");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn the_same_key_with_another_request_gets_422_and_changes_nothing() {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = held_first(started.clone(), release.clone());
    let service = layer().layer(handler.clone());
    let others = || {
        [
            post(KEY, "/orders", r#"{"amount":43}"#),
            post(KEY, "/refunds", r#"{"amount":42}"#),
            post(KEY, "/orders?dry-run=1", r#"{"amount":42}"#),
            Request::put("/orders")
                .header("idempotency-key", KEY)
                .body(Body::from(r#"{"amount":42}"#))
                .unwrap(),
        ]
    };
    let first = spawn_send(&service, order());
    started.notified().await;
    // While the first runs, and after it finished.
    for other in others() {
        let response = send(&service, other).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    release.notify_one();
    first.await.unwrap();
    for other in others() {
        let response = send(&service, other).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(!replayed(&response));
    }
    let repeat = send(&service, order()).await;
    assert!(replayed(&repeat));
    assert_eq!(body(repeat).await, "call 1");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_bad_key_gets_400_and_the_handler_is_not_called() {
    let handler = answering(200);
    let service = layer().layer(handler.clone());
    let mut bad: Vec<Request<Body>> = ["", "a b", "tab\tkey", &"k".repeat(256)]
        .into_iter()
        .map(|key| post(key, "/orders", "{}"))
        .collect();
    for bytes in [&b"caf\xc3\xa9"[..], b"\xff"] {
        let mut request = post("placeholder", "/orders", "{}");
        let value = HeaderValue::from_bytes(bytes).unwrap();
        request.headers_mut().insert("idempotency-key", value);
        bad.push(request);
    }
    let mut twice = post("one", "/orders", "{}");
    twice
        .headers_mut()
        .append("idempotency-key", HeaderValue::from_static("two"));
    bad.push(twice);
    for request in bad {
        let response = send(&service, request).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert!(!body(response).await.is_empty(), "a reason");
    }
    assert_eq!(handler.calls(), 0);
    // The longest key taken.
    let longest = send(&service, post(&"k".repeat(255), "/orders", "{}")).await;
    assert_eq!(longest.status(), StatusCode::OK);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn without_a_key_a_request_passes_through_unless_a_key_is_required() {
    let handler = answering(201);
    let service = layer().layer(handler.clone());
    let unkeyed = || Request::post("/orders").body(Body::from("{}")).unwrap();
    for call in 1..=2 {
        let response = send(&service, unkeyed()).await;
        assert!(!replayed(&response));
        assert_eq!(body(response).await, format!("call {call}"));
    }

    let strict = layer().require_key(true).layer(handler.clone());
    let refused = send(&strict, unkeyed()).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(handler.calls(), 2);
    let keyed = send(&strict, order()).await;
    assert_eq!(keyed.status(), StatusCode::CREATED);
    assert_eq!(handler.calls(), 3);
}

#[tokio::test]
async fn a_body_over_max_body_goes_out_whole_and_its_repeat_gets_409_never_a_part() {
    let handler = Handler::new(|call| async move {
        let body = match call {
            1 => "123456789",
            _ => "ran twice",
        };
        Ok(Response::new(Body::from(body)))
    });
    let service = layer().max_body(8).layer(handler.clone());
    assert_eq!(body(send(&service, order()).await).await, "123456789");
    let repeat = send(&service, order()).await;
    assert_eq!(repeat.status(), StatusCode::CONFLICT);
    assert!(repeat.headers().get(header::RETRY_AFTER).is_none());
    assert!(String::from_utf8(body(repeat).await.to_vec())
        .unwrap()
        .contains("too large to keep"));
    assert_eq!(handler.calls(), 1);

    // At the limit: kept.
    let handler = answering(200);
    let service = layer().max_body(6).layer(handler.clone());
    send(&service, order()).await;
    assert!(replayed(&send(&service, order()).await));
}

/// A streaming body: its length is not known in advance. The second of
/// `chunks` set to `None` fails.
struct Stream(VecDeque<Option<Bytes>>);

impl From<Bytes> for Stream {
    fn from(bytes: Bytes) -> Self {
        Stream(VecDeque::from([Some(bytes)]))
    }
}

impl HttpBody for Stream {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
        Poll::Ready(match self.0.pop_front() {
            Some(Some(chunk)) => Some(Ok(Frame::data(chunk))),
            Some(None) => Some(Err("the stream broke")),
            None => None,
        })
    }
}

fn stream(chunks: impl IntoIterator<Item = Option<&'static str>>) -> Stream {
    Stream(
        chunks
            .into_iter()
            .map(|chunk| chunk.map(|text| Bytes::from_static(text.as_bytes())))
            .collect(),
    )
}

#[tokio::test]
async fn a_body_of_unknown_length_goes_out_unread_and_is_not_kept() {
    let handler = Handler::new(|_| async {
        Ok(Response::new(stream([
            Some("chunk one, "),
            Some("chunk two"),
        ])))
    });
    let service = layer().layer(handler.clone());
    let first = send(&service, order()).await;
    assert_eq!(body(first).await, "chunk one, chunk two");
    let repeat = send(&service, order()).await;
    assert_eq!(repeat.status(), StatusCode::CONFLICT);
    assert_eq!(handler.calls(), 1);
}

/// A body of known length that breaks while it is read.
struct Sized(Stream, u64);

impl From<Bytes> for Sized {
    fn from(bytes: Bytes) -> Self {
        let len = bytes.len() as u64;
        Sized(Stream::from(bytes), len)
    }
}

impl HttpBody for Sized {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.1)
    }
}

#[tokio::test]
async fn a_body_that_fails_while_read_answers_500_and_frees_the_key() {
    let handler = Handler::new(|call| async move {
        let chunks = match call {
            1 => stream([Some("half"), None]),
            _ => stream([Some("whole"), Some(" body")]),
        };
        Ok(Response::new(Sized(chunks, 10)))
    });
    let service = layer().layer(handler.clone());
    let broken = send(&service, order()).await;
    assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&service, order()).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(body(retry).await, "whole body");
    assert!(replayed(&send(&service, order()).await));
    assert_eq!(handler.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_key_is_kept_for_its_retention_then_runs_again() {
    let handler = answering(200);
    let service = layer()
        .retention(Duration::from_secs(60))
        .unwrap()
        .layer(handler.clone());
    send(&service, order()).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(replayed(&send(&service, order()).await));
    tokio::time::advance(Duration::from_secs(1)).await;
    let after = send(&service, order()).await;
    assert!(!replayed(&after));
    assert_eq!(body(after).await, "call 2");
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_mid_handler_frees_its_key() {
    let handler = Handler::new(|call| async move {
        if call == 1 {
            std::future::pending::<()>().await;
        }
        Ok(Response::new(Body::from(format!("call {call}"))))
    });
    let store = MemoryStore::new();
    let service = IdempotencyLayer::new(store.clone()).layer(handler.clone());
    // The client goes away while the handler runs: the future is dropped.
    let abandoned = tokio::time::timeout(Duration::from_secs(1), send(&service, order())).await;
    assert!(abandoned.is_err());
    assert_eq!(handler.calls(), 1);
    assert!(store.is_empty(), "the key is freed");

    let retry = send(&service, order()).await;
    assert!(!replayed(&retry));
    assert_eq!(body(retry).await, "call 2");
}

/// The memory store, answering each operation after `delay`: a store over
/// a network, whose operation, once sent (on its first poll), is done
/// whether or not its answer is awaited.
#[derive(Debug, Clone)]
struct Slow {
    inner: MemoryStore,
    delay: Duration,
}

impl Slow {
    fn remote<T: Send + 'static>(
        &self,
        operation: impl FnOnce(MemoryStore) -> StoreFuture<T> + Send + 'static,
    ) -> StoreFuture<T> {
        let (inner, delay) = (self.inner.clone(), self.delay);
        StoreFuture::new(async move {
            let sent = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                operation(inner).await
            });
            sent.await.expect("the store's task")
        })
    }
}

impl Store for Slow {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        retention: Duration,
    ) -> StoreFuture<Begin> {
        let key = key.to_owned();
        self.remote(move |inner| inner.begin(&key, fingerprint, retention))
    }

    fn finish(
        &self,
        claim: &Claim,
        response: Option<KeptResponse>,
        retention: Duration,
    ) -> StoreFuture<()> {
        let claim = claim.clone();
        self.remote(move |inner| inner.finish(&claim, response, retention))
    }

    fn release(&self, claim: &Claim) -> StoreFuture<()> {
        let claim = claim.clone();
        self.remote(move |inner| inner.release(&claim))
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_its_key_is_claimed_frees_the_key_once_claimed() {
    let memory = MemoryStore::new();
    let slow = Slow {
        inner: memory.clone(),
        delay: Duration::from_secs(1),
    };
    let handler = answering(201);
    let service = IdempotencyLayer::new(slow).layer(handler.clone());
    // Gone while the store claims the key: the handler never runs, and the
    // claim that comes after is freed, not left to a lease.
    let gone = tokio::time::timeout(Duration::from_millis(500), send(&service, order())).await;
    assert!(gone.is_err());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(handler.calls(), 0);
    assert!(memory.is_empty(), "the late claim is freed");
    let retry = send(&service, order()).await;
    assert_eq!(body(retry).await, "call 1");
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_its_response_is_kept_still_keeps_it() {
    let memory = MemoryStore::new();
    let slow = Slow {
        inner: memory.clone(),
        delay: Duration::from_secs(1),
    };
    let handler = answering(201);
    let service = IdempotencyLayer::new(slow).layer(handler.clone());
    // Claimed at 1 s, handled at once, kept at 2 s: gone at 1.5 s.
    let gone = tokio::time::timeout(Duration::from_millis(1500), send(&service, order())).await;
    assert!(gone.is_err());
    assert_eq!(handler.calls(), 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The handler's response was kept all the same: a repeat is a replay.
    let repeat = send(&service, order()).await;
    assert!(replayed(&repeat));
    assert_eq!(body(repeat).await, "call 1");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_flood_of_keys_evicts_the_oldest_and_counts_them() {
    let handler = answering(200);
    let store = MemoryStore::with_limits(3, 1 << 20).unwrap();
    let service = IdempotencyLayer::new(store.clone()).layer(handler.clone());
    for n in 0..5 {
        send(&service, post(&format!("key-{n}"), "/orders", "{}")).await;
    }
    assert_eq!(store.len(), 3);
    assert_eq!(store.evictions(), 2);
    // The newest are replayed; the oldest has lost its replay and runs again.
    assert!(replayed(
        &send(&service, post("key-4", "/orders", "{}")).await
    ));
    let oldest = send(&service, post("key-0", "/orders", "{}")).await;
    assert!(!replayed(&oldest));
    assert_eq!(store.evictions(), 3);

    // Bytes bound the store too: each entry costs its key, its kept body
    // and its overhead.
    let store = MemoryStore::with_limits(1_000, 3 * 250).unwrap();
    let service = IdempotencyLayer::new(store.clone()).layer(answering(200));
    for n in 0..10 {
        send(&service, post(&format!("key-{n}"), "/orders", "{}")).await;
        assert!(store.bytes() <= 3 * 250);
    }
    assert!(store.evictions() >= 7, "{}", store.evictions());
}

#[tokio::test]
async fn running_keys_are_never_evicted_a_full_store_answers_503() {
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = held_first(started.clone(), release.clone());
    let store = MemoryStore::with_limits(1, 1 << 20).unwrap();
    let service = IdempotencyLayer::new(store.clone()).layer(handler.clone());
    let first = spawn_send(&service, order());
    started.notified().await;
    let other = send(&service, post("another-key", "/orders", "{}")).await;
    assert_eq!(other.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(other.headers()[header::RETRY_AFTER], "1");
    assert_eq!(handler.calls(), 1);
    release.notify_one();
    first.await.unwrap();
    // Finished, the first can go to make room.
    let other = send(&service, post("another-key", "/orders", "{}")).await;
    assert_eq!(other.status(), StatusCode::CREATED);
    assert_eq!(store.evictions(), 1);
}

/// A store that answers every operation with `error`.
#[derive(Debug)]
struct Failing(StoreError);

impl Store for Failing {
    fn begin(&self, _: &str, _: Fingerprint, _: Duration) -> StoreFuture<Begin> {
        let error = self.0.clone();
        StoreFuture::ready(Err(error))
    }

    fn finish(&self, _: &Claim, _: Option<KeptResponse>, _: Duration) -> StoreFuture<()> {
        let error = self.0.clone();
        StoreFuture::ready(Err(error))
    }

    fn release(&self, _: &Claim) -> StoreFuture<()> {
        let error = self.0.clone();
        StoreFuture::ready(Err(error))
    }
}

#[tokio::test]
async fn a_store_that_cannot_answer_refuses_the_request_unrun() {
    let cases = [
        (
            StoreError::Unavailable {
                reason: "connection refused".into(),
            },
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (StoreError::Full, StatusCode::SERVICE_UNAVAILABLE),
        (
            StoreError::Damaged {
                reason: "a status of 1000".into(),
            },
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
    ];
    for (error, status) in cases {
        let handler = answering(200);
        let service = IdempotencyLayer::new(Failing(error)).layer(handler.clone());
        let response = send(&service, order()).await;
        assert_eq!(response.status(), status);
        let retry_after = response.headers().get(header::RETRY_AFTER);
        assert_eq!(
            retry_after.is_some(),
            status == StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(handler.calls(), 0);
    }
}

#[tokio::test]
async fn the_layer_serves_any_body_made_from_bytes() {
    // Full<Bytes> above; here a body type of the application's own, and an
    // infallible service as hyper and axum have them.
    let service = layer().layer(tower::service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Stream::from(Bytes::from_static(b"streamed"))))
    }));
    let first = service.clone().oneshot(order()).await.unwrap();
    assert_eq!(body(first).await, "streamed");
    let refused = service
        .clone()
        .oneshot(post("a b", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    // A method without a body is fingerprinted as well.
    let get = Request::builder()
        .method(Method::DELETE)
        .uri("/orders/7")
        .header("idempotency-key", "delete-7")
        .body(Full::default())
        .unwrap();
    let deleted = service.clone().oneshot(get).await.unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
}

/// Behind `VerifyLayer`, the verified `webhook-id` is the key: a signed
/// event without an `idempotency-key` header still runs once.
#[cfg(feature = "webhooks")]
#[tokio::test]
async fn behind_the_verifying_layer_the_verified_webhook_id_is_the_key() {
    use tower_terminal_retry::webhooks::{Key, SignLayer, VerifyLayer};

    let key: Key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
    // The sender's side: what the signing layer would put on the wire.
    let signer = SignLayer::new([key.clone()])
        .unwrap()
        .layer(tower::service_fn(|request: Request<Body>| async move {
            Ok::<_, Infallible>(request)
        }));
    let event = Request::post("/hooks/orders")
        .header("webhook-id", "msg_order_42")
        .body(Body::from(r#"{"order":42}"#))
        .unwrap();
    let signed = signer.oneshot(event).await.unwrap();
    assert!(signed.headers().get("idempotency-key").is_none());

    let handler = answering(200);
    let receiver = VerifyLayer::new([key])
        .unwrap()
        .layer(layer().layer(handler.clone()));
    let first = receiver.clone().oneshot(signed.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(!replayed(&first));
    let first = body(first).await;
    let repeat = receiver.clone().oneshot(signed).await.unwrap();
    assert!(replayed(&repeat));
    assert_eq!(body(repeat).await, first);
    assert_eq!(handler.calls(), 1);
}
