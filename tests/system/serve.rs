//! `routilux serve`: the real binary on 127.0.0.1 with two tenants, driven by a real HTTP
//! client (the reference page's fan-out over HTTP; tenants never see each other; a tenant's
//! flow grants itself nothing; quotas; items streamed in with backpressure; a restart keeps
//! what was stored; SIGTERM drains).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cli::cache_dir;
use crate::plugins::{plugin, plugin_dir, repo_root};
use crate::reference::{by_speaker, expected_outputs, timestamp_checked};

const TOKEN_A: &str = "rlx_tenant_a_0123456789abcdef0123456789abcdef";
const TOKEN_B: &str = "rlx_tenant_b_fedcba9876543210fedcba9876543210";

fn hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Two tenants, `a` and `b`; `quotas_a` is YAML for tenant a's `quotas:` (or `{}`).
fn two_tenants(quotas_a: &str, extra: &str) -> String {
    format!(
        "post_timeout: 300ms\ndrain_timeout: 10s\nthreads: 4\n{extra}\ntenants:\n  - id: a\n    tokens: [\"{}\"]\n    quotas: {quotas_a}\n  - id: b\n    tokens: [\"{}\"]\n",
        hash(TOKEN_A),
        hash(TOKEN_B)
    )
}

struct Server {
    child: Child,
    base: String,
    /// The config file it was started with, if any (rewritten to test a reload).
    config_path: Option<std::path::PathBuf>,
    stderr: Arc<Mutex<String>>,
    agent: ureq::Agent,
}

struct Resp {
    status: u16,
    json: Value,
    retry_after: Option<String>,
}

impl Server {
    /// Starts `routilux serve --config DIR/serve.yaml --listen 127.0.0.1:0` with `config`.
    fn start(dir: &Path, config: &str) -> Server {
        let path = dir.join("serve.yaml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_routilux"));
        cmd.args(["serve", "--config"])
            .arg(&path)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"));
        let mut s = Server::spawn(cmd);
        s.config_path = Some(path);
        s
    }

    /// Starts the server `cmd` runs (the process must be the server itself, or `exec` it).
    fn spawn(mut cmd: Command) -> Server {
        plugin_dir();
        if !cmd.get_envs().any(|(k, _)| k == "ROUTILUX_CACHE_DIR") {
            cmd.env("ROUTILUX_CACHE_DIR", cache_dir());
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start routilux serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (err, stderr) = (child.stderr.take().unwrap(), stderr.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send(addr);
                    }
                    let mut s = stderr.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start: {}", stderr.lock().unwrap());
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Server {
            child,
            base: format!("http://{addr}"),
            config_path: None,
            stderr,
            agent,
        }
    }

    fn req(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Resp {
        let mut b = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        let result = match body {
            Some((ct, bytes)) => self
                .agent
                .run(b.header("Content-Type", ct).body(bytes).unwrap()),
            None => self.agent.run(b.body(()).unwrap()),
        };
        let mut r = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = r.body_mut().read_to_string().unwrap();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
        };
        Resp {
            status,
            json,
            retry_after,
        }
    }

    fn get(&self, path: &str, token: &str) -> Resp {
        self.req("GET", path, Some(token), None)
    }

    fn put(&self, path: &str, token: &str, ct: &str, body: Vec<u8>) -> Resp {
        self.req("PUT", path, Some(token), Some((ct, body)))
    }

    fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.req(
            "POST",
            path,
            Some(token),
            Some(("application/json", body.to_string().into_bytes())),
        )
    }

    fn put_plugin(&self, token: &str, name: &str, file: &str) -> Resp {
        self.put(
            &format!("/v1/plugins/{name}"),
            token,
            "application/wasm",
            std::fs::read(plugin(file)).unwrap(),
        )
    }

    fn put_flow(&self, token: &str, id: &str, text: &str) -> Resp {
        self.put(
            &format!("/v1/flows/{id}"),
            token,
            "application/yaml",
            text.as_bytes().to_vec(),
        )
    }

    /// Waits until job `id` is no longer running; returns its view.
    fn wait_job(&self, token: &str, id: &str) -> Value {
        let started = Instant::now();
        loop {
            let r = self.get(&format!("/v1/jobs/{id}"), token);
            assert_eq!(r.status, 200, "{}", r.json);
            if r.json["status"] != "running" {
                return r.json;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "job {id} still runs: {}",
                r.json
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit code.
    fn terminate(mut self) -> (i32, String) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return (s.code().unwrap_or(-1), self.stderr());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example news fan-out as a tenant writes it: no plugin directory, no pool size.
fn news_flow() -> String {
    let text = std::fs::read_to_string(repo_root().join("examples/news_fanout.yaml")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with("plugins:") && !l.contains("thread_pool_size"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn scratch() -> tempfile::TempDir {
    crate::cli::scratch()
}

#[test]
fn the_reference_fan_out_runs_over_http_and_tenants_never_see_each_other() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    assert_eq!(s.req("GET", "/healthz", None, None).status, 200);
    assert_eq!(s.req("GET", "/readyz", None, None).json["ready"], true);

    // No token, a wrong token: 401, and nothing is said about what exists.
    let r = s.req("GET", "/v1/plugins", None, None);
    assert_eq!(r.status, 401, "{}", r.json);
    assert_eq!(s.get("/v1/plugins", "rlx_wrong").status, 401);

    let r = s.put_plugin(TOKEN_A, "news", "news");
    assert_eq!(r.status, 201, "{}", r.json);
    let kinds: Vec<&str> = r.json["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"broadcaster"), "{}", r.json);
    let r = s.put_flow(TOKEN_A, "news", &news_flow());
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["routines"], 4);

    let r = s.post("/v1/flows/news/jobs", TOKEN_A, json!({"close": true}));
    assert_eq!(r.status, 201, "{}", r.json);
    let id = r.json["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32, "an unguessable id: {id}");
    let view = s.wait_job(TOKEN_A, &id);
    assert_eq!(view["status"], "completed", "{view}");
    let out = s.get(&format!("/v1/jobs/{id}/output"), TOKEN_A);
    let lines: Vec<String> = out.json["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["level"] == "stdout")
        .map(|l| l["message"].as_str().unwrap().to_owned())
        .collect();
    let want = by_speaker(expected_outputs()[0].iter().cloned(), timestamp_checked);
    assert_eq!(by_speaker(lines, timestamp_checked), want);

    // Tenant b sees none of it: each answer is the one for something that does not exist.
    let absent = s.get("/v1/jobs/0123456789abcdef0123456789abcdef", TOKEN_B);
    assert_eq!(absent.status, 404);
    for (method, path) in [
        ("GET", format!("/v1/jobs/{id}")),
        ("GET", format!("/v1/jobs/{id}/output")),
        ("GET", format!("/v1/jobs/{id}/dead-letters")),
        ("POST", format!("/v1/jobs/{id}/items")),
        ("POST", format!("/v1/jobs/{id}/cancel")),
        ("POST", format!("/v1/jobs/{id}/close")),
        ("GET", "/v1/plugins/news".to_owned()),
        ("DELETE", "/v1/plugins/news".to_owned()),
        ("GET", "/v1/flows/news".to_owned()),
        ("DELETE", "/v1/flows/news".to_owned()),
        ("POST", "/v1/flows/news/jobs".to_owned()),
    ] {
        let r = s.req(
            method,
            &path,
            Some(TOKEN_B),
            Some(("application/json", b"{}".to_vec())),
        );
        assert_eq!(r.status, 404, "{method} {path}: {}", r.json);
        assert_eq!(r.json["error"]["code"], "not_found", "{method} {path}");
        assert!(
            !r.json.to_string().contains("tenant") && !r.json.to_string().contains("\"a\""),
            "{}",
            r.json
        );
    }
    for list in ["/v1/plugins", "/v1/flows", "/v1/jobs"] {
        assert_eq!(s.get(list, TOKEN_B).json, json!([]), "{list}");
        assert_eq!(s.get(list, TOKEN_A).json.as_array().unwrap().len(), 1);
    }
    // b's flow may not name a's plugin.
    let r = s.put_flow(TOKEN_B, "news", &news_flow());
    assert_eq!(r.status, 400, "{}", r.json);
    let d = &r.json["error"]["diagnostics"][0];
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("unknown plugin `news`"),
        "{d}"
    );
    assert!(d["line"].as_u64().unwrap() > 0, "{d}");

    // A plugin in use by a flow cannot be deleted; the flow can, then the plugin.
    let r = s.req("DELETE", "/v1/plugins/news", Some(TOKEN_A), None);
    assert_eq!(r.status, 409, "{}", r.json);
    assert_eq!(r.json["error"]["flows"], json!(["news"]));
    assert_eq!(
        s.req("DELETE", "/v1/flows/news", Some(TOKEN_A), None)
            .status,
        204
    );
    assert_eq!(
        s.req("DELETE", "/v1/plugins/news", Some(TOKEN_A), None)
            .status,
        204
    );
    assert_eq!(s.get("/v1/plugins", TOKEN_A).json, json!([]));
}

#[test]
fn a_tenants_flow_cannot_grant_itself_anything() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    let base = "flow_id: f\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n";
    for (extra, at_line, says) in [
        (
            "plugins: ../plugins\n",
            6,
            "`plugins:` names host directories",
        ),
        (
            "execution:\n  thread_pool_size: 64\n",
            7,
            "thread_pool_size",
        ),
        (
            "budgets:\n  memory: 64GiB\n",
            7,
            "budgets above the defaults (memory",
        ),
    ] {
        let r = s.put_flow(TOKEN_A, "f", &format!("{base}{extra}"));
        assert_eq!(r.status, 400, "{extra}: {}", r.json);
        let d = &r.json["error"]["diagnostics"];
        let hit = d
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["message"].as_str().unwrap().contains(says))
            .unwrap_or_else(|| panic!("{extra}: {d}"));
        assert_eq!(hit["line"], at_line, "{extra}: {hit}");
        assert_eq!(hit["file"], "flows/f");
    }
    for (routine, says) in [
        (
            "    permissions:\n      read_only_dirs: [{host: /etc, guest: /etc}]\n",
            "`permissions`: a tenant's flow may not set it",
        ),
        (
            "    limits:\n      memory: 8GiB\n      timeout: 1h\n",
            "limits above the defaults (memory 8.0 GiB, timeout 1h)",
        ),
    ] {
        let r = s.put_flow(TOKEN_A, "f", &format!("{base}{routine}"));
        assert_eq!(r.status, 400, "{routine}: {}", r.json);
        let text = r.json.to_string();
        assert!(text.contains(says), "{routine}: {text}");
        assert!(!text.contains("/etc\\\" does not"), "{text}");
    }
    for path in [
        "../plugins/target/hostile.wasm",
        "/tmp/x.wasm",
        "hostile.wasm",
    ] {
        let r = s.put_flow(
            TOKEN_A,
            "f",
            &base.replace("plugin: hostile", &format!("plugin: {path}")),
        );
        assert_eq!(r.status, 400, "{path}: {}", r.json);
        assert!(
            r.json.to_string().contains("unknown plugin"),
            "{path}: {}",
            r.json
        );
    }
    // Lowering a limit is fine.
    let r = s.put_flow(
        TOKEN_A,
        "f",
        &format!("{base}    limits:\n      memory: 16MiB\n"),
    );
    assert_eq!(r.status, 201, "{}", r.json);
    // Names that could be paths are refused before anything is stored.
    for name in ["..", "a.wasm", "-x"] {
        let r = s.put_flow(TOKEN_A, name, base);
        assert_eq!(r.status, 400, "{name}: {}", r.json);
    }
    let r = s.put(
        "/v1/plugins/junk",
        TOKEN_A,
        "application/wasm",
        b"not wasm".to_vec(),
    );
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "invalid_plugin");
}

#[test]
fn each_quota_on_stored_and_running_things_answers_naming_it() {
    let dir = scratch();
    let hostile_bytes = std::fs::metadata(plugin("hostile")).unwrap().len();
    let quotas = format!(
        "{{plugins: 1, flows: 1, jobs: 1, plugin_bytes: {}}}",
        hostile_bytes + 10
    );
    let s = Server::start(dir.path(), &two_tenants(&quotas, ""));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    // Replacing it is not a second plugin.
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 200);
    let r = s.put_plugin(TOKEN_A, "news", "news");
    assert_eq!(r.status, 429, "{}", r.json);
    assert_eq!(r.json["error"]["quota"], "plugins");
    let flow = "flow_id: f\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n";
    assert_eq!(s.put_flow(TOKEN_A, "f", flow).status, 201);
    let r = s.put_flow(TOKEN_A, "g", flow);
    assert_eq!(r.status, 429, "{}", r.json);
    assert_eq!(r.json["error"]["quota"], "flows");
    let first = s.post("/v1/flows/f/jobs", TOKEN_A, json!({}));
    assert_eq!(first.status, 201, "{}", first.json);
    let r = s.post("/v1/flows/f/jobs", TOKEN_A, json!({}));
    assert_eq!(r.status, 429, "{}", r.json);
    assert_eq!(r.json["error"]["quota"], "jobs");
    // Tenant b feels none of a's quotas.
    assert_eq!(s.put_plugin(TOKEN_B, "hostile", "hostile").status, 201);
    assert_eq!(s.put_plugin(TOKEN_B, "news", "news").status, 201);
    assert_eq!(s.put_flow(TOKEN_B, "f", flow).status, 201);
    assert_eq!(s.put_flow(TOKEN_B, "g", flow).status, 201);
    for _ in 0..2 {
        assert_eq!(s.post("/v1/flows/f/jobs", TOKEN_B, json!({})).status, 201);
    }
    // Closing a's job frees its slot.
    let id = first.json["id"].as_str().unwrap();
    s.post(&format!("/v1/jobs/{id}/close"), TOKEN_A, json!({}));
    assert_eq!(s.wait_job(TOKEN_A, id)["status"], "completed");
    assert_eq!(
        s.post("/v1/flows/f/jobs", TOKEN_A, json!({"close": true}))
            .status,
        201
    );

    // plugin_bytes: a component larger than the quota is refused whole (413).
    let dir2 = scratch();
    let small = two_tenants(&format!("{{plugin_bytes: {}}}", hostile_bytes / 2), "");
    let s2 = Server::start(dir2.path(), &small);
    let r = s2.put_plugin(TOKEN_A, "hostile", "hostile");
    assert_eq!(r.status, 413, "{}", r.json);
    assert_eq!(s2.get("/v1/plugins", TOKEN_A).json, json!([]));
}

#[test]
fn items_stream_in_with_backpressure_and_a_full_slot_answers_429_with_the_count_taken() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    let flow = "flow_id: slow\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
                concurrency: 1\n    max_queue_length: {in: 1}\n";
    assert_eq!(s.put_flow(TOKEN_A, "slow", flow).status, 201);
    let r = s.post("/v1/flows/slow/jobs", TOKEN_A, json!({}));
    let id = r.json["id"].as_str().unwrap().to_owned();
    let items: Vec<String> = (0..5)
        .map(|i| json!({"do": "sleep", "ms": 600, "i": i}).to_string())
        .collect();
    let items_path = format!("/v1/jobs/{id}/items");
    let mut sent = 0;
    let mut answers_429 = 0;
    while sent < items.len() {
        let body = items[sent..].join("\n") + "\n";
        let r = s.req(
            "POST",
            &items_path,
            Some(TOKEN_A),
            Some(("application/x-ndjson", body.into_bytes())),
        );
        if r.status == 429 {
            answers_429 += 1;
            assert_eq!(r.json["error"]["code"], "slot_full", "{}", r.json);
            assert_eq!(r.retry_after.as_deref(), Some("1"));
            sent += r.json["error"]["accepted"].as_u64().unwrap() as usize;
            std::thread::sleep(Duration::from_millis(200));
        } else {
            assert_eq!(r.status, 200, "{}", r.json);
            sent += r.json["accepted"].as_u64().unwrap() as usize;
        }
    }
    assert!(answers_429 > 0, "a slot of 1 behind a 600 ms routine fills");
    // Once the routine has caught up:
    let started = Instant::now();
    while s.get(&format!("/v1/jobs/{id}"), TOKEN_A).json["summary"]["routines"]["h"]["processed"]
        != 5
    {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    // A bad line: the lines before it are taken, it is named.
    let r = s.req(
        "POST",
        &items_path,
        Some(TOKEN_A),
        Some((
            "application/x-ndjson",
            b"{\"i\": 100}\n[1, 2]\n{\"i\": 101}\n".to_vec(),
        )),
    );
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["line"], 2);
    assert_eq!(r.json["error"]["accepted"], 1);
    s.post(&format!("/v1/jobs/{id}/close"), TOKEN_A, json!({}));
    let view = s.wait_job(TOKEN_A, &id);
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["posted"], 6);
    assert_eq!(view["summary"]["routines"]["h"]["items_in"], 6, "{view}");
    // A closed job takes nothing.
    let r = s.post(&items_path, TOKEN_A, json!({"i": 1}));
    assert_eq!(r.status, 409, "{}", r.json);
}

#[test]
fn a_restart_keeps_plugins_flows_and_jobs_and_sigterm_stops_jobs_to_resume() {
    let dir = scratch();
    let config = two_tenants("{}", "");
    let s = Server::start(dir.path(), &config);
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    let flow = "flow_id: f\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
                concurrency: 1\n    policy: {batch_size: 1}\n";
    assert_eq!(s.put_flow(TOKEN_A, "f", flow).status, 201);
    // A finished job, then a running one: three 400 ms activations, one at a time.
    let done = s.post("/v1/flows/f/jobs", TOKEN_A, json!({"close": true}));
    let done = done.json["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_job(TOKEN_A, &done)["status"], "completed");
    let sleep = json!({"do": "sleep", "ms": 400});
    let r = s.post(
        "/v1/flows/f/jobs",
        TOKEN_A,
        json!({"input": {"h.in": [sleep, sleep, sleep]}}),
    );
    assert_eq!(r.status, 201, "{}", r.json);
    let id = r.json["id"].as_str().unwrap().to_owned();
    // A reader of its events, whose stream the stop must end (not wait for).
    let url = format!("{}/v1/jobs/{id}/events", s.base);
    let reader = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let mut r = agent
            .get(&url)
            .header("Authorization", format!("Bearer {TOKEN_A}"))
            .call()
            .unwrap();
        let _ = r.body_mut().read_to_string();
    });
    std::thread::sleep(Duration::from_millis(200));
    // SIGTERM: the running activation ends, the two queued items stay in the job's store.
    let stopping = Instant::now();
    let (code, err) = s.terminate();
    assert!(stopping.elapsed() < Duration::from_secs(5), "{err}");
    reader.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("0 jobs finished while draining, 1 kept in their stores"),
        "{err}"
    );

    let s = Server::start(dir.path(), &config);
    assert_eq!(s.get("/v1/plugins", TOKEN_A).json[0]["name"], "hostile");
    assert_eq!(s.get("/v1/flows/f", TOKEN_A).json["text"], flow);
    let jobs = s.get("/v1/jobs", TOKEN_A).json;
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs}");
    assert_eq!(
        s.get(&format!("/v1/jobs/{done}"), TOKEN_A).json["status"],
        "completed"
    );
    let view = s.get(&format!("/v1/jobs/{id}"), TOKEN_A).json;
    assert_eq!(view["status"], "running", "{view}");
    assert_eq!(view["resumed"]["queued"], 2, "{view}");
    // It is still open for input: one more item, then close; it completes with all three.
    assert_eq!(
        s.post(&format!("/v1/jobs/{id}/items"), TOKEN_A, json!({"n": 1}))
            .status,
        200
    );
    s.post(&format!("/v1/jobs/{id}/close"), TOKEN_A, json!({}));
    let view = s.wait_job(TOKEN_A, &id);
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["summary"]["routines"]["h"]["activations"], 3, "{view}");
}

#[test]
fn with_no_config_one_tenant_gets_a_token_printed_once_and_stored_hashed() {
    let dir = scratch();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("ROUTILUX_CACHE_DIR", cache_dir())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut token = None;
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.trim_start().starts_with("rlx_") {
            token = Some(line.trim().to_owned());
        }
        if let Some(rest) = line.split("listening on http://").nth(1) {
            addr = Some(rest.split_whitespace().next().unwrap().to_owned());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (token, addr) = (token.expect("a token printed"), addr.unwrap());
    let stored = std::fs::read_to_string(data.join("tokens")).unwrap();
    assert!(!stored.contains(&token), "the token is stored hashed");
    assert_eq!(stored.trim(), hash(&token));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let ok = agent
        .get(format!("http://{addr}/v1/plugins"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    // `serve token` rotates it; a SIGHUP makes the server take the new one at once.
    let out = Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args(["serve", "token", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let new = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGHUP"));
    let status = |t: &str| {
        agent
            .get(format!("http://{addr}/v1/plugins"))
            .header("Authorization", format!("Bearer {t}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(&token), 200, "the old token works until a reload");
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = Instant::now();
    while status(&new) != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the new token never worked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(&token), 401, "the old token stopped working");
    let _ = child.kill();
    let _ = child.wait();
}

/// A flow of one hostile routine that adds 1 to WorkerState key `k{i}` for item `i`.
const TALLY_FLOW: &str = "flow_id: t\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n";

fn tally(i: u64) -> String {
    json!({"do": "calls", "calls": [{"f": "state_add", "a": format!("k{i}"), "n": 1}]}).to_string()
}

/// kill -9 of the server while a client streams items in: after each restart the job is
/// there, running, and at the end every acknowledged item was processed exactly once (its
/// WorkerState key is 1), an unacknowledged one at most once, and none twice.
#[test]
fn acknowledged_items_survive_kill_9_of_the_server_and_are_processed_exactly_once() {
    let rounds: u64 = std::env::var("ROUTILUX_SERVE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = scratch();
    let config = two_tenants("{}", "");
    let mut s = Server::start(dir.path(), &config);
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    assert_eq!(s.put_flow(TOKEN_A, "t", TALLY_FLOW).status, 201);
    let id = s.post("/v1/flows/t/jobs", TOKEN_A, json!({})).json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut acked: Vec<u64> = Vec::new();
    let mut maybe: Vec<u64> = Vec::new();
    let mut next = 0u64;
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..rounds {
        let base = s.base.clone();
        let path = format!("{base}/v1/jobs/{id}/items");
        let stop_at = Instant::now() + Duration::from_millis(rng.u64(50..400));
        let start = next;
        // The client: requests of 10 items until the server is gone.
        let client = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let (mut acked, mut maybe) = (Vec::new(), Vec::new());
            let mut i = start;
            loop {
                let ids: Vec<u64> = (i..i + 10).collect();
                i += 10;
                let body: String = ids.iter().map(|&n| tally(n) + "\n").collect();
                match agent
                    .post(&path)
                    .header("Authorization", format!("Bearer {TOKEN_A}"))
                    .header("Content-Type", "application/x-ndjson")
                    .send(body.as_bytes())
                {
                    Ok(mut r) if r.status().as_u16() == 200 => {
                        let v: Value = r.body_mut().read_json().unwrap();
                        assert_eq!(v["accepted"], 10);
                        acked.extend(ids);
                    }
                    Ok(mut r) => {
                        let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
                        let n = v["error"]["accepted"].as_u64().unwrap_or(0) as usize;
                        acked.extend(&ids[..n]);
                        maybe.extend(&ids[n..]);
                    }
                    Err(_) => {
                        maybe.extend(ids);
                        return (acked, maybe, i);
                    }
                }
            }
        });
        std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
        s.child.kill().unwrap();
        s.child.wait().unwrap();
        let (a, m, n) = client.join().unwrap();
        assert!(!a.is_empty() || round > 0 || !m.is_empty());
        acked.extend(a);
        maybe.extend(m);
        next = n;
        s = Server::start(dir.path(), &config);
        let view = s.get(&format!("/v1/jobs/{id}"), TOKEN_A).json;
        assert_eq!(view["status"], "running", "round {round}: {view}");
    }
    s.post(&format!("/v1/jobs/{id}/close"), TOKEN_A, json!({}));
    let view = s.wait_job(TOKEN_A, &id);
    assert_eq!(view["status"], "completed", "{view}");
    let state = s.get(&format!("/v1/jobs/{id}/state"), TOKEN_A).json;
    let h = state["h"].as_object().unwrap();
    for i in &acked {
        assert_eq!(
            h.get(&format!("k{i}")),
            Some(&json!(1)),
            "acknowledged item {i}"
        );
    }
    for i in &maybe {
        let v = h.get(&format!("k{i}")).and_then(Value::as_i64).unwrap_or(0);
        assert!(v <= 1, "unacknowledged item {i} processed {v} times");
    }
    assert!(h.len() <= acked.len() + maybe.len(), "no item made up");
    eprintln!(
        "{rounds} kills: {} items acknowledged (all processed once), {} in flight at a kill \
         ({} of them processed), 0 lost, 0 twice",
        acked.len(),
        maybe.len(),
        maybe
            .iter()
            .filter(|i| h.contains_key(&format!("k{i}")))
            .count()
    );
}

#[test]
fn a_paused_job_stays_paused_across_a_restart_and_finished_jobs_go_after_their_retention() {
    let dir = scratch();
    let config = two_tenants("{}", "job_retention: 1s");
    let s = Server::start(dir.path(), &config);
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    assert_eq!(s.put_flow(TOKEN_A, "t", TALLY_FLOW).status, 201);
    let id = s.post("/v1/flows/t/jobs", TOKEN_A, json!({})).json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s.post(&format!("/v1/jobs/{id}/pause"), TOKEN_A, json!({}));
    assert_eq!(r.json["paused"], true, "{}", r.json);
    let items = format!("/v1/jobs/{id}/items");
    let r = s.req(
        "POST",
        &items,
        Some(TOKEN_A),
        Some((
            "application/x-ndjson",
            (tally(1) + "\n" + &tally(2)).into_bytes(),
        )),
    );
    assert_eq!(r.json["accepted"], 2, "posts are taken while paused");
    std::thread::sleep(Duration::from_millis(300));
    let state = format!("/v1/jobs/{id}/state");
    assert_eq!(s.get(&state, TOKEN_A).json["h"], json!({}), "nothing ran");
    let (code, err) = s.terminate();
    assert_eq!(code, 0, "{err}");

    let s = Server::start(dir.path(), &config);
    let view = s.get(&format!("/v1/jobs/{id}"), TOKEN_A).json;
    assert_eq!(view["paused"], true, "{view}");
    assert_eq!(view["resumed"]["queued"], 2, "{view}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.get(&state, TOKEN_A).json["h"], json!({}));
    s.post(&format!("/v1/jobs/{id}/resume"), TOKEN_A, json!({}));
    s.post(&format!("/v1/jobs/{id}/close"), TOKEN_A, json!({}));
    assert_eq!(s.wait_job(TOKEN_A, &id)["status"], "completed");
    assert_eq!(s.get(&state, TOKEN_A).json["h"], json!({"k1": 1, "k2": 1}));
    // Retention: a second after it finished, the job and its directory are gone.
    let job_dir = dir.path().join("data/tenants/a/jobs").join(&id);
    assert!(job_dir.is_dir());
    let started = Instant::now();
    while s.get(&format!("/v1/jobs/{id}"), TOKEN_A).status != 404 {
        assert!(started.elapsed() < Duration::from_secs(10), "still kept");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(!job_dir.exists(), "its directory is removed");
}

/// A full disk under the server (a tmpfs mounted over its data directory in a user and mount
/// namespace of its own): posts answer 507 naming no host path, `/readyz` turns false with the
/// reason, nothing panics; once the disk has room again, a write succeeds, `/readyz` is true
/// and a new job runs.
#[test]
fn a_full_disk_answers_507_and_turns_readyz_false_until_there_is_room() {
    const SCRIPT: &str = r#"
        mount -t tmpfs -o "size=$SIZE" routilux-full "$MNT" || exit 90
        ( i=0; while [ ! -e "$GROW" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
          mount -o remount,size=64m "$MNT" ) &
        exec "$@" --data-dir "$MNT/data"
    "#;
    let dir = scratch();
    let config = dir.path().join("serve.yaml");
    std::fs::write(&config, two_tenants("{}", "")).unwrap();
    let (mnt, grow) = (dir.path().join("mnt"), dir.path().join("grow"));
    std::fs::create_dir_all(&mnt).unwrap();
    let size = std::fs::metadata(plugin("hostile")).unwrap().len() + (1536 << 10);
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "bash", "-c", SCRIPT, "full-disk"])
        .arg(env!("CARGO_BIN_EXE_routilux"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("SIZE", size.to_string())
        .env("MNT", &mnt)
        .env("GROW", &grow);
    let s = Server::spawn(cmd);
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    assert_eq!(s.put_flow(TOKEN_A, "t", TALLY_FLOW).status, 201);
    let r = s.post("/v1/flows/t/jobs", TOKEN_A, json!({}));
    assert_eq!(r.status, 201, "{}", r.json);
    let id = r.json["id"].as_str().unwrap().to_owned();
    let pad = "x".repeat(60 << 10);
    let mut full = None;
    for round in 0..400 {
        let body: String = (0..4)
            .map(|k| {
                json!({"do": "calls", "calls": [], "i": round * 4 + k, "pad": pad}).to_string()
                    + "\n"
            })
            .collect();
        let r = s.req(
            "POST",
            &format!("/v1/jobs/{id}/items"),
            Some(TOKEN_A),
            Some(("application/x-ndjson", body.into_bytes())),
        );
        if r.status != 200 {
            full = Some(r);
            break;
        }
    }
    let r = full.expect("the disk fills up");
    assert_eq!(r.status, 507, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "storage");
    let text = r.json.to_string();
    assert!(
        text.contains("full") && !text.contains(&mnt.display().to_string()),
        "{text}"
    );
    let ready = s.req("GET", "/readyz", None, None);
    assert_eq!(ready.status, 503, "{}", ready.json);
    assert!(
        ready.json["reason"].as_str().unwrap().contains("full"),
        "{}",
        ready.json
    );
    assert_eq!(s.wait_job(TOKEN_A, &id)["status"], "failed");
    // Room again: the next write succeeds and the server is ready.
    std::fs::write(&grow, "").unwrap();
    let started = Instant::now();
    loop {
        let r = s.post("/v1/flows/t/jobs", TOKEN_A, json!({"close": true}));
        if r.status == 201 {
            assert_eq!(
                s.wait_job(TOKEN_A, r.json["id"].as_str().unwrap())["status"],
                "completed"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{}", r.json);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.req("GET", "/readyz", None, None).status, 200);
    let err = s.stderr();
    assert!(
        !err.lines()
            .any(|l| l.contains("panicked") && !l.contains("guest:")),
        "the host panicked: {err}"
    );
}

/// Reads a server-sent event stream to its end: (id, event, data) of each event.
fn read_events(s: &Server, path: &str, last: Option<u64>) -> Vec<(Option<u64>, String, Value)> {
    let mut req = s
        .agent
        .get(format!("{}{path}", s.base))
        .header("Authorization", format!("Bearer {TOKEN_A}"));
    if let Some(l) = last {
        req = req.header("Last-Event-ID", l.to_string());
    }
    let mut r = req.call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let reader = BufReader::new(r.body_mut().as_reader());
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    for line in reader.lines() {
        let line = line.unwrap();
        if line.is_empty() {
            if !event.is_empty() {
                out.push((
                    id.take(),
                    std::mem::take(&mut event),
                    serde_json::from_str(&data).unwrap(),
                ));
            }
            data.clear();
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().parse().unwrap());
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    out
}

#[test]
fn a_jobs_events_stream_its_output_and_status_and_resume_after_last_event_id() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    assert_eq!(s.put_plugin(TOKEN_A, "news", "news").status, 201);
    assert_eq!(s.put_flow(TOKEN_A, "news", &news_flow()).status, 201);
    let r = s.post("/v1/flows/news/jobs", TOKEN_A, json!({"close": true}));
    let id = r.json["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/jobs/{id}/events");
    // Read while it runs: the stream ends with the final status.
    let events = read_events(&s, &path, None);
    let (_, last, data) = events.last().unwrap();
    assert_eq!(
        (last.as_str(), &data["status"]),
        ("status", &json!("completed"))
    );
    let printed: Vec<String> = events
        .iter()
        .filter(|(_, e, d)| e == "output" && d["level"] == "stdout")
        .map(|(_, _, d)| d["message"].as_str().unwrap().to_owned())
        .collect();
    let want = by_speaker(expected_outputs()[0].iter().cloned(), timestamp_checked);
    assert_eq!(by_speaker(printed, timestamp_checked), want);
    assert!(
        events.iter().any(|(_, e, _)| e == "activations"),
        "{events:?}"
    );
    let ids: Vec<u64> = events.iter().filter_map(|(i, _, _)| *i).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    // Reconnecting after event N gives exactly the events after it.
    let n = ids[ids.len() / 2];
    let again = read_events(&s, &path, Some(n));
    let rest: Vec<u64> = again.iter().filter_map(|(i, _, _)| *i).collect();
    assert_eq!(
        rest,
        ids.iter().copied().filter(|&i| i > n).collect::<Vec<_>>()
    );
    // Another tenant's stream is a 404 like any other.
    assert_eq!(s.get(&path, TOKEN_B).status, 404);
}

/// Tenant a's hostile plugin traps, busy-loops to its deadline, grows its memory, floods
/// output and emits past its budget, while tenant b's fan-out runs: b's job completes with
/// the page's output, a's failures are a's (its job's errors), and the server stays up.
#[test]
fn a_hostile_tenant_does_not_disturb_another_tenants_job() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    let flow = "flow_id: h\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
                on_error: continue\n    policy: {batch_size: 1}\n    limits: {timeout: 300ms, memory: 32MiB}\n";
    assert_eq!(s.put_flow(TOKEN_A, "h", flow).status, 201, "{flow}");
    assert_eq!(s.put_plugin(TOKEN_B, "news", "news").status, 201);
    assert_eq!(s.put_flow(TOKEN_B, "news", &news_flow()).status, 201);
    let attacks = vec![
        json!({"do": "fault", "kind": "trap", "emits": 1, "at": 0}),
        json!({"do": "fault", "kind": "deadline", "emits": 1, "at": 0}),
        json!({"do": "grow", "bytes": 64 << 20}),
        json!({"do": "print", "count": 20000, "bytes": 200}),
        json!({"do": "fault", "kind": "budget", "bytes": 64 << 20, "emits": 1, "at": 0}),
        json!({"do": "fail", "bytes": 1 << 20}),
    ];
    let mut a_jobs = Vec::new();
    for _ in 0..3 {
        let r = s.post(
            "/v1/flows/h/jobs",
            TOKEN_A,
            json!({"input": {"h.in": attacks}, "close": true}),
        );
        assert_eq!(r.status, 201, "{}", r.json);
        a_jobs.push(r.json["id"].as_str().unwrap().to_owned());
    }
    let r = s.post("/v1/flows/news/jobs", TOKEN_B, json!({"close": true}));
    let b = r.json["id"].as_str().unwrap().to_owned();
    let view = s.wait_job(TOKEN_B, &b);
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["summary"]["errors"], json!([]), "{view}");
    let out = s.get(&format!("/v1/jobs/{b}/output"), TOKEN_B).json;
    let lines: Vec<String> = out["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["level"] == "stdout")
        .map(|l| l["message"].as_str().unwrap().to_owned())
        .collect();
    let want = by_speaker(expected_outputs()[0].iter().cloned(), timestamp_checked);
    assert_eq!(by_speaker(lines, timestamp_checked), want);
    for a in &a_jobs {
        let v = s.wait_job(TOKEN_A, a);
        assert_eq!(v["status"], "completed", "{v}");
        let errors = v["summary"]["errors"].as_array().unwrap();
        assert!(errors.len() >= 4, "a's failures are in a's job: {v}");
    }
    assert_eq!(s.req("GET", "/readyz", None, None).status, 200);
    let err = s.stderr();
    assert!(
        !err.lines()
            .any(|l| l.contains("panicked") && !l.contains("guest:")),
        "the host panicked: {err}"
    );
}

/// The hostile component with a custom section appended: the same kinds, another version
/// (another SHA-256).
fn another_version(tag: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(plugin("hostile")).unwrap();
    let name = b"routilux-test-version";
    let payload = tag.as_bytes();
    let len = 1 + name.len() + payload.len();
    assert!(len < 128, "one-byte LEB128 lengths");
    bytes.extend([0u8, len as u8, name.len() as u8]);
    bytes.extend(name);
    bytes.extend(payload);
    bytes
}

/// A new version of a plugin swaps in for new jobs (its flows rebuilt, each checked whole),
/// running jobs keep theirs, a version that breaks a flow changes nothing (409), and after a
/// kill -9 every job resumes on the version it started with.
#[test]
fn a_new_plugin_version_swaps_in_for_new_jobs_and_running_jobs_keep_theirs_across_a_crash() {
    let dir = scratch();
    let config = two_tenants("{}", "");
    let mut s = Server::start(dir.path(), &config);
    let v1 = another_version("one");
    assert_eq!(
        s.put("/v1/plugins/p", TOKEN_A, "application/wasm", v1)
            .status,
        201
    );
    let flow = TALLY_FLOW.replace("plugin: hostile", "plugin: p");
    assert_eq!(s.put_flow(TOKEN_A, "t", &flow).status, 201);
    let start = |s: &Server| {
        let r = s.post("/v1/flows/t/jobs", TOKEN_A, json!({}));
        assert_eq!(r.status, 201, "{}", r.json);
        r.json["id"].as_str().unwrap().to_owned()
    };
    let j1 = start(&s);
    let r = s.put(
        "/v1/plugins/p",
        TOKEN_A,
        "application/wasm",
        another_version("two"),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    let v2 = r.json["sha256"].as_str().unwrap().to_owned();
    let j2 = start(&s);
    // A "new version" without the flow's kind is refused whole.
    let r = s.put(
        "/v1/plugins/p",
        TOKEN_A,
        "application/wasm",
        std::fs::read(plugin("news")).unwrap(),
    );
    assert_eq!(r.status, 409, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "breaks_flows");
    assert!(r.json["error"]["flows"]["t"].is_object(), "{}", r.json);
    assert_eq!(s.get("/v1/plugins/p", TOKEN_A).json["sha256"], v2);
    for (i, j) in [&j1, &j2].into_iter().enumerate() {
        let r = s.post(
            &format!("/v1/jobs/{j}/items"),
            TOKEN_A,
            serde_json::from_str(&tally(i as u64)).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.json);
    }
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    s = Server::start(dir.path(), &config);
    for (i, j) in [&j1, &j2].into_iter().enumerate() {
        let view = s.get(&format!("/v1/jobs/{j}"), TOKEN_A).json;
        assert_eq!(
            view["status"],
            "running",
            "{j} resumed: {view}\n{}",
            s.stderr()
        );
        s.post(&format!("/v1/jobs/{j}/close"), TOKEN_A, json!({}));
        assert_eq!(s.wait_job(TOKEN_A, j)["status"], "completed");
        let state = s.get(&format!("/v1/jobs/{j}/state"), TOKEN_A).json;
        assert_eq!(state["h"][format!("k{i}")], 1, "{state}");
    }
    assert!(!s.stderr().contains("cannot resume"), "{}", s.stderr());
}

fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{d}"))
            .unwrap()
            .count()
    };
    (count("fd"), count("task"))
}

/// Finished jobs let their engine job, store file and writer thread go: the server's open
/// files and threads do not grow with the jobs it has run.
#[test]
fn finished_jobs_hold_no_files_or_threads() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{jobs: 4}", ""));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    assert_eq!(s.put_flow(TOKEN_A, "t", TALLY_FLOW).status, 201);
    let run = |n: u64| {
        for i in 0..n {
            let r = s.post(
                "/v1/flows/t/jobs",
                TOKEN_A,
                json!({"input": {"h.in": [serde_json::from_str::<Value>(&tally(i)).unwrap()]}, "close": true}),
            );
            assert_eq!(r.status, 201, "{}", r.json);
            s.wait_job(TOKEN_A, r.json["id"].as_str().unwrap());
        }
        std::thread::sleep(Duration::from_millis(400));
    };
    run(10);
    let before = fds_and_threads(s.child.id());
    run(150);
    let after = fds_and_threads(s.child.id());
    assert!(
        after.0 <= before.0 + 8 && after.1 <= before.1 + 8,
        "open files and threads after 10 jobs {before:?}, after 160 {after:?}"
    );
    assert_eq!(
        s.get("/v1/jobs", TOKEN_A).json.as_array().unwrap().len(),
        160
    );
}

/// Token guessing from an address is limited; a valid token is never refused.
#[test]
fn failed_tokens_are_rate_limited_per_address_and_a_valid_token_still_works() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    let mut limited = false;
    for i in 0..30 {
        let r = s.get("/v1/plugins", &format!("rlx_guess_{i}"));
        if r.status == 429 {
            assert_eq!(r.json["error"]["code"], "too_many_failures");
            assert!(r.retry_after.is_some());
            limited = true;
        } else {
            assert_eq!(r.status, 401);
        }
    }
    assert!(limited, "30 bad tokens in a row are limited");
    assert_eq!(s.get("/v1/plugins", TOKEN_A).status, 200);
}

/// The CLI as a client: `deploy` the example flow file (its plugins found as `run` finds
/// them), `post --flow … --follow` prints the page's lines as they come, `jobs` lists it; the
/// other tenant's token sees none of it.
#[test]
fn the_cli_deploys_a_flow_file_posts_and_follows_a_job() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    let cli = |token: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_routilux"))
            .args(args)
            .current_dir(repo_root())
            .env("ROUTILUX_SERVER", &s.base)
            .env("ROUTILUX_TOKEN", token)
            .env("ROUTILUX_CACHE_DIR", cache_dir())
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(TOKEN_A, &["deploy", "examples/news_fanout.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("flow `news_fanout` deployed (4 routines"),
        "{out}"
    );
    assert!(err.contains("plugin `news`: uploaded"), "{err}");
    let (code, out, err) = cli(TOKEN_A, &["post", "--flow", "news_fanout", "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    let printed: Vec<String> = out.lines().skip(1).map(str::to_owned).collect();
    let id = out.lines().next().unwrap().to_owned();
    let want = by_speaker(expected_outputs()[0].iter().cloned(), timestamp_checked);
    assert_eq!(by_speaker(printed, timestamp_checked), want, "{err}");
    assert!(err.contains(&format!("job {id}: completed")), "{err}");
    // Items from a file, to a job kept open, then followed.
    let (code, out, err) = cli(
        TOKEN_A,
        &[
            "post",
            "--flow",
            "news_fanout",
            "--keep-open",
            "--input",
            "examples/news_headlines.jsonl",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("3 items posted"), "{err}");
    let open = out.trim().to_owned();
    let (code, out, _) = cli(TOKEN_A, &["jobs"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("{id}  completed")) && out.contains(&open),
        "{out}"
    );
    s.post(&format!("/v1/jobs/{open}/close"), TOKEN_A, json!({}));
    let (code, out, err) = cli(TOKEN_A, &["jobs", &open, "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    // The other tenant: a 404, as for a job that does not exist.
    let (code, _, err) = cli(TOKEN_B, &["jobs", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
}

/// A tenant's disk quota: its plugins, flows and jobs' stores together; past it, posts answer
/// 507 naming the quota (with the count taken) while the other tenant and `/readyz` are
/// untouched.
#[test]
fn a_tenants_disk_quota_stops_its_posts_only() {
    let dir = scratch();
    let hostile = std::fs::metadata(plugin("hostile")).unwrap().len();
    let quotas = format!("{{disk_bytes: {}}}", hostile + (3 << 20));
    let s = Server::start(dir.path(), &two_tenants(&quotas, ""));
    for t in [TOKEN_A, TOKEN_B] {
        assert_eq!(s.put_plugin(t, "hostile", "hostile").status, 201);
        assert_eq!(s.put_flow(t, "t", TALLY_FLOW).status, 201);
    }
    let ja = s.post("/v1/flows/t/jobs", TOKEN_A, json!({})).json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let jb = s.post("/v1/flows/t/jobs", TOKEN_B, json!({})).json["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.post(&format!("/v1/jobs/{ja}/pause"), TOKEN_A, json!({}));
    let pad = "x".repeat(60 << 10);
    let body = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|k| json!({"do": "calls", "calls": [], "k": k, "pad": pad}).to_string() + "\n")
            .collect::<String>()
            .into_bytes()
    };
    let mut refused = None;
    for _ in 0..200 {
        let r = s.req(
            "POST",
            &format!("/v1/jobs/{ja}/items"),
            Some(TOKEN_A),
            Some(("application/x-ndjson", body(4))),
        );
        if r.status != 200 {
            refused = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = refused.expect("the quota is reached");
    assert_eq!(r.status, 507, "{}", r.json);
    assert_eq!(r.json["error"]["quota"], "disk_bytes", "{}", r.json);
    assert!(r.json["error"]["accepted"].is_u64());
    let r = s.req(
        "POST",
        &format!("/v1/jobs/{jb}/items"),
        Some(TOKEN_B),
        Some(("application/x-ndjson", body(4))),
    );
    assert_eq!(r.status, 200, "the other tenant posts: {}", r.json);
    assert_eq!(s.req("GET", "/readyz", None, None).status, 200);
}

/// Reads what the server sends on `conn` until it closes it (or `within` passes: then
/// `None`).
/// Starts a job of flow `t` with a 12 MiB body over a raw connection (its writer on a thread
/// of its own, so that an answer sent before the body is read whole still comes back): the
/// answer.
fn start_big_job(addr: &str, token: &str) -> std::thread::JoinHandle<String> {
    use std::io::Write;
    let pad = "x".repeat(12 << 20);
    let body =
        json!({"input": {"h.in": [{"do": "calls", "calls": [], "pad": pad}]}, "close": true})
            .to_string();
    let (addr, token) = (addr.to_owned(), token.to_owned());
    std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "POST /v1/flows/t/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(head.as_bytes());
            let _ = w.write_all(body.as_bytes());
        });
        let got = read_until_closed(&mut c, Duration::from_secs(20)).unwrap_or_default();
        drop(c);
        let _ = writer.join();
        got
    })
}

/// An upload of tenant a's (`PUT /v1/plugins/NAME`) that sends 7 of its 8 MiB at once, then
/// a byte every 300 ms until `stop` (or the server closes it): the answer it got, if any.
fn trickling_upload(
    addr: &str,
    name: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<String> {
    use std::io::Write;
    const MIB: usize = 1 << 20;
    let addr = addr.to_owned();
    std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "PUT /v1/plugins/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n\
             Content-Length: {}\r\n\r\n",
            8 * MIB
        );
        if c.write_all(head.as_bytes()).is_ok() && c.write_all(&vec![b'x'; 7 * MIB]).is_ok() {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if c.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        read_until_closed(&mut c, Duration::from_secs(10)).unwrap_or_default()
    })
}

fn read_until_closed(conn: &mut std::net::TcpStream, within: Duration) -> Option<String> {
    use std::io::Read;
    conn.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned());
            }
            Err(_) => return None,
        }
    }
}

/// Slow and idle clients are cut after the header timeout, and no address holds more than
/// its connections: one more is answered 503 and closed at once, and the server's
/// descriptors come back when the clients go.
#[test]
fn slow_and_idle_clients_are_cut_and_connections_are_bounded() {
    use std::io::Write;
    let dir = scratch();
    let s = Server::start(
        dir.path(),
        &two_tenants(
            "{}",
            "max_connections: 16\nmax_connections_per_address: 4\nheader_timeout: 700ms",
        ),
    );
    let addr = s.base.trim_start_matches("http://").to_owned();
    // Requests on connections of their own (the test's HTTP client would keep one open).
    let healthz = || {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        read_until_closed(&mut c, Duration::from_secs(5)).unwrap()
    };
    assert!(healthz().starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(100));
    let (fds_before, _) = fds_and_threads(s.child.id());
    let started = Instant::now();
    // Four connections: three idle, one trickling a request's head a byte at a time.
    let mut held: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // A fifth from this address: refused at once, saying why.
    let mut fifth = std::net::TcpStream::connect(&addr).unwrap();
    let answer = read_until_closed(&mut fifth, Duration::from_secs(5)).expect("closed at once");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1"), "{answer}");
    // The slow loris keeps sending, a byte every 100 ms, and is still cut.
    let mut loris = held.pop().unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut cut = false;
    for b in head {
        if loris.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rest = read_until_closed(&mut loris, Duration::from_secs(5));
    assert!(cut || rest.is_some(), "the slow client is still connected");
    // The idle ones are closed too, with nothing sent.
    for c in &mut held {
        let got = read_until_closed(c, Duration::from_secs(5)).expect("an idle connection is cut");
        assert!(!got.starts_with("HTTP/1.1 2"), "{got}");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // Room again: a request is served, and the descriptors are back.
    drop(held);
    assert!(healthz().starts_with("HTTP/1.1 200"));
    let mut fds_after = usize::MAX;
    for _ in 0..50 {
        fds_after = fds_and_threads(s.child.id()).0;
        if fds_after <= fds_before {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fds_after <= fds_before,
        "{fds_before} descriptors before, {fds_after} after"
    );
    // A limit out of range is refused, with its place.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, two_tenants("{}", "max_connections: 0")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("max_connections: 0") && err.contains("bad.yaml:4"),
        "{err}"
    );
}

/// Each tenant is charged the wall time its activations occupy the shared workers (what fair
/// shares weigh): a tenant's guest that sleeps costs that tenant, not the other, and
/// `GET /v1/usage` shows it with the tenant's weight and what it holds against its quotas.
#[test]
fn a_tenant_is_charged_its_guests_worker_time_and_usage_shows_its_quotas() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{plugins: 5}\n    weight: 3", ""));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    let flow = "flow_id: h\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
                policy: {batch_size: 1}\n";
    assert_eq!(s.put_flow(TOKEN_A, "h", flow).status, 201);
    let sleeps: Vec<Value> = (0..4).map(|_| json!({"do": "sleep", "ms": 100})).collect();
    let r = s.post(
        "/v1/flows/h/jobs",
        TOKEN_A,
        json!({"input": {"h.in": sleeps}, "close": true}),
    );
    assert_eq!(r.status, 201, "{}", r.json);
    let id = r.json["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_job(TOKEN_A, &id)["status"], "completed");
    let a = s.get("/v1/usage", TOKEN_A).json;
    let b = s.get("/v1/usage", TOKEN_B).json;
    assert_eq!(
        (a["tenant"].clone(), a["weight"].clone()),
        (json!("a"), json!(3)),
        "{a}"
    );
    assert_eq!(b["weight"], 1, "{b}");
    let busy = |v: &Value| v["workers"]["busy_seconds"].as_f64().unwrap();
    assert!(busy(&a) >= 0.4, "a's four 100 ms sleeps: {a}");
    assert!(busy(&b) < 0.05, "b ran nothing: {b}");
    assert_eq!(a["workers"]["running"], 0, "{a}");
    assert_eq!(a["workers"]["of"], 4, "{a}");
    assert_eq!(a["plugins"], json!({"used": 1, "quota": 5}), "{a}");
    assert_eq!(a["flows"]["used"], 1, "{a}");
    assert_eq!(b["plugins"]["used"], 0, "{b}");
    assert!(a["disk_bytes"]["used"].as_u64().is_some(), "{a}");
    assert_eq!(s.req("GET", "/v1/usage", None, None).status, 401);
}

/// Sends SIGHUP to the server and waits for it to say how the reload went.
fn reload(s: &Server, config: &str) -> String {
    let path = s.config_path.clone().expect("started from a config file");
    std::fs::write(&path, config).unwrap();
    let before = s.stderr().matches("routilux serve: configuration ").count();
    let ok = Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let started = Instant::now();
    loop {
        let err = s.stderr();
        if err.matches("routilux serve: configuration ").count() > before {
            return err;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no reload: {err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGHUP reloads the configuration: tokens rotate, weights and quotas change at once, a new
/// tenant comes in, a removed one loses its tokens and its open job is stopped into its store
/// (and back, open, when the tenant is), a broken file is refused with the running
/// configuration kept; what only a restart changes is said so.
#[test]
fn sighup_reloads_tenants_tokens_weights_and_quotas_and_keeps_a_removed_tenants_jobs() {
    const TOKEN_A2: &str = "rlx_tenant_a_rotated_0123456789abcdef012345";
    const TOKEN_C: &str = "rlx_tenant_c_0123456789abcdef0123456789abcd";
    let tenant = |id: &str, token: &str, more: &str| {
        format!("  - id: {id}\n    tokens: [\"{}\"]\n{more}", hash(token))
    };
    let head = "post_timeout: 300ms\ndrain_timeout: 10s\nthreads: 4\ntenants:\n";
    let dir = scratch();
    let first = format!(
        "{head}{}{}",
        tenant("a", TOKEN_A, ""),
        tenant("b", TOKEN_B, "")
    );
    let s = Server::start(dir.path(), &first);
    assert_eq!(s.put_plugin(TOKEN_B, "hostile", "hostile").status, 201);
    assert_eq!(s.put_flow(TOKEN_B, "t", TALLY_FLOW).status, 201);
    let r = s.post("/v1/flows/t/jobs", TOKEN_B, json!({}));
    assert_eq!(r.status, 201, "{}", r.json);
    let b_job = r.json["id"].as_str().unwrap().to_owned();
    let items = format!("/v1/jobs/{b_job}/items?to=h.in");
    assert_eq!(
        s.post(
            &items,
            TOKEN_B,
            serde_json::from_str::<Value>(&tally(1)).unwrap()
        )
        .status,
        200
    );

    // a's token rotated, weight and a quota changed; b removed; c added.
    let second = format!(
        "{head}{}{}",
        tenant("a", TOKEN_A2, "    weight: 5\n    quotas: {plugins: 1}\n"),
        tenant("c", TOKEN_C, "")
    );
    let err = reload(&s, &second);
    assert!(err.contains("configuration reloaded"), "{err}");
    assert!(
        err.contains("tenant `b` removed") && err.contains("1 unfinished jobs"),
        "{err}"
    );
    assert!(
        err.contains("tenant `c` added") && err.contains("tenant `a` updated"),
        "{err}"
    );
    assert_eq!(s.get("/v1/usage", TOKEN_A).status, 401);
    assert_eq!(s.get("/v1/usage", TOKEN_B).status, 401);
    let a = s.get("/v1/usage", TOKEN_A2).json;
    assert_eq!(
        (a["weight"].clone(), a["plugins"]["quota"].clone()),
        (json!(5), json!(1)),
        "{a}"
    );
    assert_eq!(s.put_plugin(TOKEN_A2, "one", "hostile").status, 201);
    let second_plugin = s.put_plugin(TOKEN_A2, "two", "hostile");
    assert_eq!(second_plugin.status, 429, "{}", second_plugin.json);
    assert_eq!(s.get("/v1/usage", TOKEN_C).json["tenant"], "c");

    // A broken file: refused, located, and the running configuration kept.
    let err = reload(&s, &format!("{second}  - id: Bad Name\n"));
    assert!(err.contains("configuration not reloaded"), "{err}");
    assert!(err.contains("serve.yaml:"), "{err}");
    assert_eq!(s.get("/v1/usage", TOKEN_A2).status, 200);

    // b comes back: its job is resumed, still open for input, the item it had still there.
    let third = format!(
        "{head}{}{}threads: 2\n",
        tenant("a", TOKEN_A2, ""),
        tenant("b", TOKEN_B, "")
    )
    .replacen("threads: 4\n", "", 1);
    let err = reload(&s, &third);
    assert!(err.contains("tenant `b` added (1 jobs found)"), "{err}");
    assert!(err.contains("change only at a restart"), "{err}");
    assert!(err.contains("tenant `c` removed"), "{err}");
    let v = s.get(&format!("/v1/jobs/{b_job}"), TOKEN_B).json;
    assert_eq!(v["status"], "running", "{v}");
    assert_eq!(
        s.post(
            &items,
            TOKEN_B,
            serde_json::from_str::<Value>(&tally(2)).unwrap()
        )
        .status,
        200
    );
    assert_eq!(
        s.post(&format!("/v1/jobs/{b_job}/close"), TOKEN_B, json!({}))
            .status,
        200
    );
    let v = s.wait_job(TOKEN_B, &b_job);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["resumed"]["state_keys"], 1, "{v}");
    let state = s.get(&format!("/v1/jobs/{b_job}/state"), TOKEN_B).json;
    assert_eq!(
        state["h"],
        json!({"k1": 1, "k2": 1}),
        "each item once: {state}"
    );
}

/// `GET /v1/openapi.json` is made from the handlers themselves: it names every route the
/// server answers (and no other), each with its parameters and answers, behind the bearer
/// scheme; a request to each documented operation reaches a handler, never the fallback.
#[test]
fn the_openapi_document_names_every_route_the_server_answers() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", ""));
    let r = s.req("GET", "/v1/openapi.json", None, None);
    assert_eq!(r.status, 200);
    let doc = r.json;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    assert_eq!(doc["info"]["title"], "routilux serve");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.push((method.to_uppercase(), path.clone()));
            assert!(op["summary"].is_string(), "{method} {path}: no summary");
            assert!(
                op["responses"]["200"].is_object()
                    || op["responses"]["201"].is_object()
                    || op["responses"]["204"].is_object(),
                "{method} {path}: no success answer"
            );
            if path.starts_with("/v1/") {
                assert_eq!(op["security"], json!([{"bearer": []}]), "{method} {path}");
                assert!(op["responses"]["401"].is_object(), "{method} {path}");
            }
            if path.contains('{') {
                assert!(
                    op["parameters"].as_array().is_some_and(|p| !p.is_empty()),
                    "{method} {path}"
                );
            }
        }
    }
    documented.sort();
    let mut routes: Vec<(String, String)> = [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/usage"),
        ("GET", "/v1/plugins"),
        ("GET", "/v1/plugins/{name}"),
        ("PUT", "/v1/plugins/{name}"),
        ("DELETE", "/v1/plugins/{name}"),
        ("GET", "/v1/flows"),
        ("GET", "/v1/flows/{id}"),
        ("PUT", "/v1/flows/{id}"),
        ("DELETE", "/v1/flows/{id}"),
        ("POST", "/v1/flows/{id}/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{id}"),
        ("POST", "/v1/jobs/{id}/items"),
        ("POST", "/v1/jobs/{id}/close"),
        ("POST", "/v1/jobs/{id}/cancel"),
        ("POST", "/v1/jobs/{id}/pause"),
        ("POST", "/v1/jobs/{id}/resume"),
        ("GET", "/v1/jobs/{id}/state"),
        ("GET", "/v1/jobs/{id}/output"),
        ("GET", "/v1/jobs/{id}/events"),
        ("GET", "/v1/jobs/{id}/dead-letters"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    routes.sort();
    assert_eq!(documented, routes);
    let fallback = |r: &Resp| r.status == 405 || r.json["error"]["message"] == "no such endpoint";
    for (method, path) in &documented {
        let concrete = path.replace("{name}", "nope").replace("{id}", "nope");
        let r = s.req(method, &concrete, Some(TOKEN_A), None);
        assert!(
            !fallback(&r),
            "{method} {concrete} is documented and not routed: {}",
            r.json
        );
    }
    assert!(fallback(&s.req(
        "GET",
        "/v1/nothing-here",
        Some(TOKEN_A),
        None
    )));
}

/// A tenant's `activations_per_second` throttles its jobs (an activation past it waits, its
/// item queued, nothing lost) while another tenant's identical job runs at full speed.
#[test]
fn a_tenants_activation_rate_throttles_its_jobs_only() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{activations_per_second: 20}", ""));
    let run = |token: &str| {
        assert_eq!(s.put_plugin(token, "hostile", "hostile").status, 201);
        let one_by_one = format!("{TALLY_FLOW}    policy: {{batch_size: 1}}\n");
        assert_eq!(s.put_flow(token, "t", &one_by_one).status, 201);
        let items: Vec<Value> = (0..40)
            .map(|i| serde_json::from_str(&tally(i)).unwrap())
            .collect();
        let started = Instant::now();
        let r = s.post(
            "/v1/flows/t/jobs",
            token,
            json!({"input": {"h.in": items}, "close": true}),
        );
        assert_eq!(r.status, 201, "{}", r.json);
        let id = r.json["id"].as_str().unwrap().to_owned();
        let v = s.wait_job(token, &id);
        assert_eq!(v["status"], "completed", "{v}");
        let state = s.get(&format!("/v1/jobs/{id}/state"), token).json;
        assert_eq!(
            state["h"].as_object().unwrap().len(),
            40,
            "every item ran: {state}"
        );
        started.elapsed()
    };
    let (b, a) = (run(TOKEN_B), run(TOKEN_A));
    // 40 one-item activations at 20 a second, bursts of 20: at least a second for a.
    assert!(a >= Duration::from_millis(900), "a took {a:?}");
    assert!(b < a, "b ({b:?}) is not throttled by a's quota ({a:?})");
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(u["activations_per_second"]["quota"], 20, "{u}");
    assert!(
        u["activations_per_second"]["throttled"].as_u64().unwrap() > 0,
        "{u}"
    );
    let ub = s.get("/v1/usage", TOKEN_B).json;
    assert_eq!(
        ub["activations_per_second"],
        json!({"quota": null, "throttled": 0}),
        "{ub}"
    );
}

/// The peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

/// Tenant a's jobs share its `memory_bytes` quota: eight jobs whose guests each hoard 48 MB
/// (each under its own 64 MiB cap, each job under its own 2 GiB budget) get two of them in
/// 128 MiB, the rest trap naming the tenant's quota; tenant b's guest hoards as much beside
/// them, unaffected. The server's peak resident memory shows it: without the quota the eight
/// would take 384 MB more.
#[test]
fn a_tenants_jobs_together_are_held_to_its_memory_quota_and_the_host_peak_shows_it() {
    const MB: u64 = 1_000_000;
    const MIB: u64 = 1 << 20;
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{memory_bytes: 128MiB}", ""));
    let flow = "flow_id: g\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
                on_error: continue\n";
    for token in [TOKEN_A, TOKEN_B] {
        assert_eq!(s.put_plugin(token, "hostile", "hostile").status, 201);
        assert_eq!(s.put_flow(token, "g", flow).status, 201);
    }
    let pid = s.child.id();
    let before = peak_rss(pid);
    let grow = |token: &str| {
        let r = s.post(
            "/v1/flows/g/jobs",
            token,
            json!({"input": {"h.in": [{"do": "grow", "bytes": 48 * MB}]}}),
        );
        assert_eq!(r.status, 201, "{}", r.json);
        r.json["id"].as_str().unwrap().to_owned()
    };
    let ran = |token: &str, id: &str| {
        let started = Instant::now();
        loop {
            let v = s.get(&format!("/v1/jobs/{id}"), token).json;
            let h = &v["summary"]["routines"]["h"];
            if h["processed"].as_u64().unwrap_or(0) + h["failures"].as_u64().unwrap_or(0) >= 1 {
                return v;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // One at a time, so which ones fit does not depend on timing. The jobs stay open: each
    // guest keeps what it hoarded.
    let mut a_jobs = Vec::new();
    for _ in 0..8 {
        let id = grow(TOKEN_A);
        ran(TOKEN_A, &id);
        a_jobs.push(id);
    }
    // (A failure is listed before it is counted: no wait needed.)
    let mut trapped = Vec::new();
    for id in &a_jobs {
        let v = s.get(&format!("/v1/jobs/{id}"), TOKEN_A).json;
        for e in v["summary"]["errors"].as_array().unwrap() {
            trapped.push(e["error"].as_str().unwrap().to_owned());
        }
    }
    let b_job = grow(TOKEN_B);
    let vb = ran(TOKEN_B, &b_job);
    assert_eq!(
        vb["summary"]["errors"],
        json!([]),
        "b is not held to a's quota: {vb}"
    );
    assert_eq!(
        trapped.len(),
        6,
        "two 48 MB guests fit 128 MiB: {trapped:#?}"
    );
    assert!(
        trapped
            .iter()
            .all(|e| e.contains("tenant's memory quota of 128.0 MiB")),
        "{trapped:#?}"
    );
    let u = s.get("/v1/usage", TOKEN_A).json;
    let m = &u["memory_bytes"];
    assert_eq!(m["quota"], 128 * MIB, "{u}");
    let (used, peak) = (m["used"].as_u64().unwrap(), m["peak"].as_u64().unwrap());
    assert!((96 * MB..=128 * MIB).contains(&used), "{u}");
    assert!(peak <= 128 * MIB, "{u}");
    // a's two guests and b's one: 144 MB of hoards, and some host overhead; the other six
    // guests' 288 MB never came.
    let grew = peak_rss(pid).saturating_sub(before);
    assert!(
        grew < 144 * MB + 96 * MIB,
        "the server grew by {} MiB",
        grew / MIB
    );
    // Finished jobs give their memory back to the quota.
    for id in &a_jobs {
        s.post(&format!("/v1/jobs/{id}/close"), TOKEN_A, json!({}));
        assert_eq!(s.wait_job(TOKEN_A, id)["status"], "completed");
    }
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(u["memory_bytes"]["used"], 0, "{u}");
    let ub = s.get("/v1/usage", TOKEN_B).json;
    assert_eq!(ub["memory_bytes"]["quota"], 4u64 << 30, "{ub}");
}

/// Tenant a's `instances` quota holds its running jobs' live instances together, idle ones
/// kept by open jobs included: ten open jobs whose guests each grew to 16 MB run one after the
/// other, each making its instance by having an idle one of an earlier job dropped, so a never
/// keeps more than two (and their memory) alive; the server's peak resident memory shows it
/// (without the quota the ten would keep 160 MB). Tenant b is not held to it.
#[test]
fn a_tenants_live_instances_are_held_to_its_quota_idle_ones_dropped_for_new_ones() {
    const MB: u64 = 1_000_000;
    const MIB: u64 = 1 << 20;
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{instances: 2}", ""));
    let flow = "flow_id: g\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
                on_error: continue\n";
    for token in [TOKEN_A, TOKEN_B] {
        assert_eq!(s.put_plugin(token, "hostile", "hostile").status, 201);
        assert_eq!(s.put_flow(token, "g", flow).status, 201);
    }
    let pid = s.child.id();
    let before = peak_rss(pid);
    let grow = |token: &str| {
        let r = s.post(
            "/v1/flows/g/jobs",
            token,
            json!({"input": {"h.in": [{"do": "grow", "bytes": 16 * MB}]}}),
        );
        assert_eq!(r.status, 201, "{}", r.json);
        let id = r.json["id"].as_str().unwrap().to_owned();
        let started = Instant::now();
        loop {
            let v = s.get(&format!("/v1/jobs/{id}"), token).json;
            let h = &v["summary"]["routines"]["h"];
            if h["processed"].as_u64().unwrap_or(0) + h["failures"].as_u64().unwrap_or(0) >= 1 {
                assert_eq!(h["failures"], 0, "{v}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        id
    };
    let mut a_jobs = Vec::new();
    for n in 1..=10u64 {
        a_jobs.push(grow(TOKEN_A));
        let u = s.get("/v1/usage", TOKEN_A).json;
        assert_eq!(u["instances"]["live"], n.min(2), "{u}");
    }
    let b_jobs: Vec<String> = (0..3).map(|_| grow(TOKEN_B)).collect();
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(
        u["instances"],
        json!({"live": 2, "peak": 2, "quota": 2}),
        "{u}"
    );
    let ub = s.get("/v1/usage", TOKEN_B).json;
    assert_eq!(
        ub["instances"],
        json!({"live": 3, "peak": 3, "quota": 256}),
        "{ub}"
    );
    // a's two guests and b's three: 80 MB of grown memory, and some host overhead; the other
    // eight of a's 128 MB were let go.
    let grew = peak_rss(pid).saturating_sub(before);
    assert!(
        grew < 80 * MB + 64 * MIB,
        "the server grew by {} MiB",
        grew / MIB
    );
    for (token, jobs) in [(TOKEN_A, &a_jobs), (TOKEN_B, &b_jobs)] {
        for id in jobs {
            s.post(&format!("/v1/jobs/{id}/close"), token, json!({}));
            assert_eq!(s.wait_job(token, id)["status"], "completed");
        }
    }
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(u["instances"]["live"], 0, "{u}");
}

/// Tenant a's `queued_items` quota holds the items all its jobs keep queued together: with
/// two jobs whose routine is busy, the second's NDJSON post is taken only up to what the
/// first left of the quota, answered 429 naming the quota and the count taken, and the rest,
/// resent once the routines drain, is all delivered: nothing lost, nothing twice. Tenant b,
/// posting more than a's whole quota at once, does not feel it.
#[test]
fn a_tenants_queued_items_are_held_to_its_quota_and_the_rest_resent_is_delivered() {
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{queued_items: 1000}", ""));
    let flow = "flow_id: q\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    \
                concurrency: 1\n    policy: {batch_size: 1}\n    max_queue_length: {in: 5000}\n";
    for token in [TOKEN_A, TOKEN_B] {
        assert_eq!(s.put_plugin(token, "hostile", "hostile").status, 201);
        assert_eq!(s.put_flow(token, "q", flow).status, 201);
    }
    // A job whose routine sleeps on its first item, so that what follows stays queued.
    let busy_job = |token: &str| {
        let r = s.post(
            "/v1/flows/q/jobs",
            token,
            json!({"input": {"h.in": [{"do": "sleep", "ms": 6000}]}}),
        );
        assert_eq!(r.status, 201, "{}", r.json);
        r.json["id"].as_str().unwrap().to_owned()
    };
    let lines = |from: usize, to: usize| -> Vec<u8> {
        (from..to)
            .map(|i| format!("{{\"i\": {i}}}\n"))
            .collect::<String>()
            .into_bytes()
    };
    let post = |token: &str, id: &str, body: Vec<u8>| {
        s.req(
            "POST",
            &format!("/v1/jobs/{id}/items"),
            Some(token),
            Some(("application/x-ndjson", body)),
        )
    };
    let a1 = busy_job(TOKEN_A);
    let a2 = busy_job(TOKEN_A);
    let b = busy_job(TOKEN_B);
    let r = post(TOKEN_A, &a1, lines(0, 500));
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["accepted"], 500);
    // The second job's post is taken in units of up to 256 (each committed whole) while they
    // fit in what the first job left of the 1000; then the answer is 429.
    let r = post(TOKEN_A, &a2, lines(0, 700));
    assert_eq!(r.status, 429, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "slot_full", "{}", r.json);
    let message = r.json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("its tenant's quota of 1000 queued items"),
        "{message}"
    );
    let taken = r.json["error"]["accepted"].as_u64().unwrap() as usize;
    // (Units are cut within each piece of the body as it arrives: how many were taken
    // depends on the pieces, not that some were and the rest refused.)
    assert!((1..700).contains(&taken), "{}", r.json);
    let u = s.get("/v1/usage", TOKEN_A).json;
    let q = &u["queued_items"];
    assert_eq!(q["quota"], 1000, "{u}");
    assert!(q["used"].as_u64().unwrap() <= 1000, "{u}");
    assert!(q["peak"].as_u64().unwrap() <= 1000, "{u}");
    // b is not held to it.
    let r = post(TOKEN_B, &b, lines(0, 1500));
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["accepted"], 1500);
    // The rest, resent until taken.
    let mut sent = taken;
    let started = Instant::now();
    while sent < 700 {
        let r = post(TOKEN_A, &a2, lines(sent, 700));
        match r.status {
            200 => sent += r.json["accepted"].as_u64().unwrap() as usize,
            429 => {
                sent += r.json["error"]["accepted"].as_u64().unwrap() as usize;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!("{other}: {}", r.json),
        }
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    assert_eq!(sent, 700);
    for (token, id, n) in [
        (TOKEN_A, &a1, 501),
        (TOKEN_A, &a2, 701),
        (TOKEN_B, &b, 1501),
    ] {
        s.post(&format!("/v1/jobs/{id}/close"), token, json!({}));
        let v = s.wait_job(token, id);
        assert_eq!(v["status"], "completed", "{v}");
        assert_eq!(v["summary"]["routines"]["h"]["items_in"], n, "{v}");
        assert_eq!(v["summary"]["routines"]["h"]["processed"], n, "{v}");
    }
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(u["queued_items"]["used"], 0, "{u}");
    assert!(u["queued_items"]["peak"].as_u64().unwrap() <= 1000, "{u}");
    let ub = s.get("/v1/usage", TOKEN_B).json;
    assert_eq!(ub["queued_items"]["quota"], 1_000_000, "{ub}");
    assert!(ub["queued_items"]["peak"].as_u64().unwrap() >= 1500, "{ub}");
}

/// `routilux serve purge` removes a removed tenant's data for good, and nothing else: refused
/// while the tenant is in the configuration or live in the running server (its directory's
/// lock, which also keeps a second server off the same data directory), a dry run without
/// `--yes`; purged, the tenant comes back empty when it is added again.
#[test]
fn a_removed_tenant_is_purged_for_good_and_a_live_one_cannot_be() {
    let dir = scratch();
    let both = two_tenants("{}", "");
    let s = Server::start(dir.path(), &both);
    let data = dir.path().join("data");
    for token in [TOKEN_A, TOKEN_B] {
        assert_eq!(s.put_plugin(token, "hostile", "hostile").status, 201);
        assert_eq!(s.put_flow(token, "t", TALLY_FLOW).status, 201);
        let r = s.post(
            "/v1/flows/t/jobs",
            token,
            json!({"input": {"h.in": [serde_json::from_str::<Value>(&tally(1)).unwrap()]}}),
        );
        assert_eq!(r.status, 201, "{}", r.json);
    }
    let purge = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_routilux"))
            .args(["serve", "purge"])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let config = s.config_path.clone().unwrap();
    let cfg = config.to_str().unwrap();
    let data_arg = data.to_str().unwrap();
    let (code, out) = purge(&["a", "--config", cfg, "--data-dir", data_arg, "--yes"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("tenant `a` is in") && out.contains("remove it there"),
        "{out}"
    );
    let (code, out) = purge(&["a", "--data-dir", data_arg, "--yes"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("live in a running server"), "{out}");
    let (code, out) = purge(&["../b", "--data-dir", data_arg, "--yes"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("is not a tenant id"), "{out}");
    // A second server on the same data directory cannot take the tenants.
    let second = Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args([
            "serve",
            "--config",
            cfg,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_arg,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_ne!(second.status.code(), Some(0), "{err}");
    assert!(err.contains("another process holds it"), "{err}");
    assert!(data.join("tenants/a/index.json").exists());

    // a removed: its data stays until purged.
    let only_b = format!(
        "post_timeout: 300ms\ndrain_timeout: 10s\nthreads: 4\ntenants:\n  - id: b\n    tokens: [\"{}\"]\n",
        hash(TOKEN_B)
    );
    let said = reload(&s, &only_b);
    assert!(said.contains("routilux serve purge a"), "{said}");
    let (code, out) = purge(&["a", "--config", cfg, "--data-dir", data_arg]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("holds 1 plugins, 1 flows, 1 jobs") && out.contains("--yes"),
        "{out}"
    );
    assert!(data.join("tenants/a").exists(), "a dry run removes nothing");
    let (code, out) = purge(&["a", "--config", cfg, "--data-dir", data_arg, "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("purged tenant `a`"), "{out}");
    assert!(!data.join("tenants/a").exists());
    assert_eq!(
        std::fs::read_dir(data.join("tenants")).unwrap().count(),
        1,
        "only b's directory is left"
    );
    let (code, out) = purge(&["a", "--config", cfg, "--data-dir", data_arg, "--yes"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("there is no tenant `a`"), "{out}");

    // a again: empty, its usage too. b: untouched.
    let before = s.get("/v1/usage", TOKEN_B).json;
    let said = reload(&s, &both);
    assert!(said.contains("tenant `a` added"), "{said}");
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(u["workers"]["busy_seconds"], 0.0, "{u}");
    assert_eq!(u["memory_bytes"]["peak"], 0, "{u}");
    assert_eq!(
        s.get("/v1/usage", TOKEN_B).json["workers"]["busy_seconds"],
        before["workers"]["busy_seconds"]
    );
    assert_eq!(s.get("/v1/plugins", TOKEN_A).json, json!([]));
    assert_eq!(s.get("/v1/flows", TOKEN_A).json, json!([]));
    assert_eq!(s.get("/v1/jobs", TOKEN_A).json, json!([]));
    assert_eq!(s.get("/v1/jobs", TOKEN_B).json.as_array().unwrap().len(), 1);
    assert_eq!(
        s.get("/v1/flows", TOKEN_B).json.as_array().unwrap().len(),
        1
    );
}

/// A request body that stalls (a client that sent part of it and then nothing) is answered
/// 408 after `body_timeout` and its connection closed; a streamed NDJSON post that stalls says
/// how many items it took before, so a client resends exactly the rest. A body that keeps
/// coming, however slowly within the timeout, is read whole.
#[test]
fn a_stalled_request_body_is_answered_408_after_the_body_timeout() {
    use std::io::Write;
    let dir = scratch();
    let s = Server::start(dir.path(), &two_tenants("{}", "body_timeout: 800ms"));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    assert_eq!(s.put_flow(TOKEN_A, "t", TALLY_FLOW).status, 201);
    let r = s.post("/v1/flows/t/jobs", TOKEN_A, json!({}));
    let id = r.json["id"].as_str().unwrap().to_owned();
    let addr = s.base.trim_start_matches("http://").to_owned();
    let send = |head: String, parts: &[(&[u8], u64)]| {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(head.as_bytes()).unwrap();
        for (bytes, pause_ms) in parts {
            c.write_all(bytes).unwrap();
            std::thread::sleep(Duration::from_millis(*pause_ms));
        }
        let started = Instant::now();
        let got = read_until_closed(&mut c, Duration::from_secs(10)).expect("closed");
        (got, started.elapsed())
    };
    // A plugin upload that sends 10 of its 1000 bytes.
    let (got, _) = send(
        format!(
            "PUT /v1/plugins/p HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n\
             Content-Length: 1000\r\n\r\n"
        ),
        &[(b"0123456789", 0)],
    );
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("body_timeout"), "{got}");
    // A streamed post: two lines, then nothing.
    let (got, waited) = send(
        format!(
            "POST /v1/jobs/{id}/items?to=h.in HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
             {TOKEN_A}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        ),
        &[(
            format!(
                "{:x}\r\n{}\n{}\n\r\n",
                tally(1).len() + tally(2).len() + 2,
                tally(1),
                tally(2)
            )
            .as_bytes(),
            0,
        )],
    );
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("\"accepted\":2"), "{got}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // A slow body that keeps coming within the timeout is taken whole.
    let line = |i: u64| {
        let l = format!("{}\n", tally(i));
        format!("{:x}\r\n{l}\r\n", l.len()).into_bytes()
    };
    let (l3, l4, end) = (line(3), line(4), b"0\r\n\r\n".to_vec());
    let (got, _) = send(
        format!(
            "POST /v1/jobs/{id}/items?to=h.in HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
             {TOKEN_A}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n"
        ),
        &[(&l3, 500), (&l4, 500), (&end, 0)],
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("\"accepted\":2"), "{got}");
    s.post(&format!("/v1/jobs/{id}/close"), TOKEN_A, json!({}));
    assert_eq!(s.wait_job(TOKEN_A, &id)["status"], "completed");
    let state = s.get(&format!("/v1/jobs/{id}/state"), TOKEN_A).json;
    assert_eq!(state["h"].as_object().unwrap().len(), 4, "{state}");
}

/// A request body trickling in below `min_body_rate` (ten bytes a second, each piece well
/// within `body_timeout`) is answered 408 once the grace of 5 s is past, and its connection
/// closed; without the least rate this upload would hold its connection for hours.
#[test]
fn a_body_trickling_below_the_least_rate_is_answered_408() {
    use std::io::{Read, Write};
    let dir = scratch();
    let s = Server::start(
        dir.path(),
        &two_tenants("{}", "body_timeout: 3s\nmin_body_rate: 1KiB"),
    );
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.write_all(
        format!(
            "PUT /v1/plugins/p HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n\
             Content-Length: 100000\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(20) {
        let _ = c.write_all(b"0123456789");
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = started.elapsed();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "after {took:?}: {got}");
    assert!(got.contains("body_too_slow"), "{got}");
    assert!(got.contains("`min_body_rate` of 1.0 KiB/s"), "{got}");
    assert!(
        (Duration::from_secs(5)..Duration::from_secs(10)).contains(&took),
        "{took:?}"
    );
    // The server goes on.
    assert_eq!(s.get("/v1/plugins", TOKEN_A).status, 200);
}

/// One tenant's full storage is that tenant's: its posts answer 507 and its `/v1/usage` says
/// why, while the other tenant's job takes input and completes and `/readyz` stays true (the
/// data directory itself can be written). Tenant a's directory is a tmpfs of its own.
#[test]
fn one_tenants_full_storage_is_its_own_and_readyz_stays_true() {
    const SCRIPT: &str = r#"
        mkdir -p "$DATA/tenants/a" && mount -t tmpfs -o "size=$SIZE" routilux-a "$DATA/tenants/a" || exit 90
        exec "$@" --data-dir "$DATA"
    "#;
    let dir = scratch();
    let config = dir.path().join("serve.yaml");
    std::fs::write(&config, two_tenants("{}", "")).unwrap();
    let data = dir.path().join("data");
    let size = std::fs::metadata(plugin("hostile")).unwrap().len() + (1536 << 10);
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "bash", "-c", SCRIPT, "tenant-full"])
        .arg(env!("CARGO_BIN_EXE_routilux"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("SIZE", size.to_string())
        .env("DATA", &data);
    let s = Server::spawn(cmd);
    let mut jobs = Vec::new();
    for token in [TOKEN_A, TOKEN_B] {
        assert_eq!(s.put_plugin(token, "hostile", "hostile").status, 201);
        assert_eq!(s.put_flow(token, "t", TALLY_FLOW).status, 201);
        let r = s.post("/v1/flows/t/jobs", token, json!({}));
        assert_eq!(r.status, 201, "{}", r.json);
        jobs.push(r.json["id"].as_str().unwrap().to_owned());
    }
    let pad = "x".repeat(60 << 10);
    let post = |token: &str, id: &str, round: usize| {
        let body: String = (0..4)
            .map(|k| {
                json!({"do": "calls", "calls": [], "i": round * 4 + k, "pad": pad}).to_string()
                    + "\n"
            })
            .collect();
        s.req(
            "POST",
            &format!("/v1/jobs/{id}/items"),
            Some(token),
            Some(("application/x-ndjson", body.into_bytes())),
        )
    };
    let full = (0..400)
        .map(|round| post(TOKEN_A, &jobs[0], round))
        .find(|r| r.status != 200)
        .expect("a's storage fills up");
    assert_eq!(full.status, 507, "{}", full.json);
    let ready = s.req("GET", "/readyz", None, None);
    assert_eq!(
        ready.status, 200,
        "a's full storage is not the host's: {}",
        ready.json
    );
    let ua = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(ua["storage"]["ok"], false, "{ua}");
    assert!(
        ua["storage"]["error"].as_str().unwrap().contains("full"),
        "{ua}"
    );
    // b is untouched: its posts go in, its job completes, the server is ready.
    for round in 0..20 {
        let r = post(TOKEN_B, &jobs[1], round);
        assert_eq!(r.status, 200, "{}", r.json);
    }
    assert_eq!(s.get("/v1/usage", TOKEN_B).json["storage"]["ok"], true);
    let ready = s.req("GET", "/readyz", None, None);
    assert_eq!(ready.status, 200, "{}", ready.json);
    s.post(&format!("/v1/jobs/{}/close", jobs[1]), TOKEN_B, json!({}));
    assert_eq!(s.wait_job(TOKEN_B, &jobs[1])["status"], "completed");
    assert_eq!(s.req("GET", "/readyz", None, None).status, 200);
}

/// A tenant's requests hold at most its `request_bytes` of request bodies in memory: while
/// one upload holds most of them, another of its requests waits for room up to the body
/// timeout and is answered 503 naming the quota (its bytes stay in the client's socket, not
/// the server); another tenant's request is not held to it; once the upload ends, the same
/// request goes through.
#[test]
fn a_tenants_request_bodies_are_held_to_its_request_bytes() {
    const MIB: usize = 1 << 20;
    let dir = scratch();
    let s = Server::start(
        dir.path(),
        &two_tenants(
            "{request_bytes: 16MiB, plugin_bytes: 8MiB}",
            // (The upload trickles: no least rate, only the body timeout, cuts it.)
            "body_timeout: 1s\nmin_body_rate: 0",
        ),
    );
    for token in [TOKEN_A, TOKEN_B] {
        assert_eq!(s.put_plugin(token, "hostile", "hostile").status, 201);
        assert_eq!(s.put_flow(token, "t", TALLY_FLOW).status, 201);
    }
    let addr = s.base.trim_start_matches("http://").to_owned();
    // An upload of a's that sends 7 of its 8 MiB and then a byte every 300 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upload = trickling_upload(&addr, "big".into(), stop.clone());
    // Wait until the server holds the upload's bytes.
    let started = Instant::now();
    while s.get("/v1/usage", TOKEN_A).json["request_bytes"]["used"]
        .as_u64()
        .unwrap()
        < 6 * MIB as u64
    {
        assert!(started.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    // A 12 MiB job start: 9 MiB are left.
    let start = |token: &str| start_big_job(&addr, token);
    let refused = start(TOKEN_A).join().unwrap();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("request_bytes"), "{refused}");
    // b's quota is its own.
    let b = start(TOKEN_B).join().unwrap();
    assert!(b.starts_with("HTTP/1.1 201"), "{b}");
    // The upload stalls, is cut, and gives its bytes back.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cut = upload.join().unwrap();
    assert!(cut.starts_with("HTTP/1.1 408"), "{cut}");
    let started = Instant::now();
    while s.get("/v1/usage", TOKEN_A).json["request_bytes"]["used"] != 0 {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = start(TOKEN_A).join().unwrap();
    assert!(again.starts_with("HTTP/1.1 201"), "{again}");
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(u["request_bytes"]["quota"], 16 * MIB as u64, "{u}");
}

/// A reload lowering `request_bytes` below what the tenant's requests hold now takes effect
/// as they end: four uploads hold 28 of 32 MiB, the quota drops to 16 MiB, and once they are
/// cut the tenant has exactly 16 MiB (a 7 MiB upload and a 12 MiB job start no longer fit
/// together; before, the permits the uploads held all came back and it had 28).
#[test]
fn lowering_request_bytes_by_reload_holds_once_the_requests_holding_it_end() {
    const MIB: u64 = 1 << 20;
    let dir = scratch();
    let config = |quota: &str| {
        two_tenants(
            &format!("{{request_bytes: {quota}, plugin_bytes: 8MiB}}"),
            "body_timeout: 1s\nmin_body_rate: 0",
        )
    };
    let s = Server::start(dir.path(), &config("32MiB"));
    assert_eq!(s.put_plugin(TOKEN_A, "hostile", "hostile").status, 201);
    assert_eq!(s.put_flow(TOKEN_A, "t", TALLY_FLOW).status, 201);
    let addr = s.base.trim_start_matches("http://").to_owned();
    // An upload that sends 7 of its 8 MiB, then a byte every 300 ms until `stop`.
    let upload = |i: usize, stop: Arc<std::sync::atomic::AtomicBool>| {
        trickling_upload(&addr, format!("big{i}"), stop)
    };
    let used = || {
        s.get("/v1/usage", TOKEN_A).json["request_bytes"]["used"]
            .as_u64()
            .unwrap()
    };
    let wait_used = |at_least: u64| {
        let started = Instant::now();
        while used() < at_least {
            assert!(started.elapsed() < Duration::from_secs(20), "{}", used());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let four: Vec<_> = (0..4).map(|i| upload(i, stop.clone())).collect();
    wait_used(28 * MIB);
    reload(&s, &config("16MiB"));
    let u = s.get("/v1/usage", TOKEN_A).json;
    assert_eq!(u["request_bytes"]["quota"], 16 * MIB, "{u}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for u in four {
        assert!(u.join().unwrap().starts_with("HTTP/1.1 408"));
    }
    let started = Instant::now();
    while used() != 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", used());
        std::thread::sleep(Duration::from_millis(20));
    }
    // 7 MiB held: a 12 MiB job start does not fit the 16 MiB.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let one = upload(9, stop.clone());
    wait_used(7 * MIB);
    let refused = start_big_job(&addr, TOKEN_A).join().unwrap();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("\"quota\":\"request_bytes\""), "{refused}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    one.join().unwrap();
    let started = Instant::now();
    while used() != 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", used());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Alone, it fits.
    let alone = start_big_job(&addr, TOKEN_A).join().unwrap();
    assert!(alone.starts_with("HTTP/1.1 201"), "{alone}");
}

/// The server's peak resident memory shows `request_bytes` holding: sixteen uploads of
/// tenant a at once, each sending 7 of its 8 MiB and then trickling, keep at most the quota's
/// 16 MiB of bodies in the server (the rest wait in their clients' sockets, then are answered
/// 503); with a quota of 1 GiB the same uploads take the server 112 MiB more.
#[test]
fn peak_memory_shows_request_bytes_bounding_a_flood_of_uploads() {
    const MIB: u64 = 1 << 20;
    let flood = |quota: &str| {
        let dir = scratch();
        let s = Server::start(
            dir.path(),
            &two_tenants(
                &format!("{{request_bytes: {quota}, plugin_bytes: 8MiB}}"),
                "body_timeout: 2s\nmin_body_rate: 0",
            ),
        );
        let addr = s.base.trim_start_matches("http://").to_owned();
        let pid = s.child.id();
        let before = peak_rss(pid);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let uploads: Vec<_> = (0..16)
            .map(|i| trickling_upload(&addr, format!("big{i}"), stop.clone()))
            .collect();
        // Long enough for every upload to have sent what it could and been read or held.
        std::thread::sleep(Duration::from_secs(3));
        let grew = peak_rss(pid).saturating_sub(before);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for u in uploads {
            u.join().unwrap();
        }
        assert_eq!(s.get("/v1/plugins", TOKEN_A).status, 200);
        grew
    };
    let bounded = flood("16MiB");
    let unbounded = flood("1GiB");
    eprintln!(
        "peak RSS growth: {} MiB with request_bytes 16 MiB, {} MiB with 1 GiB",
        bounded / MIB,
        unbounded / MIB
    );
    assert!(
        bounded < 48 * MIB,
        "16 MiB of bodies took the server {} MiB",
        bounded / MIB
    );
    assert!(
        unbounded > 100 * MIB,
        "without the quota the uploads took only {} MiB: the test shows nothing",
        unbounded / MIB
    );
}

/// Uploads of ever new versions of a component cannot grow the compiled-component cache past
/// `compiled_cache_bytes`: on disk only the newest entries stay (the oldest are pruned), and an
/// upload of a version whose entry went is compiled again, and works.
#[test]
fn new_versions_of_a_component_keep_the_compiled_cache_within_its_bytes() {
    let dir = scratch();
    let cache = dir.path().join("cache");
    let path = dir.path().join("serve.yaml");
    std::fs::write(&path, two_tenants("{}", "compiled_cache_bytes: 1")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_routilux"));
    cmd.args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("ROUTILUX_CACHE_DIR", &cache);
    let s = Server::spawn(cmd);
    let entries = || {
        std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .count()
    };
    for v in 0..4 {
        let r = s.put(
            "/v1/plugins/hostile",
            TOKEN_A,
            "application/wasm",
            another_version(&format!("v{v}")),
        );
        assert!(r.status == 200 || r.status == 201, "{}", r.json);
        assert_eq!(entries(), 1, "only the newest compiled entry is kept");
    }
    // The first version again: its entry went, it compiles again and runs.
    let r = s.put(
        "/v1/plugins/hostile",
        TOKEN_A,
        "application/wasm",
        another_version("v0"),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(s.put_flow(TOKEN_A, "t", TALLY_FLOW).status, 201);
    let r = s.post(
        "/v1/flows/t/jobs",
        TOKEN_A,
        json!({"input": {"h.in": [serde_json::from_str::<Value>(&tally(1)).unwrap()]}, "close": true}),
    );
    let id = r.json["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_job(TOKEN_A, &id)["status"], "completed");
    assert_eq!(entries(), 1);
}
