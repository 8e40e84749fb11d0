//! The client side: one or more RC queue pairs per connection (see "Queue pairs" in the
//! transport's documentation), each with a slot per credit and one thread that handles its
//! completions and watches the bootstrap socket.
//!
//! # Request life cycle
//! [`ClientConn::start`] checks the request against the negotiated limits, then takes a free
//! slot (one per credit; it waits up to `client.timeout` when all are in flight). Outside
//! any lock it describes the payload: pool segments by their keys, large foreign segments
//! by a memory region registered on the fly, small foreign segments by bounce buffers from
//! the pool (copied in now for writes, out after the reply for reads), and payload up to the
//! inline threshold inline. It encodes the request into the slot's private message buffer,
//! enters the request in the slot and posts the SEND, all under the connection's lock.
//!
//! The completion thread matches a reply to its slot by the id (`sequence << 16 | slot`),
//! reposts the receive buffer at once (so a credit is never lost), copies inline or bounced
//! payload into the destination segments, deregisters the request's on-the-fly regions and
//! completes the [`Pending`]. The slot is free again once the reply is processed: the server
//! could only reply after the whole request message reached it, so the device is done with
//! the message buffer whether or not the SEND's (usually unsignaled) completion was seen.
//!
//! # Structure
//! The request state machine is plain data in [`ClientLane`] (free slots, ids in flight,
//! which SEND is signaled, the request timeout, the checks on a server's replies), with the
//! send-queue ledger ([`SendQueue`]) and the posted receives ([`Receives`]); all three are
//! pure and tested on any host. This module is the driver: it holds them under each queue
//! pair's lock, feeds them what happened (a reply, a send completion, a tick, the socket's
//! end) and carries out what they answer (post, complete, fail). Connection set-up is in
//! `setup`.
//!
//! # Failure
//! An error completion, a malformed or unexpected reply, end of stream on the bootstrap
//! socket (the server's process died or it closed the connection), [`ClientConn::close`] or
//! a request older than `client.timeout` fail the connection: under the lock the queue pair
//! is destroyed first (after that the device touches none of this connection's memory),
//! then every request in flight is taken out with its segments, regions and bounce buffers,
//! and completes with an error; receive buffers go back to the connection's control pool.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zcio::pool::RegistrarId;
use zcio::transport::{
    check_request, recv_len, send_len, ClientConn, Completer, CompletionCell, Limits, Pending,
    Progress, RecvSeg, Reply, Request, SendSeg,
};
use zcio::{Error, IobufMut, Pool, Result};

use super::conn::{
    buf_sge, chain, describe_failure, post_recv_buf, wr_id, wr_parts, LaneEvents, Poller,
    SendQueue, KIND_BIND, KIND_INV, KIND_RECV, KIND_SEND,
};
use super::device::register_err;
use super::lane::client::{Action, Actions, ClientLane, Event};
use super::lane::receives::Receives;
use super::msg::{decode_reply, encode_request, request_len, Desc, MsgLimits, RequestHead};
use super::plan::push_desc;
use super::{lock, Faults, MAX_INLINE};
use crate::verbs::{
    ArenaRegistrar, MemoryRegion, MemoryWindow, ProtectionDomain, QueuePair, RegisteredRecv,
    RegisteredSend, WindowAccess, WorkCompletion,
};

/// A run of small receive segments bounced through one pool buffer.
struct RecvBounce {
    buf: IobufMut,
    /// Offset of the buffer's first byte in the reply payload.
    pos: usize,
    /// Segment and offset in it where the buffer's first byte belongs.
    seg: usize,
    seg_off: usize,
}

/// A memory window to bind over pool memory for one request (`rdma.client_exposure =
/// "request"`).
struct Bind {
    mr: MemoryRegion,
    addr: u64,
    len: usize,
    access: WindowAccess,
}

/// Per-slot working storage, reused from request to request: nothing on a request's way
/// allocates once the slot has carried a request of its shape.
#[derive(Default)]
struct Scratch {
    send_descs: Vec<Desc>,
    recv_descs: Vec<Desc>,
    /// Segments registered on the fly for this request, by their index in the request
    /// (taken out of it, and put back when the reply is in).
    sent: Vec<(usize, RegisteredSend)>,
    recvd: Vec<(usize, RegisteredRecv)>,
    send_bounce: Vec<IobufMut>,
    recv_bounce: Vec<RecvBounce>,
    /// The windows this request binds, `binds[k]` with `windows[k]`.
    binds: Vec<Bind>,
    /// The slot's memory windows, allocated as its requests need them and kept: the first
    /// `binds.len()` are bound while the request is in flight, and invalidated (the
    /// invalidations executed) before it completes.
    windows: Vec<MemoryWindow>,
    /// The reply's inline payload, held while the windows are being invalidated.
    inline: Vec<u8>,
}

impl Scratch {
    fn with_capacity(n: usize) -> Scratch {
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
    fn clear(&mut self) {
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

/// A request in flight.
struct InFlight {
    id: u64,
    completer: Completer<Reply>,
    /// The request's header buffer: the reply header is copied into it.
    header: Vec<u8>,
    send: Vec<SendSeg>,
    recv: Vec<RecvSeg>,
    scratch: Scratch,
    /// Once the reply is in: its payload length and whether it came inline (then in
    /// `scratch.inline`).
    reply: Option<(usize, bool)>,
}

/// One credit's data; whether it is taken is [`ClientLane`]'s. A slot (and its message
/// buffer) is free again once the reply is in: the server could only reply after the whole
/// request message reached it, so the device is done reading the buffer, whether or not the
/// SEND's completion (usually unsignaled) has been seen.
struct Slot {
    /// The private message buffer (lent out while a request is being prepared).
    msg: Option<IobufMut>,
    /// Working storage (lent out while a request is prepared or completed).
    scratch: Option<Scratch>,
    req: Option<InFlight>,
    /// A request whose reply is in, while its windows are being invalidated.
    invalidating: Option<InFlight>,
}

struct LaneState {
    dead: Option<String>,
    /// Destroyed (set to `None`) first thing when the connection fails.
    qp: Option<QueuePair>,
    recv: Receives<IobufMut>,
    slots: Vec<Slot>,
    /// Which slots are taken, the ids in flight, which SENDs are signaled, the checks on
    /// replies: what to do next.
    requests: ClientLane,
    /// What `requests` answers each event with (fixed capacity, made with the lane).
    actions: Actions<Action>,
    sq: SendQueue,
    /// Threads in `start` waiting for send-queue room.
    room_waiters: usize,
    /// Where requests complete, reused (see [`LaneState::completion`]).
    cells: Vec<CompletionCell<Reply>>,
    next_cell: usize,
}

impl LaneState {
    /// Gives `ev` to the lane's request state machine and returns its first action (every
    /// event but a failure answers with at most one); a refusal (a driver bug) is the
    /// reason to fail the connection with.
    fn feed(&mut self, ev: Event) -> std::result::Result<Option<Action>, String> {
        match self.requests.handle(ev, &mut self.actions) {
            Ok(()) => Ok(self.actions.get(0)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A completion pair for a new request, on the next cell that nothing holds any more.
    /// Cells are not tied to slots: a slot is free again as soon as its reply is in, which
    /// may be before the caller has waited on (and let go of) that request's [`Pending`].
    /// Twice as many cells as credits cover a caller with up to a credit's worth of
    /// requests in hand; one with more gets new cells as needed.
    fn completion(
        &mut self,
        progress: Option<Arc<dyn Progress>>,
    ) -> (Completer<Reply>, Pending<Reply>) {
        if self.cells.is_empty() {
            self.cells.push(CompletionCell::new());
        }
        let n = self.cells.len();
        let k = (0..n)
            .map(|j| (self.next_cell + j) % n)
            .find(|&k| self.cells[k].is_free())
            .unwrap_or(self.next_cell % n);
        self.next_cell = (k + 1) % n;
        self.cells[k].pair(progress)
    }
}

/// A completion to deliver once the lock is released.
type Done = (Completer<Reply>, Result<Reply>);

struct Lane {
    state: Mutex<LaneState>,
    /// Signalled when a slot frees up or the connection dies.
    cond: Condvar,
    /// Signalled when send-queue room frees up (and there are waiters) or the connection
    /// dies.
    room_cv: Condvar,
    dead: AtomicBool,
    /// Slots taken (by a `start` or a request in flight): how busy this queue pair is.
    busy: AtomicUsize,
    /// Whether and why the connection ended, shared by its queue pairs.
    ended: Arc<Ended>,
    sock: TcpStream,
    /// The caller's pool: bounce buffers.
    pool: Pool,
    reg: RegistrarId,
    /// With `rdma.client_exposure = "request"`: the registrar of the pool's arenas, whose
    /// regions windows are bound over. `None` with `"arena"`.
    windowed: Option<Arc<ArenaRegistrar>>,
    /// Send-queue entries in all: a request binding `n` windows needs `2n + 1` at once.
    sq_total: usize,
    ctl_reg: RegistrarId,
    pd: ProtectionDomain,
    limits: Limits,
    msg_limits: MsgLimits,
    /// Foreign segments at least this long are registered; shorter ones are bounced.
    register_threshold: usize,
    max_inline_send: usize,
    timeout: Duration,
    peer: String,
    faults: Faults,
    /// Requests with memory keys prepared so far on the connection's queue pairs (for
    /// [`Faults::qp_error_every`]).
    keyed: Arc<AtomicU64>,
    /// The completion queue, shared with the connection thread: a thread waiting for a
    /// reply polls it itself for up to `rdma.spin_us` ([`Progress`]).
    poller: Arc<Poller>,
    _ctl: Pool,
}

/// Whether and why a connection ended: the first of its queue pairs to fail records it.
/// The others follow when they see the bootstrap socket (shut down by the first) end, after
/// handling what their completion queues already hold, and report this reason; new requests
/// are refused at once.
#[derive(Default)]
struct Ended {
    yes: AtomicBool,
    why: Mutex<Option<String>>,
}

impl Ended {
    fn record(&self, reason: &str) {
        lock(&self.why).get_or_insert_with(|| reason.to_string());
        self.yes.store(true, Ordering::SeqCst);
    }

    fn reason(&self) -> Option<String> {
        lock(&self.why).clone()
    }
}

/// One queue pair of a client connection.
struct LaneHandle {
    lane: Arc<Lane>,
    /// The queue pair's thread (completions and liveness); it ends soon after the
    /// connection fails (the socket is shut down, which wakes it).
    thread: Option<JoinHandle<()>>,
}

mod setup;
pub(crate) use setup::connect;

/// A client connection (see the module documentation): one or more queue pairs, each with
/// its own slots, completion queue and thread; a request goes to the least busy one.
pub(crate) struct RdmaClientConn {
    lanes: Vec<LaneHandle>,
    limits: Limits,
    /// Where the search for the least busy queue pair starts (round robin among equals).
    next: AtomicUsize,
    peer: String,
}

/// Where a send segment's bytes are.
fn send_addr(s: &SendSeg) -> u64 {
    s.as_slice().as_ptr() as u64
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        lock(&self.state)
    }

    fn free_slots(&self) -> usize {
        self.limits
            .max_in_flight
            .saturating_sub(self.busy.load(Ordering::Relaxed))
    }

    fn closed_err(&self, st: &LaneState) -> Error {
        Error::ConnectionClosed(st.dead.clone().unwrap_or_default())
    }

    /// Takes a free slot and the id of the request to send in it, waiting up to the timeout.
    fn acquire(&self) -> Result<(usize, u64, Scratch, IobufMut)> {
        let mut st = self.lock();
        let deadline = Instant::now() + self.timeout;
        loop {
            if st.dead.is_some() {
                return Err(self.closed_err(&st));
            }
            if let Ok(Some(Action::Prepare { slot: i, id })) = st.feed(Event::Acquire) {
                let slot = &mut st.slots[i];
                if let (Some(scratch), Some(msg)) = (slot.scratch.take(), slot.msg.take()) {
                    self.busy.fetch_add(1, Ordering::Relaxed);
                    return Ok((i, id, scratch, msg));
                }
                // Unreachable: a free slot has its storage home.
                return Err(Error::ConnectionClosed("rdma slot state lost".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "a free credit on the rdma connection to {} ({} requests in flight)",
                        self.peer, self.limits.max_in_flight
                    ),
                    after: self.timeout,
                });
            }
            // Take replies (which free slots) off the completion channel on this thread,
            // as a waiter for its own reply would; then block as usual if that stopped
            // short (the connection thread is then watching the channel).
            drop(st);
            self.poller.wait(
                self,
                &|| self.free_slots() > 0 || self.dead.load(Ordering::SeqCst),
                Some(deadline),
            );
            st = self.lock();
            if st.requests.free_slots() > 0 || st.dead.is_some() {
                continue;
            }
            let now = Instant::now();
            st = match self
                .cond
                .wait_timeout(st, deadline.saturating_duration_since(now))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Gives a slot back that never carried the request.
    fn release(&self, i: usize, mut scratch: Scratch, msg: IobufMut) {
        scratch.clear();
        let mut st = self.lock();
        let slot = &mut st.slots[i];
        slot.scratch = Some(scratch);
        slot.msg = Some(msg);
        let refused = st.feed(Event::Unsent { slot: i });
        let done = match refused.clone() {
            Ok(_) => Vec::new(),
            Err(e) => self.fail_locked(&mut st, e, None),
        };
        drop(st);
        self.busy.fetch_sub(1, Ordering::Relaxed);
        self.cond.notify_one();
        if refused.is_err() {
            self.finish_fail(done);
        }
    }

    /// The key a descriptor of pool memory carries until the request is sent: the
    /// arena's rkey with `"arena"`; with `"request"` its lkey, which [`Lane::plan_windows`]
    /// looks the region up by and replaces with a window's rkey (a region without remote
    /// access may have no distinct rkey: rxe gives them all 0).
    fn pool_key(&self, lkey: u32, rkey: u32) -> u32 {
        if self.windowed.is_some() {
            lkey
        } else {
            rkey
        }
    }

    /// A bounce buffer for the next `want` bytes of a run of small segments.
    fn bounce_buf(&self, want: usize) -> Result<IobufMut> {
        self.pool.get(want.clamp(1, self.pool.max_buffer_size()))
    }

    fn desc_of(&self, buf: &IobufMut, len: usize) -> Result<Desc> {
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
    fn send_run(&self, send: &[SendSeg], from: usize, first: usize) -> usize {
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

    fn describe_send(&self, send: &mut [SendSeg], s: &mut Scratch) -> Result<()> {
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

    fn flush_send(&self, cur: &mut Option<(IobufMut, usize)>, s: &mut Scratch) -> Result<()> {
        if let Some((mut b, n)) = cur.take() {
            if n > 0 {
                b.set_len(n);
                push_desc(&mut s.send_descs, self.desc_of(&b, n)?);
                s.send_bounce.push(b);
            }
        }
        Ok(())
    }

    fn recv_run(&self, recv: &[RecvSeg], from: usize, first: usize) -> usize {
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

    fn describe_recv(&self, recv: &mut [RecvSeg], s: &mut Scratch) -> Result<()> {
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
    fn flush_recv(&self, cur: &mut Option<RecvBounce>, pos: usize, s: &mut Scratch) -> Result<()> {
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
    fn plan_windows(&self, reg: &ArenaRegistrar, s: &mut Scratch) -> Result<()> {
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
    fn prepare(
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

    /// Marks the connection dead, destroys the queue pair and takes every request in
    /// flight out; the caller completes them once the lock is released.
    fn fail_locked(
        &self,
        st: &mut LaneState,
        reason: String,
        mut culprit: Option<(u64, Error)>,
    ) -> Vec<Done> {
        if st.dead.is_some() {
            return Vec::new();
        }
        tracing::debug!(peer = %self.peer, %reason, "rdma client queue pair fails");
        self.ended.record(&reason);
        st.dead = Some(reason.clone());
        self.dead.store(true, Ordering::SeqCst);
        // First the windows of requests in flight: freeing a bound window invalidates it at
        // once, and rxe keeps a queue pair with windows bound on it from being destroyed
        // (destroying it first waits for them, for tens of seconds).
        for slot in st.slots.iter_mut() {
            for f in slot.req.iter_mut().chain(slot.invalidating.iter_mut()) {
                f.scratch.windows.clear();
            }
        }
        // Then the queue pair: after this the device touches none of our memory.
        st.qp = None;
        st.recv.clear();
        st.sq.clear();
        let mut done = Vec::new();
        let LaneState {
            requests,
            actions,
            slots,
            ..
        } = st;
        if requests.handle(Event::Failed, actions).is_err() {
            // Unreachable: the buffer holds an action per slot.
            requests.fail();
            actions.clear();
        }
        // The requests the lane aborts, then (unreachable, but no request may be lost) any
        // other the slots still hold.
        let aborted = actions.as_slice().iter().filter_map(|a| match *a {
            Action::Abort { slot } => Some(slot),
            _ => None,
        });
        for s in aborted.chain(0..slots.len()) {
            let slot = &mut slots[s];
            // The queue pair is gone: no window bound on it grants anything any more, so
            // the buffers of requests whose windows were being invalidated may go back.
            if let Some(f) = slot.invalidating.take() {
                done.push((f.completer, Err(Error::ConnectionClosed(reason.clone()))));
            }
            if let Some(f) = slot.req.take() {
                let err = match culprit.take() {
                    Some((id, e)) if id == f.id => e,
                    other => {
                        culprit = other;
                        Error::ConnectionClosed(reason.clone())
                    }
                };
                // Segments, regions and bounce buffers go with `f`.
                done.push((f.completer, Err(err)));
            }
        }
        done
    }

    fn fail(&self, reason: String, culprit: Option<(u64, Error)>) {
        let done = {
            let mut st = self.lock();
            self.fail_locked(&mut st, reason, culprit)
        };
        self.finish_fail(done);
    }

    fn finish_fail(&self, done: Vec<Done>) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        // Threads waiting on the completion channel stop: nothing more comes.
        self.poller.end();
        self.cond.notify_all();
        self.room_cv.notify_all();
        for (c, r) in done {
            c.complete(r);
        }
    }

    fn start(self: &Arc<Self>, req: Request) -> Result<Pending<Reply>> {
        check_request(&req, &self.limits)?;
        let (i, id, mut scratch, mut msg) = self.acquire()?;
        let Request {
            header,
            mut send,
            mut recv,
        } = req;
        let (msg_len, recv_cap) =
            match self.prepare(id, &header, &mut send, &mut recv, &mut scratch, &mut msg) {
                Ok(v) => v,
                Err(e) => {
                    self.release(i, scratch, msg);
                    return Err(e);
                }
            };
        tracing::debug!(
            id,
            slot = i,
            payload_len = send.iter().map(|b| b.len()).sum::<usize>(),
            recv_cap,
            peer = %self.peer,
            "rdma request"
        );
        let mut st = self.lock();
        // The binds, the SEND, and room set aside for the invalidations.
        let windows = scratch.binds.len();
        let need = 2 * windows + 1;
        // Room in the send queue: only short of it while the connection thread has yet to
        // see a signaled SEND's completion, which is already on its way (`signal_send`), or
        // (with windows) while other requests' windows are bound; their replies free it.
        while st.sq.room() < need && st.dead.is_none() {
            // The completion that frees room may sit in the queue with nobody waiting on
            // the channel: let the connection thread take it.
            self.poller.background(false);
            st.room_waiters += 1;
            st = match self.room_cv.wait_timeout(st, self.timeout) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            st.room_waiters -= 1;
        }
        if st.dead.is_some() {
            let e = self.closed_err(&st);
            drop(st);
            self.release(i, scratch, msg);
            return Err(e);
        }
        let progress: Arc<dyn Progress> = self.clone();
        let (completer, pending) = st.completion(Some(progress));
        let inline = msg_len <= self.max_inline_send;
        let sge = buf_sge(&msg, msg_len, self.ctl_reg);
        let st = &mut *st;
        let bound = post_binds(st, i, &mut scratch);
        let sq_seq = st.sq.next_seq();
        // With windows, a later request may need more room than one entry: every request
        // then ends in a signaled completion that retires what came before it (its last
        // invalidation, or, binding no window, its SEND), so room always comes back.
        let ev = Event::Send {
            slot: i,
            id,
            now: Instant::now(),
            reply_cap: recv_cap,
            offered: !scratch.recv_descs.is_empty(),
            windows: windows > 0,
            room_after: st.sq.room(),
            force_signal: self.windowed.is_some() && windows == 0,
        };
        let (signaled, refused) = match st.feed(ev) {
            Ok(Some(Action::Post { signaled, .. })) => (signaled, None),
            Ok(other) => (
                false,
                Some(format!("internal: {other:?} for a request SEND")),
            ),
            Err(e) => (false, Some(e)),
        };
        let wr = wr_id(KIND_SEND, i, sq_seq);
        let posted = match (&st.qp, sge) {
            _ if refused.is_some() => Ok(()),
            _ if bound.is_err() => bound,
            (Some(qp), _) if inline && signaled => qp.post_send_inline(wr, &[&msg[..msg_len]]),
            (Some(qp), _) if inline => qp.post_send_inline_unsignaled(wr, &[&msg[..msg_len]]),
            (Some(qp), Some(sge)) if signaled => qp.post_send(wr, &[sge]),
            (Some(qp), Some(sge)) => qp.post_send_unsignaled(wr, &[sge]),
            _ => Ok(()),
        };
        let slot = &mut st.slots[i];
        slot.msg = Some(msg);
        slot.req = Some(InFlight {
            id,
            completer,
            header,
            send,
            recv,
            scratch,
            reply: None,
        });
        let failed = match (posted, refused) {
            (_, Some(r)) => Some(r),
            (Err(e), None) => Some(format!(
                "posting a request to {} failed: {}",
                self.peer,
                chain(&e)
            )),
            (Ok(()), None) => None,
        };
        if let Some(reason) = failed {
            let done = self.fail_locked(st, reason, None);
            self.finish_fail(done);
        }
        Ok(pending)
    }

    fn on_send_done(&self, seq: u64) {
        let mut st = self.lock();
        if st.dead.is_some() {
            return;
        }
        if let Err(e) = st.sq.complete(seq) {
            let done = self.fail_locked(&mut st, format!("internal: {e}"), None);
            drop(st);
            self.finish_fail(done);
            return;
        }
        if st.room_waiters > 0 {
            drop(st);
            self.room_cv.notify_all();
        }
    }

    fn violation(&self, what: String) -> String {
        format!("protocol violation by the server {}: {what}", self.peer)
    }

    fn on_reply(&self, ri: usize, byte_len: usize) {
        let buf = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            match st.recv.take(ri) {
                Ok(b) => b,
                Err(e) => {
                    let r = self.violation(e.to_string());
                    let done = self.fail_locked(&mut st, r, None);
                    drop(st);
                    self.finish_fail(done);
                    return;
                }
            }
        };
        let len = byte_len.min(buf.len());
        let view = match decode_reply(&buf[..len], &self.msg_limits) {
            Ok(v) => v,
            Err(e) => {
                self.fail(self.violation(format!("malformed reply: {e}")), None);
                return;
            }
        };
        let (id, payload_len) = (view.id, view.payload_len);
        let mut inline_bytes = [0u8; MAX_INLINE];
        let inline_len = view.inline.map(|b| {
            inline_bytes[..b.len()].copy_from_slice(b);
            b.len()
        });
        let taken = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            let st = &mut *st;
            let ev = Event::ReplyArrived {
                id,
                payload_len,
                inline: inline_len.is_some(),
            };
            match st.feed(ev) {
                Ok(Some(Action::Fail(v))) => {
                    let r = self.violation(v.to_string());
                    let done = self.fail_locked(st, r, None);
                    drop(buf);
                    Err(done)
                }
                Ok(Some(a @ (Action::Complete { slot } | Action::Invalidate { slot }))) => {
                    let invalidate = matches!(a, Action::Invalidate { .. });
                    let mut f = st.slots[slot].req.take();
                    if let Some(f) = f.as_mut() {
                        // Into the request's header buffer: no allocation for a reply header
                        // no longer than the request's.
                        f.header.clear();
                        f.header.extend_from_slice(view.header);
                    }
                    // Repost first: the server may send the next reply as soon as the client
                    // knows this one arrived.
                    let posted = match &st.qp {
                        Some(_) if self.faults.stop_reposting => Ok(()),
                        Some(qp) => post_recv_buf(qp, ri, &buf, self.ctl_reg),
                        None => Ok(()),
                    };
                    st.recv.repost(ri, buf);
                    match posted {
                        Ok(()) => Ok((slot, f, invalidate)),
                        Err(e) => {
                            let mut done =
                                self.fail_locked(st, format!("reposting a receive: {e}"), None);
                            if let Some(f) = f {
                                done.push((f.completer, Err(Error::ConnectionClosed(e))));
                            }
                            Err(done)
                        }
                    }
                }
                other => {
                    let r = match other {
                        Err(r) => r,
                        Ok(a) => format!("internal: {a:?} for a reply"),
                    };
                    Err(self.fail_locked(st, r, None))
                }
            }
        };
        let (slot, mut f, invalidate) = match taken {
            Ok((slot, Some(f), invalidate)) => (slot, f, invalidate),
            Ok((_, None, _)) => return,
            Err(done) => {
                self.finish_fail(done);
                return;
            }
        };
        tracing::debug!(
            id,
            payload_len,
            inline = inline_len.is_some(),
            "rdma reply arrived"
        );
        if let Some(n) = inline_len {
            // Within the capacity reserved at set-up: no allocation.
            f.scratch.inline.clear();
            f.scratch.inline.extend_from_slice(&inline_bytes[..n]);
            inline_bytes[..n].fill(0);
        }
        f.reply = Some((payload_len, inline_len.is_some()));
        if invalidate {
            self.invalidate(slot, f);
        } else {
            self.finish(slot, f);
        }
    }

    /// Posts the invalidation of every window of `f` (whose reply is in), the last one
    /// signaled; `f` completes when that completion arrives ([`Lane::on_invalidated`]), so
    /// its buffers go back to the caller only once the server can no longer reach them.
    fn invalidate(&self, slot: usize, mut f: InFlight) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.dead.is_some() {
            // The queue pair is destroyed: its windows grant nothing any more.
            let e = self.closed_err(st);
            drop(guard);
            f.completer.complete(Err(e));
            return;
        }
        let n = f.scratch.binds.len();
        st.sq.unreserve(n);
        let mut posted = Ok(());
        if let Some(qp) = &st.qp {
            for (k, w) in f.scratch.windows[..n].iter_mut().enumerate() {
                let seq = st.sq.next_seq();
                posted = qp.post_invalidate(wr_id(KIND_INV, slot, seq), w, k + 1 == n);
                if posted.is_err() {
                    break;
                }
            }
        }
        match posted {
            Ok(()) => st.slots[slot].invalidating = Some(f),
            Err(e) => {
                let reason = format!(
                    "posting a memory window invalidation on the connection to {}: {}",
                    self.peer,
                    chain(&e)
                );
                let mut done = self.fail_locked(st, reason.clone(), None);
                drop(guard);
                done.push((f.completer, Err(Error::ConnectionClosed(reason))));
                self.finish_fail(done);
            }
        }
    }

    /// The last invalidation of the request in `slot` executed: it completes.
    fn on_invalidated(&self, slot: usize) {
        let f = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            match st.feed(Event::Invalidated { slot }) {
                Ok(Some(Action::Complete { .. })) => {
                    st.slots.get_mut(slot).and_then(|s| s.invalidating.take())
                }
                _ => None,
            }
        };
        match f {
            Some(f) => self.finish(slot, f),
            None => self.fail(
                format!("internal: an invalidation completed for slot {slot}, which has none"),
                None,
            ),
        }
    }

    /// Delivers the reply of `f` (in `f.reply`; the server can reach none of its memory any
    /// more) and frees its slot.
    fn finish(&self, slot: usize, mut f: InFlight) {
        // Deregistered, and back in their places.
        for (k, r) in f.scratch.sent.drain(..) {
            f.send[k] = r.into_segment();
        }
        for (k, r) in f.scratch.recvd.drain(..) {
            f.recv[k] = r.into_segment();
        }
        let (payload_len, inline) = f.reply.unwrap_or((0, false));
        if inline {
            zcio::transport::scatter_into(&mut f.recv, &f.scratch.inline);
            f.scratch.inline.fill(0);
        } else {
            copy_out(&mut f.recv, &f.scratch.recv_bounce, payload_len);
        }
        let InFlight {
            completer,
            header,
            send,
            recv,
            mut scratch,
            ..
        } = f;
        // Returns the bounce buffers (the on-the-fly registrations are back in place).
        scratch.clear();
        completer.complete(Ok(Reply {
            header,
            payload_len,
            recv,
            send,
        }));
        let mut guard = self.lock();
        let st = &mut *guard;
        st.slots[slot].scratch = Some(scratch);
        if st.dead.is_some() {
            return;
        }
        match st.feed(Event::Delivered { slot }) {
            Ok(Some(Action::ReturnCredit { .. })) => {
                drop(guard);
                self.busy.fetch_sub(1, Ordering::Relaxed);
                self.cond.notify_one();
            }
            Ok(_) => {}
            Err(r) => {
                let done = self.fail_locked(st, r, None);
                drop(guard);
                self.finish_fail(done);
            }
        }
    }
}

/// Posts the binds of a request's windows (unsignaled: the request's SEND, or a later
/// signaled work request, retires them) and sets room aside for their invalidations. The
/// caller made sure of `2n + 1` entries of room.
fn post_binds(
    st: &mut LaneState,
    slot: usize,
    s: &mut Scratch,
) -> std::result::Result<(), crate::RdmaError> {
    let LaneState { qp, sq, .. } = st;
    let Some(qp) = qp else {
        return Ok(());
    };
    for (b, w) in s.binds.iter().zip(s.windows.iter_mut()) {
        let seq = sq.next_seq();
        let planned = w.next_rkey();
        let rkey = qp.post_bind(
            wr_id(KIND_BIND, slot, seq),
            w,
            &b.mr,
            b.addr,
            b.len,
            b.access,
            false,
        )?;
        if rkey != planned {
            return Err(crate::RdmaError::Window {
                what: format!("bound with rkey {rkey:#x}, the request carries {planned:#x}"),
            });
        }
    }
    if !sq.reserve(s.binds.len()) {
        return Err(crate::RdmaError::Window {
            what: "internal: no send-queue room left for the invalidations".into(),
        });
    }
    Ok(())
}

/// The error a failed window allocation becomes.
fn window_err(e: crate::RdmaError) -> Error {
    Error::Transport {
        transport: "rdma",
        what: "allocating a memory window (rdma.client_exposure = \"request\")".into(),
        source: Box::new(e),
    }
}

/// Copies bounced reply payload into the receive segments.
fn copy_out(recv: &mut [RecvSeg], bounces: &[RecvBounce], payload_len: usize) {
    for b in bounces {
        if b.pos >= payload_len {
            break;
        }
        let n = (payload_len - b.pos).min(b.buf.len());
        let mut src = &b.buf[..n];
        let (mut seg, mut off) = (b.seg, b.seg_off);
        while !src.is_empty() && seg < recv.len() {
            let d = recv[seg].as_mut_slice();
            let k = d.len().saturating_sub(off).min(src.len());
            d[off..off + k].copy_from_slice(&src[..k]);
            src = &src[k..];
            off += k;
            if off >= d.len() {
                seg += 1;
                off = 0;
            }
        }
    }
}

impl Progress for Lane {
    /// A thread waiting for its reply takes it off the completion channel itself (see
    /// [`Poller`]).
    fn progress(&self, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        self.poller.wait(self, done, deadline);
    }

    fn will_await(&self) {
        self.poller.background(true);
    }
}

impl LaneEvents for Lane {
    fn on_completion(&self, c: &WorkCompletion) {
        let (kind, slot, seq) = wr_parts(c.wr_id);
        if !c.is_success() {
            if self.dead.load(Ordering::SeqCst) {
                return;
            }
            let why = describe_failure(kind, c.status);
            self.fail(format!("rdma connection to {}: {why}", self.peer), None);
            return;
        }
        match kind {
            KIND_SEND => self.on_send_done(seq),
            KIND_INV => {
                self.on_send_done(seq);
                self.on_invalidated(slot);
            }
            KIND_RECV => self.on_reply(slot, c.byte_len as usize),
            other => self.fail(
                format!("internal: a completion of unknown kind {other}"),
                None,
            ),
        }
    }

    fn on_tick(&self) {
        let mut st = self.lock();
        if st.dead.is_some() {
            return;
        }
        let tick = Event::Tick {
            now: Instant::now(),
            timeout: self.timeout,
        };
        if let Ok(Some(Action::TimedOut { id })) = st.feed(tick) {
            let reason = format!(
                "request {id} to {} got no reply within client.timeout ({:?})",
                self.peer, self.timeout
            );
            let culprit = Error::Timeout {
                what: format!("request {id} to {} over rdma", self.peer),
                after: self.timeout,
            };
            let done = self.fail_locked(&mut st, reason, Some((id, culprit)));
            drop(st);
            self.finish_fail(done);
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn on_socket_end(&self, why: Option<String>) {
        // Another queue pair of this connection failed first and shut the socket down.
        let first = self.ended.reason();
        let reason = match why {
            _ if first.is_some() => first.unwrap_or_default(),
            None => format!(
                "the server {} closed the connection (its process exited, or it closed this \
                 connection)",
                self.peer
            ),
            Some(w) => format!("connection to {}: {w}", self.peer),
        };
        self.fail(reason, None);
    }

    fn on_cq_error(&self, why: String) {
        self.fail(format!("rdma connection to {}: {why}", self.peer), None);
    }

    /// With windows a request completes on its last invalidation's completion, which a
    /// thread waiting for that request must not sleep through.
    fn wake_on_sends(&self) -> bool {
        self.windowed.is_some()
    }
}

impl RdmaClientConn {
    /// The queue pair with the fewest slots taken, looking from the next in turn.
    fn pick(&self) -> &Arc<Lane> {
        let n = self.lanes.len();
        let from = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = &self.lanes[from].lane;
        let mut best_free = best.free_slots();
        for k in 1..n {
            let c = &self.lanes[(from + k) % n].lane;
            let f = c.free_slots();
            if f > best_free {
                best = c;
                best_free = f;
            }
        }
        best
    }
}

impl ClientConn for RdmaClientConn {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn start(&self, req: Request) -> Result<Pending<Reply>> {
        let lane = self.pick();
        if lane.ended.yes.load(Ordering::SeqCst) {
            return Err(Error::ConnectionClosed(
                lane.ended.reason().unwrap_or_default(),
            ));
        }
        Lane::start(lane, req)
    }

    fn close(&self) {
        let reason = format!("the connection to {} was closed by this client", self.peer);
        for l in &self.lanes {
            l.lane.fail(reason.clone(), None);
        }
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}

impl Drop for RdmaClientConn {
    fn drop(&mut self) {
        self.close();
        for l in &mut self.lanes {
            if let Some(h) = l.thread.take() {
                if h.thread().id() != std::thread::current().id() {
                    let _ = h.join();
                }
            }
        }
    }
}
