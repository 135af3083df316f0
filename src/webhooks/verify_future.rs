//! The response future of [`Verify`](super::Verify): the body read up to the
//! limit and checked, then the inner service called; or the refusal.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{request::Parts, Request, Response};
use http_body::Body;
use http_body_util::{combinators::Collect, Full, Limited};
use tower::{BoxError, Service};

use super::check::{Claim, Refusal, Verifier};

pin_project_lite::pin_project! {
    /// The response future of [`Verify`](super::Verify).
    pub struct VerifyFuture<S, B>
    where
        S: Service<Request<Full<Bytes>>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProjection]
    enum State<S, B>
    where
        S: Service<Request<Full<Bytes>>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        /// The headers checked, the body being read.
        Reading {
            #[pin]
            body: Collect<Limited<B>>,
            // Taken once the body is read.
            read: Option<Read<S>>,
        },
        /// Verified: the inner service's answer.
        Calling {
            #[pin]
            future: S::Future,
        },
        /// Refused: taken when polled.
        Answered {
            response: Option<S::Response>,
        },
    }
}

/// What the inner call needs once the body is read.
struct Read<S> {
    parts: Parts,
    claim: Claim,
    verifier: Arc<Verifier>,
    /// The clone of the inner service made ready for this request.
    inner: S,
}

impl<S, B> VerifyFuture<S, B>
where
    S: Service<Request<Full<Bytes>>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    /// Reads the body, then checks it and calls `inner`.
    pub(super) fn reading(
        body: Collect<Limited<B>>,
        parts: Parts,
        claim: Claim,
        verifier: Arc<Verifier>,
        inner: S,
    ) -> Self {
        let read = Read {
            parts,
            claim,
            verifier,
            inner,
        };
        let state = State::Reading {
            body,
            read: Some(read),
        };
        VerifyFuture { state }
    }

    /// Answers `response` without calling the inner service.
    pub(super) fn answered(response: S::Response) -> Self {
        let state = State::Answered {
            response: Some(response),
        };
        VerifyFuture { state }
    }
}

impl<S, B> fmt::Debug for VerifyFuture<S, B>
where
    S: Service<Request<Full<Bytes>>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Reading { .. } => "reading",
            State::Calling { .. } => "calling",
            State::Answered { .. } => "answered",
        };
        f.debug_struct("VerifyFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, ResBody> Future for VerifyFuture<S, B>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProjection::Reading { body, read } => {
                    let collected = ready!(body.poll(cx));
                    let read = read.take().expect("the body is read once");
                    match collected {
                        Ok(collected) => read.check(collected.to_bytes()),
                        Err(error) => State::Answered {
                            response: Some(Refusal::unread(&error).response()),
                        },
                    }
                }
                StateProjection::Calling { future } => return future.poll(cx),
                StateProjection::Answered { response } => {
                    let response = response.take().expect("polled after it answered");
                    return Poll::Ready(Ok(response));
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

impl<S> Read<S> {
    /// Checks the signatures against `body`: the inner call if one matches,
    /// the refusal otherwise.
    fn check<B, ResBody>(self, body: Bytes) -> State<S, B>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
        B: Body,
        B::Error: Into<BoxError>,
        ResBody: Default,
    {
        let Read {
            parts,
            claim,
            verifier,
            mut inner,
        } = self;
        match verifier.check(claim, &body) {
            Ok(id) => {
                let mut request = Request::from_parts(parts, Full::new(body));
                request.extensions_mut().insert(id);
                State::Calling {
                    future: inner.call(request),
                }
            }
            Err(refusal) => State::Answered {
                response: Some(refusal.response()),
            },
        }
    }
}
