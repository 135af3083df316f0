//! Claims held as leases: taken by one `UPDATE`, renewed while held,
//! cleared on release; every later write fenced by the claim's generation.
//!
//! - The replay claims a batch of one destination's oldest free records in
//!   one `UPDATE` fed by a `FOR UPDATE SKIP LOCKED` select (see
//!   `destinations`): it sets the holder, the lease and the next generation
//!   of each, and returns them with the records. Two dispatchers claiming at
//!   once never take the same record.
//! - Every later write to the record (removal, failure count, replacement by
//!   a fallback, quarantine, release) carries `AND generation = $g AND
//!   holder = $h`: a holder whose lease ran out and was taken over changes
//!   nothing. A lease is renewed every third of its length while held, and
//!   cleared when its claim is released.
//! - A record the dispatcher stores itself is stored leased to it, at
//!   generation 1 (see `writer`): its foreground claims the key in process
//!   only, no statement before the insert, which answers `Taken` if a
//!   record is stored under the key (leased or not).

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio_postgres::types::ToSql;

use super::{rows::as_seq, Shared};
use crate::{outbox::OutboxError, sync::lock};

/// How long a claim holds until a dispatcher says
/// ([`DispatcherBuilder::lease`](crate::outbox::DispatcherBuilder::lease)).
pub(super) const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The longest time between two polls of the queue.
pub(super) const LONGEST_POLL: Duration = Duration::from_secs(5);

/// Writes to a record only while this claim of it is current: `$3` the
/// generation (`NULL` for a record not claimed here: then only while no one
/// holds it), `$4` the holder.
const FENCE: &str = "((generation = $3::bigint AND holder = $4::text) \
    OR ($3::bigint IS NULL AND (lease_until IS NULL OR lease_until < now())))";

impl Shared {
    pub(super) fn lease_seconds(&self) -> f64 {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed)).as_secs_f64()
    }

    pub(super) fn generation(&self, seq: u64) -> Option<i64> {
        lock(&self.held).get(&seq).copied()
    }

    /// Runs `update` (setting parameters from `$5` on) on the record `seq`
    /// while this store's claim of it is current; whether it was.
    pub(super) async fn fenced(
        &self,
        update: &str,
        seq: u64,
        rest: &[&(dyn ToSql + Sync)],
    ) -> Result<bool, OutboxError> {
        let client = self.client().await?;
        let statement =
            format!("{update} WHERE seq = $1 AND queue = $2 AND state = 'pending' AND {FENCE}");
        let generation = self.generation(seq);
        let seq = as_seq(seq);
        let mut parameters: Vec<&(dyn ToSql + Sync)> =
            vec![&seq, &self.queue, &generation, &self.holder];
        parameters.extend_from_slice(rest);
        let changed = client
            .execute(&statement, &parameters)
            .await
            .map_err(|error| self.failed(error))?;
        self.writable.store(true, Ordering::Release);
        Ok(changed > 0)
    }

    /// Clears this store's lease of `seq`, if it is still current.
    pub(super) async fn release(&self, seq: u64, generation: i64) -> Result<(), OutboxError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE terminal_retry_outbox SET holder = NULL, lease_until = NULL
                 WHERE queue = $1 AND seq = $2 AND generation = $3 AND holder = $4",
                &[&self.queue, &as_seq(seq), &generation, &self.holder],
            )
            .await
            .map_err(|error| self.failed(error))?;
        Ok(())
    }

    /// Extends the leases held here: of records, and of the probes of
    /// destinations.
    async fn renew(&self) -> Result<(), OutboxError> {
        let held: Vec<i64> = lock(&self.held).keys().map(|&seq| as_seq(seq)).collect();
        let probes: Vec<String> = lock(&self.probes).iter().cloned().collect();
        if held.is_empty() && probes.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        if !held.is_empty() {
            client
                .execute(
                    "UPDATE terminal_retry_outbox SET lease_until = now() + $3 * interval '1 second'
                     WHERE queue = $1 AND holder = $2 AND seq = ANY($4)",
                    &[&self.queue, &self.holder, &self.lease_seconds(), &held],
                )
                .await
                .map_err(|error| self.failed(error))?;
        }
        if !probes.is_empty() {
            // Only a probe still held: one that ran out was free to take.
            client
                .execute(
                    "UPDATE terminal_retry_outbox_destination
                     SET probe_until = now() + $3 * interval '1 second'
                     WHERE queue = $1 AND probe_holder = $2 AND origin = ANY($4)
                       AND probe_until > now()",
                    &[&self.queue, &self.holder, &self.lease_seconds(), &probes],
                )
                .await
                .map_err(|error| self.failed(error))?;
        }
        Ok(())
    }
}

/// Renews the leases held here every third of the lease, and wakes the
/// replay at least every replay interval (capped at a few seconds): it then
/// finds the records whose holder died.
pub(super) async fn upkeep(shared: Arc<Shared>) {
    let mut last_poll = tokio::time::Instant::now();
    loop {
        let lease = Duration::from_millis(shared.lease_ms.load(Ordering::Relaxed));
        let poll = Duration::from_millis(shared.replay_interval_ms.load(Ordering::Relaxed))
            .min(LONGEST_POLL);
        let tick = (lease / 3).min(poll).max(Duration::from_millis(10));
        tokio::time::sleep(tick).await;
        if let Err(error) = shared.renew().await {
            tracing::warn!(error = %error, "the outbox's leases could not be renewed");
        }
        if last_poll.elapsed() >= poll {
            last_poll = tokio::time::Instant::now();
            shared.requeued.notify_one();
        }
    }
}
