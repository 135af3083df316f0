//! The dispatcher and its replay, hardened: only a 2xx is delivered; the
//! replay keeps to its rate, honours `Retry-After` between probes, and reads
//! a record again before sending it; a store that cannot record a delivery
//! does not have it sent again and again; attempt counts saturate; requests
//! go to one origin only, never with credentials in their URI, and secrets
//! are redacted from whatever the server sends back. Real loopback servers,
//! real files, tokio's paused clock where time matters.

#![cfg(feature = "outbox")]

mod outbox_support;
mod support;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use redb::ReadableTable;
use tokio::time::Instant;
use tower_terminal_retry::{
    outbox::{
        Delivery, Dispatch, Dispatcher, DispatcherBuilder, Durability, Entry, Outbox, Replay,
    },
    test_server::{Reply, TestServer},
    ConfigError, RetryAfter, TerminalRetryLayer, TerminalRetryPolicy,
};

use outbox_support::{as_child, child_command, Scratch};
use support::HttpClient;

/// A layer that makes one attempt: what is not delivered at once is queued.
fn one_attempt() -> TerminalRetryLayer {
    TerminalRetryLayer::new(one_attempt_policy())
}

/// The policy of [`one_attempt`], for a layer with more settings.
fn one_attempt_policy() -> TerminalRetryPolicy {
    TerminalRetryPolicy::default().with_schedule(support::schedule(&[]))
}

/// A dispatcher on a fresh outbox at `file`, over the loopback client, one
/// attempt per foreground call.
fn dispatcher(file: &Path) -> DispatcherBuilder<HttpClient> {
    let outbox = Outbox::open(file).unwrap();
    Dispatcher::builder(outbox, support::client()).layer(one_attempt())
}

/// A server that answers `down` until the switch it returns is turned on,
/// then `up`: an outage that ends when the test says so.
async fn switched(up: Reply, down: Reply) -> (Arc<AtomicBool>, TestServer) {
    let on = Arc::new(AtomicBool::new(false));
    let server = TestServer::start({
        let on = on.clone();
        move |_| match on.load(Ordering::SeqCst) {
            true => up.clone(),
            false => down.clone(),
        }
    })
    .await
    .unwrap();
    (on, server)
}

/// [`dispatcher`], built, replaying every `interval`.
fn replaying(file: &Path, interval: Duration) -> Dispatcher<HttpClient> {
    dispatcher(file)
        .replay(Replay {
            interval,
            ..Replay::default()
        })
        .build()
        .unwrap()
}

/// Sends `count` requests, `r{index}` to `/r/{index}`, one after another,
/// while `server` is down: each is queued.
async fn queue(dispatcher: &Dispatcher<HttpClient>, server: &TestServer, count: usize) {
    for index in 0..count {
        let delivery = dispatcher
            .send(
                format!("r{index}"),
                post(server.url(&format!("/r/{index}"))),
            )
            .await;
        assert_eq!(delivery, Delivery::Queued);
    }
}

/// Opens `file` once the outbox that held it is gone.
async fn reopen(file: &Path) -> Outbox {
    for _ in 0..500 {
        match Outbox::open(file) {
            Ok(outbox) => return outbox,
            Err(error) => assert_eq!(
                error.kind(),
                tower_terminal_retry::outbox::OutboxErrorKind::Locked,
                "{error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} stays locked", file.display());
}

fn post(url: impl AsRef<str>) -> Request<Bytes> {
    Request::post(url.as_ref())
        .header("content-type", "application/json")
        .body(Bytes::from_static(b"{}"))
        .unwrap()
}

/// Waits on tokio's clock, a quarter second at a time, until `done` or
/// `limit`.
async fn wait_for(limit: Duration, done: impl FnMut() -> bool) -> bool {
    outbox_support::wait_every(Duration::from_millis(250), limit, done).await
}

/// Waits on tokio's clock until nothing is pending in `outbox`.
async fn drained(outbox: &Outbox, limit: Duration) -> bool {
    wait_for(limit, || outbox.pending().unwrap().is_empty()).await
}

/// Every event, as text, while installed on this thread (the paused-clock
/// tests run every task on it).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            // No timestamps: a digit of one is never taken for a status.
            .without_time()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().map(str::to_owned).collect()
    }
}

/// The failure stored with the first of `entries`.
fn first_failure(entries: Vec<Entry>) -> String {
    entries[0].last_failure.as_deref().unwrap().to_owned()
}

/// Waits on tokio's clock until one record is quarantined in `outbox`.
async fn one_quarantined(outbox: &Outbox) -> bool {
    wait_for(Duration::from_secs(10), || {
        outbox.quarantined().unwrap().len() == 1
    })
    .await
}

/// Asserts that a line was logged that `logged` accepts.
fn assert_logged(capture: &Capture, logged: impl Fn(&str) -> bool) {
    let lines = capture.lines();
    assert!(lines.iter().any(|line| logged(line)), "{lines:#?}");
}

/// Asserts that `dispatch` was refused before it was stored, for good;
/// returns why.
async fn refused(mut dispatch: Dispatch) -> String {
    assert_eq!(dispatch.stored().await, Durability::Refused);
    let Delivery::Undelivered { transient, failure } = dispatch.await else {
        panic!("refused");
    };
    assert!(!transient);
    failure
}

/// The paths a server was sent, in order.
fn paths(server: &TestServer) -> Vec<String> {
    let requests = server.requests();
    requests.iter().map(|r| r.uri.path().to_owned()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_redirect_is_refused_for_good_naming_its_location_and_never_removed_as_delivered() {
    let scratch = Scratch::new("redirect");
    let moved = Response::builder()
        .status(StatusCode::MOVED_PERMANENTLY)
        .header("location", "https://callbacks.test/hooks/r1")
        .body(Full::default())
        .unwrap();
    let server = TestServer::start(move |_| Reply::Respond(moved.clone()))
        .await
        .unwrap();
    let dispatcher = dispatcher(&scratch.file()).build().unwrap();

    let delivery = dispatcher.send("r1", post(server.url("/hooks/r1"))).await;
    assert_eq!(delivery, Delivery::Quarantined);
    let outbox = dispatcher.outbox().unwrap();
    assert!(outbox.pending().unwrap().is_empty());
    let quarantined = outbox.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1, "kept, not removed as delivered");
    let failure = quarantined[0].last_failure.as_deref().unwrap();
    assert!(failure.contains("301"), "{failure}");
    assert!(
        failure.contains("https://callbacks.test/hooks/r1"),
        "{failure}"
    );
    assert!(failure.contains("not followed"), "{failure}");
    // Neither followed nor replayed.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(paths(&server), ["/hooks/r1"]);
}

/// The most of `times` within any one second.
fn busiest_second(mut times: Vec<Instant>) -> usize {
    times.sort();
    let mut busiest = 0;
    let mut first = 0;
    for (last, at) in times.iter().enumerate() {
        while *at - times[first] >= Duration::from_secs(1) {
            first += 1;
        }
        busiest = busiest.max(last + 1 - first);
    }
    busiest
}

#[tokio::test(start_paused = true)]
async fn six_hundred_stored_requests_are_replayed_at_the_replay_rate() {
    assert_eq!(Replay::default().rate, 100);
    let scratch = Scratch::new("rate");
    let (up, server) = switched(Reply::status(200), Reply::status(503)).await;
    let dispatcher = replaying(&scratch.file(), Duration::from_secs(5));
    let sends: Vec<_> = (0..600)
        .map(|index| {
            dispatcher.send(
                format!("r{index}"),
                post(server.url(&format!("/r/{index}"))),
            )
        })
        .collect();
    for send in sends {
        assert_eq!(send.await, Delivery::Queued);
    }

    up.store(true, Ordering::SeqCst);
    let before = server.requests().len();
    let outbox = dispatcher.outbox().unwrap();
    assert!(drained(outbox, Duration::from_secs(60)).await);
    let replayed: Vec<Instant> = server.requests()[before..]
        .iter()
        .map(|request| request.at)
        .collect();
    assert_eq!(replayed.len(), 600);
    let busiest = busiest_second(replayed.clone());
    // The rate, give or take the default replay concurrency (16).
    let most = Replay::default().rate as usize + 16;
    assert!(busiest <= most, "{busiest} requests in one second");
    // Paced, not slowed down further: 600 at 100 a second take about 6 s.
    let span = *replayed.iter().max().unwrap() - *replayed.iter().min().unwrap();
    assert!(span >= Duration::from_secs(5), "{span:?}");
    assert!(span <= Duration::from_secs(8), "{span:?}");
}

#[tokio::test]
async fn a_replay_rate_of_zero_is_refused() {
    let scratch = Scratch::new("zero-rate");
    let error = dispatcher(&scratch.file())
        .replay(Replay {
            rate: 0,
            ..Replay::default()
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("rate"), "{error}");
}

#[tokio::test]
async fn a_per_destination_concurrency_or_give_up_after_of_zero_is_refused() {
    let scratch = Scratch::new("zero-lanes");
    let slots = dispatcher(&scratch.path("slots.redb"))
        .per_destination_concurrency(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(slots, ConfigError::InvalidSetting { .. }),
        "{slots}"
    );
    assert!(slots.to_string().contains("per-destination"), "{slots}");
    let give_up = dispatcher(&scratch.path("give-up.redb"))
        .give_up_after(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(
        matches!(give_up, ConfigError::InvalidSetting { .. }),
        "{give_up}"
    );
    assert!(give_up.to_string().contains("give_up_after"), "{give_up}");
}

/// When each request reached a server answering 503 with `Retry-After:
/// value` for `outage`, sent by a dispatcher with `layer` and a replay
/// interval of 1 s; then the server is back and takes the request.
async fn attempts_told_to_retry_after(
    name: &str,
    value: &'static str,
    layer: TerminalRetryLayer,
    outage: Duration,
) -> Vec<Duration> {
    let scratch = Scratch::new(name);
    let (up, server) = switched(Reply::status(200), support::retry_after_reply(503, value)).await;
    let dispatcher = Dispatcher::builder(Outbox::open(scratch.file()).unwrap(), support::client())
        .layer(layer)
        .replay(Replay {
            interval: Duration::from_secs(1),
            ..Replay::default()
        })
        .build()
        .unwrap();
    let start = Instant::now();
    let delivery = dispatcher.send("r1", post(server.url("/r/1"))).await;
    assert_eq!(delivery, Delivery::Queued);
    tokio::time::sleep_until(start + outage).await;
    let during: Vec<Duration> = server
        .requests()
        .iter()
        .map(|request| request.at - start)
        .collect();
    up.store(true, Ordering::SeqCst);
    let outbox = dispatcher.outbox().unwrap();
    assert!(drained(outbox, Duration::from_secs(400)).await);
    during
}

fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn a_probe_told_to_retry_after_two_seconds_waits_that_long_before_the_next() {
    let outage = Duration::from_secs(20);
    let times = attempts_told_to_retry_after("retry-after", "2", one_attempt(), outage).await;
    // The foreground's attempt, then probes: a handful, not one a jitter.
    assert!(times.len() >= 4 && times.len() <= 11, "{times:?}");
    for gap in gaps(&times) {
        assert!(gap >= Duration::from_secs(2), "{times:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_layers_cap_waits_for_the_cap_only() {
    let capped = TerminalRetryLayer::new(
        one_attempt_policy()
            .with_retry_after(RetryAfter::honor_up_to(Duration::from_secs(5)).unwrap()),
    );
    let outage = Duration::from_secs(40);
    let times = attempts_told_to_retry_after("retry-after-cap", "3600", capped, outage).await;
    assert!(times.len() >= 4, "not an hour between probes: {times:?}");
    for gap in gaps(&times) {
        assert!(gap >= Duration::from_secs(5), "{times:?}");
        // The cap, then a probe delay of at most the 1 s interval.
        assert!(gap <= Duration::from_millis(6_500), "{times:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_record_delivered_in_the_foreground_after_the_replay_read_it_is_not_sent_again() {
    let scratch = Scratch::new("reread");
    let up = Arc::new(AtomicBool::new(false));
    let server = TestServer::start({
        let up = up.clone();
        move |request| {
            if request.uri.path() == "/x" {
                // In flight for a while: the replay reads its page meanwhile.
                return Reply::Delayed {
                    after: Duration::from_secs(6),
                    reply: Box::new(Reply::status(200)),
                };
            }
            match up.load(Ordering::SeqCst) {
                // Slow replays: the replay reaches the last record late.
                true => Reply::Delayed {
                    after: Duration::from_secs(2),
                    reply: Box::new(Reply::status(200)),
                },
                false => Reply::status(502),
            }
        }
    })
    .await
    .unwrap();
    let dispatcher = dispatcher(&scratch.file())
        .replay(Replay {
            interval: Duration::from_secs(1),
            concurrency: 1,
            ..Replay::default()
        })
        .build()
        .unwrap();
    queue(&dispatcher, &server, 5).await;
    up.store(true, Ordering::SeqCst);
    // Stored after the others, delivered in the foreground while the replay
    // works through them one at a time.
    let mut foreground = dispatcher.send("x", post(server.url("/x")));
    assert_eq!(foreground.stored().await, Durability::Stored);
    assert_eq!(foreground.await, Delivery::Delivered);

    let outbox = dispatcher.outbox().unwrap();
    assert!(drained(outbox, Duration::from_secs(60)).await);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let sent = paths(&server);
    assert_eq!(
        sent.iter().filter(|path| *path == "/x").count(),
        1,
        "{sent:?}"
    );
    for index in 0..5 {
        let path = format!("/r/{index}");
        assert!(sent.contains(&path), "{sent:?}");
    }
}

/// In a child process: the outbox file to open.
const CHILD_FILE: &str = "HARDENING_REPLAY_FILE";
/// In a child process: the server's URL.
const CHILD_URL: &str = "HARDENING_REPLAY_URL";
/// What the child says starts with this, amid the test harness's output.
const SAYS: &str = "child:";

/// The child's part, under a file-size limit that lets it read its outbox
/// but not commit to it: it replays what is stored for two seconds, then
/// sends one request in the foreground. Does nothing in a normal test run.
#[test]
fn child() {
    as_child(CHILD_FILE, |file| async move {
        let url = std::env::var(CHILD_URL).unwrap();
        let outbox = Outbox::open(&file).unwrap();
        let dispatcher = Dispatcher::builder(outbox, support::client())
            .layer(one_attempt())
            .replay(Replay {
                interval: Duration::from_millis(100),
                ..Replay::default()
            })
            .build()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut foreground = dispatcher.send("foreground", post(format!("{url}/foreground")));
        println!("{SAYS} stored {:?}", foreground.stored().await);
        println!("{SAYS} delivery {:?}", foreground.await);
    });
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_record_a_delivery_does_not_have_it_sent_again() {
    let scratch = Scratch::new("unwritable");
    let file = scratch.file();
    let (up, server) = switched(Reply::status(200), Reply::status(502)).await;
    let dispatcher = replaying(&file, Duration::from_secs(3600));
    queue(&dispatcher, &server, 5).await;
    drop(dispatcher);
    drop(reopen(&file).await);
    up.store(true, Ordering::SeqCst);
    let before = server.requests().len();

    // Writes past the first 4 KiB fail (EFBIG; SIGXFSZ is ignored): the
    // child reads the outbox, and every commit fails.
    let child = child_command(Some(4))
        .env(CHILD_FILE, &file)
        .env(CHILD_URL, server.url(""))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let said: Vec<String> = BufReader::new(&output.stdout[..])
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| Some(line.split_once(SAYS)?.1.trim().to_owned()))
        .collect();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said:?} {stderr}");

    let mut sent: HashMap<String, usize> = HashMap::new();
    for request in &server.requests()[before..] {
        *sent.entry(request.uri.path().to_owned()).or_default() += 1;
    }
    // Each stored request went out once at most: what could not be removed
    // after its delivery is not sent again.
    assert!(
        sent.iter()
            .all(|(path, count)| *count == 1 || path == "/foreground"),
        "{sent:?}"
    );
    assert!(sent.len() <= 6, "{sent:?}");
    // The foreground still delivers, unstored.
    assert_eq!(sent.get("/foreground"), Some(&1), "{said:?}");
    assert!(
        said.iter().any(|line| line.starts_with("stored NotStored")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|line| line == "delivery Delivered"),
        "{said:?}"
    );
    // Nothing was lost: a later run, free to write, delivers what is there.
    let outbox = reopen(&file).await;
    assert_eq!(outbox.pending().unwrap().len(), 5);
    let dispatcher = Dispatcher::builder(outbox, support::client())
        .build()
        .unwrap();
    for _ in 0..500 {
        if dispatcher.outbox().unwrap().pending().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dispatcher.outbox().unwrap().pending().unwrap().is_empty());
}

#[cfg(unix)]
#[tokio::test(start_paused = true)]
async fn while_the_store_cannot_be_written_the_replay_waits_then_resumes_once_it_recovers() {
    let scratch = Scratch::new("recover");
    let file = scratch.file();
    // Slow: the store fails while the first replay is in flight.
    let slow = Reply::Delayed {
        after: Duration::from_secs(2),
        reply: Box::new(Reply::status(200)),
    };
    let (up, server) = switched(slow, Reply::status(502)).await;
    let dispatcher = replaying(&file, Duration::from_secs(1));
    queue(&dispatcher, &server, 3).await;
    let before = server.requests().len();
    up.store(true, Ordering::SeqCst);
    assert!(wait_for(Duration::from_secs(5), || server.requests().len() > before).await);
    // The file moved away: the outbox refuses to report a commit to a file
    // no longer at its path, so the delivery in flight cannot be recorded.
    let away = scratch.0.join("moved.redb");
    std::fs::rename(&file, &away).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let sent = paths(&server)[before..].to_vec();
    assert_eq!(
        sent,
        ["/r/0"],
        "nothing more while the store cannot record it"
    );

    // Back where it was: the store recovers, and the replay goes on.
    std::fs::rename(&away, &file).unwrap();
    assert!(drained(dispatcher.outbox().unwrap(), Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut sent = paths(&server)[before..].to_vec();
    sent.sort();
    assert_eq!(sent, ["/r/0", "/r/1", "/r/2"], "each once");
}

/// Sets the attempt count of the one record pending in `file`, as a file
/// damaged or written by hand could hold it. The record's format (postcard):
/// its last fields are the count (a varint), then the last failure (`1`,
/// its length as a varint, its text).
fn set_attempts(file: &Path, failure: &str, attempts: u32) {
    /// `value` as a postcard varint: seven bits a byte, low bits first.
    fn varint(mut value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let low = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(low);
                return out;
            }
            out.push(low | 0x80);
        }
    }
    let pending = redb::TableDefinition::<u64, &[u8]>::new("pending");
    let database = redb::Database::open(file).unwrap();
    let write = database.begin_write().unwrap();
    {
        let mut table = write.open_table(pending).unwrap();
        let (seq, mut record) = {
            let (seq, bytes) = table.first().unwrap().unwrap();
            (seq.value(), bytes.value().to_vec())
        };
        let length = varint(failure.len() as u64).len();
        let at = record.len() - failure.len() - length - 1 - 1;
        assert_eq!(record[at], 1, "one attempt so far");
        record.splice(at..=at, varint(u64::from(attempts)));
        table.insert(seq, record.as_slice()).unwrap();
    }
    write.commit().unwrap();
}

#[tokio::test(start_paused = true)]
async fn attempt_counts_saturate_instead_of_overflowing() {
    let scratch = Scratch::new("saturate");
    let (up, server) = switched(Reply::status(200), Reply::status(502)).await;
    let dispatcher = replaying(&scratch.file(), Duration::from_secs(3600));
    let delivery = dispatcher.send("r1", post(server.url("/r/1"))).await;
    assert_eq!(delivery, Delivery::Queued);
    let failure = first_failure(dispatcher.outbox().unwrap().pending().unwrap());
    drop(dispatcher);
    drop(reopen(&scratch.file()).await);
    set_attempts(&scratch.file(), &failure, u32::MAX);

    let outbox = reopen(&scratch.file()).await;
    assert_eq!(outbox.pending().unwrap()[0].attempts, u32::MAX);
    up.store(true, Ordering::SeqCst);
    let before = server.requests().len();
    // The delivery's event counts the attempts.
    let capture = Capture::default();
    let _guard = capture.install();
    let dispatcher = Dispatcher::builder(outbox, support::client())
        .build()
        .unwrap();
    let outbox = dispatcher.outbox().unwrap();
    assert!(drained(outbox, Duration::from_secs(10)).await);
    assert_eq!(server.requests().len(), before + 1, "delivered once");
    assert!(outbox.quarantined().unwrap().is_empty());
    let attempts = format!("attempts={}", u32::MAX);
    assert_logged(&capture, |line| {
        line.contains("delivered from the outbox") && line.contains(&attempts)
    });
}

#[tokio::test(start_paused = true)]
async fn a_request_stored_for_another_origin_is_quarantined_naming_its_host_and_never_sent() {
    let scratch = Scratch::new("origin-stored");
    let old = TestServer::start(|_| Reply::status(502)).await.unwrap();
    let new = TestServer::scripted([]).await.unwrap();
    // Queued under an old base URL.
    let first = replaying(&scratch.file(), Duration::from_secs(3600));
    let delivery = first.send("r1", post(old.url("/hooks/r1"))).await;
    assert_eq!(delivery, Delivery::Queued);
    drop(first);
    let outbox = reopen(&scratch.file()).await;
    let sent_before = old.requests().len();

    let capture = Capture::default();
    let _guard = capture.install();
    let origin = new.url("/api/").parse().unwrap();
    let dispatcher = Dispatcher::builder(outbox, support::client())
        .origin(&origin)
        .build()
        .unwrap();
    let outbox = dispatcher.outbox().unwrap();
    assert!(one_quarantined(outbox).await);
    assert!(outbox.pending().unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(old.requests().len(), sent_before, "never sent");
    assert!(new.requests().is_empty());
    let host = old.addr().to_string();
    let failure = first_failure(outbox.quarantined().unwrap());
    assert!(failure.contains(&host), "{failure}");
    assert_logged(&capture, |line| {
        line.contains("ERROR") && line.contains(&host)
    });
}

#[tokio::test(start_paused = true)]
async fn a_request_to_another_origin_is_refused_without_being_stored_or_sent() {
    let scratch = Scratch::new("origin-send");
    let server = TestServer::scripted([]).await.unwrap();
    let other = TestServer::scripted([]).await.unwrap();
    let capture = Capture::default();
    let _guard = capture.install();
    let origin = server.url("/").parse().unwrap();
    let dispatcher = dispatcher(&scratch.file()).origin(&origin).build().unwrap();

    let failure = refused(dispatcher.send("r1", post(other.url("/hooks/r1")))).await;
    let host = other.addr().to_string();
    assert!(failure.contains(&host), "{failure}");
    assert!(other.requests().is_empty());
    assert!(dispatcher.outbox().unwrap().pending().unwrap().is_empty());
    assert!(dispatcher
        .outbox()
        .unwrap()
        .quarantined()
        .unwrap()
        .is_empty());
    assert_logged(&capture, |line| {
        line.contains("ERROR") && line.contains(&host)
    });
    // Its own origin is served, whatever the path.
    let delivery = dispatcher
        .send("r2", post(server.url("/elsewhere/r2")))
        .await;
    assert_eq!(delivery, Delivery::Delivered);
}

#[tokio::test(start_paused = true)]
async fn a_request_with_credentials_in_its_uri_is_refused_and_the_password_never_shown() {
    let scratch = Scratch::new("userinfo");
    let server = TestServer::scripted([]).await.unwrap();
    let capture = Capture::default();
    let _guard = capture.install();
    let dispatcher = dispatcher(&scratch.file()).build().unwrap();

    let url = format!("http://daemon:pa55w0rd@{}/hooks/r1", server.addr());
    let failure = refused(dispatcher.send("r1", post(url))).await;
    assert!(failure.contains("credentials"), "{failure}");
    assert!(!failure.contains("pa55w0rd"), "{failure}");
    assert!(server.requests().is_empty());
    assert!(dispatcher.outbox().unwrap().pending().unwrap().is_empty());
    assert!(dispatcher
        .outbox()
        .unwrap()
        .quarantined()
        .unwrap()
        .is_empty());
    let lines = capture.lines();
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|line| !line.contains("pa55w0rd")),
        "{lines:#?}"
    );
    let bytes = std::fs::read(scratch.file()).unwrap();
    assert!(!bytes.windows(8).any(|window| window == b"pa55w0rd"));
}

#[tokio::test(start_paused = true)]
async fn secrets_in_what_the_server_sends_back_are_redacted_everywhere() {
    const SECRET: &str = "s3cr3t-t0ken";
    let scratch = Scratch::new("redact");
    let redirect = Response::builder()
        .status(StatusCode::FOUND)
        .header("location", format!("https://login.test/?token={SECRET}"))
        .body(Full::from(format!("see {SECRET}")))
        .unwrap();
    let server = TestServer::scripted([
        support::text_reply(502, format!("upstream saw {SECRET}")),
        support::text_reply(422, format!("bad token {SECRET}")),
        Reply::Respond(redirect),
    ])
    .await
    .unwrap();
    let capture = Capture::default();
    let _guard = capture.install();
    let told = Arc::new(Mutex::new(Vec::new()));
    let fallback_url = server.url("/hooks/r1/fallback");
    let dispatcher = dispatcher(&scratch.file())
        .redact("unused-secret")
        .redact(SECRET)
        .replay(Replay {
            interval: Duration::from_secs(1),
            ..Replay::default()
        })
        .fallback({
            let told = told.clone();
            move |_, _, failure| {
                told.lock().unwrap().push(failure.to_owned());
                Some(post(&fallback_url))
            }
        })
        .build()
        .unwrap();

    // 502: queued, its failure stored.
    let delivery = dispatcher.send("r1", post(server.url("/hooks/r1"))).await;
    assert_eq!(delivery, Delivery::Queued);
    let stored = first_failure(dispatcher.outbox().unwrap().pending().unwrap());
    assert!(stored.contains("upstream saw [redacted]"), "{stored}");
    // The replay: 422, so the fallback; its redirect quarantines it.
    let outbox = dispatcher.outbox().unwrap();
    assert!(one_quarantined(outbox).await);
    let told = told.lock().unwrap().clone();
    assert_eq!(told.len(), 1);
    assert!(told[0].contains("bad token [redacted]"), "{told:?}");
    let quarantined = first_failure(outbox.quarantined().unwrap());
    assert!(quarantined.contains("[redacted]"), "{quarantined}");
    for text in [&stored, &told[0], &quarantined] {
        assert!(!text.contains(SECRET), "{text}");
    }
    let lines = capture.lines();
    assert!(lines.iter().any(|line| line.contains("[redacted]")));
    assert!(
        lines.iter().all(|line| !line.contains(SECRET)),
        "{lines:#?}"
    );
    drop(dispatcher);
    let bytes = std::fs::read(scratch.file()).unwrap();
    assert!(!bytes
        .windows(SECRET.len())
        .any(|window| window == SECRET.as_bytes()));
}

#[tokio::test(start_paused = true)]
async fn a_conflict_supersedes_the_request_no_fallback_and_the_record_is_retired() {
    let scratch = Scratch::new("conflict");
    let server = TestServer::scripted([
        support::text_reply(409, "the task belongs to another run"),
        Reply::status(502),
        Reply::status(409),
    ])
    .await
    .unwrap();
    let capture = Capture::default();
    let _guard = capture.install();
    let fallbacks = Arc::new(AtomicUsize::new(0));
    let dispatcher = dispatcher(&scratch.file())
        .replay(Replay {
            interval: Duration::from_secs(1),
            ..Replay::default()
        })
        .fallback({
            let fallbacks = fallbacks.clone();
            move |entry, _, _| {
                fallbacks.fetch_add(1, Ordering::SeqCst);
                Some(entry.request())
            }
        })
        .build()
        .unwrap();
    let outbox = dispatcher.outbox().unwrap();

    // In the foreground.
    let delivery = dispatcher.send("r1", post(server.url("/hooks/r1"))).await;
    assert_eq!(delivery, Delivery::Superseded);
    assert!(drained(outbox, Duration::from_secs(5)).await);
    // From the replay: 502 first, then 409.
    let delivery = dispatcher.send("r2", post(server.url("/hooks/r2"))).await;
    assert_eq!(delivery, Delivery::Queued);
    assert!(drained(outbox, Duration::from_secs(10)).await);

    assert!(
        outbox.quarantined().unwrap().is_empty(),
        "retired, not kept"
    );
    assert_eq!(fallbacks.load(Ordering::SeqCst), 0);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        paths(&server),
        ["/hooks/r1", "/hooks/r2", "/hooks/r2"],
        "nothing more"
    );
    let lines = capture.lines();
    let warned = lines
        .iter()
        .filter(|line| line.contains("WARN") && line.contains("409 Conflict"))
        .count();
    assert_eq!(warned, 2, "{lines:#?}");
}
