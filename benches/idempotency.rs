//! The receiving end's cost, on real HTTP over 127.0.0.1 at 64 requests in
//! flight: a handler bare, the same handler behind `IdempotencyLayer` with
//! the memory store (every request a first one, with a key of its own), a
//! replayed repeat (one key for every request), and the PostgreSQL store's
//! first request and repeat.
//!
//! The server runs on a thread and runtime of its own, the client (hyper-
//! util's, the callback POST of 204 bytes with an `idempotency-key`) on the
//! bench's. Criterion gives each contender's median; the same contenders
//! then run in alternation (`side_by_side`) for ratios that the machine's
//! drifting load does not skew.
//!
//! `cargo bench --bench idempotency`: the PostgreSQL rows against
//! `DATABASE_URL` when it is set, else a throwaway server with PostgreSQL's
//! default durability (`fsync` and `synchronous_commit` on).

mod common;
#[path = "../tests/exactly_once_support/mod.rs"]
mod exactly_once_support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};
use tower_terminal_retry::idempotency::{IdempotencyLayer, MemoryStore, PostgresStore};

use common::{
    callback_request, database::Database, hyper_client, run_calls, send_hyper, side_by_side,
};
use exactly_once_support::{buffered, serve};

const IN_FLIGHT: u64 = 64;

/// The handler: answers 200 with a small JSON body at once.
fn handler() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|_: Request<Full<Bytes>>| async {
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::from(r#"{"accepted":true}"#))
            .unwrap())
    })
}

/// Serves `service` on a loopback port of the server's runtime.
fn start<S>(server: &Runtime, service: S) -> SocketAddr
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    server.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(listener, move |request| {
            let service = service.clone();
            async move {
                let request = buffered(request).await?;
                Ok::<_, hyper::Error>(
                    service
                        .oneshot(request)
                        .await
                        .unwrap_or_else(|n| match n {}),
                )
            }
        });
        addr
    })
}

/// A contender: a server, and whether each request takes a key of its own
/// (a first request) or the one key of every request (a repeat).
struct Contender {
    name: &'static str,
    addr: SocketAddr,
    fresh_keys: bool,
}

struct Bench {
    client_runtime: Runtime,
    contenders: Vec<Contender>,
    next_key: Arc<AtomicU64>,
}

impl Bench {
    /// `calls` callbacks to contender `index`, 64 in flight, and the time
    /// they took.
    fn run(&self, index: usize, calls: u64) -> Duration {
        let contender = &self.contenders[index];
        let base = format!("http://{}", contender.addr);
        let (fresh, next_key) = (contender.fresh_keys, self.next_key.clone());
        let client = {
            let _runtime = self.client_runtime.enter();
            hyper_client()
        };
        let call = move || {
            let mut request = callback_request(&base);
            let key = match fresh {
                true => format!("bench-{}", next_key.fetch_add(1, Ordering::Relaxed)),
                false => "bench-repeated".to_owned(),
            };
            let key = HeaderValue::from_str(&key).unwrap();
            request.headers_mut().insert("idempotency-key", key);
            send_hyper(client.clone(), request)
        };
        self.client_runtime
            .block_on(run_calls(calls, IN_FLIGHT, call))
    }
}

fn main() {
    // The server's own thread and runtime: one core each on 2 cores.
    let server = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let serving = server.clone();
    std::thread::spawn(move || serving.block_on(std::future::pending::<()>()));

    let directory =
        std::env::temp_dir().join(format!("idempotency-bench-db-{}", std::process::id()));
    let database = Database::from_env_or_start(&directory);
    let table = format!("bench_idempotency_{}", std::process::id());
    let postgres = || {
        server
            .block_on(PostgresStore::connect(&database.url(), &table))
            .expect("a PostgreSQL store")
    };
    let memory = || IdempotencyLayer::new(MemoryStore::new());
    let contender = |name, service_addr, fresh_keys| Contender {
        name,
        addr: service_addr,
        fresh_keys,
    };
    let contenders = vec![
        contender("bare", start(&server, handler()), true),
        contender(
            "memory_first",
            start(&server, memory().layer(handler())),
            true,
        ),
        contender(
            "memory_replay",
            start(&server, memory().layer(handler())),
            false,
        ),
        contender(
            "postgres_first",
            start(&server, IdempotencyLayer::new(postgres()).layer(handler())),
            true,
        ),
        contender(
            "postgres_replay",
            start(&server, IdempotencyLayer::new(postgres()).layer(handler())),
            false,
        ),
    ];
    let bench = Bench {
        client_runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        contenders,
        next_key: Arc::default(),
    };

    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20)
        .configure_from_args();
    let mut group = criterion.benchmark_group("idempotency");
    group.throughput(Throughput::Elements(1));
    for (index, contender) in bench.contenders.iter().enumerate() {
        let id = BenchmarkId::new(contender.name, IN_FLIGHT);
        group.bench_function(id, |b| b.iter_custom(|calls| bench.run(index, calls)));
    }
    group.finish();
    criterion.final_summary();

    let names: Vec<&str> = bench
        .contenders
        .iter()
        .map(|contender| contender.name)
        .collect();
    // About 40 ms per contender and round in memory; the PostgreSQL store's
    // first requests wait for two commits each, a few hundred a round.
    side_by_side("in memory, 64 in flight", 30, &names[..3], 0, |index| {
        bench.run(index, 4_000) / 4_000
    });
    let postgres_rows = [0, 3, 4];
    let names: Vec<&str> = postgres_rows.iter().map(|&index| names[index]).collect();
    side_by_side("PostgreSQL, 64 in flight", 5, &names, 0, |row| {
        let calls = if row == 0 { 4_000 } else { 400 };
        bench.run(postgres_rows[row], calls) / calls as u32
    });
    drop(database);
}
