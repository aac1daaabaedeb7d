//! The hostile-guest suite: a plugin written to hurt the host (`plugins/hostile`) tries every
//! way of handing it memory, time and text, through the real CLI, one process per flood. Each
//! test asserts that the host's peak resident memory (read from /proc by the process itself,
//! `peak_rss_bytes` of `run --json`) stays under the job's memory budget plus 64 MiB, that
//! the job ends in bounded time, and that every item is accounted for
//! (`items_in = processed + dead_lettered + queued`).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::{Run, cache_dir, routilux_in, scratch};
use crate::plugins::plugin_dir;

const MIB: u64 = 1 << 20;

/// What a hostile run did.
struct Outcome {
    run: Run,
    summary: Value,
    peak: u64,
    took: Duration,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "peak {} MiB in {:?}; {:?}",
            self.peak / MIB,
            self.took,
            self.run
        )
    }
}

impl Outcome {
    fn routine(&self, id: &str) -> &Value {
        &self.summary["routines"][id]
    }

    /// Every routine's items are processed, dead-lettered or still queued.
    fn assert_accounted(&self) {
        let routines = self.summary["routines"].as_object().expect("routines");
        for (id, c) in routines {
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            assert_eq!(
                n("items_in"),
                n("processed") + n("dead_lettered") + n("queued"),
                "{id}: {c}"
            );
        }
    }

    fn assert_peak_under(&self, budget: u64) {
        assert!(
            self.peak < budget + 64 * MIB,
            "peak RSS {} MiB is over the budget of {} MiB + 64 MiB: {self:?}",
            self.peak / MIB,
            budget / MIB
        );
        eprintln!(
            "peak RSS {:.1} MiB (budget {} MiB), {:?}",
            self.peak as f64 / MIB as f64,
            budget / MIB,
            self.took
        );
    }

    fn errors(&self) -> Vec<String> {
        self.summary["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["error"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs `flow` (a flow file body; `PLUGINS` is the built plugins) with `args`, `--json`.
fn hostile(dir: &Path, flow: &str, args: &[&str]) -> Outcome {
    let text = flow.replace("PLUGINS", &plugin_dir().display().to_string());
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    let mut all = vec!["run", path.as_str(), "--json", "--threads", "2"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let run = routilux_in(dir, &all, &cache_dir(), &[]);
    let took = started.elapsed();
    let summary: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}): {run:?}"));
    let peak = summary["peak_rss_bytes"].as_u64().expect("peak_rss_bytes");
    Outcome {
        run,
        summary,
        peak,
        took,
    }
}

/// A one-routine flow of the hostile kind fed by `post`s, with `extra` lines for the routine.
fn one(budget_mib: u64, extra: &str) -> String {
    format!(
        "flow_id: hostile
plugins: PLUGINS
budgets: {{memory: {budget_mib}MiB}}
routines:
  h:
    plugin: hostile
    kind: hostile
    on_error: continue
{extra}"
    )
}

#[test]
fn huge_items_are_refused_and_a_slot_holds_its_byte_budget() {
    let dir = scratch();
    // A 30 MB item is over the 16 MiB item budget: refused as it is copied out of the guest.
    let o = hostile(
        dir.path(),
        &one(384, "    limits: {memory: 256MiB}\n"),
        &["--post", r#"{"do": "emit", "bytes": 30000000}"#],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    assert!(
        o.errors()[0].contains("over its item budget of 16.0 MiB")
            || o.errors()[0].contains("handed the host more than 16.1 MiB in one call"),
        "{o:?}"
    );
    o.assert_peak_under(384 * MIB);
    o.assert_accounted();

    // 200 items of 8 MB each into a slow consumer: its slot is full at 64 MiB, so the
    // producer waits; nothing is dropped, and the host holds a few slots' worth, not 1.6 GB.
    let o = hostile(
        dir.path(),
        "flow_id: flood
plugins: PLUGINS
budgets: {memory: 512MiB}
routines:
  src: {plugin: hostile, kind: hostile}
  slow:
    plugin: hostile
    kind: hostile
    policy: {batch_size: 1}
connections:
  - {from: src.out, to: slow.in}
",
        &[
            "--post",
            r#"src.in={"do": "emit", "bytes": 8000000, "count": 200}"#,
        ],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    assert_eq!(o.routine("slow")["processed"], 200, "{o:?}");
    o.assert_peak_under(512 * MIB);
    o.assert_accounted();
}

#[test]
fn streamed_output_is_not_kept_and_an_activation_holds_its_output_budget() {
    let dir = scratch();
    // A harmless routine printing 5,000 lines of 100 bytes per item, 40 items: 200,000 lines
    // streamed; the job keeps only the latest (a ring), so memory stays flat.
    let input = dir.path().join("in.jsonl");
    let line = r#"{"do": "print", "bytes": 100, "count": 5000}"#;
    std::fs::write(&input, format!("{line}\n").repeat(40)).unwrap();
    let o = hostile(
        dir.path(),
        &one(256, "    policy: {batch_size: 1}\n"),
        &["--input", input.to_str().unwrap(), "--quiet"],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    assert_eq!(o.routine("h")["processed"], 40, "{o:?}");
    assert!(
        o.summary["output_lines_dropped"].as_u64().unwrap() >= 190_000,
        "{}",
        o.summary["output_lines_dropped"]
    );
    o.assert_peak_under(256 * MIB);

    // Lines of 1 MiB, and logs of 10 MB per activation: over the 1 MiB output budget of
    // one activation, which fails (its item dead-lettered), the rest not kept.
    let o = hostile(
        dir.path(),
        &one(256, "    policy: {batch_size: 1}\n"),
        &[
            "--post",
            r#"{"do": "print", "bytes": 1048576, "count": 100}"#,
            "--post",
            r#"{"do": "log", "bytes": 10000, "count": 1000}"#,
            "--quiet",
        ],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    let errors = o.errors();
    assert_eq!(errors.len(), 2, "{o:?}");
    for e in &errors {
        assert!(e.contains("more than its output budget of 1.0 MiB"), "{e}");
    }
    o.assert_peak_under(256 * MIB);
    o.assert_accounted();
}

#[test]
fn worker_state_is_bounded_per_value_and_in_total_before_parsing() {
    let dir = scratch();
    let o = hostile(
        dir.path(),
        &one(
            256,
            "    policy: {batch_size: 1}\n    limits: {memory: 256MiB}\n",
        ),
        &[
            // 1000 keys of 5 MB: the first is over the 1 MiB value budget.
            "--post",
            r#"{"do": "state", "bytes": 5000000, "count": 1000}"#,
            // A 40 MB `[0,0,…]` (1.3 GiB as a parsed value): refused as it leaves the guest
            // (no single value may be that large), never parsed.
            "--post",
            r#"{"do": "state", "bytes": 40000000, "count": 1, "shape": "zeros"}"#,
            // 100 keys of 1,000,000 bytes: the routine's 16 MiB state budget ends it.
            "--post",
            r#"{"do": "state", "bytes": 1000000, "count": 100}"#,
        ],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    let errors = o.errors();
    assert_eq!(errors.len(), 3, "{o:?}");
    assert!(
        errors[0].contains("state `k0`") && errors[0].contains("over the budget of 1.0 MiB"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("handed the host more than 16.1 MiB in one call"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("the routine's state budget of 16.0 MiB"),
        "{}",
        errors[2]
    );
    o.assert_peak_under(256 * MIB);
    o.assert_accounted();
}

#[test]
fn error_messages_are_cut_and_dead_letters_past_their_budget_are_counted() {
    let dir = scratch();
    // 40 activations failing with 5 MB messages: each kept message is cut to 4 KiB. (Past
    // 16 MiB a message is stopped as it leaves the guest, as any value is.)
    let input = dir.path().join("fail.jsonl");
    let line = r#"{"do": "fail", "bytes": 5000000}"#;
    std::fs::write(&input, format!("{line}\n").repeat(40)).unwrap();
    let o = hostile(
        dir.path(),
        &one(
            256,
            "    policy: {batch_size: 1}\n    limits: {memory: 256MiB}\n",
        ),
        &["--input", input.to_str().unwrap()],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    let errors = o.errors();
    assert_eq!(errors.len(), 40);
    assert!(
        errors
            .iter()
            .all(|e| e.len() < 4200 && e.contains("more bytes cut"))
    );
    o.assert_peak_under(256 * MIB);

    // 100,000 items of 1 KB dead-lettered 10 at a time: the job keeps 1,000 letters (its
    // budget), counts the other 9,000, and --dead-letters writes every one to a file.
    let input = dir.path().join("dead.jsonl");
    let pad = "x".repeat(1000);
    let line = format!(r#"{{"do": "fail", "bytes": 10, "pad": "{pad}"}}"#);
    std::fs::write(&input, format!("{line}\n").repeat(100_000)).unwrap();
    let dead = dir.path().join("dead-letters.jsonl");
    let o = hostile(
        dir.path(),
        &format!(
            "{}budgets: {{memory: 256MiB, dead_letters: 1000}}\n",
            one(256, "    policy: {batch_size: 10}\n").replace("budgets: {memory: 256MiB}\n", "")
        ),
        &[
            "--input",
            input.to_str().unwrap(),
            "--dead-letters",
            dead.to_str().unwrap(),
        ],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    assert_eq!(o.summary["dead_lettered"], 100_000, "{o:?}");
    assert_eq!(o.summary["dead_letters_kept"], 1000, "{o:?}");
    assert_eq!(o.summary["dead_letters_dropped"], 9000, "{o:?}");
    assert_eq!(o.summary["dead_letter_items_dropped"], 90_000, "{o:?}");
    let written = std::fs::read_to_string(&dead).unwrap();
    let items: usize = written
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["dead_letter"]["items"]["in"].as_array().unwrap().len()
        })
        .sum();
    assert_eq!(items, 100_000, "every dead item is in the file");
    o.assert_peak_under(256 * MIB);
    o.assert_accounted();
}

#[test]
fn a_cycle_that_multiplies_items_is_stopped_by_its_bound() {
    let dir = scratch();
    // Every item comes back twice: the loop grows without end unless the overrun is bounded.
    let o = hostile(
        dir.path(),
        "flow_id: doubling
plugins: PLUGINS
budgets: {memory: 256MiB}
allow_cycles: true
routines:
  d:
    plugin: hostile
    kind: hostile
    max_queue_length: {in: 16}
connections:
  - {from: d.out, to: d.in}
",
        &[
            "--post",
            r#"d.in={"do": "double", "bytes": 10000}"#,
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(o.run.code, 1, "the job fails, it does not run away: {o:?}");
    assert!(
        o.summary["failure"]
            .as_str()
            .is_some_and(|f| f.contains("already past its bounds")),
        "{o:?}"
    );
    assert!(o.took < Duration::from_secs(30), "{o:?}");
    o.assert_peak_under(256 * MIB);
    o.assert_accounted();
}

#[test]
fn many_routines_at_their_memory_cap_are_held_to_the_job_budget() {
    let dir = scratch();
    // 40 routines, each growing to 55 MB (under its own 64 MiB cap): 2.2 GB together, but the
    // job's budget is 512 MiB, so the guests past it trap and say why.
    let mut flow = String::from(
        "flow_id: many\nplugins: PLUGINS\nbudgets: {memory: 512MiB}\nroutines:\n  src: {plugin: hostile, kind: hostile}\n",
    );
    let mut connections = String::from("connections:\n");
    for i in 0..40 {
        flow.push_str(&format!(
            "  g{i}: {{plugin: hostile, kind: hostile, on_error: continue}}\n"
        ));
        connections.push_str(&format!("  - {{from: src.out, to: g{i}.in}}\n"));
    }
    flow.push_str(&connections);
    // Every routine asks for 55 MB at once.
    let posts: Vec<String> = (0..40)
        .map(|i| format!(r#"g{i}.in={{"do": "grow", "bytes": 55000000}}"#))
        .collect();
    let mut args: Vec<&str> = Vec::new();
    for p in &posts {
        args.push("--post");
        args.push(p);
    }
    let o = hostile(dir.path(), &flow, &args);
    assert_eq!(o.run.code, 0, "{o:?}");
    let errors = o.errors();
    assert!(!errors.is_empty(), "{o:?}");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("memory budget") && e.contains("512.0 MiB")),
        "{errors:?}"
    );
    assert!(
        errors.len() >= 31,
        "at most 9 of 55 MB fit 512 MiB: {errors:?}"
    );
    assert!(o.summary["peak_memory_bytes"].as_u64().unwrap() <= 512 * MIB);
    o.assert_peak_under(512 * MIB);
    o.assert_accounted();
}

#[test]
fn wasmtime_limits_are_chosen_and_their_traps_explained() {
    let dir = scratch();
    let o = hostile(
        dir.path(),
        &one(
            1024,
            "    policy: {batch_size: 1}\n    limits: {memory: 512MiB}\n",
        ),
        &[
            // A 200 MB emit: stopped when it is copied out of the guest, not after.
            "--post",
            r#"{"do": "emit", "bytes": 200000000}"#,
            "--post",
            r#"{"do": "random", "bytes": 100000000}"#,
            "--post",
            r#"{"do": "resources", "count": 100000}"#,
        ],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    let errors = o.errors();
    assert_eq!(errors.len(), 3, "{o:?}");
    assert!(
        errors[0].contains("handed the host more than 16.1 MiB in one call"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("asked for more than 1.0 MiB random bytes"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("more than 16384 live resources"),
        "{}",
        errors[2]
    );
    assert!(
        errors
            .iter()
            .all(|e| !e.contains("fuel allocated for hostcalls"))
    );
    o.assert_peak_under(1024 * MIB);
    o.assert_accounted();
}

#[test]
fn a_guest_blocked_in_sleep_or_poll_ends_at_its_deadline_and_on_timeout() {
    let dir = scratch();
    for what in ["sleep", "poll"] {
        let post = format!(r#"{{"do": "{what}", "ms": 3600000}}"#);
        let o = hostile(
            dir.path(),
            &one(256, "    limits: {timeout: 300ms}\n"),
            &["--post", &post],
        );
        assert_eq!(o.run.code, 0, "{what}: {o:?}");
        assert!(
            o.errors()[0].contains("exceeded its deadline of 300ms"),
            "{what}: {o:?}"
        );
        let late = o.took.saturating_sub(Duration::from_millis(300));
        eprintln!(
            "{what}: stopped {late:?} after its deadline (whole process {:?})",
            o.took
        );
        assert!(late < Duration::from_secs(1), "{what}: {o:?}");

        // A routine allowed an hour, a run given half a second: --timeout ends it at once.
        let o = hostile(
            dir.path(),
            &one(256, "    limits: {timeout: 1h}\n"),
            &["--post", &post, "--timeout", "500ms"],
        );
        assert_eq!(o.run.code, 4, "{what}: {o:?}");
        assert!(o.took < Duration::from_millis(1500), "{what}: {o:?}");
        assert_eq!(
            o.summary["dead_lettered"], 1,
            "{what}: its item is kept: {o:?}"
        );
    }
}

#[test]
fn time_blocked_on_a_slow_reader_is_not_charged_to_the_guest() {
    use std::io::Read;
    let dir = scratch();
    let flow = one(256, "    limits: {timeout: 300ms}\n")
        .replace("PLUGINS", &plugin_dir().display().to_string());
    let path = dir.path().join("flow.yaml");
    std::fs::write(&path, flow).unwrap();
    // 4,000 lines of 200 bytes (800 KB, past the pipe's buffer); the reader pauses 1 s, as a
    // paused pager does, before it reads.
    let mut child = crate::cli::spawn(&[
        "run",
        path.to_str().unwrap(),
        "--post",
        r#"{"do": "print", "bytes": 200, "count": 4000}"#,
    ]);
    let stderr = crate::cli::read_all(child.stderr.take().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("deadline"), "{stderr}");
    assert_eq!(out.lines().count(), 4000, "no line cut: {stderr}");
}

#[test]
fn every_flood_at_once_stays_within_the_job_budget() {
    let dir = scratch();
    let o = hostile(
        dir.path(),
        "flow_id: everything
plugins: PLUGINS
budgets: {memory: 384MiB}
routines:
  emit: {plugin: hostile, kind: hostile, on_error: continue}
  sink: {plugin: hostile, kind: hostile, policy: {batch_size: 1}, on_error: continue}
  print: {plugin: hostile, kind: hostile, policy: {batch_size: 1}, on_error: continue}
  state: {plugin: hostile, kind: hostile, policy: {batch_size: 1}, on_error: continue}
  grow: {plugin: hostile, kind: hostile, policy: {batch_size: 1}, on_error: continue}
  fail: {plugin: hostile, kind: hostile, policy: {batch_size: 1}, on_error: continue, limits: {memory: 128MiB}}
connections:
  - {from: emit.out, to: sink.in}
",
        &[
            "--post",
            r#"emit.in={"do": "emit", "bytes": 4000000, "count": 100}"#,
            "--post",
            r#"print.in={"do": "print", "bytes": 1000, "count": 900}"#,
            "--post",
            r#"state.in={"do": "state", "bytes": 1000000, "count": 20}"#,
            "--post",
            r#"grow.in={"do": "grow", "bytes": 50000000}"#,
            "--post",
            r#"fail.in={"do": "fail", "bytes": 60000000}"#,
            "--quiet",
        ],
    );
    assert_eq!(o.run.code, 0, "{o:?}");
    assert_eq!(o.routine("sink")["processed"], 100, "{o:?}");
    o.assert_peak_under(384 * MIB);
    o.assert_accounted();
}
