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
//! pair's lock, feeds them what happened (a reply, a malformed reply, a send completion, a
//! tick, the socket's end) and carries out what they answer (post, complete, fail), each
//! action with a call into a module of its own: `credits` (a free slot), `describe` (the
//! payload's keys, registrations and bounce buffers, and the request message), `room`
//! (send-queue room), `post` (the request's SEND), `windows` (bind and invalidate memory windows), `deliver` (complete a
//! request with its reply) and `fail` (ending the connection). Connection set-up is in
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
    check_request, ClientConn, Completer, CompletionCell, Limits, Pending, Progress, RecvSeg,
    Reply, Request, SendSeg,
};
use zcio::{Error, IobufMut, Pool, Result};

use super::conn::{
    chain, describe_failure, wr_parts, LaneEvents, Poller, SendQueue, KIND_INV, KIND_RECV,
    KIND_SEND,
};
use super::lane::client::{Action, Actions, ClientLane, Event};
use super::lane::receives::Receives;
use super::msg::{decode_reply, MsgError, MsgLimits};
use super::{lock, Faults, MAX_INLINE};
use crate::verbs::{ArenaRegistrar, ProtectionDomain, QueuePair, WorkCompletion};

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

/// One queue pair of a client connection.
struct LaneHandle {
    lane: Arc<Lane>,
    /// The queue pair's thread (completions and liveness); it ends soon after the
    /// connection fails (the socket is shut down, which wakes it).
    thread: Option<JoinHandle<()>>,
}

mod credits;
mod deliver;
mod describe;
mod fail;
mod post;
mod room;
mod setup;
mod windows;
pub(crate) use setup::connect;

use describe::Scratch;
use fail::Ended;
use windows::post_binds;

/// A client connection (see the module documentation): one or more queue pairs, each with
/// its own slots, completion queue and thread; a request goes to the least busy one.
pub(crate) struct RdmaClientConn {
    lanes: Vec<LaneHandle>,
    limits: Limits,
    /// Where the search for the least busy queue pair starts (round robin among equals).
    next: AtomicUsize,
    peer: String,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        lock(&self.state)
    }

    fn closed_err(&self, st: &LaneState) -> Error {
        Error::ConnectionClosed(st.dead.clone().unwrap_or_default())
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
        st = self.wait_room(st, need);
        if st.dead.is_some() {
            let e = self.closed_err(&st);
            drop(st);
            self.release(i, scratch, msg);
            return Err(e);
        }
        let progress: Arc<dyn Progress> = self.clone();
        let (completer, pending) = st.completion(Some(progress));
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
        let posted = match &st.qp {
            _ if refused.is_some() => Ok(()),
            _ if bound.is_err() => bound,
            Some(qp) => self.post_request(qp, i, sq_seq, &msg, msg_len, signaled),
            None => Ok(()),
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

    /// A reply message that does not decode: the lane fails the connection.
    fn on_malformed(&self, e: MsgError) {
        let mut st = self.lock();
        let r = match st.feed(Event::Malformed(e)) {
            Ok(Some(Action::Fail(v))) => self.violation(v.to_string()),
            Ok(other) => format!("internal: {other:?} for a malformed reply"),
            Err(r) => r,
        };
        let done = self.fail_locked(&mut st, r, None);
        drop(st);
        self.finish_fail(done);
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
            Err(e) => return self.on_malformed(e),
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
                    match self.repost(st, ri, buf) {
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
