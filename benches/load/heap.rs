//! The load bench's global allocator: the product's own, plus a count of live heap bytes that
//! is kept only while scenario (c) or (m) measures. Outside that window each call costs one
//! relaxed load of a flag, the same for every in-process target.
//!
//! The count is the net of the sizes asked for (allocator rounding and fragmentation are not in
//! it; VmRSS beside it has both), so a window's result is the heap its work left allocated.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// The product's allocator, counting live bytes while [`Window`] is open.
pub struct Counted;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

fn add(bytes: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE_BYTES.fetch_add(bytes as i64, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on unchanged to the product's allocator.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        unsafe { finx_gateway::allocator::GLOBAL.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        unsafe { finx_gateway::allocator::GLOBAL.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        unsafe { finx_gateway::allocator::GLOBAL.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        unsafe { finx_gateway::allocator::GLOBAL.realloc(ptr, layout, new_size) }
    }
}

/// An open measuring window; [`Window::close`] gives the net bytes allocated meanwhile, by
/// every thread of the process.
pub struct Window(());

impl Window {
    pub fn open() -> Self {
        LIVE_BYTES.store(0, Ordering::Relaxed);
        COUNTING.store(true, Ordering::SeqCst);
        Self(())
    }

    pub fn close(self) -> i64 {
        COUNTING.store(false, Ordering::SeqCst);
        LIVE_BYTES.load(Ordering::Relaxed)
    }
}
