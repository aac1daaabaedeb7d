//! Fair shares benchmark: how long a light tenant's items wait while another tenant floods
//! the shared worker pool, with the pool fair (by group weight) and first come, first served.
//!
//! ```text
//! cargo bench -p routilux --bench fairness                  # release build
//! cargo bench -p routilux --bench fairness --profile dev -- --reps 5
//! cargo bench -p routilux --bench fairness -- --reps 7 --overhead-only   # the costs alone
//! ```
//!
//! In-process, one runtime per scenario, two groups of weight 1. Tenant B posts one item every
//! `--every` (default 5 ms) to a routine that does nothing but note the time, and each sample
//! is post-to-delivery latency. Tenant A floods a routine of concurrency `--threads` whose
//! activations each spin the CPU for `--busy` (default 1 ms), kept topped up to 1 k and 10 k
//! queued items by a feeder. Scenarios alternate within each repetition; the figures are
//! medians over the repetitions of each run's p50 and p99 of B's latency and A's activations
//! per second. The workers default to one less than the machine's cores (at least one), so
//! that the threads posting for A and B are not what delays B.

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use routilux::{Flow, Policy, Routine, Runtime};
use serde_json::json;

#[allow(dead_code)]
mod support;

struct Args {
    reps: usize,
    threads: usize,
    busy: Duration,
    every: Duration,
    samples: usize,
    /// Only the cost with nothing to share (`--overhead-only`).
    overhead_only: bool,
}

fn args() -> Args {
    let mut a = Args {
        reps: 5,
        threads: std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1).max(1)),
        busy: Duration::from_millis(1),
        every: Duration::from_millis(5),
        samples: 200,
        overhead_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} takes a number"))
        };
        match arg.as_str() {
            "--reps" => a.reps = num("--reps") as usize,
            "--threads" => a.threads = num("--threads") as usize,
            "--busy-us" => a.busy = Duration::from_micros(num("--busy-us")),
            "--every-us" => a.every = Duration::from_micros(num("--every-us")),
            "--samples" => a.samples = num("--samples") as usize,
            "--overhead-only" => a.overhead_only = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn spin(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// How long after its last post a scenario waits for B's items.
const STARVED: Duration = Duration::from_secs(10);

/// One run's figures.
struct Run {
    p50_us: f64,
    p99_us: f64,
    a_per_s: f64,
    starved: usize,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1_000.0
}

/// B's latency while A keeps `queued` items waiting (0: A idle).
fn scenario(a: &Args, fair: bool, queued: u64) -> Run {
    let rt = Runtime::builder()
        .thread_pool_size(a.threads)
        .fair(fair)
        .build();
    let epoch = Instant::now();
    let a_done = Arc::new(AtomicU64::new(0));
    let (busy, done) = (a.busy, a_done.clone());
    let mut fa = Flow::new();
    fa.add_routine(
        Routine::new()
            .slot_with_capacity("in", 20_000)
            .policy(Policy::batch_size(1))
            .concurrency(a.threads)
            .logic(move |_, _| {
                spin(busy);
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }),
        "work",
    );
    rt.register("a", &fa).unwrap();
    let lat: Arc<Mutex<Vec<u64>>> = Arc::default();
    let l = lat.clone();
    let mut fb = Flow::new();
    fb.add_routine(
        Routine::new().slot("in").logic(move |_, batch| {
            let now = epoch.elapsed().as_nanos() as u64;
            let mut l = l.lock();
            for item in batch.items() {
                l.push(now.saturating_sub(item.value()["t"].as_u64().unwrap_or(now)));
            }
            Ok(())
        }),
        "echo",
    );
    rt.register("b", &fb).unwrap();
    let (ga, gb) = (rt.add_group(1), rt.add_group(1));
    let a_job = rt.exec_in(ga, "a").unwrap();
    let a_hold = a_job.hold_open().unwrap();
    let a_input = a_job.input("work", "in").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut posted = 0u64;
    for _ in 0..queued {
        a_input.post(&json!({})).unwrap();
        posted += 1;
    }
    let feeder = {
        let (stop, done) = (stop.clone(), a_done.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                while queued > 0 && posted - done.load(Ordering::Relaxed) < queued {
                    if a_input.post(&json!({})).is_err() {
                        return;
                    }
                    posted += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let b_job = rt.exec_in(gb, "b").unwrap();
    let b_hold = b_job.hold_open().unwrap();
    let b_input = b_job.input("echo", "in").unwrap();
    // Let A's flood reach every worker before measuring.
    std::thread::sleep(Duration::from_millis(50));
    let (a0, t0) = (a_done.load(Ordering::Relaxed), Instant::now());
    let mut next = Instant::now();
    for _ in 0..a.samples {
        next += a.every;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let t = epoch.elapsed().as_nanos() as u64;
        b_input.post(&json!({ "t": t })).unwrap();
    }
    let deadline = Instant::now() + STARVED;
    while lat.lock().len() < a.samples && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let a_per_s = (a_done.load(Ordering::Relaxed) - a0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    a_job.cancel();
    drop((a_hold, b_hold));
    let _ = feeder.join();
    let mut l = lat.lock().clone();
    // Items still undelivered STARVED after the last post count as having waited that long
    // (the figures are then lower bounds, and the row says how many).
    let starved = a.samples - l.len().min(a.samples);
    l.resize(a.samples, STARVED.as_nanos() as u64);
    l.sort_unstable();
    Run {
        p50_us: percentile(&l, 0.5),
        p99_us: percentile(&l, 0.99),
        a_per_s,
        starved,
    }
}

/// What fair shares cost when there is nothing to share: one group's `n` no-op activations
/// (one item each, each emitting it on to a second routine), items per second. `quotas`: 1,
/// the group also has a memory quota (its jobs' meters linked to the group's); 2, a quota of
/// queued items too (every slot reserving items on the group's count).
fn overhead(a: &Args, fair: bool, quotas: u8, n: u64) -> f64 {
    let rt = Runtime::builder()
        .thread_pool_size(a.threads)
        .fair(fair)
        .build();
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot_with_capacity("in", n as usize)
            .policy(Policy::batch_size(1))
            .concurrency(a.threads)
            .event("out", ["i"])
            .logic(move |ctx, b| {
                d.fetch_add(1, Ordering::Relaxed);
                for item in b.items() {
                    ctx.emit_item("out", item.clone())?;
                }
                Ok(())
            }),
        "work",
    )
    .add_routine(
        Routine::new()
            .slot("in")
            .concurrency(a.threads)
            .logic(|_, _| Ok(())),
        "sink",
    )
    .connect("work", "out", "sink", "in");
    rt.register("a", &f).unwrap();
    let g = rt.add_group(1);
    if quotas >= 1 {
        rt.set_group_memory(g, Some(1 << 30));
    }
    if quotas >= 2 {
        rt.set_group_queued_items(g, Some(1_000_000));
    }
    let job = rt.exec_in(g, "a").unwrap();
    let items: Vec<routilux::Item> = (0..n)
        .map(|i| routilux::Item::new(json!({ "i": i })).unwrap())
        .collect();
    // Queue everything while paused, then time the activations alone.
    job.pause();
    let input = job.input("work", "in").unwrap();
    input.post_items(items, Vec::new()).unwrap();
    drop(input);
    let t0 = Instant::now();
    job.resume();
    assert!(job.wait(Duration::from_secs(600)));
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let a = args();
    println!(
        "fairness: {} worker(s), A's activations spin {:?}, B posts every {:?}, {} samples, \
         {} alternating repetitions (medians)",
        a.threads, a.busy, a.every, a.samples, a.reps
    );
    let cases: [(&str, bool, u64); 6] = [
        ("A idle, fifo", false, 0),
        ("A idle, fair", true, 0),
        ("A 1k queued, fifo", false, 1_000),
        ("A 1k queued, fair", true, 1_000),
        ("A 10k queued, fifo", false, 10_000),
        ("A 10k queued, fair", true, 10_000),
    ];
    let mut runs: Vec<Vec<Run>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..if a.overhead_only { 0 } else { a.reps } {
        for (i, &(_, fair, queued)) in cases.iter().enumerate() {
            runs[i].push(scenario(&a, fair, queued));
        }
    }
    println!(
        "{:<22} {:>12} {:>12} {:>16} {:>14}",
        "scenario", "B p50 (µs)", "B p99 (µs)", "A activations/s", "B undelivered"
    );
    let med = |v: &[Run], f: fn(&Run) -> f64| support::median(v.iter().map(f).collect());
    let mut p99 = Vec::new();
    for (i, (name, ..)) in cases.iter().enumerate() {
        if a.overhead_only {
            break;
        }
        let (p50, q99, tput) = (
            med(&runs[i], |r| r.p50_us),
            med(&runs[i], |r| r.p99_us),
            med(&runs[i], |r| r.a_per_s),
        );
        p99.push(q99);
        let starved: usize = runs[i].iter().map(|r| r.starved).sum();
        println!("{name:<22} {p50:>12.0} {q99:>12.0} {tput:>16.0} {starved:>14}");
    }
    let n = 100_000;
    let (mut fifo, mut fair, mut quota, mut items) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.reps {
        fifo.push(overhead(&a, false, 0, n));
        fair.push(overhead(&a, true, 0, n));
        quota.push(overhead(&a, true, 1, n));
        items.push(overhead(&a, true, 2, n));
    }
    let (fifo, fair, quota, items) = (
        support::median(fifo),
        support::median(fair),
        support::median(quota),
        support::median(items),
    );
    println!(
        "one group alone, {n} no-op activations (each emitting to a no-op sink): fifo \
         {fifo:.0}/s, fair {fair:.0}/s (fair/fifo {:.2}), fair with a memory quota \
         {quota:.0}/s (quota/fair {:.2}), and a queued-items quota {items:.0}/s (/fair {:.2})",
        fair / fifo,
        quota / fair,
        items / fair
    );
    if a.overhead_only {
        return;
    }
    let target = p99[1] + 2.0 * a.busy.as_secs_f64() * 1e6;
    println!(
        "target (B's p99 alone, fair, + twice one of A's activations): {target:.0} µs; \
         fair under 1k: {:.0} µs, under 10k: {:.0} µs",
        p99[3], p99[5]
    );
}
