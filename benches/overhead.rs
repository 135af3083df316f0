//! The happy path in memory: what the layer adds to a call that succeeds at
//! once, against the bare service and against the floor any tower retry pays
//! (`tower::retry::Retry` cloning the request for a retry that never comes);
//! and the per-response work (classifier, `Retry-After` parser) on its own.

mod common;

use std::{
    hint::black_box,
    time::{Duration, Instant, SystemTime},
};

use criterion::{criterion_group, BatchSize, Criterion};
use http::{HeaderValue, Response, StatusCode};
use tower::{retry::Retry, Layer};
use tower_terminal_retry::{
    classify_status, parse_retry_after, Classify, DefaultClassifier, Recovery, TerminalRetryLayer,
    TerminalRetryPolicy,
};

use common::{answer_200, call_now, callback_request, layer_all_options, side_by_side, NeverRetry};

fn happy_path(c: &mut Criterion) {
    let request = callback_request("http://127.0.0.1:8080");
    let mut group = c.benchmark_group("happy_path");

    group.bench_function("request_clone", |b| b.iter(|| black_box(&request).clone()));

    // The request handed to each call is cloned outside the measurement: what
    // is timed is the call itself, and the clone the retry layers make in it.
    let mut bare = answer_200();
    group.bench_function("bare", |b| {
        b.iter_batched(
            || request.clone(),
            |request| call_now(&mut bare, request),
            BatchSize::SmallInput,
        )
    });
    let mut floor = Retry::new(NeverRetry, answer_200());
    group.bench_function("floor_tower_retry", |b| {
        b.iter_batched(
            || request.clone(),
            |request| call_now(&mut floor, request),
            BatchSize::SmallInput,
        )
    });
    let mut layer = TerminalRetryLayer::default().layer(answer_200());
    group.bench_function("layer_default", |b| {
        b.iter_batched(
            || request.clone(),
            |request| call_now(&mut layer, request),
            BatchSize::SmallInput,
        )
    });
    let mut layer = layer_with_recovery();
    group.bench_function("layer_recovery", |b| {
        b.iter_batched(
            || request.clone(),
            |request| call_now(&mut layer, request),
            BatchSize::SmallInput,
        )
    });
    let mut layer = layer_all_options().layer(answer_200());
    group.bench_function("layer_jitter_budget_header", |b| {
        b.iter_batched(
            || request.clone(),
            |request| call_now(&mut layer, request),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn per_response(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_response");

    let statuses = [200, 204, 404, 408, 429, 500, 502, 503]
        .map(|code| StatusCode::from_u16(code).expect("a status"));
    group.bench_function("classify_status_x8", |b| {
        b.iter(|| {
            for status in black_box(&statuses) {
                black_box(classify_status(*status));
            }
        })
    });
    let ok: Result<Response<()>, std::io::Error> = Ok(Response::new(()));
    group.bench_function("default_classifier_ok", |b| {
        b.iter(|| DefaultClassifier.classify(black_box(&ok)))
    });

    let now = SystemTime::now();
    let in_ten_minutes = httpdate::fmt_http_date(now + Duration::from_secs(600));
    for (name, value) in [
        ("retry_after_seconds", "120".to_owned()),
        ("retry_after_http_date", in_ten_minutes),
        ("retry_after_malformed", "soon, maybe".to_owned()),
    ] {
        let value = HeaderValue::from_str(&value).expect("a header value");
        group.bench_function(name, |b| {
            b.iter(|| parse_retry_after(black_box(&value), now))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: `cargo bench` has 10 minutes on 2 cores for every target.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

/// The default layer with early release on, nobody waiting: a success reads
/// one atomic.
fn layer_with_recovery() -> tower::retry::Retry<TerminalRetryPolicy, common::Answer200> {
    let recovery = Recovery::new(50_000).expect("a rate");
    TerminalRetryLayer::new(TerminalRetryPolicy::default().with_recovery(recovery))
        .layer(answer_200())
}

/// The services in alternation, for ratios that the machine's drifting load
/// does not skew (see `side_by_side`).
fn happy_path_side_by_side() {
    const CALLS: usize = 20_000;
    let template = callback_request("http://127.0.0.1:8080");
    let mut bare = answer_200();
    let mut floor = Retry::new(NeverRetry, answer_200());
    let mut layer = TerminalRetryLayer::default().layer(answer_200());
    let mut layer_all = layer_all_options().layer(answer_200());
    let mut layer_recovery = layer_with_recovery();
    side_by_side(
        "happy path in memory",
        100,
        &[
            "bare",
            "floor_tower_retry",
            "layer_default",
            "layer_jitter_budget_header",
            "layer_recovery",
        ],
        1,
        |index| {
            // Cloned before the clock starts, as in the criterion benches.
            let requests: Vec<_> = (0..CALLS).map(|_| template.clone()).collect();
            let mut responses = Vec::with_capacity(CALLS);
            let start = Instant::now();
            for request in requests {
                responses.push(match index {
                    0 => call_now(&mut bare, request),
                    1 => call_now(&mut floor, request),
                    2 => call_now(&mut layer, request),
                    3 => call_now(&mut layer_all, request),
                    _ => call_now(&mut layer_recovery, request),
                });
            }
            start.elapsed() / CALLS as u32
        },
    );
}

criterion_group! {
    name = benches;
    config = config();
    targets = happy_path, per_response
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    happy_path_side_by_side();
}
