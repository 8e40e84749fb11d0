//! Hostile TCP peers, for `zcio bench --hostile N`: attackers that hammer a server while
//! the benchmark measures what well-behaved clients still get.
//!
//! Each attacker thread cycles through the classes below (or those `--attack` picks) on
//! fresh connections until told to stop. Against a server on 127.0.0.1 the attackers
//! connect from 127.0.0.2, another host as far as per-address limits go, so those limits
//! do not fall on the benchmark's own clients. None of them may crash the server, make it exceed its memory bounds, or stall
//! its other clients; each attack must end with an error reply or the server closing
//! that connection (or, for the slow ones, the attacker giving up).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use zcio::proto::{OpenFlags, Req, Resp, NONCE_LEN};
use zcio_tcp::wire::{Kind, Prefix};
use zcio_test_support::{closed_within, connect_from, hello_bytes, request_frame};

/// The attack classes, in the order each attacker cycles through them.
pub(crate) const CLASSES: [&str; 12] = [
    "garbage bytes",
    "truncated frame",
    "huge lengths",
    "duplicate request ids",
    "reply where a request is expected",
    "thousands of tiny requests",
    "slowloris partial frame",
    "oversized in-flight window",
    "slow handshake",
    "never authenticating",
    "pool hog",
    "slow reader",
];

/// Short names for `--attack`, in the order of [`CLASSES`].
pub(crate) const CLASS_KEYS: [&str; CLASSES.len()] = [
    "garbage",
    "truncated",
    "huge",
    "dup-ids",
    "reply",
    "tiny-flood",
    "slowloris",
    "window",
    "slow-handshake",
    "no-auth",
    "pool-hog",
    "slow-reader",
];

/// Parses `--attack` values (keys of [`CLASS_KEYS`]) into class indices.
pub(crate) fn class_arg(s: &str) -> Result<usize, String> {
    CLASS_KEYS
        .iter()
        .position(|k| *k == s)
        .ok_or_else(|| format!("unknown attack `{s}` (have: {})", CLASS_KEYS.join(", ")))
}

/// Counts per class of how attacks ended.
#[derive(Default)]
pub(crate) struct AttackStats {
    pub(crate) attacks: [AtomicU64; CLASSES.len()],
    /// Attacks the server contained: a close, an error reply or back-pressure.
    pub(crate) repelled: [AtomicU64; CLASSES.len()],
}

fn prefix(kind: Kind, header_len: usize, id: u64, payload_len: usize, recv_cap: usize) -> [u8; 24] {
    Prefix {
        kind,
        header_len,
        id,
        payload_len,
        recv_cap,
    }
    .encode()
}

/// True once the server either closes the connection or sends something back (replies),
/// within `limit`: it dealt with what it was sent rather than sitting on it.
fn server_answers_or_closes(s: &mut TcpStream, limit: Duration) -> bool {
    let _ = s.set_read_timeout(Some(limit));
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        // End of stream (closed) or reply bytes (answered).
        Ok(0) | Ok(1..) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Connects to `addr`; to a loopback server from 127.0.0.2 (see the module documentation).
fn connect(addr: &str) -> Option<TcpStream> {
    let s = match addr.parse().ok()? {
        std::net::SocketAddr::V4(d) if d.ip().is_loopback() => {
            connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), d).ok()?
        }
        _ => TcpStream::connect(addr).ok()?,
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    Some(s)
}

/// Handshake, reading the server's hello back.
fn handshake(addr: &str) -> Option<TcpStream> {
    let mut s = connect(addr)?;
    zcio_test_support::handshake(&mut s, Duration::from_secs(5)).ok()?;
    Some(s)
}

fn request(id: u64, req: &Req) -> Vec<u8> {
    request_frame(id, req, &[])
}

/// Sends `req` as request `id` and reads its reply (one without payload), decoded.
fn call(s: &mut TcpStream, id: u64, req: &Req) -> Option<Resp> {
    s.write_all(&request(id, req)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut p = [0u8; zcio_tcp::wire::PREFIX_LEN];
    s.read_exact(&mut p).ok()?;
    let limits = zcio::Config::default().limits;
    let p = zcio_tcp::wire::decode_prefix(&p, Kind::Reply, &limits).ok()?;
    if p.id != id || p.payload_len != 0 {
        return None;
    }
    let mut h = vec![0u8; p.header_len];
    s.read_exact(&mut h).ok()?;
    zcio::proto::decode_reply(req, &h).ok()
}

/// Runs one attack of class `k`; true if the server repelled it.
fn attack(addr: &str, k: usize, stop: &AtomicBool) -> bool {
    let mut rng = rand::thread_rng();
    match k {
        0 => {
            let Some(mut s) = connect(addr) else {
                return false;
            };
            let junk: Vec<u8> = (0..rng.gen_range(1..4096)).map(|_| rng.gen()).collect();
            let _ = s.write_all(&junk);
            closed_within(&mut s, Duration::from_secs(10))
        }
        1 => {
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let p = prefix(Kind::Request, 100, 1, 0, 0);
            let _ = s.write_all(&p[..rng.gen_range(1..24)]);
            let _ = s.shutdown(std::net::Shutdown::Write);
            closed_within(&mut s, Duration::from_secs(10))
        }
        2 => {
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let p = match rng.gen_range(0..3) {
                0 => prefix(Kind::Request, 65535, 1, 0, 0),
                1 => prefix(Kind::Request, 4, 1, u32::MAX as usize, 0),
                _ => prefix(Kind::Request, 4, 1, 0, u32::MAX as usize),
            };
            let _ = s.write_all(&p);
            closed_within(&mut s, Duration::from_secs(10))
        }
        3 => {
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            // The same id twice while the first may be in flight, never reading replies.
            let r = request(
                7,
                &Req::Stat {
                    path: String::new(),
                },
            );
            for _ in 0..64 {
                if s.write_all(&r).is_err() {
                    break;
                }
            }
            // A repeat of an id still in flight is a protocol violation (the server closes);
            // one whose first use was already answered is a new request (it is answered).
            server_answers_or_closes(&mut s, Duration::from_secs(10))
        }
        4 => {
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let mut v = prefix(Kind::Reply, 4, 1, 0, 0).to_vec();
            v.extend_from_slice(&[0, 0, 0, 0]);
            let _ = s.write_all(&v);
            closed_within(&mut s, Duration::from_secs(10))
        }
        5 => {
            // Thousands of tiny valid requests, pipelined, replies never read: the server
            // must push back (its in-flight limit, then TCP) rather than queue without end.
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let mut sent = 0;
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            // 100000 x 46 bytes: more than the socket buffers hold.
            for id in 0..100_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = request(
                    id,
                    &Req::Hello {
                        version: zcio::proto::VERSION,
                        client_nonce: [0; NONCE_LEN],
                    },
                );
                if s.write_all(&r).is_err() {
                    break;
                }
                sent += 1;
            }
            // Contained if the server pushed back (it stopped reading: its in-flight limit,
            // then TCP), or kept answering valid requests; either way it stayed bounded.
            if sent < 100_000 {
                return true;
            }
            let mut first = [0u8; 28];
            s.read_exact(&mut first).is_ok() || closed_within(&mut s, Duration::from_secs(2))
        }
        6 => {
            // One byte of a frame every 100 ms: the idle timeout must end it; the attacker
            // gives up after 3 s (the server's default idle timeout is much longer).
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let p = prefix(Kind::Request, 10, 1, 0, 0);
            let t0 = Instant::now();
            for b in p.iter() {
                if stop.load(Ordering::Relaxed) || t0.elapsed() > Duration::from_secs(3) {
                    break;
                }
                if s.write_all(&[*b]).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // Not closed yet is expected: what matters is that the others were served.
            true
        }
        8 => {
            // A hello a byte every 200 ms, never finished: the handshake's total deadline
            // (5 s) must end it, however the bytes trickle.
            let Some(mut s) = connect(addr) else {
                return false;
            };
            let hello = hello_bytes();
            for b in &hello[..hello.len() - 1] {
                if stop.load(Ordering::Relaxed) {
                    return true;
                }
                if s.write_all(&[*b]).is_err() {
                    return true;
                }
                if closed_within(&mut s, Duration::from_millis(200)) {
                    return true;
                }
            }
            closed_within(&mut s, Duration::from_secs(10))
        }
        9 => {
            // A transport handshake, then a request (answered "hello and authentication
            // come first") every 200 ms or so, never a hello: the server must close it (its
            // authentication deadline, or its limit of refused requests) although it
            // keeps sending frames.
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let t0 = Instant::now();
            let mut id = 1;
            while t0.elapsed() < Duration::from_secs(30) {
                if stop.load(Ordering::Relaxed) {
                    return true;
                }
                let r = request(
                    id,
                    &Req::Stat {
                        path: String::new(),
                    },
                );
                if s.write_all(&r).is_err() {
                    return true;
                }
                id += 1;
                // Reads the answer and paces the loop (about 200 ms a request).
                if closed_within(&mut s, Duration::from_millis(100)) {
                    return true;
                }
            }
            false
        }
        10 => {
            // 1 MiB writes (to a made-up handle: cheap to refuse, but the payload is read
            // into the pool first) pipelined as fast as the server takes them, for 3 s,
            // replies drained by another thread. Contained: the server pushes back (the
            // connection's payload budget) instead of giving the pool away or failing.
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let hello = request(
                1,
                &Req::Hello {
                    version: zcio::proto::VERSION,
                    client_nonce: [1; NONCE_LEN],
                },
            );
            if s.write_all(&hello).is_err() {
                return false;
            }
            let Ok(mut r) = s.try_clone() else {
                return false;
            };
            let drain = std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                let _ = r.set_read_timeout(Some(Duration::from_secs(10)));
                while matches!(r.read(&mut buf), Ok(1..)) {}
            });
            let header = Req::Write {
                fh: u64::MAX,
                offset: 0,
            }
            .encode();
            let payload = vec![0xA5u8; 1 << 20];
            let t0 = Instant::now();
            let mut id = 2u64;
            while t0.elapsed() < Duration::from_secs(3) && !stop.load(Ordering::Relaxed) {
                let mut v = prefix(Kind::Request, header.len(), id, payload.len(), 0).to_vec();
                v.extend_from_slice(&header);
                // A failed write: the server closed the connection (it went past the
                // negotiated in-flight window, which it need not tolerate).
                if s.write_all(&v).is_err() || s.write_all(&payload).is_err() {
                    break;
                }
                id += 1;
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = drain.join();
            // Contained either way (pushed back or closed); what it cost the others is
            // the benchmark's measure.
            true
        }
        11 => {
            // Authenticates, opens the benchmark's first file, asks for 64 x 1 MiB of it
            // (the negotiated in-flight window) and then never reads a byte of the
            // answers, for up to 5 s. Contained: the replies queue for this connection
            // alone, up to the server's output-queue cap, after which the server reads no
            // further request of it (or fails it at the reply deadline); other clients
            // are not held up.
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            let hello = Req::Hello {
                version: zcio::proto::VERSION,
                client_nonce: [2; NONCE_LEN],
            };
            if !matches!(call(&mut s, 1, &hello), Some(Resp::Hello(_))) {
                return false;
            }
            let open = Req::Open {
                path: "zcio-bench.0".into(),
                flags: OpenFlags::READ,
                mode: 0,
            };
            let Some(Resp::Open { fh, size }) = call(&mut s, 2, &open) else {
                return false;
            };
            const MIB: u64 = 1 << 20;
            let mut reads = Vec::new();
            for i in 0..64u64 {
                let offset = if size > MIB {
                    (i * MIB) % (size - MIB)
                } else {
                    0
                };
                let h = Req::Read {
                    fh,
                    offset,
                    len: MIB as u32,
                }
                .encode();
                reads.extend_from_slice(&prefix(Kind::Request, h.len(), 3 + i, 0, MIB as usize));
                reads.extend_from_slice(&h);
            }
            // The requests are small; a failed write is the server closing the connection.
            if s.write_all(&reads).is_err() {
                return true;
            }
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
            true
        }
        _ => {
            // More requests in flight than negotiated, before hello: each is refused with
            // an error reply ("hello first"), or the connection is closed.
            let Some(mut s) = handshake(addr) else {
                return false;
            };
            for id in 0..200u64 {
                let r = request(
                    id + 1000,
                    &Req::Stat {
                        path: String::new(),
                    },
                );
                if s.write_all(&r).is_err() {
                    break;
                }
            }
            let mut first = [0u8; 28];
            match s.read_exact(&mut first) {
                // A reply frame whose status (first header word) is an error.
                Ok(()) => u32::from_le_bytes([first[24], first[25], first[26], first[27]]) != 0,
                Err(_) => true,
            }
        }
    }
}

/// Starts `n` attacker threads against `addr`, cycling through `classes` (indices into
/// [`CLASSES`]; empty: all); they run until `stop`.
pub(crate) fn start(
    addr: String,
    n: usize,
    classes: &[usize],
    stop: Arc<AtomicBool>,
    stats: Arc<AttackStats>,
) -> Vec<std::thread::JoinHandle<()>> {
    let classes: Arc<Vec<usize>> = Arc::new(if classes.is_empty() {
        (0..CLASSES.len()).collect()
    } else {
        classes.to_vec()
    });
    (0..n)
        .map(|i| {
            let (addr, stop, stats) = (addr.clone(), stop.clone(), stats.clone());
            let classes = classes.clone();
            std::thread::spawn(move || {
                let mut j = i % classes.len();
                while !stop.load(Ordering::Relaxed) {
                    let k = classes[j];
                    stats.attacks[k].fetch_add(1, Ordering::Relaxed);
                    if attack(&addr, k, &stop) {
                        stats.repelled[k].fetch_add(1, Ordering::Relaxed);
                    }
                    j = (j + 1) % classes.len();
                }
            })
        })
        .collect()
}
