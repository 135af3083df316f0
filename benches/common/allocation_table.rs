//! The allocation table, shared by this package and the peers package: heap
//! allocations per successful call, counted by [`CountingAlloc`], which the
//! bench installs as its global allocator.
//!
//! [`CountingAlloc`]: super::counting_alloc::CountingAlloc

use tokio::runtime::Runtime;
use tower::Layer;
use tower_terminal_retry::TerminalRetryLayer;

use super::{
    callback_request,
    counting_alloc::{allocated_bytes, allocations},
    hyper_client, send_hyper, LoopbackServer,
};

/// Calls counted per row.
pub const CALLS: u64 = 10_000;

/// Prints the table's header.
pub fn header() {
    println!("| per successful call | heap allocations | bytes allocated |");
    println!("|---|---:|---:|");
}

/// Allocations and bytes per call of `call`, after a warm-up that fills pools
/// and lazily built state.
pub fn per_call(mut call: impl FnMut()) -> (f64, f64) {
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

pub fn row(name: &str, (allocations, bytes): (f64, f64)) {
    println!("| {name} | {allocations:.2} | {bytes:.0} |");
}

/// A server and a client runtime for the loopback rows, one call in flight:
/// the server's thread allocates the same for every client, so the
/// differences between rows are the clients'.
pub fn loopback() -> (LoopbackServer, Runtime) {
    let server = LoopbackServer::start(200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    (server, runtime)
}

/// The loopback rows of hyper-util's client, bare and with the layer.
pub fn hyper_rows(server: &LoopbackServer, runtime: &Runtime) {
    let request = callback_request(&server.base());
    let client = runtime.block_on(async { hyper_client() });
    let layered = TerminalRetryLayer::default().layer(client.clone());
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
}
