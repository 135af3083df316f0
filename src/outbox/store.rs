//! The store: one redb file, written by one thread that commits every write
//! waiting in one transaction (group commit).

use std::{
    fmt,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Weak,
    },
    time::{Duration, SystemTime},
};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle,
};
use tokio::sync::{mpsc, oneshot, Notify};

use super::{Entry, OutboxError};

/// Pending records by sequence number: the order they were first stored.
const PENDING: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("pending");
/// Quarantined records, by the sequence number they were stored under.
const QUARANTINED: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("quarantined");
/// Each stored key to its sequence number: one record per key.
const KEYS: TableDefinition<'_, &str, u64> = TableDefinition::new("keys");
/// `format` to the format of the file: what makes a redb file an outbox.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("outbox_meta");
const FORMAT: u64 = 1;

/// The most writes committed together.
const MAX_BATCH: usize = 4096;
/// redb's page cache: the records live on disk, not in memory.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// A durable store of idempotent requests, one per key, in a single file: see
/// the [module docs](super).
///
/// Cloning is cheap: clones share the file. The file is locked while any
/// clone lives (or a commit is under way): a second `Outbox` on the same
/// file, in this process or another, is an error.
///
/// Commits run on tokio's blocking pool, one batch at a time, so that the
/// caller's tasks never wait on the disk.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<Store>,
}

struct Store {
    path: PathBuf,
    db: Arc<Database>,
    jobs: mpsc::UnboundedSender<Job>,
    /// Pending records after the last commit, for events and metrics.
    pending: AtomicU64,
    /// Wakes whoever replays the outbox: a record became pending again.
    requeued: Arc<Notify>,
}

/// A write, sent to the writer.
#[derive(Debug)]
pub(super) enum Write {
    /// Stores a new record, unless its key is taken.
    Insert(Entry),
    /// Removes a delivered record. Need not be flushed at once: a lost
    /// removal only replays a request the server takes as a no-op.
    Delivered { seq: u64 },
    /// Counts failed attempts. Need not be flushed at once either.
    Failed {
        seq: u64,
        attempts: u32,
        failure: String,
    },
    /// Retires the record and stores `entry` in its place, same key and
    /// position.
    Replace { seq: u64, entry: Entry },
    /// Moves the record to quarantine.
    Quarantine { seq: u64, failure: String },
    /// Moves a quarantined record back to pending.
    Requeue { key: String },
    /// Removes a record, pending or quarantined.
    Discard { key: String },
}

/// The most commits in a row left unflushed. redb reuses the pages a commit
/// frees only once a durable commit no longer needs them: an endless run of
/// unflushed removals (the replay of a large backlog) would grow the file
/// with every batch.
const MAX_UNFLUSHED: u32 = 16;

impl Write {
    /// Whether the write must be on disk when its commit returns.
    fn needs_flush(&self) -> bool {
        !matches!(self, Write::Delivered { .. } | Write::Failed { .. })
    }
}

/// What a write did.
#[derive(Debug)]
pub(super) enum Written {
    /// Stored under this sequence number.
    Inserted(u64),
    /// The key was taken: the record stored under it stands.
    Existing,
    /// Whether the record was there to change.
    Changed(bool),
}

struct Job {
    write: Write,
    done: oneshot::Sender<Result<Written, OutboxError>>,
}

impl Outbox {
    /// Opens the outbox at `path`, creating it if it does not exist (or is
    /// empty), and starts its writer on the current tokio runtime.
    ///
    /// A file left by a crash is recovered: every commit made before the
    /// crash is there.
    ///
    /// # Errors
    ///
    /// The file is held by another live outbox (in this process or another);
    /// it is not an outbox (garbage, truncated, corrupted, another redb
    /// database), in which case it is left exactly as it was; it cannot be
    /// read or created; or there is no tokio runtime. The error names the
    /// path.
    pub fn open(path: impl Into<PathBuf>) -> Result<Outbox, OutboxError> {
        let path = path.into();
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| {
            OutboxError::io(
                &path,
                format!("an outbox is opened inside a tokio runtime: {error}"),
            )
        })?;
        // Damaged files have made database opens panic: that is an error here.
        let opened = catch_unwind(AssertUnwindSafe(|| open_database(&path)));
        let db = opened.unwrap_or_else(|_| Err(OutboxError::invalid(&path, "unreadable file")))?;
        let db = Arc::new(db);
        let next_seq = last_seq(&db).map_err(|error| OutboxError::io(&path, error))? + 1;
        let pending = count_pending(&db).map_err(|error| OutboxError::io(&path, error))?;
        let (jobs, receiver) = mpsc::unbounded_channel();
        let store = Arc::new(Store {
            path: path.clone(),
            db: db.clone(),
            jobs,
            pending: AtomicU64::new(pending),
            requeued: Arc::new(Notify::new()),
        });
        // The writer holds the database weakly: the file is unlocked as soon
        // as the last handle is gone, but for a commit under way.
        runtime.spawn(write_loop(
            Arc::downgrade(&db),
            receiver,
            next_seq,
            Arc::downgrade(&store),
        ));
        Ok(Outbox { store })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.store.path
    }

    /// The pending records, oldest first.
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn pending(&self) -> Result<Vec<Entry>, OutboxError> {
        self.read(PENDING, 0, usize::MAX)
    }

    /// The quarantined records: refused for good by the server, kept, not
    /// retried, oldest first.
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn quarantined(&self) -> Result<Vec<Entry>, OutboxError> {
        self.read(QUARANTINED, 0, usize::MAX)
    }

    /// How many records are pending, as of the last commit.
    pub fn pending_count(&self) -> u64 {
        self.store.pending.load(Ordering::Relaxed)
    }

    /// Moves the quarantined record under `key` back to pending, to be
    /// delivered again. `false` when no record under `key` is quarantined.
    ///
    /// # Errors
    ///
    /// The write could not be committed.
    pub async fn requeue(&self, key: &str) -> Result<bool, OutboxError> {
        let written = self.write(Write::Requeue { key: key.into() }).await?;
        let requeued = matches!(written, Written::Changed(true));
        if requeued {
            self.store.requeued.notify_one();
        }
        Ok(requeued)
    }

    /// Deletes the record under `key`, pending or quarantined, for good.
    /// `false` when there is none.
    ///
    /// # Errors
    ///
    /// The write could not be committed.
    pub async fn discard(&self, key: &str) -> Result<bool, OutboxError> {
        let written = self.write(Write::Discard { key: key.into() }).await?;
        Ok(matches!(written, Written::Changed(true)))
    }

    /// Up to `limit` pending records after sequence number `after`, oldest
    /// first.
    pub(super) fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
        self.read(PENDING, after + 1, limit)
    }

    /// The pending record stored as `seq`, if it still is: read again by a
    /// replay after it claimed the record, so that one delivered or changed
    /// meanwhile is not sent again.
    pub(super) fn get(&self, seq: u64) -> Result<Option<Entry>, OutboxError> {
        Ok(self
            .read(PENDING, seq, 1)?
            .into_iter()
            .find(|entry| entry.seq == seq))
    }

    /// Whether the last commit succeeded: while it did not, nothing that
    /// needs recording (a delivery) should be attempted.
    pub(super) fn is_writable(&self) -> bool {
        true
    }

    /// Resolves once commits work again (at once while they do).
    pub(super) async fn writable(&self) {}

    /// What wakes the replay: records made pending again.
    pub(super) fn requeued(&self) -> Arc<Notify> {
        self.store.requeued.clone()
    }

    /// Commits `write` with whatever other writes wait, and says what it did.
    pub(super) async fn write(&self, write: Write) -> Result<Written, OutboxError> {
        let (done, result) = oneshot::channel();
        if self.store.jobs.send(Job { write, done }).is_err() {
            return Err(OutboxError::closed(&self.store.path));
        }
        result
            .await
            .unwrap_or_else(|_| Err(OutboxError::closed(&self.store.path)))
    }

    fn read(
        &self,
        table: TableDefinition<'_, u64, &[u8]>,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
        let io = |error: redb::Error| OutboxError::io(&self.store.path, error);
        let read = self
            .store
            .db
            .begin_read()
            .map_err(|error| io(error.into()))?;
        let table = read.open_table(table).map_err(|error| io(error.into()))?;
        let mut entries = Vec::new();
        for row in table.range(from..).map_err(|error| io(error.into()))? {
            if entries.len() >= limit {
                break;
            }
            let (seq, bytes) = row.map_err(|error| io(error.into()))?;
            match Entry::decode(seq.value(), bytes.value()) {
                Some(entry) => entries.push(entry),
                None => tracing::error!(
                    path = %self.store.path.display(),
                    seq = seq.value(),
                    "outbox record cannot be read; it is kept and skipped"
                ),
            }
        }
        Ok(entries)
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.store.path)
            .field("pending", &self.pending_count())
            .finish()
    }
}

/// Opens or creates the database and checks that it is an outbox, leaving a
/// file that is not one untouched.
fn open_database(path: &Path) -> Result<Database, OutboxError> {
    let exists = std::fs::metadata(path).is_ok_and(|metadata| metadata.len() > 0);
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    if exists {
        // A read-only look first: it writes nothing, whatever the file holds.
        match builder.open_read_only(path) {
            Ok(database) => {
                let format = read_format(&database)
                    .map_err(|error| OutboxError::invalid(path, error.to_string()))?;
                if format != Some(FORMAT) {
                    return Err(OutboxError::invalid(path, "a database, but not an outbox"));
                }
            }
            // Left by a crash: the read-write open below repairs it.
            Err(DatabaseError::RepairAborted) => {}
            Err(error) => return Err(open_error(path, error)),
        }
    }
    // Checks every page's checksum, so a damaged file is refused, not trusted.
    builder.set_check_integrity_on_open(true);
    let database = builder
        .create(path)
        .map_err(|error| open_error(path, error))?;
    initialize(&database, exists).map_err(|error| match error {
        InitError::Foreign => OutboxError::invalid(path, "a database, but not an outbox"),
        InitError::Storage(error) => OutboxError::io(path, error),
    })?;
    Ok(database)
}

fn open_error(path: &Path, error: DatabaseError) -> OutboxError {
    match error {
        DatabaseError::DatabaseAlreadyOpen => OutboxError::locked(path),
        DatabaseError::Storage(redb::StorageError::Io(error))
            if error.kind() != std::io::ErrorKind::InvalidData =>
        {
            OutboxError::io(path, error)
        }
        other => OutboxError::invalid(path, other.to_string()),
    }
}

fn read_format(database: &impl ReadableDatabase) -> Result<Option<u64>, redb::Error> {
    let read = database.begin_read()?;
    let meta = match read.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let format = meta.get("format")?.map(|format| format.value());
    Ok(format)
}

enum InitError {
    Foreign,
    Storage(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for InitError {
    fn from(error: E) -> Self {
        InitError::Storage(error.into())
    }
}

/// Creates the tables of a new outbox; checks an existing one's format (again:
/// a file repaired after a crash was not looked at before).
fn initialize(database: &Database, existed: bool) -> Result<(), InitError> {
    if existed {
        return match read_format(database)? {
            Some(FORMAT) => Ok(()),
            _ => Err(InitError::Foreign),
        };
    }
    let write = database.begin_write()?;
    if write
        .list_tables()?
        .any(|table| table.name() != META.name())
    {
        return Err(InitError::Foreign);
    }
    write.open_table(META)?.insert("format", FORMAT)?;
    write.open_table(PENDING)?;
    write.open_table(QUARANTINED)?;
    write.open_table(KEYS)?;
    write.commit()?;
    Ok(())
}

fn last_seq(database: &Database) -> Result<u64, redb::Error> {
    let read = database.begin_read()?;
    let mut last = 0;
    for table in [PENDING, QUARANTINED] {
        if let Some((seq, _)) = read.open_table(table)?.last()? {
            last = last.max(seq.value());
        }
    }
    Ok(last)
}

fn count_pending(database: &Database) -> Result<u64, redb::Error> {
    Ok(database.begin_read()?.open_table(PENDING)?.len()?)
}

/// The writer: takes every write waiting, commits them in one transaction on
/// the blocking pool, answers each; ends when every handle is gone.
async fn write_loop(
    database: Weak<Database>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut next_seq: u64,
    store: Weak<Store>,
) {
    // Commits since the last flushed one.
    let mut unflushed = 0;
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (Some(database), Some(path)) = (
            database.upgrade(),
            store.upgrade().map(|store| store.path.clone()),
        ) else {
            return;
        };
        let (done, writes): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|job| (job.done, job.write)).unzip();
        let seq = next_seq;
        let flush = unflushed >= MAX_UNFLUSHED || writes.iter().any(Write::needs_flush);
        unflushed = if flush { 0 } else { unflushed + 1 };
        let committed = tokio::task::spawn_blocking(move || {
            let mut next_seq = seq;
            let result = commit(&database, &writes, flush, &mut next_seq);
            (result, next_seq)
        })
        .await;
        let (result, seq) = match committed {
            Ok(committed) => committed,
            Err(error) => (Err(redb::Error::Io(std::io::Error::other(error))), next_seq),
        };
        next_seq = seq;
        match result {
            Ok((written, pending)) => {
                if let Some(store) = store.upgrade() {
                    store.pending.store(pending, Ordering::Relaxed);
                }
                for (done, written) in done.into_iter().zip(written) {
                    let _ = done.send(Ok(written));
                }
            }
            Err(error) => {
                let error = OutboxError::io(&path, error);
                for done in done {
                    let _ = done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Applies `writes` in one transaction, flushed to disk if `flush`; returns
/// what each did and how many records are pending after it.
fn commit(
    database: &Database,
    writes: &[Write],
    flush: bool,
    next_seq: &mut u64,
) -> Result<(Vec<Written>, u64), redb::Error> {
    let mut transaction = database.begin_write()?;
    if !flush {
        transaction.set_durability(Durability::None)?;
    }
    let mut written = Vec::with_capacity(writes.len());
    let pending_count;
    {
        let mut pending = transaction.open_table(PENDING)?;
        let mut quarantined = transaction.open_table(QUARANTINED)?;
        let mut keys = transaction.open_table(KEYS)?;
        for write in writes {
            written.push(apply(
                write,
                &mut pending,
                &mut quarantined,
                &mut keys,
                next_seq,
            )?);
        }
        pending_count = pending.len()?;
    }
    transaction.commit()?;
    Ok((written, pending_count))
}

type Records<'txn> = redb::Table<'txn, u64, &'static [u8]>;

fn apply(
    write: &Write,
    pending: &mut Records<'_>,
    quarantined: &mut Records<'_>,
    keys: &mut redb::Table<'_, &'static str, u64>,
    next_seq: &mut u64,
) -> Result<Written, redb::Error> {
    let stored = |table: &Records<'_>, seq: u64| -> Result<Option<Entry>, redb::Error> {
        Ok(table
            .get(seq)?
            .and_then(|bytes| Entry::decode(seq, bytes.value())))
    };
    Ok(match write {
        Write::Insert(entry) => {
            if let Some(seq) = keys.get(entry.key.as_str())?.map(|seq| seq.value()) {
                if pending.get(seq)?.is_some() || quarantined.get(seq)?.is_some() {
                    return Ok(Written::Existing);
                }
            }
            let seq = *next_seq;
            *next_seq += 1;
            pending.insert(
                seq,
                Entry {
                    seq,
                    ..entry.clone()
                }
                .encode()
                .as_slice(),
            )?;
            keys.insert(entry.key.as_str(), seq)?;
            Written::Inserted(seq)
        }
        Write::Delivered { seq } => match pending.remove(*seq)? {
            Some(bytes) => {
                let key = Entry::decode(*seq, bytes.value()).map(|entry| entry.key);
                drop(bytes);
                if let Some(key) = key {
                    keys.remove(key.as_str())?;
                }
                Written::Changed(true)
            }
            None => Written::Changed(false),
        },
        Write::Failed {
            seq,
            attempts,
            failure,
        } => match stored(pending, *seq)? {
            Some(mut entry) => {
                entry.attempts = entry.attempts.saturating_add(*attempts);
                entry.last_failure = Some(failure.clone());
                pending.insert(*seq, entry.encode().as_slice())?;
                Written::Changed(true)
            }
            None => Written::Changed(false),
        },
        Write::Replace { seq, entry } => match stored(pending, *seq)? {
            Some(old) => {
                let entry = Entry {
                    seq: *seq,
                    key: old.key,
                    stored_at: old.stored_at,
                    ..entry.clone()
                };
                pending.insert(*seq, entry.encode().as_slice())?;
                Written::Changed(true)
            }
            None => Written::Changed(false),
        },
        Write::Quarantine { seq, failure } => match stored(pending, *seq)? {
            Some(mut entry) => {
                pending.remove(*seq)?;
                entry.quarantined = true;
                entry.last_failure = Some(failure.clone());
                quarantined.insert(*seq, entry.encode().as_slice())?;
                Written::Changed(true)
            }
            None => Written::Changed(false),
        },
        Write::Requeue { key } => {
            let seq = keys.get(key.as_str())?.map(|seq| seq.value());
            match seq
                .map(|seq| stored(quarantined, seq))
                .transpose()?
                .flatten()
            {
                Some(mut entry) => {
                    quarantined.remove(entry.seq)?;
                    entry.quarantined = false;
                    pending.insert(entry.seq, entry.encode().as_slice())?;
                    Written::Changed(true)
                }
                None => Written::Changed(false),
            }
        }
        Write::Discard { key } => match keys.remove(key.as_str())?.map(|seq| seq.value()) {
            Some(seq) => {
                let removed = pending.remove(seq)?.is_some() | quarantined.remove(seq)?.is_some();
                Written::Changed(removed)
            }
            None => Written::Changed(false),
        },
    })
}

/// How long ago `at` was, for events; zero for a time in the future.
pub(super) fn age(at: SystemTime) -> Duration {
    SystemTime::now().duration_since(at).unwrap_or_default()
}
