//! Jobs: one execution of a flow, with its own queues, state, counters, errors and dead letters.
//!
//! # Completion (why a job finishes by itself, and only when it should)
//!
//! A job keeps one atomic `pending` count of every reason it may still do work:
//!
//! - a scheduled check task (+1 when a routine is marked `scheduled`, −1 when the task ends);
//! - an armed timer entry (`time_interval` wake-up or delayed retry);
//! - a hold: a `post` in progress, or an [`InputHold`](crate::InputHold) kept by a caller.
//!
//! A running activation always sits inside a check or retry task, so it is covered. Items only
//! change places under a routine's queue lock, and every change that could let a policy fire
//! (an item arriving, an activation ending, a timer ending) either schedules a check or happens
//! inside a task that checks again before it ends. Hence: **when `pending` drops to zero, no
//! queued item can activate and nothing runs** — the job is quiescent and finishes. Items left
//! in queues then (a partial batch) are reported as `queued`, never dropped.
//!
//! The transition to finished happens under the job's lifecycle lock after re-reading
//! `pending`; a post first takes a hold and then checks `finished` under the same lock, so a
//! post either lands in a live job or is refused with `JobFinished` — never lost in between.
//! A job that never received input has never had `pending` fall to zero: it stays running until
//! it gets input or is cancelled.
//!
//! # Accounting
//!
//! Per routine: `items_in = processed + dead_lettered + queued` once the job has finished
//! (while it runs, items in flight make up the difference).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::activation::{Batch, Decision};
use crate::budget::{Meter, bytes, cut};
use crate::context::Context;
use crate::flow::CompiledFlow;
use crate::item::Item;
use crate::routine::{ErrorStrategy, Exhausted, RoutineError};
use crate::runtime::Shared;
use crate::scheduler::{Sched, Task, WorkerLocal};
use crate::state::State;

/// How far past its bound (in items) a slot may be overrun to break a wait that could never
/// end (a cycle, a stalled pool), when the bound itself is smaller: enough for the nesting of
/// blocked emitters, not for a routine that multiplies items in a loop.
pub(crate) const OVERRUN_ITEMS: usize = 1024;

/// The chunk in which a slot reserves bytes on its job's memory meter: one shared atomic
/// operation per this many bytes queued, not one per item (the meter over-counts by at most
/// about two chunks per slot).
const CREDIT_CHUNK: u64 = 64 << 10;

/// How many activation failures a job keeps in its report (every one is counted in its
/// routine's `errors`, and its items kept as a dead letter).
pub(crate) const MAX_KEPT_FAILURES: usize = 1_000;

/// How many failed activations of one routine are logged as warnings (the rest at debug).
const LOGGED_FAILURES: u64 = 5;

/// How many activations a check runs back to back before yielding its worker.
const MAX_ROUNDS: u32 = 64;

/// A job's identity, unique within a runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job-{}", self.0)
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepting input and running activations.
    Running,
    /// Became quiescent with no routine failing under `stop`.
    Completed,
    /// A routine failed under `stop` (or exhausted retries that then stop).
    Failed,
    /// Cancelled by the caller or by runtime shutdown.
    Cancelled,
    /// Stopped: it took no more input and started no new activation, the running ones
    /// ended ([`JobHandle::stop`](crate::JobHandle::stop); `routilux run` on a first Ctrl-C
    /// or SIGTERM). Queued items stay queued.
    Stopped,
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Stopped => "stopped",
        })
    }
}

const RUNNING: u8 = 0;
const FAILED: u8 = 1;
const CANCELLED: u8 = 2;
/// No new input or activation; running activations end normally (they may still emit).
const STOPPED: u8 = 3;

/// Items of an activation that did not succeed, kept with the reason.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The routine whose activation failed.
    pub routine: String,
    /// The items it had been given, by slot.
    pub items: BTreeMap<String, Vec<Item>>,
    /// Why they were not processed.
    pub error: String,
    /// How many times the logic ran on them.
    pub attempts: u32,
    /// How many outputs the failed activation had already delivered downstream before it
    /// failed (a streaming routine's: a retrying routine's attempt delivers nothing until it
    /// succeeds, so it is 0 there).
    #[serde(default)]
    pub delivered: u64,
    /// When they were dead-lettered.
    pub at: SystemTime,
}

impl DeadLetter {
    /// How many items this dead letter holds.
    pub fn len(&self) -> usize {
        self.items.values().map(Vec::len).sum()
    }

    /// Whether it holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An activation failure that the routine's strategy reported (`stop`, `continue`, or retries
/// exhausted into one of them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActivationFailure {
    /// The routine.
    pub routine: String,
    /// The error's message.
    pub error: String,
    /// Whether the error said a retry could help.
    pub retryable: bool,
    /// How many times the logic ran.
    pub attempts: u32,
    /// The strategy that handled it (`stop`, `continue`, `retry`).
    pub strategy: String,
    /// When it happened.
    pub at: SystemTime,
}

/// A line a routine logged during a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputLine {
    /// The routine that logged it.
    pub routine: String,
    /// `trace`, `debug`, `info`, `warn` or `error` (or `stdout`/`stderr` for guest output).
    pub level: String,
    /// The text.
    pub message: String,
}

/// Counters of one routine within one job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutineCounters {
    /// Activations run (every attempt counts).
    pub activations: u64,
    /// Items delivered into the routine's slots.
    pub items_in: u64,
    /// Items the routine emitted (for a retrying routine: those of its attempts that
    /// succeeded, the only ones released).
    pub items_out: u64,
    /// Items consumed by successful activations.
    pub processed: u64,
    /// Failed attempts (before any retry).
    pub failures: u64,
    /// Failures reported under `stop` or `continue`.
    pub errors: u64,
    /// Failures skipped under `skip`.
    pub skipped: u64,
    /// Retries run.
    pub retries: u64,
    /// Items kept as dead letters.
    pub dead_lettered: u64,
    /// Items accepted beyond a slot's bound to break a stall (see the scheduler docs).
    pub overflowed: u64,
    /// Items still queued.
    pub queued: u64,
    /// Time spent in logic, in microseconds.
    pub busy_us: u64,
}

#[derive(Default)]
struct Counters {
    activations: AtomicU64,
    items_out: AtomicU64,
    processed: AtomicU64,
    failures: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    overflowed: AtomicU64,
    busy_ns: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Queues {
    slots: Vec<VecDeque<Item>>,
    /// Bytes (of items' JSON text) queued in each slot.
    bytes: Vec<u64>,
    /// Bytes each slot holds reserved on the job's meter: reserved and given back in chunks
    /// (see [`CREDIT_CHUNK`]), so a delivery touches the shared meter once every many items.
    credit: Vec<u64>,
    /// Items ever pushed (kept under the lock: one atomic less per delivery).
    items_in: u64,
    running: usize,
    scheduled: bool,
    timer_armed: bool,
    last_fire: Option<Instant>,
    /// Activations formed so far (each batch released gets the next number).
    formed: u64,
}

pub(crate) struct Node {
    queues: Mutex<Queues>,
    counters: Counters,
    pub(crate) state: Mutex<State>,
}

struct Lifecycle {
    finished: bool,
    status: JobStatus,
    failure: Option<String>,
    finished_at: Option<Instant>,
}

/// What a blocked emitter's attempt to run the full slot's routine achieved.
#[derive(Debug)]
pub(crate) enum Help {
    /// It ran at least one activation of the routine: there may be room now.
    Ran,
    /// The routine is running (elsewhere, or under us on this stack): wait for it.
    Busy,
    /// The routine is idle but its policy releases nothing.
    CannotFire,
    /// This stack is nested too deep to run it here.
    TooDeep,
}

/// Outcome of running an activation.
enum Outcome {
    /// Finished (succeeded, or failed and was handled); its `running` slot is to be released.
    Done,
    /// A retry is armed on the timer and keeps the `running` slot.
    Deferred,
}

/// What to do with a failed batch once the strategy is decided.
#[derive(Clone, Copy)]
enum Action {
    Stop,
    Continue,
    Skip,
}

pub(crate) struct Job {
    pub(crate) id: JobId,
    pub(crate) flow_name: Arc<str>,
    pub(crate) flow: Arc<CompiledFlow>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) nodes: Box<[Node]>,
    pending: AtomicUsize,
    control: AtomicU8,
    lifecycle: Mutex<Lifecycle>,
    done: Condvar,
    failures: Mutex<Vec<ActivationFailure>>,
    dead_letters: Mutex<DeadLetters>,
    output: Mutex<OutputRing>,
    /// Bytes the job holds against its memory budget (guests, queues, retention).
    pub(crate) meter: Arc<Meter>,
    pub(crate) started: Instant,
}

/// The dead letters a job keeps, within its budgets; the rest are counted.
#[derive(Default)]
struct DeadLetters {
    kept: Vec<DeadLetter>,
    /// Bytes of items the kept letters hold.
    bytes: u64,
    /// Letters (and their items) past the budget: counted, not kept.
    dropped: u64,
    dropped_items: u64,
}

/// The output a job keeps: the latest lines, within its budgets (the rest streamed only).
#[derive(Default)]
struct OutputRing {
    lines: VecDeque<OutputLine>,
    bytes: u64,
    /// Lines no longer kept (the oldest go first).
    dropped: u64,
}

/// What a job kept and what its budgets made it let go (for its summary).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Retention {
    pub(crate) dead_letters_kept: u64,
    pub(crate) dead_letters_dropped: u64,
    pub(crate) dead_letter_items_dropped: u64,
    pub(crate) output_lines_dropped: u64,
    pub(crate) peak_memory: u64,
}

impl Job {
    pub(crate) fn new(
        id: JobId,
        flow_name: &str,
        flow: Arc<CompiledFlow>,
        shared: Arc<Shared>,
    ) -> Self {
        let nodes = flow
            .routines
            .iter()
            .map(|r| Node {
                queues: Mutex::new(Queues {
                    slots: r.capacities.iter().map(|_| VecDeque::new()).collect(),
                    bytes: vec![0; r.capacities.len()],
                    credit: vec![0; r.capacities.len()],
                    items_in: 0,
                    running: 0,
                    scheduled: false,
                    timer_armed: false,
                    last_fire: None,
                    formed: 0,
                }),
                counters: Counters::default(),
                state: Mutex::new(State::default()),
            })
            .collect();
        let meter = Arc::new(Meter::new(flow.budgets.memory));
        Self {
            id,
            flow_name: flow_name.into(),
            flow,
            shared,
            nodes,
            pending: AtomicUsize::new(0),
            control: AtomicU8::new(RUNNING),
            lifecycle: Mutex::new(Lifecycle {
                finished: false,
                status: JobStatus::Running,
                failure: None,
                finished_at: None,
            }),
            done: Condvar::new(),
            failures: Mutex::new(Vec::new()),
            dead_letters: Mutex::new(DeadLetters::default()),
            output: Mutex::new(OutputRing::default()),
            meter,
            started: Instant::now(),
        }
    }

    // ---- lifecycle -------------------------------------------------------------------------

    /// Whether the job failed or was cancelled: nothing more runs, running guests are
    /// interrupted, waiting emits give up.
    pub(crate) fn halted(&self) -> bool {
        matches!(self.control.load(Ordering::Acquire), FAILED | CANCELLED)
    }

    /// Whether the job takes no new input and starts no new activation: halted, or stopped
    /// (whose running activations end normally).
    pub(crate) fn stopping(&self) -> bool {
        self.control.load(Ordering::Acquire) != RUNNING
    }

    pub(crate) fn status(&self) -> JobStatus {
        let lc = self.lifecycle.lock();
        if lc.finished {
            return lc.status;
        }
        match self.control.load(Ordering::Acquire) {
            FAILED => JobStatus::Failed,
            CANCELLED => JobStatus::Cancelled,
            STOPPED => JobStatus::Stopped,
            _ => JobStatus::Running,
        }
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.lifecycle.lock().failure.clone()
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.lifecycle.lock().finished
    }

    pub(crate) fn wall_time(&self) -> Duration {
        let lc = self.lifecycle.lock();
        lc.finished_at.unwrap_or_else(Instant::now) - self.started
    }

    /// Takes a hold: the job cannot finish until [`Job::release`]. Fails on a finished or
    /// halted job.
    pub(crate) fn hold(&self) -> Result<(), crate::RuntimeError> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let lc = self.lifecycle.lock();
        if lc.finished {
            drop(lc);
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(crate::RuntimeError::JobFinished { job: self.id });
        }
        drop(lc);
        if self.stopping() {
            self.release();
            return Err(crate::RuntimeError::JobHalted {
                job: self.id,
                status: self.status(),
            });
        }
        Ok(())
    }

    pub(crate) fn add_pending(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
    }

    /// Releases one pending count; the last one finishes the job.
    pub(crate) fn release(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.try_finish();
        }
    }

    fn try_finish(&self) {
        let mut lc = self.lifecycle.lock();
        if lc.finished || self.pending.load(Ordering::SeqCst) != 0 {
            return;
        }
        lc.finished = true;
        lc.finished_at = Some(Instant::now());
        lc.status = match self.control.load(Ordering::Acquire) {
            FAILED => JobStatus::Failed,
            CANCELLED => JobStatus::Cancelled,
            STOPPED => JobStatus::Stopped,
            _ => JobStatus::Completed,
        };
        tracing::debug!(job = %self.id, status = %lc.status, "job finished");
        drop(lc);
        for r in &self.flow.routines {
            r.logic.job_finished(self.id);
        }
        self.done.notify_all();
        self.shared.job_finished();
    }

    /// Takes no more input and starts no new activation; running activations end normally
    /// (an emit of theirs into a full slot overruns it, boundedly, as nothing will drain it),
    /// armed retries become dead letters. Returns false if the job had already halted or
    /// stopped.
    pub(crate) fn stop(&self) -> bool {
        if self.is_finished() {
            return false;
        }
        let changed = self
            .control
            .compare_exchange(RUNNING, STOPPED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if changed {
            self.pending.fetch_add(1, Ordering::SeqCst);
            self.disarm_timers("job stopped");
            self.shared.pool.notify_progress();
            self.release();
        }
        changed
    }

    /// Stops scheduling and interrupts running guests; finishes once in-flight work drains.
    /// Returns false if already failed or cancelled (a stopped job can still be cancelled).
    pub(crate) fn cancel(&self) -> bool {
        if self.is_finished() {
            return false;
        }
        let changed = [RUNNING, STOPPED].into_iter().any(|from| {
            self.control
                .compare_exchange(from, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if changed {
            self.pending.fetch_add(1, Ordering::SeqCst);
            self.disarm_timers("job cancelled");
            self.shared.pool.notify_progress();
            // A job with nothing else pending (never given input) finishes now.
            self.release();
        }
        changed
    }

    /// A halted job need not wait for its timers: `time_interval` wake-ups have nothing to
    /// release any more, and a pending retry's items become a dead letter now.
    fn disarm_timers(&self, why: &str) {
        for task in self.shared.timer.take_job(self) {
            task.abandon(why);
        }
    }

    fn fail(&self, reason: String) {
        if [RUNNING, STOPPED].into_iter().any(|from| {
            self.control
                .compare_exchange(from, FAILED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }) {
            self.lifecycle.lock().failure = Some(reason);
            self.disarm_timers("job failed");
            self.shared.pool.notify_progress();
        }
    }

    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        // A timeout too long to represent means "no deadline".
        let deadline = Instant::now().checked_add(timeout);
        let mut lc = self.lifecycle.lock();
        while !lc.finished {
            match deadline {
                Some(d) => {
                    if self.done.wait_until(&mut lc, d).timed_out() {
                        return lc.finished;
                    }
                }
                None => self.done.wait(&mut lc),
            }
        }
        true
    }

    // ---- data path -------------------------------------------------------------------------

    /// The byte budget of `node.slot` if an item of `len` bytes is larger than all of it
    /// (so it could never be queued there, however long one waits).
    pub(crate) fn too_large_for(&self, node: usize, slot: usize, len: u64) -> Option<u64> {
        let budget = self.flow.routines[node].queue_bytes[slot];
        (len > budget).then_some(budget)
    }

    /// Queues `item` into `node.slot`. A full slot (by count, by bytes, or with the job's
    /// memory budget spent) gives the item back, unless `overrun`; an overrun goes past the
    /// bounds only so far (by the slot's bound again or [`OVERRUN_ITEMS`], whichever is more,
    /// and by its byte budget again) and then gives the item back too. Never takes an item larger than the slot's whole byte budget
    /// (callers check [`Job::too_large_for`] first).
    pub(crate) fn push(
        self: &Arc<Self>,
        node: usize,
        slot: usize,
        item: Item,
        overrun: bool,
        sched: Sched<'_>,
    ) -> Result<(), Item> {
        let r = &self.flow.routines[node];
        let n = &self.nodes[node];
        let len = item.byte_len() as u64;
        let schedule = {
            let mut q = n.queues.lock();
            let (cap, budget) = (r.capacities[slot], r.queue_bytes[slot]);
            let (count, held) = (q.slots[slot].len(), q.bytes[slot]);
            if len > budget {
                return Err(item);
            }
            let full = count >= cap || held + len > budget;
            let need = (held + len).saturating_sub(q.credit[slot]);
            if !full && (need == 0 || self.reserve_credit(&mut q, slot, need)) {
                // Within every bound.
            } else if !overrun
                || count >= cap.saturating_add(cap.max(OVERRUN_ITEMS))
                || held + len > budget.saturating_mul(2)
            {
                return Err(item);
            } else {
                add(&n.counters.overflowed, 1);
                self.meter.force(need);
                q.credit[slot] += need;
            }
            q.slots[slot].push_back(item);
            q.bytes[slot] += len;
            q.items_in += 1;
            let s = !q.scheduled
                && !q.timer_armed
                && q.running < r.concurrency
                && !self.stopping()
                && r.policy.may_fire(&q.slots);
            if s {
                q.scheduled = true;
            }
            s
        };
        if schedule {
            self.add_pending();
            sched.schedule(Task::Check {
                job: self.clone(),
                node,
            });
        }
        Ok(())
    }

    /// Reserves at least `need` more bytes for `slot` on the meter (a whole chunk when there
    /// is room for one); false if the job's budget has no room for `need`.
    fn reserve_credit(&self, q: &mut Queues, slot: usize, need: u64) -> bool {
        let chunk = need.max(CREDIT_CHUNK);
        let got = if self.meter.reserve(chunk) {
            chunk
        } else if self.meter.reserve(need) {
            need
        } else {
            return false;
        };
        q.credit[slot] += got;
        true
    }

    /// Gives back what `slot` holds reserved beyond its queued bytes and one chunk.
    fn return_credit(&self, q: &mut Queues, slot: usize) {
        let spare = q.credit[slot].saturating_sub(q.bytes[slot]);
        if spare > 2 * CREDIT_CHUNK {
            let give = spare - CREDIT_CHUNK;
            q.credit[slot] -= give;
            self.meter.release(give);
        }
    }

    /// Whether an item of `len` bytes would find room in `node.slot` now (within the slot's
    /// bounds and the job's memory budget).
    fn has_room(&self, q: &Queues, node: usize, slot: usize, len: u64) -> bool {
        let r = &self.flow.routines[node];
        let need = (q.bytes[slot] + len).saturating_sub(q.credit[slot]);
        q.slots[slot].len() < r.capacities[slot]
            && q.bytes[slot] + len <= r.queue_bytes[slot]
            && self.meter.used().saturating_add(need) <= self.meter.limit()
    }

    /// Waits up to `timeout` for room in `node.slot` and queues the item in `pending` there;
    /// returns whether it did (if not, the item is back in `pending`). No wake-up is lost: the
    /// retry runs with the waiter registered (see `Pool::wait_unless`).
    pub(crate) fn push_or_wait(
        self: &Arc<Self>,
        node: usize,
        slot: usize,
        pending: &mut Option<Item>,
        sched: Sched<'_>,
        timeout: Duration,
    ) -> bool {
        self.shared.pool.wait_unless(timeout, || {
            let Some(item) = pending.take() else {
                return true;
            };
            match self.push(node, slot, item, false, sched) {
                Ok(()) => true,
                Err(back) => {
                    *pending = Some(back);
                    false
                }
            }
        })
    }

    /// A check task: run `node` while its policy releases batches.
    pub(crate) fn run_check(self: &Arc<Self>, node: usize, from_timer: bool, w: &WorkerLocal) {
        {
            let mut q = self.nodes[node].queues.lock();
            if from_timer {
                q.timer_armed = false;
            } else {
                q.scheduled = false;
            }
        }
        let _ = self.drive(node, false, w);
        self.release();
    }

    /// A retry task: run the batch again, then go on as a check.
    pub(crate) fn run_retry(
        self: &Arc<Self>,
        node: usize,
        batch: Batch,
        attempt: u32,
        w: &WorkerLocal,
    ) {
        let outcome = if self.stopping() {
            self.dead_letter(
                node,
                batch,
                "job halted before the retry ran".into(),
                attempt,
            );
            Outcome::Done
        } else {
            self.activate(node, batch, attempt, w)
        };
        if let Outcome::Done = outcome {
            let _ = self.drive(node, true, w);
        }
        self.release();
    }

    /// Shutdown dropped a retry before it ran: keep its items, free its `running` slot.
    pub(crate) fn abandon_retry(&self, node: usize, batch: Batch, why: &str) {
        self.dead_letter(node, batch, format!("{why} before the retry ran"), 0);
        self.nodes[node].queues.lock().running -= 1;
        self.release();
    }

    /// Runs activations of `node` while its policy releases batches; returns whether it ran
    /// any. `holding`: the caller owns one `running` slot from an activation that just ended.
    fn drive(self: &Arc<Self>, node: usize, mut holding: bool, w: &WorkerLocal) -> bool {
        let r = &self.flow.routines[node];
        let n = &self.nodes[node];
        let mut ran = false;
        for round in 0.. {
            let freed_full;
            let batch = {
                let mut q = n.queues.lock();
                if std::mem::take(&mut holding) {
                    q.running -= 1;
                }
                if self.stopping() || q.running >= r.concurrency {
                    return ran;
                }
                if round == MAX_ROUNDS {
                    // Yield the worker: others' tasks wait behind us. Continue as a new task.
                    if !q.scheduled && q.slots.iter().any(|s| !s.is_empty()) {
                        q.scheduled = true;
                        drop(q);
                        self.add_pending();
                        w.sched().schedule(Task::Check {
                            job: self.clone(),
                            node,
                        });
                    }
                    return ran;
                }
                let now = Instant::now();
                match r.policy.decide(&r.slot_names, &q.slots, q.last_fire, now) {
                    Decision::Idle => return ran,
                    Decision::Broken(reason) => {
                        drop(q);
                        self.policy_broken(node, reason);
                        return ran;
                    }
                    Decision::WaitUntil(at) => {
                        if !q.timer_armed {
                            q.timer_armed = true;
                            drop(q);
                            self.add_pending();
                            self.shared.timer.schedule(
                                at,
                                Task::TimerCheck {
                                    job: self.clone(),
                                    node,
                                },
                            );
                        }
                        return ran;
                    }
                    Decision::Fire(counts, message) => {
                        q.running += 1;
                        holding = true;
                        q.last_fire = Some(now);
                        // A producer can only be waiting on a slot that was full: at its
                        // count, or within one largest item of its byte budget.
                        freed_full = counts.iter().enumerate().any(|(i, &k)| {
                            k > 0
                                && (q.slots[i].len() >= r.capacities[i]
                                    || q.bytes[i]
                                        >= r.queue_bytes[i].saturating_sub(r.budgets.item_bytes))
                        });
                        let mut data: Vec<Vec<Item>> = Vec::with_capacity(counts.len());
                        for (i, &k) in counts.iter().enumerate() {
                            let mut items = Vec::with_capacity(k);
                            let mut b = 0;
                            for it in q.slots[i].drain(..k) {
                                b += it.byte_len() as u64;
                                items.push(it);
                            }
                            if k > 0 {
                                q.bytes[i] -= b;
                                self.return_credit(&mut q, i);
                            }
                            data.push(items);
                        }
                        // Room for a parallel activation and more to release: let another
                        // worker take it.
                        if q.running < r.concurrency
                            && !q.scheduled
                            && q.slots.iter().any(|s| !s.is_empty())
                            && r.policy.may_fire(&q.slots)
                        {
                            q.scheduled = true;
                            self.add_pending();
                            w.sched().schedule(Task::Check {
                                job: self.clone(),
                                node,
                            });
                        }
                        // Activations are numbered per routine as they are formed; a retry of
                        // one keeps its number (the stable activation id a guest can read).
                        q.formed += 1;
                        Batch::new(
                            r.slot_names.clone(),
                            data,
                            message.or_else(|| r.message.clone()),
                        )
                        .numbered(q.formed)
                    }
                }
            };
            ran = true;
            self.shared.pool.record_progress(freed_full);
            if let Outcome::Deferred = self.activate(node, batch, 0, w) {
                return ran;
            }
        }
        ran
    }

    /// A worker blocked on a full slot of `node` tries to run `node` itself (nested on its
    /// stack). In an acyclic flow the consumer is downstream of every frame below it, so it
    /// can never wait on them: this is how backpressure makes progress without inverting
    /// dependencies.
    pub(crate) fn help_consumer(
        self: &Arc<Self>,
        node: usize,
        slot: usize,
        len: u64,
        w: &WorkerLocal,
    ) -> Help {
        let r = &self.flow.routines[node];
        {
            let q = self.nodes[node].queues.lock();
            if q.running >= r.concurrency {
                return Help::Busy;
            }
        }
        match w.nested(|| self.drive(node, false, w)) {
            Some(true) => return Help::Ran,
            None => return Help::TooDeep,
            Some(false) => {}
        }
        // It did not run: someone else drained the slot meanwhile, it started elsewhere, or
        // its policy really releases nothing.
        let q = self.nodes[node].queues.lock();
        if self.has_room(&q, node, slot, len) {
            Help::Ran
        } else if q.running >= r.concurrency {
            Help::Busy
        } else {
            Help::CannotFire
        }
    }

    /// Runs the logic on `batch` (retrying inline when the delay is zero) and applies the
    /// routine's error strategy.
    fn activate(
        self: &Arc<Self>,
        node: usize,
        batch: Batch,
        first_attempt: u32,
        w: &WorkerLocal,
    ) -> Outcome {
        let r = &self.flow.routines[node];
        let c = &self.nodes[node].counters;
        let mut attempt = first_attempt;
        loop {
            let span = tracing::debug_span!(
                "activation",
                job = %self.id,
                routine = %r.id,
                items = batch.len(),
                attempt
            );
            let _enter = span.enter();
            // A retrying routine's attempt is a unit: its emits and state changes are held
            // until it succeeds. Other routines stream.
            let ctx = if matches!(r.on_error, ErrorStrategy::Retry(_)) {
                Context::attempt(self.clone(), node)
            } else {
                Context::new(self.clone(), node)
            }
            .numbered(batch.number());
            let started = Instant::now();
            w.enter(self, node);
            let result = panic::catch_unwind(AssertUnwindSafe(|| r.logic.activate(&ctx, &batch)));
            let result = result.unwrap_or_else(|payload| {
                Err(RoutineError::fatal(format!(
                    "logic panicked: {}",
                    panic_message(payload.as_ref())
                )))
            });
            // Output past the activation's budget was not kept: the activation fails.
            let result = match (result, ctx.output_overflow()) {
                (Ok(()), Some(e)) => Err(e),
                (r, _) => r,
            };
            // A successful attempt's held effects are applied and delivered now (still on
            // this stack: a delivery into a cycle sees the routine as running here); a failed
            // one's are dropped.
            let result = match result {
                Ok(()) => ctx.commit_attempt(),
                Err(e) => {
                    ctx.discard_attempt();
                    Err(e)
                }
            };
            w.exit();
            let result = result.map_err(|mut e| {
                e.message = cut(e.message, self.flow.budgets.error_bytes);
                e
            });
            add(&c.busy_ns, started.elapsed().as_nanos() as u64);
            add(&c.activations, 1);
            let err = match result {
                Ok(()) => {
                    add(&c.processed, batch.len() as u64);
                    return Outcome::Done;
                }
                Err(e) => e,
            };
            let delivered = ctx.progress().delivered.load(Ordering::Relaxed);
            if self.halted() {
                // The job failed or was cancelled under this activation (an emit was refused,
                // a guest was stopped): keep the items, but it is not the routine's fault, so
                // no error is charged to it.
                self.dead_letter_with(
                    node,
                    batch,
                    format!("job {}: {}", self.status(), err.message),
                    attempt + 1,
                    delivered,
                );
                return Outcome::Done;
            }
            add(&c.failures, 1);
            let action = match &r.on_error {
                ErrorStrategy::Retry(p) if err.retryable && attempt < p.max && !self.stopping() => {
                    attempt += 1;
                    add(&c.retries, 1);
                    let delay = p.delay_before(attempt);
                    tracing::debug!(job = %self.id, routine = %r.id, error = %err, attempt, ?delay, "retrying");
                    if delay.is_zero() {
                        continue;
                    }
                    self.add_pending();
                    self.shared.timer.schedule(
                        Instant::now() + delay, // at most a day: `delay_before` caps it
                        Task::Retry {
                            job: self.clone(),
                            node,
                            batch,
                            attempt,
                        },
                    );
                    return Outcome::Deferred;
                }
                ErrorStrategy::Retry(p) => match p.then {
                    Exhausted::Stop => Action::Stop,
                    Exhausted::Continue => Action::Continue,
                    Exhausted::Skip => Action::Skip,
                },
                ErrorStrategy::Stop => Action::Stop,
                ErrorStrategy::Continue => Action::Continue,
                ErrorStrategy::Skip => Action::Skip,
            };
            self.handle_failure(node, batch, err, attempt + 1, action, delivered);
            return Outcome::Done;
        }
    }

    fn handle_failure(
        &self,
        node: usize,
        batch: Batch,
        err: RoutineError,
        attempts: u32,
        action: Action,
        delivered: u64,
    ) {
        let r = &self.flow.routines[node];
        let c = &self.nodes[node].counters;
        let strategy = match (&r.on_error, action) {
            (ErrorStrategy::Retry(_), _) => "retry",
            (_, Action::Stop) => "stop",
            (_, Action::Continue) => "continue",
            (_, Action::Skip) => "skip",
        };
        match action {
            Action::Skip => {
                add(&c.skipped, 1);
                tracing::debug!(job = %self.id, routine = %r.id, error = %err, "activation skipped");
            }
            Action::Continue | Action::Stop => {
                let n = c.errors.fetch_add(1, Ordering::Relaxed) + 1;
                // The first few failures of a routine are warnings; the rest (a flood of
                // them) are counted in the summary and logged at debug level.
                if n <= LOGGED_FAILURES {
                    tracing::warn!(job = %self.id, routine = %r.id, error = %err, attempts, strategy, "activation failed");
                    if n == LOGGED_FAILURES {
                        tracing::warn!(job = %self.id, routine = %r.id, "further failures of this routine are logged at debug level");
                    }
                } else {
                    tracing::debug!(job = %self.id, routine = %r.id, error = %err, attempts, strategy, "activation failed");
                }
                let mut failures = self.failures.lock();
                // Kept within a bound (each routine's `errors` counts them all).
                if failures.len() < MAX_KEPT_FAILURES {
                    failures.push(ActivationFailure {
                        routine: r.id.to_string(),
                        error: err.message.clone(),
                        retryable: err.retryable,
                        attempts,
                        strategy: strategy.to_owned(),
                        at: SystemTime::now(),
                    });
                }
            }
        }
        let message = err.message.clone();
        self.dead_letter_with(node, batch, err.message, attempts, delivered);
        if let Action::Stop = action {
            self.fail(format!("routine `{}` failed: {message}", r.id));
        }
    }

    /// A routine's policy failed: nothing of it can run any more, so the job fails (its
    /// queued items stay queued and are reported).
    fn policy_broken(&self, node: usize, reason: String) {
        let r = &self.flow.routines[node];
        add(&self.nodes[node].counters.errors, 1);
        tracing::error!(job = %self.id, routine = %r.id, "{reason}");
        self.failures.lock().push(ActivationFailure {
            routine: r.id.to_string(),
            error: reason.clone(),
            retryable: false,
            attempts: 0,
            strategy: "stop".to_owned(),
            at: SystemTime::now(),
        });
        self.fail(format!("routine `{}`: {reason}", r.id));
    }

    /// Keeps `batch` as a dead letter: handed to the runtime's dead-letter sink (if any),
    /// and kept on the job within its dead-letter budgets and its memory budget; past them,
    /// counted and not kept.
    pub(crate) fn dead_letter(&self, node: usize, batch: Batch, error: String, attempts: u32) {
        self.dead_letter_with(node, batch, error, attempts, 0);
    }

    /// [`Job::dead_letter`] of a failed activation that had delivered `delivered` outputs.
    pub(crate) fn dead_letter_with(
        &self,
        node: usize,
        batch: Batch,
        error: String,
        attempts: u32,
        delivered: u64,
    ) {
        let r = &self.flow.routines[node];
        let n = batch.len() as u64;
        let (names, data) = batch.into_parts();
        let size: u64 = data.iter().flatten().map(|i| i.byte_len() as u64).sum();
        let items = names
            .iter()
            .zip(data)
            .filter(|(_, d)| !d.is_empty())
            .map(|(s, d)| (s.to_string(), d))
            .collect();
        add(&self.nodes[node].counters.dead_lettered, n);
        let letter = DeadLetter {
            routine: r.id.to_string(),
            items,
            error: cut(error, self.flow.budgets.error_bytes),
            attempts,
            delivered,
            at: SystemTime::now(),
        };
        if let Some(sink) = &self.shared.on_dead_letter {
            sink(self.id, &letter);
        }
        let budgets = &self.flow.budgets;
        let mut store = self.dead_letters.lock();
        if store.kept.len() < budgets.dead_letters
            && store.bytes + size <= budgets.dead_letter_bytes
            && self.meter.reserve(size)
        {
            store.bytes += size;
            store.kept.push(letter);
        } else {
            store.dropped += 1;
            store.dropped_items += n;
            if store.dropped == 1 {
                tracing::warn!(
                    job = %self.id,
                    "dead letters past the job's budget ({} letters, {}) are counted, not kept",
                    budgets.dead_letters,
                    bytes(budgets.dead_letter_bytes)
                );
            }
        }
    }

    /// An emitted item that could not be delivered because the job halted while it waited.
    pub(crate) fn dead_letter_undelivered(
        &self,
        node: usize,
        slot: usize,
        item: Item,
        error: String,
    ) {
        let r = &self.flow.routines[node];
        self.nodes[node].queues.lock().items_in += 1;
        let batch = Batch::from_slots([(&*r.slot_names[slot], vec![item])], None);
        self.dead_letter(node, batch, error, 0);
    }

    pub(crate) fn count_emit(&self, node: usize) {
        add(&self.nodes[node].counters.items_out, 1);
    }

    pub(crate) fn log(&self, node: usize, level: &str, message: String) {
        let line = OutputLine {
            routine: self.flow.routines[node].id.to_string(),
            level: level.to_owned(),
            message,
        };
        if let Some(f) = &self.shared.on_output {
            f(self.id, &line);
        }
        // Streamed already: only the latest lines are kept, within the job's budgets.
        let budgets = &self.flow.budgets;
        let size = line_bytes(&line);
        let mut ring = self.output.lock();
        ring.lines.push_back(line);
        ring.bytes += size;
        while ring.lines.len() > budgets.output_lines || ring.bytes > budgets.output_bytes {
            let Some(old) = ring.lines.pop_front() else {
                break;
            };
            ring.bytes -= line_bytes(&old);
            ring.dropped += 1;
        }
    }

    // ---- reports ---------------------------------------------------------------------------

    pub(crate) fn counters(&self) -> BTreeMap<String, RoutineCounters> {
        self.flow
            .routines
            .iter()
            .zip(self.nodes.iter())
            .map(|(r, n)| {
                let c = &n.counters;
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let (queued, items_in) = {
                    let q = n.queues.lock();
                    (q.slots.iter().map(VecDeque::len).sum::<usize>(), q.items_in)
                };
                (
                    r.id.to_string(),
                    RoutineCounters {
                        activations: get(&c.activations),
                        items_in,
                        items_out: get(&c.items_out),
                        processed: get(&c.processed),
                        failures: get(&c.failures),
                        errors: get(&c.errors),
                        skipped: get(&c.skipped),
                        retries: get(&c.retries),
                        dead_lettered: get(&c.dead_lettered),
                        overflowed: get(&c.overflowed),
                        queued: queued as u64,
                        busy_us: get(&c.busy_ns) / 1000,
                    },
                )
            })
            .collect()
    }

    pub(crate) fn failures(&self) -> Vec<ActivationFailure> {
        self.failures.lock().clone()
    }

    pub(crate) fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead_letters.lock().kept.clone()
    }

    pub(crate) fn output(&self) -> Vec<OutputLine> {
        self.output.lock().lines.iter().cloned().collect()
    }

    pub(crate) fn retention(&self) -> Retention {
        let (kept, dropped, dropped_items) = {
            let d = self.dead_letters.lock();
            (d.kept.len() as u64, d.dropped, d.dropped_items)
        };
        Retention {
            dead_letters_kept: kept,
            dead_letters_dropped: dropped,
            dead_letter_items_dropped: dropped_items,
            output_lines_dropped: self.output.lock().dropped,
            peak_memory: self.meter.peak(),
        }
    }

    pub(crate) fn queued_items(&self, node: usize) -> BTreeMap<String, Vec<Item>> {
        let r = &self.flow.routines[node];
        let q = self.nodes[node].queues.lock();
        r.slot_names
            .iter()
            .zip(&q.slots)
            .map(|(s, d)| (s.to_string(), d.iter().cloned().collect()))
            .collect()
    }
}

/// What a kept output line costs the job's output budget.
fn line_bytes(line: &OutputLine) -> u64 {
    (line.routine.len() + line.level.len() + line.message.len() + 64) as u64
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
