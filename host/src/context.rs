//! The activation context: what logic can do while it runs.
//!
//! Emit routes an item to every slot connected to the event, at once, on the calling worker
//! (streaming: a subscriber may start on another worker before the emitter returns). An emit
//! into a full slot waits — helping the pool meanwhile, see the [scheduler](crate::scheduler)
//! docs — so a fast producer is slowed, and no item is dropped.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::item::{Item, ItemError};
use crate::job::{Job, JobId};
use crate::scheduler::WorkerLocal;
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
pub struct Context<'a> {
    job: &'a Arc<Job>,
    node: usize,
    worker: &'a WorkerLocal,
}

impl<'a> Context<'a> {
    pub(crate) fn new(job: &'a Arc<Job>, node: usize, worker: &'a WorkerLocal) -> Self {
        Self { job, node, worker }
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

    /// This routine's [`WorkerState`](crate::state) in this job.
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
                self.deliver(node, slot, item.clone())?;
            }
            self.deliver(last.0, last.1, item)?;
        }
        Ok(())
    }

    /// Pushes into one slot; when it is full, helps the pool, waits, or — if the whole pool
    /// is stalled — overruns the bound by this one item (counted).
    fn deliver(&self, node: usize, slot: usize, item: Item) -> Result<(), EmitError> {
        let job = self.job;
        let mut item = match job.push(node, slot, item, false, self.worker.sched()) {
            Ok(()) => return Ok(()),
            Err(item) => item,
        };
        let shared = &job.shared;
        shared.pool.enter_blocked();
        let _blocked = scopeguard(|| shared.pool.leave_blocked());
        let mut stalled_before = false;
        loop {
            if job.halted() {
                job.dead_letter_undelivered(
                    node,
                    slot,
                    item,
                    format!("job halted while `{}` waited for queue space", self.routine_id()),
                );
                return Err(EmitError::JobHalted {
                    job: job.id,
                    routine: self.routine_id().to_owned(),
                });
            }
            if self.worker.help_once() {
                stalled_before = false;
            } else if shared.stalled() {
                if stalled_before {
                    let r = &job.flow.routines[node];
                    tracing::debug!(
                        job = %job.id,
                        routine = %r.id,
                        slot = %r.slot_names[slot],
                        "pool stalled on a full slot; overrunning its bound by one item"
                    );
                    let _ = job.push(node, slot, item, true, self.worker.sched());
                    return Ok(());
                }
                stalled_before = true;
                shared.pool.wait_progress(Duration::from_micros(200));
            } else {
                stalled_before = false;
                shared.pool.wait_progress(Duration::from_millis(1));
            }
            item = match job.push(node, slot, item, false, self.worker.sched()) {
                Ok(()) => return Ok(()),
                Err(item) => item,
            };
        }
    }
}

struct ScopeGuard<F: FnMut()>(F);

impl<F: FnMut()> Drop for ScopeGuard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn scopeguard<F: FnMut()>(f: F) -> ScopeGuard<F> {
    ScopeGuard(f)
}
