//! Flow validation through the registry.

use routilux::{Flow, FlowRegistry, Policy, Problem, Routine};

#[test]
fn registering_an_invalid_flow_reports_every_problem_and_registers_nothing() {
    let reg = FlowRegistry::new();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", 4)
            .event("out", ["x"])
            .policy(Policy::batch_size(8))
            .logic(|_, _| Ok(())),
        "a",
    )
    .add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "b")
    .connect("a", "out", "b", "in")
    .connect("a", "out", "c", "in")
    .connect("b", "done", "a", "in");
    let err = reg.register("bad", &flow).unwrap_err();
    assert_eq!(err.problems.len(), 3, "{err}");
    assert!(matches!(err.problems[0], Problem::PolicyNeverFires { .. }));
    assert!(err.to_string().starts_with("invalid flow: 3 problems"));
    assert!(!reg.contains("bad"));
}

#[test]
fn a_shared_registry_serves_a_runtime() {
    let reg = FlowRegistry::new();
    let mut flow = Flow::new();
    flow.add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "r");
    let warnings = reg.register("one", &flow).unwrap();
    assert!(
        warnings.is_empty(),
        "an entry routine is fed by posts: {warnings:?}"
    );
    let rt = crate::common::builder(1).registry(reg.clone()).build();
    assert_eq!(rt.registry().names(), vec!["one".to_owned()]);
    let job = rt.post("one", "r", "in", &serde_json::json!({})).unwrap();
    assert!(job.wait(std::time::Duration::from_secs(5)));
    assert!(reg.unregister("one"));
    assert!(rt.exec("one").is_err());
}
