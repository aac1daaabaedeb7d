//! `routilux serve` benchmark: item posts over HTTP against the same posts made in-process
//! (a durable job through the library API, and an in-memory one), side by side in one run, so
//! that what the HTTP layer and durability each cost reads as a ratio.
//!
//! ```text
//! cargo bench -p routilux --bench serve                  # release build
//! cargo bench -p routilux --bench serve --profile dev -- --reps 5 --requests 1000
//! ```
//!
//! The server is the real binary on 127.0.0.1 (a fresh data directory under `target/`), one
//! tenant, a flow of one wasm routine (the hostile fixture's forward) whose slot is never the
//! bottleneck. Scenarios alternate within each repetition; figures are medians over the
//! repetitions: items acknowledged per second and the latency of each request (or post).

#![allow(missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use routilux::{Flow, Item, JobStore, Runtime};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[path = "../../tests/support/plugins.rs"]
mod plugins;
#[allow(dead_code)]
mod support;

const TOKEN: &str = "rlx_bench_0123456789abcdef0123456789abcdef";

struct Server {
    child: std::process::Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &std::path::Path) -> Server {
    let hash: String = Sha256::digest(TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let config = dir.join("serve.yaml");
    std::fs::write(
        &config,
        format!(
            "threads: 2\npost_timeout: 30s\ntenants:\n  - id: bench\n    tokens: [\"sha256:{hash}\"]\n    quotas: {{jobs: 64}}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_routilux"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut lines = BufReader::new(err).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server prints its address")
            .unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        base: format!("http://{addr}"),
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn call(a: &ureq::Agent, method: &str, url: &str, ct: &str, body: Vec<u8>) -> (u16, Value) {
    let req = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("Authorization", format!("Bearer {TOKEN}"))
        .header("Content-Type", ct)
        .body(body)
        .unwrap();
    let mut r = a.run(req).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

const FLOW: &str = "flow_id: fwd\nroutines:\n  h:\n    plugin: hostile\n    kind: hostile\n    max_queue_length: {in: 100000}\n";

fn item(i: usize) -> Value {
    json!({"do": "forward", "i": i, "text": "a headline of about sixty bytes, as the fan-out's are"})
}

/// One scenario's run: items acknowledged per second, and each request's latency (ms).
struct Figures {
    items_per_s: f64,
    latencies_ms: Vec<f64>,
}

fn http_run(s: &Server, requests: usize, clients: usize, per_request: usize) -> Figures {
    let a = agent();
    let (st, v) = call(
        &a,
        "POST",
        &format!("{}/v1/flows/fwd/jobs", s.base),
        "application/json",
        b"{}".to_vec(),
    );
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/jobs/{id}/items", s.base);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                let a = agent();
                let mut lat = Vec::new();
                for r in 0..requests / clients {
                    let (ct, body) = if per_request == 1 {
                        (
                            "application/json",
                            item(r * clients + c).to_string().into_bytes(),
                        )
                    } else {
                        let b: String = (0..per_request)
                            .map(|k| item(r * per_request + k).to_string() + "\n")
                            .collect();
                        ("application/x-ndjson", b.into_bytes())
                    };
                    let t = Instant::now();
                    let (st, v) = call(&a, "POST", &url, ct, body);
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(st, 200, "{v}");
                    assert_eq!(v["accepted"], per_request);
                }
                lat
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for t in threads {
        latencies_ms.extend(t.join().unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    call(
        &a,
        "POST",
        &format!("{}/v1/jobs/{id}/close", s.base),
        "application/json",
        b"{}".to_vec(),
    );
    Figures {
        items_per_s: (requests / clients * clients * per_request) as f64 / secs,
        latencies_ms,
    }
}

/// The same posts in-process: `Input::post_items` of `per_request` items, durable (a job store
/// in `dir`) or in memory.
fn in_process(dir: Option<&std::path::Path>, requests: usize, per_request: usize) -> Figures {
    let engine = support::engine(None);
    let plugin = engine.load(plugins::plugin("hostile")).unwrap();
    let mut flow = Flow::new();
    flow.add_routine(
        plugin
            .routine("hostile")
            .unwrap()
            .max_queue_length("in", 100_000),
        "h",
    );
    let runtime = Runtime::builder().thread_pool_size(2).build();
    runtime.register("fwd", &flow).unwrap();
    let (job, hold) = match dir {
        Some(d) => {
            let store = JobStore::open(d, b"bench").unwrap();
            let (j, h) = runtime.exec_durable("fwd", store).unwrap();
            (j, h)
        }
        None => {
            let j = runtime.exec("fwd").unwrap();
            let h = j.hold_open().unwrap();
            (j, h)
        }
    };
    let input = job.input("h", "in").unwrap();
    let started = Instant::now();
    let mut latencies_ms = Vec::new();
    for r in 0..requests {
        let items: Vec<Item> = (0..per_request)
            .map(|k| Item::new(item(r * per_request + k)).unwrap())
            .collect();
        let t = Instant::now();
        input.post_items(items, Vec::new()).unwrap();
        latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let secs = started.elapsed().as_secs_f64();
    drop(input);
    drop(hold);
    job.wait(Duration::from_secs(60));
    Figures {
        items_per_s: (requests * per_request) as f64 / secs,
        latencies_ms,
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let reps = arg("--reps", 5);
    let requests = arg("--requests", 1000);
    let base = plugins::repo_root().join("target").join("bench-serve");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let server = start_server(&base);
    {
        let a = agent();
        let bytes = std::fs::read(plugins::plugin("hostile")).unwrap();
        let (st, v) = call(
            &a,
            "PUT",
            &format!("{}/v1/plugins/hostile", server.base),
            "application/wasm",
            bytes,
        );
        assert_eq!(st, 201, "{v}");
        let (st, v) = call(
            &a,
            "PUT",
            &format!("{}/v1/flows/fwd", server.base),
            "application/yaml",
            FLOW.as_bytes().to_vec(),
        );
        assert_eq!(st, 201, "{v}");
    }
    type Run = Box<dyn Fn(usize) -> Figures>;
    let server = Arc::new(server);
    let scenarios: Vec<(&str, Run)> = vec![
        ("HTTP, 1 item per request, 1 client", {
            let s = server.clone();
            Box::new(move |_| http_run(&s, requests, 1, 1))
        }),
        ("HTTP, 1 item per request, 4 clients", {
            let s = server.clone();
            Box::new(move |_| http_run(&s, requests, 4, 1))
        }),
        ("in-process durable, 1 item per post", {
            let b = base.clone();
            Box::new(move |rep| in_process(Some(&b.join(format!("p1-{rep}"))), requests, 1))
        }),
        (
            "in-process in memory, 1 item per post",
            Box::new(move |_| in_process(None, requests, 1)),
        ),
        ("HTTP NDJSON, 100 items per request, 1 client", {
            let s = server.clone();
            Box::new(move |_| http_run(&s, requests / 10, 1, 100))
        }),
        ("in-process durable, 100 items per post", {
            let b = base.clone();
            Box::new(move |rep| {
                in_process(Some(&b.join(format!("p100-{rep}"))), requests / 10, 100)
            })
        }),
        (
            "in-process in memory, 100 items per post",
            Box::new(move |_| in_process(None, requests / 10, 100)),
        ),
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        vec![Default::default(); scenarios.len()];
    for rep in 0..reps {
        for (i, (_, run)) in scenarios.iter().enumerate() {
            let mut f = run(rep);
            results[i].0.push(f.items_per_s);
            results[i].1.push(pct(&mut f.latencies_ms, 0.5));
            results[i].2.push(pct(&mut f.latencies_ms, 0.99));
        }
    }
    println!(
        "serve item posts: {reps} runs, {requests} requests (or posts) per single-item run, medians"
    );
    println!(
        "{:<48} {:>12} {:>10} {:>10}",
        "scenario", "items/s", "p50 ms", "p99 ms"
    );
    for (i, (name, _)) in scenarios.iter().enumerate() {
        let (a, b, c) = &results[i];
        println!(
            "{:<48} {:>12.0} {:>10.3} {:>10.3}",
            name,
            support::median(a.clone()),
            support::median(b.clone()),
            support::median(c.clone())
        );
    }
}
