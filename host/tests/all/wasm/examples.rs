//! The reference page's examples, end to end with the Rust plugins in real wasmtime instances.

use routilux::{Flow, JobStatus, Policy};
use serde_json::json;

use super::{WAIT, load, recording_runtime};

const HEADLINES: [&str; 3] = ["Rust 2.0 ships", "Wasm everywhere", "routilux fans out"];

#[test]
fn news_fan_out_each_subscriber_prints_each_headline() {
    let news = load("news");
    let mut flow = Flow::new();
    flow.add_routine(
        news.routine("broadcaster").unwrap().config("delay_ms", 0),
        "broadcaster",
    );
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
    let printed = |routine: &str| -> Vec<String> {
        out.iter()
            .filter(|l| l.routine == routine && l.level == "stdout")
            .map(|l| l.message.clone())
            .collect()
    };
    let each = |f: &dyn Fn(&str) -> String| HEADLINES.iter().map(|h| f(h)).collect::<Vec<_>>();
    assert_eq!(
        printed("broadcaster"),
        each(&|h| format!("Broadcasting: {h}"))
    );
    assert_eq!(
        printed("email"),
        each(&|h| format!("  [Email Service] Would send email: {h}"))
    );
    assert_eq!(
        printed("sms"),
        each(&|h| format!("  [SMS Service] Would send SMS: {h}..."))
    );
    // The log subscriber prints the timestamp the broadcaster sent with the headline.
    for (line, h) in printed("log").iter().zip(HEADLINES) {
        let rest = line.strip_prefix("  [Log Service] Logged: ").unwrap();
        assert!(rest.ends_with(&format!(" - {h}")), "{line}");
        assert_eq!(&rest[4..5], "-", "an ISO date: {line}");
        assert_eq!(&rest[10..11], "T", "an ISO date and time: {line}");
    }
    assert_eq!(
        streamed.len(),
        12,
        "the lines were streamed as they were printed"
    );
}

#[test]
fn image_processors_of_one_image_run_in_overlapping_intervals() {
    let images = load("images");
    let mut flow = Flow::new();
    flow.add_routine(
        images.routine("producer").unwrap().config("delay_ms", 0),
        "producer",
    );
    for kind in ["resize", "filter", "compress"] {
        flow.add_routine(
            images
                .routine(kind)
                .unwrap()
                .config("work_ms", 150)
                .config("report_times", true),
            kind,
        )
        .connect("producer", "image", kind, "image");
    }
    let (rt, _) = recording_runtime(4);
    rt.register("images", &flow).unwrap();
    let job = rt
        .post("images", "producer", "trigger", &json!({"count": 2}))
        .unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    // Each processor logs its own start and end of work on each image (`image ID START END`,
    // microseconds): for every image, the three were at work at the same moment.
    let out = job.output();
    for img in 0..2u64 {
        let spans: Vec<(u128, u128)> = out
            .iter()
            .filter(|l| l.level == "info")
            .filter_map(|l| {
                let f: Vec<&str> = l.message.split_whitespace().collect();
                (f[1] == img.to_string()).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
            })
            .collect();
        assert_eq!(spans.len(), 3, "image {img}: {out:?}");
        let latest_start = spans.iter().map(|s| s.0).max().unwrap();
        let earliest_end = spans.iter().map(|s| s.1).min().unwrap();
        assert!(
            latest_start < earliest_end,
            "image {img}: the three processors did not all run at the same time: {spans:?}"
        );
    }
    assert_eq!(job.counters()["resize"].items_out, 2);
}

#[test]
fn priority_routing_sends_each_item_to_the_processor_its_priority_selects() {
    let prio = load("priority");
    let mut flow = Flow::new();
    flow.add_routine(prio.routine("router").unwrap(), "router");
    for level in ["high", "normal", "low"] {
        let id = format!("{level}_proc");
        flow.add_routine(
            prio.routine("processor")
                .unwrap()
                .config("level", level.to_uppercase()),
            &id,
        )
        .connect("router", &format!("{level}_priority"), &id, "data");
    }
    let (rt, _) = recording_runtime(2);
    rt.register("priority", &flow).unwrap();
    let job = rt.exec("priority").unwrap();
    let input = job.input("router", "input").unwrap();
    for (id, p) in [
        (1, json!(9)),
        (2, json!(3)),
        (3, json!(6.5)),
        (4, json!(8)),
        (5, json!(null)),
    ] {
        input.post(&json!({"id": id, "priority": p})).unwrap();
    }
    input.post(&json!({"id": 6})).unwrap();
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
        printed("high_proc"),
        vec![
            "  [HIGH] Processing: {'id': 1, 'priority': 9}",
            "  [HIGH] Processing: {'id': 4, 'priority': 8}"
        ]
    );
    assert_eq!(
        printed("normal_proc"),
        vec!["  [NORMAL] Processing: {'id': 3, 'priority': 6.5}"]
    );
    assert_eq!(
        printed("low_proc"),
        vec![
            "  [LOW] Processing: {'id': 2, 'priority': 3}",
            "  [LOW] Processing: {'id': 5, 'priority': None}",
            "  [LOW] Processing: {'id': 6}"
        ],
        "no priority counts as 0"
    );
    assert_eq!(
        printed("router")[0],
        "Router: High priority → {'id': 1, 'priority': 9}"
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
