//! The server's state and operations, apart from HTTP: tenants, their plugins, flows and jobs,
//! on one WebAssembly engine and one runtime (one worker pool) for all of them. Every
//! operation takes the tenant it acts for; what belongs to another tenant is never found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use indexmap::IndexMap;
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::super::diag::{Diagnostic, Severity};
use super::config::{Config, Quotas, TenantConfig, hex, random_hex, valid_name};
use super::disk::{Index, JobMeta, TenantDir};
use super::events::Events;
use crate::wasm::{Plugin, WasmEngine};
use crate::{Group, InputHold, Item, JobHandle, JobId, JobStatus, JobStore, Runtime, RuntimeError};

/// The most finished jobs a tenant's list keeps (the oldest are forgotten first).
const KEPT_FINISHED_JOBS: usize = 1000;

/// How long a finished job's events are kept whole for a reader to come back to.
const FINISHED_EVENTS_KEPT: Duration = Duration::from_secs(60);

/// The most dead letters a finished job's summary keeps.
const MAX_ARCHIVED_DEAD_LETTERS: usize = 1000;

/// An error as the API answers it: an HTTP status, a stable code, a message, and details.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Extra fields of the error object (`diagnostics`, `accepted`, `quota`, …).
    pub details: Map<String, Value>,
    /// Seconds, for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
            retry_after: None,
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// 404 for something of this tenant that does not exist (or is another tenant's).
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(
            404,
            "not_found",
            format!("no {what} `{}`", crate::term::escape(name)),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }

    /// A quota on stored or running things: 413 for bytes, 429 for counts.
    fn quota(status: u16, quota: &str, message: String) -> Self {
        Self::new(status, "quota_exceeded", message).with("quota", quota)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut e = Map::new();
        e.insert("code".into(), self.code.into());
        e.insert("message".into(), self.message.clone().into());
        for (k, v) in &self.details {
            e.insert(k.clone(), v.clone());
        }
        json!({ "error": e })
    }
}

/// A diagnostic as JSON: severity, message, and (where known) line, column and the line's text.
fn diagnostic_json(d: &Diagnostic) -> Value {
    let mut o = Map::new();
    o.insert(
        "severity".into(),
        match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
        .into(),
    );
    o.insert("message".into(), d.message.clone().into());
    if let Some(p) = &d.place {
        o.insert("file".into(), p.file.display().to_string().into());
        if p.line > 0 {
            o.insert("line".into(), p.line.into());
            o.insert("column".into(), p.column.into());
        }
        if let Some(t) = &p.text {
            o.insert("text".into(), t.clone().into());
        }
    }
    Value::Object(o)
}

struct StoredPlugin {
    hash: String,
    bytes: u64,
    plugin: Plugin,
}

struct StoredFlow {
    hash: String,
    text: String,
    /// Its name in the runtime's registry.
    registered: String,
    description: Option<String>,
    routines: usize,
    connections: usize,
    entries: Vec<(String, String)>,
    /// The plugins it uses, by name, with the blob of each.
    plugins: BTreeMap<String, String>,
    input: Vec<((String, String), Vec<Item>)>,
    timeout: Option<Duration>,
    warnings: Vec<Value>,
}

/// A job of a tenant. Every job is durable, in `DATA/tenants/ID/jobs/JOB/`: its store, and
/// `job.json` (what it runs; whether its input is closed). A job that finished before the
/// server restarted is shown from its `summary.json`.
pub(crate) struct JobRecord {
    pub id: String,
    /// Its tenant's id.
    tenant: String,
    pub flow: String,
    /// The running job (none for one that finished before a restart, or once archived: the
    /// engine's job, its store and its buffers are let go then).
    handle: Mutex<Option<JobHandle>>,
    /// Once finished: its final view (also in `summary.json`), and when it finished.
    archived: Mutex<Option<(Value, SystemTime)>>,
    /// Keeps the job open for input until `close`.
    hold: Mutex<Option<InputHold>>,
    entries: Vec<(String, String)>,
    posted: AtomicU64,
    created: SystemTime,
    pub timed_out: AtomicBool,
    dir: std::path::PathBuf,
    meta: Mutex<JobMeta>,
    /// What its store held when the server reopened it after a restart.
    resumed: Option<Value>,
    /// Its server-sent events.
    pub events: Arc<Events>,
    /// What its events last said: status, activations, errors.
    seen: Mutex<(String, u64, usize)>,
}

impl JobRecord {
    fn handle(&self) -> Option<JobHandle> {
        self.handle.lock().clone()
    }

    /// The running job; a finished job takes nothing.
    pub fn live(&self) -> Result<JobHandle, ApiError> {
        self.handle().ok_or_else(|| {
            ApiError::new(
                409,
                "job_finished",
                "the job has finished: it takes no more input",
            )
        })
    }

    pub fn is_finished(&self) -> bool {
        self.handle().as_ref().is_none_or(JobHandle::is_finished)
    }

    fn status(&self) -> Value {
        match &self.handle() {
            Some(h) => json!(h.status()),
            None => self
                .archived
                .lock()
                .as_ref()
                .map_or(Value::Null, |(v, _)| v["status"].clone()),
        }
    }

    /// Ends its input: it completes once quiescent. Recorded first, so that a restart keeps
    /// it closed (if it cannot be recorded, the job stays open and the error says why).
    pub fn close(&self) -> Result<(), ApiError> {
        let mut hold = self.hold.lock();
        if hold.is_none() {
            return Ok(());
        }
        let mut meta = self.meta.lock();
        if !meta.closed {
            let mut closed = meta.clone();
            closed.closed = true;
            closed
                .write(&self.dir)
                .map_err(|e| store_failed(&self.id, &e))?;
            *meta = closed;
        }
        drop(hold.take());
        Ok(())
    }

    fn is_closed(&self) -> bool {
        self.hold.lock().is_none()
    }

    /// Cancels it (and lets its input go).
    pub fn cancel(&self) {
        if let Some(h) = &self.handle() {
            h.cancel();
        }
        drop(self.hold.lock().take());
    }

    /// The slot a post goes to: `to` (`routine.slot`), or the flow's only entry slot.
    fn target(&self, to: Option<&str>) -> Result<(String, String), ApiError> {
        match to {
            Some(t) => {
                let Some((r, s)) = t.split_once('.') else {
                    return Err(ApiError::bad_request(format!(
                        "`to={}` must be written `routine.slot`",
                        crate::term::escape(t)
                    )));
                };
                Ok((r.to_owned(), s.to_owned()))
            }
            None => match self.entries.as_slice() {
                [one] => Ok(one.clone()),
                many => Err(ApiError::bad_request(format!(
                    "say which slot with `?to=routine.slot`: flow `{}` has {} entry slots ({})",
                    self.flow,
                    many.len(),
                    many.iter()
                        .map(|(r, s)| format!("{r}.{s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            },
        }
    }

    /// Status and summary, as `GET /v1/jobs/{id}` answers.
    pub fn view(&self) -> Value {
        let Some(h) = &self.handle() else {
            return self
                .archived
                .lock()
                .as_ref()
                .map_or(Value::Null, |(v, _)| v.clone());
        };
        let mut s = h.summary();
        // A store's error (the one failure that names a host path) names its directory: not
        // the tenant's business.
        if let Some(f) = &mut s.failure {
            let dir = self.dir.display().to_string();
            if f.contains(&dir) {
                *f = f.replace(&dir, "(the job's directory)");
            }
        }
        let mut summary = serde_json::to_value(s).unwrap_or(Value::Null);
        if let Some(o) = summary.as_object_mut() {
            // The engine's own job number and registry name mean nothing to a tenant.
            o.remove("job");
            o.insert("flow".into(), self.flow.clone().into());
        }
        json!({
            "id": self.id,
            "flow": self.flow,
            "status": h.status(),
            "paused": h.is_paused(),
            "closed": self.is_closed(),
            "timed_out": self.timed_out.load(Ordering::Relaxed),
            "posted": self.posted.load(Ordering::Relaxed),
            "created": unix_ms(self.created),
            "resumed": self.resumed,
            "summary": summary,
        })
    }

    /// A part of a finished job's `summary.json` (read when asked: a finished job keeps
    /// only its view in memory).
    fn summary_part(&self, key: &str) -> Option<Value> {
        let bytes = std::fs::read(self.dir.join("summary.json")).ok()?;
        let mut v: Value = serde_json::from_slice(&bytes).ok()?;
        Some(v.get_mut(key)?.take())
    }

    /// Its output lines (within its output budget).
    pub fn output(&self) -> Value {
        match &self.handle() {
            Some(h) => json!({
                "lines": h.output(),
                "dropped": h.summary().output_lines_dropped,
            }),
            None => self
                .summary_part("output")
                .unwrap_or_else(|| json!({"lines": [], "dropped": 0})),
        }
    }

    /// Its dead letters.
    pub fn dead_letters(&self) -> Value {
        match &self.handle() {
            Some(h) => json!(h.dead_letters()),
            None => self
                .summary_part("dead_letters")
                .unwrap_or_else(|| json!([])),
        }
    }

    /// Each routine's WorkerState.
    pub fn state(&self) -> Value {
        let Some(h) = &self.handle() else {
            return self.summary_part("state").unwrap_or_else(|| json!({}));
        };
        let mut out = Map::new();
        for r in h.counters().keys() {
            if let Some(s) = h.worker_state(r) {
                out.insert(r.clone(), Value::Object(s));
            }
        }
        Value::Object(out)
    }

    fn line(&self) -> Value {
        json!({
            "id": self.id,
            "flow": self.flow,
            "status": self.status(),
            "created": unix_ms(self.created),
        })
    }

    /// When the flow's timeout cancels it.
    fn deadline(&self) -> Option<SystemTime> {
        self.meta
            .lock()
            .deadline_ms
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The blobs it runs (kept while it is unfinished).
    fn pins(&self) -> Vec<String> {
        let m = self.meta.lock();
        std::iter::once(m.flow_sha256.clone())
            .chain(m.plugins.values().cloned())
            .collect()
    }

    /// Once finished: writes `summary.json` (its view, dead letters and WorkerState), keeps
    /// that view, and lets the engine's job go (its store closes, its buffers are freed).
    /// Returns the job it let go.
    fn archive(&self) -> Option<JobHandle> {
        // A job stopped by the server's stop stays in its store, to resume at the next start.
        let h = self.handle()?;
        if self.archived.lock().is_some() || !h.is_finished() || h.status() == JobStatus::Stopped {
            return None;
        }
        let v = self.view();
        let mut full = v.clone();
        let letters = h.dead_letters();
        full["dead_letters"] = json!(
            letters
                .iter()
                .take(MAX_ARCHIVED_DEAD_LETTERS)
                .collect::<Vec<_>>()
        );
        full["state"] = self.state();
        full["output"] = self.output();
        if let Err(e) = super::disk::write_atomic(
            &self.dir.join("summary.json"),
            &serde_json::to_vec(&full).unwrap_or_default(),
        ) {
            tracing::error!(job = %self.id, "cannot write the job's summary: {e}");
        }
        self.events.close(v["status"].clone());
        *self.archived.lock() = Some((v, SystemTime::now()));
        self.handle.lock().take()
    }

    /// Pushes the events of what changed since the last call: its status (and pause),
    /// activation counts, new errors.
    fn report(&self) {
        let Some(h) = &self.handle() else { return };
        let status = if h.is_paused() && h.status() == JobStatus::Running {
            "paused".to_owned()
        } else {
            h.status().to_string()
        };
        let counters = h.counters();
        let activations: u64 = counters.values().map(|c| c.activations).sum();
        let mut seen = self.seen.lock();
        let (new_errors, errors) = h.errors_from(seen.2);
        for e in &new_errors {
            self.events.push("error", json!(e));
        }
        if activations != seen.1 {
            self.events
                .push("activations", json!({ "routines": counters }));
        }
        if status != seen.0 && !h.is_finished() {
            self.events.push("status", json!({ "status": status }));
        }
        *seen = (status, activations, errors);
    }
}

/// Compiled components by content hash, held to a size (their compiled images together),
/// the least recently used going first. One that goes lives on in the plugins using it (a
/// `Component` is shared); only an upload of the same bytes again compiles it again (from the
/// on-disk cache, if it is still there). So uploads of ever new versions cannot grow the
/// server's memory: what stays is what the tenants' plugins hold, within their quotas.
pub(crate) struct Compiled<T> {
    cap: u64,
    used: u64,
    tick: u64,
    /// By hash: the component, its compiled size, when it was last used.
    entries: HashMap<String, (T, u64, u64)>,
}

impl<T: Clone> Compiled<T> {
    pub(crate) fn new(cap: u64) -> Self {
        Compiled {
            cap,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, hash: &str) -> Option<T> {
        self.tick += 1;
        let e = self.entries.get_mut(hash)?;
        e.2 = self.tick;
        Some(e.0.clone())
    }

    /// Keeps `c` of `size` bytes, letting the least recently used others go past the cap.
    fn insert_sized(&mut self, hash: &str, c: T, size: u64) {
        self.tick += 1;
        if let Some(old) = self.entries.insert(hash.to_owned(), (c, size, self.tick)) {
            self.used -= old.1;
        }
        self.used += size;
        while self.used > self.cap && self.entries.len() > 1 {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(h, _)| h.as_str() != hash)
                .min_by_key(|(_, e)| e.2)
                .map(|(h, _)| h.clone())
            else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.used -= gone.1;
            }
        }
    }
}

impl Compiled<Component> {
    /// Keeps `c`, sized by its compiled image.
    fn insert(&mut self, hash: &str, c: Component) {
        let r = c.image_range();
        let size = (r.end as usize).saturating_sub(r.start as usize) as u64;
        self.insert_sized(hash, c, size);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Default)]
struct TenantState {
    index: Index,
    plugins: BTreeMap<String, StoredPlugin>,
    flows: BTreeMap<String, StoredFlow>,
    jobs: IndexMap<String, Arc<JobRecord>>,
    /// Blobs of jobs that could not be resumed (kept, with their directories, for the
    /// operator).
    unresumed: BTreeSet<String>,
}

/// One tenant: its configuration, directory and objects.
pub(crate) struct Tenant {
    pub id: String,
    /// Its tokens, weight and quotas: replaced when the configuration is reloaded.
    live: RwLock<TenantConfig>,
    /// Taken out of the configuration by a reload: requests still in flight with it start
    /// no job.
    removed: AtomicBool,
    /// Its share of the worker pool (the runtime is fair: weights from the config).
    group: Group,
    dir: TenantDir,
    state: Mutex<TenantState>,
    /// Bytes of its data directory, measured every second.
    disk_used: AtomicU64,
    /// Why its last write to storage failed, until one succeeds (in `/v1/usage`).
    storage_error: Mutex<Option<String>>,
    /// Its `request_bytes`: one permit per byte of request body its requests hold.
    pub bodies: Arc<tokio::sync::Semaphore>,
    /// The permits `bodies` was given (a reload adds or forgets the difference).
    bodies_total: AtomicU64,
    /// Permits a lowered `request_bytes` could not forget at once (requests held them): each
    /// request forgets what it gives back until this is paid (see the API's `Held`).
    pub bodies_debt: Arc<AtomicU64>,
}

impl Tenant {
    /// Its quotas now.
    pub fn quotas(&self) -> Quotas {
        self.live.read().quotas
    }

    /// Refuses a write of `more` bytes past the tenant's disk quota (507, naming it). Its use
    /// is measured each second, so a burst can pass it by what one second writes.
    fn disk_room(&self, more: u64) -> Result<(), ApiError> {
        let (used, quota) = (
            self.disk_used.load(Ordering::Relaxed),
            self.quotas().disk_bytes,
        );
        if used.saturating_add(more) > quota {
            return Err(ApiError::quota(
                507,
                "disk_bytes",
                format!(
                    "the tenant's data takes {}, its disk quota is {}: delete plugins, flows or \
                     jobs, or wait for finished jobs to go",
                    crate::model::budget::bytes(used),
                    crate::model::budget::bytes(quota)
                ),
            ));
        }
        Ok(())
    }
}

/// The server.
pub(crate) struct Host {
    pub config: Config,
    engine: WasmEngine,
    runtime: Runtime,
    tenants: RwLock<BTreeMap<String, Arc<Tenant>>>,
    /// Each tenant's share of the workers, kept across a reload that removes it.
    groups: Mutex<HashMap<String, Group>>,
    /// Compiled components by the SHA-256 of their bytes, shared by every tenant.
    components: Mutex<Compiled<Component>>,
    /// Taking work (false while starting and once stopping).
    pub ready: AtomicBool,
    /// Why the server's storage last failed (a full disk), until a write succeeds again.
    storage_error: Mutex<Option<String>>,
    /// The events of each running job, by the engine's job id (where output lines go).
    routes: Arc<Mutex<HashMap<JobId, Arc<Events>>>>,
    /// Rounds of `tend_jobs` (every tenth measures the tenants' disk use).
    ticks: AtomicU64,
}

/// Compares two hashes in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Host {
    /// Starts the engine and the pool, and loads every tenant's plugins and flows from the data
    /// directory (one that no longer loads is reported and left on disk, not lost).
    pub fn start(config: Config) -> Result<Arc<Host>, String> {
        let compiled_cap = config.compiled_cache_bytes;
        let engine = crate::wasm::WasmEngine::new(crate::wasm::WasmConfig {
            cache_max_bytes: config.compiled_cache_bytes,
            ..Default::default()
        })
        .map_err(|e| format!("cannot start the WebAssembly engine: {e}"))?;
        let routes: Arc<Mutex<HashMap<JobId, Arc<Events>>>> = Arc::default();
        let to = routes.clone();
        let runtime = Runtime::builder()
            .on_output(move |job, line| {
                let events = to.lock().get(&job).cloned();
                if let Some(e) = events {
                    e.push("output", json!(line));
                }
            })
            .thread_pool_size(config.threads)
            .post_timeout(config.post_timeout)
            .fair(true)
            .try_build()
            .map_err(|e| format!("cannot start {} worker threads: {e}", config.threads))?;
        let tenants = config.tenants.clone();
        let host = Arc::new(Host {
            config,
            engine,
            runtime,
            tenants: RwLock::default(),
            groups: Mutex::default(),
            components: Mutex::new(Compiled::new(compiled_cap)),
            ready: AtomicBool::new(false),
            storage_error: Mutex::default(),
            routes,
            ticks: AtomicU64::new(0),
        });
        for c in &tenants {
            let t = host.open_tenant(c)?;
            host.restore(&t)?;
            host.resume_jobs(&t);
            host.tenants.write().insert(c.id.clone(), t);
        }
        let weak = Arc::downgrade(&host);
        std::thread::Builder::new()
            .name("routilux-serve-jobs".into())
            .spawn(move || {
                while let Some(host) = weak.upgrade() {
                    host.tend_jobs();
                    drop(host);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map_err(|e| format!("cannot start the job keeper thread: {e}"))?;
        host.ready.store(true, Ordering::Release);
        Ok(host)
    }

    /// Gives tenant `c`'s group its weight and the quotas the runtime holds its running jobs
    /// to (memory, live instances, queued items): at its opening and at each reload, setting
    /// an unchanged one again changes nothing. (The activation rate is set apart, on a
    /// reload only when it changed: setting it restarts its bucket's clock.)
    fn set_group_limits(&self, group: Group, c: &TenantConfig) {
        let q = &c.quotas;
        self.runtime.set_group_weight(group, c.weight);
        self.runtime.set_group_memory(group, Some(q.memory_bytes));
        self.runtime.set_group_instances(group, Some(q.instances));
        self.runtime
            .set_group_queued_items(group, Some(q.queued_items));
    }

    /// A tenant of the configuration, with its directory (created if new) and its share of
    /// the workers (the same group again if it was removed and comes back with its data; a
    /// new one if its directory is new, as after a purge: nothing of the old one's usage
    /// carries over).
    fn open_tenant(&self, c: &TenantConfig) -> Result<Arc<Tenant>, String> {
        let new_dir = !self.config.data_dir.join("tenants").join(&c.id).exists();
        let dir = TenantDir::open(&self.config.data_dir, &c.id).map_err(|e| {
            format!(
                "cannot create the directory of tenant `{}` in {}: {e}",
                c.id,
                self.config.data_dir.display()
            )
        })?;
        let group = {
            let mut groups = self.groups.lock();
            if new_dir {
                groups.remove(&c.id);
            }
            *groups
                .entry(c.id.clone())
                .or_insert_with(|| self.runtime.add_group(c.weight))
        };
        self.runtime
            .set_group_rate(group, c.quotas.activations_per_second);
        self.set_group_limits(group, c);
        Ok(Arc::new(Tenant {
            id: c.id.clone(),
            live: RwLock::new(c.clone()),
            removed: AtomicBool::new(false),
            group,
            disk_used: AtomicU64::new(dir.usage()),
            storage_error: Mutex::default(),
            bodies: Arc::new(tokio::sync::Semaphore::new(c.quotas.request_room() as usize)),
            bodies_total: AtomicU64::new(c.quotas.request_room()),
            bodies_debt: Arc::default(),
            dir,
            state: Mutex::default(),
        }))
    }

    /// The tenants now (a reload may change them).
    fn tenant_list(&self) -> Vec<Arc<Tenant>> {
        self.tenants.read().values().cloned().collect()
    }

    /// Applies a reloaded configuration: tenants' tokens, weights and quotas change at once;
    /// a new tenant is opened (its stored plugins, flows and jobs loaded as at a start); a
    /// tenant no longer named loses its tokens (401) and its unfinished jobs are stopped
    /// into their stores, its data kept on disk, to resume if it comes back. What only a
    /// restart changes (listen, data_dir, threads, timeouts, connection limits) is reported,
    /// not applied. Returns one line per thing done or refused.
    pub fn reload(&self, new: &Config) -> Vec<String> {
        let mut said = Vec::new();
        let old = &self.config;
        if new.listen != old.listen
            || new.data_dir != old.data_dir
            || new.threads != old.threads
            || new.drain_timeout != old.drain_timeout
            || new.post_timeout != old.post_timeout
            || new.job_retention != old.job_retention
            || new.compiled_cache_bytes != old.compiled_cache_bytes
            || new.connections != old.connections
        {
            said.push(
                "listen, data_dir, threads, timeouts, job_retention, compiled_cache_bytes and \
                 connection limits change only at a restart: kept as they were"
                    .to_owned(),
            );
        }
        let wanted: BTreeSet<&str> = new.tenants.iter().map(|t| t.id.as_str()).collect();
        let gone: Vec<Arc<Tenant>> = self
            .tenant_list()
            .into_iter()
            .filter(|t| !wanted.contains(t.id.as_str()))
            .collect();
        for t in gone {
            self.tenants.write().remove(&t.id);
            t.removed.store(true, Ordering::SeqCst);
            let (stopped, running) = self.stop_tenant_jobs(&t);
            // The directory is let go (a purge may remove it, the tenant may come back) only
            // once no job of the tenant runs any more: an activation may outlast the wait.
            if running.is_empty() {
                t.dir.unlock();
            } else {
                let t = t.clone();
                std::thread::spawn(move || {
                    for h in running {
                        while !h.wait(Duration::from_secs(1)) {}
                    }
                    t.dir.unlock();
                });
            }
            said.push(format!(
                "tenant `{}` removed: its tokens no longer work; {stopped} unfinished jobs \
                 stopped into their stores (its data is kept in {}: `routilux serve purge {}` \
                 removes it)",
                t.id,
                t.dir.root().display(),
                t.id
            ));
        }
        for c in &new.tenants {
            let existing = self.tenants.read().get(&c.id).cloned();
            match existing {
                Some(t) => {
                    let mut live = t.live.write();
                    if *live != *c {
                        if live.quotas.activations_per_second != c.quotas.activations_per_second {
                            self.runtime
                                .set_group_rate(t.group, c.quotas.activations_per_second);
                        }
                        let (was, now) = (
                            t.bodies_total.load(Ordering::Relaxed),
                            c.quotas.request_room(),
                        );
                        if now > was {
                            // What is still owed from a lowering is cancelled first.
                            let raise = now - was;
                            let owed = take_up_to(&t.bodies_debt, raise);
                            t.bodies.add_permits((raise - owed) as usize);
                        } else if now < was {
                            // Only what is free now can be forgotten; what requests hold is
                            // forgotten as they give it back.
                            let cut = was - now;
                            let forgot = t.bodies.forget_permits(cut as usize) as u64;
                            t.bodies_debt.fetch_add(cut - forgot, Ordering::AcqRel);
                        }
                        t.bodies_total.store(now, Ordering::Relaxed);
                        self.set_group_limits(t.group, c);
                        *live = c.clone();
                        said.push(format!("tenant `{}` updated", c.id));
                    }
                }
                None => {
                    let opened = self.open_tenant(c).and_then(|t| {
                        self.restore(&t)?;
                        self.resume_jobs(&t);
                        Ok(t)
                    });
                    match opened {
                        Ok(t) => {
                            let jobs = t.state.lock().jobs.len();
                            self.tenants.write().insert(c.id.clone(), t);
                            said.push(format!("tenant `{}` added ({jobs} jobs found)", c.id));
                        }
                        Err(e) => said.push(format!("tenant `{}` not added: {e}", c.id)),
                    }
                }
            }
        }
        said
    }

    /// Stops a removed tenant's unfinished jobs (kept in their stores, as at a server stop)
    /// and lets their records go; returns how many were stopped.
    fn stop_tenant_jobs(&self, t: &Tenant) -> (usize, Vec<JobHandle>) {
        let records: Vec<Arc<JobRecord>> = t.state.lock().jobs.values().cloned().collect();
        let mut stopped = Vec::new();
        for r in &records {
            r.events.end();
            if let Some(h) = r.handle().filter(|h| !h.is_finished()) {
                h.stop();
                drop(r.hold.lock().take());
                stopped.push(h);
            }
        }
        for h in &stopped {
            h.wait(Duration::from_secs(5));
            self.routes.lock().remove(&h.id());
        }
        for r in &records {
            r.archive();
            r.handle.lock().take();
        }
        t.state.lock().jobs.clear();
        self.runtime.forget_finished_jobs();
        let n = stopped.len();
        stopped.retain(|h| !h.is_finished());
        (n, stopped)
    }

    /// Ends every event stream (the server is stopping: its connections must close).
    pub fn end_streams(&self) {
        for t in &self.tenant_list() {
            for j in t.state.lock().jobs.values() {
                j.events.end();
            }
        }
    }

    /// Whether the server can take work: started, not stopping, its storage writable.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Acquire) {
            return Err("the server is starting or stopping".into());
        }
        match &*self.storage_error.lock() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Records the outcome of tenant `t`'s write to storage: its own health (in its
    /// `/v1/usage`), and after a failure, whether the data directory itself can be written
    /// (`/readyz`): one tenant's failing store is that tenant's, a full disk is everyone's.
    fn storage<T>(&self, t: &Tenant, r: Result<T, ApiError>) -> Result<T, ApiError> {
        match &r {
            Ok(_) => {
                let mut e = t.storage_error.lock();
                if e.is_some() {
                    *e = None;
                    drop(e);
                    if self.storage_error.lock().is_some() {
                        self.probe_storage();
                    }
                }
            }
            Err(e) if e.code == "storage" => self.storage_failed(t, e.message.clone()),
            Err(_) => {}
        }
        r
    }

    /// Tenant `t`'s storage failed (`why`, with no host path): noted, and the data directory
    /// probed.
    fn storage_failed(&self, t: &Tenant, why: String) {
        *t.storage_error.lock() = Some(why);
        self.probe_storage();
    }

    /// Writes, syncs and removes a small file in the data directory: `/readyz` is false (with
    /// the reason, no path) while that fails. Run after a tenant's storage fails, and each
    /// tick while it keeps failing.
    fn probe_storage(&self) {
        let path = self.config.data_dir.join(".probe");
        let result = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&[0u8; 4096])?;
            f.sync_all()?;
            drop(f);
            std::fs::remove_file(&path)
        })();
        let mut host = self.storage_error.lock();
        match result {
            Ok(()) => *host = None,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                *host = Some(
                    storage(
                        is_full(&e.to_string()),
                        "no job can start or take input until it can write again",
                    )
                    .message,
                );
            }
        }
    }

    /// Archives finished jobs, and removes those finished longer ago than the retention
    /// (their directories too), oldest first past the most kept.
    fn tend_jobs(&self) {
        if self.storage_error.lock().is_some() {
            self.probe_storage();
        }
        let retention = self.config.job_retention;
        let measure = self
            .ticks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(10);
        for t in &self.tenant_list() {
            if measure {
                t.disk_used.store(t.dir.usage(), Ordering::Relaxed);
            }
            let records: Vec<Arc<JobRecord>> = t.state.lock().jobs.values().cloned().collect();
            let mut let_go = false;
            for r in &records {
                r.report();
                if let Some(h) = r.archive() {
                    if let Some(e) = store_failure(&h) {
                        self.storage_failed(t, e.message);
                    }
                    self.routes.lock().remove(&h.id());
                    let_go = true;
                }
                // A minute after it finished, a job's events shrink to its final status.
                if r.archived.lock().as_ref().is_some_and(|(_, at)| {
                    SystemTime::now().duration_since(*at).unwrap_or_default() > FINISHED_EVENTS_KEPT
                }) {
                    r.events.shrink();
                }
                if let Some(d) = r.deadline()
                    && SystemTime::now() >= d
                    && !r.is_finished()
                {
                    r.timed_out.store(true, Ordering::Relaxed);
                    r.cancel();
                }
            }
            if let_go {
                self.runtime.forget_finished_jobs();
            }
            let now = SystemTime::now();
            let mut finished: Vec<(SystemTime, String)> = records
                .iter()
                .filter_map(|r| {
                    r.archived
                        .lock()
                        .as_ref()
                        .map(|(_, at)| (*at, r.id.clone()))
                })
                .collect();
            finished.sort();
            let extra = finished.len().saturating_sub(KEPT_FINISHED_JOBS);
            let gone: Vec<String> = finished
                .iter()
                .enumerate()
                .filter(|(i, (at, _))| {
                    *i < extra || now.duration_since(*at).unwrap_or_default() >= retention
                })
                .map(|(_, (_, id))| id.clone())
                .collect();
            if gone.is_empty() {
                continue;
            }
            // Its directory first (outside the tenant's lock), then the record: a job that
            // answers 404 has no directory left.
            for r in records.iter().filter(|r| gone.contains(&r.id)) {
                if let Err(e) = std::fs::remove_dir_all(&r.dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::error!(job = %r.id, "cannot remove the finished job's directory: {e}");
                }
            }
            let mut st = t.state.lock();
            for id in &gone {
                st.jobs.shift_remove(id);
            }
        }
    }

    /// The blobs kept although the index may no longer name them: those the stored flows
    /// were built with, and those unfinished jobs (or jobs that could not be resumed) run.
    fn pinned(st: &TenantState) -> BTreeSet<String> {
        st.jobs
            .values()
            .filter(|j| j.archived.lock().is_none())
            .flat_map(|j| j.pins())
            .chain(st.flows.values().flat_map(|f| f.plugins.values().cloned()))
            .chain(st.unresumed.iter().cloned())
            .collect()
    }

    /// Loads what tenant `t` stored.
    fn restore(&self, t: &Tenant) -> Result<(), String> {
        let index = t.dir.index()?;
        let mut st = t.state.lock();
        for (name, hash) in &index.plugins {
            let loaded = t
                .dir
                .blob(hash)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    let n = bytes.len() as u64;
                    self.plugin_of(name, hash, &bytes)
                        .map(|p| (p, n))
                        .map_err(|e| e.message)
                });
            match loaded {
                Ok((plugin, bytes)) => {
                    st.plugins.insert(
                        name.clone(),
                        StoredPlugin {
                            hash: hash.clone(),
                            bytes,
                            plugin,
                        },
                    );
                }
                Err(e) => tracing::error!(
                    tenant = %t.id,
                    "plugin `{name}` does not load any more (kept on disk): {e}"
                ),
            }
        }
        st.index.plugins = index.plugins.clone();
        for (id, hash) in &index.flows {
            let text = t
                .dir
                .blob(hash)
                .map_err(|e| e.to_string())
                .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()));
            let result = text.and_then(|text| {
                self.build_flow(t, &st, id, text)
                    .map_err(|e| format!("{}: {:?}", e.message, e.details))
            });
            match result {
                Ok(flow) => {
                    st.flows.insert(id.clone(), flow);
                }
                Err(e) => tracing::error!(
                    tenant = %t.id,
                    "flow `{id}` does not load any more (kept on disk): {e}"
                ),
            }
        }
        st.index.flows = index.flows;
        Ok(())
    }

    /// The tenant a bearer token belongs to; every tenant's hashes are compared, each in
    /// constant time.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Tenant>> {
        let h = super::config::token_hash(token);
        let mut found = None;
        for t in &self.tenant_list() {
            for th in &t.live.read().token_hashes {
                if same(th, &h) {
                    found = Some(t.clone());
                }
            }
        }
        found
    }

    /// A plugin of `bytes` named `name`, compiled once per content across tenants.
    fn plugin_of(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<Plugin, ApiError> {
        let path = Path::new(name);
        let cached = self.components.lock().get(hash);
        let (component, from_cache) = match cached {
            Some(c) => (c, true),
            None => {
                let (c, from_disk) = self
                    .engine
                    .compile_bytes(path, bytes)
                    .map_err(|e| invalid_plugin(&e))?;
                self.components.lock().insert(hash, c.clone());
                (c, from_disk)
            }
        };
        self.engine
            .open_component(path, component, from_cache)
            .map_err(|e| invalid_plugin(&e))
    }

    /// Whether tenant `t` may store a plugin named `name` (a count quota; bytes are checked
    /// with the bytes).
    pub fn plugin_room(&self, t: &Tenant, name: &str) -> Result<(), ApiError> {
        check_name("plugin", name)?;
        let st = t.state.lock();
        let q = &t.quotas();
        if !st.plugins.contains_key(name) && st.plugins.len() >= q.plugins {
            return Err(ApiError::quota(
                429,
                "plugins",
                format!("the tenant holds {} plugins, its quota", q.plugins),
            ));
        }
        Ok(())
    }

    /// `PUT /v1/plugins/{name}`: validates and compiles the component, then stores it.
    /// Returns whether it is new, and its description.
    pub fn put_plugin(
        &self,
        t: &Tenant,
        name: &str,
        bytes: &[u8],
    ) -> Result<(bool, Value), ApiError> {
        check_name("plugin", name)?;
        let q = &t.quotas();
        let size = bytes.len() as u64;
        let check = |st: &TenantState| -> Result<(), ApiError> {
            let replaced = st.plugins.get(name).map_or(0, |p| p.bytes);
            let total: u64 = st.plugins.values().map(|p| p.bytes).sum::<u64>() - replaced;
            if !st.plugins.contains_key(name) && st.plugins.len() >= q.plugins {
                return Err(ApiError::quota(
                    429,
                    "plugins",
                    format!("the tenant holds {} plugins, its quota", q.plugins),
                ));
            }
            if total + size > q.plugin_bytes {
                return Err(ApiError::quota(
                    413,
                    "plugin_bytes",
                    format!(
                        "its plugins would take {}, over the tenant's quota of {}",
                        crate::model::budget::bytes(total + size),
                        crate::model::budget::bytes(q.plugin_bytes)
                    ),
                ));
            }
            Ok(())
        };
        check(&t.state.lock())?;
        t.disk_room(size)?;
        let hash = hex(&Sha256::digest(bytes));
        let plugin = self.plugin_of(name, &hash, bytes)?;
        let description = describe(name, &hash, size, &plugin);
        let mut st = t.state.lock();
        check(&st)?;
        // The flows using it are rebuilt on the new version, each checked whole; if one no
        // longer holds, nothing changes.
        let mut all: BTreeMap<String, (String, Plugin)> = st
            .plugins
            .iter()
            .map(|(n, p)| (n.clone(), (p.hash.clone(), p.plugin.clone())))
            .collect();
        all.insert(name.to_owned(), (hash.clone(), plugin.clone()));
        let users: Vec<(String, String)> = st
            .flows
            .iter()
            .filter(|(_, f)| f.plugins.contains_key(name))
            .map(|(id, f)| (id.clone(), f.text.clone()))
            .collect();
        let mut rebuilt = Vec::new();
        let mut broken = Map::new();
        for (id, text) in users {
            match self.build_flow_with(t, &all, &id, text) {
                Ok(f) => rebuilt.push((id, f)),
                Err(e) => {
                    broken.insert(id, e.body()["error"].clone());
                }
            }
        }
        if !broken.is_empty() {
            for (id, f) in &rebuilt {
                if st
                    .flows
                    .get(id)
                    .is_none_or(|old| old.registered != f.registered)
                {
                    self.runtime.registry().unregister(&f.registered);
                }
            }
            return Err(ApiError::new(
                409,
                "breaks_flows",
                format!(
                    "this version of plugin `{name}` does not fit flow{} {}: nothing was changed",
                    if broken.len() == 1 { "" } else { "s" },
                    broken.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
            .with("flows", Value::Object(broken)));
        }
        t.dir
            .put_blob(&hash, bytes)
            .map_err(|e| store_failed(&t.id, &e))?;
        // The flows' new versions first, so that the index saved below keeps what they use.
        for (id, f) in rebuilt {
            if let Some(old) = st.flows.insert(id, f)
                && !st.flows.values().any(|n| n.registered == old.registered)
            {
                self.runtime.registry().unregister(&old.registered);
            }
        }
        let mut index = st.index.clone();
        index.plugins.insert(name.to_owned(), hash.clone());
        t.dir
            .save_index(&index, &Self::pinned(&st))
            .map_err(|e| store_failed(&t.id, &e))?;
        st.index = index;
        let new = st
            .plugins
            .insert(
                name.to_owned(),
                StoredPlugin {
                    hash,
                    bytes: size,
                    plugin,
                },
            )
            .is_none();
        Ok((new, description))
    }

    /// What the tenant uses against its quotas, and its share of the workers: the wall time
    /// its activations have occupied them since the server started (what fairness charges).
    pub fn usage(&self, t: &Tenant) -> Value {
        let (plugins, plugin_bytes, flows, jobs) = {
            let st = t.state.lock();
            (
                st.plugins.len(),
                st.plugins.values().map(|p| p.bytes).sum::<u64>(),
                st.flows.len(),
                st.jobs.values().filter(|j| !j.is_finished()).count(),
            )
        };
        let w = self.runtime.group_usage(t.group);
        let q = &t.quotas();
        json!({
            "tenant": t.id,
            "weight": w.weight,
            "workers": {
                "busy_seconds": w.busy.as_secs_f64(),
                "running": w.running,
                "queued_tasks": w.queued_tasks,
                "of": self.runtime.thread_pool_size(),
            },
            "activations_per_second": {"quota": q.activations_per_second, "throttled": w.throttled},
            "memory_bytes": {"used": w.memory_bytes, "peak": w.memory_peak_bytes, "quota": q.memory_bytes},
            "instances": {"live": w.instances, "peak": w.instances_peak, "quota": q.instances},
            "queued_items": {"used": w.queued_items, "peak": w.queued_items_peak, "quota": q.queued_items},
            "plugins": {"used": plugins, "quota": q.plugins},
            "plugin_bytes": {"used": plugin_bytes, "quota": q.plugin_bytes},
            "flows": {"used": flows, "quota": q.flows},
            "jobs": {"used": jobs, "quota": q.jobs},
            "disk_bytes": {"used": t.disk_used.load(Ordering::Relaxed), "quota": q.disk_bytes},
            "request_bytes": {
                "used": (t.bodies_total.load(Ordering::Relaxed)
                    + t.bodies_debt.load(Ordering::Relaxed))
                    .saturating_sub(t.bodies.available_permits() as u64),
                "quota": q.request_room(),
            },
            "storage": match &*t.storage_error.lock() {
                None => json!({"ok": true}),
                Some(e) => json!({"ok": false, "error": e}),
            },
        })
    }

    pub fn plugins(&self, t: &Tenant) -> Value {
        let st = t.state.lock();
        Value::Array(
            st.plugins
                .iter()
                .map(|(name, p)| json!({"name": name, "sha256": p.hash, "size_bytes": p.bytes}))
                .collect(),
        )
    }

    pub fn plugin(&self, t: &Tenant, name: &str) -> Result<Value, ApiError> {
        let st = t.state.lock();
        let p = st
            .plugins
            .get(name)
            .ok_or_else(|| ApiError::not_found("plugin", name))?;
        Ok(describe(name, &p.hash, p.bytes, &p.plugin))
    }

    /// `DELETE /v1/plugins/{name}`: refused (409) while a flow uses it.
    pub fn delete_plugin(&self, t: &Tenant, name: &str) -> Result<(), ApiError> {
        let mut st = t.state.lock();
        if !st.plugins.contains_key(name) {
            return Err(ApiError::not_found("plugin", name));
        }
        let users: Vec<&String> = st
            .flows
            .iter()
            .filter(|(_, f)| f.plugins.contains_key(name))
            .map(|(id, _)| id)
            .collect();
        if !users.is_empty() {
            let users: Vec<String> = users.into_iter().cloned().collect();
            return Err(ApiError::new(
                409,
                "in_use",
                format!(
                    "plugin `{name}` is used by flow{} {}: delete or change {} first",
                    if users.len() == 1 { "" } else { "s" },
                    users.join(", "),
                    if users.len() == 1 { "it" } else { "them" }
                ),
            )
            .with("flows", users));
        }
        let mut index = st.index.clone();
        index.plugins.remove(name);
        t.dir
            .save_index(&index, &Self::pinned(&st))
            .map_err(|e| store_failed(&t.id, &e))?;
        st.index = index;
        st.plugins.remove(name);
        Ok(())
    }

    /// Checks a tenant's flow text against its plugins.
    fn build_flow(
        &self,
        t: &Tenant,
        st: &TenantState,
        id: &str,
        text: String,
    ) -> Result<StoredFlow, ApiError> {
        let plugins: BTreeMap<String, (String, Plugin)> = st
            .plugins
            .iter()
            .map(|(n, p)| (n.clone(), (p.hash.clone(), p.plugin.clone())))
            .collect();
        self.build_flow_with(t, &plugins, id, text)
    }

    /// Checks a flow text against `plugins` (by name: blob and plugin) and registers it under
    /// a name of its content (running jobs keep the version they started with).
    fn build_flow_with(
        &self,
        t: &Tenant,
        all: &BTreeMap<String, (String, Plugin)>,
        id: &str,
        text: String,
    ) -> Result<StoredFlow, ApiError> {
        let plugins: BTreeMap<String, Plugin> = all
            .iter()
            .map(|(n, (_, p))| (n.clone(), p.clone()))
            .collect();
        let hash = hex(&Sha256::digest(text.as_bytes()));
        let file = format!("flows/{id}");
        let loaded =
            super::super::load::load_tenant_flow(&file, text.clone(), &self.engine, &plugins)
                .map_err(|diags| {
                    let errors = diags.iter().filter(|d| d.is_error()).count();
                    ApiError::new(
                        400,
                        "invalid_flow",
                        format!(
                            "flow `{id}` is invalid: {errors} error{} found",
                            if errors == 1 { "" } else { "s" }
                        ),
                    )
                    .with(
                        "diagnostics",
                        diags.iter().map(diagnostic_json).collect::<Vec<_>>(),
                    )
                })?;
        let used: BTreeMap<String, String> = loaded
            .components
            .iter()
            .filter_map(|(p, _)| {
                let name = p.display().to_string();
                all.get(&name).map(|(h, _)| (name, h.clone()))
            })
            .collect();
        // Named by its text and its plugins' versions: a flow rebuilt on a new plugin, or a
        // resumed job's older version, never takes another's place in the registry.
        let mut version = Sha256::new();
        version.update(hash.as_bytes());
        for (n, h) in &used {
            version.update(format!("\n{n}={h}").as_bytes());
        }
        let registered = format!("{}/{id}#{}", t.id, &hex(&version.finalize())[..16]);
        self.runtime
            .register(&registered, &loaded.flow)
            .map_err(|e| ApiError::new(400, "invalid_flow", e.to_string()))?;
        Ok(StoredFlow {
            hash,
            text,
            registered,
            description: loaded.description.clone(),
            routines: loaded.flow.routines().count(),
            connections: loaded.flow.connections().len(),
            entries: loaded.entries.clone(),
            plugins: used,
            input: loaded.input.clone(),
            timeout: loaded.timeout,
            warnings: loaded.warnings.iter().map(diagnostic_json).collect(),
        })
    }

    /// `PUT /v1/flows/{id}`: checks the flow whole, then stores it for new jobs (running jobs
    /// keep the version they started with).
    pub fn put_flow(&self, t: &Tenant, id: &str, text: String) -> Result<(bool, Value), ApiError> {
        check_name("flow", id)?;
        t.disk_room(text.len() as u64)?;
        let mut st = t.state.lock();
        if !st.flows.contains_key(id) && st.flows.len() >= t.quotas().flows {
            return Err(ApiError::quota(
                429,
                "flows",
                format!("the tenant holds {} flows, its quota", t.quotas().flows),
            ));
        }
        let flow = self.build_flow(t, &st, id, text)?;
        t.dir
            .put_blob(&flow.hash, flow.text.as_bytes())
            .map_err(|e| store_failed(&t.id, &e))?;
        let mut index = st.index.clone();
        index.flows.insert(id.to_owned(), flow.hash.clone());
        t.dir
            .save_index(&index, &Self::pinned(&st))
            .map_err(|e| store_failed(&t.id, &e))?;
        st.index = index;
        let view = flow_view(id, &flow);
        let registered = flow.registered.clone();
        let old = st.flows.insert(id.to_owned(), flow);
        // Running jobs keep the compiled flow they started with; new ones take this version.
        if let Some(old) = &old
            && old.registered != registered
        {
            self.runtime.registry().unregister(&old.registered);
        }
        Ok((old.is_none(), view))
    }

    pub fn flows(&self, t: &Tenant) -> Value {
        let st = t.state.lock();
        Value::Array(st.flows.iter().map(|(id, f)| flow_view(id, f)).collect())
    }

    /// A flow's view, with its text.
    pub fn flow(&self, t: &Tenant, id: &str) -> Result<Value, ApiError> {
        let st = t.state.lock();
        let f = st
            .flows
            .get(id)
            .ok_or_else(|| ApiError::not_found("flow", id))?;
        let mut v = flow_view(id, f);
        v["text"] = f.text.clone().into();
        Ok(v)
    }

    /// `DELETE /v1/flows/{id}`: refused (409) while a job of it runs.
    pub fn delete_flow(&self, t: &Tenant, id: &str) -> Result<(), ApiError> {
        let mut st = t.state.lock();
        let Some(f) = st.flows.get(id) else {
            return Err(ApiError::not_found("flow", id));
        };
        let registered = f.registered.clone();
        let running: Vec<String> = st
            .jobs
            .values()
            .filter(|j| j.flow == id && !j.is_finished())
            .map(|j| j.id.clone())
            .collect();
        if !running.is_empty() {
            return Err(ApiError::new(
                409,
                "in_use",
                format!(
                    "flow `{id}` has {} running job{}: close or cancel {} first",
                    running.len(),
                    if running.len() == 1 { "" } else { "s" },
                    if running.len() == 1 { "it" } else { "them" }
                ),
            )
            .with("jobs", running));
        }
        let mut index = st.index.clone();
        index.flows.remove(id);
        t.dir
            .save_index(&index, &Self::pinned(&st))
            .map_err(|e| store_failed(&t.id, &e))?;
        st.index = index;
        st.flows.remove(id);
        self.runtime.registry().unregister(&registered);
        Ok(())
    }

    /// `POST /v1/flows/{id}/jobs`: starts a durable job, open for input until closed.
    /// `input` (by `routine.slot`) is posted first; without it, the flow file's own `input:`.
    pub fn start_job(
        &self,
        t: &Tenant,
        flow: &str,
        input: Option<Map<String, Value>>,
        close: bool,
    ) -> Result<Arc<JobRecord>, ApiError> {
        if !self.ready.load(Ordering::Acquire) {
            return Err(stopping());
        }
        t.disk_room(0)?;
        let (record, flow_input) = {
            let mut st = t.state.lock();
            if t.removed.load(Ordering::SeqCst) {
                // Removed by a reload while this request was in flight.
                return Err(ApiError::new(
                    401,
                    "unauthorized",
                    "the token is no longer valid",
                ));
            }
            let f = st
                .flows
                .get(flow)
                .ok_or_else(|| ApiError::not_found("flow", flow))?;
            let running = st.jobs.values().filter(|j| !j.is_finished()).count();
            if running >= t.quotas().jobs {
                return Err(ApiError::quota(
                    429,
                    "jobs",
                    format!(
                        "the tenant runs {running} jobs, its quota: close or cancel one, or wait"
                    ),
                ));
            }
            let id = random_hex(16).map_err(ApiError::internal)?;
            let meta = JobMeta {
                flow: flow.to_owned(),
                flow_sha256: f.hash.clone(),
                plugins: f.plugins.clone(),
                created_ms: unix_ms(SystemTime::now()),
                closed: false,
                deadline_ms: f
                    .timeout
                    .and_then(|t| SystemTime::now().checked_add(t))
                    .map(unix_ms),
            };
            let dir = t.dir.jobs_dir().join(&id);
            let opened = std::fs::create_dir_all(&dir)
                .and_then(|()| meta.write(&dir))
                .map_err(|e| store_failed(&t.id, &e))
                .and_then(|()| {
                    JobStore::open(&dir, &job_header(&meta)).map_err(|e| store_error(&t.id, &e))
                });
            let store = match self.storage(t, opened) {
                Ok(s) => s,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            };
            let (handle, hold) = match self.runtime.exec_durable_in(t.group, &f.registered, store) {
                Ok(h) => h,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(runtime_error(e));
                }
            };
            let record = Arc::new(JobRecord {
                id: id.clone(),
                tenant: t.id.clone(),
                flow: flow.to_owned(),
                handle: Mutex::new(Some(handle)),
                archived: Mutex::default(),
                hold: Mutex::new(Some(hold)),
                entries: f.entries.clone(),
                posted: AtomicU64::new(0),
                created: SystemTime::now(),
                timed_out: AtomicBool::new(false),
                dir,
                meta: Mutex::new(meta),
                resumed: None,
                events: Events::new(),
                seen: Mutex::default(),
            });
            self.routes
                .lock()
                .insert(record.live()?.id(), record.events.clone());
            let flow_input = f.input.clone();
            st.jobs.insert(id, record.clone());
            (record, flow_input)
        };
        let feeds: Vec<((String, String), Vec<Item>)> = match input {
            None => flow_input,
            Some(map) => {
                let mut feeds = Vec::new();
                for (to, items) in map {
                    let target = record.target(Some(&to)).inspect_err(|_| record.cancel())?;
                    let Value::Array(values) = items else {
                        record.cancel();
                        return Err(ApiError::bad_request(format!(
                            "input `{}`: give a list of items",
                            crate::term::escape(&to)
                        )));
                    };
                    let mut list = Vec::new();
                    for (i, v) in values.into_iter().enumerate() {
                        list.push(Item::new(v).map_err(|e| {
                            record.cancel();
                            ApiError::bad_request(format!(
                                "input `{}`, item {i}: {e}",
                                crate::term::escape(&to)
                            ))
                        })?);
                    }
                    feeds.push((target, list));
                }
                feeds
            }
        };
        for ((r, s), items) in feeds {
            let n = items.len();
            if let Err(e) = self.post(&record, Some(&format!("{r}.{s}")), items) {
                record.cancel();
                return Err(e.with("input_items", n));
            }
        }
        if close {
            record.close()?;
        }
        Ok(record)
    }

    /// Resumes the unfinished jobs of tenant `t` that its directory holds (after a stop or a
    /// crash), each on the flow and plugins it started with; those that had finished are
    /// listed from their summaries.
    fn resume_jobs(&self, t: &Tenant) {
        let Ok(entries) = std::fs::read_dir(t.dir.jobs_dir()) else {
            return;
        };
        let mut found: Vec<(u64, Arc<JobRecord>)> = Vec::new();
        for e in entries.flatten() {
            let dir = e.path();
            let id = e.file_name().to_string_lossy().into_owned();
            match self.resume_job(t, &id, &dir) {
                Ok(r) => {
                    let created = r.meta.lock().created_ms;
                    found.push((created, r));
                }
                Err(e) => {
                    if let Ok(m) = JobMeta::read(&dir) {
                        let mut st = t.state.lock();
                        st.unresumed.insert(m.flow_sha256);
                        st.unresumed.extend(m.plugins.into_values());
                    }
                    tracing::error!(
                    tenant = %t.id,
                    job = %id,
                    "cannot resume the job (its directory is kept): {e}"
                    )
                }
            }
        }
        found.sort_by_key(|(created, _)| *created);
        let mut st = t.state.lock();
        for (_, r) in found {
            st.jobs.insert(r.id.clone(), r);
        }
    }

    fn resume_job(&self, t: &Tenant, id: &str, dir: &Path) -> Result<Arc<JobRecord>, String> {
        let meta = JobMeta::read(dir)?;
        let created = SystemTime::UNIX_EPOCH + Duration::from_millis(meta.created_ms);
        let record = |handle: Option<JobHandle>,
                      archived: Option<(Value, SystemTime)>,
                      hold: Option<InputHold>,
                      flow: Option<&StoredFlow>,
                      resumed: Option<Value>| {
            Arc::new(JobRecord {
                id: id.to_owned(),
                tenant: t.id.clone(),
                flow: meta.flow.clone(),
                handle: Mutex::new(handle),
                archived: Mutex::new(archived),
                hold: Mutex::new(hold),
                entries: flow.map(|f| f.entries.clone()).unwrap_or_default(),
                posted: AtomicU64::new(0),
                created,
                timed_out: AtomicBool::new(false),
                dir: dir.to_owned(),
                meta: Mutex::new(meta.clone()),
                resumed,
                events: Events::new(),
                seen: Mutex::default(),
            })
        };
        let summary = dir.join("summary.json");
        if let Ok(bytes) = std::fs::read(&summary) {
            let mut v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: {e}", summary.display()))?;
            if let Some(o) = v.as_object_mut() {
                for k in ["dead_letters", "state", "output"] {
                    o.remove(k);
                }
            }
            let at = std::fs::metadata(&summary)
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            let r = record(None, Some((v.clone(), at)), None, None, None);
            r.events.close(v["status"].clone());
            return Ok(r);
        }
        let text = t
            .dir
            .blob(&meta.flow_sha256)
            .map_err(|e| format!("the flow it runs: {e}"))
            .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()))?;
        let mut plugins = BTreeMap::new();
        for (name, hash) in &meta.plugins {
            let bytes = t
                .dir
                .blob(hash)
                .map_err(|e| format!("plugin `{name}`: {e}"))?;
            let p = self
                .plugin_of(name, hash, &bytes)
                .map_err(|e| format!("plugin `{name}`: {}", e.message))?;
            plugins.insert(name.clone(), (hash.clone(), p));
        }
        let flow = self
            .build_flow_with(t, &plugins, &meta.flow, text)
            .map_err(|e| format!("its flow: {} {:?}", e.message, e.details))?;
        let store = JobStore::open(dir, &job_header(&meta))?;
        let r = store.resumed().clone();
        if r.status
            .as_deref()
            .is_some_and(|s| s != "stopped" && s != "running")
        {
            // It finished before the crash, and its summary was not written yet.
            let v = json!({
                "id": id,
                "flow": meta.flow,
                "status": r.status,
                "created": meta.created_ms,
                "dead_letters": store.dead_letters().filter_map(|d| serde_json::from_str::<Value>(d).ok()).collect::<Vec<_>>(),
            });
            drop(store);
            let _ =
                super::disk::write_atomic(&summary, &serde_json::to_vec(&v).unwrap_or_default());
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.remove("dead_letters");
            }
            let r = record(None, Some((v.clone(), SystemTime::now())), None, None, None);
            r.events.close(v["status"].clone());
            return Ok(r);
        }
        let resumed = json!({
            "queued": r.queued,
            "dead_letters": r.dead_letters,
            "state_keys": r.state_keys,
            "paused": r.paused,
            "armed_retries": r.armed_retries,
        });
        let (handle, hold) = self
            .runtime
            .exec_durable_in(t.group, &flow.registered, store)
            .map_err(|e| e.to_string())?;
        let closed = meta.closed;
        let engine_id = handle.id();
        let rec = record(Some(handle), None, Some(hold), Some(&flow), Some(resumed));
        self.routes.lock().insert(engine_id, rec.events.clone());
        if closed {
            rec.hold.lock().take();
        }
        tracing::info!(tenant = %t.id, job = %id, "resumed the job");
        Ok(rec)
    }

    /// Posts `items` in order to a job's slot, in units committed to the job's store before
    /// they are acknowledged; each unit waits up to the post timeout for room. On an error,
    /// how many were accepted before it is in `accepted` (a unit is taken whole or not at
    /// all).
    pub fn post(
        &self,
        job: &JobRecord,
        to: Option<&str>,
        items: Vec<Item>,
    ) -> Result<usize, ApiError> {
        let handle = job.live()?;
        if job.is_closed() {
            return Err(ApiError::new(
                409,
                "job_closed",
                format!("job {} is closed: it takes no more input", job.id),
            )
            .with("accepted", 0));
        }
        let (r, s) = job.target(to)?;
        let input = handle.input(&r, &s).map_err(runtime_error)?;
        let tenant = self.tenants.read().get(&job.tenant).cloned();
        let mut accepted = 0;
        // A unit is committed once the slot has room for its first item, then queued item by
        // item as room comes: no larger than the slot's bounds, so that what is acknowledged
        // but not yet queued stays within one slot's worth.
        let (max_items, max_bytes) = (input.capacity().clamp(1, POST_UNIT), input.byte_budget());
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut unit: Vec<Item> = Vec::new();
            let mut bytes = 0u64;
            while let Some(next) = items.peek() {
                let len = next.byte_len() as u64;
                if !unit.is_empty() && (unit.len() >= max_items || bytes + len > max_bytes) {
                    break;
                }
                bytes += len;
                unit.extend(items.next());
            }
            let n = unit.len();
            if let Some(t) = &tenant {
                t.disk_room(bytes)
                    .map_err(|e| e.with("accepted", accepted))?;
            }
            let posted = input.post_items(unit, Vec::new()).map_err(|e| {
                // The job may have failed on its store (an activation's commit): say so.
                store_failure(&handle).unwrap_or_else(|| runtime_error(e))
            });
            let posted = match &tenant {
                Some(t) => self.storage(t, posted),
                None => posted,
            };
            if let Err(e) = posted {
                return Err(e.with("accepted", accepted));
            }
            accepted += n;
            job.posted.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(accepted)
    }

    /// The job `id` of tenant `t`.
    pub fn job(&self, t: &Tenant, id: &str) -> Result<Arc<JobRecord>, ApiError> {
        t.state
            .lock()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("job", id))
    }

    pub fn jobs(&self, t: &Tenant) -> Value {
        let st = t.state.lock();
        Value::Array(st.jobs.values().map(|j| j.line()).collect())
    }

    /// Stops taking work: jobs whose input is closed get `drain` to finish; the rest are
    /// stopped (no new activation; the running ones end) and stay in their stores, open for
    /// input if they were, to resume at the next start. Nothing is cancelled: an activation
    /// still running when the process exits re-runs after the restart, as after a crash.
    /// Returns how many finished while draining and how many were kept to resume.
    pub fn shutdown(&self, drain: Duration) -> (usize, usize) {
        self.ready.store(false, Ordering::Release);
        let mut all = Vec::new();
        for t in &self.tenant_list() {
            all.extend(t.state.lock().jobs.values().cloned());
        }
        let running: Vec<(Arc<JobRecord>, JobHandle)> = all
            .iter()
            .filter_map(|j| {
                j.handle()
                    .filter(|h| !h.is_finished())
                    .map(|h| (j.clone(), h))
            })
            .collect();
        let deadline = std::time::Instant::now() + drain;
        for (j, h) in &running {
            if j.is_closed() {
                h.wait(deadline.saturating_duration_since(std::time::Instant::now()));
            }
        }
        let mut left = 0;
        for (j, h) in &running {
            if !h.is_finished() {
                h.stop();
                // Not `close`: its input stays open across the restart.
                drop(j.hold.lock().take());
                left += 1;
            }
        }
        for (_, h) in &running {
            h.wait(Duration::from_secs(5));
        }
        for j in &all {
            j.archive();
        }
        (running.len() - left, left)
    }
}

/// The most items committed in one unit of a post.
const POST_UNIT: usize = 256;

/// A job store's header: what the job runs, by blob.
fn job_header(meta: &JobMeta) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "serve": 1,
        "flow": meta.flow,
        "flow_sha256": meta.flow_sha256,
        "plugins": meta.plugins,
    }))
    .unwrap_or_default()
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{}` is not a valid {what} name: 1 to 64 letters, digits, `_` and `-`, starting \
             with a letter or digit",
            crate::term::escape(name)
        )))
    }
}

fn describe(name: &str, hash: &str, size: u64, plugin: &Plugin) -> Value {
    let mut v = super::super::inspect::describe(plugin);
    v["name"] = name.into();
    v["sha256"] = hash.into();
    v["size_bytes"] = size.into();
    v
}

fn flow_view(id: &str, f: &StoredFlow) -> Value {
    json!({
        "id": id,
        "sha256": f.hash,
        "description": f.description,
        "routines": f.routines,
        "connections": f.connections,
        "entries": f.entries.iter().map(|(r, s)| format!("{r}.{s}")).collect::<Vec<_>>(),
        "plugins": f.plugins.keys().collect::<Vec<_>>(),
        "warnings": f.warnings,
    })
}

fn invalid_plugin(e: &crate::wasm::LoadError) -> ApiError {
    ApiError::new(400, "invalid_plugin", e.to_string())
}

/// The tenant's storage failed (a full disk): nothing was stored; the message names no host
/// path.
fn store_failed(tenant: &str, e: &std::io::Error) -> ApiError {
    tracing::error!(tenant, "cannot write the tenant's data: {e}");
    storage(e.raw_os_error() == Some(28), "nothing was stored")
}

/// The answer to a full (507) or failing (503) storage, saying what became of the request;
/// it names no host path (the log has the detail).
fn storage(full: bool, outcome: &str) -> ApiError {
    if full {
        ApiError::new(
            507,
            "storage",
            format!("the server's storage is full: {outcome}"),
        )
    } else {
        ApiError::new(
            503,
            "storage",
            format!("the server cannot write its storage: {outcome}"),
        )
    }
}

/// Whether a store's error text says the disk is full.
fn is_full(text: &str) -> bool {
    text.contains("No space left")
}

/// The storage error of a job that failed because its store could not commit.
fn store_failure(h: &JobHandle) -> Option<ApiError> {
    if h.status() != JobStatus::Failed {
        return None;
    }
    let f = h.failure()?;
    f.contains("job store").then(|| {
        storage(
            is_full(&f),
            "the job has failed (what it acknowledged is kept)",
        )
    })
}

/// A job store that cannot be made or opened (a full or failing disk).
fn store_error(tenant: &str, e: &str) -> ApiError {
    tracing::error!(tenant, "cannot open a job store: {e}");
    storage(is_full(e), "the job was not started")
}

fn stopping() -> ApiError {
    let mut e = ApiError::new(
        503,
        "stopping",
        "the server is stopping: it takes no new work",
    );
    e.retry_after = Some(5);
    e
}

/// A runtime error as the API answers it (without the engine's own job numbers and flow
/// names).
fn runtime_error(e: RuntimeError) -> ApiError {
    let esc = |s: &str| crate::term::escape(s).into_owned();
    match e {
        RuntimeError::QueueFull {
            routine,
            slot,
            waited,
            why,
            ..
        } => {
            let mut a = ApiError::new(
                429,
                "slot_full",
                format!(
                    "slot `{}.{}` is full ({}) and stayed full for {} ms: send the rest later",
                    esc(&routine),
                    esc(&slot),
                    esc(&why),
                    waited.as_millis()
                ),
            )
            .with("waited_ms", waited.as_millis() as u64);
            a.retry_after = Some(1);
            a
        }
        RuntimeError::JobFinished { .. } => ApiError::new(
            409,
            "job_finished",
            "the job has finished: it takes no more input",
        ),
        RuntimeError::JobHalted { status, .. } => ApiError::new(
            409,
            "job_finished",
            format!("the job is {status}: it takes no more input"),
        ),
        RuntimeError::UnknownRoutine {
            routine,
            suggestion,
            ..
        } => ApiError::new(
            404,
            "not_found",
            format!(
                "the flow has no routine `{}`{}",
                esc(&routine),
                suggestion
                    .map(|s| format!(" (did you mean `{}`?)", esc(&s)))
                    .unwrap_or_default()
            ),
        ),
        RuntimeError::UnknownSlot { .. } => ApiError::new(404, "not_found", e.to_string()),
        RuntimeError::ItemTooLarge { .. } => ApiError::new(413, "item_too_large", e.to_string()),
        RuntimeError::Item(_) => ApiError::bad_request(e.to_string()),
        RuntimeError::ShutDown => stopping(),
        RuntimeError::Store { reason, .. } => {
            tracing::error!("a job store failed to commit: {reason}");
            storage(
                is_full(&reason),
                "the post was not taken, and the job has failed",
            )
        }
        other => {
            tracing::error!("{other}");
            ApiError::internal("the server could not do it (its log says why)")
        }
    }
}

/// Takes up to `n` off `count` (never below zero); what it took.
pub(crate) fn take_up_to(count: &AtomicU64, n: u64) -> u64 {
    let before = count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| Some(c - c.min(n)))
        .unwrap_or_else(|c| c);
    before.min(n)
}

#[cfg(test)]
mod tests {
    use super::Compiled;

    #[test]
    fn the_compiled_cache_keeps_to_its_size_letting_the_least_recently_used_go() {
        let mut c: Compiled<&str> = Compiled::new(100);
        c.insert_sized("a", "A", 40);
        c.insert_sized("b", "B", 40);
        assert_eq!(c.get("a"), Some("A"), "a is used now, b is the older");
        c.insert_sized("c", "C", 40);
        assert_eq!(
            (c.get("b"), c.get("a"), c.get("c")),
            (None, Some("A"), Some("C"))
        );
        assert_eq!(c.used, 80);
        // One larger than the cap is kept alone (it is in use).
        c.insert_sized("d", "D", 500);
        assert_eq!(c.entries.len(), 1);
        assert_eq!((c.get("d"), c.used), (Some("D"), 500));
        // The same hash again replaces, not adds.
        c.insert_sized("d", "D2", 10);
        assert_eq!((c.entries.len(), c.used), (1, 10));
    }
}
