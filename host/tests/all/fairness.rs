//! Fair shares: a pool built `fair` serves groups (tenants) by weight, charged the wall time
//! their activations occupy workers, and lets another group in between two activations.
//!
//! These tests count activations, not milliseconds, so a slow or noisy machine does not change
//! what they see: "B ran after at most two more of A's activations", "A ran about three times
//! as often as B".

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use routilux::{Flow, Group, Policy, Routine, Runtime};
use serde_json::json;

use crate::common::{Log, Rendezvous, WAIT, builder, eventually, max_overlap, meeting};

/// Spins (a CPU-heavy activation) for `d`.
fn spin(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// A flow whose routine `work` takes its items one at a time (a slot of `capacity`), spins
/// `busy` on each and counts it in `done`.
fn counting_flow(busy: Duration, done: &Arc<AtomicU64>, capacity: usize) -> Flow {
    let done = done.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", capacity)
            .policy(Policy::batch_size(1))
            .logic(move |_, _| {
                spin(busy);
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }),
        "work",
    );
    flow
}

fn fair(threads: usize) -> Runtime {
    builder(threads).fair(true).build()
}

/// Posts `n` items to routine `work` of a new job of `flow` in `group`, held open until the
/// returned hold is dropped.
fn flood(
    rt: &Runtime,
    group: Group,
    flow: &str,
    n: usize,
) -> (routilux::JobHandle, routilux::InputHold) {
    let job = rt.exec_in(group, flow).unwrap();
    let hold = job.hold_open().unwrap();
    for i in 0..n {
        job.post("work", "in", &json!({"i": i})).unwrap();
    }
    (job, hold)
}

/// Where group B's item waits behind a flooding group A on one worker: the number of A's
/// activations that ended between B's post returning and B's activation.
fn b_waits_behind_a(rt: &Runtime) -> Vec<i64> {
    let a_done = Arc::new(AtomicU64::new(0));
    rt.register(
        "a",
        &counting_flow(Duration::from_millis(2), &a_done, 1_000),
    )
    .unwrap();
    let seen: Log<u64> = Log::new();
    let (seen2, a_done2) = (seen.clone(), a_done.clone());
    let mut light = Flow::new();
    light.add_routine(
        Routine::new().slot("in").logic(move |_, _| {
            seen2.push(a_done2.load(Ordering::SeqCst));
            Ok(())
        }),
        "echo",
    );
    rt.register("b", &light).unwrap();
    let (ga, gb) = (rt.add_group(1), rt.add_group(1));
    let (a_job, a_hold) = flood(rt, ga, "a", 400);
    assert!(eventually(|| a_done.load(Ordering::SeqCst) >= 5));
    let mut lags = Vec::new();
    for probe in 0..10 {
        let b = rt.exec_in(gb, "b").unwrap();
        b.post("echo", "in", &json!({"probe": probe})).unwrap();
        let after_post = a_done.load(Ordering::SeqCst);
        assert!(b.wait(WAIT), "B's job did not finish while A floods");
        let at_run = seen.get()[probe];
        lags.push(at_run as i64 - after_post as i64);
    }
    a_job.cancel();
    drop(a_hold);
    lags
}

#[test]
fn another_group_waits_at_most_one_activation_of_a_flooding_one() {
    // One worker, A's 400 queued activations of 2 ms each: B's item runs as soon as the
    // activation of A that is running when it arrives ends (one more may end in between, if
    // the test thread is slow to read A's count). First come, first served, it would wait for
    // A's whole check (64 activations) or, with A rescheduling itself, A's whole queue.
    let rt = fair(1);
    let lags = b_waits_behind_a(&rt);
    assert!(
        lags.iter().all(|&l| l <= 2),
        "A's activations B waited for: {lags:?}"
    );
}

#[test]
fn without_fair_shares_the_same_flood_makes_the_other_group_wait() {
    // The control for the test above: the same scenario on a pool that is not fair shows
    // that the scenario does measure the scheduler (B waits for many of A's activations).
    let rt = builder(1).build();
    let lags = b_waits_behind_a(&rt);
    assert!(
        lags.iter().any(|&l| l > 10),
        "B never waited for A, so the fair test above would pass without fairness: {lags:?}"
    );
}

#[test]
fn workers_are_shared_by_weight() {
    // One worker, two groups flooding equal 2 ms activations, weights 3 and 1: while both have
    // work, A gets three activations for each of B's.
    let rt = fair(1);
    let (a_done, b_done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    rt.register(
        "a",
        &counting_flow(Duration::from_millis(2), &a_done, 1_000),
    )
    .unwrap();
    rt.register(
        "b",
        &counting_flow(Duration::from_millis(2), &b_done, 1_000),
    )
    .unwrap();
    let (ga, gb) = (rt.add_group(3), rt.add_group(1));
    let (a_job, a_hold) = flood(&rt, ga, "a", 600);
    let (b_job, b_hold) = flood(&rt, gb, "b", 600);
    // Both queued; count from here for 200 activations.
    let (a0, b0) = (a_done.load(Ordering::SeqCst), b_done.load(Ordering::SeqCst));
    assert!(eventually(|| a_done.load(Ordering::SeqCst)
        + b_done.load(Ordering::SeqCst)
        >= a0 + b0 + 200));
    let (a, b) = (
        a_done.load(Ordering::SeqCst) - a0,
        b_done.load(Ordering::SeqCst) - b0,
    );
    a_job.cancel();
    b_job.cancel();
    drop((a_hold, b_hold));
    let ratio = a as f64 / b.max(1) as f64;
    assert!(
        (2.0..=4.5).contains(&ratio),
        "weights 3:1 gave {a}:{b} activations ({ratio:.2})"
    );
    // What each was charged: the wall time of its activations, in the same proportion.
    let (ua, ub) = (rt.group_usage(ga), rt.group_usage(gb));
    assert_eq!((ua.weight, ub.weight), (3, 1));
    assert!(ua.busy > ub.busy * 2, "{ua:?} {ub:?}");
}

#[test]
fn a_group_alone_uses_every_worker() {
    // Work-conserving: with no other group waiting, one group's routine of concurrency 2 runs
    // on both workers at once (the activations meet at a rendezvous, so only real
    // parallelism passes).
    let rt = fair(2);
    let log = Log::new();
    let rv = Rendezvous::new();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .policy(Policy::batch_size(1))
            .concurrency(2)
            .logic(meeting(&log, &rv, 2, "k")),
        "work",
    );
    rt.register("f", &flow).unwrap();
    let g = rt.add_group(1);
    let job = rt.exec_in(g, "f").unwrap();
    let hold = job.hold_open().unwrap();
    for _ in 0..2 {
        job.post("work", "in", &json!({"k": 1})).unwrap();
    }
    drop(hold);
    assert!(job.wait(WAIT));
    assert_eq!(max_overlap(&log.get()), 2);
}

#[test]
fn a_group_is_charged_the_time_its_guests_sleep() {
    // Charged by wall time, not CPU time: a routine that sleeps costs its own group.
    let rt = fair(2);
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("in")
            .policy(Policy::batch_size(1))
            .logic(|_, _| {
                std::thread::sleep(Duration::from_millis(50));
                Ok(())
            }),
        "work",
    );
    rt.register("sleepy", &flow).unwrap();
    let (ga, gb) = (rt.add_group(1), rt.add_group(1));
    let (job, hold) = flood(&rt, ga, "sleepy", 4);
    drop(hold);
    assert!(job.wait(WAIT));
    // (The job finishes inside its last task: the worker counts itself out just after.)
    assert!(eventually(|| rt.group_usage(ga).running == 0));
    let (ua, ub) = (rt.group_usage(ga), rt.group_usage(gb));
    assert!(ua.busy >= Duration::from_millis(200), "{ua:?}");
    assert_eq!(ub.busy, Duration::ZERO);
    assert_eq!(ua.queued_tasks, 0, "{ua:?}");
}

#[test]
fn a_bursty_group_keeps_the_debt_of_its_bursts_across_idle_moments() {
    // One worker. H posts one 20 ms activation at a time and waits for it (so it is idle
    // between bursts); L floods 2 ms activations. Same weight: H must not get its bursts
    // as if each one were its first (its debt forgiven at every idle moment would give it
    // about 90 % of the worker).
    let rt = fair(1);
    let (h_done, l_done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    rt.register("h", &counting_flow(Duration::from_millis(20), &h_done, 10))
        .unwrap();
    rt.register(
        "l",
        &counting_flow(Duration::from_millis(2), &l_done, 1_000),
    )
    .unwrap();
    let (gh, gl) = (rt.add_group(1), rt.add_group(1));
    let (l_job, l_hold) = flood(&rt, gl, "l", 1_000);
    let h_job = rt.exec_in(gh, "h").unwrap();
    let h_hold = h_job.hold_open().unwrap();
    for i in 0..25 {
        h_job.post("work", "in", &json!({"i": i})).unwrap();
        let want = i + 1;
        assert!(eventually(|| h_done.load(Ordering::SeqCst) >= want));
    }
    let (uh, ul) = (rt.group_usage(gh), rt.group_usage(gl));
    l_job.cancel();
    drop((l_hold, h_hold));
    let ratio = uh.busy.as_secs_f64() / ul.busy.as_secs_f64().max(1e-9);
    assert!(
        ratio < 2.0,
        "H took {:?} of the worker and L {:?} ({ratio:.2}:1)",
        uh.busy,
        ul.busy
    );
}

#[test]
fn a_group_over_its_activation_rate_waits_and_leaves_the_workers_to_others() {
    // A is limited to 50 activations a second (bursts of 50): its 100 take at least a
    // second, the second half one every 20 ms, while B's 100 on the same single worker are
    // done long before (A's waits hold no worker).
    let rt = fair(1);
    let (a_done, b_done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    rt.register("a", &counting_flow(Duration::ZERO, &a_done, 1_000))
        .unwrap();
    rt.register("b", &counting_flow(Duration::ZERO, &b_done, 1_000))
        .unwrap();
    let (ga, gb) = (rt.add_group(1), rt.add_group(1));
    rt.set_group_rate(ga, Some(50));
    let started = Instant::now();
    let (a_job, a_hold) = flood(&rt, ga, "a", 100);
    drop(a_hold);
    let (b_job, b_hold) = flood(&rt, gb, "b", 100);
    drop(b_hold);
    assert!(b_job.wait(WAIT));
    let a_when_b_done = a_done.load(Ordering::SeqCst);
    assert!(a_job.wait(WAIT));
    let took = started.elapsed();
    assert!(
        a_when_b_done < 100,
        "B finished only after A: {a_when_b_done}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "100 activations at 50/s took {took:?}"
    );
    let u = rt.group_usage(ga);
    assert_eq!(u.rate, Some(50));
    assert!(u.throttled > 0, "{u:?}");
    assert_eq!(rt.group_usage(gb).throttled, 0);
    // The limit lifted: the next 100 run at once.
    rt.set_group_rate(ga, None);
    let t = Instant::now();
    let (a_job, a_hold) = flood(&rt, ga, "a", 100);
    drop(a_hold);
    assert!(a_job.wait(WAIT));
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(a_done.load(Ordering::SeqCst), 200);
}

/// A group's memory quota holds its jobs together: one job's queued bytes leave the other job
/// of the group no room (its post waits, then is refused as a full slot), while a job of
/// another group posts as much as it likes; once the first job drains, the second's post goes
/// in. The group's meter never passes its quota.
#[test]
fn a_groups_jobs_share_its_memory_quota_and_another_group_does_not_feel_it() {
    use routilux::{Item, RuntimeError};
    let rt = builder(1)
        .fair(true)
        .post_timeout(Duration::from_millis(50))
        .build();
    let a = rt.add_group(1);
    let b = rt.add_group(1);
    const QUOTA: u64 = 2 << 20;
    rt.set_group_memory(a, Some(QUOTA));
    let gate = crate::common::Gate::new();
    let g = gate.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", 1000)
            .policy(Policy::batch_size(1))
            .logic(move |_, _| {
                assert!(g.wait());
                Ok(())
            }),
        "sink",
    );
    rt.register("f", &flow).unwrap();
    // Items of 256 KiB (and a few bytes of JSON around the text).
    let big = || Item::new(json!({"x": "x".repeat(256 << 10)})).unwrap();
    let first = rt.exec_in(a, "f").unwrap();
    let hold1 = first.hold_open().unwrap();
    let mut taken = 0;
    let err = loop {
        match first.post_item("sink", "in", big()) {
            Ok(()) => taken += 1,
            Err(e) => break e,
        }
        assert!(taken < 100, "the quota never refused");
    };
    assert!(matches!(err, RuntimeError::QueueFull { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("full (no room left in its tenant's memory quota of 2.0 MiB"),
        "{err}"
    );
    // 2 MiB hold 7 of them (one more is taken by the blocked activation), less the chunks
    // the slot reserves ahead.
    assert!(
        (5..=9).contains(&taken),
        "{taken} items of 256 KiB in 2 MiB"
    );
    let used = rt.group_usage(a);
    assert_eq!(used.memory_limit, Some(QUOTA));
    assert!(used.memory_bytes > QUOTA - (512 << 10), "{used:?}");
    assert!(used.memory_peak_bytes <= QUOTA, "{used:?}");

    // The group's other job: refused at once, though its own budget (2 GiB) is untouched.
    let second = rt.exec_in(a, "f").unwrap();
    let hold2 = second.hold_open().unwrap();
    let refused = second.post_item_timeout("sink", "in", big(), Duration::from_millis(20));
    assert!(
        matches!(refused, Err(RuntimeError::QueueFull { .. })),
        "{refused:?}"
    );
    // Another group: not held to a's quota.
    let other = rt.exec_in(b, "f").unwrap();
    let hold3 = other.hold_open().unwrap();
    for _ in 0..taken + 4 {
        other.post_item("sink", "in", big()).unwrap();
    }
    assert_eq!(rt.group_usage(b).memory_limit, None);

    // The first job drains: the second's post goes in.
    gate.open();
    drop(hold1);
    assert!(first.wait(WAIT));
    second.post_item("sink", "in", big()).unwrap();
    drop((hold2, hold3));
    assert!(second.wait(WAIT) && other.wait(WAIT));
    assert!(eventually(|| rt.group_usage(a).memory_bytes == 0));
    assert!(rt.group_usage(a).memory_peak_bytes <= QUOTA);
}

/// A group's quota of queued items holds its jobs together by count, whatever their size:
/// one job's tiny items leave the group's other job no room (its post waits, then is refused
/// naming the quota, and its emit fails retryable, the item a dead letter), while a job of
/// another group queues as many as it likes; once the first job drains, the second's post
/// goes in and the count returns to nothing.
#[test]
fn a_groups_jobs_share_its_quota_of_queued_items_and_another_group_does_not_feel_it() {
    use routilux::{ErrorStrategy, Item, RuntimeError};
    let rt = builder(2)
        .fair(true)
        .post_timeout(Duration::from_millis(50))
        .build();
    let (a, b) = (rt.add_group(1), rt.add_group(1));
    const QUOTA: u64 = 1_000;
    rt.set_group_queued_items(a, Some(QUOTA));
    rt.set_group_queued_items(b, None);
    let gate = crate::common::Gate::new();
    let (g, emit_gate) = (gate.clone(), crate::common::Gate::new());
    let eg = emit_gate.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", 100_000)
            .policy(Policy::batch_size(1))
            .logic(move |_, _| {
                assert!(g.wait());
                Ok(())
            }),
        "sink",
    )
    .add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["x"])
            .on_error(ErrorStrategy::Continue)
            .logic(move |ctx, _| {
                assert!(eg.wait());
                ctx.emit_item("out", Item::new(json!({"x": 1})).unwrap())?;
                Ok(())
            }),
        "src",
    )
    .connect("src", "out", "sink", "in");
    rt.register("f", &flow).unwrap();
    let tiny = || Item::new(json!({"x": 1})).unwrap();
    // The group's second job starts an emitter that waits for the quota to be spent.
    let second = rt.exec_in(a, "f").unwrap();
    let hold2 = second.hold_open().unwrap();
    second.post_item("src", "go", tiny()).unwrap();
    assert!(eventually(|| {
        let c = &second.counters()["src"];
        c.items_in == 1 && c.queued == 0
    }));
    let first = rt.exec_in(a, "f").unwrap();
    let hold1 = first.hold_open().unwrap();
    let mut taken = 0u64;
    let err = loop {
        match first.post_item("sink", "in", tiny()) {
            Ok(()) => taken += 1,
            Err(e) => break e,
        }
        assert!(taken < 10 * QUOTA, "the quota never refused");
    };
    assert!(matches!(err, RuntimeError::QueueFull { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("no room left in its tenant's quota of 1000 queued items"),
        "{err}"
    );
    // 1,000 queued and one in the blocked activation (it left the queue), less what the
    // slot reserves ahead in chunks.
    assert!(
        (QUOTA - 64..=QUOTA + 1).contains(&taken),
        "{taken} items in a quota of {QUOTA}"
    );
    let used = rt.group_usage(a);
    assert_eq!(used.queued_items_limit, Some(QUOTA));
    assert!(used.queued_items_peak <= QUOTA, "{used:?}");
    // Far within the memory any job may hold: it is the count that refused.
    assert!(taken * 200 < 1 << 20);

    // The group's other job: its post is refused, and its emit fails once it has waited as
    // long as a post (the first job, holding most of the quota, is what would have to make
    // room).
    let refused = second.post_item_timeout("sink", "in", tiny(), Duration::from_millis(20));
    assert!(
        matches!(refused, Err(RuntimeError::QueueFull { .. })),
        "{refused:?}"
    );
    emit_gate.open();
    assert!(eventually(|| second.counters()["src"].errors == 1));
    let e = &second.errors()[0];
    assert!(e.retryable, "{e:?}");
    assert!(
        e.error.contains("its tenant's quota of 1000 queued items"),
        "{e:?}"
    );
    assert_eq!(second.counters()["sink"].dead_lettered, 1);

    // Another group: not held to a's quota.
    let other = rt.exec_in(b, "f").unwrap();
    let hold3 = other.hold_open().unwrap();
    for _ in 0..2 * QUOTA {
        other.post_item("sink", "in", tiny()).unwrap();
    }
    assert!(rt.group_usage(b).queued_items >= 2 * QUOTA - 1);
    assert_eq!(rt.group_usage(b).queued_items_limit, None);

    // The first job drains: the second's post goes in.
    gate.open();
    drop(hold1);
    assert!(first.wait(WAIT));
    second.post_item("sink", "in", tiny()).unwrap();
    drop((hold2, hold3));
    assert!(second.wait(WAIT) && other.wait(WAIT));
    assert_eq!(rt.group_usage(a).queued_items, 0);
    assert_eq!(rt.group_usage(b).queued_items, 0);
}

/// A job that holds its group's quota of queued items itself is held back as by a full slot,
/// never failed: its emits wait for its own consumer to drain (it is the one that can), and
/// every item arrives. (Failing the emit is for a quota other jobs hold.)
#[test]
fn a_job_holding_its_groups_quota_of_queued_items_itself_gets_backpressure_not_failures() {
    use routilux::Item;
    let rt = builder(4)
        .fair(true)
        .post_timeout(Duration::from_millis(100))
        .build();
    let a = rt.add_group(1);
    rt.set_group_queued_items(a, Some(1_000));
    let (gate, src_gate) = (crate::common::Gate::new(), crate::common::Gate::new());
    let (g, sg) = (gate.clone(), src_gate.clone());
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot_with_capacity("in", 5_000)
            .event("out", ["x"])
            .concurrency(1)
            .logic(move |ctx, batch| {
                assert!(sg.wait());
                // A fan-out: three out for each in, so the job's own emits fill the quota.
                for item in batch.items() {
                    for _ in 0..3 {
                        ctx.emit_item("out", item.clone())?;
                    }
                }
                Ok(())
            }),
        "src",
    )
    .add_routine(gated_sink(5_000, g), "sink")
    .connect("src", "out", "sink", "in");
    rt.register("f", &flow).unwrap();
    let job = rt.exec_in(a, "f").unwrap();
    let hold = job.hold_open().unwrap();
    // The posts fill the quota; then src turns each item into three, its emits waiting on
    // the quota the job itself holds; then the sink drains.
    let opener = {
        let (gate, src_gate) = (gate.clone(), src_gate.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            src_gate.open();
            std::thread::sleep(Duration::from_millis(800));
            gate.open();
        })
    };
    for i in 0..1_000 {
        job.post_item_timeout(
            "src",
            "in",
            Item::new(json!({"x": i})).unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
    }
    drop(hold);
    opener.join().unwrap();
    assert!(job.wait(WAIT));
    assert!(job.errors().is_empty(), "{:?}", job.errors());
    let c = job.counters();
    assert_eq!(c["sink"].items_in, 3_000, "{c:?}");
    assert_eq!(c["sink"].processed, 3_000, "{c:?}");
    assert_eq!(c["sink"].dead_lettered, 0, "{c:?}");
    let used = rt.group_usage(a);
    assert_eq!(used.queued_items, 0, "{used:?}");
    assert!(used.queued_items_peak <= 1_000 + 64, "{used:?}");
}

/// Slots left empty do not keep their group's quota of queued items spent: forty jobs held
/// open, each of which had one item pass through, hold nothing of it, and one more job's post
/// goes in at once. (A slot keeps a chunk reserved ahead while it is busy: forty such would
/// hold more than the whole quota.)
#[test]
fn empty_slots_of_idle_jobs_hold_none_of_their_groups_quota_of_queued_items() {
    use routilux::Item;
    let rt = builder(2).fair(true).build();
    let a = rt.add_group(1);
    rt.set_group_queued_items(a, Some(1_000));
    let mut flow = Flow::new();
    flow.add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "sink");
    rt.register("f", &flow).unwrap();
    let tiny = || Item::new(json!({"x": 1})).unwrap();
    let mut held = Vec::new();
    for _ in 0..40 {
        let job = rt.exec_in(a, "f").unwrap();
        let hold = job.hold_open().unwrap();
        job.post_item("sink", "in", tiny()).unwrap();
        assert!(eventually(|| job.counters()["sink"].processed == 1));
        held.push((job, hold));
    }
    let used = rt.group_usage(a);
    assert_eq!(used.queued_items, 0, "{used:?}");
    let one_more = rt.exec_in(a, "f").unwrap();
    one_more
        .post_item_timeout("sink", "in", tiny(), Duration::ZERO)
        .unwrap();
    assert!(one_more.wait(WAIT));
    for (job, hold) in held {
        drop(hold);
        assert!(job.wait(WAIT));
    }
}

/// A retrying routine's held emits stay on the job's memory meter until each is delivered:
/// while a successful attempt's ten 100 KB items wait on a full slot, the group's count shows
/// them all (before, they left it when the attempt ended, and waited uncounted).
#[test]
fn held_emits_stay_counted_until_they_are_delivered() {
    use routilux::{ErrorStrategy, Item};
    let rt = builder(2).fair(true).build();
    let a = rt.add_group(1);
    rt.set_group_memory(a, Some(1 << 30));
    let gate = crate::common::Gate::new();
    let g = gate.clone();
    let mut flow = Flow::new();
    flow.add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["pad"])
            .on_error(ErrorStrategy::retry(2, Duration::from_millis(1), 1.0))
            .logic(|ctx, _| {
                for _ in 0..10 {
                    ctx.emit_item(
                        "out",
                        Item::new(json!({"pad": "x".repeat(100_000)})).unwrap(),
                    )?;
                }
                Ok(())
            }),
        "src",
    )
    .add_routine(gated_sink(1, g), "sink")
    .connect("src", "out", "sink", "in");
    rt.register("f", &flow).unwrap();
    let job = rt.exec_in(a, "f").unwrap();
    job.post_item("src", "go", Item::new(json!({})).unwrap())
        .unwrap();
    // One item in the gated activation (perhaps run by the emitter itself, on its stack), at
    // most one queued, the other eight or nine waiting to be delivered.
    assert!(eventually(|| job.counters()["sink"].items_in >= 1));
    std::thread::sleep(Duration::from_millis(200));
    let held = rt.group_usage(a).memory_bytes;
    assert!(held >= 800_000, "{held} bytes counted");
    gate.open();
    assert!(job.wait(WAIT));
    assert_eq!(job.counters()["sink"].processed, 10);
    assert_eq!(rt.group_usage(a).memory_bytes, 0);
}

/// A sink of one slot holding `capacity` items, one activation at a time, each waiting for
/// `gate`.
fn gated_sink(capacity: usize, gate: crate::common::Gate) -> Routine {
    Routine::new()
        .slot_with_capacity("in", capacity)
        .concurrency(1)
        .logic(move |_, _| {
            assert!(gate.wait());
            Ok(())
        })
}

/// For the quota tests: gives group `a` a 1 MiB memory quota, registers `hoard` (a sink
/// whose activations wait for the returned gate) and `emit` (`src` emits one 300 KiB item to
/// `sink`, errors continued), and starts a job of `hoard` in `a` that fills the quota with
/// queued items; returns the gate, that job and its hold.
fn fill_quota_and_register_emit(
    rt: &Runtime,
    a: Group,
) -> (
    crate::common::Gate,
    routilux::JobHandle,
    routilux::InputHold,
) {
    use routilux::{ErrorStrategy, Item};
    rt.set_group_memory(a, Some(1 << 20));
    let big = || Item::new(json!({"x": "x".repeat(300 << 10)})).unwrap();
    let gate = crate::common::Gate::new();
    let g = gate.clone();
    let mut hoard = Flow::new();
    hoard.add_routine(
        Routine::new()
            .slot_with_capacity("in", 100)
            .policy(Policy::batch_size(1))
            .logic(move |_, _| {
                assert!(g.wait());
                Ok(())
            }),
        "sink",
    );
    rt.register("hoard", &hoard).unwrap();
    let mut emit = Flow::new();
    emit.add_routine(
        Routine::new()
            .slot("go")
            .event("out", ["x"])
            .on_error(ErrorStrategy::Continue)
            .logic(move |ctx, _| {
                ctx.emit_item("out", big())?;
                Ok(())
            }),
        "src",
    )
    .add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "sink")
    .connect("src", "out", "sink", "in");
    rt.register("emit", &emit).unwrap();
    let first = rt.exec_in(a, "hoard").unwrap();
    let hold = first.hold_open().unwrap();
    while first
        .post_item_timeout("sink", "in", big(), Duration::from_millis(20))
        .is_ok()
    {}
    (gate, first, hold)
}

/// An emit that finds room in its slot but none in its group's memory quota (spent by the
/// group's other job) waits no longer than a post would, then fails the activation
/// (retryable), its item a dead letter: the other job's memory cannot hold a worker.
#[test]
fn an_emit_blocked_by_its_groups_quota_gives_its_worker_back_after_the_post_timeout() {
    let rt = builder(2)
        .fair(true)
        .post_timeout(Duration::from_millis(100))
        .build();
    let a = rt.add_group(1);
    // a's first job fills a's quota with queued items behind a closed gate.
    let (gate, first, hold) = fill_quota_and_register_emit(&rt, a);
    // a's second job: its emit has room in its slot, none in a's quota.
    let started = Instant::now();
    let second = rt.exec_in(a, "emit").unwrap();
    second.post("src", "go", &json!({})).unwrap();
    assert!(
        second.wait(WAIT),
        "the emit never gave up: the first job's memory holds its worker"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(100), "{took:?}");
    let errors = second.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].retryable, "{errors:?}");
    assert!(
        errors[0].error.contains("could not deliver to `sink.in`")
            && errors[0].error.contains("tenant's memory quota of 1.0 MiB"),
        "{errors:?}"
    );
    let c = &second.counters()["sink"];
    assert_eq!(
        (c.items_in, c.dead_lettered, c.processed),
        (1, 1, 0),
        "{c:?}"
    );
    gate.open();
    drop(hold);
    assert!(first.wait(WAIT));
}

/// In a durable job every emit is held until its activation commits; a held emit that finds
/// no room in its tenant's quota (the other job holds it) waits as long as a post, then fails
/// retryable, naming the quota; once the other job lets go, a retry goes through.
#[test]
fn a_durable_jobs_held_emit_waits_for_its_groups_quota_then_fails_retryable() {
    use routilux::JobStore;
    let rt = builder(2)
        .fair(true)
        .post_timeout(Duration::from_millis(100))
        .build();
    let a = rt.add_group(1);
    // a's first job fills a's quota with queued items behind a closed gate.
    let (gate, first, hold) = fill_quota_and_register_emit(&rt, a);
    let dir = tempfile::tempdir().unwrap();
    let (second, hold2) = rt
        .exec_durable_in(a, "emit", JobStore::open(dir.path(), b"").unwrap())
        .unwrap();
    let started = Instant::now();
    second.post("src", "go", &json!({})).unwrap();
    assert!(eventually(|| !second.errors().is_empty()));
    assert!(started.elapsed() >= Duration::from_millis(100));
    let e = &second.errors()[0];
    assert!(e.retryable, "{e:?}");
    assert!(
        e.error.contains("cannot hold more emits") && e.error.contains("tenant's memory quota"),
        "{e:?}"
    );
    gate.open();
    drop(hold);
    assert!(first.wait(WAIT));
    second.post("src", "go", &json!({})).unwrap();
    drop(hold2);
    assert!(second.wait(WAIT));
    assert_eq!(
        second.counters()["sink"].processed,
        1,
        "the second emit went through"
    );
}
