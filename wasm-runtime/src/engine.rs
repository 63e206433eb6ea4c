//! The wasmtime [`Engine`]: how a [`HostConfig`] becomes wasmtime's configuration, the pooling
//! allocator's sizing ([`PoolingConfig::plan`]), the engine's compatibility hash that names the
//! cache subdirectory, and the thread that ticks the epoch (the time slice of every guest).

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Weak;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::host::HostInner;
use crate::{Error, WASM_PAGE_SIZE};

/// Configuration of a [`WasmHost`](crate::WasmHost).
///
/// Address-space defaults (when every memory field is `None`) are wasmtime's: each linear memory
/// reserves 4 GiB plus a 32 MiB guard region of virtual address space on 64-bit hosts (so bounds
/// checks are elided), and 10 MiB plus a 64 KiB guard on 32-bit hosts. Reservations are virtual
/// address space, not RAM; on small or 32-bit boards set `max_memory_per_instance` or `pooling`.
/// Changing any of these fields changes the engine's compatibility hash and therefore uses a
/// fresh subdirectory of the compile cache.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Root of the on-disk compile cache; created if missing.
    pub cache_dir: PathBuf,
    /// How often the engine epoch advances, i.e. the time slice of a running guest and the
    /// granularity of [`Limits::cpu_time`](crate::Limits::cpu_time).
    pub epoch_tick: Duration,
    /// Upper bound on the linear memory of any one instance (all its memories together), on top
    /// of the per-run [`Limits::memory_bytes`](crate::Limits::memory_bytes). When set and
    /// `memory_reservation` is `None`, each linear memory reserves only this much address space
    /// (rounded up to 64 KiB pages) instead of wasmtime's 4 GiB. Default `None`.
    pub max_memory_per_instance: Option<u64>,
    /// Address space reserved up front for each linear memory ([`Config::memory_reservation`]).
    /// Smaller values cost explicit bounds checks in compiled code. Default `None` (wasmtime's
    /// default, see above; or `max_memory_per_instance` when that is set).
    pub memory_reservation: Option<u64>,
    /// Guard region after each linear memory ([`Config::memory_guard_size`]). Default `None`
    /// (wasmtime's default: 32 MiB on 64-bit, 64 KiB on 32-bit hosts).
    pub memory_guard_size: Option<u64>,
    /// Use wasmtime's pooling allocator with everything preallocated for a fixed number of
    /// concurrent instances within a memory budget; see [`PoolingConfig`]. Default `None`: the
    /// on-demand allocator, which reserves memory per instance at instantiation time.
    pub pooling: Option<PoolingConfig>,
    /// Compile with fuel metering so that [`Limits::fuel`](crate::Limits::fuel) can be used. Off by default because
    /// metering instruments every compiled function and slows down all guests of this host.
    pub fuel: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            cache_dir: std::env::temp_dir().join("flotilla-wasm-cache"),
            epoch_tick: Duration::from_millis(10),
            max_memory_per_instance: None,
            memory_reservation: None,
            memory_guard_size: None,
            pooling: None,
            fuel: false,
        }
    }
}

/// Pooling allocator sizing: at most `total_instances` instances (module runs, component runs
/// and HTTP requests together) exist at once, and their linear memories together never reserve
/// more than `total_memory_bytes` of address space.
///
/// Each instance gets one linear-memory slot of `total_memory_bytes / total_instances` bytes,
/// rounded down to whole 64 KiB pages, followed by `memory_guard_bytes` of inaccessible guard
/// region. With 4 GiB slots and a guard (as `wasmtime serve` uses) compiled code elides bounds
/// checks; with smaller slots or no guard it checks bounds explicitly, which costs a little
/// speed and saves address space on small boards. Programs with more than one linear memory (rare: Rust, C and Go guests have one)
/// cannot be instantiated. Instantiating beyond `total_instances` fails with
/// [`Error::Instantiate`]. Tables and async stacks are pooled too and reserve a few MiB more; see
/// [`PoolingPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolingConfig {
    pub total_instances: u32,
    pub total_memory_bytes: u64,
    /// Guard region after each slot (address space only); 0 for none.
    pub memory_guard_bytes: u64,
}

/// What a [`PoolingConfig`] preallocates, as computed by [`PoolingConfig::plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolingPlan {
    pub total_instances: u32,
    /// Largest linear memory one instance may have (also its address-space reservation).
    pub max_memory_per_instance: u64,
    /// Guard region after each slot.
    pub memory_guard_bytes: u64,
    /// Address space reserved for all linear memories and their guards:
    /// `total_instances * (max_memory_per_instance + memory_guard_bytes)`.
    pub reserved_memory_bytes: u64,
    /// Address space reserved for wasm tables (pointer-sized elements).
    pub reserved_table_bytes: u64,
    /// Address space reserved for async execution stacks.
    pub reserved_stack_bytes: u64,
}

impl PoolingPlan {
    /// Memories, tables and stacks together.
    pub fn total_reserved_bytes(&self) -> u64 {
        self.reserved_memory_bytes.saturating_add(self.reserved_table_bytes).saturating_add(self.reserved_stack_bytes)
    }
}

/// Core wasm instances one component instance may contain (main module, the preview 1 adapter
/// and wit-component's shim and fixup modules: 4 or 5 for typical Rust guests).
const POOL_CORE_INSTANCES_PER_INSTANCE: u32 = 16;
/// Tables one component instance may contain (one per core module that defines one).
const POOL_TABLES_PER_INSTANCE: u32 = 8;
/// Largest table (e.g. a Rust guest's indirect function table) under pooling.
const POOL_TABLE_ELEMENTS: usize = 20_000;
/// wasmtime's default async (fiber) stack size, used for every running instance.
const ASYNC_STACK_BYTES: u64 = 2 << 20;

impl PoolingConfig {
    /// Computes the per-instance memory and the address space the pool will reserve.
    pub fn plan(&self) -> Result<PoolingPlan, Error> {
        if self.total_instances == 0 {
            return Err(Error::Config { reason: "pooling total_instances must be at least 1".into() });
        }
        let instances = u64::from(self.total_instances);
        let per_instance = self.total_memory_bytes / instances / WASM_PAGE_SIZE * WASM_PAGE_SIZE;
        if per_instance == 0 {
            return Err(Error::Config {
                reason: format!(
                    "pooling memory budget of {} bytes for {} instances leaves less than one 64 KiB page per instance",
                    self.total_memory_bytes, self.total_instances
                ),
            });
        }
        if usize::try_from(per_instance).is_err() {
            return Err(Error::Config {
                reason: format!(
                    "pooling memory of {per_instance} bytes per instance does not fit this host's address space"
                ),
            });
        }
        let pointer = std::mem::size_of::<usize>() as u64;
        let page = 4096;
        let guard = self.memory_guard_bytes.next_multiple_of(page);
        Ok(PoolingPlan {
            total_instances: self.total_instances,
            max_memory_per_instance: per_instance,
            memory_guard_bytes: guard,
            reserved_memory_bytes: per_instance.saturating_add(guard).saturating_mul(instances),
            reserved_table_bytes: instances
                * u64::from(POOL_TABLES_PER_INSTANCE)
                * (POOL_TABLE_ELEMENTS as u64 * pointer).next_multiple_of(page),
            // Each stack has a guard page below it.
            reserved_stack_bytes: instances * (ASYNC_STACK_BYTES + page),
        })
    }
}

/// Translates the host configuration into wasmtime's.
pub(crate) fn engine_config(cfg: &HostConfig) -> Result<(Config, Option<PoolingPlan>), Error> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(cfg.fuel);

    let plan = cfg.pooling.map(|p| p.plan()).transpose()?;
    match plan {
        Some(plan) => {
            let n = plan.total_instances;
            let slot = cfg.max_memory_per_instance.map_or(plan.max_memory_per_instance, |max| {
                (max.next_multiple_of(WASM_PAGE_SIZE)).min(plan.max_memory_per_instance)
            });
            let slot_usize = usize::try_from(slot).unwrap_or(usize::MAX);
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(n)
                .total_core_instances(n.saturating_mul(POOL_CORE_INSTANCES_PER_INSTANCE))
                .max_core_instances_per_component(POOL_CORE_INSTANCES_PER_INSTANCE)
                .total_memories(n)
                .max_memories_per_module(1)
                .max_memories_per_component(1)
                .max_memory_size(slot_usize)
                .total_tables(n.saturating_mul(POOL_TABLES_PER_INSTANCE))
                .max_tables_per_component(POOL_TABLES_PER_INSTANCE)
                .table_elements(POOL_TABLE_ELEMENTS)
                .total_stacks(n)
                .total_gc_heaps(n);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            // Each memory slot is exactly its maximum size plus the planned guard, never more.
            config.memory_reservation(slot);
            config.memory_guard_size(plan.memory_guard_bytes);
            config.memory_reservation_for_growth(0);
            config.guard_before_linear_memory(false);
        }
        None => {
            let reservation =
                cfg.memory_reservation.or(cfg.max_memory_per_instance.map(|m| m.next_multiple_of(WASM_PAGE_SIZE)));
            if let Some(bytes) = reservation {
                config.memory_reservation(bytes);
                if cfg.max_memory_per_instance.is_some() {
                    // Memories never grow past the cap, so relocation headroom is useless.
                    config.memory_reservation_for_growth(0);
                }
            }
            if let Some(bytes) = cfg.memory_guard_size {
                config.memory_guard_size(bytes);
            }
        }
    }
    Ok((config, plan))
}

pub(crate) fn epoch_ticker(host: Weak<HostInner>, tick: Duration) {
    let mut next = Instant::now() + tick;
    loop {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            // Woken early by `HostInner::drop` (or spuriously): stop if the host is gone.
            if host.strong_count() == 0 {
                return;
            }
            continue;
        }
        next += tick;
        if next < now {
            // We fell far behind (e.g. the machine was suspended); do not burst.
            next = now + tick;
        }
        match host.upgrade() {
            Some(host) => host.engine.increment_epoch(),
            None => return,
        }
    }
}

/// Feeds `Hash` output into sha256 so the directory name is stable across Rust releases.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

pub(crate) fn engine_hash_hex(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..16])
}
