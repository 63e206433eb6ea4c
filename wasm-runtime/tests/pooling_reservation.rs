//! The pooling allocator must not reserve gigabytes of address space on a small board. This is
//! its own test binary with a single test so that nothing else maps memory while it measures.
//!
//! glibc gives each new thread that allocates its own malloc arena, a 64 MiB reservation, and
//! how many threads allocate during `WasmHost::new` varies from run to run. So the test runs
//! its measurement in a child process of itself with `MALLOC_ARENA_MAX=1`, where every thread
//! shares the main heap and only the host's own mappings move `VmSize`.

#![cfg(target_os = "linux")]

use flotilla_wasm_runtime::{HostConfig, PoolingConfig, WasmHost};

const MIB: u64 = 1 << 20;

/// Virtual address space of this process (`VmSize`), in bytes.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

const CHILD: &str = "FLOTILLA_POOLING_RESERVATION_CHILD";

#[test]
fn pooling_host_reserves_no_more_than_its_512_mib_budget() {
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["pooling_host_reserves_no_more_than_its_512_mib_budget", "--exact", "--nocapture"])
            .env(CHILD, "1")
            .env("MALLOC_ARENA_MAX", "1")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{text}");
        assert!(out.status.success(), "the measurement failed:\n{text}");
        assert!(text.contains("address space grew by"), "the child did not measure:\n{text}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = HostConfig {
        cache_dir: dir.path().to_path_buf(),
        pooling: Some(PoolingConfig { total_instances: 8, total_memory_bytes: 512 * MIB, memory_guard_bytes: 0 }),
        ..HostConfig::default()
    };
    let before = vm_size();
    let host = WasmHost::new(cfg).unwrap();
    let grown = vm_size().saturating_sub(before);
    eprintln!("address space grew by {} MiB", grown / MIB);
    let plan = host.pooling_plan().unwrap();
    assert_eq!(plan.reserved_memory_bytes, 512 * MIB);
    // The pools are mapped up front: at least the linear-memory slab, and not more than the plan
    // plus a little for the epoch thread's stack and the engine's own allocations.
    assert!(grown >= plan.reserved_memory_bytes, "grew by {grown} bytes, plan {plan:?}");
    assert!(grown <= plan.total_reserved_bytes() + 32 * MIB, "grew by {} MiB, plan {plan:?}", grown / MIB);
}
