//! Activation policies through a real runtime.

use std::time::{Duration, Instant};

use routilux::{Flow, Policy, Routine, Take};
use serde_json::{Value, json};

use crate::common::{Gate, Interval, Log, WAIT, recording, runtime};

fn ids(items: &[Value]) -> Vec<i64> {
    items.iter().map(|v| v["id"].as_i64().unwrap()).collect()
}

#[test]
fn immediate_takes_everything_queued() {
    let rt = runtime(2);
    let gate = Gate::new();
    let log: Log<Vec<i64>> = Log::new();
    let started: Log<()> = Log::new();
    let (g, l, st) = (gate.clone(), log.clone(), started.clone());
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new().slot("in").logic(move |_, batch| {
            let got: Vec<i64> = batch
                .slot("in")
                .iter()
                .map(|i| i.value()["id"].as_i64().unwrap())
                .collect();
            if got == [0] {
                st.push(());
                assert!(g.wait());
            }
            l.push(got);
            Ok(())
        }),
        "r",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    job.post("r", "in", &json!({"id": 0})).unwrap();
    // The first activation is blocked on the gate; these queue up behind it.
    assert!(crate::common::eventually(|| started.len() == 1));
    for id in 1..=5 {
        job.post("r", "in", &json!({"id": id})).unwrap();
    }
    gate.open();
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(log.get(), vec![vec![0], vec![1, 2, 3, 4, 5]]);
}

#[test]
fn batch_size_takes_exactly_n_from_every_slot_and_reports_leftovers() {
    let rt = runtime(2);
    let log: Log<Interval> = Log::new();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("a")
            .slot("b")
            .policy(Policy::batch_size(3))
            .logic(recording(&log, Duration::ZERO, None)),
        "r",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..10 {
        job.post("r", "a", &json!({"id": id})).unwrap();
    }
    for id in 100..107 {
        job.post("r", "b", &json!({"id": id})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    let got: Vec<Vec<i64>> = log.get().iter().map(|i| ids(&i.items)).collect();
    assert_eq!(
        got,
        vec![vec![0, 1, 2, 100, 101, 102], vec![3, 4, 5, 103, 104, 105]]
    );
    let c = &job.counters()["r"];
    assert_eq!((c.items_in, c.processed, c.queued), (17, 12, 5));
    let left = job.queued_items("r").unwrap();
    assert_eq!(left["a"].len(), 4);
    assert_eq!(left["b"][0].value()["id"], 106);
}

#[test]
fn all_slots_ready_takes_one_from_each() {
    let rt = runtime(2);
    let log: Log<Interval> = Log::new();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("left")
            .slot("right")
            .policy(Policy::AllSlotsReady)
            .logic(recording(&log, Duration::ZERO, None)),
        "join",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..3 {
        job.post("join", "left", &json!({"id": id})).unwrap();
    }
    for id in 10..12 {
        job.post("join", "right", &json!({"id": id})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    let got: Vec<Vec<i64>> = log.get().iter().map(|i| ids(&i.items)).collect();
    assert_eq!(got, vec![vec![0, 10], vec![1, 11]]);
    assert_eq!(job.counters()["join"].queued, 1);
}

#[test]
fn time_interval_fires_at_most_once_per_interval_and_delivers_trailing_items() {
    let rt = runtime(2);
    let log: Log<Interval> = Log::new();
    let interval = Duration::from_millis(150);
    // The first activation holds at a gate until items 1-3 are queued: however slow the
    // machine, they arrive within one interval of it (no race with the clock).
    let gate = Gate::new();
    let g = gate.clone();
    let record = recording(&log, Duration::ZERO, None);
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .policy(Policy::time_interval(interval))
            .logic(move |ctx, batch| {
                record(ctx, batch)?;
                if batch.items().any(|i| i.value()["id"] == 0) {
                    assert!(g.wait());
                }
                Ok(())
            }),
        "tick",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    let t0 = Instant::now();
    job.post("tick", "in", &json!({"id": 0})).unwrap();
    assert!(crate::common::eventually(|| job.counters()["tick"].queued
        == 0
        && job.counters()["tick"].items_in == 1));
    for id in 1..=3 {
        job.post("tick", "in", &json!({"id": id})).unwrap();
    }
    gate.open();
    // No more input: the trailing items must still arrive, released by the timer.
    drop(hold);
    assert!(
        job.wait(WAIT),
        "job did not complete: trailing items stranded?"
    );
    let acts = log.get();
    assert_eq!(acts.len(), 2);
    assert_eq!(ids(&acts[0].items), vec![0]);
    assert_eq!(ids(&acts[1].items), vec![1, 2, 3]);
    let gap = acts[1].start - acts[0].start;
    assert!(
        gap + Duration::from_millis(5) >= interval,
        "fired after {gap:?}"
    );
    assert!(acts[1].start - t0 < Duration::from_secs(5));
    assert_eq!(job.counters()["tick"].queued, 0);
}

#[test]
fn custom_policy_decides_and_its_message_reaches_the_logic() {
    let rt = runtime(2);
    let seen: Log<(Vec<i64>, Value)> = Log::new();
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .policy(Policy::custom("pairs", |view| {
                (view.len("in") >= 2).then(|| {
                    let first = view.items("in").next().map(|i| i.value()["id"].clone());
                    Take::new().slot("in", 2).message(json!({"first": first}))
                })
            }))
            .logic(move |_, batch| {
                let got = batch
                    .slot("in")
                    .iter()
                    .map(|i| i.value()["id"].as_i64().unwrap())
                    .collect();
                s.push((got, batch.message().cloned().unwrap_or(Value::Null)));
                Ok(())
            }),
        "pairs",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..5 {
        job.post("pairs", "in", &json!({"id": id})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(
        seen.get(),
        vec![
            (vec![0, 1], json!({"first": 0})),
            (vec![2, 3], json!({"first": 2}))
        ]
    );
    assert_eq!(job.counters()["pairs"].queued, 1);
}

#[test]
fn builtin_policies_send_their_message() {
    let rt = runtime(1);
    let seen: Log<Value> = Log::new();
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .policy(Policy::batch_size(2))
            .logic(move |_, b| {
                s.push(b.message().cloned().unwrap_or_default());
                Ok(())
            }),
        "r",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    job.post("r", "in", &json!({})).unwrap();
    job.post("r", "in", &json!({})).unwrap();
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(seen.get(), vec![json!({"policy": "batch_size", "n": 2})]);
}
