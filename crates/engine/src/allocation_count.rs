//! Counts the process's heap allocations while switched on, so `sluice bench` and the tests
//! can show what a decode step allocates (none after warm-up). A binary opts in with
//! `#[global_allocator] static A: CountingAllocator = CountingAllocator;`. Off, an allocation
//! costs one read of a flag; on, two atomic adds that threads contend for — so counted steps
//! are never the timed ones.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[inline]
fn count(bytes: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Counts the allocations `f` makes (other threads' included).
pub fn counted<T>(f: impl FnOnce() -> T) -> (T, AllocationCount) {
    let before = AllocationCount::now();
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (out, AllocationCount::since(before))
}

/// Allocations (reallocations included) and bytes requested while counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocationCount {
    pub allocations: u64,
    pub bytes: u64,
}

impl AllocationCount {
    fn now() -> Self {
        AllocationCount {
            allocations: ALLOCATIONS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
        }
    }

    fn since(earlier: AllocationCount) -> Self {
        let now = Self::now();
        AllocationCount {
            allocations: now.allocations - earlier.allocations,
            bytes: now.bytes - earlier.bytes,
        }
    }
}
