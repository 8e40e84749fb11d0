//! A small server built on the transport traits alone, and helpers, for the socket tests.
//!
//! The server interprets the first header byte of each request:
//! - `E` echo: replies header `R` + the rest of the request header, and the request payload
//!   reversed (cut to the reply capacity), in pool buffers of an odd 3000 bytes each;
//! - `G` generate: header `G len:u32 seed:u32`; replies `len` pattern bytes (cut to the
//!   reply capacity) in pool buffers of 4096 bytes each;
//! - `W` generate wide: as `G`, in pool buffers of 64 KiB each, and the replier's answer
//!   goes to the event channel;
//! - `H` hold: never replies (the request stays in flight);
//! - `Q` queue: header `Q n:u32`; held until `n` queued requests are in, then all are
//!   answered (as `E`) in reverse order of arrival;
//! - `O` overflow: first tries to reply one byte more than the capacity (which the
//!   transport must refuse), then twice to an unknown id, then replies as `E`; the
//!   replier's answers go to the event channel;
//! - `C` close: closes the connection through its replier;
//! - `X` crash: the connection thread returns, dropping everything.
//!
//! `E`, `G` and `W` are answered from a new thread per request, so replies overtake each
//! other.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpStream;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use zcio::pool::{ClassConfig, PoolConfig};
use zcio::transport::{Incoming, Limits, Listener, Replier, Transport};
use zcio::{Config, Iobuf, Pool};
use zcio_tcp::TcpTransport;

/// How long a test waits for something that should happen at once (a hang guard only).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// What the test server saw.
#[derive(Debug)]
pub enum Event {
    /// A connection was accepted (its limits), or a handshake failed (the error).
    Accepted(Result<Limits, String>),
    /// A request arrived.
    Request { id: u64, header: Vec<u8> },
    /// `recv` ended: `Ok(())` for a clean end of stream, or the error.
    RecvEnd(Result<(), zcio::Error>),
    /// A replier call made by an `O` or `W` request, and what it returned.
    ReplyResult(Result<(), zcio::Error>),
}

/// A small pool: 4 KiB x 1024, 64 KiB x 256, 1 MiB x 8.
pub fn pool() -> Pool {
    Pool::new(&PoolConfig {
        classes: vec![
            ClassConfig {
                size: 4 << 10,
                count: 1024,
                reserve: 0,
                arena_slots: 256,
            },
            ClassConfig {
                size: 64 << 10,
                count: 256,
                reserve: 0,
                arena_slots: 16,
            },
            ClassConfig {
                size: 1 << 20,
                count: 8,
                reserve: 0,
                arena_slots: 2,
            },
        ],
        wait_timeout: Duration::from_secs(5),
        stripes: 2,
    })
    .expect("pool")
}

/// A configuration listening on a free loopback port.
pub fn config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.client.timeout = Duration::from_secs(20);
    c
}

pub use zcio_test_support::pattern;

pub struct TestServer {
    pub addr: String,
    pub pool: Pool,
    pub events: Receiver<Event>,
    listener: Arc<dyn Listener>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with `cfg` (its listen address is used).
    pub fn start(cfg: &Config) -> TestServer {
        let pool = pool();
        let listener: Arc<dyn Listener> =
            Arc::from(TcpTransport.listen(cfg, &pool).expect("listen"));
        let (tx, events) = channel();
        let l = listener.clone();
        let p = pool.clone();
        let acceptor = std::thread::spawn(move || accept_loop(l, p, tx));
        TestServer {
            addr: listener.local_addr(),
            pool,
            events,
            listener,
            acceptor: Some(acceptor),
        }
    }

    /// A client configuration pointing here.
    pub fn client_config(&self) -> Config {
        let mut c = config();
        c.client.connect = self.addr.clone();
        c
    }

    /// The next event (panics after [`PATIENCE`]).
    pub fn next_event(&self) -> Event {
        match self.events.recv_timeout(PATIENCE) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => panic!("no server event within {PATIENCE:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("server gone"),
        }
    }

    /// Skips events until one matches `f`, returning it.
    pub fn wait_for<T>(&self, mut f: impl FnMut(Event) -> Option<T>) -> T {
        loop {
            if let Some(t) = f(self.next_event()) {
                return t;
            }
        }
    }

    /// Waits for the next `recv` end and returns it.
    pub fn next_recv_end(&self) -> Result<(), zcio::Error> {
        self.wait_for(|e| match e {
            Event::RecvEnd(r) => Some(r),
            _ => None,
        })
    }

    /// Waits for the next accept result.
    pub fn next_accept(&self) -> Result<Limits, String> {
        self.wait_for(|e| match e {
            Event::Accepted(r) => Some(r),
            _ => None,
        })
    }

    /// Waits until `n` requests have arrived.
    pub fn wait_requests(&self, n: usize) -> Vec<(u64, Vec<u8>)> {
        (0..n)
            .map(|_| {
                self.wait_for(|e| match e {
                    Event::Request { id, header } => Some((id, header)),
                    _ => None,
                })
            })
            .collect()
    }

    /// Waits until the server's pool has every buffer back.
    pub fn assert_pool_clean(&self) {
        wait_pool_clean(&self.pool, "server");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.listener.shutdown();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// Waits until `pool` has every buffer back (panics after [`PATIENCE`]).
pub fn wait_pool_clean(pool: &Pool, who: &str) {
    let t = std::time::Instant::now();
    while pool.stats().slots_in_use() != 0 {
        assert!(
            t.elapsed() < PATIENCE,
            "{who} pool still has buffers in use:\n{}",
            pool.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn accept_loop(l: Arc<dyn Listener>, pool: Pool, tx: Sender<Event>) {
    loop {
        match l.accept() {
            Err(_) => return,
            Ok(Err(e)) => {
                let _ = tx.send(Event::Accepted(Err(e.to_string())));
            }
            Ok(Ok(conn)) => {
                let _ = tx.send(Event::Accepted(Ok(conn.limits())));
                let (tx, pool) = (tx.clone(), pool.clone());
                std::thread::spawn(move || serve(conn, pool, tx));
            }
        }
    }
}

fn u32_at(h: &[u8], at: usize) -> usize {
    h.get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
}

/// `data` in pool buffers of `chunk` bytes.
fn in_buffers(pool: &Pool, data: &[u8], chunk: usize) -> Vec<Iobuf> {
    data.chunks(chunk)
        .map(|c| {
            let mut b = pool.get(c.len()).expect("server pool buffer");
            b.copy_from_slice(c);
            b.freeze()
        })
        .collect()
}

fn echo_reply(pool: &Pool, inc: &Incoming) -> (Vec<u8>, Vec<Iobuf>) {
    let mut data: Vec<u8> = inc.payload.iter().flat_map(|b| b.iter().copied()).collect();
    data.reverse();
    data.truncate(inc.reply_capacity);
    let mut h = b"R".to_vec();
    h.extend_from_slice(&inc.header[1..]);
    (h, in_buffers(pool, &data, 3000))
}

fn serve(mut conn: Box<dyn zcio::transport::ServerConn>, pool: Pool, tx: Sender<Event>) {
    let replier: Arc<dyn Replier> = conn.replier();
    let mut held = Vec::new();
    let mut queued: Vec<Incoming> = Vec::new();
    let workers = Arc::new(Mutex::new(Vec::<JoinHandle<()>>::new()));
    loop {
        let inc = match conn.recv() {
            Ok(Some(inc)) => inc,
            Ok(None) => {
                let _ = tx.send(Event::RecvEnd(Ok(())));
                break;
            }
            Err(e) => {
                let _ = tx.send(Event::RecvEnd(Err(e)));
                break;
            }
        };
        let _ = tx.send(Event::Request {
            id: inc.id,
            header: inc.header.clone(),
        });
        match inc.header.first().copied() {
            Some(kind @ (b'E' | b'G' | b'W')) => {
                let (r, p, tx) = (replier.clone(), pool.clone(), tx.clone());
                let h = std::thread::spawn(move || {
                    let (header, payload) = if kind == b'E' {
                        echo_reply(&p, &inc)
                    } else {
                        let n = u32_at(&inc.header, 1).min(inc.reply_capacity);
                        let data = pattern(u32_at(&inc.header, 5) as u64, n);
                        let chunk = if kind == b'W' { 64 << 10 } else { 4096 };
                        (vec![kind], in_buffers(&p, &data, chunk))
                    };
                    let id = inc.id;
                    drop(inc);
                    let res = r.reply(id, &header, &payload);
                    if kind == b'W' {
                        let _ = tx.send(Event::ReplyResult(res));
                    }
                });
                lock(&workers).push(h);
            }
            Some(b'Q') => {
                let n = u32_at(&inc.header, 1);
                queued.push(inc);
                if queued.len() >= n {
                    for inc in queued.drain(..).rev() {
                        let (h, p) = echo_reply(&pool, &inc);
                        replier.reply(inc.id, &h, &p).expect("reply");
                    }
                }
            }
            Some(b'O') => {
                let (h, p) = echo_reply(&pool, &inc);
                let mut too_much = p.clone();
                let pad = vec![0; inc.reply_capacity + 1 - total(&p)];
                too_much.extend(in_buffers(&pool, &pad, 4096));
                let _ = tx.send(Event::ReplyResult(replier.reply(inc.id, &h, &too_much)));
                let _ = tx.send(Event::ReplyResult(replier.reply(
                    inc.id ^ (1 << 63),
                    &h,
                    &p,
                )));
                let _ = tx.send(Event::ReplyResult(replier.reply(inc.id, &h, &p)));
                let _ = tx.send(Event::ReplyResult(replier.reply(inc.id, &h, &p)));
            }
            Some(b'C') => {
                held.push(inc);
                replier.close();
            }
            Some(b'X') => {
                let _ = tx.send(Event::RecvEnd(Ok(())));
                return;
            }
            _ => held.push(inc),
        }
    }
    for h in std::mem::take(&mut *lock(&workers)) {
        let _ = h.join();
    }
}

fn total(p: &[Iobuf]) -> usize {
    p.iter().map(|b| b.len()).sum()
}

use zcio::lock;

/// A raw connection that has done a valid handshake with default limits.
pub fn raw_handshaken(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("raw connect");
    let b = zcio_test_support::handshake(&mut s, PATIENCE).expect("raw handshake");
    zcio_tcp::wire::Hello::decode(&b).expect("server hello");
    s
}
