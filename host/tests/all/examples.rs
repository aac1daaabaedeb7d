//! The three examples of the reference documentation, with native routines.

use routilux::{Flow, JobStatus, Policy, Routine};
use serde_json::json;

use crate::common::{Interval, Log, Rendezvous, WAIT, meeting, overlap, runtime};

const HEADLINES: [&str; 3] = [
    "Breaking: routilux 1.0 released",
    "Markets rally on fan-out news",
    "Local routine finishes job on time",
];

/// News fan-out: a broadcaster publishes headlines; email, SMS and log subscribers each
/// receive every headline, in order.
#[test]
fn news_fan_out_every_subscriber_gets_every_headline_in_order() {
    let rt = runtime(4);
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("trigger")
            .event("news", ["headline", "seq"])
            .description("publishes the headlines it is given")
            .logic(|ctx, batch| {
                for trigger in batch.slot("trigger") {
                    let headlines = trigger.value()["headlines"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    for (seq, h) in headlines.iter().enumerate() {
                        ctx.emit("news", &json!({"headline": h, "seq": seq}))?;
                    }
                }
                Ok(())
            }),
        "broadcaster",
    );
    let inboxes: Vec<(&str, Log<String>)> = ["email", "sms", "log"]
        .into_iter()
        .map(|k| (k, Log::new()))
        .collect();
    for (kind, inbox) in &inboxes {
        let inbox = inbox.clone();
        let label = kind.to_uppercase();
        flow.add_routine(
            Routine::new().slot("news").logic(move |ctx, batch| {
                for item in batch.slot("news") {
                    let h = item.value()["headline"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    ctx.print(format!("[{label}] {h}"));
                    inbox.push(h);
                }
                Ok(())
            }),
            &format!("{kind}_subscriber"),
        )
        .connect("broadcaster", "news", &format!("{kind}_subscriber"), "news");
    }
    rt.register("news", &flow).unwrap();
    let job = rt
        .post(
            "news",
            "broadcaster",
            "trigger",
            &json!({"headlines": HEADLINES}),
        )
        .unwrap();
    assert!(rt.wait_until_all_jobs_finished(WAIT));
    assert_eq!(job.status(), JobStatus::Completed);
    for (kind, inbox) in &inboxes {
        assert_eq!(inbox.get(), HEADLINES.to_vec(), "{kind}");
    }
    let out = job.output();
    assert_eq!(out.len(), 9);
    for h in HEADLINES {
        for k in ["EMAIL", "SMS", "LOG"] {
            assert!(
                out.iter().any(|l| l.message == format!("[{k}] {h}")),
                "missing [{k}] {h}"
            );
        }
    }
    assert_eq!(job.counters()["broadcaster"].items_out, 3);
}

/// Parallel image processing: a producer emits images; resize, filter and compress each
/// process every image, in parallel with each other (overlapping activation intervals).
#[test]
fn image_processors_of_one_image_run_in_overlapping_intervals() {
    let rt = runtime(4);
    let log: Log<Interval> = Log::new();
    let rv = Rendezvous::new();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("trigger")
            .event("image", ["name", "width", "height"])
            .logic(|ctx, batch| {
                for t in batch.items() {
                    for i in 0..t.value()["count"].as_i64().unwrap_or(0) {
                        ctx.emit(
                            "image",
                            &json!({"name": format!("img{i}.png"), "width": 1920, "height": 1080}),
                        )?;
                    }
                }
                Ok(())
            }),
        "producer",
    );
    for p in ["resize", "filter", "compress"] {
        flow.add_routine(
            Routine::new()
                .slot("image")
                .policy(Policy::batch_size(1))
                .logic(meeting(&log, &rv, 3, "name")),
            p,
        )
        .connect("producer", "image", p, "image");
    }
    rt.register("images", &flow).unwrap();
    let job = rt
        .post("images", "producer", "trigger", &json!({"count": 3}))
        .unwrap();
    assert!(job.wait(WAIT));
    let iv = log.get();
    assert_eq!(iv.len(), 9);
    for img in 0..3 {
        let name = format!("img{img}.png");
        let of_img: Vec<&Interval> = iv.iter().filter(|i| i.items[0]["name"] == name).collect();
        assert_eq!(of_img.len(), 3, "{name} went to every processor");
        let mut routines: Vec<&str> = of_img.iter().map(|i| i.routine.as_str()).collect();
        routines.sort();
        assert_eq!(routines, vec!["compress", "filter", "resize"]);
        // Every pair of processors of this image overlapped: they ran at the same time.
        for a in &of_img {
            for b in &of_img {
                assert!(
                    overlap(a, b),
                    "{name}: {} and {} did not overlap",
                    a.routine,
                    b.routine
                );
            }
        }
    }
}

/// Priority routing: a router sends each task to the processor of its priority; each
/// processor's level comes from its config.
#[test]
fn priority_routing_sends_each_item_to_exactly_the_selected_processor() {
    let rt = runtime(4);
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("task")
            .event("high", ["id", "priority"])
            .event("normal", ["id", "priority"])
            .event("low", ["id", "priority"])
            .logic(|ctx, batch| {
                for t in batch.items() {
                    let p = t.value()["priority"].as_str().unwrap_or("normal");
                    let event = match p {
                        "high" | "low" => p,
                        _ => "normal",
                    };
                    ctx.emit_item(event, t.clone())?;
                }
                Ok(())
            }),
        "router",
    );
    let got: Log<(String, i64, String)> = Log::new();
    for level in ["high", "normal", "low"] {
        let g = got.clone();
        let id = format!("{level}_processor");
        flow.add_routine(
            Routine::new()
                .slot("task")
                .config("level", level)
                .logic(move |ctx, batch| {
                    let level = ctx
                        .config("level")
                        .and_then(|v| v.as_str())
                        .unwrap_or("?")
                        .to_owned();
                    for t in batch.items() {
                        let v = t.value();
                        g.push((
                            level.clone(),
                            v["id"].as_i64().unwrap(),
                            v["priority"].as_str().unwrap().to_owned(),
                        ));
                    }
                    Ok(())
                }),
            &id,
        )
        .connect("router", level, &id, "task");
    }
    rt.register("priority", &flow).unwrap();
    let job = rt.exec("priority").unwrap();
    let hold = job.hold_open().unwrap();
    let priorities = ["high", "low", "normal", "high", "normal", "low", "high"];
    for (id, p) in priorities.iter().enumerate() {
        job.post("router", "task", &json!({"id": id, "priority": p}))
            .unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    let mut got = got.get();
    got.sort_by_key(|g| g.1);
    assert_eq!(
        got.len(),
        priorities.len(),
        "each item reached exactly one processor"
    );
    for (id, p) in priorities.iter().enumerate() {
        assert_eq!(got[id], (p.to_string(), id as i64, p.to_string()));
    }
    let c = job.counters();
    assert_eq!(c["high_processor"].processed, 3);
    assert_eq!(c["normal_processor"].processed, 2);
    assert_eq!(c["low_processor"].processed, 2);
}
