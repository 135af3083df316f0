//! Destinations: each origin's records and its shared state, in the queue,
//! so that every dispatcher on it honours one probe at a time and a pause
//! given to any of them (see the table `terminal_retry_outbox_destination`
//! in `schema`).
//!
//! - **Lanes.** The origins with free pending records are found one index
//!   probe each (a skip scan over `(queue, origin, state, seq)`), never by
//!   grouping every pending record; the same statement forgets the state
//!   of origins with no record left.
//! - **Claims in batches.** A lane's oldest free records are claimed by one
//!   `UPDATE` over a `FOR UPDATE SKIP LOCKED` sub-select, leased as a
//!   single claim is (see `lease`): no round trip per record, and two
//!   dispatchers claiming at once take different records.
//! - **State in one statement.** An outcome is an upsert that reads the row
//!   it changes: whether the destination was up decides its probe, as the
//!   database has it. A row is kept only while its origin has records, and
//!   written only when something changes: an answer from a destination
//!   known to be up, unpaused, costs no statement.
//! - **Times as durations.** The database's clock alone stamps and reads
//!   the times: a state is read as durations from its `now()`, so the
//!   clocks of the processes need not agree.
//!
//! What this store last read of each destination is kept in a small map,
//! for the decisions above; its entries go with their origins' records.

use std::{collections::HashMap, sync::atomic::Ordering, time::Duration};

use tokio::time::Instant;
use tokio_postgres::{types::ToSql, Row};

use super::{
    rows::{as_limit, as_seq, decode, COLUMNS},
    PostgresStore,
};
use crate::{
    origin::origin_key,
    outbox::{
        store::{
            lane_state::{next_probe_delay, probe_wait},
            LaneEvent, LaneState, LIST_CAP,
        },
        Destination, Entry, OutboxError,
    },
    sync::lock,
};

/// What this store last read of one destination.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    state: LaneState,
    /// When it was read: its durations count from then.
    at: Instant,
    /// Until when this store holds its probe, if it took it.
    probing_until: Option<Instant>,
}

impl Seen {
    fn now(state: LaneState) -> Seen {
        Seen {
            state,
            at: Instant::now(),
            probing_until: None,
        }
    }

    /// Up, and not paused any more: an answer changes nothing in it.
    fn is_clear(&self) -> bool {
        !self.state.is_down()
            && self
                .state
                .paused_for
                .is_none_or(|pause| self.at + pause <= Instant::now())
    }

    fn is_probing(&self) -> bool {
        self.probing_until
            .is_some_and(|until| until > Instant::now())
    }
}

/// A destination's state as of the statement's `now()`, from the row `d`
/// of `terminal_retry_outbox_destination` (all `NULL` for none: up), the
/// probe held by `$holder` (a parameter) counted as not held elsewhere.
/// Read by [`lane_state`].
macro_rules! state_columns {
    ($holder:literal) => {
        concat!(
            "CASE WHEN d.down_since IS NOT NULL
                  THEN greatest(0, floor(extract(epoch FROM now() - d.down_since) * 1000))::bigint
             END,
             CASE WHEN d.paused_until > now()
                  THEN ceil(extract(epoch FROM d.paused_until - now()) * 1000)::bigint
             END,
             CASE WHEN d.down_since IS NOT NULL
                  THEN greatest(0, ceil(extract(epoch FROM d.probe_at - now()) * 1000))::bigint
             END,
             d.probe_delay_ms,
             coalesce(d.probe_holder <> ",
            $holder,
            " AND d.probe_until > now(), false)"
        )
    };
}

/// The destinations with free pending records, and the state of each,
/// the oldest record first, from `candidates(origin)`: at most `$3`. The
/// state of origins with no record left is forgotten on the way.
macro_rules! lanes_from {
    ($candidates:literal) => {
        concat!(
            "WITH RECURSIVE ",
            $candidates,
            ",
             forgotten AS (
                 DELETE FROM terminal_retry_outbox_destination AS gone
                 WHERE gone.queue = $1 AND NOT EXISTS (
                     SELECT 1 FROM terminal_retry_outbox AS stored
                     WHERE stored.queue = $1 AND stored.origin = gone.origin)),
             lanes AS (
                 SELECT candidates.origin, oldest.seq
                 FROM candidates CROSS JOIN LATERAL (
                     SELECT stored.seq FROM terminal_retry_outbox AS stored
                     WHERE stored.queue = $1 AND stored.origin = candidates.origin
                       AND stored.state = 'pending'
                       AND (stored.lease_until IS NULL OR stored.lease_until < now())
                     ORDER BY stored.seq LIMIT 1) AS oldest
                 ORDER BY oldest.seq LIMIT $3)
             SELECT lanes.origin, ",
            state_columns!("$4"),
            "
             FROM lanes LEFT JOIN terminal_retry_outbox_destination AS d
                 ON d.queue = $1 AND d.origin = lanes.origin
             ORDER BY lanes.seq"
        )
    };
}

/// The lanes of every origin of the queue (`$2` unused, empty): its
/// distinct origins read by a skip scan, one index probe each.
const LANES: &str = lanes_from!(
    "candidates(origin) AS (
         (SELECT origin FROM terminal_retry_outbox
          WHERE queue = $1 AND origin IS NOT NULL AND cardinality($2::text[]) = 0
          ORDER BY origin LIMIT 1)
         UNION ALL
         SELECT (SELECT next.origin FROM terminal_retry_outbox AS next
                 WHERE next.queue = $1 AND next.origin > candidates.origin
                 ORDER BY next.origin LIMIT 1)
         FROM candidates WHERE candidates.origin IS NOT NULL)"
);

/// The lanes of the origins `$2`.
const LANES_OF: &str =
    lanes_from!("candidates(origin) AS (SELECT DISTINCT origin FROM unnest($2::text[]) AS origin)");

/// An answer from `$2`, no pause asked: up, its probe released if held by
/// `$3`. Only a row there is changes: none is up already.
const ANSWERED: &str = concat!(
    "UPDATE terminal_retry_outbox_destination AS d
     SET down_since = NULL, probe_at = NULL, probe_delay_ms = 0, last_failure = NULL,
         probe_holder = CASE WHEN d.probe_holder = $3 THEN NULL ELSE d.probe_holder END,
         probe_until = CASE WHEN d.probe_holder = $3 THEN NULL ELSE d.probe_until END
     WHERE d.queue = $1 AND d.origin = $2
     RETURNING ",
    state_columns!("$3")
);

/// An answer from `$2` asking for a pause of `$4` ms: up, paused until
/// then at least, its probe released if held by `$3`. A row is made only
/// while the origin has records.
const ANSWERED_PAUSED: &str = concat!(
    "INSERT INTO terminal_retry_outbox_destination AS d (queue, origin, paused_until)
     SELECT $1, $2, now() + $4::bigint * interval '1 millisecond'
     WHERE EXISTS (SELECT 1 FROM terminal_retry_outbox WHERE queue = $1 AND origin = $2)
     ON CONFLICT (queue, origin) DO UPDATE
     SET down_since = NULL, probe_at = NULL, probe_delay_ms = 0, last_failure = NULL,
         paused_until = greatest(d.paused_until, excluded.paused_until),
         probe_holder = CASE WHEN d.probe_holder = $3 THEN NULL ELSE d.probe_holder END,
         probe_until = CASE WHEN d.probe_holder = $3 THEN NULL ELSE d.probe_until END
     RETURNING ",
    state_columns!("$3")
);

/// A transient failure `$4` of an attempt to `$2` (`$5`: a pause of that
/// many ms asked, or `NULL`): down since now if it was up, its next probe
/// after the first delay `$6` (waiting `$7` ms); after the doubled delay
/// `$9` (waiting `$10`) if the attempt was its probe (`$8`); as it was
/// otherwise. Its probe is released if held by `$3`. Whether it was up is
/// the row's: another dispatcher may have found it down first. A row is
/// made only while the origin has records.
const FAILED: &str = concat!(
    "INSERT INTO terminal_retry_outbox_destination AS d
         (queue, origin, down_since, paused_until, probe_at, probe_delay_ms, last_failure)
     SELECT $1, $2, now(), now() + $5::bigint * interval '1 millisecond',
            now() + $7::bigint * interval '1 millisecond', $6, $4
     WHERE EXISTS (SELECT 1 FROM terminal_retry_outbox WHERE queue = $1 AND origin = $2)
     ON CONFLICT (queue, origin) DO UPDATE
     SET down_since = coalesce(d.down_since, now()),
         last_failure = excluded.last_failure,
         paused_until = greatest(d.paused_until, excluded.paused_until),
         probe_delay_ms = CASE WHEN d.down_since IS NULL THEN excluded.probe_delay_ms
                               WHEN $8::boolean THEN $9::bigint
                               ELSE d.probe_delay_ms END,
         probe_at = CASE WHEN d.down_since IS NULL THEN excluded.probe_at
                         WHEN $8::boolean THEN now() + $10::bigint * interval '1 millisecond'
                         ELSE d.probe_at END,
         probe_holder = CASE WHEN d.probe_holder = $3 THEN NULL ELSE d.probe_holder END,
         probe_until = CASE WHEN d.probe_holder = $3 THEN NULL ELSE d.probe_until END
     RETURNING ",
    state_columns!("$3")
);

/// Takes the probe of `$2` for `$3`, for `$4` seconds: only while it is
/// down, its probe due, not paused, and the probe free, run out, or held
/// by `$3` already.
const TAKE_PROBE: &str = concat!(
    "UPDATE terminal_retry_outbox_destination AS d
     SET probe_holder = $3, probe_until = now() + $4 * interval '1 second'
     WHERE d.queue = $1 AND d.origin = $2 AND d.down_since IS NOT NULL AND d.probe_at <= now()
       AND (d.paused_until IS NULL OR d.paused_until <= now())
       AND (d.probe_holder IS NULL OR d.probe_holder = $3 OR d.probe_until <= now())
     RETURNING ",
    state_columns!("$3")
);

/// How many pending rows without an origin `lanes` places at a time.
const UNPLACED_BATCH: i64 = 64;

impl PostgresStore {
    /// Gives the free pending rows that have no origin (stored by hand, or
    /// written by a version that did not record it, or damaged) the origin
    /// of their request, so that a lane finds them; one that cannot be read
    /// is moved to quarantine with its reason.
    async fn place_unplaced(&self) -> Result<(), OutboxError> {
        let shared = &self.shared;
        let client = shared.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM terminal_retry_outbox
                     WHERE queue = $1 AND origin IS NULL AND state = 'pending'
                       AND (lease_until IS NULL OR lease_until < now())
                     ORDER BY seq LIMIT $2"
                ),
                &[&shared.queue, &UNPLACED_BATCH],
            )
            .await
            .map_err(|error| shared.failed(error))?;
        for row in &rows {
            match decode(row) {
                Ok(entry) => {
                    client
                        .execute(
                            "UPDATE terminal_retry_outbox SET origin = $3
                             WHERE queue = $1 AND seq = $2 AND origin IS NULL",
                            &[&shared.queue, &as_seq(entry.seq), &origin_key(&entry.uri)],
                        )
                        .await
                        .map_err(|error| shared.failed(error))?;
                }
                Err(unreadable) => shared.set_damaged(unreadable).await,
            }
        }
        Ok(())
    }

    pub(super) async fn lanes(
        &self,
        origins: &[String],
        cap: usize,
    ) -> Result<Vec<(String, LaneState)>, OutboxError> {
        self.place_unplaced().await?;
        let shared = &self.shared;
        let statement = match origins.is_empty() {
            true => LANES,
            false => LANES_OF,
        };
        let client = shared.client().await?;
        let rows = client
            .query(
                statement,
                &[&shared.queue, &origins, &as_limit(cap), &shared.holder],
            )
            .await
            .map_err(|error| shared.failed(error))?;
        let lanes: Vec<(String, LaneState)> = rows
            .iter()
            .filter_map(|row| Some((row.try_get::<_, String>(0).ok()?, lane_state(row, 1))))
            .collect();
        shared.scanned(!lanes.is_empty());
        let mut seen = lock(&self.seen);
        for (origin, state) in &lanes {
            let probing_until = seen.get(origin).and_then(|seen| seen.probing_until);
            let mut fresh = Seen::now(state.clone());
            fresh.probing_until = probing_until;
            seen.insert(origin.clone(), fresh);
        }
        // A complete answer: what is not in it has no free record now.
        if lanes.len() < cap {
            forget(&mut seen, &lanes);
        }
        Ok(lanes)
    }

    pub(super) async fn claim_lane(
        &self,
        origin: &str,
        limit: usize,
    ) -> Result<Vec<Entry>, OutboxError> {
        let shared = &self.shared;
        let client = shared.client().await?;
        // The sub-select is read once; its rows, locked, are then leased
        // through the primary key.
        let rows = client
            .query(
                &format!(
                    "UPDATE terminal_retry_outbox
                     SET holder = $3, lease_until = now() + $4 * interval '1 second',
                         generation = generation + 1
                     WHERE queue = $1 AND seq = ANY(ARRAY(
                         SELECT seq FROM terminal_retry_outbox
                         WHERE queue = $1 AND origin = $2 AND state = 'pending'
                           AND (lease_until IS NULL OR lease_until < now())
                         ORDER BY seq LIMIT $5 FOR UPDATE SKIP LOCKED))
                     RETURNING {COLUMNS}, generation"
                ),
                &[
                    &shared.queue,
                    &origin,
                    &shared.holder,
                    &shared.lease_seconds(),
                    &as_limit(limit),
                ],
            )
            .await
            .map_err(|error| shared.failed(error))?;
        let mut leased = Vec::with_capacity(rows.len());
        for row in &rows {
            let generation = row.try_get::<_, i64>(5).ok();
            match (decode(row), generation) {
                (Ok(entry), Some(generation)) => leased.push((entry, generation)),
                (Err(unreadable), _) => shared.set_damaged(unreadable).await,
                // The generation cannot be read: the lease runs out.
                (Ok(_), None) => {}
            }
        }
        leased.sort_unstable_by_key(|(entry, _)| entry.seq);
        let mut entries = Vec::with_capacity(leased.len());
        let mut given_back = Vec::new();
        {
            let mut claimed = lock(&self.claimed);
            let mut held = lock(&shared.held);
            for (entry, generation) in leased {
                let Some(sending) = claimed.get_mut(&entry.key) else {
                    claimed.insert(entry.key.clone(), Some(entry.seq));
                    held.insert(entry.seq, generation);
                    entries.push(entry);
                    continue;
                };
                // A sender here holds the key already. If its lease ran out
                // while it was sending and no one took the record meanwhile
                // (the generation before this claim is its own), the record
                // stays theirs, under the new lease: released, it would be
                // claimed and sent again while they send it. If another
                // holder took it meanwhile, their writes stay fenced off,
                // and the lease is given back.
                let theirs = sending.and_then(|seq| held.get(&seq).copied());
                match theirs == Some(generation - 1) {
                    true => {
                        *sending = Some(entry.seq);
                        held.insert(entry.seq, generation);
                    }
                    false => given_back.push((entry.seq, generation)),
                }
            }
        }
        for (seq, generation) in given_back {
            if let Err(error) = shared.release(seq, generation).await {
                tracing::debug!(seq, error = %error, "a lease could not be cleared: it runs out");
            }
        }
        Ok(entries)
    }

    pub(super) async fn note(
        &self,
        origin: &str,
        event: LaneEvent,
    ) -> Result<LaneState, OutboxError> {
        let shared = &self.shared;
        let before = lock(&self.seen).get(origin).cloned();
        // The state as kept (`None`: nothing is stored for the origin, so
        // nothing was), and what the outcome makes of it otherwise.
        let (kept, would_be) = match event {
            LaneEvent::Answered { pause: None } => {
                if before.as_ref().is_some_and(Seen::is_clear) {
                    return Ok(LaneState::default());
                }
                // No row: up already.
                let up = self
                    .noted(ANSWERED, &[&shared.queue, &origin, &shared.holder])
                    .await?
                    .unwrap_or_default();
                (Some(up), LaneState::default())
            }
            LaneEvent::Answered { pause: Some(pause) } => {
                let kept = self
                    .noted(
                        ANSWERED_PAUSED,
                        &[&shared.queue, &origin, &shared.holder, &as_millis(pause)],
                    )
                    .await?;
                let paused = LaneState {
                    paused_for: Some(pause),
                    ..LaneState::default()
                };
                (kept, paused)
            }
            LaneEvent::Failed {
                failure,
                pause,
                probe,
            } => {
                let longest =
                    Duration::from_millis(shared.replay_interval_ms.load(Ordering::Relaxed));
                let first = next_probe_delay(&LaneState::default(), false, longest);
                let first_wait = probe_wait(first);
                let was = before.map(|seen| seen.state).unwrap_or_default();
                let doubled = next_probe_delay(&was, probe, longest);
                let doubled_wait = probe_wait(doubled);
                let kept = self
                    .noted(
                        FAILED,
                        &[
                            &shared.queue,
                            &origin,
                            &shared.holder,
                            &failure,
                            &pause.map(as_millis),
                            &as_millis(first),
                            &as_millis(first_wait),
                            &probe,
                            &as_millis(doubled),
                            &as_millis(doubled_wait),
                        ],
                    )
                    .await?;
                let down = LaneState {
                    down_for: Some(was.down_for.unwrap_or_default()),
                    paused_for: pause,
                    probe_in: first_wait,
                    probe_delay: first,
                    probed_elsewhere: false,
                };
                (kept, down)
            }
        };
        // Every outcome gives back a probe held here.
        lock(&shared.probes).remove(origin);
        let mut seen = lock(&self.seen);
        match kept {
            Some(state) => {
                seen.insert(origin.to_owned(), Seen::now(state.clone()));
                Ok(state)
            }
            // What the outcome made of it, remembered nowhere.
            None => {
                seen.remove(origin);
                Ok(would_be)
            }
        }
    }

    /// Runs `statement`, an outcome, on the state of a destination: the
    /// state it returns, if it kept one.
    async fn noted(
        &self,
        statement: &str,
        parameters: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<LaneState>, OutboxError> {
        let client = self.shared.client().await?;
        let row = client
            .query_opt(statement, parameters)
            .await
            .map_err(|error| self.shared.failed(error))?;
        Ok(row.map(|row| lane_state(&row, 0)))
    }

    pub(super) async fn take_probe(&self, origin: &str) -> Result<bool, OutboxError> {
        let shared = &self.shared;
        let client = shared.client().await?;
        let row = client
            .query_opt(
                TAKE_PROBE,
                &[
                    &shared.queue,
                    &origin,
                    &shared.holder,
                    &shared.lease_seconds(),
                ],
            )
            .await
            .map_err(|error| shared.failed(error))?;
        let Some(row) = row else {
            return Ok(false);
        };
        let mut seen = Seen::now(lane_state(&row, 0));
        seen.probing_until = Some(seen.at + Duration::from_secs_f64(shared.lease_seconds()));
        lock(&self.seen).insert(origin.to_owned(), seen);
        lock(&shared.probes).insert(origin.to_owned());
        Ok(true)
    }

    pub(super) async fn return_probe(&self, origin: &str) -> Result<(), OutboxError> {
        let shared = &self.shared;
        lock(&shared.probes).remove(origin);
        if let Some(seen) = lock(&self.seen).get_mut(origin) {
            seen.probing_until = None;
        }
        let client = shared.client().await?;
        client
            .execute(
                "UPDATE terminal_retry_outbox_destination
                 SET probe_holder = NULL, probe_until = NULL
                 WHERE queue = $1 AND origin = $2 AND probe_holder = $3",
                &[&shared.queue, &origin, &shared.holder],
            )
            .await
            .map_err(|error| shared.failed(error))?;
        Ok(())
    }

    pub(super) async fn give_up(&self, origin: &str, failure: &str) -> Result<u64, OutboxError> {
        let shared = &self.shared;
        let client = shared.client().await?;
        let rows = client
            .query(
                "WITH moved AS (
                     UPDATE terminal_retry_outbox
                     SET state = 'quarantined', last_failure = $3, holder = NULL,
                         lease_until = NULL
                     WHERE queue = $1 AND origin = $2 AND state = 'pending'
                       AND (lease_until IS NULL OR lease_until < now() OR holder = $4)
                     RETURNING seq),
                 forgotten AS (
                     DELETE FROM terminal_retry_outbox_destination
                     WHERE queue = $1 AND origin = $2)
                 SELECT seq FROM moved",
                &[&shared.queue, &origin, &failure, &shared.holder],
            )
            .await
            .map_err(|error| shared.failed(error))?;
        let given_up = rows.len() as u64;
        {
            // No lease of them is left to renew or clear.
            let mut held = lock(&shared.held);
            for row in &rows {
                if let Ok(seq) = row.try_get::<_, i64>(0) {
                    held.remove(&(seq as u64));
                }
            }
        }
        shared.uncount(given_up);
        lock(&self.seen).remove(origin);
        lock(&shared.probes).remove(origin);
        Ok(given_up)
    }

    pub(super) async fn destinations(&self) -> Result<Vec<Destination>, OutboxError> {
        let shared = &self.shared;
        let client = shared.client().await?;
        let rows = client
            .query(
                "WITH counted AS (
                     SELECT origin, count(*) FILTER (WHERE state = 'pending') AS pending,
                            count(*) FILTER (WHERE state = 'quarantined') AS quarantined
                     FROM terminal_retry_outbox
                     WHERE queue = $1 AND origin IS NOT NULL
                     GROUP BY origin)
                 SELECT counted.origin, counted.pending, counted.quarantined, d.down_since,
                        CASE WHEN d.paused_until > now() THEN d.paused_until END,
                        d.last_failure
                 FROM counted LEFT JOIN terminal_retry_outbox_destination AS d
                     ON d.queue = $1 AND d.origin = counted.origin
                 ORDER BY counted.pending DESC, counted.origin
                 LIMIT $2",
                &[&shared.queue, &as_limit(LIST_CAP)],
            )
            .await
            .map_err(|error| shared.failed(error))?;
        Ok(rows.iter().filter_map(destination).collect())
    }
}

/// Forgets what was seen of destinations not in `lanes` (the complete
/// answer of a listing), but those this store probes, and those up and
/// unpaused (an answer from them costs no statement) while few.
fn forget(seen: &mut HashMap<String, Seen>, lanes: &[(String, LaneState)]) {
    let listed = |origin: &String| lanes.iter().any(|(lane, _)| lane == origin);
    seen.retain(|origin, seen| listed(origin) || seen.is_probing() || seen.is_clear());
    if seen.len() > LIST_CAP {
        seen.retain(|origin, seen| listed(origin) || seen.is_probing());
    }
}

/// The state in `row`, from column `from` on (see [`state_columns`]); a
/// column that cannot be read counts as up, no pause.
fn lane_state(row: &Row, from: usize) -> LaneState {
    let millis = |column: usize| {
        row.try_get::<_, Option<i64>>(from + column)
            .ok()
            .flatten()
            .map(|millis| Duration::from_millis(u64::try_from(millis).unwrap_or(0)))
    };
    LaneState {
        down_for: millis(0),
        paused_for: millis(1),
        probe_in: millis(2).unwrap_or_default(),
        probe_delay: millis(3).unwrap_or_default(),
        probed_elsewhere: row.try_get(from + 4).unwrap_or(false),
    }
}

/// The destination in `row`; `None` for one whose origin or counts cannot
/// be read.
fn destination(row: &Row) -> Option<Destination> {
    let count = |column: usize| {
        row.try_get::<_, i64>(column)
            .ok()
            .and_then(|count| u64::try_from(count).ok())
    };
    let mut destination = Destination::new(row.try_get(0).ok()?);
    destination.pending = count(1)?;
    destination.quarantined = count(2)?;
    destination.down_since = row.try_get(3).ok().flatten();
    destination.paused_until = row.try_get(4).ok().flatten();
    destination.last_failure = row.try_get(5).ok().flatten();
    Some(destination)
}

/// A duration in whole milliseconds, as PostgreSQL's bigint.
fn as_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;
    use http::Request;

    use super::*;
    use crate::outbox::store::{postgres::test_server, Store};

    const A: &str = "http://a.example:80";
    const B: &str = "https://b.example:443";
    const C: &str = "http://c.example:8080";

    /// A store on `queue` (made unique to this process) of the test
    /// server, its leases `lease` long and its replay interval `interval`.
    pub(in crate::outbox::store::postgres) async fn store(
        url: &str,
        queue: &str,
        lease: Duration,
        interval: Duration,
    ) -> PostgresStore {
        let queue = format!("{queue}-{}", std::process::id());
        let store = PostgresStore::connect(url, &queue).await.unwrap();
        store.hold_for(Some(lease), interval);
        store
    }

    /// Two stores on one queue of their own, named after `name`, their
    /// leases `lease` long: two dispatchers' stores on it.
    async fn two_stores(url: &str, name: &str, lease: Duration) -> (PostgresStore, PostgresStore) {
        let one = store(url, name, lease, INTERVAL).await;
        let other = PostgresStore::connect(url, &one.shared.queue)
            .await
            .unwrap();
        other.hold_for(Some(lease), INTERVAL);
        (one, other)
    }

    /// A plain client of the test server.
    pub(in crate::outbox::store::postgres) async fn client(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Enqueues a request to `origin` under each key, in order, in one
    /// transaction.
    async fn enqueue(url: &str, store: &PostgresStore, records: &[(&str, &str)]) {
        let mut client = client(url).await;
        let transaction = client.transaction().await.unwrap();
        for (key, origin) in records {
            let request = Request::post(format!("{origin}/hooks/{key}"))
                .body(Bytes::from_static(b"{}"))
                .unwrap();
            store.enqueue(&transaction, key, request).await.unwrap();
        }
        transaction.commit().await.unwrap();
    }

    fn origins(lanes: &[(String, LaneState)]) -> Vec<&str> {
        lanes.iter().map(|(origin, _)| origin.as_str()).collect()
    }

    fn failed(probe: bool, pause: Option<Duration>) -> LaneEvent {
        LaneEvent::Failed {
            failure: "503 Service Unavailable".to_owned(),
            pause,
            probe,
        }
    }

    /// Makes the probe of `origin` due now.
    async fn probe_due(url: &str, store: &PostgresStore, origin: &str) {
        client(url)
            .await
            .execute(
                "UPDATE terminal_retry_outbox_destination SET probe_at = now()
                 WHERE queue = $1 AND origin = $2",
                &[&store.shared.queue, &origin],
            )
            .await
            .unwrap();
    }

    const LEASE: Duration = Duration::from_secs(30);
    const INTERVAL: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn lanes_list_origins_with_free_records_oldest_first_and_batched_claims_never_overlap() {
        let Some(url) = test_server::url() else {
            return;
        };
        let (one, other) = two_stores(url, "lanes-claims", LEASE).await;
        enqueue(
            url,
            &one,
            &[
                ("b1", B),
                ("a1", A),
                ("a2", A),
                ("c1", C),
                ("a3", A),
                ("b2", B),
            ],
        )
        .await;

        let lanes = one.lanes(&[], 10).await.unwrap();
        assert_eq!(origins(&lanes), [B, A, C]);
        assert!(lanes
            .iter()
            .all(|(_, state)| *state == LaneState::default()));
        assert_eq!(origins(&one.lanes(&[], 2).await.unwrap()), [B, A]);
        let only = [C.to_owned(), A.to_owned(), A.to_owned()];
        assert_eq!(origins(&one.lanes(&only, 10).await.unwrap()), [A, C]);

        // Two dispatchers claim A's records at once: each record once.
        let (mine, theirs) = tokio::join!(one.claim_lane(A, 2), other.claim_lane(A, 2));
        let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
        let mut keys: Vec<&str> = mine.iter().chain(&theirs).map(|e| e.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["a1", "a2", "a3"]);
        for claimed in [&mine, &theirs] {
            assert!(claimed.windows(2).all(|pair| pair[0].seq < pair[1].seq));
            assert!(claimed
                .iter()
                .all(|entry| entry.uri.host() == Some("a.example")));
        }
        assert_eq!(one.claimed() + other.claimed(), 3);
        // All of A's are held: no lane for it, until one is released.
        assert_eq!(origins(&one.lanes(&[], 10).await.unwrap()), [B, C]);
        assert!(one.claim_lane(A, 10).await.unwrap().is_empty());
        let released = &mine[0].key;
        one.release(released, false);
        // Back among the lanes, in the place of its oldest free record:
        // which one that is depends on how the two claims above split.
        let back = || async {
            let lanes = one.lanes(&[], 10).await.unwrap();
            let mut listed = origins(&lanes);
            let mut all = vec![A, B, C];
            listed.sort_unstable();
            all.sort_unstable();
            listed == all
        };
        assert!(wait_for(back).await);
        let again = other.claim_lane(A, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(&again[0].key, released);

        // A key a sender here holds (about to be inserted, so not its
        // record) is not claimed again by the lane: the lease is given back.
        assert!(one.claim_new("b2"));
        let lane = one.claim_lane(B, 10).await.unwrap();
        assert_eq!(
            lane.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["b1"]
        );
        assert!(wait_for(|| async { other.claim_lane(B, 10).await.unwrap().len() == 1 }).await);
    }

    #[tokio::test]
    async fn a_record_a_sender_here_still_sends_stays_theirs_unless_another_took_it_meanwhile() {
        let Some(url) = test_server::url() else {
            return;
        };
        let (one, other) = two_stores(url, "lanes-handover", LEASE).await;
        let queue = one.shared.queue.clone();
        // As if the lease ran out while the sender was sending.
        let expire = |key: &'static str| {
            let queue = queue.clone();
            async move {
                client(url)
                    .await
                    .execute(
                        "UPDATE terminal_retry_outbox SET lease_until = now() - interval '1 second'
                         WHERE queue = $1 AND key = $2",
                        &[&queue, &key],
                    )
                    .await
                    .unwrap();
            }
        };
        let one = &one;
        let stored = |key: &'static str| async move {
            assert!(one.claim_new(key));
            let request = Request::post(format!("{A}/hooks/{key}"))
                .body(Bytes::from_static(b"{}"))
                .unwrap();
            match one.insert(Entry::new(key.to_owned(), &request, None)).await {
                Ok(super::super::super::Inserted::Stored(seq)) => seq,
                other => panic!("{other:?}"),
            }
        };

        // No one took it meanwhile: the lane leaves it to the sender, whose
        // removal applies.
        let seq = stored("mine").await;
        expire("mine").await;
        assert!(
            one.claim_lane(A, 10).await.unwrap().is_empty(),
            "not sent again"
        );
        assert!(
            other.claim_lane(A, 10).await.unwrap().is_empty(),
            "still leased"
        );
        assert!(
            one.complete(seq).await.unwrap(),
            "the sender's removal applies"
        );

        // Another holder took it meanwhile (and its lease ran out too): the
        // sender here stays fenced off.
        let seq = stored("theirs").await;
        expire("theirs").await;
        assert_eq!(other.claim_lane(A, 10).await.unwrap().len(), 1);
        expire("theirs").await;
        assert!(one.claim_lane(A, 10).await.unwrap().is_empty());
        assert!(!one.complete(seq).await.unwrap(), "fenced off");
    }

    #[tokio::test]
    async fn one_probe_at_a_time_across_stores_renewed_while_held_until_released_or_its_holder_dies(
    ) {
        let Some(url) = test_server::url() else {
            return;
        };
        let lease = Duration::from_secs(1);
        let (one, other) = two_stores(url, "lanes-probe", lease).await;
        enqueue(url, &one, &[("a1", A), ("b1", B)]).await;
        // Up: there is no probe to take.
        assert!(!one.take_probe(A).await.unwrap());

        let down = one.note(A, failed(false, None)).await.unwrap();
        assert!(down.is_down());
        assert_eq!(down.probe_delay, Duration::from_secs(1));
        assert!(down.probe_in <= Duration::from_secs(1));
        assert!(!down.probed_elsewhere);
        probe_due(url, &one, A).await;
        // A failure of another attempt leaves the probe as it was: due.
        let still = other.note(A, failed(false, None)).await.unwrap();
        assert_eq!(
            (still.probe_in, still.probe_delay),
            (Duration::ZERO, down.probe_delay)
        );

        // Given back unused: free to take, the destination still down.
        assert!(one.take_probe(A).await.unwrap());
        one.return_probe(A).await.unwrap();
        assert!(other.take_probe(A).await.unwrap());
        other.return_probe(A).await.unwrap();
        assert!(one.take_probe(A).await.unwrap());
        assert!(!other.take_probe(A).await.unwrap());
        let lanes = other.lanes(&[], 10).await.unwrap();
        let (_, seen) = lanes.iter().find(|(origin, _)| origin == A).unwrap();
        assert!(seen.probed_elsewhere && seen.is_down());
        let (_, b) = lanes.iter().find(|(origin, _)| origin == B).unwrap();
        assert!(!b.is_down());
        // The holder's own view: not elsewhere.
        let lanes = one.lanes(&[], 10).await.unwrap();
        assert!(lanes.iter().all(|(_, state)| !state.probed_elsewhere));

        // The probe failed: its delay doubles, and it is free again.
        let after = one.note(A, failed(true, None)).await.unwrap();
        assert_eq!(after.probe_delay, Duration::from_secs(2));
        assert!(after.probe_in <= Duration::from_secs(2));
        assert!(!other.take_probe(A).await.unwrap(), "not due yet");
        probe_due(url, &one, A).await;
        assert!(other.take_probe(A).await.unwrap());
        assert!(!one.take_probe(A).await.unwrap());
        // Its holder lives on: its probe is renewed past the lease.
        tokio::time::sleep(2 * lease).await;
        assert!(!one.take_probe(A).await.unwrap(), "renewed while held");
        // Its holder died: the probe is free once its lease ran out.
        drop(other);
        let started = Instant::now();
        assert!(wait_for(|| async { one.take_probe(A).await.unwrap() }).await);
        assert!(started.elapsed() >= Duration::from_millis(500));
        let other = PostgresStore::connect(url, &one.shared.queue)
            .await
            .unwrap();

        // The probe answered: up, released, and no probe left to take.
        let up = one
            .note(A, LaneEvent::Answered { pause: None })
            .await
            .unwrap();
        assert_eq!(up, LaneState::default());
        assert!(!other.take_probe(A).await.unwrap());
        let lanes = other.lanes(&[], 10).await.unwrap();
        assert!(lanes
            .iter()
            .all(|(_, state)| *state == LaneState::default()));
    }

    #[tokio::test]
    async fn a_pause_given_to_one_store_is_kept_by_the_other_and_refuses_the_probe() {
        let Some(url) = test_server::url() else {
            return;
        };
        let (one, other) = two_stores(url, "lanes-pause", LEASE).await;
        enqueue(url, &one, &[("a1", A), ("b1", B)]).await;
        let pause = Duration::from_secs(30);

        let state = one.note(A, failed(false, Some(pause))).await.unwrap();
        assert!(state.is_down());
        let left = state.paused_for.unwrap();
        assert!(
            left <= pause && left > pause - Duration::from_secs(5),
            "{left:?}"
        );
        let lanes = other.lanes(&[], 10).await.unwrap();
        let (_, seen) = lanes.iter().find(|(origin, _)| origin == A).unwrap();
        assert!(seen.is_down());
        assert!(seen
            .paused_for
            .is_some_and(|left| left > pause - Duration::from_secs(5)));
        probe_due(url, &one, A).await;
        assert!(!other.take_probe(A).await.unwrap(), "paused");

        // An answer brings it up, the pause kept; a shorter one does not
        // shorten it.
        let up = other
            .note(
                A,
                LaneEvent::Answered {
                    pause: Some(Duration::from_secs(1)),
                },
            )
            .await
            .unwrap();
        assert!(!up.is_down());
        assert!(up
            .paused_for
            .is_some_and(|left| left > pause - Duration::from_secs(5)));
        let lanes = one.lanes(&[A.to_owned()], 10).await.unwrap();
        assert!(lanes[0].1.paused_for.is_some());
        assert!(!lanes[0].1.is_down());

        // A pause asked by a destination that is up.
        let paused = one
            .note(B, LaneEvent::Answered { pause: Some(pause) })
            .await
            .unwrap();
        assert!(!paused.is_down() && paused.paused_for.is_some());
        let lanes = other.lanes(&[B.to_owned()], 10).await.unwrap();
        assert!(lanes[0].1.paused_for.is_some());
    }

    #[tokio::test]
    async fn an_answer_from_a_destination_seen_up_writes_nothing() {
        let Some(url) = test_server::url() else {
            return;
        };
        let (one, other) = two_stores(url, "lanes-hot-path", LEASE).await;
        enqueue(url, &one, &[("a1", A)]).await;
        let lanes = one.lanes(&[], 10).await.unwrap();
        assert_eq!(lanes, [(A.to_owned(), LaneState::default())]);
        // Found down by the other meanwhile: this store, which saw it up,
        // writes nothing for its answer (no statement), so the state stays
        // until a probe of it answers.
        assert!(other.note(A, failed(false, None)).await.unwrap().is_down());
        let up = one
            .note(A, LaneEvent::Answered { pause: None })
            .await
            .unwrap();
        assert_eq!(up, LaneState::default());
        assert!(other.lanes(&[], 10).await.unwrap()[0].1.is_down());
        // Once seen down, an answer is written.
        assert!(one.lanes(&[], 10).await.unwrap()[0].1.is_down());
        one.note(A, LaneEvent::Answered { pause: None })
            .await
            .unwrap();
        assert!(!other.lanes(&[], 10).await.unwrap()[0].1.is_down());
    }

    #[tokio::test]
    async fn no_state_is_kept_for_an_origin_with_nothing_stored() {
        let Some(url) = test_server::url() else {
            return;
        };
        let one = store(url, "lanes-bounded", LEASE, INTERVAL).await;
        enqueue(url, &one, &[("a1", A), ("b1", B)]).await;
        let rows = || async {
            let client = client(url).await;
            let rows = client
                .query(
                    "SELECT origin FROM terminal_retry_outbox_destination
                     WHERE queue = $1 ORDER BY origin",
                    &[&one.shared.queue],
                )
                .await
                .unwrap();
            rows.iter().map(|row| row.get(0)).collect::<Vec<String>>()
        };
        // An origin nothing is stored for, however it fails.
        let hostile = "http://nothing-stored.example:80";
        let state = one.note(hostile, failed(false, Some(LEASE))).await.unwrap();
        assert!(state.is_down() && state.paused_for == Some(LEASE));
        one.note(hostile, LaneEvent::Answered { pause: Some(LEASE) })
            .await
            .unwrap();
        assert!(!one.take_probe(hostile).await.unwrap());
        assert!(rows().await.is_empty());
        assert!(lock(&one.seen).get(hostile).is_none());

        one.note(A, failed(false, None)).await.unwrap();
        one.note(B, LaneEvent::Answered { pause: Some(LEASE) })
            .await
            .unwrap();
        assert_eq!(rows().await, [A, B]);
        // A's record goes: its state is forgotten at the next listing. B,
        // given up on, starts afresh: its state is forgotten at once.
        assert!(one.discard("a1").await.unwrap());
        assert_eq!(rows().await, [A, B]);
        assert_eq!(one.give_up(B, "given up").await.unwrap(), 1);
        assert_eq!(rows().await, [A]);
        assert!(lock(&one.seen).get(B).is_none());
        assert!(one.lanes(&[], 10).await.unwrap().is_empty());
        assert!(rows().await.is_empty());
        assert!(lock(&one.seen).get(A).is_none());
    }

    #[tokio::test]
    async fn giving_up_quarantines_the_free_and_own_records_and_requeue_brings_them_back() {
        let Some(url) = test_server::url() else {
            return;
        };
        let (one, other) = two_stores(url, "lanes-give-up", LEASE).await;
        enqueue(url, &one, &[("a1", A), ("a2", A), ("a3", A), ("b1", B)]).await;
        one.count_pending_now().await;
        assert_eq!(one.pending_count(), 4);
        let theirs = other.claim_lane(A, 1).await.unwrap();
        let mine = one.claim_lane(A, 1).await.unwrap();
        assert_eq!((theirs[0].key.as_str(), mine[0].key.as_str()), ("a1", "a2"));

        let failure = "down for 5 days: 503 Service Unavailable";
        assert_eq!(one.give_up(A, failure).await.unwrap(), 2);
        assert_eq!(one.pending_count(), 2);
        let quarantined = one.quarantined(10).unwrap();
        let keys: Vec<&str> = quarantined.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a2", "a3"]);
        assert!(quarantined
            .iter()
            .all(|entry| entry.last_failure.as_deref() == Some(failure)));
        let pending: Vec<String> = one
            .pending(10)
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(pending, ["a1", "b1"]);
        // The other's lease still holds a1: nothing more to give up.
        assert_eq!(other.give_up(B, failure).await.unwrap(), 1);
        assert_eq!(one.give_up(A, failure).await.unwrap(), 0);

        for key in ["a2", "a3", "b1"] {
            assert!(one.requeue(key).await.unwrap());
        }
        let lanes = one.lanes(&[], 10).await.unwrap();
        assert_eq!(origins(&lanes), [A, B]);
        let back = one.claim_lane(A, 10).await.unwrap();
        assert_eq!(
            back.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["a3"]
        );
    }

    #[tokio::test]
    async fn destinations_report_counts_and_the_shared_state() {
        let Some(url) = test_server::url() else {
            return;
        };
        let (one, other) = two_stores(url, "lanes-destinations", LEASE).await;
        enqueue(
            url,
            &one,
            &[
                ("a1", A),
                ("b1", B),
                ("b2", B),
                ("b3", B),
                ("c1", C),
                ("c2", C),
            ],
        )
        .await;
        assert_eq!(one.give_up(C, "refused").await.unwrap(), 2);
        let before = SystemTime::now() - Duration::from_secs(5);
        one.note(A, failed(false, None)).await.unwrap();
        one.note(B, LaneEvent::Answered { pause: Some(LEASE) })
            .await
            .unwrap();

        let listed = other.destinations().await.unwrap();
        let origins: Vec<&str> = listed.iter().map(|d| d.origin.as_str()).collect();
        assert_eq!(origins, [B, A, C]);
        let counts: Vec<(u64, u64)> = listed.iter().map(|d| (d.pending, d.quarantined)).collect();
        assert_eq!(counts, [(3, 0), (1, 0), (0, 2)]);
        let (b, a, c) = (&listed[0], &listed[1], &listed[2]);
        assert!(a.down_since.is_some_and(|since| since > before));
        assert_eq!(a.last_failure.as_deref(), Some("503 Service Unavailable"));
        assert_eq!(a.paused_until, None);
        assert!(b
            .paused_until
            .is_some_and(|until| until > SystemTime::now()));
        assert_eq!(
            (b.down_since.as_ref(), b.last_failure.as_ref()),
            (None, None)
        );
        assert_eq!(*c, Destination::new(C.to_owned()).with_counts(0, 2));
    }

    impl Destination {
        fn with_counts(mut self, pending: u64, quarantined: u64) -> Destination {
            self.pending = pending;
            self.quarantined = quarantined;
            self
        }
    }

    impl PostgresStore {
        async fn count_pending_now(&self) {
            self.shared.count_pending().await.unwrap();
        }
    }

    /// Whether `done` answers true within a few seconds, asked every 50 ms.
    async fn wait_for<F: std::future::Future<Output = bool>>(mut done: impl FnMut() -> F) -> bool {
        for _ in 0..100 {
            if done().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}
