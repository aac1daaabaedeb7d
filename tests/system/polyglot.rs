//! Routines in Python, JavaScript and C next to Rust ones: the same WIT, the same sandbox, the
//! same behaviour, through the real CLI. The guest toolchains are installed by the builder on
//! first use (componentize-py from PyPI, componentize-qjs from npm; C needs clang and
//! wasi-libc, which `.ci/run` installs).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cli::{FAILED, OK, cache_dir, lines, routilux, routilux_in, scratch};
use crate::plugins::{guest_plugin, plugin_dir, repo_root};

const HEADLINES: [&str; 3] = [
    "Breaking: four languages, one host",
    "Python, JavaScript and C subscribers each get every headline",
    "Sandboxes hold: a trap stays in its routine",
];

/// Writes `flow.yaml` in `dir` with the Python, JavaScript and C plugin projects as its plugin
/// directories; `body` is the rest of the flow (routines, connections). Returns its path.
fn guest_flow(dir: &Path, flow_id: &str, body: &str) -> String {
    let plugins = repo_root().join("plugins");
    let path = dir.join("flow.yaml");
    let head = format!(
        "flow_id: {flow_id}\nplugins: [{0}/news-py, {0}/news-js, {0}/news-c]\n",
        plugins.display()
    );
    std::fs::write(&path, head + body).unwrap();
    path.display().to_string()
}

/// What `routine` printed after `label` (with `--json`, routine output is on stderr).
fn printed<'a>(stderr: &'a str, routine: &str, label: &str) -> Vec<&'a str> {
    let prefix = format!("[{routine}] stdout: {label} ");
    lines(stderr, &prefix)
        .into_iter()
        .map(|l| &l[prefix.len()..])
        .collect()
}

fn build_all() {
    plugin_dir();
    for name in ["news-py", "news-js", "news-c"] {
        guest_plugin(name);
    }
}

#[test]
fn four_languages_fan_out_and_each_subscriber_prints_every_headline() {
    build_all();
    let r = routilux(&["run", "examples/polyglot_fanout.yaml", "--json"]);
    assert_eq!(r.code, OK, "{r:?}");
    // --json: routine output goes to stderr, tagged with the routine.
    for (routine, label) in [
        ("rust", "  [Email Service] Would send email:"),
        ("python", "[PY]"),
        ("javascript", "[JS]"),
        ("c", "[C]"),
    ] {
        assert_eq!(
            printed(&r.stderr, routine, label),
            HEADLINES,
            "{routine}: {r:?}"
        );
    }
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["status"], "completed", "{r:?}");
    for routine in ["rust", "python", "javascript", "c"] {
        assert_eq!(
            report["routines"][routine]["items_in"], 3,
            "{routine}: {r:?}"
        );
        assert_eq!(report["routines"][routine]["errors"], 0, "{routine}: {r:?}");
    }
    // A second start takes all four components, Python's and JavaScript's too, from the
    // compiled cache.
    let r = routilux(&["run", "examples/polyglot_fanout.yaml", "--json"]);
    assert_eq!(r.code, OK, "{r:?}");
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let components = report["components"].as_array().unwrap();
    assert_eq!(components.len(), 4, "{r:?}");
    for c in components {
        assert_eq!(c["from_cache"], true, "{c}: {r:?}");
    }
}

#[test]
fn a_trap_in_the_python_subscriber_leaves_the_others_running() {
    build_all();
    let dir = scratch();
    let text = std::fs::read_to_string(repo_root().join("examples/polyglot_fanout.yaml"))
        .unwrap()
        .replace(
            "../plugins",
            &repo_root().join("plugins").display().to_string(),
        )
        .replace(
            "    plugin: news-py\n    kind: subscriber\n",
            "    plugin: news-py\n    kind: subscriber\n    config: {trap_on: \"TRAP\"}\n    \
             policy: {batch_size: 1}\n",
        );
    let flow = dir.path().join("flow.yaml");
    std::fs::write(&flow, text).unwrap();
    let post = r#"{"headlines": ["one", "TRAP two", "three"]}"#;
    let r = routilux(&["run", &flow.display().to_string(), "--post", post, "--json"]);
    assert_eq!(r.code, OK, "on_error: continue keeps the job going: {r:?}");
    for (routine, label, expected) in [
        (
            "rust",
            "  [Email Service] Would send email:",
            vec!["one", "TRAP two", "three"],
        ),
        ("javascript", "[JS]", vec!["one", "TRAP two", "three"]),
        ("c", "[C]", vec!["one", "TRAP two", "three"]),
        // The trapped instance is dropped; a fresh one serves the next headline.
        ("python", "[PY]", vec!["one", "three"]),
    ] {
        assert_eq!(
            printed(&r.stderr, routine, label),
            expected,
            "{routine}: {r:?}"
        );
    }
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let python = &report["routines"]["python"];
    assert_eq!(python["errors"], 1, "{r:?}");
    assert_eq!(python["dead_lettered"], 1, "{r:?}");
    let error = report["errors"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("news-py.wasm") && error.contains("unreachable"),
        "{r:?}"
    );
    for routine in ["rust", "javascript", "c"] {
        assert_eq!(report["routines"][routine]["errors"], 0, "{routine}: {r:?}");
    }
}

#[test]
fn an_exception_in_python_or_javascript_fails_the_activation_with_its_message() {
    build_all();
    let dir = scratch();
    let flow = guest_flow(
        dir.path(),
        "exceptions",
        "routines:\n  \
         py: {plugin: news-py, kind: subscriber, on_error: continue}\n  \
         js: {plugin: news-js, kind: subscriber, on_error: continue}\n  \
         c: {plugin: news-c, kind: subscriber, on_error: continue}\n",
    );
    // No `headline` field: each language reports it in its own way, none crashes the host.
    let r = routilux(&[
        "run",
        &flow,
        "--post",
        "py.news={\"title\": 1}",
        "--post",
        "js.news={\"title\": 1}",
        "--post",
        "c.news={\"title\": 1}",
        "--json",
    ]);
    assert_eq!(r.code, OK, "{r:?}");
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let messages: Vec<String> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}: {}", e["routine"], e["error"]))
        .collect();
    assert_eq!(messages.len(), 3, "{r:?}");
    let of = |routine: &str| {
        messages
            .iter()
            .find(|m| m.starts_with(&format!("\"{routine}\"")))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        of("py").contains("KeyError: 'headline' (plugin.py:"),
        "{messages:?}"
    );
    assert!(of("js").contains("undefined"), "{messages:?}");
    assert!(of("c").contains("has no string `headline`"), "{messages:?}");
    // The Python traceback reaches the job's output.
    assert!(r.stderr.contains("[py] stderr: Traceback"), "{r:?}");
}

#[test]
fn inspect_shows_the_same_kind_whatever_the_language() {
    build_all();
    let mut echoes = Vec::new();
    for component in [
        plugin_dir().join("news.wasm"),
        guest_plugin("news-py"),
        guest_plugin("news-js"),
        guest_plugin("news-c"),
    ] {
        let r = routilux(&["inspect", &component.display().to_string(), "--json"]);
        assert_eq!(r.code, OK, "{r:?}");
        let report: Value = serde_json::from_str(&r.stdout).unwrap();
        let echo = report["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == "echo")
            .cloned();
        echoes.push((component, echo.expect("an echo kind")));
    }
    for (component, echo) in &echoes[1..] {
        assert_eq!(
            echo,
            &echoes[0].1,
            "{} differs from news.wasm",
            component.display()
        );
    }
}

/// `routilux new NAME --lang L` in a scratch directory, `prepare(project)`, then `routilux run
/// flow.yaml --build --post '{"name": "Ada"}'` in it with `env`: it must print "Hello, Ada!".
/// Returns the scratch directory and the project.
pub(crate) fn new_plugin_builds_and_runs(
    lang: &str,
    name: &str,
    prepare: impl FnOnce(&Path),
    env: &[(&str, &str)],
) -> (tempfile::TempDir, PathBuf) {
    let dir = scratch();
    // `python:reference`: the language and the style.
    let (lang, style) = lang.split_once(':').unwrap_or((lang, "declarative"));
    let r = routilux(&[
        "new",
        name,
        "--lang",
        lang,
        "--style",
        style,
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert_eq!(r.code, OK, "{r:?}");
    let project = dir.path().join(name);
    prepare(&project);
    let r = routilux_in(
        &project,
        &[
            "run",
            "flow.yaml",
            "--build",
            "--post",
            r#"{"name": "Ada"}"#,
        ],
        &cache_dir(),
        env,
    );
    assert_eq!(r.code, OK, "{r:?}");
    assert_eq!(r.stdout.trim(), "Hello, Ada!", "{r:?}");
    (dir, project)
}

/// A Python, JavaScript or C scaffold runs first try, and `inspect` shows what it declares.
fn new_plugin_runs(lang: &str) {
    let name = format!("hello-{}", lang.replace(':', "-"));
    let (_dir, project) = new_plugin_builds_and_runs(lang, &name, |_| {}, &[]);
    // And what it emitted is what `inspect` says it emits.
    let r = routilux_in(
        &project,
        &["inspect", &format!("build/{name}.wasm"), "--json"],
        &cache_dir(),
        &[],
    );
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["kinds"][0]["name"], "greeter", "{r:?}");
    assert_eq!(report["kinds"][0]["slots"][0]["name"], "names", "{r:?}");
    assert_eq!(
        report["kinds"][0]["events"][0]["name"], "greetings",
        "{r:?}"
    );
    assert_eq!(
        report["kinds"][0]["events"][0]["fields"][0], "text",
        "{r:?}"
    );
    assert_eq!(
        report["kinds"][0]["default_config"]["greeting"], "Hello",
        "{r:?}"
    );
    assert_eq!(report["kinds"][0]["default_policy"], "immediate", "{r:?}");
}

#[test]
fn new_python_plugin_builds_and_runs_on_the_first_try() {
    new_plugin_runs("python");
}

#[test]
fn new_python_plugin_in_the_reference_style_builds_and_runs_on_the_first_try() {
    new_plugin_runs("python:reference");
    let r = routilux(&["new", "x", "--lang", "js", "--style", "reference"]);
    assert_eq!(r.code, crate::cli::USAGE, "{r:?}");
    assert!(r.stderr.contains("use it with `--lang python`"), "{r:?}");
}

#[test]
fn new_js_plugin_builds_and_runs_on_the_first_try() {
    new_plugin_runs("js");
}

#[test]
fn new_c_plugin_builds_and_runs_on_the_first_try() {
    new_plugin_runs("c");
}

#[test]
fn a_project_that_does_not_compile_names_the_tool_and_the_error() {
    let dir = scratch();
    let project = dir.path().join("broken-c");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("plugin.c"),
        "#include \"routilux.h\"\nstatic rx_status f(const rx_batch *in) { return nope; }\n",
    )
    .unwrap();
    let r = routilux(&["build", &project.display().to_string()]);
    assert_eq!(r.code, FAILED, "{r:?}");
    assert!(r.stderr.contains("compiling the C plugin"), "{r:?}");
    assert!(r.stderr.contains("plugin.c:2"), "{r:?}");

    let project = dir.path().join("broken-py");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("plugin.py"),
        "from routilux import Routine\nclass A(Routine:\n",
    )
    .unwrap();
    let r = routilux(&["build", &project.display().to_string()]);
    assert_eq!(r.code, FAILED, "{r:?}");
    assert!(r.stderr.contains("componentize-py"), "{r:?}");
    assert!(r.stderr.contains("plugin.py"), "{r:?}");
}

#[test]
fn non_ascii_text_crosses_every_language_unchanged() {
    build_all();
    let dir = scratch();
    // JavaScript and Python echo it on; Python, JavaScript and C print it. Every routine takes
    // three items at a time, so each guest gets a batch of several items in one array.
    let flow = guest_flow(
        dir.path(),
        "unicode",
        "routines:\n  \
         js_echo: {plugin: news-js, kind: echo, policy: {batch_size: 3}}\n  \
         py_echo: {plugin: news-py, kind: echo, policy: {batch_size: 3}}\n  \
         py: {plugin: news-py, kind: subscriber, policy: {batch_size: 3}}\n  \
         js: {plugin: news-js, kind: subscriber, policy: {batch_size: 3}}\n  \
         c: {plugin: news-c, kind: subscriber, policy: {batch_size: 3}}\nconnections:\n  \
         - {from: js_echo.out, to: py_echo.in}\n  - {from: py_echo.out, to: py.news}\n  \
         - {from: py_echo.out, to: js.news}\n  - {from: py_echo.out, to: c.news}\n",
    );
    let headlines = [
        "Grüße, € and 😀 — \\\"quoted\\\" \\u00e9",
        "[a, b], {\\\"c\\\": 1}",
        "plain",
    ];
    let mut args = vec!["run".to_owned(), flow];
    for h in headlines {
        args.push("--post".into());
        args.push(format!("js_echo.in={{\"headline\": \"{h}\"}}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = routilux(&args);
    assert_eq!(r.code, OK, "{r:?}");
    let expected = [
        "Grüße, € and 😀 — \"quoted\" é",
        "[a, b], {\"c\": 1}",
        "plain",
    ];
    for label in ["[PY]", "[JS]", "[C]"] {
        let want: Vec<String> = expected.iter().map(|e| format!("{label} {e}")).collect();
        assert_eq!(lines(&r.stdout, label), want, "{r:?}");
    }
}

#[test]
fn a_python_class_in_the_reference_style_declares_its_policy_and_uses_worker_state() {
    build_all();
    let dir = scratch();
    let run = |policy: &str, items: &[&str]| {
        let flow = guest_flow(
            dir.path(),
            "reference",
            &format!(
                "routines:\n  r: {{plugin: news-py, kind: ref_counter, on_error: continue{policy}}}\n"
            ),
        );
        let mut args = vec!["run".to_owned(), flow, "--json".into()];
        for item in items {
            args.push("--post".into());
            args.push(format!("r.in={item}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = routilux(&args);
        assert_eq!(r.code, OK, "{r:?}");
        let report: Value = serde_json::from_str(&r.stdout).unwrap();
        let lines: Vec<String> = printed(&r.stderr, "r", "[PY]")
            .into_iter()
            .map(str::to_owned)
            .collect();
        (lines, report, r)
    };
    let four = [r#"{"i": 0}"#, r#"{"i": 1}"#, r#"{"i": 2}"#, r#"{"i": 3}"#];
    // The class's `set_activation_policy(batch_size_policy(2))` is the kind's default; its
    // `worker_state` is the routine's own WorkerState.
    let (lines, _, r) = run("", &four);
    assert_eq!(
        lines,
        [
            "2 items, count 2, batch_size, 1",
            "2 items, count 4, batch_size, 2"
        ],
        "{r:?}"
    );
    // A flow's policy overrides it; under immediate, a reference-style logic gets one item
    // per call, as the reference delivers them.
    // Each of those calls has an activation id of its own (`N#K`: item K of activation N).
    let (lines, _, r) = run(", policy: immediate", &four);
    let (text, ids): (Vec<&str>, Vec<&str>) =
        lines.iter().map(|l| l.rsplit_once(", ").unwrap()).unzip();
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{ids:?}");
    assert!(ids.iter().all(|id| id.contains('#')), "{ids:?}");
    assert_eq!(
        text,
        [
            "1 items, count 1, immediate",
            "1 items, count 2, immediate",
            "1 items, count 3, immediate",
            "1 items, count 4, immediate"
        ],
        "{r:?}"
    );
    // What a sandbox cannot honour is refused, saying why.
    let (lines, report, r) = run(
        "",
        &[
            r#"{"i": 0}"#,
            r#"{"probe": "state"}"#,
            r#"{"i": 1}"#,
            r#"{"probe": "declare"}"#,
        ],
    );
    assert!(lines.is_empty(), "{r:?}");
    assert_eq!(report["routines"]["r"]["errors"], 2, "{r:?}");
    let errors: Vec<&str> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains(
            "worker_state.get_flow_state is not available in a routilux plugin: a sandboxed \
             routine reaches only its own WorkerState"
        ) && e.contains("(plugin.py:")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("add_slot('late'): a kind is declared in __init__")),
        "{errors:?}"
    );
}

#[test]
fn c_and_javascript_kinds_declare_their_policy_and_read_their_activation_id() {
    for (plugin, label) in [("news-c", "[C]"), ("news-js", "[JS]")] {
        pairs_print_their_activation_ids(plugin, label);
    }
}

fn pairs_print_their_activation_ids(plugin: &str, label: &str) {
    build_all();
    let dir = scratch();
    let flow = guest_flow(
        dir.path(),
        "pairs",
        &format!("routines:\n  p: {{plugin: {plugin}, kind: pairs}}\n"),
    );
    let mut args = vec!["run".to_owned(), flow, "--json".into()];
    for i in 0..5 {
        args.push("--post".into());
        args.push(format!("p.in={{\"i\": {i}}}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = routilux(&args);
    assert_eq!(r.code, OK, "{r:?}");
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let job = format!("job-{}", report["job"]);
    assert_eq!(
        printed(&r.stderr, "p", label),
        [
            format!("2 items in {job}/p/1"),
            format!("2 items in {job}/p/2")
        ],
        "{plugin}: {r:?}"
    );
    assert_eq!(report["routines"]["p"]["queued"], 1, "{r:?}");
}

#[test]
fn worker_state_and_config_behave_the_same_in_python_javascript_and_c() {
    build_all();
    let dir = scratch();
    // Each routine has its own worker state; the flow's config overrides the default step.
    let flow = guest_flow(
        dir.path(),
        "tally",
        "routines:\n  \
         py: {plugin: news-py, kind: tally, config: {step: 2}}\n  \
         js: {plugin: news-js, kind: tally, config: {step: 2}}\n  \
         c: {plugin: news-c, kind: tally, config: {step: 2}}\n",
    );
    let mut args = vec!["run".to_owned(), flow, "--json".into()];
    for routine in ["py", "js", "c"] {
        for i in 0..3 {
            args.push("--post".into());
            args.push(format!("{routine}.in={{\"i\": {i}}}"));
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = routilux(&args);
    assert_eq!(r.code, OK, "{r:?}");
    for (routine, label) in [("py", "[PY]"), ("js", "[JS]"), ("c", "[C]")] {
        let mut counts: Vec<i64> = printed(&r.stderr, routine, label)
            .into_iter()
            .map(|n| n.parse().unwrap())
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![2, 4, 6], "{routine}: {r:?}");
    }
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    for routine in ["py", "js", "c"] {
        assert_eq!(
            report["routines"][routine]["items_out"], 3,
            "{routine}: {r:?}"
        );
        assert_eq!(report["routines"][routine]["errors"], 0, "{routine}: {r:?}");
    }
}

#[test]
fn every_python_activation_gets_its_own_policy_message() {
    build_all();
    let dir = scratch();
    // The SDK parses a routine's (unchanging) message once and hands each activation a copy:
    // what one activation does to its copy must not reach the next.
    let flow = guest_flow(
        dir.path(),
        "policy",
        "routines:\n  \
         py: {plugin: news-py, kind: policy, policy: {batch_size: 1}}\n",
    );
    let r = routilux(&[
        "run",
        &flow,
        "--json",
        "--post",
        "py.in={\"i\": 0}",
        "--post",
        "py.in={\"i\": 1}",
        "--post",
        "py.in={\"i\": 2}",
    ]);
    assert_eq!(r.code, OK, "{r:?}");
    assert_eq!(
        printed(&r.stderr, "py", "[PY]"),
        vec![r#"{"n": 1, "policy": "batch_size"}"#; 3],
        "{r:?}"
    );
}
