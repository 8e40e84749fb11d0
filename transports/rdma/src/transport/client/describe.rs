//! Describing a request to the server: its payload by memory keys (pool segments), regions
//! registered on the fly (large foreign segments), bounce buffers (small ones) or inline bytes;
//! with per-request exposure the memory windows to bind; then the request message itself.

use std::sync::atomic::Ordering;

use zcio::transport::{recv_len, send_len, RecvSeg, SendSeg};
use zcio::{Error, IobufMut, Result};

use super::super::device::register_err;
use super::super::msg::{encode_request, request_len, Desc, RequestHead};
use super::super::plan::push_desc;
use super::super::MAX_INLINE;
use super::Lane;
use crate::verbs::{
    ArenaRegistrar, MemoryRegion, MemoryWindow, RegisteredRecv, RegisteredSend, WindowAccess,
};

/// A run of small receive segments bounced through one pool buffer.
pub(super) struct RecvBounce {
    pub(super) buf: IobufMut,
    /// Offset of the buffer's first byte in the reply payload.
    pub(super) pos: usize,
    /// Segment and offset in it where the buffer's first byte belongs.
    pub(super) seg: usize,
    pub(super) seg_off: usize,
}

/// A memory window to bind over pool memory for one request (`rdma.client_exposure =
/// "request"`).
pub(super) struct Bind {
    pub(super) mr: MemoryRegion,
    pub(super) addr: u64,
    pub(super) len: usize,
    pub(super) access: WindowAccess,
}

/// Per-slot working storage, reused from request to request: nothing on a request's way
/// allocates once the slot has carried a request of its shape.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) send_descs: Vec<Desc>,
    pub(super) recv_descs: Vec<Desc>,
    /// Segments registered on the fly for this request, by their index in the request
    /// (taken out of it, and put back when the reply is in).
    pub(super) sent: Vec<(usize, RegisteredSend)>,
    pub(super) recvd: Vec<(usize, RegisteredRecv)>,
    pub(super) send_bounce: Vec<IobufMut>,
    pub(super) recv_bounce: Vec<RecvBounce>,
    /// The windows this request binds, `binds[k]` with `windows[k]`.
    pub(super) binds: Vec<Bind>,
    /// The slot's memory windows, allocated as its requests need them and kept: the first
    /// `binds.len()` are bound while the request is in flight, and invalidated (the
    /// invalidations executed) before it completes.
    pub(super) windows: Vec<MemoryWindow>,
    /// The reply's inline payload, held while the windows are being invalidated.
    pub(super) inline: Vec<u8>,
}

impl Scratch {
    pub(super) fn with_capacity(n: usize) -> Scratch {
        Scratch {
            send_descs: Vec::with_capacity(n),
            recv_descs: Vec::with_capacity(n),
            sent: Vec::new(),
            recvd: Vec::new(),
            send_bounce: Vec::new(),
            recv_bounce: Vec::new(),
            // Room for the windows of a request of a few segments (more grow once).
            binds: Vec::with_capacity(4),
            windows: Vec::with_capacity(4),
            inline: Vec::with_capacity(MAX_INLINE),
        }
    }

    /// Back to empty for the next request; the windows stay, unbound (a request's windows
    /// are invalidated before it completes; after a failure the scratch goes with it).
    pub(super) fn clear(&mut self) {
        self.send_descs.clear();
        self.recv_descs.clear();
        self.sent.clear();
        self.recvd.clear();
        self.send_bounce.clear();
        self.recv_bounce.clear();
        self.binds.clear();
        self.inline.clear();
    }
}

/// Where a send segment's bytes are.
pub(super) fn send_addr(s: &SendSeg) -> u64 {
    s.as_slice().as_ptr() as u64
}

/// The error a failed window allocation becomes.
pub(super) fn window_err(e: crate::RdmaError) -> Error {
    Error::Transport {
        transport: "rdma",
        what: "allocating a memory window (rdma.client_exposure = \"request\")".into(),
        source: Box::new(e),
    }
}

impl Lane {
    /// The key a descriptor of pool memory carries until the request is sent: the
    /// arena's rkey with `"arena"`; with `"request"` its lkey, which [`Lane::plan_windows`]
    /// looks the region up by and replaces with a window's rkey (a region without remote
    /// access may have no distinct rkey: rxe gives them all 0).
    pub(super) fn pool_key(&self, lkey: u32, rkey: u32) -> u32 {
        if self.windowed.is_some() {
            lkey
        } else {
            rkey
        }
    }

    /// A bounce buffer for the next `want` bytes of a run of small segments.
    pub(super) fn bounce_buf(&self, want: usize) -> Result<IobufMut> {
        self.pool.get(want.clamp(1, self.pool.max_buffer_size()))
    }

    pub(super) fn desc_of(&self, buf: &IobufMut, len: usize) -> Result<Desc> {
        let keys = buf.keys(self.reg).ok_or_else(|| {
            Error::InvalidArgument("a pool buffer without rdma registration".into())
        })?;
        Ok(Desc {
            addr: buf.as_ptr() as u64,
            rkey: self.pool_key(keys.lkey, keys.rkey),
            len: len as u32,
        })
    }

    /// Bytes of bounced send segments from `from` on, starting with `first` bytes.
    pub(super) fn send_run(&self, send: &[SendSeg], from: usize, first: usize) -> usize {
        first
            + send[from + 1..]
                .iter()
                .take_while(|s| {
                    s.is_empty()
                        || (s.keys(self.reg).is_none() && s.len() < self.register_threshold)
                })
                .map(SendSeg::len)
                .sum::<usize>()
    }

    pub(super) fn describe_send(&self, send: &mut [SendSeg], s: &mut Scratch) -> Result<()> {
        // The bounce buffer being filled, and how much of it is.
        let mut cur: Option<(IobufMut, usize)> = None;
        for i in 0..send.len() {
            let seg = &send[i];
            let len = seg.len();
            if len == 0 {
                continue;
            }
            if let Some(k) = seg.keys(self.reg) {
                self.flush_send(&mut cur, s)?;
                push_desc(
                    &mut s.send_descs,
                    Desc {
                        addr: send_addr(seg),
                        rkey: self.pool_key(k.lkey, k.rkey),
                        len: len as u32,
                    },
                );
            } else if len >= self.register_threshold {
                self.flush_send(&mut cur, s)?;
                // Out of the request while registered; put back with the reply.
                let seg = std::mem::replace(&mut send[i], SendSeg::Owned(Vec::new()));
                let r = RegisteredSend::new(&self.pd, seg).map_err(register_err)?;
                push_desc(
                    &mut s.send_descs,
                    Desc {
                        addr: r.addr(),
                        rkey: r.rkey(),
                        len: len as u32,
                    },
                );
                s.sent.push((i, r));
            } else {
                let mut bytes = seg.as_slice();
                while !bytes.is_empty() {
                    let full = cur.as_ref().is_some_and(|(b, n)| *n == b.len());
                    if full {
                        self.flush_send(&mut cur, s)?;
                    }
                    if cur.is_none() {
                        let want = self.send_run(send, i, bytes.len());
                        cur = Some((self.bounce_buf(want)?, 0));
                    }
                    if let Some((b, n)) = cur.as_mut() {
                        let k = (b.len() - *n).min(bytes.len());
                        b[*n..*n + k].copy_from_slice(&bytes[..k]);
                        *n += k;
                        bytes = &bytes[k..];
                    }
                }
            }
        }
        self.flush_send(&mut cur, s)
    }

    pub(super) fn flush_send(
        &self,
        cur: &mut Option<(IobufMut, usize)>,
        s: &mut Scratch,
    ) -> Result<()> {
        if let Some((mut b, n)) = cur.take() {
            if n > 0 {
                b.set_len(n);
                push_desc(&mut s.send_descs, self.desc_of(&b, n)?);
                s.send_bounce.push(b);
            }
        }
        Ok(())
    }

    pub(super) fn recv_run(&self, recv: &[RecvSeg], from: usize, first: usize) -> usize {
        first
            + recv[from + 1..]
                .iter()
                .take_while(|s| {
                    s.is_empty()
                        || (s.keys(self.reg).is_none() && s.len() < self.register_threshold)
                })
                .map(RecvSeg::len)
                .sum::<usize>()
    }

    pub(super) fn describe_recv(&self, recv: &mut [RecvSeg], s: &mut Scratch) -> Result<()> {
        let mut cur: Option<RecvBounce> = None;
        let mut pos = 0usize;
        for i in 0..recv.len() {
            let len = recv[i].len();
            if len == 0 {
                continue;
            }
            if let Some(k) = recv[i].keys(self.reg) {
                self.flush_recv(&mut cur, pos, s)?;
                let addr = recv[i].addr() as u64;
                push_desc(
                    &mut s.recv_descs,
                    Desc {
                        addr,
                        rkey: self.pool_key(k.lkey, k.rkey),
                        len: len as u32,
                    },
                );
                pos += len;
            } else if len >= self.register_threshold {
                self.flush_recv(&mut cur, pos, s)?;
                // With per-request exposure, the server may only write a reply's memory.
                let readable = self.windowed.is_none();
                let seg = std::mem::replace(&mut recv[i], RecvSeg::Owned(Vec::new()));
                let r = RegisteredRecv::new(&self.pd, seg, readable).map_err(register_err)?;
                push_desc(
                    &mut s.recv_descs,
                    Desc {
                        addr: r.addr(),
                        rkey: r.rkey(),
                        len: len as u32,
                    },
                );
                s.recvd.push((i, r));
                pos += len;
            } else {
                let mut off = 0;
                while off < len {
                    // An open bounce buffer holds the bytes from its `pos` up to `pos` now.
                    let full = cur.as_ref().is_some_and(|b| pos - b.pos == b.buf.len());
                    if full {
                        self.flush_recv(&mut cur, pos, s)?;
                    }
                    if cur.is_none() {
                        let want = self.recv_run(recv, i, len - off);
                        cur = Some(RecvBounce {
                            buf: self.bounce_buf(want)?,
                            pos,
                            seg: i,
                            seg_off: off,
                        });
                    }
                    if let Some(b) = cur.as_ref() {
                        let room = b.buf.len() - (pos - b.pos);
                        let k = room.min(len - off);
                        off += k;
                        pos += k;
                    }
                }
            }
        }
        self.flush_recv(&mut cur, pos, s)
    }

    /// Closes the open bounce buffer, which covers the payload from its `pos` to `pos`.
    pub(super) fn flush_recv(
        &self,
        cur: &mut Option<RecvBounce>,
        pos: usize,
        s: &mut Scratch,
    ) -> Result<()> {
        if let Some(mut b) = cur.take() {
            let used = pos - b.pos;
            if used > 0 {
                b.buf.set_len(used);
                push_desc(&mut s.recv_descs, self.desc_of(&b.buf, used)?);
                s.recv_bounce.push(b);
            }
        }
        Ok(())
    }

    /// With per-request exposure: a window for each descriptor of pool memory (the others
    /// name regions registered on the fly for this request alone), over exactly its bytes,
    /// remote read for request payload and remote write for reply payload; the descriptor
    /// gets the rkey the window's bind will give. The binds are posted in `start`.
    pub(super) fn plan_windows(&self, reg: &ArenaRegistrar, s: &mut Scratch) -> Result<()> {
        let Scratch {
            send_descs,
            recv_descs,
            sent,
            recvd,
            binds,
            windows,
            ..
        } = s;
        let descs = send_descs
            .iter_mut()
            .map(|d| (d, WindowAccess::RemoteRead))
            .chain(
                recv_descs
                    .iter_mut()
                    .map(|d| (d, WindowAccess::RemoteWrite)),
            );
        for (d, access) in descs {
            // A segment registered for this request alone: its own rkey, its own range.
            let inside = |addr: u64, len: usize| {
                d.addr >= addr && d.addr + u64::from(d.len) <= addr + len as u64
            };
            let own = sent
                .iter()
                .any(|(_, r)| r.rkey() == d.rkey && inside(r.addr(), r.len()))
                || recvd
                    .iter()
                    .any(|(_, r)| r.rkey() == d.rkey && inside(r.addr(), r.len()));
            if own {
                continue;
            }
            // Pool memory: the descriptor carries the arena's lkey (`pool_key`).
            let mr = reg.region(d.rkey).ok_or_else(|| {
                Error::InvalidArgument("a pool buffer without rdma registration".into())
            })?;
            if !usize::try_from(d.addr).is_ok_and(|a| mr.contains(a, d.len as usize)) {
                return Err(Error::InvalidArgument(format!(
                    "{} bytes at {:#x} are not inside the pool arena they name",
                    d.len, d.addr
                )));
            }
            let k = binds.len();
            if windows.len() <= k {
                windows.push(MemoryWindow::new(&self.pd).map_err(window_err)?);
            }
            d.rkey = windows[k].next_rkey();
            binds.push(Bind {
                mr,
                addr: d.addr,
                len: d.len as usize,
                access,
            });
        }
        let need = 2 * binds.len() + 1;
        if need > self.sq_total {
            return Err(Error::InvalidArgument(format!(
                "the request needs {} memory windows, {need} send-queue entries; the queue \
                 pair has {} (rdma.client_exposure = \"request\")",
                binds.len(),
                self.sq_total
            )));
        }
        Ok(())
    }

    /// Describes the payload and encodes the request into `msg`; returns the message
    /// length and the reply capacity.
    pub(super) fn prepare(
        &self,
        id: u64,
        header: &[u8],
        send: &mut [SendSeg],
        recv: &mut [RecvSeg],
        s: &mut Scratch,
        msg: &mut IobufMut,
    ) -> Result<(usize, usize)> {
        s.clear();
        let send_total = send_len(send);
        let recv_cap = recv_len(recv);
        let inline = self.limits.inline_threshold;
        let inline_send = send_total > 0 && send_total <= inline;
        if send_total > 0 && !inline_send {
            self.describe_send(send, s)?;
        }
        if recv_cap > inline {
            self.describe_recv(recv, s)?;
        }
        if let Some(reg) = &self.windowed {
            self.plan_windows(reg, s)?;
        }
        let keyed = !s.send_descs.is_empty() || !s.recv_descs.is_empty();
        let every = u64::from(self.faults.qp_error_every);
        let nth =
            every > 0 && keyed && (self.keyed.fetch_add(1, Ordering::Relaxed) + 1) % every == 0;
        if self.faults.corrupt_rkeys || nth {
            for d in s.send_descs.iter_mut().chain(s.recv_descs.iter_mut()) {
                d.rkey ^= 0x00ff_ff00;
            }
        }
        let inline_len = if inline_send { send_total } else { 0 };
        let len = request_len(
            header.len(),
            s.send_descs.len(),
            s.recv_descs.len(),
            inline_len,
        );
        let cap = msg.capacity();
        msg.set_len(cap);
        let head = RequestHead {
            id,
            inline_len,
            recv_cap,
            send_total,
        };
        // The negotiated limits make every request fit its slot's buffer.
        let mut at = encode_request(&mut msg[..], &head, header, &s.send_descs, &s.recv_descs)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the rdma request: {e}")))?;
        if inline_send {
            for seg in send {
                let b = seg.as_slice();
                msg[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
        }
        msg.set_len(len);
        Ok((len, recv_cap))
    }
}
