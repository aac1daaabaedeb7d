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
//! it gets input or is cancelled. (This protocol is `routilux_protocol::quiesce`, in a crate of
//! its own so that loom can check it against a model of a queue and its check tasks.)
//!
//! # Accounting
//!
//! Per routine: `items_in = processed + dead_lettered + left_in_store + queued` once the job
//! has finished (while it runs, items in flight make up the difference). `left_in_store` is
//! zero but for a durable job that halted: what an in-memory job dead-letters then, its store
//! keeps queued for a resume.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use routilux_protocol::quiesce::{self, Pending};

use crate::model::activation::Batch;
use crate::model::budget::{Meter, bytes, cut};
use crate::model::context::JobCore;
use crate::model::flow::Compiled;
use crate::model::item::Item;
use crate::model::report::{
    ActivationFailure, DeadLetter, JobId, JobStatus, OutputLine, RoutineCounters,
};
use crate::model::routine::Logic;
use crate::model::slots::Slots;
use crate::model::state::State;

use super::durable::{Durable, JobStore};
use super::queues::Queues;
use super::scheduler::Pool;
use super::store::{Op, Ticket};
use super::timer::Timer;

use crate::model::context::{CANCELLED, FAILED, RUNNING, STOPPED};

/// A callback receiving each line of job output as it is produced.
pub type OutputFn = Arc<dyn Fn(JobId, &OutputLine) + Send + Sync>;

/// A callback receiving each dead letter as it is made (before the job's budgets decide
/// whether it is also kept).
pub type DeadLetterFn = Arc<dyn Fn(JobId, &DeadLetter) + Send + Sync>;

/// What the pool, the timer and every job of a runtime share.
pub(crate) struct Shared {
    pub(crate) pool: Arc<Pool<Task>>,
    pub(crate) timer: Timer<Task>,
    pub(crate) on_output: Option<OutputFn>,
    pub(crate) on_dead_letter: Option<DeadLetterFn>,
    /// Set when shutdown begins: no new jobs, no new input.
    pub(crate) closed: AtomicBool,
    pub(crate) finished_gen: Mutex<u64>,
    pub(crate) finished_cv: Condvar,
    /// The memory quota each group's jobs share, by group (none: each job only within its
    /// own budget). Set with `Runtime::set_group_memory`.
    pub(crate) group_memory: Mutex<Vec<Option<Arc<Meter>>>>,
    /// The live-instance quota each group's jobs share, by group (none: only each routine's
    /// own cap). Set with `Runtime::set_group_instances`.
    pub(crate) group_instances: Mutex<Vec<Option<Arc<Slots>>>>,
    /// The quota of queued items each group's jobs share, by group (none: only each slot's
    /// own bound). Set with `Runtime::set_group_queued_items`.
    pub(crate) group_items: Mutex<Vec<Option<Arc<Meter>>>>,
    /// How long an emit waits for its group's memory quota (spent by the group's other
    /// jobs) before it fails: the runtime's post timeout, at most a minute.
    pub(crate) quota_wait: Duration,
}

impl Shared {
    /// The meter `group`'s jobs share, if it has one.
    pub(crate) fn group_meter(&self, group: usize) -> Option<Arc<Meter>> {
        self.group_memory.lock().get(group).cloned().flatten()
    }

    /// Sets the memory quota of `group`'s jobs: made on first use (jobs started before then
    /// are not counted on it), its limit changed after.
    pub(crate) fn set_group_memory(&self, group: usize, limit: u64) {
        set_meter(&self.group_memory, group, limit);
    }

    /// The count of queued items `group`'s jobs share, if it has a quota of them.
    pub(crate) fn group_items(&self, group: usize) -> Option<Arc<Meter>> {
        self.group_items.lock().get(group).cloned().flatten()
    }

    /// Sets the quota of queued items of `group`'s jobs, as [`Shared::set_group_memory`].
    pub(crate) fn set_group_items(&self, group: usize, limit: u64) {
        set_meter(&self.group_items, group, limit);
    }

    /// The live-instance quota `group`'s jobs share, if it has one.
    pub(crate) fn group_slots(&self, group: usize) -> Option<Arc<Slots>> {
        self.group_instances.lock().get(group).cloned().flatten()
    }

    /// Sets the live-instance quota of `group`'s jobs: made on first use (jobs started before
    /// then are not counted on it), its limit changed after.
    pub(crate) fn set_group_instances(&self, group: usize, limit: usize) {
        let mut all = self.group_instances.lock();
        if all.len() <= group {
            all.resize(group + 1, None);
        }
        match &all[group] {
            Some(s) => s.set_limit(limit),
            None => all[group] = Some(Arc::new(Slots::new(group, limit))),
        }
    }

    pub(crate) fn job_finished(&self) {
        *self.finished_gen.lock() += 1;
        self.finished_cv.notify_all();
    }

    /// No worker can make progress and no timer will bring any.
    pub(crate) fn stalled(&self) -> bool {
        self.timer.is_empty() && self.pool.stalled()
    }
}

/// Sets the limit of `group`'s meter in `meters`, making it on first use.
fn set_meter(meters: &Mutex<Vec<Option<Arc<Meter>>>>, group: usize, limit: u64) {
    let mut meters = meters.lock();
    if meters.len() <= group {
        meters.resize(group + 1, None);
    }
    match &meters[group] {
        Some(m) => m.set_limit(limit),
        None => meters[group] = Some(Arc::new(Meter::new(limit))),
    }
}

/// A unit of work for the pool (run by the run module, through the scheduler's `Run`).
pub(crate) enum Task {
    /// Check routine `node` of `job` and run it while its policy releases batches.
    Check { job: Arc<Job>, node: usize },
    /// A `time_interval` timer ended: as `Check`, and the routine's timer is disarmed.
    TimerCheck { job: Arc<Job>, node: usize },
    /// Run a failed batch again (retry number `attempt`).
    Retry {
        job: Arc<Job>,
        node: usize,
        batch: Batch,
        attempt: u32,
    },
    /// A blocked emitter runs the full slot's routine `node` nested on its own stack (never
    /// queued: it holds no pending count).
    Help { job: Arc<Job>, node: usize },
}

impl Task {
    /// The job the task belongs to.
    pub(crate) fn job(&self) -> &Arc<Job> {
        match self {
            Task::Check { job, .. }
            | Task::TimerCheck { job, .. }
            | Task::Retry { job, .. }
            | Task::Help { job, .. } => job,
        }
    }

    /// Drops the task without running it, releasing what it holds (its job halted, or the
    /// runtime is shutting down). A retry's items become a dead letter saying `why`.
    pub(crate) fn abandon(self, why: &str) {
        match self {
            Task::Check { job, .. } | Task::TimerCheck { job, .. } => job.release(),
            Task::Retry {
                job, node, batch, ..
            } => job.abandon_retry(node, batch, why),
            Task::Help { .. } => {}
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) activations: AtomicU64,
    pub(crate) items_out: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) left_in_store: AtomicU64,
    pub(crate) overflowed: AtomicU64,
    pub(crate) busy_ns: AtomicU64,
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One routine of one job: its queues (behind its queue lock) and its counters.
pub(crate) struct Node {
    pub(crate) queues: Mutex<Queues>,
    pub(crate) counters: Counters,
}

/// Why a job took no hold.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refused {
    /// It has finished.
    Finished,
    /// It failed, was cancelled or stopped.
    Halted(JobStatus),
}

struct Lifecycle {
    finished: bool,
    status: JobStatus,
    failure: Option<String>,
    finished_at: Option<Instant>,
}

impl quiesce::Lifecycle for Lifecycle {
    fn finished(&self) -> bool {
        self.finished
    }
}

/// One execution of a flow. Its identity, plan, WorkerState and memory meter are its
/// [`JobCore`] (what activations read, reached through `Deref`); the rest is the engine's.
pub(crate) struct Job {
    pub(crate) core: JobCore,
    /// This job, for tasks made where only `&Job` is at hand (an emit through its port).
    me: Weak<Job>,
    /// The logic of each routine, by the plan's routine index.
    pub(crate) logic: Arc<[Arc<dyn Logic>]>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) nodes: Box<[Node]>,
    /// The store of a durable job (see the durable module).
    pub(crate) durable: Option<Durable>,
    /// Paused: no new activation starts (see [`Job::pause`]).
    paused: AtomicBool,
    /// A recovered durable job was paused when it stopped: it starts paused.
    recovered_paused: AtomicBool,
    /// A recovered durable job's armed retries, until [`Job::start_recovered`] arms them:
    /// (routine, batch, attempt, due in ms since the Unix epoch).
    recovered_retries: Mutex<Vec<(usize, Batch, u32, u64)>>,
    /// The pending count and the lifecycle lock (see the module docs; the protocol is
    /// `routilux_protocol::quiesce`, model-checked with loom).
    pending: Pending<Lifecycle>,
    done: Condvar,
    pub(crate) failures: Mutex<Vec<ActivationFailure>>,
    dead_letters: Mutex<DeadLetters>,
    output: Mutex<OutputRing>,
}

impl Deref for Job {
    type Target = JobCore;

    #[inline]
    fn deref(&self) -> &JobCore {
        &self.core
    }
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
        flow: &Compiled,
        shared: Arc<Shared>,
        group: usize,
    ) -> Arc<Self> {
        Self::make(id, flow_name, flow, shared, group, None)
    }

    /// A durable job on `store`, holding what the store recovered (queued items, WorkerState,
    /// dead letters). Its recovered items are scheduled by [`Job::start_recovered`]. Fails if
    /// the store holds what this flow has no place for (a routine or slot it lacks).
    pub(crate) fn durable(
        id: JobId,
        flow_name: &str,
        flow: &Compiled,
        shared: Arc<Shared>,
        group: usize,
        store: JobStore,
    ) -> Result<Arc<Self>, String> {
        let JobStore {
            store, recovered, ..
        } = store;
        let plan = &flow.plan;
        let dir = store.dir().to_owned();
        let place = |node: u32, slot: Option<u32>| -> Result<(), String> {
            let r = plan.routines.get(node as usize).ok_or_else(|| {
                format!(
                    "the job store in {} holds data of routine #{node}, and flow `{flow_name}`                      has {} routines",
                    dir.display(),
                    plan.routines.len()
                )
            })?;
            match slot {
                Some(s) if s as usize >= r.slot_names.len() => Err(format!(
                    "the job store in {} holds items for slot #{s} of routine `{}`, which has {}                      slots",
                    dir.display(),
                    r.id,
                    r.slot_names.len()
                )),
                _ => Ok(()),
            }
        };
        for &(node, slot) in recovered.items.keys() {
            place(node, Some(slot))?;
        }
        for (node, _) in recovered.state.keys() {
            place(*node, None)?;
        }
        let job = Self::make(
            id,
            flow_name,
            flow,
            shared,
            group,
            Some(Durable::new(store, recovered.next_seq)),
        );
        // The items of an armed retry are its batch again; the rest are queued.
        let in_retry: std::collections::BTreeSet<(u32, u32, u64)> = recovered
            .retries
            .iter()
            .flat_map(|(&(node, _), r)| r.seqs.iter().map(move |&(slot, seq)| (node, slot, seq)))
            .collect();
        let mut held: BTreeMap<(u32, u32, u64), Item> = BTreeMap::new();
        for ((node, slot), items) in recovered.items {
            let mut q = job.nodes[node as usize].queues.lock();
            for (seq, item) in items {
                if in_retry.contains(&(node, slot, seq)) {
                    held.insert((node, slot, seq), item);
                } else {
                    q.recovered(slot as usize, item, seq, job.charge());
                }
            }
        }
        for ((node, first_seq), retry) in recovered.retries {
            let r = &job.flow.routines[node as usize];
            if place(node, None).is_err() {
                continue;
            }
            let mut data: Vec<Vec<Item>> = vec![Vec::new(); r.slot_names.len()];
            let mut seqs = Vec::new();
            for &(slot, seq) in &retry.seqs {
                if let Some(item) = held.remove(&(node, slot, seq))
                    && let Some(d) = data.get_mut(slot as usize)
                {
                    d.push(item);
                    seqs.push((slot, seq));
                }
            }
            if seqs.is_empty() {
                continue;
            }
            job.nodes[node as usize].queues.lock().items_in += seqs.len() as u64;
            let batch = Batch::new(r.slot_names.clone(), data, r.message.clone())
                .numbered(first_seq + 1)
                .with_seqs(seqs);
            job.recovered_retries
                .lock()
                .push((node as usize, batch, retry.attempt, retry.due_ms));
        }
        // An item of a retry record that did not hold together: queued like the others.
        for ((node, slot, seq), item) in held {
            job.nodes[node as usize].queues.lock().recovered(
                slot as usize,
                item,
                seq,
                job.charge(),
            );
        }
        job.recovered_paused
            .store(recovered.paused, Ordering::Relaxed);
        let now_ms = super::run::unix_ms(SystemTime::now());
        for (node, at_ms) in recovered.fired {
            if let Some(n) = job.nodes.get(node as usize) {
                n.queues.lock().last_fire =
                    Instant::now().checked_sub(Duration::from_millis(now_ms.saturating_sub(at_ms)));
            }
        }
        let mut states: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
        for ((node, key), value) in recovered.state {
            states.entry(node).or_default().push((key, value));
        }
        for (node, values) in states {
            *job.states[node as usize].lock() = State::recovered(values, &job.meter);
        }
        {
            let mut kept = job.dead_letters.lock();
            for (seq, text) in recovered.dead_letters {
                match serde_json::from_str::<DeadLetter>(&text) {
                    Ok(letter) if kept.kept.len() < job.flow.budgets.dead_letters => {
                        kept.kept.push(letter)
                    }
                    Ok(_) => kept.dropped += 1,
                    Err(e) => tracing::warn!(
                        job = %job.id,
                        "dead letter {seq} in the job store cannot be read: {e}"
                    ),
                }
            }
        }
        Ok(job)
    }

    /// Schedules a check of every routine of a recovered durable job that holds queued items.
    /// The caller holds the job open (or it may finish at once).
    pub(crate) fn start_recovered(&self) {
        let now_ms = super::run::unix_ms(SystemTime::now());
        for (node, batch, attempt, due_ms) in std::mem::take(&mut *self.recovered_retries.lock()) {
            self.nodes[node].queues.lock().running += 1;
            self.add_pending();
            let at = Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms));
            self.shared.timer.schedule(
                at,
                Task::Retry {
                    job: self.arc(),
                    node,
                    batch,
                    attempt,
                },
            );
        }
        if self.recovered_paused.swap(false, Ordering::AcqRel) {
            self.pause();
        }
        self.check_all();
    }

    fn make(
        id: JobId,
        flow_name: &str,
        flow: &Compiled,
        shared: Arc<Shared>,
        group: usize,
        durable: Option<Durable>,
    ) -> Arc<Self> {
        let plan = flow.plan.clone();
        let nodes = plan
            .routines
            .iter()
            .map(|r| Node {
                queues: Mutex::new(Queues::new(r, durable.is_some())),
                counters: Counters::default(),
            })
            .collect();
        let states = plan
            .routines
            .iter()
            .map(|_| Mutex::new(State::default()))
            .collect();
        let meter = Arc::new(Meter::with_parent(
            plan.budgets.memory,
            shared.group_meter(group),
        ));
        Arc::new_cyclic(|me| Self {
            core: JobCore {
                id,
                flow_name: flow_name.into(),
                flow: plan,
                states,
                meter,
                items: shared.group_items(group).map(|g| Arc::new(Meter::items(g))),
                instances: shared.group_slots(group),
                group,
                started: Instant::now(),
                control: AtomicU8::new(RUNNING),
            },
            me: me.clone(),
            logic: flow.logic.clone(),
            shared,
            nodes,
            durable,
            recovered_retries: Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
            recovered_paused: AtomicBool::new(false),
            pending: Pending::new(Lifecycle {
                finished: false,
                status: JobStatus::Running,
                failure: None,
                finished_at: None,
            }),
            done: Condvar::new(),
            failures: Mutex::new(Vec::new()),
            dead_letters: Mutex::new(DeadLetters::default()),
            output: Mutex::new(OutputRing::default()),
        })
    }

    /// Commits `ops` as one unit of this durable job's store; a store that fails fails the
    /// job (nothing more is acknowledged). A job that is not durable commits nothing.
    pub(crate) fn commit_durable(&self, ops: Vec<Op>) -> Result<(), String> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        d.commit(ops).map_err(|e| {
            let e = e.to_string();
            self.fail(e.clone());
            e
        })
    }

    /// Submits `ops` as one unit of a durable job's store without waiting for it (see
    /// [`Store::wait`](super::store::Store::wait)); a store that refuses it fails the job.
    pub(crate) fn submit_durable(&self, ops: Vec<Op>) -> Result<Ticket, String> {
        let d = self.durable.as_ref().expect("a durable job");
        d.store.submit(ops).map_err(|e| {
            let e = e.to_string();
            self.fail(e.clone());
            e
        })
    }

    /// This job as an `Arc` (it is alive: the caller holds a reference to it).
    #[inline]
    pub(crate) fn arc(&self) -> Arc<Job> {
        self.me.upgrade().expect("a job in use is alive")
    }

    /// The key of an activation of routine `node` of this job on a worker's stack.
    #[inline]
    pub(crate) fn key(&self, node: usize) -> (usize, usize) {
        (self as *const Job as usize, node)
    }

    // ---- lifecycle -------------------------------------------------------------------------

    /// Whether the job failed or was cancelled: nothing more runs, running guests are
    /// interrupted, waiting emits give up.
    #[inline]
    pub(crate) fn halted(&self) -> bool {
        self.core.halted()
    }

    /// Whether the job takes no new input and starts no new activation: halted, or stopped
    /// (whose running activations end normally).
    #[inline]
    pub(crate) fn stopping(&self) -> bool {
        self.control.load(Ordering::Acquire) != RUNNING
    }

    /// Whether the job is paused: it starts no new activation (running ones end), keeps its
    /// queues and takes input (within its bounds), and does not finish.
    #[inline]
    pub(crate) fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Pauses the job (see [`Job::paused`]); false if it was paused already or has finished.
    /// A durable job records it: restarted, it is paused still.
    pub(crate) fn pause(&self) -> bool {
        if self.is_finished() || self.stopping() {
            return false;
        }
        // The pause holds the job open: it cannot finish while paused.
        if self.pending.hold() {
            if self.paused.swap(true, Ordering::AcqRel) {
                self.release();
                return false;
            }
        } else {
            return false;
        }
        // Stopped, cancelled or failed meanwhile: that ends the pause (see `end_pause`).
        if self.stopping() {
            self.end_pause();
            return false;
        }
        if self.durable.is_some() {
            let _ = self.commit_durable(vec![Op::Paused(true)]);
        }
        self.shared.pool.notify_progress();
        tracing::debug!(job = %self.id, "job paused");
        true
    }

    /// Resumes a paused job: every routine with queued items is checked again. False if it
    /// was not paused.
    pub(crate) fn unpause(&self) -> bool {
        if !self.paused.swap(false, Ordering::AcqRel) {
            return false;
        }
        if self.durable.is_some() {
            let _ = self.commit_durable(vec![Op::Paused(false)]);
        }
        self.check_all();
        tracing::debug!(job = %self.id, "job resumed");
        // The pause's hold: the job may finish now.
        self.release();
        true
    }

    /// A job that stops, is cancelled or fails is paused no more: the pause's hold is let go,
    /// so that the job can finish. (A durable job's store keeps the pause: resumed, it is
    /// paused still.)
    fn end_pause(&self) {
        if self.paused.swap(false, Ordering::AcqRel) {
            self.shared.pool.notify_progress();
            self.release();
        }
    }

    /// Schedules a check of every routine that holds queued items and none scheduled.
    fn check_all(&self) {
        for (node, n) in self.nodes.iter().enumerate() {
            let r = &self.flow.routines[node];
            let schedule = {
                let mut q = n.queues.lock();
                let s = !q.scheduled && q.any_queued() && r.policy.may_fire(&q.slots);
                if s {
                    q.scheduled = true;
                }
                s
            };
            if schedule {
                self.add_pending();
                self.shared.pool.inject(Task::Check {
                    job: self.arc(),
                    node,
                });
            }
        }
    }

    pub(crate) fn status(&self) -> JobStatus {
        let lc = self.pending.lock();
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
        self.pending.lock().failure.clone()
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.pending.lock().finished
    }

    pub(crate) fn wall_time(&self) -> Duration {
        let lc = self.pending.lock();
        lc.finished_at.unwrap_or_else(Instant::now) - self.started
    }

    /// Takes a hold: the job cannot finish until [`Job::release`]. Fails on a finished or
    /// halted job.
    pub(crate) fn hold(&self) -> Result<(), Refused> {
        if !self.pending.hold() {
            return Err(Refused::Finished);
        }
        if self.stopping() {
            self.release();
            return Err(Refused::Halted(self.status()));
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn add_pending(&self) {
        self.pending.add();
    }

    /// Releases one pending count; the last one finishes the job.
    pub(crate) fn release(&self) {
        let finished = self.pending.release(|lc| {
            lc.finished = true;
            lc.finished_at = Some(Instant::now());
            lc.status = match self.control.load(Ordering::Acquire) {
                FAILED => JobStatus::Failed,
                CANCELLED => JobStatus::Cancelled,
                STOPPED => JobStatus::Stopped,
                _ => JobStatus::Completed,
            };
            tracing::debug!(job = %self.id, status = %lc.status, "job finished");
        });
        if finished {
            if let Some(d) = &self.durable {
                // Written with the next group (or when the store closes); not waited for here.
                let status = self.status();
                let _ = d.store.submit([Op::Status(status.to_string())]);
                if status == JobStatus::Completed {
                    d.store.compact_when_closed();
                }
            }
            for logic in self.logic.iter() {
                logic.job_finished(self.id);
            }
            // What the finished job still keeps (its output, dead letters) no longer counts on
            // its group's memory quota: the quota is for running jobs.
            self.meter.detach();
            if let Some(items) = &self.items {
                items.detach();
            }
            self.done.notify_all();
            self.shared.job_finished();
        }
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
            self.pending.add();
            self.disarm_timers("job stopped");
            self.end_pause();
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
            self.pending.add();
            self.disarm_timers("job cancelled");
            self.end_pause();
            self.shared.pool.notify_progress();
            // A job with nothing else pending (never given input) finishes now.
            self.release();
        }
        changed
    }

    /// A halted job need not wait for its timers: `time_interval` wake-ups have nothing to
    /// release any more, and a pending retry's items become a dead letter now.
    fn disarm_timers(&self, why: &str) {
        for task in self.shared.timer.take_owned(self as *const Job as usize) {
            task.abandon(why);
        }
    }

    pub(crate) fn fail(&self, reason: String) {
        if [RUNNING, STOPPED].into_iter().any(|from| {
            self.control
                .compare_exchange(from, FAILED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }) {
            self.pending.lock().failure = Some(reason);
            self.disarm_timers("job failed");
            self.end_pause();
            self.shared.pool.notify_progress();
        }
    }

    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        // A timeout too long to represent means "no deadline".
        let deadline = Instant::now().checked_add(timeout);
        let mut lc = self.pending.lock();
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

    /// Shutdown dropped a retry before it ran: keep its items, free its `running` slot.
    pub(crate) fn abandon_retry(&self, node: usize, batch: Batch, why: &str) {
        self.dead_letter(node, batch, format!("{why} before the retry ran"), 0);
        self.nodes[node].queues.lock().running -= 1;
        self.release();
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
        let seqs = batch.seqs().to_vec();
        let (names, data) = batch.into_parts();
        let size: u64 = data.iter().flatten().map(|i| i.byte_len() as u64).sum();
        let items = names
            .iter()
            .zip(data)
            .filter(|(_, d)| !d.is_empty())
            .map(|(s, d)| (s.to_string(), d))
            .collect();
        let left = || add(&self.nodes[node].counters.left_in_store, n);
        // A durable job that halted under the activation (or whose store fails now) makes no
        // dead letter: its store keeps the items queued (an emit's, or the batch it came
        // from), for a resume to run. A letter handed to a dead-letter sink now would be an
        // item in two places once the resume processes it.
        if self.durable.is_some() && self.halted() {
            left();
            return;
        }
        let letter = DeadLetter {
            routine: r.id.to_string(),
            items,
            error: cut(error, self.flow.budgets.error_bytes),
            attempts,
            delivered,
            at: SystemTime::now(),
        };
        // A durable job keeps the letter in its store in the same unit as the consumption of
        // its items.
        if let Some(d) = &self.durable {
            let mut ops: Vec<Op> = seqs
                .iter()
                .map(|&(slot, seq)| Op::Consume {
                    node: node as u32,
                    slot,
                    seq,
                })
                .collect();
            // Retried after a delay: its armed retry is done with too.
            if let (true, Some(&(_, first_seq))) = (attempts > 1, seqs.first()) {
                ops.push(Op::RetryDone {
                    node: node as u32,
                    first_seq,
                });
            }
            match serde_json::to_string(&letter) {
                Ok(text) => ops.push(Op::DeadLetter {
                    seq: d.take_seqs(1),
                    letter: text,
                }),
                Err(e) => tracing::error!(job = %self.id, "cannot write a dead letter: {e}"),
            }
            if self.commit_durable(ops).is_err() {
                left();
                return;
            }
        }
        add(&self.nodes[node].counters.dead_lettered, n);
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
    /// `seq`: where a durable job's store holds the item queued (ignored otherwise).
    pub(crate) fn dead_letter_undelivered(
        &self,
        node: usize,
        slot: usize,
        item: Item,
        seq: u64,
        error: String,
    ) {
        let r = &self.flow.routines[node];
        self.nodes[node].queues.lock().count_undelivered();
        let mut batch = Batch::from_slots([(&*r.slot_names[slot], vec![item])], None);
        if self.durable.is_some() {
            batch = batch.with_seqs(vec![(slot as u32, seq)]);
        }
        self.dead_letter(node, batch, error, 0);
    }

    #[inline]
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
                    (q.queued(), q.items_in)
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
                        left_in_store: get(&c.left_in_store),
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

    /// The failures after the first `from` (and how many there are in all).
    pub(crate) fn failures_from(&self, from: usize) -> (Vec<ActivationFailure>, usize) {
        let f = self.failures.lock();
        (
            f.get(from..).map(<[_]>::to_vec).unwrap_or_default(),
            f.len(),
        )
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
        self.nodes[node]
            .queues
            .lock()
            .items(&self.flow.routines[node])
    }
}

/// What a kept output line costs the job's output budget.
fn line_bytes(line: &OutputLine) -> u64 {
    (line.routine.len() + line.level.len() + line.message.len() + 64) as u64
}
