//! The [`Dispatcher`] and its [`Replay`] settings, and what one attempt of a
//! stored request does: send it, read how it went (classified once), record
//! that in the store, and say what comes next.

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Full;
use tokio::sync::Notify;
use tower::{retry::Retry, util::MapRequest, BoxError, Service, ServiceExt};

use super::{
    delivery::{Delivery, Dispatch, DurabilityWatch},
    store::{LaneEvent, LaneState},
    Entry, Outbox,
};
use crate::{
    classify::{Classify, DefaultClassifier, Outcome},
    origin::{has_user_info, is_origin, origin_key},
    policy::{OutcomeSlot, TerminalRetryPolicy},
    response::{body_start, clean, read_start, redirect_note},
    sync::lock,
    Recovery,
};

/// How long reading a refusal's body may take.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the request to send in place of one the server refused for good:
/// given the stored entry, the status and a description of the refusal.
/// `None` quarantines the entry instead.
pub(super) type Fallback = dyn Fn(&Entry, StatusCode, &str) -> Option<Request<Bytes>> + Send + Sync;

/// The service a foreground delivery goes through: the terminal retry layer
/// over the inner service, each attempt counted.
type Retrying<S, C> =
    Retry<TerminalRetryPolicy<C>, MapRequest<S, fn(Request<Full<Bytes>>) -> Request<Full<Bytes>>>>;

/// What a [`Dispatcher`] sends each attempt through: a cloneable service of
/// HTTP requests whose errors can be described. Names the bounds of
/// [`DispatcherBuilder::build`](super::DispatcherBuilder::build) once for
/// the code behind it.
pub(super) trait AttemptService:
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

/// A classifier of what `S` answers, shareable with the replay.
pub(super) trait AttemptClassifier<S: AttemptService>:
    Classify<Response<S::ResponseBody>, S::Failure> + Send + Sync + 'static
{
}

impl<S: AttemptService, C> AttemptClassifier<S> for C where
    C: Classify<Response<S::ResponseBody>, S::Failure> + Send + Sync + 'static
{
}

/// Delivers idempotent requests durably: each is stored in an [`Outbox`]
/// before its first attempt, sent through a
/// [`TerminalRetryLayer`](crate::TerminalRetryLayer), and replayed from the
/// outbox until the server takes it, across restarts.
///
/// Made by [`Dispatcher::builder`]. `C` is the type of the layer's
/// classifier, which the replay classifies with too (see
/// [`DispatcherBuilder::layer`](super::DispatcherBuilder::layer)). Cloning
/// is cheap; the replay worker stops when the last clone is dropped.
pub struct Dispatcher<S, C = DefaultClassifier> {
    pub(super) shared: Arc<Shared<S, C>>,
    handles: Arc<Handles>,
}

impl<S, C> Clone for Dispatcher<S, C> {
    fn clone(&self) -> Self {
        Dispatcher {
            shared: self.shared.clone(),
            handles: self.handles.clone(),
        }
    }
}

impl<S, C> Dispatcher<S, C> {
    pub(super) fn new(shared: Arc<Shared<S, C>>, handles: Arc<Handles>) -> Self {
        Dispatcher { shared, handles }
    }
}

/// Held by every [`Dispatcher`] handle, and by nothing else: the replay
/// starts no attempt once the last is gone, though attempts under way (which
/// hold the dispatcher's state) end on their own. Dropped, it wakes the
/// replay to stop.
pub(super) struct Handles(pub(super) Arc<Notify>);

impl Drop for Handles {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// How the replay worker sends what is stored, given to
/// [`DispatcherBuilder::replay`](super::DispatcherBuilder::replay) (and to the task client's
/// [`replay`](crate::client::TaskClientBuilder::replay)); a zero in any
/// field is an error of [`build`](super::DispatcherBuilder::build).
///
/// ```
/// use std::time::Duration;
/// use tower_terminal_retry::outbox::Replay;
///
/// let replay = Replay { interval: Duration::from_secs(5), ..Replay::default() };
/// assert_eq!((replay.concurrency, replay.rate), (16, 100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// The longest wait between two probes while the server is down (by
    /// default 30 s); also how often a store that cannot be written is asked
    /// to recover.
    pub interval: Duration,
    /// How many stored requests are replayed at once once the server is
    /// back (by default 16).
    pub concurrency: usize,
    /// The most replays started in any one second, give or take the
    /// concurrency (by default 100). The replay spaces its requests evenly:
    /// a server just back from an outage is cold (empty caches, connection
    /// pools still filling, no extra capacity yet), and its whole backlog at
    /// once can take it down again. Without a rate, 600 stored reports went
    /// out as 561 requests within one second; at 100 a second they take six.
    pub rate: u32,
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            interval: Duration::from_secs(30),
            concurrency: 16,
            rate: 100,
        }
    }
}

/// What a dispatcher is set up with besides its outbox, service and layer:
/// the builder fills it in and hands it over whole, so that the two hold
/// the same fields in one place.
pub(super) struct Settings {
    pub(super) recovery: Option<Recovery>,
    pub(super) fallback: Option<Arc<Fallback>>,
    pub(super) replay: Replay,
    /// The origins requests may go to (`scheme://host:port`); any, if
    /// empty.
    pub(super) origins: Vec<String>,
    /// Said explicitly: requests may go anywhere, on a shared outbox too.
    pub(super) any_origin: bool,
    /// The longest a foreground delivery waits for a write to the store.
    pub(super) store_wait: Duration,
    /// Replaced in every text taken from a response.
    pub(super) secrets: Vec<String>,
    /// Replay slots one destination may hold at once; unless set, half the
    /// replay concurrency.
    pub(super) per_destination: Option<usize>,
    /// A destination down this long without a success has its records
    /// quarantined; never, unless set.
    pub(super) give_up_after: Option<Duration>,
}

impl Settings {
    /// Adds the settings to the `Debug` of the builder or the dispatcher;
    /// the secrets themselves stay out.
    pub(super) fn debug_fields<'a, 'b, 'c>(
        &self,
        f: &'a mut fmt::DebugStruct<'b, 'c>,
    ) -> &'a mut fmt::DebugStruct<'b, 'c> {
        f.field("recovery", &self.recovery)
            .field("fallback", &self.fallback.is_some())
            .field("replay", &self.replay)
            .field("origins", &self.origins)
            .field("any_origin", &self.any_origin)
            .field("store_wait", &self.store_wait)
            .field("redacted", &self.secrets.len())
            .field("per_destination_concurrency", &self.per_destination())
            .field("give_up_after", &self.give_up_after)
    }

    /// Replay slots one destination may hold at once: as set, at most the
    /// replay concurrency; unless set, half of it (at least one), so that a
    /// slow destination always leaves slots to the others.
    pub(super) fn per_destination(&self) -> usize {
        let total = self.replay.concurrency.max(1);
        self.per_destination.unwrap_or(total / 2).clamp(1, total)
    }
}

/// What the dispatcher's handles, deliveries and replay worker share.
pub(super) struct Shared<S, C> {
    /// Where requests are stored; none for a dispatcher that keeps them in
    /// memory only.
    pub(super) outbox: Option<Outbox>,
    /// One attempt: the replay's.
    pub(super) attempt: S,
    /// The foreground's attempts, retried.
    pub(super) retrying: Retrying<S, C>,
    /// The layer's policy: its classifier sorts the replay's single
    /// attempts, its `Retry-After` rule says how long a server may ask to be
    /// left alone.
    pub(super) policy: TerminalRetryPolicy<C>,
    pub(super) settings: Settings,
    /// Delivered records whose removal could not be committed: the replay
    /// skips them, and their removal is tried again once the store can be
    /// written.
    pub(super) unremoved: Mutex<HashSet<u64>>,
    /// Wakes the replay worker: a record was queued or released, or the
    /// dispatcher is gone.
    pub(super) wake: Arc<Notify>,
}

impl<S, C> Drop for Shared<S, C> {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl<S, C> Dispatcher<S, C> {
    /// The outbox it stores requests in; `None` for one made by
    /// [`Dispatcher::in_memory`].
    pub fn outbox(&self) -> Option<&Outbox> {
        self.shared.outbox.as_ref()
    }

    /// Stores `request` under `key`, then delivers it on a task of its own
    /// (see [`Dispatch`]). A request still stored under `key` stands: this
    /// one is then neither stored nor sent ([`Delivery::AlreadyStored`]).
    ///
    /// A [`Tag`](super::Tag) in the request's extensions is stored with it.
    ///
    /// A request whose URI holds credentials (`http://user:password@host/`)
    /// is refused: neither stored nor sent, it ends
    /// [`Undelivered`](Delivery::Undelivered) (not transient) and
    /// [`stored`](Dispatch::stored) says
    /// [`Durability::Refused`](super::Durability::Refused). Put credentials
    /// in a header the sending service adds: they are never stored. A
    /// request to another origin than the one set by
    /// [`DispatcherBuilder::origin`](super::DispatcherBuilder::origin), or
    /// with an invalid tag, is refused the same way.
    pub fn send<RB, E>(&self, key: impl Into<String>, request: Request<Bytes>) -> Dispatch
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
        let (durable, durability) = DurabilityWatch::new();
        let shared = self.shared.clone();
        let key = key.into();
        let on_stored = move |durability| {
            let _ = durable.send(durability);
        };
        let delivery = tokio::spawn(async move { shared.deliver(key, request, on_stored).await });
        Dispatch::new(durability, delivery)
    }
}

impl<S, C> fmt::Debug for Dispatcher<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        shared
            .settings
            .debug_fields(f.debug_struct("Dispatcher").field("outbox", &shared.outbox))
            .field(
                "in_flight",
                &shared.outbox.as_ref().map_or(0, Outbox::claimed),
            )
            .finish()
    }
}

/// What comes after an attempt (or a foreground call's attempts).
pub(super) enum Step {
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
pub(super) struct Sent {
    pub(super) outcome: Outcome,
    status: Option<StatusCode>,
    /// How long the server asked to be left alone (`Retry-After`), capped.
    pause: Option<Duration>,
    /// What went wrong, cleaned: empty for a success.
    failure: String,
}

impl<S, C> Shared<S, C> {
    /// The store, for what runs only with one: the replay, and the steps of
    /// a stored request (one with a sequence number).
    pub(super) fn store(&self) -> &Outbox {
        self.outbox
            .as_ref()
            .expect("only a dispatcher with a store has stored requests and a replay")
    }

    /// Why a request to `uri` must not be sent, if it must not: credentials
    /// in the URI, or another origin than the dispatcher's. Names the host,
    /// never the credentials.
    pub(super) fn refusal(&self, uri: &Uri) -> Option<String> {
        let credentials = has_user_info(uri);
        if !credentials && self.allows(uri) {
            return None;
        }
        let target = clean(&origin_key(uri), &[]);
        let target = match target.is_empty() {
            true => "a URI without a host",
            false => target.as_str(),
        };
        if credentials {
            return Some(format!(
                "not sent: the URI to {target} holds credentials (user information before the \
                 host); put them in a header the sending service adds"
            ));
        }
        Some(format!(
            "not sent: it goes to {target}, not to an origin of the dispatcher's ({})",
            self.settings.origins.join(", ")
        ))
    }

    /// Whether `uri` goes to an origin of the allow-list (any, without one).
    pub(super) fn allows(&self, uri: &Uri) -> bool {
        let origins = &self.settings.origins;
        origins.is_empty() || origins.iter().any(|origin| is_origin(uri, origin))
    }

    /// Records in the store how an attempt to `uri`'s destination went
    /// (`probe`: it was its probe); the destination's state after it. A
    /// failure to record it is logged: the replay reads the state again.
    pub(super) async fn note_lane(&self, uri: &Uri, sent: &Sent, probe: bool) -> Option<LaneState> {
        let event = match sent.outcome {
            Outcome::Transient => LaneEvent::Failed {
                failure: sent.failure.clone(),
                pause: sent.pause,
                probe,
            },
            Outcome::Success | Outcome::Permanent => LaneEvent::Answered { pause: sent.pause },
        };
        let origin = origin_key(uri);
        match self.within_wait(self.store().note(&origin, event)).await {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(origin, error = %error, "outbox could not record how a destination answered");
                None
            }
        }
    }

    /// Removes a record the server is done with. If that cannot be
    /// committed, the record is remembered instead: the replay skips it (a
    /// store that cannot be written would otherwise have it sent again and
    /// again), and its removal is tried again once the store can be written.
    pub(super) async fn remove(&self, key: &str, seq: u64) {
        if let Err(error) = self.store().complete(seq).await {
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
    pub(super) async fn remove_again(&self) {
        let unremoved: Vec<u64> = lock(&self.unremoved).iter().copied().collect();
        for seq in unremoved {
            if self.store().complete(seq).await.is_err() {
                return;
            }
            lock(&self.unremoved).remove(&seq);
        }
    }

    /// `write` to the store, or an error once the store wait has passed: a
    /// store that stops answering does not hold a delivery up. A write that
    /// lands later only has its request replayed, a no-op for the server.
    pub(super) async fn within_wait<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, super::OutboxError>>,
    ) -> Result<T, super::OutboxError> {
        let wait = self.settings.store_wait;
        tokio::time::timeout(wait, write)
            .await
            .unwrap_or_else(|_| Err(super::OutboxError::unanswered(self.store().path(), wait)))
    }

    /// Logs a store write that failed; the delivery goes on: what is on
    /// disk is replayed, the server takes replays as no-ops.
    pub(super) fn recorded<T>(key: &str, written: Result<T, super::OutboxError>) {
        if let Err(error) = written {
            tracing::error!(key, error = %error, "outbox could not record a delivery step");
        }
    }
}

impl<S, C> Shared<S, C>
where
    S: AttemptService,
    C: AttemptClassifier<S>,
{
    /// Sends `request` through `service` and reads how it went. The retry
    /// layer classifies each of its attempts into the request's
    /// [`OutcomeSlot`]; a single attempt without it is classified here,
    /// once, by the same classifier. Whatever is taken from the response is
    /// cleaned, the secrets redacted.
    pub(super) async fn send_through<T>(&self, service: T, request: Request<Bytes>) -> Sent
    where
        T: Service<Request<Full<Bytes>>, Response = Response<S::ResponseBody>, Error = S::Failure>,
    {
        let secrets: Vec<&str> = self.settings.secrets.iter().map(String::as_str).collect();
        let method = request.method().clone();
        // A stored path is untrusted too.
        let path = clean(request.uri().path(), &secrets);
        let slot = OutcomeSlot::default();
        let mut request = request.map(Full::new);
        request.extensions_mut().insert(slot.clone());
        let result = service.oneshot(request).await;
        let outcome = slot
            .get()
            .unwrap_or_else(|| self.policy.classifier().classify(&result));
        match result {
            Ok(response) => {
                let status = response.status();
                let pause =
                    self.policy
                        .retry_after()
                        .delay(status, response.headers(), SystemTime::now());
                let mut failure = String::new();
                if outcome == Outcome::Success {
                    // Read (bounded, never shown), so that the connection
                    // goes back to the pool and a body that holds a turn
                    // under a concurrency limit gives it back.
                    read_start(response.into_body(), BODY_TIMEOUT).await;
                } else {
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
}

impl<S, C> Shared<S, C> {
    /// Records how `entry` (stored as `seq`, if it is) went, and says what
    /// comes next.
    pub(super) async fn settle(
        &self,
        entry: &Entry,
        seq: Option<u64>,
        sent: Sent,
        attempts: u32,
        fell_back: bool,
    ) -> Step {
        let key = entry.key.as_str();
        match sent.outcome {
            Outcome::Success => {
                if seq.is_some() && entry.attempts > 0 {
                    tracing::info!(
                        key,
                        attempts = entry.attempts.saturating_add(attempts),
                        pending = self.store().pending_count(),
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
                    let written = self
                        .within_wait(self.store().record_failure(seq, attempts, failure))
                        .await;
                    Self::recorded(key, written);
                    Step::Queued
                }
                None => Step::Done(Delivery::undelivered(fell_back, true, sent.failure)),
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
                if let Some(step) = self
                    .fall_back(entry, seq, status, &sent.failure, fell_back)
                    .await
                {
                    return step;
                }
                match seq {
                    Some(seq) => {
                        tracing::error!(
                            key,
                            failure = sent.failure,
                            "request refused for good with nothing to fall back to: quarantined \
                             in the outbox, not retried"
                        );
                        let written = self
                            .within_wait(self.store().quarantine(seq, sent.failure))
                            .await;
                        Self::recorded(key, written);
                        Step::Done(Delivery::Quarantined)
                    }
                    None => Step::Done(Delivery::undelivered(fell_back, false, sent.failure)),
                }
            }
        }
    }

    /// The fallback of `entry`, refused for good with `status` and
    /// `failure`, stored in its place (if it is stored) before it is sent;
    /// `None` if there is none to send (none asked for, one already sent,
    /// or one refused: another origin, an invalid tag).
    async fn fall_back(
        &self,
        entry: &Entry,
        seq: Option<u64>,
        status: StatusCode,
        failure: &str,
        fell_back: bool,
    ) -> Option<Step> {
        let key = entry.key.as_str();
        let fallback = match (&self.settings.fallback, fell_back) {
            (Some(fallback), false) => fallback(entry, status, failure)?,
            _ => return None,
        };
        let refused = self
            .refusal(fallback.uri())
            .map(Err)
            .unwrap_or_else(|| super::Tag::of(&fallback));
        let tag = match refused {
            Ok(tag) => tag,
            Err(refusal) => {
                tracing::error!(key, refusal, "fallback refused: not stored, not sent");
                return None;
            }
        };
        let next = entry.replaced_by(&fallback, tag);
        if let Some(seq) = seq {
            // The fallback is stored before it is sent, in the commit that
            // retires the refused request.
            let written = self
                .within_wait(self.store().replace(seq, next.clone()))
                .await;
            Self::recorded(key, written);
        }
        let request = next.keyed(fallback);
        Some(Step::FallBack(Box::new((request, next))))
    }
}

#[cfg(all(test, feature = "test-server"))]
mod tests {
    use std::{
        path::PathBuf,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    use super::*;
    use crate::{
        outbox::{Durability, Tag},
        test_server::{Reply, TestServer},
        Schedule, TerminalRetryLayer,
    };

    /// A directory of its own for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!(
                "terminal-retry-dispatcher-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            Scratch(path)
        }

        fn outbox(&self) -> Outbox {
            Outbox::open(self.0.join("requests.redb")).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn tagged(url: String, tag: &str) -> Request<Bytes> {
        let mut request = Request::post(url).body(Bytes::new()).unwrap();
        request.extensions_mut().insert(Tag::new(tag));
        request
    }

    #[tokio::test]
    async fn a_tag_is_stored_and_kept_by_a_fallback_unless_it_brings_its_own() {
        let scratch = Scratch::new("tag");
        // By path, so that a replay meanwhile gets the same answers.
        let server = TestServer::start(|request| match request.uri.path() {
            "/hooks/complete" => Reply::status(422),
            _ => Reply::status(502),
        })
        .await
        .unwrap();
        let once = TerminalRetryLayer::new(
            TerminalRetryPolicy::default().with_schedule(Schedule::new([]).unwrap()),
        );
        let fail_url = server.url("/hooks/fail");
        let dispatcher = Dispatcher::builder(scratch.outbox(), client())
            .layer(once)
            .replay(Replay {
                interval: Duration::from_secs(3600),
                ..Replay::default()
            })
            .fallback(move |entry, _, _| {
                let request = Request::post(fail_url.as_str()).body(Bytes::new()).unwrap();
                match entry.key.as_str() {
                    "own" => Some(tagged(fail_url.clone(), "fail")),
                    _ => Some(request),
                }
            })
            .build()
            .unwrap();

        let kept = dispatcher.send("kept", tagged(server.url("/hooks/complete"), "complete"));
        assert_eq!(kept.await, Delivery::Queued);
        let own = dispatcher.send("own", tagged(server.url("/hooks/complete"), "complete"));
        assert_eq!(own.await, Delivery::Queued);
        let pending = dispatcher.outbox().unwrap().pending().unwrap();
        let tags: Vec<(&str, Option<&str>)> = pending
            .iter()
            .map(|entry| (entry.key.as_str(), entry.tag.as_deref()))
            .collect();
        assert_eq!(tags, [("kept", Some("complete")), ("own", Some("fail"))]);
        assert!(pending
            .iter()
            .all(|entry| entry.uri.path() == "/hooks/fail"));
    }

    #[tokio::test]
    async fn a_tag_too_long_or_with_control_characters_is_refused_neither_stored_nor_sent() {
        let scratch = Scratch::new("bad-tag");
        let server = TestServer::scripted([]).await.unwrap();
        let dispatcher = Dispatcher::builder(scratch.outbox(), client())
            .build()
            .unwrap();
        for tag in ["x".repeat(65), "line\nbreak".to_owned()] {
            let mut dispatch = dispatcher.send("r1", tagged(server.url("/hooks/r1"), &tag));
            assert_eq!(dispatch.stored().await, Durability::Refused);
            match dispatch.await {
                Delivery::Undelivered {
                    transient: false,
                    failure,
                } => assert!(failure.contains("tag"), "{failure}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(server.requests().is_empty());
        assert!(dispatcher.outbox().unwrap().pending().unwrap().is_empty());
    }

    /// Answers classified by [`ConflictIsSuccess`].
    static CLASSIFIED: AtomicUsize = AtomicUsize::new(0);

    /// A server's rule: its `409 Conflict` says "already taken", a success.
    #[derive(Debug, Clone, Copy, Default)]
    struct ConflictIsSuccess;

    impl<B, E: 'static> Classify<Response<B>, E> for ConflictIsSuccess {
        fn classify(&self, result: &Result<Response<B>, E>) -> Outcome {
            CLASSIFIED.fetch_add(1, Ordering::SeqCst);
            match result {
                Ok(response) if response.status() == StatusCode::CONFLICT => Outcome::Success,
                other => DefaultClassifier.classify(other),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_layers_classifier_sorts_every_answer_once_in_the_foreground_and_the_replay() {
        let scratch = Scratch::new("classifier");
        let server =
            TestServer::scripted([Reply::status(409), Reply::status(502), Reply::status(409)])
                .await
                .unwrap();
        let once = Schedule::new([]).unwrap();
        let layer = TerminalRetryLayer::new(
            TerminalRetryPolicy::default()
                .with_schedule(once)
                .with_classifier(ConflictIsSuccess),
        );
        let dispatcher = Dispatcher::builder(scratch.outbox(), client())
            .layer(layer)
            .build()
            .unwrap();
        let post = |path: &str| Request::post(server.url(path)).body(Bytes::new()).unwrap();

        // The layer's 409 is a success: delivered, classified once.
        assert_eq!(
            dispatcher.send("r1", post("/r/1")).await,
            Delivery::Delivered
        );
        assert_eq!(CLASSIFIED.load(Ordering::SeqCst), 1);
        // A 502: queued. The replay's 409 is a success too: removed.
        assert_eq!(dispatcher.send("r2", post("/r/2")).await, Delivery::Queued);
        for _ in 0..60 {
            if dispatcher.outbox().unwrap().pending().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(dispatcher.outbox().unwrap().pending().unwrap().is_empty());
        assert!(dispatcher
            .outbox()
            .unwrap()
            .quarantined()
            .unwrap()
            .is_empty());
        assert_eq!(server.requests().len(), 3);
        assert_eq!(CLASSIFIED.load(Ordering::SeqCst), 3, "each answer once");
    }
}
