//! The activation context: what logic can do while it runs.
//!
//! Emit routes an item to every slot connected to the event, at once, on the calling worker
//! (streaming: a subscriber may start on another worker before the emitter returns). An emit
//! into a full slot waits — helping the pool meanwhile, see the execution layer's delivery
//! docs — so a fast producer is slowed, and no item is dropped.
//!
//! The context is model: it checks what logic hands it against the routine's plan and budgets,
//! and holds a retrying routine's attempt back. What only the engine can do (deliver an item,
//! keep an output line, say whether the job halted) it asks of its job through [`JobPort`],
//! which the execution layer implements: so this layer names nothing of the one above it.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Map, Value};

use super::budget::{Charge, Meter, RoutineBudgets, bytes};
use super::item::{Item, ItemError};
use super::plan::{CompiledFlow, CompiledRoutine};
use super::report::JobId;
use super::slots::Slots;
use super::spec::RoutineError;
use super::state::{Overlay, State, StateRef};

/// Why an emit failed.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The routine emitted on an event it does not declare.
    #[error("routine `{routine}` emitted on undeclared event `{event}` (declared: {})", declared.join(", "))]
    UnknownEvent {
        /// The emitting routine.
        routine: String,
        /// The event it named.
        event: String,
        /// The events it declares.
        declared: Vec<String>,
    },
    /// The payload is not a JSON object.
    #[error("routine `{routine}` emitted an invalid item on `{event}`: {source}")]
    Item {
        /// The emitting routine.
        routine: String,
        /// The event.
        event: String,
        /// What is wrong with the payload.
        source: ItemError,
    },
    /// The item is larger than the routine's item budget.
    #[error(
        "routine `{routine}` emitted an item of {} on `{event}`, over its item budget of {}",
        bytes(*size), bytes(*budget)
    )]
    TooLarge {
        /// The emitting routine.
        routine: String,
        /// The event.
        event: String,
        /// The item's size in bytes.
        size: u64,
        /// The budget.
        budget: u64,
    },
    /// The item is larger than a receiving slot's whole byte budget: it could never be queued
    /// there. Nothing was delivered to any slot.
    #[error(
        "routine `{routine}` emitted an item of {} on `{event}`, larger than the byte budget of \
         slot `{to}` ({})",
        bytes(*size), bytes(*budget)
    )]
    TooLargeForSlot {
        /// The emitting routine.
        routine: String,
        /// The event.
        event: String,
        /// The receiving `routine.slot`.
        to: String,
        /// The item's size in bytes.
        size: u64,
        /// The slot's byte budget.
        budget: u64,
    },
    /// A full slot could be passed only by overrunning its bounds (a cycle, or a stalled
    /// pool), and it is already over them by as much again: the emit fails rather than grow
    /// the queue without end.
    #[error(
        "routine `{routine}` cannot deliver to `{to}`: the slot is full, cannot drain before \
         the emit returns (a cycle or a stalled pool) and is already past its bounds by as much \
         again"
    )]
    Overrun {
        /// The emitting routine.
        routine: String,
        /// The receiving `routine.slot`.
        to: String,
    },
    /// A retrying routine's attempt holds back more than its budget of emitted bytes.
    #[error(
        "routine `{routine}` emitted more than its attempt budget of {} in one attempt (a \
         retrying routine's outputs are held until the attempt succeeds)",
        bytes(*budget)
    )]
    AttemptFull {
        /// The routine.
        routine: String,
        /// The budget.
        budget: u64,
    },
    /// A retrying routine's held emits would pass the job's memory budget or its tenant's
    /// memory quota.
    #[error(
        "routine `{routine}` cannot hold more emits in this attempt: they would pass {limit} \
         (a retrying routine's outputs are held until the attempt succeeds)"
    )]
    HeldPastMemory {
        /// The routine.
        routine: String,
        /// The limit they would pass, and how full it is.
        limit: String,
        /// It was the tenant's quota (which its other jobs may free): retryable.
        transient: bool,
    },
    /// The slot had room but the tenant's memory quota stayed spent (by its other jobs) for
    /// as long as a post waits: the item was kept as a dead letter of the receiving routine,
    /// and the activation fails (retryable), so its worker is not held by another job's
    /// memory.
    #[error("routine `{routine}` could not deliver to `{to}`: {quota} stayed spent for {waited:?}")]
    QuotaSpent {
        /// The emitting routine.
        routine: String,
        /// The receiving `routine.slot`.
        to: String,
        /// The quota, and how full it is.
        quota: String,
        /// How long the emit waited.
        waited: std::time::Duration,
    },
    /// The job failed or was cancelled while the emit waited for queue space; the item was
    /// kept as a dead letter of the receiving routine.
    #[error("job {job} halted while `{routine}` waited to deliver an item")]
    JobHalted {
        /// The job.
        job: JobId,
        /// The emitting routine.
        routine: String,
    },
}

impl From<EmitError> for RoutineError {
    fn from(e: EmitError) -> Self {
        let retryable = matches!(
            e,
            EmitError::JobHalted { .. }
                | EmitError::QuotaSpent { .. }
                | EmitError::HeldPastMemory {
                    transient: true,
                    ..
                }
        );
        RoutineError {
            message: e.to_string(),
            retryable,
        }
    }
}

/// A job's control word ([`JobCore::control`]): running.
pub(crate) const RUNNING: u8 = 0;
/// A routine failed under `stop`: nothing more runs, running guests are interrupted.
pub(crate) const FAILED: u8 = 1;
/// Cancelled: as failed.
pub(crate) const CANCELLED: u8 = 2;
/// Stopped: no new input or activation; running activations end normally (they may still
/// emit).
pub(crate) const STOPPED: u8 = 3;

/// What every activation of a job reads: the job's identity, its plan, its routines'
/// WorkerState, its memory meter and whether it halted. The execution layer's job holds it.
pub(crate) struct JobCore {
    pub(crate) id: JobId,
    pub(crate) flow_name: Arc<str>,
    pub(crate) flow: Arc<CompiledFlow>,
    /// Each routine's WorkerState, by the plan's routine index.
    pub(crate) states: Box<[Mutex<State>]>,
    /// Bytes the job holds against its memory budget (guests, queues, retention).
    pub(crate) meter: Arc<Meter>,
    /// The job's share of its group's quota of queued items, if the group has one.
    pub(crate) items: Option<Arc<Meter>>,
    /// The live-instance quota of the job's group, if it has one.
    pub(crate) instances: Option<Arc<Slots>>,
    /// The group (tenant) of a fair pool whose share its tasks run on.
    pub(crate) group: usize,
    pub(crate) started: Instant,
    /// [`RUNNING`], [`FAILED`], [`CANCELLED`] or [`STOPPED`] (the job changes it; every emit
    /// reads it).
    pub(crate) control: AtomicU8,
}

impl JobCore {
    /// Whether the job failed or was cancelled: nothing more runs, running guests are
    /// interrupted, waiting emits give up.
    #[inline]
    pub(crate) fn halted(&self) -> bool {
        matches!(self.control.load(Ordering::Acquire), FAILED | CANCELLED)
    }

    /// What the job's queued items are charged to.
    #[inline]
    pub(crate) fn charge(&self) -> Charge<'_> {
        Charge {
            bytes: &self.meter,
            items: self.items.as_deref(),
        }
    }
}

/// What an activation asks of the engine that runs its job (implemented by the execution
/// layer's job).
pub(crate) trait JobPort: Send + Sync {
    /// The job's identity, plan, states and meter.
    fn core(&self) -> &JobCore;
    /// Keeps (and streams) a line of the job's output, logged by routine `node`.
    fn log(&self, node: usize, level: &str, message: String);
    /// Counts `item` as emitted by routine `node` and delivers it to every slot its event
    /// `ev` is connected to (all or nothing for each slot: a slot it does not reach gets it as
    /// a dead letter), adding each delivery to `delivered` and the time spent waiting for room
    /// in full slots to `waited`.
    fn emit(
        &self,
        node: usize,
        ev: usize,
        item: Item,
        waited: &mut Duration,
        delivered: &AtomicU64,
    ) -> Result<(), EmitError>;
    /// Waits (up to the runtime's post timeout, adding the wait to `waited`) until `n`
    /// bytes can be reserved on the job's meter, and reserves them; the refusal if they
    /// never could.
    fn wait_for_memory(
        &self,
        n: u64,
        waited: &mut Duration,
    ) -> Result<(), crate::model::budget::Refusal>;
}

/// Handed to [`Logic::activate`](crate::Logic::activate): emit, state, config, job identity.
///
/// A context is valid for the activation it was handed to. It is `Sync`: logic may emit from
/// threads it scopes inside the activation (such emits wait for room without helping the
/// pool, as only a worker can).
pub struct Context {
    job: Arc<dyn JobPort>,
    node: usize,
    /// Made on first output (most native activations print nothing); shared by handles.
    output: OnceLock<Arc<OutputBudget>>,
    /// For an attempt of a retrying routine: its emits and state changes, held back.
    attempt: Option<Arc<Attempt>>,
    /// What this activation has done so far, shared by handles.
    progress: Arc<Progress>,
    /// The activation's number within its routine and job (see [`Context::activation_id`]).
    number: u64,
}

/// An attempt of a retrying routine is a unit: what it emits and what it changes in its
/// WorkerState are held here, and reach the flow only if it succeeds (so a retry never
/// delivers an output twice, nor counts an `add` twice).
#[derive(Default)]
pub(crate) struct Attempt {
    emits: Mutex<Vec<(usize, Item)>>,
    /// Bytes of the held emits (charged to the job's memory budget while held).
    bytes: AtomicU64,
    state: Mutex<Overlay>,
}

/// What an ended attempt held: its state changes and its emits `(event, item)`, in order.
pub(crate) struct Held {
    pub(crate) state: Overlay,
    pub(crate) emits: Vec<(usize, Item)>,
    /// The emits' bytes, still reserved on the job's meter until each is delivered.
    pub(crate) charge: HeldCharge,
}

/// Bytes of held emits reserved on a job's meter: given back item by item as they are
/// delivered (each then charged to the slot it lands in), the rest when dropped (a failed
/// attempt, a halted job), so that emits waiting to be delivered, after an attempt or while
/// a durable unit is on its way to disk, stay counted.
pub(crate) struct HeldCharge {
    meter: Arc<Meter>,
    bytes: u64,
    /// Bytes of items delivered, given back in chunks (the meter, linked to a group's, takes
    /// a lock): counted twice for a moment, never not at all.
    delivered: u64,
}

/// The chunk in which [`HeldCharge`] gives delivered bytes back.
const HELD_CHUNK: u64 = 64 << 10;

impl HeldCharge {
    /// `item` is about to be delivered: its bytes leave the charge.
    pub(crate) fn deliver(&mut self, item: &Item) {
        let n = (item.byte_len() as u64).min(self.bytes);
        self.bytes -= n;
        self.delivered += n;
        if self.delivered >= HELD_CHUNK {
            self.meter.release(std::mem::take(&mut self.delivered));
        }
    }
}

impl Drop for HeldCharge {
    fn drop(&mut self) {
        self.meter.release(self.bytes + self.delivered);
    }
}

/// Counts of one activation's effects.
#[derive(Default)]
pub(crate) struct Progress {
    /// Items it delivered downstream (emitted and routed).
    pub(crate) delivered: AtomicU64,
}

/// What one activation has printed and logged, against its routine's output budget.
#[derive(Default)]
struct OutputBudget {
    used: AtomicU64,
    /// Bytes not kept because the budget was spent.
    over: AtomicU64,
}

impl Context {
    /// Whether this activation is an attempt whose effects are held ([`Context::attempt`]).
    #[inline]
    pub(crate) fn holds_attempt(&self) -> bool {
        self.attempt.is_some()
    }

    pub(crate) fn new(job: Arc<dyn JobPort>, node: usize) -> Self {
        Self {
            job,
            node,
            output: OnceLock::new(),
            attempt: None,
            progress: Arc::default(),
            number: 0,
        }
    }

    /// The context of activation `number` of its routine.
    pub(crate) fn numbered(mut self, number: u64) -> Self {
        self.number = number;
        self
    }

    /// A context whose emits and state changes are held as one attempt (see [`Attempt`]).
    pub(crate) fn attempt(job: Arc<dyn JobPort>, node: usize) -> Self {
        Self {
            attempt: Some(Arc::default()),
            ..Self::new(job, node)
        }
    }

    /// The job's identity, plan, states and meter.
    #[inline]
    fn core(&self) -> &JobCore {
        self.job.core()
    }

    /// This routine's plan.
    #[inline]
    fn routine(&self) -> &CompiledRoutine {
        &self.core().flow.routines[self.node]
    }

    pub(crate) fn progress(&self) -> &Progress {
        &self.progress
    }

    fn output_budget(&self) -> &Arc<OutputBudget> {
        self.output.get_or_init(Arc::default)
    }

    /// A second handle on the same activation (for logic that must keep one in a `'static`
    /// place while it runs, such as a WebAssembly store).
    pub(crate) fn handle(&self) -> Context {
        Context {
            job: self.job.clone(),
            node: self.node,
            output: OnceLock::from(self.output_budget().clone()),
            attempt: self.attempt.clone(),
            progress: self.progress.clone(),
            number: self.number,
        }
    }

    /// The job's memory meter (what its guests' memories are charged to).
    pub(crate) fn job_meter(&self) -> &Arc<Meter> {
        &self.core().meter
    }

    /// The live-instance quota of the job's group, if it has one.
    pub(crate) fn instance_slots(&self) -> Option<&Arc<Slots>> {
        self.core().instances.as_ref()
    }

    /// The group (tenant) the job runs in.
    pub(crate) fn group(&self) -> usize {
        self.core().group
    }

    /// This routine's byte budgets.
    pub(crate) fn budgets(&self) -> &RoutineBudgets {
        &self.routine().budgets
    }

    /// The largest item this routine may emit, in bytes.
    pub(crate) fn item_budget(&self) -> u64 {
        self.routine().budgets.item_bytes
    }

    /// Whether `len` more bytes of output fit this activation's budget (counting them).
    fn output_fits(&self, len: usize) -> bool {
        let budget = self.routine().budgets.output_bytes;
        let len = len as u64;
        let out = self.output_budget();
        let before = out.used.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) <= budget {
            true
        } else {
            out.over.fetch_add(len, Ordering::Relaxed);
            false
        }
    }

    /// The error of an activation whose output passed its budget (that output was not kept).
    pub(crate) fn output_overflow(&self) -> Option<RoutineError> {
        let over = self.output.get()?.over.load(Ordering::Relaxed);
        (over > 0).then(|| {
            let budget = self.routine().budgets.output_bytes;
            RoutineError::fatal(format!(
                "routine `{}` printed or logged more than its output budget of {} in one \
                 activation ({} more not kept)",
                self.routine_id(),
                bytes(budget),
                bytes(over)
            ))
        })
    }

    /// The job this activation belongs to.
    pub fn job_id(&self) -> JobId {
        self.core().id
    }

    /// A stable id of this activation: `JOB/ROUTINE/N`, the routine's N-th activation in the
    /// job. Every retry of an activation has the same id, so logic can make an external side
    /// effect idempotent with it.
    pub fn activation_id(&self) -> String {
        format!("{}/{}/{}", self.job_id(), self.routine_id(), self.number)
    }

    /// The name of the flow being run.
    pub fn flow_name(&self) -> &str {
        &self.core().flow_name
    }

    /// This routine's id in the flow.
    pub fn routine_id(&self) -> &str {
        &self.routine().id
    }

    /// One config value of this routine.
    pub fn config(&self, key: &str) -> Option<&Value> {
        self.routine().config.get(key)
    }

    /// This routine's whole config.
    pub fn config_map(&self) -> &Map<String, Value> {
        &self.routine().config
    }

    /// This routine's WorkerState in this job (see [`StateRef`]).
    pub fn state(&self) -> StateRef<'_> {
        let state = self.state_base();
        match &self.attempt {
            Some(a) => state.through(&a.state),
            None => state,
        }
    }

    /// Ends the attempt (if this activation is one): what it held, taken out, its bytes still
    /// on the job's meter (see [`HeldCharge`]). The engine applies it when the attempt
    /// succeeded ([`StateRef::commit`], then the emits) and drops it when it failed.
    pub(crate) fn take_attempt(&self) -> Option<Held> {
        let a = self.attempt.as_ref()?;
        Some(Held {
            state: std::mem::take(&mut *a.state.lock()),
            emits: std::mem::take(&mut *a.emits.lock()),
            charge: HeldCharge {
                meter: self.core().meter.clone(),
                bytes: a.bytes.swap(0, Ordering::Relaxed),
                delivered: 0,
            },
        })
    }

    /// The routine's state itself, not through the attempt.
    pub(crate) fn state_base(&self) -> StateRef<'_> {
        let core = self.core();
        let r = &core.flow.routines[self.node];
        StateRef::new(&core.states[self.node], &r.id, r.budgets, &core.meter)
    }

    /// Logs a line to the job's output (and to `tracing`). Past the activation's output
    /// budget the line is not kept, and the activation fails when it ends.
    pub fn log(&self, level: tracing::Level, message: impl Into<String>) {
        let message = message.into();
        if !self.output_fits(message.len()) {
            return;
        }
        let routine = self.routine_id();
        match level {
            tracing::Level::ERROR => tracing::error!(job = %self.core().id, routine, "{message}"),
            tracing::Level::WARN => tracing::warn!(job = %self.core().id, routine, "{message}"),
            tracing::Level::INFO => tracing::info!(job = %self.core().id, routine, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(job = %self.core().id, routine, "{message}"),
            tracing::Level::TRACE => tracing::trace!(job = %self.core().id, routine, "{message}"),
        }
        let level = level.as_str().to_ascii_lowercase();
        self.job.log(self.node, &level, message);
    }

    /// Writes a line to the job's output as if printed by the routine (`stdout`), within the
    /// activation's output budget (as [`Context::log`]).
    pub fn print(&self, message: impl Into<String>) {
        self.output("stdout", message.into());
    }

    /// Whether the job has failed or been cancelled (a running guest should stop).
    pub(crate) fn job_halted(&self) -> bool {
        self.core().halted()
    }

    /// Writes a line of a guest's `stdout` or `stderr` to the job's output, within the
    /// activation's output budget.
    pub(crate) fn output(&self, stream: &str, line: String) {
        if self.output_fits(line.len()) {
            self.job.log(self.node, stream, line);
        }
    }

    /// Emits a value (serialised to a JSON object) on `event`.
    pub fn emit<T: Serialize + ?Sized>(&self, event: &str, value: &T) -> Result<(), EmitError> {
        let item = Item::from_serialize(value).map_err(|source| EmitError::Item {
            routine: self.routine_id().to_owned(),
            event: event.to_owned(),
            source,
        })?;
        self.emit_item(event, item)
    }

    /// Emits an existing item on `event` without copying it (forwarding).
    pub fn emit_item(&self, event: &str, item: Item) -> Result<(), EmitError> {
        let mut waited = Duration::ZERO;
        self.emit_item_waiting(event, item, &mut waited)
    }

    /// [`Context::emit_item`], adding to `waited` how long it waited for room in full slots
    /// (whether or not it then succeeded; the clock is read only when a slot was full).
    pub(crate) fn emit_item_waiting(
        &self,
        event: &str,
        item: Item,
        waited: &mut Duration,
    ) -> Result<(), EmitError> {
        let core = self.core();
        let r = &core.flow.routines[self.node];
        let Some(ev) = r.event_index(event) else {
            return Err(EmitError::UnknownEvent {
                routine: r.id.to_string(),
                event: event.to_owned(),
                declared: r.events.iter().map(|e| e.name.to_string()).collect(),
            });
        };
        let size = item.byte_len() as u64;
        if size > r.budgets.item_bytes {
            return Err(EmitError::TooLarge {
                routine: r.id.to_string(),
                event: event.to_owned(),
                size,
                budget: r.budgets.item_bytes,
            });
        }
        let routes = &r.routes[ev];
        // An item no receiving slot could ever hold fails the emit before any slot gets it.
        for &(node, slot) in routes {
            let to = &core.flow.routines[node];
            let budget = to.queue_bytes[slot];
            if size > budget {
                return Err(EmitError::TooLargeForSlot {
                    routine: r.id.to_string(),
                    event: event.to_owned(),
                    to: format!("{}.{}", to.id, to.slot_names[slot]),
                    size,
                    budget,
                });
            }
        }
        // Refused once the job halted (a guest's emit is too): nothing lands after a cancel.
        if core.halted() {
            return Err(EmitError::JobHalted {
                job: core.id,
                routine: r.id.to_string(),
            });
        }
        if let Some(a) = &self.attempt {
            // Held until the attempt succeeds, within the routine's attempt budget.
            let held = a.bytes.load(Ordering::Relaxed) + size;
            if held > r.budgets.attempt_bytes {
                return Err(EmitError::AttemptFull {
                    routine: r.id.to_string(),
                    budget: r.budgets.attempt_bytes,
                });
            }
            if let Err(refusal) = core.meter.try_reserve(size) {
                // The tenant's other jobs may let memory go: wait for it as an emit into a
                // full slot would (up to the post timeout), then fail, retryable.
                let refusal = match refusal.transient() {
                    true => self.job.wait_for_memory(size, waited).err(),
                    false => Some(refusal),
                };
                if let Some(refusal) = refusal {
                    return Err(EmitError::HeldPastMemory {
                        routine: r.id.to_string(),
                        limit: refusal.to_string(),
                        transient: refusal.transient(),
                    });
                }
            }
            a.bytes.fetch_add(size, Ordering::Relaxed);
            a.emits.lock().push((ev, item));
            // Counted as emitted when the attempt succeeds and they are released.
            return Ok(());
        }
        self.job
            .emit(self.node, ev, item, waited, &self.progress.delivered)
    }
}
