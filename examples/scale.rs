//! A long outage at scale: 100,000 callbacks parked in backoff, then the
//! server comes back.
//!
//! Run with `cargo run --release --example scale` (about a minute).
//!
//! A loopback server answers 503, then 200. All calls go out at once through
//! hyper-util's client and the layer, on the default schedule halved (2 s
//! doubling, then every 16 s, long enough that no call runs out of retries).
//! The run with jitter off brings the server back once every call has been
//! asleep for [`PARKED_FOR`], measuring the parked state meanwhile; the run
//! with full jitter brings it back at the same moment. The program reports:
//! - memory per parked call, resident (`VmRSS`) and heap (a counting
//!   allocator), beyond the request's own bytes;
//! - CPU time while every call sleeps;
//! - the time from recovery until every call has succeeded, and the peak
//!   request rate in the first second after recovery;
//!
//! and draws the request rate over time of every run in `docs/recovery.svg`.
//! Each run has a fresh process, so that none inherits another's heap.
//!
//! Each mode runs twice: without early release, and with a
//! [`Recovery`](tower_terminal_retry::Recovery) releasing 50,000 parked
//! calls a second once a request succeeds, reporting how many were released
//! early. With jitter off the daemon's heartbeat (one call every 500 ms
//! through a layer holding the same recovery) is what sees the server back.
//!
//! Sockets stay bounded because the client speaks HTTP/2 over one connection
//! (`http2_only`). Attempts in flight stay bounded by a concurrency limit
//! inside the layer ([`IN_FLIGHT`]): a parked call holds no permit, so all
//! 100,000 calls can sleep at once, but a wave of retries reaches the client
//! at most [`IN_FLIGHT`] at a time. Without the limit the first wave queues
//! 100,000 requests in the client at once, and the memory that flood frees
//! stays resident: about 5.2 KB per parked call instead of 1.6 KB.

#[path = "../benches/common/mod.rs"]
mod common;

use std::{
    fmt::Write as _,
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_terminal_retry::{Jitter, Recovery, Schedule, TerminalRetryLayer, TerminalRetryPolicy};
use tracing_subscriber::layer::SubscriberExt;

use common::{
    callback_request, connector,
    counting_alloc::{live_bytes, CountingAlloc},
    LoopbackServer,
};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Attempts in flight at once, whatever the number of calls.
const IN_FLIGHT: usize = 1024;
/// Calls parked in backoff.
const CALLS: u64 = 100_000;
/// How long every call is observed asleep before the server comes back.
const PARKED_FOR: Duration = Duration::from_secs(3);
/// The server comes back by then at the latest.
const OUTAGE_MAX: Duration = Duration::from_secs(40);
/// A run stops this long after recovery even if calls are left.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// Sampling period of the counters, memory and CPU time.
const SAMPLE: Duration = Duration::from_millis(100);
/// Parked calls released a second, with early release on.
const RELEASE_PER_SECOND: u32 = 50_000;
/// The heartbeat's period, with early release on and jitter off.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// `/proc` counts CPU time in ticks of 1/100 s (`USER_HZ`) on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// The default schedule halved: 2 s doubling up to 16 s, 24 retries.
fn schedule() -> Schedule {
    Schedule::exponential(Duration::from_secs(2), 2.0, 24, Duration::from_secs(16))
        .expect("a valid schedule")
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--run") => {
            let jitter = std::env::args().nth(2).expect("a jitter: none or full");
            let early_release = std::env::args().nth(3).expect("early release: on or off") == "on";
            let recover_at = std::env::args()
                .nth(4)
                .map(|seconds| Duration::from_secs_f64(seconds.parse().expect("seconds")));
            let released = Arc::new(AtomicU64::new(0));
            let _guard = tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(CountReleases(released.clone())),
            );
            let runtime = tokio::runtime::Runtime::new().expect("a runtime");
            runtime.block_on(run(&jitter, early_release, recover_at, &released));
        }
        _ => compare(),
    }
}

// ---------------------------------------------------------------------------
// One run, in a process of its own

/// One point of the time series.
struct Sample {
    at: Duration,
    /// Attempts the client started, and the server answered.
    started: u64,
    answered: u64,
    succeeded: u64,
    rss_kib: u64,
    live_bytes: i64,
    cpu_ticks: u64,
}

/// Counts the events of retries released early, and nothing else: other
/// callsites are never enabled, so they cost what they cost without a
/// subscriber.
struct CountReleases(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountReleases {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        match metadata.fields().field("early_ms") {
            Some(_) => tracing::subscriber::Interest::always(),
            None => tracing::subscriber::Interest::never(),
        }
    }

    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().fields().field("early_ms").is_some() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the outage with `jitter` ("none" or "full") and early release on or
/// off, the server back at `recover_at` or once every call has been asleep
/// for [`PARKED_FOR`], and prints `result` and `rate` lines for the parent
/// process.
async fn run(
    jitter: &str,
    early_release: bool,
    recover_at: Option<Duration>,
    released: &AtomicU64,
) {
    let heartbeat = early_release && jitter != "full";
    let jitter = match jitter {
        "full" => Jitter::full(),
        _ => Jitter::default(),
    };
    let recovery = early_release.then(|| Recovery::new(RELEASE_PER_SECOND).expect("a rate"));
    let server = LoopbackServer::start(503);
    let base = server.base();
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build::<_, Full<Bytes>>(connector());
    let started = Arc::new(AtomicU64::new(0));
    let counted = started.clone();
    let counters = Arc::new(Counters {
        epoch: Instant::now(),
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        last_success_nanos: AtomicU64::new(0),
    });
    let ended = counters.clone();
    let service = ServiceBuilder::new()
        // Counts how each call ended. A `Service` adapter rather than an
        // `async` block around the call: such a block would hold the call's
        // future twice, and the task for each call would double in size.
        .map_result(move |result: Result<http::Response<_>, _>| {
            ended.count(&result);
            result.map(drop)
        })
        .layer({
            let policy = TerminalRetryPolicy::default()
                .with_schedule(schedule())
                .with_jitter(jitter);
            TerminalRetryLayer::new(match &recovery {
                Some(recovery) => policy.with_recovery(recovery.clone()),
                None => policy,
            })
        })
        .concurrency_limit(IN_FLIGHT)
        .map_request(move |request: Request<Full<Bytes>>| {
            counted.fetch_add(1, Ordering::Relaxed);
            request
        })
        .service(client.clone());

    // The connection is open before the baseline is taken.
    let opened = client.request(callback_request(&base)).await;
    assert!(opened.is_ok(), "the loopback server answers");
    drop(opened);
    // It counts as started, so that `started` and the server's `answered` agree.
    let opening = server.answered();
    started.store(opening, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let live_before = live_bytes();
    let one_request = callback_request(&base);
    let request_heap = (live_bytes() - live_before) as f64;
    let request_bytes = request_heap + std::mem::size_of_val(&one_request) as f64;
    let future_bytes = std::mem::size_of_val(&service.clone().oneshot(one_request));

    let task_bytes = task_bytes(|| service.clone().oneshot(callback_request(&base)));
    // Heartbeat attempts are left out of what the server answered, so that
    // "every call asleep" still means the reports'.
    let heartbeats = Arc::new(AtomicU64::new(0));
    let baseline = sample(Duration::ZERO, &server, &started, &heartbeats, 0);
    let start = Instant::now();
    for _ in 0..CALLS {
        tokio::spawn(service.clone().oneshot(callback_request(&base)));
    }
    if let (true, Some(recovery)) = (heartbeat, &recovery) {
        // One attempt each, through a layer holding the same recovery.
        let beat = TerminalRetryLayer::new(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([]).expect("no retry"))
                .with_recovery(recovery.clone()),
        )
        .layer(client.clone());
        let (base, heartbeats) = (base.clone(), heartbeats.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            loop {
                every.tick().await;
                let _ = beat.clone().oneshot(callback_request(&base)).await;
                heartbeats.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    // Spawning takes a while: the first rate bin starts when the first call does.
    let mut samples = vec![Sample {
        at: Duration::ZERO,
        ..baseline
    }];
    let mut recovered_at = None;
    let mut asleep_since = None;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::from_std(start), SAMPLE);
    loop {
        ticks.tick().await;
        let done = counters.succeeded.load(Ordering::Relaxed);
        let this = sample(start.elapsed(), &server, &started, &heartbeats, done);
        if let Some(previous) = samples.last() {
            asleep_since = all_asleep(previous, &this).then(|| asleep_since.unwrap_or(this.at));
        }
        samples.push(this);
        let now = start.elapsed();
        if recovered_at.is_none() {
            let back = match recover_at {
                Some(at) => now >= at,
                None => asleep_since.is_some_and(|since| now - since >= PARKED_FOR),
            };
            if back || now >= OUTAGE_MAX {
                server.set_status(200);
                recovered_at = Some(now);
            }
        }
        let drained = recovered_at.is_some_and(|at| now - at > DRAIN_MAX);
        if done + counters.failed.load(Ordering::Relaxed) == CALLS || drained {
            break;
        }
    }
    let recovered_at = recovered_at.expect("the outage ends before the calls do");
    let heartbeat_attempts = heartbeats.load(Ordering::Relaxed);

    let out = |key: &str, value: String| println!("result {key} {value}");
    out("calls", CALLS.to_string());
    out(
        "succeeded",
        counters.succeeded.load(Ordering::Relaxed).to_string(),
    );
    out(
        "failed",
        counters.failed.load(Ordering::Relaxed).to_string(),
    );
    out(
        "attempts",
        (started.load(Ordering::Relaxed) - opening).to_string(),
    );
    out("heartbeats", heartbeat_attempts.to_string());
    out(
        "released_early",
        released.load(Ordering::Relaxed).to_string(),
    );
    out("spawned_task_bytes", task_bytes.to_string());
    out("request_bytes", format!("{request_bytes:.0}"));
    out("call_future_bytes", future_bytes.to_string());

    // Parked: the samples before recovery with no call done and no attempt in
    // flight or started since the sample before.
    let pairs: Vec<&Sample> = samples.iter().take_while(|s| s.at < recovered_at).collect();
    let asleep: Vec<bool> = pairs
        .windows(2)
        .map(|pair| all_asleep(pair[0], pair[1]))
        .collect();
    // Sample indices (first, last) of the longest window with every call asleep.
    let quiet = longest_run(&asleep).map(|(first, last)| (first, last + 1));
    // Memory is read at the end of the longest window, or just before recovery
    // when there is none (full jitter: some attempts are then in flight).
    let parked = pairs[quiet.map_or(pairs.len() - 1, |(_, last)| last)];
    let per_call = |now: f64, then: f64| (now - then) / CALLS as f64 - request_bytes;
    out(
        "rss_per_parked_call",
        format!(
            "{:.0}",
            per_call(
                parked.rss_kib as f64 * 1024.0,
                baseline.rss_kib as f64 * 1024.0
            )
        ),
    );
    out(
        "heap_per_parked_call",
        format!(
            "{:.0}",
            per_call(parked.live_bytes as f64, baseline.live_bytes as f64)
        ),
    );
    out(
        "in_flight_when_measured",
        (parked.started - parked.answered).to_string(),
    );
    if let Some((first, last)) = quiet {
        let (first, last) = (pairs[first], pairs[last]);
        let seconds = (last.at - first.at).as_secs_f64();
        let cpu = (last.cpu_ticks - first.cpu_ticks) as f64 / TICKS_PER_SECOND;
        out("parked_window_s", format!("{seconds:.1}"));
        out(
            "parked_cpu_percent",
            format!("{:.2}", 100.0 * cpu / seconds),
        );
    } else {
        out("parked_window_s", "0".into());
    }

    let last_success_nanos = counters.last_success_nanos.load(Ordering::Relaxed);
    let last_success = (counters.epoch + Duration::from_nanos(last_success_nanos))
        .saturating_duration_since(start);
    out(
        "recovered_at_s",
        format!("{:.2}", recovered_at.as_secs_f64()),
    );
    out(
        "recovery_to_all_succeeded_s",
        format!(
            "{:.2}",
            last_success.saturating_sub(recovered_at).as_secs_f64()
        ),
    );
    let rates: Vec<(Duration, f64)> = samples
        .windows(2)
        .map(|pair| {
            let seconds = (pair[1].at - pair[0].at).as_secs_f64();
            (
                pair[1].at,
                (pair[1].answered - pair[0].answered) as f64 / seconds,
            )
        })
        .collect();
    let peak = |from: Duration, to: Duration| {
        rates
            .iter()
            .filter(|(at, _)| *at > from && *at <= to)
            .map(|(_, rate)| *rate)
            .fold(0.0, f64::max)
    };
    let second = Duration::from_secs(1);
    out(
        "peak_rate_first_second",
        format!("{:.0}", peak(recovered_at, recovered_at + second)),
    );
    out(
        "peak_rate_after_recovery",
        format!("{:.0}", peak(recovered_at, Duration::MAX)),
    );
    out(
        "peak_rate_outage",
        format!("{:.0}", peak(Duration::ZERO, recovered_at)),
    );
    for (at, rate) in rates {
        println!("rate {:.2} {rate:.0}", at.as_secs_f64());
    }
}

/// How the calls ended, shared by their tasks.
struct Counters {
    epoch: Instant,
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// When the last success came, since `epoch`.
    last_success_nanos: AtomicU64,
}

impl Counters {
    fn count<B, E>(&self, result: &Result<http::Response<B>, E>) {
        match result {
            Ok(response) if response.status().is_success() => {
                let at = self.epoch.elapsed().as_nanos() as u64;
                self.last_success_nanos.fetch_max(at, Ordering::Relaxed);
                self.succeeded.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The bytes tokio allocates for one task running `make()`'s future: spawned
/// on a runtime that never runs, so that nothing else allocates meanwhile.
/// The second spawn is the one measured; the first sets the runtime up.
fn task_bytes<F>(make: impl Fn() -> F) -> i64
where
    F: std::future::Future + Send + 'static,
    F::Output: Send,
{
    let idle = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let (first, second) = (make(), make());
    drop(idle.spawn(first));
    let before = live_bytes();
    let handle = idle.spawn(second);
    let bytes = live_bytes() - before;
    drop(handle);
    // A runtime cannot be dropped inside another's async context.
    std::thread::spawn(move || drop(idle))
        .join()
        .expect("the idle runtime dropped");
    bytes
}

/// Whether every call slept from `previous` to `this`: none done, no attempt
/// started, none in flight.
fn all_asleep(previous: &Sample, this: &Sample) -> bool {
    this.succeeded == 0 && this.started == previous.started && this.answered == this.started
}

/// The first and last index of the longest run of `true`.
fn longest_run(flags: &[bool]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    let mut first = None;
    for (index, &flag) in flags.iter().enumerate() {
        match (flag, first) {
            (true, None) => first = Some(index),
            (false, Some(_)) => first = None,
            _ => {}
        }
        if let Some(first) = first {
            if best.is_none_or(|(a, b)| index - first > b - a) {
                best = Some((first, index));
            }
        }
    }
    best
}

fn sample(
    at: Duration,
    server: &LoopbackServer,
    started: &AtomicU64,
    heartbeats: &AtomicU64,
    succeeded: u64,
) -> Sample {
    Sample {
        at,
        // Every request answered was started before: reading `answered` first
        // keeps `answered <= started`.
        answered: server
            .answered()
            .saturating_sub(heartbeats.load(Ordering::Relaxed)),
        started: started.load(Ordering::Relaxed),
        succeeded,
        rss_kib: rss_kib(),
        live_bytes: live_bytes(),
        cpu_ticks: cpu_ticks(),
    }
}

/// Resident memory of this process, from `/proc/self/status`.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// User and system CPU time of this process, every thread, in ticks: fields
/// 14 and 15 of `/proc/self/stat`, counted after the parenthesised name.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("procfs");
    let after_name = &stat[stat.rfind(')').expect("a process name") + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |index: usize| fields[index].parse::<u64>().expect("a tick count");
    field(11) + field(12)
}

// ---------------------------------------------------------------------------
// The comparison: both runs, the table and the figure

struct Run {
    label: &'static str,
    results: Vec<(String, String)>,
    rates: Vec<(f64, f64)>,
}

impl Run {
    fn get(&self, key: &str) -> &str {
        self.results
            .iter()
            .find(|(name, _)| name == key)
            .map_or("n/a", |(_, value)| value)
    }
}

/// Runs one outage in a fresh process: `--run` followed by `args`.
fn run_child(label: &'static str, args: &[&str]) -> Run {
    eprintln!("running {CALLS} calls through an outage, {label}...");
    let output = Command::new(std::env::current_exe().expect("this program"))
        .arg("--run")
        .args(args)
        .output()
        .expect("a run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the {label} run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut run = Run {
        label,
        results: vec![],
        rates: vec![],
    };
    for line in stdout.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["result", key, value] => run.results.push((key.to_string(), value.to_string())),
            ["rate", at, rate] => run
                .rates
                .push((at.parse().expect("a time"), rate.parse().expect("a rate"))),
            _ => {}
        }
    }
    run
}

fn compare() {
    let jitter_off = run_child("jitter off", &["none", "off"]);
    let recovered_at = jitter_off.get("recovered_at_s").to_owned();
    let full_jitter = run_child("full jitter", &["full", "off", &recovered_at]);
    let off_released = run_child("off, early release", &["none", "on", &recovered_at]);
    let full_released = run_child("full, early release", &["full", "on", &recovered_at]);
    let runs = [jitter_off, full_jitter, off_released, full_released];

    let rows = [
        ("calls", "calls"),
        ("succeeded", "succeeded"),
        ("failed (schedule exhausted)", "failed"),
        ("attempts in all", "attempts"),
        ("request's own bytes (excluded below)", "request_bytes"),
        ("one call's future (`oneshot`), bytes", "call_future_bytes"),
        ("the task spawned for one call, bytes", "spawned_task_bytes"),
        (
            "resident memory per parked call, bytes",
            "rss_per_parked_call",
        ),
        ("heap per parked call, bytes", "heap_per_parked_call"),
        (
            "attempts in flight when memory was read",
            "in_flight_when_measured",
        ),
        ("window with every call asleep, s", "parked_window_s"),
        (
            "CPU while every call sleeps, % of one core",
            "parked_cpu_percent",
        ),
        ("server back at, s", "recovered_at_s"),
        (
            "recovery until every call succeeded, s",
            "recovery_to_all_succeeded_s",
        ),
        (
            "peak rate in the first second after recovery, req/s",
            "peak_rate_first_second",
        ),
        (
            "peak rate after recovery, req/s",
            "peak_rate_after_recovery",
        ),
        ("peak rate during the outage, req/s", "peak_rate_outage"),
        ("retries released early", "released_early"),
        ("heartbeat calls", "heartbeats"),
    ];
    let labels: Vec<&str> = runs.iter().map(|run| run.label).collect();
    println!("| {CALLS} calls | {} |", labels.join(" | "));
    println!("|---|{}", "---:|".repeat(runs.len()));
    for (name, key) in rows {
        let values: Vec<&str> = runs.iter().map(|run| run.get(key)).collect();
        println!("| {name} | {} |", values.join(" | "));
    }

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/recovery.svg");
    let recovered_at: f64 = runs[0].get("recovered_at_s").parse().unwrap_or(0.0);
    std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/docs")).expect("docs/");
    std::fs::write(path, svg(&runs, recovered_at)).expect("the figure");
    eprintln!("wrote docs/recovery.svg");
}

/// A step of 1, 2 or 5 times a power of ten that cuts `max` in 4 to 8.
fn tick_step(max: f64) -> f64 {
    let magnitude = 10f64.powf((max / 5.0).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|step| max / step <= 8.0)
        .unwrap_or(10.0 * magnitude)
}

/// The request rate of both runs over time, as a hand-written SVG line chart.
fn svg(runs: &[Run], recovered_at: f64) -> String {
    let (width, height) = (800.0, 420.0);
    let (left, right, top, bottom) = (80.0, 20.0, 50.0, 50.0);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    let points = || runs.iter().flat_map(|run| run.rates.iter());
    let max_t = points().map(|(at, _)| *at).fold(1.0, f64::max);
    let time_step = tick_step(max_t);
    let max_t = (max_t / time_step).ceil() * time_step;
    let max_rate = points().map(|(_, rate)| *rate).fold(1.0, f64::max);
    let rate_step = tick_step(max_rate);
    let max_rate = (max_rate / rate_step).ceil() * rate_step;
    let x = |at: f64| left + at / max_t * plot_w;
    let y = |rate: f64| top + plot_h - rate / max_rate * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">Requests per second at the server: {CALLS} calls through an outage</text>"#,
        width / 2.0
    );
    // Grid and axes.
    let mut rate = 0.0;
    while rate <= max_rate + rate_step / 2.0 {
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            y(rate),
            left + plot_w,
            left - 6.0,
            y(rate) + 4.0,
            rate
        );
        rate += rate_step;
    }
    let mut at = 0.0;
    while at <= max_t + time_step / 2.0 {
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="black"/><text x="{0:.1}" y="{3}" text-anchor="middle">{at}</text>"#,
            x(at),
            top + plot_h,
            top + plot_h + 5.0,
            top + plot_h + 18.0
        );
        at += time_step;
    }
    let _ = writeln!(
        svg,
        r#"<path d="M{left} {top} V{0} H{1}" fill="none" stroke="black"/>"#,
        top + plot_h,
        left + plot_w
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since the calls went out</text>"#,
        left + plot_w / 2.0,
        height - 12.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{0}" text-anchor="middle" transform="rotate(-90 18 {0})">requests per second (100 ms bins)</text>"#,
        top + plot_h / 2.0
    );
    // Recovery.
    let _ = writeln!(
        svg,
        r#"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1}" stroke="gray" stroke-dasharray="5 4"/><text x="{2:.1}" y="{3}">server back (503 until then)</text>"#,
        x(recovered_at),
        top + plot_h,
        x(recovered_at) + 5.0,
        top + 12.0
    );
    // The series and their legend.
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="{}" width="170" height="{}" fill="white" stroke="#ccc"/>"##,
        left + plot_w - 178.0,
        top + 18.0,
        18.0 * runs.len() as f64 + 8.0
    );
    let colours = ["#d62728", "#1f77b4", "#ff9896", "#2ca02c"];
    for (index, (run, colour)) in runs.iter().zip(colours).enumerate() {
        let mut path = String::new();
        for (at, rate) in &run.rates {
            let _ = write!(path, "{:.1},{:.1} ", x(*at), y(*rate));
        }
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
            path.trim_end()
        );
        let legend_y = top + 12.0 + 18.0 * (index as f64 + 1.0);
        let _ = writeln!(
            svg,
            r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{colour}" stroke-width="3"/><text x="{3}" y="{4}">{5}</text>"#,
            left + plot_w - 170.0,
            legend_y,
            left + plot_w - 145.0,
            left + plot_w - 138.0,
            legend_y + 4.0,
            run.label
        );
    }
    svg.push_str("</svg>\n");
    svg
}
