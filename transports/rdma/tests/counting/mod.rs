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
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The process-wide counting window ([`process_allocations_in`]) in one word, so that an
/// allocation is counted in exactly the window it saw open: bit 63 says a window is open,
/// bits 32..63 number the windows, bits 0..32 count the allocations of the open one. A
/// thread that saw window N open and is preempted before it counts (under load this takes
/// milliseconds) can neither add to N after N was read nor to window N + 1.
static WINDOW: AtomicU64 = AtomicU64::new(0);
const OPEN: u64 = 1 << 63;
const COUNT: u64 = (1 << 32) - 1;
/// Backtraces of the first [`TRACES`] allocations counted in a window: the window's
/// number, the thread's name, the backtrace (captured, symbols resolved only when the
/// window has been read, so that recording is quick and cannot be outrun).
static FIRST: Mutex<Vec<(u64, String, Backtrace)>> = Mutex::new(Vec::new());
const TRACES: u64 = 3;

fn note_allocation() {
    let _ = TRACKING.try_with(|on| {
        if on.get() {
            let _ = THREAD_COUNT.try_with(|n| n.set(n.get() + 1));
        }
    });
    let seen = WINDOW.load(Ordering::SeqCst);
    if seen & OPEN == 0 || RECORDING.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let same = |w: u64| w & !COUNT == seen & !COUNT;
    let Ok(before) = WINDOW.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
        same(w).then_some(w + 1)
    }) else {
        // That window closed meanwhile.
        return;
    };
    if before & COUNT < TRACES {
        RECORDING.with(|r| r.set(true));
        let name = std::thread::current()
            .name()
            .unwrap_or("(unnamed)")
            .to_string();
        let trace = Backtrace::force_capture();
        if let Ok(mut f) = FIRST.lock() {
            f.push((seen & !COUNT & !OPEN, name, trace));
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
/// where the first few came from (thread and backtrace, each of them: a thread still
/// recording one when `f` returns is waited for). Only meaningful when nothing else runs: a
/// test binary with one test.
pub(crate) fn process_allocations_in<R>(f: impl FnOnce() -> R) -> (R, u64, String) {
    if let Ok(mut first) = FIRST.lock() {
        first.clear();
        first.reserve(TRACES as usize);
    }
    // A new window: the next number, open, nothing counted.
    let epoch = (WINDOW.load(Ordering::SeqCst) & !COUNT & !OPEN) + (1 << 32);
    WINDOW.store(epoch | OPEN, Ordering::SeqCst);
    let result = f();
    let count = WINDOW.swap(epoch, Ordering::SeqCst) & COUNT;
    // Every counted allocation among the first TRACES records its trace: wait for them.
    let want = count.min(TRACES) as usize;
    let t0 = std::time::Instant::now();
    let traces = loop {
        let done = FIRST
            .lock()
            .map(|f| f.iter().filter(|t| t.0 == epoch).count())
            .unwrap_or(want);
        if done >= want || t0.elapsed() > std::time::Duration::from_secs(10) {
            break FIRST
                .lock()
                .map(|mut f| std::mem::take(&mut *f))
                .unwrap_or_default();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let first = traces
        .into_iter()
        .filter(|t| t.0 == epoch)
        .map(|(_, name, trace)| format!("thread {name:?}:\n{trace}"))
        .collect::<Vec<_>>()
        .join("\n");
    (result, count, first)
}

/// This process's threads: task id and name (`comm`, at most 15 bytes).
pub(crate) fn threads() -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let Ok(e) = e else { continue };
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Ok(name) = std::fs::read_to_string(e.path().join("comm")) {
            v.push((tid, name.trim_end().to_string()));
        }
    }
    v
}

/// Waits until, for each of `names`, a thread that was not among `before` runs under that
/// name (up to 10 s, then panics naming the missing ones).
///
/// A thread allocates as it starts, in the standard library before its own code runs (the
/// name it keeps for stack-overflow reports); a thread spawned just before a counting
/// window but scheduled only inside it (under load, tens of milliseconds later) is counted
/// there, though no I/O made it. The standard library names the thread (its `comm`) right
/// after that, so a new thread seen with its own name has made those allocations.
pub(crate) fn wait_for_new_threads(before: &[(u32, String)], names: &[&str]) {
    let t0 = std::time::Instant::now();
    loop {
        let now = threads();
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| {
                !now.iter()
                    .any(|(tid, name)| name == n && !before.iter().any(|(b, _)| b == tid))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "threads {missing:?} did not start within 10 s (threads now: {now:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
