//! Guest languages side by side: the same `echo` routine (emit each item once, unchanged)
//! written in Rust, C, Python and JavaScript (QuickJS and StarlingMonkey), each in the real
//! host: component size, compile time and load time from the compiled cache, time per
//! activation through the runtime (warm instance, and a fresh instance every activation),
//! first-call latency, and resident memory per live instance.
//!
//! ```text
//! cargo bench -p routilux --bench languages                  # 3 runs each (medians)
//! cargo bench -p routilux --bench languages -- --reps 5 --messages 20000
//! ```
//!
//! Each measurement runs in a fresh child process. The guests are built first, through the
//! CLI's builder (`routilux build`), which installs the guest toolchains on first use.

#![allow(missing_docs, clippy::unwrap_used)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use routilux::cli::guests::JsEngine;
use routilux::wasm::{Limits, Plugin};
use routilux::{Item, Routine};
use serde_json::json;

#[path = "../../tests/support/plugins.rs"]
mod plugins;
mod support;

use support::{engine, forward, per_activation, status_kib};

/// The shared compiled-component cache of the children (so only `compile` compiles).
fn cache_dir() -> PathBuf {
    plugins::repo_root().join("target").join("bench-cache")
}

/// An item as it comes from a guest's emit or a JSON line of `routilux run --input`: JSON
/// text, parsed only if native logic reads it.
fn item() -> Item {
    let text = json!({"id": 1, "payload": "x".repeat(64)}).to_string();
    Item::from_json_text(text).unwrap()
}

fn load(path: &Path) -> Plugin {
    engine(Some(cache_dir())).load(path).unwrap()
}

/// `compile`: ms to compile (no cache), then ms to load from a fresh cache.
fn child_compile(path: &Path) -> String {
    let started = Instant::now();
    engine(None).load(path).unwrap();
    let compile = started.elapsed().as_secs_f64() * 1e3;
    let dir = tempfile::tempdir().unwrap();
    engine(Some(dir.path().to_owned())).load(path).unwrap();
    let started = Instant::now();
    let p = engine(Some(dir.path().to_owned())).load(path).unwrap();
    let cached = started.elapsed().as_secs_f64() * 1e3;
    assert!(p.from_cache());
    format!("{compile} {cached}")
}

/// `activate`: µs per activation, warm; then with a fresh instance each; then the first
/// call's latency on a new instance (instantiate + first activation, measured alone).
fn child_activate(path: &Path, n: usize) -> String {
    let p = load(path);
    let warm = per_activation(p.routine_with("echo", Limits::default()).unwrap(), n, item);
    let fresh_n = (n / 10).clamp(100, 2_000);
    let fresh = per_activation(
        p.routine_with(
            "echo",
            Limits {
                recycle_after: 1,
                ..Limits::default()
            },
        )
        .unwrap(),
        fresh_n,
        item,
    );
    let started = Instant::now();
    let live = p.instantiate().unwrap();
    let instantiate = started.elapsed().as_secs_f64() * 1e6;
    drop(live);
    format!("{warm} {fresh} {instantiate}")
}

/// `jobs`: µs per job of one item, one job after another, with each job's own instances (the
/// default: a fresh instance and a first activation per job) or, with `reuse`, instances
/// reused across jobs.
fn child_jobs(path: &Path, n: usize, reuse: bool) -> String {
    use routilux::{Flow, Runtime};
    use std::time::Duration;
    let p = load(path);
    let limits = Limits {
        reuse_across_jobs: reuse,
        ..Limits::default()
    };
    let mut flow = Flow::new();
    flow.add_routine(p.routine_with("echo", limits).unwrap(), "echo");
    let rt = Runtime::builder().thread_pool_size(1).build();
    rt.register("jobs", &flow).unwrap();
    let one = || {
        let job = rt.exec("jobs").unwrap();
        job.post_item("echo", "in", item()).unwrap();
        assert!(job.wait(Duration::from_secs(60)));
    };
    one();
    let started = Instant::now();
    for _ in 0..n {
        one();
    }
    let per_job = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    rt.forget_finished_jobs();
    format!("{per_job}")
}

/// `native`: the same routine as native Rust logic.
fn child_native(n: usize) -> String {
    let routine = Routine::new()
        .slot("in")
        .event("out", ["id"])
        .logic(forward);
    format!("{}", per_activation(routine, n, item))
}

/// `rss`: KiB resident per live instance (each instantiated, which calls `describe`).
fn child_rss(path: &Path, count: usize) -> String {
    let p = load(path);
    let warm: Vec<_> = (0..4).map(|_| p.instantiate().unwrap()).collect();
    let before = status_kib("VmRSS:");
    let live: Vec<_> = (0..count).map(|_| p.instantiate().unwrap()).collect();
    let after = status_kib("VmRSS:");
    drop((warm, live));
    format!("{}", (after - before) / count as f64)
}

struct Opts {
    reps: usize,
    messages: usize,
    instances: usize,
}

/// Runs this bench as a child `reps` times; the medians of the numbers it prints.
fn children(o: &Opts, args: &[&str]) -> Vec<f64> {
    let mut all: Vec<String> = vec!["--child".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend([
        "--messages".into(),
        o.messages.to_string(),
        "--instances".into(),
        o.instances.to_string(),
    ]);
    support::children(o.reps, &all)
}

/// The echo component of each language (built if needed).
fn guests() -> Vec<(&'static str, PathBuf)> {
    let sm_dir = plugins::repo_root()
        .join("target")
        .join("bench-guests")
        .join("news-js-sm");
    std::fs::create_dir_all(&sm_dir).unwrap();
    std::fs::copy(
        plugins::repo_root().join("plugins/news-js/plugin.js"),
        sm_dir.join("plugin.js"),
    )
    .unwrap();
    let sm = routilux::cli::plugins::build_project(&sm_dir, JsEngine::Starlingmonkey, true)
        .unwrap()
        .join("news-js-sm.wasm");
    vec![
        ("Rust", plugins::plugin("news")),
        ("C", plugins::guest_plugin("news-c")),
        ("Python", plugins::guest_plugin("news-py")),
        ("JS (QuickJS)", plugins::guest_plugin("news-js")),
        ("JS (StarlingMonkey)", sm),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().unwrap())
    };
    let o = Opts {
        reps: flag("--reps", 3),
        messages: flag("--messages", 20_000),
        instances: flag("--instances", 100),
    };
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let what = args[i + 1].as_str();
        let path = args.get(i + 2).map(PathBuf::from);
        let out = match what {
            "compile" => child_compile(&path.unwrap()),
            "activate" => child_activate(&path.unwrap(), o.messages),
            "native" => child_native(o.messages),
            // A fresh instance every activation only (for profiling).
            "fresh" => {
                let p = load(&path.unwrap());
                let limits = Limits {
                    recycle_after: 1,
                    ..Limits::default()
                };
                let routine = p.routine_with("echo", limits).unwrap();
                format!("{}", per_activation(routine, o.messages, item))
            }
            // Warm activations only (for profiling: `perf record … --child warm PATH`).
            "warm" => {
                let p = load(&path.unwrap());
                let routine = p.routine_with("echo", Limits::default()).unwrap();
                format!("{}", per_activation(routine, o.messages, item))
            }
            "rss" => child_rss(&path.unwrap(), o.instances),
            "jobs" => child_jobs(&path.unwrap(), (o.messages / 20).clamp(50, 1_000), false),
            "jobs-reuse" => child_jobs(&path.unwrap(), (o.messages / 20).clamp(50, 1_000), true),
            other => panic!("unknown child {other}"),
        };
        println!("{out}");
        return;
    }

    let guests = guests();
    println!(
        "routilux languages bench: echo (emit each item once) in each guest language; {} activations warm, {} runs each (medians)\n",
        o.messages, o.reps
    );
    let native = children(&o, &["native", "-"])[0];
    println!("native Rust logic through the runtime: {native:.2} µs/activation\n");
    println!(
        "{:<20} {:>9} {:>11} {:>9} {:>11} {:>11} {:>11} {:>12} {:>10}",
        "guest",
        "size KB",
        "compile ms",
        "cache ms",
        "act. µs",
        "trip µs",
        "fresh µs",
        "instant. µs",
        "KiB/inst"
    );
    let mut rust_trip = 0.0;
    for (name, path) in &guests {
        let p = path.display().to_string();
        let size = std::fs::metadata(path).unwrap().len() as f64 / 1000.0;
        let compile = children(&o, &["compile", &p]);
        let act = children(&o, &["activate", &p]);
        let rss = children(
            &Opts {
                reps: 1,
                messages: o.messages,
                instances: o.instances,
            },
            &["rss", &p],
        )[0];
        let trip = act[0] - native;
        if *name == "Rust" {
            rust_trip = trip;
        }
        println!(
            "{:<20} {:>9.0} {:>11.0} {:>9.1} {:>11.2} {:>11.2} {:>11.1} {:>12.1} {:>10.0}{}",
            name,
            size,
            compile[0],
            compile[1],
            act[0],
            trip,
            act[1] - act[0],
            act[2],
            rss,
            if *name == "Rust" {
                String::new()
            } else {
                format!("   trip {:.2}× Rust", trip / rust_trip)
            }
        );
    }
    println!(
        "\nper job of one item, one job after another ({} jobs, {} runs each, medians):",
        (o.messages / 20).clamp(50, 1_000),
        o.reps
    );
    println!(
        "{:<20} {:>16} {:>16} {:>10}",
        "guest", "own inst. µs", "reused µs", "cost µs"
    );
    for (name, path) in &guests {
        let p = path.display().to_string();
        let own = children(&o, &["jobs", &p])[0];
        let reused = children(&o, &["jobs-reuse", &p])[0];
        println!(
            "{:<20} {:>16.1} {:>16.1} {:>10.1}",
            name,
            own,
            reused,
            own - reused
        );
    }
    println!(
        "\nact. µs: per activation through the runtime, warm instance; trip µs: act. minus native \
         logic (the wasm round trip with one emit); fresh µs: added per activation when every \
         activation gets a new instance (instantiate + first call); instant. µs: instantiating \
         one instance alone; KiB/inst: resident memory per live instance ({} instances, each \
         described once). own inst.: each job gets its own instances (the default: guest \
         memory never carries from one job to the next); reused: `reuse_across_jobs`; cost: \
         what isolating jobs costs per job.",
        o.instances
    );
}
