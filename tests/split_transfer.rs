//! A transfer the client splits into several requests, whose middle request fails: the
//! caller gets that request's error (not a short count that would pass for end of file),
//! the requests already sent still run to the end, no buffer is lost, and the connection
//! keeps serving. The real client and server over the in-memory transport; between them a
//! listener that fails the request at offset 1 MiB, as a server's disk error would.
#![cfg(feature = "testkit")]

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use zcio::conformance::pattern;
use zcio::proto::{self, OpenFlags, Req};
use zcio::transport::mem::MemListener;
use zcio::transport::{Incoming, Limits, Listener, Replier, ServerConn};
use zcio::{Client, Config, Error, Pool, Server};

const MIB: usize = 1 << 20;
/// The errno the failed request reports.
const INJECTED: u32 = libc::EIO as u32;

/// A server connection that answers every read or write at offset 1 MiB with EIO itself,
/// and passes everything else to the server.
struct FailMiddle {
    inner: Box<dyn ServerConn>,
    failed: Arc<AtomicUsize>,
}

impl ServerConn for FailMiddle {
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn recv(&mut self) -> zcio::Result<Option<Incoming>> {
        loop {
            let Some(inc) = self.inner.recv()? else {
                return Ok(None);
            };
            let middle = matches!(
                Req::decode(&inc.header),
                Ok(Req::Read { offset, .. } | Req::Write { offset, .. }) if offset == MIB as u64
            );
            if !middle {
                return Ok(Some(inc));
            }
            self.failed.fetch_add(1, Ordering::SeqCst);
            let err = proto::encode_err(INJECTED, "injected: the disk failed");
            self.inner.replier().reply(inc.id, &err, &[])?;
        }
    }
    fn backlog(&mut self) -> bool {
        self.inner.backlog()
    }
    fn replier(&self) -> Arc<dyn Replier> {
        self.inner.replier()
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
}

struct FailMiddleListener {
    inner: Arc<MemListener>,
    failed: Arc<AtomicUsize>,
}

impl Listener for FailMiddleListener {
    fn accept(&self) -> zcio::Result<zcio::Result<Box<dyn ServerConn>>> {
        Ok(self.inner.accept()?.map(|inner| {
            Box::new(FailMiddle {
                inner,
                failed: self.failed.clone(),
            }) as Box<dyn ServerConn>
        }))
    }
    fn local_addr(&self) -> String {
        self.inner.local_addr()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

fn injected(r: zcio::Result<usize>, what: &str) {
    match r {
        Err(Error::Remote { code, .. }) if code == INJECTED => {}
        other => panic!("{what}: expected the middle request's EIO, got {other:?}"),
    }
}

#[test]
fn a_split_transfer_whose_middle_request_fails_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.server.export = dir.path().to_path_buf();
    cfg.limits.max_payload = MIB;
    cfg.pool = zcio::conformance::test_pool();
    let spool = Pool::new(&cfg.pool).unwrap();
    let limits = Limits {
        max_segments: cfg.limits.max_segments,
        max_payload: MIB,
        max_header: zcio::transport::MAX_HEADER,
        max_in_flight: 64,
        inline_threshold: 0,
        rdma_payload: false,
    };
    let mem = MemListener::new(spool.clone(), limits);
    let failed = Arc::new(AtomicUsize::new(0));
    let listener = Arc::new(FailMiddleListener {
        inner: mem.clone(),
        failed: failed.clone(),
    });
    let server = Server::with_listener(&cfg, listener, spool.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let cpool = Pool::new(&cfg.pool).unwrap();
    let c = Client::from_conn(&cfg, mem.connect().unwrap(), cpool.clone()).unwrap();

    let old = pattern(1, 3 * MIB);
    std::fs::write(dir.path().join("f"), &old).unwrap();
    let f = c.open("f", OpenFlags::rw()).unwrap();

    // A 3 MiB write is three requests; the middle one fails.
    let new = pattern(2, 3 * MIB);
    injected(f.pwritev(&[IoSlice::new(&new)], 0), "pwritev");
    assert_eq!(failed.load(Ordering::SeqCst), 1);
    // The first and the last were sent before the failure was known, and ran; the middle
    // MiB is untouched.
    let disk = std::fs::read(dir.path().join("f")).unwrap();
    assert!(disk[..MIB] == new[..MIB], "first piece");
    assert!(disk[MIB..2 * MIB] == old[MIB..2 * MIB], "middle piece");
    assert!(disk[2 * MIB..] == new[2 * MIB..], "last piece");

    // Reads: into caller buffers, and zero-copy (blocking and async).
    let mut buf = vec![0u8; 3 * MIB];
    injected(f.preadv(&mut [IoSliceMut::new(&mut buf)], 0), "preadv");
    injected(
        f.zero_readv(3 * MIB, 0).map(|b| b.total_len()),
        "zero_readv",
    );
    injected(
        f.zero_readv_async(3 * MIB, 0)
            .and_then(|p| p.wait())
            .map(|b| b.total_len()),
        "zero_readv_async",
    );
    let mut bufs = c.get_buffers(MIB, 3).unwrap();
    for (j, b) in bufs.buffers_mut().iter_mut().enumerate() {
        b.copy_from_slice(&new[j * MIB..(j + 1) * MIB]);
    }
    injected(f.zero_writev(&bufs, 0), "zero_writev");
    drop(bufs);
    assert_eq!(failed.load(Ordering::SeqCst), 5);

    // The connection still serves, byte for byte, and nothing leaked.
    let mut head = vec![0u8; MIB];
    assert_eq!(f.pread(&mut head, 0).unwrap(), MIB);
    assert!(head == new[..MIB]);
    drop(f);
    assert_eq!(cpool.stats().slots_in_use(), 0, "client buffers held");
    drop(c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while spool.stats().slots_in_use() != 0 || server.open_files() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "server not clean: {}",
            spool.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
