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

/// How a routine of the broader model behaves.
#[derive(Clone, Debug)]
struct Feature {
    /// A WebAssembly routine (the hostile fixture forwarding each item), one slot, one event.
    wasm: bool,
    slots: usize,
    events: usize,
    capacity: usize,
    /// 0 immediate, 1 `batch_size(2)`, 2 `time_interval(3ms)`.
    policy: u8,
    concurrency: usize,
    /// 0 continue, 1 skip, 2 `retry(2, 0ms, then continue)`.
    strategy: u8,
    /// 0 never fails; 1 fails the first attempt on ids ending in '3'; 2 always fails on ids
    /// ending in '7'.
    failure: u8,
    /// Whether a failing attempt emits its outputs before it fails.
    fail_after_emits: bool,
}

#[derive(Clone, Debug)]
struct Broad {
    threads: usize,
    routines: Vec<Feature>,
    edges: BTreeSet<(usize, usize, usize, usize)>,
    posts: Vec<(usize, usize)>,
    cancel: bool,
}

fn broad() -> impl Strategy<Value = Broad> {
    let feature = (
        prop::bool::weighted(0.25),
        (1usize..=2, 1usize..=2, 1usize..=6),
        (0u8..3, 1usize..=2, 0u8..3),
        (0u8..3, any::<bool>()),
    )
        .prop_map(
            |(
                wasm,
                (slots, events, capacity),
                (policy, concurrency, strategy),
                (failure, after),
            )| {
                if wasm {
                    Feature {
                        wasm,
                        slots: 1,
                        events: 1,
                        capacity,
                        policy,
                        concurrency,
                        strategy: 0,
                        failure: 0,
                        fail_after_emits: false,
                    }
                } else {
                    Feature {
                        wasm,
                        slots,
                        events,
                        capacity,
                        policy,
                        concurrency,
                        strategy,
                        failure,
                        fail_after_emits: after,
                    }
                }
            },
        );
    (
        1usize..=3,
        prop::collection::vec(feature, 2..=5),
        prop::bool::weighted(0.2),
    )
        .prop_flat_map(|(threads, routines, cancel)| {
            let n = routines.len();
            (
                Just(threads),
                Just(routines),
                prop::collection::vec((0..n, 0usize..2, 0..n, 0usize..2), 0..=7),
                prop::collection::vec((0..n, 0usize..2), 1..=20),
                Just(cancel),
            )
                .prop_map(|(threads, routines, raw_edges, raw_posts, cancel)| {
                    let edges = raw_edges
                        .into_iter()
                        .filter(|&(f, _, t, _)| f < t)
                        .map(|(f, e, t, s)| (f, e % routines[f].events, t, s % routines[t].slots))
                        .collect();
                    let posts = raw_posts
                        .into_iter()
                        .map(|(r, s)| (r, s % routines[r].slots))
                        .collect();
                    Broad {
                        threads,
                        routines,
                        edges,
                        posts,
                        cancel,
                    }
                })
        })
}

/// What a native routine of the broader model did: ids received (every attempt), and per
/// event the ids it delivered (every attempt of a streaming routine, only the successful
/// attempts of a retrying one).
#[derive(Clone, Default)]
struct Seen {
    received: Log<(String, String)>,
    delivered: Log<(usize, String)>,
}

/// Whether `to` is downstream of `from`.
fn reaches(edges: &BTreeSet<(usize, usize, usize, usize)>, from: usize, to: usize) -> bool {
    let mut todo = vec![from];
    let mut seen = BTreeSet::new();
    while let Some(n) = todo.pop() {
        for &(f, _, t, _) in edges {
            if f == n && seen.insert(t) {
                if t == to {
                    return true;
                }
                todo.push(t);
            }
        }
    }
    false
}

fn run_broad(case: &Broad) -> Result<(), TestCaseError> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let seen: Vec<Seen> = case.routines.iter().map(|_| Seen::default()).collect();
    let mut flow = Flow::new();
    for (i, f) in case.routines.iter().enumerate() {
        let mut r = if f.wasm {
            crate::wasm::load("hostile").routine("hostile").unwrap()
        } else {
            let mut r = Routine::new();
            for s in 0..f.slots {
                r = r.slot(format!("s{s}").as_str());
            }
            for e in 0..f.events {
                r = r.event(&format!("e{e}"), ["id"]);
            }
            r
        };
        let slots: Vec<String> = if f.wasm {
            vec!["in".into()]
        } else {
            (0..f.slots).map(|s| format!("s{s}")).collect()
        };
        for s in &slots {
            r = r.max_queue_length(s, f.capacity);
        }
        r = r
            .policy(match f.policy {
                0 => Policy::Immediate,
                1 => Policy::batch_size(2.min(f.capacity)),
                _ => Policy::time_interval(std::time::Duration::from_millis(3)),
            })
            .concurrency(f.concurrency)
            .on_error(match f.strategy {
                0 => ErrorStrategy::Continue,
                1 => ErrorStrategy::Skip,
                _ => ErrorStrategy::Retry(routilux::RetryPolicy {
                    max: 2,
                    delay: std::time::Duration::ZERO,
                    backoff: 1.0,
                    then: routilux::Exhausted::Continue,
                }),
            });
        if !f.wasm {
            let (s, spec, me) = (seen[i].clone(), f.clone(), i);
            let attempts = Arc::new(AtomicU32::new(0));
            r = r.logic(move |ctx, batch| {
                let retrying = spec.strategy == 2;
                let mut out = Vec::new();
                let mut fail = false;
                for (slot, item) in batch
                    .slots()
                    .flat_map(|(sl, items)| items.iter().map(move |i| (sl, i)))
                {
                    let id = item.value()["id"].as_str().unwrap_or("?").to_owned();
                    s.received.push((slot.to_owned(), id.clone()));
                    fail |= match spec.failure {
                        // The first attempt of a batch holding such an id fails.
                        1 => {
                            id.ends_with('3')
                                && attempts.fetch_add(1, Ordering::SeqCst).is_multiple_of(2)
                        }
                        2 => id.ends_with('7'),
                        _ => false,
                    };
                    for e in 0..spec.events {
                        out.push((e, format!("{id}>{me}.{slot}.{e}")));
                    }
                }
                if fail && !spec.fail_after_emits {
                    return Err(RoutineError::retryable("fails before emitting"));
                }
                for (e, child) in &out {
                    ctx.emit(&format!("e{e}"), &json!({ "id": child }))?;
                    // A streaming routine's emits are delivered at once; a retrying one's only
                    // if the attempt succeeds.
                    if !retrying || !fail {
                        s.delivered.push((*e, child.clone()));
                    }
                }
                if fail {
                    return Err(RoutineError::retryable("fails after emitting"));
                }
                Ok(())
            });
        }
        flow.add_routine(r, &format!("r{i}"));
    }
    let slot_name = |t: usize, s: usize| {
        if case.routines[t].wasm {
            "in".to_owned()
        } else {
            format!("s{s}")
        }
    };
    let event_name = |f: usize, e: usize| {
        if case.routines[f].wasm {
            "out".to_owned()
        } else {
            format!("e{e}")
        }
    };
    for &(f, e, t, s) in &case.edges {
        flow.connect(
            &format!("r{f}"),
            &event_name(f, e),
            &format!("r{t}"),
            &slot_name(t, s),
        );
    }
    // A slot that nothing drains (a starved batch) refuses a post soon, not after 30 s.
    let rt = crate::common::builder(case.threads)
        .post_timeout(std::time::Duration::from_millis(50))
        .build();
    rt.register("broad", &flow)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let job = rt.exec("broad").unwrap();
    let hold = job.hold_open().unwrap();
    let mut posted: Vec<(usize, usize)> = Vec::new();
    for (k, &(r, s)) in case.posts.iter().enumerate() {
        let item = json!({"id": format!("p{k}")});
        match job.post(&format!("r{r}"), &slot_name(r, s), &item) {
            Ok(()) => posted.push((r, s)),
            // Backpressure: the slot stayed full. Nothing was queued; stop posting.
            Err(routilux::RuntimeError::QueueFull { .. }) => break,
            Err(e) => return Err(TestCaseError::fail(format!("post refused: {e}"))),
        }
    }
    if case.cancel {
        job.cancel();
    }
    drop(hold);
    prop_assert!(job.wait(WAIT), "job did not finish");
    let counters = job.counters();
    for (d, f) in case.routines.iter().enumerate() {
        let c = &counters[&format!("r{d}")];
        prop_assert_eq!(
            c.items_in,
            c.processed + c.dead_lettered + c.queued,
            "r{}: {:?}",
            d,
            c
        );
        if case.cancel {
            continue;
        }
        // Exactly once: what arrived is what was posted here plus what each source delivered
        // on each connection here (a retrying source's failed attempts delivered nothing).
        let mut expected = posted.iter().filter(|p| p.0 == d).count() as u64;
        for &(src, e, t, _) in &case.edges {
            if t != d {
                continue;
            }
            expected += if case.routines[src].wasm {
                counters[&format!("r{src}")].items_out
            } else {
                seen[src]
                    .delivered
                    .get()
                    .iter()
                    .filter(|(ev, _)| *ev == e)
                    .count() as u64
            };
        }
        prop_assert_eq!(c.items_in, expected, "r{}: {:?} {:?}", d, c, f);
        // (A wasm routine forwards ids unchanged, so through one the same id can rightly
        // arrive twice; the counts above still hold.)
        let fed_by_wasm = (0..d).any(|a| case.routines[a].wasm && reaches(&case.edges, a, d));
        if !f.wasm && !fed_by_wasm {
            // An item comes back only to a retrying routine, at most once per retry.
            let received = seen[d].received.get();
            let most = if f.strategy == 2 { 3 } else { 1 };
            for one in &received {
                let n = received.iter().filter(|x| *x == one).count();
                prop_assert!(n <= most, "r{} got {:?} {} times: {:?}", d, one, n, f);
            }
        }
        // Only a batch policy leaves items behind, and only when it cannot fire: some slot
        // holds fewer than a batch.
        if f.policy == 1 {
            let n = 2.min(f.capacity);
            let left = job.queued_items(&format!("r{d}")).unwrap();
            prop_assert!(
                c.queued == 0 || left.values().any(|v| v.len() < n),
                "r{}: {:?} {:?}",
                d,
                c,
                left
            );
        } else {
            prop_assert_eq!(c.queued, 0, "r{}: {:?}", d, c);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, .. ProptestConfig::default() })]
    #[test]
    fn retries_batches_concurrency_timers_wasm_and_cancel_keep_accounting_exact(case in broad()) {
        run_broad(&case)?;
    }
}
