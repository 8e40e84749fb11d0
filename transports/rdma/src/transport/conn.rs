//! Machinery both ends of a connection share: private control pools, queue pair set-up,
//! the bootstrap socket, and the thread every connection runs (completions and liveness).
//! The work request ids and the send-queue ledger are pure, in [`super::lane::send_queue`].

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::RdmaConfig;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{send, MsgFlags};
use zcio::pool::{ClassConfig, PoolConfig, RegistrarId};
use zcio::transport::Limits;
use zcio::{Error, IobufMut, Pool, Result};

use super::bootstrap::{Hello, Role, READY};
use super::device::Device;
use super::msg::MsgLimits;
use super::rdma_err;
use crate::verbs::{
    is_ready, poll_fds, poll_timeout_ms, CompletionQueue, CqMode, Endpoint, QpConfig, QueuePair,
    Sge, WcStatus, WorkCompletion,
};
use crate::RdmaError;

pub(crate) use super::lane::send_queue::{
    wr_id, wr_parts, Held, SendQueue, KIND_BIND, KIND_INV, KIND_READ, KIND_RECV, KIND_SEND,
    KIND_WRITE,
};

/// Largest scatter/gather list this transport builds (on the stack).
pub(crate) const MAX_SGE: usize = 32;

/// Rounds up to a whole number of 4 KiB pages.
pub(crate) fn round_page(n: usize) -> usize {
    n.div_ceil(4096).max(1) * 4096
}

/// A connection's private pool for messages: `(buffer size, count)` per class. Registered
/// LOCAL_WRITE; mapped whole at once (one arena per class).
pub(crate) fn control_pool(classes: &[(usize, usize)]) -> Result<Pool> {
    let mut cc: Vec<ClassConfig> = Vec::with_capacity(classes.len());
    for &(size, count) in classes {
        let size = round_page(size);
        match cc.iter_mut().find(|c| c.size == size) {
            Some(c) => {
                c.count += count;
                c.arena_slots = c.count;
            }
            None => cc.push(ClassConfig {
                size,
                count,
                reserve: 0,
                arena_slots: count,
            }),
        }
    }
    Pool::new(&PoolConfig {
        classes: cc,
        wait_timeout: Duration::from_secs(10),
        stripes: 1,
    })
}

/// Total bytes of a control pool with these classes.
pub(crate) fn control_bytes(classes: &[(usize, usize)]) -> usize {
    classes.iter().map(|&(s, c)| round_page(s) * c).sum()
}

/// The scatter/gather entry of a pool buffer's first `len` bytes.
pub(crate) fn buf_sge(buf: &IobufMut, len: usize, reg: RegistrarId) -> Option<Sge> {
    let keys = buf.keys(reg)?;
    Some(Sge {
        addr: buf.as_ptr() as u64,
        len: u32::try_from(len).ok()?,
        lkey: keys.lkey,
    })
}

/// Posts a receive into the whole of a control buffer.
pub(crate) fn post_recv_buf(
    qp: &QueuePair,
    slot: usize,
    buf: &IobufMut,
    reg: RegistrarId,
) -> std::result::Result<(), String> {
    let sge = buf_sge(buf, buf.len(), reg)
        .ok_or_else(|| "a control buffer without registration keys".to_string())?;
    qp.post_recv(wr_id(KIND_RECV, slot, 0), sge)
        .map_err(|e| format!("posting a receive: {}", chain(&e)))
}

/// Posts the first receives of a new queue pair: `credits` control buffers of `size` bytes
/// from `ctl`, kept in `recv`. `recv` is the caller's, declared before the queue pair, so
/// that on an early return the queue pair (dropped first) is destroyed before the buffers
/// it may write into go back.
pub(crate) fn post_initial_receives(
    qp: &QueuePair,
    ctl: &Pool,
    reg: RegistrarId,
    size: usize,
    credits: usize,
    recv: &mut Vec<Option<IobufMut>>,
) -> Result<()> {
    for i in 0..credits {
        let b = ctl.get_control(size)?;
        post_recv_buf(qp, i, &b, reg).map_err(|e| Error::Transport {
            transport: "rdma",
            what: "posting the initial receives".into(),
            source: e.into(),
        })?;
        recv.push(Some(b));
    }
    Ok(())
}

/// Moves a new queue pair to RTR and RTS towards the peer's `remote` endpoint.
pub(crate) fn connect_qp(qp: &mut QueuePair, remote: &Endpoint, peer: &str) -> Result<()> {
    qp.connect(remote)
        .map_err(|e| rdma_err(format!("connecting the queue pair to {peer}"), e))?;
    tracing::debug!(%peer, local = %qp.local_endpoint(), %remote, "rdma queue pair connected");
    Ok(())
}

/// A queue pair set up and connected, with everything it owns: what either side's
/// set-up hands to the lane it starts.
pub(crate) struct ConnectedQp {
    // Field order is drop order: the queue pair goes before the buffers it may write into.
    pub(crate) qp: QueuePair,
    pub(crate) cq: CompletionQueue,
    /// The receive buffers, `recv[i]` posted as receive `i`.
    pub(crate) recv: Vec<Option<IobufMut>>,
    pub(crate) ctl: Pool,
    pub(crate) ctl_reg: RegistrarId,
    /// This queue pair's negotiated limits (`max_in_flight`: its credits).
    pub(crate) limits: Limits,
}

/// The numbers of one queue pair that a hello offers and, once both hellos are in, the
/// negotiated ones: what both sides' set-up writes into its hello and its [`Limits`].
pub(crate) struct LaneTerms {
    pub(crate) credits: usize,
    pub(crate) max_segments: usize,
    pub(crate) max_payload: usize,
    pub(crate) max_header: usize,
    pub(crate) inline: usize,
}

impl LaneTerms {
    /// This side's hello with these numbers, from the queue pair at `endpoint` (one of
    /// `queue_pairs`) whose receives take `recv_size` bytes.
    pub(crate) fn hello(
        &self,
        role: Role,
        queue_pairs: u8,
        endpoint: Endpoint,
        recv_size: usize,
    ) -> Hello {
        Hello {
            role,
            queue_pairs,
            endpoint,
            credits: self.credits as u32,
            max_segments: self.max_segments as u32,
            max_payload: self.max_payload as u32,
            max_header: self.max_header as u32,
            inline_threshold: self.inline as u32,
            recv_size: recv_size as u32,
        }
    }

    /// The queue pair's limits (`max_in_flight`: its credits; payload by RDMA).
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_segments: self.max_segments,
            max_payload: self.max_payload,
            max_header: self.max_header,
            max_in_flight: self.credits,
            inline_threshold: self.inline,
            rdma_payload: true,
        }
    }
}

/// How to size one connection's queue pair.
pub(crate) struct QpSizes {
    pub(crate) send_wr: usize,
    pub(crate) recv_wr: usize,
    pub(crate) inline: usize,
    pub(crate) remote_access: bool,
}

/// The inline data size to ask a queue pair for (`IBV_SEND_INLINE` messages): a message's
/// fixed part and a short header with up to 128 bytes of payload, whatever the payload
/// threshold. rxe takes at most 400 bytes, and a queue pair that asks for more gets none
/// (see [`create_qp`]); bigger messages go from registered control buffers instead.
pub(crate) fn qp_inline(threshold: usize) -> usize {
    threshold.min(128) + 256
}

/// Creates the connection's completion queue and queue pair (in INIT). If the device
/// refuses the inline size, retries without inline SENDs.
pub(crate) fn create_qp(
    dev: &Device,
    cfg: &RdmaConfig,
    sizes: &QpSizes,
) -> Result<(CompletionQueue, QueuePair)> {
    let max_wr = dev.caps.max_qp_wr.max(1) as usize;
    let send_wr = sizes.send_wr.clamp(1, max_wr) as u32;
    let recv_wr = sizes.recv_wr.clamp(1, max_wr) as u32;
    let gid_index = match cfg.gid_index {
        None => None,
        Some(i) => Some(u8::try_from(i).map_err(|_| {
            Error::config("rdma.gid_index", i, "must be below 256 for this transport")
        })?),
    };
    let mode = if cfg.busy_poll {
        CqMode::BusyPoll
    } else {
        CqMode::Event
    };
    let cqe = (send_wr + recv_wr).min(dev.caps.max_cqe.max(1));
    let cq = CompletionQueue::new(&dev.ctx, cqe, mode)
        .map_err(|e| rdma_err("creating a completion queue".into(), e))?;
    let mut qc = QpConfig {
        port: cfg.port,
        gid_index,
        max_send_wr: send_wr,
        max_recv_wr: recv_wr,
        max_send_sge: dev.caps.max_sge.clamp(1, MAX_SGE as u32),
        max_recv_sge: 1,
        max_inline_data: u32::try_from(sizes.inline).unwrap_or(u32::MAX),
        allow_remote_access: sizes.remote_access,
        ..QpConfig::default()
    };
    let qp = match QueuePair::new(&dev.pd, &cq, &cq, &qc) {
        Ok(qp) => qp,
        Err(first) if qc.max_inline_data > 0 => {
            qc.max_inline_data = 0;
            QueuePair::new(&dev.pd, &cq, &cq, &qc)
                .map_err(|_| rdma_err("creating an RC queue pair".into(), first))?
        }
        Err(e) => return Err(rdma_err("creating an RC queue pair".into(), e)),
    };
    Ok((cq, qp))
}

/// The end of the bootstrap: sends [`READY`] and reads the peer's (`who` names the peer
/// in the error).
pub(crate) fn exchange_ready(
    sock: &TcpStream,
    who: &str,
    hs: &dyn Fn(io::Error) -> Error,
) -> Result<()> {
    send_all(sock, &[READY]).map_err(hs)?;
    let mut ready = [0u8; 1];
    recv_exact(sock, &mut ready).map_err(hs)?;
    if ready[0] != READY {
        return Err(Error::decode(
            "rdma handshake",
            format!("{who} sent {:#04x} instead of ready", ready[0]),
        ));
    }
    Ok(())
}

/// The limits of a connection from those of its queue pairs: what all of them can carry,
/// and the credits of all of them in flight.
pub(crate) fn connection_limits(first: Limits, rest: impl IntoIterator<Item = Limits>) -> Limits {
    let mut in_flight = first.max_in_flight;
    let mut l = first;
    for x in rest {
        in_flight += x.max_in_flight;
        l = l.min(&x);
    }
    l.max_in_flight = in_flight;
    l
}

/// What a queue pair's message decoders check against: its negotiated limits.
pub(crate) fn msg_limits(l: &Limits) -> MsgLimits {
    MsgLimits {
        max_header: l.max_header,
        max_segments: l.max_segments,
        max_payload: l.max_payload,
        inline_threshold: l.inline_threshold,
    }
}

/// Sends all of `bytes` on the bootstrap socket (never raising SIGPIPE).
pub(crate) fn send_all(sock: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match send(sock.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "send timed out (the peer is not reading)",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from the bootstrap socket.
pub(crate) fn recv_exact(sock: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut s = sock;
    s.read_exact(buf)
}

/// An error and its sources on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// What a failed work completion means, in words.
pub(crate) fn describe_failure(kind: u8, status: WcStatus) -> String {
    let op = match kind {
        KIND_RECV => "a receive",
        KIND_SEND => "a SEND",
        KIND_WRITE => "an RDMA WRITE",
        KIND_READ => "an RDMA READ",
        KIND_BIND => "a memory window bind",
        KIND_INV => "a memory window invalidation",
        _ => "a work request",
    };
    let why = match status {
        WcStatus::RemoteAccessError => "a remote access error: the peer's memory key, address \
             or length was refused (a bogus or stale memory descriptor)"
            .to_string(),
        WcStatus::RemoteInvalidRequestError => {
            "a remote invalid request error: the peer refused the operation".to_string()
        }
        WcStatus::RetryExceededError => "transport retries exceeded: the peer stopped \
             answering (its process or queue pair is gone, or the network is down)"
            .to_string(),
        WcStatus::RnrRetryExceededError => {
            "receiver-not-ready retries exceeded: the peer posted no receive".to_string()
        }
        WcStatus::WrFlushError => "a flush: the queue pair went into the error state (the \
             peer's RDMA access to memory this side advertised failed, or the connection \
             broke; the peer's log says which)"
            .to_string(),
        WcStatus::LocalLengthError => {
            "a local length error: a message larger than the receive buffer".to_string()
        }
        WcStatus::LocalProtectionError => {
            "a local protection error: a local buffer outside its memory region".to_string()
        }
        other => format!("status {other}"),
    };
    format!("{op} failed with {why}")
}

/// The tick of a connection's completion thread: how often it checks timeouts and death.
pub(crate) fn tick_for(d: Duration) -> Duration {
    (d / 8).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// What a connection's thread calls back into.
pub(crate) trait LaneEvents: Send + Sync + 'static {
    /// Handles one work completion.
    fn on_completion(&self, c: &WorkCompletion);
    /// Periodic checks (timeouts); also called after every batch of completions.
    fn on_tick(&self);
    /// True once the connection has failed or closed: the thread ends.
    fn is_dead(&self) -> bool;
    /// The bootstrap socket reached end of stream (`None`) or failed / carried bytes it
    /// must not (`Some(why)`). Completions already queued have been dispatched.
    fn on_socket_end(&self, why: Option<String>);
    /// Waiting for completions failed.
    fn on_cq_error(&self, why: String);
    /// Whether a thread waiting for its own completion must be woken by send-queue
    /// completions too, not only by the peer's messages (a client whose requests end with
    /// the completion of a local memory window invalidation).
    fn wake_on_sends(&self) -> bool {
        false
    }
}

/// A connection's completion queue, polled by its connection thread and by threads that
/// wait for their own completions.
///
/// A thread about to block on its own completion (a client waiting for a reply) *leads*:
/// it waits on the completion channel itself and handles what comes, so that its reply
/// reaches it without a hand-off from the connection thread (two context switches fewer
/// per request; under emulation each is about 100 microseconds). Other threads waiting
/// meanwhile *follow*: they sleep until the leader has handled completions (maybe theirs)
/// or has left, and then one of them leads. First each spins on the queue for up to
/// `rdma.spin_us`.
///
/// The connection thread watches the channel only in the *background* mode: while
/// somebody waits without leading (a future being awaited, whose waker must be called by
/// somebody) or a leader gave up before its completion came. Otherwise it watches only the
/// bootstrap socket and its tick, at which it takes whatever the queue holds, so that
/// nothing is stranded. The server's `recv` leads all of a connection's queues at once
/// while no request is being served ([`lead_all`]).
///
/// Polling and handling happen under one lock, so completions are handled in the order the
/// queue gives them, whichever thread takes them (the send-queue ledger relies on it).
pub(crate) struct Poller {
    cq: CompletionQueue,
    lock: Mutex<()>,
    spin: Duration,
    lead: Mutex<Lead>,
    /// Followers sleep on it: notified when the leader handled completions or left.
    follow_cv: Condvar,
    /// Whether the connection thread watches the completion channel.
    background: AtomicBool,
    /// Once a future was awaited on this queue, the background mode stays on.
    sticky: AtomicBool,
    /// Written to make the connection thread look at `background` again.
    kick: EventFd,
    /// Written to wake the leader: another thread took completions (maybe the one it waits
    /// for) or the connection ended.
    wake: EventFd,
}

thread_local! {
    /// Whether this thread leads (see [`Poller`]): its own drains need not wake it.
    static LEADING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Default)]
struct Lead {
    leader: bool,
    followers: usize,
    ended: bool,
}

impl Poller {
    /// A poller whose connection thread starts in the background mode or not (see
    /// [`Poller`]).
    pub(crate) fn new(cq: CompletionQueue, spin: Duration, background: bool) -> io::Result<Poller> {
        let efd = || {
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(io::Error::from)
        };
        Ok(Poller {
            cq,
            lock: Mutex::new(()),
            spin,
            lead: Mutex::new(Lead::default()),
            follow_cv: Condvar::new(),
            background: AtomicBool::new(background),
            sticky: AtomicBool::new(false),
            kick: efd()?,
            wake: efd()?,
        })
    }

    /// How long a waiting thread spins (`rdma.spin_us`).
    pub(crate) fn spin_time(&self) -> Duration {
        self.spin
    }

    /// Whether waiting threads spin at all (`rdma.spin_us` > 0).
    pub(crate) fn spins(&self) -> bool {
        !self.spin.is_zero()
    }

    /// Takes the available completions (a batch) and hands each to `lane`, under the lock.
    /// Returns how many. Lock order: this lock, then the connection's state lock (which
    /// `on_completion` takes); never the other way round.
    pub(crate) fn drain<C: LaneEvents + ?Sized>(&self, lane: &C) -> Result<usize, RdmaError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = [WorkCompletion::EMPTY; 16];
        let n = self.cq.poll(&mut out)?;
        for c in &out[..n] {
            lane.on_completion(c);
        }
        drop(_g);
        if n > 0 {
            self.after_drain();
        }
        Ok(n)
    }

    /// Polls (and handles) completions on this thread until `done()` or `rdma.spin_us` has
    /// passed; at once if spinning is off. Errors are left to the connection thread, which
    /// sees them too.
    pub(crate) fn spin<C: LaneEvents + ?Sized>(&self, lane: &C, done: &dyn Fn() -> bool) {
        if self.spin.is_zero() {
            return;
        }
        let deadline = Instant::now() + self.spin;
        while !done() && !lane.is_dead() {
            if self.drain(lane).is_err() || Instant::now() >= deadline {
                return;
            }
            std::hint::spin_loop();
        }
    }

    fn lead_state(&self) -> MutexGuard<'_, Lead> {
        self.lead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Switches the connection thread to the background mode (it then watches the
    /// channel), waking it if it was not in it. `sticky`: for good.
    pub(crate) fn background(&self, sticky: bool) {
        if sticky {
            self.sticky.store(true, Ordering::SeqCst);
        }
        if !self.background.swap(true, Ordering::SeqCst) {
            let _ = self.kick.write(1);
        }
    }

    /// Wakes every leader and follower for good: the connection has ended.
    pub(crate) fn end(&self) {
        self.lead_state().ended = true;
        self.follow_cv.notify_all();
        let _ = self.wake.write(1);
    }

    /// Works on this thread towards `done()`: spins first (`rdma.spin_us`), then leads or
    /// follows (see [`Poller`]) until `done()`, the connection's end, or `deadline`. When
    /// it returns without `done()`, the connection thread is in the background mode, so
    /// the caller can block on its own wake-up. In [`crate::verbs::CqMode::BusyPoll`] the
    /// connection thread spins on the queue anyway: then this only spins.
    pub(crate) fn wait<C: LaneEvents + ?Sized>(
        &self,
        lane: &C,
        done: &dyn Fn() -> bool,
        deadline: Option<Instant>,
    ) {
        self.spin(lane, done);
        if self.cq.event_fd().is_none() {
            return;
        }
        let over = || deadline.is_some_and(|d| Instant::now() >= d);
        let mut st = self.lead_state();
        loop {
            // (`done()` may be true because the deadline passed: that is `over()`.)
            if done() && !over() {
                return;
            }
            if st.ended || lane.is_dead() || over() {
                drop(st);
                self.background(false);
                return;
            }
            if !st.leader {
                st.leader = true;
                drop(st);
                // The connection thread notices at its next wake-up; until then a completion
                // may wake both of us once, and if it takes ours, it wakes us (`wake`).
                self.leave_channel();
                LEADING.with(|l| l.set(true));
                let led = lead_loop(1, |_| (self, lane), done, deadline);
                LEADING.with(|l| l.set(false));
                st = self.lead_state();
                st.leader = false;
                if st.followers > 0 {
                    self.follow_cv.notify_all();
                }
                drop(st);
                if !matches!(led, LeaderExit::Stop) || over() {
                    // Not done: whoever completes it now must do so on their own.
                    self.background(false);
                }
                return;
            }
            st.followers += 1;
            st = match deadline {
                None => self.follow_cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    match self.follow_cv.wait_timeout(st, left) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    }
                }
            };
            st.followers -= 1;
        }
    }

    /// Leaves the channel to a leading thread: the connection thread stops watching it
    /// (at its next wake-up), unless a future keeps it in the background mode.
    fn leave_channel(&self) {
        if !self.sticky.load(Ordering::SeqCst) {
            self.background.store(false, Ordering::SeqCst);
        }
    }

    /// After completions were handled: followers look whether theirs came, and a leader
    /// on another thread is woken (it may have missed the event this thread took).
    fn after_drain(&self) {
        let st = self.lead_state();
        if st.followers > 0 {
            self.follow_cv.notify_all();
        }
        if st.leader && !LEADING.with(|l| l.get()) {
            let _ = self.wake.write(1);
        }
    }

    /// Whether the connection thread watches the channel now (see [`Poller`]).
    fn watching(&self) -> bool {
        self.background.load(Ordering::SeqCst)
    }

    /// Resets the kick (after it woke the connection thread).
    fn take_kick(&self) {
        let _ = self.kick.read();
    }
}

/// How long a leader sleeps at most before it looks again (milliseconds). Every way its
/// wait can end wakes it (an event, another thread's drain, the connection's end): this
/// only bounds what an unforeseen miss could cost, at one wake-up a second while waiting.
const RECHECK_MS: i32 = 1000;

/// Most queues [`lead_all`] waits on at once.
pub(crate) const LEAD_MAX: usize = 8;

/// Waits on the completion channels of all `lanes` at once on this thread, handling what
/// comes, until `stop()` (checked after every batch and whenever another thread took
/// completions), the end of one of them (true: the caller finds out why), or an error
/// (false). A connection's server `recv` does this while no request is being served, so
/// that a request reaches it without a hand-off from a connection thread. Returns false at
/// once (the caller then waits as usual) for queues that busy-poll or more than
/// [`LEAD_MAX`].
pub(crate) fn lead_all<C: LaneEvents>(
    lanes: &[Arc<C>],
    poller: impl Fn(&C) -> &Poller,
    stop: &dyn Fn() -> bool,
) -> bool {
    if lanes.is_empty()
        || lanes.len() > LEAD_MAX
        || lanes.iter().any(|c| poller(c).cq.event_fd().is_none())
    {
        return false;
    }
    for c in lanes {
        let p = poller(c);
        p.leave_channel();
        p.lead_state().leader = true;
    }
    LEADING.with(|l| l.set(true));
    let led = lead_loop(lanes.len(), |k| (poller(&lanes[k]), &*lanes[k]), stop, None);
    LEADING.with(|l| l.set(false));
    for c in lanes {
        poller(c).lead_state().leader = false;
    }
    !matches!(led, LeaderExit::Failed)
}

/// How a leader's wait ended.
enum LeaderExit {
    /// `stop()` was true.
    Stop,
    /// A queue's connection ended.
    Ended,
    /// An error, or the deadline passed.
    Failed,
}

/// A leader's loop over `n` queues (`lane(k)`: a queue and what handles its completions):
/// takes what they hold, arms them, and sleeps on their channels and wake-ups, until
/// `stop()`, a connection's end, an error or `deadline`.
fn lead_loop<'p, C: LaneEvents + ?Sized + 'p>(
    n: usize,
    lane: impl Fn(usize) -> (&'p Poller, &'p C),
    stop: &dyn Fn() -> bool,
    deadline: Option<Instant>,
) -> LeaderExit {
    let drain_all = || -> Option<usize> {
        let mut took = 0;
        for k in 0..n {
            let (p, c) = lane(k);
            took += p.drain(c).ok()?;
        }
        Some(took)
    };
    loop {
        if stop() {
            return LeaderExit::Stop;
        }
        if (0..n).any(|k| lane(k).1.is_dead()) {
            return LeaderExit::Ended;
        }
        match drain_all() {
            None => return LeaderExit::Failed,
            Some(0) => {}
            Some(_) => continue,
        }
        // A leader waits for messages (its reply, the next request): its own send-queue
        // completions, taken at its next drain anyway, need not wake it; unless a request
        // ends with one (a window invalidation: `wake_on_sends`).
        let armed = |k: usize| {
            let (p, events) = lane(k);
            if events.wake_on_sends() {
                p.cq.request_notify()
            } else {
                p.cq.request_notify_solicited()
            }
        };
        if (0..n).any(|k| armed(k).is_err()) {
            return LeaderExit::Failed;
        }
        // Completions that raced the arming raise no event: look once more.
        match drain_all() {
            None => return LeaderExit::Failed,
            Some(0) => {}
            Some(_) => continue,
        }
        if stop() {
            return LeaderExit::Stop;
        }
        let ms = match poll_timeout_ms(deadline) {
            None => return LeaderExit::Failed,
            Some(-1) => RECHECK_MS,
            Some(ms) => ms.min(RECHECK_MS),
        };
        // Queue k's channel at 2k and its wake-up at 2k + 1 (lead_all and wait only lead
        // queues with a channel); past `count` the last queue's again, never looked at.
        let count = 2 * n.min(LEAD_MAX);
        let mut pfds: [PollFd<'_>; 2 * LEAD_MAX] = std::array::from_fn(|i| {
            let p = lane(i.min(count - 1) / 2).0;
            if i % 2 == 0 {
                PollFd::new(p.cq.event_fd().unwrap_or(p.wake.as_fd()), PollFlags::POLLIN)
            } else {
                PollFd::new(p.wake.as_fd(), PollFlags::POLLIN)
            }
        });
        match poll_fds(&mut pfds[..count], ms) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return LeaderExit::Failed,
        }
        for k in 0..n.min(LEAD_MAX) {
            let p = lane(k).0;
            if is_ready(&pfds[2 * k + 1]) {
                let _ = p.wake.read();
                if p.lead_state().ended {
                    return LeaderExit::Ended;
                }
            }
            if is_ready(&pfds[2 * k]) && p.cq.ack_event().is_err() {
                return LeaderExit::Failed;
            }
        }
    }
}

/// Starts a connection's thread: it waits on the completion channel and on the bootstrap
/// socket at once (liveness), dispatches completions, and runs the periodic checks.
pub(crate) fn spawn_conn_thread<C: LaneEvents>(
    lane: Arc<C>,
    poller: Arc<Poller>,
    tick: Duration,
    sock: TcpStream,
    name: &str,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || conn_loop(&*lane, &poller, &sock, tick))
        .map_err(|e| Error::io("spawning an rdma connection thread", e))
}

/// What a readable bootstrap socket means: `None` if nothing (a spurious wake-up),
/// `Some(None)` at end of stream, `Some(Some(why))` on an error or unexpected bytes.
fn socket_end(sock: &TcpStream) -> Option<Option<String>> {
    let mut b = [0u8; 1];
    let mut s = sock;
    match s.read(&mut b) {
        Ok(0) => Some(None),
        Ok(_) => Some(Some(
            "the peer sent bytes on the bootstrap socket after set-up (protocol violation)"
                .to_string(),
        )),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) =>
        {
            None
        }
        Err(e) => Some(Some(format!("the bootstrap socket failed: {e}"))),
    }
}

fn conn_loop<C: LaneEvents>(lane: &C, poller: &Poller, sock: &TcpStream, tick: Duration) {
    loop {
        if lane.is_dead() {
            return;
        }
        let watch = poller.watching();
        let waited = poller.cq.wait_fds_with(
            watch,
            [sock.as_fd(), poller.kick.as_fd()],
            Some(tick),
            || poller.drain(lane),
        );
        match waited {
            Ok((taken, [readable, kicked])) => {
                if kicked {
                    poller.take_kick();
                }
                if readable {
                    if let Some(end) = socket_end(sock) {
                        // A reply (or request) the peer sent right before closing is
                        // already in the CQ: handle it before failing the connection.
                        while let Ok(n) = poller.drain(lane) {
                            if n == 0 {
                                break;
                            }
                        }
                        lane.on_socket_end(end);
                        return;
                    }
                }
                if !watch && taken == 0 && !kicked && !readable {
                    // The tick, while the channel is left to waiting threads: take what
                    // nobody has (a request whose caller has not waited yet).
                    if let Err(e) = poller.drain(lane) {
                        lane.on_cq_error(format!("polling completions failed: {}", chain(&e)));
                        return;
                    }
                }
            }
            Err(e) => {
                lane.on_cq_error(format!("waiting for completions failed: {}", chain(&e)));
                return;
            }
        }
        lane.on_tick();
    }
}
