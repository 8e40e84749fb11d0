//! Payload segments (part of the pool module because it holds `unsafe`): where request payload comes from and where reply payload must land.
//!
//! A segment is either a pool buffer the request owns for its duration, or *borrowed*
//! memory (a caller's own iovec, or a pool buffer the caller keeps) described by address
//! and length. Borrowed segments are created with `unsafe` constructors whose contract the
//! client library upholds by waiting for every request that carries one.

use std::ptr::NonNull;

use crate::pool::{Iobuf, IobufMut, RegionKeys, RegistrarId, MAX_REGISTRARS};

/// The local and remote keys of registered memory, copied out of [`RegionKeys`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegKeys {
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
}

impl From<&RegionKeys> for SegKeys {
    fn from(k: &RegionKeys) -> Self {
        SegKeys {
            lkey: k.lkey,
            rkey: k.rkey,
        }
    }
}

/// Borrowed memory plus, when it lies in a pool buffer, that buffer's registration keys (so
/// RDMA can use it without registering it again).
#[derive(Debug)]
pub struct RawSeg {
    ptr: NonNull<u8>,
    len: usize,
    keys: [Option<SegKeys>; MAX_REGISTRARS],
    /// The pool the keys belong to.
    pool: Option<u64>,
}

// SAFETY: a RawSeg is an address plus a promise (made by its unsafe constructor) that the
// memory stays valid and unaliased for the request; moving that promise across threads is
// what a transport's reader thread needs.
unsafe impl Send for RawSeg {}
// SAFETY: `&RawSeg` gives no access to the memory beyond what `Send` already allows.
unsafe impl Sync for RawSeg {}

impl RawSeg {
    /// Describes foreign memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid until the request carrying this segment completes.
    /// For a receive segment no other access may happen until then (the transport writes
    /// it); for a send segment it must not be written until then.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> RawSeg {
        RawSeg {
            ptr,
            len,
            keys: [None; MAX_REGISTRARS],
            pool: None,
        }
    }

    /// Describes a pool buffer the caller keeps ownership of.
    ///
    /// # Safety
    /// As [`RawSeg::new`], for the buffer's visible bytes.
    pub unsafe fn from_pool(buf: &IobufMut) -> RawSeg {
        let pool = buf.pool_id();
        let mut keys = [None; MAX_REGISTRARS];
        for (index, k) in keys.iter_mut().enumerate() {
            *k = buf.keys(RegistrarId { pool, index }).map(SegKeys::from);
        }
        RawSeg {
            // A slot always has a non-null address.
            ptr: NonNull::new(buf.as_ptr().cast_mut()).unwrap_or(NonNull::dangling()),
            len: buf.len(),
            keys,
            pool: Some(pool),
        }
    }

    /// Address of the first byte.
    pub fn addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty segment.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the constructor's contract keeps the memory valid and unwritten by
        // others for as long as the request (and so this segment) lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The memory, writable (for the transport filling a receive segment).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the constructor's contract gives the transport exclusive access to a
        // receive segment until the request completes; `&mut self` makes it unique here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Keys of the pool arena holding this memory, if it is pool memory.
    pub fn keys(&self, id: RegistrarId) -> Option<SegKeys> {
        if self.pool != Some(id.pool) {
            return None;
        }
        self.keys.get(id.index).copied().flatten()
    }
}

/// A source of request payload.
#[derive(Debug)]
pub enum SendSeg {
    /// A frozen pool buffer (view) the request holds.
    Pool(Iobuf),
    /// A writable pool buffer the request holds (returned with the reply).
    PoolMut(IobufMut),
    /// Borrowed memory.
    Raw(RawSeg),
    /// Caller heap memory the request owns (returned with the reply). Not registered:
    /// RDMA registers or bounces it by its documented rule.
    Owned(Vec<u8>),
}

impl SendSeg {
    /// The bytes to send.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            SendSeg::Pool(b) => b,
            SendSeg::PoolMut(b) => b,
            SendSeg::Raw(r) => r.as_slice(),
            SendSeg::Owned(v) => v,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True for an empty segment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registration keys, when the memory is pool memory.
    pub fn keys(&self, id: RegistrarId) -> Option<SegKeys> {
        match self {
            SendSeg::Pool(b) => b.keys(id).map(SegKeys::from),
            SendSeg::PoolMut(b) => b.keys(id).map(SegKeys::from),
            SendSeg::Raw(r) => r.keys(id),
            SendSeg::Owned(_) => None,
        }
    }
}

/// A destination of reply payload.
#[derive(Debug)]
pub enum RecvSeg {
    /// A pool buffer the request holds; returned, filled, with the reply.
    Pool(IobufMut),
    /// Borrowed memory.
    Raw(RawSeg),
    /// Caller heap memory the request owns (returned, filled, with the reply).
    Owned(Vec<u8>),
}

impl RecvSeg {
    /// The memory, read-only (e.g. after the reply filled it).
    pub fn as_slice(&self) -> &[u8] {
        match self {
            RecvSeg::Pool(b) => b,
            RecvSeg::Raw(r) => r.as_slice(),
            RecvSeg::Owned(v) => v,
        }
    }

    /// The memory to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            RecvSeg::Pool(b) => b,
            RecvSeg::Raw(r) => r.as_mut_slice(),
            RecvSeg::Owned(v) => v,
        }
    }

    /// Address of the first byte.
    pub fn addr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            RecvSeg::Pool(b) => b.len(),
            RecvSeg::Raw(r) => r.len(),
            RecvSeg::Owned(v) => v.len(),
        }
    }

    /// True for an empty segment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registration keys, when the memory is pool memory.
    pub fn keys(&self, id: RegistrarId) -> Option<SegKeys> {
        match self {
            RecvSeg::Pool(b) => b.keys(id).map(SegKeys::from),
            RecvSeg::Raw(r) => r.keys(id),
            RecvSeg::Owned(_) => None,
        }
    }
}

/// Total length of a list of send segments.
pub fn send_len(segs: &[SendSeg]) -> usize {
    segs.iter().map(SendSeg::len).sum()
}

/// Total length of a list of receive segments.
pub fn recv_len(segs: &[RecvSeg]) -> usize {
    segs.iter().map(RecvSeg::len).sum()
}

/// Copies `src` into the segments front to back; returns the bytes copied. For test
/// doubles and bounce paths only: the real transports fill segments without copying.
pub fn scatter_into(segs: &mut [RecvSeg], mut src: &[u8]) -> usize {
    let mut n = 0;
    for s in segs {
        if src.is_empty() {
            break;
        }
        let d = s.as_mut_slice();
        let k = d.len().min(src.len());
        d[..k].copy_from_slice(&src[..k]);
        src = &src[k..];
        n += k;
    }
    n
}
