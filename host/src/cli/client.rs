//! The CLI as a client of `routilux serve`: `deploy` a flow file with its plugins, `post`
//! items (starting a job, or to a running one), `jobs` to list, show and follow them. The
//! server and token come from `--server`/`--token` or `ROUTILUX_SERVER`/`ROUTILUX_TOKEN`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::Code;
use super::load::PluginOptions;
use super::plugins::PluginDirs;

/// Where the server is and who we are.
pub(crate) struct Remote {
    pub server: String,
    pub token: String,
}

struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

impl Remote {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer, String> {
        let b = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token));
        let r = match body {
            Some((ct, bytes)) => Self::agent().run(
                b.header("Content-Type", ct)
                    .body(bytes)
                    .map_err(|e| e.to_string())?,
            ),
            None => Self::agent().run(b.body(()).map_err(|e| e.to_string())?),
        };
        let mut r = r.map_err(|e| format!("cannot reach {}: {e}", self.server))?;
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let text = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| format!("reading the answer of {}: {e}", self.server))?;
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    /// `call`, then `ok`: the answer's body, or what went wrong as a message.
    fn request(
        &self,
        what: &str,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value, String> {
        let a = self.call(method, path, body)?;
        self.ok(what, a)
    }

    /// The answer's body, or its error as a message.
    fn ok(&self, what: &str, a: Answer) -> Result<Value, String> {
        if (200..300).contains(&a.status) {
            return Ok(a.body);
        }
        let e = &a.body["error"];
        let mut msg = format!(
            "{what}: the server answered {} ({}): {}",
            a.status,
            e["code"].as_str().unwrap_or("?"),
            e["message"].as_str().unwrap_or("")
        );
        if let Some(ds) = e["diagnostics"].as_array() {
            for d in ds {
                msg.push_str(&format!(
                    "\n  {}: {} (at {}:{}:{})",
                    d["severity"].as_str().unwrap_or("error"),
                    d["message"].as_str().unwrap_or(""),
                    d["file"].as_str().unwrap_or(""),
                    d["line"],
                    d["column"]
                ));
            }
        }
        Err(crate::term::escape_multiline(&msg).into_owned())
    }
}

fn fail(e: String) -> Code {
    errln!("error: {e}");
    Code::Failed
}

/// `routilux deploy FLOW [--plugins DIR]...`: checks the flow file here (every problem, at
/// its place), uploads each plugin it uses (by its name: a `plugin:` path uploads under the
/// file's stem), then the flow, without what a tenant's flow may not say (`plugins:`,
/// `thread_pool_size`).
pub(crate) fn deploy(remote: &Remote, flow: &Path, options: &PluginOptions) -> Code {
    let Some(engine) = super::engine() else {
        return Code::Failed;
    };
    let loaded = match super::load::load(flow, &engine, options) {
        Ok(l) => l,
        Err(diags) => {
            super::print_diagnostics(&diags);
            return Code::Invalid;
        }
    };
    let text = match std::fs::read_to_string(flow) {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot read {}: {e}", flow.display())),
    };
    let mut doc: Value = match serde_saphyr::from_str(&text) {
        Ok(v) => v,
        Err(e) => return fail(format!("{}: {e}", flow.display())),
    };
    // Which component each routine's `plugin:` names, as `load` found it.
    let base = flow.parent().unwrap_or(Path::new("."));
    let mut dirs = PluginDirs::default();
    for d in &options.dirs {
        let _ = dirs.scan(d);
    }
    let listed: Vec<String> = match &doc["plugins"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    for d in &listed {
        let _ = dirs.scan(&base.join(d));
    }
    if listed.is_empty() && options.dirs.is_empty() && base.join("plugins").is_dir() {
        let _ = dirs.scan(&base.join("plugins"));
    }
    let mut uploads: BTreeMap<String, PathBuf> = BTreeMap::new();
    if let Some(routines) = doc["routines"].as_object_mut() {
        for (id, r) in routines.iter_mut() {
            let Some(p) = r["plugin"].as_str().map(str::to_owned) else {
                continue;
            };
            let path = if p.ends_with(".wasm") || p.contains('/') {
                base.join(&p)
            } else {
                match dirs.by_name.get(&p).map(Vec::as_slice) {
                    Some([one]) => one.clone(),
                    _ => return fail(format!("routine `{id}`: cannot find plugin `{p}`")),
                }
            };
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or(p);
            r["plugin"] = json!(name);
            uploads.insert(name, path);
        }
    }
    if let Some(o) = doc.as_object_mut() {
        o.remove("plugins");
        if let Some(e) = o.get_mut("execution").and_then(Value::as_object_mut) {
            e.remove("thread_pool_size");
        }
    }
    for (name, path) in &uploads {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
        };
        match remote.request(
            &format!("plugin `{name}`"),
            "PUT",
            &format!("/v1/plugins/{name}"),
            Some(("application/wasm", bytes)),
        ) {
            Ok(v) => errln!(
                "plugin `{name}`: uploaded ({} bytes, sha256 {}…)",
                v["size_bytes"],
                v["sha256"].as_str().unwrap_or("").get(..12).unwrap_or("")
            ),
            Err(e) => return fail(e),
        }
    }
    let id = loaded.flow_id.clone();
    match remote.request(
        &format!("flow `{id}`"),
        "PUT",
        &format!("/v1/flows/{id}"),
        Some(("application/json", doc.to_string().into_bytes())),
    ) {
        Ok(v) => {
            let entries: Vec<&str> = v["entries"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            outln!(
                "flow `{id}` deployed ({} routines; entry slots: {})",
                v["routines"],
                entries.join(", ")
            );
            Code::Ok
        }
        Err(e) => fail(e),
    }
}

/// What `routilux post` sends.
pub(crate) struct PostArgs {
    /// Start a job of this flow (and close it after the items, unless `keep_open`).
    pub flow: Option<String>,
    /// Or post to this running job.
    pub job: Option<String>,
    pub to: Option<String>,
    pub posts: Vec<String>,
    pub inputs: Vec<PathBuf>,
    pub keep_open: bool,
    pub follow: bool,
}

/// `routilux post`: items from `--post JSON` and `--input FILE.jsonl` (streamed in requests of
/// up to 1000 lines; a 429 is waited out and exactly the rest resent), to a new job of
/// `--flow` (printing its id) or to `--job`.
pub(crate) fn post(remote: &Remote, args: PostArgs) -> Code {
    let job = match (&args.flow, &args.job) {
        (Some(flow), None) => {
            let body = if args.posts.is_empty() && args.inputs.is_empty() && !args.keep_open {
                // The flow file's own `input:`, then closed.
                json!({"close": true})
            } else {
                json!({})
            };
            match remote.request(
                &format!("starting a job of `{flow}`"),
                "POST",
                &format!("/v1/flows/{flow}/jobs"),
                Some(("application/json", body.to_string().into_bytes())),
            ) {
                Ok(v) => {
                    let id = v["id"].as_str().unwrap_or("").to_owned();
                    outln!("{id}");
                    id
                }
                Err(e) => return fail(e),
            }
        }
        (None, Some(job)) => job.clone(),
        _ => {
            errln!("error: give --flow ID (start a job) or --job ID (post to a running one)");
            return Code::Usage;
        }
    };
    let path = match &args.to {
        Some(to) => format!("/v1/jobs/{job}/items?to={to}"),
        None => format!("/v1/jobs/{job}/items"),
    };
    let mut lines: Vec<String> = args.posts.clone();
    let mut sent = 0u64;
    let mut send = |lines: &mut Vec<String>| -> Result<(), String> {
        while !lines.is_empty() {
            let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let a = remote.call(
                "POST",
                &path,
                Some(("application/x-ndjson", body.into_bytes())),
            )?;
            let taken = if a.status == 200 {
                a.body["accepted"].as_u64().unwrap_or(0)
            } else {
                a.body["error"]["accepted"].as_u64().unwrap_or(0)
            } as usize;
            sent += taken as u64;
            lines.drain(..taken.min(lines.len()));
            match a.status {
                200 => {}
                429 => std::thread::sleep(Duration::from_secs(a.retry_after.unwrap_or(1))),
                _ => {
                    remote.ok("posting", a)?;
                }
            }
        }
        Ok(())
    };
    if let Err(e) = send(&mut lines) {
        return fail(e);
    }
    for file in &args.inputs {
        let f = match std::fs::File::open(file) {
            Ok(f) => f,
            Err(e) => return fail(format!("cannot read {}: {e}", file.display())),
        };
        for line in BufReader::new(f).lines() {
            match line {
                Ok(l) if l.trim().is_empty() => {}
                Ok(l) => lines.push(l),
                Err(e) => return fail(format!("reading {}: {e}", file.display())),
            }
            if lines.len() >= 1000
                && let Err(e) = send(&mut lines)
            {
                return fail(e);
            }
        }
    }
    if let Err(e) = send(&mut lines) {
        return fail(e);
    }
    if sent > 0 {
        errln!("{sent} items posted to job {job}");
    }
    if args.flow.is_some()
        && !args.keep_open
        && !(args.posts.is_empty() && args.inputs.is_empty())
        && let Err(e) = remote.request(
            "closing the job",
            "POST",
            &format!("/v1/jobs/{job}/close"),
            Some(("application/json", b"{}".to_vec())),
        )
    {
        return fail(e);
    }
    if args.follow {
        return follow(remote, &job);
    }
    Code::Ok
}

/// `routilux jobs [ID] [--follow]`: the tenant's jobs, one job's status and summary (JSON),
/// or its events as they come: routine stdout to stdout, the rest to stderr, until it ends
/// (the exit code says how).
pub(crate) fn jobs(remote: &Remote, id: Option<&str>, follow_it: bool) -> Code {
    match (id, follow_it) {
        (Some(id), true) => follow(remote, id),
        (Some(id), false) => {
            match remote.request(&format!("job {id}"), "GET", &format!("/v1/jobs/{id}"), None) {
                Ok(v) => {
                    outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    Code::Ok
                }
                Err(e) => fail(e),
            }
        }
        (None, _) => match remote.request("jobs", "GET", "/v1/jobs", None) {
            Ok(v) => {
                for j in v.as_array().into_iter().flatten() {
                    outln!(
                        "{}  {:<10}  {}",
                        j["id"].as_str().unwrap_or(""),
                        j["status"].as_str().unwrap_or(""),
                        crate::term::escape(j["flow"].as_str().unwrap_or(""))
                    );
                }
                Code::Ok
            }
            Err(e) => fail(e),
        },
    }
}

/// Follows a job's events to its end; guest text is escaped for the terminal.
fn follow(remote: &Remote, id: &str) -> Code {
    let mut last: Option<String> = None;
    loop {
        let mut req = Remote::agent()
            .get(remote.url(&format!("/v1/jobs/{id}/events")))
            .header("Authorization", format!("Bearer {}", remote.token));
        if let Some(l) = &last {
            req = req.header("Last-Event-ID", l);
        }
        let mut r = match req.call() {
            Ok(r) => r,
            Err(e) => return fail(format!("cannot reach {}: {e}", remote.server)),
        };
        if r.status().as_u16() != 200 {
            let text = r.body_mut().read_to_string().unwrap_or_default();
            return fail(format!(
                "job {id}: the server answered {}: {}",
                r.status().as_u16(),
                crate::term::escape(&text)
            ));
        }
        let reader = BufReader::new(r.body_mut().with_config().limit(u64::MAX).reader());
        let (mut event, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if line.is_empty() {
                let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                match event.as_str() {
                    "output" if v["level"] == "stdout" => {
                        outln!(
                            "{}",
                            crate::term::escape(v["message"].as_str().unwrap_or(""))
                        );
                    }
                    "output" => errln!(
                        "[{}] {}: {}",
                        v["routine"].as_str().unwrap_or(""),
                        v["level"].as_str().unwrap_or(""),
                        v["message"].as_str().unwrap_or("")
                    ),
                    "error" => errln!(
                        "error in `{}`: {}",
                        v["routine"].as_str().unwrap_or(""),
                        v["error"].as_str().unwrap_or("")
                    ),
                    "status" => {
                        let s = v["status"].as_str().unwrap_or("");
                        errln!("job {id}: {s}");
                        if !matches!(s, "running" | "paused") {
                            let _ = std::io::stdout().flush();
                            return if s == "completed" {
                                Code::Ok
                            } else {
                                Code::Failed
                            };
                        }
                    }
                    "dropped" => errln!("({} earlier events were not kept)", v["dropped"]),
                    _ => {}
                }
                event.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("id:") {
                last = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        // The stream ended without a final status (the server stopped): ask again.
        std::thread::sleep(Duration::from_millis(500));
    }
}
