//! The core client's file API allocates nothing per operation over TCP once a client is
//! warm: zero-copy reads and writes on pool buffers the caller reuses
//! ([`File::read_into_async`], [`File::zero_writev_async`], [`File::read_into`],
//! [`File::zero_writev`]) and direct ones on the caller's own memory
//! ([`File::preadv_async`], [`File::pwritev_async`], [`File::preadv`], [`File::pwritev`]),
//! for a client that reconnects (the default: the completion holds the buffers) and one
//! that does not, at iodepth 1 and 8. Counted for the whole process: the caller's thread,
//! the client's reader thread and the server's threads.
//!
//! Its own test binary with one test, because the count is process-wide: no other test
//! runs meanwhile. The client's keepalive (a ping from a thread of its own, every 60 s by
//! default) is off, so that no timer can fire inside a counted stretch.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use zcio::conformance::{pattern, test_pool, Harness};
use zcio::proto::OpenFlags;
use zcio::{Client, Completion, File, Iobref, Pool};
use zcio_tcp::TcpTransport;

#[path = "../../rdma/tests/counting/mod.rs"]
mod counting;
use counting::{
    process_allocations_in as allocations_in, threads, wait_for_new_threads, CountingAlloc,
};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Bytes per operation, in two segments.
const SIZE: usize = 64 << 10;
const SEG: usize = SIZE / 2;
const FILE: usize = 1 << 20;
const COUNT: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    /// `read_into_async` / `zero_writev_async` on reused pool buffers.
    ZeroCopyAsync,
    /// `preadv_async` / `pwritev_async` on reused vectors.
    DirectAsync,
    /// `read_into` / `zero_writev`, blocking.
    ZeroCopySync,
    /// `preadv` / `pwritev` on the caller's memory, blocking.
    DirectSync,
}

/// One operation's memory, reused from operation to operation.
enum Mem {
    Pool(Iobref),
    Vecs(Vec<Vec<u8>>),
}

enum Op {
    Read(Completion<Iobref>),
    Write(Completion<(usize, Iobref)>),
    Vecs(Completion<(usize, Vec<Vec<u8>>)>),
}

/// The offset of operation `i` (spread over the file).
fn offset(i: usize) -> u64 {
    ((i * 7) % (FILE / SIZE) * SIZE) as u64
}

/// Checks the bytes at `off` are the file's (it always holds the pattern: writes write it
/// back).
fn check(expected: &[u8], off: u64, got: &[&[u8]]) {
    let mut o = off as usize;
    for g in got {
        assert!(g[..] == expected[o..o + g.len()], "bytes at {o} differ");
        o += g.len();
    }
    assert_eq!(o - off as usize, SIZE, "short transfer at {off}");
}

struct Run<'a> {
    file: &'a File,
    expected: &'a [u8],
    spare: Vec<Mem>,
    flight: VecDeque<(u64, Op)>,
}

impl Run<'_> {
    fn start(&mut self, way: Way, write: bool, off: u64) {
        let mem = self.spare.pop().expect("a spare op");
        let e = self.expected;
        let o = off as usize;
        match (way, mem) {
            (Way::ZeroCopyAsync, Mem::Pool(mut b)) => {
                if write {
                    for (k, buf) in b.buffers_mut().iter_mut().enumerate() {
                        buf.copy_from_slice(&e[o + k * SEG..o + (k + 1) * SEG]);
                    }
                    let c = self.file.zero_writev_async(b, off).expect("start write");
                    self.flight.push_back((off, Op::Write(c)));
                } else {
                    let c = self.file.read_into_async(b, off).expect("start read");
                    self.flight.push_back((off, Op::Read(c)));
                }
            }
            (Way::DirectAsync, Mem::Vecs(mut v)) => {
                let c = if write {
                    for (k, buf) in v.iter_mut().enumerate() {
                        buf.copy_from_slice(&e[o + k * SEG..o + (k + 1) * SEG]);
                    }
                    self.file.pwritev_async(v, off)
                } else {
                    self.file.preadv_async(v, off)
                };
                self.flight.push_back((off, Op::Vecs(c.expect("start"))));
            }
            (Way::ZeroCopySync, Mem::Pool(mut b)) => {
                if write {
                    for (k, buf) in b.buffers_mut().iter_mut().enumerate() {
                        buf.copy_from_slice(&e[o + k * SEG..o + (k + 1) * SEG]);
                    }
                    assert_eq!(self.file.zero_writev(&b, off).expect("write"), SIZE);
                } else {
                    b = self.file.read_into(b, off).expect("read");
                    let got = b.buffers();
                    check(e, off, &[&got[0][..], &got[1][..]]);
                }
                self.spare.push(Mem::Pool(b));
            }
            (Way::DirectSync, Mem::Vecs(mut v)) => {
                if write {
                    let iov = [
                        IoSlice::new(&e[o..o + SEG]),
                        IoSlice::new(&e[o + SEG..o + SIZE]),
                    ];
                    assert_eq!(self.file.pwritev(&iov, off).expect("write"), SIZE);
                } else {
                    let (a, b) = v.split_at_mut(1);
                    let mut iov = [IoSliceMut::new(&mut a[0]), IoSliceMut::new(&mut b[0])];
                    assert_eq!(self.file.preadv(&mut iov, off).expect("read"), SIZE);
                    check(e, off, &[&v[0], &v[1]]);
                }
                self.spare.push(Mem::Vecs(v));
            }
            _ => panic!("{way:?} got the other kind of memory"),
        }
    }

    fn finish_one(&mut self) {
        let (off, op) = self.flight.pop_front().expect("in flight");
        let mem = match op {
            Op::Read(c) => {
                let b = c.wait().expect("read");
                let got = b.buffers();
                check(self.expected, off, &[&got[0][..], &got[1][..]]);
                Mem::Pool(b)
            }
            Op::Write(c) => {
                let (n, b) = c.wait().expect("write");
                assert_eq!(n, SIZE, "written at {off}");
                Mem::Pool(b)
            }
            Op::Vecs(c) => {
                let (n, v) = c.wait().expect("direct");
                assert_eq!(n, SIZE, "direct at {off}");
                if v.iter().all(|b| b.len() == SEG) {
                    check(self.expected, off, &[&v[0], &v[1]]);
                }
                Mem::Vecs(v)
            }
        };
        self.spare.push(mem);
    }

    /// `COUNT` operations, `depth` in flight.
    fn ops(&mut self, way: Way, write: bool, depth: usize) {
        for i in 0..COUNT {
            if self.flight.len() == depth {
                self.finish_one();
            }
            self.start(way, write, offset(i));
        }
        while !self.flight.is_empty() {
            self.finish_one();
        }
    }
}

#[test]
fn the_file_api_allocates_nothing_per_operation() {
    let h = Harness::start(Arc::new(TcpTransport), |c| c.server.workers = 2);
    let expected = pattern(11, FILE);
    std::fs::write(h.path("f"), &expected).unwrap();
    for reconnect in [true, false] {
        let mut cfg = h.cfg.clone();
        cfg.client.reconnect = reconnect;
        cfg.client.keepalive = None;
        let pool = Pool::new(&test_pool()).unwrap();
        let t: Arc<dyn zcio::transport::Transport> = Arc::new(TcpTransport);
        let before = threads();
        let client = if reconnect {
            Client::connect_shared(&cfg, t, pool).unwrap()
        } else {
            Client::connect_transport(&cfg, t.as_ref(), pool).unwrap()
        };
        // The connection's threads, client and server, have started (a thread's start
        // allocates, once): what is counted below is what the I/O does.
        wait_for_new_threads(
            &before,
            &["zcio-tcp-client", "zcio-conn", "zcio-tcp-writer"],
        );
        let file = client.open("f", OpenFlags::rw()).unwrap();
        for way in [
            Way::ZeroCopyAsync,
            Way::DirectAsync,
            Way::ZeroCopySync,
            Way::DirectSync,
        ] {
            let pool_way = matches!(way, Way::ZeroCopyAsync | Way::ZeroCopySync);
            let spare: Vec<Mem> = (0..8)
                .map(|_| {
                    if pool_way {
                        Mem::Pool(client.get_buffers(SEG, 2).unwrap())
                    } else {
                        Mem::Vecs(vec![vec![0u8; SEG]; 2])
                    }
                })
                .collect();
            let mut run = Run {
                file: &file,
                expected: &expected,
                spare,
                flight: VecDeque::with_capacity(8),
            };
            let depths: &[usize] = if matches!(way, Way::ZeroCopyAsync | Way::DirectAsync) {
                &[1, 8]
            } else {
                &[1]
            };
            for &depth in depths {
                // Warm up: every spare vector, cell and queue has carried both kinds.
                run.ops(way, false, depth);
                run.ops(way, true, depth);
                let ((), reads, first_read) = allocations_in(|| run.ops(way, false, depth));
                let ((), writes, first_write) = allocations_in(|| run.ops(way, true, depth));
                println!(
                    "reconnect {reconnect}, {way:?}, iodepth {depth}: {reads} allocations in {COUNT} reads, {writes} in {COUNT} writes"
                );
                assert!(
                    reads == 0,
                    "{reads} allocations in {COUNT} reads (reconnect {reconnect}, {way:?}, iodepth {depth}), the first ones in {first_read}"
                );
                assert!(
                    writes == 0,
                    "{writes} allocations in {COUNT} writes (reconnect {reconnect}, {way:?}, iodepth {depth}), the first ones in {first_write}"
                );
            }
        }
        file.close().unwrap();
        assert_eq!(std::fs::read(h.path("f")).unwrap(), expected);
        drop(client);
    }
    h.assert_server_clean();
}
