//! A group's (a tenant's) quota of live instances: a count with a limit that waits, and
//! the holders of idle instances it can ask to let one go.
//!
//! An instance takes a slot when it is made and gives it back when it is dropped (the slot
//! lives in the instance, see [`Slot`]). Idle instances count: a job held open keeps the
//! instances its routines made. So a checkout that finds the group at its quota first asks
//! the group's holders to drop an idle instance (of any of its routines and jobs), and only
//! waits while every instance of the group is busy; a busy one coming back idle wakes it to
//! try again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Something that keeps idle instances and can drop one on request.
pub(crate) trait Idle: Send + Sync {
    /// Drops one idle instance of `group`'s jobs (of any group: `None`), preferring one that
    /// holds a slot of the group's quota; `None` if it had none, else the slot the dropped
    /// instance held, handed to the caller (so that no other checkout takes it first).
    fn evict_one(&self, group: Option<usize>) -> Option<Option<Slot>>;
}

std::thread_local! {
    /// The instances checked out on this thread's stack, innermost last: the key of the
    /// routine logic each is of, and its group's quota (`None`: a group without one).
    static ON_STACK: std::cell::RefCell<Vec<(usize, Option<Arc<Slots>>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// How many of `ON_STACK`'s entries, from the bottom, a [`Stuck`] lower on this stack
    /// counts already (a nested one counts only those above).
    static COUNTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// An instance of the logic `key`, holding `slot` (if any), was checked out on this
/// thread's stack.
pub(crate) fn checked_out(key: usize, slot: Option<&Slot>) {
    ON_STACK.with(|s| s.borrow_mut().push((key, slot.map(|s| s.0.clone()))));
}

/// Whether this thread's stack holds an instance of the logic `key` (an activation of it
/// suspended lower on the stack, in a blocked emit).
pub(crate) fn holds(key: usize) -> bool {
    ON_STACK.with(|s| s.borrow().iter().any(|(k, _)| *k == key))
}

/// The innermost instance checked out on this thread's stack came back.
pub(crate) fn checked_in() {
    ON_STACK.with(|s| {
        s.borrow_mut().pop();
    });
}

/// Whether this thread's stack holds an instance of `slots`' group.
fn on_stack(slots: &Arc<Slots>) -> bool {
    ON_STACK.with(|s| {
        s.borrow()
            .iter()
            .any(|(_, h)| h.as_ref().is_some_and(|h| Arc::ptr_eq(h, slots)))
    })
}

/// While alive, the instances on this thread's stack count as *stuck*: held by an emit
/// waiting for room downstream, they cannot come back before a consumer runs. A checkout
/// finding every live instance of its group stuck goes past the quota (else it would wait
/// for them while they wait for it). Each instance counts once, however deep the waits nest
/// on this stack.
pub(crate) struct Stuck {
    held: Vec<Arc<Slots>>,
    /// `COUNTED` as it was before this one.
    below: usize,
}

impl Stuck {
    pub(crate) fn enter() -> Stuck {
        let below = COUNTED.get();
        let (held, len) = ON_STACK.with(|s| {
            let s = s.borrow();
            let held: Vec<Arc<Slots>> = s
                .iter()
                .skip(below)
                .filter_map(|(_, h)| h.clone())
                .collect();
            (held, s.len())
        });
        COUNTED.set(len.max(below));
        for slots in &held {
            slots.stuck.fetch_add(1, Ordering::SeqCst);
            if slots.waiting.load(Ordering::SeqCst) > 0 {
                slots.idle_now();
            }
        }
        Stuck { held, below }
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        COUNTED.set(self.below);
        for slots in &self.held {
            slots.stuck.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Live instances of one group's jobs, against a limit.
pub(crate) struct Slots {
    group: usize,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Checkouts waiting for a slot: an instance turning idle tells them only then (its
    /// checkin then locks; without waiters it does not).
    waiting: AtomicUsize,
    /// Live instances held by emits waiting for room (see [`Stuck`]).
    stuck: AtomicUsize,
}

struct Inner {
    live: usize,
    peak: usize,
    limit: usize,
    /// Bumped whenever a slot frees or an instance turns idle: a waiter that saw it unchanged
    /// after failing to evict may sleep (nothing it could use came meanwhile).
    generation: u64,
    /// What keeps this group's idle instances (routines' instance pools), registered when
    /// they first make one of its instances.
    holders: Vec<Weak<dyn Idle>>,
}

/// One live instance's hold on its group's quota, given back on drop.
pub(crate) struct Slot(Arc<Slots>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot(group {})", self.0.group)
    }
}

impl Slot {
    /// Its group's quota if a checkout waits for it (to tell when this instance turns idle).
    pub(crate) fn wanted(&self) -> Option<Arc<Slots>> {
        (self.0.waiting.load(Ordering::SeqCst) > 0).then(|| self.0.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.0.inner.lock();
        inner.live = inner.live.saturating_sub(1);
        inner.generation += 1;
        drop(inner);
        self.0.changed.notify_all();
    }
}

/// Why [`Slots::take`] gave up.
#[derive(Debug)]
pub(crate) struct Busy {
    pub(crate) live: usize,
    pub(crate) limit: usize,
}

impl Slots {
    pub(crate) fn new(group: usize, limit: usize) -> Self {
        Self {
            group,
            inner: Mutex::new(Inner {
                live: 0,
                peak: 0,
                limit,
                generation: 0,
                holders: Vec::new(),
            }),
            changed: Condvar::new(),
            waiting: AtomicUsize::new(0),
            stuck: AtomicUsize::new(0),
        }
    }

    pub(crate) fn set_limit(&self, limit: usize) {
        let mut inner = self.inner.lock();
        inner.limit = limit;
        inner.generation += 1;
        drop(inner);
        self.changed.notify_all();
    }

    /// Live instances now, the most at once, and the limit.
    pub(crate) fn usage(&self) -> (usize, usize, usize) {
        let inner = self.inner.lock();
        (inner.live, inner.peak, inner.limit)
    }

    /// Records that `holder` keeps idle instances of this group (once per holder).
    pub(crate) fn register(&self, holder: &Weak<dyn Idle>) {
        let mut inner = self.inner.lock();
        inner.holders.retain(|h| h.strong_count() > 0);
        if !inner.holders.iter().any(|h| Weak::ptr_eq(h, holder)) {
            inner.holders.push(holder.clone());
        }
    }

    /// An instance of this group turned idle: a waiter may now evict it.
    pub(crate) fn idle_now(&self) {
        self.inner.lock().generation += 1;
        self.changed.notify_all();
    }

    /// A slot for a new instance: at once while the group is under its limit; else the slot
    /// of an idle instance of the group, dropped; else past the limit when every live
    /// instance of the group is stuck (see [`Stuck`]) or this stack holds one of them (it
    /// cannot come back before this returns: waiting could only time out); else when one
    /// frees, waiting until `deadline`.
    pub(crate) fn take(self: &Arc<Self>, deadline: Instant) -> Result<Slot, Busy> {
        let mut inner = self.inner.lock();
        if inner.live < inner.limit {
            return Ok(self.add(&mut inner));
        }
        drop(inner);
        if on_stack(self) {
            if let Some(slot) = self.evict() {
                return Ok(slot);
            }
            return Ok(self.add(&mut self.inner.lock()));
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let taken = self.take_waiting(deadline);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        taken
    }

    fn add(self: &Arc<Self>, inner: &mut Inner) -> Slot {
        inner.live += 1;
        inner.peak = inner.peak.max(inner.live);
        Slot(self.clone())
    }

    /// Has an idle instance of the group dropped, taking its slot; `None` if there was none
    /// (holders pass over instances without a slot, made before the quota was set: dropping
    /// one would free nothing).
    fn evict(&self) -> Option<Slot> {
        let holders: Vec<Arc<dyn Idle>> = self
            .inner
            .lock()
            .holders
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        // Holders lock their own pools: never call them under this lock.
        holders
            .iter()
            .find_map(|h| h.evict_one(Some(self.group)))
            .flatten()
    }

    fn take_waiting(self: &Arc<Self>, deadline: Instant) -> Result<Slot, Busy> {
        let mut inner = self.inner.lock();
        loop {
            if inner.live < inner.limit
                || (inner.live > 0 && self.stuck.load(Ordering::SeqCst) >= inner.live)
            {
                return Ok(self.add(&mut inner));
            }
            if Instant::now() >= deadline {
                return Err(Busy {
                    live: inner.live,
                    limit: inner.limit,
                });
            }
            let seen = inner.generation;
            drop(inner);
            if let Some(slot) = self.evict() {
                return Ok(slot);
            }
            inner = self.inner.lock();
            if inner.generation != seen {
                continue;
            }
            // An instance turning idle tells waiters under this lock, but the lock of its
            // pool is not this one: look again every 10 ms whatever comes.
            let until = deadline.min(Instant::now() + Duration::from_millis(10));
            self.changed.wait_until(&mut inner, until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps `n` idle instances, each a slot of `slots`.
    struct Keeper {
        idle: Mutex<Vec<Slot>>,
        evicted: AtomicUsize,
    }

    impl Idle for Keeper {
        fn evict_one(&self, _: Option<usize>) -> Option<Option<Slot>> {
            let slot = self.idle.lock().pop()?;
            self.evicted.fetch_add(1, Ordering::SeqCst);
            Some(Some(slot))
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(30)
    }

    #[test]
    fn a_full_group_evicts_an_idle_instance_before_it_waits() {
        let slots = Arc::new(Slots::new(1, 2));
        let keeper = Arc::new(Keeper {
            idle: Mutex::new(Vec::new()),
            evicted: AtomicUsize::new(0),
        });
        let weak: Weak<dyn Idle> = Arc::downgrade(&(keeper.clone() as Arc<dyn Idle>));
        slots.register(&weak);
        slots.register(&weak);
        assert_eq!(slots.inner.lock().holders.len(), 1);
        let a = slots.take(soon()).unwrap();
        keeper.idle.lock().push(slots.take(soon()).unwrap());
        // Full: the idle one goes, the third takes its place.
        let b = slots.take(soon()).unwrap();
        assert_eq!(keeper.evicted.load(Ordering::SeqCst), 1);
        assert_eq!(slots.usage(), (2, 2, 2));
        // Full of busy ones: it waits, then says so.
        let t = Instant::now();
        let busy = slots.take(soon()).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(25));
        assert_eq!((busy.live, busy.limit), (2, 2));
        // Past the limit when the caller holds what cannot come back.
        checked_out(0, Some(&a));
        let c = slots.take(soon()).unwrap();
        checked_in();
        assert_eq!(slots.usage(), (3, 3, 2));
        drop((a, c));
        let d = slots.take(soon()).unwrap();
        // One freeing wakes a waiter.
        let s = slots.clone();
        let waiter = std::thread::spawn(move || {
            s.take(Instant::now() + Duration::from_secs(10)).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        drop(d);
        assert!(waiter.join().unwrap().is_ok());
        drop(b);
        assert_eq!(slots.usage().0, 0);
    }

    /// A waiter goes past the quota once every live instance is held by a waiting emit (on
    /// another thread here), and not before.
    #[test]
    fn a_group_whose_instances_are_all_stuck_in_emits_lets_one_more_be_made() {
        let slots = Arc::new(Slots::new(1, 1));
        let a = slots.take(soon()).unwrap();
        assert!(slots.take(soon()).is_err(), "busy, not stuck: it waits");
        let (entered, go) = (
            Arc::new(std::sync::Barrier::new(2)),
            Arc::new(std::sync::Barrier::new(2)),
        );
        let emitter = {
            let (entered, go) = (entered.clone(), go.clone());
            std::thread::spawn(move || {
                checked_out(0, Some(&a));
                let stuck = Stuck::enter();
                entered.wait();
                go.wait();
                drop(stuck);
                checked_in();
                drop(a);
            })
        };
        entered.wait();
        let t = Instant::now();
        let b = slots
            .take(Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(slots.usage(), (2, 2, 1));
        go.wait();
        emitter.join().unwrap();
        drop(b);
        assert_eq!(slots.usage().0, 0);
    }

    /// Nested waits on one stack count each instance once: the outer emit's instance is not
    /// counted again by the wait of the consumer it runs.
    #[test]
    fn nested_waits_count_each_instance_once() {
        let slots = Arc::new(Slots::new(1, 3));
        let (a, b) = (slots.take(soon()).unwrap(), slots.take(soon()).unwrap());
        checked_out(0, Some(&a));
        let outer = Stuck::enter();
        assert_eq!(slots.stuck.load(Ordering::SeqCst), 1);
        checked_out(0, Some(&b));
        let inner = Stuck::enter();
        assert_eq!(slots.stuck.load(Ordering::SeqCst), 2);
        drop(inner);
        checked_in();
        assert_eq!(slots.stuck.load(Ordering::SeqCst), 1);
        // Again after the inner one ended: still once each.
        checked_out(0, Some(&b));
        let again = Stuck::enter();
        assert_eq!(slots.stuck.load(Ordering::SeqCst), 2);
        drop((again, outer));
        checked_in();
        checked_in();
        assert_eq!(slots.stuck.load(Ordering::SeqCst), 0);
        drop((a, b));
    }
}
