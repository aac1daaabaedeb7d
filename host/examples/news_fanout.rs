//! The news fan-out demo: a broadcaster publishes headlines; email, SMS and log subscribers
//! each receive every headline, in parallel, on a four-thread pool.
//!
//! ```text
//! cargo run --release -p routilux --example news_fanout
//! ```

use std::time::{Duration, Instant};

use routilux::{Flow, Routine, Runtime};
use serde_json::json;

const HEADLINES: [&str; 4] = [
    "Breaking: routilux runs its first flow",
    "Markets rally as fan-out delivers to every subscriber",
    "Scientists confirm: quiescent jobs complete by themselves",
    "Local routine finishes on time, in order",
];

fn subscriber(channel: &'static str) -> Routine {
    Routine::new()
        .slot("news")
        .description("delivers each headline on its channel")
        .logic(move |ctx, batch| {
            for item in batch.slot("news") {
                let headline = item.value()["headline"].as_str().unwrap_or_default();
                // Each channel takes its time; the three run in parallel.
                std::thread::sleep(Duration::from_millis(20));
                ctx.print(format!("[{channel}] {headline}"));
            }
            Ok(())
        })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("trigger")
            .event("news", ["headline"])
            .description("publishes the headlines it is given")
            .logic(|ctx, batch| {
                for trigger in batch.slot("trigger") {
                    for h in trigger.value()["headlines"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        ctx.emit("news", &json!({ "headline": h }))?;
                    }
                }
                Ok(())
            }),
        "broadcaster",
    )
    .add_routine(subscriber("email"), "email")
    .add_routine(subscriber("sms"), "sms")
    .add_routine(subscriber("log"), "log")
    .connect("broadcaster", "news", "email", "news")
    .connect("broadcaster", "news", "sms", "news")
    .connect("broadcaster", "news", "log", "news");

    let runtime = Runtime::builder()
        .thread_pool_size(4)
        .on_output(|job, line| println!("{job} {:<6} {}", line.routine, line.message))
        .build();
    for w in runtime.register("news", &flow)? {
        eprintln!("warning: {w}");
    }

    let started = Instant::now();
    let job = runtime.post(
        "news",
        "broadcaster",
        "trigger",
        &json!({ "headlines": HEADLINES }),
    )?;
    if !runtime.wait_until_all_jobs_finished(Duration::from_secs(30)) {
        return Err("the job did not finish within 30 s".into());
    }
    let wall = started.elapsed();

    let summary = job.summary();
    println!(
        "\n{} {} in {:.0?} (each subscriber spends {} ms per headline; serial would take {} ms)",
        summary.job,
        summary.status,
        wall,
        20,
        20 * 3 * HEADLINES.len()
    );
    println!(
        "{:<12} {:>11} {:>8} {:>9} {:>7}",
        "routine", "activations", "in", "out", "errors"
    );
    for (name, c) in &summary.routines {
        println!(
            "{name:<12} {:>11} {:>8} {:>9} {:>7}",
            c.activations, c.items_in, c.items_out, c.errors
        );
    }
    if summary.status != routilux::JobStatus::Completed {
        return Err(format!("job ended {}", summary.status).into());
    }
    Ok(())
}
