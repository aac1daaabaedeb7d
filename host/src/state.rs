//! WorkerState: per-job, per-routine state owned by the host.
//!
//! State lives in the job, not in the logic, so it survives the logic being replaced (a
//! WebAssembly instance recycled after a trap) and can be inspected or checkpointed. Each
//! routine's state is a JSON object behind a lock; [`StateRef::update`] is a read-modify-write
//! under that lock, so concurrent activations (fan-out with `concurrency > 1`) lose no update.

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A routine's state within one job (from [`Context::state`](crate::Context::state)).
pub struct StateRef<'a> {
    map: &'a Mutex<Map<String, Value>>,
}

impl<'a> StateRef<'a> {
    pub(crate) fn new(map: &'a Mutex<Map<String, Value>>) -> Self {
        Self { map }
    }

    /// A copy of the value under `key`.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.map.lock().get(key).cloned()
    }

    /// The value under `key`, deserialised; `None` if absent.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Option<Result<T, serde_json::Error>> {
        self.get(key).map(serde_json::from_value)
    }

    /// Sets `key`; returns the previous value.
    pub fn set(
        &self,
        key: &str,
        value: impl Serialize,
    ) -> Result<Option<Value>, serde_json::Error> {
        let value = serde_json::to_value(value)?;
        Ok(self.map.lock().insert(key.to_owned(), value))
    }

    /// Atomically replaces the value under `key` with `f(old)`; returns the new value.
    pub fn update(&self, key: &str, f: impl FnOnce(Option<&Value>) -> Value) -> Value {
        let mut map = self.map.lock();
        let new = f(map.get(key));
        map.insert(key.to_owned(), new.clone());
        new
    }

    /// Atomically adds `delta` to the integer under `key` (absent counts as 0); returns the sum.
    pub fn increment(&self, key: &str, delta: i64) -> i64 {
        let v = self.update(key, |old| {
            Value::from(
                old.and_then(Value::as_i64)
                    .unwrap_or(0)
                    .saturating_add(delta),
            )
        });
        v.as_i64().unwrap_or(0)
    }

    /// Atomically adds `delta` to the integer under `key` (absent counts as 0); fails, changing
    /// nothing, if the value there is not an integer.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, String> {
        let mut map = self.map.lock();
        let old = match map.get(key) {
            None => 0,
            Some(v) => v
                .as_i64()
                .ok_or_else(|| format!("state `{key}` is not an integer: {v}"))?,
        };
        let new = old.saturating_add(delta);
        map.insert(key.to_owned(), Value::from(new));
        Ok(new)
    }

    /// Atomically sets `key` to `value` if it still holds `expected` (`None`: if absent);
    /// returns whether it did.
    pub fn compare_and_swap(&self, key: &str, expected: Option<&Value>, value: Value) -> bool {
        let mut map = self.map.lock();
        if map.get(key) != expected {
            return false;
        }
        map.insert(key.to_owned(), value);
        true
    }

    /// Removes `key`; returns its value.
    pub fn remove(&self, key: &str) -> Option<Value> {
        self.map.lock().remove(key)
    }

    /// A copy of the whole state.
    pub fn snapshot(&self) -> Map<String, Value> {
        self.map.lock().clone()
    }
}
