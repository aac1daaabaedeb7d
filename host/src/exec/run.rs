//! Running activations: what a worker does with a task.
//!
//! A check task drives a routine ([`Job::drive`]): under the routine's queue lock its policy
//! decides, a released batch is taken from its queues and numbered, and [`Job::activate`] runs
//! the logic on it, applies the routine's error strategy (retry inline or on the timer, stop,
//! continue, skip: every failed batch is kept as a dead letter), and for a retrying routine
//! commits the attempt as one unit. The loop goes on while the policy releases batches, up to
//! a number of rounds, then yields the worker.
//!
//! This is the top of the execution layer: the pool runs tasks through [`Run`], and a blocked
//! emitter in the delivery module runs the full slot's routine through a `Task::Help`, so
//! neither names this module.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::LocalKey;
use std::time::{Duration, Instant, SystemTime};

use crate::model::activation::{Batch, Decision, Policy, panic_message};
use crate::model::budget::cut;
use crate::model::context::{Context, Held};
use crate::model::report::ActivationFailure;
use crate::model::spec::{ErrorStrategy, Exhausted, RoutineError};

use super::job::{Job, Task, add};
use super::scheduler::{Current, Run, WorkerLocal};
use super::store::{ArmedRetry, Op, Ticket};

/// How many failed activations of one routine are logged as warnings (the rest at debug).
const LOGGED_FAILURES: u64 = 5;

/// How many activations a check runs back to back before yielding its worker.
const MAX_ROUNDS: u32 = 64;

/// How many activations of a durable job a drive runs ahead of the disk (see [`Unsettled`]).
const MAX_UNSETTLED: usize = 32;

/// An activation of a durable job whose unit is submitted to its store and not yet known to
/// be on disk: its emits wait here, undelivered (downstream never sees an item that is not on
/// disk), while its routine's next activation runs. Its WorkerState changes are applied: the
/// next activation sees them, and its own unit commits in the same group or a later one, so
/// on disk the two are there together or the earlier alone. If the store fails, the job
/// fails with it and the store is the record a resume starts from.
struct Unsettled {
    ticket: Ticket,
    emits: Vec<(usize, crate::model::item::Item)>,
    /// The emits' bytes, on the job's meter until delivered.
    charge: crate::model::context::HeldCharge,
    /// The seq of its first delivery.
    base: u64,
    /// The items its batch consumed.
    items: u64,
}

/// How many activation failures a job keeps in its report (every one is counted in its
/// routine's `errors`, and its items kept as a dead letter).
const MAX_KEPT_FAILURES: usize = 1_000;

impl Run for Task {
    fn run(self, w: &WorkerLocal<Task>) -> bool {
        match self {
            Task::Check { job, node } => job.run_check(node, false, w),
            Task::TimerCheck { job, node } => job.run_check(node, true, w),
            Task::Retry {
                job,
                node,
                batch,
                attempt,
            } => job.run_retry(node, batch, attempt, w),
            Task::Help { job, node } => return job.drive(node, false, w),
        }
        true
    }

    fn abandon(self, why: &str) {
        Task::abandon(self, why);
    }

    fn owner(&self) -> usize {
        Arc::as_ptr(self.job()) as usize
    }

    fn group(&self) -> usize {
        self.job().group
    }

    fn refused(&self) -> Option<String> {
        let job = self.job();
        job.stopping().then(|| format!("job {}", job.status()))
    }

    fn current() -> &'static LocalKey<Current<Task>> {
        &CURRENT
    }
}

thread_local! {
    /// The pool worker running on this thread, if it is one.
    static CURRENT: Current<Task> = const { RefCell::new(None) };
}

/// How often a retry that came due while its job was paused looks again.
const PAUSED_RETRY_POLL: Duration = Duration::from_millis(50);

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

impl Job {
    /// A check task: run `node` while its policy releases batches.
    pub(crate) fn run_check(
        self: &Arc<Self>,
        node: usize,
        from_timer: bool,
        w: &WorkerLocal<Task>,
    ) {
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
        w: &WorkerLocal<Task>,
    ) {
        if self.paused() && !self.stopping() {
            // Paused: the retry waits (still armed) until the job is resumed.
            self.shared.timer.schedule(
                Instant::now() + PAUSED_RETRY_POLL,
                Task::Retry {
                    job: self.clone(),
                    node,
                    batch,
                    attempt,
                },
            );
            return;
        }
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

    /// Runs activations of `node` while its policy releases batches; returns whether it ran
    /// any. `holding`: the caller owns one `running` slot from an activation that just ended.
    ///
    /// In a durable job an activation here does not wait for its unit to reach the disk: its
    /// emits wait in `unsettled` (in order) while the next activation runs, and are delivered
    /// once their group has committed (see [`Unsettled`]). The running slot is kept until
    /// every one is delivered, so a routine's emits reach their slots in the order its
    /// activations ran, as they do in memory.
    fn drive(self: &Arc<Self>, node: usize, mut holding: bool, w: &WorkerLocal<Task>) -> bool {
        let r = &self.flow.routines[node];
        let n = &self.nodes[node];
        let mut ran = false;
        let mut unsettled: Vec<Unsettled> = Vec::new();
        for round in 0.. {
            if !unsettled.is_empty() {
                // Deliver what is on disk already; wait once too many are unsettled.
                let full = unsettled.len() >= MAX_UNSETTLED;
                self.settle(node, &mut unsettled, full, w);
            }
            let freed_full;
            // Yield the worker after MAX_ROUNDS, or in a fair pool as soon as another group
            // deserves it more (asked before the queue lock is taken).
            let yielding = round >= MAX_ROUNDS || (round > 0 && w.should_yield());
            let batch = {
                let mut q = n.queues.lock();
                let others = q.running - usize::from(holding);
                let now = Instant::now();
                let decision = if self.stopping() || self.paused() || others >= r.concurrency {
                    None
                } else if yielding {
                    Some(Decision::Idle)
                } else {
                    let d = r.policy.decide(&r.slot_names, &q.slots, q.last_fire, now);
                    // A group over its activation rate waits (on the timer) for its next
                    // token, the batch left queued.
                    match (
                        &d,
                        self.shared
                            .pool
                            .admit_if(matches!(d, Decision::Fire(..)), self.group, now),
                    ) {
                        (Decision::Fire(..), Err(at)) => Some(Decision::WaitUntil(at)),
                        _ => Some(d),
                    }
                };
                if !unsettled.is_empty() && !matches!(decision, Some(Decision::Fire(..))) {
                    // This drive ends: deliver every unsettled emit first, holding the slot
                    // (a delivery may release more here: decide again).
                    drop(q);
                    self.settle(node, &mut unsettled, true, w);
                    continue;
                }
                if std::mem::take(&mut holding) {
                    q.running -= 1;
                }
                let Some(decision) = decision else {
                    return ran;
                };
                if yielding {
                    // Yield the worker: others' tasks wait behind us. Continue as a new task,
                    // at the back of the shared queue (this worker's own deque is taken first,
                    // so a check queued there would starve every task queued from outside).
                    if !q.scheduled && q.any_queued() {
                        q.scheduled = true;
                        drop(q);
                        self.add_pending();
                        self.shared.pool.inject(Task::Check {
                            job: self.clone(),
                            node,
                        });
                    }
                    return ran;
                }
                match decision {
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
                        // A producer can only be waiting on a slot that was full.
                        let (data, freed, seqs) = q.take(r, &counts, self.charge());
                        freed_full = freed;
                        // Room for a parallel activation and more to release: let another
                        // worker take it.
                        if q.running < r.concurrency
                            && !q.scheduled
                            && q.any_queued()
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
                        // one keeps its number (the stable activation id a guest can read). In
                        // a durable job the number is its first item's seq plus one, the same
                        // again when it re-runs after a restart.
                        q.formed += 1;
                        let number = match seqs.first() {
                            Some(&(_, seq)) => seq + 1,
                            None => q.formed,
                        };
                        Batch::new(
                            r.slot_names.clone(),
                            data,
                            message.or_else(|| r.message.clone()),
                        )
                        .numbered(number)
                        .with_seqs(seqs)
                    }
                }
            };
            ran = true;
            self.shared.pool.record_progress(freed_full);
            let pipeline = self.durable.is_some().then_some(&mut unsettled);
            if let Outcome::Deferred = self.activate_with(node, batch, 0, w, pipeline) {
                // The retry task owns the running slot now; what ran before it is delivered
                // first.
                self.settle(node, &mut unsettled, true, w);
                return ran;
            }
        }
        ran
    }

    /// Delivers the emits of `unsettled` activations whose units are on disk, in order: all
    /// of them (waiting for the disk) if `wait`, else those already committed. A unit the
    /// store failed to commit fails the job, and its activation's items stay queued in the
    /// store (counted as left in it, not processed).
    fn settle(
        &self,
        node: usize,
        unsettled: &mut Vec<Unsettled>,
        wait: bool,
        w: &WorkerLocal<Task>,
    ) {
        let Some(d) = &self.durable else {
            return;
        };
        let r = &self.flow.routines[node];
        let c = &self.nodes[node].counters;
        let ready = if wait {
            unsettled.len()
        } else {
            unsettled
                .iter()
                .take_while(|u| d.store.is_committed(u.ticket))
                .count()
        };
        if ready == 0 {
            return;
        }
        // A delivery into a cycle sees the routine as running here, as it does from the
        // activation's own stack.
        w.enter(self.key(node));
        let delivered = std::sync::atomic::AtomicU64::new(0);
        let mut waited = Duration::ZERO;
        for u in unsettled.drain(..ready) {
            if let Err(e) = d.store.wait(u.ticket) {
                self.fail(e.to_string());
                c.processed.fetch_sub(u.items, Ordering::Relaxed);
                add(&c.left_in_store, u.items);
                continue;
            }
            let (mut base, mut charge) = (u.base, u.charge);
            for (ev, item) in u.emits {
                charge.deliver(&item);
                self.count_emit(node);
                // An undeliverable item is already a dead letter where it did not arrive.
                let _ = self.route(node, ev, item, base, &mut waited, &delivered);
                base += r.routes[ev].len() as u64;
            }
        }
        w.exit();
    }

    /// [`Job::activate_with`] waiting for a durable activation's unit before it returns.
    fn activate(
        self: &Arc<Self>,
        node: usize,
        batch: Batch,
        first_attempt: u32,
        w: &WorkerLocal<Task>,
    ) -> Outcome {
        self.activate_with(node, batch, first_attempt, w, None)
    }

    /// Runs the logic on `batch` (retrying inline when the delay is zero) and applies the
    /// routine's error strategy. `unsettled` (a durable job's drive): a successful
    /// activation's unit is submitted and its emits are left there, not delivered.
    fn activate_with(
        self: &Arc<Self>,
        node: usize,
        batch: Batch,
        first_attempt: u32,
        w: &WorkerLocal<Task>,
        mut unsettled: Option<&mut Vec<Unsettled>>,
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
            // until it succeeds, as is every activation of a durable job (committed
            // together). Other routines stream.
            let ctx = if self.durable.is_some() || matches!(r.on_error, ErrorStrategy::Retry(_)) {
                Context::attempt(self.clone(), node)
            } else {
                Context::new(self.clone(), node)
            }
            .numbered(batch.number());
            let started = Instant::now();
            w.enter(self.key(node));
            let result =
                panic::catch_unwind(AssertUnwindSafe(|| self.logic[node].activate(&ctx, &batch)));
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
            let result = match ctx.holds_attempt() {
                false => result,
                true => match (result, ctx.take_attempt()) {
                    (Ok(()), Some(held)) => self.commit_attempt(
                        &ctx,
                        node,
                        held,
                        batch.seqs(),
                        attempt,
                        unsettled.as_deref_mut(),
                    ),
                    // A failed attempt's held effects are dropped with it.
                    (result, _) => result,
                },
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
            let action = match &r.on_error {
                ErrorStrategy::Retry(p) if err.retryable && attempt < p.max && !self.stopping() => {
                    add(&c.failures, 1);
                    attempt += 1;
                    add(&c.retries, 1);
                    let delay = p.delay_before(attempt);
                    tracing::debug!(job = %self.id, routine = %r.id, error = %err, attempt, ?delay, "retrying");
                    if delay.is_zero() {
                        continue;
                    }
                    // A durable job keeps the armed retry, so that it survives a restart
                    // (its items stay queued in the store until it has run).
                    if self.durable.is_some()
                        && let Some(&(_, first_seq)) = batch.seqs().first()
                    {
                        let due = SystemTime::now() + delay;
                        let _ = self.commit_durable(vec![Op::Retry {
                            node: node as u32,
                            first_seq,
                            retry: ArmedRetry {
                                seqs: batch.seqs().to_vec(),
                                attempt,
                                due_ms: unix_ms(due),
                            },
                        }]);
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
                // Listed before it is counted: a reader that sees the count finds the error.
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
                drop(failures);
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
            }
        }
        add(&c.failures, 1);
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

    /// Ends a successful attempt: applies its state changes (all or none), then delivers its
    /// held emits in order with the usual backpressure. An error from the first part means
    /// nothing happened; once delivering starts, an item that cannot be delivered (the job
    /// halted) becomes a dead letter of each slot it did not reach.
    ///
    /// In a durable job this is the unit its store commits (see the durable module): the
    /// consumption of `consumed`, the state changes and a `Queue` for each delivery of each
    /// emit, in one transaction, waited for before any emit is delivered.
    fn commit_attempt(
        &self,
        ctx: &Context,
        node: usize,
        held: Held,
        consumed: &[(u32, u64)],
        attempt: u32,
        unsettled: Option<&mut Vec<Unsettled>>,
    ) -> Result<(), RoutineError> {
        let r = &self.flow.routines[node];
        let mut base = 0;
        match &self.durable {
            None => ctx.state_base().commit(held.state)?,
            Some(d) => {
                let deliveries: usize = held.emits.iter().map(|(ev, _)| r.routes[*ev].len()).sum();
                base = d.take_seqs(deliveries as u64);
                let mut ops = Vec::with_capacity(consumed.len() + deliveries);
                ops.extend(consumed.iter().map(|&(slot, seq)| Op::Consume {
                    node: node as u32,
                    slot,
                    seq,
                }));
                if let (true, Some(&(_, first_seq))) = (attempt > 0, consumed.first()) {
                    ops.push(Op::RetryDone {
                        node: node as u32,
                        first_seq,
                    });
                }
                if matches!(r.policy, Policy::TimeInterval(_)) {
                    ops.push(Op::Fired {
                        node: node as u32,
                        at_ms: unix_ms(SystemTime::now()),
                    });
                }
                let mut seq = base;
                for (ev, item) in &held.emits {
                    for &(to, slot) in &r.routes[*ev] {
                        ops.push(Op::Queue {
                            node: to as u32,
                            slot: slot as u32,
                            seq,
                            item: item.clone(),
                        });
                        seq += 1;
                    }
                }
                let mut ticket = None;
                ctx.state_base().commit_with(held.state, |changes| {
                    ops.extend(changes.iter().map(|(key, value)| Op::State {
                        node: node as u32,
                        key: key.clone(),
                        value: value.clone(),
                    }));
                    match unsettled.is_some() {
                        true => {
                            ticket = Some(self.submit_durable(ops).map_err(RoutineError::fatal)?)
                        }
                        false => self.commit_durable(ops).map_err(RoutineError::fatal)?,
                    }
                    Ok::<_, RoutineError>(())
                })?;
                if let (Some(unsettled), Some(ticket)) = (unsettled, ticket) {
                    unsettled.push(Unsettled {
                        ticket,
                        emits: held.emits,
                        charge: held.charge,
                        base,
                        items: consumed.len() as u64,
                    });
                    return Ok(());
                }
            }
        }
        let mut waited = Duration::ZERO;
        let mut charge = held.charge;
        for (ev, item) in held.emits {
            charge.deliver(&item);
            self.count_emit(node);
            // An undeliverable item is already a dead letter where it did not arrive.
            let _ = self.route(node, ev, item, base, &mut waited, &ctx.progress().delivered);
            base += r.routes[ev].len() as u64;
        }
        Ok(())
    }
}

/// `t` in ms since the Unix epoch (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
