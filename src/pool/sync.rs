//! Synchronisation primitives of the pool, swapped for loom's under `--cfg loom` so the
//! hand-written refcount and free-list protocol can be model-checked.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard as MutexGuardCompat};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard as MutexGuardCompat};

/// A bounded multi-producer multi-consumer queue of slot indices.
///
/// Normally crossbeam's lock-free `ArrayQueue`; under loom (which cannot see inside
/// crossbeam's atomics) a mutex-protected deque with the same contract, so the models check
/// our protocol around the queue rather than the queue itself.
#[cfg(not(loom))]
pub(crate) struct SlotQueue(crossbeam_queue::ArrayQueue<u32>);

#[cfg(not(loom))]
impl SlotQueue {
    pub(crate) fn new(cap: usize) -> Self {
        SlotQueue(crossbeam_queue::ArrayQueue::new(cap.max(1)))
    }
    pub(crate) fn push(&self, v: u32) {
        // Capacity equals the number of slots the class may ever create, and a slot is in at
        // most one queue at a time, so a push cannot find the queue full.
        let pushed = self.0.push(v);
        debug_assert!(pushed.is_ok(), "slot queue overflow");
    }
    pub(crate) fn pop(&self) -> Option<u32> {
        self.0.pop()
    }
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(loom)]
pub(crate) struct SlotQueue(loom::sync::Mutex<std::collections::VecDeque<u32>>);

#[cfg(loom)]
impl SlotQueue {
    pub(crate) fn new(_cap: usize) -> Self {
        SlotQueue(loom::sync::Mutex::new(std::collections::VecDeque::new()))
    }
    pub(crate) fn push(&self, v: u32) {
        self.0.lock().unwrap().push_back(v);
    }
    pub(crate) fn pop(&self) -> Option<u32> {
        self.0.lock().unwrap().pop_front()
    }
    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}
