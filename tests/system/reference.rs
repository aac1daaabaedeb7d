//! The reference page (`docs/reference/fan-out.rst`), exactly: its three example flows, run by
//! the real CLI, print the page's "Expected Output" lines. Order across routines is free (they
//! run in parallel); each routine's own lines, in order, are the page's lines for it.

use std::collections::BTreeMap;

use crate::cli::{OK, Run, routilux, scratch};
use crate::plugins::repo_root;

/// The page's "Expected Output" blocks, in page order, each as its lines.
pub(crate) fn expected_outputs() -> Vec<Vec<String>> {
    let page = std::fs::read_to_string(repo_root().join("docs/reference/fan-out.rst"))
        .expect("docs/reference/fan-out.rst");
    let lines: Vec<&str> = page.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with("**Expected Output") {
            // The next `.. code-block:: text`, then its indented lines.
            while !lines[i].starts_with(".. code-block::") {
                i += 1;
            }
            i += 1;
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].is_empty() || lines[i].starts_with("   ")) {
                if !lines[i].is_empty() {
                    block.push(lines[i][3..].to_string());
                }
                i += 1;
            }
            blocks.push(block);
        }
        i += 1;
    }
    assert_eq!(blocks.len(), 3, "the page has three expected outputs");
    blocks
}

/// Who printed a line of the page's output: the `[Label]` of an indented line, else the text
/// before the first `:` (`Broadcasting`, `Producer`, `Router`).
fn speaker(line: &str) -> String {
    let trimmed = line.trim_start();
    if let Some(rest) = trimmed.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    trimmed.split(':').next().unwrap_or_default().to_string()
}

/// Lines grouped by speaker, each group in order; `normalise` rewrites a line first.
pub(crate) fn by_speaker(
    lines: impl IntoIterator<Item = String>,
    normalise: impl Fn(&str) -> String,
) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        let line = normalise(&line);
        groups.entry(speaker(&line)).or_default().push(line);
    }
    groups
}

/// The log line's timestamp replaced by `TIMESTAMP`, after checking that it is an ISO 8601
/// date and time as Python's `isoformat()` prints it (`2024-01-01T10:00:00[.ffffff]`).
pub(crate) fn timestamp_checked(line: &str) -> String {
    let Some((head, rest)) = line.split_once("Logged: ") else {
        return line.to_string();
    };
    let (stamp, tail) = rest.split_once(" - ").expect("`TIMESTAMP - headline`");
    let b = stamp.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    assert!(
        b.len() >= 19
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10)
            && b[10] == b'T'
            && digits(11..13)
            && b[13] == b':'
            && digits(14..16)
            && b[16] == b':'
            && digits(17..19)
            && (b.len() == 19 || (b[19] == b'.' && b.len() == 26 && digits(20..26))),
        "not an ISO timestamp: {stamp:?} in {line:?}"
    );
    format!("{head}Logged: TIMESTAMP - {tail}")
}

/// Checks that `run`'s stdout holds exactly the page's `expected` lines, per speaker in order.
pub(crate) fn assert_prints_the_page(run: &Run, expected: &[String]) {
    assert_eq!(run.code, OK, "{run:?}");
    let want = by_speaker(expected.iter().cloned(), timestamp_checked);
    let got = by_speaker(run.stdout.lines().map(str::to_string), timestamp_checked);
    assert_eq!(got, want, "{run:?}");
}

#[test]
fn news_fanout_prints_the_pages_expected_output() {
    let page = expected_outputs();
    let r = routilux(&["run", "examples/news_fanout.yaml"]);
    assert_prints_the_page(&r, &page[0]);
    // The SMS line is cut to 50 characters (in characters, not bytes), as the page's code does.
    let post = r#"{"headline": "ééééééééééééééééééééééééééééééééééééééééééééééééééééééé"}"#;
    let r = routilux(&["run", "examples/news_fanout.yaml", "--post", post]);
    assert_eq!(r.code, OK, "{r:?}");
    let sms: Vec<&str> = r.stdout.lines().filter(|l| l.contains("[SMS")).collect();
    assert_eq!(
        sms,
        [format!(
            "  [SMS Service] Would send SMS: {}...",
            "é".repeat(50)
        )],
        "{r:?}"
    );
    // The same headlines from a file, one per line, print the same.
    let r = routilux(&[
        "run",
        "examples/news_fanout.yaml",
        "--input",
        "examples/news_headlines.jsonl",
    ]);
    assert_prints_the_page(&r, &page[0]);
}

#[test]
fn image_pipeline_prints_the_pages_output_and_its_processors_overlap() {
    let page = expected_outputs();
    let r = routilux(&["run", "examples/image_pipeline.yaml"]);
    assert_prints_the_page(&r, &page[1]);

    // The processors' own start and end times (reported in their logs when asked): for every
    // image, the three processors were working on it at the same moment.
    let dir = scratch();
    let text = std::fs::read_to_string(repo_root().join("examples/image_pipeline.yaml"))
        .unwrap()
        .replace(
            "../plugins",
            &repo_root().join("plugins").display().to_string(),
        );
    let mut with_times = String::new();
    for line in text.lines() {
        with_times.push_str(line);
        with_times.push('\n');
        if let Some(kind) = line.strip_prefix("    kind: ")
            && kind != "producer"
        {
            with_times.push_str("    config: {report_times: true}\n");
        }
    }
    let flow = dir.path().join("images.yaml");
    std::fs::write(&flow, with_times).unwrap();
    let r = routilux(&["run", &flow.display().to_string()]);
    assert_prints_the_page(&r, &page[1]);
    let mut spans: BTreeMap<u64, Vec<(String, u128, u128)>> = BTreeMap::new();
    for line in r.stderr.lines() {
        // `[resize] info: image 0 STARTED FINISHED`
        let Some((routine, rest)) = line
            .strip_prefix('[')
            .and_then(|l| l.split_once("] info: "))
        else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let [_, id, start, end] = f[..] else {
            panic!("{line:?}")
        };
        spans.entry(id.parse().unwrap()).or_default().push((
            routine.to_string(),
            start.parse().unwrap(),
            end.parse().unwrap(),
        ));
    }
    assert_eq!(spans.len(), 3, "{r:?}");
    // The first image reaches the three at once: all three work on it at the same moment.
    let first = &spans[&0];
    assert_eq!(first.len(), 3, "{first:?}");
    let latest_start = first.iter().map(|x| x.1).max().unwrap();
    let earliest_end = first.iter().map(|x| x.2).min().unwrap();
    assert!(
        latest_start < earliest_end,
        "image 0: the processors did not overlap: {first:?}"
    );
    // All nine pieces of work together took about the slowest processor's time, not the sum
    // of all (which one worker running them in turn would take): the time some processor was
    // at work is well under the sum of their work.
    let mut all: Vec<(u128, u128)> = spans.values().flatten().map(|x| (x.1, x.2)).collect();
    assert_eq!(all.len(), 9, "{spans:?}");
    let sum: u128 = all.iter().map(|(s, e)| e - s).sum();
    all.sort();
    let (mut busy, mut until) = (0, 0);
    for (s, e) in all {
        let s = s.max(until);
        if e > s {
            busy += e - s;
            until = e;
        }
    }
    assert!(
        busy * 4 < sum * 3,
        "the processors ran one after another ({busy} µs busy of {sum} µs of work): {spans:?}"
    );
}

#[test]
fn priority_routing_prints_the_pages_output() {
    let page = expected_outputs();
    let r = routilux(&["run", "examples/priority_routing.yaml"]);
    assert_prints_the_page(&r, &page[2]);
    let r = routilux(&[
        "run",
        "examples/priority_routing.yaml",
        "--input",
        "examples/priority_tasks.jsonl",
    ]);
    assert_prints_the_page(&r, &page[2]);
    // Items print as Python prints a dict, strings and all.
    let r = routilux(&[
        "run",
        "examples/priority_routing.yaml",
        "--post",
        r#"{"id": "it's", "priority": 8.5, "tags": [true, null]}"#,
    ]);
    assert_eq!(r.code, OK, "{r:?}");
    assert!(
        r.stdout.contains(
            "  [HIGH] Processing: {'id': \"it's\", 'priority': 8.5, 'tags': [True, None]}"
        ),
        "{r:?}"
    );
}

/// The routine classes of the page's three examples as one `plugin.py`: each example's code
/// pasted unchanged up to where it builds its flow, with only the import lines adjusted (a
/// plugin imports `Routine` and the policy helpers; `Flow`, `Runtime` and `FlowRegistry` are
/// the flow file's business). `fix_typo` corrects the page's `slot_list` to `slot_data`.
pub(crate) fn page_classes(fix_typo: bool) -> String {
    let page = std::fs::read_to_string(repo_root().join("docs/reference/fan-out.rst")).unwrap();
    let lines: Vec<&str> = page.lines().collect();
    let mut out: Vec<String> = Vec::new();
    let mut imports: Vec<String> = Vec::new();
    let mut examples = 0;
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with(".. code-block:: python") {
            i += 1;
            continue;
        }
        i += 1;
        while i < lines.len() && lines[i].starts_with("   :") {
            i += 1;
        }
        let mut block = Vec::new();
        while i < lines.len() && (lines[i].is_empty() || lines[i].starts_with("   ")) {
            block.push(lines[i].get(3..).unwrap_or_default());
            i += 1;
        }
        if !block.iter().any(|l| l.starts_with("flow = Flow(")) {
            continue; // a snippet, not one of the three examples
        }
        examples += 1;
        for line in block {
            if line.starts_with("# Build") {
                break;
            }
            if line.starts_with("from ") || line.starts_with("import ") {
                let adjusted = match line {
                    "from routilux import Routine, Flow, Runtime" => "from routilux import Routine",
                    "from routilux.monitoring.flow_registry import FlowRegistry" => continue,
                    other => other,
                };
                if !imports.iter().any(|l| l == adjusted) {
                    imports.push(adjusted.to_owned());
                    out.push(adjusted.to_owned());
                }
                continue;
            }
            out.push(line.to_owned());
        }
    }
    assert_eq!(examples, 3, "the page has three example flows");
    let text = out.join("\n").trim_end().to_owned() + "\n";
    if fix_typo {
        text.replace("slot_list.get(", "slot_data.get(")
    } else {
        text
    }
}

/// Runs one of `examples/python/` (the page's classes in `plugins/reference-py`).
fn run_python_example(name: &str, extra: &[&str]) -> Run {
    let flow = format!("examples/python/{name}.yaml");
    let mut args = vec!["run", flow.as_str()];
    args.extend_from_slice(extra);
    routilux(&args)
}

#[test]
fn the_pages_python_classes_pasted_unchanged_print_the_pages_lines() {
    // The committed plugin is the page's classes, imports adjusted and the typo fixed.
    let committed =
        std::fs::read_to_string(repo_root().join("plugins/reference-py/plugin.py")).unwrap();
    assert!(
        committed.ends_with(&page_classes(true)),
        "plugins/reference-py/plugin.py is not the page's classes"
    );
    crate::plugins::guest_plugin("reference-py");
    let page = expected_outputs();

    // The first run compiles the component (seconds for a Python one): that is not the job's
    // time, so a short timeout still lets the job run.
    let dir = scratch();
    let cache = dir.path().join("cache");
    let r = crate::cli::routilux_in(
        &repo_root(),
        &["run", "examples/python/news_fanout.yaml", "--timeout", "3s"],
        &cache,
        &[],
    );
    assert!(r.stderr.contains("compiled now"), "{r:?}");
    assert_prints_the_page(&r, &page[0]);

    assert_prints_the_page(&run_python_example("image_pipeline", &[]), &page[1]);

    // The router prints the page's lines. Its processors print what the page's code prints:
    // the item they were sent, `{'data': item}` (the page's expected output shows the inner
    // item, which its own code does not print).
    let r = run_python_example("priority_routing", &[]);
    assert_eq!(r.code, OK, "{r:?}");
    let got = by_speaker(r.stdout.lines().map(str::to_string), str::to_string);
    let want = by_speaker(page[2].iter().cloned(), str::to_string);
    assert_eq!(got["Router"], want["Router"], "{r:?}");
    for level in ["HIGH", "NORMAL", "LOW"] {
        let wrapped: Vec<String> = want[level]
            .iter()
            .map(|l| {
                let (head, item) = l.split_once("Processing: ").unwrap();
                format!("{head}Processing: {{'data': {item}}}")
            })
            .collect();
        assert_eq!(got[level], wrapped, "{r:?}");
    }
}

#[test]
fn the_pages_sms_subscriber_verbatim_fails_with_a_name_error_at_its_line() {
    let dir = scratch();
    let project = dir.path().join("verbatim");
    std::fs::create_dir_all(&project).unwrap();
    let source = page_classes(false);
    std::fs::write(project.join("plugin.py"), &source).unwrap();
    let r = routilux(&["build", &project.display().to_string()]);
    assert_eq!(r.code, OK, "{r:?}");
    let line = source
        .lines()
        .position(|l| l.contains("slot_list"))
        .expect("the page's typo")
        + 1;
    let flow = dir.path().join("flow.yaml");
    let text = std::fs::read_to_string(repo_root().join("examples/python/news_fanout.yaml"))
        .unwrap()
        .replace("../../plugins/reference-py", &project.display().to_string())
        .replace("reference-py", "verbatim");
    std::fs::write(&flow, text).unwrap();
    let r = routilux(&["run", &flow.display().to_string(), "--json"]);
    assert_eq!(r.code, OK, "on_error: continue keeps the job going: {r:?}");
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["routines"]["sms"]["errors"], 3, "{r:?}");
    let error = report["errors"][0]["error"].as_str().unwrap_or_default();
    assert_eq!(report["errors"][0]["routine"], "sms", "{r:?}");
    assert!(
        error.contains(&format!(
            "NameError: name 'slot_list' is not defined (plugin.py:{line})"
        )),
        "{error}: {r:?}"
    );
    // Its siblings print every line the page gives them.
    let page = expected_outputs();
    let want = by_speaker(page[0].iter().cloned(), timestamp_checked);
    // With --json, routine output is on stderr as `[routine] stdout: LINE`.
    let printed = r
        .stderr
        .lines()
        .filter_map(|l| l.split_once("] stdout: ").map(|(_, t)| t.to_string()));
    let got = by_speaker(printed, timestamp_checked);
    for who in ["Broadcasting", "Email Service", "Log Service"] {
        assert_eq!(got[who], want[who], "{who}: {r:?}");
    }
    assert!(!got.contains_key("SMS Service"), "{r:?}");
    for routine in ["broadcaster", "email", "log"] {
        assert_eq!(report["routines"][routine]["errors"], 0, "{routine}: {r:?}");
    }
}
