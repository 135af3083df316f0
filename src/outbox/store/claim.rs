//! Claims: a key held by the one sender sending it, so that the foreground
//! and the replay never send a record twice at once. The redb store holds
//! them in memory; a store shared by processes would hold them as leases.

use super::Outbox;

/// A key being sent, by this sender only; released on drop, whatever ends
/// the sending. A release that leaves the record unsettled (queued, or its
/// sending stopped) wakes the replay.
pub(crate) struct Claim {
    outbox: Outbox,
    key: String,
    /// Whether the record is settled (delivered, quarantined, never
    /// stored): the replay need not look at it.
    settled: bool,
}

impl Claim {
    pub(super) fn new(outbox: Outbox, key: &str) -> Claim {
        Claim {
            outbox,
            key: key.to_owned(),
            settled: false,
        }
    }

    /// Releases the key of a settled record.
    pub(crate) fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.outbox.release(&self.key, self.settled);
    }
}
