//! The client side: one connection, many requests in flight, one reader thread.
//!
//! # Request life cycle
//! [`ClientConn::start`] checks the request against the negotiated limits, waits for an
//! in-flight slot, assigns an id and inserts an [`Entry`] into the pending map *before* a
//! byte is written (the reply can only be matched if the entry is already there). It then
//! writes the frame under the write lock, gathering prefix, header and the request's send
//! segments with one vectored send per partial write.
//!
//! An entry lends its segments out: the send segments to the writer (they stay with
//! `start` while it writes), the receive segments to the reader thread (while it `readv`s
//! the reply payload into them). It completes only when **both** are back home and an
//! outcome (reply or error) is set, by whichever party brings the last piece home. This is
//! the guarantee the core relies on: once a [`Pending`] completes, the transport no longer
//! touches the request's memory, even when the connection fails while a write or a read
//! is in progress.
//!
//! # Who reads replies
//! A thread that waits for its reply ([`Pending::wait`], through [`Progress`]) *leads*: it
//! reads replies from the socket itself, completing whichever arrive, until its own has,
//! so that a reply reaches its waiter without a hand-off from another thread (a futex
//! wake-up and two context switches fewer per request). Only one thread reads at a time;
//! other threads waiting meanwhile *follow*: they sleep until a reply was completed (maybe
//! theirs) or the reader left, and then one of them leads. A caller waiting for a free
//! request slot leads the same way, until a request completes.
//!
//! The connection's reader thread reads in the *background* mode only: once a [`Pending`]
//! has been awaited as a future (whose waker somebody must call; for good), or while a
//! caller waits with a deadline ([`Pending::wait_timeout`], which does not lead). Otherwise
//! it wakes once per tick to check the timeouts and to read what has arrived for nobody
//! in particular while no thread leads (the reply of a request whose [`Pending`] nobody
//! waits on yet), so that nothing is stranded. In the background mode it steps back after
//! the reply it is reading when a caller comes to lead.
//!
//! # Failure
//! End of stream, an I/O error, a protocol violation by the server, a failed write,
//! [`ClientConn::close`] or a request older than `client.timeout` mark the connection dead
//! (the first reason is kept), shut the socket down (which wakes a blocked reader and
//! writer) and give every unanswered request `Error::ConnectionClosed(reason)`; the
//! request that timed out gets `Error::Timeout`. Later `start`s fail at once.
//!
//! # Timeouts
//! The socket's receive timeout is a tick (an eighth of `client.timeout`, 5 ms ..= 1 s).
//! On every tick, and at most once per tick while a long reply trickles in, the reader
//! looks for the oldest unanswered request; if it is older than `client.timeout` the
//! connection fails. A connection with nothing pending never times out. Sends use
//! `client.timeout` as their send timeout (a server that stops reading).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zcio::config::Config;
use zcio::transport::{
    check_request, recv_len, send_len, ClientConn, Completer, CompletionCell, Deadline, Limits,
    Pending, Progress, RecvSeg, Reply, Request, SendSeg,
};
use zcio::{Error, Result};

use crate::io::{
    gather, give_up, readable_now, scatter, shutdown, tick_for, write_all_vectored, Ahead,
    ReadError, Ticker,
};
use crate::wire::{decode_prefix, Hello, Kind, Prefix, HELLO_LEN, PREFIX_LEN};
use crate::{lock, transport_err, wire_err};

/// A reply header and payload length, or the error the request fails with.
type Outcome = Result<(ReplyHeader, usize)>;

/// Completion cells made when a connection opens, at most.
const PREMADE_CELLS: usize = 1024;

/// Reply headers up to this long are kept inline until the request completes.
const SHORT_HEADER: usize = 64;

/// A reply header as the reader got it. A short one (every data-path reply) is copied into
/// the request's own header vector when the request completes, so that a reply allocates
/// nothing; a long one comes in a vector of its own.
enum ReplyHeader {
    Short([u8; SHORT_HEADER], usize),
    Long(Vec<u8>),
}

impl ReplyHeader {
    /// The header in `v` (the request's header vector, emptied), or in its own vector.
    fn into_vec(self, mut v: Vec<u8>) -> Vec<u8> {
        match self {
            ReplyHeader::Short(b, n) => {
                v.clear();
                v.extend_from_slice(&b[..n]);
                v
            }
            ReplyHeader::Long(l) => l,
        }
    }
}

/// One request in flight.
struct Entry {
    completer: Completer<Reply>,
    /// `None` while the writer sends from them.
    send: Option<Vec<SendSeg>>,
    /// The request's header vector, home with `send`: the reply header goes into it.
    header: Option<Vec<u8>>,
    /// `None` while the reader fills them.
    recv: Option<Vec<RecvSeg>>,
    started: Instant,
    outcome: Option<Outcome>,
}

impl Entry {
    fn finished(&self) -> bool {
        self.send.is_some() && self.recv.is_some() && self.outcome.is_some()
    }
}

struct State {
    pending: HashMap<u64, Entry>,
    /// Completion cells reused from request to request (at most `max_in_flight` + 1).
    cells: VecDeque<CompletionCell<Reply>>,
    next_id: u64,
    /// Why the connection is dead, once it is.
    dead: Option<String>,
    /// Callers waiting for a free request slot (completions signal `slot_freed` only then).
    slot_waiters: usize,
}

/// A completion to deliver once the state lock is released.
type Done = (Completer<Reply>, Result<Reply>);

/// Who reads replies now (see the module documentation).
#[derive(Default)]
struct Lead {
    /// A thread holds the read side (a leader, or the reader thread).
    reading: bool,
    /// Threads waiting on `lead_cv` for their completion or for the read side.
    followers: usize,
    /// The reader thread reads replies as they come.
    background: bool,
    /// A future was awaited: the background mode stays on.
    sticky: bool,
    /// The connection is over.
    ended: bool,
}

/// The read side of the socket: whoever holds it (`Lead::reading`) reads replies.
struct Rx {
    /// The next reply's head, read along with the payload before it: one `readv` per
    /// reply when replies queue up, instead of one each for prefix, header and payload.
    ahead: Ahead,
    ticker: Ticker,
}

struct Shared {
    sock: TcpStream,
    lead: Mutex<Lead>,
    /// Followers and the reader thread wait on it: signalled when a reply completes while
    /// somebody follows, when the read side is let go, when the mode changes and at the end.
    lead_cv: Condvar,
    /// Taken only by the thread that set `Lead::reading`: never contended.
    rx: Mutex<Rx>,
    /// Serializes frames on the socket.
    write_lock: Mutex<()>,
    state: Mutex<State>,
    /// Signalled when an entry leaves the map or the connection dies.
    slot_freed: Condvar,
    limits: Limits,
    timeout: Duration,
    peer: String,
}

/// Why the reader stopped.
struct Failure {
    reason: String,
    /// The request that timed out, and its error.
    culprit: Option<(u64, Error)>,
}

impl Failure {
    fn new(reason: String) -> Failure {
        Failure {
            reason,
            culprit: None,
        }
    }
}

/// Removes the entry `id` if it is finished, for completion outside the lock.
impl State {
    /// A completion pair on a free cell: the first free one, looking from the oldest; a new
    /// cell when none is free and there are fewer than `max_in_flight + 1`.
    fn pair(
        &mut self,
        max_in_flight: usize,
        progress: Arc<dyn Progress>,
    ) -> (Completer<Reply>, Pending<Reply>) {
        let n = self.cells.len();
        let free = (0..n).find(|_| {
            let free = self.cells.front_mut().is_some_and(CompletionCell::is_free);
            if !free {
                self.cells.rotate_left(1);
            }
            free
        });
        let mut cell = match free {
            Some(_) => self.cells.pop_front().unwrap_or_default(),
            None => CompletionCell::new(),
        };
        let p = cell.pair(Some(progress));
        if self.cells.len() <= max_in_flight {
            self.cells.push_back(cell);
        }
        p
    }
}

fn take_if_done(st: &mut State, id: u64) -> Option<Done> {
    if !st.pending.get(&id)?.finished() {
        return None;
    }
    let e = st.pending.remove(&id)?;
    tracing::debug!(
        id,
        ok = e.outcome.as_ref().is_some_and(Result::is_ok),
        "tcp reply"
    );
    let result = match (e.outcome, e.send, e.recv) {
        (Some(Ok((header, payload_len))), Some(send), Some(recv)) => Ok(Reply {
            header: header.into_vec(e.header.unwrap_or_default()),
            payload_len,
            recv,
            send,
        }),
        (Some(Err(err)), _, _) => Err(err),
        _ => Err(Error::ConnectionClosed("request state lost".into())),
    };
    Some((e.completer, result))
}

impl Shared {
    /// Completes what is done; `wake`: a caller waits for a free slot (read under the
    /// state lock the entries left the map under, where a waiter counts itself, so no
    /// wake-up is lost; none is signalled when nobody waits).
    fn deliver(&self, done: impl IntoIterator<Item = Done>, wake: bool) {
        let mut done = done.into_iter().peekable();
        if wake && done.peek().is_some() {
            self.slot_freed.notify_all();
        }
        let mut any = false;
        for (c, r) in done {
            c.complete(r);
            any = true;
        }
        if any {
            self.wake_followers();
        }
    }

    /// Lets followers look whether their request completed (none are signalled when none
    /// wait).
    fn wake_followers(&self) {
        if lock(&self.lead).followers > 0 {
            self.lead_cv.notify_all();
        }
    }

    /// Marks the connection dead (the first reason wins), fails every request that has no
    /// outcome yet, then shuts the socket down; those whose segments are home complete now,
    /// the others when the writer or reader brings them back.
    fn fail(&self, f: Failure) {
        let mut done = Vec::new();
        {
            let mut st = lock(&self.state);
            let reason = st.dead.get_or_insert(f.reason).clone();
            let mut culprit = f.culprit;
            let ids: Vec<u64> = st.pending.keys().copied().collect();
            for id in ids {
                if let Some(e) = st.pending.get_mut(&id) {
                    if e.outcome.is_none() {
                        let err = match culprit.take() {
                            Some((c, err)) if c == id => err,
                            other => {
                                culprit = other;
                                Error::ConnectionClosed(reason.clone())
                            }
                        };
                        e.outcome = Some(Err(err));
                    }
                }
                done.extend(take_if_done(&mut st, id));
            }
        }
        // Only now: a thread reading the socket fails with an end of stream, after the
        // first reason (a timeout, say) has given every request its outcome.
        shutdown(&self.sock);
        self.slot_freed.notify_all();
        self.end_lead();
        self.deliver(done, false);
    }

    /// Wakes every follower and the reader thread for good: the connection is over.
    fn end_lead(&self) {
        lock(&self.lead).ended = true;
        self.lead_cv.notify_all();
    }

    /// The writer gives a request's send segments back.
    /// Brings a request's send segments and header vector home after its frame is written.
    fn return_send(&self, id: u64, send: Vec<SendSeg>, header: Vec<u8>) {
        let done = {
            let mut st = lock(&self.state);
            if let Some(e) = st.pending.get_mut(&id) {
                e.header = Some(header);
            }
            if let Some(e) = st.pending.get_mut(&id) {
                e.send = Some(send);
            }
            (take_if_done(&mut st, id), st.slot_waiters > 0)
        };
        self.deliver(done.0, done.1);
    }

    /// The reader takes the receive segments of request `id` to read a reply payload of
    /// `payload_len` bytes into them.
    fn take_recv(&self, id: u64, payload_len: usize) -> Result<Vec<RecvSeg>, Failure> {
        let violation = |what: String| {
            Failure::new(format!(
                "protocol violation by the server {}: {what}",
                self.peer
            ))
        };
        let mut st = lock(&self.state);
        let Some(e) = st.pending.get_mut(&id) else {
            return Err(violation(format!(
                "reply for request id {id}, which is not in flight"
            )));
        };
        if e.outcome.is_some() {
            return Err(violation(format!("a second reply for request id {id}")));
        }
        let Some(recv) = e.recv.take() else {
            return Err(violation(format!("a second reply for request id {id}")));
        };
        let cap = recv_len(&recv);
        if payload_len > cap {
            e.recv = Some(recv);
            return Err(violation(format!(
                "reply {id} carries {payload_len} payload bytes, the request has room for {cap}"
            )));
        }
        Ok(recv)
    }

    /// The reader gives the receive segments back, with the reply if it arrived whole.
    fn return_recv(&self, id: u64, recv: Vec<RecvSeg>, reply: Option<(ReplyHeader, usize)>) {
        let done = {
            let mut st = lock(&self.state);
            if let Some(e) = st.pending.get_mut(&id) {
                e.recv = Some(recv);
                if let Some(r) = reply {
                    e.outcome = Some(Ok(r));
                }
            }
            (take_if_done(&mut st, id), st.slot_waiters > 0)
        };
        self.deliver(done.0, done.1);
    }

    /// Fails the connection when the oldest unanswered request is older than the timeout.
    fn check_timeout(&self) -> Result<(), Failure> {
        let st = lock(&self.state);
        let oldest = st
            .pending
            .iter()
            .filter(|(_, e)| e.outcome.is_none())
            .min_by_key(|(_, e)| e.started);
        if let Some((&id, e)) = oldest {
            if e.started.elapsed() > self.timeout {
                return Err(Failure {
                    reason: format!(
                        "request {id} to {} got no reply within client.timeout ({:?})",
                        self.peer, self.timeout
                    ),
                    culprit: Some((
                        id,
                        Error::Timeout {
                            what: format!("request {id} to {} over tcp", self.peer),
                            after: self.timeout,
                        },
                    )),
                });
            }
        }
        Ok(())
    }

    fn read_failure(&self, e: ReadError<Failure>, what: &str, len: usize) -> Failure {
        match e {
            ReadError::Tick(f) => f,
            ReadError::Eof { got } => Failure::new(format!(
                "the server {} closed the connection in the middle of a reply ({got} of {len} bytes of {what})",
                self.peer
            )),
            ReadError::Io(e) => Failure::new(format!("reading {what} from {}: {e}", self.peer)),
        }
    }

    /// Reads one reply and completes its request, on the thread holding the read side.
    fn read_one(&self, rx: &mut Rx) -> Result<(), Failure> {
        let Rx { ahead, ticker } = rx;
        let mut tick = || self.check_timeout();
        let mut pfx = [0u8; PREFIX_LEN];
        match ahead.take_head(&self.sock, &mut [&mut pfx[..]], ticker, &mut tick) {
            Ok(()) => {}
            Err(ReadError::Eof { got: 0 }) => {
                return Err(Failure::new(format!(
                    "the server {} closed the connection",
                    self.peer
                )))
            }
            Err(e) => return Err(self.read_failure(e, "a reply prefix", PREFIX_LEN)),
        }
        let p = decode_prefix(&pfx, Kind::Reply, &self.limits).map_err(|e| {
            Failure::new(format!(
                "protocol violation by the server {}: bad reply frame: {e}",
                self.peer
            ))
        })?;
        // Short headers on the stack: no allocation.
        let mut header = if p.header_len <= SHORT_HEADER {
            ReplyHeader::Short([0; SHORT_HEADER], p.header_len)
        } else {
            ReplyHeader::Long(vec![0; p.header_len])
        };
        let h = match &mut header {
            ReplyHeader::Short(b, n) => &mut b[..*n],
            ReplyHeader::Long(v) => &mut v[..],
        };
        if let Err(e) = ahead.take(&self.sock, &mut [h], ticker, &mut tick) {
            return Err(self.read_failure(e, "a reply header", p.header_len));
        }
        let mut recv = self.take_recv(p.id, p.payload_len)?;
        let res = {
            // Straight into the request's segments, front to back, exactly
            // `payload_len` bytes (the next frame must stay in the socket).
            let mut left = p.payload_len;
            let n = recv.len();
            let parts = recv.iter_mut().map_while(|s| {
                if left == 0 {
                    return None;
                }
                let d = s.as_mut_slice();
                let k = d.len().min(left);
                left -= k;
                Some(&mut d[..k])
            });
            scatter(n, parts, |parts| {
                ahead.take(&self.sock, parts, ticker, &mut tick)
            })
        };
        match res {
            Ok(()) => {
                self.return_recv(p.id, recv, Some((header, p.payload_len)));
                Ok(())
            }
            Err(e) => {
                self.return_recv(p.id, recv, None);
                Err(self.read_failure(e, "a reply payload", p.payload_len))
            }
        }
    }

    /// Lets go of the read side (set by this thread), signalling whoever waits for it or
    /// for a completion.
    fn let_go(&self, mut l: std::sync::MutexGuard<'_, Lead>) {
        l.reading = false;
        if l.followers > 0 || l.background {
            self.lead_cv.notify_all();
        }
    }

    /// Leads (see the module documentation) until `done()`: reads replies on this thread
    /// while no other thread does, else follows. Returns early, leaving the rest to the
    /// reader thread, in the sticky background mode, and at the connection's end.
    fn lead_until(&self, done: &dyn Fn() -> bool) {
        let mut l = lock(&self.lead);
        loop {
            if l.ended || l.sticky || done() {
                return;
            }
            // A reader thread reading in the background steps back after its reply.
            l.background = false;
            if !l.reading {
                l.reading = true;
                drop(l);
                let res = self.read_until(done);
                self.let_go(lock(&self.lead));
                if let Err(f) = res {
                    self.fail(f);
                }
                return;
            }
            l.followers += 1;
            l = match self.lead_cv.wait(l) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            l.followers -= 1;
        }
    }

    /// Reads replies, under the reading lock, until `stop` says so after a reply or the
    /// connection fails (the failure is returned, not yet applied).
    fn read_until(&self, mut stop: impl FnMut() -> bool) -> Result<(), Failure> {
        let mut rx = lock(&self.rx);
        loop {
            self.read_one(&mut rx)?;
            if stop() {
                return Ok(());
            }
        }
    }

    /// Switches the reader thread to the background mode (`sticky`: for good).
    fn background(&self, sticky: bool) {
        let mut l = lock(&self.lead);
        l.sticky |= sticky;
        if !l.background {
            l.background = true;
            self.lead_cv.notify_all();
        }
    }

    /// The reader thread: reads replies in the background mode, else wakes once per tick
    /// to check the timeouts and take replies that arrived while nobody leads. Returns why
    /// the connection ended.
    fn reader_thread(&self) -> Failure {
        let tick = tick_for(self.timeout);
        let mut l = lock(&self.lead);
        loop {
            if l.ended {
                let st = lock(&self.state);
                return Failure::new(
                    st.dead
                        .clone()
                        .unwrap_or_else(|| format!("the connection to {} is closed", self.peer)),
                );
            }
            if l.background && !l.reading {
                l.reading = true;
                drop(l);
                let res = self.read_until(|| !lock(&self.lead).background);
                l = lock(&self.lead);
                l.reading = false;
                if l.followers > 0 {
                    self.lead_cv.notify_all();
                }
                if let Err(f) = res {
                    return f;
                }
                continue;
            }
            let timed_out = match self.lead_cv.wait_timeout(l, tick) {
                Ok((g, t)) => {
                    l = g;
                    t.timed_out()
                }
                Err(p) => {
                    let (g, t) = p.into_inner();
                    l = g;
                    t.timed_out()
                }
            };
            if !timed_out || l.ended || l.background {
                continue;
            }
            drop(l);
            if let Err(f) = self.check_timeout() {
                return f;
            }
            l = lock(&self.lead);
            if l.reading || l.background {
                continue;
            }
            // Replies nobody is reading (nobody waits for them): take what has come.
            l.reading = true;
            drop(l);
            let res = {
                let mut rx = lock(&self.rx);
                let mut res = Ok(());
                while rx.ahead.buffered() > 0 || readable_now(&self.sock) {
                    res = self.read_one(&mut rx);
                    if res.is_err() || lock(&self.lead).reading_wanted() {
                        break;
                    }
                }
                res
            };
            l = lock(&self.lead);
            l.reading = false;
            if l.followers > 0 {
                self.lead_cv.notify_all();
            }
            if let Err(f) = res {
                return f;
            }
        }
    }
}

impl Lead {
    /// Whether another thread waits to lead or the background mode began: the reader
    /// thread's stray pick-up makes way.
    fn reading_wanted(&self) -> bool {
        self.followers > 0 || self.background
    }
}

impl Progress for Shared {
    /// A thread about to block on its reply reads replies itself (see the module
    /// documentation). With a deadline it does not (it could not stop in the middle of a
    /// reply): the reader thread reads in the background mode while it waits.
    fn progress(&self, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        match deadline {
            None => self.lead_until(done),
            Some(_) => self.background(false),
        }
    }

    fn will_await(&self) {
        self.background(true);
    }
}

/// A client connection (see the module documentation).
pub(crate) struct TcpClientConn {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

fn handshake_err(peer: &str, timeout: Duration, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::ConnectionClosed(format!(
            "the server {peer} closed the connection during the tcp handshake (is it a zcio \
             server, and does it accept more connections?)"
        )),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
            what: format!("tcp handshake with {peer}"),
            after: timeout,
        },
        _ => transport_err(format!("tcp handshake with {peer}"), e),
    }
}

/// Connects to `cfg.client.connect`, runs the handshake and starts the reader thread.
pub(crate) fn connect(cfg: &Config) -> Result<TcpClientConn> {
    let target = &cfg.client.connect;
    let timeout = cfg.client.timeout;
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("resolving {target}"), e))?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    let mut sock = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let sock = sock.ok_or_else(|| Error::io(format!("tcp connect to {target}"), last))?;
    let peer = sock
        .peer_addr()
        .map_or_else(|_| target.clone(), |a| a.to_string());
    let setup = |e| transport_err(format!("setting up the socket to {peer}"), e);
    sock.set_nodelay(crate::config::TcpConfig::of(cfg).nodelay)
        .map_err(setup)?;
    sock.set_read_timeout(Some(timeout)).map_err(setup)?;
    sock.set_write_timeout(Some(timeout)).map_err(setup)?;

    let ours = Hello::from_limits(&cfg.limits, cfg.limits.max_in_flight);
    write_all_vectored(&sock, &mut [&ours.encode()[..]], &mut give_up)
        .map_err(|e| handshake_err(&peer, timeout, e))?;
    let mut buf = [0u8; HELLO_LEN];
    (&sock)
        .read_exact(&mut buf)
        .map_err(|e| handshake_err(&peer, timeout, e))?;
    let theirs = Hello::decode(&buf).map_err(|e| wire_err(e, "tcp handshake", &peer))?;
    let limits = ours.negotiate(&theirs);
    sock.set_read_timeout(Some(tick_for(timeout)))
        .map_err(setup)?;
    tracing::debug!(%peer, ?limits, "tcp client connected");

    let shared = Arc::new(Shared {
        sock,
        lead: Mutex::new(Lead::default()),
        lead_cv: Condvar::new(),
        rx: Mutex::new(Rx {
            ahead: Ahead::new(),
            ticker: Ticker::new(tick_for(timeout)),
        }),
        write_lock: Mutex::new(()),
        state: Mutex::new(State {
            pending: HashMap::with_capacity(limits.max_in_flight.min(PREMADE_CELLS)),
            // One per request that can be in flight, and one more for a request whose
            // completer the reader has not dropped yet: made now, so that the data path never
            // has to (up to a bound; past it they are made as needed).
            cells: std::iter::repeat_with(CompletionCell::new)
                .take(limits.max_in_flight.min(PREMADE_CELLS) + 1)
                .collect(),
            next_id: 1,
            dead: None,
            slot_waiters: 0,
        }),
        slot_freed: Condvar::new(),
        limits,
        timeout,
        peer,
    });
    let sh = shared.clone();
    let reader = std::thread::Builder::new()
        .name("zcio-tcp-client".into())
        .spawn(move || {
            let _span = tracing::debug_span!("conn", peer = %sh.peer).entered();
            let f = sh.reader_thread();
            tracing::debug!(peer = %sh.peer, reason = %f.reason, "tcp client connection ended");
            sh.fail(f);
        })
        .map_err(|e| Error::io("spawning the tcp reader thread", e))?;
    Ok(TcpClientConn {
        shared,
        reader: Some(reader),
    })
}

impl ClientConn for TcpClientConn {
    fn limits(&self) -> Limits {
        self.shared.limits
    }

    fn start(&self, req: Request) -> Result<Pending<Reply>> {
        let sh = &*self.shared;
        check_request(&req, &sh.limits)?;
        let Request { header, send, recv } = req;
        let payload_len = send_len(&send);
        let recv_cap = recv_len(&recv);
        let progress: Arc<dyn Progress> = self.shared.clone();
        let (completer, pending) = lock(&sh.state).pair(sh.limits.max_in_flight, progress);
        let id = {
            let mut st = lock(&sh.state);
            let deadline = Deadline::after(sh.timeout);
            loop {
                if let Some(r) = &st.dead {
                    return Err(Error::ConnectionClosed(r.clone()));
                }
                if st.pending.len() < sh.limits.max_in_flight {
                    break;
                }
                deadline.left(|| {
                    format!(
                        "a free request slot on the tcp connection to {} ({} in flight)",
                        sh.peer, sh.limits.max_in_flight
                    )
                })?;
                // Read replies on this thread until one completes (unless another thread
                // reads them): nobody else may be waiting for them.
                drop(st);
                sh.lead_until(&|| {
                    let st = lock(&sh.state);
                    st.dead.is_some() || st.pending.len() < sh.limits.max_in_flight
                });
                st = lock(&sh.state);
                if st.dead.is_some() || st.pending.len() < sh.limits.max_in_flight {
                    continue;
                }
                st.slot_waiters += 1;
                st = deadline.wait(&sh.slot_freed, st);
                st.slot_waiters -= 1;
            }
            let id = st.next_id;
            st.next_id = st.next_id.wrapping_add(1);
            tracing::debug!(id, payload_len, recv_cap, "tcp request");
            st.pending.insert(
                id,
                Entry {
                    completer,
                    send: None,
                    header: None,
                    recv: Some(recv),
                    started: Instant::now(),
                    outcome: None,
                },
            );
            id
        };
        let prefix = Prefix {
            kind: Kind::Request,
            header_len: header.len(),
            id,
            payload_len,
            recv_cap,
        }
        .encode();
        let parts = [&prefix[..], &header[..]]
            .into_iter()
            .chain(send.iter().map(SendSeg::as_slice));
        let res = gather(2 + send.len(), parts, |parts| {
            let _w = lock(&sh.write_lock);
            write_all_vectored(&sh.sock, parts, &mut give_up)
        });
        if let Err(e) = res {
            // A partial frame leaves the stream out of step: the connection is over.
            sh.fail(Failure::new(format!(
                "sending request {id} to {}: {e}",
                sh.peer
            )));
        }
        sh.return_send(id, send, header);
        Ok(pending)
    }

    fn close(&self) {
        let sh = &*self.shared;
        {
            let mut st = lock(&sh.state);
            if st.dead.is_none() {
                st.dead = Some(format!(
                    "the connection to {} was closed by this client",
                    sh.peer
                ));
            }
        }
        // Whoever reads wakes up to end of stream and fails what is pending.
        shutdown(&sh.sock);
        sh.slot_freed.notify_all();
        sh.end_lead();
    }

    fn peer(&self) -> String {
        self.shared.peer.clone()
    }
}

impl Drop for TcpClientConn {
    fn drop(&mut self) {
        self.close();
        if let Some(h) = self.reader.take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}
