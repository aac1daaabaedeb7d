//! A plugin built against the previous WIT, `routilux:plugin@0.3.0` (kept in
//! `host/wit-compat/`): the host must still load and run it. One kind, `tally`: adds each
//! item's `n` to WorkerState `total`, prints the new total and emits it on `out`.

wit_bindgen::generate!({
    path: "../../host/wit-compat/plugin-0.3.0.wit",
    world: "plugin",
});

use exports::routilux::plugin::routine::{ActivationError, Guest, RoutineKind, SlotBatch};
use routilux::plugin::host;
use routilux::plugin::types::{EventSpec, SlotSpec};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> Vec<RoutineKind> {
        vec![RoutineKind {
            name: "tally".into(),
            description: "adds each item's `n` to WorkerState `total` (a 0.3.0 plugin)".into(),
            slots: vec![SlotSpec {
                name: "in".into(),
                max_queue_length: None,
            }],
            events: vec![EventSpec {
                name: "out".into(),
                fields: vec!["total".into()],
            }],
            default_config: "{}".into(),
        }]
    }

    fn activate(
        _kind: String,
        batches: Vec<SlotBatch>,
        _message: Option<String>,
    ) -> Result<(), ActivationError> {
        let fail = |message: String| ActivationError {
            message,
            retryable: false,
        };
        for batch in batches {
            let mut start = 1;
            for end in batch.ends {
                let item = &batch.items[start..end as usize];
                start = end as usize + 1;
                // `{"n":N}`: the number after the colon (a fixture, not a JSON parser).
                let n: i64 = item
                    .split(':')
                    .nth(1)
                    .and_then(|v| v.trim_end_matches('}').trim().parse().ok())
                    .ok_or_else(|| fail(format!("no `n` in {item}")))?;
                let total = host::state_add("total", n).map_err(fail)?;
                println!("total {total} in {}", host::job_id());
                host::emit("out", &format!("{{\"total\":{total}}}")).map_err(fail)?;
            }
        }
        Ok(())
    }
}

export!(Legacy);
