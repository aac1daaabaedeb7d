//! Backpressure: full slots never drop data, posts time out with a clear error, emits wait,
//! and a waiting worker never deadlocks the pool (one thread, tiny queues, floods, cycles).

use std::time::Duration;

use routilux::{Flow, Item, JobHandle, JobStatus, Policy, Routine, RuntimeError};
use serde_json::json;

use crate::common::{Gate, Log, WAIT, eventually, forward, generator, runtime};

#[test]
fn post_into_a_full_slot_waits_then_fails_with_queue_full() {
    let rt = crate::common::builder(1)
        .post_timeout(Duration::from_millis(30))
        .build();
    let gate = Gate::new();
    let g = gate.clone();
    let seen: Log<i64> = Log::new();
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", 2)
            .policy(Policy::batch_size(1))
            .logic(move |_, b| {
                assert!(g.wait());
                s.push(b.items().next().unwrap().value()["id"].as_i64().unwrap());
                Ok(())
            }),
        "sink",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    // One item is taken by the (blocked) activation, two fill the slot.
    job.post("sink", "in", &json!({"id": 0})).unwrap();
    assert!(eventually(|| job.counters()["sink"].queued == 0));
    job.post("sink", "in", &json!({"id": 1})).unwrap();
    job.post("sink", "in", &json!({"id": 2})).unwrap();
    let err = job.post("sink", "in", &json!({"id": 3})).unwrap_err();
    match &err {
        RuntimeError::QueueFull {
            routine,
            slot,
            capacity,
            waited,
            ..
        } => {
            assert_eq!(
                (routine.as_str(), slot.as_str(), *capacity),
                ("sink", "in", 2)
            );
            assert!(*waited >= Duration::from_millis(30));
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("slot `sink.in` of job-1 is full (at its bound of 2 items)"),
        "{err}"
    );
    let immediate = job.post_item_timeout(
        "sink",
        "in",
        Item::new(json!({"id": 4})).unwrap(),
        Duration::ZERO,
    );
    assert!(matches!(immediate, Err(RuntimeError::QueueFull { .. })));
    gate.open();
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(
        seen.get(),
        vec![0, 1, 2],
        "everything accepted was processed"
    );
}

/// `src` emits `n` items in one activation through a chain of `depth` forwarders with slots
/// of `capacity`; returns the job and what the sink saw.
fn flood_chain(threads: usize, depth: usize, capacity: usize, n: i64) -> (JobHandle, Vec<i64>) {
    let rt = runtime(threads);
    let seen: Log<i64> = Log::new();
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(generator(n), "src");
    let mut prev = "src".to_owned();
    for d in 0..depth {
        let id = format!("hop{d}");
        flow.add_routine(
            Routine::new()
                .slot_with_capacity("in", capacity)
                .event("out", ["id"])
                .logic(forward),
            &id,
        )
        .connect(&prev, "out", &id, "in");
        prev = id;
    }
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", capacity)
            .logic(move |_, b| {
                for i in b.items() {
                    s.push(i.value()["id"].as_i64().unwrap());
                }
                Ok(())
            }),
        "sink",
    )
    .connect(&prev, "out", "sink", "in");
    rt.register("chain", &flow).unwrap();
    let job = rt.post("chain", "src", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT), "flood did not finish: deadlock?");
    let seen = seen.get();
    (job, seen)
}

#[test]
fn one_thread_tiny_queues_flood_through_a_chain_without_loss_or_overrun() {
    for threads in [1, 2, 4] {
        let (job, seen) = flood_chain(threads, 3, 1, 5_000);
        assert_eq!(job.status(), JobStatus::Completed);
        assert_eq!(seen, (0..5_000).collect::<Vec<_>>(), "threads={threads}");
        for (name, c) in job.counters() {
            assert_eq!(
                c.overflowed, 0,
                "{name} with {threads} threads: an acyclic chain never needs to overrun"
            );
            assert_eq!(c.items_in, c.processed, "{name}");
        }
    }
}

#[test]
fn emit_into_a_full_slot_slows_the_producer_and_loses_nothing() {
    let rt = runtime(2);
    let seen: Log<i64> = Log::new();
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(generator(200), "fast")
        .add_routine(
            Routine::new()
                .slot_with_capacity("in", 3)
                .policy(Policy::batch_size(1))
                .logic(move |_, b| {
                    std::thread::sleep(Duration::from_micros(300));
                    s.push(b.items().next().unwrap().value()["id"].as_i64().unwrap());
                    Ok(())
                }),
            "slow",
        )
        .connect("fast", "out", "slow", "in");
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "fast", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(seen.get(), (0..200).collect::<Vec<_>>());
    assert_eq!(job.counters()["slow"].overflowed, 0);
}

#[test]
fn fan_out_flood_with_one_thread_and_tiny_queues() {
    let rt = runtime(1);
    let logs: Vec<Log<i64>> = (0..3).map(|_| Log::new()).collect();
    let mut flow = Flow::new();
    flow.add_routine(generator(3_000), "src");
    for (i, log) in logs.iter().enumerate() {
        let l = log.clone();
        let id = format!("sub{i}");
        flow.add_routine(
            Routine::new()
                .slot_with_capacity("in", 2)
                .logic(move |_, b| {
                    for it in b.items() {
                        l.push(it.value()["id"].as_i64().unwrap());
                    }
                    Ok(())
                }),
            &id,
        )
        .connect("src", "out", &id, "in");
    }
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "src", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT));
    for log in &logs {
        assert_eq!(log.get(), (0..3_000).collect::<Vec<_>>());
    }
}

#[test]
fn a_cycle_with_one_thread_and_tiny_queues_does_not_deadlock() {
    // ping -> pong -> ping, each hop decrements a counter; with one thread and queues of 1,
    // an emitter can be waiting on the very routine that is suspended under it.
    for threads in [1, 2] {
        let rt = runtime(threads);
        let mut flow = Flow::new();
        let hop =
            |ctx: &routilux::Context, b: &routilux::Batch| -> Result<(), routilux::RoutineError> {
                for i in b.items() {
                    let left = i.value()["left"].as_i64().unwrap();
                    if left > 0 {
                        ctx.emit("out", &json!({"id": i.value()["id"], "left": left - 1}))?;
                    }
                }
                Ok(())
            };
        flow.add_routine(
            Routine::new()
                .slot_with_capacity("in", 1)
                .event("out", ["id", "left"])
                .logic(hop),
            "ping",
        )
        .add_routine(
            Routine::new()
                .slot_with_capacity("in", 1)
                .event("out", ["id", "left"])
                .logic(hop),
            "pong",
        )
        .connect("ping", "out", "pong", "in")
        .connect("pong", "out", "ping", "in")
        .allow_cycles(true);
        // A feeder floods ping with 200 balls, each bouncing 20 times.
        flow.add_routine(
            Routine::new()
                .slot("go")
                .event("out", ["id", "left"])
                .logic(|ctx, _| {
                    for id in 0..200 {
                        ctx.emit("out", &json!({"id": id, "left": 20}))?;
                    }
                    Ok(())
                }),
            "feeder",
        )
        .connect("feeder", "out", "ping", "in");
        rt.register("cycle", &flow).unwrap();
        let job = rt.post("cycle", "feeder", "go", &json!({})).unwrap();
        assert!(job.wait(WAIT), "cycle deadlocked with {threads} threads");
        assert_eq!(job.status(), JobStatus::Completed);
        let c = job.counters();
        let bounces = c["ping"].processed + c["pong"].processed;
        assert_eq!(bounces, 200 * 21, "every ball bounced 21 times");
        assert_eq!(c["ping"].queued + c["pong"].queued, 0);
    }
}

#[test]
fn a_stalled_pool_overruns_by_counted_items_instead_of_deadlocking() {
    // `join` needs both slots; only `left` is ever fed, so its bound is reached and nothing can
    // drain it: the one worker would wait forever. It overruns instead, and says so.
    let rt = runtime(1);
    let mut flow = Flow::new();
    flow.add_routine(generator(10), "src")
        .add_routine(
            Routine::new()
                .slot_with_capacity("left", 4)
                .slot("right")
                .policy(Policy::AllSlotsReady)
                .logic(|_, _| Ok(())),
            "join",
        )
        .connect("src", "out", "join", "left");
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "src", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT));
    let c = &job.counters()["join"];
    assert_eq!((c.items_in, c.queued, c.overflowed), (10, 10, 6));
}

#[test]
fn cancelling_releases_an_emitter_blocked_on_a_full_slot_and_keeps_its_item() {
    let rt = runtime(2);
    let gate = Gate::new();
    let g = gate.clone();
    let mut flow = Flow::new();
    flow.add_routine(generator(50), "src")
        .add_routine(
            Routine::new()
                .slot_with_capacity("in", 2)
                .policy(Policy::batch_size(1))
                .logic(move |_, _| {
                    g.wait();
                    Ok(())
                }),
            "stuck",
        )
        .connect("src", "out", "stuck", "in");
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "src", "go", &json!({})).unwrap();
    // The consumer is blocked on the gate (nested under the emitter, or on the other worker)
    // and the emitter waits on its full slot.
    assert!(eventually(|| job.counters()["stuck"].items_in >= 2));
    std::thread::sleep(Duration::from_millis(20));
    job.cancel();
    gate.open();
    assert!(job.wait(WAIT));
    let c = &job.counters();
    assert_eq!(c["src"].errors, 0, "cancel is not an error");
    let stuck = &c["stuck"];
    assert_eq!(
        stuck.items_in,
        stuck.processed + stuck.queued + stuck.dead_lettered,
        "{stuck:?}"
    );
    // The emitter's own input is kept (its activation was cut by the cancel); the item it
    // was delivering is kept too if it was waiting for room then (a dead letter of `stuck`),
    // or was never made if its emit came after the cancel (refused).
    assert_eq!(c["src"].dead_lettered, 1, "{c:?}");
    assert!(stuck.dead_lettered <= 1, "{stuck:?}");
}

#[test]
fn an_input_handle_streams_into_one_job_and_holds_it_open() {
    let rt = runtime(2);
    let seen: Log<i64> = Log::new();
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", 4)
            .logic(move |_, b| {
                for i in b.items() {
                    s.push(i.value()["id"].as_i64().unwrap());
                }
                Ok(())
            }),
        "sink",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let input = job.input("sink", "in").unwrap();
    for id in 0..100 {
        input.post(&json!({"id": id})).unwrap();
        if id == 50 {
            // Quiescent for a moment, but the input keeps the job open.
            assert!(eventually(|| seen.len() == 51));
            std::thread::sleep(Duration::from_millis(10));
            assert!(!job.is_finished());
        }
    }
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(seen.get(), (0..100).collect::<Vec<_>>());
    assert!(
        job.input("sink", "in").is_err(),
        "a finished job takes no new input"
    );
    assert!(matches!(
        rt.exec("f").unwrap().input("sink", "nope"),
        Err(RuntimeError::UnknownSlot { .. })
    ));
}

#[test]
fn a_starved_join_behind_a_chain_never_deadlocks_whatever_the_pool() {
    // a -> c -> d -> join.left, s -> join.right; `join` needs both slots and `right` is fed
    // only once, so the chain backs up into a slot that cannot drain. Blocked emitters then
    // run other tasks (which can stack an upstream routine above a downstream one) and the
    // pool must still end the job, overrunning by counted items instead of hanging.
    for threads in [1, 2, 3] {
        let rt = runtime(threads);
        let mut flow = Flow::new();
        let fwd = || {
            Routine::new()
                .slot_with_capacity("in", 1)
                .event("out", ["id"])
                .logic(forward)
        };
        flow.add_routine(fwd(), "a")
            .add_routine(fwd(), "c")
            .add_routine(fwd(), "d")
            .add_routine(fwd(), "s")
            .add_routine(
                Routine::new()
                    .slot_with_capacity("left", 1)
                    .slot_with_capacity("right", 1)
                    .policy(Policy::AllSlotsReady)
                    .logic(|_, _| Ok(())),
                "join",
            )
            .connect("a", "out", "c", "in")
            .connect("c", "out", "d", "in")
            .connect("d", "out", "join", "left")
            .connect("s", "out", "join", "right");
        rt.register("f", &flow).unwrap();
        let job = rt.exec("f").unwrap();
        let a = job.input("a", "in").unwrap();
        let s = job.input("s", "in").unwrap();
        s.post(&json!({"id": -1})).unwrap();
        for id in 0..60 {
            a.post(&json!({"id": id})).unwrap();
        }
        drop((a, s));
        assert!(job.wait(WAIT), "deadlock with {threads} threads");
        let c = job.counters();
        assert_eq!(c["join"].processed, 2, "one pair joined");
        assert_eq!(
            c["join"].queued, 59,
            "the rest of `left` is kept, not dropped"
        );
        for (name, k) in &c {
            assert_eq!(
                k.items_in,
                k.processed + k.dead_lettered + k.queued,
                "{name}: {k:?}"
            );
        }
    }
}

#[test]
fn emits_from_a_thread_the_logic_spawns_do_not_deadlock_one_worker() {
    // The only worker runs `spawner`, which waits for its scoped thread; the thread emits 50
    // items into a slot of 2 that only a worker could drain. It must not wait forever.
    let rt = runtime(1);
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["id"])
            .logic(|ctx, _| {
                std::thread::scope(|s| {
                    s.spawn(|| {
                        for id in 0..50 {
                            ctx.emit("out", &json!({ "id": id }))?;
                        }
                        Ok::<(), routilux::EmitError>(())
                    })
                    .join()
                    .unwrap()
                })?;
                Ok(())
            }),
        "spawner",
    )
    .add_routine(
        Routine::new()
            .slot_with_capacity("in", 2)
            .logic(|_, _| Ok(())),
        "sink",
    )
    .connect("spawner", "out", "sink", "in");
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "spawner", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT), "deadlocked");
    assert_eq!(job.status(), JobStatus::Completed);
    let c = job.counters();
    assert_eq!(c["sink"].items_in, 50);
    assert_eq!(c["sink"].processed, 50);
    assert!(
        c["sink"].overflowed > 0,
        "it overran, counted: {:?}",
        c["sink"]
    );
}

#[test]
fn a_chain_deeper_than_the_help_limit_completes_overrunning_by_counted_items() {
    // 24 routines in a chain, slots of one item, one thread: a blocked emitter can nest only
    // 16 consumers on its stack, so past that the stalled pool overruns (bounded, counted).
    let rt = runtime(1);
    let mut flow = Flow::new();
    flow.add_routine(generator(50), "src");
    let mut prev = "src".to_owned();
    for i in 0..24 {
        let id = format!("r{i}");
        flow.add_routine(
            Routine::new()
                .slot_with_capacity("in", 1)
                .event("out", ["id"])
                .logic(forward),
            &id,
        )
        .connect(&prev, "out", &id, "in");
        prev = id;
    }
    rt.register("deep", &flow).unwrap();
    let job = rt.post("deep", "src", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT), "deadlocked");
    assert_eq!(job.status(), JobStatus::Completed);
    let c = job.counters();
    assert_eq!(c["r23"].processed, 50, "every item reached the end");
    for (name, k) in &c {
        assert_eq!(
            k.items_in,
            k.processed + k.dead_lettered + k.queued,
            "{name}: {k:?}"
        );
    }
}

/// A flood of tiny items is held to the job's memory budget by what the host keeps per item,
/// not only by their few bytes of text: 1 MiB takes about 7,700 items of `{"i":N}` (135 bytes
/// each, counted), not 100,000 (their text alone is 0.8 MB).
#[test]
fn tiny_items_are_charged_what_the_host_keeps_for_each() {
    let rt = crate::common::builder(1)
        .post_timeout(Duration::from_millis(20))
        .build();
    let gate = Gate::new();
    let g = gate.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", 1_000_000)
            .policy(Policy::batch_size(1))
            .logic(move |_, _| {
                assert!(g.wait());
                Ok(())
            }),
        "sink",
    );
    flow.budgets(routilux::Budgets {
        memory: 1 << 20,
        ..Default::default()
    });
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    let mut taken = 0u64;
    for i in 0..100_000u64 {
        match job.post("sink", "in", &json!({ "i": i % 10 })) {
            Ok(()) => taken += 1,
            Err(RuntimeError::QueueFull { why, .. }) => {
                assert!(why.contains("job's memory budget of 1.0 MiB"), "{why}");
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        (6_000..=8_200).contains(&taken),
        "{taken} tiny items in 1 MiB"
    );
    gate.open();
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(job.counters()["sink"].processed, taken);
}
