//! The store: one redb file, written by one thread that commits every write
//! waiting in one transaction (group commit).

use std::{
    fmt,
    fs::{File, Metadata, OpenOptions},
    io,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redb::{
    backends::FileBackend, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, StorageError, TableDefinition, TableHandle,
};
use tokio::{
    sync::{mpsc, oneshot, Notify},
    time::Instant,
};

use super::{
    record::{damaged_key, TooLarge},
    Entry, OutboxError,
};
use crate::sync::lock;

/// Pending records by sequence number: the order they were first stored.
const PENDING: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("pending");
/// Quarantined records, by the sequence number they were stored under.
const QUARANTINED: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("quarantined");
/// Each stored key to its sequence number: one record per key.
const KEYS: TableDefinition<'_, &str, u64> = TableDefinition::new("keys");
/// `format` to the format of the file: what makes a redb file an outbox.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("outbox_meta");
const FORMAT: u64 = 1;
/// In `META`: when the store last recovered from a failed commit. Writing it
/// is the small commit that tells whether the file can be written again.
const RECOVERED_AT: &str = "recovered_at";

/// The most writes committed together.
const MAX_BATCH: usize = 4096;
/// redb's page cache: the records live on disk, not in memory.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// The wait before the first recovery a write makes after a failed commit;
/// doubled after each failed recovery, up to the longest. A recovery may
/// reopen the file, which reads all of it.
const FIRST_RECOVERY_DELAY: Duration = Duration::from_millis(250);
const LONGEST_RECOVERY_DELAY: Duration = Duration::from_secs(5);

/// A durable store of idempotent requests, one per key, in a single file: see
/// the [module docs](super).
///
/// Cloning is cheap: clones share the file. The file is locked while any
/// clone lives (or a commit is under way): a second `Outbox` on the same
/// file, in this process or another, is an error.
///
/// Commits run on tokio's blocking pool, one batch at a time, so that the
/// caller's tasks never wait on the disk. A commit that fails (a full disk,
/// a file-size limit, an I/O error) fails the writes after it at once, without
/// touching the disk, until one made after a growing pause succeeds: the file
/// is reopened if the database needs it, in the same process.
///
/// A stored record that cannot be decoded (damaged on disk) is moved to
/// quarantine as it is, with an `error` event naming its sequence number and
/// the file: the records after it are still replayed.
/// [`quarantined`](Outbox::quarantined) lists it under the key
/// `damaged-<seq>`, with an empty request and a
/// [`last_failure`](Entry::last_failure) saying it is damaged;
/// [`discard`](Outbox::discard) with that key deletes it.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<Store>,
}

struct Store {
    /// Absolute: a later change of the current directory does not move it.
    path: PathBuf,
    /// The file opened, told apart from one put at the path later.
    file: FileId,
    /// `None` between closing a database that failed and reopening it.
    db: Mutex<Option<Arc<Database>>>,
    jobs: mpsc::UnboundedSender<Job>,
    /// Pending records after the last commit, for events and metrics.
    pending: AtomicU64,
    /// Wakes whoever replays the outbox: a record became pending again.
    requeued: Arc<Notify>,
    /// Whether the last commit succeeded.
    writable: AtomicBool,
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
    /// Moves a pending record that cannot be decoded to quarantine, as it is.
    Damaged { seq: u64 },
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

/// What the writer is asked to do.
enum Job {
    /// Boxed: a write is large, a recovery small.
    Write {
        write: Box<Write>,
        done: oneshot::Sender<Result<Written, OutboxError>>,
    },
    /// Make the file writable again now, if it is not; answers whether it is.
    Recover(oneshot::Sender<bool>),
}

impl Outbox {
    /// Opens the outbox at `path`, creating it (and its folder) if it does not
    /// exist (or is empty), and starts its writer on the current tokio
    /// runtime.
    ///
    /// A relative `path` is made absolute once, here: a later change of the
    /// current directory does not move the outbox. On unix, a new file is
    /// created with mode 0600 (a new folder 0700), never through a symbolic
    /// link; an existing file must be a regular file (not a symbolic link),
    /// owned by the effective user of this process, and not writable by group
    /// or others. Should the file be replaced or removed while open, writes
    /// fail from then on ([`OutboxError::is_replaced`]): nothing is reported
    /// stored in a file that is no longer at the path.
    ///
    /// A file left by a crash is recovered: every commit made before the
    /// crash is there.
    ///
    /// # Errors
    ///
    /// The file is held by another live outbox (in this process or another);
    /// it is not an outbox (garbage, truncated, corrupted, another redb
    /// database), in which case it is left exactly as it was; it is not safe
    /// to keep requests in ([`OutboxError::is_unsafe`]), left as it was too;
    /// it cannot be read or created; or there is no tokio runtime. The error
    /// names the path.
    pub fn open(path: impl Into<PathBuf>) -> Result<Outbox, OutboxError> {
        let given = path.into();
        let path = std::path::absolute(&given).map_err(|error| OutboxError::io(&given, error))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| {
            OutboxError::io(
                &path,
                format!("an outbox is opened inside a tokio runtime: {error}"),
            )
        })?;
        let (file, id, existed) = open_file(&path)?;
        let db = Arc::new(open_database_caught(&path, file, id, existed)?);
        let next_seq = last_seq(&db).map_err(|error| OutboxError::io(&path, error))? + 1;
        let pending = count_pending(&db).map_err(|error| OutboxError::io(&path, error))?;
        let (jobs, receiver) = mpsc::unbounded_channel();
        let store = Arc::new(Store {
            path,
            file: id,
            db: Mutex::new(Some(db)),
            jobs,
            pending: AtomicU64::new(pending),
            requeued: Arc::new(Notify::new()),
            writable: AtomicBool::new(true),
        });
        // The writer holds the store weakly: the file is unlocked as soon as
        // the last handle is gone, but for a commit under way.
        runtime.spawn(write_loop(receiver, next_seq, Arc::downgrade(&store)));
        Ok(Outbox { store })
    }

    /// The file, as an absolute path.
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
    /// retried, oldest first. A record that cannot be decoded is listed as
    /// `damaged-<seq>` (see [`Outbox`]).
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
        self.store.writable.load(Ordering::Acquire)
    }

    /// Tries now to make the file writable again, if it is not: reopens the
    /// database if it needs it, then commits a small write. Whether the file
    /// is writable.
    pub(super) async fn recover(&self) -> bool {
        let (done, answer) = oneshot::channel();
        if self.store.jobs.send(Job::Recover(done)).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// What wakes the replay: records made pending again.
    pub(super) fn requeued(&self) -> Arc<Notify> {
        self.store.requeued.clone()
    }

    /// Commits `write` with whatever other writes wait, and says what it did.
    pub(super) async fn write(&self, write: Write) -> Result<Written, OutboxError> {
        let (done, result) = oneshot::channel();
        let write = Box::new(write);
        if self.store.jobs.send(Job::Write { write, done }).is_err() {
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
        let path = &self.store.path;
        let io = |error: redb::Error| OutboxError::io(path, error);
        let read = self
            .store
            .database()
            .ok_or_else(|| OutboxError::io(path, "reopening after a failed commit"))?
            .begin_read()
            .map_err(|error| io(error.into()))?;
        let quarantine = table.name() == QUARANTINED.name();
        let table = read.open_table(table).map_err(|error| io(error.into()))?;
        let mut entries = Vec::new();
        for row in table.range(from..).map_err(|error| io(error.into()))? {
            if entries.len() >= limit {
                break;
            }
            let (seq, bytes) = row.map_err(|error| io(error.into()))?;
            let seq = seq.value();
            match Entry::decode(seq, bytes.value()) {
                Some(entry) => entries.push(entry),
                None if quarantine => entries.push(Entry::damaged(seq)),
                // Skipped here, and moved out of the way for good: the
                // writer reports it once moved.
                None => {
                    let (done, _) = oneshot::channel();
                    let write = Box::new(Write::Damaged { seq });
                    let _ = self.store.jobs.send(Job::Write { write, done });
                }
            }
        }
        Ok(entries)
    }
}

impl Store {
    /// The open database, if there is one.
    fn database(&self) -> Option<Arc<Database>> {
        lock(&self.db).clone()
    }

    /// Closes the database, which a failed commit left refusing every
    /// access, and opens the file again, if it is still the one opened
    /// first.
    fn reopen(&self) -> Result<Arc<Database>, OutboxError> {
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
    fn check_file(&self) -> Result<(), OutboxError> {
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

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.store.path)
            .field("pending", &self.pending_count())
            .finish()
    }
}

/// A file's device and inode: what tells it from another put at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    device: u64,
    inode: u64,
}

impl FileId {
    #[cfg(unix)]
    fn of(metadata: &Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            device: metadata.dev(),
            inode: metadata.ino(),
        }
    }

    /// Elsewhere std says nothing stable of a file's identity: only a file
    /// removed from its path is told.
    #[cfg(not(unix))]
    fn of(_: &Metadata) -> FileId {
        FileId {
            device: 0,
            inode: 0,
        }
    }
}

/// Opens the file at `path` for reading and writing, creating it (and its
/// folder) if it is missing; refuses one that is not safe to keep requests
/// in. Returns it, its identity, and whether it held anything.
fn open_file(path: &Path) -> Result<(File, FileId, bool), OutboxError> {
    let io = |error: io::Error| OutboxError::io(path, error);
    let seen = match std::fs::symlink_metadata(path) {
        Ok(seen) => seen,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            if let Some(folder) = path.parent() {
                create_folder(folder).map_err(io)?;
            }
            // Fails on anything at the path, a dangling link included: a
            // new file is never created through a link.
            let mut options = OpenOptions::new();
            options.read(true).write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options.open(path).map_err(io)?;
            let id = FileId::of(&file.metadata().map_err(io)?);
            return Ok((file, id, false));
        }
        Err(error) => return Err(io(error)),
    };
    check_safe(path, &seen)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let opened = file.metadata().map_err(io)?;
    // Swapped between the look and the open (for a link, say).
    if FileId::of(&opened) != FileId::of(&seen) {
        return Err(OutboxError::unsafe_path(
            path,
            "it changed while being opened",
        ));
    }
    Ok((file, FileId::of(&opened), opened.len() > 0))
}

fn create_folder(folder: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(folder)
}

/// Refuses what `metadata` (not following a link) says is unsafe to keep
/// requests in: anything but a regular file; on unix, a file others may
/// write, or another user's.
fn check_safe(path: &Path, metadata: &Metadata) -> Result<(), OutboxError> {
    if metadata.file_type().is_symlink() {
        return Err(OutboxError::unsafe_path(path, "it is a symbolic link"));
    }
    if !metadata.is_file() {
        return Err(OutboxError::unsafe_path(path, "it is not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if metadata.mode() & 0o022 != 0 {
            return Err(OutboxError::unsafe_path(
                path,
                "it is writable by group or others",
            ));
        }
        let user = process_user().map_err(|error| OutboxError::io(path, error))?;
        if metadata.uid() != user {
            return Err(OutboxError::unsafe_path(
                path,
                "it is owned by another user",
            ));
        }
    }
    Ok(())
}

/// The effective user of this process. std has no `geteuid`; a new pipe is
/// owned by the user that makes it, and takes no file on disk.
#[cfg(unix)]
fn process_user() -> io::Result<u32> {
    use std::os::{fd::OwnedFd, unix::fs::MetadataExt};
    let (reader, _writer) = io::pipe()?;
    Ok(File::from(OwnedFd::from(reader)).metadata()?.uid())
}

/// Opens the file at `path` again, if it is still the file `id`.
fn reopen_file(path: &Path, id: FileId, write: bool) -> Result<File, OutboxError> {
    let file = match OpenOptions::new().read(true).write(write).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(OutboxError::replaced(path))
        }
        Err(error) => return Err(OutboxError::io(path, error)),
    };
    let metadata = file
        .metadata()
        .map_err(|error| OutboxError::io(path, error))?;
    match FileId::of(&metadata) == id {
        true => Ok(file),
        false => Err(OutboxError::replaced(path)),
    }
}

/// [`open_database`], with a panic an error: damaged files have made
/// database opens panic.
fn open_database_caught(
    path: &Path,
    file: File,
    id: FileId,
    existed: bool,
) -> Result<Database, OutboxError> {
    catch_unwind(AssertUnwindSafe(|| open_database(path, file, id, existed)))
        .unwrap_or_else(|_| Err(OutboxError::invalid(path, "unreadable file")))
}

/// Opens the database in `file` (the file `id` at `path`), creating it if
/// `file` held nothing, and checks that it is an outbox, leaving a file that
/// is not one untouched.
fn open_database(
    path: &Path,
    file: File,
    id: FileId,
    existed: bool,
) -> Result<Database, OutboxError> {
    let backend = |file: File| FileBackend::new(file).map_err(|error| open_error(path, error));
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    if existed {
        // A read-only look first: it writes nothing, whatever the file holds.
        let look = reopen_file(path, id, false)?;
        match builder.open_read_only_with_backend(backend(look)?) {
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
        .create_with_backend(backend(file)?)
        .map_err(|error| open_error(path, error))?;
    initialize(&database, existed).map_err(|error| match error {
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

/// Where the writer stands with the file.
enum Health {
    Writable,
    /// The last commit failed with `error`: writes fail with it at once,
    /// until a recovery (asked for, or made by a write at `retry_at`)
    /// succeeds. `delay` is the pause before the next one.
    Broken {
        error: OutboxError,
        retry_at: Instant,
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

/// The writer: takes every job waiting, commits the writes in one
/// transaction on the blocking pool, answers each; ends when every handle is
/// gone.
async fn write_loop(mut jobs: mpsc::UnboundedReceiver<Job>, mut next_seq: u64, store: Weak<Store>) {
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
        let mut done = Vec::with_capacity(batch.len());
        let mut recoveries = Vec::new();
        for job in batch {
            match job {
                Job::Write {
                    write,
                    done: sender,
                } => {
                    writes.push(*write);
                    done.push(sender);
                }
                Job::Recover(sender) => recoveries.push(sender),
            }
        }
        let recovering = match &health {
            Health::Writable => false,
            Health::Broken {
                error, retry_at, ..
            } => {
                if recoveries.is_empty() && Instant::now() < *retry_at {
                    // Backing off: the disk is left alone.
                    for done in done {
                        let _ = done.send(Err(error.clone()));
                    }
                    continue;
                }
                true
            }
        };
        if writes.is_empty() && !recovering {
            for recovered in recoveries {
                let _ = recovered.send(true);
            }
            continue;
        }
        let damaged: Vec<(usize, u64)> = writes
            .iter()
            .enumerate()
            .filter_map(|(index, write)| match write {
                Write::Damaged { seq } => Some((index, *seq)),
                _ => None,
            })
            .collect();
        let seq = next_seq;
        let flush =
            recovering || unflushed >= MAX_UNFLUSHED || writes.iter().any(Write::needs_flush);
        unflushed = if flush { 0 } else { unflushed + 1 };
        let committing = store.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let mut next_seq = seq;
            let result = commit_to(&committing, &writes, flush, recovering, &mut next_seq);
            (result, next_seq)
        })
        .await;
        let (result, seq) = committed.unwrap_or_else(|error| {
            let error = OutboxError::io(&store.path, io::Error::other(error));
            (Err(error), next_seq)
        });
        next_seq = seq;
        match result {
            Ok((written, pending)) => {
                if recovering {
                    tracing::info!(path = %store.path.display(), "outbox can be written again");
                }
                health = Health::Writable;
                store.writable.store(true, Ordering::Release);
                store.pending.store(pending, Ordering::Relaxed);
                for (index, seq) in damaged {
                    if matches!(written[index], Ok(Written::Changed(true))) {
                        tracing::error!(
                            path = %store.path.display(),
                            seq,
                            key = damaged_key(seq),
                            "outbox record cannot be decoded: quarantined as damaged, \
                             the records after it go on"
                        );
                    }
                }
                for (done, written) in done.into_iter().zip(written) {
                    let written = written
                        .map_err(|TooLarge(field)| OutboxError::too_large(&store.path, field));
                    let _ = done.send(written);
                }
                for recovered in recoveries {
                    let _ = recovered.send(true);
                }
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
                for done in done {
                    let _ = done.send(Err(error.clone()));
                }
                for recovered in recoveries {
                    let _ = recovered.send(false);
                }
                health = health.failed(error);
            }
        }
    }
}

/// Commits `writes` to the store's database, reopening it first if a
/// recovery finds it refusing every access after a failed commit; an error
/// too if the file at the path is no longer the one opened.
fn commit_to(
    store: &Store,
    writes: &[Write],
    flush: bool,
    recovering: bool,
    next_seq: &mut u64,
) -> Result<(Vec<Result<Written, TooLarge>>, u64), OutboxError> {
    let io = |error: redb::Error| OutboxError::io(&store.path, error);
    let database = match store.database() {
        Some(database) => database,
        None => store.reopen()?,
    };
    let result = match commit(&database, writes, flush, recovering, next_seq) {
        Err(redb::Error::PreviousIo | redb::Error::DatabaseClosed) if recovering => {
            drop(database);
            let database = store.reopen()?;
            commit(&database, writes, flush, recovering, next_seq)
        }
        result => result,
    }
    .map_err(io)?;
    store.check_file()?;
    Ok(result)
}

/// Applies `writes` in one transaction, flushed to disk if `flush`, with
/// the time of a recovery if `recovering`; returns what each did (or that
/// its record was too large to store) and how many records are pending
/// after it.
fn commit(
    database: &Database,
    writes: &[Write],
    flush: bool,
    recovering: bool,
    next_seq: &mut u64,
) -> Result<(Vec<Result<Written, TooLarge>>, u64), redb::Error> {
    let mut transaction = database.begin_write()?;
    if !flush {
        transaction.set_durability(Durability::None)?;
    }
    let mut written = Vec::with_capacity(writes.len());
    let pending_count;
    {
        if recovering {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let millis = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            transaction.open_table(META)?.insert(RECOVERED_AT, millis)?;
        }
        let mut pending = transaction.open_table(PENDING)?;
        let mut quarantined = transaction.open_table(QUARANTINED)?;
        let mut keys = transaction.open_table(KEYS)?;
        for write in writes {
            let applied = apply(write, &mut pending, &mut quarantined, &mut keys, next_seq);
            written.push(match applied {
                Ok(done) => Ok(done),
                Err(Refused::TooLarge(too_large)) => Err(too_large),
                Err(Refused::Storage(error)) => return Err(error.into()),
            });
        }
        pending_count = pending.len()?;
    }
    transaction.commit()?;
    Ok((written, pending_count))
}

/// Why a write was not applied: the file failed (the whole commit fails), or
/// its record is too large to store (that write alone fails, having changed
/// nothing).
enum Refused {
    Storage(StorageError),
    TooLarge(TooLarge),
}

impl From<StorageError> for Refused {
    fn from(error: StorageError) -> Self {
        Refused::Storage(error)
    }
}

impl From<TooLarge> for Refused {
    fn from(too_large: TooLarge) -> Self {
        Refused::TooLarge(too_large)
    }
}

type Records<'txn> = redb::Table<'txn, u64, &'static [u8]>;

fn apply(
    write: &Write,
    pending: &mut Records<'_>,
    quarantined: &mut Records<'_>,
    keys: &mut redb::Table<'_, &'static str, u64>,
    next_seq: &mut u64,
) -> Result<Written, Refused> {
    let stored = |table: &Records<'_>, seq: u64| -> Result<Option<Entry>, StorageError> {
        Ok(table
            .get(seq)?
            .and_then(|bytes| Entry::decode(seq, bytes.value())))
    };
    // Every record is encoded before anything changes: one too large leaves
    // the tables as they were.
    Ok(match write {
        Write::Insert(entry) => {
            if let Some(seq) = keys.get(entry.key.as_str())?.map(|seq| seq.value()) {
                if pending.get(seq)?.is_some() || quarantined.get(seq)?.is_some() {
                    return Ok(Written::Existing);
                }
            }
            let record = entry.encode()?;
            let seq = *next_seq;
            *next_seq += 1;
            pending.insert(seq, record.as_slice())?;
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
                pending.insert(*seq, entry.encode()?.as_slice())?;
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
                pending.insert(*seq, entry.encode()?.as_slice())?;
                Written::Changed(true)
            }
            None => Written::Changed(false),
        },
        Write::Quarantine { seq, failure } => match stored(pending, *seq)? {
            Some(mut entry) => {
                entry.quarantined = true;
                entry.last_failure = Some(failure.clone());
                let record = entry.encode()?;
                pending.remove(*seq)?;
                quarantined.insert(*seq, record.as_slice())?;
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
                    entry.quarantined = false;
                    let record = entry.encode()?;
                    quarantined.remove(entry.seq)?;
                    pending.insert(entry.seq, record.as_slice())?;
                    Written::Changed(true)
                }
                None => Written::Changed(false),
            }
        }
        Write::Discard { key } => {
            let seq = match keys.remove(key.as_str())? {
                Some(seq) => Some(seq.value()),
                None => damaged_seq(quarantined, key)?,
            };
            match seq {
                Some(seq) => {
                    let removed =
                        pending.remove(seq)?.is_some() | quarantined.remove(seq)?.is_some();
                    Written::Changed(removed)
                }
                None => Written::Changed(false),
            }
        }
        Write::Damaged { seq } => {
            let record = pending.get(*seq)?.map(|bytes| bytes.value().to_vec());
            match record {
                Some(record) if Entry::decode(*seq, &record).is_none() => {
                    pending.remove(*seq)?;
                    quarantined.insert(*seq, record.as_slice())?;
                    // Its key cannot be read: the key that points to it is
                    // freed (a scan, rare), so a new request under it is
                    // stored.
                    keys.retain(|_, stored| stored != *seq)?;
                    Written::Changed(true)
                }
                _ => Written::Changed(false),
            }
        }
    })
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

/// How long ago `at` was, for events; zero for a time in the future.
pub(super) fn age(at: SystemTime) -> Duration {
    SystemTime::now().duration_since(at).unwrap_or_default()
}
