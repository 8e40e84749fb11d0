//! The TCP data path allocates nothing per I/O, on either side: once a connection has
//! carried requests of a shape, a client that reuses its request vectors (a [`Reply`] gives
//! them back) and the real zcio server make 64 KiB reads (sent from the page cache with
//! `sendfile`, or read into pool buffers first) and writes (`pwritev` from the pool buffers
//! the request landed in) with no heap allocation in any thread of the process: the
//! caller's, the client's reader thread, the server's connection thread and its workers.
//!
//! Its own test binary with one test, because the count is process-wide: no other test
//! may run meanwhile. The counting allocator is the RDMA transport's (the same proof).

use std::collections::VecDeque;
use std::sync::Arc;

use zcio::conformance::{pattern, raw_call, test_pool, Harness};
use zcio::proto::{self, OpenFlags, Req, Resp, NONCE_LEN};
use zcio::transport::{ClientConn, Pending, RecvSeg, Reply, Request, SendSeg, Transport};
use zcio::{IobufMut, Pool};
use zcio_tcp::TcpTransport;

#[path = "../../rdma/tests/counting/mod.rs"]
mod counting;
use counting::{
    process_allocations_in as allocations_in, threads, wait_for_new_threads, CountingAlloc,
};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const SIZE: usize = 64 << 10;
const FILE: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Write,
}

/// One request's vectors and buffer, reused from request to request.
struct Op {
    header: Vec<u8>,
    send: Vec<SendSeg>,
    recv: Vec<RecvSeg>,
    buf: Option<IobufMut>,
    offset: u64,
    kind: Kind,
}

impl Op {
    fn new(pool: &Pool) -> Op {
        Op {
            header: Vec::with_capacity(32),
            send: Vec::with_capacity(1),
            recv: Vec::with_capacity(1),
            buf: Some(pool.get(SIZE).expect("a client buffer")),
            offset: 0,
            kind: Kind::Read,
        }
    }

    fn start(&mut self, conn: &dyn ClientConn, fh: u64, kind: Kind, offset: u64) -> Pending<Reply> {
        let mut header = std::mem::take(&mut self.header);
        let mut send = std::mem::take(&mut self.send);
        let mut recv = std::mem::take(&mut self.recv);
        let mut buf = self.buf.take().expect("the op's buffer is home");
        self.offset = offset;
        self.kind = kind;
        match kind {
            Kind::Read => {
                Req::Read {
                    fh,
                    offset,
                    len: SIZE as u32,
                }
                .encode_into(&mut header);
                recv.push(RecvSeg::Pool(buf));
            }
            Kind::Write => {
                Req::Write { fh, offset }.encode_into(&mut header);
                // What the file holds there already: the file stays the pattern.
                let o = offset as usize;
                EXPECTED.with(|e| buf.copy_from_slice(&e[o..o + SIZE]));
                send.push(SendSeg::PoolMut(buf));
            }
        }
        conn.start(Request { header, send, recv }).expect("start")
    }

    /// Takes the vectors and the buffer back from the reply; checks it.
    fn finish(&mut self, reply: Reply, fh: u64) {
        let Reply {
            header,
            payload_len,
            mut recv,
            mut send,
        } = reply;
        let req = match self.kind {
            Kind::Read => Req::Read {
                fh,
                offset: self.offset,
                len: SIZE as u32,
            },
            Kind::Write => Req::Write {
                fh,
                offset: self.offset,
            },
        };
        match proto::decode_reply(&req, &header) {
            Ok(Resp::Read { len, .. }) => {
                assert_eq!((len as usize, payload_len), (SIZE, SIZE), "read length")
            }
            Ok(Resp::Write { written }) => assert_eq!(written as usize, SIZE, "written"),
            other => panic!("reply: {other:?}"),
        }
        let buf = match (recv.pop(), send.pop()) {
            (Some(RecvSeg::Pool(b)), None) | (None, Some(SendSeg::PoolMut(b))) => b,
            _ => panic!("the reply does not give the op's buffer back"),
        };
        if self.kind == Kind::Read {
            let o = self.offset as usize;
            let same = EXPECTED.with(|e| buf[..] == e[o..o + SIZE]);
            assert!(same, "read at {o}: other bytes");
        }
        self.header = header;
        self.send = send;
        self.recv = recv;
        self.buf = Some(buf);
    }
}

thread_local! {
    static EXPECTED: Vec<u8> = pattern(3, FILE);
}

type Flight = VecDeque<(usize, Pending<Reply>)>;

/// `count` ops of `kind` over the file, as many in flight as there are ops.
fn run(
    conn: &dyn ClientConn,
    fh: u64,
    ops: &mut [Op],
    flight: &mut Flight,
    kind: Kind,
    count: usize,
) {
    let depth = ops.len();
    let blocks = (FILE / SIZE) as u64;
    for i in 0..count {
        if flight.len() == depth {
            let (k, p) = flight.pop_front().expect("in flight");
            ops[k].finish(p.wait().expect("reply"), fh);
        }
        let k = i % depth;
        let offset = (i as u64 * 7 % blocks) * SIZE as u64;
        flight.push_back((k, ops[k].start(conn, fh, kind, offset)));
    }
    while let Some((k, p)) = flight.pop_front() {
        ops[k].finish(p.wait().expect("reply"), fh);
    }
}

/// A plain request/reply (set-up only: allocates).
fn call(conn: &dyn ClientConn, req: &Req) -> Resp {
    raw_call(conn, req).expect("reply")
}

#[test]
fn reads_and_writes_allocate_nothing_per_io() {
    // sendfile (file ranges) and pool-buffer reads, writes in both servers.
    for sendfile in [true, false] {
        let h = Harness::start(Arc::new(TcpTransport), |c| {
            zcio_tcp::config::TcpConfig::of_mut(c).sendfile = sendfile;
            c.server.workers = 2;
        });
        std::fs::write(h.path("f"), EXPECTED.with(Clone::clone)).unwrap();
        let cpool = Pool::new(&test_pool()).unwrap();
        let before = threads();
        let conn = TcpTransport.connect(&h.cfg, &cpool).unwrap();
        // The connection's threads, client and server, have started (a thread's start
        // allocates, once): what is counted below is what the I/O does.
        wait_for_new_threads(
            &before,
            &["zcio-tcp-client", "zcio-conn", "zcio-tcp-writer"],
        );
        call(
            &*conn,
            &Req::Hello {
                version: proto::VERSION,
                client_nonce: [7; NONCE_LEN],
            },
        );
        let Resp::Open { fh, .. } = call(
            &*conn,
            &Req::Open {
                path: "f".into(),
                flags: OpenFlags::rw(),
                mode: 0,
            },
        ) else {
            panic!("open")
        };
        let mut ops: Vec<Op> = (0..8).map(|_| Op::new(&cpool)).collect();
        let mut flight = Flight::with_capacity(ops.len());
        for depth in [1, 8] {
            let ops = &mut ops[..depth];
            let f = &mut flight;
            // Warm up: every vector, cell and queue has carried both kinds first.
            run(&*conn, fh, ops, f, Kind::Read, 64);
            run(&*conn, fh, ops, f, Kind::Write, 64);
            let ((), reads, first_read) =
                allocations_in(|| run(&*conn, fh, ops, f, Kind::Read, 200));
            let ((), writes, first_write) =
                allocations_in(|| run(&*conn, fh, ops, f, Kind::Write, 200));
            println!(
                "sendfile {sendfile}, iodepth {depth}: {reads} allocations in 200 reads, {writes} in 200 writes"
            );
            assert!(
                reads == 0,
                "{reads} allocations in 200 reads (sendfile {sendfile}, iodepth {depth}), the first ones in {first_read}"
            );
            assert!(
                writes == 0,
                "{writes} allocations in 200 writes (sendfile {sendfile}, iodepth {depth}), the first ones in {first_write}"
            );
        }
        let stats = h.server.stats();
        let (ranges, pooled) = (
            stats
                .file_range_replies
                .load(std::sync::atomic::Ordering::Relaxed),
            stats
                .pool_read_replies
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        if sendfile {
            assert!(
                ranges > 0 && pooled == 0,
                "{ranges} ranges, {pooled} pooled"
            );
        } else {
            assert!(
                ranges == 0 && pooled > 0,
                "{ranges} ranges, {pooled} pooled"
            );
        }
        drop((ops, conn));
        h.assert_server_clean();
    }
}
