//! The client's connection life cycle: transport fallback, automatic reconnect, keepalive.
//!
//! A [`Link`] holds the client's current transport connection and can replace it.
//!
//! - **Fallback** ([`dial_list`]): with `transport = ["rdma", "tcp"]` the transports are
//!   tried in order. One is skipped when it is not available here (this build lacks it, no
//!   libibverbs, no device: the registry's check) or when connecting with it fails (the
//!   server does not offer it, or nothing answers there); the next is tried. Only the
//!   transport connection is at stake: no file request has been sent yet, so nothing is
//!   ever retried after data moved. One warning says which transport is used and why the
//!   others were not; [`crate::Client::transport`] and [`crate::Client::fallback_reason`]
//!   report it. A single transport is strict: its error is returned as it is.
//! - **Reconnect** ([`Link::redial`]): when a request fails because the connection is gone
//!   (closed, reset, timed out, or the server's [`Status::ShuttingDown`] notice), the link
//!   dials the *same* transport again with exponential backoff (10 ms doubling up to
//!   `client.reconnect_max_delay_ms`, giving up after `client.reconnect_give_up_ms`), says
//!   hello and authenticates again, and reopens every open file by path with its flags less
//!   `CREATE`, `TRUNCATE` and `EXCL` (a file must not be created, emptied or refused the
//!   second time). A file whose path is gone gets a stale-handle error ([`ESTALE`]) from
//!   then on. Which requests are sent again is the caller's rule
//!   ([`crate::Client`]): reads, and writes at an offset, are; a create, unlink or mkdir
//!   is not (its caller cannot know whether it happened) unless the server said it was not
//!   executed. The buffer pool is the client's, not the connection's: pool buffers the
//!   application holds stay valid across a reconnect.
//! - **Keepalive** ([`spawn_keepalive`]): a thread per client sends a ping (a stat of the
//!   export root) when the connection has been idle for `client.keepalive_ms`, so the
//!   server's idle timeout does not close it. A ping that gets no answer within
//!   `client.timeout_ms` fails the connection (and, with reconnect on, redials): a dead
//!   server is noticed within `keepalive_ms + timeout_ms` even by an idle client.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::lock;
use crate::pool::Pool;
use crate::proto::{OpenFlags, Req, Resp, Status};
use crate::transport::{ClientConn, Pending, Registry, Reply, Request, Transport};

/// The errno a file whose path is gone after a reconnect fails with.
pub const ESTALE: u32 = libc::ESTALE as u32;

/// First wait between reconnect attempts; it doubles up to `client.reconnect_max_delay`.
const FIRST_DELAY: Duration = Duration::from_millis(10);

/// What the link needs to dial again.
pub(crate) struct Redial {
    pub(crate) cfg: Config,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) pool: Pool,
}

/// An open file as the link knows it, to reopen it after a reconnect.
#[derive(Debug)]
pub(crate) struct FileState {
    path: String,
    flags: OpenFlags,
    mode: u32,
    fh: AtomicU64,
    /// Set when the file could not be reopened: why.
    stale: Mutex<Option<String>>,
}

impl FileState {
    pub(crate) fn new(path: &str, flags: OpenFlags, mode: u32, fh: u64) -> FileState {
        FileState {
            path: path.into(),
            flags,
            mode,
            fh: AtomicU64::new(fh),
            stale: Mutex::new(None),
        }
    }

    /// The server's handle for this file on the current connection, or the stale-handle
    /// error.
    pub(crate) fn fh(&self) -> Result<u64> {
        if let Some(why) = &*lock(&self.stale) {
            return Err(Error::Remote {
                op: "file handle",
                code: ESTALE,
                message: why.clone(),
            });
        }
        Ok(self.fh.load(Ordering::Acquire))
    }

    /// The handle, whatever its state (for a last close).
    pub(crate) fn raw_fh(&self) -> u64 {
        self.fh.load(Ordering::Acquire)
    }

    pub(crate) fn set_fh(&self, fh: u64) {
        self.fh.store(fh, Ordering::Release);
    }

    pub(crate) fn is_stale(&self) -> bool {
        lock(&self.stale).is_some()
    }
}

struct Current {
    conn: Arc<dyn ClientConn>,
    gen: u64,
    /// What this connection's handshake negotiated: a reconnect may reach a server with
    /// other limits or another read-only setting.
    limits: Limits,
    read_only: bool,
}

/// The client's connection, replaceable.
pub(crate) struct Link {
    cur: RwLock<Current>,
    how: Option<Redial>,
    /// Open files, to reopen after a reconnect.
    files: Mutex<Vec<Weak<FileState>>>,
    /// Serializes reconnects.
    redialing: Mutex<()>,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last request started.
    last_used: AtomicU64,
    closed: AtomicBool,
    name: Option<&'static str>,
    fallback: Option<String>,
}

impl Link {
    pub(crate) fn new(
        conn: Box<dyn ClientConn>,
        (limits, read_only): (Limits, bool),
        how: Option<Redial>,
        name: Option<&'static str>,
        fallback: Option<String>,
    ) -> Link {
        Link {
            cur: RwLock::new(Current {
                conn: Arc::from(conn),
                gen: 0,
                limits,
                read_only,
            }),
            how,
            files: Mutex::new(Vec::new()),
            redialing: Mutex::new(()),
            epoch: Instant::now(),
            last_used: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            name,
            fallback,
        }
    }

    fn current(&self) -> (Arc<dyn ClientConn>, u64) {
        let c = self.cur.read().unwrap_or_else(|p| p.into_inner());
        (c.conn.clone(), c.gen)
    }

    /// The current connection's generation (it grows by one per reconnect).
    pub(crate) fn gen(&self) -> u64 {
        self.cur.read().unwrap_or_else(|p| p.into_inner()).gen
    }

    /// The current connection's negotiated limits.
    pub(crate) fn limits(&self) -> Limits {
        self.cur.read().unwrap_or_else(|p| p.into_inner()).limits
    }

    /// True when the current connection's export is read-only.
    pub(crate) fn read_only(&self) -> bool {
        self.cur.read().unwrap_or_else(|p| p.into_inner()).read_only
    }

    /// Sends a request on the current connection.
    pub(crate) fn start(&self, req: Request) -> Result<Pending<Reply>> {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_used.store(ms, Ordering::Relaxed);
        self.current().0.start(req)
    }

    /// How long the connection has been idle.
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_used.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub(crate) fn peer(&self) -> String {
        self.current().0.peer()
    }

    /// The transport in use, when known.
    pub(crate) fn name(&self) -> Option<&'static str> {
        self.name
    }

    /// Why the transports before the one in use were not used.
    pub(crate) fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Closes the connection for good (no reconnect after this).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.current().0.close();
    }

    /// True when this link may dial again.
    pub(crate) fn can_redial(&self) -> bool {
        self.how.as_ref().is_some_and(|h| h.cfg.client.reconnect)
            && !self.closed.load(Ordering::SeqCst)
    }

    /// Remembers an open file, to reopen it after a reconnect.
    /// Remembers an open file opened on connection generation `gen`, to reopen it after a
    /// reconnect; false (and not remembered) when the connection has been replaced since,
    /// so that the file's handle belongs to a connection that is gone. A reconnect holds
    /// the list from its look at it until the new connection is in place, so a file is
    /// either reopened by it or refused here.
    pub(crate) fn track(&self, f: &Arc<FileState>, gen: u64) -> bool {
        let mut files = lock(&self.files);
        if self.gen() != gen {
            return false;
        }
        files.retain(|w| w.strong_count() > 0);
        files.push(Arc::downgrade(f));
        true
    }

    /// The flags a file is opened with again: never creating, truncating or failing
    /// because it exists.
    pub(crate) fn reopen_flags(flags: OpenFlags) -> OpenFlags {
        OpenFlags(flags.0 & !(OpenFlags::CREATE.0 | OpenFlags::TRUNCATE.0 | OpenFlags::EXCL.0))
    }

    /// Replaces the connection of generation `seen` (which failed with `why`) by a new
    /// one, unless another thread already did. Blocks for the backoff; fails when
    /// reconnecting is off, the client was closed, authentication is refused, or the
    /// server stays away past `client.reconnect_give_up_ms`.
    pub(crate) fn redial(&self, seen: u64, why: &Error) -> Result<()> {
        let Some(how) = self.how.as_ref().filter(|_| self.can_redial()) else {
            return Err(Error::ConnectionClosed(format!(
                "the connection is gone and reconnecting is off: {why}"
            )));
        };
        let _one = lock(&self.redialing);
        let (old, gen) = self.current();
        if gen != seen {
            return Ok(());
        }
        old.close();
        let t0 = Instant::now();
        let mut delay = FIRST_DELAY;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // Held until the new connection is in place (see `track`).
            let files = lock(&self.files);
            match self.dial_and_reopen(how, &files) {
                Ok((conn, (limits, read_only))) => {
                    let mut c = self.cur.write().unwrap_or_else(|p| p.into_inner());
                    c.conn = Arc::from(conn);
                    c.gen += 1;
                    c.limits = limits;
                    c.read_only = read_only;
                    tracing::warn!(
                        "reconnected to {} over {} after {:?} ({attempts} attempts): the connection had failed: {why}",
                        how.cfg.client.connect,
                        how.transport.name(),
                        t0.elapsed()
                    );
                    return Ok(());
                }
                Err(e @ (Error::Auth(_) | Error::Version { .. })) => return Err(e),
                Err(e) => {
                    if self.closed.load(Ordering::SeqCst)
                        || t0.elapsed() + delay > how.cfg.client.reconnect_give_up
                    {
                        return Err(Error::ConnectionClosed(format!(
                            "lost the connection ({why}) and could not reconnect to {} within {:?} ({attempts} attempts; last: {e})",
                            how.cfg.client.connect, how.cfg.client.reconnect_give_up
                        )));
                    }
                    tracing::debug!("reconnect attempt {attempts} failed: {e}");
                }
            }
            drop(files);
            std::thread::sleep(delay);
            delay = (delay * 2).min(how.cfg.client.reconnect_max_delay);
        }
    }

    /// One attempt: connect, hello and auth, reopen the open files. Returns the connection
    /// with what its handshake negotiated.
    fn dial_and_reopen(
        &self,
        how: &Redial,
        files: &[Weak<FileState>],
    ) -> Result<(Box<dyn ClientConn>, (Limits, bool))> {
        let conn = how.transport.connect(&how.cfg, &how.pool)?;
        let negotiated = super::handshake(&how.cfg, conn.as_ref())?;
        let files: Vec<Arc<FileState>> = files.iter().filter_map(Weak::upgrade).collect();
        for f in files {
            if f.is_stale() {
                continue;
            }
            let flags = Link::reopen_flags(f.flags);
            let req = Req::Open {
                path: f.path.clone(),
                flags,
                mode: f.mode,
            };
            match super::call_on(conn.as_ref(), &req) {
                Ok(Resp::Open { fh, .. }) => f.fh.store(fh, Ordering::Release),
                Ok(r) => return Err(Error::decode("open reply", format!("{r:?}"))),
                // A server shutting down or short of resources: try the whole attempt
                // again later rather than give the file up.
                Err(e @ Error::Remote { code, .. })
                    if not_executed(&e)
                        || code == Status::Busy as u32
                        || code == Status::Limit as u32 =>
                {
                    return Err(Error::ConnectionClosed(format!(
                        "reopening {:?}: {e}",
                        f.path
                    )))
                }
                Err(e @ Error::Remote { .. }) => {
                    tracing::warn!("{:?} could not be reopened after reconnecting: {e}", f.path);
                    *lock(&f.stale) = Some(format!(
                        "{:?} is stale: it could not be reopened after a reconnect ({e})",
                        f.path
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok((conn, negotiated))
    }
}

/// True when `e` says the connection is gone (or going) rather than that the request
/// itself failed.
pub(crate) fn is_lost(e: &Error) -> bool {
    e.is_connection_fatal() || matches!(e, Error::Timeout { .. }) || not_executed(e)
}

/// True for the server's shutdown notice: the request was not executed.
pub(crate) fn not_executed(e: &Error) -> bool {
    matches!(e, Error::Remote { code, .. } if *code == Status::ShuttingDown as u32)
}

/// A new connection, its transport, and why the transports before it were skipped.
pub(crate) type Dialed = (Box<dyn ClientConn>, Arc<dyn Transport>, Option<String>);

/// The transport connection for `cfg`'s transport list, with fallback (see the module
/// docs): the connection, the transport, and why earlier ones were skipped.
pub(crate) fn dial_list(cfg: &Config, registry: &Registry, pool: &Pool) -> Result<Dialed> {
    let names = cfg.transport_list();
    if names.len() == 1 {
        let t = registry.get(names[0], cfg)?;
        let cfg = for_transport(cfg, names[0])?;
        return Ok((t.connect(&cfg, pool)?, t, None));
    }
    let mut skipped: Vec<String> = Vec::new();
    for name in &names {
        let t = match registry.get(name, cfg) {
            Ok(t) => t,
            Err(e @ Error::UnknownTransport { .. }) => return Err(e),
            Err(e) => {
                skipped.push(format!("{name} is not available here ({e})"));
                continue;
            }
        };
        let Ok(tcfg) = for_transport(cfg, name) else {
            skipped.push(format!("{name} has no address in client.connect"));
            continue;
        };
        match t.connect(&tcfg, pool) {
            Ok(conn) => {
                let why = (!skipped.is_empty()).then(|| skipped.join("; "));
                if let Some(w) = &why {
                    tracing::warn!("using transport {name}: {w}");
                }
                return Ok((conn, t, why));
            }
            Err(e) => {
                skipped.push(format!(
                    "{name} could not connect to {} (the server may not offer it): {e}",
                    tcfg.client.connect
                ));
            }
        }
    }
    Err(Error::ConnectionClosed(format!(
        "no transport of {names:?} could connect: {}",
        skipped.join("; ")
    )))
}

/// `cfg` with `client.connect` narrowed to transport `name`'s address (see
/// [`crate::config::ClientConfig::connect_for`]).
pub(crate) fn for_transport(cfg: &Config, name: &str) -> Result<Config> {
    let a = cfg.client.connect_for(name).ok_or_else(|| {
        Error::config(
            "client.connect",
            &cfg.client.connect,
            format!("names no address for transport {name}"),
        )
    })?;
    let mut c = cfg.clone();
    c.client.connect = a.to_string();
    Ok(c)
}

/// A first connection: `attempt` connects (setting `chosen` once a transport connected)
/// and says hello. When the connection fails *after* a transport connected (the server
/// went away during hello), it is tried again like a reconnect: with backoff, keeping to
/// that transport, within `client.reconnect_give_up_ms` (when `client.reconnect` is on).
/// A server that cannot be reached at all fails at once.
pub(crate) fn first_connect(
    cfg: &Config,
    mut attempt: impl FnMut(&mut Option<Arc<dyn Transport>>) -> Result<super::Client>,
) -> Result<super::Client> {
    let mut chosen = None;
    let t0 = Instant::now();
    let mut delay = FIRST_DELAY;
    loop {
        match attempt(&mut chosen) {
            Err(e)
                if cfg.client.reconnect
                    && chosen.is_some()
                    && (is_lost(&e) || matches!(e, Error::Io { .. }))
                    && t0.elapsed() + delay <= cfg.client.reconnect_give_up =>
            {
                tracing::debug!("connecting again after: {e}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(cfg.client.reconnect_max_delay);
            }
            r => return r,
        }
    }
}

/// Starts the keepalive thread of a client (see the module docs). Dropping the client
/// unparks it (see `Inner`'s `Drop`), so it ends at once rather than after up to `every`.
pub(crate) fn spawn_keepalive(
    inner: Weak<super::Inner>,
    every: Duration,
) -> Option<std::thread::Thread> {
    let r = std::thread::Builder::new()
        .name("zcio-keepalive".into())
        .spawn(move || loop {
            let wait = match inner.upgrade() {
                None => return,
                Some(i) => {
                    if i.link.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let idle = i.link.idle();
                    if idle >= every {
                        let c = super::Client { inner: i };
                        if let Err(e) = c.ping() {
                            tracing::debug!("keepalive ping failed: {e}");
                        }
                        every
                    } else {
                        every - idle
                    }
                }
            };
            // An unpark that came before this (a drop since the upgrade above) makes it
            // return at once: the next upgrade then fails.
            std::thread::park_timeout(wait);
        });
    match r {
        Ok(h) => Some(h.thread().clone()),
        Err(e) => {
            tracing::warn!("no keepalive: cannot start its thread: {e}");
            None
        }
    }
}
