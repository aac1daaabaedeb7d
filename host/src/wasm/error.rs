//! Why a plugin could not be loaded or a routine not made from it.

use std::path::PathBuf;

use crate::model::flow::hint;

/// A plugin that cannot be used, and why. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than any component this host loads (or is not a regular file).
    #[error("{}: {detail}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The file is not WebAssembly at all.
    #[error("{}: not a WebAssembly file (no `\\0asm` header)", path.display())]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    /// A core module where a component is needed.
    #[error(
        "{}: a core WebAssembly module, not a component; build the plugin for `wasm32-wasip2` \
         (or wrap it with `wasm-tools component new`)",
        path.display()
    )]
    CoreModule {
        /// The file.
        path: PathBuf,
    },
    /// wasmtime rejected the component.
    #[error("{}: invalid component: {detail}", path.display())]
    Compile {
        /// The file.
        path: PathBuf,
        /// wasmtime's explanation.
        detail: String,
    },
    /// The component is not a `routilux:plugin@0.4.0` (or 0.3.0) plugin (another world,
    /// another version of the WIT package, or imports the host does not grant).
    #[error("{}: not a routilux:plugin@0.4.0 (or 0.3.0) plugin: {detail}", path.display())]
    WrongWorld {
        /// The file.
        path: PathBuf,
        /// What does not match.
        detail: String,
    },
    /// `describe` trapped or could not be called.
    #[error("{}: `describe` failed: {detail}", path.display())]
    Describe {
        /// The file.
        path: PathBuf,
        /// The trap or error.
        detail: String,
    },
    /// `describe` returned something unusable.
    #[error("{}: `describe` returned an invalid description:{}", path.display(), list(problems))]
    BadDescription {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The plugin provides no kind of that name.
    #[error("{}: no routine kind `{kind}` (it provides: {}){}", path.display(), available.join(", "), hint(suggestion))]
    UnknownKind {
        /// The file.
        path: PathBuf,
        /// The kind asked for.
        kind: String,
        /// The kinds it provides.
        available: Vec<String>,
        /// The nearest kind name.
        suggestion: Option<String>,
    },
    /// Limits that cannot work.
    #[error("{}: kind `{kind}`: {detail}", path.display())]
    BadLimits {
        /// The file.
        path: PathBuf,
        /// The kind.
        kind: String,
        /// What is wrong.
        detail: String,
    },
    /// The engine could not be set up.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
}

fn list(problems: &[String]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}
