//! Read replies whose payload is a file range, sent with `sendfile(2)`: through the
//! transport traits (the bytes, the limits, a file that ends early), and through the real
//! server (every buffered read goes this way, `O_DIRECT` reads do not).

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use common::{config, pattern, pool, PATIENCE};
use zcio::conformance::Harness;
use zcio::transport::{FileRange, Listener, RecvSeg, Request, ServerConn, Transport};
use zcio::{Error, OpenFlags};
use zcio_tcp::TcpTransport;

/// A listener, a connected client and the server's end of it.
fn connected() -> (
    Box<dyn Listener>,
    Box<dyn zcio::transport::ClientConn>,
    Box<dyn ServerConn>,
) {
    let server_pool = pool();
    let l = TcpTransport
        .listen(&config(), &server_pool)
        .expect("listen");
    let mut ccfg = config();
    ccfg.client.connect = l.local_addr();
    let c = TcpTransport.connect(&ccfg, &pool()).expect("connect");
    let s = l.accept().expect("accept").expect("handshake");
    (l, c, s)
}

fn read_request(sizes: &[usize]) -> Request {
    Request {
        header: b"read".to_vec(),
        send: Vec::new(),
        recv: sizes
            .iter()
            .map(|&n| RecvSeg::Owned(vec![0xEE; n]))
            .collect(),
    }
}

#[test]
fn file_ranges_land_in_the_receive_segments() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(5, 3 << 20);
    std::fs::write(dir.path().join("f"), &data).unwrap();
    let file = std::fs::File::open(dir.path().join("f")).unwrap();
    let (_l, c, mut s) = connected();
    let r = s.replier();
    assert!(r.takes_file_ranges());
    // Offsets inside a page, across pages, a range larger than the socket buffers, an
    // empty range; receive segments of odd sizes, larger than the range.
    for (offset, len, segs) in [
        (0u64, 4096usize, vec![4096]),
        (13, 100_000, vec![1, 4095, 4097, 200_000]),
        (4096, 1 << 20, vec![512 << 10, 512 << 10]),
        (77, 0, vec![10]),
    ] {
        let p = c.start(read_request(&segs)).unwrap();
        let inc = s.recv().unwrap().expect("a request");
        let range = FileRange {
            file: &file,
            offset,
            len,
        };
        r.reply_file(inc.id, b"hdr", range).expect("reply_file");
        let mut reply = p.wait_timeout(PATIENCE).expect("no hang").expect("reply");
        assert_eq!(reply.header, b"hdr");
        assert_eq!(reply.payload_len, len);
        let mut got = Vec::new();
        for seg in &mut reply.recv {
            got.extend_from_slice(seg.as_mut_slice());
        }
        let o = offset as usize;
        assert!(got[..len] == data[o..o + len], "range {offset}+{len}");
        assert!(
            got[len..].iter().all(|&b| b == 0xEE),
            "bytes past the range"
        );
    }
}

#[test]
fn a_range_over_the_reply_capacity_is_refused_and_the_connection_lives() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), pattern(6, 10_000)).unwrap();
    let file = std::fs::File::open(dir.path().join("f")).unwrap();
    let (_l, c, mut s) = connected();
    let r = s.replier();
    let p = c.start(read_request(&[100])).unwrap();
    let inc = s.recv().unwrap().unwrap();
    let over = FileRange {
        file: &file,
        offset: 0,
        len: 101,
    };
    assert!(matches!(
        r.reply_file(inc.id, b"", over),
        Err(Error::LimitExceeded { .. })
    ));
    let ok = FileRange { len: 100, ..over };
    r.reply_file(inc.id, b"", ok).unwrap();
    assert_eq!(p.wait_timeout(PATIENCE).unwrap().unwrap().payload_len, 100);
}

#[test]
fn a_file_shorter_than_its_range_fails_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), pattern(7, 10_000)).unwrap();
    let file = std::fs::File::open(dir.path().join("f")).unwrap();
    let (l, c, mut s) = connected();
    let r = s.replier();
    let p = c.start(read_request(&[20_000])).unwrap();
    let inc = s.recv().unwrap().unwrap();
    // As if the file had been truncated after the server sized the reply.
    let range = FileRange {
        file: &file,
        offset: 5000,
        len: 20_000 - 5000,
    };
    let e = r.reply_file(inc.id, b"", range).unwrap_err();
    assert!(format!("{e:?}").contains("short"), "{e:?}");
    // The client is told the connection failed; it never sees a completed short reply.
    match p.wait_timeout(PATIENCE).expect("no hang") {
        Err(Error::ConnectionClosed(_)) | Err(Error::Decode { .. }) => {}
        other => panic!("the client got {other:?}"),
    }
    assert!(s.recv().is_err() || matches!(s.recv(), Ok(None)));
    // Another connection to the same listener works.
    let mut ccfg = config();
    ccfg.client.connect = l.local_addr();
    let c2 = TcpTransport.connect(&ccfg, &pool()).unwrap();
    let mut s2 = l.accept().unwrap().unwrap();
    let p = c2.start(read_request(&[100])).unwrap();
    let inc = s2.recv().unwrap().unwrap();
    let ok = FileRange {
        file: &file,
        offset: 0,
        len: 100,
    };
    s2.replier().reply_file(inc.id, b"", ok).unwrap();
    assert_eq!(p.wait_timeout(PATIENCE).unwrap().unwrap().payload_len, 100);
}

#[test]
fn the_server_sends_buffered_reads_as_file_ranges_and_direct_reads_from_the_pool() {
    let h = Harness::start(Arc::new(TcpTransport), |_| {});
    let data = pattern(8, 1 << 20);
    std::fs::write(h.path("f"), &data).unwrap();
    let c = h.client();
    let stats = h.server.stats();
    let f = c.open("f", OpenFlags::READ).unwrap();
    for i in 0..10u64 {
        let back = f.zero_readv(64 << 10, i * 4096).unwrap();
        assert!(back.to_vec() == data[i as usize * 4096..][..64 << 10]);
    }
    assert_eq!(stats.file_range_replies.load(Relaxed), 10);
    assert_eq!(stats.pool_read_replies.load(Relaxed), 0);
    let d = c.open("f", OpenFlags::READ | OpenFlags::DIRECT).unwrap();
    let back = d.zero_readv(64 << 10, 4096).unwrap();
    assert!(back.to_vec() == data[4096..][..64 << 10]);
    assert_eq!(stats.file_range_replies.load(Relaxed), 10);
    assert_eq!(stats.pool_read_replies.load(Relaxed), 1);
    drop((f, d, back, c));
    h.assert_server_clean();
    // tcp.sendfile = false: every read through pool buffers.
    let h = Harness::start(Arc::new(TcpTransport), |c| {
        zcio_tcp::config::TcpConfig::of_mut(c).sendfile = false
    });
    std::fs::write(h.path("f"), &data).unwrap();
    let c = h.client();
    let f = c.open("f", OpenFlags::READ).unwrap();
    let back = f.zero_readv(64 << 10, 4096).unwrap();
    assert!(back.to_vec() == data[4096..][..64 << 10]);
    let stats = h.server.stats();
    assert_eq!(stats.file_range_replies.load(Relaxed), 0);
    assert_eq!(stats.pool_read_replies.load(Relaxed), 1);
    drop((f, back, c));
    h.assert_server_clean();
}
