//! The activation context: what logic can do while it runs.
//!
//! Emit routes an item to every slot connected to the event, at once, on the calling worker
//! (streaming: a subscriber may start on another worker before the emitter returns). An emit
//! into a full slot waits — helping the pool meanwhile, see the [scheduler](crate::scheduler)
//! docs — so a fast producer is slowed, and no item is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::item::{Item, ItemError};
use crate::job::{Help, Job, JobId};
use crate::scheduler::{Sched, WorkerLocal, current_worker};
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
}

impl Context {
    pub(crate) fn new(job: Arc<Job>, node: usize) -> Self {
        Self { job, node }
    }

    /// A second handle on the same activation (for logic that must keep one in a `'static`
    /// place while it runs, such as a WebAssembly store).
    pub(crate) fn handle(&self) -> Context {
        Context {
            job: self.job.clone(),
            node: self.node,
        }
    }

    /// The job this activation belongs to.
    pub fn job_id(&self) -> JobId {
        self.job.id
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
        StateRef::new(&self.job.nodes[self.node].state)
    }

    /// Logs a line to the job's output (and to `tracing`).
    pub fn log(&self, level: tracing::Level, message: impl Into<String>) {
        let message = message.into();
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

    /// Writes a line to the job's output as if printed by the routine (`stdout`).
    pub fn print(&self, message: impl Into<String>) {
        self.job.log(self.node, "stdout", message.into());
    }

    /// Whether the job has failed or been cancelled (a running guest should stop).
    pub(crate) fn job_halted(&self) -> bool {
        self.job.halted()
    }

    /// Writes a line of a guest's `stdout` or `stderr` to the job's output.
    pub(crate) fn output(&self, stream: &str, line: String) {
        self.job.log(self.node, stream, line);
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
        self.job.count_emit(self.node);
        let routes = &r.routes[ev];
        if let Some((last, rest)) = routes.split_last() {
            for &(node, slot) in rest {
                self.deliver(node, slot, item.clone(), waited)?;
            }
            self.deliver(last.0, last.1, item, waited)?;
        }
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
            let (helped, may_overrun) = match job.help_consumer(node, slot, worker) {
                Help::Ran => (true, false),
                // Suspended under us on this stack (a cycle): it cannot drain the slot before
                // we return, so waiting would be forever. Overrun now.
                Help::Busy if worker.runs_here(job, node) => {
                    self.overrun(
                        worker,
                        node,
                        slot,
                        item,
                        "its routine is suspended under the emitter",
                    );
                    return Ok(());
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
                        self.overrun(worker, node, slot, item, "the whole pool is stalled");
                        return Ok(());
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
    /// never end.
    fn overrun(&self, worker: &WorkerLocal, node: usize, slot: usize, item: Item, why: &str) {
        let job = &self.job;
        let r = &job.flow.routines[node];
        tracing::debug!(
            job = %job.id,
            routine = %r.id,
            slot = %r.slot_names[slot],
            emitter = self.routine_id(),
            "overrunning a full slot by one item: {why}"
        );
        let _ = job.push(node, slot, item, true, worker.sched());
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
    /// scoped): it cannot run activations, so it only waits for room.
    fn deliver_from_outside(&self, node: usize, slot: usize, item: Item) -> Result<(), EmitError> {
        let job = &self.job;
        let pool = &job.shared.pool;
        let mut pending = Some(item);
        loop {
            if job.halted() {
                let item = pending.take().expect("a failed push gives the item back");
                return Err(self.halted_while_waiting(node, slot, item));
            }
            if job.push_or_wait(
                node,
                slot,
                &mut pending,
                Sched::External(pool),
                Duration::from_millis(5),
            ) {
                return Ok(());
            }
        }
    }
}
