//! A retry budget shared by every clone of a layer, opt-in.
//!
//! During a long outage, retries multiply the load on a server that is already
//! down. A budget caps retries to a share of the calls that went through:
//! each call deposits, each retry withdraws, and with the budget spent the
//! policy returns the last outcome at once. It is tower's own
//! [`TpsBudget`], with its arguments checked when it is built
//! instead of asserted when it is used.
//!
//! ```
//! use std::time::Duration;
//! use tower_terminal_retry::{RetryBudget, TerminalRetryLayer};
//!
//! // Retries may add 20% to the calls of the last 10 s, and 1 per second anyway.
//! let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2)?;
//! let layer = TerminalRetryLayer::new().with_budget(budget);
//! # let _ = layer;
//! # Ok::<(), tower_terminal_retry::ConfigError>(())
//! ```

use std::{fmt, sync::Arc, time::Duration};

use tower::retry::budget::{Budget, TpsBudget};

use crate::ConfigError;

/// A retry budget shared by all its clones: see the [module docs](self).
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<TpsBudget>,
}

impl RetryBudget {
    /// A budget over a window of `ttl` (1 to 60 s) that allows `min_per_sec`
    /// retries per second whatever the traffic, plus `retry_ratio` (0 to 1000)
    /// retries per call deposited in the window.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidBudget`] when an argument is outside its range.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Result<Self, ConfigError> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(ConfigError::InvalidBudget {
                reason: "ttl must be between 1 and 60 seconds",
            });
        }
        if !(0.0..=1000.0).contains(&retry_ratio) {
            return Err(ConfigError::InvalidBudget {
                reason: "retry ratio must be a number from 0 to 1000",
            });
        }
        if min_per_sec >= i32::MAX as u32 {
            return Err(ConfigError::InvalidBudget {
                reason: "min_per_sec must be below 2^31 - 1",
            });
        }
        Ok(RetryBudget {
            inner: Arc::new(TpsBudget::new(ttl, min_per_sec, retry_ratio)),
        })
    }

    /// Records a call that went through, earning retries for later.
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_arguments_are_errors() {
        let second = Duration::from_secs(1);
        for (ttl, min, ratio) in [
            (Duration::from_millis(999), 1, 0.2),
            (Duration::from_secs(61), 1, 0.2),
            (second, 1, -0.1),
            (second, 1, 1000.5),
            (second, 1, f32::NAN),
            (second, u32::MAX, 0.2),
        ] {
            assert!(
                matches!(
                    RetryBudget::new(ttl, min, ratio),
                    Err(ConfigError::InvalidBudget { .. })
                ),
                "{ttl:?} {min} {ratio}"
            );
        }
    }

    #[test]
    fn clones_share_one_budget() {
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.0).unwrap();
        let clone = budget.clone();
        budget.deposit();
        assert!(!clone.withdraw(), "a zero ratio earns nothing");
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 1.0).unwrap();
        let clone = budget.clone();
        budget.deposit();
        assert!(
            clone.withdraw(),
            "the clone spends what the original earned"
        );
        assert!(!budget.withdraw(), "and the original sees it spent");
    }
}
