//! A webhook sender that survives a restart: the outbox without the task
//! client, over a tower stack of its own.
//!
//! ```text
//! cargo run --example webhooks
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --example webhooks -- --postgres
//! ```
//!
//! The receiver is down while the first sender stores ten events and tries
//! them; the sender then stops without shutdown (its runtime is dropped). A
//! second sender on the same outbox file finds the events pending and, once
//! the receiver is up, delivers every one, each with the `Idempotency-Key` it
//! was stored with, so that the receiver can tell a replay from a new event.
//!
//! Every attempt is signed (Standard Webhooks: `webhook-id`, the idempotency
//! key; `webhook-timestamp`, the attempt's time; `webhook-signature`), and the
//! receiver verifies each one before it answers: the summary counts those it
//! refused.
//!
//! With `--postgres`, the outbox is a queue in the database `DATABASE_URL`
//! names, shared by two sender processes at once. The first stores ten
//! events and its network hangs, so it holds their claims, renewing its
//! lease; the second leaves them alone. The first is then killed
//! (`SIGKILL`, as `kill -9`): once its lease has run out, the second takes
//! its events over and delivers every one. The summary says how long that
//! took after the kill, to compare with the lease and the replay interval.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tower::ServiceBuilder;
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Durability, Outbox, Replay},
    test_server::{RecordedRequest, Reply, TestServer},
    webhooks::{Key, Sign, SignLayer, VerifyLayer},
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

const EVENTS: usize = 10;
/// The PostgreSQL mode's lease and replay interval: a takeover after the
/// kill takes at most their sum.
const LEASE: Duration = Duration::from_secs(2);
const REPLAY_INTERVAL: Duration = Duration::from_secs(1);

/// The secret the senders sign with and the receiver verifies with (a real
/// one comes from the configuration: never in the code).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One attempt: signed, then hyper-util's client under a timeout.
type Stack = Sign<tower::timeout::Timeout<Client<HttpConnector, Full<Bytes>>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => on_redb(),
        ["--postgres"] => on_postgres(),
        ["--postgres-sender", role, receiver, queue] => postgres_sender(role, receiver, queue),
        _ => Err("usage: webhooks [--postgres]".into()),
    }
}

/// Two senders one after the other on one redb file.
fn on_redb() -> Result<(), Box<dyn std::error::Error>> {
    let directory = std::env::temp_dir().join(format!("webhooks-example-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let file = directory.join("webhooks.redb");

    // The receiver runs beside both senders; it verifies each attempt, and
    // answers 503 until it is up.
    let receiver_runtime = tokio::runtime::Runtime::new()?;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let verifying = Verifying::new(refused.clone())?;
    let receiver = receiver_runtime.block_on(TestServer::start({
        let up = up.clone();
        move |request| match verifying.refusal(request) {
            Some(refusal) => refusal,
            None if up.load(std::sync::atomic::Ordering::SeqCst) => Reply::status(204),
            None => Reply::status(503),
        }
    }))?;
    let url = receiver.url("/hooks/orders");

    println!("sender 1: the receiver is down");
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    first.block_on(async {
        let dispatcher = sender(&file)?;
        let mut sends = Vec::new();
        for order in 0..EVENTS {
            let mut dispatch = dispatcher.send(format!("order-{order}-paid"), event(&url, order)?);
            assert_eq!(dispatch.stored().await, Durability::Stored);
            sends.push(dispatch);
        }
        println!("sender 1: {EVENTS} events stored before their first attempt");
        for dispatch in sends {
            assert_eq!(dispatch.await, Delivery::Queued);
        }
        println!("sender 1: retries ran out, every event is queued in the outbox");
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    // Stopped without shutdown: the replay worker dies with its runtime.
    drop(first);
    println!("sender 1: stopped without shutdown\n");

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    second.block_on(async {
        let dispatcher = sender(&file)?;
        let pending = dispatcher.outbox().unwrap().pending()?;
        println!("sender 2: finds {} events pending", pending.len());
        up.store(true, std::sync::atomic::Ordering::SeqCst);
        println!("sender 2: the receiver is up");
        for _ in 0..200 {
            if dispatcher.outbox().unwrap().pending()?.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "sender 2: {} events left in the outbox",
            dispatcher.outbox().unwrap().pending()?.len()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;

    // What the receiver saw: every event, each with one key across all its
    // attempts, the first sender's and the second's.
    println!(
        "\nsummary: events={EVENTS} received={} attempts={} one_key_per_event={} refused_signatures={}",
        distinct_bodies(&receiver),
        receiver.requests().len(),
        one_key_per_event(&receiver),
        refused.load(std::sync::atomic::Ordering::SeqCst)
    );
    std::fs::remove_dir_all(&directory)?;
    Ok(())
}

/// A sender over its own stack: each attempt signed, then hyper-util's
/// client under a per-attempt timeout; the dispatcher adds the terminal
/// layer (short retries here) and replays, probing every second at most
/// while the receiver is down.
fn sender(file: &std::path::Path) -> Result<Dispatcher<Stack>, Box<dyn std::error::Error>> {
    let stack = signed_stack()?;
    let layer = TerminalRetryLayer::new(
        TerminalRetryPolicy::default()
            .with_schedule(Schedule::new([Duration::from_millis(100); 2])?),
    );
    let dispatcher = Dispatcher::builder(Outbox::open(file)?, stack)
        .layer(layer)
        .replay(Replay {
            interval: Duration::from_secs(1),
            ..Replay::default()
        })
        .build()?;
    Ok(dispatcher)
}

/// What each attempt goes through: the signing layer (inside the retry
/// layer the dispatcher adds, so that each attempt is signed with its own
/// time), then hyper-util's client under a per-attempt timeout.
fn signed_stack() -> Result<Stack, Box<dyn std::error::Error>> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    Ok(ServiceBuilder::new()
        .layer(SignLayer::new([SECRET.parse::<Key>()?])?)
        .timeout(Duration::from_secs(5))
        .service(client))
}

/// The receiver's check: each request verified as `VerifyLayer` does it,
/// before the receiver answers; refusals counted.
struct Verifying {
    verifier: VerifyLayer,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Verifying {
    fn new(
        refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Result<Verifying, Box<dyn std::error::Error>> {
        let verifier = VerifyLayer::new([SECRET.parse::<Key>()?])?;
        Ok(Verifying { verifier, refused })
    }

    /// The answer to a request that does not verify; `None` if it does.
    fn refusal(&self, request: &RecordedRequest) -> Option<Reply> {
        let refusal = self
            .verifier
            .verify(&request.headers, &request.body)
            .err()?;
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        println!("receiver: refused: {refusal}");
        Some(Reply::status(refusal.status().as_u16()))
    }
}

fn event(url: &str, order: usize) -> Result<Request<Bytes>, http::Error> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Bytes::from(format!(
            r#"{{"event":"order.paid","order":{order}}}"#
        )))
}

/// The connection string of the PostgreSQL mode.
fn database_url() -> Result<String, Box<dyn std::error::Error>> {
    std::env::var("DATABASE_URL").map_err(|_| {
        "--postgres needs DATABASE_URL, such as postgres://postgres@127.0.0.1:5432/postgres".into()
    })
}

/// Two sender processes on one queue; the first is killed while it holds
/// its events, the second delivers them.
fn on_postgres() -> Result<(), Box<dyn std::error::Error>> {
    database_url()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let verifying = Verifying::new(refused.clone())?;
    let receiver = runtime.block_on(TestServer::start(move |request| {
        verifying
            .refusal(request)
            .unwrap_or_else(|| Reply::status(204))
    }))?;
    let url = receiver.url("/hooks/orders");
    let queue = format!("webhooks-example-{}", std::process::id());

    let mut first = spawn_sender("hung", &url, &queue)?;
    let mut second = spawn_sender("live", &url, &queue)?;
    // The second sender runs beside the first for two lease renewals: it
    // must leave claimed events alone.
    runtime.block_on(async { tokio::time::sleep(LEASE).await });
    let attempts_before_kill = receiver.requests().len();
    let killed = tokio::time::Instant::now();
    first.process.kill()?;
    first.process.wait()?;
    println!("sender 1: killed (SIGKILL) while it held its {EVENTS} events");

    let delivered = runtime.block_on(async {
        for _ in 0..300 {
            if distinct_bodies(&receiver) == EVENTS {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    let status = second.process.wait()?;
    second.forward.join().expect("the output of sender 2");
    let takeover = receiver
        .requests()
        .iter()
        .map(|request| request.at.saturating_duration_since(killed))
        .min()
        .unwrap_or_default();
    println!(
        "\nsummary: events={EVENTS} received={} lost={} attempts_before_kill={attempts_before_kill} \
         takeover_ms={} lease_ms={} replay_interval_ms={} one_key_per_event={} refused_signatures={} \
         sender_2_ok={}",
        distinct_bodies(&receiver),
        EVENTS - distinct_bodies(&receiver),
        takeover.as_millis(),
        LEASE.as_millis(),
        REPLAY_INTERVAL.as_millis(),
        one_key_per_event(&receiver),
        refused.load(std::sync::atomic::Ordering::SeqCst),
        status.success(),
    );
    if !delivered {
        return Err("sender 2 did not deliver every event in 15 s".into());
    }
    Ok(())
}

/// A sender process and the thread that prints its output.
struct Sender {
    process: std::process::Child,
    forward: std::thread::JoinHandle<()>,
}

/// Starts this example as a sender on `queue`, and returns once it says it
/// is ready, forwarding its output from then on.
fn spawn_sender(
    role: &str,
    receiver: &str,
    queue: &str,
) -> Result<Sender, Box<dyn std::error::Error>> {
    use std::io::BufRead;
    let mut process = std::process::Command::new(std::env::current_exe()?)
        .args(["--postgres-sender", role, receiver, queue])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(process.stdout.take().expect("a pipe")).lines();
    for line in lines.by_ref() {
        let line = line?;
        println!("{line}");
        if line.ends_with("ready") {
            let forward = std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    println!("{line}");
                }
            });
            return Ok(Sender { process, forward });
        }
    }
    Err(format!("the {role} sender ended before it was ready").into())
}

/// One sender process. `hung`: stores the events, and its network never
/// answers, so that it holds them until it is killed. `live`: delivers
/// what is on the queue, and ends once it is empty.
fn postgres_sender(
    role: &str,
    receiver: &str,
    queue: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let outbox = Outbox::connect(&database_url()?, queue).await?;
        if role == "hung" {
            let hangs = tower::service_fn(|_: Request<Full<Bytes>>| {
                std::future::pending::<Result<http::Response<Full<Bytes>>, std::io::Error>>()
            });
            let dispatcher = Dispatcher::builder(outbox, hangs)
                .origin(&receiver.parse()?)
                .lease(LEASE)
                .replay(Replay {
                    interval: REPLAY_INTERVAL,
                    ..Replay::default()
                })
                .build()?;
            let mut sends = Vec::new();
            for order in 0..EVENTS {
                let mut dispatch =
                    dispatcher.send(format!("order-{order}-paid"), event(receiver, order)?);
                assert_eq!(dispatch.stored().await, Durability::Stored);
                sends.push(dispatch);
            }
            println!("sender 1: {EVENTS} events stored, its network hangs: ready");
            // Killed long before.
            tokio::time::sleep(Duration::from_secs(60)).await;
            return Ok(());
        }
        // On a shared queue, a dispatcher is told where its requests may go.
        let dispatcher = Dispatcher::builder(outbox, signed_stack()?)
            .origin(&receiver.parse()?)
            .lease(LEASE)
            .replay(Replay {
                interval: REPLAY_INTERVAL,
                ..Replay::default()
            })
            .build()?;
        println!(
            "sender 2: {} events on the queue, held by sender 1: ready",
            dispatcher.outbox().unwrap().pending_count()
        );
        for _ in 0..600 {
            if dispatcher.outbox().unwrap().pending_count() == 0 {
                println!("sender 2: delivered them; the queue is empty");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("sender 2: events still queued after 30 s".into())
    })
}

/// The events the receiver has seen, each counted once.
fn distinct_bodies(receiver: &TestServer) -> usize {
    let bodies: std::collections::BTreeSet<_> = receiver
        .requests()
        .into_iter()
        .map(|request| request.body)
        .collect();
    bodies.len()
}

/// Whether every attempt of each event carried an idempotency key, the
/// same on each.
fn one_key_per_event(receiver: &TestServer) -> bool {
    let mut keys = BTreeMap::<Bytes, Vec<Option<http::HeaderValue>>>::new();
    for request in receiver.requests() {
        let key = request.headers.get("idempotency-key").cloned();
        keys.entry(request.body).or_default().push(key);
    }
    keys.values()
        .all(|keys| keys[0].is_some() && keys.iter().all(|key| key == &keys[0]))
}
