//! The PostgreSQL store: one queue in a database shared by every process
//! that connects to it, claims held as leases. [`PostgresStore`] is the
//! store, and implements [`Store`] for the outbox.
//!
//! By file: `schema` (the tables, created or migrated on connect),
//! `connection` (the one bounded connection, its prepared statements and
//! its errors), `lease` (claims as leases: taken, fenced, renewed,
//! released), `writer` (inserts and removals batched into one statement
//! each), `notify` (the queue's channel and its listener), `rows` (reading
//! rows column by column, listings), `destinations` (each origin's records
//! and shared state: the lanes of the replay).

mod connection;
mod destinations;
mod lease;
mod notify;
mod rows;
mod schema;
#[cfg(test)]
mod test_server;
mod writer;

use std::{
    collections::{HashMap, HashSet},
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
use tokio_postgres::Transaction;

use connection::{connect_error, open, Connection, ANSWER_BOUND};
use destinations::Seen;
use lease::{upkeep, DEFAULT_LEASE, LONGEST_POLL};
use notify::{channel, listen};
use rows::{as_limit, as_seq, listed, COLUMNS};
use schema::create_schema;
use writer::{write_loop, Write};

use super::{Answer, BoxFuture, Inserted, LaneEvent, LaneState, Store};
use crate::outbox::Destination;
use crate::{
    origin::{has_user_info, origin_key},
    outbox::{record::Tag, Entry, OutboxError},
    postgres::Target,
    sync::lock,
};

/// The store on one queue of a PostgreSQL database, and the keys being sent
/// from this process.
pub(super) struct PostgresStore {
    shared: Arc<Shared>,
    writes: mpsc::UnboundedSender<Write>,
    /// Keys being sent here, with the record leased for each, once known.
    claimed: Mutex<HashMap<String, Option<u64>>>,
    /// What this store last read of each destination's state.
    seen: Mutex<HashMap<String, Seen>>,
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
    /// The destinations whose probe is held here: renewed with the leases,
    /// so that a probe slower than a lease stays the only one.
    probes: Mutex<HashSet<String>>,
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
            probes: Mutex::new(HashSet::new()),
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
            seen: Mutex::new(HashMap::new()),
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
}

impl Store for PostgresStore {
    fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Read on a thread of its own, with a connection of its own: the
    /// caller may be a task of a runtime this must not block on.
    fn pending(&self, cap: usize) -> Result<Vec<Entry>, OutboxError> {
        let entries = self.list_apart("pending", cap)?;
        if entries.len() < cap {
            self.shared
                .pending
                .store(entries.len() as u64, Ordering::Relaxed);
        }
        Ok(entries)
    }

    fn quarantined(&self, cap: usize) -> Result<Vec<Entry>, OutboxError> {
        self.list_apart("quarantined", cap)
    }

    /// Up to `limit` records after `after`, quarantined or pending, leased
    /// or not, on the store's connection.
    fn page(&self, quarantined: bool, after: u64, limit: usize) -> Answer<'_, Vec<Entry>> {
        Box::pin(async move {
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
        })
    }

    fn pending_count(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    fn requeue<'a>(&'a self, key: &'a str) -> Answer<'a, bool> {
        Box::pin(async move {
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
        })
    }

    fn discard<'a>(&'a self, key: &'a str) -> Answer<'a, bool> {
        Box::pin(async move {
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
        })
    }

    /// Every process connected to the queue.
    fn is_shared(&self) -> bool {
        true
    }

    fn hold_for(&self, lease: Option<Duration>, replay_interval: Duration) {
        if let Some(lease) = lease {
            self.shared.lease_ms.store(millis(lease), Ordering::Relaxed);
        }
        self.shared
            .replay_interval_ms
            .store(millis(replay_interval), Ordering::Relaxed);
    }

    /// Claims in this process a key about to be inserted: no round trip,
    /// as the insert stores the record leased here, or answers `Taken` if
    /// one is stored under the key (leased or not), which is then not sent.
    fn claim_new(&self, key: &str) -> bool {
        let mut claimed = lock(&self.claimed);
        if claimed.contains_key(key) {
            return false;
        }
        claimed.insert(key.to_owned(), None);
        true
    }

    fn release(&self, key: &str, settled: bool) {
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

    fn claimed(&self) -> usize {
        lock(&self.claimed).len()
    }

    fn insert(&self, entry: Entry) -> Answer<'_, Inserted> {
        Box::pin(async move {
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
        })
    }

    fn complete(&self, seq: u64) -> Answer<'_, bool> {
        Box::pin(async move {
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
        })
    }

    fn record_failure(&self, seq: u64, attempts: u32, failure: String) -> Answer<'_, bool> {
        Box::pin(async move {
            self.shared
                .fenced(
                    "UPDATE terminal_retry_outbox
                     SET attempts = LEAST(attempts + $5, 4294967295), last_failure = $6",
                    seq,
                    &[&i64::from(attempts), &failure],
                )
                .await
        })
    }

    fn replace(&self, seq: u64, entry: Entry) -> Answer<'_, bool> {
        Box::pin(async move {
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
        })
    }

    fn quarantine(&self, seq: u64, failure: String) -> Answer<'_, bool> {
        Box::pin(async move {
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
        })
    }

    fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    fn recover(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
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
        })
    }

    fn requeued(&self) -> Arc<Notify> {
        self.shared.requeued.clone()
    }

    fn lanes<'a>(
        &'a self,
        origins: &'a [String],
        cap: usize,
    ) -> Answer<'a, Vec<(String, LaneState)>> {
        Box::pin(PostgresStore::lanes(self, origins, cap))
    }

    fn claim_lane<'a>(&'a self, origin: &'a str, limit: usize) -> Answer<'a, Vec<Entry>> {
        Box::pin(PostgresStore::claim_lane(self, origin, limit))
    }

    fn note<'a>(&'a self, origin: &'a str, event: LaneEvent) -> Answer<'a, LaneState> {
        Box::pin(PostgresStore::note(self, origin, event))
    }

    fn take_probe<'a>(&'a self, origin: &'a str) -> Answer<'a, bool> {
        Box::pin(PostgresStore::take_probe(self, origin))
    }

    fn return_probe<'a>(&'a self, origin: &'a str) -> Answer<'a, ()> {
        Box::pin(PostgresStore::return_probe(self, origin))
    }

    fn give_up<'a>(&'a self, origin: &'a str, failure: &'a str) -> Answer<'a, u64> {
        Box::pin(PostgresStore::give_up(self, origin, failure))
    }

    fn destinations(&self) -> Answer<'_, Vec<Destination>> {
        Box::pin(PostgresStore::destinations(self))
    }

    fn as_postgres(&self) -> Option<&PostgresStore> {
        Some(self)
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
}

/// A pseudo path naming the server, the database and the queue: what
/// events and errors show. The password stays out.
fn pseudo_path(target: &Target, queue: &str) -> PathBuf {
    PathBuf::from(format!("{target}?queue={queue}"))
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

    #[tokio::test]
    async fn a_url_that_cannot_be_parsed_is_refused_without_a_connection() {
        let error = PostgresStore::connect("postgres://[::1", "q")
            .await
            .err()
            .unwrap();
        assert_eq!(error.kind(), crate::outbox::OutboxErrorKind::Invalid);
    }
}
