//! Configuring a [`Dispatcher`]: [`DispatcherBuilder`], and the defaults it
//! starts from.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Full;
use tokio::sync::Notify;
use tower::{util::MapRequest, BoxError, Layer, Service};

use super::{
    dispatcher::{Handles, Replay, Settings, Shared},
    foreground::count_attempt,
    lanes::supervise,
    Dispatcher, Entry, Outbox,
};
use crate::{
    origin::origin_key, Classify, DefaultClassifier, Recovery, TerminalRetryLayer,
    TerminalRetryPolicy,
};

/// How long a foreground delivery waits for each write to the store before
/// it goes on without it, unless set.
const DEFAULT_STORE_WAIT: Duration = Duration::from_secs(3);

/// Configures a [`Dispatcher`]; made by [`Dispatcher::builder`].
pub struct DispatcherBuilder<S, C = DefaultClassifier> {
    outbox: Option<Outbox>,
    service: S,
    layer: TerminalRetryLayer<C>,
    settings: Settings,
    /// How long a claim holds, in an outbox shared by processes: unless
    /// set, as long as the store holds one by default.
    lease: Option<Duration>,
}

impl<S, C: fmt::Debug> fmt::Debug for DispatcherBuilder<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.settings
            .debug_fields(
                f.debug_struct("DispatcherBuilder")
                    .field("outbox", &self.outbox)
                    .field("layer", &self.layer),
            )
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl<S> Dispatcher<S> {
    /// Starts configuring a dispatcher that stores requests in `outbox` and
    /// sends each attempt through `service` (put the per-attempt timeout
    /// there, and whatever adds the credentials: sensitive headers are never
    /// stored, so a replay after a restart gets them from the service).
    pub fn builder(outbox: Outbox, service: S) -> DispatcherBuilder<S> {
        DispatcherBuilder::new(Some(outbox), service)
    }

    /// Starts configuring a dispatcher without a store: each request is
    /// sent through `service` in process only, with the same rules as one
    /// stored (the layer's retries, the fallback, `409`, the origins and
    /// redaction), and ends [`Undelivered`](super::Delivery::Undelivered)
    /// where a stored one would be queued; its
    /// [`stored`](super::Dispatch::stored) says
    /// [`InMemory`](super::Durability::InMemory). It has no replay worker.
    pub fn in_memory(service: S) -> DispatcherBuilder<S> {
        DispatcherBuilder::new(None, service)
    }
}

impl<S> DispatcherBuilder<S> {
    fn new(outbox: Option<Outbox>, service: S) -> DispatcherBuilder<S> {
        DispatcherBuilder {
            outbox,
            service,
            layer: TerminalRetryLayer::new(
                TerminalRetryPolicy::default().with_recovery(Recovery::default()),
            ),
            settings: Settings {
                recovery: None,
                fallback: None,
                replay: Replay::default(),
                origins: Vec::new(),
                any_origin: false,
                store_wait: DEFAULT_STORE_WAIT,
                secrets: Vec::new(),
                per_destination: None,
                give_up_after: None,
            },
            lease: None,
        }
    }
}

impl<S, C> DispatcherBuilder<S, C> {
    /// The layer foreground deliveries go through, with its policy: each
    /// answer is classified once, by the layer, and the replay's single
    /// attempts by the same classifier; the replay honours its
    /// [`RetryAfter`](crate::RetryAfter) rule too, and its [`Recovery`]
    /// (if it has one) releases the replay of a destination that is down as
    /// soon as a request to it succeeds: share it with the other stacks that
    /// talk to the same servers. By default the default policy with a
    /// [`Recovery`] of its own; a layer whose policy has none waits for the
    /// next probe.
    pub fn layer<D>(self, layer: TerminalRetryLayer<D>) -> DispatcherBuilder<S, D> {
        DispatcherBuilder {
            outbox: self.outbox,
            service: self.service,
            layer,
            settings: self.settings,
            lease: self.lease,
        }
    }

    /// What to send when the server refuses a request for good (by default
    /// nothing: the request is quarantined). The fallback is stored in place
    /// of the refused request, in one commit, before it is sent; if it is
    /// refused for good too, it is quarantined. It keeps the refused
    /// request's [`Tag`](super::Tag) unless it carries its own. A `409
    /// Conflict` gets no fallback ([`Delivery::Superseded`](super::Delivery::Superseded)),
    /// and neither does a fallback to another origin than the dispatcher's.
    pub fn fallback(
        mut self,
        fallback: impl Fn(&Entry, StatusCode, &str) -> Option<Request<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        self.settings.fallback = Some(Arc::new(fallback));
        self
    }

    /// How the replay worker sends what is stored (see [`Replay`]; by
    /// default [`Replay::default`]). A dispatcher
    /// [without a store](Dispatcher::in_memory) replays nothing.
    pub fn replay(mut self, replay: Replay) -> Self {
        self.settings.replay = replay;
        self
    }

    /// How long this dispatcher holds a record it claimed in an outbox on
    /// PostgreSQL (by default 30 s), renewed every third of it while the
    /// attempt runs. Once a holder's lease has run out (it died, or hung),
    /// another dispatcher on the queue takes the record over: within the
    /// lease and the replay interval. Every write to a record is fenced by
    /// the claim's generation, so a holder whose lease ran out cannot undo
    /// the work of the one that took over. A redb outbox is held by one
    /// process and needs no lease. `0` is an error of
    /// [`build`](DispatcherBuilder::build).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Adds `origin` (its scheme, host and port; the rest is ignored) to the
    /// origins requests may go to: call it once for each. A request to
    /// another origin handed to [`Dispatcher::send`] is refused, not stored
    /// ([`Durability::Refused`](super::Durability::Refused)), and so is a
    /// fallback to one.
    ///
    /// A stored request for an origin outside the list is never sent by this
    /// dispatcher. On a file ([`Outbox::open`]), which one process holds, it
    /// is quarantined (one queued under an old base URL, or planted in the
    /// file), with an `error` event naming its host. On a shared outbox
    /// ([`Outbox::connect`]) it is left alone, neither claimed nor changed:
    /// it belongs to another dispatcher on the queue, the one whose list
    /// holds its origin.
    ///
    /// On a file, without a list, requests go wherever their URI says. On a
    /// shared outbox, [`build`](DispatcherBuilder::build) needs this or
    /// [`any_origin`](DispatcherBuilder::any_origin): whoever can store a
    /// request in the queue must not be able to send this dispatcher's
    /// credentials to a host of its choosing.
    pub fn origin(mut self, origin: &Uri) -> Self {
        self.settings.origins.push(origin_key(origin));
        self
    }

    /// Lets requests go wherever their URI says, on a shared outbox too: for
    /// a sender whose service adds no shared credential (webhooks to its
    /// customers' own endpoints). Not to be combined with
    /// [`origin`](DispatcherBuilder::origin).
    pub fn any_origin(mut self) -> Self {
        self.settings.any_origin = true;
        self
    }

    /// The longest a foreground delivery waits for each write to the store
    /// (by default 3 s): the insert before the first attempt, and the
    /// records of how it went. Past it, the request is sent without the
    /// store, exactly as when the store cannot be written: a `warn` event
    /// says so, and [`Dispatch::stored`](super::Dispatch::stored) says
    /// [`Durability::NotStored`](super::Durability::NotStored). A store
    /// that freezes (a database that stops answering, a table locked by
    /// another session) does not hold deliveries up. `0` is an error of
    /// [`build`](DispatcherBuilder::build).
    pub fn store_wait(mut self, wait: Duration) -> Self {
        self.settings.store_wait = wait;
        self
    }

    /// A secret (a token, a password) to replace with `[redacted]` in any
    /// text taken from a response: events, the outbox's
    /// [`last_failure`](Entry::last_failure), the failure handed to the
    /// fallback, and [`Delivery::Undelivered`](super::Delivery::Undelivered).
    /// Call it once per secret.
    pub fn redact(mut self, secret: impl Into<String>) -> Self {
        self.settings.secrets.push(secret.into());
        self
    }

    /// Replay slots one destination may hold at once (by default half the
    /// replay's [`concurrency`](Replay::concurrency), at least one; at most
    /// all of them): a destination that answers slowly, or not at all, holds
    /// at most these, and the others are served meanwhile. `0` is an error
    /// of [`build`](DispatcherBuilder::build).
    pub fn per_destination_concurrency(mut self, slots: usize) -> Self {
        self.settings.per_destination = Some(slots);
        self
    }

    /// Gives up on a destination that has been down this long without a
    /// single success: its stored requests are quarantined (listed by
    /// [`Outbox::quarantined`], their failure saying why, brought back by
    /// [`Outbox::requeue`]), with one `warn` event naming its origin. Off
    /// by default: a terminal report is never given up on. `0` is an error
    /// of [`build`](DispatcherBuilder::build).
    ///
    /// The time counts from the destination's first failure, across
    /// restarts: the store keeps when it went down.
    pub fn give_up_after(mut self, down_for: Duration) -> Self {
        self.settings.give_up_after = Some(down_for);
        self
    }

    /// Checks the settings and starts the replay worker on the current tokio
    /// runtime; it begins with the requests stored by earlier runs, oldest
    /// first.
    ///
    /// `service` must be a cloneable service of HTTP requests whose errors
    /// can be described (hyper-util's client, with timeouts or other layers
    /// on it), and the classifier one of its results.
    ///
    /// # Errors
    ///
    /// A zero replay interval, concurrency, rate, lease or store wait; an
    /// origin without a host; both `origin` and `any_origin`, or neither on
    /// a shared outbox ([`Outbox::connect`]); or no tokio runtime.
    pub fn build<RB, E>(self) -> Result<Dispatcher<S, C>, crate::ConfigError>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<RB>, Error = E>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
        RB: http_body::Body<Data: Send> + Send + 'static,
        E: Into<BoxError> + fmt::Debug + Send + 'static,
        C: Classify<Response<RB>, E> + Send + Sync + 'static,
    {
        let invalid = |reason| crate::ConfigError::InvalidSetting { reason };
        let replay = self.settings.replay;
        if replay.interval.is_zero() {
            return Err(invalid("the replay interval must not be zero"));
        }
        if replay.concurrency == 0 {
            return Err(invalid("the replay concurrency must not be zero"));
        }
        if replay.rate == 0 {
            return Err(invalid("the replay rate must be at least one a second"));
        }
        if self.lease.is_some_and(|lease| lease.is_zero()) {
            return Err(invalid("the lease must not be zero"));
        }
        if self.settings.per_destination == Some(0) {
            return Err(invalid("the per-destination concurrency must not be zero"));
        }
        if self
            .settings
            .give_up_after
            .is_some_and(|after| after.is_zero())
        {
            return Err(invalid("give_up_after must not be zero"));
        }
        if self.settings.store_wait.is_zero() {
            return Err(invalid("the store wait must not be zero"));
        }
        if self.settings.origins.iter().any(String::is_empty) {
            return Err(invalid("an origin must be an absolute URL with a host"));
        }
        if self.settings.any_origin && !self.settings.origins.is_empty() {
            return Err(invalid(
                "`any_origin` and `origin` contradict each other: call one of them",
            ));
        }
        let shared = self.outbox.as_ref().is_some_and(Outbox::is_shared);
        if shared && self.settings.origins.is_empty() && !self.settings.any_origin {
            return Err(invalid(
                "a dispatcher on a shared outbox must be told where its requests may go: call \
                 `origin` once for each origin, or `any_origin`",
            ));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| invalid("a dispatcher must be built inside a tokio runtime"))?;
        // The replay classifies its single attempts with the layer's own
        // classifier, and honours its `Retry-After` rule.
        let policy = self.layer.policy().clone();
        let mut settings = self.settings;
        settings.recovery = policy.recovery().cloned();
        let layer = self.layer;
        let counted: fn(Request<Full<Bytes>>) -> Request<Full<Bytes>> = count_attempt;
        let retrying = layer.layer(MapRequest::new(self.service.clone(), counted));
        if let Some(outbox) = &self.outbox {
            outbox.hold_for(self.lease, replay.interval);
        }
        let wake = match &self.outbox {
            Some(outbox) => outbox.requeued(),
            None => Arc::new(Notify::new()),
        };
        let replays = self.outbox.is_some();
        let handles = Arc::new(Handles(wake.clone()));
        let shared = Arc::new(Shared {
            outbox: self.outbox,
            attempt: self.service,
            retrying,
            policy,
            settings,
            unremoved: Mutex::new(Default::default()),
            wake: wake.clone(),
        });
        // Without a store there is nothing to replay.
        if replays {
            runtime.spawn(supervise(
                Arc::downgrade(&shared),
                Arc::downgrade(&handles),
                wake,
            ));
        }
        Ok(Dispatcher::new(shared, handles))
    }
}
