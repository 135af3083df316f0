//! A few hundred agents finish their tasks while the server goes through an
//! outage, and the daemon crashes in the middle of it: their results are
//! reported through it with the terminal retry schedule, scaled down 40 times
//! so the run takes seconds, each stored in an outbox before its first
//! attempt.
//!
//! ```text
//! cargo run --example outage               # retried, durable reports
//! cargo run --example outage -- --fire-once # the old way: one attempt, then fail
//! ```
//!
//! Part-way through the outage the daemon is stopped without shutdown (its
//! runtime is dropped, every report in flight with it); a new daemon starts on
//! the same outbox, delivers what was pending, and reports for the agents that
//! finish after the crash. It prints a timeline of the attempts on `complete`
//! and `fail`, the story of a few tasks, and one summary line, as the server
//! sees it.

use std::{collections::BTreeMap, fmt::Write as _, ops::Range, process::ExitCode, time::Duration};

use http::StatusCode;
use tokio::time::Instant;
use tower_terminal_retry::{
    client::{Failure, ReportOutcome, TaskClient, TaskResult},
    outbox::Replay,
    test_server::{Action, Attempt, Fault, Handling, TaskServer, TaskState},
    Recovery, Schedule, TerminalRetryPolicy,
};

const TASKS: usize = 300;
/// Agents finish one after another, 8 ms apart, over 2.4 s: before, during
/// and after the outage.
const FINISH_EVERY: Duration = Duration::from_millis(8);
/// The default schedule (4 to 64 s) divided by this.
const SCALE: u32 = 40;
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);
const BUCKET: Duration = Duration::from_millis(250);
/// When the first daemon crashes, after the start: amid the outage.
const CRASH_AT: Duration = Duration::from_millis(1_500);
/// When the second daemon is up.
const RESTART_AT: Duration = Duration::from_millis(1_700);

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

    // The origin of the outage windows: the server's start.
    let start = Instant::now();
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
        "{TASKS} tasks report through an outage; {} with schedule {:?} and {:?} per attempt; \
         the daemon crashes at {CRASH_AT:?} and is back at {RESTART_AT:?}\n",
        if fire_once {
            "fire-once (one attempt, fall back to fail on any error)"
        } else {
            "retried and stored in an outbox"
        },
        schedule.delays(),
        ATTEMPT_TIMEOUT
    );
    let directory = std::env::temp_dir().join(format!("outage-example-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    let outbox = directory.join("reports.redb");
    let daemon = Daemon {
        url: server.url(),
        schedule,
        outbox: (!fire_once).then_some(outbox),
        fire_once,
    };
    start_tasks(&daemon.client()?, &ids).await?;

    // Agents finishing before the crash report to the first daemon, which
    // runs on a runtime of its own; dropping that runtime is the crash.
    let before_crash = (CRASH_AT.as_millis() / FINISH_EVERY.as_millis()) as usize;
    let first = {
        let (daemon, ids) = (daemon.clone(), ids.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| error.to_string())?;
            runtime.block_on(async {
                let client = daemon.client().map_err(|error| error.to_string())?;
                let _agents = daemon.run_agents(&client, &ids, 0..before_crash, start);
                tokio::time::sleep_until(start + CRASH_AT).await;
                Ok(())
            })
            // The runtime drops here with every report in flight: no shutdown.
        })
    };
    first.join().map_err(|_| "the first daemon panicked")??;

    tokio::time::sleep_until(start + RESTART_AT).await;
    let client = daemon.client()?;
    let carried_over = client_pending(&client)?;
    println!("crash at {CRASH_AT:?}: the new daemon finds {carried_over} reports pending\n");
    let mut agents = daemon.run_agents(&client, &ids, before_crash..TASKS, start);
    let mut queued = carried_over;
    while let Some(outcome) = agents.join_next().await {
        if outcome? == Some(ReportOutcome::Queued) {
            queued += 1;
        }
    }
    // The replay delivers what is stored, however long that takes here.
    for _ in 0..100 {
        if client_pending(&client)? == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still_stored = client_pending(&client)?;
    let undelivered = client.shutdown(Duration::from_secs(10)).await;
    drop(client);
    let _ = std::fs::remove_dir_all(&directory);

    let attempts: Vec<Attempt> = server
        .attempts()
        .into_iter()
        .filter(|attempt| matches!(attempt.action, Action::Complete | Action::Fail))
        .collect();
    print!("{TIMELINE_LEGEND}{}", timeline(&attempts, start));
    print!("{}", stories(&attempts, start));

    let mut counts = BTreeMap::<&str, usize>::new();
    let mut wrongly_failed = 0;
    let mut lost = 0;
    for (n, id) in ids.iter().enumerate() {
        let state = server.state(id);
        let name = match state {
            Some(TaskState::Completed) => "completed",
            Some(TaskState::Failed) => "failed",
            _ => "left_running",
        };
        *counts.entry(name).or_default() += 1;
        let completed = matches!(agent_result(n, id), TaskResult::Completed(_));
        if completed && state == Some(TaskState::Failed) {
            wrongly_failed += 1;
        }
        if !matches!(state, Some(TaskState::Completed | TaskState::Failed)) {
            lost += 1;
        }
    }
    // A report still in the outbox is kept, not lost.
    let lost = lost - still_stored.min(lost);
    if !undelivered.is_empty() {
        println!(
            "{} reports still undelivered at shutdown",
            undelivered.len()
        );
    }
    print!("{SUMMARY_LEGEND}");
    println!(
        "summary: tasks={TASKS} completed={} failed={} left_running={} wrongly_failed={wrongly_failed} \
         queued={queued} lost={lost} attempts={}",
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
    if let TaskResult::Failed(_) = result {
        // A failed result only needs the one `fail`: the same in both modes.
        let _ = client.report_task_result(id, result).await;
        return;
    }
    // With no retries. A permanent rejection falls back to `fail` by the
    // client's own rule; a transient failure, left running by that rule,
    // falls back here, as it did in the original.
    let outcome = client
        .report_task_result(id, TaskResult::completed(output(id)))
        .await;
    if outcome == ReportOutcome::LeftRunning {
        let fail = TaskResult::Failed(Failure {
            error: "complete task failed".into(),
            failure_reason: "agent_error".into(),
            ..Failure::default()
        });
        // Whatever happens now is what the server keeps.
        let _ = client.report_task_result(id, fail).await;
    }
}

/// What the timeline's columns count: each name once, with one meaning.
const TIMELINE_LEGEND: &str = "\
attempts on `complete` and `fail`, by what became of them:
  time (s)  when they arrived, in windows of 0.25 s after the start
  ok        taken: the task became completed or failed
  already   answered 200 \"already terminal\": the task was final before, nothing changed
  5xx       a 502 from the proxy in front: the server never saw it
  429       rate limited with Retry-After: the server never saw it
  reset     the connection closed before any response: the server never saw it
  unacked   taken, then the connection closed before the reply: the client saw a reset
  hang      no answer until the attempt timed out: the server never saw it
  4xx       refused by the server: a bad body or an unknown task
  server    the outage phases in the window (`up` when none)

";

/// What the summary's fields count: each name once, with one meaning.
const SUMMARY_LEGEND: &str = "\
the summary, as the server sees it at the end:
  tasks           tasks the agents finished
  completed       tasks the server holds as completed
  failed          tasks the server holds as failed
  left_running    tasks the server does not hold as final: still running
  wrongly_failed  tasks whose agent succeeded, held as failed
  queued          reports left stored in the outbox for its replay: those found after the crash,
                  and those of later agents not delivered when their report returned
  lost            tasks left running, less the reports still stored: reports no one will deliver
  attempts        requests on `complete` and `fail` the server saw, faults included
";

/// Attempts per time bucket, by what the client got back.
fn timeline(attempts: &[Attempt], start: Instant) -> String {
    const COLUMNS: [&str; 8] = [
        "ok", "already", "5xx", "429", "reset", "unacked", "hang", "4xx",
    ];
    let mut buckets = BTreeMap::<u128, [usize; 8]>::new();
    for attempt in attempts {
        let bucket = (attempt.request.at - start).as_millis() / BUCKET.as_millis();
        buckets.entry(bucket).or_default()[column(attempt)] += 1;
    }
    let mut out = format!("{:>11}", "time (s)");
    for name in COLUMNS {
        let _ = write!(out, "{name:>8}");
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
                "{:>8}",
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
                let got = match (attempt.fault, attempt.status) {
                    (Some(Fault::ReplyLost), _) => "committed, reply lost".to_owned(),
                    (Some(Fault::Reset), _) => "reset".to_owned(),
                    (Some(Fault::Hang), _) => "hung".to_owned(),
                    (_, Some(status)) if attempt.handling == Handling::AlreadyTerminal => {
                        format!("{} already terminal", status.as_u16())
                    }
                    (_, Some(status)) => status.as_u16().to_string(),
                    (_, None) => "no answer".to_owned(),
                };
                let at = (attempt.request.at - start).as_secs_f64();
                let route = attempt.request.uri.path().rsplit('/').next().unwrap_or("");
                format!("{at:.2}s {route} {got}")
            })
            .collect();
        let _ = writeln!(out, "  {id}: {}", steps.join(" -> "));
    }
    out.push('\n');
    out
}

/// How a daemon is set up: the same before and after the crash.
#[derive(Clone)]
struct Daemon {
    url: String,
    schedule: Schedule,
    /// The outbox file; none for the fire-once daemon.
    outbox: Option<std::path::PathBuf>,
    fire_once: bool,
}

impl Daemon {
    fn client(&self) -> Result<TaskClient, tower_terminal_retry::client::Error> {
        let builder = TaskClient::builder(&self.url)
            .client_version(env!("CARGO_PKG_VERSION"))
            .policy(
                TerminalRetryPolicy::default()
                    .with_schedule(self.schedule.clone())
                    .with_recovery(Recovery::default()),
            )
            .timeout(ATTEMPT_TIMEOUT);
        match &self.outbox {
            Some(path) => builder
                .outbox(path)
                .replay(Replay {
                    interval: Duration::from_secs(30) / SCALE,
                    ..Replay::default()
                })
                .build(),
            None => builder.build(),
        }
    }

    /// Agents `range` of `ids`, each reporting when it finishes; each ends
    /// with its report's outcome (none for a fire-once report).
    fn run_agents(
        &self,
        client: &TaskClient,
        ids: &[String],
        range: Range<usize>,
        start: Instant,
    ) -> tokio::task::JoinSet<Option<ReportOutcome>> {
        let mut agents = tokio::task::JoinSet::new();
        for n in range {
            let (client, id, fire_once) = (client.clone(), ids[n].clone(), self.fire_once);
            let finished_at = start + FINISH_EVERY * n as u32;
            agents.spawn(async move {
                tokio::time::sleep_until(finished_at).await;
                let result = agent_result(n, &id);
                if fire_once {
                    report_fire_once(&client, &id, result).await;
                    None
                } else {
                    Some(client.report_task_result(&id, result).await)
                }
            });
        }
        agents
    }
}

/// Reports stored and not yet delivered.
fn client_pending(client: &TaskClient) -> Result<usize, tower_terminal_retry::outbox::OutboxError> {
    Ok(client
        .outbox()
        .map_or(Ok(Vec::new()), |outbox| outbox.pending())?
        .len())
}

/// Every agent starts: `start` for each task.
async fn start_tasks(
    client: &TaskClient,
    ids: &[String],
) -> Result<(), tower_terminal_retry::client::Error> {
    for id in ids {
        client.start_task(id).await?;
    }
    Ok(())
}
