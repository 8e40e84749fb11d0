//! Attacks on a real server over TCP while well-behaved clients work: each test checks
//! that the attack is contained (the server cuts it off, refuses it or pushes back) and
//! that every good client's request succeeded with the right bytes.
//!
//! Attackers connect from other loopback addresses (127.0.0.2, ...) than the good clients
//! (127.0.0.1), as hosts of their own, so per-address limits apply to them alone.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zcio::conformance::Harness;
use zcio::proto::{self, OpenFlags, Req, Resp, NONCE_LEN};
use zcio::{Client, Config, Error};
use zcio_tcp::wire::{HELLO_LEN, PREFIX_LEN};
use zcio_tcp::TcpTransport;
use zcio_test_support::{closed_within, handshake, hello_bytes, pattern, request_frame};

/// A hang guard, never a speed check.
const PATIENCE: Duration = Duration::from_secs(30);

fn harness(tweak: impl FnOnce(&mut Config)) -> Harness {
    Harness::start(Arc::new(TcpTransport), tweak)
}

/// Deterministic bytes for client `who`, round `round`.
fn data(who: usize, round: usize, len: usize) -> Vec<u8> {
    pattern(who as u64 * 1_000_003 + round as u64, len)
}

/// Good clients: each connects `rounds` times (a new connection each round, so the
/// handshake is exercised under attack too), writes its own file and reads it back.
/// Returns, per client, the rounds that succeeded with the right bytes, or the first error.
fn good_clients(
    h: &Harness,
    n: usize,
    rounds: usize,
    len: usize,
    tweak: impl Fn(&mut Config) + Clone + Send + 'static,
) -> Vec<JoinHandle<Result<usize, String>>> {
    (0..n)
        .map(|who| {
            let cfg = h.cfg.clone();
            let tweak = tweak.clone();
            std::thread::spawn(move || {
                let mut cfg = cfg;
                tweak(&mut cfg);
                for round in 0..rounds {
                    let pool = zcio::Pool::new(&cfg.pool).map_err(|e| e.to_string())?;
                    let c = Client::connect_transport(&cfg, &TcpTransport, pool)
                        .map_err(|e| format!("client {who} round {round}: connect: {e}"))?;
                    let name = format!("good-{who}");
                    let want = data(who, round, len);
                    let f = c
                        .open(&name, OpenFlags::rw() | OpenFlags::CREATE)
                        .map_err(|e| format!("client {who} round {round}: open: {e}"))?;
                    let w = f
                        .pwrite(&want, 0)
                        .map_err(|e| format!("client {who} round {round}: write: {e}"))?;
                    if w != len {
                        return Err(format!("client {who} round {round}: wrote {w} of {len}"));
                    }
                    let mut got = vec![0u8; len];
                    let r = f
                        .pread(&mut got, 0)
                        .map_err(|e| format!("client {who} round {round}: read: {e}"))?;
                    if r != len || got != want {
                        return Err(format!("client {who} round {round}: read back wrong bytes"));
                    }
                    f.close()
                        .map_err(|e| format!("client {who} round {round}: close: {e}"))?;
                }
                Ok(rounds)
            })
        })
        .collect()
}

fn assert_all_good(clients: Vec<JoinHandle<Result<usize, String>>>, rounds: usize) {
    for c in clients {
        assert_eq!(c.join().expect("good client thread"), Ok(rounds));
    }
}

/// A socket to `addr` from loopback address `from` (e.g. "127.0.0.2").
fn connect_from(from: &str, addr: &str) -> TcpStream {
    zcio_test_support::connect_from_str(from.parse().unwrap(), addr).unwrap()
}

/// A transport handshake from `from`, the server's hello read back.
fn handshake_from(from: &str, addr: &str) -> TcpStream {
    let mut s = connect_from(from, addr);
    handshake(&mut s, PATIENCE).unwrap();
    s
}

/// Sends `req` and reads its reply (`None` if the server closed the connection; an error
/// reply as its message).
fn call(s: &mut TcpStream, id: u64, req: &Req) -> Option<Result<Resp, String>> {
    call_with(s, id, req, &[]).map(|r| r.map(|(resp, _)| resp))
}

/// As [`call`], sending `payload` with the request; the reply comes with its payload.
fn call_with(
    s: &mut TcpStream,
    id: u64,
    req: &Req,
    payload: &[u8],
) -> Option<Result<(Resp, Vec<u8>), String>> {
    s.write_all(&request_frame(id, req, payload)).ok()?;
    // A slow reply (a loaded machine) is not a closed connection.
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut p = [0u8; PREFIX_LEN];
    s.read_exact(&mut p).ok()?;
    let header_len = u16::from_le_bytes([p[6], p[7]]) as usize;
    let payload_len = u32::from_le_bytes(p[16..20].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; header_len + payload_len];
    s.read_exact(&mut rest).ok()?;
    let payload = rest.split_off(header_len);
    Some(match proto::decode_reply(req, &rest) {
        Ok(r) => Ok((r, payload)),
        Err(Error::Remote { message, .. }) => Err(message),
        Err(e) => panic!("undecodable reply: {e}"),
    })
}

/// A connection from `from` through the transport handshake and the protocol hello (no
/// token set), or the hello's answer if the server refused it (`Err`), or `None` if it
/// closed the connection.
fn hello_from(from: &str, addr: &str) -> Option<Result<TcpStream, String>> {
    let mut s = handshake_from(from, addr);
    let hello = Req::Hello {
        version: proto::VERSION,
        client_nonce: [3; NONCE_LEN],
    };
    match call(&mut s, 1, &hello)? {
        Ok(Resp::Hello(_)) => Some(Ok(s)),
        Ok(other) => panic!("hello answered {other:?}"),
        Err(msg) => Some(Err(msg)),
    }
}

#[test]
fn slow_and_silent_handshakes_lock_nobody_out() {
    let h = harness(|c| {
        c.server.idle_timeout = None;
        c.server.max_handshakes_per_addr = 8;
    });
    let addr = h.cfg.client.connect.clone();
    // Host 127.0.0.2: more silent sockets than the server has handshake slots (64). Only
    // 8 may be in handshake at once; the acceptor closes the rest at once.
    let silent: Vec<TcpStream> = (0..80).map(|_| connect_from("127.0.0.2", &addr)).collect();
    // Host 127.0.0.3: sockets that trickle a byte of their hello every 400 ms, never
    // finishing it (23 of 24 bytes take 9.2 s). A timeout per read would never fire; the
    // handshake's total deadline (5 s) must end them while they still trickle.
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<JoinHandle<bool>> = (0..3)
        .map(|_| {
            let mut s = connect_from("127.0.0.3", &addr);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let hello = hello_bytes();
                for b in &hello[..HELLO_LEN - 1] {
                    if stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    // A failed write: the server has closed the socket (reset).
                    if s.write_all(&[*b]).is_err()
                        || closed_within(&mut s, Duration::from_millis(400))
                    {
                        return true;
                    }
                }
                false
            })
        })
        .collect();
    // Good clients: a handshake that waited for a free slot behind the attackers would
    // outlast their 3 s timeout (the attackers hold theirs for 5 s).
    let good = good_clients(&h, 4, 5, 100_000, |c| {
        c.client.timeout = Duration::from_secs(3);
    });
    assert_all_good(good, 5);
    for t in tricklers {
        assert!(
            t.join().unwrap(),
            "a trickling handshake outlived the handshake's total deadline"
        );
    }
    stop.store(true, Ordering::Relaxed);
    drop(silent);
    h.assert_server_clean();
}

#[test]
fn never_authenticating_connections_are_cut_off_and_wrong_tokens_slowed() {
    let token = "correct horse battery staple";
    let h = harness(|c| {
        c.server.token = token.into();
        c.server.auth_timeout = Some(Duration::from_millis(1500));
        c.server.idle_timeout = Some(Duration::from_secs(60));
        c.client.token = token.into();
    });
    let addr = h.cfg.client.connect.clone();
    // Host 127.0.0.2: connections that say hello again and again (each answered) and never
    // authenticate. Their frames must not keep them alive: the 1.5 s authentication
    // deadline closes them, long before the 60 s idle timeout.
    let chatty: Vec<JoinHandle<bool>> = (0..6)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = handshake_from("127.0.0.2", &addr);
                let t0 = Instant::now();
                let mut id = 1 + i * 1000;
                while t0.elapsed() < PATIENCE {
                    let hello = Req::Hello {
                        version: proto::VERSION,
                        client_nonce: [7; NONCE_LEN],
                    };
                    if call(&mut s, id, &hello).is_none() {
                        return true;
                    }
                    id += 1;
                    if closed_within(&mut s, Duration::from_millis(200)) {
                        return true;
                    }
                }
                false
            })
        })
        .collect();
    // Host 127.0.0.3: wrong tokens. The first three are refused as wrong (two are free,
    // the third starts the address's back-off); the next attempt, at once, is refused
    // unchecked. A payload sent before authentication ends the connection.
    let mut s = handshake_from("127.0.0.3", &addr);
    let mut guesses = Vec::new();
    for id in 0..4u64 {
        let cn = [id as u8; NONCE_LEN];
        let hr = match call(
            &mut s,
            10 + 2 * id,
            &Req::Hello {
                version: proto::VERSION,
                client_nonce: cn,
            },
        ) {
            Some(Ok(Resp::Hello(hr))) => hr,
            other => panic!("hello {id} answered {other:?}"),
        };
        let mac = proto::client_mac(b"wrong guess", &cn, &hr.server_nonce);
        guesses.push(call(&mut s, 11 + 2 * id, &Req::Auth { mac }));
    }
    match &guesses[..] {
        [Some(Err(a)), Some(Err(b)), Some(Err(c)), Some(Err(d))] => {
            for wrong in [a, b, c] {
                assert!(wrong.contains("wrong token"), "{wrong}");
            }
            assert!(d.contains("try again in"), "{d}");
        }
        other => panic!("wrong tokens answered {other:?}"),
    }
    let fh_write = request_frame(99, &Req::Write { fh: 1, offset: 0 }, &[0xAB; 64 << 10]);
    let _ = s.write_all(&fh_write);
    assert!(
        closed_within(&mut s, PATIENCE),
        "payload before authentication was kept"
    );
    // Meanwhile the good clients (127.0.0.1, the right token) are unaffected.
    let good = good_clients(&h, 4, 5, 100_000, |_| {});
    assert_all_good(good, 5);
    for t in chatty {
        assert!(
            t.join().unwrap(),
            "a connection that never authenticated stayed open"
        );
    }
    let st = h.server.stats();
    let timeouts = st.auth_timeouts.load(Ordering::SeqCst);
    assert!(
        timeouts >= 6,
        "{timeouts} connections closed by the authentication deadline"
    );
    assert!(st.auth_failures.load(Ordering::SeqCst) >= 4);
    h.assert_server_clean();
}

#[test]
fn a_pool_hog_gets_back_pressure_and_the_others_keep_writing() {
    // 1 MiB buffers: 24 in the pool (the harness's test pool). Each connection may hold 2
    // MiB of request payload; a short pool wait, so that a connection failed for want of
    // buffers (the old behaviour) would show.
    let h = harness(|c| {
        c.server.max_payload_in_flight = 2 << 20;
        c.server.workers = 2;
        c.pool.wait_timeout = Duration::from_millis(100);
    });
    // Hogs: 3 connections, each keeping 32 x 1 MiB writes in flight (from their own big
    // pools): 96 MiB asked of a server pool of 24 MiB.
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<JoinHandle<Result<usize, String>>> = (0..3)
        .map(|i| {
            let (mut cfg, stop) = (h.cfg.clone(), stop.clone());
            cfg.pool.wait_timeout = PATIENCE;
            for c in &mut cfg.pool.classes {
                if c.size == 1 << 20 {
                    c.count = 32;
                }
            }
            std::thread::spawn(move || {
                let pool = zcio::Pool::new(&cfg.pool).map_err(|e| e.to_string())?;
                let c = Client::connect_transport(&cfg, &TcpTransport, pool)
                    .map_err(|e| e.to_string())?;
                let f = c
                    .open(&format!("hog-{i}"), OpenFlags::rw() | OpenFlags::CREATE)
                    .map_err(|e| e.to_string())?;
                let block = vec![i as u8; 1 << 20];
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) {
                    let pending: Vec<_> = (0..32u64)
                        .map(|k| {
                            let mut b = c.get_buffers(1 << 20, 1)?;
                            b.buffers_mut()[0].copy_from_slice(&block);
                            f.zero_writev_async(b, k << 20)
                        })
                        .collect::<Result<_, _>>()
                        .map_err(|e| format!("hog {i}: {e}"))?;
                    for p in pending {
                        p.wait().map_err(|e| format!("hog {i}: {e}"))?;
                    }
                    rounds += 1;
                }
                Ok(rounds)
            })
        })
        .collect();
    let good = good_clients(&h, 4, 8, 1 << 20, |c| c.pool.wait_timeout = PATIENCE);
    assert_all_good(good, 8);
    stop.store(true, Ordering::Relaxed);
    for hog in hogs {
        // Back-pressure, not failure: the hogs' own writes all succeed too.
        let r = hog.join().unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    h.assert_server_clean();
}

#[test]
fn one_address_gets_its_share_of_connections_and_the_others_still_connect() {
    const CAP: usize = 4;
    let h = harness(|c| {
        c.server.max_connections_per_addr = CAP;
        c.server.idle_timeout = None;
    });
    let addr = h.cfg.client.connect.clone();
    // Host 127.0.0.2 opens its share, each connection answered...
    let mut mine: Vec<TcpStream> = (0..CAP)
        .map(|i| match hello_from("127.0.0.2", &addr) {
            Some(Ok(s)) => s,
            other => panic!("connection {i} of 127.0.0.2 within its share: {other:?}"),
        })
        .collect();
    // ...and the next is refused with a clear reason (Busy, as over max_connections),
    // then closed.
    match hello_from("127.0.0.2", &addr) {
        Some(Err(msg)) => assert!(
            msg.contains(&format!("limit of {CAP} connections")),
            "refusal says {msg:?}"
        ),
        other => panic!(
            "connection {CAP} of 127.0.0.2: {:?}",
            other.map(|r| r.err())
        ),
    }
    // Another host still connects and moves bytes, checked.
    let mut s = match hello_from("127.0.0.3", &addr) {
        Some(Ok(s)) => s,
        other => panic!("127.0.0.3 while 127.0.0.2 is at its cap: {other:?}"),
    };
    let fh = match call(
        &mut s,
        2,
        &Req::Open {
            path: "other-host".into(),
            flags: OpenFlags::rw() | OpenFlags::CREATE,
            mode: 0o644,
        },
    ) {
        Some(Ok(Resp::Open { fh, .. })) => fh,
        other => panic!("open from 127.0.0.3: {other:?}"),
    };
    let want = data(3, 0, 4000);
    match call_with(&mut s, 3, &Req::Write { fh, offset: 0 }, &want) {
        Some(Ok((Resp::Write { written }, _))) => assert_eq!(written as usize, want.len()),
        other => panic!("write from 127.0.0.3: {:?}", other.map(|r| r.map(|x| x.0))),
    }
    let read = Req::Read {
        fh,
        offset: 0,
        len: want.len() as u32,
    };
    match call_with(&mut s, 4, &read, &[]) {
        Some(Ok((Resp::Read { .. }, got))) => assert!(got == want, "read back wrong bytes"),
        other => panic!("read from 127.0.0.3: {:?}", other.map(|r| r.map(|x| x.0))),
    }
    assert_eq!(std::fs::read(h.path("other-host")).unwrap(), want);
    // So do the good clients from 127.0.0.1.
    assert_all_good(good_clients(&h, 2, 2, 100_000, |_| {}), 2);
    // Once one of 127.0.0.2's connections goes, its place is free again (as soon as the
    // server has seen it go: retried until then).
    drop(mine.pop());
    let t0 = Instant::now();
    loop {
        match hello_from("127.0.0.2", &addr) {
            Some(Ok(s)) => {
                mine.push(s);
                break;
            }
            other => assert!(
                t0.elapsed() < PATIENCE,
                "127.0.0.2 still refused after closing one: {other:?}"
            ),
        }
    }
    assert!(h.server.stats().refused.load(Ordering::SeqCst) >= 1);
    drop(mine);
    drop(s);
    h.assert_server_clean();
}
