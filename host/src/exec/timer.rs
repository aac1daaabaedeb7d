//! The runtime's one timer thread: `time_interval` wake-ups and delayed retries.
//!
//! The timer never runs logic; when an entry is due it hands the task to the pool's injector.
//! Every armed entry holds one pending count of its job, so a job with a timer armed is not
//! quiescent. At shutdown the armed entries are abandoned (see the scheduler's shutdown notes).

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::scheduler::{Pool, Run};

struct Entry<T> {
    at: Instant,
    seq: u64,
    task: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    /// Reversed, so the max-heap pops the earliest entry.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct State<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
    shutdown: bool,
}

/// Armed tasks by due time.
pub(crate) struct Timer<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
    armed: AtomicUsize,
}

impl<T> Default for Timer<T> {
    fn default() -> Self {
        Timer {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                seq: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
            armed: AtomicUsize::new(0),
        }
    }
}

impl<T: Run> Timer<T> {
    /// Arms `task` to be injected at `at`. After shutdown, or once its job has halted, the
    /// task is abandoned at once.
    ///
    /// The job's `halted` flag is read under the timer's lock: a job halts by setting it and
    /// then taking its entries under the same lock ([`Timer::take_owned`]), so an entry armed
    /// concurrently is either taken by it or sees the flag here. A cancelled job never waits
    /// for a timer armed just as it halted.
    pub(crate) fn schedule(&self, at: Instant, task: T) {
        let mut st = self.state.lock();
        let refused = if st.shutdown {
            Some("runtime shut down".to_owned())
        } else {
            task.refused()
        };
        if let Some(why) = refused {
            drop(st);
            task.abandon(&why);
            return;
        }
        st.seq += 1;
        let seq = st.seq;
        let earliest = st.heap.peek().is_none_or(|e| at < e.at);
        st.heap.push(Entry { at, seq, task });
        self.armed.fetch_add(1, Ordering::SeqCst);
        drop(st);
        if earliest {
            self.cv.notify_one();
        }
    }

    /// Whether any entry is armed.
    pub(crate) fn is_empty(&self) -> bool {
        self.armed.load(Ordering::SeqCst) == 0
    }

    /// The timer thread's body: inject due tasks until shutdown.
    pub(crate) fn run(&self, pool: &Pool<T>) {
        let mut st = self.state.lock();
        loop {
            if st.shutdown {
                return;
            }
            let now = Instant::now();
            match st.heap.peek().map(|e| e.at) {
                Some(at) if at <= now => {
                    if let Some(e) = st.heap.pop() {
                        // Inject outside the lock: waking a worker takes other locks. The entry
                        // counts as armed until the pool has it, so the pool never looks
                        // stalled while a task is in flight from here.
                        drop(st);
                        pool.inject(e.task);
                        self.armed.fetch_sub(1, Ordering::SeqCst);
                        st = self.state.lock();
                    }
                }
                Some(at) => {
                    self.cv.wait_until(&mut st, at);
                }
                None => self.cv.wait(&mut st),
            }
        }
    }

    /// Disarms and returns every entry of one owner (its job halted: they need not wait their
    /// time).
    pub(crate) fn take_owned(&self, owner: usize) -> Vec<T> {
        let mut st = self.state.lock();
        let (mine, rest): (Vec<Entry<T>>, Vec<Entry<T>>) = std::mem::take(&mut st.heap)
            .into_iter()
            .partition(|e| e.task.owner() == owner);
        st.heap = rest.into();
        self.armed.fetch_sub(mine.len(), Ordering::SeqCst);
        mine.into_iter().map(|e| e.task).collect()
    }

    /// Stops the thread and returns the armed tasks (to be abandoned by the caller).
    pub(crate) fn shutdown(&self) -> Vec<T> {
        let mut st = self.state.lock();
        st.shutdown = true;
        let tasks: Vec<T> = std::mem::take(&mut st.heap)
            .into_iter()
            .map(|e| e.task)
            .collect();
        // Only the entries taken: one the thread is injecting right now is still counted,
        // and it decrements that itself (storing 0 here would make it wrap).
        self.armed.fetch_sub(tasks.len(), Ordering::SeqCst);
        drop(st);
        self.cv.notify_all();
        tasks
    }
}
