//! The client API.
//!
//! - [`Client::connect`] picks the transport named in the configuration, says hello,
//!   authenticates (challenge-response; the token never crosses the wire) and negotiates
//!   limits. Authentication is mutual: the client proves it knows the token with
//!   HMAC-SHA256 over both nonces, then the server does the same with another label, and a
//!   client with a token refuses a server that does not (including one that says no
//!   authentication is needed). The client proves first so that only a peer posing as a
//!   server, never any client that connects, can collect a MAC to guess the token from.
//! - [`File::preadv`] / [`File::pwritev`]: classic vectored I/O on the caller's own
//!   iovecs; the transport fills or drains them directly (TCP `readv`/`writev`, RDMA).
//! - The zero-copy family GlusterFS proposed: [`Client::get_buffers`],
//!   [`File::zero_readv`] (returns the pool buffers the transport filled; dropping them is
//!   `free_buffer`) and [`File::zero_writev`] (sends from pool buffers).
//! - Async: [`File::zero_readv_async`], [`File::read_into_async`] and
//!   [`File::zero_writev_async`] return a [`Completion`] at once, so many requests can be
//!   in flight (`glfs_preadv_async`); a completion can be waited on or awaited as a
//!   [`Future`] on any executor.
//!
//! - Life cycle ([`reconnect`]): a transport list falls back in order, a lost connection
//!   is replaced (files reopened, safe requests sent again, the async ones too), and an
//!   idle connection is kept alive.
//!
//! One request carries every segment of an iovec up to the negotiated limits (segments
//! and payload bytes); a larger iovec is split into as few requests as those limits allow,
//! and the pieces travel concurrently. Never one request per segment.
#![deny(unsafe_code)]

use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pool::lend::Lent;
use crate::pool::{Iobref, Pool};
use crate::proto::{self, DirEntry, OpenFlags, Req, Resp, Stat, NONCE_LEN};
use crate::transport::{
    ClientConn, Limits, Pending, RecvSeg, Registry, Reply, Request, SendSeg, Transport,
};

#[forbid(unsafe_code)]
mod held;
// Its module documentation is written for maintainers and links to the module's private
// parts (they resolve in `cargo doc --document-private-items`).
#[allow(rustdoc::private_intra_doc_links)]
#[forbid(unsafe_code)]
pub mod reconnect;

use reconnect::{FileState, Link, Redial};

/// The registry [`Client::connect`] uses; transports add themselves with
/// [`register_transport`].
fn global() -> &'static RwLock<Registry> {
    static R: OnceLock<RwLock<Registry>> = OnceLock::new();
    R.get_or_init(|| RwLock::new(Registry::new()))
}

/// Adds a transport to the process-wide registry used by [`Client::connect`].
pub fn register_transport(t: Arc<dyn Transport>) {
    global()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .register(t);
}

/// A snapshot of the process-wide registry.
pub fn global_registry() -> Registry {
    global().read().unwrap_or_else(|p| p.into_inner()).clone()
}

pub(crate) struct Inner {
    link: Link,
    pool: Pool,
    /// The keepalive thread, woken when the client goes so that it ends promptly.
    keepalive: std::sync::OnceLock<std::thread::Thread>,
    /// Request vectors given back by replies, for later requests: a warm client makes its
    /// requests without allocating.
    spare: std::sync::Mutex<Spare>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.keepalive.get() {
            t.unpark();
        }
    }
}

/// Most vectors of each kind kept in [`Spare`] (more than any iodepth needs).
const MAX_SPARE: usize = 1024;

/// Emptied request vectors (header, send and receive segments) to reuse.
#[derive(Default)]
struct Spare {
    headers: Vec<Vec<u8>>,
    sends: Vec<Vec<SendSeg>>,
    recvs: Vec<Vec<RecvSeg>>,
}

/// Keeps `v`, emptied, in `store` if it has room to spare and `store` is not full.
fn keep<T>(store: &mut Vec<Vec<T>>, mut v: Vec<T>) {
    if v.capacity() > 0 && store.len() < MAX_SPARE {
        v.clear();
        store.push(v);
    }
}

/// A connection to a zcio server. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.inner.link.peer())
            .field("limits", &self.inner.link.limits())
            .finish()
    }
}

/// One piece of a split iovec: `(segment index, offset in it, length)`.
type Piece = (usize, usize, usize);

/// Splits segments of the given lengths into as few requests as the limits allow.
/// Segments longer than `max_payload` are cut; empty ones are skipped.
pub fn plan_requests(lens: &[usize], max_segments: usize, max_payload: usize) -> Vec<Vec<Piece>> {
    let max_segments = max_segments.max(1);
    let max_payload = max_payload.max(1);
    let mut out: Vec<Vec<Piece>> = Vec::new();
    let mut cur: Vec<Piece> = Vec::new();
    let mut cur_bytes = 0usize;
    for (i, &len) in lens.iter().enumerate() {
        let mut off = 0;
        while off < len {
            if cur.len() == max_segments || cur_bytes == max_payload {
                out.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            let n = (len - off).min(max_payload - cur_bytes);
            cur.push((i, off, n));
            cur_bytes += n;
            off += n;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Client {
    /// Connects with the transport named by `cfg.transport`, from the process-wide
    /// registry, and a new pool built from `cfg.pool`.
    pub fn connect(cfg: &Config) -> Result<Client> {
        Client::connect_with(cfg, &global_registry())
    }

    /// Connects with a transport from `registry`: the first of `cfg`'s transport list that
    /// is available here and connects (see [`reconnect`] for the fallback rules).
    pub fn connect_with(cfg: &Config, registry: &Registry) -> Result<Client> {
        Client::connect_pool(cfg, registry, Pool::new(&cfg.pool)?)
    }

    /// [`Client::connect_with`] with a given pool.
    pub fn connect_pool(cfg: &Config, registry: &Registry, pool: Pool) -> Result<Client> {
        reconnect::first_connect(cfg, |chosen| {
            let (conn, t, fallback) = match chosen {
                // Once a transport connected, later attempts keep to it.
                Some(t) => (
                    t.connect(&reconnect::for_transport(cfg, t.name())?, &pool)?,
                    t.clone(),
                    None,
                ),
                None => reconnect::dial_list(cfg, registry, &pool)?,
            };
            *chosen = Some(t.clone());
            Client::finish(cfg, conn, pool.clone(), Some(t), fallback)
        })
    }

    /// Connects with a given transport and pool (share one pool between clients and a
    /// server in the same process if you like). Such a client cannot reconnect (it does
    /// not own the transport): use [`Client::connect_shared`] for that.
    pub fn connect_transport(cfg: &Config, t: &dyn Transport, pool: Pool) -> Result<Client> {
        let conn = t.connect(cfg, &pool)?;
        Client::from_conn(cfg, conn, pool)
    }

    /// Connects with a given transport and pool; the client reconnects on its own when
    /// `client.reconnect` is on.
    pub fn connect_shared(cfg: &Config, t: Arc<dyn Transport>, pool: Pool) -> Result<Client> {
        reconnect::first_connect(cfg, |chosen| {
            let conn = t.connect(&reconnect::for_transport(cfg, t.name())?, &pool)?;
            *chosen = Some(t.clone());
            Client::finish(cfg, conn, pool.clone(), Some(t.clone()), None)
        })
    }

    /// Says hello (and authenticates) over an established transport connection. Such a
    /// client cannot reconnect.
    pub fn from_conn(cfg: &Config, conn: Box<dyn ClientConn>, pool: Pool) -> Result<Client> {
        Client::finish(cfg, conn, pool, None, None)
    }

    fn finish(
        cfg: &Config,
        conn: Box<dyn ClientConn>,
        pool: Pool,
        t: Option<Arc<dyn Transport>>,
        fallback: Option<String>,
    ) -> Result<Client> {
        let negotiated = handshake(cfg, conn.as_ref())?;
        let name = t.as_ref().map(|t| t.name());
        let how = t.map(|transport| Redial {
            // Reconnects dial the transport in use at its own address.
            cfg: reconnect::for_transport(cfg, transport.name()).unwrap_or_else(|_| cfg.clone()),
            transport,
            pool: pool.clone(),
        });
        let c = Client {
            inner: Arc::new(Inner {
                link: Link::new(conn, negotiated, how, name, fallback),
                pool,
                keepalive: std::sync::OnceLock::new(),
                spare: Default::default(),
            }),
        };
        if let Some(every) = cfg.client.keepalive {
            if let Some(t) = reconnect::spawn_keepalive(Arc::downgrade(&c.inner), every) {
                let _ = c.inner.keepalive.set(t);
            }
        }
        Ok(c)
    }

    /// The transport in use (`tcp`, `rdma`), when the client connected through a
    /// [`Transport`] (not [`Client::from_conn`]).
    pub fn transport(&self) -> Option<&'static str> {
        self.inner.link.name()
    }

    /// Why the transports listed before the one in use were not used (`None` when the
    /// first was).
    pub fn fallback_reason(&self) -> Option<&str> {
        self.inner.link.fallback()
    }

    /// Sends a ping (a stat of the export root) and waits for its answer; retried after a
    /// reconnect like any read.
    pub fn ping(&self) -> Result<()> {
        self.retrying("ping", true, || self.stat_once("")).map(drop)
    }

    /// Runs `op`, and when it fails because the connection is gone, reconnects and runs it
    /// again if `idempotent` (or if the server said it did not execute it). Otherwise the
    /// error says the operation may or may not have happened; the client has reconnected
    /// for the next one.
    pub(crate) fn retrying<T>(
        &self,
        what: &str,
        idempotent: bool,
        mut op: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        loop {
            let gen = self.inner.link.gen();
            match op() {
                Err(e) if reconnect::is_lost(&e) && self.inner.link.can_redial() => {
                    self.inner.link.redial(gen, &e)?;
                    if !idempotent && !reconnect::not_executed(&e) {
                        return Err(Error::ConnectionClosed(format!(
                            "the connection failed during {what}, which may or may not have taken effect (not retried; the client has reconnected): {e}"
                        )));
                    }
                }
                r => return r,
            }
        }
    }
}

/// Calls `req` on a bare connection and decodes the reply.
fn call_on(conn: &dyn ClientConn, req: &Req) -> Result<Resp> {
    let reply = conn
        .start(Request {
            header: req.encode(),
            send: Vec::new(),
            recv: Vec::new(),
        })?
        .wait()?;
    proto::decode_reply(req, &reply.header)
}

/// Hello and authentication on a new connection: the negotiated limits and whether the
/// export is read-only.
fn handshake(cfg: &Config, conn: &dyn ClientConn) -> Result<(Limits, bool)> {
    {
        let transport_limits = conn.limits();
        let mut cn = [0u8; NONCE_LEN];
        rand::Rng::fill(&mut rand::thread_rng(), &mut cn[..]);
        let hello = match call_on(
            conn,
            &Req::Hello {
                version: proto::VERSION,
                client_nonce: cn,
            },
        ) {
            Ok(Resp::Hello(h)) => h,
            Ok(other) => return Err(Error::decode("hello reply", format!("{other:?}"))),
            Err(e) => return Err(e),
        };
        if hello.version != proto::VERSION {
            return Err(Error::Version {
                ours: proto::VERSION,
                theirs: hello.version,
            });
        }
        let token = cfg.client.token.as_bytes();
        if !token.is_empty() && !hello.auth_required {
            // Authentication is mutual: a client that has a token talks only to a server
            // that proves it knows it (its MAC over both nonces, below). One that says no
            // authentication is needed cannot, and may be an impostor: refused, before
            // anything else is sent to it.
            return Err(Error::Auth(
                "the server does not ask for a token, so it cannot prove it knows client.token; \
                 refusing it (clear client.token to talk to a server without authentication)"
                    .into(),
            ));
        }
        if hello.auth_required {
            if token.is_empty() {
                return Err(Error::Auth(
                    "the server requires a token; set client.token (or --token)".into(),
                ));
            }
            let mac = proto::client_mac(token, &cn, &hello.server_nonce);
            match call_on(conn, &Req::Auth { mac }) {
                Ok(Resp::Auth { mac: smac }) => {
                    if !proto::mac_eq(&smac, &proto::server_mac(token, &cn, &hello.server_nonce)) {
                        return Err(Error::Auth(
                            "the server could not prove it knows the token".into(),
                        ));
                    }
                }
                Ok(other) => return Err(Error::decode("auth reply", format!("{other:?}"))),
                Err(Error::Remote { message, .. }) => return Err(Error::Auth(message)),
                Err(e) => return Err(e),
            }
        }
        let server = Limits {
            max_segments: hello.max_segments as usize,
            max_payload: hello.max_payload as usize,
            max_header: transport_limits.max_header,
            max_in_flight: hello.max_in_flight as usize,
            inline_threshold: transport_limits.inline_threshold,
            rdma_payload: transport_limits.rdma_payload,
        };
        let limits = transport_limits
            .min(&server)
            .min(&cfg.limits_with_transport(&transport_limits));
        if limits.max_segments == 0 || limits.max_payload == 0 {
            return Err(Error::decode(
                "hello reply",
                "server offers zero segments or payload",
            ));
        }
        Ok((limits, hello.read_only))
    }
}

impl Client {
    /// The limits negotiated with the server on the current connection (after a
    /// reconnect, the new server's).
    pub fn limits(&self) -> Limits {
        self.inner.link.limits()
    }

    /// True when the server's export is read-only (as the current connection says).
    pub fn read_only(&self) -> bool {
        self.inner.link.read_only()
    }

    /// The client's buffer pool.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// `count` pool buffers of `size` bytes (GlusterFS's `glfs_get_buffer`); fill them and
    /// pass them to [`File::zero_writev`]. Dropping the [`Iobref`] frees them.
    pub fn get_buffers(&self, size: usize, count: usize) -> Result<Iobref> {
        self.inner.pool.get_buffers(size, count)
    }

    fn start(&self, req: &Req, send: Vec<SendSeg>, recv: Vec<RecvSeg>) -> Result<Pending<Reply>> {
        // The transport logs the request's id inside this span (at debug: no cost otherwise).
        let _span =
            tracing::debug_span!("request", op = req.name(), peer = %self.inner.link.peer())
                .entered();
        let mut header = crate::lock(&self.inner.spare)
            .headers
            .pop()
            .unwrap_or_default();
        req.encode_into(&mut header);
        self.inner.link.start(Request { header, send, recv })
    }

    /// Empty send and receive vectors for a request, reused from earlier replies when
    /// there are some.
    fn vectors(&self) -> (Vec<SendSeg>, Vec<RecvSeg>) {
        let mut sp = crate::lock(&self.inner.spare);
        let send = sp.sends.pop().unwrap_or_default();
        (send, sp.recvs.pop().unwrap_or_default())
    }

    /// Keeps a reply's vectors for later requests (its segments are dropped: they are raw
    /// views, or buffers the caller no longer wants).
    fn recycle(&self, reply: Reply) {
        let mut sp = crate::lock(&self.inner.spare);
        keep(&mut sp.headers, reply.header);
        keep(&mut sp.sends, reply.send);
        keep(&mut sp.recvs, reply.recv);
    }

    /// Sends `req` with no payload and decodes its reply (also for the conformance suite's
    /// raw requests).
    pub(crate) fn call_simple(&self, req: &Req) -> Result<Resp> {
        let reply = self.start(req, Vec::new(), Vec::new())?.wait()?;
        proto::decode_reply(req, &reply.header)
    }

    /// Opens a file.
    pub fn open(&self, path: &str, flags: OpenFlags) -> Result<File> {
        self.open_mode(path, flags, 0o644)
    }

    /// Opens a file, giving the mode of a created file.
    pub fn open_mode(&self, path: &str, flags: OpenFlags, mode: u32) -> Result<File> {
        check_path(path)?;
        // Opening again is harmless unless it creates or truncates.
        let idempotent = !flags.contains(OpenFlags::CREATE) && !flags.contains(OpenFlags::TRUNCATE);
        let open = |flags| {
            let gen = self.inner.link.gen();
            match self.call_simple(&Req::Open {
                path: path.into(),
                flags,
                mode,
            })? {
                Resp::Open { fh, size } => Ok((fh, size, gen)),
                r => Err(Error::decode("open reply", format!("{r:?}"))),
            }
        };
        let (fh, size, gen) = self.retrying("open", idempotent, || open(flags))?;
        let state = Arc::new(FileState::new(path, flags, mode, fh));
        if !self.inner.link.track(&state, gen) {
            // The connection was replaced between the reply and now: open it again on the
            // new one, as a reconnect would have.
            let again = Link::reopen_flags(flags);
            loop {
                let (fh, _, gen) = self.retrying("open", true, || open(again))?;
                state.set_fh(fh);
                if self.inner.link.track(&state, gen) {
                    break;
                }
            }
        }
        Ok(File {
            client: self.clone(),
            state,
            size_at_open: size,
            closed: false,
        })
    }

    /// Attributes of a path ("" is the export itself).
    pub fn stat(&self, path: &str) -> Result<Stat> {
        check_path(path)?;
        self.retrying("stat", true, || self.stat_once(path))
    }

    fn stat_once(&self, path: &str) -> Result<Stat> {
        match self.call_simple(&Req::Stat { path: path.into() })? {
            Resp::Stat(s) => Ok(s),
            r => Err(Error::decode("stat reply", format!("{r:?}"))),
        }
    }

    /// Removes a file.
    pub fn unlink(&self, path: &str) -> Result<()> {
        check_path(path)?;
        self.retrying("unlink", false, || {
            self.call_simple(&Req::Unlink { path: path.into() })
        })
        .map(drop)
    }

    /// Creates a directory.
    pub fn mkdir(&self, path: &str) -> Result<()> {
        check_path(path)?;
        self.retrying("mkdir", false, || {
            self.call_simple(&Req::Mkdir {
                path: path.into(),
                mode: 0o755,
            })
        })
        .map(drop)
    }

    /// Lists a directory, sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        check_path(path)?;
        self.retrying("list", true, || self.list_once(path))
    }

    fn list_once(&self, path: &str) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        let mut cookie = 0u64;
        loop {
            let req = Req::List {
                path: path.into(),
                cookie,
            };
            let (payload, count, next, done) = self.dir_page(&req, 64 << 10, "list reply")?;
            out.extend(proto::decode_dirents(&payload[..], count)?);
            if done || next <= cookie {
                return Ok(out);
            }
            cookie = next;
        }
    }

    /// Closes the connection; requests in flight fail.
    pub fn close(&self) {
        self.inner.link.close();
    }
}

impl Config {
    /// The configured per-request limits, with the transport's header limit.
    fn limits_with_transport(&self, t: &Limits) -> Limits {
        Limits {
            max_header: t.max_header,
            inline_threshold: t.inline_threshold,
            rdma_payload: t.rdma_payload,
            ..self.limits
        }
    }
}

fn check_path(path: &str) -> Result<()> {
    if path.len() > proto::MAX_PATH || path.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "path must be under {} bytes without NUL",
            proto::MAX_PATH
        )));
    }
    Ok(())
}

/// An open file. Dropping it closes the handle on the server (without waiting).
pub struct File {
    client: Client,
    state: Arc<FileState>,
    size_at_open: u64,
    closed: bool,
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File").field("state", &self.state).finish()
    }
}

/// Decodes a read reply: bytes delivered.
fn read_len(req: &Req, reply: &Reply) -> Result<usize> {
    match proto::decode_reply(req, &reply.header)? {
        Resp::Read { len, .. } => {
            if len as usize != reply.payload_len {
                return Err(Error::decode(
                    "read reply",
                    format!("header says {len} bytes, payload has {}", reply.payload_len),
                ));
            }
            Ok(len as usize)
        }
        r => Err(Error::decode("read reply", format!("{r:?}"))),
    }
}

fn write_len(req: &Req, reply: &Reply) -> Result<usize> {
    match proto::decode_reply(req, &reply.header)? {
        Resp::Write { written } => Ok(written as usize),
        r => Err(Error::decode("write reply", format!("{r:?}"))),
    }
}

/// Adds up per-request byte counts of a split transfer: stops at the first short piece
/// (end of file), and fails if any piece failed.
fn contiguous(results: impl IntoIterator<Item = (usize, Result<usize>)>) -> Result<usize> {
    let mut total = 0;
    let mut short = false;
    let mut first_err = None;
    for (want, r) in results {
        match r {
            Ok(n) if !short => {
                total += n;
                short = n < want;
            }
            Ok(_) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

impl File {
    /// The server's file handle.
    pub fn handle(&self) -> u64 {
        self.state.raw_fh()
    }

    /// The size the file had when it was opened.
    pub fn size_at_open(&self) -> u64 {
        self.size_at_open
    }

    fn limits(&self) -> Limits {
        self.client.inner.link.limits()
    }

    /// Starts one request per group of [`plan_requests`] over the memory `lent`, at
    /// consecutive offsets from `offset`, each with the header `header(position, length)`.
    /// Waits for every started request, even after a failure (they may still be touching
    /// the memory: [`Lent::run`] sees to that), and returns the bytes done up to the first
    /// short or failed request.
    fn run_planned(
        &self,
        lent: &Lent<'_>,
        offset: u64,
        header: impl Fn(u64, usize) -> Req,
        done_len: fn(&Req, &Reply) -> Result<usize>,
    ) -> Result<usize> {
        let l = self.limits();
        // One request carrying everything (the common case) is planned on the stack.
        let (one, plan) = match lent.one_group(l.max_segments, l.max_payload) {
            Some((pieces, _)) => (pieces, Vec::new()),
            None => (
                Default::default(),
                plan_requests(&lent.lens(), l.max_segments, l.max_payload),
            ),
        };
        let groups: smallvec::SmallVec<[&[Piece]; 1]> = if plan.is_empty() {
            std::iter::once(&one[..])
                .filter(|g| !g.is_empty())
                .collect()
        } else {
            plan.iter().map(Vec::as_slice).collect()
        };
        let mut sent: smallvec::SmallVec<[(usize, Req); 1]> =
            smallvec::SmallVec::with_capacity(groups.len());
        let mut pos = offset;
        let (replies, err) = lent.run(
            &groups,
            || self.client.vectors(),
            |pieces, send, recv| {
                let want: usize = pieces.iter().map(|p| p.2).sum();
                let req = header(pos, want);
                let p = self.client.start(&req, send, recv)?;
                pos += want as u64;
                sent.push((want, req));
                Ok(p)
            },
        );
        let results = sent.into_iter().zip(replies).map(|((want, req), r)| {
            let n = r.and_then(|r| {
                let n = done_len(&req, &r);
                self.client.recycle(r);
                n
            });
            (want, n)
        });
        let total = contiguous(results)?;
        match err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Reads into the caller's iovecs at `offset`; the transport writes the payload
    /// straight into them. Returns the bytes read (short at end of file).
    pub fn preadv(&self, iov: &mut [IoSliceMut<'_>], offset: u64) -> Result<usize> {
        let lent = Lent::for_reading(iov);
        self.client.retrying("read", true, || {
            let fh = self.state.fh()?;
            let read = |pos, len: usize| Req::Read {
                fh,
                offset: pos,
                len: len as u32,
            };
            self.run_planned(&lent, offset, read, read_len)
        })
    }

    /// Reads into one buffer.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.preadv(&mut [IoSliceMut::new(buf)], offset)
    }

    /// Writes the caller's iovecs at `offset`; the transport sends straight from them.
    /// Returns the bytes written.
    pub fn pwritev(&self, iov: &[IoSlice<'_>], offset: u64) -> Result<usize> {
        let lent = Lent::for_writing(iov);
        self.client.retrying("write", true, || {
            let fh = self.state.fh()?;
            let write = |pos, _| Req::Write { fh, offset: pos };
            self.run_planned(&lent, offset, write, write_len)
        })
    }

    /// Writes one buffer.
    pub fn pwrite(&self, buf: &[u8], offset: u64) -> Result<usize> {
        self.pwritev(&[IoSlice::new(buf)], offset)
    }

    /// Reads `len` bytes at `offset` into pool buffers the transport fills directly, and
    /// returns them (trimmed to what was read). Dropping the result frees the buffers.
    pub fn zero_readv(&self, len: usize, offset: u64) -> Result<Iobref> {
        self.client
            .retrying("read", true, || self.zero_readv_async(len, offset)?.wait())
    }

    /// Reads into the given pool buffers at `offset` (their visible lengths say how much)
    /// and returns them, trimmed to what was read: [`File::zero_readv`] on buffers the
    /// caller reuses, which allocates nothing once the client is warm.
    pub fn read_into(&self, bufs: Iobref, offset: u64) -> Result<Iobref> {
        self.read_into_async(bufs, offset)?.wait()
    }

    /// Writes pool buffers (from [`Client::get_buffers`]) at `offset` without copying.
    pub fn zero_writev(&self, bufs: &Iobref, offset: u64) -> Result<usize> {
        let lent = Lent::for_writing_pool(bufs);
        self.client.retrying("write", true, || {
            let fh = self.state.fh()?;
            let write = |pos, _| Req::Write { fh, offset: pos };
            self.run_planned(&lent, offset, write, write_len)
        })
    }

    /// Starts a read of `len` bytes at `offset` into new pool buffers; completes with
    /// the filled buffers.
    pub fn zero_readv_async(&self, len: usize, offset: u64) -> Result<Completion<Iobref>> {
        let l = self.limits();
        let per = l
            .max_payload
            .min(self.client.inner.pool.max_buffer_size() * l.max_segments);
        let per = per.max(1);
        let mut bufs = Iobref::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(per);
            let span = self.client.inner.pool.get_span(n)?;
            for b in span {
                bufs.push(b);
            }
            left -= n;
        }
        self.read_into_async(bufs, offset)
    }

    /// Starts a read at `offset` into the given pool buffers (their visible lengths say how
    /// much); completes with them, trimmed to what was read. One request (the common case:
    /// within the negotiated segments and payload) allocates nothing once the client is
    /// warm.
    pub fn read_into_async(&self, bufs: Iobref, offset: u64) -> Result<Completion<Iobref>> {
        self.held_op(bufs, offset, false, held::finish_read_trimmed, |(n, b)| {
            held::trim(b, n)
        })
    }

    /// Starts a read at `offset` into the caller's own buffers (moved in for the duration,
    /// filled directly by the transport, and handed back): the async `preadv`.
    /// Completes with the bytes read and the buffers.
    pub fn preadv_async(
        &self,
        bufs: Vec<Vec<u8>>,
        offset: u64,
    ) -> Result<Completion<(usize, Vec<Vec<u8>>)>> {
        self.owned_async(bufs, offset, false)
    }

    /// Starts a write of the caller's own buffers at `offset` (moved in, sent directly,
    /// handed back): the async `pwritev`.
    pub fn pwritev_async(
        &self,
        bufs: Vec<Vec<u8>>,
        offset: u64,
    ) -> Result<Completion<(usize, Vec<Vec<u8>>)>> {
        self.owned_async(bufs, offset, true)
    }

    /// The async `preadv`/`pwritev` on caller-owned buffers, split within the limits. The
    /// completion holds the buffers while the transport fills or drains them (so a
    /// reconnecting client can do the operation again on them).
    fn owned_async(
        &self,
        bufs: Vec<Vec<u8>>,
        offset: u64,
        write: bool,
    ) -> Result<Completion<(usize, Vec<Vec<u8>>)>> {
        self.held_async(bufs, offset, write)
    }

    /// Starts a write of pool buffers at `offset`; completes with the bytes written and
    /// the buffers (to reuse).
    pub fn zero_writev_async(
        &self,
        bufs: Iobref,
        offset: u64,
    ) -> Result<Completion<(usize, Iobref)>> {
        self.held_async(bufs, offset, true)
    }

    /// Flushes the file to stable storage.
    pub fn fsync(&self) -> Result<()> {
        self.client.retrying("fsync", true, || {
            self.client.call_simple(&Req::Fsync {
                fh: self.state.fh()?,
                datasync: false,
            })
        })?;
        Ok(())
    }

    /// Current attributes.
    pub fn stat(&self) -> Result<Stat> {
        self.client.retrying("fstat", true, || {
            match self.client.call_simple(&Req::Fstat {
                fh: self.state.fh()?,
            })? {
                Resp::Stat(s) => Ok(s),
                r => Err(Error::decode("fstat reply", format!("{r:?}"))),
            }
        })
    }

    /// Sets the file's length.
    pub fn truncate(&self, len: u64) -> Result<()> {
        self.client.retrying("truncate", true, || {
            self.client.call_simple(&Req::Truncate {
                fh: self.state.fh()?,
                len,
            })
        })?;
        Ok(())
    }

    /// Closes the handle and waits for the server to confirm.
    /// A handle whose connection is gone is closed already (the server closes a
    /// connection's files with it): that is success.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        match self.client.call_simple(&Req::Close {
            fh: self.state.fh()?,
        }) {
            Err(e) if reconnect::is_lost(&e) => Ok(()),
            r => r.map(drop),
        }
    }
}

impl Drop for File {
    fn drop(&mut self) {
        if !self.closed && !self.state.is_stale() {
            // Fire and forget: the server also closes everything when the connection goes.
            let fh = self.state.raw_fh();
            let _ = self
                .client
                .start(&Req::Close { fh }, Vec::new(), Vec::new());
        }
    }
}

type Finish<T> = Box<dyn FnOnce(Vec<Result<Reply>>) -> Result<T> + Send>;

/// What a one-request operation keeps until its reply: the request, the buffers it holds for the transport (if any), and the file and offset to do it again
/// on after a reconnect.
pub(crate) struct One {
    req: Req,
    held: held::Holding,
    file: Option<File>,
    offset: u64,
}

/// How a one-request operation's result is made from its reply and what it kept: a plain
/// function, so that such an operation allocates no completion state.
pub(crate) type FinishOne<T> = fn(One, Result<Reply>) -> Result<T>;

enum Parts<T> {
    /// One request (the common case).
    One {
        pending: Option<Pending<Reply>>,
        finish: Option<(FinishOne<T>, One)>,
    },
    /// Several requests: their replies are collected in order, then finished together.
    Many {
        parts: std::collections::VecDeque<Pending<Reply>>,
        done: Vec<Result<Reply>>,
        finish: Option<Finish<T>>,
    },
}

/// An asynchronous operation in flight: [`Completion::wait`] blocks for it; as a
/// [`Future`] it can be awaited on any executor.
pub struct Completion<T> {
    parts: Parts<T>,
}

impl<T> std::fmt::Debug for Completion<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pending = match &self.parts {
            Parts::One { pending, .. } => usize::from(pending.is_some()),
            Parts::Many { parts, .. } => parts.len(),
        };
        f.debug_struct("Completion")
            .field("pending", &pending)
            .finish()
    }
}

fn finished_err() -> Error {
    Error::InvalidArgument("completion polled after it finished".into())
}

impl<T> Completion<T> {
    fn new(
        parts: Vec<Pending<Reply>>,
        finish: impl FnOnce(Vec<Result<Reply>>) -> Result<T> + Send + 'static,
    ) -> Self {
        Completion {
            parts: Parts::Many {
                done: Vec::with_capacity(parts.len()),
                parts: parts.into(),
                finish: Some(Box::new(finish)),
            },
        }
    }

    /// One request's operation, finished by `finish` (a function, not a closure: nothing
    /// to allocate).
    fn one(pending: Pending<Reply>, ctx: One, finish: FinishOne<T>) -> Self {
        Completion {
            parts: Parts::One {
                pending: Some(pending),
                finish: Some((finish, ctx)),
            },
        }
    }

    /// Blocks until the operation is complete.
    pub fn wait(mut self) -> Result<T> {
        match &mut self.parts {
            Parts::One { pending, finish } => {
                let r = pending.take().ok_or_else(finished_err)?.wait();
                conclude_one(finish, r)
            }
            Parts::Many {
                parts,
                done,
                finish,
            } => {
                while let Some(p) = parts.pop_front() {
                    done.push(p.wait());
                }
                conclude_many(finish, done)
            }
        }
    }

    /// A completion whose result is passed through `f`.
    pub fn map<U>(mut self, f: impl FnOnce(T) -> U + Send + 'static) -> Completion<U>
    where
        T: 'static,
    {
        let parts = std::mem::replace(
            &mut self.parts,
            Parts::Many {
                parts: Default::default(),
                done: Vec::new(),
                finish: None,
            },
        );
        match parts {
            Parts::One { pending, finish } => Completion {
                parts: Parts::Many {
                    parts: pending.into_iter().collect(),
                    done: Vec::with_capacity(1),
                    finish: finish.map(|(g, ctx)| -> Finish<U> {
                        Box::new(move |mut r| {
                            g(ctx, r.pop().unwrap_or_else(|| Err(finished_err()))).map(f)
                        })
                    }),
                },
            },
            Parts::Many {
                parts,
                done,
                finish,
            } => Completion {
                parts: Parts::Many {
                    parts,
                    done,
                    finish: finish.map(|g| -> Finish<U> { Box::new(move |r| g(r).map(f)) }),
                },
            },
        }
    }

    /// True when every part has completed (waiting would not block).
    pub fn is_done(&self) -> bool {
        match &self.parts {
            Parts::One { pending, .. } => pending.as_ref().is_none_or(Pending::is_done),
            Parts::Many { parts, .. } => parts.iter().all(Pending::is_done),
        }
    }
}

fn conclude_one<T>(finish: &mut Option<(FinishOne<T>, One)>, r: Result<Reply>) -> Result<T> {
    let (f, ctx) = finish.take().ok_or_else(finished_err)?;
    f(ctx, r)
}

fn conclude_many<T>(finish: &mut Option<Finish<T>>, done: &mut Vec<Result<Reply>>) -> Result<T> {
    let f = finish.take().ok_or_else(finished_err)?;
    f(std::mem::take(done))
}

/// A completion dropped before it finished waits for its requests: the transport may still
/// be reading or writing buffers the completion holds (and the caller gets its buffers
/// back only through it anyway).
impl<T> Drop for Completion<T> {
    fn drop(&mut self) {
        match &mut self.parts {
            Parts::One { pending, .. } => {
                if let Some(p) = pending.take() {
                    let _ = p.wait();
                }
            }
            Parts::Many { parts, .. } => {
                while let Some(p) = parts.pop_front() {
                    let _ = p.wait();
                }
            }
        }
    }
}

impl<T> Future for Completion<T> {
    type Output = Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.parts {
            Parts::One { pending, finish } => {
                let Some(p) = pending.as_mut() else {
                    return Poll::Ready(Err(finished_err()));
                };
                match Pin::new(p).poll(cx) {
                    Poll::Ready(r) => {
                        *pending = None;
                        Poll::Ready(conclude_one(finish, r))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            Parts::Many {
                parts,
                done,
                finish,
            } => {
                while let Some(p) = parts.front_mut() {
                    match Pin::new(p).poll(cx) {
                        Poll::Ready(r) => {
                            parts.pop_front();
                            done.push(r);
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Poll::Ready(conclude_many(finish, done))
            }
        }
    }
}

#[cfg(test)]
#[forbid(unsafe_code)]
mod tests;

/// The raw-pointer entry points the C library calls: the one module of the client with
/// `unsafe` (each is an `unsafe fn` taking caller pointers).
#[allow(unsafe_code)]
mod raw;

/// Calls for the operations a mounted file system needs.
#[forbid(unsafe_code)]
mod fsops;
