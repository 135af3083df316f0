//! 500 tasks report their results through every fault the task server can
//! script, on the default schedule (paused clock): no completed task ends up
//! failed, and every lost reply is replayed harmlessly.

mod client_support;

use std::time::Duration;

use http::StatusCode;
use tower_terminal_retry::{
    client::{ReportOutcome, TaskResult},
    test_server::{Action, Fault, Handling, TaskState},
};

use client_support::{client, server_with};

const TASKS: usize = 500;

fn status(code: StatusCode) -> Fault {
    Fault::Status(code)
}

/// The scripts the tasks take in turn, for the terminal route they call.
fn scripts() -> Vec<Vec<Fault>> {
    let bad_gateway = status(StatusCode::BAD_GATEWAY);
    let unavailable = status(StatusCode::SERVICE_UNAVAILABLE);
    let gateway_timeout = status(StatusCode::GATEWAY_TIMEOUT);
    let rate_limited = Fault::RateLimited {
        retry_after_secs: 7,
    };
    vec![
        vec![],
        vec![bad_gateway],
        vec![unavailable, gateway_timeout],
        vec![bad_gateway, unavailable, gateway_timeout],
        vec![rate_limited],
        vec![Fault::Reset],
        vec![Fault::ReplyLost],
        vec![Fault::Hang],
        vec![Fault::Reset, Fault::ReplyLost, bad_gateway],
        vec![Fault::Hang, rate_limited, Fault::ReplyLost],
        // Longer than the schedule: six attempts, all transient.
        vec![bad_gateway; 6],
    ]
}

#[tokio::test(start_paused = true)]
async fn five_hundred_tasks_through_every_fault() {
    let ids: Vec<String> = (0..TASKS).map(|n| format!("task-{n:03}")).collect();
    let server = server_with(&ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let scripts = scripts();
    let plan: Vec<(&str, bool, &Vec<Fault>)> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            // Every seventh task reports a failure; the rest completed.
            let completed = n % 7 != 0;
            (id.as_str(), completed, &scripts[n % scripts.len()])
        })
        .collect();
    for &(id, completed, script) in &plan {
        let action = if completed {
            Action::Complete
        } else {
            Action::Fail
        };
        server.script(id, action, script.iter().copied());
    }
    // The default schedule, 4 to 64 s; a hung attempt times out after 5 s.
    let client = client(&server, &[4, 8, 16, 32, 64]);

    let reports: Vec<_> = plan
        .iter()
        .map(|&(id, completed, _)| {
            let result = if completed {
                TaskResult::completed(format!("output of {id}"))
            } else {
                TaskResult::failed(format!("error of {id}"))
            };
            client.report_task_result(id, result)
        })
        .collect();
    let mut outcomes = Vec::with_capacity(TASKS);
    for report in reports {
        outcomes.push(report.await);
    }
    assert!(client.shutdown(Duration::ZERO).await.is_empty());

    let attempts = server.attempts();
    let mut wrongly_failed = 0;
    for (&(id, completed, script), outcome) in plan.iter().zip(&outcomes) {
        let exhausted = script.len() > 5;
        let state = server.state(id).unwrap();
        let (expected_outcome, expected_state) = match (completed, exhausted) {
            (true, false) => (ReportOutcome::Completed, TaskState::Completed),
            (true, true) => (ReportOutcome::LeftRunning, TaskState::Queued),
            (false, false) => (ReportOutcome::Failed, TaskState::Failed),
            (false, true) => (ReportOutcome::NotDelivered, TaskState::Queued),
        };
        assert_eq!(
            (*outcome, state),
            (expected_outcome, expected_state),
            "{id}"
        );
        if completed && state == TaskState::Failed {
            wrongly_failed += 1;
        }

        let mine: Vec<_> = attempts.iter().filter(|a| a.task_id == id).collect();
        // No fallback ever: the completed never call `fail`, nor the reverse.
        let action = if completed {
            Action::Complete
        } else {
            Action::Fail
        };
        assert!(mine.iter().all(|a| a.action == action), "{id}");
        assert_eq!(mine.len(), (script.len() + 1).min(6), "{id}");
        // The state changed once at most; everything after was a harmless replay.
        let applied = mine
            .iter()
            .filter(|a| a.handling == Handling::Applied)
            .count();
        assert!(applied <= 1, "{id}: applied {applied} times");
        for (n, attempt) in mine.iter().enumerate() {
            if attempt.fault == Some(Fault::ReplyLost) {
                // Committed, and the next attempt the server saw was a no-op.
                assert_eq!(attempt.handling, Handling::Applied, "{id}");
                let replay = mine[n + 1..]
                    .iter()
                    .find(|later| later.handling != Handling::NotReached)
                    .expect("a replay after the lost reply");
                assert_eq!(replay.handling, Handling::AlreadyTerminal, "{id}");
            }
        }
        for pair in mine.windows(2) {
            if let Some(Fault::RateLimited { retry_after_secs }) = pair[0].fault {
                let waited = pair[1].request.at - pair[0].request.at;
                assert_eq!(waited, Duration::from_secs(retry_after_secs.into()), "{id}");
            }
        }
    }
    assert_eq!(wrongly_failed, 0);

    let lost_replies = attempts
        .iter()
        .filter(|a| a.fault == Some(Fault::ReplyLost))
        .count();
    let replays = attempts
        .iter()
        .filter(|a| a.handling == Handling::AlreadyTerminal)
        .count();
    assert!(lost_replies > 100, "{lost_replies}");
    assert_eq!(replays, lost_replies);
}
