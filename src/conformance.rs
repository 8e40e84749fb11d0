//! The client-server conformance suite, run unchanged over every transport.
//!
//! Each case is a function taking the transport under test; [`conformance_tests!`]
//! (`zcio::conformance_tests!`) expands into one `#[test]` per case for a transport
//! factory, so the TCP crate, the RDMA crate and anything else run the same suite by
//! changing only the transport. A transport that needs hardware this machine may lack
//! (RDMA) marks its cases `#[ignore = "..."]` through the macro, so a host without it reports
//! them as ignored, never as passed; run where the hardware is, a factory that returns
//! `None` fails the case.
//!
//! Every case starts a real server on 127.0.0.1 (port 0) over a fresh export directory
//! under `$TMPDIR`, with small pools so that leaks show, and checks data byte for byte.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::Config;
use crate::error::Error;
use crate::pool::{ClassConfig, Pool};
use crate::proto::{OpenFlags, Status};
use crate::transport::{Request, Transport};
use crate::{Client, Server, ServerHandle};

mod behaviour;
pub use behaviour::{
    direct_io_forced_by_the_server, file_handles_are_per_connection, long_listing_spans_replies,
    open_mode_and_truncate, shutdown_with_live_connections,
};

/// A server on a temporary export, and a way to make clients for it.
pub struct Harness {
    /// The transport under test.
    pub transport: Arc<dyn Transport>,
    /// The configuration clients get (server address filled in).
    pub cfg: Config,
    /// The running server.
    pub server: ServerHandle,
    dir: tempfile::TempDir,
}

/// A small pool configuration for tests (so leaks and exhaustion show quickly).
pub fn test_pool() -> crate::pool::PoolConfig {
    crate::pool::PoolConfig {
        classes: vec![
            ClassConfig {
                size: 4 << 10,
                count: 1024,
                reserve: 16,
                arena_slots: 256,
            },
            ClassConfig {
                size: 64 << 10,
                count: 64,
                reserve: 0,
                arena_slots: 16,
            },
            ClassConfig {
                size: 1 << 20,
                count: 24,
                reserve: 0,
                arena_slots: 4,
            },
        ],
        wait_timeout: Duration::from_secs(10),
        stripes: 2,
    }
}

impl Harness {
    /// Starts a server; `tweak` edits the configuration first.
    pub fn start(transport: Arc<dyn Transport>, tweak: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("zcio-conf-")
            .tempdir()
            .expect("temp export dir");
        let mut cfg = Config {
            transport: transport.name().to_string(),
            ..Config::default()
        };
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.server.export = dir.path().to_path_buf();
        cfg.server.workers = 4;
        cfg.pool = test_pool();
        tweak(&mut cfg);
        let pool = Pool::new(&cfg.pool).expect("server pool");
        let server = Server::bind_transport(&cfg, transport.as_ref(), pool)
            .expect("bind server")
            .spawn()
            .expect("spawn server");
        cfg.client.connect = server.local_addr().to_string();
        Harness {
            transport,
            cfg,
            server,
            dir,
        }
    }

    /// The export directory.
    pub fn export(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the export.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A new client with its own pool.
    pub fn client(&self) -> Client {
        self.try_client(|_| {}).expect("client connects")
    }

    /// A new client with a tweaked configuration.
    pub fn try_client(&self, tweak: impl FnOnce(&mut Config)) -> crate::Result<Client> {
        let mut cfg = self.cfg.clone();
        tweak(&mut cfg);
        let pool = Pool::new(&cfg.pool)?;
        Client::connect_transport(&cfg, self.transport.as_ref(), pool)
    }

    /// Waits until the server's pool has every buffer back and no file is open.
    pub fn assert_server_clean(&self) {
        // Generous: this detects leaks and hangs, not slowness (CI machines are loaded).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let in_use = self.server.pool().stats().slots_in_use();
            let files = self.server.open_files();
            if in_use == 0 && files == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not clean: {in_use} buffers in use, {files} files open, {} connections\n{}",
                self.server.connections(),
                self.server.pool().stats()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends `req` on a transport connection (no file API) and decodes its reply; no payload
/// either way.
pub fn raw_call(
    conn: &dyn crate::transport::ClientConn,
    req: &crate::proto::Req,
) -> crate::Result<crate::proto::Resp> {
    let reply = conn
        .start(Request {
            header: req.encode(),
            ..Request::default()
        })?
        .wait()?;
    crate::proto::decode_reply(req, &reply.header)
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v[..]);
    v
}

fn write_file(h: &Harness, name: &str, data: &[u8]) {
    std::fs::write(h.path(name), data).expect("write test file");
}

/// The iovec shapes every data test runs.
pub fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("1 x 1 MiB", vec![1 << 20]),
        ("32 x 4 KiB", vec![4096; 32]),
        ("256 x 4 KiB", vec![4096; 256]),
        ("odd sizes", vec![1, 4095, 4097, 13, 65543, 7, 100_000]),
        ("300 x 4 KiB (split)", vec![4096; 300]),
        ("1 x 3 MiB (split)", vec![3 << 20]),
    ]
}

/// preadv into the caller's iovecs, many shapes, random offsets, reads past the end.
pub fn preadv_shapes(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let data = pattern(1, (4 << 20) + 333);
    write_file(&h, "f", &data);
    let c = h.client();
    let f = c.open("f", OpenFlags::READ).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    for (name, shape) in shapes() {
        for round in 0..3 {
            let total: usize = shape.iter().sum();
            let offset = match round {
                0 => 0,
                1 => rng.gen_range(0..data.len() as u64 - total as u64),
                // Straddles the end of the file: a short read.
                _ => data.len() as u64 - (total as u64 / 2),
            };
            let mut bufs: Vec<Vec<u8>> = shape.iter().map(|&n| vec![0xAA; n]).collect();
            let mut iov: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let n = f.preadv(&mut iov, offset).unwrap();
            let want = total.min(data.len() - offset as usize);
            assert_eq!(n, want, "{name} at {offset}: length");
            let got: Vec<u8> = bufs.concat();
            assert!(
                got[..n] == data[offset as usize..offset as usize + n],
                "{name} at {offset}: data"
            );
            assert!(
                got[n..].iter().all(|&b| b == 0xAA),
                "{name}: bytes beyond the read were written"
            );
        }
    }
    // Entirely past the end.
    let mut b = vec![0u8; 4096];
    assert_eq!(f.pread(&mut b, data.len() as u64 + 10).unwrap(), 0);
    drop(f);
    drop(c);
    h.assert_server_clean();
}

/// pwritev from the caller's iovecs, many shapes, random offsets; checked on disk.
pub fn pwritev_shapes(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let c = h.client();
    let f = c.open("w", OpenFlags::rw() | OpenFlags::CREATE).unwrap();
    let mut model = vec![0u8; 0];
    let mut rng = StdRng::seed_from_u64(3);
    for (i, (name, shape)) in shapes().into_iter().enumerate() {
        let total: usize = shape.iter().sum();
        let offset = rng.gen_range(0..(2u64 << 20));
        let data = pattern(100 + i as u64, total);
        let mut iov = Vec::new();
        let mut at = 0;
        for &n in &shape {
            iov.push(IoSlice::new(&data[at..at + n]));
            at += n;
        }
        assert_eq!(f.pwritev(&iov, offset).unwrap(), total, "{name}");
        let end = offset as usize + total;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[offset as usize..end].copy_from_slice(&data);
    }
    f.fsync().unwrap();
    assert_eq!(f.stat().unwrap().size, model.len() as u64);
    let disk = std::fs::read(h.path("w")).unwrap();
    assert!(disk == model, "file on disk differs from what was written");
    drop(f);
    drop(c);
    h.assert_server_clean();
}

/// The zero-copy family: get_buffers, zero_writev, zero_readv.
pub fn zero_copy_family(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let c = h.client();
    let f = c.open("z", OpenFlags::rw() | OpenFlags::CREATE).unwrap();
    for (i, (count, size)) in [
        (1usize, 1usize << 20),
        (32, 4096),
        (256, 4096),
        (5, 65536),
        (300, 4096),
    ]
    .into_iter()
    .enumerate()
    {
        let mut bufs = c.get_buffers(size, count).unwrap();
        let data = pattern(200 + i as u64, size * count);
        for (j, b) in bufs.buffers_mut().iter_mut().enumerate() {
            b.copy_from_slice(&data[j * size..(j + 1) * size]);
        }
        let off = (i as u64) * 7 * 4096 + 11;
        assert_eq!(f.zero_writev(&bufs, off).unwrap(), size * count);
        drop(bufs);
        let back = f.zero_readv(size * count, off).unwrap();
        assert_eq!(back.total_len(), size * count);
        assert!(
            back.to_vec() == data,
            "zero_readv returned other bytes ({count} x {size})"
        );
        assert!(back
            .buffers()
            .iter()
            .all(|b| b.as_ptr() as usize % 4096 == 0));
    }
    // Short read at the end of the file.
    let size = f.stat().unwrap().size;
    let tail = f.zero_readv(1 << 20, size - 100).unwrap();
    assert_eq!(tail.total_len(), 100);
    let disk = std::fs::read(h.path("z")).unwrap();
    assert!(
        tail.to_vec() == disk[disk.len() - 100..],
        "the short read at the end returned other bytes"
    );
    assert_eq!(f.zero_readv(4096, size + 1).unwrap().total_len(), 0);
    let client_pool = c.pool().clone();
    drop(tail);
    drop(f);
    assert_eq!(
        client_pool.stats().slots_in_use(),
        0,
        "client buffers leaked"
    );
    drop(c);
    h.assert_server_clean();
}

/// Async submission with 32 requests in flight, every API, awaited and waited.
pub fn async_in_flight(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let data = pattern(4, 32 * 65536);
    write_file(&h, "a", &data);
    let c = h.client();
    let f = c.open("a", OpenFlags::rw()).unwrap();
    let pending: Vec<_> = (0..32)
        .map(|i| f.zero_readv_async(65536, i as u64 * 65536).unwrap())
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        let got = if i % 2 == 0 {
            p.wait().unwrap()
        } else {
            crate::transport::block_on(p).unwrap()
        };
        assert!(
            got.to_vec() == data[i * 65536..(i + 1) * 65536],
            "async read {i}"
        );
    }
    // Reads into caller-provided pool buffers: 32 x (16 x 4 KiB).
    let pending: Vec<_> = (0..32)
        .map(|i| {
            let bufs = c.get_buffers(4096, 16).unwrap();
            f.read_into_async(bufs, i as u64 * 65536).unwrap()
        })
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        assert!(p.wait().unwrap().to_vec() == data[i * 65536..(i + 1) * 65536]);
    }
    // The async preadv into the caller's own memory: 32 x (4 x 16 KiB).
    let pending: Vec<_> = (0..32)
        .map(|i| {
            f.preadv_async(vec![vec![0u8; 16384]; 4], i as u64 * 65536)
                .unwrap()
        })
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        let (n, bufs) = p.wait().unwrap();
        assert_eq!((n, bufs.len()), (65536, 4));
        assert!(
            bufs.concat() == data[i * 65536..(i + 1) * 65536],
            "preadv_async {i}"
        );
    }
    // The async pwritev from the caller's own memory, then back to the original.
    let pending: Vec<_> = (0..32)
        .map(|i| {
            let chunk = data[i * 65536..(i + 1) * 65536].to_vec();
            let bufs = chunk.chunks(8192).map(<[u8]>::to_vec).collect();
            f.pwritev_async(bufs, i as u64 * 65536).unwrap()
        })
        .collect();
    for p in pending {
        let (n, bufs) = p.wait().unwrap();
        assert_eq!((n, bufs.len()), (65536, 8));
    }
    assert!(std::fs::read(h.path("a")).unwrap() == data);
    // 32 writes in flight, then verify.
    let new = pattern(5, 32 * 65536);
    let pending: Vec<_> = (0..32)
        .map(|i| {
            let mut b = c.get_buffers(65536, 1).unwrap();
            b.buffers_mut()[0].copy_from_slice(&new[i * 65536..(i + 1) * 65536]);
            f.zero_writev_async(b, i as u64 * 65536).unwrap()
        })
        .collect();
    for p in pending {
        let (n, bufs) = p.wait().unwrap();
        assert_eq!((n, bufs.count()), (65536, 1));
    }
    assert!(std::fs::read(h.path("a")).unwrap() == new);
    drop(f);
    drop(c);
    h.assert_server_clean();
}

/// Several clients at once, each on its own file, plus one shared file read by all.
pub fn several_clients(t: Arc<dyn Transport>) {
    let h = Arc::new(Harness::start(t, |_| {}));
    let shared = pattern(6, 1 << 20);
    write_file(&h, "shared", &shared);
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let h = h.clone();
            let shared = shared.clone();
            std::thread::spawn(move || {
                let c = h.client();
                let name = format!("own{k}");
                let f = c.open(&name, OpenFlags::rw() | OpenFlags::CREATE).unwrap();
                let mine = pattern(10 + k, 512 << 10);
                for round in 0..4 {
                    assert_eq!(f.pwrite(&mine, round * 1000).unwrap(), mine.len());
                    let mut b = vec![0u8; mine.len()];
                    assert_eq!(f.pread(&mut b, round * 1000).unwrap(), mine.len());
                    assert!(b == mine, "client {k} round {round}");
                    let s = c.open("shared", OpenFlags::READ).unwrap();
                    let got = s.zero_readv(1 << 20, 0).unwrap();
                    assert!(got.to_vec() == shared, "client {k} shared read");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    h.assert_server_clean();
}

/// O_DIRECT reads and writes with page-aligned pool buffers.
pub fn o_direct(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let c = h.client();
    let f = c
        .open("d", OpenFlags::rw() | OpenFlags::CREATE | OpenFlags::DIRECT)
        .expect("open O_DIRECT (the export's file system must support it)");
    let data = pattern(7, 256 << 10);
    let mut bufs = c.get_buffers(4096, 64).unwrap();
    for (j, b) in bufs.buffers_mut().iter_mut().enumerate() {
        b.copy_from_slice(&data[j * 4096..(j + 1) * 4096]);
    }
    assert_eq!(f.zero_writev(&bufs, 8192).unwrap(), data.len());
    let back = f.zero_readv(data.len(), 8192).unwrap();
    assert!(back.to_vec() == data);
    // A misaligned O_DIRECT read is either refused with EINVAL or served correctly (some
    // file systems fall back to buffered I/O); never mangled.
    let mut odd = vec![0u8; 100];
    match f.pread(&mut odd, 8193) {
        Err(Error::Remote { code, .. }) => assert_eq!(code, libc::EINVAL as u32),
        Ok(n) => {
            assert_eq!(n, 100);
            assert!(
                odd[..] == data[1..101],
                "misaligned O_DIRECT read mangled the data"
            );
        }
        Err(e) => panic!("misaligned O_DIRECT read: {e}"),
    }
    let disk = std::fs::read(h.path("d")).unwrap();
    assert!(disk[8192..] == data[..]);
    drop((f, c, bufs, back));
    h.assert_server_clean();
}

/// Both kinds of read reply payload: a file range (what a transport that takes them, like
/// TCP, sends from the page cache) for a buffered file, pool buffers for an `O_DIRECT`
/// file (and for every file over a transport that takes no ranges, and for small reads the
/// page cache holds, which the server may serve on its receiving thread). Same bytes either way,
/// for every API, at and past the end of a file that grows and shrinks between reads.
pub fn read_payload_kinds(t: Arc<dyn Transport>) {
    use std::sync::atomic::Ordering::Relaxed;
    let h = Harness::start(t, |_| {});
    let stats = h.server.stats();
    let kinds = || {
        (
            stats.file_range_replies.load(Relaxed),
            stats.pool_read_replies.load(Relaxed),
        )
    };
    let data = pattern(31, (2 << 20) + 4097);
    write_file(&h, "b", &data);
    write_file(&h, "d", &data[..2 << 20]);
    let c = h.client();
    // Reads over 16 KiB, then small ones (which a server may answer from the page cache
    // in pool buffers whatever the transport takes: one copy of a few KiB costs less than
    // a file range's system calls).
    let big = [(0usize, 1 << 20), (4096, 32 * 4096)];
    let small = [(8192usize, 4096)];
    let check = |f: &crate::File, len: usize, data: &[u8], what: &str, reads: &[(usize, usize)]| {
        let mut count = 0u64;
        for &(off, n) in reads {
            let want = n.min(len - off);
            let mut b = vec![0xAA; n];
            assert_eq!(f.pread(&mut b, off as u64).unwrap(), want, "{what}: pread");
            assert!(b[..want] == data[off..off + want], "{what}: pread data");
            let z = f.zero_readv(n, off as u64).unwrap();
            assert!(z.to_vec() == data[off..off + want], "{what}: zero_readv");
            let mut segs: Vec<Vec<u8>> = vec![vec![0; 4096]; n / 4096];
            let mut iov: Vec<IoSliceMut<'_>> =
                segs.iter_mut().map(|s| IoSliceMut::new(s)).collect();
            assert_eq!(f.preadv(&mut iov, off as u64).unwrap(), want);
            assert!(
                segs.concat()[..want] == data[off..off + want],
                "{what}: preadv"
            );
            count += 3;
        }
        count
    };
    let fb = c.open("b", OpenFlags::READ).unwrap();
    let before = kinds();
    let n = check(&fb, data.len(), &data, "buffered", &big);
    let after = kinds();
    assert_eq!((after.0 - before.0) + (after.1 - before.1), n);
    assert!(
        after.0 == before.0 || after.1 == before.1,
        "a buffered file's large reads mix payload kinds: {before:?} -> {after:?}"
    );
    let before = kinds();
    let n = check(&fb, data.len(), &data, "buffered", &small);
    // The end of the file: a short read, and nothing past it.
    let mut b = vec![0u8; 8192];
    assert_eq!(fb.pread(&mut b, data.len() as u64 - 10).unwrap(), 10);
    assert!(b[..10] == data[data.len() - 10..]);
    assert_eq!(fb.pread(&mut b, data.len() as u64 + 1).unwrap(), 0);
    let after = kinds();
    assert_eq!(
        (after.0 - before.0) + (after.1 - before.1),
        n + 1,
        "every buffered read that returns data is one reply of one kind"
    );
    // The file grows, then shrinks, behind the open handle: each read sees its size now.
    let mut grown = data.clone();
    grown.extend_from_slice(&pattern(32, 5000));
    write_file(&h, "b", &grown);
    let mut b = vec![0u8; 8192];
    assert_eq!(fb.pread(&mut b, data.len() as u64).unwrap(), 5000);
    assert!(b[..5000] == grown[data.len()..]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(h.path("b"))
        .unwrap()
        .set_len(100)
        .unwrap();
    assert_eq!(fb.pread(&mut b, 0).unwrap(), 100);
    assert!(b[..100] == data[..100]);
    assert_eq!(fb.pread(&mut b, 4096).unwrap(), 0);
    // O_DIRECT: always pool buffers, aligned reads.
    let fd = c.open("d", OpenFlags::READ | OpenFlags::DIRECT).unwrap();
    let before = kinds();
    let n = check(&fd, 2 << 20, &data, "O_DIRECT", &big)
        + check(&fd, 2 << 20, &data, "O_DIRECT", &small);
    let after = kinds();
    assert_eq!(
        after.0, before.0,
        "an O_DIRECT file's read sent as a file range"
    );
    assert_eq!(after.1 - before.1, n);
    // Write-only: a read fails cleanly (EBADF) whatever the payload kind.
    let fw = c.open("b", OpenFlags::WRITE).unwrap();
    match fw.pread(&mut b, 0) {
        Err(Error::Remote { code, .. }) => assert_eq!(code, libc::EBADF as u32),
        other => panic!("read of a write-only file: {other:?}"),
    }
    drop((fb, fd, fw, c));
    h.assert_server_clean();
}

/// `..`, absolute paths and symlinks that lead out are refused; inside links work.
pub fn escapes_refused(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), h.path("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), h.path("secret_link")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc/passwd", h.path("rel_out")).unwrap();
    std::fs::create_dir(h.path("sub")).unwrap();
    std::fs::write(h.path("sub/inside"), b"ok").unwrap();
    std::os::unix::fs::symlink("sub/inside", h.path("in_link")).unwrap();
    let c = h.client();
    let outside_name = outside.path().join("secret");
    for p in [
        "../secret",
        "sub/../../secret",
        "/etc/passwd",
        outside_name.to_str().unwrap(),
        "out/secret",
        "secret_link",
        "rel_out",
    ] {
        match c.open(p, OpenFlags::READ) {
            Err(Error::Remote { code, .. }) => {
                assert_eq!(
                    code,
                    Status::OutsideExport as u32,
                    "{p}: wrong refusal code"
                )
            }
            Ok(_) => panic!("{p}: escaped the export"),
            Err(e) => panic!("{p}: {e}"),
        }
        refused_as_outside(c.stat(p), &format!("stat {p}"));
    }
    refused_as_outside(
        c.open("out/new", OpenFlags::rw() | OpenFlags::CREATE),
        "create out/new",
    );
    assert!(
        !outside.path().join("new").exists(),
        "created a file outside the export"
    );
    refused_as_outside(c.unlink("out/secret"), "unlink out/secret");
    assert!(
        outside.path().join("secret").exists(),
        "unlinked a file outside the export"
    );
    refused_as_outside(c.list("out"), "list out");
    refused_as_outside(c.list(".."), "list ..");
    let f = c.open("in_link", OpenFlags::READ).unwrap();
    let mut b = [0u8; 2];
    assert_eq!(f.pread(&mut b, 0).unwrap(), 2);
    assert_eq!(&b, b"ok");
}

/// Fails unless `r` is the server's refusal of a path that leads out of the export (any
/// other error, e.g. "not found", would hide an escape that merely missed its target).
fn refused_as_outside<T: std::fmt::Debug>(r: crate::error::Result<T>, what: &str) {
    match r {
        Err(Error::Remote { code, .. }) if code == Status::OutsideExport as u32 => {}
        other => panic!("{what}: expected the outside-the-export refusal, got {other:?}"),
    }
}

/// A FIFO or a device node in the export is refused at once: opening it never holds a
/// server thread (a FIFO's open(2) would wait for a writer), and the server keeps serving.
pub fn special_files_refused(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    std::fs::write(h.path("plain"), b"plain").unwrap();
    let c = Arc::new(h.client());
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o644);
    match nix::unistd::mkfifo(&h.path("fifo"), mode) {
        // Some file systems (9p in the RDMA test guest) cannot hold a FIFO; the check is
        // the server's, the same over every transport, and runs where they can.
        Err(e) => println!(
            "SKIP special_files_refused (FIFO part): the export's file system cannot make \
             a FIFO: {e}"
        ),
        Ok(()) => {
            for (flags, what) in [(OpenFlags::READ, "read"), (OpenFlags::rw(), "read-write")] {
                let (tx, rx) = std::sync::mpsc::channel();
                let c2 = c.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(c2.open("fifo", flags).map(drop));
                });
                match rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(Err(Error::Remote { message, .. })) => {
                        assert!(message.contains("not a regular file"), "{what}: {message}")
                    }
                    Ok(other) => panic!("{what}: opening a FIFO gave {other:?}"),
                    Err(_) => {
                        // Unblock the server thread before failing.
                        let _ = std::fs::OpenOptions::new().write(true).open(h.path("fifo"));
                        panic!("{what}: opening a FIFO hung")
                    }
                }
            }
        }
    }
    // A character device: the same node as /dev/null (1, 3), made in the export.
    let dev = nix::sys::stat::makedev(1, 3);
    match nix::sys::stat::mknod(&h.path("null"), nix::sys::stat::SFlag::S_IFCHR, mode, dev) {
        // Making a device node takes CAP_MKNOD (root); the check is the server's, the same
        // over every transport, and CI runs it as root.
        Err(e) => println!(
            "SKIP special_files_refused (device part): cannot make a device node here: {e}"
        ),
        Ok(()) => match c.open("null", OpenFlags::READ) {
            Err(Error::Remote { code, message, .. }) => {
                assert_eq!(code, libc::EINVAL as u32, "device node: {message}");
                assert!(message.contains("not a regular file"), "device: {message}");
            }
            other => panic!("opening a device node gave {other:?}"),
        },
    }
    let f = c.open("plain", OpenFlags::READ).unwrap();
    let mut b = [0u8; 5];
    assert_eq!(f.pread(&mut b, 0).unwrap(), 5);
    assert_eq!(&b, b"plain");
}

/// Authentication: the right token works, a wrong or missing one is refused, and
/// operations before authentication are refused.
pub fn wrong_token_refused(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |c| {
        c.server.token = "correct horse".into();
    });
    let ok = h.try_client(|c| c.client.token = "correct horse".into());
    assert!(ok.is_ok(), "{ok:?}");
    let wrong = h.try_client(|c| c.client.token = "battery staple".into());
    assert!(matches!(wrong, Err(Error::Auth(_))), "{wrong:?}");
    let none = h.try_client(|c| c.client.token = String::new());
    assert!(matches!(none, Err(Error::Auth(_))), "{none:?}");
    // A raw connection that skips auth cannot open files.
    let pool = Pool::new(&h.cfg.pool).unwrap();
    let conn = h.transport.connect(&h.cfg, &pool).unwrap();
    let req = crate::proto::Req::Open {
        path: "x".into(),
        flags: OpenFlags::READ,
        mode: 0,
    };
    match raw_call(&*conn, &req) {
        Err(Error::Remote { code, .. }) => assert_eq!(code, Status::AuthRequired as u32),
        other => panic!("open before auth: {other:?}"),
    }
}

/// Malformed request headers get error replies; the connection and other clients go on.
pub fn malformed_requests(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    write_file(&h, "f", b"hello");
    let good = h.client();
    let pool = Pool::new(&h.cfg.pool).unwrap();
    let raw = h.transport.connect(&h.cfg, &pool).unwrap();
    let bad_headers: Vec<Vec<u8>> = vec![
        vec![],
        vec![200, 0, 0, 0],
        vec![4, 0, 0, 0, 1],
        vec![3, 0, 0, 0, 0xff, 0xff],
        vec![1, 0, 0, 0, 9, 9],
        {
            let mut v = crate::proto::Req::Close { fh: 1 }.encode();
            v.push(0);
            v
        },
    ];
    for hd in bad_headers {
        let r = raw
            .start(Request {
                header: hd.clone(),
                ..Request::default()
            })
            .unwrap()
            .wait()
            .unwrap();
        let code = u32::from_le_bytes(r.header[..4].try_into().unwrap());
        assert_ne!(code, 0, "{hd:?} accepted");
    }
    // Unknown file handles and limits.
    let f = good.open("f", OpenFlags::READ).unwrap();
    let mut b = [0u8; 5];
    assert_eq!(f.pread(&mut b, 0).unwrap(), 5);
    // Too many segments for one request is refused before sending (the client splits,
    // so go to the transport directly).
    let lim = raw.limits();
    let segs = (0..lim.max_segments + 1)
        .map(|_| crate::transport::RecvSeg::Pool(pool.get(1).unwrap()))
        .collect();
    let e = raw
        .start(Request {
            header: crate::proto::Req::Read {
                fh: 1,
                offset: 0,
                len: 1,
            }
            .encode(),
            send: Vec::new(),
            recv: segs,
        })
        .unwrap_err();
    assert!(matches!(e, Error::LimitExceeded { .. }), "{e:?}");
    drop((f, good, raw));
    h.assert_server_clean();
}

/// A client that vanishes with requests in flight: the server's pool returns to full and
/// the client's open files are closed.
pub fn client_vanishes_mid_transfer(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    write_file(&h, "big", &pattern(8, 4 << 20));
    {
        let c = h.client();
        let f = c.open("big", OpenFlags::rw()).unwrap();
        let _f2 = c.open("big", OpenFlags::READ).unwrap();
        let mut pend = Vec::new();
        for i in 0..16 {
            pend.push(f.zero_readv_async(1 << 20, (i % 4) << 20).unwrap());
            let mut w = c.get_buffers(65536, 4).unwrap();
            w.buffers_mut().iter_mut().for_each(|b| b.fill(i as u8));
            pend.push(f.zero_writev_async(w, i * 65536).unwrap().map(|(_, b)| b));
        }
        assert!(h.server.open_files() >= 1);
        c.close();
        for p in pend {
            // Each completes (with data or with an error), never hangs.
            let _ = p.wait();
        }
    }
    h.assert_server_clean();
    // The server still serves.
    let c = h.client();
    assert_eq!(c.stat("big").unwrap().size, 4 << 20);
}

/// Metadata operations: stat, list, mkdir, unlink, truncate, fsync, close.
pub fn metadata_ops(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let c = h.client();
    c.mkdir("dir").unwrap();
    for i in 0..300 {
        std::fs::write(h.path(&format!("dir/file{i:03}")), vec![1u8; i]).unwrap();
    }
    let l = c.list("dir").unwrap();
    assert_eq!(l.len(), 300);
    assert_eq!(l[7].name, "file007");
    assert_eq!(l[7].size, 7);
    assert!(c
        .list("")
        .unwrap()
        .iter()
        .any(|e| e.name == "dir" && e.is_dir));
    assert!(c.stat("dir").unwrap().is_dir());
    assert!(c.stat("").unwrap().is_dir());
    let f = c
        .open("dir/t", OpenFlags::rw() | OpenFlags::CREATE)
        .unwrap();
    f.pwrite(b"0123456789", 0).unwrap();
    f.truncate(4).unwrap();
    f.fsync().unwrap();
    assert_eq!(c.stat("dir/t").unwrap().size, 4);
    assert!(c.stat("dir/t").unwrap().is_file());
    f.close().unwrap();
    assert!(c
        .open(
            "dir/t",
            OpenFlags::READ | OpenFlags::CREATE | OpenFlags::EXCL
        )
        .is_err());
    c.unlink("dir/t").unwrap();
    match c.stat("dir/t") {
        Err(Error::Remote { code, .. }) => assert_eq!(code, libc::ENOENT as u32),
        other => panic!("{other:?}"),
    }
    match c.open("dir", OpenFlags::READ) {
        Err(Error::Remote { code, .. }) => assert_eq!(code, libc::EISDIR as u32),
        other => panic!("opening a directory: {other:?}"),
    }
    drop(c);
    h.assert_server_clean();
}

/// A read-only export refuses every modification.
pub fn read_only_export(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |c| c.server.read_only = true);
    write_file(&h, "r", b"data");
    let c = h.client();
    assert!(c.read_only());
    let f = c.open("r", OpenFlags::READ).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(f.pread(&mut b, 0).unwrap(), 4);
    for e in [
        c.open("r", OpenFlags::rw()).map(drop),
        c.open("n", OpenFlags::WRITE | OpenFlags::CREATE).map(drop),
        c.unlink("r"),
        c.mkdir("d"),
    ] {
        match e {
            Err(Error::Remote { code, .. }) => assert_eq!(code, Status::ReadOnly as u32),
            other => panic!("modification allowed on a read-only export: {other:?}"),
        }
    }
    assert_eq!(std::fs::read(h.path("r")).unwrap(), b"data");
}

/// Open files per connection are bounded; closing one makes room.
pub fn open_file_limit(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |c| c.server.max_open_files = 3);
    write_file(&h, "f", b"x");
    let c = h.client();
    let files: Vec<_> = (0..3)
        .map(|_| c.open("f", OpenFlags::READ).unwrap())
        .collect();
    match c.open("f", OpenFlags::READ) {
        Err(Error::Remote { code, message, .. }) => {
            assert_eq!(code, Status::Limit as u32);
            assert!(message.contains("max_open_files"), "{message}");
        }
        other => panic!("fourth open: {other:?}"),
    }
    let mut it = files.into_iter();
    it.next().unwrap().close().unwrap();
    let again = c.open("f", OpenFlags::READ).unwrap();
    drop((again, it));
    drop(c);
    h.assert_server_clean();
}

/// Connections beyond the limit are refused with a clear error.
pub fn max_connections(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |c| c.server.max_connections = 2);
    let a = h.client();
    let b = h.client();
    match h.try_client(|_| {}) {
        Err(Error::Remote { code, message, .. }) => {
            assert_eq!(code, Status::Busy as u32);
            assert!(message.contains("limit of 2 connections"), "{message}");
        }
        Err(e) => panic!("unclear refusal: {e}"),
        Ok(_) => panic!("a third connection was accepted"),
    }
    drop(a);
    // Once one goes, a new one is let in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match h.try_client(|_| {}) {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("no room after a client left: {e}"),
        }
    }
    drop(b);
}

/// Expands into one `#[test]` per conformance case for a transport factory: an
/// expression of type `Option<Arc<dyn Transport>>`. `None` fails the case (the transport
/// could not be set up); a transport that needs hardware a host may lack passes
/// attributes after the factory, e.g. `conformance_tests!(factory(), #[ignore = "why"])`,
/// which go on every case.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::conformance_tests!(@cases $factory; [$(#[$attr])*];
            preadv_shapes, pwritev_shapes, zero_copy_family, async_in_flight,
            several_clients, o_direct, read_payload_kinds, escapes_refused, special_files_refused, wrong_token_refused,
            malformed_requests, client_vanishes_mid_transfer, metadata_ops,
            read_only_export, max_connections, open_file_limit,
            file_handles_are_per_connection, long_listing_spans_replies, open_mode_and_truncate,
            direct_io_forced_by_the_server, shutdown_with_live_connections);
    };
    (@cases $factory:expr; $attrs:tt; $($case:ident),* $(,)?) => {
        $( $crate::conformance_tests!(@case $factory; $attrs; $case); )*
    };
    (@case $factory:expr; [$($attr:tt)*]; $case:ident) => {
        #[test]
        $($attr)*
        fn $case() {
            let t: Option<::std::sync::Arc<dyn $crate::transport::Transport>> = $factory;
            let t = t.expect("the transport under test could not be set up");
            $crate::conformance::$case(t);
        }
    };
}
