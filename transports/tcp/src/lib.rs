//! # zcio-tcp: the TCP transport of zcio
//!
//! Moves opaque request and reply headers plus payload segments over one TCP stream per
//! connection, without a user-space copy of payload on either side:
//! - the sender gathers frame prefix, header and payload with one vectored send
//!   (`sendmsg(2)`, i.e. `writev` plus `MSG_NOSIGNAL`) straight from the caller's
//!   segments, looping over partial writes by advancing through the slices;
//! - the client reads a reply's payload with `readv(2)` straight into the receive
//!   segments registered for that request id; the server reads a request's payload with
//!   `readv` straight into pool buffers taken for it.
//!
//! Register it with `registry.register(Arc::new(zcio_tcp::TcpTransport))` (or
//! [`register`]); its name is `tcp`.
//!
//! ## Design: blocking sockets and threads
//! Each connection is a blocking `std::net::TcpStream` read by one thread: on the client a
//! reader thread of ours, on the server whoever calls
//! [`ServerConn::recv`](zcio::transport::ServerConn::recv). Frames are written by the
//! calling thread (`ClientConn::start`, `Replier::reply`) under a mutex that serializes
//! whole frames on the socket. Why not an event loop (epoll, mio, io_uring):
//! - the receive side can `readv` *directly* into a request's destination segments only
//!   because it reads the fixed prefix first, learns the request id and length, and then
//!   asks the kernel for exactly that payload into exactly those segments. A reactor that
//!   reads whatever bytes are available would have to park partial frames in a staging
//!   buffer, which is the copy this transport exists to remove;
//! - the data path is a few system calls per frame whatever the segment count: one
//!   vectored send (prefix + header + every segment, 1024 iovecs per call), and on the
//!   other end a prefix read, a header read and one vectored payload read (more only when
//!   the socket delivers the payload in parts). A reactor adds wake-ups and a hand-off
//!   between threads on top of that and saves no copy;
//! - connection counts of a file server are modest (`server.max_connections` is 256 by
//!   default), so a thread per connection is cheap; blocking I/O keeps the code short and
//!   free of `unsafe` (this crate forbids it; `sendmsg` and `shutdown` come from `nix`).
//!
//! On the client, writes from several threads queue on the mutex, which is also the order
//! frames take on the wire; a frame is never interleaved with another. On the server,
//! replies go through a per-connection output queue instead: written at once when the
//! socket takes them, else queued for a writer thread, so that a client that stops reading
//! holds no worker (see `server`). A request is entered in the
//! pending map *before* its frame is written, so a fast reply always finds it.
//!
//! Timeouts ride on `SO_RCVTIMEO`/`SO_SNDTIMEO`: a blocked reader wakes every tick (an
//! eighth of the relevant timeout, 5 ms ..= 1 s) to check deadlines, so an idle client
//! connection costs at most one wake-up a second and never times out by itself.
//! `TCP_NODELAY` follows `tcp.nodelay` on both ends.
//!
//! ## Where the server's handshake runs
//! Neither in `accept` (a client that connects and stays silent would stall the accept
//! loop for the whole handshake timeout: one such client every 5 s starves everybody) nor
//! lazily in the first `recv` (then `accept` would return connections whose limits are not
//! yet known, and a bad handshake would not surface as `Ok(Err(..))` as the contract
//! wants). A background acceptor thread hands every new socket to a short-lived handshake
//! thread (timeout [`HANDSHAKE_TIMEOUT`] = 5 s, or `server.idle_timeout` when shorter);
//! `accept` returns finished handshakes in the order they finish. At most [`MAX_PENDING`]
//! sockets are in handshake or waiting for `accept`; past that the acceptor stops taking
//! sockets and the kernel backlog holds them, so a flood of silent clients costs bounded
//! threads and delays others by at most the handshake timeout.
//!
//! ## Wire format
//! All integers little-endian. The magic is the four bytes `Z C I O` on the wire
//! (`u32::from_le_bytes(*b"ZCIO")` = `0x4F49_435A`); see [`wire`].
//!
//! **Handshake** (right after connect; the client sends, the server answers with its own
//! values, and both use the field-wise minimum, [`zcio::transport::Limits::min`]):
//!
//! | offset | size | field                                           |
//! |-------:|-----:|-------------------------------------------------|
//! |      0 |    4 | magic `ZCIO`                                    |
//! |      4 |    2 | transport version (1)                           |
//! |      6 |    2 | reserved, sent as 0, ignored                    |
//! |      8 |    4 | max_segments                                    |
//! |     12 |    4 | max_payload                                     |
//! |     16 |    4 | max_header (at most 65535: `header_len` is u16) |
//! |     20 |    4 | max_in_flight (at least 1)                      |
//!
//! The client advertises `limits.*`; the server advertises `limits.*` but
//! `server.max_in_flight` for max_in_flight. Negotiated limits have
//! `inline_threshold = 0` and `rdma_payload = false`. A wrong magic is refused without an
//! answer; a wrong version is answered (so that the client can report it too) and then
//! refused, as [`zcio::Error::Version`].
//!
//! **Frame** (request or reply): a 24-byte prefix, then `header_len` header bytes, then
//! `payload_len` payload bytes.
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! |      0 |    4 | magic `ZCIO`                                                 |
//! |      4 |    1 | kind: 1 request, 2 reply                                     |
//! |      5 |    1 | flags: none defined, must be 0                               |
//! |      6 |    2 | header_len (<= max_header)                                   |
//! |      8 |    8 | id (a reply carries its request's id)                        |
//! |     16 |    4 | payload_len (<= max_payload)                                 |
//! |     20 |    4 | recv_cap: request: reply capacity (<= max_payload); reply: 0 |
//!
//! Every field is checked by [`wire::decode_prefix`], a pure function, before anything is
//! allocated for the frame. The client also refuses a reply whose payload is longer than
//! the request's receive segments, or whose id is not in flight; the server refuses a
//! request whose id is already in flight or that exceeds `max_in_flight`. Any violation
//! ends the connection (the stream cannot be resynchronized).
//!
//! ## Guarantees
//! - A request over the negotiated limits is refused by `start` before a byte is sent.
//! - Once a request's `Pending` completes (with a reply or an error), this transport no
//!   longer reads its send segments nor writes its receive segments.
//! - When a connection fails, every request in flight on it completes with an error
//!   (`ConnectionClosed`, or `Timeout` for the request that exceeded `client.timeout`).
//!
//! See `client` and `server` (private modules) for the life cycles in detail.

#![forbid(unsafe_code)]

mod client;
pub mod config;
mod io;
mod outq;
mod server;
pub mod wire;

use std::sync::Arc;

use zcio::config::Config;
use zcio::transport::{ClientConn, Listener, Registry, Transport};
use zcio::{Error, Pool, Result};

pub use server::{HANDSHAKE_TIMEOUT, MAX_PENDING, QUEUE_CAP, REPLY_DEADLINE};

/// The TCP transport (`tcp`).
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpTransport;

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn check_available(&self, _cfg: &Config) -> Result<()> {
        Ok(())
    }

    fn connect(&self, cfg: &Config, _pool: &Pool) -> Result<Box<dyn ClientConn>> {
        Ok(Box::new(client::connect(cfg)?))
    }

    fn listen(&self, cfg: &Config, pool: &Pool) -> Result<Box<dyn Listener>> {
        Ok(Box::new(server::listen(cfg, pool)?))
    }
}

/// Registers [`TcpTransport`] in `registry`, and its `[tcp]` configuration section with
/// the configuration of this process ([`config::register`]).
pub fn register(registry: &mut Registry) {
    config::register();
    registry.register(Arc::new(TcpTransport));
}

// Poisoning is ignored: every critical section here is panic-free bookkeeping.
use zcio::lock;

/// A connection-fatal I/O error.
fn transport_err(what: String, e: std::io::Error) -> Error {
    Error::Transport {
        transport: "tcp",
        what,
        source: Box::new(e),
    }
}

/// The core error for a malformed handshake or frame from `peer`.
fn wire_err(e: wire::WireError, what: &'static str, peer: &str) -> Error {
    match e {
        wire::WireError::Version { .. } => e.into_error(what),
        e => Error::decode(what, format!("from {peer}: {e}")),
    }
}
