//! The writer: one task that commits every write waiting in one redb
//! transaction (group commit), on the blocking pool, and recovers from a
//! commit that failed; and what the store shares with it.

use std::{
    collections::HashSet,
    io,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, SystemTime},
};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, StorageError};
use tokio::{
    sync::{mpsc, oneshot, Notify},
    time::Instant,
};

use super::{
    file_safety::{reopen_file, FileId},
    schema::{open_database_caught, unix_millis, DOWN, KEYS, META, PENDING, QUARANTINED},
};
use crate::{
    outbox::{record::damaged_key, store::Inserted, Entry, OutboxError},
    sync::lock,
};

/// In `META`: when the store last recovered from a failed commit. Writing it
/// is the small commit that tells whether the file can be written again.
const RECOVERED_AT: &str = "recovered_at";

/// The most writes committed together.
const MAX_BATCH: usize = 4096;
/// The wait before the first recovery a write makes after a failed commit;
/// doubled after each failed recovery, up to the longest. A recovery may
/// reopen the file, which reads all of it.
const FIRST_RECOVERY_DELAY: Duration = Duration::from_millis(250);
const LONGEST_RECOVERY_DELAY: Duration = Duration::from_secs(5);

/// The most commits in a row left unflushed. redb reuses the pages a commit
/// frees only once a durable commit no longer needs them: an endless run of
/// unflushed removals (the replay of a large backlog) would grow the file
/// with every batch.
const MAX_UNFLUSHED: u32 = 16;

/// What the store and its writer share.
pub(super) struct Shared {
    /// Absolute: a later change of the current directory does not move it.
    pub(super) path: PathBuf,
    /// The file opened, told apart from one put at the path later.
    pub(super) file: FileId,
    /// `None` between closing a database that failed and reopening it.
    pub(super) db: Mutex<Option<Arc<Database>>>,
    pub(super) jobs: mpsc::UnboundedSender<Job>,
    /// Pending records after the last commit, for events and metrics.
    pub(super) pending: AtomicU64,
    /// Wakes whoever replays the outbox: a record became pending again.
    pub(super) requeued: Arc<Notify>,
    /// Whether the last commit succeeded.
    pub(super) writable: AtomicBool,
}

/// A change to a stored record.
#[derive(Debug)]
pub(super) enum Change {
    /// Removes a delivered record.
    Complete { seq: u64 },
    /// Counts failed attempts.
    Failed {
        seq: u64,
        attempts: u32,
        failure: String,
    },
    /// Retires the record and stores `entry` in its place, same key and
    /// position.
    Replace { seq: u64, entry: Box<Entry> },
    /// Moves the record to quarantine.
    Quarantine { seq: u64, failure: String },
    /// Moves a quarantined record back to pending.
    Requeue { key: String },
    /// Removes a record, pending or quarantined.
    Discard { key: String },
    /// Moves a pending record that cannot be decoded to quarantine, as it is.
    Damaged { seq: u64 },
    /// Keeps that a destination is down: since when, in milliseconds since
    /// the Unix epoch, and its last failure.
    Down {
        origin: String,
        since_ms: u64,
        failure: String,
    },
    /// Forgets that a destination was down.
    Up { origin: String },
    /// Forgets every destination down but `origins`.
    DownOnly { origins: HashSet<String> },
}

impl Change {
    /// Whether the change must be on disk when its commit returns: a lost
    /// removal or failure count only replays a request the server takes as
    /// a no-op; a lost destination state only restarts its count.
    fn needs_flush(&self) -> bool {
        !matches!(
            self,
            Change::Complete { .. }
                | Change::Failed { .. }
                | Change::Down { .. }
                | Change::Up { .. }
                | Change::DownOnly { .. }
        )
    }
}

/// Where a write's answer goes, and the answer, once its commit is known:
/// until it is applied, that it was not committed.
pub(super) struct Reply<T> {
    to: oneshot::Sender<Result<T, OutboxError>>,
    answer: Result<T, OutboxError>,
}

impl<T> Reply<T> {
    pub(super) fn new(path: &Path) -> (Reply<T>, oneshot::Receiver<Result<T, OutboxError>>) {
        let (to, receiver) = oneshot::channel();
        let answer = Err(OutboxError::closed(path));
        (Reply { to, answer }, receiver)
    }

    /// Sends the answer, or `failed`: the commit's error.
    fn send(self, failed: Option<&OutboxError>) {
        let answer = match failed {
            Some(error) => Err(error.clone()),
            None => self.answer,
        };
        let _ = self.to.send(answer);
    }
}

/// What the writer is asked to do.
pub(super) enum Job {
    Write(Write),
    /// Make the file writable again now, if it is not; answers whether it is.
    Recover(oneshot::Sender<bool>),
}

/// A write, with where its answer goes.
pub(super) enum Write {
    Insert(Box<Entry>, Reply<Inserted>),
    Change(Change, Reply<bool>),
}

impl Shared {
    /// Sends `job` to the writer and waits for its `answer`.
    pub(super) async fn ask<T>(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<T, OutboxError>>,
    ) -> Result<T, OutboxError> {
        if self.jobs.send(job).is_err() {
            return Err(OutboxError::closed(&self.path));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(OutboxError::closed(&self.path)))
    }

    /// The open database, if there is one.
    pub(super) fn database(&self) -> Option<Arc<Database>> {
        lock(&self.db).clone()
    }

    /// Closes the database, which a failed commit left refusing every
    /// access, and opens the file again, if it is still the one opened
    /// first.
    pub(super) fn reopen(&self) -> Result<Arc<Database>, OutboxError> {
        // The old database holds the file's lock until it is gone. A read
        // holding it a moment longer makes the open below fail as locked:
        // the next recovery tries again.
        let failed = lock(&self.db).take();
        drop(failed);
        let file = reopen_file(&self.path, self.file, true)?;
        let database = Arc::new(open_database_caught(&self.path, file, self.file, true)?);
        *lock(&self.db) = Some(database.clone());
        Ok(database)
    }

    /// An error unless the file at the path is still the one opened.
    pub(super) fn check_file(&self) -> Result<(), OutboxError> {
        match std::fs::metadata(&self.path) {
            Ok(metadata) if FileId::of(&metadata) == self.file => Ok(()),
            Ok(_) => Err(OutboxError::replaced(&self.path)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Err(OutboxError::replaced(&self.path))
            }
            Err(error) => Err(OutboxError::io(&self.path, error)),
        }
    }
}
/// Where the writer stands with the file.
enum Health {
    Writable,
    /// The last commit failed with `error`: writes fail with it at once,
    /// until a recovery (asked for, or made by a write at `retry_at`)
    /// succeeds, `delay` after the last one failed.
    Broken {
        error: OutboxError,
        retry_at: Instant,
        /// The wait before that recovery: doubled after each failed one.
        delay: Duration,
    },
}

impl Health {
    /// After a commit that failed with `error`: broken, the next recovery
    /// further off than the last.
    fn failed(self, error: OutboxError) -> Health {
        let delay = match self {
            Health::Writable => FIRST_RECOVERY_DELAY,
            Health::Broken { delay, .. } => delay.saturating_mul(2).min(LONGEST_RECOVERY_DELAY),
        };
        Health::Broken {
            error,
            retry_at: Instant::now() + delay,
            delay,
        }
    }
}

impl Write {
    /// Whether the write must be on disk when its commit returns.
    fn needs_flush(&self) -> bool {
        match self {
            Write::Insert(..) => true,
            Write::Change(change, _) => change.needs_flush(),
        }
    }

    /// Answers the write: what it did, or `failed`, the commit's error.
    fn answer(self, failed: Option<&OutboxError>) {
        match self {
            Write::Insert(_, reply) => reply.send(failed),
            Write::Change(_, reply) => reply.send(failed),
        }
    }
}

/// The writer: takes every job waiting, commits the writes in one
/// transaction on the blocking pool, answers each; ends when every handle is
/// gone.
pub(super) async fn write_loop(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut next_seq: u64,
    store: Weak<Shared>,
) {
    // Commits since the last flushed one.
    let mut unflushed = 0;
    let mut health = Health::Writable;
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            return;
        };
        let mut writes = Vec::with_capacity(batch.len());
        let mut recoveries = Vec::new();
        for job in batch {
            match job {
                Job::Write(write) => writes.push(write),
                Job::Recover(recovered) => recoveries.push(recovered),
            }
        }
        let recovering = match &health {
            Health::Writable => false,
            Health::Broken {
                error, retry_at, ..
            } => {
                if recoveries.is_empty() && Instant::now() < *retry_at {
                    // Backing off: the disk is left alone.
                    for write in writes {
                        write.answer(Some(error));
                    }
                    continue;
                }
                true
            }
        };
        if writes.is_empty() && !recovering {
            answer_recoveries(recoveries, true);
            continue;
        }
        let flush =
            recovering || unflushed >= MAX_UNFLUSHED || writes.iter().any(Write::needs_flush);
        unflushed = if flush { 0 } else { unflushed + 1 };
        let committing = store.clone();
        let seq = next_seq;
        let committed = tokio::task::spawn_blocking(move || {
            let mut writes = writes;
            let mut next_seq = seq;
            let commit = || commit_to(&committing, &mut writes, flush, recovering, &mut next_seq);
            let result = catch_unwind(AssertUnwindSafe(commit)).unwrap_or_else(|_| {
                let panicked = io::Error::other("the commit panicked");
                Err(OutboxError::io(&committing.path, panicked))
            });
            (writes, result, next_seq)
        })
        .await;
        // Cancelled: the runtime is shutting down, and the writes' answers
        // are gone with the task (a dropped answer reads as closed).
        let Ok((writes, result, seq)) = committed else {
            return;
        };
        next_seq = seq;
        match result {
            Ok(pending) => {
                if recovering {
                    tracing::info!(path = %store.path.display(), "outbox can be written again");
                }
                health = Health::Writable;
                store.writable.store(true, Ordering::Release);
                store.pending.store(pending, Ordering::Relaxed);
                for write in writes {
                    if let Write::Change(
                        Change::Damaged { seq },
                        Reply {
                            answer: Ok(true), ..
                        },
                    ) = &write
                    {
                        tracing::error!(
                            path = %store.path.display(),
                            seq,
                            key = damaged_key(*seq),
                            "outbox record cannot be decoded: quarantined as damaged, the \
                             records after it go on"
                        );
                    }
                    write.answer(None);
                }
                answer_recoveries(recoveries, true);
            }
            Err(error) => {
                if matches!(health, Health::Writable) {
                    tracing::error!(
                        path = %store.path.display(),
                        error = %error,
                        "outbox cannot be written: writes fail until it can again"
                    );
                }
                store.writable.store(false, Ordering::Release);
                for write in writes {
                    write.answer(Some(&error));
                }
                answer_recoveries(recoveries, false);
                health = health.failed(error);
            }
        }
    }
}

fn answer_recoveries(recoveries: Vec<oneshot::Sender<bool>>, writable: bool) {
    for recovered in recoveries {
        let _ = recovered.send(writable);
    }
}

/// Commits `writes` to the store's database, reopening it first if a
/// recovery finds it refusing every access after a failed commit; an error
/// too if the file at the path is no longer the one opened. Each write's
/// answer is set; returns how many records are pending after the commit.
fn commit_to(
    store: &Shared,
    writes: &mut [Write],
    flush: bool,
    recovering: bool,
    next_seq: &mut u64,
) -> Result<u64, OutboxError> {
    let io = |error: redb::Error| OutboxError::io(&store.path, error);
    let database = match store.database() {
        Some(database) => database,
        None => store.reopen()?,
    };
    let first_seq = *next_seq;
    let result = match commit(store, &database, writes, flush, recovering, next_seq) {
        Err(redb::Error::PreviousIo | redb::Error::DatabaseClosed) if recovering => {
            drop(database);
            let database = store.reopen()?;
            *next_seq = first_seq;
            commit(store, &database, writes, flush, recovering, next_seq)
        }
        result => result,
    }
    .map_err(io)?;
    store.check_file()?;
    Ok(result)
}

/// Applies `writes` in one transaction, flushed to disk if `flush`, with
/// the time of a recovery if `recovering`; sets what each did (or that its
/// record could not be encoded) and returns how many records are pending
/// after it.
fn commit(
    store: &Shared,
    database: &Database,
    writes: &mut [Write],
    flush: bool,
    recovering: bool,
    next_seq: &mut u64,
) -> Result<u64, redb::Error> {
    let mut transaction = database.begin_write()?;
    if !flush {
        transaction.set_durability(Durability::None)?;
    }
    let pending_count;
    {
        if recovering {
            let millis = unix_millis(SystemTime::now());
            transaction.open_table(META)?.insert(RECOVERED_AT, millis)?;
        }
        let mut tables = Tables {
            pending: transaction.open_table(PENDING)?,
            quarantined: transaction.open_table(QUARANTINED)?,
            keys: transaction.open_table(KEYS)?,
            down: transaction.open_table(DOWN)?,
        };
        let unencodable = |error: postcard::Error| OutboxError::unencodable(&store.path, error);
        for write in writes.iter_mut() {
            match write {
                Write::Insert(entry, reply) => {
                    reply.answer = match tables.insert(entry, next_seq) {
                        Ok(inserted) => Ok(inserted),
                        Err(Refused::Unencodable(error)) => Err(unencodable(error)),
                        Err(Refused::Storage(error)) => return Err(error.into()),
                    };
                }
                Write::Change(change, reply) => {
                    reply.answer = match tables.change(change) {
                        Ok(changed) => Ok(changed),
                        Err(Refused::Unencodable(error)) => Err(unencodable(error)),
                        Err(Refused::Storage(error)) => return Err(error.into()),
                    };
                }
            }
        }
        pending_count = tables.pending.len()?;
    }
    transaction.commit()?;
    Ok(pending_count)
}

/// Why a write was not applied: the file failed (the whole commit fails), or
/// its record cannot be encoded (that write alone fails, having changed
/// nothing).
enum Refused {
    Storage(StorageError),
    Unencodable(postcard::Error),
}

impl From<StorageError> for Refused {
    fn from(error: StorageError) -> Self {
        Refused::Storage(error)
    }
}

impl From<postcard::Error> for Refused {
    fn from(error: postcard::Error) -> Self {
        Refused::Unencodable(error)
    }
}

type Records<'txn> = redb::Table<'txn, u64, &'static [u8]>;

/// The tables of one write transaction. Every record is encoded before
/// anything changes: one that cannot be leaves the tables as they were.
struct Tables<'txn> {
    pending: Records<'txn>,
    quarantined: Records<'txn>,
    keys: redb::Table<'txn, &'static str, u64>,
    down: redb::Table<'txn, &'static str, (u64, &'static str)>,
}

impl Tables<'_> {
    fn insert(&mut self, entry: &Entry, next_seq: &mut u64) -> Result<Inserted, Refused> {
        if let Some(seq) = self.keys.get(entry.key.as_str())?.map(|seq| seq.value()) {
            if self.pending.get(seq)?.is_some() || self.quarantined.get(seq)?.is_some() {
                return Ok(Inserted::Taken);
            }
        }
        let record = entry.encode()?;
        let seq = *next_seq;
        *next_seq += 1;
        self.pending.insert(seq, record.as_slice())?;
        self.keys.insert(entry.key.as_str(), seq)?;
        Ok(Inserted::Stored(seq))
    }

    /// Applies `change`; whether its record was there to change.
    fn change(&mut self, change: &Change) -> Result<bool, Refused> {
        Ok(match change {
            Change::Complete { seq } => match self.pending.remove(*seq)? {
                Some(bytes) => {
                    let key = Entry::decode(*seq, bytes.value()).map(|entry| entry.key);
                    drop(bytes);
                    if let Some(key) = key {
                        self.keys.remove(key.as_str())?;
                    }
                    true
                }
                None => false,
            },
            Change::Failed {
                seq,
                attempts,
                failure,
            } => match stored(&self.pending, *seq)? {
                Some(mut entry) => {
                    entry.failed(*attempts, failure);
                    self.pending.insert(*seq, entry.encode()?.as_slice())?;
                    true
                }
                None => false,
            },
            Change::Replace { seq, entry } => match stored(&self.pending, *seq)? {
                Some(_) => {
                    self.pending.insert(*seq, entry.encode()?.as_slice())?;
                    true
                }
                None => false,
            },
            Change::Quarantine { seq, failure } => match stored(&self.pending, *seq)? {
                Some(mut entry) => {
                    entry.quarantine(failure);
                    let record = entry.encode()?;
                    self.pending.remove(*seq)?;
                    self.quarantined.insert(*seq, record.as_slice())?;
                    true
                }
                None => false,
            },
            Change::Requeue { key } => {
                let seq = self.keys.get(key.as_str())?.map(|seq| seq.value());
                match seq
                    .map(|seq| stored(&self.quarantined, seq))
                    .transpose()?
                    .flatten()
                {
                    Some(mut entry) => {
                        entry.requeue();
                        let record = entry.encode()?;
                        self.quarantined.remove(entry.seq)?;
                        self.pending.insert(entry.seq, record.as_slice())?;
                        true
                    }
                    None => false,
                }
            }
            Change::Discard { key } => {
                let seq = match self.keys.remove(key.as_str())? {
                    Some(seq) => Some(seq.value()),
                    None => damaged_seq(&self.quarantined, key)?,
                };
                match seq {
                    Some(seq) => {
                        self.pending.remove(seq)?.is_some()
                            | self.quarantined.remove(seq)?.is_some()
                    }
                    None => false,
                }
            }
            Change::Damaged { seq } => {
                let record = self.pending.get(*seq)?.map(|bytes| bytes.value().to_vec());
                match record {
                    Some(record) if Entry::decode(*seq, &record).is_none() => {
                        self.pending.remove(*seq)?;
                        self.quarantined.insert(*seq, record.as_slice())?;
                        // Its key cannot be read: the key that points to it
                        // is freed (a scan, rare), so a new request under it
                        // is stored.
                        self.keys.retain(|_, stored| stored != *seq)?;
                        true
                    }
                    _ => false,
                }
            }
            Change::Down {
                origin,
                since_ms,
                failure,
            } => {
                self.down
                    .insert(origin.as_str(), (*since_ms, failure.as_str()))?;
                true
            }
            Change::Up { origin } => self.down.remove(origin.as_str())?.is_some(),
            Change::DownOnly { origins } => {
                self.down.retain(|origin, _| origins.contains(origin))?;
                true
            }
        })
    }
}

/// The record stored as `seq` in `table`, if it is there and can be read.
fn stored(table: &Records<'_>, seq: u64) -> Result<Option<Entry>, StorageError> {
    Ok(table
        .get(seq)?
        .and_then(|bytes| Entry::decode(seq, bytes.value())))
}

/// The sequence number of the damaged quarantined record listed as `key`,
/// if there is one.
fn damaged_seq(quarantined: &Records<'_>, key: &str) -> Result<Option<u64>, StorageError> {
    let Some(seq) = key
        .strip_prefix("damaged-")
        .and_then(|seq| seq.parse::<u64>().ok())
        .filter(|seq| damaged_key(*seq) == key)
    else {
        return Ok(None);
    };
    let damaged = quarantined
        .get(seq)?
        .is_some_and(|bytes| Entry::decode(seq, bytes.value()).is_none());
    Ok(damaged.then_some(seq))
}
