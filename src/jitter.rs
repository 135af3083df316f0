//! Spreading retries out in time, opt-in.
//!
//! When many callers fail together, the same schedule brings them back together:
//! jitter spreads them out. It is off by default, so that the pinned plan stays
//! exact. [`Jitter::full`] waits a random time in `[0, delay]` (the "full jitter"
//! of the AWS architecture blog); [`Jitter::equal`] in `[delay / 2, delay]`.
//! Jitter applies to the schedule's delays, never to a server's `Retry-After`.
//!
//! The random source is injectable, so tests can be exact:
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use http::{Request, Response};
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_terminal_retry::{Jitter, Schedule, TerminalRetryLayer, TerminalRetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Full jitter with its random draw pinned at one half: 8 s becomes 4 s.
//! let layer = TerminalRetryLayer::new(
//!     TerminalRetryPolicy::default()
//!         .with_schedule(Schedule::new([Duration::from_secs(8)])?)
//!         .with_jitter(Jitter::full().with_random(|| 0.5)),
//! );
//! let down = service_fn(|_: Request<()>| async {
//!     Ok::<_, Infallible>(Response::builder().status(502).body(()).unwrap())
//! });
//! let start = tokio::time::Instant::now();
//! let response = layer.layer(down).oneshot(Request::new(())).await?;
//! assert_eq!(response.status(), 502);
//! assert_eq!(start.elapsed(), Duration::from_secs(4));
//! # Ok(())
//! # }
//! ```

use std::{fmt, sync::Arc, time::Duration};

use tower::util::rng::{HasherRng, Rng};

/// How a schedule's delay is randomised before the policy sleeps.
///
/// `Jitter::default()` is no jitter: the schedule's delays, exactly.
#[derive(Clone, Default)]
pub struct Jitter {
    kind: Kind,
    random: Option<Arc<dyn Fn() -> f64 + Send + Sync>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    None,
    Full,
    Equal,
}

impl Jitter {
    /// Full jitter: a uniformly random delay in `[0, delay]`.
    pub fn full() -> Jitter {
        Jitter {
            kind: Kind::Full,
            random: None,
        }
    }

    /// Equal jitter: a uniformly random delay in `[delay / 2, delay]`.
    pub fn equal() -> Jitter {
        Jitter {
            kind: Kind::Equal,
            random: None,
        }
    }

    /// Replaces the random source: a function returning values in `[0, 1)`.
    ///
    /// A value outside `[0, 1]` is clamped into it, and NaN counts as 1 (the
    /// full delay), so a faulty source can never make the policy panic.
    pub fn with_random(mut self, random: impl Fn() -> f64 + Send + Sync + 'static) -> Jitter {
        self.random = Some(Arc::new(random));
        self
    }

    /// The delay to sleep instead of `delay`: within `[0, delay]` for full
    /// jitter, `[delay / 2, delay]` for equal jitter, `delay` itself for
    /// none. Public for a sender of its own that spreads its waits as the
    /// policy does (the outbox's probes of a destination that is down use
    /// full jitter).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_terminal_retry::Jitter;
    ///
    /// let half = Jitter::full().with_random(|| 0.5);
    /// assert_eq!(half.apply(Duration::from_secs(8)), Duration::from_secs(4));
    /// assert_eq!(Jitter::default().apply(Duration::from_secs(8)), Duration::from_secs(8));
    /// ```
    pub fn apply(&self, delay: Duration) -> Duration {
        let fraction = match self.kind {
            Kind::None => return delay,
            Kind::Full => self.random_fraction(),
            Kind::Equal => 0.5 + self.random_fraction() / 2.0,
        };
        // `fraction` is within [0, 1], so the product never exceeds `delay`;
        // the fallback only guards the f64 rounding of very long delays.
        Duration::try_from_secs_f64(delay.as_secs_f64() * fraction)
            .map_or(delay, |jittered| jittered.min(delay))
    }

    fn random_fraction(&self) -> f64 {
        let value = match &self.random {
            Some(random) => random(),
            // A fresh `RandomState` per draw: distinct keys each time, no lock.
            None => HasherRng::new().next_f64(),
        };
        if value.is_nan() {
            1.0
        } else {
            value.clamp(0.0, 1.0)
        }
    }
}

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jitter")
            .field("kind", &self.kind)
            .field("custom_random", &self.random.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EIGHT: Duration = Duration::from_secs(8);

    #[test]
    fn full_jitter_spans_zero_to_the_delay() {
        assert_eq!(
            Jitter::full().with_random(|| 0.0).apply(EIGHT),
            Duration::ZERO
        );
        assert_eq!(
            Jitter::full().with_random(|| 0.25).apply(EIGHT),
            Duration::from_secs(2)
        );
        assert_eq!(Jitter::full().with_random(|| 1.0).apply(EIGHT), EIGHT);
    }

    #[test]
    fn equal_jitter_keeps_half() {
        assert_eq!(
            Jitter::equal().with_random(|| 0.0).apply(EIGHT),
            Duration::from_secs(4)
        );
        assert_eq!(Jitter::equal().with_random(|| 1.0).apply(EIGHT), EIGHT);
    }

    #[test]
    fn faulty_sources_are_clamped() {
        for (value, expected) in [
            (-3.0, Duration::ZERO),
            (7.0, EIGHT),
            (f64::NAN, EIGHT),
            (f64::INFINITY, EIGHT),
            (f64::NEG_INFINITY, Duration::ZERO),
        ] {
            assert_eq!(
                Jitter::full().with_random(move || value).apply(EIGHT),
                expected
            );
        }
        assert_eq!(
            Jitter::full().with_random(|| 1.0).apply(Duration::MAX),
            Duration::MAX
        );
    }

    #[test]
    fn default_source_stays_in_range_and_varies() {
        let jitter = Jitter::full();
        let draws: Vec<Duration> = (0..64).map(|_| jitter.apply(EIGHT)).collect();
        assert!(draws.iter().all(|delay| *delay <= EIGHT));
        assert!(draws.iter().any(|delay| *delay != draws[0]));
    }

    #[test]
    fn none_is_exact_and_default() {
        assert_eq!(Jitter::default().kind, Kind::None);
        assert_eq!(Jitter::full().kind, Kind::Full);
        assert_eq!(Jitter::default().apply(EIGHT), EIGHT);
    }
}
