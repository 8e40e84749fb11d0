//! Asynchronous vectored I/O on memory the caller describes by address (the C library's
//! `zcio_preadv_async` / `zcio_pwritev_async`): the transport fills or drains that memory
//! directly, as [`File::preadv`] does, but the call returns at once with a [`Completion`].

use std::ptr::NonNull;

use super::{contiguous, plan_requests, read_len, write_len, Completion, File, Piece};
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
    /// the returned completion has finished (waited, polled to completion or dropped after
    /// [`Completion::is_done`]); do not drop it before then.
    pub unsafe fn preadv_raw_async(
        &self,
        iov: &[(NonNull<u8>, usize)],
        offset: u64,
    ) -> Result<Completion<usize>> {
        let fh = self.state.fh()?;
        // SAFETY: the caller's contract is ours.
        unsafe {
            self.raw_async(iov, offset, read_len, |pos, len, segs| {
                (
                    Req::Read {
                        fh,
                        offset: pos,
                        len: len as u32,
                    },
                    Vec::new(),
                    segs.map(RecvSeg::Raw).collect(),
                )
            })
        }
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
        let fh = self.state.fh()?;
        // SAFETY: the caller's contract is ours.
        unsafe {
            self.raw_async(iov, offset, write_len, |pos, _, segs| {
                (
                    Req::Write { fh, offset: pos },
                    segs.map(SendSeg::Raw).collect(),
                    Vec::new(),
                )
            })
        }
    }

    /// Starts a write of pool buffers the caller keeps (they are not moved into the
    /// request, so they stay the caller's whatever the outcome); completes with the bytes
    /// written. Pool buffers carry their registration keys, so RDMA reads them in place.
    ///
    /// # Safety
    /// `bufs` must stay alive and unwritten until the returned completion has finished; do
    /// not drop it before then.
    pub unsafe fn zero_writev_raw_async(
        &self,
        bufs: &Iobref,
        offset: u64,
    ) -> Result<Completion<usize>> {
        let fh = self.state.fh()?;
        let lens: Vec<usize> = bufs.buffers().iter().map(|b| b.len()).collect();
        let l = self.limits();
        let plan = plan_requests(&lens, l.max_segments, l.max_payload);
        let mut parts: Vec<Pending<Reply>> = Vec::with_capacity(plan.len());
        let mut wants = Vec::with_capacity(plan.len());
        let mut pos = offset;
        for pieces in &plan {
            let want: usize = pieces.iter().map(|p| p.2).sum();
            let send = pieces
                .iter()
                .map(|&(i, off, n)| {
                    let b = &bufs.buffers()[i];
                    if off == 0 && n == b.len() {
                        // SAFETY: the caller keeps `bufs` alive and unwritten until the
                        // completion finishes.
                        SendSeg::Raw(unsafe { RawSeg::from_pool(b) })
                    } else {
                        // SAFETY: as above, for a sub-range inside the buffer.
                        let p = unsafe { NonNull::new_unchecked(b.as_ptr().cast_mut().add(off)) };
                        // SAFETY: as above.
                        SendSeg::Raw(unsafe { RawSeg::new(p, n) })
                    }
                })
                .collect();
            let req = Req::Write { fh, offset: pos };
            match self.client.start(&req, send, Vec::new()) {
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
        Ok(finish_planned(parts, wants, write_len))
    }

    /// One request per group of [`plan_requests`]; if starting one fails, the requests
    /// already started are waited for (they may be touching the memory) before the error
    /// is returned.
    ///
    /// # Safety
    /// As [`File::preadv_raw_async`].
    unsafe fn raw_async(
        &self,
        iov: &[(NonNull<u8>, usize)],
        offset: u64,
        done_len: fn(&Req, &Reply) -> Result<usize>,
        make: impl Fn(u64, usize, &mut dyn Iterator<Item = RawSeg>) -> (Req, Vec<SendSeg>, Vec<RecvSeg>),
    ) -> Result<Completion<usize>> {
        let l = self.limits();
        let lens: Vec<usize> = iov.iter().map(|s| s.1).collect();
        let plan = plan_requests(&lens, l.max_segments, l.max_payload);
        let mut parts: Vec<Pending<Reply>> = Vec::with_capacity(plan.len());
        let mut wants = Vec::with_capacity(plan.len());
        let mut pos = offset;
        for pieces in &plan {
            let want: usize = pieces.iter().map(|p| p.2).sum();
            let mut segs = pieces.iter().map(|&(i, off, n): &Piece| {
                // SAFETY: `off < iov[i].1`, so the address stays inside the caller's
                // range; the caller keeps it valid until the completion finishes.
                unsafe { RawSeg::new(NonNull::new_unchecked(iov[i].0.as_ptr().add(off)), n) }
            });
            let (req, send, recv) = make(pos, want, &mut segs);
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
        Ok(finish_planned(parts, wants, done_len))
    }
}

/// The completion of a planned transfer: the bytes done up to the first short piece.
fn finish_planned(
    parts: Vec<Pending<Reply>>,
    wants: Vec<(usize, Req)>,
    done_len: fn(&Req, &Reply) -> Result<usize>,
) -> Completion<usize> {
    Completion::new(parts, move |replies| {
        contiguous(
            wants
                .into_iter()
                .zip(replies)
                .map(|((want, req), r)| (want, r.and_then(|r| done_len(&req, &r))))
                .collect(),
        )
    })
}
