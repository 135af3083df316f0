//! Notifications: each queue's channel, named by a digest; the listener
//! that wakes the replay on them; and the deafness that makes a flood of
//! them cost at most one scan per replay interval.
//!
//! A record stored by [`Outbox::enqueue`](crate::outbox::Outbox::enqueue)
//! is stored free, with a `NOTIFY` on the queue's channel (an empty
//! payload) that wakes the dispatchers of the queue once the caller
//! commits. A second connection listens; a poll every replay interval (see
//! `lease`) wakes the replay too, for what was enqueued while the listener
//! was reconnecting.

use std::{
    future::poll_fn,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio_postgres::AsyncMessage;

use super::Shared;
use crate::sync::lock;

/// The start of each queue's notification channel, a digest of the queue's
/// name after it (see [`channel`]).
const CHANNEL_PREFIX: &str = "terminal_retry_outbox_";

/// The wait before the listener connects again.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

impl Shared {
    /// A notification came: the replay is woken, unless one woke it for
    /// nothing less than a replay interval ago.
    pub(super) fn notified(&self) {
        let deaf = lock(&self.deaf_until).is_some_and(|until| until > tokio::time::Instant::now());
        if !deaf {
            self.notified.store(true, Ordering::Relaxed);
            self.requeued.notify_one();
        }
    }

    /// A scan of the queue began, and `found` records: if a notification
    /// woke it for nothing, notifications are not heeded for a replay
    /// interval, so that a flood of them (any role may notify) costs at
    /// most one scan per interval besides the polls.
    pub(super) fn scanned(&self, found: bool) {
        if self.notified.swap(false, Ordering::Relaxed) && !found {
            let interval = Duration::from_millis(self.replay_interval_ms.load(Ordering::Relaxed));
            *lock(&self.deaf_until) = Some(tokio::time::Instant::now() + interval);
        }
    }
}

/// Listens for records enqueued on the queue, connecting again whenever the
/// connection is lost; wakes the replay once listening, for what was
/// enqueued while it was not.
pub(super) async fn listen(shared: Arc<Shared>) {
    loop {
        if let Err(error) = listen_once(&shared).await {
            tracing::debug!(error = %error, "the outbox's listener lost its connection");
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

async fn listen_once(shared: &Shared) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (client, mut connection) = shared.target.connect_undriven().await?;
    let statement = format!("LISTEN {}", shared.channel);
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            listened = &mut listen, if !listening => {
                listened?;
                listening = true;
                shared.requeued.notify_one();
            }
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                // Anyone who may connect may notify: what the payload says
                // is not trusted, and a flood is heeded at most once per
                // replay interval (see `Shared::scanned`).
                Some(Ok(AsyncMessage::Notification(_))) => shared.notified(),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => return Ok(()),
            },
        }
    }
}

/// A queue's notification channel: a digest of its name, so that one
/// listening on the database's channels does not learn the queues' names,
/// and is woken by its own queue only.
pub(super) fn channel(queue: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(queue.as_bytes());
    let hex: String = digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("{CHANNEL_PREFIX}{hex}")
}
