//! The activation context: what logic can do while it runs.
//!
//! Emit routes an item to every slot connected to the event, at once, on the calling worker
//! (streaming: a subscriber may start on another worker before the emitter returns). An emit
//! into a full slot waits — helping the pool meanwhile, see the [scheduler](crate::scheduler)
//! docs — so a fast producer is slowed, and no item is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::budget::bytes;
use crate::item::{Item, ItemError};
use crate::job::{Help, Job, JobId};
use crate::routine::RoutineError;
use crate::scheduler::{Sched, WorkerLocal, current_worker};
use crate::state::Overlay;
use crate::state::StateRef;

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

/// Handed to [`Logic::activate`](crate::Logic::activate): emit, state, config, job identity.
///
/// A context is valid for the activation it was handed to. It is `Sync`: logic may emit from
/// threads it scopes inside the activation (such emits wait for room without helping the
/// pool, as only a worker can).
pub struct Context {
    job: Arc<Job>,
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
    emits: parking_lot::Mutex<Vec<(usize, Item)>>,
    /// Bytes of the held emits (charged to the job's memory budget while held).
    bytes: AtomicU64,
    pub(crate) state: parking_lot::Mutex<Overlay>,
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
    pub(crate) fn new(job: Arc<Job>, node: usize) -> Self {
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
    pub(crate) fn attempt(job: Arc<Job>, node: usize) -> Self {
        Self {
            attempt: Some(Arc::default()),
            ..Self::new(job, node)
        }
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
    pub(crate) fn job_meter(&self) -> &Arc<crate::budget::Meter> {
        &self.job.meter
    }

    /// This routine's byte budgets.
    pub(crate) fn budgets(&self) -> &crate::RoutineBudgets {
        &self.job.flow.routines[self.node].budgets
    }

    /// The largest item this routine may emit, in bytes.
    pub(crate) fn item_budget(&self) -> u64 {
        self.job.flow.routines[self.node].budgets.item_bytes
    }

    /// Whether `len` more bytes of output fit this activation's budget (counting them).
    fn output_fits(&self, len: usize) -> bool {
        let budget = self.job.flow.routines[self.node].budgets.output_bytes;
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
            let budget = self.job.flow.routines[self.node].budgets.output_bytes;
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
        self.job.id
    }

    /// A stable id of this activation: `JOB/ROUTINE/N`, the routine's N-th activation in the
    /// job. Every retry of an activation has the same id, so logic can make an external side
    /// effect idempotent with it.
    pub fn activation_id(&self) -> String {
        format!("{}/{}/{}", self.job_id(), self.routine_id(), self.number)
    }

    /// The name of the flow being run.
    pub fn flow_name(&self) -> &str {
        &self.job.flow_name
    }

    /// This routine's id in the flow.
    pub fn routine_id(&self) -> &str {
        &self.job.flow.routines[self.node].id
    }

    /// One config value of this routine.
    pub fn config(&self, key: &str) -> Option<&Value> {
        self.job.flow.routines[self.node].config.get(key)
    }

    /// This routine's whole config.
    pub fn config_map(&self) -> &Map<String, Value> {
        &self.job.flow.routines[self.node].config
    }

    /// This routine's WorkerState in this job (see [`StateRef`]).
    pub fn state(&self) -> StateRef<'_> {
        let r = &self.job.flow.routines[self.node];
        let state = StateRef::new(
            &self.job.nodes[self.node].state,
            &r.id,
            r.budgets,
            &self.job.meter,
        );
        match &self.attempt {
            Some(a) => state.through(&a.state),
            None => state,
        }
    }

    /// Ends a successful attempt: applies its state changes (all or none), then delivers its
    /// held emits in order with the usual backpressure. An error from the first part means
    /// nothing happened; once delivering starts, an item that cannot be delivered (the job
    /// halted) becomes a dead letter of each slot it did not reach.
    pub(crate) fn commit_attempt(&self) -> Result<(), RoutineError> {
        let Some(a) = &self.attempt else {
            return Ok(());
        };
        let overlay = std::mem::take(&mut *a.state.lock());
        let committed = self.state_base().commit(overlay);
        let emits = std::mem::take(&mut *a.emits.lock());
        self.job.meter.release(a.bytes.swap(0, Ordering::Relaxed));
        committed?;
        let r = &self.job.flow.routines[self.node];
        let mut waited = Duration::ZERO;
        for (ev, item) in emits {
            self.job.count_emit(self.node);
            // An undeliverable item is already a dead letter where it did not arrive.
            let _ = self.route(r, ev, item, &mut waited);
        }
        Ok(())
    }

    /// Drops a failed attempt's held emits and state changes.
    pub(crate) fn discard_attempt(&self) {
        if let Some(a) = &self.attempt {
            a.emits.lock().clear();
            *a.state.lock() = Overlay::default();
            self.job.meter.release(a.bytes.swap(0, Ordering::Relaxed));
        }
    }

    /// The routine's state itself, not through the attempt.
    fn state_base(&self) -> StateRef<'_> {
        let r = &self.job.flow.routines[self.node];
        StateRef::new(
            &self.job.nodes[self.node].state,
            &r.id,
            r.budgets,
            &self.job.meter,
        )
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
            tracing::Level::ERROR => tracing::error!(job = %self.job.id, routine, "{message}"),
            tracing::Level::WARN => tracing::warn!(job = %self.job.id, routine, "{message}"),
            tracing::Level::INFO => tracing::info!(job = %self.job.id, routine, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(job = %self.job.id, routine, "{message}"),
            tracing::Level::TRACE => tracing::trace!(job = %self.job.id, routine, "{message}"),
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
        self.job.halted()
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
        let r = &self.job.flow.routines[self.node];
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
            if let Some(budget) = self.job.too_large_for(node, slot, size) {
                let to = &self.job.flow.routines[node];
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
        if self.job.halted() {
            return Err(EmitError::JobHalted {
                job: self.job.id,
                routine: r.id.to_string(),
            });
        }
        if let Some(a) = &self.attempt {
            // Held until the attempt succeeds, within the routine's attempt budget.
            let held = a.bytes.load(Ordering::Relaxed) + size;
            if held > r.budgets.attempt_bytes || !self.job.meter.reserve(size) {
                return Err(EmitError::AttemptFull {
                    routine: r.id.to_string(),
                    budget: r.budgets.attempt_bytes,
                });
            }
            a.bytes.fetch_add(size, Ordering::Relaxed);
            a.emits.lock().push((ev, item));
            // Counted as emitted when the attempt succeeds and they are released.
            return Ok(());
        }
        self.job.count_emit(self.node);
        self.route(r, ev, item, waited)
    }

    /// Delivers `item` to every slot `ev` is connected to. All or nothing for each slot: when
    /// one delivery fails (the job halted, or a slot could be passed only past its overrun
    /// bound), the item becomes a dead letter of that slot and of every later one it was not
    /// delivered to, and the error is returned.
    fn route(
        &self,
        r: &crate::flow::CompiledRoutine,
        ev: usize,
        item: Item,
        waited: &mut Duration,
    ) -> Result<(), EmitError> {
        let routes = &r.routes[ev];
        let Some((&(last_node, last_slot), rest)) = routes.split_last() else {
            return Ok(());
        };
        // A failed delivery has kept the item as a dead letter of its own slot; the slots
        // after it get it as a dead letter too.
        for (i, &(node, slot)) in rest.iter().enumerate() {
            if let Err(e) = self.deliver(node, slot, item.clone(), waited) {
                let why = format!("not delivered: {e}");
                for &(n, s) in &routes[i + 1..] {
                    self.job
                        .dead_letter_undelivered(n, s, item.clone(), why.clone());
                }
                return Err(e);
            }
            self.progress.delivered.fetch_add(1, Ordering::Relaxed);
        }
        self.deliver(last_node, last_slot, item, waited)?;
        self.progress.delivered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Pushes into one slot. When it is full: runs the slot's routine here if it is idle
    /// (or other work, if that routine is starved), else waits for room; only if the whole
    /// pool stays stalled does it overrun the bound by this one item (counted).
    fn deliver(
        &self,
        node: usize,
        slot: usize,
        item: Item,
        waited: &mut Duration,
    ) -> Result<(), EmitError> {
        let job = &self.job;
        let Some(worker) = current_worker(&job.shared) else {
            let started = Instant::now();
            let result = self.deliver_from_outside(node, slot, item);
            *waited += started.elapsed();
            return result;
        };
        let worker = &*worker;
        match job.push(node, slot, item, false, worker.sched()) {
            Ok(()) => Ok(()),
            Err(item) => {
                let started = Instant::now();
                let result = self.deliver_when_full(worker, node, slot, item);
                *waited += started.elapsed();
                result
            }
        }
    }

    /// [`Context::deliver`] into a full slot.
    fn deliver_when_full(
        &self,
        worker: &WorkerLocal,
        node: usize,
        slot: usize,
        mut item: Item,
    ) -> Result<(), EmitError> {
        let job = &self.job;
        let shared = &job.shared;
        // The epoch seen when the pool was first found stalled; overrun only if the pool is
        // still stalled after a grace wait and no batch moved anywhere meanwhile.
        let mut stalled_at: Option<u64> = None;
        loop {
            if job.halted() {
                return Err(self.halted_while_waiting(node, slot, item));
            }
            if job.stopping() {
                // Stopped: nothing will drain the slot, and the activation is to end.
                return self.overrun(worker.sched(), node, slot, item, "the job is stopping");
            }
            let len = item.byte_len() as u64;
            let (helped, may_overrun) = match job.help_consumer(node, slot, len, worker) {
                Help::Ran => (true, false),
                // Suspended under us on this stack (a cycle): it cannot drain the slot before
                // we return, so waiting would be forever. Overrun now.
                Help::Busy if worker.runs_here(job, node) => {
                    return self.overrun(
                        worker.sched(),
                        node,
                        slot,
                        item,
                        "its routine is suspended under the emitter",
                    );
                }
                // Running on another worker: it drains the slot by itself. In an acyclic flow
                // it can never be waiting on us, so this wait always ends.
                // (A wait can still close a loop through a frame that `help_once` put on some
                // stack; then the stall check below breaks it.)
                Help::Busy => (false, job.flow.cyclic || worker.has_foreign_frames()),
                // Idle but starved (a multi-slot policy waiting on another slot): run other
                // work, which may feed it.
                Help::CannotFire => (worker.help_once(), true),
                Help::TooDeep => (false, true),
            };
            if helped {
                stalled_at = None;
            } else {
                // Counted as blocked only while waiting, so a worker that is merely slow
                // (pre-empted between two attempts) never makes the pool look stalled.
                shared.pool.wake_for_queued_work();
                shared.pool.enter_blocked();
                if may_overrun && shared.stalled() {
                    let epoch = shared.pool.epoch();
                    if stalled_at == Some(epoch) {
                        shared.pool.leave_blocked();
                        return self.overrun(
                            worker.sched(),
                            node,
                            slot,
                            item,
                            "the whole pool is stalled",
                        );
                    }
                    stalled_at = Some(epoch);
                } else {
                    stalled_at = None;
                }
                let mut pending = Some(item);
                let pushed = job.push_or_wait(
                    node,
                    slot,
                    &mut pending,
                    worker.sched(),
                    Duration::from_millis(1),
                );
                shared.pool.leave_blocked();
                if pushed {
                    return Ok(());
                }
                item = pending.expect("a failed push gives the item back");
            }
            item = match job.push(node, slot, item, false, worker.sched()) {
                Ok(()) => return Ok(()),
                Err(item) => item,
            };
        }
    }

    /// Pushes past the slot's bound (counted as `overflowed`) to break a wait that could
    /// never end; refused once the slot is past its bounds by as much again, and then the
    /// item becomes a dead letter of that slot (it is never dropped).
    fn overrun(
        &self,
        sched: Sched<'_>,
        node: usize,
        slot: usize,
        item: Item,
        why: &str,
    ) -> Result<(), EmitError> {
        let job = &self.job;
        let r = &job.flow.routines[node];
        tracing::debug!(
            job = %job.id,
            routine = %r.id,
            slot = %r.slot_names[slot],
            emitter = self.routine_id(),
            "overrunning a full slot by one item: {why}"
        );
        job.push(node, slot, item, true, sched).map_err(|item| {
            let e = EmitError::Overrun {
                routine: self.routine_id().to_owned(),
                to: format!("{}.{}", r.id, r.slot_names[slot]),
            };
            job.dead_letter_undelivered(node, slot, item, e.to_string());
            e
        })
    }

    /// The job halted while an emit waited: the item becomes a dead letter of the receiving
    /// routine (it is never dropped).
    fn halted_while_waiting(&self, node: usize, slot: usize, item: Item) -> EmitError {
        let job = &self.job;
        job.dead_letter_undelivered(
            node,
            slot,
            item,
            format!(
                "job halted while `{}` waited for queue space",
                self.routine_id()
            ),
        );
        EmitError::JobHalted {
            job: job.id,
            routine: self.routine_id().to_owned(),
        }
    }

    /// An emit from a thread that is not one of the pool's workers (a thread the logic
    /// scoped): it cannot run activations, so it waits for room. The worker running the
    /// activation is typically waiting for this thread, so while it waits the emit counts as
    /// that worker blocked; if the whole pool is then stalled (one worker, say) it overruns
    /// the slot as a blocked worker would, instead of waiting forever.
    fn deliver_from_outside(&self, node: usize, slot: usize, item: Item) -> Result<(), EmitError> {
        let job = &self.job;
        let shared = &job.shared;
        let pool = &shared.pool;
        let mut pending = Some(item);
        let mut stalled_at: Option<u64> = None;
        loop {
            if job.halted() {
                let item = pending.take().expect("a failed push gives the item back");
                return Err(self.halted_while_waiting(node, slot, item));
            }
            pool.enter_blocked();
            let stalled = shared.stalled();
            let epoch = pool.epoch();
            if job.stopping() || (stalled && stalled_at == Some(epoch)) {
                pool.leave_blocked();
                let item = pending.take().expect("a failed push gives the item back");
                return self.overrun(
                    Sched::External(pool),
                    node,
                    slot,
                    item,
                    "an emit from outside the pool, which is stalled or stopping",
                );
            }
            stalled_at = stalled.then_some(epoch);
            let pushed = job.push_or_wait(
                node,
                slot,
                &mut pending,
                Sched::External(pool),
                Duration::from_millis(5),
            );
            pool.leave_blocked();
            if pushed {
                return Ok(());
            }
        }
    }
}
