//! Reading what an outbox holds a page at a time: [`Listing`] asks, [`Page`]
//! answers, a [`Cursor`] goes on from where a page ended.
//!
//! A queue may hold a million records: a listing never reads more than
//! 1,000 of them at once, and leaves their bodies out unless asked.
//!
//! ```
//! use tower_terminal_retry::outbox::{Listing, Outbox};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let directory = std::env::temp_dir().join(format!("outbox-listing-doc-{}", std::process::id()));
//! let outbox = Outbox::open(directory.join("requests.redb"))?;
//! let mut listing = Listing { quarantined: true, ..Listing::default() };
//! loop {
//!     let page = outbox.list(&listing).await?;
//!     for entry in &page.entries {
//!         println!("{} was refused: {:?}", entry.key, entry.last_failure);
//!     }
//!     match page.next {
//!         Some(next) => listing.after = Some(next),
//!         None => break,
//!     }
//! }
//! # drop(outbox);
//! # std::fs::remove_dir_all(&directory)?;
//! # Ok(())
//! # }
//! ```

use super::Entry;

/// The most records one page holds, whatever [`Listing::limit`] asks.
pub(super) const MAX_PAGE: usize = 1_000;

/// Which records [`Outbox::list`](super::Outbox::list) reads, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing {
    /// Quarantined records rather than pending ones.
    pub quarantined: bool,
    /// Only the records after this one: the previous page's
    /// [`next`](Page::next); from the oldest when `None`.
    pub after: Option<Cursor>,
    /// The most records in the page, capped at 1,000 (by default
    /// 100).
    pub limit: usize,
    /// Whether the entries carry their bodies; by default not, each
    /// [`Entry::body`] is empty.
    pub bodies: bool,
}

impl Default for Listing {
    fn default() -> Listing {
        Listing {
            quarantined: false,
            after: None,
            limit: 100,
            bodies: false,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page {
    /// The records, oldest first.
    pub entries: Vec<Entry>,
    /// Where the next page starts, if there may be one.
    pub next: Option<Cursor>,
}

/// Where a listing goes on: after the last record of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(u64);

impl Page {
    /// The page of `entries` read for a `limit`: a full page may have a
    /// next one.
    pub(super) fn of(mut entries: Vec<Entry>, limit: usize, bodies: bool) -> Page {
        if !bodies {
            for entry in &mut entries {
                entry.body = bytes::Bytes::new();
            }
        }
        let next = match entries.len() >= limit {
            true => entries.last().map(|entry| Cursor(entry.seq)),
            false => None,
        };
        Page { entries, next }
    }
}

impl Listing {
    /// The sequence number the page starts after, and its size.
    pub(super) fn range(&self) -> (u64, usize) {
        let after = self.after.map_or(0, |Cursor(seq)| seq);
        (after, self.limit.clamp(1, MAX_PAGE))
    }
}
