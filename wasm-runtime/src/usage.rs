//! What guests use: the CPU time spent running their code and the bytes of linear memory their
//! live instances hold, counted into a [`GuestUsage`] that the caller hands in
//! ([`RunOptions::usage`](crate::RunOptions::usage), [`HttpOptions::usage`](crate::HttpOptions::usage))
//! and reads whenever it likes.
//!
//! **CPU time.** Guests do not get threads of their own: wasmtime's async support runs each
//! instance on a fiber stack that is switched to *inside* the `poll` of its run future, on
//! whichever tokio worker polls it, and epoch interruption makes a busy guest yield back to the
//! executor every tick. So the CPU a guest uses is the CPU its future's `poll` calls use.
//! [`Metered`] reads the polling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`) before and after
//! every poll and adds the difference. A thread CPU clock rather than wall time, because the OS
//! may run other threads while the guest is inside a poll (on a busy host that would charge the
//! guest for them); per poll rather than per task, because tokio moves tasks between worker
//! threads between polls. Host calls the guest makes (WASI, writing its output) run inside the
//! poll and are charged to it, which is right: they are its work. Not charged: file I/O that
//! wasmtime-wasi hands to tokio's blocking pool, and work done for the guest outside its poll
//! (hyper parsing its requests, streaming its response bodies).
//!
//! The overhead is two clock reads per poll (a `clock_gettime` system call each; the vDSO does
//! not serve CPU clocks), well under a microsecond together. A running guest is polled once per
//! epoch tick (10 ms by default) and a waiting one once per wake-up, so metering costs far less
//! than 0.1% of a busy guest's time. Runs without a [`GuestUsage`] read no clock at all.
//!
//! **Memory.** Every creation and growth of a store's linear memory passes the store's
//! [`MemoryLimiter`](crate::limits::MemoryLimiter), which adds it here, and gives it all back
//! when the store is dropped; the stores sharing one [`GuestUsage`] (the concurrent requests of
//! one HTTP component) add up. Tables are not counted: their size in bytes depends on wasmtime's
//! internal representation, and they are small next to linear memory.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// CPU time and linear memory of the guests run with it, updated as they run. Share it with
/// `Arc`; reading is two atomic loads.
#[derive(Debug, Default)]
pub struct GuestUsage {
    cpu_nanos: AtomicU64,
    memory_bytes: AtomicU64,
}

impl GuestUsage {
    pub fn new() -> Arc<GuestUsage> {
        Arc::new(GuestUsage::default())
    }

    /// CPU time spent running the guests' code (and the host calls they made) so far; only
    /// grows.
    pub fn cpu_time(&self) -> Duration {
        Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed))
    }

    /// Bytes of linear memory held by the guests' live instances now.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn add_cpu(&self, nanos: u64) {
        self.cpu_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn add_memory(&self, bytes: u64) {
        self.memory_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn remove_memory(&self, bytes: u64) {
        // Saturating: a miscount must not show as 16 EiB.
        let _ = self
            .memory_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| Some(held.saturating_sub(bytes)));
    }
}

/// A clock of the CPU time the current thread has used, in nanoseconds.
pub(crate) trait CpuClock {
    fn now(&self) -> u64;
}

/// `CLOCK_THREAD_CPUTIME_ID`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ThreadCpuClock;

impl CpuClock for ThreadCpuClock {
    fn now(&self) -> u64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        u64::try_from(t.tv_sec).unwrap_or(0).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
    }
}

/// A future that charges the CPU time of each of its polls to a [`GuestUsage`] (see the module
/// docs for why this measures a guest). Without a usage it only forwards the polls.
pub(crate) struct Metered<F, C = ThreadCpuClock> {
    // Boxed so that the wrapper is `Unpin` without pin projection (and without `unsafe`); one
    // allocation per run or request, next to a whole store.
    inner: Pin<Box<F>>,
    usage: Option<Arc<GuestUsage>>,
    clock: C,
}

impl<F: Future> Metered<F> {
    pub(crate) fn new(inner: F, usage: Option<Arc<GuestUsage>>) -> Self {
        Metered::with_clock(inner, usage, ThreadCpuClock)
    }
}

impl<F: Future, C: CpuClock> Metered<F, C> {
    pub(crate) fn with_clock(inner: F, usage: Option<Arc<GuestUsage>>, clock: C) -> Self {
        Metered { inner: Box::pin(inner), usage, clock }
    }
}

impl<F: Future, C: CpuClock + Unpin> Future for Metered<F, C> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Some(usage) = &this.usage else { return this.inner.as_mut().poll(cx) };
        let before = this.clock.now();
        let polled = this.inner.as_mut().poll(cx);
        usage.add_cpu(this.clock.now().saturating_sub(before));
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Instant;

    /// A clock that advances by what the test's future says it "spent" in each poll.
    #[derive(Clone, Default)]
    struct FakeClock(Rc<Cell<u64>>);

    impl CpuClock for FakeClock {
        fn now(&self) -> u64 {
            self.0.get()
        }
    }

    /// Spends `cost[i]` nanoseconds of fake CPU in its `i`th poll, pending until the last.
    struct Spender {
        clock: FakeClock,
        costs: Vec<u64>,
        polls: usize,
    }

    impl Future for Spender {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            let cost = self.costs[self.polls];
            self.clock.0.set(self.clock.0.get() + cost);
            self.polls += 1;
            if self.polls == self.costs.len() {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn each_poll_is_charged_what_it_spent_and_nothing_between_polls() {
        let clock = FakeClock::default();
        let usage = GuestUsage::new();
        let spender = Spender { clock: clock.clone(), costs: vec![5, 0, 1_000, 7], polls: 0 };
        let mut metered = std::pin::pin!(Metered::with_clock(spender, Some(usage.clone()), clock.clone()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(metered.as_mut().poll(&mut cx).is_pending());
        assert_eq!(usage.cpu_time(), Duration::from_nanos(5));
        // Time that passes between polls (other tasks, other guests) is not this guest's.
        clock.0.set(clock.0.get() + 1_000_000);
        assert!(metered.as_mut().poll(&mut cx).is_pending());
        assert!(metered.as_mut().poll(&mut cx).is_pending());
        assert_eq!(metered.as_mut().poll(&mut cx), Poll::Ready(4));
        assert_eq!(usage.cpu_time(), Duration::from_nanos(1_012));
    }

    #[test]
    fn without_a_usage_the_clock_is_not_read() {
        struct Unreadable;
        impl CpuClock for Unreadable {
            fn now(&self) -> u64 {
                panic!("the clock was read");
            }
        }
        let mut metered = std::pin::pin!(Metered::with_clock(async { 3 }, None, Unreadable));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert_eq!(metered.as_mut().poll(&mut cx), Poll::Ready(3));
    }

    #[test]
    fn the_thread_clock_counts_busy_time_and_not_sleep() {
        let usage = GuestUsage::new();
        let busy = async {
            let until = Instant::now() + Duration::from_millis(200);
            let mut x = 0u64;
            while Instant::now() < until {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            std::thread::sleep(Duration::from_millis(200));
            x
        };
        let mut metered = std::pin::pin!(Metered::new(busy, Some(usage.clone())));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(metered.as_mut().poll(&mut cx).is_ready());
        let cpu = usage.cpu_time();
        // 200 ms busy (less if the machine is loaded and the thread waited for a core), and
        // the 200 ms asleep not counted.
        assert!(cpu >= Duration::from_millis(50) && cpu <= Duration::from_millis(260), "{cpu:?}");
    }

    #[test]
    fn memory_adds_up_and_never_goes_below_zero() {
        let usage = GuestUsage::new();
        usage.add_memory(3 << 16);
        usage.add_memory(1 << 16);
        usage.remove_memory(3 << 16);
        assert_eq!(usage.memory_bytes(), 1 << 16);
        usage.remove_memory(5 << 16);
        assert_eq!(usage.memory_bytes(), 0);
    }
}
