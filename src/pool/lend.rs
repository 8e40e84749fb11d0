//! Memory lent to the requests of one blocking call (part of the pool module because it
//! holds `unsafe`): the caller's iovecs, or pool buffers the caller keeps, cut into
//! segments and carried by requests that [`Lent::run`] waits for before the borrow ends.
//!
//! This is the one place the client turns borrowed memory into [`RawSeg`]s, whose
//! constructors are `unsafe` because a segment carries no lifetime: the borrow checker
//! cannot see that the transport stops touching the memory when the request completes.
//! `Lent` restores that: it holds the borrow for `'a`, makes segments only inside
//! [`Lent::run`], and `run` returns only once every request it started has completed (also
//! when a panic unwinds through it), which by the transport contract
//! ([`crate::transport::ClientConn::start`]) is when the transport lets go of the segments.

use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::ptr::NonNull;

use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::pool::seg::{RawSeg, RecvSeg, SendSeg};
use crate::pool::{Iobref, IobufMut};
use crate::transport::Pending;

/// One piece of lent memory: `(index of the iovec or buffer, offset in it, length)`.
pub(crate) type Piece = (usize, usize, usize);

/// Iovecs or buffers a call lends, up to this many without a heap allocation.
const INLINE: usize = 16;

/// Requests one call starts, up to this many without a heap allocation.
const INLINE_REQUESTS: usize = 4;

/// The results of [`Lent::run`], in order.
pub(crate) type Results<R> = SmallVec<[Result<R>; INLINE_REQUESTS]>;

enum Src<'a> {
    /// Caller memory: its start and length.
    Raw(NonNull<u8>, usize),
    /// A pool buffer the caller keeps (its registration keys travel with a whole-buffer
    /// segment).
    Pool(&'a IobufMut),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::Raw(_, n) => *n,
            Src::Pool(b) => b.len(),
        }
    }
}

/// Memory borrowed for `'a` and lent to requests, either for the transport to fill
/// (`for_reading`) or to send from (`for_writing`, `for_writing_pool`).
pub(crate) struct Lent<'a> {
    srcs: SmallVec<[Src<'a>; INLINE]>,
    /// True when the transport writes the memory (receive segments).
    fill: bool,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> Lent<'a> {
    /// The caller's iovecs, for the transport to write reply payload into.
    pub(crate) fn for_reading(iov: &'a mut [IoSliceMut<'_>]) -> Lent<'a> {
        let srcs = iov
            .iter_mut()
            .map(|s| Src::Raw(NonNull::from(&mut **s).cast(), s.len()))
            .collect();
        Lent {
            srcs,
            fill: true,
            _borrow: PhantomData,
        }
    }

    /// The caller's iovecs, for the transport to send from (it only reads them).
    pub(crate) fn for_writing(iov: &'a [IoSlice<'_>]) -> Lent<'a> {
        let srcs = iov
            .iter()
            .map(|s| Src::Raw(NonNull::from(&**s).cast(), s.len()))
            .collect();
        Lent {
            srcs,
            fill: false,
            _borrow: PhantomData,
        }
    }

    /// Pool buffers the caller keeps, for the transport to send from.
    pub(crate) fn for_writing_pool(bufs: &'a Iobref) -> Lent<'a> {
        Lent {
            srcs: bufs.buffers().iter().map(Src::Pool).collect(),
            fill: false,
            _borrow: PhantomData,
        }
    }

    /// The length of each lent iovec or buffer, in order.
    pub(crate) fn lens(&self) -> Vec<usize> {
        self.srcs.iter().map(Src::len).collect()
    }

    /// The lent memory as one group of whole, non-empty pieces, and its bytes, if one
    /// request within `max_segments` and `max_payload` can carry it all.
    pub(crate) fn one_group(
        &self,
        max_segments: usize,
        max_payload: usize,
    ) -> Option<(SmallVec<[Piece; INLINE]>, usize)> {
        let pieces: SmallVec<[Piece; INLINE]> = (self.srcs.iter().enumerate())
            .filter(|(_, s)| s.len() > 0)
            .map(|(i, s)| (i, 0, s.len()))
            .collect();
        let total: usize = pieces.iter().map(|p| p.2).sum();
        (!pieces.is_empty() && pieces.len() <= max_segments && total <= max_payload)
            .then_some((pieces, total))
    }

    /// The segment for one piece. Panics on a piece outside the lent memory (a planning
    /// bug), before any segment exists.
    fn seg(&self, (i, off, n): Piece) -> RawSeg {
        let src = &self.srcs[i];
        assert!(
            off.checked_add(n).is_some_and(|end| end <= src.len()),
            "piece ({i}, {off}, {n}) outside a lent segment of {} bytes",
            src.len()
        );
        match *src {
            // SAFETY: the buffer is borrowed for 'a (shared: the transport only reads a
            // send segment) and `run`, the only caller, waits for the request that
            // carries this segment before it returns.
            Src::Pool(b) if off == 0 && n == b.len() => unsafe { RawSeg::from_pool(b) },
            Src::Pool(b) => {
                // The buffer's memory, at an offset the assert above keeps inside it.
                let p = NonNull::from(&b[off..off + n]).cast::<u8>();
                // SAFETY: as above, for a sub-range of the buffer.
                unsafe { RawSeg::new(p, n) }
            }
            Src::Raw(base, _) => {
                // SAFETY: `off + n` is within the iovec's length (asserted above), so the
                // pointer stays inside the borrowed iovec.
                let p = unsafe { base.add(off) };
                // SAFETY: the iovec is borrowed for 'a (mutably when the transport fills
                // it, so nothing else touches it) and `run`, the only caller, waits for
                // the request that carries this segment before it returns.
                unsafe { RawSeg::new(p, n) }
            }
        }
    }

    /// Starts one request per group of pieces with that group's segments (receive
    /// segments when lent for reading, send segments when lent for writing), pushed into
    /// the empty vectors `vectors` gives: `start` gets the group and its send and receive
    /// segments, and gives them to the transport in a request whose [`Pending`] it
    /// returns. Stops starting at the first error, which it returns beside the results.
    /// Returns only once every started request has completed, their results in order.
    pub(crate) fn run<R, G: AsRef<[Piece]>>(
        &self,
        groups: &[G],
        mut vectors: impl FnMut() -> (Vec<SendSeg>, Vec<RecvSeg>),
        mut start: impl FnMut(&[Piece], Vec<SendSeg>, Vec<RecvSeg>) -> Result<Pending<R>>,
    ) -> (Results<R>, Option<Error>) {
        let mut started = WaitAll(SmallVec::with_capacity(groups.len()));
        let mut err = None;
        for g in groups {
            let g = g.as_ref();
            let segs = g.iter().map(|&p| self.seg(p));
            let (mut send, mut recv) = vectors();
            if self.fill {
                recv.extend(segs.map(RecvSeg::Raw));
            } else {
                send.extend(segs.map(SendSeg::Raw));
            }
            match start(g, send, recv) {
                Ok(p) => started.0.push(p),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        // Waited for front to back; whatever a panic leaves in `started` is waited for as
        // it drops.
        let mut results = Results::with_capacity(started.0.len());
        started.0.reverse();
        while let Some(p) = started.0.pop() {
            results.push(p.wait());
        }
        (results, err)
    }
}

/// Requests in flight on lent memory: waited for if dropped early (a panic unwinding
/// through [`Lent::run`]), so that the memory is never released under a transport still
/// using it.
struct WaitAll<R>(SmallVec<[Pending<R>; INLINE_REQUESTS]>);

impl<R> Drop for WaitAll<R> {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            let _ = p.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::pair;

    #[test]
    fn segments_cover_the_pieces_and_run_stops_at_the_first_refusal() {
        let mut a = vec![0u8; 10];
        let mut b = vec![0u8; 20];
        let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let lent = Lent::for_reading(&mut iov);
        assert_eq!(lent.lens(), [10, 20]);
        let groups = vec![
            vec![(0, 2, 8), (1, 0, 5)],
            vec![(1, 5, 15)],
            vec![(1, 0, 1)],
        ];
        let mut calls = 0;
        let (results, err) = lent.run(&groups, Default::default, |pieces, send, mut recv| {
            calls += 1;
            assert!(send.is_empty());
            let lens: Vec<usize> = recv.iter().map(RecvSeg::len).collect();
            assert_eq!(lens, pieces.iter().map(|p| p.2).collect::<Vec<_>>());
            if calls == 3 {
                return Err(Error::InvalidArgument("refused".into()));
            }
            // The transport's part: fill the segments, then complete.
            for (k, seg) in recv.iter_mut().enumerate() {
                seg.as_mut_slice().fill(calls as u8 * 10 + k as u8);
            }
            let (c, p) = pair();
            c.complete(Ok(calls));
            Ok(p)
        });
        assert_eq!(calls, 3);
        assert!(matches!(err, Some(Error::InvalidArgument(_))));
        let done: Vec<usize> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(done, [1, 2]);
        drop(lent);
        assert_eq!(a, [0, 0, 10, 10, 10, 10, 10, 10, 10, 10]);
        assert_eq!(&b[..5], [11; 5]);
        assert_eq!(&b[5..], [20; 15]);
    }

    #[test]
    #[should_panic(expected = "outside a lent segment")]
    fn a_piece_outside_the_lent_memory_panics_before_any_segment_exists() {
        let data = vec![1u8; 8];
        let iov = [IoSlice::new(&data)];
        let lent = Lent::for_writing(&iov);
        let _ = lent.run(
            &[vec![(0, 4, 5)]],
            Default::default,
            |_, _, _| -> Result<Pending<()>> { unreachable!("no request may start") },
        );
    }
}
