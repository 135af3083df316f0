//! A few hundred agents finish their tasks while the server goes through an
//! outage: their results are reported through it with the terminal retry
//! schedule, scaled down 40 times so the run takes seconds.
//!
//! ```text
//! cargo run --example outage               # the retried reports
//! cargo run --example outage -- --fire-once # the old way: one attempt, then fail
//! ```
//!
//! It prints a timeline of the attempts on `complete` and `fail`, the story of
//! a few tasks, and one summary line, as the server sees it.

use std::{collections::BTreeMap, fmt::Write as _, process::ExitCode, time::Duration};

use http::StatusCode;
use tokio::time::Instant;
use tower_terminal_retry::{
    client::{CompleteTask, FailTask, TaskClient, TaskResult},
    test_server::{Action, Attempt, Fault, Handling, TaskServer, TaskState},
    Schedule,
};

const TASKS: usize = 300;
/// Agents finish one after another, 8 ms apart, over 2.4 s: before, during
/// and after the outage.
const FINISH_EVERY: Duration = Duration::from_millis(8);
/// The default schedule (4 to 64 s) divided by this.
const SCALE: u32 = 40;
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);
const BUCKET: Duration = Duration::from_millis(250);

/// The outage, in phases: (from, until) in ms after the start, and the fault.
const OUTAGE: [(u64, u64, Fault, &str); 5] = [
    (
        300,
        1100,
        Fault::Status(StatusCode::BAD_GATEWAY),
        "502 burst",
    ),
    (
        1100,
        1400,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
        "429, Retry-After: 1",
    ),
    (1400, 1600, Fault::Reset, "connections reset"),
    (1600, 1800, Fault::ReplyLost, "replies lost after commit"),
    (1800, 2100, Fault::Hang, "requests hang"),
];

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let fire_once = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--fire-once") => true,
        Some(other) => {
            eprintln!("unknown argument {other:?}; usage: outage [--fire-once]");
            return Ok(ExitCode::from(2));
        }
    };

    let server = TaskServer::start().await?;
    let ids: Vec<String> = (0..TASKS).map(|n| format!("task-{n:03}")).collect();
    server.add_tasks(ids.iter().map(String::as_str));
    for (from, until, fault, _) in OUTAGE {
        server.outage(
            Duration::from_millis(from),
            Duration::from_millis(until),
            fault,
        );
    }

    let schedule = if fire_once {
        Schedule::new([])?
    } else {
        Schedule::new(
            Schedule::default()
                .delays()
                .iter()
                .map(|delay| *delay / SCALE),
        )?
    };
    println!(
        "{TASKS} tasks report through an outage; {} with schedule {:?} and {:?} per attempt\n",
        if fire_once {
            "fire-once (one attempt, fall back to fail on any error)"
        } else {
            "retried"
        },
        schedule.delays(),
        ATTEMPT_TIMEOUT
    );
    let client = TaskClient::builder(server.url())
        .client_version(env!("CARGO_PKG_VERSION"))
        .terminal_schedule(schedule)
        .timeout(ATTEMPT_TIMEOUT)
        .build()?;
    for id in &ids {
        client.start_task(id).await?;
    }

    let start = server.started();
    let mut agents = tokio::task::JoinSet::new();
    for (n, id) in ids.iter().enumerate() {
        let (client, id) = (client.clone(), id.clone());
        let finished_at = start + FINISH_EVERY * n as u32;
        agents.spawn(async move {
            tokio::time::sleep_until(finished_at).await;
            let result = agent_result(n, &id);
            if fire_once {
                report_fire_once(&client, &id, result).await;
            } else {
                client.report_task_result(&id, result).await;
            }
        });
    }
    while agents.join_next().await.is_some() {}
    let undelivered = client.shutdown(Duration::from_secs(10)).await;

    let attempts: Vec<Attempt> = server
        .attempts()
        .into_iter()
        .filter(|attempt| matches!(attempt.action, Action::Complete | Action::Fail))
        .collect();
    print!("{}", timeline(&attempts, start));
    print!("{}", stories(&attempts, start));

    let mut counts = BTreeMap::<&str, usize>::new();
    let mut wrongly_failed = 0;
    for (n, id) in ids.iter().enumerate() {
        let state = server.state(id);
        let name = match state {
            Some(TaskState::Completed) => "completed",
            Some(TaskState::Failed) => "failed",
            _ => "left_running",
        };
        *counts.entry(name).or_default() += 1;
        if agent_result(n, id).is_completed() && state == Some(TaskState::Failed) {
            wrongly_failed += 1;
        }
    }
    if !undelivered.is_empty() {
        println!(
            "{} reports still undelivered at shutdown",
            undelivered.len()
        );
    }
    println!(
        "summary: tasks={TASKS} completed={} failed={} left_running={} wrongly_failed={wrongly_failed} attempts={}",
        counts.get("completed").unwrap_or(&0),
        counts.get("failed").unwrap_or(&0),
        counts.get("left_running").unwrap_or(&0),
        attempts.len(),
    );
    Ok(ExitCode::SUCCESS)
}

/// What agent `n` came up with: one in ten failed.
fn agent_result(n: usize, id: &str) -> TaskResult {
    if n % 10 == 9 {
        TaskResult::failed(format!("{id}: agent exited with status 1"))
    } else {
        TaskResult::completed(output(id))
    }
}

fn output(id: &str) -> String {
    format!("{id}: done")
}

/// The behaviour before the terminal retries: one attempt at `complete`, and
/// on any error, one at `fail`.
async fn report_fire_once(client: &TaskClient, id: &str, result: TaskResult) {
    if !result.is_completed() {
        // A failed result only needs the one `fail`: the same in both modes.
        let _ = client.report_task_result(id, result).await;
        return;
    }
    if let Err(error) = client
        .complete_task(id, &CompleteTask::new(output(id)))
        .await
    {
        let fail =
            FailTask::new(format!("complete task failed: {error}")).failure_reason("agent_error");
        // Whatever happens now is what the server keeps.
        let _ = client.fail_task(id, &fail).await;
    }
}

/// Attempts per time bucket, by what the client got back.
fn timeline(attempts: &[Attempt], start: Instant) -> String {
    const COLUMNS: [&str; 8] = ["ok", "replay", "5xx", "429", "reset", "lost", "hang", "4xx"];
    let mut buckets = BTreeMap::<u128, [usize; 8]>::new();
    for attempt in attempts {
        let bucket = (attempt.at - start).as_millis() / BUCKET.as_millis();
        buckets.entry(bucket).or_default()[column(attempt)] += 1;
    }
    let mut out = format!("{:>11}", "time (s)");
    for name in COLUMNS {
        let _ = write!(out, "{name:>7}");
    }
    out.push_str("   server\n");
    for (bucket, counts) in buckets {
        let from = Duration::from_millis((bucket * BUCKET.as_millis()) as u64);
        let _ = write!(
            out,
            "{:>5.2}-{:<5.2}",
            from.as_secs_f64(),
            (from + BUCKET).as_secs_f64()
        );
        for count in counts {
            let _ = write!(
                out,
                "{:>7}",
                if count == 0 {
                    String::new()
                } else {
                    count.to_string()
                }
            );
        }
        let _ = writeln!(out, "   {}", phases(from, from + BUCKET));
    }
    out.push('\n');
    out
}

fn column(attempt: &Attempt) -> usize {
    match (attempt.fault, attempt.handling) {
        (Some(Fault::Status(_)), _) => 2,
        (Some(Fault::RateLimited { .. }), _) => 3,
        (Some(Fault::Reset), _) => 4,
        (Some(Fault::ReplyLost), _) => 5,
        (Some(Fault::Hang), _) => 6,
        (None, Handling::Applied) => 0,
        (None, Handling::AlreadyTerminal) => 1,
        (None, Handling::Rejected(_) | Handling::NotReached) => 7,
    }
}

/// The outage phases overlapping `from..until`.
fn phases(from: Duration, until: Duration) -> String {
    let names: Vec<&str> = OUTAGE
        .iter()
        .filter(|(start, end, _, _)| {
            Duration::from_millis(*start) < until && from < Duration::from_millis(*end)
        })
        .map(|(_, _, _, name)| *name)
        .collect();
    if names.is_empty() {
        "up".to_owned()
    } else {
        names.join(", ")
    }
}

/// The attempts of the tasks that took the most, one line each.
fn stories(attempts: &[Attempt], start: Instant) -> String {
    let mut by_task = BTreeMap::<&str, Vec<&Attempt>>::new();
    for attempt in attempts {
        by_task.entry(&attempt.task_id).or_default().push(attempt);
    }
    let mut longest: Vec<_> = by_task.into_iter().collect();
    longest.sort_by_key(|(id, attempts)| (std::cmp::Reverse(attempts.len()), *id));
    let mut out = String::from("the longest stories:\n");
    for (id, attempts) in longest.into_iter().take(3) {
        let steps: Vec<String> = attempts
            .iter()
            .map(|attempt| {
                let got = match (attempt.fault, attempt.status()) {
                    (Some(Fault::ReplyLost), _) => "committed, reply lost".to_owned(),
                    (Some(Fault::Reset), _) => "reset".to_owned(),
                    (Some(Fault::Hang), _) => "hung".to_owned(),
                    (_, Some(status)) if attempt.handling == Handling::AlreadyTerminal => {
                        format!("{} already terminal", status.as_u16())
                    }
                    (_, Some(status)) => status.as_u16().to_string(),
                    (_, None) => "no answer".to_owned(),
                };
                let at = (attempt.at - start).as_secs_f64();
                format!("{at:.2}s {} {got}", attempt.action.as_str())
            })
            .collect();
        let _ = writeln!(out, "  {id}: {}", steps.join(" -> "));
    }
    out.push('\n');
    out
}
