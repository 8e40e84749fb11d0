//! Type 2 memory windows: a remote key for part of a memory region, bound and invalidated
//! by work requests on one queue pair.
//!
//! A region registered with [`MrAccess::LocalWriteBind`](crate::verbs::MrAccess) gives no
//! peer any access through its own rkey. A [`MemoryWindow`] bound over `[addr, addr + len)`
//! of it ([`QueuePair::post_bind`](crate::verbs::QueuePair::post_bind)) gives the peer of
//! that queue pair, and only that queue pair, the window's new rkey with the access asked
//! for (remote read or remote write), until the window is invalidated
//! ([`QueuePair::post_invalidate`](crate::verbs::QueuePair::post_invalidate), or the peer's
//! SEND with invalidate) or the queue pair is destroyed. Each bind gives a new rkey (its
//! low byte, the key, advances), so an rkey of an earlier binding never works again.
//!
//! Binding needs the window free (never bound, or invalidated): a type 2 window is not
//! rebound in place.

use std::fmt;
use std::io;
use std::ptr::NonNull;

use rdma_mummy_sys::{ibv_alloc_mw, ibv_dealloc_mw, ibv_mw, ibv_mw_type};

use crate::error::RdmaError;
use crate::verbs::context::ProtectionDomain;

/// What a bound window lets the peer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowAccess {
    /// The peer may RDMA READ the window (a request's payload the server fetches).
    RemoteRead,
    /// The peer may RDMA WRITE the window (where the server puts a reply's payload).
    RemoteWrite,
}

impl WindowAccess {
    /// The `ibv_access_flags` of the binding.
    pub(crate) fn flags(self) -> u32 {
        match self {
            WindowAccess::RemoteRead => rdma_mummy_sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
            WindowAccess::RemoteWrite => {
                rdma_mummy_sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            }
        }
    }
}

/// A type 2 memory window of a protection domain. Keeps the PD (and device) alive; freed
/// on drop, which also invalidates it if it is still bound.
///
/// Not `Clone`: binding and invalidating take `&mut self`, so one owner tracks its state.
pub struct MemoryWindow {
    mw: NonNull<ibv_mw>,
    pd: ProtectionDomain,
    /// A bind was posted and no invalidation since.
    bound: bool,
}

// SAFETY: the `ibv_mw` handle is only read (its rkey) through `&self` and written through
// `&mut self`; libibverbs allows using and freeing a window from any thread.
unsafe impl Send for MemoryWindow {}
// SAFETY: as above: shared references only read the handle's plain fields.
unsafe impl Sync for MemoryWindow {}

impl fmt::Debug for MemoryWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryWindow")
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .field("bound", &self.bound)
            .finish()
    }
}

impl MemoryWindow {
    /// Allocates a type 2 window on `pd`. Fails with [`RdmaError::AllocMw`] on a device
    /// without memory windows.
    pub fn new(pd: &ProtectionDomain) -> Result<MemoryWindow, RdmaError> {
        // SAFETY: the PD pointer is live (`pd` keeps it allocated for the call); the
        // function only reads it and returns a new handle or NULL with errno set.
        let mw = unsafe { ibv_alloc_mw(pd.raw(), ibv_mw_type::IBV_MW_TYPE_2) };
        match NonNull::new(mw) {
            Some(mw) => Ok(MemoryWindow {
                mw,
                pd: pd.clone(),
                bound: false,
            }),
            None => Err(RdmaError::AllocMw {
                device: pd.context().name().to_owned(),
                source: io::Error::last_os_error(),
            }),
        }
    }

    /// The window's current rkey: that of its last binding (or, never bound, the one the
    /// device gave it at allocation, which grants nothing).
    pub fn rkey(&self) -> u32 {
        // SAFETY: the handle is live while `self` is; `rkey` is a plain field.
        unsafe { self.mw.as_ref() }.rkey
    }

    /// The rkey the next bind will give (known before it is posted, so a request message
    /// can carry it).
    pub fn next_rkey(&self) -> u32 {
        next_rkey(self.rkey())
    }

    /// Whether a bind was posted and no invalidation since. After a failed bind or
    /// invalidation (an error completion) the state is unknown: drop the window.
    pub fn is_bound(&self) -> bool {
        self.bound
    }

    /// The protection domain it belongs to.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    pub(crate) fn raw(&self) -> *mut ibv_mw {
        self.mw.as_ptr()
    }

    /// Records a posted bind with `rkey`: the provider took the previous rkey into the
    /// work request (the device checks it to find the window), and the next bind or
    /// invalidation must name the new one.
    pub(crate) fn set_bound(&mut self, rkey: u32) {
        // SAFETY: the handle is live and `&mut self` makes this the only access; the
        // provider reads `rkey` only while a bind is being posted, under `&mut self` too.
        unsafe { self.mw.as_mut() }.rkey = rkey;
        self.bound = true;
    }

    /// Records a posted invalidation.
    pub(crate) fn set_unbound(&mut self) {
        self.bound = false;
    }
}

/// The rkey of the next binding: same window index, next 8-bit key (`ibv_inc_rkey`).
pub(crate) fn next_rkey(rkey: u32) -> u32 {
    (rkey & !0xff) | (rkey.wrapping_add(1) & 0xff)
}

impl Drop for MemoryWindow {
    fn drop(&mut self) {
        // SAFETY: the handle came from `ibv_alloc_mw`, is freed once, here; the PD it
        // belongs to is still allocated (`self.pd` drops after this). A window still bound
        // is invalidated by freeing it.
        let ret = unsafe { ibv_dealloc_mw(self.mw.as_ptr()) };
        if ret != 0 {
            tracing::warn!(ret, "ibv_dealloc_mw failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_rkey;

    #[test]
    fn the_key_byte_advances_and_wraps_within_the_index() {
        assert_eq!(next_rkey(0x1234_5600), 0x1234_5601);
        assert_eq!(next_rkey(0x1234_56ff), 0x1234_5600);
        assert_eq!(next_rkey(0xffff_ffff), 0xffff_ff00);
    }
}
