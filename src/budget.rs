//! A retry budget shared by every clone of a layer, opt-in.
//!
//! During a long outage, retries multiply the load on a server that is already
//! down. A budget caps retries to a share of the calls that went through:
//! each call deposits, each retry withdraws, and with the budget spent the
//! policy returns the last outcome at once. It keeps the accounting of
//! tower's [`TpsBudget`](tower::retry::budget::TpsBudget) (a window of ten
//! slots), with its arguments checked when it is built instead of asserted
//! when it is used, and a constant cost per call after any idle time (tower's
//! walks every slot-width that passed: a day idle is 864,000 steps).
//!
//! ```
//! use std::time::Duration;
//! use tower_terminal_retry::{TerminalRetryPolicy, RetryBudget, TerminalRetryLayer};
//!
//! // Retries may add 20% to the calls of the last 10 s, and 1 per second anyway.
//! let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2)?;
//! let layer = TerminalRetryLayer::new(TerminalRetryPolicy::default().with_budget(budget));
//! # let _ = layer;
//! # Ok::<(), tower_terminal_retry::ConfigError>(())
//! ```

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::error::ConfigError;

/// How many slots the window is cut into.
const SLOTS: usize = 10;

/// A retry budget shared by all its clones: retries may add a share of the
/// calls of a window, and a floor per second, whatever the traffic.
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Budget>,
}

struct Budget {
    /// What a call deposits and a retry withdraws, scaled so that both are
    /// whole numbers.
    deposit: i64,
    withdraw: i64,
    /// Always there: `min_per_sec` retries a second over the window.
    reserve: i64,
    /// The width of one slot: a tenth of the window.
    slot_width: Duration,
    balance: Mutex<Balance>,
}

struct Balance {
    /// The slots that closed within the window, and the open one's total.
    closed: [i64; SLOTS],
    open: i64,
    /// Where the open slot goes when it closes, and when it opened.
    index: usize,
    opened: Instant,
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
        // tower's scaling: a ratio of r allows r retries per call.
        let (deposit, withdraw) = if retry_ratio == 0.0 {
            (0, 1)
        } else if retry_ratio <= 1.0 {
            (1, (1.0 / retry_ratio) as i64)
        } else {
            (1000, (1000.0 / retry_ratio) as i64)
        };
        let reserve = i64::from(min_per_sec)
            .saturating_mul(ttl.as_secs() as i64)
            .saturating_mul(withdraw);
        Ok(RetryBudget {
            inner: Arc::new(Budget {
                deposit,
                withdraw,
                reserve,
                slot_width: ttl / SLOTS as u32,
                balance: Mutex::new(Balance {
                    closed: [0; SLOTS],
                    open: 0,
                    index: 0,
                    opened: Instant::now(),
                }),
            }),
        })
    }

    /// Records a call that went through, earning retries for later.
    pub(crate) fn deposit(&self) {
        let mut balance = self.inner.current();
        balance.open = balance.open.saturating_add(self.inner.deposit);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        let budget = &*self.inner;
        let mut balance = budget.current();
        let available = balance
            .closed
            .iter()
            .fold(balance.open, |sum, slot| sum.saturating_add(*slot))
            .saturating_add(budget.reserve);
        let allowed = available >= budget.withdraw;
        if allowed {
            balance.open = balance.open.saturating_sub(budget.withdraw);
        }
        allowed
    }
}

impl Budget {
    /// The balance, its slots older than the window dropped.
    fn current(&self) -> std::sync::MutexGuard<'_, Balance> {
        let mut balance = crate::sync::lock(&self.balance);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(balance.opened);
        if elapsed < self.slot_width {
            return balance;
        }
        let index = balance.index;
        balance.closed[index] = std::mem::take(&mut balance.open);
        // The slots that passed with no call are empty; a gap of a whole
        // window or more empties them all, whatever its length.
        let skipped = (elapsed.as_nanos().saturating_sub(1) / self.slot_width.as_nanos()) as usize;
        for step in 1..=skipped.min(SLOTS) {
            balance.closed[(index + step) % SLOTS] = 0;
        }
        balance.index = (index + 1 + skipped % SLOTS) % SLOTS;
        balance.opened = now;
        balance
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

    #[tokio::test(start_paused = true)]
    async fn a_century_idle_costs_no_more_than_a_slot() {
        let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.5).unwrap();
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.withdraw() && budget.withdraw());
        // Walking every tenth of a second of a century would never end.
        tokio::time::advance(Duration::from_secs(100 * 365 * 24 * 3600)).await;
        // The deposits have expired; the reserve (one a second, two per
        // retry at this ratio) allows one retry.
        assert!(budget.withdraw(), "the reserve is there after the idle");
        assert!(!budget.withdraw(), "and the old deposits are gone");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_window() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        budget.deposit();
        tokio::time::advance(Duration::from_secs(5)).await;
        budget.deposit();
        tokio::time::advance(Duration::from_millis(5_500)).await;
        // The first deposit left the window, the second did not.
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
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
