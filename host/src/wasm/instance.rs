//! Instances of a plugin serving one routine: the Store data, the host imports, the
//! per-activation sandbox, and the pool that recycles instances (see the [module
//! docs](super) for what ends an instance's life).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde_json::Value;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{self, ActivationError, Level};
use super::output::Capture;
use super::plugin::PluginInner;
use crate::JobId;
use crate::model::activation::Batch;
use crate::model::budget::Meter;
use crate::model::context::{Context, EmitError};
use crate::model::item::Item;
use crate::model::slots::{Idle, Slot};
use crate::{Logic, RoutineError};

/// Resource limits of one routine's instances.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Most linear memory, all memories of an instance together, in bytes. Default 64 MiB.
    pub memory: usize,
    /// Wall-clock budget of one activation, not counting time spent waiting inside `emit` for
    /// queue space. Default 30 s.
    pub timeout: Duration,
    /// Fuel per activation (needs [`WasmConfig::fuel`](super::WasmConfig)); `None`: unmetered.
    pub fuel: Option<u64>,
    /// Most live instances of this routine (across the jobs of its flow). Default 64.
    pub max_instances: usize,
    /// Activations after which an instance is replaced by a fresh one. Default 10,000.
    pub recycle_after: u64,
    /// Let an instance serve activations of several jobs (of the same routine) in turn:
    /// cheaper for expensive guests (Python, JavaScript), but a guest's memory then carries
    /// from one job to the next. Off by default: each job gets its own instances, dropped when
    /// it ends. An operator's choice (a manifest cannot set it); never across tenants.
    pub reuse_across_jobs: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: 64 << 20,
            timeout: Duration::from_secs(30),
            fuel: None,
            max_instances: 64,
            recycle_after: 10_000,
            reuse_across_jobs: false,
        }
    }
}

/// Capabilities granted to a routine beyond the default (none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Host directories mounted read-only, as `(host path, guest path)`.
    pub read_only_dirs: Vec<(PathBuf, String)>,
    /// Environment variables passed through from the host (by name; absent ones are skipped).
    pub env: Vec<String>,
}

/// The memory cap of one instance: the sum of all its linear memories (a component can have
/// several core instances, each with its own memory). Growing past it traps. Every byte is
/// also charged to the memory budget of the job the instance serves (its `meter`), with its
/// tables and a fixed [`INSTANCE_OVERHEAD`] for what the host keeps per instance, so the
/// guests of a job together cannot pass that budget either.
pub(crate) struct MemoryCap {
    cap: usize,
    /// Bytes of linear memory.
    total: usize,
    meter: Option<Arc<Meter>>,
    /// Bytes reserved on the meter (memory, tables, overhead).
    charged: u64,
}

/// What the host keeps per live instance beyond the guest's memories and tables (wasmtime's
/// instance structures, function references, the Store and WASI context), charged to the
/// job's memory budget when the instance is made. Measured at 24-54 KiB private for Rust
/// guests (BENCHMARKS.md); interpreters keep more, mostly in their linear memory.
pub(crate) const INSTANCE_OVERHEAD: u64 = 128 << 10;

/// How an error from [`MemoryCap::charge`] begins when the job's own memory budget refused.
const JOB_BUDGET: &str = "job memory budget: ";
/// How it begins when the memory quota of the job's group (tenant) refused.
const TENANT_QUOTA: &str = "tenant memory quota: ";

/// What one table element costs the host, charged like memory.
const TABLE_ELEMENT_BYTES: u64 = 16;

impl MemoryCap {
    /// Moves the instance's charge from the job it served to the one behind `meter`; false
    /// (nothing moved) if that job's budget has no room for it.
    fn move_to(&mut self, meter: &Arc<Meter>) -> bool {
        if self.meter.as_ref().is_some_and(|m| Arc::ptr_eq(m, meter)) {
            return true;
        }
        if !meter.reserve(self.charged) {
            return false;
        }
        if let Some(old) = self.meter.replace(meter.clone()) {
            old.release(self.charged);
        }
        true
    }

    /// Charges `n` more bytes to the job's budget; an error naming it if there is no room.
    fn charge(&mut self, n: u64, what: &str) -> wasmtime::Result<()> {
        if let Some(m) = &self.meter {
            if let Err(refusal) = m.try_reserve(n) {
                let label = if refusal.transient() {
                    TENANT_QUOTA
                } else {
                    JOB_BUDGET
                };
                return Err(wasmtime::format_err!(
                    "{label}{what} would take it past {refusal}"
                ));
            }
            self.charged += n;
        }
        Ok(())
    }

    fn refund(&mut self, n: u64) {
        if let Some(m) = &self.meter {
            let n = n.min(self.charged);
            m.release(n);
            self.charged -= n;
        }
    }
}

impl Drop for MemoryCap {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.release(self.charged);
        }
    }
}

/// Most table elements per table (a guard against table bombs).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Most live resources (pollables, streams, descriptors) per instance: wasmtime's default is a
/// million, which a guest can fill with timers the host keeps alive. Real guests hold a few.
const MAX_RESOURCES: usize = 16 * 1024;

/// Most random bytes one `get-random-bytes` call may ask for (wasmtime's default is 64 MiB
/// per call, allocated by the host).
const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// What one host call may copy out of a guest beyond the largest value a budget allows
/// (names, keys, framing).
const HOSTCALL_SLACK: usize = 64 << 10;

/// The hostcall fuel (bytes one host call may copy out of the guest) under `b`.
fn hostcall_fuel(b: &crate::RoutineBudgets) -> usize {
    let largest = b.item_bytes.max(b.state_value_bytes).max(b.output_bytes);
    usize::try_from(largest)
        .unwrap_or(usize::MAX)
        .saturating_add(HOSTCALL_SLACK)
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total - current.min(self.total) + desired;
        if total > self.cap {
            return Err(wasmtime::format_err!(
                "memory limit: growing memory to {total} bytes in all, over the cap of {}",
                self.cap
            ));
        }
        if total > self.total {
            self.charge(
                (total - self.total) as u64,
                &format!("growing memory to {total} bytes"),
            )?;
        } else {
            self.refund((self.total - total) as u64);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::format_err!(
                "table limit: growing a table to {desired} elements"
            ));
        }
        let more = desired.saturating_sub(current) as u64 * TABLE_ELEMENT_BYTES;
        self.charge(more, &format!("growing a table to {desired} elements"))?;
        Ok(true)
    }
}

/// What one activation in progress needs from the Store's point of view.
pub(crate) struct Call {
    ctx: Context,
    started: Instant,
    /// Time spent in host imports that wait (emit): not charged to the deadline.
    host_time: Duration,
    /// Time the host spent blocked handing this activation's output on (a slow terminal):
    /// not charged either (shared with the Store's output captures, in nanoseconds).
    output_wait: Arc<AtomicU64>,
    timeout: Duration,
    pub(crate) timed_out: bool,
    inputs: Inputs,
    /// A budget the guest went over in a host call: the activation fails with it even if
    /// the guest carries on (or catches the error it was handed).
    failure: Option<RoutineError>,
    /// The most one host call may copy out of the guest.
    hostcall_fuel: usize,
}

impl Call {
    /// Records `e` as the activation's failure (the first one stands) and returns the message
    /// the guest is handed.
    fn fail_with(&mut self, e: RoutineError) -> String {
        let message = e.message.clone();
        self.failure.get_or_insert(e);
        message
    }

    /// Time not charged to the guest so far.
    fn uncharged(&self) -> Duration {
        self.host_time + Duration::from_nanos(self.output_wait.load(Ordering::Relaxed))
    }

    /// How much of its budget the activation has used.
    fn spent(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.uncharged())
    }

    /// When the activation's budget runs out if nothing more is uncharged (`None`: too far
    /// to represent).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.started
            .checked_add(self.uncharged().checked_add(self.timeout)?)
    }

    /// The activation's context.
    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }
}

/// The largest list of inputs an instance keeps between activations.
const MAX_SPARE_INPUTS: usize = 1024;

/// How far past the last forwarded input an emit is compared (a filter that drops a few
/// items in a row still forwards without copies).
const FORWARD_LOOKAHEAD: usize = 4;

/// An activation's input items in order (every slot), and where the guest's forwarding has
/// got to.
#[derive(Default)]
struct Inputs {
    items: Vec<Item>,
    next: usize,
}

impl Inputs {
    fn new(items: Vec<Item>) -> Self {
        Self { items, next: 0 }
    }

    /// The input item whose text `payload` is, if the guest is forwarding one unchanged: the
    /// emitted text is compared with the next few inputs (a constant amount of work per
    /// emit), and an identical one is sent on as the same item, neither validated nor copied
    /// again.
    fn forwarded(&mut self, payload: &str) -> Option<Item> {
        let from = self.next.min(self.items.len());
        let to = (from + FORWARD_LOOKAHEAD).min(self.items.len());
        let i = (from..to).find(|&i| self.items[i].json_str() == payload)?;
        self.next = i + 1;
        Some(self.items[i].clone())
    }
}

/// The data of every Store: WASI, limits, captured output, and the activation it serves.
pub(crate) struct StoreData {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryCap,
    stdout: Capture,
    stderr: Capture,
    call: Option<Call>,
    /// The last activation's (emptied) list of inputs, reused by the next.
    spare_inputs: Vec<Item>,
    /// Nanoseconds the host spent blocked forwarding the current activation's output.
    output_wait: Arc<AtomicU64>,
    /// When a blocking wait outside any activation (instantiation, `describe`) must end.
    fallback_deadline: Option<Instant>,
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl StoreData {
    pub(crate) fn new(
        limits: &Limits,
        permissions: &Permissions,
        meter: Option<Arc<Meter>>,
    ) -> wasmtime::Result<Self> {
        let output_wait = Arc::new(AtomicU64::new(0));
        let stdout = Capture::new("stdout", output_wait.clone());
        let stderr = Capture::new("stderr", output_wait.clone());
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES);
        for (host, guest) in &permissions.read_only_dirs {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly)
                .map_err(|e| wasmtime::format_err!("cannot grant `{}`: {e}", host.display()))?;
        }
        for name in &permissions.env {
            if let Ok(value) = std::env::var(name) {
                wasi.env(name, value);
            }
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let mut cap = MemoryCap {
            cap: limits.memory,
            total: 0,
            meter,
            charged: 0,
        };
        cap.charge(INSTANCE_OVERHEAD, "another instance")?;
        Ok(Self {
            wasi: wasi.build(),
            table,
            limits: cap,
            stdout,
            stderr,
            call: None,
            spare_inputs: Vec::new(),
            output_wait,
            fallback_deadline: Instant::now().checked_add(limits.timeout),
        })
    }

    /// The parts `wasi:io/poll` needs (see [`super::deadline`]).
    pub(crate) fn poll_parts(
        &mut self,
    ) -> (&mut ResourceTable, Option<&mut Call>, Option<Instant>) {
        (&mut self.table, self.call.as_mut(), self.fallback_deadline)
    }

    /// Starts serving an activation: its context, deadline, input items, and output.
    fn begin(&mut self, ctx: &Context, timeout: Duration, inputs: impl Iterator<Item = Item>) {
        // Nothing of an earlier activation (another job, perhaps) may leak into this one.
        self.stdout.begin(ctx.handle());
        self.stderr.begin(ctx.handle());
        let mut items = std::mem::take(&mut self.spare_inputs);
        items.extend(inputs);
        self.output_wait.store(0, Ordering::Relaxed);
        self.call = Some(Call {
            ctx: ctx.handle(),
            started: Instant::now(),
            host_time: Duration::ZERO,
            output_wait: self.output_wait.clone(),
            timeout,
            timed_out: false,
            inputs: Inputs::new(items),
            failure: None,
            hostcall_fuel: hostcall_fuel(ctx.budgets()),
        });
    }

    /// Ends the activation: forwards the rest of its output and returns its record.
    fn end(&mut self) -> Option<Call> {
        self.stdout.finish();
        self.stderr.finish();
        let mut call = self.call.take()?;
        // The items are let go now; the list's memory serves the next activation unless a
        // huge batch made it large.
        let mut items = std::mem::take(&mut call.inputs.items);
        items.clear();
        if items.capacity() <= MAX_SPARE_INPUTS {
            self.spare_inputs = items;
        }
        Some(call)
    }
}

/// Builds a new Store for `inner`'s plugin, with the sandbox of `limits`.
pub(crate) fn new_store(
    inner: &PluginInner,
    limits: &Limits,
    meter: Option<Arc<Meter>>,
) -> wasmtime::Result<Store<StoreData>> {
    let data = StoreData::new(limits, &inner.permissions, meter)?;
    let mut store = Store::new(inner.engine.engine(), data);
    store.limiter(|d| &mut d.limits);
    // Each epoch tick checks the activation's budget; time spent waiting in `emit` is not
    // charged. Outside an activation (instantiation, `describe`) the default budget applies.
    let fallback = limits.timeout;
    let created = Instant::now();
    store.epoch_deadline_callback(move |mut ctx| {
        let data = ctx.data_mut();
        let (spent, budget, halted) = match &data.call {
            Some(c) => (c.spent(), c.timeout, c.ctx.job_halted()),
            None => (created.elapsed(), fallback, false),
        };
        if halted {
            // The job failed or was cancelled: stop its guest now.
            return Ok(UpdateDeadline::Interrupt);
        }
        if spent >= budget {
            if let Some(c) = &mut data.call {
                c.timed_out = true;
            }
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
    store.set_epoch_deadline(1);
    if inner.engine.fuel_enabled() {
        store.set_fuel(limits.fuel.unwrap_or(u64::MAX))?;
    }
    Ok(store)
}

/// Longest `log` message kept whole.
const MAX_LOG_BYTES: usize = 16 * 1024;

fn no_call() -> String {
    "only available while an activation runs".to_owned()
}

impl bindings::v4::routilux::plugin::types::Host for StoreData {}

impl bindings::Host for StoreData {
    fn emit(&mut self, event: String, payload: String) -> Result<(), String> {
        let call = self.call.as_mut().ok_or_else(no_call)?;
        if call.ctx.job_halted() {
            return Err(format!("job {} has halted", call.ctx.job_id()));
        }
        let item = match call.inputs.forwarded(&payload) {
            Some(item) => item,
            None => {
                // Measured before it is even validated.
                let budget = call.ctx.item_budget();
                if payload.len() as u64 > budget {
                    let e = EmitError::TooLarge {
                        routine: call.ctx.routine_id().to_owned(),
                        event: crate::model::budget::cut(event, 128),
                        size: payload.len() as u64,
                        budget,
                    };
                    return Err(call.fail_with(e.into()));
                }
                Item::from_json_text(payload).map_err(|e| e.to_string())?
            }
        };
        // Time spent waiting for room is not the guest's, even when the emit then fails.
        let result = call
            .ctx
            .emit_item_waiting(&event, item, &mut call.host_time);
        match result {
            Ok(()) => Ok(()),
            // Over a budget: the activation fails, whatever the guest does with the error.
            Err(
                e @ (EmitError::TooLarge { .. }
                | EmitError::TooLargeForSlot { .. }
                | EmitError::Overrun { .. }
                | EmitError::QuotaSpent { .. }),
            ) => Err(call.fail_with(e.into())),
            Err(e) => Err(e.to_string()),
        }
    }

    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => tracing::Level::TRACE,
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        if let Some(call) = &self.call {
            let mut message = message;
            if message.len() > MAX_LOG_BYTES {
                let mut end = MAX_LOG_BYTES;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
                message.push_str(" [truncated]");
            }
            // Time spent handing the line on (a slow terminal) is not the guest's.
            let started = Instant::now();
            call.ctx.log(level, message);
            let waited = started.elapsed();
            if let Some(call) = &mut self.call {
                call.host_time += waited;
            }
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        let call = self.call.as_ref()?;
        call.ctx.config(&key).map(Value::to_string)
    }

    fn state_get(&mut self, key: String) -> Option<String> {
        let call = self.call.as_ref()?;
        call.ctx.state().get_text(&key)
    }

    fn state_set(&mut self, key: String, value: String) -> Result<(), String> {
        let call = self.call.as_mut().ok_or_else(no_call)?;
        let result = call.ctx.state().set_text(&key, value);
        result.map_err(|e| call.fail_with(e.into()))
    }

    fn state_add(&mut self, key: String, delta: i64) -> Result<i64, String> {
        let call = self.call.as_mut().ok_or_else(no_call)?;
        let result = call.ctx.state().add(&key, delta);
        result.map_err(|e| call.fail_with(e.into()))
    }

    fn state_compare_and_swap(
        &mut self,
        key: String,
        expected: Option<String>,
        value: String,
    ) -> Result<bool, String> {
        let call = self.call.as_mut().ok_or_else(no_call)?;
        let result = {
            let state = call.ctx.state();
            match expected {
                // Nothing larger than a value's budget can be stored, so nothing stored
                // equals it: no need to parse it.
                Some(t) if t.len() as u64 > state.budget_of_value() => Ok(false),
                Some(t) => match serde_json::from_str::<Value>(&t) {
                    Ok(v) => state.compare_and_swap_text(&key, Some(&v), value),
                    Err(e) => {
                        return Err(format!(
                            "state `{key}`: the expected value is not JSON: {e}"
                        ));
                    }
                },
                None => state.compare_and_swap_text(&key, None, value),
            }
        };
        result.map_err(|e| call.fail_with(e.into()))
    }

    fn job_id(&mut self) -> String {
        self.call
            .as_ref()
            .map(|c| c.ctx.job_id().to_string())
            .unwrap_or_default()
    }

    fn activation_id(&mut self) -> String {
        self.call
            .as_ref()
            .map(|c| c.ctx.activation_id())
            .unwrap_or_default()
    }
}

/// A slot's items as one JSON array text and the ends of the items in it.
type ItemArray = (String, Vec<u32>);

/// Array buffers kept per thread, at most this many and this large, so building the arrays
/// of an activation rarely allocates (activations nest on a thread while an emit waits, so
/// it is a pool, not one buffer).
const SPARE_ARRAYS: usize = 2;
const SPARE_ARRAY_BYTES: usize = 1 << 20;

thread_local! {
    static ARRAYS: RefCell<Vec<ItemArray>> = const { RefCell::new(Vec::new()) };
}

/// Buffers back to this thread's pool (emptied; the largest are let go).
fn return_arrays(arrays: Vec<ItemArray>) {
    ARRAYS.with(|pool| {
        let mut pool = pool.borrow_mut();
        for (mut text, mut ends) in arrays {
            if pool.len() < SPARE_ARRAYS && text.capacity() <= SPARE_ARRAY_BYTES {
                text.clear();
                ends.clear();
                pool.push((text, ends));
            }
        }
    });
}

/// `items` as one JSON array text, and where each item's text ends in it, built in a buffer
/// of this thread's pool; `None` if the text would be longer than a guest can address
/// (4 GiB).
fn item_array(items: &[Item]) -> Option<ItemArray> {
    let len = items.iter().map(|i| i.json_str().len() + 1).sum::<usize>() + 1;
    u32::try_from(len).ok()?;
    let (mut text, mut ends) = ARRAYS
        .with(|pool| pool.borrow_mut().pop())
        .unwrap_or_default();
    text.reserve(len.max(2));
    ends.reserve(items.len());
    text.push('[');
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push_str(item.json_str());
        ends.push(u32::try_from(text.len()).ok()?);
    }
    text.push(']');
    Some((text, ends))
}

/// Idle instances kept per routine and job; more are dropped when they come back.
const MAX_IDLE: usize = 8;

/// An instance checked out of a pool. Whatever happens to the activation — a trap, or a
/// host-side panic unwinding through it — the pool's count is settled on drop: an instance
/// not explicitly returned is discarded.
struct Checked<'a> {
    logic: &'a WasmLogic,
    pool: JobId,
    inst: Option<Instance>,
}

impl<'a> Checked<'a> {
    fn new(logic: &'a WasmLogic, pool: JobId, inst: Instance) -> Self {
        crate::model::slots::checked_out(logic.key(), inst.slot.as_ref());
        Self {
            logic,
            pool,
            inst: Some(inst),
        }
    }

    fn get(&mut self) -> &mut Instance {
        self.inst.as_mut().expect("checked out")
    }

    /// Back to the pool, healthy.
    fn checkin(mut self) {
        if let Some(inst) = self.inst.take() {
            self.logic.checkin(self.pool, inst);
        }
    }
}

impl Drop for Checked<'_> {
    fn drop(&mut self) {
        // (Checkouts on one stack end innermost first, unwinding included.)
        crate::model::slots::checked_in();
        if let Some(inst) = self.inst.take() {
            self.logic.discard(self.pool, inst);
        }
    }
}

/// One live instance: its Store and its bindings.
struct Instance {
    store: Store<StoreData>,
    bindings: bindings::PluginBindings,
    activations: u64,
    /// The last policy message and its JSON text: a routine's built-in policy hands the same
    /// `Arc` to every activation, so it is serialised once per instance, not per activation.
    message: Option<(Arc<Value>, String)>,
    /// Its hold on its group's live-instance quota, if the group has one (given back when
    /// the instance drops, after its store).
    slot: Option<Slot>,
}

/// The instances of one routine serving one job (or, with `reuse_across_jobs`, every job of
/// one group).
struct Pool {
    idle: Vec<Instance>,
    /// Instances of this pool alive (idle or checked out).
    live: usize,
    /// The group of the job(s) it serves.
    group: usize,
}

/// The pool that serves every job of `group` when instances are reused across jobs (job ids
/// count up from 1: they never reach these).
fn shared_pool(group: usize) -> JobId {
    JobId(u64::MAX - group as u64)
}

/// Pools by job id. Job ids are distinct integers handed out in order: they need no mixing,
/// and SipHash would be most of the cost of a checkout (two lookups per activation).
type Pools = HashMap<JobId, Pool, std::hash::BuildHasherDefault<IdHasher>>;

/// A hasher that passes a job id through.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The logic of a routine whose kind comes from a plugin.
pub(crate) struct WasmLogic {
    /// Itself, for the registries of idle instances (its group's and its engine's).
    me: Weak<WasmLogic>,
    plugin: Arc<PluginInner>,
    kind: String,
    limits: Limits,
    /// Instances by the job they serve: guest memory never carries from one job to the next
    /// (unless `reuse_across_jobs`), and a job's instances are dropped when it ends.
    pools: Mutex<Pools>,
    returned: Condvar,
}

impl WasmLogic {
    /// A routine's logic, registered with its engine (which may ask it to drop an idle
    /// instance when the engine has its most).
    pub(crate) fn new(plugin: Arc<PluginInner>, kind: &str, limits: Limits) -> Arc<Self> {
        let logic = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            plugin,
            kind: kind.to_owned(),
            limits,
            pools: Mutex::new(Pools::default()),
            returned: Condvar::new(),
        });
        logic.plugin.engine.register_idle(logic.idle_ref());
        logic
    }

    fn idle_ref(&self) -> Weak<dyn Idle> {
        self.me.clone()
    }

    fn pool_of(&self, ctx: &Context) -> JobId {
        if self.limits.reuse_across_jobs {
            shared_pool(ctx.group())
        } else {
            ctx.job_id()
        }
    }

    fn checkout(&self, ctx: &Context) -> Result<Checked<'_>, RoutineError> {
        let deadline = Instant::now() + self.limits.timeout.min(Duration::from_secs(3600));
        let key = self.pool_of(ctx);
        let group = ctx.group();
        let meter = ctx.job_meter();
        // An activation of this routine suspended lower on this thread's stack (a blocked emit
        // running other work) holds an instance that cannot come back before we return:
        // never wait for the pool then, go past the cap by this nesting instead.
        let nested = crate::model::slots::holds(self.key());
        let mut pools = self.pools.lock();
        loop {
            let pool = pools.entry(key).or_insert_with(|| Pool {
                idle: Vec::new(),
                live: 0,
                group,
            });
            while let Some(mut inst) = pool.idle.pop() {
                // A shared instance moves its memory onto the job it now serves.
                if inst.store.data_mut().limits.move_to(meter) {
                    return Ok(Checked::new(self, key, inst));
                }
                pool.live -= 1;
                self.plugin.engine.instance_dropped();
            }
            if nested || pool.live < self.limits.max_instances {
                pool.live += 1;
                drop(pools);
                let slot = match self.group_slot(ctx, deadline) {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.unreserve(key);
                        return Err(e);
                    }
                };
                if !self.plugin.engine.make_room() {
                    self.unreserve(key);
                    return Err(RoutineError::retryable(format!(
                        "wasm routine `{}`: the engine runs its most instances ({}) already",
                        self.kind,
                        self.plugin.engine.max_instances()
                    )));
                }
                return match self.instantiate(meter) {
                    Ok(mut inst) => {
                        inst.slot = slot;
                        Ok(Checked::new(self, key, inst))
                    }
                    Err(e) => {
                        self.release_slot(key);
                        Err(e)
                    }
                };
            }
            if self.returned.wait_until(&mut pools, deadline).timed_out() {
                return Err(RoutineError::retryable(format!(
                    "wasm routine `{}`: all {} instances stayed busy for {:?}",
                    self.kind, self.limits.max_instances, self.limits.timeout
                )));
            }
        }
    }

    /// A slot of the group's live-instance quota for a new instance (none if the group has
    /// no quota): at once under it, else by having an idle instance of the group dropped,
    /// else waiting for one up to `deadline`. Past the quota when this stack holds one of
    /// the group's instances already (a blocked emit helping), or when an emit waiting for
    /// room holds each of them (see `Slots::take`): they cannot come back before this does.
    fn group_slot(&self, ctx: &Context, deadline: Instant) -> Result<Option<Slot>, RoutineError> {
        let Some(slots) = ctx.instance_slots() else {
            return Ok(None);
        };
        slots.register(&self.idle_ref());
        slots.take(deadline).map(Some).map_err(|busy| {
            RoutineError::retryable(format!(
                "wasm routine `{}`: its tenant's {} live instances (its quota of {}) stayed \
                 busy for {:?}",
                self.kind, busy.live, busy.limit, self.limits.timeout
            ))
        })
    }

    fn instantiate(&self, meter: &Arc<Meter>) -> Result<Instance, RoutineError> {
        let fail = |e: wasmtime::Error| {
            let text = format!("{e:#}");
            // The job's own budget will not grow; the tenant's quota frees as its other jobs
            // let memory go.
            let why = if text.contains(JOB_BUDGET) {
                RoutineError::fatal
            } else {
                RoutineError::retryable
            };
            why(format!(
                "wasm routine `{}` ({}): cannot instantiate: {text}",
                self.kind,
                self.plugin.path.display()
            ))
        };
        let mut store = new_store(&self.plugin, &self.limits, Some(meter.clone())).map_err(fail)?;
        let bindings = self.plugin.pre.instantiate(&mut store).map_err(fail)?;
        Ok(Instance {
            store,
            bindings,
            activations: 0,
            message: None,
            slot: None,
        })
    }

    fn key(&self) -> usize {
        self as *const Self as usize
    }

    /// Returns a healthy instance to its pool (or drops it when it is old or surplus).
    fn checkin(&self, pool: JobId, inst: Instance) {
        if inst.activations >= self.limits.recycle_after {
            self.discard(pool, inst);
            return;
        }
        let slots = inst.slot.as_ref().and_then(Slot::wanted);
        let mut pools = self.pools.lock();
        match pools.get_mut(&pool) {
            Some(p) if p.idle.len() < MAX_IDLE => p.idle.push(inst),
            _ => {
                drop(pools);
                self.discard(pool, inst);
                return;
            }
        }
        drop(pools);
        self.returned.notify_all();
        // A checkout waiting for the group's quota may now have this one dropped.
        if let Some(slots) = slots {
            slots.idle_now();
        }
    }

    /// Takes back a reservation of `pool` that made no instance.
    fn unreserve(&self, pool: JobId) {
        let mut pools = self.pools.lock();
        if let Some(p) = pools.get_mut(&pool) {
            p.live = p.live.saturating_sub(1);
        }
        drop(pools);
        self.returned.notify_all();
    }

    fn discard(&self, pool: JobId, inst: Instance) {
        drop(inst);
        self.release_slot(pool);
    }

    /// One live instance fewer; decremented under the pool lock so a waiter cannot miss it.
    fn release_slot(&self, pool: JobId) {
        let mut pools = self.pools.lock();
        if let Some(p) = pools.get_mut(&pool) {
            p.live = p.live.saturating_sub(1);
        }
        drop(pools);
        self.plugin.engine.instance_dropped();
        self.returned.notify_all();
    }

    fn trap_error(&self, err: &wasmtime::Error, call: &Call, stderr: &[String]) -> RoutineError {
        let file = self.plugin.path.display();
        let (what, retryable) = if call.timed_out {
            (format!("exceeded its deadline of {:?}", call.timeout), true)
        } else {
            match err.downcast_ref::<Trap>() {
                Some(Trap::StackOverflow) => ("overflowed its stack".to_owned(), false),
                Some(Trap::OutOfFuel) => (
                    format!("ran out of fuel ({} units)", self.limits.fuel.unwrap_or(0)),
                    false,
                ),
                Some(Trap::UnreachableCodeReached) => (
                    "trapped: unreachable code (a panic or abort in the guest)".to_owned(),
                    false,
                ),
                Some(Trap::Interrupt) if call.ctx.job_halted() => {
                    ("was stopped: its job halted".to_owned(), false)
                }
                Some(Trap::Interrupt) => ("was interrupted".to_owned(), true),
                Some(trap) => (format!("trapped: {trap}"), false),
                None => {
                    let text = format!("{err:#}");
                    if text.contains("memory limit") {
                        (
                            format!(
                                "exceeded its memory limit of {} MiB",
                                self.limits.memory >> 20
                            ),
                            false,
                        )
                    } else if let Some(i) = text.find(JOB_BUDGET) {
                        (
                            format!(
                                "was stopped by its job's memory budget: {}",
                                &text[i + JOB_BUDGET.len()..]
                            ),
                            false,
                        )
                    } else if let Some(i) = text.find(TENANT_QUOTA) {
                        (
                            format!(
                                "was stopped by its tenant's memory quota: {}",
                                &text[i + TENANT_QUOTA.len()..]
                            ),
                            true,
                        )
                    } else if text.contains("fuel allocated for hostcalls") {
                        (
                            format!(
                                "handed the host more than {} in one call (more than any of \
                                 its budgets lets one value be: item_bytes, \
                                 state_value_bytes, output_bytes)",
                                crate::model::budget::bytes(call.hostcall_fuel as u64)
                            ),
                            false,
                        )
                    } else if text.contains("resource table has no free keys") {
                        (
                            format!(
                                "holds more than {MAX_RESOURCES} live resources (pollables, \
                                 streams, files): the most an instance may"
                            ),
                            false,
                        )
                    } else if text.contains("requested len") && text.contains("exceeds limit") {
                        (
                            format!(
                                "asked for more than {} random bytes in one call",
                                crate::model::budget::bytes(MAX_RANDOM_BYTES)
                            ),
                            false,
                        )
                    } else {
                        (format!("failed: {text}"), false)
                    }
                }
            }
        };
        let mut message = format!("wasm routine `{}` ({file}) {what}", self.kind);
        if let Some(i) = stderr.iter().rposition(|l| l.contains("panicked at")) {
            let detail: Vec<&str> = stderr[i..].iter().take(2).map(String::as_str).collect();
            message.push_str(&format!(" — guest: {}", detail.join(" ")));
        }
        RoutineError { message, retryable }
    }
}

impl Idle for WasmLogic {
    fn evict_one(&self, group: Option<usize>) -> Option<Option<Slot>> {
        let mut pools = self.pools.lock();
        let mut inst = pools.values_mut().find_map(|p| {
            let i = match group {
                // Only one holding a slot of the group frees one.
                Some(g) if p.group == g => p.idle.iter().rposition(|i| i.slot.is_some())?,
                Some(_) => return None,
                None => p.idle.len().checked_sub(1)?,
            };
            p.live -= 1;
            Some(p.idle.swap_remove(i))
        })?;
        drop(pools);
        let slot = inst.slot.take();
        drop(inst);
        self.plugin.engine.instance_dropped();
        self.returned.notify_all();
        Some(slot)
    }
}

impl Drop for WasmLogic {
    /// Its idle instances leave the engine's count with it.
    fn drop(&mut self) {
        for pool in self.pools.get_mut().values() {
            for _ in &pool.idle {
                self.plugin.engine.instance_dropped();
            }
        }
    }
}

impl Logic for WasmLogic {
    /// Drops the job's instances: its guests' memory goes with it.
    fn job_finished(&self, job: JobId) {
        if self.limits.reuse_across_jobs {
            return;
        }
        let pool = self.pools.lock().remove(&job);
        if let Some(pool) = pool {
            for _ in 0..pool.idle.len() {
                self.plugin.engine.instance_dropped();
            }
            drop(pool);
        }
    }

    fn activate(&self, ctx: &Context, batch: &Batch) -> Result<(), RoutineError> {
        // Each slot's items go to the guest as one JSON array text and the ends of the items
        // in it: one copy into the guest per slot, not one per item.
        let arrays = batch
            .slots()
            .map(|(slot, items)| {
                item_array(items).ok_or_else(|| {
                    RoutineError::fatal(format!(
                        "wasm routine `{}`: the {} items of slot `{slot}` are more JSON than a \
                         guest can address (4 GiB)",
                        self.kind,
                        items.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batches: Vec<bindings::SlotBatch<'_>> = batch
            .slots()
            .zip(&arrays)
            .map(|((slot, _), (items, ends))| bindings::SlotBatch { slot, items, ends })
            .collect();
        let mut checked = match self.checkout(ctx) {
            Ok(checked) => checked,
            Err(e) => {
                drop(batches);
                return_arrays(arrays);
                return Err(e);
            }
        };
        let inst = checked.get();
        let message = match batch.message_arc() {
            None => None,
            Some(m) => {
                if !inst
                    .message
                    .as_ref()
                    .is_some_and(|(cached, _)| Arc::ptr_eq(cached, m))
                {
                    inst.message = Some((m.clone(), m.to_string()));
                }
                inst.message.as_ref().map(|(_, text)| text.as_str())
            }
        };
        let inputs = batch.slots().flat_map(|(_, items)| items.iter().cloned());
        inst.store
            .data_mut()
            .begin(ctx, self.limits.timeout, inputs);
        inst.store.set_epoch_deadline(1);
        // No host call may copy more out of the guest than the largest value a budget lets
        // it hand over (wasmtime's default would let one call take 128 MiB of host memory).
        inst.store.set_hostcall_fuel(hostcall_fuel(ctx.budgets()));
        if let Some(fuel) = self.limits.fuel
            && self.plugin.engine.fuel_enabled()
        {
            let _ = inst.store.set_fuel(fuel);
        }
        let result = inst
            .bindings
            .call_activate(&mut inst.store, &self.kind, &batches, message);
        drop(batches);
        return_arrays(arrays);
        inst.activations += 1;
        let mut call = inst.store.data_mut().end().expect("the call began above");
        match result {
            Ok(Ok(())) => {
                checked.checkin();
                call.failure.take().map_or(Ok(()), Err)
            }
            Ok(Err(ActivationError { message, retryable })) => {
                checked.checkin();
                // A budget the guest went over is the reason, whatever it reported.
                Err(call
                    .failure
                    .take()
                    .unwrap_or(RoutineError { message, retryable }))
            }
            Err(err) => {
                // A trap poisons the whole Store: this instance is done (dropping `checked`
                // discards it).
                let tail = inst.store.data().stderr.take_tail();
                Err(self.trap_error(&err, &call, &tail))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(text: &str) -> Item {
        Item::from_json_text(text).expect("valid")
    }

    #[test]
    fn forwarding_finds_inputs_in_order_within_the_lookahead() {
        let texts: Vec<String> = (0..8).map(|i| format!("{{\"id\":{i}}}")).collect();
        let mut inputs = Inputs::new(texts.iter().map(|t| item(t)).collect());
        // In order, then skipping two (a filter), then a text that is no input.
        assert_eq!(
            inputs.forwarded(&texts[0]).map(|i| i.json_str().to_owned()),
            Some(texts[0].clone())
        );
        assert_eq!(
            inputs.forwarded(&texts[3]).map(|i| i.json_str().to_owned()),
            Some(texts[3].clone())
        );
        assert!(inputs.forwarded(r#"{"id":99}"#).is_none());
        // An earlier input again (emitted twice) is behind the cursor: validated as new.
        assert!(inputs.forwarded(&texts[1]).is_none());
        // Past the lookahead from the cursor (at 4): 4..8 is the window, so 7 is found...
        assert!(inputs.forwarded(&texts[7]).is_some());
        // ...and nothing is left after it.
        assert!(inputs.forwarded(&texts[5]).is_none());
        // Same JSON, other spelling: not the same text, so not forwarded.
        let mut inputs = Inputs::new(vec![item(r#"{"a": 1}"#)]);
        assert!(inputs.forwarded(r#"{"a":1}"#).is_none());
        assert!(inputs.forwarded(r#"{"a": 1}"#).is_some());
    }

    #[test]
    fn forwarding_looks_no_further_than_the_lookahead() {
        let texts: Vec<String> = (0..10).map(|i| format!("{{\"id\":{i}}}")).collect();
        let mut inputs = Inputs::new(texts.iter().map(|t| item(t)).collect());
        assert!(inputs.forwarded(&texts[FORWARD_LOOKAHEAD]).is_none());
        assert!(inputs.forwarded(&texts[FORWARD_LOOKAHEAD - 1]).is_some());
    }
}
