//! routilux: an event-driven workflow runtime.
//!
//! A [`Flow`] is a graph of [`Routine`]s. Each routine has named input slots (bounded queues)
//! and named output events; a connection joins an event to a slot. When items land in a slot,
//! the routine's activation [`Policy`] decides whether it runs now and which items it gets; its
//! [`Logic`] then runs on a work-stealing pool and may [`emit`](Context::emit) items that are
//! routed at once to every connected slot. A [`Runtime`] runs jobs — independent executions of
//! a registered flow — that complete by themselves when nothing is left to do.
//!
//! Layers, each naming only the ones below it (read top-down for the API, bottom-up for how
//! it works):
//!
//! | layer | what lives there |
//! | --- | --- |
//! | `cli` | the `routilux` tool: flow files, plugin directories, run / validate / inspect |
//! | [`wasm`] | WebAssembly plugins: engine, cache, sandboxed instances (a [`Logic`]) |
//! | `runtime` | the API: [`Runtime`], [`JobHandle`], posting, summaries |
//! | `exec` | execution: the pool and timer, a job's queues, lifecycle and accounting, delivery and backpressure, running activations |
//! | `model` | what a flow is: [`Item`], [`Policy`], [`Routine`], [`Flow`], and the [`Context`] logic is handed |

#[cfg(feature = "cli")]
pub mod cli;
mod exec;
mod model;
mod runtime;
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
mod term;
pub mod wasm;

pub use exec::durable::{JobStore, Resumed};
pub use exec::job::{DeadLetterFn, OutputFn};
pub use model::activation::{Batch, CustomPolicy, Policy, PolicyView, Take};
pub use model::budget::{Budgets, RoutineBudgets};
pub use model::context::{Context, EmitError};
pub use model::flow::{Connection, Flow, FlowError, Problem, Warning};
pub use model::item::{Item, ItemError};
pub use model::registry::FlowRegistry;
pub use model::report::{
    ActivationFailure, DeadLetter, JobId, JobStatus, OutputLine, RoutineCounters,
};
pub use model::routine::{Logic, Routine};
pub use model::spec::{
    DEFAULT_MAX_QUEUE_BYTES, DEFAULT_MAX_QUEUE_LENGTH, ErrorStrategy, EventSpec, Exhausted,
    RetryPolicy, RoutineError, SlotSpec,
};
pub use model::state::{MAX_STATE_KEY_BYTES, StateError, StateRef};
pub use runtime::{
    Group, GroupUsage, Input, InputHold, JobHandle, JobSummary, Runtime, RuntimeBuilder,
    RuntimeError, Shutdown,
};

/// The README's example, compiled and run as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
