//! The schema: its tables and index, created if missing, and migrated
//! from version 1 to 2, in one transaction under an advisory lock.
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
//! ```
//!
//! The listing (for the replay) reads pending records of the queue whose
//! lease is free or ran out, oldest first, through the partial index: a
//! range scan from the last sequence number read. The key leads with the
//! queue for the same reason: a key on `seq` alone lets the planner walk
//! every other queue's records to reach this one's. So every statement
//! that names a record by `seq` names its queue too.

use std::path::Path;

use tokio_postgres::Client;

use crate::outbox::OutboxError;

/// The schema version this crate writes.
const SCHEMA_VERSION: i32 = 2;
/// The advisory lock the schema is created under: any constant of this
/// crate's own.
const SCHEMA_LOCK: i64 = 0x7472_7920_6f75_7462;

/// The schema, version 2.
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
INSERT INTO terminal_retry_outbox_schema (version) VALUES (2);
";

/// From version 1: the origin of each record, so that a dispatcher lists
/// only the records of its allow-list. Records stored before have none, and
/// are sorted by the dispatcher.
const MIGRATE_FROM_1: &str = "
ALTER TABLE terminal_retry_outbox ADD COLUMN IF NOT EXISTS origin text;
INSERT INTO terminal_retry_outbox_schema (version) VALUES (2);
";

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
        None => transaction.batch_execute(CREATE_SCHEMA).await.map_err(io)?,
        Some(1) => transaction
            .batch_execute(MIGRATE_FROM_1)
            .await
            .map_err(io)?,
        Some(SCHEMA_VERSION) => {}
        Some(later) => {
            return Err(OutboxError::invalid(
                path,
                format!("its schema is version {later}, written by a later version of this crate"),
            ))
        }
    }
    transaction.commit().await.map_err(io)
}
