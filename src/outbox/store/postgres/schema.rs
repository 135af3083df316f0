//! The schema: its tables and indexes, created if missing, and migrated
//! from versions 1 and 2 to 3, in one transaction under an advisory lock.
//!
//! Created by [`Outbox::connect`](crate::outbox::Outbox::connect) if
//! missing, in one transaction under `pg_advisory_xact_lock`, so that
//! processes starting at once do not race on it; its version is kept for
//! later migrations.
//!
//! ```sql
//! CREATE TABLE terminal_retry_outbox_schema (version integer NOT NULL);
//! CREATE TABLE terminal_retry_outbox (
//!     seq         bigserial NOT NULL,        -- the order records were stored
//!     queue       text NOT NULL,             -- one outbox per queue
//!     key         text NOT NULL,             -- the sender's key
//!     state       text NOT NULL DEFAULT 'pending'
//!                 CHECK (state IN ('pending', 'quarantined')),
//!     record      bytea NOT NULL,            -- the request, as the redb store encodes it
//!     attempts    bigint NOT NULL DEFAULT 0, -- failed attempts so far
//!     last_failure text,
//!     holder      text,                      -- the claiming outbox's id, while leased
//!     lease_until timestamptz,               -- when the lease runs out
//!     generation  bigint NOT NULL DEFAULT 0, -- one more at every claim
//!     stored_at   timestamptz NOT NULL DEFAULT now(),
//!     origin      text,                      -- the request's origin (version 2)
//!     PRIMARY KEY (queue, seq),              -- a queue's records, in order
//!     UNIQUE (queue, key)                    -- first request per key stands
//! );
//! CREATE INDEX terminal_retry_outbox_pending
//!     ON terminal_retry_outbox (queue, seq) WHERE state = 'pending';
//! -- Version 3: each destination's records, and its state.
//! CREATE INDEX terminal_retry_outbox_origin
//!     ON terminal_retry_outbox (queue, origin, state, seq);
//! CREATE TABLE terminal_retry_outbox_destination (
//!     queue          text NOT NULL,
//!     origin         text NOT NULL,          -- scheme://host:port
//!     down_since     timestamptz,            -- failing since, no success after; NULL: up
//!     paused_until   timestamptz,            -- the pause it asked for (Retry-After)
//!     probe_at       timestamptz,            -- while down: when its next probe is due
//!     probe_delay_ms bigint NOT NULL DEFAULT 0, -- while down: doubled by a failed probe
//!     probe_holder   text,                   -- the probing outbox's id
//!     probe_until    timestamptz,            -- when its probe's lease runs out
//!     last_failure   text,                   -- cleaned, as a record's; NULL: up
//!     PRIMARY KEY (queue, origin)
//! );
//! ```
//!
//! The listing (for the replay) reads pending records of the queue whose
//! lease is free or ran out, oldest first, through the partial index: a
//! range scan from the last sequence number read. The key leads with the
//! queue for the same reason: a key on `seq` alone lets the planner walk
//! every other queue's records to reach this one's. So every statement
//! that names a record by `seq` names its queue too.
//!
//! The index on `(queue, origin, state, seq)` serves the lanes of the
//! replay (see `destinations`): the origins of a queue, one index probe
//! each; an origin's oldest pending records; whether an origin has any
//! record at all, pending or quarantined. A destination's row exists only
//! while it has records. The migration to version 3 fills in the origin of
//! the records stored before version 2, read from their requests (a record
//! that cannot be decoded keeps none: the replay quarantines it when it
//! reads it).

use std::path::Path;

use tokio_postgres::{Client, Transaction};

use crate::{
    origin::origin_key,
    outbox::{Entry, OutboxError},
};

/// The schema version this crate writes.
const SCHEMA_VERSION: i32 = 3;
/// The advisory lock the schema is created under: any constant of this
/// crate's own.
const SCHEMA_LOCK: i64 = 0x7472_7920_6f75_7462;

/// The schema, version 2; [`TO_3`] follows it.
const CREATE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS terminal_retry_outbox (
    seq bigserial NOT NULL,
    queue text NOT NULL,
    key text NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'quarantined')),
    record bytea NOT NULL,
    attempts bigint NOT NULL DEFAULT 0,
    last_failure text,
    holder text,
    lease_until timestamptz,
    generation bigint NOT NULL DEFAULT 0,
    stored_at timestamptz NOT NULL DEFAULT now(),
    origin text,
    PRIMARY KEY (queue, seq),
    UNIQUE (queue, key)
);
CREATE INDEX IF NOT EXISTS terminal_retry_outbox_pending
    ON terminal_retry_outbox (queue, seq) WHERE state = 'pending';
";

/// From version 1: the origin of each record, so that a dispatcher lists
/// only the records of its allow-list. Records stored before have none until
/// the migration to version 3 reads it from their requests
/// ([`fill_origins`]).
const MIGRATE_FROM_1: &str = "
ALTER TABLE terminal_retry_outbox ADD COLUMN IF NOT EXISTS origin text;
";

/// From version 2: the state of each destination, shared by the queue's
/// dispatchers, and the index the lanes of the replay read through.
const TO_3: &str = "
CREATE INDEX IF NOT EXISTS terminal_retry_outbox_origin
    ON terminal_retry_outbox (queue, origin, state, seq);
CREATE TABLE IF NOT EXISTS terminal_retry_outbox_destination (
    queue text NOT NULL,
    origin text NOT NULL,
    down_since timestamptz,
    paused_until timestamptz,
    probe_at timestamptz,
    probe_delay_ms bigint NOT NULL DEFAULT 0,
    probe_holder text,
    probe_until timestamptz,
    last_failure text,
    PRIMARY KEY (queue, origin)
);
INSERT INTO terminal_retry_outbox_schema (version) VALUES (3);
";

/// The most records whose origin the migration reads, and fills in, at once.
const FILL_BATCH: i32 = 1000;

/// Creates the schema if it is missing, under an advisory lock.
pub(super) async fn create_schema(client: &mut Client, path: &Path) -> Result<(), OutboxError> {
    let io = |error| OutboxError::io(path, error);
    let transaction = client.transaction().await.map_err(io)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(io)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS terminal_retry_outbox_schema (version integer NOT NULL)",
        )
        .await
        .map_err(io)?;
    let version: Option<i32> = transaction
        .query_one("SELECT max(version) FROM terminal_retry_outbox_schema", &[])
        .await
        .map_err(io)?
        .get(0);
    match version {
        Some(SCHEMA_VERSION) => {}
        None => {
            transaction.batch_execute(CREATE_SCHEMA).await.map_err(io)?;
            transaction.batch_execute(TO_3).await.map_err(io)?;
        }
        Some(earlier @ (1 | 2)) => {
            if earlier == 1 {
                transaction
                    .batch_execute(MIGRATE_FROM_1)
                    .await
                    .map_err(io)?;
            }
            transaction.batch_execute(TO_3).await.map_err(io)?;
            fill_origins(&transaction).await.map_err(io)?;
        }
        Some(later) => {
            return Err(OutboxError::invalid(
                path,
                format!("its schema is version {later}, written by a later version of this crate"),
            ))
        }
    }
    transaction.commit().await.map_err(io)
}

/// Fills in the origin of the records stored before version 2, read from
/// their requests: one pass over them, updated a batch at a time.
async fn fill_origins(transaction: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    let unsorted = transaction
        .bind(
            "SELECT queue, seq, record FROM terminal_retry_outbox WHERE origin IS NULL",
            &[],
        )
        .await?;
    loop {
        let rows = transaction.query_portal(&unsorted, FILL_BATCH).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let (mut queues, mut seqs, mut origins) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            // One that cannot be read keeps none: it is quarantined when read.
            let (Ok(queue), Ok(seq), Ok(record)) = (
                row.try_get::<_, &str>(0),
                row.try_get::<_, i64>(1),
                row.try_get::<_, &[u8]>(2),
            ) else {
                continue;
            };
            let entry = u64::try_from(seq)
                .ok()
                .and_then(|seq| Entry::decode(seq, record));
            if let Some(entry) = entry {
                queues.push(queue);
                seqs.push(seq);
                origins.push(origin_key(&entry.uri));
            }
        }
        transaction
            .execute(
                "UPDATE terminal_retry_outbox AS stored SET origin = sorted.origin
                 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS sorted(queue, seq, origin)
                 WHERE stored.queue = sorted.queue AND stored.seq = sorted.seq",
                &[&queues, &seqs, &origins],
            )
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::Request;

    use super::*;
    use crate::outbox::store::{
        postgres::{
            destinations::tests::{client, store},
            test_server,
        },
        LaneState,
    };

    #[tokio::test]
    async fn a_version_2_schema_is_migrated_to_3_the_origins_of_old_records_filled_in() {
        let Some(url) = test_server::url() else {
            return;
        };
        // A schema of its own: the tables of the other tests stay as they are.
        let schema = format!("migrate_{}", std::process::id());
        let client = client(url).await;
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
                 SET search_path = {schema};
                 CREATE TABLE terminal_retry_outbox_schema (version integer NOT NULL);
                 {CREATE_SCHEMA}
                 INSERT INTO terminal_retry_outbox_schema (version) VALUES (2);"
            ))
            .await
            .unwrap();
        let queue = format!("migrated-{}", std::process::id());
        let request = Request::post("HTTP://Old.Example/hooks")
            .body(Bytes::new())
            .unwrap();
        let record = Entry::new("old".to_owned(), &request, None)
            .encode()
            .unwrap();
        client
            .execute(
                "INSERT INTO terminal_retry_outbox (queue, key, record)
                 VALUES ($1, 'old', $2), ($1, 'damaged', '\\x00ff'::bytea)",
                &[&queue, &record],
            )
            .await
            .unwrap();

        let url = format!(
            "{url}{}options=-c%20search_path%3D{schema}",
            if url.contains('?') { '&' } else { '?' }
        );
        let (lease, interval) = (Duration::from_secs(30), Duration::from_secs(5));
        let migrated = store(&url, "migrated", lease, interval).await;
        let version: i32 = client
            .query_one("SELECT max(version) FROM terminal_retry_outbox_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, SCHEMA_VERSION);
        let origins: Vec<(String, Option<String>)> = client
            .query(
                "SELECT key, origin FROM terminal_retry_outbox WHERE queue = $1 ORDER BY seq",
                &[&queue],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(
            origins,
            [
                ("old".to_owned(), Some("http://old.example:80".to_owned())),
                ("damaged".to_owned(), None),
            ]
        );
        let lanes = migrated.lanes(&[], 10).await.unwrap();
        assert_eq!(
            lanes,
            [("http://old.example:80".to_owned(), LaneState::default())]
        );
        // Connecting again finds version 3, and changes nothing.
        drop(migrated);
        let again = store(&url, "migrated", lease, interval).await;
        assert_eq!(again.lanes(&[], 10).await.unwrap(), lanes);
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
}
