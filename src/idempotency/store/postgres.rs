//! The store for replicas: one PostgreSQL table shared by every server that
//! connects to it, a running request's claim held as a lease.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Row, Statement};

use super::{Begin, Claim, Fingerprint, KeptResponse, Store, StoreError, StoreFuture};
use crate::{postgres::Target, sync::lock, ConfigError};

/// The default bound on each statement.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default lease of a claim.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How often expired rows are deleted.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// The most rows one cleanup statement deletes; a cleanup runs at most
/// [`CLEANUP_BATCHES`] of them.
const CLEANUP_BATCH: i64 = 1_000;
const CLEANUP_BATCHES: usize = 10;
/// The longest table name taken: the index's name, the table's and
/// `_expires`, stays within PostgreSQL's 63 bytes.
const MAX_TABLE_LEN: usize = 48;
/// The most headers a stored response may hold when read back.
const MAX_STORED_HEADERS: usize = 64;
/// How many times a claim is tried while the key changes hands under it.
const CLAIM_TRIES: usize = 3;
/// The connections of a store: concurrent commits on different connections
/// share the server's WAL flushes, where one connection runs them in turn.
const CONNECTIONS: usize = 4;
/// The advisory lock the schema is created under: a constant of this
/// crate's own.
const SCHEMA_LOCK: i64 = 0x7472_7920_6964_656d;

/// Keys in a PostgreSQL table shared by the replicas of a server behind a
/// load balancer (features `idempotency` and `postgres`).
///
/// ```no_run
/// use tower_terminal_retry::idempotency::{IdempotencyLayer, PostgresStore};
///
/// # async fn receiver() -> Result<(), Box<dyn std::error::Error>> {
/// let url = std::env::var("DATABASE_URL")?;
/// let store = PostgresStore::connect(&url, "idempotency_keys").await?;
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # The table
///
/// Created by [`connect`](PostgresStore::connect) if missing (under an
/// advisory lock, so that replicas starting at once do not race on it). Its
/// name is 1 to 48 letters, digits and underscores, not starting with a
/// digit, and is used as a quoted identifier (case counts); put it in
/// another schema through the URL's `search_path`.
///
/// ```sql
/// CREATE TABLE "idempotency_keys" (
///     key           text PRIMARY KEY,      -- at most 255 bytes of visible ASCII
///     fingerprint   bytea NOT NULL,        -- SHA-256: method, path and query, body
///     state         text NOT NULL,         -- 'running' or 'finished'
///     holder        text,                  -- while running: the claiming store's id
///     claim         bigint,                -- while running: the claim's number
///     lease_until   timestamptz,           -- while running: when the lease runs out
///     status        smallint,              -- once finished, if kept
///     header_names  text[],                -- the headers that describe the content
///     header_values bytea[],
///     body          bytea,
///     expires_at    timestamptz NOT NULL   -- when the row may be deleted
/// );
/// CREATE INDEX "idempotency_keys_expires" ON "idempotency_keys" (expires_at);
/// ```
///
/// **What is stored:** the key, the request's fingerprint (a hash: not the
/// request), and for a finished request its status, body and the headers
/// that describe its content: `Content-Type`, `Content-Encoding`,
/// `Content-Language`, `Content-Location`, `Content-Disposition`,
/// `Location`, `ETag`, `Last-Modified`, `Cache-Control`, `Expires`. Never
/// `Set-Cookie`, `Authorization`-like or custom headers, nor any value
/// marked sensitive. A body may still hold personal data: grant the table
/// as you would the data it answers with.
///
/// # Claims and leases
///
/// A request reads its key's row first: a repeat is answered from that one
/// read, which commits nothing. A key with no row, or a free one, is
/// claimed with one `INSERT .. ON CONFLICT DO UPDATE` that takes the row
/// only if it is absent, finished and expired, or running with its lease
/// run out; it writes this store's id, the claim's number and
/// `lease_until = now() + lease`. While the request
/// runs, this store renews the leases of the keys it holds every third of
/// the lease (30 s by default, [`lease`](PostgresStore::lease)). Finishing
/// and freeing name the holder and the claim's number: a replica whose
/// lease ran out and was taken over changes nothing. A replica killed
/// mid-request stops renewing: its keys are free once their lease runs out,
/// and the sender's next retry runs the handler.
///
/// # Bounds
///
/// Every statement is bounded ([`timeout`](PostgresStore::timeout), 5 s by
/// default), on the server (`statement_timeout`) and in the client; a
/// statement that runs out is a [`StoreError::Unavailable`], which the
/// layer answers with `503` and `Retry-After`. A row holds at most a key of
/// 255 bytes, 32 bytes of fingerprint, the layer's `max_body` and 16 KiB of
/// headers. Rows are deleted once expired, by this store every minute, a
/// thousand at a time through the index on `expires_at`: the table holds
/// about the retention's worth of keys, never a scan per request. A row
/// read back is checked (status, fingerprint, headers) before it is used:
/// a damaged one is a [`StoreError::Damaged`].
///
/// # Connections
///
/// Four connections, taken in turn, each opened when first needed, its
/// statements prepared once: concurrent first requests commit on different
/// connections, so that their commits share the server's flushes. A lost
/// connection fails the operations under way on it (the layer answers
/// `503`) and the next operation that needs it connects again.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where to connect, as the crate connects to PostgreSQL (TLS by
    /// `sslmode`, bounded waits); it may hold a password, never shown.
    target: Target,
    /// The table's name, quoted.
    table: String,
    /// Server, database and table, no password: for `Debug`.
    shown: String,
    /// This store's id in `holder`: a fresh uuid.
    holder: String,
    claims: AtomicU64,
    lease_ms: AtomicU64,
    timeout_ms: AtomicU64,
    connections: Vec<Mutex<Option<Arc<Connection>>>>,
    /// The connection the next operation takes.
    turn: AtomicU64,
    /// Taken while connecting, so that one task connects at a time.
    connecting: tokio::sync::Mutex<()>,
    /// The keys claimed here, and their claims' numbers: their leases are
    /// renewed.
    held: Mutex<HashMap<String, u64>>,
    upkeep: Mutex<Option<JoinHandle<()>>>,
    /// Wakes the upkeep when the lease changes, for its next tick.
    lease_changed: Arc<tokio::sync::Notify>,
}

/// A connection and its statements, prepared once.
struct Connection {
    client: Client,
    claim: Statement,
    read: Statement,
    finish: Statement,
    release: Statement,
    renew: Statement,
    cleanup: Statement,
}

impl PostgresStore {
    /// Connects to the PostgreSQL database at `url` (a `postgres://` URL or
    /// a `key=value` string, read as
    /// [`Outbox::connect`](crate::outbox::Outbox::connect) reads it: TLS by
    /// `sslmode` and `sslrootcert`, bounded by `connect_timeout`), and keeps
    /// the keys in `table`, created if missing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for a table name other than 1 to 48 ASCII
    /// letters, digits and underscores not starting with a digit, or a URL
    /// that cannot be read, before any connection;
    /// [`StoreError::Unavailable`] when the database cannot be reached or
    /// the table cannot be created.
    pub async fn connect(url: &str, table: &str) -> Result<PostgresStore, StoreError> {
        let target = Target::parse(url).map_err(|error| StoreError::Invalid {
            reason: error.to_string(),
        })?;
        let shown = format!("{target}?table={table}");
        let shared = Arc::new(Shared {
            target,
            table: quoted(table)?,
            shown,
            holder: uuid::Uuid::new_v4().to_string(),
            claims: AtomicU64::new(0),
            lease_ms: AtomicU64::new(millis(DEFAULT_LEASE)),
            timeout_ms: AtomicU64::new(millis(DEFAULT_TIMEOUT)),
            connections: (0..CONNECTIONS).map(|_| Mutex::new(None)).collect(),
            turn: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            held: Mutex::new(HashMap::new()),
            upkeep: Mutex::new(None),
            lease_changed: Arc::new(tokio::sync::Notify::new()),
        });
        shared.create_table().await?;
        shared.connection().await?;
        let changed = shared.lease_changed.clone();
        let upkeep = tokio::spawn(upkeep(Arc::downgrade(&shared), changed));
        *lock(&shared.upkeep) = Some(upkeep);
        Ok(PostgresStore { shared })
    }

    /// How long a claim holds its key without renewal (default 30 s): a
    /// replica killed mid-request frees its keys this long after its last
    /// renewal, at most. Longer means fewer renewals; shorter, a faster
    /// retry after a crash.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSetting`] for a lease under 1 s or over
    /// an hour.
    pub fn lease(self, lease: Duration) -> Result<PostgresStore, ConfigError> {
        if lease < Duration::from_secs(1) || lease > Duration::from_secs(3600) {
            return Err(ConfigError::InvalidSetting {
                reason: "a lease must be from 1 second to 1 hour",
            });
        }
        self.shared.lease_ms.store(millis(lease), Ordering::Relaxed);
        self.shared.lease_changed.notify_one();
        Ok(self)
    }

    /// The longest a statement may take (default 5 s), on the server and
    /// in the client; past it, the request is answered `503`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSetting`] for a bound under 10 ms or over
    /// a minute.
    pub fn timeout(self, timeout: Duration) -> Result<PostgresStore, ConfigError> {
        if timeout < Duration::from_millis(10) || timeout > Duration::from_secs(60) {
            return Err(ConfigError::InvalidSetting {
                reason: "a statement timeout must be from 10 ms to 1 minute",
            });
        }
        self.shared
            .timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
        // The server's bound is set per connection: new ones take it.
        for connection in &self.shared.connections {
            lock(connection).take();
        }
        Ok(self)
    }
}

/// Opens a connection to the database of `target`, driven on the current
/// runtime: the one place this store connects.
async fn open(target: &Target) -> Result<Client, StoreError> {
    target
        .connect()
        .await
        .map_err(|error| StoreError::Unavailable {
            reason: error.to_string(),
        })
}

impl Shared {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// `operation`, bounded by the statement timeout.
    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, operation).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable {
                reason: format!("no answer from the database within {timeout:?}"),
            }),
        }
    }

    /// The next connection in turn, opened if it is not (or was lost).
    async fn connection(&self) -> Result<Arc<Connection>, StoreError> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
        let slot = &self.connections[turn % CONNECTIONS];
        if let Some(connection) = open_in(slot) {
            return Ok(connection);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = open_in(slot) {
            return Ok(connection);
        }
        let client = open(&self.target).await?;
        let connection = Arc::new(self.bounded(self.prepare(client)).await?);
        *lock(slot) = Some(connection.clone());
        Ok(connection)
    }

    /// Connects, bounds statements on the server, and prepares them.
    async fn prepare(&self, client: Client) -> Result<Connection, tokio_postgres::Error> {
        let timeout = format!("{}ms", self.timeout().as_millis());
        client
            .execute(
                "SELECT set_config('statement_timeout', $1, false)",
                &[&timeout],
            )
            .await?;
        let table = &self.table;
        let claim = client
            .prepare(&format!(
                "INSERT INTO {table} AS t \
                     (key, fingerprint, state, holder, claim, lease_until, expires_at) \
                 VALUES ($1, $2, 'running', $3, $4, \
                     now() + $5::bigint * interval '1 millisecond', \
                     now() + ($5::bigint + $6::bigint) * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE SET \
                     fingerprint = excluded.fingerprint, state = 'running', \
                     holder = excluded.holder, claim = excluded.claim, \
                     lease_until = excluded.lease_until, status = NULL, \
                     header_names = NULL, header_values = NULL, body = NULL, \
                     expires_at = excluded.expires_at \
                 WHERE (t.state = 'running' AND t.lease_until < now()) \
                    OR (t.state = 'finished' AND t.expires_at <= now()) \
                 RETURNING claim"
            ))
            .await?;
        let read = client
            .prepare(&format!(
                "SELECT state, fingerprint, status, header_names, header_values, body, \
                     (state = 'running' AND lease_until < now()) \
                         OR (state = 'finished' AND expires_at <= now()) AS free \
                 FROM {table} WHERE key = $1"
            ))
            .await?;
        let finish = client
            .prepare(&format!(
                "UPDATE {table} SET state = 'finished', holder = NULL, claim = NULL, \
                     lease_until = NULL, status = $4, header_names = $5, \
                     header_values = $6, body = $7, \
                     expires_at = now() + $8::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND holder = $2 AND claim = $3 AND state = 'running'"
            ))
            .await?;
        let release = client
            .prepare(&format!(
                "DELETE FROM {table} \
                 WHERE key = $1 AND holder = $2 AND claim = $3 AND state = 'running'"
            ))
            .await?;
        let renew = client
            .prepare(&format!(
                "UPDATE {table} SET lease_until = now() + $3::bigint * interval '1 millisecond' \
                 WHERE key = ANY($1) AND holder = $2 AND state = 'running'"
            ))
            .await?;
        let cleanup = client
            .prepare(&format!(
                "DELETE FROM {table} WHERE key IN (SELECT key FROM {table} \
                     WHERE expires_at < now() \
                       AND (state = 'finished' OR lease_until < now()) \
                     LIMIT $1)"
            ))
            .await?;
        Ok(Connection {
            client,
            claim,
            read,
            finish,
            release,
            renew,
            cleanup,
        })
    }

    /// Creates the table and its index if missing, under an advisory lock.
    async fn create_table(&self) -> Result<(), StoreError> {
        let table = &self.table;
        let index = quoted(&format!("{}_expires", &table[1..table.len() - 1]))?;
        let schema = format!(
            "SELECT pg_advisory_xact_lock({SCHEMA_LOCK});
             CREATE TABLE IF NOT EXISTS {table} (
                 key text PRIMARY KEY CHECK (octet_length(key) BETWEEN 1 AND 255),
                 fingerprint bytea NOT NULL,
                 state text NOT NULL CHECK (state IN ('running', 'finished')),
                 holder text,
                 claim bigint,
                 lease_until timestamptz,
                 status smallint,
                 header_names text[],
                 header_values bytea[],
                 body bytea,
                 expires_at timestamptz NOT NULL
             );
             CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);"
        );
        let mut client = open(&self.target).await?;
        let create = async {
            let transaction = client.transaction().await?;
            transaction.batch_execute(&schema).await?;
            transaction.commit().await
        };
        self.bounded(create).await
    }

    async fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        retention: Duration,
    ) -> Result<Begin, StoreError> {
        let connection = self.connection().await?;
        let claim = self.claims.fetch_add(1, Ordering::Relaxed) + 1;
        let lease = i64::try_from(self.lease_ms.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        let retention = i64::try_from(millis(retention)).unwrap_or(i64::MAX);
        let fingerprint_bytes: &[u8] = fingerprint.as_bytes();
        for _ in 0..CLAIM_TRIES {
            let row = self
                .bounded(connection.client.query_opt(&connection.read, &[&key]))
                .await?;
            match row {
                Some(row) if !row.try_get::<_, bool>("free").map_err(damaged)? => {
                    return found(&row)
                }
                // No row, or one free to take: claim it.
                _ => {}
            }
            let claimed = self
                .bounded(connection.client.query_opt(
                    &connection.claim,
                    &[
                        &key,
                        &fingerprint_bytes,
                        &self.holder,
                        &as_bigint(claim),
                        &lease,
                        &retention,
                    ],
                ))
                .await?;
            if claimed.is_some() {
                lock(&self.held).insert(key.to_owned(), claim);
                return Ok(Begin::Claimed(Claim::new(key, claim)));
            }
            // Another request claimed it between the read and the claim:
            // read again.
        }
        Err(StoreError::Unavailable {
            reason: "the key changed hands during every try to claim it".into(),
        })
    }

    async fn finish(
        &self,
        claim: &Claim,
        response: Option<KeptResponse>,
        retention: Duration,
    ) -> Result<(), StoreError> {
        let connection = self.connection().await?;
        let (status, names, values, body) = match &response {
            Some(kept) => {
                let (names, values): (Vec<&str>, Vec<&[u8]>) = kept
                    .headers()
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_bytes()))
                    .unzip();
                (
                    Some(kept.status().as_u16() as i16),
                    Some(names),
                    Some(values),
                    Some(kept.body().as_ref()),
                )
            }
            None => (None, None, None, None),
        };
        let retention = i64::try_from(millis(retention)).unwrap_or(i64::MAX);
        let result = self
            .bounded(connection.client.execute(
                &connection.finish,
                &[
                    &claim.key(),
                    &self.holder,
                    &as_bigint(claim.token()),
                    &status,
                    &names,
                    &values,
                    &body,
                    &retention,
                ],
            ))
            .await;
        self.forget(claim);
        if result? == 0 {
            tracing::warn!(
                "a response was not kept: its claim's lease ran out and another request took \
                 the key (make the lease longer than the slowest handler)"
            );
        }
        Ok(())
    }

    async fn release(&self, claim: &Claim) -> Result<(), StoreError> {
        self.forget(claim);
        let connection = self.connection().await?;
        self.bounded(connection.client.execute(
            &connection.release,
            &[&claim.key(), &self.holder, &as_bigint(claim.token())],
        ))
        .await
        .map(drop)
    }

    /// Stops renewing the lease of `claim`.
    fn forget(&self, claim: &Claim) {
        let mut held = lock(&self.held);
        if held.get(claim.key()) == Some(&claim.token()) {
            held.remove(claim.key());
        }
    }

    /// Renews the leases of the keys held here.
    async fn renew(&self) -> Result<(), StoreError> {
        let keys: Vec<String> = lock(&self.held).keys().cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let connection = self.connection().await?;
        let lease = i64::try_from(self.lease_ms.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        self.bounded(
            connection
                .client
                .execute(&connection.renew, &[&keys, &self.holder, &lease]),
        )
        .await
        .map(drop)
    }

    /// Deletes expired rows, a batch at a time.
    async fn clean_up(&self) -> Result<(), StoreError> {
        let connection = self.connection().await?;
        for _ in 0..CLEANUP_BATCHES {
            let deleted = self
                .bounded(
                    connection
                        .client
                        .execute(&connection.cleanup, &[&CLEANUP_BATCH]),
                )
                .await?;
            if deleted < CLEANUP_BATCH as u64 {
                break;
            }
        }
        Ok(())
    }
}

/// The connection in `slot`, if it is open.
fn open_in(slot: &Mutex<Option<Arc<Connection>>>) -> Option<Arc<Connection>> {
    lock(slot)
        .as_ref()
        .filter(|connection| !connection.client.is_closed())
        .cloned()
}

/// Renews the leases held every third of the lease, and deletes expired
/// rows every minute, while the store lives. Holds the store only while it works, so that a store dropped (a replica
/// going away) stops renewing at once.
async fn upkeep(shared: Weak<Shared>, lease_changed: Arc<tokio::sync::Notify>) {
    let mut last_cleanup: Option<tokio::time::Instant> = None;
    loop {
        let Some(lease) = shared
            .upgrade()
            .map(|shared| shared.lease_ms.load(Ordering::Relaxed))
        else {
            return;
        };
        // A new lease starts a new tick.
        let tick = Duration::from_millis(lease / 3);
        if tokio::time::timeout(tick, lease_changed.notified())
            .await
            .is_ok()
        {
            continue;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(error) = shared.renew().await {
            tracing::warn!(error = %error, "the idempotency store's leases could not be renewed");
        }
        if last_cleanup.is_none_or(|at| at.elapsed() >= CLEANUP_EVERY) {
            last_cleanup = Some(tokio::time::Instant::now());
            if let Err(error) = shared.clean_up().await {
                tracing::warn!(error = %error, "the idempotency store's expired keys stay for now");
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(upkeep) = lock(&self.upkeep).take() {
            upkeep.abort();
        }
    }
}

/// What a row says of a key that is not free.
fn found(row: &Row) -> Result<Begin, StoreError> {
    let fingerprint: &[u8] = row.try_get("fingerprint").map_err(damaged)?;
    let fingerprint = <[u8; 32]>::try_from(fingerprint)
        .map(Fingerprint::from_bytes)
        .map_err(|_| damaged_because("a fingerprint that is not 32 bytes"))?;
    let state: &str = row.try_get("state").map_err(damaged)?;
    if state == "running" {
        return Ok(Begin::Running { fingerprint });
    }
    let Some(status) = row.try_get::<_, Option<i16>>("status").map_err(damaged)? else {
        return Ok(Begin::Finished {
            fingerprint,
            response: None,
        });
    };
    let status = u16::try_from(status)
        .ok()
        .and_then(|status| StatusCode::from_u16(status).ok())
        .ok_or_else(|| damaged_because("a status that is not one"))?;
    let names: Vec<&str> = row.try_get("header_names").map_err(damaged)?;
    let values: Vec<&[u8]> = row.try_get("header_values").map_err(damaged)?;
    if names.len() != values.len() || names.len() > MAX_STORED_HEADERS {
        return Err(damaged_because("headers that do not pair up, or too many"));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in names.into_iter().zip(values) {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| damaged_because("a header name that is not one"))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| damaged_because("a header value that is not one"))?;
        headers.append(name, value);
    }
    let body: Vec<u8> = row.try_get("body").map_err(damaged)?;
    Ok(Begin::Finished {
        fingerprint,
        // Filtered again: a row written by another program keeps only the
        // headers that describe the content too.
        response: Some(KeptResponse::new(status, &headers, Bytes::from(body))),
    })
}

/// The table name, checked and quoted.
fn quoted(table: &str) -> Result<String, StoreError> {
    let mut bytes = table.bytes();
    let starts_well = bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_');
    let rest_well = bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
    if !starts_well || !rest_well || table.len() > MAX_TABLE_LEN {
        return Err(StoreError::Invalid {
            reason: format!(
                "a table name is 1 to {MAX_TABLE_LEN} ASCII letters, digits and underscores, \
                 not starting with a digit"
            ),
        });
    }
    Ok(format!("\"{table}\""))
}

fn unavailable(error: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable {
        reason: error.to_string(),
    }
}

fn damaged(error: tokio_postgres::Error) -> StoreError {
    damaged_because(&error.to_string())
}

fn damaged_because(reason: &str) -> StoreError {
    StoreError::Damaged {
        reason: reason.to_owned(),
    }
}

/// A claim's number as PostgreSQL's bigint (wrapping, as both ends do).
fn as_bigint(claim: u64) -> i64 {
    claim as i64
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.shared.shown)
            .field("holder", &self.shared.holder)
            .field("held", &lock(&self.shared.held).len())
            .finish_non_exhaustive()
    }
}

impl Store for PostgresStore {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        retention: Duration,
    ) -> StoreFuture<Begin> {
        let (shared, key) = (self.shared.clone(), key.to_owned());
        StoreFuture::new(async move { shared.begin(&key, fingerprint, retention).await })
    }

    fn finish(
        &self,
        claim: &Claim,
        response: Option<KeptResponse>,
        retention: Duration,
    ) -> StoreFuture<()> {
        let (shared, claim) = (self.shared.clone(), claim.clone());
        StoreFuture::new(async move { shared.finish(&claim, response, retention).await })
    }

    fn release(&self, claim: &Claim) -> StoreFuture<()> {
        let (shared, claim) = (self.shared.clone(), claim.clone());
        StoreFuture::new(async move { shared.release(&claim).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_identifiers_and_quoted() {
        assert_eq!(quoted("idempotency_keys").unwrap(), "\"idempotency_keys\"");
        assert_eq!(quoted("_Keys2").unwrap(), "\"_Keys2\"");
        assert!(quoted(&"k".repeat(MAX_TABLE_LEN)).is_ok());
        for bad in [
            "",
            "2keys",
            "keys; DROP TABLE users",
            "keys\"",
            "public.keys",
            "clés",
            &"k".repeat(MAX_TABLE_LEN + 1),
        ] {
            assert!(
                matches!(quoted(bad), Err(StoreError::Invalid { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_bad_table_or_url_is_refused_before_any_connection() {
        // Nothing listens on port 1: a connection would fail otherwise.
        for (url, table) in [
            ("postgres://postgres@127.0.0.1:1/postgres", "bad name"),
            ("postgres://[::1", "keys"),
        ] {
            let error = PostgresStore::connect(url, table).await.unwrap_err();
            assert!(matches!(error, StoreError::Invalid { .. }), "{error}");
        }
    }
}
