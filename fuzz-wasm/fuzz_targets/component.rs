//! Arbitrary bytes as a component: loading never panics, and whatever loads describes kinds
//! with names that are words.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use routilux::wasm::{Permissions, WasmConfig, WasmEngine};

fn engine() -> &'static WasmEngine {
    static E: OnceLock<WasmEngine> = OnceLock::new();
    E.get_or_init(|| {
        WasmEngine::new(WasmConfig {
            cache: false,
            ..WasmConfig::default()
        })
        .expect("an engine")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(plugin) = engine().load_bytes(Path::new("fuzz.wasm"), data, Permissions::default()) {
        for k in plugin.kinds() {
            assert!(!k.name.is_empty());
            assert!(k.name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-'));
        }
    }
});
