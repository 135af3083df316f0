//! The redb store: one file, written by one thread that commits every write
//! waiting in one transaction (group commit). Claims live in memory: one
//! process holds the file.

use std::{
    collections::HashSet,
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

use super::Inserted;
use crate::{
    outbox::{
        backoff::Backoff,
        record::{damaged_key, decode_v1},
        Entry, OutboxError,
    },
    sync::lock,
};

/// Pending records by sequence number: the order they were first stored.
const PENDING: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("pending");
/// Quarantined records, by the sequence number they were stored under.
const QUARANTINED: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("quarantined");
/// Each stored key to its sequence number: one record per key.
const KEYS: TableDefinition<'_, &str, u64> = TableDefinition::new("keys");
/// `format` to the format of the file: what makes a redb file an outbox.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("outbox_meta");
/// The format of the files this version writes: records of the second
/// record format, tagged.
const FORMAT: u64 = 2;
/// The format of files written before records were tagged: migrated when
/// opened.
const FIRST_FORMAT: u64 = 1;
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

/// The most commits in a row left unflushed. redb reuses the pages a commit
/// frees only once a durable commit no longer needs them: an endless run of
/// unflushed removals (the replay of a large backlog) would grow the file
/// with every batch.
const MAX_UNFLUSHED: u32 = 16;

/// The store in one redb file, and the keys being sent.
pub(super) struct RedbStore {
    shared: Arc<Shared>,
    /// Keys being sent: never twice at once.
    claimed: Mutex<HashSet<String>>,
}

/// What the store and its writer share.
struct Shared {
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

/// A change to a stored record.
#[derive(Debug)]
enum Change {
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
}

impl Change {
    /// Whether the change must be on disk when its commit returns: a lost
    /// removal or failure count only replays a request the server takes as
    /// a no-op.
    fn needs_flush(&self) -> bool {
        !matches!(self, Change::Complete { .. } | Change::Failed { .. })
    }
}

/// Where a write's answer goes, and the answer, once its commit is known:
/// until it is applied, that it was not committed.
struct Reply<T> {
    to: oneshot::Sender<Result<T, OutboxError>>,
    answer: Result<T, OutboxError>,
}

impl<T> Reply<T> {
    fn new(path: &Path) -> (Reply<T>, oneshot::Receiver<Result<T, OutboxError>>) {
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
enum Job {
    Write(Write),
    /// Make the file writable again now, if it is not; answers whether it is.
    Recover(oneshot::Sender<bool>),
}

/// A write, with where its answer goes.
enum Write {
    Insert(Box<Entry>, Reply<Inserted>),
    Change(Change, Reply<bool>),
}

impl RedbStore {
    pub(super) fn open(given: PathBuf) -> Result<RedbStore, OutboxError> {
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
        let shared = Arc::new(Shared {
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
        runtime.spawn(write_loop(receiver, next_seq, Arc::downgrade(&shared)));
        Ok(RedbStore {
            shared,
            claimed: Mutex::new(HashSet::new()),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Up to `limit` records after `after`, quarantined or pending.
    pub(super) fn page(
        &self,
        quarantined: bool,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
        let table = match quarantined {
            true => QUARANTINED,
            false => PENDING,
        };
        self.read(table, after.saturating_add(1), limit)
    }

    pub(super) fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
        self.read(PENDING, after.saturating_add(1), limit)
    }

    pub(super) fn pending_count(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    pub(super) fn claim(&self, key: &str) -> bool {
        lock(&self.claimed).insert(key.to_owned())
    }

    pub(super) fn release(&self, key: &str, settled: bool) {
        lock(&self.claimed).remove(key);
        if !settled {
            self.shared.requeued.notify_one();
        }
    }

    pub(super) fn claimed(&self) -> usize {
        lock(&self.claimed).len()
    }

    pub(super) async fn insert(&self, entry: Entry) -> Result<Inserted, OutboxError> {
        let (reply, answer) = Reply::new(&self.shared.path);
        let write = Write::Insert(Box::new(entry), reply);
        self.shared.ask(Job::Write(write), answer).await
    }

    pub(super) async fn complete(&self, seq: u64) -> Result<bool, OutboxError> {
        self.change(Change::Complete { seq }).await
    }

    pub(super) async fn record_failure(
        &self,
        seq: u64,
        attempts: u32,
        failure: String,
    ) -> Result<bool, OutboxError> {
        self.change(Change::Failed {
            seq,
            attempts,
            failure,
        })
        .await
    }

    pub(super) async fn replace(&self, seq: u64, entry: Entry) -> Result<bool, OutboxError> {
        let entry = Box::new(entry);
        self.change(Change::Replace { seq, entry }).await
    }

    pub(super) async fn quarantine(&self, seq: u64, failure: String) -> Result<bool, OutboxError> {
        self.change(Change::Quarantine { seq, failure }).await
    }

    pub(super) async fn requeue(&self, key: &str) -> Result<bool, OutboxError> {
        let requeued = self.change(Change::Requeue { key: key.into() }).await?;
        if requeued {
            self.shared.requeued.notify_one();
        }
        Ok(requeued)
    }

    pub(super) async fn discard(&self, key: &str) -> Result<bool, OutboxError> {
        self.change(Change::Discard { key: key.into() }).await
    }

    pub(super) fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// Reopens the database if it needs it, then commits a small write.
    pub(super) async fn recover(&self) -> bool {
        let (done, answer) = oneshot::channel();
        if self.shared.jobs.send(Job::Recover(done)).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    pub(super) fn requeued(&self) -> Arc<Notify> {
        self.shared.requeued.clone()
    }

    async fn change(&self, change: Change) -> Result<bool, OutboxError> {
        let (reply, answer) = Reply::new(&self.shared.path);
        let write = Write::Change(change, reply);
        self.shared.ask(Job::Write(write), answer).await
    }

    fn read(
        &self,
        table: TableDefinition<'_, u64, &[u8]>,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
        let path = &self.shared.path;
        let io = |error: redb::Error| OutboxError::io(path, error);
        let read = self
            .shared
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
                    let (reply, _) = Reply::new(path);
                    let write = Write::Change(Change::Damaged { seq }, reply);
                    let _ = self.shared.jobs.send(Job::Write(write));
                }
            }
        }
        Ok(entries)
    }
}

impl Shared {
    /// Sends `job` to the writer and waits for its `answer`.
    async fn ask<T>(
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
                check_format(path, format)?;
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
        InitError::Format(format) => match check_format(path, format) {
            Err(refused) => refused,
            Ok(()) => OutboxError::invalid(path, "a database, but not an outbox"),
        },
        InitError::Storage(error) => OutboxError::io(path, error),
    })?;
    Ok(database)
}

/// Refuses a file whose format this version cannot read, saying what it is
/// and what to do.
fn check_format(path: &Path, format: Option<u64>) -> Result<(), OutboxError> {
    match format {
        Some(FIRST_FORMAT | FORMAT) => Ok(()),
        Some(later) => Err(OutboxError::invalid(
            path,
            format!(
                "an outbox of format {later}, written by a later version of this crate: open it \
                 with that version, or move it away to start a new one"
            ),
        )),
        None => Err(OutboxError::invalid(path, "a database, but not an outbox")),
    }
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
    /// Not a file of this version's format, even once migrated: the format
    /// it says it has.
    Format(Option<u64>),
    Storage(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for InitError {
    fn from(error: E) -> Self {
        InitError::Storage(error.into())
    }
}

/// Creates the tables of a new outbox; checks an existing one's format
/// (again: a file repaired after a crash was not looked at before), and
/// migrates one of the first format.
fn initialize(database: &Database, existed: bool) -> Result<(), InitError> {
    if existed {
        return match read_format(database)? {
            Some(FORMAT) => Ok(()),
            Some(FIRST_FORMAT) => migrate(database),
            other => Err(InitError::Format(other)),
        };
    }
    let write = database.begin_write()?;
    if write
        .list_tables()?
        .any(|table| table.name() != META.name())
    {
        return Err(InitError::Format(None));
    }
    write.open_table(META)?.insert("format", FORMAT)?;
    write.open_table(PENDING)?;
    write.open_table(QUARANTINED)?;
    write.open_table(KEYS)?;
    write.commit()?;
    Ok(())
}

/// Rewrites every record of the first format in the current one, and the
/// file's format with them, in one transaction: a crash leaves the file as
/// it was, or migrated. A record that cannot be read as the first format is
/// left as it is: damaged, it is quarantined when it is read.
fn migrate(database: &Database) -> Result<(), InitError> {
    let write = database.begin_write()?;
    for definition in [PENDING, QUARANTINED] {
        let mut table = write.open_table(definition)?;
        let mut migrated = Vec::new();
        for row in table.iter()? {
            let (seq, bytes) = row?;
            if let Some(entry) = decode_v1(seq.value(), bytes.value()) {
                migrated.push((seq.value(), entry));
            }
        }
        for (seq, entry) in migrated {
            // Encoding a decoded record fails only when memory does.
            let Ok(record) = entry.encode() else {
                continue;
            };
            table.insert(seq, record.as_slice())?;
        }
    }
    write.open_table(META)?.insert("format", FORMAT)?;
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
    /// succeeds. `backoff` spaces the recoveries.
    Broken {
        error: OutboxError,
        retry_at: Instant,
        backoff: Backoff,
    },
}

impl Health {
    /// After a commit that failed with `error`: broken, the next recovery
    /// further off than the last.
    fn failed(self, error: OutboxError) -> Health {
        let backoff = match self {
            Health::Writable => Backoff::new(FIRST_RECOVERY_DELAY, LONGEST_RECOVERY_DELAY),
            Health::Broken { mut backoff, .. } => {
                backoff.failed();
                backoff
            }
        };
        Health::Broken {
            error,
            retry_at: Instant::now() + backoff.delay(),
            backoff,
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
async fn write_loop(
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
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let millis = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            transaction.open_table(META)?.insert(RECOVERED_AT, millis)?;
        }
        let mut tables = Tables {
            pending: transaction.open_table(PENDING)?,
            quarantined: transaction.open_table(QUARANTINED)?,
            keys: transaction.open_table(KEYS)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{record::first_format_record, Outbox};

    /// A file as the first version of the outbox wrote it: format 1, one
    /// pending and one quarantined record of the first record format, and
    /// one pending record no version could read.
    fn first_format_file(path: &Path) {
        let database = Database::create(path).unwrap();
        let write = database.begin_write().unwrap();
        {
            write
                .open_table(META)
                .unwrap()
                .insert("format", FIRST_FORMAT)
                .unwrap();
            let mut pending = write.open_table(PENDING).unwrap();
            let mut quarantined = write.open_table(QUARANTINED).unwrap();
            let mut keys = write.open_table(KEYS).unwrap();
            let first = first_format_record("k1", "http://127.0.0.1:9/hook/k1", b"{\"a\":1}", 3);
            pending.insert(1, first.as_slice()).unwrap();
            keys.insert("k1", 1).unwrap();
            pending
                .insert(2, b"\x01\xff\xffnot a record".as_slice())
                .unwrap();
            keys.insert("k2", 2).unwrap();
            let refused = first_format_record("k3", "http://127.0.0.1:9/hook/k3", b"{}", 1);
            quarantined.insert(3, refused.as_slice()).unwrap();
            keys.insert("k3", 3).unwrap();
        }
        write.commit().unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let directory = std::env::temp_dir().join(format!(
            "terminal-retry-format-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    #[tokio::test]
    async fn a_file_of_the_first_format_is_migrated_when_opened() {
        let directory = scratch("migrate");
        let path = directory.join("requests.redb");
        first_format_file(&path);

        let outbox = Outbox::open(&path).unwrap();
        let pending = outbox.pending().unwrap();
        assert_eq!(pending.len(), 1, "the unreadable record is not misread");
        let entry = &pending[0];
        assert_eq!(entry.key, "k1");
        assert_eq!(entry.uri, "http://127.0.0.1:9/hook/k1");
        assert_eq!(entry.body, "{\"a\":1}");
        assert_eq!(entry.attempts, 3);
        assert_eq!(entry.idempotency_key, "idem-1");
        assert_eq!(entry.tag, None);
        assert_eq!(
            entry.request().headers()["content-type"],
            "application/json"
        );
        // The unreadable record is moved to quarantine by the writer, soon.
        let mut keys = Vec::new();
        for _ in 0..500 {
            let quarantined = outbox.quarantined().unwrap();
            keys = quarantined.into_iter().map(|entry| entry.key).collect();
            if keys.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(keys, ["damaged-2", "k3"]);
        assert!(outbox.requeue("k3").await.unwrap());
        drop(outbox);

        // Migrated for good: the file says the current format, and holds
        // records of the current format only (the damaged one as it was).
        let database = Database::open(&path).unwrap();
        assert_eq!(read_format(&database).unwrap(), Some(FORMAT));
        let read = database.begin_read().unwrap();
        let pending = read.open_table(PENDING).unwrap();
        for seq in [1, 3] {
            let record = pending.get(seq).unwrap().unwrap();
            assert!(Entry::decode(seq, record.value()).is_some(), "{seq}");
        }
        let quarantined = read.open_table(QUARANTINED).unwrap();
        let damaged = quarantined.get(2).unwrap().unwrap();
        assert_eq!(damaged.value(), b"\x01\xff\xffnot a record");
        drop((pending, quarantined, damaged, read, database));
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[tokio::test]
    async fn a_file_of_a_later_format_is_refused_naming_it_and_left_as_it_was() {
        let directory = scratch("later");
        let path = directory.join("requests.redb");
        {
            let database = Database::create(&path).unwrap();
            let write = database.begin_write().unwrap();
            write.open_table(META).unwrap().insert("format", 9).unwrap();
            write.commit().unwrap();
        }
        let before = std::fs::read(&path).unwrap();

        let error = Outbox::open(&path).unwrap_err();
        assert!(error.is_invalid(), "{error}");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("format 9"), "{message}");
        assert!(message.contains("move it away"), "{message}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
