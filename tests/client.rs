//! The task-callback client against the loopback task server: the daemon
//! tests of the Go original, the request shape, errors and shutdown.

mod client_support;
mod support;

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tower_terminal_retry::{
    client::{Completion, ErrorKind, Failure, ReportOutcome, TaskClient, TaskResult, UsageEntry},
    test_server::{Action, Fault, TaskServer, TaskState, TestServer},
};
use tracing::Instrument;

use client_support::{capture, client, server_with, terminal_calls};

const BAD_GATEWAY: Fault = Fault::Status(StatusCode::BAD_GATEWAY);

// --- The Go daemon tests ---------------------------------------------------

/// A 502 burst on `complete` followed by a 200 resolves through `complete`,
/// never touching `fail`.
#[tokio::test(start_paused = true)]
async fn retries_transient_complete_then_succeeds() {
    let server = server_with(&["task-retry"]).await;
    server.script("task-retry", Action::Complete, [BAD_GATEWAY]);
    let client = client(&server, &[4, 8, 16, 32, 64]);

    let outcome = client
        .report_task_result("task-retry", TaskResult::completed("ok"))
        .await;

    assert_eq!(outcome, ReportOutcome::Completed);
    assert_eq!(terminal_calls(&server, "task-retry"), (2, 0));
    assert_eq!(server.state("task-retry"), Some(TaskState::Completed));
}

/// `complete` failing transiently through the whole schedule does NOT fall
/// back to `fail`: the task is left running, and that is logged as an error.
#[tokio::test(start_paused = true)]
async fn transient_complete_exhausted_does_not_fallback() {
    let server = server_with(&["task-stuck"]).await;
    server.script("task-stuck", Action::Complete, [BAD_GATEWAY; 3]);
    let client = client(&server, &[1, 1]);
    client.start_task("task-stuck").await.unwrap();
    let (events, _guard) = capture();

    let outcome = async {
        client
            .report_task_result("task-stuck", TaskResult::completed("ok"))
            .await
    }
    .instrument(tracing::info_span!("handle_task"))
    .await;

    assert_eq!(outcome, ReportOutcome::LeftRunning);
    assert_eq!(terminal_calls(&server, "task-stuck"), (3, 0));
    assert_eq!(server.state("task-stuck"), Some(TaskState::Running));
    let events = events.text();
    let left_running = events
        .lines()
        .find(|line| line.contains("leaving the task running"))
        .expect("an event saying the task was left running");
    assert!(left_running.contains("ERROR"), "{left_running}");
    assert!(left_running.contains("returned 502"), "{left_running}");
    // Delivered on its own task, in the caller's span.
    assert!(left_running.contains("handle_task"), "{left_running}");
}

/// A permanent rejection of `complete` falls back to `fail` exactly once,
/// with reason `agent_error` and the rejection in the message.
#[tokio::test(start_paused = true)]
async fn permanent_complete_falls_back_to_fail() {
    let server = server_with(&["task-bad"]).await;
    server.script(
        "task-bad",
        Action::Complete,
        [Fault::Status(StatusCode::BAD_REQUEST)],
    );
    let client = client(&server, &[1, 1, 1]);

    let result = TaskResult::Completed(Completion {
        output: "ok".into(),
        session_id: "s1".into(),
        work_dir: "/w".into(),
        ..Completion::default()
    });
    let outcome = client.report_task_result("task-bad", result).await;

    assert_eq!(outcome, ReportOutcome::FellBackToFail);
    assert_eq!(terminal_calls(&server, "task-bad"), (1, 1));
    assert_eq!(server.state("task-bad"), Some(TaskState::Failed));
    assert_eq!(
        support::final_report(&server, "task-bad"),
        Some(json!({
            "error": "complete task failed: POST /api/daemon/tasks/task-bad/complete returned 400",
            "session_id": "s1",
            "work_dir": "/w",
            "failure_reason": "agent_error",
        }))
    );
}

/// A result that is not a completion goes to `fail`, with its own reason.
#[tokio::test(start_paused = true)]
async fn non_completed_hits_fail_endpoint() {
    let server = server_with(&["task-failed"]).await;
    let client = client(&server, &[1]);

    // A failure has no branch to report: none can be sent.
    let result = TaskResult::Failed(Failure {
        error: "agent crashed".into(),
        failure_reason: "timeout".into(),
        ..Failure::default()
    });
    let outcome = client.report_task_result("task-failed", result).await;

    assert_eq!(outcome, ReportOutcome::Failed);
    assert_eq!(terminal_calls(&server, "task-failed"), (0, 1));
    assert_eq!(
        support::final_report(&server, "task-failed"),
        Some(json!({"error": "agent crashed", "failure_reason": "timeout"}))
    );
}

/// `fail` rides out 5xx like `complete` does.
#[tokio::test(start_paused = true)]
async fn fail_task_retries_on_transient_5xx_then_succeeds() {
    let server = server_with(&["task-fail"]).await;
    server.script(
        "task-fail",
        Action::Fail,
        [
            Fault::Status(StatusCode::SERVICE_UNAVAILABLE),
            Fault::Status(StatusCode::GATEWAY_TIMEOUT),
        ],
    );
    let client = client(&server, &[4, 8, 16]);
    let start = tokio::time::Instant::now();

    let outcome = client
        .report_task_result("task-fail", TaskResult::failed("boom"))
        .await;

    assert_eq!(outcome, ReportOutcome::Failed, "the third attempt succeeds");

    assert_eq!(terminal_calls(&server, "task-fail"), (0, 3));
    assert_eq!(server.state("task-fail"), Some(TaskState::Failed));
    let offsets: Vec<_> = server
        .attempts()
        .iter()
        .map(|a| a.request.at - start)
        .collect();
    let secs = |s| Duration::from_secs(s);
    assert_eq!(offsets, [secs(0), secs(4), secs(12)]);
}

/// The caller giving up (its future dropped mid-retry) does not stop the
/// report: it still reaches the server, and `shutdown` finds nothing left.
#[tokio::test(start_paused = true)]
async fn cancelled_parent_still_reports_terminal_state() {
    let server = server_with(&["task-cancelled"]).await;
    server.script("task-cancelled", Action::Complete, [BAD_GATEWAY]);
    let client = client(&server, &[4]);

    let report = client.report_task_result("task-cancelled", TaskResult::completed("ok"));
    // The caller's deadline passes during the 4 s wait before the retry.
    let cut_short = tokio::time::timeout(Duration::from_secs(1), report).await;
    assert!(cut_short.is_err());
    assert_eq!(terminal_calls(&server, "task-cancelled"), (1, 0));

    let undelivered = client.shutdown(Duration::from_secs(60)).await;

    assert!(undelivered.is_empty(), "{undelivered:?}");
    assert_eq!(terminal_calls(&server, "task-cancelled"), (2, 0));
    assert_eq!(server.state("task-cancelled"), Some(TaskState::Completed));
}

/// A report is on its way as soon as it is made, even if its future is never
/// polled.
#[tokio::test(start_paused = true)]
async fn a_report_never_awaited_is_still_delivered() {
    let server = server_with(&["task-dropped"]).await;
    let client = client(&server, &[1]);

    drop(client.report_task_result("task-dropped", TaskResult::failed("boom")));
    assert_eq!(client.reports_in_flight(), 1);

    assert!(client.shutdown(Duration::from_secs(10)).await.is_empty());
    assert_eq!(server.state("task-dropped"), Some(TaskState::Failed));
    assert_eq!(client.reports_in_flight(), 0);
}

// --- Shutdown --------------------------------------------------------------

/// `shutdown` waits up to its grace, then stops what is left and hands it
/// back, in the order the reports were made; their futures end `Abandoned`.
#[tokio::test(start_paused = true)]
async fn shutdown_returns_the_reports_it_could_not_deliver() {
    let server = server_with(&["fast", "hung-1", "hung-2"]).await;
    server.script("hung-1", Action::Complete, [Fault::Hang; 4]);
    server.script("hung-2", Action::Fail, [Fault::Hang; 4]);
    // Four hung attempts of 5 s each with 1 s between them: 23 s.
    let client = client(&server, &[1, 1, 1]);

    let hung_one = client.report_task_result("hung-1", TaskResult::completed("one"));
    let fast = client.report_task_result("fast", TaskResult::completed("quick"));
    let hung_two = client.report_task_result("hung-2", TaskResult::failed("two"));
    let start = tokio::time::Instant::now();
    let undelivered = client.shutdown(Duration::from_secs(10)).await;

    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let ids: Vec<_> = undelivered
        .iter()
        .map(|report| report.task_id.as_str())
        .collect();
    assert_eq!(ids, ["hung-1", "hung-2"]);
    assert_eq!(undelivered[0].result, TaskResult::completed("one"));
    assert_eq!(
        (
            undelivered[1].task_id.clone(),
            undelivered[1].result.clone()
        ),
        ("hung-2".to_owned(), TaskResult::failed("two"))
    );
    assert_eq!(fast.await, ReportOutcome::Completed);
    assert_eq!(hung_one.await, ReportOutcome::Abandoned);
    assert_eq!(hung_two.await, ReportOutcome::Abandoned);
    assert_eq!(client.reports_in_flight(), 0);
    assert_eq!(server.state("hung-1"), Some(TaskState::Queued));
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_nothing_in_flight_returns_at_once() {
    let server = server_with(&[]).await;
    let client = client(&server, &[1]);
    let start = tokio::time::Instant::now();

    assert!(client.shutdown(Duration::from_secs(30)).await.is_empty());
    assert_eq!(start.elapsed(), Duration::ZERO);
}

// --- Request shape ---------------------------------------------------------

/// Every route, its JSON and headers, as the server receives them.
#[tokio::test(start_paused = true)]
async fn requests_have_the_agreed_routes_bodies_and_headers() {
    let server = server_with(&["t1"]).await;
    let client = TaskClient::builder(server.url())
        .token("s3cret-token")
        .client_version("1.2.3")
        .build()
        .unwrap();

    client.start_task("t1").await.unwrap();
    client.report_progress("t1", "cloning", 1, 3).await.unwrap();
    let usage = UsageEntry {
        provider: "anthropic".into(),
        model: "m1".into(),
        input_tokens: 10,
        output_tokens: 20,
        cache_read_tokens: 3,
        cache_write_tokens: 4,
    };
    client.report_usage("t1", &[usage]).await.unwrap();
    client.pin_session("t1", "sess", "").await.unwrap();
    let complete = TaskResult::Completed(Completion {
        output: "done".into(),
        branch_name: "feature/x".into(),
        session_id: "sess".into(),
        work_dir: "/w".into(),
    });
    let outcome = client.report_task_result("t1", complete).await;
    assert_eq!(outcome, ReportOutcome::Completed);
    let fail = TaskResult::Failed(Failure {
        error: "late".into(),
        failure_reason: "agent_error".into(),
        ..Failure::default()
    });
    // Already terminal: 200, and the failure stands as delivered.
    let outcome = client.report_task_result("t1", fail).await;
    assert_eq!(outcome, ReportOutcome::Failed);

    let requests = support::requests(&server);
    let sent: Vec<_> = requests
        .iter()
        .map(|request| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            (request.method.as_str(), request.uri.path(), body)
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("POST", "/api/daemon/tasks/t1/start", json!({})),
            (
                "POST",
                "/api/daemon/tasks/t1/progress",
                json!({"summary": "cloning", "step": 1, "total": 3})
            ),
            (
                "POST",
                "/api/daemon/tasks/t1/usage",
                json!({"usage": [{
                    "provider": "anthropic", "model": "m1", "input_tokens": 10,
                    "output_tokens": 20, "cache_read_tokens": 3, "cache_write_tokens": 4,
                }]})
            ),
            (
                "POST",
                "/api/daemon/tasks/t1/session",
                json!({"session_id": "sess"})
            ),
            (
                "POST",
                "/api/daemon/tasks/t1/complete",
                json!({"output": "done", "branch_name": "feature/x", "session_id": "sess", "work_dir": "/w"})
            ),
            (
                "POST",
                "/api/daemon/tasks/t1/fail",
                json!({"error": "late", "failure_reason": "agent_error"})
            ),
        ]
    );
    for request in &requests {
        let header = |name: &str| request.headers.get(name).map(|v| v.to_str().unwrap());
        assert_eq!(header("content-type"), Some("application/json"));
        assert_eq!(header("x-client-platform"), Some("daemon"));
        assert_eq!(header("x-client-os"), Some(std::env::consts::OS));
        assert_eq!(header("x-client-version"), Some("1.2.3"));
        assert_eq!(header("authorization"), Some("Bearer s3cret-token"));
    }
}

#[tokio::test(start_paused = true)]
async fn optional_headers_and_fields_are_omitted_when_unset() {
    let server = server_with(&["t1"]).await;
    let client = TaskClient::builder(server.url()).build().unwrap();

    let outcome = client
        .report_task_result("t1", TaskResult::completed(""))
        .await;

    assert_eq!(outcome, ReportOutcome::Completed);
    let request = &support::requests(&server)[0];
    assert!(request.headers.get("x-client-version").is_none());
    assert!(request.headers.get("authorization").is_none());
    assert_eq!(&request.body[..], br#"{"output":""}"#);
}

#[tokio::test(start_paused = true)]
async fn empty_usage_and_empty_session_send_nothing() {
    let server = server_with(&["t1"]).await;
    let client = client(&server, &[]);

    client.report_usage("t1", &[]).await.unwrap();
    client.pin_session("t1", "", "").await.unwrap();
    client.pin_session("t1", "\0", "").await.unwrap();

    assert!(support::requests(&server).is_empty());
}

#[tokio::test(start_paused = true)]
async fn task_ids_are_path_escaped() {
    let id = "team a/task?1#x%";
    let server = server_with(&[id]).await;
    let client = client(&server, &[]);

    client.start_task(id).await.unwrap();

    assert_eq!(
        support::requests(&server)[0].uri.path(),
        "/api/daemon/tasks/team%20a%2Ftask%3F1%23x%25/start"
    );
    assert_eq!(server.state(id), Some(TaskState::Running));
}

#[tokio::test(start_paused = true)]
async fn nul_bytes_are_stripped_from_every_string_sent() {
    let server = server_with(&["t1", "t2"]).await;
    let client = client(&server, &[]);

    let result = TaskResult::Completed(Completion {
        output: "out\0put".into(),
        branch_name: "b\0r".into(),
        session_id: "\0s".into(),
        work_dir: "w\0".into(),
    });
    client.report_task_result("t1", result).await;
    client.report_progress("t2", "st\0ep", 1, 2).await.unwrap();

    assert_eq!(
        support::final_report(&server, "t1"),
        Some(json!({"output": "output", "branch_name": "br", "session_id": "s", "work_dir": "w"}))
    );
    assert!(!support::requests(&server)
        .iter()
        .any(|r| r.body.contains(&0)));
    let progress: serde_json::Value =
        serde_json::from_slice(&support::requests(&server)[1].body).unwrap();
    assert_eq!(progress["summary"], "step");
}

#[tokio::test]
async fn the_token_appears_in_no_debug_output() {
    let token = "s3cret-token";
    let builder = TaskClient::builder("http://127.0.0.1:9").token(token);
    let builder_debug = format!("{builder:?}");
    let client = builder.client_version("1.0").build().unwrap();
    let client_debug = format!("{client:?}");

    for debug in [&builder_debug, &client_debug] {
        assert!(!debug.contains(token), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }
    assert!(client_debug.contains("1.0"), "{client_debug}");
}

// --- Errors ------------------------------------------------------------------

/// A `Result<(), Error>` is one word wide: the error is boxed.
#[test]
fn an_error_is_one_word() {
    use tower_terminal_retry::client::Error;

    assert_eq!(size_of::<Error>(), size_of::<usize>());
}

#[tokio::test(start_paused = true)]
async fn a_rejection_names_route_status_and_body() {
    let server = server_with(&[]).await;
    let client = client(&server, &[1, 1]);

    let error = client.start_task("ghost").await.unwrap_err();

    assert_eq!(
        error.to_string(),
        "POST /api/daemon/tasks/ghost/start returned 404: task not found"
    );
    assert_eq!(error.kind(), ErrorKind::Status(StatusCode::NOT_FOUND));
    assert!(!error.is_transient());
    assert!(std::error::Error::source(&error).is_none());
    // Permanent: one attempt of each terminal route only, the second the
    // fallback of the first.
    let outcome = client
        .report_task_result("ghost", TaskResult::completed("x"))
        .await;
    assert_eq!(outcome, ReportOutcome::NotDelivered);
    assert_eq!(terminal_calls(&server, "ghost"), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_long_error_body_is_cut_to_4_kib_and_trimmed() {
    let body = format!("  {}\n", "x".repeat(10_000));
    let server = TestServer::start(move |_| support::text_reply(502, body.clone()))
        .await
        .unwrap();
    let client = TaskClient::builder(server.url(""))
        .policy(client_support::policy(&[]))
        .build()
        .unwrap();

    let error = client.start_task("t1").await.unwrap_err();

    let prefix = "POST /api/daemon/tasks/t1/start returned 502: ";
    let message = error.to_string();
    assert!(message.starts_with(prefix), "{message}");
    // Trimmed, then cut to 4 KiB of text.
    assert_eq!(message[prefix.len()..], "x".repeat(4096));
    assert!(error.is_transient());
    assert_eq!(error.kind(), ErrorKind::Status(StatusCode::BAD_GATEWAY));
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_transient_and_carry_their_source() {
    // A port nothing listens on any more: connection refused. On 127.0.0.2,
    // where no test server listens, so that none can be handed the port.
    let listener = std::net::TcpListener::bind("127.0.0.2:0")
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = TaskClient::builder(format!("http://{addr}"))
        .policy(client_support::policy(&[1, 1]))
        .build()
        .unwrap();

    let error = client.start_task("t1").await.unwrap_err();

    assert!(error.is_transient());
    assert_eq!(error.kind(), ErrorKind::Transport);
    assert_eq!(
        error.to_string(),
        "POST /api/daemon/tasks/t1/start failed before any response"
    );
    assert!(std::error::Error::source(&error).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_times_out_and_is_retried() {
    let server = server_with(&["t1"]).await;
    server.script("t1", Action::Complete, [Fault::Hang, Fault::Hang]);
    server.script("t1", Action::Start, [Fault::Hang]);
    let client = client(&server, &[1]);
    let (events, _guard) = capture();
    let start = tokio::time::Instant::now();

    let outcome = client
        .report_task_result("t1", TaskResult::completed("x"))
        .await;

    // Two attempts of 5 s with 1 s between them; a transient failure is
    // never turned into `fail`.
    assert_eq!(outcome, ReportOutcome::LeftRunning);
    assert_eq!(start.elapsed(), Duration::from_secs(11));
    assert_eq!(terminal_calls(&server, "t1"), (2, 0));
    let logged = events.text();
    assert!(
        logged.contains("POST /api/daemon/tasks/t1/complete failed before any response"),
        "{logged}"
    );

    // A route tried once says so in its error.
    let start = tokio::time::Instant::now();
    let error = client.start_task("t1").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(error.is_transient());
    assert_eq!(
        error.to_string(),
        "POST /api/daemon/tasks/t1/start timed out"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test]
async fn bad_configuration_is_an_error_at_build() {
    let build =
        |builder: tower_terminal_retry::client::TaskClientBuilder| builder.build().unwrap_err();
    let cases = [
        (build(TaskClient::builder("127.0.0.1:8080")), "base URL"),
        (
            build(TaskClient::builder("ftp://127.0.0.1")),
            "neither http nor https",
        ),
        (
            build(TaskClient::builder("http://127.0.0.1/?a=1")),
            "has a query",
        ),
        (
            build(TaskClient::builder("http://127.0.0.1").timeout(Duration::ZERO)),
            "timeout",
        ),
        (
            build(TaskClient::builder("http://127.0.0.1").token("line\nbreak")),
            "token",
        ),
        (
            build(TaskClient::builder("http://127.0.0.1").client_version("1\n")),
            "version",
        ),
    ];
    for (error, expected) in cases {
        assert_eq!(error.kind(), ErrorKind::Config, "{error}");
        assert!(!error.is_transient(), "{error}");
        assert!(error.to_string().contains(expected), "{error}");
        assert!(!error.to_string().contains("line"), "{error}");
    }
    if !cfg!(feature = "rustls") {
        let error = build(TaskClient::builder("https://127.0.0.1"));
        assert!(error.to_string().contains("rustls"), "{error}");
    }
}

#[test]
fn building_outside_a_tokio_runtime_is_an_error() {
    let error = TaskClient::builder("http://127.0.0.1:8080")
        .build()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.to_string().contains("tokio runtime"), "{error}");
}

/// A base URL with a path prefix keeps it.
#[tokio::test(start_paused = true)]
async fn a_base_path_prefix_is_kept() {
    let server = TestServer::scripted([]).await.unwrap();
    let client = TaskClient::builder(server.url("/tenant-7/"))
        .build()
        .unwrap();

    client.start_task("t1").await.unwrap();

    assert_eq!(
        server.requests()[0].uri.path(),
        "/tenant-7/api/daemon/tasks/t1/start"
    );
}

/// Tasks the server does not know stay unknown: the server is the judge.
#[tokio::test(start_paused = true)]
async fn the_task_server_rejects_unknown_tasks_and_bad_bodies() {
    let server: TaskServer = server_with(&["t1"]).await;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let post = |path: &str, body: &'static str| {
        http.request(
            http::Request::post(server.url() + path)
                .body(http_body_util::Full::from(body))
                .unwrap(),
        )
    };

    let bad_body = post("/api/daemon/tasks/t1/complete", r#"{"out":"x"}"#)
        .await
        .unwrap();
    let unknown = post("/api/daemon/tasks/t9/complete", r#"{"output":"x"}"#)
        .await
        .unwrap();
    let done = post("/api/daemon/tasks/t1/fail", r#"{"error":"x"}"#)
        .await
        .unwrap();
    let again = post("/api/daemon/tasks/t1/complete", r#"{"output":"x"}"#)
        .await
        .unwrap();

    assert_eq!(bad_body.status(), 400);
    assert_eq!(unknown.status(), 404);
    assert_eq!(done.status(), 200);
    assert_eq!(again.status(), 200);
    assert_eq!(server.state("t1"), Some(TaskState::Failed));
    assert_eq!(
        support::final_report(&server, "t1"),
        Some(json!({"error": "x"}))
    );
}
