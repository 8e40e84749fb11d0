//! The TCP client's reply reader and matcher (`zcio_tcp`'s `ClientConn`): a real client
//! connection with requests in flight reads an arbitrary byte stream as replies from a
//! fake server on loopback, which then half-closes.
//!
//! Input layout: `n u8 | caps: n x u16 | rest`: `n % 9` requests are started (ids 1, 2,
//! ...), request `i` with `caps[i]` bytes of receive segments (split over a pool buffer and
//! heap memory); `rest` is the reply stream.
//!
//! Properties: no panic, no hang: every request completes, with a reply whose payload fits
//! its receive segments, or an error; replies match only requests in flight.
#![no_main]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use zcio::transport::{RecvSeg, Request, Transport};
use zcio::{Config, Pool};
use zcio_tcp::wire::{Hello, HELLO_LEN};
use zcio_tcp::TcpTransport;

struct Fake {
    listener: TcpListener,
    cfg: Config,
    pool: Pool,
}

fn fake() -> &'static Fake {
    static F: OnceLock<Fake> = OnceLock::new();
    F.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut cfg = Config::default();
        cfg.client.connect = listener.local_addr().unwrap().to_string();
        cfg.client.timeout = Duration::from_secs(30);
        cfg.pool.classes.iter_mut().for_each(|c| {
            c.count = c.count.min(64);
            c.reserve = c.reserve.min(8);
        });
        let pool = Pool::new(&cfg.pool).expect("pool");
        Fake {
            listener,
            cfg,
            pool,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 9);
    let mut caps = Vec::with_capacity(n);
    for _ in 0..n {
        let Some((c, r)) = rest.split_first_chunk::<2>() else {
            return;
        };
        caps.push(usize::from(u16::from_le_bytes(*c)));
        rest = r;
    }
    let f = fake();
    let stream = rest.to_vec();
    // The fake server: handshake, the reply stream, half-close, then drain the requests.
    let server = std::thread::scope(|scope| {
        let srv = scope.spawn(|| {
            let (mut s, _) = f.listener.accept().expect("accept");
            let mut h = [0u8; HELLO_LEN];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let theirs = Hello::decode(&h).expect("client hello");
            let ours = Hello::from_limits(&theirs.negotiate(&theirs), 64);
            let _ = s.write_all(&ours.encode());
            let _ = s.write_all(&stream);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = [0u8; 65536];
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            while matches!(s.read(&mut sink), Ok(1..)) {}
        });
        let conn = TcpTransport.connect(&f.cfg, &f.pool).expect("connect");
        let pending: Vec<_> = caps
            .iter()
            .map(|&cap| {
                let half = cap / 2;
                let mut recv = Vec::new();
                if half > 0 {
                    recv.push(RecvSeg::Pool(f.pool.get(half).expect("buffer")));
                }
                if cap - half > 0 {
                    recv.push(RecvSeg::Owned(vec![0; cap - half]));
                }
                conn.start(Request {
                    header: b"fuzz".to_vec(),
                    send: Vec::new(),
                    recv,
                })
            })
            .collect();
        for (p, &cap) in pending.into_iter().zip(&caps) {
            let Ok(p) = p else { continue };
            match p.wait_timeout(Duration::from_secs(60)) {
                Ok(Ok(reply)) => assert!(reply.payload_len <= cap, "reply over its capacity"),
                Ok(Err(_)) => {}
                Err(_) => panic!("a request neither completed nor failed"),
            }
        }
        conn.close();
        drop(conn);
        srv.join()
    });
    server.expect("fake server thread");
    assert_eq!(f.pool.stats().slots_in_use(), 0, "pool buffers leaked");
});
