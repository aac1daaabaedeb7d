//! Builds the guest plugins (`plugins/`, a separate cargo workspace) for `wasm32-wasip2`,
//! once per process, and says where the components are. Shared by the tests and the benches.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// The directory holding `<plugin>.wasm` for every plugin crate, built if needed.
pub fn plugin_dir() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    }
}

/// The path of one plugin's component.
pub fn plugin(name: &str) -> PathBuf {
    plugin_dir().join(format!("{name}.wasm"))
}

fn build() -> Result<PathBuf, String> {
    let plugins = repo_root().join("plugins");
    routilux::cli::plugins::build_rust_plugins(&plugins, Some(&plugins.join("target")), true)
}

/// The component of the Python, JavaScript or C plugin project `plugins/<name>`, built once per
/// process (through the CLI's builder, which installs the guest toolchains on first use).
#[allow(dead_code)]
pub fn guest_plugin(name: &str) -> PathBuf {
    use routilux::cli::guests::JsEngine;
    use std::collections::HashMap;
    use std::sync::Mutex;
    static BUILT: OnceLock<Mutex<HashMap<String, Result<PathBuf, String>>>> = OnceLock::new();
    let dir = repo_root().join("plugins").join(name);
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .expect("no build panicked");
    let result = built.entry(name.to_owned()).or_insert_with(|| {
        routilux::cli::plugins::build_project(&dir, JsEngine::Quickjs, true)
            .map(|out| out.join(format!("{name}.wasm")))
    });
    match result {
        Ok(path) => path.clone(),
        Err(e) => panic!("building plugins/{name}: {e}"),
    }
}
