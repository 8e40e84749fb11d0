//! Buffer handles: [`IobufMut`] (unique, writable), [`Iobuf`] (shared, read-only) and
//! [`Iobref`] (the buffers of one message).

use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;

use super::sync::{fence, Ordering};
use super::{Class, RegionKeys, RegistrarId};

/// A unique, writable pool buffer. Its slot returns to the pool when it is dropped.
///
/// `len` (what [`Deref`] shows) is at most the slot's capacity and can be changed with
/// [`IobufMut::set_len`]; slot memory is always initialised (zeroed when first mapped,
/// stale data after reuse), so growing the length exposes no undefined bytes.
pub struct IobufMut {
    ptr: NonNull<u8>,
    len: usize,
    class: NonNull<Class>,
    slot: u32,
    stripe: u16,
}

// SAFETY: the handle owns its slot exclusively; moving it to another thread moves that
// ownership. The class it points to is Sync.
unsafe impl Send for IobufMut {}
// SAFETY: `&IobufMut` only gives `&[u8]` access.
unsafe impl Sync for IobufMut {}

impl IobufMut {
    /// # Safety
    /// `slot` was just taken from `stripe` of `class` (nothing else refers to it), and `ptr`
    /// is its address.
    pub(super) unsafe fn from_slot(
        class: NonNull<Class>,
        slot: u32,
        stripe: u16,
        ptr: NonNull<u8>,
        len: usize,
    ) -> IobufMut {
        IobufMut {
            ptr,
            len,
            class,
            slot,
            stripe,
        }
    }

    fn class(&self) -> &Class {
        // SAFETY: a live buffer is counted in its stripe, which keeps the class alive.
        unsafe { self.class.as_ref() }
    }

    /// The slot's size: the most [`IobufMut::set_len`] accepts.
    pub fn capacity(&self) -> usize {
        self.class().size
    }

    /// Sets the visible length.
    ///
    /// # Panics
    /// If `len` exceeds [`IobufMut::capacity`].
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "IobufMut::set_len beyond capacity");
        self.len = len;
    }

    /// The whole slot, regardless of the visible length.
    pub fn as_full_mut(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        // SAFETY: the slot is `cap` bytes of mapped, initialised memory owned uniquely by
        // this handle, and `&mut self` excludes any other access for the borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), cap) }
    }

    /// Address of the first byte (for registration lookups and verbs SGEs).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable address of the first byte (for an RDMA NIC to write into).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The keys registrar `id` gave this buffer's arena, found in O(1).
    pub fn keys(&self, id: RegistrarId) -> Option<&RegionKeys> {
        keys_of(self.class(), self.slot, id)
    }

    /// [`super::Pool::id`] of the pool this buffer came from.
    pub fn pool_id(&self) -> u64 {
        self.class().pool_id
    }

    /// Makes the buffer shared and read-only.
    pub fn freeze(self) -> Iobuf {
        let me = std::mem::ManuallyDrop::new(self);
        // Unique until now: no other thread can observe the count.
        me.class().refs[me.slot as usize].store(1, Ordering::Relaxed);
        Iobuf {
            ptr: me.ptr,
            off: 0,
            len: me.len,
            class: me.class,
            slot: me.slot,
            stripe: me.stripe,
        }
    }

    /// An `IoSliceMut` over the visible bytes, for `readv`.
    pub fn io_slice_mut(&mut self) -> IoSliceMut<'_> {
        IoSliceMut::new(self)
    }
}

fn keys_of(class: &Class, slot: u32, id: RegistrarId) -> Option<&RegionKeys> {
    if class.pool_id != id.pool {
        return None;
    }
    class.arena_of(slot)?.keys.get(id.index)?.get()
}

impl Drop for IobufMut {
    fn drop(&mut self) {
        // SAFETY: this handle is the slot's only owner, taken from `self.stripe`; nothing
        // touches `self.class` after the call.
        unsafe { Class::put(self.class, self.slot, self.stripe as usize) };
    }
}

impl Deref for IobufMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= capacity`; the slot is mapped, initialised and uniquely owned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IobufMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for IobufMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IobufMut")
            .field("slot", &self.slot)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// A shared, read-only view of (part of) a pool buffer. Clones share the slot; the last
/// one to drop returns it.
pub struct Iobuf {
    ptr: NonNull<u8>,
    off: usize,
    len: usize,
    class: NonNull<Class>,
    slot: u32,
    stripe: u16,
}

// SAFETY: the slot's memory is never written while an `Iobuf` of it exists (the only
// writable handle was consumed by `freeze`, and `try_into_mut` requires a count of one);
// the count is atomic.
unsafe impl Send for Iobuf {}
// SAFETY: as above.
unsafe impl Sync for Iobuf {}

impl Iobuf {
    fn class(&self) -> &Class {
        // SAFETY: the slot is live (count >= 1, held by self), keeping its class alive.
        unsafe { self.class.as_ref() }
    }

    /// A view of `range` (relative to this view) sharing the same slot; no copy.
    ///
    /// Returns `None` when the range is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Option<Iobuf> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        let mut v = self.clone();
        v.off += range.start;
        v.len = range.end - range.start;
        Some(v)
    }

    /// Address of the view's first byte.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: `off + len <= capacity`, so the result stays inside the slot.
        unsafe { self.ptr.as_ptr().add(self.off) }
    }

    /// The keys registrar `id` gave this buffer's arena, found in O(1).
    pub fn keys(&self, id: RegistrarId) -> Option<&RegionKeys> {
        keys_of(self.class(), self.slot, id)
    }

    /// Back to a unique writable buffer if this is the only handle of a whole-slot view.
    pub fn try_into_mut(self) -> Result<IobufMut, Iobuf> {
        let refs = &self.class().refs[self.slot as usize];
        if self.off != 0 || refs.load(Ordering::Acquire) != 1 {
            return Err(self);
        }
        let me = std::mem::ManuallyDrop::new(self);
        Ok(IobufMut {
            ptr: me.ptr,
            len: me.len,
            class: me.class,
            slot: me.slot,
            stripe: me.stripe,
        })
    }

    /// An `IoSlice` over the view, for `writev`.
    pub fn io_slice(&self) -> IoSlice<'_> {
        IoSlice::new(self)
    }
}

impl Clone for Iobuf {
    fn clone(&self) -> Self {
        let old = self.class().refs[self.slot as usize].fetch_add(1, Ordering::Relaxed);
        if old > u32::MAX / 2 {
            // Like `Arc`: an overflowing count cannot be made safe.
            std::process::abort();
        }
        Iobuf {
            ptr: self.ptr,
            off: self.off,
            len: self.len,
            class: self.class,
            slot: self.slot,
            stripe: self.stripe,
        }
    }
}

impl Drop for Iobuf {
    fn drop(&mut self) {
        if self.class().refs[self.slot as usize].fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        // SAFETY: the count reached zero, so this is the slot's last handle, taken from
        // `self.stripe`; nothing touches the class after the call.
        unsafe { Class::put(self.class, self.slot, self.stripe as usize) };
    }
}

impl Deref for Iobuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the view lies within the slot, which is mapped, initialised and not
        // written while shared.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl fmt::Debug for Iobuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iobuf")
            .field("slot", &self.slot)
            .field("off", &self.off)
            .field("len", &self.len)
            .finish()
    }
}

/// The buffers of one message. Dropping it returns them all to the pool.
#[derive(Debug, Default)]
pub struct Iobref {
    bufs: Vec<IobufMut>,
}

impl Iobref {
    /// An empty set.
    pub fn new() -> Iobref {
        Iobref { bufs: Vec::new() }
    }

    /// An empty set with room for `n` buffers.
    pub fn with_capacity(n: usize) -> Iobref {
        Iobref {
            bufs: Vec::with_capacity(n),
        }
    }

    /// Adds a buffer.
    pub fn push(&mut self, b: IobufMut) {
        self.bufs.push(b);
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.bufs.len()
    }

    /// True when it holds no buffer.
    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }

    /// Sum of the buffers' visible lengths.
    pub fn total_len(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum()
    }

    /// The buffers.
    pub fn buffers(&self) -> &[IobufMut] {
        &self.bufs
    }

    /// The buffers, writable.
    pub fn buffers_mut(&mut self) -> &mut [IobufMut] {
        &mut self.bufs
    }

    /// Takes the buffers out.
    pub fn into_vec(self) -> Vec<IobufMut> {
        self.bufs
    }

    /// Copies the visible bytes out, concatenated (for tests and small payloads).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.total_len());
        for b in &self.bufs {
            v.extend_from_slice(b);
        }
        v
    }

    /// Keeps the first `len` bytes: trims the visible lengths front to back and drops
    /// (back to the pool) the buffers left with nothing past them. Allocates nothing.
    pub(crate) fn trim(&mut self, len: usize) {
        let mut left = len;
        let mut keep = 0;
        for b in &mut self.bufs {
            if left == 0 {
                break;
            }
            let n = b.len().min(left);
            b.set_len(n);
            left -= n;
            keep += 1;
        }
        self.bufs.truncate(keep);
    }

    /// Trims the visible lengths so that they add up to at most `len`, front to back.
    pub fn truncate(&mut self, mut len: usize) {
        for b in &mut self.bufs {
            let n = b.len().min(len);
            b.set_len(n);
            len -= n;
        }
    }
}

impl From<Vec<IobufMut>> for Iobref {
    fn from(bufs: Vec<IobufMut>) -> Self {
        Iobref { bufs }
    }
}

impl IntoIterator for Iobref {
    type Item = IobufMut;
    type IntoIter = std::vec::IntoIter<IobufMut>;
    fn into_iter(self) -> Self::IntoIter {
        self.bufs.into_iter()
    }
}
