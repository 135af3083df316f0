//! A destination, as an operator sees it: the origin requests go to, how many
//! of them wait for it, and whether it is up, down or paused.
//!
//! [`Outbox::destinations`](super::Outbox::destinations) lists each
//! destination with stored requests: it answers "which receiver is broken?".
//!
//! ```
//! use tower_terminal_retry::outbox::Outbox;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let directory = std::env::temp_dir().join(format!("outbox-destination-doc-{}", std::process::id()));
//! let outbox = Outbox::open(directory.join("requests.redb"))?;
//! for destination in outbox.destinations().await? {
//!     if let Some(since) = destination.down_since {
//!         println!(
//!             "{} is down since {since:?}: {} pending, last failure {:?}",
//!             destination.origin, destination.pending, destination.last_failure
//!         );
//!     }
//! }
//! # drop(outbox);
//! # std::fs::remove_dir_all(&directory)?;
//! # Ok(())
//! # }
//! ```

use std::time::SystemTime;

/// One destination with stored requests: an origin (scheme, host and port),
/// its counts and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Destination {
    /// `scheme://host:port`, the port always written.
    pub origin: String,
    /// Its pending requests.
    pub pending: u64,
    /// Its quarantined requests.
    pub quarantined: u64,
    /// Since when it has failed without a success; `None` while it is up
    /// (or not tried yet).
    pub down_since: Option<SystemTime>,
    /// Until when it asked to be left alone (`Retry-After`), if that is
    /// ahead.
    pub paused_until: Option<SystemTime>,
    /// Its last failure, cleaned (and redacted) as every failure the outbox
    /// keeps; `None` while it is up.
    pub last_failure: Option<String>,
}

impl Destination {
    /// A destination with no state yet: up, no failure.
    #[cfg(feature = "outbox")]
    pub(crate) fn new(origin: String) -> Destination {
        Destination {
            origin,
            pending: 0,
            quarantined: 0,
            down_since: None,
            paused_until: None,
            last_failure: None,
        }
    }
}
