//! [`WasmHost`] itself: the state it shares between clones (engine, linkers, program table,
//! counters, ticker handle), its creation and its accessors. Loading, linking, limits and
//! running are `impl WasmHost` blocks in their own modules.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::{Engine, Linker};

use crate::cache::InFlight;
use crate::engine::{PoolingPlan, engine_config, engine_hash_hex, epoch_ticker};
use crate::wasi::{ComponentState, StoreState};
use crate::{CacheStats, Error, HostConfig, Program, one_line};

/// The wasmtime host: one engine, its linkers, loaded programs and the compile cache.
/// Cloning is cheap and shares everything.
#[derive(Clone)]
pub struct WasmHost {
    pub(crate) inner: Arc<HostInner>,
}

impl fmt::Debug for WasmHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmHost")
            .field("artifact_dir", &self.inner.artifact_dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

pub(crate) struct HostInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<StoreState>,
    pub(crate) component_linker: wasmtime::component::Linker<ComponentState>,
    /// `<cache_dir>/<engine compatibility hash>`: artifacts here deserialize in `engine`.
    pub(crate) artifact_dir: PathBuf,
    /// The (clamped) epoch tick: the unit of CPU-time accounting.
    pub(crate) epoch_tick: Duration,
    /// Engine-wide cap on one instance's linear memory (config or pooling slot size).
    pub(crate) max_memory_per_instance: Option<u64>,
    pub(crate) fuel: bool,
    pub(crate) pooling: Option<PoolingPlan>,
    pub(crate) programs: Mutex<HashMap<String, Program>>,
    /// Digests being loaded right now: the lock their loaders queue on and how many loaders
    /// hold or wait for it.
    pub(crate) loading: Mutex<HashMap<String, InFlight>>,
    pub(crate) compiled: AtomicU64,
    pub(crate) loaded_from_disk: AtomicU64,
    pub(crate) memory_hits: AtomicU64,
    pub(crate) ticker: OnceLock<std::thread::Thread>,
    #[cfg(test)]
    pub(crate) ticker_alive: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        // Wake the ticker so it notices promptly that the host is gone.
        if let Some(thread) = self.ticker.get() {
            thread.unpark();
        }
    }
}

impl WasmHost {
    /// Creates the engine (and, with [`HostConfig::pooling`], its preallocated pools), the cache
    /// directory and the epoch ticker thread.
    pub fn new(cfg: HostConfig) -> Result<Self, Error> {
        let (config, pooling) = engine_config(&cfg)?;
        let engine = Engine::new(&config).map_err(|e| Error::Engine { reason: one_line(&e) })?;

        let mut linker: Linker<StoreState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut StoreState| &mut s.wasi)
            .map_err(|e| Error::Engine { reason: format!("cannot add wasi preview 1 to linker: {e:#}") })?;
        // wasmtime-wasi traps on proc_exit(126..=255) (WASI reserves them); a shell user expects
        // `exit 200` to be status 200, as from a native program, so codes up to 255 are exits.
        linker.allow_shadowing(true);
        linker
            .func_wrap("wasi_snapshot_preview1", "proc_exit", |_: wasmtime::Caller<'_, StoreState>, status: i32| {
                Err::<(), _>(crate::run::proc_exit(status as u32))
            })
            .map_err(|e| Error::Engine { reason: format!("cannot define proc_exit: {e:#}") })?;
        linker.allow_shadowing(false);

        let mut component_linker = wasmtime::component::Linker::<ComponentState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(|e| Error::Engine { reason: format!("cannot add wasi 0.2 to component linker: {e:#}") })?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component_linker)
            .map_err(|e| Error::Engine { reason: format!("cannot add wasi:http to component linker: {e:#}") })?;

        let artifact_dir = cfg.cache_dir.join(engine_hash_hex(&engine));
        std::fs::create_dir_all(&artifact_dir).map_err(|e| Error::io("create cache directory", &artifact_dir, e))?;

        let tick = cfg.epoch_tick.max(Duration::from_micros(100));
        let max_memory_per_instance = match (cfg.max_memory_per_instance, pooling) {
            (Some(max), Some(plan)) => Some(max.min(plan.max_memory_per_instance)),
            (max, plan) => max.or(plan.map(|p| p.max_memory_per_instance)),
        };
        let inner = Arc::new(HostInner {
            engine,
            linker,
            component_linker,
            artifact_dir,
            epoch_tick: tick,
            max_memory_per_instance,
            fuel: cfg.fuel,
            pooling,
            programs: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            loaded_from_disk: AtomicU64::new(0),
            memory_hits: AtomicU64::new(0),
            ticker: OnceLock::new(),
            #[cfg(test)]
            ticker_alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        });

        let weak = Arc::downgrade(&inner);
        #[cfg(test)]
        let alive = inner.ticker_alive.clone();
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                epoch_ticker(weak, tick);
                #[cfg(test)]
                alive.store(false, Ordering::SeqCst);
            })
            .map_err(|error| Error::Ticker { error })?;
        let _ = inner.ticker.set(handle.thread().clone());
        // The thread is detached; it exits once every `WasmHost` clone is gone.
        drop(handle);

        Ok(WasmHost { inner })
    }

    /// Cache counters since this host was created.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.inner.loaded_from_disk.load(Ordering::Relaxed),
            memory_hits: self.inner.memory_hits.load(Ordering::Relaxed),
        }
    }

    /// The pooling allocator's sizing, if [`HostConfig::pooling`] was set.
    pub fn pooling_plan(&self) -> Option<PoolingPlan> {
        self.inner.pooling
    }

    /// Directory holding this engine's compiled artifacts (`<cache_dir>/<engine hash>`).
    pub fn artifact_dir(&self) -> &Path {
        &self.inner.artifact_dir
    }
}
