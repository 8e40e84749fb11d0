//! The client against scripted fake servers: replies that break the protocol, and a reply
//! that overtakes its own request's payload.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{config, pattern, pool, PATIENCE};
use zcio::transport::{ClientConn, Pending, RecvSeg, Reply, Request, SendSeg, Transport};
use zcio::{Config, Error};
use zcio_tcp::wire::{decode_prefix, Hello, Kind, Prefix, HELLO_LEN, PREFIX_LEN};
use zcio_tcp::TcpTransport;

/// A server that does the handshake and then runs `script` on the connection.
fn fake_server(script: impl FnOnce(TcpStream) + Send + 'static) -> (Config, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // A small receive window (inherited by the accepted socket), so that a client writing
    // a large payload blocks until the script reads it.
    nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
    let mut cfg = config();
    cfg.client.connect = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut b = [0u8; HELLO_LEN];
        s.read_exact(&mut b).unwrap();
        Hello::decode(&b).unwrap();
        let mut limits = config().limits;
        limits.max_payload = 16 << 20;
        s.write_all(&Hello::from_limits(&limits, 64).encode())
            .unwrap();
        script(s);
    });
    (cfg, h)
}

/// Reads one request frame: prefix, header, payload.
fn read_request(s: &mut TcpStream) -> (Prefix, Vec<u8>, Vec<u8>) {
    let (p, h) = read_request_head(s);
    let mut payload = vec![0u8; p.payload_len];
    s.read_exact(&mut payload).unwrap();
    (p, h, payload)
}

fn read_request_head(s: &mut TcpStream) -> (Prefix, Vec<u8>) {
    let mut b = [0u8; PREFIX_LEN];
    s.read_exact(&mut b).unwrap();
    let mut limits = config().limits;
    limits.max_payload = 16 << 20;
    let p = decode_prefix(&b, Kind::Request, &limits).unwrap();
    let mut h = vec![0u8; p.header_len];
    s.read_exact(&mut h).unwrap();
    (p, h)
}

fn reply_frame(id: u64, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut v = Prefix {
        kind: Kind::Reply,
        header_len: header.len(),
        id,
        payload_len: payload.len(),
        recv_cap: 0,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(payload);
    v
}

fn wait(p: Pending<Reply>) -> zcio::Result<Reply> {
    match p.wait_timeout(PATIENCE) {
        Ok(r) => r,
        Err(_) => panic!("request still pending after {PATIENCE:?}"),
    }
}

fn request(cap: usize) -> Request {
    let p = pool();
    Request {
        header: b"req".to_vec(),
        send: Vec::new(),
        recv: vec![RecvSeg::Pool(p.get(cap).unwrap())],
    }
}

/// Starts three requests, lets `reply` answer them with bytes, and checks that every
/// pending request fails with a `ConnectionClosed` mentioning `needle`.
fn all_fail_on(needle: &'static str, reply: fn(&[Prefix]) -> Vec<u8>) {
    let (cfg, h) = fake_server(move |mut s| {
        let ps: Vec<Prefix> = (0..3).map(|_| read_request(&mut s).0).collect();
        s.write_all(&reply(&ps)).unwrap();
        // Wait for the client to hang up.
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
    });
    let c = TcpTransport.connect(&cfg, &pool()).unwrap();
    let pendings: Vec<_> = (0..3).map(|_| c.start(request(100)).unwrap()).collect();
    for p in pendings {
        match wait(p) {
            Err(Error::ConnectionClosed(m)) => assert!(m.contains(needle), "{needle}: {m}"),
            other => panic!("{needle}: {other:?}"),
        }
    }
    assert!(matches!(
        c.start(request(1)),
        Err(Error::ConnectionClosed(_))
    ));
    drop(c);
    h.join().unwrap();
}

#[test]
fn protocol_violations_fail_every_pending_request() {
    all_fail_on("not in flight", |ps| {
        reply_frame(ps.iter().map(|p| p.id).max().unwrap() + 1, b"", b"")
    });
    all_fail_on("room for 100", |ps| reply_frame(ps[0].id, b"", &[7; 101]));
    all_fail_on("magic", |ps| {
        let mut v = reply_frame(ps[0].id, b"", b"");
        v[1] = b'!';
        v
    });
    all_fail_on("unexpected frame kind", |ps| {
        let mut v = reply_frame(ps[0].id, b"", b"");
        v[4] = Kind::Request as u8;
        v
    });
    all_fail_on("recv_cap", |ps| {
        let mut v = reply_frame(ps[0].id, b"", b"");
        v[20] = 1;
        v
    });
    all_fail_on("header_len", |ps| {
        let mut v = reply_frame(ps[0].id, b"", b"");
        v[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
        v
    });
    // A good reply, then a second one for the same id: the first request completes, the
    // second reply is a violation for the others.
    let (cfg, h) = fake_server(|mut s| {
        let ps: Vec<Prefix> = (0..2).map(|_| read_request(&mut s).0).collect();
        s.write_all(&reply_frame(ps[0].id, b"ok", b"abc")).unwrap();
        s.write_all(&reply_frame(ps[0].id, b"again", b"")).unwrap();
        let _ = s.read(&mut [0u8; 1]);
    });
    let c = TcpTransport.connect(&cfg, &pool()).unwrap();
    let a = c.start(request(100)).unwrap();
    let b = c.start(request(100)).unwrap();
    let r = wait(a).unwrap();
    assert_eq!((r.header.as_slice(), r.payload_len), (&b"ok"[..], 3));
    assert!(matches!(wait(b), Err(Error::ConnectionClosed(m)) if m.contains("not in flight")));
    drop(c);
    h.join().unwrap();
}

#[test]
fn end_of_stream_mid_reply_fails_the_request() {
    let (cfg, h) = fake_server(|mut s| {
        let (p, _, _) = read_request(&mut s);
        let v = reply_frame(p.id, b"hdr", &[1; 100]);
        s.write_all(&v[..v.len() - 50]).unwrap();
    });
    let c = TcpTransport.connect(&cfg, &pool()).unwrap();
    match wait(c.start(request(100)).unwrap()) {
        Err(Error::ConnectionClosed(m)) => assert!(m.contains("middle of a reply"), "{m}"),
        other => panic!("{other:?}"),
    }
    h.join().unwrap();
}

/// The server answers as soon as it has read the request header, while the client is
/// still sending the payload: the reply waits for the writer to hand the send segments
/// back, and then completes normally.
/// The send queue (bytes the peer has not acknowledged) and receive queue (bytes the
/// application has not read) of the IPv4 TCP socket from `local` to `remote`, as
/// `/proc/net/tcp` shows them.
fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => panic!("IPv4 expected"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// Waits until what the server wrote on `s` has reached the client (the server's send
/// queue is empty: acknowledged) and the client has read it (the client's receive queue
/// is empty), so a reply written on `s` is in the client's hands.
fn wait_reply_read(s: &TcpStream) {
    let (server, client) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    let t0 = std::time::Instant::now();
    loop {
        let delivered = tcp_queues(server, client).is_some_and(|(tx, _)| tx == 0);
        if delivered && tcp_queues(client, server).is_some_and(|(_, rx)| rx == 0) {
            return;
        }
        assert!(t0.elapsed() < PATIENCE, "the client did not read the reply");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn reply_overtaking_its_request_payload() {
    // More than the kernel buffers on both ends can hold (4 MiB send buffer at most by
    // default, a 4 KiB receive window), so the writer is still blocked when the reply
    // has been read.
    let data = pattern(5, 8 << 20);
    let expect = data.clone();
    let (cfg, h) = fake_server(move |mut s| {
        let (p, header) = read_request_head(&mut s);
        assert_eq!(header, b"req");
        s.write_all(&reply_frame(p.id, b"early", b"xyz")).unwrap();
        // Only once the client has read the reply, drain the payload: its writer is still
        // blocked on the payload then, so the reply has overtaken it.
        wait_reply_read(&s);
        let mut payload = vec![0u8; p.payload_len];
        s.read_exact(&mut payload).unwrap();
        assert!(payload == expect);
        let _ = s.read(&mut [0u8; 1]);
    });
    let mut cfg = cfg;
    cfg.limits.max_payload = 8 << 20;
    let c = TcpTransport.connect(&cfg, &pool()).unwrap();
    let p = pool();
    let send: Vec<SendSeg> = data
        .chunks(1 << 20)
        .map(|c| {
            let mut b = p.get(c.len()).unwrap();
            b.copy_from_slice(c);
            SendSeg::Pool(b.freeze())
        })
        .collect();
    let mut req = request(10);
    req.send = send;
    let r = wait(c.start(req).unwrap()).unwrap();
    assert_eq!((r.header.as_slice(), r.payload_len), (&b"early"[..], 3));
    assert_eq!(&r.recv[0].as_slice()[..3], b"xyz");
    assert_eq!(r.send.len(), 8);
    drop(c);
    h.join().unwrap();
}

#[test]
fn limits_come_from_the_server_hello() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config();
    cfg.client.connect = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; HELLO_LEN];
        s.read_exact(&mut b).unwrap();
        let theirs = Hello::decode(&b).unwrap();
        assert_eq!(theirs.max_in_flight, 64);
        let mut ours = Hello::from_limits(&config().limits, 3);
        ours.max_segments = 2;
        ours.max_payload = 10;
        s.write_all(&ours.encode()).unwrap();
        let _ = s.read(&mut [0u8; 1]);
    });
    let c: Box<dyn ClientConn> = TcpTransport.connect(&cfg, &pool()).unwrap();
    let l = c.limits();
    assert_eq!((l.max_segments, l.max_payload, l.max_in_flight), (2, 10, 3));
    assert!(matches!(
        c.start(request(11)),
        Err(Error::LimitExceeded {
            what: "reply capacity",
            ..
        })
    ));
    drop(c);
    h.join().unwrap();
}
