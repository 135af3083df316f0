//! A task-callback client: a daemon's reports to its server, with the terminal
//! ones retried until they land.
//!
//! [`TaskClient`] sends a daemon's task callbacks over hyper-util's client.
//! The terminal routes, `complete` and `fail`, taking a [`TaskResult`], go
//! through the [`TerminalRetryLayer`](crate::TerminalRetryLayer) with a
//! per-attempt timeout inside it; the others (start, progress, usage, session) are tried
//! once, through the same connection pool.
//!
//! [`report_task_result`](TaskClient::report_task_result) is what a daemon
//! calls when an agent finishes:
//!
//! - a completed result is sent to `complete`. If it still fails transiently
//!   after the whole schedule, the task is left running (an `error` event):
//!   reporting a failure instead would turn a success red. Only a permanent
//!   rejection falls back to `fail`, once, with reason `agent_error`;
//! - any other result is sent to `fail`;
//! - the delivery runs on its own tokio task: dropping the returned future
//!   does not stop it, and [`TaskClient::shutdown`] waits for the reports in
//!   flight and hands back those that could not be delivered.
//!
//! With an outbox (`TaskClientBuilder::outbox`, feature `outbox`), each
//! report is committed to disk before its first attempt
//! (`ReportFuture::stored` says when). A completion whose retries run out is
//! then [`Queued`](ReportOutcome::Queued) instead of left running, and a
//! replay worker delivers it once the server is back, across restarts; the
//! `outbox` module says what that guarantees.
//!
//! All routes share one [`Recovery`](crate::Recovery), the client's
//! [`policy`](TaskClientBuilder::policy)'s, on by default: any successful call (a `start`, a
//! `progress`, a report) ends the backoff of the terminal reports waiting on
//! the same server, at most 50 a second.
//!
//! Every request is a `POST` of JSON to `{base}/api/daemon/tasks/{id}/...`
//! (the id path-escaped) with `Content-Type: application/json`,
//! `X-Client-Platform: daemon`, `X-Client-OS` (`linux`, `macos`, `windows`),
//! `X-Client-Version` when set and `Authorization: Bearer` when a token is
//! set, marked sensitive and sent to the base URL's origin only. NUL bytes
//! are removed from every string in a body. A task id that is empty, holds a
//! control character (NUL included) or is longer than 1024 bytes is refused
//! before anything is sent or stored.
//!
//! At most [`concurrency_limit`](TaskClientBuilder::concurrency_limit)
//! requests are in flight at once (by default 64), across every route and
//! the outbox's replay, each until its response body has been read or
//! dropped. Only a 2xx answer is a
//! success: a redirect is not followed (the error names where it points,
//! set the base URL to the final URL). Text taken from the server's answers
//! (error bodies) is cleaned before it goes into an [`Error`], an event, a
//! fallback report or the outbox: the client's token is replaced by
//! `[redacted]` (in any ASCII case, percent-encoded or not), control
//! characters are escaped, and it is cut to 4 KiB.
//!
//! ```
//! use std::time::Duration;
//! use http::StatusCode;
//! use tower_terminal_retry::client::{ReportOutcome, TaskClient, TaskResult};
//! use tower_terminal_retry::test_server::{Action, Fault, TaskServer, TaskState};
//! use tower_terminal_retry::{Recovery, Schedule, TerminalRetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = TaskServer::start().await?;
//! server.add_tasks(["t1"]);
//! // The first two attempts of `complete` meet a 502.
//! let bad_gateway = Fault::Status(StatusCode::BAD_GATEWAY);
//! server.script("t1", Action::Complete, [bad_gateway; 2]);
//!
//! let client = TaskClient::builder(server.url())
//!     .token("secret")
//!     .policy(
//!         TerminalRetryPolicy::default()
//!             .with_schedule(Schedule::new([Duration::from_secs(1); 3])?)
//!             .with_recovery(Recovery::default()),
//!     )
//!     .build()?;
//! let outcome = client.report_task_result("t1", TaskResult::completed("all done")).await;
//!
//! assert_eq!(outcome, ReportOutcome::Completed);
//! assert_eq!(server.state("t1"), Some(TaskState::Completed));
//! let routes: Vec<Action> = server.attempts().iter().map(|attempt| attempt.action).collect();
//! assert_eq!(routes, [Action::Complete; 3]);
//! # Ok(())
//! # }
//! ```

mod base_url;
mod body;
mod builder;
mod delivery;
mod durable;
mod error;
mod in_flight;
mod limit;
mod report;
mod route;
mod task_client;
mod tls;
mod transport;

// The layers, each using only those before it: the data (body, report,
// error, route, base_url), one call (tls, limit, transport), the reports in
// flight and their delivery (in_flight, durable, delivery), the client, its
// builder.
pub use body::UsageEntry;
pub use builder::TaskClientBuilder;
pub use delivery::ReportFuture;
pub use error::{Error, ErrorKind};
pub use report::{Completion, Failure, ReportOutcome, TaskResult, UndeliveredReport};
pub use task_client::TaskClient;
#[cfg(feature = "rustls")]
pub use tls::TlsRoots;
