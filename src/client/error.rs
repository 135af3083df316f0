//! The client's one error type.

use std::{error::Error as StdError, fmt};

use http::{Method, StatusCode};
use tower::BoxError;

use crate::classify::Outcome;

/// Why a call of the [`TaskClient`](super::TaskClient) failed, or why it could
/// not be built: of which [`kind`](Error::kind), and whether a replay may
/// help ([`is_transient`](Error::is_transient)).
///
/// Whether a replay may help is decided once, by the crate's classifier (the
/// rule the retry layer used), and kept.
pub struct Error {
    /// Boxed, so that a `Result<(), Error>` is one word wide.
    inner: Box<Inner>,
}

/// What kind of failure an [`Error`] is: [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The client was refused when it was built: a bad base URL, token or
    /// version, a zero timeout or concurrency limit, no tokio runtime, a
    /// trust store that cannot be loaded.
    Config,
    /// The server answered with this status, which is not a success.
    Status(StatusCode),
    /// No status came back: a refused or reset connection, TLS, a body that
    /// could not be read.
    Transport,
    /// The per-attempt timeout elapsed before an answer.
    Timeout,
    /// The outbox (feature `outbox`) could not be opened (held by another
    /// live client, or not an outbox: the message names the file), read or
    /// written.
    Outbox,
}

struct Inner {
    kind: Kind,
    outcome: Outcome,
}

enum Kind {
    /// The client's configuration was refused when it was built.
    Config {
        message: String,
        source: Option<BoxError>,
    },
    /// The server answered with a status that is not a success.
    Status {
        route: Route,
        status: StatusCode,
        body: String,
    },
    /// No status came back: a refused or reset connection, TLS, an elapsed
    /// per-attempt timeout.
    Transport { route: Route, source: BoxError },
    /// The outbox could not be opened, read or written.
    #[cfg(feature = "outbox")]
    Outbox { source: BoxError },
}

/// The method and path of the request an error is about (no host: the base
/// URL is the client's, and may carry credentials in its user info).
struct Route {
    method: Method,
    path: String,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

impl Error {
    fn new(kind: Kind, outcome: Outcome) -> Error {
        Error {
            inner: Box::new(Inner { kind, outcome }),
        }
    }

    pub(super) fn config(message: impl Into<String>, source: Option<BoxError>) -> Error {
        Error::new(
            Kind::Config {
                message: message.into(),
                source,
            },
            Outcome::Permanent,
        )
    }

    /// A status the classifier did not call a success; `body` is the start of
    /// the response body, already cut to size.
    pub(super) fn rejected(
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
        outcome: Outcome,
    ) -> Error {
        Error::new(
            Kind::Status {
                route: Route { method, path },
                status,
                body,
            },
            outcome,
        )
    }

    pub(super) fn transport(
        method: Method,
        path: String,
        source: BoxError,
        outcome: Outcome,
    ) -> Error {
        Error::new(
            Kind::Transport {
                route: Route { method, path },
                source,
            },
            outcome,
        )
    }

    #[cfg(feature = "outbox")]
    pub(super) fn outbox(source: crate::outbox::OutboxError) -> Error {
        Error::new(
            Kind::Outbox {
                source: source.into(),
            },
            Outcome::Permanent,
        )
    }

    /// What kind of failure this is: the status the server answered with,
    /// if it answered.
    pub fn kind(&self) -> ErrorKind {
        match &self.inner.kind {
            Kind::Config { .. } => ErrorKind::Config,
            Kind::Status { status, .. } => ErrorKind::Status(*status),
            Kind::Transport { source, .. } if source.is::<tower::timeout::error::Elapsed>() => {
                ErrorKind::Timeout
            }
            Kind::Transport { .. } => ErrorKind::Transport,
            #[cfg(feature = "outbox")]
            Kind::Outbox { .. } => ErrorKind::Outbox,
        }
    }

    /// Whether a replay may succeed: 5xx, 408, 429 and every transport error
    /// (including an elapsed per-attempt timeout). A configuration error and
    /// any other 4xx are permanent.
    pub fn is_transient(&self) -> bool {
        self.inner.outcome == Outcome::Transient
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.kind {
            Kind::Config { message, .. } => {
                write!(f, "invalid task client configuration: {message}")
            }
            Kind::Status {
                route,
                status,
                body,
            } if body.is_empty() => {
                write!(f, "{route} returned {}", status.as_u16())
            }
            Kind::Status {
                route,
                status,
                body,
            } => {
                write!(f, "{route} returned {}: {body}", status.as_u16())
            }
            Kind::Transport { route, source } if source.is::<tower::timeout::error::Elapsed>() => {
                write!(f, "{route} timed out")
            }
            Kind::Transport { route, .. } => write!(f, "{route} failed before any response"),
            #[cfg(feature = "outbox")]
            Kind::Outbox { source } => write!(f, "{source}"),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Error");
        match &self.inner.kind {
            Kind::Config { message, source } => debug
                .field("kind", &"config")
                .field("message", message)
                .field("source", source),
            Kind::Status {
                route,
                status,
                body,
            } => debug
                .field("kind", &"status")
                .field("route", &format_args!("{route}"))
                .field("status", status)
                .field("body", body),
            Kind::Transport { route, source } => debug
                .field("kind", &"transport")
                .field("route", &format_args!("{route}"))
                .field("source", source),
            #[cfg(feature = "outbox")]
            Kind::Outbox { source } => debug.field("kind", &"outbox").field("source", source),
        };
        debug.field("transient", &self.is_transient()).finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.inner.kind {
            Kind::Config { source, .. } => source.as_deref().map(|source| source as _),
            Kind::Transport { source, .. } => Some(&**source),
            #[cfg(feature = "outbox")]
            Kind::Outbox { source } => Some(&**source),
            Kind::Status { .. } => None,
        }
    }
}
