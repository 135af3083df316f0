//! Heap allocations per successful call, counted by a counting global
//! allocator: the bare service, the floor (`tower::retry::Retry` that clones
//! the request and never retries) and the layer, in memory and over loopback.
//! Prints a Markdown table; run with `cargo bench --bench allocations`. The
//! peers package (`peers/`) prints the loopback rows of the peer stacks.

mod common;

use std::hint::black_box;

use tower::{retry::Retry, Layer};
use tower_terminal_retry::TerminalRetryLayer;

use common::{
    allocation_table::{self, per_call, row, CALLS},
    answer_200, call_now, callback_request,
    counting_alloc::{allocated_bytes, allocations, CountingAlloc},
    layer_all_options, NeverRetry,
};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    allocation_table::header();

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
    let mut layer = TerminalRetryLayer::default().layer(answer_200());
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

    let (server, runtime) = allocation_table::loopback();
    allocation_table::hyper_rows(&server, &runtime);
}
