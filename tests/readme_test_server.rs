//! Your daemon's code, tested against the crate's loopback task server: a
//! completion rides out two 502s and is reported once, as a completion.

use std::time::Duration;

use http::StatusCode;
use tower_terminal_retry::client::{Completion, ReportOutcome, TaskClient, TaskResult};
use tower_terminal_retry::test_server::{Action, Fault, TaskServer, TaskState};
use tower_terminal_retry::{Schedule, TerminalRetryPolicy};

/// The code under test: how your daemon reports a finished task.
async fn finish(client: &TaskClient, task_id: &str) -> ReportOutcome {
    let result = TaskResult::Completed(Completion {
        output: "all tests pass".into(),
        branch_name: "fix/retry".into(),
        ..Completion::default()
    });
    client.report_task_result(task_id, result).await
}

#[tokio::test(start_paused = true)]
async fn a_completion_rides_out_two_bad_gateways() {
    let server = TaskServer::start().await.expect("a loopback port");
    server.add_tasks(["t1"]);
    let bad_gateway = Fault::Status(StatusCode::BAD_GATEWAY);
    server.script("t1", Action::Complete, [bad_gateway, bad_gateway]);
    let client = TaskClient::builder(server.url())
        .policy(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([Duration::from_secs(1); 3]).expect("a schedule")),
        )
        .build()
        .expect("a client");

    assert_eq!(finish(&client, "t1").await, ReportOutcome::Completed);
    assert_eq!(server.state("t1"), Some(TaskState::Completed));
    // Three attempts of `complete`, and no fallback to `fail`.
    let routes: Vec<Action> = server
        .attempts()
        .iter()
        .map(|attempt| attempt.action)
        .collect();
    assert_eq!(routes, [Action::Complete; 3]);
}
