//! Pool get-and-drop against the system allocator, on one thread and on two.
//!
//! Groups are named `get_drop/<size>/<threads>`; each holds three functions:
//! - `pool`: `Pool::get` of a buffer of that size, write one byte, drop (slot goes back);
//! - `vec_with_capacity`: `Vec::with_capacity(n)`, write one byte, drop (malloc + free);
//! - `vec_zeroed`: `vec![0u8; n]`, drop (calloc + free: what a safe caller would use).
//!
//! Throughput is reported in elements per second where one element is one get-and-drop, so
//! for the two-thread groups it is the aggregate rate of both threads and the ratio of the
//! two-thread to the one-thread figure is the scaling. Two-thread samples run each thread
//! for the same number of operations, released together by a barrier, and time from the
//! first thread's start to the last thread's end.
//!
//! Run: `cargo bench --bench pool -- --warm-up-time 1 --measurement-time 3`.

// `criterion_group!` expands to an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use zcio::pool::{ClassConfig, Pool, PoolConfig};

const SIZES: [(usize, &str); 2] = [(4 << 10, "4K"), (128 << 10, "128K")];

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

/// Runs `op` `iters` times on each of `threads` threads at once; returns the wall time from
/// the earliest start to the latest finish.
fn run_threads<F>(threads: usize, iters: u64, op: F) -> Duration
where
    F: Fn() + Send + Sync + 'static,
{
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let op = op.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                // Warm this thread's allocator arena / home stripe outside the timing.
                op();
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    op();
                }
                (start, Instant::now())
            })
        })
        .collect();
    let spans: Vec<(Instant, Instant)> = handles
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .collect();
    let first = spans.iter().map(|s| s.0).min().expect("a thread");
    let last = spans.iter().map(|s| s.1).max().expect("a thread");
    last - first
}

fn get_drop(c: &mut Criterion) {
    let pool = bench_pool();
    for (n, label) in SIZES {
        let mut g = c.benchmark_group(format!("get_drop/{label}/1_thread"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("pool", |b| b.iter(|| pool_op(&pool, n)));
        g.bench_function("vec_with_capacity", |b| b.iter(|| vec_capacity_op(n)));
        g.bench_function("vec_zeroed", |b| b.iter(|| vec_zeroed_op(n)));
        g.finish();

        let threads = 2;
        let mut g = c.benchmark_group(format!("get_drop/{label}/{threads}_threads"));
        // One criterion iteration is one operation on each thread.
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_function("pool", |b| {
            b.iter_custom(|iters| {
                let p = pool.clone();
                run_threads(threads, iters, move || pool_op(&p, n))
            })
        });
        g.bench_function("vec_with_capacity", |b| {
            b.iter_custom(|iters| run_threads(threads, iters, move || vec_capacity_op(n)))
        });
        g.bench_function("vec_zeroed", |b| {
            b.iter_custom(|iters| run_threads(threads, iters, move || vec_zeroed_op(n)))
        });
        g.finish();
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
