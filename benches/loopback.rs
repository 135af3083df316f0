//! Real HTTP on 127.0.0.1: the callback POST through hyper-util's client bare,
//! under the floor (`tower::retry::Retry` cloning the request and never
//! retrying) and with the layer, at 1 and 64 calls in flight, and through
//! the two reqwest stacks a user picks today, reqwest 0.13's own retry module
//! and reqwest-middleware 0.5 with reqwest-retry 0.9, against the same server.
//!
//! Criterion gives each contender's median; the same contenders then run in
//! alternation (`side_by_side`) for ratios that the machine's drifting load
//! does not skew.

mod common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tokio::runtime::Runtime;
use tower::{retry::Retry, Layer};
use tower_terminal_retry::{TerminalRetry, TerminalRetryLayer};

use common::{
    callback_request, hyper_client, run_calls, send_hyper, side_by_side, LoopbackServer,
    NeverRetry, ReqwestCallback,
};

const CONTENDERS: [&str; 5] = [
    "hyper_bare",
    "hyper_floor",
    "hyper_layer",
    "reqwest_builtin_retry",
    "reqwest_middleware_retry",
];

type HyperClient = Client<HttpConnector, Full<Bytes>>;

/// The three clients against one server, driven from a runtime of one thread
/// while the server has its own: one core each on a 2-core machine, whatever
/// the number of calls in flight.
struct Contenders {
    runtime: Runtime,
    request: Request<Full<Bytes>>,
    bare: HyperClient,
    floor: Retry<NeverRetry, HyperClient>,
    layered: TerminalRetry<HyperClient>,
    reqwest_builtin: Arc<ReqwestCallback>,
    reqwest_middleware: Arc<ReqwestCallback>,
    // Runs as long as the contenders.
    _server: LoopbackServer,
}

impl Contenders {
    fn new() -> Contenders {
        let server = LoopbackServer::start(200);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        // Built inside the runtime: the clients spawn their connection tasks on it.
        let (bare, reqwest_builtin, reqwest_middleware) = runtime.block_on(async {
            let builtin = ReqwestCallback::builtin_retry(&server.base());
            let middleware = ReqwestCallback::middleware_retry(&server.base());
            (hyper_client(), Arc::new(builtin), Arc::new(middleware))
        });
        Contenders {
            runtime,
            request: callback_request(&server.base()),
            floor: Retry::new(NeverRetry, bare.clone()),
            layered: TerminalRetryLayer::new().layer(bare.clone()),
            bare,
            reqwest_builtin,
            reqwest_middleware,
            _server: server,
        }
    }

    /// The time `contender` (one of [`CONTENDERS`]) takes for `calls` calls,
    /// `in_flight` at a time.
    fn run(&self, contender: &str, calls: u64, in_flight: u64) -> Duration {
        let request = self.request.clone();
        let run = match contender {
            "hyper_bare" => {
                let service = self.bare.clone();
                self.runtime.block_on(run_calls(calls, in_flight, move || {
                    send_hyper(service.clone(), request.clone())
                }))
            }
            "hyper_floor" => {
                let service = self.floor.clone();
                self.runtime.block_on(run_calls(calls, in_flight, move || {
                    send_hyper(service.clone(), request.clone())
                }))
            }
            "hyper_layer" => {
                let service = self.layered.clone();
                self.runtime.block_on(run_calls(calls, in_flight, move || {
                    send_hyper(service.clone(), request.clone())
                }))
            }
            _ => {
                let callback = match contender {
                    "reqwest_builtin_retry" => self.reqwest_builtin.clone(),
                    _ => self.reqwest_middleware.clone(),
                };
                self.runtime.block_on(run_calls(calls, in_flight, move || {
                    let callback = callback.clone();
                    async move { callback.send().await }
                }))
            }
        };
        run
    }
}

fn loopback(c: &mut Criterion) {
    let contenders = Contenders::new();
    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Elements(1));
    for in_flight in [1, 64] {
        for name in CONTENDERS {
            group.bench_with_input(BenchmarkId::new(name, in_flight), &in_flight, |b, &n| {
                b.iter_custom(|calls| contenders.run(name, calls, n))
            });
        }
    }
    group.finish();
}

fn loopback_side_by_side() {
    let contenders = Contenders::new();
    // About 50 ms per contender and round.
    for (in_flight, calls) in [(1, 1_500), (64, 4_000)] {
        side_by_side(
            &format!("loopback, {in_flight} in flight"),
            30,
            &CONTENDERS,
            0,
            |index| contenders.run(CONTENDERS[index], calls, in_flight) / calls as u32,
        );
    }
}

fn config() -> Criterion {
    // Short runs: `cargo bench` has 10 minutes on 2 cores for every target.
    Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .sample_size(40)
}

criterion_group! {
    name = benches;
    config = config();
    targets = loopback
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    loopback_side_by_side();
}
