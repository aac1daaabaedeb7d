//! Emits from guests: an input forwarded unchanged stays the same item, and time spent
//! waiting in `emit` for room in a full slot is not charged to the activation's deadline.

use std::time::Duration;

use routilux::wasm::Limits;
use routilux::{Flow, Item, JobStatus, Policy, Routine};
use serde_json::json;

use super::{WAIT, load, recording_runtime};
use crate::common::Log;

#[test]
fn an_input_a_guest_forwards_unchanged_stays_the_same_item() {
    let fixtures = load("fixtures");
    let received: Log<Item> = Log::new();
    let log = received.clone();
    let mut flow = Flow::new();
    flow.add_routine(fixtures.routine("forward").unwrap(), "guest")
        .add_routine(
            Routine::new().slot("in").logic(move |_, batch| {
                for item in batch.items() {
                    log.push(item.clone());
                }
                Ok(())
            }),
            "sink",
        )
        .connect("guest", "out", "sink", "in");
    let (rt, _) = recording_runtime(2);
    rt.register("forwarding", &flow).unwrap();
    let job = rt.exec("forwarding").unwrap();
    // Posted as values (serialised for the guest) and as text; the same id twice.
    let posted = vec![
        Item::new(json!({"id": 1, "text": "ü € 😀"})).unwrap(),
        Item::from_json_text(r#"{"id": 2,  "spaced":  true}"#).unwrap(),
        Item::new(json!({"id": 1, "text": "ü € 😀"})).unwrap(),
    ];
    let input = job.input("guest", "in").unwrap();
    for item in &posted {
        input.post_item(item.clone()).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed);
    let got = received.get();
    assert_eq!(got.len(), 3, "{got:?}");
    for (sent, got) in posted.iter().zip(&got) {
        assert!(Item::ptr_eq(sent, got), "{sent} came back as a copy: {got}");
        assert_eq!(sent.json_str(), got.json_str());
    }
}

#[test]
fn waiting_in_emit_for_a_full_slot_is_not_charged_to_the_deadline() {
    let fixtures = load("fixtures");
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut flow = Flow::new();
    // One activation forwards 4 items into a slot of one, drained at 150 ms an item: its emits
    // wait ~450 ms in all, longer than its 300 ms deadline.
    flow.add_routine(
        fixtures
            .routine_with("forward", limits)
            .unwrap()
            .policy(Policy::batch_size(4)),
        "guest",
    )
    .add_routine(
        Routine::new()
            .slot_with_capacity("in", 1)
            .logic(|_, _| {
                std::thread::sleep(Duration::from_millis(150));
                Ok(())
            })
            .policy(Policy::batch_size(1)),
        "slow",
    )
    .connect("guest", "out", "slow", "in");
    let (rt, _) = recording_runtime(2);
    rt.register("waiting", &flow).unwrap();
    let job = rt.exec("waiting").unwrap();
    let input = job.input("guest", "in").unwrap();
    for id in 0..4 {
        input.post(&json!({ "id": id })).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    let c = job.counters();
    assert_eq!(job.status(), JobStatus::Completed, "{c:?}");
    assert_eq!(c["guest"].activations, 1, "{c:?}");
    assert_eq!(c["guest"].errors, 0, "{c:?}");
    assert_eq!(c["slow"].processed, 4, "{c:?}");
}
