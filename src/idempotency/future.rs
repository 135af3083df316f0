//! A request's way through the layer: the store's answer, the handler, its
//! response read and kept (or the key freed), and the guards that finish
//! the store's work, or free the key, for a request dropped on the way.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::{CONTENT_TYPE, RETRY_AFTER},
    response::Parts,
    HeaderName, HeaderValue, Request, Response, StatusCode,
};
use http_body::Body;
use http_body_util::{combinators::Collect, BodyExt, Full};
use pin_project_lite::pin_project;
use tower::Service;

use super::{
    store::MAX_KEPT_HEADER_BYTES, Begin, Claim, Fingerprint, KeptResponse, Store, StoreError,
    StoreFuture,
};
use crate::{classify_status, Outcome};

/// The header that marks a replayed response: `idempotent-replayed: true`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The requests the layer serves: what a body-buffering layer in front
/// (such as the signature check of the `webhooks` feature) hands on.
pub(crate) type Req = Request<Full<Bytes>>;

/// What the layer's services, and each request's way, share.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) retention: Duration,
    pub(crate) max_body: usize,
    pub(crate) require_key: bool,
}

/// What the layer's `409` and `503` ask the client to wait, in seconds.
const RETRY_AFTER_SECS: HeaderValue = HeaderValue::from_static("1");

const POLLED_AFTER_COMPLETION: &str = "ResponseFuture polled after completion";

pin_project! {
    /// The future of [`Idempotency`](super::Idempotency)'s responses.
    pub struct ResponseFuture<S: Service<Req>, B: Body> {
        #[pin]
        state: State<S, B>,
        settings: Arc<Settings>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, B: Body> {
        /// The layer's own answer, or a replay.
        Answered { response: Option<Response<B>> },
        /// Waiting for the store to claim the key, or say what holds it.
        Beginning {
            begin: Beginning,
            fingerprint: Fingerprint,
            call: Option<(S, Req)>,
        },
        /// The handler runs; `guard` is `None` for a request without a key.
        Running {
            #[pin]
            future: S::Future,
            guard: Option<ClaimGuard>,
        },
        /// A final response's body, read to be kept.
        Reading {
            #[pin]
            collect: Collect<B>,
            parts: Option<Parts>,
            guard: Option<ClaimGuard>,
        },
        /// The store keeps the response, or frees the key (the guard holds
        /// that work); then `outcome` goes to the client.
        Settling {
            outcome: Option<Result<Response<B>, S::Error>>,
            guard: Option<ClaimGuard>,
        },
    }
}

impl<S: Service<Req>, B: Body> ResponseFuture<S, B> {
    pub(crate) fn answered(response: Response<B>, settings: Arc<Settings>) -> Self {
        ResponseFuture {
            state: State::Answered {
                response: Some(response),
            },
            settings,
        }
    }

    pub(crate) fn passed(future: S::Future, settings: Arc<Settings>) -> Self {
        ResponseFuture {
            state: State::Running {
                future,
                guard: None,
            },
            settings,
        }
    }

    pub(crate) fn begun(
        begin: StoreFuture<Begin>,
        fingerprint: Fingerprint,
        inner: S,
        request: Req,
        settings: Arc<Settings>,
    ) -> Self {
        let begin = Beginning {
            begin: Some(begin),
            store: settings.store.clone(),
        };
        ResponseFuture {
            state: State::Beginning {
                begin,
                fingerprint,
                call: Some((inner, request)),
            },
            settings,
        }
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Req, Response = Response<B>>,
    B: Body + From<Bytes>,
{
    type Output = Result<Response<B>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Answered { response } => {
                    return Poll::Ready(Ok(response.take().expect(POLLED_AFTER_COMPLETION)))
                }
                StateProj::Beginning {
                    begin,
                    fingerprint,
                    call,
                } => match ready!(begin.poll(cx)) {
                    Ok(Begin::Claimed(claim)) => {
                        let guard = ClaimGuard {
                            store: this.settings.store.clone(),
                            claim: Some(claim),
                            settle: None,
                        };
                        let (mut inner, request) = call.take().expect(POLLED_AFTER_COMPLETION);
                        State::Running {
                            future: inner.call(request),
                            guard: Some(guard),
                        }
                    }
                    Ok(Begin::Running {
                        fingerprint: theirs,
                    }) => State::answered(running(theirs, *fingerprint)),
                    Ok(Begin::Finished {
                        fingerprint: theirs,
                        response,
                    }) => State::answered(finished(theirs, *fingerprint, response)),
                    Err(error) => State::answered(store_failed(&error)),
                },
                StateProj::Running { future, guard } => {
                    let result = ready!(future.poll(cx));
                    match guard.take() {
                        Some(guard) => handled(this.settings, result, guard),
                        None => return Poll::Ready(result),
                    }
                }
                StateProj::Reading {
                    collect,
                    parts,
                    guard,
                } => {
                    let collected = ready!(collect.poll(cx));
                    let parts = parts.take().expect(POLLED_AFTER_COMPLETION);
                    let guard = guard.take().expect(POLLED_AFTER_COMPLETION);
                    match collected {
                        Ok(collected) => read(this.settings, parts, collected.to_bytes(), guard),
                        Err(_) => {
                            tracing::warn!(
                                status = parts.status.as_u16(),
                                "the handler's response body failed: nothing kept, key freed"
                            );
                            let reason = "the response body failed before its end";
                            let response = refusal(StatusCode::INTERNAL_SERVER_ERROR, reason);
                            State::settling(Settle::Release, Ok(response), guard)
                        }
                    }
                }
                StateProj::Settling { outcome, guard } => {
                    let settling = guard.as_mut().expect(POLLED_AFTER_COMPLETION);
                    let settled = ready!(settling.poll_settle(cx));
                    let guard = guard.take().expect(POLLED_AFTER_COMPLETION);
                    match settled {
                        Ok(()) => guard.disarm(),
                        // Dropped armed: it asks the store once more to free
                        // the key (a no-op for a key kept meanwhile).
                        Err(error) => tracing::warn!(
                            error = %error,
                            "the idempotency store could not settle a request"
                        ),
                    }
                    return Poll::Ready(outcome.take().expect(POLLED_AFTER_COMPLETION));
                }
            };
            this.state.set(next);
        }
    }
}

impl<S: Service<Req>, B: Body> State<S, B> {
    fn answered(response: Response<B>) -> Self {
        State::Answered {
            response: Some(response),
        }
    }

    fn settling(
        settle: Settle,
        outcome: Result<Response<B>, S::Error>,
        mut guard: ClaimGuard,
    ) -> Self {
        guard.start(settle);
        State::Settling {
            outcome: Some(outcome),
            guard: Some(guard),
        }
    }
}

/// What follows the handler's answer: a transient failure frees the key; a
/// final response is read to be kept if its length is known and within the
/// limit, else marked as not kept and passed on untouched.
fn handled<S, B>(
    settings: &Settings,
    result: Result<Response<B>, S::Error>,
    guard: ClaimGuard,
) -> State<S, B>
where
    S: Service<Req, Response = Response<B>>,
    B: Body,
{
    let response = match result {
        Ok(response) if classify_status(response.status()) != Outcome::Transient => response,
        // An error, 5xx, 408 or 429: the sender's retry must run it again.
        transient => return State::settling(Settle::Release, transient, guard),
    };
    let limit = u64::try_from(settings.max_body).unwrap_or(u64::MAX);
    let fits = response
        .body()
        .size_hint()
        .upper()
        .is_some_and(|upper| upper <= limit);
    if !fits {
        let not_kept = Settle::Finish(None, settings.retention);
        return State::settling(not_kept, Ok(response), guard);
    }
    let (parts, body) = response.into_parts();
    State::Reading {
        collect: body.collect(),
        parts: Some(parts),
        guard: Some(guard),
    }
}

/// A final response read whole: kept, unless its body or headers are over
/// the limits, and passed on with the same bytes.
fn read<S, B>(settings: &Settings, parts: Parts, body: Bytes, guard: ClaimGuard) -> State<S, B>
where
    S: Service<Req, Response = Response<B>>,
    B: Body + From<Bytes>,
{
    let kept = KeptResponse::new(parts.status, &parts.headers, body.clone());
    let within = body.len() <= settings.max_body && kept.header_bytes() <= MAX_KEPT_HEADER_BYTES;
    let finish = Settle::Finish(within.then_some(kept), settings.retention);
    let response = Response::from_parts(parts, B::from(body));
    State::settling(finish, Ok(response), guard)
}

/// The answer to a repeat of a request still running: `409 Conflict` with
/// `Retry-After`, or `422` if it is not the same request.
fn running<B: From<Bytes>>(theirs: Fingerprint, ours: Fingerprint) -> Response<B> {
    if theirs != ours {
        return mismatch();
    }
    let reason = "a request with this idempotency key is still running; retry later";
    let mut response = refusal(StatusCode::CONFLICT, reason);
    response.headers_mut().insert(RETRY_AFTER, RETRY_AFTER_SECS);
    response
}

/// The answer to a repeat of a finished request: its kept response, marked
/// as a replay; `409 Conflict` if it was not kept; `422` if it is not the
/// same request.
fn finished<B: From<Bytes>>(
    theirs: Fingerprint,
    ours: Fingerprint,
    kept: Option<KeptResponse>,
) -> Response<B> {
    if theirs != ours {
        return mismatch();
    }
    let Some(kept) = kept else {
        let reason = "the response to the first request with this idempotency key was too \
                      large to keep, or of unknown length: it is not replayed";
        return refusal(StatusCode::CONFLICT, reason);
    };
    let (status, headers, body) = kept.into_parts();
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// The same key with another request: `422 Unprocessable Content`.
fn mismatch<B: From<Bytes>>() -> Response<B> {
    let reason = "this idempotency key was used with another request (method, path or body)";
    refusal(StatusCode::UNPROCESSABLE_ENTITY, reason)
}

/// The answer when the store cannot answer: the handler is not called.
fn store_failed<B: From<Bytes>>(error: &StoreError) -> Response<B> {
    tracing::warn!(error = %error, "the idempotency store failed: request refused unrun");
    match error {
        StoreError::Damaged { .. } => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the idempotency store holds a damaged record for this key",
        ),
        _ => {
            let mut response = refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the idempotency store is unavailable; retry later",
            );
            response.headers_mut().insert(RETRY_AFTER, RETRY_AFTER_SECS);
            response
        }
    }
}

/// One of the layer's own answers: `status`, and `reason` as plain text.
pub(crate) fn refusal<B: From<Bytes>>(status: StatusCode, reason: &'static str) -> Response<B> {
    let mut response = Response::new(B::from(Bytes::from_static(reason.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The store's answer to a first request, on its way. Dropped before it
/// came (the request went away meanwhile), it is awaited on the current
/// runtime, and a claim it brings is freed at once: a key claimed for a
/// request no one awaits is never left to its lease.
struct Beginning {
    /// `None` once answered.
    begin: Option<StoreFuture<Begin>>,
    store: Arc<dyn Store>,
}

impl Beginning {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Begin, StoreError>> {
        let begin = self.begin.as_mut().expect(POLLED_AFTER_COMPLETION);
        let begun = ready!(Pin::new(begin).poll(cx));
        self.begin = None;
        Poll::Ready(begun)
    }
}

impl Drop for Beginning {
    fn drop(&mut self) {
        let Some(begin) = self.begin.take() else {
            return;
        };
        let store = self.store.clone();
        spawn(async move {
            if let Ok(Begin::Claimed(claim)) = begin.await {
                store.release(&claim).await?;
            }
            Ok(())
        });
    }
}

/// What settles a claim.
enum Settle {
    /// Keep the response (`None`: final, but not kept) for the retention.
    Finish(Option<KeptResponse>, Duration),
    /// Free the key.
    Release,
}

/// A claim held while its request runs, and then the store's work that
/// settles it. Dropped before the request settled (the client went away,
/// the server dropped the future), it frees the key on the current runtime
/// if the handler had not answered, or lets the settling work finish, so
/// that a response the handler made is still kept: no key is held for ever
/// by a request no one awaits.
struct ClaimGuard {
    store: Arc<dyn Store>,
    /// `None` once settled.
    claim: Option<Claim>,
    /// The store's work under way, once the handler answered.
    settle: Option<StoreFuture<()>>,
}

impl ClaimGuard {
    fn start(&mut self, settle: Settle) {
        let claim = self
            .claim
            .as_ref()
            .expect("a guard holds its claim until settled");
        self.settle = Some(match settle {
            Settle::Finish(response, retention) => self.store.finish(claim, response, retention),
            Settle::Release => self.store.release(claim),
        });
    }

    fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StoreError>> {
        let settle = self.settle.as_mut().expect(POLLED_AFTER_COMPLETION);
        let settled = ready!(Pin::new(settle).poll(cx));
        self.settle = None;
        Poll::Ready(settled)
    }

    /// The store settled the claim: nothing left to free.
    fn disarm(mut self) {
        self.claim = None;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else {
            return;
        };
        match self.settle.take() {
            // Asked now: a store that frees at once (the memory store) does
            // it with or without a runtime to run the rest.
            None => spawn(self.store.release(&claim)),
            Some(settle) => {
                let store = self.store.clone();
                spawn(async move {
                    if settle.await.is_err() {
                        store.release(&claim).await?;
                    }
                    Ok(())
                });
            }
        }
    }
}

/// Runs what a dropped request left to the store on the current runtime.
/// Without one, a PostgreSQL claim is freed by its lease.
fn spawn(work: impl Future<Output = Result<(), StoreError>> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(error) = work.await {
                tracing::warn!(
                    error = %error,
                    "the key of a dropped request could not be freed; its lease frees it"
                );
            }
        });
    }
}

impl<S: Service<Req>, B: Body> fmt::Debug for ResponseFuture<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Answered { .. } => "Answered",
            State::Beginning { .. } => "Beginning",
            State::Running { .. } => "Running",
            State::Reading { .. } => "Reading",
            State::Settling { .. } => "Settling",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}
