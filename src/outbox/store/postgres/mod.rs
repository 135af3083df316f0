//! The PostgreSQL store: one queue in a database shared by every process
//! that connects to it, claims held as leases.
//!
//! # Schema
//!
//! Created by [`Outbox::connect`](super::Outbox::connect) if missing, in
//! one transaction under `pg_advisory_xact_lock`, so that processes starting
//! at once do not race on it; its version is kept for later migrations.
//!
//! ```sql
//! CREATE TABLE terminal_retry_outbox_schema (version integer NOT NULL);
//! CREATE TABLE terminal_retry_outbox (
//!     seq         bigserial NOT NULL,        -- the order records were stored
//!     queue       text NOT NULL,             -- one outbox per queue
//!     key         text NOT NULL,             -- the sender's key
//!     state       text NOT NULL DEFAULT 'pending'
//!                 CHECK (state IN ('pending', 'quarantined')),
//!     record      bytea NOT NULL,            -- the request, as the redb store encodes it
//!     attempts    bigint NOT NULL DEFAULT 0, -- failed attempts so far
//!     last_failure text,
//!     holder      text,                      -- the claiming outbox's id, while leased
//!     lease_until timestamptz,               -- when the lease runs out
//!     generation  bigint NOT NULL DEFAULT 0, -- one more at every claim
//!     stored_at   timestamptz NOT NULL DEFAULT now(),
//!     PRIMARY KEY (queue, seq),              -- a queue's records, in order
//!     UNIQUE (queue, key)                    -- first request per key stands
//! );
//! CREATE INDEX terminal_retry_outbox_pending
//!     ON terminal_retry_outbox (queue, seq) WHERE state = 'pending';
//! ```
//!
//! - The listing (for the replay) reads pending records of the queue whose
//!   lease is free or ran out, oldest first, through the partial index: a
//!   range scan from the last sequence number read. The key leads with the
//!   queue for the same reason: a key on `seq` alone lets the planner walk
//!   every other queue's records to reach this one's. So every statement
//!   that names a record by `seq` names its queue too.
//! - A claim is one `UPDATE ... WHERE queue = $1 AND key = $2 AND state =
//!   'pending' AND (lease_until IS NULL OR lease_until < now())` through the
//!   unique index: it sets the holder, the lease and the next generation,
//!   and returns them. PostgreSQL's row lock makes two claims of one record
//!   at once take turns; the second sees the new lease and takes nothing.
//! - Every later write to the record (removal, failure count, replacement by
//!   a fallback, quarantine, release) carries `AND generation = $g AND
//!   holder = $h`: a holder whose lease ran out and was taken over changes
//!   nothing. A lease is renewed every third of its length while held, and
//!   cleared when its claim is released.
//! - A record the dispatcher stores itself is stored leased to it, at
//!   generation 1: its foreground claims the key in process only, no
//!   statement before the insert, which answers `Taken` if a record is
//!   stored under the key (leased or not). The replay's claims are the
//!   `UPDATE` above: what it sends is stored, maybe held by another. One stored by [`Outbox::enqueue`](super::Outbox::enqueue)
//!   is stored free, with a `NOTIFY` on the channel `terminal_retry_outbox`
//!   (its payload the queue) that wakes the dispatchers of the queue once
//!   the caller commits.
//!
//! # Connections
//!
//! No pool: the store's queries pipeline on one connection (tokio-postgres
//! sends a query as soon as it is polled, without waiting for the answers
//! before it), and inserts and removals are batched by a writer task into
//! one statement each, so that concurrent sends share a commit. Statements
//! are prepared once per connection and kept: preparing is a round trip. A second
//! connection listens for notifications; a poll every replay interval (at
//! most a few seconds) wakes the replay too, to find records whose holder
//! died and those enqueued while the listener was reconnecting. A lost
//! connection fails the operations under way (transient errors); the next
//! one, or the dispatcher's recovery, connects again.

use std::{
    collections::HashMap,
    fmt,
    future::{poll_fn, Future},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use tokio::{
    runtime::Handle,
    sync::{mpsc, oneshot, Notify},
    task::JoinHandle,
};
use tokio_postgres::{
    types::ToSql, AsyncMessage, Client, Row, SimpleQueryMessage, Statement, Transaction,
};

use super::Inserted;
use crate::{
    origin::{has_user_info, origin_key},
    outbox::{
        builder::DEFAULT_LEASE,
        record::{damaged_key, Tag},
        Entry, OutboxError,
    },
    postgres::{ConnectError, Target},
    sync::lock,
};

/// The schema version this crate writes.
const SCHEMA_VERSION: i32 = 2;
/// The advisory lock the schema is created under: any constant of this
/// crate's own.
const SCHEMA_LOCK: i64 = 0x7472_7920_6f75_7462;
/// The start of each queue's notification channel, a digest of the queue's
/// name after it (see [`channel`]).
const CHANNEL_PREFIX: &str = "terminal_retry_outbox_";
/// The most writes batched into one statement.
const MAX_BATCH: usize = 1024;
/// The longest wait for the answer to a statement: longer than the
/// server's own `statement_timeout`, for a connection that answers nothing.
const ANSWER_BOUND: Duration = Duration::from_secs(10);
/// The longest time between two polls of the queue.
const LONGEST_POLL: Duration = Duration::from_secs(5);
/// The wait before the listener connects again.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// The schema, version 2.
const CREATE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS terminal_retry_outbox (
    seq bigserial NOT NULL,
    queue text NOT NULL,
    key text NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'quarantined')),
    record bytea NOT NULL,
    attempts bigint NOT NULL DEFAULT 0,
    last_failure text,
    holder text,
    lease_until timestamptz,
    generation bigint NOT NULL DEFAULT 0,
    stored_at timestamptz NOT NULL DEFAULT now(),
    origin text,
    PRIMARY KEY (queue, seq),
    UNIQUE (queue, key)
);
CREATE INDEX IF NOT EXISTS terminal_retry_outbox_pending
    ON terminal_retry_outbox (queue, seq) WHERE state = 'pending';
INSERT INTO terminal_retry_outbox_schema (version) VALUES (2);
";

/// From version 1: the origin of each record, so that a dispatcher lists
/// only the records of its allow-list. Records stored before have none, and
/// are sorted by the dispatcher.
const MIGRATE_FROM_1: &str = "
ALTER TABLE terminal_retry_outbox ADD COLUMN IF NOT EXISTS origin text;
INSERT INTO terminal_retry_outbox_schema (version) VALUES (2);
";

/// Writes to a record only while this claim of it is current: `$3` the
/// generation (`NULL` for a record not claimed here: then only while no one
/// holds it), `$4` the holder.
const FENCE: &str = "((generation = $3::bigint AND holder = $4::text) \
    OR ($3::bigint IS NULL AND (lease_until IS NULL OR lease_until < now())))";

/// The columns a record is read from.
const COLUMNS: &str = "seq, record, attempts, last_failure, state";

/// The store on one queue of a PostgreSQL database, and the keys being sent
/// from this process.
pub(super) struct PostgresStore {
    shared: Arc<Shared>,
    writes: mpsc::UnboundedSender<Write>,
    /// Keys being sent here, with the record leased for each, once known.
    claimed: Mutex<HashMap<String, Option<u64>>>,
    /// The writer, the listener and the lease renewal: stopped with the
    /// store.
    tasks: Vec<JoinHandle<()>>,
}

/// What the store and its tasks share.
struct Shared {
    target: Target,
    /// A pseudo path: server, database and queue, no password.
    path: PathBuf,
    queue: String,
    /// The queue's notification channel: its name is not in it.
    channel: String,
    /// A notification woke the replay, and no scan has started since.
    notified: AtomicBool,
    /// Notifications are not heeded before this: one woke a scan that found
    /// nothing to do (spurious, or taken by another dispatcher first). The
    /// poll finds what they announced meanwhile.
    deaf_until: Mutex<Option<tokio::time::Instant>>,
    /// This store's id in `holder`: a fresh uuid.
    holder: String,
    /// `None` until connected again after the connection was lost.
    client: tokio::sync::Mutex<Option<Arc<Connection>>>,
    runtime: Handle,
    writable: AtomicBool,
    /// Pending records as of the last listing or write.
    pending: AtomicU64,
    requeued: Arc<Notify>,
    lease_ms: AtomicU64,
    replay_interval_ms: AtomicU64,
    /// The generation of each record leased here, by sequence number.
    held: Mutex<HashMap<u64, i64>>,
}

/// Where a write's answer goes.
type Reply<T> = oneshot::Sender<Result<T, OutboxError>>;

/// An insert waiting in a batch.
struct Insert {
    key: String,
    origin: String,
    record: Vec<u8>,
    reply: Reply<Inserted>,
}

/// A write the writer batches with others.
enum Write {
    Insert {
        key: String,
        origin: String,
        record: Vec<u8>,
        reply: Reply<Inserted>,
    },
    Complete {
        seq: u64,
        generation: Option<i64>,
        reply: Reply<bool>,
    },
}

/// What a claim found in the table.
enum Lease {
    /// Leased here now, as this generation.
    Taken { seq: u64, generation: i64 },
    /// No record under the key: the insert that follows leases it.
    Absent,
    /// Leased by another holder, or quarantined.
    Unavailable,
}

impl PostgresStore {
    pub(super) async fn connect(url: &str, queue: &str) -> Result<PostgresStore, OutboxError> {
        let unparsed = Path::new("postgres");
        let runtime = Handle::try_current()
            .map_err(|_| OutboxError::refused(unparsed, "no tokio runtime to run the store on"))?;
        let target = Target::parse(url).map_err(|error| connect_error(unparsed, error))?;
        let path = pseudo_path(&target, queue);
        let mut client = open(&target, &path).await?;
        create_schema(&mut client, &path).await?;
        let shared = Arc::new(Shared {
            target,
            path,
            queue: queue.to_owned(),
            channel: channel(queue),
            notified: AtomicBool::new(false),
            deaf_until: Mutex::new(None),
            holder: uuid::Uuid::new_v4().to_string(),
            client: tokio::sync::Mutex::new(Some(Arc::new(Connection::new(client, ANSWER_BOUND)))),
            runtime: runtime.clone(),
            writable: AtomicBool::new(true),
            pending: AtomicU64::new(0),
            requeued: Arc::new(Notify::new()),
            lease_ms: AtomicU64::new(millis(DEFAULT_LEASE)),
            // Until a dispatcher says its replay interval: the longest poll.
            replay_interval_ms: AtomicU64::new(millis(LONGEST_POLL)),
            held: Mutex::new(HashMap::new()),
        });
        shared.count_pending().await?;
        let (writes, received) = mpsc::unbounded_channel();
        let tasks = vec![
            runtime.spawn(write_loop(shared.clone(), received)),
            runtime.spawn(listen(shared.clone())),
            runtime.spawn(upkeep(shared.clone())),
        ];
        Ok(PostgresStore {
            shared,
            writes,
            claimed: Mutex::new(HashMap::new()),
            tasks,
        })
    }

    pub(super) async fn enqueue(
        &self,
        transaction: &Transaction<'_>,
        key: &str,
        request: Request<Bytes>,
    ) -> Result<(), OutboxError> {
        let path = &self.shared.path;
        if has_user_info(request.uri()) {
            return Err(OutboxError::refused(
                path,
                "its URI holds credentials (user information before the host); put them in a \
                 header the sending service adds",
            ));
        }
        let tag = Tag::of(&request).map_err(|reason| OutboxError::refused(path, reason))?;
        let origin = origin_key(request.uri());
        let record = Entry::new(key.to_owned(), &request, tag)
            .encode()
            .map_err(|error| OutboxError::unencodable(path, error))?;
        // The notification is sent only if the record is stored, and only
        // once the caller commits.
        transaction
            .query(
                "WITH stored AS (
                     INSERT INTO terminal_retry_outbox (queue, key, origin, record)
                     VALUES ($1, $2, $3, $4) ON CONFLICT (queue, key) DO NOTHING RETURNING seq)
                 SELECT pg_notify($5, '') FROM stored",
                &[
                    &self.shared.queue,
                    &key,
                    &origin,
                    &record,
                    &self.shared.channel,
                ],
            )
            .await
            .map_err(|error| self.shared.failed(error))?;
        Ok(())
    }

    pub(super) fn hold_for(&self, lease: Duration, replay_interval: Duration) {
        self.shared.lease_ms.store(millis(lease), Ordering::Relaxed);
        self.shared
            .replay_interval_ms
            .store(millis(replay_interval), Ordering::Relaxed);
    }

    pub(super) fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Read on a thread of its own, with a connection of its own: the
    /// caller may be a task of a runtime this must not block on.
    pub(super) fn pending(&self, cap: usize) -> Result<Vec<Entry>, OutboxError> {
        let entries = self.list_apart("pending", cap)?;
        if entries.len() < cap {
            self.shared
                .pending
                .store(entries.len() as u64, Ordering::Relaxed);
        }
        Ok(entries)
    }

    pub(super) fn quarantined(&self, cap: usize) -> Result<Vec<Entry>, OutboxError> {
        self.list_apart("quarantined", cap)
    }

    /// Up to `limit` records after `after`, quarantined or pending, leased
    /// or not, on the store's connection.
    pub(super) async fn page(
        &self,
        quarantined: bool,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
        let state = match quarantined {
            true => "quarantined",
            false => "pending",
        };
        let client = self.shared.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM terminal_retry_outbox
                     WHERE queue = $1 AND state = $2 AND seq > $3 ORDER BY seq LIMIT $4"
                ),
                &[&self.shared.queue, &state, &as_seq(after), &as_limit(limit)],
            )
            .await
            .map_err(|error| self.shared.failed(error))?;
        Ok(listed(&rows, quarantined))
    }

    pub(super) fn pending_count(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    pub(super) async fn requeue(&self, key: &str) -> Result<bool, OutboxError> {
        let client = self.shared.client().await?;
        let rows = client
            .query(
                "WITH requeued AS (
                     UPDATE terminal_retry_outbox
                     SET state = 'pending', holder = NULL, lease_until = NULL
                     WHERE queue = $1 AND key = $2 AND state = 'quarantined' RETURNING seq)
                 SELECT pg_notify($3, '') FROM requeued",
                &[&self.shared.queue, &key, &self.shared.channel],
            )
            .await
            .map_err(|error| self.shared.failed(error))?;
        let requeued = !rows.is_empty();
        if requeued {
            self.shared.pending.fetch_add(1, Ordering::Relaxed);
            self.shared.requeued.notify_one();
        }
        Ok(requeued)
    }

    pub(super) async fn discard(&self, key: &str) -> Result<bool, OutboxError> {
        let client = self.shared.client().await?;
        let rows = client
            .query(
                "DELETE FROM terminal_retry_outbox
                 WHERE queue = $1 AND (key = $2 OR (state = 'quarantined' AND 'damaged-' || seq = $2))
                 RETURNING state",
                &[&self.shared.queue, &key],
            )
            .await
            .map_err(|error| self.shared.failed(error))?;
        for row in &rows {
            if row
                .try_get::<_, &str>(0)
                .is_ok_and(|state| state == "pending")
            {
                self.shared.uncount(1);
            }
        }
        Ok(!rows.is_empty())
    }

    pub(super) async fn claim(&self, key: &str) -> bool {
        {
            let mut claimed = lock(&self.claimed);
            if claimed.contains_key(key) {
                return false;
            }
            claimed.insert(key.to_owned(), None);
        }
        match self.shared.take_lease(key).await {
            Ok(Lease::Taken { seq, generation }) => {
                lock(&self.shared.held).insert(seq, generation);
                lock(&self.claimed).insert(key.to_owned(), Some(seq));
                true
            }
            Ok(Lease::Unavailable) => {
                lock(&self.claimed).remove(key);
                false
            }
            // Not stored yet; or the database cannot be reached, and the
            // insert or the read that follows fails and says so.
            Ok(Lease::Absent) | Err(_) => true,
        }
    }

    /// Claims in this process a key about to be inserted: no round trip,
    /// as the insert stores the record leased here, or answers `Taken` if
    /// one is stored under the key (leased or not), which is then not sent.
    pub(super) fn claim_new(&self, key: &str) -> bool {
        let mut claimed = lock(&self.claimed);
        if claimed.contains_key(key) {
            return false;
        }
        claimed.insert(key.to_owned(), None);
        true
    }

    pub(super) fn release(&self, key: &str, settled: bool) {
        let seq = lock(&self.claimed).remove(key).flatten();
        let lease = seq.and_then(|seq| Some((seq, lock(&self.shared.held).remove(&seq)?)));
        if let Some((seq, generation)) = lease {
            // Cleared at once, so that any holder may take it; were this
            // lost, the lease runs out.
            let shared = self.shared.clone();
            self.shared.runtime.spawn(async move {
                if let Err(error) = shared.release(seq, generation).await {
                    tracing::debug!(seq, error = %error, "a lease could not be cleared: it runs out");
                }
            });
        }
        if !settled {
            self.shared.requeued.notify_one();
        }
    }

    pub(super) fn claimed(&self) -> usize {
        lock(&self.claimed).len()
    }

    pub(super) async fn insert(&self, entry: Entry) -> Result<Inserted, OutboxError> {
        let record = entry
            .encode()
            .map_err(|error| OutboxError::unencodable(&self.shared.path, error))?;
        let (reply, answer) = oneshot::channel();
        let write = Write::Insert {
            key: entry.key.clone(),
            origin: origin_key(&entry.uri),
            record,
            reply,
        };
        let inserted = self.ask(write, answer).await?;
        if let Inserted::Stored(seq) = inserted {
            // Stored leased here, as generation 1.
            lock(&self.shared.held).insert(seq, 1);
            if let Some(claim) = lock(&self.claimed).get_mut(&entry.key) {
                *claim = Some(seq);
            }
        }
        Ok(inserted)
    }

    /// Records of other origins than `origins` (all, if empty) are left
    /// out; those stored before the schema knew origins are listed, for the
    /// dispatcher to sort.
    pub(super) async fn pending_after(
        &self,
        after: u64,
        limit: usize,
        origins: &[String],
    ) -> Result<Vec<Entry>, OutboxError> {
        let client = self.shared.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM terminal_retry_outbox
                     WHERE queue = $1 AND state = 'pending' AND seq > $2
                       AND (lease_until IS NULL OR lease_until < now())
                       AND (cardinality($4::text[]) = 0 OR origin IS NULL OR origin = ANY($4))
                     ORDER BY seq LIMIT $3"
                ),
                &[
                    &self.shared.queue,
                    &as_seq(after),
                    &as_limit(limit),
                    &origins,
                ],
            )
            .await
            .map_err(|error| self.shared.failed(error))?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            match decode(row) {
                Ok(entry) => entries.push(entry),
                Err(unreadable) => self.shared.set_damaged(unreadable).await,
            }
        }
        if after == 0 {
            self.shared.scanned(!entries.is_empty());
        }
        Ok(entries)
    }

    pub(super) async fn get(&self, seq: u64) -> Result<Option<Entry>, OutboxError> {
        let client = self.shared.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM terminal_retry_outbox
                     WHERE seq = $1 AND queue = $2 AND state = 'pending'"
                ),
                &[&as_seq(seq), &self.shared.queue],
            )
            .await
            .map_err(|error| self.shared.failed(error))?;
        match row.as_ref().map(decode) {
            None => Ok(None),
            Some(Ok(entry)) => Ok(Some(entry)),
            Some(Err(unreadable)) => {
                self.shared.set_damaged(unreadable).await;
                Ok(None)
            }
        }
    }

    pub(super) async fn complete(&self, seq: u64) -> Result<bool, OutboxError> {
        let generation = self.shared.generation(seq);
        let (reply, answer) = oneshot::channel();
        let removed = self
            .ask(
                Write::Complete {
                    seq,
                    generation,
                    reply,
                },
                answer,
            )
            .await?;
        // Gone: its release has nothing to clear.
        lock(&self.shared.held).remove(&seq);
        Ok(removed)
    }

    pub(super) async fn record_failure(
        &self,
        seq: u64,
        attempts: u32,
        failure: String,
    ) -> Result<bool, OutboxError> {
        self.shared
            .fenced(
                "UPDATE terminal_retry_outbox
                 SET attempts = LEAST(attempts + $5, 4294967295), last_failure = $6",
                seq,
                &[&i64::from(attempts), &failure],
            )
            .await
    }

    pub(super) async fn replace(&self, seq: u64, entry: Entry) -> Result<bool, OutboxError> {
        let record = entry
            .encode()
            .map_err(|error| OutboxError::unencodable(&self.shared.path, error))?;
        // One statement: the fallback is stored as the refused request is
        // retired, or neither is.
        self.shared
            .fenced(
                "UPDATE terminal_retry_outbox
                 SET record = $5, attempts = $6, last_failure = $7",
                seq,
                &[&record, &i64::from(entry.attempts), &entry.last_failure],
            )
            .await
    }

    pub(super) async fn quarantine(&self, seq: u64, failure: String) -> Result<bool, OutboxError> {
        let quarantined = self
            .shared
            .fenced(
                "UPDATE terminal_retry_outbox
                 SET state = 'quarantined', last_failure = $5, holder = NULL, lease_until = NULL",
                seq,
                &[&failure],
            )
            .await?;
        if quarantined {
            lock(&self.shared.held).remove(&seq);
            self.shared.uncount(1);
        }
        Ok(quarantined)
    }

    pub(super) fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    pub(super) async fn recover(&self) -> bool {
        let Ok(client) = self.shared.client().await else {
            return false;
        };
        match client.simple_query("SELECT 1").await {
            Ok(_) => {
                self.shared.writable.store(true, Ordering::Release);
                true
            }
            Err(error) => {
                self.shared.failed(error);
                false
            }
        }
    }

    pub(super) fn requeued(&self) -> Arc<Notify> {
        self.shared.requeued.clone()
    }

    /// Hands `write` to the writer and waits for its commit.
    async fn ask<T>(
        &self,
        write: Write,
        answer: oneshot::Receiver<Result<T, OutboxError>>,
    ) -> Result<T, OutboxError> {
        if self.writes.send(write).is_err() {
            return Err(OutboxError::closed(&self.shared.path));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(OutboxError::closed(&self.shared.path)))
    }

    /// The records of the queue in `state`, oldest first, read on a thread
    /// with its own runtime and connection.
    fn list_apart(&self, state: &'static str, cap: usize) -> Result<Vec<Entry>, OutboxError> {
        let target = self.shared.target.clone();
        let path = self.shared.path.clone();
        let queue = self.shared.queue.clone();
        let read = move || -> Result<Vec<Entry>, OutboxError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| OutboxError::io(&path, error))?;
            runtime.block_on(async {
                let client = open(&target, &path).await?;
                let rows = client
                    .query(
                        &format!(
                            "SELECT {COLUMNS} FROM terminal_retry_outbox
                             WHERE queue = $1 AND state = $2 ORDER BY seq LIMIT $3"
                        ),
                        &[&queue, &state, &as_limit(cap)],
                    )
                    .await
                    .map_err(|error| OutboxError::io(&path, error))?;
                Ok(listed(&rows, state == "quarantined"))
            })
        };
        std::thread::scope(|scope| {
            scope
                .spawn(read)
                .join()
                .unwrap_or_else(|_| Err(OutboxError::stopped()))
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Shared {
    /// The connection, connecting again if it was lost.
    async fn client(&self) -> Result<Arc<Connection>, OutboxError> {
        let mut client = self.client.lock().await;
        if let Some(open) = client.as_ref().filter(|open| !open.is_closed()) {
            return Ok(open.clone());
        }
        *client = None;
        match open(&self.target, &self.path).await {
            Ok(opened) => {
                let opened = Arc::new(Connection::new(opened, ANSWER_BOUND));
                *client = Some(opened.clone());
                Ok(opened)
            }
            Err(error) => {
                self.writable.store(false, Ordering::Release);
                Err(error)
            }
        }
    }

    /// A notification came: the replay is woken, unless one woke it for
    /// nothing less than a replay interval ago.
    fn notified(&self) {
        let deaf = lock(&self.deaf_until).is_some_and(|until| until > tokio::time::Instant::now());
        if !deaf {
            self.notified.store(true, Ordering::Relaxed);
            self.requeued.notify_one();
        }
    }

    /// A scan of the queue began, and `found` records: if a notification
    /// woke it for nothing, notifications are not heeded for a replay
    /// interval, so that a flood of them (any role may notify) costs at
    /// most one scan per interval besides the polls.
    fn scanned(&self, found: bool) {
        if self.notified.swap(false, Ordering::Relaxed) && !found {
            let interval = Duration::from_millis(self.replay_interval_ms.load(Ordering::Relaxed));
            *lock(&self.deaf_until) = Some(tokio::time::Instant::now() + interval);
        }
    }

    /// The error of a statement: a lost connection makes the store
    /// unwritable until it is connected again.
    fn failed(&self, error: impl Into<Failed>) -> OutboxError {
        let error = error.into();
        // Errors without an SQL state come from the connection, not from
        // the statement; so does an answer that never came.
        let lost = match &error {
            Failed::Server(error) => error.is_closed() || error.code().is_none(),
            Failed::Unanswered(_) => true,
        };
        if lost {
            self.writable.store(false, Ordering::Release);
        }
        OutboxError::io(&self.path, error)
    }

    fn lease_seconds(&self) -> f64 {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed)).as_secs_f64()
    }

    fn generation(&self, seq: u64) -> Option<i64> {
        lock(&self.held).get(&seq).copied()
    }

    fn uncount(&self, removed: u64) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pending| {
                Some(pending.saturating_sub(removed))
            });
    }

    async fn count_pending(&self) -> Result<(), OutboxError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM terminal_retry_outbox WHERE queue = $1 AND state = 'pending'",
                &[&self.queue],
            )
            .await
            .map_err(|error| self.failed(error))?;
        let count: i64 = row.get(0);
        self.pending
            .store(u64::try_from(count).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    /// Leases the pending record under `key` here, if no one holds it.
    async fn take_lease(&self, key: &str) -> Result<Lease, OutboxError> {
        let client = self.client().await?;
        // The outer select sees the table as it was before the update: a
        // row under the key that was not taken is held by another, or
        // quarantined.
        let rows = client
            .query(
                "WITH taken AS (
                     UPDATE terminal_retry_outbox
                     SET holder = $3, lease_until = now() + $4 * interval '1 second',
                         generation = generation + 1
                     WHERE queue = $1 AND key = $2 AND state = 'pending'
                       AND (lease_until IS NULL OR lease_until < now())
                     RETURNING seq, generation)
                 SELECT seq, generation FROM taken
                 UNION ALL
                 SELECT NULL, NULL FROM terminal_retry_outbox
                 WHERE queue = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM taken)",
                &[&self.queue, &key, &self.holder, &self.lease_seconds()],
            )
            .await
            .map_err(|error| self.failed(error))?;
        Ok(match rows.first() {
            None => Lease::Absent,
            Some(row) => match (row.get::<_, Option<i64>>(0), row.get(1)) {
                (Some(seq), Some(generation)) => Lease::Taken {
                    seq: seq as u64,
                    generation,
                },
                _ => Lease::Unavailable,
            },
        })
    }

    /// Runs `update` (setting parameters from `$5` on) on the record `seq`
    /// while this store's claim of it is current; whether it was.
    async fn fenced(
        &self,
        update: &str,
        seq: u64,
        rest: &[&(dyn ToSql + Sync)],
    ) -> Result<bool, OutboxError> {
        let client = self.client().await?;
        let statement =
            format!("{update} WHERE seq = $1 AND queue = $2 AND state = 'pending' AND {FENCE}");
        let generation = self.generation(seq);
        let seq = as_seq(seq);
        let mut parameters: Vec<&(dyn ToSql + Sync)> =
            vec![&seq, &self.queue, &generation, &self.holder];
        parameters.extend_from_slice(rest);
        let changed = client
            .execute(&statement, &parameters)
            .await
            .map_err(|error| self.failed(error))?;
        self.writable.store(true, Ordering::Release);
        Ok(changed > 0)
    }

    /// Clears this store's lease of `seq`, if it is still current.
    async fn release(&self, seq: u64, generation: i64) -> Result<(), OutboxError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE terminal_retry_outbox SET holder = NULL, lease_until = NULL
                 WHERE queue = $1 AND seq = $2 AND generation = $3 AND holder = $4",
                &[&self.queue, &as_seq(seq), &generation, &self.holder],
            )
            .await
            .map_err(|error| self.failed(error))?;
        Ok(())
    }

    /// Moves a record that cannot be read to quarantine, as it is, with the
    /// reason: the records after it are still replayed. One whose sequence
    /// number cannot be read is reported, and left.
    async fn set_damaged(&self, unreadable: Unreadable) {
        let Unreadable { seq, reason } = unreadable;
        let Some(seq) = seq else {
            tracing::error!(
                outbox = %self.path.display(),
                reason,
                "a stored row cannot be read, not even its sequence number: skipped"
            );
            return;
        };
        tracing::error!(
            seq,
            outbox = %self.path.display(),
            key = damaged_key(seq),
            reason,
            "a stored record cannot be read: moved to quarantine"
        );
        let failure = format!("damaged: {reason}");
        let moved = match self.client().await {
            Ok(client) => client
                .execute(
                    "UPDATE terminal_retry_outbox
                     SET state = 'quarantined', last_failure = $3, holder = NULL, lease_until = NULL
                     WHERE seq = $1 AND queue = $2",
                    &[&as_seq(seq), &self.queue, &failure],
                )
                .await
                .map_err(|error| self.failed(error)),
            Err(error) => Err(error),
        };
        match moved {
            Ok(_) => self.uncount(1),
            Err(error) => {
                tracing::error!(seq, error = %error, "a damaged record could not be moved")
            }
        }
    }

    /// Extends the leases held here.
    async fn renew(&self) -> Result<(), OutboxError> {
        let held: Vec<i64> = lock(&self.held).keys().map(|&seq| as_seq(seq)).collect();
        if held.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute(
                "UPDATE terminal_retry_outbox SET lease_until = now() + $3 * interval '1 second'
                 WHERE queue = $1 AND holder = $2 AND seq = ANY($4)",
                &[&self.queue, &self.holder, &self.lease_seconds(), &held],
            )
            .await
            .map_err(|error| self.failed(error))?;
        Ok(())
    }

    /// Commits a batch of writes: the inserts in one statement, the
    /// removals in another.
    async fn commit(&self, batch: Vec<Write>) {
        let mut inserts = Vec::new();
        let mut completes = Vec::new();
        for write in batch {
            match write {
                Write::Insert {
                    key,
                    origin,
                    record,
                    reply,
                } => inserts.push(Insert {
                    key,
                    origin,
                    record,
                    reply,
                }),
                Write::Complete {
                    seq,
                    generation,
                    reply,
                } => completes.push((seq, generation, reply)),
            }
        }
        if !inserts.is_empty() {
            let stored = self.insert_all(&inserts).await;
            for Insert { key, reply, .. } in inserts {
                let answer = match &stored {
                    Ok(stored) => Ok(stored
                        .get(&key)
                        .map_or(Inserted::Taken, |&seq| Inserted::Stored(seq))),
                    Err(error) => Err(error.clone()),
                };
                let _ = reply.send(answer);
            }
        }
        if !completes.is_empty() {
            let removed = self.complete_all(&completes).await;
            for (seq, _, reply) in completes {
                let answer = match &removed {
                    Ok(removed) => Ok(removed.contains(&seq)),
                    Err(error) => Err(error.clone()),
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Stores the records, leased here; the sequence number of each stored
    /// (a key stored already is not).
    async fn insert_all(&self, inserts: &[Insert]) -> Result<HashMap<String, u64>, OutboxError> {
        let client = self.client().await?;
        let keys: Vec<&str> = inserts.iter().map(|insert| insert.key.as_str()).collect();
        let origins: Vec<&str> = inserts
            .iter()
            .map(|insert| insert.origin.as_str())
            .collect();
        let records: Vec<&[u8]> = inserts.iter().map(|insert| &insert.record[..]).collect();
        let rows = client
            .query(
                "INSERT INTO terminal_retry_outbox
                     (queue, key, origin, record, holder, lease_until, generation)
                 SELECT $1, batch.key, batch.origin, batch.record, $2,
                        now() + $3 * interval '1 second', 1
                 FROM unnest($4::text[], $5::text[], $6::bytea[]) WITH ORDINALITY
                     AS batch(key, origin, record, position)
                 ORDER BY batch.position
                 ON CONFLICT (queue, key) DO NOTHING
                 RETURNING key, seq",
                &[
                    &self.queue,
                    &self.holder,
                    &self.lease_seconds(),
                    &keys,
                    &origins,
                    &records,
                ],
            )
            .await
            .map_err(|error| self.failed(error))?;
        self.writable.store(true, Ordering::Release);
        self.pending.fetch_add(rows.len() as u64, Ordering::Relaxed);
        let mut stored = HashMap::with_capacity(rows.len());
        for row in &rows {
            let key = row.try_get::<_, String>(0);
            let seq = row.try_get::<_, i64>(1);
            if let (Ok(key), Ok(seq)) = (key, seq) {
                stored.insert(key, seq as u64);
            }
        }
        Ok(stored)
    }

    /// Removes the records whose claim is still current here (or that no
    /// one holds); the sequence numbers removed.
    async fn complete_all(
        &self,
        completes: &[(u64, Option<i64>, Reply<bool>)],
    ) -> Result<Vec<u64>, OutboxError> {
        let client = self.client().await?;
        let seqs: Vec<i64> = completes.iter().map(|&(seq, ..)| as_seq(seq)).collect();
        let generations: Vec<Option<i64>> = completes.iter().map(|&(_, g, _)| g).collect();
        let rows = client
            .query(
                "DELETE FROM terminal_retry_outbox AS stored
                 USING unnest($2::bigint[], $3::bigint[]) AS done(seq, generation)
                 WHERE stored.queue = $1 AND stored.seq = done.seq AND stored.state = 'pending'
                   AND ((stored.generation = done.generation AND stored.holder = $4)
                     OR (done.generation IS NULL
                         AND (stored.lease_until IS NULL OR stored.lease_until < now())))
                 RETURNING stored.seq",
                &[&self.queue, &seqs, &generations, &self.holder],
            )
            .await
            .map_err(|error| self.failed(error))?;
        self.writable.store(true, Ordering::Release);
        self.uncount(rows.len() as u64);
        Ok(rows.iter().map(|row| row.get::<_, i64>(0) as u64).collect())
    }
}

/// Commits what is asked, batching what waits meanwhile; ends with the
/// store.
async fn write_loop(shared: Arc<Shared>, mut writes: mpsc::UnboundedReceiver<Write>) {
    let mut batch = Vec::new();
    while writes.recv_many(&mut batch, MAX_BATCH).await > 0 {
        shared.commit(std::mem::take(&mut batch)).await;
    }
}

/// Listens for records enqueued on the queue, connecting again whenever the
/// connection is lost; wakes the replay once listening, for what was
/// enqueued while it was not.
async fn listen(shared: Arc<Shared>) {
    loop {
        if let Err(error) = listen_once(&shared).await {
            tracing::debug!(error = %error, "the outbox's listener lost its connection");
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

async fn listen_once(shared: &Shared) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (client, mut connection) = shared.target.connect_undriven().await?;
    let statement = format!("LISTEN {}", shared.channel);
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            listened = &mut listen, if !listening => {
                listened?;
                listening = true;
                shared.requeued.notify_one();
            }
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                // Anyone who may connect may notify: what the payload says
                // is not trusted, and a flood is heeded at most once per
                // replay interval (see `Shared::scanned`).
                Some(Ok(AsyncMessage::Notification(_))) => shared.notified(),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => return Ok(()),
            },
        }
    }
}

/// Renews the leases held here every third of the lease, and wakes the
/// replay at least every replay interval (capped at a few seconds): it then
/// finds the records whose holder died.
async fn upkeep(shared: Arc<Shared>) {
    let mut last_poll = tokio::time::Instant::now();
    loop {
        let lease = Duration::from_millis(shared.lease_ms.load(Ordering::Relaxed));
        let poll = Duration::from_millis(shared.replay_interval_ms.load(Ordering::Relaxed))
            .min(LONGEST_POLL);
        let tick = (lease / 3).min(poll).max(Duration::from_millis(10));
        tokio::time::sleep(tick).await;
        if let Err(error) = shared.renew().await {
            tracing::warn!(error = %error, "the outbox's leases could not be renewed");
        }
        if last_poll.elapsed() >= poll {
            last_poll = tokio::time::Instant::now();
            shared.requeued.notify_one();
        }
    }
}

/// The store's connection, with the statements it prepared: a statement is
/// prepared once per connection, not at every use (a round trip each).
///
/// Every statement is bounded here too, not only by the server's
/// `statement_timeout`: a connection that freezes without closing (a
/// network that drops packets, a server that stops) answers nothing, not
/// even a timeout. One left unanswered is dropped, and the next operation
/// connects again.
struct Connection {
    client: Client,
    prepared: Mutex<HashMap<String, Statement>>,
    /// The longest wait for an answer.
    bound: Duration,
    /// A statement went unanswered: the connection is not used again.
    frozen: AtomicBool,
}

/// Why a statement failed.
#[derive(Debug)]
enum Failed {
    /// The server said so, or the connection closed.
    Server(tokio_postgres::Error),
    /// No answer within the bound.
    Unanswered(Duration),
}

impl From<tokio_postgres::Error> for Failed {
    fn from(error: tokio_postgres::Error) -> Failed {
        Failed::Server(error)
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The server's own message: "db error" alone says nothing.
            Failed::Server(error) => match error.as_db_error() {
                Some(db) => write!(f, "{}: {}", db.severity(), db.message()),
                None => write!(f, "{error}"),
            },
            Failed::Unanswered(bound) => write!(
                f,
                "the database did not answer within {} ms: the connection is dropped",
                bound.as_millis()
            ),
        }
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failed::Server(error) => Some(error),
            Failed::Unanswered(_) => None,
        }
    }
}

impl Connection {
    fn new(client: Client, bound: Duration) -> Connection {
        Connection {
            client,
            prepared: Mutex::new(HashMap::new()),
            bound,
            frozen: AtomicBool::new(false),
        }
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed() || self.frozen.load(Ordering::Relaxed)
    }

    /// `answer`, unless the bound passes first.
    async fn bounded<T>(
        &self,
        answer: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Failed> {
        match tokio::time::timeout(self.bound, answer).await {
            Ok(answer) => Ok(answer?),
            Err(_) => {
                self.frozen.store(true, Ordering::Relaxed);
                Err(Failed::Unanswered(self.bound))
            }
        }
    }

    /// Whether `failed` says that the table changed under a prepared
    /// statement (a migration, a column altered): the statements are then
    /// prepared again, once, rather than failing until a restart.
    fn replanned(&self, failed: &Failed) -> bool {
        let Failed::Server(error) = failed else {
            return false;
        };
        let stale = error.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED);
        if stale {
            lock(&self.prepared).clear();
        }
        stale
    }

    /// `sql`, prepared on this connection once.
    async fn statement(&self, sql: &str) -> Result<Statement, Failed> {
        if let Some(statement) = lock(&self.prepared).get(sql) {
            return Ok(statement.clone());
        }
        // Two tasks preparing one statement at once both succeed; the
        // second's copy replaces the first's, which is harmless.
        let statement = self.bounded(self.client.prepare(sql)).await?;
        lock(&self.prepared).insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    async fn query(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.query(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.query(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    async fn query_opt(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.query_opt(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.query_opt(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    async fn query_one(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.query_one(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.query_one(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    async fn execute(&self, sql: &str, parameters: &[&(dyn ToSql + Sync)]) -> Result<u64, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.execute(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.execute(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Failed> {
        self.bounded(self.client.simple_query(sql)).await
    }
}

/// Connects, with the connection driven on the current runtime.
async fn open(target: &Target, path: &Path) -> Result<Client, OutboxError> {
    target
        .connect()
        .await
        .map_err(|error| connect_error(path, error))
}

/// A connection string that cannot be used makes an invalid outbox; a
/// failed connection, one that cannot be read or written.
fn connect_error(path: &Path, error: ConnectError) -> OutboxError {
    match error {
        ConnectError::Invalid(_) => OutboxError::invalid(path, error.to_string()),
        error => OutboxError::io(path, error),
    }
}

/// Creates the schema if it is missing, under an advisory lock.
async fn create_schema(client: &mut Client, path: &Path) -> Result<(), OutboxError> {
    let io = |error| OutboxError::io(path, error);
    let transaction = client.transaction().await.map_err(io)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(io)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS terminal_retry_outbox_schema (version integer NOT NULL)",
        )
        .await
        .map_err(io)?;
    let version: Option<i32> = transaction
        .query_one("SELECT max(version) FROM terminal_retry_outbox_schema", &[])
        .await
        .map_err(io)?
        .get(0);
    match version {
        None => transaction.batch_execute(CREATE_SCHEMA).await.map_err(io)?,
        Some(1) => transaction
            .batch_execute(MIGRATE_FROM_1)
            .await
            .map_err(io)?,
        Some(SCHEMA_VERSION) => {}
        Some(later) => {
            return Err(OutboxError::invalid(
                path,
                format!("its schema is version {later}, written by a later version of this crate"),
            ))
        }
    }
    transaction.commit().await.map_err(io)
}

/// A row that cannot be read: a column `NULL`, of another type than the
/// schema's, or a record that cannot be decoded.
struct Unreadable {
    /// Its sequence number, if even that cannot be read.
    seq: Option<u64>,
    reason: String,
}

/// The record in `row`, read column by column: a table changed behind the
/// store's back is reported, never a panic.
fn decode(row: &Row) -> Result<Entry, Unreadable> {
    let seq = row
        .try_get::<_, i64>(0)
        .ok()
        .and_then(|seq| u64::try_from(seq).ok());
    let unreadable = |column: &str, error: tokio_postgres::Error| Unreadable {
        seq,
        reason: format!("its column `{column}` cannot be read: {error}"),
    };
    let Some(seq) = seq else {
        let reason = match row.try_get::<_, i64>(0) {
            Err(error) => format!("its column `seq` cannot be read: {error}"),
            Ok(seq) => format!("its sequence number {seq} is negative"),
        };
        return Err(Unreadable { seq: None, reason });
    };
    let record = row
        .try_get::<_, &[u8]>(1)
        .map_err(|error| unreadable("record", error))?;
    let mut entry = Entry::decode(seq, record).ok_or_else(|| Unreadable {
        seq: Some(seq),
        reason: "its record cannot be decoded".to_owned(),
    })?;
    let attempts = row
        .try_get::<_, i64>(2)
        .map_err(|error| unreadable("attempts", error))?;
    entry.attempts = u32::try_from(attempts.max(0)).unwrap_or(u32::MAX);
    entry.last_failure = row
        .try_get(3)
        .map_err(|error| unreadable("last_failure", error))?;
    entry.quarantined = row
        .try_get::<_, &str>(4)
        .map_err(|error| unreadable("state", error))?
        == "quarantined";
    Ok(entry)
}

/// The entries of a listing of `rows`, all in quarantine or all pending: a
/// row that cannot be read is listed as damaged, one whose sequence number
/// cannot be read is left out (the replay reports it).
fn listed(rows: &[Row], quarantined: bool) -> Vec<Entry> {
    rows.iter()
        .filter_map(|row| match decode(row) {
            Ok(entry) => Some(entry),
            Err(unreadable) => unreadable.seq.map(|seq| {
                let mut entry = Entry::damaged(seq);
                // Why it was quarantined, if that much can be read.
                if let Ok(Some(failure)) = row.try_get::<_, Option<String>>(3) {
                    entry.last_failure = Some(failure);
                }
                entry
            }),
        })
        .filter(|entry| entry.quarantined == quarantined)
        .collect()
}

/// A queue's notification channel: a digest of its name, so that one
/// listening on the database's channels does not learn the queues' names,
/// and is woken by its own queue only.
fn channel(queue: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(queue.as_bytes());
    let hex: String = digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{CHANNEL_PREFIX}{hex}")
}

/// A pseudo path naming the server, the database and the queue: what
/// events and errors show. The password stays out.
fn pseudo_path(target: &Target, queue: &str) -> PathBuf {
    PathBuf::from(format!("{target}?queue={queue}"))
}

/// A sequence number as PostgreSQL's bigint.
fn as_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A listing's limit as PostgreSQL's bigint.
fn as_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pseudo_path_names_server_database_and_queue_never_the_password() {
        let target = Target::parse("postgres://sender:hunter2@127.0.0.1:5544/billing").unwrap();
        let path = pseudo_path(&target, "webhooks");
        assert_eq!(
            path,
            Path::new("postgres://sender@127.0.0.1:5544/billing?queue=webhooks")
        );
        assert!(!path.display().to_string().contains("hunter2"));
    }

    #[test]
    fn sequence_numbers_and_limits_saturate_into_bigint() {
        assert_eq!(as_seq(u64::MAX), i64::MAX);
        assert_eq!(as_limit(usize::MAX), i64::MAX);
        assert_eq!(as_seq(42), 42);
    }

    #[tokio::test]
    async fn a_url_that_cannot_be_parsed_is_refused_without_a_connection() {
        let error = PostgresStore::connect("postgres://[::1", "q")
            .await
            .err()
            .unwrap();
        assert!(error.is_invalid());
    }
}
