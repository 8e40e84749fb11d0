//! The RDMA data path allocates nothing per I/O: once a connection has carried requests
//! of a shape, a client that reuses its request vectors (a [`Reply`] gives them back) and
//! a server that gives each served request back ([`Replier::recycle`]) make 64 KiB reads
//! (the server RDMA WRITEs) and writes (the server RDMA READs) with no heap allocation in
//! any thread of the process: the caller's, the server's, or the queue pairs' completion
//! threads.
//!
//! Its own test binary with one test, because the count is process-wide: no other test
//! may run meanwhile. It needs a device, so it is `#[ignore]`d: a host without one reports it
//! as ignored, and `ci/rxe-test` runs it (`--include-ignored`) in a guest with Soft-RoCE.
#![cfg(feature = "rdma")]

use std::collections::VecDeque;
use std::time::Duration;

use zcio::config::Config;
use zcio::conformance::{pattern, test_pool};
use zcio::transport::{ClientConn, Pending, RecvSeg, Reply, Request, SendSeg, Transport};
use zcio::{IobufMut, Pool};
use zcio_rdma::config::RdmaConfig;
use zcio_rdma::RdmaTransport;

mod counting;
use counting::{process_allocations_in as allocations_in, CountingAlloc};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------------------------

const SIZE: usize = 64 << 10;
/// Request kinds, the first header byte.
const READ: u8 = b'r';
const WRITE: u8 = b'w';
/// The reply header: no longer than a request's, so it fits the request's header buffer.
const REPLY_HEADER: &[u8] = b"done............";

fn base_config() -> Config {
    let mut cfg = Config {
        transport: "rdma".into(),
        ..Config::default()
    };
    RdmaConfig::of_mut(&mut cfg).device = std::env::var("ZCIO_RDMA_DEVICE")
        .ok()
        .filter(|n| !n.is_empty());
    cfg.pool = test_pool();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg
}

/// One request's vectors and buffer, reused from request to request.
struct Op {
    header: Vec<u8>,
    send: Vec<SendSeg>,
    recv: Vec<RecvSeg>,
    /// The 64 KiB pool buffer: read into, or written from.
    buf: Option<IobufMut>,
}

impl Op {
    fn new(pool: &Pool) -> Op {
        let mut buf = pool.get(SIZE).expect("a client buffer");
        buf.copy_from_slice(&pattern(2, SIZE));
        Op {
            header: Vec::with_capacity(32),
            send: Vec::with_capacity(1),
            recv: Vec::with_capacity(1),
            buf: Some(buf),
        }
    }

    /// Starts the op as a read or a write; the vectors and the buffer go with it.
    fn start(&mut self, conn: &dyn ClientConn, kind: u8) -> Pending<Reply> {
        let mut header = std::mem::take(&mut self.header);
        header.clear();
        header.extend_from_slice(&[kind; 32]);
        let mut send = std::mem::take(&mut self.send);
        let mut recv = std::mem::take(&mut self.recv);
        let buf = self.buf.take().expect("the op's buffer is home");
        if kind == READ {
            recv.push(RecvSeg::Pool(buf));
        } else {
            send.push(SendSeg::PoolMut(buf));
        }
        conn.start(Request { header, send, recv }).expect("start")
    }

    /// Takes the vectors and the buffer back from the reply; returns the payload length.
    fn finish(&mut self, reply: Reply) -> usize {
        let Reply {
            header,
            payload_len,
            mut recv,
            mut send,
        } = reply;
        assert_eq!(header, REPLY_HEADER, "reply header");
        let buf = match (recv.pop(), send.pop()) {
            (Some(RecvSeg::Pool(b)), None) | (None, Some(SendSeg::PoolMut(b))) => b,
            _ => panic!("the reply does not give the op's buffer back"),
        };
        self.header = header;
        self.send = send;
        self.recv = recv;
        self.buf = Some(buf);
        payload_len
    }
}

/// Requests in flight: an op's index and its reply to come.
type Flight = VecDeque<(usize, Pending<Reply>)>;

/// `count` ops of `kind`, as many in flight as there are ops, each new one started as the
/// oldest finishes.
fn run(
    conn: &dyn ClientConn,
    ops: &mut [Op],
    flight: &mut Flight,
    kind: u8,
    count: usize,
) -> usize {
    let depth = ops.len();
    let mut bytes = 0;
    for i in 0..count {
        if flight.len() == depth {
            let (k, p) = flight.pop_front().expect("in flight");
            bytes += ops[k].finish(p.wait().expect("reply"));
        }
        let k = i % depth;
        flight.push_back((k, ops[k].start(conn, kind)));
    }
    while let Some((k, p)) = flight.pop_front() {
        bytes += ops[k].finish(p.wait().expect("reply"));
    }
    bytes
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn reads_and_writes_allocate_nothing_per_io() {
    let t = RdmaTransport::new();
    if let Err(e) = t.check_available(&base_config()) {
        panic!("reads_and_writes_allocate_nothing_per_io needs an RDMA device: {e}");
    }
    // Event-driven waits (the default) and spinning waiters take different paths.
    for spin in [Duration::ZERO, Duration::from_millis(2)] {
        let mut cfg = base_config();
        RdmaConfig::of_mut(&mut cfg).spin = spin;
        let spool = Pool::new(&cfg.pool).unwrap();
        let listener = t.listen(&cfg, &spool).unwrap();
        let mut ccfg = cfg.clone();
        ccfg.client.connect = listener.local_addr();
        let cpool = Pool::new(&cfg.pool).unwrap();

        // The server answers reads with one 64 KiB buffer of pattern 1, and checks that a
        // write's payload is that too: every op's buffer (pattern 2 at first) has been read
        // into before it is written from.
        let expected = pattern(1, SIZE);
        let mut content = spool.get(SIZE).unwrap();
        content.copy_from_slice(&expected);
        let content = content.freeze();
        let server = std::thread::spawn(move || {
            let mut sc = listener.accept().unwrap().unwrap();
            let replier = sc.replier();
            let mut bad_writes = 0u64;
            while let Some(inc) = sc.recv().expect("server recv") {
                let payload: &[zcio::Iobuf] = match inc.header.first() {
                    Some(&READ) => std::slice::from_ref(&content),
                    _ => {
                        let ok = inc.payload.len() == 1 && inc.payload[0][..] == expected[..];
                        bad_writes += u64::from(!ok);
                        &[]
                    }
                };
                replier.reply(inc.id, REPLY_HEADER, payload).expect("reply");
                replier.recycle(inc);
            }
            (bad_writes, listener)
        });

        let conn = t.connect(&ccfg, &cpool).unwrap();
        let mut ops: Vec<Op> = (0..8).map(|_| Op::new(&cpool)).collect();
        let mut flight = Flight::with_capacity(ops.len());
        for depth in [1, 8] {
            let ops = &mut ops[..depth];
            // Warm up: every slot and queue pair carries requests of both kinds first.
            let f = &mut flight;
            run(&*conn, ops, f, READ, 64);
            run(&*conn, ops, f, WRITE, 64);
            let (bytes, reads, first_read) = allocations_in(|| run(&*conn, ops, f, READ, 200));
            assert_eq!(bytes, 200 * SIZE, "read payload");
            let (bytes, writes, first_write) = allocations_in(|| run(&*conn, ops, f, WRITE, 200));
            assert_eq!(bytes, 0, "write replies carry no payload");
            println!(
                "spin {spin:?}, iodepth {depth}: {reads} allocations in 200 reads, {writes} in 200 writes"
            );
            assert!(
                reads == 0,
                "{reads} allocations in 200 reads at iodepth {depth}, the first ones in {first_read}"
            );
            assert!(
                writes == 0,
                "{writes} allocations in 200 writes at iodepth {depth}, the first ones in {first_write}"
            );
            // The reads really landed.
            let want = pattern(1, SIZE);
            for op in ops.iter() {
                let b = op.buf.as_ref().unwrap();
                assert!(b[..] == want[..], "read payload content");
            }
        }
        drop(conn);
        let (bad_writes, listener) = server.join().unwrap();
        assert_eq!(bad_writes, 0, "write payloads");
        listener.shutdown();
    }
}
