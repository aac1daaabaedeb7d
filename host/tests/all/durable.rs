//! Durable jobs through the API: a job on a [`JobStore`] commits its posts, activations and
//! dead letters, and a job started on the same directory later (another runtime) resumes what
//! the store holds. The kill -9 crash test, through the CLI, is `tests/system/durable.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use routilux::{ErrorStrategy, Flow, Item, JobStore, Policy, Routine, RoutineError};
use serde_json::json;

use crate::common::{WAIT, forward, runtime};

fn item(id: u64) -> Item {
    Item::from_serialize(&json!({ "id": id })).unwrap()
}

/// `count` adds 1 to WorkerState `n` per item and forwards it to `hold`, which releases
/// batches of `batch` (more than ever arrive: the items stay queued) and counts them too.
fn counting_flow(batch: usize) -> Flow {
    let counting = |ctx: &routilux::Context, b: &routilux::Batch| {
        for i in b.items() {
            ctx.state().add("n", 1)?;
            if ctx.routine_id() == "count" {
                ctx.emit_item("out", i.clone())?;
            }
        }
        Ok::<(), RoutineError>(())
    };
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .event("out", ["id"])
            .logic(counting),
        "count",
    )
    .add_routine(
        Routine::new()
            .slot("in")
            .policy(Policy::batch_size(batch))
            .logic(counting),
        "hold",
    )
    .connect("count", "out", "hold", "in");
    flow
}

#[test]
fn a_durable_job_keeps_its_queues_state_and_input_position_for_the_next_runtime() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = runtime(2);
        rt.register("f", &counting_flow(1000)).unwrap();
        let store = JobStore::open(dir.path(), b"header").unwrap();
        assert!(store.resumed().created);
        let (job, hold) = rt.exec_durable("f", store).unwrap();
        let input = job.input("count", "in").unwrap();
        assert!(input.is_durable());
        input
            .post_items((0..12).map(item).collect(), vec![("in".into(), 12)])
            .unwrap();
        input
            .post_items((12..20).map(item).collect(), vec![("in".into(), 20)])
            .unwrap();
        drop((input, hold));
        assert!(job.wait(WAIT));
        assert_eq!(job.worker_state("count").unwrap()["n"], json!(20));
        assert_eq!(job.counters()["hold"].queued, 20);
        assert!(job.sync_store().unwrap().unwrap() > 0);
    }
    // What the store holds: the 20 items queued at `hold`, `count`'s state, the position.
    let store = JobStore::open(dir.path(), b"ignored").unwrap();
    let r = store.resumed().clone();
    assert!(!r.created);
    assert_eq!(r.header, b"header");
    assert_eq!(r.status.as_deref(), Some("completed"));
    assert_eq!(r.queued, 20);
    assert_eq!(r.state_keys, 1);
    assert_eq!(r.inputs["in"], 20);
    assert_eq!(
        store
            .queued()
            .filter(|(n, s, _)| (*n, *s) == (1, 0))
            .count(),
        20
    );
    // A new runtime, the same flow but `hold` now releasing batches of 10: it resumes them.
    let rt = runtime(2);
    rt.register("f", &counting_flow(10)).unwrap();
    let (job, hold) = rt.exec_durable("f", store).unwrap();
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(
        job.worker_state("count").unwrap()["n"],
        json!(20),
        "recovered"
    );
    assert_eq!(job.worker_state("hold").unwrap()["n"], json!(20));
    assert_eq!(job.counters()["hold"].activations, 2);
    assert_eq!(job.counters()["hold"].queued, 0);
    job.sync_store().unwrap().unwrap();
    drop((job, rt));
    let r = JobStore::open(dir.path(), b"").unwrap().resumed().clone();
    assert_eq!((r.queued, r.state_keys), (0, 2));
}

/// Emits three items, then fails.
fn emit_then_fail(ctx: &routilux::Context, _: &routilux::Batch) -> Result<(), RoutineError> {
    for id in 0..3 {
        ctx.emit_item("out", item(id))?;
    }
    Err(RoutineError::fatal("failed after emitting"))
}

#[test]
fn a_failed_activation_of_a_durable_job_delivers_nothing_and_its_dead_letter_is_kept() {
    for durable in [false, true] {
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let mut flow = Flow::new();
        flow.add_routine(
            Routine::new()
                .slot("in")
                .event("out", ["id"])
                .on_error(ErrorStrategy::Continue)
                .logic(emit_then_fail),
            "src",
        )
        .add_routine(
            Routine::new().slot("in").logic(move |_, b| {
                s.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(())
            }),
            "sink",
        )
        .connect("src", "out", "sink", "in");
        let rt = runtime(2);
        rt.register("f", &flow).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let job = if durable {
            let store = JobStore::open(dir.path(), b"").unwrap();
            let (job, hold) = rt.exec_durable("f", store).unwrap();
            job.post("src", "in", &json!({"id": 9})).unwrap();
            drop(hold);
            job
        } else {
            rt.post("f", "src", "in", &json!({"id": 9})).unwrap()
        };
        assert!(job.wait(WAIT));
        let letters = job.dead_letters();
        assert_eq!(letters.len(), 1);
        if durable {
            // The attempt was a unit: nothing of it reached `sink`.
            assert_eq!(seen.load(Ordering::Relaxed), 0);
            assert_eq!(letters[0].delivered, 0);
            job.sync_store().unwrap().unwrap();
            drop((job, rt));
            let store = JobStore::open(dir.path(), b"").unwrap();
            let kept: Vec<serde_json::Value> = store
                .dead_letters()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(kept.len(), 1);
            assert_eq!(kept[0]["routine"], "src");
            assert_eq!(kept[0]["items"]["in"][0]["id"], 9);
            assert_eq!(store.resumed().queued, 0, "consumed with the letter");
        } else {
            // Streamed: delivered before the failure.
            assert_eq!(seen.load(Ordering::Relaxed), 3);
            assert_eq!(letters[0].delivered, 3);
        }
    }
}

#[test]
fn a_durable_flood_through_queues_of_one_on_one_thread_is_exact() {
    const N: i64 = 2000;
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["id"])
            .logic(|ctx, _| {
                for id in 0..N {
                    ctx.emit("out", &json!({ "id": id }))?;
                }
                Ok(())
            }),
        "src",
    )
    .add_routine(
        Routine::new()
            .slot_with_capacity("in", 1)
            .event("out", ["id"])
            .logic(forward),
        "mid",
    )
    .add_routine(
        Routine::new().slot_with_capacity("in", 1).logic(|ctx, b| {
            ctx.state().add("n", b.len() as i64)?;
            Ok(())
        }),
        "sink",
    )
    .connect("src", "out", "mid", "in")
    .connect("mid", "out", "sink", "in");
    let rt = runtime(1);
    rt.register("f", &flow).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, hold) = rt
        .exec_durable("f", JobStore::open(dir.path(), b"").unwrap())
        .unwrap();
    job.post("src", "go", &json!({})).unwrap();
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(job.worker_state("sink").unwrap()["n"], json!(N));
    let c = job.counters();
    assert_eq!(c["sink"].items_in, N as u64);
    assert_eq!(c["mid"].dead_lettered + c["sink"].dead_lettered, 0);
    job.sync_store().unwrap().unwrap();
    drop((job, rt));
    let store = JobStore::open(dir.path(), b"").unwrap();
    assert_eq!(store.resumed().queued, 0);
    let n: Vec<_> = store.state().collect();
    assert_eq!(n, vec![(2, "n", "2000")]);
}

/// Fails its first attempt (retryably), succeeds after; counts attempts and records when the
/// second one ran.
fn flaky(
    attempts: Arc<AtomicU64>,
    second_at: Arc<parking_lot::Mutex<Option<std::time::Instant>>>,
) -> Routine {
    Routine::new()
        .slot("in")
        .on_error(ErrorStrategy::retry(
            3,
            std::time::Duration::from_millis(600),
            1.0,
        ))
        .logic(move |ctx, b| {
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(RoutineError::retryable("first attempt"));
            }
            *second_at.lock() = Some(std::time::Instant::now());
            ctx.state().add("done", b.len() as i64)?;
            Ok(())
        })
}

#[test]
fn an_armed_retry_survives_the_runtime_and_comes_due_when_it_was_due() {
    let dir = tempfile::tempdir().unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    let second = Arc::new(parking_lot::Mutex::new(None));
    let armed_at;
    {
        let rt = runtime(2);
        let mut flow = Flow::new();
        flow.add_routine(flaky(attempts.clone(), second.clone()), "r");
        rt.register("f", &flow).unwrap();
        let (job, hold) = rt
            .exec_durable("f", JobStore::open(dir.path(), b"").unwrap())
            .unwrap();
        job.post("r", "in", &json!({"id": 1})).unwrap();
        assert!(crate::common::eventually(|| attempts
            .load(Ordering::SeqCst)
            == 1));
        armed_at = std::time::Instant::now();
        drop(hold);
        // The runtime goes (its jobs cancelled) with the retry armed.
        job.cancel();
        assert!(job.wait(WAIT));
    }
    assert!(second.lock().is_none(), "the retry had not run");
    let store = JobStore::open(dir.path(), b"").unwrap();
    assert_eq!(store.resumed().armed_retries, 1);
    assert_eq!(
        store.resumed().queued,
        1,
        "its item is still queued in the store"
    );
    let rt = runtime(2);
    let mut flow = Flow::new();
    flow.add_routine(flaky(attempts.clone(), second.clone()), "r");
    rt.register("f", &flow).unwrap();
    let (job, hold) = rt.exec_durable("f", store).unwrap();
    drop(hold);
    assert!(job.wait(WAIT));
    let ran = second.lock().expect("the retry ran");
    // Due 600 ms after it was armed, not at once on restart (nor 600 ms after it).
    let after = ran.duration_since(armed_at);
    assert!(after >= std::time::Duration::from_millis(450), "{after:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(job.worker_state("r").unwrap()["done"], json!(1));
    assert_eq!(job.counters()["r"].items_in, 1);
    job.sync_store().unwrap().unwrap();
    drop((job, rt));
    let r = JobStore::open(dir.path(), b"").unwrap().resumed().clone();
    assert_eq!((r.queued, r.armed_retries), (0, 0));
}

#[test]
fn a_time_interval_keeps_its_last_firing_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fired: crate::common::Log<std::time::Instant> = crate::common::Log::new();
    let flow = |log: crate::common::Log<std::time::Instant>| {
        let mut flow = Flow::new();
        flow.add_routine(
            Routine::new()
                .slot("in")
                .policy(Policy::time_interval(std::time::Duration::from_millis(
                    1500,
                )))
                .logic(move |_, _| {
                    log.push(std::time::Instant::now());
                    Ok(())
                }),
            "t",
        );
        flow
    };
    {
        let rt = runtime(2);
        rt.register("f", &flow(fired.clone())).unwrap();
        let (job, hold) = rt
            .exec_durable("f", JobStore::open(dir.path(), b"").unwrap())
            .unwrap();
        job.post("t", "in", &json!({"id": 1})).unwrap();
        assert!(crate::common::eventually(|| fired.len() == 1));
        // Within the interval: it waits, and the runtime goes before it is due.
        job.post("t", "in", &json!({"id": 2})).unwrap();
        drop(hold);
        job.cancel();
        assert!(job.wait(WAIT));
    }
    assert_eq!(fired.len(), 1);
    let rt = runtime(2);
    rt.register("f", &flow(fired.clone())).unwrap();
    let (job, hold) = rt
        .exec_durable("f", JobStore::open(dir.path(), b"").unwrap())
        .unwrap();
    drop(hold);
    assert!(job.wait(WAIT));
    let times = fired.get();
    assert_eq!(times.len(), 2);
    // At most once per interval, across the restart too.
    let gap = times[1].duration_since(times[0]);
    assert!(gap >= std::time::Duration::from_millis(1400), "{gap:?}");
}

#[test]
fn a_paused_job_runs_nothing_does_not_finish_and_is_paused_still_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let flow = |seen: Arc<AtomicU64>| {
        let mut flow = Flow::new();
        flow.add_routine(
            Routine::new().slot("in").logic(move |_, b| {
                seen.fetch_add(b.len() as u64, Ordering::SeqCst);
                Ok(())
            }),
            "r",
        );
        flow
    };
    {
        let rt = runtime(2);
        rt.register("f", &flow(seen.clone())).unwrap();
        let (job, hold) = rt
            .exec_durable("f", JobStore::open(dir.path(), b"").unwrap())
            .unwrap();
        assert!(job.pause());
        assert!(!job.pause(), "paused already");
        for id in 0..5 {
            job.post("r", "in", &json!({ "id": id })).unwrap();
        }
        drop(hold);
        // Paused: nothing runs and the job does not finish.
        assert!(!job.wait(std::time::Duration::from_millis(300)));
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        assert_eq!(job.counters()["r"].queued, 5);
        job.sync_store().unwrap().unwrap();
        // The host goes away while the job is paused (a kill would do the same).
    }
    let store = JobStore::open(dir.path(), b"").unwrap();
    assert!(store.resumed().paused);
    let rt = runtime(2);
    rt.register("f", &flow(seen.clone())).unwrap();
    let (job, hold) = rt.exec_durable("f", store).unwrap();
    drop(hold);
    assert!(job.is_paused(), "paused still after the restart");
    assert!(!job.wait(std::time::Duration::from_millis(300)));
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    assert!(job.resume());
    assert!(job.wait(WAIT));
    assert_eq!(seen.load(Ordering::SeqCst), 5);
    assert_eq!(job.status(), routilux::JobStatus::Completed);
}

#[test]
fn pause_and_resume_work_on_a_job_in_memory_too() {
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new().slot("in").logic(move |_, b| {
            s.fetch_add(b.len() as u64, Ordering::SeqCst);
            Ok(())
        }),
        "r",
    );
    let rt = runtime(2);
    rt.register("f", &flow).unwrap();
    let job = rt.exec("f").unwrap();
    let hold = job.hold_open().unwrap();
    assert!(job.pause());
    job.post("r", "in", &json!({"id": 1})).unwrap();
    drop(hold);
    assert!(!job.wait(std::time::Duration::from_millis(200)));
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    assert!(job.resume());
    assert!(!job.resume(), "not paused any more");
    assert!(job.wait(WAIT));
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[test]
fn a_paused_job_that_is_stopped_or_cancelled_finishes_and_cannot_be_paused_again() {
    for cancel in [false, true] {
        let mut flow = Flow::new();
        flow.add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "r");
        let rt = runtime(2);
        rt.register("f", &flow).unwrap();
        let job = rt.exec("f").unwrap();
        let hold = job.hold_open().unwrap();
        assert!(job.pause());
        job.post("r", "in", &json!({"id": 1})).unwrap();
        drop(hold);
        assert!(!job.wait(std::time::Duration::from_millis(100)));
        // Stopping or cancelling ends the pause: the job finishes, its item unprocessed.
        if cancel {
            assert!(job.cancel());
        } else {
            assert!(job.stop());
        }
        assert!(
            job.wait(WAIT),
            "a paused job that was halted finishes (cancel: {cancel})"
        );
        assert!(!job.is_paused());
        assert!(!job.pause(), "a halted job cannot be paused");
        let want = if cancel {
            routilux::JobStatus::Cancelled
        } else {
            routilux::JobStatus::Stopped
        };
        assert_eq!(job.status(), want);
    }
}

/// An activation whose emit a cancel refuses: an in-memory job dead-letters its batch (and
/// hands the letter to the dead-letter sink); a durable job makes no letter, since its store
/// keeps the batch queued for a resume, and counts the batch as left in the store instead. A
/// letter there would be an item in two places once the resume processes it.
#[test]
fn a_cancelled_durable_job_leaves_its_unfinished_batch_in_the_store_not_in_dead_letters() {
    for durable in [false, true] {
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        let (running_tx, running_rx) = crossbeam_channel::bounded::<()>(1);
        let mut flow = Flow::new();
        flow.add_routine(
            Routine::new()
                .slot("in")
                .event("out", ["id"])
                .policy(Policy::batch_size(1))
                .logic(move |ctx, b| {
                    let _ = running_tx.try_send(());
                    let _ = go_rx.recv();
                    forward(ctx, b)
                }),
            "src",
        )
        .add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "sink")
        .connect("src", "out", "sink", "in");
        let letters = Arc::new(AtomicU64::new(0));
        let l = letters.clone();
        let rt = crate::common::builder(2)
            .on_dead_letter(move |_, _| {
                l.fetch_add(1, Ordering::Relaxed);
            })
            .build();
        rt.register("f", &flow).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (job, hold) = if durable {
            let store = JobStore::open(dir.path(), b"").unwrap();
            rt.exec_durable("f", store).unwrap()
        } else {
            let job = rt.exec("f").unwrap();
            let hold = job.hold_open().unwrap();
            (job, hold)
        };
        for id in 0..5 {
            job.post("src", "in", &json!({ "id": id })).unwrap();
        }
        drop(hold);
        running_rx.recv_timeout(WAIT).unwrap();
        assert!(job.cancel());
        go_tx.send(()).unwrap();
        assert!(job.wait(WAIT));
        let s = job.summary();
        let src = &s.routines["src"];
        assert_eq!(src.items_in, 5);
        assert_eq!(src.processed, 0);
        assert_eq!(src.queued, 4, "the batches that never ran stay queued");
        if durable {
            assert_eq!((s.dead_lettered, s.left_in_store), (0, 1), "{s:?}");
            assert_eq!(letters.load(Ordering::Relaxed), 0);
            assert!(job.dead_letters().is_empty());
            job.sync_store().unwrap().unwrap();
            drop((job, rt));
            let store = JobStore::open(dir.path(), b"").unwrap();
            assert_eq!(
                store.resumed().queued,
                5,
                "all five are queued for a resume"
            );
            assert_eq!(store.dead_letters().count(), 0);
        } else {
            assert_eq!((s.dead_lettered, s.left_in_store), (1, 0), "{s:?}");
            assert_eq!(letters.load(Ordering::Relaxed), 1);
        }
    }
}

/// A routine that runs one activation at a time does not wait for the disk between them: its
/// activations run ahead while their units commit in shared groups, and their emits still
/// reach downstream in order, each once its unit is on disk.
#[test]
fn a_one_at_a_time_durable_routine_runs_ahead_of_the_disk_and_delivers_in_order() {
    const N: u64 = 3000;
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let record = {
        let seen = seen.clone();
        move |_: &routilux::Context, b: &routilux::Batch| {
            let mut s = seen.lock();
            for i in b.items() {
                s.push(i.get::<u64>("id").unwrap().unwrap());
            }
            Ok::<(), RoutineError>(())
        }
    };
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .event("out", ["id"])
            .policy(Policy::batch_size(1))
            .logic(|ctx: &routilux::Context, b: &routilux::Batch| {
                for i in b.items() {
                    ctx.state().add("n", 1)?;
                    ctx.emit_item("out", i.clone())?;
                }
                Ok::<(), RoutineError>(())
            }),
        "one",
    )
    .add_routine(Routine::new().slot("in").logic(record), "sink")
    .connect("one", "out", "sink", "in");
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(2);
    rt.register("f", &flow).unwrap();
    let (job, hold) = rt
        .exec_durable("f", JobStore::open(dir.path(), b"h").unwrap())
        .unwrap();
    let input = job.input("one", "in").unwrap();
    input
        .post_items((0..N).map(item).collect(), vec![("in".into(), N)])
        .unwrap();
    drop((input, hold));
    assert!(job.wait(WAIT));
    let groups = job.sync_store().unwrap().unwrap();
    let c = job.counters();
    assert_eq!(c["one"].activations, N);
    assert_eq!(job.worker_state("one").unwrap()["n"], json!(N));
    assert_eq!(
        *seen.lock(),
        (0..N).collect::<Vec<_>>(),
        "in order, once each"
    );
    // Waiting for its unit before the next activation would take at least one group each.
    assert!(
        groups < N / 4,
        "{groups} groups for {N} activations of a one-at-a-time routine"
    );
    drop((job, rt));
    let r = JobStore::open(dir.path(), b"").unwrap().resumed().clone();
    assert_eq!((r.queued, r.dead_letters, r.state_keys), (0, 0, 1));
}
