//! A loopback HTTP server for tests: scripted replies, faults, and a record of
//! every request it saw (enable the `test-server` feature).
//!
//! Real HTTP over 127.0.0.1, HTTP/1.1 and HTTP/2 (prior knowledge), so the
//! client under test, its connection pool and its error paths are the real
//! ones. Each request is answered by a [`Reply`]: a response, the connection
//! closed before any response, or a hang until the server is dropped.
//! Dropping the server stops it and every connection. [`TaskServer`] plays a
//! task server on it, with faults scripted per task or in windows of time.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower::{Layer, ServiceExt};
//! use tower_terminal_retry::{test_server::{Reply, TestServer}, Schedule, TerminalRetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Two 502s, a closed connection, then 200 for every later request.
//! let server = TestServer::scripted([Reply::status(502), Reply::status(502), Reply::Close]).await?;
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let service = TerminalRetryLayer::default().layer(client);
//! let request = http::Request::post(server.url("/callback")).body(Full::from("{}"))?;
//! let response = service.oneshot(request).await?;
//!
//! assert_eq!(response.status(), 200);
//! assert_eq!(server.requests().len(), 4);
//! # Ok(())
//! # }
//! ```

mod task;
pub use task::{Attempt, Fault, Handling, TaskServer, TaskState};
// Shared with the client, which sends these routes; this is its public path.
pub use crate::task_route::Action;

use std::{
    collections::VecDeque,
    convert::Infallible,
    fmt, io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinSet, time::Instant};

use crate::sync::lock;

/// How the server answers one request.
///
/// [`Reply::status`] is an empty response; any other, with headers or a
/// body, is a [`Reply::Respond`]:
///
/// ```
/// use http::{header::RETRY_AFTER, Response};
/// use http_body_util::Full;
/// use tower_terminal_retry::test_server::Reply;
///
/// let not_found = Reply::Respond(Response::builder().status(404).body(Full::from("not found"))?);
/// let slow_down = Reply::Respond(
///     Response::builder().status(429).header(RETRY_AFTER, "3").body(Full::default())?,
/// );
/// # let _ = (not_found, slow_down);
/// # Ok::<(), http::Error>(())
/// ```
#[derive(Debug, Clone)]
pub enum Reply {
    /// Send this response.
    Respond(Response<Full<Bytes>>),
    /// Close the connection without sending any response.
    Close,
    /// Never answer; the connection stays open until the server is dropped.
    Hang,
    /// Answer with `reply` after waiting `after` (on tokio's clock): a slow
    /// server, for counting the attempts in flight at once.
    Delayed {
        /// How long the server takes.
        after: std::time::Duration,
        /// What it then answers.
        reply: Box<Reply>,
    },
}

impl Reply {
    /// An empty response with this status.
    ///
    /// # Panics
    ///
    /// When `status` is not a valid status code (100 to 999).
    pub fn status(status: u16) -> Reply {
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::from_u16(status).expect("a valid status code");
        Reply::Respond(response)
    }
}

/// A request as the server saw it.
#[derive(Clone)]
pub struct RecordedRequest {
    /// The method.
    pub method: Method,
    /// The request target.
    pub uri: Uri,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// When the request arrived, on tokio's clock (paused or not).
    pub at: Instant,
}

impl fmt::Debug for RecordedRequest {
    // Header values stay out: they may hold credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordedRequest")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_len", &self.body.len())
            .field("at", &self.at)
            .finish()
    }
}

type Handler = dyn Fn(&RecordedRequest) -> Reply + Send + Sync;

/// A loopback HTTP server: see the [module docs](self).
pub struct TestServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    // Aborted on drop, and with it every connection it spawned.
    accept: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts a server on 127.0.0.1 (a free port) that answers every request
    /// with `handler`'s reply, and records every request.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub async fn start(
        handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    ) -> io::Result<TestServer> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::new(handler),
            Arc::clone(&requests),
        ));
        Ok(TestServer {
            addr,
            requests,
            accept,
        })
    }

    /// Starts a server that answers with `replies` in order, then 200 (empty)
    /// to every later request.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub async fn scripted(replies: impl IntoIterator<Item = Reply>) -> io::Result<TestServer> {
        let script = Mutex::new(replies.into_iter().collect::<VecDeque<_>>());
        TestServer::start(move |_| {
            lock(&script)
                .pop_front()
                .unwrap_or_else(|| Reply::status(200))
        })
        .await
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` followed by `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Every request seen so far, in order of arrival.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.requests).clone()
    }
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .field("requests", &lock(&self.requests).len())
            .finish()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    handler: Arc<Handler>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
) {
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            // Reap finished connections so a long test does not pile them up.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        // Small replies leave at once instead of waiting on Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (handler, requests) = (handler.clone(), requests.clone());
        let service = service_fn(move |request| {
            let (handler, requests) = (handler.clone(), requests.clone());
            async move { answer(request, &*handler, &requests).await }
        });
        connections.spawn(async move {
            // A connection ending in error is what `Reply::Close` asks for.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The error that makes hyper close a connection without a response.
#[derive(Debug)]
struct CloseConnection;

impl fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection closed by the test server's script")
    }
}

impl std::error::Error for CloseConnection {}

async fn answer(
    request: http::Request<Incoming>,
    handler: &Handler,
    requests: &Mutex<Vec<RecordedRequest>>,
) -> Result<Response<Full<Bytes>>, CloseConnection> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Err(CloseConnection),
    };
    let recorded = RecordedRequest {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        at: Instant::now(),
    };
    let reply = handler(&recorded);
    lock(requests).push(recorded);
    let mut reply = reply;
    loop {
        break match reply {
            Reply::Respond(response) => Ok(response),
            Reply::Close => Err(CloseConnection),
            Reply::Hang => std::future::pending::<Result<_, Infallible>>()
                .await
                .map_err(|never| match never {}),
            Reply::Delayed { after, reply: then } => {
                tokio::time::sleep(after).await;
                reply = *then;
                continue;
            }
        };
    }
}
