//! A client that stops reading its replies stalls nobody else (issue 15, item 1, over TCP):
//! the real zcio server with two workers, one connection that asks for 64 MiB of reads and
//! never reads a byte of the answers, and good clients reading and writing meanwhile, whose
//! requests must all succeed with the right bytes. Without the per-connection output
//! queue, both workers would block writing to the slow socket and the good clients would
//! wait for the idle timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use common::{pattern, raw_handshaken, PATIENCE};
use zcio::conformance::Harness;
use zcio::proto::{self, OpenFlags, Req, Resp, NONCE_LEN};
use zcio_tcp::wire::{decode_prefix, Kind, Prefix, PREFIX_LEN};
use zcio_tcp::TcpTransport;

const FILE: usize = 4 << 20;

fn frame(id: u64, req: &Req, recv_cap: usize) -> Vec<u8> {
    let header = req.encode();
    let mut f = Prefix {
        kind: Kind::Request,
        header_len: header.len(),
        id,
        payload_len: 0,
        recv_cap,
    }
    .encode()
    .to_vec();
    f.extend_from_slice(&header);
    f
}

/// Sends `req` and reads its reply (no payload expected).
fn call(s: &mut TcpStream, id: u64, req: &Req) -> Resp {
    s.write_all(&frame(id, req, 0)).unwrap();
    let mut p = [0u8; PREFIX_LEN];
    s.read_exact(&mut p).unwrap();
    let p = decode_prefix(&p, Kind::Reply, &common::config().limits).unwrap();
    let mut h = vec![0u8; p.header_len];
    s.read_exact(&mut h).unwrap();
    proto::decode_reply(req, &h).unwrap()
}

#[test]
fn a_client_that_stops_reading_stalls_nobody_else() {
    // Replies sent from the page cache (queued as file ranges), and from pool buffers
    // (queued with their buffers).
    for sendfile in [true, false] {
        stalls_nobody(sendfile);
    }
}

fn stalls_nobody(sendfile: bool) {
    let h = Harness::start(Arc::new(TcpTransport), |c| {
        c.server.workers = 2;
        c.server.max_in_flight = 64;
        zcio_tcp::config::TcpConfig::of_mut(c).sendfile = sendfile;
    });
    let data = pattern(9, FILE);
    std::fs::write(h.path("big"), &data).unwrap();
    // The slow reader: hello, open, then 64 reads of 1 MiB, and it reads nothing more.
    let mut slow = raw_handshaken(h.server.local_addr());
    // (Its receive buffer stays as the kernel makes it: a few MiB of the 64 it asks for
    // fill it and the server's send buffer, the rest waits in the server. A tiny one would
    // close the window, and a zero window may not reopen for minutes once it reads.)
    call(
        &mut slow,
        1,
        &Req::Hello {
            version: proto::VERSION,
            client_nonce: [1; NONCE_LEN],
        },
    );
    let Resp::Open { fh, .. } = call(
        &mut slow,
        2,
        &Req::Open {
            path: "big".into(),
            flags: OpenFlags::READ,
            mode: 0,
        },
    ) else {
        panic!("open")
    };
    let mut reqs = Vec::new();
    for i in 0..64u64 {
        let r = Req::Read {
            fh,
            offset: (i % 4) << 20,
            len: 1 << 20,
        };
        reqs.extend_from_slice(&frame(10 + i, &r, 1 << 20));
    }
    slow.write_all(&reqs).unwrap();
    // Wait until the server has replies for it queued, with both workers free again.
    let stats = h.server.stats();
    let t = std::time::Instant::now();
    while stats.requests.load(std::sync::atomic::Ordering::SeqCst) < 2 + 8 {
        assert!(
            t.elapsed() < PATIENCE,
            "the slow client's reads never got answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Good clients, in parallel: reads and writes, every byte checked.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let goods: Vec<_> = (0..3)
        .map(|g| {
            let c = h.client();
            let data = data.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let f = c.open("big", OpenFlags::READ).unwrap();
                let w = c
                    .open(&format!("w{g}"), OpenFlags::rw() | OpenFlags::CREATE)
                    .unwrap();
                for i in 0..20usize {
                    // Reads of 64 KiB at offsets that differ per client and per read.
                    let off = (i * 131_072 + g * 4096) % (FILE - 65_536);
                    let mut b = vec![0u8; 65_536];
                    assert_eq!(f.pread(&mut b, off as u64).unwrap(), b.len());
                    assert!(b == data[off..off + 65_536], "good client {g}: read {i}");
                    assert_eq!(w.pwrite(&b, (i * 65_536) as u64).unwrap(), b.len());
                }
                let mut back = vec![0u8; 65_536];
                assert_eq!(w.pread(&mut back, 19 * 65_536).unwrap(), back.len());
                let off = (19 * 131_072 + g * 4096) % (FILE - 65_536);
                assert!(back == data[off..off + 65_536], "good client {g}: written");
                let _ = done.send(g);
            })
        })
        .collect();
    for _ in 0..goods.len() {
        // A hang guard, not a timing: stalled behind the slow reader, they would wait for
        // its deadline (30 s) or the idle timeout.
        done_rx
            .recv_timeout(PATIENCE)
            .expect("the good clients stalled (or one failed)");
    }
    for g in goods {
        g.join().expect("a good client failed");
    }
    // The slow connection was only held back, never failed (its deadline is far off): when
    // it reads at last, all 64 replies arrive whole, with the right bytes.
    let limits = common::config().limits;
    let mut seen = [false; 64];
    let mut payload = vec![0u8; 1 << 20];
    for _ in 0..64 {
        let mut p = [0u8; PREFIX_LEN];
        slow.read_exact(&mut p).unwrap();
        let p = decode_prefix(&p, Kind::Reply, &limits).unwrap();
        let mut hd = vec![0u8; p.header_len];
        slow.read_exact(&mut hd).unwrap();
        let i = p.id - 10;
        assert!(i < 64 && !seen[i as usize], "reply id {}", p.id);
        seen[i as usize] = true;
        let req = Req::Read {
            fh,
            offset: (i % 4) << 20,
            len: 1 << 20,
        };
        assert!(matches!(
            proto::decode_reply(&req, &hd),
            Ok(Resp::Read { len, .. }) if len == 1 << 20
        ));
        assert_eq!(p.payload_len, 1 << 20);
        slow.read_exact(&mut payload).unwrap();
        let off = ((i % 4) << 20) as usize;
        assert!(payload == data[off..off + (1 << 20)], "reply {i}: bytes");
    }
    drop(slow);
    h.assert_server_clean();
}
