//! The host imports with arbitrary arguments: the hostile fixture makes whatever raw calls
//! the input lists (emits of any text on any event, state keys and values of any size and
//! shape, logs, config lookups, compare-and-swaps). The host never panics, the job always
//! finishes, and every item is accounted for.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use routilux::wasm::{Plugin, WasmConfig, WasmEngine};
use routilux::{ErrorStrategy, Flow, Routine, RoutineBudgets, Runtime};

#[derive(Arbitrary, Debug)]
enum F {
    Emit,
    Log,
    Config,
    StateGet,
    StateSet,
    StateAdd,
    Cas,
    JobId,
}

#[derive(Arbitrary, Debug)]
struct Call {
    f: F,
    a: String,
    b: String,
    c: Option<String>,
    n: i64,
}

fn hostile() -> &'static Plugin {
    static P: OnceLock<Plugin> = OnceLock::new();
    P.get_or_init(|| {
        let engine = WasmEngine::new(WasmConfig {
            cache: false,
            ..WasmConfig::default()
        })
        .expect("an engine");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../plugins/target/wasm32-wasip2/release/hostile.wasm"
        );
        engine
            .load(path)
            .expect("plugins/ built (just plugins)")
    })
}

fuzz_target!(|calls: Vec<Call>| {
    let calls: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| {
            let f = match c.f {
                F::Emit => "emit",
                F::Log => "log",
                F::Config => "config",
                F::StateGet => "state_get",
                F::StateSet => "state_set",
                F::StateAdd => "state_add",
                F::Cas => "cas",
                F::JobId => "job_id",
            };
            serde_json::json!({"f": f, "a": c.a, "b": c.b, "c": c.c, "n": c.n})
        })
        .collect();
    let budgets = RoutineBudgets {
        item_bytes: 4096,
        state_bytes: 16 << 10,
        state_value_bytes: 1024,
        output_bytes: 8192,
        ..RoutineBudgets::default()
    };
    let mut flow = Flow::new();
    flow.add_routine(
        hostile()
            .routine("hostile")
            .expect("the hostile kind")
            .budgets(budgets)
            .on_error(ErrorStrategy::Continue),
        "h",
    )
    .add_routine(Routine::new().slot("in").logic(|_, _| Ok(())), "sink")
    .connect("h", "out", "sink", "in");
    let rt = Runtime::builder().thread_pool_size(1).build();
    rt.register("calls", &flow).expect("a valid flow");
    let job = rt
        .post("calls", "h", "in", &serde_json::json!({"do": "calls", "calls": calls}))
        .expect("posted");
    assert!(job.wait(Duration::from_secs(30)), "the job finishes");
    for (name, c) in job.counters() {
        assert_eq!(c.items_in, c.processed + c.dead_lettered + c.queued, "{name}: {c:?}");
    }
});
