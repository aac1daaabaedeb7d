//! A loaded plugin: its compiled component, the `InstancePre` every instance is made from,
//! and the routine kinds it described.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use wasmtime::component::Component;

use super::bindings::{self, RoutineKind};
use super::engine::{EngineInner, WasmEngine};
use super::error::LoadError;
use super::instance::{Limits, Permissions, WasmLogic, new_store};
use crate::model::flow::suggest;
use crate::{DEFAULT_MAX_QUEUE_LENGTH, EventSpec, Routine, SlotSpec};

/// A routine kind a plugin provides, as its `describe` said.
#[derive(Clone, Debug, PartialEq)]
pub struct KindInfo {
    /// The kind's name.
    pub name: String,
    /// One line saying what it does.
    pub description: String,
    /// Input slots.
    pub slots: Vec<SlotSpec>,
    /// Output events and their fields.
    pub events: Vec<EventSpec>,
    /// Default config (a flow's config overrides its keys).
    pub default_config: Map<String, Value>,
    /// The activation policy a routine of this kind gets when a flow sets none (none:
    /// immediate). Plugins built against WIT 0.4.0 may describe one.
    pub default_policy: Option<DefaultPolicy>,
}

/// A kind's default activation policy, as a plugin describes it (the built-in policies; a
/// guest cannot run a custom one under the host's queue lock).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DefaultPolicy {
    /// `"immediate"`.
    Immediate,
    /// `"all_slots_ready"`.
    AllSlotsReady,
    /// `{"batch_size": n}`.
    BatchSize(usize),
    /// `{"time_interval": "500ms"}`.
    TimeInterval(Duration),
}

impl DefaultPolicy {
    /// The engine's policy.
    pub fn policy(self) -> crate::Policy {
        match self {
            Self::Immediate => crate::Policy::Immediate,
            Self::AllSlotsReady => crate::Policy::AllSlotsReady,
            Self::BatchSize(n) => crate::Policy::BatchSize(n),
            Self::TimeInterval(d) => crate::Policy::TimeInterval(d),
        }
    }

    /// Parses the WIT's JSON form: `"immediate"`, `"all_slots_ready"`, `{"batch_size": n}`,
    /// `{"time_interval": "500ms"}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        const FORMS: &str = "\"immediate\", \"all_slots_ready\", {\"batch_size\": N} or \
                             {\"time_interval\": \"500ms\"}";
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("is not JSON ({e}); write {FORMS}"))?;
        match &value {
            Value::String(s) if s == "immediate" => Ok(Self::Immediate),
            Value::String(s) if s == "all_slots_ready" => Ok(Self::AllSlotsReady),
            Value::Object(m) if m.len() == 1 => match m.iter().next() {
                Some((k, v)) if k == "batch_size" => match v.as_u64() {
                    Some(n @ 1..=MAX_DESCRIBED_BATCH) => Ok(Self::BatchSize(n as usize)),
                    _ => Err(format!(
                        "`batch_size` must be a whole number from 1 to {MAX_DESCRIBED_BATCH}, \
                         not {v}"
                    )),
                },
                Some((k, Value::String(d))) if k == "time_interval" => {
                    match humantime::parse_duration(d.trim()) {
                        Ok(d) if d.is_zero() => {
                            Err("`time_interval` must be more than zero".into())
                        }
                        Ok(d) if d > Duration::from_secs(86_400) => {
                            Err("`time_interval` must be at most a day".into())
                        }
                        Ok(d) => Ok(Self::TimeInterval(d)),
                        Err(e) => Err(format!(
                            "`time_interval` `{d}` is not a duration ({e}); write e.g. `500ms`"
                        )),
                    }
                }
                _ => Err(format!("is not a policy; write {FORMS}")),
            },
            _ => Err(format!("is not a policy; write {FORMS}")),
        }
    }
}

impl std::fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Immediate => f.write_str("immediate"),
            Self::AllSlotsReady => f.write_str("all_slots_ready"),
            Self::BatchSize(n) => write!(f, "batch_size({n})"),
            Self::TimeInterval(d) => write!(f, "time_interval({})", humantime::format_duration(*d)),
        }
    }
}

pub(crate) struct PluginInner {
    pub(crate) engine: Arc<EngineInner>,
    pub(crate) path: PathBuf,
    pub(crate) pre: bindings::PluginPre,
    pub(crate) permissions: Permissions,
    kinds: Vec<KindInfo>,
    imports: Vec<String>,
    from_cache: bool,
}

/// A live instance of a plugin, held until dropped (see [`Plugin::instantiate`]).
pub struct LiveInstance {
    _store: wasmtime::Store<super::instance::StoreData>,
    _bindings: bindings::PluginBindings,
}

/// A loaded plugin. Cheap to clone (shared).
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.inner.path)
            .field("kinds", &self.kind_names())
            .finish()
    }
}

/// Instantiates the component once, asks it to describe itself, and checks the answer.
pub(crate) fn open(
    engine: &WasmEngine,
    path: PathBuf,
    component: Component,
    from_cache: bool,
    permissions: Permissions,
) -> Result<Plugin, LoadError> {
    let e = &engine.inner;
    let wrong = |err: wasmtime::Error| LoadError::WrongWorld {
        path: path.clone(),
        detail: format!("{err:#}"),
    };
    let pre = e.linker.instantiate_pre(&component).map_err(wrong)?;
    let pre = bindings::PluginPre::new(pre).map_err(wrong)?;
    let imports = component
        .component_type()
        .imports(e.engine())
        .map(|(name, _)| name.to_owned())
        .collect();
    let mut inner = PluginInner {
        engine: e.clone(),
        path: path.clone(),
        pre,
        permissions,
        kinds: Vec::new(),
        imports,
        from_cache,
    };
    let describe = |err: wasmtime::Error| LoadError::Describe {
        path: path.clone(),
        detail: format!("{err:#}"),
    };
    let limits = e.default_limits().clone();
    let mut store = new_store(&inner, &limits, None).map_err(describe)?;
    let instance = inner.pre.instantiate(&mut store).map_err(describe)?;
    let kinds = instance.call_describe(&mut store).map_err(describe)?;
    inner.kinds = check(&path, kinds)?;
    Ok(Plugin {
        inner: Arc::new(inner),
    })
}

/// Most kinds one component may describe, slots or events per kind, and fields per event.
const MAX_KINDS: usize = 1_000;
const MAX_PORTS: usize = 256;
/// Longest name (kind, slot, event, field) and description, in bytes.
const MAX_NAME_BYTES: usize = 128;
const MAX_DESCRIPTION_BYTES: usize = 4 << 10;
/// Largest default config (JSON text) of a kind.
const MAX_CONFIG_BYTES: usize = 64 << 10;
/// Largest default policy (JSON text) of a kind, and largest batch it may ask for.
const MAX_POLICY_BYTES: usize = 1 << 10;
const MAX_DESCRIBED_BATCH: u64 = 1_000_000;
/// Largest queue bound a component may ask for (a flow file may set more).
const MAX_DESCRIBED_QUEUE: u32 = 1_000_000;

/// Why `name` cannot name a kind, slot, event or field, if it cannot: names are what flow
/// files, diagnostics and terminals show, so they are short words of letters, digits, `_` and
/// `-` (never control characters, spaces or dots).
fn bad_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".to_owned());
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!(
            "is {} bytes long (at most {MAX_NAME_BYTES})",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_alphanumeric() || c == '_' || c == '-'))
    {
        return Some(format!(
            "holds `{}`: names are letters, digits, `_` and `-`",
            c.escape_debug()
        ));
    }
    None
}

fn check(path: &Path, kinds: Vec<RoutineKind>) -> Result<Vec<KindInfo>, LoadError> {
    let mut problems = Vec::new();
    let mut names = HashSet::new();
    let mut out = Vec::new();
    if kinds.is_empty() {
        problems.push("it provides no routine kind".to_owned());
    }
    if kinds.len() > MAX_KINDS {
        problems.push(format!(
            "it describes {} kinds (at most {MAX_KINDS})",
            kinds.len()
        ));
        return Err(LoadError::BadDescription {
            path: path.to_owned(),
            problems,
        });
    }
    // Guest text in a message is escaped: it may reach a terminal.
    let show = |s: &str| {
        let mut t: String = s.chars().take(MAX_NAME_BYTES).collect();
        if t.len() < s.len() {
            t.push('…');
        }
        crate::term::escape(&t).into_owned()
    };
    for k in kinds {
        let kn = show(&k.name);
        if let Some(why) = bad_name(&k.name) {
            problems.push(format!("kind name `{kn}` {why}"));
        }
        if !names.insert(k.name.clone()) {
            problems.push(format!("kind `{kn}` is described twice"));
        }
        if k.description.len() > MAX_DESCRIPTION_BYTES {
            problems.push(format!(
                "kind `{kn}`: its description is {} bytes (at most {MAX_DESCRIPTION_BYTES})",
                k.description.len()
            ));
        }
        if k.default_config.len() > MAX_CONFIG_BYTES {
            problems.push(format!(
                "kind `{kn}`: its default config is {} bytes (at most {MAX_CONFIG_BYTES})",
                k.default_config.len()
            ));
        }
        if k.slots.len() > MAX_PORTS || k.events.len() > MAX_PORTS {
            problems.push(format!(
                "kind `{kn}`: {} slots and {} events (at most {MAX_PORTS} of each)",
                k.slots.len(),
                k.events.len()
            ));
        }
        let mut seen = HashSet::new();
        for s in &k.slots {
            let sn = show(&s.name);
            if let Some(why) = bad_name(&s.name) {
                problems.push(format!("kind `{kn}`: slot name `{sn}` {why}"));
            } else if !seen.insert(&s.name) {
                problems.push(format!("kind `{kn}`: slot name `{sn}` is repeated"));
            }
            if s.max_queue_length == Some(0) {
                problems.push(format!("kind `{kn}`: slot `{sn}` holds no item"));
            }
            if s.max_queue_length.is_some_and(|n| n > MAX_DESCRIBED_QUEUE) {
                problems.push(format!(
                    "kind `{kn}`: slot `{sn}` asks for a queue of {} items (a component may ask \
                     for at most {MAX_DESCRIBED_QUEUE}; a flow file may set more)",
                    s.max_queue_length.unwrap_or(0)
                ));
            }
        }
        let mut seen = HashSet::new();
        for ev in &k.events {
            let en = show(&ev.name);
            if let Some(why) = bad_name(&ev.name) {
                problems.push(format!("kind `{kn}`: event name `{en}` {why}"));
            } else if !seen.insert(&ev.name) {
                problems.push(format!("kind `{kn}`: event name `{en}` is repeated"));
            }
            if ev.fields.len() > MAX_PORTS {
                problems.push(format!(
                    "kind `{kn}`: event `{en}` has {} fields (at most {MAX_PORTS})",
                    ev.fields.len()
                ));
            }
            for f in &ev.fields {
                if let Some(why) = bad_name(f) {
                    problems.push(format!(
                        "kind `{kn}`: event `{en}`: field name `{}` {why}",
                        show(f)
                    ));
                }
            }
        }
        let config = match serde_json::from_str::<Value>(&k.default_config) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                problems.push(format!(
                    "kind `{kn}`: default config must be a JSON object, got {}",
                    crate::model::item::kind_of(&other)
                ));
                Map::new()
            }
            Err(e) => {
                problems.push(format!("kind `{kn}`: default config is not JSON: {e}"));
                Map::new()
            }
        };
        let default_policy = match &k.default_policy {
            None => None,
            Some(text) if text.len() > MAX_POLICY_BYTES => {
                problems.push(format!(
                    "kind `{kn}`: its default policy is {} bytes (at most {MAX_POLICY_BYTES})",
                    text.len()
                ));
                None
            }
            Some(text) => match DefaultPolicy::parse(text) {
                Ok(p) => Some(p),
                Err(why) => {
                    problems.push(format!(
                        "kind `{kn}`: default policy `{}` {why}",
                        show(text)
                    ));
                    None
                }
            },
        };
        out.push(KindInfo {
            name: k.name,
            description: k.description,
            slots: k
                .slots
                .into_iter()
                .map(|s| {
                    SlotSpec::new(&s.name).max_queue_length(
                        s.max_queue_length
                            .map_or(DEFAULT_MAX_QUEUE_LENGTH, |n| n as usize),
                    )
                })
                .collect(),
            events: k
                .events
                .into_iter()
                .map(|e| EventSpec {
                    name: e.name.as_str().into(),
                    fields: e.fields,
                })
                .collect(),
            default_config: config,
            default_policy,
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(LoadError::BadDescription {
            path: path.to_owned(),
            problems,
        })
    }
}

impl Plugin {
    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The version of the `routilux:plugin` WIT package it was built against.
    pub fn wit_version(&self) -> &'static str {
        self.inner.pre.version()
    }

    /// The routine kinds it provides, in the order it described them.
    pub fn kinds(&self) -> &[KindInfo] {
        &self.inner.kinds
    }

    /// Their names.
    pub fn kind_names(&self) -> Vec<&str> {
        self.inner.kinds.iter().map(|k| k.name.as_str()).collect()
    }

    /// One kind by name.
    pub fn kind(&self, name: &str) -> Option<&KindInfo> {
        self.inner.kinds.iter().find(|k| k.name == name)
    }

    /// What the component imports: the capabilities it asks the host for (the routilux host
    /// interface and the WASI interfaces it uses).
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }

    /// Whether the compiled component came from the on-disk cache.
    pub fn from_cache(&self) -> bool {
        self.inner.from_cache
    }

    /// The capabilities granted to this plugin's instances.
    pub fn permissions(&self) -> &Permissions {
        &self.inner.permissions
    }

    /// The same compiled plugin with other capabilities granted (nothing is recompiled or
    /// described again): for routines of one component that need different grants.
    pub fn with_permissions(&self, permissions: Permissions) -> Plugin {
        let i = &self.inner;
        Plugin {
            inner: Arc::new(PluginInner {
                engine: i.engine.clone(),
                path: i.path.clone(),
                pre: i.pre.clone(),
                permissions,
                kinds: i.kinds.clone(),
                imports: i.imports.clone(),
                from_cache: i.from_cache,
            }),
        }
    }

    /// A fresh instance of this plugin outside any routine (with the engine's default
    /// limits), after one call of `describe`: for warming up and for measuring what a live
    /// instance costs.
    pub fn instantiate(&self) -> Result<LiveInstance, LoadError> {
        let fail = |e: wasmtime::Error| LoadError::Describe {
            path: self.inner.path.clone(),
            detail: format!("{e:#}"),
        };
        let limits = self.inner.engine.default_limits().clone();
        let mut store = new_store(&self.inner, &limits, None).map_err(fail)?;
        let bindings = self.inner.pre.instantiate(&mut store).map_err(fail)?;
        bindings.call_describe(&mut store).map_err(fail)?;
        Ok(LiveInstance {
            _store: store,
            _bindings: bindings,
        })
    }

    /// For the benches: the mean cost in µs of the three stages of an instance's life that
    /// do not run guest code — making its Store (WASI context, limits, captures),
    /// instantiating the component in it, and dropping both — over `n` instances.
    #[doc(hidden)]
    pub fn instantiation_phases(&self, n: usize) -> Result<[f64; 3], LoadError> {
        let fail = |e: wasmtime::Error| LoadError::Describe {
            path: self.inner.path.clone(),
            detail: format!("{e:#}"),
        };
        let limits = self.inner.engine.default_limits().clone();
        let mut total = [Duration::ZERO; 3];
        for _ in 0..n {
            let t0 = Instant::now();
            let mut store = new_store(&self.inner, &limits, None).map_err(fail)?;
            let t1 = Instant::now();
            let bindings = self.inner.pre.instantiate(&mut store).map_err(fail)?;
            let t2 = Instant::now();
            drop((bindings, store));
            total[0] += t1 - t0;
            total[1] += t2 - t1;
            total[2] += t2.elapsed();
        }
        Ok(total.map(|t| t.as_secs_f64() * 1e6 / n.max(1) as f64))
    }

    /// A routine of `kind` with the engine's default limits: slots, events and default config
    /// as described, logic running in sandboxed instances of this plugin.
    pub fn routine(&self, kind: &str) -> Result<Routine, LoadError> {
        self.routine_with(kind, self.inner.engine.default_limits().clone())
    }

    /// A routine of `kind` with its own limits.
    pub fn routine_with(&self, kind: &str, limits: Limits) -> Result<Routine, LoadError> {
        let Some(k) = self.kind(kind) else {
            return Err(LoadError::UnknownKind {
                path: self.inner.path.clone(),
                kind: kind.to_owned(),
                available: self.kind_names().iter().map(|s| s.to_string()).collect(),
                suggestion: suggest(kind, self.kind_names()),
            });
        };
        let bad = |detail: &str| LoadError::BadLimits {
            path: self.inner.path.clone(),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
        };
        if limits.max_instances == 0 {
            return Err(bad("max_instances must be at least 1"));
        }
        if limits.recycle_after == 0 {
            return Err(bad("recycle_after must be at least 1"));
        }
        if limits.timeout.is_zero() {
            return Err(bad("timeout must be more than zero"));
        }
        if limits.fuel.is_some() && !self.inner.engine.fuel_enabled() {
            return Err(bad(
                "a fuel limit needs an engine with fuel metering (WasmConfig::fuel)",
            ));
        }
        let mut r = Routine::new().description(&k.description);
        for s in &k.slots {
            r = r.slot(s.clone());
        }
        for e in &k.events {
            r = r.event(&e.name, e.fields.clone());
        }
        for (key, v) in &k.default_config {
            r = r.config(key, v.clone());
        }
        if let Some(p) = k.default_policy {
            r = r.policy(p.policy());
        }
        Ok(r.logic_arc(WasmLogic::new(self.inner.clone(), kind, limits)))
    }
}
