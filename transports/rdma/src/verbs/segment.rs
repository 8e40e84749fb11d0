//! Caller memory registered for one request: a request's segment that is neither pool
//! memory nor short enough to bounce gets a memory region of its own, for as long as the
//! request is in flight.
//!
//! The registration owns the segment, so it cannot outlive the memory: the region is
//! deregistered before the segment is given back ([`RegisteredSend::into_segment`]) or
//! dropped (fields drop in declaration order). While a segment is held here its request
//! has not completed, which is what [`RawSeg`](zcio::transport::RawSeg)'s contract keeps
//! the memory valid for; `Owned` segments own their heap buffer, and pool segments their
//! pool buffer.

use zcio::transport::{RecvSeg, SendSeg};

use crate::error::RdmaError;
use crate::verbs::{MemoryRegion, MrAccess, ProtectionDomain};

/// A request's segment registered with a memory region of its own, for as long as the
/// request is in flight: [`RegisteredSend`] or [`RegisteredRecv`].
pub(crate) struct Registered<S> {
    // Declaration order is drop order: the region goes before the segment.
    mr: MemoryRegion,
    seg: S,
}

/// A send segment registered REMOTE_READ only: the peer may read it, nothing may write it.
pub(crate) type RegisteredSend = Registered<SendSeg>;

/// A receive segment registered for the peer to RDMA WRITE (and, when asked, READ). The
/// segment is not reachable from Rust while registered: the device may write it at any
/// time.
pub(crate) type RegisteredRecv = Registered<RecvSeg>;

impl<S> Registered<S> {
    /// The remote key of the registration.
    pub(crate) fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    /// Address of the segment's first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.mr.addr() as u64
    }

    /// Length of the segment.
    pub(crate) fn len(&self) -> usize {
        self.mr.len()
    }

    /// Deregisters and gives the segment back.
    pub(crate) fn into_segment(self) -> S {
        let Registered { mr, seg } = self;
        drop(mr);
        seg
    }
}

impl RegisteredSend {
    /// Registers `seg` (dropped on failure: its request fails).
    pub(crate) fn new(pd: &ProtectionDomain, seg: SendSeg) -> Result<RegisteredSend, RdmaError> {
        let bytes = seg.as_slice();
        let (ptr, len) = (bytes.as_ptr().cast_mut(), bytes.len());
        // SAFETY: the memory stays valid while `seg` is owned here (see the module
        // documentation), and `mr` is dropped before `seg` is given back or dropped. With
        // REMOTE_READ access the device only reads it, so the shared reference `as_slice`
        // hands out elsewhere is never written under.
        let mr = unsafe { pd.register(ptr, len, MrAccess::RemoteRead) }?;
        Ok(Registered { mr, seg })
    }
}

impl RegisteredRecv {
    /// Registers `seg` remote-write (and remote-read with `readable`; dropped on failure:
    /// its request fails).
    pub(crate) fn new(
        pd: &ProtectionDomain,
        mut seg: RecvSeg,
        readable: bool,
    ) -> Result<RegisteredRecv, RdmaError> {
        let len = seg.len();
        let ptr = seg.addr();
        let access = if readable {
            MrAccess::RemoteReadWrite
        } else {
            MrAccess::RemoteWrite
        };
        // SAFETY: the memory stays valid while `seg` is owned here (see the module
        // documentation), and `mr` is dropped before `seg` is given back or dropped. No
        // reference to the segment's bytes is made while it is registered: this type
        // exposes none, and the segment's owner (the request) gets it back only through
        // `into_segment`, after deregistration.
        let mr = unsafe { pd.register(ptr, len, access) }?;
        Ok(Registered { mr, seg })
    }
}
