//! Real HTTP on 127.0.0.1: the callback POST through hyper-util's client bare
//! and with the layer, at 1 and 64 calls in flight, and through reqwest with
//! reqwest-middleware and reqwest-retry, against the same server.

mod common;

use std::{sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tower::Layer;
use tower_terminal_retry::TerminalRetryLayer;

use common::{
    callback_request, hyper_client, run_calls, send_hyper, LoopbackServer, ReqwestRetryCallback,
};

fn loopback(c: &mut Criterion) {
    let server = LoopbackServer::start(200);
    // The client on a runtime of one thread, the server on another: one core
    // each on a 2-core machine, whatever the number of calls in flight.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let request = callback_request(&server.base());

    // Built inside the runtime: the clients spawn their connection tasks on it.
    let (bare, layered, reqwest_retry) = runtime.block_on(async {
        let client = hyper_client();
        let layered = TerminalRetryLayer::new().layer(client.clone());
        (
            client,
            layered,
            Arc::new(ReqwestRetryCallback::new(&server.base())),
        )
    });

    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Elements(1));
    for in_flight in [1, 64] {
        group.bench_with_input(
            BenchmarkId::new("hyper_bare", in_flight),
            &in_flight,
            |b, &n| {
                b.iter_custom(|calls| {
                    let (service, request) = (bare.clone(), request.clone());
                    runtime.block_on(run_calls(calls, n, move || {
                        send_hyper(service.clone(), request.clone())
                    }))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("hyper_layer", in_flight),
            &in_flight,
            |b, &n| {
                b.iter_custom(|calls| {
                    let (service, request) = (layered.clone(), request.clone());
                    runtime.block_on(run_calls(calls, n, move || {
                        send_hyper(service.clone(), request.clone())
                    }))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("reqwest_retry", in_flight),
            &in_flight,
            |b, &n| {
                b.iter_custom(|calls| {
                    let callback = reqwest_retry.clone();
                    runtime.block_on(run_calls(calls, n, move || {
                        let callback = callback.clone();
                        async move { callback.send().await }
                    }))
                })
            },
        );
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: `cargo bench` has 10 minutes on 2 cores for every target.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = loopback
}
criterion_main!(benches);
