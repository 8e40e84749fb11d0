//! The server side: a listener with a background acceptor, connections read by the
//! caller's thread, replies written from any thread.
//!
//! # Accepting
//! A background acceptor thread takes sockets from the kernel and hands each to a short
//! handshake thread (a total deadline of [`HANDSHAKE_TIMEOUT`], or `server.idle_timeout`
//! when shorter, however slowly the bytes come; at most `server.max_handshakes_per_addr`
//! at once from one IP address, more are closed at once); the listener's `accept`
//! ([`HandshakeListener`]) returns what the handshakes produce, in the order they finish: a ready connection, or `Ok(Err(..))` for a bad handshake. So a client that
//! connects and says nothing costs a thread for a few seconds but never stalls the accept
//! loop, and `limits()` is known as soon as `accept` returns a connection. At most
//! [`MAX_PENDING`] connections are being handshaken or wait for `accept` at once; beyond
//! that the acceptor waits and the kernel's backlog holds new connections.
//!
//! # Receiving
//! [`ServerConn::recv`] reads a frame prefix, checks it against the negotiated limits and
//! the in-flight rules (ids unique, at most `max_in_flight` unanswered) before allocating
//! anything, reads the header, takes pool buffers for the payload and `readv`s the
//! payload straight into them. Payload is admitted as the server's [`Admission`] says:
//! a frame with payload before authentication ends the connection before any buffer is
//! taken, and a connection over its budget of payload bytes in the pool (or a pool that
//! is short) stops being read until buffers come back: back-pressure on that connection,
//! not a failure.
//! Any error is final for the connection: the socket is shut down and later calls fail.
//!
//! # Idle timeout
//! With `server.idle_timeout` set, the socket's receive timeout is a tick (an eighth of it,
//! 5 ms ..= 1 s). A connection with no request in flight whose last complete frame (in or
//! out) is older than the idle timeout fails with `Error::Timeout`, including one that is
//! trickling a partial frame (slowloris). A reply that makes no progress for the idle
//! timeout fails too (a client that stops reading); `idle_timeout = 0` disables both.
//!
//! # Replies
//! A reply never holds the thread that makes it (see `outq`): it is written at once when
//! the socket takes it (read replies of buffered files with `sendfile`, from the page
//! cache), else queued for the connection's writer thread, which sends queued replies
//! several per `sendmsg`. While more than [`QUEUE_CAP`] bytes (or twice the largest
//! payload) are queued, `recv` reads no further request of that connection. A queued reply
//! that the socket takes no byte of for `server.idle_timeout` ([`REPLY_DEADLINE`] when it
//! is off), or whose client has ended its side of the stream, fails that connection only.
//! Replies the receiving thread makes are held and leave together (`outq`'s cork), before
//! `recv` waits (for the socket, the payload budget or pool buffers), or when the server
//! calls [`ServerConn::flush`]; reading a socket that holds more requests does not end
//! the cork, so the replies of writes served on that thread batch as those of small reads.
//! The socket is non-blocking after the handshake: reads wait in `poll`, a tick at a time.
//!
//! # Reading requests
//! Requests are read through a 4 KiB read-ahead buffer ([`INBUF`]): one `read` takes
//! whatever the socket holds, so a burst of small request frames costs one system call,
//! not two per frame (prefix, header). Payload bytes that came in the buffer are copied to
//! the request's pool buffers (at most 4 KiB per request); a larger rest is read straight
//! into them, with the buffer as the `readv`'s last vector, so the next frame's head comes
//! along. When the last read emptied the socket, the next waits in `poll` first
//! instead of making a read that would find nothing (an idle connection).

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zcio::config::Config;
use zcio::transport::accept::HandshakeListener;
use zcio::transport::{Admission, FileRange, Incoming, Limits, Replier, ServerConn};
use zcio::{Error, Iobuf, IobufMut, Pool, Result};

use crate::io::{
    advance_mut, give_up, has_unread, read_at_least, read_exact_spill, scatter, shutdown, tick_for,
    write_all_vectored, ReadError, Ticker,
};
use crate::outq::{self, OutQueue};
use crate::wire::{decode_prefix, Hello, Kind, Prefix, WireError, HELLO_LEN, PREFIX_LEN};
use crate::{lock, transport_err, wire_err};

/// The longest a connecting client may take to send its handshake: a total deadline for
/// the whole handshake, however the bytes trickle in.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a receive waiting for pool buffers (or for the connection's payload budget)
/// checks whether its connection is still open.
const PAYLOAD_WAIT_TICK: Duration = Duration::from_millis(250);

pub use zcio::transport::accept::MAX_PENDING;

/// Request vectors and in-flight entries made when a connection opens, at most.
const PREMADE: usize = 256;

/// Reply bytes queued for one connection before it reads no further request (at least; or
/// twice the largest payload).
pub const QUEUE_CAP: usize = 4 << 20;

/// The longest a queued reply may wait for the client to take a byte when
/// `server.idle_timeout` is off (else that is the deadline).
pub const REPLY_DEADLINE: Duration = Duration::from_secs(30);

/// How often a blocked reply checks on its client when `server.idle_timeout` is off.
const NO_IDLE_TICK: Duration = Duration::from_secs(1);

/// What a connection needs from the configuration.
#[derive(Clone)]
struct ConnConfig {
    limits: Limits,
    max_in_flight: usize,
    nodelay: bool,
    sendfile: bool,
    idle: Option<Duration>,
    handshakes_per_addr: usize,
}

/// Binds `cfg.server.listen` and starts accepting: a [`HandshakeListener`] running this
/// transport's handshake.
pub(crate) fn listen(cfg: &Config, pool: &Pool) -> Result<HandshakeListener> {
    let addr = &cfg.server.listen;
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("tcp listen on {addr}"), e))?;
    let ccfg = ConnConfig {
        limits: cfg.limits,
        max_in_flight: cfg.server.max_in_flight,
        nodelay: crate::config::TcpConfig::of(cfg).nodelay,
        sendfile: crate::config::TcpConfig::of(cfg).sendfile,
        idle: cfg.server.idle_timeout,
        handshakes_per_addr: cfg.server.max_handshakes_per_addr,
    };
    let pool = pool.clone();
    let per_addr = ccfg.handshakes_per_addr;
    HandshakeListener::spawn_with_cap(
        listener,
        "tcp",
        Arc::new(move |sock, peer| handshake(sock, peer, &ccfg, pool.clone())),
        per_addr,
    )
}

fn handshake_err(peer: SocketAddr, after: Duration, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::ConnectionClosed(format!(
            "{peer} closed the connection during the tcp handshake"
        )),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
            what: format!("tcp handshake from {peer}"),
            after,
        },
        _ => transport_err(format!("tcp handshake from {peer}"), e),
    }
}

/// Fills `buf` from `sock` by `deadline`, however the bytes trickle in (each `read` gets
/// only the time left, so a peer sending a byte at a time cannot stretch it).
fn read_by(sock: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{got} of {} handshake bytes by the deadline", buf.len()),
            ));
        }
        sock.set_read_timeout(Some(left))?;
        match (&*sock).read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The server half of the handshake, on a fresh socket.
fn handshake(
    sock: TcpStream,
    peer: SocketAddr,
    cfg: &ConnConfig,
    pool: Pool,
) -> Result<Box<dyn ServerConn>> {
    let after = cfg
        .idle
        .map_or(HANDSHAKE_TIMEOUT, |d| d.min(HANDSHAKE_TIMEOUT));
    let setup = |e| transport_err(format!("setting up the socket from {peer}"), e);
    sock.set_nodelay(cfg.nodelay).map_err(setup)?;
    sock.set_read_timeout(Some(after)).map_err(setup)?;
    sock.set_write_timeout(Some(after)).map_err(setup)?;
    let deadline = Instant::now() + after;
    let mut buf = [0u8; HELLO_LEN];
    read_by(&sock, &mut buf, deadline).map_err(|e| handshake_err(peer, after, e))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    sock.set_write_timeout(Some(left)).map_err(setup)?;
    let ours = Hello::from_limits(&cfg.limits, cfg.max_in_flight);
    let theirs = match Hello::decode(&buf) {
        Ok(h) => h,
        Err(e @ WireError::Version { .. }) => {
            // Answer anyway, so that the client can report the mismatch as well.
            let _ = write_all_vectored(&sock, &mut [&ours.encode()[..]], &mut give_up);
            return Err(wire_err(e, "tcp handshake", &peer.to_string()));
        }
        Err(e) => return Err(wire_err(e, "tcp handshake", &peer.to_string())),
    };
    write_all_vectored(&sock, &mut [&ours.encode()[..]], &mut give_up)
        .map_err(|e| handshake_err(peer, after, e))?;
    let limits = ours.negotiate(&theirs);
    // Non-blocking from here: reads wait in `poll` (a tick at a time), replies never wait
    // (see `outq`).
    sock.set_nonblocking(true).map_err(setup)?;
    tracing::debug!(%peer, ?limits, "tcp connection accepted");
    let now = Instant::now();
    let tick = cfg.idle.map_or(NO_IDLE_TICK, tick_for);
    let out = Arc::new(OutQueue::new(
        limits.max_payload.saturating_mul(2).max(QUEUE_CAP),
        cfg.idle.unwrap_or(REPLY_DEADLINE),
        tick,
        limits.max_in_flight,
    ));
    let shared = Arc::new(ConnShared {
        sock: Arc::new(sock),
        out: out.clone(),
        // Made now so that the data path never has to (up to a bound; past it they are
        // made as needed, and kept).
        spares: Mutex::new(
            std::iter::repeat_with(|| (Vec::with_capacity(64), Vec::with_capacity(4)))
                .take(limits.max_in_flight.min(PREMADE))
                .collect(),
        ),
        state: Mutex::new(ConnState {
            in_flight: HashMap::with_capacity(limits.max_in_flight.min(PREMADE)),
            last_reply: now,
            closed: None,
        }),
        limits,
        sendfile: cfg.sendfile,
        peer: peer.to_string(),
    });
    let weak = Arc::downgrade(&shared);
    // Held by the connection's receiving side only, as `shared` is: no cycle.
    let held = shared.clone();
    let flush_held: Arc<dyn Fn() + Send + Sync> = Arc::new(move || held.flush_held());
    std::thread::Builder::new()
        .name("zcio-tcp-writer".into())
        .spawn(move || {
            let sock = || weak.upgrade().map(|c| c.sock.clone());
            let fail = |why: String| {
                if let Some(c) = weak.upgrade() {
                    let reason = format!("the connection from {} failed: {why}", c.peer);
                    tracing::debug!(%reason, "tcp server connection ends");
                    c.close_with(reason);
                }
            };
            out.run_writer(&sock, &fail);
        })
        .map_err(|e| Error::io("spawning a tcp writer thread", e))?;
    Ok(Box::new(TcpServerConn {
        shared,
        inbuf: InBuf::new(),
        pool,
        span: Vec::new(),
        idle: cfg.idle,
        last_in: now,
        broken: None,
        admission: None,
        flush_held,
    }))
}

struct ConnState {
    /// Requests received and not yet answered: id -> reply capacity.
    in_flight: HashMap<u64, usize>,
    last_reply: Instant,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
}

/// What the receiving side and the repliers share; also the [`Replier`].
struct ConnShared {
    sock: Arc<TcpStream>,
    /// Replies the socket could not take at once, and the writer thread that sends them.
    out: Arc<OutQueue>,
    state: Mutex<ConnState>,
    /// Header and payload vectors of served requests ([`Replier::recycle`]), for the next
    /// ones: at most `max_in_flight`.
    spares: Mutex<Vec<(Vec<u8>, Vec<Iobuf>)>>,
    limits: Limits,
    /// `tcp.sendfile`: whether read replies may be file ranges.
    sendfile: bool,
    peer: String,
}

impl Drop for ConnShared {
    fn drop(&mut self) {
        // Ends the writer thread; queued buffers go back to the pool.
        self.out.close();
    }
}

impl ConnShared {
    /// `Err` once the connection is closed (for waits to end).
    fn still_open(&self) -> Result<()> {
        match &lock(&self.state).closed {
            Some(r) => Err(Error::ConnectionClosed(r.clone())),
            None => Ok(()),
        }
    }

    /// Writes the replies the receiving thread holds back (see `outq`), before it waits
    /// for anything: a failure ends the connection (and so the wait).
    fn flush_held(&self) {
        if let Err(e) = self.out.flush(&self.sock) {
            self.close_with(format!("sending replies to {}: {e}", self.peer));
        }
    }

    fn close_with(&self, reason: String) {
        lock(&self.state).closed.get_or_insert(reason);
        shutdown(&self.sock);
        self.out.close();
    }
}

impl ConnShared {
    /// Checks a reply of `segments` payload segments and `total` bytes against the limits
    /// and the request `id`'s reply capacity, and takes `id` out of the in-flight set.
    fn admit_reply(&self, id: u64, header: &[u8], segments: usize, total: usize) -> Result<()> {
        zcio::transport::check_reply_sizes(header, segments, total, &self.limits)?;
        let mut st = lock(&self.state);
        if let Some(r) = &st.closed {
            return Err(Error::ConnectionClosed(r.clone()));
        }
        let Some(&cap) = st.in_flight.get(&id) else {
            return Err(Error::InvalidArgument(format!(
                "reply to request id {id}, which is not in flight on the connection from {}",
                self.peer
            )));
        };
        if total > cap {
            return Err(Error::LimitExceeded {
                what: "reply payload (the request's reply capacity)",
                value: total as u64,
                limit: cap as u64,
            });
        }
        // Before the write: once the client has the reply it may reuse the slot, and
        // its next request must not count this one.
        st.in_flight.remove(&id);
        Ok(())
    }

    /// The outcome of writing reply `id`: a failure closes the connection.
    fn sent(&self, id: u64, res: io::Result<()>) -> Result<()> {
        match res {
            Ok(()) => {
                lock(&self.state).last_reply = Instant::now();
                Ok(())
            }
            Err(e) => {
                let what = format!("sending reply {id} to {}", self.peer);
                self.close_with(format!("{what}: {e}"));
                Err(transport_err(what, e))
            }
        }
    }
}

fn reply_prefix(id: u64, header: &[u8], total: usize) -> [u8; PREFIX_LEN] {
    Prefix {
        kind: Kind::Reply,
        header_len: header.len(),
        id,
        payload_len: total,
        recv_cap: 0,
    }
    .encode()
}

impl Replier for ConnShared {
    fn reply(&self, id: u64, header: &[u8], payload: &[Iobuf]) -> Result<()> {
        let total: usize = payload.iter().map(|b| b.len()).sum();
        self.admit_reply(id, header, payload.len(), total)?;
        let prefix = reply_prefix(id, header, total);
        let r = outq::Reply {
            prefix: &prefix,
            header,
            payload,
            file: None,
        };
        self.sent(id, self.out.reply(&self.sock, &r))
    }

    /// Keeps the request's header and payload vectors (emptied) for a later request.
    fn recycle(&self, mut incoming: Incoming) {
        incoming.payload.clear();
        incoming.header.clear();
        let mut spares = lock(&self.spares);
        if spares.len() < self.limits.max_in_flight {
            spares.push((incoming.header, incoming.payload));
        }
    }

    fn takes_file_ranges(&self) -> bool {
        self.sendfile
    }

    /// Prefix and header with one `sendmsg(MSG_MORE)`, then the range with `sendfile(2)`
    /// from the page cache: the socket takes references to the file's pages, no
    /// user-space copy. What the socket does not take at once is queued (the file's
    /// descriptor duplicated) for the writer thread.
    fn reply_file(&self, id: u64, header: &[u8], range: FileRange<'_>) -> Result<()> {
        self.admit_reply(id, header, 1, range.len)?;
        let prefix = reply_prefix(id, header, range.len);
        let r = outq::Reply {
            prefix: &prefix,
            header,
            payload: &[],
            file: Some((range.file, range.offset, range.len)),
        };
        self.sent(id, self.out.reply(&self.sock, &r))
    }

    /// Replies held back (the last ones the receiving thread made, a refusal) are written
    /// first, as far as the socket takes them at once.
    fn close(&self) {
        let _ = self.out.flush(&self.sock);
        self.close_with(format!(
            "the connection from {} was closed by the server",
            self.peer
        ));
    }
}

/// The server's end of one connection.
/// Bytes read from a connection's socket ahead of the frame being parsed: one read takes
/// whatever the socket holds, up to this many bytes, so that several small request frames
/// come in one system call. Payload bytes that arrived in it are copied out (at most this
/// many per request); the rest of a large payload is read straight into its pool buffers.
const INBUF: usize = 4096;

/// The read-ahead buffer of one connection.
struct InBuf {
    buf: Box<[u8]>,
    /// The unparsed bytes are `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// The last read found the socket emptied: the next one waits for data first.
    drained: bool,
}

impl InBuf {
    fn new() -> InBuf {
        InBuf {
            buf: vec![0; INBUF].into_boxed_slice(),
            pos: 0,
            end: 0,
            drained: true,
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// Fills every byte of `parts`: from the bytes read ahead first, then from the socket
    /// (through the buffer for a small rest, straight into `parts` for a large one).
    fn take<E>(
        &mut self,
        sock: &TcpStream,
        parts: &mut [&mut [u8]],
        ticker: &mut Ticker,
        tick: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), ReadError<E>> {
        // Bytes of `parts` filled so far (for an end-of-stream report).
        let mut got = 0;
        loop {
            let mut copied = 0;
            for p in parts.iter_mut() {
                if self.buffered() == 0 {
                    break;
                }
                let n = p.len().min(self.buffered());
                p[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                copied += n;
            }
            advance_mut(parts, copied);
            got += copied;
            let need: usize = parts.iter().map(|p| p.len()).sum();
            if need == 0 {
                return Ok(());
            }
            // The buffer is empty now.
            let eof = |e| match e {
                ReadError::Eof { got: g } => ReadError::Eof { got: got + g },
                e => e,
            };
            if need > INBUF / 2 {
                // A large rest: straight into the destination, with the buffer as the last
                // vector, so that the next frame's head (prefix, header) comes in the same
                // system call when the client has sent it already.
                let spilled =
                    read_exact_spill(sock, parts, &mut self.buf, ticker, tick).map_err(eof)?;
                // A read that did not fill the buffer emptied the socket.
                (self.pos, self.end, self.drained) = (0, spilled, spilled < INBUF);
                return Ok(());
            }
            let (n, drained) = read_at_least(sock, &mut self.buf, need, self.drained, ticker, tick)
                .map_err(eof)?;
            (self.pos, self.end, self.drained) = (0, n, drained);
        }
    }
}

struct TcpServerConn {
    shared: Arc<ConnShared>,
    /// Request bytes read ahead.
    inbuf: InBuf,
    pool: Pool,
    /// The pool buffers a request's payload is read into, reused from request to request.
    span: Vec<IobufMut>,
    idle: Option<Duration>,
    /// When the last complete request frame arrived (or the connection was accepted).
    last_in: Instant,
    /// Set after a failed `recv`: the stream is out of step for good.
    broken: Option<String>,
    /// From the server: no payload before authentication, and a budget of payload bytes.
    admission: Option<Arc<Admission>>,
    /// Writes the held replies ([`ConnShared::flush_held`]); called before `recv` waits
    /// for the socket, the payload budget or pool buffers.
    flush_held: Arc<dyn Fn() + Send + Sync>,
}

impl TcpServerConn {
    fn read_failure(&self, e: ReadError<Error>, what: &str, len: usize) -> Error {
        match e {
            ReadError::Tick(e) => e,
            ReadError::Eof { got } => Error::ConnectionClosed(format!(
                "{} closed the connection in the middle of a request frame ({got} of {len} bytes of {what})",
                self.shared.peer
            )),
            ReadError::Io(e) => {
                transport_err(format!("reading {what} from {}", self.shared.peer), e)
            }
        }
    }

    fn violation(&self, reason: String) -> Error {
        Error::decode(
            "tcp request frame",
            format!("from {}: {reason}", self.shared.peer),
        )
    }

    fn recv_frame(&mut self) -> Result<Option<Incoming>> {
        let sh = &*self.shared;
        let (idle, last_in) = (self.idle, self.last_in);
        // Replies held back go out before this waits for the socket (never for bytes the
        // client may send only once it has them), not before every read: so replies made
        // while requests keep coming leave together.
        let mut ticker = Ticker::polling(idle.map_or(Duration::from_secs(1), tick_for))
            .before_wait(self.flush_held.clone());
        // Back-pressure: no new request while too many reply bytes wait for this client.
        if !sh.out.wait_room(&sh.sock) {
            return Err(Error::ConnectionClosed(format!(
                "the connection from {} is closed",
                sh.peer
            )));
        }
        let mut tick = || -> Result<()> {
            let Some(idle) = idle else { return Ok(()) };
            let st = lock(&sh.state);
            if !st.in_flight.is_empty() || last_in.max(st.last_reply).elapsed() < idle {
                return Ok(());
            }
            Err(Error::Timeout {
                what: format!(
                    "idle tcp connection from {} (no complete request, server.idle_timeout)",
                    sh.peer
                ),
                after: idle,
            })
        };

        let mut pfx = [0u8; PREFIX_LEN];
        match self
            .inbuf
            .take(&sh.sock, &mut [&mut pfx[..]], &mut ticker, &mut tick)
        {
            Ok(()) => {}
            Err(ReadError::Eof { got: 0 }) => {
                // The client sent its last request: its held replies still go.
                sh.flush_held();
                return Ok(None);
            }
            Err(e) => return Err(self.read_failure(e, "a request prefix", PREFIX_LEN)),
        }
        let p = decode_prefix(&pfx, Kind::Request, &sh.limits)
            .map_err(|e| self.violation(e.to_string()))?;
        {
            let st = lock(&sh.state);
            if st.in_flight.contains_key(&p.id) {
                return Err(self.violation(format!("request id {} is already in flight", p.id)));
            }
            if st.in_flight.len() >= sh.limits.max_in_flight {
                return Err(self.violation(format!(
                    "more than the negotiated {} requests in flight",
                    sh.limits.max_in_flight
                )));
            }
        }
        // The vectors of a served request when there is one (no allocation).
        let (mut header, mut payload) = lock(&sh.spares).pop().unwrap_or_default();
        header.resize(p.header_len, 0);
        self.inbuf
            .take(&sh.sock, &mut [&mut header[..]], &mut ticker, &mut tick)
            .map_err(|e| self.read_failure(e, "a request header", p.header_len))?;
        if p.payload_len > 0 {
            if let Some(a) = &self.admission {
                if !a.authenticated() {
                    return Err(self.violation(format!(
                        "request {} carries {} payload bytes before authentication",
                        p.id, p.payload_len
                    )));
                }
                // Back-pressure on this connection only: its receiving stops until its
                // earlier requests' payload is freed.
                a.reserve(p.id, p.payload_len, PAYLOAD_WAIT_TICK, || {
                    sh.flush_held();
                    sh.still_open()
                })?;
            }
            let taken = match wait_for_span(&self.pool, sh, p.payload_len, &mut self.span) {
                Err(e) => Err(e),
                Ok(()) => {
                    let span = &mut self.span;
                    let inbuf = &mut self.inbuf;
                    let n = span.len();
                    let parts = span.iter_mut().map(|b| &mut b[..]);
                    let read = scatter(n, parts, |parts| {
                        inbuf.take(&sh.sock, parts, &mut ticker, &mut tick)
                    });
                    match read {
                        Ok(()) => {
                            payload.extend(span.drain(..).map(IobufMut::freeze));
                            Ok(())
                        }
                        Err(e) => {
                            span.clear();
                            Err(self.read_failure(e, "a request payload", p.payload_len))
                        }
                    }
                }
            };
            if let Err(e) = taken {
                if let Some(a) = &self.admission {
                    a.release(p.id);
                }
                return Err(e);
            }
        }
        lock(&sh.state).in_flight.insert(p.id, p.recv_cap);
        self.last_in = Instant::now();
        // While bytes of more requests wait in the buffer (whole frames, or the head of a
        // next write that came with this payload), the replies this thread makes are held
        // and leave together, once it is about to wait (for the socket, the budget, pool
        // buffers; or the server's `flush` before anything else that may block), after
        // `CORK_FRAMES` of them or before another thread's reply.
        sh.out.cork(self.inbuf.buffered() > 0);
        tracing::debug!(
            id = p.id,
            payload_len = p.payload_len,
            "tcp request received"
        );
        Ok(Some(Incoming {
            id: p.id,
            header,
            payload,
            reply_capacity: p.recv_cap,
        }))
    }
}

/// Takes pool buffers for a request's payload into `span`, waiting while the pool is short
/// (as long as the connection is open: back-pressure, not failure).
/// Held replies are written before it waits.
fn wait_for_span(pool: &Pool, sh: &ConnShared, len: usize, span: &mut Vec<IobufMut>) -> Result<()> {
    if pool.try_get_span_into(len, span)? {
        return Ok(());
    }
    sh.flush_held();
    loop {
        match pool.get_span_within_into(len, PAYLOAD_WAIT_TICK, span) {
            Ok(()) => return Ok(()),
            Err(Error::PoolExhausted { .. }) => sh.still_open()?,
            Err(e) => return Err(e),
        }
    }
}

impl ServerConn for TcpServerConn {
    fn set_admission(&mut self, admission: Arc<Admission>) {
        self.admission = Some(admission);
    }

    fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// Whether the socket already holds bytes of a next request.
    fn backlog(&mut self) -> bool {
        self.inbuf.buffered() > 0 || has_unread(&self.shared.sock)
    }

    fn recv(&mut self) -> Result<Option<Incoming>> {
        if let Some(r) = &self.broken {
            return Err(Error::ConnectionClosed(r.clone()));
        }
        match self.recv_frame() {
            Ok(v) => Ok(v),
            Err(e) => {
                let reason = format!("the connection from {} failed: {e}", self.shared.peer);
                tracing::debug!(%reason, "tcp server connection ends");
                self.shared.close_with(reason.clone());
                self.broken = Some(reason);
                Err(e)
            }
        }
    }

    fn replier(&self) -> Arc<dyn Replier> {
        self.shared.clone()
    }

    /// Writes the replies held back (see `outq`); a failure ends the connection.
    fn flush(&mut self) -> Result<()> {
        let sh = &*self.shared;
        sh.out.flush(&sh.sock).map_err(|e| {
            let what = format!("sending replies to {}", sh.peer);
            sh.close_with(format!("{what}: {e}"));
            transport_err(what, e)
        })
    }

    fn peer(&self) -> String {
        self.shared.peer.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A connected pair: the writing end, and the reading end non-blocking like a server
    /// connection's.
    fn sockets() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        r.set_nonblocking(true).unwrap();
        (w, r)
    }

    fn never() -> Result<(), ()> {
        Ok(())
    }

    #[test]
    fn one_read_brings_several_small_frames() {
        let (mut w, r) = sockets();
        // Ten 40-byte "frames", written at once.
        let bytes: Vec<u8> = (0..400u32).map(|i| i as u8).collect();
        w.write_all(&bytes).unwrap();
        let mut inbuf = InBuf::new();
        let mut ticker = Ticker::polling(Duration::from_millis(50));
        let mut first = [0u8; 40];
        inbuf
            .take(&r, &mut [&mut first[..]], &mut ticker, &mut never)
            .unwrap();
        assert_eq!(first[..], bytes[..40]);
        // The other nine came with the first: no further read is needed for them.
        assert_eq!(inbuf.buffered(), 360);
        for k in 1..10 {
            let (mut a, mut b) = ([0u8; 15], [0u8; 25]);
            inbuf
                .take(&r, &mut [&mut a[..], &mut b[..]], &mut ticker, &mut never)
                .unwrap();
            assert_eq!(a[..], bytes[k * 40..k * 40 + 15]);
            assert_eq!(b[..], bytes[k * 40 + 15..k * 40 + 40]);
        }
        assert_eq!(inbuf.buffered(), 0);
    }

    #[test]
    fn a_large_payload_lands_whole_behind_a_small_frame_and_end_of_stream_is_reported() {
        let (mut w, r) = sockets();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = std::thread::spawn(move || {
            w.write_all(&[7u8; 24]).unwrap();
            w.write_all(&big).unwrap();
            w.write_all(&[9u8; 10]).unwrap();
            big
        });
        let mut inbuf = InBuf::new();
        let mut ticker = Ticker::polling(Duration::from_millis(50));
        let mut head = [0u8; 24];
        inbuf
            .take(&r, &mut [&mut head[..]], &mut ticker, &mut never)
            .unwrap();
        assert_eq!(head, [7u8; 24]);
        let mut payload = vec![0u8; 300_000];
        let (x, y) = payload.split_at_mut(100_000);
        inbuf
            .take(&r, &mut [x, y], &mut ticker, &mut never)
            .unwrap();
        let big = writer.join().unwrap();
        assert!(payload == big, "the payload arrived changed");
        let mut tail = [0u8; 10];
        inbuf
            .take(&r, &mut [&mut tail[..]], &mut ticker, &mut never)
            .unwrap();
        assert_eq!(tail, [9u8; 10]);
        // The peer is gone: a clean end between frames.
        let mut more = [0u8; 4];
        assert!(matches!(
            inbuf.take(&r, &mut [&mut more[..]], &mut ticker, &mut never),
            Err(ReadError::Eof { got: 0 })
        ));
    }
}
