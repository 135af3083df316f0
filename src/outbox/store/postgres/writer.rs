//! The writer: a task that batches the inserts and removals waiting into
//! one statement each, so that concurrent sends share a commit.
//!
//! The records it inserts are stored leased to this store, at generation
//! 1; the removals are fenced as every write to a claimed record is (see
//! `lease`).

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
};

use tokio::sync::{mpsc, oneshot};

use super::{rows::as_seq, PostgresStore, Shared};
use crate::outbox::{store::Inserted, OutboxError};

/// The most writes batched into one statement.
const MAX_BATCH: usize = 1024;

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
pub(super) enum Write {
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

impl PostgresStore {
    /// Hands `write` to the writer and waits for its commit.
    pub(super) async fn ask<T>(
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
}

impl Shared {
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
pub(super) async fn write_loop(shared: Arc<Shared>, mut writes: mpsc::UnboundedReceiver<Write>) {
    let mut batch = Vec::new();
    while writes.recv_many(&mut batch, MAX_BATCH).await > 0 {
        shared.commit(std::mem::take(&mut batch)).await;
    }
}
