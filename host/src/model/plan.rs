//! The plan of a flow: what the engine reads while it runs a job, with names resolved to
//! indices and a routing table `routine → event → [(routine, slot)]`, so that an emit does no
//! name lookups beyond finding its event.
//!
//! A plan holds no logic: the code of each routine is kept beside it
//! ([`Compiled`](super::flow::Compiled)), so that what logic is handed (its
//! [`Context`](crate::Context)) can read the plan without the plan knowing about logic.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::activation::Policy;
use super::budget::{Budgets, RoutineBudgets};
use super::spec::{ErrorStrategy, EventSpec};

/// A validated flow, ready to run: indices instead of names.
pub(crate) struct CompiledFlow {
    pub(crate) routines: Vec<CompiledRoutine>,
    pub(crate) index: HashMap<String, usize>,
    /// Whether some routines feed each other in a loop (only with `allow_cycles`).
    pub(crate) cyclic: bool,
    pub(crate) budgets: Budgets,
}

pub(crate) struct CompiledRoutine {
    pub(crate) id: Arc<str>,
    pub(crate) slot_names: Arc<[Arc<str>]>,
    pub(crate) capacities: Vec<usize>,
    /// Byte budget of each slot.
    pub(crate) queue_bytes: Vec<u64>,
    pub(crate) budgets: RoutineBudgets,
    pub(crate) events: Vec<EventSpec>,
    /// `routes[event] = [(routine, slot)]`.
    pub(crate) routes: Vec<Vec<(usize, usize)>>,
    pub(crate) config: Map<String, Value>,
    pub(crate) policy: Policy,
    pub(crate) message: Option<Arc<Value>>,
    pub(crate) on_error: ErrorStrategy,
    pub(crate) concurrency: usize,
}

impl CompiledRoutine {
    pub(crate) fn event_index(&self, event: &str) -> Option<usize> {
        self.events.iter().position(|e| *e.name == *event)
    }

    pub(crate) fn slot_index(&self, slot: &str) -> Option<usize> {
        self.slot_names.iter().position(|s| **s == *slot)
    }
}

impl CompiledFlow {
    pub(crate) fn routine_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}
