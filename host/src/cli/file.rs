//! The flow-file format (YAML, or JSON, which YAML reads too) and plugin manifests, as serde
//! types. Values that a later check may complain about are [`Spanned`], so every message can
//! name the file, line and column.

use std::fmt;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::{Map, Value};
use serde_saphyr::Spanned;

/// A flow file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FlowFile {
    /// The flow's name.
    pub flow_id: Spanned<String>,
    /// What the flow does (shown by `validate`).
    #[serde(default)]
    pub description: Option<String>,
    /// Plugin directories, relative to the flow file.
    #[serde(default)]
    pub plugins: Option<Spanned<OneOrMany>>,
    /// Routines by id.
    pub routines: IndexMap<Spanned<String>, Spanned<RoutineDef>>,
    /// `from: routine.event` → `to: routine.slot`.
    #[serde(default)]
    pub connections: Vec<Spanned<ConnectionDef>>,
    /// Items posted when the command line gives none: `routine.slot: [ {..}, .. ]`.
    #[serde(default)]
    pub input: IndexMap<Spanned<String>, Vec<Map<String, Value>>>,
    /// Pool size and time limit.
    #[serde(default)]
    pub execution: ExecutionDef,
    /// The error strategy of routines that set none.
    #[serde(default)]
    pub on_error: Option<Spanned<OnErrorDef>>,
    /// Whether routines may feed each other in a loop.
    #[serde(default)]
    pub allow_cycles: bool,
    #[serde(default)]
    pub budgets: Option<Spanned<BudgetsDef>>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One routine of a flow file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoutineDef {
    /// Plugin name (a component's file name without `.wasm`) or a path to a `.wasm` file.
    pub plugin: Spanned<String>,
    /// A kind the plugin describes.
    pub kind: Spanned<String>,
    /// Overrides of the kind's default config.
    #[serde(default)]
    pub config: Option<IndexMap<Spanned<String>, Value>>,
    /// Activation policy.
    #[serde(default)]
    pub policy: Option<Spanned<PolicyDef>>,
    /// Most activations at once within one job.
    #[serde(default)]
    pub concurrency: Option<Spanned<usize>>,
    /// Queue bound per slot.
    #[serde(default)]
    pub max_queue_length: IndexMap<Spanned<String>, usize>,
    /// Sandbox limits (over the plugin manifest's).
    #[serde(default)]
    pub limits: Option<Spanned<LimitsDef>>,
    /// Error strategy.
    #[serde(default)]
    pub on_error: Option<Spanned<OnErrorDef>>,
    /// Capabilities beyond none (added to the plugin manifest's).
    #[serde(default)]
    pub permissions: Option<Spanned<PermissionsDef>>,
}

/// `immediate`, `all_slots_ready`, `{batch_size: n}`, `{time_interval: 2s}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum PolicyDef {
    Immediate,
    AllSlotsReady,
    BatchSize(usize),
    TimeInterval(Dur),
}

/// `stop`, `continue`, `skip`, `{retry: {max, delay, backoff, then}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum OnErrorDef {
    Stop,
    Continue,
    Skip,
    Retry(RetryDef),
}

/// Parameters of `retry`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryDef {
    pub max: u32,
    #[serde(default)]
    pub delay: Option<Dur>,
    #[serde(default)]
    pub backoff: Option<f64>,
    #[serde(default)]
    pub then: Option<ThenDef>,
}

/// What a spent retry turns into.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ThenDef {
    Stop,
    Continue,
    Skip,
}

/// Sandbox limits; absent fields keep the value below them (manifest, then defaults).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsDef {
    #[serde(default)]
    pub memory: Option<Size>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub fuel: Option<u64>,
    #[serde(default)]
    pub max_instances: Option<usize>,
    #[serde(default)]
    pub recycle_after: Option<u64>,
    #[serde(default)]
    pub reuse_across_jobs: Option<bool>,
    #[serde(default)]
    pub item_bytes: Option<Size>,
    #[serde(default)]
    pub queue_bytes: Option<Size>,
    #[serde(default)]
    pub state_bytes: Option<Size>,
    #[serde(default)]
    pub state_value_bytes: Option<Size>,
    #[serde(default)]
    pub output_bytes: Option<Size>,
    #[serde(default)]
    pub attempt_bytes: Option<Size>,
}

/// A flow's `budgets:` (per job).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BudgetsDef {
    #[serde(default)]
    pub memory: Option<Size>,
    #[serde(default)]
    pub dead_letters: Option<usize>,
    #[serde(default)]
    pub dead_letter_bytes: Option<Size>,
    #[serde(default)]
    pub output_lines: Option<usize>,
    #[serde(default)]
    pub output_bytes: Option<Size>,
    #[serde(default)]
    pub error_bytes: Option<Size>,
}

/// Granted capabilities.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PermissionsDef {
    /// Host directories (relative to the file) mounted read-only in the guest.
    #[serde(default)]
    pub read_only_dirs: Vec<DirGrant>,
    /// Environment variables passed through by name.
    #[serde(default)]
    pub env: Vec<String>,
}

/// One read-only directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirGrant {
    pub host: String,
    pub guest: String,
}

/// One connection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConnectionDef {
    /// `routine.event`.
    pub from: Spanned<String>,
    /// `routine.slot`.
    pub to: Spanned<String>,
}

/// `execution:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecutionDef {
    #[serde(default)]
    pub thread_pool_size: Option<Spanned<usize>>,
    #[serde(default)]
    pub timeout: Option<Dur>,
}

/// A plugin manifest (`NAME.yaml` beside `NAME.wasm`): defaults for every routine made from
/// that component.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManifestFile {
    /// For people reading the manifest.
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
    #[serde(default)]
    pub limits: Option<Spanned<LimitsDef>>,
    #[serde(default)]
    pub permissions: Option<Spanned<PermissionsDef>>,
}

/// A duration written with a unit: `500ms`, `2s`, `1m 30s`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, like `500ms`, `2s` or `1m`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                parse_duration(s).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "`{n}` has no unit: write a duration like `{n}s` or `{n}ms`"
                )))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                self.visit_u64(n.unsigned_abs())
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `500ms`, `2s`, `1m 30s` (humantime's syntax).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. `500ms`, `2s` or `1m`"))
}

/// A byte size: a number of bytes or a string with a unit (`64MiB`, `512 KiB`, `1GB`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes or with a unit, like `64MiB`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                s.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|b| Size(b.as_u64()))
                    .map_err(|e| {
                        E::custom(format!(
                            "`{s}` is not a size ({e}); write e.g. `64MiB` or `512KiB`"
                        ))
                    })
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_survive_options_maps_and_enums() {
        let text = "flow_id: f\nroutines:\n  a:\n    plugin: p\n    kind: k\n    policy: {batch_size: 3}\n    on_error: {retry: {max: 2, delay: 10ms}}\n    limits: {memory: 1MiB, timeout: 2s}\nconnections:\n  - from: a.out\n    to: a.in\n";
        let f: FlowFile = serde_saphyr::from_str(text).unwrap();
        let (id, r) = f.routines.first().unwrap();
        assert_eq!((id.referenced.line(), id.referenced.column()), (3, 3));
        assert_eq!(r.value.kind.referenced.line(), 5);
        let policy = r.value.policy.as_ref().unwrap();
        assert!(matches!(policy.value, PolicyDef::BatchSize(3)));
        assert_eq!(policy.referenced.line(), 6);
        let limits = &r.value.limits.as_ref().unwrap().value;
        assert_eq!(limits.memory, Some(Size(1 << 20)));
        assert_eq!(limits.timeout, Some(Dur(Duration::from_secs(2))));
        assert_eq!(f.connections[0].value.to.referenced.line(), 11);
    }

    #[test]
    fn the_readme_flow_file_example_has_the_documented_shape() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("### Flow files").unwrap()..];
        let start = section.find("```yaml\n").unwrap() + 8;
        let end = start + section[start..].find("```").unwrap();
        let f: FlowFile = serde_saphyr::from_str(&section[start..end]).unwrap();
        let email = &f.routines[1].value;
        assert!(matches!(
            email.policy.as_ref().unwrap().value,
            PolicyDef::BatchSize(10)
        ));
        assert!(matches!(
            email.on_error.as_ref().unwrap().value,
            OnErrorDef::Retry(_)
        ));
        assert_eq!(email.permissions.as_ref().unwrap().value.env, ["LANG"]);
        assert_eq!(f.input.len(), 1);
    }

    #[test]
    fn a_duration_without_unit_is_refused_with_its_place() {
        let text = "flow_id: f\nroutines: {}\nexecution:\n  timeout: 30\n";
        let e = serde_saphyr::from_str::<FlowFile>(text).unwrap_err();
        assert!(e.to_string().contains("has no unit"), "{e}");
        assert_eq!(e.location().map(|l| l.line()), Some(4), "{e}");
    }
}
