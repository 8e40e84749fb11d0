//! # The RDMA transport (`rdma`)
//!
//! Reliable-connected (RC) queue pairs set up over a TCP bootstrap connection; headers
//! travel by SEND into pre-posted receive buffers, payload moves by RDMA READ and RDMA
//! WRITE, all initiated by the server, between registered pool buffers. The wire formats
//! ([`bootstrap`], [`msg`]), the work-request planner ([`plan`]) and each side's request
//! state machine with the send-queue ledger ([`lane`]) are pure, `unsafe`-free modules that
//! compile without the `rdma` feature (unit- and property-tested on any host, fuzzable);
//! [`RdmaTransport`] and everything that touches a device need the feature: the drivers
//! (`client`, `server`, each with its connection set-up in `setup`) feed the state machines
//! what happens and carry out what they answer, and `verbs` holds every `unsafe` block: this
//! module forbids it.
//!
//! ## Memory and registration
//! One device context and one protection domain per device and process, opened lazily.
//! Each data pool gets one registrar per (device, role), installed with
//! `Pool::add_registrar`, so every arena (existing and future) is registered once and a
//! buffer's keys are `buf.keys(id)` in O(1):
//! - a **client** with `rdma.client_exposure = "request"` (the default) registers its pool
//!   LOCAL_WRITE | MW_BIND: no remote access through the arenas' own rkeys. For each
//!   request it binds a type 2 memory window over each descriptor of pool memory (remote
//!   read for request payload, remote write for reply payload), posted before the
//!   request's SEND, and sends the windows' rkeys; when the reply arrives it posts a local
//!   invalidation of each window and completes the request only once the last one has
//!   executed, so the server reaches a request's buffers only while it is in flight and
//!   only in its direction. A failed connection destroys the queue pair first, which ends
//!   every window bound on it. A device without type 2 windows is refused at connect;
//! - a client with `"arena"` registers its pool LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE
//!   (the server READs request payload from it and WRITEs reply payload into it, and could
//!   touch any of it at any time);
//! - a **server** registers its pool LOCAL_WRITE only: it initiates every RDMA operation,
//!   so no client can read or write server memory.
//!
//! Pool segments are expected to come from the pool the connection was made with: the
//! core's `RegistrarId` is an index into a pool's registrars, not qualified by pool, so a
//! buffer of another pool would be described with whatever that pool's registrar at the
//! same index gave it. That is safe (the peer's RDMA then fails its key check, or, when
//! the other pool also has a client registration on this device, works) but not useful.
//!
//! Messages do not use the data pool. Each connection has a small private **control pool**
//! (registered LOCAL_WRITE) holding its receive buffers (one per credit, each as large as
//! the largest message the peer may send) and its outgoing message buffers. Two reasons:
//! a live client must not keep buffers of the caller's pool in use (the conformance suite
//! checks that a client's pool is empty between requests), and a server's shared pool
//! must not be drained by idle connections' receive rings (32 credits x 16 KiB would take
//! half of the conformance pool's 64 KiB class per connection, and starve payload). The
//! cost is `credits x (request size + 2 x reply size)` bytes per server connection
//! (about 1 MiB with the defaults; 1.4 MiB with `rdma.inline_threshold` at its largest,
//! 4096) and `credits x (request size + reply size)` per client connection, pinned; `listen`/`connect` check RLIMIT_MEMLOCK against the data pool plus
//! one connection's control pool, and report a limit that is too low with the fix.
//!
//! ## Connection set-up (TCP bootstrap)
//! The client connects to `client.connect`; the server's listener accepts on
//! `server.listen` (handshakes run on their own threads, as in the TCP transport). A
//! connection has `rdma.queue_pairs` RC queue pairs (the client offers its setting, the
//! server grants at most its own). For each, each side creates a completion queue and the
//! queue pair in INIT, posts its receives, then sends a fixed-size [`bootstrap::Hello`]:
//! number of queue pairs, endpoint (GID, QPN, PSN, MTU), credits, max segments, max
//! payload, max header, inline threshold and its receive size. The client speaks first;
//! the server, knowing the client's hello, posts receives sized for the negotiated limits.
//! Both use the field-wise minimum (the client further lowers `max_segments` so that a
//! request with that many send and receive descriptors fits the server's receives) and move
//! the queue pair to RTR and RTS. After the last queue pair both send one `READY` byte;
//! nobody SENDs before reading the peer's `READY`, so the peer is RTR. The TCP socket stays
//! open as the liveness channel: end of stream on it (the peer closed the connection, or
//! its process died and the kernel closed the socket) fails the connection at once,
//! instead of after RC retry timeouts (seconds, or never for an idle connection).
//! Authentication stays in the file protocol's hello, which runs over the established
//! connection as with TCP.
//!
//! ## Messages ([`msg`])
//! A request carries its id, the header, descriptors (`addr, rkey, len`, 16 bytes each) of
//! the client's send segments (what the server READs) and of its receive segments (where
//! the server WRITEs the reply payload), and optionally an inline payload. A reply carries
//! the id, the payload length, the header and optionally an inline payload. Decoders check
//! every length against the negotiated limits and the message size before anything is
//! copied; a bad message fails that connection (it never panics).
//!
//! ## Data path
//! - **Reads** (reply payload): the core server reads the file into its pool buffers and
//!   calls `Replier::reply`; the transport RDMA WRITEs them into the client's advertised
//!   receive segments (one work request per remote descriptor, split further so that no
//!   work request gathers more than the device's SGE limit, capped at 32), then SENDs the
//!   reply; RC ordering makes the data land before the reply is seen. The payload
//!   buffers are held (shared `Iobuf` clones) until the SEND completes.
//! - **Writes** (request payload): on a request, `ServerConn::recv` takes pool buffers
//!   (`Pool::get_span`), RDMA READs the client's send segments into them, and hands the
//!   request out only when every READ has completed.
//! - **Inline**: payload up to the negotiated `rdma.inline_threshold` travels inside the
//!   message, both ways (the client copies a small inline reply into its receive
//!   segments; a request whose reply capacity is within the threshold advertises no
//!   receive descriptors at all). Messages that fit the queue pair's inline size go out as
//!   inline SENDs.
//! - **Caller memory outside the pool** (`RawSeg`/`Vec` segments without keys): a segment
//!   of at least `rdma.register_threshold` bytes (and at least the pool's largest buffer
//!   size) is registered on the fly (`ibv_reg_mr`, REMOTE_READ only for send segments,
//!   REMOTE_WRITE for receive segments, or REMOTE_READ|WRITE with `"arena"`) and
//!   deregistered when its request completes;
//!   shorter ones are bounced: consecutive small segments are packed into pool buffers,
//!   copied in before the request is sent (writes) or out after the reply arrived (reads).
//!   Pool segments with keys are used in place. Descriptors that continue each other (same
//!   key, adjacent addresses) are merged.
//!
//!   Why a size threshold: registering and deregistering costs nearly the same from 4 KiB
//!   to 1 MiB (system calls, page pinning, the device's translation table), while a copy
//!   grows with the size. The example `register_vs_copy` (`examples/register_vs_copy.rs`,
//!   run in the guest by `ci/rxe-bench`) measures both per size. On Soft-RoCE in the
//!   emulated guest (medians of three runs):
//!
//!   | size    | reg + dereg | bounce copy |
//!   |--------:|------------:|------------:|
//!   |   4 KiB |  86-144 us  |    5-8 us   |
//!   |  16 KiB |  87-120 us  |     52 us   |
//!   |  64 KiB |  91-149 us  |  200-230 us |
//!   | 256 KiB | 150-168 us  |  0.8-0.9 ms |
//!   |   1 MiB | 200-265 us  |  0.4-0.5 ms |
//!
//!   so there copying wins below roughly 32 KiB. The guest emulates every instruction,
//!   which makes copies relatively dearer than on real hardware (where a copy runs near
//!   memory bandwidth, about 25 us for 256 KiB, and registration costs tens of
//!   microseconds); the default of 256 KiB keeps registrations, and the pinned memory and
//!   device translation entries they cost, for the segments where they clearly pay, and
//!   is a configuration value (`rdma.register_threshold`).
//!
//! ## Queue pairs
//! Why more than one: Soft-RoCE does a queue pair's protocol work (segmentation, the ICRC,
//! copies) in the thread that posts or in that queue pair's task, one at a time, so one
//! queue pair is bounded by one core however many requests are in flight; hardware NICs
//! likewise spread queue pairs over their processing units. Each queue pair of a connection
//! is a complete lane: its own completion queue, connection thread, lock, slots, credits and
//! control pool, so that nothing is shared on the data path. `rdma.credits` is shared out
//! among them (rounded up; when the server grants fewer queue pairs than offered, each has
//! the credits the client planned for the offer). The client sends each request on the
//! queue pair with the most free slots (round robin among equals), and the reply comes back
//! on the same queue pair. The server hands out the requests of all its queue pairs through
//! one `recv` (round robin), with the queue pair's index in the top byte of the request id
//! (client ids stay below 2^56; a larger one is a protocol violation), which routes the
//! reply. A connection lives and dies as one: the first queue pair to fail shuts the
//! bootstrap socket down, the others see it end and follow, and the first failure is the
//! reason everyone reports (the server first handles what all its completion queues hold,
//! so a client's bad memory key found on one queue pair is not hidden by another's seeing
//! the socket close). The server's idle timeout counts activity on all queue pairs.
//!
//! ## Flow control
//! Each side posts `rdma.credits` receives per connection (divided among the queue pairs);
//! the negotiated credits are the minimum, per queue pair. The client keeps at most that
//! many requests in flight (a slot per credit; `start` waits up to `client.timeout` for one
//! and then fails with a timeout), each reply returning one credit implicitly. The server reposts a request's receive buffer as soon as the message
//! is decoded, before it replies, and the client reposts a reply's receive before it
//! completes the request, so a receiver-not-ready retry never happens from a well-behaved
//! peer; from one that stops posting receives the retries are finite
//! (`verbs::RNR_RETRY`) and the SEND, then the connection, fails. A
//! client exceeding its credits is a protocol violation. The server's send queue is sized
//! for at least one request's worst case (`max_segments + ceil(max_segments / max_sge) + 2`
//! work requests) and four per credit; posting waits for room, which completions free, for
//! at most `ROOM_STALL`: then only that connection fails.
//!
//! ## Admission
//! The server refuses request payload before the client has authenticated (the connection
//! fails before a pool buffer is taken for it), and reserves each request's payload bytes
//! in the connection's `server.max_payload_in_flight` budget before it takes buffers. When
//! the budget is spent or the pool is short, that connection's requests wait in `recv`
//! (back-pressure, however long) while its finished requests keep being handed out.
//!
//! ## Threads
//! One thread per queue pair. It sleeps in `poll(2)` on both the completion channel and
//! the bootstrap socket (`CompletionQueue::wait_or_readable`; with `rdma.busy_poll` it
//! spins on the CQ and checks the socket every 256 empty polls), wakes at least every tick
//! (an eighth of `client.timeout` or `server.idle_timeout`, 5 ms ..= 1 s) for timeouts,
//! and dispatches completions by `wr_id` (kind, slot, send-queue sequence number). Watching
//! the socket in the same thread rather than in a second, blocked one matters: when the
//! socket ends, the completions already queued (say, the reply a server sent just before
//! closing, such as "server full") are dispatched before the connection is failed, so they
//! are never lost to the race between two threads; and shutting the socket down wakes the
//! thread at once when the connection is closed locally.
//!
//! **No heap allocation per I/O.** Per-request state lives in a preallocated slot table
//! indexed by slot; descriptor lists, completion cells (`CompletionCell`, twice as many as
//! credits, not tied to slots) and the vectors a request's header and payload travel in
//! are made when the queue pair is set up and reused; work requests and scatter/gather
//! lists are built on the stack. The contract's own vectors are reused too: a client's
//! `Request` header, send and receive vectors come back in its `Reply` (the reply header
//! is copied into the request's header buffer), and a server that hands each served
//! `Incoming` to `Replier::recycle` gives its header and payload vectors back to the
//! queue pair. `tests/allocations.rs` counts every allocation of the process (client,
//! server and completion threads) over 64 KiB reads and writes at iodepth 1 and 8, with
//! and without spinning waiters, and requires none.
//!
//! `ServerConn::recv` takes requests from a queue the connection thread fills; `Replier::reply` posts from any thread. On the client, posting happens under the
//! queue pair's lock. On the server it happens under a separate send-side lock, not the
//! state lock: on Soft-RoCE a post does the queue pair's protocol work in the posting thread
//! (for a 64 KiB RDMA WRITE about a millisecond under emulation), and meanwhile the queue
//! pair's requests must keep arriving and being handed out. A reply frees its request's
//! slot and lends its descriptors out under the state lock, then posts under the send-side
//! lock with the queue pair read-locked (failure write-locks it to destroy it, so no post is
//! in progress then). The send-side lock keeps work requests posted in sequence order, so
//! send-queue completions retire them in order.
//!
//! ## Failure
//! Any error completion (a remote access error from a bogus rkey, retries exceeded, a
//! flush), an unexpected or malformed message, end of stream on the bootstrap socket, the
//! client timeout or the server's idle timeout fail that connection only: under its lock
//! the queue pair is destroyed first (after that the device touches none of the
//! connection's memory; on Soft-RoCE a receive posted after an error would never complete,
//! so receive buffers are reclaimed here, not from flush completions), then on-the-fly
//! regions are deregistered and every buffer goes back to its pool; the client's requests
//! in flight complete with `ConnectionClosed("…why…")` (or `Timeout`). A server logs a
//! client's bogus memory key (`tracing::warn`, with the peer address) and keeps serving its
//! other connections. `Replier::close` lets replies already posted drain (up to 2 s) first.
//!
//! ## Limits
//! `limits()` reports `rdma_payload = true`, the negotiated `inline_threshold`,
//! `max_segments` (it may exceed the device's SGE limit: splitting across work requests is
//! internal), `max_payload`, `max_header` and `max_in_flight` = the credits of all queue
//! pairs.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod lane;
pub mod msg;
pub mod plan;

#[cfg(feature = "rdma")]
mod client;
#[cfg(feature = "rdma")]
mod conn;
#[cfg(feature = "rdma")]
mod device;
#[cfg(feature = "rdma")]
mod server;

#[cfg(feature = "rdma")]
pub use self::rdma::{Faults, RdmaTransport};
#[cfg(feature = "rdma")]
pub use server::{HANDSHAKE_TIMEOUT, MAX_PENDING, ROOM_STALL};

/// Largest inline payload this transport carries (the configuration's upper bound).
pub const MAX_INLINE: usize = 4096;

#[cfg(feature = "rdma")]
use self::rdma::{bootstrap_err, handshake_io_err, lock, memlock_err, rdma_err, unavailable};

#[cfg(feature = "rdma")]
mod rdma {
    use std::sync::{Mutex, MutexGuard};
    use std::time::Duration;

    use zcio::config::Config;
    use zcio::transport::{ClientConn, Listener, Transport};
    use zcio::{Error, Pool, Result};

    use super::bootstrap::{BootstrapError, VERSION};
    use super::conn::chain;
    use crate::config::RdmaConfig;
    use crate::RdmaError;

    /// Test-only fault injection (not part of the supported API).
    #[doc(hidden)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Faults {
        /// The client advertises corrupted memory keys in every request: the server's
        /// RDMA operations on them fail with a remote access error.
        pub corrupt_rkeys: bool,
        /// When not 0: every this many requests that carry memory keys on a connection,
        /// one advertises corrupted keys, so the server's RDMA operation fails with a
        /// remote access error and the queue pairs go to the error state (the connection
        /// ends; a client with `client.reconnect` dials again).
        pub qp_error_every: u32,
        /// The client never reposts a receive buffer once a reply has used it: after its
        /// first `credits` replies the server's SENDs meet "receiver not ready".
        pub stop_reposting: bool,
    }

    /// The RDMA verbs transport, registered as `rdma` (see the module documentation).
    #[derive(Clone, Debug, Default)]
    pub struct RdmaTransport {
        faults: Faults,
    }

    impl RdmaTransport {
        /// The transport.
        pub fn new() -> RdmaTransport {
            RdmaTransport::default()
        }

        /// A transport whose client connections inject `faults` (for tests).
        #[doc(hidden)]
        pub fn with_faults(faults: Faults) -> RdmaTransport {
            RdmaTransport { faults }
        }
    }

    impl Transport for RdmaTransport {
        fn name(&self) -> &'static str {
            "rdma"
        }

        fn check_available(&self, cfg: &Config) -> Result<()> {
            super::device::device(RdmaConfig::of(cfg)).map(drop)
        }

        fn connect(&self, cfg: &Config, pool: &Pool) -> Result<Box<dyn ClientConn>> {
            Ok(Box::new(super::client::connect(self.faults, cfg, pool)?))
        }

        fn listen(&self, cfg: &Config, pool: &Pool) -> Result<Box<dyn Listener>> {
            Ok(Box::new(super::server::listen(cfg, pool)?))
        }
    }

    /// Locks a mutex, ignoring poisoning (critical sections keep the state consistent).
    pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A verbs failure as a connection-fatal transport error.
    pub(crate) fn rdma_err(what: String, e: RdmaError) -> Error {
        Error::Transport {
            transport: "rdma",
            what,
            source: Box::new(e),
        }
    }

    /// Why RDMA cannot run here, and what to do about it.
    pub(crate) fn unavailable(e: &RdmaError) -> Error {
        let (reason, hint) = match e {
            RdmaError::NotBuilt => (
                "this binary was built without RDMA support".to_string(),
                "rebuild with `--features rdma` (needs cmake and libclang-dev)".to_string(),
            ),
            RdmaError::LibraryMissing { .. } => (
                "libibverbs is not installed or could not be loaded".to_string(),
                "install rdma-core (Debian/Ubuntu: `apt-get install rdma-core \
                 ibverbs-providers`)"
                    .to_string(),
            ),
            RdmaError::NoKernelSupport { .. } => (
                "the running kernel has no RDMA support".to_string(),
                "use a kernel with CONFIG_INFINIBAND and load a driver, e.g. `modprobe \
                 rdma_rxe && rdma link add rxe0 type rxe netdev <interface>` for Soft-RoCE"
                    .to_string(),
            ),
            RdmaError::NoDevice => (
                "no RDMA device found".to_string(),
                "check `ibv_devices` and that the provider library (ibverbs-providers) is \
                 installed, or create a Soft-RoCE device: `rdma link add rxe0 type rxe \
                 netdev <interface>`"
                    .to_string(),
            ),
            RdmaError::DeviceNotFound { name, available } => (
                format!("RDMA device `{name}` not found (available: {available})"),
                "set rdma.device to one of them (see `zcio devices`), or leave it empty for \
                 the first device with an active port"
                    .to_string(),
            ),
            other => (
                chain(other),
                "see `zcio devices` and `ibv_devinfo -v`".to_string(),
            ),
        };
        Error::TransportUnavailable {
            name: "rdma".into(),
            reason,
            hint,
        }
    }

    /// The locked-memory check's error, with the fix.
    pub(crate) fn memlock_err(e: RdmaError) -> Error {
        match e {
            RdmaError::Memlock { have, need } => Error::TransportUnavailable {
                name: "rdma".into(),
                reason: format!(
                    "the locked-memory limit (RLIMIT_MEMLOCK) is {have} bytes, but RDMA must \
                     pin {need} bytes (the buffer pool and one connection's message buffers)"
                ),
                hint: "raise it with `ulimit -l unlimited` in the shell that starts zcio, a \
                       `memlock` line in /etc/security/limits.conf, or `LimitMEMLOCK=infinity` \
                       in the systemd unit; or make the pool smaller ([pool] classes)"
                    .into(),
            },
            other => unavailable(&other),
        }
    }

    /// A malformed hello from `peer`.
    pub(crate) fn bootstrap_err(e: BootstrapError, peer: &str) -> Error {
        match e {
            BootstrapError::Version { theirs } => Error::Version {
                ours: VERSION,
                theirs,
            },
            e => Error::decode("rdma handshake", format!("from {peer}: {e}")),
        }
    }

    /// A bootstrap socket error during the handshake with `peer`.
    pub(crate) fn handshake_io_err(peer: &str, after: Duration, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::ConnectionClosed(format!(
                "{peer} closed the connection during the rdma handshake (is it a zcio peer \
                 with transport \"rdma\", and does it accept more connections?)"
            )),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout {
                what: format!("rdma handshake with {peer}"),
                after,
            },
            _ => Error::Transport {
                transport: "rdma",
                what: format!("rdma handshake with {peer}"),
                source: Box::new(e),
            },
        }
    }
}
