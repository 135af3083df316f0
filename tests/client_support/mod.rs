//! Helpers shared by the client tests.

#![allow(dead_code)] // Each test file uses its own share of them.

use std::{
    io::{self, Write},
    sync::{Arc, Mutex},
    time::Duration,
};

use tower_terminal_retry::{
    client::TaskClient,
    test_server::{Action, TaskServer},
    Recovery, Schedule, TerminalRetryPolicy,
};

/// A task server holding `task_ids`, all queued.
pub async fn server_with(task_ids: &[&str]) -> TaskServer {
    let server = TaskServer::start().await.expect("a loopback port");
    server.add_tasks(task_ids.iter().copied());
    server
}

/// A client of `server` with `delays` (in seconds) as its terminal schedule and
/// a 5 s per-attempt timeout.
pub fn client(server: &TaskServer, delays: &[u64]) -> TaskClient {
    TaskClient::builder(server.url())
        .policy(policy(delays))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a valid client")
}

/// The client's default policy (early release on) with `delays` (in
/// seconds) as its schedule.
pub fn policy(delays: &[u64]) -> TerminalRetryPolicy {
    TerminalRetryPolicy::default()
        .with_schedule(schedule(delays))
        .with_recovery(Recovery::default())
}

pub fn schedule(delays: &[u64]) -> Schedule {
    Schedule::new(delays.iter().map(|&secs| Duration::from_secs(secs))).expect("a valid schedule")
}

/// How many times `task_id` called `complete` and `fail`.
pub fn terminal_calls(server: &TaskServer, task_id: &str) -> (usize, usize) {
    let attempts = server.attempts();
    let calls = |action| {
        let of_task = attempts.iter().filter(|attempt| attempt.task_id == task_id);
        of_task.filter(|attempt| attempt.action == action).count()
    };
    (calls(Action::Complete), calls(Action::Fail))
}

/// Formatted `tracing` events, captured while a guard from [`capture`] lives
/// (on this thread, which a current-thread runtime's tasks share).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        // No timestamps: a digit of one is never taken for a status.
        .without_time()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}
