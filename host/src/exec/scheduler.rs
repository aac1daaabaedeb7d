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

//! # Fair shares (tenants)
//!
//! A pool built `fair` serves **groups** (the tenants of `routilux serve`) by weight instead
//! of first come, first served. Every task belongs to a group (its job's). Tasks then wait in
//! one FIFO queue per group, not in the workers' deques, and a worker looking for work takes
//! the next task of the group that deserves the worker most ([`Pool::choose`]):
//! 1. a group that would still be within its weighted share of the workers if it got this one
//!    comes before one that would be past it (the share: `size × weight / Σ weights` of the
//!    groups with work queued or running);
//! 2. then the group with the least **virtual time**: the wall time its tasks have occupied
//!    workers, divided by its weight. A worker is charged from the moment it takes a task until
//!    it returns, so a guest that sleeps, blocks in an emit or spins to its deadline costs its
//!    own group;
//! 3. then the group running on fewer workers.
//!
//! It is work-conserving: a worker takes a task whenever any group has one queued. Between
//! two activations a check asks whether it should let its worker go
//! ([`WorkerLocal::should_yield`]: whether the choice above, made now, would pick another
//! group, no worker being idle); if so it queues itself again at the back of its group's
//! queue and returns, so another group's task waits for one activation of a running one,
//! however long the running group's queue. (Not while a worker is inside an activation: a
//! blocked emitter, the nested frames it runs and a retry's inline waits end first; they are
//! charged to their group.)
//!
//! Virtual time is compared against the pool's virtual clock, the least virtual time of the
//! active groups, which never goes back. A group that wakes from idle is raised to at most
//! [`WAKE_CREDIT`] behind that clock: idle time earns no credit, while a debt it ran up (more
//! than its share while others waited, a long activation) is kept, so a bursty group that
//! goes idle between bursts pays for them.
//!
//! A blocked emitter helps only its own group's tasks, so a group's backpressure is never
//! relieved with another group's worker time. One with nothing of its own to help waits on
//! its worker (charged to its group) until its slot has room or the pool stalls (every worker
//! waiting or asleep: then the item overruns, as in any pool).
//!
//! Choosing scans the groups (a few atomics each), which suits tens to hundreds of groups.
//! A pool that is not `fair` ignores groups and keeps the per-worker deques above.
//!
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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use crossbeam_utils::sync::{Parker, Unparker};
use parking_lot::{Condvar, Mutex, RwLock};
use routilux_protocol::wake::Sleepers;

/// How deep a blocked emitter may nest helping activations on its own stack.
pub(crate) const MAX_HELP_DEPTH: u32 = 16;

/// Virtual time is charged wall time in nanoseconds times this, divided by the group's weight
/// (so that a weight of up to [`MAX_WEIGHT`] keeps sub-microsecond precision; a u64 holds 36
/// years of weight-1 time).
const VTIME_SCALE: u64 = 16;

/// The largest weight a group may have.
pub(crate) const MAX_WEIGHT: u32 = 10_000;

/// How far behind the pool's virtual clock a group that wakes from idle may start, in
/// virtual time: 2 ms of weight-1 time.
pub(crate) const WAKE_CREDIT: u64 = 2_000_000 * VTIME_SCALE;

/// A group's place in a fair pool (see the module docs).
pub(crate) struct Share<T> {
    queue: Injector<T>,
    weight: AtomicU32,
    /// Charged wall time, scaled by [`VTIME_SCALE`] and divided by the weight.
    vtime: AtomicU64,
    /// Workers running one of its tasks now.
    running: AtomicUsize,
    /// Wall time its tasks have occupied workers, in nanoseconds.
    busy_ns: AtomicU64,
    /// Its activation rate limit, if it has one.
    rate: Mutex<Option<Bucket>>,
    /// Activations held back by the rate limit (each waited for a token).
    throttled: AtomicU64,
}

/// A token bucket: `per_second` activations, bursts of up to `burst`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl<T> Share<T> {
    fn new(weight: u32, vtime: u64) -> Self {
        Share {
            queue: Injector::new(),
            weight: AtomicU32::new(weight.clamp(1, MAX_WEIGHT)),
            vtime: AtomicU64::new(vtime),
            running: AtomicUsize::new(0),
            busy_ns: AtomicU64::new(0),
            rate: Mutex::new(None),
            throttled: AtomicU64::new(0),
        }
    }

    fn active(&self) -> bool {
        !self.queue.is_empty() || self.running.load(Ordering::SeqCst) > 0
    }

    fn charge(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
        let w = u64::from(self.weight.load(Ordering::Relaxed).max(1));
        let v = ns.saturating_mul(VTIME_SCALE) / w;
        // Saturating: a u64 of virtual time is decades, but never wrap into priority.
        let _ = self
            .vtime
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(v))
            });
    }
}

/// What a group has used of a fair pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ShareUsage {
    pub(crate) weight: u32,
    pub(crate) busy_ns: u64,
    pub(crate) running: usize,
    pub(crate) queued: usize,
    pub(crate) throttled: u64,
    pub(crate) rate: Option<u32>,
}

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
    /// The group (tenant) whose share of a fair pool the task runs on.
    fn group(&self) -> usize;
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
    /// Tasks wait in their group's queue and workers choose by share (module docs).
    fair: bool,
    /// The groups of a fair pool, by index (group 0 always exists; groups are never removed).
    groups: RwLock<Vec<Arc<Share<T>>>>,
    /// Tasks in the groups' queues (counted before a push and after a steal, so never less
    /// than there are): with none, a running check has no reason to yield.
    queued: AtomicUsize,
    /// The pool's virtual clock: the least virtual time of the active groups, never going
    /// back (advanced as tasks end and as groups wake). A group waking from idle starts no
    /// further behind it than [`WAKE_CREDIT`].
    vclock: AtomicU64,
    /// Groups with an activation rate limit (none: no activation asks for a token).
    rated: AtomicUsize,
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
    /// In a fair pool, the group of the task this worker runs and since when it is uncharged.
    charging: RefCell<Option<Charging<T>>>,
}

/// The group a worker is charging (its index and share) and since when it is uncharged.
type Charging<T> = (usize, Arc<Share<T>>, Instant);

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
                if w.pool.fair {
                    w.pool.push_fair(task);
                } else {
                    w.deque.push(task);
                }
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
    pub(crate) fn new(size: usize, park_timeout: Duration, fair: bool) -> (Pool<T>, Vec<Local<T>>) {
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
            fair,
            groups: RwLock::new(vec![Arc::new(Share::new(1, 0))]),
            queued: AtomicUsize::new(0),
            vclock: AtomicU64::new(0),
            rated: AtomicUsize::new(0),
        };
        (pool, locals)
    }

    /// Adds a group of `weight` (clamped to 1..=[`MAX_WEIGHT`]); returns its index.
    pub(crate) fn add_group(&self, weight: u32) -> usize {
        let mut groups = self.groups.write();
        // It starts level with the least-served active group, like a group waking from idle.
        if let Some(floor) = Self::floor(&groups, usize::MAX) {
            self.vclock.fetch_max(floor, Ordering::SeqCst);
        }
        let start = self.vclock.load(Ordering::SeqCst);
        groups.push(Arc::new(Share::new(weight, start)));
        groups.len() - 1
    }

    /// Sets a group's weight; false if there is no such group.
    pub(crate) fn set_weight(&self, group: usize, weight: u32) -> bool {
        match self.groups.read().get(group) {
            Some(s) => {
                s.weight
                    .store(weight.clamp(1, MAX_WEIGHT), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// What a group has used (`None`: no such group).
    pub(crate) fn usage(&self, group: usize) -> Option<ShareUsage> {
        self.groups.read().get(group).map(|s| ShareUsage {
            weight: s.weight.load(Ordering::Relaxed),
            busy_ns: s.busy_ns.load(Ordering::Relaxed),
            running: s.running.load(Ordering::SeqCst),
            queued: s.queue.len(),
            throttled: s.throttled.load(Ordering::Relaxed),
            rate: s.rate.lock().map(|b| b.per_second as u32),
        })
    }

    /// Limits a group to `per_second` activations (bursts of as many), or lifts the limit
    /// (`None`); false if there is no such group.
    pub(crate) fn set_rate(&self, group: usize, per_second: Option<u32>) -> bool {
        let Some(s) = self.groups.read().get(group).cloned() else {
            return false;
        };
        let mut r = s.rate.lock();
        let limited = per_second.is_some_and(|n| n > 0);
        match (r.is_some(), limited) {
            (false, true) => {
                self.rated.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.rated.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        *r = per_second.filter(|&n| n > 0).map(|n| {
            let n = f64::from(n);
            // A new limit starts with a full bucket; a changed one keeps what it had.
            let tokens = r.map_or(n, |b| b.tokens.min(n));
            Bucket {
                per_second: n,
                burst: n,
                tokens,
                at: Instant::now(),
            }
        });
        true
    }

    /// [`Pool::admit`] if `firing` (and any group has a rate limit).
    #[inline]
    pub(crate) fn admit_if(&self, firing: bool, group: usize, now: Instant) -> Result<(), Instant> {
        if !firing || self.rated.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        self.admit(group, now)
    }

    /// Takes a token for one activation of `group` at `now`, or says when the next one comes
    /// (the group is over its rate).
    pub(crate) fn admit(&self, group: usize, now: Instant) -> Result<(), Instant> {
        let Some(s) = self.groups.read().get(group).cloned() else {
            return Ok(());
        };
        let mut r = s.rate.lock();
        let Some(b) = r.as_mut() else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.per_second).min(b.burst);
        b.at = now.max(b.at);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        s.throttled.fetch_add(1, Ordering::Relaxed);
        let wait = (1.0 - b.tokens) / b.per_second;
        Err(now + Duration::from_secs_f64(wait.max(1e-4)))
    }

    /// A group's index and share (an unknown group runs as group 0).
    fn share(&self, group: usize) -> (usize, Arc<Share<T>>) {
        let groups = self.groups.read();
        match groups.get(group) {
            Some(s) => (group, s.clone()),
            None => (0, groups[0].clone()),
        }
    }

    /// The least virtual time among active groups other than `except`.
    fn floor(groups: &[Arc<Share<T>>], except: usize) -> Option<u64> {
        groups
            .iter()
            .enumerate()
            .filter(|&(i, s)| i != except && s.active())
            .map(|(_, s)| s.vtime.load(Ordering::SeqCst))
            .min()
    }

    /// Queues a task of a fair pool in its group's queue.
    fn push_fair(&self, task: T) {
        let groups = self.groups.read();
        let g = if task.group() < groups.len() {
            task.group()
        } else {
            0
        };
        let s = &groups[g];
        if !s.active() {
            // Waking from idle: no credit for the time it was idle (it starts at most
            // WAKE_CREDIT behind the pool's virtual clock); a debt it ran up is kept.
            if let Some(floor) = Self::floor(&groups, g) {
                self.vclock.fetch_max(floor, Ordering::SeqCst);
            }
            let lo = self
                .vclock
                .load(Ordering::SeqCst)
                .saturating_sub(WAKE_CREDIT);
            s.vtime.fetch_max(lo, Ordering::SeqCst);
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        s.queue.push(task);
    }

    /// The group that deserves the next free worker, among those with a task queued (and
    /// `current`, a group running on the asking worker, which counts as if it let the worker
    /// go): (would it pass its share with one more worker, its virtual time, its workers).
    fn choose(&self, groups: &[Arc<Share<T>>], current: Option<usize>) -> Option<usize> {
        let total: u64 = groups
            .iter()
            .enumerate()
            .filter(|&(i, s)| Some(i) == current || s.active())
            .map(|(_, s)| u64::from(s.weight.load(Ordering::Relaxed)))
            .sum();
        let size = self.size as u64;
        groups
            .iter()
            .enumerate()
            .filter(|&(i, s)| Some(i) == current || !s.queue.is_empty())
            .map(|(i, s)| {
                let running = s
                    .running
                    .load(Ordering::SeqCst)
                    .saturating_sub(usize::from(Some(i) == current));
                let weight = u64::from(s.weight.load(Ordering::Relaxed));
                let past_share = (running as u64 + 1) * total > size * weight;
                (
                    (past_share, s.vtime.load(Ordering::SeqCst), running),
                    // On a full tie the running group keeps its worker.
                    Some(i) != current,
                    i,
                )
            })
            .min()
            .map(|(_, _, i)| i)
    }

    /// Takes the next task of a fair pool: of the group [`Pool::choose`] picks, counted
    /// running in it at once (so that a worker choosing right after sees it: counted only
    /// when the task starts, two workers choosing together could both pass the group's share;
    /// [`WorkerLocal::run_charged`] counts it out), or only of group `only` (a blocked
    /// emitter helping its own group, on a worker the group holds already: not counted).
    fn take_fair(&self, only: Option<usize>) -> Option<T> {
        let groups = self.groups.read();
        loop {
            let g = match only {
                Some(g) => groups.get(g).filter(|s| !s.queue.is_empty()).map(|_| g)?,
                None => self.choose(&groups, None)?,
            };
            match groups[g].queue.steal() {
                Steal::Success(t) => {
                    if only.is_none() {
                        groups[g].running.fetch_add(1, Ordering::SeqCst);
                    }
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    return Some(t);
                }
                // Lost a race for the last task, or for a block: choose again.
                Steal::Empty | Steal::Retry => {}
            }
        }
    }

    pub(crate) fn inject(&self, task: T) {
        if self.fair {
            self.push_fair(task);
        } else {
            self.injector.push(task);
        }
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
        if self.fair {
            return self.groups.read().iter().any(|s| !s.queue.is_empty());
        }
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

    /// Takes whatever is left in the injector and the groups' queues (after the workers have
    /// exited).
    pub(crate) fn drain_injector(&self) -> Vec<T> {
        let drain = |q: &Injector<T>| {
            iter::from_fn(|| {
                loop {
                    match q.steal() {
                        Steal::Success(t) => return Some(t),
                        Steal::Empty => return None,
                        Steal::Retry => {}
                    }
                }
            })
            .collect::<Vec<T>>()
        };
        let mut left = drain(&self.injector);
        if self.fair {
            for s in self.groups.read().iter() {
                let d = drain(&s.queue);
                self.queued.fetch_sub(d.len(), Ordering::SeqCst);
                left.extend(d);
            }
        }
        left
    }
}

impl<T: Run> WorkerLocal<T> {
    fn find_task(&self) -> Option<T> {
        let pool = &self.pool;
        if pool.fair {
            return pool.take_fair(None);
        }
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
        let task = if self.pool.fair {
            // Only its own group's tasks: another group's would run on this group's time,
            // and relieve its backpressure with a worker that is not its to give.
            let own = self.charging.borrow().as_ref().map_or(0, |c| c.0);
            self.pool.take_fair(Some(own))
        } else {
            self.find_task()
        };
        match task {
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

    /// Runs a top-level task of a fair pool (counted running in its group when it was taken,
    /// see [`Pool::take_fair`]), charging its group for the wall time.
    fn run_charged(&self, task: T) {
        let (g, share) = self.pool.share(task.group());
        *self.charging.borrow_mut() = Some((g, share, Instant::now()));
        // Charged and counted out even if the task unwinds.
        let _charged = Charged(self);
        task.run(self);
    }

    /// Charges the running task's group for the time since the last charge.
    fn checkpoint(&self) {
        if let Some((_, share, since)) = self.charging.borrow_mut().as_mut() {
            let now = Instant::now();
            share.charge(now - *since);
            *since = now;
        }
    }

    /// Whether a check between two activations should let its worker go, because another
    /// group deserves it more (module docs): only in a fair pool, and only at the bottom of
    /// the stack (a nested frame's worker is held by the frames below it anyway).
    pub(crate) fn should_yield(&self) -> bool {
        if !self.pool.fair || self.depth.get() > 0 || self.pool.queued.load(Ordering::SeqCst) == 0 {
            // (Nothing waits: the task is charged when it ends.)
            return false;
        }
        self.checkpoint();
        let Some(g) = self.charging.borrow().as_ref().map(|c| c.0) else {
            return false;
        };
        let groups = self.pool.groups.read();
        self.pool.choose(&groups, Some(g)).is_some_and(|h| h != g)
    }
}

/// Ends a worker's charging for its task (see [`WorkerLocal::run_charged`]): the last charge,
/// the pool's virtual clock advanced, the group's running count given back.
struct Charged<'a, T: Run>(&'a WorkerLocal<T>);

impl<T: Run> Drop for Charged<'_, T> {
    fn drop(&mut self) {
        let w = self.0;
        w.checkpoint();
        if let Some((_, share, _)) = w.charging.borrow_mut().take() {
            {
                let groups = w.pool.groups.read();
                if let Some(floor) = Pool::floor(&groups, usize::MAX) {
                    w.pool.vclock.fetch_max(floor, Ordering::SeqCst);
                }
            }
            share.running.fetch_sub(1, Ordering::SeqCst);
        }
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
        charging: RefCell::new(None),
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
            if pool.fair {
                local.run_charged(task);
            } else {
                task.run(local);
            }
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
