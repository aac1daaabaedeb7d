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
