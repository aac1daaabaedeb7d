//! The news fan-out demo, end to end: builds the example plugins for `wasm32-wasip2`
//! (installing the target if needed), loads the `news` component, and runs its broadcaster
//! with email, SMS and log subscribers, each a sandboxed WebAssembly instance, on a
//! four-thread pool.
//!
//! ```text
//! cargo run --release -p routilux --example news_fanout
//! ```

use std::time::{Duration, Instant};

use routilux::wasm::{WasmConfig, WasmEngine};
use routilux::{Flow, JobStatus, Runtime};
use serde_json::json;

#[path = "../../tests/support/plugins.rs"]
mod plugins;

const HEADLINES: [&str; 4] = [
    "Breaking: routilux runs its first flow",
    "Markets rally as fan-out delivers to every subscriber",
    "Scientists confirm: quiescent jobs complete by themselves",
    "Local routine finishes on time, in order",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let component = plugins::plugin("news");
    let engine = WasmEngine::new(WasmConfig::default())?;
    let news = engine.load(&component)?;
    println!(
        "loaded {} ({}) in {:.0?}: kinds {}",
        component.display(),
        if news.from_cache() {
            "from the compiled cache"
        } else {
            "compiled"
        },
        started.elapsed(),
        news.kind_names().join(", ")
    );

    let mut flow = Flow::new();
    flow.add_routine(news.routine("broadcaster")?, "broadcaster");
    for kind in ["email", "sms", "log"] {
        flow.add_routine(news.routine(kind)?, kind)
            .connect("broadcaster", "news", kind, "news");
    }

    let runtime = Runtime::builder()
        .thread_pool_size(4)
        .on_output(|job, line| println!("{job} {:<12} {}", line.routine, line.message))
        .build();
    for w in runtime.register("news", &flow)? {
        eprintln!("warning: {w}");
    }

    let run = Instant::now();
    let job = runtime.post(
        "news",
        "broadcaster",
        "trigger",
        &json!({ "headlines": HEADLINES }),
    )?;
    if !runtime.wait_until_all_jobs_finished(Duration::from_secs(60)) {
        return Err("the job did not finish within 60 s".into());
    }
    let summary = job.summary();
    println!(
        "\n{} {} in {:.1?}",
        summary.job,
        summary.status,
        run.elapsed()
    );
    println!(
        "{:<12} {:>11} {:>6} {:>6} {:>7}",
        "routine", "activations", "in", "out", "errors"
    );
    for (name, c) in &summary.routines {
        println!(
            "{name:<12} {:>11} {:>6} {:>6} {:>7}",
            c.activations, c.items_in, c.items_out, c.errors
        );
    }
    if summary.status != JobStatus::Completed {
        return Err(format!("job ended {}: {:?}", summary.status, summary.failure).into());
    }
    Ok(())
}
