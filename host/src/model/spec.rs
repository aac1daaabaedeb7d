//! What a routine declares, apart from its logic: its slots and events, and what happens when
//! its logic fails (the error it returns and the strategy that handles it).
//!
//! Plain data, shared by the flow builder ([`Routine`](crate::Routine)), the compiled plan the
//! engine runs, and the activation context.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Queue bound of a slot when none is given (the reference library's default).
pub const DEFAULT_MAX_QUEUE_LENGTH: usize = 1000;

/// Byte budget of a slot when none is given.
pub const DEFAULT_MAX_QUEUE_BYTES: u64 = 64 << 20;

/// An input slot: a named FIFO queue, bounded in items and in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSpec {
    /// Slot name, unique within the routine.
    pub name: Arc<str>,
    /// The most items the slot holds; a producer into a full slot waits (backpressure).
    pub max_queue_length: usize,
    /// The most bytes (of items' JSON text) the slot holds: a slot at its byte budget is full
    /// just as one at its count. An item larger than the whole budget can never be queued.
    pub max_queue_bytes: u64,
}

impl SlotSpec {
    /// A slot with the default bounds.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            max_queue_length: DEFAULT_MAX_QUEUE_LENGTH,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
        }
    }

    /// Sets the queue bound.
    pub fn max_queue_length(mut self, n: usize) -> Self {
        self.max_queue_length = n;
        self
    }

    /// Sets the byte budget.
    pub fn max_queue_bytes(mut self, n: u64) -> Self {
        self.max_queue_bytes = n;
        self
    }
}

impl From<&str> for SlotSpec {
    fn from(name: &str) -> Self {
        SlotSpec::new(name)
    }
}

/// An output event with the field names its items carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    /// Event name, unique within the routine.
    pub name: Arc<str>,
    /// Declared field names (documentation and validation of flows; items may carry more).
    pub fields: Vec<String>,
}

/// An error returned by routine logic.
///
/// `retryable` says whether running the same input again can help (a timeout talking to a
/// service: yes; malformed input: no). A `retry` strategy only retries retryable errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutineError {
    /// What went wrong, for people.
    pub message: String,
    /// Whether a retry with the same items may succeed.
    pub retryable: bool,
}

impl RoutineError {
    /// A failure that a retry may fix (the default for errors converted with `?`).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry can fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

impl fmt::Display for RoutineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for RoutineError {
    fn from(message: String) -> Self {
        RoutineError::retryable(message)
    }
}

impl From<&str> for RoutineError {
    fn from(message: &str) -> Self {
        RoutineError::retryable(message)
    }
}

impl From<serde_json::Error> for RoutineError {
    fn from(e: serde_json::Error) -> Self {
        RoutineError::fatal(format!("bad data: {e}"))
    }
}

impl From<super::item::ItemError> for RoutineError {
    fn from(e: super::item::ItemError) -> Self {
        RoutineError::fatal(e.to_string())
    }
}

/// What happens after an activation fails. Whatever the strategy, the failed activation's items
/// are kept on the job as a dead letter with the error, and counted.
#[derive(Clone, Debug, PartialEq)]
pub enum ErrorStrategy {
    /// The job fails: running activations finish, nothing else is scheduled.
    Stop,
    /// The error is recorded and reported; the routine goes on with its next items.
    Continue,
    /// The activation is skipped quietly (counted as skipped, logged at debug level).
    Skip,
    /// The logic runs again with the same items, after a delay that grows by `backoff`.
    Retry(RetryPolicy),
}

/// Parameters of [`ErrorStrategy::Retry`].
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so at most `max + 1` runs).
    pub max: u32,
    /// Delay before the first retry.
    pub delay: Duration,
    /// Each further retry waits `backoff` times longer than the one before (1.0 = fixed).
    pub backoff: f64,
    /// What happens when the retries are spent or the error is not retryable.
    pub then: Exhausted,
}

/// The strategy applied once retries are spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    /// As [`ErrorStrategy::Stop`].
    Stop,
    /// As [`ErrorStrategy::Continue`].
    Continue,
    /// As [`ErrorStrategy::Skip`].
    Skip,
}

impl ErrorStrategy {
    /// `retry { max, delay, backoff }`, failing the job when retries are spent.
    pub fn retry(max: u32, delay: Duration, backoff: f64) -> Self {
        ErrorStrategy::Retry(RetryPolicy {
            max,
            delay,
            backoff,
            then: Exhausted::Stop,
        })
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based), at most a day. A zero delay stays zero
    /// however large the backoff (0 × ∞ would otherwise be NaN).
    pub fn delay_before(&self, retry: u32) -> Duration {
        if self.delay.is_zero() {
            return Duration::ZERO;
        }
        let factor = self.backoff.max(0.0).powi(retry.saturating_sub(1) as i32);
        let secs = self.delay.as_secs_f64() * factor;
        if secs.is_finite() {
            Duration::from_secs_f64(secs.min(86_400.0))
        } else {
            Duration::from_secs(86_400)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_by_backoff() {
        let p = RetryPolicy {
            max: 3,
            delay: Duration::from_millis(10),
            backoff: 2.0,
            then: Exhausted::Stop,
        };
        assert_eq!(p.delay_before(1), Duration::from_millis(10));
        assert_eq!(p.delay_before(2), Duration::from_millis(20));
        assert_eq!(p.delay_before(3), Duration::from_millis(40));
        let huge = RetryPolicy {
            backoff: 1e300,
            ..p
        };
        assert_eq!(huge.delay_before(3), Duration::from_secs(86_400));
        // 0 × 2^1099 is not NaN (and a day): it is no wait at all.
        let zero = RetryPolicy {
            max: 1100,
            delay: Duration::ZERO,
            backoff: 2.0,
            then: Exhausted::Stop,
        };
        assert_eq!(zero.delay_before(1100), Duration::ZERO);
    }
}
