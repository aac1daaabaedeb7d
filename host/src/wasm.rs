//! WebAssembly routines: components of the `routilux:plugin@0.3.0` world as routine logic.
//!
//! ```text
//! WasmEngine ── one wasmtime Engine (epoch interruption on), one Linker (WASI + host imports),
//!   │            an epoch ticker thread, and the on-disk cache of compiled components
//!   └─ load(path) → Plugin ── Component + InstancePre (shared), the kinds from `describe`
//!                     └─ routine(kind) → Routine whose Logic is a WasmLogic:
//!                          a pool of instances, each with its own Store
//! ```
//!
//! # Instance lifecycle
//!
//! An instance is a resource, not the state: a routine's state lives in the job's WorkerState,
//! through the host imports. A `WasmLogic` keeps idle instances in a small pool and takes one
//! per activation (creating one from the shared `InstancePre` when the pool is empty). What
//! ends an instance's life:
//!
//! - **a trap** (panic, `unreachable`, stack overflow, memory limit, deadline, fuel): a trap
//!   poisons the whole Store, so the instance is dropped at once and the next activation gets
//!   a fresh one;
//! - **age**: after `recycle_after` activations, so a leak in a guest cannot grow forever;
//! - **surplus**: an instance returned to a pool already holding 8 idle ones is dropped.
//!
//! At most `max_instances` live at once per routine (a checkout waits for one to come back),
//! except that an activation nested on a stack already holding one of that routine's instances
//! never waits (it could be waiting on itself) and makes one more.
//!
//! An activation that returns an error value (not a trap) leaves its instance healthy.
//!
//! # Sandbox
//!
//! Every Store has a memory cap (`StoreLimits`, trapping on a failed grow), a wall-clock
//! deadline per activation (epoch interruption; time spent waiting inside `emit` for queue
//! space does not count), optional fuel, and WASI with no preopened directory, no environment
//! variable and no socket unless [`Permissions`] grant them. Guest stdout and stderr are
//! captured per instance and forwarded, line by line, to the output of the job and routine the
//! instance is serving.

mod bindings;
mod cache;
mod deadline;
mod engine;
mod error;
mod instance;
mod output;
mod plugin;

#[cfg(feature = "cli")]
pub(crate) use cache::default_dir as default_cache_dir;
pub use engine::{WasmConfig, WasmEngine, WasmStats};
pub use error::LoadError;
pub use instance::{Limits, Permissions};
pub use plugin::{KindInfo, LiveInstance, Plugin};
