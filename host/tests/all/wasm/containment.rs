//! Guest misbehaviour is contained to its routine: each fixture misbehaves on the item marked
//! `"bad": true`; the failure is reported with routine, slot and reason, the item is kept as a
//! dead letter, the poisoned instance is replaced, the next item is served, and the sibling in
//! the same fan-out sees every item.

use std::time::Duration;

use routilux::wasm::Limits;
use routilux::{ErrorStrategy, Flow, JobStatus, Policy, Routine};
use serde_json::json;

use super::{WAIT, load, recording_runtime};
use crate::common::forwarder;

/// Runs items 1, 2 (bad), 3 through `src → {bad: kind, sibling: echo}`; returns the job.
fn contain(kind: &str, limits: Limits, threads: usize) -> routilux::JobHandle {
    contain_in(&load("fixtures"), kind, limits, threads)
}

fn contain_in(
    fixtures: &routilux::wasm::Plugin,
    kind: &str,
    limits: Limits,
    threads: usize,
) -> routilux::JobHandle {
    let mut flow = Flow::new();
    flow.add_routine(forwarder(), "src")
        .add_routine(
            fixtures
                .routine_with(kind, limits)
                .unwrap()
                .policy(Policy::batch_size(1))
                .on_error(ErrorStrategy::Continue),
            "bad",
        )
        .add_routine(fixtures.routine("echo").unwrap(), "sibling")
        .connect("src", "out", "bad", "in")
        .connect("src", "out", "sibling", "in");
    let (rt, _) = recording_runtime(threads);
    rt.register("contain", &flow).unwrap();
    let job = rt.exec("contain").unwrap();
    let input = job.input("src", "in").unwrap();
    input.post(&json!({"id": 1})).unwrap();
    input.post(&json!({"id": 2, "bad": true})).unwrap();
    input.post(&json!({"id": 3})).unwrap();
    drop(input);
    assert!(job.wait(WAIT), "{kind}: job did not finish");
    job
}

/// Checks the containment promises and returns the reported error.
fn contained(kind: &str, limits: Limits) -> String {
    check_contained(contain(kind, limits, 2), kind)
}

fn check_contained(job: routilux::JobHandle, kind: &str) -> String {
    assert_eq!(job.status(), JobStatus::Completed, "{kind}");
    let c = job.counters();
    assert_eq!(
        c["sibling"].processed, 3,
        "{kind}: the sibling saw every item"
    );
    assert_eq!(
        (c["bad"].processed, c["bad"].errors, c["bad"].dead_lettered),
        (2, 1, 1),
        "{kind}: {:?}",
        c["bad"]
    );
    let dead = job.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].routine, "bad");
    assert_eq!(
        dead[0].items["in"][0].value()["id"],
        2,
        "{kind}: the bad item is kept"
    );
    let out = job.output();
    let passed: Vec<&str> = out
        .iter()
        .filter(|l| l.routine == "bad" && l.level == "stdout")
        .map(|l| l.message.as_str())
        .collect();
    assert_eq!(
        passed,
        vec![
            format!("{kind} passed {}", json!({"id": 1})),
            format!("{kind} passed {}", json!({"id": 3}))
        ],
        "{kind}: the item after the failure was served"
    );
    let errors = job.errors();
    assert_eq!(errors[0].routine, "bad");
    errors[0].error.clone()
}

#[test]
fn a_panic_traps_only_its_instance() {
    let e = contained("panic", Limits::default());
    assert!(e.contains("wasm routine `panic`"), "{e}");
    assert!(e.contains("fixtures.wasm"), "{e}");
    assert!(
        e.contains("unreachable code (a panic or abort in the guest)"),
        "{e}"
    );
    assert!(
        e.contains("fixture panicked on"),
        "the guest's panic message is kept: {e}"
    );
}

#[test]
fn unreachable_traps_only_its_instance() {
    let e = contained("unreachable", Limits::default());
    assert!(e.contains("trapped: unreachable code"), "{e}");
}

#[test]
fn an_infinite_loop_hits_its_deadline() {
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let e = contained("spin", limits);
    assert!(e.contains("exceeded its deadline of 300ms"), "{e}");
}

#[test]
fn a_memory_bomb_hits_its_memory_cap() {
    let limits = Limits {
        memory: 32 << 20,
        ..Default::default()
    };
    let e = contained("membomb", limits);
    assert!(e.contains("exceeded its memory limit of 32 MiB"), "{e}");
}

#[test]
fn a_stack_overflow_is_a_trap_not_a_crash() {
    let limits = Limits {
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let e = contained("recurse", limits);
    assert!(e.contains("overflowed its stack"), "{e}");
}

#[test]
fn an_emit_on_an_undeclared_event_fails_the_activation() {
    let e = contained("bad_emit", Limits::default());
    assert!(
        e.contains("routine `bad` emitted on undeclared event `nope` (declared: out)"),
        "{e}"
    );
}

#[test]
fn a_guest_error_is_retried_when_it_says_a_retry_can_help() {
    let fixtures = load("fixtures");
    let mut flow = Flow::new();
    flow.add_routine(
        fixtures
            .routine("fails")
            .unwrap()
            .on_error(ErrorStrategy::retry(2, Duration::ZERO, 1.0)),
        "fails",
    );
    let (rt, _) = recording_runtime(1);
    rt.register("f", &flow).unwrap();
    let job = rt
        .post("f", "fails", "in", &json!({"id": 9, "bad": true}))
        .unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Failed);
    let c = &job.counters()["fails"];
    assert_eq!(
        (c.activations, c.retries),
        (3, 2),
        "the guest really ran three times"
    );
    assert_eq!(job.errors()[0].error, r#"refused {"bad":true,"id":9}"#);
}

#[test]
fn an_emit_flood_into_a_small_queue_loses_nothing() {
    for threads in [1, 2] {
        let fixtures = load("fixtures");
        let mut flow = Flow::new();
        flow.add_routine(
            fixtures.routine("flood").unwrap().config("count", 3000),
            "flood",
        )
        .add_routine(
            Routine::new().slot_with_capacity("in", 2).logic(|ctx, b| {
                for _ in b.items() {
                    ctx.state().increment("seen", 1)?;
                }
                Ok(())
            }),
            "sink",
        )
        .connect("flood", "out", "sink", "in");
        let (rt, _) = recording_runtime(threads);
        rt.register("flood", &flow).unwrap();
        let job = rt.post("flood", "flood", "in", &json!({})).unwrap();
        assert!(job.wait(WAIT));
        assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
        assert_eq!(job.worker_state("sink").unwrap()["seen"], json!(3000));
        let c = &job.counters()["sink"];
        assert_eq!((c.items_in, c.overflowed), (3000, 0), "threads={threads}");
    }
}

#[test]
fn cancelling_a_job_stops_its_running_guest() {
    let fixtures = load("fixtures");
    let limits = Limits {
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut flow = Flow::new();
    flow.add_routine(fixtures.routine_with("spin", limits).unwrap(), "spin");
    let (rt, _) = recording_runtime(1);
    rt.register("spin", &flow).unwrap();
    let job = rt.exec("spin").unwrap();
    let input = job.input("spin", "in").unwrap();
    // It prints for the first item, then spins on the second; wait until the second has left
    // the queue (its activation runs).
    input.post(&json!({"id": 1})).unwrap();
    input.post(&json!({"id": 2, "bad": true})).unwrap();
    drop(input);
    assert!(crate::common::eventually(|| {
        job.output()
            .iter()
            .any(|l| l.message.starts_with("spin passed"))
            && job.counters()["spin"].queued == 0
    }));
    std::thread::sleep(Duration::from_millis(50));
    let asked = std::time::Instant::now();
    assert!(job.cancel());
    assert!(
        job.wait(Duration::from_secs(5)),
        "the spinning guest was not stopped"
    );
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert_eq!(job.status(), JobStatus::Cancelled);
    let dead = job.dead_letters();
    assert_eq!(dead.len(), 1, "its items are kept");
    assert!(dead[0].items["in"].iter().any(|i| i.value()["id"] == 2));
    assert!(
        dead[0].error.contains("its job halted"),
        "{}",
        dead[0].error
    );
}

#[test]
fn a_guest_printing_in_a_loop_is_held_to_its_output_budget() {
    let fixtures = load("fixtures");
    let mut flow = Flow::new();
    let budgets = routilux::RoutineBudgets {
        output_bytes: 64 << 10,
        ..Default::default()
    };
    flow.add_routine(
        fixtures
            .routine("chatty")
            .unwrap()
            .config("lines", 12_345)
            .budgets(budgets)
            .on_error(routilux::ErrorStrategy::Continue),
        "chatty",
    );
    let (rt, _) = recording_runtime(1);
    rt.register("chatty", &flow).unwrap();
    let job = rt.post("chatty", "chatty", "in", &json!({})).unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed);
    let out = job.output();
    // What fits the budget is kept, in order; the rest is not, and the activation fails.
    let kept: usize = out.iter().map(|l| l.message.len()).sum();
    assert!(kept <= 64 << 10, "{kept}");
    assert!(out.len() > 5_000 && out.len() < 12_345, "{}", out.len());
    for (i, l) in out.iter().enumerate() {
        assert_eq!(l.message, format!("line {i}"));
    }
    let errors = job.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .error
            .contains("printed or logged more than its output budget of 64.0 KiB"),
        "{}",
        errors[0].error
    );
    assert_eq!(job.counters()["chatty"].dead_lettered, 1);
}

#[test]
fn the_pooling_allocator_reuses_slots_and_still_contains_traps() {
    use routilux::wasm::{WasmConfig, WasmEngine};
    let engine = WasmEngine::new(WasmConfig {
        pooling: true,
        cache_dir: Some(
            crate::plugins::repo_root()
                .join("target")
                .join("routilux-test-cache"),
        ),
        ..WasmConfig::default()
    })
    .unwrap();
    let fixtures = engine.load(crate::plugins::plugin("fixtures")).unwrap();
    // A fresh instance for every activation: slots are taken and given back hundreds of times.
    let fresh = Limits {
        recycle_after: 1,
        ..Limits::default()
    };
    let mut flow = Flow::new();
    flow.add_routine(forwarder(), "src")
        .add_routine(
            fixtures
                .routine_with("echo", fresh.clone())
                .unwrap()
                .policy(Policy::batch_size(1)),
            "echo",
        )
        .connect("src", "out", "echo", "in");
    let (rt, _) = recording_runtime(2);
    rt.register("pooled", &flow).unwrap();
    let job = rt.exec("pooled").unwrap();
    let input = job.input("src", "in").unwrap();
    for id in 0..500 {
        input.post(&json!({ "id": id })).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed);
    assert_eq!(job.counters()["echo"].processed, 500);
    // A panic and a memory bomb in pooled instances: contained as with the default allocator.
    let e = check_contained(contain_in(&fixtures, "panic", fresh.clone(), 2), "panic");
    assert!(e.contains("unreachable code"), "{e}");
    let capped = Limits {
        memory: 32 << 20,
        ..fresh
    };
    let e = check_contained(contain_in(&fixtures, "membomb", capped, 2), "membomb");
    assert!(e.contains("exceeded its memory limit of 32 MiB"), "{e}");
}

#[test]
fn guest_memory_never_carries_from_one_job_to_the_next_unless_the_operator_opts_in() {
    use routilux::wasm::{WasmConfig, WasmEngine};
    // An engine of its own, so its count of live instances is this test's alone.
    let engine = WasmEngine::new(WasmConfig {
        cache_dir: Some(
            crate::plugins::repo_root()
                .join("target")
                .join("routilux-test-cache"),
        ),
        ..WasmConfig::default()
    })
    .unwrap();
    let hostile = engine.load(crate::plugins::plugin("hostile")).unwrap();
    let counts = |reuse: bool| {
        let limits = Limits {
            reuse_across_jobs: reuse,
            ..Limits::default()
        };
        let mut flow = Flow::new();
        flow.add_routine(hostile.routine_with("hostile", limits).unwrap(), "h");
        let (rt, _) = recording_runtime(1);
        rt.register("count", &flow).unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let job = rt.exec("count").unwrap();
            let input = job.input("h", "in").unwrap();
            input.post(&json!({"do": "count"})).unwrap();
            input.post(&json!({"do": "count"})).unwrap();
            drop(input);
            assert!(job.wait(WAIT));
            assert_eq!(job.status(), JobStatus::Completed);
            seen.extend(job.output().into_iter().map(|l| l.message));
            if !reuse {
                assert_eq!(
                    engine.live_instances(),
                    0,
                    "the job's instances went with it"
                );
            }
        }
        seen
    };
    // Each job starts from a fresh instance: its static counter starts again.
    let own = counts(false);
    assert!(own.chunks(2).all(|c| c[0] == "count 1"), "{own:?}");
    // With reuse the same instance serves the next job and remembers.
    let shared = counts(true);
    assert_eq!(
        shared.last().map(String::as_str),
        Some("count 6"),
        "{shared:?}"
    );
}

#[test]
fn cancel_and_shutdown_end_a_guest_sleeping_in_a_host_call_at_once() {
    let hostile = load("hostile");
    let hour = Limits {
        timeout: Duration::from_secs(3600),
        ..Limits::default()
    };
    let mut flow = Flow::new();
    flow.add_routine(hostile.routine_with("hostile", hour).unwrap(), "h");
    for how in ["cancel", "shutdown"] {
        let (rt, _) = recording_runtime(2);
        rt.register("sleepy", &flow).unwrap();
        let job = rt
            .post(
                "sleepy",
                "h",
                "in",
                &json!({"do": "sleep", "ms": 3_600_000}),
            )
            .unwrap();
        // Let the guest get into its sleep.
        std::thread::sleep(Duration::from_millis(200));
        let asked = std::time::Instant::now();
        if how == "cancel" {
            assert!(job.cancel());
            assert!(job.wait(Duration::from_secs(5)), "{how}: still sleeping");
        } else {
            drop(rt);
            assert!(job.is_finished(), "{how}: the runtime left it running");
        }
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(1), "{how} took {took:?}");
        assert_eq!(job.status(), JobStatus::Cancelled, "{how}");
        assert_eq!(
            job.counters()["h"].dead_lettered,
            1,
            "{how}: its item is kept"
        );
    }
}

/// A group's (a tenant's) live-instance quota holds its jobs' instances together, idle ones
/// included: a job held open keeps the instances it made, and a job that needs one while the
/// group is at its quota has an idle one dropped instead of waiting; while all are busy a
/// checkout waits for one to come back, and past its timeout it fails retryable naming the
/// quota. Another group is not held to it, and a finished job gives its instances back.
#[test]
fn a_groups_live_instances_are_held_to_its_quota_idle_ones_making_way() {
    use routilux::Item;
    use std::time::Instant;
    let hostile = load("hostile");
    let routine = |ms: u64| {
        let limits = Limits {
            timeout: Duration::from_millis(ms),
            ..Limits::default()
        };
        hostile
            .routine_with("hostile", limits)
            .unwrap()
            .policy(Policy::batch_size(1))
            .concurrency(4)
            .on_error(ErrorStrategy::Continue)
    };
    let mut flow = Flow::new();
    flow.add_routine(routine(10_000), "slow")
        .add_routine(routine(300), "quick");
    let rt = crate::common::builder(8).build();
    rt.register("f", &flow).unwrap();
    let (a, b) = (rt.add_group(1), rt.add_group(1));
    rt.set_group_instances(a, Some(2));
    rt.set_group_instances(b, None);
    let post = |job: &routilux::JobHandle, routine: &str, what: serde_json::Value| {
        job.post_item(routine, "in", Item::new(what).unwrap())
            .unwrap()
    };
    let processed = |job: &routilux::JobHandle, routine: &str| {
        job.counters()
            .get(routine)
            .map_or(0, |c| c.processed + c.failures)
    };

    // Three jobs of a, held open, one activation each: the third finds two idle instances
    // kept by the first two and has one dropped.
    let mut held = Vec::new();
    for n in 1..=3 {
        let job = rt.exec_in(a, "f").unwrap();
        let hold = job.hold_open().unwrap();
        post(&job, "slow", json!({"do": "count"}));
        let t = Instant::now();
        assert!(crate::common::eventually(|| processed(&job, "slow") == 1));
        assert!(t.elapsed() < Duration::from_secs(5), "job {n} waited");
        assert_eq!(job.counters()["slow"].failures, 0, "{:?}", job.errors());
        let used = rt.group_usage(a);
        assert_eq!(used.instances, n.min(2), "{used:?}");
        assert_eq!(used.instances_limit, Some(2));
        held.push((job, hold));
    }
    assert_eq!(rt.group_usage(a).instances_peak, 2);
    for (job, hold) in held.drain(..) {
        drop(hold);
        assert!(job.wait(WAIT));
        assert_eq!(job.status(), JobStatus::Completed);
    }
    assert_eq!(
        rt.group_usage(a).instances,
        0,
        "finished jobs give theirs back"
    );

    // Four sleeps at once in a (two at a time) and in b (all four at once).
    let sleeps = |group, ms: u64| {
        let job = rt.exec_in(group, "f").unwrap();
        let hold = job.hold_open().unwrap();
        for _ in 0..4 {
            post(&job, "slow", json!({"do": "sleep", "ms": ms}));
        }
        (job, hold)
    };
    let t = Instant::now();
    let (ja, ha) = sleeps(a, 400);
    let (jb, hb) = sleeps(b, 400);
    assert!(crate::common::eventually(|| processed(&jb, "slow") == 4));
    assert!(crate::common::eventually(|| processed(&ja, "slow") == 4));
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(ja.counters()["slow"].failures, 0, "{:?}", ja.errors());
    assert_eq!(rt.group_usage(a).instances_peak, 2);
    assert_eq!(
        rt.group_usage(b).instances_peak,
        4,
        "b is not held to a's quota"
    );
    assert_eq!(rt.group_usage(b).instances_limit, None);

    // Both of a's instances busy for 2 s: a routine whose timeout is 300 ms gives up.
    post(&ja, "slow", json!({"do": "sleep", "ms": 2000}));
    post(&ja, "slow", json!({"do": "sleep", "ms": 2000}));
    // (Both taken into activations: the two idle instances from before are then busy.)
    assert!(crate::common::eventually(|| ja
        .queued_items("slow")
        .is_some_and(|q| q.values().all(Vec::is_empty))));
    std::thread::sleep(Duration::from_millis(100));
    let other = rt.exec_in(a, "f").unwrap();
    post(&other, "quick", json!({"do": "count"}));
    assert!(other.wait(WAIT));
    let errors = other.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert!(
        e.error
            .contains("its tenant's 2 live instances (its quota of 2) stayed busy"),
        "{e:?}"
    );
    assert!(e.retryable, "{e:?}");
    drop((ha, hb));
    assert!(ja.wait(WAIT) && jb.wait(WAIT));
    assert_eq!(ja.counters()["slow"].processed, 6);
    assert_eq!(rt.group_usage(a).instances, 0);
}

/// A group whose every live instance is held by an emit waiting for room downstream lets the
/// consumer make one more, past its quota, instead of having it wait for them while they
/// wait for it: two emitters (a quota of 2) flood a slot of one whose consumer runs on
/// another worker. Without it the consumer's checkout waits out its 10 s timeout.
#[test]
fn emitters_waiting_on_a_consumer_do_not_starve_it_of_its_groups_instances() {
    use routilux::Item;
    use std::time::Instant;
    let hostile = load("hostile");
    let routine = || {
        hostile
            .routine_with(
                "hostile",
                Limits {
                    timeout: Duration::from_secs(10),
                    ..Limits::default()
                },
            )
            .unwrap()
            .policy(Policy::batch_size(1))
            .on_error(ErrorStrategy::Continue)
    };
    let mut flow = Flow::new();
    flow.add_routine(routine().concurrency(2).policy(Policy::batch_size(2)), "up")
        .add_routine(routine().max_queue_length("in", 8), "down")
        .connect("up", "out", "down", "in");
    let rt = crate::common::builder(4).build();
    rt.register("f", &flow).unwrap();
    let a = rt.add_group(1);
    rt.set_group_instances(a, Some(2));
    let t = Instant::now();
    let job = rt.exec_in(a, "f").unwrap();
    let hold = job.hold_open().unwrap();
    // Each of up's two activations sleeps first, so that both hold their instances when the
    // first item reaches down.
    for what in [
        json!({"do": "sleep", "ms": 300}),
        json!({"do": "emit", "count": 40}),
    ]
    .iter()
    .cycle()
    .take(4)
    {
        job.post_item("up", "in", Item::new(what.clone()).unwrap())
            .unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    assert!(job.errors().is_empty(), "{:?}", job.errors());
    assert_eq!(job.counters()["down"].processed, 80);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let used = rt.group_usage(a);
    assert!(used.instances_peak <= 4, "{used:?}");
    assert_eq!(used.instances, 0, "{used:?}");
}

/// An engine at its most live instances drops an idle one (kept by a job held open, of any
/// routine or tenant) to make a new one, instead of failing the activation.
#[test]
fn an_engine_at_its_most_instances_drops_an_idle_one_for_a_new_one() {
    use routilux::Item;
    use routilux::wasm::{WasmConfig, WasmEngine};
    let engine = WasmEngine::new(WasmConfig {
        cache_dir: Some(
            crate::plugins::repo_root()
                .join("target")
                .join("routilux-test-cache"),
        ),
        max_instances: 2,
        ..WasmConfig::default()
    })
    .unwrap();
    let hostile = engine.load(crate::plugins::plugin("hostile")).unwrap();
    let mut flow = Flow::new();
    flow.add_routine(hostile.routine("hostile").unwrap(), "h");
    let rt = crate::common::builder(2).build();
    rt.register("f", &flow).unwrap();
    let mut held = Vec::new();
    for n in 0..4 {
        let group = rt.add_group(1);
        let job = rt.exec_in(group, "f").unwrap();
        let hold = job.hold_open().unwrap();
        job.post_item("h", "in", Item::new(json!({"do": "count"})).unwrap())
            .unwrap();
        assert!(crate::common::eventually(|| {
            let c = &job.counters()["h"];
            c.processed + c.failures == 1
        }));
        assert_eq!(
            job.counters()["h"].failures,
            0,
            "job {n}: {:?}",
            job.errors()
        );
        assert!(engine.live_instances() <= 2);
        held.push((job, hold));
    }
    for (job, hold) in held {
        drop(hold);
        assert!(job.wait(WAIT));
        assert_eq!(job.status(), JobStatus::Completed);
    }
    assert_eq!(engine.live_instances(), 0);
}
