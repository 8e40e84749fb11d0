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
//! READs right there, if the server has set the connection's rules
//! ([`ServerConn::set_admission`]; until then the request waits for `recv`, which checks it
//! against them first), the pool has the buffers free and the send queue has room (the
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
//! pure and tested on any host; so is when the connection counts as idle ([`IdleTimeout`]).
//! This module is the driver: it holds them under each queue pair's locks, feeds them what
//! happened (a request, a malformed message, a READ completion, `recv`, a reply, the
//! socket's end) and carries out what they answer (post READs, hand a request out, post the
//! reply, fail), each action with a call into a module of its own: `post` (encode a reply,
//! post READs, WRITEs and SENDs), `buffers` (payload budget and pool buffers), `room`
//! (send-queue room, draining), `reuse` (vectors kept for their capacity), `fail` (ending
//! the connection), `shared` (what its queue pairs share) and `wait` (how `recv` waits).
//! Connection set-up is in `setup`.
//!
//! # Failure
//! An error completion (a client's bogus memory key shows up as a remote access error of
//! a READ or WRITE, and is logged with the peer's address), a malformed message, more
//! requests than credits, end of stream on the bootstrap socket (the client closed or its
//! process died), the idle timeout, or [`Replier::close`] end the connection: the queue
//! pair is destroyed first, then every buffer the connection holds goes back to its pool.
//! Other connections are not affected.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use zcio::pool::RegistrarId;
use zcio::transport::{check_reply, Admission, Incoming, Limits, Replier, ServerConn};
use zcio::{Error, Iobuf, IobufMut, Pool, Result};

use super::conn::{
    describe_failure, wr_parts, LaneEvents, Poller, SendQueue, KIND_READ, KIND_RECV, KIND_SEND,
    KIND_WRITE,
};
use super::lane::idle::{Activity, IdleTimeout};
use super::lane::receives::Receives;
use super::lane::server::{
    Action, Actions, Event, Payload, ReplyRefusal, ServerLane, Violation, LANE_SHIFT,
};
use super::msg::{decode_request, Desc, MsgError, MsgLimits, RequestView};
use super::plan::Local;
use super::{lock, MAX_INLINE};
use crate::verbs::{QueuePair, WcStatus, WorkCompletion};

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

mod buffers;
mod fail;
mod post;
mod reuse;
mod room;
mod setup;
mod shared;
mod wait;
pub(crate) use setup::listen;

use buffers::POOL_SLICE;
use post::{ReadStart, ReplyOut};
use reuse::{keep_spare, spares, HEADER_ROOM, LENT, PAYLOAD_ROOM};
use shared::{End, Shared};

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
    /// Copies what the request in `view` needs out of its receive buffer (into vectors
    /// with room kept from earlier requests); `id` is its id as the server sees it.
    fn accept(&mut self, view: &RequestView<'_>, id: u64) {
        self.header.clear();
        self.header.extend_from_slice(view.header);
        self.send.clear();
        self.send.extend(view.send_descs());
        self.recv.clear();
        self.recv.extend(view.recv_descs());
        self.inline.clear();
        self.inline.extend_from_slice(view.inline);
        self.recv_cap = view.recv_cap;
        self.send_total = view.send_total;
        self.id = id;
        self.admitted = false;
    }

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

/// What one look at a queue pair's events found.
enum Step {
    Got(Incoming),
    Empty,
    /// The next request waits for pool buffers.
    Blocked,
    Dead,
}

/// An action the lane gave that the driver has no use for at that point: a driver bug.
struct Unexpected(Option<Action>);

/// What a decoded request carries, as the lane knows it.
fn payload_of(view: &RequestView<'_>) -> Payload {
    if view.send_descs().len() > 0 {
        Payload::Read
    } else if view.inline.is_empty() {
        Payload::None
    } else {
        Payload::Inline
    }
}

impl std::fmt::Display for Unexpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "internal: unexpected request-lane action {:?}", self.0)
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

    /// A request message that does not decode: the lane fails the connection.
    fn on_malformed(&self, e: MsgError) {
        let mut st = self.lock();
        if st.dead.is_some() {
            return;
        }
        let failed = match self.feed(&mut st, Event::Malformed(e)) {
            Ok(()) => match st.actions.get(0) {
                Some(Action::Fail(v)) => self.fail_violation(&mut st, v),
                other => {
                    let _ = self.refused(&mut st, Unexpected(other));
                    true
                }
            },
            Err(_) => true,
        };
        drop(st);
        if failed {
            self.after_fail();
        }
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
            Err(e) => return self.on_malformed(e),
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.dead.is_some() {
            return;
        }
        let ev = Event::Request {
            id: view.id,
            payload: payload_of(&view),
            bytes: view.send_total,
            reply_cap: view.recv_cap,
            authenticated: self.shared.authenticated(),
            rules_set: self.shared.admission.get().is_some(),
        };
        if self.feed(st, ev).is_err() {
            drop(guard);
            self.after_fail();
            return;
        }
        for k in 0..st.actions.len() {
            match st.actions.get(k) {
                Some(Action::Accept { slot: s }) => {
                    st.slots[s].accept(&view, view.id | (self.lane << LANE_SHIFT));
                    self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                    self.shared.queued.fetch_add(1, Ordering::Relaxed);
                    self.shared.touch();
                }
                Some(Action::PostRecv) => {
                    // `buf` is moved: the rest of the actions do not need it.
                    if let Err(e) = self.repost(st, ri, buf) {
                        if self.fail_locked(st, e, End::Failed) {
                            drop(guard);
                            self.after_fail();
                        }
                        return;
                    }
                    return self.on_request_rest(guard, k + 1);
                }
                Some(Action::Fail(v)) => {
                    if self.fail_violation(st, v) {
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
            authenticated: self.shared.authenticated(),
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
                    if self.fail_violation(&mut st, v) {
                        drop(st);
                        self.after_fail();
                    }
                    return Ok(Step::Dead);
                }
                other => return self.refused_step(st, Unexpected(Some(other))),
            };
        }
    }

    fn reply(&self, id: u64, header: &[u8], payload: &[Iobuf]) -> Result<()> {
        check_reply(header, payload, &self.limits)?;
        let mut stack = [0u8; STACK_MSG];
        let ReplyOut {
            copied,
            total,
            inline,
            msg,
        } = self.encode_reply_msg(id, header, payload, &mut stack)?;
        let payload: &[Iobuf] = copied.as_deref().unwrap_or(payload);
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
                    return Err(Error::LimitExceeded {
                        what: "reply payload (the request's reply capacity)",
                        value: bytes as u64,
                        limit: cap as u64,
                    });
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
        let Some(idle) = self.idle.map(IdleTimeout::new) else {
            return;
        };
        let mut st = self.lock();
        if st.dead.is_some() {
            return;
        }
        let in_flight = self.shared.in_flight.load(Ordering::Relaxed);
        let activity = Activity {
            in_flight,
            // The send-side lock only when it can matter.
            send_queue_idle: in_flight == 0 && self.post_lock().sq.idle(),
            quiet_for: self.shared.idle_for(),
        };
        if idle.expired(activity) {
            let idle = idle.after();
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
    /// buffer is taken for it) and held to the budget with back-pressure. A request that
    /// arrived before this call is not READ until `recv`, which checks it against these
    /// rules first.
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
            self.wait_for_events(gen, &mut spun);
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
