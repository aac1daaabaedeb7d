//! What the benches share: running this bench binary as child processes and taking medians,
//! reading the process's memory figures, the engine configuration, and the per-activation
//! measurement.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use routilux::wasm::{WasmConfig, WasmEngine};
use routilux::{Batch, Context, Flow, Item, Policy, Routine, RoutineError, Runtime};

/// An engine caching compiled components in `cache` (none: no cache);
/// `ROUTILUX_BENCH_POOLING=1` selects the pooling instance allocator.
pub fn engine(cache: Option<PathBuf>) -> WasmEngine {
    WasmEngine::new(WasmConfig {
        cache: cache.is_some(),
        cache_dir: cache,
        pooling: std::env::var_os("ROUTILUX_BENCH_POOLING").is_some(),
        ..WasmConfig::default()
    })
    .unwrap()
}

/// Native logic that forwards every item unchanged on `out`.
pub fn forward(ctx: &Context, batch: &Batch) -> Result<(), RoutineError> {
    for item in batch.items() {
        ctx.emit_item("out", item.clone())?;
    }
    Ok(())
}

/// µs per activation through the runtime: one routine, `batch_size(1)`, one worker, each
/// activation emitting its item once (to no connection). The slot holds every item and the
/// items are made before the clock starts, so the figure is the routine's, not the poster's.
pub fn per_activation(routine: Routine, n: usize, item: impl Fn() -> Item) -> f64 {
    let mut flow = Flow::new();
    flow.add_routine(
        routine
            .policy(Policy::batch_size(1))
            .max_queue_length("in", n + 1),
        "r",
    );
    let rt = Runtime::builder().thread_pool_size(1).build();
    rt.register("rt", &flow).unwrap();
    // Warm up: makes the first instance.
    let job = rt.exec("rt").unwrap();
    job.post_item("r", "in", item()).unwrap();
    assert!(job.wait(Duration::from_secs(120)));
    assert_eq!(job.counters()["r"].errors, 0, "the warm-up failed");
    let items: Vec<Item> = (0..n).map(|_| item()).collect();
    let job = rt.exec("rt").unwrap();
    let input = job.input("r", "in").unwrap();
    let start = Instant::now();
    for item in items {
        input.post_item(item).unwrap();
    }
    drop(input);
    assert!(job.wait(Duration::from_secs(1200)));
    let elapsed = start.elapsed();
    let c = &job.counters()["r"];
    assert_eq!((c.activations, c.errors), (n as u64, 0));
    elapsed.as_secs_f64() * 1e6 / n as f64
}

/// A `kB` field of `/proc/self/status` (`VmHWM`: peak resident, `VmRSS`: resident now).
pub fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// The median (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs this bench binary `reps` times with `args`; each run prints numbers separated by
/// whitespace. Returns the median of each number over the runs.
pub fn children(reps: usize, args: &[String]) -> Vec<f64> {
    let exe = std::env::current_exe().expect("the bench binary");
    let mut runs: Vec<Vec<f64>> = Vec::new();
    for _ in 0..reps {
        let out = Command::new(&exe).args(args).output().expect("run a child");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        runs.push(
            text.split_whitespace()
                .map(|x| x.parse().expect("a number"))
                .collect(),
        );
    }
    (0..runs[0].len())
        .map(|k| median(runs.iter().map(|r| r[k]).collect()))
        .collect()
}
