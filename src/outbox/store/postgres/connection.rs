//! The store's connection: one, bounded, with the statements it prepared;
//! connected again when lost.
//!
//! No pool: the store's queries pipeline on one connection (tokio-postgres
//! sends a query as soon as it is polled, without waiting for the answers
//! before it). Statements are prepared once per connection and kept:
//! preparing is a round trip. Every statement is bounded on the client
//! side too. A lost connection fails the operations under way (transient
//! errors) and makes the store unwritable; the next operation, or the
//! dispatcher's recovery, connects again.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio_postgres::{types::ToSql, Client, Row, SimpleQueryMessage, Statement};

use super::Shared;
use crate::{
    outbox::OutboxError,
    postgres::{ConnectError, Target},
    sync::lock,
};

/// The longest wait for the answer to a statement: longer than the
/// server's own `statement_timeout`, for a connection that answers nothing.
pub(super) const ANSWER_BOUND: Duration = Duration::from_secs(10);

/// The store's connection, with the statements it prepared: a statement is
/// prepared once per connection, not at every use (a round trip each).
///
/// Every statement is bounded here too, not only by the server's
/// `statement_timeout`: a connection that freezes without closing (a
/// network that drops packets, a server that stops) answers nothing, not
/// even a timeout. One left unanswered is dropped, and the next operation
/// connects again.
pub(super) struct Connection {
    client: Client,
    prepared: Mutex<HashMap<String, Statement>>,
    /// The longest wait for an answer.
    bound: Duration,
    /// A statement went unanswered: the connection is not used again.
    frozen: AtomicBool,
}

/// Why a statement failed.
#[derive(Debug)]
pub(super) enum Failed {
    /// The server said so, or the connection closed.
    Server(tokio_postgres::Error),
    /// No answer within the bound.
    Unanswered(Duration),
}

impl From<tokio_postgres::Error> for Failed {
    fn from(error: tokio_postgres::Error) -> Failed {
        Failed::Server(error)
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The server's own message: "db error" alone says nothing.
            Failed::Server(error) => match error.as_db_error() {
                Some(db) => write!(f, "{}: {}", db.severity(), db.message()),
                None => write!(f, "{error}"),
            },
            Failed::Unanswered(bound) => write!(
                f,
                "the database did not answer within {} ms: the connection is dropped",
                bound.as_millis()
            ),
        }
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failed::Server(error) => Some(error),
            Failed::Unanswered(_) => None,
        }
    }
}

impl Connection {
    pub(super) fn new(client: Client, bound: Duration) -> Connection {
        Connection {
            client,
            prepared: Mutex::new(HashMap::new()),
            bound,
            frozen: AtomicBool::new(false),
        }
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed() || self.frozen.load(Ordering::Relaxed)
    }

    /// `answer`, unless the bound passes first.
    async fn bounded<T>(
        &self,
        answer: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Failed> {
        match tokio::time::timeout(self.bound, answer).await {
            Ok(answer) => Ok(answer?),
            Err(_) => {
                self.frozen.store(true, Ordering::Relaxed);
                Err(Failed::Unanswered(self.bound))
            }
        }
    }

    /// Whether `failed` says that the table changed under a prepared
    /// statement (a migration, a column altered): the statements are then
    /// prepared again, once, rather than failing until a restart.
    fn replanned(&self, failed: &Failed) -> bool {
        let Failed::Server(error) = failed else {
            return false;
        };
        let stale = error.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED);
        if stale {
            lock(&self.prepared).clear();
        }
        stale
    }

    /// `sql`, prepared on this connection once.
    async fn statement(&self, sql: &str) -> Result<Statement, Failed> {
        if let Some(statement) = lock(&self.prepared).get(sql) {
            return Ok(statement.clone());
        }
        // Two tasks preparing one statement at once both succeed; the
        // second's copy replaces the first's, which is harmless.
        let statement = self.bounded(self.client.prepare(sql)).await?;
        lock(&self.prepared).insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(super) async fn query(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.query(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.query(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    pub(super) async fn query_opt(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.query_opt(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.query_opt(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    pub(super) async fn query_one(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.query_one(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.query_one(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    pub(super) async fn execute(
        &self,
        sql: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Failed> {
        let statement = self.statement(sql).await?;
        match self
            .bounded(self.client.execute(&statement, parameters))
            .await
        {
            Err(failed) if self.replanned(&failed) => {
                let statement = self.statement(sql).await?;
                self.bounded(self.client.execute(&statement, parameters))
                    .await
            }
            answer => answer,
        }
    }

    pub(super) async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Failed> {
        self.bounded(self.client.simple_query(sql)).await
    }
}

impl Shared {
    /// The connection, connecting again if it was lost.
    pub(super) async fn client(&self) -> Result<Arc<Connection>, OutboxError> {
        let mut client = self.client.lock().await;
        if let Some(open) = client.as_ref().filter(|open| !open.is_closed()) {
            return Ok(open.clone());
        }
        *client = None;
        match open(&self.target, &self.path).await {
            Ok(opened) => {
                let opened = Arc::new(Connection::new(opened, ANSWER_BOUND));
                *client = Some(opened.clone());
                Ok(opened)
            }
            Err(error) => {
                self.writable.store(false, Ordering::Release);
                Err(error)
            }
        }
    }

    /// The error of a statement: a lost connection makes the store
    /// unwritable until it is connected again.
    pub(super) fn failed(&self, error: impl Into<Failed>) -> OutboxError {
        let error = error.into();
        // Errors without an SQL state come from the connection, not from
        // the statement; so does an answer that never came.
        let lost = match &error {
            Failed::Server(error) => error.is_closed() || error.code().is_none(),
            Failed::Unanswered(_) => true,
        };
        if lost {
            self.writable.store(false, Ordering::Release);
        }
        OutboxError::io(&self.path, error)
    }
}

/// Connects, with the connection driven on the current runtime.
pub(super) async fn open(target: &Target, path: &Path) -> Result<Client, OutboxError> {
    target
        .connect()
        .await
        .map_err(|error| connect_error(path, error))
}

/// A connection string that cannot be used makes an invalid outbox; a
/// failed connection, one that cannot be read or written.
pub(super) fn connect_error(path: &Path, error: ConnectError) -> OutboxError {
    match error {
        ConnectError::Invalid(_) => OutboxError::invalid(path, error.to_string()),
        error => OutboxError::io(path, error),
    }
}
