//! System tests: the `routilux` binary as a subprocess, as a user or an operator meets it (the
//! example flows, bad input and exit codes, plugins in four languages). They are a test target
//! of the `routilux` package (`host/Cargo.toml`), so cargo builds the binary first and hands
//! its path over as `CARGO_BIN_EXE_routilux`; the engine's own integration tests stay in
//! `host/tests/all`.

#![allow(clippy::unwrap_used, missing_docs)]

mod cli;
mod durable;
mod hostile;
mod polyglot;
mod reference;
mod serve;

#[path = "../support/plugins.rs"]
mod plugins;
