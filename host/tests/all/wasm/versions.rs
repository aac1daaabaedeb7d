//! WIT 0.4.0's additions through real components: a kind's default policy, the stable
//! activation id; and a plugin built against 0.3.0, which the host still loads and runs.

use std::time::Duration;

use routilux::wasm::DefaultPolicy;
use routilux::{ErrorStrategy, Flow, JobStatus, Policy};
use serde_json::json;

use super::{WAIT, load, recording_runtime};

fn printed(job: &routilux::JobHandle, routine: &str) -> Vec<String> {
    job.output()
        .into_iter()
        .filter(|l| l.routine == routine && l.level == "stdout")
        .map(|l| l.message)
        .collect()
}

#[test]
fn a_kinds_default_policy_applies_unless_the_flow_sets_one() {
    let fixtures = load("fixtures");
    assert_eq!(fixtures.wit_version(), "0.4.0");
    let pairs = fixtures.kind("pairs").unwrap();
    assert_eq!(pairs.default_policy, Some(DefaultPolicy::BatchSize(2)));
    assert_eq!(fixtures.kind("echo").unwrap().default_policy, None);

    for (policy, expected) in [
        // The kind's own: two at a time, the fifth item left queued.
        (None, vec!["2 items", "2 items"]),
        // The flow's overrides it.
        (Some(Policy::BatchSize(5)), vec!["5 items"]),
    ] {
        let mut routine = fixtures.routine("pairs").unwrap();
        if let Some(p) = policy {
            routine = routine.policy(p);
        }
        let mut flow = Flow::new();
        flow.add_routine(routine, "p");
        let (rt, _) = recording_runtime(1);
        rt.register("pairs", &flow).unwrap();
        let job = rt.exec("pairs").unwrap();
        let input = job.input("p", "in").unwrap();
        for i in 0..5 {
            input.post(&json!({ "i": i })).unwrap();
        }
        drop(input);
        assert!(job.wait(WAIT));
        assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
        let lines: Vec<String> = printed(&job, "p")
            .into_iter()
            .map(|l| l.split(": ").nth(1).unwrap().to_owned())
            .collect();
        assert_eq!(lines, expected);
    }
}

#[test]
fn every_retry_of_an_activation_sees_its_id() {
    let fixtures = load("fixtures");
    let mut flow = Flow::new();
    flow.add_routine(
        fixtures
            .routine("pairs")
            .unwrap()
            .config("fail_first", true)
            .on_error(ErrorStrategy::retry(2, Duration::ZERO, 1.0)),
        "p",
    );
    let (rt, _) = recording_runtime(1);
    rt.register("ids", &flow).unwrap();
    let job = rt.exec("ids").unwrap();
    let input = job.input("p", "in").unwrap();
    for i in 0..4 {
        input.post(&json!({ "i": i })).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    let id = job.id().to_string();
    assert_eq!(
        printed(&job, "p"),
        [
            format!("{id}/p/1: 2 items"),
            format!("{id}/p/1: 2 items (again)"),
            format!("{id}/p/2: 2 items"),
            format!("{id}/p/2: 2 items (again)"),
        ]
    );
    let c = &job.counters()["p"];
    assert_eq!((c.activations, c.retries, c.processed), (4, 2, 4));
}

#[test]
fn a_plugin_built_against_wit_0_3_0_still_loads_and_runs() {
    let legacy = load("wit_0_3");
    assert_eq!(legacy.wit_version(), "0.3.0");
    assert!(
        legacy
            .imports()
            .iter()
            .any(|i| i == "routilux:plugin/host@0.3.0"),
        "{:?}",
        legacy.imports()
    );
    assert_eq!(legacy.kind_names(), ["tally"]);
    assert_eq!(legacy.kind("tally").unwrap().default_policy, None);
    let fixtures = load("fixtures");
    let mut flow = Flow::new();
    flow.add_routine(legacy.routine("tally").unwrap(), "tally")
        .add_routine(fixtures.routine("sink").unwrap(), "sink")
        .connect("tally", "out", "sink", "in");
    let (rt, _) = recording_runtime(2);
    rt.register("legacy", &flow).unwrap();
    let job = rt.exec("legacy").unwrap();
    let input = job.input("tally", "in").unwrap();
    for n in [1, 2, 3] {
        input.post(&json!({ "n": n })).unwrap();
    }
    drop(input);
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    let id = job.id().to_string();
    assert_eq!(
        printed(&job, "tally"),
        [
            format!("total 1 in {id}"),
            format!("total 3 in {id}"),
            format!("total 6 in {id}")
        ]
    );
    assert_eq!(job.worker_state("tally").unwrap()["total"], json!(6));
    assert_eq!(job.counters()["sink"].items_in, 3);
}
