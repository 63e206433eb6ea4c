//! Per-store resource limits: the linear-memory cap (a [`ResourceLimiter`] that traps with the
//! numbers), the CPU-time budget counted in epoch ticks while wasm runs, optional fuel, and the
//! epoch time slicing that lets a dropped run future cancel its guest. The memory limiter also
//! keeps the store's [`GuestUsage`] memory count, since it sees every allocation and growth.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{ResourceLimiter, Store, UpdateDeadline};

use crate::usage::GuestUsage;
use crate::wasi::{ComponentState, StoreState};
use crate::{Error, Limits, WasmHost, one_line};

pub(crate) trait HasLimiter {
    fn limiter(&mut self) -> &mut MemoryLimiter;
}

impl HasLimiter for StoreState {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

impl HasLimiter for ComponentState {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

impl WasmHost {
    pub(crate) fn check_limits(&self, limits: &Limits) -> Result<(), Error> {
        match limits.fuel {
            Some(fuel) if !self.inner.fuel => Err(Error::FuelDisabled { fuel }),
            _ => Ok(()),
        }
    }

    /// The limiter of one store, counting its memory into `usage` when there is one.
    pub(crate) fn memory_limiter(&self, limits: &Limits, usage: Option<Arc<GuestUsage>>) -> MemoryLimiter {
        let limit = match (limits.memory_bytes, self.inner.max_memory_per_instance) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        MemoryLimiter::new(limit, usage)
    }

    /// Applies memory, CPU-time and fuel limits and time slicing to a fresh store.
    pub(crate) fn configure_store<T: HasLimiter + 'static>(
        &self,
        store: &mut Store<T>,
        limits: &Limits,
    ) -> Result<(), Error> {
        store.limiter(|s| s.limiter());
        if self.inner.fuel {
            store
                .set_fuel(limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| Error::Engine { reason: format!("cannot set fuel: {}", one_line(&e)) })?;
        }
        store.set_epoch_deadline(1);
        match limits.cpu_time {
            None => store.epoch_deadline_async_yield_and_update(1),
            Some(budget) => {
                // The callback only runs when the deadline passes while wasm code executes, so
                // each call is (at most) one tick of guest CPU time.
                let tick_nanos = self.inner.epoch_tick.as_nanos().max(1);
                let budget_nanos = budget.as_nanos();
                let mut ticks: u128 = 0;
                store.epoch_deadline_callback(move |_| {
                    ticks += 1;
                    if ticks * tick_nanos > budget_nanos {
                        return Err(wasmtime::Error::new(CpuTimeExceeded { limit: budget }));
                    }
                    Ok(UpdateDeadline::Yield(1))
                });
            }
        }
        Ok(())
    }
}

/// The error an epoch-deadline callback raises when [`Limits::cpu_time`] is used up.
#[derive(Debug)]
pub(crate) struct CpuTimeExceeded {
    limit: Duration,
}

impl fmt::Display for CpuTimeExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu time limit of {:?} exceeded", self.limit)
    }
}

impl std::error::Error for CpuTimeExceeded {}

/// Caps the total size of a store's linear memories; exceeding the cap traps. Lives in the
/// store's data, so it is dropped with the store and its memories.
pub(crate) struct MemoryLimiter {
    limit: Option<usize>,
    total: usize,
    before_last_grow: usize,
    /// Where `total` is also counted, for whoever watches the guest's usage.
    usage: Option<Arc<GuestUsage>>,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: Option<u64>, usage: Option<Arc<GuestUsage>>) -> Self {
        MemoryLimiter {
            limit: limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
            total: 0,
            before_last_grow: 0,
            usage,
        }
    }

    /// Moves `total` to `new_total`, keeping the usage count in step.
    fn set_total(&mut self, new_total: usize) {
        if let Some(usage) = &self.usage {
            if new_total >= self.total {
                usage.add_memory((new_total - self.total) as u64);
            } else {
                usage.remove_memory((self.total - new_total) as u64);
            }
        }
        self.total = new_total;
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        // The store, and with it every memory this limiter counted, is going away.
        self.set_total(0);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false); // the module's own maximum: memory.grow returns -1
        }
        let new_total = self.total.saturating_sub(current).saturating_add(desired);
        if let Some(limit) = self.limit
            && new_total > limit
        {
            wasmtime::bail!(
                "memory limit exceeded: guest needs {new_total} bytes of linear memory, limit is {limit} bytes"
            );
        }
        self.before_last_grow = self.total;
        self.set_total(new_total);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // The host could not provide the memory; memory.grow returns -1 to the guest.
        self.set_total(self.before_last_grow);
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}
