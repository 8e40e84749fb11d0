//! Asynchronous vectored I/O on memory the caller describes by address (the C library's
//! `zcio_preadv_async` / `zcio_pwritev_async` / `zcio_zero_writev_async`): the transport
//! fills or drains that memory directly, as [`File::preadv`] does, but the call returns at
//! once with a [`Completion`].

use std::ptr::NonNull;

use super::{contiguous, plan_requests, read_len, write_len, Completion, File};
use crate::error::Result;
use crate::pool::Iobref;
use crate::proto::Req;
use crate::transport::{Pending, RawSeg, RecvSeg, Reply, SendSeg};

impl File {
    /// Starts a read at `offset` into the caller's memory `iov` (address, length pairs);
    /// completes with the bytes read (short at end of file). Split within the negotiated
    /// limits like [`File::preadv`].
    ///
    /// # Safety
    /// Every range of `iov` must be valid for writes and untouched by anyone else until
    /// the returned completion has finished (waited, or polled to completion); do not drop
    /// it before then.
    pub unsafe fn preadv_raw_async(
        &self,
        iov: &[(NonNull<u8>, usize)],
        offset: u64,
    ) -> Result<Completion<usize>> {
        // SAFETY: the caller's contract.
        unsafe { self.iov_async(iov, offset, false) }
    }

    /// Starts a write at `offset` from the caller's memory `iov`; completes with the bytes
    /// written.
    ///
    /// # Safety
    /// Every range of `iov` must be valid for reads and not written by anyone until the
    /// returned completion has finished; do not drop it before then.
    pub unsafe fn pwritev_raw_async(
        &self,
        iov: &[(NonNull<u8>, usize)],
        offset: u64,
    ) -> Result<Completion<usize>> {
        // SAFETY: the caller's contract.
        unsafe { self.iov_async(iov, offset, true) }
    }

    /// [`File::preadv_raw_async`] (`write` false) or [`File::pwritev_raw_async`].
    ///
    /// # Safety
    /// As those.
    unsafe fn iov_async(
        &self,
        iov: &[(NonNull<u8>, usize)],
        offset: u64,
        write: bool,
    ) -> Result<Completion<usize>> {
        let lens: Vec<usize> = iov.iter().map(|s| s.1).collect();
        // SAFETY: the caller's contract covers every range of `iov`.
        let seg = |i: usize, off, n| unsafe { raw_piece(iov[i].0, off, n) };
        // SAFETY: as above.
        unsafe { self.raw_async(&lens, offset, write, seg) }
    }

    /// Starts a write of pool buffers the caller keeps (they are not moved into the
    /// request, so they stay the caller's whatever the outcome); completes with the bytes
    /// written. Whole buffers carry their registration keys, so RDMA reads them in place.
    ///
    /// # Safety
    /// `bufs` must stay alive and unwritten until the returned completion has finished; do
    /// not drop it before then.
    pub unsafe fn zero_writev_raw_async(
        &self,
        bufs: &Iobref,
        offset: u64,
    ) -> Result<Completion<usize>> {
        let b = bufs.buffers();
        let lens: Vec<usize> = b.iter().map(|b| b.len()).collect();
        let seg = |i: usize, off, n| {
            if off == 0 && n == b[i].len() {
                // SAFETY: the caller keeps `bufs` alive and unwritten until the completion
                // finishes.
                unsafe { RawSeg::from_pool(&b[i]) }
            } else {
                let p = NonNull::new(b[i].as_ptr().cast_mut()).unwrap_or(NonNull::dangling());
                // SAFETY: as above, for a sub-range inside the buffer.
                unsafe { raw_piece(p, off, n) }
            }
        };
        // SAFETY: as above.
        unsafe { self.raw_async(&lens, offset, true, seg) }
    }

    /// One request per group of [`plan_requests`] over segments of `lens` bytes, whose
    /// pieces `seg(index, offset in it, length)` describes; if starting one fails, the
    /// requests already started are waited for (they may be touching the memory) before
    /// the error is returned.
    ///
    /// # Safety
    /// The memory `seg` describes follows [`File::preadv_raw_async`]'s contract (reads) or
    /// [`File::pwritev_raw_async`]'s (writes).
    unsafe fn raw_async(
        &self,
        lens: &[usize],
        offset: u64,
        write: bool,
        seg: impl Fn(usize, usize, usize) -> RawSeg,
    ) -> Result<Completion<usize>> {
        let fh = self.state.fh()?;
        let l = self.limits();
        let plan = plan_requests(lens, l.max_segments, l.max_payload);
        let mut parts: Vec<Pending<Reply>> = Vec::with_capacity(plan.len());
        let mut wants = Vec::with_capacity(plan.len());
        let mut pos = offset;
        for pieces in &plan {
            let want: usize = pieces.iter().map(|p| p.2).sum();
            let segs = pieces.iter().map(|&(i, off, n)| seg(i, off, n));
            let (req, send, recv) = if write {
                let req = Req::Write { fh, offset: pos };
                (req, segs.map(SendSeg::Raw).collect(), Vec::new())
            } else {
                let req = Req::Read {
                    fh,
                    offset: pos,
                    len: want as u32,
                };
                (req, Vec::new(), segs.map(RecvSeg::Raw).collect())
            };
            match self.client.start(&req, send, recv) {
                Ok(p) => parts.push(p),
                Err(e) => {
                    for p in parts {
                        let _ = p.wait();
                    }
                    return Err(e);
                }
            }
            wants.push((want, req));
            pos += want as u64;
        }
        let done_len = if write { write_len } else { read_len };
        Ok(Completion::new(parts, move |replies| {
            contiguous(
                wants
                    .into_iter()
                    .zip(replies)
                    .map(|((want, req), r)| (want, r.and_then(|r| done_len(&req, &r))))
                    .collect::<Vec<_>>(),
            )
        }))
    }
}

/// `n` bytes at `off` into the segment starting at `base`.
///
/// # Safety
/// `off + n` is within the segment, which follows the calling function's contract.
unsafe fn raw_piece(base: NonNull<u8>, off: usize, n: usize) -> RawSeg {
    // SAFETY: `off` is inside the segment (the caller's contract), so the address is too.
    let p = unsafe { NonNull::new_unchecked(base.as_ptr().add(off)) };
    // SAFETY: the segment's validity is the caller's contract.
    unsafe { RawSeg::new(p, n) }
}
