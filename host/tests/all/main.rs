//! Integration tests of the engine through its public API. One binary, one module per concern.

#![allow(clippy::unwrap_used, missing_docs)]

mod backpressure;
mod common;
mod durable;
mod errors;
mod examples;
mod fairness;
mod policies;
mod property;
mod runtime;
mod state;
mod validation;
mod wasm;

#[path = "../../../tests/support/plugins.rs"]
mod plugins;
