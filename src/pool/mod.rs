//! The iobuf pool: pre-allocated, page-aligned, registration-aware buffers shared by every
//! transport.
//!
//! # Shape
//! A [`Pool`] has one *class* per configured buffer size. A class owns up to `max_arenas`
//! arenas (anonymous mappings, created lazily up to a bound fixed at construction), each
//! carved into `slots_per_arena` slots of the class size. Free slot indices live in
//! lock-free queues (crossbeam `ArrayQueue`), one per *stripe*: a thread takes from its home
//! stripe and steals from the others only when it is empty, and a slot returns to the stripe
//! it was taken from, so two threads working on one class touch different cache lines. A
//! separate reserve queue holds slots that only [`Priority::Control`] gets may take, so
//! control messages never starve behind data.
//!
//! # Ownership
//! [`IobufMut`] is a unique, writable slot; [`IobufMut::freeze`] turns it into an [`Iobuf`],
//! shared and read-only, refcounted in a per-slot counter (no allocation). The last handle
//! to drop puts the slot back on its queue, from any thread. [`Iobref`] groups the buffers of
//! one message; dropping it returns them all (GlusterFS's `free_buffer`).
//!
//! # Registration
//! A [`MemoryRegistrar`] (the RDMA transport's protection domain) installed with
//! [`Pool::add_registrar`] is called once for every arena, existing and future; the
//! [`RegionKeys`] it returns are reached from any buffer in O(1) via [`IobufMut::keys`].
//!
//! # Lifetime
//! Buffers do not hold an `Arc` of the pool (that would put one contended counter on every
//! get and drop). Instead each stripe holds one reference to its class while the pool is
//! open or while any buffer taken from it is alive; the count of live buffers per stripe
//! lives on the stripe's own cache line. The class (and its memory) is freed when the pool
//! handle and every stripe have let go. The `loom` models in `tests/loom_pool.rs` check this
//! protocol.

mod arena;
mod buf;
pub(crate) mod held;
pub(crate) mod lend;
pub mod seg;
pub(crate) mod sync;

use std::fmt;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use self::arena::Arena;
use self::sync::{fence, Arc, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, SlotQueue};
use crate::error::{BoxError, Error, Result};

pub use self::buf::{Iobref, Iobuf, IobufMut};

/// Probes for the loom models in `tests/loom_pool.rs`; compiled only under `--cfg loom`.
///
/// A class records its own freeing here, and every place where a buffer or the pool
/// handle touches a class asserts that the class has not been freed yet and records a read
/// of the class's `alive` cell, which its drop writes, so loom also checks that the free
/// happens after every touch. The probes use relaxed loom atomics, so they add no
/// synchronisation the model could lean on. They assume one class is freed per execution
/// (the models use single-class pools).
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_probe {
    use super::sync::{AtomicUsize, Ordering};

    loom::lazy_static! {
        static ref FREED: AtomicUsize = AtomicUsize::new(0);
        static ref LAST_FREED: AtomicUsize = AtomicUsize::new(0);
    }

    /// Classes freed so far in the current loom execution.
    pub fn classes_freed() -> usize {
        FREED.load(Ordering::Relaxed)
    }

    /// Creates the statics on the calling thread (loom's lazy statics synchronise on first
    /// use, which would otherwise hide missing orderings between the model's threads).
    pub(super) fn init() {
        let _ = (&*FREED, &*LAST_FREED);
    }

    pub(super) fn freed(class: usize) {
        LAST_FREED.store(class, Ordering::Relaxed);
        FREED.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks that `class` is still there, then records a read of its `alive` cell, which
    /// loom checks happens before the write `Class`'s drop records.
    pub(super) fn touch(class: std::ptr::NonNull<super::Class>) {
        assert_ne!(
            LAST_FREED.load(Ordering::Relaxed),
            class.as_ptr() as usize,
            "class touched after it was freed"
        );
        // SAFETY: not freed, by the assertion above (one class per execution).
        unsafe { class.as_ref() }.alive.with(|_| ());
    }
}

/// How many registrars (protection domains) one pool can serve.
pub const MAX_REGISTRARS: usize = 4;

/// Bit 0 of a stripe's state: the pool handle has gone.
const CLOSED: usize = 1;
/// One live buffer in a stripe's state (counts live in bits 1..).
const ONE: usize = 2;

/// Who is asking for a buffer: data may not take the reserve, control may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Payload: waits when the class (less its reserve) is empty.
    Data,
    /// Control messages (headers, credits, errors): may use the reserve.
    Control,
}

/// One size class of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassConfig {
    /// Slot size in bytes (rounded up to a multiple of 4 KiB).
    pub size: usize,
    /// Total slots the class may hold (the bound on its memory).
    pub count: usize,
    /// Slots kept for [`Priority::Control`] gets.
    pub reserve: usize,
    /// Slots per arena; arenas are created lazily up to `count` slots. 0 picks a default
    /// (arenas of about 4 MiB).
    pub arena_slots: usize,
}

/// Construction parameters of a [`Pool`].
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// Size classes, any order (sorted by size at construction).
    pub classes: Vec<ClassConfig>,
    /// How long [`Pool::get`] waits for a slot before failing.
    pub wait_timeout: Duration,
    /// Free-list stripes per class; 0 picks the number of CPUs (at most 16).
    pub stripes: usize,
}

/// Page size the pool aligns to.
pub const PAGE: usize = 4096;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            classes: vec![
                ClassConfig {
                    size: 4 << 10,
                    count: 1024,
                    reserve: 64,
                    arena_slots: 0,
                },
                ClassConfig {
                    size: 64 << 10,
                    count: 256,
                    reserve: 0,
                    arena_slots: 0,
                },
                ClassConfig {
                    size: 128 << 10,
                    count: 256,
                    reserve: 0,
                    arena_slots: 0,
                },
                ClassConfig {
                    size: 1 << 20,
                    count: 64,
                    reserve: 0,
                    arena_slots: 0,
                },
            ],
            wait_timeout: Duration::from_secs(5),
            stripes: 0,
        }
    }
}

impl PoolConfig {
    /// Total bytes the pool may map, known up front.
    pub fn total_bytes(&self) -> usize {
        self.classes
            .iter()
            .map(|c| round_page(c.size).saturating_mul(c.count))
            .fold(0usize, usize::saturating_add)
    }

    /// Checks the configuration, naming the offending key on error.
    pub fn validate(&self) -> Result<()> {
        if self.classes.is_empty() {
            return Err(Error::config(
                "pool.classes",
                "[]",
                "at least one class is needed",
            ));
        }
        for (i, c) in self.classes.iter().enumerate() {
            let key = |f: &str| format!("pool.classes[{i}].{f}");
            if c.size == 0 || c.size > (1 << 30) {
                return Err(Error::config(key("size"), c.size, "must be 1 B ..= 1 GiB"));
            }
            if c.count == 0 || c.count > (1 << 24) {
                return Err(Error::config(
                    key("count"),
                    c.count,
                    "must be 1 ..= 16777216",
                ));
            }
            if c.reserve >= c.count {
                return Err(Error::config(
                    key("reserve"),
                    c.reserve,
                    format!("must be below the class count {}", c.count),
                ));
            }
            if c.arena_slots > c.count {
                return Err(Error::config(
                    key("arena_slots"),
                    c.arena_slots,
                    format!("must be at most the class count {}", c.count),
                ));
            }
            if self
                .classes
                .iter()
                .take(i)
                .any(|o| round_page(o.size) == round_page(c.size))
            {
                return Err(Error::config(key("size"), c.size, "duplicate class size"));
            }
        }
        if self.stripes > 64 {
            return Err(Error::config(
                "pool.stripes",
                self.stripes,
                "must be 0 ..= 64",
            ));
        }
        Ok(())
    }
}

/// `n` rounded up to a whole number of pages (4 KiB, the pool's alignment); 0 stays 0.
pub fn round_page(n: usize) -> usize {
    n.div_ceil(PAGE).saturating_mul(PAGE)
}

/// A description of an arena, handed to a [`MemoryRegistrar`].
#[derive(Clone, Copy, Debug)]
pub struct ArenaInfo {
    /// Index of the arena within the pool (unique across classes).
    pub index: usize,
    /// Slot size of its class.
    pub class_size: usize,
    /// First byte of the arena; page-aligned.
    pub addr: NonNull<u8>,
    /// Length of the arena in bytes.
    pub len: usize,
}

/// Keys a registrar returned for one arena. Dropping it deregisters the arena.
pub struct RegionKeys {
    /// Local key (RDMA lkey) of the arena.
    pub lkey: u32,
    /// Remote key (RDMA rkey) of the arena.
    pub rkey: u32,
    /// Whatever keeps the registration alive (an RDMA memory region handle).
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

impl fmt::Debug for RegionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionKeys")
            .field("lkey", &self.lkey)
            .field("rkey", &self.rkey)
            .finish_non_exhaustive()
    }
}

/// Registers pool memory with something that needs to know it (an RDMA protection domain).
///
/// Called once per arena, with the pool's registration lock held; the arena's memory stays
/// mapped for as long as the returned [`RegionKeys`] live.
pub trait MemoryRegistrar: Send + Sync + 'static {
    /// A short name for errors and logs (e.g. `rdma:rxe0`).
    fn name(&self) -> String;
    /// Registers one arena.
    fn register(&self, arena: &ArenaInfo) -> Result<RegionKeys, BoxError>;
}

/// Identifies a registrar installed on one pool; pass it to [`IobufMut::keys`]. Qualified
/// by the pool, so asking a buffer of another pool for these keys gives `None` rather than
/// that pool's keys at the same index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegistrarId {
    pub(crate) pool: u64,
    pub(crate) index: usize,
}

impl RegistrarId {
    /// The raw index, `0..MAX_REGISTRARS`.
    pub fn index(self) -> usize {
        self.index
    }
    /// The [`Pool::id`] it belongs to.
    pub fn pool(self) -> u64 {
        self.pool
    }
}

/// Counters of one size class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Slot size.
    pub size: usize,
    /// Slots the class may hold.
    pub capacity: usize,
    /// Slots of the arenas created so far.
    pub created: usize,
    /// Slots kept for control messages.
    pub reserve: usize,
    /// Successful gets.
    pub gets: u64,
    /// Gets served straight from a free list (no waiting).
    pub hits: u64,
    /// Gets that had to wait.
    pub waits: u64,
    /// Gets that failed after waiting (misses).
    pub failures: u64,
    /// Gets served from the reserve.
    pub reserve_gets: u64,
    /// Slots handed out and not yet returned.
    pub in_use: usize,
}

/// A snapshot of the pool's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// One entry per class, smallest first.
    pub classes: Vec<ClassStats>,
}

impl PoolStats {
    /// Bytes in slots handed out and not yet returned.
    pub fn bytes_in_use(&self) -> usize {
        self.classes.iter().map(|c| c.in_use * c.size).sum()
    }
    /// Slots handed out and not yet returned, all classes.
    pub fn slots_in_use(&self) -> usize {
        self.classes.iter().map(|c| c.in_use).sum()
    }
}

impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.classes {
            writeln!(
                f,
                "  class {:>8}: gets {:>10} hits {:>10} waits {:>6} misses {:>4} reserve {:>6} \
                 in use {:>5}/{:<5} mapped {:>5}",
                human_size(c.size),
                c.gets,
                c.hits,
                c.waits,
                c.failures,
                c.reserve_gets,
                c.in_use,
                c.capacity,
                c.created
            )?;
        }
        write!(f, "  bytes in use: {}", human_size(self.bytes_in_use()))
    }
}

/// Formats a byte count as `4K`, `1M`, or plain bytes.
pub fn human_size(n: usize) -> String {
    if n >= (1 << 30) && n % (1 << 30) == 0 {
        format!("{}G", n >> 30)
    } else if n >= (1 << 20) && n % (1 << 20) == 0 {
        format!("{}M", n >> 20)
    } else if n >= (1 << 10) && n % (1 << 10) == 0 {
        format!("{}K", n >> 10)
    } else {
        format!("{n}")
    }
}

/// The registrars installed on a pool.
struct Registry {
    registrars: Mutex<Vec<Arc<dyn MemoryRegistrar>>>,
    /// Next arena index, pool-wide (for [`ArenaInfo::index`]).
    next_arena: AtomicUsize,
}

/// A free-list stripe: its own queue and live-buffer count, on its own cache lines.
#[repr(align(128))]
struct Stripe {
    queue: SlotQueue,
    /// `live_buffers * ONE | CLOSED`.
    state: AtomicUsize,
    gets: AtomicU64,
}

/// One size class. Heap-allocated and freed by [`Class::release`] when the last holder lets
/// go; buffers refer to it by raw pointer.
pub(crate) struct Class {
    size: usize,
    count: usize,
    reserve: usize,
    slots_per_arena: usize,
    arenas: Box<[OnceLock<Arena>]>,
    created_arenas: AtomicUsize,
    /// Per-slot share count of frozen [`Iobuf`]s.
    refs: Box<[sync::AtomicU32]>,
    /// Stripe `stripes.len() - 1` is the reserve.
    stripes: Box<[Stripe]>,
    waiting: AtomicUsize,
    wait_lock: Mutex<()>,
    wait_cond: Condvar,
    grow_lock: Mutex<()>,
    waits: AtomicU64,
    failures: AtomicU64,
    /// Holders: the pool handle plus one per open-or-nonempty stripe.
    holders: AtomicUsize,
    registry: Arc<Registry>,
    /// [`Pool::id`] of the owning pool.
    pool_id: u64,
    /// Loom's view of the class's lifetime: read on every touch, written when freed.
    #[cfg(loom)]
    alive: loom::cell::UnsafeCell<()>,
}

/// Under loom: the class goes only when the pool has closed every stripe and no buffer
/// is live, after every touch of it (`alive`), and it says so to the probes.
#[cfg(loom)]
impl Drop for Class {
    fn drop(&mut self) {
        for s in self.stripes.iter() {
            assert_eq!(
                s.state.load(Ordering::Relaxed),
                CLOSED,
                "class freed while its pool is open or a buffer is live"
            );
        }
        assert_eq!(self.holders.load(Ordering::Relaxed), 0);
        self.alive.with_mut(|_| ());
        loom_probe::freed(self as *const Class as usize);
    }
}

impl Class {
    fn reserve_stripe(&self) -> usize {
        self.stripes.len() - 1
    }

    fn data_stripes(&self) -> usize {
        self.stripes.len() - 1
    }

    /// Address of slot `index`.
    fn slot_ptr(&self, index: u32) -> NonNull<u8> {
        let a = index as usize / self.slots_per_arena;
        let off = (index as usize % self.slots_per_arena) * self.size;
        // Slots are only ever published after their arena is set.
        let arena = self.arenas[a].get().expect("slot of an unpublished arena");
        // SAFETY: `off + size <= slots_per_arena * size == arena.len()`, so the result stays
        // inside the mapping and is non-null.
        unsafe { NonNull::new_unchecked(arena.base().as_ptr().add(off)) }
    }

    fn arena_of(&self, index: u32) -> Option<&Arena> {
        self.arenas
            .get(index as usize / self.slots_per_arena)
            .and_then(OnceLock::get)
    }

    /// Pops a slot from `stripe`, counting it as live there.
    fn pop_from(&self, stripe: usize) -> Option<u32> {
        let s = &self.stripes[stripe];
        let slot = s.queue.pop()?;
        s.state.fetch_add(ONE, Ordering::Relaxed);
        s.gets.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    /// One attempt without waiting: home stripe, the others, a new arena, the reserve.
    fn try_take(&self, home: usize, prio: Priority) -> Result<Option<(u32, usize)>> {
        let n = self.data_stripes();
        for k in 0..n {
            let s = (home + k) % n;
            if let Some(slot) = self.pop_from(s) {
                return Ok(Some((slot, s)));
            }
        }
        if self.created_arenas.load(Ordering::Acquire) < self.arenas.len() {
            self.grow()?;
            for k in 0..n {
                let s = (home + k) % n;
                if let Some(slot) = self.pop_from(s) {
                    return Ok(Some((slot, s)));
                }
            }
        }
        if prio == Priority::Control {
            let r = self.reserve_stripe();
            if let Some(slot) = self.pop_from(r) {
                return Ok(Some((slot, r)));
            }
        }
        Ok(None)
    }

    /// Maps, registers and publishes one more arena, if the bound allows.
    fn grow(&self) -> Result<()> {
        // Lock order: registry, then grow lock (as in `Pool::add_registrar`).
        let regs = lock(&self.registry.registrars);
        let _g = lock(&self.grow_lock);
        let a = self.created_arenas.load(Ordering::Acquire);
        if a >= self.arenas.len() {
            return Ok(());
        }
        let first_slot = a * self.slots_per_arena;
        let slots = self.slots_per_arena.min(self.count - first_slot);
        let bytes = self.slots_per_arena * self.size;
        let index = self.registry.next_arena.fetch_add(1, Ordering::Relaxed);
        let arena = Arena::map(bytes, index).map_err(|source| Error::MapArena { bytes, source })?;
        let info = ArenaInfo {
            index,
            class_size: self.size,
            addr: arena.base(),
            len: arena.len(),
        };
        for (i, r) in regs.iter().enumerate() {
            let keys = r.register(&info).map_err(|source| Error::RegisterArena {
                arena: index,
                bytes,
                source,
            })?;
            let _ = arena.keys[i].set(keys);
        }
        if self.arenas[a].set(arena).is_err() {
            // Unreachable: `a` is only ever published under the grow lock.
            return Ok(());
        }
        self.created_arenas.store(a + 1, Ordering::Release);
        // The first arena feeds the reserve first.
        let mut next = first_slot;
        let end = first_slot + slots;
        if a == 0 {
            let r = self.reserve_stripe();
            while next < end && next < self.reserve {
                self.stripes[r].queue.push(next as u32);
                next += 1;
            }
        }
        let n = self.data_stripes();
        let mut s = 0;
        while next < end {
            self.stripes[s].queue.push(next as u32);
            s = (s + 1) % n;
            next += 1;
        }
        drop(_g);
        drop(regs);
        self.wake_waiters();
        Ok(())
    }

    fn wake_waiters(&self) {
        #[cfg(loom)]
        loom_probe::touch(NonNull::from(self));
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.wait_lock);
            self.wait_cond.notify_all();
        }
    }

    /// Takes a slot, waiting up to `timeout`.
    fn take(&self, prio: Priority, timeout: Duration) -> Result<(u32, usize)> {
        let home = home_stripe(self.data_stripes());
        if let Some(t) = self.try_take(home, prio)? {
            return Ok(t);
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        // A timeout too long to add to now (e.g. `Duration::MAX`) means: wait for good.
        let deadline = start.checked_add(timeout);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut guard = lock(&self.wait_lock);
        let out = loop {
            match self.try_take(home, prio) {
                Ok(Some(t)) => break Ok(t),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.failures.fetch_add(1, Ordering::Relaxed);
                break Err(Error::PoolExhausted {
                    class_size: self.size,
                    waited: now - start,
                    in_use: self.in_use(),
                    total: self.count,
                    reserve: self.reserve,
                });
            }
            let left = deadline.map_or(Duration::from_secs(3600), |d| d - now);
            guard = match self.wait_cond.wait_timeout(guard, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        };
        drop(guard);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn in_use(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.state.load(Ordering::Relaxed) / ONE)
            .sum()
    }

    /// Returns `slot` to `stripe` and drops the buffer's count there.
    ///
    /// # Safety
    /// `this` must point to a live class, the caller must own the slot (the last handle of
    /// it), taken from `stripe`, and must not use `this` after the call.
    pub(crate) unsafe fn put(this: NonNull<Class>, slot: u32, stripe: usize) {
        // SAFETY: the caller's live buffer keeps its stripe holding the class.
        let class = unsafe { this.as_ref() };
        #[cfg(loom)]
        loom_probe::touch(this);
        let s = &class.stripes[stripe];
        s.queue.push(slot);
        class.wake_waiters();
        #[cfg(loom)]
        loom_probe::touch(this);
        // Last touch of the class by this buffer. If this was the stripe's last buffer after
        // the pool closed, the stripe's hold goes too.
        let prev = s.state.fetch_sub(ONE, Ordering::AcqRel);
        if prev == ONE | CLOSED {
            // SAFETY: the stripe's hold is still counted in `holders`; releasing it is ours.
            unsafe { Class::release(this) };
        }
    }

    /// Drops one holder; the last frees the class.
    ///
    /// # Safety
    /// `this` points to a live class and the caller owns one of its holds.
    unsafe fn release(this: NonNull<Class>) {
        // SAFETY: the caller's hold keeps the class alive until this decrement.
        let prev = unsafe { this.as_ref() }
            .holders
            .fetch_sub(1, Ordering::Release);
        if prev == 1 {
            fence(Ordering::Acquire);
            // SAFETY: the class was made by `Box::into_raw` in `Pool::new` and this was the
            // last hold, so no buffer, stripe or pool refers to it any more.
            drop(unsafe { Box::from_raw(this.as_ptr()) });
        }
    }

    /// Closes the pool's side: marks every stripe closed; a stripe with no live buffers
    /// lets go of its hold at once, the others when their last buffer returns.
    ///
    /// # Safety
    /// `this` is live and the caller owns the pool's hold, which this call consumes.
    unsafe fn close(this: NonNull<Class>) {
        // SAFETY: the pool's hold keeps the class alive during the loop.
        let class = unsafe { this.as_ref() };
        let n = class.stripes.len();
        for i in 0..n {
            #[cfg(loom)]
            loom_probe::touch(this);
            // SAFETY: as above; `release` below may only free the class once the pool's hold
            // (released last) is gone.
            let prev = unsafe { this.as_ref() }.stripes[i]
                .state
                .fetch_or(CLOSED, Ordering::AcqRel);
            if prev == 0 {
                // SAFETY: the stripe's hold is ours to release now; the pool's hold keeps
                // the class alive.
                unsafe { Class::release(this) };
            }
        }
        // SAFETY: the pool's own hold.
        unsafe { Class::release(this) };
    }

    fn stats(&self) -> ClassStats {
        let gets: u64 = self
            .stripes
            .iter()
            .map(|s| s.gets.load(Ordering::Relaxed))
            .sum();
        let waits = self.waits.load(Ordering::Relaxed);
        ClassStats {
            size: self.size,
            capacity: self.count,
            created: (self.created_arenas.load(Ordering::Acquire) * self.slots_per_arena)
                .min(self.count),
            reserve: self.reserve,
            gets,
            hits: gets.saturating_sub(waits),
            waits,
            failures: self.failures.load(Ordering::Relaxed),
            reserve_gets: self.stripes[self.reserve_stripe()]
                .gets
                .load(Ordering::Relaxed),
            in_use: self.in_use(),
        }
    }

    fn free_slots(&self) -> usize {
        self.stripes.iter().map(|s| s.queue.len()).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> sync::MutexGuardCompat<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(not(loom))]
static NEXT_HOME: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(not(loom))]
fn home_stripe(n: usize) -> usize {
    thread_local! {
        static HOME: usize = NEXT_HOME.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    HOME.with(|h| *h % n.max(1))
}

#[cfg(loom)]
fn home_stripe(_n: usize) -> usize {
    0
}

/// Shared state behind [`Pool`] handles.
struct PoolInner {
    /// Unique per pool for the life of the process.
    id: u64,
    /// Classes sorted by size.
    classes: Vec<NonNull<Class>>,
    registry: Arc<Registry>,
    wait_timeout: Duration,
    total_bytes: usize,
}

// SAFETY: the classes are only reached through shared references to their Sync fields
// (atomics, lock-free queues, mutexes, OnceLocks); the pointers stay valid while the pool
// holds its hold on each class.
unsafe impl Send for PoolInner {}
// SAFETY: as above.
unsafe impl Sync for PoolInner {}

impl Drop for PoolInner {
    fn drop(&mut self) {
        for c in &self.classes {
            // SAFETY: the pool owns one hold on each class, consumed here exactly once.
            unsafe { Class::close(*c) };
        }
    }
}

/// A pool of pre-allocated, page-aligned, registration-aware I/O buffers. Cheap to clone
/// (all clones share one pool).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("classes", &self.class_sizes())
            .field("total_bytes", &self.inner.total_bytes)
            .finish()
    }
}

impl Pool {
    /// Builds a pool. The first arena of each class is mapped now; the rest on demand.
    pub fn new(cfg: &PoolConfig) -> Result<Pool> {
        cfg.validate()?;
        #[cfg(loom)]
        loom_probe::init();
        let mut classes_cfg = cfg.classes.clone();
        classes_cfg.sort_by_key(|c| c.size);
        let registry = Arc::new(Registry {
            registrars: Mutex::new(Vec::new()),
            next_arena: AtomicUsize::new(0),
        });
        let nstripes = if cfg.stripes == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(16)
        } else {
            cfg.stripes
        };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut inner = PoolInner {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            classes: Vec::new(),
            registry: registry.clone(),
            wait_timeout: cfg.wait_timeout,
            total_bytes: cfg.total_bytes(),
        };
        for c in &classes_cfg {
            let size = round_page(c.size);
            let per_arena = if c.arena_slots == 0 {
                ((4 << 20) / size).clamp(1, c.count)
            } else {
                c.arena_slots
            };
            // The reserve comes from the first arena.
            let per_arena = per_arena.max(c.reserve + 1).min(c.count);
            let max_arenas = c.count.div_ceil(per_arena);
            let stripes = (0..=nstripes)
                .map(|_| Stripe {
                    queue: SlotQueue::new(c.count),
                    state: AtomicUsize::new(0),
                    gets: AtomicU64::new(0),
                })
                .collect::<Vec<_>>()
                .into_boxed_slice();
            let class = Box::new(Class {
                size,
                count: c.count,
                reserve: c.reserve,
                slots_per_arena: per_arena,
                arenas: (0..max_arenas).map(|_| OnceLock::new()).collect(),
                created_arenas: AtomicUsize::new(0),
                refs: (0..c.count).map(|_| sync::AtomicU32::new(0)).collect(),
                stripes,
                waiting: AtomicUsize::new(0),
                wait_lock: Mutex::new(()),
                wait_cond: Condvar::new(),
                grow_lock: Mutex::new(()),
                waits: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                holders: AtomicUsize::new(nstripes + 2),
                registry: registry.clone(),
                pool_id: inner.id,
                #[cfg(loom)]
                alive: loom::cell::UnsafeCell::new(()),
            });
            let ptr = NonNull::from(Box::leak(class));
            // From here on PoolInner's Drop frees the class if a later step fails.
            inner.classes.push(ptr);
            // SAFETY: just created; the pool's hold keeps it alive.
            unsafe { ptr.as_ref() }.grow()?;
        }
        Ok(Pool {
            inner: Arc::new(inner),
        })
    }

    fn class(&self, i: usize) -> &Class {
        // SAFETY: the pool's hold keeps every class alive while `self` lives.
        unsafe { self.inner.classes[i].as_ref() }
    }

    fn class_for(&self, size: usize) -> Result<usize> {
        let n = self.inner.classes.len();
        (0..n)
            .find(|&i| self.class(i).size >= size)
            .ok_or_else(|| Error::NoSizeClass {
                size,
                largest: self.max_buffer_size(),
            })
    }

    /// Slot sizes, smallest first.
    pub fn class_sizes(&self) -> Vec<usize> {
        (0..self.inner.classes.len())
            .map(|i| self.class(i).size)
            .collect()
    }

    /// The largest buffer the pool can hand out.
    pub fn max_buffer_size(&self) -> usize {
        // Classes are sorted by size; no allocation (this is on every span's way).
        match self.inner.classes.len() {
            0 => 0,
            n => self.class(n - 1).size,
        }
    }

    /// Bytes the pool may map in all.
    pub fn total_bytes(&self) -> usize {
        self.inner.total_bytes
    }

    /// The default wait of [`Pool::get`].
    pub fn wait_timeout(&self) -> Duration {
        self.inner.wait_timeout
    }

    /// A data buffer of `len` bytes (from the smallest class that fits), waiting up to the
    /// pool's timeout when the class is empty.
    pub fn get(&self, len: usize) -> Result<IobufMut> {
        self.get_with(len, Priority::Data, self.inner.wait_timeout)
    }

    /// A control buffer: may use the class's reserve.
    pub fn get_control(&self, len: usize) -> Result<IobufMut> {
        self.get_with(len, Priority::Control, self.inner.wait_timeout)
    }

    /// A buffer with an explicit priority and wait.
    pub fn get_with(&self, len: usize, prio: Priority, timeout: Duration) -> Result<IobufMut> {
        let ci = self.class_for(len)?;
        let class = self.class(ci);
        let (slot, stripe) = class.take(prio, timeout)?;
        Ok(self.make(ci, slot, stripe, len))
    }

    /// A buffer if one is free right now.
    pub fn try_get(&self, len: usize, prio: Priority) -> Result<Option<IobufMut>> {
        let ci = self.class_for(len)?;
        let class = self.class(ci);
        let home = home_stripe(class.data_stripes());
        Ok(class
            .try_take(home, prio)?
            .map(|(slot, stripe)| self.make(ci, slot, stripe, len)))
    }

    fn make(&self, ci: usize, slot: u32, stripe: usize, len: usize) -> IobufMut {
        let class = self.class(ci);
        let ptr = class.slot_ptr(slot);
        // SAFETY: the slot was just popped from a free list, so nothing else refers to it;
        // the stripe counted it live, which keeps the class alive until it is put back.
        unsafe { IobufMut::from_slot(self.inner.classes[ci], slot, stripe as u16, ptr, len) }
    }

    /// `count` buffers of `size` bytes each, as one [`Iobref`] (GlusterFS's
    /// `glfs_get_buffer`). All or nothing: on failure the ones taken go back.
    pub fn get_buffers(&self, size: usize, count: usize) -> Result<Iobref> {
        let mut r = Iobref::with_capacity(count);
        for _ in 0..count {
            r.push(self.get(size)?);
        }
        Ok(r)
    }

    /// Buffers covering `len` bytes, in as few pool buffers as the largest class allows.
    pub fn get_span(&self, len: usize) -> Result<Iobref> {
        self.get_span_within(len, self.inner.wait_timeout)
    }

    /// [`Pool::get_span`], waiting at most `timeout` in all. All or nothing: on failure the
    /// buffers taken go back.
    pub fn get_span_within(&self, len: usize, timeout: Duration) -> Result<Iobref> {
        let mut v = self.span_vec(len);
        self.get_span_within_into(len, timeout, &mut v)?;
        Ok(Iobref::from(v))
    }

    /// Like [`Pool::get_span`], but only if the buffers are free right now: `None` (with
    /// nothing taken) otherwise. For a thread that must not block, such as one that drains
    /// a completion queue.
    pub fn try_get_span(&self, len: usize) -> Result<Option<Iobref>> {
        let mut v = self.span_vec(len);
        Ok(self
            .try_get_span_into(len, &mut v)?
            .then(|| Iobref::from(v)))
    }

    /// A vector with room for the buffers of a `len`-byte span.
    fn span_vec(&self, len: usize) -> Vec<IobufMut> {
        Vec::with_capacity(len.div_ceil(self.max_buffer_size().max(1)).max(1))
    }

    /// [`Pool::try_get_span`] into `out`, for a caller that reuses its vector rather than
    /// allocate one per call: `out` is emptied first, and is left empty (nothing taken)
    /// with `Ok(false)` when the buffers are not all free right now.
    pub fn try_get_span_into(&self, len: usize, out: &mut Vec<IobufMut>) -> Result<bool> {
        self.span_into(len, out, |n| self.try_get(n, Priority::Data))
    }

    /// [`Pool::get_span_within`] into `out`, as [`Pool::try_get_span_into`] does: `out` is
    /// emptied first and left empty on failure.
    pub fn get_span_within_into(
        &self,
        len: usize,
        timeout: Duration,
        out: &mut Vec<IobufMut>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let got = self.span_into(len, out, |n| {
            let wait = deadline.saturating_duration_since(Instant::now());
            self.get_with(n, Priority::Data, wait).map(Some)
        })?;
        if got {
            Ok(())
        } else {
            // `get_with` waits or fails: it never gives nothing.
            Err(Error::InvalidArgument(
                "internal: a pool get gave no buffer".into(),
            ))
        }
    }

    /// The chunking behind every span: fills `out` (emptied first) from `take`; `false`,
    /// with `out` emptied again (the buffers taken go back), as soon as `take` has none.
    fn span_into(
        &self,
        len: usize,
        out: &mut Vec<IobufMut>,
        mut take: impl FnMut(usize) -> Result<Option<IobufMut>>,
    ) -> Result<bool> {
        out.clear();
        let max = self.max_buffer_size();
        let mut left = len;
        while left > 0 {
            let n = left.min(max);
            match take(n) {
                Ok(Some(b)) => out.push(b),
                Ok(None) => {
                    out.clear();
                    return Ok(false);
                }
                Err(e) => {
                    out.clear();
                    return Err(e);
                }
            }
            left -= n;
        }
        Ok(true)
    }

    /// Installs a registrar: it is called now for every existing arena, and later for each
    /// new one. Registrations last as long as the pool.
    pub fn add_registrar(&self, r: Arc<dyn MemoryRegistrar>) -> Result<RegistrarId> {
        let mut regs = lock(&self.inner.registry.registrars);
        let id = regs.len();
        if id >= MAX_REGISTRARS {
            return Err(Error::TooManyRegistrars {
                max: MAX_REGISTRARS,
            });
        }
        for ci in 0..self.inner.classes.len() {
            let class = self.class(ci);
            let _g = lock(&class.grow_lock);
            for arena in class.arenas.iter().filter_map(OnceLock::get) {
                let info = ArenaInfo {
                    index: arena.index,
                    class_size: class.size,
                    addr: arena.base(),
                    len: arena.len(),
                };
                let keys = r.register(&info).map_err(|source| Error::RegisterArena {
                    arena: arena.index,
                    bytes: arena.len(),
                    source,
                })?;
                let _ = arena.keys[id].set(keys);
            }
        }
        regs.push(r);
        Ok(RegistrarId {
            pool: self.inner.id,
            index: id,
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            classes: (0..self.inner.classes.len())
                .map(|i| self.class(i).stats())
                .collect(),
        }
    }

    /// An identifier of this pool, equal for all its clones and distinct from every other
    /// live pool (for per-pool caches such as an RDMA transport's registrations).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Free slots in created arenas, all classes (for leak checks: equals the created slot
    /// count when nothing is in use).
    pub fn free_slots(&self) -> usize {
        (0..self.inner.classes.len())
            .map(|i| self.class(i).free_slots())
            .sum()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
