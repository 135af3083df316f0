//! The store: where requests wait, and the seam the dispatcher talks to it
//! through.
//!
//! [`Outbox`] is the public handle. Its crate-visible methods are the
//! store's whole API for the dispatcher: insert, claim, re-read, record a
//! failure, replace, quarantine, complete, list, and whether it can be
//! written (and recover). Each answers what it did, typed: an insert says
//! [`Inserted`], a change whether its record was there.
//!
//! Behind it, a [`Store`]: a trait each backend implements in its module
//! (`redb`, one file; `postgres`, a queue shared by processes), owning its
//! own defaults. The dispatcher never names a backend: a new store is a
//! new module and an implementation of the trait. Its futures are boxed, as
//! a trait object's must be: one allocation per write, next to a commit.
//!
//! ```
//! use tower_terminal_retry::outbox::Outbox;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let directory = std::env::temp_dir().join(format!("outbox-store-doc-{}", std::process::id()));
//! let outbox = Outbox::open(directory.join("requests.redb"))?;
//! for entry in outbox.quarantined()? {
//!     println!("{} was refused: {:?}", entry.key, entry.last_failure);
//! }
//! assert_eq!(outbox.pending_count(), 0);
//! # drop(outbox);
//! # std::fs::remove_dir_all(&directory)?;
//! # Ok(())
//! # }
//! ```

mod claim;
mod lane_state;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "outbox")]
mod redb;

pub(super) use claim::Claim;
pub(super) use lane_state::{LaneEvent, LaneState};

#[cfg(feature = "outbox")]
use std::path::PathBuf;
use std::{future::Future, path::Path, pin::Pin, sync::Arc, time::Duration};

use tokio::sync::Notify;

use super::{Destination, Entry, Listing, OutboxError, Page};

/// The most records [`Outbox::pending`] and [`Outbox::quarantined`] return:
/// a queue of millions is read with [`Outbox::list`], a page at a time.
pub(super) const LIST_CAP: usize = 10_000;

/// A durable store of idempotent requests, one per key, in a single file
/// ([`open`](Outbox::open)) or in a queue of a PostgreSQL database shared by
/// several processes ([`connect`](Outbox::connect), feature `postgres`): see
/// the [module docs](super).
///
/// What follows is about the file; a shared outbox is described
/// [there](crate::outbox#a-shared-outbox-on-postgresql).
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
///
/// A file written by an earlier version of this crate is migrated to the
/// current record format when it is opened, in one transaction.
#[derive(Clone)]
pub struct Outbox {
    store: Arc<dyn Store>,
}

/// A future a [`Store`] returns: boxed, as the futures of a trait object
/// are.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store's answer to come.
type Answer<'a, T> = BoxFuture<'a, Result<T, OutboxError>>;

/// What a store does for the dispatcher and for [`Outbox`]'s own methods,
/// documented there; each backend implements it in its module.
trait Store: Send + Sync {
    /// The file, or a pseudo path naming where the store is.
    fn path(&self) -> &Path;

    /// The pending records, oldest first, at most `cap`.
    fn pending(&self, cap: usize) -> Result<Vec<Entry>, OutboxError>;

    /// The quarantined records, oldest first, at most `cap`.
    fn quarantined(&self, cap: usize) -> Result<Vec<Entry>, OutboxError>;

    /// Up to `limit` records after `after`, quarantined or pending.
    fn page(&self, quarantined: bool, after: u64, limit: usize) -> Answer<'_, Vec<Entry>>;

    fn pending_count(&self) -> u64;

    fn requeue<'a>(&'a self, key: &'a str) -> Answer<'a, bool>;

    fn discard<'a>(&'a self, key: &'a str) -> Answer<'a, bool>;

    /// Whether other processes share the store (see [`Outbox::is_shared`]).
    fn is_shared(&self) -> bool;

    /// How long a claim holds (`None`: the store's own default), and the
    /// replay interval: a store whose claims are leases needs them.
    fn hold_for(&self, lease: Option<Duration>, replay_interval: Duration);

    /// Claims `key`, about to be inserted: whether it was free.
    fn claim_new(&self, key: &str) -> bool;

    fn release(&self, key: &str, settled: bool);

    fn claimed(&self) -> usize;

    fn insert(&self, entry: Entry) -> Answer<'_, Inserted>;

    fn complete(&self, seq: u64) -> Answer<'_, bool>;

    fn record_failure(&self, seq: u64, attempts: u32, failure: String) -> Answer<'_, bool>;

    fn replace(&self, seq: u64, entry: Entry) -> Answer<'_, bool>;

    fn quarantine(&self, seq: u64, failure: String) -> Answer<'_, bool>;

    fn is_writable(&self) -> bool;

    fn recover(&self) -> BoxFuture<'_, bool>;

    fn requeued(&self) -> Arc<Notify>;

    /// The destinations with pending records that no one holds, and the
    /// state of each; on a shared store only those of `origins` (all, if
    /// empty). At most `cap` of them, those with the oldest records first.
    /// Forgets the state of destinations with nothing stored.
    fn lanes<'a>(
        &'a self,
        origins: &'a [String],
        cap: usize,
    ) -> Answer<'a, Vec<(String, LaneState)>>;

    /// Claims up to `limit` pending records to `origin` that no one holds,
    /// oldest first, and reads them as they are once claimed (each claimed
    /// key then released by [`release`](Store::release), as any claim).
    fn claim_lane<'a>(&'a self, origin: &'a str, limit: usize) -> Answer<'a, Vec<Entry>>;

    /// Records how an attempt to `origin` went (see [`LaneEvent`]); the
    /// destination's state after it. Keeps no state for an origin with
    /// nothing stored.
    fn note<'a>(&'a self, origin: &'a str, event: LaneEvent) -> Answer<'a, LaneState>;

    /// Takes the probe of `origin`, down, for this store's user: whether it
    /// was due and no one else held it. Held until the next
    /// [`note`](Store::note) of an attempt to `origin` from here, or a
    /// lease's length.
    fn take_probe<'a>(&'a self, origin: &'a str) -> Answer<'a, bool>;

    /// Gives back the probe of `origin` taken here, unused (it found
    /// nothing to send): the destination's state is left as it was, down.
    fn return_probe<'a>(&'a self, origin: &'a str) -> Answer<'a, ()>;

    /// Quarantines every pending record to `origin` that no other user of
    /// the store holds, each with `failure`; how many. Forgets the
    /// destination's state: requeued, its records start afresh.
    fn give_up<'a>(&'a self, origin: &'a str, failure: &'a str) -> Answer<'a, u64>;

    /// Each destination with stored records, pending or quarantined, with
    /// its state; at most 10,000, those with the most pending first.
    fn destinations(&self) -> Answer<'_, Vec<Destination>>;

    /// The store on PostgreSQL, for what only it does
    /// ([`Outbox::enqueue`]).
    #[cfg(feature = "postgres")]
    fn as_postgres(&self) -> Option<&postgres::PostgresStore> {
        None
    }
}

/// What an insert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Inserted {
    /// Stored under this sequence number.
    Stored(u64),
    /// A record under the key is stored already: it stands.
    Taken,
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
    /// fail from then on ([`OutboxErrorKind::Replaced`](super::OutboxErrorKind::Replaced)): nothing is reported
    /// stored in a file that is no longer at the path.
    ///
    /// A file left by a crash is recovered: every commit made before the
    /// crash is there. A file written by an earlier version is migrated. A
    /// new file is made whole under a name of its own beside `path`
    /// (`.outbox-draft-` and a random suffix), then put at `path`: a crash
    /// while it is made leaves no file at `path`, never a half-made one that
    /// no later open could take, and may leave the draft, never read again:
    /// an open removes the drafts beside its file older than ten minutes.
    /// Two processes making the same file at once open the one that was put
    /// there first.
    ///
    /// # Errors
    ///
    /// The file is held by another live outbox (in this process or another);
    /// it is not an outbox (garbage, truncated, corrupted, another redb
    /// database, or one written by a later version), in which case it is
    /// left exactly as it was; it is not safe to keep requests in
    /// ([`OutboxErrorKind::Unsafe`](super::OutboxErrorKind::Unsafe)), left as it was too; it cannot be read or
    /// created; or there is no tokio runtime. The error names the path.
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub fn open(path: impl Into<PathBuf>) -> Result<Outbox, OutboxError> {
        let store = redb::RedbStore::open(path.into())?;
        Ok(Outbox {
            store: Arc::new(store),
        })
    }

    /// Connects to the PostgreSQL database at `url` (a `postgres://` URL or
    /// a `key=value` string, as [`tokio_postgres::Config`] reads them) and
    /// opens the outbox `queue` in it: a queue is an outbox of its own,
    /// shared by every process that connects to it. Creates the schema if it
    /// is missing (see [the schema](crate::outbox#a-shared-outbox-on-postgresql)), under an
    /// advisory lock, so that processes starting at once do not race, and
    /// starts the store's tasks (its writer, its listener, the lease
    /// renewal) on the current tokio runtime.
    ///
    /// # Settings
    ///
    /// Read from `url`'s parameters, under libpq's names where libpq has
    /// them; every connection of the store uses them.
    ///
    /// - `sslmode`: `disable` (never TLS); `prefer`, the default as in
    ///   libpq (TLS if the server offers it, the certificate unchecked);
    ///   `require` (TLS or no connection, the certificate unchecked);
    ///   `verify-ca` (and the certificate chains to a trusted root);
    ///   `verify-full` (and it names the host connected to). Given
    ///   `sslrootcert`, `prefer` and `require` check the chain as
    ///   `verify-ca` does. TLS is rustls, on ring.
    /// - `sslrootcert`: the roots to trust, a PEM file; or `system`, the
    ///   platform's trust store, which then asks for `verify-full`.
    ///   `verify-ca` and `verify-full` without it trust the platform's roots.
    /// - `connect_timeout`: the seconds connecting, the TLS handshake and
    ///   the login may take together; 10 by default (and for `0`).
    /// - `statement_timeout` and `lock_timeout`: how long each statement may
    ///   run, and wait for a lock, set on the session (PostgreSQL's
    ///   durations: `5s`, `500ms`, `0` for no limit); `5s` and `2s` by
    ///   default. A session setting in `options` (`-c lock_timeout=...`) is
    ///   kept instead; setting one both ways is an error.
    ///
    /// A database on another machine, checked against a private CA:
    ///
    /// ```text
    /// postgres://sender:PASSWORD@db.internal/app?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem
    /// ```
    ///
    /// # Errors
    ///
    /// The URL cannot be parsed, names a parameter libpq does not know, or
    /// a value that is not one ([`OutboxErrorKind::Invalid`](super::OutboxErrorKind::Invalid)); the roots
    /// cannot be read; the database cannot be reached, TLS fails or is
    /// refused (the error says so: a certificate not trusted, a host name
    /// mismatch, no TLS offered where `sslmode` requires it), or there is
    /// no connection and login within `connect_timeout`; its schema was
    /// written by a later version of this crate; or there is no tokio
    /// runtime. No error shows the password.
    #[cfg(feature = "postgres")]
    pub async fn connect(url: &str, queue: &str) -> Result<Outbox, OutboxError> {
        let store = postgres::PostgresStore::connect(url, queue).await?;
        Ok(Outbox {
            store: Arc::new(store),
        })
    }

    /// Stores `request` under `key` inside `transaction`, the caller's own:
    /// it exists once that commits, and never if it rolls back. After the
    /// commit, a dispatcher on the queue is woken at once (a `NOTIFY` in the
    /// same transaction), in any process.
    ///
    /// The request is stored as [`Dispatcher::send`](super::Dispatcher::send)
    /// stores one: without its sensitive headers, with an idempotency key
    /// of its own. A record still stored under `key` stands: this one is
    /// then not stored, and `Ok` is returned.
    ///
    /// # Errors
    ///
    /// The request is refused (credentials in its URI, an invalid
    /// [`Tag`](super::Tag)), this outbox is not a PostgreSQL one, or the
    /// statement failed (the transaction is then aborted, as PostgreSQL
    /// does).
    #[cfg(feature = "postgres")]
    pub async fn enqueue(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        key: &str,
        request: http::Request<bytes::Bytes>,
    ) -> Result<(), OutboxError> {
        match self.store.as_postgres() {
            Some(store) => store.enqueue(transaction, key, request).await,
            None => Err(OutboxError::refused(
                self.path(),
                "enqueue needs an outbox on PostgreSQL",
            )),
        }
    }

    /// How long a claim of this outbox's records holds (`None`: the
    /// store's default): set by the dispatcher it is built into, with its
    /// replay interval, which paces the polling that finds records whose
    /// holder died.
    pub(super) fn hold_for(&self, lease: Option<Duration>, replay_interval: Duration) {
        self.store.hold_for(lease, replay_interval);
    }

    /// Whether other processes share this outbox (one on PostgreSQL): its
    /// dispatchers must be told where their requests may go, and leave
    /// alone the records of the others.
    pub(super) fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// The file, as an absolute path; for PostgreSQL, a pseudo path naming
    /// the server, the database and the queue (never the password).
    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// The pending records, oldest first, with their bodies: at most
    /// 10,000 of them. A convenience for small outboxes; a large one
    /// is read a page at a time with [`list`](Outbox::list).
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn pending(&self) -> Result<Vec<Entry>, OutboxError> {
        self.store.pending(LIST_CAP)
    }

    /// The quarantined records: refused for good by the server, kept, not
    /// retried, oldest first, with their bodies: at most 10,000 of
    /// them (see [`list`](Outbox::list) for more). A record that cannot be
    /// decoded is listed as `damaged-<seq>` (see [`Outbox`]).
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn quarantined(&self) -> Result<Vec<Entry>, OutboxError> {
        self.store.quarantined(LIST_CAP)
    }

    /// One page of the records, pending or quarantined, oldest first (see
    /// [`Listing`]): however many are stored, it reads at most
    /// 1,000, without their bodies unless asked. On
    /// PostgreSQL it reads on the store's own connection, pending records
    /// leased by a sender included.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub async fn list(&self, listing: &Listing) -> Result<Page, OutboxError> {
        let (after, limit) = listing.range();
        let entries = self.store.page(listing.quarantined, after, limit).await?;
        Ok(Page::of(entries, limit, listing.bodies))
    }

    /// How many records are pending, as of the last commit.
    pub fn pending_count(&self) -> u64 {
        self.store.pending_count()
    }

    /// Moves the quarantined record under `key` back to pending, to be
    /// delivered again. `false` when no record under `key` is quarantined.
    ///
    /// # Errors
    ///
    /// The write could not be committed.
    pub async fn requeue(&self, key: &str) -> Result<bool, OutboxError> {
        self.store.requeue(key).await
    }

    /// Deletes the record under `key`, pending or quarantined, for good.
    /// `false` when there is none.
    ///
    /// # Errors
    ///
    /// The write could not be committed.
    pub async fn discard(&self, key: &str) -> Result<bool, OutboxError> {
        self.store.discard(key).await
    }

    /// Claims `key`, about to be inserted, for this sender: `None` while
    /// another sender here holds it. Takes no lease in the store: the
    /// insert that must follow stores the record leased here, or answers
    /// [`Inserted::Taken`] if a record is stored under the key.
    pub(super) fn claim_new(&self, key: &str) -> Option<Claim> {
        let fresh = self.store.claim_new(key);
        fresh.then(|| Claim::new(self.clone(), key))
    }

    /// Releases `key`; a record left unsettled wakes the replay.
    fn release(&self, key: &str, settled: bool) {
        self.store.release(key, settled)
    }

    /// How many keys are claimed, for the dispatcher's `Debug`.
    pub(super) fn claimed(&self) -> usize {
        self.store.claimed()
    }

    /// Stores `entry` under its key, unless one is stored under it already.
    pub(super) async fn insert(&self, entry: Entry) -> Result<Inserted, OutboxError> {
        self.store.insert(entry).await
    }

    /// Removes the record `seq`, delivered or superseded. Need not be
    /// flushed at once: a lost removal only replays a request the server
    /// takes as a no-op.
    pub(super) async fn complete(&self, seq: u64) -> Result<bool, OutboxError> {
        self.store.complete(seq).await
    }

    /// Counts `attempts` failed attempts of the record `seq`, the last
    /// failing with `failure`. Need not be flushed at once either.
    pub(super) async fn record_failure(
        &self,
        seq: u64,
        attempts: u32,
        failure: String,
    ) -> Result<bool, OutboxError> {
        self.store.record_failure(seq, attempts, failure).await
    }

    /// Retires the record `seq` and stores `entry` in its place: same key
    /// and position.
    pub(super) async fn replace(&self, seq: u64, entry: Entry) -> Result<bool, OutboxError> {
        self.store.replace(seq, entry).await
    }

    /// Moves the record `seq` to quarantine, refused with `failure`.
    pub(super) async fn quarantine(&self, seq: u64, failure: String) -> Result<bool, OutboxError> {
        self.store.quarantine(seq, failure).await
    }

    /// Whether the last commit succeeded: while it did not, nothing that
    /// needs recording (a delivery) should be attempted.
    pub(super) fn is_writable(&self) -> bool {
        self.store.is_writable()
    }

    /// Tries now to make the store writable again, if it is not; whether it
    /// is.
    pub(super) async fn recover(&self) -> bool {
        self.store.recover().await
    }

    /// What wakes the replay: a record became pending again, or was left
    /// unsettled by its sender.
    pub(super) fn requeued(&self) -> Arc<Notify> {
        self.store.requeued()
    }
}

/// The lanes of the replay: what it asks the store about each destination.
impl Outbox {
    /// Each destination with stored requests, pending or quarantined: its
    /// origin, its counts, whether it is up, down (since when) or paused
    /// (until when), and its last failure (see [`Destination`]). At most
    /// 10,000 of them, those with the most pending first. On
    /// PostgreSQL, the state is the one every dispatcher on the queue
    /// shares; on a file, that of the dispatcher replaying it since it was
    /// opened.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub async fn destinations(&self) -> Result<Vec<Destination>, OutboxError> {
        self.store.destinations().await
    }

    /// The destinations the replay may claim records of now, with their
    /// state (see [`Store::lanes`]).
    pub(super) async fn lanes(
        &self,
        origins: &[String],
        cap: usize,
    ) -> Result<Vec<(String, LaneState)>, OutboxError> {
        self.store.lanes(origins, cap).await
    }

    /// Claims up to `limit` pending records to `origin`, oldest first, each
    /// read as it is once claimed.
    pub(super) async fn claim_lane(
        &self,
        origin: &str,
        limit: usize,
    ) -> Result<Vec<(Entry, Claim)>, OutboxError> {
        let entries = self.store.claim_lane(origin, limit).await?;
        Ok(entries
            .into_iter()
            .map(|entry| {
                let claim = Claim::new(self.clone(), &entry.key);
                (entry, claim)
            })
            .collect())
    }

    /// Records how an attempt to `origin` went; its state after it.
    pub(super) async fn note(
        &self,
        origin: &str,
        event: LaneEvent,
    ) -> Result<LaneState, OutboxError> {
        self.store.note(origin, event).await
    }

    /// Takes the probe of `origin`: whether it was due and free.
    pub(super) async fn take_probe(&self, origin: &str) -> Result<bool, OutboxError> {
        self.store.take_probe(origin).await
    }

    /// Gives back the probe of `origin` taken here, unused.
    pub(super) async fn return_probe(&self, origin: &str) -> Result<(), OutboxError> {
        self.store.return_probe(origin).await
    }

    /// Quarantines the pending records to `origin` no one else holds.
    pub(super) async fn give_up(&self, origin: &str, failure: &str) -> Result<u64, OutboxError> {
        self.store.give_up(origin, failure).await
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path())
            .field("pending", &self.pending_count())
            .finish()
    }
}
