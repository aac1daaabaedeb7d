//! Routines: the nodes of a flow.
//!
//! A [`Routine`] declares input slots (bounded queues), output events (with field names), a
//! config map, an activation [`Policy`], an [`ErrorStrategy`], a concurrency limit and its
//! [`Logic`]. A routine is a description: it holds no queues and no state. Each job that runs a
//! flow gets its own queues and [`WorkerState`](crate::StateRef) for every routine of it.
//!
//! [`Logic`] is the one seam between the engine and what a routine does. Native closures
//! implement it here; WebAssembly components implement the same trait, so the scheduler does not
//! know (or care) which kind of logic it runs.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::activation::{Batch, Policy};
use super::budget::RoutineBudgets;
use super::context::Context;
use super::report::JobId;
use super::spec::{ErrorStrategy, EventSpec, RoutineError, SlotSpec};

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
    fn job_finished(&self, _job: JobId) {}
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
