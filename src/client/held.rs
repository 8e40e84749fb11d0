//! Asynchronous reads and writes that survive a reconnect.
//!
//! The plain async operations move the caller's buffers into the transport, which keeps
//! them when the connection fails: nothing is left to send again. When the client may
//! reconnect, [`File`]'s async operations come here instead: the completion *holds* the
//! buffers, and the transport gets raw views of them (pool buffers keep their
//! registration keys). If the connection is lost, the completion's finish step reconnects
//! and does the whole operation again synchronously on the same buffers (reads, and writes
//! at an offset, are safe to repeat), then hands the buffers back as usual. A completion
//! dropped unfinished waits for its requests (see [`super::Completion`]'s `Drop`), so the
//! held buffers outlive every view the transport has of them.

use std::ptr::NonNull;

use super::reconnect::is_lost;
use super::{contiguous, plan_requests, read_len, write_len, Completion, File};
use crate::error::Result;
use crate::pool::Iobref;
use crate::proto::Req;
use crate::transport::{RawSeg, RecvSeg, SendSeg};

/// Buffers a completion holds while the transport uses raw views of them.
pub(crate) trait Held: Send + 'static {
    /// Each buffer's length.
    fn lens(&self) -> Vec<usize>;
    /// A raw view of `n` bytes at `off` in buffer `i`.
    ///
    /// # Safety
    /// The view must not outlive the buffers, and nothing may move or free them meanwhile.
    unsafe fn view(&mut self, i: usize, off: usize, n: usize) -> RawSeg;
}

impl Held for Vec<Vec<u8>> {
    fn lens(&self) -> Vec<usize> {
        self.iter().map(Vec::len).collect()
    }
    unsafe fn view(&mut self, i: usize, off: usize, n: usize) -> RawSeg {
        // SAFETY: `off + n <= len` (the plan cuts within the lengths); the caller keeps the
        // vector alive and unmoved (its heap block does not move with the Vec).
        let p = unsafe { NonNull::new_unchecked(self[i].as_mut_ptr().add(off)) };
        // SAFETY: as above.
        unsafe { RawSeg::new(p, n) }
    }
}

impl Held for Iobref {
    fn lens(&self) -> Vec<usize> {
        self.buffers().iter().map(|b| b.len()).collect()
    }
    unsafe fn view(&mut self, i: usize, off: usize, n: usize) -> RawSeg {
        let b = &mut self.buffers_mut()[i];
        if off == 0 && n == b.len() {
            // SAFETY: the caller keeps the buffer alive; a whole pool buffer keeps its keys.
            unsafe { RawSeg::from_pool(b) }
        } else {
            // SAFETY: within the buffer; the caller keeps it alive.
            let p = unsafe { NonNull::new_unchecked(b.as_mut_ptr().add(off)) };
            // SAFETY: as above.
            unsafe { RawSeg::new(p, n) }
        }
    }
}

/// Starts one request per planned group over the held buffers.
fn start_all<B: Held>(
    f: &File,
    bufs: &mut B,
    offset: u64,
    write: bool,
) -> Result<
    Vec<(
        usize,
        Req,
        crate::transport::Pending<crate::transport::Reply>,
    )>,
> {
    let l = f.limits();
    let plan = plan_requests(&bufs.lens(), l.max_segments, l.max_payload);
    let fh = f.state.fh()?;
    let mut out = Vec::with_capacity(plan.len());
    let mut pos = offset;
    for pieces in &plan {
        let want: usize = pieces.iter().map(|p| p.2).sum();
        // SAFETY: the held buffers stay in the completion (or, on the synchronous path,
        // borrowed by the caller) until every request started here has completed.
        let views = pieces
            .iter()
            .map(|&(i, off, n)| unsafe { bufs.view(i, off, n) });
        let (req, send, recv) = if write {
            (
                Req::Write { fh, offset: pos },
                views.map(SendSeg::Raw).collect(),
                Vec::new(),
            )
        } else {
            (
                Req::Read {
                    fh,
                    offset: pos,
                    len: want as u32,
                },
                Vec::new(),
                views.map(RecvSeg::Raw).collect(),
            )
        };
        match f.client.start(&req, send, recv) {
            Ok(p) => out.push((want, req, p)),
            Err(e) => {
                // Wait for what was started (it uses the buffers) before failing.
                for (_, _, p) in out {
                    let _ = p.wait();
                }
                return Err(e);
            }
        }
        pos += want as u64;
    }
    Ok(out)
}

/// The whole operation, synchronously, retried across reconnects.
fn redo<B: Held>(f: &File, bufs: &mut B, offset: u64, write: bool) -> Result<usize> {
    f.client
        .retrying(if write { "write" } else { "read" }, true, || {
            let started = start_all(f, bufs, offset, write)?;
            let done = if write { write_len } else { read_len };
            let results = started
                .into_iter()
                .map(|(want, req, p)| (want, p.wait().and_then(|r| done(&req, &r))))
                .collect();
            contiguous(results)
        })
}

impl File {
    /// A second handle on the same open file that never closes it (for a completion's
    /// retry).
    fn alias(&self) -> File {
        File {
            client: self.client.clone(),
            state: self.state.clone(),
            size_at_open: self.size_at_open,
            closed: true,
        }
    }

    /// An async read or write over held buffers (see the module docs); completes with the
    /// bytes done and the buffers.
    pub(crate) fn held_async<B: Held>(
        &self,
        mut bufs: B,
        offset: u64,
        write: bool,
    ) -> Result<Completion<(usize, B)>> {
        let started = match start_all(self, &mut bufs, offset, write) {
            Ok(s) => s,
            // The connection was already gone: nothing was sent; do it now, again.
            Err(e) if is_lost(&e) && self.client.inner.link.can_redial() => {
                let n = redo(self, &mut bufs, offset, write)?;
                return Ok(Completion::new(Vec::new(), move |_| Ok((n, bufs))));
            }
            Err(e) => return Err(e),
        };
        let alias = self.alias();
        let mut reqs = Vec::with_capacity(started.len());
        let mut parts = Vec::with_capacity(started.len());
        for (want, req, p) in started {
            reqs.push((want, req));
            parts.push(p);
        }
        Ok(Completion::new(parts, move |replies| {
            let done = if write { write_len } else { read_len };
            let results = reqs
                .into_iter()
                .zip(replies)
                .map(|((want, req), r)| (want, r.and_then(|r| done(&req, &r))))
                .collect();
            let mut bufs = bufs;
            match contiguous(results) {
                Ok(n) => Ok((n, bufs)),
                Err(e) if is_lost(&e) && alias.client.inner.link.can_redial() => {
                    let n = redo(&alias, &mut bufs, offset, write)?;
                    Ok((n, bufs))
                }
                Err(e) => Err(e),
            }
        }))
    }
}

/// Trims pool buffers to the first `n` bytes (the rest go back to the pool).
pub(crate) fn trim(bufs: Iobref, n: usize) -> Iobref {
    let mut left = n;
    let mut out = Iobref::new();
    for mut b in bufs.into_vec() {
        if left == 0 {
            break;
        }
        let k = b.len().min(left);
        b.set_len(k);
        left -= k;
        out.push(b);
    }
    out
}
