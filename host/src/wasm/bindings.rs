//! The host's `bindgen!`s: the current `routilux:plugin@0.4.0` world (the top-level `wit/`
//! package) and, for plugins built before it, `routilux:plugin@0.3.0` (`host/wit-compat/`).
//! The rest of the host sees one plugin: [`PluginPre`] and [`PluginBindings`] pick the version
//! a component exports, and a 0.3.0 plugin's calls are adapted here (its kinds have no default
//! policy; its host imports are the 0.4.0 ones less `activation-id`).

use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::{AsContextMut, Result};

use super::instance::StoreData;

/// `routilux:plugin@0.4.0`.
pub(crate) mod v4 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        // Parameters of calls into guests borrow their strings and lists (no per-item copy).
        ownership: Borrowing {
            duplicate_if_necessary: true
        },
    });
}

/// `routilux:plugin@0.3.0`, loaded still.
pub(crate) mod v3 {
    wasmtime::component::bindgen!({
        path: "wit-compat/plugin-0.3.0.wit",
        world: "plugin",
        ownership: Borrowing {
            duplicate_if_necessary: true
        },
    });
}

pub(crate) use self::v4::exports::routilux::plugin::routine::{
    ActivationError, RoutineKind, SlotBatch,
};
pub(crate) use self::v4::routilux::plugin::host::Host;
pub(crate) use self::v4::routilux::plugin::types::Level;

/// Adds the host's imports of every supported version to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StoreData>) -> Result<()> {
    v4::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    v3::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// A component checked against one of the versions, ready to instantiate.
#[derive(Clone)]
pub(crate) enum PluginPre {
    V4(v4::PluginPre<StoreData>),
    V3(v3::PluginPre<StoreData>),
}

impl PluginPre {
    /// The version `pre` exports; an error (the current version's) if it exports none.
    pub(crate) fn new(pre: InstancePre<StoreData>) -> Result<Self> {
        match v4::PluginPre::new(pre.clone()) {
            Ok(p) => Ok(Self::V4(p)),
            Err(current) => match v3::PluginPre::new(pre) {
                Ok(p) => Ok(Self::V3(p)),
                Err(_) => Err(current),
            },
        }
    }

    /// The WIT version the component was built against.
    pub(crate) fn version(&self) -> &'static str {
        match self {
            Self::V4(_) => "0.4.0",
            Self::V3(_) => "0.3.0",
        }
    }

    pub(crate) fn instantiate(
        &self,
        store: impl AsContextMut<Data = StoreData>,
    ) -> Result<PluginBindings> {
        Ok(match self {
            Self::V4(p) => PluginBindings::V4(p.instantiate(store)?),
            Self::V3(p) => PluginBindings::V3(p.instantiate(store)?),
        })
    }
}

/// A live instance's exports.
pub(crate) enum PluginBindings {
    V4(v4::Plugin),
    V3(v3::Plugin),
}

impl PluginBindings {
    /// `describe`, in the current version's terms.
    pub(crate) fn call_describe(
        &self,
        store: impl AsContextMut<Data = StoreData>,
    ) -> Result<Vec<RoutineKind>> {
        match self {
            Self::V4(b) => b.routilux_plugin_routine().call_describe(store),
            Self::V3(b) => Ok(b
                .routilux_plugin_routine()
                .call_describe(store)?
                .into_iter()
                .map(|k| RoutineKind {
                    name: k.name,
                    description: k.description,
                    slots: k
                        .slots
                        .into_iter()
                        .map(|s| v4::routilux::plugin::types::SlotSpec {
                            name: s.name,
                            max_queue_length: s.max_queue_length,
                        })
                        .collect(),
                    events: k
                        .events
                        .into_iter()
                        .map(|e| v4::routilux::plugin::types::EventSpec {
                            name: e.name,
                            fields: e.fields,
                        })
                        .collect(),
                    default_config: k.default_config,
                    default_policy: None,
                })
                .collect()),
        }
    }

    /// `activate`, in the current version's terms.
    pub(crate) fn call_activate(
        &self,
        store: impl AsContextMut<Data = StoreData>,
        kind: &str,
        batches: &[SlotBatch<'_>],
        message: Option<&str>,
    ) -> Result<Result<(), ActivationError>> {
        match self {
            Self::V4(b) => b
                .routilux_plugin_routine()
                .call_activate(store, kind, batches, message),
            Self::V3(b) => {
                let batches: Vec<_> = batches
                    .iter()
                    .map(|s| v3::exports::routilux::plugin::routine::SlotBatch {
                        slot: s.slot,
                        items: s.items,
                        ends: s.ends,
                    })
                    .collect();
                Ok(b.routilux_plugin_routine()
                    .call_activate(store, kind, &batches, message)?
                    .map_err(|e| ActivationError {
                        message: e.message,
                        retryable: e.retryable,
                    }))
            }
        }
    }
}

impl v3::routilux::plugin::types::Host for StoreData {}

/// A 0.3.0 plugin's host imports: the current ones.
impl v3::routilux::plugin::host::Host for StoreData {
    fn emit(&mut self, event: String, payload: String) -> Result<(), String> {
        Host::emit(self, event, payload)
    }

    fn log(&mut self, level: v3::routilux::plugin::types::Level, message: String) {
        use v3::routilux::plugin::types::Level as Old;
        let level = match level {
            Old::Trace => Level::Trace,
            Old::Debug => Level::Debug,
            Old::Info => Level::Info,
            Old::Warn => Level::Warn,
            Old::Error => Level::Error,
        };
        Host::log(self, level, message)
    }

    fn config(&mut self, key: String) -> Option<String> {
        Host::config(self, key)
    }

    fn state_get(&mut self, key: String) -> Option<String> {
        Host::state_get(self, key)
    }

    fn state_set(&mut self, key: String, value: String) -> Result<(), String> {
        Host::state_set(self, key, value)
    }

    fn state_add(&mut self, key: String, delta: i64) -> Result<i64, String> {
        Host::state_add(self, key, delta)
    }

    fn state_compare_and_swap(
        &mut self,
        key: String,
        expected: Option<String>,
        value: String,
    ) -> Result<bool, String> {
        Host::state_compare_and_swap(self, key, expected, value)
    }

    fn job_id(&mut self) -> String {
        Host::job_id(self)
    }
}
