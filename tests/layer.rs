//! The layer's behaviours against an in-memory service, on tokio's paused
//! clock: every delay is exact and the suite does not wait for real.

mod support;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use tokio::{task::JoinSet, time::Instant};
use tower::{timeout::error::Elapsed, BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_terminal_retry::{
    classify_status, test_server::Reply, Jitter, Outcome, OutcomeSlot, RetryAfter, RetryBudget,
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

use support::{
    assert_date_delay, date_in, request, schedule, secs, text, Mock, MockError, CALL_HEADER,
    DEFAULT_STARTS,
};

const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-retry-attempt");

/// Sends `request` once through `layer` over `mock`; returns the result and
/// how long the call took on tokio's clock.
async fn call(
    layer: &TerminalRetryLayer,
    mock: &Mock,
    request: Request<support::Body>,
) -> (Result<http::Response<support::Body>, MockError>, Duration) {
    let start = Instant::now();
    let result = layer.layer(mock.clone()).oneshot(request).await;
    (result, start.elapsed())
}

/// A 2-delay schedule: transient results take 3 attempts, others 1.
fn short_layer() -> TerminalRetryLayer {
    TerminalRetryLayer::new(TerminalRetryPolicy::default().with_schedule(schedule(&[1, 1])))
}

#[tokio::test(start_paused = true)]
async fn default_classifier_table_holds_through_the_layer() {
    // (status, outcome): 2xx success; 5xx (and above), 408, 429 transient;
    // every other status permanent: 1xx, 3xx (redirects are not followed)
    // and the rest of 4xx.
    let table = [
        (100, Outcome::Permanent),
        (199, Outcome::Permanent),
        (200, Outcome::Success),
        (201, Outcome::Success),
        (204, Outcome::Success),
        (299, Outcome::Success),
        (301, Outcome::Permanent),
        (302, Outcome::Permanent),
        (304, Outcome::Permanent),
        (307, Outcome::Permanent),
        (308, Outcome::Permanent),
        (399, Outcome::Permanent),
        (400, Outcome::Permanent),
        (401, Outcome::Permanent),
        (403, Outcome::Permanent),
        (404, Outcome::Permanent),
        (407, Outcome::Permanent),
        (409, Outcome::Permanent),
        (410, Outcome::Permanent),
        (422, Outcome::Permanent),
        (499, Outcome::Permanent),
        (408, Outcome::Transient),
        (429, Outcome::Transient),
        (500, Outcome::Transient),
        (501, Outcome::Transient),
        (502, Outcome::Transient),
        (503, Outcome::Transient),
        (504, Outcome::Transient),
        (599, Outcome::Transient),
        (600, Outcome::Transient),
        (999, Outcome::Transient),
    ];
    for (status, outcome) in table {
        let code = StatusCode::from_u16(status).unwrap();
        assert_eq!(classify_status(code), outcome, "classify_status({status})");

        let mock = Mock::new(move |_, _| Reply::status(status));
        let (result, _) = call(&short_layer(), &mock, request()).await;
        assert_eq!(result.unwrap().status(), code, "status {status} unchanged");
        let expected = if outcome == Outcome::Transient { 3 } else { 1 };
        assert_eq!(mock.attempts().count(), expected, "attempts for {status}");
    }
}

#[tokio::test(start_paused = true)]
async fn any_inner_error_is_transient() {
    let mock = Mock::new(|_, _| Reply::Close);
    let (result, elapsed) = call(&short_layer(), &mock, request()).await;
    // The last error, unchanged.
    assert_eq!(
        result.unwrap_err(),
        MockError {
            call: 0,
            attempt: 3
        }
    );
    assert_eq!(mock.attempts().count(), 3);
    assert_eq!(elapsed, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn an_elapsed_per_attempt_timeout_inside_the_layer_is_transient() {
    let mock = Mock::scripted([Reply::Hang, Reply::Hang, Reply::status(204)]);
    let service = ServiceBuilder::new()
        .layer(short_layer())
        .timeout(Duration::from_secs(10))
        .service(mock.clone());
    let start = Instant::now();
    let response = service.oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // Each hung attempt is cut at 10 s, then the schedule's 1 s delay.
    assert_eq!(mock.attempts().offsets(start), secs(&[0, 11, 22]));
    assert_eq!(mock.attempts().progress().cancelled, 2);

    let hung = Mock::new(|_, _| Reply::Hang);
    let service = ServiceBuilder::new()
        .layer(short_layer())
        .timeout(Duration::from_secs(10))
        .service(hung.clone());
    let error: BoxError = service.oneshot(request()).await.unwrap_err();
    assert!(error.is::<Elapsed>(), "the last error unchanged: {error:?}");
    assert_eq!(hung.attempts().count(), 3);
    assert_eq!(hung.attempts().in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn transient_then_success_takes_exactly_the_attempts_needed() {
    let delays = Schedule::default().delays().to_vec();
    for failures in 0..=5 {
        let mock = Mock::new(move |_, attempt| {
            if attempt <= failures {
                Reply::status(502)
            } else {
                support::text_reply(200, "accepted")
            }
        });
        let (result, elapsed) = call(&TerminalRetryLayer::default(), &mock, request()).await;
        let response = result.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "accepted");
        assert_eq!(mock.attempts().count(), failures + 1);
        assert_eq!(elapsed, delays[..failures].iter().sum::<Duration>());
    }
}

#[tokio::test(start_paused = true)]
async fn transient_to_the_end_returns_the_last_response_unchanged() {
    let statuses = [500, 503, 504, 408, 429, 502];
    let mock = Mock::new(move |_, attempt| {
        let mut reply =
            support::text_reply(statuses[attempt - 1], format!("upstream down #{attempt}"));
        if let Reply::Respond(response) = &mut reply {
            response
                .headers_mut()
                .insert("x-attempt-seen", HeaderValue::from(attempt));
        }
        reply
    });
    let (result, elapsed) = call(&TerminalRetryLayer::default(), &mock, request()).await;
    let response = result.unwrap();
    assert_eq!(
        mock.attempts().count(),
        Schedule::default().delays().len() + 1
    );
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["x-attempt-seen"], "6");
    assert_eq!(text(response).await, "upstream down #6");
    assert_eq!(elapsed, Duration::from_secs(124));
}

#[tokio::test(start_paused = true)]
async fn an_outcome_slot_tells_how_the_last_attempt_was_classified() {
    // (replies, what the slot says after the call, attempts)
    let cases = [
        (
            vec![Reply::status(502), Reply::status(204)],
            Outcome::Success,
            2,
        ),
        (
            vec![Reply::status(503), Reply::status(404)],
            Outcome::Permanent,
            2,
        ),
        (vec![Reply::status(502); 3], Outcome::Transient, 3),
    ];
    for (replies, expected, attempts) in cases {
        let mock = Mock::scripted(replies);
        let slot = OutcomeSlot::default();
        let mut request = request();
        request.extensions_mut().insert(slot.clone());
        assert_eq!(slot.get(), None, "nothing is classified before the call");
        let (result, _) = call(&short_layer(), &mock, request).await;
        result.unwrap();
        assert_eq!(slot.get(), Some(expected));
        assert_eq!(mock.attempts().count(), attempts);
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_schedule_makes_one_attempt() {
    let layer = TerminalRetryLayer::new(
        TerminalRetryPolicy::default().with_schedule(Schedule::new([]).unwrap()),
    );
    let mock = Mock::new(|_, _| Reply::status(503));
    let (result, elapsed) = call(&layer, &mock, request()).await;
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(mock.attempts().count(), 1);
    assert_eq!(elapsed, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn default_layer_attempts_start_on_the_agreed_plan() {
    let mock = Mock::new(|_, _| Reply::status(502));
    let start = Instant::now();
    let result = TerminalRetryLayer::default()
        .layer(mock.clone())
        .oneshot(request())
        .await;
    assert_eq!(result.unwrap().status(), StatusCode::BAD_GATEWAY);
    assert_eq!(mock.attempts().offsets(start), secs(&DEFAULT_STARTS));
    assert_eq!(start.elapsed(), Duration::from_secs(124));
}

/// The offset of the second attempt after a first answered `reply`.
async fn second_attempt_after(layer: &TerminalRetryLayer, reply: Reply) -> Duration {
    let mock = Mock::scripted([reply]);
    let start = Instant::now();
    let (result, _) = call(layer, &mock, request()).await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    let offsets = mock.attempts().offsets(start);
    assert_eq!(offsets.len(), 2, "one retry, then success");
    offsets[1]
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_replace_the_schedule_on_429_and_503() {
    let layer = TerminalRetryLayer::default();
    // (status, Retry-After, expected delay in s); the schedule says 4 s.
    let cases = [
        (429, "1", 1),
        (503, "1", 1),
        (429, "0", 0),
        (429, "10", 10),
        (503, "10", 10),
        (503, " 120 ", 120),
        // Clamped to the default cap of five minutes.
        (429, "300", 300),
        (503, "301", 300),
        (429, "86400", 300),
        (503, "18446744073709551615", 300),
        // Ignored on every other status.
        (500, "1", 4),
        (502, "1", 4),
        (504, "1", 4),
        (408, "1", 4),
        (502, "60", 4),
        // Malformed, negative, fractional, overflowing: the schedule.
        (429, "soon", 4),
        (503, "", 4),
        (429, "-1", 4),
        (503, "-30", 4),
        (429, "+5", 4),
        (429, "1.5", 4),
        (503, "0.5", 4),
        (429, "1e3", 4),
        (503, "5 s", 4),
        (429, "18446744073709551616", 4),
        (503, "99999999999999999999999", 4),
        // A date in the past.
        (429, "Thu, 01 Jan 1970 00:00:00 GMT", 4),
        (503, "Tue, 14 Nov 2023 22:13:20 GMT", 4),
    ];
    for (status, value, expected) in cases {
        let offset = second_attempt_after(&layer, support::retry_after_reply(status, value)).await;
        assert_eq!(
            offset,
            Duration::from_secs(expected),
            "{status} with Retry-After {value:?}"
        );
    }
}

/// An idempotent server's "the first request with this key still runs":
/// a 409 with `Retry-After` is waited out and asked again; a 409 without it
/// stays a permanent refusal (the table above).
#[tokio::test(start_paused = true)]
async fn a_409_with_retry_after_is_transient_and_waits_what_it_asks() {
    let layer = TerminalRetryLayer::default();
    let offset = second_attempt_after(&layer, support::retry_after_reply(409, "2")).await;
    assert_eq!(offset, Duration::from_secs(2));
    // A value that cannot be read still says "ask again": the schedule's 4 s.
    let offset = second_attempt_after(&layer, support::retry_after_reply(409, "soon")).await;
    assert_eq!(offset, Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn retry_after_dates_replace_the_schedule_on_429_and_503() {
    let layer = TerminalRetryLayer::default();
    for (status, ahead) in [(429, 2), (503, 2), (429, 30), (503, 30)] {
        let date = date_in(ahead);
        let sent = SystemTime::now();
        let offset = second_attempt_after(&layer, support::retry_after_reply(status, &date)).await;
        assert_date_delay(offset, &date, sent, SystemTime::now());
    }
    // Far ahead: clamped to the default cap.
    let offset =
        second_attempt_after(&layer, support::retry_after_reply(503, &date_in(3600))).await;
    assert_eq!(offset, Duration::from_secs(300));
    // A date on another status, or already past: the schedule's 4 s.
    let offset = second_attempt_after(&layer, support::retry_after_reply(502, &date_in(2))).await;
    assert_eq!(offset, Duration::from_secs(4));
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
    let offset = second_attempt_after(&layer, support::retry_after_reply(429, &past)).await;
    assert_eq!(offset, Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn retry_after_cap_is_configurable_and_can_be_turned_off() {
    let patient = TerminalRetryLayer::new(
        TerminalRetryPolicy::default()
            .with_retry_after(RetryAfter::honor_up_to(Duration::from_secs(30)).unwrap()),
    );
    for (value, expected) in [("600", 30), ("30", 30), ("12", 12), ("2", 2)] {
        let offset = second_attempt_after(&patient, support::retry_after_reply(429, value)).await;
        assert_eq!(offset, Duration::from_secs(expected), "Retry-After {value}");
    }
    // A cap shorter than the schedule's entry clamps the server's delay only.
    let hasty = TerminalRetryLayer::new(
        TerminalRetryPolicy::default()
            .with_retry_after(RetryAfter::honor_up_to(Duration::from_secs(2)).unwrap()),
    );
    let offset = second_attempt_after(&hasty, support::retry_after_reply(503, "10")).await;
    assert_eq!(offset, Duration::from_secs(2));
    let offset = second_attempt_after(&hasty, Reply::status(503)).await;
    assert_eq!(offset, Duration::from_secs(4));

    let deaf = TerminalRetryLayer::new(
        TerminalRetryPolicy::default().with_retry_after(RetryAfter::ignore()),
    );
    let offset = second_attempt_after(&deaf, support::retry_after_reply(429, "1")).await;
    assert_eq!(offset, Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn retry_after_replaces_only_its_own_retry_and_never_adds_attempts() {
    // The second retry goes back to the schedule's second entry (8 s).
    let mock = Mock::scripted([
        support::retry_after_reply(429, "10"),
        Reply::status(502),
        Reply::status(200),
    ]);
    let start = Instant::now();
    call(&TerminalRetryLayer::default(), &mock, request())
        .await
        .0
        .unwrap();
    assert_eq!(mock.attempts().offsets(start), secs(&[0, 10, 18]));

    // A server that always asks to come back soon still gets six attempts.
    let mock = Mock::new(|_, _| support::retry_after_reply(503, "1"));
    let start = Instant::now();
    let (result, _) = call(&TerminalRetryLayer::default(), &mock, request()).await;
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(mock.attempts().offsets(start), secs(&[0, 1, 2, 3, 4, 5]));
}

/// A random source returning `values` in turn, and how many were drawn.
fn sequence(values: Vec<f64>) -> (Jitter, Arc<AtomicUsize>) {
    let drawn = Arc::new(AtomicUsize::new(0));
    let counter = drawn.clone();
    let jitter = Jitter::full().with_random(move || values[counter.fetch_add(1, Ordering::SeqCst)]);
    (jitter, drawn)
}

#[tokio::test(start_paused = true)]
async fn full_jitter_with_an_injected_source_gives_exact_delays() {
    // Delays 4, 8, 16, 32, 64 s scaled by 0, 0.25, 0.5, 0.75, 1.
    let (jitter, drawn) = sequence(vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    let layer = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_jitter(jitter));
    let mock = Mock::new(|_, _| Reply::status(502));
    let start = Instant::now();
    call(&layer, &mock, request()).await.0.unwrap();
    // 0, then +0, +2, +8, +24, +64.
    assert_eq!(mock.attempts().offsets(start), secs(&[0, 0, 2, 10, 34, 98]));
    assert_eq!(drawn.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn equal_jitter_keeps_at_least_half_of_each_delay() {
    let layer = TerminalRetryLayer::new(
        TerminalRetryPolicy::default().with_jitter(Jitter::equal().with_random(|| 0.5)),
    );
    let mock = Mock::new(|_, _| Reply::status(503));
    let start = Instant::now();
    call(&layer, &mock, request()).await.0.unwrap();
    // Three quarters of 4, 8, 16, 32, 64 s: 3, 6, 12, 24, 48 s.
    assert_eq!(mock.attempts().offsets(start), secs(&[0, 3, 9, 21, 45, 93]));
}

#[tokio::test(start_paused = true)]
async fn jitter_leaves_the_servers_retry_after_alone() {
    let layer = TerminalRetryLayer::new(
        TerminalRetryPolicy::default().with_jitter(Jitter::full().with_random(|| 0.0)),
    );
    let mock = Mock::scripted([support::retry_after_reply(429, "10"), Reply::status(502)]);
    let start = Instant::now();
    call(&layer, &mock, request()).await.0.unwrap();
    assert_eq!(mock.attempts().offsets(start), secs(&[0, 10, 10]));
}

#[tokio::test(start_paused = true)]
async fn a_retry_budget_is_shared_by_every_clone_of_a_layer() {
    // Every call deposits one token, a retry costs two: one call alone can
    // never retry, two calls' deposits pay for one retry.
    let budget = RetryBudget::new(Duration::from_secs(60), 0, 0.5).unwrap();
    let layer = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_budget(budget));
    let (first, second) = (layer.clone(), layer.clone());

    // A call through the first clone succeeds and deposits its token.
    let ok = Mock::new(|_, _| Reply::status(200));
    let (result, _) = call(&first, &ok, request()).await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);

    // A call through the second clone spends it together with its own.
    let flaky = Mock::scripted([Reply::status(502), Reply::status(502)]);
    let (result, elapsed) = call(&second, &flaky, request()).await;
    assert_eq!(result.unwrap().status(), StatusCode::BAD_GATEWAY);
    assert_eq!(flaky.attempts().count(), 2, "one retry paid by both calls");
    assert_eq!(elapsed, Duration::from_secs(4));

    // With the budget spent, the last outcome comes back at once.
    let down = Mock::new(|_, _| support::text_reply(503, "still down"));
    let (result, elapsed) = call(&first, &down, request()).await;
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text(response).await, "still down");
    assert_eq!(down.attempts().count(), 1);
    assert_eq!(elapsed, Duration::ZERO, "no sleep once the budget is spent");

    // That call's token pays, with the next call's, for one more retry.
    let down = Mock::new(|_, _| Reply::status(503));
    let (result, elapsed) = call(&second, &down, request()).await;
    assert_eq!(result.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.attempts().count(), 2);
    assert_eq!(elapsed, Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_returns_the_last_error_at_once() {
    let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.0).unwrap();
    let layer = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_budget(budget));
    let mock = Mock::new(|_, _| Reply::Close);
    let (result, elapsed) = call(&layer, &mock, request()).await;
    assert_eq!(
        result.unwrap_err(),
        MockError {
            call: 0,
            attempt: 1
        }
    );
    assert_eq!(elapsed, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn the_attempt_header_is_off_by_default() {
    let mock = Mock::new(|_, _| Reply::status(502));
    call(&TerminalRetryLayer::default(), &mock, request())
        .await
        .0
        .unwrap();
    let seen = mock.seen();
    assert_eq!(seen.len(), 6);
    for attempt in &seen {
        assert_eq!(attempt.parts.headers, seen[0].parts.headers);
        assert!(!attempt.parts.headers.contains_key(&ATTEMPT_HEADER));
    }
}

#[tokio::test(start_paused = true)]
async fn the_attempt_header_numbers_retried_attempts() {
    let layer =
        TerminalRetryLayer::new(TerminalRetryPolicy::default().with_attempt_header(ATTEMPT_HEADER));
    let mock = Mock::new(|_, _| Reply::status(502));
    call(&layer, &mock, request()).await.0.unwrap();
    let seen = mock.seen();
    assert_eq!(seen.len(), 6);
    assert!(!seen[0].parts.headers.contains_key(&ATTEMPT_HEADER));
    for attempt in &seen[1..] {
        let values: Vec<_> = attempt
            .parts
            .headers
            .get_all(&ATTEMPT_HEADER)
            .iter()
            .collect();
        assert_eq!(values, [attempt.attempt.to_string().as_str()]);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_during_a_sleep_stops_it() {
    let mock = Mock::new(|_, _| Reply::status(502));
    let mut call = Box::pin(
        TerminalRetryLayer::default()
            .layer(mock.clone())
            .oneshot(request()),
    );
    mock.attempts()
        .drive_until(&mut call, |p| p.finished == 1)
        .await;
    // Into the 4 s sleep before the second attempt.
    assert!(tokio::time::timeout(Duration::from_secs(1), &mut call)
        .await
        .is_err());
    drop(call);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(mock.attempts().count(), 1, "no attempt after the drop");
    // Nothing was left running in the background.
    assert_eq!(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_during_an_attempt_drops_that_attempt() {
    let mock = Mock::scripted([Reply::status(502), Reply::Hang]);
    let start = Instant::now();
    let mut call = Box::pin(
        TerminalRetryLayer::default()
            .layer(mock.clone())
            .oneshot(request()),
    );
    mock.attempts()
        .drive_until(&mut call, |p| p.started == 2)
        .await;
    assert_eq!(mock.attempts().in_flight(), 1);
    drop(call);
    // The hung attempt's future went with the call, at once.
    assert_eq!(mock.attempts().in_flight(), 0);
    assert_eq!(mock.attempts().progress().cancelled, 1);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(mock.attempts().offsets(start), secs(&[0, 4]));
    assert_eq!(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn two_hundred_concurrent_calls_keep_their_own_attempt_counts() {
    const CALLS: usize = 200;
    // Call i fails i % 4 times, then succeeds.
    let mock = Mock::new(|call, attempt| {
        if attempt <= call % 4 {
            Reply::status(503)
        } else {
            support::text_reply(200, format!("call {call}"))
        }
    });
    let layer = TerminalRetryLayer::default();
    let mut calls = JoinSet::new();
    for i in 0..CALLS {
        let service = layer.clone().layer(mock.clone());
        let mut request = request();
        request
            .headers_mut()
            .insert(CALL_HEADER, HeaderValue::from(i));
        calls.spawn(async move {
            let start = Instant::now();
            let response = service.oneshot(request).await.unwrap();
            (i, response, start.elapsed())
        });
    }
    let delays = Schedule::default().delays().to_vec();
    let mut done = 0;
    while let Some(joined) = calls.join_next().await {
        let (i, response, elapsed) = joined.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, format!("call {i}"));
        assert_eq!(mock.attempts_of(i), i % 4 + 1, "call {i}");
        assert_eq!(
            elapsed,
            delays[..i % 4].iter().sum::<Duration>(),
            "call {i}"
        );
        done += 1;
    }
    assert_eq!(done, CALLS);
    assert_eq!(
        mock.attempts().count(),
        (0..CALLS).map(|i| i % 4 + 1).sum::<usize>()
    );
}

/// An extension a caller attaches to its request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TraceId(u64);

#[tokio::test(start_paused = true)]
async fn every_attempt_sends_the_same_request_and_the_same_body_bytes() {
    let payload = Bytes::from(vec![b'x'; 64 * 1024]);
    let data = payload.as_ptr();
    let mut request = Request::builder()
        .method(Method::PUT)
        .uri("http://callbacks.test/api/daemon/tasks/t1/complete?lease=9")
        .header("content-type", "application/json")
        .header("x-many", "one")
        .header("x-many", "two")
        .body(Full::new(payload.clone()))
        .unwrap();
    request.extensions_mut().insert(TraceId(7));
    let expected = request.clone();

    let mock = Mock::new(|_, _| Reply::status(502));
    call(&TerminalRetryLayer::default(), &mock, request)
        .await
        .0
        .unwrap();
    let seen = mock.seen();
    assert_eq!(seen.len(), 6);
    for attempt in seen {
        assert_eq!(attempt.parts.method, expected.method());
        assert_eq!(attempt.parts.uri, *expected.uri());
        assert_eq!(attempt.parts.headers, *expected.headers());
        assert_eq!(attempt.parts.extensions.get::<TraceId>(), Some(&TraceId(7)));
        assert_eq!(attempt.body, payload);
        // Cloned, not copied: every attempt reads the caller's buffer.
        assert_eq!(attempt.body.as_ptr(), data, "attempt {}", attempt.attempt);
    }
}
