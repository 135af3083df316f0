//! The file's schema: its tables, its format, and opening a database in it
//! that is an outbox (or refusing one that is not, untouched).

use std::{
    fs::File,
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use redb::{
    backends::FileBackend, Database, DatabaseError, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableHandle,
};

use super::file_safety::{reopen_file, FileId};
use crate::outbox::OutboxError;

/// Pending records by sequence number: the order they were first stored.
pub(super) const PENDING: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("pending");
/// Quarantined records, by the sequence number they were stored under.
pub(super) const QUARANTINED: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("quarantined");
/// Each stored key to its sequence number: one record per key.
pub(super) const KEYS: TableDefinition<'_, &str, u64> = TableDefinition::new("keys");
/// The destinations that are down, by origin: since when (milliseconds since
/// the Unix epoch) and their last failure, so that a later open of the file
/// goes on from there (`give_up_after` counts from the first failure, and
/// `down_since` says it) rather than starting every destination afresh.
/// Advisory: a row lost in a crash only restarts the count.
pub(super) const DOWN: TableDefinition<'_, &str, (u64, &str)> = TableDefinition::new("down");
/// `format` to the format of the file: what makes a redb file an outbox.
pub(super) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("outbox_meta");
/// The format of the files this version writes: records of the second
/// record format, tagged.
pub(super) const FORMAT: u64 = 2;
/// The format of files a pre-release version wrote: refused, naming it.
const PRE_RELEASE_FORMAT: u64 = 1;
/// redb's page cache: the records live on disk, not in memory.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// [`open_database`], with a panic an error: damaged files have made
/// database opens panic.
pub(super) fn open_database_caught(
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
        Some(FORMAT) => Ok(()),
        Some(PRE_RELEASE_FORMAT) => Err(OutboxError::invalid(
            path,
            format!(
                "an outbox of format {PRE_RELEASE_FORMAT}, written by a pre-release version of \
                 this crate, which this version does not read: deliver its requests with that \
                 version, or move it away to start a new one"
            ),
        )),
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

pub(super) fn read_format(database: &impl ReadableDatabase) -> Result<Option<u64>, redb::Error> {
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
/// (again: a file repaired after a crash was not looked at before).
fn initialize(database: &Database, existed: bool) -> Result<(), InitError> {
    if existed {
        return match read_format(database)? {
            Some(FORMAT) => Ok(()),
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
    write.open_table(DOWN)?;
    write.commit()?;
    Ok(())
}

pub(super) fn last_seq(database: &Database) -> Result<u64, redb::Error> {
    let read = database.begin_read()?;
    let mut last = 0;
    for table in [PENDING, QUARANTINED] {
        if let Some((seq, _)) = read.open_table(table)?.last()? {
            last = last.max(seq.value());
        }
    }
    Ok(last)
}

/// The longest failure kept of a destination read back, in bytes: what the
/// store writes is shorter; a file changed behind its back may say more.
const MAX_FAILURE_BYTES: usize = 4096;

/// The destinations down when the file was last written, of those for
/// which `pending` holds (the others' rows are not read into memory).
#[derive(Debug, Default)]
pub(super) struct DownRows {
    /// Origin, since when (milliseconds since the Unix epoch) and the last
    /// failure, capped.
    pub(super) kept: Vec<(String, u64, String)>,
    /// How many rows were of other origins.
    pub(super) stale: u64,
}

/// The destinations that were down when the file was last written, of the
/// origins for which `pending` holds. A file of an earlier version of the
/// format has none.
pub(super) fn read_down(
    database: &Database,
    pending: impl Fn(&str) -> bool,
) -> Result<DownRows, redb::Error> {
    let read = database.begin_read()?;
    let table = match read.open_table(DOWN) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(DownRows::default()),
        Err(error) => return Err(error.into()),
    };
    let mut rows = DownRows::default();
    for row in table.iter()? {
        let (origin, value) = row?;
        // Kept only for an origin a pending record holds: bounded by the
        // records, whatever the table holds.
        if !pending(origin.value()) {
            rows.stale += 1;
            continue;
        }
        let (since, failure) = value.value();
        let mut end = failure.len().min(MAX_FAILURE_BYTES);
        while !failure.is_char_boundary(end) {
            end -= 1;
        }
        rows.kept
            .push((origin.value().to_owned(), since, failure[..end].to_owned()));
    }
    Ok(rows)
}

/// `at` as the file keeps times: milliseconds since the Unix epoch (zero
/// before it).
pub(super) fn unix_millis(at: SystemTime) -> u64 {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn count_pending(database: &Database) -> Result<u64, redb::Error> {
    Ok(database.begin_read()?.open_table(PENDING)?.len()?)
}
