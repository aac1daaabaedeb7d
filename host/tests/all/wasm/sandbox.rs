//! The sandbox: no filesystem, environment or network unless granted; guest output kept per
//! job and routine.

use routilux::wasm::Permissions;
use routilux::{Flow, JobStatus};
use serde_json::{Value, json};

use super::{WAIT, engine, load, recording_runtime};
use crate::common::Log;
use crate::plugins::plugin;

fn probe(plugin: &routilux::wasm::Plugin, path: &str) -> Value {
    probe_with(plugin, &json!({"path": path, "env": "PATH"}))
}

fn probe_with(plugin: &routilux::wasm::Plugin, request: &Value) -> Value {
    let seen: Log<Value> = Log::new();
    let s = seen.clone();
    let mut flow = Flow::new();
    flow.add_routine(plugin.routine("probe").unwrap(), "probe")
        .add_routine(
            routilux::Routine::new().slot("in").logic(move |_, b| {
                for i in b.items() {
                    s.push(i.value().clone());
                }
                Ok(())
            }),
            "report",
        )
        .connect("probe", "out", "report", "in");
    let (rt, _) = recording_runtime(1);
    rt.register("probe", &flow).unwrap();
    let job = rt.post("probe", "probe", "in", request).unwrap();
    assert!(job.wait(WAIT));
    assert_eq!(job.status(), JobStatus::Completed, "{:?}", job.errors());
    seen.get()[0].clone()
}

#[test]
fn nothing_is_granted_by_default_and_grants_are_read_only() {
    let dir = std::env::temp_dir().join(format!("routilux-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("note.txt"), "granted").unwrap();
    assert!(
        std::env::var("PATH").is_ok(),
        "the test needs PATH set on the host"
    );

    let closed = probe(&load("fixtures"), "/data/note.txt");
    assert!(closed["file"]["error"].is_string(), "{closed}");
    assert_eq!(closed["env"], Value::Null, "no environment by default");

    let granted = engine()
        .load_with(
            plugin("fixtures"),
            Permissions {
                read_only_dirs: vec![(dir.clone(), "/data".into())],
                env: vec!["PATH".into()],
            },
        )
        .unwrap();
    let open = probe(&granted, "/data/note.txt");
    assert_eq!(open["file"]["ok"], "granted", "{open}");
    assert_eq!(open["env"], json!(std::env::var("PATH").unwrap()));
}

#[test]
fn sockets_are_refused_even_to_a_listening_local_port() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Even a plugin granted a directory and the environment gets no network.
    let granted = engine()
        .load_with(
            plugin("fixtures"),
            Permissions {
                read_only_dirs: vec![(std::env::temp_dir(), "/tmp".into())],
                env: vec!["PATH".into()],
            },
        )
        .unwrap();
    for plugin in [load("fixtures"), granted] {
        let seen = probe_with(&plugin, &json!({ "connect": addr }));
        assert!(
            seen["connect"]["error"].is_string(),
            "the guest connected: {seen}"
        );
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the listener saw a connection: {other:?}"),
        }
    }
}

#[test]
fn guest_output_stays_with_its_job_and_routine() {
    let news = load("news");
    let mut flow = Flow::new();
    flow.add_routine(
        news.routine("broadcaster").unwrap().config("delay_ms", 0),
        "broadcaster",
    )
    .add_routine(news.routine("email").unwrap(), "email")
    .add_routine(news.routine("sms").unwrap(), "sms")
    .connect("broadcaster", "news", "email", "news")
    .connect("broadcaster", "news", "sms", "news");
    let (rt, _) = recording_runtime(2);
    rt.register("news", &flow).unwrap();
    let a = rt
        .post(
            "news",
            "broadcaster",
            "trigger",
            &json!({"headlines": ["a1", "a2", "a3"]}),
        )
        .unwrap();
    let b = rt
        .post(
            "news",
            "broadcaster",
            "trigger",
            &json!({"headlines": ["b1", "b2"]}),
        )
        .unwrap();
    assert!(rt.wait_until_all_jobs_finished(WAIT));
    let lines = |job: &routilux::JobHandle, routine: &str| -> Vec<String> {
        job.output()
            .into_iter()
            .filter(|l| l.routine == routine)
            .map(|l| l.message)
            .collect()
    };
    let email = |h: &[&str]| -> Vec<String> {
        h.iter()
            .map(|h| format!("  [Email Service] Would send email: {h}"))
            .collect()
    };
    let sms = |h: &[&str]| -> Vec<String> {
        h.iter()
            .map(|h| format!("  [SMS Service] Would send SMS: {h}..."))
            .collect()
    };
    assert_eq!(lines(&a, "email"), email(&["a1", "a2", "a3"]));
    assert_eq!(lines(&a, "sms"), sms(&["a1", "a2", "a3"]));
    assert_eq!(lines(&b, "email"), email(&["b1", "b2"]));
    assert_eq!(lines(&b, "sms"), sms(&["b1", "b2"]));
}
