//! The policy's backoff future: the wait before a retry, as
//! [`TerminalRetryPolicy`](crate::TerminalRetryPolicy) returns it to tower's
//! `Retry` (tower keeps its futures apart from its policies too).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::time::{Instant, Sleep};

#[cfg(doc)]
use crate::recovery::Recovery;
use crate::recovery::{Parked, Woken};

/// The wait before a retry, as
/// [`TerminalRetryPolicy`](crate::TerminalRetryPolicy) returns it: the
/// schedule's delay (jittered if asked), or the server's `Retry-After`.
/// With a [`Recovery`], a schedule delay ends early once the server
/// answers again.
pub struct Backoff {
    // Boxed: the timer is made only for a retry, and a call that succeeds
    // at once then carries one pointer in its future, not a timer.
    wait: Option<Pin<Box<Wait>>>,
    // The attempt that failed, for the release event.
    attempt: u32,
}

pin_project_lite::pin_project! {
    #[project = WaitProjection]
    enum Wait {
        Sleep { #[pin] sleep: Sleep },
        Parked { #[pin] parked: Parked },
    }
}

impl Backoff {
    /// A wait until `deadline`, after the failed `attempt`.
    pub(crate) fn sleep(deadline: Instant, attempt: u32) -> Backoff {
        Backoff {
            wait: Some(Box::pin(Wait::Sleep {
                sleep: tokio::time::sleep_until(deadline),
            })),
            attempt,
        }
    }

    /// A wait that a [`Recovery`] may end early, after the failed `attempt`.
    pub(crate) fn parked(parked: Parked, attempt: u32) -> Backoff {
        Backoff {
            wait: Some(Box::pin(Wait::Parked { parked })),
            attempt,
        }
    }

    /// When the wait ends, unless a [`Recovery`] releases it earlier.
    fn deadline(&self) -> Option<Instant> {
        match self.wait.as_deref()? {
            Wait::Sleep { sleep } => Some(sleep.deadline()),
            Wait::Parked { parked } => Some(parked.deadline()),
        }
    }
}

impl Drop for Backoff {
    // The timer is dropped out of line: the drop of every call's future
    // then holds a test, not a timer's teardown.
    #[inline]
    fn drop(&mut self) {
        if let Some(wait) = self.wait.take() {
            drop_wait(wait);
        }
    }
}

#[inline(never)]
fn drop_wait(wait: Pin<Box<Wait>>) {
    drop(wait);
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("deadline", &self.deadline())
            .field(
                "releasable",
                &matches!(self.wait.as_deref(), Some(Wait::Parked { .. })),
            )
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Future for Backoff {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(wait) = this.wait.as_mut() else {
            return Poll::Ready(());
        };
        match wait.as_mut().project() {
            WaitProjection::Sleep { sleep } => sleep.poll(cx),
            WaitProjection::Parked { parked } => {
                let deadline = parked.deadline();
                if ready!(parked.poll(cx)) == Woken::Released {
                    tracing::debug!(
                        attempt = this.attempt,
                        early_ms = deadline
                            .saturating_duration_since(Instant::now())
                            .as_millis() as u64,
                        "retry released early: a request to the same server succeeded"
                    );
                }
                Poll::Ready(())
            }
        }
    }
}
