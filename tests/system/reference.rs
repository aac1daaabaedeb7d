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
