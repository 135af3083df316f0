//! What the benches and the scale examples share: the callback request they
//! all send, the services and clients they compare, and a loopback server.
//! The peers package's benches share it too, and add the peer stacks.

// Each bench binary uses its own part of this module.
#![allow(dead_code)]

pub mod allocation_table;
pub mod counting_alloc;
pub mod database;
pub mod loopback;

use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    net::{Ipv4Addr, SocketAddr},
    pin::pin,
    sync::{
        atomic::{AtomicU16, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tower::{retry::Policy, Service, ServiceExt};
use tower_terminal_retry::{Jitter, RetryBudget, TerminalRetryLayer, TerminalRetryPolicy};

/// The path of the callback, as the daemon of the original sends it.
pub const CALLBACK_PATH: &str = "/api/daemon/tasks/7f3c9b2e-4d1a-4c8e-9b6f-2a5d8e1c0f93/complete";

/// A terminal callback's JSON body: 204 bytes.
pub const BODY: &str = concat!(
    r#"{"task_id":"7f3c9b2e-4d1a-4c8e-9b6f-2a5d8e1c0f93","status":"completed","#,
    r#""exit_code":0,"output":"build finished: 42 artifacts uploaded to the store","#,
    r#""finished_at":"2026-03-14T09:26:53Z","duration_ms":81234}"#,
);

/// The callback's headers: a JSON content type, a bearer token and two
/// identity headers, the last three built from runtime strings as a daemon
/// builds them.
pub fn callback_headers() -> HeaderMap {
    let token = String::from("Bearer 3q2+7wAAAAB0b2tlbi1mb3ItdGhlLWRhZW1vbi0xMjM0NTY3ODkw");
    let daemon = String::from("daemon-eu-west-1-0042");
    let task = String::from("7f3c9b2e-4d1a-4c8e-9b6f-2a5d8e1c0f93");
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&token).expect("a header value"),
    );
    headers.insert(
        HeaderName::from_static("x-daemon-id"),
        HeaderValue::from_str(&daemon).expect("a header value"),
    );
    headers.insert(
        HeaderName::from_static("x-task-id"),
        HeaderValue::from_str(&task).expect("a header value"),
    );
    headers
}

/// The callback body in its own allocation, as a daemon serialises it.
pub fn callback_body() -> Bytes {
    Bytes::copy_from_slice(BODY.as_bytes())
}

/// The callback: a POST to `base` (`http://host:port`) followed by
/// [`CALLBACK_PATH`], with [`callback_headers`] and [`BODY`].
pub fn callback_request(base: &str) -> Request<Full<Bytes>> {
    let mut request = Request::post(format!("{base}{CALLBACK_PATH}"))
        .body(Full::new(callback_body()))
        .expect("a valid request");
    *request.headers_mut() = callback_headers();
    request
}

// ---------------------------------------------------------------------------
// In memory

/// The in-memory service: answers 200 at once, without looking at the request.
pub type Answer200 = tower::util::ServiceFn<
    fn(Request<Full<Bytes>>) -> Ready<Result<Response<Full<Bytes>>, Infallible>>,
>;

pub fn answer_200() -> Answer200 {
    fn answer(_request: Request<Full<Bytes>>) -> Ready<Result<Response<Full<Bytes>>, Infallible>> {
        ready(Ok(Response::new(Full::default())))
    }
    tower::service_fn(answer as fn(_) -> _)
}

/// The least any tower retry policy does: clone the request for a retry that
/// never comes. `tower::retry::Retry` with it is the floor of the comparison.
#[derive(Debug, Clone, Copy)]
pub struct NeverRetry;

impl<B: Clone, Res, E> Policy<Request<B>, Res, E> for NeverRetry {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Request<B>, _: &mut Result<Res, E>) -> Option<Ready<()>> {
        None
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        Some(request.clone())
    }
}

/// The layer with every option on: full jitter, a retry budget and the
/// attempt header.
pub fn layer_all_options() -> TerminalRetryLayer {
    let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.2).expect("a valid budget");
    TerminalRetryLayer::new(
        TerminalRetryPolicy::default()
            .with_jitter(Jitter::full())
            .with_budget(budget)
            .with_attempt_header(HeaderName::from_static("x-retry-attempt")),
    )
}

/// Makes one call to a service that answers at once, on this thread: readiness,
/// call and the one poll that completes it, as `oneshot` would, without a
/// runtime in the measurement.
pub fn call_now<S, R>(service: &mut S, request: R) -> S::Response
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("the in-memory service is always ready"),
    }
    match pin!(service.call(request)).poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        _ => panic!("the in-memory service answers 200 at once"),
    }
}

// ---------------------------------------------------------------------------
// Loopback

/// A loopback HTTP server (HTTP/1.1 and HTTP/2, as the crate's test server)
/// that keeps no record of the requests, as a bench sends millions, on a
/// thread and runtime of its own so that it does not share the client's. It
/// answers an empty response with the current status.
pub struct LoopbackServer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    answered: Arc<AtomicU64>,
}

impl LoopbackServer {
    /// Starts a server answering `status` to every request. It runs until the
    /// process ends.
    pub fn start(status: u16) -> LoopbackServer {
        let status = Arc::new(AtomicU16::new(status));
        let answered = Arc::new(AtomicU64::new(0));
        let (serve_status, serve_answered) = (status.clone(), answered.clone());
        let (addr_sender, addr) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("loopback-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                        .await
                        .expect("a loopback port");
                    let local = listener.local_addr().expect("the server's address");
                    addr_sender.send(local).expect("the bench waits");
                    // Serve until the process ends.
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        // Small replies leave at once, not after Nagle's delay.
                        let _ = stream.set_nodelay(true);
                        let (status, answered) = (serve_status.clone(), serve_answered.clone());
                        let answer = service_fn(move |request: Request<Incoming>| {
                            let (status, answered) = (status.clone(), answered.clone());
                            async move {
                                let _ = request.into_body().collect().await;
                                answered.fetch_add(1, Ordering::Relaxed);
                                let mut response = Response::new(Full::<Bytes>::default());
                                *response.status_mut() =
                                    StatusCode::from_u16(status.load(Ordering::Relaxed))
                                        .expect("a valid status");
                                Ok::<_, Infallible>(response)
                            }
                        });
                        tokio::spawn(async move {
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), answer)
                                .await;
                        });
                    }
                });
            })
            .expect("a server thread");
        LoopbackServer {
            addr: addr.recv().expect("the server's address"),
            status,
            answered,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The status of every later answer.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

/// hyper-util's legacy client, HTTP/1.1 with its connection pool, as the
/// layer's docs stack it.
pub fn hyper_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(connector())
}

/// hyper-util's connector with `TCP_NODELAY`, as reqwest sets it by default:
/// without it, small writes wait for the peer's delayed ACK.
pub fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector
}

/// Sends one request through a hyper-util client service and reads the whole
/// answer; panics unless it is a 200.
pub async fn send_hyper<S>(service: S, request: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Incoming>>,
    S::Error: std::fmt::Debug,
{
    let response = service.oneshot(request).await.expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.expect("a body");
}

/// Runs `calls` calls of `call`, `in_flight` at a time (each of `in_flight`
/// tasks makes its share one after the other), and returns the time it took.
/// One in flight runs on the calling task, without a spawn.
pub async fn run_calls<F, Fut>(calls: u64, in_flight: u64, call: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    if in_flight <= 1 {
        for _ in 0..calls {
            call().await;
        }
        return start.elapsed();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
        let share = calls / in_flight + u64::from(worker < calls % in_flight);
        let call = call.clone();
        tasks.spawn(async move {
            for _ in 0..share {
                call().await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a call task");
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------
// Side by side

/// Times contenders in alternation: `rounds` rounds in which each of `names`,
/// in an order that rotates, runs once: `time(index)` runs the contender
/// `names[index]` and returns its time per call.
/// On a shared machine the load drifts between two criterion benches run a
/// minute apart; within one round it hits every contender alike, so the
/// ratio of each round is steadier than the ratio of two medians.
///
/// Prints, per contender, the median time per call and the median over the
/// rounds of its time divided by the time of `names[baseline]`.
pub fn side_by_side(
    title: &str,
    rounds: usize,
    names: &[&str],
    baseline: usize,
    mut time: impl FnMut(usize) -> Duration,
) {
    let mut times = vec![Vec::with_capacity(rounds); names.len()];
    for round in 0..rounds {
        for offset in 0..names.len() {
            let index = (round + offset) % names.len();
            times[index].push(time(index));
        }
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    println!("\n{title}: {rounds} rounds side by side\n");
    println!(
        "| contender | median per call | median ratio to `{}` |",
        names[baseline]
    );
    println!("|---|---:|---:|");
    for (index, name) in names.iter().enumerate() {
        let per_call = median(times[index].iter().map(Duration::as_secs_f64).collect());
        let ratio = median(
            times[index]
                .iter()
                .zip(&times[baseline])
                .map(|(this, first)| this.as_secs_f64() / first.as_secs_f64())
                .collect(),
        );
        println!("| {name} | {} | {ratio:.3} |", format_time(per_call));
    }
}

fn format_time(seconds: f64) -> String {
    if seconds < 1e-6 {
        format!("{:.1} ns", seconds * 1e9)
    } else {
        format!("{:.2} µs", seconds * 1e6)
    }
}
