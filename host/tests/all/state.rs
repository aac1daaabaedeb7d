//! WorkerState: per job and routine, owned by the host, atomic updates.

use std::time::Duration;

use routilux::{Flow, Policy, Routine};
use serde_json::json;

use crate::common::{WAIT, runtime};

#[test]
fn hundred_thousand_increments_under_fan_out_with_many_threads_are_exact() {
    const N: i64 = 100_000;
    let rt = runtime(8);
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("go")
            .event("tick", ["i"])
            .logic(|ctx, _| {
                for i in 0..N {
                    ctx.emit("tick", &json!({"i": i}))?;
                }
                Ok(())
            }),
        "src",
    );
    for c in ["count_a", "count_b"] {
        flow.add_routine(
            Routine::new()
                .slot_with_capacity("in", 64)
                .concurrency(4)
                .policy(Policy::batch_size(1))
                .logic(|ctx, b| {
                    for _ in b.items() {
                        ctx.state().increment("n", 1)?;
                    }
                    Ok(())
                }),
            c,
        )
        .connect("src", "tick", c, "in");
    }
    rt.register("count", &flow).unwrap();
    let job = rt.post("count", "src", "go", &json!({})).unwrap();
    assert!(job.wait(WAIT * 3));
    for c in ["count_a", "count_b"] {
        assert_eq!(job.worker_state(c).unwrap()["n"], json!(N), "{c}");
        assert_eq!(job.counters()[c].activations, N as u64);
    }
}

#[test]
fn state_is_per_job_and_per_routine() {
    let rt = runtime(2);
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new().slot("in").logic(|ctx, b| {
            for i in b.items() {
                let v = i.value()["v"].as_i64().unwrap();
                ctx.state().update("sum", |old| {
                    json!(old.and_then(|o| o.as_i64()).unwrap_or(0) + v)
                })?;
                ctx.state().set("last_job", ctx.job_id().to_string())?;
            }
            Ok(())
        }),
        "acc",
    );
    rt.register("f", &flow).unwrap();
    let a = rt.post("f", "acc", "in", &json!({"v": 2})).unwrap();
    let b = rt.post("f", "acc", "in", &json!({"v": 40})).unwrap();
    assert!(rt.wait_until_all_jobs_finished(Duration::from_secs(10)));
    assert_eq!(a.worker_state("acc").unwrap()["sum"], json!(2));
    assert_eq!(b.worker_state("acc").unwrap()["sum"], json!(40));
    assert_eq!(
        b.worker_state("acc").unwrap()["last_job"],
        json!(b.id().to_string())
    );
    assert!(a.worker_state("nope").is_none());
}
