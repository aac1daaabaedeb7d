#![doc = include_str!("../README.md")]

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use serde_json::json;

/// The generated bindings of the `routilux:plugin` world (used by [`export!`]).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
        default_bindings_module: "routilux_sdk::bindings",
    });
}

mod repr;
pub mod testing;

pub use repr::python_repr;

/// What a routine kind looks like to the host: description, slots, events, default config.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    pub(crate) description: String,
    pub(crate) slots: Vec<(String, Option<u32>)>,
    pub(crate) events: Vec<(String, Vec<String>)>,
    pub(crate) config: Map<String, Value>,
    pub(crate) policy: Option<Value>,
}

impl Spec {
    /// A spec with a one-line description.
    pub fn new(description: &str) -> Self {
        Self {
            description: description.to_owned(),
            ..Self::default()
        }
    }

    /// Adds an input slot with the host's default bound.
    pub fn slot(mut self, name: &str) -> Self {
        self.slots.push((name.to_owned(), None));
        self
    }

    /// Adds an input slot holding at most `max_queue_length` items.
    pub fn slot_with_capacity(mut self, name: &str, max_queue_length: u32) -> Self {
        self.slots.push((name.to_owned(), Some(max_queue_length)));
        self
    }

    /// Adds an output event with the field names its items carry.
    pub fn event<I, S>(mut self, name: &str, fields: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.events.push((
            name.to_owned(),
            fields.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Sets a default config value (a flow's config overrides it).
    pub fn config(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.config.insert(key.to_owned(), value.into());
        self
    }

    /// Sets the kind's activation policy for flows that set none, in the flow file's form:
    /// `json!("immediate")`, `json!("all_slots_ready")`, `json!({"batch_size": 10})` or
    /// `json!({"time_interval": "500ms"})` (a flow's `policy:` overrides it; the host checks
    /// it when it loads the component).
    pub fn default_policy(mut self, policy: Value) -> Self {
        self.policy = Some(policy);
        self
    }
}

/// A routine kind. See the [crate docs](crate) for an example.
pub trait Routine {
    /// The kind's name, as flows refer to it.
    const NAME: &'static str;
    /// Slots, events and default config.
    fn spec() -> Spec;
    /// Runs one activation with every slot's released items.
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error>;
}

/// A failed activation: a message, and whether a retry with the same items may succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// What went wrong.
    pub message: String,
    /// Whether a retry may help.
    pub retryable: bool,
}

impl Error {
    /// A failure no retry can fix (bad input).
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure a retry may fix (a busy service).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::retryable(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::retryable(message)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::fatal(format!("bad data: {e}"))
    }
}

/// One item: a JSON object. It arrives as JSON text and is parsed on first use, so a routine
/// that only forwards or counts items never parses them.
#[derive(Clone)]
pub struct Item {
    /// The text this item's JSON is part of (a whole batch, as the host sends it), and where.
    text: Arc<String>,
    span: std::ops::Range<usize>,
    value: std::cell::OnceCell<Value>,
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Item({})", self.value())
    }
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.value() == other.value()
    }
}

impl Item {
    /// The item whose text is `text[span]`.
    pub(crate) fn in_text(text: &Arc<String>, span: std::ops::Range<usize>) -> Self {
        Self {
            text: text.clone(),
            span,
            value: std::cell::OnceCell::new(),
        }
    }

    pub(crate) fn from_value(value: Value) -> Self {
        let text = serde_json::to_string(&value).unwrap_or_else(|_| "{}".to_owned());
        Self {
            span: 0..text.len(),
            text: Arc::new(text),
            value: std::cell::OnceCell::from(value),
        }
    }

    /// The item as JSON.
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| {
            // The host sends only valid JSON objects.
            serde_json::from_str(self.as_str()).unwrap_or(Value::Object(Map::new()))
        })
    }

    /// The item's JSON text, as it arrived.
    pub fn as_str(&self) -> &str {
        self.text.get(self.span.clone()).unwrap_or("{}")
    }

    /// The item's JSON text as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.as_str().as_bytes()
    }

    /// A field, deserialised; an error names the missing or mistyped field.
    pub fn get<T: DeserializeOwned>(&self, field: &str) -> Result<T, Error> {
        let v = self.value().get(field).ok_or_else(|| {
            Error::fatal(format!("item has no field `{field}`: {}", self.value()))
        })?;
        T::deserialize(v).map_err(|e| Error::fatal(format!("field `{field}`: {e}")))
    }

    /// A field, deserialised, or `None` when absent.
    pub fn get_opt<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>, Error> {
        match self.value().get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| Error::fatal(format!("field `{field}`: {e}"))),
        }
    }

    /// The whole item deserialised.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(self.value()).map_err(|e| Error::fatal(format!("item: {e}")))
    }
}

/// Every slot's released items for one activation, and the policy's message.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub(crate) slots: Vec<(String, Vec<Item>)>,
    pub(crate) message: Option<Message>,
}

/// The policy's message as it arrived, parsed on first use, like items: most routines never
/// read it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Message {
    text: String,
    value: std::cell::OnceCell<Value>,
}

impl Message {
    pub(crate) fn from_text(text: String) -> Self {
        Self {
            text,
            value: std::cell::OnceCell::new(),
        }
    }

    pub(crate) fn from_value(value: Value) -> Self {
        Self {
            text: value.to_string(),
            value: std::cell::OnceCell::from(value),
        }
    }

    fn value(&self) -> &Value {
        // Any JSON value the host sent; only one nested deeper than serde_json's 128 levels
        // fails to parse here.
        self.value
            .get_or_init(|| serde_json::from_str(&self.text).unwrap_or(Value::Null))
    }
}

impl Batch {
    /// The items released from `slot` (empty if none).
    pub fn slot(&self, slot: &str) -> &[Item] {
        self.slots
            .iter()
            .find(|(s, _)| s == slot)
            .map_or(&[], |(_, items)| items.as_slice())
    }

    /// Every item of every slot.
    pub fn items(&self) -> impl Iterator<Item = &Item> {
        self.slots.iter().flat_map(|(_, items)| items)
    }

    /// Every slot with its items.
    pub fn slots(&self) -> impl Iterator<Item = (&str, &[Item])> {
        self.slots.iter().map(|(s, i)| (s.as_str(), i.as_slice()))
    }

    /// How many items in all.
    pub fn len(&self) -> usize {
        self.slots.iter().map(|(_, i)| i.len()).sum()
    }

    /// Whether it holds no item.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The activation policy's message (`null` in the rare case that its text cannot be
    /// parsed: a value nested deeper than 128 levels).
    pub fn message(&self) -> Option<&Value> {
        self.message.as_ref().map(Message::value)
    }
}

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

/// What the host provides; the wasm host or a [`testing::TestHost`].
pub(crate) trait Backend {
    fn emit(&self, event: &str, payload: &str) -> Result<(), String>;
    fn log(&self, level: Level, message: &str);
    fn config(&self, key: &str) -> Option<String>;
    fn state_get(&self, key: &str) -> Option<String>;
    fn state_set(&self, key: &str, value: &str) -> Result<(), String>;
    fn state_add(&self, key: &str, delta: i64) -> Result<i64, String>;
    fn state_cas(&self, key: &str, expected: Option<&str>, value: &str) -> Result<bool, String>;
    fn job_id(&self) -> String;
    fn activation_id(&self) -> String;
}

/// What an activation can do: emit, log, read config, use WorkerState.
pub struct Context<'a> {
    backend: &'a dyn Backend,
}

impl Context<'_> {
    /// Emits a value (it must serialise to a JSON object) on `event`. Returns once every
    /// connected slot has taken it (a full slot makes this wait).
    pub fn emit<T: Serialize + ?Sized>(&self, event: &str, value: &T) -> Result<(), Error> {
        let text = serde_json::to_string(value)?;
        self.backend.emit(event, &text).map_err(Error::fatal)
    }

    /// Emits an item as it is, without parsing or serialising it again (forwarding).
    pub fn emit_item(&self, event: &str, item: &Item) -> Result<(), Error> {
        self.backend
            .emit(event, item.as_str())
            .map_err(Error::fatal)
    }

    /// Logs a line to the job's output.
    pub fn log(&self, level: Level, message: impl AsRef<str>) {
        self.backend.log(level, message.as_ref());
    }

    /// A config value, deserialised; `None` when absent.
    pub fn config<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        self.backend
            .config(key)
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|e| Error::fatal(format!("config `{key}`: {e}")))
            })
            .transpose()
    }

    /// A WorkerState value, deserialised; `None` when absent.
    pub fn state<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        self.backend
            .state_get(key)
            .map(|text| {
                serde_json::from_str(&text).map_err(|e| Error::fatal(format!("state `{key}`: {e}")))
            })
            .transpose()
    }

    /// Sets a WorkerState value.
    pub fn set_state<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), Error> {
        let text = serde_json::to_string(value)?;
        self.backend.state_set(key, &text).map_err(Error::fatal)
    }

    /// Atomically adds `delta` to an integer in WorkerState; returns the new value.
    pub fn add_state(&self, key: &str, delta: i64) -> Result<i64, Error> {
        self.backend.state_add(key, delta).map_err(Error::fatal)
    }

    /// Atomically sets `key` to `value` if it still holds `expected` (`None`: absent).
    pub fn compare_and_swap_state<E: Serialize, T: Serialize>(
        &self,
        key: &str,
        expected: Option<&E>,
        value: &T,
    ) -> Result<bool, Error> {
        let expected = expected.map(serde_json::to_string).transpose()?;
        let value = serde_json::to_string(value)?;
        self.backend
            .state_cas(key, expected.as_deref(), &value)
            .map_err(Error::fatal)
    }

    /// The current job's id.
    pub fn job_id(&self) -> String {
        self.backend.job_id()
    }

    /// This activation's stable id (`JOB/ROUTINE/N`): every retry of the activation sees the
    /// same one, so an external side effect keyed by it happens once.
    pub fn activation_id(&self) -> String {
        self.backend.activation_id()
    }
}

/// Exports routines as a `routilux:plugin` component: `routilux_sdk::export!(A, B, C);`.
#[macro_export]
macro_rules! export {
    ($($routine:ty),+ $(,)?) => {
        #[doc(hidden)]
        pub struct __RoutiluxPlugin;

        impl $crate::bindings::exports::routilux::plugin::routine::Guest for __RoutiluxPlugin {
            fn describe() -> ::std::vec::Vec<$crate::__private::RoutineKind> {
                ::std::vec![$($crate::__private::describe::<$routine>()),+]
            }

            fn activate(
                kind: ::std::string::String,
                batches: ::std::vec::Vec<$crate::__private::SlotBatch>,
                message: ::std::option::Option<::std::string::String>,
            ) -> ::std::result::Result<(), $crate::__private::ActivationError> {
                $(
                    if kind == <$routine as $crate::Routine>::NAME {
                        return $crate::__private::activate::<$routine>(batches, message);
                    }
                )+
                $crate::__private::unknown_kind(&kind)
            }
        }

        $crate::bindings::export_plugin!(__RoutiluxPlugin with_types_in $crate::bindings);
    };
}

/// Support for [`export!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;
    pub use crate::bindings::routilux::plugin::types::{
        ActivationError, EventSpec, RoutineKind, SlotBatch, SlotSpec,
    };

    struct WasmHost;

    impl Backend for WasmHost {
        fn emit(&self, event: &str, payload: &str) -> Result<(), String> {
            crate::bindings::routilux::plugin::host::emit(event, payload)
        }
        fn log(&self, level: Level, message: &str) {
            use crate::bindings::routilux::plugin::types::Level as L;
            let level = match level {
                Level::Trace => L::Trace,
                Level::Debug => L::Debug,
                Level::Info => L::Info,
                Level::Warn => L::Warn,
                Level::Error => L::Error,
            };
            crate::bindings::routilux::plugin::host::log(level, message)
        }
        fn config(&self, key: &str) -> Option<String> {
            crate::bindings::routilux::plugin::host::config(key)
        }
        fn state_get(&self, key: &str) -> Option<String> {
            crate::bindings::routilux::plugin::host::state_get(key)
        }
        fn state_set(&self, key: &str, value: &str) -> Result<(), String> {
            crate::bindings::routilux::plugin::host::state_set(key, value)
        }
        fn state_add(&self, key: &str, delta: i64) -> Result<i64, String> {
            crate::bindings::routilux::plugin::host::state_add(key, delta)
        }
        fn state_cas(
            &self,
            key: &str,
            expected: Option<&str>,
            value: &str,
        ) -> Result<bool, String> {
            crate::bindings::routilux::plugin::host::state_compare_and_swap(key, expected, value)
        }
        fn job_id(&self) -> String {
            crate::bindings::routilux::plugin::host::job_id()
        }
        fn activation_id(&self) -> String {
            crate::bindings::routilux::plugin::host::activation_id()
        }
    }

    /// The WIT description of routine `R`.
    pub fn describe<R: Routine>() -> RoutineKind {
        let spec = R::spec();
        RoutineKind {
            name: R::NAME.to_owned(),
            description: spec.description,
            slots: spec
                .slots
                .into_iter()
                .map(|(name, max_queue_length)| SlotSpec {
                    name,
                    max_queue_length,
                })
                .collect(),
            events: spec
                .events
                .into_iter()
                .map(|(name, fields)| EventSpec { name, fields })
                .collect(),
            default_config: Value::Object(spec.config).to_string(),
            default_policy: spec.policy.map(|p| p.to_string()),
        }
    }

    /// Decodes an activation and runs `R` against the wasm host.
    pub fn activate<R: Routine>(
        batches: Vec<SlotBatch>,
        message: Option<String>,
    ) -> Result<(), ActivationError> {
        let batch = decode(batches, message);
        let ctx = Context { backend: &WasmHost };
        R::activate(&ctx, &batch).map_err(|e| ActivationError {
            message: e.message,
            retryable: e.retryable,
        })
    }

    /// The answer to a kind this component does not provide.
    pub fn unknown_kind(kind: &str) -> Result<(), ActivationError> {
        Err(ActivationError {
            message: format!("this component provides no routine kind `{kind}`"),
            retryable: false,
        })
    }

    fn decode(batches: Vec<SlotBatch>, message: Option<String>) -> Batch {
        let slots: Vec<(String, Vec<Item>)> = batches
            .into_iter()
            .map(|b| {
                let text = Arc::new(b.items);
                let mut start = 1;
                let items = b
                    .ends
                    .iter()
                    .map(|&end| {
                        let end = end as usize;
                        let item = Item::in_text(&text, start..end);
                        start = end + 1;
                        item
                    })
                    .collect();
                (b.slot, items)
            })
            .collect();
        Batch {
            slots,
            message: message.map(Message::from_text),
        }
    }

    pub(crate) fn context(backend: &dyn Backend) -> Context<'_> {
        Context { backend }
    }

    pub(crate) fn item(value: Value) -> Item {
        Item::from_value(value)
    }
}
