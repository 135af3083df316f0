//! The retry policy: a [`tower::retry::Policy`] for idempotent HTTP requests.
//!
//! [`TerminalRetryPolicy`] decides, after each attempt, whether to try again and
//! how long to wait first. It works with tower's own
//! [`RetryLayer`](tower::retry::RetryLayer) as well as through
//! [`TerminalRetryLayer`](crate::TerminalRetryLayer), which is the same thing
//! with a shorter name.
//!
//! After each attempt the policy:
//! 1. classifies the result (see [`Classify`](crate::Classify)); a success or a
//!    permanent rejection ends the call;
//! 2. ends the call when the schedule is exhausted (a `warn` event) or the
//!    retry budget, if any, is spent (also `warn`);
//! 3. otherwise waits the schedule's next delay, jittered if asked, or the
//!    server's `Retry-After` on a 429, 503 or 409, then replays an exact clone of the
//!    request (an `info` event per retry).
//!
//! Each call has its own attempt count: tower clones the policy per call.
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{retry::RetryLayer, service_fn, ServiceBuilder, ServiceExt};
//! use tower_terminal_retry::{Schedule, TerminalRetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // One place for every setting; the policy is tower's `Policy`.
//! let policy = TerminalRetryPolicy::default()
//!     .with_schedule(Schedule::new([Duration::from_secs(1)])?);
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let counted = calls.clone();
//! let service = ServiceBuilder::new()
//!     .layer(RetryLayer::new(policy))
//!     .service(service_fn(move |_request: Request<Full<Bytes>>| {
//!         // 502 first, then 200.
//!         let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!         let status = if n == 0 { StatusCode::BAD_GATEWAY } else { StatusCode::OK };
//!         async move { Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap()) }
//!     }));
//! let response = service.oneshot(Request::post("/x").body(Full::from("{}"))?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```

use std::{
    any::type_name,
    fmt,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::SystemTime,
};

use http::{HeaderName, HeaderValue, Request, Response};
use tokio::time::Instant;
use tower::retry::Policy;

use crate::{
    budget::RetryBudget,
    classify::{Classify, DefaultClassifier, Outcome},
    future::Backoff,
    jitter::Jitter,
    recovery::Recovery,
    retry_after::RetryAfter,
    schedule::Schedule,
};

/// The retry policy of terminal callbacks, a [`tower::retry::Policy`]: each
/// setting is made here, once, and the policy handed to
/// [`TerminalRetryLayer::new`](crate::TerminalRetryLayer::new) (or to
/// tower's own `RetryLayer`); see the [crate docs](crate).
///
/// It is a `Policy<Request<B>, Response<RB>, E>` for every `B: Clone` and
/// every classifier of `Result<Response<RB>, E>`; the error must be `Debug`,
/// so that retry events can say what went wrong.
///
/// `Default` is the agreed plan: the default [`Schedule`] (4, 8, 16, 32, 64 s),
/// the [`DefaultClassifier`], `Retry-After` honoured up to five minutes, no
/// jitter, no budget and no attempt header.
pub struct TerminalRetryPolicy<C = DefaultClassifier> {
    config: Arc<Config<C>>,
    /// Attempts of this call that failed so far.
    attempts: u32,
}

/// What every clone of a policy shares; one `Arc` so a per-call clone is one
/// reference-count increment.
struct Config<C> {
    schedule: Schedule,
    classifier: Arc<C>,
    retry_after: RetryAfter,
    jitter: Jitter,
    budget: Option<RetryBudget>,
    attempt_header: Option<HeaderName>,
    recovery: Option<Recovery>,
    /// Whether a success is told to a budget or a recovery: kept by
    /// `configure`, so that a plain success tests one flag.
    success_is_told: bool,
}

impl<C> Clone for Config<C> {
    fn clone(&self) -> Self {
        Config {
            schedule: self.schedule.clone(),
            classifier: self.classifier.clone(),
            retry_after: self.retry_after,
            jitter: self.jitter.clone(),
            budget: self.budget.clone(),
            attempt_header: self.attempt_header.clone(),
            recovery: self.recovery.clone(),
            success_is_told: self.success_is_told,
        }
    }
}

impl Default for TerminalRetryPolicy {
    fn default() -> Self {
        TerminalRetryPolicy::with_classifier_only(DefaultClassifier)
    }
}

impl<C> TerminalRetryPolicy<C> {
    fn with_classifier_only(classifier: C) -> Self {
        TerminalRetryPolicy {
            config: Arc::new(Config {
                schedule: Schedule::default(),
                classifier: Arc::new(classifier),
                retry_after: RetryAfter::default(),
                jitter: Jitter::default(),
                budget: None,
                attempt_header: None,
                recovery: None,
                success_is_told: false,
            }),
            attempts: 0,
        }
    }

    fn configure(mut self, change: impl FnOnce(&mut Config<C>)) -> Self {
        let config = Arc::make_mut(&mut self.config);
        change(config);
        config.success_is_told = config.budget.is_some() || config.recovery.is_some();
        self
    }

    /// Uses `schedule` for the delays between attempts (by default 4, 8, 16,
    /// 32 and 64 s).
    pub fn with_schedule(self, schedule: Schedule) -> Self {
        self.configure(|config| config.schedule = schedule)
    }

    /// Uses `classifier` to sort results into success, transient and
    /// permanent (by default [`DefaultClassifier`]; a closure goes in a
    /// [`ClassifyFn`](crate::ClassifyFn)).
    pub fn with_classifier<D>(self, classifier: D) -> TerminalRetryPolicy<D> {
        let config = &*self.config;
        TerminalRetryPolicy {
            config: Arc::new(Config {
                schedule: config.schedule.clone(),
                classifier: Arc::new(classifier),
                retry_after: config.retry_after,
                jitter: config.jitter.clone(),
                budget: config.budget.clone(),
                attempt_header: config.attempt_header.clone(),
                recovery: config.recovery.clone(),
                success_is_told: config.success_is_told,
            }),
            attempts: 0,
        }
    }

    /// Sets how the server's `Retry-After` is honoured (by default up to five
    /// minutes).
    pub fn with_retry_after(self, retry_after: RetryAfter) -> Self {
        self.configure(|config| config.retry_after = retry_after)
    }

    /// Randomises the schedule's delays (off by default).
    pub fn with_jitter(self, jitter: Jitter) -> Self {
        self.configure(|config| config.jitter = jitter)
    }

    /// Limits retries with `budget`, shared by every clone of this policy
    /// (and of the layers made of it).
    pub fn with_budget(self, budget: RetryBudget) -> Self {
        self.configure(|config| config.budget = Some(budget))
    }

    /// Numbers retried requests in the header `name`: the second attempt
    /// carries `name: 2`, the third `name: 3`, and so on. The first attempt
    /// goes out as the caller built it.
    pub fn with_attempt_header(self, name: HeaderName) -> Self {
        self.configure(|config| config.attempt_header = Some(name))
    }

    /// Ends schedule delays early once the server answers again: see
    /// [`Recovery`]. Every success through this policy is
    /// reported to `recovery`, and every wait on a schedule delay (not one
    /// set by `Retry-After`) can be released by it. Off by default: the
    /// schedule stays exact.
    pub fn with_recovery(self, recovery: Recovery) -> Self {
        self.configure(|config| config.recovery = Some(recovery))
    }
}

// Read back by senders that make requests of their own beside the
// policy's: the client's routes tried once, the outbox's replay, a user's
// own dispatcher.
impl<C> TerminalRetryPolicy<C> {
    /// The schedule in use.
    pub fn schedule(&self) -> &Schedule {
        &self.config.schedule
    }

    /// The classifier in use: what a sender's single attempts beside the
    /// policy are classified with (the outbox's replay does so).
    pub fn classifier(&self) -> &C {
        &self.config.classifier
    }

    /// How the server's `Retry-After` is honoured: how long a sender's own
    /// attempt may be asked to wait.
    pub fn retry_after(&self) -> RetryAfter {
        self.config.retry_after
    }

    /// The signal that ends schedule delays early, if any: a sender making
    /// requests of its own tells it of their successes
    /// ([`Recovery::observe`]).
    pub fn recovery(&self) -> Option<&Recovery> {
        self.config.recovery.as_ref()
    }
}

impl<C> Clone for TerminalRetryPolicy<C> {
    fn clone(&self) -> Self {
        TerminalRetryPolicy {
            config: self.config.clone(),
            attempts: self.attempts,
        }
    }
}

impl<C> fmt::Debug for TerminalRetryPolicy<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &*self.config;
        f.debug_struct("TerminalRetryPolicy")
            .field("schedule", &config.schedule.delays())
            .field("classifier", &type_name::<C>())
            .field("retry_after", &config.retry_after)
            .field("jitter", &config.jitter)
            .field("budget", &config.budget)
            .field("attempt_header", &config.attempt_header)
            .field("recovery", &config.recovery)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl<B, RB, E, C> Policy<Request<B>, Response<RB>, E> for TerminalRetryPolicy<C>
where
    B: Clone,
    E: fmt::Debug,
    C: Classify<Response<RB>, E>,
{
    type Future = Backoff;

    // Inlined into tower's future: a success costs the classification and
    // a look at the budget and the recovery. The rest, on a failure only, is
    // `after_failure`'s.
    #[inline]
    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<RB>, E>,
    ) -> Option<Backoff> {
        let config = &*self.config;
        let outcome = config.classifier.classify(result);
        if outcome == Outcome::Success {
            if config.success_is_told {
                self.tell_success(request);
            }
            record_outcome(request, Outcome::Success);
            return None;
        }
        self.after_failure(request, result, outcome)
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        Some(request.clone())
    }
}

impl<C> TerminalRetryPolicy<C> {
    /// Tells a success to the budget (the call's deposit, if it is its first
    /// attempt) and to the recovery (its authority answers again).
    fn tell_success<B>(&self, request: &Request<B>) {
        let config = &*self.config;
        if let Some(budget) = &config.budget {
            if self.attempts == 0 {
                budget.deposit();
            }
        }
        if let Some(recovery) = &config.recovery {
            recovery.observe(request.uri());
        }
    }

    /// What follows an attempt that did not succeed: the end of the call, or
    /// the wait before the next attempt.
    #[cold]
    #[inline(never)]
    fn after_failure<B, RB, E: fmt::Debug>(
        &mut self,
        request: &mut Request<B>,
        result: &Result<Response<RB>, E>,
        outcome: Outcome,
    ) -> Option<Backoff> {
        record_outcome(request, outcome);
        // Failures are counted; a success ends the call uncounted.
        self.attempts += 1;
        let attempt = self.attempts;
        let config = &*self.config;
        if let Some(budget) = &config.budget {
            // The call's deposit, made by its first attempt.
            if attempt == 1 {
                budget.deposit();
            }
        }
        if outcome == Outcome::Permanent {
            log_ending(Ending::Permanent, request, result, attempt);
            return None;
        }
        let Some(&scheduled) = config.schedule.delays().get(attempt as usize - 1) else {
            log_ending(Ending::Exhausted, request, result, attempt);
            return None;
        };
        if config
            .budget
            .as_ref()
            .is_some_and(|budget| !budget.withdraw())
        {
            log_ending(Ending::BudgetSpent, request, result, attempt);
            return None;
        }
        let retry_after = result.as_ref().ok().and_then(|response| {
            let now = SystemTime::now();
            config
                .retry_after
                .delay(response.status(), response.headers(), now)
        });
        let delay = retry_after.unwrap_or_else(|| config.jitter.apply(scheduled));
        if let Some(name) = &config.attempt_header {
            request
                .headers_mut()
                .insert(name.clone(), HeaderValue::from(attempt + 1));
        }
        tracing::info!(
            method = %request.method(),
            path = request.uri().path(),
            attempt,
            outcome = outcome.as_str(),
            status = result.as_ref().ok().map(|response| response.status().as_u16()),
            error = result.as_ref().err().map(tracing::field::debug),
            delay_ms = delay.as_millis() as u64,
            "transient failure, retrying"
        );
        let deadline = Instant::now() + delay;
        // The server's own Retry-After is never cut short.
        Some(match (&config.recovery, retry_after) {
            (Some(recovery), None) => {
                Backoff::parked(recovery.park(request.uri(), deadline), attempt)
            }
            _ => Backoff::sleep(deadline, attempt),
        })
    }
}

/// Tells a caller that asked how the attempt was classified (see
/// [`OutcomeSlot`]).
#[inline]
fn record_outcome<B>(request: &Request<B>, outcome: Outcome) {
    if let Some(slot) = request.extensions().get::<OutcomeSlot>() {
        slot.set(outcome);
    }
}

/// Where the policy tells its caller how each attempt of a request was
/// classified, so that a caller who acts on the outcome (a dispatcher that
/// stores, falls back or quarantines, as the crate's outbox does) never
/// classifies an answer a second time.
///
/// Put one in the request's extensions before the call: every clone the
/// retry layer makes shares it, and after the call [`get`](OutcomeSlot::get)
/// says how the last attempt was classified, by the policy's own classifier.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_terminal_retry::{Outcome, OutcomeSlot, TerminalRetryLayer};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A receiver that knows no such route: a permanent rejection.
/// let service = TerminalRetryLayer::default().layer(service_fn(|_: Request<String>| async {
///     let mut response = Response::new(());
///     *response.status_mut() = StatusCode::NOT_FOUND;
///     Ok::<_, Infallible>(response)
/// }));
/// let slot = OutcomeSlot::default();
/// let mut request = Request::post("/hooks").body(String::new())?;
/// request.extensions_mut().insert(slot.clone());
/// let response = service.oneshot(request).await?;
///
/// assert_eq!(response.status(), StatusCode::NOT_FOUND);
/// assert_eq!(slot.get(), Some(Outcome::Permanent));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct OutcomeSlot(Arc<AtomicU8>);

impl OutcomeSlot {
    /// How the latest attempt was classified; `None` before one was.
    pub fn get(&self) -> Option<Outcome> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(Outcome::Success),
            2 => Some(Outcome::Transient),
            3 => Some(Outcome::Permanent),
            _ => None,
        }
    }

    fn set(&self, outcome: Outcome) {
        let code = match outcome {
            Outcome::Success => 1,
            Outcome::Transient => 2,
            Outcome::Permanent => 3,
        };
        self.0.store(code, Ordering::Release);
    }
}

/// Why a call ends without success.
#[derive(Clone, Copy)]
enum Ending {
    Permanent,
    Exhausted,
    BudgetSpent,
}

/// The event for a call that ends without success: `DEBUG` for a permanent
/// rejection, which the caller sees and reports; `WARN` when retries ran out.
fn log_ending<B, RB, E: fmt::Debug>(
    ending: Ending,
    request: &Request<B>,
    result: &Result<Response<RB>, E>,
    attempts: u32,
) {
    let status = result
        .as_ref()
        .ok()
        .map(|response| response.status().as_u16());
    let error = result.as_ref().err().map(tracing::field::debug);
    let (method, path) = (request.method().as_str(), request.uri().path());
    match ending {
        Ending::Permanent => tracing::debug!(
            method,
            path,
            attempts,
            status,
            error,
            "permanent rejection, not retrying"
        ),
        Ending::Exhausted => tracing::warn!(
            method,
            path,
            attempts,
            status,
            error,
            "retry schedule exhausted, returning the last result"
        ),
        Ending::BudgetSpent => tracing::warn!(
            method,
            path,
            attempts,
            status,
            error,
            "retry budget spent, returning the last result"
        ),
    }
}
