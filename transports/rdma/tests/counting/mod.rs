//! Allocation counting for the tests that prove a path allocates nothing: a global
//! allocator (each test binary installs it with `#[global_allocator]`) that forwards to the
//! system allocator and counts, either the allocations of one thread
//! ([`thread_allocations_in`], for a binary whose tests run in parallel) or those of the
//! whole process ([`process_allocations_in`], for a binary with a single test), where it
//! also records where the first few came from.
#![allow(dead_code)] // each binary uses one of the two ways of counting

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The counting allocator.
pub(crate) struct CountingAlloc;

thread_local! {
    /// This thread's allocations are counted ([`thread_allocations_in`]).
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static THREAD_COUNT: Cell<u64> = const { Cell::new(0) };
    /// Set while this thread records a backtrace (which allocates itself).
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

/// Every thread's allocations are counted ([`process_allocations_in`]).
static PROCESS: AtomicBool = AtomicBool::new(false);
static PROCESS_COUNT: AtomicU64 = AtomicU64::new(0);
/// Backtraces of the first [`TRACES`] allocations counted process-wide.
static FIRST: Mutex<Vec<String>> = Mutex::new(Vec::new());
const TRACES: u64 = 3;

fn note_allocation() {
    let _ = TRACKING.try_with(|on| {
        if on.get() {
            let _ = THREAD_COUNT.try_with(|n| n.set(n.get() + 1));
        }
    });
    if !PROCESS.load(Ordering::Relaxed) || RECORDING.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    if PROCESS_COUNT.fetch_add(1, Ordering::Relaxed) < TRACES {
        RECORDING.with(|r| r.set(true));
        let trace = format!(
            "thread {:?}:\n{}",
            std::thread::current().name().unwrap_or("?"),
            Backtrace::force_capture()
        );
        if let Ok(mut f) = FIRST.lock() {
            f.push(trace);
        }
        RECORDING.with(|r| r.set(false));
    }
}

// SAFETY: every method forwards to the system allocator with the caller's arguments
// unchanged. The counting touches atomics and const-initialized thread-locals, which never
// allocate; the few backtraces it records allocate through this same allocator with
// counting off for the recording thread (`RECORDING`).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded with the caller's guarantees for `GlobalAlloc::alloc`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded with the caller's guarantees for `GlobalAlloc::alloc_zeroed`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded with the caller's guarantees for `GlobalAlloc::realloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees for `GlobalAlloc::dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns how many heap allocations this thread made meanwhile.
pub(crate) fn thread_allocations_in<R>(f: impl FnOnce() -> R) -> (R, u64) {
    THREAD_COUNT.with(|n| n.set(0));
    TRACKING.with(|on| on.set(true));
    let result = f();
    TRACKING.with(|on| on.set(false));
    (result, THREAD_COUNT.with(Cell::get))
}

/// Runs `f` and returns how many heap allocations the whole process made meanwhile, with
/// where the first few came from. Only meaningful when nothing else runs: a test binary
/// with one test.
pub(crate) fn process_allocations_in<R>(f: impl FnOnce() -> R) -> (R, u64, String) {
    if let Ok(mut first) = FIRST.lock() {
        first.clear();
        first.reserve(TRACES as usize);
    }
    PROCESS_COUNT.store(0, Ordering::SeqCst);
    PROCESS.store(true, Ordering::SeqCst);
    let result = f();
    PROCESS.store(false, Ordering::SeqCst);
    let first = FIRST
        .lock()
        .map(|mut f| std::mem::take(&mut *f).join("\n"))
        .unwrap_or_default();
    (result, PROCESS_COUNT.load(Ordering::SeqCst), first)
}
