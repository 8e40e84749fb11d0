//! Asynchronous reads and writes that survive a reconnect.
//!
//! The plain async operations move the caller's buffers into the transport, which keeps
//! them when the connection fails: nothing is left to send again. When the client may
//! reconnect, [`File`]'s async operations come here instead: the completion *holds* the
//! buffers (a [`Held`] from the pool module, which owns the `unsafe` and says why the views
//! stay valid), and the transport gets raw views of them (pool buffers keep their
//! registration keys). If the connection is lost, the completion's finish step reconnects
//! and does the whole operation again synchronously on the same buffers (reads, and writes
//! at an offset, are safe to repeat), then hands the buffers back as usual. A completion
//! dropped unfinished waits for its requests (see [`super::Completion`]'s `Drop`), so the
//! held buffers outlive every view the transport has of them.

use super::reconnect::is_lost;
use super::{contiguous, plan_requests, read_len, write_len, Completion, File, One};
use crate::error::Result;
pub(crate) use crate::pool::held::{Held, Holding};
use crate::pool::Iobref;
use crate::proto::Req;
use crate::transport::{RecvSeg, Reply, SendSeg};

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
    let mut out: Vec<(usize, Req, crate::transport::Pending<Reply>)> =
        Vec::with_capacity(plan.len());
    let mut pos = offset;
    for pieces in &plan {
        let want: usize = pieces.iter().map(|p| p.2).sum();
        // The held buffers stay in the completion (or, on the synchronous path, borrowed by
        // the caller) until every request started here has completed.
        let views = match pieces
            .iter()
            .map(|&(i, off, n)| bufs.view(i, off, n))
            .collect::<Result<Vec<_>>>()
        {
            Ok(v) => v.into_iter(),
            Err(e) => {
                // Wait for what was started (it uses the buffers) before failing.
                for (_, _, p) in out {
                    let _ = p.wait();
                }
                return Err(e);
            }
        };
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
                .collect::<Vec<_>>();
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
        bufs: B,
        offset: u64,
        write: bool,
    ) -> Result<Completion<(usize, B)>> {
        self.held_op(bufs, offset, write, finish_held::<B>, |r| r)
    }

    /// An async read or write over held buffers: when one request carries them all (the
    /// common case), a completion that allocates nothing, finished by `one`; otherwise
    /// one request per planned group, the result passed through `many`.
    pub(crate) fn held_op<B: Held, T: 'static>(
        &self,
        mut bufs: B,
        offset: u64,
        write: bool,
        one: super::FinishOne<T>,
        many: fn((usize, B)) -> T,
    ) -> Result<Completion<T>> {
        let l = self.limits();
        let count = bufs.count();
        let total: usize = (0..count).map(|i| bufs.len_of(i)).sum();
        let fits = total > 0 && count <= l.max_segments && total <= l.max_payload;
        if !fits {
            return Ok(self.held_many(bufs, offset, write)?.map(many));
        }
        let fh = self.state.fh()?;
        let (mut send, mut recv) = self.client.vectors();
        let req = if write {
            Req::Write { fh, offset }
        } else {
            Req::Read {
                fh,
                offset,
                len: total as u32,
            }
        };
        for i in 0..count {
            let n = bufs.len_of(i);
            if n == 0 {
                continue;
            }
            // The buffers move into the completion below, which waits for this request
            // before it lets them go (also when dropped unfinished).
            let v = bufs.view(i, 0, n)?;
            if write {
                send.push(SendSeg::Raw(v));
            } else {
                recv.push(RecvSeg::Raw(v));
            }
        }
        let started = self.client.start(&req, send, recv);
        let ctx = One {
            req,
            held: bufs.hold(),
            file: Some(self.alias()),
            offset,
        };
        match started {
            Ok(p) => Ok(Completion::one(p, ctx, one)),
            // The connection was already gone: nothing was sent; do it now, again.
            Err(e) if is_lost(&e) && self.client.inner.link.can_redial() => {
                let mut held = ctx.held;
                let n = redo(self, &mut held, offset, write)?;
                let bufs = B::unhold(held);
                Ok(Completion::new(Vec::new(), move |_| Ok(many((n, bufs)))))
            }
            Err(e) => Err(e),
        }
    }

    /// [`File::held_async`] split into several requests.
    fn held_many<B: Held>(
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
                .collect::<Vec<_>>();
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

/// Finishes a one-request operation on held buffers: the bytes done, or, when the
/// connection was lost and the client reconnects, the whole operation done again on the
/// same buffers. The reply's vectors go back to the client for later requests.
fn conclude_held(one: One, r: Result<Reply>) -> Result<(usize, Holding)> {
    let One {
        req,
        mut held,
        file,
        offset,
    } = one;
    let write = matches!(req, Req::Write { .. });
    let done = r.and_then(|reply| {
        let n = if write {
            write_len(&req, &reply)
        } else {
            read_len(&req, &reply)
        };
        if let Some(f) = &file {
            f.client.recycle(reply);
        }
        n
    });
    match (done, file) {
        (Ok(n), _) => Ok((n, held)),
        (Err(e), Some(f)) if is_lost(&e) && f.client.inner.link.can_redial() => {
            let n = redo(&f, &mut held, offset, write)?;
            Ok((n, held))
        }
        (Err(e), _) => Err(e),
    }
}

/// [`conclude_held`] with the buffers given back as the caller's type.
pub(crate) fn finish_held<B: Held>(one: One, r: Result<Reply>) -> Result<(usize, B)> {
    let (n, held) = conclude_held(one, r)?;
    Ok((n, B::unhold(held)))
}

/// [`conclude_held`] for a read into pool buffers: the buffers trimmed to what was read.
pub(crate) fn finish_read_trimmed(one: One, r: Result<Reply>) -> Result<Iobref> {
    let (n, held) = conclude_held(one, r)?;
    Ok(trim(Iobref::unhold(held), n))
}

/// Trims pool buffers to the first `n` bytes (the rest go back to the pool), in place.
pub(crate) fn trim(mut bufs: Iobref, n: usize) -> Iobref {
    bufs.trim(n);
    bufs
}
