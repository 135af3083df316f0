//! A durable write-ahead outbox: idempotent requests that survive crashes and
//! outages of any length (enable the `outbox` feature).
//!
//! A terminal report that lives only in memory is lost when the process dies
//! during its backoff, when the machine sleeps, or when the outage outlasts
//! the retry schedule. The outbox keeps it on disk from before its first
//! attempt until the server takes it:
//!
//! - [`Outbox`] is the store: one [redb](https://docs.rs/redb) file, crash
//!   safe, locked against a second process. Each request is committed with an
//!   fsync before its first attempt leaves; concurrent requests share one
//!   commit (group commit). Sensitive headers, `Authorization`,
//!   `Proxy-Authorization` and `Cookie` are never written; each request gets
//!   an [`IDEMPOTENCY_KEY`] header, stored with it and the same on every
//!   attempt, replay and restart. One request per key: a second one under a
//!   key still stored is refused, the first stands.
//! - [`Dispatcher`] sends what is stored over your own tower stack, with the
//!   [`TerminalRetryLayer`](crate::TerminalRetryLayer) inside. Only a 2xx
//!   delivers a request. One whose retries run out stays stored
//!   ([`Delivery::Queued`]); a replay worker delivers it once the server is
//!   back, however long that takes.
//! - The replay keeps a lane per destination (the origin of the request's
//!   URI: scheme, host and port), so that one receiver that is dead, paused,
//!   slow or flooded holds up no other. While a destination is down it gets
//!   one probe at a time (its oldest request), on a jittered backoff capped
//!   at the replay interval, and nothing sooner than a `Retry-After` it
//!   asked for (up to the layer's [`RetryAfter`](crate::RetryAfter) cap);
//!   as soon as a request to it succeeds (a probe, a foreground delivery,
//!   or any call [observed](crate::Recovery::observe) by its
//!   [`Recovery`](crate::Recovery)) it sends what is stored for it, oldest
//!   first, at most [`Replay::rate`] a second (100 by default): a server
//!   that has just come back is not hit by its whole backlog at once.
//!   Destinations with work are served in turn, each holding at most
//!   [`DispatcherBuilder::per_destination_concurrency`] of the
//!   [`Replay::concurrency`] slots; a destination new to the replay (after
//!   a restart, say) gets one request first, the rest once it answers.
//!   [`DispatcherBuilder::give_up_after`] quarantines the requests of a
//!   destination down too long; [`Outbox::destinations`] lists each
//!   destination with its state ([`Destination`]). Each record is read
//!   again once claimed, so that one delivered meanwhile in the foreground
//!   is not sent again.
//! - A request refused for good (any 4xx but 408 and 429, and 1xx and 3xx:
//!   a redirect is not followed, its failure names where it pointed) is
//!   replaced by its fallback, if any (stored in the same commit that
//!   retires it), or quarantined: kept, listed by [`Outbox::quarantined`],
//!   never retried until [`Outbox::requeue`]. A `409 Conflict` says the
//!   request is superseded (its task belongs to another run, or already
//!   ended otherwise): no fallback, the record is retired
//!   ([`Delivery::Superseded`]).
//!
//! The guarantee is at-least-once delivery to an idempotent server, durable
//! once [`Dispatch::stored`] says [`Durability::Stored`]. A crash before that
//! commit loses the request; the server must treat replays as no-ops (the
//! idempotency key lets it tell them apart). A store that cannot be written
//! (a full disk, an I/O error) does not stop the delivery: the request is
//! still sent in process, an `error` event says it is not durable, and
//! [`Dispatch::stored`] says [`Durability::NotStored`]. The replay, though,
//! waits until the store can be written again (asking it to recover once per
//! replay interval): a delivery it could not record would be sent again and
//! again. A record delivered whose removal failed is remembered in memory,
//! not sent again, and removed once the store recovers.
//!
//! What is stored, and what a server sends back, is not trusted:
//!
//! - With [`DispatcherBuilder::origin`], requests go to that origin only: a
//!   stored request for another one (queued under an old base URL, or
//!   planted in the file) is quarantined unsent, with an `error` event
//!   naming its host, and [`Dispatcher::send`] refuses one
//!   ([`Durability::Refused`]).
//! - A request whose URI holds credentials (`http://user:password@host/`) is
//!   refused, neither stored nor sent, and its password never shown; put
//!   credentials in a header the sending service adds.
//! - Text taken from a response (its start, a redirect's `Location`) is
//!   capped, its control characters escaped, and each secret given to
//!   [`DispatcherBuilder::redact`] replaced by `[redacted]`, before it goes
//!   to an event, the outbox, the fallback or [`Delivery::Undelivered`].
//! - Attempt counts saturate rather than overflow.
//!
//! A stored request is an [`Entry`]: a plain record with public fields
//! (`key`, `method`, `uri`, `body`, `idempotency_key`, `tag`, `stored_at`,
//! `attempts`, `last_failure`, `quarantined`), read by its users and changed
//! by the outbox only. A sender labels a request with a [`Tag`] (a request
//! extension) to know after a restart what it is without parsing it.
//!
//! # A shared outbox on PostgreSQL
//!
//! With the `postgres` feature, [`Outbox::connect`] keeps the requests in a
//! queue of a PostgreSQL database instead, shared by every process that
//! connects to it: a replica that dies or is rescheduled leaves its records
//! to the others. [`Outbox::enqueue`] stores a request inside the caller's
//! own transaction (the transactional outbox): it exists once that commits,
//! never if it rolls back, and a `NOTIFY` wakes the queue's dispatchers at
//! once. Everything else works as over a file: the dispatcher, its replay
//! and its rules, the idempotency key, fallbacks, quarantine.
//!
//! - **Schema.** One table, `terminal_retry_outbox`: `seq` (bigserial, the
//!   order of storage), `queue`, `key` (unique per queue: the first request
//!   per key stands), `state` (`pending` or `quarantined`), `record` (the
//!   request, encoded as in the file), `attempts`, `last_failure`, and the
//!   lease: `holder`, `lease_until`, `generation`; the primary key
//!   `(queue, seq)` and a partial index on `(queue, seq) WHERE state =
//!   'pending'`, so that listing one queue never walks another's records;
//!   the request's `origin`, and an index on `(queue, origin, state, seq)`
//!   that finds each destination's records. A second table,
//!   `terminal_retry_outbox_destination`, keeps each destination's state,
//!   shared by the queue's dispatchers, one row per `(queue, origin)` with
//!   records: `down_since`, `paused_until`, its probe (`probe_at`,
//!   `probe_delay_ms`, `probe_holder`, `probe_until`), `last_failure`. A
//!   version table, `terminal_retry_outbox_schema`, for migrations (version
//!   3). It is created when missing, and an earlier version migrated, in
//!   one transaction under `pg_advisory_xact_lock`, by whichever process
//!   connects first.
//! - **Claims are leases.** A record is claimed by one `UPDATE` that sets
//!   the holder (a uuid per [`Outbox`]), `lease_until = now() + lease` and
//!   the next generation, only where the lease is free or ran out. The
//!   lease ([`DispatcherBuilder::lease`], 30 s by default) is renewed every
//!   third of it while held and cleared on release. Every write to a claimed
//!   record (removal, failure count, fallback, quarantine) carries `AND
//!   generation = $g`: a holder whose lease ran out cannot undo the work of
//!   the one that took over. After a holder dies, the others take its
//!   records over within the lease and the replay interval.
//! - **Round trips.** No connection pool: queries pipeline on one
//!   connection, and concurrent inserts (and removals) are batched into one
//!   statement each, so a send costs about one commit: a send claims its
//!   new key in process and stores the record already leased, and
//!   statements are prepared once per connection. A second connection
//!   listens for notifications; a poll every replay interval (at most a few
//!   seconds) finds the records of dead holders.
//! - **Destinations are shared.** Each destination's state (down since
//!   when, its last failure, its pause, when its next probe is due and who
//!   holds it) is kept in the queue, so that every dispatcher on it honours
//!   it: one probe at a time to a destination that is down, across all of
//!   them (the probe is held as a lease: a dispatcher that dies holding it
//!   loses it), and a pause given to one is kept by all. Records are
//!   claimed a batch per destination in one statement.
//! - **A lost connection** is a transient failure: the operations under way
//!   fail, the store is not writable until it connects again (the replay
//!   waits, asking it to recover), nothing stored is lost.
//!
//! [`Outbox::pending`] and [`Outbox::quarantined`] read on a thread and a
//! connection of their own (they are not async);
//! [`Outbox::pending_count`] is the count as of the store's last write.
//! [`Outbox::path`] is a pseudo path naming the server, the database and
//! the queue, never the password.
//!
//! The module, by file: `delivery` (what a sender hears back), `builder`,
//! `dispatcher` (the handle and what one attempt does), `foreground` (a
//! request's first delivery), `lanes` (the replay: a scheduler over
//! destinations, each with its pace), `backoff` (the probes' and the
//! store's recoveries' delays), `destination` (what an operator sees of
//! one), `store` (the seam in front of the stores, claims and each
//! destination's shared state included, and the stores behind it: redb,
//! PostgreSQL), `record` (the entry and its encoding), `error`.
//!
//! A webhook sender that survives a restart:
//!
//! ```
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::Full;
//! use hyper_util::{client::legacy::Client, rt::TokioExecutor};
//! use tower_terminal_retry::outbox::{Delivery, Dispatcher, Durability, Outbox, Tag};
//! # use tower_terminal_retry::test_server::TestServer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let server = TestServer::scripted([]).await?;
//! # let directory = std::env::temp_dir().join(format!("outbox-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&directory)?;
//! let outbox = Outbox::open(directory.join("webhooks.redb"))?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let dispatcher = Dispatcher::builder(outbox, client).build()?;
//!
//! let mut event = Request::post(server.url("/hooks/order-paid"))
//!     .header("content-type", "application/json")
//!     .body(Bytes::from(r#"{"order":42}"#))?;
//! // Stored with it: after a restart, `Entry::tag` says what it is.
//! event.extensions_mut().insert(Tag::new("order-paid"));
//! let mut dispatch = dispatcher.send("order-42-paid", event);
//! assert_eq!(dispatch.stored().await, Durability::Stored); // safe on disk
//! assert_eq!(dispatch.await, Delivery::Delivered);
//! // The record is removed from the file just after.
//! # for _ in 0..500 {
//! #     if dispatcher.outbox().unwrap().pending()?.is_empty() { break }
//! #     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//! # }
//! assert!(dispatcher.outbox().unwrap().pending()?.is_empty());
//! # let key = server.requests()[0].headers["idempotency-key"].clone();
//! # assert_eq!(key.len(), 36);
//! # drop(dispatcher);
//! # std::fs::remove_dir_all(&directory)?;
//! # Ok(())
//! # }
//! ```

mod builder;
mod delivery;
mod destination;
mod dispatcher;
// Without a backend (feature `outbox`), what only a backend calls is unused.
#[cfg_attr(not(feature = "outbox"), allow(dead_code))]
mod error;
mod foreground;
mod lanes;
mod listing;
// Without a backend (feature `outbox`), what only a backend calls is unused.
#[cfg_attr(not(feature = "outbox"), allow(dead_code))]
mod record;
// Without a backend (feature `outbox`), what only a backend calls is unused.
#[cfg_attr(not(feature = "outbox"), allow(dead_code))]
mod store;

pub use builder::DispatcherBuilder;
pub use delivery::{Delivery, Dispatch, Durability};
pub use destination::Destination;
pub use dispatcher::{Dispatcher, Replay};
pub use error::{OutboxError, OutboxErrorKind};
pub use listing::{Cursor, Listing, Page};
pub use record::{Entry, Tag};
pub use store::Outbox;

/// The header each stored request is sent with: a key generated when it is
/// stored, the same on every attempt, replay and restart (the name of the
/// IETF httpapi draft).
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
