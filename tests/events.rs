//! What the layer reports through `tracing`, captured per test with a
//! thread-local subscriber (the tests run on a current-thread runtime).

mod support;

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex},
};

use http::{HeaderName, Request};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_terminal_retry::{
    test_server::{Reply, TestServer},
    Jitter, Recovery, TerminalRetryLayer, TerminalRetryPolicy,
};
use tracing::{
    field::{Field, Visit},
    Event, Level, Subscriber,
};
use tracing_subscriber::{layer::Context, prelude::*};

use support::{client, post, request, schedule, Mock};

/// One event as the subscriber saw it.
#[derive(Debug, Clone)]
struct Captured {
    level: Level,
    target: String,
    fields: BTreeMap<String, String>,
}

impl Captured {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// Every text the event carries, for leak checks.
    fn all_text(&self) -> String {
        format!("{} {:?}", self.target, self.fields)
    }
}

/// A `tracing` layer keeping every event with its fields as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    /// Captures the events of the current thread until the guard drops.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn events(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }

    /// The events the policy emits before each retry: they carry a delay.
    fn retries(&self) -> Vec<Captured> {
        self.events()
            .into_iter()
            .filter(|event| event.fields.contains_key("delay_ms"))
            .collect()
    }

    fn at_level(&self, level: Level) -> Vec<Captured> {
        self.events()
            .into_iter()
            .filter(|event| event.level == level)
            .collect()
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields: fields.0,
        });
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

#[tokio::test(start_paused = true)]
async fn each_retry_emits_an_event_with_attempt_delay_outcome_and_status_or_error() {
    let capture = Capture::default();
    let _guard = capture.install();
    let mock = Mock::scripted([Reply::status(502), Reply::Close]);
    let response = TerminalRetryLayer::default()
        .layer(mock.clone())
        .oneshot(request())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let retries = capture.retries();
    assert_eq!(retries.len(), 2, "{retries:#?}");
    let first = &retries[0];
    assert_eq!(first.level, Level::INFO);
    assert_eq!(first.field("attempt"), Some("1"));
    assert_eq!(first.field("delay_ms"), Some("4000"));
    assert_eq!(first.field("outcome"), Some("transient"));
    assert_eq!(first.field("status"), Some("502"));
    assert_eq!(first.field("error"), None);

    let second = &retries[1];
    assert_eq!(second.level, Level::INFO);
    assert_eq!(second.field("attempt"), Some("2"));
    assert_eq!(second.field("delay_ms"), Some("8000"));
    assert_eq!(second.field("outcome"), Some("transient"));
    assert_eq!(second.field("status"), None);
    let error = second.field("error").expect("the error of attempt 2");
    assert!(error.contains("attempt: 2"), "{error}");

    assert!(
        capture.at_level(Level::WARN).is_empty(),
        "the call succeeded"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_events_carry_the_delay_actually_slept() {
    let capture = Capture::default();
    let _guard = capture.install();
    let layer = TerminalRetryLayer::new(
        TerminalRetryPolicy::default().with_jitter(Jitter::full().with_random(|| 0.5)),
    );
    let mock = Mock::scripted([support::retry_after_reply(429, "7"), Reply::status(503)]);
    let start = Instant::now();
    layer.layer(mock.clone()).oneshot(request()).await.unwrap();

    let delays: Vec<_> = capture
        .retries()
        .iter()
        .map(|event| event.field("delay_ms").unwrap().to_owned())
        .collect();
    // The server's 7 s, then half of the schedule's 8 s.
    assert_eq!(delays, ["7000", "4000"]);
    assert_eq!(start.elapsed().as_millis(), 11_000);
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_schedule_emits_one_warn_event() {
    let capture = Capture::default();
    let _guard = capture.install();
    let layer =
        TerminalRetryLayer::new(TerminalRetryPolicy::default().with_schedule(schedule(&[1, 1])));
    let mock = Mock::new(|_, _| Reply::status(503));
    layer.layer(mock.clone()).oneshot(request()).await.unwrap();

    assert_eq!(capture.retries().len(), 2);
    let warnings = capture.at_level(Level::WARN);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0].field("attempts"), Some("3"));
    assert_eq!(warnings[0].field("status"), Some("503"));

    // The same when the last attempt failed with an error.
    let capture = Capture::default();
    let _guard = capture.install();
    let mock = Mock::new(|_, _| Reply::Close);
    layer
        .layer(mock.clone())
        .oneshot(request())
        .await
        .unwrap_err();
    let warnings = capture.at_level(Level::WARN);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0].field("attempts"), Some("3"));
    let error = warnings[0].field("error").expect("the last error");
    assert!(error.contains("attempt: 3"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn successes_and_permanent_rejections_neither_retry_nor_warn() {
    let capture = Capture::default();
    let _guard = capture.install();
    for status in [200, 404] {
        let mock = Mock::new(move |_, _| Reply::status(status));
        TerminalRetryLayer::default()
            .layer(mock.clone())
            .oneshot(request())
            .await
            .unwrap();
    }
    assert!(capture.retries().is_empty());
    assert!(capture.at_level(Level::WARN).is_empty());
}

const SECRETS: [&str; 3] = ["s3cr3t-bearer-token", "k3y-0f-the-api", "c00kie-session"];

/// The request of the leak test: credentials in three headers.
fn request_with_credentials(url: String) -> Request<support::Body> {
    let mut request = post(url, "{}");
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        format!("Bearer {}", SECRETS[0]).parse().unwrap(),
    );
    headers.insert("x-api-key", SECRETS[1].parse().unwrap());
    headers.insert("cookie", format!("session={}", SECRETS[2]).parse().unwrap());
    request
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} leaks {secret}: {text}");
    }
}

#[tokio::test(start_paused = true)]
async fn header_values_never_appear_in_events_or_debug_output() {
    let capture = Capture::default();
    let _guard = capture.install();
    let server = TestServer::scripted([
        Reply::status(502),
        Reply::Close,
        support::retry_after_reply(503, "1"),
        Reply::status(500),
    ])
    .await
    .unwrap();
    let policy = TerminalRetryPolicy::default()
        .with_schedule(schedule(&[1, 1, 1]))
        .with_attempt_header(HeaderName::from_static("x-retry-attempt"));
    let layer = TerminalRetryLayer::new(policy.clone());
    let service = layer.layer(client());
    let response = service
        .clone()
        .oneshot(request_with_credentials(
            server.url("/api/daemon/tasks/t1/complete"),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 500);

    // The credentials did travel, on every attempt.
    let requests = server.requests();
    assert_eq!(requests.len(), 4);
    for request in &requests {
        assert!(request.headers["authorization"]
            .to_str()
            .unwrap()
            .contains(SECRETS[0]));
        let debug = format!("{request:?}");
        assert!(debug.contains("authorization"), "{debug}");
        assert_no_secret("RecordedRequest's Debug", &debug);
    }

    // Every event: the retries, the warning, and whatever the client logged.
    let events = capture.events();
    assert_eq!(capture.retries().len(), 3);
    assert_eq!(capture.at_level(Level::WARN).len(), 1);
    for event in &events {
        assert_no_secret("an event", &event.all_text());
    }
    assert_no_secret("the layer's Debug", &format!("{layer:?}"));
    assert_no_secret("the policy's Debug", &format!("{policy:?}"));
    assert_no_secret("the service's Debug", &format!("{service:?}"));
}

#[tokio::test(start_paused = true)]
async fn a_retry_released_early_says_so_at_debug() {
    let capture = Capture::default();
    let _guard = capture.install();
    let recovery = Recovery::new(10).unwrap();
    // The first attempt meets a 502; every later one a 200.
    let mock = Mock::scripted([Reply::status(502)]);
    let layer =
        TerminalRetryLayer::new(TerminalRetryPolicy::default().with_recovery(recovery.clone()));
    let parked = tokio::spawn(layer.layer(mock.clone()).oneshot(request()));
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(recovery.waiting(), 1);
    let heartbeat = layer.layer(mock.clone()).oneshot(request()).await.unwrap();
    assert_eq!(heartbeat.status(), 200);
    assert_eq!(parked.await.unwrap().unwrap().status(), 200);

    let released: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|event| event.fields.contains_key("early_ms"))
        .collect();
    assert_eq!(released.len(), 1, "{released:#?}");
    assert_eq!(released[0].level, Level::DEBUG);
    assert_eq!(released[0].field("attempt"), Some("1"));
    assert_eq!(released[0].field("early_ms"), Some("3000"));
}

/// The outbox says when a report is stored, kept, replayed, delivered from
/// it and quarantined, with the pending count an operator can alert on.
#[cfg(feature = "outbox")]
#[tokio::test(start_paused = true)]
async fn the_outbox_reports_each_step_of_a_stored_report() {
    use std::time::Duration;
    use tower_terminal_retry::client::{ReportOutcome, TaskClient, TaskResult};
    use tower_terminal_retry::test_server::{Action, Fault, TaskServer};

    let capture = Capture::default();
    let _guard = capture.install();
    let directory = std::env::temp_dir().join(format!("events-outbox-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1", "t2", "t3"]);
    let bad_gateway = Fault::Status(http::StatusCode::BAD_GATEWAY);
    server.outage(Duration::ZERO, Duration::from_secs(10), bad_gateway);
    let refused = Fault::Status(http::StatusCode::UNPROCESSABLE_ENTITY);
    server.script("t2", Action::Fail, [refused]);
    let client = TaskClient::builder(server.url())
        .policy(
            TerminalRetryPolicy::default()
                .with_schedule(tower_terminal_retry::Schedule::new([]).unwrap())
                .with_recovery(Recovery::default()),
        )
        .outbox(directory.join("reports.redb"))
        .build()
        .unwrap();

    let queued = client.report_task_result("t1", TaskResult::completed("done"));
    assert_eq!(queued.await, ReportOutcome::Queued);
    tokio::time::sleep(Duration::from_secs(10)).await;
    client.start_task("t3").await.unwrap();
    let quarantined = client.report_task_result("t2", TaskResult::failed("boom"));
    assert_eq!(quarantined.await, ReportOutcome::Quarantined);
    for _ in 0..100 {
        if client.outbox().unwrap().pending().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let with = |text: &str| -> Vec<Captured> {
        let events = capture.events().into_iter();
        events
            .filter(|event| {
                event
                    .field("message")
                    .is_some_and(|message| message.contains(text))
            })
            .collect()
    };
    let stored = with("stored in the outbox");
    assert_eq!(stored.len(), 2, "{stored:#?}");
    assert_eq!(stored[0].field("key"), Some("t1"));
    assert!(stored[0].field("pending").is_some());
    let kept = with("kept in the outbox");
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].level, Level::WARN);
    let replayed = with("replaying a stored request");
    assert_eq!(replayed.len(), 1, "{replayed:#?}");
    assert_eq!(replayed[0].level, Level::INFO);
    assert_eq!(replayed[0].field("key"), Some("t1"));
    assert!(replayed[0].field("stored_for_s").is_some());
    assert!(replayed[0].field("pending").is_some());
    let delivered = with("delivered from the outbox");
    assert_eq!(delivered.len(), 1, "{delivered:#?}");
    // Every attempt, the foreground's and the probes' during the outage.
    let attempts = support::calls(&server, "t1", Action::Complete).to_string();
    assert_eq!(delivered[0].field("attempts"), Some(attempts.as_str()));
    let quarantine = with("quarantined");
    assert_eq!(quarantine.len(), 1, "{quarantine:#?}");
    assert_eq!(quarantine[0].level, Level::ERROR);
    assert_eq!(quarantine[0].field("key"), Some("t2"));
    drop(client);
    let _ = std::fs::remove_dir_all(&directory);
}

/// A replayed attempt that panics (here in the layer's classifier) is
/// reported with an `error` event naming the panic; the replay goes on, and
/// what is stored is still delivered.
#[cfg(feature = "outbox")]
#[tokio::test(start_paused = true)]
async fn a_replayed_attempt_that_panics_is_reported_and_the_request_still_delivered() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tower_terminal_retry::{
        outbox::{Delivery, Dispatcher, Outbox, Replay},
        Classify, DefaultClassifier, Outcome, Schedule, TerminalRetryPolicy,
    };

    /// Answers classified so far; the second (the replay's first) panics.
    static CLASSIFIED: AtomicUsize = AtomicUsize::new(0);

    #[derive(Debug, Clone, Copy)]
    struct PanicsOnce;

    impl<B, E: 'static> Classify<http::Response<B>, E> for PanicsOnce {
        fn classify(&self, result: &Result<http::Response<B>, E>) -> Outcome {
            if CLASSIFIED.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("a classifier bug");
            }
            DefaultClassifier.classify(result)
        }
    }

    let capture = Capture::default();
    let _guard = capture.install();
    let directory = std::env::temp_dir().join(format!("events-panic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    let server = TestServer::scripted([Reply::status(502)]).await.unwrap();
    let layer = TerminalRetryLayer::new(
        TerminalRetryPolicy::default()
            .with_schedule(Schedule::new([]).unwrap())
            .with_classifier(PanicsOnce),
    );
    let outbox = Outbox::open(directory.join("requests.redb")).unwrap();
    let dispatcher = Dispatcher::builder(outbox, client())
        .layer(layer)
        .replay(Replay {
            interval: Duration::from_secs(1),
            ..Replay::default()
        })
        .build()
        .unwrap();
    let request = http::Request::post(server.url("/hooks/1"))
        .body(bytes::Bytes::new())
        .unwrap();
    assert_eq!(dispatcher.send("h1", request).await, Delivery::Queued);
    for _ in 0..600 {
        if server.requests().len() >= 3
            && dispatcher.outbox().unwrap().pending().unwrap().is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dispatcher.outbox().unwrap().pending().unwrap().is_empty(),
        "still stored"
    );
    let panicked: Vec<Captured> = capture
        .at_level(Level::ERROR)
        .into_iter()
        .filter(|event| {
            event
                .field("message")
                .is_some_and(|message| message.contains("attempt panicked"))
        })
        .collect();
    assert_eq!(panicked.len(), 1, "{:#?}", capture.events());
    assert!(panicked[0]
        .field("panic")
        .is_some_and(|panic| panic.contains("a classifier bug")));
    drop(dispatcher);
    let _ = std::fs::remove_dir_all(&directory);
}

/// Each destination's changes are one event each, with its origin: down,
/// back, paused, given up on.
#[cfg(feature = "outbox")]
#[tokio::test(start_paused = true)]
async fn a_destination_down_back_paused_and_given_up_on_is_one_event_each() {
    use std::time::Duration;
    use tower_terminal_retry::{
        outbox::{Delivery, Dispatcher, Outbox, Replay},
        Schedule, TerminalRetryPolicy,
    };

    let capture = Capture::default();
    let _guard = capture.install();
    let directory = std::env::temp_dir().join(format!("events-lanes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    let flapping = TestServer::scripted([Reply::status(502), Reply::status(502)])
        .await
        .unwrap();
    let pausing = TestServer::scripted([support::retry_after_reply(429, "3")])
        .await
        .unwrap();
    let dead = TestServer::start(|_| Reply::status(502)).await.unwrap();
    let once = TerminalRetryLayer::new(
        TerminalRetryPolicy::default().with_schedule(Schedule::new([]).unwrap()),
    );
    let outbox = Outbox::open(directory.join("requests.redb")).unwrap();
    let dispatcher = Dispatcher::builder(outbox, client())
        .layer(once)
        .replay(Replay {
            interval: Duration::from_secs(2),
            ..Replay::default()
        })
        .give_up_after(Duration::from_secs(20))
        .build()
        .unwrap();
    for (key, server) in [
        ("flapping", &flapping),
        ("pausing", &pausing),
        ("dead", &dead),
    ] {
        let request = http::Request::post(server.url("/hooks/1"))
            .body(bytes::Bytes::new())
            .unwrap();
        assert_eq!(dispatcher.send(key, request).await, Delivery::Queued);
    }
    tokio::time::sleep(Duration::from_secs(40)).await;
    let outbox = dispatcher.outbox().unwrap();
    assert!(outbox.pending().unwrap().is_empty());
    assert_eq!(outbox.quarantined().unwrap().len(), 1);

    let of = |server: &TestServer, text: &str| -> Vec<Captured> {
        let origin = format!("http://{}", server.addr());
        capture
            .events()
            .into_iter()
            .filter(|event| {
                event.field("origin") == Some(origin.as_str())
                    && event
                        .field("message")
                        .is_some_and(|message| message.contains(text))
            })
            .collect()
    };
    for server in [&flapping, &pausing, &dead] {
        let down = of(server, "a destination is down");
        assert_eq!(down.len(), 1, "{down:#?}");
        assert_eq!(down[0].level, Level::WARN);
    }
    assert_eq!(of(&flapping, "is back").len(), 1);
    assert_eq!(of(&pausing, "is back").len(), 1);
    assert_eq!(of(&dead, "is back").len(), 0);
    let paused = of(&pausing, "asked for a pause");
    assert_eq!(paused.len(), 1, "{paused:#?}");
    assert_eq!(of(&flapping, "asked for a pause").len(), 0);
    let given_up = of(&dead, "given up on");
    assert_eq!(given_up.len(), 1, "{given_up:#?}");
    assert_eq!(given_up[0].level, Level::WARN);
    assert_eq!(given_up[0].field("quarantined"), Some("1"));
    assert_eq!(of(&flapping, "given up on").len(), 0);
    drop(dispatcher);
    let _ = std::fs::remove_dir_all(&directory);
}
