//! Crashes for real: a child process (this test binary, run again in a child
//! role) reports tasks through an outbox and is killed with SIGKILL at a
//! random instant, again and again, on the same file; a loopback task server
//! in the parent checks that nothing stored is lost and no completion turns
//! into a failure. A second child runs under a file-size limit, so that its
//! store cannot be written, and still delivers.
//!
//! `CRASH_SOAK_KILLS=1000 cargo test --all-features --test outbox_crash -- --nocapture`
//! runs a longer soak.

#![cfg(all(feature = "outbox", unix))]

mod outbox_support;
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use http::StatusCode;
use tower_terminal_retry::{
    client::{ErrorKind, TaskClient, TaskResult},
    outbox::{Durability, Outbox, Replay},
    test_server::{Action, Fault, TaskServer, TaskState},
    Recovery, Schedule, TerminalRetryPolicy,
};

use outbox_support::{as_child, child_command, Random, Scratch};

/// Selects the child's role; the rest of its orders come in these variables.
const ROLE: &str = "OUTBOX_CRASH_ROLE";
const URL: &str = "OUTBOX_CRASH_URL";
const FILE: &str = "OUTBOX_CRASH_FILE";
/// `id:c` (completed) or `id:f` (failed), comma-separated.
const TASKS: &str = "OUTBOX_CRASH_TASKS";
/// What the child says starts with this, amid the test harness's output.
const SAYS: &str = "child:";

/// The entry point of every child: does nothing in a normal test run.
#[test]
fn child() {
    as_child(ROLE, |role| async move {
        let url = std::env::var(URL).unwrap();
        let file = std::env::var(FILE).unwrap();
        if role == "create" {
            // New outbox files, one after the other, until killed.
            for n in 0.. {
                if let Err(error) = Outbox::open(format!("{file}-{n}")) {
                    return println!("{SAYS} open failed: {error}");
                }
            }
        }
        let built = TaskClient::builder(url)
            .policy(
                TerminalRetryPolicy::default()
                    .with_schedule(Schedule::new([Duration::from_millis(30); 3]).unwrap())
                    .with_recovery(Recovery::default()),
            )
            .timeout(Duration::from_secs(2))
            .outbox(&file)
            .replay(Replay {
                interval: Duration::from_millis(200),
                ..Replay::default()
            })
            .build();
        // Said, not panicked: the parent shows what the child says.
        let client = match built {
            Ok(client) => client,
            Err(error) => return println!("{SAYS} build failed: {error}"),
        };
        let tasks = std::env::var(TASKS).unwrap_or_default();
        let mut reports = Vec::new();
        for task in tasks.split(',').filter(|task| !task.is_empty()) {
            let (id, kind) = task.split_once(':').unwrap();
            let result = match (kind, role.as_str()) {
                // Too big for the file as it is: storing it must grow it.
                ("c", "huge") => TaskResult::completed("x".repeat(4 << 20)),
                ("c", _) => TaskResult::completed(format!("output of {id}")),
                _ => TaskResult::failed(format!("error of {id}")),
            };
            let mut report = client.report_task_result(id, result);
            let durability = report.stored().await;
            match durability {
                Some(Durability::Stored) => println!("{SAYS} stored {id}"),
                Some(other) => println!("{SAYS} not-stored {id} {other:?}"),
                None => println!("{SAYS} not-stored {id} without an outbox"),
            }
            reports.push((id.to_owned(), report));
        }
        for (id, report) in reports {
            println!("{SAYS} done {id} {:?}", report.await);
        }
        if role == "drain" {
            // Waits for the replay to empty the outbox, then exits normally.
            for _ in 0..600 {
                match client.outbox().unwrap().pending() {
                    Ok(pending) if pending.is_empty() => {
                        println!("{SAYS} drained");
                        return;
                    }
                    Ok(_) => {}
                    // Reads fail while the store reopens its file after a
                    // failed commit: said, and asked again.
                    Err(error) => println!("{SAYS} cannot list: {error}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!(
                "{SAYS} still pending {:?}",
                client.outbox().unwrap().pending()
            );
        } else if role == "report" {
            // Keeps replaying until killed.
            std::future::pending::<()>().await;
        }
    });
}

/// A child running `role` on `file`; with `file_size_limit`, under that
/// limit in KiB (writes past it fail with EFBIG; SIGXFSZ is ignored).
fn spawn(
    role: &str,
    server: &TaskServer,
    file: &Path,
    tasks: &str,
    file_size_limit: Option<u64>,
) -> Child {
    child_command(file_size_limit)
        .env(ROLE, role)
        .env(URL, server.url())
        .env(FILE, file)
        .env(TASKS, tasks)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// What a child said, one line each, without the prefix.
fn said(child: Child) -> Vec<String> {
    let output = child.wait_with_output().unwrap();
    let reader = BufReader::new(&output.stdout[..]);
    reader
        .lines()
        .map_while(Result::ok)
        // The harness may have started the line ("test child ... ").
        .filter_map(|line| Some(line.split_once(SAYS)?.1.trim().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_instants_nothing_stored_is_lost_and_no_success_turns_red() {
    let kills: u64 = std::env::var("CRASH_SOAK_KILLS")
        .ok()
        .and_then(|kills| kills.parse().ok())
        .unwrap_or(150);
    let scratch = Scratch::new("kills");
    let file = scratch.file();
    let server = TaskServer::start().await.unwrap();
    let mut random = Random::seeded();
    let seed = random.0;
    let faults = [
        Fault::Status(StatusCode::BAD_GATEWAY),
        Fault::Status(StatusCode::SERVICE_UNAVAILABLE),
        Fault::Reset,
        Fault::ReplyLost,
    ];
    let mut kinds = BTreeMap::new();
    let mut stored = BTreeSet::new();
    let started = Instant::now();
    for round in 0..kills {
        let mut tasks = Vec::new();
        for index in 0..4 {
            let id = format!("r{round}-{index}");
            let completed = random.below(3) != 0;
            server.add_tasks([&id]);
            let action = if completed {
                Action::Complete
            } else {
                Action::Fail
            };
            let count = random.below(3) as usize;
            let script = (0..count).map(|_| faults[random.below(4) as usize]);
            server.script(&id, action, script.collect::<Vec<_>>());
            tasks.push(format!("{id}:{}", if completed { 'c' } else { 'f' }));
            kinds.insert(id, completed);
        }
        let mut child = spawn("report", &server, &file, &tasks.join(","), None);
        let kill_after = Duration::from_millis(random.below(120));
        tokio::time::sleep(kill_after).await;
        child.kill().unwrap();
        for line in said(child) {
            if let Some(id) = line.strip_prefix("stored ") {
                stored.insert(id.to_owned());
            }
        }
    }
    let killing = started.elapsed();

    // A last start, not killed, drains what the others left.
    let lines = said(spawn("drain", &server, &file, "", None));
    assert!(
        lines.iter().any(|line| line == "drained"),
        "seed {seed}: {lines:?}"
    );

    let reached: BTreeSet<String> = server
        .attempts()
        .into_iter()
        .map(|attempt| attempt.task_id)
        .collect();
    let mut lost_before_storing = 0;
    for (id, &completed) in &kinds {
        let state = server.state(id).unwrap();
        if !stored.contains(id) && !reached.contains(id) {
            // Killed before the report was stored: nothing to deliver.
            assert_eq!(state, TaskState::Queued, "seed {seed}: {id}");
            lost_before_storing += 1;
            continue;
        }
        let expected = if completed {
            TaskState::Completed
        } else {
            TaskState::Failed
        };
        assert_eq!(state, expected, "seed {seed}: {id} was stored or seen");
        if completed {
            assert_eq!(
                support::calls(&server, id, Action::Fail),
                0,
                "seed {seed}: {id} turned red"
            );
        }
    }
    println!(
        "{kills} kills in {killing:?} (seed {seed}): {} reports, {} stored before the kill, \
         {lost_before_storing} killed before storing",
        kinds.len(),
        stored.len()
    );
    assert!(stored.len() as u64 >= kills, "most rounds store something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_still_delivers_and_says_not_stored() {
    let scratch = Scratch::new("full");
    let file = scratch.file();
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["huge"]);
    // An outbox with nothing in it: its size is the limit of the child.
    let lines = said(spawn("drain", &server, &file, "", None));
    assert!(lines.iter().any(|line| line == "drained"), "{lines:?}");
    let size = std::fs::metadata(&file).unwrap().len();
    let limit_kib = size.div_ceil(1024);

    // A report of 4 MiB cannot fit in the file as it is: storing it must
    // grow the file past the limit.
    let lines = said(spawn("huge", &server, &file, "huge:c", Some(limit_kib)));
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("not-stored huge NotStored")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|line| line == "done huge Completed"),
        "{lines:?}"
    );
    assert_eq!(server.state("huge"), Some(TaskState::Completed));
    assert!(std::fs::metadata(&file).unwrap().len() <= limit_kib * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_by_another_process_is_an_error_until_it_dies() {
    let scratch = Scratch::new("held");
    let file = scratch.file();
    let server = TaskServer::start().await.unwrap();
    server.add_tasks(["t1"]);
    let mut child = spawn("report", &server, &file, "t1:c", None);
    // The child holds the file once it has stored its report.
    let held = async {
        loop {
            if server.state("t1") == Some(TaskState::Completed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("the child reported");
    let builder = || TaskClient::builder(server.url()).outbox(&file);
    let error = builder().build().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Outbox, "{error}");
    assert!(error.to_string().contains("held by another"), "{error}");
    child.kill().unwrap();
    child.wait().unwrap();
    // The lock dies with the process.
    builder().build().unwrap();
}

/// A crash while an outbox file is made leaves either no file at its path
/// or a whole outbox, which the next open takes: never a half-made file
/// refused for good. The child spends its time making new files, so most
/// kills land in the middle of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_making_outbox_files_every_file_left_opens() {
    let scratch = Scratch::new("making");
    let server = TaskServer::start().await.unwrap();
    let mut random = Random::seeded();
    let mut opened = 0;
    for round in 0..6 {
        let base = scratch.path(&format!("round-{round}/outbox"));
        let folder = base.parent().unwrap().to_owned();
        let mut child = spawn("create", &server, &base, "", None);
        tokio::time::sleep(Duration::from_millis(150 + random.below(150))).await;
        child.kill().unwrap();
        let lines = said(child);
        assert!(lines.is_empty(), "seed {}: {lines:?}", random.0);
        let Ok(made) = std::fs::read_dir(&folder) else {
            continue;
        };
        for made in made {
            let path = made.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A draft of the file being made: never at the path.
                continue;
            }
            let outbox = Outbox::open(&path)
                .unwrap_or_else(|error| panic!("seed {}: {name} is refused: {error}", random.0));
            assert!(outbox.pending().unwrap().is_empty());
            opened += 1;
        }
    }
    assert!(opened > 0, "the child made files before it was killed");
}
