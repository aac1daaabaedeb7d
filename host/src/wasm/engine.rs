//! The WebAssembly engine: one wasmtime `Engine` and `Linker` shared by every plugin, the
//! epoch ticker that enforces deadlines, and loading (with the compiled-component cache).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, OptLevel};

use super::bindings;
use super::cache;
use super::deadline::HasGuardedPoll;
use super::error::LoadError;
use super::instance::{Limits, Permissions, StoreData};
use super::plugin::{self, Plugin};
use crate::model::slots::Idle;

/// The largest component file loaded (a Python component is 18-40 MB).
pub const MAX_COMPONENT_BYTES: u64 = 512 << 20;

/// Settings of a [`WasmEngine`].
#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Where compiled components are cached; `None`: the default directory (see
    /// [`WasmConfig::default`]).
    pub cache_dir: Option<PathBuf>,
    /// Whether to use the on-disk cache at all.
    pub cache: bool,
    /// Most bytes of compiled components the on-disk cache keeps: past it, the entries used
    /// least recently go (each load marks its entry used). Default 4 GiB.
    pub cache_max_bytes: u64,
    /// Meter fuel (needed for [`Limits::fuel`]; costs 38–54 % for interpreted guests).
    pub fuel: bool,
    /// Limits of routines that set none.
    pub default_limits: Limits,
    /// Epoch tick: the granularity of activation deadlines.
    pub tick: Duration,
    /// Use wasmtime's pooling instance allocator: memory and table slots are reserved once
    /// (virtual address space for 4,000 memories of up to 4 GiB) and reused, the first 128 KiB
    /// of a memory reset in place, instead of mapping and unmapping per instance. Halves the
    /// cost of a fresh Rust or C instance here (BENCHMARKS.md); caps one engine at 2,000 live
    /// component instances and 4,000 memories. Off by default.
    pub pooling: bool,
    /// Most live instances in the engine, of every routine and job together (each routine
    /// also has its own `max_instances` per job). Default 10,000 (2,000 with `pooling`).
    pub max_instances: usize,
}

impl Default for WasmConfig {
    /// Cache on, in `$ROUTILUX_CACHE_DIR`, else `$XDG_CACHE_HOME/routilux`, else
    /// `~/.cache/routilux` (created private to the user; a directory others can write to is
    /// not used); no fuel; default [`Limits`]; a 10 ms tick (at least 1 ms).
    fn default() -> Self {
        Self {
            cache_dir: None,
            cache: true,
            cache_max_bytes: 4 << 30,
            fuel: false,
            default_limits: Limits::default(),
            tick: Duration::from_millis(10),
            pooling: false,
            max_instances: 10_000,
        }
    }
}

/// Counters of an engine's loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WasmStats {
    /// Components compiled by Cranelift.
    pub compiled: u64,
    /// Components loaded from the on-disk cache instead.
    pub cache_hits: u64,
}

pub(crate) struct EngineInner {
    engine: Engine,
    pub(crate) linker: Linker<StoreData>,
    config: WasmConfig,
    cache_dir: Option<PathBuf>,
    compiled: AtomicU64,
    cache_hits: AtomicU64,
    stop: Arc<AtomicBool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
    /// Live instances, against `max_instances`.
    instances: AtomicUsize,
    max_instances: usize,
    /// Every routine's instance pools made on this engine: asked to drop an idle instance
    /// when the engine has its most.
    holders: Mutex<Vec<Weak<dyn Idle>>>,
}

impl EngineInner {
    /// Counts a new instance; false (nothing counted) when the engine has its most.
    pub(crate) fn instance_created(&self) -> bool {
        self.instances
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max_instances).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts a new instance, first dropping an idle one (of any routine, job or tenant:
    /// idle instances are a cache) when the engine has its most; false when all are busy.
    pub(crate) fn make_room(&self) -> bool {
        loop {
            if self.instance_created() {
                return true;
            }
            let holders: Vec<Arc<dyn Idle>> = self
                .holders
                .lock()
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            if !holders.iter().any(|h| h.evict_one(None).is_some()) {
                return false;
            }
        }
    }

    /// Records a routine's instance pools (see `make_room`).
    pub(crate) fn register_idle(&self, holder: Weak<dyn Idle>) {
        let mut holders = self.holders.lock();
        holders.retain(|h| h.strong_count() > 0);
        holders.push(holder);
    }

    pub(crate) fn instance_dropped(&self) {
        let _ = self
            .instances
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    pub(crate) fn max_instances(&self) -> usize {
        self.max_instances
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn fuel_enabled(&self) -> bool {
        self.config.fuel
    }

    pub(crate) fn default_limits(&self) -> &Limits {
        &self.config.default_limits
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.lock().take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Loads plugins and makes routines from them. Cheap to clone (shared).
#[derive(Clone)]
pub struct WasmEngine {
    pub(crate) inner: Arc<EngineInner>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl WasmEngine {
    /// An engine with the given settings; starts its epoch ticker thread.
    pub fn new(config: WasmConfig) -> Result<Self, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        let mut c = Config::new();
        c.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(config.fuel)
            .cranelift_opt_level(OptLevel::Speed)
            .parallel_compilation(true);
        if config.pooling {
            let mut pool = wasmtime::PoolingAllocationConfig::new();
            pool.total_component_instances(2_000)
                .total_core_instances(20_000)
                .total_memories(4_000)
                .total_tables(20_000)
                // Any routine's memory cap fits a slot (a wasm32 memory's most).
                .max_memory_size(4 << 30)
                .max_core_instances_per_component(64)
                .max_memories_per_component(16)
                .max_tables_per_component(64)
                // Reset small memories and tables in place (memset) instead of madvise and a
                // TLB shootdown per instance; batch what is decommitted.
                .linear_memory_keep_resident(128 << 10)
                .table_keep_resident(64 << 10)
                .decommit_batch_size(64);
            c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&c).map_err(engine_err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_err)?;
        // `wasi:io/poll` again, with every wait bounded by the activation's deadline and
        // ended when its job halts (see `deadline`).
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::sync::io::poll::add_to_linker::<_, HasGuardedPoll>(
            &mut linker,
            StoreData::guarded_poll,
        )
        .map_err(engine_err)?;
        linker.allow_shadowing(false);
        bindings::add_to_linker(&mut linker).map_err(engine_err)?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let tick = config.tick.max(Duration::from_millis(1));
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new()
                .name("routilux-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::park_timeout(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| LoadError::Engine(e.to_string()))?
        };
        let cache_dir = config
            .cache
            .then(|| config.cache_dir.clone().or_else(cache::default_dir))
            .flatten()
            .filter(|dir| cache::prepare(dir));
        let max_instances = if config.pooling {
            config.max_instances.min(2_000)
        } else {
            config.max_instances
        };
        Ok(Self {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                config,
                cache_dir,
                compiled: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                stop,
                ticker: Mutex::new(Some(ticker)),
                instances: AtomicUsize::new(0),
                max_instances,
                holders: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Loads a plugin from a `.wasm` component file, with no extra permissions.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Plugin, LoadError> {
        self.load_with(path, Permissions::default())
    }

    /// Loads a plugin granting it `permissions` (read-only directories, environment).
    pub fn load_with(
        &self,
        path: impl AsRef<Path>,
        permissions: Permissions,
    ) -> Result<Plugin, LoadError> {
        use std::io::Read;
        let path = path.as_ref();
        let io = |source| LoadError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            return Err(LoadError::TooLarge {
                path: path.to_owned(),
                detail: "not a regular file (a component is read from a file)".to_owned(),
            });
        }
        let mut bytes = Vec::new();
        file.take(MAX_COMPONENT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_COMPONENT_BYTES {
            return Err(LoadError::TooLarge {
                path: path.to_owned(),
                detail: format!(
                    "larger than {} MiB, the most a component may be",
                    MAX_COMPONENT_BYTES >> 20
                ),
            });
        }
        self.load_bytes(path, &bytes, permissions)
    }

    /// Loads a plugin from bytes; `path` is only used in messages and reports.
    pub fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        permissions: Permissions,
    ) -> Result<Plugin, LoadError> {
        let path = path.to_owned();
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm { path });
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule { path });
        }
        let started = Instant::now();
        let (component, from_cache) = self.compile(&path, bytes)?;
        tracing::debug!(
            path = %path.display(),
            from_cache,
            elapsed = ?started.elapsed(),
            "component ready"
        );
        plugin::open(self, path, component, from_cache, permissions)
    }

    /// Checks and compiles component bytes (through the on-disk cache, if any), without
    /// opening a plugin; `path` is only used in messages. Returns whether it came from the
    /// cache.
    pub(crate) fn compile_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
    ) -> Result<(Component, bool), LoadError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm {
                path: path.to_owned(),
            });
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule {
                path: path.to_owned(),
            });
        }
        self.compile(path, bytes)
    }

    /// A plugin of an already compiled component, named `path` in messages.
    pub(crate) fn open_component(
        &self,
        path: &Path,
        component: Component,
        from_cache: bool,
    ) -> Result<Plugin, LoadError> {
        plugin::open(
            self,
            path.to_owned(),
            component,
            from_cache,
            Permissions::default(),
        )
    }

    fn compile(&self, path: &Path, bytes: &[u8]) -> Result<(Component, bool), LoadError> {
        let inner = &self.inner;
        let entry = inner
            .cache_dir
            .as_ref()
            .map(|dir| cache::entry(dir, &inner.engine, bytes));
        if let Some(entry) = &entry
            && let Some(component) = cache::load(&inner.engine, entry)
        {
            inner.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((component, true));
        }
        let component = Component::new(&inner.engine, bytes).map_err(|e| LoadError::Compile {
            path: path.to_owned(),
            detail: format!("{e:#}"),
        })?;
        inner.compiled.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = &entry {
            cache::store(&component, entry, inner.config.cache_max_bytes);
        }
        Ok((component, false))
    }

    /// How many components this engine compiled, and how many it took from the cache.
    pub fn stats(&self) -> WasmStats {
        WasmStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            cache_hits: self.inner.cache_hits.load(Ordering::Relaxed),
        }
    }

    /// Live instances of every plugin of this engine (each job's, and any shared ones).
    pub fn live_instances(&self) -> usize {
        self.inner.instances.load(Ordering::Relaxed)
    }

    /// The directory of the compiled-component cache, if caching is on.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.cache_dir.as_deref()
    }
}
