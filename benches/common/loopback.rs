//! The loopback bench, shared by this package (the layer against hyper-util
//! bare and the floor) and the peers package (which adds the peer stacks):
//! the callback POST on real HTTP over 127.0.0.1, at 1 and 64 calls in flight.
//!
//! Criterion gives each contender's median; the same contenders then run in
//! alternation ([`side_by_side`]) for ratios that the machine's drifting load
//! does not skew.

use std::{future::Future, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;
use tower::{retry::Retry, Layer};
use tower_terminal_retry::TerminalRetryLayer;

use super::{
    callback_request, hyper_client, run_calls, send_hyper, side_by_side, LoopbackServer, NeverRetry,
};

/// How a contender makes `calls` calls, `in_flight` at a time, on the bench's
/// runtime, and the time they took.
type Run = Box<dyn Fn(&Runtime, u64, u64) -> Duration>;

/// The contenders against one server, driven from a runtime of one thread
/// while the server has its own: one core each on a 2-core machine, whatever
/// the number of calls in flight. The first three are hyper-util's client
/// bare (`hyper_bare`, the baseline of the ratios), under the floor
/// (`hyper_floor`: `tower::retry::Retry` cloning the request and never
/// retrying) and with the layer (`hyper_layer`).
pub struct Contenders {
    runtime: Runtime,
    server: LoopbackServer,
    contenders: Vec<(&'static str, Run)>,
}

impl Contenders {
    pub fn new() -> Contenders {
        let mut contenders = Contenders {
            server: LoopbackServer::start(200),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            contenders: Vec::new(),
        };
        let request = callback_request(&contenders.server.base());
        // One client, so one connection pool, under all three.
        let client = {
            let _runtime = contenders.runtime.enter();
            hyper_client()
        };
        contenders.add("hyper_bare", |_| {
            let (service, request) = (client.clone(), request.clone());
            move || send_hyper(service.clone(), request.clone())
        });
        contenders.add("hyper_floor", |_| {
            let (service, request) = (Retry::new(NeverRetry, client.clone()), request.clone());
            move || send_hyper(service.clone(), request.clone())
        });
        contenders.add("hyper_layer", |_| {
            let service = TerminalRetryLayer::default().layer(client);
            move || send_hyper(service.clone(), request.clone())
        });
        contenders
    }

    /// Adds the contender `name`: `build` makes, from the server's base URL
    /// (`http://host:port`), the function that sends one callback and reads
    /// the whole answer.
    pub fn add<F, Fut>(&mut self, name: &'static str, build: impl FnOnce(&str) -> F)
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        // Built inside the runtime: the clients spawn their connection tasks on it.
        let call = {
            let _runtime = self.runtime.enter();
            build(&self.server.base())
        };
        let run: Run = Box::new(move |runtime, calls, in_flight| {
            runtime.block_on(run_calls(calls, in_flight, call.clone()))
        });
        self.contenders.push((name, run));
    }

    /// The time contender `index` takes for `calls` calls, `in_flight` at a
    /// time.
    fn run(&self, index: usize, calls: u64, in_flight: u64) -> Duration {
        (self.contenders[index].1)(&self.runtime, calls, in_flight)
    }

    fn names(&self) -> Vec<&'static str> {
        self.contenders.iter().map(|(name, _)| *name).collect()
    }
}

/// Runs the bench on the contenders `make` returns: criterion's medians, then
/// side by side (each on contenders of their own).
pub fn main(make: impl Fn() -> Contenders) {
    let mut criterion = config().configure_from_args();
    medians(&mut criterion, &make());
    Criterion::default().configure_from_args().final_summary();

    let contenders = make();
    let names = contenders.names();
    // About 50 ms per contender and round.
    for (in_flight, calls) in [(1, 1_500), (64, 4_000)] {
        side_by_side(
            &format!("loopback, {in_flight} in flight"),
            30,
            &names,
            0,
            |index| contenders.run(index, calls, in_flight) / calls as u32,
        );
    }
}

fn medians(c: &mut Criterion, contenders: &Contenders) {
    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Elements(1));
    for in_flight in [1, 64] {
        for (index, name) in contenders.names().into_iter().enumerate() {
            group.bench_with_input(BenchmarkId::new(name, in_flight), &in_flight, |b, &n| {
                b.iter_custom(|calls| contenders.run(index, calls, n))
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: `cargo bench` has 10 minutes on 2 cores for every target.
    Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .sample_size(40)
}
