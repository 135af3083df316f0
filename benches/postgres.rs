//! Durable sends per second on loopback at 64 in flight, side by side: the
//! PostgreSQL outbox (write-ahead, concurrent sends batched into shared
//! commits on one connection), the redb outbox (group commit, fsync'd), the
//! terminal layer with no store, and a naive PostgreSQL outbox: one committed
//! `INSERT` before the first attempt and one committed `DELETE` once
//! delivered, per request, pipelined on one tokio-postgres connection as the
//! outbox's own. Then the time from an `enqueue` transaction's commit to the
//! first attempt of its request; and the relay: [`RELAYED`] requests
//! enqueued in one transaction, drained by one dispatcher (replay rate
//! 1,000,000 a second), to 1 destination and to 100.
//!
//! `cargo bench --bench postgres`: against `DATABASE_URL` when it is set,
//! else a throwaway server (`initdb` and `pg_ctl` on a temporary directory, a
//! free loopback port), with PostgreSQL's default durability (`fsync` and
//! `synchronous_commit` on). The time per send is the wall time of
//! the run over the sends, so its inverse is sends per second.

mod common;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tokio_postgres::{NoTls, Statement};
use tower::{retry::Retry, Layer, ServiceExt};
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Outbox, Replay},
    test_server::{Reply, TestServer},
    TerminalRetryLayer, TerminalRetryPolicy,
};

use common::{
    callback_body, callback_headers, callback_request, database::Database, hyper_client, run_calls,
    side_by_side, LoopbackServer, CALLBACK_PATH,
};

const CONTENDERS: [&str; 4] = [
    "no_store",
    "redb_outbox",
    "postgres_outbox",
    "naive_postgres",
];
const IN_FLIGHT: u64 = 64;
const SENDS_PER_ROUND: u64 = 2_000;
const ROUNDS: usize = 5;
/// Enqueues timed one after the other, from commit to first attempt.
const LATENCY_SAMPLES: usize = 200;
/// Requests enqueued at once for the relay.
const RELAYED: u64 = 10_000;

type HyperClient = Client<HttpConnector, Full<Bytes>>;

/// The naive outbox: a table of its own and its two statements, each run in
/// a transaction of its own (autocommit).
struct Naive {
    client: tokio_postgres::Client,
    insert: Statement,
    delete: Statement,
}

impl Naive {
    async fn connect(url: &str) -> Naive {
        let client = connect(url).await;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS naive_outbox \
                 (key text PRIMARY KEY, uri text NOT NULL, body bytea NOT NULL)",
            )
            .await
            .expect("the naive table");
        let insert = client
            .prepare("INSERT INTO naive_outbox (key, uri, body) VALUES ($1, $2, $3)")
            .await
            .expect("the insert");
        let delete = client
            .prepare("DELETE FROM naive_outbox WHERE key = $1")
            .await
            .expect("the delete");
        Naive {
            client,
            insert,
            delete,
        }
    }
}

/// The four ways to send, against one server.
struct Contenders {
    base: String,
    layered: Retry<TerminalRetryPolicy, HyperClient>,
    redb: Dispatcher<HyperClient>,
    postgres: Dispatcher<HyperClient>,
    naive: Naive,
    next_key: AtomicU64,
}

impl Contenders {
    /// One durable send through contender `index`.
    async fn send(self: Arc<Self>, index: usize) {
        let key = format!("report-{}", self.next_key.fetch_add(1, Ordering::Relaxed));
        match index {
            0 => {
                let response = self.layered.clone().oneshot(callback_request(&self.base));
                assert!(response.await.expect("a response").status().is_success());
            }
            1 | 2 => {
                let dispatcher = if index == 1 {
                    &self.redb
                } else {
                    &self.postgres
                };
                let delivery = dispatcher.send(key, self.stored_request()).await;
                assert_eq!(delivery, Delivery::Delivered);
            }
            _ => {
                let uri = format!("{}{CALLBACK_PATH}", self.base);
                let body = callback_body().to_vec();
                let naive = &self.naive;
                naive
                    .client
                    .execute(&naive.insert, &[&key, &uri, &body])
                    .await
                    .expect("the insert committed");
                let response = self.layered.clone().oneshot(callback_request(&self.base));
                assert!(response.await.expect("a response").status().is_success());
                naive
                    .client
                    .execute(&naive.delete, &[&key])
                    .await
                    .expect("the delete committed");
            }
        }
    }

    fn stored_request(&self) -> Request<Bytes> {
        let mut request = Request::post(format!("{}{CALLBACK_PATH}", self.base))
            .body(callback_body())
            .expect("a request");
        *request.headers_mut() = callback_headers();
        request
    }
}

fn main() {
    let server_dir = std::env::temp_dir().join(format!("postgres-bench-db-{}", std::process::id()));
    let database = Database::from_env_or_start(&server_dir);
    let url = database.url();
    let server = LoopbackServer::start(200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let directory = std::env::temp_dir().join(format!("postgres-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("a scratch directory");
    let contenders = runtime.block_on(async {
        let client = hyper_client();
        let redb = Outbox::open(directory.join("reports.redb")).expect("a redb outbox");
        let postgres = Outbox::connect(&url, "bench")
            .await
            .expect("a postgres outbox");
        Arc::new(Contenders {
            base: server.base(),
            layered: TerminalRetryLayer::default().layer(client.clone()),
            redb: Dispatcher::builder(redb, client.clone())
                .build()
                .expect("a dispatcher"),
            postgres: Dispatcher::builder(postgres, client)
                .origin(&server.base().parse().expect("the server's URL"))
                .build()
                .expect("a dispatcher"),
            naive: Naive::connect(&url).await,
            next_key: AtomicU64::new(0),
        })
    });
    let title = format!("durable sends, {IN_FLIGHT} in flight");
    side_by_side(&title, ROUNDS, &CONTENDERS, 0, |index| {
        let contenders = contenders.clone();
        let elapsed = runtime.block_on(run_calls(SENDS_PER_ROUND, IN_FLIGHT, move || {
            contenders.clone().send(index)
        }));
        let per_send = elapsed / SENDS_PER_ROUND as u32;
        eprintln!(
            "{:>16}: {:>6.0} sends/s",
            CONTENDERS[index],
            1.0 / per_send.as_secs_f64()
        );
        per_send
    });
    drop(contenders);
    runtime.block_on(commit_to_first_attempt(&url));
    println!(
        "\nrelay: {RELAYED} requests enqueued in one transaction, drained by one dispatcher\n"
    );
    println!("| destinations | drained in | deliveries a second |");
    println!("|---:|---:|---:|");
    // A sender's runtime: its worker threads, one per core.
    let relaying = tokio::runtime::Runtime::new().expect("a runtime");
    for destinations in [1, 100] {
        let (elapsed, delivered) = relaying.block_on(relay(&url, destinations));
        println!(
            "| {destinations} | {:.2} s | {:.0} |",
            elapsed.as_secs_f64(),
            delivered as f64 / elapsed.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&directory);
}

/// Enqueues one request at a time in a transaction of the caller's own,
/// and times, per request, the commit and the wait from the commit's start
/// to the request's first arrival at the server (woken by `NOTIFY`).
async fn commit_to_first_attempt(url: &str) {
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let server = TestServer::start(move |_| {
        // The receiver ends with the bench; a send after that has no reader.
        let _ = arrived.send(Instant::now());
        Reply::status(204)
    })
    .await
    .expect("a loopback port");
    let outbox = Outbox::connect(url, "latency")
        .await
        .expect("a postgres outbox");
    let dispatcher = Dispatcher::builder(outbox, hyper_client())
        .any_origin()
        .build()
        .expect("a dispatcher");
    let mut application = connect(url).await;
    let (mut commits, mut waits) = (Vec::new(), Vec::new());
    for sample in 0..LATENCY_SAMPLES {
        let transaction = application.transaction().await.expect("a transaction");
        let request = Request::post(server.url("/hooks/latency"))
            .body(Bytes::from(format!(r#"{{"sample":{sample}}}"#)))
            .expect("a request");
        enqueue(
            &dispatcher,
            &transaction,
            &format!("latency-{sample}"),
            request,
        )
        .await;
        let commit_started = Instant::now();
        transaction.commit().await.expect("committed");
        commits.push(commit_started.elapsed());
        let arrival = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
            .await
            .expect("a first attempt within 10 s")
            .expect("the server runs");
        waits.push(arrival.duration_since(commit_started));
    }
    println!(
        "\nenqueue, commit to first attempt: {LATENCY_SAMPLES} requests one after the other\n"
    );
    println!("| from the commit's start | median | p95 | max |");
    println!("|---|---:|---:|---:|");
    for (name, mut times) in [("commit returns", commits), ("first attempt", waits)] {
        times.sort();
        let at = |quantile: f64| times[((times.len() - 1) as f64 * quantile) as usize];
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms |",
            at(0.5).as_secs_f64() * 1e3,
            at(0.95).as_secs_f64() * 1e3,
            at(1.0).as_secs_f64() * 1e3
        );
    }
}

/// A plain connection, driven on the current runtime: the application's
/// own, for the transactions the requests are enqueued in, or the naive
/// outbox's.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("a connection");
    tokio::spawn(connection);
    client
}

/// Enqueues `request` under `key` in the application's `transaction`, on
/// the dispatcher's outbox.
async fn enqueue<S>(
    dispatcher: &Dispatcher<S>,
    transaction: &tokio_postgres::Transaction<'_>,
    key: &str,
    request: Request<Bytes>,
) {
    dispatcher
        .outbox()
        .unwrap()
        .enqueue(transaction, key, request)
        .await
        .expect("enqueued");
}

/// Enqueues [`RELAYED`] requests for `destinations` loopback receivers (in
/// turn) in one transaction, and times the drain from the commit to the
/// last delivery: how long, and how many were delivered.
async fn relay(url: &str, destinations: usize) -> (Duration, u64) {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    for _ in 0..destinations {
        let delivered = delivered.clone();
        let receiver = TestServer::start(move |_| {
            delivered.fetch_add(1, Ordering::Relaxed);
            Reply::status(204)
        })
        .await
        .expect("a loopback port");
        receivers.push(receiver);
    }
    let outbox = Outbox::connect(url, &format!("relay-{destinations}"))
        .await
        .expect("a postgres outbox");
    let dispatcher = Dispatcher::builder(outbox, hyper_client())
        .any_origin()
        .replay(Replay {
            rate: 1_000_000,
            ..Replay::default()
        })
        .build()
        .expect("a dispatcher");
    let mut application = connect(url).await;
    let transaction = application.transaction().await.expect("a transaction");
    for index in 0..RELAYED {
        let receiver = &receivers[index as usize % destinations];
        let request = Request::post(receiver.url("/hooks/relay"))
            .body(Bytes::from(format!(r#"{{"event":{index}}}"#)))
            .expect("a request");
        enqueue(
            &dispatcher,
            &transaction,
            &format!("relay-{index}"),
            request,
        )
        .await;
    }
    let committed = Instant::now();
    transaction.commit().await.expect("committed");
    let limit = Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < RELAYED && committed.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (committed.elapsed(), delivered.load(Ordering::Relaxed))
}
