//! The `routilux` binary as a subprocess: the example flows, every bad-input case, exit codes
//! and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::plugins::{plugin, plugin_dir, repo_root};

/// Exit codes, as the CLI documents them.
pub(crate) const OK: i32 = 0;
pub(crate) const FAILED: i32 = 1;
pub(crate) const USAGE: i32 = 2;
pub(crate) const INVALID: i32 = 3;
pub(crate) const TIMEOUT: i32 = 4;

pub(crate) struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub(crate) fn cache_dir() -> PathBuf {
    repo_root().join("target").join("routilux-test-cache")
}

/// Runs `routilux ARGS` in the repository root, with the plugins built.
fn routilux_with(args: &[&str], cache: &Path) -> Run {
    routilux_env(args, cache, &[])
}

fn routilux_env(args: &[&str], cache: &Path, env: &[(&str, &str)]) -> Run {
    routilux_in(&repo_root(), args, cache, env)
}

/// Runs `routilux ARGS` in `dir` with the plugins built; `env` is set after
/// `CARGO_TARGET_DIR` is removed (the example flows find `plugins/target` then).
pub(crate) fn routilux_in(dir: &Path, args: &[&str], cache: &Path, env: &[(&str, &str)]) -> Run {
    plugin_dir();
    let out: Output = Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args(args)
        .current_dir(dir)
        .env("ROUTILUX_CACHE_DIR", cache)
        // Guest toolchains where the in-process builds of the tests put them.
        .env(
            "ROUTILUX_TOOLS_DIR",
            routilux::cli::guests::tools::dir().expect("a tools directory"),
        )
        .env_remove("CARGO_TARGET_DIR")
        .envs(env.iter().copied())
        .output()
        .expect("run routilux");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub(crate) fn routilux(args: &[&str]) -> Run {
    routilux_with(args, &cache_dir())
}

/// Starts `routilux ARGS` in the repository root with stdout and stderr piped, for a test
/// that talks to the process while it runs.
pub(crate) fn spawn(args: &[&str]) -> std::process::Child {
    use std::process::Stdio;
    Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args(args)
        .current_dir(repo_root())
        .env("ROUTILUX_CACHE_DIR", cache_dir())
        .env_remove("CARGO_TARGET_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start routilux")
}

/// Reads all of `from` on a thread of its own (so a full pipe never blocks the process).
pub(crate) fn read_all(
    mut from: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = from.read_to_string(&mut s);
        s
    })
}

/// A scratch directory for one test.
pub(crate) fn scratch() -> tempfile::TempDir {
    let base = repo_root().join("target").join("cli-tests");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Writes a flow file using the built plugins and returns its path.
fn flow_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    let text = text.replace("PLUGINS", &plugin_dir().display().to_string());
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

pub(crate) fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn second_run_loads_components_from_the_cache_and_json_summarises() {
    let dir = scratch();
    let cache = dir.path().join("cache");
    let args = [
        "run",
        "examples/news_fanout.yaml",
        "--input",
        "examples/news_headlines.jsonl",
        "--json",
    ];
    let first = routilux_with(&args, &cache);
    let second = routilux_with(&args, &cache);
    for (r, cached) in [(&first, false), (&second, true)] {
        assert_eq!(r.code, OK, "{r:?}");
        let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(v["status"], "completed");
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["items_posted"], 3);
        assert_eq!(v["routines"]["email"]["items_in"], 3);
        assert_eq!(v["routines"]["broadcaster"]["items_out"], 3);
        assert_eq!(v["components"][0]["from_cache"], cached, "{r:?}");
        // With --json, routine output goes to stderr, tagged with its routine.
        assert_eq!(
            lines(&r.stderr, "[sms] stdout:   [SMS Service] Would send SMS:").len(),
            3,
            "{r:?}"
        );
    }
    assert!(first.stderr.contains("compiled now, cached for next time"));
    assert!(second.stderr.contains("from the compiled cache"));
}

#[test]
fn validate_reports_every_problem_with_place_and_suggestion() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "bad.yaml",
        "flow_id: bad
plugins: PLUGINS
routines:
  broadcaster:
    plugin: news
    kind: broadcastr
  email:
    plugin: nwes
    kind: email
  sms:
    plugin: news
    kind: sms
    config: {prefx: 1}
connections:
  - from: broadcaster.news
    to: emial.news
  - from: sms.nope
    to: sms.news
  - from: sms
    to: sms.news
",
    );
    let r = routilux(&["validate", &flow]);
    assert_eq!(r.code, INVALID, "{r:?}");
    for (message, place) in [
        (
            "plugin `news` has no kind `broadcastr` (did you mean `broadcaster`?)",
            "bad.yaml:6:11",
        ),
        (
            "unknown plugin `nwes` (did you mean `news`?)",
            "bad.yaml:8:13",
        ),
        (
            "no routine `emial` in this flow (did you mean `email`?)",
            "bad.yaml:16:9",
        ),
        (
            "routine `sms` (kind `sms`) has no event `nope`",
            "bad.yaml:17:11",
        ),
        (
            "`from: sms` must be written `routine.event`",
            "bad.yaml:19:11",
        ),
        (
            "warning: routine `sms`: config key `prefx` is not one kind `sms` declares",
            "bad.yaml:13:14",
        ),
    ] {
        let at = r
            .stderr
            .find(message)
            .unwrap_or_else(|| panic!("no `{message}`: {r:?}"));
        let next = r.stderr[at..].lines().nth(1).unwrap_or_default();
        assert!(next.ends_with(place), "`{message}` at {next}, not {place}");
    }
    assert!(r.stderr.contains("5 errors found"), "{r:?}");

    let good = routilux(&["validate", "examples/news_fanout.yaml"]);
    assert_eq!(good.code, OK, "{good:?}");
    assert!(good.stdout.contains("is valid (4 routines, 3 connections)"));
}

#[test]
fn malformed_yaml_and_unknown_fields_name_line_and_column() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "syntax.yaml",
        "flow_id: x\nroutines:\n  a:\n    plugin: news\n    kind: \"email\n",
    );
    let r = routilux(&["validate", &flow]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("syntax.yaml:5:"), "{r:?}");

    let flow = flow_file(
        dir.path(),
        "field.yaml",
        "flow_id: x\nplugins: PLUGINS\nroutines:\n  a:\n    plugin: news\n    kind: email\n    polcy: immediate\n",
    );
    let r = routilux(&["run", &flow]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("unknown field `polcy`"), "{r:?}");
    assert!(r.stderr.contains("field.yaml:7:5"), "{r:?}");

    let flow = flow_file(
        dir.path(),
        "duration.yaml",
        "flow_id: x\nplugins: PLUGINS\nroutines:\n  a: {plugin: news, kind: email}\nexecution:\n  timeout: 30\n",
    );
    let r = routilux(&["run", &flow]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("`30` has no unit"), "{r:?}");
    assert!(r.stderr.contains("duration.yaml:6:"), "{r:?}");
}

#[test]
fn a_file_that_is_not_a_component_is_named() {
    let dir = scratch();
    let fake = dir.path().join("fake.wasm");
    std::fs::write(&fake, "not wasm at all").unwrap();
    let flow = flow_file(
        dir.path(),
        "f.yaml",
        "flow_id: x\nroutines:\n  a:\n    plugin: ./fake.wasm\n    kind: k\n",
    );
    let r = routilux(&["run", &flow]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("fake.wasm"), "{r:?}");
    assert!(r.stderr.contains("not a WebAssembly"), "{r:?}");
    assert!(r.stderr.contains("f.yaml:4:13"), "{r:?}");

    let r = routilux(&["inspect", &fake.display().to_string()]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("fake.wasm"), "{r:?}");
}

#[test]
fn a_missing_plugin_directory_is_reported() {
    let r = routilux(&[
        "run",
        "examples/news_fanout.yaml",
        "--plugins",
        "no/such/dir",
    ]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(
        r.stderr
            .contains("plugin directory no/such/dir does not exist"),
        "{r:?}"
    );
}

#[test]
fn a_cycle_is_reported_at_its_connection() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "cycle.yaml",
        "flow_id: loop
plugins: PLUGINS
routines:
  a: {plugin: fixtures, kind: forward}
  b: {plugin: fixtures, kind: forward}
connections:
  - {from: a.out, to: b.in}
  - {from: b.out, to: a.in}
",
    );
    let r = routilux(&["validate", &flow]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("cycle: a -> b -> a"), "{r:?}");
    assert!(r.stderr.contains("cycle.yaml:7:5"), "{r:?}");
}

#[test]
fn a_routine_past_its_deadline_fails_the_job_and_a_run_past_timeout_exits_4() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "spin.yaml",
        "flow_id: spin
plugins: PLUGINS
routines:
  spin:
    plugin: fixtures
    kind: spin
    limits: {timeout: 300ms}
",
    );
    let r = routilux(&["run", &flow, "--post", r#"{"bad": true}"#]);
    assert_eq!(r.code, FAILED, "{r:?}");
    assert!(r.stderr.contains("failed"), "{r:?}");
    assert!(r.stderr.contains("error in `spin`"), "{r:?}");
    assert!(r.stderr.contains("300ms"), "the deadline is named: {r:?}");

    let flow = flow_file(
        dir.path(),
        "slow.yaml",
        "flow_id: slow
plugins: PLUGINS
routines:
  spin: {plugin: fixtures, kind: spin}
",
    );
    let r = routilux(&[
        "run",
        &flow,
        "--post",
        r#"spin.in={"bad": true}"#,
        "--timeout",
        "500ms",
    ]);
    assert_eq!(r.code, TIMEOUT, "{r:?}");
    assert!(r.stderr.contains("timed out after 500ms"), "{r:?}");
}

#[test]
fn a_manifest_only_requests_and_the_operator_grants() {
    let dir = scratch();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(plugins.join("own")).unwrap();
    std::fs::write(plugins.join("own").join("note.txt"), "the plugin's own").unwrap();
    std::fs::copy(plugin("fixtures"), plugins.join("fixtures.wasm")).unwrap();
    // It lowers its timeout (that applies), asks for more memory, an environment variable
    // and a directory of its own (requests).
    std::fs::write(
        plugins.join("fixtures.yaml"),
        "description: test fixtures\nlimits: {timeout: 250ms, memory: 512MiB}\n\
         permissions: {env: [ROUTILUX_TEST_GRANT], read_only_dirs: [{host: ./own, guest: /own}]}\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data").join("note.txt"), "granted").unwrap();
    let flow = flow_file(
        dir.path(),
        "grants.yaml",
        "flow_id: grants
routines:
  probe:
    plugin: fixtures
    kind: probe
    permissions: {read_only_dirs: [{host: ./data, guest: /data}]}
  echo: {plugin: fixtures, kind: echo}
  nosy: {plugin: fixtures, kind: probe}
  spin: {plugin: fixtures, kind: spin, on_error: continue}
connections:
  - {from: probe.out, to: echo.in}
  - {from: nosy.out, to: echo.in}
",
    );
    let post = r#"{"path": "/data/note.txt", "env": "ROUTILUX_TEST_GRANT"}"#;
    let own = r#"{"path": "/own/note.txt"}"#;
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run".to_owned(),
            flow.clone(),
            "--post".to_owned(),
            format!("probe.in={post}"),
            "--post".to_owned(),
            format!("nosy.in={own}"),
            "--post".to_owned(),
            r#"spin.in={"bad": true}"#.to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        routilux_env(&args, &cache_dir(), &[("ROUTILUX_TEST_GRANT", "yes")])
    };
    let seen = |r: &Run| -> Vec<Value> {
        r.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("echo passed "))
            .map(|j| serde_json::from_str(j).unwrap())
            .collect()
    };

    // Without --grant-requests: the flow's grant holds, the manifest's requests do not, and
    // a warning says so; its lowered timeout applies.
    let r = run(&[]);
    assert_eq!(r.code, OK, "{r:?}");
    let out = seen(&r);
    assert_eq!(out.len(), 2, "{r:?}");
    assert!(
        out.iter()
            .any(|v| v["file"]["ok"] == "granted" && v["env"].is_null()),
        "the flow's directory grant, not the manifest's env request: {r:?}"
    );
    assert!(
        out.iter().any(|v| v["file"]["error"].is_string()),
        "the manifest's directory request is not granted: {r:?}"
    );
    assert!(
        r.stderr.contains("the manifest requests memory 536.9 MB")
            || r.stderr.contains("the manifest requests memory 512.0 MiB"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("env ROUTILUX_TEST_GRANT") && r.stderr.contains("not granted"),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains("routine `probe`: requests /own (read-only, host "),
        "run shows what each routine requested and got: {r:?}"
    );
    assert!(
        r.stderr.contains("exceeded its deadline of 250ms"),
        "the manifest's lowered timeout applies: {r:?}"
    );

    // With --grant-requests the manifest's requests are granted too.
    let r = run(&["--grant-requests"]);
    assert_eq!(r.code, OK, "{r:?}");
    let out = seen(&r);
    assert!(
        out.iter()
            .any(|v| v["file"]["ok"] == "granted" && v["env"] == "yes"),
        "{r:?}"
    );
    assert!(
        out.iter().any(|v| v["file"]["ok"] == "the plugin's own"),
        "{r:?}"
    );
    assert!(!r.stderr.contains("not granted"), "{r:?}");

    // validate and inspect say the same.
    let r = routilux(&["validate", &flow]);
    assert_eq!(r.code, OK, "{r:?}");
    assert!(
        r.stdout
            .contains("routine `nosy`: requests /own (read-only")
            && r.stdout.contains("granted nothing"),
        "{r:?}"
    );
    let r = routilux(&[
        "inspect",
        &plugins.join("fixtures.wasm").display().to_string(),
    ]);
    assert_eq!(r.code, OK, "{r:?}");
    assert!(r.stdout.contains("fixtures.yaml requests: memory"), "{r:?}");
}

#[test]
fn the_root_system_and_own_directories_are_never_granted() {
    let dir = scratch();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(plugin("fixtures"), plugins.join("fixtures.wasm")).unwrap();
    std::os::unix::fs::symlink("/", dir.path().join("root-link")).unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    for (host, why) in [
        ("/", "is the root directory"),
        ("./root-link", "is the root directory"),
        ("/proc/self", "is under /proc"),
        ("/sys", "is under /sys"),
        ("/dev", "is under /dev"),
        ("./cache", "is inside routilux's compiled-component cache"),
        (".", "holds routilux's compiled-component cache"),
    ] {
        let flow = flow_file(
            dir.path(),
            "bad-grant.yaml",
            &format!(
                "flow_id: bad_grant
routines:
  probe:
    plugin: fixtures
    kind: probe
    permissions: {{read_only_dirs: [{{host: \"{host}\", guest: /x}}]}}
"
            ),
        );
        let r = routilux_with(&["validate", &flow], &cache);
        assert_eq!(r.code, INVALID, "{host}: {r:?}");
        assert!(
            r.stderr.contains(why) && r.stderr.contains("never granted"),
            "{host}: {r:?}"
        );
        assert!(r.stderr.contains("bad-grant.yaml:6:"), "{host}: {r:?}");
    }
    // A manifest may not request outside its own directory, even when requests are granted.
    std::fs::write(
        plugins.join("fixtures.yaml"),
        "permissions: {read_only_dirs: [{host: .., guest: /up}]}\n",
    )
    .unwrap();
    let flow = flow_file(
        dir.path(),
        "up.yaml",
        "flow_id: up\nroutines:\n  probe: {plugin: fixtures, kind: probe}\n",
    );
    let r = routilux(&["validate", &flow, "--grant-requests"]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("outside the plugin's directory"), "{r:?}");
}

#[test]
fn a_failing_routine_under_stop_fails_the_job_with_its_error() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "fails.yaml",
        "flow_id: fails
plugins: PLUGINS
routines:
  f: {plugin: fixtures, kind: fails, on_error: stop}
",
    );
    let r = routilux(&["run", &flow, "--post", r#"{"bad": true}"#, "--json"]);
    assert_eq!(r.code, FAILED, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["routines"]["f"]["dead_lettered"], 1);
    assert_eq!(v["errors"][0]["routine"], "f");
}

#[test]
fn bad_command_line_input_exits_2_naming_the_place() {
    let dir = scratch();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"headline\": \"ok\"}\n[1, 2]\n").unwrap();
    let input = format!("broadcaster.trigger={}", input.display());
    let r = routilux(&["run", "examples/news_fanout.yaml", "--input", &input]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("in.jsonl:2:"), "{r:?}");

    let r = routilux(&["run", "examples/news_fanout.yaml", "--post", "{oops"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("--post `{oops`"), "{r:?}");

    let r = routilux(&[
        "run",
        "examples/news_fanout.yaml",
        "--post",
        r#"broadcaster.triger={"headline": "x"}"#,
    ]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("did you mean `trigger`"), "{r:?}");

    let r = routilux(&["run", "examples/news_fanout.yaml", "--threads", "0"]);
    assert_eq!(r.code, USAGE, "{r:?}");
}

#[test]
fn inspect_shows_kinds_slots_events_config_and_capabilities() {
    let news = plugin("news").display().to_string();
    let r = routilux(&["inspect", &news]);
    assert_eq!(r.code, OK, "{r:?}");
    for text in [
        "broadcaster — publishes headlines on `news`",
        "slots:   trigger (queue 1000)",
        "events:  news {headline, timestamp}",
        "email — would send each headline by email",
        "routilux:plugin/host",
        "wasi:cli/stdout",
        "print: captured into the job's output",
    ] {
        assert!(r.stdout.contains(text), "no `{text}`: {r:?}");
    }
    let prio = plugin("priority").display().to_string();
    let r = routilux(&["inspect", &prio, "--json"]);
    assert_eq!(r.code, OK, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let processor = v["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "processor")
        .unwrap();
    assert_eq!(processor["default_config"]["level"], "");
    assert_eq!(processor["slots"][0]["name"], "data");
    assert_eq!(v["wit"], "routilux:plugin@0.4.0");
    // A kind's own default policy, and a plugin of the previous WIT.
    let r = routilux(&["inspect", &plugin("fixtures").display().to_string()]);
    assert!(r.stdout.contains("policy:  batch_size(2)"), "{r:?}");
    let r = routilux(&["inspect", &plugin("wit_0_3").display().to_string()]);
    assert!(r.stdout.contains("routilux:plugin@0.3.0"), "{r:?}");
    assert!(r.stdout.contains("policy:  immediate"), "{r:?}");
}

#[test]
fn new_rust_plugin_builds_and_runs_on_the_first_try() {
    // Share the example plugins' lock file and target directory, so the test compiles only
    // the new crate (a user's first build fetches and compiles the SDK's dependencies).
    let target = repo_root().join("plugins").join("target");
    let (dir, _project) = crate::polyglot::new_plugin_builds_and_runs(
        "rust",
        "hello-plugin",
        |project| {
            std::fs::copy(
                repo_root().join("plugins").join("Cargo.lock"),
                project.join("Cargo.lock"),
            )
            .unwrap();
        },
        &[("CARGO_TARGET_DIR", &target.display().to_string())],
    );

    let r = routilux(&[
        "new",
        "hello-plugin",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert_eq!(
        r.code, USAGE,
        "an existing directory is not overwritten: {r:?}"
    );
    let r = routilux(&["new", "Bad Name"]);
    assert_eq!(r.code, USAGE, "{r:?}");
}

#[test]
fn guest_text_is_escaped_on_the_terminal_unless_raw() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "echo.yaml",
        "flow_id: echo\nplugins: PLUGINS\nroutines:\n  e: {plugin: fixtures, kind: echo}\n",
    );
    // JSON escapes ESC itself, but a C1 CSI, a bidi override and a line separator pass
    // through JSON text unchanged: what the guest prints holds them raw.
    let post = r#"{"t": "\u009b2J\u202eevil\u2028x → café"}"#;
    let r = routilux(&["run", &flow, "--post", post]);
    assert_eq!(r.code, OK, "{r:?}");
    let line = lines(&r.stdout, "echo passed ")[0];
    assert!(
        line.contains(r"\x9b2J\u{202e}evil\u{2028}x → café"),
        "escaped, printable Unicode kept: {line:?}"
    );
    assert!(!r.stdout.contains('\u{9b}') && !r.stdout.contains('\u{202e}'));

    let r = routilux(&["run", &flow, "--post", post, "--raw"]);
    assert_eq!(r.code, OK, "{r:?}");
    assert!(r.stdout.contains("\u{9b}2J\u{202e}evil"), "{r:?}");
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::io::Read;
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "echo.yaml",
        "flow_id: echo\nplugins: PLUGINS\nroutines:\n  e: {plugin: fixtures, kind: echo}\n",
    );
    let input = dir.path().join("in.jsonl");
    let lines: String = (0..20_000).map(|i| format!("{{\"id\": {i}}}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    for args in [
        vec!["run", &flow, "--input", input.to_str().unwrap()],
        vec!["run", &flow, "--input", input.to_str().unwrap(), "--json"],
        vec!["validate", &flow],
    ] {
        // `| head -c 1`: the reader goes away after one byte.
        let mut child = spawn(&args);
        let stderr = read_all(child.stderr.take().unwrap());
        let mut one = [0u8; 1];
        let _ = child.stdout.take().unwrap().read(&mut one);
        let status = child.wait().unwrap();
        let stderr = stderr.join().unwrap();
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            matches!(status.code(), Some(0)),
            "{args:?}: {status:?} {stderr}"
        );
    }
}

#[test]
fn absurd_values_and_devices_get_a_clear_error_not_a_panic_or_a_hang() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "echo.yaml",
        "flow_id: echo\nplugins: PLUGINS\nroutines:\n  e: {plugin: fixtures, kind: echo}\n",
    );
    let no_panic = |r: &Run| assert!(!r.stderr.contains("panicked"), "{r:?}");
    // A timeout past what an Instant can hold means no deadline.
    let r = routilux(&[
        "run",
        &flow,
        "--post",
        "{}",
        "--timeout",
        "18446744073709551615s",
    ]);
    assert_eq!(r.code, OK, "{r:?}");
    no_panic(&r);
    let r = routilux(&["run", &flow, "--post", "{}", "--threads", "65535"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(r.stderr.contains("65535 is not in 1..=1024"), "{r:?}");
    let huge = flow_file(
        dir.path(),
        "huge.yaml",
        "flow_id: huge\nplugins: PLUGINS\nroutines:\n  e:\n    plugin: fixtures\n    kind: fails\n    \
         limits: {timeout: 18446744073709551615s}\n    on_error: {retry: {max: 1100, delay: 0ms, then: continue}}\n\
         execution: {thread_pool_size: 100000, timeout: 18446744073709551615s}\n",
    );
    let r = routilux(&["run", &huge, "--post", r#"{"bad": true}"#]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(
        r.stderr
            .contains("thread_pool_size must be 1 to 1024, not 100000")
            && r.stderr.contains("huge.yaml:9:"),
        "{r:?}"
    );
    // Without the thread count: 1,100 retries with no delay run at once (0 × 2^1099 is no
    // NaN that waits a day).
    let text = std::fs::read_to_string(&huge).unwrap();
    std::fs::write(&huge, text.replace("thread_pool_size: 100000, ", "")).unwrap();
    let r = routilux(&[
        "run",
        &huge,
        "--post",
        r#"{"bad": true}"#,
        "--timeout",
        "60s",
    ]);
    assert_eq!(r.code, OK, "{r:?}");
    no_panic(&r);
    assert!(
        r.stderr.contains("error in `e` (attempt 1101, retry)"),
        "{r:?}"
    );
    // Devices and endless input are refused after reading a bounded amount.
    let r = routilux(&["inspect", "/dev/zero"]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("/dev/zero: not a regular file"), "{r:?}");
    let r = routilux(&["validate", "/dev/zero"]);
    assert_eq!(r.code, INVALID, "{r:?}");
    assert!(r.stderr.contains("larger than 16 MiB"), "{r:?}");
    let r = routilux(&["run", &flow, "--input", "/dev/zero"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(
        r.stderr
            .contains("/dev/zero:1: the line is longer than 64.0 MiB"),
        "{r:?}"
    );
    no_panic(&r);
}

#[test]
fn a_flow_with_a_thousand_cycles_is_reported_briefly() {
    let dir = scratch();
    let n = 1000;
    let mut text = String::from("flow_id: rings\nplugins: PLUGINS\nroutines:\n");
    for i in 0..n {
        text.push_str(&format!("  r{i}: {{plugin: fixtures, kind: echo}}\n"));
    }
    text.push_str("connections:\n");
    for i in 0..n - 1 {
        text.push_str(&format!("  - {{from: r{i}.out, to: r{}.in}}\n", i + 1));
    }
    for i in 1..n {
        text.push_str(&format!("  - {{from: r{i}.out, to: r0.in}}\n"));
    }
    let flow = flow_file(dir.path(), "rings.yaml", &text);
    let r = routilux(&["validate", &flow]);
    assert_eq!(r.code, INVALID, "{r:?}");
    // The first cycles, each at its first connection, long paths shortened; then a count.
    assert_eq!(
        r.stderr.matches("error: cycle: ").count(),
        20,
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("… and 979 more cycles"), "{}", r.stderr);
    assert!(
        r.stderr.contains("r0 -> r1 -> r2 -> r3 -> r4 -> r5 -> … (") && r.stderr.len() < 20_000,
        "{}",
        r.stderr
    );
}

#[test]
fn host_warnings_reach_stderr_escaped_and_the_level_is_chosen() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "fails.yaml",
        "flow_id: fails\nplugins: PLUGINS\nroutines:\n  f: {plugin: fixtures, kind: fails, on_error: continue}\n",
    );
    let r = routilux(&["run", &flow, "--post", r#"{"bad": true}"#]);
    assert_eq!(r.code, OK, "{r:?}");
    assert!(r.stderr.contains("WARN activation failed"), "{r:?}");
    let r = routilux(&[
        "run",
        &flow,
        "--post",
        r#"{"bad": true}"#,
        "--log-level",
        "error",
    ]);
    assert!(!r.stderr.contains("WARN"), "{r:?}");
    let r = routilux_env(
        &["run", &flow, "--post", r#"{"bad": true}"#],
        &cache_dir(),
        &[("RUST_LOG", "routilux=debug")],
    );
    assert!(r.stderr.contains("DEBUG"), "{r:?}");
}

/// Starts `routilux run FLOW ARGS --json`, waits until the job is running, sends `signals`
/// (one `kill` each, a moment apart), and returns the run.
fn run_and_signal(flow: &str, args: &[&str], signals: &[&str]) -> Run {
    use std::io::{BufRead, Read};
    let mut all = vec!["run", flow, "--json"];
    all.extend_from_slice(args);
    let mut child = spawn(&all);
    let pid = child.id().to_string();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    // The job is running once its first item prints "started"; the next (a sleep) then
    // starts at once.
    let mut first = String::new();
    while !first.contains("stdout: started") {
        if err.read_line(&mut first).unwrap() == 0 {
            break;
        }
    }
    let stdout = read_all(child.stdout.take().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(300));
    for sig in signals {
        let ok = Command::new("kill").arg(sig).arg(&pid).status().unwrap();
        assert!(ok.success());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut stderr = first;
    err.read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: stdout.join().unwrap(),
        stderr,
    }
}

#[test]
fn ctrl_c_stops_gently_and_a_second_signal_cancels_both_with_a_summary() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "slow.yaml",
        "flow_id: slow\nplugins: PLUGINS\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
         policy: {batch_size: 1}\n",
    );
    let input = dir.path().join("in.jsonl");
    // Each activation sleeps 3 s: long enough that the signals below surely land while one
    // runs (they come 0.3 s and 0.5 s after the first item printed).
    let mut lines = String::from("{\"do\": \"print\", \"text\": \"started\"}\n");
    lines.extend((0..20).map(|_| "{\"do\": \"sleep\", \"ms\": 3000}\n"));
    std::fs::write(&input, lines).unwrap();
    let input = input.display().to_string();

    // One Ctrl-C: no new activation, the running one finishes, the rest stays queued.
    let r = run_and_signal(&flow, &["--input", &input], &["-INT"]);
    assert_eq!(r.code, 130, "{r:?}");
    assert!(r.stderr.contains("Ctrl-C: stopping"), "{r:?}");
    let s: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["status"], "stopped", "{r:?}");
    let h = &s["routines"]["h"];
    let n = |k: &str| h[k].as_u64().unwrap();
    assert_eq!(
        n("items_in"),
        n("processed") + n("dead_lettered") + n("queued"),
        "{h}"
    );
    assert!(n("processed") >= 1, "the running activation finished: {h}");
    assert_eq!(n("dead_lettered"), 0, "nothing was cut: {h}");
    assert!(n("queued") > 0, "{h}");

    // SIGTERM twice: the second cancels, cutting the sleeping guest (its item kept).
    let r = run_and_signal(&flow, &["--input", &input], &["-TERM", "-TERM"]);
    assert_eq!(r.code, 143, "{r:?}");
    assert!(r.stderr.contains("SIGTERM again: cancelling"), "{r:?}");
    let s: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["status"], "cancelled", "{r:?}");
    let h = &s["routines"]["h"];
    let n = |k: &str| h[k].as_u64().unwrap();
    assert_eq!(
        n("items_in"),
        n("processed") + n("dead_lettered") + n("queued"),
        "{h}"
    );
}

#[test]
fn a_bad_input_line_stops_the_input_and_what_came_before_it_is_processed() {
    let dir = scratch();
    let flow = flow_file(
        dir.path(),
        "echo.yaml",
        "flow_id: echo\nplugins: PLUGINS\nroutines:\n  e: {plugin: fixtures, kind: echo}\n",
    );
    let input = dir.path().join("in.jsonl");
    let mut text: String = (0..100).map(|i| format!("{{\"id\": {i}}}\n")).collect();
    text.push_str("not json\n{\"id\": 101}\n");
    std::fs::write(&input, text).unwrap();
    let r = routilux(&["run", &flow, "--input", input.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, USAGE, "{r:?}");
    assert!(
        r.stderr.contains("in.jsonl:101: invalid JSON item"),
        "{r:?}"
    );
    let s: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["items_posted"], 100);
    assert_eq!(s["routines"]["e"]["processed"], 100, "{r:?}");
    assert_eq!(lines(&r.stderr, "[e] stdout: echo passed").len(), 100);
}
