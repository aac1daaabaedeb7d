//! Model-based property test: random acyclic flows, random posts, random pool sizes and
//! queue bounds. Every item is delivered exactly once per connection, each connection keeps
//! its order, and every routine's counters add up.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use routilux::{ErrorStrategy, Flow, Policy, Routine, RoutineError};
use serde_json::json;

use crate::common::{Log, WAIT};

#[derive(Clone, Debug)]
struct Spec {
    slots: usize,
    events: usize,
    capacity: usize,
    /// Fails (under `continue`) on items whose id ends in '3' or '7'; takes one item at a time.
    flaky: bool,
}

#[derive(Clone, Debug)]
struct Case {
    threads: usize,
    routines: Vec<Spec>,
    /// (from, event, to, slot), from < to.
    edges: BTreeSet<(usize, usize, usize, usize)>,
    /// (routine, slot) per post, in order.
    posts: Vec<(usize, usize)>,
}

fn case() -> impl Strategy<Value = Case> {
    let spec = (
        1usize..=2,
        1usize..=2,
        1usize..=6,
        prop::bool::weighted(0.3),
    )
        .prop_map(|(slots, events, capacity, flaky)| Spec {
            slots: if flaky { 1 } else { slots },
            events,
            capacity,
            flaky,
        });
    (1usize..=4, prop::collection::vec(spec, 2..=6)).prop_flat_map(|(threads, routines)| {
        let n = routines.len();
        let edge = (0..n, 0usize..2, 0..n, 0usize..2);
        let post = (0..n, 0usize..2);
        (
            Just(threads),
            Just(routines),
            prop::collection::vec(edge, 0..=8),
            prop::collection::vec(post, 1..=25),
        )
            .prop_map(|(threads, routines, raw_edges, raw_posts)| {
                let edges = raw_edges
                    .into_iter()
                    .filter(|&(f, _, t, _)| f < t)
                    .map(|(f, e, t, s)| (f, e % routines[f].events, t, s % routines[t].slots))
                    .collect();
                let posts = raw_posts
                    .into_iter()
                    .map(|(r, s)| (r, s % routines[r].slots))
                    .collect();
                Case {
                    threads,
                    routines,
                    edges,
                    posts,
                }
            })
    })
}

fn fails(id: &str) -> bool {
    id.ends_with('3') || id.ends_with('7')
}

/// What a routine saw: (slot, id) in the order the logic received them, and (event, id) in
/// the order it emitted them.
#[derive(Clone, Default)]
struct Trace {
    received: Log<(usize, String)>,
    emitted: Log<(usize, String)>,
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let traces: Vec<Trace> = case.routines.iter().map(|_| Trace::default()).collect();
    let mut flow = Flow::new();
    for (i, spec) in case.routines.iter().enumerate() {
        let mut r = Routine::new();
        for s in 0..spec.slots {
            r = r.slot_with_capacity(&format!("s{s}"), spec.capacity);
        }
        for e in 0..spec.events {
            r = r.event(&format!("e{e}"), ["id"]);
        }
        if spec.flaky {
            r = r
                .policy(Policy::batch_size(1))
                .on_error(ErrorStrategy::Continue);
        }
        let (trace, events, flaky, me) = (traces[i].clone(), spec.events, spec.flaky, i);
        r = r.logic(move |ctx, batch| {
            for (slot, items) in batch.slots() {
                let slot: usize = slot[1..].parse().unwrap_or(99);
                for item in items {
                    let id = item.value()["id"].as_str().unwrap_or("?").to_owned();
                    trace.received.push((slot, id.clone()));
                    if flaky && fails(&id) {
                        return Err(RoutineError::fatal(format!("flaky on {id}")));
                    }
                    for e in 0..events {
                        let child = format!("{id}>{me}.{e}");
                        trace.emitted.push((e, child.clone()));
                        ctx.emit(&format!("e{e}"), &json!({"id": child}))?;
                    }
                }
            }
            Ok(())
        });
        flow.add_routine(r, &format!("r{i}"));
    }
    for &(f, e, t, s) in &case.edges {
        flow.connect(
            &format!("r{f}"),
            &format!("e{e}"),
            &format!("r{t}"),
            &format!("s{s}"),
        );
    }
    let rt = crate::common::runtime(case.threads);
    rt.register("p", &flow)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let job = rt.exec("p").unwrap();
    let hold = job.hold_open().unwrap();
    for (k, &(r, s)) in case.posts.iter().enumerate() {
        job.post(
            &format!("r{r}"),
            &format!("s{s}"),
            &json!({"id": format!("p{k}")}),
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    drop(hold);
    prop_assert!(job.wait(WAIT), "job did not complete");

    // Per destination slot: the sequence contributed by each source (a connection, or the
    // posts) must equal what that source sent, in order.
    let counters = job.counters();
    for (d, spec) in case.routines.iter().enumerate() {
        let received = traces[d].received.get();
        for s in 0..spec.slots {
            let at_slot: Vec<&String> = received
                .iter()
                .filter(|(sl, _)| *sl == s)
                .map(|(_, id)| id)
                .collect();
            let mut sources: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for &(f, e, t, ts) in &case.edges {
                if (t, ts) == (d, s) {
                    let sent = traces[f]
                        .emitted
                        .get()
                        .into_iter()
                        .filter(|(ev, _)| *ev == e)
                        .map(|(_, id)| id)
                        .collect();
                    sources.insert(format!(">{f}.{e}"), sent);
                }
            }
            let posted: Vec<String> = case
                .posts
                .iter()
                .enumerate()
                .filter(|(_, p)| **p == (d, s))
                .map(|(k, _)| format!("p{k}"))
                .collect();
            let mut expected_total = posted.len();
            let got_posts: Vec<String> = at_slot
                .iter()
                .filter(|id| !id.contains('>'))
                .map(|s| s.to_string())
                .collect();
            prop_assert_eq!(got_posts, posted, "posts into r{}.s{}", d, s);
            for (suffix, sent) in &sources {
                expected_total += sent.len();
                let got: Vec<String> = at_slot
                    .iter()
                    .filter(|id| id.ends_with(suffix.as_str()))
                    .map(|s| s.to_string())
                    .collect();
                prop_assert_eq!(&got, sent, "connection r{}{} -> r{}.s{}", suffix, "", d, s);
            }
            prop_assert_eq!(
                at_slot.len(),
                expected_total,
                "r{}.s{} got items from nowhere",
                d,
                s
            );
        }
        let c = &counters[&format!("r{d}")];
        prop_assert_eq!(c.items_in, received.len() as u64);
        prop_assert_eq!(
            c.items_in,
            c.processed + c.dead_lettered + c.queued,
            "r{}: {:?}",
            d,
            c
        );
        prop_assert_eq!(c.queued, 0);
        prop_assert_eq!(c.items_out, traces[d].emitted.len() as u64);
        let failed = received
            .iter()
            .filter(|(_, id)| spec.flaky && fails(id))
            .count() as u64;
        prop_assert_eq!(c.dead_lettered, failed);
        prop_assert_eq!(c.errors, failed);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn random_acyclic_flows_deliver_exactly_once_in_order(case in case()) {
        run_case(&case)?;
    }
}
