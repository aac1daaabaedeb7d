//! WebAssembly routines: components of the `routilux:plugin@0.4.0` world (and of 0.3.0) as routine logic.
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
//! through the host imports. A `WasmLogic` keeps idle instances in a small pool *per job* and
//! takes one per activation (creating one from the shared `InstancePre` when the pool is
//! empty), so guest memory never carries from one job to the next. What ends an instance's
//! life:
//!
//! - **a trap** (panic, `unreachable`, stack overflow, memory limit, deadline, fuel): a trap
//!   poisons the whole Store, so the instance is dropped at once and the next activation gets
//!   a fresh one;
//! - **age**: after `recycle_after` activations, so a leak in a guest cannot grow forever;
//! - **surplus**: an instance returned to a pool already holding 8 idle ones is dropped;
//! - **its job's end**: the job's pool is dropped with its instances (unless the operator set
//!   `reuse_across_jobs`: then one pool serves every job of a group, an instance's memory
//!   moving to the budget of the job it serves);
//! - **room for another**: when the engine has its most instances, or the job's group (a
//!   tenant) its quota of them (`Runtime::set_group_instances`), an idle instance (of any
//!   routine and job; of the group, for its quota) is dropped to make a new one.
//!
//! At most `max_instances` live at once per routine and job (a checkout waits for one to come
//! back), under the group's quota (a checkout waits while all of the group's are busy, up to
//! the routine's timeout) and the engine's own cap (`WasmConfig::max_instances`; all busy:
//! the activation fails, retryable), except that an activation nested on a stack already
//! holding one of that routine's instances never waits for the routine's cap (it could be
//! waiting on itself) and makes one more, and one nested on a stack holding any instance goes
//! past its group's quota by as much.
//!
//! An activation that returns an error value (not a trap) leaves its instance healthy.
//!
//! # Sandbox
//!
//! Every Store has a memory cap (trapping on a failed grow) whose bytes are also charged to
//! the job's memory budget, a wall-clock deadline per activation (epoch interruption for code;
//! for a guest blocked in a host call, `wasi:io/poll` is shadowed by a bounded wait, see
//! `deadline`; time spent waiting inside `emit` for queue space or on the host's output does
//! not count), optional fuel, and WASI with no preopened directory, no environment variable
//! and no socket unless [`Permissions`] grant them. Guest stdout and stderr are captured per
//! instance and forwarded, line by line, to the output of the job and routine the instance is
//! serving, within the activation's output budget.
//!
//! wasmtime's own limits are set deliberately, per Store: hostcall fuel (the most one host
//! call may copy out of the guest) is the largest single value a budget allows plus 64 KiB,
//! not wasmtime's 128 MiB; at most 16,384 live resources (not a million: each can hold a host
//! timer or stream); at most 1 MiB of randomness per call (not 64 MiB). A trap from any of
//! them is reported in words a plugin author understands. The threat model these make up is
//! in the README ("Threat model").

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
pub use engine::{MAX_COMPONENT_BYTES, WasmConfig, WasmEngine, WasmStats};
pub use error::LoadError;
pub use instance::{Limits, Permissions};
pub use plugin::{DefaultPolicy, KindInfo, LiveInstance, Plugin};
