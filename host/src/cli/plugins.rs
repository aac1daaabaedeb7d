//! Plugin directories: discovering components (and the manifests beside them), and building
//! plugin projects: Rust for `wasm32-wasip2` here, Python, JavaScript and C in
//! [`super::guests`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::guests::{self, JsEngine};

/// The target Rust plugins are built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// The languages of plugin projects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate (or workspace) using `routilux-sdk`, built for wasm32-wasip2.
    Rust,
    /// `plugin.py` using the `routilux` Python module, built with componentize-py.
    Python,
    /// `plugin.js` using `./routilux.js`, built with componentize-qjs (or componentize-js).
    Js,
    /// `plugin.c` (and any other `.c` files) using `routilux.h`, built with clang for WASI.
    C,
}

/// Components found in plugin directories, by name (file name without `.wasm`).
#[derive(Debug, Default)]
pub(crate) struct PluginDirs {
    /// Every component of each name, in directory order (more than one is ambiguous).
    pub by_name: BTreeMap<String, Vec<PathBuf>>,
}

impl PluginDirs {
    /// Adds every `*.wasm` file of `dir` (or, for a plugin project, of the directory its
    /// components are built into: see [`components_dir`]).
    pub fn scan(&mut self, dir: &Path) -> Result<(), String> {
        if !dir.is_dir() {
            return Err(if dir.exists() {
                format!("plugin directory {} is not a directory", dir.display())
            } else {
                format!("plugin directory {} does not exist", dir.display())
            });
        }
        let components = components_dir(dir);
        let entries = match std::fs::read_dir(&components) {
            Ok(e) => e,
            Err(_) if components != dir => {
                return Err(format!(
                    "{} is a plugin project whose components are not built (no {}): run \
                     `routilux build {}` or pass --build",
                    dir.display(),
                    components.display(),
                    dir.display()
                ));
            }
            Err(e) => return Err(format!("cannot read {}: {e}", components.display())),
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(if components != dir {
                format!(
                    "{} is a plugin project with no built components in {}: run `routilux \
                     build {}` or pass --build",
                    dir.display(),
                    components.display(),
                    dir.display()
                )
            } else {
                format!("no components (*.wasm) in {}", dir.display())
            });
        }
        for path in found {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.by_name.entry(name).or_default().push(path);
        }
        Ok(())
    }

    /// Plugin names, for suggestions.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// Whether `dir` is a plugin project (sources rather than components).
pub fn is_project(dir: &Path) -> bool {
    guests::project_lang(dir).is_some()
}

/// Where the components of a plugin directory are: the directory itself; for a Cargo project
/// `$CARGO_TARGET_DIR` (else `DIR/target`) + `/wasm32-wasip2/release`; for a Python,
/// JavaScript or C project `DIR/build`.
pub fn components_dir(dir: &Path) -> PathBuf {
    match guests::project_lang(dir) {
        None => return dir.to_owned(),
        Some(Lang::Rust) => {}
        Some(_) => return dir.join("build"),
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) if !t.is_empty() => PathBuf::from(t),
        _ => dir.join("target"),
    };
    target.join(WASM_TARGET).join("release")
}

/// The manifest beside a component, if any: `NAME.yaml`, `NAME.yml` or `NAME.json`.
pub(crate) fn manifest_of(component: &Path) -> Option<PathBuf> {
    ["yaml", "yml", "json"]
        .iter()
        .map(|ext| component.with_extension(ext))
        .find(|p| p.is_file())
}

/// Installs the `wasm32-wasip2` target with rustup if it is missing.
pub fn ensure_wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match installed {
        Ok(out)
            if out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| l.trim() == WASM_TARGET) =>
        {
            Ok(())
        }
        Ok(out) if out.status.success() => {
            errln!("installing the {WASM_TARGET} target (rustup target add {WASM_TARGET})");
            let added = Command::new("rustup")
                .args(["target", "add", WASM_TARGET])
                .status();
            if added.is_ok_and(|s| s.success()) {
                Ok(())
            } else {
                Err(format!(
                    "the {WASM_TARGET} target is not installed and `rustup target add \
                     {WASM_TARGET}` failed; install it and run again"
                ))
            }
        }
        // No rustup (a distribution's Rust): let cargo say whether the target is there.
        _ => Ok(()),
    }
}

/// Builds the plugin project in `dir`, whatever its language (see [`Lang`]); returns the
/// directory holding its components.
pub fn build_project(dir: &Path, js_engine: JsEngine, quiet: bool) -> Result<PathBuf, String> {
    match guests::project_lang(dir) {
        Some(Lang::Rust) => build_rust_plugins(dir, None, quiet),
        Some(lang) => guests::build_guest(dir, lang, js_engine),
        None => Err(format!(
            "{} is not a plugin project: it has no Cargo.toml, plugin.py, plugin.js or plugin.c",
            dir.display()
        )),
    }
}

/// Builds the Rust plugin project (crate or workspace) in `dir` for `wasm32-wasip2` in release
/// mode, installing the target if needed, into `target_dir` (default: as
/// [`components_dir`] says). Returns the directory holding the components.
pub fn build_rust_plugins(
    dir: &Path,
    target_dir: Option<&Path>,
    quiet: bool,
) -> Result<PathBuf, String> {
    if !dir.join("Cargo.toml").is_file() {
        return Err(format!(
            "{} has no Cargo.toml: it is not a Rust plugin project",
            dir.display()
        ));
    }
    ensure_wasm_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
    ])
    .arg(dir.join("Cargo.toml"))
    // Flags meant for the host build (coverage, sanitizers) would break a wasm build.
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if quiet {
        cmd.arg("--quiet");
    }
    let out = match target_dir {
        Some(t) => {
            cmd.arg("--target-dir").arg(t);
            t.join(WASM_TARGET).join("release")
        }
        None => components_dir(dir),
    };
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo to build {}: {e}", dir.display()))?;
    if !status.success() {
        return Err(format!(
            "building the plugins in {} failed ({status}); see cargo's output above",
            dir.display()
        ));
    }
    Ok(out)
}
