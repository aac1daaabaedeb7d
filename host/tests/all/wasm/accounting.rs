//! Exact accounting under faults, through real components: every error strategy × fault
//! (error, trap, deadline, budget) × position (before, between, after the emits) keeps
//! `items_in = processed + dead_lettered + queued` for every routine, one thread gives the
//! same numbers run after run, and a retrying routine's attempt is a unit (a retry never
//! delivers an output twice, nor counts a state `add` twice).

use std::collections::BTreeMap;
use std::time::Duration;

use routilux::wasm::Limits;
use routilux::{
    ErrorStrategy, Exhausted, Flow, JobStatus, RetryPolicy, Routine, RoutineBudgets,
    RoutineCounters,
};
use serde_json::json;

use super::{WAIT, load, recording_runtime};

fn retry(max: u32, then: Exhausted) -> ErrorStrategy {
    ErrorStrategy::Retry(RetryPolicy {
        max,
        delay: Duration::ZERO,
        backoff: 1.0,
        then,
    })
}

/// A sink that takes everything.
fn sink() -> Routine {
    Routine::new().slot("in").logic(|_, _| Ok(()))
}

#[test]
fn a_retried_attempt_delivers_its_outputs_and_state_once() {
    let hostile = load("hostile");
    for (fails, max) in [(2, 3), (5, 3)] {
        let mut flow = Flow::new();
        flow.add_routine(
            hostile
                .routine("hostile")
                .unwrap()
                .policy(routilux::Policy::batch_size(1))
                .on_error(retry(max, Exhausted::Continue)),
            "flaky",
        )
        .add_routine(sink(), "sink")
        .connect("flaky", "out", "sink", "in");
        let (rt, _) = recording_runtime(1);
        rt.register("flaky", &flow).unwrap();
        let job = rt.exec("flaky").unwrap();
        let input = job.input("flaky", "in").unwrap();
        for id in 0..10 {
            input
                .post(&json!({"do": "flaky", "id": id, "fails": fails}))
                .unwrap();
        }
        drop(input);
        assert!(job.wait(WAIT));
        assert_eq!(job.status(), JobStatus::Completed);
        let c = job.counters();
        let state = job.worker_state("flaky").unwrap();
        if fails < max {
            // Every item succeeds on its third attempt: one output each, one `add` each.
            assert_eq!(c["sink"].items_in, 10, "{c:?}");
            assert_eq!(c["flaky"].retries, 20, "{c:?}");
            assert_eq!(state["n"], 10, "{state:?}");
            assert_eq!(c["flaky"].dead_lettered, 0);
        } else {
            // Every attempt fails: nothing reaches the sink, nothing is counted.
            assert_eq!(c["sink"].items_in, 0, "{c:?}");
            assert!(state.get("n").is_none(), "{state:?}");
            assert_eq!(c["flaky"].dead_lettered, 10);
            assert!(job.dead_letters().iter().all(|d| d.delivered == 0));
        }
    }
}

/// Runs `src(hostile) → sink` on one thread: six items, of which the 2nd and 5th fault as
/// `kind` before the emit numbered `at` (of 2); returns the counters and dead letters'
/// `delivered`.
fn run_fault(
    strategy: &ErrorStrategy,
    kind: &str,
    at: u64,
) -> (BTreeMap<String, RoutineCounters>, Vec<u64>, JobStatus) {
    let hostile = load("hostile");
    let limits = Limits {
        timeout: Duration::from_millis(100),
        ..Limits::default()
    };
    let budgets = RoutineBudgets {
        item_bytes: 1024,
        ..RoutineBudgets::default()
    };
    // A native feeder emits the six items in one activation, so with one thread every run
    // sees the same order of events.
    let kind_owned = kind.to_owned();
    let feeder = Routine::new()
        .slot("go")
        .event("out", ["do"])
        .logic(move |ctx, _| {
            for i in 0..6 {
                let item = if i == 1 || i == 4 {
                    json!({"do": "fault", "kind": kind_owned, "at": at, "emits": 2, "bytes": 4096})
                } else {
                    json!({"do": "fault", "kind": "none", "at": 99, "emits": 2})
                };
                ctx.emit("out", &item)?;
            }
            Ok(())
        });
    let mut flow = Flow::new();
    flow.add_routine(feeder, "feeder")
        .add_routine(
            hostile
                .routine_with("hostile", limits)
                .unwrap()
                .budgets(budgets)
                .policy(routilux::Policy::batch_size(1))
                .on_error(strategy.clone()),
            "src",
        )
        .add_routine(sink(), "sink")
        .connect("feeder", "out", "src", "in")
        .connect("src", "out", "sink", "in");
    let (rt, _) = recording_runtime(1);
    rt.register("faults", &flow).unwrap();
    let job = rt.post("faults", "feeder", "go", &json!({})).unwrap();
    assert!(
        job.wait(WAIT),
        "{strategy:?} {kind} at {at}: did not finish"
    );
    let delivered = job.dead_letters().iter().map(|d| d.delivered).collect();
    // Time spent is the one counter that may differ from run to run.
    let counters = job
        .counters()
        .into_iter()
        .map(|(k, c)| (k, RoutineCounters { busy_us: 0, ..c }))
        .collect();
    (counters, delivered, job.status())
}

#[test]
fn every_strategy_fault_and_position_adds_up_and_one_thread_repeats_exactly() {
    let strategies = [
        ErrorStrategy::Stop,
        ErrorStrategy::Continue,
        ErrorStrategy::Skip,
        retry(2, Exhausted::Continue),
    ];
    for strategy in &strategies {
        for kind in ["error", "trap", "deadline", "budget"] {
            // Before the first emit, between the two, after both.
            for at in [0, 1, 2] {
                let what = format!("{strategy:?} {kind} at {at}");
                let (c, delivered, status) = run_fault(strategy, kind, at);
                for (name, k) in &c {
                    assert_eq!(
                        k.items_in,
                        k.processed + k.dead_lettered + k.queued,
                        "{what}: {name}: {k:?}"
                    );
                }
                // One thread: the same numbers on every run.
                let again = run_fault(strategy, kind, at);
                assert_eq!(
                    (&c, &delivered, status),
                    (&again.0, &again.1, again.2),
                    "{what}"
                );
                let faulting = &c["src"];
                match strategy {
                    ErrorStrategy::Stop => {
                        assert_eq!(status, JobStatus::Failed, "{what}");
                        assert_eq!(faulting.errors, 1, "{what}");
                    }
                    _ => {
                        assert_eq!(status, JobStatus::Completed, "{what}");
                        assert_eq!(faulting.dead_lettered, 2, "{what}: {faulting:?}");
                        assert_eq!(faulting.processed, 4, "{what}");
                    }
                }
                if let ErrorStrategy::Retry(_) = strategy {
                    // An attempt is a unit: only the four good items' outputs arrive, and
                    // each failed attempt delivered nothing.
                    assert_eq!(c["sink"].items_in, 8, "{what}");
                    assert!(delivered.iter().all(|&d| d == 0), "{what}: {delivered:?}");
                } else if !matches!(strategy, ErrorStrategy::Stop) {
                    // Streaming: what was emitted before the fault was delivered, and the
                    // dead letter says how much.
                    let before = at.min(2);
                    assert_eq!(c["sink"].items_in, 8 + 2 * before, "{what}");
                    assert_eq!(delivered, vec![before, before], "{what}");
                }
            }
        }
    }
}
