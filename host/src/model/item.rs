//! Items: the unit of data that travels along connections.
//!
//! An [`Item`] is one JSON object, shared and immutable. Cloning an item clones an `Arc`, so a
//! fan-out to n slots never copies the payload. An item holds its data in up to two forms, each
//! computed at most once and then kept: the parsed [`Value`] (what native logic reads) and the
//! UTF-8 JSON bytes (what crosses into a WebAssembly guest). Native-to-native routing never
//! serialises; an item that reaches several guests is serialised once.
//!
//! Invariant: the value of every item is a JSON object (checked at construction).

use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Why a value could not become an [`Item`].
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    /// Items are JSON objects; this was another kind of JSON value.
    #[error("an item must be a JSON object, got {kind}")]
    NotAnObject {
        /// The kind of JSON value that was given (`array`, `string`, ...).
        kind: &'static str,
    },
    /// The value could not be serialised to JSON, or the bytes are not JSON.
    #[error("invalid JSON item: {0}")]
    Json(#[from] serde_json::Error),
    /// The bytes are not UTF-8.
    #[error("invalid JSON item: not UTF-8: {0}")]
    NotUtf8(#[from] std::string::FromUtf8Error),
}

/// One JSON object flowing through a flow. Cheap to clone.
#[derive(Clone)]
pub struct Item(Arc<Inner>);

struct Inner {
    value: OnceLock<Value>,
    /// The compact JSON text (UTF-8, checked when the item was made).
    text: OnceLock<Box<str>>,
    /// The length of the compact JSON text, for an item made from a value (counted without
    /// keeping the text).
    len: OnceLock<usize>,
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Item {
    /// Wraps a JSON value; fails unless it is an object.
    pub fn new(value: Value) -> Result<Self, ItemError> {
        if !value.is_object() {
            return Err(ItemError::NotAnObject {
                kind: kind_of(&value),
            });
        }
        Ok(Self::from_value_unchecked(value))
    }

    /// Serialises any `Serialize` value into an item (it must serialise to a JSON object).
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Result<Self, ItemError> {
        Self::new(serde_json::to_value(value)?)
    }

    /// Builds an item from a JSON object map.
    pub fn from_map(map: Map<String, Value>) -> Self {
        Self::from_value_unchecked(Value::Object(map))
    }

    /// Takes UTF-8 JSON bytes after checking that they hold one JSON object; see
    /// [`Item::from_json_text`].
    pub fn from_json_bytes(bytes: impl Into<Box<[u8]>>) -> Result<Self, ItemError> {
        let text = String::from_utf8(bytes.into().into_vec())?;
        Self::from_json_text(text)
    }

    /// Takes JSON text (a line of input, a WebAssembly guest's `emit`) after checking that it
    /// holds one JSON object. The text is kept, so the item reaches other guests without
    /// being serialised again, and the value is parsed only if native logic asks for it.
    pub fn from_json_text(text: impl Into<Box<str>>) -> Result<Self, ItemError> {
        let text = text.into();
        // Validate without building a value (no allocation per field).
        serde_json::from_str::<Valid>(&text)?;
        let first = text.bytes().find(|b| !b.is_ascii_whitespace());
        if first != Some(b'{') {
            let value: Value = serde_json::from_str(&text)?;
            return Err(ItemError::NotAnObject {
                kind: kind_of(&value),
            });
        }
        let inner = Inner {
            value: OnceLock::new(),
            text: OnceLock::from(text),
            len: OnceLock::new(),
        };
        Ok(Self(Arc::new(inner)))
    }

    fn from_value_unchecked(value: Value) -> Self {
        Self(Arc::new(Inner {
            value: OnceLock::from(value),
            text: OnceLock::new(),
            len: OnceLock::new(),
        }))
    }

    /// The item as a JSON value (always an object), parsed on first use if the item came as
    /// bytes.
    pub fn value(&self) -> &Value {
        self.0.value.get_or_init(|| {
            // Bytes were validated as a JSON object when the item was made.
            let text = self.0.text.get().map(|t| &t[..]).unwrap_or("{}");
            serde_json::from_str(text).unwrap_or(Value::Object(Map::new()))
        })
    }

    /// The item's fields.
    pub fn fields(&self) -> &Map<String, Value> {
        static EMPTY: OnceLock<Map<String, Value>> = OnceLock::new();
        match self.value() {
            Value::Object(map) => map,
            _ => EMPTY.get_or_init(Map::new),
        }
    }

    /// The item as compact UTF-8 JSON, serialised on first use and then shared.
    pub fn json_bytes(&self) -> &[u8] {
        self.json_str().as_bytes()
    }

    /// The item as compact JSON text, serialised on first use and then shared.
    pub fn json_str(&self) -> &str {
        self.0.text.get_or_init(|| {
            serde_json::to_string(self.value())
                .unwrap_or_else(|_| "{}".to_owned())
                .into_boxed_str()
        })
    }

    /// The size of the item in bytes: the length of its compact JSON text (what byte budgets
    /// count). For an item made from a value, counted once without keeping the text.
    pub fn byte_len(&self) -> usize {
        if let Some(text) = self.0.text.get() {
            return text.len();
        }
        *self.0.len.get_or_init(|| {
            let mut n = Counter(0);
            let _ = serde_json::to_writer(&mut n, self.value());
            n.0
        })
    }

    /// One field, deserialised into `T`. `None` when the field is absent.
    pub fn get<T: DeserializeOwned>(&self, field: &str) -> Option<Result<T, serde_json::Error>> {
        self.fields().get(field).map(|v| T::deserialize(v))
    }

    /// The whole item deserialised into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(self.value())
    }

    /// Whether two handles point at the same shared payload (no copy was made).
    pub fn ptr_eq(a: &Item, b: &Item) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

/// Checks that `text` is JSON whose every string and number can be read back, without
/// building a value.
pub(crate) fn validate_json(text: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<Valid>(text).map(|_| ())
}

/// Counts the bytes written to it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks JSON text without building a value, like `serde::de::IgnoredAny`, except that
/// strings and numbers are decoded: text whose value could not be parsed later (a `\u`
/// escape that is no character, such as a lone surrogate, or a number out of range) is
/// refused when the item is made instead of becoming an empty object when it is read.
struct Valid;

impl<'de> Deserialize<'de> for Valid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Valid)
    }
}

impl<'de> serde::de::Visitor<'de> for Valid {
    type Value = Valid;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_str<E>(self, _: &str) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_unit<E>(self) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Valid, A::Error> {
        while seq.next_element::<Valid>()?.is_some() {}
        Ok(Valid)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Valid, A::Error> {
        while map.next_key::<Valid>()?.is_some() {
            map.next_value::<Valid>()?;
        }
        Ok(Valid)
    }
}

impl TryFrom<Value> for Item {
    type Error = ItemError;
    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Item::new(value)
    }
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Item({})", self.value())
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value())
    }
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        Item::ptr_eq(self, other) || self.value() == other.value()
    }
}

impl Serialize for Item {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Item::new(value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_objects_are_items() {
        assert!(Item::new(json!({"a": 1})).is_ok());
        let err = Item::new(json!([1, 2])).unwrap_err();
        assert_eq!(err.to_string(), "an item must be a JSON object, got array");
        assert!(Item::from_json_bytes(&b"42"[..]).is_err());
        assert!(Item::from_json_bytes(&b"{nope"[..]).is_err());
        // Not UTF-8 inside a string: refused, whichever check catches it first.
        assert!(Item::from_json_bytes(&b"{\"a\": \"\xff\"}"[..]).is_err());
        // Text whose value could not be parsed later is refused now.
        assert!(Item::from_json_text(r#"{"a": "\ud800"}"#).is_err());
        assert!(Item::from_json_text(r#"{"\udc00": 1}"#).is_err());
        assert!(Item::from_json_text(r#"{"a": [1e400]}"#).is_err());
        let ok = Item::from_json_text(r#"{"a": "\ud83d\ude00 \n", "b": [1, -2, 3.5, null, true]}"#)
            .unwrap();
        assert_eq!(ok.value()["a"], "😀 \n");
    }

    #[test]
    fn numbers_survive_a_round_trip_through_their_own_text() {
        // Found by `fuzz/item`: without correctly rounded parsing this long mantissa read as
        // one double, whose own text read back as another.
        let text = format!(
            "{{\"n\": {}}}",
            "643333333333330000000000000000000000000000000000000000000000000000000000000006148914691236517321"
        );
        let item = Item::from_json_text(text).unwrap();
        let again = Item::from_json_text(serde_json::to_string(item.value()).unwrap()).unwrap();
        assert_eq!(again.value(), item.value());
    }

    #[test]
    fn bytes_and_value_agree_and_are_shared() {
        let item = Item::new(json!({"id": 7, "s": "x"})).unwrap();
        let copy = item.clone();
        assert!(Item::ptr_eq(&item, &copy));
        let bytes = item.json_bytes().to_vec();
        assert_eq!(copy.json_bytes().as_ptr(), item.json_bytes().as_ptr());
        let counted = Item::new(json!({"id": 7, "s": "x"})).unwrap();
        assert_eq!(counted.byte_len(), bytes.len());
        let back = Item::from_json_bytes(bytes).unwrap();
        assert_eq!(back, item);
        assert_eq!(back.get::<u32>("id").unwrap().unwrap(), 7);
        assert!(back.get::<u32>("missing").is_none());
    }
}
