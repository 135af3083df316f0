//! Heap allocations per successful call over loopback, one call in flight:
//! hyper-util's client bare and with the layer, as in the main package's
//! allocations bench, beside the two reqwest stacks a user picks today.
//! Prints a Markdown table; `cargo bench --bench allocations` in this folder.

#[path = "../../benches/common/mod.rs"]
mod common;
mod reqwest_stacks;

use common::{
    allocation_table::{self, per_call, row},
    counting_alloc::CountingAlloc,
};
use reqwest_stacks::ReqwestCallback;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    allocation_table::header();
    let (server, runtime) = allocation_table::loopback();
    allocation_table::hyper_rows(&server, &runtime);
    let (reqwest_builtin, reqwest_middleware) = runtime.block_on(async {
        (
            ReqwestCallback::builtin_retry(&server.base()),
            ReqwestCallback::middleware_retry(&server.base()),
        )
    });
    row(
        "loopback (client + server): reqwest 0.13, its own retry",
        per_call(|| runtime.block_on(reqwest_builtin.send())),
    );
    row(
        "loopback (client + server): reqwest-middleware 0.5 + reqwest-retry 0.9",
        per_call(|| runtime.block_on(reqwest_middleware.send())),
    );
}
