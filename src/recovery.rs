//! Early release: retries parked in backoff go out as soon as the server is
//! seen healthy again, at a bounded rate.
//!
//! A retry waits its whole delay even when the server came back a moment
//! after it fell asleep: with the default schedule a report can sit idle for
//! up to 64 s after the outage ended. A [`Recovery`] shared by the layers that
//! talk to a server ends that wait. When any attempt through a layer holding
//! it succeeds, the retries waiting on a schedule delay for the same authority
//! (scheme, host and port) are released:
//!
//! - oldest first, at most `release_per_second` a second, spaced by a
//!   [`Pace`](crate::pace::Pace), the crate's one pace (the outbox's replay
//!   keeps one towards each destination): the first at once, then one every
//!   `1 s / release_per_second`, on a grid that a late wake-up does not
//!   shift; after idling longer than that, a new episode starts at once, with
//!   no burst. The others keep waiting for their turn or their own delay,
//!   whichever comes first;
//! - only those that were already waiting when the success was seen, and only
//!   for that authority: calls to a host still down keep waiting;
//! - never a wait the server asked for with `Retry-After`.
//!
//! A released retry is an attempt of the schedule like any other. Without a
//! success, waits follow the schedule (and jitter) exactly. A success with
//! nobody waiting costs one atomic read.
//!
//! ```
//! use std::{convert::Infallible, sync::{atomic::{AtomicBool, Ordering}, Arc}, time::Duration};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_terminal_retry::{TerminalRetryPolicy, Recovery, TerminalRetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A server that is down until `up` is set.
//! let up = Arc::new(AtomicBool::new(false));
//! let server = {
//!     let up = up.clone();
//!     service_fn(move |_request: Request<Full<Bytes>>| {
//!         let status = if up.load(Ordering::SeqCst) { StatusCode::OK } else { StatusCode::BAD_GATEWAY };
//!         async move { Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap()) }
//!     })
//! };
//! let recovery = Recovery::new(100)?;
//! let layer = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_recovery(recovery.clone()));
//!
//! // A report fails at once and parks for 4 s.
//! let start = tokio::time::Instant::now();
//! let report = tokio::spawn(layer.layer(server.clone()).oneshot(
//!     Request::post("http://server.test/api/daemon/tasks/t1/complete").body(Full::from("{}"))?,
//! ));
//! tokio::time::sleep(Duration::from_secs(1)).await;
//! assert_eq!(recovery.waiting(), 1);
//!
//! // The server is back; a heartbeat through the same recovery succeeds…
//! up.store(true, Ordering::SeqCst);
//! let heartbeat = Request::post("http://server.test/api/daemon/heartbeat").body(Full::from("{}"))?;
//! layer.layer(server).oneshot(heartbeat).await?;
//!
//! // …and the report goes out at once instead of at 4 s.
//! assert_eq!(report.await??.status(), StatusCode::OK);
//! assert_eq!(start.elapsed(), Duration::from_secs(1));
//! assert_eq!(recovery.waiting(), 0);
//! # Ok(())
//! # }
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
};

use http::Uri;
use tokio::time::Instant;

use crate::{error::ConfigError, pace::Pace};

/// The release rate of [`Recovery::default`], which the task client and the
/// outbox's dispatcher use unless given one: a daemon reports a handful of
/// tasks at a time, and fifty a second delivers a backlog within seconds of
/// the server's recovery without a stampede.
pub(crate) const DEFAULT_RELEASE_PER_SECOND: u32 = 50;

/// A shared signal that releases parked retries once their server answers
/// again: see the [crate docs](crate#early-release).
///
/// Cloning is cheap: clones share the waiters and the release rate. Give the
/// same `Recovery` to every layer (and [`observe`](Recovery::observe) every
/// other call) that talks to the same servers.
#[derive(Clone)]
pub struct Recovery {
    shared: Arc<Shared>,
}

struct Shared {
    release_per_second: u32,
    /// Waiters registered, across every authority: the only thing a success
    /// reads when nobody waits.
    waiting: AtomicUsize,
    state: Mutex<State>,
}

struct State {
    /// Numbers waiters in the order they parked; never reused.
    next_ticket: u64,
    /// Authority key (`scheme://host:port`) to its index in `hosts`, for the
    /// authorities that have waiters.
    host_ids: HashMap<String, usize>,
    hosts: Vec<Host>,
    /// Indices in `hosts` free for another authority: a host is forgotten
    /// once its last waiter leaves, so that a client talking to many hosts
    /// over time keeps only those with waiters.
    free_hosts: Vec<usize>,
    /// When releases may go: kept across episodes, so that one starting
    /// right after another does not exceed the rate.
    pace: Pace,
    /// Whether a release task is running.
    releasing: bool,
}

#[derive(Default)]
struct Host {
    /// The authority's key in `host_ids`.
    key: String,
    /// Waiters by ticket: the oldest first.
    waiters: BTreeMap<u64, Waker>,
    /// Waiters with a ticket below this were parked when a success to this
    /// authority was seen: they are released as the pace allows.
    release_below: u64,
}

impl State {
    /// Forgets host `id` if nobody waits there any more.
    fn forget_if_idle(&mut self, id: usize) {
        if self.hosts[id].waiters.is_empty() {
            let host = std::mem::take(&mut self.hosts[id]);
            self.host_ids.remove(&host.key);
            self.free_hosts.push(id);
        }
    }
}

impl Host {
    fn next_release(&self) -> Option<u64> {
        let (&ticket, _) = self.waiters.first_key_value()?;
        (ticket < self.release_below).then_some(ticket)
    }
}

impl Recovery {
    /// A recovery signal releasing at most `release_per_second` parked retries
    /// a second.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidReleaseRate`] for 0: nothing would ever be
    /// released early.
    pub fn new(release_per_second: u32) -> Result<Recovery, ConfigError> {
        if release_per_second == 0 {
            return Err(ConfigError::InvalidReleaseRate);
        }
        Ok(Recovery {
            shared: Arc::new(Shared {
                release_per_second,
                waiting: AtomicUsize::new(0),
                state: Mutex::new(State {
                    next_ticket: 0,
                    host_ids: HashMap::new(),
                    hosts: Vec::new(),
                    free_hosts: Vec::new(),
                    pace: Pace::new(release_per_second),
                    releasing: false,
                }),
            }),
        })
    }

    /// How many retries are waiting on a schedule delay now.
    #[inline]
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }

    /// Tells the signal that a request to `uri`'s authority succeeded, for
    /// calls that do not go through a layer holding it (a heartbeat, a status
    /// poll). The layers call it on every success themselves.
    ///
    /// The retries to that authority already waiting are released, oldest
    /// first, at the bounded rate. Costs one atomic read when nobody waits.
    // Inlined, so that a success with nobody waiting is that read alone.
    #[inline]
    pub fn observe(&self, uri: &Uri) {
        if self.waiting() != 0 {
            self.mark_for_release(uri);
        }
    }

    /// Marks the waiters to `uri`'s authority for release, and starts the
    /// release task unless it runs.
    fn mark_for_release(&self, uri: &Uri) {
        let key = crate::origin::origin_key(uri);
        let mut state = self.shared.lock();
        let Some(&id) = state.host_ids.get(&key) else {
            return;
        };
        let ticket = state.next_ticket;
        let host = &mut state.hosts[id];
        if host.waiters.is_empty() {
            return;
        }
        host.release_below = ticket;
        if state.releasing {
            return;
        }
        state.releasing = true;
        drop(state);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(release(self.shared.clone()));
            }
            // No runtime to release on: the waiters keep their own delays.
            Err(_) => self.shared.lock().releasing = false,
        }
    }

    /// Parks a caller until `deadline`, or until a success to `uri`'s
    /// authority releases it (at the recovery's pace): the policy's wait
    /// before a retry on a schedule delay, public for a sender of its own
    /// (the outbox parks its probe of a destination that is down). Dropping
    /// the [`Parked`] leaves the waiters at once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::Uri;
    /// use tokio::time::Instant;
    /// use tower_terminal_retry::{Recovery, Woken};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let recovery = Recovery::default();
    /// let server: Uri = "http://server.test/hooks".parse()?;
    /// let parked = recovery.park(&server, Instant::now() + Duration::from_secs(60));
    /// // A success to the same authority, from any layer sharing the recovery.
    /// recovery.observe(&"http://server.test/health".parse()?);
    /// assert_eq!(parked.await, Woken::Released);
    ///
    /// let alone = recovery.park(&server, Instant::now() + Duration::from_secs(1));
    /// assert_eq!(alone.await, Woken::Deadline);
    /// # Ok(())
    /// # }
    /// ```
    pub fn park(&self, uri: &Uri, deadline: Instant) -> Parked {
        let key = crate::origin::origin_key(uri);
        let mut state = self.shared.lock();
        let host = match state.host_ids.get(&key) {
            Some(&id) => id,
            None => {
                let id = state.free_hosts.pop().unwrap_or_else(|| {
                    state.hosts.push(Host::default());
                    state.hosts.len() - 1
                });
                state.hosts[id].key.clone_from(&key);
                state.host_ids.insert(key, id);
                id
            }
        };
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.hosts[host]
            .waiters
            .insert(ticket, Waker::noop().clone());
        self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        drop(state);
        Parked {
            sleep: tokio::time::sleep_until(deadline),
            waiter: Some(Waiter {
                shared: self.shared.clone(),
                host,
                ticket,
            }),
        }
    }
}

impl Default for Recovery {
    /// A recovery releasing 50 retries a second.
    fn default() -> Self {
        Recovery::new(DEFAULT_RELEASE_PER_SECOND).expect("a release rate above zero")
    }
}

impl fmt::Debug for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovery")
            .field("release_per_second", &self.shared.release_per_second)
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Takes the oldest waiter that a success released, across authorities.
    fn next_released(state: &mut State) -> Option<Waker> {
        let (_, id) = state
            .hosts
            .iter()
            .enumerate()
            .filter_map(|(id, host)| Some((host.next_release()?, id)))
            .min()?;
        let waker = state.hosts[id].waiters.pop_first().map(|(_, waker)| waker);
        state.forget_if_idle(id);
        waker
    }
}

/// Releases the waiters a success marked, oldest first, one per start of the
/// pace, until none is left to release.
async fn release(shared: Arc<Shared>) {
    let mut woken = Vec::new();
    loop {
        let next_start = {
            let mut state = shared.lock();
            loop {
                // More than one may be due after a late wake-up, at a rate
                // above a start per timer tick.
                if !state.pace.is_due() {
                    break Some(state.pace.next_start());
                }
                let Some(waker) = Shared::next_released(&mut state) else {
                    state.releasing = false;
                    break None;
                };
                state.pace.start();
                shared.waiting.fetch_sub(1, Ordering::AcqRel);
                woken.push(waker);
            }
        };
        woken.drain(..).for_each(Waker::wake);
        match next_start {
            Some(at) => tokio::time::sleep_until(at).await,
            None => return,
        }
    }
}

pin_project_lite::pin_project! {
    /// A wait until a deadline that a [`Recovery`] may end early: made by
    /// [`Recovery::park`], ready with how it ended.
    #[must_use = "a parked wait does nothing unless awaited"]
    pub struct Parked {
        #[pin]
        sleep: tokio::time::Sleep,
        waiter: Option<Waiter>,
    }
}

impl Parked {
    /// When the wait ends if nothing releases it.
    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }
}

impl fmt::Debug for Parked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parked")
            .field("deadline", &self.deadline())
            .finish_non_exhaustive()
    }
}

/// A ticket among a host's waiters; dropping it leaves the waiters at once.
struct Waiter {
    shared: Arc<Shared>,
    host: usize,
    ticket: u64,
}

impl Waiter {
    /// Ready once a release took the ticket; else keeps `cx`'s waker there.
    fn poll_released(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.lock();
        match state.hosts[self.host].waiters.get_mut(&self.ticket) {
            Some(waker) => {
                if !waker.will_wake(cx.waker()) {
                    waker.clone_from(cx.waker());
                }
                Poll::Pending
            }
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state.hosts[self.host]
            .waiters
            .remove(&self.ticket)
            .is_some()
        {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            state.forget_if_idle(self.host);
        }
    }
}

/// How a [`Parked`] wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The deadline passed.
    Deadline,
    /// A success released it before its deadline.
    Released,
}

impl Future for Parked {
    type Output = Woken;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Woken> {
        let this = self.project();
        if let Some(waiter) = this.waiter {
            if waiter.poll_released(cx).is_ready() {
                *this.waiter = None;
                return Poll::Ready(Woken::Released);
            }
        }
        if this.sleep.poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Leaves the waiters before the attempt starts.
        *this.waiter = None;
        Poll::Ready(Woken::Deadline)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn hosts_are_forgotten_when_their_last_waiter_leaves() {
        let recovery = Recovery::new(1_000).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        for round in 0..3 {
            let parked: Vec<Parked> = (0..100)
                .map(|host| {
                    let uri: Uri = format!("http://host-{round}-{host}.test/x")
                        .parse()
                        .unwrap();
                    recovery.park(&uri, deadline)
                })
                .collect();
            assert_eq!(recovery.shared.lock().host_ids.len(), 100);
            drop(parked);
            let state = recovery.shared.lock();
            assert!(state.host_ids.is_empty());
            // Slots are reused: a hundred hosts at a time take a hundred.
            assert_eq!(state.hosts.len(), 100);
        }
        assert_eq!(recovery.waiting(), 0);
    }

    #[test]
    fn a_zero_rate_is_refused() {
        assert_eq!(
            Recovery::new(0).unwrap_err(),
            ConfigError::InvalidReleaseRate
        );
    }
}
