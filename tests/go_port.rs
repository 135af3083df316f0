//! The retry tests of the Go original, ported with the same assertions.
//!
//! Go swapped `retrySleep` for an instant one; here tokio's paused clock makes
//! the sleeps instant. Go's "error" is any response the default classifier
//! does not call a success, or an error of the client.

mod support;

use std::{
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use http::Response;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_terminal_retry::{
    classify_status,
    test_server::{Reply, TestServer},
    Classify, DefaultClassifier, Outcome, Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

use support::{client, post, Attempts};

/// Go's `isTransientError`, on a result of one attempt.
fn is_transient<B>(result: &Result<Response<B>, io::Error>) -> bool {
    DefaultClassifier.classify(result) == Outcome::Transient
}

fn status(code: u16) -> Result<Response<()>, io::Error> {
    Ok(Response::builder().status(code).body(()).unwrap())
}

#[test]
fn test_is_transient_error() {
    let cases = [
        // Go's nil error: the server accepted the request.
        ("nil is not transient", status(200), false),
        ("5xx is transient", status(502), true),
        ("503 is transient", status(503), true),
        ("408 is transient", status(408), true),
        ("429 is transient", status(429), true),
        ("400 is permanent", status(400), false),
        ("401 is permanent", status(401), false),
        ("404 is permanent", status(404), false),
        (
            "transport-level error is transient",
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            )),
            true,
        ),
    ];
    for (name, result, want) in cases {
        assert_eq!(is_transient(&result), want, "{name}: {result:?}");
        if let Ok(response) = &result {
            assert_eq!(
                classify_status(response.status()) == Outcome::Transient,
                want,
                "{name}"
            );
        }
    }
}

/// A server answering with `reply(n)` to its n-th request (from 1), and how
/// many requests it got.
async fn counting_server(
    reply: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> (TestServer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = TestServer::start(move |_| reply(counter.fetch_add(1, Ordering::SeqCst) + 1))
        .await
        .unwrap();
    (server, calls)
}

fn nanos(count: usize) -> Schedule {
    Schedule::new(vec![Duration::from_nanos(1); count]).unwrap()
}

#[tokio::test(start_paused = true)]
async fn test_post_json_with_retry_transient_then_success() {
    let (server, calls) = counting_server(|n| {
        if n < 3 {
            Reply::status(502)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let response = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_schedule(nanos(3)))
        .layer(client())
        .oneshot(post(server.url("/x"), "{}"))
        .await
        .expect("postJSONWithRetry");
    assert_eq!(
        classify_status(response.status()),
        Outcome::Success,
        "postJSONWithRetry: {}",
        response.status()
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "expected 3 attempts (2 transient + 1 success)"
    );
}

#[tokio::test(start_paused = true)]
async fn test_post_json_with_retry_transient_exhausts() {
    // 502 to the end of any sane schedule; a runaway retry loop meets a 200
    // and fails the assertions instead of spinning.
    let (server, calls) = counting_server(|n| {
        if n <= 100 {
            Reply::status(502)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let schedule = nanos(2);
    let result =
        TerminalRetryLayer::new(TerminalRetryPolicy::default().with_schedule(schedule.clone()))
            .layer(client())
            .oneshot(post(server.url("/x"), "{}"))
            .await;
    let response = result.expect("the last response, unchanged");
    assert_ne!(
        classify_status(response.status()),
        Outcome::Success,
        "expected error after schedule exhausted, got {}",
        response.status()
    );
    assert_eq!(
        DefaultClassifier.classify(&Ok::<_, io::Error>(response)),
        Outcome::Transient,
        "expected transient error"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        schedule.delays().len() + 1,
        "expected {} attempts (initial + {} retries)",
        schedule.delays().len() + 1,
        schedule.delays().len()
    );
}

#[tokio::test(start_paused = true)]
async fn test_post_json_with_retry_permanent_bails_immediately() {
    let (server, calls) = counting_server(|_| Reply::status(400)).await;
    let response = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_schedule(nanos(3)))
        .layer(client())
        .oneshot(post(server.url("/x"), "{}"))
        .await
        .expect("the rejection, as a response");
    assert_ne!(
        classify_status(response.status()),
        Outcome::Success,
        "expected error, got {}",
        response.status()
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "expected exactly 1 attempt on permanent error"
    );
}

#[tokio::test(start_paused = true)]
async fn test_post_json_with_retry_ctx_cancel_stops_retries() {
    let (server, calls) = counting_server(|_| Reply::status(502)).await;
    let attempts = Attempts::new();
    let service = ServiceBuilder::new()
        .layer(TerminalRetryLayer::new(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new(vec![Duration::from_secs(1); 3]).unwrap()),
        ))
        .layer(attempts.clone())
        .service(client());

    let start = Instant::now();
    let mut call = Box::pin(service.oneshot(post(server.url("/x"), "{}")));
    // Go cancels 50 ms in, during the first 1 s sleep: wait for the first
    // attempt's answer so the cancellation lands in that sleep, not before.
    attempts.drive_until(&mut call, |p| p.finished == 1).await;
    let result = tokio::time::timeout_at(start + Duration::from_millis(50), &mut call).await;
    drop(call);
    let elapsed = start.elapsed();

    assert!(
        result.is_err(),
        "expected error after ctx cancel, got {result:?}"
    );
    assert!(
        elapsed <= Duration::from_millis(750),
        "expected ctx cancel to short-circuit retry, took {elapsed:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "expected exactly 1 attempt before cancel"
    );
    // And none later: the sleeps went with the dropped call.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(attempts.count(), 1);
}

#[test]
fn test_default_terminal_retry_schedule_matches_agreed_plan() {
    let want = [4, 8, 16, 32, 64].map(Duration::from_secs);
    let default = Schedule::default();
    assert_eq!(
        default.delays().len(),
        want.len(),
        "schedule length: got {}, want {}",
        default.delays().len(),
        want.len()
    );
    for (i, d) in want.iter().enumerate() {
        assert_eq!(
            default.delays()[i],
            *d,
            "schedule[{i}]: got {:?}, want {d:?}",
            default.delays()[i]
        );
    }
    // The layer and the policy start from that plan.
    let layer = format!("{:?}", TerminalRetryLayer::default());
    let plan = format!("schedule: {:?}", default.delays());
    assert!(layer.contains(&plan), "{layer}");
}
