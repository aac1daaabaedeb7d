//! The flow registry: validated flows by name.
//!
//! Registering validates and compiles a flow once; every job of that flow shares the compiled
//! form. The registry is cheap to clone (a shared handle), so several runtimes, or a runtime and
//! a loader, can share one.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::flow::{Compiled, Flow, FlowError, Warning};

/// Flows by name. Clones share the same registry.
#[derive(Clone, Default)]
pub struct FlowRegistry {
    flows: Arc<RwLock<BTreeMap<String, Arc<Compiled>>>>,
}

impl FlowRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates `flow` and registers it under `name` (replacing a flow of that name; jobs
    /// already running keep the version they started with). Returns the flow's warnings.
    pub fn register(&self, name: &str, flow: &Flow) -> Result<Vec<Warning>, FlowError> {
        let (compiled, warnings) = flow.compile()?;
        self.flows
            .write()
            .insert(name.to_owned(), Arc::new(compiled));
        Ok(warnings)
    }

    /// Removes a flow; returns whether it was there.
    pub fn unregister(&self, name: &str) -> bool {
        self.flows.write().remove(name).is_some()
    }

    /// Registered flow names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.flows.read().keys().cloned().collect()
    }

    /// Whether a flow of that name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.flows.read().contains_key(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Compiled>> {
        self.flows.read().get(name).cloned()
    }
}
