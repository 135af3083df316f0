//! The layer's futures at the level of single polls, with tokio-test's mock
//! task: ready when the first answer is a success, pending (and never woken
//! by itself) while a retry waits, woken once by its timer or by a recovery
//! signal for its own origin, and never by another's.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{Request, Response, StatusCode, Uri};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::{retry::Policy, service_fn, Layer, ServiceExt};
use tower_terminal_retry::{Recovery, TerminalRetryLayer, TerminalRetryPolicy};

/// A service answering `first` to its first call and 200 after, counting
/// its calls; each answer is ready at once.
fn answering(
    first: StatusCode,
    calls: &Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<()>, Infallible>>,
> + Clone {
    let calls = calls.clone();
    service_fn(move |_request: Request<()>| {
        let status = match calls.fetch_add(1, Ordering::SeqCst) {
            0 => first,
            _ => StatusCode::OK,
        };
        std::future::ready(Ok(Response::builder().status(status).body(()).unwrap()))
    })
}

fn request(uri: &str) -> Request<()> {
    Request::post(uri).body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_first_success_is_ready_on_the_first_poll() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = TerminalRetryLayer::default().layer(answering(StatusCode::OK, &calls));
    let mut call = task::spawn(service.oneshot(request("http://a.test/r")));
    let response = assert_ready_ok!(call.poll());
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_retry_is_pending_and_woken_by_its_timer_only() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = TerminalRetryLayer::default().layer(answering(StatusCode::BAD_GATEWAY, &calls));
    let mut call = task::spawn(service.oneshot(request("http://a.test/r")));
    assert_pending!(call.poll());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // No busy loop: nothing wakes it before its delay (4 s) is over.
    assert!(!call.is_woken());
    tokio::time::advance(Duration::from_millis(3_999)).await;
    assert!(!call.is_woken());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(call.is_woken());
    let response = assert_ready_ok!(call.poll());
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_parked_retry_is_woken_by_a_success_to_its_own_origin_not_anothers() {
    let recovery = Recovery::new(1_000).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service =
        TerminalRetryLayer::new(TerminalRetryPolicy::default().with_recovery(recovery.clone()))
            .layer(answering(StatusCode::SERVICE_UNAVAILABLE, &calls));
    let mut call = task::spawn(service.oneshot(request("http://a.test/r")));
    assert_pending!(call.poll());
    assert_eq!(recovery.waiting(), 1);

    recovery.observe(&Uri::from_static("http://b.test/other"));
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(!call.is_woken(), "woken by another origin's success");

    recovery.observe(&Uri::from_static("http://a.test/other"));
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(call.is_woken());
    let response = assert_ready_ok!(call.poll());
    assert_eq!(response.status(), StatusCode::OK);
    // Released long before its 4 s delay.
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(recovery.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_policys_backoff_future_is_pending_until_its_delay_then_ready() {
    let mut policy = TerminalRetryPolicy::default();
    let mut request = request("http://a.test/r");
    let mut result: Result<Response<()>, Infallible> =
        Ok(Response::builder().status(502).body(()).unwrap());
    let backoff = policy
        .retry(&mut request, &mut result)
        .expect("a 502 is retried");
    let mut backoff = task::spawn(backoff);
    assert_pending!(backoff.poll());
    assert!(!backoff.is_woken());
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(backoff.is_woken());
    assert_ready!(backoff.poll());

    // A permanent refusal is not retried at all.
    let mut refused: Result<Response<()>, Infallible> =
        Ok(Response::builder().status(422).body(()).unwrap());
    assert!(policy.retry(&mut request, &mut refused).is_none());
}
