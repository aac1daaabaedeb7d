//! Routines: the nodes of a flow.
//!
//! A [`Routine`] declares input slots (bounded queues), output events (with field names), a
//! config map, an activation [`Policy`], an [`ErrorStrategy`], a concurrency limit and its
//! [`Logic`]. A routine is a description: it holds no queues and no state. Each job that runs a
//! flow gets its own queues and [`WorkerState`](crate::state) for every routine of it.
//!
//! [`Logic`] is the one seam between the engine and what a routine does. Native closures
//! implement it here; WebAssembly components implement the same trait, so the scheduler does not
//! know (or care) which kind of logic it runs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::activation::{Batch, Policy};
use crate::budget::RoutineBudgets;
use crate::context::Context;

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

impl From<crate::item::ItemError> for RoutineError {
    fn from(e: crate::item::ItemError) -> Self {
        RoutineError::fatal(e.to_string())
    }
}

impl From<crate::EmitError> for RoutineError {
    fn from(e: crate::EmitError) -> Self {
        let retryable = matches!(e, crate::EmitError::JobHalted { .. });
        RoutineError {
            message: e.to_string(),
            retryable,
        }
    }
}

/// What a routine does when activated.
///
/// `activate` receives every slot's released items at once (a [`Batch`]) and a [`Context`] for
/// emitting, state and config. It may be called from any worker thread; with `concurrency > 1`
/// it is called concurrently for the same routine of the same job.
pub trait Logic: Send + Sync + 'static {
    /// Runs one activation.
    fn activate(&self, ctx: &Context, batch: &Batch) -> Result<(), RoutineError>;

    /// The job has finished: nothing of it will run again, so whatever the logic keeps for
    /// that job (a WebAssembly routine's instances) can go.
    fn job_finished(&self, _job: crate::JobId) {}
}

struct FnLogic<F>(F);

impl<F> Logic for FnLogic<F>
where
    F: Fn(&Context, &Batch) -> Result<(), RoutineError> + Send + Sync + 'static,
{
    fn activate(&self, ctx: &Context, batch: &Batch) -> Result<(), RoutineError> {
        (self.0)(ctx, batch)
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

/// A node of a flow: slots, events, config, policy, error strategy, concurrency and logic.
///
/// ```
/// use routilux::{Routine, Policy};
/// let r = Routine::new()
///     .slot("in")
///     .event("out", ["value"])
///     .policy(Policy::batch_size(2))
///     .logic(|ctx, batch| {
///         for item in batch.slot("in") {
///             ctx.emit("out", &serde_json::json!({"value": item.value()["n"]}))?;
///         }
///         Ok(())
///     });
/// assert_eq!(r.slots().len(), 1);
/// ```
#[derive(Clone)]
pub struct Routine {
    pub(crate) slots: Vec<SlotSpec>,
    pub(crate) events: Vec<EventSpec>,
    pub(crate) config: Map<String, Value>,
    pub(crate) policy: Policy,
    pub(crate) on_error: Option<ErrorStrategy>,
    pub(crate) concurrency: usize,
    pub(crate) logic: Option<Arc<dyn Logic>>,
    pub(crate) description: String,
    pub(crate) budgets: RoutineBudgets,
}

impl Default for Routine {
    fn default() -> Self {
        Self::new()
    }
}

impl Routine {
    /// A routine with no slots, events or logic yet; policy `immediate`, concurrency 1.
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            events: Vec::new(),
            config: Map::new(),
            policy: Policy::Immediate,
            on_error: None,
            concurrency: 1,
            logic: None,
            description: String::new(),
            budgets: RoutineBudgets::default(),
        }
    }

    /// Adds an input slot (a name, or a [`SlotSpec`] with a bound).
    pub fn slot(mut self, slot: impl Into<SlotSpec>) -> Self {
        self.slots.push(slot.into());
        self
    }

    /// Adds an input slot holding at most `max_queue_length` items.
    pub fn slot_with_capacity(self, name: &str, max_queue_length: usize) -> Self {
        self.slot(SlotSpec::new(name).max_queue_length(max_queue_length))
    }

    /// Changes the bound of an existing slot (a slot of that name must have been declared,
    /// for instance by a plugin's description; otherwise nothing changes).
    pub fn max_queue_length(mut self, slot: &str, n: usize) -> Self {
        if let Some(s) = self.slots.iter_mut().find(|s| &*s.name == slot) {
            s.max_queue_length = n;
        }
        self
    }

    /// Changes the byte budget of an existing slot (as [`Routine::max_queue_length`]).
    pub fn max_queue_bytes(mut self, slot: &str, n: u64) -> Self {
        if let Some(s) = self.slots.iter_mut().find(|s| &*s.name == slot) {
            s.max_queue_bytes = n;
        }
        self
    }

    /// Sets the byte budgets of what this routine hands the host (see [`RoutineBudgets`]).
    pub fn budgets(mut self, budgets: RoutineBudgets) -> Self {
        self.budgets = budgets;
        self
    }

    /// Adds an output event with its declared field names.
    pub fn event<I, S>(mut self, name: &str, fields: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.events.push(EventSpec {
            name: name.into(),
            fields: fields.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Sets one config entry.
    pub fn config(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.config.insert(key.to_owned(), value.into());
        self
    }

    /// Sets the activation policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the error strategy (otherwise the flow's default applies).
    pub fn on_error(mut self, strategy: ErrorStrategy) -> Self {
        self.on_error = Some(strategy);
        self
    }

    /// Lets up to `n` activations of this routine (within one job) run in parallel.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// A one-line description (shown by tools).
    pub fn description(mut self, text: &str) -> Self {
        self.description = text.to_owned();
        self
    }

    /// Sets the logic to a native closure.
    pub fn logic<F>(self, f: F) -> Self
    where
        F: Fn(&Context, &Batch) -> Result<(), RoutineError> + Send + Sync + 'static,
    {
        self.logic_impl(FnLogic(f))
    }

    /// Sets the logic to any [`Logic`] implementation (a WebAssembly component, for instance).
    pub fn logic_impl(mut self, logic: impl Logic) -> Self {
        self.logic = Some(Arc::new(logic));
        self
    }

    /// Sets the logic to a shared [`Logic`].
    pub fn logic_arc(mut self, logic: Arc<dyn Logic>) -> Self {
        self.logic = Some(logic);
        self
    }

    /// The logic, if set (to wrap it, for instance: measuring, tracing).
    pub fn logic_ref(&self) -> Option<Arc<dyn Logic>> {
        self.logic.clone()
    }

    /// The declared slots.
    pub fn slots(&self) -> &[SlotSpec] {
        &self.slots
    }

    /// The declared events.
    pub fn events(&self) -> &[EventSpec] {
        &self.events
    }

    /// The config map.
    pub fn config_map(&self) -> &Map<String, Value> {
        &self.config
    }

    /// The activation policy.
    pub fn activation_policy(&self) -> &Policy {
        &self.policy
    }
}

impl fmt::Debug for Routine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Routine")
            .field("slots", &self.slots)
            .field("events", &self.events)
            .field("config", &self.config)
            .field("policy", &self.policy)
            .field("on_error", &self.on_error)
            .field("concurrency", &self.concurrency)
            .field("has_logic", &self.logic.is_some())
            .field("budgets", &self.budgets)
            .finish()
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
