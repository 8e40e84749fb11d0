//! The transport contract.
//!
//! A transport moves *opaque* request and reply headers plus payload segments between a
//! client and a server. It never parses file operations (that is [`crate::proto`]'s job).
//! How payload moves is the transport's business:
//! - TCP gathers header and payload with `writev` straight from the caller's segments, and
//!   reads reply payload with `readv` straight into the destination segments registered for
//!   that request id;
//! - RDMA sends headers by SEND/RECV and moves payload by RDMA WRITE (replies) and RDMA READ
//!   (request payload), initiated by the server, between registered pool buffers.
//!
//! Client side: [`ClientConn::start`] takes a [`Request`] (header bytes, payload to send,
//! segments the reply payload must land in) and returns a [`Pending`] that completes with a
//! [`Reply`] once the reply header has arrived *and* its payload is in the destination
//! segments. Many requests may be in flight on one connection; replies are matched by id.
//!
//! Server side: a [`Listener`] accepts [`ServerConn`]s; [`ServerConn::recv`] yields an
//! [`Incoming`] request whose payload is already in pool buffers, and a [`Replier`] (usable
//! from any thread) answers it with a header and payload buffers.
//!
//! A read reply's payload may instead be a range of an open file ([`FileRange`]): a
//! transport whose [`Replier::takes_file_ranges`] says so sends it from the page cache
//! without a user-space copy (TCP: `sendfile(2)`), and the server hands it such ranges
//! through [`Replier::reply_file`]. Every other transport (RDMA, which must RDMA-WRITE from
//! registered memory) keeps the default, and the server reads file data into pool buffers
//! for it and calls [`Replier::reply`]. The server never gives a file range of a file
//! opened with `O_DIRECT` (it bypasses the page cache, so there is nothing to send from).
//!
//! The [`Registry`] maps the transport name in the configuration to a [`Transport`] the
//! binary was built with. [`mem`] is an in-memory test double.

pub mod accept;
pub mod completion;
pub mod deadline;
pub mod mem;
pub mod multi;

use std::fmt;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pool::{Iobuf, Pool};

pub use crate::limits::{Limits, MAX_HEADER};
pub use crate::pool::seg::{recv_len, scatter_into, send_len, RawSeg, RecvSeg, SegKeys, SendSeg};
pub use completion::{
    block_on, pair, pair_with_progress, Completer, CompletionCell, Pending, Progress,
};
pub use deadline::Deadline;

/// One client request.
#[derive(Debug, Default)]
pub struct Request {
    /// Opaque header bytes (at most [`Limits::max_header`]).
    pub header: Vec<u8>,
    /// Payload to send, in order.
    pub send: Vec<SendSeg>,
    /// Where the reply payload must land, in order. Their total length is the most the
    /// server may send back.
    pub recv: Vec<RecvSeg>,
}

/// The reply to a [`Request`]; it gives the request's segments back.
#[derive(Debug)]
pub struct Reply {
    /// Opaque reply header.
    pub header: Vec<u8>,
    /// Payload bytes written into the receive segments, front to back.
    pub payload_len: usize,
    /// The request's receive segments, filled.
    pub recv: Vec<RecvSeg>,
    /// The request's send segments, returned.
    pub send: Vec<SendSeg>,
}

/// A client's connection.
pub trait ClientConn: Send + Sync {
    /// Negotiated limits of this connection.
    fn limits(&self) -> Limits;
    /// Sends a request; the result completes when the whole reply has arrived or the
    /// connection failed. A request whose segments exceed the limits is refused here,
    /// before anything is sent.
    fn start(&self, req: Request) -> Result<Pending<Reply>>;
    /// Closes the connection; pending requests fail.
    fn close(&self);
    /// Human-readable description of the peer.
    fn peer(&self) -> String;
}

/// A request as the server receives it: payload already in pool buffers.
#[derive(Debug)]
pub struct Incoming {
    /// Request id (unique among this connection's requests in flight).
    pub id: u64,
    /// Opaque header.
    pub header: Vec<u8>,
    /// Request payload, in pool buffers, in order.
    pub payload: Vec<Iobuf>,
    /// The most reply payload the client can take.
    pub reply_capacity: usize,
}

/// A reply payload that is a range of an open file: `len` bytes from `offset`.
///
/// The server has checked that the file holds them (`fstat`) just before; the transport
/// reads them while sending. The file is borrowed for the call only: a transport sends the
/// range before [`Replier::reply_file`] returns, or fails the connection.
#[derive(Clone, Copy, Debug)]
pub struct FileRange<'a> {
    /// The file (opened for reading, without `O_DIRECT`).
    pub file: &'a File,
    /// Where the range starts.
    pub offset: u64,
    /// How many bytes; at most the request's reply capacity.
    pub len: usize,
}

/// Sends replies on one server connection, from any thread.
pub trait Replier: Send + Sync {
    /// Replies to request `id` with `header` and payload `payload` (in order; at most the
    /// request's reply capacity in total).
    fn reply(&self, id: u64, header: &[u8], payload: &[Iobuf]) -> Result<()>;
    /// Whether this transport takes a reply payload as a [`FileRange`] through
    /// [`Replier::reply_file`]. The default, `false`, means "file data comes in pool
    /// buffers": the server reads it into them and calls [`Replier::reply`]. A hint the
    /// server asks per reply; it should not change over a connection's life.
    fn takes_file_ranges(&self) -> bool {
        false
    }
    /// Replies to request `id` with `header` and the bytes of `range` as payload, straight
    /// from the file (no user-space copy where the transport can help it). Called only when
    /// [`Replier::takes_file_ranges`] is true; the default refuses. If the file turns out
    /// shorter than the range while it is sent (truncated meanwhile), the payload cannot be
    /// completed as its header announced: the transport fails this connection (never pads
    /// or sends other bytes) and returns the error.
    fn reply_file(&self, id: u64, header: &[u8], range: FileRange<'_>) -> Result<()> {
        let _ = (id, header, range);
        Err(Error::InvalidArgument(
            "this transport takes reply payload in pool buffers, not as file ranges".into(),
        ))
    }
    /// Gives a served request back, so that the transport can reuse its header and payload
    /// vectors for a later request instead of allocating new ones. Optional: dropping an
    /// [`Incoming`] is always correct, and the default does just that. Its payload buffers
    /// go back to the pool either way. The server gives a request back before it replies,
    /// so that the client's next request finds the vectors.
    fn recycle(&self, incoming: Incoming) {
        drop(incoming);
    }
    /// Closes the connection (both directions).
    fn close(&self);
}

/// A server's end of one connection.
pub trait ServerConn: Send {
    /// Negotiated limits.
    fn limits(&self) -> Limits;
    /// The next request; `Ok(None)` when the client closed the connection cleanly.
    fn recv(&mut self) -> Result<Option<Incoming>>;
    /// Whether more requests have already arrived behind those `recv` returned (they wait
    /// in the transport, or in its socket). A server may serve a lone request on the
    /// receiving thread, one thread hand-off less, but must hand requests to its workers
    /// when more are waiting, or they would be served one at a time. A hint: it may change
    /// at once. The default, for a transport that cannot tell, is `true`.
    fn backlog(&mut self) -> bool {
        true
    }
    /// The reply side, shareable with worker threads.
    fn replier(&self) -> Arc<dyn Replier>;
    /// Sends now whatever replies made on the receiving thread the transport holds back
    /// to send together. A transport may hold them while `recv` can go on without waiting
    /// (for the peer's bytes, a payload budget, buffers), and sends them before its `recv`
    /// waits; the server calls this
    /// before the receiving thread blocks anywhere else (a request served on it that may
    /// block, a full in-flight window). The default, for a transport that holds nothing,
    /// does nothing.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Human-readable description of the peer.
    fn peer(&self) -> String;
    /// The server hands the connection its [`Admission`] once, before the first `recv`.
    /// A transport that takes request payload into pool buffers before `recv` returns
    /// should then refuse payload before authentication and hold at most the budget's
    /// bytes (waiting, not failing, when over it or when the pool is short). The default
    /// ignores it: the server still refuses payload before authentication, after the
    /// fact.
    fn set_admission(&mut self, admission: Arc<Admission>) {
        let _ = admission;
    }
}

/// What a server lets one connection's transport take in: request payload only once the
/// peer has authenticated, and at most `budget` payload bytes in pool buffers at once.
///
/// The transport [`Admission::reserve`]s a request's payload bytes before it takes pool
/// buffers for them; the server [`Admission::release`]s them when it has freed the
/// request's payload (a release of an id never reserved does nothing). Shared by the
/// receiving thread, the workers and the transport.
#[derive(Debug)]
pub struct Admission {
    authenticated: AtomicBool,
    budget: usize,
    held: Mutex<AdmissionState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct AdmissionState {
    bytes: usize,
    by_id: std::collections::HashMap<u64, usize>,
    /// Threads waiting for room (a release signals only then).
    waiting: usize,
}

impl Admission {
    /// Nothing admitted yet, not authenticated, `budget` payload bytes at most, for up to
    /// `max_in_flight` requests at once (its table is made that big now, so admitting
    /// requests allocates nothing later).
    pub fn new(budget: usize, max_in_flight: usize) -> Admission {
        Admission {
            authenticated: AtomicBool::new(false),
            budget,
            held: Mutex::new(AdmissionState {
                bytes: 0,
                by_id: std::collections::HashMap::with_capacity(max_in_flight),
                waiting: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// Marks the peer authenticated: payload is admitted from now on.
    pub fn authenticate(&self) {
        self.authenticated.store(true, Ordering::Release);
    }

    /// Whether the peer has authenticated.
    pub fn authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }

    /// The most payload bytes held at once.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Payload bytes reserved now.
    pub fn held(&self) -> usize {
        crate::lock(&self.held).bytes
    }

    /// Reserves `len` payload bytes for request `id`, waiting while the connection holds
    /// so much that `len` more would pass the budget (a request bigger than the whole
    /// budget goes through alone). Every `tick`, `keep_waiting` may end the wait with its
    /// error (the connection closed, an idle timeout).
    pub fn reserve<E>(
        &self,
        id: u64,
        len: usize,
        tick: Duration,
        mut keep_waiting: impl FnMut() -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut st = crate::lock(&self.held);
        while st.bytes > 0 && st.bytes.saturating_add(len) > self.budget {
            keep_waiting()?;
            st.waiting += 1;
            st = self
                .freed
                .wait_timeout(st, tick)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.waiting -= 1;
        }
        st.bytes += len;
        *st.by_id.entry(id).or_insert(0) += len;
        Ok(())
    }

    /// Gives back what request `id` reserved (nothing if it reserved nothing).
    pub fn release(&self, id: u64) {
        let mut st = crate::lock(&self.held);
        if let Some(n) = st.by_id.remove(&id) {
            st.bytes -= n;
            let waiting = st.waiting > 0;
            drop(st);
            if waiting {
                self.freed.notify_all();
            }
        }
    }
}

/// Accepts connections.
pub trait Listener: Send + Sync {
    /// Blocks for the next connection. Errors that concern one connection attempt (a bad
    /// handshake) are returned as `Ok(Err(..))` so the accept loop carries on.
    fn accept(&self) -> Result<Result<Box<dyn ServerConn>>>;
    /// The address clients should connect to.
    fn local_addr(&self) -> String;
    /// Makes a blocked [`Listener::accept`] return an error, for shutdown.
    fn shutdown(&self);
}

/// A transport implementation, registered by name.
pub trait Transport: Send + Sync {
    /// The name used in configuration (`tcp`, `rdma`).
    fn name(&self) -> &'static str;
    /// Checks that the transport can run here (libraries, devices); the error says what to
    /// do.
    fn check_available(&self, cfg: &Config) -> Result<()>;
    /// Connects to the server named by `cfg.client.connect`.
    fn connect(&self, cfg: &Config, pool: &Pool) -> Result<Box<dyn ClientConn>>;
    /// Listens on `cfg.server.listen`.
    fn listen(&self, cfg: &Config, pool: &Pool) -> Result<Box<dyn Listener>>;
}

/// A transport name the binary knows of but was built without, and how to get it.
#[derive(Clone, Debug)]
struct Missing {
    name: String,
    reason: String,
    hint: String,
}

/// Maps configuration names to transports.
#[derive(Clone, Default)]
pub struct Registry {
    transports: Vec<Arc<dyn Transport>>,
    missing: Vec<Missing>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("transports", &self.names())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a transport (replacing one of the same name).
    pub fn register(&mut self, t: Arc<dyn Transport>) {
        self.transports.retain(|o| o.name() != t.name());
        self.missing.retain(|m| m.name != t.name());
        self.transports.push(t);
    }

    /// Records a transport this build lacks, so asking for it explains how to get it.
    pub fn register_missing(&mut self, name: &str, reason: &str, hint: &str) {
        if self.transports.iter().any(|t| t.name() == name) {
            return;
        }
        self.missing.push(Missing {
            name: name.into(),
            reason: reason.into(),
            hint: hint.into(),
        });
    }

    /// Names of the transports available in this build.
    pub fn names(&self) -> Vec<&'static str> {
        self.transports.iter().map(|t| t.name()).collect()
    }

    /// The transport called `name`, checked to be usable with `cfg`.
    pub fn get(&self, name: &str, cfg: &Config) -> Result<Arc<dyn Transport>> {
        if let Some(t) = self.transports.iter().find(|t| t.name() == name) {
            t.check_available(cfg)?;
            return Ok(t.clone());
        }
        if let Some(m) = self.missing.iter().find(|m| m.name == name) {
            return Err(Error::TransportUnavailable {
                name: m.name.clone(),
                reason: m.reason.clone(),
                hint: m.hint.clone(),
            });
        }
        Err(Error::UnknownTransport {
            name: name.into(),
            known: if self.transports.is_empty() {
                "no transports".into()
            } else {
                self.names().join(", ")
            },
        })
    }
}

/// Checks a request against limits before anything is sent or allocated.
pub fn check_request(req: &Request, l: &Limits) -> Result<()> {
    if req.header.len() > l.max_header {
        return Err(Error::LimitExceeded {
            what: "request header length",
            value: req.header.len() as u64,
            limit: l.max_header as u64,
        });
    }
    for (what, segs) in [
        ("request send segments", req.send.len()),
        ("request receive segments", req.recv.len()),
    ] {
        if segs > l.max_segments {
            return Err(Error::LimitExceeded {
                what,
                value: segs as u64,
                limit: l.max_segments as u64,
            });
        }
    }
    for (what, n) in [
        ("request payload", send_len(&req.send)),
        ("reply capacity", recv_len(&req.recv)),
    ] {
        if n > l.max_payload {
            return Err(Error::LimitExceeded {
                what,
                value: n as u64,
                limit: l.max_payload as u64,
            });
        }
    }
    Ok(())
}

/// Checks a server's reply against the connection's limits before anything is sent: its
/// header length, payload segments and payload bytes (the request's own reply capacity,
/// which may be lower, is the transport's to check).
pub fn check_reply(header: &[u8], payload: &[Iobuf], l: &Limits) -> Result<()> {
    let total: usize = payload.iter().map(|b| b.len()).sum();
    check_reply_sizes(header, payload.len(), total, l)
}

/// [`check_reply`] for a reply whose payload is `segments` pieces of `total` bytes in all,
/// not (yet) in pool buffers: a file range is one segment of its length.
pub fn check_reply_sizes(header: &[u8], segments: usize, total: usize, l: &Limits) -> Result<()> {
    let over = |what, value: usize, limit: usize| Error::LimitExceeded {
        what,
        value: value as u64,
        limit: limit as u64,
    };
    if header.len() > l.max_header {
        return Err(over("reply header length", header.len(), l.max_header));
    }
    if segments > l.max_segments {
        return Err(over("reply payload segments", segments, l.max_segments));
    }
    if total > l.max_payload {
        return Err(over("reply payload", total, l.max_payload));
    }
    Ok(())
}
