//! Helpers shared by the integration tests: an attempt recorder for any
//! service, a scripted in-memory service, the loopback client stack, and
//! the replies and readings of the test servers.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    net::Ipv4Addr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{header::RETRY_AFTER, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::{sync::watch, time::Instant};
use tower::{Layer, Service};
use tower_terminal_retry::{
    test_server::{Action, Attempt, Fault, Handling, RecordedRequest, Reply, TaskServer},
    Schedule,
};

/// The request and response body of every test.
pub type Body = Full<Bytes>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where the default layer's attempts start, in seconds: 0 then 4, 8, 16,
/// 32 and 64 s later.
pub const DEFAULT_STARTS: [u64; 6] = [0, 4, 12, 28, 60, 124];

/// More attempts than any test makes: reaching it means retries never stop.
pub const RUNAWAY: usize = 1000;

/// A plain-text reply with this status and body.
pub fn text_reply(status: u16, body: impl Into<Bytes>) -> Reply {
    let response = Response::builder()
        .status(status)
        .body(Full::new(body.into()));
    Reply::Respond(response.expect("a valid status"))
}

/// An empty reply with this status and a `Retry-After` header holding
/// `value`, verbatim (valid or not).
pub fn retry_after_reply(status: u16, value: &str) -> Reply {
    let response = Response::builder()
        .status(status)
        .header(RETRY_AFTER, value)
        .body(Full::default());
    Reply::Respond(response.expect("a valid status and header value"))
}

/// Every request to a task route, in order of arrival.
pub fn requests(server: &TaskServer) -> Vec<RecordedRequest> {
    let attempts = server.attempts().into_iter();
    attempts.map(|attempt| attempt.request).collect()
}

/// How many requests `task_id` made on `action`.
pub fn calls(server: &TaskServer, task_id: &str, action: Action) -> usize {
    let attempts = server.attempts();
    attempts
        .iter()
        .filter(|attempt| attempt.task_id == task_id && attempt.action == action)
        .count()
}

/// The JSON body of the report that made `task_id` final (completed or
/// failed).
pub fn final_report(server: &TaskServer, task_id: &str) -> Option<serde_json::Value> {
    let attempts = server.attempts();
    let applied = attempts.iter().find(|attempt| {
        attempt.task_id == task_id
            && attempt.handling == Handling::Applied
            && matches!(attempt.action, Action::Complete | Action::Fail)
    })?;
    Some(serde_json::from_slice(&applied.request.body).expect("the server took it as JSON"))
}

/// The most of `attempts` in flight at once, each from its arrival for the
/// server's `latency` (a hang to the end). Meaningful on tokio's paused
/// clock, where the server's own work takes no time.
pub fn max_in_flight<'a>(
    attempts: impl IntoIterator<Item = &'a Attempt>,
    latency: Duration,
) -> usize {
    let mut edges: Vec<(Instant, bool)> = Vec::new();
    for attempt in attempts {
        edges.push((attempt.request.at, true));
        if attempt.fault != Some(Fault::Hang) {
            edges.push((attempt.request.at + latency, false));
        }
    }
    // Ends before starts at the same instant: back to back is not overlap.
    edges.sort_by_key(|&(at, start)| (at, start));
    let (mut now, mut most) = (0usize, 0usize);
    for (_, start) in edges {
        if start {
            now += 1;
            most = most.max(now);
        } else {
            now -= 1;
        }
    }
    most
}

/// Durations from whole seconds.
pub fn secs(values: &[u64]) -> Vec<Duration> {
    values.iter().copied().map(Duration::from_secs).collect()
}

/// A schedule from whole seconds.
pub fn schedule(values: &[u64]) -> Schedule {
    Schedule::new(secs(values)).expect("a valid schedule")
}

/// An HTTP-date `ahead` seconds from now, for a `Retry-After` header.
pub fn date_in(ahead: u64) -> String {
    httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(ahead))
}

/// Asserts that `delay` is what a `Retry-After` of `date` gives when read
/// between `sent` and `returned` on the wall clock, which goes on while
/// tokio's clock is paused: the date minus that moment, rounded up to
/// tokio's timer tick of 1 ms.
pub fn assert_date_delay(delay: Duration, date: &str, sent: SystemTime, returned: SystemTime) {
    let at = httpdate::parse_http_date(date).expect("an HTTP-date");
    let longest = at.duration_since(sent).unwrap_or_default() + Duration::from_millis(1);
    let shortest = at.duration_since(returned).unwrap_or_default();
    assert!(
        shortest <= delay && delay <= longest,
        "Retry-After {date}: slept {delay:?}, expected {shortest:?} to {longest:?}"
    );
}

/// How many attempts started, finished, or were dropped unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Attempts the inner service was called for.
    pub started: usize,
    /// Attempts whose future completed.
    pub finished: usize,
    /// Attempts whose future was dropped before it completed.
    pub cancelled: usize,
}

/// Records every attempt that reaches a service: when it started on tokio's
/// clock, and whether its future completed or was dropped.
///
/// As a [`Layer`] it wraps any service in [`Counted`].
#[derive(Clone)]
pub struct Attempts {
    starts: Arc<Mutex<Vec<Instant>>>,
    progress: Arc<watch::Sender<Progress>>,
}

impl Default for Attempts {
    fn default() -> Self {
        Attempts {
            starts: Arc::default(),
            progress: Arc::new(watch::channel(Progress::default()).0),
        }
    }
}

impl fmt::Debug for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Attempts").field(&self.progress()).finish()
    }
}

impl Attempts {
    /// A fresh recorder.
    pub fn new() -> Attempts {
        Attempts::default()
    }

    /// The counts so far.
    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// How many attempts started.
    pub fn count(&self) -> usize {
        self.progress().started
    }

    /// Attempts started and neither finished nor dropped.
    pub fn in_flight(&self) -> usize {
        let p = self.progress();
        p.started - p.finished - p.cancelled
    }

    /// When each attempt started, as an offset from `origin`.
    pub fn offsets(&self, origin: Instant) -> Vec<Duration> {
        self.starts
            .lock()
            .unwrap()
            .iter()
            .map(|at| at.duration_since(origin))
            .collect()
    }

    /// Polls `call` until `reached` holds; panics if the call ends first, since
    /// the test wants to act while the call is still going.
    pub async fn drive_until<F: Future + Unpin>(
        &self,
        call: &mut F,
        reached: impl FnMut(&Progress) -> bool,
    ) {
        let mut progress = self.progress.subscribe();
        tokio::select! {
            biased;
            seen = progress.wait_for(reached) => { seen.expect("the sender lives in self"); }
            _ = call => panic!("the call ended before the awaited attempt: {:?}", self.progress()),
        }
    }

    /// Marks an attempt as started; the guard records how it ends.
    fn start(&self) -> AttemptGuard {
        let mut starts = self.starts.lock().unwrap();
        // A policy that never stops would spin forever on the paused clock:
        // fail the test instead.
        assert!(starts.len() < RUNAWAY, "more than {RUNAWAY} attempts");
        starts.push(Instant::now());
        drop(starts);
        self.progress.send_modify(|p| p.started += 1);
        AttemptGuard {
            attempts: self.clone(),
            finished: false,
        }
    }
}

/// Lives as long as one attempt's future: dropping it unfinished counts the
/// attempt as cancelled.
struct AttemptGuard {
    attempts: Attempts,
    finished: bool,
}

impl AttemptGuard {
    fn finish(mut self) {
        self.finished = true;
        self.attempts.progress.send_modify(|p| p.finished += 1);
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.attempts.progress.send_modify(|p| p.cancelled += 1);
        }
    }
}

impl<S> Layer<S> for Attempts {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            attempts: self.clone(),
        }
    }
}

/// A service whose calls are recorded by an [`Attempts`].
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    attempts: Attempts,
}

impl<S, R> Service<R> for Counted<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let guard = self.attempts.start();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            guard.finish();
            result
        })
    }
}

/// The request header that tells [`Mock`] which call an attempt belongs to.
pub const CALL_HEADER: &str = "x-call";

/// The error of [`Mock`]: what `Reply::Close` becomes in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockError {
    /// The call, from [`CALL_HEADER`] (0 without it).
    pub call: usize,
    /// The attempt within that call, from 1.
    pub attempt: usize,
}

impl fmt::Display for MockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connection closed before a response (call {}, attempt {})",
            self.call, self.attempt
        )
    }
}

impl std::error::Error for MockError {}

/// One request as [`Mock`] received it.
#[derive(Clone)]
pub struct Seen {
    /// The call, from [`CALL_HEADER`] (0 without it).
    pub call: usize,
    /// The attempt within that call, from 1.
    pub attempt: usize,
    /// Method, URI, version, headers and extensions.
    pub parts: http::request::Parts,
    /// The body's single data frame, as received (not copied).
    pub body: Bytes,
}

type Script = dyn Fn(usize, usize) -> Reply + Send + Sync;

/// An in-memory service answering each attempt from a script of
/// `(call, attempt) -> Reply`: `Respond` is the response, `Close` an error,
/// `Hang` a future that never completes.
#[derive(Clone)]
pub struct Mock {
    script: Arc<Script>,
    attempts: Attempts,
    per_call: Arc<Mutex<HashMap<usize, usize>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl fmt::Debug for Mock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mock")
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Mock {
    /// A service answering attempt `attempt` of call `call` with
    /// `script(call, attempt)`.
    pub fn new(script: impl Fn(usize, usize) -> Reply + Send + Sync + 'static) -> Mock {
        Mock {
            script: Arc::new(script),
            attempts: Attempts::new(),
            per_call: Arc::default(),
            seen: Arc::default(),
        }
    }

    /// A service answering with `replies` in order, then 200.
    pub fn scripted(replies: impl IntoIterator<Item = Reply>) -> Mock {
        let replies: Vec<Reply> = replies.into_iter().collect();
        Mock::new(move |_, attempt| {
            replies
                .get(attempt - 1)
                .cloned()
                .unwrap_or_else(|| Reply::status(200))
        })
    }

    /// The record of this service's attempts.
    pub fn attempts(&self) -> &Attempts {
        &self.attempts
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many attempts call `call` made.
    pub fn attempts_of(&self, call: usize) -> usize {
        self.per_call
            .lock()
            .unwrap()
            .get(&call)
            .copied()
            .unwrap_or(0)
    }
}

impl Service<Request<Body>> for Mock {
    type Response = Response<Body>;
    type Error = MockError;
    type Future = BoxFuture<Result<Response<Body>, MockError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), MockError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let guard = self.attempts.start();
        let (parts, mut body) = request.into_parts();
        let call = parts
            .headers
            .get(CALL_HEADER)
            .and_then(|value| value.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let attempt = {
            let mut per_call = self.per_call.lock().unwrap();
            let count = per_call.entry(call).or_default();
            *count += 1;
            *count
        };
        let reply = (self.script)(call, attempt);
        let seen = self.seen.clone();
        Box::pin(async move {
            // A `Full` body is one data frame, ready at once: keep that very
            // `Bytes` so tests can compare its data pointer.
            let body = match body.frame().await {
                Some(frame) => frame
                    .expect("Full never fails")
                    .into_data()
                    .unwrap_or_default(),
                None => Bytes::new(),
            };
            seen.lock().unwrap().push(Seen {
                call,
                attempt,
                parts,
                body,
            });
            let mut reply = reply;
            let result = loop {
                break match reply {
                    Reply::Respond(response) => Ok(response),
                    Reply::Close => Err(MockError { call, attempt }),
                    Reply::Hang => std::future::pending().await,
                    Reply::Delayed { after, reply: then } => {
                        tokio::time::sleep(after).await;
                        reply = *then;
                        continue;
                    }
                };
            };
            guard.finish();
            result
        })
    }
}

/// The loopback client every test uses: hyper-util's legacy client over
/// plain HTTP.
pub type HttpClient = Client<HttpConnector, Body>;

/// A new loopback client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A POST of `body` to `uri`.
pub fn post(uri: impl AsRef<str>, body: impl Into<Bytes>) -> Request<Body> {
    Request::post(uri.as_ref())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))
        .expect("a valid request")
}

/// A terminal callback for the in-memory service (its host is never resolved).
pub fn request() -> Request<Body> {
    post("http://callbacks.test/api/daemon/tasks/t1/complete", "{}")
}

/// The whole body of `response`, as text.
pub async fn text<B>(response: Response<B>) -> String
where
    B: hyper::body::Body,
    B::Error: fmt::Debug,
{
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a readable body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("a UTF-8 body")
}

/// A loopback URL nothing listens on: the port was bound, then released.
pub async fn refused_url(path: &str) -> String {
    // 127.0.0.2, where no test server listens (they all take 127.0.0.1): a
    // test running beside this one cannot be handed the port just freed.
    // Linux answers on all of 127.0.0.0/8; elsewhere, 127.0.0.1 it is.
    let listener = match tokio::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).await {
        Ok(listener) => listener,
        Err(_) => tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("a free loopback port"),
    };
    let addr = listener.local_addr().expect("a bound address");
    drop(listener);
    format!("http://{addr}{path}")
}

/// Walks `error`'s source chain for an error of type `T`.
pub fn find_source<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}
