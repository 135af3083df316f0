//! Durable reports per second on loopback: the callback through the terminal
//! layer with no store, through the outbox (stored, fsync'd, by group commit,
//! before the first attempt; removed once delivered), and through the
//! simplest alternative, one file per report written and fsync'd (with its
//! directory) before the first attempt and removed once delivered. At 1 and
//! 64 reports in flight, side by side.
//!
//! `cargo bench --bench outbox`: the time per report is the wall time of the
//! run over the reports, so its inverse is reports per second.

mod common;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tower::{retry::Retry, Layer, ServiceExt};
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Outbox},
    TerminalRetryLayer, TerminalRetryPolicy,
};

use common::{
    callback_body, callback_headers, callback_request, hyper_client, run_calls, side_by_side,
    LoopbackServer, CALLBACK_PATH,
};

const CONTENDERS: [&str; 3] = ["no_store", "outbox", "file_per_report"];

type HyperClient = Client<HttpConnector, Full<Bytes>>;

/// The three ways to send, against one server.
struct Contenders {
    base: String,
    layered: Retry<TerminalRetryPolicy, HyperClient>,
    dispatcher: Dispatcher<HyperClient>,
    directory: PathBuf,
    next_key: Arc<AtomicU64>,
}

impl Contenders {
    /// One report through contender `index`.
    async fn report(self: Arc<Self>, index: usize) {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        match index {
            0 => {
                let response = self.layered.clone().oneshot(callback_request(&self.base));
                assert!(response.await.expect("a response").status().is_success());
            }
            1 => {
                let mut request = Request::post(format!("{}{CALLBACK_PATH}", self.base))
                    .body(callback_body())
                    .expect("a request");
                *request.headers_mut() = callback_headers();
                let delivery = self.dispatcher.send(format!("report-{key}"), request).await;
                assert_eq!(delivery, Delivery::Delivered);
            }
            _ => {
                let path = self.directory.join(format!("report-{key}.json"));
                let (file, directory) = (path.clone(), self.directory.clone());
                tokio::task::spawn_blocking(move || write_durably(&file, &directory))
                    .await
                    .expect("the write")
                    .expect("a durable file");
                let response = self.layered.clone().oneshot(callback_request(&self.base));
                assert!(response.await.expect("a response").status().is_success());
                tokio::fs::remove_file(&path)
                    .await
                    .expect("the file removed");
            }
        }
    }
}

/// The report's body in a file of its own, fsync'd, and its directory
/// fsync'd so that the new name survives a crash.
fn write_durably(file: &std::path::Path, directory: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::fs::File::create(file)?;
    out.write_all(&callback_body())?;
    out.sync_all()?;
    std::fs::File::open(directory)?.sync_all()
}

fn main() {
    let server = LoopbackServer::start(200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let directory = std::env::temp_dir().join(format!("outbox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("a scratch directory");
    let contenders = runtime.block_on(async {
        let client = hyper_client();
        let outbox = Outbox::open(directory.join("reports.redb")).expect("an outbox");
        let dispatcher = Dispatcher::builder(outbox, client.clone())
            .build()
            .expect("a dispatcher");
        Arc::new(Contenders {
            base: server.base(),
            layered: TerminalRetryLayer::default().layer(client),
            dispatcher,
            directory: directory.clone(),
            next_key: Arc::new(AtomicU64::new(0)),
        })
    });
    for (in_flight, calls, rounds) in [(1, 150, 7), (64, 3_000, 7)] {
        let title = format!("durable reports, {in_flight} in flight");
        side_by_side(&title, rounds, &CONTENDERS, 0, |index| {
            let contenders = contenders.clone();
            let elapsed = runtime.block_on(run_calls(calls, in_flight, move || {
                contenders.clone().report(index)
            }));
            elapsed / calls as u32
        });
    }
    drop(contenders);
    let _ = std::fs::remove_dir_all(&directory);
}
