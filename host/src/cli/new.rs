//! `routilux new`: a plugin project that builds and runs on the first try.

use std::path::{Path, PathBuf};

use super::Code;

use super::plugins::Lang;

/// Where the Rust SDK is: `--sdk`, else `$ROUTILUX_SDK`, else the `guest-sdk/` this binary was
/// built beside.
fn sdk_path(given: Option<&Path>) -> Result<PathBuf, String> {
    let candidate = match given {
        Some(p) => p.to_owned(),
        None => match std::env::var_os("ROUTILUX_SDK") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk"),
        },
    };
    let manifest = candidate.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(format!(
            "the routilux-sdk crate is not at {} (no Cargo.toml); pass --sdk PATH to the \
             repository's guest-sdk/",
            candidate.display()
        ));
    }
    candidate
        .canonicalize()
        .map_err(|e| format!("{}: {e}", candidate.display()))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// How a Python routine is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Style {
    /// Class attributes and a `logic` method.
    Declarative,
    /// The reference library's: `__init__` calls `add_slot`, `add_event`, `set_config`,
    /// `set_logic`, `set_activation_policy`.
    Reference,
}

/// Creates `DIR/NAME` (DIR defaults to the current directory).
pub(crate) fn new(
    name: &str,
    lang: Lang,
    style: Style,
    dir: Option<&Path>,
    sdk: Option<&Path>,
) -> Code {
    if style == Style::Reference && lang != Lang::Python {
        errln!(
            "error: `--style reference` is the Python reference library's style: use it with \
             `--lang python`"
        );
        return Code::Usage;
    }
    if !valid_name(name) {
        errln!(
            "error: `{name}` is not a valid plugin name: use lowercase letters, digits, `-` and \
             `_`, starting with a letter"
        );
        return Code::Usage;
    }
    let root = dir.unwrap_or(Path::new(".")).join(name);
    if root.exists() {
        errln!("error: {} already exists", root.display());
        return Code::Usage;
    }
    let files = match lang {
        Lang::Rust => match sdk_path(sdk) {
            Ok(sdk) => rust_files(name, &sdk),
            Err(e) => {
                errln!("error: {e}");
                return Code::Usage;
            }
        },
        Lang::Python | Lang::Js | Lang::C => guest_files(name, lang, style),
    };
    for (rel, text) in &files {
        let path = root.join(rel);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, text));
        if let Err(e) = written {
            errln!("error: cannot write {}: {e}", path.display());
            return Code::Failed;
        }
    }
    outln!("created {} ({lang:?} plugin)", root.display());
    outln!("  cd {}", root.display());
    if lang == Lang::Rust {
        outln!("  cargo test                                          # the routine, natively");
    }
    outln!(
        "  routilux run flow.yaml --build --post '{{\"name\": \"Ada\"}}'   # build the component, run the flow"
    );
    Code::Ok
}

/// The flow every scaffold ships: the greeter alone, fed from the command line.
fn flow_yaml(name: &str, component: &str, plugins_note: &str) -> String {
    format!(
        r#"# routilux run flow.yaml --build --post '{{"name": "Ada"}}'
flow_id: {name}
plugins: .            # {plugins_note}; `--build` builds it first
routines:
  greeter:
    plugin: {component}
    kind: greeter
    config:
      greeting: Hello
execution:
  timeout: 30s
"#
    )
}

const PYTHON_GREETER: &str = r#"from routilux import Routine


class Greeter(Routine):
    """Greets each name it is given."""

    slots = ["names"]
    events = {"greetings": ["text"]}
    config = {"greeting": "Hello"}

    def logic(self, data, message):
        for item in data["names"]:
            text = f"{self.get_config('greeting')}, {item['name']}!"
            print(text)
            self.emit("greetings", text=text)
"#;

const PYTHON_GREETER_REFERENCE: &str = r#"from routilux import Routine
from routilux.activation_policies import immediate_policy


class Greeter(Routine):
    """Greets each name it is given (written as the Python reference library writes routines)."""

    def __init__(self):
        super().__init__()
        self.add_slot("names")
        self.add_event("greetings", ["text"])
        self.set_config(greeting="Hello")

        def greet(slot_data, policy_message, worker_state):
            for item in slot_data.get("names", []):
                text = f"{self.get_config('greeting')}, {item['name']}!"
                print(text)
                self.emit("greetings", text=text)

        self.set_logic(greet)
        self.set_activation_policy(immediate_policy())
"#;

const JS_GREETER: &str = r#"import { Routine, plugin } from "./routilux.js";

class Greeter extends Routine {
  static description = "Greets each name it is given.";
  static slots = ["names"];
  static events = { greetings: ["text"] };
  static config = { greeting: "Hello" };

  logic(data, message) {
    for (const item of data.names) {
      const text = `${this.getConfig("greeting")}, ${item.name}!`;
      console.log(text);
      this.emit("greetings", { text });
    }
  }
}

export const routine = plugin(Greeter);
"#;

const C_GREETER: &str = r#"#include <stdio.h>

#include "routilux.h"

/* Greets each name it is given. */
static rx_status greeter(const rx_batch *in) {
    char greeting[64] = "Hello", name[256], text[400];
    rx_config_str("greeting", greeting, sizeof greeting);
    for (size_t i = 0; i < rx_count(in, "names"); i++) {
        if (!rx_get_str(rx_at(in, "names", i), "name", name, sizeof name))
            return rx_fail("item %zu has no string `name`", i);
        snprintf(text, sizeof text, "%s, %s!", greeting, name);
        printf("%s\n", text);
        rx_json *out = rx_object();
        rx_put_str(out, "text", text);
        if (!rx_emit("greetings", out)) return RX_FAILED;
    }
    return RX_OK;
}

RX_PLUGIN(RX_KIND("greeter", "greets each name it is given", greeter,
                  RX_SLOTS("names"), RX_EVENTS(RX_EVENT("greetings", "text")),
                  "{\"greeting\": \"Hello\"}"));
"#;

fn guest_files(name: &str, lang: Lang, style: Style) -> Vec<(&'static str, String)> {
    let (file, source, what, sdk) = match lang {
        Lang::Python => (
            "plugin.py",
            if style == Style::Reference {
                PYTHON_GREETER_REFERENCE
            } else {
                PYTHON_GREETER
            },
            "Python (built with componentize-py)",
            "`routilux` (a package: `routilux`, `routilux.activation_policies`)",
        ),
        Lang::Js => (
            "plugin.js",
            JS_GREETER,
            "JavaScript (built with componentize-qjs; `--js-engine starlingmonkey` for componentize-js)",
            "`./routilux.js`",
        ),
        _ => (
            "plugin.c",
            C_GREETER,
            "C (built with clang for WASI and wasm-tools)",
            "`routilux.h`",
        ),
    };
    vec![
        (file, source.to_owned()),
        ("flow.yaml", flow_yaml(name, name, "this plugin project")),
        (
            "README.md",
            format!(
                r#"# {name}

A [routilux](https://example.invalid/routilux) plugin written in {what}.

The SDK ({sdk}) and the WIT are provided by `routilux build`, which stages them in
`build/.routilux/` and installs the guest toolchain on first use.

```sh
routilux build                                           # → build/{name}.wasm
routilux inspect build/{name}.wasm                       # what the host sees
routilux run flow.yaml --build --post '{{"name": "Ada"}}'  # prints "Hello, Ada!"
routilux run flow.yaml --post '{{"name": "Ada"}}' --json   # the job's summary, for tests
```
"#
            ),
        ),
        (".gitignore", "/build\n__pycache__/\n".to_owned()),
    ]
}

fn rust_files(name: &str, sdk: &Path) -> Vec<(&'static str, String)> {
    let component = name.replace('-', "_");
    let sdk = sdk.display().to_string().replace('\\', "/");
    vec![
        (
            "Cargo.toml",
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the WebAssembly component; rlib: `cargo test` runs the routine natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
routilux-sdk = {{ path = "{sdk}" }}

# One codegen unit and LTO: a smaller component with fewer functions, which makes every
# live instance smaller (its function table and references) and activations cheaper.
[profile.release]
strip = true
codegen-units = 1
lto = true

# A project of its own, even when created inside another workspace.
[workspace]
"#
            ),
        ),
        (
            "src/lib.rs",
            r#"//! A routilux plugin. Build it with `routilux build` (or `cargo build --release --target
//! wasm32-wasip2`), look at it with `routilux inspect`, run it with `routilux run flow.yaml`.

use routilux_sdk::{Batch, Context, Error, Routine, Spec, json};

/// Greets each name it is given, prints the greeting and emits it.
pub struct Greeter;

impl Routine for Greeter {
    const NAME: &'static str = "greeter";
    fn spec() -> Spec {
        Spec::new("greets each name it is given")
            .slot("names")
            .event("greetings", ["text"])
            .config("greeting", "Hello")
    }
    fn activate(ctx: &Context, batch: &Batch) -> Result<(), Error> {
        let greeting: String = ctx.config("greeting")?.unwrap_or_else(|| "Hello".into());
        for item in batch.slot("names") {
            let name: String = item.get("name")?;
            let text = format!("{greeting}, {name}!");
            println!("{text}");
            ctx.emit("greetings", &json!({ "text": text }))?;
        }
        Ok(())
    }
}

routilux_sdk::export!(Greeter);

#[cfg(test)]
mod tests {
    use super::*;
    use routilux_sdk::testing::{TestHost, batch};

    #[test]
    fn greets_each_name() {
        let host = TestHost::new().with_config("greeting", json!("Hi"));
        host.run::<Greeter>(&batch([("names", vec![json!({ "name": "Ada" })])]))
            .unwrap();
        assert_eq!(host.emitted("greetings"), vec![json!({ "text": "Hi, Ada!" })]);
    }
}
"#
            .to_owned(),
        ),
        (
            "flow.yaml",
            flow_yaml(name, &component, "this Cargo project"),
        ),
        ("README.md", format!(
            r#"# {name}

A [routilux](https://example.invalid/routilux) plugin written in Rust.

```sh
cargo test                                                   # the routine, natively
routilux build                                               # → target/wasm32-wasip2/release/{component}.wasm
routilux inspect target/wasm32-wasip2/release/{component}.wasm   # what the host sees
routilux run flow.yaml --build --post '{{"name": "Ada"}}'      # prints "Hello, Ada!"
```
"#
        )),
        (".gitignore", "/target\n".to_owned()),
    ]
}
