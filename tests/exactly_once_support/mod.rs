//! The two halves together, over a real network and real faults: a receiver
//! whose handler applies each event (a counter per event) behind
//! `IdempotencyLayer`, one replica or several taking turns behind one
//! loopback port, a front that loses the reply after the receiver committed;
//! and senders on one outbox file, each a child process killed with SIGKILL
//! at a random instant and the next started on the same file. Shared by
//! `tests/exactly_once.rs` and `examples/exactly_once.rs`.

#![allow(dead_code)] // The test and the example use their own share of it.

/// The on-disk outbox helpers, shared with the tests: a scratch directory,
/// a child process, and the random source for kill instants.
#[path = "../outbox_support/mod.rs"]
pub mod outbox_support;

pub use outbox_support::Random;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    convert::Infallible,
    fmt,
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_terminal_retry::{
    idempotency::IDEMPOTENT_REPLAYED,
    outbox::{Dispatcher, Durability, Outbox, Replay, IDEMPOTENCY_KEY},
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

/// What a sender says starts with this, amid whatever else it prints.
pub const SAYS: &str = "sender:";

/// The receiver's effects: how many times each event was applied.
pub type Effects = Arc<Mutex<BTreeMap<String, u32>>>;

/// The receiver's handler: applies the event its body names (one more on
/// its counter) and answers `201` with the count, at once.
pub fn apply(
    effects: Effects,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync {
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        let effects = effects.clone();
        async move {
            let bytes = request.into_body().collect().await?.to_bytes();
            let event = String::from_utf8_lossy(&bytes).into_owned();
            let applied = {
                let mut effects = effects.lock().unwrap();
                let count = effects.entry(event.clone()).or_default();
                *count += 1;
                *count
            };
            let body = format!(r#"{{"event":"{event}","applied":{applied}}}"#);
            Ok(Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "application/json")
                .body(Full::from(body))
                .unwrap())
        }
    })
}

/// What the front counted.
#[derive(Default)]
pub struct Counts {
    /// Requests that reached the front: every attempt.
    pub attempts: AtomicU64,
    /// Replies lost on purpose after the receiver answered.
    pub dropped: AtomicU64,
    /// Replies that were replays of a kept response.
    pub replayed: AtomicU64,
    /// `409`s: a repeat while the first still ran.
    pub conflicts: AtomicU64,
}

/// The receiver: its replicas behind one loopback port, and what it did.
pub struct Receiver {
    pub addr: SocketAddr,
    pub effects: Effects,
    pub counts: Arc<Counts>,
    accept: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Receiver {
    /// Serves `replicas` (each the handler behind its own
    /// `IdempotencyLayer`) on a loopback port, taking turns request by
    /// request. The reply to the first attempt of each key, and to every
    /// fourth request after, is lost: the receiver answered (and kept its
    /// answer), then the connection closes before the reply goes out.
    pub async fn start<S>(replicas: Vec<S>, effects: Effects) -> Receiver
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let front = Arc::new(Front {
            replicas,
            turn: AtomicUsize::new(0),
            seen: Mutex::new(HashSet::new()),
            counts: counts.clone(),
        });
        let accept = serve(listener, move |request| front.clone().answer(request));
        Receiver {
            addr,
            effects,
            counts,
            accept,
        }
    }

    /// Where senders post their events.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener`, each request answered by
/// `answer`; an error closes the connection without a reply. Stops when the
/// task is aborted.
pub fn serve<F, Fut, E>(listener: TcpListener, answer: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let _ = stream.set_nodelay(true);
            let answer = answer.clone();
            connections.spawn(async move {
                let service = service_fn(answer);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// `request` with its body read whole: what `IdempotencyLayer` serves.
pub async fn buffered(request: Request<Incoming>) -> Result<Request<Full<Bytes>>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Request::from_parts(parts, Full::new(body)))
}

/// The load balancer in front of the replicas, and the network's faults.
struct Front<S> {
    replicas: Vec<S>,
    turn: AtomicUsize,
    /// The keys whose first attempt came.
    seen: Mutex<HashSet<Vec<u8>>>,
    counts: Arc<Counts>,
}

/// The error that makes hyper close the connection without a reply.
#[derive(Debug)]
struct ReplyLost;

impl fmt::Display for ReplyLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the reply was lost on the way back")
    }
}

impl std::error::Error for ReplyLost {}

impl<S> Front<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone,
{
    async fn answer(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, ReplyLost> {
        let attempt = self.counts.attempts.fetch_add(1, Ordering::SeqCst);
        let request = buffered(request).await.map_err(|_| ReplyLost)?;
        let key = request
            .headers()
            .get(IDEMPOTENCY_KEY)
            .map(|key| key.as_bytes().to_vec());
        let first = key.is_some_and(|key| self.seen.lock().unwrap().insert(key));
        let replica = self.turn.fetch_add(1, Ordering::SeqCst) % self.replicas.len();
        let response = match self.replicas[replica].clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        if response.headers().contains_key(IDEMPOTENT_REPLAYED) {
            self.counts.replayed.fetch_add(1, Ordering::SeqCst);
        }
        if response.status() == StatusCode::CONFLICT {
            self.counts.conflicts.fetch_add(1, Ordering::SeqCst);
        }
        if first || attempt % 4 == 3 {
            self.counts.dropped.fetch_add(1, Ordering::SeqCst);
            return Err(ReplyLost);
        }
        Ok(response)
    }
}

/// A sender: stores each of `events` in the outbox at `file` and sends it
/// to `url`, saying `stored <event>` once it is on disk. As `drain`, sends
/// nothing new, waits for the outbox to empty and says `drained`; as `send`,
/// keeps replaying until killed.
pub fn sender(role: &str, url: &str, file: &Path, events: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let stack = ServiceBuilder::new()
            .timeout(Duration::from_secs(2))
            .service(client);
        let layer = TerminalRetryLayer::new(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([Duration::from_millis(20); 3]).unwrap()),
        );
        let dispatcher = match Outbox::open(file).map(|outbox| {
            Dispatcher::builder(outbox, stack)
                .layer(layer)
                .replay(Replay {
                    interval: Duration::from_millis(100),
                    rate: 10_000,
                    ..Replay::default()
                })
                .build()
        }) {
            Ok(Ok(dispatcher)) => dispatcher,
            Ok(Err(error)) => return println!("{SAYS} no dispatcher: {error}"),
            Err(error) => return println!("{SAYS} no outbox: {error}"),
        };
        let mut sends = Vec::new();
        for event in events.split(',').filter(|event| !event.is_empty()) {
            let request = Request::post(url)
                .header("content-type", "text/plain")
                .body(Bytes::from(event.to_owned()))
                .unwrap();
            let mut dispatch = dispatcher.send(event, request);
            if dispatch.stored().await == Durability::Stored {
                println!("{SAYS} stored {event}");
            }
            sends.push(dispatch);
        }
        for dispatch in sends {
            let _ = dispatch.await;
        }
        if role != "drain" {
            return std::future::pending().await;
        }
        for _ in 0..400 {
            if dispatcher
                .outbox()
                .unwrap()
                .pending()
                .is_ok_and(|pending| pending.is_empty())
            {
                return println!("{SAYS} drained");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        println!("{SAYS} not drained");
    });
}

/// What a run showed.
#[derive(Debug)]
pub struct Run {
    /// Events created: stored by a sender, or seen by the receiver.
    pub events: usize,
    /// Effects applied, over all events.
    pub effects: u64,
    /// Events applied more than once.
    pub duplicated: Vec<String>,
    /// Events stored but never applied.
    pub missing: Vec<String>,
    pub attempts: u64,
    pub dropped: u64,
    pub replayed: u64,
    pub conflicts: u64,
    pub kills: usize,
    /// Whether the last sender emptied the outbox.
    pub drained: bool,
    /// What the last sender said: why it did not, if it did not.
    pub last_said: Vec<String>,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "events={} effects={} duplicated={} missing={} attempts={} replies_lost={} \
             replayed={} conflicts={} senders_killed={} drained={} last_sender_said={:?}",
            self.events,
            self.effects,
            self.duplicated.len(),
            self.missing.len(),
            self.attempts,
            self.dropped,
            self.replayed,
            self.conflicts,
            self.kills,
            self.drained,
            self.last_said
        )
    }
}

/// Runs `kills` senders one after the other, each with `per_sender` new
/// events and killed (SIGKILL) at a random instant, then one that drains
/// the outbox; `command(role, events)` makes a sender's process (its
/// output is read here). Then counts, per event, the effects the receiver
/// applied.
pub async fn run(
    receiver: &Receiver,
    kills: usize,
    per_sender: usize,
    random: &mut Random,
    command: impl Fn(&str, &str) -> Command,
) -> Run {
    let mut stored = BTreeSet::new();
    let mut said = |child: Child| {
        let output = child.wait_with_output().unwrap();
        let mut lines = Vec::new();
        for line in BufReader::new(&output.stdout[..])
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, said)) = line.split_once(SAYS) {
                let said = said.trim().to_owned();
                if let Some(event) = said.strip_prefix("stored ") {
                    stored.insert(event.to_owned());
                }
                lines.push(said);
            }
        }
        lines
    };
    for sender in 0..kills {
        let events: Vec<String> = (0..per_sender).map(|n| format!("e{sender}-{n}")).collect();
        let mut child = command("send", &events.join(","))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5 + random.below(145))).await;
        child.kill().unwrap();
        said(child);
    }
    let last = command("drain", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = tokio::task::spawn_blocking(move || last.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let last_said: Vec<String> = String::from_utf8_lossy(&lines.stdout)
        .lines()
        .filter_map(|line| Some(line.split_once(SAYS)?.1.trim().to_owned()))
        .collect();
    let drained = last_said.iter().any(|said| said == "drained");

    let effects = receiver.effects.lock().unwrap().clone();
    let events: BTreeSet<&String> = stored.iter().chain(effects.keys()).collect();
    let counts = &receiver.counts;
    Run {
        events: events.len(),
        effects: effects.values().map(|&n| u64::from(n)).sum(),
        duplicated: effects
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(event, _)| event.clone())
            .collect(),
        missing: stored
            .iter()
            .filter(|event| !effects.contains_key(*event))
            .cloned()
            .collect(),
        attempts: counts.attempts.load(Ordering::SeqCst),
        dropped: counts.dropped.load(Ordering::SeqCst),
        replayed: counts.replayed.load(Ordering::SeqCst),
        conflicts: counts.conflicts.load(Ordering::SeqCst),
        kills,
        drained,
        last_said,
    }
}
