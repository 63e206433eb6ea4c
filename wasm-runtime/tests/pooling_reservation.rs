//! The pooling allocator must not reserve gigabytes of address space on a small board. This is
//! its own test binary with a single test so that nothing else maps memory while it measures.

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

#[test]
fn pooling_host_reserves_no_more_than_its_512_mib_budget() {
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
    // plus a little for the epoch thread's stack and allocator arenas.
    assert!(grown >= plan.reserved_memory_bytes, "grew by {grown} bytes, plan {plan:?}");
    assert!(grown <= plan.total_reserved_bytes() + 96 * MIB, "grew by {} MiB, plan {plan:?}", grown / MIB);
}
