//! Exactly once, end to end: a durable sender and an idempotent receiver,
//! over a network that loses replies and senders that are killed.
//!
//! ```text
//! cargo run --example exactly_once
//! cargo run --example exactly_once -- --no-idempotency
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --example exactly_once -- --postgres
//! ```
//!
//! The receiver's handler applies each event (a counter per event) behind
//! `IdempotencyLayer` with the memory store. In front of it, the network
//! loses the reply to the first attempt of every event, and to every fourth
//! request after, once the receiver has answered. Senders keep their events
//! in one outbox file: five of them in turn each create eight events and are
//! killed with SIGKILL at a random instant; a sixth delivers what they left.
//! The summary counts the events, the effects the receiver applied, and the
//! attempts it saw.
//!
//! `--no-idempotency` runs the same without the layer: every attempt takes
//! effect. `--postgres` runs two receiver replicas taking turns behind one
//! port, their keys in one table of the database `DATABASE_URL` names.

#[path = "../tests/exactly_once_support/mod.rs"]
mod exactly_once_support;

use std::{error::Error, path::Path, process::Command};

use tower::Layer;
use tower_terminal_retry::idempotency::{IdempotencyLayer, MemoryStore, PostgresStore};

use exactly_once_support::{apply, run, sender, Effects, Random, Receiver, Run};

const KILLS: usize = 5;
const PER_SENDER: usize = 8;

enum Mode {
    Memory,
    Bare,
    Postgres(String),
}

fn main() -> Result<(), Box<dyn Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => receive(Mode::Memory),
        ["--no-idempotency"] => receive(Mode::Bare),
        ["--postgres"] => {
            let url = std::env::var("DATABASE_URL").map_err(|_| {
                "--postgres needs DATABASE_URL, such as postgres://postgres@127.0.0.1:5432/postgres"
            })?;
            receive(Mode::Postgres(url))
        }
        ["--sender", role, url, file, events] => {
            sender(role, url, Path::new(file), events);
            Ok(())
        }
        _ => Err("usage: exactly_once [--no-idempotency | --postgres]".into()),
    }
}

fn receive(mode: Mode) -> Result<(), Box<dyn Error>> {
    let directory = std::env::temp_dir().join(format!("exactly-once-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let file = directory.join("events.redb");
    let runtime = tokio::runtime::Runtime::new()?;
    let run = runtime.block_on(async {
        let effects = Effects::default();
        let receiver = match &mode {
            Mode::Memory => {
                println!("receiver: one replica, IdempotencyLayer on the memory store");
                let layer = IdempotencyLayer::new(MemoryStore::new());
                Receiver::start(vec![layer.layer(apply(effects.clone()))], effects).await
            }
            Mode::Bare => {
                println!("receiver: one replica, no idempotency layer");
                Receiver::start(vec![apply(effects.clone())], effects).await
            }
            Mode::Postgres(url) => {
                println!(
                    "receiver: two replicas taking turns, IdempotencyLayer on one PostgreSQL table"
                );
                let table = format!("exactly_once_example_{}", std::process::id());
                let mut replicas = Vec::new();
                for _ in 0..2 {
                    let store = PostgresStore::connect(url, &table).await?;
                    replicas.push(IdempotencyLayer::new(store).layer(apply(effects.clone())));
                }
                Receiver::start(replicas, effects).await
            }
        };
        println!(
            "network: the reply to each event's first attempt is lost after the receiver \
             answered, and to every fourth request after"
        );
        println!(
            "senders: {KILLS} in turn on one outbox file, each creating {PER_SENDER} events, \
             killed (SIGKILL) at a random instant; then one that delivers what they left\n"
        );
        let (url, program) = (receiver.url(), std::env::current_exe()?);
        let command = |role: &str, events: &str| {
            let mut command = Command::new(&program);
            command
                .args(["--sender", role, &url])
                .arg(&file)
                .arg(events);
            command
        };
        let run = run(&receiver, KILLS, PER_SENDER, &mut Random::seeded(), command).await;
        Ok::<Run, Box<dyn Error>>(run)
    })?;
    let store = match mode {
        Mode::Memory => "store=memory replicas=1",
        Mode::Bare => "store=none replicas=1",
        Mode::Postgres(_) => "store=postgres replicas=2",
    };
    println!("summary: {store} {run}");
    if run.effects == run.events as u64 {
        println!(
            "every event took effect exactly once, over {} attempts",
            run.attempts
        );
    } else {
        println!(
            "{} of {} events took effect more than once: a retry is only safe when the receiver \
             treats a repeat as a repeat",
            run.duplicated.len(),
            run.events
        );
    }
    std::fs::remove_dir_all(&directory)?;
    Ok(())
}
