//! The runtime: pool size honoured exactly, streaming emits, per-routine ordering and
//! concurrency, job lifecycle, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use routilux::{Flow, JobStatus, Routine, RuntimeError, Shutdown};
use serde_json::json;

use crate::common::{
    Gate, Interval, Log, WAIT, eventually, forward, forwarder, max_overlap, overlap, recording,
    runtime,
};

/// A source that forwards its input to `n` subscribers, each recording its intervals.
fn fan_out_flow(n: usize, log: &Log<Interval>, busy: Duration) -> Flow {
    let mut flow = Flow::new();
    flow.add_routine(forwarder(), "src");
    for i in 0..n {
        let id = format!("sub{i}");
        flow.add_routine(
            Routine::new().slot("in").logic(recording(log, busy, None)),
            &id,
        );
        flow.connect("src", "out", &id, "in");
    }
    flow
}

#[test]
fn one_thread_never_overlaps_two_activations() {
    let rt = runtime(1);
    let log = Log::new();
    rt.register("f", &fan_out_flow(4, &log, Duration::from_millis(3)))
        .unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..5 {
        job.post("src", "in", &json!({"id": id})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    let intervals = log.get();
    assert!(intervals.len() >= 4);
    assert_eq!(max_overlap(&intervals), 1);
    assert_eq!(job.status(), JobStatus::Completed);
}

/// Subscribers that block until `want` of them run at the same time (or a timeout passes).
/// Returns the largest number that were ever running together.
fn peak_parallelism(threads: usize, subscribers: usize, want: usize, patience: Duration) -> usize {
    let rt = runtime(threads);
    let state = Arc::new((Mutex::new((0usize, 0usize)), Condvar::new()));
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new().slot("in").event("out", ["x"]).logic(forward),
        "src",
    );
    for i in 0..subscribers {
        let st = state.clone();
        let id = format!("block{i}");
        flow.add_routine(
            Routine::new().slot("in").logic(move |_, _| {
                let (lock, cv) = &*st;
                let mut g = lock.lock();
                g.0 += 1;
                g.1 = g.1.max(g.0);
                cv.notify_all();
                let deadline = Instant::now() + patience;
                while g.1 < want && !cv.wait_until(&mut g, deadline).timed_out() {}
                g.0 -= 1;
                Ok(())
            }),
            &id,
        );
        flow.connect("src", "out", &id, "in");
    }
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "src", "in", &json!({"x": 1})).unwrap();
    assert!(job.wait(WAIT));
    state.0.lock().1
}

#[test]
fn thread_pool_size_is_honoured_exactly() {
    // Reaching the goal ends the wait at once, so a generous patience costs nothing there.
    assert_eq!(
        peak_parallelism(4, 4, 4, Duration::from_secs(5)),
        4,
        "four threads run four blocking routines at once"
    );
    assert_eq!(
        peak_parallelism(3, 4, 4, Duration::from_secs(1)),
        3,
        "three threads never run four at once"
    );
    assert_eq!(peak_parallelism(1, 3, 3, Duration::from_millis(100)), 1);
}

#[test]
fn fan_out_subscribers_run_in_parallel() {
    let rt = runtime(4);
    let log = Log::new();
    let rv = crate::common::Rendezvous::new();
    let mut flow = Flow::new();
    flow.add_routine(forwarder(), "src");
    for s in ["a", "b", "c"] {
        flow.add_routine(
            Routine::new()
                .slot("in")
                .logic(crate::common::meeting(&log, &rv, 3, "id")),
            s,
        )
        .connect("src", "out", s, "in");
    }
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "src", "in", &json!({"id": 1})).unwrap();
    assert!(job.wait(WAIT));
    let iv = log.get();
    assert_eq!(iv.len(), 3);
    for a in &iv {
        for b in &iv {
            assert!(
                overlap(a, b),
                "{} and {} did not overlap",
                a.routine,
                b.routine
            );
        }
    }
}

#[test]
fn emit_is_streaming_subscriber_starts_before_emitter_returns() {
    let rt = runtime(2);
    let started = Arc::new(AtomicBool::new(false));
    let seen_before_return = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (started.clone(), seen_before_return.clone());
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .event("out", ["x"])
            .logic(move |ctx, _| {
                ctx.emit("out", &json!({"x": 1}))?;
                // Do not return until the subscriber has started (or a timeout says it did not).
                let ok = eventually(|| s1.load(Ordering::SeqCst));
                s2.store(ok, Ordering::SeqCst);
                Ok(())
            }),
        "emitter",
    );
    let s3 = started.clone();
    flow.add_routine(
        Routine::new().slot("in").logic(move |_, _| {
            s3.store(true, Ordering::SeqCst);
            Ok(())
        }),
        "sub",
    );
    flow.connect("emitter", "out", "sub", "in");
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "emitter", "in", &json!({})).unwrap();
    assert!(job.wait(WAIT));
    assert!(seen_before_return.load(Ordering::SeqCst));
}

#[test]
fn activations_of_one_routine_run_one_at_a_time_in_arrival_order() {
    let rt = runtime(4);
    let log = Log::new();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .logic(recording(&log, Duration::from_micros(200), None)),
        "serial",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..300 {
        job.post("serial", "in", &json!({"id": id})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    let iv = log.get();
    assert_eq!(max_overlap(&iv), 1);
    let order: Vec<i64> = iv
        .iter()
        .flat_map(|i| i.items.iter().map(|v| v["id"].as_i64().unwrap()))
        .collect();
    assert_eq!(order, (0..300).collect::<Vec<_>>());
}

#[test]
fn concurrency_n_lets_one_routine_run_n_at_once() {
    let rt = runtime(4);
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (c, p) = (current.clone(), peak.clone());
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .concurrency(3)
            .policy(routilux::Policy::batch_size(1))
            .logic(move |_, _| {
                let now = c.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                c.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }),
        "par",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..12 {
        job.post("par", "in", &json!({"id": id})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(peak.load(Ordering::SeqCst), 3);
    assert_eq!(job.counters()["par"].processed, 12);
}

#[test]
fn jobs_complete_by_themselves_and_are_isolated() {
    let rt = runtime(2);
    let log = Log::new();
    rt.register("f", &fan_out_flow(2, &log, Duration::ZERO))
        .unwrap();
    let a = rt.post("f", "src", "in", &json!({"id": 1})).unwrap();
    let b = rt.post("f", "src", "in", &json!({"id": 2})).unwrap();
    b.post("src", "in", &json!({"id": 3})).ok();
    assert!(rt.wait_until_all_jobs_finished(WAIT));
    assert_eq!(a.status(), JobStatus::Completed);
    assert_eq!(b.status(), JobStatus::Completed);
    assert_ne!(a.id(), b.id());
    assert_eq!(a.counters()["src"].items_in, 1);
    assert_eq!(a.counters()["sub0"].items_in, 1);
    let b_in = b.counters()["src"].items_in;
    assert!(b_in == 1 || b_in == 2);
    assert_eq!(b.counters()["sub1"].processed, b_in);
    let summary = a.summary();
    assert_eq!(summary.status, JobStatus::Completed);
    assert_eq!(summary.routines.len(), 3);
}

#[test]
fn a_job_without_input_is_not_finished_and_can_be_cancelled() {
    let rt = runtime(1);
    let log = Log::new();
    rt.register("f", &fan_out_flow(1, &log, Duration::ZERO))
        .unwrap();
    let job = rt.exec("f").unwrap();
    assert!(!rt.wait_until_all_jobs_finished(Duration::from_millis(50)));
    assert_eq!(job.status(), JobStatus::Running);
    assert!(job.cancel());
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Cancelled);
    assert!(rt.wait_until_all_jobs_finished(WAIT));
    match job.post("src", "in", &json!({})) {
        Err(RuntimeError::JobFinished { .. }) => {}
        other => panic!("expected JobFinished, got {other:?}"),
    }
}

#[test]
fn posting_to_a_finished_job_is_refused_and_a_hold_keeps_it_open() {
    let rt = runtime(2);
    let log = Log::new();
    rt.register("f", &fan_out_flow(1, &log, Duration::ZERO))
        .unwrap();
    let job = rt.post("f", "src", "in", &json!({"id": 1})).unwrap();
    assert!(job.wait(WAIT));
    let err = job.post("src", "in", &json!({"id": 2})).unwrap_err();
    assert!(err.to_string().contains("has finished"), "{err}");

    let open = rt.exec("f").unwrap();
    let hold = open.hold_open().unwrap();
    open.post("src", "in", &json!({"id": 1})).unwrap();
    assert!(eventually(|| log.len() == 2));
    std::thread::sleep(Duration::from_millis(20));
    assert!(!open.is_finished(), "a held job must not complete");
    open.post("src", "in", &json!({"id": 2})).unwrap();
    drop(hold);
    assert!(open.wait(WAIT));
    assert_eq!(open.counters()["sub0"].processed, 2);
}

#[test]
fn unknown_names_are_reported_with_suggestions() {
    let rt = runtime(1);
    let log = Log::new();
    rt.register("news", &fan_out_flow(1, &log, Duration::ZERO))
        .unwrap();
    let e = rt.exec("nwes").unwrap_err().to_string();
    assert_eq!(
        e,
        "no flow named `nwes` is registered (did you mean `news`?)"
    );
    let job = rt.exec("news").unwrap();
    let e = job.post("sorc", "in", &json!({})).unwrap_err().to_string();
    assert_eq!(e, "flow `news` has no routine `sorc` (did you mean `src`?)");
    let e = job.post("src", "inn", &json!({})).unwrap_err().to_string();
    assert_eq!(e, "routine `src` has no slot `inn` (did you mean `in`?)");
    let e = job.post("src", "in", &json!([1])).unwrap_err().to_string();
    assert_eq!(e, "invalid item: an item must be a JSON object, got array");
}

#[test]
fn drop_cancels_running_jobs_and_joins_cleanly() {
    let gate = Gate::new();
    let rt = runtime(2);
    let g = gate.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new().slot("in").logic(move |_, _| {
            g.wait();
            Ok(())
        }),
        "slow",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    for id in 0..5 {
        job.post("slow", "in", &json!({"id": id})).unwrap();
    }
    drop(hold);
    // Let the running activation end shortly after the drop begins.
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        gate.open();
    });
    drop(rt);
    opener.join().unwrap();
    assert!(job.is_finished());
    assert_eq!(job.status(), JobStatus::Cancelled);
    let c = &job.counters()["slow"];
    assert_eq!(c.items_in, 5);
    assert_eq!(c.processed + c.queued + c.dead_lettered, 5, "{c:?}");
}

#[test]
fn drain_shutdown_lets_jobs_finish() {
    let rt = runtime(2);
    let log = Log::new();
    rt.register("f", &fan_out_flow(2, &log, Duration::from_millis(20)))
        .unwrap();
    let job = rt.post("f", "src", "in", &json!({"id": 1})).unwrap();
    rt.shutdown(Shutdown::Drain(WAIT));
    assert_eq!(job.status(), JobStatus::Completed);
    assert_eq!(log.len(), 2);
    // A runtime that has shut down refuses nothing silently: jobs are finished.
    assert!(rt.wait_until_all_jobs_finished(Duration::ZERO));
}

#[test]
fn output_lines_are_kept_per_job_and_streamed() {
    let streamed: Log<String> = Log::new();
    let s = streamed.clone();
    let rt = crate::common::builder(2)
        .on_output(move |job, line| s.push(format!("{job} {} {}", line.routine, line.message)))
        .build();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new().slot("in").logic(|ctx, b| {
            for i in b.items() {
                ctx.print(format!("got {}", i.value()["id"]));
                ctx.log(tracing::Level::INFO, "logged");
            }
            Ok(())
        }),
        "printer",
    );
    rt.register("f", &flow).unwrap();
    let job = rt.post("f", "printer", "in", &json!({"id": 7})).unwrap();
    assert!(job.wait(WAIT));
    let out = job.output();
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[0].level.as_str(), out[0].message.as_str()),
        ("stdout", "got 7")
    );
    assert_eq!(out[1].level, "info");
    assert_eq!(streamed.get()[0], format!("{} printer got 7", job.id()));
}

#[test]
fn many_small_jobs_from_several_threads_all_complete_and_account() {
    // Exercises job completion against concurrent posts, and worker sleep/wake-up: thousands
    // of jobs that each go quiescent quickly, while the pool keeps parking and waking.
    let rt = Arc::new(runtime(3));
    let log = Log::new();
    rt.register("f", &fan_out_flow(2, &log, Duration::ZERO))
        .unwrap();
    let posters: Vec<_> = (0..3)
        .map(|t| {
            let rt = rt.clone();
            std::thread::spawn(move || {
                let mut jobs = Vec::new();
                for i in 0..400 {
                    let job = rt
                        .post("f", "src", "in", &json!({"id": t * 1000 + i}))
                        .unwrap();
                    if i % 7 == 0 {
                        // Sometimes a second item races the job's completion: it is either
                        // accepted (and processed) or refused as finished — never lost.
                        match job.post("src", "in", &json!({"id": -1})) {
                            Ok(()) | Err(RuntimeError::JobFinished { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    jobs.push(job);
                }
                jobs
            })
        })
        .collect();
    let jobs: Vec<_> = posters
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    assert!(rt.wait_until_all_jobs_finished(WAIT));
    assert_eq!(jobs.len(), 1200);
    let mut delivered = 0;
    for job in &jobs {
        assert_eq!(job.status(), JobStatus::Completed);
        let c = job.counters();
        let posted = c["src"].items_in;
        assert!(posted == 1 || posted == 2);
        assert_eq!(c["sub0"].processed, posted);
        assert_eq!(c["sub1"].processed, posted);
        delivered += 2 * posted as usize;
    }
    assert_eq!(
        log.get().iter().map(|i| i.items.len()).sum::<usize>(),
        delivered
    );
}

#[test]
fn huge_timeouts_mean_no_deadline_and_a_shut_down_runtime_refuses_work() {
    let rt = runtime(2);
    let log = Log::new();
    rt.register("f", &fan_out_flow(1, &log, Duration::ZERO))
        .unwrap();
    let job = rt.exec("f").unwrap();
    job.post_item_timeout(
        "src",
        "in",
        routilux::Item::new(json!({"id": 1})).unwrap(),
        Duration::MAX,
    )
    .unwrap();
    assert!(job.wait(Duration::MAX));
    assert!(rt.wait_until_all_jobs_finished(Duration::MAX));

    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .policy(routilux::Policy::time_interval(Duration::MAX))
            .logic(|_, _| Ok(())),
        "once",
    );
    rt.register("once", &flow).unwrap();
    let job = rt.exec("once").unwrap();
    let input = job.input("once", "in").unwrap();
    input.post(&json!({})).unwrap();
    assert!(eventually(|| job.counters()["once"].activations == 1));
    input.post(&json!({})).unwrap();
    drop(input);
    assert!(
        job.wait(WAIT),
        "an interval that never ends leaves the item queued"
    );
    assert_eq!(job.counters()["once"].queued, 1);

    rt.shutdown(Shutdown::Cancel);
    assert!(matches!(rt.exec("f"), Err(RuntimeError::ShutDown)));
}
