//! Durable jobs through the real CLI: `routilux run --durable DIR` killed with SIGKILL at
//! random moments and resumed with `--resume`, with real WebAssembly routines (a fan-out, a
//! chain, a fan-in with `batch_size`, a retrying routine, a trapping one). After every kill an
//! invariant check reads the store (`routilux job DIR --json`) and compares it with what was
//! acknowledged: every input line the store counts as read is, on each of the flow's five
//! paths, in exactly one place (queued somewhere along the path, counted once by the path's
//! sink, or dead-lettered on it); no line past it is anywhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cli::{FAILED, OK, USAGE, cache_dir, routilux, scratch};
use crate::plugins::plugin_dir;

/// The five paths from the source to a sink: (the routines along it after `src`, its sink,
/// whether bad items are dead-lettered on it).
const PATHS: [(&[&str], &str, bool); 5] = [
    (&["a_sink"], "a_sink", false),
    (&["chain1", "chain2", "b_sink"], "b_sink", false),
    (&["fan_in"], "fan_in", false),
    (&["retrying", "d_sink"], "d_sink", true),
    (&["trapping", "e_sink"], "e_sink", true),
];

const FLOW: &str = "\
flow_id: crash
plugins: PLUGINS
routines:
  src: {plugin: fixtures, kind: echo, max_queue_length: {in: 8}}
  a_sink: {plugin: fixtures, kind: tally}
  chain1: {plugin: fixtures, kind: echo}
  chain2: {plugin: fixtures, kind: echo}
  b_sink: {plugin: fixtures, kind: tally}
  fan_in: {plugin: fixtures, kind: tally, policy: {batch_size: 10}}
  retrying:
    plugin: fixtures
    kind: fails
    policy: {batch_size: 1}
    on_error: {retry: {max: 2, delay: 5ms, then: continue}}
  d_sink: {plugin: fixtures, kind: tally}
  trapping: {plugin: fixtures, kind: unreachable, policy: {batch_size: 1}, on_error: continue}
  e_sink: {plugin: fixtures, kind: tally}
connections:
  - {from: src.out, to: a_sink.in}
  - {from: src.out, to: chain1.in}
  - {from: chain1.out, to: chain2.in}
  - {from: chain2.out, to: b_sink.in}
  - {from: src.out, to: fan_in.in}
  - {from: src.out, to: retrying.in}
  - {from: retrying.out, to: d_sink.in}
  - {from: src.out, to: trapping.in}
  - {from: trapping.out, to: e_sink.in}
";

fn bad(id: u64) -> bool {
    id % 37 == 3
}

fn write_case(dir: &Path, lines: u64) -> (String, String) {
    let flow = dir.join("crash.yaml");
    std::fs::write(
        &flow,
        FLOW.replace("PLUGINS", &plugin_dir().display().to_string()),
    )
    .unwrap();
    let input = dir.join("in.jsonl");
    let text: String = (0..lines)
        .map(|id| format!("{{\"id\":{id},\"bad\":{}}}\n", bad(id)))
        .collect();
    std::fs::write(&input, text).unwrap();
    (flow.display().to_string(), input.display().to_string())
}

/// What a store holds, by id: where each id is on each path.
struct Snapshot {
    status: Option<String>,
    /// Lines acknowledged (committed as read).
    acked: u64,
    /// (routine, id) → items of that id queued in the routine's slots.
    queued: BTreeMap<(String, u64), u64>,
    /// (sink, id) → the sink's count of it.
    seen: BTreeMap<(String, u64), i64>,
    /// (routine, id) → dead letters holding it.
    dead: BTreeMap<(String, u64), u64>,
}

fn snapshot(store: &Path) -> Snapshot {
    let r = routilux(&["job", &store.display().to_string(), "--json"]);
    assert_eq!(r.code, OK, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let mut s = Snapshot {
        status: v["status"].as_str().map(str::to_owned),
        acked: v["inputs"]["input.0.lines"].as_u64().unwrap_or(0),
        queued: BTreeMap::new(),
        seen: BTreeMap::new(),
        dead: BTreeMap::new(),
    };
    for q in v["queued"].as_array().unwrap() {
        let id = q["item"]["id"].as_u64().unwrap();
        let at = q["routine"].as_str().unwrap().to_owned();
        *s.queued.entry((at, id)).or_default() += 1;
    }
    for st in v["state"].as_array().unwrap() {
        let key = st["key"].as_str().unwrap();
        let id: u64 = key.strip_prefix("seen.").unwrap().parse().unwrap();
        let at = st["routine"].as_str().unwrap().to_owned();
        s.seen.insert((at, id), st["value"].as_i64().unwrap());
    }
    for d in v["dead_letters"].as_array().unwrap() {
        let at = d["routine"].as_str().unwrap().to_owned();
        for items in d["items"].as_object().unwrap().values() {
            for item in items.as_array().unwrap() {
                let id = item["id"].as_u64().unwrap();
                *s.dead.entry((at.clone(), id)).or_default() += 1;
            }
        }
    }
    s
}

/// The invariant, checked after every kill; returns the number of (id, path) placements.
fn check(s: &Snapshot, lines: u64, round: usize) -> u64 {
    let mut placed = 0;
    for id in 0..lines {
        let at_src = s.queued.get(&("src".into(), id)).copied().unwrap_or(0);
        for (along, sink, dead_letters_bad) in PATHS {
            let queued: u64 = along
                .iter()
                .map(|r| s.queued.get(&(r.to_string(), id)).copied().unwrap_or(0))
                .sum();
            let seen = s.seen.get(&(sink.to_string(), id)).copied().unwrap_or(0);
            assert!(
                (0..=1).contains(&seen),
                "round {round}: {sink} counted id {id} {seen} times"
            );
            let dead: u64 = along
                .iter()
                .map(|r| s.dead.get(&(r.to_string(), id)).copied().unwrap_or(0))
                .sum();
            if dead > 0 {
                assert!(
                    dead_letters_bad && bad(id),
                    "round {round}: id {id} dead-lettered on the path to {sink}"
                );
            }
            let total = at_src + queued + seen as u64 + dead;
            if id < s.acked {
                assert_eq!(
                    total, 1,
                    "round {round}: acknowledged id {id} is in {total} places on the path to \
                     {sink} (queued at src {at_src}, along the path {queued}, counted {seen}, \
                     dead-lettered {dead})"
                );
                placed += 1;
            } else {
                assert_eq!(
                    total, 0,
                    "round {round}: id {id}, past the {} lines acknowledged, is in the store",
                    s.acked
                );
            }
        }
    }
    placed
}

/// Where a kill landed, from whether the run resumed a store and what it had written to
/// stderr before it (the "resuming" line comes once recovery is done).
fn landed(resuming: bool, stderr: &str) -> &'static str {
    match (resuming, stderr.contains("resuming the job")) {
        (false, _) => "in a first run",
        (true, false) => "while starting or recovering",
        (true, true) => "while running a resumed job",
    }
}

/// Runs the crash case in `store` to the end and checks it completed exactly.
fn finish(flow: &str, input: &str, store: &Path, lines: u64) -> u64 {
    let store_arg = store.display().to_string();
    let args = [
        "run",
        flow,
        "--input",
        input,
        "--durable",
        &store_arg,
        "--resume",
        "--threads",
        "2",
    ];
    let r = routilux(&args);
    assert!(
        r.code == OK || (r.code == USAGE && r.stderr.contains("has completed")),
        "{r:?}"
    );
    let s = snapshot(store);
    assert_eq!(s.status.as_deref(), Some("completed"));
    assert_eq!(s.acked, lines, "every line was read in the end");
    let placed = check(&s, lines, usize::MAX);
    // Completed: nothing is queued but the fan-in's last partial batch.
    let leftover: u64 = s.queued.values().sum();
    assert_eq!(leftover, lines % 10, "{:?}", s.queued);
    for id in 0..lines {
        for (_, sink, dead_letters_bad) in PATHS {
            let seen = s.seen.get(&(sink.to_string(), id)).copied().unwrap_or(0);
            let expect = if dead_letters_bad && bad(id) {
                0
            } else if sink == "fan_in" && id >= lines - lines % 10 {
                // Possibly in the last partial batch (still queued, checked above).
                seen
            } else {
                1
            };
            assert_eq!(seen, expect, "{sink} counted id {id} {seen} times");
        }
    }
    placed
}

#[test]
fn a_durable_run_survives_kill_9_at_random_moments_and_resumes_exactly() {
    let kills_wanted: u64 = std::env::var("ROUTILUX_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let lines: u64 = 3005;
    let dir = scratch();
    let (flow, input) = write_case(dir.path(), lines);
    let mut rng = fastrand::Rng::with_seed(
        std::env::var("ROUTILUX_CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x5eed),
    );
    let mut places: BTreeMap<&str, u64> = BTreeMap::new();
    let mut acked_at_kill = Vec::new();
    let (mut kills, mut ended, mut generations, mut placed) = (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    // Each generation is one job in a store of its own, killed until it completes.
    while kills < kills_wanted {
        generations += 1;
        let store = dir.path().join(format!("job-{generations}"));
        let store_arg = store.display().to_string();
        for round in 0.. {
            if kills >= kills_wanted {
                break;
            }
            let mut args = vec![
                "run",
                &flow,
                "--input",
                &input,
                "--durable",
                &store_arg,
                "--threads",
                "2",
            ];
            let resuming = store.join("job.redb").exists();
            if resuming {
                args.push("--resume");
            }
            let mut child = Command::new(env!("CARGO_BIN_EXE_routilux"))
                .args(&args)
                .env("ROUTILUX_CACHE_DIR", cache_dir())
                .env_remove("CARGO_TARGET_DIR")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let err = super::cli::read_all(child.stderr.take().unwrap());
            // Early kills land in start-up and recovery; later ones mid-run.
            let wait = Duration::from_millis(rng.u64(0..=1500));
            let deadline = Instant::now() + wait;
            let mut exited = None;
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    exited = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            match exited {
                Some(status) => {
                    let stderr = err.join().unwrap();
                    // It finished before the kill: the job is complete.
                    ended += 1;
                    assert_eq!(status.code(), Some(OK), "{stderr}");
                    break;
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    kills += 1;
                    let stderr = err.join().unwrap();
                    *places.entry(landed(resuming, &stderr)).or_default() += 1;
                    if store.join("job.redb").exists() {
                        let s = snapshot(&store);
                        check(&s, lines, round);
                        acked_at_kill.push(s.acked);
                        if s.status.as_deref() == Some("completed") {
                            break;
                        }
                    }
                }
            }
        }
        placed += finish(&flow, &input, &store, lines);
    }
    eprintln!(
        "crash test: {kills} kills ({places:?}) over {generations} jobs of {lines} lines, \
         {ended} runs ended by themselves; at the end {placed} (line, path) placements checked, \
         0 lost, 0 twice; {:.1} s; lines acknowledged at each kill: {acked_at_kill:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(kills > 0, "no run was killed");
}

#[test]
fn resume_refuses_a_changed_flow_plugin_or_input_and_says_what_changed() {
    let dir = scratch();
    let (flow, input) = write_case(dir.path(), 40);
    let store = dir.path().join("job").display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", &flow, "--input", &input, "--durable", &store, "-q"];
        args.extend_from_slice(extra);
        routilux(&args)
    };
    let r = run(&["--resume"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("holds no durable job to resume"), "{r:?}");
    let r = run(&[]);
    assert_eq!(r.code, OK, "{r:?}");
    let r = run(&[]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(
        r.stderr
            .contains("already holds a durable job: add --resume"),
        "{r:?}"
    );
    let r = run(&["--resume"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(
        r.stderr
            .contains("has completed; there is nothing to resume"),
        "{r:?}"
    );
    // Another input: refused, naming it.
    let r = run(&["--resume", "--post", r#"{"id": 99}"#]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("started with 1 inputs"), "{r:?}");
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.push_str("{\"id\": 40}\n");
    std::fs::write(&input, text).unwrap();
    let r = run(&["--resume"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(
        r.stderr.contains("the input file") && r.stderr.contains("changed since the job started"),
        "{r:?}"
    );
    let mut text = std::fs::read_to_string(&flow).unwrap();
    text.push_str("# a comment\n");
    std::fs::write(&flow, text).unwrap();
    let r = run(&["--resume"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("the flow file"), "{r:?}");
    // What the store holds, for an operator.
    let r = routilux(&["job", &store]);
    assert_eq!(r.code, OK, "{r:?}");
    assert!(r.stdout.contains(": completed"), "{r:?}");
    assert!(r.stdout.contains("input input.0.lines: 40"), "{r:?}");
    assert!(r.stdout.contains("WorkerState of a_sink: 40 keys"), "{r:?}");
    let r = routilux(&["job", &dir.path().join("nothing").display().to_string()]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("holds no durable job"), "{r:?}");
    // A damaged store is not a bad command line: exit 1, naming the store.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    std::fs::write(damaged.join("job.redb"), vec![0x5a; 10_000]).unwrap();
    let damaged = damaged.display().to_string();
    let r = routilux(&[
        "run",
        &flow,
        "--input",
        &input,
        "--durable",
        &damaged,
        "--resume",
    ]);
    assert_eq!(r.code, FAILED, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("cannot open the job store in {damaged}")),
        "{r:?}"
    );
    assert!(!r.stderr.contains("panicked"), "{r:?}");
}

#[test]
fn sigusr1_pauses_a_run_a_kill_keeps_it_paused_and_sigusr2_resumes_it() {
    use std::io::{BufRead, BufReader};
    let lines = 3000;
    let dir = scratch();
    let (flow, input) = write_case(dir.path(), lines);
    let store = dir.path().join("job");
    let store_arg = store.display().to_string();
    let start = |resume: bool| {
        let mut args = vec![
            "run",
            &flow,
            "--input",
            &input,
            "--durable",
            &store_arg,
            "--threads",
            "2",
        ];
        if resume {
            args.push("--resume");
        }
        Command::new(env!("CARGO_BIN_EXE_routilux"))
            .args(&args)
            .env("ROUTILUX_CACHE_DIR", cache_dir())
            .env_remove("CARGO_TARGET_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let signal = |child: &std::process::Child, sig: &str| {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let wait_for = |err: &mut BufReader<std::process::ChildStderr>, what: &str| {
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap() == 0 {
                panic!("no `{what}` in:\n{seen}");
            }
            seen.push_str(&line);
            if line.contains(what) {
                return seen;
            }
        }
    };
    let mut child = start(false);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut err, "using ");
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "-USR1");
    wait_for(&mut err, "SIGUSR1: paused");
    // Paused: nothing more runs, and the job does not finish.
    std::thread::sleep(Duration::from_millis(300));
    let before = last_written(&store);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a paused job does not finish"
    );
    let after = last_written(&store);
    assert_eq!(before, after, "nothing was committed while paused");
    child.kill().unwrap();
    child.wait().unwrap();
    // Killed while paused: paused still after the restart.
    let mut child = start(true);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut err, "paused still");
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none());
    signal(&child, "-USR2");
    wait_for(&mut err, "SIGUSR2: resumed");
    let status = child.wait().unwrap();
    assert!(status.success());
    let s = snapshot(&store);
    assert_eq!(s.status.as_deref(), Some("completed"));
    check(&s, lines, 0);
}

/// When the store of a running job was last written (it is open in that process: every
/// commit writes the file), and its size.
fn last_written(store: &Path) -> (std::time::SystemTime, u64) {
    let m = std::fs::metadata(store.join("job.redb")).unwrap();
    (m.modified().unwrap(), m.len())
}

#[test]
fn sigterm_stops_a_paused_run_at_once() {
    use std::io::{BufRead, BufReader};
    let dir = scratch();
    let (flow, input) = write_case(dir.path(), 3000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args(["run", &flow, "--input", &input, "--threads", "2"])
        .env("ROUTILUX_CACHE_DIR", cache_dir())
        .env_remove("CARGO_TARGET_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut wait_for = |what: &str| loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("no `{what}` in:\n{seen}");
        }
        seen.push_str(&line);
        if line.contains(what) {
            break;
        }
    };
    wait_for("using ");
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        )
    };
    kill("-USR1");
    wait_for("SIGUSR1: paused");
    kill("-TERM");
    // The stop ends the pause: the run exits as a stopped one, without waiting for SIGUSR2.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("a paused run did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143));
}

/// A disk that fills up under a running durable job: a real full filesystem, a tmpfs of a
/// few KiB to a few MiB mounted (in a user and mount namespace of its own, `unshare -rm`, so no
/// privilege is needed) over the job's directory, so the store's writes fail with ENOSPC at
/// its creation, in the first commits, at checkpoints and later. Each run exits 1 with the
/// store's error (naming the directory and the cause) and nothing panics; a resume on the
/// still-full disk fails the same way; every acknowledged line is in exactly one place in the
/// store; and, copied to a disk with room, the job resumes (or, where no store was made,
/// starts) and finishes exactly.
#[test]
fn a_store_on_a_full_disk_fails_the_run_with_a_clear_error_and_loses_nothing() {
    let lines: u64 = 3005;
    let dir = scratch();
    let (flow, input) = write_case(dir.path(), lines);
    // The compiled-component cache is written first, on a disk with room.
    let warm = dir.path().join("warm").display().to_string();
    let r = routilux(&["run", &flow, "--input", &input, "--durable", &warm, "-q"]);
    assert_eq!(r.code, OK, "{r:?}");
    const SCRIPT: &str = r#"
        mount -t tmpfs -o "size=$SIZE" routilux-full "$MNT" || exit 90
        "$@" --durable "$MNT/job" >/dev/null; first=$?
        echo "-- resume" >&2
        [ -e "$MNT/job/job.redb" ] && resume=--resume || resume=
        "$@" --durable "$MNT/job" $resume >/dev/null; second=$?
        [ -e "$MNT/job/job.redb.new" ] && echo "half-made store left" >&2
        [ -e "$MNT/job/job.redb" ] && cp "$MNT/job/job.redb" "$OUT/"
        echo "$first $second"
    "#;
    let mut outcomes = Vec::new();
    for size in ["16k", "64k", "160k", "400k", "1m", "2500k", "8m"] {
        let mnt = dir.path().join(format!("mnt-{size}"));
        let store = dir.path().join(format!("job-{size}"));
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(&store).unwrap();
        let out = Command::new("unshare")
            .args(["-rm", "bash", "-c", SCRIPT, "full-disk"])
            .arg(env!("CARGO_BIN_EXE_routilux"))
            .args(["run", &flow, "--input", &input, "--threads", "2", "-q"])
            .env("SIZE", size)
            .env("MNT", &mnt)
            .env("OUT", &store)
            .env("ROUTILUX_CACHE_DIR", cache_dir())
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .expect("run unshare (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(90),
            "cannot mount a tmpfs in a user namespace (`unshare -rm`): {stderr}"
        );
        assert!(out.status.success(), "{size}: {out:?}");
        let codes = String::from_utf8_lossy(&out.stdout);
        let codes: Vec<i32> = codes
            .split_whitespace()
            .map(|c| c.parse().unwrap())
            .collect();
        assert!(!stderr.contains("panicked"), "{size}: {stderr}");
        assert!(!stderr.contains("half-made"), "{size}: {stderr}");
        let shown = mnt.join("job").display().to_string();
        let made = store.join("job.redb").exists();
        let outcome = match codes[..] {
            [OK, _] => "fitted".to_owned(),
            [FAILED, again] => {
                // The still-full disk fails the resume (or the new run) too.
                assert_eq!(again, FAILED, "{size}: {stderr}");
                for run in stderr.split("-- resume") {
                    assert!(
                        run.contains(&format!("job store in {shown}"))
                            && run.contains("No space left on device"),
                        "{size}: the error names neither the store nor the cause:\n{run}"
                    );
                }
                let acked = if made {
                    let s = snapshot(&store);
                    check(&s, lines, 0);
                    s.acked
                } else {
                    0
                };
                format!("failed with {acked} lines acknowledged")
            }
            _ => panic!("{size}: exit codes {codes:?}: {stderr}"),
        };
        if !made {
            let store = store.display().to_string();
            let r = routilux(&["run", &flow, "--input", &input, "--durable", &store, "-q"]);
            assert_eq!(r.code, OK, "{size}: {r:?}");
        }
        finish(&flow, &input, &store, lines);
        outcomes.push((size, outcome));
    }
    eprintln!("a store on a full disk (tmpfs size, outcome): {outcomes:?}");
    assert!(
        outcomes
            .iter()
            .filter(|(_, o)| o.starts_with("failed"))
            .count()
            >= 3,
        "too few sizes made the store fail: {outcomes:?}"
    );
}

/// A durable run's memory is flat: the store's log is folded into its tables at checkpoints
/// (every 64 groups or 4 MiB of log, the only operations the writer keeps in memory) and
/// redb's cache is capped at 32 MiB, so the host's peak resident memory (`peak_rss_bytes`,
/// read from /proc by the process) of a 4x longer input grows by no more than noise, and
/// durability adds a bounded amount over the same run in memory.
#[test]
fn a_durable_runs_peak_memory_does_not_grow_with_its_input() {
    const MIB: u64 = 1 << 20;
    let dir = scratch();
    let flow = dir.path().join("fan.yaml");
    std::fs::write(
        &flow,
        format!(
            "flow_id: fan\nplugins: {}\nroutines:\n  src: {{plugin: fixtures, kind: echo}}\n  \
             a: {{plugin: fixtures, kind: echo}}\n  b: {{plugin: fixtures, kind: echo}}\n  \
             c: {{plugin: fixtures, kind: echo}}\nconnections:\n  - {{from: src.out, to: a.in}}\n  \
             - {{from: src.out, to: b.in}}\n  - {{from: src.out, to: c.in}}\n",
            plugin_dir().display()
        ),
    )
    .unwrap();
    let flow = flow.display().to_string();
    let peak = |lines: u64, durable: bool| {
        let input = dir.path().join(format!("in-{lines}.jsonl"));
        if !input.exists() {
            let text: String = (0..lines)
                .map(|id| format!("{{\"id\":{id},\"payload\":\"{:064}\"}}\n", id))
                .collect();
            std::fs::write(&input, text).unwrap();
        }
        let store = dir.path().join(format!("job-{lines}-{durable}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_routilux"));
        cmd.args(["run", &flow, "--input"])
            .arg(&input)
            .args(["--json", "--threads", "2"]);
        if durable {
            cmd.arg("--durable").arg(&store);
        }
        let out = cmd
            .env("ROUTILUX_CACHE_DIR", cache_dir())
            .env_remove("CARGO_TARGET_DIR")
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(OK), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["routines"]["a"]["processed"], lines, "{v}");
        v["peak_rss_bytes"].as_u64().unwrap()
    };
    let short = peak(20_000, true);
    let long = peak(80_000, true);
    let in_memory = peak(80_000, false);
    let mib = |b: u64| b as f64 / MIB as f64;
    eprintln!(
        "peak RSS: durable, 20k lines {:.1} MiB; durable, 80k lines {:.1} MiB; in memory, 80k \
         lines {:.1} MiB",
        mib(short),
        mib(long),
        mib(in_memory)
    );
    assert!(
        long < short + 16 * MIB,
        "a durable run's memory grows with its input: {:.1} MiB for 20k lines, {:.1} MiB for 80k",
        mib(short),
        mib(long)
    );
    assert!(
        long < in_memory + 48 * MIB,
        "durability costs more memory than its cache and log: {:.1} MiB against {:.1} in memory",
        mib(long),
        mib(in_memory)
    );
}
