//! RDMA transport tests beyond the shared conformance suite: segment counts around the
//! device's SGE limit, credit exhaustion, peers that die mid-transfer, a client advertising
//! bogus memory keys, a memlock limit that is too low, and the cost measurement behind the
//! register-or-bounce rule.
//!
//! The tests that need a device are `#[ignore]`d, so a host without one reports them as
//! ignored; `ci/rxe-test` runs them (`--include-ignored`) in a guest with Soft-RoCE, and run
//! where there is no device they fail and say why. `registry_knows_rdma` and
//! `unknown_device_is_a_clear_error` run everywhere. Some tests re-run this binary as a
//! child process (the same test, selected with `--exact`, doing the role named by the
//! `ZCIO_FAULTS_CHILD` variable) to have a peer that can be killed, or whose resource limits
//! can be lowered without touching the other tests.
//!
//! Every device test runs in both `rdma.client_exposure` modes: as itself with the default
//! ("request": memory windows per request) and as `arena::<name>` with "arena" (see
//! [`with_exposure`] and the `arena` module at the end).
#![cfg(feature = "rdma")]

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use zcio::config::Config;
use zcio::conformance::{pattern, test_pool, Harness};
use zcio::proto::{self, OpenFlags, Req, Resp};
use zcio::transport::{RawSeg, RecvSeg, Request, SendSeg, Transport};
use zcio::{Client, Error, Pool};
use zcio_rdma::config::{ClientExposure, RdmaConfig};
use zcio_rdma::transport::Faults;
use zcio_rdma::verbs::Context;
use zcio_rdma::RdmaTransport;

// ---------------------------------------------------------------------------------------------
// Device selection, skipping, child processes.

fn required() -> bool {
    std::env::var("ZCIO_RDMA_REQUIRED").is_ok_and(|v| v == "1")
}

fn device_name() -> Option<String> {
    std::env::var("ZCIO_RDMA_DEVICE")
        .ok()
        .filter(|n| !n.is_empty())
}

thread_local! {
    /// The client exposure mode of the test running on this thread (see [`with_exposure`]).
    static EXPOSURE: std::cell::Cell<Option<ClientExposure>> = const { std::cell::Cell::new(None) };
}

/// The `rdma.client_exposure` every configuration of this test gets: set by
/// [`with_exposure`], or in a child process by its parent (`ZCIO_FAULTS_EXPOSURE`), or the
/// default.
fn exposure() -> ClientExposure {
    if let Some(e) = EXPOSURE.with(std::cell::Cell::get) {
        return e;
    }
    match std::env::var("ZCIO_FAULTS_EXPOSURE").as_deref() {
        Ok("arena") => ClientExposure::Arena,
        Ok("request") => ClientExposure::Request,
        _ => ClientExposure::default(),
    }
}

/// Runs `test` with clients in `mode`.
fn with_exposure(mode: ClientExposure, test: fn()) {
    EXPOSURE.with(|e| e.set(Some(mode)));
    test();
}

fn base_config() -> Config {
    let mut cfg = Config {
        transport: "rdma".into(),
        ..Config::default()
    };
    RdmaConfig::of_mut(&mut cfg).device = device_name();
    RdmaConfig::of_mut(&mut cfg).client_exposure = exposure();
    cfg.pool = test_pool();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg
}

/// The transport under test; a missing device fails the test (which is `#[ignore]`d, so it
/// runs only where one was asked for).
fn rdma(test: &str) -> Arc<dyn Transport> {
    let t = RdmaTransport::new();
    match t.check_available(&base_config()) {
        Ok(()) => Arc::new(t),
        Err(e) => panic!("{test} needs an RDMA device: {e}"),
    }
}

/// Whether an RDMA device is usable here (for the tests that run everywhere).
fn device_present() -> bool {
    RdmaTransport::new().check_available(&base_config()).is_ok()
}

fn start(t: Arc<dyn Transport>, tweak: impl FnOnce(&mut Config)) -> Harness {
    Harness::start(t, |c| {
        RdmaConfig::of_mut(c).device = device_name();
        RdmaConfig::of_mut(c).client_exposure = exposure();
        tweak(c);
    })
}

/// The device's scatter/gather limit as the transport uses it (capped at 32).
fn max_sge() -> usize {
    let ctx = Context::open(device_name().as_deref()).expect("open the device");
    (ctx.caps().expect("device caps").max_sge as usize).min(32)
}

/// A child process, killed if the test ends (or panics) while it still runs.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs this test binary as a child that runs only the test `test` (the caller), which
/// then does `role` (see [`child_role`]) instead of its own body.
fn spawn_child(test: &str, role: &str, env: &[(&str, &str)]) -> ChildGuard {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        test,
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("ZCIO_FAULTS_CHILD", role)
    .env("ZCIO_FAULTS_EXPOSURE", exposure().as_str())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildGuard(cmd.spawn().expect("spawn the child test process"))
}

/// Marks the child's own lines on its stdout (libtest writes there too, and its
/// `test <name> ... ` has no line end before the test's output).
const MARK: &str = "@@child@@ ";

/// Reads the child's stdout until it says `prefix`; returns the rest of that line.
fn wait_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, prefix: &str) -> String {
    let want = format!("{MARK}{prefix}");
    for line in lines {
        let line = line.expect("child stdout");
        if let Some(at) = line.find(&want) {
            return line[at + want.len()..].trim().to_string();
        }
    }
    panic!("the child process ended before printing `{prefix}`");
}

/// In a child process (see [`spawn_child`]): does the role it was started for and returns
/// true, and the test that spawned it then returns. In the test itself: false.
fn child_role() -> bool {
    let Ok(role) = std::env::var("ZCIO_FAULTS_CHILD") else {
        return false;
    };
    match role.as_str() {
        "client" => child_client(),
        "server" => child_server(),
        "memlock" => child_memlock(),
        other => panic!("unknown child role {other}"),
    }
    true
}

/// Tells the parent something (see [`MARK`]).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n{MARK}{line}");
    let _ = out.flush();
}

/// A client that starts many transfers and then waits to be killed.
fn child_client() {
    let mut cfg = base_config();
    cfg.client.connect = std::env::var("ZCIO_FAULTS_ADDR").expect("ZCIO_FAULTS_ADDR");
    let pool = Pool::new(&cfg.pool).unwrap();
    let c = Client::connect_transport(&cfg, &RdmaTransport::new(), pool).unwrap();
    let f = c.open("big", OpenFlags::rw()).unwrap();
    let mut pending = Vec::new();
    let mut writes = Vec::new();
    for i in 0..16u64 {
        pending.push(f.zero_readv_async(1 << 20, (i % 4) << 20).unwrap());
        let mut w = c.get_buffers(65536, 4).unwrap();
        w.buffers_mut().iter_mut().for_each(|b| b.fill(i as u8));
        writes.push(f.zero_writev_async(w, i * 65536).unwrap());
    }
    say("STARTED");
    std::thread::sleep(Duration::from_secs(300));
}

/// A server that takes requests and never answers, until it is killed.
fn child_server() {
    let cfg = base_config();
    let pool = Pool::new(&cfg.pool).unwrap();
    let l = RdmaTransport::new().listen(&cfg, &pool).unwrap();
    say(&format!("ADDR {}", l.local_addr()));
    let mut conn = l.accept().unwrap().unwrap();
    let mut held = Vec::new();
    while let Ok(Some(inc)) = conn.recv() {
        held.push(inc);
        say(&format!("GOT {}", held.len()));
    }
    std::thread::sleep(Duration::from_secs(300));
}

/// Drops CAP_IPC_LOCK (so the limit applies even to root) and lowers RLIMIT_MEMLOCK to
/// 1 MiB, then checks that listening and connecting with a 32 MiB pool fail clearly.
fn child_memlock() {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_V3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads the header and writes two `__user_cap_data_struct`s (version 3),
    // which `data` provides; both structs are repr(C) matches of the kernel's.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_IPC_LOCK);
    data[0].permitted &= !(1 << CAP_IPC_LOCK);
    // SAFETY: as above; capset only reads both arguments.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    assert_eq!(r, 0);
    lim.rlim_cur = 1 << 20;
    // SAFETY: setrlimit reads one rlimit; lowering the soft limit is always allowed.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
    assert_eq!(r, 0);

    let cfg = base_config();
    assert!(cfg.pool.total_bytes() > 1 << 20);
    let pool = Pool::new(&cfg.pool).unwrap();
    let t = RdmaTransport::new();
    let check = |what: &str, e: Error| {
        let msg = e.to_string();
        say(&format!("{what}: {msg}"));
        assert!(
            matches!(e, Error::TransportUnavailable { .. }),
            "{what}: {e:?}"
        );
        assert!(msg.contains("RLIMIT_MEMLOCK"), "{what}: {msg}");
        assert!(msg.contains("ulimit -l"), "{what}: {msg}");
        assert!(msg.contains(&(1u64 << 20).to_string()), "{what}: {msg}");
    };
    match t.listen(&cfg, &pool) {
        Ok(_) => panic!("listen succeeded under a 1 MiB memlock limit"),
        Err(e) => check("listen", e),
    }
    let mut ccfg = cfg.clone();
    ccfg.client.connect = "127.0.0.1:9".into();
    match t.connect(&ccfg, &pool) {
        Ok(_) => panic!("connect succeeded under a 1 MiB memlock limit"),
        Err(e) => check("connect", e),
    }
    say("MEMLOCK OK");
}

// ---------------------------------------------------------------------------------------------
// Log capture (for the warning about a client's bogus memory key).

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        std::io::stderr().write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits up to 10 s for every buffer of `pool` to be back (a server returns them from its own
/// threads, shortly after a connection ends); fails with `what` otherwise.
fn wait_pool_empty(pool: &Pool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().slots_in_use() != 0 {
        assert!(Instant::now() < deadline, "{what}: {}", pool.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Capture(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init();
        buf
    })
}

fn logs_text() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn segments_up_to_and_beyond_the_sge_limit() {
    let t = rdma("segments_up_to_and_beyond_the_sge_limit");
    let sge = max_sge();
    let h = start(t, |_| {});
    let c = h.client();
    let l = c.limits();
    assert!(l.rdma_payload, "{l:?}");
    assert!(
        l.max_segments >= 256,
        "one request must carry 256 segments: {l:?}"
    );
    let f = c.open("segs", OpenFlags::rw() | OpenFlags::CREATE).unwrap();
    for (round, n) in [1, sge, sge + 1, 256].into_iter().enumerate() {
        let off = (round as u64) * (2 << 20);
        // Pool segments, used in place: n x 4 KiB written, then read into n pool buffers.
        let data = pattern(round as u64, n * 4096);
        let mut bufs = c.get_buffers(4096, n).unwrap();
        for (j, b) in bufs.buffers_mut().iter_mut().enumerate() {
            b.copy_from_slice(&data[j * 4096..(j + 1) * 4096]);
        }
        assert_eq!(
            f.zero_writev(&bufs, off).unwrap(),
            data.len(),
            "{n} pool segments"
        );
        drop(bufs);
        let back = f
            .read_into_async(c.get_buffers(4096, n).unwrap(), off)
            .unwrap()
            .wait()
            .unwrap();
        assert!(back.to_vec() == data, "{n} pool segments read back differ");
        drop(back);
        // Caller memory of odd sizes (bounced through the pool): read ...
        let lens: Vec<usize> = (0..n).map(|i| 1 + (i * 977 + 13) % 4000).collect();
        let total: usize = lens.iter().sum();
        assert!(total <= data.len());
        let mut mine: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0xAA; l]).collect();
        let mut iov: Vec<IoSliceMut<'_>> = mine.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        assert_eq!(
            f.preadv(&mut iov, off).unwrap(),
            total,
            "{n} caller segments"
        );
        assert!(
            mine.concat() == data[..total],
            "{n} caller segments read differ"
        );
        // ... and write, at an unaligned offset; checked on disk.
        let wdata = pattern(100 + round as u64, total);
        let mut at = 0;
        let iov: Vec<IoSlice<'_>> = lens
            .iter()
            .map(|&l| {
                let s = IoSlice::new(&wdata[at..at + l]);
                at += l;
                s
            })
            .collect();
        assert_eq!(
            f.pwritev(&iov, off + 1).unwrap(),
            total,
            "{n} caller segments"
        );
        let disk = std::fs::read(h.path("segs")).unwrap();
        assert!(
            disk[off as usize + 1..off as usize + 1 + total] == wdata[..],
            "{n} caller segments written differ on disk"
        );
    }
    // Caller segments above the register threshold (256 KiB): registered on the fly.
    let big = pattern(7, 3 * 300_000);
    let iov: Vec<IoSlice<'_>> = big.chunks(300_000).map(IoSlice::new).collect();
    assert_eq!(f.pwritev(&iov, 10 << 20).unwrap(), big.len());
    let mut back = vec![vec![0u8; 300_000]; 3];
    let mut iov: Vec<IoSliceMut<'_>> = back.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    assert_eq!(f.preadv(&mut iov, 10 << 20).unwrap(), big.len());
    assert!(back.concat() == big, "registered caller segments differ");
    drop(f);
    let client_pool = c.pool().clone();
    assert_eq!(
        client_pool.stats().slots_in_use(),
        0,
        "client buffers leaked"
    );
    drop(c);
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn mixed_segment_kinds_in_one_request() {
    let t = rdma("mixed_segment_kinds_in_one_request");
    let h = start(t.clone(), |_| {});
    let data = pattern(11, 1 << 20);
    std::fs::write(h.path("m"), &data).unwrap();
    let pool = Pool::new(&h.cfg.pool).unwrap();
    let conn = t.connect(&h.cfg, &pool).unwrap();
    let call = |req: &Req, send: Vec<SendSeg>, recv: Vec<RecvSeg>| {
        let r = conn
            .start(Request {
                header: req.encode(),
                send,
                recv,
            })
            .unwrap()
            .wait()
            .unwrap();
        let resp = proto::decode_reply(req, &r.header).unwrap();
        (resp, r)
    };
    let hello = Req::Hello {
        version: proto::VERSION,
        client_nonce: [1; proto::NONCE_LEN],
    };
    call(&hello, Vec::new(), Vec::new());
    let open = Req::Open {
        path: "m".into(),
        flags: OpenFlags::rw(),
        mode: 0,
    };
    let (Resp::Open { fh, .. }, _) = call(&open, Vec::new(), Vec::new()) else {
        panic!("open failed");
    };
    // One read into: a pool buffer, a small Vec (bounced), a large Vec (registered), a
    // borrowed slice of a pool buffer the caller keeps (keys used in place), a borrowed
    // small slice of plain memory (bounced), an empty segment.
    let keep = pool.get(8192).unwrap();
    let mut plain = vec![0u8; 1000];
    let sizes = [4096usize, 100, 300_000, 8192, 1000, 0];
    let total: usize = sizes.iter().sum();
    let recv = vec![
        RecvSeg::Pool(pool.get(4096).unwrap()),
        RecvSeg::Owned(vec![0; 100]),
        RecvSeg::Owned(vec![0; 300_000]),
        // SAFETY: `keep` outlives the request (waited for below) and is not touched meanwhile.
        RecvSeg::Raw(unsafe { RawSeg::from_pool(&keep) }),
        // SAFETY: `plain` outlives the request and is not touched until it completes.
        RecvSeg::Raw(unsafe {
            RawSeg::new(NonNull::new(plain.as_mut_ptr()).unwrap(), plain.len())
        }),
        RecvSeg::Owned(Vec::new()),
    ];
    let read = Req::Read {
        fh,
        offset: 5,
        len: total as u32,
    };
    let (resp, reply) = call(&read, Vec::new(), recv);
    assert!(
        matches!(resp, Resp::Read { len, .. } if len as usize == total),
        "{resp:?}"
    );
    assert_eq!(reply.payload_len, total);
    let mut got = Vec::new();
    for s in reply.recv {
        match s {
            RecvSeg::Pool(b) => got.extend_from_slice(&b),
            RecvSeg::Owned(v) => got.extend_from_slice(&v),
            RecvSeg::Raw(r) => got.extend_from_slice(r.as_slice()),
        }
    }
    assert!(got == data[5..5 + total], "mixed read differs");
    // One write from the same kinds.
    let w = pattern(12, total);
    let mut kept = pool.get(8192).unwrap();
    kept.copy_from_slice(&w[4096 + 100 + 300_000..4096 + 100 + 300_000 + 8192]);
    let mut p1 = pool.get(4096).unwrap();
    p1.copy_from_slice(&w[..4096]);
    let tail = w[total - 1000..].to_vec();
    let send = vec![
        SendSeg::PoolMut(p1),
        SendSeg::Owned(w[4096..4196].to_vec()),
        SendSeg::Owned(w[4196..4196 + 300_000].to_vec()),
        // SAFETY: `kept` outlives the request and is not written meanwhile.
        SendSeg::Raw(unsafe { RawSeg::from_pool(&kept) }),
        // SAFETY: `tail` outlives the request and is not written meanwhile.
        SendSeg::Raw(unsafe {
            RawSeg::new(NonNull::new(tail.as_ptr().cast_mut()).unwrap(), tail.len())
        }),
        SendSeg::Owned(Vec::new()),
    ];
    let write = Req::Write { fh, offset: 3 };
    let (resp, _) = call(&write, send, Vec::new());
    assert!(
        matches!(resp, Resp::Write { written } if written as usize == total),
        "{resp:?}"
    );
    let disk = std::fs::read(h.path("m")).unwrap();
    assert!(disk[3..3 + total] == w[..], "mixed write differs on disk");
    drop((keep, kept, plain, tail));
    drop(conn);
    assert_eq!(pool.stats().slots_in_use(), 0, "client buffers leaked");
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn credits_exhausted_and_replenished_at_iodepth_64() {
    let t = rdma("credits_exhausted_and_replenished_at_iodepth_64");
    let h = start(t, |c| RdmaConfig::of_mut(c).credits = 8);
    let data = pattern(21, 64 * 4096);
    std::fs::write(h.path("c"), &data).unwrap();
    let c = h.client();
    assert_eq!(c.limits().max_in_flight, 8, "{:?}", c.limits());
    let f = c.open("c", OpenFlags::rw()).unwrap();
    let new = pattern(22, 64 * 4096);
    let began = Instant::now();
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    for i in 0..64usize {
        // `start` blocks while all 8 credits are in flight; replies give them back.
        reads.push(f.zero_readv_async(4096, (i * 4096) as u64).unwrap());
        let mut b = c.get_buffers(4096, 1).unwrap();
        b.buffers_mut()[0].copy_from_slice(&new[i * 4096..(i + 1) * 4096]);
        writes.push(
            f.zero_writev_async(b, (64 * 4096 + i * 4096) as u64)
                .unwrap(),
        );
    }
    for (i, p) in reads.into_iter().enumerate() {
        let got = p.wait().unwrap_or_else(|e| panic!("read {i} failed: {e}"));
        assert!(got.to_vec() == data[i * 4096..(i + 1) * 4096], "read {i}");
    }
    for (i, p) in writes.into_iter().enumerate() {
        let (n, _) = p.wait().unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        assert_eq!(n, 4096);
    }
    println!("128 requests through 8 credits in {:?}", began.elapsed());
    let disk = std::fs::read(h.path("c")).unwrap();
    assert!(disk[64 * 4096..] == new[..]);
    drop(f);
    drop(c);
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn client_killed_mid_transfer() {
    if child_role() {
        return;
    }
    let t = rdma("client_killed_mid_transfer");
    let h = start(t, |_| {});
    let data = pattern(31, 4 << 20);
    std::fs::write(h.path("big"), &data).unwrap();
    let mut child = spawn_child(
        "client_killed_mid_transfer",
        "client",
        &[("ZCIO_FAULTS_ADDR", &h.cfg.client.connect)],
    );
    let out = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    wait_line(&mut lines, "STARTED");
    assert!(h.server.open_files() >= 1);
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    println!("client child killed ({status}) with transfers in flight");
    let began = Instant::now();
    h.assert_server_clean();
    println!("server clean {:?} after the kill", began.elapsed());
    // The server still serves, and serves right.
    let c = h.client();
    let f = c.open("big", OpenFlags::READ).unwrap();
    let got = f.zero_readv(1 << 20, 3 << 20).unwrap();
    assert!(got.to_vec() == data[3 << 20..], "second client read");
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn server_killed_client_requests_fail_promptly() {
    if child_role() {
        return;
    }
    let t = rdma("server_killed_client_requests_fail_promptly");
    let mut child = spawn_child("server_killed_client_requests_fail_promptly", "server", &[]);
    let out = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let addr = wait_line(&mut lines, "ADDR ");
    let mut cfg = base_config();
    cfg.client.connect = addr;
    // Far beyond the wait below: a request that fails there failed because the connection
    // ended, not because it timed out (which would also be a different error).
    cfg.client.timeout = Duration::from_secs(3600);
    let pool = Pool::new(&cfg.pool).unwrap();
    let conn = t.connect(&cfg, &pool).unwrap();
    let mut pending = Vec::new();
    for i in 0..8 {
        let (send, recv) = if i % 2 == 0 {
            (Vec::new(), vec![RecvSeg::Pool(pool.get(65536).unwrap())])
        } else {
            let mut b = pool.get(65536).unwrap();
            b.fill(i as u8);
            (vec![SendSeg::PoolMut(b)], Vec::new())
        };
        pending.push(
            conn.start(Request {
                header: vec![i as u8; 16],
                send,
                recv,
            })
            .unwrap(),
        );
    }
    assert_eq!(wait_line(&mut lines, "GOT 8"), "");
    assert!(pending.iter().all(|p| !p.is_done()), "the server answered");
    child.0.kill().unwrap();
    let killed = Instant::now();
    for p in pending {
        match p.wait_timeout(Duration::from_secs(120)) {
            Ok(Err(Error::ConnectionClosed(why))) => println!("request failed: {why}"),
            Ok(other) => panic!("a request to a killed server: {other:?}"),
            Err(_) => panic!("a request to a killed server did not fail within 120 s"),
        }
    }
    println!("all requests failed {:?} after the kill", killed.elapsed());
    let _ = child.0.wait();
    assert!(matches!(
        conn.start(Request::default()),
        Err(Error::ConnectionClosed(_))
    ));
    drop(conn);
    assert_eq!(
        pool.stats().slots_in_use(),
        0,
        "client buffers not returned"
    );
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn server_closing_a_connection_fails_its_requests_promptly() {
    let t = rdma("server_closing_a_connection_fails_its_requests_promptly");
    let cfg = base_config();
    let spool = Pool::new(&cfg.pool).unwrap();
    let l = t.listen(&cfg, &spool).unwrap();
    let mut ccfg = cfg.clone();
    ccfg.client.connect = l.local_addr();
    // Far beyond the wait below, so only the close can end the requests there.
    ccfg.client.timeout = Duration::from_secs(3600);
    let cpool = Pool::new(&cfg.pool).unwrap();
    let conn = t.connect(&ccfg, &cpool).unwrap();
    let mut sc = l.accept().unwrap().unwrap();
    assert!(sc.limits().rdma_payload);
    let mut pending = Vec::new();
    for i in 0..4u8 {
        let mut b = cpool.get(8192).unwrap();
        b.fill(i);
        pending.push(
            conn.start(Request {
                header: vec![i],
                send: vec![SendSeg::PoolMut(b)],
                recv: vec![RecvSeg::Pool(cpool.get(8192).unwrap())],
            })
            .unwrap(),
        );
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        let inc = sc.recv().unwrap().expect("a request");
        assert_eq!(inc.payload.iter().map(|b| b.len()).sum::<usize>(), 8192);
        assert!(inc
            .payload
            .iter()
            .all(|b| b.iter().all(|&x| x == inc.header[0])));
        held.push(inc);
    }
    // Answer one, then close the connection with three unanswered.
    let first = held.remove(0);
    let reply = spool.get(100).unwrap().freeze();
    sc.replier().reply(first.id, b"ok", &[reply]).unwrap();
    let began = Instant::now();
    sc.replier().close();
    let mut ok = 0;
    for p in pending {
        match p.wait_timeout(Duration::from_secs(120)) {
            Ok(Ok(r)) => {
                assert_eq!((r.header.as_slice(), r.payload_len), (&b"ok"[..], 100));
                ok += 1;
            }
            Ok(Err(Error::ConnectionClosed(_))) => {}
            Ok(Err(e)) => panic!("unexpected error {e}"),
            Err(_) => panic!("a request did not complete within 120 s of the close"),
        }
    }
    println!("requests done {:?} after the close", began.elapsed());
    assert_eq!(ok, 1, "the reply sent before the close must arrive");
    assert!(matches!(sc.recv(), Ok(None) | Err(_)));
    drop(held);
    drop(first);
    drop(conn);
    assert_eq!(
        cpool.stats().slots_in_use(),
        0,
        "client buffers not returned"
    );
    wait_pool_empty(&spool, "server buffers not returned");
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn bogus_rkey_is_reported_and_the_server_keeps_serving() {
    let t = rdma("bogus_rkey_is_reported_and_the_server_keeps_serving");
    let _ = captured_logs();
    let h = start(t, |_| {});
    let data = pattern(41, 1 << 20);
    std::fs::write(h.path("r"), &data).unwrap();
    let bad = RdmaTransport::with_faults(Faults {
        corrupt_rkeys: true,
        ..Faults::default()
    });
    // A write (the server's RDMA READ fails) and a read (its RDMA WRITE fails), each on
    // its own connection.
    for (k, what) in ["write", "read"].into_iter().enumerate() {
        let pool = Pool::new(&h.cfg.pool).unwrap();
        let c = Client::connect_transport(&h.cfg, &bad, pool.clone())
            .expect("hello and open carry no memory keys");
        let f = c.open("r", OpenFlags::rw()).unwrap();
        let r = if what == "write" {
            f.pwrite(&vec![7u8; 65536], 0).map(drop)
        } else {
            let mut b = vec![0u8; 65536];
            f.pread(&mut b, 0).map(drop)
        };
        let e = r.expect_err("a request with bogus keys succeeded");
        println!("{what} with bogus keys: {e}");
        assert!(e.is_connection_fatal(), "{e:?}");
        drop(f);
        drop(c);
        assert_eq!(pool.stats().slots_in_use(), 0, "client buffers leaked");
        let deadline = Instant::now() + Duration::from_secs(10);
        while h
            .server
            .stats()
            .failed_connections
            .load(std::sync::atomic::Ordering::SeqCst)
            < k as u64 + 1
        {
            assert!(
                Instant::now() < deadline,
                "the server did not count the failed connection"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let logs = logs_text();
    assert!(
        logs.contains("advertised memory the server cannot access")
            && logs.contains("remote access error")
            && logs.contains("127.0.0.1:"),
        "the server did not report the bogus key with the peer address:\n{logs}"
    );
    h.assert_server_clean();
    // The file is intact and another client is served.
    assert!(
        std::fs::read(h.path("r")).unwrap() == data,
        "a bogus request changed the file"
    );
    let c = h.client();
    let f = c.open("r", OpenFlags::READ).unwrap();
    assert!(f.zero_readv(1 << 20, 0).unwrap().to_vec() == data);
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn memlock_too_small_is_a_clear_error() {
    if child_role() {
        return;
    }
    rdma("memlock_too_small_is_a_clear_error");
    let mut child = spawn_child("memlock_too_small_is_a_clear_error", "memlock", &[]);
    let out = child.0.stdout.take().unwrap();
    let text: Vec<String> = BufReader::new(out).lines().map_while(Result::ok).collect();
    let status = child.0.wait().unwrap();
    println!("{}", text.join("\n"));
    assert!(status.success(), "memlock child failed: {status}");
    assert!(
        text.iter()
            .any(|l| l.contains(&format!("{MARK}MEMLOCK OK"))),
        "the child did not finish its checks"
    );
}

#[test]
fn unknown_device_is_a_clear_error() {
    let mut cfg = base_config();
    RdmaConfig::of_mut(&mut cfg).device = Some("no-such-rdma-device".into());
    let e = RdmaTransport::new()
        .check_available(&cfg)
        .expect_err("a device that does not exist");
    let Error::TransportUnavailable { reason, hint, .. } = &e else {
        panic!("{e:?}");
    };
    assert!(!reason.is_empty() && !hint.is_empty(), "{e}");
    if device_present() {
        assert!(reason.contains("no-such-rdma-device"), "{e}");
        assert!(hint.contains("rdma.device"), "{e}");
    }
    println!("{e}");
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn busy_poll_round_trip() {
    let t = rdma("busy_poll_round_trip");
    let h = start(t, |c| RdmaConfig::of_mut(c).busy_poll = true);
    let c = h.client();
    let f = c.open("b", OpenFlags::rw() | OpenFlags::CREATE).unwrap();
    let data = pattern(51, 300_000);
    assert_eq!(f.pwrite(&data, 0).unwrap(), data.len());
    let mut back = vec![0u8; data.len()];
    assert_eq!(f.pread(&mut back, 0).unwrap(), data.len());
    assert!(back == data);
    let got = f.zero_readv(100, 7).unwrap();
    assert!(got.to_vec() == data[7..107], "inline reply");
    drop(f);
    drop(c);
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn spinning_waiters_share_the_completion_queue() {
    let t = rdma("spinning_waiters_share_the_completion_queue");
    // Long enough that waiting threads, not the connection threads, take most completions:
    // several client threads and the server's `recv` poll the same queues at once.
    let h = start(t, |c| {
        RdmaConfig::of_mut(c).spin = std::time::Duration::from_millis(20);
        RdmaConfig::of_mut(c).credits = 8;
    });
    let data = pattern(61, 64 * 4096);
    std::fs::write(h.path("s"), &data).unwrap();
    let c = h.client();
    std::thread::scope(|scope| {
        for t in 0..4usize {
            let c = &c;
            let data = &data;
            scope.spawn(move || {
                let f = c.open("s", OpenFlags::rw()).unwrap();
                let mut back = vec![0u8; 4096];
                for i in 0..32usize {
                    let block = (t * 16 + i) % 64;
                    let at = block * 4096;
                    assert_eq!(f.pread(&mut back, at as u64).unwrap(), 4096);
                    assert!(back == data[at..at + 4096], "thread {t} read {i}");
                    // Writes of what is already there keep every read checkable.
                    assert_eq!(f.pwrite(&data[at..at + 4096], at as u64).unwrap(), 4096);
                }
                // And a window of async requests, waited for out of order.
                let mut reads: Vec<_> = (0..8usize)
                    .map(|i| {
                        f.zero_readv_async(4096, ((t * 8 + i) * 4096) as u64)
                            .unwrap()
                    })
                    .collect();
                reads.reverse();
                for (k, p) in reads.into_iter().enumerate() {
                    let i = 7 - k;
                    let at = (t * 8 + i) * 4096;
                    assert!(p.wait().unwrap().to_vec() == data[at..at + 4096]);
                }
            });
        }
    });
    assert!(std::fs::read(h.path("s")).unwrap() == data);
    drop(c);
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn waiters_take_their_own_replies_and_nothing_is_stranded() {
    let t = rdma("waiters_take_their_own_replies_and_nothing_is_stranded");
    // Event-driven (no spinning), one queue pair: every waiter shares one completion channel.
    // Threads waiting for their replies take turns leading (waiting on the channel) and
    // following; futures, requests nobody waits for and a full set of credits must all be
    // completed too, by whichever thread is there to do it.
    let h = start(t, |c| {
        RdmaConfig::of_mut(c).queue_pairs = 1;
        RdmaConfig::of_mut(c).credits = 4;
    });
    let data = pattern(67, 64 * 4096);
    std::fs::write(h.path("w"), &data).unwrap();
    let c = h.client();
    let check = |got: &[u8], at: usize, what: &str| {
        assert!(got == &data[at..at + got.len()], "{what} at {at}");
    };
    // Four threads block on their own replies at once (one leads, the others follow).
    std::thread::scope(|scope| {
        for t in 0..4usize {
            let (c, data, check) = (&c, &data, &check);
            scope.spawn(move || {
                let f = c.open("w", OpenFlags::rw()).unwrap();
                let mut back = vec![0u8; 4096];
                for i in 0..24usize {
                    let at = ((t * 16 + i) % 64) * 4096;
                    assert_eq!(f.pread(&mut back, at as u64).unwrap(), 4096);
                    check(&back, at, "a blocking read");
                    assert_eq!(f.pwrite(&data[at..at + 4096], at as u64).unwrap(), 4096);
                }
            });
        }
    });
    let f = c.open("w", OpenFlags::rw()).unwrap();
    // Awaited as futures: nobody waits on the channel for them but the connection thread.
    for round in 0..3usize {
        let reads: Vec<_> = (0..4usize)
            .map(|i| {
                f.zero_readv_async(4096, ((round * 4 + i) * 4096) as u64)
                    .unwrap()
            })
            .collect();
        for (i, r) in reads.into_iter().enumerate() {
            let got = zcio::transport::block_on(r).unwrap().to_vec();
            check(&got, (round * 4 + i) * 4096, "an awaited read");
        }
    }
    // Every credit taken by requests nobody waits for (dropped): the next request must
    // still get a credit, and then its reply.
    let dropped: Vec<_> = (0..4usize)
        .map(|i| f.zero_readv_async(4096, (i * 4096) as u64).unwrap())
        .collect();
    drop(dropped);
    let mut back = vec![0u8; 4096];
    assert_eq!(f.pread(&mut back, 8 * 4096).unwrap(), 4096);
    check(&back, 8 * 4096, "a read after dropped requests");
    // A blocking wait and a future on the same queue pair, in both orders.
    for k in 0..4usize {
        let a = f.zero_readv_async(4096, (k * 4096) as u64).unwrap();
        let b = f.zero_readv_async(4096, ((k + 1) * 4096) as u64).unwrap();
        let (ra, rb) = if k % 2 == 0 {
            let ra = a.wait().unwrap();
            (ra, zcio::transport::block_on(b).unwrap())
        } else {
            let rb = zcio::transport::block_on(b).unwrap();
            (a.wait().unwrap(), rb)
        };
        check(&ra.to_vec(), k * 4096, "a mixed read (blocking)");
        check(&rb.to_vec(), (k + 1) * 4096, "a mixed read (future)");
    }
    f.close().unwrap();
    assert!(std::fs::read(h.path("w")).unwrap() == data);
    drop(c);
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn inline_payloads_up_to_the_largest_threshold() {
    let t = rdma("inline_payloads_up_to_the_largest_threshold");
    // rdma.inline_threshold at its largest: reads and writes of up to 4 KiB travel in the
    // messages (the queue pairs still take inline SENDs: their inline size does not follow
    // the threshold past what rxe allows), larger ones by RDMA READ and WRITE.
    let h = start(t, |c| RdmaConfig::of_mut(c).inline_threshold = 4096);
    let c = h.client();
    assert_eq!(c.limits().inline_threshold, 4096);
    let data = pattern(71, 64 * 1024);
    let f = c.open("inl", OpenFlags::rw() | OpenFlags::CREATE).unwrap();
    let mut at = 0usize;
    for len in [1usize, 100, 4095, 4096, 4097, 8192, 1000] {
        assert_eq!(f.pwrite(&data[at..at + len], at as u64).unwrap(), len);
        let mut back = vec![0u8; len];
        assert_eq!(f.pread(&mut back, at as u64).unwrap(), len);
        assert!(back == data[at..at + len], "{len} bytes at {at}");
        let z = f.zero_readv(len, at as u64).unwrap();
        assert!(
            z.to_vec() == data[at..at + len],
            "{len} bytes into pool buffers"
        );
        at += len;
    }
    f.close().unwrap();
    assert!(std::fs::read(h.path("inl")).unwrap() == data[..at]);
    drop(c);
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn idle_connection_is_closed_by_the_server() {
    let t = rdma("idle_connection_is_closed_by_the_server");
    let h = start(t, |c| {
        c.server.idle_timeout = Some(Duration::from_millis(300))
    });
    let c = h.client();
    assert!(c.stat("").unwrap().is_dir());
    // The server closes the connection once it has been idle 300 ms; wait for that (60 s
    // at most, for an emulated guest) instead of sleeping and hoping it happened.
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.server.connections() != 0 {
        assert!(
            Instant::now() < deadline,
            "the server kept the idle connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    match c.stat("") {
        Err(e) => {
            println!("after the idle timeout: {e}");
            assert!(e.is_connection_fatal(), "{e:?}");
        }
        Ok(_) => panic!("the idle connection was not closed"),
    }
    h.assert_server_clean();
    // A new connection is served.
    assert!(h.client().stat("").unwrap().is_dir());
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn request_without_reply_times_out() {
    let t = rdma("request_without_reply_times_out");
    let cfg = base_config();
    let spool = Pool::new(&cfg.pool).unwrap();
    let l = t.listen(&cfg, &spool).unwrap();
    let mut ccfg = cfg.clone();
    ccfg.client.connect = l.local_addr();
    ccfg.client.timeout = Duration::from_millis(400);
    let cpool = Pool::new(&cfg.pool).unwrap();
    let conn = t.connect(&ccfg, &cpool).unwrap();
    let mut sc = l.accept().unwrap().unwrap();
    let began = Instant::now();
    let p = conn
        .start(Request {
            header: b"never answered".to_vec(),
            send: Vec::new(),
            recv: vec![RecvSeg::Pool(cpool.get(65536).unwrap())],
        })
        .unwrap();
    let inc = sc.recv().unwrap().expect("the request arrives");
    match p.wait_timeout(Duration::from_secs(30)) {
        Ok(Err(Error::Timeout { .. })) => {}
        Ok(other) => panic!("expected a timeout: {other:?}"),
        Err(_) => panic!("no timeout within 30 s"),
    }
    let took = began.elapsed();
    println!("timed out after {took:?} (client.timeout 400 ms)");
    // A lower bound only: the timeout may not fire early; how late it fires on a loaded
    // or emulated machine is bounded by the 30 s wait above.
    assert!(took >= Duration::from_millis(400), "{took:?}");
    // The connection is gone for good; the server sees it end.
    assert!(conn.start(Request::default()).is_err());
    drop(inc);
    assert!(matches!(sc.recv(), Ok(None) | Err(_)));
    drop(conn);
    assert_eq!(cpool.stats().slots_in_use(), 0);
}

#[test]
fn registry_knows_rdma() {
    let mut r = zcio::transport::Registry::new();
    zcio_rdma::register(&mut r);
    assert_eq!(r.names(), vec!["rdma"]);
    let cfg = base_config();
    match r.get("rdma", &cfg) {
        Ok(t) => assert_eq!(t.name(), "rdma"),
        Err(Error::TransportUnavailable { reason, hint, .. }) => {
            assert!(!required(), "ZCIO_RDMA_REQUIRED=1 but: {reason}; {hint}");
            println!("rdma unavailable here: {reason}; {hint}");
        }
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn queue_pairs_are_negotiated_share_out_requests_and_route_replies() {
    let t = rdma("queue_pairs_are_negotiated_share_out_requests_and_route_replies");
    // (server's queue_pairs, client's, queue pairs agreed, credits of the connection) with
    // rdma.credits = 8 on both sides, shared out among the queue pairs each side asks for.
    for (server_qps, client_qps, lanes, credits) in [
        (2, 2, 2, 8),
        (4, 4, 4, 8),
        (2, 1, 1, 8),
        (1, 2, 1, 4),
        (2, 4, 2, 4),
    ] {
        let case = format!("server {server_qps}, client {client_qps}");
        let mut cfg = base_config();
        RdmaConfig::of_mut(&mut cfg).credits = 8;
        RdmaConfig::of_mut(&mut cfg).queue_pairs = server_qps;
        let spool = Pool::new(&cfg.pool).unwrap();
        let listener = t.listen(&cfg, &spool).unwrap();
        let mut ccfg = cfg.clone();
        ccfg.client.connect = listener.local_addr();
        RdmaConfig::of_mut(&mut ccfg).queue_pairs = client_qps;
        let cpool = Pool::new(&cfg.pool).unwrap();
        let conn = t.connect(&ccfg, &cpool).unwrap();
        let mut sconn = listener.accept().unwrap().unwrap();
        assert_eq!(conn.limits().max_in_flight, credits, "{case}");
        assert_eq!(sconn.limits().max_in_flight, credits, "{case}");
        // Every credit in flight at once, before the server answers any: a request that
        // went to a full queue pair would wait for a credit and time out.
        let mut pending = Vec::new();
        for i in 0..credits {
            let recv = vec![RecvSeg::Pool(cpool.get(4096).unwrap())];
            let req = Request {
                header: vec![i as u8; 3],
                send: Vec::new(),
                recv,
            };
            pending.push(conn.start(req).unwrap());
        }
        // Requests that arrived and wait to be handed out are the server's backlog.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sconn.backlog() {
            assert!(Instant::now() < deadline, "{case}: no backlog seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        let got: Vec<_> = (0..credits)
            .map(|_| sconn.recv().unwrap().expect("a request"))
            .collect();
        assert!(!sconn.backlog(), "{case}: every request was handed out");
        let mut per_lane = std::collections::BTreeMap::new();
        for inc in &got {
            *per_lane.entry(inc.id >> 56).or_insert(0usize) += 1;
        }
        assert_eq!(per_lane.len(), lanes, "{case}: {per_lane:?}");
        assert!(
            per_lane.values().all(|&n| n == credits / lanes),
            "{case}: requests not shared out evenly: {per_lane:?}"
        );
        let r = sconn.replier();
        // A reply for an id this connection never handed out is refused.
        assert!(r.reply(got[0].id | (7 << 56), b"x", &[]).is_err(), "{case}");
        assert!(r.reply(got[0].id ^ 0x10000, b"x", &[]).is_err(), "{case}");
        // Answer in reverse order, each with its request's byte as payload.
        for inc in got.iter().rev() {
            let mut b = spool.get(4096).unwrap();
            b.fill(inc.header[0]);
            r.reply(inc.id, &inc.header, &[b.freeze()]).unwrap();
        }
        for (i, p) in pending.into_iter().enumerate() {
            let reply = p
                .wait()
                .unwrap_or_else(|e| panic!("{case}: request {i}: {e}"));
            assert_eq!(reply.header, vec![i as u8; 3], "{case}");
            assert_eq!(reply.payload_len, 4096, "{case}");
            match &reply.recv[0] {
                RecvSeg::Pool(b) => assert!(b.iter().all(|&x| x == i as u8), "{case}: {i}"),
                other => panic!("{case}: {other:?}"),
            }
        }
        // The client closing ends every queue pair: the server sees one clean end.
        drop(conn);
        assert!(matches!(sconn.recv(), Ok(None)), "{case}");
        assert!(r.reply(got[0].id, b"late", &[]).is_err(), "{case}");
        drop(sconn);
        listener.shutdown();
        assert_eq!(cpool.stats().slots_in_use(), 0, "{case}: client buffers");
        wait_pool_empty(&spool, &format!("{case}: server buffers held"));
    }
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn one_queue_pair_failing_fails_the_whole_connection() {
    let t = rdma("one_queue_pair_failing_fails_the_whole_connection");
    let _ = captured_logs();
    let mut cfg = base_config();
    RdmaConfig::of_mut(&mut cfg).queue_pairs = 2;
    let spool = Pool::new(&cfg.pool).unwrap();
    let listener = t.listen(&cfg, &spool).unwrap();
    cfg.client.connect = listener.local_addr();
    let cpool = Pool::new(&cfg.pool).unwrap();
    let bad = RdmaTransport::with_faults(Faults {
        corrupt_rkeys: true,
        ..Faults::default()
    });
    let conn = bad.connect(&cfg, &cpool).unwrap();
    let mut sconn = listener.accept().unwrap().unwrap();
    // Two requests, one per queue pair, both asking for payload (bogus keys).
    let mut pending = Vec::new();
    for i in 0..2u8 {
        let req = Request {
            header: vec![i],
            send: Vec::new(),
            recv: vec![RecvSeg::Pool(cpool.get(65536).unwrap())],
        };
        pending.push(conn.start(req).unwrap());
    }
    let a = sconn.recv().unwrap().unwrap();
    let b = sconn.recv().unwrap().unwrap();
    assert_ne!(a.id >> 56, b.id >> 56, "one request per queue pair");
    let r = sconn.replier();
    let mut buf = spool.get(65536).unwrap();
    buf.fill(1);
    let buf = buf.freeze();
    // The RDMA WRITE into the bogus key fails that queue pair; the other one goes too.
    let _ = r.reply(a.id, b"a", std::slice::from_ref(&buf));
    for p in pending {
        let e = p
            .wait()
            .expect_err("a request on a failed connection succeeded");
        assert!(e.is_connection_fatal(), "{e:?}");
    }
    let e = sconn.recv().expect_err("the connection failed");
    println!("server: {e}");
    assert!(
        e.to_string().contains("remote access error"),
        "the first failure is the one reported: {e}"
    );
    assert!(r.reply(b.id, b"b", &[buf]).is_err());
    drop(sconn);
    drop(conn);
    listener.shutdown();
    assert_eq!(cpool.stats().slots_in_use(), 0, "client buffers");
    wait_pool_empty(&spool, "server buffers held");
}

/// A connection to a server whose pool holds two 64 KiB buffers, for the tests of requests
/// waiting for server buffers.
struct TwoBuffers {
    spool: Pool,
    cpool: Pool,
    listener: Box<dyn zcio::transport::Listener>,
    conn: Box<dyn zcio::transport::ClientConn>,
    sconn: Box<dyn zcio::transport::ServerConn>,
}

impl TwoBuffers {
    fn start(t: &Arc<dyn Transport>) -> TwoBuffers {
        let cfg = base_config();
        let spool = Pool::new(&zcio::pool::PoolConfig {
            classes: vec![zcio::pool::ClassConfig {
                size: 65536,
                count: 2,
                reserve: 0,
                arena_slots: 2,
            }],
            wait_timeout: Duration::from_secs(20),
            stripes: 1,
        })
        .unwrap();
        let listener = t.listen(&cfg, &spool).unwrap();
        let mut ccfg = cfg.clone();
        ccfg.client.connect = listener.local_addr();
        let cpool = Pool::new(&cfg.pool).unwrap();
        let conn = t.connect(&ccfg, &cpool).unwrap();
        let sconn = listener.accept().unwrap().unwrap();
        TwoBuffers {
            spool,
            cpool,
            listener,
            conn,
            sconn,
        }
    }

    /// Starts one request per element of `data`, with it as a 64 KiB payload and its index
    /// as header.
    fn send(&self, data: &[Vec<u8>]) -> Vec<zcio::transport::Pending<zcio::transport::Reply>> {
        data.iter()
            .enumerate()
            .map(|(i, d)| {
                let mut b = self.cpool.get(d.len()).unwrap();
                b.copy_from_slice(d);
                self.conn
                    .start(Request {
                        header: vec![i as u8],
                        send: vec![SendSeg::Pool(b.freeze())],
                        recv: Vec::new(),
                    })
                    .unwrap()
            })
            .collect()
    }

    /// The next request, its payload checked against `data`.
    fn take(&mut self, data: &[Vec<u8>]) -> zcio::transport::Incoming {
        let inc = self.sconn.recv().unwrap().expect("a request");
        let i = inc.header[0] as usize;
        let got: Vec<u8> = inc.payload.iter().flat_map(|b| b.iter().copied()).collect();
        assert!(got == data[i], "request {i}: payload differs");
        inc
    }

    /// Frees the request's buffers and answers it.
    fn answer(&self, inc: zcio::transport::Incoming) {
        drop(inc.payload);
        self.sconn.replier().reply(inc.id, b"ok", &[]).unwrap();
    }

    /// Checks the replies, closes, and checks that every buffer came back.
    fn finish(mut self, pending: Vec<zcio::transport::Pending<zcio::transport::Reply>>) {
        for p in pending {
            assert_eq!(p.wait().unwrap().header, b"ok");
        }
        drop(self.conn);
        assert!(matches!(self.sconn.recv(), Ok(None)));
        drop(self.sconn);
        self.listener.shutdown();
        wait_pool_empty(&self.spool, "server buffers held");
        assert_eq!(self.cpool.stats().slots_in_use(), 0, "client buffers");
    }
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn request_payloads_wait_for_server_buffers_when_the_pool_is_empty() {
    let t = rdma("request_payloads_wait_for_server_buffers_when_the_pool_is_empty");
    // A request's payload is READ into server pool buffers. Normally the completion
    // thread takes them at once and starts the READs; with the pool empty it leaves the
    // request to `recv`, which waits for buffers. This test empties the server's pool,
    // sends two requests, and frees the buffers only once `recv` is waiting.
    let mut tb = TwoBuffers::start(&t);
    let held = tb.spool.get_buffers(65536, 2).unwrap();
    let data: Vec<Vec<u8>> = (0..2).map(|i| pattern(40 + i, 65536)).collect();
    let pending = tb.send(&data);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tb.sconn.backlog() {
        assert!(Instant::now() < deadline, "no request arrived");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Free the buffers once `recv` is waiting for them (the pool counts a wait before it
    // blocks; the completion thread only tries, which counts none).
    let spool = tb.spool.clone();
    let freer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while spool.stats().classes[0].waits == 0 {
            assert!(Instant::now() < deadline, "recv never waited for buffers");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
    });
    let mut seen = Vec::new();
    for _ in 0..2 {
        let inc = tb.take(&data);
        seen.push(inc.header[0]);
        tb.answer(inc);
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1]);
    freer.join().unwrap();
    tb.finish(pending);
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn a_request_waiting_for_buffers_does_not_hold_up_finished_ones() {
    let t = rdma("a_request_waiting_for_buffers_does_not_hold_up_finished_ones");
    // Two server buffers, three requests: two take them, the third waits for one. Only
    // the application can free them, and only once it has both of the others: `recv` must
    // hand out the second while the third waits, whichever queue pair each is on.
    let mut tb = TwoBuffers::start(&t);
    let data: Vec<Vec<u8>> = (0..3).map(|i| pattern(50 + i, 65536)).collect();
    let pending = tb.send(&data);
    // Which two get the buffers depends on how the queue pairs' threads interleave.
    let first = tb.take(&data);
    let second = tb.take(&data);
    assert_ne!(first.header, second.header);
    let last = 3 - first.header[0] - second.header[0];
    tb.answer(first);
    tb.answer(second);
    let third = tb.take(&data);
    assert_eq!(third.header, [last]);
    tb.answer(third);
    tb.finish(pending);
}

/// Every device test again, with `rdma.client_exposure = "arena"`.
mod arena {
    macro_rules! in_arena_mode {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                #[ignore = "needs an RDMA device: ci/rxe-test runs it"]
                fn $name() {
                    super::with_exposure(super::ClientExposure::Arena, super::$name);
                }
            )*
        };
    }

    in_arena_mode!(
        segments_up_to_and_beyond_the_sge_limit,
        mixed_segment_kinds_in_one_request,
        credits_exhausted_and_replenished_at_iodepth_64,
        client_killed_mid_transfer,
        server_killed_client_requests_fail_promptly,
        server_closing_a_connection_fails_its_requests_promptly,
        bogus_rkey_is_reported_and_the_server_keeps_serving,
        memlock_too_small_is_a_clear_error,
        busy_poll_round_trip,
        spinning_waiters_share_the_completion_queue,
        waiters_take_their_own_replies_and_nothing_is_stranded,
        inline_payloads_up_to_the_largest_threshold,
        idle_connection_is_closed_by_the_server,
        request_without_reply_times_out,
        queue_pairs_are_negotiated_share_out_requests_and_route_replies,
        one_queue_pair_failing_fails_the_whole_connection,
        request_payloads_wait_for_server_buffers_when_the_pool_is_empty,
        a_request_waiting_for_buffers_does_not_hold_up_finished_ones,
    );
}
