//! loom model of quiescence: posts racing with a routine's check task and with the job's
//! finish. A job must never finish with an accepted item left unprocessed or a task left to
//! run, and an item is either accepted (then processed) or its post refused.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p routilux-protocol --release` (`just loom`).
#![cfg(loom)]

use std::collections::VecDeque;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use routilux_protocol::quiesce::{Lifecycle, Pending};

#[derive(Default)]
struct Life {
    finished: bool,
}

impl Lifecycle for Life {
    fn finished(&self) -> bool {
        self.finished
    }
}

/// One routine's queue and its `scheduled` mark (the engine's `Queues`), guarded by its queue
/// lock.
#[derive(Default)]
struct Queue {
    items: usize,
    scheduled: bool,
}

/// A job of one routine, as the engine runs it: a post holds the job, queues its item, and
/// schedules a check (with a count of its own) if none is scheduled; a check clears the mark,
/// then drains the queue; each gives its count back when done.
struct Job {
    pending: Pending<Life>,
    queue: Mutex<Queue>,
    /// The pool's queued check tasks.
    tasks: Mutex<VecDeque<()>>,
    processed: AtomicUsize,
    /// Set when the job finished with something left to run (checked once every thread is
    /// done: a panic while loom's locks are held would abort the whole model).
    finished_early: AtomicBool,
    /// A wrong order, to show the model finds the loss it causes: the post gives its hold back
    /// before it schedules the check.
    release_early: bool,
}

impl Job {
    fn new(release_early: bool) -> Self {
        Job {
            pending: Pending::new(Life::default()),
            queue: Mutex::new(Queue::default()),
            tasks: Mutex::new(VecDeque::new()),
            processed: AtomicUsize::new(0),
            finished_early: AtomicBool::new(false),
            release_early,
        }
    }

    fn release(&self) {
        self.pending.release(|life| {
            // Quiescent means nothing is left to run.
            let queued = self.queue.lock().unwrap().items > 0;
            let tasks = !self.tasks.lock().unwrap().is_empty();
            if queued || tasks {
                self.finished_early.store(true, Ordering::SeqCst);
            }
            life.finished = true;
        });
    }

    /// Posts one item; false if the job had finished (the post is refused, nothing lost).
    fn post(&self) -> bool {
        if !self.pending.hold() {
            return false;
        }
        let schedule = {
            let mut q = self.queue.lock().unwrap();
            q.items += 1;
            !std::mem::replace(&mut q.scheduled, true)
        };
        if self.release_early {
            self.release();
        }
        if schedule {
            self.pending.add();
            self.tasks.lock().unwrap().push_back(());
        }
        if !self.release_early {
            self.release();
        }
        true
    }

    /// Runs one queued check task, if any.
    fn run_one(&self) -> bool {
        if self.tasks.lock().unwrap().pop_front().is_none() {
            return false;
        }
        self.queue.lock().unwrap().scheduled = false;
        loop {
            {
                let mut q = self.queue.lock().unwrap();
                if q.items == 0 {
                    break;
                }
                q.items -= 1;
            }
            self.processed.fetch_add(1, Ordering::SeqCst);
        }
        self.release();
        true
    }

    fn finished(&self) -> bool {
        self.pending.lock().finished
    }
}

fn two_posts_and_a_worker(release_early: bool) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(move || {
        let job = Arc::new(Job::new(release_early));
        let worker = {
            let job = job.clone();
            thread::spawn(move || {
                while !job.finished() {
                    if !job.run_one() {
                        thread::yield_now();
                    }
                }
            })
        };
        let other = {
            let job = job.clone();
            thread::spawn(move || job.post())
        };
        let mine = job.post();
        let theirs = other.join().unwrap();
        worker.join().unwrap();
        assert!(
            !job.finished_early.load(Ordering::SeqCst),
            "the job finished with an item or a task left"
        );
        // The first post cannot be refused: the job had no count before it.
        assert!(mine || theirs);
        let accepted = usize::from(mine) + usize::from(theirs);
        assert_eq!(job.processed.load(Ordering::SeqCst), accepted);
        assert_eq!(job.queue.lock().unwrap().items, 0);
    });
}

#[test]
fn every_accepted_item_is_processed_before_the_job_finishes() {
    two_posts_and_a_worker(false);
}

#[test]
#[should_panic]
fn releasing_the_hold_before_scheduling_finishes_with_an_item_queued() {
    two_posts_and_a_worker(true);
}
