//! Quiescence: why a job finishes by itself, and only when it should.
//!
//! A job keeps one atomic `pending` count of every reason it may still do work: a scheduled
//! task, an armed timer entry, a hold (a post in progress, or a caller keeping the job open for
//! input). Whoever may still make work takes a count *before* it does anything that could
//! stop the job from being quiescent, and gives it back *after* it has handed its work on (a
//! post releases its hold only after the check task its item needs is scheduled, with a count
//! of its own). Hence: **when the count drops to zero, nothing is left to run** and the job
//! finishes.
//!
//! The transition to finished happens under the job's lifecycle lock after re-reading the
//! count ([`Pending::release`]); a hold first counts itself and then reads `finished` under
//! the same lock ([`Pending::hold`]), so a post either lands in a live job or is refused: never
//! lost in between, and never in a job that finished under it. A job that never had a count
//! has never had it fall to zero: it stays open until it gets work.
//!
//! `tests/loom_quiesce.rs` model-checks this with loom against a job's queue and check tasks.

use crate::sync::{AtomicUsize, Mutex, MutexGuard, Ordering};

/// What a job's lifecycle lock guards: at least whether it has finished.
pub trait Lifecycle {
    /// Whether the job has finished.
    fn finished(&self) -> bool;
}

/// A job's pending count and lifecycle lock.
#[derive(Debug)]
pub struct Pending<L> {
    count: AtomicUsize,
    life: Mutex<L>,
}

impl<L: Lifecycle> Pending<L> {
    /// No count yet: not finished, and it will not finish until a first count is released.
    pub fn new(life: L) -> Self {
        Pending {
            count: AtomicUsize::new(0),
            life: Mutex::new(life),
        }
    }

    /// One more reason to do work (a task scheduled, a timer armed): the caller holds a count
    /// already, so the job cannot have finished.
    pub fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes a hold unless the job has finished (then nothing was taken).
    pub fn hold(&self) -> bool {
        self.count.fetch_add(1, Ordering::SeqCst);
        let life = self.life.lock();
        if life.finished() {
            drop(life);
            self.count.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Gives one count back. The last one finishes the job: `finish` runs under the lifecycle
    /// lock, after re-reading the count (a hold taken meanwhile keeps the job open), and must
    /// mark it finished. Returns whether this call finished it, so the caller can do what
    /// follows a finish (wake waiters) outside the lock.
    pub fn release(&self, finish: impl FnOnce(&mut L)) -> bool {
        if self.count.fetch_sub(1, Ordering::SeqCst) != 1 {
            return false;
        }
        let mut life = self.life.lock();
        if life.finished() || self.count.load(Ordering::SeqCst) != 0 {
            return false;
        }
        finish(&mut life);
        debug_assert!(life.finished(), "`finish` marks the job finished");
        true
    }

    /// The lifecycle, locked.
    pub fn lock(&self) -> MutexGuard<'_, L> {
        self.life.lock()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Life(bool);

    impl Lifecycle for Life {
        fn finished(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn the_last_release_finishes_and_a_later_hold_is_refused() {
        let p = Pending::new(Life::default());
        assert!(p.hold());
        p.add();
        assert!(!p.release(|l| l.0 = true), "one count is still out");
        assert!(!p.lock().0);
        assert!(p.release(|l| l.0 = true));
        assert!(p.lock().0);
        assert!(!p.hold(), "a finished job takes no hold");
        // The refused hold gave its count back: nothing is left to release.
        assert_eq!(p.count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_hold_taken_before_the_last_release_keeps_the_job_open() {
        let p = Pending::new(Life::default());
        assert!(p.hold());
        assert!(p.hold());
        assert!(!p.release(|l| l.0 = true));
        assert!(!p.lock().0);
        assert!(p.release(|l| l.0 = true));
    }
}
