//! The task client with an outbox: terminal reports on disk before their
//! first attempt, delivered across restarts and outages of any length.
//! Real files, a real loopback task server, tokio's paused clock where time
//! matters.

#![cfg(feature = "outbox")]

mod outbox_support;
mod support;

use std::{path::Path, time::Duration};

use http::StatusCode;
use tower_terminal_retry::{
    client::{Completion, ErrorKind, ReportOutcome, TaskClient, TaskClientBuilder, TaskResult},
    outbox::{Durability, Replay},
    test_server::{Action, Fault, Handling, TaskServer, TaskState},
    Recovery, Schedule, TerminalRetryPolicy,
};

use outbox_support::Scratch;

/// A client of `server` keeping its reports in `path`: a short schedule
/// (1 s, 1 s), a short per-attempt timeout, a token.
fn builder(server: &TaskServer, path: &Path) -> TaskClientBuilder {
    TaskClient::builder(server.url())
        .token("s3cret-token")
        .policy(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([Duration::from_secs(1); 2]).unwrap())
                .with_recovery(Recovery::default()),
        )
        .timeout(Duration::from_secs(5))
        .outbox(path)
}

fn bad_gateway() -> Fault {
    Fault::Status(StatusCode::BAD_GATEWAY)
}

/// Waits on tokio's clock, a second at a time, until `done` or `limit`.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    true
}

#[test]
fn a_stored_report_survives_its_runtime_and_a_new_client_delivers_it() {
    let scratch = Scratch::new("write-ahead");
    // The server runs on a runtime of its own, which outlives the client's.
    let server_runtime = tokio::runtime::Runtime::new().unwrap();
    let server = server_runtime.block_on(TaskServer::start()).unwrap();
    server.add_tasks(["t1"]);
    // The first attempt hangs: the client is stopped while it waits.
    server.script("t1", Action::Complete, [Fault::Hang]);

    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        let client = builder(&server, &scratch.file()).build().unwrap();
        let mut report = client.report_task_result("t1", TaskResult::completed("done"));
        assert_eq!(report.stored().await, Some(Durability::Stored));
        assert!(wait_for_real(|| server.attempts().len() == 1).await);
    });
    // A crash: the runtime goes, and every task with it, mid-delivery.
    drop(first);
    assert_eq!(server.state("t1"), Some(TaskState::Queued));

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let client = builder(&server, &scratch.file()).build().unwrap();
        let pending = client.outbox().unwrap().pending().unwrap();
        assert_eq!(pending.len(), 1, "readable before any replay");
        assert_eq!(pending[0].key, "t1");
        assert_eq!(pending[0].tag.as_deref(), Some("complete"));
        assert!(wait_for_real(|| server.state("t1") == Some(TaskState::Completed)).await);
        assert!(wait_for_real(|| client.outbox().unwrap().pending().unwrap().is_empty()).await);
    });
    assert_eq!(
        support::calls(&server, "t1", Action::Fail),
        0,
        "never turned red"
    );
    assert_eq!(
        support::final_report(&server, "t1").unwrap()["output"],
        "done"
    );
}

/// Waits on tokio's clock, 5 s at most, until `client` has nothing stored.
async fn drained(client: &TaskClient) -> bool {
    wait_for(Duration::from_secs(5), || {
        client.outbox().unwrap().pending().unwrap().is_empty()
    })
    .await
}

/// Waits on the real clock, 10 ms at a time, 10 s at most.
async fn wait_for_real(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..1_000 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(start_paused = true)]
async fn a_completion_that_outlives_the_schedule_is_queued_then_delivered() {
    let scratch = Scratch::new("queued");
    let started = tokio::time::Instant::now();
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1", "t2"]);
    server.outage(Duration::ZERO, Duration::from_secs(600), bad_gateway());
    let client = builder(&server, &scratch.file()).build().unwrap();

    let outcome = client
        .report_task_result("t1", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::Queued);
    let pending = client.outbox().unwrap().pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, "t1");
    assert_eq!(pending[0].tag.as_deref(), Some("complete"));
    assert_eq!(pending[0].attempts, 3);
    let failure = pending[0].last_failure.as_deref().unwrap();
    assert!(failure.contains("502"), "{failure}");
    assert!(pending[0].stored_at <= std::time::SystemTime::now());

    // Ten minutes of outage: the report stays stored and is not failed.
    tokio::time::sleep_until(started + Duration::from_secs(590)).await;
    assert_eq!(server.state("t1"), Some(TaskState::Queued));
    tokio::time::sleep_until(started + Duration::from_secs(600)).await;
    // The server is back: a successful call releases the replay at once.
    client.start_task("t2").await.unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || server.state("t1")
            == Some(TaskState::Completed))
        .await
    );
    assert!(drained(&client).await);
    assert_eq!(support::calls(&server, "t1", Action::Fail), 0);
}

#[tokio::test(start_paused = true)]
async fn a_refused_completion_falls_back_to_a_fail_stored_before_it_is_sent() {
    let scratch = Scratch::new("fallback");
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1"]);
    server.script(
        "t1",
        Action::Complete,
        [Fault::Status(StatusCode::BAD_REQUEST)],
    );
    // The fallback meets the end of the server's patience: 502 throughout.
    server.script("t1", Action::Fail, [bad_gateway(); 3]);
    let client = builder(&server, &scratch.file())
        .replay(Replay {
            interval: Duration::from_secs(3600),
            ..Replay::default()
        })
        .build()
        .unwrap();
    let result = TaskResult::Completed(Completion {
        output: "done".into(),
        session_id: "s-1".into(),
        ..Completion::default()
    });
    let outcome = client.report_task_result("t1", result).await;
    assert_eq!(outcome, ReportOutcome::Queued);
    let pending = client.outbox().unwrap().pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].tag.as_deref(),
        Some("fail"),
        "the fallback is stored"
    );
    assert_eq!(support::calls(&server, "t1", Action::Complete), 1);
    drop(client);

    // A restart delivers the stored fallback, not the refused completion.
    let client = builder(&server, &scratch.file()).build().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || server.state("t1")
            == Some(TaskState::Failed))
        .await
    );
    let report = support::final_report(&server, "t1").unwrap();
    assert_eq!(report["failure_reason"], "agent_error");
    assert_eq!(report["session_id"], "s-1");
    let error = report["error"].as_str().unwrap();
    assert!(error.starts_with("complete task failed: "), "{error}");
    assert!(error.contains("400"), "{error}");
    assert_eq!(support::calls(&server, "t1", Action::Complete), 1, "once");
    assert!(drained(&client).await);
}

#[tokio::test(start_paused = true)]
async fn a_refused_fail_is_quarantined_until_requeued_or_discarded() {
    let scratch = Scratch::new("quarantine");
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1", "t2"]);
    let refused = Fault::Status(StatusCode::UNPROCESSABLE_ENTITY);
    server.script("t1", Action::Fail, [refused]);
    server.script("t2", Action::Fail, [refused]);
    let client = builder(&server, &scratch.file()).build().unwrap();
    for task_id in ["t1", "t2"] {
        let outcome = client
            .report_task_result(task_id, TaskResult::failed("boom"))
            .await;
        assert_eq!(outcome, ReportOutcome::Quarantined);
    }
    let quarantined = client.outbox().unwrap().quarantined().unwrap();
    let ids: Vec<&str> = quarantined
        .iter()
        .map(|report| report.key.as_str())
        .collect();
    assert_eq!(ids, ["t1", "t2"]);
    assert!(quarantined[0]
        .last_failure
        .as_deref()
        .unwrap()
        .contains("422"));
    assert!(client.outbox().unwrap().pending().unwrap().is_empty());
    // Kept, not retried.
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(support::calls(&server, "t1", Action::Fail), 1);
    // A second report for a quarantined task does not replace it.
    let again = client
        .report_task_result("t1", TaskResult::completed("x"))
        .await;
    assert_eq!(again, ReportOutcome::AlreadyStored);

    assert!(client.outbox().unwrap().requeue("t1").await.unwrap());
    assert!(
        !client.outbox().unwrap().requeue("t1").await.unwrap(),
        "not quarantined now"
    );
    assert!(
        wait_for(Duration::from_secs(5), || server.state("t1")
            == Some(TaskState::Failed))
        .await
    );
    assert!(client.outbox().unwrap().discard("t2").await.unwrap());
    assert!(!client.outbox().unwrap().discard("t2").await.unwrap());
    assert!(client.outbox().unwrap().quarantined().unwrap().is_empty());
    assert!(drained(&client).await);
    assert_eq!(server.state("t2"), Some(TaskState::Queued));
}

#[tokio::test(start_paused = true)]
async fn while_the_server_is_down_one_probe_at_a_time_then_a_bounded_replay() {
    let scratch = Scratch::new("probe");
    let started = tokio::time::Instant::now();
    let server = TaskServer::start().await.unwrap();
    let ids: Vec<String> = (0..50).map(|index| format!("t{index}")).collect();
    server.add_tasks(ids.iter().map(String::as_str));
    server.add_tasks(["heartbeat"]);
    let outage = Duration::from_secs(600);
    server.outage(Duration::ZERO, outage, bad_gateway());
    let latency = Duration::from_millis(200);
    server.latency(latency);
    let client = TaskClient::builder(server.url())
        .policy(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([]).unwrap())
                .with_recovery(Recovery::default()),
        )
        .outbox(scratch.file())
        .replay(Replay {
            interval: Duration::from_secs(20),
            concurrency: 4,
            ..Replay::default()
        })
        .build()
        .unwrap();
    for id in &ids {
        let outcome = client
            .report_task_result(id, TaskResult::completed("done"))
            .await;
        assert_eq!(outcome, ReportOutcome::Queued);
    }
    let queued_at = server.attempts().last().unwrap().request.at - started;
    tokio::time::sleep(outage - queued_at).await;

    // A probe sends the oldest report: t0, after its own first attempt.
    let probes: Vec<Duration> = server
        .attempts()
        .iter()
        .filter(|attempt| attempt.task_id == "t0")
        .skip(1)
        .map(|attempt| attempt.request.at - started)
        .collect();
    let others = server.attempts().len() - probes.len();
    assert_eq!(
        others,
        ids.len(),
        "no other report is sent during the outage"
    );
    // Probes, not one request per report: a handful in ten minutes.
    assert!(probes.len() >= 20 && probes.len() < 100, "{probes:?}");
    let gaps: Vec<Duration> = probes.windows(2).map(|pair| pair[1] - pair[0]).collect();
    // Each probe takes 200 ms at the server: none starts before the last ended.
    let shortest = gaps.iter().min().unwrap();
    assert!(*shortest >= Duration::from_millis(200), "{probes:?}");
    let longest = *gaps.iter().max().unwrap();
    // Capped at the interval (plus the probe's own 200 ms).
    assert!(longest <= Duration::from_millis(20_200), "{longest:?}");
    assert!(
        longest >= Duration::from_secs(5),
        "it backs off: {longest:?}"
    );

    // Back: one successful call of any route, and everything goes out, at
    // most four at once.
    client.start_task("heartbeat").await.unwrap();
    let delivered = || {
        ids.iter()
            .all(|id| server.state(id) == Some(TaskState::Completed))
    };
    assert!(wait_for(Duration::from_secs(10), delivered).await);
    // The replay's reports; the heartbeat may still be in flight beside them.
    let attempts = server.attempts();
    let reports = attempts
        .iter()
        .filter(|attempt| attempt.action == Action::Complete);
    assert_eq!(support::max_in_flight(reports, latency), 4);
    assert!(drained(&client).await);
}

#[tokio::test(start_paused = true)]
async fn a_report_is_never_in_flight_twice_and_the_first_report_stands() {
    let scratch = Scratch::new("once");
    let server = TaskServer::start().await.unwrap();
    let ids: Vec<String> = (0..40).map(|index| format!("t{index}")).collect();
    server.add_tasks(ids.iter().map(String::as_str));
    let latency = Duration::from_millis(700);
    server.latency(latency);
    server.outage(Duration::ZERO, Duration::from_secs(30), bad_gateway());
    let client = builder(&server, &scratch.file())
        .replay(Replay {
            interval: Duration::from_secs(2),
            ..Replay::default()
        })
        .build()
        .unwrap();
    let mut reports = Vec::new();
    for id in &ids {
        reports.push(client.report_task_result(id, TaskResult::completed("first")));
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A second report for the same task while the first is stored.
        let second = client.report_task_result(id, TaskResult::failed("second"));
        assert_eq!(second.await, ReportOutcome::AlreadyStored);
    }
    for report in reports {
        let outcome = report.await;
        assert!(
            matches!(outcome, ReportOutcome::Completed | ReportOutcome::Queued),
            "{outcome:?}"
        );
    }
    let delivered = || {
        ids.iter()
            .all(|id| server.state(id) == Some(TaskState::Completed))
    };
    assert!(wait_for(Duration::from_secs(120), delivered).await);
    let attempts = server.attempts();
    for id in &ids {
        let of_task = attempts.iter().filter(|attempt| &attempt.task_id == id);
        assert_eq!(support::max_in_flight(of_task, latency), 1, "{id}");
        assert_eq!(support::calls(&server, id, Action::Fail), 0);
        assert_eq!(
            support::final_report(&server, id).unwrap()["output"],
            "first"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_reports_go_oldest_first_beside_new_ones() {
    let scratch = Scratch::new("order");
    let server = TaskServer::start().await.unwrap();
    let ids: Vec<String> = (0..20).map(|index| format!("t{index:02}")).collect();
    server.add_tasks(ids.iter().map(String::as_str));
    server.add_tasks(["new"]);
    server.outage(Duration::ZERO, Duration::from_secs(10), bad_gateway());
    let first = builder(&server, &scratch.file())
        .policy(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([]).unwrap())
                .with_recovery(Recovery::default()),
        )
        .build()
        .unwrap();
    for id in &ids {
        let outcome = first
            .report_task_result(id, TaskResult::completed("done"))
            .await;
        assert_eq!(outcome, ReportOutcome::Queued);
    }
    drop(first);
    tokio::time::sleep(Duration::from_secs(10)).await;

    server.latency(Duration::from_secs(1));
    let second = builder(&server, &scratch.file())
        .replay(Replay {
            concurrency: 1,
            ..Replay::default()
        })
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // A new report goes out at once, beside a replay that takes 20 s.
    let started = tokio::time::Instant::now();
    let outcome = second
        .report_task_result("new", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::Completed);
    assert!(
        started.elapsed() <= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let delivered = || {
        ids.iter()
            .all(|id| server.state(id) == Some(TaskState::Completed))
    };
    assert!(wait_for(Duration::from_secs(60), delivered).await);
    let replayed: Vec<String> = server
        .attempts()
        .iter()
        .filter(|attempt| attempt.handling == Handling::Applied && attempt.task_id != "new")
        .map(|attempt| attempt.task_id.clone())
        .collect();
    assert_eq!(replayed, ids, "oldest first");
}

#[tokio::test(start_paused = true)]
async fn the_idempotency_key_is_the_same_on_every_attempt_replay_and_restart() {
    let scratch = Scratch::new("idempotency");
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1"]);
    server.outage(Duration::ZERO, Duration::from_secs(60), Fault::ReplyLost);
    let client = builder(&server, &scratch.file()).build().unwrap();
    let outcome = client
        .report_task_result("t1", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::Queued);
    drop(client);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let client = builder(&server, &scratch.file()).build().unwrap();
    assert!(drained(&client).await);

    let keys: Vec<String> = support::requests(&server)
        .iter()
        .map(|request| {
            request.headers["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(keys.len() >= 4, "three attempts, then the replay: {keys:?}");
    assert!(keys.iter().all(|key| key == &keys[0]), "{keys:?}");
    assert_eq!(keys[0].len(), 36);
    // The token went with every attempt, the replay's too.
    for request in support::requests(&server) {
        assert_eq!(request.headers["authorization"], "Bearer s3cret-token");
    }
}

#[tokio::test(start_paused = true)]
async fn the_token_is_never_written_to_the_outbox() {
    let scratch = Scratch::new("secret");
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1"]);
    server.outage(Duration::ZERO, Duration::from_secs(600), bad_gateway());
    let client = builder(&server, &scratch.file()).build().unwrap();
    let outcome = client
        .report_task_result("t1", TaskResult::completed("a result worth keeping"))
        .await;
    assert_eq!(outcome, ReportOutcome::Queued);
    drop(client);
    let bytes = std::fs::read(scratch.file()).unwrap();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|window| window == needle);
    assert!(contains(b"a result worth keeping"), "the report is there");
    assert!(!contains(b"s3cret-token"));
    assert!(!contains(b"authorization"));
}

#[tokio::test]
async fn a_file_held_by_another_live_client_is_an_error_naming_it() {
    let scratch = Scratch::new("locked");
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1"]);
    let first = builder(&server, &scratch.file()).build().unwrap();
    let error = builder(&server, &scratch.file()).build().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Outbox, "{error}");
    let message = error.to_string();
    assert!(
        message.contains(scratch.file().to_str().unwrap()),
        "{message}"
    );
    assert!(message.contains("held by another"), "{message}");
    // The first client is unharmed.
    let outcome = first
        .report_task_result("t1", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::Completed);
    // Once it is gone (and the removal of its delivered report committed),
    // the file can be opened again.
    drop(first);
    let mut reopened = None;
    for _ in 0..100 {
        match builder(&server, &scratch.file()).build() {
            Ok(client) => {
                reopened = Some(client);
                break;
            }
            Err(error) => assert_eq!(error.kind(), ErrorKind::Outbox, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reopened.is_some(), "the file stays locked");
}

#[tokio::test]
async fn a_file_that_is_not_an_outbox_is_an_error_and_left_as_it_was() {
    let scratch = Scratch::new("invalid");
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1"]);
    // A real outbox with a report in it, to truncate.
    server.outage(Duration::ZERO, Duration::from_secs(3600), bad_gateway());
    let client = builder(&server, &scratch.file())
        .policy(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([]).unwrap())
                .with_recovery(Recovery::default()),
        )
        .build()
        .unwrap();
    let outcome = client
        .report_task_result("t1", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::Queued);
    drop(client);
    let outbox = std::fs::read(scratch.file()).unwrap();

    let other = scratch.0.join("other.redb");
    {
        let database = redb::Database::create(&other).unwrap();
        let write = database.begin_write().unwrap();
        let table = redb::TableDefinition::<&str, u64>::new("accounts");
        write.open_table(table).unwrap().insert("alice", 1).unwrap();
        write.commit().unwrap();
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"this is not a database at all, just text".repeat(100),
        ),
        ("truncated", outbox[..outbox.len() / 2].to_vec()),
        ("truncated-short", outbox[..600].to_vec()),
        ("another-database", std::fs::read(&other).unwrap()),
    ];
    for (name, bytes) in cases {
        let path = scratch.0.join(format!("{name}.redb"));
        std::fs::write(&path, &bytes).unwrap();
        let error = builder(&server, &path).build().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Outbox, "{name}: {error}");
        let message = error.to_string();
        assert!(
            message.contains(path.to_str().unwrap()),
            "{name}: {message}"
        );
        assert!(message.contains("not a valid outbox"), "{name}: {message}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} was changed");
    }
}

#[tokio::test]
async fn delivered_reports_leave_the_file_and_it_stops_growing() {
    let scratch = Scratch::new("size");
    let server = TaskServer::start().await.unwrap();
    let client = builder(&server, &scratch.file()).build().unwrap();
    let mut sizes = Vec::new();
    for round in 0..10 {
        let ids: Vec<String> = (0..500).map(|index| format!("r{round}-{index}")).collect();
        server.add_tasks(ids.iter().map(String::as_str));
        let reports: Vec<_> = ids
            .iter()
            .map(|id| client.report_task_result(id, TaskResult::completed("x".repeat(200))))
            .collect();
        for report in reports {
            assert_eq!(report.await, ReportOutcome::Completed);
        }
        // Removed just after delivery, without the caller waiting for it.
        assert!(wait_for_real(|| client.outbox().unwrap().pending().unwrap().is_empty()).await);
        sizes.push(std::fs::metadata(scratch.file()).unwrap().len());
    }
    // 5,000 reports delivered: the file reuses its pages.
    let (early, last) = (sizes[2], sizes[9]);
    assert!(last <= early * 2, "{sizes:?}");
}
