//! Heap allocations per successful call, counted by a counting global
//! allocator: the bare service, the floor (`tower::retry::Retry` that clones
//! the request and never retries) and the layer, in memory and over loopback.
//! Prints a Markdown table; run with `cargo bench --bench allocations`.

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use std::hint::black_box;

use tower::{retry::Retry, Layer};
use tower_terminal_retry::TerminalRetryLayer;

use common::{
    answer_200, call_now, callback_request, hyper_client, layer_all_options, send_hyper,
    LoopbackServer, NeverRetry, ReqwestCallback,
};
use counting_alloc::{allocated_bytes, allocations, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const CALLS: u64 = 10_000;

/// Allocations and bytes per call of `call`, after a warm-up that fills pools
/// and lazily built state.
fn per_call(mut call: impl FnMut()) -> (f64, f64) {
    for _ in 0..100 {
        call();
    }
    let (allocations_before, bytes_before) = (allocations(), allocated_bytes());
    for _ in 0..CALLS {
        call();
    }
    (
        (allocations() - allocations_before) as f64 / CALLS as f64,
        (allocated_bytes() - bytes_before) as f64 / CALLS as f64,
    )
}

fn row(name: &str, (allocations, bytes): (f64, f64)) {
    println!("| {name} | {allocations:.2} | {bytes:.0} |");
}

fn main() {
    println!("| per successful call | heap allocations | bytes allocated |");
    println!("|---|---:|---:|");

    // In memory: the request handed to each call is made before the count;
    // only the call (and dropping its response) is counted. A clone of a
    // template shares bytes the template made shareable already; a request
    // built afresh has its URI, header values and body in `Vec`-backed
    // `Bytes`, which the first clone turns into shared ones, one allocation
    // each.
    let template = callback_request("http://127.0.0.1:8080");
    let in_memory = |name: &str, fresh: bool, call: &mut dyn FnMut(http::Request<_>)| {
        let mut allocations_in_calls = 0;
        let mut bytes_in_calls = 0;
        for round in 0..CALLS + 100 {
            let request = if fresh {
                callback_request("http://127.0.0.1:8080")
            } else {
                template.clone()
            };
            let (allocations_before, bytes_before) = (allocations(), allocated_bytes());
            call(request);
            if round >= 100 {
                allocations_in_calls += allocations() - allocations_before;
                bytes_in_calls += allocated_bytes() - bytes_before;
            }
        }
        row(
            name,
            (
                allocations_in_calls as f64 / CALLS as f64,
                bytes_in_calls as f64 / CALLS as f64,
            ),
        );
    };
    row(
        "in memory: one request clone",
        per_call(|| drop(black_box(template.clone()))),
    );
    let mut bare = answer_200();
    let mut floor = Retry::new(NeverRetry, answer_200());
    let mut layer = TerminalRetryLayer::new().layer(answer_200());
    let mut layer_all = layer_all_options().layer(answer_200());
    for (fresh, request) in [(false, "template clone"), (true, "fresh request")] {
        in_memory(
            &format!("in memory, {request}: bare service"),
            fresh,
            &mut |request| drop(call_now(&mut bare, request)),
        );
        in_memory(
            &format!("in memory, {request}: floor, tower `Retry` never retrying"),
            fresh,
            &mut |request| drop(call_now(&mut floor, request)),
        );
        in_memory(
            &format!("in memory, {request}: `TerminalRetryLayer` default"),
            fresh,
            &mut |request| drop(call_now(&mut layer, request)),
        );
        in_memory(
            &format!("in memory, {request}: `TerminalRetryLayer` jitter + budget + header"),
            fresh,
            &mut |request| drop(call_now(&mut layer_all, request)),
        );
    }

    // Loopback, one call in flight: the server's thread allocates the same for
    // every client, so the differences between rows are the clients'.
    let server = LoopbackServer::start(200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let request = callback_request(&server.base());
    let client = runtime.block_on(async { hyper_client() });
    let layered = TerminalRetryLayer::new().layer(client.clone());
    let (reqwest_builtin, reqwest_middleware) = runtime.block_on(async {
        (
            ReqwestCallback::builtin_retry(&server.base()),
            ReqwestCallback::middleware_retry(&server.base()),
        )
    });
    row(
        "loopback (client + server): hyper-util bare",
        per_call(|| {
            runtime.block_on(send_hyper(client.clone(), request.clone()));
        }),
    );
    row(
        "loopback (client + server): hyper-util + layer",
        per_call(|| {
            runtime.block_on(send_hyper(layered.clone(), request.clone()));
        }),
    );
    row(
        "loopback (client + server): reqwest 0.13, its own retry",
        per_call(|| runtime.block_on(reqwest_builtin.send())),
    );
    row(
        "loopback (client + server): reqwest-middleware 0.5 + reqwest-retry 0.9",
        per_call(|| runtime.block_on(reqwest_middleware.send())),
    );
}
