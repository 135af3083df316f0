//! Early release: retries parked in backoff go out once a request to the same
//! server succeeds, at a bounded rate. In memory and on loopback, on tokio's
//! paused clock.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};
use tower_terminal_retry::{
    test_server::{Reply, TestServer},
    ConfigError, Jitter, Recovery, Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

type Body = Full<Bytes>;

/// An in-memory set of servers: each host is down (503, or 429 with a
/// `Retry-After` when asked) until brought up; every request is recorded
/// with the time it arrived.
#[derive(Clone, Default)]
struct Hosts {
    up: Arc<Mutex<HashMap<String, bool>>>,
    retry_after: Arc<Mutex<Option<u64>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A request as a host saw it: path, arrival, attempt header.
type Seen = (String, Instant, Option<String>);

impl Hosts {
    fn set_up(&self, host: &str, up: bool) {
        self.up.lock().unwrap().insert(host.to_owned(), up);
    }

    /// Arrival times of the requests to `path`, from `origin`, in ms.
    fn times(&self, path: &str, origin: Instant) -> Vec<u128> {
        let seen = self.seen.lock().unwrap();
        let matching = seen.iter().filter(|(seen, ..)| seen == path);
        matching
            .map(|(_, at, _)| (*at - origin).as_millis())
            .collect()
    }

    /// The attempt header of each request to `path`.
    fn attempt_headers(&self, path: &str) -> Vec<Option<String>> {
        let seen = self.seen.lock().unwrap();
        let matching = seen.iter().filter(|(seen, ..)| seen == path);
        matching.map(|(.., header)| header.clone()).collect()
    }

    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send {
        let hosts = self.clone();
        service_fn(move |request: Request<Body>| {
            let host = request.uri().host().unwrap_or_default().to_owned();
            let header = request
                .headers()
                .get(ATTEMPT)
                .map(|value| value.to_str().unwrap().to_owned());
            let path = request.uri().path().to_owned();
            hosts
                .seen
                .lock()
                .unwrap()
                .push((path, Instant::now(), header));
            let up = hosts
                .up
                .lock()
                .unwrap()
                .get(&host)
                .copied()
                .unwrap_or(false);
            let mut response = Response::new(Body::default());
            if !up {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                if let Some(seconds) = *hosts.retry_after.lock().unwrap() {
                    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    let value = seconds.to_string().parse().unwrap();
                    response
                        .headers_mut()
                        .insert(http::header::RETRY_AFTER, value);
                }
            }
            async move { Ok::<_, Infallible>(response) }
        })
    }
}

const ATTEMPT: HeaderName = HeaderName::from_static("x-retry-attempt");

fn post(url: &str) -> Request<Body> {
    Request::post(url).body(Body::from("{}")).unwrap()
}

/// Lets spawned calls run up to their first wait.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn layer(recovery: &Recovery) -> TerminalRetryLayer {
    TerminalRetryLayer::new(policy(recovery))
}

/// The policy of [`layer`], for a layer with more settings.
fn policy(recovery: &Recovery) -> TerminalRetryPolicy {
    TerminalRetryPolicy::default().with_recovery(recovery.clone())
}

#[test]
fn a_release_rate_of_zero_is_a_configuration_error() {
    assert_eq!(
        Recovery::new(0).unwrap_err(),
        ConfigError::InvalidReleaseRate
    );
    let seven = format!("{:?}", Recovery::new(7).unwrap());
    assert!(seven.contains("release_per_second: 7"), "{seven}");
}

#[tokio::test(start_paused = true)]
async fn a_success_releases_waiters_of_its_authority_and_no_other() {
    let hosts = Hosts::default();
    let recovery = Recovery::new(1_000).unwrap();
    let service = layer(&recovery).layer(hosts.service());
    let origin = Instant::now();
    let mut calls = Vec::new();
    for url in [
        "http://a.test/a1",
        "http://a.test:80/a2",
        "http://b.test/b1",
        "https://a.test/secure",
        "http://a.test:8080/other-port",
    ] {
        calls.push(tokio::spawn(service.clone().oneshot(post(url))));
    }
    settle().await;
    assert_eq!(recovery.waiting(), 5);

    tokio::time::sleep(Duration::from_secs(1)).await;
    hosts.set_up("a.test", true);
    // The server of a.test:80 answers a heartbeat: its two waiters go.
    let heartbeat = service.clone().oneshot(post("http://a.test/heartbeat"));
    assert_eq!(heartbeat.await.unwrap().status(), StatusCode::OK);
    settle().await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    assert_eq!(hosts.times("/a1", origin), [0, 1000]);
    assert_eq!(hosts.times("/a2", origin), [0, 1001]);
    // Another host, scheme or port keeps its schedule.
    assert_eq!(hosts.times("/b1", origin), [0]);
    assert_eq!(hosts.times("/secure", origin), [0]);
    assert_eq!(hosts.times("/other-port", origin), [0]);
    assert_eq!(recovery.waiting(), 3);

    tokio::time::sleep(Duration::from_secs(3)).await;
    // At 4 s the others retry on schedule: b.test still down, the
    // other a.test authorities now up.
    assert_eq!(hosts.times("/b1", origin), [0, 4000]);
    assert_eq!(hosts.times("/secure", origin), [0, 4000]);
    for call in calls.drain(..2) {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    for call in calls {
        call.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn releases_are_rate_bounded_oldest_first_and_a_deadline_can_come_first() {
    let hosts = Hosts::default();
    // Two a second: one at once, then one every 500 ms.
    let recovery = Recovery::new(2).unwrap();
    let origin = Instant::now();
    let mut calls = Vec::new();
    // Five calls parked in order, 100 ms apart; the last one waits 1.6 s only.
    for (index, delay) in [10, 10, 10, 10, 2].into_iter().enumerate() {
        let schedule = Schedule::new([Duration::from_millis(delay * 100 + 800)]).unwrap();
        let service = TerminalRetryLayer::new(policy(&recovery).with_schedule(schedule))
            .layer(hosts.service());
        let url = format!("http://a.test/call-{index}");
        calls.push(tokio::spawn(service.oneshot(post(&url))));
        settle().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At 0.5 s the server is back and a heartbeat sees it.
    hosts.set_up("a.test", true);
    let heartbeat = layer(&recovery).layer(hosts.service());
    heartbeat.oneshot(post("http://a.test/hb")).await.unwrap();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let second = |index: usize| hosts.times(&format!("/call-{index}"), origin)[1];
    // Oldest first, at most one per 500 ms.
    assert_eq!(second(0), 500);
    assert_eq!(second(1), 1_000);
    assert_eq!(second(2), 1_500);
    // The last call's own deadline (parked at 0.4 s for 1.0 s) came before a
    // token: it went at 1.4 s, and took no token.
    assert_eq!(second(4), 1_400);
    assert_eq!(second(3), 2_000);
    assert_eq!(recovery.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_wait_is_never_cut_short() {
    let hosts = Hosts::default();
    *hosts.retry_after.lock().unwrap() = Some(30);
    let recovery = Recovery::new(1_000).unwrap();
    let service = layer(&recovery).layer(hosts.service());
    let origin = Instant::now();
    let call = tokio::spawn(service.clone().oneshot(post("http://a.test/limited")));
    settle().await;
    // Not among the waiters the signal can release.
    assert_eq!(recovery.waiting(), 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    hosts.set_up("a.test", true);
    service.oneshot(post("http://a.test/hb")).await.unwrap();
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(hosts.times("/limited", origin), [0, 30000]);
}

#[tokio::test(start_paused = true)]
async fn a_released_retry_is_an_attempt_of_the_schedule() {
    let hosts = Hosts::default();
    let recovery = Recovery::new(1_000).unwrap();
    let service = TerminalRetryLayer::new(policy(&recovery).with_attempt_header(ATTEMPT))
        .layer(hosts.service());
    let origin = Instant::now();
    let call = tokio::spawn(service.clone().oneshot(post("http://a.test/report")));
    // Released at 5 s, in the second delay (8 s from 4 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    hosts.set_up("a.test", true);
    service
        .clone()
        .oneshot(post("http://a.test/hb"))
        .await
        .unwrap();
    // Down again: the released attempt fails, and the schedule goes on with
    // its third delay (16 s), as for any attempt.
    hosts.set_up("a.test", false);
    settle().await;
    hosts.set_up("a.test", true);
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(hosts.times("/report", origin), [0, 4000, 5000, 21000]);
    let headers = hosts.attempt_headers("/report");
    let expected = [None, Some("2"), Some("3"), Some("4")];
    assert_eq!(headers, expected.map(|header| header.map(str::to_owned)));
}

#[tokio::test(start_paused = true)]
async fn without_a_success_waits_follow_the_schedule_exactly() {
    let hosts = Hosts::default();
    let recovery = Recovery::new(1_000).unwrap();
    // A success to another host does not count.
    hosts.set_up("other.test", true);
    let service = layer(&recovery).layer(hosts.service());
    let origin = Instant::now();
    let call = tokio::spawn(service.clone().oneshot(post("http://a.test/report")));
    let other = tokio::spawn(async move {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let response = service.clone().oneshot(post("http://other.test/hb")).await;
            assert_eq!(response.unwrap().status(), StatusCode::OK);
        }
    });
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        hosts.times("/report", origin),
        [0, 4_000, 12_000, 28_000, 60_000, 124_000]
    );
    other.abort();
}

#[tokio::test(start_paused = true)]
async fn jittered_waits_are_the_same_with_the_signal_and_without() {
    let run = |recovery: Option<Recovery>| async move {
        let hosts = Hosts::default();
        // A fixed random source: both runs draw the same jitter.
        let jitter = Jitter::full().with_random(|| 0.37);
        let mut policy = TerminalRetryPolicy::default().with_jitter(jitter);
        if let Some(recovery) = recovery {
            policy = policy.with_recovery(recovery);
        }
        let layer = TerminalRetryLayer::new(policy);
        let origin = Instant::now();
        let _ = layer
            .layer(hosts.service())
            .oneshot(post("http://a.test/report"))
            .await;
        hosts.times("/report", origin)
    };
    let with = run(Some(Recovery::new(1_000).unwrap())).await;
    let without = run(None).await;
    assert_eq!(with.len(), 6);
    assert_eq!(with, without);
}

#[tokio::test(start_paused = true)]
async fn dropping_waiting_calls_leaves_no_waiter_behind() {
    let hosts = Hosts::default();
    let recovery = Recovery::new(1_000).unwrap();
    let service = layer(&recovery).layer(hosts.service());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..100_000 {
        calls.spawn(service.clone().oneshot(post("http://a.test/report")));
    }
    while recovery.waiting() < 100_000 {
        tokio::task::yield_now().await;
    }
    calls.abort_all();
    while calls.join_next().await.is_some() {}
    assert_eq!(recovery.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_parked_after_the_success_keeps_its_delay() {
    let hosts = Hosts::default();
    let recovery = Recovery::new(1).unwrap();
    let service = layer(&recovery).layer(hosts.service());
    let origin = Instant::now();
    // Two waiters: the second token comes only after a second.
    let first = tokio::spawn(service.clone().oneshot(post("http://a.test/first")));
    let second = tokio::spawn(service.clone().oneshot(post("http://a.test/second")));
    settle().await;
    hosts.set_up("a.test", true);
    service
        .clone()
        .oneshot(post("http://a.test/hb"))
        .await
        .unwrap();
    hosts.set_up("a.test", false);
    // A call that parks after the success is not released by it, though the
    // release of the others is still going on.
    let late = tokio::spawn(service.clone().oneshot(post("http://a.test/late")));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(hosts.times("/first", origin), [0, 0]);
    assert_eq!(hosts.times("/second", origin), [0, 1000]);
    assert_eq!(hosts.times("/late", origin), [0]);
    for call in [first, second, late] {
        call.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn on_loopback_a_success_on_one_server_releases_its_calls_only() {
    // Two real servers: each answers 503 to its first two requests, then 200.
    let down = || TestServer::scripted([Reply::status(503), Reply::status(503)]);
    let (one, two) = (down().await.unwrap(), down().await.unwrap());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let recovery = Recovery::new(1_000).unwrap();
    let service = layer(&recovery).layer(client);
    let start = Instant::now();
    let to_one = tokio::spawn(service.clone().oneshot(post(&one.url("/report"))));
    let to_two = tokio::spawn(service.clone().oneshot(post(&two.url("/report"))));
    while recovery.waiting() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Server one answers 503 once more, then 200 to this heartbeat's retry.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let heartbeat = TerminalRetryLayer::new(
        TerminalRetryPolicy::default()
            .with_schedule(Schedule::new([Duration::from_millis(100)]).unwrap())
            .with_recovery(recovery.clone()),
    )
    .layer(service_fn({
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Body>();
        move |request| client.request(request)
    }));
    let answered = heartbeat.oneshot(post(&one.url("/hb"))).await.unwrap();
    assert_eq!(answered.status(), StatusCode::OK);

    let released = to_one.await.unwrap().unwrap();
    assert_eq!(released.status(), StatusCode::OK);
    let released_after = start.elapsed();
    assert!(
        released_after < Duration::from_millis(1_200),
        "{released_after:?}"
    );
    // Server two's call keeps its schedule: 503 at 0 and 4 s, 200 at 12 s.
    assert_eq!(recovery.waiting(), 1);
    assert_eq!(two.requests().len(), 1);
    let kept = to_two.await.unwrap().unwrap();
    assert_eq!(kept.status(), StatusCode::OK);
    let arrivals: Vec<Duration> = two.requests().iter().map(|r| r.at - start).collect();
    assert_eq!(arrivals.len(), 3);
    assert!(arrivals[1] >= Duration::from_secs(4), "{arrivals:?}");
    assert!(arrivals[2] >= Duration::from_secs(12), "{arrivals:?}");
}

/// The task client holds one signal for all its routes, on by default: a
/// successful `start` releases a terminal report parked on the same server;
/// turned off, the report keeps its schedule.
#[tokio::test(start_paused = true)]
async fn the_task_client_releases_parked_reports_on_any_successful_call() {
    use tower_terminal_retry::client::{ReportOutcome, TaskClient, TaskResult};
    use tower_terminal_retry::test_server::{Action, Fault, TaskServer, TaskState};

    for early_release in [true, false] {
        let started = tokio::time::Instant::now();
        let server = TaskServer::start().await.unwrap();
        server.add_tasks(["t1", "t2"]);
        server.script(
            "t1",
            Action::Complete,
            [Fault::Status(StatusCode::BAD_GATEWAY)],
        );
        let mut builder = TaskClient::builder(server.url());
        if !early_release {
            builder = builder.policy(TerminalRetryPolicy::default());
        }
        let client = builder.build().unwrap();
        let report = client.report_task_result("t1", TaskResult::completed("done"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.start_task("t2").await.unwrap();
        assert_eq!(report.await, ReportOutcome::Completed);
        assert_eq!(server.state("t1"), Some(TaskState::Completed));
        let completes: Vec<Duration> = server
            .attempts()
            .iter()
            .filter(|attempt| attempt.action == Action::Complete)
            .map(|attempt| attempt.request.at - started)
            .collect();
        let expected_retry = if early_release { 1 } else { 4 };
        assert_eq!(completes.len(), 2);
        assert_eq!(completes[1].as_secs(), expected_retry, "{completes:?}");
    }
}
