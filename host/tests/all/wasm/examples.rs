//! The reference page's examples, end to end with the Rust plugins in real wasmtime instances.

use std::time::Instant;

use routilux::{Flow, JobStatus, Policy};
use serde_json::json;

use super::{WAIT, load, recording_runtime};

const HEADLINES: [&str; 3] = ["Rust 2.0 ships", "Wasm everywhere", "routilux fans out"];

#[test]
fn news_fan_out_each_subscriber_prints_each_headline() {
    let news = load("news");
    let mut flow = Flow::new();
    flow.add_routine(news.routine("broadcaster").unwrap(), "broadcaster");
    for kind in ["email", "sms", "log"] {
        flow.add_routine(news.routine(kind).unwrap(), kind).connect(
            "broadcaster",
            "news",
            kind,
            "news",
        );
    }
    let (rt, streamed) = recording_runtime(4);
    rt.register("news", &flow).unwrap();
    let job = rt
        .post(
            "news",
            "broadcaster",
            "trigger",
            &json!({ "headlines": HEADLINES }),
        )
        .unwrap();
    assert!(rt.wait_until_all_jobs_finished(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    let out = job.output();
    for (kind, label) in [("email", "EMAIL"), ("sms", "SMS"), ("log", "LOG")] {
        let lines: Vec<&str> = out
            .iter()
            .filter(|l| l.routine == kind && l.level == "stdout")
            .map(|l| l.message.as_str())
            .collect();
        let expected: Vec<String> = HEADLINES.iter().map(|h| format!("[{label}] {h}")).collect();
        assert_eq!(lines, expected, "{kind} prints every headline, in order");
    }
    assert_eq!(
        streamed.len(),
        9,
        "the lines were streamed as they were printed"
    );
}

#[test]
fn image_processors_of_one_image_run_in_overlapping_intervals() {
    let images = load("images");
    let mut flow = Flow::new();
    flow.add_routine(images.routine("producer").unwrap(), "producer");
    for kind in ["resize", "filter", "compress"] {
        flow.add_routine(
            images
                .routine(kind)
                .unwrap()
                .config("work_ms", 150)
                .policy(Policy::batch_size(1)),
            kind,
        )
        .connect("producer", "image", kind, "image");
    }
    let (rt, streamed) = recording_runtime(4);
    rt.register("images", &flow).unwrap();
    let job = rt
        .post("images", "producer", "trigger", &json!({"count": 2}))
        .unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    // Each processor prints "<kind> <image>: start" before its work and ": done" after; the
    // host forwards each line as it is written, so arrival times bound the work intervals.
    let lines = streamed.get();
    let at = |kind: &str, img: &str, what: &str| -> Instant {
        let text = format!("{kind} {img}: {what}");
        lines
            .iter()
            .find(|(_, _, l)| l.message == text)
            .map(|(t, _, _)| *t)
            .unwrap_or_else(|| panic!("no line `{text}`"))
    };
    for img in ["img0.png", "img1.png"] {
        let kinds = ["resize", "filter", "compress"];
        let latest_start = kinds.iter().map(|k| at(k, img, "start")).max().unwrap();
        let earliest_end = kinds.iter().map(|k| at(k, img, "done")).min().unwrap();
        assert!(
            latest_start < earliest_end,
            "{img}: the three processors did not all run at the same time"
        );
    }
    assert_eq!(job.counters()["resize"].items_out, 2);
}

#[test]
fn priority_routing_sends_each_task_to_the_processor_its_priority_selects() {
    let prio = load("priority");
    let mut flow = Flow::new();
    flow.add_routine(prio.routine("router").unwrap(), "router");
    for level in ["high", "normal", "low"] {
        let id = format!("{level}_processor");
        flow.add_routine(
            prio.routine("processor").unwrap().config("level", level),
            &id,
        )
        .connect("router", level, &id, "task");
    }
    let (rt, _) = recording_runtime(2);
    rt.register("priority", &flow).unwrap();
    let job = rt.exec("priority").unwrap();
    let input = job.input("router", "task").unwrap();
    let tasks = [
        ("high", 1),
        ("low", 2),
        ("normal", 3),
        ("high", 4),
        ("bogus", 5),
    ];
    for (p, id) in tasks {
        input.post(&json!({"id": id, "priority": p})).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    let out = job.output();
    let printed = |routine: &str| -> Vec<String> {
        out.iter()
            .filter(|l| l.routine == routine)
            .map(|l| l.message.clone())
            .collect()
    };
    assert_eq!(
        printed("high_processor"),
        vec!["[HIGH] processing task 1", "[HIGH] processing task 4"]
    );
    assert_eq!(printed("low_processor"), vec!["[LOW] processing task 2"]);
    assert_eq!(
        printed("normal_processor"),
        vec!["[NORMAL] processing task 3", "[NORMAL] processing task 5"],
        "an unknown priority goes to normal"
    );
}

#[test]
fn worker_state_counter_survives_instance_recycling() {
    let counter = load("counter");
    let limits = routilux::wasm::Limits {
        recycle_after: 1,
        ..Default::default()
    };
    let mut flow = Flow::new();
    flow.add_routine(
        counter
            .routine_with("counter", limits)
            .unwrap()
            .policy(Policy::batch_size(1)),
        "counter",
    );
    let (rt, _) = recording_runtime(2);
    rt.register("count", &flow).unwrap();
    let job = rt.exec("count").unwrap();
    let input = job.input("counter", "in").unwrap();
    for i in 0..25 {
        input.post(&json!({ "i": i })).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    assert_eq!(job.worker_state("counter").unwrap()["count"], json!(25));
    assert_eq!(job.counters()["counter"].activations, 25);
}

#[test]
fn batch_processor_gets_exact_batches_and_the_policy_message() {
    let batch = load("batch");
    let mut flow = Flow::new();
    flow.add_routine(
        batch
            .routine("batch_processor")
            .unwrap()
            .policy(Policy::batch_size(3)),
        "batch",
    );
    let (rt, _) = recording_runtime(2);
    rt.register("b", &flow).unwrap();
    let job = rt.exec("b").unwrap();
    let input = job.input("batch", "in").unwrap();
    for v in 1..=7 {
        input.post(&json!({ "value": v })).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    let out: Vec<String> = job.output().into_iter().map(|l| l.message).collect();
    assert_eq!(
        out,
        vec!["batch of 3 items, sum 6", "batch of 3 items, sum 15"]
    );
    let c = &job.counters()["batch"];
    assert_eq!((c.processed, c.queued, c.items_out), (6, 1, 2));
}
