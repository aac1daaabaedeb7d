//! Builds the guest plugins (`plugins/`, a separate cargo workspace) for `wasm32-wasip2`,
//! once per process, and says where the components are. Shared by the tests and the benches.

use std::path::{Path, PathBuf};
use std::process::Command;
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
    let root = repo_root();
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(out) = installed
        && out.status.success()
        && !String::from_utf8_lossy(&out.stdout).contains("wasm32-wasip2")
    {
        eprintln!("installing the wasm32-wasip2 target (rustup target add wasm32-wasip2)");
        let added = Command::new("rustup")
            .args(["target", "add", "wasm32-wasip2"])
            .status();
        if !added.is_ok_and(|s| s.success()) {
            return Err(
                "the wasm32-wasip2 target is not installed and `rustup target add \
                        wasm32-wasip2` failed; install it and run again"
                    .into(),
            );
        }
    }
    let target_dir = root.join("plugins").join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(root.join("plugins").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .map_err(|e| format!("cannot run cargo to build the plugins: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the plugins failed ({status}); see the output above"
        ));
    }
    Ok(target_dir.join("wasm32-wasip2").join("release"))
}
