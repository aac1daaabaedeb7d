//! Error strategies: stop, continue, retry (really re-running), skip; panics contained;
//! dead letters keep every failed item.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use routilux::{
    ErrorStrategy, Exhausted, Flow, JobHandle, JobStatus, RetryPolicy, Routine, RoutineError,
    Runtime,
};
use serde_json::json;

use crate::common::{Log, WAIT, forwarder, runtime};

/// `src` forwards to `bad` (fails on odd ids) and `good` (never fails).
fn flow(strategy: ErrorStrategy) -> (Flow, Log<i64>) {
    let good_seen = Log::new();
    let g = good_seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(forwarder(), "src")
        .add_routine(
            Routine::new()
                .slot("in")
                .policy(routilux::Policy::batch_size(1))
                .on_error(strategy)
                .logic(|_, b| {
                    let id = b.slot("in")[0].value()["id"].as_i64().unwrap_or(0);
                    if id % 2 == 1 {
                        Err(RoutineError::fatal(format!("odd id {id}")))
                    } else {
                        Ok(())
                    }
                }),
            "bad",
        )
        .add_routine(
            Routine::new()
                .slot("in")
                .policy(routilux::Policy::batch_size(1))
                .logic(move |_, b| {
                    g.push(b.slot("in")[0].value()["id"].as_i64().unwrap_or(-1));
                    Ok(())
                }),
            "good",
        )
        .connect("src", "out", "bad", "in")
        .connect("src", "out", "good", "in");
    (flow, good_seen)
}

fn run(rt: &Runtime, f: &Flow, n: i64) -> JobHandle {
    rt.register("f", f).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..n {
        if job.post("src", "in", &json!({"id": id})).is_err() {
            break;
        }
    }
    drop(hold);
    assert!(job.wait(WAIT));
    job
}

#[test]
fn continue_records_errors_keeps_items_and_siblings_run() {
    let rt = runtime(2);
    let (f, good) = flow(ErrorStrategy::Continue);
    let job = run(&rt, &f, 10);
    assert_eq!(job.status(), JobStatus::Completed);
    assert_eq!(
        good.get(),
        (0..10).collect::<Vec<_>>(),
        "sibling got every item in order"
    );
    let c = &job.counters()["bad"];
    assert_eq!(
        (c.processed, c.errors, c.dead_lettered, c.items_in),
        (5, 5, 5, 10)
    );
    let dead = job.dead_letters();
    let ids: Vec<i64> = dead
        .iter()
        .map(|d| d.items["in"][0].value()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 3, 5, 7, 9]);
    assert_eq!(dead[0].error, "odd id 1");
    assert_eq!(job.errors().len(), 5);
    assert_eq!(job.errors()[0].strategy, "continue");
    let (rest, all) = job.errors_from(3);
    assert_eq!((rest.len(), all), (2, 5));
    assert_eq!(rest[0].at, job.errors()[3].at);
    assert_eq!(job.errors_from(9).0.len(), 0, "past the end: none");
}

#[test]
fn stop_fails_the_job_and_stops_scheduling() {
    let rt = runtime(1);
    let (f, _) = flow(ErrorStrategy::Stop);
    let job = run(&rt, &f, 10);
    assert_eq!(job.status(), JobStatus::Failed);
    assert_eq!(job.failure().unwrap(), "routine `bad` failed: odd id 1");
    let counters = job.counters();
    let c = &counters["bad"];
    assert_eq!(c.errors, 1);
    // Every item is accounted for: processed, dead-lettered, or still queued.
    for (name, c) in &counters {
        assert_eq!(
            c.items_in,
            c.processed + c.dead_lettered + c.queued,
            "{name}: {c:?}"
        );
    }
    assert!(c.queued > 0 || counters["src"].queued > 0 || counters["good"].queued > 0);
    let err = job.post("src", "in", &json!({"id": 99})).unwrap_err();
    assert!(err.to_string().contains("has finished"), "{err}");
}

#[test]
fn flow_default_strategy_applies_to_routines_without_one() {
    let rt = runtime(2);
    let mut f = Flow::new();
    f.add_routine(
        Routine::new().slot("in").logic(|_, _| Err("always".into())),
        "r",
    )
    .on_error(ErrorStrategy::Skip);
    let job = run_single(&rt, &f, "r", 3);
    assert_eq!(job.status(), JobStatus::Completed);
    let c = &job.counters()["r"];
    assert_eq!(c.skipped, c.activations);
    assert_eq!(c.errors, 0);
    assert!(job.errors().is_empty(), "skip reports no error");
    assert_eq!(c.dead_lettered, 3, "skipped items are still kept");
}

fn run_single(rt: &Runtime, f: &Flow, routine: &str, n: i64) -> JobHandle {
    rt.register("single", f).unwrap();
    let job = rt.exec("single").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..n {
        job.post(routine, "in", &json!({"id": id})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    job
}

#[test]
fn retry_really_runs_the_logic_again_with_the_same_items_and_backs_off() {
    let rt = runtime(2);
    let attempts: Log<(Instant, Vec<i64>)> = Log::new();
    let a = attempts.clone();
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .on_error(ErrorStrategy::retry(3, Duration::from_millis(20), 2.0))
            .logic(move |_, b| {
                let ids = b
                    .items()
                    .map(|i| i.value()["id"].as_i64().unwrap())
                    .collect();
                a.push((Instant::now(), ids));
                if a.len() < 3 {
                    Err(RoutineError::retryable("flaky"))
                } else {
                    Ok(())
                }
            }),
        "flaky",
    );
    let job = run_single(&rt, &f, "flaky", 1);
    assert_eq!(job.status(), JobStatus::Completed);
    let runs = attempts.get();
    assert_eq!(runs.len(), 3);
    assert!(
        runs.iter().all(|(_, ids)| ids == &vec![0]),
        "same items every attempt"
    );
    let gap1 = runs[1].0 - runs[0].0;
    let gap2 = runs[2].0 - runs[1].0;
    assert!(gap1 >= Duration::from_millis(20), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(40), "{gap2:?}");
    let c = &job.counters()["flaky"];
    assert_eq!(
        (
            c.activations,
            c.retries,
            c.failures,
            c.processed,
            c.dead_lettered
        ),
        (3, 2, 2, 1, 0)
    );
}

#[test]
fn retry_keeps_order_items_behind_a_retry_wait() {
    let rt = runtime(2);
    let seen: Log<i64> = Log::new();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let (s, fo) = (seen.clone(), failed_once.clone());
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .policy(routilux::Policy::batch_size(1))
            .on_error(ErrorStrategy::retry(1, Duration::from_millis(30), 1.0))
            .logic(move |_, b| {
                let id = b.items().next().unwrap().value()["id"].as_i64().unwrap();
                if id == 0 && fo.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err("first try of item 0 fails".into());
                }
                s.push(id);
                Ok(())
            }),
        "ordered",
    );
    let job = run_single(&rt, &f, "ordered", 5);
    assert_eq!(seen.get(), vec![0, 1, 2, 3, 4]);
    assert_eq!(job.status(), JobStatus::Completed);
}

#[test]
fn exhausted_retries_fall_back_and_non_retryable_errors_are_not_retried() {
    let rt = runtime(2);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .on_error(ErrorStrategy::Retry(RetryPolicy {
                max: 2,
                delay: Duration::ZERO,
                backoff: 1.0,
                then: Exhausted::Continue,
            }))
            .logic(move |_, _| {
                r.fetch_add(1, Ordering::SeqCst);
                Err("down".into())
            }),
        "r",
    );
    let job = run_single(&rt, &f, "r", 1);
    assert_eq!(runs.load(Ordering::SeqCst), 3, "1 attempt + 2 retries");
    assert_eq!(job.status(), JobStatus::Completed, "then: continue");
    assert_eq!(job.dead_letters()[0].attempts, 3);
    assert_eq!(job.errors()[0].strategy, "retry");

    let rt = runtime(2);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .on_error(ErrorStrategy::retry(5, Duration::ZERO, 1.0))
            .logic(move |_, _| {
                r.fetch_add(1, Ordering::SeqCst);
                Err(RoutineError::fatal("malformed"))
            }),
        "r",
    );
    let job = run_single(&rt, &f, "r", 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(job.status(), JobStatus::Failed, "then: stop (the default)");
}

#[test]
fn a_panicking_routine_is_contained() {
    let rt = runtime(2);
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .on_error(ErrorStrategy::Continue)
            .logic(|_, b| {
                if b.items().any(|i| i.value()["id"] == 1) {
                    panic!("boom on item 1");
                }
                Ok(())
            }),
        "r",
    );
    rt.register("p", &f).unwrap();
    let job = rt.exec("p").unwrap();
    let hold = job.hold_open().unwrap();
    job.post("r", "in", &json!({"id": 1})).unwrap();
    assert!(crate::common::eventually(|| job.counters()["r"]
        .activations
        == 1));
    job.post("r", "in", &json!({"id": 2})).unwrap();
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed);
    let errs = job.errors();
    assert!(
        errs.iter()
            .any(|e| e.error == "logic panicked: boom on item 1"),
        "{errs:?}"
    );
    // Item 1 ran alone (the second was posted after its activation): it alone is the dead
    // letter, and item 2 was processed by the next activation.
    let c = &job.counters()["r"];
    assert_eq!(
        (c.items_in, c.processed, c.dead_lettered),
        (2, 1, 1),
        "{c:?}"
    );
    let dead = job.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].items["in"][0].value()["id"], 1);
}

#[test]
fn emitting_on_an_undeclared_event_is_an_activation_error() {
    let rt = runtime(1);
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .event("out", ["x"])
            .on_error(ErrorStrategy::Continue)
            .logic(|ctx, _| {
                ctx.emit("nope", &json!({"x": 1}))?;
                Ok(())
            }),
        "r",
    );
    let job = run_single(&rt, &f, "r", 1);
    let errs = job.errors();
    assert_eq!(
        errs[0].error,
        "routine `r` emitted on undeclared event `nope` (declared: out)"
    );
}

#[test]
fn cancelling_a_job_with_an_armed_retry_finishes_it_at_once_and_keeps_the_items() {
    let rt = runtime(2);
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .on_error(ErrorStrategy::retry(5, Duration::from_secs(600), 1.0))
            .logic(|_, _| Err("down for a while".into())),
        "r",
    );
    rt.register("slow-retry", &f).unwrap();
    let job = rt.post("slow-retry", "r", "in", &json!({"id": 1})).unwrap();
    assert!(crate::common::eventually(
        || job.counters()["r"].retries == 1
    ));
    let started = Instant::now();
    assert!(job.cancel());
    assert!(
        job.wait(Duration::from_secs(5)),
        "a 600 s retry delay must not hold a cancelled job"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(job.status(), JobStatus::Cancelled);
    let dead = job.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "job cancelled before the retry ran");
    assert_eq!(dead[0].items["in"][0].value()["id"], 1);
    let c = &job.counters()["r"];
    assert_eq!(c.items_in, c.dead_lettered);
}

#[test]
fn a_panicking_custom_policy_fails_the_job_and_keeps_the_worker() {
    let rt = runtime(1);
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("in")
            .policy(routilux::Policy::custom("broken", |v| {
                if v.len("in") > 1 {
                    panic!("policy bug");
                }
                None
            }))
            .logic(|_, _| Ok(())),
        "r",
    );
    rt.register("f", &f).unwrap();
    let job = rt.exec("f").unwrap();
    let input = job.input("r", "in").unwrap();
    input.post(&json!({"id": 1})).unwrap();
    let _ = input.post(&json!({"id": 2}));
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Failed);
    assert_eq!(
        job.failure().unwrap(),
        "routine `r`: custom policy `broken` panicked: policy bug"
    );
    assert_eq!(
        job.counters()["r"].queued,
        2,
        "its items stay, reported as queued"
    );
    // The single worker survived: a new job on the same runtime runs.
    let mut ok = Flow::new();
    ok.add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "r");
    rt.register("ok", &ok).unwrap();
    let job = rt.post("ok", "r", "in", &json!({})).unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed);
}

#[test]
fn a_fan_out_emit_cut_by_a_cancel_is_a_dead_letter_at_every_slot_it_did_not_reach() {
    // src fans out to `a` (one slot of one item, held at a gate) and `b`. Its third emit
    // waits for room in `a`; the job is cancelled: the item is a dead letter of `a` and of
    // `b` too, which it never reached. Nothing is partial and silent.
    use crate::common::Gate;
    let rt = runtime(2);
    let gate = Gate::new();
    let g = gate.clone();
    // `a` must be running on the other worker (not nested under src's blocked emit).
    let started = Gate::new();
    let (s1, s2) = (started.clone(), started.clone());
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["id"])
            .logic(move |ctx, _| {
                ctx.emit("out", &json!({ "id": 0 }))?;
                s1.wait();
                for id in 1..3 {
                    ctx.emit("out", &json!({ "id": id }))?;
                }
                Ok(())
            }),
        "src",
    )
    .add_routine(
        Routine::new()
            .slot_with_capacity("in", 1)
            .logic(move |_, _| {
                s2.open();
                g.wait();
                Ok(())
            }),
        "a",
    )
    .add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "b")
    .connect("src", "out", "a", "in")
    .connect("src", "out", "b", "in");
    rt.register("f", &f).unwrap();
    let job = rt.post("f", "src", "go", &json!({})).unwrap();
    // `a` runs item 0 (held), item 1 fills its slot, item 2 waits for room there.
    assert!(crate::common::eventually(|| job.counters()["a"].items_in
        == 2
        && job.counters()["b"].items_in == 2));
    std::thread::sleep(Duration::from_millis(50));
    assert!(job.cancel());
    gate.open();
    assert!(job.wait(WAIT));
    let c = job.counters();
    assert_eq!(c["a"].items_in, 3, "{c:?}");
    assert_eq!(c["b"].items_in, 3, "the item is b's dead letter too: {c:?}");
    let dead_b: Vec<_> = job
        .dead_letters()
        .into_iter()
        .filter(|d| d.routine == "b")
        .collect();
    assert_eq!(dead_b.len(), 1);
    assert_eq!(dead_b[0].items["in"][0].value()["id"], 2);
    // src was cancelled under its emit: not its fault, no error charged.
    assert_eq!(c["src"].errors, 0, "{c:?}");
    for (name, k) in &c {
        assert_eq!(
            k.items_in,
            k.processed + k.dead_lettered + k.queued,
            "{name}: {k:?}"
        );
    }
}

#[test]
fn a_native_emit_after_cancel_is_refused_like_a_guests() {
    use crate::common::Gate;
    let rt = runtime(2);
    let gate = Gate::new();
    let g = gate.clone();
    let result: Log<String> = Log::new();
    let r = result.clone();
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["id"])
            .logic(move |ctx, _| {
                g.wait();
                match ctx.emit("out", &json!({"id": 1})) {
                    Ok(()) => r.push("delivered".into()),
                    Err(e) => r.push(e.to_string()),
                }
                Ok(())
            }),
        "src",
    )
    .add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "sink")
    .connect("src", "out", "sink", "in");
    rt.register("f", &f).unwrap();
    let job = rt.post("f", "src", "go", &json!({})).unwrap();
    assert!(crate::common::eventually(
        || job.counters()["src"].queued == 0
    ));
    assert!(job.cancel());
    gate.open();
    assert!(job.wait(WAIT));
    assert_eq!(
        result.get(),
        vec!["job job-1 halted while `src` waited to deliver an item"]
    );
    assert_eq!(job.counters()["sink"].items_in, 0);
}

#[test]
fn under_stop_an_innocent_upstream_routine_is_not_charged_the_failure() {
    // `bad` fails under stop while `src`, on the only thread, waits to emit into its full
    // slot: `src`'s emit is refused, and its items are kept, but the error is `bad`'s alone.
    let rt = runtime(1);
    let mut f = Flow::new();
    f.add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["id"])
            .logic(|ctx, _| {
                for id in 0..10 {
                    ctx.emit("out", &json!({ "id": id }))?;
                }
                Ok(())
            }),
        "src",
    )
    .add_routine(
        Routine::new()
            .slot_with_capacity("in", 2)
            .policy(routilux::Policy::batch_size(1))
            .on_error(ErrorStrategy::Stop)
            .logic(|_, b| {
                if b.items().any(|i| i.value()["id"] == 3) {
                    return Err("bad item 3".into());
                }
                Ok(())
            }),
        "bad",
    )
    .connect("src", "out", "bad", "in");
    rt.register("f", &f).unwrap();
    let job = rt.post("f", "src", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Failed);
    let c = job.counters();
    assert_eq!(c["bad"].errors, 1);
    assert_eq!(c["src"].errors, 0, "{c:?}");
    assert_eq!(job.errors().len(), 1, "{:?}", job.errors());
    let src_dead: Vec<_> = job
        .dead_letters()
        .into_iter()
        .filter(|d| d.routine == "src")
        .collect();
    assert_eq!(src_dead.len(), 1);
    assert!(
        src_dead[0].error.starts_with("job failed: "),
        "{}",
        src_dead[0].error
    );
    for (name, k) in &c {
        assert_eq!(
            k.items_in,
            k.processed + k.dead_lettered + k.queued,
            "{name}: {k:?}"
        );
    }
}
