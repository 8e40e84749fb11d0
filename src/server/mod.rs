//! The file server: serves one export directory over any transport.
//!
//! One thread accepts connections; each connection has a thread that receives requests
//! (with their payload already in pool buffers) and hands them to a shared pool of worker
//! threads, which do the file I/O with `preadv`/`pwritev` straight into and out of pool
//! buffers and send the reply from those same buffers. Workers take requests from the
//! connections in turn, and as many workers as are idle work on one connection's queue at
//! once (`ServerStats::mean_depth` shows how deep the queues run). A per-connection limit
//! on requests in flight stops the receiving thread (and so, through the transport, the
//! client) when a connection asks for more than its share. A request that is alone
//! (nothing else of its connection in flight, and nothing waiting behind it in the
//! transport: `ServerConn::backlog`) is served on the receiving thread itself, one thread
//! hand-off less for a synchronous client; so is, at any depth, a small read whose bytes
//! are all in the page cache (`serve_cached_read`), which cannot block, and a write to a
//! file opened without `O_DIRECT` (`inline_write`), which only copies into the page
//! cache (it blocks only when the kernel throttles a writer: back-pressure). Only regular
//! files are opened: a FIFO or device
//! node in the export is refused without blocking. A connection's open files are closed
//! when it goes away, however it goes.
//!
//! A read of a file opened without `O_DIRECT` is answered with a file range
//! ([`crate::transport::FileRange`]) when the transport takes them (TCP sends it from the
//! page cache with `sendfile`: no user-space copy on the server); otherwise, and for
//! `O_DIRECT` files, the data is read into pool buffers first (RDMA writes from them).

mod drain;
mod export;
mod fsops;

pub use drain::DrainReport;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::uio::{preadv, pwritev};

use self::export::{Export, OpError};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lock;
use crate::pool::{Iobuf, IobufMut, Pool};
use crate::proto::{self, HelloReply, Req, Resp, Status, NONCE_LEN};
use crate::transport::{
    Admission, FileRange, Incoming, Listener, Registry, Replier, ServerConn, Transport,
};

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused because the server was full (`server.max_connections`) or their
    /// address had its share (`server.max_connections_per_addr`).
    pub refused: AtomicU64,
    /// Connections open now.
    pub active: AtomicUsize,
    /// Files open now, all connections.
    pub open_files: AtomicUsize,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Connections ended by a transport or protocol error.
    pub failed_connections: AtomicU64,
    /// Requests received, all connections.
    pub received: AtomicU64,
    /// For each request received, how many of its connection's requests were then in the
    /// server (itself included), summed: over `received`, the mean queue depth the server
    /// sees, which tells a client that cannot keep the server busy from a server that
    /// cannot keep up.
    pub depth_sum: AtomicU64,
    /// Requests served on their connection's receiving thread rather than handed to the
    /// workers: those alone in the server when they arrived, small reads the page cache
    /// held, and writes to files opened without `O_DIRECT`.
    pub served_inline: AtomicU64,
    /// Read requests answered (successfully), and their payload bytes: with `writes` and
    /// `write_bytes`, they show how big the requests that reached the server were (a
    /// mount's 1 MiB read arrives as one request).
    pub reads: AtomicU64,
    /// Bytes of payload in the replies to `reads`.
    pub read_bytes: AtomicU64,
    /// Write requests answered (successfully).
    pub writes: AtomicU64,
    /// Bytes written by `writes`.
    pub write_bytes: AtomicU64,
    /// Read replies with data whose payload the transport sent as a file range (from the
    /// page cache, no copy into pool buffers).
    pub file_range_replies: AtomicU64,
    /// Read replies with data whose payload was read into pool buffers first (a transport
    /// that takes no file ranges, or an `O_DIRECT` file).
    pub pool_read_replies: AtomicU64,
    /// Connections closed for not finishing hello and authentication within
    /// `server.auth_timeout_ms`.
    pub auth_timeouts: AtomicU64,
    /// Authentications refused: a wrong token, or an attempt during a failure's back-off.
    pub auth_failures: AtomicU64,
    /// Requests whose serving panicked (each answered with an error).
    pub panics: AtomicU64,
}

impl ServerStats {
    /// The mean number of a connection's requests in the server when one arrived
    /// (0 before any request).
    pub fn mean_depth(&self) -> f64 {
        let n = self.received.load(Ordering::Relaxed);
        if n == 0 {
            return 0.0;
        }
        self.depth_sum.load(Ordering::Relaxed) as f64 / n as f64
    }
}

struct Job {
    conn: Arc<Conn>,
    inc: Incoming,
}

/// Fair scheduling of requests over connections: each connection queues its own requests,
/// and workers take one request at a time from the connections in round-robin order. A
/// connection flooding the server with cheap requests gets its turn like every other and
/// no more, instead of crowding a shared FIFO.
struct Scheduler<C = Conn> {
    ready: Mutex<SchedState<C>>,
    cond: Condvar,
}

struct SchedState<C> {
    /// Connections with queued requests, each at most once.
    ready: std::collections::VecDeque<Arc<C>>,
    closed: bool,
    /// Workers waiting for a request (a push signals only when there is one).
    idle: usize,
}

/// What the scheduler needs of a connection: its queue of requests.
trait Queued {
    fn queue(&self) -> &Mutex<ConnQueue>;
}

impl Queued for Conn {
    fn queue(&self) -> &Mutex<ConnQueue> {
        &self.queue
    }
}

impl<C: Queued> Scheduler<C> {
    fn new() -> Self {
        Scheduler {
            ready: Mutex::new(SchedState {
                ready: std::collections::VecDeque::with_capacity(64),
                closed: false,
                idle: 0,
            }),
            cond: Condvar::new(),
        }
    }

    fn push(&self, conn: &Arc<C>, inc: Incoming) {
        let schedule = {
            let mut q = lock(conn.queue());
            q.jobs.push_back(inc);
            !std::mem::replace(&mut q.scheduled, true)
        };
        let idle = {
            let mut st = lock(&self.ready);
            if schedule {
                st.ready.push_back(conn.clone());
            }
            st.idle
        };
        // Every request may take an idle worker, also when its connection is already in
        // line: else one connection's queue would be worked by one worker at a time. (A
        // worker only waits when no connection is in line, so a request queued while all
        // were busy is taken by the next one to finish, without a wake-up; and with no
        // worker waiting, no wake-up system call is made.)
        if idle > 0 {
            self.cond.notify_one();
        }
    }

    /// The next request and its connection, or `None` once the scheduler is closed.
    fn pop(&self) -> Option<(Arc<C>, Incoming)> {
        let mut st = lock(&self.ready);
        loop {
            if let Some(conn) = st.ready.pop_front() {
                let (inc, more) = {
                    let mut q = lock(conn.queue());
                    let inc = q.jobs.pop_front();
                    let more = !q.jobs.is_empty();
                    q.scheduled = more;
                    (inc, more)
                };
                if more {
                    st.ready.push_back(conn.clone());
                }
                match inc {
                    Some(inc) => return Some((conn, inc)),
                    None => continue,
                }
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
            st.idle -= 1;
        }
    }

    fn close(&self) {
        lock(&self.ready).closed = true;
        self.cond.notify_all();
    }
}

#[derive(Default)]
struct ConnQueue {
    jobs: std::collections::VecDeque<Incoming>,
    scheduled: bool,
}

/// A counting semaphore for requests in flight on one connection.
struct Permits {
    /// Free permits, and how many threads wait for one (signalled only then).
    free: Mutex<(usize, usize)>,
    cond: Condvar,
}

impl Permits {
    fn new(n: usize) -> Permits {
        Permits {
            free: Mutex::new((n, 0)),
            cond: Condvar::new(),
        }
    }
    fn acquire(&self) {
        let mut f = lock(&self.free);
        while f.0 == 0 {
            f.1 += 1;
            f = self.cond.wait(f).unwrap_or_else(|p| p.into_inner());
            f.1 -= 1;
        }
        f.0 -= 1;
    }
    fn release(&self) {
        let waiting = {
            let mut f = lock(&self.free);
            f.0 += 1;
            f.1
        };
        if waiting > 0 {
            self.cond.notify_one();
        }
    }

    fn available(&self) -> usize {
        lock(&self.free).0
    }
}

struct OpenFile {
    file: File,
    writable: bool,
    /// Reads may be answered with a file range: opened for reading, without `O_DIRECT`.
    rangeable: bool,
    /// Opened without `O_DIRECT` (the protocol has no sync flags): a write only copies
    /// into the page cache, see [`inline_write`].
    buffered: bool,
}

/// One connection's state. Dropped (closing its files) when its receive thread has ended
/// and the last worker holding one of its requests is done.
struct Conn {
    replier: Arc<dyn Replier>,
    peer: String,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    /// `(client nonce, server nonce)` from hello.
    hello: Mutex<Option<([u8; NONCE_LEN], [u8; NONCE_LEN])>>,
    authed: AtomicBool,
    /// What the transport may take in for this connection (see [`Admission`]).
    admission: Arc<Admission>,
    /// When the connection was accepted: its hello and authentication are due by
    /// `server.auth_timeout` after this.
    accepted: Instant,
    /// Closed by the watchdog for not authenticating in time.
    expired: AtomicBool,
    /// Requests refused for want of authentication; at [`MAX_UNAUTHED_REFUSALS`] the
    /// connection is closed after the reply.
    unauthed_refusals: AtomicUsize,
    /// Close the connection once the current reply is sent.
    close_after_reply: AtomicBool,
    /// Files open or being opened: the per-connection limit is checked and taken in one
    /// step, before the open.
    open_count: AtomicUsize,
    permits: Permits,
    queue: Mutex<ConnQueue>,
    shared: Arc<Shared>,
    /// Open directory streams (`Req::Opendir`), numbered from `next_fh` too.
    dirs: Mutex<HashMap<u64, Arc<Mutex<export::DirStream>>>>,
}

impl Conn {
    fn authenticate(&self) {
        self.authed.store(true, Ordering::SeqCst);
        self.admission.authenticate();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let n = lock(&self.files).len();
        self.shared.stats.open_files.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Requests refused before authentication that a connection may send before it is closed:
/// a client that does not authenticate gets a few clear errors, not a free request loop.
const MAX_UNAUTHED_REFUSALS: usize = 16;

/// Failed authentications in a row from one address before any back-off.
const AUTH_FREE_FAILURES: u32 = 2;
/// The first back-off, after [`AUTH_FREE_FAILURES`] + 1 failures in a row from an address;
/// it doubles with each further failure, up to [`AUTH_BACKOFF_MAX`].
const AUTH_BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// The longest back-off after failed authentications.
const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Addresses remembered for their failed authentications, at most.
const AUTH_FAIL_ENTRIES: usize = 4096;

/// The address part of a peer description (`ip:port` -> `ip`), for per-address state.
fn peer_key(peer: &str) -> String {
    peer.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| peer.to_string())
}

/// Failed authentications per address: how many in a row, and until when the next
/// attempt is refused unchecked. So a wrong guess costs its address an exponentially
/// growing wait, without holding a thread.
#[derive(Default)]
struct AuthFailures {
    by_addr: HashMap<String, (u32, Instant)>,
}

impl AuthFailures {
    /// How long attempts from `key` are still refused, if they are.
    fn backoff(&self, key: &str, now: Instant) -> Option<Duration> {
        let (_, until) = self.by_addr.get(key)?;
        (*until > now).then(|| *until - now)
    }

    /// Records a failure; returns the failures in a row and the back-off now in force.
    fn failed(&mut self, key: &str, now: Instant) -> (u32, Duration) {
        if self.by_addr.len() >= AUTH_FAIL_ENTRIES && !self.by_addr.contains_key(key) {
            self.by_addr.retain(|_, (_, until)| *until > now);
            if self.by_addr.len() >= AUTH_FAIL_ENTRIES {
                // Full of live entries: forget one rather than grow without bound.
                if let Some(k) = self.by_addr.keys().next().cloned() {
                    self.by_addr.remove(&k);
                }
            }
        }
        let e = self.by_addr.entry(key.to_string()).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
        let wait = match e.0.checked_sub(AUTH_FREE_FAILURES + 1) {
            // A mistyped token or two costs nothing.
            None => Duration::ZERO,
            Some(k) => AUTH_BACKOFF_FIRST
                .saturating_mul(1u32 << k.min(16))
                .min(AUTH_BACKOFF_MAX),
        };
        e.1 = now + wait;
        (e.0, wait)
    }

    fn succeeded(&mut self, key: &str) {
        self.by_addr.remove(key);
    }
}

impl Shared {
    /// Counts a connection from `addr` in, unless `addr` has its
    /// `server.max_connections_per_addr` open already.
    fn enter_addr(&self, addr: &str) -> bool {
        let mut m = lock(&self.by_addr);
        let n = m.entry(addr.to_string()).or_insert(0);
        if *n >= self.cfg.server.max_connections_per_addr {
            return false;
        }
        *n += 1;
        true
    }

    /// Counts a connection from `addr` out (entries go when they reach 0, so the map holds
    /// only addresses with connections open: at most `server.max_connections` entries).
    fn leave_addr(&self, addr: &str) {
        let mut m = lock(&self.by_addr);
        if let Some(n) = m.get_mut(addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(addr);
            }
        }
    }
}

struct Shared {
    cfg: Config,
    pool: Pool,
    export: Export,
    stats: ServerStats,
    conns: Mutex<Vec<Weak<Conn>>>,
    stopping: AtomicBool,
    auth_failures: Mutex<AuthFailures>,
    /// The authentication watchdog sleeps on this (guarding "the accept loop has ended").
    watch: Mutex<bool>,
    watch_cv: Condvar,
    /// Over-limit connections being told so, each with the time by which the watchdog
    /// closes it if the refusal is not done.
    refusals: Mutex<Vec<(Instant, Weak<dyn Replier>)>>,
    /// Threads refusing over-limit connections now (at most [`MAX_REFUSERS`]).
    refusing: AtomicUsize,
    /// Connections open now per peer address ([`peer_key`]), every transport together;
    /// at most `server.max_connections_per_addr` each.
    by_addr: Mutex<HashMap<String, usize>>,
    /// Set by [`ServerHandle::drain`]: requests received from now on are answered with
    /// [`Status::ShuttingDown`] instead of being served.
    draining: AtomicBool,
    /// Requests whose reply has been sent (or failed to send): a drain waits until this
    /// catches up with `stats.received`.
    replied: AtomicU64,
    /// Requests answered with [`Status::ShuttingDown`].
    turned_away: AtomicU64,
}

/// Over-limit connections told so at once, at most: each takes a thread for at most
/// [`REFUSE_WITHIN`]. Beyond that, the accept loop closes them without a word.
const MAX_REFUSERS: usize = 4;
/// How long an over-limit connection has to send its first request (which is answered
/// with the refusal) before it is closed.
const REFUSE_WITHIN: Duration = Duration::from_secs(2);

/// A server bound to its listener, not yet serving.
pub struct Server {
    shared: Arc<Shared>,
    listener: Arc<dyn Listener>,
}

/// A server running on background threads.
pub struct ServerHandle {
    shared: Arc<Shared>,
    listener: Arc<dyn Listener>,
    accept: Option<JoinHandle<Result<()>>>,
    addr: String,
}

impl Server {
    /// Binds the transport named in `cfg` (looked up in `registry`), with a new pool.
    /// With a transport list, one server listens on every transport
    /// ([`crate::transport::multi`]).
    pub fn bind(cfg: &Config, registry: &Registry) -> Result<Server> {
        let pool = Pool::new(&cfg.pool)?;
        if !cfg.more_transports.is_empty() {
            let l = crate::transport::multi::listen_all(cfg, registry, &pool)?;
            return Server::with_listener(cfg, Arc::new(l), pool);
        }
        let t = registry.get(&cfg.transport, cfg)?;
        Server::bind_transport(cfg, t.as_ref(), pool)
    }

    /// Binds a given transport with a given pool.
    pub fn bind_transport(cfg: &Config, t: &dyn Transport, pool: Pool) -> Result<Server> {
        let listener: Arc<dyn Listener> = Arc::from(t.listen(cfg, &pool)?);
        Server::with_listener(cfg, listener, pool)
    }

    /// Serves on an existing listener (the in-memory test transport uses this).
    pub fn with_listener(cfg: &Config, listener: Arc<dyn Listener>, pool: Pool) -> Result<Server> {
        let export = Export::open_root(
            &cfg.server.export,
            cfg.server.read_only,
            cfg.server.direct_io,
        )
        .map_err(|e| Error::io(format!("open export {}", cfg.server.export.display()), e))?;
        let export = export.with_umask(cfg.server.umask);
        Ok(Server {
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                pool,
                export,
                stats: ServerStats::default(),
                conns: Mutex::new(Vec::new()),
                stopping: AtomicBool::new(false),
                auth_failures: Mutex::new(AuthFailures::default()),
                watch: Mutex::new(false),
                watch_cv: Condvar::new(),
                refusals: Mutex::new(Vec::new()),
                refusing: AtomicUsize::new(0),
                by_addr: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                replied: AtomicU64::new(0),
                turned_away: AtomicU64::new(0),
            }),
            listener,
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> String {
        self.listener.local_addr()
    }

    /// The server's buffer pool.
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// Starts the worker and accept threads and returns at once.
    pub fn spawn(self) -> Result<ServerHandle> {
        let sched = Arc::new(Scheduler::new());
        for i in 0..self.shared.cfg.server.workers {
            let sched = sched.clone();
            std::thread::Builder::new()
                .name(format!("zcio-worker-{i}"))
                .spawn(move || {
                    warm_scratch();
                    while let Some((conn, inc)) = sched.pop() {
                        handle(Job { conn, inc });
                    }
                })
                .map_err(|e| Error::io("spawn worker thread", e))?;
        }
        {
            let shared = self.shared.clone();
            let limit = shared.cfg.server.auth_timeout;
            std::thread::Builder::new()
                .name("zcio-watchdog".into())
                .spawn(move || watchdog(&shared, limit))
                .map_err(|e| Error::io("spawn the server's watchdog thread", e))?;
        }
        let addr = self.listener.local_addr();
        let shared = self.shared.clone();
        let listener = self.listener.clone();
        let accept = std::thread::Builder::new()
            .name("zcio-accept".into())
            .spawn(move || {
                let sh = shared.clone();
                // Whatever way the loop ends, panics included: workers finish what is
                // queued and exit, and the watchdog ends.
                struct Ended(Arc<Shared>, Arc<Scheduler>);
                impl Drop for Ended {
                    fn drop(&mut self) {
                        self.1.close();
                        *lock(&self.0.watch) = true;
                        self.0.watch_cv.notify_all();
                    }
                }
                let _ended = Ended(sh, sched.clone());
                accept_loop(shared, listener, sched)
            })
            .map_err(|e| Error::io("spawn accept thread", e))?;
        Ok(ServerHandle {
            shared: self.shared,
            listener: self.listener,
            accept: Some(accept),
            addr,
        })
    }

    /// Serves until the listener fails or is shut down. Returns the error that ended the
    /// accept loop (a listener failure, or a panic in it); `Ok` after a shutdown.
    pub fn serve(self) -> Result<()> {
        let mut h = self.spawn()?;
        match h.accept.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(p)) => Err(Error::Internal(format!(
                "the accept loop panicked: {}",
                panic_message(&*p)
            ))),
        }
    }
}

impl ServerHandle {
    /// Where clients connect.
    pub fn local_addr(&self) -> &str {
        &self.addr
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// The server's buffer pool.
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// Files open now, all connections.
    pub fn open_files(&self) -> usize {
        self.shared.stats.open_files.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.stats.active.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes every connection and waits for the accept thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.listener.shutdown();
        for c in lock(&self.shared.conns).iter().filter_map(Weak::upgrade) {
            c.replier.close();
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a panic payload says, if it is a string.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Closes every connection that has not finished hello (and, with a token,
/// authentication) `limit` after it was accepted, whatever it sends meanwhile: frames
/// before authentication do not extend a connection's life. Also closes over-limit
/// connections whose refusal is overdue. Sleeps until the next one is due; ends with the
/// accept loop or at shutdown.
fn watchdog(shared: &Shared, limit: Option<Duration>) {
    let mut ended = lock(&shared.watch);
    loop {
        if *ended || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut soonest = |at: Instant| {
            if at > now {
                next = Some(next.map_or(at, |n: Instant| n.min(at)));
            }
            at <= now
        };
        lock(&shared.refusals).retain(|(at, r)| match r.upgrade() {
            None => false,
            Some(_) if !soonest(*at) => true,
            Some(r) => {
                r.close();
                false
            }
        });
        let due: Vec<Arc<Conn>> = match limit {
            None => Vec::new(),
            Some(limit) => lock(&shared.conns)
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|c| !c.authed.load(Ordering::SeqCst) && !c.expired.load(Ordering::SeqCst))
                .filter(|c| soonest(c.accepted + limit))
                .collect(),
        };
        let limit = limit.unwrap_or_default();
        for c in due {
            c.expired.store(true, Ordering::SeqCst);
            shared.stats.auth_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                "connection from {} closed: no hello and authentication within {limit:?} (server.auth_timeout_ms)",
                c.peer
            );
            c.replier.close();
        }
        ended = match next {
            Some(at) => {
                shared
                    .watch_cv
                    .wait_timeout(ended, at.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => shared
                .watch_cv
                .wait(ended)
                .unwrap_or_else(|p| p.into_inner()),
        };
    }
}

fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<dyn Listener>,
    jobs: Arc<Scheduler>,
) -> Result<()> {
    loop {
        let conn = match listener.accept() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // A bad peer; counted, logged quietly (an attacker must not flood the log).
                shared
                    .stats
                    .failed_connections
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!("connection attempt failed: {e}");
                continue;
            }
            Err(e) => {
                // Workers finish what is queued, then exit (see `spawn`).
                if shared.stopping.load(Ordering::SeqCst) {
                    return Ok(());
                }
                tracing::error!("accept failed, server stops: {e}");
                return Err(e);
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            conn.replier().close();
            return Ok(());
        }
        if shared.stats.active.load(Ordering::SeqCst) >= shared.cfg.server.max_connections {
            let max = shared.cfg.server.max_connections;
            tracing::debug!(
                "connection from {}: at the limit of {max} connections (server.max_connections)",
                conn.peer()
            );
            refuse_busy(
                &shared,
                conn,
                format!("server is at its limit of {max} connections; try again later"),
            );
            continue;
        }
        let addr = peer_key(&conn.peer());
        if !shared.enter_addr(&addr) {
            let max = shared.cfg.server.max_connections_per_addr;
            tracing::debug!(
                "connection from {}: {addr} has {max} connections open (server.max_connections_per_addr)",
                conn.peer()
            );
            refuse_busy(
                &shared,
                conn,
                format!("{addr} has its limit of {max} connections open; try again later"),
            );
            continue;
        }
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        shared.stats.active.fetch_add(1, Ordering::SeqCst);
        let shared2 = shared.clone();
        let addr2 = addr.clone();
        let jobs = jobs.clone();
        let r = std::thread::Builder::new()
            .name("zcio-conn".into())
            .spawn(move || {
                // A panic in the transport or here ends this connection only: the slot is
                // given back either way.
                let replier = conn.replier();
                let peer = conn.peer();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve_conn(&shared2, conn, &jobs)
                }));
                if let Err(p) = r {
                    tracing::error!(
                        "connection from {peer}: its receiving thread panicked: {}",
                        panic_message(&*p)
                    );
                    shared2.stats.panics.fetch_add(1, Ordering::Relaxed);
                    replier.close();
                }
                shared2.leave_addr(&addr2);
                shared2.stats.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = r {
            tracing::error!("cannot start a connection thread: {e}");
            shared.leave_addr(&addr);
            shared.stats.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Refuses a connection over `server.max_connections` or `server.max_connections_per_addr`,
/// saying `why`. Up to [`MAX_REFUSERS`] at once are answered with a clear error (their first
/// request gets `Busy` with `why`) by a short-lived thread that the watchdog cuts off after
/// [`REFUSE_WITHIN`]; any more are closed at once by the accept loop. A flood of connections
/// therefore costs a few threads for a few seconds, never a thread each for the idle
/// timeout.
fn refuse_busy(shared: &Arc<Shared>, mut conn: Box<dyn ServerConn>, why: String) {
    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
    let replier = conn.replier();
    if !take_below(&shared.refusing, MAX_REFUSERS) {
        tracing::debug!("connection from {} closed at once: {why}", conn.peer());
        replier.close();
        return;
    }
    {
        let _w = lock(&shared.watch);
        lock(&shared.refusals).push((Instant::now() + REFUSE_WITHIN, Arc::downgrade(&replier)));
    }
    shared.watch_cv.notify_all();
    let sh = shared.clone();
    let r = std::thread::Builder::new()
        .name("zcio-refuse".into())
        .spawn(move || {
            if let Ok(Some(inc)) = conn.recv() {
                let _ = replier.reply(inc.id, &proto::encode_err(Status::Busy as u32, &why), &[]);
            }
            replier.close();
            sh.refusing.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = r {
        tracing::error!("cannot start a thread to refuse a connection: {e}");
        shared.refusing.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_conn(shared: &Arc<Shared>, mut sc: Box<dyn ServerConn>, jobs: &Scheduler) {
    let conn = Arc::new(Conn {
        replier: sc.replier(),
        peer: sc.peer(),
        files: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        hello: Mutex::new(None),
        authed: AtomicBool::new(false),
        admission: Arc::new(Admission::new(
            shared.cfg.server.max_payload_in_flight,
            shared
                .cfg
                .server
                .max_in_flight
                .max(shared.cfg.limits.max_in_flight),
        )),
        accepted: Instant::now(),
        expired: AtomicBool::new(false),
        unauthed_refusals: AtomicUsize::new(0),
        close_after_reply: AtomicBool::new(false),
        open_count: AtomicUsize::new(0),
        permits: Permits::new(shared.cfg.server.max_in_flight),
        queue: Mutex::new(ConnQueue {
            // Queued requests never make it grow (up to a bound): no allocation per request.
            jobs: std::collections::VecDeque::with_capacity(
                shared.cfg.server.max_in_flight.min(256),
            ),
            scheduled: false,
        }),
        shared: shared.clone(),
        dirs: Mutex::new(HashMap::new()),
    });
    sc.set_admission(conn.admission.clone());
    {
        // Lock order: watch, then conns (as the watchdog takes them).
        let _w = lock(&shared.watch);
        let mut conns = lock(&shared.conns);
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
    }
    shared.watch_cv.notify_all();
    let _span = tracing::debug_span!("conn", peer = %conn.peer).entered();
    tracing::debug!("connection from {}", conn.peer);
    warm_scratch();
    loop {
        // Replies the transport holds must not wait for a permit (only this thread takes
        // them: with one available, taking it does not block).
        // (A failed flush has ended the connection: `recv` says so.)
        if conn.permits.available() == 0 {
            let _ = sc.flush();
        }
        conn.permits.acquire();
        match sc.recv() {
            Ok(Some(inc)) if !inc.payload.is_empty() && !conn.authed.load(Ordering::SeqCst) => {
                // A transport that admits payload itself refuses this before taking
                // buffers; for any other, the connection ends here.
                tracing::info!(
                    "connection {} dropped: request payload before authentication",
                    conn.peer
                );
                shared
                    .stats
                    .failed_connections
                    .fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(Some(inc)) => {
                // Counted before the look at `draining` (both SeqCst), so that a drain
                // either sees this request as received and waits for its answer, or the
                // request sees the drain and is turned away unserved.
                shared.stats.received.fetch_add(1, Ordering::SeqCst);
                if shared.draining.load(Ordering::SeqCst) {
                    drain::turn_away(&conn, inc);
                    continue;
                }
                let depth = shared
                    .cfg
                    .server
                    .max_in_flight
                    .saturating_sub(conn.permits.available());
                let stats = &shared.stats;
                stats.depth_sum.fetch_add(depth as u64, Ordering::Relaxed);
                // A client with one request outstanding (a synchronous caller) is served on
                // this thread: one thread hand-off less per request. Deeper queues go to
                // the workers, which run them in parallel; so does a request with more
                // already waiting in the transport behind it (else a deep queue would be
                // served here one at a time: each arrives alone as the last is answered).
                // A small read of a buffered file whose bytes are in the page cache is
                // served here at any depth: it cannot block, and a hand-off to a worker
                // (a futex wake-up and two context switches) would cost more than the read.
                let Some(inc) = serve_cached_read(&conn, inc) else {
                    stats.served_inline.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if inline_write(&conn, &inc) {
                    // Its reply is held with the others this thread makes, and leaves
                    // with them before the thread waits for the client.
                    stats.served_inline.fetch_add(1, Ordering::Relaxed);
                    handle(Job {
                        conn: conn.clone(),
                        inc,
                    });
                } else if depth == 1 && !sc.backlog() {
                    // It may block (an fsync, a cold read): held replies go first. (A
                    // failed flush has ended the connection: the reply fails too.)
                    let _ = sc.flush();
                    stats.served_inline.fetch_add(1, Ordering::Relaxed);
                    handle(Job {
                        conn: conn.clone(),
                        inc,
                    });
                } else {
                    jobs.push(&conn, inc);
                }
            }
            Ok(None) => break,
            Err(e) => {
                if !shared.stopping.load(Ordering::SeqCst) {
                    tracing::info!("connection {} dropped: {e}", conn.peer);
                    shared
                        .stats
                        .failed_connections
                        .fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
        }
    }
    conn.replier.close();
    tracing::debug!("connection from {} closed", conn.peer);
}

/// What serving a request needs and reuses from request to request on one thread, so that
/// reads and writes allocate nothing here: the reply header, and the vectors of a read's
/// pool buffers.
#[derive(Default)]
struct Scratch {
    header: Vec<u8>,
    span: Vec<IobufMut>,
    payload: Vec<Iobuf>,
    /// A read reply's payload as a file range (file, offset, length), set by
    /// [`file_range`] instead of `payload`.
    range: Option<(Arc<OpenFile>, u64, usize)>,
}

impl Scratch {
    /// Room for the usual request (a short header, a few buffers), so that even a thread's
    /// first request allocates nothing here.
    fn new() -> Scratch {
        Scratch {
            header: Vec::with_capacity(64),
            span: Vec::with_capacity(16),
            payload: Vec::with_capacity(16),
            range: None,
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

/// Makes this thread's scratch now (a serving thread calls it when it starts), not at its
/// first request.
fn warm_scratch() {
    SCRATCH.with(|_| {});
}

fn handle(job: Job) {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => handle_with(job, &mut s),
        // Not reached (serving never nests); correct anyway.
        Err(_) => handle_with(job, &mut Scratch::default()),
    });
}

/// The span every request is served in, on a worker or the receiving thread: logs follow a
/// request by its peer and id; `op` is recorded once the header is decoded.
fn request_span(peer: &str, id: u64) -> tracing::Span {
    tracing::debug_span!("request", peer = %peer, id = id, op = tracing::field::Empty)
}

fn handle_with(job: Job, scratch: &mut Scratch) {
    let Job { conn, inc } = job;
    let shared = conn.shared.clone();
    let req_span = request_span(&conn.peer, inc.id).entered();
    let decoded = Req::decode(&inc.header);
    if let Ok(req) = &decoded {
        req_span.record("op", req.name());
    }
    let (header, payload) = match decoded {
        Ok(req) => match execute_guarded(&conn, &req, &inc, scratch) {
            Ok((resp, payload)) => {
                let mut h = std::mem::take(&mut scratch.header);
                proto::encode_ok_into(&resp, &mut h);
                (h, payload)
            }
            Err(e) => {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(code = e.code, message = %e.message, "request failed");
                (proto::encode_err(e.code, &e.message), Vec::new())
            }
        },
        Err(e) => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            (
                proto::encode_err(Status::BadRequest as u32, &e.to_string()),
                Vec::new(),
            )
        }
    };
    finish(&conn, inc, header, payload, scratch);
    drop(req_span);
}

/// Answers `inc` with `header` and `payload` (or the file range left in the scratch), after
/// giving the request back, and releases its permit.
fn finish(conn: &Conn, inc: Incoming, header: Vec<u8>, payload: Vec<Iobuf>, scratch: &mut Scratch) {
    let shared = &conn.shared;
    // Give the request back (its payload buffers to the pool, its vectors to the transport)
    // before replying: once the client has the reply it may send the next request, which
    // then finds them. Its payload bytes leave the connection's budget with it.
    let id = inc.id;
    conn.replier.recycle(inc);
    conn.admission.release(id);
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let sent = match scratch.range.take() {
        Some((f, offset, len)) => {
            shared
                .stats
                .file_range_replies
                .fetch_add(1, Ordering::Relaxed);
            let range = FileRange {
                file: &f.file,
                offset,
                len,
            };
            conn.replier.reply_file(id, &header, range)
        }
        None => conn.replier.reply(id, &header, &payload),
    };
    match sent {
        Ok(()) => tracing::debug!("replied"),
        Err(e) => {
            tracing::debug!("reply to {} failed: {e}", conn.peer);
            conn.replier.close();
        }
    }
    if conn.close_after_reply.load(Ordering::SeqCst) {
        tracing::info!(
            "connection from {} closed: {MAX_UNAUTHED_REFUSALS} requests before authentication",
            conn.peer
        );
        conn.replier.close();
    }
    shared.replied.fetch_add(1, Ordering::SeqCst);
    // Keep the vectors for the next request: the buffers go back to the pool now.
    let mut payload = payload;
    payload.clear();
    if payload.capacity() > scratch.payload.capacity() {
        scratch.payload = payload;
    }
    if header.capacity() > scratch.header.capacity() {
        scratch.header = header;
    }
    conn.permits.release();
}

/// Reads up to this many bytes are served on the receiving thread when the page cache
/// holds them ([`serve_cached_read`]).
const CACHED_READ_MAX: usize = 16 << 10;

/// Serves `inc` on this (the receiving) thread if it is a read of at most
/// [`CACHED_READ_MAX`] bytes of a buffered file, from an authenticated connection, whose
/// bytes are all in the page cache: `preadv2(RWF_NOWAIT)` into pool buffers (one copy of a
/// few KiB, cheaper than the `fstat`, `sendmsg` and `sendfile` of a file-range reply) and
/// the reply, which never waits for the client (the transport queues what the socket does
/// not take). Anything else, a read that would block included, comes back for the usual
/// path. Returns `None` once served.
fn serve_cached_read(conn: &Conn, inc: Incoming) -> Option<Incoming> {
    if !conn.authed.load(Ordering::SeqCst) || !inc.payload.is_empty() {
        return Some(inc);
    }
    let Ok(Req::Read { fh, offset, len }) = Req::decode(&inc.header) else {
        return Some(inc);
    };
    let shared = &conn.shared;
    let want = (len as usize)
        .min(inc.reply_capacity)
        .min(shared.cfg.limits.max_payload);
    if want == 0
        || want > CACHED_READ_MAX
        || i64::try_from(offset.saturating_add(want as u64)).is_err()
    {
        return Some(inc);
    }
    let Ok(f) = file(conn, fh) else {
        return Some(inc);
    };
    if !f.rangeable {
        return Some(inc);
    }
    SCRATCH.with(|s| {
        let Ok(mut scratch) = s.try_borrow_mut() else {
            return Some(inc);
        };
        let scratch = &mut *scratch;
        let got = matches!(
            shared.pool.try_get_span_into(want, &mut scratch.span),
            Ok(true)
        );
        if !got || !fill_nowait(&f.file, offset, want, &mut scratch.span) {
            // The buffers go back to the pool; a worker (or the inline path) reads it.
            scratch.span.clear();
            return Some(inc);
        }
        // The span a worker's request has (logs follow a request by id either way).
        let req_span = request_span(&conn.peer, inc.id).entered();
        req_span.record("op", "read");
        let mut payload = std::mem::take(&mut scratch.payload);
        payload.clear();
        payload.extend(scratch.span.drain(..).map(IobufMut::freeze));
        shared.stats.reads.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .read_bytes
            .fetch_add(want as u64, Ordering::Relaxed);
        shared
            .stats
            .pool_read_replies
            .fetch_add(1, Ordering::Relaxed);
        let mut header = std::mem::take(&mut scratch.header);
        proto::encode_ok_into(
            &Resp::Read {
                len: want as u32,
                eof: false,
            },
            &mut header,
        );
        finish(conn, inc, header, payload, scratch);
        drop(req_span);
        None
    })
}

/// Whether `inc` is a write to serve on the receiving thread, at any depth: its payload is
/// in, from an authenticated connection, to a writable file opened without `O_DIRECT`.
/// Such a `pwritev` copies into the page cache and returns; a hand-off to a worker (a
/// futex wake-up, two context switches, the payload's cache lines read on another CPU)
/// costs more than it saves on a write that size. `pwritev2(RWF_NOWAIT)` would tell a
/// write that would block from one that will not, but ext4 refuses it for buffered writes
/// (`EOPNOTSUPP`, Linux 6.18), so the write is made plainly: it can block only where the
/// kernel throttles a writer that dirties pages faster than they are written back
/// (`balance_dirty_pages`), and then stalling that connection's receiving is the
/// back-pressure its client should get (the workers would be stalled by it alike).
/// Anything else (an error, a bad handle: the usual path reports it) goes the usual way.
fn inline_write(conn: &Conn, inc: &Incoming) -> bool {
    if inc.payload.is_empty() || !conn.authed.load(Ordering::SeqCst) {
        return false;
    }
    let Ok(Req::Write { fh, .. }) = Req::decode(&inc.header) else {
        return false;
    };
    matches!(file(conn, fh), Ok(f) if f.writable && f.buffered)
}

/// Fills `bufs` with exactly `want` bytes of `f` from `offset` with one
/// `preadv2(RWF_NOWAIT)`, trimming them to it (the buffers past it go back to the pool):
/// true only when every byte came from the page cache at once. False when any would need
/// the disk (`EAGAIN`), the file ends first (a short read: the usual path tells the end of
/// the file from a partly cached range), the file system does not take the flag, or any
/// other error (the usual path reports it).
fn fill_nowait(f: &File, offset: u64, want: usize, bufs: &mut Vec<IobufMut>) -> bool {
    if bufs.len() > STACK_IOV {
        return false;
    }
    let mut left = want;
    let mut stack: [IoSliceMut<'_>; STACK_IOV] = std::array::from_fn(|_| IoSliceMut::new(&mut []));
    let mut k = 0;
    for (d, b) in stack.iter_mut().zip(bufs.iter_mut()) {
        if left == 0 {
            break;
        }
        let n = b.len().min(left);
        left -= n;
        *d = IoSliceMut::new(&mut b[..n]);
        k += 1;
    }
    let read = rustix::io::preadv2(
        f,
        &mut stack[..k],
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    if !matches!(read, Ok(n) if n == want) {
        return false;
    }
    let mut left = want;
    bufs.retain_mut(|b| {
        let n = b.len().min(left);
        left -= n;
        b.set_len(n);
        n > 0
    });
    true
}

/// [`execute`], with a panic turned into that request's error: the worker, the
/// connection and its slot carry on (locks recover from poisoning, see [`lock`]).
fn execute_guarded(
    conn: &Conn,
    req: &Req,
    inc: &Incoming,
    scratch: &mut Scratch,
) -> Result<(Resp, Vec<Iobuf>), OpError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute(conn, req, inc, scratch)
    })) {
        Ok(r) => r,
        Err(p) => {
            // Buffers a half-done read left in the scratch go back to the pool.
            scratch.span.clear();
            scratch.payload.clear();
            conn.shared.stats.panics.fetch_add(1, Ordering::Relaxed);
            let msg = panic_message(&*p);
            tracing::error!("serving {} from {} panicked: {msg}", req.name(), conn.peer);
            Err(OpError::new(
                nix::errno::Errno::EIO as i32 as u32,
                format!("{}: internal server error (a panic: {msg})", req.name()),
            ))
        }
    }
}

/// Takes one unit of `counter` if it is below `limit`, in one atomic step.
fn take_below(counter: &AtomicUsize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

fn file(conn: &Conn, fh: u64) -> Result<Arc<OpenFile>, OpError> {
    lock(&conn.files).get(&fh).cloned().ok_or_else(|| {
        OpError::new(
            Status::BadHandle as u32,
            format!("no open file handle {fh}"),
        )
    })
}

fn errno_of(e: nix::errno::Errno, what: &str) -> OpError {
    OpError::new(e as i32 as u32, format!("{what}: {}", e.desc()))
}

fn execute(
    conn: &Conn,
    req: &Req,
    inc: &Incoming,
    scratch: &mut Scratch,
) -> Result<(Resp, Vec<Iobuf>), OpError> {
    let shared = &conn.shared;
    let cfg = &shared.cfg;
    #[cfg(test)]
    if matches!(req, Req::Stat { path } if path == tests::PANIC_PATH) {
        panic!("a panic while serving, on purpose (test)");
    }
    match req {
        Req::Hello {
            version,
            client_nonce,
        } => {
            if *version != proto::VERSION {
                return Err(OpError::new(
                    Status::BadRequest as u32,
                    format!(
                        "protocol version {version} not supported (server speaks {})",
                        proto::VERSION
                    ),
                ));
            }
            let mut sn = [0u8; NONCE_LEN];
            rand::Rng::fill(&mut rand::thread_rng(), &mut sn[..]);
            *lock(&conn.hello) = Some((*client_nonce, sn));
            let auth_required = !cfg.server.token.is_empty();
            if !auth_required {
                conn.authenticate();
            }
            return Ok((
                Resp::Hello(HelloReply {
                    version: proto::VERSION,
                    server_nonce: sn,
                    auth_required,
                    read_only: shared.export.read_only(),
                    max_segments: cfg.limits.max_segments as u32,
                    max_payload: cfg.limits.max_payload as u32,
                    max_in_flight: cfg.server.max_in_flight as u32,
                }),
                Vec::new(),
            ));
        }
        Req::Auth { mac } => {
            let Some((cn, sn)) = *lock(&conn.hello) else {
                return Err(OpError::new(
                    Status::AuthRequired as u32,
                    "auth before hello",
                ));
            };
            let token = cfg.server.token.as_bytes();
            if token.is_empty() {
                return Ok((
                    Resp::Auth {
                        mac: [0; proto::MAC_LEN],
                    },
                    Vec::new(),
                ));
            }
            let key = peer_key(&conn.peer);
            let now = Instant::now();
            if let Some(wait) = lock(&shared.auth_failures).backoff(&key, now) {
                // Refused unchecked: a guess costs its address the whole back-off.
                *lock(&conn.hello) = None;
                shared.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                return Err(OpError::new(
                    Status::AuthRequired as u32,
                    format!(
                        "authentication refused: failed attempts from {key}; try again in {} ms",
                        wait.as_millis().max(1)
                    ),
                ));
            }
            if !proto::mac_eq(mac, &proto::client_mac(token, &cn, &sn)) {
                // One try per hello: a new hello (new nonce) is needed to try again.
                *lock(&conn.hello) = None;
                shared.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                let (n, wait) = lock(&shared.auth_failures).failed(&key, now);
                tracing::warn!(
                    "authentication from {} failed (wrong token; {n} in a row from {key}): further attempts from {key} refused for {wait:?}",
                    conn.peer
                );
                return Err(OpError::new(Status::AuthRequired as u32, "wrong token"));
            }
            lock(&shared.auth_failures).succeeded(&key);
            conn.authenticate();
            return Ok((
                Resp::Auth {
                    mac: proto::server_mac(token, &cn, &sn),
                },
                Vec::new(),
            ));
        }
        _ => {}
    }
    if !conn.authed.load(Ordering::SeqCst) {
        if conn.unauthed_refusals.fetch_add(1, Ordering::SeqCst) + 1 >= MAX_UNAUTHED_REFUSALS {
            conn.close_after_reply.store(true, Ordering::SeqCst);
        }
        return Err(OpError::new(
            Status::AuthRequired as u32,
            format!(
                "{} refused: hello and authentication come first",
                req.name()
            ),
        ));
    }
    match req {
        Req::Open { path, flags, mode } => {
            // Both limits are checked and taken in one step each, before the open, so
            // concurrent opens cannot pass them; given back if the open fails.
            if !take_below(&conn.open_count, cfg.server.max_open_files) {
                return Err(OpError::new(
                    Status::Limit as u32,
                    format!(
                        "open {path:?}: this connection already has {} files open (server.max_open_files)",
                        cfg.server.max_open_files
                    ),
                ));
            }
            if !take_below(&shared.stats.open_files, cfg.server.max_open_files_total) {
                conn.open_count.fetch_sub(1, Ordering::SeqCst);
                return Err(OpError::new(
                    Status::Limit as u32,
                    format!(
                        "open {path:?}: the server has {} files open, its limit (server.max_open_files_total)",
                        cfg.server.max_open_files_total
                    ),
                ));
            }
            let opened = shared
                .export
                .open(path, *flags, *mode)
                .and_then(|(f, direct)| Ok((Export::fstat(&f)?.size, f, direct)));
            let (size, f, direct) = match opened {
                Ok(v) => v,
                Err(e) => {
                    conn.open_count.fetch_sub(1, Ordering::SeqCst);
                    shared.stats.open_files.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            };
            let writable = flags.contains(proto::OpenFlags::WRITE);
            // Without READ the file is opened write-only; EBADF comes from `preadv` then.
            let rangeable = !direct && flags.contains(proto::OpenFlags::READ);
            let fh = conn.next_fh.fetch_add(1, Ordering::Relaxed);
            lock(&conn.files).insert(
                fh,
                Arc::new(OpenFile {
                    file: f,
                    writable,
                    rangeable,
                    buffered: !direct,
                }),
            );
            Ok((Resp::Open { fh, size }, Vec::new()))
        }
        Req::Read { fh, offset, len } => {
            let f = file(conn, *fh)?;
            let want = (*len as usize)
                .min(inc.reply_capacity)
                .min(cfg.limits.max_payload);
            let r = if f.rangeable && want > 0 && conn.replier.takes_file_ranges() {
                file_range(f, *offset, want, scratch)?
            } else {
                let r = read_into_pool(&shared.pool, &f.file, *offset, want, scratch)?;
                if !r.1.is_empty() {
                    let kind = &shared.stats.pool_read_replies;
                    kind.fetch_add(1, Ordering::Relaxed);
                }
                r
            };
            if let Resp::Read { len, .. } = r.0 {
                shared.stats.reads.fetch_add(1, Ordering::Relaxed);
                shared
                    .stats
                    .read_bytes
                    .fetch_add(u64::from(len), Ordering::Relaxed);
            }
            Ok(r)
        }
        Req::Write { fh, offset } => {
            let f = file(conn, *fh)?;
            if !f.writable {
                return Err(errno_of(
                    nix::errno::Errno::EBADF,
                    "write to a file not opened for writing",
                ));
            }
            let written = write_from_pool(&f.file, *offset, &inc.payload)?;
            shared.stats.writes.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .write_bytes
                .fetch_add(written as u64, Ordering::Relaxed);
            Ok((
                Resp::Write {
                    written: written as u32,
                },
                Vec::new(),
            ))
        }
        Req::Fsync { fh, datasync } => {
            let f = file(conn, *fh)?;
            let r = if *datasync {
                f.file.sync_data()
            } else {
                f.file.sync_all()
            };
            r.map_err(|e| {
                OpError::new(e.raw_os_error().unwrap_or(5) as u32, format!("fsync: {e}"))
            })?;
            Ok((Resp::Ok, Vec::new()))
        }
        Req::Stat { path } => Ok((Resp::Stat(shared.export.stat(path)?), Vec::new())),
        Req::Fstat { fh } => Ok((
            Resp::Stat(Export::fstat(&file(conn, *fh)?.file)?),
            Vec::new(),
        )),
        Req::Truncate { fh, len } => {
            let f = file(conn, *fh)?;
            if shared.export.read_only() || !f.writable {
                return Err(OpError::new(
                    Status::ReadOnly as u32,
                    "truncate: file not opened for writing",
                ));
            }
            f.file.set_len(*len).map_err(|e| {
                OpError::new(
                    e.raw_os_error().unwrap_or(5) as u32,
                    format!("truncate: {e}"),
                )
            })?;
            Ok((Resp::Ok, Vec::new()))
        }
        Req::Close { fh } => {
            let Some(of) = lock(&conn.files).remove(fh) else {
                return Err(OpError::new(
                    Status::BadHandle as u32,
                    format!("no open file handle {fh}"),
                ));
            };
            conn.open_count.fetch_sub(1, Ordering::SeqCst);
            shared.stats.open_files.fetch_sub(1, Ordering::SeqCst);
            // The last holder closes the descriptor here, and a failed close(2) (a write
            // error reported late, as NFS does) is the client's error, not lost. A read
            // still running on the file closes it when it is done instead.
            if let Ok(of) = Arc::try_unwrap(of) {
                close_reporting(of.file)?;
            }
            Ok((Resp::Ok, Vec::new()))
        }
        Req::Unlink { path } => {
            shared.export.unlink(path)?;
            Ok((Resp::Ok, Vec::new()))
        }
        Req::Mkdir { path, mode } => {
            shared.export.mkdir(path, *mode)?;
            Ok((Resp::Ok, Vec::new()))
        }
        Req::List { path, cookie } => {
            let budget = inc
                .reply_capacity
                .min(shared.pool.max_buffer_size())
                .min(cfg.limits.max_payload);
            let (entries, done) = shared.export.list(path, *cookie, budget)?;
            let mut bytes = Vec::with_capacity(budget.min(64 << 10));
            for e in &entries {
                proto::encode_dirent(&mut bytes, e);
            }
            let mut buf = shared
                .pool
                .get(bytes.len().max(1))
                .map_err(|e| OpError::new(Status::Busy as u32, e.to_string()))?;
            buf.set_len(bytes.len());
            buf.copy_from_slice(&bytes);
            Ok((
                Resp::List {
                    count: entries.len() as u32,
                    next_cookie: cookie + entries.len() as u64,
                    done,
                },
                vec![buf.freeze()],
            ))
        }
        Req::Hello { .. } | Req::Auth { .. } => {
            Err(OpError::new(Status::BadRequest as u32, "unreachable"))
        }
        // The operations a mounted file system needs: `fsops.rs`.
        other => fsops::execute(conn, other, inc),
    }
}

/// A read answered with a file range: the bytes of `want` at `offset` that the file holds
/// now (`fstat`), left in the scratch for [`handle_with`] to pass to
/// [`Replier::reply_file`].
fn file_range(
    f: Arc<OpenFile>,
    offset: u64,
    want: usize,
    scratch: &mut Scratch,
) -> Result<(Resp, Vec<Iobuf>), OpError> {
    let size = nix::sys::stat::fstat(&f.file)
        .map_err(|e| errno_of(e, "fstat"))?
        .st_size;
    let size = u64::try_from(size).unwrap_or(0);
    let len = size.saturating_sub(offset).min(want as u64) as usize;
    i64::try_from(offset.saturating_add(len as u64))
        .map_err(|_| errno_of(nix::errno::Errno::EINVAL, "read offset"))?;
    let eof = len < want;
    if len > 0 {
        scratch.range = Some((f, offset, len));
    }
    Ok((
        Resp::Read {
            len: len as u32,
            eof,
        },
        std::mem::take(&mut scratch.payload),
    ))
}

/// Closes `f`, returning close(2)'s error (which `File`'s drop ignores).
fn close_reporting(f: File) -> Result<(), OpError> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // close(2) releases the descriptor even when it fails: never retried.
    nix::unistd::close(fd).map_err(|e| errno_of(e, "close"))
}

/// Iovecs on the stack up to this many buffers; a vector beyond.
const STACK_IOV: usize = 8;

/// Reads up to `want` bytes at `offset` into pool buffers (the thread's scratch vectors)
/// and returns the reply with the buffers, trimmed to what was read.
fn read_into_pool(
    pool: &Pool,
    f: &File,
    offset: u64,
    want: usize,
    scratch: &mut Scratch,
) -> Result<(Resp, Vec<Iobuf>), OpError> {
    if want == 0 {
        return Ok((Resp::Read { len: 0, eof: false }, Vec::new()));
    }
    let bufs = &mut scratch.span;
    pool.get_span_within_into(want, pool.wait_timeout(), bufs)
        .map_err(|e| OpError::new(Status::Busy as u32, e.to_string()))?;
    let (done, eof) = match fill_from_file(f, offset, want, bufs) {
        Ok(v) => v,
        Err(e) => {
            // The buffers go back to the pool, not to sit in this thread's scratch.
            bufs.clear();
            return Err(e);
        }
    };
    // Trim the buffers to what was read; the unused ones go back to the pool.
    let mut left = done;
    let mut out = std::mem::take(&mut scratch.payload);
    out.clear();
    for mut b in bufs.drain(..) {
        if left == 0 {
            break;
        }
        let n = b.len().min(left);
        b.set_len(n);
        left -= n;
        out.push(b.freeze());
    }
    Ok((
        Resp::Read {
            len: done as u32,
            eof,
        },
        out,
    ))
}

/// Reads up to `want` bytes at `offset` into `bufs` with `preadv`, straight into the pool
/// buffers; returns the bytes read and whether the end of the file came first.
fn fill_from_file(
    f: &File,
    offset: u64,
    want: usize,
    bufs: &mut [IobufMut],
) -> Result<(usize, bool), OpError> {
    let mut done = 0usize;
    while done < want {
        let off = i64::try_from(offset.saturating_add(done as u64))
            .map_err(|_| errno_of(nix::errno::Errno::EINVAL, "read offset"))?;
        let (first, skip) = resume_at(bufs.iter().map(|b| b.len()), done);
        let rest = &mut bufs[first..];
        let count = rest.len();
        let slices = rest
            .iter_mut()
            .enumerate()
            .map(|(k, b)| IoSliceMut::new(if k == 0 { &mut b[skip..] } else { &mut b[..] }));
        let r = if count <= STACK_IOV {
            let mut stack: [IoSliceMut<'_>; STACK_IOV] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            for (d, s) in stack.iter_mut().zip(slices) {
                *d = s;
            }
            preadv(f, &mut stack[..count], off)
        } else {
            preadv(f, &mut slices.collect::<Vec<_>>(), off)
        };
        match r {
            Ok(0) => return Ok((done, true)),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(errno_of(e, "read")),
        }
    }
    Ok((done, false))
}

/// Where a vectored transfer over buffers of lengths `lens` resumes after `done` bytes: the
/// first buffer not yet complete, and the bytes of it already done.
fn resume_at(lens: impl Iterator<Item = usize>, done: usize) -> (usize, usize) {
    let mut skip = done;
    let mut first = 0;
    for len in lens {
        if skip < len {
            break;
        }
        skip -= len;
        first += 1;
    }
    (first, skip)
}

/// Writes the payload at `offset` with `pwritev` straight from the pool buffers.
fn write_from_pool(f: &File, offset: u64, payload: &[Iobuf]) -> Result<usize, OpError> {
    let total: usize = payload.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    while done < total {
        let off = i64::try_from(offset.saturating_add(done as u64))
            .map_err(|_| errno_of(nix::errno::Errno::EINVAL, "write offset"))?;
        let (first, skip) = resume_at(payload.iter().map(|b| b.len()), done);
        let rest = &payload[first..];
        let slices = rest
            .iter()
            .enumerate()
            .map(|(k, b)| IoSlice::new(if k == 0 { &b[skip..] } else { &b[..] }));
        let r = if rest.len() <= STACK_IOV {
            let mut stack = [IoSlice::new(&[]); STACK_IOV];
            for (d, s) in stack.iter_mut().zip(slices) {
                *d = s;
            }
            pwritev(f, &stack[..rest.len()], off)
        } else {
            pwritev(f, &slices.collect::<Vec<_>>(), off)
        };
        match r {
            // Bytes already written are reported (a short write), not hidden behind the
            // error; the client sees fewer bytes written than it sent.
            Ok(0) if done > 0 => return Ok(done),
            Ok(0) => return Err(errno_of(nix::errno::Errno::EIO, "write made no progress")),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) if done > 0 => return Ok(done),
            Err(e) => return Err(errno_of(e, "write")),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    /// `stat` of this path panics in the server (tests only).
    pub(super) const PANIC_PATH: &str = "zcio-test-panic";

    fn mem_server(
        tweak: impl FnOnce(&mut Config),
    ) -> (
        tempfile::TempDir,
        ServerHandle,
        Arc<crate::transport::mem::MemListener>,
        Config,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.server.export = dir.path().to_path_buf();
        cfg.server.workers = 2;
        cfg.pool.classes.iter_mut().for_each(|c| {
            c.count = c.count.min(64);
            c.reserve = c.reserve.min(8);
        });
        tweak(&mut cfg);
        let pool = Pool::new(&cfg.pool).unwrap();
        let limits = crate::transport::Limits {
            max_segments: cfg.limits.max_segments,
            max_payload: cfg.limits.max_payload,
            max_header: crate::transport::MAX_HEADER,
            max_in_flight: 64,
            inline_threshold: 0,
            rdma_payload: false,
        };
        let l = crate::transport::mem::MemListener::new(pool.clone(), limits);
        let srv = Server::with_listener(&cfg, l.clone(), pool)
            .unwrap()
            .spawn()
            .unwrap();
        (dir, srv, l, cfg)
    }

    fn mem_client(l: &crate::transport::mem::MemListener, cfg: &Config) -> crate::Client {
        let pool = Pool::new(&cfg.pool).unwrap();
        crate::Client::from_conn(cfg, l.connect().unwrap(), pool).unwrap()
    }

    #[test]
    fn a_panic_fails_its_request_only_never_a_worker_or_a_slot() {
        let (dir, srv, l, cfg) = mem_server(|c| c.server.max_connections = 2);
        std::fs::write(dir.path().join("f"), b"still served").unwrap();
        let c = mem_client(&l, &cfg);
        // More panics than workers, concurrently (async reads keep workers busy too).
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || c.stat(PANIC_PATH))
            })
            .collect();
        for t in threads {
            match t.join().unwrap() {
                Err(Error::Remote { code, message, .. }) => {
                    assert_eq!(code, nix::errno::Errno::EIO as i32 as u32);
                    assert!(message.contains("internal server error"), "{message}");
                }
                other => panic!("a panicking request answered {other:?}"),
            }
        }
        assert_eq!(srv.stats().panics.load(Ordering::SeqCst), 6);
        // The same connection, the workers and both slots still serve.
        let f = c.open("f", proto::OpenFlags::READ).unwrap();
        let mut b = [0u8; 12];
        assert_eq!(f.pread(&mut b, 0).unwrap(), 12);
        assert_eq!(&b, b"still served");
        let c2 = mem_client(&l, &cfg);
        assert_eq!(c2.stat("f").unwrap().size, 12);
    }

    #[test]
    fn a_connection_that_keeps_skipping_authentication_is_closed() {
        let (_dir, _srv, l, _cfg) = mem_server(|_| {});
        let conn = l.connect().unwrap();
        let stat = Req::Stat { path: "x".into() }.encode();
        let mut refused = 0;
        for _ in 0..MAX_UNAUTHED_REFUSALS + 4 {
            let r = conn
                .start(crate::transport::Request {
                    header: stat.clone(),
                    ..Default::default()
                })
                .and_then(|p| p.wait());
            match r {
                Ok(reply) => {
                    let e = proto::decode_reply(&Req::Stat { path: "x".into() }, &reply.header);
                    assert!(
                        matches!(e, Err(Error::Remote { code, .. }) if code == Status::AuthRequired as u32),
                        "{e:?}"
                    );
                    refused += 1;
                }
                Err(_) => break,
            }
        }
        assert_eq!(refused, MAX_UNAUTHED_REFUSALS);
    }

    #[test]
    fn created_modes_are_permission_bits_less_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _srv, l, cfg) = mem_server(|c| c.server.umask = 0o027);
        let c = mem_client(&l, &cfg);
        let rw = proto::OpenFlags::rw() | proto::OpenFlags::CREATE;
        c.open_mode("suid", rw, 0o6777).unwrap().close().unwrap();
        c.open_mode("sticky", rw, 0o1666).unwrap().close().unwrap();
        c.open_mode("default", rw, 0).unwrap().close().unwrap();
        let mode = |n: &str| {
            std::fs::metadata(dir.path().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        // The process umask (0o022 in most shells) may clear more; never less.
        assert_eq!(mode("suid") & !0o750, 0, "{:o}", mode("suid"));
        assert_eq!(mode("sticky") & !0o640, 0, "{:o}", mode("sticky"));
        assert_eq!(mode("default") & !0o640, 0, "{:o}", mode("default"));
        assert_eq!(mode("suid") & 0o7000, 0);
    }

    #[test]
    fn the_open_file_limits_hold_under_concurrent_opens() {
        let (dir, srv, l, cfg) = mem_server(|c| {
            c.server.max_open_files = 5;
            c.server.max_open_files_total = 7;
            c.server.workers = 4;
        });
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let (a, b) = (mem_client(&l, &cfg), mem_client(&l, &cfg));
        let opened: Vec<_> = [a, b]
            .into_iter()
            .flat_map(|c| {
                (0..8).map(move |_| {
                    let c = c.clone();
                    std::thread::spawn(move || c.open("f", proto::OpenFlags::READ).ok())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        // 2 x 5 per connection would be 10: the server-wide 7 binds, exactly.
        assert_eq!(opened.len(), 7);
        assert_eq!(srv.open_files(), 7);
        drop(opened);
    }

    /// A pool of 4 KiB buffers only, so a read spans many of them.
    fn small_pool() -> Pool {
        Pool::new(&crate::pool::PoolConfig {
            classes: vec![crate::pool::ClassConfig {
                size: 4096,
                count: 64,
                reserve: 0,
                arena_slots: 64,
            }],
            wait_timeout: Duration::from_secs(5),
            stripes: 1,
        })
        .unwrap()
    }

    fn file_with(data: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, f)
    }

    #[test]
    fn reads_and_writes_span_many_buffers_on_the_stack_and_beyond() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (_dir, f) = file_with(&data);
        let pool = small_pool();
        let mut scratch = Scratch::default();
        // 3 buffers (iovecs on the stack) from offset 1000, then 16 (a vector) past the end.
        for (offset, want) in [(1000u64, 12_000usize), (0, 16 * 4096)] {
            let (resp, bufs) = read_into_pool(&pool, &f, offset, want, &mut scratch).unwrap();
            let got: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let end = (offset as usize + want).min(data.len());
            assert_eq!(got, data[offset as usize..end], "read at {offset}");
            let eof = offset as usize + want > data.len();
            assert!(
                matches!(resp, Resp::Read { len, eof: e } if len as usize == got.len() && e == eof)
            );
            // The scratch keeps no buffer: only what the reply holds is out of the pool.
            assert!(scratch.span.is_empty());
            assert_eq!(pool.stats().slots_in_use(), bufs.len());
        }
        assert_eq!(pool.stats().slots_in_use(), 0);
        // Writes from 2 and from 12 buffers, at an offset.
        for n in [2usize, 12] {
            let bufs: Vec<Iobuf> = (0..n)
                .map(|i| {
                    let mut b = pool.get(4096).unwrap();
                    b.fill(i as u8 + 1);
                    b.freeze()
                })
                .collect();
            assert_eq!(write_from_pool(&f, 100, &bufs).unwrap(), n * 4096);
            let mut back = vec![0u8; n * 4096];
            nix::sys::uio::pread(&f, &mut back, 100).unwrap();
            for (i, chunk) in back.chunks(4096).enumerate() {
                assert!(
                    chunk.iter().all(|&x| x == i as u8 + 1),
                    "write {n}: buffer {i}"
                );
            }
        }
    }

    struct Fake(Mutex<ConnQueue>);

    impl Queued for Fake {
        fn queue(&self) -> &Mutex<ConnQueue> {
            &self.0
        }
    }

    fn request(id: u64) -> Incoming {
        Incoming {
            id,
            header: Vec::new(),
            payload: Vec::new(),
            reply_capacity: 0,
        }
    }

    #[test]
    fn one_connection_s_queue_reaches_every_idle_worker() {
        let sched = Arc::new(Scheduler::<Fake>::new());
        let (tx, rx) = channel();
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (sched, tx) = (sched.clone(), tx.clone());
                std::thread::spawn(move || {
                    // Each worker takes one request and holds it (a long job).
                    if let Some((_, inc)) = sched.pop() {
                        tx.send(inc.id).unwrap();
                    }
                })
            })
            .collect();
        // Let the workers go to sleep on an empty scheduler.
        std::thread::sleep(Duration::from_millis(50));
        let conn = Arc::new(Fake(Mutex::new(ConnQueue::default())));
        for id in 0..3 {
            sched.push(&conn, request(id));
        }
        let mut got: Vec<u64> = (0..3)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(20))
                    .expect("a queued request left waiting while a worker idles")
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
        sched.close();
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn connections_take_turns() {
        let sched = Scheduler::<Fake>::new();
        let a = Arc::new(Fake(Mutex::new(ConnQueue::default())));
        let b = Arc::new(Fake(Mutex::new(ConnQueue::default())));
        for id in 0..3 {
            sched.push(&a, request(id));
        }
        sched.push(&b, request(10));
        let order: Vec<u64> = (0..4).map(|_| sched.pop().unwrap().1.id).collect();
        assert_eq!(order, [0, 10, 1, 2]);
        sched.close();
        assert!(sched.pop().is_none());
    }
}
