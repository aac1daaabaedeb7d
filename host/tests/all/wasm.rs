//! WebAssembly routines through real components in real wasmtime instances.

mod accounting;
mod containment;
mod emit;
mod examples;
mod loading;
mod sandbox;
mod versions;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use routilux::wasm::{Plugin, WasmConfig, WasmEngine};
use routilux::{JobId, OutputLine, Runtime};

use crate::common::Log;
use crate::plugins::{plugin, repo_root};

/// One engine for the whole test process (its cache lives under `target/`).
pub fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        WasmEngine::new(WasmConfig {
            cache_dir: Some(repo_root().join("target").join("routilux-test-cache")),
            ..WasmConfig::default()
        })
        .expect("engine")
    })
}

/// Loads one of the `plugins/` components.
pub fn load(name: &str) -> Plugin {
    engine()
        .load(plugin(name))
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// A runtime that records every output line with the time it arrived.
pub fn recording_runtime(threads: usize) -> (Runtime, Log<(Instant, JobId, OutputLine)>) {
    let log: Log<(Instant, JobId, OutputLine)> = Log::new();
    let l = log.clone();
    let rt = crate::common::builder(threads)
        .on_output(move |job, line| l.push((Instant::now(), job, line.clone())))
        .build();
    (rt, log)
}

pub const WAIT: Duration = crate::common::WAIT;
