//! The crate's own error: configuration rejected when it is built.

use std::{error::Error, fmt, time::Duration};

/// A configuration the crate refuses, reported when it is built so that no
/// request ever meets it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A schedule holds more than 64 delays.
    TooManyRetries {
        /// How many delays were given, counted up to the first one too many.
        count: usize,
    },
    /// A delay, or a cap on delays, is longer than 24 hours.
    DelayTooLong {
        /// The delay that was given.
        delay: Duration,
    },
    /// An exponential schedule's factor is not a finite number of at least 1.
    InvalidFactor {
        /// The factor that was given.
        factor: f64,
    },
    /// A retry budget's parameters are outside what the budget accepts.
    InvalidBudget {
        /// Which parameter, and the accepted range.
        reason: &'static str,
    },
    /// A [`Recovery`](crate::Recovery) release rate of zero a second.
    InvalidReleaseRate,
    /// An outbox's replay setting is out of range, or no runtime can run it.
    InvalidReplay {
        /// Which setting, and what it must be.
        reason: &'static str,
    },
    /// A setting of the idempotency layer or of one of its stores is out of
    /// range.
    InvalidIdempotency {
        /// Which setting, and what it must be.
        reason: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::TooManyRetries { count } => write!(
                f,
                "retry schedule has {count} delays or more, at most {} are allowed",
                crate::schedule::MAX_RETRIES
            ),
            ConfigError::DelayTooLong { delay } => write!(
                f,
                "retry delay of {delay:?} is longer than the maximum of {:?}",
                crate::schedule::MAX_DELAY
            ),
            ConfigError::InvalidFactor { factor } => write!(
                f,
                "exponential backoff factor {factor} is not a finite number of at least 1"
            ),
            ConfigError::InvalidBudget { reason } => write!(f, "invalid retry budget: {reason}"),
            ConfigError::InvalidReplay { reason } => write!(f, "invalid outbox replay: {reason}"),
            ConfigError::InvalidIdempotency { reason } => {
                write!(f, "invalid idempotency setting: {reason}")
            }
            ConfigError::InvalidReleaseRate => {
                f.write_str("the early-release rate must be at least one retry a second")
            }
        }
    }
}

impl Error for ConfigError {}
