//! routilux: an event-driven workflow runtime.
//!
//! A [`Flow`] is a graph of [`Routine`]s. Each routine has named input slots (bounded queues)
//! and named output events; a connection joins an event to a slot. When items land in a slot,
//! the routine's activation [`Policy`] decides whether it runs now and which items it gets; its
//! [`Logic`] then runs on a work-stealing pool and may [`emit`](Context::emit) items that are
//! routed at once to every connected slot. A [`Runtime`] runs jobs — independent executions of
//! a registered flow — that complete by themselves when nothing is left to do.
//!
//! Module map, by the model's names:
//!
//! | module | what lives there |
//! | --- | --- |
//! | `item` | [`Item`]: a shared, immutable JSON object |
//! | `routine` | [`Routine`], [`Logic`], [`ErrorStrategy`] |
//! | `activation` | [`Policy`] and the [`Batch`] handed to logic |
//! | `flow`, `registry` | [`Flow`], validation, [`FlowRegistry`] |
//! | `context` | [`Context`]: emit (where an emit goes), state, config |
//! | `state` | WorkerState ([`StateRef`]) |
//! | `job` | job lifecycle, completion, counters, dead letters |
//! | `scheduler`, `timer` | the work-stealing pool and its timer |
//! | `runtime` | [`Runtime`], [`JobHandle`] |
//! | [`wasm`] | WebAssembly plugins: engine, cache, sandboxed instances |
//! | `cli` | the `routilux` tool: flow files, plugin directories, run / validate / inspect |

mod activation;
mod budget;
#[cfg(feature = "cli")]
pub mod cli;
mod context;
mod flow;
mod item;
mod job;
mod registry;
mod routine;
mod runtime;
mod scheduler;
mod state;
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
mod term;
mod timer;
pub mod wasm;

pub use activation::{Batch, CustomPolicy, Policy, PolicyView, Take};
pub use budget::{Budgets, RoutineBudgets};
pub use context::{Context, EmitError};
pub use flow::{Connection, Flow, FlowError, Problem, Warning};
pub use item::{Item, ItemError};
pub use job::{ActivationFailure, DeadLetter, JobId, JobStatus, OutputLine, RoutineCounters};
pub use registry::FlowRegistry;
pub use routine::{
    DEFAULT_MAX_QUEUE_BYTES, DEFAULT_MAX_QUEUE_LENGTH, ErrorStrategy, EventSpec, Exhausted, Logic,
    RetryPolicy, Routine, RoutineError, SlotSpec,
};
pub use runtime::{
    DeadLetterFn, Input, InputHold, JobHandle, JobSummary, OutputFn, Runtime, RuntimeBuilder,
    RuntimeError, Shutdown,
};
pub use state::{MAX_STATE_KEY_BYTES, StateError, StateRef};

/// The README's example, compiled and run as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
