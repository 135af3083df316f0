//! The redb store: one file, written by one thread that commits every write
//! waiting in one transaction (group commit). Claims live in memory: one
//! process holds the file. [`RedbStore`] implements [`Store`] for the
//! outbox.
//!
//! By file: `file_safety` (the Unix checks on the file), `schema` (its
//! tables and format), `writer` (the commits, and their recovery).

mod file_safety;
mod lanes;
mod schema;
mod writer;

use std::{
    collections::HashSet,
    future::ready,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redb::{Database, ReadOnlyTable, ReadableDatabase, TableDefinition, TableHandle};
use tokio::sync::{mpsc, oneshot, Notify};

use file_safety::{open_file, publish, remove_stale_drafts, FileId, Opened};
use lanes::Lanes;
use schema::{
    count_pending, last_seq, open_database_caught, read_down, unix_millis, KEYS, PENDING,
    QUARANTINED,
};
use writer::{write_loop, Change, Job, Reply, Shared, Write};

use super::{Answer, BoxFuture, Inserted, LaneEvent, LaneState, Store, LIST_CAP};
use crate::outbox::Destination;
use crate::{
    origin::origin_key,
    outbox::{Entry, OutboxError},
    sync::lock,
};

/// How many pending records of a destination a claim looks through at a
/// time, for ones no one here holds.
const CLAIM_SCAN: usize = 256;

/// The store in one redb file, and the keys being sent.
pub(super) struct RedbStore {
    shared: Arc<Shared>,
    /// Keys being sent: never twice at once.
    claimed: Mutex<HashSet<String>>,
    /// The pending records by destination, and each destination's state.
    lanes: Mutex<Lanes>,
}

/// Opens the outbox at `path`, or makes a new one there: made whole as a
/// draft, then published, so that a crash meanwhile leaves no file at
/// `path` rather than a half-made one, which no later open could take.
fn open_or_create(path: &Path) -> Result<(Database, FileId), OutboxError> {
    // Another process may publish first: then its outbox is opened. Once
    // more at most, unless it was removed meanwhile, again and again.
    for _ in 0..3 {
        match open_file(path)? {
            Opened::Existing { file, id, held } => {
                return Ok((open_database_caught(path, file, id, held)?, id));
            }
            Opened::Draft { file, id, draft } => {
                let made = open_database_caught(path, file, id, false)
                    .and_then(|database| Ok((database, publish(&draft, path)?)));
                match made {
                    Ok((database, true)) => return Ok((database, id)),
                    Ok((database, false)) => drop(database),
                    Err(error) => {
                        let _ = std::fs::remove_file(&draft);
                        return Err(error);
                    }
                }
            }
        }
    }
    Err(OutboxError::io(
        path,
        "another process created and removed the file again and again",
    ))
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
        let (db, id) = open_or_create(&path)?;
        remove_stale_drafts(&path);
        let db = Arc::new(db);
        let reading = db.clone();
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
        let store = RedbStore {
            shared,
            claimed: Mutex::new(HashSet::new()),
            lanes: Mutex::new(Lanes::new(super::lane_state::FIRST_PROBE_DELAY)),
        };
        store.index()?;
        let down = {
            let lanes = lock(&store.lanes);
            read_down(&reading, |origin| lanes.holds(origin))
        }
        .map_err(|error| OutboxError::io(&store.shared.path, error))?;
        drop(reading);
        if down.stale > 0 {
            // Rows of destinations with nothing pending any more: one
            // write, however many.
            let kept = down.kept.iter().map(|(origin, ..)| origin.clone());
            store.remember(Change::DownOnly {
                origins: kept.collect(),
            });
        }
        for (origin, since_ms, failure) in down.kept {
            // A time past what the clock can hold (a file changed behind the
            // store's back) counts as now.
            let since = UNIX_EPOCH
                .checked_add(Duration::from_millis(since_ms))
                .unwrap_or_else(SystemTime::now);
            lock(&store.lanes).restore(&origin, since, failure);
        }
        Ok(store)
    }

    /// Hands `change` to the writer without waiting for it: the state of a
    /// destination is advisory, and its write never holds a delivery up.
    fn remember(&self, change: Change) {
        let (reply, _) = Reply::new(&self.shared.path);
        let _ = self
            .shared
            .jobs
            .send(Job::Write(Write::Change(change, reply)));
    }

    /// Indexes the pending records by destination: read once, at open.
    fn index(&self) -> Result<(), OutboxError> {
        let mut from = 1;
        loop {
            let entries = self.read(PENDING, from, CLAIM_SCAN)?;
            let Some(last) = entries.last() else {
                return Ok(());
            };
            from = last.seq + 1;
            let mut lanes = lock(&self.lanes);
            for entry in &entries {
                lanes.add(entry.seq, origin_key(&entry.uri), entry.key.clone());
            }
        }
    }

    /// `table`, open for reading as of the last commit.
    fn open_read(
        &self,
        table: TableDefinition<'_, u64, &[u8]>,
    ) -> Result<ReadOnlyTable<u64, &'static [u8]>, OutboxError> {
        let path = &self.shared.path;
        let io = |error: redb::Error| OutboxError::io(path, error);
        self.shared
            .database()
            .ok_or_else(|| OutboxError::io(path, "reopening after a failed commit"))?
            .begin_read()
            .map_err(|error| io(error.into()))?
            .open_table(table)
            .map_err(|error| io(error.into()))
    }

    /// The records stored as `seqs` in `table` that are there and can be
    /// read, in the order asked.
    fn read_seqs(
        &self,
        table: TableDefinition<'_, u64, &[u8]>,
        seqs: &[u64],
    ) -> Result<Vec<Entry>, OutboxError> {
        let io = |error: redb::Error| OutboxError::io(&self.shared.path, error);
        let table = self.open_read(table)?;
        let mut entries = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let record = table.get(seq).map_err(|error| io(error.into()))?;
            if let Some(entry) = record.and_then(|bytes| Entry::decode(seq, bytes.value())) {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// The sequence number stored under `key`, if any.
    fn seq_of(&self, key: &str) -> Option<u64> {
        let read = self.shared.database()?.begin_read().ok()?;
        let keys = read.open_table(KEYS).ok()?;
        let seq = keys.get(key).ok()??.value();
        Some(seq)
    }

    /// Every quarantined record's origin, counted.
    fn quarantined_by_origin(&self) -> Result<std::collections::HashMap<String, u64>, OutboxError> {
        let mut counts = std::collections::HashMap::new();
        let mut from = 1;
        loop {
            let entries = self.read(QUARANTINED, from, CLAIM_SCAN)?;
            let Some(last) = entries.last() else {
                return Ok(counts);
            };
            from = last.seq + 1;
            for origin in entries.iter().map(|entry| origin_key(&entry.uri)) {
                // A damaged record's origin cannot be read.
                if !origin.is_empty() {
                    *counts.entry(origin).or_insert(0) += 1;
                }
            }
        }
    }

    /// Claims up to `limit` pending records to `origin` that no one here
    /// holds, oldest first, and reads them once claimed: one delivered and
    /// removed meanwhile (its claim just released) is not sent again.
    fn claim_from(&self, origin: &str, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let taken = {
            let lanes = lock(&self.lanes);
            let mut claimed = lock(&self.claimed);
            lanes.take(origin, limit, |key| claimed.insert(key.to_owned()))
        };
        let seqs: Vec<u64> = taken.iter().map(|(seq, _)| *seq).collect();
        let read = self.read_seqs(PENDING, &seqs);
        let found = |seq: u64| {
            read.as_ref()
                .is_ok_and(|entries| entries.iter().any(|entry| entry.seq == seq))
        };
        // Not read (gone, damaged and moved away by a read, or the read
        // failed): no longer claimed; no longer pending, unless the read
        // failed.
        let lost: Vec<&(u64, String)> = taken.iter().filter(|(seq, _)| !found(*seq)).collect();
        if !lost.is_empty() {
            let mut claimed = lock(&self.claimed);
            for (_, key) in &lost {
                claimed.remove(key);
            }
            drop(claimed);
            if read.is_ok() {
                let mut lanes = lock(&self.lanes);
                for (seq, _) in lost {
                    lanes.remove(*seq);
                }
            }
        }
        read
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
        let quarantine = table.name() == QUARANTINED.name();
        let table = self.open_read(table)?;
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

impl Store for RedbStore {
    fn path(&self) -> &Path {
        &self.shared.path
    }

    fn pending(&self, cap: usize) -> Result<Vec<Entry>, OutboxError> {
        self.read(PENDING, 1, cap)
    }

    fn quarantined(&self, cap: usize) -> Result<Vec<Entry>, OutboxError> {
        self.read(QUARANTINED, 1, cap)
    }

    fn page(&self, quarantined: bool, after: u64, limit: usize) -> Answer<'_, Vec<Entry>> {
        let table = match quarantined {
            true => QUARANTINED,
            false => PENDING,
        };
        Box::pin(ready(self.read(table, after.saturating_add(1), limit)))
    }

    fn pending_count(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    fn requeue<'a>(&'a self, key: &'a str) -> Answer<'a, bool> {
        Box::pin(async move {
            let requeued = self.change(Change::Requeue { key: key.into() }).await?;
            if requeued {
                let seq = self.seq_of(key);
                let entry = seq.map(|seq| self.read_seqs(PENDING, &[seq]));
                if let Some(Ok(entry)) = entry {
                    for entry in entry {
                        lock(&self.lanes).add(entry.seq, origin_key(&entry.uri), entry.key);
                    }
                }
                self.shared.requeued.notify_one();
            }
            Ok(requeued)
        })
    }

    fn discard<'a>(&'a self, key: &'a str) -> Answer<'a, bool> {
        Box::pin(async move {
            let seq = self.seq_of(key);
            let discarded = self.change(Change::Discard { key: key.into() }).await?;
            if let Some(seq) = seq.filter(|_| discarded) {
                lock(&self.lanes).remove(seq);
            }
            Ok(discarded)
        })
    }

    /// A file is held by one process.
    fn is_shared(&self) -> bool {
        false
    }

    /// Claims are held in memory: they need no lease, nor a poll. The replay
    /// interval is the longest probe delay.
    fn hold_for(&self, _: Option<Duration>, replay_interval: Duration) {
        lock(&self.lanes).set_longest_probe(replay_interval);
    }

    fn claim_new(&self, key: &str) -> bool {
        lock(&self.claimed).insert(key.to_owned())
    }

    fn release(&self, key: &str, settled: bool) {
        lock(&self.claimed).remove(key);
        if !settled {
            self.shared.requeued.notify_one();
        }
    }

    fn claimed(&self) -> usize {
        lock(&self.claimed).len()
    }

    fn insert(&self, entry: Entry) -> Answer<'_, Inserted> {
        Box::pin(async move {
            let origin = origin_key(&entry.uri);
            let key = entry.key.clone();
            let (reply, answer) = Reply::new(&self.shared.path);
            let write = Write::Insert(Box::new(entry), reply);
            let inserted = self.shared.ask(Job::Write(write), answer).await?;
            if let Inserted::Stored(seq) = inserted {
                lock(&self.lanes).add(seq, origin, key);
            }
            Ok(inserted)
        })
    }

    fn complete(&self, seq: u64) -> Answer<'_, bool> {
        Box::pin(async move {
            let completed = self.change(Change::Complete { seq }).await?;
            lock(&self.lanes).remove(seq);
            Ok(completed)
        })
    }

    fn record_failure(&self, seq: u64, attempts: u32, failure: String) -> Answer<'_, bool> {
        Box::pin(self.change(Change::Failed {
            seq,
            attempts,
            failure,
        }))
    }

    fn replace(&self, seq: u64, entry: Entry) -> Answer<'_, bool> {
        Box::pin(async move {
            let origin = origin_key(&entry.uri);
            let key = entry.key.clone();
            let entry = Box::new(entry);
            let replaced = self.change(Change::Replace { seq, entry }).await?;
            if replaced {
                lock(&self.lanes).add(seq, origin, key);
            }
            Ok(replaced)
        })
    }

    fn quarantine(&self, seq: u64, failure: String) -> Answer<'_, bool> {
        Box::pin(async move {
            let quarantined = self.change(Change::Quarantine { seq, failure }).await?;
            lock(&self.lanes).remove(seq);
            Ok(quarantined)
        })
    }

    fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// Reopens the database if it needs it, then commits a small write.
    fn recover(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let (done, answer) = oneshot::channel();
            if self.shared.jobs.send(Job::Recover(done)).is_err() {
                return false;
            }
            answer.await.unwrap_or(false)
        })
    }

    fn requeued(&self) -> Arc<Notify> {
        self.shared.requeued.clone()
    }

    /// Every destination: one process holds the file, and sends to
    /// whichever origins its dispatcher allows.
    fn lanes<'a>(&'a self, _: &'a [String], cap: usize) -> Answer<'a, Vec<(String, LaneState)>> {
        Box::pin(ready(Ok(lock(&self.lanes).lanes(cap))))
    }

    fn claim_lane<'a>(&'a self, origin: &'a str, limit: usize) -> Answer<'a, Vec<Entry>> {
        Box::pin(ready(self.claim_from(origin, limit)))
    }

    fn note<'a>(&'a self, origin: &'a str, event: LaneEvent) -> Answer<'a, LaneState> {
        let mut lanes = lock(&self.lanes);
        let was_down = lanes.down_since(origin).is_some();
        // Written when it goes down and at each failed probe: at most once a
        // probe delay, whatever the rate of other failures.
        let failure = match &event {
            LaneEvent::Failed { failure, probe, .. } if *probe || !was_down => {
                Some(failure.clone())
            }
            _ => None,
        };
        let state = lanes.note(origin, event);
        let since = lanes.down_since(origin);
        drop(lanes);
        match (since, failure) {
            (Some(since), Some(failure)) => self.remember(Change::Down {
                origin: origin.to_owned(),
                since_ms: unix_millis(since),
                failure,
            }),
            (None, _) if was_down => self.remember(Change::Up {
                origin: origin.to_owned(),
            }),
            _ => {}
        }
        Box::pin(ready(Ok(state)))
    }

    fn take_probe<'a>(&'a self, origin: &'a str) -> Answer<'a, bool> {
        Box::pin(ready(Ok(lock(&self.lanes).take_probe(origin))))
    }

    fn return_probe<'a>(&'a self, origin: &'a str) -> Answer<'a, ()> {
        lock(&self.lanes).return_probe(origin);
        Box::pin(ready(Ok(())))
    }

    fn give_up<'a>(&'a self, origin: &'a str, failure: &'a str) -> Answer<'a, u64> {
        Box::pin(async move {
            let seqs = lock(&self.lanes).pending_to(origin);
            let entries = self.read_seqs(PENDING, &seqs)?;
            let claimed = lock(&self.claimed).clone();
            // Every change is queued before any is awaited: the writer
            // commits them together.
            let mut answers = Vec::new();
            for entry in entries.iter().filter(|entry| !claimed.contains(&entry.key)) {
                let (reply, answer) = Reply::new(&self.shared.path);
                let change = Change::Quarantine {
                    seq: entry.seq,
                    failure: failure.to_owned(),
                };
                if self
                    .shared
                    .jobs
                    .send(Job::Write(Write::Change(change, reply)))
                    .is_err()
                {
                    return Err(OutboxError::closed(&self.shared.path));
                }
                answers.push((entry.seq, answer));
            }
            lock(&self.lanes).forget(origin);
            self.remember(Change::Up {
                origin: origin.to_owned(),
            });
            let mut quarantined = 0;
            for (seq, answer) in answers {
                let moved = answer
                    .await
                    .unwrap_or_else(|_| Err(OutboxError::closed(&self.shared.path)))?;
                lock(&self.lanes).remove(seq);
                quarantined += u64::from(moved);
            }
            Ok(quarantined)
        })
    }

    fn destinations(&self) -> Answer<'_, Vec<Destination>> {
        Box::pin(async move {
            let mut destinations = lock(&self.lanes).destinations();
            for (origin, count) in self.quarantined_by_origin()? {
                destinations
                    .entry(origin.clone())
                    .or_insert_with(|| Destination::new(origin))
                    .quarantined = count;
            }
            let mut destinations: Vec<Destination> = destinations.into_values().collect();
            destinations.sort_by(|a, b| b.pending.cmp(&a.pending).then(a.origin.cmp(&b.origin)));
            destinations.truncate(LIST_CAP);
            Ok(destinations)
        })
    }
}

#[cfg(test)]
mod tests {
    use redb::Database;

    use super::{schema::META, *};
    use crate::outbox::Outbox;

    /// A file as a pre-release version of the outbox wrote it: format 1,
    /// one record of that version's own encoding.
    fn pre_release_file(path: &Path) {
        let database = Database::create(path).unwrap();
        let write = database.begin_write().unwrap();
        {
            write.open_table(META).unwrap().insert("format", 1).unwrap();
            let mut pending = write.open_table(PENDING).unwrap();
            pending
                .insert(1, b"\x01\x02\x00\x00\x00k1\x00".as_slice())
                .unwrap();
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
    async fn a_new_file_leaves_no_draft_and_stale_drafts_of_a_crash_are_removed() {
        let directory = scratch("drafts");
        let draft = |name: &str, age: Duration| {
            let path = directory.join(name);
            std::fs::write(&path, b"half made").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() - age)
                .unwrap();
            path
        };
        let hour = Duration::from_secs(3600);
        let stale = draft(".outbox-draft-stale", hour);
        let fresh = draft(".outbox-draft-fresh", Duration::ZERO);
        let other = draft("notes", hour);

        let outbox = Outbox::open(directory.join("requests.redb")).unwrap();
        assert!(outbox.pending().unwrap().is_empty());
        let mut names: Vec<String> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // Its own draft is gone once published; a fresh one may be another
        // process's file being made; only a stale one is removed.
        assert_eq!(names, [".outbox-draft-fresh", "notes", "requests.redb"]);
        assert!(!stale.exists() && fresh.exists() && other.exists());
        drop(outbox);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[tokio::test]
    async fn a_destination_down_is_down_since_its_first_failure_across_reopens() {
        const A: &str = "http://a.test:80";
        const B: &str = "http://b.test:80";
        let directory = scratch("down");
        let path = directory.join("requests.redb");
        async fn stored(
            store: &RedbStore,
            origin: &str,
            key: &str,
        ) -> Result<Inserted, OutboxError> {
            let request = http::Request::post(format!("{origin}/hooks/{key}"))
                .body(bytes::Bytes::from_static(b"{}"))
                .unwrap();
            store
                .insert(Entry::new(key.to_owned(), &request, None))
                .await
        }
        let failed = |failure: &str, probe: bool| LaneEvent::Failed {
            failure: failure.to_owned(),
            pause: None,
            probe,
        };
        let down_since = |store: &RedbStore, origin: &str| lock(&store.lanes).down_since(origin);
        // The writer commits in order: a write awaited after a note is
        // committed with it, or after it.
        async fn settled(store: &RedbStore) {
            stored(store, "http://c.test:80", "c").await.unwrap();
        }

        // A file made before destinations were kept has no table for them:
        // it opens, and the table is made at the first write.
        drop(RedbStore::open(path.clone()).unwrap());
        let database = Database::open(&path).unwrap();
        let write = database.begin_write().unwrap();
        assert!(write.delete_table(schema::DOWN).unwrap());
        write.commit().unwrap();
        drop(database);

        let store = RedbStore::open(path.clone()).unwrap();
        stored(&store, A, "a1").await.unwrap();
        stored(&store, B, "b1").await.unwrap();
        store.note(A, failed("503 first", false)).await.unwrap();
        let since = down_since(&store, A).unwrap();
        // Later failures keep the first's time; a failed probe writes its
        // failure.
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.note(A, failed("503 later", false)).await.unwrap();
        store.note(A, failed("503 probe", true)).await.unwrap();
        store.note(B, failed("refused", false)).await.unwrap();
        store.discard("b1").await.unwrap();
        settled(&store).await;
        drop(store);

        let store = RedbStore::open(path.clone()).unwrap();
        let kept = down_since(&store, A).expect("still down");
        assert_eq!(unix_millis(kept), unix_millis(since));
        let state = store.lanes(&[], 10).await.unwrap();
        let (_, a) = state.iter().find(|(origin, _)| origin == A).unwrap();
        assert!(a.is_down() && a.probe_in.is_zero(), "{a:?}: probed at once");
        assert!(a.down_for.unwrap() >= Duration::from_millis(20));
        let destinations = store.destinations().await.unwrap();
        let a = destinations.iter().find(|d| d.origin == A).unwrap();
        assert_eq!(a.down_since.map(unix_millis), Some(unix_millis(since)));
        assert_eq!(a.last_failure.as_deref(), Some("503 probe"));
        // B has nothing stored: nothing kept of it, and its row is gone.
        assert_eq!(down_since(&store, B), None);
        settled(&store).await;
        let database = lock(&store.shared.db).clone().unwrap();
        let rows = schema::read_down(&database, |_| true).unwrap();
        assert_eq!(rows.kept.len(), 1, "{rows:?}");
        assert_eq!(rows.kept[0].0, A);
        drop(database);

        // An answer: up, and so after the next open too.
        store
            .note(A, LaneEvent::Answered { pause: None })
            .await
            .unwrap();
        settled(&store).await;
        drop(store);
        let store = RedbStore::open(path.clone()).unwrap();
        assert_eq!(down_since(&store, A), None);
        drop(store);

        // A time past what the clock holds, written behind the store's
        // back, counts as now: never a panic.
        let database = Database::open(&path).unwrap();
        let write = database.begin_write().unwrap();
        write
            .open_table(schema::DOWN)
            .unwrap()
            .insert(A, (u64::MAX, "x"))
            .unwrap();
        write.commit().unwrap();
        drop(database);
        let before = SystemTime::now();
        let store = RedbStore::open(path.clone()).unwrap();
        let since = down_since(&store, A).expect("down");
        assert!(since >= before && since <= SystemTime::now());
        drop(store);

        // Many rows of origins with nothing pending, one of them a
        // megabyte long, written behind the store's back: none is kept,
        // and one write clears them all.
        let database = Database::open(&path).unwrap();
        let write = database.begin_write().unwrap();
        {
            let mut table = write.open_table(schema::DOWN).unwrap();
            for index in 0..1000 {
                table
                    .insert(format!("http://gone-{index}.test").as_str(), (1, "x"))
                    .unwrap();
            }
            table
                .insert("h".repeat(1 << 20).as_str(), (1, "x"))
                .unwrap();
        }
        write.commit().unwrap();
        drop(database);
        let store = RedbStore::open(path).unwrap();
        assert!(down_since(&store, A).is_some());
        assert_eq!(down_since(&store, "http://gone-0.test"), None);
        settled(&store).await;
        let database = lock(&store.shared.db).clone().unwrap();
        let rows = schema::read_down(&database, |_| true).unwrap();
        assert_eq!(rows.stale, 0);
        assert_eq!(rows.kept.len(), 1, "only A's row is left");
        assert_eq!(rows.kept[0].0, A);
        drop(database);
        drop(store);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// Opens the outbox at `path`: refused as invalid, naming the path
    /// and saying each of `says`, and the file left as it was.
    fn assert_refused_untouched(path: &Path, says: &[&str]) {
        let before = std::fs::read(path).unwrap();
        let error = Outbox::open(path).unwrap_err();
        assert_eq!(
            error.kind(),
            crate::outbox::OutboxErrorKind::Invalid,
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        for said in says {
            assert!(message.contains(said), "{message}");
        }
        assert_eq!(std::fs::read(path).unwrap(), before, "left as it was");
    }

    #[tokio::test]
    async fn a_file_of_the_pre_release_format_is_refused_naming_it_and_left_as_it_was() {
        let directory = scratch("pre-release");
        let path = directory.join("requests.redb");
        pre_release_file(&path);
        assert_refused_untouched(&path, &["format 1", "pre-release"]);
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
        assert_refused_untouched(&path, &["format 9", "move it away"]);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
