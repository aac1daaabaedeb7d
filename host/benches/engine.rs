//! Engine benchmark: routilux with native routines and with WebAssembly routines, against a
//! bare `crossbeam-channel` pipeline of the same shape, side by side in one run; then the
//! cost of a wasm activation, of a fresh instance, and the memory of a live instance.
//!
//! ```text
//! cargo bench -p routilux --bench engine                 # all scenarios, 5 runs each
//! cargo bench -p routilux --bench engine -- --reps 3 --messages 50000 --threads 4
//! ```
//!
//! Every (scenario, implementation) pair runs in a fresh child process, so peak RSS (VmHWM) is
//! that run's alone. Figures are medians over the runs. "Deliveries" counts items handed to a
//! routine's logic (or a stage thread), summed over routines, entry routine included: fan-out
//! 1→3 makes 4 per message, a chain of 5 makes 5, fan-in 3→1 makes 2.
//!
//! The "durable" rows run the same job on a job store (`Runtime::exec_durable`, a fresh
//! directory under `target/`): every activation commits, input goes in units of 512 items as
//! `routilux run --durable` posts it; they add the store's size on disk at the end and its
//! transactions per message.

#![allow(missing_docs, clippy::unwrap_used)]

/// Both implementations run under mimalloc. With glibc's malloc, items freed on a different
/// thread from the one that made them are much dearer, which penalises a pool (where the last
/// holder of an item can be any worker) more than one-thread-per-stage; see BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use routilux::wasm::{Limits, Plugin};
use routilux::{
    Batch, Context, Flow, Item, JobStore, Logic, Policy, Routine, RoutineError, Runtime,
};
use serde_json::json;

#[path = "../../tests/support/plugins.rs"]
mod plugins;
mod support;

use support::{engine, forward, per_activation, status_kib};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    FanOut,
    Chain,
    FanIn,
}

impl Shape {
    const ALL: [Shape; 3] = [Shape::FanOut, Shape::Chain, Shape::FanIn];
    fn name(self) -> &'static str {
        match self {
            Shape::FanOut => "fan-out 1->3",
            Shape::Chain => "chain of 5",
            Shape::FanIn => "fan-in 3->1 batch(10)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Shape::FanOut => "fanout",
            Shape::Chain => "chain",
            Shape::FanIn => "fanin",
        }
    }
    fn from_key(k: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.key() == k)
    }
    fn deliveries_per_message(self) -> u64 {
        match self {
            Shape::FanOut => 4,
            Shape::Chain => 5,
            Shape::FanIn => 2,
        }
    }
    /// Routines (or stages) whose receipt time is a latency end point.
    fn sinks(self) -> usize {
        match self {
            Shape::FanOut => 3,
            Shape::Chain | Shape::FanIn => 1,
        }
    }
}

/// Post and delivery timestamps (ns since the run's epoch), indexed by message id.
struct Clock {
    epoch: Instant,
    posted: Vec<AtomicU64>,
    delivered: Vec<Vec<AtomicU64>>,
}

impl Clock {
    fn new(n: usize, sinks: usize) -> Arc<Self> {
        let col = || (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Arc::new(Self {
            epoch: Instant::now(),
            posted: col(),
            delivered: (0..sinks).map(|_| col()).collect(),
        })
    }
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
    fn post(&self, id: usize) {
        self.posted[id].store(self.now(), Ordering::Relaxed);
    }
    /// Records a delivery. The id is read from the item's text with a typed parse that skips
    /// the payload without allocating, so the harness costs every implementation the same
    /// (~0.1 µs), not a full parse into a `Value` where the item arrived as text.
    fn deliver(&self, sink: usize, item: &Item) {
        #[derive(serde::Deserialize)]
        struct Id {
            id: usize,
        }
        let Id { id } = serde_json::from_str(item.json_str()).unwrap();
        self.delivered[sink][id].store(self.now(), Ordering::Relaxed);
    }
    /// p50 and p99 of delivery − post over every sink and message, in µs.
    fn percentiles(&self) -> (f64, f64) {
        let mut lat: Vec<u64> = Vec::with_capacity(self.posted.len() * self.delivered.len());
        for sink in &self.delivered {
            for (p, d) in self.posted.iter().zip(sink) {
                let (p, d) = (p.load(Ordering::Relaxed), d.load(Ordering::Relaxed));
                assert!(d >= p && d > 0, "a message was not delivered");
                lat.push(d - p);
            }
        }
        lat.sort_unstable();
        let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
        (at(0.50), at(0.99))
    }
}

/// The messages as JSON text, as `routilux run --input` or a guest's `emit` makes them.
fn messages(n: usize) -> Vec<Item> {
    let payload = "x".repeat(64);
    (0..n)
        .map(|i| {
            let text = json!({"id": i, "payload": payload}).to_string();
            Item::from_json_text(text).unwrap()
        })
        .collect()
}

/// Native routines, or routines of the `fixtures` plugin (`forward`, `sink`).
#[derive(Clone)]
enum Imp {
    Native,
    Wasm(Plugin),
}

/// Records delivery times after the wrapped logic has handled a batch.
struct Timed {
    inner: Arc<dyn Logic>,
    clock: Arc<Clock>,
    sink: usize,
}

impl Logic for Timed {
    fn activate(&self, ctx: &Context, batch: &Batch) -> Result<(), RoutineError> {
        self.inner.activate(ctx, batch)?;
        for item in batch.items() {
            self.clock.deliver(self.sink, item);
        }
        Ok(())
    }
}

fn recorder(imp: &Imp, clock: &Arc<Clock>, sink: usize) -> Routine {
    let c = clock.clone();
    match imp {
        Imp::Native => Routine::new().slot("in").logic(move |_, batch| {
            for item in batch.items() {
                c.deliver(sink, item);
            }
            Ok(())
        }),
        Imp::Wasm(p) => {
            let r = p.routine("sink").unwrap();
            let inner = r.logic_ref().unwrap();
            r.logic_impl(Timed {
                inner,
                clock: c,
                sink,
            })
        }
    }
}

fn forwarder(imp: &Imp) -> Routine {
    match imp {
        Imp::Native => Routine::new()
            .slot("in")
            .event("out", ["id", "payload"])
            .logic(forward),
        Imp::Wasm(p) => p.routine("forward").unwrap(),
    }
}

fn fixtures() -> Plugin {
    load_plugin("fixtures")
}

/// A plugin of `plugins/` in an engine of the bench's configuration.
fn load_plugin(name: &str) -> Plugin {
    let cache = plugins::repo_root()
        .join("target")
        .join("routilux-bench-cache");
    engine(Some(cache)).load(plugins::plugin(name)).unwrap()
}

/// What a durable run adds: the store's size on disk at the end, and its transactions.
#[derive(Default)]
struct StoreFigures {
    bytes: u64,
    compacted: u64,
    groups: u64,
}

/// Runs one scenario on routilux; returns elapsed time. `durable`: on a job store, whose
/// figures it fills in.
fn run_routilux(
    shape: Shape,
    imp: &Imp,
    n: usize,
    threads: usize,
    clock: &Arc<Clock>,
    durable: Option<&mut StoreFigures>,
) -> Duration {
    let mut flow = Flow::new();
    let entries: Vec<String> = match shape {
        Shape::FanOut => {
            flow.add_routine(forwarder(imp), "src");
            for s in 0..3 {
                let id = format!("sub{s}");
                flow.add_routine(recorder(imp, clock, s), &id)
                    .connect("src", "out", &id, "in");
            }
            vec!["src".into()]
        }
        Shape::Chain => {
            for s in 0..4 {
                flow.add_routine(forwarder(imp), &format!("r{s}"));
                if s > 0 {
                    flow.connect(&format!("r{}", s - 1), "out", &format!("r{s}"), "in");
                }
            }
            flow.add_routine(recorder(imp, clock, 0), "r4")
                .connect("r3", "out", "r4", "in");
            vec!["r0".into()]
        }
        Shape::FanIn => {
            flow.add_routine(
                recorder(imp, clock, 0).policy(Policy::batch_size(10)),
                "sink",
            );
            (0..3)
                .map(|s| {
                    let id = format!("src{s}");
                    flow.add_routine(forwarder(imp), &id)
                        .connect(&id, "out", "sink", "in");
                    id
                })
                .collect()
        }
    };
    let rt = Runtime::builder().thread_pool_size(threads).build();
    rt.register("bench", &flow).unwrap();
    let items = messages(n);
    let base = plugins::repo_root().join("target").join("bench-stores");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let (job, hold) = match durable {
        None => (rt.exec("bench").unwrap(), None),
        Some(_) => {
            let store = JobStore::open(dir.path(), b"bench").unwrap();
            let (job, hold) = rt.exec_durable("bench", store).unwrap();
            (job, Some(hold))
        }
    };
    let start = Instant::now();
    let inputs: Vec<routilux::Input> = entries
        .iter()
        .map(|e| job.input(e, "in").unwrap())
        .collect();
    drop(hold);
    if inputs[0].is_durable() {
        // In units, as `routilux run --durable` posts input lines.
        let mut units: Vec<Vec<Item>> = vec![Vec::new(); inputs.len()];
        for (i, item) in items.into_iter().enumerate() {
            clock.post(i);
            let k = i % inputs.len();
            units[k].push(item);
            if units[k].len() == 512 {
                inputs[k]
                    .post_items(
                        std::mem::take(&mut units[k]),
                        vec![(k.to_string(), i as u64)],
                    )
                    .unwrap();
            }
        }
        for (k, unit) in units.into_iter().enumerate() {
            inputs[k].post_items(unit, Vec::new()).unwrap();
        }
    } else {
        for (i, item) in items.into_iter().enumerate() {
            clock.post(i);
            inputs[i % inputs.len()].post_item(item).unwrap();
        }
    }
    drop(inputs);
    assert!(job.wait(Duration::from_secs(600)));
    let elapsed = start.elapsed();
    let groups = job.sync_store().map(Result::unwrap);
    let size = || {
        std::fs::metadata(dir.path().join("job.redb"))
            .unwrap()
            .len()
    };
    let c = job.counters();
    if std::env::var_os("BENCH_COUNTERS").is_some() {
        for (name, c) in &c {
            eprintln!(
                "{name}: activations {} processed {}",
                c.activations, c.processed
            );
        }
    }
    if let (Some(groups), Some(f)) = (groups, durable) {
        let bytes = size();
        // Closed: a completed job's store is compacted.
        drop((job, rt));
        *f = StoreFigures {
            bytes,
            compacted: size(),
            groups,
        };
    }
    let delivered: u64 = c.values().map(|c| c.processed).sum();
    assert_eq!(
        delivered,
        n as u64 * shape.deliveries_per_message()
            - (n % 10) as u64 * u64::from(shape == Shape::FanIn)
    );
    elapsed
}

/// The same shape as threads joined by bounded crossbeam channels (one thread per stage).
fn run_channels(shape: Shape, n: usize, clock: &Arc<Clock>) -> Duration {
    use crossbeam_channel::{Receiver, Sender, bounded};
    const CAP: usize = routilux::DEFAULT_MAX_QUEUE_LENGTH;
    let items = messages(n);
    let spawn_fwd = |rx: Receiver<Item>, txs: Vec<Sender<Item>>| {
        std::thread::spawn(move || {
            for item in rx {
                for tx in &txs {
                    tx.send(item.clone()).unwrap();
                }
            }
        })
    };
    let spawn_sink = |rx: Receiver<Item>, sink: usize, chunk: usize, c: Arc<Clock>| {
        std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(chunk);
            for item in rx {
                buf.push(item);
                if buf.len() == chunk {
                    for i in buf.drain(..) {
                        c.deliver(sink, &i);
                    }
                }
            }
        })
    };
    let mut handles = Vec::new();
    let entries: Vec<Sender<Item>> = match shape {
        Shape::FanOut => {
            let (tx, rx) = bounded(CAP);
            let mut subs = Vec::new();
            for s in 0..3 {
                let (stx, srx) = bounded(CAP);
                subs.push(stx);
                handles.push(spawn_sink(srx, s, 1, clock.clone()));
            }
            handles.push(spawn_fwd(rx, subs));
            vec![tx]
        }
        Shape::Chain => {
            let (last_tx, last_rx) = bounded(CAP);
            handles.push(spawn_sink(last_rx, 0, 1, clock.clone()));
            let mut next = last_tx;
            for _ in 0..4 {
                let (tx, rx) = bounded(CAP);
                handles.push(spawn_fwd(rx, vec![next]));
                next = tx;
            }
            vec![next]
        }
        Shape::FanIn => {
            let (sink_tx, sink_rx) = bounded(CAP);
            handles.push(spawn_sink(sink_rx, 0, 10, clock.clone()));
            (0..3)
                .map(|_| {
                    let (tx, rx) = bounded(CAP);
                    handles.push(spawn_fwd(rx, vec![sink_tx.clone()]));
                    tx
                })
                .collect()
        }
    };
    let start = Instant::now();
    for (i, item) in items.into_iter().enumerate() {
        clock.post(i);
        entries[i % entries.len()].send(item).unwrap();
    }
    drop(entries);
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

#[derive(Clone)]
struct Opts {
    reps: usize,
    messages: usize,
    threads: usize,
    child: Option<(String, String)>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        reps: 5,
        messages: 100_000,
        threads: 4,
        child: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--reps" => o.reps = val().parse().unwrap(),
            "--messages" => o.messages = val().parse().unwrap(),
            "--threads" => o.threads = val().parse().unwrap(),
            "--child" => {
                let v = val();
                let (s, imp) = v.split_once(':').unwrap();
                o.child = Some((s.to_owned(), imp.to_owned()));
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// Runs `--child <what>` `reps` times; returns the medians of the numbers each run prints.
fn run_children(o: &Opts, what: &str) -> Vec<f64> {
    let args = [
        "--child",
        what,
        "--messages",
        &o.messages.to_string(),
        "--threads",
        &o.threads.to_string(),
    ];
    support::children(o.reps, &args.map(String::from))
}

/// Per-activation time through the runtime (`support::per_activation`); `fresh`: a new wasm
/// instance every activation.
fn run_round_trip(imp: &str, n: usize) -> f64 {
    let routine = match imp {
        "native" => Routine::new()
            .slot("in")
            .event("out", ["id", "payload"])
            .logic(forward),
        _ => {
            let limits = Limits {
                recycle_after: if imp == "fresh" { 1 } else { u64::MAX },
                ..Limits::default()
            };
            fixtures().routine_with("forward", limits).unwrap()
        }
    };
    let item = messages(1).remove(0);
    per_activation(routine, n, || {
        Item::from_json_text(item.json_str()).unwrap()
    })
}

/// Resident memory added per live instance (each called once), in KiB: all of it (RSS), its
/// private part (`RssAnon`: the host's structures and the guest's written pages), and the
/// pages of the component's memory image it maps (`RssShmem`), which RSS counts once per
/// instance although every instance shares the same physical pages.
fn run_rss(p: &Plugin, n: usize) -> [f64; 3] {
    let warm: Vec<_> = (0..8).map(|_| p.instantiate().unwrap()).collect();
    let fields = ["VmRSS:", "RssAnon:", "RssShmem:"];
    let before = fields.map(status_kib);
    let live: Vec<_> = (0..n).map(|_| p.instantiate().unwrap()).collect();
    let after = fields.map(status_kib);
    drop((warm, live));
    [0, 1, 2].map(|i| (after[i] - before[i]) / n as f64)
}

fn main() {
    let o = parse_args();
    if let Some((what, imp)) = &o.child {
        match what.as_str() {
            "phases" => {
                let [store, instantiate, drop] =
                    load_plugin(imp).instantiation_phases(5_000).unwrap();
                println!("{store} {instantiate} {drop}");
            }
            "roundtrip" => println!("{}", run_round_trip(imp, o.messages.min(50_000))),
            "rss" => {
                let (plugin, count) = imp.split_once('@').unwrap();
                let [rss, private, shared] = run_rss(&load_plugin(plugin), count.parse().unwrap());
                println!("{rss} {private} {shared}");
            }
            shape => {
                let shape = Shape::from_key(shape).unwrap();
                let clock = Clock::new(o.messages, shape.sinks());
                let mut store = StoreFigures::default();
                let durable = imp.ends_with("-durable").then_some(&mut store);
                let (m, t) = (o.messages, o.threads);
                let elapsed = match imp.trim_end_matches("-durable") {
                    "native" => run_routilux(shape, &Imp::Native, m, t, &clock, durable),
                    "wasm" => run_routilux(shape, &Imp::Wasm(fixtures()), m, t, &clock, durable),
                    _ => run_channels(shape, o.messages, &clock),
                };
                let (p50, p99) = clock.percentiles();
                let rate = (o.messages as u64 * shape.deliveries_per_message()) as f64
                    / elapsed.as_secs_f64();
                println!(
                    "{rate} {p50} {p99} {} {} {} {}",
                    status_kib("VmHWM:"),
                    store.bytes,
                    store.groups,
                    store.compacted
                );
            }
        }
        return;
    }
    // Build the plugins once, before any child needs them.
    plugins::plugin_dir();
    println!(
        "routilux engine bench: {} messages of {{\"id\", \"payload\": 64 B}}, thread_pool_size {}, {} runs each (medians)\n",
        o.messages, o.threads, o.reps
    );
    println!(
        "{:<22} {:<18} {:>14} {:>10} {:>10} {:>10} {:>8} {:>9}",
        "scenario",
        "implementation",
        "deliveries/s",
        "p50 µs",
        "p99 µs",
        "peak MiB",
        "vs chan",
        "vs native"
    );
    let mut store_lines = Vec::new();
    for shape in Shape::ALL {
        let results: Vec<(&str, Vec<f64>)> = [
            "channel",
            "native",
            "native-durable",
            "wasm",
            "wasm-durable",
        ]
        .into_iter()
        .map(|imp| (imp, run_children(&o, &format!("{}:{imp}", shape.key()))))
        .collect();
        let chan = results[0].1[0];
        let native = results[1].1[0];
        let wasm = results[3].1[0];
        for (imp, r) in &results {
            let label = match *imp {
                "channel" => "crossbeam-channel",
                "native" => "routilux native",
                "native-durable" => "native, durable",
                "wasm-durable" => "wasm, durable",
                _ => "routilux wasm",
            };
            // Durable rows: against the same implementation in memory.
            let vs_native = match *imp {
                "wasm" => format!("{:>8.0}%", r[0] / native * 100.0),
                "native-durable" => format!("{:>8.0}% of in-memory", r[0] / native * 100.0),
                "wasm-durable" => format!("{:>8.0}% of in-memory", r[0] / wasm * 100.0),
                _ => String::new(),
            };
            if imp.ends_with("-durable") {
                store_lines.push(format!(
                    "{:<22} {:<18} store {:.1} MiB at the end ({:.1} MiB per million messages), \
                     {:.2} MiB once closed (compacted); {:.3} transactions per message",
                    shape.name(),
                    label,
                    r[4] / 1048576.0,
                    r[4] / 1048576.0 / o.messages as f64 * 1e6,
                    r[6] / 1048576.0,
                    r[5] / o.messages as f64
                ));
            }
            println!(
                "{:<22} {:<18} {:>14.0} {:>10.1} {:>10.1} {:>10.1} {:>7.0}% {vs_native}",
                shape.name(),
                label,
                r[0],
                r[1],
                r[2],
                r[3] / 1024.0,
                r[0] / chan * 100.0
            );
        }
    }
    println!();
    for line in store_lines {
        println!("{line}");
    }

    let n = o.messages.min(50_000);
    println!(
        "\nactivation cost through the runtime (one routine, batch_size(1), {n} activations, 1 worker, each emits its item once):"
    );
    let native = run_children(&o, "roundtrip:native")[0];
    let wasm = run_children(&o, "roundtrip:wasm")[0];
    let fresh = run_children(&o, "roundtrip:fresh")[0];
    let phases = |plugin: &str| match run_children(&o, &format!("phases:{plugin}"))[..] {
        [store, instantiate, drop] => {
            format!("Store {store:.1} µs, instantiate {instantiate:.1} µs, drop {drop:.1} µs")
        }
        _ => unreachable!("three figures"),
    };
    println!("  native logic                    {native:>8.2} µs/activation");
    println!(
        "  wasm logic (Rust guest)         {wasm:>8.2} µs/activation   wasm round trip: {:.2} µs",
        wasm - native
    );
    println!(
        "  wasm, a fresh instance each     {fresh:>8.2} µs/activation   fresh instance: {:.2} µs",
        fresh - wasm
    );
    println!(
        "  the stages that run no guest code (5,000 instances):\n    fixtures plugin: {}\n    news plugin:     {}",
        phases("fixtures"),
        phases("news")
    );
    for plugin in ["fixtures", "news"] {
        println!(
            "\nresident memory per live instance of the {plugin} plugin (each called once), KiB each:"
        );
        for count in [1_000, 10_000] {
            let kib = run_children(
                &Opts {
                    reps: 1,
                    ..o.clone()
                },
                &format!("rss:{plugin}@{count}"),
            );
            println!(
                "  {count:>6} instances: RSS {:>6.1} = private {:>6.1} + shared image pages {:>6.1}",
                kib[0], kib[1], kib[2]
            );
        }
    }
}
