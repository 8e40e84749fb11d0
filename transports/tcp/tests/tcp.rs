//! The TCP transport over real sockets on 127.0.0.1, driven through the transport traits.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{config, pattern, pool, raw_handshaken, Event, TestServer, PATIENCE};
use zcio::transport::{ClientConn, Pending, RecvSeg, Reply, Request, SendSeg, Transport};
use zcio::{Config, Error, Pool};
use zcio_tcp::wire::{Hello, Kind, Prefix, HELLO_LEN, PREFIX_LEN};
use zcio_tcp::TcpTransport;

/// A listener on the test config, a client connected to it and the server's end of that
/// connection (taking its buffers from `spool`); the listener is returned to keep it open.
fn connected_pair(
    spool: &Pool,
) -> (
    Box<dyn zcio::transport::Listener>,
    Box<dyn ClientConn>,
    Box<dyn zcio::transport::ServerConn>,
) {
    let cfg = config();
    let listener = TcpTransport.listen(&cfg, spool).expect("listen");
    let mut ccfg = cfg;
    ccfg.client.connect = listener.local_addr();
    let c = connect(&ccfg);
    let s = listener.accept().expect("accept").expect("handshake");
    (listener, c, s)
}

fn connect(cfg: &Config) -> Box<dyn ClientConn> {
    TcpTransport.connect(cfg, &pool()).expect("connect")
}

fn recv_segs(pool: &Pool, sizes: &[usize]) -> Vec<RecvSeg> {
    sizes
        .iter()
        .map(|&n| RecvSeg::Pool(pool.get(n).expect("client buffer")))
        .collect()
}

/// Receive segments of `sizes`, every third one caller heap memory, the others pool
/// buffers.
fn mixed_recv_segs(pool: &Pool, sizes: &[usize]) -> Vec<RecvSeg> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| match i % 3 {
            2 => RecvSeg::Owned(vec![0xEE; n]),
            _ => RecvSeg::Pool(pool.get(n).expect("client buffer")),
        })
        .collect()
}

/// `data` split at `sizes` (cycled), in turn in frozen pool buffers, writable pool
/// buffers and caller heap memory.
fn send_segs(pool: &Pool, data: &[u8], sizes: &[usize]) -> Vec<SendSeg> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        out.push(if i % 3 == 2 {
            SendSeg::Owned(rest[..n].to_vec())
        } else {
            let mut b = pool.get(n).expect("client buffer");
            b.copy_from_slice(&rest[..n]);
            if i % 3 == 0 {
                SendSeg::Pool(b.freeze())
            } else {
                SendSeg::PoolMut(b)
            }
        });
        rest = &rest[n..];
        i += 1;
    }
    out
}

fn reply_payload(r: &mut Reply) -> Vec<u8> {
    let mut out = Vec::new();
    for s in &mut r.recv {
        out.extend_from_slice(s.as_mut_slice());
    }
    out.truncate(r.payload_len);
    out
}

fn echo(tag: &[u8], send: Vec<SendSeg>, recv: Vec<RecvSeg>) -> Request {
    let mut header = b"E".to_vec();
    header.extend_from_slice(tag);
    Request { header, send, recv }
}

fn generate(len: usize, seed: u32, recv: Vec<RecvSeg>) -> Request {
    let mut header = b"G".to_vec();
    header.extend_from_slice(&(len as u32).to_le_bytes());
    header.extend_from_slice(&seed.to_le_bytes());
    Request {
        header,
        send: Vec::new(),
        recv,
    }
}

fn held(tag: u8) -> Request {
    Request {
        header: vec![b'H', tag],
        ..Request::default()
    }
}

/// Waits for a pending request, failing the test instead of hanging.
fn wait(p: Pending<Reply>) -> zcio::Result<Reply> {
    match p.wait_timeout(PATIENCE) {
        Ok(r) => r,
        Err(_) => panic!("request still pending after {PATIENCE:?}"),
    }
}

fn reversed(mut v: Vec<u8>) -> Vec<u8> {
    v.reverse();
    v
}

#[test]
fn handshake_negotiates_the_minimum() {
    let mut scfg = config();
    scfg.limits.max_segments = 64;
    scfg.limits.max_payload = 512 << 10;
    scfg.server.max_in_flight = 8;
    let server = TestServer::start(&scfg);
    let mut ccfg = server.client_config();
    ccfg.limits.max_header = 1000;
    let c = connect(&ccfg);
    let l = c.limits();
    assert_eq!(
        (l.max_segments, l.max_payload, l.max_header, l.max_in_flight),
        (64, 512 << 10, 1000, 8)
    );
    assert_eq!((l.inline_threshold, l.rdma_payload), (0, false));
    assert_eq!(server.next_accept(), Ok(l));
    assert_eq!(TcpTransport.name(), "tcp");
    // TCP has nothing to check (`check_available` is Ok by construction); what can fail is
    // the registry handing out the transport by its configured name.
    let mut registry = zcio::transport::Registry::new();
    zcio_tcp::register(&mut registry);
    assert_eq!(registry.names(), ["tcp"]);
    assert_eq!(
        registry.get("tcp", &ccfg).map(|t| t.name()).ok(),
        Some("tcp")
    );
    assert!(matches!(
        registry.get("rdma", &ccfg),
        Err(zcio::Error::UnknownTransport { .. })
    ));
    assert!(c.peer().contains(&server.addr), "{}", c.peer());
}

#[test]
fn sixty_four_in_flight_matched_by_id() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let datas: Vec<Vec<u8>> = (0..64)
        .map(|i| pattern(i, (i as usize * 997) % 20_000))
        .collect();
    let pendings: Vec<_> = datas
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let req = echo(
                format!("#{i}").as_bytes(),
                send_segs(&cp, d, &[4096, 1000, 333]),
                recv_segs(&cp, &[8192, 8192, 4096]),
            );
            c.start(req).expect("start")
        })
        .collect();
    for (i, p) in pendings.into_iter().enumerate() {
        let mut r = wait(p).expect("reply");
        assert_eq!(r.header, format!("R#{i}").into_bytes());
        assert_eq!(r.payload_len, datas[i].len());
        assert!(
            reply_payload(&mut r) == reversed(datas[i].clone()),
            "payload {i}"
        );
    }
    common::wait_pool_clean(&cp, "client");
    drop(c);
    server.assert_pool_clean();
}

#[test]
fn replies_in_reverse_order_of_requests() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let n = 16u32;
    let pendings: Vec<_> = (0..n)
        .map(|i| {
            let data = pattern(i as u64 + 100, 100 + i as usize);
            let mut header = b"Q".to_vec();
            header.extend_from_slice(&n.to_le_bytes());
            let req = Request {
                header,
                send: send_segs(&cp, &data, &[7, 64]),
                recv: recv_segs(&cp, &[50, 4096]),
            };
            (data, c.start(req).expect("start"))
        })
        .collect();
    for (data, p) in pendings {
        let mut r = wait(p).expect("reply");
        assert_eq!(reply_payload(&mut r), reversed(data));
    }
}

#[test]
fn reply_lands_in_256_pool_buffers() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let mut r = wait(
        c.start(generate(1 << 20, 7, recv_segs(&cp, &[4096; 256])))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r.recv.len(), 256);
    assert_eq!(r.payload_len, 1 << 20);
    let want = pattern(7, 1 << 20);
    assert!(reply_payload(&mut r) == want);
    // Every segment is full, in order.
    for (i, s) in r.recv.iter().enumerate() {
        let RecvSeg::Pool(b) = s else { unreachable!() };
        assert!(b[..] == want[i * 4096..(i + 1) * 4096], "seg {i}");
    }
}

#[test]
fn reply_lands_in_odd_sized_segments_partly_filled() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let sizes = [1, 3, 4095, 4097, 7, 65536, 12345, 1, 2, 100_000, 9];
    let cap: usize = sizes.iter().sum();
    for (len, seed) in [(cap, 1), (cap - 1000, 2), (4099, 3), (0, 4), (1, 5)] {
        let mut r = wait(
            c.start(generate(len, seed, mixed_recv_segs(&cp, &sizes)))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(r.payload_len, len);
        assert!(
            reply_payload(&mut r) == pattern(seed as u64, len),
            "len {len}"
        );
        // Segments come back in order with their lengths.
        let back: Vec<usize> = r.recv.iter_mut().map(|s| s.len()).collect();
        assert_eq!(back, sizes);
    }
    // A reply longer than the capacity is cut by the server to the capacity.
    let mut r = wait(
        c.start(generate(5000, 9, recv_segs(&cp, &[100, 200])))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r.payload_len, 300);
    assert_eq!(reply_payload(&mut r), pattern(9, 300));
}

#[test]
fn request_from_256_send_segments() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let sizes: Vec<usize> = (0..256).map(|i| 1 + (i * 7919) % 4096).collect();
    let data = pattern(42, sizes.iter().sum());
    let send = send_segs(&cp, &data, &sizes);
    assert_eq!(send.len(), 256);
    let mut r = wait(
        c.start(echo(b"big", send, recv_segs(&cp, &[65536; 10])))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r.payload_len, data.len());
    assert!(reply_payload(&mut r) == reversed(data.clone()));
    // The send segments come back intact.
    assert_eq!(r.send.len(), 256);
    let sent: Vec<u8> = r
        .send
        .iter()
        .flat_map(|s| s.as_slice().iter().copied())
        .collect();
    assert!(sent == data);
}

#[test]
fn limits_refused_before_sending() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let l = c.limits();
    let too_many_send = (0..l.max_segments + 1)
        .map(|_| SendSeg::Pool(cp.get(1).unwrap().freeze()))
        .collect();
    let cases: Vec<(&str, Request)> = vec![
        (
            "request send segments",
            echo(b"", too_many_send, Vec::new()),
        ),
        (
            "request receive segments",
            echo(
                b"",
                Vec::new(),
                recv_segs(&cp, &vec![1; l.max_segments + 1]),
            ),
        ),
        (
            "request payload",
            echo(
                b"",
                send_segs(&cp, &vec![1; l.max_payload + 1], &[1 << 20]),
                Vec::new(),
            ),
        ),
        (
            "reply capacity",
            echo(b"", Vec::new(), recv_segs(&cp, &[1 << 20, 1])),
        ),
        (
            "request header length",
            echo(&vec![0; l.max_header], Vec::new(), Vec::new()),
        ),
    ];
    for (what, req) in cases {
        match c.start(req) {
            Err(Error::LimitExceeded { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Nothing reached the server: the first request it sees is this one.
    let r = wait(c.start(echo(b"ok", Vec::new(), Vec::new())).unwrap()).unwrap();
    assert_eq!(r.header, b"Rok");
    let seen = server.wait_requests(1);
    assert_eq!(seen[0].1, b"Eok");
    drop(c);
    assert_eq!(server.next_recv_end().map_err(|e| e.to_string()), Ok(()));
    assert!(server.events.try_recv().is_err(), "no other request");
}

fn assert_closed(r: zcio::Result<Reply>) {
    match r {
        Err(Error::ConnectionClosed(_)) => {}
        other => panic!("expected ConnectionClosed, got {other:?}"),
    }
}

#[test]
fn server_close_mid_flight_fails_every_pending_request() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let mut pendings: Vec<_> = (0..16)
        .map(|i| {
            let req = Request {
                recv: recv_segs(&cp, &[4096, 4096]),
                ..held(i)
            };
            c.start(req).unwrap()
        })
        .collect();
    server.wait_requests(16);
    pendings.push(
        c.start(Request {
            header: b"C".to_vec(),
            ..Request::default()
        })
        .unwrap(),
    );
    for p in pendings {
        assert_closed(wait(p));
    }
    // Later requests fail at once.
    assert!(matches!(c.start(held(0)), Err(Error::ConnectionClosed(_))));
    common::wait_pool_clean(&cp, "client");
}

#[test]
fn server_crash_mid_flight_fails_every_pending_request() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let mut pendings: Vec<_> = (0..8)
        .map(|i| {
            c.start(Request {
                recv: recv_segs(&cp, &[65536]),
                send: send_segs(&cp, &pattern(i as u64, 10_000), &[4096]),
                ..held(i)
            })
            .unwrap()
        })
        .collect();
    server.wait_requests(8);
    pendings.push(
        c.start(Request {
            header: b"X".to_vec(),
            ..Request::default()
        })
        .unwrap(),
    );
    for p in pendings {
        assert_closed(wait(p));
    }
    common::wait_pool_clean(&cp, "client");
    server.assert_pool_clean();
}

#[test]
fn client_close_and_drop_fail_pending_requests() {
    let server = TestServer::start(&config());
    let cp = pool();
    let c = connect(&server.client_config());
    let p: Vec<_> = (0..4)
        .map(|i| {
            c.start(Request {
                recv: recv_segs(&cp, &[4096]),
                ..held(i)
            })
            .unwrap()
        })
        .collect();
    server.wait_requests(4);
    c.close();
    for p in p {
        assert_closed(wait(p));
    }
    assert!(matches!(c.start(held(9)), Err(Error::ConnectionClosed(_))));
    assert_eq!(server.next_recv_end().map_err(|e| e.to_string()), Ok(()));

    let c = connect(&server.client_config());
    let p = c.start(held(1)).unwrap();
    server.wait_requests(1);
    drop(c);
    assert_closed(wait(p));
    common::wait_pool_clean(&cp, "client");
}

/// Waits until `n` threads of this process named `name` sleep in the kernel in a futex
/// wait (`/proc/self/task/*/syscall`): the state of the threads, not a guess at how long
/// they take to get there.
fn wait_until_asleep_in_futex(name: &str, n: usize) {
    let futex = nix::libc::SYS_futex.to_string();
    let t0 = std::time::Instant::now();
    loop {
        let asleep = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                read("comm").trim_end() == name
                    && read("syscall").split_whitespace().next() == Some(futex.as_str())
            })
            .count();
        if asleep == n {
            return;
        }
        assert!(
            t0.elapsed() < PATIENCE,
            "{asleep} of {n} threads named {name} asleep in a futex wait"
        );
        std::thread::yield_now();
    }
}

/// Sends `bytes` on a handshaken raw connection and returns the server's verdict.
fn garbage_after_handshake(server: &TestServer, bytes: &[u8], close: bool) -> Result<(), Error> {
    let mut s = raw_handshaken(&server.addr);
    assert!(server.next_accept().is_ok());
    s.write_all(bytes).unwrap();
    if close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let verdict = server.next_recv_end();
    if verdict.is_err() {
        // The server hung up on us.
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("server sent {n} bytes after refusing"),
        }
    }
    verdict
}

fn prefix(header_len: usize, payload_len: usize, recv_cap: usize) -> [u8; PREFIX_LEN] {
    Prefix {
        kind: Kind::Request,
        header_len,
        id: 1,
        payload_len,
        recv_cap,
    }
    .encode()
}

#[test]
fn garbage_is_refused_and_other_clients_carry_on() {
    let server = TestServer::start(&config());
    let good = connect(&server.client_config());
    assert!(server.next_accept().is_ok());
    let cp = pool();
    let check_good = |i: u64| {
        let data = pattern(i, 5000);
        let mut r = wait(
            good.start(echo(
                b"",
                send_segs(&cp, &data, &[4096]),
                recv_segs(&cp, &[8192]),
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(reply_payload(&mut r), reversed(data));
        server.wait_requests(1);
    };
    check_good(0);

    // Not zcio at all: refused at the handshake.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .unwrap();
    let e = server.next_accept().unwrap_err();
    assert!(e.contains("magic"), "{e}");
    check_good(1);

    let decode = |r: Result<(), Error>, needle: &str| match r {
        Err(e @ Error::Decode { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("{needle}: {other:?}"),
    };
    let mut bad_magic = prefix(0, 0, 0);
    bad_magic[0] = b'X';
    decode(garbage_after_handshake(&server, &bad_magic, false), "magic");
    check_good(2);
    decode(
        garbage_after_handshake(&server, &prefix(60_000, 0, 0), false),
        "header_len",
    );
    decode(
        garbage_after_handshake(&server, &prefix(0, u32::MAX as usize, 0), false),
        "payload_len",
    );
    decode(
        garbage_after_handshake(&server, &prefix(0, 0, u32::MAX as usize), false),
        "recv_cap",
    );
    let mut reply_kind = prefix(0, 0, 0);
    reply_kind[4] = Kind::Reply as u8;
    decode(garbage_after_handshake(&server, &reply_kind, false), "kind");
    let mut flags = prefix(0, 0, 0);
    flags[5] = 4;
    decode(garbage_after_handshake(&server, &flags, false), "flags");
    check_good(3);
    // Two requests with the same id while the first is in flight.
    let mut dup = Vec::new();
    for _ in 0..2 {
        dup.extend_from_slice(&prefix(1, 0, 0));
        dup.push(b'H');
    }
    decode(
        garbage_after_handshake(&server, &dup, false),
        "already in flight",
    );
    // More requests in flight than negotiated (64).
    let mut flood = Vec::new();
    for id in 0..65u64 {
        flood.extend_from_slice(
            &Prefix {
                kind: Kind::Request,
                header_len: 1,
                id,
                payload_len: 0,
                recv_cap: 0,
            }
            .encode(),
        );
        flood.push(b'H');
    }
    decode(garbage_after_handshake(&server, &flood, false), "in flight");
    check_good(4);

    // End of stream in the middle of a frame is an error; at a boundary it is not.
    let mut cut = prefix(10, 100, 0).to_vec();
    cut.extend_from_slice(b"0123456789partial payload");
    match garbage_after_handshake(&server, &cut, true) {
        Err(Error::ConnectionClosed(m)) => assert!(m.contains("middle"), "{m}"),
        other => panic!("{other:?}"),
    }
    match garbage_after_handshake(&server, &prefix(0, 0, 0)[..10], true) {
        Err(Error::ConnectionClosed(m)) => assert!(m.contains("middle"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(garbage_after_handshake(&server, b"", true).is_ok());
    check_good(5);
    drop(good);
    server.assert_pool_clean();
}

#[test]
fn server_refuses_bad_replies_and_keeps_the_connection() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let cp = pool();
    let data = pattern(3, 1000);
    let p = c
        .start(Request {
            header: b"Otag".to_vec(),
            send: send_segs(&cp, &data, &[300]),
            recv: recv_segs(&cp, &[600]),
        })
        .unwrap();
    let results: Vec<_> = (0..4)
        .map(|_| {
            server.wait_for(|e| match e {
                Event::ReplyResult(r) => Some(r),
                _ => None,
            })
        })
        .collect();
    assert!(
        matches!(
            &results[0],
            Err(Error::LimitExceeded {
                value: 601,
                limit: 600,
                ..
            })
        ),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(Error::InvalidArgument(_))),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    // A second reply to the same id: it is no longer in flight.
    assert!(
        matches!(&results[3], Err(Error::InvalidArgument(_))),
        "{:?}",
        results[3]
    );
    let mut r = wait(p).unwrap();
    assert_eq!(r.header, b"Rtag");
    assert_eq!(reply_payload(&mut r), reversed(data)[..600]);
    // The connection still works.
    let r = wait(c.start(echo(b"again", Vec::new(), Vec::new())).unwrap()).unwrap();
    assert_eq!(r.header, b"Ragain");
}

#[test]
fn client_times_out_when_the_server_never_replies() {
    let server = TestServer::start(&config());
    let mut cfg = server.client_config();
    cfg.client.timeout = Duration::from_millis(300);

    // Idle with nothing pending: never times out.
    let idle = connect(&cfg);
    std::thread::sleep(Duration::from_millis(900));
    let r = wait(idle.start(echo(b"alive", Vec::new(), Vec::new())).unwrap()).unwrap();
    assert_eq!(r.header, b"Ralive");

    let c = connect(&cfg);
    let first = c.start(held(1)).unwrap();
    let second = c.start(held(2)).unwrap();
    match wait(first) {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, cfg.client.timeout),
        other => panic!("{other:?}"),
    }
    // The other request fails with the connection (or times out itself).
    match wait(second) {
        Err(Error::ConnectionClosed(_)) | Err(Error::Timeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(c.start(held(3)), Err(Error::ConnectionClosed(m)) if m.contains("no reply")));
}

#[test]
fn client_respects_the_negotiated_in_flight_limit() {
    let mut scfg = config();
    scfg.server.max_in_flight = 2;
    let server = TestServer::start(&scfg);
    let c = std::sync::Arc::new(connect(&server.client_config()));
    assert_eq!(c.limits().max_in_flight, 2);
    // Many threads, many requests: the server fails the connection if it ever sees a
    // third request in flight, so every reply arriving proves the limit held.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                let cp = pool();
                for i in 0..25 {
                    let data = pattern(t * 1000 + i, 3000 + i as usize);
                    let mut r = wait(
                        c.start(echo(
                            b"",
                            send_segs(&cp, &data, &[1024]),
                            recv_segs(&cp, &[4096]),
                        ))
                        .unwrap(),
                    )
                    .unwrap();
                    assert_eq!(reply_payload(&mut r), reversed(data));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // With the two slots held, a third start waits for a slot, then gives up.
    let mut cfg = server.client_config();
    cfg.client.timeout = Duration::from_millis(200);
    let c = connect(&cfg);
    let a = c.start(held(1)).unwrap();
    let b = c.start(held(2)).unwrap();
    match c.start(held(3)) {
        Err(Error::Timeout { .. }) | Err(Error::ConnectionClosed(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(wait(a).is_err() && wait(b).is_err());
}

#[test]
fn server_idle_timeout_closes_silent_and_slow_connections() {
    let mut scfg = config();
    scfg.server.idle_timeout = Some(Duration::from_millis(200));
    let server = TestServer::start(&scfg);

    // Handshaken, then silent.
    let _silent = raw_handshaken(&server.addr);
    assert!(server.next_accept().is_ok());
    assert!(matches!(server.next_recv_end(), Err(Error::Timeout { .. })));

    // A partial frame, then silent (slowloris).
    let mut slow = raw_handshaken(&server.addr);
    assert!(server.next_accept().is_ok());
    slow.write_all(&prefix(0, 0, 0)[..5]).unwrap();
    assert!(matches!(server.next_recv_end(), Err(Error::Timeout { .. })));

    // Connected without a handshake: the handshake times out.
    let _mute = TcpStream::connect(&server.addr).unwrap();
    let e = server.next_accept().unwrap_err();
    assert!(e.contains("timed out"), "{e}");

    // A connection waiting for a reply is not idle.
    let c = connect(&server.client_config());
    assert!(server.next_accept().is_ok());
    let _pending = c.start(held(1)).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let r = wait(c.start(echo(b"x", Vec::new(), Vec::new())).unwrap()).unwrap();
    assert_eq!(r.header, b"Rx");
}

#[test]
fn queued_replies_are_dropped_once_the_client_hangs_up() {
    // The default idle timeout (5 minutes) is far beyond the test's patience: what ends
    // the queued replies must be the client's end of stream, not a timeout.
    let server = TestServer::start(&config());
    let mut s = raw_handshaken(&server.addr);
    assert!(server.next_accept().is_ok());
    // A tiny receive buffer, never read: the replies (12 MiB) fill it and the server's
    // send buffer (at most 4 MiB by default), and the rest block.
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
    const N: usize = 12;
    const LEN: usize = 1 << 20;
    let mut frames = Vec::new();
    for i in 0..N {
        let mut header = b"W".to_vec();
        header.extend_from_slice(&(LEN as u32).to_le_bytes());
        header.extend_from_slice(&(i as u32).to_le_bytes());
        let mut p = Prefix {
            kind: Kind::Request,
            header_len: header.len(),
            id: i as u64 + 1,
            payload_len: 0,
            recv_cap: LEN,
        }
        .encode()
        .to_vec();
        p.extend_from_slice(&header);
        frames.extend_from_slice(&p);
    }
    s.write_all(&frames).unwrap();
    let mut results: Vec<Result<(), Error>> = Vec::new();
    let mut requests = 0;
    while requests < N {
        match server.next_event() {
            Event::Request { .. } => requests += 1,
            Event::ReplyResult(r) => results.push(r),
            _ => {}
        }
    }
    // No reply holds its thread: every one returns (queued for the writer thread) although
    // the client reads nothing.
    while results.len() < N {
        results.push(server.wait_for(|e| match e {
            Event::ReplyResult(r) => Some(r),
            _ => None,
        }));
    }
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // The queued replies hold pool buffers until the client ends its side of the stream
    // (the socket stays open, as a client's does until its last handle goes): then the
    // connection fails and they go back to the pool.
    assert!(server.pool.stats().slots_in_use() > 0);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    server.assert_pool_clean();
    drop(s);
}

#[test]
fn version_and_magic_mismatches_are_clear_errors() {
    let server = TestServer::start(&config());
    // A client of another version gets the server's hello, then the close.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut hello = Hello::from_limits(&config().limits, 4).encode();
    hello[4] = 9;
    s.write_all(&hello).unwrap();
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b).unwrap();
    assert_eq!(Hello::decode(&b).unwrap().version, 1);
    assert_eq!(s.read(&mut b).unwrap(), 0);
    let e = server.next_accept().unwrap_err();
    assert!(e.contains("version"), "{e}");

    // Fake servers.
    let fake = |answer: Option<[u8; HELLO_LEN]>, close: bool| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut cfg = config();
        cfg.client.connect = l.local_addr().unwrap().to_string();
        cfg.client.timeout = Duration::from_millis(300);
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; HELLO_LEN];
            s.read_exact(&mut b).unwrap();
            if let Some(a) = answer {
                s.write_all(&a).unwrap();
            }
            if !close {
                std::thread::sleep(Duration::from_millis(1000));
            }
        });
        let r = TcpTransport.connect(&cfg, &pool()).map(|_| ());
        h.join().unwrap();
        r.unwrap_err()
    };
    let mut bad = Hello::from_limits(&config().limits, 4).encode();
    bad[0] = b'z';
    assert!(matches!(fake(Some(bad), true), Error::Decode { .. }));
    let mut v2 = Hello::from_limits(&config().limits, 4).encode();
    v2[4] = 2;
    assert!(matches!(
        fake(Some(v2), true),
        Error::Version { ours: 1, theirs: 2 }
    ));
    assert!(matches!(fake(None, true), Error::ConnectionClosed(_)));
    assert!(matches!(fake(None, false), Error::Timeout { .. }));
    // Nobody listening.
    let mut cfg = config();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.client.connect = l.local_addr().unwrap().to_string();
    drop(l);
    assert!(matches!(
        TcpTransport.connect(&cfg, &pool()),
        Err(Error::Io { .. })
    ));
}

#[test]
fn listener_shutdown_unblocks_accept() {
    let p = pool();
    let l: std::sync::Arc<dyn zcio::transport::Listener> =
        std::sync::Arc::from(TcpTransport.listen(&config(), &p).unwrap());
    assert!(l.local_addr().starts_with("127.0.0.1:"));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let l = l.clone();
            std::thread::Builder::new()
                .name("accept-waiter".into())
                .spawn(move || l.accept().map(|_| ()).unwrap_err())
                .unwrap()
        })
        .collect();
    // Both really blocked (one in the channel, one on its lock) before the shutdown, so
    // that the shutdown is what wakes them.
    wait_until_asleep_in_futex("accept-waiter", 2);
    l.shutdown();
    for t in threads {
        assert!(matches!(t.join().unwrap(), Error::ConnectionClosed(_)));
    }
    assert!(l.accept().is_err());
}

#[test]
fn zero_length_everything() {
    let server = TestServer::start(&config());
    let c = connect(&server.client_config());
    let r = wait(
        c.start(Request {
            header: b"E".to_vec(),
            send: Vec::new(),
            recv: Vec::new(),
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!((r.header.as_slice(), r.payload_len), (&b"R"[..], 0));
    // An empty header is fine for the transport (the test server holds it).
    let _p = c.start(Request::default()).unwrap();
    assert_eq!(server.wait_requests(2)[1].1, b"");
}

#[test]
fn backlog_sees_requests_waiting_in_the_socket() {
    let spool = pool();
    let (_listener, c, mut s) = connected_pair(&spool);
    assert!(!s.backlog(), "nothing sent yet");
    let p1 = c.start(echo(b"1", Vec::new(), Vec::new())).expect("start");
    let p2 = c.start(echo(b"2", Vec::new(), Vec::new())).expect("start");
    // Both frames reach the server's socket; until then there is no backlog to see.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !s.backlog() {
        assert!(std::time::Instant::now() < deadline, "no backlog seen");
        std::thread::sleep(Duration::from_millis(1));
    }
    let a = s.recv().expect("recv").expect("request");
    assert_eq!(a.header, b"E1");
    let deadline = std::time::Instant::now() + PATIENCE;
    while !s.backlog() {
        assert!(
            std::time::Instant::now() < deadline,
            "the second request is not seen waiting"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = s.recv().expect("recv").expect("request");
    assert_eq!(b.header, b"E2");
    assert!(!s.backlog(), "both requests were taken");
    let r = s.replier();
    r.reply(a.id, b"a", &[]).expect("reply");
    r.reply(b.id, b"b", &[]).expect("reply");
    assert_eq!(wait(p1).expect("reply").header, b"a");
    assert_eq!(wait(p2).expect("reply").header, b"b");
}

/// A reply the receiving thread makes while another whole request waits in its read-ahead
/// buffer is held back to leave with the next ones (one `sendmsg`); it must still leave
/// when that thread goes on to wait for more requests.
#[test]
fn replies_held_on_the_receiving_thread_leave_before_it_waits() {
    let spool = pool();
    let (_listener, c, mut s) = connected_pair(&spool);
    let p1 = c.start(echo(b"1", Vec::new(), Vec::new())).expect("start");
    let p2 = c.start(echo(b"2", Vec::new(), Vec::new())).expect("start");
    let p3 = c.start(echo(b"3", Vec::new(), Vec::new())).expect("start");
    // Over loopback each frame is in the server's socket once its `start` returned, so the
    // first read takes all three (the replies must arrive whether or not they were held).
    let deadline = std::time::Instant::now() + PATIENCE;
    while !s.backlog() {
        assert!(std::time::Instant::now() < deadline, "no backlog seen");
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = s.replier();
    // Held (more requests wait whole behind them), on the receiving thread.
    let a = s.recv().expect("recv").expect("request");
    r.reply(a.id, b"a", &[]).expect("reply");
    let b = s.recv().expect("recv").expect("request");
    r.reply(b.id, b"b", &[]).expect("reply");
    let c3 = s.recv().expect("recv").expect("request");
    // The receiving thread now waits for a fourth request that never comes: what it held
    // must leave before it waits (nothing else sends it).
    let waiter = std::thread::spawn(move || {
        let _ = s.recv();
    });
    assert_eq!(wait(p1).expect("reply").header, b"a");
    assert_eq!(wait(p2).expect("reply").header, b"b");
    // Another thread's reply goes out whole.
    std::thread::spawn(move || r.reply(c3.id, b"c", &[]).expect("reply"))
        .join()
        .expect("replying thread");
    assert_eq!(wait(p3).expect("reply").header, b"c");
    c.close();
    waiter.join().expect("receiving thread");
}

/// Runs `f` on its own thread and returns its result, failing the test instead of hanging
/// (for plain `Pending::wait`, which has no deadline).
fn guarded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(PATIENCE)
        .expect("a wait still blocked after the test's patience")
}

fn queued(n: u32, tag: u8) -> Request {
    let mut header = b"Q".to_vec();
    header.extend_from_slice(&n.to_le_bytes());
    header.push(tag);
    Request {
        header,
        ..Request::default()
    }
}

/// Threads that block in `wait` read replies themselves (one leads, the others follow):
/// replies answered in reverse order, so the leader reads the others' first, each reach
/// their own waiter; then many threads at once, each with its requests one at a time.
#[test]
fn waiting_threads_each_get_their_reply_whoever_reads_it() {
    let server = TestServer::start(&config());
    let c = Arc::new(connect(&server.client_config()));
    let n = 6u8;
    let waiters: Vec<_> = (0..n)
        .map(|k| {
            let p = c.start(queued(u32::from(n), k)).expect("start");
            std::thread::spawn(move || p.wait())
        })
        .collect();
    for (k, w) in waiters.into_iter().enumerate() {
        let r = guarded(move || w.join().expect("waiter")).expect("reply");
        let mut want = b"R".to_vec();
        want.extend_from_slice(&u32::from(n).to_le_bytes());
        want.push(k as u8);
        assert_eq!(r.header, want, "waiter {k} got another's reply");
    }
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    let tag = [t, i];
                    let r = c.start(echo(&tag, Vec::new(), Vec::new())).expect("start");
                    let r = r.wait().expect("reply");
                    assert_eq!(r.header, [b'R', t, i], "thread {t} request {i}");
                }
            })
        })
        .collect();
    guarded(move || {
        for t in threads {
            t.join().expect("thread");
        }
    });
}

/// A thread leading (blocked in `wait`) still enforces `client.timeout`: a request the
/// server never answers fails with `Error::Timeout`, and later requests fail at once.
#[test]
fn a_leading_waiter_times_out() {
    let server = TestServer::start(&config());
    let mut cfg = server.client_config();
    cfg.client.timeout = Duration::from_millis(300);
    let c = connect(&cfg);
    let p = c.start(held(1)).expect("start");
    match guarded(move || p.wait()) {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, cfg.client.timeout),
        other => panic!("{other:?}"),
    }
    assert!(c.start(echo(b"late", Vec::new(), Vec::new())).is_err());
}

/// A reply nobody waits for is still read (by the reader thread, at its next tick), and a
/// caller waiting for a free request slot reads replies itself.
#[test]
fn replies_nobody_waits_for_are_read_and_a_full_window_frees() {
    let mut scfg = config();
    scfg.server.max_in_flight = 2;
    let server = TestServer::start(&scfg);
    let mut cfg = server.client_config();
    // A short tick: the reader thread looks every 250 ms (an eighth of the timeout). Not
    // shorter: under load a reply may take longer than a 200 ms timeout, which then failed
    // the test without anything being wrong.
    cfg.client.timeout = Duration::from_secs(2);
    let c = Arc::new(connect(&cfg));
    let p = c
        .start(echo(b"alone", Vec::new(), Vec::new()))
        .expect("start");
    let deadline = std::time::Instant::now() + PATIENCE;
    while !p.is_done() {
        assert!(
            std::time::Instant::now() < deadline,
            "a reply nobody waits for was never read"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(p.wait().expect("reply").header, b"Ralone");
    // Two in flight (the negotiated window), nobody waiting; the third `start` waits for a
    // slot and must read a reply to get one.
    let c2 = c.clone();
    let all = guarded(move || {
        let ps: Vec<_> = (0..3u8)
            .map(|k| c2.start(echo(&[k], Vec::new(), Vec::new())).expect("start"))
            .collect();
        ps.into_iter()
            .map(|p| p.wait().map(|r| r.header))
            .collect::<Vec<_>>()
    });
    for (k, r) in all.into_iter().enumerate() {
        assert_eq!(r.expect("reply"), [b'R', k as u8]);
    }
}

/// The receiving thread's replies are held also while requests with payload keep coming
/// (writes served on that thread), and must leave before it waits: here for the
/// connection's payload budget (the client may send no more until it has them). Byte for
/// byte, the payloads arrive as sent.
#[test]
fn replies_held_behind_payload_leave_before_the_receiving_thread_waits() {
    fn bytes(inc: &zcio::transport::Incoming) -> Vec<u8> {
        inc.payload.iter().flat_map(|b| b.iter().copied()).collect()
    }
    const LEN: usize = 32 << 10;
    let spool = pool();
    let (_listener, c, mut s) = connected_pair(&spool);
    let cpool = pool();
    // A budget of one payload: a second one waits until the first is released.
    let admission = Arc::new(zcio::transport::Admission::new(LEN, 8));
    admission.authenticate();
    s.set_admission(admission.clone());
    let r = s.replier();
    let data: Vec<Vec<u8>> = (0..3u64).map(|k| pattern(k + 7, LEN)).collect();
    let send = |k: usize| {
        let tag = [b'0' + k as u8];
        c.start(echo(&tag, send_segs(&cpool, &data[k], &[LEN]), Vec::new()))
            .expect("start")
    };
    let p0 = send(0);
    let a = s.recv().expect("recv").expect("request");
    assert_eq!(bytes(&a), data[0]);
    // Served on the receiving thread: given back, then answered.
    let id = a.id;
    r.recycle(a);
    admission.release(id);
    r.reply(id, b"a", &[]).expect("reply");
    assert_eq!(wait(p0).expect("reply").header, b"a");
    // Two more, both in the server's socket before it reads: reading the first payload
    // brings the second request's head along.
    let p1 = send(1);
    let p2 = send(2);
    let b = s.recv().expect("recv").expect("request");
    assert_eq!(bytes(&b), data[1]);
    // Request 1 keeps the whole budget for now; its reply is held (more request bytes
    // are in).
    r.reply(b.id, b"b", &[]).expect("reply");
    // The receiving thread takes request 2's head, then waits for the budget: the held
    // reply must leave before that wait.
    let waiter = std::thread::spawn(move || {
        let c2 = s.recv().expect("recv").expect("request");
        (s, c2)
    });
    assert_eq!(wait(p1).expect("reply").header, b"b");
    assert!(!waiter.is_finished(), "the third payload passed the budget");
    let id = b.id;
    r.recycle(b);
    admission.release(id);
    let (s, c2) = waiter.join().expect("receiving thread");
    assert_eq!(bytes(&c2), data[2]);
    r.reply(c2.id, b"c", &[]).expect("reply");
    assert_eq!(wait(p2).expect("reply").header, b"c");
    drop(s);
}
