//! What a malicious server can reach of a client's memory, per `rdma.client_exposure`.
//!
//! The server here is a peer written with the verbs layer and the wire codecs only (it
//! speaks the bootstrap and the message format, so the real client connects to it), which
//! then does with the descriptors of the client's requests what a hostile server would:
//! RDMA WRITE into a buffer after its request completed, into a request's buffer in the
//! wrong direction, into another request's buffer with one request's key. With "request"
//! each attempt must end in a remote access error and leave the client's bytes as they
//! were; with "arena" (the server is trusted) the same attempts succeed, which is what
//! shows the windows are doing the work.
//!
//! Soft-RoCE does not check a window's bounds, only those of the memory region under it
//! (see `window_bounds_on_this_device` in tests/verbs.rs and docs/RXE.md), so the cases
//! here that must fail on rxe use buffers in different pool arenas (different regions) or
//! rkeys that are no longer bound; on such a device a server holding a bound write window
//! can reach the rest of that window's arena while the request is in flight.
//!
//! Every test needs a device and is `#[ignore]`d on the host; `ci/rxe-test` runs them.
#![cfg(feature = "rdma")]

use std::alloc::Layout;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use zcio::config::Config;
use zcio::conformance::test_pool;
use zcio::transport::{ClientConn, RawSeg, RecvSeg, Request, SendSeg, Transport};
use zcio::{IobufMut, Pool};
use zcio_rdma::config::{ClientExposure, RdmaConfig};
use zcio_rdma::transport::bootstrap::{Hello, Role, HELLO_LEN, READY};
use zcio_rdma::transport::msg::{decode_request, encode_reply, Desc, MsgLimits};
use zcio_rdma::verbs::{
    CompletionQueue, Context, CqMode, MemoryRegion, MrAccess, ProtectionDomain, QpConfig,
    QueuePair, Remote, WcOpcode, WcStatus, WorkCompletion,
};
use zcio_rdma::RdmaTransport;

const WAIT: Duration = Duration::from_secs(60);
/// The fake server's receives: this many, this big.
const CREDITS: usize = 4;
const RECV_SIZE: usize = 64 << 10;
/// Its memory: receives, then a data area, then the reply message.
const DATA_OFF: usize = CREDITS * RECV_SIZE;
const DATA_LEN: usize = 1 << 20;
const MSG_OFF: usize = DATA_OFF + DATA_LEN;
const MEM_LEN: usize = MSG_OFF + 4096;

fn device_name() -> Option<String> {
    std::env::var("ZCIO_RDMA_DEVICE")
        .ok()
        .filter(|n| !n.is_empty())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    zcio::conformance::pattern(u64::from(seed), len)
}

/// Page-aligned memory the fake server registers; touched only through raw copies while
/// no work request targets it.
struct Mem {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: plain heap memory; the owner (one thread) decides who touches it.
unsafe impl Send for Mem {}

impl Mem {
    fn new(len: usize) -> Mem {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Mem { ptr, layout }
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.layout.size());
        // SAFETY: in bounds (checked); `data` is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.layout.size());
        let mut out = vec![0u8; len];
        // SAFETY: in bounds (checked); `out` is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), len) };
        out
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// A request as the fake server sees it.
#[derive(Debug, Clone)]
struct Seen {
    id: u64,
    header: Vec<u8>,
    send: Vec<Desc>,
    recv: Vec<Desc>,
}

/// The fake server's side of one connection. Fields drop in order: queue pair first, the
/// region, then the memory.
struct Peer {
    qp: QueuePair,
    cq: CompletionQueue,
    mr: MemoryRegion,
    _pd: ProtectionDomain,
    mem: Mem,
    sock: TcpStream,
    limits: MsgLimits,
    /// Requests that arrived while waiting for something else.
    arrived: Vec<Seen>,
}

impl Peer {
    /// Accepts one client on `l` and does the server's half of the bootstrap.
    fn accept(l: &TcpListener) -> Peer {
        let (mut sock, _) = l.accept().unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; HELLO_LEN];
        sock.read_exact(&mut b).unwrap();
        let theirs = Hello::decode(&b, Role::Client).unwrap();
        let ctx = Context::open(device_name().as_deref()).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let mem = Mem::new(MEM_LEN);
        // SAFETY: `mem` outlives `mr` (field order of `Peer`); it is touched through raw
        // copies only while no work request targets the part touched.
        let mr = unsafe { pd.register(mem.ptr, MEM_LEN, MrAccess::LocalWrite) }.unwrap();
        let cq = CompletionQueue::new(&ctx, 256, CqMode::BusyPoll).unwrap();
        let cfg = QpConfig {
            max_send_wr: 64,
            max_recv_wr: CREDITS as u32,
            max_inline_data: 0,
            ..QpConfig::default()
        };
        let mut qp = QueuePair::new(&pd, &cq, &cq, &cfg).unwrap();
        for i in 0..CREDITS {
            qp.post_recv(i as u64, mr.sge(i * RECV_SIZE, RECV_SIZE as u32).unwrap())
                .unwrap();
        }
        let ours = Hello {
            role: Role::Server,
            queue_pairs: 1,
            endpoint: qp.local_endpoint(),
            credits: CREDITS as u32,
            max_segments: 16,
            max_payload: DATA_LEN as u32,
            max_header: theirs.max_header,
            inline_threshold: 0,
            recv_size: RECV_SIZE as u32,
        };
        sock.write_all(&ours.encode()).unwrap();
        qp.connect(&theirs.endpoint).unwrap();
        sock.write_all(&[READY]).unwrap();
        let mut r = [0u8; 1];
        sock.read_exact(&mut r).unwrap();
        assert_eq!(r[0], READY);
        Peer {
            qp,
            cq,
            mr,
            _pd: pd,
            mem,
            sock,
            limits: MsgLimits {
                max_header: theirs.max_header as usize,
                max_segments: 16,
                max_payload: DATA_LEN,
                inline_threshold: 0,
            },
            arrived: Vec::new(),
        }
    }

    fn poll_one(&self) -> WorkCompletion {
        let mut out = [WorkCompletion::EMPTY; 1];
        let n = self.cq.wait(&mut out, Some(WAIT)).unwrap();
        assert_eq!(n, 1, "no completion within {WAIT:?}");
        out[0]
    }

    /// Takes a receive completion: decodes the request and reposts the receive.
    fn take_request(&mut self, c: &WorkCompletion) {
        assert_eq!(c.status, WcStatus::Success, "{c:?}");
        let slot = c.wr_id as usize;
        let bytes = self.mem.read(slot * RECV_SIZE, c.byte_len as usize);
        let v = decode_request(&bytes, &self.limits).unwrap();
        self.arrived.push(Seen {
            id: v.id,
            header: v.header.to_vec(),
            send: v.send_descs().collect(),
            recv: v.recv_descs().collect(),
        });
        self.qp
            .post_recv(
                c.wr_id,
                self.mr.sge(slot * RECV_SIZE, RECV_SIZE as u32).unwrap(),
            )
            .unwrap();
    }

    /// The next request, in arrival order.
    fn request(&mut self) -> Seen {
        while self.arrived.is_empty() {
            let c = self.poll_one();
            assert_eq!(c.opcode, WcOpcode::Recv, "{c:?}");
            self.take_request(&c);
        }
        self.arrived.remove(0)
    }

    /// Waits for the send-side completion of `wr_id`, keeping requests that arrive.
    fn send_done(&mut self, wr_id: u64) -> WcStatus {
        loop {
            let c = self.poll_one();
            if c.wr_id == wr_id {
                return c.status;
            }
            // Receives flushed after an error are dropped; the failed work request's own
            // completion comes too.
            if c.status == WcStatus::Success {
                self.take_request(&c);
            }
        }
    }

    /// RDMA WRITEs `data` to `addr` of the client with `rkey`.
    fn write(&mut self, addr: u64, rkey: u32, data: &[u8]) -> WcStatus {
        self.mem.write(DATA_OFF, data);
        let sge = self.mr.sge(DATA_OFF, data.len() as u32).unwrap();
        self.qp
            .post_write(1000, &[sge], Remote { addr, rkey })
            .unwrap();
        self.send_done(1000)
    }

    /// RDMA READs `len` bytes from `addr` of the client with `rkey`.
    fn read(&mut self, addr: u64, rkey: u32, len: usize) -> (WcStatus, Vec<u8>) {
        self.mem.write(DATA_OFF, &vec![0u8; len]);
        let sge = self.mr.sge(DATA_OFF, len as u32).unwrap();
        self.qp
            .post_read(1001, &[sge], Remote { addr, rkey })
            .unwrap();
        let st = self.send_done(1001);
        (st, self.mem.read(DATA_OFF, len))
    }

    /// Replies to `req`: `payload_len` bytes already written into its landing zone.
    fn reply(&mut self, req: &Seen, payload_len: usize) {
        let mut msg = vec![0u8; 4096];
        let n = encode_reply(&mut msg, req.id, &req.header, payload_len, false).unwrap();
        self.mem.write(MSG_OFF, &msg[..n]);
        let sge = self.mr.sge(MSG_OFF, n as u32).unwrap();
        self.qp.post_send(1002, &[sge]).unwrap();
        assert_eq!(self.send_done(1002), WcStatus::Success);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// A client in `mode` connected to a fake server that runs `script` on its connection and
/// sends back what the script returns.
struct Session<T> {
    conn: Box<dyn ClientConn>,
    pool: Pool,
    server: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Session<T> {
    fn start(mode: ClientExposure, script: impl FnOnce(&mut Peer) -> T + Send + 'static) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut peer = Peer::accept(&l);
            script(&mut peer)
        });
        let mut cfg = Config {
            transport: "rdma".into(),
            ..Config::default()
        };
        cfg.pool = test_pool();
        cfg.client.connect = addr.to_string();
        cfg.client.timeout = WAIT;
        let r = RdmaConfig::of_mut(&mut cfg);
        r.device = device_name();
        r.client_exposure = mode;
        r.queue_pairs = 1;
        r.credits = CREDITS;
        let pool = Pool::new(&cfg.pool).unwrap();
        let conn = RdmaTransport::new()
            .connect(&cfg, &pool)
            .unwrap_or_else(|e| panic!("connect: {e}"));
        Session {
            conn,
            pool,
            server: Some(server),
        }
    }

    /// A pool buffer of `len` bytes filled with `seed`'s pattern.
    fn buffer(&self, len: usize, seed: u8) -> IobufMut {
        let mut b = self.pool.get(len).unwrap();
        b.set_len(len);
        b.copy_from_slice(&pattern(len, seed));
        b
    }

    /// Starts a request reading into `buf` (which the test keeps).
    fn read_into(&self, buf: &IobufMut) -> zcio::transport::Pending<zcio::transport::Reply> {
        // SAFETY: the test keeps `buf` alive and does not touch it until the request
        // completes (it waits on the returned handle first).
        let seg = unsafe { RawSeg::from_pool(buf) };
        self.conn
            .start(Request {
                header: b"read".to_vec(),
                send: Vec::new(),
                recv: vec![RecvSeg::Raw(seg)],
            })
            .unwrap()
    }

    /// Starts a request sending `buf` (which the test keeps).
    fn write_from(&self, buf: &IobufMut) -> zcio::transport::Pending<zcio::transport::Reply> {
        // SAFETY: as in `read_into`.
        let seg = unsafe { RawSeg::from_pool(buf) };
        self.conn
            .start(Request {
                header: b"write".to_vec(),
                send: vec![SendSeg::Raw(seg)],
                recv: Vec::new(),
            })
            .unwrap()
    }

    fn server_result(&mut self) -> T {
        self.server
            .take()
            .unwrap()
            .join()
            .expect("the fake server panicked")
    }
}

fn expect_refused(mode: ClientExposure, status: WcStatus, what: &str) {
    match mode {
        ClientExposure::Request => {
            assert_eq!(status, WcStatus::RemoteAccessError, "{what}: {status:?}")
        }
        ClientExposure::Arena => assert_eq!(status, WcStatus::Success, "{what}: {status:?}"),
    }
}

/// After a read's reply, its buffer is out of the server's reach ("request"); with
/// "arena" the server still writes it.
fn after_the_reply(mode: ClientExposure) {
    let (tx, rx) = mpsc::channel();
    let mut s = Session::start(mode, move |p| {
        let a = p.request();
        let d = a.recv[0];
        assert_eq!(
            p.write(d.addr, d.rkey, &pattern(d.len as usize, 2)),
            WcStatus::Success
        );
        p.reply(&a, d.len as usize);
        // The client saw its reply; it sends one more request when it has checked it.
        let _b = p.request();
        tx.send(()).unwrap();
        p.write(d.addr, d.rkey, &pattern(4096, 3))
    });
    let a = s.buffer(64 << 10, 1);
    let reply = s.read_into(&a).wait().expect("the honest read");
    assert_eq!(reply.payload_len, 64 << 10);
    assert!(a[..] == pattern(64 << 10, 2)[..], "the reply's bytes");
    let b = s.buffer(64 << 10, 4);
    let pending = s.read_into(&b);
    rx.recv().unwrap();
    let status = s.server_result();
    expect_refused(mode, status, "a write after the reply");
    // The attack fails the connection ("request") or is answered by nobody: either way the
    // request ends (with "arena" when the fake server hangs up).
    let _ = pending.wait();
    match mode {
        ClientExposure::Request => {
            assert!(
                a[..] == pattern(64 << 10, 2)[..],
                "the completed read's buffer changed"
            );
            assert!(
                b[..] == pattern(64 << 10, 4)[..],
                "the failed read's buffer changed"
            );
        }
        ClientExposure::Arena => assert!(a[..4096] == pattern(4096, 3)[..]),
    }
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn request_mode_a_completed_reads_buffer_is_out_of_reach() {
    after_the_reply(ClientExposure::Request);
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn arena_mode_a_completed_reads_buffer_stays_writable() {
    after_the_reply(ClientExposure::Arena);
}

/// A write request's payload can be read, not written; a read's landing zone written,
/// not read.
fn wrong_direction(mode: ClientExposure) {
    // Writing into a write request's payload.
    let mut s = Session::start(mode, |p| {
        let w = p.request();
        let d = w.send[0];
        p.write(d.addr, d.rkey, &pattern(4096, 6))
    });
    let w = s.buffer(64 << 10, 5);
    let pending = s.write_from(&w);
    let status = s.server_result();
    expect_refused(mode, status, "a write into a write request's payload");
    let _ = pending.wait();
    match mode {
        ClientExposure::Request => {
            assert!(w[..] == pattern(64 << 10, 5)[..], "the payload was changed")
        }
        ClientExposure::Arena => assert!(w[..4096] == pattern(4096, 6)[..]),
    }

    // Reading a read request's landing zone (which holds the caller's old bytes).
    let mut s = Session::start(mode, |p| {
        let r = p.request();
        let d = r.recv[0];
        p.read(d.addr, d.rkey, 4096)
    });
    let r = s.buffer(64 << 10, 7);
    let pending = s.read_into(&r);
    let (status, got) = s.server_result();
    expect_refused(mode, status, "a read of a read request's landing zone");
    let _ = pending.wait();
    match mode {
        ClientExposure::Request => assert!(got.iter().all(|&b| b == 0), "bytes leaked"),
        ClientExposure::Arena => assert!(got[..] == pattern(4096, 7)[..]),
    }
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn request_mode_the_wrong_direction_is_refused() {
    wrong_direction(ClientExposure::Request);
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn arena_mode_both_directions_are_open() {
    wrong_direction(ClientExposure::Arena);
}

/// One request's key does not reach another request's buffer (in another arena: see the
/// module documentation for rxe and same-arena buffers), nor a buffer the application
/// holds there.
#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn request_mode_one_requests_key_does_not_reach_another_requests_buffer() {
    let mut s = Session::start(ClientExposure::Request, |p| {
        let a = p.request();
        let b = p.request();
        // a: 64 KiB class; b: 4 KiB class: different arenas, different regions.
        let (da, db) = (a.recv[0], b.recv[0]);
        p.write(db.addr, da.rkey, &pattern(db.len as usize, 9))
    });
    let a = s.buffer(64 << 10, 10);
    let b = s.buffer(4 << 10, 11);
    let pa = s.read_into(&a);
    let pb = s.read_into(&b);
    let status = s.server_result();
    assert_eq!(status, WcStatus::RemoteAccessError, "{status:?}");
    assert!(
        pa.wait().is_err() && pb.wait().is_err(),
        "the connection failed"
    );
    assert!(a[..] == pattern(64 << 10, 10)[..]);
    assert!(
        b[..] == pattern(4 << 10, 11)[..],
        "another request's buffer was written"
    );
}

/// The requests of a well-behaved server complete in "request" mode with every window
/// invalidated in time: a long run of reads and writes through the fake server, each
/// buffer checked, and nothing left bound (the pool gets every buffer back).
#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn request_mode_honest_traffic_round_trips() {
    const N: usize = 40;
    let mut s = Session::start(ClientExposure::Request, |p| {
        let mut stale = Vec::new();
        for i in 0..N {
            let r = p.request();
            if let Some(d) = r.recv.first().copied() {
                let st = p.write(d.addr, d.rkey, &pattern(d.len as usize, i as u8));
                assert_eq!(st, WcStatus::Success, "request {i}");
                p.reply(&r, d.len as usize);
                stale.push(d);
            } else {
                let d = r.send[0];
                let (st, got) = p.read(d.addr, d.rkey, d.len as usize);
                assert_eq!(st, WcStatus::Success, "request {i}");
                assert!(
                    got[..] == pattern(d.len as usize, 100 + i as u8)[..],
                    "request {i}"
                );
                p.reply(&r, 0);
            }
        }
        stale.len()
    });
    for i in 0..N {
        if i % 2 == 0 {
            let b = s.buffer(64 << 10, 200);
            let reply = s.read_into(&b).wait().unwrap();
            assert_eq!(reply.payload_len, 64 << 10);
            assert!(b[..] == pattern(64 << 10, i as u8)[..], "read {i}");
        } else {
            let b = s.buffer(64 << 10, 100 + i as u8);
            s.write_from(&b).wait().unwrap();
        }
    }
    assert_eq!(s.server_result(), N / 2);
}
