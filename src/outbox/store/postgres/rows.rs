//! Rows: records read column by column (a row that cannot be read is
//! reported, never a panic, and moved to quarantine), listings, and the
//! conversions of sequence numbers and limits to PostgreSQL's bigint.

use tokio_postgres::Row;

use super::{connection::open, PostgresStore, Shared};
use crate::outbox::{record::damaged_key, Entry, OutboxError};

/// The columns a record is read from.
pub(super) const COLUMNS: &str = "seq, record, attempts, last_failure, state";

/// A row that cannot be read: a column `NULL`, of another type than the
/// schema's, or a record that cannot be decoded.
pub(super) struct Unreadable {
    /// Its sequence number, if even that cannot be read.
    seq: Option<u64>,
    reason: String,
}

/// The record in `row`, read column by column: a table changed behind the
/// store's back is reported, never a panic.
pub(super) fn decode(row: &Row) -> Result<Entry, Unreadable> {
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
pub(super) fn listed(rows: &[Row], quarantined: bool) -> Vec<Entry> {
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

impl PostgresStore {
    /// The records of the queue in `state`, oldest first, read on a thread
    /// with its own runtime and connection.
    pub(super) fn list_apart(
        &self,
        state: &'static str,
        cap: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
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

impl Shared {
    /// Moves a record that cannot be read to quarantine, as it is, with the
    /// reason: the records after it are still replayed. One whose sequence
    /// number cannot be read is reported, and left.
    pub(super) async fn set_damaged(&self, unreadable: Unreadable) {
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
}

/// A sequence number as PostgreSQL's bigint.
pub(super) fn as_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A listing's limit as PostgreSQL's bigint.
pub(super) fn as_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_and_limits_saturate_into_bigint() {
        assert_eq!(as_seq(u64::MAX), i64::MAX);
        assert_eq!(as_limit(usize::MAX), i64::MAX);
        assert_eq!(as_seq(42), 42);
    }
}
