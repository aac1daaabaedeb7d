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
    /// Drops one idle instance of `group`'s jobs (of any group: `None`); true if it did.
    fn evict_one(&self, group: Option<usize>) -> bool;
}

/// Live instances of one group's jobs, against a limit.
pub(crate) struct Slots {
    group: usize,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Checkouts waiting for a slot: an instance turning idle tells them only then (its
    /// checkin then locks; without waiters it does not).
    waiting: AtomicUsize,
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

    /// A slot for a new instance: at once while the group is under its limit (or `past`: the
    /// caller holds instances that cannot come back before it returns, so waiting could only
    /// time out); else after evicting an idle instance of the group; else when one frees,
    /// waiting until `deadline`.
    pub(crate) fn take(self: &Arc<Self>, past: bool, deadline: Instant) -> Result<Slot, Busy> {
        let mut inner = self.inner.lock();
        if inner.live < inner.limit || past {
            inner.live += 1;
            inner.peak = inner.peak.max(inner.live);
            return Ok(Slot(self.clone()));
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        drop(inner);
        let taken = self.take_waiting(deadline);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        taken
    }

    fn take_waiting(self: &Arc<Self>, deadline: Instant) -> Result<Slot, Busy> {
        let mut inner = self.inner.lock();
        loop {
            if inner.live < inner.limit {
                inner.live += 1;
                inner.peak = inner.peak.max(inner.live);
                return Ok(Slot(self.clone()));
            }
            let seen = inner.generation;
            let holders: Vec<Arc<dyn Idle>> =
                inner.holders.iter().filter_map(Weak::upgrade).collect();
            drop(inner);
            // Holders lock their own pools: never call them under this lock.
            let evicted = holders.iter().any(|h| h.evict_one(Some(self.group)));
            drop(holders);
            inner = self.inner.lock();
            if evicted || inner.generation != seen {
                continue;
            }
            // An instance turning idle tells waiters under this lock, but the lock of its
            // pool is not this one: look again every 10 ms whatever comes.
            let until = deadline.min(Instant::now() + Duration::from_millis(10));
            self.changed.wait_until(&mut inner, until);
            if Instant::now() >= deadline && inner.live >= inner.limit {
                return Err(Busy {
                    live: inner.live,
                    limit: inner.limit,
                });
            }
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
        fn evict_one(&self, _: Option<usize>) -> bool {
            let slot = self.idle.lock().pop();
            let some = slot.is_some();
            drop(slot);
            if some {
                self.evicted.fetch_add(1, Ordering::SeqCst);
            }
            some
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
        let a = slots.take(false, soon()).unwrap();
        keeper.idle.lock().push(slots.take(false, soon()).unwrap());
        // Full: the idle one goes, the third takes its place.
        let b = slots.take(false, soon()).unwrap();
        assert_eq!(keeper.evicted.load(Ordering::SeqCst), 1);
        assert_eq!(slots.usage(), (2, 2, 2));
        // Full of busy ones: it waits, then says so.
        let t = Instant::now();
        let busy = slots.take(false, soon()).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(25));
        assert_eq!((busy.live, busy.limit), (2, 2));
        // Past the limit when the caller holds what cannot come back.
        let c = slots.take(true, soon()).unwrap();
        assert_eq!(slots.usage(), (3, 3, 2));
        drop((a, c));
        let d = slots.take(false, soon()).unwrap();
        // One freeing wakes a waiter.
        let s = slots.clone();
        let waiter = std::thread::spawn(move || {
            s.take(false, Instant::now() + Duration::from_secs(10))
                .map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        drop(d);
        assert!(waiter.join().unwrap().is_ok());
        drop(b);
        assert_eq!(slots.usage().0, 0);
    }
}
