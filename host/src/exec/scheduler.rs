//! The work-stealing pool that runs activations.
//!
//! # Design
//!
//! `thread_pool_size` worker threads, exactly; nothing else ever runs routine logic. Work is a
//! task (the job module's `Task`, which this module sees only as [`Run`]): "look at routine R
//! of job J and run it if its policy releases a batch" (a check), or "run this failed batch
//! again" (a retry). Tasks live in a global [`Injector`] (fed by
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
//! An idle worker does not spin: it registers as a sleeper, re-checks every queue, and only
//! then parks; a producer pushes, then wakes a sleeper unless a woken one is still searching.
//! The protocol, and why no wake-up is lost, is `routilux_protocol::wake` (its own crate, so
//! that loom can check it: `just loom`). A bounded park timeout is a second line of defence,
//! not the mechanism; tests set it to hours so that a lost wake-up shows as a hang.
//!
//! # Backpressure without deadlock
//!
//! An emit into a full slot must wait, but a waiting worker may hold the only thread that could
//! drain that slot (one thread; n threads and n blocked emitters; a cycle). So a blocked emitter
//! (the delivery module's `Job::deliver`) first **runs the full slot's routine itself**, nested on its stack, if
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::LocalKey;
use std::time::Duration;

use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use crossbeam_utils::sync::{Parker, Unparker};
use parking_lot::{Condvar, Mutex};
use routilux_protocol::wake::Sleepers;

/// How deep a blocked emitter may nest helping activations on its own stack.
pub(crate) const MAX_HELP_DEPTH: u32 = 16;

/// A unit of work for the pool: what the engine schedules (the execution layer's `Task`).
/// The pool only moves tasks between threads and runs them; what running one does is the
/// task's own business, so this module names nothing of the engine.
pub(crate) trait Run: Send + Sized + 'static {
    /// Runs the task on worker `w`; returns whether it ran an activation.
    fn run(self, w: &WorkerLocal<Self>) -> bool;
    /// Drops the task without running it, releasing what it holds (its job halted, or the
    /// runtime is shutting down); `why` says which.
    fn abandon(self, why: &str);
    /// Who the task belongs to (its job's address), to disarm a job's timers together.
    fn owner(&self) -> usize;
    /// Why the task may no longer be armed on the timer (its job takes no new work), if so.
    fn refused(&self) -> Option<String>;
    /// The thread-local slot that holds the worker running on this thread, if it is one
    /// (declared where the task type is: a `thread_local!` cannot be generic).
    fn current() -> &'static LocalKey<Current<Self>>;
}

/// What a worker thread keeps in its [`Run::current`] slot.
pub(crate) type Current<T> = RefCell<Option<Rc<WorkerLocal<T>>>>;

/// The shared half of the pool.
pub(crate) struct Pool<T> {
    injector: Injector<T>,
    stealers: Box<[Stealer<T>]>,
    /// The idle workers, and those woken to search (the wake-up protocol:
    /// `routilux_protocol::wake`, model-checked with loom).
    sleepers: Sleepers,
    unparkers: Box<[Unparker]>,
    shutdown: AtomicBool,
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
pub(crate) struct WorkerLocal<T> {
    deque: Worker<T>,
    pool: Arc<Pool<T>>,
    depth: Cell<u32>,
    /// How many frames on this stack run an arbitrary task taken by `help_once` (which, unlike
    /// running the full slot's own routine, can put an upstream routine above a downstream one).
    foreign: Cell<u32>,
    /// The activations on this thread's stack, outermost first, as (job address, routine).
    active: RefCell<Vec<(usize, usize)>>,
}

/// Where a newly ready task goes: the current worker's deque, or the injector.
pub(crate) enum Sched<'a, T> {
    Worker(&'a WorkerLocal<T>),
    External(&'a Pool<T>),
}

impl<T> Clone for Sched<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Sched<'_, T> {}

impl<T: Run> Sched<'_, T> {
    #[inline]
    pub(crate) fn schedule(self, task: T) {
        match self {
            Sched::Worker(w) => {
                w.deque.push(task);
                w.pool.notify_one();
            }
            Sched::External(pool) => pool.inject(task),
        }
    }
}

/// A worker's own deque and parker, handed to [`worker_main`].
pub(crate) type Local<T> = (Worker<T>, Parker);

impl<T: Run> Pool<T> {
    /// Creates the pool's shared half and the per-worker deques and parkers.
    pub(crate) fn new(size: usize, park_timeout: Duration) -> (Pool<T>, Vec<Local<T>>) {
        let locals: Vec<Local<T>> = (0..size)
            .map(|_| (Worker::new_fifo(), Parker::new()))
            .collect();
        let pool = Pool {
            injector: Injector::new(),
            stealers: locals.iter().map(|(w, _)| w.stealer()).collect(),
            sleepers: Sleepers::new(size),
            unparkers: locals.iter().map(|(_, p)| p.unparker().clone()).collect(),
            shutdown: AtomicBool::new(false),
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

    pub(crate) fn inject(&self, task: T) {
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
    #[inline]
    fn notify_one(&self) {
        if let Some(i) = self.sleepers.notify_one() {
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
    #[inline]
    pub(crate) fn record_progress(&self, freed_full: bool) {
        if self.blocked.load(Ordering::SeqCst) > 0 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if freed_full {
            self.notify_progress();
        }
    }

    /// The progress epoch (see [`Pool::record_progress`]).
    #[inline]
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
        let sleepers = self.sleepers.sleeping();
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
    pub(crate) fn drain_injector(&self) -> Vec<T> {
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

impl<T: Run> WorkerLocal<T> {
    fn find_task(&self) -> Option<T> {
        let pool = &self.pool;
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

    /// Marks an activation of `key` (its job's address and routine) as running on this stack
    /// until [`Self::exit`].
    pub(crate) fn enter(&self, key: (usize, usize)) {
        self.active.borrow_mut().push(key);
    }

    pub(crate) fn exit(&self) {
        self.active.borrow_mut().pop();
    }

    /// Whether an activation of `key` is suspended on this very stack (so waiting for it to
    /// finish would wait forever).
    pub(crate) fn runs_here(&self, key: (usize, usize)) -> bool {
        self.active.borrow().contains(&key)
    }

    pub(crate) fn sched(&self) -> Sched<'_, T> {
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

/// This thread's worker, if this thread is a worker of `pool`. (Logic gets its worker this
/// way rather than through its context, so that a context can be kept where only
/// `'static + Send` data may live, such as a WebAssembly store.)
#[inline]
pub(crate) fn current_worker<T: Run>(pool: &Arc<Pool<T>>) -> Option<Rc<WorkerLocal<T>>> {
    T::current().with(|c| {
        c.borrow()
            .as_ref()
            .filter(|w| Arc::ptr_eq(&w.pool, pool))
            .cloned()
    })
}

/// The body of worker thread `index`.
pub(crate) fn worker_main<T: Run>(pool: Arc<Pool<T>>, index: usize, (deque, parker): Local<T>) {
    let local = Rc::new(WorkerLocal {
        deque,
        pool,
        depth: Cell::new(0),
        foreign: Cell::new(0),
        active: RefCell::new(Vec::new()),
    });
    T::current().with(|c| *c.borrow_mut() = Some(local.clone()));
    run_worker(&local, index, &parker);
    T::current().with(|c| c.borrow_mut().take());
}

fn run_worker<T: Run>(local: &WorkerLocal<T>, index: usize, parker: &Parker) {
    let pool = &local.pool;
    // Whether this worker counts as searching (it was woken for a task).
    let mut searching = false;
    loop {
        if let Some(task) = local.find_task() {
            if pool.sleepers.found(std::mem::take(&mut searching)) && pool.has_work() {
                // The last searcher found work: hand the search on, so that a burst of tasks
                // ramps up to every worker.
                pool.notify_one();
            }
            task.run(local);
            continue;
        }
        pool.sleepers.give_up(std::mem::take(&mut searching));
        if pool.shutdown.load(Ordering::SeqCst) {
            break;
        }
        pool.sleepers.register(index);
        if !pool.has_work() && !pool.shutdown.load(Ordering::SeqCst) {
            // A blocked emitter may be waiting to see whether the pool has stalled.
            pool.notify_progress();
            parker.park_timeout(pool.park_timeout);
        }
        // Off the list by a notifier: woken for a task, and counted as searching.
        searching = pool.sleepers.deregister(index);
    }
}
