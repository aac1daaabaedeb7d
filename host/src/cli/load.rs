//! From a flow file and plugin directories to a validated [`Flow`]: every problem found, each
//! at its place, with the nearest valid name where a name is unknown.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use serde_saphyr::{Location, Spanned};

use super::diag::{Diagnostic, Source};
use super::file::{
    BudgetsDef, FlowFile, LimitsDef, ManifestFile, OnErrorDef, PermissionsDef, PolicyDef, ThenDef,
};
use super::grants::{self, Protected};
use super::plugins::{self, PluginDirs};
use crate::model::flow::{Problem, suggest};
use crate::wasm::{Limits, LoadError, Permissions, Plugin, WasmEngine};
use crate::{Budgets, ErrorStrategy, Exhausted, Flow, Policy, RetryPolicy, RoutineBudgets};

/// How to find plugins.
#[derive(Clone, Debug, Default)]
pub(crate) struct PluginOptions {
    /// Directories given on the command line (searched before the flow file's).
    pub dirs: Vec<PathBuf>,
    /// Build plugin projects (Rust, Python, JavaScript, C) first.
    pub build: bool,
    /// The engine JavaScript projects are built with.
    pub js_engine: super::guests::JsEngine,
    /// Accept what plugin manifests request (directories, variables, higher limits).
    pub grant_requests: bool,
}

/// What one routine asked for and what it got.
#[derive(Clone, Debug)]
pub(crate) struct RoutineGrants {
    pub routine: String,
    /// What its plugin's manifest requests.
    pub requested: Permissions,
    /// What the sandbox grants it.
    pub granted: Permissions,
}

/// A plugin manifest, read and judged once per component.
#[derive(Clone, Debug)]
struct Manifest {
    /// The limits that apply: the defaults, lowered by the manifest (and raised where it
    /// requested more and requests are accepted).
    limits: AllLimits,
    /// What it requests (directories resolved when they could be).
    requested: Permissions,
    /// What of it is granted (only with `--grant-requests`).
    granted: Permissions,
}

/// A flow file turned into a flow that can run.
pub(crate) struct Loaded {
    pub flow_id: String,
    pub description: Option<String>,
    pub flow: Flow,
    pub threads: Option<usize>,
    pub timeout: Option<Duration>,
    /// Warnings (the flow is valid).
    pub warnings: Vec<Diagnostic>,
    /// Slots no connection feeds, in file order: where posts go.
    pub entries: Vec<(String, String)>,
    /// The components used, with whether each came from the compiled cache.
    pub components: Vec<(PathBuf, bool)>,
    /// The flow file's own input, by target slot.
    pub input: Vec<((String, String), Vec<crate::Item>)>,
    /// Per routine (in file order), what was requested and what is granted.
    pub grants: Vec<RoutineGrants>,
}

/// Reads, checks and builds the flow in `path`. On failure, every diagnostic found (errors
/// and warnings).
pub(crate) fn load(
    path: &Path,
    engine: &WasmEngine,
    options: &PluginOptions,
) -> Result<Loaded, Vec<Diagnostic>> {
    let src = Source::read(path).map_err(|d| vec![d])?;
    let file: FlowFile = src.parse().map_err(|d| vec![d])?;
    let base = path.parent().unwrap_or(Path::new(".")).to_owned();
    let mut b = Builder::new(&src, engine, base, options.grant_requests, false);
    b.scan_dirs(&file, options);
    build(b, &file)
}

/// Checks and builds a tenant's flow (`routilux serve`): the text is untrusted, so it may name
/// only the tenant's uploaded `plugins` (by name) and may not give itself anything: plugin
/// directories or paths, `permissions`, `thread_pool_size`, and limits or budgets above the
/// defaults are refused, each at its place. Diagnostics name the file `name`.
pub(crate) fn load_tenant_flow(
    name: &str,
    text: String,
    engine: &WasmEngine,
    plugins: &std::collections::BTreeMap<String, Plugin>,
) -> Result<Loaded, Vec<Diagnostic>> {
    let src = Source::from_text(Path::new(name), text);
    let file: FlowFile = src.parse().map_err(|d| vec![d])?;
    let mut b = Builder::new(&src, engine, PathBuf::new(), false, true);
    for (name, plugin) in plugins {
        let key = PathBuf::from(name);
        b.loaded.insert(key.clone(), Ok(plugin.clone()));
        b.manifests.insert(
            key,
            Some(Manifest {
                limits: AllLimits::default(),
                requested: Permissions::default(),
                granted: Permissions::default(),
            }),
        );
    }
    const NOT_YOURS: &str = "a tenant's flow may not set it (the server's operator grants it \
                             in the tenant's configuration)";
    if let Some(p) = &file.plugins {
        b.diags.push(src.error(
            &p.referenced,
            "`plugins:` names host directories: a tenant's flow uses the plugins uploaded \
             with PUT /v1/plugins/{name}",
        ));
    }
    if let Some(t) = &file.execution.thread_pool_size {
        b.diags.push(src.error(
            &t.referenced,
            format!("`thread_pool_size`: the server's worker pool is shared; {NOT_YOURS}"),
        ));
    }
    if let Some(bd) = &file.budgets
        && let Ok(asked) = flow_budgets(&bd.value)
    {
        let higher = budgets_raised(&Budgets::default(), &asked);
        if !higher.is_empty() {
            b.diags.push(src.error(
                &bd.referenced,
                format!(
                    "budgets above the defaults ({}): {NOT_YOURS}",
                    higher.join(", ")
                ),
            ));
        }
    }
    for (id, def) in &file.routines {
        if let Some(p) = &def.value.permissions {
            b.diags.push(src.error(
                &p.referenced,
                format!("routine `{}`: `permissions`: {NOT_YOURS}", id.value),
            ));
        }
        if let Some(l) = &def.value.limits {
            let base = AllLimits::default();
            let mut asked = base.clone();
            if apply_limits(&mut asked, &l.value).is_ok() {
                let higher = raised(&base, &asked);
                if !higher.is_empty() {
                    b.diags.push(src.error(
                        &l.referenced,
                        format!(
                            "routine `{}`: limits above the defaults ({}): {NOT_YOURS}",
                            id.value,
                            higher.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    build(b, &file)
}

/// The flow-level budgets of `asked` looser than `base`'s.
fn budgets_raised(base: &Budgets, asked: &Budgets) -> Vec<String> {
    let size = |n: u64| crate::model::budget::bytes(n);
    let mut out = Vec::new();
    for (name, b, a) in [
        ("memory", base.memory, asked.memory),
        (
            "dead_letter_bytes",
            base.dead_letter_bytes,
            asked.dead_letter_bytes,
        ),
        ("output_bytes", base.output_bytes, asked.output_bytes),
        (
            "error_bytes",
            base.error_bytes as u64,
            asked.error_bytes as u64,
        ),
    ] {
        if a > b {
            out.push(format!("{name} {}", size(a)));
        }
    }
    for (name, b, a) in [
        ("dead_letters", base.dead_letters, asked.dead_letters),
        ("output_lines", base.output_lines, asked.output_lines),
    ] {
        if a > b {
            out.push(format!("{name} {a}"));
        }
    }
    out
}

/// The flow of `file`, built by `b` (whose plugins are found).
fn build(mut b: Builder<'_>, file: &FlowFile) -> Result<Loaded, Vec<Diagnostic>> {
    let src = b.src;
    let mut flow = Flow::new();
    flow.allow_cycles(file.allow_cycles);
    if let Some(s) = &file.on_error {
        flow.on_error(strategy(&s.value));
    }
    if let Some(bd) = &file.budgets {
        match flow_budgets(&bd.value) {
            Ok(budgets) => {
                flow.budgets(budgets);
            }
            Err(e) => b.diags.push(src.error(&bd.referenced, e)),
        }
    }
    if file.routines.is_empty() {
        b.diags
            .push(src.error(&file.flow_id.referenced, "the flow has no routines"));
    }
    // Routine id → the kind it got (None: it could not be built; its connections are not
    // checked further, to avoid a cascade of messages).
    let mut kinds: HashMap<String, Option<crate::wasm::KindInfo>> = HashMap::new();
    let mut routine_at: HashMap<String, Location> = HashMap::new();
    for (id, def) in &file.routines {
        routine_at.insert(id.value.clone(), id.referenced);
        let (kind, routine) = match b.routine(&id.value, &def.value) {
            Some((k, r)) => (Some(k), r),
            None => (None, None),
        };
        kinds.insert(id.value.clone(), kind);
        if let Some(routine) = routine {
            flow.add_routine(routine, &id.value);
        }
    }

    let ids: Vec<&str> = file.routines.keys().map(|k| k.value.as_str()).collect();
    let mut connection_at: HashMap<String, Location> = HashMap::new();
    // The first place each routine-to-routine edge is written (where a cycle is shown).
    let mut edge_at: HashMap<(String, String), Location> = HashMap::new();
    let mut fed: BTreeSet<(String, String)> = BTreeSet::new();
    for c in &file.connections {
        let from = b.endpoint(&c.value.from, "from", "event", &ids, &kinds);
        let to = b.endpoint(&c.value.to, "to", "slot", &ids, &kinds);
        if let (Some((fr, ev)), Some((tr, sl))) = (from, to) {
            let key = format!("{fr}.{ev} -> {tr}.{sl}");
            connection_at.entry(key).or_insert(c.referenced);
            edge_at
                .entry((fr.clone(), tr.clone()))
                .or_insert(c.referenced);
            fed.insert((tr.clone(), sl.clone()));
            flow.connect(&fr, &ev, &tr, &sl);
        }
    }

    let mut input = Vec::new();
    for (target, items) in &file.input {
        if let Some(to) = b.endpoint(target, "input", "slot", &ids, &kinds) {
            let items = items
                .iter()
                .filter_map(|m| crate::Item::new(Value::Object(m.clone())).ok())
                .collect();
            input.push((to, items));
        }
    }

    let threads = file.execution.thread_pool_size.as_ref().and_then(|t| {
        let ok = (1..=super::MAX_THREADS).contains(&t.value);
        if !ok {
            b.diags.push(src.error(
                &t.referenced,
                format!(
                    "thread_pool_size must be 1 to {}, not {}",
                    super::MAX_THREADS,
                    t.value
                ),
            ));
        }
        ok.then_some(t.value)
    });

    let warnings = match flow.validate() {
        Ok(w) => w,
        Err(e) => {
            for p in e.problems {
                let at = problem_place(&p, &routine_at, &connection_at, &edge_at);
                b.diags.push(src.error(&at, p.to_string()));
            }
            Vec::new()
        }
    };
    for w in warnings {
        let crate::Warning::UnconnectedSlot { routine, .. } = &w;
        let at = routine_at
            .get(routine)
            .copied()
            .unwrap_or(Location::UNKNOWN);
        b.diags.push(src.warning(&at, w.to_string()));
    }

    if b.diags.iter().any(Diagnostic::is_error) {
        return Err(b.diags);
    }
    let mut entries = Vec::new();
    for (id, _) in &file.routines {
        if let Some(Some(k)) = kinds.get(&id.value) {
            for s in &k.slots {
                if !fed.contains(&(id.value.clone(), s.name.to_string())) {
                    entries.push((id.value.clone(), s.name.to_string()));
                }
            }
        }
    }
    let mut components: Vec<(PathBuf, bool)> = b
        .loaded
        .iter()
        .filter_map(|(p, r)| r.as_ref().ok().map(|pl| (p.clone(), pl.from_cache())))
        .collect();
    components.sort();
    Ok(Loaded {
        flow_id: file.flow_id.value.clone(),
        description: file.description.clone(),
        flow,
        threads,
        timeout: file.execution.timeout.map(|d| d.0),
        warnings: b.diags,
        entries,
        components,
        input,
        grants: b.grants,
    })
}

/// Where a validation problem belongs in the file.
fn problem_place(
    p: &Problem,
    routines: &HashMap<String, Location>,
    connections: &HashMap<String, Location>,
    edges: &HashMap<(String, String), Location>,
) -> Location {
    let routine = |r: &str| routines.get(r).copied();
    let connection = |c: &str| connections.get(c).copied();
    let at = match p {
        Problem::DuplicateRoutine { id } => routine(id),
        Problem::NoLogic { routine: r }
        | Problem::NoSlots { routine: r }
        | Problem::DuplicateName { routine: r, .. }
        | Problem::ZeroCapacity { routine: r, .. }
        | Problem::ZeroConcurrency { routine: r }
        | Problem::PolicyNeverFires { routine: r, .. }
        | Problem::BadRetry { routine: r, .. } => routine(r),
        Problem::UnknownRoutine { connection: c, .. }
        | Problem::UnknownEvent { connection: c, .. }
        | Problem::UnknownSlot { connection: c, .. }
        | Problem::DuplicateConnection { connection: c } => connection(c),
        // The first of its connections in the file.
        Problem::Cycle { path } => path
            .windows(2)
            .filter_map(|w| edges.get(&(w[0].clone(), w[1].clone())).copied())
            .min_by_key(|at| (at.line(), at.column()))
            .or_else(|| path.first().and_then(|r| routine(r))),
        Problem::MoreCycles { .. } => None,
    };
    at.unwrap_or(Location::UNKNOWN)
}

/// The error strategy a flow file names.
fn strategy(def: &OnErrorDef) -> ErrorStrategy {
    match def {
        OnErrorDef::Stop => ErrorStrategy::Stop,
        OnErrorDef::Continue => ErrorStrategy::Continue,
        OnErrorDef::Skip => ErrorStrategy::Skip,
        OnErrorDef::Retry(r) => ErrorStrategy::Retry(RetryPolicy {
            max: r.max,
            delay: r.delay.map_or(Duration::from_millis(100), |d| d.0),
            backoff: r.backoff.unwrap_or(2.0),
            then: match r.then {
                None | Some(ThenDef::Stop) => Exhausted::Stop,
                Some(ThenDef::Continue) => Exhausted::Continue,
                Some(ThenDef::Skip) => Exhausted::Skip,
            },
        }),
    }
}

/// Everything a routine's `limits:` sets: its sandbox and its byte budgets.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AllLimits {
    pub wasm: Limits,
    pub budgets: RoutineBudgets,
    /// The byte budget of each of its slots.
    pub queue_bytes: u64,
}

impl Default for AllLimits {
    fn default() -> Self {
        Self {
            wasm: Limits::default(),
            budgets: RoutineBudgets::default(),
            queue_bytes: crate::DEFAULT_MAX_QUEUE_BYTES,
        }
    }
}

fn nonzero(what: &str, n: u64) -> Result<u64, String> {
    if n == 0 {
        Err(format!("{what} must be more than zero"))
    } else {
        Ok(n)
    }
}

/// `limits` over `base`.
fn apply_limits(base: &mut AllLimits, def: &LimitsDef) -> Result<(), String> {
    let w = &mut base.wasm;
    if let Some(m) = def.memory {
        w.memory = usize::try_from(m.0).map_err(|_| format!("memory {} is too large", m.0))?;
        if w.memory < 64 << 10 {
            return Err(format!(
                "memory {} is below one WebAssembly page (64KiB)",
                m.0
            ));
        }
    }
    if let Some(t) = def.timeout {
        w.timeout = t.0;
    }
    if let Some(f) = def.fuel {
        w.fuel = Some(f);
    }
    if let Some(n) = def.max_instances {
        w.max_instances = n;
    }
    if let Some(n) = def.recycle_after {
        w.recycle_after = n;
    }
    if let Some(r) = def.reuse_across_jobs {
        w.reuse_across_jobs = r;
    }
    let b = &mut base.budgets;
    if let Some(n) = def.item_bytes {
        b.item_bytes = nonzero("item_bytes", n.0)?;
    }
    if let Some(n) = def.state_bytes {
        b.state_bytes = n.0;
    }
    if let Some(n) = def.state_value_bytes {
        b.state_value_bytes = n.0;
    }
    if let Some(n) = def.output_bytes {
        b.output_bytes = n.0;
    }
    if let Some(n) = def.attempt_bytes {
        b.attempt_bytes = n.0;
    }
    if let Some(n) = def.queue_bytes {
        base.queue_bytes = nonzero("queue_bytes", n.0)?;
    }
    Ok(())
}

/// The limits of `asked` that are looser than `base` (each as `name value`): what a manifest
/// may only request.
fn raised(base: &AllLimits, asked: &AllLimits) -> Vec<String> {
    let mut out = Vec::new();
    let size = |n: u64| crate::model::budget::bytes(n);
    let (bw, aw) = (&base.wasm, &asked.wasm);
    if aw.memory > bw.memory {
        out.push(format!("memory {}", size(aw.memory as u64)));
    }
    if aw.timeout > bw.timeout {
        out.push(format!(
            "timeout {}",
            humantime::format_duration(aw.timeout)
        ));
    }
    let fuel_looser = match (bw.fuel, aw.fuel) {
        (Some(_), None) => true,
        (Some(b), Some(a)) => a > b,
        _ => false,
    };
    if fuel_looser {
        out.push(format!("fuel {:?}", aw.fuel));
    }
    if aw.max_instances > bw.max_instances {
        out.push(format!("max_instances {}", aw.max_instances));
    }
    if aw.recycle_after > bw.recycle_after {
        out.push(format!("recycle_after {}", aw.recycle_after));
    }
    if aw.reuse_across_jobs && !bw.reuse_across_jobs {
        out.push("reuse_across_jobs".to_owned());
    }
    let (bb, ab) = (&base.budgets, &asked.budgets);
    for (name, b, a) in [
        ("item_bytes", bb.item_bytes, ab.item_bytes),
        ("state_bytes", bb.state_bytes, ab.state_bytes),
        (
            "state_value_bytes",
            bb.state_value_bytes,
            ab.state_value_bytes,
        ),
        ("output_bytes", bb.output_bytes, ab.output_bytes),
        ("attempt_bytes", bb.attempt_bytes, ab.attempt_bytes),
        ("queue_bytes", base.queue_bytes, asked.queue_bytes),
    ] {
        if a > b {
            out.push(format!("{name} {}", size(a)));
        }
    }
    out
}

/// `base` with the looser limits of `asked` put back to `base`'s: the manifest's lowerings
/// apply, its requests do not.
fn lowered_only(base: &AllLimits, asked: &AllLimits) -> AllLimits {
    let (bw, aw) = (&base.wasm, &asked.wasm);
    let (bb, ab) = (&base.budgets, &asked.budgets);
    AllLimits {
        wasm: Limits {
            memory: aw.memory.min(bw.memory),
            timeout: aw.timeout.min(bw.timeout),
            fuel: match (bw.fuel, aw.fuel) {
                (Some(b), Some(a)) => Some(a.min(b)),
                (None, a) => a,
                (b, None) => b,
            },
            max_instances: aw.max_instances.min(bw.max_instances),
            recycle_after: aw.recycle_after.min(bw.recycle_after),
            reuse_across_jobs: bw.reuse_across_jobs,
        },
        budgets: RoutineBudgets {
            item_bytes: ab.item_bytes.min(bb.item_bytes),
            state_bytes: ab.state_bytes.min(bb.state_bytes),
            state_value_bytes: ab.state_value_bytes.min(bb.state_value_bytes),
            output_bytes: ab.output_bytes.min(bb.output_bytes),
            attempt_bytes: ab.attempt_bytes.min(bb.attempt_bytes),
        },
        queue_bytes: asked.queue_bytes.min(base.queue_bytes),
    }
}

/// A flow's `budgets:` over the defaults.
fn flow_budgets(def: &BudgetsDef) -> Result<Budgets, String> {
    let mut b = Budgets::default();
    if let Some(n) = def.memory {
        b.memory = nonzero("memory", n.0)?;
    }
    if let Some(n) = def.dead_letters {
        b.dead_letters = n;
    }
    if let Some(n) = def.dead_letter_bytes {
        b.dead_letter_bytes = n.0;
    }
    if let Some(n) = def.output_lines {
        b.output_lines = n;
    }
    if let Some(n) = def.output_bytes {
        b.output_bytes = n.0;
    }
    if let Some(n) = def.error_bytes {
        b.error_bytes = usize::try_from(n.0).unwrap_or(usize::MAX).max(64);
    }
    Ok(b)
}

/// What the manifest beside `component` requests beyond the defaults (directories,
/// variables, higher limits), in words; `None` without a manifest. For `inspect`.
pub(crate) fn manifest_requests(component: &Path) -> Option<Result<(PathBuf, String), String>> {
    let path = plugins::manifest_of(component)?;
    let read = || -> Result<String, Diagnostic> {
        let s = Source::read(&path)?;
        let m: ManifestFile = s.parse()?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let base = AllLimits::default();
        let mut asked = base.clone();
        if let Some(l) = &m.limits {
            apply_limits(&mut asked, &l.value).map_err(|e| s.error(&l.referenced, e))?;
        }
        let mut asks = raised(&base, &asked);
        if let Some(p) = &m.permissions {
            let p = read_permissions(&p.value, dir).map_err(|e| s.error(&p.referenced, e))?;
            if p != Permissions::default() {
                asks.push(grants::describe(&p));
            }
        }
        Ok(if asks.is_empty() {
            "nothing".to_owned()
        } else {
            asks.join(", ")
        })
    };
    Some(read().map(|r| (path.clone(), r)).map_err(|d| d.to_string()))
}

/// `permissions` read from a file in `dir` (host paths are relative to it), unchecked.
fn read_permissions(def: &PermissionsDef, dir: &Path) -> Result<Permissions, String> {
    let mut p = Permissions::default();
    for g in &def.read_only_dirs {
        if !g.guest.starts_with('/') {
            return Err(format!(
                "guest path `{}` must be absolute (e.g. `/data`)",
                g.guest
            ));
        }
        p.read_only_dirs.push((dir.join(&g.host), g.guest.clone()));
    }
    for name in &def.env {
        grants::check_env(name)?;
        p.env.push(name.clone());
    }
    Ok(p)
}

/// `p` with every directory checked (see [`grants::check_dir`]) and resolved.
fn checked(
    p: &Permissions,
    protected: &Protected,
    within: Option<&Path>,
) -> Result<Permissions, String> {
    let mut out = Permissions {
        env: p.env.clone(),
        ..Permissions::default()
    };
    for (host, guest) in &p.read_only_dirs {
        let real = grants::check_dir(host, protected, within)?;
        out.read_only_dirs.push((real, guest.clone()));
    }
    Ok(out)
}

/// `extra` added to `base`, without repeating a grant.
fn add_permissions(base: &mut Permissions, extra: Permissions) {
    for d in extra.read_only_dirs {
        if !base.read_only_dirs.contains(&d) {
            base.read_only_dirs.push(d);
        }
    }
    for e in extra.env {
        if !base.env.contains(&e) {
            base.env.push(e);
        }
    }
}

struct Builder<'a> {
    src: &'a Source,
    engine: &'a WasmEngine,
    diags: Vec<Diagnostic>,
    dirs: PluginDirs,
    /// Components loaded so far (with no permissions), by path.
    loaded: HashMap<PathBuf, Result<Plugin, LoadError>>,
    /// Manifests read so far, by component path.
    manifests: HashMap<PathBuf, Option<Manifest>>,
    /// The flow file's directory.
    base: PathBuf,
    /// Directories never granted.
    protected: Protected,
    /// `--grant-requests`.
    grant_requests: bool,
    /// What each routine requested and got, in file order.
    grants: Vec<RoutineGrants>,
    /// A tenant's flow (`serve`): plugins only by name, among those preloaded.
    tenant: bool,
}

impl<'a> Builder<'a> {
    fn new(
        src: &'a Source,
        engine: &'a WasmEngine,
        base: PathBuf,
        grant_requests: bool,
        tenant: bool,
    ) -> Self {
        Builder {
            src,
            engine,
            diags: Vec::new(),
            dirs: PluginDirs::default(),
            loaded: HashMap::new(),
            manifests: HashMap::new(),
            base,
            protected: Protected::of_this_host(engine.cache_dir()),
            grant_requests,
            grants: Vec::new(),
            tenant,
        }
    }

    fn scan_dirs(&mut self, file: &FlowFile, options: &PluginOptions) {
        let mut dirs: Vec<(PathBuf, Option<Location>)> =
            options.dirs.iter().map(|d| (d.clone(), None)).collect();
        if let Some(p) = &file.plugins {
            for d in p.value.items() {
                dirs.push((self.base.join(d), Some(p.referenced)));
            }
        }
        if dirs.is_empty() {
            let default = self.base.join("plugins");
            if default.is_dir() {
                dirs.push((default, None));
            }
        }
        for (dir, at) in dirs {
            if options.build
                && plugins::is_project(&dir)
                && let Err(e) = plugins::build_project(&dir, options.js_engine, false)
            {
                self.push(at.as_ref(), e);
                continue;
            }
            if let Err(e) = self.dirs.scan(&dir) {
                self.push(at.as_ref(), e);
            }
        }
    }

    fn push(&mut self, at: Option<&Location>, message: String) {
        self.diags.push(match at {
            Some(at) => self.src.error(at, message),
            None => Diagnostic::error(message),
        });
    }

    /// The component a routine's `plugin:` names.
    fn component(&mut self, plugin: &Spanned<String>) -> Option<PathBuf> {
        let name = plugin.value.as_str();
        if self.tenant {
            let key = PathBuf::from(name);
            if self.loaded.contains_key(&key) && !name.contains('/') && !name.contains('.') {
                return Some(key);
            }
            let names: Vec<String> = self
                .loaded
                .keys()
                .map(|k| k.display().to_string())
                .collect();
            let hint = match suggest(name, names.iter().map(String::as_str)) {
                Some(s) => format!(" (did you mean `{s}`?)"),
                None if names.is_empty() => {
                    " (this tenant has no plugins: upload one with PUT /v1/plugins/{name})"
                        .to_owned()
                }
                None => format!("; this tenant's plugins: {}", names.join(", ")),
            };
            let message = format!("unknown plugin `{name}`{hint}");
            self.diags.push(self.src.error(&plugin.referenced, message));
            return None;
        }
        if name.ends_with(".wasm") || name.contains('/') {
            let path = self.base.join(name);
            if !path.is_file() {
                let message = format!("plugin file {} does not exist", path.display());
                self.diags.push(self.src.error(&plugin.referenced, message));
                return None;
            }
            return Some(path);
        }
        match self.dirs.by_name.get(name).map(Vec::as_slice) {
            Some([one]) => Some(one.clone()),
            Some(many) => {
                let list: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
                let message = format!(
                    "plugin `{name}` is ambiguous: {}; name the file (`plugin: path/to/{name}.wasm`)",
                    list.join(" and ")
                );
                self.diags.push(self.src.error(&plugin.referenced, message));
                None
            }
            None => {
                let hint = match suggest(name, self.dirs.names()) {
                    Some(s) => format!(" (did you mean `{s}`?)"),
                    None if self.dirs.by_name.is_empty() => {
                        " (no plugin directory: give --plugins DIR or `plugins:` in the flow file)"
                            .to_owned()
                    }
                    None => format!(
                        "; known plugins: {}",
                        self.dirs.names().collect::<Vec<_>>().join(", ")
                    ),
                };
                let message = format!("unknown plugin `{name}`{hint}");
                self.diags.push(self.src.error(&plugin.referenced, message));
                None
            }
        }
    }

    /// The plugin's manifest, read and judged once: the limits it lowers apply; what it
    /// requests (directories, variables, higher limits) is granted only with
    /// `--grant-requests`, and otherwise named in a warning.
    fn manifest(&mut self, component: &Path, at: &Location) -> Option<Manifest> {
        if let Some(m) = self.manifests.get(component) {
            return m.clone();
        }
        let base = AllLimits::default();
        let result = match plugins::manifest_of(component) {
            None => Some(Manifest {
                limits: base,
                requested: Permissions::default(),
                granted: Permissions::default(),
            }),
            Some(path) => match Source::read(&path).and_then(|s| self.judge(&s, &path, &base)) {
                Ok(m) => Some(m),
                Err(d) => {
                    self.diags.push(d);
                    let message = format!(
                        "the manifest of {} is invalid (see above)",
                        component.display()
                    );
                    self.diags.push(self.src.error(at, message));
                    None
                }
            },
        };
        self.manifests.insert(component.to_owned(), result.clone());
        result
    }

    /// Reads the manifest in `s` (at `path`) against the default limits `base`.
    fn judge(&mut self, s: &Source, path: &Path, base: &AllLimits) -> Result<Manifest, Diagnostic> {
        let m: ManifestFile = s.parse()?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut asked = base.clone();
        if let Some(l) = &m.limits {
            apply_limits(&mut asked, &l.value).map_err(|e| s.error(&l.referenced, e))?;
        }
        let requested = match &m.permissions {
            Some(p) => read_permissions(&p.value, dir).map_err(|e| s.error(&p.referenced, e))?,
            None => Permissions::default(),
        };
        let higher = raised(base, &asked);
        let (limits, granted) = if self.grant_requests {
            let granted = match &m.permissions {
                Some(p) => checked(&requested, &self.protected, Some(dir))
                    .map_err(|e| s.error(&p.referenced, e))?,
                None => Permissions::default(),
            };
            (asked, granted)
        } else {
            let mut asks = higher.clone();
            if requested != Permissions::default() {
                asks.push(grants::describe(&requested));
            }
            if !asks.is_empty() {
                let at = m
                    .permissions
                    .as_ref()
                    .map(|p| p.referenced)
                    .or(m.limits.as_ref().map(|l| l.referenced))
                    .unwrap_or(Location::UNKNOWN);
                self.diags.push(s.warning(
                    &at,
                    format!(
                        "the manifest requests {}: not granted (a plugin's manifest may only \
                         request; grant it in the flow file's `permissions:`/`limits:`, or \
                         accept the manifests' requests with --grant-requests)",
                        asks.join(", ")
                    ),
                ));
            }
            (lowered_only(base, &asked), Permissions::default())
        };
        Ok(Manifest {
            limits,
            requested,
            granted,
        })
    }

    /// Loads (once) the component, reporting a load failure at the first routine using it.
    fn plugin(&mut self, component: &Path, at: &Location) -> Option<Plugin> {
        if !self.loaded.contains_key(component) {
            let r = self.engine.load(component);
            if let Err(e) = &r {
                self.diags.push(self.src.error(at, e.to_string()));
            }
            self.loaded.insert(component.to_owned(), r);
        }
        self.loaded
            .get(component)
            .and_then(|r| r.as_ref().ok())
            .cloned()
    }

    /// Builds one routine, or reports why it cannot be built; the kind is returned whenever
    /// it is known, so connections to a routine with other mistakes are still checked.
    fn routine(
        &mut self,
        id: &str,
        def: &super::file::RoutineDef,
    ) -> Option<(crate::wasm::KindInfo, Option<crate::Routine>)> {
        let src = self.src;
        let component = self.component(&def.plugin)?;
        let plugin = self.plugin(&component, &def.plugin.referenced)?;
        let Some(kind) = plugin.kind(&def.kind.value).cloned() else {
            let names = plugin.kind_names();
            let hint = match suggest(&def.kind.value, names.iter().copied()) {
                Some(s) => format!(" (did you mean `{s}`?)"),
                None => format!("; it has {}", names.join(", ")),
            };
            let message = format!(
                "routine `{id}`: plugin `{}` has no kind `{}`{hint}",
                def.plugin.value, def.kind.value
            );
            self.diags.push(src.error(&def.kind.referenced, message));
            return None;
        };
        let Some(manifest) = self.manifest(&component, &def.plugin.referenced) else {
            return Some((kind, None));
        };
        let mut limits = manifest.limits.clone();
        let mut permissions = manifest.granted.clone();
        let mut ok = true;
        if let Some(l) = &def.limits
            && let Err(e) = apply_limits(&mut limits, &l.value)
        {
            self.diags
                .push(src.error(&l.referenced, format!("routine `{id}`: {e}")));
            ok = false;
        }
        if let Some(p) = &def.permissions
            && !self.tenant
        {
            match read_permissions(&p.value, &self.base)
                .and_then(|g| checked(&g, &self.protected, None))
            {
                Ok(g) => add_permissions(&mut permissions, g),
                Err(e) => {
                    self.diags
                        .push(src.error(&p.referenced, format!("routine `{id}`: {e}")));
                    ok = false;
                }
            }
        }
        self.grants.push(RoutineGrants {
            routine: id.to_owned(),
            requested: manifest.requested.clone(),
            granted: permissions.clone(),
        });
        let plugin = if permissions == *plugin.permissions() {
            plugin
        } else {
            plugin.with_permissions(permissions)
        };
        let mut routine = match plugin.routine_with(&kind.name, limits.wasm.clone()) {
            Ok(r) => r,
            Err(e) => {
                let at = def
                    .limits
                    .as_ref()
                    .map_or(def.kind.referenced, |l| l.referenced);
                self.diags
                    .push(src.error(&at, format!("routine `{id}`: {e}")));
                return Some((kind, None));
            }
        };
        routine = routine.budgets(limits.budgets);
        for slot in &kind.slots {
            routine = routine.max_queue_bytes(&slot.name, limits.queue_bytes);
        }
        if let Some(config) = &def.config {
            for (key, value) in config {
                let (at, key) = (&key.referenced, &key.value);
                if !kind.default_config.contains_key(key) {
                    let hint = match suggest(key, kind.default_config.keys().map(String::as_str)) {
                        Some(s) => format!(" (did you mean `{s}`?)"),
                        None => String::new(),
                    };
                    let message = format!(
                        "routine `{id}`: config key `{key}` is not one kind `{}` declares{hint}",
                        kind.name
                    );
                    self.diags.push(src.warning(at, message));
                }
                routine = routine.config(key, value.clone());
            }
        }
        for (slot, n) in &def.max_queue_length {
            if kind.slots.iter().any(|s| *s.name == *slot.value) {
                routine = routine.max_queue_length(&slot.value, *n);
            } else {
                let names = kind.slots.iter().map(|s| &*s.name);
                let message = format!(
                    "routine `{id}`: kind `{}` has no slot `{}`{}",
                    kind.name,
                    slot.value,
                    crate::model::flow::hint(&suggest(&slot.value, names))
                );
                self.diags.push(src.error(&slot.referenced, message));
                ok = false;
            }
        }
        if let Some(p) = &def.policy {
            routine = routine.policy(match &p.value {
                PolicyDef::Immediate => Policy::Immediate,
                PolicyDef::AllSlotsReady => Policy::AllSlotsReady,
                PolicyDef::BatchSize(n) => Policy::BatchSize(*n),
                PolicyDef::TimeInterval(d) => Policy::TimeInterval(d.0),
            });
        }
        if let Some(c) = &def.concurrency {
            routine = routine.concurrency(c.value);
        }
        if let Some(s) = &def.on_error {
            routine = routine.on_error(strategy(&s.value));
        }
        Some((kind, ok.then_some(routine)))
    }

    /// Checks `routine.event` (or `routine.slot`) of a connection.
    fn endpoint(
        &mut self,
        text: &Spanned<String>,
        side: &str,
        what: &str,
        ids: &[&str],
        kinds: &HashMap<String, Option<crate::wasm::KindInfo>>,
    ) -> Option<(String, String)> {
        let src = self.src;
        let at = &text.referenced;
        let Some((routine, name)) = text.value.split_once('.') else {
            let message = format!("`{side}: {}` must be written `routine.{what}`", text.value);
            self.diags.push(src.error(at, message));
            return None;
        };
        let Some(kind) = kinds.get(routine) else {
            let message = format!(
                "no routine `{routine}` in this flow{}",
                crate::model::flow::hint(&suggest(routine, ids.iter().copied()))
            );
            self.diags.push(src.error(at, message));
            return None;
        };
        let kind = kind.as_ref()?;
        let names: Vec<&str> = if what == "event" {
            kind.events.iter().map(|e| &*e.name).collect()
        } else {
            kind.slots.iter().map(|s| &*s.name).collect()
        };
        if !names.contains(&name) {
            let hint = match suggest(name, names.iter().copied()) {
                Some(s) => format!(" (did you mean `{s}`?)"),
                None if names.is_empty() => format!("; it has no {what}s"),
                None => format!("; it has {}", names.join(", ")),
            };
            let message = format!(
                "routine `{routine}` (kind `{}`) has no {what} `{name}`{hint}",
                kind.name
            );
            self.diags.push(src.error(at, message));
            return None;
        }
        Some((routine.to_owned(), name.to_owned()))
    }
}
