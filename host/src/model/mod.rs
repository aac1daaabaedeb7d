//! The model: what a flow is and what its logic is handed, with no engine in it. Read it
//! bottom-up:
//!
//! | module | what lives there |
//! | --- | --- |
//! | `item`, `budget` | [`Item`](crate::Item): a shared, immutable JSON object; byte budgets and the memory meter |
//! | `activation` | [`Policy`](crate::Policy) and the [`Batch`](crate::Batch) handed to logic |
//! | `state` | WorkerState ([`StateRef`](crate::StateRef)) |
//! | `spec` | slots, events, [`RoutineError`](crate::RoutineError), [`ErrorStrategy`](crate::ErrorStrategy) |
//! | `report` | what a job reports: ids, status, counters, dead letters, output lines |
//! | `plan` | a compiled flow as the engine reads it: indices and a routing table |
//! | `context` | [`Context`](crate::Context): what logic can do; the [`JobPort`](context::JobPort) it asks the engine through |
//! | `routine` | [`Routine`](crate::Routine) and [`Logic`](crate::Logic) |
//! | `flow`, `registry` | [`Flow`](crate::Flow), validation and compilation, [`FlowRegistry`](crate::FlowRegistry) |

pub(crate) mod activation;
pub(crate) mod budget;
pub(crate) mod context;
pub(crate) mod flow;
pub(crate) mod item;
pub(crate) mod plan;
pub(crate) mod registry;
pub(crate) mod report;
pub(crate) mod routine;
pub(crate) mod slots;
pub(crate) mod spec;
pub(crate) mod state;
