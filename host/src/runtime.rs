//! The runtime: a worker pool, a timer, a flow registry and the jobs it runs.
//!
//! Jobs are started by name, fed by posts, and complete by themselves (see `job`).
//!
//! Dropping a runtime **cancels** its unfinished jobs (no new activations; running ones end),
//! then joins its threads. To let jobs finish first, call [`Runtime::shutdown`] with
//! [`Shutdown::Drain`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::exec::durable::JobStore;
use crate::exec::job::{DeadLetterFn, Job, OutputFn, Refused, Shared};
use crate::exec::scheduler::{self, Pool, Sched};
use crate::exec::store::Op;
use crate::exec::timer::Timer;
use crate::model::flow::{Flow, FlowError, Warning, hint, suggest};
use crate::model::item::{Item, ItemError};
use crate::model::registry::FlowRegistry;
use crate::model::report::{
    ActivationFailure, DeadLetter, JobId, JobStatus, OutputLine, RoutineCounters,
};

/// Errors of runtime operations (starting jobs, posting).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No flow of that name is registered.
    #[error("no flow named `{name}` is registered{}", hint(suggestion))]
    UnknownFlow {
        /// The name asked for.
        name: String,
        /// The nearest registered name.
        suggestion: Option<String>,
    },
    /// The flow has no routine of that id.
    #[error("flow `{flow}` has no routine `{routine}`{}", hint(suggestion))]
    UnknownRoutine {
        /// The flow.
        flow: String,
        /// The routine asked for.
        routine: String,
        /// The nearest routine id.
        suggestion: Option<String>,
    },
    /// The routine has no slot of that name.
    #[error("routine `{routine}` has no slot `{slot}`{}", hint(suggestion))]
    UnknownSlot {
        /// The routine.
        routine: String,
        /// The slot asked for.
        slot: String,
        /// The nearest slot name.
        suggestion: Option<String>,
    },
    /// The slot stayed full until the post's deadline.
    #[error("slot `{routine}.{slot}` of {job} is full ({why}) and stayed full for {waited:?}")]
    QueueFull {
        /// The job.
        job: JobId,
        /// The routine.
        routine: String,
        /// The slot.
        slot: String,
        /// The slot's bound.
        capacity: usize,
        /// How long the post waited.
        waited: Duration,
        /// Which bound it is at: its item count, its byte budget, the job's memory budget or
        /// the tenant's memory quota (with the figures).
        why: String,
    },
    /// The job finished (it was quiescent); start a new job, or hold the job open while
    /// posting a stream ([`JobHandle::hold_open`]).
    #[error("{job} has finished and accepts no more input")]
    JobFinished {
        /// The job.
        job: JobId,
    },
    /// The job failed or was cancelled.
    #[error("{job} is {status} and accepts no more input")]
    JobHalted {
        /// The job.
        job: JobId,
        /// Its status.
        status: JobStatus,
    },
    /// The item is larger than the slot's whole byte budget: it could never be queued.
    #[error(
        "an item of {} is larger than the byte budget of slot `{routine}.{slot}` ({})",
        crate::model::budget::bytes(*size), crate::model::budget::bytes(*budget)
    )]
    ItemTooLarge {
        /// The routine.
        routine: String,
        /// The slot.
        slot: String,
        /// The item's size in bytes.
        size: u64,
        /// The slot's byte budget.
        budget: u64,
    },
    /// The posted value is not a JSON object.
    #[error("invalid item: {0}")]
    Item(#[from] ItemError),
    /// The runtime is shutting down (or has): it starts no job and takes no input.
    #[error("the runtime has shut down")]
    ShutDown,
    /// A durable job's store could not commit (a full disk, an I/O error): the post was not
    /// acknowledged, and the job has failed.
    #[error("{job}: {reason}")]
    Store {
        /// The job.
        job: JobId,
        /// What the store said.
        reason: String,
    },
    /// A durable job could not be started on its store.
    #[error("{0}")]
    Durable(String),
    /// The operating system would not start a thread of the runtime.
    #[error("cannot start {what}: {reason}")]
    Spawn {
        /// Which thread.
        what: String,
        /// The system's reason.
        reason: String,
    },
}

/// The error of a post to a job that took no hold.
fn refused(job: JobId, why: Refused) -> RuntimeError {
    match why {
        Refused::Finished => RuntimeError::JobFinished { job },
        Refused::Halted(status) => RuntimeError::JobHalted { job, status },
    }
}

/// A share of a runtime's workers that jobs run on: a tenant of `routilux serve`. See
/// [`RuntimeBuilder::fair`] and [`Runtime::add_group`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Group(usize);

impl Group {
    /// The group every runtime has (weight 1), of jobs started without one.
    pub const DEFAULT: Group = Group(0);
    /// The largest weight a group may have (larger ones are clamped to it).
    pub const MAX_WEIGHT: u32 = scheduler::MAX_WEIGHT;
}

/// What a [`Group`]'s jobs have used of the workers and of memory ([`Runtime::group_usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupUsage {
    /// Its weight now.
    pub weight: u32,
    /// The wall time its tasks have occupied workers (charged in a fair pool only).
    pub busy: Duration,
    /// Workers running one of its tasks now (fair pool only).
    pub running: usize,
    /// Its tasks waiting for a worker (fair pool only).
    pub queued_tasks: usize,
    /// Activations its rate limit held back (each waited for a token).
    pub throttled: u64,
    /// Its activation rate limit, per second, if it has one.
    pub rate: Option<u32>,
    /// Bytes its jobs hold together now, counted since [`Runtime::set_group_memory`] was
    /// first called for it (0 before).
    pub memory_bytes: u64,
    /// The most they held at once.
    pub memory_peak_bytes: u64,
    /// Its memory quota, if it has one.
    pub memory_limit: Option<u64>,
    /// WebAssembly instances its jobs keep alive now (busy or idle), counted since
    /// [`Runtime::set_group_instances`] was first called for it (0 before).
    pub instances: usize,
    /// The most they kept at once.
    pub instances_peak: usize,
    /// Its live-instance quota, if it has one.
    pub instances_limit: Option<usize>,
    /// Items its jobs hold queued now, as reserved on its quota of them (in chunks of 32 per
    /// slot, so a little more than are queued), counted since
    /// [`Runtime::set_group_queued_items`] was first called for it (0 before).
    pub queued_items: u64,
    /// The most they held at once.
    pub queued_items_peak: u64,
    /// Its quota of queued items, if it has one.
    pub queued_items_limit: Option<u64>,
}

/// How [`Runtime::shutdown`] treats unfinished jobs.
#[derive(Clone, Copy, Debug)]
pub enum Shutdown {
    /// Wait up to this long for jobs to finish, then cancel the rest.
    Drain(Duration),
    /// Cancel at once.
    Cancel,
}

/// The longest an emit waits for its group's memory quota (spent by the group's other jobs)
/// before it fails, whatever the post timeout (`routilux run` posts wait for days).
const MAX_QUOTA_WAIT: Duration = Duration::from_secs(60);

/// Configures a [`Runtime`].
#[derive(Clone)]
pub struct RuntimeBuilder {
    threads: usize,
    stack_size: usize,
    post_timeout: Duration,
    registry: Option<FlowRegistry>,
    on_output: Option<OutputFn>,
    on_dead_letter: Option<DeadLetterFn>,
    park_timeout: Duration,
    fair: bool,
}

impl RuntimeBuilder {
    /// Serves [`Group`]s (tenants) by weight instead of first come, first served (default:
    /// off). Each group's tasks then wait in its own queue; a free worker goes to the group
    /// furthest below its weighted share of the workers, charged the wall time its
    /// activations occupy them (a guest that sleeps costs its own group), and a running check
    /// lets its worker go between two activations once another group deserves it more. It is
    /// work-conserving: one busy group alone uses every worker. The scheduler module's docs
    /// give the rules; the serve bench measures them.
    pub fn fair(mut self, on: bool) -> Self {
        self.fair = on;
        self
    }

    /// Worker threads (honoured exactly; at least 1). Default: the machine's parallelism.
    pub fn thread_pool_size(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// Stack size of each worker thread (default 32 MiB, at least 4 MiB; reserved, not
    /// committed). A blocked
    /// emitter can run other activations nested on its stack, and each WebAssembly call may
    /// use up to wasmtime's `max_wasm_stack` (512 KiB) of it.
    pub fn worker_stack_size(mut self, bytes: usize) -> Self {
        self.stack_size = bytes.max(4 * 1024 * 1024);
        self
    }

    /// How long an idle worker sleeps, when nothing wakes it, before it looks for work again
    /// (default 100 ms). Wake-ups do not depend on it (see the scheduler's docs): it is a
    /// second line of defence, and tests set it to hours so that a lost wake-up shows as a
    /// hang instead of a 100 ms delay.
    pub fn park_timeout(mut self, d: Duration) -> Self {
        self.park_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// How long `post` waits for room in a full slot before `QueueFull` (default 30 s).
    pub fn post_timeout(mut self, d: Duration) -> Self {
        self.post_timeout = d;
        self
    }

    /// Uses a shared registry instead of a private one.
    pub fn registry(mut self, registry: FlowRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Streams every output line of every job to `f` as it is produced.
    pub fn on_output(mut self, f: impl Fn(JobId, &OutputLine) + Send + Sync + 'static) -> Self {
        self.on_output = Some(Arc::new(f));
        self
    }

    /// Hands every dead letter of every job to `f` as it is made: a job keeps dead letters
    /// only within its budgets ([`Budgets`](crate::Budgets)), so a sink is how every one of
    /// them is kept (the CLI's `--dead-letters FILE.jsonl`).
    pub fn on_dead_letter(
        mut self,
        f: impl Fn(JobId, &DeadLetter) + Send + Sync + 'static,
    ) -> Self {
        self.on_dead_letter = Some(Arc::new(f));
        self
    }

    /// Starts the worker threads and the timer.
    ///
    /// # Panics
    ///
    /// If the operating system refuses a thread; [`RuntimeBuilder::try_build`] says so
    /// instead.
    pub fn build(self) -> Runtime {
        match self.try_build() {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts the worker threads and the timer, or says why the operating system would not
    /// (the threads already started are stopped again).
    pub fn try_build(self) -> Result<Runtime, RuntimeError> {
        let (pool, locals) = Pool::new(self.threads, self.park_timeout, self.fair);
        let shared = Arc::new(Shared {
            pool: Arc::new(pool),
            timer: Timer::default(),
            on_output: self.on_output,
            on_dead_letter: self.on_dead_letter,
            closed: AtomicBool::new(false),
            finished_gen: Mutex::new(0),
            finished_cv: Condvar::new(),
            group_memory: Mutex::new(Vec::new()),
            group_instances: Mutex::new(Vec::new()),
            group_items: Mutex::new(Vec::new()),
            quota_wait: self.post_timeout.min(MAX_QUOTA_WAIT),
        });
        let mut threads = Vec::with_capacity(self.threads);
        let stop = |shared: &Shared, threads: Vec<JoinHandle<()>>| {
            shared.pool.begin_shutdown();
            for t in threads {
                let _ = t.join();
            }
        };
        for (i, local) in locals.into_iter().enumerate() {
            let pool = shared.pool.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("routilux-worker-{i}"))
                .stack_size(self.stack_size)
                .spawn(move || scheduler::worker_main(pool, i, local));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop(&shared, threads);
                    return Err(RuntimeError::Spawn {
                        what: format!("worker thread {} of {}", i + 1, self.threads),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let s = shared.clone();
        let timer = match std::thread::Builder::new()
            .name("routilux-timer".into())
            .spawn(move || s.timer.run(&s.pool))
        {
            Ok(t) => t,
            Err(e) => {
                stop(&shared, threads);
                return Err(RuntimeError::Spawn {
                    what: "the timer thread".to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        Ok(Runtime {
            shared,
            registry: self.registry.unwrap_or_default(),
            jobs: Mutex::new(Vec::new()),
            next_job: AtomicU64::new(1),
            threads: Mutex::new(Some((threads, timer))),
            post_timeout: self.post_timeout,
        })
    }
}

/// Runs flows: a pool of exactly `thread_pool_size` workers, a timer thread, a registry of
/// flows and the jobs started from them.
///
/// ```
/// use routilux::{Flow, Routine, Runtime};
/// use serde_json::json;
/// use std::time::Duration;
///
/// let mut flow = Flow::new();
/// flow.add_routine(
///     Routine::new().slot("in").event("out", ["n"]).logic(|ctx, batch| {
///         for item in batch.slot("in") {
///             ctx.emit("out", &json!({"n": item.value()["n"].as_i64().unwrap_or(0) * 2}))?;
///         }
///         Ok(())
///     }),
///     "double",
/// );
/// let rt = Runtime::builder().thread_pool_size(2).build();
/// rt.register("doubler", &flow).unwrap();
/// let job = rt.post("doubler", "double", "in", &json!({"n": 21})).unwrap();
/// assert!(rt.wait_until_all_jobs_finished(Duration::from_secs(5)));
/// assert_eq!(job.counters()["double"].items_out, 1);
/// ```
///
///
/// Dropping a runtime **cancels** its unfinished jobs (no new activations; running ones end),
/// then joins its threads. To let jobs finish first, call [`Runtime::shutdown`] with
/// [`Shutdown::Drain`].
pub struct Runtime {
    shared: Arc<Shared>,
    registry: FlowRegistry,
    jobs: Mutex<Vec<Arc<Job>>>,
    next_job: AtomicU64,
    #[allow(clippy::type_complexity)]
    threads: Mutex<Option<(Vec<JoinHandle<()>>, JoinHandle<()>)>>,
    post_timeout: Duration,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("thread_pool_size", &self.thread_pool_size())
            .field("flows", &self.registry.names())
            .finish()
    }
}

impl Runtime {
    /// A builder with default settings.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            stack_size: 32 * 1024 * 1024,
            post_timeout: Duration::from_secs(30),
            registry: None,
            on_output: None,
            on_dead_letter: None,
            park_timeout: Duration::from_millis(100),
            fair: false,
        }
    }

    /// Adds a group (a tenant) of `weight` (1 to [`Group::MAX_WEIGHT`]): its jobs' share of a
    /// [`fair`](RuntimeBuilder::fair) pool is `weight` over the sum of the weights of the
    /// groups with work. In a pool that is not fair groups only label jobs.
    pub fn add_group(&self, weight: u32) -> Group {
        Group(self.shared.pool.add_group(weight))
    }

    /// Changes a group's weight (clamped to 1 to [`Group::MAX_WEIGHT`]); it counts from the next choice on.
    pub fn set_group_weight(&self, group: Group, weight: u32) {
        self.shared.pool.set_weight(group.0, weight);
    }

    /// Limits a group's jobs to `per_second` activations together (bursts of as many), or
    /// lifts the limit (`None`). An activation past it waits, its batch still queued, until
    /// the group's next token: its routine is woken by the timer, its worker meanwhile free
    /// for others. (Retries of failed batches are not held back.)
    pub fn set_group_rate(&self, group: Group, per_second: Option<u32>) {
        self.shared.pool.set_rate(group.0, per_second);
    }

    /// Holds a group's jobs together to `bytes` of memory (the sum of what each job's own
    /// [`Budgets::memory`](crate::Budgets) counts: its guests' linear memories, queued items,
    /// WorkerState, held emits and retained dead letters and output), or lifts the quota
    /// (`None`: the meter stays, counting, without a limit). Each job stays within its own
    /// budget too. Past the quota, as past a job's budget: a slot is full (posts and emits
    /// wait; a post past its timeout is refused with `QueueFull`; an emit that finds room in
    /// its slot but none in the quota fails after as long, retryable, its item a dead letter,
    /// so one job's memory cannot hold another job's worker), a guest's memory cannot
    /// grow (it traps, the error naming the tenant's quota, retryable) and a new instance
    /// cannot be made (retryable), a WorkerState write fails. Counted from the first call on:
    /// set it before the group's jobs start (jobs started earlier are not on it); a later
    /// call changes the limit at once for every job on it (what they hold stays held).
    pub fn set_group_memory(&self, group: Group, bytes: Option<u64>) {
        self.shared
            .set_group_memory(group.0, bytes.unwrap_or(u64::MAX));
    }

    /// Holds a group's jobs together to `count` live WebAssembly instances (busy or idle, of
    /// all their routines), or lifts the quota (`None`: counted, no limit). Each routine stays
    /// within its own `max_instances` too. A routine that needs a new instance while the
    /// group is at its quota first has an idle instance of the group dropped (a job held open
    /// keeps the instances it made; any of the group's routines and jobs), and only when all
    /// are busy waits for one, up to its activation timeout, then fails retryable. An
    /// activation nested under a blocked emit of its own job (it helps drain the full slot)
    /// may go past the quota by that nesting, as past a routine's cap: the instances held
    /// lower on its stack cannot come back before it returns. Counted from the first call
    /// on: set it before the group's jobs start; a later call changes the limit for every job
    /// on it at once.
    pub fn set_group_instances(&self, group: Group, count: Option<usize>) {
        self.shared
            .set_group_instances(group.0, count.unwrap_or(usize::MAX));
    }

    /// Holds a group's jobs together to `count` queued items (in all their slots), or lifts
    /// the quota (`None`: counted, no limit). Each slot stays within its own bounds too. Past
    /// it, as past the group's memory quota: a slot is full (a post waits, then is refused
    /// with `QueueFull` naming the quota; an emit that finds room in its slot but none in the
    /// quota fails after as long, retryable, its item a dead letter). Slots reserve on it 32
    /// items at a time, so a quota below a few thousand is felt early. Counted from the first
    /// call on: set it before the group's jobs start; a later call changes the limit at once.
    pub fn set_group_queued_items(&self, group: Group, count: Option<u64>) {
        self.shared
            .set_group_items(group.0, count.unwrap_or(u64::MAX));
    }

    /// What a group's jobs have used of the workers.
    pub fn group_usage(&self, group: Group) -> GroupUsage {
        let u = self.shared.pool.usage(group.0).unwrap_or_default();
        let memory = self.shared.group_meter(group.0);
        let (instances, instances_peak, instances_limit) = self
            .shared
            .group_slots(group.0)
            .map_or((0, 0, usize::MAX), |s| s.usage());
        let items = self.shared.group_items(group.0);
        GroupUsage {
            queued_items: items.as_ref().map_or(0, |m| m.used()),
            queued_items_peak: items.as_ref().map_or(0, |m| m.peak()),
            queued_items_limit: items.map(|m| m.limit()).filter(|&l| l != u64::MAX),
            instances,
            instances_peak,
            instances_limit: (instances_limit != usize::MAX).then_some(instances_limit),
            memory_bytes: memory.as_ref().map_or(0, |m| m.used()),
            memory_peak_bytes: memory.as_ref().map_or(0, |m| m.peak()),
            memory_limit: memory.map(|m| m.limit()).filter(|&l| l != u64::MAX),
            weight: u.weight,
            busy: Duration::from_nanos(u.busy_ns),
            running: u.running,
            queued_tasks: u.queued,
            throttled: u.throttled,
            rate: u.rate,
        }
    }

    /// The number of worker threads.
    pub fn thread_pool_size(&self) -> usize {
        self.shared.pool.size()
    }

    /// The flow registry.
    pub fn registry(&self) -> &FlowRegistry {
        &self.registry
    }

    /// Validates and registers a flow (shortcut for `registry().register`).
    pub fn register(&self, name: &str, flow: &Flow) -> Result<Vec<Warning>, FlowError> {
        self.registry.register(name, flow)
    }

    /// The compiled flow of that name, if the runtime still starts jobs.
    fn flow_to_start(
        &self,
        flow_name: &str,
    ) -> Result<Arc<crate::model::flow::Compiled>, RuntimeError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(RuntimeError::ShutDown);
        }
        self.registry
            .get(flow_name)
            .ok_or_else(|| RuntimeError::UnknownFlow {
                name: flow_name.to_owned(),
                suggestion: suggest(flow_name, self.registry.names().iter().map(String::as_str)),
            })
    }

    /// Starts a job of the named flow. It runs once input is posted to it, and completes by
    /// itself when it becomes quiescent.
    pub fn exec(&self, flow_name: &str) -> Result<JobHandle, RuntimeError> {
        self.exec_in(Group::DEFAULT, flow_name)
    }

    /// [`Runtime::exec`] for a job of `group`.
    pub fn exec_in(&self, group: Group, flow_name: &str) -> Result<JobHandle, RuntimeError> {
        let flow = self.flow_to_start(flow_name)?;
        let id = JobId(self.next_job.fetch_add(1, Ordering::Relaxed));
        let job = Job::new(id, flow_name, &flow, self.shared.clone(), group.0);
        self.jobs.lock().push(job.clone());
        Ok(JobHandle {
            job,
            post_timeout: self.post_timeout,
        })
    }

    /// Starts a durable job of the named flow on `store` (see [`JobStore`]): what it holds
    /// (a job interrupted by a kill, say) is queued again and runs at once; every post to the
    /// job, every activation and every dead letter is committed to the store before it is
    /// acknowledged or seen downstream. Returns the job held open (until the returned hold
    /// is dropped), so that it does not finish before its caller had a chance to post.
    pub fn exec_durable(
        &self,
        flow_name: &str,
        store: JobStore,
    ) -> Result<(JobHandle, InputHold), RuntimeError> {
        self.exec_durable_in(Group::DEFAULT, flow_name, store)
    }

    /// [`Runtime::exec_durable`] for a job of `group`.
    pub fn exec_durable_in(
        &self,
        group: Group,
        flow_name: &str,
        store: JobStore,
    ) -> Result<(JobHandle, InputHold), RuntimeError> {
        let flow = self.flow_to_start(flow_name)?;
        let id = JobId(self.next_job.fetch_add(1, Ordering::Relaxed));
        let job = Job::durable(id, flow_name, &flow, self.shared.clone(), group.0, store)
            .map_err(RuntimeError::Durable)?;
        job.hold().map_err(|e| refused(id, e))?;
        let hold = InputHold { job: job.clone() };
        job.start_recovered();
        self.jobs.lock().push(job.clone());
        Ok((
            JobHandle {
                job,
                post_timeout: self.post_timeout,
            },
            hold,
        ))
    }

    /// Starts a job of `flow_name` and posts `value` to `routine.slot` (the reference
    /// library's `post` without a job id).
    pub fn post<T: Serialize + ?Sized>(
        &self,
        flow_name: &str,
        routine: &str,
        slot: &str,
        value: &T,
    ) -> Result<JobHandle, RuntimeError> {
        let job = self.exec(flow_name)?;
        job.post(routine, slot, value)?;
        Ok(job)
    }

    /// Waits until every job of this runtime has finished; returns whether they all did
    /// within `timeout`. A job that was never given input has not finished.
    pub fn wait_until_all_jobs_finished(&self, timeout: Duration) -> bool {
        // A timeout too long to represent means "no deadline".
        let deadline = Instant::now().checked_add(timeout);
        let mut gen_guard = self.shared.finished_gen.lock();
        loop {
            // Never hold the job list while taking other locks: snapshot it.
            let jobs = self.jobs.lock().clone();
            if jobs.iter().all(|j| j.is_finished()) {
                return true;
            }
            match deadline {
                Some(d) => {
                    if self
                        .shared
                        .finished_cv
                        .wait_until(&mut gen_guard, d)
                        .timed_out()
                    {
                        let jobs = self.jobs.lock().clone();
                        return jobs.iter().all(|j| j.is_finished());
                    }
                }
                None => self.shared.finished_cv.wait(&mut gen_guard),
            }
        }
    }

    /// Every job started by this runtime, oldest first.
    pub fn jobs(&self) -> Vec<JobHandle> {
        self.jobs
            .lock()
            .iter()
            .map(|j| JobHandle {
                job: j.clone(),
                post_timeout: self.post_timeout,
            })
            .collect()
    }

    /// A job by id.
    pub fn job(&self, id: JobId) -> Option<JobHandle> {
        self.jobs
            .lock()
            .iter()
            .find(|j| j.id == id)
            .map(|j| JobHandle {
                job: j.clone(),
                post_timeout: self.post_timeout,
            })
    }

    /// Forgets finished jobs (their handles stay valid); returns how many were dropped.
    pub fn forget_finished_jobs(&self) -> usize {
        let mut jobs = self.jobs.lock();
        let before = jobs.len();
        jobs.retain(|j| !j.is_finished());
        before - jobs.len()
    }

    /// Stops the runtime: drains or cancels jobs, stops the timer, joins the workers.
    /// Idempotent; also run (with [`Shutdown::Cancel`]) on drop.
    pub fn shutdown(&self, mode: Shutdown) {
        if let Shutdown::Drain(timeout) = mode {
            self.wait_until_all_jobs_finished(timeout);
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        // Snapshot the list: cancelling can finish a job, which takes the lock that
        // `wait_until_all_jobs_finished` holds while it reads the list.
        let jobs = self.jobs.lock().clone();
        for j in &jobs {
            j.cancel();
        }
        let Some((workers, timer)) = self.threads.lock().take() else {
            return;
        };
        for task in self.shared.timer.shutdown() {
            task.abandon("runtime shut down");
        }
        let _ = timer.join();
        self.shared.pool.begin_shutdown();
        for w in workers {
            let _ = w.join();
        }
        for task in self.shared.pool.drain_injector() {
            task.abandon("runtime shut down");
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown(Shutdown::Cancel);
    }
}

/// Keeps a job open for input: the job does not complete while a hold exists, even if it is
/// momentarily quiescent. Drop it when the input stream ends.
pub struct InputHold {
    job: Arc<Job>,
}

impl Drop for InputHold {
    fn drop(&mut self) {
        self.job.release();
    }
}

/// The error of an item too large for a slot's whole byte budget, if it is.
fn too_large(job: &Job, node: usize, slot: usize, item: &Item) -> Result<(), RuntimeError> {
    let size = item.byte_len() as u64;
    match job.too_large_for(node, slot, size) {
        None => Ok(()),
        Some(budget) => {
            let r = &job.flow.routines[node];
            Err(RuntimeError::ItemTooLarge {
                routine: r.id.to_string(),
                slot: r.slot_names[slot].to_string(),
                size,
                budget,
            })
        }
    }
}

/// Queues `item` into a resolved slot, waiting up to `timeout` for room. The caller holds the
/// job open.
fn post_resolved(
    job: &Arc<Job>,
    node: usize,
    slot: usize,
    item: Item,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    if job.durable.is_some() {
        return post_durable(job, node, slot, vec![item], Vec::new(), timeout);
    }
    too_large(job, node, slot, &item)?;
    let len = item.byte_len() as u64;
    let mut pending = Some(item);
    wait_for_room(job, node, slot, len, timeout, || {
        let Some(item) = pending.take() else {
            return true;
        };
        match job.push(
            node,
            slot,
            item,
            0,
            false,
            Sched::External(&job.shared.pool),
        ) {
            Ok(()) => true,
            Err(back) => {
                pending = Some(back);
                false
            }
        }
    })
}

/// Waits up to `timeout` until `ready` (tried now, then again each time the pool makes
/// progress, at least every 5 ms, with the waiter registered so no wake-up is lost) says it
/// is done: queued an item, or found room for `len` bytes in `node.slot`. `JobHalted` once
/// the job stops; `QueueFull` at the deadline (a timeout too long to represent has none).
fn wait_for_room(
    job: &Job,
    node: usize,
    slot: usize,
    len: u64,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout);
    loop {
        if job.stopping() {
            return Err(RuntimeError::JobHalted {
                job: job.id,
                status: job.status(),
            });
        }
        if ready() {
            return Ok(());
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Err(queue_full(job, node, slot, len, now - started));
        }
        let slice = deadline.map_or(Duration::from_millis(5), |d| {
            (d - now).min(Duration::from_millis(5))
        });
        if job.shared.pool.wait_unless(slice, &mut ready) {
            return Ok(());
        }
    }
}

fn queue_full(job: &Job, node: usize, slot: usize, len: u64, waited: Duration) -> RuntimeError {
    let r = &job.flow.routines[node];
    let why = job.nodes[node]
        .queues
        .lock()
        .why_full(r, slot, len, job.charge());
    RuntimeError::QueueFull {
        job: job.id,
        routine: r.id.to_string(),
        slot: r.slot_names[slot].to_string(),
        capacity: r.capacities[slot],
        waited,
        why,
    }
}

/// A post to a durable job: waits up to `timeout` for room in the slot, commits `items` (and
/// the position `input` reached, if given) as one unit, and only then queues them, so that
/// no routine sees an item before it is on disk. Once committed they are the job's: queued
/// (waiting for room as long as it takes), or a dead letter if the job halts first (then
/// they stay queued in the store, for a resume).
fn post_durable(
    job: &Arc<Job>,
    node: usize,
    slot: usize,
    items: Vec<Item>,
    positions: Vec<(String, u64)>,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    let Some(d) = &job.durable else {
        unreachable!("a durable post to a job without a store");
    };
    for item in &items {
        too_large(job, node, slot, item)?;
    }
    let r = &job.flow.routines[node];
    let len = items.first().map_or(0, |i| i.byte_len() as u64);
    // Room for the first item in the slot, and for the whole unit on the tenant's quota of
    // queued items (the slot's own bounds and the bytes are waited for item by item below).
    let n = items.len() as u64;
    wait_for_room(job, node, slot, len, timeout, || {
        items.is_empty() || {
            let q = job.nodes[node].queues.lock();
            q.has_room(r, slot, len, job.charge()) && q.unit_room(slot, n, job.charge())
        }
    })?;
    let base = d.take_seqs(items.len() as u64);
    let mut ops: Vec<Op> = (base..)
        .zip(&items)
        .map(|(seq, item)| Op::Queue {
            node: node as u32,
            slot: slot as u32,
            seq,
            item: item.clone(),
        })
        .collect();
    ops.extend(
        positions
            .into_iter()
            .map(|(name, position)| Op::Input { name, position }),
    );
    job.commit_durable(ops)
        .map_err(|reason| RuntimeError::Store {
            job: job.id,
            reason,
        })?;
    let pool = &job.shared.pool;
    let committed = Instant::now();
    for (seq, item) in (base..).zip(items) {
        let mut pending = Some(item);
        loop {
            let Some(item) = pending.take() else {
                break;
            };
            if job.halted() {
                job.dead_letter_undelivered(
                    node,
                    slot,
                    item,
                    seq,
                    "the job halted before a committed post was queued".into(),
                );
                break;
            }
            // A stopped job drains nothing: past the bound (it stays queued in the store).
            let overrun = job.stopping();
            let back = match job.push(node, slot, item, seq, overrun, Sched::External(pool)) {
                Ok(()) => break,
                Err(back) if overrun => {
                    tracing::debug!(job = %job.id, "a committed post stays in the store only: the stopped job's slot is full");
                    drop(back);
                    break;
                }
                Err(back) => back,
            };
            // Room in the slot, none in the tenant's quota: what is committed is queued past
            // the quota (counted overflowed), as a recovered item is, rather than held here
            // for as long as its other jobs keep it (when they hold most of it), or for
            // longer than an emit would wait (when this job holds it: its routines may be
            // unable to drain it, as a batch larger than what is left).
            let len = back.byte_len() as u64;
            let others_only = committed.elapsed() < job.shared.quota_wait;
            let quota_only = job.nodes[node].queues.lock().blocked_by_quota(
                r,
                slot,
                len,
                job.charge(),
                others_only,
            );
            if quota_only {
                match job.push(node, slot, back, seq, true, Sched::External(pool)) {
                    Ok(()) => break,
                    Err(back) => pending = Some(back),
                }
            } else {
                pending = Some(back);
            }
            job.push_or_wait(
                node,
                slot,
                &mut pending,
                seq,
                Sched::External(pool),
                Duration::from_millis(5),
            );
        }
    }
    Ok(())
}

/// A resolved input of one job's `routine.slot` (from [`JobHandle::input`]). Holds the job
/// open until dropped.
pub struct Input {
    job: Arc<Job>,
    node: usize,
    slot: usize,
    timeout: Duration,
}

impl Input {
    /// Posts a value, waiting up to the runtime's post timeout for room.
    pub fn post<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), RuntimeError> {
        self.post_item(Item::from_serialize(value)?)
    }

    /// Posts an item, waiting up to the runtime's post timeout for room.
    pub fn post_item(&self, item: Item) -> Result<(), RuntimeError> {
        post_resolved(&self.job, self.node, self.slot, item, self.timeout)
    }

    /// Posts an item, waiting up to `timeout` for room (zero: fail at once if full).
    pub fn post_item_timeout(&self, item: Item, timeout: Duration) -> Result<(), RuntimeError> {
        post_resolved(&self.job, self.node, self.slot, item, timeout)
    }

    /// Posts `items` in order, waiting up to the post timeout for room. To a durable job they
    /// are one unit, committed with `positions` (how far each named input was read, for a
    /// resume to go on from): acknowledged together, in one transaction. To another job,
    /// posted one by one (the positions are not kept).
    pub fn post_items(
        &self,
        items: Vec<Item>,
        positions: Vec<(String, u64)>,
    ) -> Result<(), RuntimeError> {
        if self.job.durable.is_some() {
            return post_durable(
                &self.job,
                self.node,
                self.slot,
                items,
                positions,
                self.timeout,
            );
        }
        for item in items {
            self.post_item(item)?;
        }
        Ok(())
    }

    /// Whether the job is durable (posts are committed to its store before they return).
    pub fn is_durable(&self) -> bool {
        self.job.durable.is_some()
    }

    /// The byte budget of the slot: no larger item can be posted to it.
    pub fn byte_budget(&self) -> u64 {
        self.job.flow.routines[self.node].queue_bytes[self.slot]
    }

    /// The most items the slot holds.
    pub fn capacity(&self) -> usize {
        self.job.flow.routines[self.node].capacities[self.slot]
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        self.job.release();
    }
}

/// A summary of a job for people and scripts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job.
    pub job: JobId,
    /// The flow it runs.
    pub flow: String,
    /// Its status.
    pub status: JobStatus,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Counters per routine.
    pub routines: BTreeMap<String, RoutineCounters>,
    /// Failures reported by error strategies.
    pub errors: Vec<ActivationFailure>,
    /// Items kept as dead letters.
    pub dead_lettered: u64,
    /// Items a durable job left unfinished when it halted, queued in its store for a resume
    /// (see [`RoutineCounters::left_in_store`]).
    #[serde(default)]
    pub left_in_store: u64,
    /// Dead letters the job keeps ([`JobHandle::dead_letters`]).
    pub dead_letters_kept: u64,
    /// Dead letters past the job's budgets: counted (and handed to a dead-letter sink, if
    /// any), not kept; and the items they held.
    pub dead_letters_dropped: u64,
    /// Items of the dead letters not kept.
    pub dead_letter_items_dropped: u64,
    /// Output lines streamed but no longer kept (the job keeps the latest within budget).
    pub output_lines_dropped: u64,
    /// The most bytes the job held at once against its memory budget.
    pub peak_memory_bytes: u64,
    /// Wall time from start to finish (or until now).
    pub wall_time_ms: u64,
}

/// A handle to a job. Cheap to clone; outlives the runtime's bookkeeping.
#[derive(Clone)]
pub struct JobHandle {
    job: Arc<Job>,
    post_timeout: Duration,
}

impl fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle")
            .field("id", &self.job.id)
            .field("flow", &self.job.flow_name)
            .field("status", &self.job.status())
            .finish()
    }
}

impl JobHandle {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.job.id
    }

    /// The flow it runs.
    pub fn flow_name(&self) -> &str {
        &self.job.flow_name
    }

    /// Its status. `Failed`/`Cancelled` show at once; [`JobHandle::is_finished`] says when
    /// in-flight activations have also ended.
    pub fn status(&self) -> JobStatus {
        self.job.status()
    }

    /// Why the job failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.job.failure()
    }

    /// Whether the job has finished (nothing runs or can run any more).
    pub fn is_finished(&self) -> bool {
        self.job.is_finished()
    }

    /// Waits for the job to finish; returns whether it did within `timeout`.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.job.wait(timeout)
    }

    /// Posts a value to `routine.slot`, waiting up to the runtime's post timeout for room.
    pub fn post<T: Serialize + ?Sized>(
        &self,
        routine: &str,
        slot: &str,
        value: &T,
    ) -> Result<(), RuntimeError> {
        self.post_item_timeout(
            routine,
            slot,
            Item::from_serialize(value)?,
            self.post_timeout,
        )
    }

    /// Posts an item, waiting up to `timeout` for room (zero: fail at once if full).
    pub fn post_item_timeout(
        &self,
        routine: &str,
        slot: &str,
        item: Item,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let (node, slot_idx) = self.resolve(routine, slot)?;
        self.job.hold().map_err(|e| refused(self.job.id, e))?;
        let result = post_resolved(&self.job, node, slot_idx, item, timeout);
        self.job.release();
        result
    }

    /// An input handle for `routine.slot`: names resolved once, and the job held open until
    /// the handle is dropped (for streaming many items into one job).
    pub fn input(&self, routine: &str, slot: &str) -> Result<Input, RuntimeError> {
        let (node, slot) = self.resolve(routine, slot)?;
        self.job.hold().map_err(|e| refused(self.job.id, e))?;
        Ok(Input {
            job: self.job.clone(),
            node,
            slot,
            timeout: self.post_timeout,
        })
    }

    /// Posts an item, waiting up to the runtime's post timeout.
    pub fn post_item(&self, routine: &str, slot: &str, item: Item) -> Result<(), RuntimeError> {
        self.post_item_timeout(routine, slot, item, self.post_timeout)
    }

    fn resolve(&self, routine: &str, slot: &str) -> Result<(usize, usize), RuntimeError> {
        let flow = &self.job.flow;
        let node = flow
            .routine_index(routine)
            .ok_or_else(|| RuntimeError::UnknownRoutine {
                flow: self.job.flow_name.to_string(),
                routine: routine.to_owned(),
                suggestion: suggest(routine, flow.routines.iter().map(|r| &*r.id)),
            })?;
        let r = &flow.routines[node];
        let slot_idx = r
            .slot_index(slot)
            .ok_or_else(|| RuntimeError::UnknownSlot {
                routine: routine.to_owned(),
                slot: slot.to_owned(),
                suggestion: suggest(slot, r.slot_names.iter().map(|s| &**s)),
            })?;
        Ok((node, slot_idx))
    }

    /// For a durable job, waits until everything it gave its store is on disk (its final
    /// status too, once it finished) and says how many transactions the store committed;
    /// `None` for a job that is not durable.
    pub fn sync_store(&self) -> Option<Result<u64, RuntimeError>> {
        let d = self.job.durable.as_ref()?;
        Some(
            d.store
                .flush()
                .map(|()| d.store.groups())
                .map_err(|e| RuntimeError::Store {
                    job: self.job.id,
                    reason: e.to_string(),
                }),
        )
    }

    /// Keeps the job open for input until the returned guard is dropped.
    pub fn hold_open(&self) -> Result<InputHold, RuntimeError> {
        self.job.hold().map_err(|e| refused(self.job.id, e))?;
        Ok(InputHold {
            job: self.job.clone(),
        })
    }

    /// Cancels the job: nothing new is scheduled, running activations end, queued items stay
    /// (reported as `queued`). Returns false if it had already failed or been cancelled.
    pub fn cancel(&self) -> bool {
        self.job.cancel()
    }

    /// Stops the job gently: it takes no more input and starts no new activation, but the
    /// running activations finish (their emits still reach their slots, past the bound if
    /// need be, since nothing will drain them); armed retries become dead letters and queued
    /// items stay queued. The job then ends as [`JobStatus::Stopped`]. A later
    /// [`JobHandle::cancel`] interrupts what still runs. Returns false if it had already
    /// halted or stopped.
    pub fn stop(&self) -> bool {
        self.job.stop()
    }

    /// Pauses the job: it starts no new activation (the running ones end; an emit of theirs
    /// into a full slot overruns it, boundedly), keeps its queues, still takes posts within
    /// its bounds, and does not finish while paused; a retry that comes due waits. A durable
    /// job records it and, restarted, is paused still. Returns false if it was paused
    /// already, or has finished or halted.
    pub fn pause(&self) -> bool {
        self.job.pause()
    }

    /// Resumes a paused job: its routines are checked again and run what their queues hold.
    /// Returns false if it was not paused.
    pub fn resume(&self) -> bool {
        self.job.unpause()
    }

    /// Whether the job is paused.
    pub fn is_paused(&self) -> bool {
        self.job.paused()
    }

    /// Counters per routine.
    pub fn counters(&self) -> BTreeMap<String, RoutineCounters> {
        self.job.counters()
    }

    /// Failures reported by `stop`/`continue` strategies, in order.
    pub fn errors(&self) -> Vec<ActivationFailure> {
        self.job.failures()
    }

    /// The failures after the first `from` (as [`JobHandle::errors`] lists them: the list
    /// only grows), and how many there are in all: what a follower polling for new ones
    /// needs, without copying the ones it has seen.
    pub fn errors_from(&self, from: usize) -> (Vec<ActivationFailure>, usize) {
        self.job.failures_from(from)
    }

    /// Dead letters, in order.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.job.dead_letters()
    }

    /// Lines logged or printed by routines, in order.
    pub fn output(&self) -> Vec<OutputLine> {
        self.job.output()
    }

    /// A routine's WorkerState in this job (`None` for an unknown routine).
    pub fn worker_state(
        &self,
        routine: &str,
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        let node = self.job.flow.routine_index(routine)?;
        Some(self.job.states[node].lock().snapshot())
    }

    /// Items still queued in a routine's slots.
    pub fn queued_items(&self, routine: &str) -> Option<BTreeMap<String, Vec<Item>>> {
        let node = self.job.flow.routine_index(routine)?;
        Some(self.job.queued_items(node))
    }

    /// A summary for people and scripts.
    pub fn summary(&self) -> JobSummary {
        let routines = self.counters();
        let kept = self.job.retention();
        JobSummary {
            dead_letters_kept: kept.dead_letters_kept,
            dead_letters_dropped: kept.dead_letters_dropped,
            dead_letter_items_dropped: kept.dead_letter_items_dropped,
            output_lines_dropped: kept.output_lines_dropped,
            peak_memory_bytes: kept.peak_memory,
            job: self.job.id,
            flow: self.job.flow_name.to_string(),
            status: self.status(),
            failure: self.failure(),
            dead_lettered: routines.values().map(|c| c.dead_lettered).sum(),
            left_in_store: routines.values().map(|c| c.left_in_store).sum(),
            routines,
            errors: self.errors(),
            wall_time_ms: self.job.wall_time().as_millis() as u64,
        }
    }
}
