//! The terminal reports being delivered, so that `shutdown` can wait for
//! them and name those it gave up on.
//!
//! Each delivery holds a [`Tracked`] guard: its entry goes when the delivery
//! ends, however it ends (delivered, aborted, or panicked).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::{
    runtime::Handle,
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

use super::report::{ReportOutcome, TaskResult, UndeliveredReport};

/// The registry of reports in flight; clones share it.
#[derive(Debug, Clone, Default)]
pub(super) struct InFlight {
    registry: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    next_id: AtomicU64,
    reports: Mutex<BTreeMap<u64, Pending>>,
    /// How many reports are in `reports`, for `shutdown` to wait on.
    count: watch::Sender<usize>,
}

#[derive(Debug)]
struct Pending {
    report: UndeliveredReport,
    /// Set once the delivery is spawned.
    abort: Option<AbortHandle>,
    /// Where a durable report stands with the outbox: once stored, it is not
    /// undelivered.
    store: Arc<StoreState>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            next_id: AtomicU64::new(0),
            reports: Mutex::new(BTreeMap::new()),
            count: watch::Sender::new(0),
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Pending>> {
        crate::sync::lock(&self.reports)
    }
}

/// Lists a report while its delivery runs, and unlists it when dropped.
#[derive(Debug)]
struct Tracked {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut reports = self.registry.lock();
        reports.remove(&self.id);
        self.registry.count.send_replace(reports.len());
    }
}

impl InFlight {
    /// Spawns `delivery` of `report` onto `runtime`, listed until it ends;
    /// `store` is where a durable delivery says whether the report is stored.
    pub(super) fn spawn<F>(
        &self,
        runtime: &Handle,
        report: UndeliveredReport,
        store: Arc<StoreState>,
        delivery: F,
    ) -> JoinHandle<ReportOutcome>
    where
        F: Future<Output = ReportOutcome> + Send + 'static,
    {
        let registry = &self.registry;
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut reports = registry.lock();
            let pending = Pending {
                report,
                abort: None,
                store,
            };
            reports.insert(id, pending);
            registry.count.send_replace(reports.len());
        }
        // Listed before it is spawned, so that it cannot end (and unlist
        // itself) first; spawned outside the lock, as a runtime shutting
        // down drops the delivery, and with it its guard, at once.
        let tracked = Tracked {
            registry: registry.clone(),
            id,
        };
        let handle = runtime.spawn(async move {
            let _tracked = tracked;
            delivery.await
        });
        match registry.lock().get_mut(&id) {
            Some(pending) => pending.abort = Some(handle.abort_handle()),
            // Ended already, or `shutdown` took it before it could abort it.
            None => handle.abort(),
        }
        handle
    }

    pub(super) fn len(&self) -> usize {
        self.registry.lock().len()
    }

    /// Waits up to `grace` for every report to finish, then aborts the rest
    /// and returns those not stored in an outbox, in the order they were
    /// started. A report whose commit is under way is waited for until the
    /// outbox answers, so that it is either returned or stored, never both.
    pub(super) async fn settle(&self, grace: Duration) -> Vec<UndeliveredReport> {
        let registry = &self.registry;
        let mut count = registry.count.subscribe();
        // The sender lives in `self`, so waiting ends only by count or time.
        let _ = tokio::time::timeout(grace, count.wait_for(|&count| count == 0)).await;
        let abandoned = {
            let mut reports = registry.lock();
            registry.count.send_replace(0);
            std::mem::take(&mut *reports)
        };
        let mut undelivered = Vec::new();
        for pending in abandoned.into_values() {
            let stored = pending.stays_stored().await;
            if let Some(abort) = &pending.abort {
                abort.abort();
            }
            if let Some(report) = pending.into_undelivered(stored) {
                undelivered.push(report);
            }
        }
        undelivered
    }
}

impl Pending {
    /// Whether the report stays in the outbox for the replay.
    async fn stays_stored(&self) -> bool {
        self.store.stays_stored().await
    }

    /// The report, unless it stays stored for the replay.
    fn into_undelivered(self, stored: bool) -> Option<UndeliveredReport> {
        let task_id = &self.report.task_id;
        let completed = matches!(self.report.result, TaskResult::Completed(_));
        if stored {
            tracing::info!(
                task_id,
                completed,
                "terminal report not delivered before shutdown: it stays in the outbox"
            );
            return None;
        }
        tracing::warn!(
            task_id,
            completed,
            "terminal report not delivered before shutdown"
        );
        Some(self.report)
    }
}

pub(super) use store_state::StoreState;

/// Where a durable report stands with the outbox, shared by its delivery,
/// its future and `shutdown`.
mod store_state {
    use std::sync::atomic::{AtomicU8, Ordering};

    use tokio::sync::Notify;

    /// Not handed to the outbox (yet, or ever).
    const NOT_HANDED: u8 = 0;
    /// Handed to the outbox, its commit not answered yet.
    const STORING: u8 = 1;
    /// In the outbox: the replay delivers it if this delivery does not.
    const STORED: u8 = 2;
    /// The outbox could not take it: it lives in this delivery only.
    const NOT_STORED: u8 = 3;
    /// Stopped by `shutdown` before it was handed to the outbox: it never
    /// will be.
    const ABANDONED: u8 = 4;

    /// Whether a report is in the outbox, so that `shutdown` either returns
    /// it or leaves it stored, never both.
    #[derive(Debug, Default)]
    pub(crate) struct StoreState {
        state: AtomicU8,
        /// Wakes `shutdown` when a report being stored learns whether it is.
        settled: Notify,
    }

    impl StoreState {
        /// Whether the report is in the outbox.
        pub(crate) fn is_stored(&self) -> bool {
            self.get() == STORED
        }

        /// Claims the report for the outbox; `false` once `shutdown`
        /// abandoned it, and it must not be sent.
        pub(crate) fn hand_over(&self) -> bool {
            self.state
                .compare_exchange(NOT_HANDED, STORING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }

        /// Records the outbox's answer for a report handed over.
        pub(crate) fn answer(&self, stored: bool) {
            let state = if stored { STORED } else { NOT_STORED };
            // Only a report handed over is being stored; one never handed
            // stays as it is (not handed, or abandoned).
            let _ =
                self.state
                    .compare_exchange(STORING, state, Ordering::AcqRel, Ordering::Acquire);
            self.settled.notify_waiters();
        }

        /// For `shutdown`: whether the report stays in the outbox. Either
        /// `shutdown` claims it before it reaches the outbox (and returns
        /// it), or the outbox's answer decides.
        pub(crate) async fn stays_stored(&self) -> bool {
            !self.abandon() && self.known().await == STORED
        }

        /// Claims the report for `shutdown`'s list; `false` once it is
        /// handed to the outbox.
        fn abandon(&self) -> bool {
            self.state
                .compare_exchange(NOT_HANDED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }

        /// Waits until a report handed to the outbox knows whether it is
        /// stored.
        async fn known(&self) -> u8 {
            loop {
                let settled = self.settled.notified();
                match self.get() {
                    STORING => settled.await,
                    state => return state,
                }
            }
        }

        fn get(&self) -> u8 {
            self.state.load(Ordering::Acquire)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::TaskResult;

    /// A delivery that panics unlists itself: `shutdown` does not wait out
    /// its grace for it.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_delivery_does_not_hold_up_shutdown() {
        let in_flight = InFlight::default();
        let report = UndeliveredReport {
            task_id: "t1".into(),
            result: TaskResult::completed("done"),
        };
        let delivery = in_flight.spawn(&Handle::current(), report, Arc::default(), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("the delivery broke")
        });
        assert_eq!(in_flight.len(), 1);

        let start = tokio::time::Instant::now();
        let undelivered = in_flight.settle(Duration::from_secs(3600)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(undelivered.is_empty());
        assert_eq!(in_flight.len(), 0);
        assert!(delivery.await.unwrap_err().is_panic());
    }
}
