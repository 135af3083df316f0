//! The outbox's store under hostile conditions: a disk that refuses writes
//! and comes back, files that are links, shared, another user's, replaced or
//! removed while open, relative paths and missing folders, damaged records.
//! Real files, real loopback servers, and a child process (this test binary,
//! run again in a child role) wherever a test needs its own process: a
//! file-size limit or a change of directory.

#![cfg(all(feature = "outbox", unix))]

mod outbox_support;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use redb::{Database, TableDefinition};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Durability, Outbox, OutboxError, Replay},
    test_server::{Reply, TestServer},
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

use outbox_support::{as_child, child_command, Scratch};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Selects the child's role; the rest of its orders come in these variables.
const ROLE: &str = "HARDENING_STORE_ROLE";
const URL: &str = "HARDENING_STORE_URL";
const FILE: &str = "HARDENING_STORE_FILE";
/// The directories a child opens its outbox in, then moves to.
const OPEN_IN: &str = "HARDENING_STORE_OPEN_IN";
const MOVE_TO: &str = "HARDENING_STORE_MOVE_TO";
/// What a child says starts with this, amid the test harness's output.
const SAYS: &str = "child:";

/// The outbox's tables, as the tests plant records in them.
const PENDING: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("pending");
const KEYS: TableDefinition<'_, &str, u64> = TableDefinition::new("keys");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("outbox_meta");

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A dispatcher on `outbox` with one quick retry and a short replay
/// interval.
fn dispatcher(outbox: Outbox) -> Dispatcher<HttpClient> {
    let schedule = Schedule::new([Duration::from_millis(50)]).unwrap();
    Dispatcher::builder(outbox, client())
        .layer(TerminalRetryLayer::new(
            TerminalRetryPolicy::default().with_schedule(schedule),
        ))
        .replay(Replay {
            interval: Duration::from_millis(200),
            ..Replay::default()
        })
        .build()
        .unwrap()
}

fn hook(base: &str, key: &str) -> Request<Bytes> {
    Request::post(format!("{base}/hook/{key}"))
        .body(Bytes::from(format!("{{\"key\":\"{key}\"}}")))
        .unwrap()
}

/// A server answering 200 while `up`, else 503; it notes the key of each
/// request it took.
struct Switched {
    server: TestServer,
    up: Arc<AtomicBool>,
    taken: Arc<Mutex<Vec<String>>>,
}

impl Switched {
    async fn start(up: bool) -> Switched {
        let flag = Arc::new(AtomicBool::new(up));
        let taken = Arc::new(Mutex::new(Vec::new()));
        let (answer_flag, answer_taken) = (flag.clone(), taken.clone());
        let server = TestServer::start(move |request| {
            if !answer_flag.load(Ordering::SeqCst) {
                return Reply::status(503);
            }
            let key = request.uri.path().trim_start_matches("/hook/").to_owned();
            answer_taken.lock().unwrap().push(key);
            Reply::status(200)
        })
        .await
        .unwrap();
        Switched {
            server,
            up: flag,
            taken,
        }
    }

    fn base(&self) -> String {
        self.server.url("")
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    fn taken(&self) -> Vec<String> {
        self.taken.lock().unwrap().clone()
    }

    fn seen(&self) -> usize {
        self.server.requests().len()
    }
}

/// Waits (real time, 50 ms at a time) until `done`, 20 s at most.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// The entry point of every child: does nothing in a normal test run.
#[test]
fn child() {
    as_child(ROLE, |role| async move {
        match role.as_str() {
            "commands" => run_commands().await,
            "relative" => open_relative_then_move().await,
            other => panic!("no role {other}"),
        }
    });
}

/// Takes orders on stdin, one a line, until it closes: `send <key>` sends a
/// request (and says whether it was stored), `pending` says how many are.
async fn run_commands() {
    let base = std::env::var(URL).unwrap();
    let dispatcher = dispatcher(Outbox::open(std::env::var(FILE).unwrap()).unwrap());
    let mut orders = BufReader::new(tokio::io::stdin()).lines();
    while let Some(order) = orders.next_line().await.unwrap() {
        match order.split_once(' ') {
            Some(("send", key)) => {
                let mut dispatch = dispatcher.send(key, hook(&base, key));
                match dispatch.stored().await {
                    Durability::Stored => println!("{SAYS} stored {key}"),
                    other => println!("{SAYS} not-stored {key} {other:?}"),
                }
                tokio::spawn(dispatch);
            }
            _ => match dispatcher.outbox().unwrap().pending() {
                Ok(pending) => println!("{SAYS} pending {}", pending.len()),
                Err(error) => println!("{SAYS} unreadable {error}"),
            },
        }
    }
}

/// Opens `nested/reports.redb` (its folder missing) from one directory,
/// moves to another, then stores a request.
async fn open_relative_then_move() {
    std::env::set_current_dir(std::env::var(OPEN_IN).unwrap()).unwrap();
    let outbox = match Outbox::open("nested/reports.redb") {
        Ok(outbox) => outbox,
        Err(error) => return println!("{SAYS} refused {error}"),
    };
    println!("{SAYS} path {}", outbox.path().display());
    std::env::set_current_dir(std::env::var(MOVE_TO).unwrap()).unwrap();
    let base = std::env::var(URL).unwrap();
    let mut dispatch = dispatcher(outbox).send("moved", hook(&base, "moved"));
    match dispatch.stored().await {
        Durability::Stored => println!("{SAYS} stored"),
        other => println!("{SAYS} not-stored {other:?}"),
    }
}

/// A child in `role`, with SIGXFSZ ignored, so that a write past a file-size
/// limit fails with EFBIG rather than killing it.
fn spawn(role: &str, env: &[(&str, &Path)], url: &str) -> Child {
    let mut command = Command::from(child_command(None));
    command
        .env(ROLE, role)
        .env(URL, url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().unwrap()
}

/// Talks to a child in the `commands` role.
struct Commanded {
    child: Child,
    orders: ChildStdin,
    said: Lines<BufReader<ChildStdout>>,
}

impl Commanded {
    fn new(mut child: Child) -> Commanded {
        let orders = child.stdin.take().unwrap();
        let said = BufReader::new(child.stdout.take().unwrap()).lines();
        Commanded {
            child,
            orders,
            said,
        }
    }

    /// Sends `order`, and returns the child's answer (without the prefix).
    async fn ask(&mut self, order: &str) -> String {
        self.orders
            .write_all(format!("{order}\n").as_bytes())
            .await
            .unwrap();
        let answer = async {
            loop {
                let line = self
                    .said
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the child ended");
                // The harness may have started the line ("test child ... ").
                if let Some((_, said)) = line.split_once(SAYS) {
                    return said.trim().to_owned();
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .expect("the child answers")
    }

    fn set_file_size_limit(&self, limit: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--fsize={limit}:")])
            .status()
            .unwrap();
        assert!(status.success(), "prlimit --fsize={limit}: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_refuses_writes_then_recovers_delivers_everything_in_the_same_process() {
    let scratch = Scratch::new("disk");
    let file = scratch.path("reports.redb");
    let server = Switched::start(false).await;
    let mut child = Commanded::new(spawn("commands", &[(FILE, &file)], &server.base()));
    let pid = child.child.id();

    let mut stored = Vec::new();
    for index in 0..4 {
        let key = format!("before-{index}");
        assert_eq!(
            child.ask(&format!("send {key}")).await,
            format!("stored {key}")
        );
        stored.push(key);
    }
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 4096, "{size}");
    // Below the file's size: any commit writes past it, and fails (EFBIG).
    child.set_file_size_limit("4096");
    let down_since = tokio::time::Instant::now();
    for index in 0..3 {
        let answer = child.ask(&format!("send during-{index}")).await;
        assert!(answer.starts_with("not-stored during-"), "{answer}");
        // Long enough for the store's recoveries to fail and back off.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    child.set_file_size_limit("unlimited");
    // Stored again as soon as the store recovers: by a write, or the replay.
    let mut recovered = None;
    for index in 0..40 {
        let key = format!("after-{index}");
        if child.ask(&format!("send {key}")).await == format!("stored {key}") {
            stored.push(key);
            recovered = Some(index);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(recovered.is_some(), "the store recovered without a restart");
    let seen_while_down = server.seen();
    let down_for = down_since.elapsed();

    server.set_up(true);
    let mut drained = false;
    for _ in 0..200 {
        if child.ask("pending").await == "pending 0" {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(drained, "every stored request is delivered, and read back");
    assert_eq!(child.child.id(), pid);
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "the same process"
    );
    let taken = server.taken();
    for key in &stored {
        assert!(taken.contains(key), "{key} delivered: {taken:?}");
    }
    // No storm: each stored request is taken once, twice at most (a removal
    // lost to the disk replays it); while down, a few attempts per request
    // and probes spaced by the replay.
    for key in &stored {
        let times = taken.iter().filter(|taken| *taken == key).count();
        assert!(times <= 2, "{key} taken {times} times");
    }
    let sends = 4 + 3 + recovered.unwrap() + 1;
    println!(
        "stored again at the send {} after the limit was lifted; {seen_while_down} requests \
         while down over {down_for:?}, {} in all",
        recovered.unwrap() + 1,
        server.seen()
    );
    let bound = 2 * sends + 25 * down_for.as_secs() as usize + 10;
    assert!(
        seen_while_down <= bound,
        "{seen_while_down} requests while down, over {down_for:?}"
    );
    assert!(server.seen() <= seen_while_down + 2 * stored.len() + 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_path_is_resolved_once_at_open_and_its_missing_folder_created() {
    let scratch = Scratch::new("relative");
    let (open_in, move_to) = (scratch.path("open-in"), scratch.path("move-to"));
    std::fs::create_dir(&open_in).unwrap();
    // Only the second has the folder: a relative path followed after the
    // move would find it there.
    std::fs::create_dir_all(move_to.join("nested")).unwrap();
    let server = Switched::start(true).await;
    let env = [(OPEN_IN, open_in.as_path()), (MOVE_TO, move_to.as_path())];
    let child = spawn("relative", &env, &server.base());
    let output = child.wait_with_output().await.unwrap();
    let said: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| Some(line.split_once(SAYS)?.1.trim().to_owned()))
        .collect();
    let file = open_in.join("nested").join("reports.redb");
    assert_eq!(said, [format!("path {}", file.display()), "stored".into()]);
    assert!(file.exists());
    assert!(!move_to.join("nested").join("reports.redb").exists());
    let folder = std::fs::metadata(open_in.join("nested")).unwrap();
    assert_eq!(folder.permissions().mode() & 0o777, 0o700);
}

#[tokio::test]
async fn a_new_outbox_file_is_private_and_its_missing_folders_are_created() {
    let scratch = Scratch::new("mode");
    let file = scratch.path("data/deeper/reports.redb");
    let outbox = Outbox::open(&file).unwrap();
    assert_eq!(outbox.path(), file);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    for folder in ["data", "data/deeper"] {
        let mode = std::fs::metadata(scratch.path(folder))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{folder}: {mode:o}");
    }
}

/// An outbox at `file`, created and closed.
async fn created(file: &Path) {
    drop(Outbox::open(file).unwrap());
}

/// Asserts that `error` names the file at `path` and says `why`.
fn assert_names(error: &OutboxError, path: &Path, why: &str) {
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
    assert!(error.to_string().contains(why), "{error}");
}

#[tokio::test]
async fn a_symbolic_link_at_the_path_is_refused_naming_it() {
    let scratch = Scratch::new("link");
    let target = scratch.path("reports.redb");
    created(&target).await;
    let before = std::fs::read(&target).unwrap();
    let link = scratch.path("link.redb");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let error = Outbox::open(&link).unwrap_err();
    assert_eq!(
        error.kind(),
        tower_terminal_retry::outbox::OutboxErrorKind::Unsafe,
        "{error}"
    );
    assert_eq!(error.path(), link);
    assert_names(&error, &link, "symbolic link");
    assert_eq!(std::fs::read(&target).unwrap(), before, "left as it was");

    // A dangling link: nothing is created where it points.
    let nowhere = scratch.path("nowhere.redb");
    let dangling = scratch.path("dangling.redb");
    std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
    let error = Outbox::open(&dangling).unwrap_err();
    assert_eq!(
        error.kind(),
        tower_terminal_retry::outbox::OutboxErrorKind::Unsafe,
        "{error}"
    );
    assert!(!nowhere.exists());
}

#[tokio::test]
async fn a_file_others_may_write_is_refused_naming_it() {
    let scratch = Scratch::new("shared");
    let file = scratch.path("reports.redb");
    created(&file).await;
    for mode in [0o666, 0o620, 0o602] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let error = Outbox::open(&file).unwrap_err();
        assert_eq!(
            error.kind(),
            tower_terminal_retry::outbox::OutboxErrorKind::Unsafe,
            "{mode:o}: {error}"
        );
        assert_names(&error, &file, "writable by group or others");
    }
    // Readable by the group is fine.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    Outbox::open(&file).unwrap();
}

#[tokio::test]
async fn a_file_owned_by_another_user_is_refused_naming_it() {
    let scratch = Scratch::new("owner");
    let mut file = scratch.path("reports.redb");
    created(&file).await;
    let nobody = 65_534;
    if std::os::unix::fs::chown(&file, Some(nobody), None).is_err() {
        // Only root gives a file away; the system's user list is another
        // user's (root's) to any other.
        file = PathBuf::from("/etc/passwd");
        assert_ne!(std::fs::metadata(&file).unwrap().uid(), nobody);
    }
    let error = Outbox::open(&file).unwrap_err();
    assert_eq!(
        error.kind(),
        tower_terminal_retry::outbox::OutboxErrorKind::Unsafe,
        "{error}"
    );
    assert_names(&error, &file, "owned by another user");
}

/// Stores `key` through `dispatcher` and says how that went.
async fn store(dispatcher: &Dispatcher<HttpClient>, base: &str, key: &str) -> Durability {
    dispatcher.send(key, hook(base, key)).stored().await
}

/// A dispatcher on a fresh outbox file in `scratch`, with `k1` stored, and
/// its server, up.
async fn one_stored(scratch: &Scratch) -> (PathBuf, Switched, Dispatcher<HttpClient>) {
    let file = scratch.path("reports.redb");
    let server = Switched::start(true).await;
    let dispatcher = dispatcher(Outbox::open(&file).unwrap());
    assert_eq!(
        store(&dispatcher, &server.base(), "k1").await,
        Durability::Stored
    );
    (file, server, dispatcher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_while_open_fails_the_next_insert_not_silently() {
    let scratch = Scratch::new("replaced");
    let (file, server, dispatcher) = one_stored(&scratch).await;
    let impostor = scratch.path("impostor");
    std::fs::write(&impostor, b"another file").unwrap();
    std::fs::rename(&impostor, &file).unwrap();
    for key in ["k2", "k3"] {
        match store(&dispatcher, &server.base(), key).await {
            Durability::NotStored(error) => {
                assert_eq!(
                    error.kind(),
                    tower_terminal_retry::outbox::OutboxErrorKind::Replaced,
                    "{error}"
                );
                assert!(error.to_string().contains(&file.display().to_string()));
            }
            other => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"another file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_while_open_fails_the_next_insert_not_silently() {
    let scratch = Scratch::new("removed");
    let (file, server, dispatcher) = one_stored(&scratch).await;
    std::fs::remove_file(&file).unwrap();
    match store(&dispatcher, &server.base(), "k2").await {
        Durability::NotStored(error) => assert_eq!(
            error.kind(),
            tower_terminal_retry::outbox::OutboxErrorKind::Replaced,
            "{error}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(!file.exists(), "not created again");
}

/// A record as the outbox encodes it (record format 2: a version byte,
/// then postcard): `headers` headers, each with a name of its own and an
/// empty value; `attempts` attempts so far.
fn record(key: &str, base: &str, headers: u32, attempts: u32) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Record<'a> {
        key: &'a str,
        quarantined: bool,
        method: &'a str,
        uri: String,
        headers: Vec<Header>,
        #[serde(with = "bytes_as_bytes")]
        body: &'a [u8],
        idempotency_key: String,
        tag: Option<&'a str>,
        stored_at_ms: u64,
        attempts: u32,
        last_failure: Option<&'a str>,
    }
    #[derive(serde::Serialize)]
    struct Header {
        name: String,
        #[serde(with = "bytes_as_bytes")]
        value: &'static [u8],
    }
    mod bytes_as_bytes {
        pub(super) fn serialize<S: serde::Serializer>(
            bytes: &&[u8],
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(bytes)
        }
    }
    let record = Record {
        key,
        quarantined: false,
        method: "POST",
        uri: format!("{base}/hook/{key}"),
        headers: (0..headers)
            .map(|index| Header {
                name: format!("x{index}"),
                value: b"",
            })
            .collect(),
        body: b"{}",
        idempotency_key: format!("idem-{key}"),
        tag: None,
        stored_at_ms: 1_700_000_000_000,
        attempts,
        last_failure: None,
    };
    postcard::to_extend(&record, vec![2]).unwrap()
}

/// Plants `records` (sequence number, key, bytes) in the outbox at `file`
/// (file format 2), as if the outbox had written them.
async fn plant(file: &Path, records: &[(u64, &str, Vec<u8>)]) {
    created(file).await;
    let database = Database::create(file).unwrap();
    let write = database.begin_write().unwrap();
    {
        write.open_table(META).unwrap().insert("format", 2).unwrap();
        let mut pending = write.open_table(PENDING).unwrap();
        let mut keys = write.open_table(KEYS).unwrap();
        for (seq, key, bytes) in records {
            pending.insert(*seq, bytes.as_slice()).unwrap();
            keys.insert(*key, *seq).unwrap();
        }
    }
    write.commit().unwrap();
}

/// Every event, formatted, while the guard lives (on this thread).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            // No timestamps: a digit of one is never taken for a status.
            .without_time()
            .with_ansi(false)
            .with_writer(self.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().map(str::to_owned).collect()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;

    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn damaged_records_are_quarantined_and_the_records_after_them_still_replay() {
    let log = Log::default();
    let _events = log.install();
    let scratch = Scratch::new("damaged");
    let file = scratch.path("reports.redb");
    let server = Switched::start(true).await;
    let base = server.base();
    let crowded = record("crowded", &base, (1 << 15) + 8, 0);
    plant(
        &file,
        &[
            (1, "first", record("first", &base, 1, 0)),
            (2, "garbage", b"\x01\xff\xff\xff\xffnot a record".to_vec()),
            // More header names than a header map holds.
            (3, "crowded", crowded),
            (4, "last", record("last", &base, 2, 0)),
        ],
    )
    .await;

    let dispatcher = dispatcher(Outbox::open(&file).unwrap());
    let outbox = dispatcher.outbox().unwrap().clone();
    assert!(
        eventually(|| {
            let taken = server.taken();
            taken.contains(&"first".into()) && taken.contains(&"last".into())
        })
        .await,
        "{:?}",
        server.taken()
    );
    assert!(eventually(|| outbox.pending().unwrap().is_empty()).await);
    let quarantined = outbox.quarantined().unwrap();
    let keys: Vec<&str> = quarantined.iter().map(|entry| entry.key.as_str()).collect();
    assert_eq!(keys, ["damaged-2", "damaged-3"]);
    for entry in &quarantined {
        assert!(entry.quarantined);
        assert!(
            entry.last_failure.as_deref().unwrap().contains("damaged"),
            "{entry:?}"
        );
    }
    let lines = log.lines();
    for seq in [2, 3] {
        let named = lines.iter().any(|line| {
            line.contains("ERROR")
                && line.contains(&format!("seq={seq}"))
                && line.contains(&file.display().to_string())
        });
        assert!(named, "an error event names {seq} and the file: {lines:#?}");
    }

    assert!(outbox.discard("damaged-2").await.unwrap());
    assert!(!outbox.requeue("damaged-3").await.unwrap());
    let keys: Vec<String> = outbox
        .quarantined()
        .unwrap()
        .iter()
        .map(|entry| entry.key.clone())
        .collect();
    assert_eq!(keys, ["damaged-3"]);
    // The key of a damaged record is free for a new request.
    let mut dispatch = dispatcher.send("crowded", hook(&base, "crowded"));
    assert_eq!(dispatch.stored().await, Durability::Stored);
    assert_eq!(dispatch.await, Delivery::Delivered);
}

#[tokio::test(flavor = "current_thread")]
async fn attempt_counts_saturate_and_a_worn_record_is_still_delivered() {
    // Events on: their fields are computed, counts included.
    let _events = Log::default().install();
    let scratch = Scratch::new("attempts");
    let file = scratch.path("reports.redb");
    let server = Switched::start(false).await;
    let worn = record("worn", &server.base(), 0, u32::MAX - 1);
    plant(&file, &[(1, "worn", worn)]).await;

    let dispatcher = dispatcher(Outbox::open(&file).unwrap());
    let outbox = dispatcher.outbox().unwrap().clone();
    let saturated = || {
        server.seen() >= 2
            && outbox
                .pending()
                .is_ok_and(|pending| pending.first().map(|entry| entry.attempts) == Some(u32::MAX))
    };
    assert!(eventually(saturated).await, "{:?}", outbox.pending());
    let seen = server.seen();
    assert!(
        eventually(|| server.seen() > seen).await,
        "failed once more"
    );
    assert_eq!(outbox.pending().unwrap()[0].attempts, u32::MAX);

    server.set_up(true);
    assert!(eventually(|| server.taken() == ["worn"]).await);
    assert!(eventually(|| outbox.pending().unwrap().is_empty()).await);
}
