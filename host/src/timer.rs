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

use crate::job::Job;
use crate::scheduler::{Pool, Task};

struct Entry {
    at: Instant,
    seq: u64,
    task: Task,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed, so the max-heap pops the earliest entry.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Entry>,
    seq: u64,
    shutdown: bool,
}

/// Armed tasks by due time.
#[derive(Default)]
pub(crate) struct Timer {
    state: Mutex<State>,
    cv: Condvar,
    armed: AtomicUsize,
}

impl Timer {
    /// Arms `task` to be injected at `at`. After shutdown, or once its job has halted, the
    /// task is abandoned at once.
    ///
    /// The job's `halted` flag is read under the timer's lock: a job halts by setting it and
    /// then taking its entries under the same lock ([`Timer::take_job`]), so an entry armed
    /// concurrently is either taken by it or sees the flag here. A cancelled job never waits
    /// for a timer armed just as it halted.
    pub(crate) fn schedule(&self, at: Instant, task: Task) {
        let mut st = self.state.lock();
        if st.shutdown || task.job_halted() {
            let why = if st.shutdown {
                "runtime shut down".to_owned()
            } else {
                format!("job {}", task.job_status())
            };
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
    pub(crate) fn run(&self, pool: &Pool) {
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

    /// Disarms and returns every entry of one job (it halted: they need not wait their time).
    pub(crate) fn take_job(&self, job: *const Job) -> Vec<Task> {
        let mut st = self.state.lock();
        let (mine, rest): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut st.heap)
            .into_iter()
            .partition(|e| std::ptr::eq(e.task.job(), job));
        st.heap = rest.into();
        self.armed.fetch_sub(mine.len(), Ordering::SeqCst);
        mine.into_iter().map(|e| e.task).collect()
    }

    /// Stops the thread and returns the armed tasks (to be abandoned by the caller).
    pub(crate) fn shutdown(&self) -> Vec<Task> {
        let mut st = self.state.lock();
        st.shutdown = true;
        let tasks: Vec<Task> = std::mem::take(&mut st.heap)
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
