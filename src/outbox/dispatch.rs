//! Sending stored requests: in the foreground through the terminal retry
//! layer, and from the outbox by a replay worker.

use std::{
    collections::HashSet,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, Weak,
    },
    task::{ready, Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use tokio::{
    sync::{oneshot, Notify},
    task::{JoinHandle, JoinSet},
    time::{sleep_until, Instant},
};
use tower::{util::MapRequest, BoxError, Layer, Service, ServiceExt};

use super::{
    store::{age, Write, Written},
    Entry, Outbox, OutboxError, IDEMPOTENCY_KEY,
};
use crate::{
    classify::{Classify, DefaultClassifier, Outcome},
    origin::{is_origin, origin_key},
    recovery::Woken,
    response::{body_start, clean, redirect_note},
    sync::lock,
    Jitter, Recovery, RetryAfter, TerminalRetry, TerminalRetryLayer,
};

/// The default longest wait between two probes of a server that is down.
pub const DEFAULT_REPLAY_INTERVAL: Duration = Duration::from_secs(30);
/// The default number of stored requests replayed at once.
pub const DEFAULT_REPLAY_CONCURRENCY: usize = 16;
/// The default most replays started in any one second. A server just back
/// from an outage is cold (empty caches, connection pools still filling, no
/// extra capacity yet): its whole backlog at once can take it down again.
/// Without a rate, 600 stored reports went out as 561 requests within one
/// second; at 100 a second they take six.
pub const DEFAULT_REPLAY_RATE: u32 = 100;
/// The first wait between probes (or the replay interval, if shorter);
/// doubled after each failed probe up to the replay interval.
const FIRST_PROBE_DELAY: Duration = Duration::from_secs(1);
/// How many pending records the replay reads at a time.
const REPLAY_PAGE: usize = 256;
/// How long reading a refusal's body may take.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the request to send in place of one the server refused for good:
/// given the stored entry, the status and a description of the refusal.
/// `None` quarantines the entry instead.
pub type Fallback = dyn Fn(&Entry, StatusCode, &str) -> Option<Request<Bytes>> + Send + Sync;

/// The service a foreground delivery goes through: the terminal retry layer
/// over the inner service, each attempt counted.
type Retrying<S> = TerminalRetry<MapRequest<S, fn(Request<Full<Bytes>>) -> Request<Full<Bytes>>>>;

/// What a [`Dispatcher`] sends each attempt through: a cloneable service of
/// HTTP requests whose errors can be described. Implemented for every such
/// service (hyper-util's client, with timeouts or other layers on it).
pub trait AttemptService:
    Service<Request<Full<Bytes>>, Response = Response<Self::ResponseBody>, Error = Self::Failure>
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The body of its responses.
    type ResponseBody: http_body::Body<Data: Send> + Send + 'static;
    /// Its error.
    type Failure: Into<BoxError> + fmt::Debug + Send + 'static;
}

impl<S, RB, E> AttemptService for S
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>, Error = E>
        + Clone
        + Send
        + Sync
        + 'static,
    RB: http_body::Body<Data: Send> + Send + 'static,
    E: Into<BoxError> + fmt::Debug + Send + 'static,
{
    type ResponseBody = RB;
    type Failure = E;
}

/// How a request handed to the [`Dispatcher`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// The server took the request (a 2xx).
    Delivered,
    /// The server refused the request for good and took the fallback sent
    /// instead.
    FallbackDelivered,
    /// Transient failures outlived the retry schedule; the request is stored
    /// and the replay worker delivers it once the server is back.
    Queued,
    /// The server refused it for good, with nothing (left) to fall back to:
    /// it is kept in the outbox's quarantine, not retried.
    Quarantined,
    /// The server answered `409 Conflict`: what the request reports belongs
    /// to another run, or already ended otherwise. No fallback is sent, and
    /// the record is retired: neither pending nor quarantined.
    Superseded,
    /// A request under the same key is still stored: it stands, and this one
    /// was neither stored nor sent.
    AlreadyStored,
    /// It was not delivered, and is not stored: the caller must keep it.
    /// Either it could not be stored and did not reach the server, or it was
    /// refused before either (credentials in its URI, another origin than
    /// the dispatcher's). `transient` says whether a replay may succeed.
    Undelivered {
        /// Whether the last failure was transient.
        transient: bool,
        /// The last failure.
        failure: String,
    },
}

/// Whether a request handed to the [`Dispatcher`] is safe on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Committed to the outbox before its first attempt: it survives a crash
    /// and is delivered by a later start if not now.
    Stored,
    /// A request under the same key is stored already: that one stands.
    AlreadyStored,
    /// The outbox could not take it (an `error` event says why): it is sent
    /// in process only, and lost if the process dies first.
    NotStored(OutboxError),
    /// Refused before it was stored: neither stored nor sent (its URI holds
    /// credentials, or goes to another origin than the dispatcher's, or a
    /// task client refused its task id); [`Delivery::Undelivered`] (or the
    /// task client's outcome) says why.
    Refused,
    /// A [`TaskClient`](crate::client::TaskClient) without an outbox: the
    /// report lives in memory only.
    NoOutbox,
}

/// Delivers idempotent requests durably: each is stored in an [`Outbox`]
/// before its first attempt, sent through a [`TerminalRetryLayer`], and
/// replayed from the outbox until the server takes it, across restarts.
///
/// Made by [`Dispatcher::builder`]. Cloning is cheap; the replay worker stops
/// when the last clone is dropped.
pub struct Dispatcher<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Dispatcher<S> {
    fn clone(&self) -> Self {
        Dispatcher {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<S> {
    outbox: Outbox,
    /// One attempt: the replay's.
    attempt: S,
    /// The foreground's attempts, retried.
    retrying: Retrying<S>,
    recovery: Option<Recovery>,
    fallback: Option<Arc<Fallback>>,
    replay_interval: Duration,
    replay_concurrency: usize,
    replay_rate: u32,
    /// The only origin requests are sent to (`scheme://host:port`), if set.
    origin: Option<String>,
    /// Replaced in every text taken from a response.
    secrets: Vec<String>,
    /// How long a server may ask to be left alone: the layer's rule.
    retry_after: RetryAfter,
    /// No replay starts before this: the server asked for a pause
    /// (`Retry-After` on a 429 or 503).
    quiet_until: Mutex<Option<Instant>>,
    /// Delivered records whose removal could not be committed: the replay
    /// skips them, and their removal is tried again once the store can be
    /// written.
    unremoved: Mutex<HashSet<u64>>,
    /// Keys being sent, by the foreground or the replay: never twice at once.
    claimed: Mutex<HashSet<String>>,
    /// Wakes the replay worker: a record was queued or released, or the
    /// dispatcher is gone.
    wake: Arc<Notify>,
}

impl<S> Drop for Shared<S> {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

/// Configures a [`Dispatcher`]; made by [`Dispatcher::builder`].
pub struct DispatcherBuilder<S> {
    outbox: Outbox,
    service: S,
    layer: TerminalRetryLayer,
    recovery: Option<Recovery>,
    fallback: Option<Arc<Fallback>>,
    replay_interval: Duration,
    replay_concurrency: usize,
    replay_rate: u32,
    origin: Option<String>,
    secrets: Vec<String>,
}

impl<S> fmt::Debug for DispatcherBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DispatcherBuilder")
            .field("outbox", &self.outbox)
            .field("layer", &self.layer)
            .field("recovery", &self.recovery)
            .field("fallback", &self.fallback.is_some())
            .field("replay_interval", &self.replay_interval)
            .field("replay_concurrency", &self.replay_concurrency)
            .field("replay_rate", &self.replay_rate)
            .field("origin", &self.origin)
            // The secrets themselves stay out.
            .field("redacted", &self.secrets.len())
            .finish_non_exhaustive()
    }
}

impl<S> Dispatcher<S> {
    /// Starts configuring a dispatcher that stores requests in `outbox` and
    /// sends each attempt through `service` (put the per-attempt timeout
    /// there, and whatever adds the credentials: sensitive headers are never
    /// stored, so a replay after a restart gets them from the service).
    pub fn builder(outbox: Outbox, service: S) -> DispatcherBuilder<S> {
        DispatcherBuilder {
            outbox,
            service,
            layer: TerminalRetryLayer::new(),
            recovery: Some(Recovery::default()),
            fallback: None,
            replay_interval: DEFAULT_REPLAY_INTERVAL,
            replay_concurrency: DEFAULT_REPLAY_CONCURRENCY,
            replay_rate: DEFAULT_REPLAY_RATE,
            origin: None,
            secrets: Vec::new(),
        }
    }

    /// The outbox it stores requests in.
    pub fn outbox(&self) -> &Outbox {
        &self.shared.outbox
    }
}

impl<S> DispatcherBuilder<S> {
    /// The layer foreground deliveries go through (by default
    /// [`TerminalRetryLayer::new`]). The dispatcher's [`Recovery`] is added
    /// to it, and the replay honours its [`RetryAfter`] rule too.
    pub fn layer(mut self, layer: TerminalRetryLayer) -> Self {
        self.layer = layer;
        self
    }

    /// The signal that releases parked retries, and the replay, once any
    /// request succeeds; share it with the other stacks that talk to the same
    /// server. By default a recovery of its own, releasing
    /// [`DEFAULT_RELEASE_PER_SECOND`](crate::recovery::DEFAULT_RELEASE_PER_SECOND)
    /// a second; `None` turns early release
    /// off (the replay then waits for its next probe).
    pub fn recovery(mut self, recovery: Option<Recovery>) -> Self {
        self.recovery = recovery;
        self
    }

    /// What to send when the server refuses a request for good (by default
    /// nothing: the request is quarantined). The fallback is stored in place
    /// of the refused request, in one commit, before it is sent; if it is
    /// refused for good too, it is quarantined. A `409 Conflict` gets no
    /// fallback ([`Delivery::Superseded`]), and neither does a fallback to
    /// another origin than the dispatcher's.
    pub fn fallback(
        mut self,
        fallback: impl Fn(&Entry, StatusCode, &str) -> Option<Request<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        self.fallback = Some(Arc::new(fallback));
        self
    }

    /// The longest wait between two probes while the server is down (by
    /// default [`DEFAULT_REPLAY_INTERVAL`], 30 s); also how often a store
    /// that cannot be written is asked to recover.
    pub fn replay_interval(mut self, interval: Duration) -> Self {
        self.replay_interval = interval;
        self
    }

    /// How many stored requests are replayed at once once the server is
    /// back (by default [`DEFAULT_REPLAY_CONCURRENCY`], 16).
    pub fn replay_concurrency(mut self, concurrency: usize) -> Self {
        self.replay_concurrency = concurrency;
        self
    }

    /// The most replays started in any one second, give or take the replay
    /// concurrency (by default [`DEFAULT_REPLAY_RATE`], 100). The replay
    /// spaces its requests evenly, so that a server back from an outage is
    /// not hit by its whole backlog at once; `0` is an error of
    /// [`build`](DispatcherBuilder::build).
    pub fn replay_rate(mut self, per_second: u32) -> Self {
        self.replay_rate = per_second;
        self
    }

    /// Sends requests to this origin only: its scheme, host and port (the
    /// rest of `origin` is ignored). A stored request for another origin (one
    /// queued under an old base URL, or planted in the file) is never sent:
    /// it is quarantined, with an `error` event naming its host. A request
    /// to another origin handed to [`Dispatcher::send`] is refused the same
    /// way, and not stored ([`Durability::Refused`]). By default requests go
    /// wherever their URI says.
    pub fn origin(mut self, origin: &Uri) -> Self {
        self.origin = Some(origin_key(origin));
        self
    }

    /// A secret (a token, a password) to replace with `[redacted]` in any
    /// text taken from a response: events, the outbox's
    /// [`last_failure`](Entry::last_failure), the failure handed to the
    /// fallback, and [`Delivery::Undelivered`]. Call it once per secret.
    pub fn redact(mut self, secret: impl Into<String>) -> Self {
        self.secrets.push(secret.into());
        self
    }

    /// Checks the settings and starts the replay worker on the current tokio
    /// runtime; it begins with the requests stored by earlier runs, oldest
    /// first.
    ///
    /// # Errors
    ///
    /// A zero replay interval, concurrency or rate, an origin without a
    /// host, or no tokio runtime.
    pub fn build(self) -> Result<Dispatcher<S>, crate::ConfigError>
    where
        S: AttemptService,
        S::Future: Send,
    {
        let invalid = |reason| crate::ConfigError::InvalidReplay { reason };
        if self.replay_interval.is_zero() {
            return Err(invalid("the replay interval must not be zero"));
        }
        if self.replay_concurrency == 0 {
            return Err(invalid("the replay concurrency must not be zero"));
        }
        if self.replay_rate == 0 {
            return Err(invalid("the replay rate must be at least one a second"));
        }
        if self.origin.as_ref().is_some_and(String::is_empty) {
            return Err(invalid("the origin must be an absolute URL with a host"));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| invalid("a dispatcher must be built inside a tokio runtime"))?;
        let retry_after = self.layer.policy().retry_after();
        let layer = match &self.recovery {
            Some(recovery) => self.layer.with_recovery(recovery.clone()),
            None => self.layer,
        };
        let counted: fn(Request<Full<Bytes>>) -> Request<Full<Bytes>> = count_attempt;
        let retrying = layer.layer(MapRequest::new(self.service.clone(), counted));
        let wake = self.outbox.requeued();
        let pace = Pace::new(self.replay_rate);
        let shared = Arc::new(Shared {
            outbox: self.outbox,
            attempt: self.service,
            retrying,
            recovery: self.recovery,
            fallback: self.fallback,
            replay_interval: self.replay_interval,
            replay_concurrency: self.replay_concurrency,
            replay_rate: self.replay_rate,
            origin: self.origin,
            secrets: self.secrets,
            retry_after,
            quiet_until: Mutex::new(None),
            unremoved: Mutex::new(HashSet::new()),
            claimed: Mutex::new(HashSet::new()),
            wake: wake.clone(),
        });
        runtime.spawn(replay(Arc::downgrade(&shared), wake, pace));
        Ok(Dispatcher { shared })
    }
}

impl<S> fmt::Debug for Dispatcher<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        f.debug_struct("Dispatcher")
            .field("outbox", &shared.outbox)
            .field("recovery", &shared.recovery)
            .field("fallback", &shared.fallback.is_some())
            .field("replay_interval", &shared.replay_interval)
            .field("replay_concurrency", &shared.replay_concurrency)
            .field("replay_rate", &shared.replay_rate)
            .field("origin", &shared.origin)
            .field("redacted", &shared.secrets.len())
            .field("in_flight", &lock(&shared.claimed).len())
            .finish()
    }
}

/// A request handed to [`Dispatcher::send`]: await it for how it ended, or
/// [`stored`](Dispatch::stored) first to learn when it is safe on disk.
///
/// Dropping it does not stop the delivery.
#[derive(Debug)]
#[must_use = "the request is delivered anyway; await this to learn how it ended"]
pub struct Dispatch {
    durability: DurabilityWatch,
    delivery: JoinHandle<Delivery>,
}

impl Dispatch {
    /// Waits until the request is stored (or could not be), without waiting
    /// for its delivery.
    pub async fn stored(&mut self) -> Durability {
        self.durability.wait().await
    }
}

impl Future for Dispatch {
    type Output = Delivery;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Delivery> {
        Poll::Ready(match ready!(Pin::new(&mut self.delivery).poll(cx)) {
            Ok(delivery) => delivery,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // The runtime is shutting down.
            Err(_) => match self.durability.now() {
                Some(Durability::Stored) => Delivery::Queued,
                Some(Durability::AlreadyStored) => Delivery::AlreadyStored,
                _ => Delivery::Undelivered {
                    transient: true,
                    failure: "the runtime shut down before delivery".into(),
                },
            },
        })
    }
}

/// Where a delivery says how durable its request is.
#[derive(Debug)]
pub(crate) struct DurabilityWatch {
    receiver: Option<oneshot::Receiver<Durability>>,
    known: Option<Durability>,
}

impl DurabilityWatch {
    pub(crate) fn new() -> (oneshot::Sender<Durability>, DurabilityWatch) {
        let (sender, receiver) = oneshot::channel();
        let watch = DurabilityWatch {
            receiver: Some(receiver),
            known: None,
        };
        (sender, watch)
    }

    /// Waits for the answer; a delivery gone without one may not have stored.
    pub(crate) async fn wait(&mut self) -> Durability {
        if let Some(receiver) = self.receiver.take() {
            let stopped = |_| Durability::NotStored(OutboxError::stopped());
            self.known = Some(receiver.await.unwrap_or_else(stopped));
        }
        self.known.clone().expect("set above")
    }

    /// The answer, if it came.
    pub(crate) fn now(&mut self) -> Option<Durability> {
        if let Some(receiver) = &mut self.receiver {
            if let Ok(durability) = receiver.try_recv() {
                self.known = Some(durability);
                self.receiver = None;
            }
        }
        self.known.clone()
    }
}

impl<S> Dispatcher<S>
where
    S: AttemptService,
    S::Future: Send,
{
    /// Stores `request` under `key`, then delivers it on a task of its own
    /// (see [`Dispatch`]). A request still stored under `key` stands: this
    /// one is then neither stored nor sent ([`Delivery::AlreadyStored`]).
    ///
    /// A request whose URI holds credentials (`http://user:password@host/`)
    /// is refused: neither stored nor sent, it ends
    /// [`Undelivered`](Delivery::Undelivered) (not transient) and
    /// [`stored`](Dispatch::stored) says [`Durability::Refused`]. Put
    /// credentials in a header the sending service adds: they are never
    /// stored. A request to another origin than the one set by
    /// [`DispatcherBuilder::origin`] is refused the same way.
    pub fn send(&self, key: impl Into<String>, request: Request<Bytes>) -> Dispatch {
        let (durable, durability) = DurabilityWatch::new();
        let dispatcher = self.clone();
        let key = key.into();
        let on_stored = move |durability| {
            let _ = durable.send(durability);
        };
        let delivery =
            tokio::spawn(async move { dispatcher.deliver(key, request, on_stored).await });
        Dispatch {
            durability,
            delivery,
        }
    }

    /// The foreground delivery: store, send through the retry layer, record
    /// the end. `on_stored` hears whether the request was stored as soon as
    /// that is known.
    async fn deliver(
        &self,
        key: String,
        request: Request<Bytes>,
        on_stored: impl FnOnce(Durability) + Send,
    ) -> Delivery {
        let shared = &*self.shared;
        if let Some(failure) = shared.refusal(request.uri()) {
            tracing::error!(key, failure, "request refused: neither stored nor sent");
            on_stored(Durability::Refused);
            return Delivery::Undelivered {
                transient: false,
                failure,
            };
        }
        let Some(claim) = Claim::take(&self.shared, &key) else {
            // Being sent now, so stored (or being stored) already.
            on_stored(Durability::AlreadyStored);
            return Delivery::AlreadyStored;
        };
        let mut entry = Entry::new(key, &request, new_idempotency_key());
        let seq = match shared.outbox.write(Write::Insert(entry.clone())).await {
            Ok(Written::Inserted(seq)) => {
                tracing::debug!(
                    key = entry.key,
                    pending = shared.outbox.pending_count(),
                    "request stored in the outbox"
                );
                on_stored(Durability::Stored);
                Some(seq)
            }
            Ok(Written::Existing | Written::Changed(_)) => {
                on_stored(Durability::AlreadyStored);
                return Delivery::AlreadyStored;
            }
            Err(error) => {
                tracing::error!(
                    key = entry.key,
                    error = %error,
                    "request could not be stored in the outbox: it is not durable, sending it in process only"
                );
                on_stored(Durability::NotStored(error));
                None
            }
        };
        entry.seq = seq.unwrap_or_default();
        let mut request = request;
        if let Ok(value) = HeaderValue::from_str(&entry.idempotency_key) {
            request.headers_mut().insert(IDEMPOTENCY_KEY, value);
        }
        let mut fell_back = false;
        loop {
            let attempts = Arc::new(AtomicU32::new(0));
            request
                .extensions_mut()
                .insert(AttemptCounter(attempts.clone()));
            let sent = shared.send(shared.retrying.clone(), request).await;
            let attempts = attempts.load(Ordering::Relaxed);
            let step = shared.settle(&entry, seq, sent, attempts, fell_back).await;
            match step {
                Step::Retired(delivery, Some(seq)) => {
                    // The caller need not wait for the removal: the claim,
                    // held until it is committed, keeps the replay off.
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        shared.remove(&claim.key, seq).await;
                        claim.settle();
                    });
                    return delivery;
                }
                Step::Retired(delivery, None) | Step::Done(delivery) => {
                    claim.settle();
                    return delivery;
                }
                Step::Queued => {
                    drop(claim);
                    return Delivery::Queued;
                }
                Step::FallBack(fallback) => {
                    fell_back = true;
                    (request, entry) = *fallback;
                }
            }
        }
    }
}

/// What comes after an attempt (or a foreground call's attempts).
enum Step {
    /// Done with for good: the server took it ([`Delivery::Delivered`] or
    /// [`Delivery::FallbackDelivered`]) or superseded it; the record under
    /// this sequence number, if stored, is to be removed.
    Retired(Delivery, Option<u64>),
    /// Settled otherwise: quarantined, or never stored and not delivered.
    Done(Delivery),
    /// Left in the outbox for the replay.
    Queued,
    /// Send this request next, stored as this entry.
    FallBack(Box<(Request<Bytes>, Entry)>),
}

/// How a request (with its retries) went.
struct Sent {
    outcome: Outcome,
    status: Option<StatusCode>,
    /// How long the server asked to be left alone (`Retry-After`), capped.
    pause: Option<Duration>,
    /// What went wrong, cleaned: empty for a success.
    failure: String,
}

impl<S> Shared<S> {
    /// Why a request to `uri` must not be sent, if it must not: credentials
    /// in the URI, or another origin than the dispatcher's. Names the host,
    /// never the credentials.
    fn refusal(&self, uri: &Uri) -> Option<String> {
        let target = clean(&origin_key(uri), &[]);
        let target = match target.is_empty() {
            true => "a URI without a host",
            false => target.as_str(),
        };
        if uri
            .authority()
            .is_some_and(|authority| authority.as_str().contains('@'))
        {
            return Some(format!(
                "not sent: the URI to {target} holds credentials (user information before the \
                 host); put them in a header the sending service adds"
            ));
        }
        let origin = self.origin.as_deref()?;
        (!is_origin(uri, origin)).then(|| {
            format!("not sent: it goes to {target}, not to the dispatcher's origin {origin}")
        })
    }

    /// Sends `request` through `service` and reads how it went; whatever is
    /// taken from the response is cleaned, the secrets redacted.
    async fn send<T, RB, E>(&self, service: T, request: Request<Bytes>) -> Sent
    where
        T: Service<Request<Full<Bytes>>, Response = Response<RB>, Error = E>,
        RB: http_body::Body,
        E: fmt::Debug,
    {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        let method = request.method().clone();
        // A stored path is untrusted too.
        let path = clean(request.uri().path(), &secrets);
        let result = service.oneshot(request.map(Full::new)).await;
        let outcome = DefaultClassifier.classify(&result);
        match result {
            Ok(response) => {
                let status = response.status();
                let pause = self
                    .retry_after
                    .delay(status, response.headers(), SystemTime::now());
                let mut failure = String::new();
                if outcome != Outcome::Success {
                    failure = format!("{method} {path} returned {}", status.as_u16());
                    if let Some(note) = redirect_note(status, response.headers()) {
                        failure = format!("{failure}: {}", clean(&note, &secrets));
                    }
                    let body = body_start(response.into_body(), BODY_TIMEOUT, &secrets).await;
                    if !body.is_empty() {
                        failure = format!("{failure}: {body}");
                    }
                }
                Sent {
                    outcome,
                    status: Some(status),
                    pause,
                    failure,
                }
            }
            Err(error) => Sent {
                outcome,
                status: None,
                pause: None,
                failure: format!(
                    "{method} {path} failed before any response: {}",
                    clean(&format!("{error:?}"), &secrets)
                ),
            },
        }
    }

    /// Records how `entry` (stored as `seq`, if it is) went, and says what
    /// comes next.
    async fn settle(
        &self,
        entry: &Entry,
        seq: Option<u64>,
        sent: Sent,
        attempts: u32,
        fell_back: bool,
    ) -> Step {
        let key = entry.key.as_str();
        if let Some(pause) = sent.pause {
            self.quiet_for(pause);
        }
        match sent.outcome {
            Outcome::Success => {
                if seq.is_some() && entry.attempts > 0 {
                    tracing::info!(
                        key,
                        attempts = entry.attempts.saturating_add(attempts),
                        pending = self.outbox.pending_count(),
                        "stored request delivered from the outbox"
                    );
                }
                let delivery = match fell_back {
                    true => Delivery::FallbackDelivered,
                    false => Delivery::Delivered,
                };
                Step::Retired(delivery, seq)
            }
            Outcome::Transient => match seq {
                Some(seq) => {
                    let failure = sent.failure;
                    self.record(
                        key,
                        Write::Failed {
                            seq,
                            attempts,
                            failure,
                        },
                    )
                    .await;
                    Step::Queued
                }
                None => Step::Done(Delivery::Undelivered {
                    transient: true,
                    failure: sent.failure,
                }),
            },
            Outcome::Permanent if sent.status == Some(StatusCode::CONFLICT) => {
                tracing::warn!(
                    key,
                    failure = sent.failure,
                    "the server answered 409 Conflict: the request is superseded (another run, \
                     or it already ended otherwise); retired from the outbox, no fallback"
                );
                Step::Retired(Delivery::Superseded, seq)
            }
            Outcome::Permanent => {
                let status = sent.status.unwrap_or(StatusCode::BAD_REQUEST);
                let fallback = match (&self.fallback, fell_back) {
                    (Some(fallback), false) => fallback(entry, status, &sent.failure),
                    _ => None,
                };
                let fallback = fallback.filter(|fallback| match self.refusal(fallback.uri()) {
                    Some(refusal) => {
                        tracing::error!(key, refusal, "fallback refused: not stored, not sent");
                        false
                    }
                    None => true,
                });
                if let Some(fallback) = fallback {
                    let mut next = Entry::new(entry.key.clone(), &fallback, new_idempotency_key());
                    next.seq = entry.seq;
                    next.stored_at = entry.stored_at;
                    if let Some(seq) = seq {
                        // The fallback is stored before it is sent, in the
                        // commit that retires the refused request.
                        let replace = Write::Replace {
                            seq,
                            entry: next.clone(),
                        };
                        self.record(key, replace).await;
                    }
                    let mut request = fallback;
                    if let Ok(value) = HeaderValue::from_str(&next.idempotency_key) {
                        request.headers_mut().insert(IDEMPOTENCY_KEY, value);
                    }
                    return Step::FallBack(Box::new((request, next)));
                }
                match seq {
                    Some(seq) => {
                        tracing::error!(
                            key,
                            failure = sent.failure,
                            "request refused for good with nothing to fall back to: quarantined \
                             in the outbox, not retried"
                        );
                        let failure = sent.failure;
                        self.record(key, Write::Quarantine { seq, failure }).await;
                        Step::Done(Delivery::Quarantined)
                    }
                    None => Step::Done(Delivery::Undelivered {
                        transient: false,
                        failure: sent.failure,
                    }),
                }
            }
        }
    }

    /// Commits `write`; a failure is an `error` event, and the delivery goes
    /// on: what is on disk is replayed, the server takes replays as no-ops.
    async fn record(&self, key: &str, write: Write) {
        if let Err(error) = self.outbox.write(write).await {
            tracing::error!(key, error = %error, "outbox could not record a delivery step");
        }
    }

    /// Removes a record the server is done with. If that cannot be
    /// committed, the record is remembered instead: the replay skips it (a
    /// store that cannot be written would otherwise have it sent again and
    /// again), and its removal is tried again once the store can be written.
    async fn remove(&self, key: &str, seq: u64) {
        if let Err(error) = self.outbox.write(Write::Delivered { seq }).await {
            lock(&self.unremoved).insert(seq);
            tracing::error!(
                key,
                error = %error,
                "outbox could not remove a delivered request: it is not sent again, its removal \
                 is retried once the outbox can be written"
            );
        }
    }

    /// Tries the removals that failed again; stops at the first failure.
    async fn remove_again(&self) {
        let unremoved: Vec<u64> = lock(&self.unremoved).iter().copied().collect();
        for seq in unremoved {
            if self.outbox.write(Write::Delivered { seq }).await.is_err() {
                return;
            }
            lock(&self.unremoved).remove(&seq);
        }
    }

    /// Starts no replay for `pause` from now (or longer, if asked before).
    fn quiet_for(&self, pause: Duration) {
        let until = Instant::now() + pause;
        let mut quiet = lock(&self.quiet_until);
        if quiet.is_none_or(|at| at < until) {
            *quiet = Some(until);
        }
    }

    /// Until when the server asked to be left alone, if that is still ahead.
    fn quiet(&self) -> Option<Instant> {
        lock(&self.quiet_until).filter(|until| *until > Instant::now())
    }
}

/// Spaces the replay's requests evenly: at most one per `gap`, so at most the
/// replay rate start in any one second.
struct Pace {
    gap: Duration,
    next: Instant,
}

impl Pace {
    fn new(per_second: u32) -> Pace {
        Pace {
            gap: Duration::from_secs(1) / per_second.max(1),
            next: Instant::now(),
        }
    }

    /// Waits for the next start.
    async fn wait(&mut self) {
        sleep_until(self.next).await;
        let now = Instant::now();
        // Late by less than a gap: keep to the grid, so that timer delays do
        // not add up; idle longer: from now, with no burst to catch up.
        let from = match now < self.next + self.gap {
            true => self.next,
            false => now,
        };
        self.next = from + self.gap;
    }
}

/// Runs `until` to its end, unless the dispatcher is dropped first (`None`).
/// Holds the dispatcher weakly meanwhile, so that it can be dropped.
async fn unless_gone<S, F: Future>(
    dispatcher: &Weak<Shared<S>>,
    wake: &Notify,
    until: F,
) -> Option<F::Output> {
    tokio::pin!(until);
    loop {
        tokio::select! {
            output = &mut until => return Some(output),
            () = wake.notified() => if dispatcher.strong_count() == 0 {
                return None;
            },
        }
    }
}

/// The replay worker: delivers what the outbox holds, probing a server that is
/// down one request at a time, at most at the replay rate, never while the
/// server asked for a pause or the store cannot record a delivery. Holds the
/// dispatcher weakly, so that it ends with the last handle.
async fn replay<S>(dispatcher: Weak<Shared<S>>, wake: Arc<Notify>, mut pace: Pace)
where
    S: AttemptService,
    S::Future: Send,
{
    let jitter = Jitter::full();
    // `None` while the server is taken to be up. At start, a probe at once:
    // what an earlier run left goes before anything else.
    let mut probe_delay = Some(Duration::ZERO);
    // The store is asked to recover at most once per replay interval.
    let mut next_recovery = Instant::now();
    loop {
        let Some(shared) = dispatcher.upgrade() else {
            return;
        };
        let interval = shared.replay_interval;
        // No replay while the store cannot record a delivery (it would be
        // sent again and again), asked to recover once per interval; nor
        // while the server asked for a pause.
        let mut writable = shared.outbox.is_writable();
        if !writable && Instant::now() >= next_recovery {
            next_recovery = Instant::now() + interval;
            writable = shared.outbox.recover().await;
            match writable {
                true => tracing::info!("the outbox can be written again: the replay resumes"),
                false => tracing::warn!("the outbox cannot be written: the replay waits"),
            }
        }
        let rest = match writable {
            true => {
                shared.remove_again().await;
                shared.quiet()
            }
            false => Some(next_recovery),
        };
        if let Some(until) = rest {
            drop(shared);
            if unless_gone(&dispatcher, &wake, sleep_until(until))
                .await
                .is_none()
            {
                return;
            }
            continue;
        }
        let oldest = match shared.outbox.pending_after(0, 1) {
            Ok(oldest) => oldest.into_iter().next(),
            Err(error) => {
                tracing::error!(error = %error, "outbox cannot be read for replay");
                None
            }
        };
        match (oldest, probe_delay) {
            (None, _) => {
                // Nothing stored: wait for a record to be queued or requeued.
                drop(shared);
                wake.notified().await;
                probe_delay = Some(FIRST_PROBE_DELAY.min(interval));
            }
            (Some(oldest), Some(delay)) => {
                let deadline = Instant::now() + jitter.apply(delay);
                let recovery = shared.recovery.clone();
                drop(shared);
                // Only a success or the deadline ends the wait: a record
                // queued meanwhile is covered by the probe.
                let wait = async {
                    match recovery {
                        Some(recovery) => {
                            recovery.park(oldest.uri(), deadline).await == Woken::Released
                        }
                        None => {
                            sleep_until(deadline).await;
                            false
                        }
                    }
                };
                let Some(released) = unless_gone(&dispatcher, &wake, wait).await else {
                    return;
                };
                let Some(shared) = dispatcher.upgrade() else {
                    return;
                };
                if shared.quiet().is_some() {
                    // Asked for a pause meanwhile: that comes first.
                    continue;
                }
                let up = released || shared.probe(&mut pace).await;
                if released {
                    tracing::debug!("a request to the server succeeded: replaying the outbox");
                }
                probe_delay = match up {
                    true => None,
                    false => Some(delay_after(delay, interval)),
                };
            }
            (Some(_), None) => match shared.replay_all(&mut pace).await {
                Replayed::Down => probe_delay = Some(FIRST_PROBE_DELAY.min(interval)),
                Replayed::All { sent } if sent > 0 => {}
                // What is left is being sent by the foreground, which wakes
                // the replay if it leaves something behind.
                Replayed::All { .. } => wake.notified().await,
            },
        }
    }
}

/// The wait after a failed probe that waited `delay`: doubled, at least the
/// first probe delay, at most `interval`.
fn delay_after(delay: Duration, interval: Duration) -> Duration {
    delay.saturating_mul(2).max(FIRST_PROBE_DELAY).min(interval)
}

/// How a replay of the whole outbox went.
enum Replayed {
    /// Every record not being sent already was sent; `sent` of them.
    All { sent: usize },
    /// A transient failure, or the server asked for a pause: it is down
    /// again.
    Down,
}

impl<S> Shared<S>
where
    S: AttemptService,
    S::Future: Send,
{
    /// Sends the oldest record the replay may send once; whether the server
    /// took it (or refused it for good: it is up either way).
    async fn probe(self: Arc<Self>, pace: &mut Pace) -> bool {
        let Ok(entries) = self.outbox.pending_after(0, REPLAY_PAGE) else {
            return false;
        };
        for listed in entries {
            if let Some((entry, claim)) = self.take(&listed).await {
                pace.wait().await;
                tracing::info!(
                    key = entry.key,
                    pending = self.outbox.pending_count(),
                    oldest_pending_age_s = age(entry.stored_at).as_secs(),
                    "probing the server with the oldest stored request"
                );
                return self.replay_one(entry, claim).await;
            }
        }
        // Every record is being sent by the foreground, or awaits its
        // removal: nothing to probe with.
        false
    }

    /// Sends every record the replay may send, oldest first, at most
    /// `replay_concurrency` at once and at the replay rate; stops at the
    /// first transient failure.
    async fn replay_all(self: Arc<Self>, pace: &mut Pace) -> Replayed {
        let mut after = 0;
        let mut running = JoinSet::new();
        let mut healthy = true;
        let mut sent = 0;
        'pages: while healthy {
            let entries = match self.outbox.pending_after(after, REPLAY_PAGE) {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::error!(error = %error, "outbox cannot be read for replay");
                    healthy = false;
                    break;
                }
            };
            let Some(last) = entries.last() else {
                break;
            };
            after = last.seq;
            for listed in entries {
                while running.len() >= self.replay_concurrency {
                    if let Some(Ok(false)) = running.join_next().await {
                        healthy = false;
                        break 'pages;
                    }
                }
                let Some((entry, claim)) = self.take(&listed).await else {
                    continue;
                };
                pace.wait().await;
                // Asked for a pause, or a removal failed, meanwhile: the
                // claim's release wakes the replay for this record later.
                if self.quiet().is_some() || !self.outbox.is_writable() {
                    healthy = false;
                    break 'pages;
                }
                tracing::info!(
                    key = entry.key,
                    attempts = entry.attempts,
                    stored_for_s = age(entry.stored_at).as_secs(),
                    pending = self.outbox.pending_count(),
                    "replaying a stored request"
                );
                running.spawn(self.clone().replay_one(entry, claim));
                sent += 1;
            }
        }
        while let Some(done) = running.join_next().await {
            healthy &= done.unwrap_or(false);
        }
        match healthy {
            true => Replayed::All { sent },
            false => Replayed::Down,
        }
    }

    /// Claims `listed` (as a page of the outbox had it) for the replay, and
    /// reads it again, now that no one else may send it. `None` when it is
    /// not to be sent: it is being sent, is gone or changed since the page
    /// was read (delivered in the foreground, say), awaits its removal, or
    /// goes where the dispatcher sends nothing (it is quarantined here).
    async fn take(self: &Arc<Self>, listed: &Entry) -> Option<(Entry, Claim<S>)> {
        if lock(&self.unremoved).contains(&listed.seq) {
            return None;
        }
        let claim = Claim::take(self, &listed.key)?;
        let entry = match self.outbox.get(listed.seq) {
            Ok(Some(entry)) if entry.idempotency_key == listed.idempotency_key => entry,
            // Replaced (by a fallback): the next pass reads it as it is now.
            Ok(Some(_)) => return None,
            Ok(None) => {
                claim.settle();
                return None;
            }
            Err(error) => {
                tracing::error!(key = listed.key, error = %error, "outbox cannot be read for replay");
                claim.settle();
                return None;
            }
        };
        if let Some(failure) = self.refusal(entry.uri()) {
            tracing::error!(
                key = entry.key,
                failure,
                "stored request not sent: quarantined in the outbox"
            );
            let seq = entry.seq;
            self.record(&entry.key, Write::Quarantine { seq, failure })
                .await;
            claim.settle();
            return None;
        }
        Some((entry, claim))
    }

    /// One attempt of a stored record (and of its fallback, if it has one
    /// and is refused for good); whether the server answered.
    async fn replay_one(self: Arc<Self>, mut entry: Entry, claim: Claim<S>) -> bool {
        let mut fell_back = false;
        loop {
            let sent = self.send(self.attempt.clone(), entry.request()).await;
            if sent.outcome == Outcome::Success {
                if let Some(recovery) = &self.recovery {
                    recovery.observe(entry.uri());
                }
            }
            let answered = sent.outcome != Outcome::Transient;
            match self
                .settle(&entry, Some(entry.seq), sent, 1, fell_back)
                .await
            {
                Step::FallBack(fallback) => {
                    fell_back = true;
                    entry = fallback.1;
                }
                Step::Retired(_, seq) => {
                    if let Some(seq) = seq {
                        self.remove(&entry.key, seq).await;
                    }
                    claim.settle();
                    return answered;
                }
                // The replay itself goes on with what is queued.
                Step::Done(_) | Step::Queued => {
                    claim.settle();
                    return answered;
                }
            }
        }
    }
}

/// A key being sent; released on drop, whatever ends the sending.
struct Claim<S> {
    shared: Weak<Shared<S>>,
    key: String,
    /// Whether the record is settled (delivered, quarantined, never
    /// stored): the replay need not look at it.
    settled: bool,
}

impl<S> Claim<S> {
    fn take(shared: &Arc<Shared<S>>, key: &str) -> Option<Claim<S>> {
        let fresh = lock(&shared.claimed).insert(key.to_owned());
        fresh.then(|| Claim {
            shared: Arc::downgrade(shared),
            key: key.to_owned(),
            settled: false,
        })
    }

    /// Releases the key of a settled record.
    fn settle(mut self) {
        self.settled = true;
    }
}

impl<S> Drop for Claim<S> {
    /// A record left unsettled (queued, or its sending stopped) is the
    /// replay's: wake it.
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.claimed).remove(&self.key);
            if !self.settled {
                shared.wake.notify_one();
            }
        }
    }
}

/// Counts a foreground call's attempts; carried in the request's extensions,
/// so every clone the retry layer makes shares it.
#[derive(Clone)]
struct AttemptCounter(Arc<AtomicU32>);

fn count_attempt(request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    if let Some(AttemptCounter(attempts)) = request.extensions().get() {
        // Saturates rather than wraps: a count is never read as zero again.
        let _ = attempts.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| {
            Some(count.saturating_add(1))
        });
    }
    request
}

/// A fresh idempotency key: 128 bits from the standard library's randomly
/// seeded hasher, over a counter, the clock and the process id, written as a
/// version 4 UUID.
pub(super) fn new_idempotency_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::AtomicU64;

    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let half = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(count);
        hasher.write_u128(now);
        hasher.write_u32(std::process::id());
        hasher.finish()
    };
    let bits = (u128::from(half()) << 64 | u128::from(half())) & !(0xF << 76) & !(0x3 << 62)
        | (0x4 << 76)
        | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_fresh_version_4_uuids() {
        let keys: HashSet<String> = (0..1000).map(|_| new_idempotency_key()).collect();
        assert_eq!(keys.len(), 1000);
        for key in &keys {
            assert_eq!(key.len(), 36);
            assert_eq!(&key[14..15], "4", "{key}");
            assert!(matches!(&key[19..20], "8" | "9" | "a" | "b"), "{key}");
        }
    }

    /// A commit that fails for real and then works again cannot be made from
    /// outside the store: a removal that failed is recorded here by hand.
    #[cfg(feature = "test-server")]
    #[tokio::test(start_paused = true)]
    async fn a_delivery_left_unremoved_is_removed_once_the_store_can_be_written_not_resent() {
        use crate::test_server::{Reply, TestServer};
        use hyper_util::{client::legacy::Client, rt::TokioExecutor};

        let directory =
            std::env::temp_dir().join(format!("terminal-retry-unremoved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        let outbox = Outbox::open(directory.join("requests.redb")).unwrap();
        let server = TestServer::scripted([Reply::status(502)]).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let once = TerminalRetryLayer::new().with_schedule(crate::Schedule::new([]).unwrap());
        let dispatcher = Dispatcher::builder(outbox, client)
            .layer(once)
            .build()
            .unwrap();
        let request = Request::post(server.url("/r/1"))
            .body(Bytes::new())
            .unwrap();
        assert_eq!(dispatcher.send("r1", request).await, Delivery::Queued);
        let seq = dispatcher.outbox().pending().unwrap()[0].seq;
        // As if it had been delivered and its removal had failed.
        lock(&dispatcher.shared.unremoved).insert(seq);

        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(dispatcher.outbox().pending().unwrap().is_empty());
        assert!(lock(&dispatcher.shared.unremoved).is_empty());
        assert_eq!(server.requests().len(), 1, "not sent again");
        drop(dispatcher);
        let _ = std::fs::remove_dir_all(&directory);
    }
}
