//! The engine's two synchronisation protocols, apart from the engine so that loom can check
//! them: [`quiesce`] (a job finishes when, and only when, nothing is left to run) and [`wake`]
//! (an idle worker sleeps without a lost wake-up). The host's `exec` layer uses both.
//!
//! Under `RUSTFLAGS="--cfg loom"` their atomics and locks are loom's, and the tests in
//! `tests/loom_*.rs` explore every interleaving of small models built on them (`just loom`).
//! This crate is its own so that the flag rebuilds it and loom only.

mod sync;

pub mod quiesce;
pub mod wake;
