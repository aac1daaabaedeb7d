//! Helpers shared by the integration tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use routilux::{Batch, Context, Item, RoutineError, Runtime};
use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(20);

/// A runtime whose idle workers never wake on their own: every wake-up must come from the
/// protocol, so a lost one hangs a test (which then fails on its deadline) instead of being
/// hidden by a timed poll.
pub fn runtime(threads: usize) -> Runtime {
    builder(threads).build()
}

/// [`runtime`]'s builder.
pub fn builder(threads: usize) -> routilux::RuntimeBuilder {
    Runtime::builder()
        .thread_pool_size(threads)
        .park_timeout(Duration::from_secs(3600))
}

/// A log of values, shared between logic closures and the test.
#[derive(Clone, Default)]
pub struct Log<T>(Arc<Mutex<Vec<T>>>);

impl<T: Clone> Log<T> {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }
    pub fn push(&self, v: T) {
        self.0.lock().push(v);
    }
    pub fn get(&self) -> Vec<T> {
        self.0.lock().clone()
    }
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
}

/// One recorded activation: which routine, when it started and ended, what it got.
#[derive(Clone, Debug)]
pub struct Interval {
    pub routine: String,
    pub start: Instant,
    pub end: Instant,
    pub items: Vec<Value>,
}

/// Whether two intervals overlap in time.
pub fn overlap(a: &Interval, b: &Interval) -> bool {
    a.start < b.end && b.start < a.end
}

/// The largest number of intervals that were open at one instant.
pub fn max_overlap(intervals: &[Interval]) -> usize {
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for i in intervals {
        edges.push((i.start, 1));
        edges.push((i.end, -1));
    }
    // Ends sort before starts at the same instant: touching is not overlapping.
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut max) = (0, 0);
    for (_, d) in edges {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

/// A routine with slot `in` and event `out` that forwards every item unchanged.
pub fn forwarder() -> routilux::Routine {
    routilux::Routine::new()
        .slot("in")
        .event("out", ["id"])
        .logic(forward)
}

/// Logic that forwards every item it gets, unchanged, on event `out`.
pub fn forward(ctx: &Context, batch: &Batch) -> Result<(), RoutineError> {
    for item in batch.items() {
        ctx.emit_item("out", item.clone())?;
    }
    Ok(())
}

/// A routine that, activated on slot `go`, emits `{"id": 0..n}` on `out`, in one activation.
pub fn generator(n: i64) -> routilux::Routine {
    routilux::Routine::new()
        .slot("go")
        .event("out", ["id"])
        .logic(move |ctx, _| {
            for id in 0..n {
                ctx.emit("out", &serde_json::json!({ "id": id }))?;
            }
            Ok(())
        })
}

/// Records one activation's interval and items.
fn record(log: &Log<Interval>, ctx: &Context, batch: &Batch, start: Instant) {
    log.push(Interval {
        routine: ctx.routine_id().to_owned(),
        start,
        end: Instant::now(),
        items: batch.items().map(|i: &Item| i.value().clone()).collect(),
    });
}

/// A logic closure that records its interval, sleeps `busy`, then forwards items to `out`.
pub fn recording(
    log: &Log<Interval>,
    busy: Duration,
    out: Option<&'static str>,
) -> impl Fn(&Context, &Batch) -> Result<(), RoutineError> + Send + Sync + 'static {
    let log = log.clone();
    move |ctx, batch| {
        let start = Instant::now();
        std::thread::sleep(busy);
        if let Some(ev) = out {
            for item in batch.items() {
                ctx.emit_item(ev, item.clone())?;
            }
        }
        record(&log, ctx, batch, start);
        Ok(())
    }
}

/// A gate that logic can wait on until the test opens it.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn open(&self) {
        *self.0.0.lock() = true;
        self.0.1.notify_all();
    }
    /// Waits until open (or a generous timeout, so a bug fails the test instead of hanging).
    pub fn wait(&self) -> bool {
        let mut g = self.0.0.lock();
        let deadline = Instant::now() + WAIT;
        while !*g {
            if self.0.1.wait_until(&mut g, deadline).timed_out() {
                return false;
            }
        }
        true
    }
}

/// Waits until `f` is true or the timeout passes.
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Routines meet here: each arrival under a key waits until `n` have arrived under that key,
/// or a timeout passes. Activations that really run in parallel all meet and so overlap;
/// activations run one after another time out one by one and do not — so a test built on it
/// shows parallelism without depending on how fast the machine is.
#[derive(Clone, Default)]
pub struct Rendezvous(Arc<(Mutex<std::collections::HashMap<String, usize>>, Condvar)>);

impl Rendezvous {
    pub fn new() -> Self {
        Self::default()
    }
    /// Returns whether all `n` met.
    pub fn meet(&self, key: &str, n: usize, timeout: Duration) -> bool {
        let (lock, cv) = &*self.0;
        let mut g = lock.lock();
        *g.entry(key.to_owned()).or_default() += 1;
        cv.notify_all();
        let deadline = Instant::now() + timeout;
        while g[key] < n {
            if cv.wait_until(&mut g, deadline).timed_out() {
                return g[key] >= n;
            }
        }
        true
    }
}

/// A logic closure that records its interval and, for each item, meets `n - 1` other routines
/// at the rendezvous keyed by the item's `key_field` before ending.
pub fn meeting(
    log: &Log<Interval>,
    rv: &Rendezvous,
    n: usize,
    key_field: &'static str,
) -> impl Fn(&Context, &Batch) -> Result<(), RoutineError> + Send + Sync + 'static {
    let (log, rv) = (log.clone(), rv.clone());
    move |ctx, batch| {
        let start = Instant::now();
        for item in batch.items() {
            rv.meet(
                &item.value()[key_field].to_string(),
                n,
                Duration::from_secs(2),
            );
        }
        log.push(Interval {
            routine: ctx.routine_id().to_owned(),
            start,
            end: Instant::now(),
            items: batch.items().map(|i: &Item| i.value().clone()).collect(),
        });
        Ok(())
    }
}
