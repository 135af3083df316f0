//! The task client against a hostile or misconfigured server, bad input and
//! load: the token stays with its host, nothing a server sends back is echoed
//! raw, requests stay bounded, bad input is refused before anything is sent.
//! Real loopback servers; tokio's paused clock where time matters.

mod client_support;
#[cfg(feature = "outbox")]
mod outbox_support;
mod support;

use std::time::Duration;

use http::{header::AUTHORIZATION, StatusCode};
use tokio::time::Instant;
use tower_terminal_retry::{
    client::{ErrorKind, ReportOutcome, TaskClient, TaskResult},
    test_server::{Action, Fault, Reply, TestServer},
    RetryAfter,
};

use client_support::{capture, client, policy, server_with, terminal_calls};

const TOKEN: &str = "tok-4f2c9a7e51";

/// A server that answers every request with `reply(request)`.
async fn answering(
    reply: impl Fn(&tower_terminal_retry::test_server::RecordedRequest) -> Reply + Send + Sync + 'static,
) -> TestServer {
    TestServer::start(reply).await.expect("a loopback port")
}

fn client_of(server: &TestServer) -> TaskClient {
    TaskClient::builder(server.url(""))
        .token(TOKEN)
        .policy(policy(&[1, 1]))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a valid client")
}

/// `text` percent-encoded, every byte but letters and digits, with
/// upper-case hex digits.
fn percent_encoded(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Whether `text` shows the token, as it is, in another ASCII case, or
/// percent-encoded (with hex digits of either case).
fn shows_token(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    [TOKEN.to_owned(), percent_encoded(TOKEN)]
        .iter()
        .any(|form| text.contains(&form.to_ascii_lowercase()))
}

/// A reply of `status` whose body echoes the request's `Authorization` as
/// it is, upper-cased, and percent-encoded with upper- and lower-case hex
/// digits.
fn echo_authorization(
    status: u16,
) -> impl Fn(&tower_terminal_retry::test_server::RecordedRequest) -> Reply {
    move |request| {
        let header = request
            .headers
            .get(AUTHORIZATION)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default();
        let encoded = percent_encoded(&header);
        support::text_reply(
            status,
            format!(
                "bad request, you sent authorization: {header}, or {}, or {encoded}, or {}",
                header.to_ascii_uppercase(),
                encoded.to_ascii_lowercase(),
            ),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn a_redirect_is_refused_for_good_and_the_error_names_its_location() {
    let server = answering(|_| {
        let mut reply = Reply::status(301);
        if let Reply::Respond(response) = &mut reply {
            response.headers_mut().insert(
                http::header::LOCATION,
                http::HeaderValue::from_static("https://elsewhere.test/api"),
            );
        }
        reply
    })
    .await;
    let client = client_of(&server);

    let error = client
        .start_task("t1")
        .await
        .expect_err("a 301 is no success");
    assert!(!error.is_transient(), "a redirect is not retried");
    assert_eq!(
        error.kind(),
        ErrorKind::Status(StatusCode::MOVED_PERMANENTLY)
    );
    let message = error.to_string();
    assert!(message.contains("https://elsewhere.test/api"), "{message}");
    assert!(message.contains("final URL"), "{message}");
    assert_eq!(server.requests().len(), 1, "one attempt, not followed");

    // A completion refused by a redirect falls back to fail, refused too:
    // never "completed".
    let outcome = client
        .report_task_result("t2", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::NotDelivered);
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_token_echoed_in_a_redirects_location_is_redacted() {
    let server = answering(|_| {
        let mut reply = Reply::status(302);
        if let Reply::Respond(response) = &mut reply {
            let location = format!(
                "https://elsewhere.test/?token={TOKEN}&again={}&upper={}",
                percent_encoded(TOKEN).to_ascii_lowercase(),
                TOKEN.to_ascii_uppercase(),
            );
            response.headers_mut().insert(
                http::header::LOCATION,
                http::HeaderValue::from_str(&location).unwrap(),
            );
        }
        reply
    })
    .await;
    let error = client_of(&server)
        .start_task("t1")
        .await
        .expect_err("a 302 is no success");
    let shown = format!("{error} {error:?}");
    assert!(!shows_token(&shown), "{shown}");
    assert!(shown.contains("elsewhere.test"), "{shown}");
}

#[tokio::test(start_paused = true)]
async fn an_echoed_token_is_redacted_from_errors_events_and_the_fallback() {
    let server = answering(echo_authorization(400)).await;
    let client = client_of(&server);
    let (events, _guard) = capture();

    let error = client.start_task("t1").await.expect_err("a 400");
    let shown = format!("{error} {error:?}");
    assert!(!shows_token(&shown), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");

    let outcome = client
        .report_task_result("t2", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::NotDelivered);
    let requests = server.requests();
    let fallback = requests.last().expect("the fallback was sent");
    assert!(fallback.uri.path().ends_with("/t2/fail"));
    let body = String::from_utf8_lossy(&fallback.body);
    assert!(body.contains("[redacted]"), "{body}");
    assert!(!shows_token(&body), "{body}");
    // The server did get the token: it is its own.
    assert!(requests.iter().all(|request| request.headers[AUTHORIZATION]
        .to_str()
        .is_ok_and(|value| value.contains(TOKEN))));
    assert!(!shows_token(&events.text()), "{}", events.text());
}

#[tokio::test(start_paused = true)]
async fn an_error_body_is_escaped_and_capped_after_decoding() {
    // Three bytes a character once decoded, with a forged log line.
    let body = format!("{}\nINFO forged line\u{1b}[31m", "\u{fffd}".repeat(20_000));
    let server = answering(move |_| support::text_reply(400, body.clone())).await;
    let client = client_of(&server);

    let error = client.start_task("t1").await.expect_err("a 400");
    let message = error.to_string();
    assert!(
        !message.contains('\n') && !message.contains('\u{1b}'),
        "{message}"
    );
    let prefix = "POST /api/daemon/tasks/t1/start returned 400: ";
    let kept = message.strip_prefix(prefix).expect("the route and status");
    assert!(kept.len() <= 4096, "{} bytes kept", kept.len());
    assert!(kept.len() > 4000, "{} bytes kept", kept.len());

    let forged = "x\nINFO forged\u{1b}[2J";
    let server = answering(move |_| support::text_reply(400, forged)).await;
    let error = client_of(&server)
        .start_task("t1")
        .await
        .expect_err("a 400");
    assert!(
        error.to_string().ends_with("x\\nINFO forged\\u{1b}[2J"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_task_ids_are_refused_before_anything_is_sent() {
    let server = server_with(&["t1"]).await;
    let client = client(&server, &[1]);
    let long = "x".repeat(1025);
    for bad in [
        "",
        "\0",
        "a\0b",
        "a\nb",
        "tab\there",
        "\u{7f}",
        long.as_str(),
    ] {
        let error = client.start_task(bad).await.expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::Config, "{bad:?}: {error}");
        assert!(!error.to_string().contains(bad) || bad.is_empty());
        assert!(client.pin_session(bad, "s", "w").await.is_err());
        let outcome = client
            .report_task_result(bad, TaskResult::completed("done"))
            .await;
        assert_eq!(outcome, ReportOutcome::InvalidTaskId, "{bad:?}");
    }
    assert!(server.attempts().is_empty(), "nothing was sent");
    assert!(support::requests(&server).is_empty(), "nothing was sent");
    // 1 KiB exactly is accepted.
    let longest = "y".repeat(1024);
    server.add_tasks([&longest]);
    client.start_task(&longest).await.expect("a 1 KiB id");
}

#[tokio::test(start_paused = true)]
async fn a_conflict_supersedes_the_report_and_sends_no_fallback() {
    let server = server_with(&["t1", "t2"]).await;
    let conflict = Fault::Status(StatusCode::CONFLICT);
    server.script("t1", Action::Complete, [conflict]);
    server.script("t2", Action::Fail, [conflict]);
    let client = client(&server, &[1, 1]);

    let outcome = client
        .report_task_result("t1", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::Superseded);
    assert_eq!(terminal_calls(&server, "t1"), (1, 0), "no fallback fail");

    let outcome = client
        .report_task_result("t2", TaskResult::failed("broke"))
        .await;
    assert_eq!(outcome, ReportOutcome::Superseded);
    assert_eq!(terminal_calls(&server, "t2"), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn the_retry_after_cap_is_the_clients_to_set() {
    let server = server_with(&["t1", "t2"]).await;
    let slow_down = Fault::RateLimited {
        retry_after_secs: 600,
    };
    server.script("t1", Action::Complete, [slow_down]);
    server.script("t2", Action::Complete, [slow_down]);
    // Capped at 2 s, then deaf to it: the schedule's 1 s.
    let capped = RetryAfter::honor_up_to(Duration::from_secs(2)).unwrap();
    for (task, retry_after, waited) in [("t1", capped, 2), ("t2", RetryAfter::ignore(), 1)] {
        let client = TaskClient::builder(server.url())
            .policy(policy(&[1]).with_retry_after(retry_after))
            .build()
            .unwrap();
        let start = Instant::now();
        let outcome = client
            .report_task_result(task, TaskResult::completed(""))
            .await;
        assert_eq!(outcome, ReportOutcome::Completed, "{task}");
        assert_eq!(start.elapsed(), Duration::from_secs(waited), "{task}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_bounds_requests_in_flight_across_routes() {
    let ids: Vec<String> = (0..120).map(|n| format!("t{n}")).collect();
    let server = server_with(&ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let latency = Duration::from_millis(100);
    server.latency(latency);
    let client = TaskClient::builder(server.url())
        .concurrency_limit(8)
        .build()
        .unwrap();
    let mut reports = Vec::new();
    let mut starts = Vec::new();
    for id in &ids {
        reports.push(client.report_task_result(id, TaskResult::completed("done")));
        let client = client.clone();
        let id = id.clone();
        starts.push(tokio::spawn(async move { client.start_task(&id).await }));
    }
    for report in reports {
        assert_eq!(report.await, ReportOutcome::Completed);
    }
    for start in starts {
        // Started after completion is refused (409) or taken: both answered.
        let _ = start.await.unwrap();
    }
    assert_eq!(support::max_in_flight(&server.attempts(), latency), 8);
}

/// A server that sends its headers at once and then trickles the body holds
/// a turn under the limit until the body ends: never more connections open
/// at once than the limit, whichever route, success or error.
///
/// Real time, as the server is a real socket: 24 exchanges of 0.3 s, four at
/// a time, take about 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_server_gets_no_more_connections_than_the_limit() {
    const LIMIT: usize = 4;
    let server = TricklingServer::start().await;
    let client = TaskClient::builder(server.url())
        .concurrency_limit(LIMIT)
        .policy(policy(&[]))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let reports: Vec<_> = (0..12)
        .map(|n| client.report_task_result(&format!("t{n}"), TaskResult::completed("done")))
        .collect();
    // `start` is answered 409: its error body is read under the limit too.
    let starts: Vec<_> = (0..12)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.start_task(&format!("s{n}")).await })
        })
        .collect();
    for report in reports {
        assert_eq!(report.await, ReportOutcome::Completed);
    }
    for start in starts {
        let error = start.await.unwrap().expect_err("a 409");
        assert_eq!(error.kind(), ErrorKind::Status(StatusCode::CONFLICT));
        assert!(
            error.to_string().ends_with(TricklingServer::BODY),
            "{error}"
        );
    }
    assert_eq!(server.exchanges(), 24);
    assert_eq!(
        server.most_open(),
        LIMIT,
        "never more than the limit at once"
    );
}

/// A loopback HTTP/1.1 server that answers each request (`409` to `start`,
/// `200` to the rest) with its headers at once and then [`BODY`](Self::BODY)
/// one byte every [`TRICKLE`](Self::TRICKLE), on a connection of its own
/// (`Connection: close`).
///
/// It counts the connections it has open: from accept until it sends the
/// body's last byte. Past that byte the client may rightly take its next
/// turn, and connect again before this socket is closed.
struct TricklingServer {
    addr: std::net::SocketAddr,
    counts: std::sync::Arc<OpenCounts>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct OpenCounts {
    open: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    exchanges: std::sync::atomic::AtomicUsize,
}

/// One connection counted open while it lives.
struct Open(std::sync::Arc<OpenCounts>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TricklingServer {
    const BODY: &str = "ok";
    const TRICKLE: Duration = Duration::from_millis(150);
    /// The most a request may be, head and body.
    const MAX_REQUEST: usize = 64 * 1024;

    async fn start() -> TricklingServer {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = std::sync::Arc::new(OpenCounts::default());
        let accepted = counts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let open = accepted.open.fetch_add(1, SeqCst) + 1;
                accepted.most.fetch_max(open, SeqCst);
                tokio::spawn(TricklingServer::serve(stream, Open(accepted.clone())));
            }
        });
        TricklingServer {
            addr,
            counts,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn most_open(&self) -> usize {
        self.counts.most.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn exchanges(&self) -> usize {
        self.counts
            .exchanges
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn serve(mut stream: tokio::net::TcpStream, open: Open) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(head) = TricklingServer::read_request(&mut stream).await else {
            return;
        };
        let status = if head.contains("/start ") {
            "409 Conflict"
        } else {
            "200 OK"
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            TricklingServer::BODY.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        let body = TricklingServer::BODY.as_bytes();
        for (at, byte) in body.iter().enumerate() {
            tokio::time::sleep(TricklingServer::TRICKLE).await;
            if at + 1 == body.len() {
                open.0
                    .exchanges
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(open);
                let _ = stream.write_all(&[*byte]).await;
                break;
            }
            if stream.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
        let _ = stream.shutdown().await;
        // Read to the end, so that closing resets nothing the client reads.
        let mut rest = [0; 64];
        while matches!(stream.read(&mut rest).await, Ok(1..)) {}
    }

    /// The request's head, once the request is read whole (its body by its
    /// `content-length`); `None` for one that breaks off or is too long.
    async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut request = Vec::new();
        let mut chunk = [0; 4096];
        loop {
            if let Some(end) = request.windows(4).position(|window| window == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(Some(0), |value| value.trim().parse().ok())?;
                if request.len() >= end + 4 + length {
                    return Some(head);
                }
            }
            if request.len() > TricklingServer::MAX_REQUEST {
                return None;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(read) => request.extend_from_slice(&chunk[..read]),
            }
        }
    }
}

impl Drop for TricklingServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn the_attempt_timeout_starts_when_the_attempt_is_sent_not_while_it_waits() {
    let server = server_with(&["t1", "t2", "t3"]).await;
    server.latency(Duration::from_millis(600));
    let client = TaskClient::builder(server.url())
        .concurrency_limit(1)
        .timeout(Duration::from_secs(1))
        .policy(policy(&[]))
        .build()
        .unwrap();
    let calls = ["t1", "t2", "t3"].map(|id| {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .report_task_result(id, TaskResult::completed(""))
                .await
        })
    });
    for call in calls {
        let outcome = call.await.unwrap();
        assert_eq!(
            outcome,
            ReportOutcome::Completed,
            "no attempt timed out waiting its turn"
        );
    }
    assert_eq!(server.attempts().len(), 3, "each sent once");
}

#[test]
fn a_zero_concurrency_limit_is_a_configuration_error() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let error = TaskClient::builder("http://127.0.0.1:9")
        .concurrency_limit(0)
        .build()
        .expect_err("zero is refused");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
}

/// A password, even one holding the URL's reserved characters, or a query
/// (`?token=...`) appears in no error and no `Debug` of the builder.
#[test]
fn a_base_url_with_a_password_or_a_query_is_refused_without_showing_it() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    for (url, secret) in [
        ("http://daemon:hunter2-pw@127.0.0.1:8080", "hunter2-pw"),
        ("http://daemon:hunter2-pw@127.0.0.1:99999/x", "hunter2-pw"),
        ("http://daemon:pw#hunter2@127.0.0.1:8080/api", "hunter2"),
        ("http://daemon:pw/hunter2@127.0.0.1:8080/api", "hunter2"),
        ("http://daemon:pw?hunter2@127.0.0.1:8080/api", "hunter2"),
        ("http://daemon:pw@hunter2@127.0.0.1:8080/api", "hunter2"),
        ("http://127.0.0.1:8080/api?token=hunter2", "hunter2"),
        ("http://127.0.0.1:8080/api#hunter2", "hunter2"),
    ] {
        let builder = TaskClient::builder(url);
        let debug = format!("{builder:?}");
        assert!(!debug.contains(secret), "{debug}");
        let error = builder.build().expect_err(url);
        assert_eq!(error.kind(), ErrorKind::Config);
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }
    for url in [
        "http://127.0.0.1:99999",
        "http://127.0.0.1:65536",
        "http://127.0.0.1:0",
        "http://:80",
        "http://127.0.0.1:8080/?q=1",
        "http://127.0.0.1:8080/#f",
    ] {
        let error = TaskClient::builder(url).build().expect_err(url);
        assert_eq!(error.kind(), ErrorKind::Config, "{url}: {error}");
    }
}

/// 10,000 reports at once from a child process whose descriptors are limited
/// to 1,024: each waits its turn under the concurrency limit instead of
/// opening a connection of its own.
#[test]
fn ten_thousand_reports_under_a_1024_descriptor_limit_are_all_delivered() {
    const ROLE: &str = "HARDENING_CLIENT_CHILD_URL";
    const REPORTS: usize = 10_000;
    if let Ok(url) = std::env::var(ROLE) {
        return ten_thousand_reports_child(&url, REPORTS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(async {
        let ids: Vec<String> = (0..REPORTS).map(|n| format!("t{n}")).collect();
        let server = server_with(&ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
        // Slow enough that, unbounded, thousands of reports hold a connection
        // at the same time.
        server.latency(Duration::from_millis(20));
        server
    });
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(exe)
        .args([
            "--exact",
            "ten_thousand_reports_under_a_1024_descriptor_limit_are_all_delivered",
            "--nocapture",
        ])
        .env(ROLE, server.url())
        .status()
        .unwrap();
    assert!(status.success(), "the child failed: {status}");
    let completed = (0..REPORTS)
        .filter(|n| {
            server.state(&format!("t{n}"))
                == Some(tower_terminal_retry::test_server::TaskState::Completed)
        })
        .count();
    assert_eq!(completed, REPORTS);
    drop(server);
    drop(runtime);
}

fn ten_thousand_reports_child(url: &str, reports: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // One attempt each: a report that meets EMFILE is not delivered.
        let client = TaskClient::builder(url)
            .policy(policy(&[]))
            .build()
            .unwrap();
        let futures: Vec<_> = (0..reports)
            .map(|n| client.report_task_result(&format!("t{n}"), TaskResult::completed("done")))
            .collect();
        let mut completed = 0;
        for future in futures {
            let outcome = future.await;
            assert_eq!(outcome, ReportOutcome::Completed);
            completed += 1;
        }
        assert_eq!(completed, reports);
    });
}

#[cfg(feature = "outbox")]
mod with_outbox {
    use super::*;
    use crate::outbox_support::Scratch;
    use tower_terminal_retry::outbox::Replay;

    /// A report stored under another base URL (an old server, or a record
    /// planted in the file) is quarantined, never sent with this client's
    /// token.
    #[tokio::test(start_paused = true)]
    async fn a_report_stored_for_another_origin_never_gets_the_token() {
        let scratch = Scratch::new("hardening-origin");
        let old = server_with(&["t1"]).await;
        old.outage(
            Duration::ZERO,
            Duration::from_secs(3600),
            Fault::Status(StatusCode::BAD_GATEWAY),
        );
        let first = TaskClient::builder(old.url())
            .token("old-token")
            .policy(policy(&[1]))
            .outbox(scratch.file())
            .replay(Replay {
                interval: Duration::from_secs(3600),
                ..Replay::default()
            })
            .build()
            .unwrap();
        let outcome = first
            .report_task_result("t1", TaskResult::completed("done"))
            .await;
        assert_eq!(outcome, ReportOutcome::Queued);
        drop(first);
        let attempts_before = old.attempts().len();

        let new = server_with(&["t1"]).await;
        let (events, _guard) = capture();
        let second = reopen(|| {
            TaskClient::builder(new.url())
                .token(TOKEN)
                .policy(policy(&[1]))
                .outbox(scratch.file())
                .replay(Replay {
                    interval: Duration::from_secs(1),
                    ..Replay::default()
                })
                .build()
        })
        .await;
        for _ in 0..30 {
            if !second.outbox().unwrap().quarantined().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(second.outbox().unwrap().quarantined().unwrap().len(), 1);
        assert!(second.outbox().unwrap().pending().unwrap().is_empty());
        assert_eq!(
            old.attempts().len(),
            attempts_before,
            "nothing more to the old host"
        );
        assert!(support::requests(&new).is_empty(), "nor elsewhere");
        let text = events.text();
        assert!(
            text.contains("127.0.0.1"),
            "the event names the host: {text}"
        );
        assert!(!text.contains(TOKEN));
    }

    #[tokio::test(start_paused = true)]
    async fn an_echoed_token_never_reaches_the_outbox_file_or_its_listing() {
        let scratch = Scratch::new("hardening-echo");
        let server = answering(echo_authorization(400)).await;
        let client = TaskClient::builder(server.url(""))
            .token(TOKEN)
            .policy(policy(&[1]))
            .outbox(scratch.file())
            .build()
            .unwrap();
        let outcome = client
            .report_task_result("t1", TaskResult::failed("broke"))
            .await;
        assert_eq!(outcome, ReportOutcome::Quarantined);
        let quarantined = client.outbox().unwrap().quarantined().unwrap();
        let failure = quarantined[0].last_failure.as_deref().expect("a failure");
        assert!(failure.contains("[redacted]"), "{failure}");
        assert!(!shows_token(failure), "{failure}");
        drop(client);
        let file = std::fs::read(scratch.file()).unwrap();
        assert!(!shows_token(&String::from_utf8_lossy(&file)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflict_retires_the_stored_report() {
        let scratch = Scratch::new("hardening-conflict");
        let server = server_with(&["t1"]).await;
        server.script(
            "t1",
            Action::Complete,
            [Fault::Status(StatusCode::CONFLICT)],
        );
        let client = TaskClient::builder(server.url())
            .policy(policy(&[1]))
            .outbox(scratch.file())
            .build()
            .unwrap();
        let outcome = client
            .report_task_result("t1", TaskResult::completed("done"))
            .await;
        assert_eq!(outcome, ReportOutcome::Superseded);
        assert_eq!(terminal_calls(&server, "t1"), (1, 0));
        for _ in 0..100 {
            if client.outbox().unwrap().pending().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(client.outbox().unwrap().pending().unwrap().is_empty());
        assert!(client.outbox().unwrap().quarantined().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_task_ids_are_not_stored() {
        let scratch = Scratch::new("hardening-ids");
        let server = server_with(&[]).await;
        let client = TaskClient::builder(server.url())
            .outbox(scratch.file())
            .build()
            .unwrap();
        let mut report = client.report_task_result("", TaskResult::completed("done"));
        assert_eq!(
            report.stored().await,
            Some(tower_terminal_retry::outbox::Durability::Refused)
        );
        assert_eq!(report.await, ReportOutcome::InvalidTaskId);
        assert!(client.outbox().unwrap().pending().unwrap().is_empty());
        assert!(support::requests(&server).is_empty());
    }

    /// `shutdown` right after many reports start, while their commits are
    /// under way: each is returned, or stays stored, never both, never
    /// neither.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_returns_a_report_or_leaves_it_stored_never_both() {
        // Shut down at several moments: before the first commit, and while
        // commits of reports are under way.
        for (round, after_ms) in [0, 1, 2, 5, 10].into_iter().enumerate() {
            shutdown_round(round, Duration::from_millis(after_ms)).await;
        }
    }

    async fn shutdown_round(round: usize, after: Duration) {
        let scratch = Scratch::new(&format!("hardening-shutdown-{round}"));
        let server = server_with(&[]).await;
        server.outage(Duration::ZERO, Duration::from_secs(3600), Fault::Hang);
        let client = TaskClient::builder(server.url())
            .policy(policy(&[1]))
            .outbox(scratch.file())
            .replay(Replay {
                interval: Duration::from_secs(3600),
                ..Replay::default()
            })
            .build()
            .unwrap();
        let ids: Vec<String> = (0..300).map(|n| format!("t{n}")).collect();
        let reports: Vec<_> = ids
            .iter()
            .map(|id| client.report_task_result(id, TaskResult::completed("done")))
            .collect();
        tokio::time::sleep(after).await;
        let returned: Vec<String> = client
            .shutdown(Duration::ZERO)
            .await
            .into_iter()
            .map(|report| report.task_id)
            .collect();
        drop(reports);
        let stored: Vec<String> = client
            .outbox()
            .unwrap()
            .pending()
            .unwrap()
            .into_iter()
            .map(|entry| entry.key)
            .collect();
        let both: Vec<&String> = returned.iter().filter(|id| stored.contains(id)).collect();
        assert!(
            both.is_empty(),
            "after {after:?}, returned and stored: {both:?}"
        );
        let mut all: Vec<&String> = returned.iter().chain(&stored).collect();
        all.sort();
        all.dedup();
        assert_eq!(
            all.len(),
            ids.len(),
            "after {after:?}, each returned or stored"
        );
    }

    async fn reopen(
        build: impl Fn() -> Result<TaskClient, tower_terminal_retry::client::Error>,
    ) -> TaskClient {
        // The last removal of the previous client may still hold the file.
        for _ in 0..100 {
            match build() {
                Ok(client) => return client,
                Err(error) if error.kind() == ErrorKind::Outbox => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(error) => panic!("{error}"),
            }
        }
        build().expect("the file is free")
    }
}
