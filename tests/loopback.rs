//! The layer on hyper-util's legacy client against a real HTTP server on
//! 127.0.0.1, on tokio's paused clock (server and client share the runtime).

mod support;

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use tokio::{sync::watch, task::JoinSet, time::Instant};
use tower::{timeout::error::Elapsed, BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_terminal_retry::{
    test_server::{Reply, TestServer},
    TerminalRetryLayer, TerminalRetryPolicy,
};

use support::{
    assert_date_delay, client, date_in, find_source, post, refused_url, secs, text, Attempts,
    DEFAULT_STARTS,
};

/// When each request reached `server`, as an offset from `origin`.
fn arrivals(server: &TestServer, origin: Instant) -> Vec<Duration> {
    server
        .requests()
        .iter()
        .map(|request| request.at.duration_since(origin))
        .collect()
}

/// Serves `replies` then 200, sends one POST through the default layer, and
/// returns the server, the result and when the call started.
async fn exchange(
    replies: impl IntoIterator<Item = Reply>,
) -> (
    TestServer,
    Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    Instant,
) {
    let server = TestServer::scripted(replies).await.unwrap();
    let start = Instant::now();
    let result = TerminalRetryLayer::default()
        .layer(client())
        .oneshot(post(server.url("/api/daemon/tasks/t1/complete"), "{}"))
        .await;
    (server, result, start)
}

/// Three `status` replies, then success: four attempts on the default plan.
async fn burst_then_success(status: u16) {
    let burst = vec![support::text_reply(status, "hiccup"); 3];
    let (server, result, start) = exchange(burst).await;
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "after a {status} burst");
    assert_eq!(arrivals(&server, start), secs(&DEFAULT_STARTS[..4]));
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_500_is_retried() {
    burst_then_success(500).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_502_is_retried() {
    burst_then_success(502).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_503_is_retried() {
    burst_then_success(503).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_504_is_retried() {
    burst_then_success(504).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_408_is_retried() {
    burst_then_success(408).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_429_is_retried() {
    burst_then_success(429).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_longer_than_the_schedule_returns_the_last_502_with_its_body() {
    let (server, result, start) = exchange([
        support::text_reply(500, "#1"),
        support::text_reply(502, "#2"),
        support::text_reply(503, "#3"),
        support::text_reply(504, "#4"),
        support::text_reply(408, "#5"),
        support::text_reply(502, "bad gateway #6"),
    ])
    .await;
    let response = result.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(text(response).await, "bad gateway #6");
    assert_eq!(arrivals(&server, start), secs(&DEFAULT_STARTS));
}

#[tokio::test(start_paused = true)]
async fn a_permanent_4xx_bails_after_one_attempt() {
    for status in [400, 401, 403, 404, 409, 422] {
        let (server, result, start) = exchange([support::text_reply(status, "rejected")]).await;
        let response = result.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(text(response).await, "rejected");
        assert_eq!(server.requests().len(), 1, "{status}");
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_are_honoured_on_429_and_503_only() {
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
    // (status, Retry-After, expected delay in s); the schedule says 4 s.
    let cases = [
        (429, "2", 2),
        (503, "20", 20),
        (429, "86400", 300),
        (502, "2", 4),
        (503, "soon", 4),
        (429, "-3", 4),
        (503, "2.5", 4),
        (429, "99999999999999999999999", 4),
        (429, past.as_str(), 4),
    ];
    for (status, value, expected) in cases {
        let (server, result, start) = exchange([support::retry_after_reply(status, value)]).await;
        assert_eq!(result.unwrap().status(), StatusCode::OK);
        let arrivals = arrivals(&server, start);
        assert_eq!(arrivals, secs(&[0, expected]), "{status} {value:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_dates_are_honoured_on_429_and_503() {
    for (status, ahead) in [(429, 10), (503, 7)] {
        let date = date_in(ahead);
        let sent = SystemTime::now();
        let (server, result, start) = exchange([support::retry_after_reply(status, &date)]).await;
        let returned = SystemTime::now();
        assert_eq!(result.unwrap().status(), StatusCode::OK);
        let arrivals = arrivals(&server, start);
        assert_eq!(arrivals.len(), 2, "{status} {date}");
        assert_date_delay(arrivals[1], &date, sent, returned);
    }
    let (server, _, start) = exchange([support::retry_after_reply(503, &date_in(3600))]).await;
    assert_eq!(
        arrivals(&server, start),
        secs(&[0, 300]),
        "clamped to the cap"
    );
}

#[tokio::test(start_paused = true)]
async fn a_connection_closed_before_any_response_is_retried() {
    let (server, result, start) = exchange([Reply::Close, Reply::Close]).await;
    assert_eq!(result.unwrap().status(), StatusCode::OK);
    assert_eq!(arrivals(&server, start), secs(&DEFAULT_STARTS[..3]));
}

#[tokio::test(start_paused = true)]
async fn connections_closed_to_the_end_return_the_last_error() {
    let (server, result, start) = exchange(vec![Reply::Close; 6]).await;
    let error = result.unwrap_err();
    let cause = find_source::<hyper::Error>(&error).expect("hyper's error inside");
    assert!(cause.is_incomplete_message(), "{error:?}");
    assert_eq!(arrivals(&server, start), secs(&DEFAULT_STARTS));
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_is_retried_then_returned() {
    let attempts = Attempts::new();
    let service = ServiceBuilder::new()
        .layer(TerminalRetryLayer::default())
        .layer(attempts.clone())
        .service(client());
    let start = Instant::now();
    let error = service
        .oneshot(post(refused_url("/api/daemon/tasks/t1/fail").await, "{}"))
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error:?}");
    let cause = find_source::<io::Error>(&error).expect("an I/O error inside");
    assert_eq!(cause.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(attempts.offsets(start), secs(&DEFAULT_STARTS));
}

#[tokio::test(start_paused = true)]
async fn a_hanging_server_is_cut_by_a_per_attempt_timeout_inside_the_layer() {
    let server = TestServer::start(|_| Reply::Hang).await.unwrap();
    let attempts = Attempts::new();
    let service = ServiceBuilder::new()
        .layer(TerminalRetryLayer::default())
        .timeout(Duration::from_secs(10))
        .layer(attempts.clone())
        .service(client());
    let start = Instant::now();
    let error: BoxError = service
        .oneshot(post(server.url("/api/daemon/tasks/t1/complete"), "{}"))
        .await
        .unwrap_err();
    assert!(
        error.is::<Elapsed>(),
        "the last error, unchanged: {error:?}"
    );
    // Each attempt hangs 10 s, then the schedule's delay.
    assert_eq!(attempts.offsets(start), secs(&[0, 14, 32, 58, 100, 174]));
    assert_eq!(attempts.progress().cancelled, 6);
    // Every attempt reached the server, which hung until the timeout cut it.
    assert_eq!(arrivals(&server, start), attempts.offsets(start));
}

#[tokio::test(start_paused = true)]
async fn two_hundred_concurrent_calls_keep_their_own_attempt_counts() {
    const CALLS: usize = 200;
    // Call i (its path says which) fails i % 4 times, then succeeds.
    let seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let counts = seen.clone();
    let server = TestServer::start(move |request| {
        let path = request.uri.path().to_owned();
        let i: usize = path.trim_start_matches("/call/").parse().unwrap();
        let mut counts = counts.lock().unwrap();
        let attempt = counts.entry(path).or_default();
        *attempt += 1;
        if *attempt <= i % 4 {
            support::text_reply(503, "busy")
        } else {
            support::text_reply(200, format!("call {i} attempt {attempt}"))
        }
    })
    .await
    .unwrap();

    let (layer, client) = (TerminalRetryLayer::default(), client());
    let mut calls = JoinSet::new();
    for i in 0..CALLS {
        let service = layer.clone().layer(client.clone());
        let request = post(
            server.url(&format!("/call/{i}")),
            format!("{{\"call\":{i}}}"),
        );
        calls.spawn(async move { (i, service.oneshot(request).await) });
    }
    let mut done = 0;
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.unwrap();
        let response = result.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "call {i}");
        let attempts = i % 4 + 1;
        assert_eq!(text(response).await, format!("call {i} attempt {attempts}"));
        assert_eq!(seen.lock().unwrap()[&format!("/call/{i}")], attempts);
        done += 1;
    }
    assert_eq!(done, CALLS);
    let total: usize = (0..CALLS).map(|i| i % 4 + 1).sum();
    assert_eq!(server.requests().len(), total);
}

/// A PUT with a query, repeated headers, a credential and a 16 KiB body.
fn detailed_request(url: String) -> Request<support::Body> {
    let body: String = (0..2048)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    Request::builder()
        .method(Method::PUT)
        .uri(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer callback-token")
        .header("x-many", "one")
        .header("x-many", "two")
        .body(Full::from(body.repeat(8)))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_attempt_sends_the_same_method_uri_headers_and_body() {
    // Six failures then 200: retries beyond the schedule would show, not spin.
    let server = TestServer::scripted(vec![Reply::status(502); 6])
        .await
        .unwrap();
    let request = detailed_request(server.url("/api/daemon/tasks/t1/complete?lease=9"));
    let expected = request.clone();
    let response = TerminalRetryLayer::default()
        .layer(client())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let seen = server.requests();
    assert_eq!(seen.len(), 6);
    let body = http_body_util::BodyExt::collect(expected.body().clone())
        .await
        .unwrap()
        .to_bytes();
    for request in &seen {
        assert_eq!(request.method, Method::PUT);
        assert_eq!(request.uri, "/api/daemon/tasks/t1/complete?lease=9");
        for name in expected.headers().keys() {
            let sent: Vec<_> = expected.headers().get_all(name).iter().collect();
            let received: Vec<_> = request.headers.get_all(name).iter().collect();
            assert_eq!(received, sent, "{name}");
        }
        // Whatever the client adds (host, content-length) is the same too.
        assert_eq!(request.headers, seen[0].headers);
        assert_eq!(request.body, body);
    }
}

#[tokio::test(start_paused = true)]
async fn the_attempt_header_reaches_the_server_only_when_asked_for() {
    let name = HeaderName::from_static("x-retry-attempt");
    let (server, _, _) = exchange([Reply::status(502), Reply::status(502)]).await;
    assert!(server
        .requests()
        .iter()
        .all(|request| !request.headers.contains_key(&name)));

    let server = TestServer::scripted(vec![Reply::status(503); 6])
        .await
        .unwrap();
    let response =
        TerminalRetryLayer::new(TerminalRetryPolicy::default().with_attempt_header(name.clone()))
            .layer(client())
            .oneshot(post(server.url("/cb"), "{}"))
            .await
            .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let values: Vec<Option<HeaderValue>> = server
        .requests()
        .iter()
        .map(|request| request.headers.get(&name).cloned())
        .collect();
    let expected: Vec<Option<HeaderValue>> = (1..=6)
        .map(|k: u32| (k > 1).then(|| HeaderValue::from(k)))
        .collect();
    assert_eq!(values, expected);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_during_a_sleep_sends_nothing_more() {
    let server = TestServer::start(|_| Reply::status(502)).await.unwrap();
    let attempts = Attempts::new();
    let service = ServiceBuilder::new()
        .layer(TerminalRetryLayer::default())
        .layer(attempts.clone())
        .service(client());
    let mut call = Box::pin(service.oneshot(post(server.url("/cb"), "{}")));
    attempts.drive_until(&mut call, |p| p.finished == 1).await;
    // Two seconds into the 4 s sleep.
    assert!(tokio::time::timeout(Duration::from_secs(2), &mut call)
        .await
        .is_err());
    drop(call);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(server.requests().len(), 1);
    assert_eq!(attempts.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_during_a_hung_attempt_sends_nothing_more() {
    // The server reports each request it receives, so the test drops the call
    // only once the second attempt is hanging there.
    let (arrived, mut received) = watch::channel(0);
    let server = TestServer::start(move |_| {
        let mut seen = 0;
        arrived.send_modify(|count| {
            *count += 1;
            seen = *count;
        });
        if seen == 1 {
            Reply::status(502)
        } else {
            Reply::Hang
        }
    })
    .await
    .unwrap();
    let attempts = Attempts::new();
    let service = ServiceBuilder::new()
        .layer(TerminalRetryLayer::default())
        .layer(attempts.clone())
        .service(client());
    let start = Instant::now();
    let mut call = Box::pin(service.oneshot(post(server.url("/cb"), "{}")));
    tokio::select! {
        biased;
        seen = received.wait_for(|count| *count == 2) => { seen.unwrap(); }
        _ = &mut call => panic!("the call ended while the server hung"),
    }
    assert_eq!(attempts.in_flight(), 1);
    drop(call);
    assert_eq!(
        attempts.in_flight(),
        0,
        "the hung attempt went with the call"
    );
    assert_eq!(attempts.progress().cancelled, 1);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(arrivals(&server, start), secs(&[0, 4]));
}
