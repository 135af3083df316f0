//! A webhook sender that survives a restart: the outbox without the task
//! client, over a tower stack of its own.
//!
//! ```text
//! cargo run --example webhooks
//! ```
//!
//! The receiver is down while the first sender stores ten events and tries
//! them; the sender then stops without shutdown (its runtime is dropped). A
//! second sender on the same outbox file finds the events pending and, once
//! the receiver is up, delivers every one, each with the `Idempotency-Key` it
//! was stored with, so that the receiver can tell a replay from a new event.

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
    outbox::{Delivery, Dispatcher, Durability, Outbox},
    test_server::{Reply, TestServer},
    Schedule, TerminalRetryLayer,
};

const EVENTS: usize = 10;

/// One attempt: hyper-util's client under a timeout.
type Stack = tower::timeout::Timeout<Client<HttpConnector, Full<Bytes>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let directory = std::env::temp_dir().join(format!("webhooks-example-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let file = directory.join("webhooks.redb");

    // The receiver runs beside both senders; it answers 503 until it is up.
    let receiver_runtime = tokio::runtime::Runtime::new()?;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = receiver_runtime.block_on(TestServer::start({
        let up = up.clone();
        move |_| match up.load(std::sync::atomic::Ordering::SeqCst) {
            true => Reply::status(204),
            false => Reply::status(503),
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
        let pending = dispatcher.outbox().pending()?;
        println!("sender 2: finds {} events pending", pending.len());
        up.store(true, std::sync::atomic::Ordering::SeqCst);
        println!("sender 2: the receiver is up");
        for _ in 0..200 {
            if dispatcher.outbox().pending()?.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "sender 2: {} events left in the outbox",
            dispatcher.outbox().pending()?.len()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;

    // What the receiver saw: every event, each with one key across all its
    // attempts, the first sender's and the second's.
    let mut keys = BTreeMap::<String, Vec<String>>::new();
    for request in receiver.requests() {
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let key = request.headers["idempotency-key"].to_str()?.to_owned();
        keys.entry(body).or_default().push(key);
    }
    let one_key_each = keys
        .values()
        .all(|keys| keys.iter().all(|key| key == &keys[0]));
    println!(
        "\nsummary: events={EVENTS} received={} attempts={} one_key_per_event={one_key_each}",
        keys.len(),
        receiver.requests().len()
    );
    std::fs::remove_dir_all(&directory)?;
    Ok(())
}

/// A sender over its own stack: hyper-util's client under a per-attempt
/// timeout; the dispatcher adds the terminal layer (short retries here) and
/// replays, probing every second at most while the receiver is down.
fn sender(file: &std::path::Path) -> Result<Dispatcher<Stack>, Box<dyn std::error::Error>> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let stack = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .service(client);
    let layer =
        TerminalRetryLayer::new().with_schedule(Schedule::new([Duration::from_millis(100); 2])?);
    let dispatcher = Dispatcher::builder(Outbox::open(file)?, stack)
        .layer(layer)
        .replay_interval(Duration::from_secs(1))
        .build()?;
    Ok(dispatcher)
}

fn event(url: &str, order: usize) -> Result<Request<Bytes>, http::Error> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Bytes::from(format!(
            r#"{{"event":"order.paid","order":{order}}}"#
        )))
}
