//! 100,000 reports held by the outbox through an outage, then delivered.
//!
//! ```text
//! cargo run --release --example outbox_scale
//! ```
//!
//! First 100,000 reports go through an outbox [`Dispatcher`] while a loopback
//! server answers 200: they are stored, delivered and removed, and the
//! process's memory settles. Then the server answers 503 and, twice over,
//! 100,000 reports with one attempt each (an empty schedule) are queued on
//! disk at once; the program reports the resident memory each pending report
//! adds (the records live in the file, not as parked futures), brings the
//! server back, sends one heartbeat through a layer sharing the dispatcher's
//! [`Recovery`], and reports the time until every report is delivered and the
//! peak request rate, for replay concurrencies of 16 (the default) and 64,
//! each in a fresh process. The file's size after each round shows whether
//! it grows.

#[path = "../benches/common/mod.rs"]
mod common;

use std::{
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
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tower::{Layer, ServiceExt};
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Outbox, Replay},
    Recovery, Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

use common::{
    callback_body, callback_headers, callback_request, hyper_client, LoopbackServer, CALLBACK_PATH,
};

const REPORTS: u64 = 100_000;
/// Reports handed to the dispatcher at once while filling the outbox.
const FILLING: u64 = 1_000;

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--run") => {
            let concurrency = std::env::args()
                .nth(2)
                .and_then(|value| value.parse().ok())
                .expect("a replay concurrency");
            let runtime = tokio::runtime::Runtime::new().expect("a runtime");
            runtime.block_on(run(concurrency));
        }
        _ => {
            println!("| {REPORTS} reports | replay concurrency 16 | replay concurrency 64 |");
            println!("|---|---:|---:|");
            let runs: Vec<Vec<(String, String)>> = [16, 64]
                .into_iter()
                .map(|concurrency| {
                    let output = Command::new(std::env::current_exe().expect("this program"))
                        .args(["--run", &concurrency.to_string()])
                        .output()
                        .expect("a run");
                    assert!(
                        output.status.success(),
                        "{}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                    String::from_utf8_lossy(&output.stdout)
                        .lines()
                        .filter_map(|line| {
                            let (key, value) = line.strip_prefix("result ")?.split_once(' ')?;
                            Some((key.to_owned(), value.to_owned()))
                        })
                        .collect()
                })
                .collect();
            for (index, (key, value)) in runs[0].iter().enumerate() {
                let other = runs[1].get(index).map_or("n/a", |(_, value)| value);
                println!("| {} | {value} | {other} |", key.replace('_', " "));
            }
        }
    }
}

async fn run(concurrency: usize) {
    let server = LoopbackServer::start(200);
    let base = server.base();
    let directory = std::env::temp_dir().join(format!("outbox-scale-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("a scratch directory");
    let file = directory.join("reports.redb");
    let client = hyper_client();
    // The connection is open and the runtime warm before the baseline.
    let _ = client.request(callback_request(&base)).await;
    let recovery = Recovery::new(1_000).expect("a rate");
    let dispatcher = Dispatcher::builder(Outbox::open(&file).expect("an outbox"), client.clone())
        .layer(TerminalRetryLayer::new(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([]).expect("no retry"))
                .with_recovery(recovery.clone()),
        ))
        // A loopback server takes the whole backlog at once; the default rate
        // protects a real one recovering from an outage.
        .replay(Replay {
            concurrency,
            rate: 1_000_000,
            ..Replay::default()
        })
        // One server: every replay slot may go to it.
        .per_destination_concurrency(concurrency)
        .build()
        .expect("a dispatcher");
    let next = Arc::new(AtomicU64::new(0));
    let out = |key: &str, value: String| println!("result {key} {value}");

    // Warm: delivered at once, removed; memory and file settle.
    fill(&dispatcher, &base, &next, Delivery::Delivered).await;
    while dispatcher.outbox().unwrap().pending_count() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out("file_after_100k_delivered_MB", megabytes(&file));

    for round in 1..=2 {
        server.set_status(503);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_before = rss_bytes();
        let filling = Instant::now();
        fill(&dispatcher, &base, &next, Delivery::Queued).await;
        let filled_in = filling.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pending = dispatcher.outbox().unwrap().pending_count();
        let rss_pending = rss_bytes();
        out(
            &format!("round_{round}_pending_reports"),
            pending.to_string(),
        );
        out(
            &format!("round_{round}_stored_in_s"),
            format!("{:.1}", filled_in.as_secs_f64()),
        );
        out(
            &format!("round_{round}_resident_memory_per_pending_report_B"),
            format!(
                "{:.0}",
                (rss_pending as f64 - rss_before as f64) / REPORTS as f64
            ),
        );
        out(
            &format!("round_{round}_file_with_100k_pending_MB"),
            megabytes(&file),
        );

        // Back: one heartbeat through a layer sharing the recovery.
        server.set_status(200);
        let answered_before = server.answered();
        let back = Instant::now();
        let heartbeat =
            TerminalRetryLayer::new(TerminalRetryPolicy::default().with_recovery(recovery.clone()))
                .layer(client.clone());
        let _ = heartbeat.oneshot(callback_request(&base)).await;
        let mut peak_rate = 0.0f64;
        let mut last = (Instant::now(), server.answered());
        while dispatcher.outbox().unwrap().pending_count() > 0
            && back.elapsed() < Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = (Instant::now(), server.answered());
            let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
            peak_rate = peak_rate.max(rate);
            last = now;
        }
        out(
            &format!("round_{round}_recovery_until_all_delivered_s"),
            format!("{:.2}", back.elapsed().as_secs_f64()),
        );
        out(
            &format!("round_{round}_requests_after_recovery"),
            (server.answered() - answered_before).to_string(),
        );
        out(
            &format!("round_{round}_peak_rate_req_per_s"),
            format!("{peak_rate:.0}"),
        );
        out(
            &format!("round_{round}_file_after_delivery_MB"),
            megabytes(&file),
        );
    }
    drop(dispatcher);
    let _ = std::fs::remove_dir_all(&directory);
}

/// Hands [`REPORTS`] reports to `dispatcher`, [`FILLING`] at a time, each
/// expected to end as `expected`.
async fn fill(
    dispatcher: &Dispatcher<Client<HttpConnector, Full<Bytes>>>,
    base: &str,
    next: &AtomicU64,
    expected: Delivery,
) {
    for _ in 0..REPORTS / FILLING {
        let mut sends = Vec::new();
        for _ in 0..FILLING {
            let key = next.fetch_add(1, Ordering::Relaxed);
            let mut request = Request::post(format!("{base}{CALLBACK_PATH}"))
                .body(callback_body())
                .expect("a request");
            *request.headers_mut() = callback_headers();
            sends.push(dispatcher.send(format!("report-{key}"), request));
        }
        for send in sends {
            assert_eq!(send.await, expected);
        }
    }
}

fn megabytes(file: &std::path::Path) -> String {
    let bytes = std::fs::metadata(file).expect("the file").len();
    format!("{:.1}", bytes as f64 / 1e6)
}

/// Resident memory of this process, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}
