//! Several processes on one queue of a shared outbox on a real PostgreSQL:
//! child processes (this test binary, run again in a child role) send
//! through dispatchers on the same queue, and are killed with SIGKILL,
//! stopped and continued; the database itself is restarted under them. A
//! loopback server in the parent sees every attempt: nothing stored is
//! lost, no record is ever in flight twice at once, a survivor takes over a
//! dead holder's records within `lease + replay_interval`, and a holder
//! whose lease ran out cannot undo the work of the one that took over.
//!
//! `POSTGRES_SOAK_KILLS=500 cargo test --all-features --test postgres_crash -- --nocapture`
//! runs a longer soak of the random kills.

#![cfg(all(feature = "postgres", unix))]

mod outbox_support;
mod postgres_support;
mod support;

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::Full;
use tower::util::MapRequest;
use tower_terminal_retry::{
    outbox::{Dispatcher, Durability, Outbox, Replay, IDEMPOTENCY_KEY},
    test_server::{RecordedRequest, Reply, TestServer},
    Recovery, Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

use outbox_support::{as_child, child_command, Random};
use postgres_support::{
    connect, emptied, http_client, postgres, postgres_alone, wait_for, Postgres,
};

/// Selects the child's role; the rest of its orders come in these variables.
const ROLE: &str = "POSTGRES_CRASH_ROLE";
const DATABASE_URL: &str = "POSTGRES_CRASH_DATABASE_URL";
const QUEUE: &str = "POSTGRES_CRASH_QUEUE";
const SERVER: &str = "POSTGRES_CRASH_SERVER";
/// The keys to send, comma-separated, one request each.
const KEYS: &str = "POSTGRES_CRASH_KEYS";
/// Between two sends, in milliseconds.
const PACE_MS: &str = "POSTGRES_CRASH_PACE_MS";
const LEASE_MS: &str = "POSTGRES_CRASH_LEASE_MS";
const INTERVAL_MS: &str = "POSTGRES_CRASH_INTERVAL_MS";
/// What the child says starts with this, amid the test harness's output.
const SAYS: &str = "child:";
/// Each attempt of a child carries its role here, so that the server knows
/// which process sent it.
const SENDER: HeaderName = HeaderName::from_static("x-sender");

/// The entry point of every child: does nothing in a normal test run. It
/// sends its keys, says what each became, and keeps replaying until killed.
#[test]
fn child() {
    as_child(ROLE, |role| async move {
        std::panic::set_hook(Box::new(|info| println!("{SAYS} panicked {info}")));
        let var = |name| std::env::var(name).unwrap();
        let millis = |name| Duration::from_millis(var(name).parse().unwrap());
        let outbox = Outbox::connect(&var(DATABASE_URL), &var(QUEUE))
            .await
            .unwrap();
        let sender = HeaderValue::from_str(&role).unwrap();
        let client = http_client();
        let service = MapRequest::new(client, move |mut request: Request<Full<Bytes>>| {
            request.headers_mut().insert(SENDER, sender.clone());
            request
        });
        let server = var(SERVER);
        // The foreground retries on the test's scale: with the default
        // schedule, a record answered 503 three times in a row once the
        // other traffic has ended (nothing releases its wait early) sits in
        // a 16 s backoff, held by its live sender, past the test's bounds.
        let schedule =
            Schedule::exponential(Duration::from_millis(100), 2.0, 5, Duration::MAX).unwrap();
        let layer = TerminalRetryLayer::new(
            TerminalRetryPolicy::default()
                .with_schedule(schedule)
                .with_recovery(Recovery::default()),
        );
        let dispatcher = Dispatcher::builder(outbox, service)
            .layer(layer)
            .origin(&server.parse().unwrap())
            .lease(millis(LEASE_MS))
            .replay(Replay {
                interval: millis(INTERVAL_MS),
                ..Replay::default()
            })
            .build()
            .unwrap();
        println!("{SAYS} ready");
        let pace = millis(PACE_MS);
        for key in var(KEYS).split(',').filter(|key| !key.is_empty()) {
            let request = Request::post(format!("{server}/hooks/{key}"))
                .body(Bytes::from(key.to_owned()))
                .unwrap();
            let mut dispatch = dispatcher.send(key, request);
            match dispatch.stored().await {
                Durability::Stored => println!("{SAYS} stored {key}"),
                other => println!("{SAYS} not-stored {key} {other:?}"),
            }
            let key = key.to_owned();
            tokio::spawn(async move { println!("{SAYS} done {key} {:?}", dispatch.await) });
            tokio::time::sleep(pace).await;
        }
        std::future::pending::<()>().await;
    });
}

/// A child process and what it has said so far (read by a thread of its
/// own, so that the test can wait for a line while the child runs).
struct Sender {
    child: Child,
    said: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

/// The settings of a child: its database, queue, server and timing.
struct Orders<'a> {
    postgres: &'a Postgres,
    queue: &'a str,
    server: &'a TestServer,
    lease: Duration,
    interval: Duration,
}

impl<'a> Orders<'a> {
    /// A lease of one second, a replay every `interval`.
    fn new(
        postgres: &'a Postgres,
        queue: &'a str,
        server: &'a TestServer,
        interval: Duration,
    ) -> Self {
        Orders {
            postgres,
            queue,
            server,
            lease: Duration::from_secs(1),
            interval,
        }
    }

    /// A child named `role` with nothing to send, once it says it is ready.
    async fn ready(&self, role: &str) -> Sender {
        let sender = self.spawn(role, &[], Duration::ZERO);
        assert!(
            sender
                .said(Duration::from_secs(10), |line| line == "ready")
                .await
        );
        sender
    }

    /// A child named `role` sending `keys`, one every `pace`.
    fn spawn(&self, role: &str, keys: &[String], pace: Duration) -> Sender {
        let mut child = child_command(None)
            .env(ROLE, role)
            .env(DATABASE_URL, self.postgres.url())
            .env(QUEUE, self.queue)
            .env(SERVER, self.server.url(""))
            .env(KEYS, keys.join(","))
            .env(PACE_MS, pace.as_millis().to_string())
            .env(LEASE_MS, self.lease.as_millis().to_string())
            .env(INTERVAL_MS, self.interval.as_millis().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let said = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let lines = said.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The harness may have started the line ("test child ... ").
                if let Some((_, line)) = line.split_once(SAYS) {
                    lines.lock().unwrap().push(line.trim().to_owned());
                }
            }
        });
        Sender {
            child,
            said,
            reader,
        }
    }
}

impl Sender {
    /// Waits, up to `limit`, until the child has said a line for which
    /// `wanted` holds.
    async fn said(&self, limit: Duration, wanted: impl Fn(&str) -> bool) -> bool {
        wait_for(limit, || self.lines().iter().any(|line| wanted(line))).await
    }

    fn lines(&self) -> Vec<String> {
        self.said.lock().unwrap().clone()
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`) to the child.
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    /// Kills the child with SIGKILL and returns all it said.
    fn kill(self) -> Vec<String> {
        let Sender {
            mut child,
            said,
            reader,
        } = self;
        child.kill().unwrap();
        child.wait().unwrap();
        // The reader ends with the pipe: what it read is all there is.
        reader.join().unwrap();
        let lines = said.lock().unwrap().clone();
        lines
    }
}

/// The key a request was sent under (its path is `/hooks/<key>`).
fn key_of(request: &RecordedRequest) -> String {
    request
        .uri
        .path()
        .strip_prefix("/hooks/")
        .unwrap_or_default()
        .to_owned()
}

fn sender_of(request: &RecordedRequest) -> String {
    request
        .headers
        .get(SENDER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// What the receiving server saw: each attempt's span (from its arrival to
/// its answer), per idempotency key, and the keys it took (a 2xx) and when.
#[derive(Default)]
struct Ledger {
    spans: HashMap<String, Vec<(Instant, Instant)>>,
    /// Attempts that arrived while another of the same record was in flight.
    overlaps: Vec<String>,
    delivered: HashMap<String, Instant>,
}

impl Ledger {
    /// Notes an attempt that takes `takes` and answers 2xx when `delivers`.
    fn note(&mut self, request: &RecordedRequest, takes: Duration, delivers: bool) {
        let now = Instant::now();
        let idempotency_key = request
            .headers
            .get(IDEMPOTENCY_KEY)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let spans = self.spans.entry(idempotency_key).or_default();
        if spans.iter().any(|&(_, end)| end > now) {
            self.overlaps.push(key_of(request));
        }
        spans.push((now, now + takes));
        if delivers {
            self.delivered.entry(key_of(request)).or_insert(now);
        }
    }

    /// Notes an attempt delivered after `takes`, and answers it so: 200.
    fn delivered_after(&mut self, request: &RecordedRequest, takes: Duration) -> Reply {
        self.note(request, takes, true);
        Reply::Delayed {
            after: takes,
            reply: Box::new(Reply::status(200)),
        }
    }
}

/// A server answering as `answer` does, with its ledger.
async fn receiver(
    answer: impl Fn(&RecordedRequest, &mut Ledger) -> Reply + Send + Sync + 'static,
) -> (TestServer, Arc<Mutex<Ledger>>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let shared = ledger.clone();
    let server = TestServer::start(move |request| answer(request, &mut shared.lock().unwrap()))
        .await
        .unwrap();
    (server, ledger)
}

/// Waits, up to `limit`, until the server has taken every one of `keys`.
async fn all_delivered<'k>(
    ledger: &Mutex<Ledger>,
    keys: impl IntoIterator<Item = &'k String> + Copy,
    limit: Duration,
) -> bool {
    wait_for(limit, || {
        let ledger = ledger.lock().unwrap();
        keys.into_iter()
            .all(|key| ledger.delivered.contains_key(key))
    })
    .await
}

fn keys(prefix: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|index| format!("{prefix}-{index}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_killed_at_random_lose_nothing_and_never_send_one_record_twice_at_once() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("kills");
    let mut random = Random::seeded();
    let seed = random.0;
    let answers = Mutex::new(Random(seed ^ 0x9E37_79B9));
    // A quarter of the attempts fail at once (503); the others take 40 ms.
    let (server, ledger) = receiver(move |request, ledger| {
        if answers.lock().unwrap().below(4) == 0 {
            ledger.note(request, Duration::ZERO, false);
            return Reply::status(503);
        }
        ledger.delivered_after(request, Duration::from_millis(40))
    })
    .await;
    let orders = Orders::new(&postgres, &queue, &server, Duration::from_millis(200));
    // Kills land while a child connects, stores, sends or replays.
    let pace = Duration::from_millis(25);
    let mut stored = BTreeSet::new();
    let mut senders: Vec<Sender> = (0..3)
        .map(|slot| orders.spawn(&format!("s{slot}"), &keys(&format!("first{slot}"), 8), pace))
        .collect();
    let rounds: usize = std::env::var("POSTGRES_SOAK_KILLS")
        .ok()
        .and_then(|kills| kills.parse().ok())
        .unwrap_or(12);
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(50 + random.below(300))).await;
        let slot = random.below(3) as usize;
        let killed = std::mem::replace(
            &mut senders[slot],
            orders.spawn(&format!("r{round}"), &keys(&format!("r{round}"), 8), pace),
        );
        for line in killed.kill() {
            assert!(!line.starts_with("panicked"), "seed {seed}: {line}");
            if let Some(key) = line.strip_prefix("stored ") {
                stored.insert(key.to_owned());
            }
        }
    }
    // The last three run on: they deliver what the killed ones left.
    let reached: BTreeSet<String> = server.requests().iter().map(key_of).collect();
    let owed: BTreeSet<String> = stored.union(&reached).cloned().collect();
    let last_kill = Instant::now();
    let delivered = all_delivered(&ledger, &owed, Duration::from_secs(20)).await;
    if !delivered {
        // What the server saw of each record still owed, since the last kill.
        let ledger = ledger.lock().unwrap();
        for key in owed
            .iter()
            .filter(|key| !ledger.delivered.contains_key(*key))
        {
            let attempts: Vec<(String, i128)> = server
                .requests()
                .iter()
                .filter(|request| key_of(request) == *key)
                .map(|request| {
                    let at = request.at.into_std();
                    let millis = if at > last_kill {
                        (at - last_kill).as_millis() as i128
                    } else {
                        -((last_kill - at).as_millis() as i128)
                    };
                    (sender_of(request), millis)
                })
                .collect();
            println!("seed {seed}: {key} not yet delivered; attempts (sender, ms): {attempts:?}");
        }
    }
    let outbox = connect(&postgres, &queue).await;
    let drained = emptied(&outbox, Duration::from_secs(20)).await;
    for sender in senders {
        let lines = sender.kill();
        assert!(
            lines.iter().all(|line| !line.starts_with("panicked")),
            "seed {seed}: {lines:?}"
        );
    }
    let ledger = ledger.lock().unwrap();
    let lost: Vec<&String> = owed
        .iter()
        .filter(|key| !ledger.delivered.contains_key(*key))
        .collect();
    println!(
        "{rounds} kills (seed {seed}): {} stored before a kill, {} reached the server, \
         {} attempts, {} lost, {} overlapping",
        stored.len(),
        reached.len(),
        server.requests().len(),
        lost.len(),
        ledger.overlaps.len()
    );
    assert!(delivered && lost.is_empty(), "seed {seed}: lost {lost:?}");
    assert!(
        ledger.overlaps.is_empty(),
        "seed {seed}: {:?}",
        ledger.overlaps
    );
    assert!(drained, "seed {seed}: {:?}", outbox.pending());
    assert!(
        stored.len() >= rounds,
        "seed {seed}: most kills come after a store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_takes_over_the_records_of_a_killed_holder_within_lease_and_interval() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("takeover");
    // The holder's attempts hang; once it is killed, the server answers.
    let answering = Arc::new(AtomicBool::new(false));
    let answers = answering.clone();
    let (server, ledger) = receiver(move |request, ledger| {
        if answers.load(Ordering::SeqCst) {
            ledger.note(request, Duration::ZERO, true);
            Reply::status(200)
        } else {
            ledger.note(request, Duration::from_secs(3600), false);
            Reply::Hang
        }
    })
    .await;
    let orders = Orders::new(&postgres, &queue, &server, Duration::from_millis(500));
    let (lease, interval) = (orders.lease, orders.interval);
    let survivor = orders.ready("survivor").await;
    let held = keys("held", 5);
    let holder = orders.spawn("holder", &held, Duration::ZERO);
    // Each record is stored, claimed and in flight from the holder.
    let attempted = wait_for(Duration::from_secs(10), || {
        let reached: BTreeSet<String> = server.requests().iter().map(key_of).collect();
        held.iter().all(|key| reached.contains(key))
    })
    .await;
    assert!(attempted, "{:?}", server.requests());
    assert!(
        server
            .requests()
            .iter()
            .all(|request| sender_of(request) == "holder"),
        "only the holder sends what it holds"
    );
    answering.store(true, Ordering::SeqCst);
    let killed_at = Instant::now();
    let lines = holder.kill();
    let delivered = all_delivered(&ledger, &held, Duration::from_secs(10)).await;
    assert!(delivered, "{lines:?}");
    let takeover = {
        let ledger = ledger.lock().unwrap();
        held.iter()
            .map(|key| ledger.delivered[key] - killed_at)
            .max()
            .unwrap()
    };
    let takers: BTreeSet<String> = server
        .requests()
        .iter()
        .filter(|request| sender_of(request) != "holder")
        .map(sender_of)
        .collect();
    println!(
        "kill -9 to takeover of {} records: {takeover:?} (lease {lease:?}, interval {interval:?})",
        held.len()
    );
    // Some slack for a loaded machine: starting the attempts, the answers.
    assert!(
        takeover <= lease + interval + Duration::from_millis(500),
        "{takeover:?}"
    );
    assert_eq!(takers, BTreeSet::from(["survivor".to_owned()]));
    // The survivor sends each record under the key the holder stored.
    for key in &held {
        let idempotency_keys: BTreeSet<HeaderValue> = server
            .requests()
            .iter()
            .filter(|request| key_of(request) == *key)
            .map(|request| request.headers[IDEMPOTENCY_KEY].clone())
            .collect();
        assert_eq!(idempotency_keys.len(), 1, "{key}: {idempotency_keys:?}");
    }
    let outbox = connect(&postgres, &queue).await;
    assert!(emptied(&outbox, Duration::from_secs(10)).await);
    survivor.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_ran_out_cannot_undo_the_work_of_the_one_that_took_over() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("fencing");
    // The first attempt (the old holder's) is refused for good (422), late;
    // the next fail (503) until the test lets them through.
    let through = Arc::new(AtomicBool::new(false));
    let lets = through.clone();
    let first_seen = AtomicBool::new(false);
    let (server, ledger) = receiver(move |request, ledger| {
        if !first_seen.swap(true, Ordering::SeqCst) {
            let takes = Duration::from_millis(1500);
            ledger.note(request, takes, false);
            return Reply::Delayed {
                after: takes,
                reply: Box::new(support::text_reply(422, "refused too late")),
            };
        }
        let delivers = lets.load(Ordering::SeqCst);
        ledger.note(request, Duration::ZERO, delivers);
        Reply::status(if delivers { 200 } else { 503 })
    })
    .await;
    let orders = Orders::new(&postgres, &queue, &server, Duration::from_millis(300));
    let new = orders.ready("new").await;
    let old = orders.spawn("old", &["fenced".to_owned()], Duration::ZERO);
    let sent_by = |sender: &str| {
        server
            .requests()
            .iter()
            .any(|request| sender_of(request) == sender)
    };
    assert!(wait_for(Duration::from_secs(10), || sent_by("old")).await);
    // The old holder hangs, alive, while its lease runs out.
    old.signal("STOP");
    let taken_over = wait_for(Duration::from_secs(10), || sent_by("new")).await;
    old.signal("CONT");
    assert!(taken_over, "{:?}", server.requests());
    // Its attempt comes back refused for good: it would quarantine the
    // record, were its claim still current.
    assert!(
        old.said(Duration::from_secs(10), |line| line
            .starts_with("done fenced"))
            .await,
        "{:?}",
        old.lines()
    );
    let outbox = connect(&postgres, &queue).await;
    assert!(
        outbox.quarantined().unwrap().is_empty(),
        "the old holder's quarantine applied"
    );
    let pending = outbox.pending().unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    let failure = pending[0].last_failure.clone().unwrap_or_default();
    assert!(
        failure.contains("503"),
        "the new holder's failure stands: {failure}"
    );
    assert!(
        !failure.contains("422"),
        "the old holder's failure applied: {failure}"
    );
    through.store(true, Ordering::SeqCst);
    let delivered = wait_for(Duration::from_secs(10), || {
        ledger.lock().unwrap().delivered.contains_key("fenced")
    })
    .await;
    let senders: Vec<String> = server.requests().iter().map(sender_of).collect();
    assert!(
        delivered,
        "attempts by {senders:?}; pending {:?}; the new holder said {:?}",
        outbox.pending(),
        new.lines()
    );
    assert!(emptied(&outbox, Duration::from_secs(10)).await);
    let old_said = old.kill();
    new.kill();
    // The old holder's attempt was still in flight when the new holder's
    // began: what fencing is for.
    println!("the old holder said {old_said:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_committed_wakes_a_dispatcher_at_once_and_one_rolled_back_never_exists() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("enqueue");
    let (server, ledger) = receiver(|request, ledger| {
        ledger.note(request, Duration::ZERO, true);
        Reply::status(200)
    })
    .await;
    // Polling every 30 s: only the notification explains a prompt delivery.
    let interval = Duration::from_secs(30);
    let orders = Orders::new(&postgres, &queue, &server, interval);
    let dispatcher = orders.ready("dispatcher").await;
    let outbox = connect(&postgres, &queue).await;
    let mut client = postgres.client().await;
    let event = |key: &str| {
        Request::post(server.url(&format!("/hooks/{key}")))
            .body(Bytes::from(format!("{{\"event\":\"{key}\"}}")))
            .unwrap()
    };
    let delivered = |key: &'static str| {
        let ledger = ledger.clone();
        move || ledger.lock().unwrap().delivered.contains_key(key)
    };

    // A first one, in case the child's listener was not yet in place.
    let transaction = client.transaction().await.unwrap();
    outbox
        .enqueue(&transaction, "warm-up", event("warm-up"))
        .await
        .unwrap();
    transaction.commit().await.unwrap();
    assert!(wait_for(Duration::from_secs(40), delivered("warm-up")).await);

    let transaction = client.transaction().await.unwrap();
    outbox
        .enqueue(&transaction, "rolled-back", event("rolled-back"))
        .await
        .unwrap();
    transaction.rollback().await.unwrap();

    let transaction = client.transaction().await.unwrap();
    outbox
        .enqueue(&transaction, "committed", event("committed"))
        .await
        .unwrap();
    transaction.commit().await.unwrap();
    let committed_at = Instant::now();
    assert!(wait_for(Duration::from_secs(10), delivered("committed")).await);
    let first_attempt = ledger.lock().unwrap().delivered["committed"] - committed_at;
    println!("enqueue: commit to first attempt {first_attempt:?} (polling every {interval:?})");
    assert!(first_attempt < Duration::from_secs(2), "{first_attempt:?}");

    assert!(emptied(&outbox, Duration::from_secs(10)).await);
    let keys: BTreeSet<String> = server.requests().iter().map(key_of).collect();
    assert!(!keys.contains("rolled-back"), "{keys:?}");
    dispatcher.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restarted_mid_run_loses_nothing_and_the_sender_reconnects() {
    let Some(postgres) = postgres_alone().await else {
        return;
    };
    if postgres.data_directory().is_none() {
        println!("skipped: the server DATABASE_URL names is not ours to restart");
        return;
    }
    let queue = postgres.queue("restart");
    let (server, ledger) =
        receiver(|request, ledger| ledger.delivered_after(request, Duration::from_millis(10)))
            .await;
    let orders = Orders::new(&postgres, &queue, &server, Duration::from_millis(200));
    let sent = keys("restart", 60);
    let sender = orders.spawn("sender", &sent, Duration::from_millis(50));
    let some_delivered = wait_for(Duration::from_secs(10), || {
        ledger.lock().unwrap().delivered.len() >= 10
    })
    .await;
    assert!(some_delivered, "{:?}", sender.lines());
    let restarting = Instant::now();
    assert!(postgres.restart());
    println!("database restarted in {:?}", restarting.elapsed());
    let last = sent.last().unwrap().clone();
    assert!(
        sender
            .said(Duration::from_secs(20), |line| line
                .strip_prefix("done ")
                .is_some_and(|done| done.starts_with(&format!("{last} "))))
            .await,
        "{:?}",
        sender.lines()
    );
    let all_delivered = all_delivered(&ledger, &sent, Duration::from_secs(20)).await;
    let outbox = connect(&postgres, &queue).await;
    let drained = emptied(&outbox, Duration::from_secs(20)).await;
    let lines = sender.kill();
    let not_stored: Vec<&String> = lines
        .iter()
        .filter(|line| line.starts_with("not-stored"))
        .collect();
    println!("while the database restarted: {not_stored:?}");
    assert!(
        lines.iter().all(|line| !line.starts_with("panicked")),
        "{lines:?}"
    );
    assert!(all_delivered, "{lines:?}");
    assert!(drained, "{:?}", outbox.pending());
    // Reconnected: the last request, sent well after the restart, is stored.
    assert!(lines.contains(&format!("stored {last}")), "{lines:?}");
    assert!(ledger.lock().unwrap().overlaps.is_empty());
}
