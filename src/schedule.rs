//! The delays between attempts.
//!
//! A [`Schedule`] of N delays allows N + 1 attempts at most: one at once, then
//! one after each delay. The default is the plan agreed for terminal callbacks,
//! 4 s, 8 s, 16 s, 32 s and 64 s: six attempts over 124 s.
//!
//! ```
//! use std::time::Duration;
//! use tower_terminal_retry::Schedule;
//!
//! let default = Schedule::default();
//! assert_eq!(default.delays().len(), 5);
//! assert_eq!(default.delays().iter().sum::<Duration>(), Duration::from_secs(124));
//!
//! // 100 ms doubling, at most 1 s: 100, 200, 400, 800, 1000, 1000 ms.
//! let scaled = Schedule::exponential(Duration::from_millis(100), 2.0, 6, Duration::from_secs(1))?;
//! assert_eq!(scaled.delays()[4], Duration::from_secs(1));
//!
//! // Configuration errors come back when the schedule is built.
//! assert!(Schedule::new([Duration::from_secs(25 * 3600)]).is_err());
//! # Ok::<(), tower_terminal_retry::ConfigError>(())
//! ```

use std::{sync::Arc, time::Duration};

use crate::error::{ConfigError, MAX_DELAY, MAX_RETRIES};

/// The default delays: 4 s, 8 s, 16 s, 32 s, 64 s.
const DEFAULT_DELAYS: [Duration; 5] = [
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(32),
    Duration::from_secs(64),
];

/// The delays between attempts; N delays mean N + 1 attempts at most.
///
/// Cloning is cheap: clones share the delays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    delays: Arc<[Duration]>,
}

impl Schedule {
    /// A schedule of the given delays, in order.
    ///
    /// An empty schedule is valid: one attempt and no retry.
    ///
    /// # Errors
    ///
    /// [`ConfigError::TooManyRetries`] for more than 64 delays
    /// (the iterator is read no further than the first delay too many, so an
    /// endless one is an error too), [`ConfigError::DelayTooLong`] for a
    /// delay over 24 hours.
    pub fn new(delays: impl IntoIterator<Item = Duration>) -> Result<Schedule, ConfigError> {
        let delays: Vec<Duration> = delays.into_iter().take(MAX_RETRIES + 1).collect();
        if delays.len() > MAX_RETRIES {
            return Err(ConfigError::TooManyRetries {
                count: delays.len(),
            });
        }
        check_delay(delays.iter().copied().max().unwrap_or_default())?;
        Ok(Schedule {
            delays: delays.into(),
        })
    }

    /// An exponential schedule of `count` delays: `base`, `base * factor`,
    /// `base * factor²`…, each at most `cap`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidFactor`] when `factor` is not finite or below 1,
    /// [`ConfigError::DelayTooLong`] when `base` is over 24 hours,
    /// [`ConfigError::TooManyRetries`] when `count` is over 64. A `cap` over
    /// 24 hours (`Duration::MAX` for "no cap") stands for 24 hours.
    pub fn exponential(
        base: Duration,
        factor: f64,
        count: usize,
        cap: Duration,
    ) -> Result<Schedule, ConfigError> {
        if !factor.is_finite() || factor < 1.0 {
            return Err(ConfigError::InvalidFactor { factor });
        }
        if count > MAX_RETRIES {
            return Err(ConfigError::TooManyRetries { count });
        }
        check_delay(base)?;
        let cap = cap.min(MAX_DELAY);
        let cap_secs = cap.as_secs_f64();
        let mut delay = base.min(cap).as_secs_f64();
        Schedule::new((0..count).map(|_| {
            let this = Duration::from_secs_f64(delay);
            // Stays finite: `delay` never exceeds the cap, itself at most a day.
            delay = (delay * factor).min(cap_secs);
            this
        }))
    }

    /// The delays, in order. Their sum is how long the schedule waits when
    /// every attempt fails at once.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }
}

impl Default for Schedule {
    /// 4 s, 8 s, 16 s, 32 s, 64 s.
    fn default() -> Self {
        Schedule {
            delays: DEFAULT_DELAYS.into(),
        }
    }
}

/// Refuses a delay over [`MAX_DELAY`].
pub(crate) fn check_delay(delay: Duration) -> Result<Duration, ConfigError> {
    if delay > MAX_DELAY {
        Err(ConfigError::DelayTooLong { delay })
    } else {
        Ok(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(values: &[u64]) -> Vec<Duration> {
        values.iter().copied().map(Duration::from_secs).collect()
    }

    #[test]
    fn default_is_the_agreed_plan() {
        assert_eq!(Schedule::default().delays(), &secs(&[4, 8, 16, 32, 64])[..]);
        assert_eq!(Schedule::default().delays().len() + 1, 6);
    }

    #[test]
    fn empty_schedule_allows_one_attempt() {
        let schedule = Schedule::new([]).unwrap();
        assert!(schedule.delays().is_empty());
    }

    #[test]
    fn limits_are_errors_not_panics() {
        assert!(Schedule::new(vec![Duration::ZERO; MAX_RETRIES]).is_ok());
        assert_eq!(
            Schedule::new(vec![Duration::ZERO; MAX_RETRIES + 1]),
            Err(ConfigError::TooManyRetries { count: 65 })
        );
        // An endless iterator is read up to the first delay too many.
        assert_eq!(
            Schedule::new(std::iter::repeat(Duration::ZERO)),
            Err(ConfigError::TooManyRetries { count: 65 })
        );
        assert!(Schedule::new([MAX_DELAY]).is_ok());
        let too_long = MAX_DELAY + Duration::from_nanos(1);
        assert_eq!(
            Schedule::new([Duration::ZERO, too_long]),
            Err(ConfigError::DelayTooLong { delay: too_long })
        );
        assert_eq!(
            Schedule::new([Duration::MAX]),
            Err(ConfigError::DelayTooLong {
                delay: Duration::MAX
            })
        );
    }

    #[test]
    fn exponential_doubles_up_to_the_cap() {
        let schedule =
            Schedule::exponential(Duration::from_secs(4), 2.0, 7, Duration::from_secs(100))
                .unwrap();
        assert_eq!(schedule.delays(), &secs(&[4, 8, 16, 32, 64, 100, 100])[..]);
        let plan =
            Schedule::exponential(Duration::from_secs(4), 2.0, 5, Duration::from_secs(64)).unwrap();
        assert_eq!(plan, Schedule::default());
    }

    #[test]
    fn exponential_rejects_bad_arguments() {
        let one = Duration::from_secs(1);
        for factor in [f64::NAN, f64::INFINITY, 0.5, -2.0] {
            assert!(matches!(
                Schedule::exponential(one, factor, 3, one),
                Err(ConfigError::InvalidFactor { .. })
            ));
        }
        assert_eq!(
            Schedule::exponential(one, 2.0, 65, one),
            Err(ConfigError::TooManyRetries { count: 65 })
        );
        // A huge factor or count stays finite under the cap.
        let capped = Schedule::exponential(one, 1e300, 64, Duration::MAX).unwrap();
        assert!(capped.delays().iter().all(|delay| *delay <= MAX_DELAY));
        assert_eq!(capped.delays()[1], MAX_DELAY);
        // A base over the day is refused, not clamped.
        assert!(matches!(
            Schedule::exponential(MAX_DELAY * 2, 2.0, 1, Duration::MAX),
            Err(ConfigError::DelayTooLong { .. })
        ));
    }
}
