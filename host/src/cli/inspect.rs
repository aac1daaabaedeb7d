//! `routilux inspect`: what the host sees in a component.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::Code;
use super::plugins::PluginDirs;
use crate::term::escape;
use crate::wasm::Plugin;

/// What one import lets a component do here.
fn capability(import: &str) -> &'static str {
    let name = import.split('@').next().unwrap_or(import);
    match name {
        "routilux:plugin/host" => "the routilux host: emit, log, config, worker state, job id",
        "routilux:plugin/types" => "routilux types",
        "wasi:cli/stdout" | "wasi:cli/stderr" => "print: captured into the job's output",
        "wasi:cli/stdin" => "standard input: always empty",
        "wasi:cli/environment" => "environment variables: none unless granted (`permissions.env`)",
        "wasi:cli/exit" => "exit: ends the activation as a failure",
        "wasi:filesystem/types" | "wasi:filesystem/preopens" => {
            "files: no directory unless granted read-only (`permissions.read_only_dirs`)"
        }
        n if n.starts_with("wasi:sockets/") => "network: always refused",
        n if n.starts_with("wasi:clocks/") => "clocks",
        n if n.starts_with("wasi:random/") => "random numbers",
        n if n.starts_with("wasi:io/") => "streams and polling",
        n if n.starts_with("wasi:cli/terminal") => "terminal queries: no terminal",
        _ => "not provided by this host",
    }
}

#[derive(Serialize)]
struct Report<'a> {
    path: &'a Path,
    size_bytes: u64,
    from_cache: bool,
    load_ms: f64,
    /// The `routilux:plugin` WIT version it was built against.
    wit: String,
    kinds: Vec<KindReport<'a>>,
    imports: Vec<ImportReport<'a>>,
    /// What the manifest beside the component requests (granted only by the operator).
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<ManifestReport>,
}

#[derive(Serialize)]
struct ManifestReport {
    path: std::path::PathBuf,
    requests: String,
}

#[derive(Serialize)]
struct KindReport<'a> {
    name: &'a str,
    description: &'a str,
    slots: Vec<SlotReport<'a>>,
    events: Vec<EventReport<'a>>,
    default_config: Value,
    /// Its policy when a flow sets none (`immediate` unless it describes one).
    default_policy: String,
}

#[derive(Serialize)]
struct SlotReport<'a> {
    name: &'a str,
    max_queue_length: usize,
}

#[derive(Serialize)]
struct EventReport<'a> {
    name: &'a str,
    fields: Vec<&'a str>,
}

#[derive(Serialize)]
struct ImportReport<'a> {
    name: &'a str,
    capability: &'static str,
}

fn report<'a>(plugin: &'a Plugin, path: &'a Path, load_ms: f64) -> Report<'a> {
    let manifest = match super::load::manifest_requests(path) {
        None => None,
        Some(Ok((path, requests))) => Some(ManifestReport { path, requests }),
        Some(Err(e)) => Some(ManifestReport {
            path: super::plugins::manifest_of(path).unwrap_or_default(),
            requests: format!("(invalid manifest: {e})"),
        }),
    };
    Report {
        manifest,
        path,
        size_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
        from_cache: plugin.from_cache(),
        load_ms,
        wit: format!("routilux:plugin@{}", plugin.wit_version()),
        kinds: kinds(plugin),
        imports: imports(plugin),
    }
}

/// What a plugin provides and imports, as `inspect --json` shows it (`serve`'s
/// `GET /v1/plugins/{name}`).
pub(crate) fn describe(plugin: &Plugin) -> Value {
    serde_json::json!({
        "wit": format!("routilux:plugin@{}", plugin.wit_version()),
        "kinds": kinds(plugin),
        "imports": imports(plugin),
    })
}

fn kinds(plugin: &Plugin) -> Vec<KindReport<'_>> {
    plugin
        .kinds()
        .iter()
        .map(|k| KindReport {
            name: &k.name,
            description: &k.description,
            slots: k
                .slots
                .iter()
                .map(|s| SlotReport {
                    name: &s.name,
                    max_queue_length: s.max_queue_length,
                })
                .collect(),
            events: k
                .events
                .iter()
                .map(|e| EventReport {
                    name: &e.name,
                    fields: e.fields.iter().map(|f| &**f).collect(),
                })
                .collect(),
            default_config: Value::Object(k.default_config.clone()),
            default_policy: k
                .default_policy
                .map_or_else(|| "immediate".to_owned(), |p| p.to_string()),
        })
        .collect()
}

fn imports(plugin: &Plugin) -> Vec<ImportReport<'_>> {
    plugin
        .imports()
        .iter()
        .map(|i| ImportReport {
            name: i,
            capability: capability(i),
        })
        .collect()
}

fn print(r: &Report<'_>, out: &mut impl Write) -> std::io::Result<()> {
    // Everything a component described is guest text: escaped for the terminal.
    let e = |s: &str| escape(s).into_owned();
    writeln!(
        out,
        "{} ({:.1} KiB, {}, {} in {:.0} ms)",
        r.path.display(),
        r.size_bytes as f64 / 1024.0,
        r.wit,
        if r.from_cache {
            "from the compiled cache"
        } else {
            "compiled"
        },
        r.load_ms
    )?;
    writeln!(out, "\nkinds:")?;
    for k in &r.kinds {
        writeln!(out, "  {} — {}", e(k.name), e(k.description))?;
        let slots: Vec<String> = k
            .slots
            .iter()
            .map(|s| format!("{} (queue {})", e(s.name), s.max_queue_length))
            .collect();
        writeln!(out, "    slots:   {}", none_or(&slots))?;
        let events: Vec<String> = k
            .events
            .iter()
            .map(|ev| {
                let fields: Vec<String> = ev.fields.iter().map(|f| e(f)).collect();
                format!("{} {{{}}}", e(ev.name), fields.join(", "))
            })
            .collect();
        writeln!(out, "    events:  {}", none_or(&events))?;
        writeln!(out, "    config:  {}", e(&k.default_config.to_string()))?;
        writeln!(out, "    policy:  {}", k.default_policy)?;
    }
    writeln!(out, "\ncapabilities (imports):")?;
    let width = r.imports.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for i in &r.imports {
        writeln!(out, "  {:<width$}  {}", e(i.name), i.capability)?;
    }
    if let Some(m) = &r.manifest {
        writeln!(
            out,
            "\nmanifest {} requests: {}\n  (granted only by a flow file's `permissions:`/`limits:` \
             or `run --grant-requests`)",
            m.path.display(),
            e(&m.requests)
        )?;
    }
    Ok(())
}

fn none_or(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

/// Inspects one component, or every component of a directory.
pub(crate) fn inspect(path: &Path, json: bool) -> Code {
    let Some(engine) = super::engine() else {
        return Code::Failed;
    };
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut dirs = PluginDirs::default();
        if let Err(e) = dirs.scan(path) {
            errln!("error: {e}");
            return Code::Invalid;
        }
        dirs.by_name.into_values().flatten().collect()
    } else {
        vec![path.to_owned()]
    };
    let mut code = Code::Ok;
    let mut reports = Vec::new();
    let mut plugins = Vec::new();
    for file in &files {
        let started = Instant::now();
        match engine.load(file) {
            Ok(p) => plugins.push((p, file, started.elapsed().as_secs_f64() * 1e3)),
            Err(e) => {
                errln!("error: {e}");
                code = Code::Invalid;
            }
        }
    }
    for (p, file, ms) in &plugins {
        reports.push(report(p, file, *ms));
    }
    let mut out = std::io::stdout().lock();
    if json {
        let value = if path.is_dir() {
            serde_json::to_string_pretty(&reports)
        } else {
            match reports.first() {
                Some(r) => serde_json::to_string_pretty(r),
                None => return code,
            }
        };
        match value {
            Ok(s) => {
                let _ = writeln!(out, "{s}");
            }
            Err(e) => errln!("error: {e}"),
        }
    } else {
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                let _ = writeln!(out);
            }
            let _ = print(r, &mut out);
        }
    }
    code
}
