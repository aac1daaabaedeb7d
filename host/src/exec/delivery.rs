//! Delivery and backpressure: how an emitted item reaches every slot connected to its event,
//! and what an emitter does when a slot is full. The whole full-slot protocol lives here.
//!
//! # An emit, step by step
//!
//! 1. [`Context`](crate::Context) checks the item against the routine's plan and budgets, and
//!    for a retrying routine holds it in the attempt (released by `commit_attempt` in the run
//!    module once the attempt succeeds). Otherwise it asks the job ([`JobPort::emit`]).
//! 2. [`Job::route`] delivers it to each connected slot in turn: all or nothing for each slot.
//!    A slot it cannot reach (the job halted, or the slot could be passed only past its overrun
//!    bound) gets it as a dead letter, as does every later slot, and the emit fails.
//! 3. [`Job::deliver`] pushes into one slot ([`Job::push`]: [`Queues::push`] under the
//!    routine's queue lock, then a check task of the receiving routine if its policy may fire).
//!    On a worker the task goes on the worker's own deque, where an idle worker can steal it,
//!    so a subscriber may start before its emitter returns (streaming).
//! 4. Into a full slot, [`Job::deliver_when_full`] runs the protocol the scheduler's docs
//!    explain under "Backpressure without deadlock": run the slot's routine here if it is
//!    idle (nested on this stack, through a `Task::Help`), wait if it runs elsewhere, help the
//!    pool if it is starved, overrun the bound by one item only when the pool is stalled or the
//!    consumer is suspended under the emitter (a cycle). An emit from a thread the logic
//!    spawned cannot run activations: [`Job::deliver_from_outside`] waits, counted as blocked.
//!
//! Waiting uses the pool's progress condition (`Pool::wait_unless`): the push is retried with
//! the waiter registered, so no wake-up is lost.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::model::context::{EmitError, JobCore, JobPort};
use crate::model::item::Item;

use super::job::{Job, Task, add};
use super::queues::Pushed;
use super::scheduler::{Run, Sched, WorkerLocal, current_worker};

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

impl Job {
    /// The byte budget of `node.slot` if an item of `len` bytes is larger than all of it
    /// (so it could never be queued there, however long one waits).
    pub(crate) fn too_large_for(&self, node: usize, slot: usize, len: u64) -> Option<u64> {
        let budget = self.flow.routines[node].queue_bytes[slot];
        (len > budget).then_some(budget)
    }

    /// Queues `item` into `node.slot` (see [`Queues::push`]: a full slot gives the item back,
    /// unless `overrun`), and schedules a check of `node` if its policy may now fire and none
    /// is scheduled. Never takes an item larger than the slot's whole byte budget (callers
    /// check [`Job::too_large_for`] first). `seq`: the item's place in a durable job's store.
    pub(crate) fn push(
        &self,
        node: usize,
        slot: usize,
        item: Item,
        seq: u64,
        overrun: bool,
        sched: Sched<'_, Task>,
    ) -> Result<(), Item> {
        let r = &self.flow.routines[node];
        let n = &self.nodes[node];
        let schedule = {
            let mut q = n.queues.lock();
            if q.push(r, slot, item, seq, overrun, self.charge())? == Pushed::Overrun {
                add(&n.counters.overflowed, 1);
            }
            let s = !q.scheduled
                && !q.timer_armed
                && q.running < r.concurrency
                && !self.stopping()
                && !self.paused()
                && r.policy.may_fire(&q.slots);
            if s {
                q.scheduled = true;
            }
            s
        };
        if schedule {
            self.add_pending();
            sched.schedule(Task::Check {
                job: self.arc(),
                node,
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for room in `node.slot` and queues the item in `pending` there;
    /// returns whether it did (if not, the item is back in `pending`). No wake-up is lost: the
    /// retry runs with the waiter registered (see `Pool::wait_unless`).
    pub(crate) fn push_or_wait(
        &self,
        node: usize,
        slot: usize,
        pending: &mut Option<Item>,
        seq: u64,
        sched: Sched<'_, Task>,
        timeout: Duration,
    ) -> bool {
        self.shared.pool.wait_unless(timeout, || {
            let Some(item) = pending.take() else {
                return true;
            };
            match self.push(node, slot, item, seq, false, sched) {
                Ok(()) => true,
                Err(back) => {
                    *pending = Some(back);
                    false
                }
            }
        })
    }

    /// A worker blocked on a full slot of `node` tries to run `node` itself (nested on its
    /// stack). In an acyclic flow the consumer is downstream of every frame below it, so it
    /// can never wait on them: this is how backpressure makes progress without inverting
    /// dependencies.
    pub(crate) fn help_consumer(
        &self,
        node: usize,
        slot: usize,
        len: u64,
        w: &WorkerLocal<Task>,
    ) -> Help {
        let r = &self.flow.routines[node];
        {
            let q = self.nodes[node].queues.lock();
            if q.running >= r.concurrency {
                return Help::Busy;
            }
        }
        let help = Task::Help {
            job: self.arc(),
            node,
        };
        match w.nested(|| help.run(w)) {
            Some(true) => return Help::Ran,
            None => return Help::TooDeep,
            Some(false) => {}
        }
        // It did not run: someone else drained the slot meanwhile, it started elsewhere, or
        // its policy really releases nothing.
        let q = self.nodes[node].queues.lock();
        if q.has_room(r, slot, len, self.charge()) {
            Help::Ran
        } else if q.running >= r.concurrency {
            Help::Busy
        } else {
            Help::CannotFire
        }
    }

    /// The id of routine `node`.
    fn name(&self, node: usize) -> &str {
        &self.flow.routines[node].id
    }

    /// Delivers `item` to every slot `ev` is connected to. All or nothing for each slot: when
    /// one delivery fails (the job halted, or a slot could be passed only past its overrun
    /// bound), the item becomes a dead letter of that slot and of every later one it was not
    /// delivered to, and the error is returned. In a durable job, the delivery to route `i`
    /// of the event is the one queued in the store under `seq + i`.
    #[inline]
    pub(crate) fn route(
        &self,
        from: usize,
        ev: usize,
        item: Item,
        seq: u64,
        waited: &mut Duration,
        delivered: &AtomicU64,
    ) -> Result<(), EmitError> {
        let r = &self.flow.routines[from];
        let routes = &r.routes[ev];
        let Some((&(last_node, last_slot), rest)) = routes.split_last() else {
            return Ok(());
        };
        // A failed delivery has kept the item as a dead letter of its own slot; the slots
        // after it get it as a dead letter too.
        let mut seq_of = seq;
        for (i, &(node, slot)) in rest.iter().enumerate() {
            if let Err(e) = self.deliver(from, node, slot, item.clone(), seq_of, waited) {
                let why = format!("not delivered: {e}");
                for &(n, s) in &routes[i + 1..] {
                    seq_of += 1;
                    self.dead_letter_undelivered(n, s, item.clone(), seq_of, why.clone());
                }
                return Err(e);
            }
            seq_of += 1;
            delivered.fetch_add(1, Ordering::Relaxed);
        }
        self.deliver(from, last_node, last_slot, item, seq_of, waited)?;
        delivered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Pushes into one slot. When it is full: runs the slot's routine here if it is idle
    /// (or other work, if that routine is starved), else waits for room; only if the whole
    /// pool stays stalled does it overrun the bound by this one item (counted).
    fn deliver(
        &self,
        from: usize,
        node: usize,
        slot: usize,
        item: Item,
        seq: u64,
        waited: &mut Duration,
    ) -> Result<(), EmitError> {
        let job = self;
        let Some(worker) = current_worker(&job.shared.pool) else {
            let started = Instant::now();
            let result = self.deliver_from_outside(from, node, slot, item, seq);
            *waited += started.elapsed();
            return result;
        };
        let worker = &*worker;
        match job.push(node, slot, item, seq, false, worker.sched()) {
            Ok(()) => Ok(()),
            Err(item) => {
                let started = Instant::now();
                let result = self.deliver_when_full(from, worker, node, slot, item, seq);
                *waited += started.elapsed();
                result
            }
        }
    }

    /// [`Job::deliver`] into a full slot.
    fn deliver_when_full(
        &self,
        from: usize,
        worker: &WorkerLocal<Task>,
        node: usize,
        slot: usize,
        mut item: Item,
        seq: u64,
    ) -> Result<(), EmitError> {
        let job = self;
        let shared = &job.shared;
        // The epoch seen when the pool was first found stalled; overrun only if the pool is
        // still stalled after a grace wait and no batch moved anywhere meanwhile.
        let mut stalled_at: Option<u64> = None;
        let mut quota = QuotaWait::default();
        // The instances this stack holds cannot come back while it waits here: a checkout of
        // their group's quota must not wait for them.
        let _stuck = crate::model::slots::Stuck::enter();
        loop {
            if job.halted() {
                return Err(self.halted_while_waiting(from, node, slot, item, seq));
            }
            if job.stopping() || job.paused() {
                // Stopped or paused: nothing will drain the slot, and the activation is to end.
                return self.overrun(
                    from,
                    worker.sched(),
                    (node, slot, seq),
                    item,
                    "the job is stopping",
                );
            }
            let len = item.byte_len() as u64;
            let (helped, may_overrun) = match job.help_consumer(node, slot, len, worker) {
                Help::Ran => (true, false),
                // Suspended under us on this stack (a cycle): it cannot drain the slot before
                // we return, so waiting would be forever. Overrun now.
                Help::Busy if worker.runs_here(job.key(node)) => {
                    return self.overrun(
                        from,
                        worker.sched(),
                        (node, slot, seq),
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
                quota = QuotaWait::default();
            } else {
                if let Some(e) = quota.check(self, from, (node, slot, seq), &item) {
                    return Err(e);
                }
                // Counted as blocked only while waiting, so a worker that is merely slow
                // (pre-empted between two attempts) never makes the pool look stalled.
                shared.pool.wake_for_queued_work();
                shared.pool.enter_blocked();
                if may_overrun && shared.stalled() {
                    let epoch = shared.pool.epoch();
                    if stalled_at == Some(epoch) {
                        shared.pool.leave_blocked();
                        return self.overrun(
                            from,
                            worker.sched(),
                            (node, slot, seq),
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
                    seq,
                    worker.sched(),
                    Duration::from_millis(1),
                );
                shared.pool.leave_blocked();
                if pushed {
                    return Ok(());
                }
                item = pending.expect("a failed push gives the item back");
            }
            item = match job.push(node, slot, item, seq, false, worker.sched()) {
                Ok(()) => return Ok(()),
                Err(item) => item,
            };
        }
    }

    /// Pushes past the slot's bound (counted as `overflowed`) to break a wait that could
    /// never end; refused once the slot is past its bounds by as much again, and then the
    /// item becomes a dead letter of that slot (it is never dropped).
    /// `(node, slot, seq)`: where to, and the item's seq in a durable job's store.
    fn overrun(
        &self,
        from: usize,
        sched: Sched<'_, Task>,
        (node, slot, seq): (usize, usize, u64),
        item: Item,
        why: &str,
    ) -> Result<(), EmitError> {
        let job = self;
        let r = &job.flow.routines[node];
        tracing::debug!(
            job = %job.id,
            routine = %r.id,
            slot = %r.slot_names[slot],
            emitter = self.name(from),
            "overrunning a full slot by one item: {why}"
        );
        job.push(node, slot, item, seq, true, sched)
            .map_err(|item| {
                let e = EmitError::Overrun {
                    routine: self.name(from).to_owned(),
                    to: format!("{}.{}", r.id, r.slot_names[slot]),
                };
                job.dead_letter_undelivered(node, slot, item, seq, e.to_string());
                e
            })
    }

    /// The emit waited past [`Shared::quota_wait`](super::job::Shared) for its tenant's
    /// memory quota: the item becomes a dead letter of the receiving routine.
    fn quota_spent(
        &self,
        from: usize,
        (node, slot, seq): (usize, usize, u64),
        item: &Item,
        waited: Duration,
    ) -> EmitError {
        let r = &self.flow.routines[node];
        let quota = self.nodes[node]
            .queues
            .lock()
            .refusal(slot, item.byte_len() as u64, self.charge())
            .to_string();
        let e = EmitError::QuotaSpent {
            routine: self.name(from).to_owned(),
            to: format!("{}.{}", r.id, r.slot_names[slot]),
            quota,
            waited,
        };
        self.dead_letter_undelivered(node, slot, item.clone(), seq, e.to_string());
        e
    }

    /// The job halted while an emit waited: the item becomes a dead letter of the receiving
    /// routine (it is never dropped).
    fn halted_while_waiting(
        &self,
        from: usize,
        node: usize,
        slot: usize,
        item: Item,
        seq: u64,
    ) -> EmitError {
        let job = self;
        job.dead_letter_undelivered(
            node,
            slot,
            item,
            seq,
            format!(
                "job halted while `{}` waited for queue space",
                self.name(from)
            ),
        );
        EmitError::JobHalted {
            job: job.id,
            routine: self.name(from).to_owned(),
        }
    }

    /// An emit from a thread that is not one of the pool's workers (a thread the logic
    /// scoped): it cannot run activations, so it waits for room. The worker running the
    /// activation is typically waiting for this thread, so while it waits the emit counts as
    /// that worker blocked; if the whole pool is then stalled (one worker, say) it overruns
    /// the slot as a blocked worker would, instead of waiting forever.
    fn deliver_from_outside(
        &self,
        from: usize,
        node: usize,
        slot: usize,
        item: Item,
        seq: u64,
    ) -> Result<(), EmitError> {
        let job = self;
        let shared = &job.shared;
        let pool = &shared.pool;
        let mut pending = Some(item);
        let mut stalled_at: Option<u64> = None;
        let mut quota = QuotaWait::default();
        loop {
            if job.halted() {
                let item = pending.take().expect("a failed push gives the item back");
                return Err(self.halted_while_waiting(from, node, slot, item, seq));
            }
            if let Some(item) = &pending
                && let Some(e) = quota.check(self, from, (node, slot, seq), item)
            {
                let _ = pending.take();
                return Err(e);
            }
            pool.enter_blocked();
            let stalled = shared.stalled();
            let epoch = pool.epoch();
            if job.stopping() || (stalled && stalled_at == Some(epoch)) {
                pool.leave_blocked();
                let item = pending.take().expect("a failed push gives the item back");
                return self.overrun(
                    from,
                    Sched::External(pool),
                    (node, slot, seq),
                    item,
                    "an emit from outside the pool, which is stalled or stopping",
                );
            }
            stalled_at = stalled.then_some(epoch);
            let pushed = job.push_or_wait(
                node,
                slot,
                &mut pending,
                seq,
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

/// How long an emit has found its slot full only because its tenant's memory quota is spent
/// (by the tenant's other jobs: nothing this job does can make room, and the worker must not
/// be held for as long as another job keeps its memory).
#[derive(Default)]
struct QuotaWait {
    since: Option<Instant>,
}

impl QuotaWait {
    /// The error to fail the emit with (the item made a dead letter), once the slot has been
    /// full by the quota alone for longer than the runtime's post timeout.
    fn check(
        &mut self,
        job: &Job,
        from: usize,
        (node, slot, seq): (usize, usize, u64),
        item: &Item,
    ) -> Option<EmitError> {
        let r = &job.flow.routines[node];
        let len = item.byte_len() as u64;
        let blocked = job.nodes[node]
            .queues
            .lock()
            .blocked_by_group(r, slot, len, job.charge());
        if !blocked {
            self.since = None;
            return None;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        (waited >= job.shared.quota_wait)
            .then(|| job.quota_spent(from, (node, slot, seq), item, waited))
    }
}

impl JobPort for Job {
    fn core(&self) -> &JobCore {
        &self.core
    }

    fn log(&self, node: usize, level: &str, message: String) {
        Job::log(self, node, level, message);
    }

    fn emit(
        &self,
        node: usize,
        ev: usize,
        item: Item,
        waited: &mut Duration,
        delivered: &AtomicU64,
    ) -> Result<(), EmitError> {
        self.count_emit(node);
        self.route(node, ev, item, 0, waited, delivered)
    }

    fn wait_for_memory(
        &self,
        n: u64,
        waited: &mut Duration,
    ) -> Result<(), crate::model::budget::Refusal> {
        let started = Instant::now();
        let result = loop {
            let refused = match self.meter.try_reserve(n) {
                Ok(()) => break Ok(()),
                Err(r) => r,
            };
            if !refused.transient() || self.halted() || started.elapsed() >= self.shared.quota_wait
            {
                break Err(refused);
            }
            self.shared.pool.enter_blocked();
            self.shared
                .pool
                .wait_unless(Duration::from_millis(5), || self.meter.has_room(n));
            self.shared.pool.leave_blocked();
        };
        *waited += started.elapsed();
        result
    }
}
