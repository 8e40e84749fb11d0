//! An in-memory transport: two endpoints joined by channels.
//!
//! **A test double, not a product transport.** It copies payload (a real transport must
//! not), so it is never registered under a name a user can choose. It exists so that the
//! file protocol, the server and the client can be unit-tested without sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::{
    check_request, pair, send_len, ClientConn, Completer, Incoming, Limits, Listener, Pending,
    RecvSeg, Replier, Reply, Request, SendSeg, ServerConn,
};
use crate::error::{Error, Result};
use crate::lock;
use crate::pool::{Iobuf, Pool};

type Waiting = (Completer<Reply>, Vec<RecvSeg>, Vec<SendSeg>);

/// What both sides of a connection share: the requests in flight and whether the
/// connection is closed, under one lock, so that a request is either in the table before
/// the connection closes (and is failed by the close) or refused after it (never both
/// missed: a request that slipped in after the close would wait forever).
struct Link {
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    pending: HashMap<u64, Waiting>,
    closed: bool,
}

impl Link {
    /// Enters a request in flight; refused once the connection is closed.
    fn enter(&self, id: u64, w: Waiting) -> Result<()> {
        let mut st = lock(&self.state);
        if st.closed {
            return Err(Error::ConnectionClosed("connection closed".into()));
        }
        st.pending.insert(id, w);
        Ok(())
    }

    /// Takes a request in flight out of the table (to answer it).
    fn take(&self, id: u64) -> Option<Waiting> {
        lock(&self.state).pending.remove(&id)
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Closes the connection and fails every request in flight with `ConnectionClosed`.
    fn fail_all(&self, why: &str) {
        let drained: Vec<Waiting> = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.pending.drain().map(|(_, w)| w).collect()
        };
        // Completed outside the lock: a completion may run the waiter's code.
        for (c, _, _) in drained {
            c.complete(Err(Error::ConnectionClosed(why.into())));
        }
    }
}

/// Accepts in-memory connections made with [`MemListener::connect`].
pub struct MemListener {
    name: String,
    pool: Pool,
    limits: Limits,
    tx: Mutex<Option<Sender<MemServerConn>>>,
    rx: Mutex<Receiver<MemServerConn>>,
}

impl MemListener {
    /// A listener whose server side takes payload buffers from `pool`.
    pub fn new(pool: Pool, limits: Limits) -> Arc<MemListener> {
        let (tx, rx) = channel();
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(MemListener {
            name: format!("127.0.0.1:{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            pool,
            limits,
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(rx),
        })
    }

    /// Opens a connection; the server side appears in [`Listener::accept`].
    pub fn connect(&self) -> Result<Box<dyn ClientConn>> {
        let (tx, rx) = channel();
        let link = Arc::new(Link {
            state: Mutex::new(LinkState::default()),
        });
        let server = MemServerConn {
            rx,
            peeked: None,
            link: link.clone(),
            limits: self.limits,
        };
        lock(&self.tx)
            .as_ref()
            .ok_or_else(|| Error::ConnectionClosed("listener shut down".into()))?
            .send(server)
            .map_err(|_| Error::ConnectionClosed("listener gone".into()))?;
        Ok(Box::new(MemClientConn {
            tx: Mutex::new(Some(tx)),
            link,
            pool: self.pool.clone(),
            limits: self.limits,
            next_id: AtomicU64::new(1),
        }))
    }
}

impl Listener for MemListener {
    fn accept(&self) -> Result<Result<Box<dyn ServerConn>>> {
        let c = lock(&self.rx)
            .recv()
            .map_err(|_| Error::ConnectionClosed("listener shut down".into()))?;
        Ok(Ok(Box::new(c)))
    }
    fn local_addr(&self) -> String {
        self.name.clone()
    }
    fn shutdown(&self) {
        lock(&self.tx).take();
    }
}

struct MemClientConn {
    tx: Mutex<Option<Sender<Incoming>>>,
    link: Arc<Link>,
    pool: Pool,
    limits: Limits,
    next_id: AtomicU64,
}

impl ClientConn for MemClientConn {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn start(&self, req: Request) -> Result<Pending<Reply>> {
        check_request(&req, &self.limits)?;
        if self.link.is_closed() {
            return Err(Error::ConnectionClosed("connection closed".into()));
        }
        // The copy a real transport avoids: request payload into the server's buffers.
        let mut left = send_len(&req.send);
        let mut payload = self.pool.get_span(left)?.into_vec();
        let mut bytes = req.send.iter().flat_map(|s| s.as_slice().iter().copied());
        for b in &mut payload {
            for (d, s) in b.iter_mut().zip(&mut bytes) {
                *d = s;
            }
            left -= b.len();
        }
        debug_assert_eq!(left, 0);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (c, p) = pair();
        let cap = super::recv_len(&req.recv);
        self.link.enter(id, (c, req.recv, req.send))?;
        let inc = Incoming {
            id,
            header: req.header,
            payload: payload.into_iter().map(|b| b.freeze()).collect(),
            reply_capacity: cap,
        };
        let sent = lock(&self.tx).as_ref().map(|tx| tx.send(inc).is_ok());
        if sent != Some(true) {
            self.link.fail_all("connection closed");
        }
        Ok(p)
    }

    fn close(&self) {
        lock(&self.tx).take();
        self.link.fail_all("closed by client");
    }

    fn peer(&self) -> String {
        "mem".into()
    }
}

impl Drop for MemClientConn {
    fn drop(&mut self) {
        self.close();
    }
}

/// The server side of an in-memory connection. Dropping it closes the connection: every
/// request in flight (received or still queued) fails with `ConnectionClosed`.
pub struct MemServerConn {
    rx: Receiver<Incoming>,
    /// A request taken off the channel by `backlog`, for the next `recv`.
    peeked: Option<Incoming>,
    link: Arc<Link>,
    limits: Limits,
}

impl ServerConn for MemServerConn {
    fn limits(&self) -> Limits {
        self.limits
    }
    fn recv(&mut self) -> Result<Option<Incoming>> {
        if let Some(inc) = self.peeked.take() {
            return Ok(Some(inc));
        }
        Ok(self.rx.recv().ok())
    }
    fn backlog(&mut self) -> bool {
        if self.peeked.is_none() {
            self.peeked = self.rx.try_recv().ok();
        }
        self.peeked.is_some()
    }
    fn replier(&self) -> Arc<dyn Replier> {
        Arc::new(MemReplier {
            link: self.link.clone(),
        })
    }
    fn peer(&self) -> String {
        "mem".into()
    }
}

impl Drop for MemServerConn {
    fn drop(&mut self) {
        self.link.fail_all("closed by server");
    }
}

struct MemReplier {
    link: Arc<Link>,
}

impl Replier for MemReplier {
    fn reply(&self, id: u64, header: &[u8], payload: &[Iobuf]) -> Result<()> {
        let (c, mut recv, send) = self
            .link
            .take(id)
            .ok_or_else(|| Error::decode("reply", format!("no request {id} in flight")))?;
        let total: usize = payload.iter().map(|b| b.len()).sum();
        let cap = super::recv_len(&recv);
        if total > cap {
            c.complete(Err(Error::decode(
                "reply",
                format!("{total} payload bytes for a {cap}-byte buffer"),
            )));
            return Err(Error::LimitExceeded {
                what: "reply payload",
                value: total as u64,
                limit: cap as u64,
            });
        }
        // Scatter the concatenated payload front to back.
        let mut off = 0;
        let mut si = 0;
        let mut so = 0;
        for b in payload {
            let mut src: &[u8] = b;
            while !src.is_empty() && si < recv.len() {
                let d = &mut recv[si].as_mut_slice()[so..];
                let k = d.len().min(src.len());
                d[..k].copy_from_slice(&src[..k]);
                src = &src[k..];
                so += k;
                off += k;
                if so == recv[si].len() {
                    si += 1;
                    so = 0;
                }
            }
        }
        c.complete(Ok(Reply {
            header: header.to_vec(),
            payload_len: off,
            recv,
            send,
        }));
        Ok(())
    }
    fn close(&self) {
        self.link.fail_all("closed by server");
    }
}

/// The in-memory test double as a [`Transport`](super::Transport): `listen` creates a [`MemListener`] under a
/// made-up address, `connect` finds it by that address. Not registered by any binary.
#[derive(Default)]
pub struct MemTransport {
    listeners: Mutex<HashMap<String, std::sync::Weak<MemListener>>>,
}

impl MemTransport {
    /// A new, empty transport.
    pub fn new() -> Arc<MemTransport> {
        Arc::new(MemTransport::default())
    }
}

/// A listener handle that unregisters nothing but forwards to the shared listener.
struct SharedListener(Arc<MemListener>);

impl Listener for SharedListener {
    fn accept(&self) -> Result<Result<Box<dyn ServerConn>>> {
        self.0.accept()
    }
    fn local_addr(&self) -> String {
        self.0.local_addr()
    }
    fn shutdown(&self) {
        self.0.shutdown()
    }
}

impl super::Transport for MemTransport {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn check_available(&self, _: &crate::Config) -> Result<()> {
        Ok(())
    }
    fn connect(&self, cfg: &crate::Config, pool: &Pool) -> Result<Box<dyn ClientConn>> {
        let _ = pool;
        let l = lock(&self.listeners)
            .get(&cfg.client.connect)
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| {
                Error::ConnectionClosed(format!("nothing listens at {}", cfg.client.connect))
            })?;
        l.connect()
    }
    fn listen(&self, cfg: &crate::Config, pool: &Pool) -> Result<Box<dyn Listener>> {
        let limits = Limits {
            max_segments: cfg.limits.max_segments,
            max_payload: cfg.limits.max_payload,
            max_header: super::MAX_HEADER,
            max_in_flight: cfg.limits.max_in_flight,
            inline_threshold: 0,
            rdma_payload: false,
        };
        let l = MemListener::new(pool.clone(), limits);
        lock(&self.listeners).insert(l.local_addr(), Arc::downgrade(&l));
        Ok(Box::new(SharedListener(l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolConfig;

    #[test]
    fn backlog_sees_queued_requests_and_recv_keeps_their_order() {
        let pool = Pool::new(&PoolConfig::default()).unwrap();
        let limits = Limits {
            max_segments: 4,
            max_payload: 1 << 20,
            max_header: super::super::MAX_HEADER,
            max_in_flight: 8,
            inline_threshold: 0,
            rdma_payload: false,
        };
        let l = MemListener::new(pool, limits);
        let c = l.connect().unwrap();
        let mut s = l.accept().unwrap().unwrap();
        assert!(!s.backlog(), "nothing sent yet");
        let req = |tag: u8| Request {
            header: vec![tag],
            send: Vec::new(),
            recv: Vec::new(),
        };
        let p1 = c.start(req(1)).unwrap();
        let p2 = c.start(req(2)).unwrap();
        assert!(s.backlog());
        assert!(s.backlog(), "asking twice loses nothing");
        let a = s.recv().unwrap().unwrap();
        assert_eq!(a.header, [1]);
        assert!(s.backlog(), "the second request waits");
        let b = s.recv().unwrap().unwrap();
        assert_eq!(b.header, [2]);
        assert!(!s.backlog());
        let r = s.replier();
        r.reply(b.id, b"b", &[]).unwrap();
        r.reply(a.id, b"a", &[]).unwrap();
        assert_eq!(p1.wait().unwrap().header, b"a");
        assert_eq!(p2.wait().unwrap().header, b"b");
    }

    fn test_limits() -> Limits {
        Limits {
            max_segments: 4,
            max_payload: 1 << 20,
            max_header: super::super::MAX_HEADER,
            max_in_flight: 64,
            inline_threshold: 0,
            rdma_payload: false,
        }
    }

    fn header_only(tag: u8) -> Request {
        Request {
            header: vec![tag],
            send: Vec::new(),
            recv: Vec::new(),
        }
    }

    /// A hang guard: generous, so only a request nobody will ever answer reaches it.
    const NEVER: std::time::Duration = std::time::Duration::from_secs(30);

    fn closed_within_guard(p: Pending<Reply>) -> String {
        match p.wait_timeout(NEVER) {
            Ok(Err(Error::ConnectionClosed(why))) => why,
            Ok(other) => panic!("expected ConnectionClosed, got {other:?}"),
            Err(_) => panic!("a request in flight was left waiting after the server side went"),
        }
    }

    #[test]
    fn requests_in_flight_fail_when_the_server_side_goes() {
        let pool = Pool::new(&PoolConfig::default()).unwrap();
        let l = MemListener::new(pool.clone(), test_limits());
        let c = l.connect().unwrap();
        let mut s = l.accept().unwrap().unwrap();
        // One request the server has received, one still queued toward it, both unanswered.
        let received = c.start(header_only(1)).unwrap();
        let queued = c.start(header_only(2)).unwrap();
        let inc = s.recv().unwrap().unwrap();
        assert_eq!(inc.header, [1]);
        drop(inc);
        drop(s);
        closed_within_guard(received);
        closed_within_guard(queued);
        match c.start(header_only(3)) {
            Err(Error::ConnectionClosed(_)) => {}
            other => panic!("a request after the server side went: {:?}", other.err()),
        }
        assert_eq!(pool.stats().slots_in_use(), 0, "no buffer left behind");
    }

    #[test]
    fn a_request_started_while_the_server_closes_fails_or_is_refused() {
        let pool = Pool::new(&PoolConfig::default()).unwrap();
        let l = MemListener::new(pool, test_limits());
        for _ in 0..200 {
            let c = l.connect().unwrap();
            let s = l.accept().unwrap().unwrap();
            let closer = std::thread::spawn(move || {
                s.replier().close();
                drop(s);
            });
            let mut started = Vec::new();
            for i in 0..16 {
                match c.start(header_only(i)) {
                    Ok(p) => started.push(p),
                    Err(Error::ConnectionClosed(_)) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            closer.join().unwrap();
            for p in started {
                closed_within_guard(p);
            }
        }
    }

    #[test]
    fn check_reply_names_the_limit_a_reply_exceeds() {
        let pool = Pool::new(&PoolConfig::default()).unwrap();
        let l = Limits {
            max_segments: 2,
            max_payload: 8192,
            max_header: 16,
            max_in_flight: 8,
            inline_threshold: 0,
            rdma_payload: false,
        };
        let buf = |n: usize| {
            let mut b = pool.get(n).unwrap();
            b.set_len(n);
            b.freeze()
        };
        let what = |r: Result<()>| match r {
            Err(Error::LimitExceeded { what, value, limit }) => (what, value, limit),
            other => panic!("{other:?}"),
        };
        assert!(super::super::check_reply(&[0; 16], &[buf(4096), buf(4096)], &l).is_ok());
        assert_eq!(
            what(super::super::check_reply(&[0; 17], &[], &l)),
            ("reply header length", 17, 16)
        );
        assert_eq!(
            what(super::super::check_reply(
                &[],
                &[buf(1), buf(1), buf(1)],
                &l
            )),
            ("reply payload segments", 3, 2)
        );
        assert_eq!(
            what(super::super::check_reply(&[], &[buf(4096), buf(4097)], &l)),
            ("reply payload", 8193, 8192)
        );
    }
}
