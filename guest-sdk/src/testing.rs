//! Drive a routine natively, without wasm or a host: [`TestHost`] plays the host's part
//! (emit, log, config, WorkerState) and records what the routine did.
//!
//! ```
//! use routilux_sdk::testing::{TestHost, batch};
//! # use routilux_sdk::{Batch, Context, Error, Routine, Spec};
//! # struct Counter;
//! # impl Routine for Counter {
//! #     const NAME: &'static str = "counter";
//! #     fn spec() -> Spec { Spec::new("counts").slot("in").event("count", ["n"]) }
//! #     fn activate(ctx: &Context, b: &Batch) -> Result<(), Error> {
//! #         let n = ctx.add_state("n", b.len() as i64)?;
//! #         ctx.emit("count", &serde_json::json!({"n": n}))
//! #     }
//! # }
//! let host = TestHost::new();
//! host.run::<Counter>(&batch([("in", vec![serde_json::json!({}); 3])])).unwrap();
//! host.run::<Counter>(&batch([("in", vec![serde_json::json!({})])])).unwrap();
//! assert_eq!(host.state("n"), Some(serde_json::json!(4)));
//! assert_eq!(host.emitted("count").last(), Some(&serde_json::json!({"n": 4})));
//! ```

use std::cell::RefCell;

use serde_json::{Map, Value};

use crate::{__private, Backend, Batch, Error, Level, Routine};

/// Builds a batch from `(slot, items)` pairs (items must be JSON objects).
pub fn batch<I, S>(slots: I) -> Batch
where
    I: IntoIterator<Item = (S, Vec<Value>)>,
    S: Into<String>,
{
    Batch {
        slots: slots
            .into_iter()
            .map(|(s, items)| (s.into(), items.into_iter().map(__private::item).collect()))
            .collect(),
        message: None,
    }
}

/// Builds a batch with a policy message.
pub fn batch_with_message<I, S>(slots: I, message: Value) -> Batch
where
    I: IntoIterator<Item = (S, Vec<Value>)>,
    S: Into<String>,
{
    Batch {
        message: Some(crate::Message::from_value(message)),
        ..batch(slots)
    }
}

/// A native stand-in for the routilux host. State persists across runs, as WorkerState does
/// across activations of one job.
#[derive(Default)]
pub struct TestHost {
    config: RefCell<Map<String, Value>>,
    state: RefCell<Map<String, Value>>,
    emitted: RefCell<Vec<(String, Value)>>,
    logs: RefCell<Vec<(Level, String)>>,
    events: RefCell<Vec<String>>,
    job_id: String,
}

impl TestHost {
    /// A host with empty config and state, job id `test-job`.
    pub fn new() -> Self {
        Self {
            job_id: "test-job".to_owned(),
            ..Self::default()
        }
    }

    /// Sets a config value (overriding the routine's default).
    pub fn with_config(self, key: &str, value: Value) -> Self {
        self.config.borrow_mut().insert(key.to_owned(), value);
        self
    }

    /// Runs one activation of `R` on `batch`. As the real host does, the routine's default
    /// config applies under the overrides, and an emit on an undeclared event fails.
    pub fn run<R: Routine>(&self, batch: &Batch) -> Result<(), Error> {
        let spec = R::spec();
        {
            let mut config = self.config.borrow_mut();
            for (k, v) in spec.config.iter() {
                config.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        *self.events.borrow_mut() = spec.events.iter().map(|(e, _)| e.clone()).collect();
        let ctx = __private::context(self);
        R::activate(&ctx, batch)
    }

    /// Everything emitted on `event`, in order.
    pub fn emitted(&self, event: &str) -> Vec<Value> {
        self.emitted
            .borrow()
            .iter()
            .filter(|(e, _)| e == event)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Everything emitted, as `(event, item)`, in order.
    pub fn all_emitted(&self) -> Vec<(String, Value)> {
        self.emitted.borrow().clone()
    }

    /// A WorkerState value.
    pub fn state(&self, key: &str) -> Option<Value> {
        self.state.borrow().get(key).cloned()
    }

    /// Logged lines, in order.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }
}

fn parse(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

impl Backend for TestHost {
    fn emit(&self, event: &str, payload: &str) -> Result<(), String> {
        if !self.events.borrow().iter().any(|e| e == event) {
            return Err(format!(
                "emitted on undeclared event `{event}` (declared: {})",
                self.events.borrow().join(", ")
            ));
        }
        let value: Value = serde_json::from_str(payload).map_err(|e| e.to_string())?;
        if !value.is_object() {
            return Err(format!("an item must be a JSON object, got {value}"));
        }
        self.emitted.borrow_mut().push((event.to_owned(), value));
        Ok(())
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn config(&self, key: &str) -> Option<String> {
        self.config.borrow().get(key).map(Value::to_string)
    }

    fn state_get(&self, key: &str) -> Option<String> {
        self.state.borrow().get(key).map(Value::to_string)
    }

    fn state_set(&self, key: &str, value: &str) -> Result<(), String> {
        let v = parse(value)?;
        self.state.borrow_mut().insert(key.to_owned(), v);
        Ok(())
    }

    fn state_add(&self, key: &str, delta: i64) -> Result<i64, String> {
        let mut state = self.state.borrow_mut();
        let old = match state.get(key) {
            None => 0,
            Some(v) => v
                .as_i64()
                .ok_or_else(|| format!("state `{key}` is not an integer: {v}"))?,
        };
        let new = old.saturating_add(delta);
        state.insert(key.to_owned(), Value::from(new));
        Ok(new)
    }

    fn state_cas(&self, key: &str, expected: Option<&str>, value: &str) -> Result<bool, String> {
        let expected = expected.map(parse).transpose()?;
        let value = parse(value)?;
        let mut state = self.state.borrow_mut();
        if state.get(key) != expected.as_ref() {
            return Ok(false);
        }
        state.insert(key.to_owned(), value);
        Ok(true)
    }

    fn job_id(&self) -> String {
        self.job_id.clone()
    }

    fn activation_id(&self) -> String {
        format!("{}/test/1", self.job_id)
    }
}
