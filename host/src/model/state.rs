//! WorkerState: per-job, per-routine state owned by the host.
//!
//! State lives in the job, not in the logic, so it survives the logic being replaced (a
//! WebAssembly instance recycled after a trap) and can be inspected or checkpointed. Each
//! routine's state is a map of keys to JSON values behind a lock; [`StateRef::update`] is a
//! read-modify-write under that lock, so concurrent activations (fan-out with
//! `concurrency > 1`) lose no update.
//!
//! Values are kept as their JSON text, not as parsed values: what a guest sets is measured
//! and checked against the routine's budgets ([`RoutineBudgets`]) *before* anything is
//! parsed, and a value that parses into many small nodes (`[0,0,0,…]`, thirty times its text
//! in `serde_json::Value`) never does on the host's side unless native logic reads it. Every
//! byte (keys and values) is also charged to the job's memory budget.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::budget::{Meter, RoutineBudgets, bytes};
use super::spec::RoutineError;

/// Longest WorkerState key, in bytes.
pub const MAX_STATE_KEY_BYTES: usize = 1024;

/// Why a WorkerState operation failed. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The value is not JSON (or could not be serialised to JSON).
    #[error("routine `{routine}`: state `{key}`: not JSON: {source}")]
    Json {
        /// The routine.
        routine: String,
        /// The key.
        key: String,
        /// What is wrong.
        source: serde_json::Error,
    },
    /// One value over the per-value budget.
    #[error(
        "routine `{routine}`: state `{key}`: a value of {} is over the budget of {} per value",
        bytes(*size), bytes(*budget)
    )]
    ValueTooLarge {
        /// The routine.
        routine: String,
        /// The key.
        key: String,
        /// The value's size (JSON text).
        size: u64,
        /// The per-value budget.
        budget: u64,
    },
    /// The routine's whole state would pass its budget (or the job's memory budget).
    #[error(
        "routine `{routine}`: state `{key}`: the state would hold {}, over {}",
        bytes(*total), what
    )]
    Full {
        /// The routine.
        routine: String,
        /// The key being written.
        key: String,
        /// What the state would hold.
        total: u64,
        /// Which budget (and how large).
        what: String,
    },
    /// A key longer than [`MAX_STATE_KEY_BYTES`].
    #[error(
        "routine `{routine}`: a state key of {size} bytes is over the {MAX_STATE_KEY_BYTES}-byte limit"
    )]
    KeyTooLong {
        /// The routine.
        routine: String,
        /// The key's length.
        size: usize,
    },
    /// `add` on a value that is not an integer.
    #[error("routine `{routine}`: state `{key}` is not an integer: {value}")]
    NotAnInteger {
        /// The routine.
        routine: String,
        /// The key.
        key: String,
        /// The value there (cut to 64 bytes).
        value: String,
    },
}

impl From<StateError> for RoutineError {
    fn from(e: StateError) -> Self {
        RoutineError::fatal(e.to_string())
    }
}

/// One routine's state in one job: keys to JSON text.
#[derive(Default)]
pub(crate) struct State {
    values: BTreeMap<String, Box<str>>,
    /// Bytes of keys and values held.
    bytes: u64,
}

impl State {
    /// A state recovered from a durable store (values as JSON text), charged to `meter`
    /// (past its budget if need be: what was committed is never dropped).
    pub(crate) fn recovered(
        values: impl IntoIterator<Item = (String, String)>,
        meter: &Meter,
    ) -> Self {
        let mut state = State::default();
        for (k, v) in values {
            state.bytes += cost(&k, &v);
            state.values.insert(k, v.into_boxed_str());
        }
        meter.force(state.bytes);
        state
    }

    /// Every value, parsed.
    pub(crate) fn snapshot(&self) -> Map<String, Value> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), parse(v)))
            .collect()
    }
}

/// Stored text is valid JSON (checked when set); a value that cannot be read back is `null`.
fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn cost(key: &str, text: &str) -> u64 {
    (key.len() + text.len()) as u64
}

/// What one attempt of a retrying routine changed in its state, not yet applied: the attempt
/// reads its own writes through it, and they reach the routine's state only if the attempt
/// succeeds ([`Overlay::commit`]). An `add` stays a delta, so concurrent attempts lose no
/// increment.
#[derive(Default)]
pub(crate) struct Overlay {
    changes: BTreeMap<String, Change>,
}

enum Change {
    Set(Box<str>),
    Removed,
    Add(i64),
}

/// A routine's state within one job (from [`Context::state`](crate::Context::state)).
pub struct StateRef<'a> {
    state: &'a Mutex<State>,
    routine: &'a str,
    budgets: RoutineBudgets,
    meter: &'a Meter,
    /// The attempt's pending changes, for a retrying routine.
    overlay: Option<&'a Mutex<Overlay>>,
}

impl<'a> StateRef<'a> {
    pub(crate) fn new(
        state: &'a Mutex<State>,
        routine: &'a str,
        budgets: RoutineBudgets,
        meter: &'a Meter,
    ) -> Self {
        Self {
            state,
            routine,
            budgets,
            meter,
            overlay: None,
        }
    }

    /// The same state seen through an attempt's pending changes (writes go there).
    pub(crate) fn through(mut self, overlay: &'a Mutex<Overlay>) -> Self {
        self.overlay = Some(overlay);
        self
    }

    /// The JSON text under `key` as this activation sees it.
    fn view(&self, key: &str) -> Result<Option<String>, StateError> {
        let base = || self.state.lock().values.get(key).map(|t| t.to_string());
        let Some(overlay) = self.overlay else {
            return Ok(base());
        };
        Ok(match overlay.lock().changes.get(key) {
            None => base(),
            Some(Change::Set(t)) => Some(t.to_string()),
            Some(Change::Removed) => None,
            Some(Change::Add(d)) => Some(
                self.int_of(key, base().as_deref())?
                    .saturating_add(*d)
                    .to_string(),
            ),
        })
    }

    fn int_of(&self, key: &str, text: Option<&str>) -> Result<i64, StateError> {
        match text {
            None => Ok(0),
            Some(t) => parse(t).as_i64().ok_or_else(|| StateError::NotAnInteger {
                routine: self.routine.to_owned(),
                key: key.to_owned(),
                value: super::budget::cut(t.to_owned(), 64),
            }),
        }
    }

    /// A copy of the value under `key`.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.get_text(key).map(|t| parse(&t))
    }

    /// The JSON text under `key` (as it was set; nothing is parsed).
    pub fn get_text(&self, key: &str) -> Option<String> {
        if self.overlay.is_none() {
            return self.state.lock().values.get(key).map(|t| t.to_string());
        }
        self.view(key).ok().flatten()
    }

    /// The value under `key`, deserialised; `None` if absent.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Option<Result<T, serde_json::Error>> {
        self.get_text(key).map(|t| serde_json::from_str(&t))
    }

    /// Sets `key` to a serialisable value; returns the previous value.
    pub fn set(&self, key: &str, value: impl Serialize) -> Result<Option<Value>, StateError> {
        let text = serde_json::to_string(&value).map_err(|source| self.json(key, source))?;
        if let Some(overlay) = self.overlay {
            self.check_sizes(key, text.len())?;
            let old = self.view(key)?;
            overlay
                .lock()
                .changes
                .insert(key.to_owned(), Change::Set(text.into_boxed_str()));
            return Ok(old.map(|t| parse(&t)));
        }
        self.set_checked(key, text)
            .map(|old| old.map(|t| parse(&t)))
    }

    /// Sets `key` to JSON text (a guest's): its size is checked against the budgets first,
    /// then that it is JSON (without building a value).
    pub fn set_text(&self, key: &str, text: String) -> Result<(), StateError> {
        self.check_sizes(key, text.len())?;
        super::item::validate_json(&text).map_err(|source| self.json(key, source))?;
        if let Some(overlay) = self.overlay {
            overlay
                .lock()
                .changes
                .insert(key.to_owned(), Change::Set(text.into_boxed_str()));
            return Ok(());
        }
        self.set_checked(key, text).map(|_| ())
    }

    /// Atomically replaces the value under `key` with `f(old)`; returns the new value.
    pub fn update(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Value>) -> Value,
    ) -> Result<Value, StateError> {
        if let Some(overlay) = self.overlay {
            let old = self.view(key)?.map(|t| parse(&t));
            let new = f(old.as_ref());
            let text = serde_json::to_string(&new).map_err(|source| self.json(key, source))?;
            self.check_sizes(key, text.len())?;
            overlay
                .lock()
                .changes
                .insert(key.to_owned(), Change::Set(text.into_boxed_str()));
            return Ok(new);
        }
        let mut state = self.state.lock();
        let old = state.values.get(key).map(|t| parse(t));
        let new = f(old.as_ref());
        let text = serde_json::to_string(&new).map_err(|source| self.json(key, source))?;
        self.put(&mut state, key, text)?;
        Ok(new)
    }

    /// Atomically adds `delta` to the integer under `key` (absent or not an integer counts
    /// as 0); returns the sum.
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, StateError> {
        let v = self.update(key, |old| {
            Value::from(
                old.and_then(Value::as_i64)
                    .unwrap_or(0)
                    .saturating_add(delta),
            )
        })?;
        Ok(v.as_i64().unwrap_or(0))
    }

    /// Atomically adds `delta` to the integer under `key` (absent counts as 0); fails,
    /// changing nothing, if the value there is not an integer.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, StateError> {
        if let Some(overlay) = self.overlay {
            // The sum as this attempt sees it; the change stays a delta unless the attempt
            // set the key itself.
            let now = self.int_of(key, self.view(key)?.as_deref())?;
            let mut o = overlay.lock();
            let change = match o.changes.remove(key) {
                None => Change::Add(delta),
                Some(Change::Add(d)) => Change::Add(d.saturating_add(delta)),
                Some(_) => Change::Set(now.saturating_add(delta).to_string().into_boxed_str()),
            };
            o.changes.insert(key.to_owned(), change);
            return Ok(now.saturating_add(delta));
        }
        let mut state = self.state.lock();
        let old = match state.values.get(key) {
            None => 0,
            Some(t) => parse(t).as_i64().ok_or_else(|| StateError::NotAnInteger {
                routine: self.routine.to_owned(),
                key: key.to_owned(),
                value: super::budget::cut(t.to_string(), 64),
            })?,
        };
        let new = old.saturating_add(delta);
        self.put(&mut state, key, new.to_string())?;
        Ok(new)
    }

    /// Atomically sets `key` to `value` if it still holds `expected` (`None`: if absent);
    /// returns whether it did.
    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: Value,
    ) -> Result<bool, StateError> {
        let text = serde_json::to_string(&value).map_err(|source| self.json(key, source))?;
        self.compare_and_swap_text(key, expected, text)
    }

    /// [`StateRef::compare_and_swap`] with the new value as JSON text (checked as
    /// [`StateRef::set_text`] checks it).
    pub fn compare_and_swap_text(
        &self,
        key: &str,
        expected: Option<&Value>,
        text: String,
    ) -> Result<bool, StateError> {
        self.check_sizes(key, text.len())?;
        super::item::validate_json(&text).map_err(|source| self.json(key, source))?;
        if let Some(overlay) = self.overlay {
            let current = self.view(key)?.map(|t| parse(&t));
            if current.as_ref() != expected {
                return Ok(false);
            }
            overlay
                .lock()
                .changes
                .insert(key.to_owned(), Change::Set(text.into_boxed_str()));
            return Ok(true);
        }
        let mut state = self.state.lock();
        let current = state.values.get(key).map(|t| parse(t));
        if current.as_ref() != expected {
            return Ok(false);
        }
        self.put(&mut state, key, text)?;
        Ok(true)
    }

    /// Removes `key`; returns its value.
    pub fn remove(&self, key: &str) -> Option<Value> {
        if let Some(overlay) = self.overlay {
            let old = self.view(key).ok().flatten();
            overlay
                .lock()
                .changes
                .insert(key.to_owned(), Change::Removed);
            return old.map(|t| parse(&t));
        }
        let mut state = self.state.lock();
        let old = state.values.remove(key)?;
        let freed = cost(key, &old);
        state.bytes -= freed;
        self.meter.release(freed);
        Some(parse(&old))
    }

    /// A copy of the whole state (as this activation sees it).
    pub fn snapshot(&self) -> Map<String, Value> {
        let mut all = self.state.lock().snapshot();
        if let Some(overlay) = self.overlay {
            let keys: Vec<String> = overlay.lock().changes.keys().cloned().collect();
            for k in keys {
                match self.view(&k).ok().flatten() {
                    Some(t) => {
                        all.insert(k, parse(&t));
                    }
                    None => {
                        all.remove(&k);
                    }
                }
            }
        }
        all
    }

    /// Applies an attempt's changes to the state, all of them or (when one would pass a
    /// budget, or an `add` finds no integer) none.
    pub(crate) fn commit(&self, overlay: Overlay) -> Result<(), StateError> {
        self.commit_with(overlay, |_| Ok(()))
    }

    /// [`StateRef::commit`], with `durable` called on the resolved changes (key, JSON text or
    /// `None` for a removal) once they pass the budgets and before they apply, under the
    /// state's lock: an error from it applies nothing. A durable job writes them there (with
    /// the rest of the attempt), so the store sees a routine's state changes in the order they
    /// apply, and no other activation reads a change before it is on disk. Called (with no
    /// changes, and without the lock) also when the attempt changed nothing.
    pub(crate) fn commit_with<E: From<StateError>>(
        &self,
        overlay: Overlay,
        durable: impl FnOnce(&[(String, Option<String>)]) -> Result<(), E>,
    ) -> Result<(), E> {
        if overlay.changes.is_empty() {
            return durable(&[]);
        }
        let mut state = self.state.lock();
        // Resolve every change against the state as it is now, then check the budgets once.
        let mut resolved: Vec<(String, Option<String>)> = Vec::new();
        for (key, change) in overlay.changes {
            let text = match change {
                Change::Set(t) => Some(t.into_string()),
                Change::Removed => None,
                Change::Add(d) => {
                    let now = self.int_of(&key, state.values.get(&key).map(|t| &**t))?;
                    Some(now.saturating_add(d).to_string())
                }
            };
            resolved.push((key, text));
        }
        let mut total = state.bytes;
        for (key, text) in &resolved {
            total -= state.values.get(key).map_or(0, |t| cost(key, t));
            total += text.as_ref().map_or(0, |t| cost(key, t));
        }
        let key = resolved.first().map(|(k, _)| k.clone()).unwrap_or_default();
        if total > self.budgets.state_bytes {
            return Err(E::from(StateError::Full {
                routine: self.routine.to_owned(),
                key,
                total,
                what: format!(
                    "the routine's state budget of {}",
                    bytes(self.budgets.state_bytes)
                ),
            }));
        }
        if total > state.bytes
            && let Err(refusal) = self.meter.try_reserve(total - state.bytes)
        {
            return Err(E::from(StateError::Full {
                routine: self.routine.to_owned(),
                key,
                total,
                what: format!("what is left of {refusal}"),
            }));
        }
        if let Err(e) = durable(&resolved) {
            if total > state.bytes {
                self.meter.release(total - state.bytes);
            }
            return Err(e);
        }
        if total < state.bytes {
            self.meter.release(state.bytes - total);
        }
        for (key, text) in resolved {
            match text {
                Some(t) => {
                    state.values.insert(key, t.into_boxed_str());
                }
                None => {
                    state.values.remove(&key);
                }
            }
        }
        state.bytes = total;
        Ok(())
    }

    /// The largest value this state takes (JSON text, in bytes).
    pub(crate) fn budget_of_value(&self) -> u64 {
        self.budgets.state_value_bytes
    }

    fn json(&self, key: &str, source: serde_json::Error) -> StateError {
        StateError::Json {
            routine: self.routine.to_owned(),
            key: super::budget::cut(key.to_owned(), 128),
            source,
        }
    }

    fn check_sizes(&self, key: &str, len: usize) -> Result<(), StateError> {
        if key.len() > MAX_STATE_KEY_BYTES {
            return Err(StateError::KeyTooLong {
                routine: self.routine.to_owned(),
                size: key.len(),
            });
        }
        if len as u64 > self.budgets.state_value_bytes {
            return Err(StateError::ValueTooLarge {
                routine: self.routine.to_owned(),
                key: key.to_owned(),
                size: len as u64,
                budget: self.budgets.state_value_bytes,
            });
        }
        Ok(())
    }

    fn set_checked(&self, key: &str, text: String) -> Result<Option<Box<str>>, StateError> {
        let mut state = self.state.lock();
        self.put(&mut state, key, text)
    }

    /// Stores `text` under `key` if the routine's and the job's budgets allow; returns the
    /// text it replaced.
    fn put(
        &self,
        state: &mut State,
        key: &str,
        text: String,
    ) -> Result<Option<Box<str>>, StateError> {
        self.check_sizes(key, text.len())?;
        let old = state.values.get(key).map_or(0, |t| cost(key, t));
        let new = cost(key, &text);
        let total = state.bytes - old + new;
        if total > self.budgets.state_bytes {
            return Err(StateError::Full {
                routine: self.routine.to_owned(),
                key: key.to_owned(),
                total,
                what: format!(
                    "the routine's state budget of {}",
                    bytes(self.budgets.state_bytes)
                ),
            });
        }
        if new > old
            && let Err(refusal) = self.meter.try_reserve(new - old)
        {
            return Err(StateError::Full {
                routine: self.routine.to_owned(),
                key: key.to_owned(),
                total,
                what: format!("what is left of {refusal}"),
            });
        }
        if old > new {
            self.meter.release(old - new);
        }
        state.bytes = total;
        Ok(state.values.insert(key.to_owned(), text.into_boxed_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(state: u64, value: u64) -> RoutineBudgets {
        RoutineBudgets {
            state_bytes: state,
            state_value_bytes: value,
            ..RoutineBudgets::default()
        }
    }

    #[test]
    fn budgets_are_checked_on_the_text_before_parsing_and_nothing_changes_on_failure() {
        let state = Mutex::new(State::default());
        let meter = Meter::new(1 << 20);
        let s = StateRef::new(&state, "r", budgets(80, 40), &meter);
        s.set("a", "short").unwrap();
        // Over the per-value budget: refused without parsing (not JSON either).
        let e = s.set_text("b", "x".repeat(41)).unwrap_err();
        assert!(
            matches!(e, StateError::ValueTooLarge { size: 41, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("state `b`"), "{e}");
        // Within it, but not JSON.
        assert!(matches!(
            s.set_text("b", "{nope".into()),
            Err(StateError::Json { .. })
        ));
        // The total: a + "short" is 8 bytes, b and c 41 each: past 80.
        s.set_text("b", format!("\"{}\"", "y".repeat(38))).unwrap();
        let e = s
            .set_text("c", format!("\"{}\"", "z".repeat(38)))
            .unwrap_err();
        assert!(matches!(e, StateError::Full { .. }), "{e}");
        assert_eq!(s.get("c"), None);
        assert_eq!(meter.used(), (1 + 7 + 1 + 40) as u64);
        // Replacing a value charges only the difference; removing gives it back.
        s.set("b", 1).unwrap();
        assert_eq!(s.increment("b", 2).unwrap(), 3);
        assert_eq!(s.remove("a"), Some(Value::from("short")));
        assert_eq!(meter.used(), 2);
        assert!(matches!(
            s.add("nope", 1)
                .and_then(|_| s.set("s", "t"))
                .and_then(|_| s.add("s", 1)),
            Err(StateError::NotAnInteger { .. })
        ));
    }

    #[test]
    fn the_job_budget_bounds_every_routine_state_together() {
        let (a, b) = (Mutex::new(State::default()), Mutex::new(State::default()));
        let meter = Meter::new(30);
        let sa = StateRef::new(&a, "a", budgets(100, 100), &meter);
        let sb = StateRef::new(&b, "b", budgets(100, 100), &meter);
        sa.set_text("k", "\"0123456789012345678\"".into()).unwrap();
        let e = sb.set_text("k", "\"0123456789\"".into()).unwrap_err();
        assert!(e.to_string().contains("job's memory budget"), "{e}");
    }
}
