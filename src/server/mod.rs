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
//! hand-off less for a synchronous client. Only regular files are opened: a FIFO or device
//! node in the export is refused without blocking. A connection's open files are closed
//! when it goes away, however it goes.
//!
//! A read of a file opened without `O_DIRECT` is answered with a file range
//! ([`crate::transport::FileRange`]) when the transport takes them (TCP sends it from the
//! page cache with `sendfile`: no user-space copy on the server); otherwise, and for
//! `O_DIRECT` files, the data is read into pool buffers first (RDMA writes from them).

mod export;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;

use nix::sys::uio::{preadv, pwritev};

use self::export::{Export, OpError};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lock;
use crate::pool::{Iobuf, IobufMut, Pool};
use crate::proto::{self, HelloReply, Req, Resp, Status, NONCE_LEN};
use crate::transport::{FileRange, Incoming, Listener, Registry, Replier, ServerConn, Transport};

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused because the server was full.
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
    /// Requests served on their connection's receiving thread (alone in the server when
    /// they arrived) rather than handed to the workers.
    pub served_inline: AtomicU64,
    /// Read replies with data whose payload the transport sent as a file range (from the
    /// page cache, no copy into pool buffers).
    pub file_range_replies: AtomicU64,
    /// Read replies with data whose payload was read into pool buffers first (a transport
    /// that takes no file ranges, or an `O_DIRECT` file).
    pub pool_read_replies: AtomicU64,
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
                ready: std::collections::VecDeque::new(),
                closed: false,
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
        if schedule {
            lock(&self.ready).ready.push_back(conn.clone());
        }
        // Every request may take an idle worker, also when its connection is already in
        // line: else one connection's queue would be worked by one worker at a time. (A
        // worker only waits when no connection is in line, so a request queued while all
        // were busy is taken by the next one to finish, without a wake-up.)
        self.cond.notify_one();
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
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
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
    free: Mutex<usize>,
    cond: Condvar,
}

impl Permits {
    fn acquire(&self) {
        let mut f = lock(&self.free);
        while *f == 0 {
            f = self.cond.wait(f).unwrap_or_else(|p| p.into_inner());
        }
        *f -= 1;
    }
    fn release(&self) {
        *lock(&self.free) += 1;
        self.cond.notify_one();
    }

    fn available(&self) -> usize {
        *lock(&self.free)
    }
}

struct OpenFile {
    file: File,
    writable: bool,
    /// Reads may be answered with a file range: opened for reading, without `O_DIRECT`.
    rangeable: bool,
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
    permits: Permits,
    queue: Mutex<ConnQueue>,
    shared: Arc<Shared>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let n = lock(&self.files).len();
        self.shared.stats.open_files.fetch_sub(n, Ordering::Relaxed);
    }
}

struct Shared {
    cfg: Config,
    pool: Pool,
    export: Export,
    stats: ServerStats,
    conns: Mutex<Vec<Weak<Conn>>>,
    stopping: AtomicBool,
}

/// A server bound to its listener, not yet serving.
pub struct Server {
    shared: Arc<Shared>,
    listener: Arc<dyn Listener>,
}

/// A server running on background threads.
pub struct ServerHandle {
    shared: Arc<Shared>,
    listener: Arc<dyn Listener>,
    accept: Option<JoinHandle<()>>,
    addr: String,
}

impl Server {
    /// Binds the transport named in `cfg` (looked up in `registry`), with a new pool.
    pub fn bind(cfg: &Config, registry: &Registry) -> Result<Server> {
        let pool = Pool::new(&cfg.pool)?;
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
        Ok(Server {
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                pool,
                export,
                stats: ServerStats::default(),
                conns: Mutex::new(Vec::new()),
                stopping: AtomicBool::new(false),
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
        let addr = self.listener.local_addr();
        let shared = self.shared.clone();
        let listener = self.listener.clone();
        let accept = std::thread::Builder::new()
            .name("zcio-accept".into())
            .spawn(move || accept_loop(shared, listener, sched))
            .map_err(|e| Error::io("spawn accept thread", e))?;
        Ok(ServerHandle {
            shared: self.shared,
            listener: self.listener,
            accept: Some(accept),
            addr,
        })
    }

    /// Serves until the listener fails or is shut down.
    pub fn serve(self) -> Result<()> {
        let mut h = self.spawn()?;
        if let Some(t) = h.accept.take() {
            let _ = t.join();
        }
        Ok(())
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

fn accept_loop(shared: Arc<Shared>, listener: Arc<dyn Listener>, jobs: Arc<Scheduler>) {
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
                if !shared.stopping.load(Ordering::SeqCst) {
                    tracing::error!("accept failed, server stops: {e}");
                }
                // Workers finish what is queued, then exit.
                jobs.close();
                return;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            conn.replier().close();
            jobs.close();
            return;
        }
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let active = shared.stats.active.fetch_add(1, Ordering::SeqCst) + 1;
        let shared2 = shared.clone();
        let jobs = jobs.clone();
        let full = active > shared.cfg.server.max_connections;
        let r = std::thread::Builder::new()
            .name("zcio-conn".into())
            .spawn(move || {
                if full {
                    refuse_full(&shared2, conn);
                } else {
                    serve_conn(&shared2, conn, &jobs);
                }
                shared2.stats.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = r {
            tracing::error!("cannot start a connection thread: {e}");
            shared.stats.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers a connection over the limit with one clear error, then closes it.
fn refuse_full(shared: &Shared, mut conn: Box<dyn ServerConn>) {
    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
    let replier = conn.replier();
    if let Ok(Some(inc)) = conn.recv() {
        let msg = format!(
            "server is at its limit of {} connections; try again later",
            shared.cfg.server.max_connections
        );
        let _ = replier.reply(inc.id, &proto::encode_err(Status::Busy as u32, &msg), &[]);
    }
    replier.close();
}

fn serve_conn(shared: &Arc<Shared>, mut sc: Box<dyn ServerConn>, jobs: &Scheduler) {
    let conn = Arc::new(Conn {
        replier: sc.replier(),
        peer: sc.peer(),
        files: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        hello: Mutex::new(None),
        authed: AtomicBool::new(false),
        permits: Permits {
            free: Mutex::new(shared.cfg.server.max_in_flight),
            cond: Condvar::new(),
        },
        queue: Mutex::new(ConnQueue {
            // Queued requests never make it grow (up to a bound): no allocation per request.
            jobs: std::collections::VecDeque::with_capacity(
                shared.cfg.server.max_in_flight.min(256),
            ),
            scheduled: false,
        }),
        shared: shared.clone(),
    });
    {
        let mut conns = lock(&shared.conns);
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
    }
    tracing::debug!("connection from {}", conn.peer);
    warm_scratch();
    loop {
        conn.permits.acquire();
        match sc.recv() {
            Ok(Some(inc)) => {
                let depth = shared
                    .cfg
                    .server
                    .max_in_flight
                    .saturating_sub(conn.permits.available());
                let stats = &shared.stats;
                stats.received.fetch_add(1, Ordering::Relaxed);
                stats.depth_sum.fetch_add(depth as u64, Ordering::Relaxed);
                // A client with one request outstanding (a synchronous caller) is served on
                // this thread: one thread hand-off less per request. Deeper queues go to
                // the workers, which run them in parallel; so does a request with more
                // already waiting in the transport behind it (else a deep queue would be
                // served here one at a time: each arrives alone as the last is answered).
                if depth == 1 && !sc.backlog() {
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

fn handle_with(job: Job, scratch: &mut Scratch) {
    let Job { conn, inc } = job;
    let shared = conn.shared.clone();
    let (header, payload) = match Req::decode(&inc.header) {
        Ok(req) => match execute(&conn, &req, &inc, scratch) {
            Ok((resp, payload)) => {
                let mut h = std::mem::take(&mut scratch.header);
                proto::encode_ok_into(&resp, &mut h);
                (h, payload)
            }
            Err(e) => {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
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
    // Give the request back (its payload buffers to the pool, its vectors to the transport)
    // before replying: once the client has the reply it may send the next request, which
    // then finds them.
    let id = inc.id;
    conn.replier.recycle(inc);
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
    if let Err(e) = sent {
        tracing::debug!("reply to {} failed: {e}", conn.peer);
        conn.replier.close();
    }
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
                conn.authed.store(true, Ordering::SeqCst);
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
            if !proto::mac_eq(mac, &proto::client_mac(token, &cn, &sn)) {
                // One try per hello: a new hello (new nonce) is needed to try again.
                *lock(&conn.hello) = None;
                return Err(OpError::new(Status::AuthRequired as u32, "wrong token"));
            }
            conn.authed.store(true, Ordering::SeqCst);
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
            if lock(&conn.files).len() >= cfg.server.max_open_files {
                return Err(OpError::new(
                    Status::Limit as u32,
                    format!(
                        "open {path:?}: this connection already has {} files open (server.max_open_files)",
                        cfg.server.max_open_files
                    ),
                ));
            }
            let (f, direct) = shared.export.open(path, *flags, *mode)?;
            let size = Export::fstat(&f)?.size;
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
                }),
            );
            shared.stats.open_files.fetch_add(1, Ordering::Relaxed);
            Ok((Resp::Open { fh, size }, Vec::new()))
        }
        Req::Read { fh, offset, len } => {
            let f = file(conn, *fh)?;
            let want = (*len as usize)
                .min(inc.reply_capacity)
                .min(cfg.limits.max_payload);
            if f.rangeable && want > 0 && conn.replier.takes_file_ranges() {
                return file_range(f, *offset, want, scratch);
            }
            let r = read_into_pool(&shared.pool, &f.file, *offset, want, scratch)?;
            if !r.1.is_empty() {
                let kind = &shared.stats.pool_read_replies;
                kind.fetch_add(1, Ordering::Relaxed);
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
            let removed = lock(&conn.files).remove(fh);
            if removed.is_none() {
                return Err(OpError::new(
                    Status::BadHandle as u32,
                    format!("no open file handle {fh}"),
                ));
            }
            shared.stats.open_files.fetch_sub(1, Ordering::Relaxed);
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
            Ok(0) => return Err(errno_of(nix::errno::Errno::EIO, "write made no progress")),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
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
