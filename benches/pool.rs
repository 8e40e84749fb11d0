//! Pool get-and-drop against the system allocator, on one thread and on two.
//!
//! Groups are named `get_drop/<size>/<threads>`; each holds three functions:
//! - `pool`: `Pool::get` of a buffer of that size, write one byte, drop (slot goes back);
//! - `vec_with_capacity`: `Vec::with_capacity(n)`, write one byte, drop (malloc + free);
//! - `vec_zeroed`: `vec![0u8; n]`, drop (calloc + free: what a safe caller would use).
//!
//! Throughput is reported in elements per second where one element is one get-and-drop, so
//! for the two-thread groups it is the aggregate rate of both threads and the ratio of the
//! two-thread to the one-thread figure is the scaling. Both the one- and the two-thread
//! groups run on the same harness: persistent worker threads (spawned once per benchmark,
//! so thread start-up, migration and cold caches stay out of the samples), each doing the
//! same number of operations per sample, released together by a barrier; a sample's time
//! runs from the first worker's start to the last worker's end.
//!
//! Run: `cargo bench --bench pool -- --warm-up-time 1 --measurement-time 3`.

// `criterion_group!` expands to an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use zcio::pool::{ClassConfig, Pool, PoolConfig};

const SIZES: [(usize, &str); 2] = [(4 << 10, "4K"), (128 << 10, "128K")];
const THREADS: [usize; 2] = [1, 2];

/// A pool with 4 KiB and 128 KiB classes, far more slots than the benchmark ever holds
/// (one per thread), so `get` never waits and never maps a new arena after warm-up.
fn bench_pool() -> Pool {
    let class = |size: usize, count: usize| ClassConfig {
        size,
        count,
        reserve: 0,
        arena_slots: 0,
    };
    Pool::new(&PoolConfig {
        classes: vec![class(4 << 10, 1024), class(128 << 10, 256)],
        wait_timeout: Duration::from_secs(1),
        stripes: 0,
    })
    .expect("bench pool")
}

#[inline(always)]
fn pool_op(pool: &Pool, n: usize) {
    let mut b = pool.get(black_box(n)).expect("pool get");
    b[0] = 1;
    black_box(&mut b);
}

#[inline(always)]
fn vec_capacity_op(n: usize) {
    let mut v = Vec::<u8>::with_capacity(black_box(n));
    v.push(1);
    black_box(&mut v);
}

#[inline(always)]
fn vec_zeroed_op(n: usize) {
    let mut v = vec![0u8; black_box(n)];
    black_box(&mut v);
}

/// Persistent threads running one operation in lock step.
struct Workers {
    go: Vec<Sender<u64>>,
    done: Receiver<(Instant, Instant)>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    fn new<F>(threads: usize, op: F) -> Workers
    where
        F: Fn() + Send + Sync + 'static,
    {
        let op = Arc::new(op);
        let barrier = Arc::new(Barrier::new(threads));
        let (done_tx, done) = channel();
        let mut go = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..threads {
            let (tx, rx) = channel::<u64>();
            let (op, barrier, done_tx) = (op.clone(), barrier.clone(), done_tx.clone());
            handles.push(thread::spawn(move || {
                // Warm this thread's allocator arena / home stripe outside the samples.
                op();
                while let Ok(iters) = rx.recv() {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    if done_tx.send((start, Instant::now())).is_err() {
                        break;
                    }
                }
            }));
            go.push(tx);
        }
        Workers { go, done, handles }
    }

    /// Runs `iters` operations on every worker; the wall time from the earliest start to
    /// the latest finish.
    fn run(&self, iters: u64) -> Duration {
        for tx in &self.go {
            tx.send(iters).expect("worker alive");
        }
        let spans: Vec<(Instant, Instant)> = self
            .go
            .iter()
            .map(|_| self.done.recv().expect("worker alive"))
            .collect();
        let first = spans.iter().map(|s| s.0).min().expect("a worker");
        let last = spans.iter().map(|s| s.1).max().expect("a worker");
        last - first
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.go.clear();
        for h in self.handles.drain(..) {
            h.join().expect("bench worker");
        }
    }
}

fn get_drop(c: &mut Criterion) {
    let pool = bench_pool();
    for (n, label) in SIZES {
        for threads in THREADS {
            let name = if threads == 1 { "thread" } else { "threads" };
            let mut g = c.benchmark_group(format!("get_drop/{label}/{threads}_{name}"));
            // One criterion iteration is one operation on each thread.
            g.throughput(Throughput::Elements(threads as u64));
            let p = pool.clone();
            let w = Workers::new(threads, move || pool_op(&p, n));
            g.bench_function("pool", |b| b.iter_custom(|iters| w.run(iters)));
            drop(w);
            let w = Workers::new(threads, move || vec_capacity_op(n));
            g.bench_function("vec_with_capacity", |b| b.iter_custom(|iters| w.run(iters)));
            drop(w);
            let w = Workers::new(threads, move || vec_zeroed_op(n));
            g.bench_function("vec_zeroed", |b| b.iter_custom(|iters| w.run(iters)));
            drop(w);
            g.finish();
        }
    }
    let st = pool.stats();
    assert_eq!(st.slots_in_use(), 0, "bench leaked buffers");
    assert!(
        st.classes.iter().all(|c| c.waits == 0),
        "a get waited: the pool is too small for the bench\n{st}"
    );
}

criterion_group!(benches, get_drop);
criterion_main!(benches);
