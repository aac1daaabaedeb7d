//! The work-stealing pool that runs activations.
//!
//! # Design
//!
//! `thread_pool_size` worker threads, exactly; nothing else ever runs routine logic. Work is a
//! [`Task`]: "look at routine R of job J and run it if its policy releases a batch" (a check),
//! or "run this failed batch again" (a retry). Tasks live in a global [`Injector`] (fed by
//! threads outside the pool: posts and the timer) and in one FIFO deque per worker (fed by that
//! worker: an emit schedules the receiving routine on the emitting worker's deque, where an idle
//! worker can steal it — so a subscriber can start before its emitter returns).
//!
//! A worker looks for work in this order (crossbeam-deque's `find_task`): its own deque, then a
//! batch from the injector, then one task from each peer; `Steal::Retry` means "lost a race, try
//! again", so the search repeats until every source says empty or something is found.
//!
//! # Sleeping without lost wake-ups
//!
//! An idle worker does not spin. It adds itself to the idle list, issues a `SeqCst` fence,
//! re-checks every queue, and only then parks. A producer pushes, issues a `SeqCst` fence, and
//! reads the sleeper count; if non-zero it unparks one idle worker. Either the producer sees the
//! sleeper (and wakes it) or the sleeper's re-check sees the task: the two fences forbid both
//! reads missing. `Parker` keeps an unpark that comes before the park, so that case is covered
//! too. A bounded park timeout is a second line of defence, not the mechanism.
//!
//! Wake-ups are throttled as in tokio: a producer wakes nobody while some woken worker is
//! still *searching* (it will find the task); a searcher that finds work and was the last one
//! wakes the next sleeper if more work is queued, so a burst still reaches every worker. A
//! searcher that gives up decrements the count *before* its fenced re-check, so a producer that
//! skipped the wake-up because of it is seen by that re-check.
//!
//! # Backpressure without deadlock
//!
//! An emit into a full slot must wait, but a waiting worker may hold the only thread that could
//! drain that slot (one thread; n threads and n blocked emitters; a cycle). So a blocked emitter
//! (`Context::deliver`) first **runs the full slot's routine itself**, nested on its stack, if
//! that routine is idle. In an acyclic flow every frame on a stack is downstream of the frames
//! below it, so a nested consumer can never wait on its own caller, and the most downstream
//! blocked frame of the pool always has an idle consumer it can run: **an acyclic flow never
//! deadlocks**, with any number of threads (tested with one thread, queues of one item, and
//! floods), and overruns a bound only in the cases below.
//!
//! Otherwise the emitter waits (for a batch to leave a full slot, or 1 ms) and tries again:
//! - the consumer runs on another worker: it will drain the slot; wait;
//! - the consumer is suspended *under the emitter on the same stack* (a cycle): waiting would
//!   be forever, so the item overruns the bound at once;
//! - the consumer is idle but its policy releases nothing (`all_slots_ready` starved of its
//!   other slot, say): the emitter runs any other task, which may feed it.
//!
//! Only in the last case, or in a cyclic flow, or past [`MAX_HELP_DEPTH`] nested frames (an
//! acyclic chain of more than 16 full slots with one thread does reach it), or for an emit
//! from a thread the logic spawned (it cannot run activations, and the worker it belongs to
//! waits for it), may the emitter overrun when the whole pool is **stalled**: every worker
//! waiting in an emit or asleep, no timer armed, and no batch taken anywhere during a 1 ms
//! grace wait (a progress epoch, bumped when a batch is taken while someone is blocked, proves
//! that). A worker counts as blocked only while it waits, never while it merely runs slowly.
//! Every overrun item is counted per routine (`overflowed`); it is never dropped; and a slot is
//! overrun only so far (its bound again, or 1,024 items), past which the emit fails.

//! # Shutdown
//!
//! 1. The runtime cancels every unfinished job: checks stop releasing batches, blocked emitters
//!    return `JobHalted`, posts are refused.
//! 2. The timer thread stops; its armed tasks are abandoned (a pending retry's items become
//!    dead letters, so they are not lost) and their jobs' pending counts released.
//! 3. The `shutdown` flag is set and every worker unparked. A worker exits only when its search
//!    finds no task, so its own deque is empty when it leaves; tasks of cancelled jobs run only
//!    their bookkeeping.
//! 4. The runtime joins the workers, then abandons whatever is left in the injector.
//!
//! Native logic cannot be pre-empted: shutdown waits for activations already running.

use std::cell::{Cell, RefCell};
use std::iter;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::time::Duration;

use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use crossbeam_utils::sync::{Parker, Unparker};
use parking_lot::{Condvar, Mutex};

use crate::activation::Batch;
use crate::job::Job;
use crate::runtime::Shared;

/// How deep a blocked emitter may nest helping activations on its own stack.
pub(crate) const MAX_HELP_DEPTH: u32 = 16;

/// A unit of work for the pool.
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
}

impl Task {
    fn run(self, w: &WorkerLocal) {
        match self {
            Task::Check { job, node } => job.run_check(node, false, w),
            Task::TimerCheck { job, node } => job.run_check(node, true, w),
            Task::Retry {
                job,
                node,
                batch,
                attempt,
            } => job.run_retry(node, batch, attempt, w),
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
        }
    }

    /// Whether the task's job takes no new work (failed, cancelled or stopped).
    pub(crate) fn job_halted(&self) -> bool {
        match self {
            Task::Check { job, .. } | Task::TimerCheck { job, .. } | Task::Retry { job, .. } => {
                job.stopping()
            }
        }
    }

    /// Its job's status (`failed` or `cancelled` once halted).
    pub(crate) fn job_status(&self) -> crate::JobStatus {
        match self {
            Task::Check { job, .. } | Task::TimerCheck { job, .. } | Task::Retry { job, .. } => {
                job.status()
            }
        }
    }

    /// The job the task belongs to.
    pub(crate) fn job(&self) -> *const Job {
        match self {
            Task::Check { job, .. } | Task::TimerCheck { job, .. } | Task::Retry { job, .. } => {
                Arc::as_ptr(job)
            }
        }
    }
}

/// The shared half of the pool.
pub(crate) struct Pool {
    injector: Injector<Task>,
    stealers: Box<[Stealer<Task>]>,
    idle: Mutex<Vec<usize>>,
    sleepers: AtomicUsize,
    unparkers: Box<[Unparker]>,
    shutdown: AtomicBool,
    /// Workers woken to look for a task that have not found one yet.
    searching: AtomicUsize,
    /// Workers waiting (in `wait_progress`) inside an emit, having found nothing to help with.
    blocked: AtomicUsize,
    /// Bumped whenever a batch leaves a queue: a stalled pool does not move it.
    epoch: AtomicU64,
    progress_lock: Mutex<()>,
    progress: Condvar,
    progress_waiters: AtomicUsize,
    size: usize,
    /// How long an idle worker sleeps without a wake-up before it looks again.
    park_timeout: Duration,
}

/// What each worker thread owns; handed to logic through the activation context.
pub(crate) struct WorkerLocal {
    deque: Worker<Task>,
    shared: Arc<Shared>,
    depth: Cell<u32>,
    /// How many frames on this stack run an arbitrary task taken by `help_once` (which, unlike
    /// running the full slot's own routine, can put an upstream routine above a downstream one).
    foreign: Cell<u32>,
    /// The activations on this thread's stack, outermost first, as (job address, routine).
    active: RefCell<Vec<(usize, usize)>>,
}

/// Where a newly ready task goes: the current worker's deque, or the injector.
#[derive(Clone, Copy)]
pub(crate) enum Sched<'a> {
    Worker(&'a WorkerLocal),
    External(&'a Pool),
}

impl Sched<'_> {
    pub(crate) fn schedule(self, task: Task) {
        match self {
            Sched::Worker(w) => {
                w.deque.push(task);
                w.shared.pool.notify_one();
            }
            Sched::External(pool) => pool.inject(task),
        }
    }
}

impl Pool {
    /// Creates the pool's shared half and the per-worker deques and parkers.
    pub(crate) fn new(size: usize, park_timeout: Duration) -> (Pool, Vec<(Worker<Task>, Parker)>) {
        let locals: Vec<(Worker<Task>, Parker)> = (0..size)
            .map(|_| (Worker::new_fifo(), Parker::new()))
            .collect();
        let pool = Pool {
            injector: Injector::new(),
            stealers: locals.iter().map(|(w, _)| w.stealer()).collect(),
            idle: Mutex::new(Vec::with_capacity(size)),
            sleepers: AtomicUsize::new(0),
            unparkers: locals.iter().map(|(_, p)| p.unparker().clone()).collect(),
            shutdown: AtomicBool::new(false),
            searching: AtomicUsize::new(0),
            blocked: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            progress_lock: Mutex::new(()),
            progress: Condvar::new(),
            progress_waiters: AtomicUsize::new(0),
            size,
            park_timeout,
        };
        (pool, locals)
    }

    pub(crate) fn inject(&self, task: Task) {
        self.injector.push(task);
        if self.shutdown.load(Ordering::SeqCst) {
            // The workers may be gone: nobody else would ever take it. (Steals are exclusive,
            // so a task is abandoned or run once, whoever gets it.)
            for t in self.drain_injector() {
                t.abandon("runtime shut down");
            }
            return;
        }
        self.notify_one();
    }

    /// Wakes one sleeping worker for a newly pushed task — unless a worker is already
    /// searching: it will find the task, and waking more would only add context switches.
    fn notify_one(&self) {
        fence(Ordering::SeqCst);
        if self.searching.load(Ordering::SeqCst) > 0 || self.sleepers.load(Ordering::SeqCst) == 0 {
            return;
        }
        let woken = {
            let mut idle = self.idle.lock();
            let w = idle.pop();
            if w.is_some() {
                // The woken worker searches; it learns so by finding itself off the idle list.
                self.searching.fetch_add(1, Ordering::SeqCst);
            }
            self.sleepers.store(idle.len(), Ordering::SeqCst);
            w
        };
        if let Some(i) = woken {
            self.unparkers[i].unpark();
        }
    }

    fn has_work(&self) -> bool {
        !self.injector.is_empty() || self.stealers.iter().any(|s| !s.is_empty())
    }

    /// A batch left a queue. If an emitter is blocked, bump the epoch (it proves the pool is
    /// not stalled; a waiter counts itself blocked before reading the epoch, so it cannot miss
    /// a bump). If the batch came from a full slot, wake waiters: one may be waiting for room
    /// there. (Waiters also re-check on a short timeout, so a wake-up is an optimisation.)
    pub(crate) fn record_progress(&self, freed_full: bool) {
        if self.blocked.load(Ordering::SeqCst) > 0 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if freed_full {
            self.notify_progress();
        }
    }

    /// The progress epoch (see [`Pool::record_progress`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Wakes threads waiting for queue space or for a change in the pool's state.
    pub(crate) fn notify_progress(&self) {
        if self.progress_waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.progress_lock.lock();
            self.progress.notify_all();
        }
    }

    /// Waits up to `timeout` for room, unless `ready` (a retried push) succeeds first.
    /// `ready` runs with the waiter already registered and the wake-up lock held, so a batch
    /// taken after it failed always finds the waiter asleep and wakes it: no lost wake-up.
    pub(crate) fn wait_unless(&self, timeout: Duration, ready: impl FnOnce() -> bool) -> bool {
        let mut g = self.progress_lock.lock();
        self.progress_waiters.fetch_add(1, Ordering::SeqCst);
        let done = ready();
        if !done {
            self.progress.wait_for(&mut g, timeout);
        }
        self.progress_waiters.fetch_sub(1, Ordering::SeqCst);
        done
    }

    /// Whether no worker can move: every one is waiting in an emit or asleep, and no sleeper
    /// is about to be needed for queued work. (Queued tasks with every worker waiting do not
    /// count as progress: waiting workers do not run them.)
    pub(crate) fn stalled(&self) -> bool {
        let sleepers = self.sleepers.load(Ordering::SeqCst);
        self.blocked.load(Ordering::SeqCst) + sleepers >= self.size
            && !(sleepers > 0 && self.has_work())
    }

    /// A waiting worker may hold stolen tasks in its own deque: make sure a sleeper takes them.
    pub(crate) fn wake_for_queued_work(&self) {
        if self.has_work() {
            self.notify_one();
        }
    }

    pub(crate) fn enter_blocked(&self) {
        self.blocked.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn leave_blocked(&self) {
        self.blocked.fetch_sub(1, Ordering::SeqCst);
    }

    /// Number of worker threads.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for u in self.unparkers.iter() {
            u.unpark();
        }
    }

    /// Takes whatever is left in the injector (after the workers have exited).
    pub(crate) fn drain_injector(&self) -> Vec<Task> {
        iter::from_fn(|| {
            loop {
                match self.injector.steal() {
                    Steal::Success(t) => return Some(t),
                    Steal::Empty => return None,
                    Steal::Retry => {}
                }
            }
        })
        .collect()
    }
}

impl WorkerLocal {
    fn find_task(&self) -> Option<Task> {
        let pool = &self.shared.pool;
        self.deque.pop().or_else(|| {
            iter::repeat_with(|| {
                pool.injector
                    .steal_batch_and_pop(&self.deque)
                    .or_else(|| pool.stealers.iter().map(Stealer::steal).collect())
            })
            .find(|s| !s.is_retry())
            .and_then(Steal::success)
        })
    }

    /// Runs `f` nested on this (blocked emitter's) stack; refused (`None`) past
    /// [`MAX_HELP_DEPTH`].
    pub(crate) fn nested<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        if self.depth.get() >= MAX_HELP_DEPTH {
            return None;
        }
        let _depth = Restore::add(&self.depth, 1);
        Some(f())
    }

    /// Runs any one task on this stack, if there is one (a blocked emitter whose consumer
    /// cannot fire helps the rest of the pool, which may feed that consumer).
    pub(crate) fn help_once(&self) -> bool {
        if self.depth.get() >= MAX_HELP_DEPTH {
            return false;
        }
        match self.find_task() {
            Some(task) => {
                let _foreign = Restore::add(&self.foreign, 1);
                self.nested(|| task.run(self)).is_some()
            }
            None => false,
        }
    }

    /// Whether some frame on this stack was taken by `help_once` (so a wait here may be part
    /// of a cycle of waits even in an acyclic flow).
    pub(crate) fn has_foreign_frames(&self) -> bool {
        self.foreign.get() > 0
    }

    /// Marks an activation of `(job, node)` as running on this stack until [`Self::exit`].
    pub(crate) fn enter(&self, job: &Arc<Job>, node: usize) {
        self.active
            .borrow_mut()
            .push((Arc::as_ptr(job) as usize, node));
    }

    pub(crate) fn exit(&self) {
        self.active.borrow_mut().pop();
    }

    /// Whether an activation of `(job, node)` is suspended on this very stack (so waiting for
    /// it to finish would wait forever).
    pub(crate) fn runs_here(&self, job: &Arc<Job>, node: usize) -> bool {
        let key = (Arc::as_ptr(job) as usize, node);
        self.active.borrow().contains(&key)
    }

    pub(crate) fn sched(&self) -> Sched<'_> {
        Sched::Worker(self)
    }
}

/// Adds to a counter for a scope, restoring it on exit (unwinding included).
struct Restore<'a>(&'a Cell<u32>, u32);

impl<'a> Restore<'a> {
    fn add(cell: &'a Cell<u32>, n: u32) -> Self {
        cell.set(cell.get() + n);
        Restore(cell, n)
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - self.1);
    }
}

thread_local! {
    /// The pool worker running on this thread, if it is one.
    static CURRENT: RefCell<Option<Rc<WorkerLocal>>> = const { RefCell::new(None) };
}

/// This thread's worker, if this thread is a worker of the pool behind `shared`. (Logic gets
/// its worker this way rather than through its context, so that a context can be kept where
/// only `'static + Send` data may live, such as a WebAssembly store.)
pub(crate) fn current_worker(shared: &Arc<Shared>) -> Option<Rc<WorkerLocal>> {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|w| Arc::ptr_eq(&w.shared, shared))
            .cloned()
    })
}

/// The body of worker thread `index`.
pub(crate) fn worker_main(shared: Arc<Shared>, index: usize, deque: Worker<Task>, parker: Parker) {
    let local = Rc::new(WorkerLocal {
        deque,
        shared,
        depth: Cell::new(0),
        foreign: Cell::new(0),
        active: RefCell::new(Vec::new()),
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(local.clone()));
    run_worker(&local, index, &parker);
    CURRENT.with(|c| c.borrow_mut().take());
}

fn run_worker(local: &WorkerLocal, index: usize, parker: &Parker) {
    let pool = &local.shared.pool;
    // Whether this worker is counted in `pool.searching` (it was woken for a task).
    let mut searching = false;
    loop {
        if let Some(task) = local.find_task() {
            if std::mem::take(&mut searching)
                && pool.searching.fetch_sub(1, Ordering::SeqCst) == 1
                && pool.has_work()
            {
                // The last searcher found work: hand the search on, so that a burst of tasks
                // ramps up to every worker.
                pool.notify_one();
            }
            task.run(local);
            continue;
        }
        if std::mem::take(&mut searching) {
            pool.searching.fetch_sub(1, Ordering::SeqCst);
        }
        if pool.shutdown.load(Ordering::SeqCst) {
            break;
        }
        {
            let mut idle = pool.idle.lock();
            idle.push(index);
            pool.sleepers.store(idle.len(), Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        if !pool.has_work() && !pool.shutdown.load(Ordering::SeqCst) {
            // A blocked emitter may be waiting to see whether the pool has stalled.
            pool.notify_progress();
            parker.park_timeout(pool.park_timeout);
        }
        let mut idle = pool.idle.lock();
        if let Some(pos) = idle.iter().position(|&i| i == index) {
            idle.swap_remove(pos);
            pool.sleepers.store(idle.len(), Ordering::SeqCst);
        } else {
            // A notifier took us off the list and counted us as searching.
            searching = true;
        }
    }
}
