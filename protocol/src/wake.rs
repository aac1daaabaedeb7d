//! Sleeping without lost wake-ups: the pool's registry of idle workers.
//!
//! An idle worker does not spin. It registers itself as a sleeper ([`Sleepers::register`]:
//! onto the idle list, then a `SeqCst` fence), re-checks every queue, and only then parks. A
//! producer pushes its task, then calls [`Sleepers::notify_one`] (a `SeqCst` fence, then it
//! reads the sleeper count; if some worker sleeps it takes one off the list and unparks it).
//! Either the producer sees the sleeper (and wakes it) or the sleeper's re-check sees the task:
//! the two fences forbid both reads missing. A parker keeps an unpark that comes before the
//! park, so a wake-up between the re-check and the park is kept too.
//!
//! Wake-ups are throttled as in tokio: a producer wakes nobody while some woken worker is still
//! *searching* (it will find the task); a searcher that finds work and was the last one hands
//! the search on ([`Sleepers::found`]), so a burst still reaches every worker. A searcher that
//! gives up stops counting as one ([`Sleepers::give_up`]) *before* its fenced re-check, so a
//! producer that skipped its wake-up because of it is seen by that re-check.
//!
//! `tests/loom_wake.rs` model-checks this with loom: a lost wake-up there is a deadlock, not a
//! slow test (the pool's park timeout is not part of the model).

use crate::sync::{AtomicUsize, Mutex, Ordering, fence};

/// The idle workers of a pool and the workers woken to search for a task.
#[derive(Debug)]
pub struct Sleepers {
    idle: Mutex<Vec<usize>>,
    /// The idle list's length, readable without its lock.
    sleepers: AtomicUsize,
    /// Workers woken to look for a task that have not found one yet.
    searching: AtomicUsize,
}

impl Sleepers {
    /// A registry for `workers` workers, none asleep.
    pub fn new(workers: usize) -> Self {
        Sleepers {
            idle: Mutex::new(Vec::with_capacity(workers)),
            sleepers: AtomicUsize::new(0),
            searching: AtomicUsize::new(0),
        }
    }

    /// After a task was pushed: the worker to unpark, if one sleeps and none is searching
    /// already. The worker returned is off the idle list and counted as searching.
    pub fn notify_one(&self) -> Option<usize> {
        fence(Ordering::SeqCst);
        if self.searching.load(Ordering::SeqCst) > 0 || self.sleepers.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut idle = self.idle.lock();
        let woken = idle.pop();
        if woken.is_some() {
            // The woken worker searches; it learns so by finding itself off the idle list.
            self.searching.fetch_add(1, Ordering::SeqCst);
        }
        self.sleepers.store(idle.len(), Ordering::SeqCst);
        woken
    }

    /// A worker found a task. `searching`: it had been woken to search (it stops counting as a
    /// searcher). True when it was the last searcher: if more work is queued it should wake
    /// the next sleeper ([`Sleepers::notify_one`]), so that a burst ramps up to every worker.
    pub fn found(&self, searching: bool) -> bool {
        searching && self.searching.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// A worker woken to search found nothing: it stops counting as a searcher (before it
    /// registers and re-checks the queues).
    pub fn give_up(&self, searching: bool) {
        if searching {
            self.searching.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Worker `index` is about to sleep: onto the idle list, then a fence. The caller must then
    /// re-check every queue, park only if they are all empty, and call
    /// [`Sleepers::deregister`] once it wakes (or did not park).
    pub fn register(&self, index: usize) {
        {
            let mut idle = self.idle.lock();
            idle.push(index);
            self.sleepers.store(idle.len(), Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
    }

    /// Worker `index` is awake again. True when a notifier had taken it off the idle list: it
    /// was woken for a task and now counts as searching.
    pub fn deregister(&self, index: usize) -> bool {
        let mut idle = self.idle.lock();
        if let Some(pos) = idle.iter().position(|&i| i == index) {
            idle.swap_remove(pos);
            self.sleepers.store(idle.len(), Ordering::SeqCst);
            false
        } else {
            true
        }
    }

    /// How many workers sleep (or are about to).
    pub fn sleeping(&self) -> usize {
        self.sleepers.load(Ordering::SeqCst)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_sleeper_is_woken_once_and_then_searches() {
        let s = Sleepers::new(2);
        assert_eq!(s.notify_one(), None, "nobody sleeps");
        s.register(0);
        s.register(1);
        assert_eq!(s.sleeping(), 2);
        assert_eq!(s.notify_one(), Some(1));
        // While the woken worker searches, a producer wakes nobody more.
        assert_eq!(s.notify_one(), None);
        assert!(s.deregister(1), "woken by a notifier: it searches");
        assert!(
            !s.deregister(0),
            "woke by itself (a timeout): not searching"
        );
        assert_eq!(s.sleeping(), 0);
        // The searcher finds work and was the last one: it hands the search on.
        assert!(s.found(true));
        assert!(!s.found(false));
    }

    #[test]
    fn a_searcher_that_gives_up_lets_the_next_producer_wake_a_sleeper() {
        let s = Sleepers::new(2);
        s.register(0);
        s.register(1);
        assert_eq!(s.notify_one(), Some(1));
        assert!(s.deregister(1));
        s.give_up(true);
        assert_eq!(s.notify_one(), Some(0));
    }
}
