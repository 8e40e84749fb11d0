//! The server side: a listener with a background acceptor, connections whose requests
//! are decoded by a completion thread and delivered by [`ServerConn::recv`], and replies
//! posted from any thread.
//!
//! # Accepting
//! A [`HandshakeListener`](zcio::transport::accept::HandshakeListener) (shared with the TCP transport) hands every new bootstrap socket
//! to a short-lived handshake thread (timeout [`HANDSHAKE_TIMEOUT`], or `server.idle_timeout`
//! when shorter), so a silent client never stalls [`Listener::accept`](zcio::transport::Listener::accept); at most
//! [`MAX_PENDING`] sockets are in handshake or wait for `accept`.
//!
//! # Requests
//! The completion thread decodes each request message as it arrives, copies what it needs
//! into the request's slot (one per credit, preallocated) and reposts the receive buffer at
//! once. A request with a payload in the client's memory gets its pool buffers and its RDMA
//! READs right there, if the pool has the buffers free and the send queue has room (the
//! completion thread must not wait): each queue pair then moves its own payload, in
//! parallel, with no hand-off before the READs start. Otherwise the request is queued for
//! `recv` (the core's connection thread, which may block), which takes the buffers, waiting
//! for the pool if need be, and posts the READs. The request is handed out once they have
//! all completed. Payload that came inline is copied into pool buffers by `recv`. So several
//! requests' READs can be in flight while earlier ones are served.
//!
//! # Replies
//! [`Replier::reply`] (any thread) encodes the reply into a control buffer (or on the
//! stack, for an inline SEND), RDMA WRITEs the payload buffers into the client's receive
//! segments and SENDs the reply; reliable-connection ordering makes the data land before
//! the reply is seen. The payload buffers and the message stay held until the SEND
//! completes. Posting waits when the send queue is full (its depth covers at least one
//! request's worst case; see `SendQueue`).
//!
//! # Structure
//! The request state machine is plain data in [`ServerLane`] (which slot holds which request
//! at which stage, the checks on a client's ids and credits, what `recv` does next), with the
//! send-queue ledger ([`SendQueue`]) and the posted receives ([`Receives`]); all three are
//! pure and tested on any host. This module is the driver: it holds them under each queue
//! pair's locks, feeds them what happened (a request, a READ completion, `recv`, a reply,
//! the socket's end) and carries out what they answer (post READs, hand a request out, post
//! the reply, fail). Connection set-up is in `setup`.
//!
//! # Failure
//! An error completion (a client's bogus memory key shows up as a remote access error of
//! a READ or WRITE, and is logged with the peer's address), a malformed message, more
//! requests than credits, end of stream on the bootstrap socket (the client closed or its
//! process died), the idle timeout, or [`Replier::close`] end the connection: the queue
//! pair is destroyed first, then every buffer the connection holds goes back to its pool.
//! Other connections are not affected.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use zcio::pool::RegistrarId;
use zcio::transport::{Admission, Incoming, Limits, Replier, ServerConn};
use zcio::{Error, Iobuf, IobufMut, Pool, Result};

use super::conn::{
    buf_sge, chain, describe_failure, lead_all, post_recv_buf, wr_id, wr_parts, Held, LaneEvents,
    Poller, SendQueue, KIND_READ, KIND_RECV, KIND_SEND, KIND_WRITE, MAX_SGE,
};
use super::lane::receives::Receives;
use super::lane::server::{
    Action, Actions, Event, Payload, ReplyRefusal, ServerLane, Violation, LANE_SHIFT,
};
use super::msg::{decode_request, encode_reply, reply_len, Desc, MsgLimits};
use super::plan::{Local, Plan};
use super::{lock, MAX_INLINE};
use crate::verbs::{QueuePair, Remote, Sge, WcStatus, WorkCompletion};

/// The longest a connecting client may take for the bootstrap exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub use zcio::transport::accept::MAX_PENDING;

/// Largest reply encoded on the stack for an inline SEND.
const STACK_MSG: usize = MAX_INLINE + 256;

/// How long [`Replier::close`] lets posted replies drain before destroying the queue pair.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);

/// The longest a reply (or a request's RDMA READs) waits for room in a queue pair's send
/// queue; then that connection fails, and only it. Room comes back as the client takes
/// what was posted; a client that stops (no receives posted: its SENDs meet "receiver not
/// ready", which [`RNR_RETRY`](crate::verbs::RNR_RETRY) bounds to under 4 s; or a peer
/// gone silent, bounded by the transport retries) must not hold a worker longer than this.
pub const ROOM_STALL: Duration = Duration::from_secs(10);

mod setup;
pub(crate) use setup::listen;

/// One request's data (its stage and id are in [`ServerLane`]).
struct Slot {
    header: Vec<u8>,
    send: Vec<Desc>,
    recv: Vec<Desc>,
    inline: Vec<u8>,
    recv_cap: usize,
    send_total: usize,
    /// Pool buffers the payload is READ into.
    bufs: Vec<IobufMut>,
    /// The request's id as the server sees it (with the queue pair's index, as
    /// [`RdmaServerConn::hand_out`] marks it): its payload bytes are reserved in the
    /// connection's [`Admission`] under this id.
    id: u64,
    /// Its payload bytes are reserved in the connection's [`Admission`].
    admitted: bool,
}

impl Slot {
    fn reset(&mut self) {
        self.admitted = false;
        self.send.clear();
        self.recv.clear();
        self.inline.clear();
        self.bufs.clear();
        self.recv_cap = 0;
        self.send_total = 0;
    }
}

/// How the connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The client closed it, or the server did.
    Clean,
    /// Idle for longer than the idle timeout.
    Idle(Duration),
    /// An error.
    Failed,
}

struct LaneState {
    dead: Option<String>,
    /// [`Replier::close`] is draining: no new replies.
    closing: bool,
    recv: Receives<IobufMut>,
    slots: Vec<Slot>,
    /// Which slot holds which request, at which stage; what to post next.
    requests: ServerLane,
    /// What `requests` answers each event with (fixed capacity, made with the lane).
    actions: Actions<Action>,
    /// Descriptor lists lent to posts in progress: a request's remote descriptors (and the
    /// local pieces of its READs) move out of the state while they are posted, and come
    /// back here, kept for their capacity.
    spare_descs: Vec<Vec<Desc>>,
    spare_local: Vec<Vec<Local>>,
    /// Vectors kept for their capacity, so that a request's way through allocates nothing:
    /// header and payload vectors of served requests given back by [`Replier::recycle`],
    /// and the vectors a request's payload buffers are taken from the pool into.
    spare_headers: Vec<Vec<u8>>,
    spare_payloads: Vec<Vec<Iobuf>>,
    spare_bufs: Vec<Vec<IobufMut>>,
}

/// Room in the vectors made when a queue pair is set up: a request header's bytes, and a
/// request payload's buffers (one per largest pool buffer). A larger request grows the
/// vector it gets once, and the vector keeps that room.
const HEADER_ROOM: usize = 128;
const PAYLOAD_ROOM: usize = 4;

/// Descriptor lists made up front for lending to posts: one per post in progress on a
/// queue pair (a worker's reply, a completion thread's READs), more made when needed.
const LENT: usize = 8;

/// A stack of `n` empty vectors with `room` each, and room itself for `n + 2 * credits`
/// (a request in every slot and as many served ones not yet given back).
fn spares<T>(n: usize, credits: usize, room: usize) -> Vec<Vec<T>> {
    let mut v = Vec::with_capacity(n + 2 * credits);
    v.extend((0..n).map(|_| Vec::with_capacity(room)));
    v
}

/// Keeps an empty vector for its capacity, if it has any and `spares` has room (its
/// capacity, fixed when the queue pair is set up, bounds what is kept).
fn keep_spare<T>(spares: &mut Vec<Vec<T>>, mut v: Vec<T>) {
    v.clear();
    if v.capacity() > 0 && spares.len() < spares.capacity() {
        spares.push(v);
    }
}

/// The send side of a queue pair: what posting needs, under its own lock. On Soft-RoCE a
/// post runs the queue pair's protocol work in the posting thread (for a 64 KiB RDMA WRITE,
/// about a millisecond under emulation): holding the state lock meanwhile would stop this
/// queue pair's requests from being received and handed out for that long. The lock also
/// keeps work requests posted in sequence order, which the ledger relies on.
struct PostSide {
    sq: SendQueue,
    /// Scratch for reply plans.
    local: Vec<Local>,
    /// Threads waiting in [`Lane::wait_room`] or draining in `close`: a send-queue
    /// completion wakes them only when there are some.
    room_waiters: usize,
}

/// What the queue pairs of one connection share: the signal `recv` waits on, activity for
/// the idle timeout, and how the connection ended.
struct Shared {
    /// Bumped whenever a queue pair has a new event for `recv` or dies. Separate from the
    /// queue pairs' `room_cv`, so that a send-queue completion does not wake `recv` for
    /// nothing: every wake-up is a context switch, and under emulation each costs tens of
    /// microseconds.
    gen: Mutex<u64>,
    events_cv: Condvar,
    /// The first failure of any queue pair (the others follow it): why and how it ended.
    end: Mutex<Option<(String, End)>>,
    /// Set with `end`: no more replies on any queue pair, even one that has yet to see the
    /// bootstrap socket end.
    over: AtomicBool,
    /// Requests received and not yet answered, over all queue pairs.
    in_flight: AtomicUsize,
    /// Requests received and not yet handed out by `recv` (the backlog).
    queued: AtomicUsize,
    /// When a request last arrived or was answered (milliseconds since `base`).
    last_activity: AtomicU64,
    base: Instant,
    /// The connection's queue pairs, set once they all exist.
    lanes: OnceLock<Vec<Weak<Lane>>>,
    /// What the server lets this connection take in (see [`ServerConn::set_admission`]):
    /// no payload before authentication, and at most its budget of payload bytes in pool
    /// buffers at once.
    admission: OnceLock<Arc<Admission>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            gen: Mutex::new(0),
            events_cv: Condvar::new(),
            end: Mutex::new(None),
            over: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            last_activity: AtomicU64::new(0),
            base: Instant::now(),
            lanes: OnceLock::new(),
            admission: OnceLock::new(),
        }
    }

    fn notify(&self) {
        *lock(&self.gen) += 1;
        self.events_cv.notify_one();
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    /// Records why the connection ended, unless an earlier failure already did. A failure
    /// found after a clean end (another queue pair saw the client close first) replaces it:
    /// the client's bad memory key, say, is the cause worth reporting.
    fn record_end(&self, reason: &str, end: End) {
        let mut e = lock(&self.end);
        if e.is_none() || (matches!(*e, Some((_, End::Clean))) && end == End::Failed) {
            *e = Some((reason.to_string(), end));
        }
        self.over.store(true, Ordering::SeqCst);
    }

    /// Handles what every queue pair's completion queue holds (before the connection is
    /// ended because the bootstrap socket ended: an error completion on another queue pair
    /// is the real cause).
    fn drain_all(&self) {
        for c in self
            .lanes
            .get()
            .into_iter()
            .flatten()
            .filter_map(Weak::upgrade)
        {
            while c.poller.drain(&*c).is_ok_and(|n| n > 0) {}
        }
    }

    /// Why the connection ended, once it has.
    fn reason(&self) -> Option<String> {
        lock(&self.end).as_ref().map(|(why, _)| why.clone())
    }

    /// What `recv` returns once the connection has ended.
    fn closed_result(&self, peer: &str) -> Result<Option<Incoming>> {
        let (reason, end) = lock(&self.end)
            .clone()
            .unwrap_or_else(|| (format!("the connection from {peer} ended"), End::Failed));
        match end {
            End::Clean => Ok(None),
            End::Idle(after) => Err(Error::Timeout {
                what: format!("idle rdma connection from {peer} (server.idle_timeout)"),
                after,
            }),
            End::Failed => Err(Error::ConnectionClosed(reason)),
        }
    }
}

/// One queue pair of a connection.
struct Lane {
    state: Mutex<LaneState>,
    /// Lock order: `state`, then `post`, then `qp`.
    post: Mutex<PostSide>,
    /// Read-locked to post, write-locked (after `post`, so no post is in progress) to
    /// destroy it when the connection fails.
    qp: RwLock<Option<QueuePair>>,
    /// Signalled (with `post`) for send-queue room (repliers and `close` wait on it) and
    /// death.
    room_cv: Condvar,
    /// Replies between their state check and the end of their post: `close` waits for them
    /// as for posted work requests. Decremented under `post`.
    posting: AtomicUsize,
    dead: AtomicBool,
    sock: TcpStream,
    shared: Arc<Shared>,
    /// This queue pair's index in its connection.
    lane: u64,
    pool: Pool,
    reg: RegistrarId,
    ctl: Pool,
    ctl_reg: RegistrarId,
    limits: Limits,
    msg_limits: MsgLimits,
    max_inline_send: usize,
    write_sge: usize,
    read_sge: usize,
    sq_depth: usize,
    idle: Option<Duration>,
    peer: String,
    /// The completion queue, shared with the connection thread: `recv` polls it itself for
    /// up to `rdma.spin_us` before it sleeps.
    poller: Arc<Poller>,
}

/// The server's end of one connection: its queue pairs.
struct RdmaServerConn {
    set: Arc<LaneSet>,
    shared: Arc<Shared>,
    limits: Limits,
    /// The queue pair `recv` looks at first (round robin, for fairness).
    next: usize,
    peer: String,
}

/// A connection's queue pairs, in the order of the handshake; the [`Replier`].
struct LaneSet {
    lanes: Vec<Arc<Lane>>,
}

/// A reply's message: on the stack (an inline SEND) or in a control buffer of this length.
enum ReplyMsg<'a> {
    Inline(&'a [u8]),
    Buf(IobufMut, usize),
}

/// How [`Lane::post_reads`] went, when the connection did not fail.
enum ReadStart {
    /// The READs are posted; their completion queues the request.
    Posted,
    /// No room in the send queue and not allowed to wait: nothing was posted, and these
    /// are the buffers that were to receive the payload.
    NoRoom(Vec<IobufMut>),
}

/// What one look at a queue pair's events found.
enum Step {
    Got(Incoming),
    Empty,
    /// The next request waits for pool buffers.
    Blocked,
    Dead,
}

/// How long `recv` waits for the payload budget or pool buffers at a time before it looks
/// at every queue pair's events again.
const POOL_SLICE: Duration = Duration::from_millis(20);

/// An action the lane gave that the driver has no use for at that point: a driver bug.
struct Unexpected(Option<Action>);

impl std::fmt::Display for Unexpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "internal: unexpected request-lane action {:?}", self.0)
    }
}

fn to_sge(l: &Local) -> Sge {
    Sge {
        addr: l.addr,
        len: l.len,
        lkey: l.lkey,
    }
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        lock(&self.state)
    }

    fn post_lock(&self) -> MutexGuard<'_, PostSide> {
        lock(&self.post)
    }

    fn qp(&self) -> RwLockReadGuard<'_, Option<QueuePair>> {
        self.qp.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead and releases everything; the QP goes first.
    fn fail_locked(&self, st: &mut LaneState, reason: String, end: End) -> bool {
        if st.dead.is_some() {
            return false;
        }
        tracing::debug!(peer = %self.peer, lane = self.lane, %reason, "rdma server queue pair ends");
        self.shared.record_end(&reason, end);
        st.dead = Some(reason);
        self.dead.store(true, Ordering::SeqCst);
        {
            // First: after this the device touches none of our memory. Waits for a post in
            // progress to end.
            let mut p = self.post_lock();
            *self.qp.write().unwrap_or_else(|p| p.into_inner()) = None;
            p.sq.clear();
        }
        st.recv.clear();
        let LaneState {
            requests,
            actions,
            slots,
            ..
        } = st;
        if requests.handle(Event::Failed, actions).is_ok() {
            for a in actions.as_slice() {
                if let Action::Drop { slot } = *a {
                    slots[slot].reset();
                }
            }
        } else {
            slots.iter_mut().for_each(Slot::reset);
            requests.fail();
        }
        true
    }

    fn after_fail(&self) {
        // The other queue pairs' threads see the bootstrap socket end and follow.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.poller.end();
        self.shared.notify();
        self.room_cv.notify_all();
    }

    fn fail(&self, reason: String, end: End) {
        let failed = {
            let mut st = self.lock();
            self.fail_locked(&mut st, reason, end)
        };
        if failed {
            self.after_fail();
        }
    }

    fn violation(&self, what: String) -> String {
        format!("protocol violation by the client {}: {what}", self.peer)
    }

    /// A request message arrived in receive buffer `ri`.
    fn on_request(&self, ri: usize, byte_len: usize) {
        let buf = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            match st.recv.take(ri) {
                Ok(b) => b,
                Err(e) => {
                    let r = self.violation(e.to_string());
                    if self.fail_locked(&mut st, r, End::Failed) {
                        drop(st);
                        self.after_fail();
                    }
                    return;
                }
            }
        };
        let len = byte_len.min(buf.len());
        let view = match decode_request(&buf[..len], &self.msg_limits) {
            Ok(v) => v,
            Err(e) => {
                let r = self.violation(format!("malformed request: {e}"));
                tracing::warn!(peer = %self.peer, "{r}; closing that connection");
                self.fail(r, End::Failed);
                return;
            }
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.dead.is_some() {
            return;
        }
        let payload = if view.send_descs().len() > 0 {
            Payload::Read
        } else if view.inline.is_empty() {
            Payload::None
        } else {
            Payload::Inline
        };
        let ev = Event::Request {
            id: view.id,
            payload,
            bytes: view.send_total,
            reply_cap: view.recv_cap,
            authenticated: self
                .shared
                .admission
                .get()
                .is_none_or(|a| a.authenticated()),
        };
        if self.feed(st, ev).is_err() {
            drop(guard);
            self.after_fail();
            return;
        }
        for k in 0..st.actions.len() {
            match st.actions.get(k) {
                Some(Action::Accept { slot: s }) => {
                    let slot = &mut st.slots[s];
                    slot.header.clear();
                    slot.header.extend_from_slice(view.header);
                    slot.send.clear();
                    slot.send.extend(view.send_descs());
                    slot.recv.clear();
                    slot.recv.extend(view.recv_descs());
                    slot.inline.clear();
                    slot.inline.extend_from_slice(view.inline);
                    slot.recv_cap = view.recv_cap;
                    slot.send_total = view.send_total;
                    slot.id = view.id | (self.lane << LANE_SHIFT);
                    slot.admitted = false;
                    self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                    self.shared.queued.fetch_add(1, Ordering::Relaxed);
                    self.shared.touch();
                }
                Some(Action::PostRecv) => {
                    // Repost at once: the client may send its next request as soon as it
                    // has this one's reply.
                    let posted = match &*self.qp() {
                        Some(qp) => post_recv_buf(qp, ri, &buf, self.ctl_reg),
                        None => Ok(()),
                    };
                    st.recv.repost(ri, buf);
                    if let Err(e) = posted {
                        if self.fail_locked(st, format!("reposting a receive: {e}"), End::Failed) {
                            drop(guard);
                            self.after_fail();
                        }
                        return;
                    }
                    // `buf` is moved: the rest of the actions do not need it.
                    return self.on_request_rest(guard, k + 1);
                }
                Some(Action::Fail(v)) => {
                    let r = self.violation(v.to_string());
                    if matches!(v, Violation::PayloadBeforeAuth { .. }) {
                        tracing::warn!(peer = %self.peer, "{r}; closing that connection");
                    }
                    if self.fail_locked(st, r, End::Failed) {
                        drop(guard);
                        self.after_fail();
                    }
                    return;
                }
                other => {
                    let _ = self.refused(st, Unexpected(other));
                    drop(guard);
                    self.after_fail();
                    return;
                }
            }
        }
    }

    /// The actions of a request after its receive was posted again: READ its payload now
    /// (on this completion thread, if that needs no wait), or wake `recv`.
    fn on_request_rest<'a>(&'a self, mut guard: MutexGuard<'a, LaneState>, mut k: usize) {
        while let Some(a) = guard.actions.get(k) {
            match a {
                Action::Wake => {
                    drop(guard);
                    self.shared.notify();
                    return;
                }
                Action::ReadNow { slot: s } => {
                    guard = match self.read_now(guard, s) {
                        Some(g) => g,
                        None => return,
                    };
                    // The lane's answer to `ReadsNotPosted`.
                    k = 0;
                }
                other => {
                    let _ = self.refused(&mut guard, Unexpected(Some(other)));
                    drop(guard);
                    self.after_fail();
                    return;
                }
            }
        }
    }

    /// [`Action::ReadNow`]: READs of slot `s`'s payload on the completion thread, if the
    /// budget and the pool give the buffers without waiting and the send queue has room.
    /// On Soft-RoCE the READ's protocol work (the client's responses included) runs in the
    /// posting thread, so each queue pair then moves its own payload instead of every
    /// request of the connection queuing for the thread behind `recv`; and the READs start
    /// without a hand-off. Otherwise `recv` takes the buffers (it may wait) and posts them.
    /// `None` once the guard is let go of (the READs posted, or the connection failed).
    fn read_now<'a>(
        &'a self,
        mut guard: MutexGuard<'a, LaneState>,
        s: usize,
    ) -> Option<MutexGuard<'a, LaneState>> {
        let st = &mut *guard;
        let total = st.slots[s].send_total;
        let bufs = if self.try_admit(&mut st.slots[s]) {
            let mut v = st.spare_bufs.pop().unwrap_or_default();
            if let Ok(true) = self.pool.try_get_span_into(total, &mut v) {
                Some(v)
            } else {
                keep_spare(&mut st.spare_bufs, v);
                None
            }
        } else {
            None
        };
        if let Some(bufs) = bufs {
            let (g, r) = self.post_reads(guard, s, bufs, false);
            guard = g;
            match r {
                Ok(ReadStart::Posted) => return None,
                Ok(ReadStart::NoRoom(bufs)) => keep_spare(&mut guard.spare_bufs, bufs),
                Err(_) => {
                    drop(guard);
                    self.after_fail();
                    return None;
                }
            }
        }
        // `recv` posts them, once there is budget, buffers and room. (Refused only if the
        // queue pair failed meanwhile.)
        if guard.dead.is_some() {
            return None;
        }
        if self
            .feed(&mut guard, Event::ReadsNotPosted { slot: s })
            .is_err()
        {
            drop(guard);
            self.after_fail();
            return None;
        }
        Some(guard)
    }

    /// Gives `ev` to the lane's request state machine; its actions are in `st.actions`. A
    /// refusal (a driver bug) fails the queue pair (the caller wakes everyone once it has
    /// let go of the lock).
    fn feed(&self, st: &mut LaneState, ev: Event) -> Result<()> {
        let LaneState {
            requests, actions, ..
        } = st;
        match requests.handle(ev, actions) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.refused(st, e)),
        }
    }

    fn on_send_queue(&self, kind: u8, slot: usize, seq: u64) {
        let (retired, room_waiters) = {
            let mut p = self.post_lock();
            if self.dead.load(Ordering::SeqCst) {
                return;
            }
            (p.sq.complete(seq), p.room_waiters > 0)
        };
        if let Err(e) = retired {
            self.fail(format!("internal: {e}"), End::Failed);
            return;
        }
        if room_waiters {
            self.room_cv.notify_all();
        }
        if kind != KIND_READ {
            return;
        }
        // Only a request's last READ is signaled: it completing means all of them did.
        let mut st = self.lock();
        if st.dead.is_some() {
            return;
        }
        if self.feed(&mut st, Event::ReadsCompleted { slot }).is_err() {
            drop(st);
            self.after_fail();
            return;
        }
        if st.actions.as_slice().contains(&Action::Wake) {
            drop(st);
            self.shared.notify();
        }
    }

    /// Hands request `s` out with its payload, in vectors kept from earlier requests when
    /// there are some.
    fn deliver(&self, st: &mut LaneState, s: usize, id: u64, mut bufs: Vec<IobufMut>) -> Incoming {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        let mut payload = if bufs.is_empty() {
            Vec::new()
        } else {
            st.spare_payloads.pop().unwrap_or_default()
        };
        payload.extend(bufs.drain(..).map(IobufMut::freeze));
        keep_spare(&mut st.spare_bufs, bufs);
        // The slot keeps a vector to decode its next request's header into.
        let next_header = st.spare_headers.pop().unwrap_or_default();
        let slot = &mut st.slots[s];
        Incoming {
            id,
            header: std::mem::replace(&mut slot.header, next_header),
            payload,
            reply_capacity: slot.recv_cap,
        }
    }

    /// A transition the request state machine refused: a bug in this driver, never the
    /// client's doing. Fails the queue pair (the caller wakes everyone once it has let go
    /// of the lock) and gives the error to return.
    fn refused(&self, st: &mut LaneState, e: impl std::fmt::Display) -> Error {
        let r = e.to_string();
        self.fail_locked(st, r.clone(), End::Failed);
        Error::ConnectionClosed(r)
    }

    /// Keeps a served request's vectors for later requests ([`Replier::recycle`]).
    fn recycle(&self, mut header: Vec<u8>, mut payload: Vec<Iobuf>) {
        // The payload buffers go back to the pool outside the lock.
        header.clear();
        payload.clear();
        if header.capacity() == 0 && payload.capacity() == 0 {
            return;
        }
        let mut st = self.lock();
        keep_spare(&mut st.spare_headers, header);
        keep_spare(&mut st.spare_payloads, payload);
    }

    /// Reserves slot `slot`'s payload bytes in the connection's budget if that needs no
    /// wait (or there is no budget); true once they are reserved.
    fn try_admit(&self, slot: &mut Slot) -> bool {
        if !slot.admitted {
            slot.admitted = match self.shared.admission.get() {
                None => true,
                Some(a) => a
                    .reserve(slot.id, slot.send_total, Duration::ZERO, || Err(()))
                    .is_ok(),
            };
        }
        slot.admitted
    }

    /// Waits for `n` free send-queue entries; `Err` (with why) once the connection is dead
    /// or after [`ROOM_STALL`] without room (the caller then fails the connection).
    #[allow(clippy::type_complexity)]
    fn wait_room<'a>(
        &'a self,
        mut g: MutexGuard<'a, PostSide>,
        n: usize,
    ) -> std::result::Result<MutexGuard<'a, PostSide>, (MutexGuard<'a, PostSide>, String)> {
        let deadline = Instant::now() + ROOM_STALL;
        loop {
            if self.dead.load(Ordering::SeqCst) {
                return Err((g, "the connection ended".into()));
            }
            if g.sq.room() >= n {
                return Ok(g);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((
                    g,
                    format!(
                        "the client {} took nothing from its queue pair for {ROOM_STALL:?} (the send queue stayed full)",
                        self.peer
                    ),
                ));
            }
            // The completions that free room: `recv` may not be there to take them.
            self.poller.background(false);
            g.room_waiters += 1;
            g = match self.room_cv.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            g.room_waiters -= 1;
        }
    }

    /// A descriptor list to lend to a post.
    fn spare_descs(&self, st: &mut LaneState) -> Vec<Desc> {
        st.spare_descs
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.limits.max_segments))
    }

    /// Starts the RDMA READs of request `s`'s payload into `bufs` (the lane has it
    /// `Reading`): under the state lock (held by the caller) the slot takes the buffers, and
    /// its descriptors are lent out; then the READs are posted under the send-side lock
    /// only. Unless `wait`, a send queue without room for them gives the slot its
    /// descriptors back (`NoRoom`, with the buffers; the caller tells the lane): a
    /// completion thread must not wait for room that only its own completions make. On
    /// `Err` the connection has failed (the caller wakes everyone).
    fn post_reads<'a>(
        &'a self,
        mut guard: MutexGuard<'a, LaneState>,
        s: usize,
        bufs: Vec<IobufMut>,
        wait: bool,
    ) -> (MutexGuard<'a, LaneState>, Result<ReadStart>) {
        let total = guard.slots[s].send_total;
        let st = &mut *guard;
        let mut local = st
            .spare_local
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.limits.max_segments));
        local.clear();
        for b in &bufs {
            match b.keys(self.reg) {
                Some(k) => local.push(Local {
                    addr: b.as_ptr() as u64,
                    len: b.len() as u32,
                    lkey: k.lkey,
                }),
                None => {
                    keep_spare(&mut st.spare_local, local);
                    let r = "internal: a pool buffer without rdma registration".to_string();
                    self.fail_locked(st, r.clone(), End::Failed);
                    return (guard, Err(Error::ConnectionClosed(r)));
                }
            }
        }
        let spare = self.spare_descs(st);
        let remote = std::mem::replace(&mut st.slots[s].send, spare);
        let n = Plan::new(&remote, &local, total as u64, self.read_sge).count();
        st.slots[s].bufs = bufs;
        let posted = if n > self.sq_depth {
            Err(format!(
                "a request needs {n} RDMA READs, more than the send queue's {}",
                self.sq_depth
            ))
        } else {
            drop(guard);
            let r = self.post_reads_unlocked(s, &remote, &local, total, n, wait);
            guard = self.lock();
            r
        };
        let st = &mut *guard;
        keep_spare(&mut st.spare_local, local);
        let mut remote = remote;
        if matches!(posted, Ok(false)) && st.dead.is_none() {
            // Nothing was posted: the slot gets its descriptors and stage back.
            let slot = &mut st.slots[s];
            std::mem::swap(&mut slot.send, &mut remote);
            let bufs = std::mem::take(&mut slot.bufs);
            keep_spare(&mut st.spare_descs, remote);
            return (guard, Ok(ReadStart::NoRoom(bufs)));
        }
        keep_spare(&mut st.spare_descs, remote);
        match posted {
            Ok(true) => (guard, Ok(ReadStart::Posted)),
            // The connection died meanwhile: its failure took the buffers back.
            Ok(false) => (guard, Ok(ReadStart::NoRoom(Vec::new()))),
            Err(r) => {
                self.fail_locked(st, r.clone(), End::Failed);
                let e = self
                    .shared
                    .closed_result(&self.peer)
                    .err()
                    .unwrap_or(Error::ConnectionClosed(r));
                (guard, Err(e))
            }
        }
    }

    /// Posts `n` RDMA READs (the last one signaled) of the plan from `remote` into `local`:
    /// `Ok(true)`. Without room for them in the send queue, waits for it if `wait`, else
    /// posts nothing and returns `Ok(false)`.
    fn post_reads_unlocked(
        &self,
        s: usize,
        remote: &[Desc],
        local: &[Local],
        total: usize,
        n: usize,
        wait: bool,
    ) -> std::result::Result<bool, String> {
        let p = self.post_lock();
        let mut p = if wait || p.sq.room() >= n {
            match self.wait_room(p, n) {
                Ok(p) => p,
                Err((_, why)) => return Err(why),
            }
        } else {
            return Ok(false);
        };
        let qp = self.qp();
        let Some(qp) = qp.as_ref() else {
            return Err("the queue pair is gone".into());
        };
        let mut plan = Plan::new(remote, local, total as u64, self.read_sge);
        let mut pieces = [Local::default(); MAX_SGE];
        let mut sges = [Sge::default(); MAX_SGE];
        let mut count = 0;
        while let Some(w) = plan.next_into(&mut pieces[..self.read_sge]) {
            for (d, piece) in sges.iter_mut().zip(&pieces[..w.n_sge]) {
                *d = to_sge(piece);
            }
            let seq = p.sq.next_seq();
            count += 1;
            let wr = wr_id(KIND_READ, s, seq);
            let remote = Remote {
                addr: w.remote_addr,
                rkey: w.rkey,
            };
            // One completion per request: the last READ's (they complete in order).
            let r = if count == n {
                qp.post_read(wr, &sges[..w.n_sge], remote)
            } else {
                qp.post_read_unsignaled(wr, &sges[..w.n_sge], remote)
            };
            if let Err(e) = r {
                return Err(format!("posting an RDMA READ: {}", chain(&e)));
            }
        }
        if count != n {
            return Err(format!("internal: planned {n} RDMA READs, posted {count}"));
        }
        Ok(true)
    }

    /// Works through this queue pair's events until a request is ready to hand out (its
    /// payload in pool buffers) or there are none; starts the RDMA READs of requests with
    /// payload on the way. Never blocks, except for the connection's payload budget and
    /// pool buffers: a new request whose payload does not fit the budget, or needs buffers
    /// that are not free, gives way to a request whose READs are done (its bytes and
    /// buffers come back once it is served: waiting while it sits behind could wait for
    /// nothing). Failing that, without `wait` it stays first in line and the answer is
    /// `Blocked`; with `wait = Some(slice)` the budget and then the pool are waited on for
    /// up to `slice` each, after which it is `Blocked` again. Never a failure for want of
    /// buffers: back-pressure on this connection, for as long as it stays open.
    fn step(&self, wait: Option<Duration>) -> Result<Step> {
        self.step_locked(self.lock(), wait)
    }

    /// [`refused`](Self::refused) for `step`: fails the queue pair, wakes everyone.
    fn refused_step(
        &self,
        mut st: MutexGuard<'_, LaneState>,
        e: impl std::fmt::Display,
    ) -> Result<Step> {
        let e = self.refused(&mut st, e);
        drop(st);
        self.after_fail();
        Err(e)
    }

    /// `recv`'s look at this queue pair: tells the lane, carries out its one action (hand
    /// a request out, take buffers, post READs, or nothing to do) and tells it how that went,
    /// until something is handed out or nothing can be.
    fn step_locked<'a>(
        &'a self,
        mut st: MutexGuard<'a, LaneState>,
        wait: Option<Duration>,
    ) -> Result<Step> {
        let recv = || Event::Recv {
            authenticated: self
                .shared
                .admission
                .get()
                .is_none_or(|a| a.authenticated()),
        };
        let mut ev = recv();
        loop {
            if st.dead.is_some() {
                return Ok(Step::Dead);
            }
            if let Err(e) = self.feed(&mut st, ev) {
                drop(st);
                self.after_fail();
                return Err(e);
            }
            // `recv`'s events have one action each, or none.
            let Some(a) = st.actions.get(0) else {
                return Ok(Step::Empty);
            };
            ev = match a {
                Action::HandOut {
                    slot,
                    id,
                    copy_inline,
                } => {
                    let mut bufs = std::mem::take(&mut st.slots[slot].bufs);
                    if copy_inline {
                        // Inline payload: copy it into the pool buffers.
                        let mut src: &[u8] = &st.slots[slot].inline;
                        for b in bufs.iter_mut() {
                            let k = b.len().min(src.len());
                            b[..k].copy_from_slice(&src[..k]);
                            src = &src[k..];
                        }
                    }
                    let inc = self.deliver(&mut st, slot, id, bufs);
                    return Ok(Step::Got(inc));
                }
                Action::Blocked => return Ok(Step::Blocked),
                Action::Take { slot, wait: w } => {
                    let (g, next) = self.take(st, slot, w, wait)?;
                    st = g;
                    match next {
                        Some(ev) => ev,
                        None => return Ok(Step::Dead),
                    }
                }
                Action::Read { slot } => {
                    let bufs = std::mem::take(&mut st.slots[slot].bufs);
                    let (g, r) = self.post_reads(st, slot, bufs, true);
                    st = g;
                    if let Err(e) = r {
                        drop(st);
                        self.after_fail();
                        return Err(e);
                    }
                    recv()
                }
                Action::Fail(v) => {
                    let r = self.violation(v.to_string());
                    tracing::warn!(peer = %self.peer, "{r}; closing that connection");
                    if self.fail_locked(&mut st, r, End::Failed) {
                        drop(st);
                        self.after_fail();
                    }
                    return Ok(Step::Dead);
                }
                other => return self.refused_step(st, Unexpected(Some(other))),
            };
        }
    }

    /// [`Action::Take`]: the connection's payload budget, then pool buffers (kept in the
    /// slot), for slot `s`'s payload. Without `w` only what needs no wait; with it, a wait of
    /// up to `slice` for the budget (if not yet reserved; then the buffers without waiting)
    /// or else for the buffers. The answer is the event to tell the lane; `None` once the
    /// connection is dead. Never a failure for want of budget or buffers: back-pressure on
    /// this connection, for as long as it stays open.
    fn take<'a>(
        &'a self,
        mut st: MutexGuard<'a, LaneState>,
        s: usize,
        w: bool,
        slice: Option<Duration>,
    ) -> Result<(MutexGuard<'a, LaneState>, Option<Event>)> {
        let may_wait = slice.is_some();
        let short = |can_wait| Some(Event::Short { slot: s, can_wait });
        let total = st.slots[s].send_total;
        let slice = slice.unwrap_or(Duration::ZERO);
        let mut pool_wait = w;
        if !self.try_admit(&mut st.slots[s]) {
            if !w {
                return Ok((st, short(may_wait)));
            }
            pool_wait = false;
            let id = st.slots[s].id;
            let admission = self.shared.admission.get().cloned();
            // Not under the lock.
            drop(st);
            let mut waited = false;
            let reserved = admission.is_none_or(|a| {
                a.reserve(id, total, slice, || {
                    if waited {
                        Err(())
                    } else {
                        waited = true;
                        Ok(())
                    }
                })
                .is_ok()
            });
            st = self.lock();
            if st.dead.is_some() {
                return Ok((st, None));
            }
            if !reserved {
                return Ok((st, short(false)));
            }
            st.slots[s].admitted = true;
        }
        let mut bufs = st.spare_bufs.pop().unwrap_or_default();
        if let Ok(true) = self.pool.try_get_span_into(total, &mut bufs) {
            st.slots[s].bufs = bufs;
            return Ok((st, Some(Event::Buffers { slot: s })));
        }
        if !pool_wait {
            keep_spare(&mut st.spare_bufs, bufs);
            return Ok((st, short(may_wait)));
        }
        // Not under the lock.
        drop(st);
        let b = self.pool.get_span_within_into(total, slice, &mut bufs);
        st = self.lock();
        if st.dead.is_some() {
            return Ok((st, None));
        }
        match b {
            Ok(()) => {
                st.slots[s].bufs = bufs;
                Ok((st, Some(Event::Buffers { slot: s })))
            }
            // Back-pressure, not failure: the pool stays short only while requests hold
            // its buffers, and they give them back once served.
            Err(Error::PoolExhausted { .. }) => {
                keep_spare(&mut st.spare_bufs, bufs);
                Ok((st, short(false)))
            }
            Err(e) => {
                let r = format!(
                    "no pool buffers for a {total}-byte request payload from {}: {e}",
                    self.peer,
                );
                if self.fail_locked(&mut st, r, End::Failed) {
                    drop(st);
                    self.after_fail();
                }
                Err(e)
            }
        }
    }

    fn reply(&self, id: u64, header: &[u8], payload: &[Iobuf]) -> Result<()> {
        let l = &self.limits;
        let over = |what, value: usize, limit: usize| Error::LimitExceeded {
            what,
            value: value as u64,
            limit: limit as u64,
        };
        if header.len() > l.max_header {
            return Err(over("reply header length", header.len(), l.max_header));
        }
        if payload.len() > l.max_segments {
            return Err(over(
                "reply payload segments",
                payload.len(),
                l.max_segments,
            ));
        }
        let total: usize = payload.iter().map(|b| b.len()).sum();
        if total > l.max_payload {
            return Err(over("reply payload", total, l.max_payload));
        }
        // Payload outside this server's registered pool is copied into it first.
        let copied: Option<Vec<Iobuf>> = if payload.iter().any(|b| b.keys(self.reg).is_none()) {
            let mut span = self.pool.get_span(total)?.into_vec();
            let mut it = payload.iter().flat_map(|b| b.iter().copied());
            for b in span.iter_mut() {
                for (d, s) in b.iter_mut().zip(&mut it) {
                    *d = s;
                }
            }
            Some(span.into_iter().map(IobufMut::freeze).collect())
        } else {
            None
        };
        let payload: &[Iobuf] = copied.as_deref().unwrap_or(payload);
        let inline = total <= l.inline_threshold;
        let msg_len = reply_len(header.len(), if inline { total } else { 0 });
        let on_stack = msg_len <= self.max_inline_send && msg_len <= STACK_MSG;
        let mut stack = [0u8; STACK_MSG];
        let mut ctl_buf = if on_stack {
            None
        } else {
            Some(self.ctl.get_control(msg_len)?)
        };
        {
            let out: &mut [u8] = match ctl_buf.as_mut() {
                Some(b) => &mut b[..msg_len],
                None => &mut stack[..msg_len],
            };
            let mut at = encode_reply(out, id, header, total, inline)
                .map_err(|e| Error::InvalidArgument(format!("cannot encode the reply: {e}")))?;
            if inline {
                for b in payload {
                    out[at..at + b.len()].copy_from_slice(b);
                    at += b.len();
                }
            }
        }

        // Under the state lock: the request's checks. Its slot is free again from here on
        // (the client cannot use this credit again before it has this reply), and its
        // receive descriptors are lent to the post.
        let remote = {
            let mut guard = self.lock();
            let st = &mut *guard;
            if let Some(r) = &st.dead {
                return Err(Error::ConnectionClosed(r.clone()));
            }
            if self.shared.over.load(Ordering::SeqCst) {
                return Err(Error::ConnectionClosed(
                    self.shared.reason().unwrap_or_default(),
                ));
            }
            if st.closing {
                return Err(Error::ConnectionClosed(format!(
                    "the connection from {} is being closed by the server",
                    self.peer
                )));
            }
            if let Err(e) = self.feed(st, Event::Reply { id, bytes: total }) {
                drop(guard);
                self.after_fail();
                return Err(e);
            }
            let s = match st.actions.get(0) {
                Some(Action::Reply { slot }) => slot,
                Some(Action::RefuseReply(ReplyRefusal::NotInFlight(id))) => {
                    return Err(Error::InvalidArgument(format!(
                    "reply to request id {id}, which is not in flight on the connection from {}",
                    self.peer
                )))
                }
                Some(Action::RefuseReply(ReplyRefusal::TooLarge { bytes, cap })) => {
                    return Err(over(
                        "reply payload (the request's reply capacity)",
                        bytes,
                        cap,
                    ));
                }
                other => {
                    let e = self.refused(st, Unexpected(other));
                    drop(guard);
                    self.after_fail();
                    return Err(e);
                }
            };
            let spare = self.spare_descs(st);
            let remote = std::mem::replace(&mut st.slots[s].recv, spare);
            st.slots[s].reset();
            // `close` waits for this reply's post too.
            self.posting.fetch_add(1, Ordering::SeqCst);
            remote
        };
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.touch();
        tracing::debug!(
            id = id | (self.lane << LANE_SHIFT),
            wire_id = id,
            lane = self.lane,
            payload_len = total,
            inline,
            "rdma reply posted"
        );
        let msg = match ctl_buf {
            Some(b) => ReplyMsg::Buf(b, msg_len),
            None => ReplyMsg::Inline(&stack[..msg_len]),
        };
        let posted = self.post_reply(&remote, payload, total, inline, msg);
        {
            let mut st = self.lock();
            keep_spare(&mut st.spare_descs, remote);
        }
        if let Err(r) = posted {
            if self.dead.load(Ordering::SeqCst) {
                return Err(Error::ConnectionClosed(self.shared.reason().unwrap_or(r)));
            }
            let r = format!("{r} (connection from {})", self.peer);
            self.fail(r.clone(), End::Failed);
            return Err(Error::Transport {
                transport: "rdma",
                what: r,
                source: "post failed".into(),
            });
        }
        Ok(())
    }

    /// Posts a reply: RDMA WRITEs of `payload` into `remote` (unless it travels inline),
    /// then the SEND of the message. Under the send-side lock only; ends the reply's
    /// `posting` count.
    fn post_reply(
        &self,
        remote: &[Desc],
        payload: &[Iobuf],
        total: usize,
        inline: bool,
        msg: ReplyMsg<'_>,
    ) -> std::result::Result<(), String> {
        let p = self.post_lock();
        let (p, r) = self.post_reply_locked(p, remote, payload, total, inline, msg);
        // Under the lock, so that `close` (which checks it under the lock) cannot miss it.
        self.posting.fetch_sub(1, Ordering::SeqCst);
        let wake = p.room_waiters > 0;
        drop(p);
        if wake {
            self.room_cv.notify_all();
        }
        r
    }

    fn post_reply_locked<'a>(
        &'a self,
        mut p: MutexGuard<'a, PostSide>,
        remote: &[Desc],
        payload: &[Iobuf],
        total: usize,
        inline: bool,
        msg: ReplyMsg<'_>,
    ) -> (MutexGuard<'a, PostSide>, std::result::Result<(), String>) {
        let n_writes = if inline {
            0
        } else {
            p.local.clear();
            for b in payload.iter().filter(|b| !b.is_empty()) {
                // Checked by `reply`: every buffer has keys.
                let lkey = b.keys(self.reg).map_or(0, |k| k.lkey);
                p.local.push(Local {
                    addr: b.as_ptr() as u64,
                    len: b.len() as u32,
                    lkey,
                });
            }
            Plan::new(remote, &p.local, total as u64, self.write_sge).count()
        };
        if n_writes + 1 > self.sq_depth {
            let r = format!(
                "a reply needs {} work requests, more than the send queue's {}",
                n_writes + 1,
                self.sq_depth
            );
            return (p, Err(r));
        }
        let mut p = match self.wait_room(p, n_writes + 1) {
            Ok(p) => p,
            Err((p, why)) => return (p, Err(why)),
        };
        let qp_guard = self.qp();
        let Some(qp) = qp_guard.as_ref() else {
            return (p, Err("the queue pair is gone".into()));
        };
        let PostSide { sq, local, .. } = &mut *p;
        if !inline {
            let mut plan = Plan::new(remote, local, total as u64, self.write_sge);
            let mut pieces = [Local::default(); MAX_SGE];
            let mut sges = [Sge::default(); MAX_SGE];
            while let Some(w) = plan.next_into(&mut pieces[..self.write_sge]) {
                for (d, piece) in sges.iter_mut().zip(&pieces[..w.n_sge]) {
                    *d = to_sge(piece);
                }
                let seq = sq.next_seq();
                // Unsignaled: the SEND that follows is, and completes after it. The slot
                // number in the id is unused for WRITEs and SENDs.
                if let Err(e) = qp.post_write_unsignaled(
                    wr_id(KIND_WRITE, 0, seq),
                    &sges[..w.n_sge],
                    Remote {
                        addr: w.remote_addr,
                        rkey: w.rkey,
                    },
                ) {
                    let r = format!("posting an RDMA WRITE: {}", chain(&e));
                    return (p, Err(r));
                }
            }
        }
        let seq = sq.next_seq();
        if !inline {
            for b in payload.iter().filter(|b| !b.is_empty()) {
                sq.hold(seq, Held::View(b.clone()));
            }
        }
        let wr = wr_id(KIND_SEND, 0, seq);
        let r = match msg {
            ReplyMsg::Inline(m) => qp.post_send_inline(wr, &[m]),
            ReplyMsg::Buf(b, len) => {
                let r = match buf_sge(&b, len, self.ctl_reg) {
                    Some(sge) => qp.post_send(wr, &[sge]),
                    None => Ok(()),
                };
                sq.hold(seq, Held::Buf(b));
                r
            }
        };
        let r = r.map_err(|e| format!("posting a reply SEND: {}", chain(&e)));
        (p, r)
    }

    /// Stops new replies and lets those already posted reach the client (a refusal like
    /// "server full" is sent right before the connection is closed), until `deadline`.
    fn drain(&self, deadline: Instant) {
        self.lock().closing = true;
        // The completions this waits for: `recv` may not be there to take them.
        self.poller.background(false);
        let mut p = self.post_lock();
        while !self.dead.load(Ordering::SeqCst)
            && (!p.sq.idle() || self.posting.load(Ordering::SeqCst) > 0)
        {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            p.room_waiters += 1;
            p = match self.room_cv.wait_timeout(p, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            p.room_waiters -= 1;
        }
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
            if matches!(kind, KIND_READ | KIND_WRITE)
                && matches!(
                    c.status,
                    WcStatus::RemoteAccessError | WcStatus::RemoteInvalidRequestError
                )
            {
                tracing::warn!(
                    peer = %self.peer,
                    "the client {} advertised memory the server cannot access: {why}; \
                     closing that connection",
                    self.peer
                );
            }
            self.fail(
                format!("rdma connection from {}: {why}", self.peer),
                End::Failed,
            );
            return;
        }
        match kind {
            KIND_RECV => self.on_request(slot, c.byte_len as usize),
            KIND_SEND | KIND_WRITE | KIND_READ => self.on_send_queue(kind, slot, seq),
            other => self.fail(
                format!("internal: a completion of unknown kind {other}"),
                End::Failed,
            ),
        }
    }

    fn on_tick(&self) {
        let Some(idle) = self.idle else { return };
        let mut st = self.lock();
        // Idle means no request of any queue pair in flight and none for `idle`.
        if st.dead.is_some() || self.shared.in_flight.load(Ordering::Relaxed) > 0 {
            return;
        }
        if !self.post_lock().sq.idle() {
            return;
        }
        if self.shared.idle_for() > idle {
            let r = format!(
                "the connection from {} was idle for longer than server.idle_timeout ({idle:?})",
                self.peer
            );
            if self.fail_locked(&mut st, r, End::Idle(idle)) {
                drop(st);
                self.after_fail();
            }
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn on_socket_end(&self, why: Option<String>) {
        self.shared.drain_all();
        match why {
            None => self.fail(
                format!("the client {} closed the connection", self.peer),
                End::Clean,
            ),
            Some(w) => self.fail(format!("connection from {}: {w}", self.peer), End::Failed),
        }
    }

    fn on_cq_error(&self, why: String) {
        self.fail(
            format!("rdma connection from {}: {why}", self.peer),
            End::Failed,
        );
    }
}

impl LaneSet {
    /// Ends every queue pair of the connection, after letting posted replies drain.
    fn close(&self) {
        let deadline = Instant::now() + CLOSE_DRAIN;
        for c in &self.lanes {
            c.drain(deadline);
        }
        for c in &self.lanes {
            let r = format!("the connection from {} was closed by the server", c.peer);
            c.fail(r, End::Clean);
        }
    }
}

impl Replier for LaneSet {
    fn reply(&self, id: u64, header: &[u8], payload: &[Iobuf]) -> Result<()> {
        let lane = (id >> LANE_SHIFT) as usize;
        match self.lanes.get(lane) {
            Some(c) => c.reply(id & ((1 << LANE_SHIFT) - 1), header, payload),
            None => Err(Error::InvalidArgument(format!(
                "reply to request id {id}, which this connection never handed out"
            ))),
        }
    }

    fn recycle(&self, incoming: Incoming) {
        if let Some(c) = self.lanes.get((incoming.id >> LANE_SHIFT) as usize) {
            c.recycle(incoming.header, incoming.payload);
        }
    }

    fn close(&self) {
        LaneSet::close(self);
    }
}

impl RdmaServerConn {
    /// Lets the connection threads take completions (see `lead_all`).
    fn background(&self) {
        for c in &self.set.lanes {
            c.poller.background(false);
        }
    }

    /// Polls every queue pair's completion queue on this thread until something is ready
    /// for `recv` (the generation moves past `gen`) or `rdma.spin_us` has passed.
    fn spin(&self, gen: u64) {
        let Some(first) = self.set.lanes.first() else {
            return;
        };
        let deadline = Instant::now() + first.poller.spin_time();
        loop {
            for c in &self.set.lanes {
                if c.poller.drain(&**c).is_err() {
                    return;
                }
            }
            if *lock(&self.shared.gen) != gen || Instant::now() >= deadline {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// A request from queue pair `i`, its id marked with the queue pair for the reply.
    /// Once more than this one is being served, the connection threads take the
    /// completions (of their replies) while `recv` is not called (see `lead_all`).
    fn hand_out(&mut self, i: usize, mut inc: Incoming) -> Incoming {
        if self.shared.in_flight.load(Ordering::SeqCst) > 1 {
            self.background();
        }
        self.next = (i + 1) % self.set.lanes.len();
        let wire_id = inc.id;
        inc.id |= (i as u64) << LANE_SHIFT;
        tracing::debug!(
            id = inc.id,
            wire_id,
            lane = i,
            payload_len = inc.payload.iter().map(|b| b.len()).sum::<usize>(),
            reply_cap = inc.reply_capacity,
            "rdma request received"
        );
        inc
    }
}

impl ServerConn for RdmaServerConn {
    /// Payload is refused before authentication (the connection fails, before any pool
    /// buffer is taken for it) and held to the budget with back-pressure.
    fn set_admission(&mut self, admission: Arc<Admission>) {
        let _ = self.shared.admission.set(admission);
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn recv(&mut self) -> Result<Option<Incoming>> {
        let n = self.set.lanes.len();
        let mut spun = false;
        loop {
            let gen = *lock(&self.shared.gen);
            let mut blocked = None;
            for k in 0..n {
                let i = (self.next + k) % n;
                match self.set.lanes[i].step(None) {
                    Ok(Step::Got(inc)) => return Ok(Some(self.hand_out(i, inc))),
                    Ok(Step::Empty) => {}
                    Ok(Step::Blocked) => {
                        blocked.get_or_insert(i);
                    }
                    Ok(Step::Dead) => return self.shared.closed_result(&self.peer),
                    Err(e) => return Err(e),
                }
            }
            if let Some(i) = blocked {
                // Nothing can be handed out without budget or pool buffers: wait for them a
                // slice at a time, so that a request another queue pair finishes meanwhile
                // (and whose bytes and buffers come back once it is served) is not stuck
                // behind the wait. However long: back-pressure, not failure.
                match self.set.lanes[i].step(Some(POOL_SLICE)) {
                    Ok(Step::Got(inc)) => return Ok(Some(self.hand_out(i, inc))),
                    Ok(Step::Empty | Step::Blocked) => continue,
                    Ok(Step::Dead) => return self.shared.closed_result(&self.peer),
                    Err(e) => return Err(e),
                }
            }
            let spins = self.set.lanes.iter().any(|c| c.poller.spins());
            if spins && !spun {
                // Take the next request off the completion queues on this thread, if it
                // comes soon (see `Poller`), before sleeping.
                spun = true;
                self.spin(gen);
                continue;
            }
            // While no request is being served, wait on the completion channels here: the
            // next request then needs no hand-off from a connection thread. Else those
            // threads take completions (replies' among them) and wake this one.
            if self.shared.in_flight.load(Ordering::SeqCst) == 0
                && lead_all(&self.set.lanes, |c| &c.poller, &|| {
                    *lock(&self.shared.gen) != gen
                })
            {
                continue;
            }
            self.background();
            let mut g = lock(&self.shared.gen);
            while *g == gen {
                g = match self.shared.events_cv.wait(g) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
        }
    }

    fn replier(&self) -> Arc<dyn Replier> {
        self.set.clone()
    }

    fn backlog(&mut self) -> bool {
        self.shared.queued.load(Ordering::Relaxed) > 0
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}

impl Drop for RdmaServerConn {
    /// Nobody can take this connection's requests any more: end it (a no-op when it has
    /// already ended, as after the core server's own `close`).
    fn drop(&mut self) {
        self.set.close();
    }
}
