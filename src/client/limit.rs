//! The client's concurrency limit, over whole exchanges: a request takes a
//! turn before it is sent, and its response body gives it back once read to
//! the end, failed or dropped.
//!
//! tower's `ConcurrencyLimit` gives the turn back when the response headers
//! arrive, while the body is still on the wire: a server that trickles its
//! bodies would then hold as many connections open as there are requests.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tower::Service;

/// At most `limit` exchanges through `inner` at once, across clones: each
/// from the call until its response body ends or is dropped.
#[derive(Debug)]
pub(super) struct ExchangeLimit<S> {
    inner: S,
    semaphore: PollSemaphore,
    /// Taken by `poll_ready`, handed to the call in `call`.
    permit: Option<OwnedSemaphorePermit>,
}

impl<S> ExchangeLimit<S> {
    pub(super) fn new(inner: S, limit: usize) -> ExchangeLimit<S> {
        ExchangeLimit {
            inner,
            semaphore: PollSemaphore::new(Arc::new(Semaphore::new(limit))),
            permit: None,
        }
    }
}

impl<S: Clone> Clone for ExchangeLimit<S> {
    /// The same limit, without the turn this one holds.
    fn clone(&self) -> Self {
        ExchangeLimit {
            inner: self.inner.clone(),
            semaphore: self.semaphore.clone(),
            permit: None,
        }
    }
}

impl<S, R, B> Service<R> for ExchangeLimit<S>
where
    S: Service<R, Response = Response<B>>,
    B: Body,
{
    type Response = Response<PermitBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() {
            // Never `None`: the semaphore is never closed.
            self.permit = ready!(self.semaphore.poll_acquire(cx));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let permit = self
            .permit
            .take()
            .expect("`poll_ready` must be called before `call`");
        ResponseFuture {
            inner: self.inner.call(request),
            permit: Some(permit),
        }
    }
}

pin_project! {
    /// The response of an [`ExchangeLimit`]ed call: its body holds the turn.
    #[derive(Debug)]
    pub(super) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<PermitBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let permit = this.permit.take();
        Poll::Ready(Ok(response.map(|body| PermitBody::new(body, permit))))
    }
}

pin_project! {
    /// A response body holding its exchange's turn under the limit until it
    /// ends, fails or is dropped.
    #[derive(Debug)]
    pub(crate) struct PermitBody<B> {
        #[pin]
        body: B,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<B: Body> PermitBody<B> {
    fn new(body: B, permit: Option<OwnedSemaphorePermit>) -> PermitBody<B> {
        // An empty body is read already.
        let permit = permit.filter(|_| !body.is_end_stream());
        PermitBody { body, permit }
    }
}

impl<B: Body> Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.body.as_mut().poll_frame(cx));
        let ended = match &frame {
            Some(Ok(_)) => this.body.is_end_stream(),
            Some(Err(_)) | None => true,
        };
        if ended {
            *this.permit = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;
    use tokio_test::task::spawn;
    use tower::{service_fn, ServiceExt};

    use super::*;

    /// A body of the chunks the test feeds it, ended when its sender drops.
    struct Fed(mpsc::UnboundedReceiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    #[tokio::test]
    async fn a_turn_is_held_until_the_body_ends_or_is_dropped() {
        let (feeds, mut fed) = mpsc::unbounded_channel();
        let service = service_fn(move |()| {
            let (feed, body) = mpsc::unbounded_channel();
            let _ = feeds.send(feed);
            async move { Ok::<_, Infallible>(Response::new(Fed(body))) }
        });
        let limited = ExchangeLimit::new(service, 1);

        let first = limited.clone().oneshot(()).await.unwrap();
        let feed = fed.recv().await.unwrap();
        let mut second = spawn(limited.clone().oneshot(()));
        assert!(second.poll().is_pending(), "the first body holds the turn");

        let mut body = first.into_body();
        feed.send(Bytes::from_static(b"x")).unwrap();
        assert!(body.frame().await.is_some());
        assert!(
            second.poll().is_pending(),
            "a body part read is not the end"
        );
        drop(feed);
        assert!(body.frame().await.is_none());
        let Poll::Ready(second) = second.poll() else {
            panic!("a body read to its end gives its turn back");
        };

        let mut third = spawn(limited.clone().oneshot(()));
        assert!(third.poll().is_pending(), "the second body holds the turn");
        drop(second);
        assert!(
            third.poll().is_ready(),
            "a body dropped unread gives it back"
        );
    }
}
