//! Memory a hostile manifest costs the parser, measured with a counting allocator: a 1 MiB
//! file repeating a large value through aliases is refused without the expansion ever being
//! built. (One test in this binary, so nothing else allocates meanwhile.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: usize = 1024 * 1024;

#[test]
fn a_one_mib_alias_bomb_is_refused_without_building_its_expansion() {
    // A 900 KiB value and 1,000 aliases of it: 880 MiB once expanded (the issue measured
    // 876 MB added to the hub by such a file).
    let big = "x".repeat(900 * 1024);
    let aliases = vec!["*v"; 1_000].join(", ");
    let bomb = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: bomb}}\nspec:\n  runtime: wasm\n  image: r/x:1\n  env: {{A: &v {big}}}\n  args: [{aliases}]\n"
    );
    assert!(bomb.len() < MIB + 64 * 1024);
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let err = flotilla_proto::manifest::parse_manifests(&bomb).err().map(|e| e.to_string());
    let peak = PEAK.load(Ordering::SeqCst) - before;
    eprintln!("refused with peak {} KiB allocated: {err:?}", peak / 1024);
    assert!(err.is_some_and(|e| e.contains("expands past") || e.contains("alias")));
    // The input is 1 MiB; the parser may hold a few copies of the value, not hundreds.
    assert!(peak < 8 * MIB, "{} MiB allocated while refusing a 1 MiB file", peak / MIB);
}
