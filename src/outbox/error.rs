//! The outbox's error.

use std::{error::Error, fmt, path::Path, sync::Arc};

/// Why the outbox could not be opened, read or written. It names the file
/// (for an outbox on PostgreSQL, its pseudo path: the server, the database
/// and the queue, never the password).
#[derive(Clone)]
pub struct OutboxError {
    kind: Kind,
    path: Arc<Path>,
}

#[derive(Clone)]
enum Kind {
    /// Another live outbox holds the file.
    Locked,
    /// The file is not an outbox.
    Invalid(String),
    /// The path is not safe to keep requests in: a symbolic link, not a
    /// regular file, writable by others, or owned by another user.
    Unsafe(&'static str),
    /// The file was replaced or removed while open: what is committed to it
    /// would not be found at the path again.
    Replaced,
    /// A request the outbox does not store: that write alone failed.
    #[cfg(feature = "postgres")]
    Refused(String),
    /// A record the encoding refused: that write alone failed.
    Unencodable(String),
    /// Reading or writing failed: I/O, a full disk.
    Io(Arc<dyn Error + Send + Sync>),
    /// The writer is gone: the outbox is being dropped.
    Closed,
    /// The store did not answer within the dispatcher's store wait.
    Unanswered(std::time::Duration),
    /// The delivery stopped (its task was aborted, its runtime shut down)
    /// before the outbox answered.
    Stopped,
}

impl OutboxError {
    pub(super) fn locked(path: &Path) -> OutboxError {
        OutboxError::new(Kind::Locked, path)
    }

    pub(super) fn invalid(path: &Path, reason: impl Into<String>) -> OutboxError {
        OutboxError::new(Kind::Invalid(reason.into()), path)
    }

    pub(super) fn unsafe_path(path: &Path, reason: &'static str) -> OutboxError {
        OutboxError::new(Kind::Unsafe(reason), path)
    }

    pub(super) fn replaced(path: &Path) -> OutboxError {
        OutboxError::new(Kind::Replaced, path)
    }

    #[cfg(feature = "postgres")]
    pub(super) fn refused(path: &Path, reason: impl Into<String>) -> OutboxError {
        OutboxError::new(Kind::Refused(reason.into()), path)
    }

    #[cfg(feature = "outbox")]
    pub(super) fn unencodable(path: &Path, error: postcard::Error) -> OutboxError {
        OutboxError::new(Kind::Unencodable(error.to_string()), path)
    }

    pub(super) fn io(path: &Path, source: impl Into<Box<dyn Error + Send + Sync>>) -> OutboxError {
        OutboxError::new(Kind::Io(Arc::from(source.into())), path)
    }

    pub(super) fn closed(path: &Path) -> OutboxError {
        OutboxError::new(Kind::Closed, path)
    }

    pub(super) fn unanswered(path: &Path, wait: std::time::Duration) -> OutboxError {
        OutboxError::new(Kind::Unanswered(wait), path)
    }

    /// Whether the store did not answer in time (it may answer later).
    pub(super) fn is_unanswered(&self) -> bool {
        matches!(self.kind, Kind::Unanswered(_))
    }

    pub(super) fn stopped() -> OutboxError {
        OutboxError::new(Kind::Stopped, Path::new(""))
    }

    fn new(kind: Kind, path: &Path) -> OutboxError {
        OutboxError {
            kind,
            path: Arc::from(path),
        }
    }

    /// The outbox file (empty when the delivery stopped before the outbox
    /// answered, and no file is known).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What kind of failure it is, for a caller that acts on it.
    pub fn kind(&self) -> OutboxErrorKind {
        match self.kind {
            Kind::Locked => OutboxErrorKind::Locked,
            Kind::Invalid(_) => OutboxErrorKind::Invalid,
            Kind::Unsafe(_) => OutboxErrorKind::Unsafe,
            Kind::Replaced => OutboxErrorKind::Replaced,
            _ => OutboxErrorKind::Other,
        }
    }
}

/// The kinds of [`OutboxError`] a caller may act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutboxErrorKind {
    /// The file is held by another live outbox, in this process or another.
    Locked,
    /// The file is not an outbox (garbage, truncated, corrupted, another
    /// database, or a format this version does not read), or a setting of
    /// the URL is not valid. Such a file is left as it was.
    Invalid,
    /// The path was refused as unsafe to keep requests in: a symbolic link,
    /// not a regular file, writable by group or others, or owned by another
    /// user. Such a file is left as it was.
    Unsafe,
    /// The file was replaced or removed while the outbox had it open:
    /// nothing is reported stored in it any more.
    Replaced,
    /// Anything else: I/O, a refused request, the store not answering in
    /// time, or closed; the message says which.
    Other,
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            Kind::Locked => write!(f, "outbox {path} is held by another live client"),
            Kind::Invalid(reason) => write!(f, "{path} is not a valid outbox: {reason}"),
            Kind::Unsafe(reason) => write!(f, "outbox {path} is refused: {reason}"),
            Kind::Replaced => write!(
                f,
                "outbox {path} was replaced or removed while open: nothing more is stored in it"
            ),
            #[cfg(feature = "postgres")]
            Kind::Refused(reason) => write!(f, "outbox {path} does not store the request: {reason}"),
            Kind::Unencodable(reason) => write!(
                f,
                "a request cannot be encoded for outbox {path}: {reason}"
            ),
            Kind::Io(source) => write!(f, "outbox {path} cannot be read or written: {source}"),
            Kind::Closed => write!(f, "outbox {path} is closed"),
            Kind::Unanswered(wait) => write!(
                f,
                "outbox {path} did not answer within {} ms: going on without it",
                wait.as_millis()
            ),
            Kind::Stopped => f.write_str(
                "the delivery stopped before the outbox answered: the request may or may not be stored",
            ),
        }
    }
}

impl fmt::Debug for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OutboxError")
            .field(&format_args!("{self}"))
            .finish()
    }
}

/// Two errors are equal when they say the same of the same file.
impl PartialEq for OutboxError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for OutboxError {}

impl Error for OutboxError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.kind {
            Kind::Io(source) => Some(&**source),
            Kind::Locked
            | Kind::Invalid(_)
            | Kind::Unsafe(_)
            | Kind::Replaced
            | Kind::Unencodable(_)
            | Kind::Closed
            | Kind::Unanswered(_)
            | Kind::Stopped => None,
            #[cfg(feature = "postgres")]
            Kind::Refused(_) => None,
        }
    }
}
