//! The proof: every event's effect applied exactly once, end to end. A
//! receiver behind `IdempotencyLayer` (one replica on the memory store; two
//! replicas taking turns behind one port on one PostgreSQL table) loses the
//! reply to the first attempt of every event and to every fourth request
//! after, once it has committed; senders on one outbox file are killed with
//! SIGKILL at random instants and restarted on it. Many more attempts than
//! events reach the receiver; each event takes effect once.

#![cfg(all(feature = "idempotency", feature = "outbox", unix))]

mod exactly_once_support;
#[cfg(feature = "postgres")]
mod postgres_support;

use std::process::Command;

use tower::Layer;
use tower_terminal_retry::idempotency::{IdempotencyLayer, MemoryStore};

// One copy of the on-disk helpers, which the PostgreSQL helpers use too.
use exactly_once_support::outbox_support;
use exactly_once_support::{apply, run, sender, Effects, Random, Receiver, Run};
use outbox_support::{child_command, Scratch};

/// Selects the child's role; the rest of its orders come in these variables.
const ROLE: &str = "EXACTLY_ONCE_ROLE";
const URL: &str = "EXACTLY_ONCE_URL";
const FILE: &str = "EXACTLY_ONCE_FILE";
const EVENTS: &str = "EXACTLY_ONCE_EVENTS";

/// Senders killed in a run, and the events each creates.
const KILLS: usize = 5;
const PER_SENDER: usize = 8;

/// The entry point of every sender: does nothing in a normal test run.
#[test]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let var = |name| std::env::var(name).unwrap();
    sender(&role, &var(URL), var(FILE).as_ref(), &var(EVENTS));
}

/// A sender process on `scratch`'s outbox file, posting to `receiver`.
fn sender_command(receiver: &Receiver, scratch: &Scratch) -> impl Fn(&str, &str) -> Command {
    let (url, file) = (receiver.url(), scratch.file());
    move |role, events| {
        let mut command = child_command(None);
        command
            .env(ROLE, role)
            .env(URL, &url)
            .env(FILE, &file)
            .env(EVENTS, events);
        command
    }
}

fn assert_exactly_once(run: &Run, seed: u64) {
    assert!(
        run.drained,
        "seed {seed}: the last sender emptied its outbox: {run}"
    );
    assert!(
        run.missing.is_empty(),
        "seed {seed}: never applied {:?}",
        run.missing
    );
    assert!(
        run.duplicated.is_empty(),
        "seed {seed}: applied twice {:?}",
        run.duplicated
    );
    assert_eq!(run.effects, run.events as u64, "seed {seed}: {run}");
    assert!(
        run.events >= KILLS,
        "seed {seed}: most senders store something: {run}"
    );
    // The first reply of every event is lost: each took two attempts at
    // least, the second a replay of the kept response.
    assert!(run.attempts >= 2 * run.events as u64, "seed {seed}: {run}");
    assert!(run.replayed >= run.events as u64, "seed {seed}: {run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_takes_effect_once_on_one_receiver_with_the_memory_store() {
    let scratch = Scratch::new("exactly-once-memory");
    let effects = Effects::default();
    let replica = IdempotencyLayer::new(MemoryStore::new()).layer(apply(effects.clone()));
    let receiver = Receiver::start(vec![replica], effects).await;
    let mut random = Random::seeded();
    let seed = random.0;
    let command = sender_command(&receiver, &scratch);
    let run = run(&receiver, KILLS, PER_SENDER, &mut random, command).await;
    println!("memory store, one receiver: {run}");
    assert_exactly_once(&run, seed);
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_takes_effect_once_on_two_replicas_sharing_a_postgres_table() {
    use tower_terminal_retry::idempotency::PostgresStore;

    let Some(postgres) = postgres_support::postgres().await else {
        return;
    };
    let scratch = Scratch::new("exactly-once-postgres");
    let table = format!("exactly_once_{}", std::process::id());
    let effects = Effects::default();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let store = PostgresStore::connect(postgres.url(), &table)
            .await
            .unwrap();
        replicas.push(IdempotencyLayer::new(store).layer(apply(effects.clone())));
    }
    let receiver = Receiver::start(replicas, effects).await;
    let mut random = Random::seeded();
    let seed = random.0;
    let command = sender_command(&receiver, &scratch);
    let run = run(&receiver, KILLS, PER_SENDER, &mut random, command).await;
    println!("postgres store, two replicas: {run}");
    assert_exactly_once(&run, seed);
}
